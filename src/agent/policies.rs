//! ImagePrunePolicies on this node: which ones select it, when each is due (its schedule at
//! this node's offset, or its watermark), and one run: choose (`core::prune`), remove the
//! chosen images in one batch (one garbage collection), record the run in the node's report.
//! The functions at the top are pure; the `Agent` methods at the bottom are the shell.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store;

use super::{Agent, report};
use crate::api::{
    ImagePrunePolicy, MAX_MESSAGE, MAX_POLICIES, MAX_POLICY_IMAGES, MAX_REFERENCES, PolicyRun,
    PrunedImage, Trigger,
};
use crate::core::plan::{self, Outcome, Plan, Request};
use crate::core::policy::{self, Compiled};
use crate::core::prune::{self, Choice, Usage};
use crate::core::schedule;
use crate::events::{Severity, truncate};
use crate::runtime::RuntimeError;

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
    let outcome_of = |id: &str| -> &'static str {
        match outcomes.get(id) {
            Some(Outcome::Remove { .. }) if facts.executed => "Removed",
            Some(Outcome::Remove { .. }) => "WouldRemove",
            Some(other) => other.kind(),
            None => "NotPresent",
        }
    };
    let removed = if facts.executed {
        facts
            .choice
            .chosen
            .iter()
            .filter(|c| outcome_of(&c.id) == "Removed")
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
            outcome: outcome_of(&c.id).into(),
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

impl Agent {
    /// Evaluates every policy that selects this node: runs the due ones, forgets the deleted
    /// ones. Returns whether the report's entries changed; lowers `next` to when a policy is
    /// due next.
    pub(super) async fn evaluate_policies(
        &mut self,
        policies: &Store<ImagePrunePolicy>,
        labels: &BTreeMap<String, String>,
        next: &mut Instant,
    ) -> bool {
        // Before the first listing the store is empty: evaluating would drop every entry.
        if futures::FutureExt::now_or_never(policies.wait_until_ready()).is_none() {
            return false;
        }
        let mut all = policies.state();
        all.sort_by_key(|p| p.name_any());
        let live = live_so_far(&all, labels);
        let mut changed = false;
        let mut usage: Option<Usage> = None;
        let watermark_due = Instant::now() >= self.watermark_due;
        if watermark_due {
            self.watermark_due = Instant::now() + self.watermark_check;
        }
        let mut planned: HashMap<String, Planned> = HashMap::new();
        // A node that opted out runs no policy.
        let excluded = report::node_excluded(labels);
        for policy in &all {
            if excluded || policy.metadata.deletion_timestamp.is_some() {
                continue;
            }
            match report::targets(policy.spec.node_selector.as_ref(), labels) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::debug!(policy = %policy.name_any(), error = %e, "selector cannot be evaluated; the controller reports it");
                    continue;
                }
            }
            let uid = policy.uid().unwrap_or_default();
            let generation = policy.metadata.generation.unwrap_or(0);
            let compiled = match policy::compile(&policy.spec, &self.protections) {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(policy = %policy.name_any(), error = %e, "invalid policy; the controller reports it");
                    continue;
                }
            };
            let previous = self
                .policy_entries
                .iter()
                .find(|r| r.name == policy.name_any())
                .cloned();
            let mut plan = match self.planned.get(&uid) {
                Some(p) if p.generation == generation => p.clone(),
                _ => Planned {
                    generation,
                    next: compiled.schedule.as_ref().and_then(|s| {
                        plan_next(
                            s,
                            previous.as_ref(),
                            generation,
                            &self.node,
                            &uid,
                            self.max_jitter,
                            now_unix(),
                        )
                    }),
                },
            };

            let mut trigger = None;
            if let Some(at) = plan.next
                && now_unix() >= at
            {
                trigger = Some((Trigger::Schedule, None, None));
                plan.next = compiled.schedule.as_ref().and_then(|s| {
                    schedule::next_run(s, at.max(now_unix()), &self.node, &uid, self.max_jitter)
                        .map(|(_, at)| at)
                });
            }
            if trigger.is_none()
                && watermark_due
                && let Some(wm) = &compiled.watermark
            {
                if usage.is_none() {
                    usage = self.read_image_fs_usage();
                }
                if let Some(u) = &usage
                    && let Ok(Some(bytes)) = prune::watermark_target(u, wm)
                {
                    trigger = Some((Trigger::Watermark, Some(bytes), Some(percent(u))));
                }
            }
            if let Some(at) = plan.next {
                *next = (*next).min(instant_at(at));
            }
            planned.insert(uid.clone(), plan.clone());
            let Some((trigger, bytes_to_free, usage_percent)) = trigger else {
                continue;
            };
            match self
                .run_policy(
                    policy,
                    &compiled,
                    trigger,
                    bytes_to_free,
                    usage_percent,
                    plan.next,
                    previous.as_ref(),
                )
                .await
            {
                Ok(entry) => {
                    self.policy_failing.remove(&uid);
                    let quiet = trigger == Trigger::Watermark
                        && previous.as_ref().is_some_and(|p| same_outcome(p, &entry));
                    if !quiet {
                        self.metrics.policy_run(&entry);
                        let merged = merge(&self.policy_entries, Some(entry), &live);
                        // Past MAX_POLICIES an entry may not be kept: no write for nothing.
                        if merged != self.policy_entries {
                            self.policy_entries = merged;
                            changed = true;
                        }
                    }
                    if !compiled.dry_run {
                        // Freed space shows in the next reading; read again before another
                        // watermark policy decides.
                        usage = None;
                    }
                }
                Err(e) => {
                    self.metrics.runtime_error(&e);
                    let attempts = self.policy_failing.entry(uid.clone()).or_insert(0);
                    *attempts += 1;
                    let (attempts, delay) = (*attempts, super::backoff(*attempts));
                    tracing::warn!(policy = %policy.name_any(), attempt = attempts, retry_in_seconds = delay.as_secs(), error = %e, "policy run failed on containerd; will retry");
                    if attempts == 1 {
                        let note = format!("node {}: {e}; retrying", self.node);
                        self.events
                            .publish(
                                &**policy,
                                Severity::Warning,
                                "ContainerdError",
                                "Prune",
                                &note,
                            )
                            .await;
                    }
                    // Try again with backoff (1 s doubling to 5 min) rather than at the next
                    // tick; a watermark run is retried at the next check.
                    if trigger == Trigger::Schedule {
                        planned.insert(
                            uid.clone(),
                            Planned {
                                generation,
                                next: Some(now_unix() + delay.as_secs() as i64),
                            },
                        );
                        *next = (*next).min(Instant::now() + delay);
                    }
                }
            }
        }
        if self.policies_with_watermark(&all, labels) {
            *next = (*next).min(self.watermark_due);
        }
        self.planned = planned;
        // A deleted policy's failure streak goes with it: memory stays flat as policies come
        // and go.
        let uids: std::collections::HashSet<String> = all.iter().filter_map(|p| p.uid()).collect();
        self.policy_failing.retain(|uid, _| uids.contains(uid));
        let pruned = merge(&self.policy_entries, None, &live);
        if pruned != self.policy_entries {
            self.policy_entries = pruned;
            changed = true;
        }
        changed
    }

    /// Whether any policy selecting this node has a watermark.
    fn policies_with_watermark(
        &self,
        all: &[std::sync::Arc<ImagePrunePolicy>],
        labels: &BTreeMap<String, String>,
    ) -> bool {
        all.iter().any(|p| {
            p.spec.watermark.is_some()
                && report::targets(p.spec.node_selector.as_ref(), labels) == Ok(true)
        })
    }

    /// Reads the image filesystem's usage; logs a failure once per transition (missing data
    /// never prunes).
    fn read_image_fs_usage(&mut self) -> Option<Usage> {
        match filesystem_usage(&self.image_fs) {
            Ok(u) => {
                if !self.image_fs_ok {
                    tracing::info!(path = %self.image_fs.display(), "image filesystem readable again");
                    self.image_fs_ok = true;
                }
                self.metrics.image_fs_usage(i64::from(percent(&u)));
                Some(u)
            }
            Err(e) => {
                if self.image_fs_ok {
                    tracing::warn!(
                        path = %self.image_fs.display(),
                        error = %e,
                        "cannot read the image filesystem's usage; watermark policies do not run until it can be read (mount containerd's root and pass --image-fs)"
                    );
                    self.image_fs_ok = false;
                }
                None
            }
        }
    }

    /// One run of `policy`: choose, remove in one batch (unless a dry run), and build the
    /// report entry.
    #[allow(clippy::too_many_arguments)]
    async fn run_policy(
        &mut self,
        policy: &ImagePrunePolicy,
        compiled: &Compiled,
        trigger: Trigger,
        bytes_to_free: Option<i64>,
        usage_percent: Option<i32>,
        next_run: Option<i64>,
        previous: Option<&PolicyRun>,
    ) -> Result<PolicyRun, RuntimeError> {
        let (inv, records) = self.inventory().await?;
        let rt = self.runtime().await?;
        // New images get their first-seen before they are judged.
        self.stamp_first_seen_and_last_used(&rt, &inv, &records)
            .await;
        let now = now_unix();
        let candidates = policy::candidates(&inv, &records, now);
        let choice = prune::select(&candidates, &compiled.selector, now, bytes_to_free);
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
                    protected: self.protected.clone(),
                },
                &inv,
            );
            if !compiled.dry_run && !report::blocked(&plan) {
                let done = rt.execute(plan.clone()).await.inspect_err(|_| {
                    self.runtime = None;
                    self.health.set_ready(false);
                })?;
                freed = done.freed_bytes;
                executed = true;
                // The node's images changed: report them with the run.
                self.inventory_due = Instant::now();
            }
            plan_of_chosen = Some(plan);
        }
        let entry = run_entry(&RunFacts {
            policy,
            trigger,
            choice: &choice,
            plan: plan_of_chosen.as_ref(),
            executed,
            freed,
            usage_percent,
            next_run,
            previous,
            now: Time(Timestamp::now()),
        });
        let mut skipped: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &choice.skipped {
            *skipped.entry(s.reason.kind()).or_default() += 1;
        }
        tracing::info!(
            policy = %entry.name,
            trigger = ?trigger,
            dry_run = entry.dry_run,
            chosen = entry.chosen,
            removed = entry.removed,
            bytes_freed = entry.bytes_freed,
            bytes_to_free = ?bytes_to_free,
            kept = ?skipped,
            "policy ran on this node"
        );
        Ok(entry)
    }
}

/// The `(name, uid)` of every policy that selects a node labelled `labels`.
fn live_so_far(
    all: &[std::sync::Arc<ImagePrunePolicy>],
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
                outcome: "WouldRemove".into(),
                reason: reason.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_run_that_differs_only_in_times_and_ages_is_the_same() {
        let a = entry("unused for 3h", 100);
        assert!(same_outcome(&a, &entry("unused for 4h", 4000)));
        let mut b = entry("unused for 3h", 100);
        b.images[0].outcome = "Removed".into();
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
