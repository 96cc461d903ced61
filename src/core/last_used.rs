//! When each image was first seen and last used on this node, kept as labels on the image's own
//! containerd records: they survive agent restarts and upgrades, need no state file or extra
//! volume, and go away with the image. Prune policies read them ("unused for 7 days"); an
//! image with no record of use counts as used when first seen, so missing data never makes
//! an image look old.
//!
//! Values are Unix seconds. A label that does not parse counts as absent.

use std::collections::BTreeMap;

use crate::core::inventory::{ImageRecord, Inventory};

/// When the agent first saw the image on this node.
pub const FIRST_SEEN_LABEL: &str = "imagegc.dev/first-seen";
/// When a container last referenced the image, as far as the agent saw.
pub const LAST_USED_LABEL: &str = "imagegc.dev/last-used";

/// One label to set on one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// The record's name.
    pub record: String,
    /// [`FIRST_SEEN_LABEL`] or [`LAST_USED_LABEL`].
    pub key: &'static str,
    /// Unix seconds.
    pub value: String,
}

/// What an image's records say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// The earliest first-seen of its records.
    pub first_seen: Option<i64>,
    /// The latest last-used of its records.
    pub last_used: Option<i64>,
}

fn label(record: &ImageRecord, key: &str) -> Option<i64> {
    record.labels.get(key)?.parse().ok()
}

/// What the records named `references` say, among `records` (by name).
pub fn seen(references: &[String], records: &BTreeMap<&str, &ImageRecord>) -> Seen {
    let mine = || references.iter().filter_map(|r| records.get(r.as_str()));
    Seen {
        first_seen: mine().filter_map(|r| label(r, FIRST_SEEN_LABEL)).min(),
        last_used: mine().filter_map(|r| label(r, LAST_USED_LABEL)).max(),
    }
}

/// The labels to write at `now` (Unix seconds):
///
/// - every record of an image that lacks a first-seen gets the image's earliest one, or `now`
///   when none of its records has one (a new image, or one pulled before the agent ran);
/// - every record of an image in use whose last-used is missing or older than
///   `now - refresh` gets `now`: an image in constant use is written once per `refresh`, not
///   at every pass, so last-used is exact to `refresh` plus the time between passes.
///
/// Records that are not CRI images are left alone.
pub fn stamps(
    inventory: &Inventory,
    records: &[ImageRecord],
    now: i64,
    refresh: i64,
) -> Vec<Stamp> {
    let by_name: BTreeMap<&str, &ImageRecord> =
        records.iter().map(|r| (r.name.as_str(), r)).collect();
    let mut out = Vec::new();
    for image in inventory.images.values() {
        let seen = seen(&image.references, &by_name);
        let first_seen = seen.first_seen.unwrap_or(now).to_string();
        let in_use = !image.used_by.is_empty();
        for name in &image.references {
            let Some(record) = by_name.get(name.as_str()) else {
                continue;
            };
            if label(record, FIRST_SEEN_LABEL).is_none() {
                out.push(Stamp {
                    record: name.clone(),
                    key: FIRST_SEEN_LABEL,
                    value: first_seen.clone(),
                });
            }
            if in_use && label(record, LAST_USED_LABEL).is_none_or(|at| at < now - refresh) {
                out.push(Stamp {
                    record: name.clone(),
                    key: LAST_USED_LABEL,
                    value: now.to_string(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::inventory::CriImage;
    use crate::core::manifest::Descriptor;

    fn record(name: &str, labels: &[(&str, &str)]) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            target: Descriptor::default(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            created: None,
        }
    }

    fn inventory(images: &[(&str, &[&str], bool)]) -> Inventory {
        let mut inv = Inventory::default();
        for (id, refs, used) in images {
            inv.images.insert(
                id.to_string(),
                CriImage {
                    id: id.to_string(),
                    references: refs.iter().map(|r| r.to_string()).collect(),
                    size: 1,
                    pinned: false,
                    used_by: if *used { vec!["c1".into()] } else { vec![] },
                    content: Default::default(),
                },
            );
        }
        inv
    }

    fn pairs(stamps: &[Stamp]) -> Vec<(&str, &str, &str)> {
        stamps
            .iter()
            .map(|s| (s.record.as_str(), s.key, s.value.as_str()))
            .collect()
    }

    #[test]
    fn a_new_image_is_first_seen_now_and_not_used() {
        let inv = inventory(&[("sha256:a", &["sha256:a", "x:1"], false)]);
        let records = [record("sha256:a", &[]), record("x:1", &[])];
        assert_eq!(
            pairs(&stamps(&inv, &records, 1000, 3600)),
            [
                ("sha256:a", FIRST_SEEN_LABEL, "1000"),
                ("x:1", FIRST_SEEN_LABEL, "1000")
            ]
        );
    }

    #[test]
    fn a_new_record_of_a_known_image_inherits_its_earliest_first_seen() {
        let inv = inventory(&[("sha256:a", &["sha256:a", "x:1", "x:2"], false)]);
        let records = [
            record("sha256:a", &[(FIRST_SEEN_LABEL, "500")]),
            record("x:1", &[(FIRST_SEEN_LABEL, "700")]),
            record("x:2", &[]),
        ];
        assert_eq!(
            pairs(&stamps(&inv, &records, 1000, 3600)),
            [("x:2", FIRST_SEEN_LABEL, "500")]
        );
    }

    #[test]
    fn an_image_in_use_is_stamped_once_per_refresh() {
        let inv = inventory(&[("sha256:a", &["x:1"], true)]);
        let fresh = [record(
            "x:1",
            &[(FIRST_SEEN_LABEL, "10"), (LAST_USED_LABEL, "900")],
        )];
        assert!(stamps(&inv, &fresh, 1000, 3600).is_empty());
        // Exactly `refresh` old: still fresh; one second more: stamped again.
        assert!(stamps(&inv, &fresh, 900 + 3600, 3600).is_empty());
        assert_eq!(
            pairs(&stamps(&inv, &fresh, 901 + 3600, 3600)),
            [("x:1", LAST_USED_LABEL, "4501")]
        );
    }

    #[test]
    fn unused_images_never_get_a_last_used() {
        let inv = inventory(&[("sha256:a", &["x:1"], false)]);
        let records = [record("x:1", &[(FIRST_SEEN_LABEL, "10")])];
        assert!(stamps(&inv, &records, 1_000_000, 3600).is_empty());
    }

    #[test]
    fn garbage_labels_count_as_absent() {
        let inv = inventory(&[("sha256:a", &["x:1"], true)]);
        let records = [record(
            "x:1",
            &[(FIRST_SEEN_LABEL, "yesterday"), (LAST_USED_LABEL, "-")],
        )];
        assert_eq!(
            pairs(&stamps(&inv, &records, 1000, 3600)),
            [
                ("x:1", FIRST_SEEN_LABEL, "1000"),
                ("x:1", LAST_USED_LABEL, "1000")
            ]
        );
    }

    #[test]
    fn seen_takes_the_earliest_first_seen_and_the_latest_last_use() {
        let records = [
            record("a", &[(FIRST_SEEN_LABEL, "30"), (LAST_USED_LABEL, "50")]),
            record("b", &[(FIRST_SEEN_LABEL, "20"), (LAST_USED_LABEL, "80")]),
            record("c", &[(FIRST_SEEN_LABEL, "1")]),
        ];
        let by_name = records.iter().map(|r| (r.name.as_str(), r)).collect();
        assert_eq!(
            seen(&["a".into(), "b".into()], &by_name),
            Seen {
                first_seen: Some(20),
                last_used: Some(80)
            }
        );
        assert_eq!(seen(&["z".into()], &by_name), Seen::default());
    }
}
