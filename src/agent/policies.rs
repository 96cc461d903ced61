//! ImagePrunePolicies on this node: which ones select it, when each is due (its schedule at
//! this node's offset, or its watermark), and one run: choose (`core::prune`), remove the
//! chosen images in one batch (one garbage collection), record the run in the node's report.
//! The functions at the top are pure; the `Agent` methods at the bottom are the shell.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store;

use super::{Agent, report};
use crate::api::{
    ImageOutcome, ImagePrunePolicy, MAX_MESSAGE, MAX_POLICIES, MAX_POLICY_IMAGES, MAX_REFERENCES,
    PolicyRun, PrunedImage, Trigger,
};
use crate::core::plan::{self, Outcome, Plan, Request};
use crate::core::policy::{self, Compiled};
use crate::core::prune::{self, Choice, Protected, Protections, Usage, Watermark};
use crate::core::schedule;
use crate::events::{Severity, truncate};
use crate::runtime::RuntimeError;
use crate::serve::backoff;

/// When a scheduled policy next runs on this node, for the generation it was computed for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// The policy generation.
    pub generation: i64,
    /// When this node runs it (the scheduled tick plus this node's jitter), Unix seconds;
    /// `None` when the schedule has no next tick (or the policy has no schedule).
    pub next: Option<i64>,
}

/// When a policy with `schedule` runs next on `node`, for a policy this agent starts
/// following at `now`: a run recorded in `previous` (same generation) that planned a time
/// still counts, so a run missed while the agent was down happens once when it is back; a new
/// policy or generation waits for its next tick.
pub fn plan_next(
    schedule: &schedule::Schedule,
    previous: Option<&PolicyRun>,
    generation: i64,
    node: &str,
    uid: &str,
    max_jitter: i64,
    now: i64,
) -> Option<i64> {
    if let Some(prev) = previous
        && prev.uid == uid
        && prev.generation == generation
        && let Some(at) = &prev.next_run
    {
        return Some(at.0.as_second());
    }
    schedule::next_run(schedule, now, node, uid, max_jitter).map(|(_, at)| at)
}

/// Usage in whole percent, rounded up (so a watermark at 85 fires at 84.1 % only if the
/// arithmetic of `core::prune::watermark_target` says so; this figure is for people).
pub fn percent(usage: &Usage) -> i32 {
    if usage.capacity_bytes <= 0 {
        return 0;
    }
    let p = (i128::from(usage.used_bytes.max(0)) * 100 + i128::from(usage.capacity_bytes) - 1)
        / i128::from(usage.capacity_bytes);
    p.clamp(0, 100) as i32
}

/// What one run did, as the report records it.
#[derive(Clone, Debug)]
pub struct RunFacts<'a> {
    /// The policy.
    pub policy: &'a ImagePrunePolicy,
    /// What started it.
    pub trigger: Trigger,
    /// What the selection chose.
    pub choice: &'a Choice,
    /// The plan of the chosen IDs (absent when nothing was chosen).
    pub plan: Option<&'a Plan>,
    /// Whether the plan was executed (not a dry run, nothing blocked it).
    pub executed: bool,
    /// Bytes freed, as containerd's content store measured them (executed runs).
    pub freed: i64,
    /// Image-filesystem usage at the start, in percent (watermark runs).
    pub usage_percent: Option<i32>,
    /// When the schedule runs next (Unix seconds).
    pub next_run: Option<i64>,
    /// The entry of the previous run of this policy, for the totals.
    pub previous: Option<&'a PolicyRun>,
    /// Now.
    pub now: Time,
}

/// The report entry for one run.
pub fn run_entry(facts: &RunFacts<'_>) -> PolicyRun {
    let dry_run = facts.policy.spec.dry_run;
    let outcomes: BTreeMap<&str, &Outcome> = facts
        .plan
        .map(|p| {
            p.items
                .iter()
                .map(|i| (i.input.as_str(), &i.outcome))
                .collect()
        })
        .unwrap_or_default();
    let run = if facts.executed {
        report::Run::Executed
    } else {
        report::Run::Planned
    };
    let outcome_of = |id: &str| -> ImageOutcome {
        outcomes
            .get(id)
            .map_or(ImageOutcome::NotPresent, |o| report::image_outcome(o, run))
    };
    let removed = if facts.executed {
        facts
            .choice
            .chosen
            .iter()
            .filter(|c| outcome_of(&c.id) == ImageOutcome::Removed)
            .count() as i32
    } else {
        0
    };
    let images = facts
        .choice
        .chosen
        .iter()
        .take(MAX_POLICY_IMAGES)
        .map(|c| PrunedImage {
            id: c.id.clone(),
            references: c
                .references
                .iter()
                .take(MAX_REFERENCES)
                .map(|r| truncate(r, MAX_MESSAGE))
                .collect(),
            size: c.size,
            outcome: outcome_of(&c.id),
            reason: truncate(&c.reason, MAX_MESSAGE),
        })
        .collect();
    let bytes_freed = if dry_run {
        facts.choice.bytes
    } else {
        facts.freed
    };
    let previous = facts
        .previous
        .filter(|p| p.uid == facts.policy.uid().unwrap_or_default());
    let (total_removed, total_bytes) =
        previous.map_or((0, 0), |p| (p.total_removed, p.total_bytes_freed));
    let (added_removed, added_bytes) = if dry_run {
        (0, 0)
    } else {
        (i64::from(removed), facts.freed.max(0))
    };
    PolicyRun {
        name: facts.policy.name_any(),
        uid: facts.policy.uid().unwrap_or_default(),
        generation: facts.policy.metadata.generation.unwrap_or(0),
        trigger: facts.trigger,
        dry_run,
        last_run: Some(facts.now.clone()),
        next_run: facts
            .next_run
            .and_then(|t| Timestamp::from_second(t).ok())
            .map(Time),
        chosen: facts.choice.chosen.len() as i32,
        removed,
        bytes_freed,
        usage_percent: facts.usage_percent,
        total_removed: total_removed.saturating_add(added_removed),
        total_bytes_freed: total_bytes.saturating_add(added_bytes),
        images,
        message: String::new(),
    }
}

/// Whether two entries tell the same story, apart from when (a watermark run that changes
/// nothing is not worth an API write every few seconds). The reasons are left out too: they
/// hold ages ("unused for 3h"), which change from one run to the next.
pub fn same_outcome(a: &PolicyRun, b: &PolicyRun) -> bool {
    let timeless = |r: &PolicyRun| PolicyRun {
        last_run: None,
        next_run: None,
        usage_percent: None,
        images: r
            .images
            .iter()
            .map(|i| PrunedImage {
                reason: String::new(),
                ..i.clone()
            })
            .collect(),
        ..r.clone()
    };
    timeless(a) == timeless(b)
}

/// The report's policy entries after `new` (if any) replaces the entry of the same name;
/// entries of policies that no longer exist or no longer select this node (`live` holds the
/// `(name, uid)` pairs that do) go. Sorted by name, at most [`MAX_POLICIES`].
pub fn merge(
    current: &[PolicyRun],
    new: Option<PolicyRun>,
    live: &BTreeSet<(String, String)>,
) -> Vec<PolicyRun> {
    let mut by_name: BTreeMap<String, PolicyRun> = current
        .iter()
        .map(|r| (r.name.clone(), r.clone()))
        .collect();
    if let Some(new) = new {
        by_name.insert(new.name.clone(), new);
    }
    by_name
        .into_values()
        .filter(|r| live.contains(&(r.name.clone(), r.uid.clone())))
        .take(MAX_POLICIES)
        .collect()
}

/// The usage of the filesystem holding `path`, as the kubelet computes it for its image
/// filesystem: capacity is the filesystem's size, used is capacity minus what an
/// unprivileged writer may still use.
pub fn filesystem_usage(path: &Path) -> Result<Usage, nix::Error> {
    let st = nix::sys::statvfs::statvfs(path)?;
    let fragment = st.fragment_size() as i64;
    let capacity = (st.blocks() as i64).saturating_mul(fragment);
    let available = (st.blocks_available() as i64).saturating_mul(fragment);
    Ok(Usage {
        used_bytes: capacity.saturating_sub(available),
        capacity_bytes: capacity,
    })
}

fn now_unix() -> i64 {
    Timestamp::now().as_second()
}

/// `at` (Unix seconds) as an `Instant`, for the agent's sleep.
fn instant_at(at: i64) -> Instant {
    Instant::now() + Duration::from_secs(at.saturating_sub(now_unix()).max(0) as u64)
}

/// Why a policy runs now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Firing {
    /// What started it.
    pub trigger: Trigger,
    /// What the watermark asks to free (watermark runs).
    pub bytes_to_free: Option<i64>,
    /// Image-filesystem usage in percent when it fired (watermark runs).
    pub usage_percent: Option<i32>,
}

/// Whether a policy runs at `now` (Unix seconds): its scheduled time `next` has come, or the
/// image filesystem is above its `watermark` (given only when the watermark is checked now).
/// The usage is read, by `read_usage`, only when the schedule did not fire; missing data never
/// prunes.
pub fn firing(
    next: Option<i64>,
    now: i64,
    watermark: Option<&Watermark>,
    read_usage: impl FnOnce() -> Option<Usage>,
) -> Option<Firing> {
    if next.is_some_and(|at| now >= at) {
        return Some(Firing {
            trigger: Trigger::Schedule,
            bytes_to_free: None,
            usage_percent: None,
        });
    }
    let watermark = watermark?;
    let usage = read_usage()?;
    let bytes = prune::watermark_target(&usage, watermark).ok()??;
    Some(Firing {
        trigger: Trigger::Watermark,
        bytes_to_free: Some(bytes),
        usage_percent: Some(percent(&usage)),
    })
}

/// Where this node's runs of one policy fall: the node, the policy's UID, the jitter bound.
#[derive(Clone, Copy, Debug)]
pub struct Offset<'a> {
    /// This node.
    pub node: &'a str,
    /// The policy's UID.
    pub uid: &'a str,
    /// Seconds a scheduled run may be offset on this node.
    pub max_jitter: i64,
}

/// When a policy of `generation` runs next on this node: as `current` planned it if it is of
/// the same generation, else as [`plan_next`] computes it.
pub fn planned(
    current: Option<&Planned>,
    generation: i64,
    schedule: Option<&schedule::Schedule>,
    previous: Option<&PolicyRun>,
    offset: Offset<'_>,
    now: i64,
) -> Planned {
    match current {
        Some(p) if p.generation == generation => p.clone(),
        _ => Planned {
            generation,
            next: schedule.and_then(|s| {
                plan_next(
                    s,
                    previous,
                    generation,
                    offset.node,
                    offset.uid,
                    offset.max_jitter,
                    now,
                )
            }),
        },
    }
}

/// The scheduled time after the one that fired at `at`, seen at `now`.
pub fn following(
    schedule: Option<&schedule::Schedule>,
    at: i64,
    now: i64,
    offset: Offset<'_>,
) -> Option<i64> {
    schedule.and_then(|s| {
        schedule::next_run(s, at.max(now), offset.node, offset.uid, offset.max_jitter)
            .map(|(_, at)| at)
    })
}

/// Whether the run `entry` is worth recording: a watermark run that tells the same story as
/// the `previous` one is not (no API write every few seconds for nothing).
pub fn worth_recording(trigger: Trigger, previous: Option<&PolicyRun>, entry: &PolicyRun) -> bool {
    !(trigger == Trigger::Watermark && previous.is_some_and(|p| same_outcome(p, entry)))
}

/// The image filesystem watermarks read.
#[derive(Debug)]
struct ImageFs {
    /// A directory on it.
    path: std::path::PathBuf,
    /// Whether the last read of its usage worked (logs only the transitions).
    readable: bool,
    /// How often its usage is compared with the watermarks.
    check: Duration,
    /// When it is compared next.
    due: Instant,
}

/// What the agent knows of policies: the report's entries, when each runs next, the failures.
#[derive(Debug)]
pub struct Policies {
    /// The report's policy entries as last written.
    pub entries: Vec<PolicyRun>,
    /// When each scheduled policy (by UID) runs next on this node.
    planned: HashMap<String, Planned>,
    /// Consecutive failed runs of each policy (by UID) on the runtime: the backoff, and one
    /// Event per streak.
    failing: HashMap<String, u32>,
    /// What no policy may remove.
    protections: Protections,
    /// The protection globs, compiled.
    protected: Protected,
    /// Seconds a scheduled run may be offset on this node.
    max_jitter: i64,
    image_fs: ImageFs,
}

impl Policies {
    /// Nothing run yet; the watermarks are checked at once, then every `watermark_check`.
    pub fn new(
        protections: Protections,
        protected: Protected,
        max_jitter: i64,
        image_fs: std::path::PathBuf,
        watermark_check: Duration,
    ) -> Policies {
        Policies {
            entries: Vec::new(),
            planned: HashMap::new(),
            failing: HashMap::new(),
            protections,
            protected,
            max_jitter,
            image_fs: ImageFs {
                path: image_fs,
                readable: true,
                check: watermark_check,
                due: Instant::now(),
            },
        }
    }

    /// Whether the watermarks are checked in the pass at `now` (then the next check is
    /// scheduled).
    fn watermark_tick(&mut self, now: Instant) -> bool {
        let due = now >= self.image_fs.due;
        if due {
            self.image_fs.due = now + self.image_fs.check;
        }
        due
    }

    /// `policy` compiled, if it selects a node labelled `labels`, is not being deleted and is
    /// valid (an invalid one is the controller's to report).
    fn compile_if_selected(
        &self,
        policy: &ImagePrunePolicy,
        labels: &BTreeMap<String, String>,
    ) -> Option<Compiled> {
        if policy.metadata.deletion_timestamp.is_some() {
            return None;
        }
        match report::targets(policy.spec.node_selector.as_ref(), labels) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::debug!(policy = %policy.name_any(), error = %e, "selector cannot be evaluated; the controller reports it");
                return None;
            }
        }
        policy::compile(&policy.spec, &self.protections)
            .inspect_err(|e| tracing::debug!(policy = %policy.name_any(), error = %e, "invalid policy; the controller reports it"))
            .ok()
    }

    /// Records a failed run: returns the failure count and the backoff.
    fn failed(&mut self, uid: &str) -> (u32, Duration) {
        let attempts = self.failing.entry(uid.to_string()).or_insert(0);
        *attempts += 1;
        (*attempts, backoff(*attempts))
    }

    /// Ends a pass over `all`: keeps `planned`, forgets the failures of deleted policies and
    /// the entries of those that no longer select this node. Returns whether the entries
    /// changed.
    fn finish_pass(
        &mut self,
        planned: HashMap<String, Planned>,
        all: &[Arc<ImagePrunePolicy>],
        live: &BTreeSet<(String, String)>,
    ) -> bool {
        self.planned = planned;
        // A deleted policy's failure streak goes with it: memory stays flat as policies come
        // and go.
        let uids: HashSet<String> = all.iter().filter_map(|p| p.uid()).collect();
        self.failing.retain(|uid, _| uids.contains(uid));
        let pruned = merge(&self.entries, None, live);
        let changed = pruned != self.entries;
        self.entries = pruned;
        changed
    }

    /// Reads the image filesystem's usage; logs a failure once per transition.
    fn read_image_fs_usage(&mut self, metrics: &super::metrics::Metrics) -> Option<Usage> {
        let fs = &mut self.image_fs;
        match filesystem_usage(&fs.path) {
            Ok(u) => {
                if !fs.readable {
                    tracing::info!(path = %fs.path.display(), "image filesystem readable again");
                    fs.readable = true;
                }
                metrics.image_fs_usage(i64::from(percent(&u)));
                Some(u)
            }
            Err(e) => {
                if fs.readable {
                    tracing::warn!(
                        path = %fs.path.display(),
                        error = %e,
                        "cannot read the image filesystem's usage; watermark policies do not run until it can be read (mount containerd's root and pass --image-fs)"
                    );
                    fs.readable = false;
                }
                None
            }
        }
    }
}

/// One pass over the policies: what it found so far.
struct Pass<'a> {
    /// The `(name, uid)` of the policies that select this node.
    live: BTreeSet<(String, String)>,
    /// Whether the watermarks are checked in this pass.
    watermark_due: bool,
    /// The image filesystem's usage, once read (and until a run frees space).
    usage: Option<Usage>,
    /// When each policy runs next.
    planned: HashMap<String, Planned>,
    /// Whether the report's entries changed.
    changed: bool,
    /// When the agent must wake next at the latest.
    next: &'a mut Instant,
}

impl Agent {
    /// Evaluates every policy that selects this node: runs the due ones, forgets the deleted
    /// ones. Returns whether the report's entries changed; lowers `next` to when a policy is
    /// due next.
    pub(super) async fn evaluate_policies(
        &mut self,
        store: &Store<ImagePrunePolicy>,
        labels: &BTreeMap<String, String>,
        next: &mut Instant,
    ) -> bool {
        // Before the first listing the store is empty: evaluating would drop every entry.
        if futures::FutureExt::now_or_never(store.wait_until_ready()).is_none() {
            return false;
        }
        let mut all = store.state();
        all.sort_by_key(|p| p.name_any());
        let mut pass = Pass {
            live: live_so_far(&all, labels),
            watermark_due: self.policies.watermark_tick(Instant::now()),
            usage: None,
            planned: HashMap::new(),
            changed: false,
            next,
        };
        // A node that opted out runs no policy.
        if !report::node_excluded(labels) {
            for policy in &all {
                if let Some(compiled) = self.policies.compile_if_selected(policy, labels) {
                    self.evaluate_policy(policy, &compiled, &mut pass).await;
                }
            }
        }
        if policies_with_watermark(&all, labels) {
            *pass.next = (*pass.next).min(self.policies.image_fs.due);
        }
        let changed = pass.changed;
        self.policies.finish_pass(pass.planned, &all, &pass.live) || changed
    }

    /// Evaluates one selected policy: plans its next time, and runs it if it is due.
    async fn evaluate_policy(
        &mut self,
        policy: &ImagePrunePolicy,
        compiled: &Compiled,
        pass: &mut Pass<'_>,
    ) {
        let uid = policy.uid().unwrap_or_default();
        let generation = policy.metadata.generation.unwrap_or(0);
        let offset = Offset {
            node: &self.node,
            uid: &uid,
            max_jitter: self.policies.max_jitter,
        };
        let name = policy.name_any();
        let previous = self
            .policies
            .entries
            .iter()
            .find(|r| r.name == name)
            .cloned();
        let now = now_unix();
        let mut plan = planned(
            self.policies.planned.get(&uid),
            generation,
            compiled.schedule.as_ref(),
            previous.as_ref(),
            offset,
            now,
        );
        let watermark = compiled.watermark.as_ref().filter(|_| pass.watermark_due);
        let (policies, metrics) = (&mut self.policies, &self.metrics);
        let fired = firing(plan.next, now, watermark, || {
            if pass.usage.is_none() {
                pass.usage = policies.read_image_fs_usage(metrics);
            }
            pass.usage.clone()
        });
        if let (Some(f), Some(at)) = (&fired, plan.next)
            && f.trigger == Trigger::Schedule
        {
            plan.next = following(compiled.schedule.as_ref(), at, now_unix(), offset);
        }
        if let Some(at) = plan.next {
            *pass.next = (*pass.next).min(instant_at(at));
        }
        pass.planned.insert(uid.clone(), plan.clone());
        let Some(fired) = fired else { return };
        match self
            .run_policy(policy, compiled, &fired, plan.next, previous.as_ref())
            .await
        {
            Ok(entry) => {
                self.policies.failing.remove(&uid);
                if worth_recording(fired.trigger, previous.as_ref(), &entry) {
                    self.metrics.policy_run(&entry);
                    let merged = merge(&self.policies.entries, Some(entry), &pass.live);
                    // Past MAX_POLICIES an entry may not be kept: no write for nothing.
                    if merged != self.policies.entries {
                        self.policies.entries = merged;
                        pass.changed = true;
                    }
                }
                if !compiled.dry_run {
                    // Freed space shows in the next reading; read again before another
                    // watermark policy decides.
                    pass.usage = None;
                }
            }
            Err(e) => {
                self.policy_failed(policy, fired.trigger, generation, &e, pass)
                    .await
            }
        }
    }

    /// Records a failed run: metrics, a log line, one Event per streak, and (scheduled runs)
    /// a retry with backoff (1 s doubling to 5 min) rather than at the next tick; a
    /// watermark run is retried at the next check.
    async fn policy_failed(
        &mut self,
        policy: &ImagePrunePolicy,
        trigger: Trigger,
        generation: i64,
        e: &RuntimeError,
        pass: &mut Pass<'_>,
    ) {
        self.metrics.runtime_error(e);
        let uid = policy.uid().unwrap_or_default();
        let (attempts, delay) = self.policies.failed(&uid);
        tracing::warn!(policy = %policy.name_any(), attempt = attempts, retry_in_seconds = delay.as_secs(), error = %e, "policy run failed on containerd; will retry");
        if attempts == 1 {
            let note = format!("node {}: {e}; retrying", self.node);
            self.events
                .publish(policy, Severity::Warning, "ContainerdError", "Prune", &note)
                .await;
        }
        if trigger == Trigger::Schedule {
            let retry = Planned {
                generation,
                next: Some(now_unix() + delay.as_secs() as i64),
            };
            pass.planned.insert(uid, retry);
            *pass.next = (*pass.next).min(Instant::now() + delay);
        }
    }

    /// One run of `policy`: choose, remove in one batch (unless a dry run), and build the
    /// report entry.
    async fn run_policy(
        &mut self,
        policy: &ImagePrunePolicy,
        compiled: &Compiled,
        fired: &Firing,
        next_run: Option<i64>,
        previous: Option<&PolicyRun>,
    ) -> Result<PolicyRun, RuntimeError> {
        // New images get their first-seen before they are judged.
        let reading = self.connection.read_and_stamp().await?;
        let inv = &reading.inventory;
        let now = now_unix();
        let candidates = policy::candidates(inv, &reading.records, now);
        let choice = prune::select(&candidates, &compiled.selector, now, fired.bytes_to_free);
        let mut plan_of_chosen = None;
        let mut executed = false;
        let mut freed = 0;
        // A run killed half-way left journalled records: any later run that may remove
        // finishes them first (and deletes the journal), even when it chooses nothing new.
        let resume = !compiled.dry_run && inv.interrupted();
        if !choice.chosen.is_empty() || resume {
            let plan = plan::plan(
                &Request {
                    images: choice.chosen.iter().map(|c| c.id.clone()).collect(),
                    force: false,
                    protected: self.policies.protected.clone(),
                },
                inv,
            );
            if !compiled.dry_run && !report::is_blocked(&plan) {
                let done = self
                    .connection
                    .execute(&reading.runtime, plan.clone())
                    .await?;
                freed = done.freed_bytes;
                executed = true;
                // The node's images changed: report them with the run.
                self.inventory.due = Instant::now();
            }
            plan_of_chosen = Some(plan);
        }
        let entry = run_entry(&RunFacts {
            policy,
            trigger: fired.trigger,
            choice: &choice,
            plan: plan_of_chosen.as_ref(),
            executed,
            freed,
            usage_percent: fired.usage_percent,
            next_run,
            previous,
            now: Time(Timestamp::now()),
        });
        log_run(&entry, fired, &choice);
        Ok(entry)
    }
}

/// One log line per run, with why the images not chosen were kept.
fn log_run(entry: &PolicyRun, fired: &Firing, choice: &Choice) {
    let mut skipped: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &choice.skipped {
        *skipped.entry(s.reason.kind()).or_default() += 1;
    }
    tracing::info!(
        policy = %entry.name,
        trigger = ?fired.trigger,
        dry_run = entry.dry_run,
        chosen = entry.chosen,
        removed = entry.removed,
        bytes_freed = entry.bytes_freed,
        bytes_to_free = ?fired.bytes_to_free,
        kept = ?skipped,
        "policy ran on this node"
    );
}

/// Whether any policy selecting a node labelled `labels` has a watermark.
fn policies_with_watermark(
    all: &[Arc<ImagePrunePolicy>],
    labels: &BTreeMap<String, String>,
) -> bool {
    all.iter().any(|p| {
        p.spec.watermark.is_some()
            && report::targets(p.spec.node_selector.as_ref(), labels) == Ok(true)
    })
}

/// The `(name, uid)` of every policy that selects a node labelled `labels`.
fn live_so_far(
    all: &[Arc<ImagePrunePolicy>],
    labels: &BTreeMap<String, String>,
) -> BTreeSet<(String, String)> {
    all.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| report::targets(p.spec.node_selector.as_ref(), labels) == Ok(true))
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(reason: &str, at: i64) -> PolicyRun {
        PolicyRun {
            name: "guard".into(),
            uid: "u".into(),
            chosen: 1,
            last_run: Timestamp::from_second(at).ok().map(Time),
            usage_percent: Some(90),
            images: vec![PrunedImage {
                id: "sha256:a".into(),
                references: Vec::new(),
                size: 0,
                outcome: ImageOutcome::WouldRemove,
                reason: reason.into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_run_that_differs_only_in_times_and_ages_is_the_same() {
        let a = entry("unused for 3h", 100);
        assert!(same_outcome(&a, &entry("unused for 4h", 4000)));
        let mut b = entry("unused for 3h", 100);
        b.images[0].outcome = ImageOutcome::Removed;
        assert!(!same_outcome(&a, &b));
        let mut c = entry("unused for 3h", 100);
        c.total_removed = 1;
        assert!(!same_outcome(&a, &c));
    }

    #[test]
    fn merge_keeps_live_entries_by_name_and_at_most_the_bound() {
        let live: BTreeSet<(String, String)> = (0..MAX_POLICIES + 5)
            .map(|n| (format!("p{n:02}"), format!("u{n}")))
            .collect();
        let mut entries = Vec::new();
        for (name, uid) in &live {
            let run = PolicyRun {
                name: name.clone(),
                uid: uid.clone(),
                ..Default::default()
            };
            entries = merge(&entries, Some(run), &live);
        }
        assert_eq!(entries.len(), MAX_POLICIES);
        assert_eq!(entries[0].name, "p00");
        // A deleted (or re-created: another UID) policy's entry goes.
        let mut fewer = live.clone();
        fewer.remove(&("p00".to_string(), "u0".to_string()));
        assert!(
            merge(&entries, None, &fewer)
                .iter()
                .all(|e| e.name != "p00")
        );
    }

    fn usage(percent: i64) -> Usage {
        Usage {
            used_bytes: percent * 10,
            capacity_bytes: 1000,
        }
    }

    #[test]
    fn a_policy_fires_on_its_time_without_reading_the_disk() {
        let wm = Watermark {
            high_percent: 80,
            low_percent: 60,
        };
        let unread = || -> Option<Usage> { panic!("the usage must not be read") };
        let f = firing(Some(100), 100, Some(&wm), unread).unwrap();
        assert_eq!(f.trigger, Trigger::Schedule);
        assert_eq!((f.bytes_to_free, f.usage_percent), (None, None));
        assert_eq!(firing(Some(101), 100, None, unread), None, "not yet");
        assert_eq!(firing(None, 100, None, unread), None, "no schedule");
    }

    #[test]
    fn a_policy_fires_above_its_watermark_only_when_checked() {
        let wm = Watermark {
            high_percent: 80,
            low_percent: 60,
        };
        let f = firing(None, 100, Some(&wm), || Some(usage(90))).unwrap();
        assert_eq!(f.trigger, Trigger::Watermark);
        assert_eq!(f.bytes_to_free, Some(300), "down to 60 % of 1000 bytes");
        assert_eq!(f.usage_percent, Some(90));
        assert_eq!(firing(None, 100, Some(&wm), || Some(usage(70))), None);
        // Unreadable: missing data never prunes.
        assert_eq!(firing(None, 100, Some(&wm), || None), None);
        // Not checked in this pass (no watermark given): not read, not fired.
        assert_eq!(firing(None, 100, None, || panic!("read")), None);
    }

    #[test]
    fn the_plan_is_kept_for_its_generation_and_resumed_after_a_restart() {
        let every_minute = schedule::Schedule::parse("* * * * *").unwrap();
        let offset = Offset {
            node: "n1",
            uid: "u",
            max_jitter: 0,
        };
        let kept = Planned {
            generation: 2,
            next: Some(5),
        };
        assert_eq!(
            planned(Some(&kept), 2, Some(&every_minute), None, offset, 1000),
            kept
        );
        // A new generation plans afresh: the next tick after now.
        let fresh = planned(Some(&kept), 3, Some(&every_minute), None, offset, 1000);
        assert_eq!(fresh.generation, 3);
        assert!(
            fresh.next.is_some_and(|t| t > 1000 && t <= 1060),
            "{fresh:?}"
        );
        // A run planned before a restart still counts, for the same generation.
        let previous = PolicyRun {
            uid: "u".into(),
            generation: 3,
            next_run: Timestamp::from_second(900).ok().map(Time),
            ..Default::default()
        };
        let resumed = planned(None, 3, Some(&every_minute), Some(&previous), offset, 1000);
        assert_eq!(resumed.next, Some(900));
        assert_eq!(planned(None, 3, None, None, offset, 1000).next, None);
        let after = following(Some(&every_minute), 900, 1000, offset);
        assert!(after.is_some_and(|t| t > 1000), "{after:?}");
    }

    #[test]
    fn only_a_watermark_run_that_changes_nothing_goes_unrecorded() {
        let a = entry("unused for 3h", 100);
        let same = entry("unused for 4h", 200);
        assert!(!worth_recording(Trigger::Watermark, Some(&a), &same));
        assert!(worth_recording(Trigger::Schedule, Some(&a), &same));
        assert!(worth_recording(Trigger::Watermark, None, &same));
        let mut removed = entry("unused for 3h", 100);
        removed.removed = 1;
        assert!(worth_recording(Trigger::Watermark, Some(&a), &removed));
    }

    #[test]
    fn percent_rounds_up_and_survives_nonsense() {
        let u = |used, capacity| Usage {
            used_bytes: used,
            capacity_bytes: capacity,
        };
        assert_eq!(percent(&u(841, 1000)), 85);
        assert_eq!(percent(&u(0, 1000)), 0);
        assert_eq!(percent(&u(5, 0)), 0);
        assert_eq!(percent(&u(-5, 10)), 0);
        assert_eq!(percent(&u(i64::MAX, 1)), 100);
    }
}
