//! The test bed itself: containerd daemons of both flavors, the image builder, the API server
//! with ServiceAccount tokens, and teardown on every exit path.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use k8s_cri::v1::VersionRequest;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use libtest_mimic::Trial;
use testbed::image::{self, ImageBuilder};
use testbed::{Flavor, Options, TestBed};

use crate::support::{self, FLAVORS, NS, trial};

/// PIDs of live processes whose command line names `dir`.
fn processes_under(dir: &Path) -> Vec<u32> {
    let dir = dir.to_string_lossy().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&dir) {
            pids.push(pid);
        }
    }
    pids
}

async fn nodes_serve_cri(flavor: Flavor) -> Result<()> {
    let bed = support::nodes(flavor, 3).await?;
    let dir = bed.dir().to_path_buf();
    let sockets: BTreeSet<&PathBuf> = bed.nodes.iter().map(|n| &n.socket).collect();
    ensure!(sockets.len() == 3, "nodes share sockets: {sockets:?}");
    for node in &bed.nodes {
        let channel = containerd_client::connect(&node.socket).await?;
        let v = RuntimeServiceClient::new(channel)
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .with_context(|| format!("CRI Version on {}", node.node))?
            .into_inner();
        let want = match flavor {
            Flavor::V2 => "2.",
            Flavor::Debian16 => "1.6.",
        };
        ensure!(
            v.runtime_version.starts_with(want),
            "{} runs containerd {}, wanted {want}*",
            node.node,
            v.runtime_version
        );
    }
    let pids = processes_under(&dir);
    ensure!(
        pids.len() >= 3,
        "expected 3 daemons under {}, found {pids:?}",
        dir.display()
    );
    drop(bed);
    ensure!(
        processes_under(&dir).is_empty(),
        "processes left after drop"
    );
    ensure!(!dir.exists(), "{} left after drop", dir.display());
    Ok(())
}

fn builder_is_deterministic() -> Result<()> {
    let a = ImageBuilder::new("a")
        .shared_base("base", 4096)
        .layer_sizes(&[1000, 2000]);
    let (a1, a2) = (a.clone().build(), a.build());
    let b = ImageBuilder::new("b").shared_base("base", 4096).build();
    let host = image::host_platform();
    ensure!(
        a1.target == a2.target && a1.digests() == a2.digests(),
        "same seed, different image"
    );
    ensure!(a1.id() != b.id(), "different seeds, same id");
    ensure!(
        a1.layer_digests[&host][0] == b.layer_digests[&host][0],
        "base layer not shared"
    );
    ensure!(
        a1.blobs.len() == 5,
        "3 layers + config + manifest, got {}",
        a1.blobs.len()
    );

    let multi = ImageBuilder::new("m")
        .platforms(&["linux/amd64", "linux/arm64", "linux/arm/v7"])
        .build();
    ensure!(multi.target.media_type == "application/vnd.oci.image.index.v1+json");
    ensure!(multi.config_digests.len() == 3);
    let index: serde_json::Value = serde_json::from_slice(&multi.blobs.last().unwrap().bytes)?;
    ensure!(
        index["manifests"][2]["platform"]["variant"] == "v7",
        "{index}"
    );

    // Sizes are controllable: a layer is a tar with one file of the requested size.
    let tar = image::layer_tar("x", 5000);
    let sizes: Vec<u64> = tar::Archive::new(tar.as_slice())
        .entries()?
        .map(|e| e.map(|e| e.header().size().unwrap_or(0)))
        .collect::<std::io::Result<_>>()?;
    ensure!(sizes == vec![5000], "{sizes:?}");
    Ok(())
}

async fn imports_every_shape(flavor: Flavor) -> Result<()> {
    let bed = support::nodes(flavor, 1).await?;
    let socket = &bed.nodes[0].socket;
    let host = image::host_platform();
    let single = ImageBuilder::new("single")
        .shared_base("base", 8192)
        .layer_sizes(&[3000, 2_500_000])
        .build();
    let multi = ImageBuilder::new("multi")
        .shared_base("base", 8192)
        .platforms(&[host.as_str(), "linux/arm64", "linux/arm/v7"])
        .build();
    let docker = ImageBuilder::new("docker").docker().build();
    let digest_name = format!(
        "docker.io/testbed/single@{}",
        single.manifest_digests[&host]
    );
    let single_names = ["docker.io/testbed/single:v1", digest_name.as_str()];
    let multi_names = [
        "docker.io/testbed/multi:v1",
        "docker.io/testbed/multi:v2",
        "example.com/multi:latest",
    ];
    support::import(socket, &single, &single_names).await?;
    support::import(socket, &multi, &multi_names).await?;
    support::import(socket, &multi, &multi_names).await?; // importing twice is fine
    support::import(socket, &docker, &["docker.io/testbed/docker:v1"]).await?;

    let all_names: Vec<&str> = single_names.iter().chain(&multi_names).copied().collect();
    testbed::cri::wait_synced(socket, &[single.id(), multi.id(), docker.id()], &all_names).await?;
    let cri = testbed::cri::images(socket).await?;
    ensure!(cri.len() == 3, "CRI lists {cri:?}");
    // Content survives a garbage collection (the GC labels hold it) ...
    image::force_gc(socket, NS).await?;
    let content = image::content_digests(socket, NS).await?;
    for img in [&single, &multi, &docker] {
        ensure!(content.is_superset(&img.digests()), "content collected");
    }
    let labels = image::content_labels(socket, NS, &multi.manifest_digests[&host]).await?;
    ensure!(
        labels["containerd.io/gc.ref.content.config"] == multi.id(),
        "{labels:?}"
    );
    // ... and the CRI plugin sees the layer sizes we asked for.
    let channel = containerd_client::connect(socket).await?;
    let listed = k8s_cri::v1::image_service_client::ImageServiceClient::new(channel)
        .list_images(k8s_cri::v1::ListImagesRequest { filter: None })
        .await?
        .into_inner()
        .images;
    let big = listed
        .iter()
        .find(|i| i.id == single.id())
        .context("single")?;
    ensure!(big.size >= 2_500_000, "size {}", big.size);
    Ok(())
}

fn group_version_kind(crd: &CustomResourceDefinition) -> GroupVersionKind {
    GroupVersionKind::gvk(
        &crd.spec.group,
        &crd.spec.versions[0].name,
        &crd.spec.names.kind,
    )
}

async fn api_server_with_rbac_and_tokens() -> Result<()> {
    let bed = TestBed::start(&Options {
        nodes: 0,
        flavor: Flavor::V2,
        cluster: true,
        real_node: false,
    })
    .await?;
    let cluster = bed.cluster()?;
    let admin = cluster.admin_client().await?;
    let version = admin.apiserver_version().await?;
    let minor: u32 = version.minor.trim_end_matches('+').parse()?;
    ensure!(
        version.major == "1" && minor >= 34,
        "API server {version:?}"
    );

    // A CRD with selectableFields, served and filterable by that field.
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.testbed.imagegc.dev"},
        "spec": {
            "group": "testbed.imagegc.dev",
            "scope": "Cluster",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "selectableFields": [{"jsonPath": ".spec.node"}],
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"node": {"type": "string"}}}}}}
            }]
        }
    }))?;
    let crds = Api::<CustomResourceDefinition>::all(admin.clone());
    crds.create(&PostParams::default(), &crd).await?;
    let resource = ApiResource::from_gvk_with_plural(&group_version_kind(&crd), "widgets");
    let widgets = Api::<DynamicObject>::all_with(admin.clone(), &resource);
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, node) in [("w1", "node-0"), ("w2", "node-1")] {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "testbed.imagegc.dev/v1", "kind": "Widget",
            "metadata": {"name": name}, "spec": {"node": node}
        }))?;
        loop {
            match widgets.create(&PostParams::default(), &obj).await {
                Ok(_) => break,
                // The CRD takes a moment to be established.
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let selected = widgets
        .list(&ListParams::default().fields("spec.node=node-1"))
        .await?;
    let names: Vec<String> = selected
        .items
        .iter()
        .filter_map(|o| o.metadata.name.clone())
        .collect();
    ensure!(
        names == vec!["w2".to_string()],
        "field selector returned {names:?}"
    );

    // A ServiceAccount acts with its own RBAC only.
    cluster
        .ensure_service_account("imagegc-system", "tester")
        .await?;
    let sa = cluster
        .service_account_client("imagegc-system", "tester")
        .await?;
    let denied = Api::<Node>::all(sa.clone())
        .list(&ListParams::default())
        .await;
    match denied {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => bail!("listing nodes without RBAC gave {other:?}"),
    }
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "tester"},
        "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}]
    }))?;
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await?;
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "tester"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tester"},
        "subjects": [{"kind": "ServiceAccount", "name": "tester", "namespace": "imagegc-system"}]
    }))?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = Api::<Node>::all(sa.clone())
        .list(&ListParams::default())
        .await
    {
        ensure!(Instant::now() < deadline, "still denied after binding: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A token bound to a pod carries the pod's node name, as a kubelet-mounted token does.
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "agent-x", "namespace": "imagegc-system"},
        "spec": {"nodeName": "node-7", "serviceAccountName": "tester",
                 "automountServiceAccountToken": false,
                 "containers": [{"name": "agent", "image": "imagegc:test"}]}
    }))?;
    let pod = Api::<Pod>::namespaced(admin.clone(), "imagegc-system")
        .create(&PostParams::default(), &pod)
        .await?;
    let uid = pod.metadata.uid.context("pod uid")?;
    let token = cluster
        .service_account_token("imagegc-system", "tester", Some(("agent-x", &uid)))
        .await?;
    let payload = token.split('.').nth(1).context("JWT payload")?;
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?)?;
    ensure!(
        claims["kubernetes.io"]["node"]["name"] == "node-7",
        "claims {claims}"
    );
    Ok(())
}

/// `hack/testbed up`, then SIGINT to the bed process: every daemon stops, the directory goes.
async fn shell_bed_cleans_up_on_sigint() -> Result<()> {
    let state = tempfile::tempdir()?;
    let script = testbed::tools::repo_root().join("hack/testbed");
    let up = std::process::Command::new("bash")
        .arg(&script)
        .args(["up", "--nodes", "1"])
        .env("IMAGEGC_TESTBED_STATE", state.path())
        .output()?;
    ensure!(
        up.status.success(),
        "hack/testbed up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let env = std::fs::read_to_string(state.path().join("env"))?;
    let pid: i32 = std::fs::read_to_string(state.path().join("pid"))?
        .trim()
        .parse()?;
    let dir = env
        .lines()
        .find_map(|l| l.strip_prefix("export IMAGEGC_TESTBED_DIR_ACTIVE="))
        .context("bed dir in env")?;
    let dir = PathBuf::from(dir);
    let started = processes_under(&dir);
    let result = async {
        ensure!(
            env.contains("KUBECONFIG=") && env.contains("NODE0_SOCKET="),
            "{env}"
        );
        ensure!(
            started.len() >= 3,
            "containerd, etcd, kube-apiserver expected: {started:?}"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGINT,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !processes_under(&dir).is_empty() || dir.exists() {
            ensure!(
                Instant::now() < deadline,
                "after SIGINT: processes {:?}, dir exists: {}",
                processes_under(&dir),
                dir.exists()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = std::process::Command::new("bash")
            .arg(&script)
            .arg("down")
            .env("IMAGEGC_TESTBED_STATE", state.path())
            .status();
    }
    result
}

pub fn trials() -> Vec<Trial> {
    let mut out = vec![
        Trial::test("testbed::image_builder_is_deterministic", || {
            builder_is_deterministic().map_err(|e| format!("{e:#}").into())
        }),
        trial(
            "testbed::api_server_with_rbac_and_tokens",
            api_server_with_rbac_and_tokens,
        ),
        trial(
            "testbed::shell_bed_cleans_up_on_sigint",
            shell_bed_cleans_up_on_sigint,
        ),
    ];
    for flavor in FLAVORS {
        let f = flavor.label();
        out.push(trial(
            format!("testbed::{f}::three_nodes_serve_cri"),
            move || nodes_serve_cri(flavor),
        ));
        out.push(trial(
            format!("testbed::{f}::imports_every_image_shape"),
            move || imports_every_shape(flavor),
        ));
    }
    out
}
