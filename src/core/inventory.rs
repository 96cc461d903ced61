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
/// Label imagegc puts on every record it is about to delete, before deleting any: if the
/// removal is interrupted, the next run finds the rest by this label and finishes the job.
pub const PENDING_LABEL: &str = "imagegc.dev/removal-pending";

/// One image record as containerd stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    /// The record's name exactly as stored (a reference, or `sha256:<id>`).
    pub name: String,
    /// What the record points at (a manifest or an index).
    pub target: Descriptor,
    /// The record's labels.
    pub labels: BTreeMap<String, String>,
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
    /// Names of records labelled [`PENDING_LABEL`]: an interrupted removal to finish.
    pub pending: BTreeSet<String>,
}

impl Inventory {
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
            if record.labels.contains_key(PENDING_LABEL) {
                inv.pending.insert(record.name.clone());
            }
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

    /// The image a container uses: its CRI `ImageRef` if that is a known image, else its image
    /// name resolved as CRI resolves a user's string.
    fn image_of_container(&self, c: &ContainerRecord) -> Option<String> {
        if let Some(r) = &c.image_ref
            && self.images.contains_key(r)
        {
            return Some(r.clone());
        }
        if let Some(id) = self.ref_to_id.get(&c.image) {
            return Some(id.clone());
        }
        match resolve(&c.image, &self.ids(), &self.ref_to_id) {
            Ok(Resolution::Found(id)) => Some(id),
            _ => None,
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

fn selection_digests(s: &Selection) -> impl Iterator<Item = String> + '_ {
    s.indexes
        .iter()
        .chain(std::iter::once(&s.manifest))
        .chain(std::iter::once(&s.config))
        .chain(s.layers.iter())
        .map(|d| d.digest.clone())
}
