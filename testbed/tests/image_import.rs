//! Imports built test images into a real containerd (Debian's 1.6 by default, or
//! `IMAGEGC_CONTAINERD`) and checks the image store, CRI, and containerd's GC see them as expected.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{ListImagesRequest, VersionRequest};
use testbed::image::{self, ImageBuilder};

const NS: &str = "k8s.io";

/// A containerd started for this test; dropping it kills the daemon (by PID) and removes its
/// directory, on every exit path including panics.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    // Dropped after `drop` has killed the daemon.
    _dir: tempfile::TempDir,
}

impl Daemon {
    async fn start() -> Result<Daemon> {
        let dir = tempfile::Builder::new()
            .prefix("imagegc-image-import-")
            .tempdir()?;
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{sock}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "native"
[plugins."io.containerd.grpc.v1.cri".cni]
  conf_dir = "{cni}"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            opt = d.join("opt").display(),
            cni = d.join("cni").display(),
        );
        std::fs::write(d.join("config.toml"), config)?;
        let log = d.join("containerd.log");
        let bin = std::env::var("IMAGEGC_CONTAINERD").unwrap_or_else(|_| "containerd".into());
        let child = Command::new(bin)
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawning containerd")?;
        let daemon = Daemon {
            child,
            socket,
            log,
            _dir: dir,
        };
        daemon.wait_ready().await?;
        Ok(daemon)
    }

    /// Waits until both containerd and its CRI plugin answer on the socket.
    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = async {
                let channel = containerd_client::connect(&self.socket).await?;
                let req = VersionRequest {
                    version: "v1".into(),
                };
                RuntimeServiceClient::new(channel).version(req).await?;
                anyhow::Ok(())
            };
            match ready.await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(
                        e.context(format!("containerd not ready; log:\n{}", self.log_text()))
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("containerd log:\n{}", self.log_text());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CRI's image ids and their repo tags, as `ListImages` reports them.
async fn cri_images(socket: &Path) -> Result<HashMap<String, BTreeSet<String>>> {
    let channel = containerd_client::connect(socket).await?;
    let resp = ImageServiceClient::new(channel)
        .list_images(ListImagesRequest { filter: None })
        .await?;
    Ok(resp
        .into_inner()
        .images
        .into_iter()
        .map(|i| (i.id, i.repo_tags.into_iter().collect()))
        .collect())
}

/// Polls CRI until it lists `id` with all of `tags` (it adopts imported images asynchronously).
async fn wait_cri_image(socket: &Path, id: &str, tags: &[String]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let images = cri_images(socket).await?;
        if images
            .get(id)
            .is_some_and(|t| tags.iter().all(|tag| t.contains(tag)))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("CRI never listed {id} with {tags:?}; it lists {images:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn builder_is_deterministic_and_shares_bases() {
    let a = ImageBuilder::new("a")
        .shared_base("base", 4096)
        .layer_sizes(&[1000, 2000])
        .build();
    let a2 = ImageBuilder::new("a")
        .shared_base("base", 4096)
        .layer_sizes(&[1000, 2000])
        .build();
    let b = ImageBuilder::new("b")
        .shared_base("base", 4096)
        .layer_sizes(&[1000])
        .build();
    let host = image::host_platform();
    assert_eq!(a.target, a2.target);
    assert_eq!(a.digests(), a2.digests());
    assert_ne!(a.id(), b.id());
    assert_eq!(
        a.layer_digests[&host][0], b.layer_digests[&host][0],
        "shared base layer"
    );
    assert_ne!(a.layer_digests[&host][1], b.layer_digests[&host][1]);
    assert_eq!(a.blobs.len(), 3 + 1 + 1);
    let old = ImageBuilder::new("a")
        .shared_base("base", 4096)
        .layer_sizes(&[1000, 2000]);
    let old = old
        .created_at(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000))
        .build();
    assert_ne!(old.id(), a.id(), "created time changes the id");
    assert_eq!(old.layer_digests, a.layer_digests);
    let config = old.blobs.iter().find(|b| b.digest == old.id()).unwrap();
    let config: serde_json::Value = serde_json::from_slice(&config.bytes).unwrap();
    assert_eq!(config["created"], "2001-09-09T01:46:40Z");

    let multi = ImageBuilder::new("m")
        .platforms(&["linux/amd64", "linux/arm64", "linux/arm/v7"])
        .build();
    assert_eq!(
        multi.target.media_type,
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(multi.config_digests.len(), 3);
    let index = multi.blobs.last().unwrap();
    assert_eq!(index.digest, multi.target.digest);
    let index: serde_json::Value = serde_json::from_slice(&index.bytes).unwrap();
    assert_eq!(index["manifests"][2]["platform"]["variant"], "v7");

    // A layer is a tar with one file of the requested size.
    let tar = image::layer_tar("x", 5000);
    let mut archive = tar::Archive::new(tar.as_slice());
    let sizes: Vec<u64> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().header().size().unwrap())
        .collect();
    assert_eq!(sizes, vec![5000]);
}

#[tokio::test]
async fn import_into_containerd() -> Result<()> {
    let daemon = Daemon::start().await?;
    let socket = daemon.socket();
    let host = image::host_platform();
    let no_labels = HashMap::new();

    // A single-platform image and a multi-platform image sharing its base layer.
    let single = ImageBuilder::new("single")
        .shared_base("base", 8192)
        .layer_sizes(&[3000, 2_500_000])
        .build();
    let single_names = names(&["docker.io/testbed/single:v1"]);
    image::import(socket, NS, &single, &single_names, &no_labels).await?;

    let multi = ImageBuilder::new("multi")
        .shared_base("base", 8192)
        .platforms(&[host.as_str(), "linux/arm64", "linux/arm/v7"])
        .build();
    let multi_names = names(&[
        "docker.io/testbed/multi:v1",
        "docker.io/testbed/multi:v2",
        "example.com/multi:latest",
    ]);
    let pinned = HashMap::from([("io.cri-containerd.pinned".to_string(), "pinned".to_string())]);
    image::import(socket, NS, &multi, &multi_names, &pinned).await?;
    // Importing again (existing content, existing records) succeeds.
    image::import(socket, NS, &multi, &multi_names, &pinned).await?;

    // A Docker media-type image.
    let docker = ImageBuilder::new("docker").docker().build();
    let docker_names = names(&["docker.io/testbed/docker:v1"]);
    image::import(socket, NS, &docker, &docker_names, &no_labels).await?;

    let listed = image::image_names(socket, NS).await?;
    for name in single_names.iter().chain(&multi_names).chain(&docker_names) {
        assert!(listed.contains(name), "{name} missing from {listed:?}");
    }
    let content = image::content_digests(socket, NS).await?;
    assert!(content.is_superset(&single.digests()));
    assert!(content.is_superset(&multi.digests()));
    let shared = &single.layer_digests[&host][0];
    assert_eq!(shared, &multi.layer_digests[&host][0]);
    let manifest = &multi.manifest_digests[&host];
    let labels = image::content_labels(socket, NS, manifest).await?;
    assert_eq!(labels["containerd.io/gc.ref.content.l.0"], *shared);
    assert_eq!(labels["containerd.io/gc.ref.content.config"], multi.id());

    // CRI adopts the images (creating `sha256:<id>` records) with the config digest as id.
    wait_cri_image(socket, &single.id(), &single_names).await?;
    wait_cri_image(socket, &multi.id(), &multi_names).await?;
    wait_cri_image(socket, &docker.id(), &docker_names).await?;

    // Content survives a forced GC.
    image::force_gc(socket, NS).await?;
    let content = image::content_digests(socket, NS).await?;
    assert!(content.is_superset(&single.digests()));
    assert!(content.is_superset(&multi.digests()));
    assert!(content.is_superset(&docker.digests()));

    // Deleting every record of the single image (incl. CRI's id record) frees its own content
    // but not the base layer the multi-platform image still uses.
    let listed = image::image_names(socket, NS).await?;
    let id_record = single.id();
    assert!(
        listed.contains(&id_record),
        "CRI id record missing from {listed:?}"
    );
    for name in &single_names {
        image::delete_image(socket, NS, name, false).await?;
    }
    image::delete_image(socket, NS, &id_record, true).await?;
    let content = image::content_digests(socket, NS).await?;
    assert!(content.contains(shared), "shared base layer was collected");
    let own: BTreeSet<String> = single
        .digests()
        .into_iter()
        .filter(|d| d != shared)
        .collect();
    assert!(
        content.is_disjoint(&own),
        "content left: {:?}",
        content.intersection(&own).collect::<Vec<_>>()
    );
    assert!(content.is_superset(&multi.digests()));

    // Container records referring to an image.
    image::create_container(socket, NS, "c1", &multi_names[0], Some(&multi.id())).await?;
    image::create_container(socket, NS, "c2", &multi_names[0], None).await?;
    image::delete_container(socket, NS, "c1").await?;
    image::delete_container(socket, NS, "c2").await?;

    // Deleting everything with a sync delete empties the content store.
    let all = image::image_names(socket, NS).await?;
    let last = all.iter().next_back().cloned().context("no images left")?;
    for name in all.iter().filter(|n| **n != last) {
        image::delete_image(socket, NS, name, false).await?;
    }
    image::delete_image(socket, NS, &last, true).await?;
    assert_eq!(image::image_names(socket, NS).await?, BTreeSet::new());
    assert_eq!(image::content_digests(socket, NS).await?, BTreeSet::new());
    Ok(())
}
