//! The CRI view of one containerd namespace: image records grouped into CRI images (keyed by
//! the config digest of the manifest chosen for the node's platform), with their references in
//! CRI order, whether they are pinned, which containers use them, and what content they hold.

use std::collections::{BTreeMap, BTreeSet};

use crate::core::manifest::{Descriptor, Selection};
use crate::core::reference::sort_references;
use crate::core::resolve::{Resolution, resolve};

/// Label that marks an image the runtime must keep (the sandbox image, for example).
pub const PINNED_LABEL: &str = "io.cri-containerd.pinned";
/// Value of [`PINNED_LABEL`] on a pinned image.
pub const PINNED_VALUE: &str = "pinned";
/// Label that makes a containerd lease an imagegc journal (its value is the format version).
pub const JOURNAL_LABEL: &str = "imagegc.dev/removal-journal";
/// Prefix of a journal's entry labels: `imagegc.dev/pending.<n>` = a record name.
pub const JOURNAL_ENTRY_PREFIX: &str = "imagegc.dev/pending.";

/// A removal journal: one containerd lease, written before a batch deletes anything, that
/// names the last record of each image the batch is about to remove. If the batch is
/// interrupted, the next run finds the rest through it and finishes the job. The lease holds
/// no resources, so it keeps nothing alive; it is deleted once none of its records is left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Journal {
    /// The lease ID.
    pub id: String,
    /// The record names it lists.
    pub names: BTreeSet<String>,
}

impl Journal {
    /// The journal a lease's labels describe, or `None` if they are not a journal's.
    pub fn from_labels<'a>(
        id: &str,
        labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Option<Journal> {
        let mut is_journal = false;
        let mut names = BTreeSet::new();
        for (key, value) in labels {
            if key == JOURNAL_LABEL {
                is_journal = true;
            } else if key.starts_with(JOURNAL_ENTRY_PREFIX) {
                names.insert(value.clone());
            }
        }
        is_journal.then(|| Journal {
            id: id.to_string(),
            names,
        })
    }

    /// The labels of a journal listing `names`.
    pub fn labels<'a>(names: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([(JOURNAL_LABEL.to_string(), "v1".to_string())]);
        for (i, name) in names.into_iter().enumerate() {
            labels.insert(format!("{JOURNAL_ENTRY_PREFIX}{i}"), name.clone());
        }
        labels
    }
}

/// One image record as containerd stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    /// The record's name exactly as stored (a reference, or `sha256:<id>`).
    pub name: String,
    /// What the record points at (a manifest or an index).
    pub target: Descriptor,
    /// The record's labels.
    pub labels: BTreeMap<String, String>,
    /// When containerd created the record (the pull or import), Unix seconds, if known.
    pub created: Option<i64>,
}

/// One container record, running or not: what makes an image "in use".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRecord {
    /// The container ID.
    pub id: String,
    /// The image name the container was created from (`Container.image`).
    pub image: String,
    /// The CRI metadata's `ImageRef` (the config digest), when the CRI created the container.
    pub image_ref: Option<String>,
}

/// One CRI image: every record whose target resolves to the same config digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CriImage {
    /// The image ID, `sha256:<config digest hex>`.
    pub id: String,
    /// The names of its records, in the order CRI deletes them.
    pub references: Vec<String>,
    /// Content size for this platform (index, manifest, config, compressed layers).
    pub size: i64,
    /// Whether any record carries `io.cri-containerd.pinned=pinned`.
    pub pinned: bool,
    /// IDs of the containers that use it.
    pub used_by: Vec<String>,
    /// Digests of the content blobs it references for this platform.
    pub content: BTreeSet<String>,
}

/// One image as a CRI runtime lists it (`ListImages`): what the CRI backend has instead of
/// records and content.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListedImage {
    /// The runtime's image ID, as the runtime spells it (CRI-O: bare hex; containerd:
    /// `sha256:<hex>`).
    pub id: String,
    /// Its tags (`docker.io/library/nginx:1.27`).
    pub repo_tags: Vec<String>,
    /// Its digest references (`docker.io/library/nginx@sha256:…`).
    pub repo_digests: Vec<String>,
    /// Its size as the runtime reports it.
    pub size: i64,
    /// The runtime's `pinned` flag (the sandbox image, `pinned_images`).
    pub pinned: bool,
}

/// An image ID in the core's spelling: a bare 64-hex ID (CRI-O's) gets `sha256:`.
pub fn normalize_id(id: &str) -> String {
    let bare = id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if bare {
        format!("sha256:{id}")
    } else {
        id.to_string()
    }
}

/// A record that is not a CRI image, and why (its manifest or config cannot be read, or no
/// manifest matches the node's platform). Such records are never touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The record's name.
    pub name: String,
    /// Why it is not a CRI image.
    pub reason: String,
}

/// The CRI view of a namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    /// CRI images by ID.
    pub images: BTreeMap<String, CriImage>,
    /// Raw record name → image ID (CRI's reference cache).
    pub ref_to_id: BTreeMap<String, String>,
    /// Records that are not CRI images.
    pub skipped: Vec<Skipped>,
    /// Names of existing records an interrupted removal left to finish: listed in a
    /// [`Journal`].
    pub pending: BTreeSet<String>,
    /// Every journal found, finished or not (see [`Inventory::add_journals`]).
    pub journals: Vec<Journal>,
}

impl Inventory {
    /// Adds the journals found in the namespace: the names they list that still exist among
    /// `records` become [`Inventory::pending`]. Names already gone are done.
    pub fn add_journals(&mut self, journals: Vec<Journal>, records: &[ImageRecord]) {
        let existing: BTreeSet<&str> = records.iter().map(|r| r.name.as_str()).collect();
        for journal in &journals {
            self.pending.extend(
                journal
                    .names
                    .iter()
                    .filter(|n| existing.contains(n.as_str()))
                    .cloned(),
            );
        }
        self.journals.extend(journals);
    }

    /// Whether an interrupted removal left something to finish (pending records) or to clean
    /// up (a journal whose records are all gone).
    pub fn interrupted(&self) -> bool {
        !self.pending.is_empty()
            || self
                .journals
                .iter()
                .any(|j| j.names.is_disjoint(&self.pending))
    }

    /// Groups `records` into CRI images. `selections` holds, for each record name, the manifest
    /// selected for the node's platform or the reason none could be.
    pub fn build(
        records: &[ImageRecord],
        selections: &BTreeMap<String, Result<Selection, String>>,
        containers: &[ContainerRecord],
    ) -> Inventory {
        let mut inv = Inventory::default();
        let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for record in records {
            let selection = match selections.get(&record.name) {
                Some(Ok(s)) => s,
                Some(Err(reason)) => {
                    inv.skipped.push(Skipped {
                        name: record.name.clone(),
                        reason: reason.clone(),
                    });
                    continue;
                }
                None => {
                    inv.skipped.push(Skipped {
                        name: record.name.clone(),
                        reason: "its manifest was not read".into(),
                    });
                    continue;
                }
            };
            let id = selection.id().to_string();
            let image = inv.images.entry(id.clone()).or_insert_with(|| CriImage {
                id: id.clone(),
                references: Vec::new(),
                size: selection.size(),
                pinned: false,
                used_by: Vec::new(),
                content: BTreeSet::new(),
            });
            image.pinned |=
                record.labels.get(PINNED_LABEL).map(String::as_str) == Some(PINNED_VALUE);
            image.content.extend(selection_digests(selection));
            // Several records of one image may point at different targets (an index and a
            // per-platform manifest); the image's size is that of its largest view.
            image.size = image.size.max(selection.size());
            names
                .entry(id.clone())
                .or_default()
                .push(record.name.clone());
            inv.ref_to_id.insert(record.name.clone(), id);
        }
        for (id, refs) in names {
            if let Some(image) = inv.images.get_mut(&id) {
                image.references = sort_references(&refs);
            }
        }
        for c in containers {
            if let Some(id) = inv.image_of_container(c)
                && let Some(image) = inv.images.get_mut(&id)
            {
                image.used_by.push(c.id.clone());
            }
        }
        inv
    }

    /// The CRI view from a CRI runtime's own listing: each listed image is one image whose
    /// references are its tags, its digest references and its ID (as containerd's
    /// `sha256:<id>` record is), in CRI order. IDs are normalized ([`normalize_id`]); the
    /// content of an image is unknown to CRI, so it is its ID alone (no layer is known to be
    /// shared or exclusive).
    pub fn from_cri(images: &[ListedImage], containers: &[ContainerRecord]) -> Inventory {
        let mut inv = Inventory::default();
        for listed in images {
            let id = normalize_id(&listed.id);
            let mut refs: Vec<String> = listed
                .repo_tags
                .iter()
                .chain(&listed.repo_digests)
                .chain(std::iter::once(&id))
                .cloned()
                .collect();
            refs.sort();
            refs.dedup();
            for r in &refs {
                inv.ref_to_id.insert(r.clone(), id.clone());
            }
            let image = inv.images.entry(id.clone()).or_insert_with(|| CriImage {
                id: id.clone(),
                references: Vec::new(),
                size: 0,
                pinned: false,
                used_by: Vec::new(),
                content: BTreeSet::from([id.clone()]),
            });
            refs.append(&mut image.references);
            refs.sort();
            refs.dedup();
            image.references = sort_references(&refs);
            image.size = image.size.max(listed.size);
            image.pinned |= listed.pinned;
        }
        for c in containers {
            let c = ContainerRecord {
                image_ref: c.image_ref.as_deref().map(normalize_id),
                ..c.clone()
            };
            if let Some(id) = inv.image_of_container(&c)
                && let Some(image) = inv.images.get_mut(&id)
            {
                image.used_by.push(c.id.clone());
            }
        }
        inv
    }

    /// The image a container uses: its CRI `ImageRef` if that is a known image, else its image
    /// name resolved as CRI resolves a user's string.
    fn image_of_container(&self, c: &ContainerRecord) -> Option<String> {
        if let Some(r) = &c.image_ref {
            if self.images.contains_key(r) {
                return Some(r.clone());
            }
            // CRI runtimes may give a digest reference instead of the ID.
            if let Some(id) = self.ref_to_id.get(r) {
                return Some(id.clone());
            }
        }
        if let Some(id) = self.ref_to_id.get(&c.image) {
            return Some(id.clone());
        }
        match resolve(&c.image, &self.ids(), &self.ref_to_id) {
            Ok(Resolution::Found(id)) => Some(id),
            _ => None,
        }
    }

    /// Marks the image that `image` names (a pod's image string: a reference or an ID) as
    /// used by `user`, resolved as a container's image is. An image not on the node is
    /// ignored; a user is listed once per image.
    pub fn mark_used_by(&mut self, user: &str, image: &str) {
        let container = ContainerRecord {
            id: user.to_string(),
            image: image.to_string(),
            image_ref: None,
        };
        if let Some(id) = self.image_of_container(&container)
            && let Some(found) = self.images.get_mut(&id)
            && !found.used_by.iter().any(|u| u == user)
        {
            found.used_by.push(user.to_string());
        }
    }

    /// Every image ID.
    pub fn ids(&self) -> BTreeSet<String> {
        self.images.keys().cloned().collect()
    }

    /// Content blobs referenced by `id` and by no other image: what removing it alone frees.
    pub fn exclusive_content(&self, id: &str) -> BTreeSet<String> {
        let Some(image) = self.images.get(id) else {
            return BTreeSet::new();
        };
        let shared: BTreeSet<&String> = self
            .images
            .values()
            .filter(|i| i.id != id)
            .flat_map(|i| i.content.iter())
            .collect();
        image
            .content
            .iter()
            .filter(|d| !shared.contains(d))
            .cloned()
            .collect()
    }
}

/// Label the CRI plugin sets on every image record it has adopted.
pub const CRI_IMAGE_LABEL: &str = "io.cri-containerd.image";
/// Value of [`CRI_IMAGE_LABEL`] on an adopted record.
pub const CRI_IMAGE_MANAGED: &str = "managed";

/// The image ID the CRI plugin recorded for each target, keyed by `target_key`.
///
/// When the CRI plugin adopts a record it reads the target's manifest and config for the
/// node's platform and creates `sha256:<id>`, labelled [`CRI_IMAGE_LABEL`], pointing at the
/// same target: that name is the target's ID, found without reading any content. A target
/// with no such record, or with several (a record created by hand can claim any name), has no
/// entry: its content must be read. What these IDs claim is checked against content before
/// anything is deleted (see [`records_to_verify`]).
pub fn cri_recorded_ids(
    records: &[ImageRecord],
    target_key: impl Fn(&Descriptor) -> String,
) -> BTreeMap<String, String> {
    let mut claims: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for record in records {
        let is_id = record.name.strip_prefix("sha256:").is_some_and(|hex| {
            hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        let adopted =
            record.labels.get(CRI_IMAGE_LABEL).map(String::as_str) == Some(CRI_IMAGE_MANAGED);
        if is_id && adopted {
            claims
                .entry(target_key(&record.target))
                .or_default()
                .insert(&record.name);
        }
    }
    claims
        .into_iter()
        .filter_map(|(key, ids)| match ids.len() {
            1 => ids.first().map(|id| (key, id.to_string())),
            _ => None,
        })
        .collect()
}

/// The selection standing in for a target whose content was not read: `id` as the CRI plugin
/// recorded it (see [`cri_recorded_ids`]), the target as the manifest, no layers. Its size and
/// content are only the target's.
pub fn unread_selection(target: &Descriptor, id: &str) -> Selection {
    Selection {
        manifest: target.clone(),
        config: Descriptor {
            digest: id.to_string(),
            ..Descriptor::default()
        },
        layers: Vec::new(),
        indexes: Vec::new(),
    }
}

/// Names of every record that a plan for `request` against `inventory` may delete: all
/// references of the images the requested strings resolve to, and of the images that pending
/// records belong to (a pending record that is no image goes alone). Before any of them is
/// deleted, its target's content must be read and must give the ID the inventory assumed.
///
/// `None` when a string resolves to no image or to several: an ID the inventory only assumed
/// could hide the one it names, so that answer must come from IDs read from content. Invalid
/// strings need nothing.
pub fn records_to_verify(request: &[String], inventory: &Inventory) -> Option<BTreeSet<String>> {
    let ids = inventory.ids();
    let mut names = BTreeSet::new();
    for input in request {
        match resolve(input, &ids, &inventory.ref_to_id) {
            Ok(Resolution::Found(id)) => match inventory.images.get(&id) {
                Some(image) => names.extend(image.references.iter().cloned()),
                None => return None,
            },
            Ok(Resolution::NotFound | Resolution::Ambiguous(_)) => return None,
            Err(_) => {}
        }
    }
    for name in &inventory.pending {
        match inventory
            .images
            .values()
            .find(|i| i.references.contains(name))
        {
            Some(image) => names.extend(image.references.iter().cloned()),
            None => {
                names.insert(name.clone());
            }
        }
    }
    Some(names)
}

/// Label on a manifest naming its config, as containerd writes it for garbage collection.
const GC_CONFIG_LABEL: &str = "containerd.io/gc.ref.content.config";
/// Prefix of the labels on a manifest naming its layers (`l.<n>`), and on an index naming its
/// manifests (`m.<n>`).
const GC_LAYER_PREFIX: &str = "containerd.io/gc.ref.content.l.";
const GC_MANIFEST_PREFIX: &str = "containerd.io/gc.ref.content.m.";

/// One content blob as containerd's content listing describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlobInfo {
    /// Its size in bytes.
    pub size: i64,
    /// Its labels (among them the garbage-collection references to its children).
    pub labels: BTreeMap<String, String>,
}

/// The selection for `target`, whose ID the CRI plugin recorded as `id` (see
/// [`cri_recorded_ids`]), as the garbage-collection labels of the content listing `blobs`
/// describe it, without reading any content: the target manifest (or the one manifest of the
/// target index whose config is `id`), its config and its layers, with their stored sizes.
///
/// `None` when the labels do not say it for certain (then the content must be read): the
/// manifest does not name `id` as its config, a blob is missing, no layer is labelled (layers
/// discarded after unpacking are not), an index has no or several manifests with that config,
/// or the media type is another.
pub fn selection_from_labels(
    target: &Descriptor,
    id: &str,
    blobs: &BTreeMap<String, BlobInfo>,
) -> Option<Selection> {
    use crate::core::manifest::{
        MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST_LIST, MEDIA_TYPE_OCI_INDEX,
        MEDIA_TYPE_OCI_MANIFEST,
    };
    let children = |digest: &str, prefix: &str| -> Option<Vec<(usize, String)>> {
        let info = blobs.get(digest)?;
        let mut v: Vec<(usize, String)> = info
            .labels
            .iter()
            .filter_map(|(k, d)| Some((k.strip_prefix(prefix)?.parse().ok()?, d.clone())))
            .collect();
        v.sort();
        Some(v)
    };
    let config_of = |digest: &str| blobs.get(digest)?.labels.get(GC_CONFIG_LABEL).cloned();
    let sized = |digest: &str| -> Option<Descriptor> {
        Some(Descriptor {
            digest: digest.to_string(),
            size: blobs.get(digest)?.size,
            ..Descriptor::default()
        })
    };
    let (manifest, indexes) = match target.media_type.as_str() {
        MEDIA_TYPE_OCI_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => (target.clone(), Vec::new()),
        MEDIA_TYPE_OCI_INDEX | MEDIA_TYPE_DOCKER_MANIFEST_LIST => {
            let matching: Vec<String> = children(&target.digest, GC_MANIFEST_PREFIX)?
                .into_iter()
                .map(|(_, d)| d)
                .filter(|d| config_of(d).as_deref() == Some(id))
                .collect();
            match matching.as_slice() {
                [one] => (sized(one)?, vec![target.clone()]),
                _ => return None,
            }
        }
        _ => return None,
    };
    if config_of(&manifest.digest).as_deref() != Some(id) {
        return None;
    }
    let layers = children(&manifest.digest, GC_LAYER_PREFIX)?
        .into_iter()
        .map(|(_, d)| sized(&d))
        .collect::<Option<Vec<Descriptor>>>()?;
    if layers.is_empty() {
        return None;
    }
    Some(Selection {
        manifest,
        config: sized(id)?,
        layers,
        indexes,
    })
}

fn selection_digests(s: &Selection) -> impl Iterator<Item = String> + '_ {
    s.indexes
        .iter()
        .chain(std::iter::once(&s.manifest))
        .chain(std::iter::once(&s.config))
        .chain(s.layers.iter())
        .map(|d| d.digest.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::{MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST};

    const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// A base layer both fixture images share.
    const BASE: u64 = 0xba5e;

    fn digest(n: u64) -> String {
        format!("sha256:{n:064x}")
    }

    fn desc(media_type: &str, n: u64, size: i64) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: digest(n),
            size,
            ..Descriptor::default()
        }
    }

    /// A single-platform image: manifest (500 bytes), config (100 bytes, the image ID) and
    /// 1000-byte layers.
    fn selection(manifest: u64, config: u64, layers: &[u64]) -> Selection {
        Selection {
            manifest: desc(MEDIA_TYPE_OCI_MANIFEST, manifest, 500),
            config: desc(CONFIG, config, 100),
            layers: layers.iter().map(|&n| desc(LAYER, n, 1000)).collect(),
            indexes: Vec::new(),
        }
    }

    fn nginx() -> Selection {
        selection(0x11, 0xc1, &[BASE, 0x1a])
    }

    fn redis() -> Selection {
        selection(0x12, 0xc2, &[BASE, 0x2a])
    }

    fn record(name: &str, s: &Selection, labels: &[(&str, &str)]) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            target: s.indexes.first().unwrap_or(&s.manifest).clone(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            created: None,
        }
    }

    type SelectionMap = BTreeMap<String, Result<Selection, String>>;
    type Labels<'a> = &'a [(&'a str, &'a str)];

    /// Records named as given, each targeting its selection's root.
    fn records(list: &[(&str, &Selection, Labels)]) -> Vec<ImageRecord> {
        list.iter().map(|(n, s, l)| record(n, s, l)).collect()
    }

    fn selections(records: &[ImageRecord], list: &[&Selection]) -> SelectionMap {
        records
            .iter()
            .zip(list)
            .map(|(r, s)| (r.name.clone(), Ok((*s).clone())))
            .collect()
    }

    fn container(id: &str, image: &str, image_ref: Option<&str>) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            image: image.into(),
            image_ref: image_ref.map(String::from),
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// nginx under two tags and its `sha256:<id>` record (deliberately not in CRI order),
    /// and redis under one tag.
    fn two_images() -> (Vec<ImageRecord>, SelectionMap) {
        let (n, r) = (nginx(), redis());
        let id = digest(0xc1);
        let recs = records(&[
            (&id, &n, &[]),
            ("docker.io/library/nginx:latest", &n, &[]),
            ("docker.io/library/nginx:1.25", &n, &[]),
            ("docker.io/library/redis:7", &r, &[]),
        ]);
        let sel = selections(&recs, &[&n, &n, &n, &r]);
        (recs, sel)
    }

    #[test]
    fn records_of_one_image_are_grouped_in_cri_order() {
        let (recs, sel) = two_images();
        let inv = Inventory::build(&recs, &sel, &[]);
        let nginx_id = digest(0xc1);
        let redis_id = digest(0xc2);
        assert_eq!(inv.ids(), [nginx_id.clone(), redis_id.clone()].into());

        let image = &inv.images[&nginx_id];
        assert_eq!(image.id, nginx_id);
        let expected = strings(&[
            "docker.io/library/nginx:1.25",
            "docker.io/library/nginx:latest",
            &nginx_id,
        ]);
        assert_eq!(image.references, expected);
        let in_record_order: Vec<String> = recs[..3].iter().map(|r| r.name.clone()).collect();
        assert_ne!(in_record_order, expected, "the fixture must need sorting");
        assert_eq!(image.references, sort_references(&in_record_order));
        // Manifest 500 + config 100 + two 1000-byte layers.
        assert_eq!(image.size, 2600);
        assert!(!image.pinned);
        assert!(image.used_by.is_empty());

        assert_eq!(
            inv.images[&redis_id].references,
            strings(&["docker.io/library/redis:7"])
        );
        let expected_refs: BTreeMap<String, String> = [
            (nginx_id.clone(), nginx_id.clone()),
            ("docker.io/library/nginx:latest".into(), nginx_id.clone()),
            ("docker.io/library/nginx:1.25".into(), nginx_id.clone()),
            ("docker.io/library/redis:7".into(), redis_id),
        ]
        .into();
        assert_eq!(inv.ref_to_id, expected_refs);
        assert!(inv.skipped.is_empty());
        assert!(inv.pending.is_empty());
    }

    #[test]
    fn index_and_manifest_records_of_one_image_are_one_image() {
        let manifest_only = nginx();
        let mut via_index = nginx();
        via_index.indexes = vec![desc(MEDIA_TYPE_OCI_INDEX, 0x1d, 300)];
        let by_digest = format!("docker.io/library/nginx@{}", digest(0x11));
        let recs = records(&[
            (&by_digest, &manifest_only, &[]),
            ("docker.io/library/nginx:1.25", &via_index, &[]),
        ]);
        assert_eq!(recs[1].target.digest, digest(0x1d));
        let sel = selections(&recs, &[&manifest_only, &via_index]);
        let inv = Inventory::build(&recs, &sel, &[]);

        assert_eq!(inv.images.len(), 1);
        let image = &inv.images[&digest(0xc1)];
        // Name+tag (rank 2) before name+digest (rank 3).
        assert_eq!(
            image.references,
            strings(&["docker.io/library/nginx:1.25", &by_digest])
        );
        // The largest view: the index's 300 bytes on top of 2600.
        assert_eq!(image.size, 2900);
        assert!(image.content.contains(&digest(0x1d)));
    }

    #[test]
    fn records_without_a_selection_are_skipped_not_images() {
        let n = nginx();
        let recs = records(&[
            ("docker.io/library/arm-only:1", &n, &[]),
            ("docker.io/library/nginx:1.25", &n, &[]),
            ("docker.io/library/unread:1", &n, &[]),
        ]);
        let reason = "no manifest in the image matches platform linux/amd64";
        let mut sel: SelectionMap = BTreeMap::new();
        sel.insert(recs[0].name.clone(), Err(reason.into()));
        sel.insert(recs[1].name.clone(), Ok(n.clone()));
        let inv = Inventory::build(&recs, &sel, &[]);

        assert_eq!(
            inv.skipped,
            vec![
                Skipped {
                    name: "docker.io/library/arm-only:1".into(),
                    reason: reason.into(),
                },
                Skipped {
                    name: "docker.io/library/unread:1".into(),
                    reason: "its manifest was not read".into(),
                },
            ]
        );
        assert_eq!(inv.images.len(), 1);
        assert_eq!(
            inv.images[&digest(0xc1)].references,
            strings(&["docker.io/library/nginx:1.25"])
        );
        assert_eq!(
            inv.ref_to_id.keys().collect::<Vec<_>>(),
            vec!["docker.io/library/nginx:1.25"]
        );
        // A record a journal left pending is finished even when it no longer reads as an
        // image (its content may already be gone).
        let mut inv = inv;
        inv.add_journals(
            vec![Journal {
                id: "j1".into(),
                names: ["docker.io/library/unread:1".to_string()].into(),
            }],
            &recs,
        );
        assert_eq!(
            inv.pending,
            ["docker.io/library/unread:1".to_string()].into()
        );
    }

    #[test]
    fn pinned_only_by_the_exact_label_value_on_any_record() {
        let (n, r) = (nginx(), redis());
        let other = selection(0x13, 0xc3, &[0x3a]);
        let recs = records(&[
            ("docker.io/library/nginx:1.25", &n, &[]),
            (&digest(0xc1), &n, &[(PINNED_LABEL, PINNED_VALUE)]),
            ("docker.io/library/redis:7", &r, &[(PINNED_LABEL, "true")]),
            (
                "docker.io/library/busybox:1",
                &other,
                &[("pinned", "pinned")],
            ),
        ]);
        let sel = selections(&recs, &[&n, &n, &r, &other]);
        let inv = Inventory::build(&recs, &sel, &[]);
        assert!(inv.images[&digest(0xc1)].pinned);
        assert!(!inv.images[&digest(0xc2)].pinned);
        assert!(!inv.images[&digest(0xc3)].pinned);

        // The same records with the pinning one listed first give the same answer.
        let reversed: Vec<ImageRecord> = recs.iter().rev().cloned().collect();
        let inv = Inventory::build(&reversed, &sel, &[]);
        assert!(inv.images[&digest(0xc1)].pinned);
    }

    #[test]
    fn journals_make_their_existing_names_pending() {
        let n = nginx();
        let recs = records(&[
            ("docker.io/library/nginx:1.25", &n, &[]),
            ("docker.io/library/nginx:latest", &n, &[]),
        ]);
        let sel = selections(&recs, &[&n, &n]);
        let mut inv = Inventory::build(&recs, &sel, &[]);
        let open = Journal {
            id: "j1".into(),
            names: ["docker.io/library/nginx:latest".into(), "gone:1".into()].into(),
        };
        let done = Journal {
            id: "j2".into(),
            names: ["gone:2".into()].into(),
        };
        inv.add_journals(vec![open.clone(), done.clone()], &recs);
        // Only names that still exist are left to finish; every journal is kept for cleanup.
        assert_eq!(
            inv.pending,
            ["docker.io/library/nginx:latest".into()].into()
        );
        assert_eq!(inv.journals, vec![open, done]);
        assert!(inv.interrupted());
        // A finished journal alone still asks for a run (to delete it).
        inv.pending.clear();
        assert!(inv.interrupted());
        inv.journals.clear();
        assert!(!inv.interrupted());
    }

    #[test]
    fn journal_labels_round_trip_and_other_leases_are_not_journals() {
        let names: Vec<String> = strings(&["a:1", "sha256:x", "b@sha256:y"]);
        let labels = Journal::labels(&names);
        assert_eq!(labels.len(), 4);
        assert_eq!(labels[JOURNAL_LABEL], "v1");
        let j = Journal::from_labels("lease-1", &labels).unwrap();
        assert_eq!(j.id, "lease-1");
        assert_eq!(j.names, names.iter().cloned().collect());
        // A lease without the journal label is someone else's, whatever else it carries.
        let other: BTreeMap<String, String> =
            [(format!("{JOURNAL_ENTRY_PREFIX}0"), "a:1".to_string())].into();
        assert_eq!(Journal::from_labels("pull-lease", &other), None);
        // An empty journal is still a journal (nothing left to finish; to delete).
        let empty = Journal::labels(&Vec::<String>::new());
        assert!(Journal::from_labels("j", &empty).unwrap().names.is_empty());
    }

    #[test]
    fn containers_mark_images_used() {
        let (n, r) = (nginx(), redis());
        let b = selection(0x13, 0xc3, &[0x3a]);
        let recs = records(&[
            ("docker.io/library/nginx:latest", &n, &[]),
            ("docker.io/library/redis:7", &r, &[]),
            // Stored under a non-normalized name: reachable only by the exact name.
            ("busybox:1", &b, &[]),
        ]);
        let sel = selections(&recs, &[&n, &r, &b]);
        let (nginx_id, redis_id, busybox_id) = (digest(0xc1), digest(0xc2), digest(0xc3));
        let containers = [
            // The ImageRef wins over the name, which names redis.
            container("by-ref", "docker.io/library/redis:7", Some(&nginx_id)),
            // Exact record name.
            container("by-name", "docker.io/library/redis:7", None),
            // Normalized: nginx is docker.io/library/nginx:latest.
            container("by-short-name", "nginx", None),
            // An ImageRef no longer present falls back to the name.
            container("stale-ref", "redis:7", Some(&digest(0xdead))),
            container("exact-raw", "busybox:1", None),
            // Unknown names mark nothing.
            container("ghost", "docker.io/library/ghost:1", None),
            container("ghost-ref", "ghost:2", Some(&digest(0xbeef))),
            container("empty", "", None),
        ];
        let inv = Inventory::build(&recs, &sel, &containers);
        assert_eq!(
            inv.images[&nginx_id].used_by,
            strings(&["by-ref", "by-short-name"])
        );
        assert_eq!(
            inv.images[&redis_id].used_by,
            strings(&["by-name", "stale-ref"])
        );
        assert_eq!(inv.images[&busybox_id].used_by, strings(&["exact-raw"]));
        let marked: usize = inv.images.values().map(|i| i.used_by.len()).sum();
        assert_eq!(marked, 5, "ghost containers must mark nothing");
    }

    #[test]
    fn content_is_the_union_of_index_manifest_config_and_layers() {
        let mut via_index = nginx();
        via_index.indexes = vec![
            desc(MEDIA_TYPE_OCI_INDEX, 0x1d, 300),
            desc(MEDIA_TYPE_OCI_INDEX, 0x1e, 200),
        ];
        let recs = records(&[
            ("docker.io/library/nginx:1.25", &via_index, &[]),
            ("docker.io/library/nginx:latest", &nginx(), &[]),
        ]);
        let sel = selections(&recs, &[&via_index, &nginx()]);
        let inv = Inventory::build(&recs, &sel, &[]);
        let expected: BTreeSet<String> = [0x1d, 0x1e, 0x11, 0xc1, BASE, 0x1a]
            .into_iter()
            .map(digest)
            .collect();
        assert_eq!(inv.images[&digest(0xc1)].content, expected);
    }

    #[test]
    fn exclusive_content_leaves_out_shared_blobs() {
        let (recs, sel) = two_images();
        let inv = Inventory::build(&recs, &sel, &[]);
        let shared = digest(BASE);
        assert!(inv.images[&digest(0xc1)].content.contains(&shared));
        assert!(inv.images[&digest(0xc2)].content.contains(&shared));

        let set = |v: &[u64]| -> BTreeSet<String> { v.iter().map(|&n| digest(n)).collect() };
        assert_eq!(
            inv.exclusive_content(&digest(0xc1)),
            set(&[0x11, 0xc1, 0x1a])
        );
        assert_eq!(
            inv.exclusive_content(&digest(0xc2)),
            set(&[0x12, 0xc2, 0x2a])
        );
        assert!(inv.exclusive_content(&digest(0xdead)).is_empty());

        // Alone, an image owns its base layer too.
        let alone = Inventory::build(&recs[..3], &sel, &[]);
        assert_eq!(
            alone.exclusive_content(&digest(0xc1)),
            set(&[0x11, 0xc1, BASE, 0x1a])
        );
    }

    fn by_digest(d: &Descriptor) -> String {
        d.digest.clone()
    }

    #[test]
    fn cri_recorded_ids_come_from_adopted_id_records_that_agree() {
        let (n, r) = (nginx(), redis());
        let other = selection(0x13, 0xc3, &[0x3a]);
        let managed = [(CRI_IMAGE_LABEL, CRI_IMAGE_MANAGED)];
        let recs = records(&[
            ("docker.io/library/nginx:1.25", &n, &[]),
            (&digest(0xc1), &n, &managed),
            // Not adopted by the CRI plugin: claims nothing.
            (&digest(0xc2), &r, &[]),
            ("docker.io/library/redis:7", &r, &[]),
            // Two adopted ID records for one target: which is right is unknown.
            (&digest(0xc3), &other, &managed),
            (&digest(0xc4), &other, &managed),
            // Not an ID: a short or uppercase hex name claims nothing.
            ("sha256:c1", &r, &managed),
            (
                &digest(0xc2).to_uppercase().replace("SHA256", "sha256"),
                &r,
                &managed,
            ),
        ]);
        let ids = cri_recorded_ids(&recs, by_digest);
        assert_eq!(ids, [(n.manifest.digest.clone(), digest(0xc1))].into());
    }

    #[test]
    fn an_unread_selection_carries_the_recorded_id_only() {
        let n = nginx();
        let s = unread_selection(&n.manifest, &digest(0xc1));
        assert_eq!(s.id(), digest(0xc1));
        assert_eq!(s.size(), 500);
        assert!(s.layers.is_empty() && s.indexes.is_empty());
    }

    #[test]
    fn records_to_verify_are_every_reference_of_what_may_be_deleted() {
        let (recs, sel) = two_images();
        let mut inv = Inventory::build(&recs, &sel, &[]);
        let nginx_refs: BTreeSet<String> = inv.images[&digest(0xc1)]
            .references
            .iter()
            .cloned()
            .collect();
        // A name as a user types it, and an ID; invalid strings add nothing.
        for input in ["nginx:latest", &digest(0xc1)] {
            let request = strings(&[input, "", "UPPER:1"]);
            assert_eq!(
                records_to_verify(&request, &inv),
                Some(nginx_refs.clone()),
                "{input}"
            );
        }
        // Absent or ambiguous: only IDs read from content can say so.
        for unsure in ["absent:1", "0000"] {
            assert_eq!(
                records_to_verify(&strings(&["nginx", unsure]), &inv),
                None,
                "{unsure}"
            );
        }
        // A pending record brings its whole image; one that is no image comes alone.
        inv.pending = ["docker.io/library/redis:7".into(), "gone:1".into()].into();
        let expected: BTreeSet<String> =
            ["docker.io/library/redis:7".to_string(), "gone:1".into()].into();
        assert_eq!(records_to_verify(&[], &inv), Some(expected));
    }

    /// The content listing of `sel`'s blobs as containerd labels them for garbage collection.
    fn listing(sel: &Selection) -> BTreeMap<String, BlobInfo> {
        let mut blobs = BTreeMap::new();
        let mut labels: BTreeMap<String, String> =
            [(GC_CONFIG_LABEL.to_string(), sel.config.digest.clone())].into();
        for (i, l) in sel.layers.iter().enumerate() {
            labels.insert(format!("{GC_LAYER_PREFIX}{i}"), l.digest.clone());
            blobs.insert(
                l.digest.clone(),
                BlobInfo {
                    size: l.size,
                    labels: BTreeMap::new(),
                },
            );
        }
        blobs.insert(
            sel.manifest.digest.clone(),
            BlobInfo {
                size: sel.manifest.size,
                labels,
            },
        );
        blobs.insert(
            sel.config.digest.clone(),
            BlobInfo {
                size: sel.config.size,
                labels: BTreeMap::new(),
            },
        );
        for index in &sel.indexes {
            let labels = [(
                format!("{GC_MANIFEST_PREFIX}0"),
                sel.manifest.digest.clone(),
            )]
            .into();
            blobs.insert(
                index.digest.clone(),
                BlobInfo {
                    size: index.size,
                    labels,
                },
            );
        }
        blobs
    }

    #[test]
    fn selections_from_labels_match_what_reading_gives() {
        let n = nginx();
        let id = digest(0xc1);
        let got = selection_from_labels(&n.manifest, &id, &listing(&n)).unwrap();
        assert_eq!(got.id(), id);
        assert_eq!(got.size(), n.size());
        assert_eq!(
            selection_digests(&got).collect::<Vec<_>>(),
            selection_digests(&n).collect::<Vec<_>>()
        );

        let mut via_index = nginx();
        via_index.indexes = vec![desc(MEDIA_TYPE_OCI_INDEX, 0x1d, 300)];
        let mut blobs = listing(&via_index);
        // Another platform's manifest in the same index, with another config.
        let arm = selection(0x21, 0xc9, &[0x9a]);
        blobs.extend(listing(&arm));
        blobs.get_mut(&digest(0x1d)).unwrap().labels.insert(
            format!("{GC_MANIFEST_PREFIX}1"),
            arm.manifest.digest.clone(),
        );
        let got = selection_from_labels(&via_index.indexes[0], &id, &blobs).unwrap();
        assert_eq!(got.size(), via_index.size());
        assert_eq!(got.manifest.digest, n.manifest.digest);
        assert_eq!(got.indexes, via_index.indexes);
    }

    #[test]
    fn labels_that_do_not_say_it_for_certain_ask_for_a_read() {
        let n = nginx();
        let id = digest(0xc1);
        // Another ID than the manifest's config.
        assert_eq!(
            selection_from_labels(&n.manifest, &digest(0xc2), &listing(&n)),
            None
        );
        // A layer or the config missing from the store.
        for gone in [digest(0x1a), id.clone(), n.manifest.digest.clone()] {
            let mut blobs = listing(&n);
            blobs.remove(&gone);
            assert_eq!(
                selection_from_labels(&n.manifest, &id, &blobs),
                None,
                "{gone}"
            );
        }
        // Layers not labelled (discarded after unpacking).
        let mut blobs = listing(&n);
        blobs
            .get_mut(&n.manifest.digest)
            .unwrap()
            .labels
            .retain(|k, _| !k.starts_with(GC_LAYER_PREFIX));
        assert_eq!(selection_from_labels(&n.manifest, &id, &blobs), None);
        // Not a manifest or an index.
        let other = desc(
            "application/vnd.docker.distribution.manifest.v1+json",
            0x11,
            500,
        );
        assert_eq!(selection_from_labels(&other, &id, &listing(&n)), None);
        // An index with two manifests of that config.
        let mut via_index = nginx();
        via_index.indexes = vec![desc(MEDIA_TYPE_OCI_INDEX, 0x1d, 300)];
        let mut blobs = listing(&via_index);
        let twin = selection(0x22, 0xc1, &[0x9b]);
        blobs.extend(listing(&twin));
        blobs.get_mut(&digest(0x1d)).unwrap().labels.insert(
            format!("{GC_MANIFEST_PREFIX}1"),
            twin.manifest.digest.clone(),
        );
        assert_eq!(
            selection_from_labels(&via_index.indexes[0], &id, &blobs),
            None
        );
    }

    #[test]
    fn nothing_in_nothing_out() {
        let inv = Inventory::build(&[], &BTreeMap::new(), &[container("c", "nginx", None)]);
        assert_eq!(inv, Inventory::default());
        assert!(inv.ids().is_empty());
    }

    fn listed(id: &str, tags: &[&str], digests: &[&str], pinned: bool) -> ListedImage {
        ListedImage {
            id: id.into(),
            repo_tags: strings(tags),
            repo_digests: strings(digests),
            size: 1234,
            pinned,
        }
    }

    #[test]
    fn a_cri_listing_is_the_same_view_as_the_records_it_came_from() {
        // CRI-O spells IDs as bare hex; containerd with `sha256:`.
        let nginx_hex = "c1".repeat(32);
        let nginx_id = format!("sha256:{nginx_hex}");
        let redis_id = digest(0xc2);
        let nginx_digest_ref = format!("docker.io/library/nginx@{}", digest(0x11));
        let images = [
            listed(
                &nginx_hex,
                &[
                    "docker.io/library/nginx:latest",
                    "docker.io/library/nginx:1.25",
                ],
                &[&nginx_digest_ref],
                false,
            ),
            listed(&redis_id, &["registry.k8s.io/pause:3.10"], &[], true),
        ];
        let containers = [
            // CRI-O: the bare ID.
            container("c1", "whatever", Some(&nginx_hex)),
            // A digest reference instead of the ID.
            container("c2", "x", Some(&nginx_digest_ref)),
            // Only the image name.
            container("c3", "nginx:1.25", None),
            container("c4", "unknown:1", Some("sha256:ffff")),
        ];
        let inv = Inventory::from_cri(&images, &containers);
        assert_eq!(inv.ids(), [nginx_id.clone(), redis_id.clone()].into());
        let nginx = &inv.images[&nginx_id];
        assert_eq!(
            nginx.references,
            strings(&[
                "docker.io/library/nginx:1.25",
                "docker.io/library/nginx:latest",
                &nginx_digest_ref,
                &nginx_id,
            ])
        );
        assert_eq!(nginx.used_by, strings(&["c1", "c2", "c3"]));
        assert_eq!(nginx.size, 1234);
        assert!(!nginx.pinned);
        assert!(inv.images[&redis_id].pinned);
        assert_eq!(inv.ref_to_id[&nginx_digest_ref], nginx_id);
        assert_eq!(inv.ref_to_id[&nginx_id], nginx_id);
        // Resolution is the core's, as on containerd.
        assert_eq!(
            resolve("nginx", &inv.ids(), &inv.ref_to_id),
            Ok(Resolution::Found(nginx_id.clone()))
        );
        assert_eq!(
            resolve(&nginx_hex[..12], &inv.ids(), &inv.ref_to_id),
            Ok(Resolution::Found(nginx_id.clone()))
        );
        // No layers are known: an image's content is its ID, never shared.
        assert_eq!(inv.exclusive_content(&nginx_id), [nginx_id.clone()].into());
        assert!(inv.pending.is_empty() && inv.journals.is_empty() && inv.skipped.is_empty());
    }

    #[test]
    fn ids_are_normalized_only_when_bare_hex() {
        let hex = "ab".repeat(32);
        assert_eq!(normalize_id(&hex), format!("sha256:{hex}"));
        assert_eq!(
            normalize_id(&format!("sha256:{hex}")),
            format!("sha256:{hex}")
        );
        assert_eq!(normalize_id(&hex.to_uppercase()), hex.to_uppercase());
        assert_eq!(normalize_id("abc"), "abc");
    }
}
