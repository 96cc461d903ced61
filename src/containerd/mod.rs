//! The containerd shell: reads one namespace into the core's plain types and carries out a
//! plan. Everything that decides lives in [`crate::core`]; this module only talks gRPC.

mod execute;

pub use execute::{DELETE_CONCURRENCY, Executed, execute};

use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_client::services::v1::{
    DeleteImageRequest, Image, ListContainersRequest, ListContentRequest, ListImagesRequest,
    ReadContentRequest, SubscribeRequest, UpdateImageRequest, containers_client::ContainersClient,
    content_client::ContentClient, events_client::EventsClient, images_client::ImagesClient,
    leases_client::LeasesClient,
};
use containerd_client::tonic::{
    Code, Request, Status, metadata::MetadataValue, transport::Channel,
};
use serde::Deserialize;

pub use crate::runtime::RuntimeError;

use crate::core::inventory::{self, BlobInfo, ContainerRecord, ImageRecord, Inventory, Journal};
use crate::core::manifest::{self, Descriptor, ManifestError, Selection};
use crate::core::platform::{Matcher, Platform};

/// Where containerd listens on a stock node.
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";
/// The namespace the CRI plugin (and so Kubernetes) uses.
pub const DEFAULT_NAMESPACE: &str = "k8s.io";

/// Content reads in flight at once while building an inventory.
const READ_CONCURRENCY: usize = 16;

/// Values past which a listing is left unfiltered: containerd tries each filter against every
/// item it walks, so a long list of filters costs it more than the items it saves sending.
const MAX_FILTERS: usize = 64;

/// CRI's container metadata extension, which names the image a container was created from.
const CRI_CONTAINER_METADATA: &str = "io.cri-containerd.container.metadata";

fn call_err(op: impl Into<String>) -> impl FnOnce(Status) -> RuntimeError {
    let op = format!("containerd {}", op.into());
    move |status| RuntimeError::Call {
        op,
        status: Box::new(status),
    }
}

/// What building an inventory read, and how long it took.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Listing records, containers and journals (one round trip, the three at once).
    pub listed: Duration,
    /// The whole inventory, listing included.
    pub elapsed: Duration,
    /// Distinct targets whose content was read.
    pub targets_read: usize,
    /// Content blobs read (indexes, manifests, configs).
    pub blobs_read: usize,
    /// Whether every target was read: a requested string named no image or several, or a
    /// recorded ID disagreed with its content.
    pub read_all: bool,
}

/// A connection to one containerd namespace.
#[derive(Clone)]
pub struct Runtime {
    channel: Channel,
    namespace: MetadataValue<tonic::metadata::Ascii>,
    namespace_name: String,
    socket: PathBuf,
    /// Selections of the last inventory, by target and platform (see
    /// [`Runtime::inventory_and_records`]); shared by clones.
    selections: Arc<Mutex<HashMap<String, Selection>>>,
}

/// Whether `ns` is a valid containerd namespace name.
pub fn valid_namespace(ns: &str) -> bool {
    // containerd's identifier grammar: alphanumeric runs joined by single '.', '_' or '-'.
    !ns.is_empty()
        && ns.len() <= 76
        && ns
            .split(['.', '_', '-'])
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()))
}

impl Runtime {
    /// Connects to `socket` for `namespace`.
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Runtime, RuntimeError> {
        if !valid_namespace(namespace) {
            return Err(RuntimeError::InvalidNamespace(namespace.to_string()));
        }
        let namespace_value = namespace
            .parse()
            .map_err(|_| RuntimeError::InvalidNamespace(namespace.to_string()))?;
        let channel = crate::runtime::channel(socket).await?;
        Ok(Runtime {
            channel,
            namespace: namespace_value,
            namespace_name: namespace.to_string(),
            socket: socket.into(),
            selections: Arc::default(),
        })
    }

    /// The namespace this runtime acts in.
    pub fn namespace(&self) -> &str {
        &self.namespace_name
    }

    /// The socket this runtime is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut()
            .insert("containerd-namespace", self.namespace.clone());
        r
    }

    /// containerd's `/containers/create` events of this namespace: the stream yields once per
    /// container created and ends when the connection breaks.
    pub async fn container_creations(
        &self,
    ) -> Result<impl futures::Stream<Item = ()> + use<>, RuntimeError> {
        use futures::StreamExt;
        let events = EventsClient::new(self.channel.clone())
            .subscribe(SubscribeRequest {
                filters: vec![r#"topic=="/containers/create""#.to_string()],
            })
            .await
            .map_err(call_err("subscribe to container events"))?
            .into_inner();
        let namespace = self.namespace.clone();
        Ok(events
            .take_while(|e| futures::future::ready(e.is_ok()))
            .filter_map(move |e| {
                let ours = e.is_ok_and(|e| e.namespace == namespace);
                futures::future::ready(ours.then_some(()))
            }))
    }

    /// Every image record in the namespace.
    pub async fn list_images(&self) -> Result<Vec<ImageRecord>, RuntimeError> {
        self.list_images_filtered(vec![]).await
    }

    /// The records among `names` that exist. With more names than a filter pays for, every
    /// record is returned: callers look only at the names they asked for.
    pub async fn list_images_named(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<Vec<ImageRecord>, RuntimeError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        self.list_images_filtered(any_equal("name", names).unwrap_or_default())
            .await
    }

    async fn list_images_filtered(
        &self,
        filters: Vec<String>,
    ) -> Result<Vec<ImageRecord>, RuntimeError> {
        let images = ImagesClient::new(self.channel.clone())
            .list(self.req(ListImagesRequest { filters }))
            .await
            .map_err(call_err("list images"))?
            .into_inner()
            .images;
        Ok(images.into_iter().filter_map(image_record).collect())
    }

    /// Every container record in the namespace (running or not).
    pub async fn list_containers(&self) -> Result<Vec<ContainerRecord>, RuntimeError> {
        let containers = ContainersClient::new(self.channel.clone())
            .list(self.req(ListContainersRequest { filters: vec![] }))
            .await
            .map_err(call_err("list containers"))?
            .into_inner()
            .containers;
        Ok(containers
            .into_iter()
            .map(|c| ContainerRecord {
                image_ref: c
                    .extensions
                    .get(CRI_CONTAINER_METADATA)
                    .and_then(|any| cri_image_ref(&any.value)),
                id: c.id,
                image: c.image,
            })
            .collect())
    }

    /// The bytes of one content blob, or `None` if the namespace does not have it.
    pub async fn read_blob(&self, digest: &str) -> Result<Option<Vec<u8>>, RuntimeError> {
        let resp = ContentClient::new(self.channel.clone())
            .read(self.req(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await;
        let mut stream = match resp {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(call_err(format!("read content {digest}"))(s)),
        };
        let mut buf = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk.data),
                Ok(None) => return Ok(Some(buf)),
                Err(s) if s.code() == Code::NotFound => return Ok(None),
                Err(s) => return Err(call_err(format!("read content {digest}"))(s)),
            }
        }
    }

    /// Size of every content blob in the namespace, by digest.
    pub async fn content_sizes(&self) -> Result<BTreeMap<String, i64>, RuntimeError> {
        self.content_sizes_filtered(vec![]).await
    }

    /// Size of each blob among `digests` that the namespace has. With more digests than a
    /// filter pays for, every blob is returned: callers look only at the digests they asked
    /// for.
    pub async fn content_sizes_of(
        &self,
        digests: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, i64>, RuntimeError> {
        if digests.is_empty() {
            return Ok(BTreeMap::new());
        }
        self.content_sizes_filtered(any_equal("digest", digests).unwrap_or_default())
            .await
    }

    async fn content_sizes_filtered(
        &self,
        filters: Vec<String>,
    ) -> Result<BTreeMap<String, i64>, RuntimeError> {
        let mut stream = ContentClient::new(self.channel.clone())
            .list(self.req(ListContentRequest { filters }))
            .await
            .map_err(call_err("list content"))?
            .into_inner();
        let mut sizes = BTreeMap::new();
        while let Some(resp) = stream.message().await.map_err(call_err("list content"))? {
            for info in resp.info {
                sizes.insert(info.digest, info.size);
            }
        }
        Ok(sizes)
    }

    /// Size and labels of every content blob in the namespace, by digest.
    pub async fn content_infos(&self) -> Result<BTreeMap<String, BlobInfo>, RuntimeError> {
        let mut stream = ContentClient::new(self.channel.clone())
            .list(self.req(ListContentRequest { filters: vec![] }))
            .await
            .map_err(call_err("list content"))?
            .into_inner();
        let mut infos = BTreeMap::new();
        while let Some(resp) = stream.message().await.map_err(call_err("list content"))? {
            for info in resp.info {
                let labels = info.labels.into_iter().collect();
                infos.insert(
                    info.digest,
                    BlobInfo {
                        size: info.size,
                        labels,
                    },
                );
            }
        }
        Ok(infos)
    }

    /// [`Runtime::inventory_and_records`] from listings alone where they suffice: each record's
    /// ID from the `sha256:<id>` record the CRI plugin created for its target
    /// ([`inventory::cri_recorded_ids`]), its manifest, config and layers from the
    /// garbage-collection labels of one content listing ([`inventory::selection_from_labels`]).
    /// Only the targets these do not describe for certain are read. For showing a node's
    /// images; a removal reads what it deletes ([`Runtime::inventory_for`]).
    pub async fn inventory_listed(
        &self,
        matcher: &Matcher,
    ) -> Result<(Inventory, Vec<ImageRecord>, ReadStats), RuntimeError> {
        let start = Instant::now();
        let (records, containers, journals, blobs) = tokio::try_join!(
            self.list_images(),
            self.list_containers(),
            self.list_journals(),
            self.content_infos()
        )?;
        let mut stats = ReadStats {
            listed: start.elapsed(),
            ..ReadStats::default()
        };
        let recorded = recorded_ids(&records, matcher);
        let targets = distinct_targets(&records);
        let mut selected: BTreeMap<String, Result<Selection, String>> = BTreeMap::new();
        for (k, target) in &targets {
            if let Some(sel) = recorded
                .get(k)
                .and_then(|id| inventory::selection_from_labels(target, id, &blobs))
            {
                selected.insert(k.clone(), Ok(sel));
            }
        }
        let rest: Vec<&String> = targets
            .keys()
            .filter(|k| !selected.contains_key(*k))
            .collect();
        self.read_into(&rest, &targets, matcher, &mut selected, &mut stats)
            .await?;
        let selections: BTreeMap<String, Result<Selection, String>> = records
            .iter()
            .filter_map(|r| {
                Some((
                    r.name.clone(),
                    selected.get(&target_key(&r.target))?.clone(),
                ))
            })
            .collect();
        let mut inventory = Inventory::build(&records, &selections, &containers);
        inventory.add_journals(journals, &records);
        stats.elapsed = start.elapsed();
        Ok((inventory, records, stats))
    }

    /// Reads the namespace into the CRI view for the platform `matcher` describes.
    ///
    /// Each record's blobs (indexes, manifest, config) are read as its selection asks for
    /// them, [`READ_CONCURRENCY`] reads kept in flight across all records, each distinct
    /// blob once.
    pub async fn inventory(&self, matcher: &Matcher) -> Result<Inventory, RuntimeError> {
        Ok(self.inventory_and_records(matcher).await?.0)
    }

    /// [`Runtime::inventory`], and the image records it was built from (their labels are not
    /// part of the CRI view), from one listing.
    pub async fn inventory_and_records(
        &self,
        matcher: &Matcher,
    ) -> Result<(Inventory, Vec<ImageRecord>), RuntimeError> {
        // Selections from the last inventory are reused while every blob they were read from
        // is still present (one content listing instead of two reads per image): content is
        // addressed by digest, so the same blobs select the same way.
        let cache = std::mem::take(&mut *self.selections.lock().unwrap_or_else(|e| e.into_inner()));
        let (records, containers, journals, present) = tokio::try_join!(
            self.list_images(),
            self.list_containers(),
            self.list_journals(),
            async {
                match cache.is_empty() {
                    true => Ok(BTreeMap::new()),
                    false => self.content_sizes().await,
                }
            }
        )?;
        // Records with the same target (a tag, its digest name and its `sha256:<id>` record)
        // share one selection.
        let mut targets: Vec<(&Descriptor, Vec<&str>)> = Vec::new();
        let mut target_index: HashMap<String, usize> = HashMap::new();
        let mut keys: Vec<String> = Vec::new();
        // Selections depend on the target and the platform: the cache key holds both.
        let platform = format!("{matcher:?}");
        for record in &records {
            let key = format!(
                "{platform}|{}",
                serde_json::to_string(&record.target).unwrap_or_default()
            );
            let i = *target_index.entry(key.clone()).or_insert_with(|| {
                targets.push((&record.target, Vec::new()));
                keys.push(key);
                targets.len() - 1
            });
            targets[i].1.push(&record.name);
        }
        let mut selected: Vec<Option<Result<Selection, String>>> = vec![None; targets.len()];
        let mut to_read: Vec<usize> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match cache.get(key) {
                Some(sel) if sel.read_from().all(|d| present.contains_key(d)) => {
                    selected[i] = Some(Ok(sel.clone()));
                }
                _ => to_read.push(i),
            }
        }
        let descriptors: Vec<&Descriptor> = to_read.iter().map(|&i| targets[i].0).collect();
        let (read, _) = self.select_targets(&descriptors, matcher).await?;
        for (i, selection) in to_read.into_iter().zip(read) {
            selected[i] = Some(selection);
        }
        // Keep what this inventory selected (and only that: images gone leave the cache).
        let mut next_cache = HashMap::new();
        for (key, selection) in keys.iter().zip(&selected) {
            if let Some(Ok(sel)) = selection {
                next_cache.insert(key.clone(), sel.clone());
            }
        }
        *self.selections.lock().unwrap_or_else(|e| e.into_inner()) = next_cache;
        let mut selections: BTreeMap<String, Result<Selection, String>> = BTreeMap::new();
        for ((_, names), selection) in targets.iter().zip(selected) {
            let Some(selection) = selection else { continue };
            for name in names {
                selections.insert(name.to_string(), selection.clone());
            }
        }
        let mut inventory = Inventory::build(&records, &selections, &containers);
        inventory.add_journals(journals, &records);
        Ok((inventory, records))
    }

    /// Selects each of `targets` for `matcher` from the content store; returns the selections
    /// in order, each the selection or why there is none, and how many blobs were read.
    ///
    /// Each target advances on its own: as soon as a blob it waits for arrives, it is selected
    /// again and asks for its next blob (index, manifest, config), so reads of different depths
    /// overlap instead of waiting for each other level by level. [`READ_CONCURRENCY`] reads are
    /// kept in flight, each distinct blob read once.
    async fn select_targets(
        &self,
        targets: &[&Descriptor],
        matcher: &Matcher,
    ) -> Result<(Vec<Result<Selection, String>>, usize), RuntimeError> {
        let mut blobs: HashMap<String, Vec<u8>> = HashMap::new();
        let mut missing: BTreeSet<String> = BTreeSet::new();
        let mut selected: Vec<Option<Result<Selection, String>>> = vec![None; targets.len()];
        let mut waiting: HashMap<String, Vec<usize>> = HashMap::new();
        let mut ready: Vec<usize> = (0..targets.len()).collect();
        let mut queue: Vec<String> = Vec::new();
        let mut reads = futures::stream::FuturesUnordered::new();
        loop {
            for i in ready.drain(..) {
                match manifest::select(targets[i], &blobs, matcher) {
                    Err(ManifestError::MissingBlob(digest)) if missing.contains(&digest) => {
                        selected[i] = Some(Err(format!("content {digest} is missing")));
                    }
                    Err(ManifestError::MissingBlob(digest)) => {
                        let waiters = waiting.entry(digest.clone()).or_default();
                        if waiters.is_empty() {
                            queue.push(digest);
                        }
                        waiters.push(i);
                    }
                    other => selected[i] = Some(other.map_err(|e| e.to_string())),
                }
            }
            while reads.len() < READ_CONCURRENCY {
                let Some(digest) = queue.pop() else { break };
                reads.push(async move { (self.read_blob(&digest).await, digest) });
            }
            let Some((blob, digest)) = reads.next().await else {
                break;
            };
            match blob? {
                Some(bytes) => {
                    blobs.insert(digest.clone(), bytes);
                }
                None => {
                    missing.insert(digest.clone());
                }
            }
            ready.extend(waiting.remove(&digest).unwrap_or_default());
        }
        let read = blobs.len() + missing.len();
        let selections = selected
            .into_iter()
            .map(|s| s.unwrap_or_else(|| Err("its manifest was not read".into())))
            .collect();
        Ok((selections, read))
    }

    /// The inventory a removal of `request` (the strings a user asked to remove) needs, reading
    /// content in proportion to the request rather than to the node.
    ///
    /// One listing of records, containers and journals; each record's ID comes from the
    /// `sha256:<id>` record the CRI plugin created for its target
    /// ([`inventory::cri_recorded_ids`]), and only targets without one are read. Then the
    /// targets of every record the plan may delete ([`inventory::records_to_verify`]) are read,
    /// and each must give the ID its record claimed. If one does not, or a string names no
    /// image or several, every target is read, as [`Runtime::inventory`] does. Images the
    /// request does not touch carry their ID, references, pinning and users, but not their
    /// size or content.
    pub async fn inventory_for(
        &self,
        request: &[String],
        matcher: &Matcher,
    ) -> Result<(Inventory, ReadStats), RuntimeError> {
        let start = Instant::now();
        let (records, containers, journals) = tokio::try_join!(
            self.list_images(),
            self.list_containers(),
            self.list_journals()
        )?;
        let mut stats = ReadStats {
            listed: start.elapsed(),
            ..ReadStats::default()
        };
        let recorded = recorded_ids(&records, matcher);
        let targets = distinct_targets(&records);
        let mut read: BTreeMap<String, Result<Selection, String>> = BTreeMap::new();
        let unknown: Vec<&String> = targets
            .keys()
            .filter(|k| !recorded.contains_key(*k))
            .collect();
        self.read_into(&unknown, &targets, matcher, &mut read, &mut stats)
            .await?;
        let assumed = assumed_inventory(&records, &containers, &journals, &read, &recorded);
        let confirmed = match inventory::records_to_verify(request, &assumed) {
            Some(deletable) => {
                let deletable: BTreeSet<String> = records
                    .iter()
                    .filter(|r| deletable.contains(&r.name))
                    .map(|r| target_key(&r.target))
                    .collect();
                let verify: Vec<&String> = targets
                    .keys()
                    .filter(|k| deletable.contains(*k) && !read.contains_key(*k))
                    .collect();
                self.read_into(&verify, &targets, matcher, &mut read, &mut stats)
                    .await?;
                let confirmed = verify.iter().all(|k| match &read[*k] {
                    Ok(s) => recorded.get(*k).map(String::as_str) == Some(s.id()),
                    Err(_) => false,
                });
                if !confirmed {
                    tracing::warn!(
                        "a sha256:<id> record disagrees with its content; reading every image"
                    );
                }
                confirmed
            }
            None => false,
        };
        if !confirmed {
            // A string that names no image (or several), or a recorded ID its content does
            // not give: decide on IDs read from content alone.
            stats.read_all = true;
            let rest: Vec<&String> = targets.keys().filter(|k| !read.contains_key(*k)).collect();
            self.read_into(&rest, &targets, matcher, &mut read, &mut stats)
                .await?;
        }
        stats.elapsed = start.elapsed();
        let inventory = assumed_inventory(&records, &containers, &journals, &read, &recorded);
        Ok((inventory, stats))
    }

    /// Selects the targets named by `keys` (keys of `targets`) into `read`.
    async fn read_into(
        &self,
        keys: &[&String],
        targets: &BTreeMap<String, &Descriptor>,
        matcher: &Matcher,
        read: &mut BTreeMap<String, Result<Selection, String>>,
        stats: &mut ReadStats,
    ) -> Result<(), RuntimeError> {
        if keys.is_empty() {
            return Ok(());
        }
        let descriptors: Vec<&Descriptor> = keys.iter().map(|k| targets[*k]).collect();
        let (selections, blobs) = self.select_targets(&descriptors, matcher).await?;
        stats.targets_read += keys.len();
        stats.blobs_read += blobs;
        for (k, s) in keys.iter().zip(selections) {
            read.insert((*k).clone(), s);
        }
        Ok(())
    }

    /// Sets `key=value` on `record` as listed (other labels are kept), in one call. A record
    /// that is already gone is not an error.
    pub async fn label_record(
        &self,
        record: &ImageRecord,
        key: &str,
        value: &str,
    ) -> Result<(), RuntimeError> {
        // containerd dereferences the request's target even when the mask names only a label
        // (a request without one crashes some versions), so send the record's own target.
        let t = &record.target;
        let image = Image {
            name: record.name.clone(),
            labels: HashMap::from([(key.to_string(), value.to_string())]),
            target: Some(containerd_client::types::Descriptor {
                media_type: t.media_type.clone(),
                digest: t.digest.clone(),
                size: t.size,
                annotations: t.annotations.clone().into_iter().collect(),
            }),
            ..Default::default()
        };
        let mask = prost_types::FieldMask {
            paths: vec![format!("labels.{key}")],
        };
        match ImagesClient::new(self.channel.clone())
            .update(self.req(UpdateImageRequest {
                image: Some(image),
                update_mask: Some(mask),
                source_date_epoch: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(call_err(format!("label image {}", record.name))(s)),
        }
    }

    /// Deletes the image record `name`; with `sync`, waits for containerd's garbage collection
    /// to free what the delete released. Returns whether the record existed (not found is
    /// success: someone else removed it).
    pub async fn delete_image(&self, name: &str, sync: bool) -> Result<bool, RuntimeError> {
        match ImagesClient::new(self.channel.clone())
            .delete(self.req(DeleteImageRequest {
                name: name.to_string(),
                sync,
                target: None,
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(call_err(format!("delete image {name}"))(s)),
        }
    }

    /// The namespace's removal journals (leases labelled [`crate::core::inventory::JOURNAL_LABEL`]).
    pub async fn list_journals(&self) -> Result<Vec<Journal>, RuntimeError> {
        use containerd_client::services::v1::ListRequest;
        let leases = LeasesClient::new(self.channel.clone())
            .list(self.req(ListRequest { filters: vec![] }))
            .await
            .map_err(call_err("list leases"))?
            .into_inner()
            .leases;
        Ok(leases
            .iter()
            .filter_map(|l| Journal::from_labels(&l.id, &l.labels))
            .collect())
    }

    /// Writes a removal journal listing `names` (one lease, one write); returns its ID.
    pub async fn create_journal(&self, names: &[String]) -> Result<String, RuntimeError> {
        use containerd_client::services::v1::CreateRequest;
        let id = format!(
            "imagegc-journal-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        LeasesClient::new(self.channel.clone())
            .create(self.req(CreateRequest {
                id: id.clone(),
                labels: Journal::labels(names).into_iter().collect(),
            }))
            .await
            .map_err(call_err("create removal journal (lease)"))?;
        Ok(id)
    }

    /// Deletes the lease `id` (a journal); already gone is not an error.
    pub async fn delete_lease(&self, id: &str) -> Result<(), RuntimeError> {
        use containerd_client::services::v1::DeleteRequest;
        match LeasesClient::new(self.channel.clone())
            .delete(self.req(DeleteRequest {
                id: id.to_string(),
                sync: false,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(call_err(format!("delete lease {id}"))(s)),
        }
    }

    /// Runs containerd's garbage collection and waits for it, through a throw-away lease
    /// deleted synchronously (for a batch whose last delete found nothing to delete).
    pub async fn collect_garbage(&self) -> Result<(), RuntimeError> {
        use containerd_client::services::v1::{CreateRequest, DeleteRequest};
        let mut leases = LeasesClient::new(self.channel.clone());
        let lease = leases
            .create(self.req(CreateRequest {
                id: String::new(),
                labels: HashMap::new(),
            }))
            .await
            .map_err(call_err("create lease"))?
            .into_inner()
            .lease
            .map(|l| l.id)
            .unwrap_or_default();
        leases
            .delete(self.req(DeleteRequest {
                id: lease,
                sync: true,
            }))
            .await
            .map_err(call_err("delete lease (garbage collection)"))?;
        Ok(())
    }
}

/// The key of a target: a selection depends on the whole descriptor.
fn target_key(d: &Descriptor) -> String {
    serde_json::to_string(d).unwrap_or_default()
}

/// Each record's ID as the CRI plugin's `sha256:<id>` records claim it, keyed by target; the
/// plugin records IDs for its default platform only, so none for another platform.
fn recorded_ids(records: &[ImageRecord], matcher: &Matcher) -> BTreeMap<String, String> {
    match *matcher == Matcher::only(Platform::host()) {
        true => inventory::cri_recorded_ids(records, target_key),
        false => BTreeMap::new(),
    }
}

/// The distinct targets of `records`, keyed by [`target_key`].
fn distinct_targets(records: &[ImageRecord]) -> BTreeMap<String, &Descriptor> {
    let mut targets = BTreeMap::new();
    for record in records {
        targets
            .entry(target_key(&record.target))
            .or_insert(&record.target);
    }
    targets
}

/// The inventory of `records`, each selected as `read` says for its target, else as the CRI
/// plugin `recorded` it (an unread selection), else skipped as unread.
fn assumed_inventory(
    records: &[ImageRecord],
    containers: &[ContainerRecord],
    journals: &[Journal],
    read: &BTreeMap<String, Result<Selection, String>>,
    recorded: &BTreeMap<String, String>,
) -> Inventory {
    let selections: BTreeMap<String, Result<Selection, String>> = records
        .iter()
        .filter_map(|r| {
            let k = target_key(&r.target);
            let s = match (read.get(&k), recorded.get(&k)) {
                (Some(s), _) => s.clone(),
                (None, Some(id)) => Ok(inventory::unread_selection(&r.target, id)),
                (None, None) => return None,
            };
            Some((r.name.clone(), s))
        })
        .collect();
    let mut inventory = Inventory::build(records, &selections, containers);
    inventory.add_journals(journals.to_vec(), records);
    inventory
}

fn image_record(image: Image) -> Option<ImageRecord> {
    let target = image.target?;
    Some(ImageRecord {
        name: image.name,
        target: Descriptor {
            media_type: target.media_type,
            digest: target.digest,
            size: target.size,
            platform: None,
            annotations: target.annotations.into_iter().collect(),
        },
        labels: image.labels.into_iter().collect(),
        created: image.created_at.map(|t| t.seconds),
    })
}

/// The `ImageRef` in CRI's container metadata extension (JSON
/// `{"Version":"v1","Metadata":{"ImageRef":"sha256:…",…}}`).
fn cri_image_ref(value: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Versioned {
        #[serde(rename = "Metadata")]
        metadata: Meta,
    }
    #[derive(Deserialize)]
    struct Meta {
        #[serde(rename = "ImageRef", default)]
        image_ref: String,
    }
    let v: Versioned = serde_json::from_slice(value).ok()?;
    (!v.metadata.image_ref.is_empty()).then_some(v.metadata.image_ref)
}

/// containerd filters selecting the items whose `field` equals one of `values` (containerd
/// ORs the filters of a list), or `None` past [`MAX_FILTERS`] values, where a plain listing is
/// cheaper. Each value is quoted, so it matches only itself whatever characters it holds.
fn any_equal(field: &str, values: &BTreeSet<String>) -> Option<Vec<String>> {
    (values.len() <= MAX_FILTERS).then(|| {
        values
            .iter()
            .map(|v| format!("{field}=={}", quoted(v)))
            .collect()
    })
}

/// `value` as a double-quoted string in Go's syntax, which containerd's filter parser reads.
/// Everything outside printable ASCII is escaped: containerd's scanner refuses some characters
/// written out (U+FFFD, which it takes for a decoding error), never their escapes.
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_name_each_value_quoted_and_give_way_to_a_plain_listing_past_the_limit() {
        let values: BTreeSet<String> = [
            "docker.io/library/nginx:1.27",
            "sha256:abc",
            "odd\"name\\with\nbreaks",
            "a\u{fffd}b",
            "x\u{1f600}",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            any_equal("name", &values),
            Some(vec![
                r#"name=="a\ufffdb""#.to_string(),
                r#"name=="docker.io/library/nginx:1.27""#.to_string(),
                r#"name=="odd\"name\\with\u000abreaks""#.to_string(),
                r#"name=="sha256:abc""#.to_string(),
                r#"name=="x\U0001f600""#.to_string(),
            ])
        );
        let many: BTreeSet<String> = (0..=MAX_FILTERS).map(|i| format!("sha256:{i}")).collect();
        assert_eq!(any_equal("digest", &many), None);
        let most: BTreeSet<String> = many.into_iter().skip(1).collect();
        assert_eq!(
            any_equal("digest", &most).map(|f| f.len()),
            Some(MAX_FILTERS)
        );
    }

    #[test]
    fn namespaces() {
        for ok in ["k8s.io", "default", "moby", "a-b_c.d", "x1"] {
            assert!(valid_namespace(ok), "{ok}");
        }
        for bad in [
            "",
            "k8s..io",
            ".k8s",
            "k8s.",
            "a b",
            "ü",
            "a/b",
            &"x".repeat(77),
        ] {
            assert!(!valid_namespace(bad), "{bad}");
        }
    }

    #[test]
    fn image_ref_from_cri_metadata() {
        let v = br#"{"Version":"v1","Metadata":{"ID":"c1","ImageRef":"sha256:abc"}}"#;
        assert_eq!(cri_image_ref(v).as_deref(), Some("sha256:abc"));
        assert_eq!(cri_image_ref(br#"{"Version":"v1","Metadata":{}}"#), None);
        assert_eq!(cri_image_ref(b"not json"), None);
    }
}
