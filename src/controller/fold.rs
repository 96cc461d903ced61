//! The fold: one ImageRemoval, the Nodes and every NodeImageReport in, the removal's status
//! out. Pure: no client, no clock (the caller passes `now`).
//!
//! Decisions:
//! - **Target nodes** are the Nodes the selector matches now, plus every node whose report
//!   already has a counting entry for this removal. A node relabelled after it did the work
//!   still did it, and its bytes were freed; dropping it would make `succeeded` shrink and a
//!   finished removal look unfinished. A node that newly matches joins as pending.
//! - An entry **counts** when its name, UID and generation equal the removal's: a re-created
//!   removal of the same name (new UID) or an edited spec (new generation) starts from zero.
//! - `bytesFreed` sums non-dry-run entries only: a dry run frees nothing.
//! - `Complete` is True once every target reported and none failed (reason `Succeeded`, or
//!   `NoTargetNodes` when the selector matches no Node). `Failed` is True once every target
//!   reported and at least one failed (`NodesFailed`), or at once for a selector the API server
//!   accepted but that cannot be evaluated (`InvalidSelector`). Both are terminal; at most one
//!   is True. `completionTime` is set when the status first becomes terminal and cleared when
//!   it stops being terminal (a new node matches, the spec changes).
//! - A condition's `lastTransitionTime` moves only when its status flips; reason and message
//!   may change under the same time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::core::{Expression, Selector, SelectorExt};

use crate::api::{
    COMPLETE, FAILED, FailureSample, ImageRemoval, ImageRemovalStatus, MAX_FAILURE_SAMPLES,
    NodeImageReport, RemovalPhase, RemovalResult,
};

/// Condition reasons.
pub mod reason {
    /// Every target node removed the images (or had none of them).
    pub const SUCCEEDED: &str = "Succeeded";
    /// The selector matches no Node: nothing to do.
    pub const NO_TARGET_NODES: &str = "NoTargetNodes";
    /// Some target nodes have not reported on this generation yet.
    pub const IN_PROGRESS: &str = "InProgress";
    /// Every target node reported and at least one failed.
    pub const NODES_FAILED: &str = "NodesFailed";
    /// `spec.nodeSelector` cannot be evaluated.
    pub const INVALID_SELECTOR: &str = "InvalidSelector";
}

/// Which terminal condition is True, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Terminal {
    /// `Complete` is True.
    Complete,
    /// `Failed` is True.
    Failed,
}

/// The terminal condition that is True in `status`, if any.
pub fn terminal(status: &ImageRemovalStatus) -> Option<Terminal> {
    let is_true = |t: &str| {
        status
            .conditions
            .iter()
            .any(|c| c.type_ == t && c.status == "True")
    };
    if is_true(FAILED) {
        Some(Terminal::Failed)
    } else if is_true(COMPLETE) {
        Some(Terminal::Complete)
    } else {
        None
    }
}

/// The message of the True terminal condition: what an Event about the outcome says.
pub fn terminal_message(status: &ImageRemovalStatus) -> Option<&str> {
    let t = match terminal(status)? {
        Terminal::Complete => COMPLETE,
        Terminal::Failed => FAILED,
    };
    status
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| c.message.as_str())
}

/// Folds the reports into `removal`'s status. `nodes` are every Node's name and labels;
/// `reports` every NodeImageReport. `removal.status` is the current status: conditions keep
/// their transition times and `completionTime` is kept from it.
pub fn fold<'a>(
    removal: &ImageRemoval,
    nodes: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
    reports: impl IntoIterator<Item = &'a NodeImageReport>,
    now: Timestamp,
) -> ImageRemovalStatus {
    let generation = removal.metadata.generation.unwrap_or_default();
    let current = removal.status.clone().unwrap_or_default();
    let selector = match removal.spec.node_selector.clone().map(Selector::try_from) {
        None => Selector::default(),
        Some(Ok(s)) => s,
        Some(Err(e)) => return invalid_selector_status(removal, &current, &e.to_string(), now),
    };

    let entries: BTreeMap<String, &RemovalResult> = reports
        .into_iter()
        .filter_map(|report| {
            let entry = counting_entry(removal, report)?;
            Some((report.name_any(), entry))
        })
        .collect();
    let mut targets: BTreeSet<&str> = nodes
        .into_iter()
        .filter(|(_, labels)| selector.matches(labels))
        .map(|(name, _)| name)
        .collect();
    targets.extend(entries.keys().map(String::as_str));

    let mut status = ImageRemovalStatus {
        observed_generation: Some(generation),
        target_nodes: count(targets.len()),
        ..Default::default()
    };
    count_entries(&mut status, &targets, &entries);

    let (complete, failed) = conditions(&status, removal.spec.dry_run);
    status.conditions = vec![
        condition(
            &current.conditions,
            COMPLETE,
            complete.0,
            complete.1,
            &complete.2,
            generation,
            now,
        ),
        condition(
            &current.conditions,
            FAILED,
            failed.0,
            failed.1,
            &failed.2,
            generation,
            now,
        ),
    ];
    if terminal(&status).is_some() {
        status.completion_time = Some(current.completion_time.unwrap_or(Time(now)));
    }
    status
}

/// The status of a removal whose selector cannot be evaluated: failed, with a message that
/// names the culprit.
fn invalid_selector_status(
    removal: &ImageRemoval,
    current: &ImageRemovalStatus,
    error: &str,
    now: Timestamp,
) -> ImageRemovalStatus {
    let generation = removal.metadata.generation.unwrap_or_default();
    let message = invalid_selector_message(removal, error);
    let conditions = vec![
        condition(
            &current.conditions,
            COMPLETE,
            false,
            reason::INVALID_SELECTOR,
            &message,
            generation,
            now,
        ),
        condition(
            &current.conditions,
            FAILED,
            true,
            reason::INVALID_SELECTOR,
            &message,
            generation,
            now,
        ),
    ];
    ImageRemovalStatus {
        observed_generation: Some(generation),
        completion_time: Some(current.completion_time.clone().unwrap_or(Time(now))),
        conditions,
        ..Default::default()
    }
}

/// Adds the `entries` (by node) of the `targets` to the counts of `status`, with a sample of
/// the failed images.
fn count_entries(
    status: &mut ImageRemovalStatus,
    targets: &BTreeSet<&str>,
    entries: &BTreeMap<String, &RemovalResult>,
) {
    for node in targets {
        let Some(entry) = entries.get(*node) else {
            status.pending += 1;
            continue;
        };
        match entry.phase {
            RemovalPhase::Succeeded => status.succeeded += 1,
            RemovalPhase::Failed => status.failed += 1,
        }
        if !entry.dry_run {
            status.bytes_freed = status.bytes_freed.saturating_add(entry.bytes_freed);
        }
        for image in &entry.images {
            if status.failures.len() < MAX_FAILURE_SAMPLES && !image.outcome.is_success() {
                status.failures.push(FailureSample {
                    node: node.to_string(),
                    image: image.image.clone(),
                    reason: image.outcome.to_string(),
                    message: image.message.clone(),
                });
            }
        }
    }
}

/// Names the first `matchExpressions` entry that does not parse, and what would.
fn invalid_selector_message(removal: &ImageRemoval, error: &str) -> String {
    let culprit = removal
        .spec
        .node_selector
        .iter()
        .flat_map(|s| s.match_expressions.iter().flatten())
        .find(|r| Expression::try_from((*r).clone()).is_err());
    match culprit {
        Some(r) => format!(
            "spec.nodeSelector is invalid: matchExpressions entry {{key: {}, operator: {}}}: {error}; \
             use In or NotIn with values, or Exists or DoesNotExist without",
            r.key, r.operator
        ),
        None => format!("spec.nodeSelector is invalid: {error}"),
    }
}

/// The report's entry for this removal, if it is for this very object and generation.
fn counting_entry<'r>(
    removal: &ImageRemoval,
    report: &'r NodeImageReport,
) -> Option<&'r RemovalResult> {
    let uid = removal.metadata.uid.as_deref()?;
    let generation = removal.metadata.generation?;
    report
        .status
        .as_ref()?
        .removals
        .iter()
        .find(|r| r.name == removal.name_any() && r.uid == uid && r.generation == generation)
}

/// (status, reason, message) of `Complete` and of `Failed`, from the counts.
fn conditions(
    s: &ImageRemovalStatus,
    dry_run: bool,
) -> ((bool, &'static str, String), (bool, &'static str, String)) {
    let (t, pending, failed, succeeded) = (s.target_nodes, s.pending, s.failed, s.succeeded);
    if t == 0 {
        let m = "no Node matches spec.nodeSelector; nothing to do".to_string();
        return (
            (true, reason::NO_TARGET_NODES, m.clone()),
            (false, reason::NO_TARGET_NODES, m),
        );
    }
    if pending > 0 {
        let m = format!("{pending} of {t} nodes have not reported yet ({failed} failed so far)");
        return (
            (false, reason::IN_PROGRESS, m.clone()),
            (false, reason::IN_PROGRESS, m),
        );
    }
    if failed > 0 {
        let mut m = format!("{failed} of {t} nodes failed");
        if let Some(f) = s.failures.first() {
            m.push_str(&format!(
                "; first: node {}, image {}: {}",
                f.node, f.image, f.reason
            ));
            if !f.message.is_empty() {
                m.push_str(&format!(": {}", f.message));
            }
        }
        return (
            (false, reason::NODES_FAILED, m.clone()),
            (true, reason::NODES_FAILED, m),
        );
    }
    let m = if dry_run {
        format!("dry run on {succeeded} nodes: nothing was removed")
    } else {
        format!("{succeeded} nodes done, {} bytes freed", s.bytes_freed)
    };
    (
        (true, reason::SUCCEEDED, m.clone()),
        (false, reason::SUCCEEDED, m),
    )
}

/// A condition whose `lastTransitionTime` is kept from `current` unless its status flips.
pub(crate) fn condition(
    current: &[Condition],
    type_: &str,
    is_true: bool,
    reason: &str,
    message: &str,
    generation: i64,
    now: Timestamp,
) -> Condition {
    let status = if is_true { "True" } else { "False" };
    let last_transition_time = current
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: Some(generation),
        last_transition_time,
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// What to do about `ttlSecondsAfterFinished`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Not terminal, or no TTL: keep the object.
    Keep,
    /// The TTL has passed: delete now.
    Now,
    /// Delete after this long.
    After(Duration),
}

/// When a terminal removal with `ttl_seconds` expires, measured from its `completionTime`.
pub fn expiry(status: &ImageRemovalStatus, ttl_seconds: Option<i64>, now: Timestamp) -> Expiry {
    let (Some(ttl), Some(done)) = (ttl_seconds, status.completion_time.as_ref()) else {
        return Expiry::Keep;
    };
    if terminal(status).is_none() {
        return Expiry::Keep;
    }
    let Ok(deadline) = done.0.checked_add(SignedDuration::from_secs(ttl.max(0))) else {
        return Expiry::Keep;
    };
    if now >= deadline {
        return Expiry::Now;
    }
    let left = now.duration_until(deadline);
    Expiry::After(Duration::try_from(left).unwrap_or(Duration::ZERO))
}

/// Minimum time between two status writes of one removal: `base`, stretched by `per_node`
/// for each node it targets. Every write reaches every agent's watch of ImageRemovals, so the
/// watch traffic one write causes grows with the node count; stretching the interval with it
/// keeps the traffic per second flat however large the cluster.
pub fn write_interval(base: Duration, per_node: Duration, target_nodes: i32) -> Duration {
    let nodes = u32::try_from(target_nodes).unwrap_or(0);
    base.max(per_node.saturating_mul(nodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_interval_grows_with_targets_from_the_base() {
        let (base, per) = (Duration::from_secs(1), Duration::from_millis(5));
        assert_eq!(write_interval(base, per, 0), base);
        assert_eq!(write_interval(base, per, -3), base);
        assert_eq!(write_interval(base, per, 200), base);
        assert_eq!(write_interval(base, per, 1000), Duration::from_secs(5));
        assert_eq!(write_interval(base, per, 5000), Duration::from_secs(25));
        assert_eq!(write_interval(base, Duration::ZERO, 5000), base);
    }
    use crate::api::{
        ImageOutcome, ImageRemovalSpec, ImageResult, NodeImageReportSpec, NodeImageReportStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
    use kube::api::ObjectMeta;

    const UID: &str = "uid-1";

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn removal(selector: Option<LabelSelector>) -> ImageRemoval {
        ImageRemoval {
            metadata: ObjectMeta {
                name: Some("rm".into()),
                uid: Some(UID.into()),
                generation: Some(2),
                ..Default::default()
            },
            spec: ImageRemovalSpec {
                images: vec!["nginx".into(), "redis".into()],
                node_selector: selector,
                ..Default::default()
            },
            status: None,
        }
    }

    fn pool(value: &str) -> Option<LabelSelector> {
        Some(LabelSelector {
            match_labels: Some([("pool".to_string(), value.to_string())].into()),
            ..Default::default()
        })
    }

    fn nodes(spec: &[(&str, &str)]) -> Vec<(String, BTreeMap<String, String>)> {
        spec.iter()
            .map(|(n, p)| (n.to_string(), [("pool".to_string(), p.to_string())].into()))
            .collect()
    }

    fn image(name: &str, outcome: ImageOutcome, message: &str) -> ImageResult {
        ImageResult {
            image: name.into(),
            outcome,
            id: None,
            references: Vec::new(),
            message: message.into(),
        }
    }

    fn entry(phase: RemovalPhase, bytes: i64, images: Vec<ImageResult>) -> RemovalResult {
        RemovalResult {
            name: "rm".into(),
            uid: UID.into(),
            generation: 2,
            phase,
            bytes_freed: bytes,
            images,
            ..Default::default()
        }
    }

    fn ok(bytes: i64) -> RemovalResult {
        entry(
            RemovalPhase::Succeeded,
            bytes,
            vec![
                image("nginx", ImageOutcome::Removed, ""),
                image("redis", ImageOutcome::NotPresent, ""),
            ],
        )
    }

    fn report(node: &str, removals: Vec<RemovalResult>) -> NodeImageReport {
        let mut r = NodeImageReport::new(
            node,
            NodeImageReportSpec {
                node_name: node.into(),
            },
        );
        r.status = Some(NodeImageReportStatus {
            removals,
            ..Default::default()
        });
        r
    }

    fn run(
        removal: &ImageRemoval,
        nodes: &[(String, BTreeMap<String, String>)],
        reports: &[NodeImageReport],
        now: Timestamp,
    ) -> ImageRemovalStatus {
        fold(
            removal,
            nodes.iter().map(|(n, l)| (n.as_str(), l)),
            reports,
            now,
        )
    }

    fn cond<'s>(s: &'s ImageRemovalStatus, type_: &str) -> &'s Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    fn counts(s: &ImageRemovalStatus) -> (i32, i32, i32, i32) {
        (s.target_nodes, s.succeeded, s.failed, s.pending)
    }

    #[test]
    fn selector_picks_targets_and_unreported_are_pending() {
        let n = nodes(&[("a", "blue"), ("b", "blue"), ("c", "green")]);
        let s = run(&removal(pool("blue")), &n, &[], t(0));
        assert_eq!(counts(&s), (2, 0, 0, 2));
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(cond(&s, COMPLETE).status, "False");
        assert_eq!(cond(&s, COMPLETE).reason, reason::IN_PROGRESS);
        assert_eq!(cond(&s, FAILED).status, "False");
        assert_eq!(s.completion_time, None);
        assert_eq!(terminal(&s), None);

        // Absent and empty selectors both pick every node.
        let all = run(&removal(None), &n, &[], t(0));
        assert_eq!(all.target_nodes, 3);
        let empty = run(&removal(Some(LabelSelector::default())), &n, &[], t(0));
        assert_eq!(empty.target_nodes, 3);
    }

    #[test]
    fn match_expressions_are_honoured() {
        let n = nodes(&[("a", "blue"), ("b", "red"), ("c", "green")]);
        let sel = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "pool".into(),
                operator: "NotIn".into(),
                values: Some(vec!["green".into()]),
            }]),
            ..Default::default()
        };
        assert_eq!(run(&removal(Some(sel)), &n, &[], t(0)).target_nodes, 2);
    }

    #[test]
    fn all_reported_is_complete_with_bytes_summed() {
        let n = nodes(&[("a", "blue"), ("b", "blue"), ("c", "green")]);
        let reports = [report("a", vec![ok(100)]), report("b", vec![ok(23)])];
        let s = run(&removal(pool("blue")), &n, &reports, t(5));
        assert_eq!(counts(&s), (2, 2, 0, 0));
        assert_eq!(s.bytes_freed, 123);
        assert!(s.failures.is_empty());
        let c = cond(&s, COMPLETE);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", reason::SUCCEEDED)
        );
        assert_eq!(c.observed_generation, Some(2));
        assert_eq!(cond(&s, FAILED).status, "False");
        assert_eq!(s.completion_time, Some(Time(t(5))));
        assert_eq!(terminal(&s), Some(Terminal::Complete));
    }

    #[test]
    fn stale_generation_uid_or_name_does_not_count() {
        let n = nodes(&[("a", "blue")]);
        let mut old_generation = ok(1);
        old_generation.generation = 1;
        let mut other_uid = ok(2);
        other_uid.uid = "uid-0".into();
        let mut other_name = ok(4);
        other_name.name = "other".into();
        for stale in [old_generation, other_uid, other_name] {
            let s = run(&removal(None), &n, &[report("a", vec![stale])], t(0));
            assert_eq!(counts(&s), (1, 0, 0, 1));
            assert_eq!(s.bytes_freed, 0);
        }
    }

    #[test]
    fn failures_are_sampled_in_node_then_request_order_and_capped() {
        let names: Vec<String> = (0..6).map(|i| format!("n{i}")).collect();
        let n: Vec<(String, BTreeMap<String, String>)> = names
            .iter()
            .map(|name| (name.clone(), BTreeMap::new()))
            .collect();
        let failing = || {
            entry(
                RemovalPhase::Failed,
                7,
                vec![
                    image("nginx", ImageOutcome::InUse, "used by container x"),
                    image("redis", ImageOutcome::Removed, ""),
                    image("pause", ImageOutcome::Pinned, "pinned"),
                ],
            )
        };
        // Reports given in reverse order: the samples still come sorted by node.
        let reports: Vec<NodeImageReport> = names
            .iter()
            .rev()
            .map(|name| report(name, vec![failing()]))
            .collect();
        let s = run(&removal(None), &n, &reports, t(0));
        assert_eq!(counts(&s), (6, 0, 6, 0));
        assert_eq!(s.failures.len(), MAX_FAILURE_SAMPLES);
        let order: Vec<(&str, &str)> = s
            .failures
            .iter()
            .map(|f| (f.node.as_str(), f.image.as_str()))
            .collect();
        assert_eq!(
            &order[..4],
            &[
                ("n0", "nginx"),
                ("n0", "pause"),
                ("n1", "nginx"),
                ("n1", "pause")
            ]
        );
        assert_eq!(s.failures[0].reason, "InUse");
        assert_eq!(s.failures[0].message, "used by container x");
        let f = cond(&s, FAILED);
        assert_eq!(
            (f.status.as_str(), f.reason.as_str()),
            ("True", reason::NODES_FAILED)
        );
        assert!(f.message.contains("6 of 6 nodes failed"), "{}", f.message);
        assert!(f.message.contains("n0"), "{}", f.message);
        let c = cond(&s, COMPLETE);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", reason::NODES_FAILED)
        );
        assert_eq!(terminal(&s), Some(Terminal::Failed));
        assert!(s.completion_time.is_some());
    }

    #[test]
    fn failure_while_others_pending_is_not_terminal() {
        let n = nodes(&[("a", "x"), ("b", "x")]);
        let bad = entry(
            RemovalPhase::Failed,
            0,
            vec![image("nginx", ImageOutcome::Ambiguous, "boom")],
        );
        let s = run(&removal(None), &n, &[report("a", vec![bad])], t(0));
        assert_eq!(counts(&s), (2, 0, 1, 1));
        assert_eq!(cond(&s, COMPLETE).reason, reason::IN_PROGRESS);
        assert_eq!(cond(&s, FAILED).status, "False");
        assert_eq!(terminal(&s), None);
        assert_eq!(s.failures.len(), 1);
    }

    #[test]
    fn no_matching_node_completes_with_a_reason() {
        let n = nodes(&[("a", "blue")]);
        let s = run(&removal(pool("none")), &n, &[], t(0));
        assert_eq!(counts(&s), (0, 0, 0, 0));
        let c = cond(&s, COMPLETE);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", reason::NO_TARGET_NODES)
        );
        assert!(c.message.contains("no Node matches"), "{}", c.message);
        assert_eq!(cond(&s, FAILED).status, "False");
        assert!(s.completion_time.is_some());
    }

    #[test]
    fn invalid_selector_fails_with_the_error() {
        let sel = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "pool".into(),
                operator: "Near".into(),
                values: None,
            }]),
            ..Default::default()
        };
        let n = nodes(&[("a", "blue")]);
        let s = run(&removal(Some(sel)), &n, &[report("a", vec![ok(5)])], t(0));
        assert_eq!(counts(&s), (0, 0, 0, 0));
        let f = cond(&s, FAILED);
        assert_eq!(
            (f.status.as_str(), f.reason.as_str()),
            ("True", reason::INVALID_SELECTOR)
        );
        assert!(f.message.contains("Near"), "{}", f.message);
        assert_eq!(cond(&s, COMPLETE).status, "False");
        assert_eq!(terminal(&s), Some(Terminal::Failed));
        assert!(s.completion_time.is_some());
    }

    #[test]
    fn dry_run_succeeds_and_frees_nothing() {
        let mut r = removal(None);
        r.spec.dry_run = true;
        let mut e = entry(
            RemovalPhase::Succeeded,
            500,
            vec![image("nginx", ImageOutcome::WouldRemove, "")],
        );
        e.dry_run = true;
        let s = run(&r, &nodes(&[("a", "x")]), &[report("a", vec![e])], t(0));
        assert_eq!(counts(&s), (1, 1, 0, 0));
        assert_eq!(s.bytes_freed, 0);
        assert!(s.failures.is_empty());
        let c = cond(&s, COMPLETE);
        assert_eq!(c.status, "True");
        assert!(c.message.contains("dry run"), "{}", c.message);
    }

    #[test]
    fn relabelled_node_that_reported_stays_a_target() {
        // "a" moved to another pool after it finished; "c" newly joined.
        let n = nodes(&[("a", "green"), ("b", "blue"), ("c", "blue")]);
        let reports = [report("a", vec![ok(10)]), report("b", vec![ok(1)])];
        let s = run(&removal(pool("blue")), &n, &reports, t(0));
        assert_eq!(counts(&s), (3, 2, 0, 1));
        assert_eq!(s.bytes_freed, 11);
    }

    #[test]
    fn transition_times_move_only_when_status_flips() {
        let n = nodes(&[("a", "blue"), ("b", "blue")]);
        let mut r = removal(pool("blue"));
        let s0 = run(&r, &n, &[], t(0));
        r.status = Some(s0.clone());

        // Progress without a flip: same times, nothing else to write.
        let one = [report("a", vec![ok(1)])];
        let s1 = run(&r, &n, &one, t(10));
        assert_eq!(cond(&s1, COMPLETE).last_transition_time, Time(t(0)));
        assert_eq!(
            cond(&s1, COMPLETE).message,
            "1 of 2 nodes have not reported yet (0 failed so far)"
        );
        r.status = Some(s1.clone());
        assert_eq!(run(&r, &n, &one, t(15)), s1, "refolding is stable");

        // Complete flips at t=20; Failed stays False and keeps its time.
        let both = [report("a", vec![ok(1)]), report("b", vec![ok(1)])];
        let s2 = run(&r, &n, &both, t(20));
        assert_eq!(cond(&s2, COMPLETE).last_transition_time, Time(t(20)));
        assert_eq!(cond(&s2, FAILED).last_transition_time, Time(t(0)));
        assert_eq!(s2.completion_time, Some(Time(t(20))));
        r.status = Some(s2.clone());
        let s3 = run(&r, &n, &both, t(30));
        assert_eq!(s3, s2, "terminal status is stable, completionTime kept");

        // A third node matches: back to pending, completionTime cleared, Complete flips.
        let n3 = nodes(&[("a", "blue"), ("b", "blue"), ("c", "blue")]);
        let s4 = run(&r, &n3, &both, t(40));
        assert_eq!(counts(&s4), (3, 2, 0, 1));
        assert_eq!(cond(&s4, COMPLETE).status, "False");
        assert_eq!(cond(&s4, COMPLETE).last_transition_time, Time(t(40)));
        assert_eq!(s4.completion_time, None);
    }

    #[test]
    fn new_generation_starts_over() {
        let n = nodes(&[("a", "x")]);
        let mut r = removal(None);
        r.status = Some(run(&r, &n, &[report("a", vec![ok(3)])], t(0)));
        r.metadata.generation = Some(3);
        let s = run(&r, &n, &[report("a", vec![ok(3)])], t(5));
        assert_eq!(counts(&s), (1, 0, 0, 1));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(cond(&s, COMPLETE).observed_generation, Some(3));
        assert_eq!(s.completion_time, None);
    }

    #[test]
    fn expiry_counts_from_completion_time() {
        let n = nodes(&[("a", "x")]);
        let r = removal(None);
        let pending = run(&r, &n, &[], t(0));
        assert_eq!(expiry(&pending, Some(10), t(100)), Expiry::Keep);
        let done = run(&r, &n, &[report("a", vec![ok(3)])], t(0));
        assert_eq!(expiry(&done, None, t(100)), Expiry::Keep);
        assert_eq!(
            expiry(&done, Some(10), t(4)),
            Expiry::After(Duration::from_secs(6))
        );
        assert_eq!(expiry(&done, Some(10), t(10)), Expiry::Now);
        assert_eq!(expiry(&done, Some(0), t(0)), Expiry::Now);
    }
}
