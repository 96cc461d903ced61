//! Least privilege, checked against the real API server: what each of the chart's
//! ServiceAccounts may do (exactly what its process calls, learnt from the API server's audit
//! log), which tokens the admission policy accepts for an agent (only one bound to a pod of
//! the agent DaemonSet, for that pod's node), and which Pod Security Standards controls the
//! chart's workloads do not meet (exactly the documented exceptions).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use imagegc::api::{ImagePrunePolicy, ImageRemoval, NodeImageReport, NodeImageReportSpec};
use imagegc::core::inventory::PINNED_LABEL;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authentication::v1::BoundObjectReference;
use k8s_openapi::api::authorization::v1::{SelfSubjectRulesReview, SelfSubjectRulesReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use libtest_mimic::Trial;
use testbed::cluster::client_from_kubeconfig;
use testbed::image::{self, ImageBuilder};
use testbed::{Flavor, Options, TestBed};

use crate::operator::{Operator, SYSTEM_NS, install, wait_for};
use crate::support::{NS, import, import_labelled, trial};

/// How long anything here may take.
const CONVERGE: Duration = Duration::from_secs(60);
const AGENT_USER: &str = "system:serviceaccount:imagegc-system:imagegc-agent";
const CONTROLLER_USER: &str = "system:serviceaccount:imagegc-system:imagegc-controller";

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "security::service_accounts_have_exactly_the_permissions_their_calls_need",
            service_accounts_have_exactly_the_permissions_their_calls_need,
        ),
        trial(
            "security::admission_requires_a_token_bound_to_an_agent_pod",
            admission_requires_a_token_bound_to_an_agent_pod,
        ),
        trial(
            "security::pod_security_exceptions_are_the_documented_ones",
            pod_security_exceptions_are_the_documented_ones,
        ),
        trial(
            "security::image_fs_directory_is_on_containerds_root_filesystem",
            image_fs_directory_is_on_containerds_root_filesystem,
        ),
    ]
}

/// The directory the chart mounts for the watermarks' `statvfs` exists as soon as containerd
/// runs, on both containerd versions, and is on the same filesystem as containerd's root
/// (the same device, the same capacity): reading it tells how full the image filesystem is,
/// without mounting the root (image content, snapshots) into the agent.
async fn image_fs_directory_is_on_containerds_root_filesystem() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    for flavor in crate::support::FLAVORS {
        let mut bed = crate::support::nodes(flavor, 1).await?;
        for small in [false, true] {
            if small {
                // containerd's root on a filesystem of its own, as the watermark tests use.
                bed.nodes[0].use_small_filesystem(32 << 20)?;
            }
            let root = bed.nodes[0].root.clone();
            let dir = root.join(crate::operator::IMAGE_FS_UNDER_ROOT);
            let (r, d) = (std::fs::metadata(&root)?, std::fs::metadata(&dir)?);
            let usage = |p: &Path| {
                imagegc::agent::policies::filesystem_usage(p).map_err(anyhow::Error::from)
            };
            ensure!(
                d.is_dir()
                    && r.dev() == d.dev()
                    && usage(&root)?.capacity_bytes == usage(&dir)?.capacity_bytes,
                "{flavor:?} (own filesystem: {small}): {} is not a directory on {}'s filesystem",
                dir.display(),
                root.display()
            );
        }
    }
    Ok(())
}

async fn cluster() -> Result<TestBed> {
    TestBed::start(&Options {
        nodes: 0,
        flavor: Flavor::V2,
        cluster: true,
        real_node: false,
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

/// One request a ServiceAccount made, as the API server's audit log records it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    user: String,
    verb: String,
    /// `group/resource[/subresource]` (the core group is empty: `/nodes`).
    resource: String,
    /// Empty for cluster-scoped objects and for requests across all namespaces.
    namespace: String,
    /// Empty for lists, watches and (at this audit level) creates.
    name: String,
    code: i64,
}

impl Call {
    /// The permission lines (as [`permissions`] writes them) that allow this call.
    fn allowed_by(&self, granted: &BTreeSet<String>) -> bool {
        granted.contains(&format!("{} {}", self.resource, self.verb))
            || (!self.name.is_empty()
                && granted.contains(&format!("{}/{} {}", self.resource, self.name, self.verb)))
    }
}

/// Every resource request in the audit log, one [`Call`] each. A server-side apply that
/// created its object (HTTP 201) is authorized as `patch` and as `create`, so it counts as
/// both.
fn audited_calls(log: &Path) -> Result<Vec<Call>> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let e: serde_json::Value = serde_json::from_str(line).context("an audit event")?;
        let Some(obj) = e.get("objectRef") else {
            continue; // a non-resource URL (/version, discovery)
        };
        let text_of = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let mut resource = format!(
            "{}/{}",
            text_of(&obj["apiGroup"]),
            text_of(&obj["resource"])
        );
        if let Some(sub) = obj["subresource"].as_str() {
            resource = format!("{resource}/{sub}");
        }
        let call = Call {
            user: text_of(&e["user"]["username"]),
            verb: text_of(&e["verb"]),
            resource,
            namespace: text_of(&obj["namespace"]),
            name: text_of(&obj["name"]),
            code: e["responseStatus"]["code"].as_i64().unwrap_or(0),
        };
        if call.verb == "patch" && call.code == 201 {
            out.push(Call {
                verb: "create".into(),
                ..call.clone()
            });
        }
        out.push(call);
    }
    Ok(out)
}

/// A scenario that takes every path the agent and the controller have to the API server: both
/// start (watches, the agent's first report, the controller's Lease), a removal refused on
/// the node (an image in use: the agent's `RemovalFailed` Event and the controller's `Failed`
/// one), the same removal forced (a new generation), a removal that succeeds and is deleted by
/// its TTL (the controller's `Completed` Event and its delete), and a prune-policy run (the
/// agent's report of the run, the controller's policy status), until the controller has
/// renewed its Lease.
async fn representative_scenario(op: &mut Operator) -> Result<()> {
    let socket = op.socket(0);
    let used = ImageBuilder::new("sec-used").build();
    let pinned = ImageBuilder::new("sec-pinned").build();
    let gone = ImageBuilder::new("sec-gone").build();
    import(&socket, &used, &["docker.io/library/used:1"]).await?;
    import(&socket, &gone, &["docker.io/library/gone:1"]).await?;
    import_labelled(
        &socket,
        &pinned,
        &["docker.io/library/keep:1"],
        &[(PINNED_LABEL, "pinned")],
    )
    .await?;
    testbed::cri::wait_synced(
        &socket,
        &[used.id(), pinned.id(), gone.id()],
        &[
            "docker.io/library/used:1",
            "docker.io/library/keep:1",
            "docker.io/library/gone:1",
        ],
    )
    .await?;
    image::create_container(&socket, NS, "web", "docker.io/library/used:1", None).await?;

    op.create_removal(
        "refused",
        serde_json::json!({"images": ["used:1", "keep:1"]}),
    )
    .await?;
    op.wait_result(0, "refused").await?;
    op.wait_status("refused", "Failed", |r| {
        r.status.as_ref().is_some_and(|s| s.failed == 1)
    })
    .await?;
    op.patch_spec("refused", serde_json::json!({"force": true}))
        .await?;
    let forced = op.wait_result(0, "refused").await?;
    ensure!(forced.generation == 2, "{forced:?}");

    op.create_removal(
        "done",
        serde_json::json!({"images": ["gone:1"], "ttlSecondsAfterFinished": 1}),
    )
    .await?;
    let removals = &Api::<ImageRemoval>::all(op.admin.clone());
    wait_for(
        "the TTL to delete the finished removal",
        CONVERGE,
        || async move { Ok(removals.get_opt("done").await?.is_none().then_some(())) },
    )
    .await
    .with_context(|| op.logs())?;

    let policy: ImagePrunePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImagePrunePolicy",
        "metadata": {"name": "always"},
        "spec": {"watermark": {"highPercent": 1, "lowPercent": 0}, "dryRun": true},
    }))?;
    Api::<ImagePrunePolicy>::all(op.admin.clone())
        .create(&PostParams::default(), &policy)
        .await?;
    let policies = &Api::<ImagePrunePolicy>::all(op.admin.clone());
    wait_for("the policy's status from a run", CONVERGE, || async move {
        let p = policies.get("always").await?;
        let status = serde_json::to_value(&p.status)?;
        Ok((!status.is_null() && status != serde_json::json!({})).then_some(()))
    })
    .await
    .with_context(|| op.logs())?;

    // The leader renews its Lease every 5 s: wait for a renewal (a replace after the create).
    let leases = &Api::<Lease>::namespaced(op.admin.clone(), SYSTEM_NS);
    wait_for(
        "the controller to renew its Lease",
        CONVERGE,
        || async move {
            let spec = leases
                .get("imagegc-controller")
                .await?
                .spec
                .unwrap_or_default();
            Ok((spec.renew_time.is_some() && spec.renew_time != spec.acquire_time).then_some(()))
        },
    )
    .await
    .with_context(|| op.logs())?;
    Ok(())
}

/// Each ServiceAccount holds exactly the permissions its process uses, no more and no less.
///
/// The expectation is not a list written here, nor read from the chart: it is what the agent
/// and the controller actually asked the API server for while [`representative_scenario`] ran,
/// read from the API server's audit log (every ServiceAccount request, at Metadata level:
/// user, verb, resource, namespace, name, response code). The audit log sees every call the
/// code makes through any client path, which a list kept by hand in the code would not
/// guarantee. Then, for the release namespace, `default` (where Events about cluster-scoped
/// objects go) and `kube-system`, with SelfSubjectRulesReview minus what every authenticated
/// user holds:
/// - every call was allowed (no 403) and is covered by a grant (missing permissions fail);
/// - every grant was used by some call in that namespace or cluster-wide (unused verbs fail).
///
/// The limit: a grant for a code path the scenario does not take shows as unused, so the
/// scenario grows with the code. A grant limited to one name (the controller's Lease) must
/// have been used with that name. Last, the agent's own credentials try to forge an Event in
/// kube-system and are refused.
async fn service_accounts_have_exactly_the_permissions_their_calls_need() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    op.agent_args = vec!["--watermark-check=1s".into()];
    op.stop_agent(0);
    op.start_agent(0)?;
    representative_scenario(&mut op).await?;
    // Let in-flight writes land in the log, then read it before this test's own reviews.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cluster = op.bed.cluster()?;
    let calls = audited_calls(&cluster.audit_log())?;

    cluster.ensure_service_account(SYSTEM_NS, "nobody").await?;
    let nobody = cluster.service_account_client(SYSTEM_NS, "nobody").await?;
    let agent = client_from_kubeconfig(op.agent_kubeconfig(0)).await?;
    let controller = cluster
        .service_account_client(SYSTEM_NS, "imagegc-controller")
        .await?;
    for (who, user, client) in [
        ("agent", AGENT_USER, &agent),
        ("controller", CONTROLLER_USER, &controller),
    ] {
        let mine: Vec<&Call> = calls.iter().filter(|c| c.user == user).collect();
        ensure!(
            mine.len() > 10,
            "{who}: only {} audited calls: {mine:?}",
            mine.len()
        );
        let refused: Vec<&&Call> = mine.iter().filter(|c| c.code == 403).collect();
        ensure!(refused.is_empty(), "{who} was refused: {refused:?}");
        for namespace in [SYSTEM_NS, "default", "kube-system"] {
            let baseline = permissions(&nobody, namespace).await?;
            let granted: BTreeSet<String> = permissions(client, namespace)
                .await?
                .difference(&baseline)
                .cloned()
                .collect();
            let here: Vec<&&Call> = mine
                .iter()
                .filter(|c| c.namespace.is_empty() || c.namespace == namespace)
                .collect();
            let uncovered: BTreeSet<String> = here
                .iter()
                .filter(|c| !c.allowed_by(&granted))
                .map(|c| format!("{} {} {}", c.resource, c.name, c.verb))
                .collect();
            let unused: Vec<&String> = granted
                .iter()
                .filter(|line| {
                    !here
                        .iter()
                        .any(|c| c.allowed_by(&BTreeSet::from([(*line).clone()])))
                })
                .collect();
            ensure!(
                uncovered.is_empty() && unused.is_empty(),
                "{who} in {namespace}: granted but never called {unused:?}; called but not \
                 granted {uncovered:?}"
            );
            ensure!(
                !granted
                    .iter()
                    .any(|p| p.contains("secrets") || p.contains('*')),
                "{who}: {granted:?}"
            );
            println!(
                "{who} in {namespace}: {} grants, each used: {granted:?}",
                granted.len()
            );
        }
    }

    // The attack: a Warning in kube-system about kube-apiserver, with the agent's own
    // credentials. RBAC refuses it before admission.
    let forged: Event = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "kube-apiserver.forged", "namespace": "kube-system"},
        "eventTime": "2026-01-01T00:00:00.000000Z", "type": "Warning",
        "reason": "Compromised", "action": "Forge", "note": "forged",
        "reportingController": "imagegc.dev/agent", "reportingInstance": "x",
        "regarding": {"kind": "Pod", "namespace": "kube-system", "name": "kube-apiserver"},
    }))?;
    for ns in ["kube-system", SYSTEM_NS] {
        match Api::<Event>::namespaced(agent.clone(), ns)
            .create(&PostParams::default(), &forged)
            .await
        {
            Err(kube::Error::Api(s)) if s.code == 403 => {}
            other => bail!("an Event in {ns} as the agent: expected 403, got {other:?}"),
        }
    }
    Ok(())
}

/// A NodeImageReport named after `node`.
fn report(node: &str) -> NodeImageReport {
    NodeImageReport::new(
        node,
        NodeImageReportSpec {
            node_name: node.into(),
        },
    )
}

/// Creates a Pod that never runs (no kubelet here) on `node` with the agent's ServiceAccount:
/// `name` exactly, or generated from `imagegc-agent-` as the DaemonSet controller does.
async fn agent_account_pod(admin: &Client, node: &str, name: Option<&str>) -> Result<Pod> {
    let meta = match name {
        Some(n) => serde_json::json!({"name": n, "namespace": SYSTEM_NS}),
        None => serde_json::json!({"generateName": "imagegc-agent-", "namespace": SYSTEM_NS}),
    };
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": meta,
        "spec": {"nodeName": node, "serviceAccountName": "imagegc-agent",
                 "automountServiceAccountToken": false,
                 "containers": [{"name": "c", "image": "ghcr.io/imagegc/imagegc:test"}]}
    }))?;
    Ok(Api::<Pod>::namespaced(admin.clone(), SYSTEM_NS)
        .create(&PostParams::default(), &pod)
        .await?)
}

/// A client with a token of the agent's ServiceAccount bound to `bound` (or to nothing).
async fn agent_client(
    bed: &TestBed,
    file: &str,
    bound: Option<BoundObjectReference>,
) -> Result<Api<NodeImageReport>> {
    let c = bed.cluster()?;
    let token = c
        .service_account_token_bound_to(SYSTEM_NS, "imagegc-agent", bound)
        .await?;
    Ok(Api::all(
        client_from_kubeconfig(&c.token_kubeconfig(file, &token)?).await?,
    ))
}

fn bound_to(kind: &str, name: &str, uid: &str) -> Option<BoundObjectReference> {
    Some(BoundObjectReference {
        api_version: Some("v1".into()),
        kind: Some(kind.into()),
        name: Some(name.into()),
        uid: Some(uid.into()),
    })
}

/// The admission policy accepts a NodeImageReport write from the agent's ServiceAccount only
/// with a token bound to a pod of the agent DaemonSet, and only for that pod's node. Tried with
/// every kind of token someone allowed to mint tokens for the account (`kubectl create token`)
/// could get: bound to a Node (it names the node, but no pod: the attack this test exists for), bound to a
/// pod of another workload that uses the account, bound to a pod named almost like an agent
/// pod, unbound; and the real thing, for its own node and another.
///
/// The limit, also in the policy's comment: CEL sees the pod's name and UID, not its owner, so
/// a pod given a DaemonSet-like name by hand passes; creating one needs pod creation in the
/// release namespace, which already allows mounting containerd's socket.
async fn admission_requires_a_token_bound_to_an_agent_pod() -> Result<()> {
    let bed = cluster().await?;
    install(&bed).await?;
    let admin = bed.cluster()?.admin_client().await?;
    let mut node_uid = BTreeMap::new();
    for name in ["node-1", "node-2"] {
        let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
        let node = Api::<Node>::all(admin.clone())
            .create(&PostParams::default(), &node)
            .await?;
        node_uid.insert(name, node.uid().context("node uid")?);
    }
    let agent_pod = agent_account_pod(&admin, "node-1", None).await?;
    let other_pod = agent_account_pod(&admin, "node-1", Some("debug-shell")).await?;
    let lookalike = agent_account_pod(&admin, "node-1", Some("imagegc-agent-evil1")).await?;
    let pod_ref = |p: &Pod| -> Result<Option<BoundObjectReference>> {
        Ok(bound_to("Pod", &p.name_any(), &p.uid().context("pod uid")?))
    };
    let real = agent_client(&bed, "real.kubeconfig", pod_ref(&agent_pod)?).await?;

    // The API server loads policies asynchronously: wait until it refuses the real agent a
    // made-up node's report, then try each token.
    let real_ref = &real;
    wait_for(
        "the admission policy to be in force",
        CONVERGE,
        || async move {
            Ok(
                match real_ref
                    .create(&PostParams::default(), &report("node-9"))
                    .await
                {
                    Err(kube::Error::Api(s)) if s.code == 403 => Some(()),
                    _ => None,
                },
            )
        },
    )
    .await?;
    real.create(&PostParams::default(), &report("node-1"))
        .await
        .context("the agent pod's token writing its own node's report")?;

    let attempts = [
        (
            "a Node-bound token for node-1",
            agent_client(
                &bed,
                "node.kubeconfig",
                bound_to("Node", "node-1", &node_uid["node-1"]),
            )
            .await?,
            "bound to no scheduled pod",
        ),
        (
            "a token bound to pod debug-shell (another workload) on node-1",
            agent_client(&bed, "other.kubeconfig", pod_ref(&other_pod)?).await?,
            "bound to pod debug-shell, which is not a pod of the imagegc agent DaemonSet",
        ),
        (
            "a token bound to pod imagegc-agent-evil1 on node-1",
            agent_client(&bed, "lookalike.kubeconfig", pod_ref(&lookalike)?).await?,
            "not a pod of the imagegc agent DaemonSet (named imagegc-agent-<5 characters>)",
        ),
        (
            "an unbound token",
            agent_client(&bed, "unbound.kubeconfig", None).await?,
            "bound to no scheduled pod",
        ),
    ];
    // Every write goes the way the agent writes: a server-side apply (creating node-2's).
    let params = PatchParams::apply("intruder").force();
    let apply = |node: &str| {
        Patch::Apply(serde_json::json!({
            "apiVersion": "imagegc.dev/v1alpha1", "kind": "NodeImageReport",
            "metadata": {"name": node}, "spec": {"nodeName": node},
        }))
    };
    for (what, reports, says) in &attempts {
        for node in ["node-1", "node-2"] {
            match reports.patch(node, &params, &apply(node)).await {
                Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains(says) => {
                    println!("{what}, writing {node}'s report: refused: {}", s.message);
                }
                other => bail!(
                    "{what}, writing {node}'s report: expected a 403 saying {says:?}, got {other:?}"
                ),
            }
        }
    }
    // The real agent pod's token: its own node only.
    real.patch("node-1", &params, &apply("node-1"))
        .await
        .context("the agent pod's token applying its own node's report")?;
    match real.patch("node-2", &params, &apply("node-2")).await {
        Err(kube::Error::Api(s))
            if s.code == 403 && s.message.contains("may write only NodeImageReport node-1") => {}
        other => bail!("the agent on node-1 writing node-2's report: {other:?}"),
    }
    Ok(())
}

/// The chart's workloads, applied into namespaces that warn on the `restricted` and on the
/// `baseline` Pod Security level: the agent violates exactly the controls a containerd client
/// cannot avoid (hostPath volumes for the socket's directory and for a directory on
/// containerd's image filesystem, whose usage the watermarks read; root for the root-owned
/// socket), each warning names exactly those two volumes, and the controller violates nothing.
/// The API server keeps both mounts read-only, recursively where supported, without mount
/// propagation (an API server that dropped `recursiveReadOnly` would fail here).
async fn pod_security_exceptions_are_the_documented_ones() -> Result<()> {
    let bed = cluster().await?;
    let admin = bed.cluster()?.admin_client().await?;
    let hostpaths = set(&["containerd-run", "containerd-image-fs"]);
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
        let ds = Api::<DaemonSet>::namespaced(admin.clone(), namespace)
            .get("imagegc-agent")
            .await?;
        host_mounts_are_read_only(&ds)?;
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

/// The agent's mounts as the API server stored them: exactly the two hostPaths, each
/// `readOnly`, `recursiveReadOnly: IfPossible` and `mountPropagation: None`, at the socket's
/// directory and at `tmpmounts` inside containerd's root (nothing else of the host).
fn host_mounts_are_read_only(ds: &DaemonSet) -> Result<()> {
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("pod spec")?;
    let paths: BTreeSet<String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.clone()))
        .collect();
    ensure!(
        paths == set(&["/run/containerd", "/var/lib/containerd/tmpmounts"]),
        "host paths: {paths:?}"
    );
    let mounts = pod.containers[0].volume_mounts.clone().unwrap_or_default();
    ensure!(mounts.len() == 2, "{mounts:?}");
    for m in &mounts {
        ensure!(
            m.read_only == Some(true)
                && m.recursive_read_only.as_deref() == Some("IfPossible")
                && m.mount_propagation.as_deref() == Some("None")
                && paths.contains(&m.mount_path),
            "mount as stored by the API server: {m:?}"
        );
    }
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
