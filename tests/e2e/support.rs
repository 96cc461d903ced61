//! What every end-to-end test shares: one tokio runtime, fresh test beds, and ways to look at a
//! node's containerd (its records, its content, the CRI plugin's view).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, ListImagesRequest, RemoveImageRequest};
use libtest_mimic::{Failed, Trial};
use testbed::image::{self, BuiltImage};
use testbed::{Flavor, Options, TestBed};

/// The namespace the CRI plugin uses.
pub const NS: &str = "k8s.io";

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
});

/// A trial running `test` on the shared runtime; an error or a panic fails it.
pub fn trial<F, Fut>(name: impl Into<String>, test: F) -> Trial
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    Trial::test(name, move || {
        RUNTIME
            .block_on(test())
            .map_err(|e| Failed::from(format!("{e:#}")))
    })
}

/// Both containerd flavors: 2.x (built from its Go module) and Debian's 1.6.
pub const FLAVORS: [Flavor; 2] = [Flavor::V2, Flavor::Debian16];

/// A bed of `nodes` fresh containerd daemons of `flavor`, without an API server.
pub async fn nodes(flavor: Flavor, nodes: usize) -> Result<TestBed> {
    TestBed::start(&Options {
        nodes,
        flavor,
        cluster: false,
    })
    .await
}

/// Owned strings.
pub fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Imports `image` under `names` into `socket`'s `k8s.io` namespace.
pub async fn import(socket: &Path, img: &BuiltImage, names: &[&str]) -> Result<()> {
    image::import(socket, NS, img, &strings(names), &HashMap::new()).await
}

/// Imports `image` under `names` with `labels`.
pub async fn import_labelled(
    socket: &Path,
    img: &BuiltImage,
    names: &[&str],
    labels: &[(&str, &str)],
) -> Result<()> {
    let labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    image::import(socket, NS, img, &strings(names), &labels).await
}

/// CRI's images as `ListImages` reports them: id → repo tags ∪ repo digests.
pub async fn cri_images(socket: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let channel = containerd_client::connect(socket).await?;
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

/// Waits until the CRI plugin has adopted every image imported so far: every record name that is
/// a reference appears among CRI's tags or digests, and every id in `ids` has its `sha256:<id>`
/// record (the plugin creates those asynchronously, after it sees an image event).
pub async fn wait_cri_synced(socket: &Path, ids: &[String], refs: &[&str]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let cri = cri_images(socket).await?;
        let records = image::image_names(socket, NS).await?;
        let known: BTreeSet<&String> = cri.values().flatten().collect();
        let refs_ok = refs.iter().all(|r| known.contains(&r.to_string()));
        let ids_ok = ids
            .iter()
            .all(|id| cri.contains_key(id) && records.contains(id));
        if refs_ok && ids_ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "CRI never caught up: wanted ids {ids:?} and refs {refs:?}; CRI lists {cri:?}; records {records:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// Removes `image` through the CRI API, as kubelet, crictl and Eraser do. Errors (ambiguous or
/// invalid strings) are returned as text: the caller decides whether they matter.
pub async fn cri_remove(socket: &Path, image: &str) -> Result<Result<(), String>> {
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

/// Runs the `imagegc` binary with `args`; returns (exit code, stdout, stderr).
pub fn imagegc(args: &[&str]) -> Result<(i32, String, String)> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imagegc"))
        .args(args)
        .env_remove("IMAGEGC_SOCKET")
        .env_remove("IMAGEGC_NAMESPACE")
        .output()
        .context("running imagegc")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
