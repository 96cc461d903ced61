//! The plan: what to do with each requested string, and the exact deletes, in a crash-safe
//! order, that carry it out. Pure: it reads an [`Inventory`] and touches nothing.

use std::collections::BTreeSet;
use std::fmt;

use crate::core::inventory::{CriImage, Inventory, Journal};
use crate::core::prune::Protected;
use crate::core::resolve::{Resolution, resolve};

/// What the caller asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// Image IDs, short IDs or references, as a user typed them.
    pub images: Vec<String>,
    /// Remove images that containers use (pinned and protected images are never removed).
    pub force: bool,
    /// Images no request may remove, forced or not (the agent's protection globs).
    pub protected: Protected,
}

/// The decision for one requested string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The image will be removed: every one of its references.
    Remove {
        /// The image ID.
        id: String,
        /// Every record name that will be deleted.
        references: Vec<String>,
        /// Content size of the image for this platform.
        size: i64,
        /// Containers that use it (non-empty only with `force`).
        used_by: Vec<String>,
    },
    /// No such image on this node: nothing to do, and that is success.
    NotPresent,
    /// Containers use the image; it is kept (ask with `force` to remove it anyway).
    InUse {
        /// The image ID.
        id: String,
        /// The containers that use it.
        used_by: Vec<String>,
    },
    /// The image is pinned by the runtime (e.g. the sandbox image) and is never removed.
    Pinned {
        /// The image ID.
        id: String,
    },
    /// A reference of the image (or its ID) matches one of the agent's protection globs: it
    /// is never removed, forced or not.
    Protected {
        /// The image ID.
        id: String,
        /// The matching reference (or the ID).
        reference: String,
        /// The glob it matches.
        glob: String,
    },
    /// The string is not an image ID or reference; nothing is touched.
    Invalid {
        /// Why, in words.
        reason: String,
    },
    /// The short ID matches several images; nothing is touched.
    Ambiguous {
        /// The matching IDs.
        candidates: Vec<String>,
    },
}

impl Outcome {
    /// A stable one-word name of the decision (`Remove` is only planned: what a report says
    /// once it ran is the agent's `report::image_outcome`).
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Remove { .. } => "Remove",
            Outcome::NotPresent => "NotPresent",
            Outcome::InUse { .. } => "InUse",
            Outcome::Pinned { .. } => "Pinned",
            Outcome::Protected { .. } => "Protected",
            Outcome::Invalid { .. } => "Invalid",
            Outcome::Ambiguous { .. } => "Ambiguous",
        }
    }

    /// Whether this outcome counts as a failure of the request (the caller must act).
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Invalid { .. } | Outcome::Ambiguous { .. })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Remove {
                id,
                references,
                used_by,
                ..
            } => {
                write!(f, "image {id}: {} reference(s)", references.len())?;
                if !used_by.is_empty() {
                    write!(f, " (forced although used by {})", used_by.join(", "))?;
                }
                Ok(())
            }
            Outcome::NotPresent => write!(f, "not present on this node"),
            Outcome::InUse { id, used_by } => write!(
                f,
                "image {id} is used by container(s) {}; kept (use force to remove it anyway)",
                used_by.join(", ")
            ),
            Outcome::Pinned { id } => write!(
                f,
                "image {id} is pinned by the container runtime (e.g. the sandbox image); never removed"
            ),
            Outcome::Protected {
                id,
                reference,
                glob,
            } => write!(
                f,
                "image {id} is protected ({reference} matches the agent's protection glob {glob}); \
                 never removed, forced or not"
            ),
            Outcome::Invalid { reason } => write!(f, "invalid: {reason}"),
            Outcome::Ambiguous { candidates } => write!(
                f,
                "short ID matches {} images ({}); give more characters",
                candidates.len(),
                candidates.join(", ")
            ),
        }
    }
}

/// One requested string and its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// The string as requested.
    pub input: String,
    /// What will be done.
    pub outcome: Outcome,
}

/// A full plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// One entry per requested string, in request order.
    pub items: Vec<Item>,
    /// Record names to delete, in order. Per image the `sha256:<id>` record goes first and
    /// the other names follow in CRI order. Images left pending by an interrupted run come
    /// first of all, every remaining reference of each, its pending record last. The executor
    /// writes [`Plan::marks`] to a journal before deleting anything, deletes the marked and
    /// pending records after all others, and makes the last delete synchronous (one garbage
    /// collection per batch).
    pub deletes: Vec<String>,
    /// The records to list in the batch's journal before any delete: the last record of each
    /// image in `deletes`. An interrupted run therefore leaves, for every image it had
    /// started, a journalled record until the image's very last record is gone, and the next
    /// plan finds the rest of the image through it, so nothing an interruption leaves is
    /// stranded. The journal is one write per batch, not one per image.
    pub marks: Vec<String>,
    /// The pending records (an interrupted run's marks) that this plan finishes; like
    /// `marks`, each is deleted after every other record.
    pub pending: Vec<String>,
    /// The journals found (see [`Inventory::journals`]): the executor deletes each once
    /// none of its records is left.
    pub journals: Vec<Journal>,
    /// Which of `deletes` finish an earlier, interrupted removal.
    pub resumed: Vec<String>,
    /// Digests of the content blobs the images in `deletes` reference for this platform
    /// (indexes walked, manifest, config, compressed layers): what the garbage collection
    /// may free. The executor measures the bytes freed over these alone.
    pub content: BTreeSet<String>,
}

/// `image`'s references in delete order: the ID record first, then the names in CRI order,
/// and `last` (if it is one of them) at the end.
fn delete_order<'a>(image: &'a CriImage, last: Option<&str>) -> Vec<&'a String> {
    let (first, rest): (Vec<&String>, Vec<&String>) = image
        .references
        .iter()
        .filter(|r| Some(r.as_str()) != last)
        .partition(|r| **r == image.id);
    let mut order: Vec<&String> = first.into_iter().chain(rest).collect();
    if let Some(last) = image.references.iter().find(|r| Some(r.as_str()) == last) {
        order.push(last);
    }
    order
}

/// The outcome for `image`, found on the node: kept (pinned, protected, or in use without
/// `force`), or removed, its deletes (those not `seen` yet) and its mark appended to `plan`.
fn decide(
    request: &Request,
    image: &CriImage,
    seen: &mut BTreeSet<String>,
    plan: &mut Plan,
) -> Outcome {
    let id = image.id.clone();
    if image.pinned {
        return Outcome::Pinned { id };
    }
    if let Some((reference, glob)) = request.protected.matching(&image.id, &image.references) {
        return Outcome::Protected {
            id,
            reference,
            glob,
        };
    }
    if !image.used_by.is_empty() && !request.force {
        return Outcome::InUse {
            id,
            used_by: image.used_by.clone(),
        };
    }
    let mut last_new = None;
    for r in delete_order(image, None) {
        if seen.insert(r.clone()) {
            plan.deletes.push(r.clone());
            last_new = Some(r.clone());
        }
    }
    plan.marks.extend(last_new);
    plan.content.extend(image.content.iter().cloned());
    Outcome::Remove {
        id,
        references: image.references.clone(),
        size: image.size,
        used_by: image.used_by.clone(),
    }
}

/// Plans `request` against `inventory`.
pub fn plan(request: &Request, inventory: &Inventory) -> Plan {
    let ids = inventory.ids();
    let mut plan = Plan {
        journals: inventory.journals.clone(),
        ..Plan::default()
    };
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for name in &inventory.pending {
        if seen.contains(name) {
            continue;
        }
        // The whole image the pending record belongs to, the pending record last; a record
        // that no longer reads as an image goes alone. An image that became pinned, used or
        // protected since is kept like any other: it waits for a request that may remove it.
        match inventory
            .images
            .values()
            .find(|i| i.references.contains(name))
        {
            Some(image)
                if image.pinned
                    || !image.used_by.is_empty()
                    || request
                        .protected
                        .matching(&image.id, &image.references)
                        .is_some() => {}
            Some(image) => {
                for r in delete_order(image, Some(name)) {
                    if seen.insert(r.clone()) {
                        plan.resumed.push(r.clone());
                        plan.deletes.push(r.clone());
                    }
                }
                plan.pending.push(name.clone());
                plan.content.extend(image.content.iter().cloned());
            }
            None => {
                seen.insert(name.clone());
                plan.resumed.push(name.clone());
                plan.deletes.push(name.clone());
                plan.pending.push(name.clone());
            }
        }
    }
    for input in &request.images {
        let outcome = match resolve(input, &ids, &inventory.ref_to_id) {
            Err(invalid) => Outcome::Invalid {
                reason: invalid.to_string(),
            },
            Ok(Resolution::NotFound) => Outcome::NotPresent,
            Ok(Resolution::Ambiguous(candidates)) => Outcome::Ambiguous { candidates },
            Ok(Resolution::Found(id)) => match inventory.images.get(&id) {
                None => Outcome::NotPresent,
                Some(image) => decide(request, image, &mut seen, &mut plan),
            },
        };
        plan.items.push(Item {
            input: input.clone(),
            outcome,
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::inventory::CriImage;
    use crate::core::reference::sort_references;

    fn digest(n: u64) -> String {
        format!("sha256:{n:064x}")
    }

    fn nginx() -> String {
        digest(0xc1)
    }

    fn redis() -> String {
        digest(0xc2)
    }

    fn pause() -> String {
        digest(0xc3)
    }

    /// Two IDs that share the short prefix `abcd` and differ in the next character.
    fn twins() -> (String, String) {
        (
            format!("sha256:abcd1{:059x}", 0xa),
            format!("sha256:abcd2{:059x}", 0xb),
        )
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn image(id: &str, refs: &[&str], size: i64) -> CriImage {
        CriImage {
            id: id.into(),
            references: sort_references(&strings(refs)),
            size,
            pinned: false,
            used_by: Vec::new(),
            content: BTreeSet::new(),
        }
    }

    /// nginx (two tags and its ID record), redis (used by c1), pause (pinned, used by the
    /// sandbox) and two images whose IDs share a prefix; `pending` names an interrupted run.
    fn inventory(pending: &[&str]) -> Inventory {
        let (twin_a, twin_b) = twins();
        let nginx_id = nginx();
        let pause_id = pause();
        let mut redis = image(&redis(), &["docker.io/library/redis:7"], 1000);
        redis.used_by = strings(&["c1"]);
        let mut pause = image(&pause_id, &["registry.k8s.io/pause:3.9", &pause_id], 300);
        pause.pinned = true;
        pause.used_by = strings(&["sandbox"]);
        let images = [
            image(
                &nginx_id,
                &[
                    &nginx_id,
                    "docker.io/library/nginx:latest",
                    "docker.io/library/nginx:1.25",
                ],
                2600,
            ),
            redis,
            pause,
            image(&twin_a, &["docker.io/library/twin:a"], 10),
            image(&twin_b, &["docker.io/library/twin:b"], 20),
        ];
        let mut inv = Inventory::default();
        for i in images {
            for r in &i.references {
                inv.ref_to_id.insert(r.clone(), i.id.clone());
            }
            inv.images.insert(i.id.clone(), i);
        }
        inv.pending = pending.iter().map(|s| s.to_string()).collect();
        inv
    }

    fn request(images: &[&str], force: bool) -> Request {
        Request {
            images: strings(images),
            force,
            ..Default::default()
        }
    }

    fn outcomes(plan: &Plan) -> Vec<&Outcome> {
        plan.items.iter().map(|i| &i.outcome).collect()
    }

    fn nginx_removed() -> Outcome {
        Outcome::Remove {
            id: nginx(),
            references: strings(&[
                "docker.io/library/nginx:1.25",
                "docker.io/library/nginx:latest",
                &nginx(),
            ]),
            size: 2600,
            used_by: Vec::new(),
        }
    }

    #[test]
    fn remove_deletes_every_reference_id_record_first() {
        let p = plan(&request(&["nginx"], false), &inventory(&[]));
        assert_eq!(
            p.items,
            vec![Item {
                input: "nginx".into(),
                outcome: nginx_removed(),
            }]
        );
        assert_eq!(
            p.deletes,
            strings(&[
                &nginx(),
                "docker.io/library/nginx:1.25",
                "docker.io/library/nginx:latest",
            ])
        );
        assert!(p.resumed.is_empty());
    }

    #[test]
    fn absent_images_are_not_present() {
        let inputs = ["docker.io/library/ghost:1", "ghost", &digest(0xdead)];
        let p = plan(&request(&inputs, true), &inventory(&[]));
        assert_eq!(outcomes(&p), vec![&Outcome::NotPresent; 3]);
        assert!(p.deletes.is_empty());
        assert!(!Outcome::NotPresent.is_failure());
    }

    #[test]
    fn in_use_is_kept_unless_forced() {
        let inv = inventory(&[]);
        let kept = plan(&request(&["redis:7"], false), &inv);
        assert_eq!(
            outcomes(&kept),
            vec![&Outcome::InUse {
                id: redis(),
                used_by: strings(&["c1"]),
            }]
        );
        assert!(kept.deletes.is_empty());

        let forced = plan(&request(&["redis:7"], true), &inv);
        assert_eq!(
            outcomes(&forced),
            vec![&Outcome::Remove {
                id: redis(),
                references: strings(&["docker.io/library/redis:7"]),
                size: 1000,
                used_by: strings(&["c1"]),
            }]
        );
        assert_eq!(forced.deletes, strings(&["docker.io/library/redis:7"]));
    }

    #[test]
    fn pinned_is_never_removed_even_forced() {
        let inv = inventory(&[]);
        for force in [false, true] {
            let p = plan(
                &request(&["registry.k8s.io/pause:3.9", &pause()], force),
                &inv,
            );
            let pinned = Outcome::Pinned { id: pause() };
            assert_eq!(outcomes(&p), vec![&pinned, &pinned], "force {force}");
            assert!(p.deletes.is_empty(), "force {force}");
        }
    }

    #[test]
    fn protected_is_never_removed_even_forced_or_by_id() {
        let inv = inventory(&[]);
        let protected = Protected::new(&strings(&["docker.io/library/redis:*"])).unwrap();
        for force in [false, true] {
            let p = plan(
                &Request {
                    images: strings(&["redis:7", &redis(), "nginx"]),
                    force,
                    protected: protected.clone(),
                },
                &inv,
            );
            let kept = Outcome::Protected {
                id: redis(),
                reference: "docker.io/library/redis:7".into(),
                glob: "docker.io/library/redis:*".into(),
            };
            assert_eq!(
                outcomes(&p),
                vec![&kept, &kept, &nginx_removed()],
                "force {force}"
            );
            assert!(
                !kept.is_failure(),
                "a protected image does not block the batch"
            );
            assert!(
                !p.deletes
                    .iter()
                    .any(|d| d.contains("redis") || *d == redis()),
                "force {force}: {:?}",
                p.deletes
            );
        }
        // A glob on the ID protects it too.
        let by_id = Protected::new(&[nginx()]).unwrap();
        let p = plan(
            &Request {
                images: strings(&["nginx:1.25"]),
                force: true,
                protected: by_id,
            },
            &inv,
        );
        assert_eq!(p.items[0].outcome.kind(), "Protected");
        assert!(p.deletes.is_empty());
    }

    #[test]
    fn an_interrupted_removal_of_a_now_protected_image_waits() {
        let inv = inventory(&["docker.io/library/nginx:latest"]);
        let protected = Protected::new(&strings(&["*/nginx:*"])).unwrap();
        let p = plan(
            &Request {
                images: Vec::new(),
                force: true,
                protected,
            },
            &inv,
        );
        assert!(p.deletes.is_empty(), "{:?}", p.deletes);
        assert!(p.pending.is_empty());
    }

    #[test]
    fn invalid_inputs_touch_nothing_and_keep_their_place() {
        let upper = nginx().to_uppercase();
        let inputs = ["", "nginx*", &upper, "nginx", " "];
        let p = plan(&request(&inputs, true), &inventory(&[]));
        assert_eq!(
            p.items.iter().map(|i| i.input.as_str()).collect::<Vec<_>>(),
            inputs
        );
        let reason = |i: usize| match &p.items[i].outcome {
            Outcome::Invalid { reason } => reason.clone(),
            other => panic!("item {i}: {other:?}"),
        };
        assert!(reason(0).contains("empty"), "{}", reason(0));
        assert!(reason(1).contains("wildcard"), "{}", reason(1));
        assert!(reason(2).contains("uppercase"), "{}", reason(2));
        assert!(reason(4).contains("empty"), "{}", reason(4));
        assert_eq!(p.items[3].outcome, nginx_removed());
        // Only the valid request's records are deleted.
        assert_eq!(p.deletes.len(), 3);
        assert!(
            p.deletes
                .iter()
                .all(|d| inventory(&[]).ref_to_id[d] == nginx())
        );
    }

    #[test]
    fn short_id_shared_by_two_images_is_ambiguous() {
        let (twin_a, twin_b) = twins();
        let p = plan(
            &request(&["abcd", "sha256:abcd", "abcd1"], true),
            &inventory(&[]),
        );
        let ambiguous = Outcome::Ambiguous {
            candidates: vec![twin_a.clone(), twin_b],
        };
        assert_eq!(outcomes(&p)[..2], [&ambiguous, &ambiguous]);
        // One more character makes it unique.
        assert!(matches!(outcomes(&p)[2], Outcome::Remove { id, .. } if *id == twin_a));
        assert_eq!(p.deletes, strings(&["docker.io/library/twin:a"]));
    }

    #[test]
    fn deletes_start_with_pending_then_each_image_id_record_first() {
        let old = digest(0x01d);
        let inv = inventory(&[&old, "docker.io/library/old:1"]);
        let p = plan(&request(&["redis:7", "nginx:latest"], true), &inv);
        assert_eq!(p.resumed, strings(&["docker.io/library/old:1", &old]));
        assert_eq!(
            p.deletes,
            strings(&[
                "docker.io/library/old:1",
                &old,
                "docker.io/library/redis:7",
                &nginx(),
                "docker.io/library/nginx:1.25",
                "docker.io/library/nginx:latest",
            ])
        );
        // One mark per image: its last delete.
        assert_eq!(
            p.marks,
            strings(&[
                "docker.io/library/redis:7",
                "docker.io/library/nginx:latest"
            ])
        );
    }

    #[test]
    fn a_pending_record_brings_its_whole_image_and_is_deleted_last() {
        // An interrupted run left nginx's mark (its last record); the rest is unlabelled.
        let inv = inventory(&["docker.io/library/nginx:1.25"]);
        let p = plan(&Request::default(), &inv);
        let expected = strings(&[
            &nginx(),
            "docker.io/library/nginx:latest",
            "docker.io/library/nginx:1.25",
        ]);
        assert_eq!(p.resumed, expected);
        assert_eq!(p.deletes, expected);
        assert!(
            p.marks.is_empty(),
            "the pending record already carries the mark"
        );
        assert_eq!(p.pending, strings(&["docker.io/library/nginx:1.25"]));
    }

    #[test]
    fn journals_found_are_handed_to_the_executor() {
        let mut inv = inventory(&[]);
        let journal = Journal {
            id: "imagegc-journal-1".into(),
            names: ["docker.io/library/gone:1".to_string()].into(),
        };
        inv.journals.push(journal.clone());
        let p = plan(&Request::default(), &inv);
        // Its record is gone: nothing to delete, only the journal to clean up.
        assert!(p.deletes.is_empty());
        assert_eq!(p.journals, vec![journal]);
    }

    #[test]
    fn pending_reference_of_a_requested_image_is_deleted_once() {
        let inv = inventory(&["docker.io/library/nginx:latest"]);
        let p = plan(&request(&["nginx:1.25"], false), &inv);
        let expected = strings(&[
            &nginx(),
            "docker.io/library/nginx:1.25",
            "docker.io/library/nginx:latest",
        ]);
        assert_eq!(p.resumed, expected);
        assert_eq!(p.deletes, expected);
        assert!(p.marks.is_empty());
        // The outcome still lists every reference of the image.
        assert_eq!(outcomes(&p), vec![&nginx_removed()]);
    }

    #[test]
    fn same_image_requested_twice_is_deleted_once() {
        let id = nginx();
        let inputs = ["nginx:1.25", &id, &id[7..], "nginx"];
        let p = plan(&request(&inputs, false), &inventory(&[]));
        assert_eq!(outcomes(&p), vec![&nginx_removed(); 4]);
        assert_eq!(
            p.deletes,
            strings(&[
                &id,
                "docker.io/library/nginx:1.25",
                "docker.io/library/nginx:latest",
            ])
        );
    }

    #[test]
    fn only_removals_and_pending_add_deletes() {
        let p = plan(
            &request(
                &["", "abcd", "redis:7", "registry.k8s.io/pause:3.9", "ghost"],
                false,
            ),
            &inventory(&[]),
        );
        let kinds: Vec<&str> = p.items.iter().map(|i| i.outcome.kind()).collect();
        assert_eq!(
            kinds,
            ["Invalid", "Ambiguous", "InUse", "Pinned", "NotPresent"]
        );
        assert!(p.deletes.is_empty());
        assert!(p.resumed.is_empty());
    }

    #[test]
    fn what_may_be_freed_is_the_content_of_removed_and_resumed_images() {
        let mut inv = inventory(&["docker.io/library/twin:a"]);
        let blobs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        for (id, content) in [
            (nginx(), blobs(&["nginx-manifest", "shared-layer"])),
            (redis(), blobs(&["redis-manifest", "shared-layer"])),
            (twins().0, blobs(&["twin-a-manifest"])),
            (twins().1, blobs(&["twin-b-manifest"])),
        ] {
            inv.images.get_mut(&id).unwrap().content = content;
        }
        // nginx is removed, redis (in use) is kept, twin:a finishes an interrupted removal.
        let p = plan(&request(&["nginx", "redis:7"], false), &inv);
        assert_eq!(
            p.content,
            blobs(&["nginx-manifest", "shared-layer", "twin-a-manifest"])
        );
        let nothing = plan(&request(&["redis:7", "ghost"], false), &inventory(&[]));
        assert!(nothing.content.is_empty());
    }

    #[test]
    fn empty_request_only_resumes() {
        let inv = inventory(&["docker.io/library/old:1"]);
        let p = plan(&Request::default(), &inv);
        assert!(p.items.is_empty());
        assert_eq!(p.resumed, strings(&["docker.io/library/old:1"]));
        assert_eq!(p.deletes, p.resumed);

        assert_eq!(plan(&Request::default(), &inventory(&[])), Plan::default());
        assert_eq!(
            plan(&request(&["nginx"], true), &Inventory::default()).items[0].outcome,
            Outcome::NotPresent
        );
    }

    fn every_outcome() -> Vec<Outcome> {
        vec![
            Outcome::Remove {
                id: nginx(),
                references: strings(&["docker.io/library/nginx:1.25", &nginx()]),
                size: 2600,
                used_by: strings(&["c1", "c2"]),
            },
            Outcome::NotPresent,
            Outcome::InUse {
                id: redis(),
                used_by: strings(&["c1", "c2"]),
            },
            Outcome::Pinned { id: pause() },
            Outcome::Invalid {
                reason: "the image is empty".into(),
            },
            Outcome::Ambiguous {
                candidates: vec![twins().0, twins().1],
            },
        ]
    }

    #[test]
    fn kind_and_failure() {
        let got: Vec<(&str, bool)> = every_outcome()
            .iter()
            .map(|o| (o.kind(), o.is_failure()))
            .collect();
        assert_eq!(
            got,
            [
                ("Remove", false),
                ("NotPresent", false),
                ("InUse", false),
                ("Pinned", false),
                ("Invalid", true),
                ("Ambiguous", true),
            ]
        );
    }

    #[test]
    fn display_says_what_happened_and_what_to_do() {
        let text: Vec<String> = every_outcome().iter().map(ToString::to_string).collect();
        assert_eq!(
            text[0],
            format!(
                "image {}: 2 reference(s) (forced although used by c1, c2)",
                nginx()
            )
        );
        let plain = Outcome::Remove {
            id: nginx(),
            references: strings(&[&nginx()]),
            size: 0,
            used_by: Vec::new(),
        };
        assert_eq!(
            plain.to_string(),
            format!("image {}: 1 reference(s)", nginx())
        );
        assert!(text[1].contains("not present"), "{}", text[1]);
        assert!(
            text[2].contains(&redis()) && text[2].contains("c1, c2") && text[2].contains("force"),
            "{}",
            text[2]
        );
        assert!(
            text[3].contains(&pause()) && text[3].contains("pinned") && text[3].contains("never"),
            "{}",
            text[3]
        );
        assert_eq!(text[4], "invalid: the image is empty");
        let (a, b) = twins();
        assert!(
            text[5].contains("2 images")
                && text[5].contains(&format!("{a}, {b}"))
                && text[5].contains("more characters"),
            "{}",
            text[5]
        );
    }

    mod properties {
        use std::collections::BTreeMap;

        use super::*;
        use proptest::prelude::*;

        /// One generated image: tags (indexes into a small name pool), whether it has its ID
        /// record, pinned, used.
        #[derive(Clone, Debug)]
        struct Gen {
            tags: BTreeSet<u8>,
            id_record: bool,
            pinned: bool,
            used: bool,
        }

        fn gen_image() -> impl Strategy<Value = Gen> {
            (
                proptest::collection::btree_set(0u8..12, 0..3),
                any::<bool>(),
                proptest::bool::weighted(0.2),
                proptest::bool::weighted(0.3),
            )
                .prop_map(|(tags, id_record, pinned, used)| Gen {
                    tags,
                    id_record,
                    pinned,
                    used,
                })
        }

        fn tag(t: u8) -> String {
            format!("docker.io/library/app{}:v{}", t % 4, t)
        }

        /// IDs that share prefixes often, so short IDs are often ambiguous.
        fn id_of(i: usize) -> String {
            format!("sha256:{:x}{:063x}", i % 3, i)
        }

        /// An inventory where every tag belongs to at most one image.
        fn build(gens: &[Gen], pending: &[u8]) -> Inventory {
            let mut inv = Inventory::default();
            let mut taken = BTreeSet::new();
            for (i, g) in gens.iter().enumerate() {
                let id = id_of(i);
                let mut refs: Vec<String> = g
                    .tags
                    .iter()
                    .filter(|t| taken.insert(**t))
                    .map(|t| tag(*t))
                    .collect();
                if g.id_record || refs.is_empty() {
                    refs.push(id.clone());
                }
                let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
                let mut img = image(&id, &refs, 1);
                img.pinned = g.pinned;
                if g.used {
                    img.used_by = vec![format!("c{i}")];
                }
                for r in &img.references {
                    inv.ref_to_id.insert(r.clone(), id.clone());
                }
                inv.images.insert(id, img);
            }
            let all: Vec<String> = inv
                .images
                .values()
                .flat_map(|i| i.references.clone())
                .chain(["docker.io/library/orphan:1".to_string()])
                .collect();
            for p in pending {
                inv.pending.insert(all[*p as usize % all.len()].clone());
            }
            inv
        }

        /// Requested strings: tags in short and full form, IDs, short IDs, and garbage.
        fn gen_input() -> impl Strategy<Value = String> {
            prop_oneof![
                (0u8..12).prop_map(tag),
                (0u8..12).prop_map(|t| format!("app{}:v{}", t % 4, t)),
                (0usize..8).prop_map(id_of),
                (0usize..8, 1usize..10).prop_map(|(i, n)| id_of(i)[7..7 + n].to_string()),
                Just(String::new()),
                Just("UPPER:Case".to_string()),
                Just("app*".to_string()),
                "[a-z0-9:/@.]{1,20}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn plans_delete_only_what_was_asked_and_never_protected_images(
                gens in proptest::collection::vec(gen_image(), 0..8),
                pending in proptest::collection::vec(any::<u8>(), 0..3),
                inputs in proptest::collection::vec(gen_input(), 0..6),
                force in any::<bool>(),
                protect_app1 in any::<bool>(),
            ) {
                let inv = build(&gens, &pending);
                let globs = if protect_app1 { vec!["*/app1:*".to_string()] } else { Vec::new() };
                let protected = Protected::new(&globs).unwrap();
                let p = plan(&Request { images: inputs.clone(), force, protected }, &inv);
                let owner: BTreeMap<&String, &CriImage> = inv
                    .images
                    .values()
                    .flat_map(|i| i.references.iter().map(move |r| (r, i)))
                    .collect();
                let removed: BTreeSet<&String> = p
                    .items
                    .iter()
                    .filter_map(|i| match &i.outcome {
                        Outcome::Remove { id, .. } => Some(id),
                        _ => None,
                    })
                    .collect();
                prop_assert_eq!(p.items.len(), inputs.len());
                let unique: BTreeSet<&String> = p.deletes.iter().collect();
                prop_assert_eq!(unique.len(), p.deletes.len(), "a record deleted twice");
                prop_assert!(p.deletes.starts_with(&p.resumed), "resumed work comes first");
                for d in &p.deletes {
                    match owner.get(d) {
                        Some(img) => {
                            prop_assert!(!img.pinned, "pinned image deleted: {}", d);
                            prop_assert!(
                                !(protect_app1 && img.references.iter().any(|r| r.contains("/app1:"))),
                                "protected image deleted: {}", d
                            );
                            prop_assert!(
                                img.used_by.is_empty() || (force && removed.contains(&img.id)),
                                "in-use image deleted without force: {}", d
                            );
                            prop_assert!(
                                removed.contains(&img.id) || p.resumed.contains(d),
                                "{} is neither requested nor an interrupted removal", d
                            );
                        }
                        None => prop_assert!(
                            inv.pending.contains(d) && p.resumed.contains(d),
                            "{} is not an image record and not pending", d
                        ),
                    }
                }
                // Every image the plan touches is deleted whole, its last delete carrying a
                // pending mark (a new one, or the one an interrupted run left).
                let mut per_image: BTreeMap<&String, Vec<&String>> = BTreeMap::new();
                for d in &p.deletes {
                    if let Some(img) = owner.get(d) {
                        per_image.entry(&img.id).or_default().push(d);
                    }
                }
                for (id, order) in per_image {
                    let img = &inv.images[id];
                    prop_assert_eq!(order.len(), img.references.len(), "{} deleted in part", id);
                    let last = order[order.len() - 1];
                    prop_assert!(
                        p.marks.contains(last) || inv.pending.contains(last),
                        "{}: the last delete carries no mark", id
                    );
                    if order.len() > 1 && img.references.contains(id) && order[0] != id {
                        // Only an interrupted run's mark may put the ID record elsewhere.
                        prop_assert!(inv.pending.contains(id), "{}: the ID record is not first", id);
                    }
                }
                prop_assert!(p.marks.iter().all(|m| p.deletes.contains(m) && !p.resumed.contains(m)));
            }
        }
    }
}
