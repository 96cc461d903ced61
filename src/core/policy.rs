//! An ImagePrunePolicy's spec compiled into what a node evaluates: its schedule, its
//! watermark and its selection (`core::prune`), with every error a user can make named in
//! words; and a node's images as the policy's candidates. Pure: the controller uses
//! [`compile`] to report an invalid policy, the agent to run a valid one.

use std::collections::BTreeMap;

use crate::api::ImagePrunePolicySpec;
use crate::core::duration::{self, DurationError};
use crate::core::inventory::{ImageRecord, Inventory};
use crate::core::last_used;
use crate::core::prune::{self, Candidate, Criteria, Protections, PruneError, Selector, Watermark};
use crate::core::schedule::{Schedule, ScheduleError};

/// Images removed per node per run when the policy sets no `maxImagesPerRun`: every chosen
/// image is one batch with one garbage collection, and the report lists a bounded number.
pub const DEFAULT_MAX_IMAGES_PER_RUN: u32 = 100;

/// Why a policy cannot run. The message says what is wrong, in words a user can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Neither a schedule nor a watermark.
    #[error("the policy has neither a schedule nor a watermark, so it never runs")]
    NeverRuns,
    /// The schedule does not parse.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// A duration (`unusedFor`, `olderThan`) does not parse.
    #[error("{field}: {source}")]
    Duration {
        /// Which one.
        field: &'static str,
        /// Why.
        source: DurationError,
    },
    /// A glob or the watermarks are invalid.
    #[error(transparent)]
    Prune(#[from] PruneError),
}

/// A policy ready to run.
#[derive(Debug)]
pub struct Compiled {
    /// Its cron schedule.
    pub schedule: Option<Schedule>,
    /// Its watermark.
    pub watermark: Option<Watermark>,
    /// Its selection, with the agent's protections.
    pub selector: Selector,
    /// Report only.
    pub dry_run: bool,
}

/// Compiles `spec` with the agent's `protections`. The error says what is wrong, in words
/// (the API server's schema catches most mistakes; this catches the rest: cron syntax, glob
/// syntax, watermark order for objects written before the schema did).
pub fn compile(
    spec: &ImagePrunePolicySpec,
    protections: &Protections,
) -> Result<Compiled, PolicyError> {
    if spec.schedule.is_none() && spec.watermark.is_none() {
        return Err(PolicyError::NeverRuns);
    }
    let schedule = spec.schedule.as_deref().map(Schedule::parse).transpose()?;
    let watermark = match &spec.watermark {
        Some(w) => {
            let wm = Watermark {
                high_percent: w.high_percent,
                low_percent: w.low_percent,
            };
            prune::validate_watermark(&wm)?;
            Some(wm)
        }
        None => None,
    };
    let seconds = |field: &'static str, value: &Option<String>| {
        value
            .as_deref()
            .map(duration::parse_seconds)
            .transpose()
            .map_err(|source| PolicyError::Duration { field, source })
    };
    let selection = Criteria {
        unused_for: seconds("unusedFor", &spec.unused_for)?,
        older_than: seconds("olderThan", &spec.older_than)?,
        include: spec.include.clone(),
        exclude: spec.exclude.clone(),
        keep_newest: spec.keep_newest,
        max_images: Some(
            spec.max_images_per_run
                .unwrap_or(DEFAULT_MAX_IMAGES_PER_RUN)
                .min(DEFAULT_MAX_IMAGES_PER_RUN),
        ),
    };
    let selector = Selector::new(&selection, protections)?;
    Ok(Compiled {
        schedule,
        watermark,
        selector,
        dry_run: spec.dry_run,
    })
}

/// The node's images as candidates, with what their records' labels say about first-seen and
/// last-used (`core::last_used`). An image's creation is the earliest evidence of it on the
/// node: its first-seen label or the time containerd created its earliest record (the pull),
/// whichever is earlier, so an image pulled before the agent ran is as old as it really is.
/// An image with neither counts as first seen `now`: missing data never makes an image look
/// old.
pub fn candidates(inventory: &Inventory, records: &[ImageRecord], now: i64) -> Vec<Candidate> {
    let by_name: BTreeMap<&str, &ImageRecord> =
        records.iter().map(|r| (r.name.as_str(), r)).collect();
    inventory
        .images
        .values()
        .map(|image| {
            let seen = last_used::seen(&image.references, &by_name);
            let pulled = image
                .references
                .iter()
                .filter_map(|r| by_name.get(r.as_str())?.created)
                .min();
            let created = match (pulled, seen.first_seen) {
                (Some(p), Some(f)) => Some(p.min(f)),
                (p, f) => p.or(f),
            };
            Candidate {
                id: image.id.clone(),
                references: image.references.clone(),
                size: image.size,
                created,
                last_used: seen.last_used,
                first_seen: seen.first_seen.unwrap_or(now),
                pinned: image.pinned,
                in_use: !image.used_by.is_empty(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::WatermarkSpec;

    fn spec(json: serde_json::Value) -> ImagePrunePolicySpec {
        serde_json::from_value(json).unwrap()
    }

    fn err(json: serde_json::Value) -> String {
        compile(&spec(json), &Protections::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_full_policy_compiles() {
        let c = compile(
            &spec(serde_json::json!({
                "schedule": "0 3 * * *",
                "watermark": {"highPercent": 85, "lowPercent": 70},
                "unusedFor": "7d", "olderThan": "1d12h",
                "include": ["docker.io/*"], "exclude": ["*:keep-*"],
                "keepNewest": 2, "dryRun": true, "maxImagesPerRun": 5,
            })),
            &Protections {
                exclude: vec!["*/pause:*".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(c.schedule.is_some());
        assert_eq!(
            c.watermark,
            Some(Watermark {
                high_percent: 85,
                low_percent: 70
            })
        );
        assert!(c.dry_run);
    }

    #[test]
    fn every_mistake_is_named() {
        assert!(err(serde_json::json!({})).contains("neither a schedule nor a watermark"));
        assert!(err(serde_json::json!({"schedule": "0 3 * *"})).contains("4 fields"));
        assert!(
            err(serde_json::json!({"schedule": "@daily", "unusedFor": "7 days"}))
                .starts_with("unusedFor: duration")
        );
        assert!(
            err(serde_json::json!({"schedule": "@daily", "olderThan": "1w"}))
                .starts_with("olderThan: duration")
        );
        assert!(err(serde_json::json!({"schedule": "@daily", "include": ["a[b"]})).contains("a[b"));
        assert!(
            err(serde_json::json!({"watermark": {"highPercent": 70, "lowPercent": 85}}))
                .contains("70")
        );
        // Protections are the agent's: a bad one is reported too.
        let bad = compile(
            &spec(serde_json::json!({"schedule": "@daily"})),
            &Protections {
                exclude: vec!["{".into()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(bad, PolicyError::Prune(_)), "{bad:?}");
        assert!(bad.to_string().contains('{'), "{bad}");
    }

    #[test]
    fn candidates_take_the_earliest_evidence_and_never_invent_age() {
        use crate::core::inventory::CriImage;
        use crate::core::last_used::{FIRST_SEEN_LABEL, LAST_USED_LABEL};

        let image = |id: &str, refs: &[&str]| CriImage {
            id: id.into(),
            references: refs.iter().map(|r| r.to_string()).collect(),
            size: 10,
            pinned: false,
            used_by: Vec::new(),
            content: Default::default(),
        };
        let record = |name: &str, created: Option<i64>, labels: &[(&str, &str)]| ImageRecord {
            name: name.into(),
            target: Default::default(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            created,
        };
        let mut inv = Inventory::default();
        for img in [
            image("sha256:a", &["a:1", "a:2"]),
            image("sha256:b", &["b:1"]),
            image("sha256:c", &["c:1"]),
        ] {
            inv.images.insert(img.id.clone(), img);
        }
        let records = [
            // Pulled at 100 and 300, first seen by the agent at 500, last used at 700.
            record(
                "a:1",
                Some(300),
                &[(FIRST_SEEN_LABEL, "500"), (LAST_USED_LABEL, "700")],
            ),
            record("a:2", Some(100), &[(FIRST_SEEN_LABEL, "600")]),
            // Seen at 50 (an older label than containerd's clock says): the earlier wins.
            record("b:1", Some(400), &[(FIRST_SEEN_LABEL, "50")]),
            // Nothing known.
            record("c:1", None, &[]),
        ];
        let got = candidates(&inv, &records, 1000);
        let by_id = |id: &str| got.iter().find(|c| c.id == id).unwrap();
        let a = by_id("sha256:a");
        assert_eq!(
            (a.created, a.first_seen, a.last_used),
            (Some(100), 500, Some(700))
        );
        let b = by_id("sha256:b");
        assert_eq!((b.created, b.first_seen, b.last_used), (Some(50), 50, None));
        let c = by_id("sha256:c");
        assert_eq!((c.created, c.first_seen, c.last_used), (None, 1000, None));
        assert_eq!((c.creation(), c.last_use()), (1000, 1000));
    }

    #[test]
    fn the_examples_compile() {
        for example in [
            include_str!("../../examples/prune-nightly.yaml"),
            include_str!("../../examples/prune-disk-pressure.yaml"),
        ] {
            let policy: crate::api::ImagePrunePolicy = serde_yaml::from_str(example).unwrap();
            let c = compile(&policy.spec, &Protections::default()).unwrap();
            assert!(c.schedule.is_some() || c.watermark.is_some());
        }
    }

    #[test]
    fn the_cap_is_bounded() {
        // maxImagesPerRun above the maximum (stored before the schema said so) is cut to it.
        let mut s = spec(serde_json::json!({"schedule": "@daily", "maxImagesPerRun": 1000}));
        let c = compile(&s, &Protections::default()).unwrap();
        let many: Vec<Candidate> = (0..150)
            .map(|n| Candidate {
                id: format!("sha256:{n:064x}"),
                references: vec![format!("docker.io/library/a{n}:1")],
                size: 1,
                created: None,
                last_used: None,
                first_seen: 0,
                pinned: false,
                in_use: false,
            })
            .collect();
        assert_eq!(
            prune::select(&many, &c.selector, 10, None).chosen.len(),
            100
        );
        s.max_images_per_run = Some(7);
        let c = compile(&s, &Protections::default()).unwrap();
        assert_eq!(prune::select(&many, &c.selector, 10, None).chosen.len(), 7);
        s.watermark = Some(WatermarkSpec {
            high_percent: 50,
            low_percent: 10,
        });
        assert!(compile(&s, &Protections::default()).is_ok());
    }
}
