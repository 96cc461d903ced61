//! The Helm chart and its rendering `deploy/imagegc.yaml`: every object is accepted by a real API
//! server, the RBAC is what the chart says, and the admission policy keeps each agent to its own
//! node's NodeImageReport.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use imagegc::api::{NodeImageReport, NodeImageReportSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
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
        real_node: false,
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
        "metadata": {"generateName": "imagegc-agent-", "namespace": NAMESPACE},
        "spec": {"nodeName": "node-a", "serviceAccountName": AGENT,
                 "automountServiceAccountToken": false,
                 "containers": [{"name": "agent", "image": "ghcr.io/imagegc/imagegc:test"}]}
    }))?;
    let pod = Api::<Pod>::namespaced(admin.clone(), NAMESPACE)
        .create(&PostParams::default(), &pod)
        .await?;
    let uid = pod.metadata.uid.context("pod uid")?;
    let pod_name = pod.metadata.name.context("pod name")?;
    let token = cluster
        .service_account_token(NAMESPACE, AGENT, Some((&pod_name, &uid)))
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
    // Its own report naming another node in spec.nodeName: refused too (written as the agent
    // writes, with server-side apply; the agent may not `update`).
    let repointed = Patch::Apply(serde_json::json!({
        "apiVersion": "imagegc.dev/v1alpha1", "kind": "NodeImageReport",
        "metadata": {"name": "node-a"}, "spec": {"nodeName": "node-b"},
    }));
    let s = api_error(
        "agent on node-a pointing its report at node-b",
        reports
            .patch(
                "node-a",
                &PatchParams::apply("imagegc-agent").force(),
                &repointed,
            )
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
        s.code == 403
            && s.message.contains(POLICY)
            && s.message.contains("bound to no scheduled pod"),
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
                "containerd.socket=/custom/run/c.sock",
                "containerd.root=/custom/root",
                "containerd.runtime=auto",
            ],
            "/custom/run/c.sock",
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
        // A directory on the runtime's image filesystem (containerd: `tmpmounts`, inside its
        // root; CRI-O: its root): a second read-only hostPath, and the flag that points at it.
        let image_fs = if runtime == "cri" {
            root.to_string()
        } else {
            format!("{root}/tmpmounts")
        };
        let root_volume = &pod["volumes"][1];
        let args: Vec<&str> = container["args"]
            .as_sequence()
            .context("args")?
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        for mount in container["volumeMounts"].as_sequence().context("mounts")? {
            ensure!(
                mount["readOnly"] == true
                    && mount["recursiveReadOnly"] == "IfPossible"
                    && mount["mountPropagation"] == "None",
                "{set:?}: {mount:?}"
            );
        }
        ensure!(
            root_volume["name"] == "containerd-image-fs"
                && root_volume["hostPath"]["path"] == image_fs.as_str()
                && root_volume["hostPath"]["type"] == "Directory"
                && container["volumeMounts"][1]["mountPath"] == image_fs.as_str()
                && args.contains(&format!("--image-fs={image_fs}").as_str())
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
        format!("{err:#}").contains(
            "at '/containerd/preset': value must be one of 'containerd', 'k3s', 'rke2', 'microk8s', 'k0s', 'crio'"
        ),
        "{err:#}"
    );
    let err = render(&["containerd.runtime=docker"]).expect_err("an unknown runtime renders");
    ensure!(
        format!("{err:#}").contains("at '/containerd/runtime': value must be one of"),
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
    // Nothing namespaced outside the release's, but the Events Role and its binding in
    // `default`, where the code writes Events about cluster-scoped objects.
    for doc in &monitored {
        let ns = &doc["metadata"]["namespace"];
        let events = doc["metadata"]["name"] == "imagegc-events"
            && (doc["kind"] == "Role" || doc["kind"] == "RoleBinding");
        ensure!(
            ns.is_null() || *ns == NAMESPACE || (events && *ns == "default"),
            "{doc:?}"
        );
    }
    let roles = of_kind(&plain, "Role");
    let events = roles
        .iter()
        .find(|r| r["metadata"]["name"] == "imagegc-events")
        .context("the Events Role")?;
    ensure!(
        events["metadata"]["namespace"] == "default"
            && events["rules"].as_sequence().map(Vec::len) == Some(1)
            && events["rules"][0]["verbs"] == serde_yaml::to_value(["create"])?,
        "{events:?}"
    );
    ensure!(
        !of_kind(&plain, "ClusterRole")
            .iter()
            .any(|r| format!("{r:?}").contains("events")),
        "no cluster-wide Events grant"
    );

    // One controller: no PodDisruptionBudget, no anti-affinity. Two: both.
    ensure!(of_kind(&plain, "PodDisruptionBudget").is_empty());
    let deploy = &of_kind(&plain, "Deployment")[0]["spec"]["template"]["spec"];
    ensure!(deploy["affinity"].is_null(), "{:?}", deploy["affinity"]);
    let two = render(&["controller.replicas=2"])?;
    let pdb = of_kind(&two, "PodDisruptionBudget");
    ensure!(
        pdb.len() == 1 && pdb[0]["spec"]["maxUnavailable"] == 1,
        "{pdb:?}"
    );
    let anti = &of_kind(&two, "Deployment")[0]["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        ["preferredDuringSchedulingIgnoredDuringExecution"][0];
    ensure!(
        anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
            && anti["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"]
                == "controller",
        "{anti:?}"
    );
    // An affinity of the user's replaces the default one.
    let own = render(&[
        "controller.replicas=2",
        "controller.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=pool",
        "controller.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
    ])?;
    let affinity = &of_kind(&own, "Deployment")[0]["spec"]["template"]["spec"]["affinity"];
    ensure!(
        affinity["podAntiAffinity"].is_null() && !affinity["nodeAffinity"].is_null(),
        "{affinity:?}"
    );
    Ok(())
}

/// `values.schema.json`: the defaults pass `helm lint --strict`; a typo'd key at any level a
/// user types, or a value of the wrong type or out of range, fails both `helm lint` and
/// `helm template` with a message naming it; the values the agent's safety flags use are
/// typed too.
fn values_schema_refuses_typos() -> Result<()> {
    let helm = go_tool("helm")?;
    let chart = repo_root().join("charts/imagegc");
    let chart = chart.to_string_lossy();
    run(&helm, &["lint", "--strict", &chart])?;
    for ok in [
        "agent.allowForce=true",
        "agent.prune.minImageAgeSeconds=0",
        "agent.recursiveReadOnly=Enabled",
        "agent.maxUnavailable=3",
        "controller.replicas=2",
    ] {
        render(&[ok]).with_context(|| format!("--set {ok}"))?;
    }
    for (bad, names) in [
        ("agent.runAsUsr=0", "runAsUsr"),
        ("agnet.runAsUser=0", "agnet"),
        ("agent.prune.minImageAge=60", "minImageAge"),
        ("containerd.sockets=/run/x.sock", "sockets"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("agent.allowForce=yes", "allowForce"),
        ("agent.prune.minImageAgeSeconds=-1", "minImageAgeSeconds"),
        ("controller.replicas=0", "replicas"),
        ("agent.recursiveReadOnly=Always", "recursiveReadOnly"),
        (
            "flowControl.matchingPrecedence=9000000",
            "matchingPrecedence",
        ),
    ] {
        let lint = Command::new(&helm)
            .args(["lint", "--strict", &chart, "--set", bad])
            .output()?;
        let said = String::from_utf8_lossy(&lint.stdout).into_owned()
            + &String::from_utf8_lossy(&lint.stderr);
        ensure!(
            !lint.status.success() && said.contains("schema") && said.contains(names),
            "helm lint --set {bad}: {said}"
        );
        let err = render(&[bad]).expect_err("a value the schema refuses renders");
        ensure!(
            format!("{err:#}").contains(names),
            "helm template --set {bad}: {err:#}"
        );
    }
    Ok(())
}

/// Runs the `imagegc check` of the chart's `helm test` Pod (its exact arguments) with
/// `kubeconfig`, giving up after `timeout` seconds; returns (exit code, stdout, stderr).
fn hook_check(args: &[String], kubeconfig: &Path, timeout: u64) -> Result<(i32, String, String)> {
    let out = Command::new(crate::support::imagegc_bin())
        .args(args)
        .arg(format!("--timeout-seconds={timeout}"))
        .env("KUBECONFIG", kubeconfig)
        .output()
        .context("running imagegc check")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `helm install --dry-run=<mode>` of `chart` as release `notes` into `namespace`; its output
/// (the NOTES included).
fn dry_run_install(chart: &Path, kubeconfig: &str, namespace: &str, mode: &str) -> Result<String> {
    run(
        &go_tool("helm")?,
        &[
            "install",
            "notes",
            &chart.to_string_lossy(),
            "--namespace",
            namespace,
            "--kubeconfig",
            kubeconfig,
            &format!("--dry-run={mode}"),
        ],
    )
}

/// The chart's `helm test` hook and NOTES against a real API server. The hook's Pod cannot run
/// here (no kubelet), so its exact command runs as a process with a token of the hook's own
/// ServiceAccount and only the RBAC the hook renders: it fails while the agents are not ready
/// (saying which check), fails while no agent has written its report, and passes once the
/// DaemonSet and Deployment report ready (their status written as their controllers would)
/// and the report exists. The hook's account can read nothing else.
///
/// NOTES (`helm install --dry-run=server`, which reads the live Namespace): a warning when the
/// namespace enforces a Pod Security level that rejects the agent, none when it is
/// `privileged`, a hint when it has no level; client-side dry runs say they could not check.
async fn helm_test_hook_and_notes_check_a_real_install() -> Result<()> {
    let bed = TestBed::start(&Options {
        nodes: 0,
        flavor: Flavor::V2,
        cluster: true,
        real_node: false,
    })
    .await?;
    crate::operator::install(&bed).await?;
    let cluster = bed.cluster()?;
    let kubeconfig = cluster.admin_kubeconfig.to_string_lossy().to_string();
    let chart = repo_root().join("charts/imagegc");
    let hook = run(
        &go_tool("helm")?,
        &[
            "template",
            "imagegc",
            &chart.to_string_lossy(),
            "--namespace",
            NAMESPACE,
            "--show-only",
            "templates/tests/check.yaml",
        ],
    )?;
    let docs = documents(&hook)?;
    let pod = docs
        .iter()
        .find(|d| d["kind"] == "Pod")
        .context("the hook's Pod")?;
    let container = &pod["spec"]["containers"][0];
    ensure!(
        pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
            && container["image"] == "ghcr.io/imagegc/imagegc:0.1.0"
            && pod["spec"]["securityContext"]["runAsNonRoot"] == true
            && pod["spec"]["serviceAccountName"] == "imagegc-test",
        "{pod:?}"
    );
    let args: Vec<String> = container["args"]
        .as_sequence()
        .context("args")?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    ensure!(
        args.first().map(String::as_str) == Some("check"),
        "{args:?}"
    );
    let rbac: Vec<String> = docs
        .iter()
        .filter(|d| d["kind"] != "Pod")
        .map(serde_yaml::to_string)
        .collect::<Result<_, _>>()?;
    let rbac_file = bed.dir().join("hook-rbac.yaml");
    std::fs::write(&rbac_file, rbac.join("---\n"))?;
    cluster.apply(&rbac_file, Duration::from_secs(30)).await?;
    let token = cluster
        .service_account_token(NAMESPACE, "imagegc-test", None)
        .await?;
    let hook_kubeconfig = cluster.token_kubeconfig("hook.kubeconfig", &token)?;

    // Nothing is ready: no kubelet, no DaemonSet or Deployment controller here.
    let (code, _, err) = hook_check(&args, &hook_kubeconfig, 2)?;
    ensure!(
        code == 1
            && err.contains("DaemonSet imagegc-system/imagegc-agent: 0 of 0 agent pods ready")
            && err.contains("0 of 1 controller replicas ready")
            && !err.contains("cannot be listed")
            && !err.contains("forbidden"),
        "before anything is ready ({code}): {err}"
    );
    // Ready, as the DaemonSet and Deployment controllers would say; no report yet.
    let generation = cluster.kubectl(&[
        "get",
        "daemonset",
        "imagegc-agent",
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.metadata.generation}",
    ])?;
    let ds_status = format!(
        r#"{{"status": {{"observedGeneration": {generation}, "desiredNumberScheduled": 1, "currentNumberScheduled": 1, "numberMisscheduled": 0, "numberReady": 1, "updatedNumberScheduled": 1, "numberAvailable": 1}}}}"#
    );
    cluster.kubectl(&[
        "patch",
        "daemonset",
        "imagegc-agent",
        "-n",
        NAMESPACE,
        "--subresource=status",
        "--type=merge",
        "-p",
        &ds_status,
    ])?;
    cluster.kubectl(&[
        "patch",
        "deployment",
        "imagegc-controller",
        "-n",
        NAMESPACE,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1}}"#,
    ])?;
    let (code, _, err) = hook_check(&args, &hook_kubeconfig, 2)?;
    ensure!(
        code == 1 && err.contains("0 NodeImageReports for 1 ready agents"),
        "ready but no report ({code}): {err}"
    );
    // The agent's report: every check passes.
    let admin = cluster.admin_client().await?;
    Api::<NodeImageReport>::all(admin.clone())
        .create(&PostParams::default(), &report("node-a", "node-a"))
        .await?;
    let (code, out, err) = hook_check(&args, &hook_kubeconfig, 30)?;
    ensure!(
        code == 0
            && out.contains("ok: imagegc.dev/imageremovals is served")
            && out.contains(
                "ok: DaemonSet imagegc-system/imagegc-agent: 1 of 1 agent pods ready, 1 up to date"
            )
            && out.contains("ok: 1 NodeImageReports for 1 ready agents"),
        "all ready ({code}): {out}{err}"
    );
    // The hook's account reads only what it checks.
    let hook_client = client_from_kubeconfig(&hook_kubeconfig).await?;
    let s = api_error(
        "the hook's account listing Secrets",
        Api::<Secret>::namespaced(hook_client.clone(), NAMESPACE)
            .list(&ListParams::default())
            .await,
    )?;
    ensure!(s.code == 403, "{s:?}");
    let s = api_error(
        "the hook's account reading Leases",
        Api::<Lease>::namespaced(hook_client, NAMESPACE)
            .get("imagegc-controller")
            .await,
    )?;
    ensure!(s.code == 403, "{s:?}");

    // NOTES, reading the live Namespace's Pod Security level. The test bed's kube-apiserver is
    // built from source without version stamping and reports v0.0.0-master, which no
    // `kubeVersion` range admits, so this installs a copy of the chart without `kubeVersion`
    // (checked on its own: 1.29 refused, 1.30 accepted).
    let key = "pod-security.kubernetes.io/enforce";
    let helm = go_tool("helm")?;
    let err = run(
        &helm,
        &[
            "template",
            "x",
            &chart.to_string_lossy(),
            "--kube-version",
            "1.29.0",
        ],
    )
    .expect_err("the chart renders for Kubernetes 1.29");
    ensure!(
        format!("{err:#}").contains("requires kubeVersion: >=1.30.0-0"),
        "{err:#}"
    );
    run(
        &helm,
        &[
            "template",
            "x",
            &chart.to_string_lossy(),
            "--kube-version",
            "1.30.0",
        ],
    )?;
    let copy = bed.dir().join("chart-for-notes");
    let copied = Command::new("cp")
        .arg("-r")
        .arg(&chart)
        .arg(&copy)
        .status()?;
    ensure!(copied.success(), "copying the chart");
    let meta = std::fs::read_to_string(copy.join("Chart.yaml"))?;
    let meta: String = meta
        .lines()
        .filter(|l| !l.starts_with("kubeVersion:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(copy.join("Chart.yaml"), meta)?;
    for (namespace, level, says) in [
        (
            "notes-restricted",
            Some("restricted"),
            "WARNING: namespace notes-restricted enforces the \"restricted\" Pod Security level",
        ),
        (
            "notes-baseline",
            Some("baseline"),
            "WARNING: namespace notes-baseline enforces the \"baseline\" Pod Security level",
        ),
        ("notes-privileged", Some("privileged"), ""),
        (
            "notes-unlabelled",
            None,
            "has no pod-security.kubernetes.io/enforce label",
        ),
    ] {
        let mut labels = BTreeMap::new();
        if let Some(level) = level {
            labels.insert(key.to_string(), level.to_string());
        }
        let ns: Namespace = serde_json::from_value(
            serde_json::json!({"metadata": {"name": namespace, "labels": labels}}),
        )?;
        Api::<Namespace>::all(admin.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        let out = dry_run_install(&copy, &kubeconfig, namespace, "server")?;
        ensure!(
            out.contains("NOTES:")
                && out.contains(&format!("helm test notes -n {namespace}"))
                && out.contains(says)
                && (!says.is_empty()
                    || !(out.contains("WARNING") || out.contains("label namespace"))),
            "{namespace}: {out}"
        );
    }
    let out = dry_run_install(&copy, &kubeconfig, "notes-restricted", "client")?;
    ensure!(
        out.contains("could not be read") && !out.contains("WARNING: namespace"),
        "client-side dry run: {out}"
    );
    Ok(())
}

pub fn trials() -> Vec<Trial> {
    vec![
        Trial::test("chart::renders_presets_and_options", || {
            chart_renders_presets_and_options().map_err(|e| format!("{e:#}").into())
        }),
        Trial::test("chart::values_schema_refuses_typos", || {
            values_schema_refuses_typos().map_err(|e| format!("{e:#}").into())
        }),
        trial(
            "chart::helm_test_hook_and_notes_check_a_real_install",
            helm_test_hook_and_notes_check_a_real_install,
        ),
        trial(
            "chart::manifests_apply_and_admission_policy_holds",
            manifests_apply_and_policy_holds,
        ),
    ]
}
