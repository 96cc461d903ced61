//! `imagegc controller`: folds every node's NodeImageReport into the status of each
//! ImageRemoval and each ImagePrunePolicy, publishes an Event when a removal finishes or a
//! policy is invalid, and deletes finished removals after their `ttlSecondsAfterFinished`.
//! Leader-elected, so two replicas are safe.
//!
//! - [`fold`]: the pure aggregation (one removal, the Nodes, the reports → status).
//! - [`policy_fold`]: the same for one policy; `policies` runs it.
//! - [`lease`]: the leader election on a Lease.
//! - this module: the thin shell — watches, the reconcile loop, status writes, metrics.

pub mod fold;
pub mod lease;
mod policies;
pub mod policy_fold;

use std::collections::{BTreeMap, HashMap};
use std::future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PartialObjectMeta, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::api::{ImagePrunePolicy, ImageRemoval, NodeImageReport};
use crate::core::duration;
use crate::events::{Publisher, Severity};
use crate::serve::{self, Health, LogFormat, Shutdown};
use crate::watch::Undecodable;
use fold::{Expiry, Terminal};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Field manager of the status the controller applies.
pub const FIELD_MANAGER: &str = "imagegc-controller";
/// `reportingController` of the controller's Events.
pub const EVENT_CONTROLLER: &str = "imagegc.dev/controller";
/// Every removal is refolded at least this often, whatever the watches say.
const RESYNC: Duration = Duration::from_secs(300);

/// Flags of `imagegc controller`.
#[derive(clap::Args, Clone, Debug)]
pub struct ControllerArgs {
    /// Address serving /metrics, /livez and /readyz.
    #[arg(long, default_value = "0.0.0.0:8081")]
    pub listen: SocketAddr,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "imagegc-system")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "IMAGEGC_LEASE_NAME", default_value = "imagegc-controller")]
    pub lease_name: String,
    /// This replica's name in the Lease (default: the host name and a random suffix).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// How long a Lease nobody renews stays held (e.g. `15s`).
    #[arg(long, default_value = "15s", value_parser = duration::parse)]
    pub lease_duration: Duration,
    /// How often the leader renews the Lease and standbys check it (e.g. `5s`).
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    pub lease_renew: Duration,
    /// Minimum time between two status writes of one ImageRemoval; reports arriving
    /// meanwhile are folded into the next write (e.g. `1s`, `500ms`).
    #[arg(long, default_value = "1s", value_parser = duration::parse)]
    pub status_debounce: Duration,
    /// Added to the minimum time between status writes per node the removal targets (each
    /// write reaches every agent's watch, so big removals are written less often). A write
    /// that finishes a removal is never held back (e.g. `5ms`).
    #[arg(long, default_value = "5ms", value_parser = duration::parse)]
    pub status_debounce_per_node: Duration,
}

/// What stops the controller: at start, or when leadership is lost.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// Flags that contradict each other.
    #[error("invalid flags: {0}")]
    Flags(String),
    /// No Kubernetes client could be configured.
    #[error(
        "cannot configure a Kubernetes client: {0}; set KUBECONFIG, or run in a pod with a ServiceAccount"
    )]
    Client(#[source] kube::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// The metrics endpoint could not be served.
    #[error(
        "cannot serve /metrics, /livez and /readyz on {addr}: {source}; choose another --listen"
    )]
    Listen {
        /// The `--listen` address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the Lease failed.
    #[error(
        "reading or writing Lease {lease} failed: {source}; the controller needs get, create and update on leases in that namespace"
    )]
    Lease {
        /// `namespace/name`.
        lease: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Another replica holds the Lease now, or it could not be renewed in time.
    #[error("lost the leader Lease {lease}: {why}; exiting so that a restart rejoins the election")]
    LostLeadership {
        /// `namespace/name`.
        lease: String,
        /// Why.
        why: String,
    },
}

/// What fails one reconcile of an ImageRemoval (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Writing an ImageRemoval's status failed.
    #[error(
        "writing the status of ImageRemoval {name} failed: {source}; the controller needs patch on imageremovals/status"
    )]
    WriteStatus {
        /// The ImageRemoval.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Deleting a finished ImageRemoval after its TTL failed.
    #[error(
        "deleting ImageRemoval {name} after its ttlSecondsAfterFinished failed: {source}; the controller needs delete on imageremovals"
    )]
    Delete {
        /// The ImageRemoval.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
}

impl ReconcileError {
    /// A short, stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::WriteStatus { .. } => "write_status",
            ReconcileError::Delete { .. } => "delete",
        }
    }
}

/// The controller's Prometheus metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    reconciles: Family<[(&'static str, &'static str); 1], Counter>,
    status_writes: Counter,
    ttl_deletions: Counter,
    events: Counter,
    is_leader: Gauge,
    policy_status_writes: Counter,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        registry.register(
            "reconciles",
            "Reconciles of ImageRemovals, by result (ok or an error label)",
            m.reconciles.clone(),
        );
        registry.register(
            "status_writes",
            "ImageRemoval status writes (only when the folded status changed)",
            m.status_writes.clone(),
        );
        registry.register(
            "ttl_deletions",
            "ImageRemovals deleted after their ttlSecondsAfterFinished",
            m.ttl_deletions.clone(),
        );
        registry.register(
            "events",
            "Events published about finished ImageRemovals",
            m.events.clone(),
        );
        registry.register(
            "policy_status_writes",
            "ImagePrunePolicy status writes (only when the folded status changed)",
            m.policy_status_writes.clone(),
        );
        registry.register(
            "is_leader",
            "1 while this replica holds the leader Lease",
            m.is_leader.clone(),
        );
        m
    }

    fn reconciled(&self, result: &'static str) {
        self.reconciles.get_or_create(&[("result", result)]).inc();
    }
}

/// Runs the controller until SIGTERM (then releases the Lease and returns `Ok`) or until
/// leadership is lost or a fatal error occurs (returns the error; the process should exit).
pub async fn run(args: ControllerArgs) -> Result<(), ControllerError> {
    serve::init_logging(args.log_format);
    if args.lease_renew.is_zero() || args.lease_renew >= args.lease_duration {
        return Err(ControllerError::Flags(format!(
            "--lease-renew ({:?}) must be positive and shorter than --lease-duration ({:?})",
            args.lease_renew, args.lease_duration
        )));
    }
    let shutdown = Shutdown::on_signals().map_err(ControllerError::Signals)?;
    let client = Client::try_default()
        .await
        .map_err(ControllerError::Client)?;
    let identity = args.identity.clone().unwrap_or_else(default_identity);

    let mut registry = Registry::with_prefix("imagegc_controller");
    let metrics = Metrics::register(&mut registry);
    let health = Health::default();
    let mut server = tokio::spawn(serve::serve(
        args.listen,
        Arc::new(registry),
        health.clone(),
        shutdown.clone(),
    ));
    let listen = args.listen;
    let served = move |r: Result<std::io::Result<()>, tokio::task::JoinError>| match r {
        Ok(Err(source)) => Err(ControllerError::Listen {
            addr: listen,
            source,
        }),
        Err(join) => Err(ControllerError::Listen {
            addr: listen,
            source: std::io::Error::other(join),
        }),
        Ok(Ok(())) => Ok(()),
    };

    let mut elector = lease::Elector::new(
        Api::namespaced(client.clone(), &args.lease_namespace),
        &args.lease_name,
        &identity,
        args.lease_duration,
    );
    tracing::info!(%identity, lease = %elector.lease(), "standing by for the leader Lease");
    health.set_ready(true);
    let mut stop = shutdown.clone();
    tokio::select! {
        () = campaign(&mut elector, args.lease_renew) => {}
        () = stop.wait() => {
            tracing::info!("stopped while standing by");
            return Ok(());
        }
        r = &mut server => return served(r),
    }

    tracing::info!(%identity, lease = %elector.lease(), "became the leader; reconciling");
    metrics.is_leader.set(1);
    health.set_ready(false);
    let publisher = Publisher::new(client.clone(), EVENT_CONTROLLER, &identity);
    let leader = Leader {
        client,
        publisher,
        metrics: metrics.clone(),
        debounce: Debounce {
            base: args.status_debounce,
            per_node: args.status_debounce_per_node,
        },
    };
    let outcome = tokio::select! {
        lost = keep_leading(&mut elector, args.lease_renew, args.lease_duration) => Err(lost),
        () = lead(leader, health.clone(), shutdown.clone()) => Ok(()),
        r = &mut server => served(r),
    };
    metrics.is_leader.set(0);
    match outcome {
        Ok(()) => {
            elector.release().await?;
            tracing::info!(lease = %elector.lease(), "released the leader Lease; stopped");
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "stopping");
            Err(e)
        }
    }
}

/// Polls the Lease until this replica holds it. API errors are logged and retried.
async fn campaign(elector: &mut lease::Elector, period: Duration) {
    loop {
        match elector.try_lead().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "leader election attempt failed; retrying"),
        }
        tokio::time::sleep(period).await;
    }
}

/// Renews the Lease every `period`; returns why leadership was lost. The leader gives up
/// once it could not renew for `duration - period`, before a standby may take over.
async fn keep_leading(
    elector: &mut lease::Elector,
    period: Duration,
    duration: Duration,
) -> ControllerError {
    let deadline = duration.saturating_sub(period);
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(period).await;
        match elector.try_lead().await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => {
                return ControllerError::LostLeadership {
                    lease: elector.lease(),
                    why: "another replica holds it".into(),
                };
            }
            Err(e) if renewed.elapsed() >= deadline => {
                return ControllerError::LostLeadership {
                    lease: elector.lease(),
                    why: format!("could not renew it for {:?}: {e}", renewed.elapsed()),
                };
            }
            Err(e) => tracing::warn!(error = %e, "renewing the leader Lease failed; retrying"),
        }
    }
}

/// The default identity: the host name (a pod's name) and a random suffix, so two
/// processes on one host never share it.
fn default_identity() -> String {
    use std::hash::{BuildHasher, Hasher};
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "imagegc-controller".into());
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{host}-{:08x}", h.finish() as u32)
}

/// What the leader needs to reconcile.
struct Leader {
    client: Client,
    publisher: Publisher,
    metrics: Metrics,
    debounce: Debounce,
}

/// The least time between two status writes of one object: `base`, plus `per_node` for each
/// Node it targets (each write reaches every agent's watch).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Debounce {
    base: Duration,
    per_node: Duration,
}

impl Debounce {
    /// The interval for an object that targets `nodes` Nodes.
    fn interval(self, nodes: i32) -> Duration {
        fold::write_interval(self.base, self.per_node, nodes)
    }
}

/// The reflector stores both loops read.
#[derive(Clone)]
pub(crate) struct Stores {
    nodes: Store<PartialObjectMeta<Node>>,
    reports: Store<NodeImageReport>,
    /// Every ImageRemoval, to forget what belonged to deleted ones.
    removals: Store<ImageRemoval>,
}

/// The removals' write rate limit and failure backoff.
#[derive(Default)]
struct Limits {
    debounce: Debounce,
    /// When each removal's status was last written (by UID): the write rate limit.
    last_write: Mutex<HashMap<String, Instant>>,
    /// Consecutive failed reconciles per removal (by name): the backoff. Only failing
    /// removals that still exist are kept (see [`Context::forget_gone`]).
    failures: Mutex<HashMap<String, u32>>,
}

/// What every reconcile shares.
struct Context {
    client: Client,
    publisher: Publisher,
    metrics: Metrics,
    synced: Synced,
    stores: Stores,
    limits: Limits,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which watches have listed everything once. Waited on through a `watch` channel, which
/// wakes every waiter: `Store::wait_until_ready` wakes only the last task that polled it, and
/// the controller's own runner already waits on the ImageRemoval store.
#[derive(Clone)]
struct Synced(Arc<tokio::sync::watch::Sender<u8>>);

impl Synced {
    const REMOVALS: u8 = 1;
    const NODES: u8 = 2;
    const REPORTS: u8 = 4;
    const POLICIES: u8 = 8;
    /// What removals need. Not the policies: without their CRD (an upgrade that skipped it)
    /// removals must still be folded.
    const ALL: u8 = Self::REMOVALS | Self::NODES | Self::REPORTS;

    fn new() -> Synced {
        Synced(Arc::new(tokio::sync::watch::channel(0).0))
    }

    fn mark(&self, watch: u8) {
        self.0.send_if_modified(|m| {
            let was = *m;
            *m |= watch;
            was != *m
        });
    }

    /// Resolves once every watch removals need has synced.
    async fn wait(&self) {
        self.wait_for(Self::ALL).await;
    }

    /// Resolves once the watches in `mask` have synced.
    async fn wait_for(&self, mask: u8) {
        let _ = self.0.subscribe().wait_for(|m| *m & mask == mask).await;
    }
}

/// Changes of one watched kind, as the controller's runner takes them.
type Changes<K> = BoxStream<'static, watcher::Result<K>>;

/// A reflector over every object of one of imagegc's kinds, and its changes; tells `listed`
/// at the end of each listing (as `watch`), and sends objects that do not decode to
/// `undecodable`.
fn watch_kind<K>(
    client: &Client,
    listed: &Listed,
    watch: u8,
    undecodable: &UnboundedSender<Undecodable>,
) -> (Store<K>, Changes<K>)
where
    K: crate::watch::Reflected,
{
    let (store, writer) = reflector::store::<K>();
    let events = reflector::reflector(
        writer,
        crate::watch::tolerant_reporting::<K>(
            client.clone(),
            watcher::Config::default(),
            Some(undecodable.clone()),
        )
        .backoff(crate::watch::ControllerBackoff::default())
        .modify(crate::watch::drop_managed_fields),
    );
    (store, changes(events, listed.clone(), watch).boxed())
}

/// Publishes a Warning Event on each object that does not decode, once per version of it
/// (every relist sees it again), until `shutdown`.
async fn warn_undecodable(
    mut undecodable: UnboundedReceiver<Undecodable>,
    publisher: Publisher,
    mut shutdown: Shutdown,
) {
    let mut warned = Sightings::default();
    loop {
        let u = tokio::select! {
            _ = shutdown.wait() => break,
            u = undecodable.recv() => match u {
                Some(u) => u,
                None => break,
            },
        };
        if !warned.first(&u.regarding) {
            continue;
        }
        let note = format!(
            "{} {} does not match this version's schema and is ignored until it is fixed or \
             deleted: {}",
            u.regarding.kind.as_deref().unwrap_or("object"),
            u.regarding.name.as_deref().unwrap_or_default(),
            u.error
        );
        publisher
            .publish_about(
                *u.regarding,
                Severity::Warning,
                "InvalidObject",
                "Decode",
                &note,
            )
            .await;
    }
}

/// The object versions already warned about.
#[derive(Debug, Default)]
struct Sightings(std::collections::HashSet<(Option<String>, Option<String>)>);

impl Sightings {
    /// Versions remembered at most; past that the memory starts over (a repeat Event, never
    /// unbounded growth).
    const MAX: usize = 10_000;

    /// Whether this is the first sighting of `object` at its resource version.
    fn first(&mut self, object: &ObjectReference) -> bool {
        if self.0.len() >= Self::MAX {
            self.0.clear();
        }
        self.0
            .insert((object.uid.clone(), object.resource_version.clone()))
    }
}

/// A reflector over the Nodes' metadata, and the changes of their labels.
fn watch_nodes(
    client: &Client,
    listed: &Listed,
) -> (
    Store<PartialObjectMeta<Node>>,
    Changes<PartialObjectMeta<Node>>,
) {
    let (store, writer) = reflector::store::<PartialObjectMeta<Node>>();
    let events = only_label_changes(reflector::reflector(
        writer,
        watcher::watcher(
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            watcher::Config::default(),
        )
        .backoff(crate::watch::ControllerBackoff::default())
        .modify(crate::watch::drop_managed_fields),
    ));
    (
        store,
        changes(events, listed.clone(), Synced::NODES).boxed(),
    )
}

/// Drives the policy watch (its store feeds the policy loop) until `shutdown`, logging its
/// errors.
async fn drain_policy_watch(policy_changes: Changes<ImagePrunePolicy>, mut shutdown: Shutdown) {
    let mut policy_changes = policy_changes;
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            event = policy_changes.next() => match event {
                Some(Err(e)) => tracing::warn!(error = %e, "watching ImagePrunePolicies failed; retrying with backoff"),
                Some(Ok(_)) => {}
                None => break,
            },
        }
    }
}

/// Watches ImageRemovals, NodeImageReports and Node labels and reconciles until `shutdown`;
/// runs the policy loop beside it.
async fn lead(leader: Leader, health: Health, shutdown: Shutdown) {
    let client = leader.client.clone();
    let synced = Synced::new();
    // Every policy, report and Node label change, and every finished listing, pings the
    // policy loop; every finished listing reconciles every removal.
    let changed = Arc::new(tokio::sync::Notify::new());
    let (relisted, reconcile_all) = futures::channel::mpsc::unbounded();
    let listed = Listed {
        synced: synced.clone(),
        removals: relisted,
        policies: changed.clone(),
    };
    let (undecodable, undecodable_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(warn_undecodable(
        undecodable_rx,
        leader.publisher.clone(),
        shutdown.clone(),
    ));
    let (removals, removal_changes) =
        watch_kind::<ImageRemoval>(&client, &listed, Synced::REMOVALS, &undecodable);
    let (nodes, node_changes) = watch_nodes(&client, &listed);
    let (reports, report_changes) =
        watch_kind::<NodeImageReport>(&client, &listed, Synced::REPORTS, &undecodable);
    let (policies, policy_changes) =
        watch_kind::<ImagePrunePolicy>(&client, &listed, Synced::POLICIES, &undecodable);
    let report_changes = report_changes.inspect(ping(&changed));
    let node_changes = node_changes.inspect(ping(&changed));
    let policy_changes = policy_changes.inspect(ping(&changed)).boxed();
    tokio::spawn(drain_policy_watch(policy_changes, shutdown.clone()));
    let stores = Stores {
        nodes,
        reports,
        removals,
    };
    tokio::spawn(
        policies::PolicyLoop {
            client: client.clone(),
            publisher: leader.publisher.clone(),
            metrics: leader.metrics.clone(),
            synced: synced.clone(),
            policies,
            stores: stores.clone(),
            changed,
            debounce: leader.debounce,
        }
        .run(shutdown.clone()),
    );
    {
        let synced = synced.clone();
        tokio::spawn(async move {
            synced.wait().await;
            tracing::info!("watches synced");
            health.set_ready(true);
        });
    }
    let ctx = Arc::new(Context {
        client,
        publisher: leader.publisher,
        metrics: leader.metrics,
        synced,
        stores: stores.clone(),
        limits: Limits {
            debounce: leader.debounce,
            ..Limits::default()
        },
    });
    let triggers = RemovalTriggers {
        removals: removal_changes,
        reports: report_changes.boxed(),
        nodes: node_changes.boxed(),
        reconcile_all: reconcile_all.boxed(),
    };
    run_removals(triggers, ctx, shutdown).await;
}

/// What reconciles a removal: its own changes, a change of a report naming it, a change of a
/// Node's labels (the target set may change: every removal), and the end of any listing
/// (every removal).
struct RemovalTriggers {
    removals: Changes<ImageRemoval>,
    reports: Changes<NodeImageReport>,
    nodes: Changes<PartialObjectMeta<Node>>,
    reconcile_all: BoxStream<'static, ()>,
}

/// Runs the ImageRemoval controller until `shutdown`.
async fn run_removals(triggers: RemovalTriggers, ctx: Arc<Context>, mut shutdown: Shutdown) {
    // Rate limiting is done per object in `reconcile_one`; the scheduler's own debounce
    // would keep delaying a removal whose reports never stop arriving.
    let all = ctx.stores.removals.clone();
    Controller::for_stream(triggers.removals, ctx.stores.removals.clone())
        .with_config(ControllerConfig::default().concurrency(8))
        .trigger_backoff(crate::watch::NoPause)
        .watches_stream(triggers.reports, |report: NodeImageReport| {
            removals_named_in(&report)
        })
        .watches_stream(triggers.nodes, move |_node: PartialObjectMeta<Node>| {
            all.state()
                .iter()
                .map(|r| ObjectRef::from_obj(&**r))
                .collect::<Vec<_>>()
        })
        .reconcile_all_on(triggers.reconcile_all)
        .graceful_shutdown_on(async move { shutdown.wait().await })
        .run(reconcile_one, error_policy, ctx)
        .for_each(|result| {
            // Failed reconciles are logged by `error_policy`; the rest are watch errors.
            if let Err(e) = result
                && !matches!(e, kube::runtime::controller::Error::ReconcilerFailed(..))
            {
                tracing::warn!(error = %e, "watching failed; retrying with backoff");
            }
            future::ready(())
        })
        .await;
}

/// Every changed or deleted object seen while watching (a deleted report changes the counts
/// too). A listing's objects are not passed on: the reflector swaps them into its store only at
/// the end of the listing, so a reconcile they triggered would read the store as it was
/// before (after a relist, without what changed while the watch was broken). `listed` is told
/// at the end instead, after the reflector stored the listing.
fn changes<K>(
    events: impl Stream<Item = watcher::Result<Event<K>>>,
    listed: Listed,
    watch: u8,
) -> impl Stream<Item = watcher::Result<K>> {
    events.filter_map(move |event| {
        future::ready(match event {
            Ok(Event::Apply(o) | Event::Delete(o)) => Some(Ok(o)),
            Ok(Event::InitDone) => {
                listed.done(watch);
                None
            }
            Ok(Event::Init | Event::InitApply(_)) => None,
            Err(e) => Some(Err(e)),
        })
    })
}

/// Told when a watch has finished a listing: its first, or a relist after a 410 or an
/// API-server restart.
#[derive(Clone)]
struct Listed {
    synced: Synced,
    /// Reconciles every removal.
    removals: futures::channel::mpsc::UnboundedSender<()>,
    /// Wakes the policy loop.
    policies: Arc<tokio::sync::Notify>,
}

impl Listed {
    /// Marks `watch` synced and has everything looked at again with the listing stored.
    fn done(&self, watch: u8) {
        self.synced.mark(watch);
        // Closed only when the controller is shutting down.
        let _ = self.removals.unbounded_send(());
        self.policies.notify_one();
    }
}

/// Drops Node updates that leave the labels as they were: a Node's status changes every few
/// seconds on every node, and only appearing, going or relabelling changes a target set.
fn only_label_changes(
    events: impl Stream<Item = watcher::Result<Event<PartialObjectMeta<Node>>>>,
) -> impl Stream<Item = watcher::Result<Event<PartialObjectMeta<Node>>>> {
    let mut seen: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    events.filter_map(move |event| {
        let keep = match &event {
            Ok(Event::Apply(n) | Event::InitApply(n)) => {
                let labels = n.labels().clone();
                seen.insert(n.name_any(), labels.clone()) != Some(labels)
            }
            Ok(Event::Delete(n)) => {
                seen.remove(&n.name_any());
                true
            }
            _ => true,
        };
        future::ready(keep.then_some(event))
    })
}

/// Server-side applies `status` as the status of the cluster-scoped `K` named `name`, as the
/// controller's field manager. An object deleted meanwhile is [`Applied::Gone`], not an error.
async fn apply_status<K>(
    client: &Client,
    name: &str,
    status: &impl serde::Serialize,
) -> Result<Applied, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K: Resource<Scope = kube::core::ClusterResourceScope>,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let written = Api::<K>::all(client.clone())
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await;
    match written {
        Ok(_) => Ok(Applied::Written),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Applied::Gone),
        Err(e) => Err(e),
    }
}

/// What a status write found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applied {
    /// The status is written.
    Written,
    /// The object was deleted meanwhile: nothing to write.
    Gone,
}

/// A stream callback that pings `changed`.
fn ping<T>(changed: &Arc<tokio::sync::Notify>) -> impl FnMut(&T) + use<T> {
    let changed = changed.clone();
    move |_| changed.notify_one()
}

fn removals_named_in(report: &NodeImageReport) -> Vec<ObjectRef<ImageRemoval>> {
    report
        .status
        .iter()
        .flat_map(|s| &s.removals)
        .map(|r| ObjectRef::new(&r.name))
        .collect()
}

async fn reconcile_one(
    removal: Arc<ImageRemoval>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let result = fold_and_write(&removal, &ctx).await;
    if result.is_ok() {
        ctx.metrics.reconciled("ok");
        lock(&ctx.limits.failures).remove(&removal.name_any());
    }
    ctx.forget_gone();
    result
}

fn error_policy(removal: Arc<ImageRemoval>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconciled(error.metric_label());
    let failures = {
        let mut map = lock(&ctx.limits.failures);
        let n = map.entry(removal.name_any()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let backoff = serve::backoff(failures);
    tracing::warn!(removal = %removal.name_any(), error = %error, retry_in = ?backoff, "reconcile failed");
    Action::requeue(backoff)
}

/// Gather → fold → write (only if changed, at most once per debounce) → Event → TTL.
async fn fold_and_write(removal: &ImageRemoval, ctx: &Context) -> Result<Action, ReconcileError> {
    // Folding before every watch listed once would count missing Nodes and reports as
    // "no target" and finish removals that are not finished.
    ctx.synced.wait().await;
    if removal.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = removal.name_any();
    let uid = removal.uid().unwrap_or_default();
    // Whole seconds: what the API server stores, so refolding what was written is stable.
    let now =
        Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now());

    let (nodes, reports) = (ctx.stores.nodes.state(), ctx.stores.reports.state());
    let status = fold::fold(
        removal,
        nodes
            .iter()
            .map(|n| (n.metadata.name.as_deref().unwrap_or_default(), n.labels())),
        reports.iter().map(|r| &**r),
        now,
    );

    if removal.status.as_ref() != Some(&status) {
        let interval = ctx.limits.debounce.interval(status.target_nodes);
        if fold::terminal(&status).is_none()
            && let Some(wait) = ctx.write_wait(&uid, interval)
        {
            return Ok(Action::requeue(wait));
        }
        match apply_status::<ImageRemoval>(&ctx.client, &name, &status).await {
            Ok(Applied::Written) => {}
            Ok(Applied::Gone) => return Ok(Action::await_change()),
            Err(source) => return Err(ReconcileError::WriteStatus { name, source }),
        }
        lock(&ctx.limits.last_write).insert(uid.clone(), Instant::now());
        ctx.metrics.status_writes.inc();
        tracing::info!(
            removal = %name,
            targets = status.target_nodes,
            succeeded = status.succeeded,
            failed = status.failed,
            pending = status.pending,
            "status written"
        );
        let before = removal.status.as_ref().and_then(fold::terminal);
        let after = fold::terminal(&status);
        if after.is_some() && after != before {
            publish(ctx, removal, after, &status).await;
        }
    }

    match fold::expiry(&status, removal.spec.ttl_seconds_after_finished, now) {
        Expiry::Keep => Ok(Action::requeue(RESYNC)),
        Expiry::After(left) => Ok(Action::requeue(left.min(RESYNC))),
        Expiry::Now => {
            let api = Api::<ImageRemoval>::all(ctx.client.clone());
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(&name, &params).await {
                Ok(_) => {
                    ctx.metrics.ttl_deletions.inc();
                    tracing::info!(removal = %name, "deleted after ttlSecondsAfterFinished");
                }
                // Gone already, or re-created under the same name (a different UID).
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(source) => return Err(ReconcileError::Delete { name, source }),
            }
            Ok(Action::await_change())
        }
    }
}

impl Context {
    /// Drops the failure counts of removals that were deleted: a deleted object is never
    /// reconciled again, so nothing else would. The map holds only failing removals, so this
    /// is cheap.
    fn forget_gone(&self) {
        lock(&self.limits.failures)
            .retain(|name, _| self.stores.removals.get(&ObjectRef::new(name)).is_some());
    }

    /// How long to wait before this removal's status may be written again, if at all, when
    /// writes must be `interval` apart.
    fn write_wait(&self, uid: &str, interval: Duration) -> Option<Duration> {
        let mut last = lock(&self.limits.last_write);
        let wait = last
            .get(uid)
            .map(|at| interval.saturating_sub(at.elapsed()))
            .filter(|wait| !wait.is_zero());
        // Forget writes older than any interval in use, so the map stays small.
        last.retain(|_, at| at.elapsed() < interval.max(self.limits.debounce.base));
        wait
    }
}

async fn publish(
    ctx: &Context,
    removal: &ImageRemoval,
    terminal: Option<Terminal>,
    status: &crate::api::ImageRemovalStatus,
) {
    let note = fold::terminal_message(status).unwrap_or_default();
    let (severity, reason) = match terminal {
        Some(Terminal::Failed) => (Severity::Warning, "Failed"),
        _ => (Severity::Normal, "Completed"),
    };
    ctx.publisher
        .publish(removal, severity, reason, "Aggregate", note)
        .await;
    ctx.metrics.events.inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_version_of_an_undecodable_object_is_warned_about_once() {
        let at = |uid: &str, version: &str| ObjectReference {
            uid: Some(uid.into()),
            resource_version: Some(version.into()),
            ..Default::default()
        };
        let mut warned = Sightings::default();
        assert!(warned.first(&at("a", "1")));
        assert!(!warned.first(&at("a", "1")), "a relist of the same version");
        assert!(warned.first(&at("a", "2")), "edited, still bad");
        assert!(warned.first(&at("b", "1")), "another object");
        for i in 0..Sightings::MAX {
            warned.first(&at("c", &i.to_string()));
        }
        assert!(warned.0.len() <= Sightings::MAX);
    }

    #[test]
    fn flags_have_the_documented_names_and_defaults() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: ControllerArgs,
        }
        let cli = Cli::try_parse_from([
            "controller",
            "--listen",
            "127.0.0.1:9000",
            "--lease-namespace",
            "ns",
            "--lease-name",
            "l",
            "--identity",
            "me",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.args.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(cli.args.lease_name, "l");
        assert_eq!(cli.args.identity.as_deref(), Some("me"));
        assert_eq!(cli.args.lease_duration, Duration::from_secs(15));
        assert_eq!(cli.args.lease_renew, Duration::from_secs(5));
        assert_eq!(cli.args.status_debounce, Duration::from_secs(1));
        assert_eq!(cli.args.status_debounce_per_node, Duration::from_millis(5));
    }

    #[test]
    fn a_report_maps_to_the_removals_it_names() {
        use crate::api::{NodeImageReportSpec, NodeImageReportStatus, RemovalResult};
        let mut report = NodeImageReport::new(
            "n",
            NodeImageReportSpec {
                node_name: "n".into(),
            },
        );
        report.status = Some(NodeImageReportStatus {
            removals: ["a", "b"]
                .iter()
                .map(|n| RemovalResult {
                    name: n.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        let names: Vec<String> = removals_named_in(&report)
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
    }

    /// A relist (after a 410 or an API-server restart) passes on none of its objects, which
    /// the store holds only at the end; its end marks the watch synced, asks for every removal
    /// to be reconciled and wakes the policy loop. Changes seen while watching pass.
    #[tokio::test]
    async fn a_listing_is_looked_at_once_stored() {
        let removal = |name: &str| ImageRemoval::new(name, Default::default());
        let (relisted, mut reconcile_all) = futures::channel::mpsc::unbounded();
        let listed = Listed {
            synced: Synced::new(),
            removals: relisted,
            policies: Arc::new(tokio::sync::Notify::new()),
        };
        let events = futures::stream::iter([
            Ok(Event::Apply(removal("watched"))),
            Ok(Event::Init),
            Ok(Event::InitApply(removal("listed"))),
            Ok(Event::InitDone),
            Ok(Event::Delete(removal("deleted"))),
        ]);
        let passed: Vec<String> = changes(events, listed.clone(), Synced::REMOVALS)
            .map(|c| c.map(|r| r.name_any()).unwrap())
            .collect()
            .await;
        assert_eq!(passed, ["watched", "deleted"]);
        assert_eq!(reconcile_all.try_recv().ok(), Some(()));
        assert!(reconcile_all.try_recv().is_err(), "one signal per listing");
        assert_eq!(*listed.synced.0.borrow(), Synced::REMOVALS);
        // The stored permit: the policy loop wakes at once.
        tokio::time::timeout(Duration::from_secs(1), listed.policies.notified())
            .await
            .expect("the policy loop was pinged");
    }
}
