//! `imagegc agent`: one per node (a DaemonSet). Watches ImageRemovals and its own Node,
//! executes the removals that target the node with the core engine, and server-side-applies
//! the node's NodeImageReport — the only object it writes. On containerd it also keeps each
//! image's first-seen and last-used labels (`core::last_used`) at every inventory pass.
//!
//! It also runs the ImagePrunePolicies that select the node (`policies`): at each policy's
//! scheduled time plus this node's offset, or when the image filesystem crosses a watermark.
//!
//! Idempotent: a removal is executed once per UID and generation; the report records which,
//! so a restarted agent skips what is done and finishes what an interruption left (the
//! engine's plan resumes records marked pending).

mod metrics;
pub mod pods;
pub mod policies;
pub mod report;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::registry::Registry;
use tokio::sync::Notify;

use crate::api::{
    ImagePrunePolicy, ImageRemoval, InventorySummary, NodeImageReport, NodeImageReportStatus,
    PolicyRun, RemovalPhase, RemovalResult,
};
use crate::containerd;
use crate::core::inventory::{ImageRecord, Inventory};
use crate::core::last_used;
use crate::core::plan::{self, Request};
use crate::core::platform::{Matcher, Platform};
use crate::core::prune::{Protected, Protections};
use crate::core::reference;
use crate::events::{Publisher, Severity};
use crate::runtime::{Backend, Connector, Runtime, RuntimeError};
use crate::serve::{self, Health, LogFormat, Shutdown};
use metrics::Metrics;
use report::Key;

/// Field manager of everything the agent writes.
pub const MANAGER: &str = "imagegc-agent";
/// Reporting controller name on the agent's Events.
const EVENT_CONTROLLER: &str = "imagegc.dev/agent";
/// First retry delay after a containerd error; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// An image in constant use has its last-used label rewritten at most this often (seconds).
const LAST_USED_REFRESH: i64 = 3600;

/// Flags of `imagegc agent`.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// This node's name (from the downward API: `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The runtime's gRPC socket (default: the first of the known sockets of containerd,
    /// k3s/RKE2, microk8s, k0s and CRI-O that answers).
    #[arg(long, env = "IMAGEGC_SOCKET")]
    pub socket: Option<std::path::PathBuf>,
    /// Which API to use: containerd's own, CRI (CRI-O, any CRI runtime), or auto
    /// (containerd's where the socket serves it, else CRI).
    #[arg(long, env = "IMAGEGC_RUNTIME", value_enum, default_value = "auto")]
    pub runtime: Backend,
    /// containerd namespace (the CRI plugin uses k8s.io; not used with CRI).
    #[arg(long, env = "IMAGEGC_NAMESPACE", default_value = containerd::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Address for /metrics, /livez and /readyz.
    #[arg(long, env = "IMAGEGC_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// How often the node's image inventory is re-read and, if it changed, reported.
    #[arg(long, value_parser = parse_seconds, default_value = "300")]
    pub inventory_interval_seconds: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// A glob over normalized references (`registry.k8s.io/pause:*`) that no policy may
    /// remove; repeatable (a glob may contain commas, as in `{a,b}`).
    #[arg(long = "protect")]
    pub protect: Vec<String>,
    /// The agent's own image: every tag and digest of its repository is protected.
    #[arg(long, env = "IMAGEGC_OWN_IMAGE")]
    pub own_image: Option<String>,
    /// A directory on containerd's image filesystem (its root): watermarks read the usage of
    /// the filesystem holding it.
    #[arg(long, env = "IMAGEGC_IMAGE_FS", default_value = "/var/lib/containerd")]
    pub image_fs: std::path::PathBuf,
    /// Scheduled policies run on this node at a fixed offset of up to this many seconds after
    /// each scheduled time (at most half the time to the next one), so a fleet spreads out.
    #[arg(long, default_value = "300")]
    pub prune_max_jitter_seconds: u32,
    /// How often the image filesystem's usage is compared with the watermarks.
    #[arg(long, value_parser = parse_seconds, default_value = "30")]
    pub watermark_check_seconds: Duration,
    /// No policy chooses an image created (or first seen) less than this many seconds ago, as
    /// the kubelet's `imageMinimumGCAge`: a freshly pulled image is about to be used.
    #[arg(long, default_value = "120")]
    pub prune_min_image_age_seconds: u32,
    /// Allow ImageRemovals with `force: true` to remove images that containers use. Off by
    /// default: a forced request is then refused on this node, with the reason in its report.
    /// Protected and pinned images are never removed, forced or not.
    #[arg(long, env = "IMAGEGC_ALLOW_FORCE")]
    pub allow_force: bool,
}

/// The protections of `args`: its globs, its own image's repository, and the minimum image
/// age of policies. A bad glob stops the agent at start, not at the first run.
pub fn protections(args: &AgentArgs) -> Result<Protections, String> {
    let mut exclude = args.protect.clone();
    if let Some(own) = args.own_image.as_deref().filter(|s| !s.is_empty()) {
        let name = reference::parse_normalized_named(own)
            .map_err(|e| format!("--own-image {own:?}: {e}"))?
            .name();
        exclude.push(format!("{name}:*"));
        exclude.push(format!("{name}@*"));
    }
    // Compiles the globs: a bad one stops the agent at start, not at the first run.
    Protected::new(&exclude).map_err(|e| format!("--protect: {e}"))?;
    Ok(Protections {
        exclude,
        min_image_age: i64::from(args.prune_min_image_age_seconds),
    })
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if n == 0 {
        return Err("must be at least 1 second".into());
    }
    Ok(Duration::from_secs(n))
}

/// Errors that stop the agent (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No Kubernetes client configuration.
    #[error(
        "no Kubernetes configuration: run in a pod with a ServiceAccount, or set KUBECONFIG ({0})"
    )]
    Config(#[source] kube::Error),
    /// The metrics endpoint could not be served.
    #[error("cannot serve /metrics on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// Flags that cannot be used.
    #[error("invalid flags: {0}")]
    Flags(String),
    /// The Kubernetes API refused a write.
    #[error("writing NodeImageReport {node}: {source}")]
    Report {
        /// The node.
        node: String,
        /// Why.
        source: kube::Error,
    },
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    serve::init_logging(args.log_format);
    let shutdown = Shutdown::on_signals().map_err(AgentError::Signals)?;
    let client = Client::try_default().await.map_err(AgentError::Config)?;

    let mut registry = Registry::with_prefix("imagegc_agent");
    let metrics = Metrics::register(&mut registry);
    let health = Health::default();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: args.listen,
            source,
        })?;
    tokio::spawn(serve::serve_on(
        listener,
        Arc::new(registry),
        health.clone(),
        shutdown.clone(),
    ));
    run_node(client, &args, metrics, health, shutdown).await
}

/// Runs one node's agent on `client` until `shutdown`, with no logging setup, no signal
/// handlers and no HTTP endpoint (`args.listen` and `args.log_format` are ignored): for
/// running many agents in one process, as the scale benchmark does.
pub async fn run_embedded(
    client: Client,
    args: AgentArgs,
    shutdown: Shutdown,
) -> Result<(), AgentError> {
    let metrics = Metrics::register(&mut Registry::default());
    run_node(client, &args, metrics, Health::default(), shutdown).await
}

async fn run_node(
    client: Client,
    args: &AgentArgs,
    metrics: Metrics,
    health: Health,
    shutdown: Shutdown,
) -> Result<(), AgentError> {
    let protections = protections(args).map_err(AgentError::Flags)?;
    let protected = Protected::new(&protections.exclude)
        .map_err(|e| AgentError::Flags(format!("--protect: {e}")))?;
    let changed = Arc::new(Notify::new());
    let policies = watch(
        crate::watch::tolerant::<ImagePrunePolicy>(client.clone(), watcher::Config::default()),
        changed.clone(),
        shutdown.clone(),
    );
    let removals = watch(
        crate::watch::tolerant::<ImageRemoval>(client.clone(), watcher::Config::default()),
        changed.clone(),
        shutdown.clone(),
    );
    let nodes = watch(
        watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={}", args.node_name)),
        ),
        changed.clone(),
        shutdown.clone(),
    );

    // The node's own pods: read when a removal or policy runs, so their changes (frequent:
    // every status update) wake nothing.
    let pods = watch(
        watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", args.node_name)),
        )
        .modify(pods::slim),
        Arc::new(Notify::new()),
        shutdown.clone(),
    );

    let connector = Connector::new(args.socket.clone(), args.runtime, &args.namespace);
    let stamp_due = Arc::new(AtomicBool::new(false));
    tokio::spawn(follow_container_creations(
        connector.clone(),
        stamp_due.clone(),
        changed.clone(),
        shutdown.clone(),
    ));

    let mut agent = Agent {
        reports: Api::all(client.clone()),
        events: Publisher::new(client, EVENT_CONTROLLER, &args.node_name),
        node: args.node_name.clone(),
        connector,
        matcher: Matcher::only(Platform::host()),
        runtime: None,
        pods: pods.clone(),
        entries: Vec::new(),
        done: HashSet::new(),
        created: false,
        inventory: None,
        inventory_due: Instant::now(),
        inventory_interval: args.inventory_interval_seconds,
        retries: HashMap::new(),
        warned_node_missing: false,
        containerd_ok: true,
        stamp_due,
        policy_entries: Vec::new(),
        planned: HashMap::new(),
        protections,
        protected,
        allow_force: args.allow_force,
        image_fs: args.image_fs.clone(),
        image_fs_ok: true,
        policy_failing: HashMap::new(),
        max_jitter: i64::from(args.prune_max_jitter_seconds),
        watermark_check: args.watermark_check_seconds,
        watermark_due: Instant::now(),
        metrics,
        health,
    };
    tracing::info!(
        node = %agent.node,
        socket = ?args.socket,
        runtime = args.runtime.as_str(),
        namespace = %args.namespace,
        "agent starting"
    );

    let mut stop = shutdown.clone();
    tokio::select! {
        _ = stop.wait() => return Ok(()),
        _ = async {
            // Not the policies: without their CRD (an upgrade that skipped it) removals must
            // still work; policies are evaluated once their watch has listed.
            // The pods too: until they are listed, an image a pod is about to start would
            // look unused.
            tokio::join!(
                removals.wait_until_ready(),
                nodes.wait_until_ready(),
                pods.wait_until_ready()
            )
        } => {}
    }
    tracing::info!("watches synced");
    agent.load_report().await;

    while !shutdown.requested() {
        let next = agent.reconcile(&removals, &nodes, &policies).await;
        let sleep = next.saturating_duration_since(Instant::now());
        tokio::select! {
            _ = stop.wait() => break,
            _ = changed.notified() => {
                // Let a burst of watch events settle into one pass.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ = tokio::time::sleep(sleep) => {}
        }
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// Follows the runtime's container creations until `shutdown`: each one sets `stamp_due` and
/// pings `changed`, so the image's last-used label is written within moments, not at the next
/// inventory pass. Reconnects with backoff when the runtime goes away. (containerd only: the
/// CRI backend sees containers at each inventory.)
async fn follow_container_creations(
    connector: Connector,
    stamp_due: Arc<AtomicBool>,
    changed: Arc<Notify>,
    mut shutdown: Shutdown,
) {
    let mut attempt = 0;
    while !shutdown.requested() {
        let subscribed = async {
            let rt = connector.connect(false).await?;
            rt.container_creations().await
        }
        .await;
        match subscribed {
            Ok(events) => {
                attempt = 0;
                let mut events = std::pin::pin!(events);
                loop {
                    tokio::select! {
                        _ = shutdown.wait() => return,
                        event = events.next() => match event {
                            Some(()) => {
                                stamp_due.store(true, Ordering::SeqCst);
                                changed.notify_one();
                            }
                            None => break,
                        },
                    }
                }
                tracing::debug!("container event stream ended; subscribing again");
            }
            Err(e) => {
                attempt += 1;
                tracing::debug!(error = %e, "cannot follow container events yet");
            }
        }
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(backoff(attempt.max(1))) => {}
        }
    }
}

/// Starts a reflector over `events` whose every change pings `changed`; it ends at
/// `shutdown`.
fn watch<K>(
    events: impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    changed: Arc<Notify>,
    mut shutdown: Shutdown,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, events)
        .modify(|o| o.managed_fields_mut().clear())
        .default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            let event = tokio::select! {
                _ = shutdown.wait() => break,
                event = stream.next() => event,
            };
            let Some(event) = event else { break };
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::warn!(
                    kind = %K::kind(&()),
                    error = %e,
                    "watch failed; retrying with backoff"
                ),
            }
        }
    });
    reader
}

struct Retry {
    attempts: u32,
    next: Instant,
}

struct Agent {
    reports: Api<NodeImageReport>,
    events: Publisher,
    node: String,
    connector: Connector,
    matcher: Matcher,
    runtime: Option<Runtime>,
    /// The node's own pods (slimmed): their images count as in use.
    pods: Store<Pod>,
    /// The report's removal entries as last written.
    entries: Vec<RemovalResult>,
    /// Every execution finished by this process or found in the report at start. Entries can
    /// leave the report (it is bounded); this set keeps them from running again.
    done: HashSet<Key>,
    /// Whether the report object (metadata and spec) has been applied by this process.
    created: bool,
    inventory: Option<InventorySummary>,
    inventory_due: Instant,
    inventory_interval: Duration,
    retries: HashMap<String, Retry>,
    warned_node_missing: bool,
    /// Whether the last containerd call succeeded (logs only the transitions).
    containerd_ok: bool,
    /// Set when a container was created: its image's last-used label is due.
    stamp_due: Arc<AtomicBool>,
    /// The report's policy entries as last written.
    policy_entries: Vec<PolicyRun>,
    /// When each scheduled policy (by UID) runs next on this node.
    planned: HashMap<String, policies::Planned>,
    /// What no policy may remove.
    protections: Protections,
    /// The protection globs, compiled: what no removal may take, forced or not.
    protected: Protected,
    /// Whether forced removals are enabled on this node.
    allow_force: bool,
    /// A directory on the image filesystem (watermarks).
    image_fs: std::path::PathBuf,
    /// Whether the last read of its usage worked (logs only the transitions).
    image_fs_ok: bool,
    /// Consecutive failed runs of each policy (by UID) on containerd: the backoff, and one
    /// Event per streak.
    policy_failing: HashMap<String, u32>,
    /// Seconds a scheduled run may be offset on this node.
    max_jitter: i64,
    watermark_check: Duration,
    watermark_due: Instant,
    metrics: Metrics,
    health: Health,
}

impl Agent {
    /// Reads the report this node's agent wrote before (e.g. before a restart).
    async fn load_report(&mut self) {
        match self.reports.get_opt(&self.node).await {
            Ok(Some(report)) => {
                if let Some(status) = report.status {
                    self.entries = status.removals;
                    self.inventory = status.inventory;
                    self.policy_entries = status.policies;
                }
                self.done.extend(self.entries.iter().map(|r| Key {
                    name: r.name.clone(),
                    uid: r.uid.clone(),
                    generation: r.generation,
                }));
                tracing::info!(
                    entries = self.entries.len(),
                    "read this node's existing NodeImageReport"
                );
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "reading this node's NodeImageReport failed"),
        }
    }

    /// One pass: execute what targets this node and is not done, drop entries of deleted
    /// removals, refresh the inventory when due. Returns when the next pass is due at the
    /// latest.
    async fn reconcile(
        &mut self,
        removals: &Store<ImageRemoval>,
        nodes: &Store<Node>,
        policies: &Store<ImagePrunePolicy>,
    ) -> Instant {
        let mut next = Instant::now() + self.inventory_interval;
        let Some(node) = nodes.state().into_iter().next() else {
            if !self.warned_node_missing {
                tracing::warn!(node = %self.node, "Node object not found; waiting for it");
                self.warned_node_missing = true;
            }
            self.health.set_ready(false);
            return next;
        };
        self.warned_node_missing = false;
        let labels: BTreeMap<String, String> = node.labels().clone();
        let node_uid = node.uid().unwrap_or_default();
        let node_excluded = report::node_excluded(&labels);

        let mut all = removals.state();
        all.sort_by(|a, b| {
            (a.creation_timestamp(), a.name_any()).cmp(&(b.creation_timestamp(), b.name_any()))
        });
        let live: BTreeSet<(String, String)> = all
            .iter()
            .map(|r| (r.name_any(), r.uid().unwrap_or_default()))
            .collect();

        let mut pending = Vec::new();
        for removal in &all {
            if removal.meta().deletion_timestamp.is_some() {
                continue;
            }
            match report::targets(removal.spec.node_selector.as_ref(), &labels) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::debug!(removal = %removal.name_any(), error = %e, "selector cannot be evaluated; the controller reports it");
                    continue;
                }
            }
            let key = key_of(removal);
            if self.done.contains(&key) || report::is_done(&self.entries, &key) {
                continue;
            }
            if let Some(retry) = self.retries.get(&key.uid)
                && retry.next > Instant::now()
            {
                next = next.min(retry.next);
                continue;
            }
            pending.push((key, removal.clone()));
        }

        let mut changed = false;
        for (key, removal) in pending {
            match self.execute(&key, &removal, node_excluded).await {
                Ok(result) => {
                    self.retries.remove(&key.uid);
                    self.done.insert(key.clone());
                    self.record(&result);
                    if result.phase == RemovalPhase::Failed {
                        let note = report::failure_summary(&self.node, &result);
                        self.events
                            .publish(
                                removal.as_ref(),
                                Severity::Warning,
                                "RemovalFailed",
                                "RemoveImages",
                                &note,
                            )
                            .await;
                    }
                    self.entries = report::merge(&self.entries, Some(result), &live);
                    changed = true;
                    // An execution changed the node's images: report them with it.
                    self.inventory_due = Instant::now();
                }
                Err(e) => {
                    let retry = self.retries.entry(key.uid.clone()).or_insert(Retry {
                        attempts: 0,
                        next: Instant::now(),
                    });
                    retry.attempts += 1;
                    let delay = backoff(retry.attempts);
                    retry.next = Instant::now() + delay;
                    next = next.min(retry.next);
                    self.metrics.runtime_error(&e);
                    tracing::warn!(
                        removal = %key.name,
                        attempt = retry.attempts,
                        retry_in_seconds = delay.as_secs(),
                        error = %e,
                        "removal failed on containerd; will retry"
                    );
                    if retry.attempts == 1 {
                        self.events
                            .publish(
                                removal.as_ref(),
                                Severity::Warning,
                                "ContainerdError",
                                "RemoveImages",
                                &format!("node {}: {e}; retrying with backoff", self.node),
                            )
                            .await;
                    }
                }
            }
        }

        // Entries of deleted (or re-created) removals go, from the report and from memory:
        // a removal that no longer exists cannot run again, so nothing needs to remember it.
        self.done
            .retain(|k| live.contains(&(k.name.clone(), k.uid.clone())));
        let live_uids: HashSet<&str> = live.iter().map(|(_, uid)| uid.as_str()).collect();
        self.retries
            .retain(|uid, _| live_uids.contains(uid.as_str()));
        let pruned = report::merge(&self.entries, None, &live);
        if pruned != self.entries {
            self.entries = pruned;
            changed = true;
        }

        if self.evaluate_policies(policies, &labels, &mut next).await {
            changed = true;
        }

        if self.stamp_due.swap(false, Ordering::SeqCst) && Instant::now() < self.inventory_due {
            // A container was created: label its image used now; the report waits for the
            // next pass (container churn must not turn into API writes).
            if let Err(e) = self.stamp_only().await {
                tracing::debug!(error = %e, "labelling images after a container creation failed");
            }
        }

        if Instant::now() >= self.inventory_due {
            self.inventory_due = Instant::now() + self.inventory_interval;
            match self.read_inventory().await {
                Ok(summary) => {
                    if self.inventory.as_ref() != Some(&summary) {
                        self.inventory = Some(summary);
                        changed = true;
                    }
                }
                Err(e) => {
                    // inventory() logged the transition; repeat only at debug level.
                    self.metrics.runtime_error(&e);
                    tracing::debug!(error = %e, "reading the image inventory failed");
                    self.inventory_due = Instant::now() + FIRST_BACKOFF * 2;
                }
            }
            next = next.min(self.inventory_due);
        }

        if changed || !self.created {
            match self.write_report(&node_uid).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "writing the NodeImageReport failed; will retry");
                    self.created = false;
                    next = next.min(Instant::now() + FIRST_BACKOFF * 2);
                }
            }
        }
        next
    }

    /// Connects (once) to the runtime, remembering a working connection; the choice of socket
    /// and backend is logged.
    async fn runtime(&mut self) -> Result<Runtime, RuntimeError> {
        if let Some(rt) = &self.runtime {
            return Ok(rt.clone());
        }
        let rt = self.connector.connect(true).await?;
        self.runtime = Some(rt.clone());
        Ok(rt)
    }

    /// Reads the node's images (and the records they were built from), the images of the
    /// node's pods counting as in use; a failure marks the agent not ready.
    async fn inventory(&mut self) -> Result<(Inventory, Vec<ImageRecord>), RuntimeError> {
        let result = async {
            let rt = self.runtime().await?;
            let (mut inv, records) = rt.inventory_and_records(&self.matcher).await?;
            pods::mark_in_use(&mut inv, self.pods.state().iter().map(|p| &**p));
            Ok((inv, records))
        }
        .await;
        let ok = result.is_ok();
        self.health.set_ready(ok);
        if ok != self.containerd_ok {
            match &result {
                Ok(_) => tracing::info!("the container runtime answers again"),
                Err(e) => tracing::warn!(
                    error = %e,
                    "the container runtime does not answer; not ready, retrying until it does"
                ),
            }
            self.containerd_ok = ok;
        }
        if !ok {
            // Reconnect next time: containerd may have restarted.
            self.runtime = None;
        }
        result
    }

    async fn read_inventory(&mut self) -> Result<InventorySummary, RuntimeError> {
        let (inv, records) = self.inventory().await?;
        let rt = self.runtime().await?;
        self.stamp_first_seen_and_last_used(&rt, &inv, &records)
            .await;
        let summary = InventorySummary {
            images: inv.images.len() as i32,
            bytes: rt.image_bytes().await?,
            pinned: inv.images.values().filter(|i| i.pinned).count() as i32,
            in_use: inv
                .images
                .values()
                .filter(|i| !i.used_by.is_empty())
                .count() as i32,
        };
        self.metrics.inventory(&summary);
        Ok(summary)
    }

    /// The labelling of [`Agent::stamp_first_seen_and_last_used`] alone, on a fresh inventory.
    async fn stamp_only(&mut self) -> Result<(), RuntimeError> {
        let (inv, records) = self.inventory().await?;
        let rt = self.runtime().await?;
        self.stamp_first_seen_and_last_used(&rt, &inv, &records)
            .await;
        Ok(())
    }

    /// Labels the records of new images with when they were first seen, and those of images
    /// in use with when they were last used (see `core::last_used`).
    async fn stamp_first_seen_and_last_used(
        &self,
        rt: &Runtime,
        inv: &Inventory,
        records: &[ImageRecord],
    ) {
        let stamps = last_used::stamps(
            inv,
            records,
            Timestamp::now().as_second(),
            LAST_USED_REFRESH,
        );
        if stamps.is_empty() {
            return;
        }
        let by_name: HashMap<&str, _> = records.iter().map(|r| (r.name.as_str(), r)).collect();
        for stamp in &stamps {
            let Some(record) = by_name.get(stamp.record.as_str()) else {
                continue;
            };
            if let Err(e) = rt.label_record(record, stamp.key, &stamp.value).await {
                // Deleted meanwhile (kubelet's GC, a removal): the next pass sees the truth.
                tracing::debug!(record = %stamp.record, error = %e, "labelling a record failed");
            }
        }
        tracing::debug!(
            labels = stamps.len(),
            "first-seen and last-used labels written"
        );
    }

    /// Plans and (unless a dry run) executes one removal on this node.
    async fn execute(
        &mut self,
        key: &Key,
        removal: &ImageRemoval,
        node_excluded: bool,
    ) -> Result<RemovalResult, RuntimeError> {
        let spec = &removal.spec;
        let allowed = report::Allowed {
            force: self.allow_force,
            node_excluded,
        };
        if let Some(refusal) = report::refusal(&spec.images, spec.force, allowed) {
            tracing::warn!(removal = %key.name, outcome = refusal.outcome, reason = %refusal.reason, "removal refused");
            return Ok(report::refused(
                key,
                &spec.images,
                spec.dry_run,
                &refusal,
                now(),
            ));
        }
        let started = Instant::now();
        let (inv, _) = self.inventory().await?;
        let plan = plan::plan(
            &Request {
                images: spec.images.clone(),
                force: spec.force,
                protected: self.protected.clone(),
            },
            &inv,
        );
        let mut freed = 0;
        if !spec.dry_run && !report::blocked(&plan) {
            let rt = self.runtime().await?;
            let executed = rt.execute(plan.clone()).await;
            let executed = match executed {
                Ok(done) => done,
                Err(e) => {
                    self.runtime = None;
                    self.health.set_ready(false);
                    return Err(e);
                }
            };
            freed = executed.freed_bytes;
            tracing::info!(
                removal = %key.name,
                generation = key.generation,
                deleted = executed.deleted.len(),
                already_gone = executed.already_gone.len(),
                resumed = executed.plan.resumed.len(),
                freed_bytes = freed,
                "removal executed"
            );
        }
        let result = report::result(key, &plan, spec.dry_run, freed, now());
        self.metrics.executed(&result, started.elapsed());
        tracing::info!(
            removal = %key.name,
            generation = key.generation,
            phase = ?result.phase,
            dry_run = spec.dry_run,
            outcomes = ?result.images.iter().map(|i| (i.image.as_str(), i.outcome.as_str())).collect::<Vec<_>>(),
            "removal finished on this node"
        );
        Ok(result)
    }

    fn record(&self, result: &RemovalResult) {
        for image in &result.images {
            self.metrics.image_outcome(&image.outcome);
        }
    }

    /// Applies the report: the object itself once per process (name, owner, spec), then its
    /// status whenever it changed.
    async fn write_report(&mut self, node_uid: &str) -> Result<(), AgentError> {
        let params = PatchParams::apply(MANAGER).force();
        let err = |source| AgentError::Report {
            node: self.node.clone(),
            source,
        };
        if !self.created {
            let object = serde_json::json!({
                "apiVersion": "imagegc.dev/v1alpha1",
                "kind": "NodeImageReport",
                "metadata": {
                    "name": self.node,
                    "ownerReferences": [{
                        "apiVersion": "v1", "kind": "Node", "name": self.node, "uid": node_uid,
                    }],
                },
                "spec": {"nodeName": self.node},
            });
            self.reports
                .patch(&self.node, &params, &Patch::Apply(object))
                .await
                .map_err(err)?;
            self.metrics.report_writes.inc();
            self.created = true;
        }
        let status = NodeImageReportStatus {
            inventory: self.inventory.clone(),
            removals: self.entries.clone(),
            policies: self.policy_entries.clone(),
            updated: Some(now()),
        };
        let patch = serde_json::json!({
            "apiVersion": "imagegc.dev/v1alpha1",
            "kind": "NodeImageReport",
            "metadata": {"name": self.node},
            "status": status,
        });
        self.reports
            .patch_status(&self.node, &params, &Patch::Apply(patch))
            .await
            .map_err(err)?;
        self.metrics.report_writes.inc();
        Ok(())
    }
}

fn key_of(removal: &ImageRemoval) -> Key {
    Key {
        name: removal.name_any(),
        uid: removal.uid().unwrap_or_default(),
        generation: removal.meta().generation.unwrap_or(0),
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Exponential backoff: 1 s, 2 s, 4 s … capped at 5 minutes.
fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }

    #[test]
    fn seconds_flags_reject_zero_and_garbage() {
        assert_eq!(parse_seconds("5"), Ok(Duration::from_secs(5)));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("5m").is_err());
    }
}
