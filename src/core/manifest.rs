//! Choosing the manifest and config of an image record for one platform.
//!
//! [`select`] is containerd's `images.Manifest(target, platforms.Default())` plus the
//! config read CRI does afterwards; the chosen config digest is the CRI image ID.
//!
//! The function is pure: blobs come from a read-only [`Blobs`] map. When a blob it
//! needs is absent it returns [`ManifestError::MissingBlob`]; the caller fetches that
//! digest from containerd's content store, adds it to the map and calls again:
//!
//! ```text
//! loop {
//!     match select(&target, &blobs, &matcher) {
//!         Err(ManifestError::MissingBlob(d)) => match content_store.read(&d) {
//!             Some(bytes) => { blobs.insert(d, bytes); }
//!             None => break "not a CRI image",
//!         },
//!         other => break other,
//!     }
//! }
//! ```
//!
//! Each round asks for a digest not yet in the map, so the loop ends after at most
//! [`MAX_INDEX_DEPTH`] + 2 fetches. Layer blobs are never read.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

use serde::{Deserialize, Deserializer, Serialize};

use super::platform::{Matcher, Platform, null_as_default};

/// OCI image manifest media type.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker schema 2 manifest media type.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// OCI image index media type.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker manifest list media type.
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// Most indexes walked from the target down to a manifest (the root counts).
///
/// Content addressing makes real cycles impossible, but a corrupt store or a hostile
/// blob map can still present one; real images nest one or two levels.
pub const MAX_INDEX_DEPTH: usize = 8;
/// Largest manifest, index or config blob accepted, in bytes.
pub const MAX_BLOB_BYTES: usize = 16 << 20;
/// Most entries accepted in an index's `manifests` or a manifest's `layers`.
pub const MAX_ENTRIES: usize = 10_000;

/// An OCI content descriptor, as found in image records, indexes and manifests.
///
/// Missing or `null` fields read as empty, as in Go; fields other than these are
/// ignored (`urls`, `data`, `artifactType`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(rename = "mediaType", default, deserialize_with = "null_as_default")]
    pub media_type: String,
    /// Digest of the referenced content, `algorithm:hex`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub digest: String,
    /// Size of the referenced content in bytes, as declared by the referrer.
    #[serde(default, deserialize_with = "null_as_default")]
    pub size: i64,
    /// Platform of the referenced manifest, set on index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Free-form annotations.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
}

/// What a media type denotes, for the two kinds [`select`] can walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    /// An image manifest (OCI or Docker schema 2).
    Manifest,
    /// An index (OCI image index or Docker manifest list).
    Index,
}

impl MediaKind {
    /// Classifies a media type by exact string, as containerd's `IsManifestType` /
    /// `IsIndexType`; `None` for anything else (schema 1, layers, configs, unknown).
    pub fn of(media_type: &str) -> Option<MediaKind> {
        match media_type {
            MEDIA_TYPE_OCI_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => Some(MediaKind::Manifest),
            MEDIA_TYPE_OCI_INDEX | MEDIA_TYPE_DOCKER_MANIFEST_LIST => Some(MediaKind::Index),
            _ => None,
        }
    }
}

/// A read-only set of blobs keyed by digest (`sha256:…`).
pub trait Blobs {
    /// The bytes of the blob with exactly this digest string, if present.
    fn get(&self, digest: &str) -> Option<&[u8]>;
}

impl<S: BuildHasher> Blobs for HashMap<String, Vec<u8>, S> {
    fn get(&self, digest: &str) -> Option<&[u8]> {
        HashMap::get(self, digest).map(Vec::as_slice)
    }
}

impl Blobs for BTreeMap<String, Vec<u8>> {
    fn get(&self, digest: &str) -> Option<&[u8]> {
        BTreeMap::get(self, digest).map(Vec::as_slice)
    }
}

impl<B: Blobs + ?Sized> Blobs for &B {
    fn get(&self, digest: &str) -> Option<&[u8]> {
        (**self).get(digest)
    }
}

/// Why no manifest could be chosen.
///
/// Only [`ManifestError::MissingBlob`] is worth retrying (after fetching the blob);
/// every other variant, and a `MissingBlob` the content store cannot satisfy either,
/// means containerd's CRI does not list the record as an image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// A blob needed for the choice is not in the blob set.
    #[error("blob {0} is not in the blob set: fetch it from the content store and retry")]
    MissingBlob(String),
    /// A blob (or the descriptor naming it) is malformed or beyond the limits.
    #[error("blob {digest} is unusable: {reason}")]
    Parse {
        /// Digest of the offending blob.
        digest: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The walk reached a descriptor that is neither a manifest nor an index.
    #[error(
        "blob {digest} has media type {media_type:?}, which is not an image manifest or \
         index (schema 1 and non-image artifacts are not CRI images)"
    )]
    UnsupportedMediaType {
        /// Digest of the descriptor.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// The index holds no manifest this platform can run.
    #[error("no manifest in the image matches platform {platform}")]
    NoMatchingManifest {
        /// The matcher's platform.
        platform: Platform,
    },
}

/// The manifest chosen for a platform, with everything it references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Descriptor of the chosen manifest: the target itself, or the index entry.
    pub manifest: Descriptor,
    /// The manifest's config descriptor; its digest is the CRI image ID.
    pub config: Descriptor,
    /// The manifest's layer descriptors, in order. Their blobs were not read.
    pub layers: Vec<Descriptor>,
    /// Index descriptors walked to reach the manifest, root first; empty when the
    /// target is a manifest.
    pub indexes: Vec<Descriptor>,
}

impl Selection {
    /// The blobs the selection was read from: the indexes walked, the manifest and the
    /// config (never the layers). Content is addressed by digest, so while all of these are
    /// present, selecting the same target for the same platform gives the same result.
    pub fn read_from(&self) -> impl Iterator<Item = &str> {
        self.indexes
            .iter()
            .chain([&self.manifest, &self.config])
            .map(|d| d.digest.as_str())
    }

    /// The CRI image ID: the config digest.
    pub fn id(&self) -> &str {
        &self.config.digest
    }

    /// Content size of the image for this platform: declared sizes of the indexes
    /// walked, the manifest, the config and the compressed layers.
    ///
    /// This is what the image occupies in the content store (if all layers are
    /// present), not the unpacked snapshots. Negative sizes count as 0 and the sum
    /// saturates.
    pub fn size(&self) -> i64 {
        self.indexes
            .iter()
            .chain([&self.manifest, &self.config])
            .chain(&self.layers)
            .fold(0i64, |sum, d| sum.saturating_add(d.size.max(0)))
    }
}

/// Detects whether a JSON key is present, whatever its value, like Go's
/// `len(json.RawMessage) != 0` in containerd's `validateMediaType`.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(deserializer).map(|_| true)
}

/// Fields of a manifest blob that matter here.
#[derive(Deserialize)]
struct ManifestDoc {
    #[serde(rename = "mediaType", default, deserialize_with = "null_as_default")]
    media_type: String,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default, deserialize_with = "null_as_default")]
    layers: Vec<Descriptor>,
    #[serde(default, deserialize_with = "present")]
    manifests: bool,
    #[serde(rename = "fsLayers", default, deserialize_with = "present")]
    fs_layers: bool,
}

/// Fields of an index blob that matter here.
#[derive(Deserialize)]
struct IndexDoc {
    #[serde(rename = "mediaType", default, deserialize_with = "null_as_default")]
    media_type: String,
    #[serde(default, deserialize_with = "null_as_default")]
    manifests: Vec<Descriptor>,
    #[serde(default, deserialize_with = "present")]
    config: bool,
    #[serde(default, deserialize_with = "present")]
    layers: bool,
    #[serde(rename = "fsLayers", default, deserialize_with = "present")]
    fs_layers: bool,
}

fn parse_error(digest: &str, reason: impl Into<String>) -> ManifestError {
    ManifestError::Parse {
        digest: digest.to_owned(),
        reason: reason.into(),
    }
}

/// Checks a digest as go-digest's `Validate` does for the registered algorithms, so
/// the caller is never asked to fetch something the content store would reject.
fn valid_digest(digest: &str) -> bool {
    let Some((algorithm, encoded)) = digest.split_once(':') else {
        return false;
    };
    let hex_len = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return false,
    };
    encoded.len() == hex_len
        && encoded
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Looks a blob up, checking its descriptor's digest and the size limit.
fn read<'b>(blobs: &'b impl Blobs, desc: &Descriptor) -> Result<&'b [u8], ManifestError> {
    if !valid_digest(&desc.digest) {
        return Err(parse_error(
            &desc.digest,
            format!(
                "{:?} is not a valid sha256/sha384/sha512 digest",
                desc.digest
            ),
        ));
    }
    let bytes = blobs
        .get(&desc.digest)
        .ok_or_else(|| ManifestError::MissingBlob(desc.digest.clone()))?;
    if bytes.len() > MAX_BLOB_BYTES {
        return Err(parse_error(
            &desc.digest,
            format!(
                "blob is {} bytes, over the {MAX_BLOB_BYTES}-byte limit",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

fn parse_json<'a, T: Deserialize<'a>>(
    digest: &str,
    what: &str,
    bytes: &'a [u8],
) -> Result<T, ManifestError> {
    serde_json::from_slice(bytes)
        .map_err(|e| parse_error(digest, format!("invalid {what} JSON: {e}")))
}

/// Reads and checks a manifest, as containerd's `validateMediaType` + unmarshal.
fn read_manifest(blobs: &impl Blobs, desc: &Descriptor) -> Result<ManifestDoc, ManifestError> {
    let doc: ManifestDoc = parse_json(&desc.digest, "manifest", read(blobs, desc)?)?;
    if doc.fs_layers {
        return Err(parse_error(
            &desc.digest,
            "schema 1 manifests are not supported",
        ));
    }
    if doc.manifests || MediaKind::of(&doc.media_type) == Some(MediaKind::Index) {
        return Err(parse_error(
            &desc.digest,
            format!(
                "descriptor says {} but the blob is an index",
                desc.media_type
            ),
        ));
    }
    if doc.layers.len() > MAX_ENTRIES {
        return Err(parse_error(
            &desc.digest,
            format!(
                "{} layers, over the limit of {MAX_ENTRIES}",
                doc.layers.len()
            ),
        ));
    }
    Ok(doc)
}

/// Reads and checks an index, as containerd's `validateMediaType` + unmarshal.
fn read_index(blobs: &impl Blobs, desc: &Descriptor) -> Result<IndexDoc, ManifestError> {
    let doc: IndexDoc = parse_json(&desc.digest, "index", read(blobs, desc)?)?;
    if doc.fs_layers {
        return Err(parse_error(
            &desc.digest,
            "schema 1 manifests are not supported",
        ));
    }
    if doc.config || doc.layers || MediaKind::of(&doc.media_type) == Some(MediaKind::Manifest) {
        return Err(parse_error(
            &desc.digest,
            format!(
                "descriptor says {} but the blob is a manifest",
                desc.media_type
            ),
        ));
    }
    if doc.manifests.len() > MAX_ENTRIES {
        return Err(parse_error(
            &desc.digest,
            format!(
                "{} manifests, over the limit of {MAX_ENTRIES}",
                doc.manifests.len()
            ),
        ));
    }
    Ok(doc)
}

/// Reads the config and returns the platform it declares, normalized.
///
/// CRI parses every image's config, so an unreadable config disqualifies the image
/// even when its platform is not needed.
fn read_config_platform(
    blobs: &impl Blobs,
    config: &Descriptor,
) -> Result<Platform, ManifestError> {
    // `null` unmarshals into a Go struct without error, leaving it empty.
    let platform: Option<Platform> = parse_json(&config.digest, "config", read(blobs, config)?)?;
    Ok(platform.unwrap_or_default().normalize())
}

/// Chooses the manifest of `target` for `matcher`'s platform, as containerd's
/// `images.Manifest`, and reads its config as CRI does.
///
/// - A manifest at the root is taken as is, whatever its platform.
/// - An index keeps the entries without a platform or with a matching one, puts
///   platform entries first in preference order and platform-less ones last (stable),
///   and descends into the first only — if that one turns out not to match, the
///   result is [`ManifestError::NoMatchingManifest`] even when a later entry would.
/// - A manifest below an index with no platform on its descriptor is kept only if
///   the platform in its config (`os`, `architecture`, `variant`) matches; this is
///   containerd 2.x, 1.6 compares only `os` and `architecture`.
/// - Any other media type on the path is [`ManifestError::UnsupportedMediaType`].
///
/// Blobs read: the indexes on the path, the chosen manifest and its config; never
/// layers. See the module documentation for the [`ManifestError::MissingBlob`] loop.
pub fn select(
    target: &Descriptor,
    blobs: &impl Blobs,
    matcher: &Matcher,
) -> Result<Selection, ManifestError> {
    let no_match = || ManifestError::NoMatchingManifest {
        platform: matcher.platform().clone(),
    };
    let mut indexes: Vec<Descriptor> = Vec::new();
    let mut desc = target.clone();
    loop {
        match MediaKind::of(&desc.media_type) {
            Some(MediaKind::Manifest) => {
                let doc = read_manifest(blobs, &desc)?;
                let config = match doc.config {
                    Some(config) => config,
                    None => return Err(parse_error(&desc.digest, "manifest has no config")),
                };
                let config_platform = read_config_platform(blobs, &config)?;
                let is_root = indexes.is_empty();
                if !is_root {
                    let declared = desc.platform.as_ref().unwrap_or(&config_platform);
                    if !matcher.matches(declared) {
                        return Err(no_match());
                    }
                }
                return Ok(Selection {
                    manifest: desc,
                    config,
                    layers: doc.layers,
                    indexes,
                });
            }
            Some(MediaKind::Index) => {
                if indexes.len() >= MAX_INDEX_DEPTH {
                    return Err(parse_error(
                        &target.digest,
                        format!("indexes nest deeper than {MAX_INDEX_DEPTH} levels (a cycle?)"),
                    ));
                }
                let doc = read_index(blobs, &desc)?;
                indexes.push(desc);
                // Platform entries by preference, then platform-less ones; min_by_key
                // keeps the first of equals, which is what a stable sort puts first.
                let chosen = doc
                    .manifests
                    .into_iter()
                    .filter_map(|d| {
                        let rank = match &d.platform {
                            None => usize::MAX,
                            Some(p) => matcher.rank(p)?,
                        };
                        Some((rank, d))
                    })
                    .min_by_key(|(rank, _)| *rank);
                desc = match chosen {
                    Some((_, d)) => d,
                    None => return Err(no_match()),
                };
            }
            None => {
                return Err(ManifestError::UnsupportedMediaType {
                    digest: desc.digest,
                    media_type: desc.media_type,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use sha2::{Digest as _, Sha256};

    /// A content store under construction.
    #[derive(Default)]
    struct Store {
        blobs: HashMap<String, Vec<u8>>,
    }

    fn digest_of(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    fn desc(media_type: &str, digest: &str, size: usize) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest: digest.to_owned(),
            size: size as i64,
            ..Descriptor::default()
        }
    }

    fn plat(s: &str) -> Platform {
        s.parse().expect("platform")
    }

    fn only(s: &str) -> Matcher {
        Matcher::only(plat(s))
    }

    impl Store {
        fn put(&mut self, media_type: &str, value: &Value) -> Descriptor {
            self.put_raw(media_type, serde_json::to_vec(value).expect("json"))
        }

        fn put_raw(&mut self, media_type: &str, bytes: Vec<u8>) -> Descriptor {
            let d = desc(media_type, &digest_of(&bytes), bytes.len());
            self.blobs.insert(d.digest.clone(), bytes);
            d
        }

        /// A config for `platform` (`os/arch[/variant]`), unique per `tag`.
        fn config(&mut self, platform: &str, tag: &str) -> Descriptor {
            let p = plat(platform);
            let mut v = json!({"os": p.os, "architecture": p.architecture, "rootfs": {"type": "layers", "diff_ids": []}, "config": {"Labels": {"tag": tag}}});
            if let Some(variant) = p.variant {
                v["variant"] = json!(variant);
            }
            self.put("application/vnd.oci.image.config.v1+json", &v)
        }

        /// An OCI manifest with a config for `platform` and one layer.
        fn manifest(&mut self, platform: &str, tag: &str) -> (Descriptor, Descriptor) {
            let config = self.config(platform, tag);
            let layer = desc(
                "application/vnd.oci.image.layer.v1.tar+gzip",
                &digest_of(format!("layer {platform} {tag}").as_bytes()),
                1000,
            );
            let m = self.put(
                MEDIA_TYPE_OCI_MANIFEST,
                &json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST, "config": config, "layers": [layer]}),
            );
            (m, config)
        }

        fn index(&mut self, entries: &[Descriptor]) -> Descriptor {
            self.put(
                MEDIA_TYPE_OCI_INDEX,
                &json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": entries}),
            )
        }
    }

    fn with_platform(mut d: Descriptor, platform: &str) -> Descriptor {
        d.platform = Some(Platform::new(
            platform.split('/').next().unwrap_or_default(),
            platform.split('/').nth(1).unwrap_or_default(),
            platform.split('/').nth(2),
        ));
        d
    }

    /// A multi-platform image: index over amd64, arm64 and arm/v7 manifests.
    fn multi_arch(store: &mut Store) -> (Descriptor, [Descriptor; 3]) {
        let (amd, amd_cfg) = store.manifest("linux/amd64", "");
        let (arm64, arm64_cfg) = store.manifest("linux/arm64", "");
        let (arm, arm_cfg) = store.manifest("linux/arm/v7", "");
        let index = store.index(&[
            with_platform(amd, "linux/amd64"),
            with_platform(arm64, "linux/arm64"),
            with_platform(arm, "linux/arm/v7"),
        ]);
        (index, [amd_cfg, arm64_cfg, arm_cfg])
    }

    #[test]
    fn single_manifest_at_root() {
        let mut s = Store::default();
        let (m, cfg) = s.manifest("linux/amd64", "");
        let sel = select(&m, &s.blobs, &only("linux/amd64")).expect("select");
        assert_eq!(sel.id(), cfg.digest);
        assert_eq!(sel.manifest, m);
        assert_eq!(sel.config, cfg);
        assert_eq!(sel.layers.len(), 1);
        assert!(sel.indexes.is_empty());
    }

    #[test]
    fn root_manifest_ignores_platform() {
        let mut s = Store::default();
        let (m, cfg) = s.manifest("linux/arm64", "");
        let sel = select(&m, &s.blobs, &only("linux/amd64")).expect("root taken as is");
        assert_eq!(sel.id(), cfg.digest);
    }

    #[test]
    fn docker_media_types() {
        let mut s = Store::default();
        let cfg = s.config("linux/amd64", "");
        let m = s.put(
            MEDIA_TYPE_DOCKER_MANIFEST,
            &json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_DOCKER_MANIFEST, "config": cfg, "layers": []}),
        );
        let list = s.put(
            MEDIA_TYPE_DOCKER_MANIFEST_LIST,
            &json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_DOCKER_MANIFEST_LIST, "manifests": [with_platform(m.clone(), "linux/amd64")]}),
        );
        let sel = select(&list, &s.blobs, &only("linux/amd64")).expect("select");
        assert_eq!(sel.id(), cfg.digest);
        assert_eq!(sel.indexes, [list]);
        assert!(sel.layers.is_empty());
    }

    #[test]
    fn index_picks_host_platform() {
        let mut s = Store::default();
        let (index, [amd, arm64, arm]) = multi_arch(&mut s);
        let pick = |host: &str| select(&index, &s.blobs, &only(host)).map(|sel| sel.config.digest);
        assert_eq!(pick("linux/amd64"), Ok(amd.digest));
        assert_eq!(pick("linux/arm64"), Ok(arm64.digest));
        assert_eq!(pick("linux/arm/v7"), Ok(arm.digest.clone()));
        assert_eq!(pick("linux/arm/v8"), Ok(arm.digest));
        assert_eq!(
            pick("linux/s390x"),
            Err(ManifestError::NoMatchingManifest {
                platform: plat("linux/s390x")
            })
        );
    }

    #[test]
    fn arm64_prefers_arm64_and_falls_back_to_arm() {
        let mut s = Store::default();
        let (arm, arm_cfg) = s.manifest("linux/arm/v7", "");
        let (arm64, arm64_cfg) = s.manifest("linux/arm64", "");
        let host = only("linux/arm64");
        // arm/v7 listed first still loses to arm64.
        let both = s.index(&[
            with_platform(arm.clone(), "linux/arm/v7"),
            with_platform(arm64, "linux/arm64/v8"),
        ]);
        assert_eq!(
            select(&both, &s.blobs, &host).map(|x| x.config),
            Ok(arm64_cfg)
        );
        let arm_only = s.index(&[with_platform(arm, "linux/arm")]);
        assert_eq!(
            select(&arm_only, &s.blobs, &host).map(|x| x.config),
            Ok(arm_cfg)
        );
    }

    #[test]
    fn amd64_rejects_arm64_and_takes_386_last() {
        let mut s = Store::default();
        let (arm64, _) = s.manifest("linux/arm64", "");
        let (i386, i386_cfg) = s.manifest("linux/386", "");
        let (amd, amd_cfg) = s.manifest("linux/amd64", "");
        let host = only("linux/amd64");
        let arm64_only = s.index(&[with_platform(arm64.clone(), "linux/arm64")]);
        assert_eq!(
            select(&arm64_only, &s.blobs, &host),
            Err(ManifestError::NoMatchingManifest {
                platform: plat("linux/amd64")
            })
        );
        let with_386 = s.index(&[
            with_platform(arm64.clone(), "linux/arm64"),
            with_platform(i386.clone(), "linux/i386"),
        ]);
        assert_eq!(
            select(&with_386, &s.blobs, &host).map(|x| x.config),
            Ok(i386_cfg)
        );
        let with_both = s.index(&[
            with_platform(i386, "linux/386"),
            with_platform(arm64, "linux/arm64"),
            with_platform(amd, "linux/x86_64"),
        ]);
        assert_eq!(
            select(&with_both, &s.blobs, &host).map(|x| x.config),
            Ok(amd_cfg)
        );
    }

    #[test]
    fn unknown_platforms_only() {
        let mut s = Store::default();
        let (s390x, _) = s.manifest("linux/s390x", "");
        let (win, _) = s.manifest("windows/amd64", "");
        let (att, _) = s.manifest("linux/amd64", "attestation");
        let index = s.index(&[
            with_platform(s390x, "linux/s390x"),
            with_platform(win, "windows/amd64"),
            with_platform(att, "unknown/unknown"),
        ]);
        assert_eq!(
            select(&index, &s.blobs, &only("linux/amd64")),
            Err(ManifestError::NoMatchingManifest {
                platform: plat("linux/amd64")
            })
        );
        let empty = s.index(&[]);
        assert!(matches!(
            select(&empty, &s.blobs, &only("linux/amd64")),
            Err(ManifestError::NoMatchingManifest { .. })
        ));
    }

    #[test]
    fn platformless_entries_resolved_via_config() {
        let mut s = Store::default();
        let (amd, amd_cfg) = s.manifest("linux/x86_64", "");
        let (arm, _) = s.manifest("linux/arm/v7", "");
        let index = s.index(&[amd]);
        assert_eq!(
            select(&index, &s.blobs, &only("linux/amd64")).map(|x| x.config),
            Ok(amd_cfg)
        );
        assert!(matches!(
            select(&index, &s.blobs, &only("linux/arm64")),
            Err(ManifestError::NoMatchingManifest { .. })
        ));
        // Variant matters (2.x): an arm/v7 config does not match an arm/v6 host.
        let arm_index = s.index(&[arm]);
        assert!(select(&arm_index, &s.blobs, &only("linux/arm/v8")).is_ok());
        assert!(matches!(
            select(&arm_index, &s.blobs, &only("linux/arm/v6")),
            Err(ManifestError::NoMatchingManifest { .. })
        ));
    }

    #[test]
    fn only_first_platformless_entry_is_tried() {
        let mut s = Store::default();
        let (arm, _) = s.manifest("linux/arm64", "");
        let (amd, _) = s.manifest("linux/amd64", "");
        let index = s.index(&[arm, amd]);
        assert!(matches!(
            select(&index, &s.blobs, &only("linux/amd64")),
            Err(ManifestError::NoMatchingManifest { .. })
        ));
    }

    #[test]
    fn platformless_entries_sort_last() {
        let mut s = Store::default();
        let (bare, _) = s.manifest("linux/amd64", "bare");
        let (i386, i386_cfg) = s.manifest("linux/386", "");
        let (amd, amd_cfg) = s.manifest("linux/amd64", "tagged");
        let index = s.index(&[
            bare.clone(),
            with_platform(i386, "linux/386"),
            with_platform(amd, "linux/amd64"),
        ]);
        let sel = select(&index, &s.blobs, &only("linux/amd64")).expect("select");
        assert_eq!(sel.config, amd_cfg);
        // Even a less preferred platform beats a platform-less entry.
        let (i386_again, _) = s.manifest("linux/386", "");
        let index = s.index(&[bare, with_platform(i386_again, "linux/386")]);
        assert_eq!(
            select(&index, &s.blobs, &only("linux/amd64")).map(|x| x.config),
            Ok(i386_cfg)
        );
    }

    #[test]
    fn nested_index() {
        let mut s = Store::default();
        let (inner, [amd_cfg, arm64_cfg, _]) = multi_arch(&mut s);
        let (other, _) = s.manifest("linux/s390x", "");
        let outer = s.index(&[with_platform(other, "linux/s390x"), inner.clone()]);
        let sel = select(&outer, &s.blobs, &only("linux/amd64")).expect("select");
        assert_eq!(sel.config, amd_cfg);
        assert_eq!(sel.indexes, [outer.clone(), inner.clone()]);
        let sel = select(&outer, &s.blobs, &only("linux/arm64")).expect("select");
        assert_eq!(sel.config, arm64_cfg);
    }

    #[test]
    fn missing_blob_at_each_level() {
        let mut full = Store::default();
        let (inner, _) = multi_arch(&mut full);
        let outer = full.index(std::slice::from_ref(&inner));
        let host = only("linux/amd64");
        let sel = select(&outer, &full.blobs, &host).expect("complete store");

        let mut want = vec![
            outer.digest.clone(),
            inner.digest.clone(),
            sel.manifest.digest.clone(),
            sel.config.digest.clone(),
        ];
        for (i, missing) in want.iter().enumerate() {
            let mut blobs = full.blobs.clone();
            blobs.remove(missing);
            assert_eq!(
                select(&outer, &blobs, &host),
                Err(ManifestError::MissingBlob(missing.clone())),
                "level {i}"
            );
        }

        // The retry loop a caller runs: start empty, fetch what is asked for.
        let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut fetched = Vec::new();
        let result = loop {
            match select(&outer, &blobs, &host) {
                Err(ManifestError::MissingBlob(d)) => {
                    let bytes = full.blobs.get(&d).expect("store has it").clone();
                    fetched.push(d.clone());
                    blobs.insert(d, bytes);
                }
                other => break other,
            }
        };
        assert_eq!(result, Ok(sel));
        want.sort();
        fetched.sort();
        assert_eq!(fetched, want, "only the path is fetched, never layers");
    }

    #[test]
    fn layers_are_not_read() {
        let mut s = Store::default();
        let (m, cfg) = s.manifest("linux/amd64", "");
        assert!(
            !s.blobs.contains_key(
                &select(&m, &s.blobs, &only("linux/amd64"))
                    .expect("select")
                    .layers[0]
                    .digest
            )
        );
        assert_eq!(
            select(&m, &s.blobs, &only("linux/amd64")).map(|x| x.config),
            Ok(cfg)
        );
    }

    #[test]
    fn platformless_entry_needs_its_config() {
        let mut s = Store::default();
        let (m, cfg) = s.manifest("linux/amd64", "");
        let index = s.index(&[m]);
        s.blobs.remove(&cfg.digest);
        assert_eq!(
            select(&index, &s.blobs, &only("linux/amd64")),
            Err(ManifestError::MissingBlob(cfg.digest))
        );
    }

    #[test]
    fn unsupported_media_types() {
        let mut s = Store::default();
        let schema1 = s.put(
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            &json!({"schemaVersion": 1, "fsLayers": []}),
        );
        assert_eq!(
            select(&schema1, &s.blobs, &only("linux/amd64")),
            Err(ManifestError::UnsupportedMediaType {
                digest: schema1.digest.clone(),
                media_type: schema1.media_type.clone(),
            })
        );
        let unknown = with_platform(
            desc("application/vnd.example+json", &schema1.digest, 10),
            "linux/amd64",
        );
        let index = s.index(&[unknown]);
        let err = select(&index, &s.blobs, &only("linux/amd64")).expect_err("unknown child");
        assert!(
            matches!(err, ManifestError::UnsupportedMediaType { ref media_type, .. } if media_type == "application/vnd.example+json")
        );
        assert!(err.to_string().contains("not an image manifest"), "{err}");
        let untyped = desc("", &schema1.digest, 10);
        assert!(matches!(
            select(&untyped, &s.blobs, &only("linux/amd64")),
            Err(ManifestError::UnsupportedMediaType { .. })
        ));
    }

    #[test]
    fn malformed_json() {
        let host = only("linux/amd64");
        let mut s = Store::default();
        let bad_index = s.put_raw(MEDIA_TYPE_OCI_INDEX, b"{\"manifests\": [".to_vec());
        let bad_manifest = s.put_raw(MEDIA_TYPE_OCI_MANIFEST, b"not json".to_vec());
        let wrong_types = s.put(MEDIA_TYPE_OCI_MANIFEST, &json!({"config": {"digest": 5}}));
        let no_config = s.put(
            MEDIA_TYPE_OCI_MANIFEST,
            &json!({"schemaVersion": 2, "layers": []}),
        );
        for d in [&bad_index, &bad_manifest, &wrong_types, &no_config] {
            match select(d, &s.blobs, &host) {
                Err(ManifestError::Parse { digest, reason }) => {
                    assert_eq!(digest, d.digest);
                    assert!(!reason.is_empty());
                }
                other => panic!("{d:?}: {other:?}"),
            }
        }
        let bad_config = s.put_raw("application/vnd.oci.image.config.v1+json", b"[1,2".to_vec());
        let m = s.put(
            MEDIA_TYPE_OCI_MANIFEST,
            &json!({"config": bad_config, "layers": []}),
        );
        assert!(matches!(
            select(&m, &s.blobs, &host),
            Err(ManifestError::Parse { digest, .. }) if digest == bad_config.digest
        ));
        let null_config = s.put_raw("application/vnd.oci.image.config.v1+json", b"null".to_vec());
        let m = s.put(
            MEDIA_TYPE_OCI_MANIFEST,
            &json!({"config": null_config, "layers": null}),
        );
        assert!(
            select(&m, &s.blobs, &host).is_ok(),
            "Go accepts null configs"
        );
    }

    #[test]
    fn media_type_mismatches() {
        let host = only("linux/amd64");
        let mut s = Store::default();
        let (m, _) = s.manifest("linux/amd64", "");
        let index = s.index(&[with_platform(m.clone(), "linux/amd64")]);
        // An index blob behind a manifest descriptor and the reverse.
        let as_manifest = desc(MEDIA_TYPE_OCI_MANIFEST, &index.digest, 1);
        let as_index = desc(MEDIA_TYPE_OCI_INDEX, &m.digest, 1);
        let fs_layers = s.put(
            MEDIA_TYPE_DOCKER_MANIFEST,
            &json!({"schemaVersion": 1, "fsLayers": null}),
        );
        for d in [as_manifest, as_index, fs_layers] {
            assert!(
                matches!(
                    select(&d, &s.blobs, &host),
                    Err(ManifestError::Parse { .. })
                ),
                "{d:?}"
            );
        }
    }

    #[test]
    fn invalid_digests_are_not_fetched() {
        let host = only("linux/amd64");
        let mut s = Store::default();
        for digest in [
            "",
            "sha256:abc",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:ABCDEF",
        ] {
            let d = desc(MEDIA_TYPE_OCI_MANIFEST, digest, 1);
            assert!(
                matches!(
                    select(&d, &s.blobs, &host),
                    Err(ManifestError::Parse { .. })
                ),
                "{digest:?}"
            );
        }
        let m = s.put(
            MEDIA_TYPE_OCI_MANIFEST,
            &json!({"config": {"mediaType": "x", "digest": "nope", "size": 1}}),
        );
        assert!(
            matches!(select(&m, &s.blobs, &host), Err(ManifestError::Parse { digest, .. }) if digest == "nope")
        );
    }

    #[test]
    fn cycles_and_depth_are_capped() {
        let host = only("linux/amd64");
        // A blob stored under a digest that is not its own: an index listing itself.
        let fake = format!("sha256:{}", "ab".repeat(32));
        let body = json!({"manifests": [desc(MEDIA_TYPE_OCI_INDEX, &fake, 100)]});
        let mut blobs = HashMap::new();
        blobs.insert(fake.clone(), serde_json::to_vec(&body).expect("json"));
        let err =
            select(&desc(MEDIA_TYPE_OCI_INDEX, &fake, 100), &blobs, &host).expect_err("cycle");
        assert!(
            matches!(err, ManifestError::Parse { ref digest, .. } if *digest == fake),
            "{err}"
        );

        // Exactly MAX_INDEX_DEPTH nested indexes still resolve.
        let mut s = Store::default();
        let (m, cfg) = s.manifest("linux/amd64", "");
        let mut top = with_platform(m, "linux/amd64");
        for _ in 0..MAX_INDEX_DEPTH {
            top = s.index(&[top]);
        }
        let sel = select(&top, &s.blobs, &host).expect("deep but allowed");
        assert_eq!(sel.config, cfg);
        assert_eq!(sel.indexes.len(), MAX_INDEX_DEPTH);
        let deeper = s.index(&[top]);
        assert!(matches!(
            select(&deeper, &s.blobs, &host),
            Err(ManifestError::Parse { .. })
        ));
    }

    #[test]
    fn huge_inputs_are_rejected() {
        let host = only("linux/amd64");
        let mut s = Store::default();
        let (m, _) = s.manifest("linux/amd64", "");
        let entries = vec![with_platform(m, "linux/s390x"); MAX_ENTRIES + 1];
        let index = s.index(&entries);
        assert!(matches!(
            select(&index, &s.blobs, &host),
            Err(ManifestError::Parse { .. })
        ));
        let big = s.put_raw(MEDIA_TYPE_OCI_INDEX, vec![b' '; MAX_BLOB_BYTES + 1]);
        let err = select(&big, &s.blobs, &host).expect_err("too big");
        assert!(err.to_string().contains("limit"), "{err}");
    }

    #[test]
    fn size_sums_path_manifest_config_and_layers() {
        let mut s = Store::default();
        let (index, [amd_cfg, _, _]) = multi_arch(&mut s);
        let sel = select(&index, &s.blobs, &only("linux/amd64")).expect("select");
        let want = index.size + sel.manifest.size + amd_cfg.size + 1000;
        assert_eq!(sel.size(), want);
        assert_eq!(
            sel.manifest.size as usize,
            s.blobs[&sel.manifest.digest].len()
        );

        let mut odd = sel.clone();
        odd.layers[0].size = -5;
        odd.layers.push(desc("l", "d", i64::MAX as usize));
        assert_eq!(odd.size(), i64::MAX);
    }

    #[test]
    fn descriptor_json_round_trip() {
        let v = json!({
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "digest": format!("sha256:{}", "0".repeat(64)),
            "size": 42,
            "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"},
            "annotations": {"a": "b"},
            "urls": ["ignored"]
        });
        let d: Descriptor = serde_json::from_value(v).expect("descriptor");
        assert_eq!(d.size, 42);
        assert_eq!(
            d.platform.as_ref().map(Platform::normalize),
            Some(plat("linux/arm64"))
        );
        assert_eq!(d.annotations.get("a").map(String::as_str), Some("b"));
        let back: Descriptor =
            serde_json::from_value(serde_json::to_value(&d).expect("ser")).expect("de");
        assert_eq!(back, d);
        let nulls: Descriptor =
            serde_json::from_value(json!({"mediaType": null, "digest": null, "size": null, "platform": null, "annotations": null}))
                .expect("nulls");
        assert_eq!(nulls, Descriptor::default());
    }
}
