//! The policy fold: one ImagePrunePolicy, the Nodes and every NodeImageReport in, the
//! policy's status out. Pure: no client, no clock (the caller passes `now`).
//!
//! Decisions:
//! - **Target nodes** are the Nodes the selector matches now.
//! - A node is **evaluated** when its report has an entry for this policy's UID and current
//!   generation: it has run the policy as it is now at least once.
//! - **Totals** (`imagesRemoved`, `bytesFreed`) sum every node's running totals for this UID,
//!   whatever the generation: an edit does not undo what earlier runs removed. They cover the
//!   nodes that still report the policy (a node whose labels stop matching drops its entry).
//! - `Ready` is False (reason `InvalidSpec` or `InvalidSelector`) when the agents cannot
//!   evaluate the policy, with the reason in words; True (`Valid`) otherwise. Its
//!   `lastTransitionTime` moves only when it flips.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use super::fold::condition;
use crate::api::{ImagePrunePolicy, ImagePrunePolicyStatus, NodeImageReport, READY};
use crate::core::policy;
use crate::core::prune::Protections;

/// `Ready` reasons.
pub mod reason {
    /// The agents evaluate the policy.
    pub const VALID: &str = "Valid";
    /// The spec cannot be compiled (schedule, durations, globs, watermark).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// `spec.nodeSelector` cannot be evaluated.
    pub const INVALID_SELECTOR: &str = "InvalidSelector";
}

/// The status of `policy` given the Nodes (name, labels) and the reports.
pub fn fold<'a>(
    policy: &ImagePrunePolicy,
    nodes: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
    reports: impl IntoIterator<Item = &'a NodeImageReport>,
    now: Timestamp,
) -> ImagePrunePolicyStatus {
    let generation = policy.metadata.generation.unwrap_or(0);
    let uid = policy.uid().unwrap_or_default();
    let current = policy.status.clone().unwrap_or_default();
    let mut status = ImagePrunePolicyStatus {
        observed_generation: Some(generation),
        ..Default::default()
    };
    let ready = |status: &mut ImagePrunePolicyStatus, ok: bool, why: &str, message: &str| {
        status.conditions = vec![condition(
            &current.conditions,
            READY,
            ok,
            why,
            message,
            generation,
            now,
        )];
    };
    let selector = match policy.spec.node_selector.clone().map(Selector::try_from) {
        None => Selector::default(),
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            let message = format!("spec.nodeSelector is invalid: {e}");
            ready(&mut status, false, reason::INVALID_SELECTOR, &message);
            return status;
        }
    };
    let targets: HashSet<&str> = nodes
        .into_iter()
        .filter(|(_, labels)| selector.matches(labels))
        .map(|(name, _)| name)
        .collect();
    status.target_nodes = i32::try_from(targets.len()).unwrap_or(i32::MAX);
    for report in reports {
        let Some(entry) = report
            .status
            .iter()
            .flat_map(|s| s.policies.iter())
            .find(|r| r.uid == uid && r.name == policy.name_any())
        else {
            continue;
        };
        status.images_removed = status.images_removed.saturating_add(entry.total_removed);
        status.bytes_freed = status.bytes_freed.saturating_add(entry.total_bytes_freed);
        let node = report.metadata.name.as_deref().unwrap_or_default();
        if entry.generation == generation && targets.contains(node) {
            status.nodes_evaluated += 1;
            status.last_run_chosen = status
                .last_run_chosen
                .saturating_add(i64::from(entry.chosen));
            if let Some(at) = &entry.last_run
                && status.last_run.as_ref().is_none_or(|l| l.0 < at.0)
            {
                status.last_run = Some(Time(at.0));
            }
        }
    }
    // The agents add their protections; whether the spec itself compiles does not depend on
    // them.
    match policy::compile(&policy.spec, &Protections::default()) {
        Ok(_) => {
            let what = if policy.spec.dry_run {
                "dry run: nothing is removed"
            } else {
                "the agents evaluate it"
            };
            let message = format!(
                "{what}; {} of {} selected nodes have run this generation",
                status.nodes_evaluated, status.target_nodes
            );
            ready(&mut status, true, reason::VALID, &message);
        }
        Err(e) => ready(&mut status, false, reason::INVALID_SPEC, &e.to_string()),
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ImagePrunePolicySpec, NodeImageReportSpec, NodeImageReportStatus, PolicyRun};

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn policy(spec: serde_json::Value) -> ImagePrunePolicy {
        let spec: ImagePrunePolicySpec = serde_json::from_value(spec).unwrap();
        let mut p = ImagePrunePolicy::new("nightly", spec);
        p.metadata.uid = Some("uid-1".into());
        p.metadata.generation = Some(2);
        p
    }

    fn run(generation: i64, chosen: i32, total: i64, bytes: i64, at: i64) -> PolicyRun {
        PolicyRun {
            name: "nightly".into(),
            uid: "uid-1".into(),
            generation,
            chosen,
            removed: chosen,
            total_removed: total,
            total_bytes_freed: bytes,
            last_run: Some(Time(t(at))),
            ..Default::default()
        }
    }

    fn report(node: &str, policies: Vec<PolicyRun>) -> NodeImageReport {
        let mut r = NodeImageReport::new(
            node,
            NodeImageReportSpec {
                node_name: node.into(),
            },
        );
        r.status = Some(NodeImageReportStatus {
            policies,
            ..Default::default()
        });
        r
    }

    fn nodes() -> Vec<(String, BTreeMap<String, String>)> {
        ["a1", "a2", "b1"]
            .iter()
            .map(|n| {
                let pool = &n[..1];
                (
                    n.to_string(),
                    BTreeMap::from([("pool".into(), pool.into())]),
                )
            })
            .collect()
    }

    fn fold_all(
        p: &ImagePrunePolicy,
        reports: &[NodeImageReport],
        now: i64,
    ) -> ImagePrunePolicyStatus {
        let nodes = nodes();
        fold(
            p,
            nodes.iter().map(|(n, l)| (n.as_str(), l)),
            reports,
            t(now),
        )
    }

    #[test]
    fn counts_selected_nodes_totals_and_the_latest_run() {
        let p = policy(serde_json::json!({
            "schedule": "@daily",
            "nodeSelector": {"matchLabels": {"pool": "a"}},
        }));
        let reports = [
            report("a1", vec![run(2, 3, 5, 500, 100)]),
            // An older generation: its totals count, the node is not evaluated yet.
            report("a2", vec![run(1, 1, 1, 10, 300)]),
            // Another policy's UID: ignored.
            report(
                "b1",
                vec![PolicyRun {
                    uid: "other".into(),
                    ..run(2, 9, 9, 9, 400)
                }],
            ),
        ];
        let s = fold_all(&p, &reports, 1000);
        assert_eq!(s.target_nodes, 2);
        assert_eq!(s.nodes_evaluated, 1);
        assert_eq!(s.images_removed, 6);
        assert_eq!(s.bytes_freed, 510);
        assert_eq!(s.last_run_chosen, 3);
        assert_eq!(s.last_run, Some(Time(t(100))));
        assert_eq!(s.observed_generation, Some(2));
        let ready = &s.conditions[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str()),
            (READY, "True")
        );
        assert!(ready.message.contains("1 of 2"), "{}", ready.message);
    }

    #[test]
    fn an_invalid_spec_is_not_ready_and_says_why() {
        let p = policy(serde_json::json!({"schedule": "0 3 * *"}));
        let s = fold_all(&p, &[], 1000);
        let ready = &s.conditions[0];
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, reason::INVALID_SPEC);
        assert!(ready.message.contains("4 fields"), "{}", ready.message);

        let p = policy(serde_json::json!({
            "schedule": "@daily",
            "nodeSelector": {"matchExpressions": [{"key": "pool", "operator": "In"}]},
        }));
        let s = fold_all(&p, &[], 1000);
        assert_eq!(s.conditions[0].reason, reason::INVALID_SELECTOR);
    }

    #[test]
    fn transition_time_moves_only_when_ready_flips() {
        let mut p = policy(serde_json::json!({"schedule": "@daily"}));
        let first = fold_all(&p, &[], 1000);
        p.status = Some(first.clone());
        let again = fold_all(&p, &[report("a1", vec![run(2, 1, 1, 1, 900)])], 2000);
        assert_eq!(
            again.conditions[0].last_transition_time,
            first.conditions[0].last_transition_time
        );
        p.spec.schedule = Some("bad".into());
        p.status = Some(again);
        let flipped = fold_all(&p, &[], 3000);
        assert_eq!(flipped.conditions[0].last_transition_time, Time(t(3000)));
    }
}
