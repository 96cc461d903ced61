//! Least privilege, checked against the real API server: what each of the chart's
//! ServiceAccounts may do (exactly, no more), and which Pod Security Standards controls the
//! chart's workloads do not meet (exactly the documented exceptions).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::authorization::v1::{SelfSubjectRulesReview, SelfSubjectRulesReviewSpec};
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, PostParams};
use libtest_mimic::Trial;
use testbed::{Flavor, Options, TestBed};

use crate::operator::{SYSTEM_NS, install};
use crate::support::trial;

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "security::service_accounts_have_exactly_their_permissions",
            service_accounts_have_exactly_their_permissions,
        ),
        trial(
            "security::pod_security_exceptions_are_the_documented_ones",
            pod_security_exceptions_are_the_documented_ones,
        ),
    ]
}

async fn cluster() -> Result<TestBed> {
    TestBed::start(&Options {
        nodes: 0,
        flavor: Flavor::V2,
        cluster: true,
    })
    .await
}

/// What `client` may do in `namespace` (cluster-wide grants included), one
/// `group/resource[/name] verb` line per permission, as `kubectl auth can-i --list` shows it.
async fn permissions(client: &Client, namespace: &str) -> Result<BTreeSet<String>> {
    let review = SelfSubjectRulesReview {
        spec: SelfSubjectRulesReviewSpec {
            namespace: Some(namespace.into()),
        },
        ..Default::default()
    };
    let review = Api::<SelfSubjectRulesReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    let status = review.status.context("rules review status")?;
    let mut out = BTreeSet::new();
    for rule in status.resource_rules {
        let names = rule.resource_names.unwrap_or_default();
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    if names.is_empty() {
                        out.insert(format!("{group}/{resource} {verb}"));
                    }
                    for name in &names {
                        out.insert(format!("{group}/{resource}/{name} {verb}"));
                    }
                }
            }
        }
    }
    Ok(out)
}

fn set(lines: &[&str]) -> BTreeSet<String> {
    lines.iter().map(|l| l.to_string()).collect()
}

/// Each ServiceAccount's permissions beyond what every authenticated user has are exactly what
/// its process needs: no Secrets, no wildcards, no delete for the agent, no writes to
/// NodeImageReports for the controller, Leases only in the release namespace.
async fn service_accounts_have_exactly_their_permissions() -> Result<()> {
    let bed = cluster().await?;
    install(&bed).await?;
    let c = bed.cluster()?;
    c.ensure_service_account(SYSTEM_NS, "nobody").await?;
    let nobody = c.service_account_client(SYSTEM_NS, "nobody").await?;
    let agent = c.service_account_client(SYSTEM_NS, "imagegc-agent").await?;
    let controller = c
        .service_account_client(SYSTEM_NS, "imagegc-controller")
        .await?;

    let cluster_wide_agent = set(&[
        "imagegc.dev/imageremovals get",
        "imagegc.dev/imageremovals list",
        "imagegc.dev/imageremovals watch",
        "imagegc.dev/imageprunepolicies get",
        "imagegc.dev/imageprunepolicies list",
        "imagegc.dev/imageprunepolicies watch",
        "imagegc.dev/nodeimagereports get",
        "imagegc.dev/nodeimagereports create",
        "imagegc.dev/nodeimagereports patch",
        "imagegc.dev/nodeimagereports update",
        "imagegc.dev/nodeimagereports/status get",
        "imagegc.dev/nodeimagereports/status patch",
        "imagegc.dev/nodeimagereports/status update",
        "/nodes get",
        "/nodes list",
        "/nodes watch",
        "/pods list",
        "/pods watch",
        "events.k8s.io/events create",
        "events.k8s.io/events patch",
    ]);
    let cluster_wide_controller = set(&[
        "imagegc.dev/imageremovals get",
        "imagegc.dev/imageremovals list",
        "imagegc.dev/imageremovals watch",
        "imagegc.dev/imageremovals delete",
        "imagegc.dev/imageremovals/status get",
        "imagegc.dev/imageremovals/status patch",
        "imagegc.dev/imageremovals/status update",
        "imagegc.dev/imageprunepolicies get",
        "imagegc.dev/imageprunepolicies list",
        "imagegc.dev/imageprunepolicies watch",
        "imagegc.dev/imageprunepolicies/status get",
        "imagegc.dev/imageprunepolicies/status patch",
        "imagegc.dev/imageprunepolicies/status update",
        "imagegc.dev/nodeimagereports get",
        "imagegc.dev/nodeimagereports list",
        "imagegc.dev/nodeimagereports watch",
        "/nodes get",
        "/nodes list",
        "/nodes watch",
        "events.k8s.io/events create",
        "events.k8s.io/events patch",
    ]);
    let leases = set(&[
        "coordination.k8s.io/leases create",
        "coordination.k8s.io/leases/imagegc-controller get",
        "coordination.k8s.io/leases/imagegc-controller update",
    ]);

    for namespace in [SYSTEM_NS, "default"] {
        let baseline = permissions(&nobody, namespace).await?;
        for (who, client, mut expected) in [
            ("agent", &agent, cluster_wide_agent.clone()),
            ("controller", &controller, cluster_wide_controller.clone()),
        ] {
            if who == "controller" && namespace == SYSTEM_NS {
                expected.extend(leases.iter().cloned());
            }
            let granted: BTreeSet<String> = permissions(client, namespace)
                .await?
                .difference(&baseline)
                .cloned()
                .collect();
            let extra: Vec<&String> = granted.difference(&expected).collect();
            let missing: Vec<&String> = expected.difference(&granted).collect();
            ensure!(
                extra.is_empty() && missing.is_empty(),
                "{who} in {namespace}: more than it needs {extra:?}; less than it needs {missing:?}"
            );
            ensure!(
                !granted
                    .iter()
                    .any(|p| p.contains("secrets") || p.contains('*')),
                "{who}: {granted:?}"
            );
        }
    }
    Ok(())
}

/// The chart's workloads, applied into namespaces that warn on the `restricted` and on the
/// `baseline` Pod Security level: the agent violates exactly the controls a containerd client
/// cannot avoid (hostPath volumes for the socket's directory and for containerd's root, whose
/// filesystem usage the watermarks read; root for the root-owned socket), each warning names
/// exactly those two volumes, and the controller violates nothing.
async fn pod_security_exceptions_are_the_documented_ones() -> Result<()> {
    let bed = cluster().await?;
    let admin = bed.cluster()?.admin_client().await?;
    let hostpaths = set(&["containerd-run", "containerd-root"]);
    for (level, namespace) in [("restricted", "pss"), ("baseline", "pss-baseline")] {
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": namespace, "labels": {"pod-security.kubernetes.io/warn": level}}
        }))?;
        Api::<Namespace>::all(admin.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        let helm = testbed::tools::go_tool("helm")?;
        let chart = testbed::tools::repo_root().join("charts/imagegc");
        let rendered = Command::new(helm)
            .args(["template", "imagegc"])
            .arg(chart)
            .args(["--namespace", namespace])
            .output()?;
        ensure!(rendered.status.success(), "helm template failed");
        let docs = String::from_utf8(rendered.stdout)?;
        let mut warnings = Vec::new();
        for kind in ["DaemonSet", "Deployment"] {
            let doc = docs
                .split("\n---")
                .find(|d| d.contains(&format!("\nkind: {kind}\n")))
                .with_context(|| format!("no {kind} rendered"))?;
            let mut child = Command::new(testbed::tools::go_tool("kubectl")?)
                .arg("--kubeconfig")
                .arg(&bed.cluster()?.admin_kubeconfig)
                .args(["apply", "-n", namespace, "-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            child
                .stdin
                .take()
                .context("stdin")?
                .write_all(doc.as_bytes())?;
            let out = child.wait_with_output()?;
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            ensure!(out.status.success(), "applying the {kind}: {stderr}");
            warnings.push(violations(&stderr));
        }
        let (agent, controller) = (&warnings[0], &warnings[1]);
        ensure!(
            controller.is_empty(),
            "{level}: controller Deployment: {controller:?}"
        );
        let controls: BTreeSet<String> = agent.keys().cloned().collect();
        if level == "restricted" {
            let expected = set(&[
                "restricted volume types",
                "runAsNonRoot != true",
                "runAsUser=0",
            ]);
            ensure!(
                controls == expected,
                "agent DaemonSet at {level}: violated {agent:?}, documented {expected:?}"
            );
            // `volumes "a", "b" use restricted volume type "hostPath"`.
            let detail = &agent["restricted volume types"];
            let (volumes, types) = detail
                .split_once(" use ")
                .or_else(|| detail.split_once(" uses "))
                .with_context(|| format!("restricted volume types: {detail:?}"))?;
            ensure!(
                quoted(volumes) == hostpaths && quoted(types) == set(&["hostPath"]),
                "the only restricted volumes are the hostPaths of the socket's directory and of \
                 containerd's root: {detail:?}"
            );
        } else {
            let expected = set(&["hostPath volumes"]);
            ensure!(
                controls == expected,
                "agent DaemonSet at {level}: violated {agent:?}, documented {expected:?}"
            );
            // `volumes "a", "b"`.
            let detail = &agent["hostPath volumes"];
            ensure!(
                quoted(detail) == hostpaths,
                "the only hostPath volumes are the socket's directory and containerd's root: \
                 {detail:?}"
            );
        }
    }
    let readme =
        std::fs::read_to_string(testbed::tools::repo_root().join("charts/imagegc/README.md"))?;
    ensure!(
        readme.contains("hostPath")
            && hostpaths.iter().all(|v| readme.contains(&format!("`{v}`")))
            && readme.contains("UID 0"),
        "the chart README documents both exceptions and names both hostPath volumes"
    );
    Ok(())
}

/// The controls named in `would violate PodSecurity "<level>:latest": a (…), b (…)` warnings,
/// each with its detail (the text in its parentheses, empty when there is none).
fn violations(stderr: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in stderr.lines() {
        let Some((_, list)) = line.split_once("would violate PodSecurity") else {
            continue;
        };
        let list = list.split_once(": ").map(|(_, l)| l).unwrap_or(list);
        let mut depth = 0;
        let mut control = String::new();
        let mut detail = String::new();
        for ch in list.chars() {
            match ch {
                '(' => {
                    if depth > 0 {
                        detail.push(ch);
                    }
                    depth += 1;
                }
                ')' => {
                    depth -= 1;
                    if depth > 0 {
                        detail.push(ch);
                    }
                }
                ',' if depth == 0 => {
                    out.insert(control.trim().to_string(), detail.trim().to_string());
                    control.clear();
                    detail.clear();
                }
                _ if depth == 0 => control.push(ch),
                _ => detail.push(ch),
            }
        }
        if !control.trim().is_empty() {
            out.insert(control.trim().to_string(), detail.trim().to_string());
        }
    }
    out
}

/// The double-quoted strings in `s` (`volumes "a", "b"` gives `a` and `b`).
fn quoted(s: &str) -> BTreeSet<String> {
    s.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}
