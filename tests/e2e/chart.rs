//! The Helm chart and its rendering `deploy/imagegc.yaml`: every object is accepted by a real API
//! server, the RBAC is what the chart says, and the admission policy keeps each agent to its own
//! node's NodeImageReport.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use imagegc::api::{NodeImageReport, NodeImageReportSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use libtest_mimic::Trial;
use serde::Deserialize;
use testbed::cluster::client_from_kubeconfig;
use testbed::tools::{go_tool, repo_root};
use testbed::{Flavor, Options, TestBed};

use crate::support::trial;

const NAMESPACE: &str = "imagegc-system";
const AGENT: &str = "imagegc-agent";
const CONTROLLER: &str = "imagegc-controller";
const POLICY: &str = "imagegc-agent-own-node-report";

/// Runs `bin` with `args`; returns stdout, or an error with stderr when it fails.
fn run(bin: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "{} {}: {}",
        bin.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The non-empty documents of a multi-document YAML stream.
fn documents(yaml: &str) -> Result<Vec<serde_yaml::Value>> {
    let mut docs = Vec::new();
    for de in serde_yaml::Deserializer::from_str(yaml) {
        let doc = serde_yaml::Value::deserialize(de)?;
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    Ok(docs)
}

fn report(name: &str, node: &str) -> NodeImageReport {
    NodeImageReport::new(
        name,
        NodeImageReportSpec {
            node_name: node.into(),
        },
    )
}

/// The API error of `r`, or a failure saying what came back instead.
fn api_error<T: std::fmt::Debug>(what: &str, r: kube::Result<T>) -> Result<kube::core::Status> {
    match r {
        Err(kube::Error::Api(s)) => Ok(*s),
        other => bail!("{what}: expected an API error, got {other:?}"),
    }
}

async fn manifests_apply_and_policy_holds() -> Result<()> {
    let bed = TestBed::start(&Options {
        nodes: 0,
        flavor: Flavor::V2,
        cluster: true,
    })
    .await?;
    let cluster = bed.cluster()?;
    let kubectl = go_tool("kubectl")?;
    let kubeconfig = cluster.admin_kubeconfig.to_string_lossy().to_string();
    let manifest = repo_root().join("deploy/imagegc.yaml");
    let manifest = manifest.to_string_lossy().to_string();

    // Every object in the file is created, and nothing else is needed first.
    run(
        &kubectl,
        &["--kubeconfig", &kubeconfig, "apply", "-f", &manifest],
    )?;
    let docs = documents(&std::fs::read_to_string(&manifest)?)?;
    let listed = run(
        &kubectl,
        &[
            "--kubeconfig",
            &kubeconfig,
            "get",
            "-f",
            &manifest,
            "-o",
            "name",
        ],
    )?;
    let listed: Vec<&str> = listed.lines().filter(|l| !l.is_empty()).collect();
    ensure!(
        listed.len() == docs.len(),
        "{} documents, {} objects on the server: {listed:?}",
        docs.len(),
        listed.len()
    );
    for doc in &docs {
        let kind = doc["kind"].as_str().context("a document without kind")?;
        let name = doc["metadata"]["name"].as_str().context("no name")?;
        let resource = format!("{}/{name}", kind.to_lowercase());
        ensure!(
            listed.iter().any(|l| {
                let (r, n) = l.split_once('/').unwrap_or((l, ""));
                n == name && r.split('.').next() == Some(&kind.to_lowercase())
            }),
            "{resource} is not on the server: {listed:?}"
        );
    }

    // Two nodes, and an agent pod bound to node-a that never runs (there is no kubelet).
    let admin = cluster.admin_client().await?;
    for name in ["node-a", "node-b"] {
        let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
        Api::<Node>::all(admin.clone())
            .create(&PostParams::default(), &node)
            .await?;
    }
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "agent-a", "namespace": NAMESPACE},
        "spec": {"nodeName": "node-a", "serviceAccountName": AGENT,
                 "automountServiceAccountToken": false,
                 "containers": [{"name": "agent", "image": "ghcr.io/imagegc/imagegc:test"}]}
    }))?;
    let pod = Api::<Pod>::namespaced(admin.clone(), NAMESPACE)
        .create(&PostParams::default(), &pod)
        .await?;
    let uid = pod.metadata.uid.context("pod uid")?;
    let token = cluster
        .service_account_token(NAMESPACE, AGENT, Some(("agent-a", &uid)))
        .await?;
    let agent =
        client_from_kubeconfig(&cluster.token_kubeconfig("agent-a.kubeconfig", &token)?).await?;
    let reports = Api::<NodeImageReport>::all(agent.clone());

    // Its own node's report: allowed (the CRD and the RBAC take a moment to be served).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match reports
            .create(&PostParams::default(), &report("node-a", "node-a"))
            .await
        {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(e).context("agent on node-a creating its own report"),
        }
    }
    let status = serde_json::json!({"status": {"inventory": {"images": 1, "bytes": 10, "pinned": 0, "inUse": 0}}});
    reports
        .patch_status("node-a", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("agent on node-a writing its own report's status")?;

    // Another node's report: refused by the policy, saying why.
    let s = api_error(
        "agent on node-a creating node-b's report",
        reports
            .create(&PostParams::default(), &report("node-b", "node-b"))
            .await,
    )?;
    ensure!(
        (s.code == 403 || s.code == 422)
            && s.message.contains(POLICY)
            && s.message
                .contains("node node-a may write only NodeImageReport node-a"),
        "node-b's report: {s:?}"
    );
    // Its own report naming another node in spec.nodeName: refused too.
    let mut stored = reports.get("node-a").await?;
    stored.spec.node_name = "node-b".into();
    let s = api_error(
        "agent on node-a pointing its report at node-b",
        reports
            .replace("node-a", &PostParams::default(), &stored)
            .await,
    )?;
    ensure!(
        s.code == 422 && s.message.contains(POLICY) && s.message.contains("spec.nodeName"),
        "spec.nodeName != name: {s:?}"
    );

    // A token bound to no pod names no node: refused, whatever report it writes.
    let unbound =
        Api::<NodeImageReport>::all(cluster.service_account_client(NAMESPACE, AGENT).await?);
    let s = api_error(
        "unbound agent token creating node-b's report",
        unbound
            .create(&PostParams::default(), &report("node-b", "node-b"))
            .await,
    )?;
    ensure!(
        s.code == 403 && s.message.contains(POLICY) && s.message.contains("bound to its pod"),
        "unbound token: {s:?}"
    );

    // Least privilege: the agent deletes nothing and reads no Secrets (RBAC, before admission).
    let s = api_error(
        "agent deleting its report",
        reports.delete("node-a", &DeleteParams::default()).await,
    )?;
    ensure!(
        s.code == 403 && !s.message.contains(POLICY),
        "delete: {s:?}"
    );
    let s = api_error(
        "agent listing Secrets",
        Api::<Secret>::namespaced(agent, NAMESPACE)
            .list(&ListParams::default())
            .await,
    )?;
    ensure!(s.code == 403, "secrets: {s:?}");

    // The controller may create, read and renew its own Lease, and read no other.
    let controller = cluster
        .service_account_client(NAMESPACE, CONTROLLER)
        .await?;
    let leases = Api::<Lease>::namespaced(controller, NAMESPACE);
    let lease: Lease = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "imagegc-controller"},
            "spec": {"holderIdentity": "controller-0", "leaseDurationSeconds": 15}}),
    )?;
    leases.create(&PostParams::default(), &lease).await?;
    let mut held = leases.get("imagegc-controller").await?;
    held.spec.get_or_insert_default().holder_identity = Some("controller-1".into());
    leases
        .replace("imagegc-controller", &PostParams::default(), &held)
        .await?;
    let s = api_error(
        "controller reading another Lease",
        leases.get("other").await,
    )?;
    ensure!(s.code == 403, "another lease: {s:?}");
    Ok(())
}

/// `helm template` of the chart with `set` values; the documents, or helm's error.
fn render(set: &[&str]) -> Result<Vec<serde_yaml::Value>> {
    let helm = go_tool("helm")?;
    let chart = repo_root().join("charts/imagegc");
    let mut args = vec![
        "template".to_string(),
        "imagegc".into(),
        chart.to_string_lossy().into(),
        "--namespace".into(),
        NAMESPACE.into(),
    ];
    for s in set {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    documents(&run(&helm, &args)?)
}

fn of_kind<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn chart_renders_presets_and_options() -> Result<()> {
    for (set, want, root, runtime) in [
        (
            vec![],
            "/run/containerd/containerd.sock",
            "/var/lib/containerd",
            "containerd",
        ),
        (
            vec!["containerd.preset=k3s"],
            "/run/k3s/containerd/containerd.sock",
            "/var/lib/rancher/k3s/agent/containerd",
            "containerd",
        ),
        (
            vec!["containerd.preset=rke2"],
            "/run/k3s/containerd/containerd.sock",
            "/var/lib/rancher/rke2/agent/containerd",
            "containerd",
        ),
        (
            vec!["containerd.preset=microk8s"],
            "/var/snap/microk8s/common/run/containerd.sock",
            "/var/snap/microk8s/common/var/lib/containerd",
            "containerd",
        ),
        (
            vec!["containerd.preset=k0s"],
            "/run/k0s/containerd.sock",
            "/var/lib/k0s/containerd",
            "containerd",
        ),
        (
            vec!["containerd.preset=crio"],
            "/var/run/crio/crio.sock",
            "/var/lib/containers/storage",
            "cri",
        ),
        (
            vec![
                "containerd.preset=k3s",
                "containerd.socket=/custom/c.sock",
                "containerd.root=/custom/root",
                "containerd.runtime=auto",
            ],
            "/custom/c.sock",
            "/custom/root",
            "auto",
        ),
    ] {
        let docs = render(&set)?;
        let ds = of_kind(&docs, "DaemonSet");
        ensure!(ds.len() == 1, "{set:?}: {} DaemonSets", ds.len());
        let pod = &ds[0]["spec"]["template"]["spec"];
        let volume = &pod["volumes"][0]["hostPath"];
        let container = &pod["containers"][0];
        let env = container["env"]
            .as_sequence()
            .context("env")?
            .iter()
            .find(|e| e["name"] == "IMAGEGC_SOCKET")
            .context("IMAGEGC_SOCKET")?;
        let dir = std::path::Path::new(want)
            .parent()
            .and_then(|d| d.to_str())
            .context("socket directory")?;
        ensure!(
            volume["path"] == dir
                && volume["type"] == "Directory"
                && container["volumeMounts"][0]["mountPath"] == dir
                && container["volumeMounts"][0]["readOnly"] == true
                && env["value"] == want,
            "{set:?}: volume {volume:?}, container {container:?}"
        );
        // containerd's root: a second read-only hostPath, and the flag that points at it.
        let root_volume = &pod["volumes"][1];
        let args: Vec<&str> = container["args"]
            .as_sequence()
            .context("args")?
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        ensure!(
            root_volume["name"] == "containerd-root"
                && root_volume["hostPath"]["path"] == root
                && root_volume["hostPath"]["type"] == "Directory"
                && container["volumeMounts"][1]["mountPath"] == root
                && container["volumeMounts"][1]["readOnly"] == true
                && args.contains(&format!("--image-fs={root}").as_str())
                && args.contains(&format!("--runtime={runtime}").as_str())
                && args.iter().any(|a| a.starts_with("--own-image="))
                && args.contains(&"--protect=registry.k8s.io/pause:*"),
            "{set:?}: volumes {:?}, args {args:?}",
            pod["volumes"]
        );
    }
    // The socket inside containerd's root: one mount serves both.
    let docs = render(&[
        "containerd.socket=/var/lib/containerd/c.sock",
        "containerd.root=/var/lib/containerd",
    ])?;
    let pod = &of_kind(&docs, "DaemonSet")[0]["spec"]["template"]["spec"];
    ensure!(
        pod["volumes"].as_sequence().map(Vec::len) == Some(1),
        "{:?}",
        pod["volumes"]
    );
    let err = render(&["containerd.preset=nope"]).expect_err("an unknown preset renders");
    ensure!(
        format!("{err:#}").contains("containerd.preset \"nope\" is unknown")
            && format!("{err:#}").contains("k0s or crio"),
        "{err:#}"
    );
    let err = render(&["containerd.runtime=docker"]).expect_err("an unknown runtime renders");
    ensure!(
        format!("{err:#}").contains("containerd.runtime must be auto, containerd or cri"),
        "{err:#}"
    );

    // Metrics objects only when asked for; nothing namespaced but the release's.
    let plain = render(&[])?;
    ensure!(of_kind(&plain, "ServiceMonitor").is_empty() && of_kind(&plain, "Service").is_empty());
    ensure!(
        of_kind(&plain, "Namespace").is_empty(),
        "Namespace by default"
    );
    let monitored = render(&["metrics.serviceMonitor.enabled=true"])?;
    ensure!(of_kind(&monitored, "ServiceMonitor").len() == 2);
    let services = of_kind(&monitored, "Service");
    ensure!(
        services.len() == 2 && services.iter().any(|s| s["spec"]["clusterIP"] == "None"),
        "{services:?}"
    );
    for doc in &monitored {
        let ns = &doc["metadata"]["namespace"];
        ensure!(ns.is_null() || *ns == NAMESPACE, "{doc:?}");
    }
    Ok(())
}

pub fn trials() -> Vec<Trial> {
    vec![
        Trial::test("chart::renders_presets_and_options", || {
            chart_renders_presets_and_options().map_err(|e| format!("{e:#}").into())
        }),
        trial(
            "chart::manifests_apply_and_admission_policy_holds",
            manifests_apply_and_policy_holds,
        ),
    ]
}
