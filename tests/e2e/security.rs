//! Least privilege, checked against the real API server: what each of the chart's
//! ServiceAccounts may do (exactly, no more), and which Pod Security Standards controls the
//! chart's workloads do not meet (exactly the documented exceptions).

use std::collections::BTreeSet;
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

/// The chart's workloads, applied into a namespace that warns on the `restricted` Pod Security
/// level: the agent violates exactly the controls a containerd client cannot avoid (hostPath
/// volumes for the socket's directory and for containerd's root, whose filesystem usage the
/// watermarks read; root for the root-owned socket), the controller none.
async fn pod_security_exceptions_are_the_documented_ones() -> Result<()> {
    let bed = cluster().await?;
    let admin = bed.cluster()?.admin_client().await?;
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "pss", "labels": {"pod-security.kubernetes.io/warn": "restricted"}}
    }))?;
    Api::<Namespace>::all(admin)
        .create(&PostParams::default(), &ns)
        .await?;
    let helm = testbed::tools::go_tool("helm")?;
    let chart = testbed::tools::repo_root().join("charts/imagegc");
    let rendered = Command::new(helm)
        .args(["template", "imagegc"])
        .arg(chart)
        .args(["--namespace", "pss"])
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
            .args(["apply", "-n", "pss", "-f", "-"])
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
        if kind == "DaemonSet" {
            ensure!(
                stderr.contains(
                    r#"(volumes "containerd-run", "containerd-root" use restricted volume type "hostPath")"#
                ),
                "the only restricted volumes are the socket's directory and containerd's root: {stderr}"
            );
        }
        warnings.push((kind, controls(&stderr)));
    }
    // `restricted volume types` is the hostPath (checked above).
    let expected_agent = set(&[
        "restricted volume types",
        "runAsNonRoot != true",
        "runAsUser=0",
    ]);
    ensure!(
        warnings[0].1 == expected_agent,
        "agent DaemonSet: violated {:?}, documented {:?}",
        warnings[0].1,
        expected_agent
    );
    ensure!(
        warnings[1].1.is_empty(),
        "controller Deployment: {:?}",
        warnings[1].1
    );
    let readme =
        std::fs::read_to_string(testbed::tools::repo_root().join("charts/imagegc/README.md"))?;
    ensure!(
        readme.contains("hostPath") && readme.contains("UID 0"),
        "the chart README documents both exceptions"
    );
    Ok(())
}

/// The control names in a `would violate PodSecurity "restricted:latest": a (…), b (…)`
/// warning.
fn controls(stderr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in stderr.lines() {
        let Some((_, list)) = line.split_once("would violate PodSecurity") else {
            continue;
        };
        let list = list.split_once(": ").map(|(_, l)| l).unwrap_or(list);
        let mut depth = 0;
        let mut current = String::new();
        for ch in list.chars() {
            match ch {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    out.insert(current.trim().to_string());
                    current.clear();
                }
                _ if depth == 0 => current.push(ch),
                _ => {}
            }
        }
        if !current.trim().is_empty() {
            out.insert(current.trim().to_string());
        }
    }
    out
}
