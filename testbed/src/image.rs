//! Test images: OCI (or Docker v2) images with deterministic content, imported straight into a
//! containerd namespace through its gRPC API (Content, Images, Leases), with no registry and no
//! `ctr`.
//!
//! Every layer is an uncompressed tar holding one file whose bytes are a SHA-256 stream of a seed,
//! so the same seed always gives the same blob (shared base layers) and different seeds give
//! different blobs. Imported content carries containerd's GC reference labels, so it stays
//! reachable from the image records exactly as after `ctr images import`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use containerd_client::services::v1::{
    self as api, AddResourceRequest, CreateContainerRequest, CreateImageRequest,
    DeleteContainerRequest, DeleteImageRequest, InfoRequest, ListContentRequest, ListImagesRequest,
    UpdateImageRequest, UpdateRequest, WriteAction, WriteContentRequest,
    containers_client::ContainersClient, content_client::ContentClient,
    images_client::ImagesClient, leases_client::LeasesClient,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::with_namespace;
use prost_types::{Any, FieldMask};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// gRPC metadata key naming the lease that protects content written by a request.
const LEASE_HEADER: &str = "containerd-lease";
/// Size of one `Write` message (containerd accepts up to 16 MiB per message).
const WRITE_CHUNK: usize = 1 << 20;
/// Default `created` time of image configs.
const DEFAULT_CREATED: &str = "2024-01-01T00:00:00Z";

/// Media types of one image format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// OCI image spec media types.
    #[default]
    Oci,
    /// Docker image manifest v2 schema 2 media types.
    Docker,
}

impl Format {
    /// Media type of a multi-platform index (OCI) or manifest list (Docker).
    pub fn index(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.index.v1+json",
            Format::Docker => "application/vnd.docker.distribution.manifest.list.v2+json",
        }
    }
    /// Media type of a single-platform manifest.
    pub fn manifest(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.manifest.v1+json",
            Format::Docker => "application/vnd.docker.distribution.manifest.v2+json",
        }
    }
    /// Media type of an image config.
    pub fn config(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.config.v1+json",
            Format::Docker => "application/vnd.docker.container.image.v1+json",
        }
    }
    /// Media type of an uncompressed layer.
    pub fn layer(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.layer.v1.tar",
            Format::Docker => "application/vnd.docker.image.rootfs.diff.tar",
        }
    }
}

/// A content descriptor: what an image record's target or a manifest entry points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Media type of the content.
    pub media_type: String,
    /// `sha256:<hex>` digest of the content.
    pub digest: String,
    /// Size of the content in bytes.
    pub size: i64,
}

impl Descriptor {
    fn to_json(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

/// One piece of content of an image (index, manifest, config or layer).
#[derive(Clone, Debug)]
pub struct Blob {
    /// Media type of the blob.
    pub media_type: String,
    /// `sha256:<hex>` digest of `bytes`.
    pub digest: String,
    /// The content itself.
    pub bytes: Vec<u8>,
    /// containerd GC reference labels (`containerd.io/gc.ref.content.*`) naming its children.
    pub gc_labels: BTreeMap<String, String>,
}

impl Blob {
    fn new(media_type: &str, bytes: Vec<u8>, gc_labels: BTreeMap<String, String>) -> Self {
        Blob {
            media_type: media_type.to_string(),
            digest: digest_of(&bytes),
            bytes,
            gc_labels,
        }
    }

    /// The descriptor pointing at this blob.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.bytes.len() as i64,
        }
    }
}

/// A built image: its target descriptor and all of its content.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    /// What image records point at: the index for multi-platform images, else the manifest.
    pub target: Descriptor,
    /// All content, children before parents (layers, configs, manifests, index); no duplicates.
    pub blobs: Vec<Blob>,
    /// Config digest (the CRI image id) per platform (`os/arch[/variant]`, as given).
    pub config_digests: BTreeMap<String, String>,
    /// Manifest digest per platform.
    pub manifest_digests: BTreeMap<String, String>,
    /// Layer digests per platform, base layer first.
    pub layer_digests: BTreeMap<String, Vec<String>>,
}

impl BuiltImage {
    /// The image id (config digest) for `platform`. Panics if the image has no such platform.
    pub fn id_for(&self, platform: &str) -> String {
        match self.config_digests.get(platform) {
            Some(id) => id.clone(),
            None => panic!(
                "image has no platform {platform}: {:?}",
                self.config_digests.keys()
            ),
        }
    }

    /// The image id CRI reports on this host: the config digest for [`host_platform`].
    pub fn id(&self) -> String {
        self.id_for(&host_platform())
    }

    /// Digests of all blobs.
    pub fn digests(&self) -> BTreeSet<String> {
        self.blobs.iter().map(|b| b.digest.clone()).collect()
    }

    /// Total size of all blobs in bytes.
    pub fn size(&self) -> u64 {
        self.blobs.iter().map(|b| b.bytes.len() as u64).sum()
    }
}

/// The `os/arch` platform of this host, as containerd's default platform matcher sees it.
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("linux/{arch}")
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `size` deterministic bytes derived from `seed`: SHA-256(seed || counter) blocks.
pub fn seeded_bytes(seed: &str, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 32);
    let mut counter = 0u64;
    while out.len() < size {
        out.extend_from_slice(
            &Sha256::new()
                .chain_update(seed)
                .chain_update(counter.to_le_bytes())
                .finalize(),
        );
        counter += 1;
    }
    out.truncate(size);
    out
}

/// An uncompressed layer tar holding one regular file of `size` seeded bytes.
pub fn layer_tar(seed: &str, size: usize) -> Vec<u8> {
    let data = seeded_bytes(seed, size);
    let name = format!("testbed/{}.bin", &hex::encode(Sha256::digest(seed))[..16]);
    let mut header = tar::Header::new_ustar();
    header.set_path(&name).expect("short relative path");
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::with_capacity(size + 2048));
    builder
        .append(&header, data.as_slice())
        .expect("writing to memory");
    builder.into_inner().expect("writing to memory")
}

/// Builds a test image with deterministic content.
///
/// ```ignore
/// let img = ImageBuilder::new("app").shared_base("debian", 4096).layer_sizes(&[1024]).build();
/// let multi = ImageBuilder::new("app").platforms(&["linux/amd64", "linux/arm64"]).build();
/// ```
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    seed: String,
    layer_sizes: Vec<usize>,
    base: Option<(String, usize)>,
    platforms: Vec<String>,
    index: bool,
    created: String,
    format: Format,
    config_labels: BTreeMap<String, String>,
    /// Layers given as tars (real files), replacing the seeded ones.
    layer_tars: Option<Vec<Vec<u8>>>,
    entrypoint: Option<Vec<String>>,
    user: Option<String>,
}

impl ImageBuilder {
    /// An image whose content derives from `seed`: by default one 1 KiB layer, a single-platform
    /// manifest for [`host_platform`], OCI media types, created at 2024-01-01T00:00:00Z.
    pub fn new(seed: impl Into<String>) -> Self {
        ImageBuilder {
            seed: seed.into(),
            layer_sizes: vec![1024],
            base: None,
            platforms: vec![host_platform()],
            index: false,
            created: DEFAULT_CREATED.to_string(),
            format: Format::Oci,
            config_labels: BTreeMap::new(),
            layer_tars: None,
            entrypoint: None,
            user: None,
        }
    }

    /// Layers made of real files (uncompressed tars, e.g. from [`files_tar`]) instead of the
    /// seeded ones; the image then carries no seed label and no default command.
    pub fn layer_tars(mut self, tars: Vec<Vec<u8>>) -> Self {
        self.layer_tars = Some(tars);
        self
    }

    /// The config's `Entrypoint`.
    pub fn entrypoint(mut self, entrypoint: &[&str]) -> Self {
        self.entrypoint = Some(entrypoint.iter().map(|s| s.to_string()).collect());
        self
    }

    /// The config's `User` (`uid[:gid]` or a name).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// The image's own layers (after any shared base), by file payload size in bytes.
    pub fn layer_sizes(mut self, sizes: &[usize]) -> Self {
        self.layer_sizes = sizes.to_vec();
        self
    }

    /// A first layer derived from `seed` (and the platform) alone, so images built with the same
    /// base seed share that layer blob.
    pub fn shared_base(mut self, seed: impl Into<String>, size: usize) -> Self {
        self.base = Some((seed.into(), size));
        self
    }

    /// A single-platform image (a manifest, no index) for `os/arch[/variant]`.
    pub fn platform(mut self, platform: &str) -> Self {
        self.platforms = vec![platform.to_string()];
        self.index = false;
        self
    }

    /// A multi-platform image: an index with one manifest per `os/arch[/variant]`.
    pub fn platforms(mut self, platforms: &[&str]) -> Self {
        self.platforms = platforms.iter().map(|p| p.to_string()).collect();
        self.index = true;
        self
    }

    /// The config's `created` time, RFC 3339 (changes the image id).
    pub fn created(mut self, rfc3339: impl Into<String>) -> Self {
        self.created = rfc3339.into();
        self
    }

    /// The config's `created` time (whole seconds, UTC).
    pub fn created_at(self, time: SystemTime) -> Self {
        self.created(rfc3339(time))
    }

    /// The media types to use (OCI by default).
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Docker v2 media types (manifest list / manifest v2 schema 2).
    pub fn docker(self) -> Self {
        self.format(Format::Docker)
    }

    /// A label in the image config (`config.Labels`).
    pub fn config_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config_labels.insert(key.into(), value.into());
        self
    }

    /// Builds all content.
    pub fn build(&self) -> BuiltImage {
        assert!(
            !self.platforms.is_empty(),
            "an image needs at least one platform"
        );
        let f = self.format;
        let mut image = BuiltImage {
            target: Descriptor {
                media_type: String::new(),
                digest: String::new(),
                size: 0,
            },
            blobs: Vec::new(),
            config_digests: BTreeMap::new(),
            manifest_digests: BTreeMap::new(),
            layer_digests: BTreeMap::new(),
        };
        let (mut layers, mut configs, mut manifests) = (Vec::new(), Vec::new(), Vec::new());
        let mut index_entries = Vec::new();
        for platform in &self.platforms {
            let (os, arch, variant) = parse_platform(platform);
            let mut layer_blobs = Vec::new();
            if let Some((base, size)) = &self.base {
                layer_blobs.push(Blob::new(
                    f.layer(),
                    layer_tar(&format!("base:{base}:{platform}"), *size),
                    BTreeMap::new(),
                ));
            }
            match &self.layer_tars {
                Some(tars) => layer_blobs.extend(
                    tars.iter()
                        .map(|t| Blob::new(f.layer(), t.clone(), BTreeMap::new())),
                ),
                None => {
                    for (i, size) in self.layer_sizes.iter().enumerate() {
                        let seed = format!("layer:{}:{platform}:{i}", self.seed);
                        layer_blobs.push(Blob::new(
                            f.layer(),
                            layer_tar(&seed, *size),
                            BTreeMap::new(),
                        ));
                    }
                }
            }
            let diff_ids: Vec<&str> = layer_blobs.iter().map(|b| b.digest.as_str()).collect();
            let history: Vec<Value> = (0..diff_ids.len())
                .map(|i| json!({ "created": self.created, "created_by": format!("testbed layer {i}") }))
                .collect();
            let mut config = json!({
                "created": self.created,
                "architecture": arch,
                "os": os,
                "config": self.runtime_config(),
                "rootfs": { "type": "layers", "diff_ids": diff_ids },
                "history": history,
            });
            if let Some(v) = variant {
                config["variant"] = json!(v);
            }
            let config = Blob::new(f.config(), to_vec(&config), BTreeMap::new());

            let mut gc = BTreeMap::from([(
                "containerd.io/gc.ref.content.config".to_string(),
                config.digest.clone(),
            )]);
            for (i, layer) in layer_blobs.iter().enumerate() {
                gc.insert(
                    format!("containerd.io/gc.ref.content.l.{i}"),
                    layer.digest.clone(),
                );
            }
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": f.manifest(),
                "config": config.descriptor().to_json(),
                "layers": layer_blobs.iter().map(|l| l.descriptor().to_json()).collect::<Vec<_>>(),
            });
            let manifest = Blob::new(f.manifest(), to_vec(&manifest), gc);

            let mut entry = manifest.descriptor().to_json();
            entry["platform"] = json!({ "architecture": arch, "os": os });
            if let Some(v) = variant {
                entry["platform"]["variant"] = json!(v);
            }
            index_entries.push(entry);
            image
                .config_digests
                .insert(platform.clone(), config.digest.clone());
            image
                .manifest_digests
                .insert(platform.clone(), manifest.digest.clone());
            image.layer_digests.insert(
                platform.clone(),
                layer_blobs.iter().map(|l| l.digest.clone()).collect(),
            );
            layers.extend(layer_blobs);
            configs.push(config);
            manifests.push(manifest);
        }
        image.target = manifests[0].descriptor();
        let mut blobs: Vec<Blob> = layers.into_iter().chain(configs).chain(manifests).collect();
        if self.index {
            let gc = image.manifest_digests.values().enumerate();
            let gc = gc
                .map(|(i, d)| (format!("containerd.io/gc.ref.content.m.{i}"), d.clone()))
                .collect();
            let index =
                json!({ "schemaVersion": 2, "mediaType": f.index(), "manifests": index_entries });
            let index = Blob::new(f.index(), to_vec(&index), gc);
            image.target = index.descriptor();
            blobs.push(index);
        }
        let mut seen = BTreeSet::new();
        blobs.retain(|b| seen.insert(b.digest.clone()));
        image.blobs = blobs;
        image
    }
}

impl ImageBuilder {
    /// The config's `config` object: how a container of this image runs.
    fn runtime_config(&self) -> Value {
        let mut labels = self.config_labels.clone();
        if self.layer_tars.is_none() {
            labels.insert("io.imagegc.testbed.seed".into(), self.seed.clone());
        }
        // Key order kept as it always was, so the seeded images' ids never change.
        let mut config = match &self.entrypoint {
            Some(entrypoint) => json!({
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Entrypoint": entrypoint,
                "Labels": labels,
            }),
            None => {
                json!({ "Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/true"], "Labels": labels })
            }
        };
        if let Some(user) = &self.user {
            config["User"] = json!(user);
        }
        config
    }
}

/// A file to put into a layer of real files.
#[derive(Clone, Debug)]
pub struct LayerFile {
    /// Absolute path in the image (`/usr/local/bin/imagegc`).
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// Content.
    pub bytes: Vec<u8>,
}

/// An uncompressed layer tar holding `files` and their parent directories (mode 0755), sorted
/// by path, owned by root, with mtime 0: the same files always give the same blob.
pub fn files_tar(files: &[LayerFile]) -> Result<Vec<u8>> {
    let mut dirs = BTreeSet::new();
    let mut sorted: Vec<&LayerFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for f in &sorted {
        ensure!(
            f.path.starts_with('/') && !f.path.ends_with('/') && !f.path.contains(".."),
            "layer file path {:?} must be absolute, without '..'",
            f.path
        );
        let mut parent = Path::new(&f.path).parent();
        while let Some(p) = parent.filter(|p| *p != Path::new("/")) {
            dirs.insert(p.to_string_lossy().trim_start_matches('/').to_string());
            parent = p.parent();
        }
    }
    let header = |path: &str, kind: tar::EntryType, mode: u32, size: u64| -> Result<tar::Header> {
        let mut h = tar::Header::new_ustar();
        h.set_path(path)
            .with_context(|| format!("{path} does not fit a tar header"))?;
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        Ok(h)
    };
    let mut builder = tar::Builder::new(Vec::new());
    for dir in &dirs {
        let h = header(&format!("{dir}/"), tar::EntryType::Directory, 0o755, 0)?;
        builder.append(&h, std::io::empty())?;
    }
    for f in sorted {
        let path = f.path.trim_start_matches('/');
        let h = header(path, tar::EntryType::Regular, f.mode, f.bytes.len() as u64)?;
        builder.append(&h, f.bytes.as_slice())?;
    }
    Ok(builder.into_inner()?)
}

/// Writes `image` as an OCI image layout in a tar archive (`oci-layout`, `index.json`,
/// `blobs/sha256/…`) naming it `name` (a full reference, `registry/repo:tag`), as
/// `ctr images import`, `skopeo copy oci-archive:` and `podman load` read it.
pub fn write_oci_archive(image: &BuiltImage, name: &str, out: &Path) -> Result<()> {
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    let mut entry = image.target.to_json();
    entry["annotations"] = json!({
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": tag,
    });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": Format::Oci.index(),
        "manifests": [entry],
    });
    let layout = json!({ "imageLayoutVersion": "1.0.0" });
    let mut files = vec![
        ("oci-layout".to_string(), to_vec(&layout)),
        ("index.json".to_string(), to_vec(&index)),
    ];
    for blob in &image.blobs {
        let hex = blob.digest.trim_start_matches("sha256:");
        files.push((format!("blobs/sha256/{hex}"), blob.bytes.clone()));
    }
    let tmp = out.with_extension("tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = tar::Header::new_ustar();
        h.set_path(dir)?;
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_cksum();
        builder.append(&h, std::io::empty())?;
    }
    for (path, bytes) in files {
        let mut h = tar::Header::new_ustar();
        h.set_path(&path)?;
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(bytes.len() as u64);
        h.set_cksum();
        builder.append(&h, bytes.as_slice())?;
    }
    let mut writer = builder.into_inner()?;
    std::io::Write::flush(&mut writer)?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

fn to_vec(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("JSON values always serialize")
}

/// Splits `os/arch[/variant]`.
fn parse_platform(platform: &str) -> (&str, &str, Option<&str>) {
    let parts: Vec<&str> = platform.split('/').collect();
    match parts.as_slice() {
        [os, arch] => (os, arch, None),
        [os, arch, variant] => (os, arch, Some(variant)),
        _ => panic!("platform {platform:?} is not os/arch[/variant]"),
    }
}

/// Formats `time` as RFC 3339 UTC with whole seconds (`2024-01-01T00:00:00Z`).
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .expect("time after 1970")
        .as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

// ---------------------------------------------------------------------------------------------
// Import and containerd helpers.

/// A request in `namespace`, protected by `lease` when given.
fn request<T>(message: T, namespace: &str, lease: Option<&str>) -> Result<Request<T>> {
    let mut req = with_namespace!(message, namespace);
    if let Some(lease) = lease {
        req.metadata_mut()
            .insert(LEASE_HEADER, lease.parse().context("lease id as metadata")?);
    }
    Ok(req)
}

async fn connect(socket: &Path) -> Result<Channel> {
    containerd_client::connect(socket)
        .await
        .with_context(|| format!("connecting to containerd at {}", socket.display()))
}

/// Creates a lease that expires after an hour in case its owner never deletes it.
async fn create_lease(channel: &Channel, namespace: &str) -> Result<String> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = SystemTime::now();
    let nanos = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let id = format!("imagegc-testbed-{}-{nanos}-{n}", std::process::id());
    let expire = rfc3339(now + Duration::from_secs(3600));
    let labels = HashMap::from([("containerd.io/gc.expire".to_string(), expire)]);
    let req = api::CreateRequest {
        id: id.clone(),
        labels,
    };
    LeasesClient::new(channel.clone())
        .create(request(req, namespace, None)?)
        .await
        .with_context(|| format!("creating lease {id}"))?;
    Ok(id)
}

async fn delete_lease(channel: &Channel, namespace: &str, id: &str, sync: bool) -> Result<()> {
    let req = api::DeleteRequest {
        id: id.to_string(),
        sync,
    };
    LeasesClient::new(channel.clone())
        .delete(request(req, namespace, None)?)
        .await
        .with_context(|| format!("deleting lease {id}"))?;
    Ok(())
}

/// Imports `image` into `namespace`: writes every blob missing from the content store (with GC
/// reference labels), then creates (or, if it exists, replaces) one image record per name,
/// pointing at `image.target` and carrying `labels` (e.g. `io.cri-containerd.pinned=pinned`).
/// All of it happens under a lease, so containerd's GC cannot collect content half-way.
pub async fn import(
    socket: &Path,
    namespace: &str,
    image: &BuiltImage,
    names: &[String],
    labels: &HashMap<String, String>,
) -> Result<()> {
    let channel = connect(socket).await?;
    let lease = create_lease(&channel, namespace).await?;
    let result = import_under_lease(&channel, namespace, &lease, image, names, labels).await;
    let deleted = delete_lease(&channel, namespace, &lease, false).await;
    result.and(deleted)
}

async fn import_under_lease(
    channel: &Channel,
    namespace: &str,
    lease: &str,
    image: &BuiltImage,
    names: &[String],
    labels: &HashMap<String, String>,
) -> Result<()> {
    for blob in &image.blobs {
        write_blob(channel, namespace, lease, blob)
            .await
            .with_context(|| format!("writing {} {}", blob.media_type, blob.digest))?;
    }
    let mut images = ImagesClient::new(channel.clone());
    for name in names {
        let record = api::Image {
            name: name.clone(),
            labels: labels.clone(),
            target: Some(containerd_client::types::Descriptor {
                media_type: image.target.media_type.clone(),
                digest: image.target.digest.clone(),
                size: image.target.size,
                annotations: HashMap::new(),
            }),
            created_at: None,
            updated_at: None,
        };
        let create = CreateImageRequest {
            image: Some(record.clone()),
            source_date_epoch: None,
        };
        match images
            .create(request(create, namespace, Some(lease))?)
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {
                // No field mask: the whole record (target and labels) is replaced.
                let update = UpdateImageRequest {
                    image: Some(record),
                    update_mask: None,
                    source_date_epoch: None,
                };
                images
                    .update(request(update, namespace, Some(lease))?)
                    .await
                    .with_context(|| format!("updating image {name}"))?;
            }
            Err(s) => return Err(s).with_context(|| format!("creating image {name}")),
        }
    }
    Ok(())
}

/// Writes `blob` unless it already exists; either way it ends up with its GC labels and held by
/// `lease` until the image records reference it.
async fn write_blob(channel: &Channel, namespace: &str, lease: &str, blob: &Blob) -> Result<()> {
    let mut content = ContentClient::new(channel.clone());
    let info = InfoRequest {
        digest: blob.digest.clone(),
    };
    match content.info(request(info, namespace, None)?).await {
        Ok(_) => return adopt_existing(channel, namespace, lease, blob).await,
        Err(s) if s.code() == Code::NotFound => {}
        Err(s) => return Err(s).context("content info"),
    }

    let r#ref = format!("imagegc-testbed-{}", blob.digest);
    let total = blob.bytes.len() as i64;
    let message = |action: WriteAction, offset: usize, data: Vec<u8>| WriteContentRequest {
        action: action as i32,
        r#ref: r#ref.clone(),
        total,
        expected: blob.digest.clone(),
        offset: offset as i64,
        data,
        labels: HashMap::new(),
    };
    let mut messages = vec![message(WriteAction::Stat, 0, Vec::new())];
    for (i, chunk) in blob.bytes.chunks(WRITE_CHUNK).enumerate() {
        messages.push(message(WriteAction::Write, i * WRITE_CHUNK, chunk.to_vec()));
    }
    let mut commit = message(WriteAction::Commit, blob.bytes.len(), Vec::new());
    commit.labels = blob.gc_labels.clone().into_iter().collect();
    messages.push(commit);

    let outcome = write_stream(
        &mut content,
        request(futures::stream::iter(messages), namespace, Some(lease))?,
    )
    .await;
    match outcome {
        Ok(digest) => {
            ensure!(
                digest == blob.digest,
                "containerd committed {digest}, expected {}",
                blob.digest
            );
            Ok(())
        }
        // Someone else (or an earlier attempt) committed the same content meanwhile.
        Err(s) if s.code() == Code::AlreadyExists => {
            adopt_existing(channel, namespace, lease, blob).await
        }
        Err(s) => Err(s).context("content write"),
    }
}

/// Runs one `Write` session and returns the committed digest.
async fn write_stream(
    content: &mut ContentClient<Channel>,
    req: Request<futures::stream::Iter<std::vec::IntoIter<WriteContentRequest>>>,
) -> Result<String, Status> {
    let mut responses = content.write(req).await?.into_inner();
    let mut committed = None;
    while let Some(resp) = responses.message().await? {
        if resp.action == WriteAction::Commit as i32 {
            committed = Some(resp.digest);
        }
    }
    committed.ok_or_else(|| Status::internal("write stream ended without a commit response"))
}

/// Puts already stored content under `lease` and sets its GC labels.
async fn adopt_existing(
    channel: &Channel,
    namespace: &str,
    lease: &str,
    blob: &Blob,
) -> Result<()> {
    let resource = api::Resource {
        id: blob.digest.clone(),
        r#type: "content".into(),
    };
    let add = AddResourceRequest {
        id: lease.to_string(),
        resource: Some(resource),
    };
    LeasesClient::new(channel.clone())
        .add_resource(request(add, namespace, None)?)
        .await
        .context("adding existing content to the lease")?;
    if blob.gc_labels.is_empty() {
        return Ok(());
    }
    let paths = blob
        .gc_labels
        .keys()
        .map(|k| format!("labels.{k}"))
        .collect();
    let info = api::Info {
        digest: blob.digest.clone(),
        labels: blob.gc_labels.clone().into_iter().collect(),
        ..Default::default()
    };
    let update = UpdateRequest {
        info: Some(info),
        update_mask: Some(FieldMask { paths }),
    };
    ContentClient::new(channel.clone())
        .update(request(update, namespace, Some(lease))?)
        .await
        .context("setting GC labels on existing content")?;
    Ok(())
}

/// Unpacks `image`'s layers for this host's platform into `snapshotter` (e.g. `overlayfs`), as
/// a pull does: one committed snapshot per layer, named by its chain ID, and the config
/// labelled `containerd.io/gc.ref.snapshot.<snapshotter>` with the top one, so that garbage
/// collection keeps the snapshots while the image is referenced and removes them with it.
/// Layers another image already unpacked are reused. Import the image first.
pub async fn unpack(
    socket: &Path,
    namespace: &str,
    image: &BuiltImage,
    snapshotter: &str,
) -> Result<()> {
    let channel = connect(socket).await?;
    let lease = create_lease(&channel, namespace).await?;
    let result = unpack_under_lease(&channel, namespace, &lease, image, snapshotter).await;
    let deleted = delete_lease(&channel, namespace, &lease, false).await;
    result.and(deleted)
}

/// Where an unpack writes: the node, the namespace, the lease that protects what it writes.
struct Unpack<'a> {
    channel: &'a Channel,
    namespace: &'a str,
    lease: &'a str,
    snapshotter: &'a str,
}

async fn unpack_under_lease(
    channel: &Channel,
    namespace: &str,
    lease: &str,
    image: &BuiltImage,
    snapshotter: &str,
) -> Result<()> {
    use containerd_client::services::v1::snapshots::{
        StatSnapshotRequest, snapshots_client::SnapshotsClient,
    };
    let to = Unpack {
        channel,
        namespace,
        lease,
        snapshotter,
    };
    let platform = host_platform();
    let layers = image
        .layer_digests
        .get(&platform)
        .with_context(|| format!("the image has no {platform} layers"))?;
    let mut parent = String::new();
    for digest in layers {
        let chain = match parent.is_empty() {
            true => digest.clone(),
            false => digest_of(format!("{parent} {digest}").as_bytes()),
        };
        let stat = StatSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: chain.clone(),
        };
        match SnapshotsClient::new(channel.clone())
            .stat(request(stat, namespace, None)?)
            .await
        {
            Ok(_) => {
                let resource = api::Resource {
                    id: chain.clone(),
                    r#type: format!("snapshots/{snapshotter}"),
                };
                let add = AddResourceRequest {
                    id: lease.to_string(),
                    resource: Some(resource),
                };
                LeasesClient::new(channel.clone())
                    .add_resource(request(add, namespace, None)?)
                    .await
                    .context("adding an existing snapshot to the lease")?;
            }
            Err(s) if s.code() == Code::NotFound => {
                let blob = image
                    .blobs
                    .iter()
                    .find(|b| &b.digest == digest)
                    .context("layer blob")?;
                apply_layer(&to, blob, &chain, &parent)
                    .await
                    .with_context(|| format!("unpacking layer {digest}"))?;
            }
            Err(s) => return Err(s).context("snapshot stat"),
        }
        parent = chain;
    }
    let key = format!("containerd.io/gc.ref.snapshot.{snapshotter}");
    let info = api::Info {
        digest: image.id_for(&platform),
        labels: HashMap::from([(key.clone(), parent)]),
        ..Default::default()
    };
    let update = UpdateRequest {
        info: Some(info),
        update_mask: Some(FieldMask {
            paths: vec![format!("labels.{key}")],
        }),
    };
    ContentClient::new(channel.clone())
        .update(request(update, namespace, Some(lease))?)
        .await
        .context("labelling the config with its snapshot")?;
    Ok(())
}

/// Applies `layer` on top of the snapshot `parent` and commits the result as `chain`.
async fn apply_layer(to: &Unpack<'_>, layer: &Blob, chain: &str, parent: &str) -> Result<()> {
    use containerd_client::services::v1::ApplyRequest;
    use containerd_client::services::v1::diff_client::DiffClient;
    use containerd_client::services::v1::snapshots::{
        CommitSnapshotRequest, PrepareSnapshotRequest, snapshots_client::SnapshotsClient,
    };
    let mut snapshots = SnapshotsClient::new(to.channel.clone());
    let key = format!("imagegc-testbed-unpack-{chain}");
    let prepare = PrepareSnapshotRequest {
        snapshotter: to.snapshotter.to_string(),
        key: key.clone(),
        parent: parent.to_string(),
        labels: HashMap::new(),
    };
    let mounts = snapshots
        .prepare(request(prepare, to.namespace, Some(to.lease))?)
        .await
        .context("preparing a snapshot")?
        .into_inner()
        .mounts;
    let d = layer.descriptor();
    let apply = ApplyRequest {
        diff: Some(containerd_client::types::Descriptor {
            media_type: d.media_type,
            digest: d.digest,
            size: d.size,
            annotations: HashMap::new(),
        }),
        mounts,
        payloads: HashMap::new(),
        sync_fs: false,
    };
    DiffClient::new(to.channel.clone())
        .apply(request(apply, to.namespace, Some(to.lease))?)
        .await
        .context("applying the layer")?;
    let commit = CommitSnapshotRequest {
        snapshotter: to.snapshotter.to_string(),
        name: chain.to_string(),
        key,
        labels: HashMap::new(),
    };
    snapshots
        .commit(request(commit, to.namespace, Some(to.lease))?)
        .await
        .context("committing the snapshot")?;
    Ok(())
}

/// Creates a containerd container record `id` (runtime `io.containerd.runc.v2`, empty spec, no
/// snapshot, no task) referring to `image_name`. With `image_ref` (a config digest), it also gets
/// the CRI metadata extension and `io.cri-containerd.kind=container` label, which is how CRI
/// records that a container uses an image.
pub async fn create_container(
    socket: &Path,
    namespace: &str,
    id: &str,
    image_name: &str,
    image_ref: Option<&str>,
) -> Result<()> {
    let mut labels = HashMap::new();
    let mut extensions = HashMap::new();
    if let Some(image_ref) = image_ref {
        let metadata = json!({
            "Version": "v1",
            "Metadata": { "ID": id, "Name": id, "ImageRef": image_ref },
        });
        let any = Any {
            type_url: "github.com/containerd/cri/pkg/store/container/Metadata".into(),
            value: to_vec(&metadata),
        };
        extensions.insert("io.cri-containerd.container.metadata".to_string(), any);
        labels.insert(
            "io.cri-containerd.kind".to_string(),
            "container".to_string(),
        );
    }
    let container = api::Container {
        id: id.to_string(),
        labels,
        image: image_name.to_string(),
        runtime: Some(api::container::Runtime {
            name: "io.containerd.runc.v2".into(),
            options: None,
        }),
        spec: Some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
            value: b"{}".to_vec(),
        }),
        extensions,
        ..Default::default()
    };
    let req = CreateContainerRequest {
        container: Some(container),
    };
    ContainersClient::new(connect(socket).await?)
        .create(request(req, namespace, None)?)
        .await
        .with_context(|| format!("creating container {id}"))?;
    Ok(())
}

/// Deletes the container record `id`.
pub async fn delete_container(socket: &Path, namespace: &str, id: &str) -> Result<()> {
    let req = DeleteContainerRequest { id: id.to_string() };
    ContainersClient::new(connect(socket).await?)
        .delete(request(req, namespace, None)?)
        .await
        .with_context(|| format!("deleting container {id}"))?;
    Ok(())
}

/// Deletes the image record `name`; with `sync`, containerd runs its GC before answering.
pub async fn delete_image(socket: &Path, namespace: &str, name: &str, sync: bool) -> Result<()> {
    let req = DeleteImageRequest {
        name: name.to_string(),
        sync,
        target: None,
    };
    ImagesClient::new(connect(socket).await?)
        .delete(request(req, namespace, None)?)
        .await
        .with_context(|| format!("deleting image {name}"))?;
    Ok(())
}

/// Deletes the content blob `digest` from `namespace`, whatever references it (as
/// `ctr content rm` does): the records pointing at it stop reading as images.
pub async fn delete_content(socket: &Path, namespace: &str, digest: &str) -> Result<()> {
    let req = containerd_client::services::v1::DeleteContentRequest {
        digest: digest.to_string(),
    };
    ContentClient::new(connect(socket).await?)
        .delete(request(req, namespace, None)?)
        .await
        .with_context(|| format!("deleting content {digest}"))?;
    Ok(())
}

/// Forces a synchronous containerd GC (creates a lease and deletes it with `sync: true`).
pub async fn force_gc(socket: &Path, namespace: &str) -> Result<()> {
    let channel = connect(socket).await?;
    let lease = create_lease(&channel, namespace).await?;
    delete_lease(&channel, namespace, &lease, true).await
}

/// Names of all image records in `namespace`.
pub async fn image_names(socket: &Path, namespace: &str) -> Result<BTreeSet<String>> {
    let req = ListImagesRequest {
        filters: Vec::new(),
    };
    let resp = ImagesClient::new(connect(socket).await?)
        .list(request(req, namespace, None)?)
        .await
        .context("listing images")?;
    Ok(resp
        .into_inner()
        .images
        .into_iter()
        .map(|i| i.name)
        .collect())
}

/// Digests of all content in `namespace`.
pub async fn content_digests(socket: &Path, namespace: &str) -> Result<BTreeSet<String>> {
    let req = ListContentRequest {
        filters: Vec::new(),
    };
    let mut stream = ContentClient::new(connect(socket).await?)
        .list(request(req, namespace, None)?)
        .await
        .context("listing content")?
        .into_inner();
    let mut digests = BTreeSet::new();
    while let Some(resp) = stream.message().await.context("listing content")? {
        digests.extend(resp.info.into_iter().map(|i| i.digest));
    }
    Ok(digests)
}

/// Content labels of `digest` in `namespace` (for checking GC reference labels).
pub async fn content_labels(
    socket: &Path,
    namespace: &str,
    digest: &str,
) -> Result<BTreeMap<String, String>> {
    let req = InfoRequest {
        digest: digest.to_string(),
    };
    let resp = ContentClient::new(connect(socket).await?)
        .info(request(req, namespace, None)?)
        .await
        .with_context(|| format!("content info {digest}"))?;
    match resp.into_inner().info {
        Some(info) => Ok(info.labels.into_iter().collect()),
        None => bail!("content info {digest}: empty response"),
    }
}
