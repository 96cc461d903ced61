//! A CRI-O daemon for the CRI backend's tests: CRI-O built from its Go module
//! (`hack/tools.sh path crio`, with its `pinns`), conmon and runc from Debian (Debian's crun
//! 1.8 refuses the OCI spec version CRI-O 1.34 writes: "unknown version specified"), storage (vfs)
//! and every state directory under the bed directory, no CNI network (pods use the host's),
//! NRI off. Images are put into its storage from OCI layouts with skopeo (CRI has no import,
//! and the tests have no registry).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::image::BuiltImage;
use crate::process::Proc;
use crate::tools;

/// What CRI-O needs from Debian besides itself.
const DEBIAN_TOOLS: [(&str, &str); 3] = [
    ("/usr/bin/conmon", "conmon"),
    ("/usr/sbin/runc", "runc"),
    ("/usr/bin/skopeo", "skopeo"),
];

/// CRI-O's pause image; CRI-O pins it.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";

/// One running CRI-O.
pub struct Crio {
    /// Its CRI socket.
    pub socket: PathBuf,
    /// Its storage root.
    pub root: PathBuf,
    runroot: PathBuf,
    dir: PathBuf,
    proc: Option<Proc>,
}

/// Checks that CRI-O's helpers are installed; the error says what to install.
pub fn check_tools() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_TOOLS
        .iter()
        .filter(|(path, _)| !Path::new(path).is_file())
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        bail!(
            "CRI-O tests need Debian's {}: run `apt-get install {}` (make e2e-crio does)",
            missing.join(", "),
            missing.join(" ")
        );
    }
    Ok(())
}

impl Crio {
    /// Starts CRI-O under `bed_dir/<name>`, pinning `pinned` (as `pinned_images`, beside the
    /// pause image), and waits until its socket answers.
    pub fn start(bed_dir: &Path, name: &str, pinned: &[&str]) -> Result<Crio> {
        check_tools()?;
        let crio = tools::go_tool("crio")?;
        let pinns = crio.with_file_name("pinns");
        let dir = bed_dir.join(name);
        fs::create_dir_all(dir.join("conf.d"))?;
        fs::create_dir_all(dir.join("cni"))?;
        let mut c = Crio {
            socket: dir.join("crio.sock"),
            root: dir.join("root"),
            runroot: dir.join("runroot"),
            dir,
            proc: None,
        };
        let config = c.write_config(&pinns, pinned)?;
        let args: Vec<String> = vec![
            "--config".into(),
            config.display().to_string(),
            "--config-dir".into(),
            c.dir.join("conf.d").display().to_string(),
            "--registries-conf".into(),
            c.dir.join("registries.conf").display().to_string(),
        ];
        let proc = Proc::spawn(
            &format!("crio[{name}]"),
            &crio,
            &args,
            &[],
            bed_dir,
            &c.dir.join("crio.log"),
        )?;
        c.proc = Some(proc);
        c.wait_serving(Duration::from_secs(60))?;
        Ok(c)
    }

    fn write_config(&self, pinns: &Path, pinned: &[&str]) -> Result<PathBuf> {
        let d = self.dir.display();
        let pinned: Vec<String> = pinned.iter().map(|p| format!("{p:?}")).collect();
        fs::write(
            self.dir.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )?;
        fs::write(
            self.dir.join("registries.conf"),
            "unqualified-search-registries = [\"docker.io\"]\n",
        )?;
        let cfg = format!(
            r#"[crio]
root = "{root}"
runroot = "{runroot}"
storage_driver = "vfs"
log_dir = "{d}/logs"
version_file = "{d}/version"
version_file_persist = "{d}/version-persist"
clean_shutdown_file = "{d}/clean.shutdown"
[crio.api]
listen = "{sock}"
[crio.runtime]
default_runtime = "runc"
conmon = "/usr/bin/conmon"
cgroup_manager = "cgroupfs"
conmon_cgroup = "pod"
namespaces_dir = "{d}/ns"
pinns_path = "{pinns}"
container_exits_dir = "{d}/exits"
container_attach_socket_dir = "{d}/attach"
hooks_dir = []
[crio.runtime.runtimes.runc]
runtime_path = "{runc}"
runtime_root = "{d}/runc"
[crio.image]
pause_image = "{PAUSE_IMAGE}"
pinned_images = [{pinned}]
signature_policy = "{d}/policy.json"
[crio.network]
network_dir = "{d}/cni"
plugin_dirs = ["/usr/lib/cni"]
[crio.metrics]
enable_metrics = false
[crio.nri]
enable_nri = false
"#,
            root = self.root.display(),
            runroot = self.runroot.display(),
            sock = self.socket.display(),
            pinns = pinns.display(),
            runc = DEBIAN_TOOLS[1].0,
            pinned = pinned.join(", "),
        );
        let path = self.dir.join("crio.conf");
        fs::write(&path, cfg)?;
        Ok(path)
    }

    fn wait_serving(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.proc.as_mut()
                && !p.is_running()
            {
                bail!("crio exited during start-up:\n{}", p.log_tail(20));
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "crio did not serve {} in {timeout:?}",
                    self.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Puts `img` (its manifest for this host) into CRI-O's storage under each of `names`, as
    /// a pull would, through skopeo and an OCI layout.
    pub fn import(&self, img: &BuiltImage, names: &[&str]) -> Result<()> {
        let layout = tempfile::tempdir_in(&self.dir)?;
        write_oci_layout(layout.path(), img)?;
        for name in names {
            let dest = format!(
                "containers-storage:[vfs@{}+{}]{name}",
                self.root.display(),
                self.runroot.display()
            );
            let out = Command::new("skopeo")
                .args(["--insecure-policy", "copy", "--quiet"])
                .arg(format!("oci:{}", layout.path().display()))
                .arg(&dest)
                .output()
                .context("running skopeo")?;
            if !out.status.success() {
                bail!(
                    "skopeo copy into CRI-O's storage as {name} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }

    /// The last lines of CRI-O's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.proc
            .as_ref()
            .map(|p| p.log_tail(n))
            .unwrap_or_default()
    }
}

impl Drop for Crio {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(10));
        }
        // Containers outlive CRI-O (conmon daemonizes): delete each through runc, whose init
        // process conmon waits for, then stop any conmon of this directory that is left.
        let runc_root = self.dir.join("runc");
        for entry in fs::read_dir(&runc_root).into_iter().flatten().flatten() {
            let _ = Command::new(DEBIAN_TOOLS[1].0)
                .arg("--root")
                .arg(&runc_root)
                .args(["delete", "--force"])
                .arg(entry.file_name())
                .output();
        }
        kill_processes_naming(&self.dir);
        // vfs leaves plain directories, but a pod's namespaces are bind mounts under ns/.
        if let Ok(entries) = fs::read_dir(self.dir.join("ns")) {
            for e in entries.flatten() {
                for kind in fs::read_dir(e.path()).into_iter().flatten().flatten() {
                    let _ = nix::mount::umount2(&kind.path(), nix::mount::MntFlags::MNT_DETACH);
                }
                let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// SIGKILLs every process whose command line names `dir` (CRI-O's conmons).
fn kill_processes_naming(dir: &Path) {
    let needle = dir.display().to_string();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Writes `img` as an OCI image layout (`oci-layout`, `index.json`, `blobs/`): the index names
/// the image's target, so skopeo copies the manifest for this host.
pub fn write_oci_layout(dir: &Path, img: &BuiltImage) -> Result<()> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    for blob in &img.blobs {
        let hex = blob.digest.trim_start_matches("sha256:");
        fs::write(blobs.join(hex), &blob.bytes)?;
    }
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": img.target.media_type,
            "digest": img.target.digest,
            "size": img.target.size,
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

/// Runs a pod through CRI (host network, PID and IPC: no CNI, no infra container) and creates
/// a container of `image` in it, not started: what makes an image "in use" to the kubelet.
/// Returns the container's ID.
pub async fn create_container(socket: &Path, name: &str, image: &str) -> Result<String> {
    use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
    use k8s_cri::v1::{
        ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec,
        LinuxContainerConfig, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
        LinuxSandboxSecurityContext, Mount, NamespaceMode, NamespaceOption, PodSandboxConfig,
        PodSandboxMetadata, RunPodSandboxRequest,
    };
    let mut rs = RuntimeServiceClient::new(containerd_client::connect(socket).await?);
    let host = NamespaceMode::Node as i32;
    let namespaces = NamespaceOption {
        network: host,
        pid: host,
        ipc: host,
        ..Default::default()
    };
    let sandbox = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = rs
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: String::new(),
        })
        .await
        .with_context(|| format!("CRI RunPodSandbox {name}"))?
        .into_inner()
        .pod_sandbox_id;
    let container = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        // As the kubelet sends it: CRI-O checks signatures against the name the user gave.
        image: Some(ImageSpec {
            image: image.into(),
            user_specified_image: image.into(),
            ..Default::default()
        }),
        // runc checks at create that the command exists and may be executed; the test images
        // hold no binary, so the host's is mounted (never run: the container is not started).
        command: vec!["/true".into()],
        mounts: vec![Mount {
            container_path: "/true".into(),
            host_path: "/bin/true".into(),
            readonly: true,
            ..Default::default()
        }],
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(namespaces),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = rs
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod,
            config: Some(container),
            sandbox_config: Some(sandbox),
        })
        .await
        .with_context(|| format!("CRI CreateContainer {name} of {image}"))?
        .into_inner()
        .container_id;
    Ok(id)
}
