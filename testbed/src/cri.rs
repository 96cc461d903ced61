//! The CRI plugin's view of a node, and CRI `RemoveImage`: the oracle imagegc is judged against.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, ListImagesRequest, RemoveImageRequest};
use tonic::transport::Channel;

use crate::image;

/// The namespace the CRI plugin uses.
pub const NS: &str = "k8s.io";

/// CRI's images as `ListImages` reports them: id → repo tags ∪ repo digests.
pub async fn images(socket: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    list(containerd_client::connect(socket).await?).await
}

async fn list(channel: Channel) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let resp = ImageServiceClient::new(channel)
        .list_images(ListImagesRequest { filter: None })
        .await
        .context("CRI ListImages")?;
    Ok(resp
        .into_inner()
        .images
        .into_iter()
        .map(|i| {
            (
                i.id,
                i.repo_tags.into_iter().chain(i.repo_digests).collect(),
            )
        })
        .collect())
}

/// Waits until the CRI plugin has adopted the images imported so far: every name in `refs`
/// appears among CRI's tags or digests, and every id in `ids` is listed and has its
/// `sha256:<id>` record (the plugin creates those asynchronously, after an image event).
/// CRI `RemoveImage` resolves through that cache, so a test or timing must wait for it.
pub async fn wait_synced(socket: &Path, ids: &[String], refs: &[&str]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let channel = containerd_client::connect(socket).await?;
    loop {
        let cri = list(channel.clone()).await?;
        let records = image::image_names(socket, NS).await?;
        let known: BTreeSet<&str> = cri.values().flatten().map(String::as_str).collect();
        let refs_ok = refs.iter().all(|r| known.contains(r));
        let ids_ok = ids
            .iter()
            .all(|id| cri.contains_key(id) && records.contains(id));
        if refs_ok && ids_ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "CRI on {} never caught up: wanted ids {ids:?} and refs {refs:?}; CRI lists {cri:?}; records {records:?}",
                socket.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes `image` through CRI `RemoveImage`, as kubelet, crictl and Eraser do. CRI's own
/// errors (an ambiguous short ID, say) come back as the inner `Err`: part of its behaviour.
pub async fn remove(socket: &Path, image: &str) -> Result<Result<(), String>> {
    let channel = containerd_client::connect(socket).await?;
    let req = RemoveImageRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
    };
    Ok(ImageServiceClient::new(channel)
        .remove_image(req)
        .await
        .map(|_| ())
        .map_err(|s| s.message().to_string()))
}

/// What a node's containerd holds: image record names and content digests, per namespace.
#[derive(Debug, PartialEq, Eq)]
pub struct State {
    /// Image record names per namespace.
    pub records: BTreeMap<String, BTreeSet<String>>,
    /// Content digests per namespace.
    pub content: BTreeMap<String, BTreeSet<String>>,
}

/// Reads `namespaces` of `socket`.
pub async fn state(socket: &Path, namespaces: &[&str]) -> Result<State> {
    let mut s = State {
        records: BTreeMap::new(),
        content: BTreeMap::new(),
    };
    for ns in namespaces {
        s.records
            .insert(ns.to_string(), image::image_names(socket, ns).await?);
        s.content
            .insert(ns.to_string(), image::content_digests(socket, ns).await?);
    }
    Ok(s)
}
