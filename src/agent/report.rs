//! The pure part of the agent: which removals target this node, whether one is already done,
//! and how a plan (and its execution) becomes the node's report. No clocks, no I/O: the caller
//! passes the time in.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::core::{Selector, SelectorExt};

use crate::api::{
    ImageOutcome, ImageResult, MAX_IMAGES, MAX_MESSAGE, MAX_REFERENCES, MAX_REMOVALS, RemovalPhase,
    RemovalResult,
};
use crate::core::plan::{Outcome, Plan};
use crate::events::truncate;

/// How a plan was carried out, which decides what a planned removal is reported as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    /// Executed: planned removals were removed.
    Executed,
    /// Not executed (a dry run, or a policy's plan it did not execute): they would be.
    Planned,
    /// Refused as a whole because an image of it is invalid or ambiguous: they were skipped.
    Blocked,
}

/// What the report says of an image whose plan decided `outcome`, when the plan was `run`.
pub fn image_outcome(outcome: &Outcome, run: Run) -> ImageOutcome {
    match outcome {
        Outcome::Remove { .. } => match run {
            Run::Executed => ImageOutcome::Removed,
            Run::Planned => ImageOutcome::WouldRemove,
            Run::Blocked => ImageOutcome::Skipped,
        },
        Outcome::NotPresent => ImageOutcome::NotPresent,
        Outcome::InUse { .. } => ImageOutcome::InUse,
        Outcome::Pinned { .. } => ImageOutcome::Pinned,
        Outcome::Protected { .. } => ImageOutcome::Protected,
        Outcome::Invalid { .. } => ImageOutcome::Invalid,
        Outcome::Ambiguous { .. } => ImageOutcome::Ambiguous,
    }
}

/// Whether a removal with `selector` targets a node labelled `labels`. An absent or empty
/// selector selects every node; a selector that cannot be evaluated is an error (the
/// controller reports it on the ImageRemoval).
pub fn targets(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    let Some(selector) = selector else {
        return Ok(true);
    };
    let selector = Selector::try_from(selector.clone()).map_err(|e| e.to_string())?;
    Ok(selector.matches(labels))
}

/// Identity of one execution: a removal's UID and generation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// The ImageRemoval's name.
    pub name: String,
    /// Its UID.
    pub uid: String,
    /// Its generation.
    pub generation: i64,
}

/// Whether `removals` (a report's entries) already hold the outcome of `key`.
pub fn is_done(removals: &[RemovalResult], key: &Key) -> bool {
    removals
        .iter()
        .any(|r| r.name == key.name && r.uid == key.uid && r.generation == key.generation)
}

/// Node label by which a node opts out of imagegc: with the value `"true"`, no removal and
/// no policy touches its images, forced or not.
pub const EXCLUDE_LABEL: &str = "imagegc.dev/exclude";

/// Whether a node labelled `labels` opted out (see [`EXCLUDE_LABEL`]).
pub fn node_excluded(labels: &BTreeMap<String, String>) -> bool {
    labels.get(EXCLUDE_LABEL).is_some_and(|v| v == "true")
}

/// Why a removal is refused as a whole on a node, before anything is read or removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The outcome every image of the removal gets (`Protected`, `ForceNotAllowed`,
    /// `Invalid`).
    pub outcome: ImageOutcome,
    /// Why, in words a user can act on.
    pub reason: String,
}

/// What this node's agent allows, whatever a request asks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allowed {
    /// Forced removals (of images in use) are enabled (`--allow-force`).
    pub force: bool,
    /// The node opted out ([`EXCLUDE_LABEL`]).
    pub node_excluded: bool,
}

/// Whether a removal of `images` (with `force`) is refused as a whole on this node: the node
/// opted out, the request is malformed (what the API server's schema already checks, for
/// objects written before it did), or it is forced where forcing is not enabled — never
/// silently run as unforced, so the user learns why an image they forced is still there.
pub fn refusal(images: &[String], force: bool, allowed: Allowed) -> Option<Refusal> {
    let refuse = |outcome, reason: String| Some(Refusal { outcome, reason });
    if allowed.node_excluded {
        return refuse(
            ImageOutcome::Protected,
            format!(
                "this node opted out of imagegc (label {EXCLUDE_LABEL}=true); nothing is removed here"
            ),
        );
    }
    if images.is_empty() {
        return refuse(ImageOutcome::Invalid, "the removal names no images".into());
    }
    if images.len() > MAX_IMAGES {
        return refuse(
            ImageOutcome::Invalid,
            format!(
                "the removal names {} images; at most {MAX_IMAGES} are allowed",
                images.len()
            ),
        );
    }
    if force && !allowed.force {
        return refuse(
            ImageOutcome::ForceNotAllowed,
            "force: true is not allowed: forced removals are disabled on this cluster (the \
             chart value agent.allowForce, the agent flag --allow-force); nothing was removed. \
             Remove force to keep in-use images, or ask the cluster's operator to enable it"
                .into(),
        );
    }
    None
}

/// The report entry for a removal that was refused as a whole (see [`refusal`]).
pub fn refused_entry(
    key: &Key,
    images: &[String],
    dry_run: bool,
    refusal: &Refusal,
    now: Time,
) -> RemovalResult {
    RemovalResult {
        name: key.name.clone(),
        uid: key.uid.clone(),
        generation: key.generation,
        phase: RemovalPhase::Failed,
        dry_run,
        bytes_freed: 0,
        finished: Some(now),
        images: images
            .iter()
            .take(MAX_IMAGES)
            .map(|image| ImageResult {
                image: truncate(image, MAX_MESSAGE),
                outcome: refusal.outcome,
                id: None,
                references: Vec::new(),
                message: truncate(&refusal.reason, MAX_MESSAGE),
            })
            .collect(),
    }
}

/// Whether a plan must not run at all: one invalid or ambiguous image refuses the whole
/// batch, so a typo never half-runs a request (the same rule as `imagegc rmi`).
pub fn is_blocked(plan: &Plan) -> bool {
    plan.items.iter().any(|i| i.outcome.is_failure())
}

/// The report entry for `plan`: executed (`dry_run == false` and not [`is_blocked`]) with
/// `bytes_freed`, or only planned.
pub fn plan_entry(
    key: &Key,
    plan: &Plan,
    dry_run: bool,
    bytes_freed: i64,
    now: Time,
) -> RemovalResult {
    let blocked = is_blocked(plan);
    let run = if blocked {
        Run::Blocked
    } else if dry_run {
        Run::Planned
    } else {
        Run::Executed
    };
    let images: Vec<ImageResult> = plan
        .items
        .iter()
        .map(|item| {
            let outcome = image_outcome(&item.outcome, run);
            let (id, references) = match &item.outcome {
                Outcome::Remove { id, references, .. } => (Some(id.clone()), references.clone()),
                Outcome::InUse { id, .. }
                | Outcome::Pinned { id }
                | Outcome::Protected { id, .. } => (Some(id.clone()), Vec::new()),
                _ => (None, Vec::new()),
            };
            let message = if outcome == ImageOutcome::Skipped {
                "not removed: other images of this removal are invalid or ambiguous on this node; \
                 fix them and update the ImageRemoval"
                    .to_string()
            } else {
                item.outcome.to_string()
            };
            ImageResult {
                image: truncate(&item.input, MAX_MESSAGE),
                outcome,
                id,
                references: references
                    .iter()
                    .take(MAX_REFERENCES)
                    .map(|r| truncate(r, MAX_MESSAGE))
                    .collect(),
                message: truncate(&message, MAX_MESSAGE),
            }
        })
        .collect();
    let failed = images.iter().any(|i| !i.outcome.is_success());
    RemovalResult {
        name: key.name.clone(),
        uid: key.uid.clone(),
        generation: key.generation,
        phase: if failed {
            RemovalPhase::Failed
        } else {
            RemovalPhase::Succeeded
        },
        dry_run,
        bytes_freed: if dry_run || blocked { 0 } else { bytes_freed },
        finished: Some(now),
        images,
    }
}

/// The report's entries after `new` (if any) replaces the entry of the same name, entries of
/// removals that no longer exist (`live` holds the current `(name, uid)` pairs) are dropped,
/// and only the [`MAX_REMOVALS`] most recently finished are kept, within
/// [`MAX_ENTRIES_BYTES`] (see [`fit`]). Sorted by name.
pub fn merge(
    current: &[RemovalResult],
    new: Option<RemovalResult>,
    live: &BTreeSet<(String, String)>,
) -> Vec<RemovalResult> {
    let mut by_name: BTreeMap<String, RemovalResult> = current
        .iter()
        .filter(|r| live.contains(&(r.name.clone(), r.uid.clone())))
        .map(|r| (r.name.clone(), r.clone()))
        .collect();
    if let Some(new) = new {
        by_name.insert(new.name.clone(), new);
    }
    let mut entries: Vec<RemovalResult> = by_name.into_values().collect();
    if entries.len() > MAX_REMOVALS {
        // Newest first, then keep the first MAX_REMOVALS.
        entries.sort_by(|a, b| {
            let ta = a.finished.as_ref().map(|t| t.0);
            let tb = b.finished.as_ref().map(|t| t.0);
            tb.cmp(&ta).then_with(|| a.name.cmp(&b.name))
        });
        entries.truncate(MAX_REMOVALS);
        entries.sort_by(|a, b| a.name.cmp(&b.name));
    }
    fit(entries, MAX_ENTRIES_BYTES)
}

/// Serialized size the report's entries are kept under (the NodeImageReport stays far below
/// etcd's 1.5 MiB object limit whatever the removals hold).
pub const MAX_ENTRIES_BYTES: usize = 512 * 1024;

fn encoded_len(entries: &[RemovalResult]) -> usize {
    serde_json::to_vec(entries)
        .map(|v| v.len())
        .unwrap_or(usize::MAX)
}

/// Shrinks `entries` (sorted by name) under `budget` serialized bytes: first the oldest
/// entries lose the reference lists and messages of their successful images (the outcome
/// stays), then the oldest entries go. The newest entry is always kept whole.
pub fn fit(mut entries: Vec<RemovalResult>, budget: usize) -> Vec<RemovalResult> {
    if encoded_len(&entries) <= budget {
        return entries;
    }
    let mut by_age: Vec<usize> = (0..entries.len()).collect();
    by_age.sort_by_key(|&i| {
        (
            entries[i].finished.as_ref().map(|t| t.0),
            entries[i].name.clone(),
        )
    });
    let newest = by_age.pop();
    for &i in &by_age {
        for image in &mut entries[i].images {
            if image.outcome.is_success() {
                image.references.clear();
                image.message.clear();
            }
        }
        if encoded_len(&entries) <= budget {
            return entries;
        }
    }
    let mut dropped = BTreeSet::new();
    for &i in &by_age {
        dropped.insert(i);
        let kept: Vec<RemovalResult> = entries
            .iter()
            .enumerate()
            .filter(|(j, _)| !dropped.contains(j))
            .map(|(_, e)| e.clone())
            .collect();
        if encoded_len(&kept) <= budget {
            return kept;
        }
    }
    newest
        .map(|i| vec![entries.swap_remove(i)])
        .unwrap_or_default()
}

/// A one-paragraph summary of what failed in `result`, for an Event.
pub fn failure_summary(node: &str, result: &RemovalResult) -> String {
    let failures: Vec<String> = result
        .images
        .iter()
        .filter(|i| !i.outcome.is_success())
        .map(|i| format!("{} {}: {}", i.image, i.outcome, i.message))
        .collect();
    format!("node {node}: {}", failures.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::plan::Item;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use k8s_openapi::jiff::Timestamp;

    fn key(name: &str, generation: i64) -> Key {
        Key {
            name: name.into(),
            uid: format!("uid-{name}"),
            generation,
        }
    }

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn remove(id: &str, refs: &[&str]) -> Outcome {
        Outcome::Remove {
            id: id.into(),
            references: refs.iter().map(|r| r.to_string()).collect(),
            size: 10,
            used_by: vec![],
        }
    }

    fn plan(items: Vec<(&str, Outcome)>) -> Plan {
        Plan {
            items: items
                .into_iter()
                .map(|(input, outcome)| Item {
                    input: input.into(),
                    outcome,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn selectors_pick_nodes_by_labels() {
        let node = labels(&[("pool", "gpu"), ("zone", "a")]);
        assert_eq!(targets(None, &node), Ok(true));
        assert_eq!(targets(Some(&LabelSelector::default()), &node), Ok(true));
        let gpu = LabelSelector {
            match_labels: Some(labels(&[("pool", "gpu")])),
            ..Default::default()
        };
        assert_eq!(targets(Some(&gpu), &node), Ok(true));
        assert_eq!(targets(Some(&gpu), &labels(&[("pool", "cpu")])), Ok(false));
        let not_b = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "zone".into(),
                operator: "NotIn".into(),
                values: Some(vec!["b".into()]),
            }]),
            ..Default::default()
        };
        assert_eq!(targets(Some(&not_b), &node), Ok(true));
        let bad = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "zone".into(),
                operator: "Near".into(),
                values: None,
            }]),
            ..Default::default()
        };
        assert!(targets(Some(&bad), &node).is_err());
    }

    #[test]
    fn done_means_same_uid_and_generation() {
        let entries = vec![RemovalResult {
            name: "a".into(),
            uid: "uid-a".into(),
            generation: 2,
            ..Default::default()
        }];
        assert!(is_done(&entries, &key("a", 2)));
        assert!(
            !is_done(&entries, &key("a", 3)),
            "new generation runs again"
        );
        let recreated = Key {
            uid: "other".into(),
            ..key("a", 2)
        };
        assert!(
            !is_done(&entries, &recreated),
            "a re-created removal is new"
        );
    }

    #[test]
    fn results_name_every_image_and_fail_on_protected_ones() {
        let p = plan(vec![
            (
                "app",
                remove("sha256:aa", &["docker.io/library/app:1", "sha256:aa"]),
            ),
            ("gone", Outcome::NotPresent),
            (
                "pause",
                Outcome::Pinned {
                    id: "sha256:pp".into(),
                },
            ),
        ]);
        let r = plan_entry(&key("x", 1), &p, false, 1234, at(10));
        assert_eq!(r.phase, RemovalPhase::Failed);
        assert_eq!(r.bytes_freed, 1234);
        let outcomes: Vec<&str> = r.images.iter().map(|i| i.outcome.as_str()).collect();
        assert_eq!(outcomes, ["Removed", "NotPresent", "Pinned"]);
        assert_eq!(r.images[0].references.len(), 2);
        assert_eq!(r.images[2].id.as_deref(), Some("sha256:pp"));
        assert!(failure_summary("n1", &r).contains("pause Pinned"));
        assert!(!failure_summary("n1", &r).contains("app"));

        let ok = plan(vec![
            ("app", remove("sha256:aa", &["a"])),
            ("b", Outcome::NotPresent),
        ]);
        assert_eq!(
            plan_entry(&key("x", 1), &ok, false, 5, at(10)).phase,
            RemovalPhase::Succeeded
        );
    }

    #[test]
    fn dry_runs_say_would_remove_and_free_nothing() {
        let p = plan(vec![("app", remove("sha256:aa", &["a"]))]);
        let r = plan_entry(&key("x", 1), &p, true, 999, at(10));
        assert_eq!(r.images[0].outcome, "WouldRemove");
        assert!(r.dry_run);
        assert_eq!(r.bytes_freed, 0);
        assert_eq!(r.phase, RemovalPhase::Succeeded);
    }

    #[test]
    fn an_invalid_image_blocks_the_batch() {
        let p = plan(vec![
            ("app", remove("sha256:aa", &["a"])),
            (
                "UPPER",
                Outcome::Invalid {
                    reason: "bad".into(),
                },
            ),
        ]);
        assert!(is_blocked(&p));
        let r = plan_entry(&key("x", 1), &p, false, 0, at(10));
        assert_eq!(r.images[0].outcome, ImageOutcome::Skipped);
        assert_eq!(r.images[1].outcome, "Invalid");
        assert_eq!(r.phase, RemovalPhase::Failed);
    }

    #[test]
    fn results_are_bounded() {
        let refs: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        let long = "x".repeat(600);
        let p = plan(vec![(long.as_str(), remove("sha256:aa", &refs))]);
        let r = plan_entry(&key("x", 1), &p, false, 0, at(1));
        assert_eq!(r.images[0].references.len(), MAX_REFERENCES);
        assert!(r.images[0].image.len() <= MAX_MESSAGE);
        assert!(r.images[0].message.len() <= MAX_MESSAGE);
    }

    #[test]
    fn refusal_covers_what_the_schema_should_have_caught() {
        let ok = Allowed::default();
        assert_eq!(refusal(&[], false, ok).unwrap().outcome, "Invalid");
        let many: Vec<String> = (0..=MAX_IMAGES).map(|i| format!("i{i}")).collect();
        let too_many = refusal(&many, false, ok).unwrap();
        assert!(too_many.reason.contains("at most 100"));
        assert!(refusal(&["nginx".into()], false, ok).is_none());
        let r = refused_entry(&key("x", 1), &many, false, &too_many, at(1));
        assert_eq!(r.images.len(), MAX_IMAGES);
        assert_eq!(r.phase, RemovalPhase::Failed);
        assert!(r.images.iter().all(|i| i.outcome == "Invalid"));
    }

    #[test]
    fn force_is_refused_unless_allowed_and_never_downgraded() {
        let images = vec!["nginx".to_string(), "redis".to_string()];
        let denied = refusal(&images, true, Allowed::default()).unwrap();
        assert_eq!(denied.outcome, "ForceNotAllowed");
        assert!(
            denied.reason.contains("agent.allowForce"),
            "{}",
            denied.reason
        );
        let r = refused_entry(&key("x", 1), &images, false, &denied, at(1));
        assert_eq!(r.phase, RemovalPhase::Failed);
        assert!(r.images.iter().all(|i| i.outcome == "ForceNotAllowed"));
        let allowed = Allowed {
            force: true,
            node_excluded: false,
        };
        assert!(refusal(&images, true, allowed).is_none());
        assert!(refusal(&images, false, Allowed::default()).is_none());
    }

    #[test]
    fn an_opted_out_node_refuses_everything() {
        assert!(node_excluded(&labels(&[(EXCLUDE_LABEL, "true")])));
        assert!(!node_excluded(&labels(&[(EXCLUDE_LABEL, "false")])));
        assert!(!node_excluded(&labels(&[])));
        let excluded = Allowed {
            force: true,
            node_excluded: true,
        };
        for force in [false, true] {
            let r = refusal(&["nginx".into()], force, excluded).unwrap();
            assert_eq!(r.outcome, "Protected");
            assert!(r.reason.contains(EXCLUDE_LABEL));
        }
    }

    #[test]
    fn reports_stay_under_their_byte_budget() {
        // Worst case the schema allows: 20 removals of 100 images, every string at its cap.
        let image = ImageResult {
            image: "i".repeat(MAX_MESSAGE),
            outcome: ImageOutcome::Removed,
            id: Some(format!("sha256:{}", "a".repeat(64))),
            references: vec!["r".repeat(MAX_MESSAGE); MAX_REFERENCES],
            message: "m".repeat(MAX_MESSAGE),
        };
        let entries: Vec<RemovalResult> = (0..MAX_REMOVALS)
            .map(|i| RemovalResult {
                name: format!("r{i:02}"),
                uid: format!("uid-r{i:02}"),
                generation: 1,
                finished: Some(at(i as i64)),
                images: vec![image.clone(); MAX_IMAGES],
                ..Default::default()
            })
            .collect();
        assert!(
            encoded_len(&entries) > 4 * MAX_ENTRIES_BYTES,
            "the case is real"
        );
        let fitted = fit(entries, MAX_ENTRIES_BYTES);
        assert!(encoded_len(&fitted) <= MAX_ENTRIES_BYTES);
        let newest = fitted
            .iter()
            .find(|e| e.name == "r19")
            .expect("newest kept");
        assert_eq!(newest.images[0], image, "the newest entry is whole");
        assert!(fitted.len() < MAX_REMOVALS, "older entries went");
        // Small reports are untouched.
        let small = vec![RemovalResult {
            images: vec![image.clone()],
            ..Default::default()
        }];
        assert_eq!(fit(small.clone(), MAX_ENTRIES_BYTES), small);
    }

    #[test]
    fn merge_replaces_prunes_and_caps() {
        let entry = |name: &str, t: i64| RemovalResult {
            name: name.into(),
            uid: format!("uid-{name}"),
            generation: 1,
            finished: Some(at(t)),
            ..Default::default()
        };
        let live: BTreeSet<(String, String)> = ["a", "b"]
            .iter()
            .map(|n| (n.to_string(), format!("uid-{n}")))
            .collect();
        let current = vec![entry("a", 1), entry("gone", 2)];
        let merged = merge(&current, Some(entry("b", 3)), &live);
        let names: Vec<&str> = merged.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b"], "deleted removal dropped, new one added");

        let mut updated = entry("a", 5);
        updated.generation = 2;
        let merged = merge(&merged, Some(updated), &live);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].generation, 2, "same name replaced");

        let names: Vec<String> = (0..30).map(|i| format!("r{i:02}")).collect();
        let live: BTreeSet<(String, String)> = names
            .iter()
            .map(|n| (n.clone(), format!("uid-{n}")))
            .collect();
        let many: Vec<RemovalResult> = names
            .iter()
            .enumerate()
            .map(|(i, n)| entry(n, i as i64))
            .collect();
        let merged = merge(&many, None, &live);
        assert_eq!(merged.len(), MAX_REMOVALS);
        assert_eq!(merged[0].name, "r10", "the oldest ten are dropped");
    }
}

#[cfg(test)]
mod properties {
    //! The agent's input surface, fuzzed: any ImageRemoval the schema could hold (and some it
    //! could not) goes through selection, refusal, planning and reporting without a panic, and
    //! what is reported stays within its bounds.

    use super::*;
    use crate::core::inventory::{CriImage, Inventory};
    use crate::core::plan::{Request, plan};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use k8s_openapi::jiff::Timestamp;
    use proptest::prelude::*;

    fn selector() -> impl Strategy<Value = Option<LabelSelector>> {
        let labels = proptest::collection::btree_map("[a-z./-]{0,12}", "[a-zA-Z0-9._-]{0,8}", 0..3);
        let requirement = (
            "[a-z./-]{0,12}",
            prop_oneof![
                Just("In".to_string()),
                Just("NotIn".to_string()),
                Just("Exists".to_string()),
                Just("DoesNotExist".to_string()),
                "[A-Za-z]{0,8}",
            ],
            proptest::option::of(proptest::collection::vec("[a-z0-9]{0,6}", 0..3)),
        )
            .prop_map(|(key, operator, values)| LabelSelectorRequirement {
                key,
                operator,
                values,
            });
        proptest::option::of(
            (
                proptest::option::of(labels),
                proptest::option::of(proptest::collection::vec(requirement, 0..3)),
            )
                .prop_map(|(match_labels, match_expressions)| LabelSelector {
                    match_labels,
                    match_expressions,
                }),
        )
    }

    fn inventory() -> Inventory {
        let mut inv = Inventory::default();
        for (n, pinned) in [(1u64, false), (2, true), (0xabc, false)] {
            let id = format!("sha256:{n:064x}");
            let refs = vec![format!("docker.io/library/img{n}:1"), id.clone()];
            for r in &refs {
                inv.ref_to_id.insert(r.clone(), id.clone());
            }
            inv.images.insert(
                id.clone(),
                CriImage {
                    id,
                    references: refs,
                    size: 1,
                    pinned,
                    used_by: Vec::new(),
                    content: BTreeSet::new(),
                },
            );
        }
        inv
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn any_removal_is_handled_within_bounds(
            images in proptest::collection::vec(any::<String>(), 0..120),
            sel in selector(),
            node_labels in proptest::collection::btree_map("[a-z./-]{0,12}", "[a-z0-9]{0,6}", 0..4),
            force in any::<bool>(),
            dry_run in any::<bool>(),
        ) {
            let _ = targets(sel.as_ref(), &node_labels);
            let key = Key { name: "r".into(), uid: "u".into(), generation: 1 };
            let now = Time(Timestamp::from_second(1).unwrap());
            let allowed = Allowed { force: true, node_excluded: false };
            let result = match refusal(&images, force, allowed) {
                Some(refusal) => refused_entry(&key, &images, dry_run, &refusal, now),
                None => {
                    let request = Request { images: images.clone(), force, ..Default::default() };
                    let p = plan(&request, &inventory());
                    // Nothing pinned is ever planned for deletion.
                    let pinned_id = format!("sha256:{:064x}", 2);
                    let touches_pinned = p
                        .deletes
                        .iter()
                        .any(|d| *d == pinned_id || d == "docker.io/library/img2:1");
                    prop_assert!(!touches_pinned, "a pinned image planned: {:?}", p.deletes);
                    plan_entry(&key, &p, dry_run, 0, now)
                }
            };
            prop_assert!(result.images.len() <= MAX_IMAGES);
            prop_assert_eq!(result.images.len(), images.len().min(MAX_IMAGES));
            for i in &result.images {
                prop_assert!(i.image.len() <= MAX_MESSAGE && i.message.len() <= MAX_MESSAGE);
                prop_assert!(i.references.len() <= MAX_REFERENCES);
            }
            let merged = merge(&[], Some(result), &BTreeSet::from([("r".to_string(), "u".to_string())]));
            prop_assert!(encoded_len(&merged) <= MAX_ENTRIES_BYTES);
        }
    }
}
