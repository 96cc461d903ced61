//! `make bench-scale`: imagegc at N simulated nodes against the real API server, side by side
//! with the design docs/architecture.md rejects (every agent writes its own entry into the removal's
//! status), with the API server's own `/metrics` as the meter.
//!
//! One test bed: etcd, kube-apiserver with the rendered chart applied (CRDs, ServiceAccounts,
//! RBAC, the node-restriction admission policy), a few containerd daemons, and the controller
//! as a process with its ServiceAccount. For each N:
//!
//! - N Node objects, and per node a Pod-bound token of the agent ServiceAccount, so every
//!   simulated agent authenticates, is authorised and is admitted exactly as on a real node;
//! - N agents in this process (`imagegc::agent::run_embedded`, the agent's own code), each on
//!   its own containerd namespace holding one image;
//! - one ImageRemoval of that image targeting all N nodes, timed until it is Complete.
//!
//! The naive mode runs the same removal through N bench-only agents that each server-side
//! apply their entry into a `NaiveRemoval`'s `status.nodes` (field manager per node) and watch
//! `NaiveRemoval`s as imagegc's agents watch ImageRemovals. It lives here, not in the product.
//!
//! Figures per run, from the difference of the API server's `/metrics` before and after:
//! writes and bytes written (request bodies), watch events sent and their bytes, HTTP 429s;
//! plus the largest object, per-node completion p50/p99 and the controller's memory. The bench's
//! own requests and watches are counted and named in the output.
//!
//! Then, at the largest N, a scheduled ImagePrunePolicy (dry run, every minute) fires on every
//! node, once with the agents' per-node offset off and once with a 30-second window: when each
//! node ran (the `lastRun` of its report entry), the peak of runs in one second, the writes
//! and any 429, side by side.
//!
//! `IMAGEGC_SCALE_NODES` (default `100,1000`) and `IMAGEGC_SCALE_NAIVE_MAX` (default 100: the
//! naive mode's watch traffic grows with N², and beyond that it is extrapolated) choose the runs;
//! `IMAGEGC_SCALE_POLICY=0` skips the policy phase.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use imagegc::agent::{AgentArgs, report};
use imagegc::api::{ImagePrunePolicy, ImageRemoval, NodeImageReport};
use imagegc::containerd::{self, Runtime};
use imagegc::core::plan::{self, Request};
use imagegc::core::platform::{Matcher, Platform};
use imagegc::runtime::{Backend, RuntimeArgs};
use imagegc::serve::{LogFormat, Shutdown, Trigger};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use testbed::image::{BuiltImage, ImageBuilder};
use testbed::process::{Proc, free_port};
use testbed::{Flavor, Options, TestBed};
use tokio::task::JoinSet;

const SYSTEM_NS: &str = "imagegc-system";
const AGENT_SA: &str = "imagegc-agent";
const CONTROLLER_SA: &str = "imagegc-controller";
/// Label every simulated Node carries; the removals select it.
const SIM_LABEL: &str = "bench.imagegc.dev/simulated";
/// The image every simulated node holds and every removal removes.
const TAG: &str = "docker.io/library/scale:1";
/// containerd daemons the simulated nodes are spread over (each GC walks one daemon's
/// namespaces: one daemon for all N would make every removal's collection O(N)).
const DAEMONS: usize = 4;
/// How long one phase (start, removal) may take before the run fails.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);
/// Quiet period after a removal completes, so trailing writes (the controller's last status
/// write, Events) are counted.
const SETTLE: Duration = Duration::from_secs(3);

/// Open files this process (and the API server it starts) asks for: enough for 10,000 nodes.
const OPEN_FILES: u64 = 65_536;

/// Targets, per node and per removal.
const TARGET_WRITES_PER_NODE: f64 = 2.0;
const TARGET_BYTES_PER_NODE: f64 = 2048.0;
const TARGET_LARGEST_OBJECT: usize = 64 * 1024;
const TARGET_P99_AT_1000: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    // Every simulated agent holds three descriptors in this process (one HTTP/2 connection to
    // the API server, two to containerd: requests and its event stream) and one in the API
    // server, which inherits the limit.
    match testbed::process::raise_open_files(OPEN_FILES) {
        Ok(limit) if limit < OPEN_FILES => {
            eprintln!(
                "bench scale: open files limited to {limit}: about {} nodes fit",
                limit / 3
            )
        }
        Ok(_) => {}
        Err(e) => eprintln!("bench scale: could not raise the open-file limit: {e}"),
    }
    let result = testbed::run_bench(run());
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("bench scale: a target is missed (see MISSES above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench scale: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn node_counts() -> Result<Vec<usize>> {
    let raw = std::env::var("IMAGEGC_SCALE_NODES").unwrap_or_else(|_| "100,1000".into());
    let mut ns = raw
        .split(',')
        .map(|n| n.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("IMAGEGC_SCALE_NODES={raw:?}: write node counts like 100,1000"))?;
    ns.sort();
    ensure!(
        ns.first().is_some_and(|&n| n > 0),
        "IMAGEGC_SCALE_NODES is empty"
    );
    Ok(ns)
}

fn naive_max() -> usize {
    std::env::var("IMAGEGC_SCALE_NAIVE_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Imagegc,
    Naive,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Imagegc => "imagegc",
            Mode::Naive => "naive",
        }
    }
}

/// One simulated node: its Node name, containerd socket and namespace, and the agent's client.
struct SimNode {
    name: String,
    socket: PathBuf,
    namespace: String,
    client: Client,
}

impl SimNode {
    /// The flags of this node's embedded agent, with a scheduled-policy jitter window of
    /// `jitter` seconds (watermarks are not exercised: `image_fs` only needs to exist).
    fn agent_args(&self, jitter: u32) -> AgentArgs {
        AgentArgs {
            node_name: self.name.clone(),
            runtime: RuntimeArgs {
                socket: Some(self.socket.clone()),
                runtime: Backend::Containerd,
                namespace: self.namespace.clone(),
            },
            listen: ([127, 0, 0, 1], 0).into(),
            inventory_interval: Duration::from_secs(300),
            log_format: LogFormat::Text,
            protect: Vec::new(),
            own_image: None,
            image_fs: self.socket.clone(),
            prune_max_jitter_seconds: jitter,
            watermark_check: Duration::from_secs(30),
            prune_min_image_age_seconds: 0,
            allow_force: false,
        }
    }
}

struct Bench {
    // Processes first: they stop before the bed they use.
    controller: Proc,
    admin: Client,
    nodes: Vec<SimNode>,
    image: BuiltImage,
    bed: TestBed,
}

async fn run() -> Result<bool> {
    let counts = node_counts()?;
    let naive_max = naive_max();
    let mut bench = Bench::start().await?;
    println!(
        "bench scale: {} containerd daemons, kube-apiserver and etcd on this machine ({} cores); N = {counts:?}; naive mode up to N = {naive_max}",
        DAEMONS,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut runs = Vec::new();
    let mut policy_runs = Vec::new();
    for &n in &counts {
        bench.ensure_nodes(n).await?;
        for mode in [Mode::Imagegc, Mode::Naive] {
            if mode == Mode::Naive && n > naive_max {
                continue;
            }
            let run = bench.measure(n, mode).await?;
            run.print();
            runs.push(run);
        }
    }
    if std::env::var("IMAGEGC_SCALE_POLICY").as_deref() != Ok("0")
        && let Some(&n) = counts.iter().max()
    {
        for jitter in POLICY_JITTERS {
            let run = bench.measure_policy(n, jitter).await?;
            run.print();
            policy_runs.push(run);
        }
    }
    let ok = summarise(&runs);
    summarise_policies(&policy_runs);
    Ok(ok)
}

/// The agents' jitter windows the policy phase compares (seconds).
const POLICY_JITTERS: [u32; 2] = [0, 30];

/// One scheduled policy firing on N nodes.
struct PolicyPhase {
    n: usize,
    jitter: u32,
    /// Seconds from the scheduled minute to each node's run, sorted.
    offsets: Vec<i64>,
    /// The most runs in one second.
    peak: usize,
    delta: Metrics,
}

impl PolicyPhase {
    fn writes(&self) -> f64 {
        self.delta.sum("apiserver_request_total", |l| {
            is_write(l) && l.get("group").is_some_and(|g| g == "imagegc.dev")
        })
    }

    fn policy_status_writes(&self) -> f64 {
        self.delta.sum("apiserver_request_total", |l| {
            is_write(l)
                && l.get("resource").is_some_and(|r| r == "imageprunepolicies")
                && l.get("subresource").is_some_and(|s| s == "status")
        })
    }

    fn too_many_requests(&self) -> f64 {
        self.delta.sum("apiserver_request_total", |l| {
            l.get("code").is_some_and(|c| c == "429")
        })
    }

    fn print(&self) {
        let last = self.offsets.last().copied().unwrap_or(0);
        println!(
            "policy N={} jitter window {} s: every node ran within {} s of the scheduled minute (first {} s, median {} s); peak {} runs in one second; {:.0} writes to imagegc.dev ({:.2}/node, {:.0} of them the policy's status); {:.0} HTTP 429",
            self.n,
            self.jitter,
            last,
            self.offsets.first().copied().unwrap_or(0),
            self.offsets
                .get(self.offsets.len() / 2)
                .copied()
                .unwrap_or(0),
            self.peak,
            self.writes(),
            self.writes() / self.n as f64,
            self.policy_status_writes(),
            self.too_many_requests(),
        );
    }
}

fn summarise_policies(runs: &[PolicyPhase]) {
    if runs.is_empty() {
        return;
    }
    println!();
    println!("== scheduled policy: the same minute on every node ==");
    println!(
        "| N | jitter window s | all ran within s | peak runs/s | writes/node | policy status writes | 429s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in runs {
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.0} | {:.0} |",
            r.n,
            r.jitter,
            r.offsets.last().copied().unwrap_or(0),
            r.peak,
            r.writes() / r.n as f64,
            r.policy_status_writes(),
            r.too_many_requests()
        );
    }
}

impl Bench {
    async fn start() -> Result<Bench> {
        let bed = TestBed::start(&Options {
            nodes: DAEMONS,
            flavor: Flavor::V2,
            cluster: true,
            real_node: false,
        })
        .await?;
        let cluster = bed.cluster()?;
        let root = testbed::tools::repo_root();
        cluster
            .apply(&root.join("deploy/imagegc.yaml"), PHASE_TIMEOUT)
            .await?;
        let naive = bed.dir().join("naive.yaml");
        std::fs::write(&naive, NAIVE_MANIFEST)?;
        cluster.apply(&naive, PHASE_TIMEOUT).await?;
        let admin = cluster.admin_client().await?;
        wait_until("the CRDs serve", || async {
            let a = Api::<ImageRemoval>::all(admin.clone())
                .list(&ListParams::default())
                .await;
            let b = naive_api(admin.clone()).list(&ListParams::default()).await;
            Ok((a.is_ok() && b.is_ok()).then_some(()))
        })
        .await?;

        let token = cluster
            .service_account_token(SYSTEM_NS, CONTROLLER_SA, None)
            .await?;
        let kubeconfig = cluster.token_kubeconfig("controller.kubeconfig", &token)?;
        let controller = Proc::spawn(
            "controller",
            Path::new(env!("CARGO_BIN_EXE_imagegc")),
            &[
                "controller".to_string(),
                "--listen".into(),
                format!("127.0.0.1:{}", free_port()?),
                "--lease-namespace".into(),
                SYSTEM_NS.into(),
                "--identity".into(),
                "controller-0".into(),
            ],
            &[
                ("KUBECONFIG".to_string(), kubeconfig.display().to_string()),
                ("IMAGEGC_LOG".into(), "warn".into()),
            ],
            bed.dir(),
            &bed.dir().join("controller.log"),
        )?;
        Ok(Bench {
            controller,
            admin,
            nodes: Vec::new(),
            image: ImageBuilder::new("scale").layer_sizes(&[4096]).build(),
            bed,
        })
    }

    /// Creates Nodes, Pods and Pod-bound agent tokens up to `n` simulated nodes.
    async fn ensure_nodes(&mut self, n: usize) -> Result<()> {
        let started = Instant::now();
        let have = self.nodes.len();
        let cluster = self.bed.cluster()?;
        let nodes = Api::<Node>::all(self.admin.clone());
        let pods = Api::<Pod>::namespaced(self.admin.clone(), SYSTEM_NS);
        for i in have..n {
            let name = format!("sim-{i:05}");
            let node: Node = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": {SIM_LABEL: "true"}},
            }))?;
            nodes.create(&PostParams::default(), &node).await?;
            let pod: Pod = serde_json::from_value(serde_json::json!({
                // Named as the DaemonSet controller names the agent's pods (the admission
                // policy requires it).
                "metadata": {"generateName": "imagegc-agent-", "namespace": SYSTEM_NS},
                "spec": {"nodeName": name, "serviceAccountName": AGENT_SA,
                         "automountServiceAccountToken": false,
                         "containers": [{"name": "agent", "image": "imagegc:bench"}]}
            }))?;
            let pod = pods.create(&PostParams::default(), &pod).await?;
            let uid = pod.uid().context("pod uid")?;
            let token = cluster
                .service_account_token(SYSTEM_NS, AGENT_SA, Some((&pod.name_any(), &uid)))
                .await?;
            let kubeconfig = cluster.token_kubeconfig(&format!("{name}.kubeconfig"), &token)?;
            let daemon = &self.bed.nodes[i % DAEMONS];
            self.nodes.push(SimNode {
                // The agent's own HTTP stack: one HTTP/2 connection per agent.
                client: imagegc::kube_client::from_config(
                    testbed::cluster::config_from_kubeconfig(&kubeconfig).await?,
                )?,
                socket: daemon.socket.clone(),
                namespace: name.clone(),
                name,
            });
        }
        if n > have {
            println!(
                "  created {} Nodes, Pods and agent tokens in {:.1} s",
                n - have,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    /// Imports the image into the first `n` nodes' namespaces, 8 at a time.
    async fn seed(&self, n: usize) -> Result<()> {
        let names = [TAG.to_string()];
        let labels = HashMap::new();
        let mut imports = futures::stream::iter(self.nodes[..n].iter().map(|node| {
            testbed::image::import(&node.socket, &node.namespace, &self.image, &names, &labels)
        }))
        .buffer_unordered(8);
        while let Some(r) = imports.next().await {
            r?;
        }
        Ok(())
    }

    /// Checks that the image is gone from the first `n` nodes.
    async fn assert_removed(&self, n: usize) -> Result<()> {
        for node in &self.nodes[..n] {
            let names = testbed::image::image_names(&node.socket, &node.namespace).await?;
            ensure!(names.is_empty(), "{} still holds {names:?}", node.name);
        }
        Ok(())
    }

    async fn measure(&self, n: usize, mode: Mode) -> Result<Run> {
        self.seed(n).await?;
        let boot = Metrics::scrape(self.bed.cluster()?)?;
        let idle = self.open_files()?;
        let (trigger, shutdown) = Shutdown::manual();
        let mut agents = JoinSet::new();
        let received: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::default()).collect();
        for (i, node) in self.nodes[..n].iter().enumerate() {
            match mode {
                Mode::Imagegc => {
                    let args = node.agent_args(300);
                    let (client, shutdown) = (node.client.clone(), shutdown.clone());
                    agents.spawn(async move {
                        imagegc::agent::run_embedded(client, args, shutdown)
                            .await
                            .map_err(anyhow::Error::from)
                    });
                }
                Mode::Naive => {
                    agents.spawn(naive_agent(
                        node.client.clone(),
                        node.name.clone(),
                        node.socket.clone(),
                        node.namespace.clone(),
                        received[i].clone(),
                        shutdown.clone(),
                    ));
                }
            }
        }
        let stopped = Stopper {
            trigger,
            agents: Some(agents),
        };
        let result = self
            .measure_with_agents(n, mode, &received, (&boot, idle))
            .await;
        stopped.stop().await?;
        let run = result?;
        self.assert_removed(n).await?;
        self.clean_up(mode).await?;
        Ok(run)
    }

    /// N agents with a jitter window of `jitter` seconds; a dry-run policy scheduled every
    /// minute on all of them; waits until every node has run it once.
    async fn measure_policy(&self, n: usize, jitter: u32) -> Result<PolicyPhase> {
        let started = k8s_openapi::jiff::Timestamp::now().as_second();
        let (trigger, shutdown) = Shutdown::manual();
        let mut agents = JoinSet::new();
        for node in &self.nodes[..n] {
            let args = node.agent_args(jitter);
            let (client, shutdown) = (node.client.clone(), shutdown.clone());
            agents.spawn(async move {
                imagegc::agent::run_embedded(client, args, shutdown)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        let stopped = Stopper {
            trigger,
            agents: Some(agents),
        };
        let result = self.measure_policy_with_agents(n, jitter, started).await;
        stopped.stop().await?;
        let name = format!("sched-{jitter}-{n}");
        Api::<ImagePrunePolicy>::all(self.admin.clone())
            .delete(&name, &DeleteParams::default())
            .await?;
        result
    }

    async fn measure_policy_with_agents(
        &self,
        n: usize,
        jitter: u32,
        started: i64,
    ) -> Result<PolicyPhase> {
        let reports = Api::<NodeImageReport>::all(self.admin.clone());
        // Every agent writes its report when it starts: wait until all of them did.
        wait_until(
            "every agent's NodeImageReport written by this phase's agents",
            || async {
                let list = reports.list(&ListParams::default()).await?;
                let fresh = list
                    .items
                    .iter()
                    .filter(|r| {
                        r.status
                            .as_ref()
                            .and_then(|s| s.updated.as_ref())
                            .is_some_and(|t| t.0.as_second() >= started)
                    })
                    .count();
                Ok((fresh >= n).then_some(()))
            },
        )
        .await?;
        tokio::time::sleep(SETTLE).await;
        // Not in the last seconds of a minute: the agents must see the policy before the tick.
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        if now % 60 > 45 {
            tokio::time::sleep(Duration::from_secs((62 - now % 60) as u64)).await;
        }
        let cluster = self.bed.cluster()?;
        let before = Metrics::scrape(cluster)?;
        let name = format!("sched-{jitter}-{n}");
        let policy: ImagePrunePolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImagePrunePolicy",
            "metadata": {"name": name},
            "spec": {
                "schedule": "* * * * *", "dryRun": true,
                "nodeSelector": {"matchLabels": {SIM_LABEL: "true"}},
            },
        }))?;
        let created = k8s_openapi::jiff::Timestamp::now().as_second();
        Api::<ImagePrunePolicy>::all(self.admin.clone())
            .create(&PostParams::default(), &policy)
            .await?;
        let tick = created - created % 60 + 60;
        let runs = tokio::time::timeout(PHASE_TIMEOUT, async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let list = reports.list(&ListParams::default()).await?;
                let runs: Vec<i64> = list
                    .items
                    .iter()
                    .filter_map(|r| {
                        r.status
                            .as_ref()?
                            .policies
                            .iter()
                            .find(|p| p.name == name)?
                            .last_run
                            .as_ref()
                            .map(|t| t.0.as_second())
                    })
                    .filter(|at| *at < tick + 60)
                    .collect();
                if runs.len() >= n {
                    return Ok::<_, anyhow::Error>(runs);
                }
            }
        })
        .await
        .with_context(|| format!("{name}: not every node ran in {PHASE_TIMEOUT:?}"))??;
        tokio::time::sleep(SETTLE).await;
        let after = Metrics::scrape(cluster)?;
        let mut offsets: Vec<i64> = runs.iter().map(|at| at - tick).collect();
        offsets.sort();
        let mut per_second: BTreeMap<i64, usize> = BTreeMap::new();
        for o in &offsets {
            *per_second.entry(*o).or_default() += 1;
        }
        Ok(PolicyPhase {
            n,
            jitter,
            peak: per_second.values().copied().max().unwrap_or(0),
            offsets,
            delta: after.minus(&before),
        })
    }

    async fn measure_with_agents(
        &self,
        n: usize,
        mode: Mode,
        received: &[Arc<AtomicU64>],
        (boot, idle): (&Metrics, OpenFiles),
    ) -> Result<Run> {
        let started = Instant::now();
        if mode == Mode::Imagegc {
            // Every agent writes its report once at start: wait for all of them.
            let reports = Api::<NodeImageReport>::all(self.admin.clone());
            wait_until("every agent's first NodeImageReport", || async {
                let list = reports.list_metadata(&ListParams::default()).await?;
                Ok((list.items.len() >= n).then_some(()))
            })
            .await?;
        }
        let start_secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(SETTLE).await;
        let running = self.open_files()?;

        let cluster = self.bed.cluster()?;
        let before = Metrics::scrape(cluster)?;
        let cpu_before = self.cpu();
        let name = format!("{}-{n}", mode.label());
        let spec = serde_json::json!({
            "images": [TAG],
            "nodeSelector": {"matchLabels": {SIM_LABEL: "true"}},
        });
        let (observer, seen) = observe(self.admin.clone(), mode, name.clone(), n);
        let created = Instant::now();
        match mode {
            Mode::Imagegc => {
                let removal: ImageRemoval = serde_json::from_value(serde_json::json!({
                    "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImageRemoval",
                    "metadata": {"name": name}, "spec": spec,
                }))?;
                Api::<ImageRemoval>::all(self.admin.clone())
                    .create(&PostParams::default(), &removal)
                    .await?;
            }
            Mode::Naive => {
                let removal: DynamicObject = serde_json::from_value(serde_json::json!({
                    "apiVersion": "bench.imagegc.dev/v1alpha1", "kind": "NaiveRemoval",
                    "metadata": {"name": name}, "spec": spec,
                }))?;
                naive_api(self.admin.clone())
                    .create(&PostParams::default(), &removal)
                    .await?;
            }
        }
        let observed = tokio::time::timeout(PHASE_TIMEOUT, observer)
            .await
            .with_context(|| format!("{name} did not complete in {PHASE_TIMEOUT:?}"))???;
        let cpu = Cpu::between(&cpu_before, &self.cpu(), created.elapsed());
        let done = self.open_files()?;
        tokio::time::sleep(SETTLE).await;
        let after = Metrics::scrape(cluster)?;
        let delta = after.minus(&before);

        let largest = self.largest_object(mode, &name).await?;
        let pods = match mode {
            Mode::Imagegc => Some(self.pod_watch_cost(n, before.minus(boot), &before).await?),
            Mode::Naive => None,
        };
        let bench_events = seen.load(Ordering::Relaxed);
        let mut per_node = observed.per_node.clone();
        per_node.sort();
        let agent_events: Vec<u64> = received.iter().map(|r| r.load(Ordering::Relaxed)).collect();
        Ok(Run {
            n,
            mode,
            start_secs,
            complete: observed.complete.duration_since(created),
            p50: percentile(&per_node, 0.5),
            p99: percentile(&per_node, 0.99),
            delta,
            bench_events,
            agent_events,
            largest,
            controller_rss_kib: testbed::process::status_kib(self.controller.pid(), "VmRSS")
                .unwrap_or(0),
            pods,
            cpu,
            files: [idle, running, done],
        })
    }

    /// Open files of this process (the agents') and of the API server, and this process's
    /// connections to the API server.
    fn open_files(&self) -> Result<OpenFiles> {
        let cluster = self.bed.cluster()?;
        let port = cluster.port()?;
        let apiserver = cluster
            .apiserver_pid()
            .context("kube-apiserver is not running")?;
        let me = std::process::id();
        Ok(OpenFiles {
            bench: testbed::sockets::open_files(me)?,
            bench_to_apiserver: testbed::sockets::connections_to(me, port)?
                .iter()
                .map(|c| c.local_port)
                .collect(),
            apiserver: testbed::sockets::open_files(apiserver)?,
        })
    }

    /// CPU seconds used so far by each process of the bed, the agents' (this process) included.
    fn cpu(&self) -> Vec<(&'static str, f64)> {
        let mut out: Vec<(&'static str, f64)> = Vec::new();
        if let Ok(cluster) = self.bed.cluster() {
            for (name, proc) in cluster.processes() {
                out.push((name, proc.cpu_seconds().unwrap_or(0.0)));
            }
        }
        let containerd = self
            .bed
            .nodes
            .iter()
            .filter_map(|d| testbed::process::cpu_seconds(d.pid()?))
            .sum();
        out.push(("containerd (4 daemons)", containerd));
        out.push(("controller", self.controller.cpu_seconds().unwrap_or(0.0)));
        out.push((
            "agents (this process)",
            testbed::process::cpu_seconds(std::process::id()).unwrap_or(0.0),
        ));
        out
    }

    /// What the agents' watch of their node's pods costs the API server: the requests it made
    /// while the agents started (`start`, ending at `running`), then one pod created on every
    /// node and deleted again, with the watch events, writes and API-server CPU that caused.
    async fn pod_watch_cost(
        &self,
        n: usize,
        start: Metrics,
        running: &Metrics,
    ) -> Result<PodWatchCost> {
        let cluster = self.bed.cluster()?;
        let pods = Api::<Pod>::namespaced(self.admin.clone(), CHURN_NS);
        let before = Metrics::scrape(cluster)?;
        let started = Instant::now();
        let mut creates = futures::stream::iter(self.nodes[..n].iter().map(|node| {
            let pod: Result<Pod, _> = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("churn-{}", node.name),
                             "labels": {CHURN_LABEL: "true"}},
                "spec": {"nodeName": node.name, "serviceAccountName": AGENT_SA,
                         "automountServiceAccountToken": false,
                         "containers": [{"name": "app", "image": "docker.io/library/churn:1"}]}
            }));
            let pods = pods.clone();
            async move { anyhow::Ok(pods.create(&PostParams::default(), &pod?).await?) }
        }))
        .buffer_unordered(16);
        while let Some(created) = creates.next().await {
            created?;
        }
        let churn = ListParams::default().labels(&format!("{CHURN_LABEL}=true"));
        pods.delete_collection(&DeleteParams::default().grace_period(0), &churn)
            .await?;
        wait_until("the churn pods are deleted", || async {
            let left = pods.list_metadata(&churn).await?;
            Ok(left.items.is_empty().then_some(()))
        })
        .await?;
        let churn_secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(SETTLE).await;
        let after = Metrics::scrape(cluster)?;
        Ok(PodWatchCost {
            n,
            start,
            open_watches: running.sum("apiserver_longrunning_requests", |l| {
                on_pods(l) && l.get("verb").is_some_and(|v| v == "WATCH")
            }),
            churn: after.minus(&before),
            churn_secs,
        })
    }

    /// The largest object of the run, as the API server returns it (managedFields included):
    /// the removal itself, or (imagegc) the largest NodeImageReport.
    async fn largest_object(&self, mode: Mode, name: &str) -> Result<(String, usize)> {
        let mut largest = match mode {
            Mode::Imagegc => {
                let r = Api::<ImageRemoval>::all(self.admin.clone())
                    .get(name)
                    .await?;
                (
                    format!("ImageRemoval {name}"),
                    serde_json::to_vec(&r)?.len(),
                )
            }
            Mode::Naive => {
                let r = naive_api(self.admin.clone()).get(name).await?;
                (
                    format!("NaiveRemoval {name}"),
                    serde_json::to_vec(&r)?.len(),
                )
            }
        };
        if mode == Mode::Imagegc {
            let reports = Api::<NodeImageReport>::all(self.admin.clone())
                .list(&ListParams::default())
                .await?;
            for r in reports.items {
                let size = serde_json::to_vec(&r)?.len();
                if size > largest.1 {
                    largest = (format!("NodeImageReport {}", r.name_any()), size);
                }
            }
        }
        Ok(largest)
    }

    /// Deletes the run's removal and reports, so the next run starts from the same state.
    async fn clean_up(&self, mode: Mode) -> Result<()> {
        match mode {
            Mode::Imagegc => {
                let removals = Api::<ImageRemoval>::all(self.admin.clone());
                removals
                    .delete_collection(&DeleteParams::default(), &ListParams::default())
                    .await?;
                let reports = Api::<NodeImageReport>::all(self.admin.clone());
                reports
                    .delete_collection(&DeleteParams::default(), &ListParams::default())
                    .await?;
                wait_until("the reports are deleted", || async {
                    let left = reports.list_metadata(&ListParams::default()).await?;
                    Ok(left.items.is_empty().then_some(()))
                })
                .await
            }
            Mode::Naive => {
                naive_api(self.admin.clone())
                    .delete_collection(&DeleteParams::default(), &ListParams::default())
                    .await?;
                Ok(())
            }
        }
    }
}

/// Stops the agents of a run (on every path: the run's result is returned after).
struct Stopper {
    trigger: Trigger,
    agents: Option<JoinSet<Result<()>>>,
}

impl Stopper {
    async fn stop(mut self) -> Result<()> {
        self.trigger.stop();
        let mut agents = self.agents.take().context("agents")?;
        let stopped = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(done) = agents.join_next().await {
                done??;
            }
            Ok::<(), anyhow::Error>(())
        })
        .await;
        match stopped {
            Ok(r) => r,
            Err(_) => {
                agents.abort_all();
                bail!("agents did not stop within 60 s of the shutdown");
            }
        }
    }
}

/// What the bench's own watch saw of one removal.
struct Observed {
    /// When the removal was seen complete.
    complete: Instant,
    /// Per node: time from the start of the watch to the node's outcome appearing.
    per_node: Vec<Duration>,
}

/// Starts the bench's own watch of one run: NodeImageReports and the ImageRemoval (imagegc
/// mode), or the NaiveRemoval. Returns it and the count of events it receives, so they can be
/// told apart from the agents' and the controller's.
fn observe(
    admin: Client,
    mode: Mode,
    name: String,
    n: usize,
) -> (tokio::task::JoinHandle<Result<Observed>>, Arc<AtomicU64>) {
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();
    let task = tokio::spawn(async move {
        match mode {
            Mode::Imagegc => observe_imagegc(admin, &name, n, counter).await,
            Mode::Naive => observe_naive(admin, &name, n, counter).await,
        }
    });
    (task, seen)
}

async fn observe_imagegc(
    admin: Client,
    name: &str,
    n: usize,
    seen: Arc<AtomicU64>,
) -> Result<Observed> {
    let start = Instant::now();
    let reports = watcher(
        Api::<NodeImageReport>::all(admin.clone()),
        Default::default(),
    )
    .applied_objects()
    .map(Either::Report);
    let removals = watcher(
        Api::<ImageRemoval>::all(admin),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .applied_objects()
    .map(Either::Removal);
    let mut events = futures::stream::select(reports.boxed(), removals.boxed());
    let mut done: HashMap<String, Duration> = HashMap::new();
    let mut complete = None;
    while let Some(event) = events.next().await {
        seen.fetch_add(1, Ordering::Relaxed);
        match event {
            Either::Report(r) => {
                let r = r?;
                let finished = r
                    .status
                    .iter()
                    .flat_map(|s| &s.removals)
                    .any(|e| e.name == name);
                if finished {
                    done.entry(r.name_any()).or_insert_with(|| start.elapsed());
                }
            }
            Either::Removal(r) => {
                let r = r?;
                let status = r.status.unwrap_or_default();
                let is_complete = status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Complete" && c.status == "True");
                if is_complete && status.succeeded as usize == n {
                    complete.get_or_insert_with(Instant::now);
                }
            }
        }
        // The two streams are independent: the Complete status may arrive before this
        // watch has delivered the last reports.
        if let Some(complete) = complete
            && done.len() == n
        {
            return Ok(Observed {
                complete,
                per_node: done.into_values().collect(),
            });
        }
    }
    bail!("the watch ended")
}

enum Either<A, B> {
    Report(A),
    Removal(B),
}

async fn observe_naive(
    admin: Client,
    name: &str,
    n: usize,
    seen: Arc<AtomicU64>,
) -> Result<Observed> {
    let start = Instant::now();
    let mut events = watcher(
        naive_api(admin),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .applied_objects()
    .boxed();
    let mut done: HashMap<String, Duration> = HashMap::new();
    while let Some(r) = events.next().await {
        seen.fetch_add(1, Ordering::Relaxed);
        let r = r?;
        for entry in r.data["status"]["nodes"].as_array().into_iter().flatten() {
            if let Some(node) = entry["node"].as_str() {
                done.entry(node.to_string())
                    .or_insert_with(|| start.elapsed());
            }
        }
        if done.len() == n {
            return Ok(Observed {
                complete: Instant::now(),
                per_node: done.into_values().collect(),
            });
        }
    }
    bail!("the watch ended")
}

/// The naive agent: watches NaiveRemovals, runs each new one on its node with imagegc's own
/// engine, and server-side applies its entry (the same content as imagegc's per-node result)
/// into the removal's `status.nodes`, with a field manager of its own.
async fn naive_agent(
    client: Client,
    node: String,
    socket: PathBuf,
    namespace: String,
    received: Arc<AtomicU64>,
    mut shutdown: Shutdown,
) -> Result<()> {
    let api = naive_api(client);
    let mut events = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut done = HashSet::new();
    let matcher = Matcher::only(Platform::host());
    loop {
        let event = tokio::select! {
            _ = shutdown.wait() => return Ok(()),
            event = events.next() => event,
        };
        let Some(event) = event else { return Ok(()) };
        let removal = match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o,
            Ok(_) => continue,
            Err(_) => continue,
        };
        received.fetch_add(1, Ordering::Relaxed);
        let uid = removal.uid().unwrap_or_default();
        if !done.insert(uid.clone()) {
            continue;
        }
        let images: Vec<String> = serde_json::from_value(removal.data["spec"]["images"].clone())?;
        let rt = Runtime::connect(&socket, &namespace).await?;
        let inventory = rt.inventory(&matcher).await?;
        let plan = plan::plan(
            &Request {
                images,
                force: false,
                ..Default::default()
            },
            &inventory,
        );
        let executed = containerd::execute(&rt, plan.clone()).await?;
        let key = report::Key {
            name: removal.name_any(),
            uid,
            generation: removal.metadata.generation.unwrap_or(1),
        };
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let result = report::plan_entry(&key, &plan, false, executed.freed_bytes, now);
        let mut entry = serde_json::to_value(&result)?;
        entry["node"] = serde_json::json!(node);
        let patch = serde_json::json!({
            "apiVersion": "bench.imagegc.dev/v1alpha1", "kind": "NaiveRemoval",
            "status": {"nodes": [entry]},
        });
        api.patch_status(
            &key.name,
            &PatchParams::apply(&format!("naive-{node}")).force(),
            &Patch::Apply(&patch),
        )
        .await
        .with_context(|| format!("{node}: writing its entry"))?;
    }
}

fn naive_api(client: Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("bench.imagegc.dev", "v1alpha1", "NaiveRemoval");
    Api::all_with(
        client,
        &ApiResource::from_gvk_with_plural(&gvk, "naiveremovals"),
    )
}

/// The naive design's CRD (a removal whose status holds one entry per node, merged by node
/// name) and the agent ServiceAccount's permissions on it.
const NAIVE_MANIFEST: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: naiveremovals.bench.imagegc.dev
spec:
  group: bench.imagegc.dev
  scope: Cluster
  names: {plural: naiveremovals, singular: naiveremoval, kind: NaiveRemoval}
  versions:
  - name: v1alpha1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-preserve-unknown-fields: true
          status:
            type: object
            properties:
              nodes:
                type: array
                x-kubernetes-list-type: map
                x-kubernetes-list-map-keys: [node]
                items:
                  type: object
                  required: [node]
                  properties:
                    node: {type: string}
                  x-kubernetes-preserve-unknown-fields: true
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: imagegc-bench-naive
rules:
- apiGroups: [bench.imagegc.dev]
  resources: [naiveremovals]
  verbs: [get, list, watch]
- apiGroups: [bench.imagegc.dev]
  resources: [naiveremovals/status]
  verbs: [patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: imagegc-bench-naive
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: imagegc-bench-naive}
subjects:
- {kind: ServiceAccount, name: imagegc-agent, namespace: imagegc-system}
"#;

/// One Prometheus sample: name and labels, as a key, and the value.
#[derive(Clone, Debug, Default)]
struct Metrics(BTreeMap<(String, BTreeMap<String, String>), f64>);

impl Metrics {
    /// The API server's `/metrics` (read with kubectl as admin).
    fn scrape(cluster: &testbed::cluster::Cluster) -> Result<Metrics> {
        Ok(Metrics::parse(
            &cluster.kubectl(&["get", "--raw", "/metrics"])?,
        ))
    }

    fn parse(text: &str) -> Metrics {
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.insert((name.to_string(), labels), value);
        }
        Metrics(samples)
    }

    fn minus(&self, before: &Metrics) -> Metrics {
        Metrics(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v - before.0.get(k).copied().unwrap_or(0.0)))
                .collect(),
        )
    }

    /// Sum of `name` over the samples whose labels satisfy `keep`.
    fn sum(&self, name: &str, keep: impl Fn(&BTreeMap<String, String>) -> bool) -> f64 {
        self.0
            .iter()
            .filter(|((n, labels), _)| n == name && keep(labels))
            .map(|(_, v)| v)
            .sum()
    }

    /// Sum of `name` per value of label `by`, over the samples `keep` accepts.
    fn by(
        &self,
        name: &str,
        by: &str,
        keep: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for ((n, labels), v) in &self.0 {
            if n == name && keep(labels) && *v != 0.0 {
                *out.entry(labels.get(by).cloned().unwrap_or_default())
                    .or_default() += v;
            }
        }
        out
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let Some(end) = after.find('"') else { break };
        labels.insert(
            key.trim_start_matches(',').to_string(),
            after[..end].to_string(),
        );
        rest = &after[end + 1..];
    }
    labels
}

/// Verbs of `apiserver_request_total` that write.
fn is_write(labels: &BTreeMap<String, String>) -> bool {
    matches!(
        labels.get("verb").map(String::as_str),
        Some("POST" | "PUT" | "PATCH" | "APPLY" | "DELETE" | "DELETECOLLECTION")
    )
}

/// Verbs of `apiserver_request_body_size_bytes` that write.
fn is_write_body(labels: &BTreeMap<String, String>) -> bool {
    matches!(
        labels.get("verb").map(String::as_str),
        Some("create" | "update" | "patch" | "apply" | "delete")
    )
}

/// Figures of one run.
struct Run {
    n: usize,
    mode: Mode,
    /// Seconds until every agent had started and reported (imagegc mode).
    start_secs: f64,
    complete: Duration,
    p50: Duration,
    p99: Duration,
    delta: Metrics,
    /// Watch events the bench's own watch received (to subtract).
    bench_events: u64,
    /// Watch events each naive agent received (imagegc agents are counted by the API server).
    agent_events: Vec<u64>,
    largest: (String, usize),
    controller_rss_kib: u64,
    /// imagegc mode: what the agents' pod watch cost.
    pods: Option<PodWatchCost>,
    /// CPU each process used from the removal's creation to its completion.
    cpu: Cpu,
    /// Open files before the agents started, once they all ran, and at Complete.
    files: [OpenFiles; 3],
}

/// File descriptors of the bench process (where the simulated agents run) and the API server.
struct OpenFiles {
    bench: usize,
    /// The local ports of this process's TCP connections to the API server.
    bench_to_apiserver: HashSet<u16>,
    apiserver: usize,
}

impl OpenFiles {
    /// `idle` before the agents started, `running` once they all reported, `done` at Complete.
    fn print([idle, running, done]: &[OpenFiles; 3], n: usize) {
        let per = |a: usize, b: usize| (a as f64 - b as f64) / n as f64;
        let conns = |f: &OpenFiles| f.bench_to_apiserver.len();
        println!(
            "  open files with the {n} agents running: this process {} ({:.2} per agent; {} connections to the API server, {:.2} per agent), the API server {} ({:.2} per agent)",
            running.bench,
            per(running.bench, idle.bench),
            conns(running),
            per(conns(running), conns(idle)),
            running.apiserver,
            per(running.apiserver, idle.apiserver),
        );
        let kept = running
            .bench_to_apiserver
            .intersection(&done.bench_to_apiserver)
            .count();
        println!(
            "    of those {} connections, {kept} were still open at Complete ({} open then)",
            conns(running),
            conns(done)
        );
    }
}

/// CPU seconds per process over one phase, and the phase's wall time.
struct Cpu {
    used: Vec<(&'static str, f64)>,
    wall: Duration,
}

impl Cpu {
    fn between(
        before: &[(&'static str, f64)],
        after: &[(&'static str, f64)],
        wall: Duration,
    ) -> Cpu {
        let used = after
            .iter()
            .map(|(name, a)| {
                let b = before
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(0.0, |(_, b)| *b);
                (*name, a - b)
            })
            .collect();
        Cpu { used, wall }
    }

    fn total(&self) -> f64 {
        self.used.iter().map(|(_, s)| s).sum()
    }

    fn print(&self) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let parts: Vec<String> = self
            .used
            .iter()
            .map(|(name, s)| format!("{name} {s:.1}"))
            .collect();
        println!(
            "  CPU seconds from creation to Complete: {}; total {:.1} in {:.1} s on {cores} cores ({:.0} % of the machine)",
            parts.join(", "),
            self.total(),
            self.wall.as_secs_f64(),
            100.0 * self.total() / (self.wall.as_secs_f64() * cores as f64)
        );
    }
}

/// Namespace and label of the pods the pod-watch measurement creates and deletes (beside the
/// agents' own pods, with their ServiceAccount: the test bed runs no ServiceAccount controller).
const CHURN_NS: &str = SYSTEM_NS;
const CHURN_LABEL: &str = "bench.imagegc.dev/churn";

fn on_pods(labels: &BTreeMap<String, String>) -> bool {
    labels.get("resource").is_some_and(|r| r == "pods")
        && labels.get("subresource").is_none_or(|s| s.is_empty())
}

/// The API cost of N agents each watching the pods bound to its node.
struct PodWatchCost {
    n: usize,
    /// The API server's counters over the agents' start.
    start: Metrics,
    /// Pod watches open once the agents run.
    open_watches: f64,
    /// The API server's counters over one pod created and deleted on every node.
    churn: Metrics,
    churn_secs: f64,
}

impl PodWatchCost {
    fn pod_requests(m: &Metrics, verb: &str) -> f64 {
        m.sum("apiserver_request_total", |l| {
            on_pods(l) && l.get("verb").is_some_and(|v| v == verb)
        })
    }

    fn pod_events(m: &Metrics) -> (f64, f64) {
        let events = |name: &str| {
            m.sum(name, |l| {
                l.get("resource")
                    .or(l.get("kind"))
                    .is_some_and(|r| r == "pods" || r == "Pod")
            })
        };
        (
            events("apiserver_watch_events_total"),
            events("apiserver_watch_events_sizes_sum"),
        )
    }

    fn print(&self) {
        let n = self.n as f64;
        println!("  the agents' pod watch (field selector spec.nodeName):");
        println!(
            "    at start: {:.0} LIST of pods ({:.2} per agent), {:.0} pod watches open",
            Self::pod_requests(&self.start, "LIST"),
            Self::pod_requests(&self.start, "LIST") / n,
            self.open_watches
        );
        let (events, bytes) = Self::pod_events(&self.churn);
        let cpu = self.churn.sum("process_cpu_seconds_total", |_| true);
        let writes = self.churn.sum("apiserver_request_total", is_write);
        let by_agents = self.churn.sum("apiserver_request_total", |l| {
            is_write(l) && l.get("group").is_some_and(|g| g == "imagegc.dev")
        });
        println!(
            "    one pod created and deleted on each of {} nodes in {:.1} s: {:.0} pod watch events sent to all pod watchers ({:.1} per pod, {:.1} KiB), {:.0} writes ({:.0} by agents), API server CPU {:.1} s",
            self.n,
            self.churn_secs,
            events,
            events / n,
            bytes / 1024.0,
            writes,
            by_agents,
            cpu
        );
    }
}

impl Run {
    fn writes(&self) -> f64 {
        // The bench wrote one object: the removal.
        self.delta.sum("apiserver_request_total", is_write) - 1.0
    }

    fn bytes_written(&self) -> f64 {
        self.delta
            .sum("apiserver_request_body_size_bytes_sum", is_write_body)
    }

    fn too_many_requests(&self) -> f64 {
        self.delta.sum("apiserver_request_total", |l| {
            l.get("code").map(String::as_str) == Some("429")
        })
    }

    fn watch_events(&self) -> f64 {
        self.delta.sum("apiserver_watch_events_total", |_| true)
    }

    fn watch_bytes(&self) -> f64 {
        self.delta.sum("apiserver_watch_events_sizes_sum", |_| true)
    }

    /// Watch events per agent: counted by the naive agents themselves; for imagegc, the API
    /// server's events on the kinds agents watch (ImageRemovals; Nodes, filtered to their own)
    /// divided by the watchers of them (N agents, the controller, the bench).
    fn events_per_agent(&self) -> f64 {
        match self.mode {
            Mode::Naive => self.agent_events.iter().sum::<u64>() as f64 / self.n as f64,
            Mode::Imagegc => {
                let removals = self.delta.sum("apiserver_watch_events_total", |l| {
                    l.get("resource").or(l.get("kind")).is_some_and(|r| {
                        r.eq_ignore_ascii_case("imageremovals") || r == "ImageRemoval"
                    })
                });
                removals / (self.n + 2) as f64
            }
        }
    }

    fn print(&self) {
        let n = self.n as f64;
        println!();
        println!("== {} mode, N = {} nodes ==", self.mode.label(), self.n);
        if self.mode == Mode::Imagegc {
            println!("  agents started and reported in {:.1} s", self.start_secs);
        }
        println!(
            "  removal created → complete: {:.2} s; per node p50 {:.2} s, p99 {:.2} s",
            self.complete.as_secs_f64(),
            self.p50.as_secs_f64(),
            self.p99.as_secs_f64()
        );
        println!(
            "  API writes: {:.0} ({:.2} per node); bytes written {:.0} ({:.0} B per node)",
            self.writes(),
            self.writes() / n,
            self.bytes_written(),
            self.bytes_written() / n
        );
        for (resource, count) in self
            .delta
            .by("apiserver_request_total", "resource", is_write)
        {
            println!("    writes to {resource}: {count:.0}");
        }
        println!(
            "  watch events sent: {:.0} ({:.1} MiB), of which the bench's own watch received {}",
            self.watch_events(),
            self.watch_bytes() / 1048576.0,
            self.bench_events
        );
        for (resource, count) in self
            .delta
            .by("apiserver_watch_events_total", "resource", |_| true)
        {
            println!("    events on {resource}: {count:.0}");
        }
        println!(
            "  watch events received per agent: {:.1}",
            self.events_per_agent()
        );
        if self.mode == Mode::Naive {
            println!(
                "    (max over agents: {})",
                self.agent_events.iter().max().copied().unwrap_or(0)
            );
        }
        println!("  HTTP 429 responses: {:.0}", self.too_many_requests());
        let rejected =
            |l: &BTreeMap<String, String>| l.get("code").map(String::as_str) == Some("429");
        for (resource, count) in self
            .delta
            .by("apiserver_request_total", "resource", rejected)
        {
            println!("    429s on {resource}: {count:.0}");
        }
        for (level, count) in self.delta.by(
            "apiserver_flowcontrol_rejected_requests_total",
            "priority_level",
            |_| true,
        ) {
            println!(
                "    rejected by API Priority and Fairness in priority level {level}: {count:.0}"
            );
        }
        for (reason, count) in self.delta.by(
            "apiserver_flowcontrol_rejected_requests_total",
            "reason",
            |_| true,
        ) {
            println!("    rejection reason {reason}: {count:.0}");
        }
        println!(
            "  largest object: {} bytes ({}; {:.0} B per node)",
            self.largest.1,
            self.largest.0,
            self.largest.1 as f64 / n
        );
        println!(
            "  controller resident memory: {:.1} MiB",
            self.controller_rss_kib as f64 / 1024.0
        );
        self.cpu.print();
        OpenFiles::print(&self.files, self.n);
        if let Some(pods) = &self.pods {
            pods.print();
        }
    }
}

/// Prints the comparison and the targets; false if imagegc misses one.
fn summarise(runs: &[Run]) -> bool {
    println!();
    println!("== summary ==");
    println!(
        "| mode | N | complete s | node p50 s | node p99 s | writes/node | bytes/node | watch events | watch MiB | events/agent | largest object B | 429s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in runs {
        let n = r.n as f64;
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {:.0} |",
            r.mode.label(),
            r.n,
            r.complete.as_secs_f64(),
            r.p50.as_secs_f64(),
            r.p99.as_secs_f64(),
            r.writes() / n,
            r.bytes_written() / n,
            r.watch_events(),
            r.watch_bytes() / 1048576.0,
            r.events_per_agent(),
            r.largest.1,
            r.too_many_requests()
        );
    }
    let mut ok = true;
    let mut check = |what: String, pass: bool| {
        println!(
            "  {what}: {}",
            if pass {
                "meets target"
            } else {
                "MISSES target"
            }
        );
        ok &= pass;
    };
    for r in runs.iter().filter(|r| r.mode == Mode::Imagegc) {
        let n = r.n as f64;
        check(
            format!(
                "N={}: {:.2} writes per node ≤ {TARGET_WRITES_PER_NODE}",
                r.n,
                r.writes() / n
            ),
            r.writes() / n <= TARGET_WRITES_PER_NODE,
        );
        check(
            format!(
                "N={}: {:.0} B written per node ≤ {TARGET_BYTES_PER_NODE}",
                r.n,
                r.bytes_written() / n
            ),
            r.bytes_written() / n <= TARGET_BYTES_PER_NODE,
        );
        check(
            format!(
                "N={}: largest object {} B ≤ {TARGET_LARGEST_OBJECT}",
                r.n, r.largest.1
            ),
            r.largest.1 <= TARGET_LARGEST_OBJECT,
        );
        check(
            format!("N={}: {:.0} HTTP 429s = 0", r.n, r.too_many_requests()),
            r.too_many_requests() == 0.0,
        );
        if r.n >= 1000 {
            check(
                format!(
                    "N={}: per-node p99 {:.1} s ≤ {}",
                    r.n,
                    r.p99.as_secs_f64(),
                    TARGET_P99_AT_1000.as_secs()
                ),
                r.p99 <= TARGET_P99_AT_1000,
            );
        }
    }
    ok
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Polls `f` until it returns `Some`, for up to [`PHASE_TIMEOUT`].
async fn wait_until<T, F, Fut>(what: &str, f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    testbed::wait_for(what, PHASE_TIMEOUT, f).await
}
