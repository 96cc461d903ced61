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
//!
//! One pass (`Agent::reconcile`) is a sequence of named steps over state split by concern:
//! [`removals`] (which removals are due, one execution, what is remembered), [`policies`]
//! (which policies are due, one run), `connection` (the runtime connection and readiness) and
//! the inventory; [`report`] holds what the report becomes. Each decision is a pure function
//! tested without a cluster.

mod connection;
mod metrics;
pub mod pods;
pub mod policies;
pub mod removals;
pub mod report;

use std::collections::BTreeMap;
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
};
use crate::core::duration;
use crate::core::inventory::Inventory;
use crate::core::prune::{Protected, Protections};
use crate::core::reference;
use crate::events::Publisher;
use crate::runtime::{Connector, RuntimeArgs, RuntimeError};
use crate::serve::{self, FIRST_BACKOFF, Health, LogFormat, Shutdown};
use connection::Connection;
use metrics::Metrics;
use policies::Policies;
use removals::Removals;

/// Field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "imagegc-agent";
/// Reporting controller name on the agent's Events.
const EVENT_CONTROLLER: &str = "imagegc.dev/agent";

/// Flags of `imagegc agent`.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// This node's name (from the downward API: `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The runtime's socket, API and namespace.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Address for /metrics, /livez and /readyz.
    #[arg(long, env = "IMAGEGC_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// How often the node's image inventory is re-read and, if it changed, reported (e.g. `5m`).
    #[arg(long, value_parser = duration::parse_interval, default_value = "5m")]
    pub inventory_interval: Duration,
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
    /// each scheduled time (at most half the time to the next one), so a fleet spreads out
    /// (e.g. `5m`; `0s` turns it off).
    #[arg(long = "prune-max-jitter", value_parser = duration::parse_flag_seconds, default_value = "5m")]
    pub prune_max_jitter_seconds: u32,
    /// How often the image filesystem's usage is compared with the watermarks (e.g. `30s`).
    #[arg(long, value_parser = duration::parse_interval, default_value = "30s")]
    pub watermark_check: Duration,
    /// No policy chooses an image created (or first seen) less than this many seconds ago, as
    /// the kubelet's `imageMinimumGCAge`: a freshly pulled image is about to be used (e.g.
    /// `2m`; `0s` turns it off).
    #[arg(long = "prune-min-image-age", value_parser = duration::parse_flag_seconds, default_value = "2m")]
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
    let client = crate::kube_client::try_default()
        .await
        .map_err(AgentError::Config)?;

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

/// The watches the agent reads, each a reflector store.
struct Watches {
    removals: Store<ImageRemoval>,
    policies: Store<ImagePrunePolicy>,
    /// This node's Node object (at most one).
    nodes: Store<Node>,
    /// The node's own pods: read when a removal or policy runs, so their changes (frequent:
    /// every status update) wake nothing.
    pods: Store<Pod>,
}

impl Watches {
    /// Starts every watch; each change pings `changed` (the pods' do not).
    fn start(client: &Client, node: &str, changed: &Arc<Notify>, shutdown: &Shutdown) -> Watches {
        let on_node = |field: &str| watcher::Config::default().fields(&format!("{field}={node}"));
        Watches {
            policies: watch(
                crate::watch::tolerant::<ImagePrunePolicy>(
                    client.clone(),
                    watcher::Config::default(),
                ),
                changed.clone(),
                shutdown.clone(),
            ),
            removals: watch(
                crate::watch::tolerant::<ImageRemoval>(client.clone(), watcher::Config::default()),
                changed.clone(),
                shutdown.clone(),
            ),
            nodes: watch(
                watcher(Api::<Node>::all(client.clone()), on_node("metadata.name")),
                changed.clone(),
                shutdown.clone(),
            ),
            pods: watch(
                watcher(Api::<Pod>::all(client.clone()), on_node("spec.nodeName"))
                    .modify(pods::slim),
                Arc::new(Notify::new()),
                shutdown.clone(),
            ),
        }
    }

    /// Resolves once the watches removals need have listed. Not the policies: without their
    /// CRD (an upgrade that skipped it) removals must still work; policies are evaluated once
    /// their watch has listed. The pods are: until they are listed, an image a pod is about to
    /// start would look unused.
    async fn synced(&self) {
        let _ = tokio::join!(
            self.removals.wait_until_ready(),
            self.nodes.wait_until_ready(),
            self.pods.wait_until_ready()
        );
    }
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
    let watches = Watches::start(&client, &args.node_name, &changed, &shutdown);

    let connector = args.runtime.connector();
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
        connection: Connection::new(connector, watches.pods.clone(), health),
        removals: Removals::new(args.allow_force, protected.clone()),
        policies: Policies::new(
            protections,
            protected,
            i64::from(args.prune_max_jitter_seconds),
            args.image_fs.clone(),
            args.watermark_check,
        ),
        inventory: InventoryState {
            summary: None,
            due: Instant::now(),
            interval: args.inventory_interval,
            stamp_due,
        },
        report_created: false,
        warned_node_missing: false,
        metrics,
    };
    tracing::info!(
        node = %agent.node,
        socket = ?args.runtime.socket,
        runtime = args.runtime.runtime.as_str(),
        namespace = %args.runtime.namespace,
        "agent starting"
    );

    let mut stop = shutdown.clone();
    tokio::select! {
        _ = stop.wait() => return Ok(()),
        _ = watches.synced() => {}
    }
    tracing::info!("watches synced");
    agent.load_report().await;

    while !shutdown.requested() {
        let next = agent.reconcile(&watches).await;
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
            _ = tokio::time::sleep(serve::backoff(attempt.max(1))) => {}
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
    K: crate::watch::Reflected,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, events)
        .modify(crate::watch::drop_managed_fields)
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

/// The inventory the report carries, and when it is read next.
struct InventoryState {
    /// As last reported.
    summary: Option<InventorySummary>,
    /// When it is read next (an execution makes it due at once).
    due: Instant,
    /// How often it is read.
    interval: Duration,
    /// Set when a container was created: its image's last-used label is due.
    stamp_due: Arc<AtomicBool>,
}

/// The agent: its state split by concern, the report writer, and its outputs.
struct Agent {
    node: String,
    reports: Api<NodeImageReport>,
    events: Publisher,
    connection: Connection,
    removals: Removals,
    policies: Policies,
    inventory: InventoryState,
    /// Whether the report object (metadata and spec) has been applied by this process.
    report_created: bool,
    warned_node_missing: bool,
    metrics: Metrics,
}

/// This node, as one pass reads it.
struct NodeView {
    labels: BTreeMap<String, String>,
    uid: String,
}

impl Agent {
    /// Reads the report this node's agent wrote before (e.g. before a restart).
    async fn load_report(&mut self) {
        match self.reports.get_opt(&self.node).await {
            Ok(Some(report)) => {
                if let Some(status) = report.status {
                    self.removals.load(status.removals);
                    self.inventory.summary = status.inventory;
                    self.policies.entries = status.policies;
                }
                tracing::info!(
                    entries = self.removals.entries.len(),
                    "read this node's existing NodeImageReport"
                );
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "reading this node's NodeImageReport failed"),
        }
    }

    /// One pass: execute the removals that are due, run the policies that are due, label
    /// images after container creations, refresh the inventory when due, and write the report
    /// if any of it changed. Returns when the next pass is due at the latest.
    async fn reconcile(&mut self, watches: &Watches) -> Instant {
        let mut next = Instant::now() + self.inventory.interval;
        let Some(node) = self.node(&watches.nodes) else {
            return next;
        };
        let mut changed = self
            .run_removals(&watches.removals, &node.labels, &mut next)
            .await;
        changed |= self
            .evaluate_policies(&watches.policies, &node.labels, &mut next)
            .await;
        self.stamp_after_container_creations().await;
        changed |= self.refresh_inventory(&mut next).await;
        if (changed || !self.report_created)
            && let Err(e) = self.write_report(&node.uid).await
        {
            tracing::warn!(error = %e, "writing the NodeImageReport failed; will retry");
            self.report_created = false;
            next = next.min(Instant::now() + FIRST_BACKOFF * 2);
        }
        next
    }

    /// This node's labels and UID; without its Node object the agent is not ready and waits.
    fn node(&mut self, nodes: &Store<Node>) -> Option<NodeView> {
        let Some(node) = nodes.state().into_iter().next() else {
            if !self.warned_node_missing {
                tracing::warn!(node = %self.node, "Node object not found; waiting for it");
                self.warned_node_missing = true;
            }
            self.connection.health().set_ready(false);
            return None;
        };
        self.warned_node_missing = false;
        Some(NodeView {
            labels: node.labels().clone(),
            uid: node.uid().unwrap_or_default(),
        })
    }

    /// When a container was created, labels its image used now; the report waits for the next
    /// inventory (container churn must not turn into API writes).
    async fn stamp_after_container_creations(&mut self) {
        if self.inventory.stamp_due.swap(false, Ordering::SeqCst)
            && Instant::now() < self.inventory.due
            && let Err(e) = self.connection.read_and_stamp().await
        {
            tracing::debug!(error = %e, "labelling images after a container creation failed");
        }
    }

    /// Reads the inventory if it is due. Returns whether it changed; lowers `next` to when it
    /// is due again.
    async fn refresh_inventory(&mut self, next: &mut Instant) -> bool {
        if Instant::now() < self.inventory.due {
            return false;
        }
        self.inventory.due = Instant::now() + self.inventory.interval;
        let mut changed = false;
        match self.read_inventory().await {
            Ok(summary) => {
                if self.inventory.summary.as_ref() != Some(&summary) {
                    self.inventory.summary = Some(summary);
                    changed = true;
                }
            }
            Err(e) => {
                // The connection logged the transition; repeat only at debug level.
                self.metrics.runtime_error(&e);
                tracing::debug!(error = %e, "reading the image inventory failed");
                self.inventory.due = Instant::now() + FIRST_BACKOFF * 2;
            }
        }
        *next = (*next).min(self.inventory.due);
        changed
    }

    async fn read_inventory(&mut self) -> Result<InventorySummary, RuntimeError> {
        let reading = self.connection.read_and_stamp().await?;
        let summary = summary(&reading.inventory, reading.runtime.image_bytes().await?);
        self.metrics.inventory(&summary);
        Ok(summary)
    }

    /// Applies the report: the object itself once per process (name, owner, spec), then its
    /// status whenever it changed.
    async fn write_report(&mut self, node_uid: &str) -> Result<(), AgentError> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let err = |source| AgentError::Report {
            node: self.node.clone(),
            source,
        };
        if !self.report_created {
            let object = report_object(&self.node, node_uid);
            self.reports
                .patch(&self.node, &params, &Patch::Apply(object))
                .await
                .map_err(err)?;
            self.metrics.report_writes.inc();
            self.report_created = true;
        }
        let status = NodeImageReportStatus {
            inventory: self.inventory.summary.clone(),
            removals: self.removals.entries.clone(),
            policies: self.policies.entries.clone(),
            updated: Some(now()),
        };
        let patch = serde_json::json!({
            "apiVersion": NodeImageReport::api_version(&()),
            "kind": NodeImageReport::kind(&()),
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

/// The counts the report carries for `inv`, whose content takes `bytes`.
fn summary(inv: &Inventory, bytes: i64) -> InventorySummary {
    InventorySummary {
        images: inv.images.len() as i32,
        bytes,
        pinned: inv.images.values().filter(|i| i.pinned).count() as i32,
        in_use: inv
            .images
            .values()
            .filter(|i| !i.used_by.is_empty())
            .count() as i32,
    }
}

/// The NodeImageReport object of `node` (whose Node has `node_uid`), without its status: named
/// after the node and owned by it, so it goes when the Node goes.
fn report_object(node: &str, node_uid: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": NodeImageReport::api_version(&()),
        "kind": NodeImageReport::kind(&()),
        "metadata": {
            "name": node,
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid,
            }],
        },
        "spec": {"nodeName": node},
    })
}

fn now() -> Time {
    Time(Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: AgentArgs,
    }

    fn parse(flags: &[&str]) -> Result<AgentArgs, String> {
        use clap::Parser;
        let argv = ["agent", "--node-name", "n1"].iter().chain(flags);
        Cli::try_parse_from(argv)
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn duration_flags_take_units_and_have_the_documented_defaults() {
        let d = parse(&[]).unwrap();
        assert_eq!(d.inventory_interval, Duration::from_secs(300));
        assert_eq!(d.watermark_check, Duration::from_secs(30));
        assert_eq!(d.prune_max_jitter_seconds, 300);
        assert_eq!(d.prune_min_image_age_seconds, 120);
        assert_eq!(d.runtime.namespace, "k8s.io");
        let a = parse(&[
            "--inventory-interval=90s",
            "--watermark-check=1s",
            "--prune-max-jitter=0s",
            "--prune-min-image-age=1h",
            "--socket=/run/c.sock",
        ])
        .unwrap();
        assert_eq!(a.inventory_interval, Duration::from_secs(90));
        assert_eq!(a.watermark_check, Duration::from_secs(1));
        assert_eq!(a.prune_max_jitter_seconds, 0);
        assert_eq!(a.prune_min_image_age_seconds, 3_600);
        assert_eq!(a.runtime.socket, Some("/run/c.sock".into()));
    }

    #[test]
    fn bad_durations_are_refused_naming_the_flag() {
        for (flag, says) in [
            ("--inventory-interval=0s", "positive"),
            ("--watermark-check=300", "not valid"),
            ("--prune-min-image-age=1500ms", "whole number of seconds"),
            ("--prune-max-jitter=-1s", "not valid"),
        ] {
            let e = parse(&[flag]).unwrap_err();
            let name = flag.split('=').next().unwrap();
            assert!(e.contains(name) && e.contains(says), "{flag}: {e}");
        }
    }

    #[test]
    fn the_report_object_is_owned_by_its_node() {
        let o = report_object("n1", "uid-1");
        assert_eq!(o["apiVersion"], "imagegc.dev/v1alpha1");
        assert_eq!(o["kind"], "NodeImageReport");
        assert_eq!(o["metadata"]["name"], "n1");
        assert_eq!(o["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(o["metadata"]["ownerReferences"][0]["kind"], "Node");
        assert_eq!(o["spec"]["nodeName"], "n1");
    }

    #[test]
    fn the_summary_counts_pinned_and_used_images() {
        use crate::core::inventory::CriImage;
        let mut inv = Inventory::default();
        for (id, pinned, used) in [("a", true, false), ("b", false, true), ("c", false, false)] {
            inv.images.insert(
                id.into(),
                CriImage {
                    id: id.into(),
                    references: Vec::new(),
                    size: 1,
                    pinned,
                    used_by: if used { vec!["ctr".into()] } else { vec![] },
                    content: Default::default(),
                },
            );
        }
        let s = summary(&inv, 42);
        assert_eq!((s.images, s.bytes, s.pinned, s.in_use), (3, 42, 1, 1));
    }
}
