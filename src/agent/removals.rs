//! ImageRemovals on this node: which are due (target the node, not done, not waiting for a
//! retry), one execution (refuse, plan, remove, report), and what the node remembers of them.
//! [`Removals`]' methods are pure, tested synchronously; the `Agent` methods at the bottom are
//! the shell.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};

use super::{Agent, now, report};
use crate::api::{ImageRemoval, RemovalPhase, RemovalResult};
use crate::core::plan::{self, Request};
use crate::core::prune::Protected;
use crate::events::Severity;
use crate::runtime::RuntimeError;
use crate::serve::backoff;
use report::Key;

/// The `(name, uid)` of every removal that exists: entries of others are forgotten.
pub type Live = BTreeSet<(String, String)>;

/// A removal that failed on the runtime and waits to be tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not before.
    pub next: Instant,
}

/// A removal to execute now.
#[derive(Clone, Debug)]
pub struct Pending {
    /// Which execution.
    pub key: Key,
    /// The object.
    pub removal: Arc<ImageRemoval>,
}

/// What is due in one pass.
#[derive(Clone, Debug, Default)]
pub struct Due {
    /// The removals to execute now, oldest first.
    pub pending: Vec<Pending>,
    /// When the earliest removal that waits for a retry is due.
    pub wake: Option<Instant>,
}

/// What the agent knows of removals: the report's entries and what must not run again.
#[derive(Debug, Default)]
pub struct Removals {
    /// The report's removal entries as last written.
    pub entries: Vec<RemovalResult>,
    /// Every execution finished by this process or found in the report at start. Entries can
    /// leave the report (it is bounded); this set keeps them from running again.
    done: HashSet<Key>,
    /// Removals (by UID) that failed on the runtime.
    retries: HashMap<String, Retry>,
    /// Whether forced removals are enabled on this node.
    allow_force: bool,
    /// The protection globs, compiled: what no removal may take, forced or not.
    protected: Protected,
}

impl Removals {
    /// Nothing done yet.
    pub fn new(allow_force: bool, protected: Protected) -> Removals {
        Removals {
            allow_force,
            protected,
            ..Removals::default()
        }
    }

    /// Takes over the entries of a report written before (e.g. before a restart): they are
    /// done.
    pub fn load(&mut self, entries: Vec<RemovalResult>) {
        self.done.extend(entries.iter().map(|r| Key {
            name: r.name.clone(),
            uid: r.uid.clone(),
            generation: r.generation,
        }));
        self.entries = entries;
    }

    /// Which of `all` (oldest first) are due on a node labelled `labels` at `now`: they
    /// target it, are not being deleted, are not done, and wait for no retry.
    pub fn due(
        &self,
        all: &[Arc<ImageRemoval>],
        labels: &BTreeMap<String, String>,
        now: Instant,
    ) -> Due {
        let mut due = Due::default();
        for removal in all {
            if removal.meta().deletion_timestamp.is_some() {
                continue;
            }
            match report::targets(removal.spec.node_selector.as_ref(), labels) {
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
                && retry.next > now
            {
                due.wake = Some(due.wake.map_or(retry.next, |w| w.min(retry.next)));
                continue;
            }
            due.pending.push(Pending {
                key,
                removal: removal.clone(),
            });
        }
        due
    }

    /// Records a finished execution: it is done, and its entry replaces the previous one.
    pub fn finished(&mut self, key: &Key, result: RemovalResult, live: &Live) {
        self.retries.remove(&key.uid);
        self.done.insert(key.clone());
        self.entries = report::merge(&self.entries, Some(result), live);
    }

    /// Records a failed attempt at `now`: the retry, with exponential backoff.
    pub fn failed(&mut self, key: &Key, now: Instant) -> Retry {
        let retry = self.retries.entry(key.uid.clone()).or_insert(Retry {
            attempts: 0,
            next: now,
        });
        retry.attempts += 1;
        retry.next = now + backoff(retry.attempts);
        *retry
    }

    /// Forgets removals that no longer exist (or were re-created), from the report and from
    /// memory: a removal that does not exist cannot run again. Returns whether the report's
    /// entries changed.
    pub fn forget_deleted(&mut self, live: &Live) -> bool {
        self.done
            .retain(|k| live.contains(&(k.name.clone(), k.uid.clone())));
        let uids: HashSet<&str> = live.iter().map(|(_, uid)| uid.as_str()).collect();
        self.retries.retain(|uid, _| uids.contains(uid.as_str()));
        let pruned = report::merge(&self.entries, None, live);
        let changed = pruned != self.entries;
        self.entries = pruned;
        changed
    }
}

/// `all` in the order they run: oldest first, then by name.
pub fn in_order(mut all: Vec<Arc<ImageRemoval>>) -> Vec<Arc<ImageRemoval>> {
    all.sort_by(|a, b| {
        (a.creation_timestamp(), a.name_any()).cmp(&(b.creation_timestamp(), b.name_any()))
    });
    all
}

/// The `(name, uid)` of each of `all`.
pub fn live(all: &[Arc<ImageRemoval>]) -> Live {
    all.iter()
        .map(|r| (r.name_any(), r.uid().unwrap_or_default()))
        .collect()
}

/// Which execution of `removal` is due: its UID and generation.
pub fn key_of(removal: &ImageRemoval) -> Key {
    Key {
        name: removal.name_any(),
        uid: removal.uid().unwrap_or_default(),
        generation: removal.meta().generation.unwrap_or(0),
    }
}

impl Agent {
    /// Executes the removals that are due on a node labelled `labels` and forgets deleted
    /// ones. Returns whether the report's entries changed; lowers `next` to when a retry is
    /// due.
    pub(super) async fn run_removals(
        &mut self,
        store: &Store<ImageRemoval>,
        labels: &BTreeMap<String, String>,
        next: &mut Instant,
    ) -> bool {
        let all = in_order(store.state());
        let live = live(&all);
        let due = self.removals.due(&all, labels, Instant::now());
        if let Some(wake) = due.wake {
            *next = (*next).min(wake);
        }
        let node_excluded = report::node_excluded(labels);
        let mut changed = false;
        for pending in due.pending {
            changed |= self.run_pending(&pending, node_excluded, &live, next).await;
        }
        self.removals.forget_deleted(&live) || changed
    }

    /// Executes one removal and records the result, or the failure and its retry. Returns
    /// whether the report's entries changed.
    async fn run_pending(
        &mut self,
        pending: &Pending,
        node_excluded: bool,
        live: &Live,
        next: &mut Instant,
    ) -> bool {
        let Pending { key, removal } = pending;
        match self.run_removal(key, removal, node_excluded).await {
            Ok(result) => {
                for image in &result.images {
                    self.metrics.image_outcome(image.outcome);
                }
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
                self.removals.finished(key, result, live);
                // An execution changed the node's images: report them with it.
                self.inventory.due = Instant::now();
                true
            }
            Err(e) => {
                let retry = self.removals.failed(key, Instant::now());
                *next = (*next).min(retry.next);
                self.metrics.runtime_error(&e);
                tracing::warn!(
                    removal = %key.name,
                    attempt = retry.attempts,
                    retry_in_seconds = backoff(retry.attempts).as_secs(),
                    error = %e,
                    "removal failed on containerd; will retry"
                );
                if retry.attempts == 1 {
                    let note = format!("node {}: {e}; retrying with backoff", self.node);
                    self.events
                        .publish(
                            removal.as_ref(),
                            Severity::Warning,
                            "ContainerdError",
                            "RemoveImages",
                            &note,
                        )
                        .await;
                }
                false
            }
        }
    }

    /// Plans and (unless a dry run) executes one removal on this node.
    async fn run_removal(
        &mut self,
        key: &Key,
        removal: &ImageRemoval,
        node_excluded: bool,
    ) -> Result<RemovalResult, RuntimeError> {
        let spec = &removal.spec;
        let allowed = report::Allowed {
            force: self.removals.allow_force,
            node_excluded,
        };
        if let Some(refusal) = report::refusal(&spec.images, spec.force, allowed) {
            tracing::warn!(removal = %key.name, outcome = %refusal.outcome, reason = %refusal.reason, "removal refused");
            return Ok(report::refused_entry(
                key,
                &spec.images,
                spec.dry_run,
                &refusal,
                now(),
            ));
        }
        let started = Instant::now();
        let reading = self.connection.read().await?;
        let plan = plan::plan(
            &Request {
                images: spec.images.clone(),
                force: spec.force,
                protected: self.removals.protected.clone(),
            },
            &reading.inventory,
        );
        let mut freed = 0;
        if !spec.dry_run && !report::is_blocked(&plan) {
            let executed = self
                .connection
                .execute(&reading.runtime, plan.clone())
                .await?;
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
        let result = report::plan_entry(key, &plan, spec.dry_run, freed, now());
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ImageRemovalSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
    use k8s_openapi::jiff::Timestamp;
    use std::time::Duration;

    /// How long until `retry` is due, from `now`.
    fn wait(retry: &Retry, now: Instant) -> Duration {
        retry.next.saturating_duration_since(now)
    }

    fn removal(name: &str, created: i64, selector: Option<(&str, &str)>) -> Arc<ImageRemoval> {
        let mut r = ImageRemoval::new(
            name,
            ImageRemovalSpec {
                images: vec!["nginx".into()],
                node_selector: selector.map(|(k, v)| LabelSelector {
                    match_labels: Some(BTreeMap::from([(k.to_string(), v.to_string())])),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        r.metadata.uid = Some(format!("uid-{name}"));
        r.metadata.generation = Some(1);
        r.metadata.creation_timestamp = Timestamp::from_second(created).ok().map(Time);
        Arc::new(r)
    }

    fn names(due: &Due) -> Vec<&str> {
        due.pending.iter().map(|p| p.key.name.as_str()).collect()
    }

    fn node(pool: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("pool".to_string(), pool.to_string())])
    }

    #[test]
    fn due_are_the_targeting_undone_removals_oldest_first() {
        let all = in_order(vec![
            removal("b", 2, None),
            removal("a", 3, None),
            removal("gpu", 1, Some(("pool", "gpu"))),
        ]);
        let removals = Removals::default();
        let now = Instant::now();
        assert_eq!(names(&removals.due(&all, &node("cpu"), now)), ["b", "a"]);
        assert_eq!(
            names(&removals.due(&all, &node("gpu"), now)),
            ["gpu", "b", "a"]
        );

        let mut deleting = (*removal("c", 4, None)).clone();
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let all = vec![Arc::new(deleting)];
        assert!(removals.due(&all, &node("cpu"), now).pending.is_empty());
    }

    #[test]
    fn a_finished_removal_is_not_due_until_its_next_generation() {
        let r = removal("a", 1, None);
        let live = live(std::slice::from_ref(&r));
        let mut removals = Removals::default();
        let key = key_of(&r);
        let result = RemovalResult {
            name: key.name.clone(),
            uid: key.uid.clone(),
            generation: key.generation,
            ..Default::default()
        };
        removals.finished(&key, result, &live);
        let now = Instant::now();
        assert!(
            removals
                .due(std::slice::from_ref(&r), &node("x"), now)
                .pending
                .is_empty()
        );
        let mut next = (*r).clone();
        next.metadata.generation = Some(2);
        assert_eq!(
            names(&removals.due(&[Arc::new(next)], &node("x"), now)),
            ["a"]
        );
    }

    #[test]
    fn a_failed_removal_waits_with_backoff_and_wakes_the_agent() {
        let r = removal("a", 1, None);
        let mut removals = Removals::default();
        let now = Instant::now();
        let first = removals.failed(&key_of(&r), now);
        assert_eq!(
            (first.attempts, wait(&first, now)),
            (1, Duration::from_secs(1))
        );
        let second = removals.failed(&key_of(&r), now);
        assert_eq!(
            (second.attempts, wait(&second, now)),
            (2, Duration::from_secs(2))
        );
        let due = removals.due(std::slice::from_ref(&r), &node("x"), now);
        assert!(due.pending.is_empty());
        assert_eq!(due.wake, Some(second.next));
        let later = removals.due(&[r], &node("x"), second.next);
        assert_eq!(names(&later), ["a"]);
    }

    #[test]
    fn deleted_removals_are_forgotten_everywhere() {
        let (a, b) = (removal("a", 1, None), removal("b", 2, None));
        let both = live(&[a.clone(), b.clone()]);
        let mut removals = Removals::default();
        removals.load(vec![RemovalResult {
            name: "a".into(),
            uid: "uid-a".into(),
            generation: 1,
            ..Default::default()
        }]);
        removals.failed(&key_of(&b), Instant::now());
        assert!(!removals.forget_deleted(&both), "nothing deleted");
        assert!(removals.forget_deleted(&BTreeSet::new()), "a's entry went");
        assert!(removals.entries.is_empty());
        assert!(removals.done.is_empty() && removals.retries.is_empty());
        // Re-created under the same name: a new removal, due again.
        let mut again = (*a).clone();
        again.metadata.uid = Some("other".into());
        let due = removals.due(&[Arc::new(again)], &node("x"), Instant::now());
        assert_eq!(names(&due), ["a"]);
    }
}
