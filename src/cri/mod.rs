//! The CRI shell, for CRI-O and any other CRI runtime: reads `ListImages` and
//! `ListContainers` into the core's plain types and removes images by ID through
//! `RemoveImage`. Everything that decides lives in [`crate::core`], exactly as for containerd.
//!
//! What CRI cannot give, and what this backend does instead:
//! - **No records, no labels.** First-seen and last-used are kept in this process's
//!   [`Memory`] (they survive reconnections, not restarts): after an agent restart every image
//!   counts as first seen then, so `unusedFor` and `olderThan` wait their full duration again.
//!   Missing data never makes an image look old.
//! - **No pull time.** CRI does not say when an image arrived; `olderThan` counts from the
//!   first time this process saw it.
//! - **No layers.** Sizes are the runtime's per-image figures (shared layers counted with each
//!   image); watermark runs cannot tell shared layers from exclusive ones.
//! - **No journal.** There is nothing to write one to; each image is one `RemoveImage` call by
//!   ID, which on containerd and CRI-O removes every name of the image at once.

mod execute;

pub use execute::{CONCURRENCY, execute};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ImageFsInfoRequest, ImageSpec, ListContainersRequest, ListImagesRequest, RemoveImageRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::core::inventory::{ContainerRecord, ImageRecord, Inventory, ListedImage};
use crate::core::manifest::Descriptor;
use crate::runtime::RuntimeError;

fn call_err(op: impl Into<String>) -> impl FnOnce(Status) -> RuntimeError {
    let op = format!("CRI {}", op.into());
    move |status| RuntimeError::Call {
        op,
        status: Box::new(status),
    }
}

/// What the CRI backend remembers of each image (by ID) in place of containerd's record
/// labels: first-seen and last-used, as `core::last_used` writes them.
#[derive(Debug, Default)]
pub struct Memory {
    labels: Mutex<HashMap<String, BTreeMap<String, String>>>,
}

impl Memory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeMap<String, String>>> {
        self.labels.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection to a CRI runtime.
#[derive(Clone)]
pub struct Runtime {
    channel: Channel,
    socket: PathBuf,
    memory: Arc<Memory>,
}

impl Runtime {
    /// Connects to `socket`; `memory` keeps first-seen and last-used across connections.
    pub async fn connect(socket: &Path, memory: Arc<Memory>) -> Result<Runtime, RuntimeError> {
        Ok(Runtime {
            channel: crate::runtime::channel(socket).await?,
            socket: socket.into(),
            memory,
        })
    }

    /// The socket this runtime is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Every image the runtime lists.
    pub async fn list_images(&self) -> Result<Vec<ListedImage>, RuntimeError> {
        let images = ImageServiceClient::new(self.channel.clone())
            .list_images(ListImagesRequest { filter: None })
            .await
            .map_err(call_err("ListImages"))?
            .into_inner()
            .images;
        Ok(images
            .into_iter()
            .map(|i| ListedImage {
                id: i.id,
                repo_tags: i.repo_tags,
                repo_digests: i.repo_digests,
                size: i64::try_from(i.size).unwrap_or(i64::MAX),
                pinned: i.pinned,
            })
            .collect())
    }

    /// Every container the runtime lists, running or not.
    pub async fn list_containers(&self) -> Result<Vec<ContainerRecord>, RuntimeError> {
        let containers = RuntimeServiceClient::new(self.channel.clone())
            .list_containers(ListContainersRequest { filter: None })
            .await
            .map_err(call_err("ListContainers"))?
            .into_inner()
            .containers;
        Ok(containers
            .into_iter()
            .map(|c| ContainerRecord {
                id: c.id,
                image: c.image.map(|i| i.image).unwrap_or_default(),
                image_ref: Some(c.image_ref).filter(|r| !r.is_empty()),
            })
            .collect())
    }

    /// The CRI view, and one made-up record per reference carrying what [`Memory`] holds for
    /// its image (so `core::last_used` and `core::policy` work unchanged). Images no longer
    /// listed are forgotten.
    pub async fn inventory_and_records(
        &self,
    ) -> Result<(Inventory, Vec<ImageRecord>), RuntimeError> {
        let (images, containers) = tokio::try_join!(self.list_images(), self.list_containers())?;
        let inventory = Inventory::from_cri(&images, &containers);
        let mut memory = self.memory.lock();
        memory.retain(|id, _| inventory.images.contains_key(id));
        let records = inventory
            .images
            .values()
            .flat_map(|image| {
                let labels = memory.get(&image.id).cloned().unwrap_or_default();
                image.references.iter().map(move |name| ImageRecord {
                    name: name.clone(),
                    target: Descriptor {
                        digest: image.id.clone(),
                        ..Descriptor::default()
                    },
                    labels: labels.clone(),
                    created: None,
                })
            })
            .collect();
        Ok((inventory, records))
    }

    /// Remembers `key=value` for the image of `record` (one of
    /// [`Runtime::inventory_and_records`]'s).
    pub fn remember(&self, record: &ImageRecord, key: &str, value: &str) {
        self.memory
            .lock()
            .entry(record.target.digest.clone())
            .or_default()
            .insert(key.to_string(), value.to_string());
    }

    /// The image filesystem's used bytes, as the runtime reports them (`ImageFsInfo`).
    pub async fn image_fs_used(&self) -> Result<i64, RuntimeError> {
        let info = ImageServiceClient::new(self.channel.clone())
            .image_fs_info(ImageFsInfoRequest {})
            .await
            .map_err(call_err("ImageFsInfo"))?
            .into_inner();
        Ok(info
            .image_filesystems
            .iter()
            .filter_map(|fs| fs.used_bytes.as_ref())
            .map(|b| i64::try_from(b.value).unwrap_or(i64::MAX))
            .sum())
    }

    /// `RemoveImage(image)`. Not found is success (CRI's own rule; some runtimes still say so
    /// with an error).
    pub async fn remove_image(&self, image: &str) -> Result<(), RuntimeError> {
        let request = RemoveImageRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
        };
        match ImageServiceClient::new(self.channel.clone())
            .remove_image(request)
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(call_err(format!("RemoveImage {image}"))(s)),
        }
    }
}
