//! The real node (`make e2e-node`): a kubelet, kube-controller-manager and kube-scheduler joined
//! to the bed's API server, containerd 2.x with runc and CNI, and imagegc installed the way its
//! README says, `helm install` of the unchanged chart with the image from `make image`
//! imported by `ctr`. Everything is driven as a user drives it: the kube client and kubectl
//! against the API server; containerd's CRI only to look.
//!
//! The node starts once per run of the suite (on the first `node::` test) and is shared; the
//! tests take turns. `IMAGEGC_IMAGE_ARCHIVE` and `IMAGEGC_IMAGE` name `make image`'s archive
//! and image; without them the suite packs the binary Cargo built for it the same way.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use imagegc::api::{ImagePrunePolicy, ImageRemoval, NodeImageReport, RemovalResult};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, ImageStatusRequest};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use libtest_mimic::Trial;
use testbed::image::{self as tbimage, BuiltImage, ImageBuilder, LayerFile};
use testbed::{Options, REAL_NODE_NAME, TestBed, wait_for};
use tokio::sync::{Mutex, OnceCell};

use crate::support::trial;

const RELEASE: &str = "imagegc";
const SYSTEM_NS: &str = "imagegc-system";
const AGENT_SELECTOR: &str = "app.kubernetes.io/component=agent";
/// How long anything on the real node may take (pods start in seconds here).
const CONVERGE: Duration = Duration::from_secs(90);

pub fn trials() -> Vec<Trial> {
    vec![
        Trial::test("node::image_matches_dockerfile", || {
            image_matches_dockerfile().map_err(|e| format!("{e:#}").into())
        }),
        trial(
            "node::agent_and_controller_run_as_pods",
            agent_and_controller_run_as_pods,
        ),
        trial(
            "node::removal_of_an_unused_image",
            removal_of_an_unused_image,
        ),
        trial(
            "node::image_of_a_running_pod_kept_then_forced",
            image_of_a_running_pod_kept_then_forced,
        ),
        trial(
            "node::sandbox_image_is_never_removed",
            sandbox_image_is_never_removed,
        ),
        trial(
            "node::pod_token_cannot_write_another_nodes_report",
            pod_token_cannot_write_another_nodes_report,
        ),
        trial(
            "node::deleted_agent_pod_stops_cleanly_and_its_successor_finishes",
            deleted_agent_pod_stops_cleanly_and_its_successor_finishes,
        ),
        trial(
            "node::prune_policy_runs_on_the_node",
            prune_policy_runs_on_the_node,
        ),
        trial(
            "node::helm_upgrade_rolls_and_uninstall_leaves_the_crds",
            helm_upgrade_rolls_and_uninstall_leaves_the_crds,
        ),
    ]
}

/// The shared real node with imagegc installed (or not, after the uninstall test).
struct Suite {
    admin: Client,
    /// The image the chart runs (`repository:tag`).
    image: String,
    installed: bool,
    bed: TestBed,
}

static SUITE: OnceCell<std::result::Result<Mutex<Suite>, String>> = OnceCell::const_new();

/// The suite, started on first use; a start-up failure fails every test with its message.
async fn suite() -> Result<tokio::sync::MutexGuard<'static, Suite>> {
    let suite = SUITE
        .get_or_init(|| async {
            Suite::start()
                .await
                .map(Mutex::new)
                .map_err(|e| format!("{e:#}"))
        })
        .await;
    let mut guard = match suite {
        Ok(m) => m.lock().await,
        Err(e) => bail!("the real node did not start: {e}"),
    };
    guard.ensure_installed().await?;
    Ok(guard)
}

impl Suite {
    async fn start() -> Result<Suite> {
        let started = Instant::now();
        let bed = TestBed::start(&Options {
            nodes: 0,
            cluster: true,
            real_node: true,
            ..Default::default()
        })
        .await?;
        eprintln!("node: real node Ready in {:?}", started.elapsed());
        let node = bed.real_node.as_ref().context("no real node")?;
        let (archive, image) = match (
            std::env::var_os("IMAGEGC_IMAGE_ARCHIVE"),
            std::env::var("IMAGEGC_IMAGE"),
        ) {
            (Some(archive), Ok(image)) => (PathBuf::from(archive), image),
            _ => {
                let archive = bed.dir().join("imagegc.oci.tar");
                let image = "localhost/imagegc:e2e".to_string();
                testbed::imagegc_image::write(
                    Path::new(env!("CARGO_BIN_EXE_imagegc")),
                    &image,
                    &archive,
                )?;
                (archive, image)
            }
        };
        node.ctr_import(&archive)?;
        let admin = bed.cluster()?.admin_client().await?;
        let mut suite = Suite {
            admin,
            image,
            installed: false,
            bed,
        };
        suite.ensure_installed().await?;
        eprintln!(
            "node: imagegc installed and Ready after {:?}",
            started.elapsed()
        );
        Ok(suite)
    }

    fn node(&self) -> &testbed::RealNode {
        self.bed
            .real_node
            .as_ref()
            .expect("the suite starts a real node")
    }

    /// `helm ARGS` with the admin kubeconfig; its output, or an error with it.
    fn helm(&self, args: &[&str]) -> Result<String> {
        let helm = testbed::tools::go_tool("helm")?;
        let out = std::process::Command::new(helm)
            .arg("--kubeconfig")
            .arg(&self.bed.cluster()?.admin_kubeconfig)
            .args(args)
            .output()
            .context("running helm")?;
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "helm {}: {text}", args.join(" "));
        Ok(text)
    }

    /// The values a user of this node sets: the image `make image` built (present on the
    /// node, so never pulled), the node's containerd socket and root; and for test speed, no
    /// prune jitter and a 2-second watermark check.
    fn values(&self) -> Vec<String> {
        let (repository, tag) = self
            .image
            .rsplit_once(':')
            .unwrap_or((&self.image, "latest"));
        let node = self.node();
        vec![
            format!("image.repository={repository}"),
            format!("image.tag={tag}"),
            "image.pullPolicy=Never".into(),
            format!("containerd.socket={}", node.socket.display()),
            format!("containerd.root={}", node.containerd_root.display()),
            "agent.prune.maxJitterSeconds=0".into(),
            "agent.prune.watermarkCheckSeconds=2".into(),
            // The tests force removals and prune images they have just imported.
            "agent.allowForce=true".into(),
            "agent.prune.minImageAgeSeconds=0".into(),
        ]
    }

    /// `helm install` as the README says, with [`Suite::values`], waiting for the pods.
    async fn ensure_installed(&mut self) -> Result<()> {
        if self.installed {
            return Ok(());
        }
        let chart = testbed::tools::repo_root().join("charts/imagegc");
        let chart = chart.to_str().context("chart path")?.to_string();
        let mut args = vec![
            "install",
            RELEASE,
            &chart,
            "--namespace",
            SYSTEM_NS,
            "--create-namespace",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        for v in self.values() {
            args.extend(["--set".to_string(), v]);
        }
        args.extend(["--wait".into(), "--timeout".into(), "3m".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Err(e) = self.helm(&args) {
            bail!("{e:#}\n{}", self.diagnostics().await);
        }
        self.installed = true;
        self.agent_pod().await?;
        Ok(())
    }

    /// The agent pod on the real node, once Ready.
    async fn agent_pod(&self) -> Result<Pod> {
        let pods = Api::<Pod>::namespaced(self.admin.clone(), SYSTEM_NS);
        let pods = &pods;
        let found = wait_for(
            "a Ready agent pod on the real node",
            CONVERGE,
            || async move {
                let list = pods
                    .list(&ListParams::default().labels(AGENT_SELECTOR))
                    .await?;
                Ok(list.items.into_iter().find(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                            == Some(REAL_NODE_NAME)
                        && is_ready(p)
                }))
            },
        )
        .await;
        match found {
            Ok(p) => Ok(p),
            Err(e) => bail!("{e:#}\n{}", self.diagnostics().await),
        }
    }

    /// What a user would look at when pods do not come up: the pods, the node's conditions, the
    /// kubelet's last lines.
    async fn diagnostics(&self) -> String {
        let cluster = match self.bed.cluster() {
            Ok(c) => c,
            Err(e) => return e.to_string(),
        };
        let pods = cluster
            .kubectl(&["get", "pods", "-A", "-o", "wide"])
            .unwrap_or_else(|e| e.to_string());
        let describe = cluster
            .kubectl(&["describe", "pods", "-n", SYSTEM_NS])
            .unwrap_or_else(|e| e.to_string());
        let kubelet = std::fs::read_to_string(self.node().kubelet_log()).unwrap_or_default();
        let tail: Vec<&str> = kubelet.lines().rev().take(25).collect();
        format!(
            "pods:\n{pods}\n{describe}\nkubelet log (last lines, newest first):\n{}",
            tail.join("\n")
        )
    }

    /// Creates an ImageRemoval of `images` for the real node.
    async fn create_removal(&self, name: &str, images: &[&str], force: bool) -> Result<()> {
        let removal: ImageRemoval = serde_json::from_value(serde_json::json!({
            "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImageRemoval",
            "metadata": {"name": name},
            "spec": {
                "images": images,
                "force": force,
                "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": REAL_NODE_NAME}},
            },
        }))?;
        Api::<ImageRemoval>::all(self.admin.clone())
            .create(&PostParams::default(), &removal)
            .await
            .with_context(|| format!("creating ImageRemoval {name}"))?;
        Ok(())
    }

    /// The real node's result for removal `name` at its current generation, once finished.
    async fn wait_result(&self, name: &str) -> Result<RemovalResult> {
        let removals = Api::<ImageRemoval>::all(self.admin.clone());
        let reports = Api::<NodeImageReport>::all(self.admin.clone());
        let (removals, reports) = (&removals, &reports);
        wait_for(
            &format!("the real node's result for {name}"),
            CONVERGE,
            || async move {
                let generation = removals.get(name).await?.metadata.generation.unwrap_or(1);
                let Some(report) = reports.get_opt(REAL_NODE_NAME).await? else {
                    return Ok(None);
                };
                Ok(report.status.and_then(|s| {
                    s.removals.into_iter().find(|r| {
                        r.name == name && r.generation == generation && r.finished.is_some()
                    })
                }))
            },
        )
        .await
    }

    /// Waits until ImageRemoval `name` is Complete or Failed at its current generation.
    async fn wait_finished(&self, name: &str) -> Result<ImageRemoval> {
        let removals = Api::<ImageRemoval>::all(self.admin.clone());
        let removals = &removals;
        wait_for(
            &format!("ImageRemoval {name} to finish"),
            CONVERGE,
            || async move {
                let r = removals.get(name).await?;
                let status = r.status.as_ref();
                let done = status.is_some_and(|s| {
                    s.observed_generation == r.metadata.generation
                        && s.pending == 0
                        && s.target_nodes == 1
                });
                Ok(done.then_some(r))
            },
        )
        .await
    }

    async fn delete_removal(&self, name: &str) -> Result<()> {
        Api::<ImageRemoval>::all(self.admin.clone())
            .delete(name, &DeleteParams::default())
            .await?;
        Ok(())
    }

    /// Imports `img` under `names` into the node's containerd (as a pull would leave it) and
    /// waits until CRI lists it.
    async fn import(&self, img: &BuiltImage, names: &[&str]) -> Result<()> {
        let socket = &self.node().socket;
        crate::support::import(socket, img, names).await?;
        testbed::cri::wait_synced(socket, &[img.id()], names).await
    }

    /// Image ids CRI lists on the node.
    async fn cri_ids(&self) -> Result<BTreeSet<String>> {
        Ok(testbed::cri::images(&self.node().socket)
            .await?
            .into_keys()
            .collect())
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn outcomes(r: &RemovalResult) -> Vec<(String, String)> {
    r.images
        .iter()
        .map(|i| (i.image.clone(), i.outcome.to_string()))
        .collect()
}

/// A runnable image: the static pause binary as `/sleep` (it waits for a signal), plus a file
/// of `seed` so each seed is a different image.
fn sleeper_image(seed: &str) -> Result<BuiltImage> {
    let pause = testbed::tools::go_tool("pause")?;
    let layer = tbimage::files_tar(&[
        LayerFile {
            path: "/sleep".into(),
            mode: 0o755,
            bytes: std::fs::read(&pause)?,
        },
        LayerFile {
            path: "/seed".into(),
            mode: 0o644,
            bytes: seed.as_bytes().to_vec(),
        },
    ])?;
    Ok(ImageBuilder::new(seed)
        .layer_tars(vec![layer])
        .entrypoint(&["/sleep"])
        .build())
}

// ---------------------------------------------------------------------------------------------
// The image and the Dockerfile.

/// What the Dockerfile's final stage says about the runtime image.
#[derive(Debug, PartialEq)]
struct DockerfileRuntime {
    entrypoint: Vec<String>,
    user: String,
    binary_path: String,
}

/// Reads the final stage of `dockerfile`: its ENTRYPOINT (exec form), its USER (else the base
/// image's: distroless `nonroot` tags run as 65532, others as root) and where it copies the
/// release binary.
fn parse_dockerfile(dockerfile: &str) -> Result<DockerfileRuntime> {
    let stage = dockerfile
        .rsplit_once("\nFROM ")
        .map(|(_, s)| s)
        .context("no FROM")?;
    let base = stage.lines().next().unwrap_or_default();
    let mut user = if base.contains(":nonroot") || base.contains("nonroot@") {
        "65532:65532".to_string()
    } else {
        "0".to_string()
    };
    let (mut entrypoint, mut binary_path) = (Vec::new(), String::new());
    for line in stage.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
            entrypoint = serde_json::from_str(rest).context("ENTRYPOINT must be exec form")?;
        } else if let Some(rest) = line.strip_prefix("USER ") {
            user = rest.trim().to_string();
            // distroless' /etc/passwd gives its nonroot user the group of the same number.
            if user == "65532" && base.contains("distroless") {
                user = "65532:65532".into();
            }
        } else if let Some(rest) = line.strip_prefix("COPY ")
            && rest.contains("release/imagegc")
        {
            binary_path = rest
                .split_whitespace()
                .last()
                .unwrap_or_default()
                .to_string();
        }
    }
    Ok(DockerfileRuntime {
        entrypoint,
        user,
        binary_path,
    })
}

/// `make image`'s image and the Dockerfile's agree on entrypoint, user and binary path, and the
/// image holds exactly the binary and the libraries `ldd` says it links.
fn image_matches_dockerfile() -> Result<()> {
    let dockerfile = std::fs::read_to_string(testbed::tools::repo_root().join("Dockerfile"))?;
    let want = parse_dockerfile(&dockerfile)?;
    let bin = Path::new(env!("CARGO_BIN_EXE_imagegc"));
    let img = testbed::imagegc_image::build(bin, "test")?;
    let config: serde_json::Value = img
        .blobs
        .iter()
        .find(|b| b.digest == img.id())
        .map(|b| serde_json::from_slice(&b.bytes))
        .context("config blob")??;
    let got = DockerfileRuntime {
        entrypoint: serde_json::from_value(config["config"]["Entrypoint"].clone())?,
        user: config["config"]["User"].as_str().unwrap_or("0").to_string(),
        binary_path: testbed::imagegc_image::BINARY_PATH.to_string(),
    };
    ensure!(got == want, "image {got:?} != Dockerfile {want:?}");
    ensure!(
        got.user.split(':').next() != Some("0"),
        "the image must not run as root by default"
    );
    // Exactly the binary and what it links.
    let layer = img
        .blobs
        .iter()
        .find(|b| b.media_type.ends_with(".layer.v1.tar"))
        .context("layer")?;
    let mut files = BTreeSet::new();
    for entry in tar::Archive::new(layer.bytes.as_slice()).entries()? {
        let entry = entry?;
        if entry.header().entry_type().is_file() {
            files.insert(format!("/{}", entry.path()?.display()));
        }
    }
    let ldd = std::process::Command::new("ldd").arg(bin).output()?;
    let mut expected: BTreeSet<String> =
        testbed::imagegc_image::parse_ldd(&String::from_utf8_lossy(&ldd.stdout))?
            .into_iter()
            .map(|p| p.display().to_string())
            .collect();
    expected.insert(want.binary_path.clone());
    ensure!(
        files == expected,
        "image files {files:?}, expected {expected:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// On the real node.

/// `helm install` brought the agent up on the real node with the kubelet's projected token and
/// the controller Ready; the agent reports the node; CRI pins the sandbox image; the image
/// imported with `ctr` runs as its non-root default user where the chart does not set one.
async fn agent_and_controller_run_as_pods() -> Result<()> {
    let s = suite().await?;
    let agent = s.agent_pod().await?;
    let spec = agent.spec.as_ref().context("spec")?;
    ensure!(
        spec.volumes
            .iter()
            .flatten()
            .any(|v| v.projected.as_ref().is_some_and(|p| p
                .sources
                .iter()
                .flatten()
                .any(|s| s.service_account_token.is_some()))),
        "the agent must run with the kubelet's projected ServiceAccount token: {:?}",
        spec.volumes
    );
    // The workloads' status is written by kube-controller-manager after the pods turn Ready,
    // so it is polled, not read once.
    let daemonsets = &Api::<DaemonSet>::namespaced(s.admin.clone(), SYSTEM_NS);
    wait_for(
        "the agent DaemonSet to count 1 of 1 Ready",
        CONVERGE,
        || async move {
            let status = daemonsets
                .get(&format!("{RELEASE}-agent"))
                .await?
                .status
                .context("DaemonSet status")?;
            Ok((status.desired_number_scheduled == 1 && status.number_ready == 1).then_some(()))
        },
    )
    .await?;
    let deployments = &Api::<Deployment>::namespaced(s.admin.clone(), SYSTEM_NS);
    wait_for(
        "the controller Deployment to count 1 Ready",
        CONVERGE,
        || async move {
            let deploy = deployments.get(&format!("{RELEASE}-controller")).await?;
            Ok((deploy.status.and_then(|st| st.ready_replicas) == Some(1)).then_some(()))
        },
    )
    .await?;
    // The agent wrote its node's report with the pod's own token.
    let reports = Api::<NodeImageReport>::all(s.admin.clone());
    let reports = &reports;
    let report = wait_for("the real node's report", CONVERGE, || async move {
        Ok(reports
            .get_opt(REAL_NODE_NAME)
            .await?
            .filter(|r| r.status.as_ref().is_some_and(|s| s.inventory.is_some())))
    })
    .await?;
    let inventory = report
        .status
        .and_then(|s| s.inventory)
        .context("inventory")?;
    ensure!(
        inventory.pinned >= 1 && inventory.in_use >= 1,
        "the pause image is pinned and imagegc's own image is in use: {inventory:?}"
    );
    let pinned = cri_pinned(&s.node().socket, testbed::containerd::SANDBOX_IMAGE).await?;
    ensure!(
        pinned == Some(true),
        "CRI must pin the sandbox image: {pinned:?}"
    );
    // The image's own user: the controller's chart sets 65532, as the image does.
    let status = ImageServiceClient::new(containerd_client::connect(&s.node().socket).await?)
        .image_status(ImageStatusRequest {
            image: Some(ImageSpec {
                image: s.image.clone(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await?
        .into_inner()
        .image
        .context("the imported image is not known to CRI")?;
    ensure!(
        status.uid.as_ref().map(|u| u.value) == Some(65532),
        "the image's default user: {:?}",
        status.uid
    );
    Ok(())
}

/// CRI's `pinned` for `image`, `None` if CRI does not know it.
async fn cri_pinned(socket: &Path, image: &str) -> Result<Option<bool>> {
    let status = ImageServiceClient::new(containerd_client::connect(socket).await?)
        .image_status(ImageStatusRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await?
        .into_inner();
    Ok(status.image.map(|i| i.pinned))
}

/// An unused image goes; the report says Removed with its references, the ImageRemoval
/// completes, CRI no longer lists it, and the kubelet drops it from the Node's image list.
async fn removal_of_an_unused_image() -> Result<()> {
    let s = suite().await?;
    let img = ImageBuilder::new("node-unused")
        .layer_sizes(&[64 << 10])
        .build();
    let names = ["example.com/e2e/unused:1", "example.com/e2e/unused:latest"];
    s.import(&img, &names).await?;
    s.create_removal("unused", &["example.com/e2e/unused:1"], false)
        .await?;
    let r = s.wait_result("unused").await?;
    ensure!(
        outcomes(&r)
            == [(
                "example.com/e2e/unused:1".to_string(),
                "Removed".to_string()
            )],
        "{r:?}"
    );
    let refs = &r.images[0].references;
    ensure!(
        names.iter().all(|n| refs.contains(&n.to_string())) && r.bytes_freed > 0,
        "every reference removed and bytes freed: {r:?}"
    );
    ensure!(
        !s.cri_ids().await?.contains(&img.id()),
        "CRI still lists it"
    );
    let done = s.wait_finished("unused").await?;
    let status = done.status.context("status")?;
    ensure!(status.succeeded == 1 && status.failed == 0, "{status:?}");
    // The kubelet's view follows at its next node status update.
    let nodes = Api::<Node>::all(s.admin.clone());
    let (nodes, names) = (&nodes, &names);
    wait_for(
        "the kubelet to drop the image from the Node",
        CONVERGE,
        || async move {
            let node = nodes.get(REAL_NODE_NAME).await?;
            let images = node.status.and_then(|s| s.images).unwrap_or_default();
            let listed = images.iter().any(|i| {
                i.names
                    .iter()
                    .flatten()
                    .any(|n| names.contains(&n.as_str()))
            });
            Ok((!listed && !images.is_empty()).then_some(()))
        },
    )
    .await?;
    s.delete_removal("unused").await
}

/// An image a running pod uses is kept as InUse, naming the pod's container; `force` removes it
/// while the pod keeps running: its container is not restarted and the kubelet notices
/// nothing, until the container must be recreated (here: its process killed), when the
/// kubelet, never pulling, reports `ErrImageNeverPull`.
async fn image_of_a_running_pod_kept_then_forced() -> Result<()> {
    let s = suite().await?;
    let img = sleeper_image("node-in-use")?;
    let name = "example.com/e2e/sleeper:1";
    s.import(&img, &[name]).await?;
    let pods = Api::<Pod>::namespaced(s.admin.clone(), "default");
    // The ServiceAccount controller creates "default" shortly after start.
    let sas = Api::<ServiceAccount>::namespaced(s.admin.clone(), "default");
    let sas = &sas;
    wait_for("the default ServiceAccount", CONVERGE, || async move {
        Ok(sas.get_opt("default").await?.map(|_| ()))
    })
    .await?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "sleeper"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "sleeper", "image": name, "imagePullPolicy": "Never"}],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let pods_ref = &pods;
    let running = wait_for("the sleeper pod to run", CONVERGE, || async move {
        let p = pods_ref.get("sleeper").await?;
        Ok(is_ready(&p).then_some(p))
    })
    .await;
    let running = match running {
        Ok(p) => p,
        Err(e) => bail!("{e:#}\n{}", s.diagnostics().await),
    };
    let container_id = running
        .status
        .as_ref()
        .and_then(|st| st.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.clone())
        .context("container id")?;
    let container_id = container_id.trim_start_matches("containerd://").to_string();

    s.create_removal("in-use", &[name], false).await?;
    let r = s.wait_result("in-use").await?;
    ensure!(
        outcomes(&r) == [(name.to_string(), "InUse".to_string())],
        "{r:?}"
    );
    ensure!(
        r.images[0].message.contains(&container_id),
        "the report names the pod's container {container_id}: {}",
        r.images[0].message
    );
    ensure!(
        s.cri_ids().await?.contains(&img.id()),
        "an in-use image went"
    );

    Api::<ImageRemoval>::all(s.admin.clone())
        .patch(
            "in-use",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"force": true}})),
        )
        .await?;
    let r = s.wait_result("in-use").await?;
    ensure!(
        outcomes(&r) == [(name.to_string(), "Removed".to_string())],
        "{r:?}"
    );
    ensure!(
        !s.cri_ids().await?.contains(&img.id()),
        "CRI still lists it"
    );
    // The pod keeps running through two kubelet syncs, same container, no restart.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = pods.get("sleeper").await?;
    let cs = after
        .status
        .as_ref()
        .and_then(|st| st.container_statuses.as_ref())
        .and_then(|c| c.first())
        .context("container status")?;
    ensure!(
        is_ready(&after)
            && cs.restart_count == 0
            && cs.state.as_ref().is_some_and(|st| st.running.is_some())
            && cs.container_id.as_deref() == Some(format!("containerd://{container_id}").as_str()),
        "the pod must keep running its container: {cs:?}"
    );
    // Only when the container must be recreated does the missing image matter: its process
    // killed, the kubelet tries again and, never pulling, reports ErrImageNeverPull.
    kill_container_process(&container_id)?;
    wait_for(
        "the kubelet to report the image missing",
        CONVERGE,
        || async move {
            let p = pods_ref.get("sleeper").await?;
            let reason = p
                .status
                .and_then(|st| st.container_statuses)
                .and_then(|c| c.into_iter().next())
                .and_then(|c| c.state)
                .and_then(|st| st.waiting)
                .and_then(|w| w.reason);
            Ok((reason.as_deref() == Some("ErrImageNeverPull")).then_some(()))
        },
    )
    .await?;
    pods.delete("sleeper", &DeleteParams::default()).await?;
    wait_for("the sleeper pod to go", CONVERGE, || async move {
        Ok(pods_ref.get_opt("sleeper").await?.is_none().then_some(()))
    })
    .await?;
    s.delete_removal("in-use").await
}

/// SIGKILLs the process of container `id` (found by its cgroup, which names the container).
fn kill_container_process(id: &str) -> Result<()> {
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cgroup = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
        if cgroup.contains(id) {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )?;
            killed += 1;
        }
    }
    ensure!(killed > 0, "no process of container {id}");
    Ok(())
}

/// The sandbox image that CRI pins (it runs every pod's sandbox) survives even a forced
/// removal, and stays pinned.
async fn sandbox_image_is_never_removed() -> Result<()> {
    let s = suite().await?;
    let pause = testbed::containerd::SANDBOX_IMAGE;
    s.create_removal("sandbox", &[pause], true).await?;
    let r = s.wait_result("sandbox").await?;
    ensure!(
        outcomes(&r) == [(pause.to_string(), "Pinned".to_string())],
        "{r:?}"
    );
    ensure!(
        cri_pinned(&s.node().socket, pause).await? == Some(true),
        "the sandbox image must stay, pinned"
    );
    s.delete_removal("sandbox").await
}

/// The token the kubelet mounted into the agent pod (read from the node, as anyone with the
/// node's root could) may write its own node's report and is refused for another node's.
async fn pod_token_cannot_write_another_nodes_report() -> Result<()> {
    let s = suite().await?;
    let agent = s.agent_pod().await?;
    let uid = agent.uid().context("uid")?;
    let volumes = s
        .node()
        .kubelet_dir
        .join(format!("pods/{uid}/volumes/kubernetes.io~projected"));
    let token = std::fs::read_dir(&volumes)
        .with_context(|| format!("reading {}", volumes.display()))?
        .flatten()
        .map(|e| e.path().join("token"))
        .find(|p| p.is_file())
        .context("the agent pod's projected token")?;
    let token = std::fs::read_to_string(token)?;
    let kubeconfig = s
        .bed
        .cluster()?
        .token_kubeconfig("agent-pod.kubeconfig", token.trim())?;
    let reports =
        Api::<NodeImageReport>::all(testbed::cluster::client_from_kubeconfig(&kubeconfig).await?);
    let forged = |node: &str| {
        Patch::Apply(serde_json::json!({
            "apiVersion": "imagegc.dev/v1alpha1", "kind": "NodeImageReport",
            "metadata": {"name": node}, "spec": {"nodeName": node},
            "status": {"removals": []},
        }))
    };
    // Another node's report exists (an admin's write; the policy binds only the agent).
    Api::<NodeImageReport>::all(s.admin.clone())
        .patch(
            "node-elsewhere",
            &PatchParams::apply("e2e-admin"),
            &forged("node-elsewhere"),
        )
        .await?;
    // Its own node's: allowed (a dry run, so the agent's report stays as it wrote it).
    let own = reports
        .patch_status(
            REAL_NODE_NAME,
            &PatchParams::apply("e2e").force().dry_run(),
            &forged(REAL_NODE_NAME),
        )
        .await;
    ensure!(
        own.is_ok(),
        "the pod's token must write its own node's report: {own:?}"
    );
    for (what, result) in [
        (
            "another node's report",
            reports
                .patch(
                    "node-elsewhere",
                    &PatchParams::apply("e2e").force(),
                    &forged("node-elsewhere"),
                )
                .await,
        ),
        (
            "another node's status",
            reports
                .patch_status(
                    "node-elsewhere",
                    &PatchParams::apply("e2e").force(),
                    &forged("node-elsewhere"),
                )
                .await,
        ),
    ] {
        match result {
            Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => ensure!(
                e.message.contains(REAL_NODE_NAME)
                    || e.message.contains("ValidatingAdmissionPolicy"),
                "{what}: refused, but not by the policy: {}",
                e.message
            ),
            other => bail!("{what}: expected a refusal, got {other:?}"),
        }
    }
    Api::<NodeImageReport>::all(s.admin.clone())
        .delete("node-elsewhere", &DeleteParams::default())
        .await?;
    Ok(())
}

/// Deleting the agent pod stops it with SIGTERM (its log ends with a clean stop); the DaemonSet
/// starts a new pod, which finishes a removal the old one was given as it went.
async fn deleted_agent_pod_stops_cleanly_and_its_successor_finishes() -> Result<()> {
    let s = suite().await?;
    let mut names = Vec::new();
    for i in 0..20 {
        let img = ImageBuilder::new(format!("node-batch-{i}")).build();
        let name = format!("example.com/e2e/batch-{i}:1");
        s.import(&img, &[&name]).await?;
        names.push(name);
    }
    let old = s.agent_pod().await?;
    let (old_name, old_uid) = (old.name_any(), old.uid().context("uid")?);
    let log = s
        .node()
        .pod_logs_dir()
        .join(format!("{SYSTEM_NS}_{old_name}_{old_uid}/agent/0.log"));
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    s.create_removal("batch", &refs, false).await?;
    let pods = Api::<Pod>::namespaced(s.admin.clone(), SYSTEM_NS);
    let deleted = Instant::now();
    pods.delete(&old_name, &DeleteParams::default()).await?;
    // Keep the old container's log as it grows, until the pod is gone.
    let mut last_log = String::new();
    while pods
        .get_opt(&old_name)
        .await?
        .is_some_and(|p| p.uid() == Some(old_uid.clone()))
    {
        if let Ok(text) = std::fs::read_to_string(&log) {
            last_log = text;
        }
        ensure!(deleted.elapsed() < CONVERGE, "the old agent pod did not go");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped_in = deleted.elapsed();
    ensure!(
        last_log.contains("SIGTERM") && last_log.contains("agent stopped"),
        "the old agent must stop on SIGTERM, cleanly; its log:\n{last_log}"
    );
    let new = s.agent_pod().await?;
    ensure!(
        new.uid() != Some(old_uid),
        "the DaemonSet must start a new pod"
    );
    let r = s.wait_result("batch").await?;
    ensure!(
        r.images.len() == names.len()
            && r.images
                .iter()
                .all(|i| i.outcome == "Removed" || i.outcome == "NotPresent"),
        "{r:?}"
    );
    let left: Vec<String> = testbed::cri::images(&s.node().socket)
        .await?
        .into_values()
        .flatten()
        .filter(|n| names.contains(n))
        .collect();
    ensure!(left.is_empty(), "left on the node: {left:?}");
    eprintln!("node: the old agent pod was gone {stopped_in:?} after its deletion");
    s.delete_removal("batch").await
}

/// A prune policy with a watermark below the node's usage removes the images it selects on
/// the real node (never the pinned, in-use or protected ones) and reports the run.
async fn prune_policy_runs_on_the_node() -> Result<()> {
    let s = suite().await?;
    let mut ids = Vec::new();
    for i in 0..3 {
        let img = ImageBuilder::new(format!("node-prune-{i}")).build();
        s.import(&img, &[&format!("example.com/e2e/prune-{i}:1")])
            .await?;
        ids.push(img.id());
    }
    let before = s.cri_ids().await?;
    let policy: ImagePrunePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImagePrunePolicy",
        "metadata": {"name": "node-prune"},
        "spec": {
            "watermark": {"highPercent": 1, "lowPercent": 0},
            "include": ["example.com/e2e/prune-*"],
            "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": REAL_NODE_NAME}},
        },
    }))?;
    let policies = Api::<ImagePrunePolicy>::all(s.admin.clone());
    policies.create(&PostParams::default(), &policy).await?;
    let reports = Api::<NodeImageReport>::all(s.admin.clone());
    let reports = &reports;
    let run = wait_for(
        "the policy's run on the real node",
        CONVERGE,
        || async move {
            let report = reports.get(REAL_NODE_NAME).await?;
            Ok(report.status.and_then(|st| {
                st.policies
                    .into_iter()
                    .find(|p| p.name == "node-prune" && p.total_removed >= 3)
            }))
        },
    )
    .await?;
    let after = s.cri_ids().await?;
    ensure!(
        ids.iter().all(|id| !after.contains(id)),
        "pruned images still listed"
    );
    let others: BTreeSet<_> = before
        .difference(&after)
        .filter(|id| !ids.contains(id))
        .collect();
    ensure!(
        others.is_empty(),
        "the policy removed images it did not select: {others:?}"
    );
    ensure!(
        cri_pinned(&s.node().socket, testbed::containerd::SANDBOX_IMAGE).await? == Some(true),
        "the sandbox image must stay"
    );
    ensure!(run.total_bytes_freed > 0, "{run:?}");
    policies
        .delete("node-prune", &DeleteParams::default())
        .await?;
    Ok(())
}

/// `helm upgrade` with a changed value replaces both pods (which come up Ready with it);
/// `helm uninstall` removes everything the chart made except the CRDs (Helm never deletes
/// CRDs, so the users' ImageRemovals and policies survive a reinstall).
async fn helm_upgrade_rolls_and_uninstall_leaves_the_crds() -> Result<()> {
    let mut s = suite().await?;
    let pods = Api::<Pod>::namespaced(s.admin.clone(), SYSTEM_NS);
    let uids =
        |list: Vec<Pod>| -> BTreeSet<String> { list.into_iter().filter_map(|p| p.uid()).collect() };
    let before = uids(pods.list(&ListParams::default()).await?.items);
    s.helm(&[
        "upgrade",
        RELEASE,
        testbed::tools::repo_root()
            .join("charts/imagegc")
            .to_str()
            .context("path")?,
        "--namespace",
        SYSTEM_NS,
        "--reuse-values",
        "--set",
        "podAnnotations.e2e/rolled=yes",
        "--wait",
        "--timeout",
        "3m",
    ])?;
    let pods_ref = &pods;
    let rolled = wait_for("both pods replaced and Ready", CONVERGE, || async move {
        let list = pods_ref.list(&ListParams::default()).await?.items;
        let fresh: Vec<&Pod> = list
            .iter()
            .filter(|p| {
                p.annotations().get("e2e/rolled").map(String::as_str) == Some("yes") && is_ready(p)
            })
            .collect();
        let old_left = list
            .iter()
            .any(|p| p.annotations().get("e2e/rolled").is_none());
        Ok((fresh.len() == 2 && !old_left).then(|| list.clone()))
    })
    .await?;
    ensure!(uids(rolled).is_disjoint(&before), "every pod must be new");

    s.helm(&[
        "uninstall",
        RELEASE,
        "--namespace",
        SYSTEM_NS,
        "--wait",
        "--timeout",
        "3m",
    ])?;
    s.installed = false;
    let cluster = s.bed.cluster()?;
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    let kinds = "daemonsets,deployments,pods,serviceaccounts,roles,rolebindings,services,clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings,flowschemas,prioritylevelconfigurations";
    // Pods go after their owners, through the garbage collector.
    wait_for("everything of the release to go", CONVERGE, || async {
        let left = cluster.kubectl(&["get", kinds, "-A", "-l", &selector, "-o", "name"])?;
        Ok(left.trim().is_empty().then_some(()))
    })
    .await
    .with_context(|| {
        cluster
            .kubectl(&["get", kinds, "-A", "-l", &selector])
            .unwrap_or_default()
    })?;
    let crds = cluster.kubectl(&["get", "customresourcedefinitions", "-o", "name"])?;
    for crd in ["imageremovals", "imageprunepolicies", "nodeimagereports"] {
        ensure!(
            crds.contains(&format!("{crd}.imagegc.dev")),
            "CRD {crd} must stay: {crds}"
        );
    }
    Ok(())
}
