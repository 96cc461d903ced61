//! The operator end to end: a real API server with the chart's rendered manifests
//! (`deploy/imagegc.yaml`: CRDs, ServiceAccounts, RBAC, admission policy), three simulated
//! nodes (containerd daemons and Node objects with labels), one `imagegc agent` process per
//! node with a token of the agent ServiceAccount bound to a Pod on that node, and one
//! `imagegc controller` process with its own ServiceAccount.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use imagegc::api::{ImageRemoval, NodeImageReport, RemovalResult};
use imagegc::core::inventory::PINNED_LABEL;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use libtest_mimic::Trial;
use testbed::image::{self, BuiltImage, ImageBuilder};
use testbed::process::{Proc, free_port};
use testbed::{Flavor, Options, TestBed};

use crate::support::{NS, import, import_labelled, trial};

/// Namespace the chart is rendered for.
pub const SYSTEM_NS: &str = "imagegc-system";
const AGENT_SA: &str = "imagegc-agent";
const CONTROLLER_SA: &str = "imagegc-controller";
/// The directory the chart mounts for the agent's `--image-fs`, under containerd's root (its
/// `tmpmounts`, which containerd creates at start-up): the agents here read their image
/// filesystem's usage
/// through it too.
pub const IMAGE_FS_UNDER_ROOT: &str = "tmpmounts";
/// How long anything the operator does may take here.
const CONVERGE: Duration = Duration::from_secs(60);

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "operator::removal_by_label_reports_and_completes",
            removal_by_label_reports_and_completes,
        ),
        trial(
            "operator::protections_force_and_bad_input",
            protections_force_and_bad_input,
        ),
        trial(
            "operator::agent_killed_mid_removal_finishes",
            agent_killed_mid_removal_finishes,
        ),
        trial(
            "operator::first_seen_and_last_used_survive_restarts",
            first_seen_and_last_used_survive_restarts,
        ),
        trial(
            "operator::agent_cannot_write_another_nodes_report",
            agent_cannot_write_another_nodes_report,
        ),
        trial(
            "operator::agent_shares_one_http2_connection",
            agent_shares_one_http2_connection,
        ),
    ]
}

/// The rendered chart.
pub fn deploy_manifest() -> PathBuf {
    testbed::tools::repo_root().join("deploy/imagegc.yaml")
}

/// Applies the rendered chart (retrying while the API server settles) and waits until the
/// CRDs serve.
pub async fn install(bed: &TestBed) -> Result<()> {
    bed.cluster()?.apply(&deploy_manifest(), CONVERGE).await?;
    let admin = bed.cluster()?.admin_client().await?;
    let api = Api::<NodeImageReport>::all(admin.clone());
    let removals = Api::<ImageRemoval>::all(admin);
    let deadline = Instant::now() + CONVERGE;
    while api.list(&Default::default()).await.is_err()
        || removals.list(&Default::default()).await.is_err()
    {
        ensure!(Instant::now() < deadline, "CRDs never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

pub use testbed::wait_for;

/// The running operator on a fresh bed.
pub struct Operator {
    // Processes first: they stop before the bed they use.
    agents: Vec<Option<Proc>>,
    /// Each agent's /metrics, /livez, /readyz port.
    agent_ports: Vec<u16>,
    controller: Option<Proc>,
    agent_kubeconfigs: Vec<PathBuf>,
    controller_kubeconfig: PathBuf,
    /// Flags every agent gets after the harness's own (`--image-fs` is always the directory
    /// the chart mounts, inside its node's containerd root). `--no-allow-force` (a harness
    /// word, not an agent flag) starts the agents without `--allow-force`.
    pub agent_args: Vec<String>,
    /// A cluster-admin client.
    pub admin: Client,
    /// Every daemon.
    pub bed: TestBed,
}

impl Operator {
    /// Starts a bed with one node per entry of `labels`, installs the chart, creates the
    /// Nodes, and starts an agent per node and the controller.
    pub async fn start(labels: &[&[(&str, &str)]]) -> Result<Operator> {
        let bed = TestBed::start(&Options {
            nodes: labels.len(),
            flavor: Flavor::V2,
            cluster: true,
            real_node: false,
        })
        .await?;
        install(&bed).await?;
        let cluster = bed.cluster()?;
        let admin = cluster.admin_client().await?;
        let mut agent_kubeconfigs = Vec::new();
        for (i, node_labels) in labels.iter().enumerate() {
            let name = bed.nodes[i].node.clone();
            let node: Node = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": to_map(node_labels)},
            }))?;
            Api::<Node>::all(admin.clone())
                .create(&PostParams::default(), &node)
                .await?;
            let token = agent_token(&bed, &admin, &name).await?;
            agent_kubeconfigs
                .push(cluster.token_kubeconfig(&format!("agent-{name}.kubeconfig"), &token)?);
        }
        let token = cluster
            .service_account_token(SYSTEM_NS, CONTROLLER_SA, None)
            .await?;
        let controller_kubeconfig = cluster.token_kubeconfig("controller.kubeconfig", &token)?;
        let mut op = Operator {
            agents: (0..labels.len()).map(|_| None).collect(),
            agent_ports: vec![0; labels.len()],
            controller: None,
            agent_kubeconfigs,
            controller_kubeconfig,
            agent_args: Vec::new(),
            admin,
            bed,
        };
        for i in 0..labels.len() {
            op.start_agent(i)?;
        }
        op.start_controller()?;
        Ok(op)
    }

    /// The socket of node `i`.
    pub fn socket(&self, i: usize) -> PathBuf {
        self.bed.nodes[i].socket.clone()
    }

    /// The name of node `i`.
    pub fn node(&self, i: usize) -> String {
        self.bed.nodes[i].node.clone()
    }

    /// Starts (or restarts) the agent of node `i`.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let node = self.node(i);
        self.agent_ports[i] = free_port()?;
        let mut args = vec![
            "agent".to_string(),
            "--node-name".into(),
            node.clone(),
            "--socket".into(),
            self.socket(i).display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.agent_ports[i]),
            "--image-fs".into(),
            self.bed.nodes[i]
                .root
                .join(IMAGE_FS_UNDER_ROOT)
                .display()
                .to_string(),
        ];
        // Unless a test says otherwise: forced removals allowed (the tests of `force` need
        // it), and no minimum image age (the tests' images are seconds old).
        let given = |flag: &str| self.agent_args.iter().any(|a| a.starts_with(flag));
        if !given("--allow-force") && !given("--no-allow-force") {
            args.push("--allow-force".into());
        }
        if !given("--prune-min-image-age") {
            args.push("--prune-min-image-age=0s".into());
        }
        args.extend(
            self.agent_args
                .iter()
                .filter(|a| *a != "--no-allow-force")
                .cloned(),
        );
        let envs = vec![
            (
                "KUBECONFIG".to_string(),
                self.agent_kubeconfigs[i].display().to_string(),
            ),
            ("IMAGEGC_LOG".into(), "info".into()),
        ];
        let log = self.bed.dir().join(format!("agent-{node}.log"));
        self.agents[i] = Some(Proc::spawn(
            &format!("agent-{node}"),
            &crate::support::imagegc_bin(),
            &args,
            &envs,
            self.bed.dir(),
            &log,
        )?);
        Ok(())
    }

    /// The kubeconfig node `i`'s agent uses (a token bound to its pod).
    pub fn agent_kubeconfig(&self, i: usize) -> &std::path::Path {
        &self.agent_kubeconfigs[i]
    }

    /// The /metrics, /livez, /readyz port of node `i`'s agent.
    pub fn agent_port(&self, i: usize) -> u16 {
        self.agent_ports[i]
    }

    /// The PID of node `i`'s agent, if it runs.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.agents[i].as_ref().map(Proc::pid)
    }

    /// The PID of the controller, if it runs.
    pub fn controller_pid(&self) -> Option<u32> {
        self.controller.as_ref().map(Proc::pid)
    }

    /// Everything node `i`'s agents (all its restarts) have logged.
    pub fn agent_log(&self, i: usize) -> String {
        let path = self.bed.dir().join(format!("agent-{}.log", self.node(i)));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Stops the agent of node `i` with SIGTERM; returns the end of its log.
    pub fn stop_agent(&mut self, i: usize) -> String {
        match self.agents[i].take() {
            Some(mut p) => {
                p.stop(Duration::from_secs(10));
                p.log_tail(3)
            }
            None => String::new(),
        }
    }

    /// SIGKILLs the agent of node `i`.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut p) = self.agents[i].take() {
            p.kill_hard();
        }
    }

    fn start_controller(&mut self) -> Result<()> {
        let args = vec![
            "controller".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--lease-namespace".into(),
            SYSTEM_NS.into(),
            "--identity".into(),
            "controller-0".into(),
        ];
        let envs = vec![
            (
                "KUBECONFIG".to_string(),
                self.controller_kubeconfig.display().to_string(),
            ),
            ("IMAGEGC_LOG".into(), "info".into()),
        ];
        let log = self.bed.dir().join("controller.log");
        self.controller = Some(Proc::spawn(
            "controller",
            &crate::support::imagegc_bin(),
            &args,
            &envs,
            self.bed.dir(),
            &log,
        )?);
        Ok(())
    }

    /// The last lines of every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for p in self
            .agents
            .iter()
            .chain(std::iter::once(&self.controller))
            .flatten()
        {
            out.push_str(&format!("\n--- {}\n{}", p.pid(), p.log_tail(15)));
        }
        out
    }

    /// Imports `k` images with two tags each (`<prefix><n>:1`, `<prefix><n>:2`) on node `i`
    /// and waits until the CRI plugin lists them; returns them and their first tags.
    pub async fn seed(
        &self,
        i: usize,
        prefix: &str,
        k: usize,
    ) -> Result<(Vec<BuiltImage>, Vec<String>)> {
        let socket = self.socket(i);
        let (mut built, mut tags) = (Vec::new(), Vec::new());
        for n in 0..k {
            let img = ImageBuilder::new(format!("{prefix}-{n}"))
                .layer_sizes(&[2048])
                .build();
            let a = format!("docker.io/library/{prefix}{n}:1");
            let b = format!("docker.io/library/{prefix}{n}:2");
            import(&socket, &img, &[&a, &b]).await?;
            testbed::cri::wait_synced(&socket, &[img.id()], &[&a, &b]).await?;
            tags.push(a);
            built.push(img);
        }
        Ok((built, tags))
    }

    /// Records on node `i` that carry a pending mark: listed in a removal journal (or
    /// labelled pending, as earlier versions marked them).
    pub async fn pending_marks(&self, i: usize) -> Result<usize> {
        let rt = imagegc::containerd::Runtime::connect(&self.socket(i), NS).await?;
        let journalled: BTreeSet<String> = rt
            .list_journals()
            .await?
            .into_iter()
            .flat_map(|j| j.names)
            .collect();
        Ok(rt
            .list_images()
            .await?
            .iter()
            .filter(|r| journalled.contains(&r.name))
            .count())
    }

    /// Waits until node `i` shows a pending mark: a batch is in flight.
    pub async fn wait_pending_mark(&self, i: usize) -> Result<()> {
        wait_for("a pending mark", CONVERGE, || async move {
            Ok((self.pending_marks(i).await? > 0).then_some(()))
        })
        .await
        .with_context(|| self.logs())
    }

    /// Nothing of `built` (seeded under `prefix`) is left on node `i`: no record, no pending
    /// mark, no removal journal, no content once the collector ran.
    pub async fn assert_all_gone(
        &self,
        i: usize,
        prefix: &str,
        built: &[BuiltImage],
    ) -> Result<()> {
        let socket = self.socket(i);
        let rt = imagegc::containerd::Runtime::connect(&socket, NS).await?;
        let records = rt.list_images().await?;
        let ids: BTreeSet<String> = built.iter().map(BuiltImage::id).collect();
        let left: Vec<&str> = records
            .iter()
            .filter(|r| {
                r.name.starts_with(&format!("docker.io/library/{prefix}")) || ids.contains(&r.name)
            })
            .map(|r| r.name.as_str())
            .collect();
        ensure!(left.is_empty(), "left on node {i}: {left:?}");
        let journals = rt.list_journals().await?;
        ensure!(
            journals.is_empty(),
            "journals left on node {i}: {journals:?}"
        );
        image::force_gc(&socket, NS).await?;
        let content = image::content_digests(&socket, NS).await?;
        let leaked = built
            .iter()
            .filter(|b| b.digests().iter().any(|d| content.contains(d)))
            .count();
        ensure!(leaked == 0, "{leaked} images' content still on node {i}");
        Ok(())
    }

    /// Merge-patches the spec of ImageRemoval `name` (a new generation).
    pub async fn patch_spec(&self, name: &str, spec: serde_json::Value) -> Result<()> {
        Api::<ImageRemoval>::all(self.admin.clone())
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "spec": spec })),
            )
            .await?;
        Ok(())
    }

    /// Creates an ImageRemoval from a JSON spec.
    pub async fn create_removal(
        &self,
        name: &str,
        spec: serde_json::Value,
    ) -> Result<ImageRemoval> {
        let removal: ImageRemoval = serde_json::from_value(serde_json::json!({
            "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImageRemoval",
            "metadata": {"name": name}, "spec": spec,
        }))?;
        Ok(Api::<ImageRemoval>::all(self.admin.clone())
            .create(&PostParams::default(), &removal)
            .await?)
    }

    /// Waits until node `i` reports on the current generation of removal `name`.
    pub async fn wait_result(&self, i: usize, name: &str) -> Result<RemovalResult> {
        let removals = Api::<ImageRemoval>::all(self.admin.clone());
        let reports = Api::<NodeImageReport>::all(self.admin.clone());
        let node = &self.node(i);
        let (removals, reports) = (&removals, &reports);
        let found = wait_for(
            &format!("{node}'s result for {name}"),
            CONVERGE,
            || async move {
                let removal = removals.get(name).await?;
                let Some(report) = reports.get_opt(node).await? else {
                    return Ok(None);
                };
                Ok(report.status.and_then(|s| {
                    s.removals.into_iter().find(|r| {
                        r.name == name
                            && Some(&r.uid) == removal.metadata.uid.as_ref()
                            && Some(r.generation) == removal.metadata.generation
                    })
                }))
            },
        )
        .await;
        found.with_context(|| self.logs())
    }

    /// Waits until the ImageRemoval's status satisfies `done`.
    pub async fn wait_status(
        &self,
        name: &str,
        what: &str,
        done: impl Fn(&ImageRemoval) -> bool,
    ) -> Result<ImageRemoval> {
        let removals = &Api::<ImageRemoval>::all(self.admin.clone());
        let done = &done;
        let found = wait_for(&format!("{name}: {what}"), CONVERGE, || async move {
            let r = removals.get(name).await?;
            Ok(done(&r).then_some(r))
        })
        .await;
        found.with_context(|| self.logs())
    }
}

fn to_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A token of the agent ServiceAccount bound to a Pod on `node` (the Pod never runs): the API
/// server adds the pod's and the node's names to it, as it does for a kubelet-mounted token.
/// The Pod is named as the DaemonSet controller names the agent's pods (`imagegc-agent-` and
/// 5 generated characters), which the admission policy requires.
pub async fn agent_token(bed: &TestBed, admin: &Client, node: &str) -> Result<String> {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"generateName": "imagegc-agent-", "namespace": SYSTEM_NS},
        "spec": {"nodeName": node, "serviceAccountName": AGENT_SA,
                 "automountServiceAccountToken": false,
                 "containers": [{"name": "agent", "image": "imagegc:test"}]}
    }))?;
    let pod = Api::<Pod>::namespaced(admin.clone(), SYSTEM_NS)
        .create(&PostParams::default(), &pod)
        .await?;
    let (name, uid) = (pod.name_any(), pod.uid().context("pod uid")?);
    bed.cluster()?
        .service_account_token(SYSTEM_NS, AGENT_SA, Some((&name, &uid)))
        .await
}

pub fn condition(r: &ImageRemoval, type_: &str) -> Option<String> {
    r.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

pub fn outcomes(r: &RemovalResult) -> Vec<(String, String)> {
    r.images
        .iter()
        .map(|i| (i.image.clone(), i.outcome.to_string()))
        .collect()
}

pub fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// The agent labels every image's records with when it first saw it, and the records of an
/// image a container uses with when it last saw it used; the labels live on containerd's
/// records, so a restarted agent keeps them (it neither resets first-seen nor rewrites a fresh
/// last-used); a container created later marks its image used at once, through containerd's
/// events.
async fn first_seen_and_last_used_survive_restarts() -> Result<()> {
    use imagegc::core::last_used::{FIRST_SEEN_LABEL, LAST_USED_LABEL};

    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    op.stop_agent(0);
    let socket = op.socket(0);
    let used = ImageBuilder::new("lu-used").build();
    let idle = ImageBuilder::new("lu-idle").build();
    import(&socket, &used, &["docker.io/library/luused:1"]).await?;
    import(
        &socket,
        &idle,
        &["docker.io/library/luidle:1", "docker.io/library/luidle:2"],
    )
    .await?;
    image::create_container(&socket, NS, "lu", "docker.io/library/luused:1", None).await?;
    let before = now_seconds();
    op.start_agent(0)?;

    // Labels of the records whose names start with `prefix`, per record.
    let labels = |prefix: &'static str| {
        let socket = socket.clone();
        async move {
            let rt = imagegc::containerd::Runtime::connect(&socket, NS).await?;
            Ok::<_, anyhow::Error>(
                rt.list_images()
                    .await?
                    .into_iter()
                    .filter(|r| r.name.starts_with(prefix))
                    .map(|r| {
                        let get = |k: &str| r.labels.get(k).and_then(|v| v.parse::<i64>().ok());
                        (
                            r.name.clone(),
                            (get(FIRST_SEEN_LABEL), get(LAST_USED_LABEL)),
                        )
                    })
                    .collect::<BTreeMap<_, _>>(),
            )
        }
    };
    let stamped = wait_for("first-seen labels on every record", CONVERGE, || async {
        let used = labels("docker.io/library/luused").await?;
        let idle = labels("docker.io/library/luidle").await?;
        let all_seen = used.values().chain(idle.values()).all(|(f, _)| f.is_some());
        Ok((all_seen && used.len() == 1 && idle.len() == 2).then_some((used, idle)))
    })
    .await?;
    let after = now_seconds();
    let (used_first, used_last) = stamped.0["docker.io/library/luused:1"];
    let used_first = used_first.context("first-seen")?;
    ensure!(
        (before..=after).contains(&used_first),
        "first-seen {used_first} outside [{before}, {after}]"
    );
    ensure!(
        used_last.is_some_and(|at| (before..=after).contains(&at)),
        "the image in use has last-used {used_last:?}, expected within [{before}, {after}]"
    );
    ensure!(
        stamped.1.values().all(|(_, last)| last.is_none()),
        "an image no container uses got a last-used: {:?}",
        stamped.1
    );

    // A later agent keeps what the first one recorded.
    op.stop_agent(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    op.start_agent(0)?;
    crate::support::wait_http_ok(op.agent_port(0), "/readyz").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        labels("docker.io/library/luused").await? == stamped.0
            && labels("docker.io/library/luidle").await? == stamped.1,
        "the labels changed across a restart: {:?} → {:?} / {:?}",
        stamped,
        labels("docker.io/library/luused").await?,
        labels("docker.io/library/luidle").await?
    );

    // A container created now marks its image used within moments (containerd's events), not
    // at the next inventory pass (5 minutes away).
    let before = now_seconds();
    image::create_container(&socket, NS, "lu2", "docker.io/library/luidle:1", None).await?;
    let idle = wait_for(
        "last-used from the container event",
        Duration::from_secs(15),
        || async {
            let idle = labels("docker.io/library/luidle").await?;
            Ok(idle
                .values()
                .all(|(_, last)| last.is_some())
                .then_some(idle))
        },
    )
    .await
    .with_context(|| op.agent_log(0))?;
    ensure!(
        idle.values().all(
            |(first, last)| *first == stamped.1.values().next().and_then(|v| v.0)
                && last.is_some_and(|at| at >= before)
        ),
        "after the container event: {idle:?} (before: {:?})",
        stamped.1
    );
    Ok(())
}

pub fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub async fn records(op: &Operator, i: usize) -> Result<BTreeSet<String>> {
    image::image_names(&op.socket(i), NS).await
}

/// An ImageRemoval selecting 2 of 3 nodes removes every reference there and nothing on the
/// third; relabelling the third makes it execute; the TTL deletes the finished object.
async fn removal_by_label_reports_and_completes() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")], &[("pool", "a")], &[("pool", "b")]]).await?;
    let app = ImageBuilder::new("op-app").build();
    let names = ["docker.io/library/app:1", "docker.io/library/app:latest"];
    for i in 0..3 {
        import(&op.socket(i), &app, &names).await?;
        testbed::cri::wait_synced(&op.socket(i), &[app.id()], &names).await?;
    }
    let before = records(&op, 2).await?;

    op.create_removal(
        "app",
        serde_json::json!({"images": ["app:1"], "nodeSelector": {"matchLabels": {"pool": "a"}}}),
    )
    .await?;
    for i in 0..2 {
        let r = op.wait_result(i, "app").await?;
        ensure!(outcomes(&r) == pairs(&[("app:1", "Removed")]), "{:?}", r);
        let refs: BTreeSet<&str> = r.images[0].references.iter().map(String::as_str).collect();
        ensure!(
            names.iter().all(|n| refs.contains(n)) && refs.contains(app.id().as_str()),
            "every reference reported: {refs:?}"
        );
        let left = records(&op, i).await?;
        ensure!(
            !left
                .iter()
                .any(|n| names.contains(&n.as_str()) || *n == app.id()),
            "node {i} still holds {left:?}"
        );
        ensure!(r.bytes_freed > 0, "freed {}", r.bytes_freed);
    }
    let done = op
        .wait_status("app", "Complete on 2 nodes", |r| {
            r.status
                .as_ref()
                .is_some_and(|s| s.target_nodes == 2 && s.succeeded == 2 && s.pending == 0)
                && condition(r, "Complete").as_deref() == Some("True")
        })
        .await?;
    let status = done.status.context("status")?;
    ensure!(status.bytes_freed > 0 && status.failed == 0, "{status:?}");
    ensure!(
        records(&op, 2).await? == before,
        "node-2 (pool b) must be untouched"
    );
    let report = Api::<NodeImageReport>::all(op.admin.clone())
        .get(&op.node(2))
        .await?;
    ensure!(
        report
            .status
            .as_ref()
            .is_some_and(|s| s.removals.is_empty() && s.inventory.is_some()),
        "node-2 reports its inventory and no removal: {:?}",
        report.status
    );

    // The agent serves its health and metrics.
    let port = op.agent_ports[0];
    let (code, _) = crate::support::http_get(port, "/readyz").await?;
    ensure!(code == 200, "/readyz: {code}");
    let (_, metrics) = crate::support::http_get(port, "/metrics").await?;
    ensure!(
        metrics.contains(r#"imagegc_agent_removals_total{phase="Succeeded",dry_run="false"} 1"#)
            && metrics.contains(r#"imagegc_agent_images_total{outcome="Removed"} 1"#),
        "{metrics}"
    );

    // Idempotent across restarts: the image comes back on node-0 while its agent is down;
    // the restarted agent does not run the same generation again...
    let log = op.stop_agent(0);
    ensure!(log.contains("agent stopped"), "graceful stop: {log}");
    import(&op.socket(0), &app, &names).await?;
    testbed::cri::wait_synced(&op.socket(0), &[app.id()], &names).await?;
    let reports = Api::<NodeImageReport>::all(op.admin.clone());
    let updated = |r: NodeImageReport| r.status.and_then(|s| s.updated).map(|t| t.0);
    let before_restart = updated(reports.get(&op.node(0)).await?);
    // `updated` has one-second resolution: make the restarted agent's write tell apart.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    op.start_agent(0)?;
    let (reports_ref, node0) = (&reports, op.node(0));
    wait_for("the restarted agent's first report", CONVERGE, || {
        let node0 = node0.clone();
        async move {
            let now = updated(reports_ref.get(&node0).await?);
            Ok((now > before_restart).then_some(()))
        }
    })
    .await
    .with_context(|| op.logs())?;
    ensure!(
        records(&op, 0).await?.contains(names[0]),
        "a done generation ran again after a restart"
    );
    // ...and a new generation (a changed spec) runs.
    op.patch_spec("app", serde_json::json!({"force": true}))
        .await?;
    let r = op.wait_result(0, "app").await?;
    ensure!(
        r.generation == 2 && outcomes(&r) == pairs(&[("app:1", "Removed")]),
        "{r:?}"
    );
    let r = op.wait_result(1, "app").await?;
    ensure!(outcomes(&r) == pairs(&[("app:1", "NotPresent")]), "{r:?}");

    // Relabel node-2 into the pool: it becomes a target and executes.
    Api::<Node>::all(op.admin.clone())
        .patch(
            &op.node(2),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"pool": "a"}}})),
        )
        .await?;
    let r = op.wait_result(2, "app").await?;
    ensure!(outcomes(&r) == pairs(&[("app:1", "Removed")]), "{r:?}");
    op.wait_status("app", "Complete on 3 nodes", |r| {
        r.status
            .as_ref()
            .is_some_and(|s| s.target_nodes == 3 && s.succeeded == 3)
            && condition(r, "Complete").as_deref() == Some("True")
    })
    .await?;

    // ttlSecondsAfterFinished deletes the finished removal; agents then drop its entries.
    let removals = Api::<ImageRemoval>::all(op.admin.clone());
    op.patch_spec("app", serde_json::json!({"ttlSecondsAfterFinished": 1}))
        .await?;
    let removals = &removals;
    wait_for("the TTL to delete the removal", CONVERGE, || async move {
        Ok(removals.get_opt("app").await?.is_none().then_some(()))
    })
    .await
    .with_context(|| op.logs())?;
    let reports = &Api::<NodeImageReport>::all(op.admin.clone());
    let op = &op;
    wait_for(
        "reports to drop the deleted removal",
        CONVERGE,
        || async move {
            for i in 0..3 {
                let r = reports.get(&op.node(i)).await?;
                if r.status.is_some_and(|s| !s.removals.is_empty()) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    Ok(())
}

/// In-use images are kept unless `force`; pinned images always; absent images are success;
/// invalid strings are refused by the API server, ambiguous ones touch nothing.
async fn protections_force_and_bad_input() -> Result<()> {
    let op = Operator::start(&[&[("pool", "a")]]).await?;
    let socket = op.socket(0);
    let used = ImageBuilder::new("op-used").build();
    let pinned = ImageBuilder::new("op-pinned").build();
    import(&socket, &used, &["docker.io/library/used:1"]).await?;
    import_labelled(
        &socket,
        &pinned,
        &["docker.io/library/keep:1"],
        &[(PINNED_LABEL, "pinned")],
    )
    .await?;
    testbed::cri::wait_synced(
        &socket,
        &[used.id(), pinned.id()],
        &["docker.io/library/used:1", "docker.io/library/keep:1"],
    )
    .await?;
    image::create_container(&socket, NS, "web", "docker.io/library/used:1", None).await?;

    op.create_removal(
        "protect",
        serde_json::json!({"images": ["used:1", "keep:1", "absent:9"]}),
    )
    .await?;
    let r = op.wait_result(0, "protect").await?;
    ensure!(
        outcomes(&r)
            == pairs(&[
                ("used:1", "InUse"),
                ("keep:1", "Pinned"),
                ("absent:9", "NotPresent")
            ]),
        "{r:?}"
    );
    let failed = op
        .wait_status("protect", "Failed with samples", |r| {
            condition(r, "Failed").as_deref() == Some("True")
        })
        .await?;
    let status = failed.status.context("status")?;
    let reasons: BTreeSet<&str> = status.failures.iter().map(|f| f.reason.as_str()).collect();
    ensure!(
        status.failed == 1 && reasons == BTreeSet::from(["InUse", "Pinned"]),
        "{status:?}"
    );
    ensure!(records(&op, 0).await?.contains("docker.io/library/used:1"));

    // force (a new generation) removes the in-use image; the pinned one still stays.
    op.patch_spec("protect", serde_json::json!({"force": true}))
        .await?;
    let r = op.wait_result(0, "protect").await?;
    ensure!(r.generation == 2, "{r:?}");
    ensure!(
        outcomes(&r)
            == pairs(&[
                ("used:1", "Removed"),
                ("keep:1", "Pinned"),
                ("absent:9", "NotPresent")
            ]),
        "{r:?}"
    );
    let left = records(&op, 0).await?;
    ensure!(
        !left.contains("docker.io/library/used:1") && left.contains("docker.io/library/keep:1"),
        "{left:?}"
    );

    // Invalid strings never reach an agent: the API server refuses them.
    let err = op
        .create_removal("wild", serde_json::json!({"images": ["keep*"]}))
        .await
        .expect_err("a wildcard must be refused");
    ensure!(format!("{err:#}").contains("wildcards"), "{err:#}");

    // An ambiguous short ID (two images share the first hex digit here by construction)
    // is reported and the whole request touches nothing.
    let a = ImageBuilder::new("op-amb-a").build();
    let (b, prefix) = (0..200)
        .map(|n| ImageBuilder::new(format!("op-amb-b{n}")).build())
        .find_map(|b| {
            let (ia, ib) = (a.id(), b.id());
            let (ha, hb) = (&ia[7..], &ib[7..]);
            (ha[..1] == hb[..1]).then(|| (b.clone(), ha[..1].to_string()))
        })
        .context("no image with a shared first digit")?;
    import(&socket, &a, &["docker.io/library/amb-a:1"]).await?;
    import(&socket, &b, &["docker.io/library/amb-b:1"]).await?;
    testbed::cri::wait_synced(
        &socket,
        &[a.id(), b.id()],
        &["docker.io/library/amb-a:1", "docker.io/library/amb-b:1"],
    )
    .await?;
    let before = records(&op, 0).await?;
    op.create_removal(
        "ambiguous",
        serde_json::json!({"images": [prefix, "amb-a:1"]}),
    )
    .await?;
    let r = op.wait_result(0, "ambiguous").await?;
    let kinds: Vec<String> = outcomes(&r).into_iter().map(|(_, o)| o).collect();
    ensure!(kinds == ["Ambiguous", "Skipped"], "{r:?}");
    ensure!(records(&op, 0).await? == before, "nothing touched");
    Ok(())
}

/// An agent SIGKILLed while a batch is half done is restarted and finishes it: no record is
/// left pending or stranded, and the report shows the outcome.
async fn agent_killed_mid_removal_finishes() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    let (built, requested) = op.seed(0, "kill", 60).await?;
    // Stop the agent so the kill lands while the batch is in flight: restart it only once
    // the removal exists, then kill it as soon as containerd shows pending records.
    op.kill_agent(0);
    op.create_removal("big", serde_json::json!({"images": requested}))
        .await?;
    op.start_agent(0)?;
    let caught = op.wait_pending_mark(0).await;
    op.kill_agent(0);
    caught?;
    ensure!(
        op.pending_marks(0).await? > 0,
        "the kill must land mid-batch (pending records left)"
    );

    op.start_agent(0)?;
    let r = op.wait_result(0, "big").await?;
    ensure!(
        r.images
            .iter()
            .all(|i| i.outcome == "Removed" || i.outcome == "NotPresent"),
        "{r:?}"
    );
    op.assert_all_gone(0, "kill", &built).await
}

/// The admission policy holds with a real agent's credentials: node-0's agent token may write
/// node-0's NodeImageReport and is refused for node-1's.
async fn agent_cannot_write_another_nodes_report() -> Result<()> {
    let op = Operator::start(&[&[("pool", "a")], &[("pool", "a")]]).await?;
    let reports_as_0 = Api::<NodeImageReport>::all(
        testbed::cluster::client_from_kubeconfig(&op.agent_kubeconfigs[0]).await?,
    );
    let own = op.node(0);
    let other = op.node(1);
    // Each agent creates its own report. Both must exist: a status patch of a missing object
    // is a 404 before admission is asked.
    for name in [&own, &other] {
        let admin = &op.admin;
        wait_for(&format!("{name}'s own report"), CONVERGE, || async move {
            Ok(Api::<NodeImageReport>::all(admin.clone())
                .get_opt(name)
                .await?
                .map(|_| ()))
        })
        .await
        .with_context(|| op.logs())?;
    }
    let params = PatchParams::apply("intruder").force();
    let forged = |node: &str| {
        Patch::Apply(serde_json::json!({
            "apiVersion": "imagegc.dev/v1alpha1", "kind": "NodeImageReport",
            "metadata": {"name": node}, "spec": {"nodeName": node},
            "status": {"removals": []},
        }))
    };
    // The API server loads admission policies asynchronously: wait until this one is in force
    // (a write for a made-up node is refused), then check every case.
    let (reports, params_ref, forged_ref) = (&reports_as_0, &params, &forged);
    wait_for(
        "the admission policy to be in force",
        CONVERGE,
        || async move {
            Ok(
                match reports
                    .patch("node-9", params_ref, &forged_ref("node-9"))
                    .await
                {
                    Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => Some(()),
                    _ => None,
                },
            )
        },
    )
    .await?;
    let wrote_own = reports_as_0
        .patch_status(&own, &params, &forged(&own))
        .await;
    ensure!(wrote_own.is_ok(), "own report: {wrote_own:?}");
    for (what, result) in [
        (
            "status of another node's report",
            reports_as_0
                .patch_status(&other, &params, &forged(&other))
                .await,
        ),
        (
            "another node's report",
            reports_as_0.patch(&other, &params, &forged(&other)).await,
        ),
        (
            "a report for a made-up node",
            reports_as_0
                .patch("node-9", &params, &forged("node-9"))
                .await,
        ),
    ] {
        match result {
            Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => {
                ensure!(
                    s.message.contains("own node")
                        || s.message.contains("ValidatingAdmissionPolicy"),
                    "{what}: refused, but not by the policy: {}",
                    s.message
                );
            }
            other => bail!("{what}: expected a refusal, got {other:?}"),
        }
    }
    Ok(())
}

/// The resources an agent watches: ImageRemovals, ImagePrunePolicies, its Node, its pods.
const AGENT_WATCHES: [&str; 4] = ["imageremovals", "imageprunepolicies", "nodes", "pods"];

/// The API server's open watches per resource in [`AGENT_WATCHES`] (its
/// `apiserver_longrunning_requests` gauge, every scope summed).
fn open_watches(op: &Operator) -> Result<BTreeMap<String, f64>> {
    let text = op.bed.cluster()?.kubectl(&["get", "--raw", "/metrics"])?;
    let mut out: BTreeMap<String, f64> =
        AGENT_WATCHES.iter().map(|r| (r.to_string(), 0.0)).collect();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_longrunning_requests{") else {
            continue;
        };
        if !rest.contains(r#"verb="WATCH""#) {
            continue;
        }
        let (labels, value) = rest.rsplit_once(' ').context("a sample without a value")?;
        for (resource, sum) in out.iter_mut() {
            if labels.contains(&format!(r#"resource="{resource}""#)) {
                *sum += value.parse::<f64>()?;
            }
        }
    }
    Ok(out)
}

/// The API server's port and process ID.
fn api_server(op: &Operator) -> Result<(u16, u32)> {
    let cluster = op.bed.cluster()?;
    let pid = cluster
        .apiserver_pid()
        .context("kube-apiserver is not running")?;
    Ok((cluster.port()?, pid))
}

/// Node 0's agent's connections to the API server, once it holds one watch more than
/// `without` on each of [`AGENT_WATCHES`] and a single connection.
async fn agent_connection(
    op: &Operator,
    without: &BTreeMap<String, f64>,
) -> Result<testbed::sockets::TcpConn> {
    let (port, _) = api_server(op)?;
    let pid = op.agent_pid(0).context("the agent is not running")?;
    let found = wait_for(
        "the agent's four watches on one connection",
        CONVERGE,
        || async move {
            let with = open_watches(op)?;
            let conns = testbed::sockets::connections_to(pid, port)?;
            let watching = AGENT_WATCHES.iter().all(|r| with[*r] > without[*r]);
            Ok((watching && conns.len() == 1).then(|| conns[0]))
        },
    )
    .await;
    found.with_context(|| {
        let conns = testbed::sockets::connections_to(pid, port);
        format!("watches {:?}, connections {conns:?}", open_watches(op))
    })
}

/// The agent's four watches and its writes share one HTTP/2 connection: the agent holds one
/// connection to the API server while the API server counts one more open watch on each of
/// the four resources than without it (HTTP/1.1 needs a connection per watch), the API
/// server's end shows the same single connection, and a removal runs end to end over it after
/// the agent made no request for longer than a connection pool's idle timeout.
async fn agent_shares_one_http2_connection() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    let app = ImageBuilder::new("op-h2").build();
    let names = ["docker.io/library/h2:1"];
    import(&op.socket(0), &app, &names).await?;
    testbed::cri::wait_synced(&op.socket(0), &[app.id()], &names).await?;
    let (port, apiserver) = api_server(&op)?;

    let log = op.stop_agent(0);
    ensure!(log.contains("agent stopped"), "graceful stop: {log}");
    // The stopped agent's watches end when its connection closes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let without = open_watches(&op)?;
    op.start_agent(0)?;
    let conn = agent_connection(&op, &without).await?;
    let server_side: Vec<_> = testbed::sockets::tcp_connections(apiserver)?
        .into_iter()
        .filter(|c| c.local_port == port && c.remote_port == conn.local_port)
        .collect();
    ensure!(
        server_side.len() == 1,
        "the API server's end of the agent's connection: {server_side:?}"
    );

    // Longer than the connection pool's default idle timeout (90 s): the next request must
    // still take the connection the watches stream on.
    tokio::time::sleep(Duration::from_secs(95)).await;
    op.create_removal(
        "h2",
        serde_json::json!({"images": ["h2:1"], "nodeSelector": {"matchLabels": {"pool": "a"}}}),
    )
    .await?;
    let r = op.wait_result(0, "h2").await?;
    ensure!(outcomes(&r) == pairs(&[("h2:1", "Removed")]), "{r:?}");
    ensure!(
        !records(&op, 0).await?.contains(names[0]),
        "the image is still on the node"
    );
    let pid = op.agent_pid(0).context("the agent stopped")?;
    let after = testbed::sockets::connections_to(pid, port)?;
    ensure!(
        after == vec![conn],
        "the removal's writes took another connection: {after:?}, before {conn:?}"
    );
    Ok(())
}
