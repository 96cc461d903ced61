//! One real Kubernetes node, joined to the bed's API server: kubelet, kube-controller-manager
//! and kube-scheduler from the pinned Kubernetes module, containerd 2.x with its runc shim and
//! Debian's runc, pods on a bridge of the bed's own (Debian's CNI `bridge` + `host-local`), and a
//! locally built pause image that containerd's CRI pins as its sandbox image.
//!
//! Pods reach the API server without kube-proxy: the API server binds the bridge's address on
//! port 443, and the Service range starts at that address, so the `kubernetes` Service's
//! ClusterIP (what `KUBERNETES_SERVICE_HOST` says) *is* the API server. Nothing else in the
//! bed is reachable from pods, and pods reach nothing outside the bridge (no default route).
//!
//! Everything the node creates outside the bed directory (the bridge, a cgroup tree, the
//! sysctls the kubelet sets) is recorded first and undone on every exit path
//! ([`crate::process::release_host_state`]).

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use kube::Api;

use crate::cluster::{Cluster, ClusterOptions};
use crate::containerd::SANDBOX_IMAGE;
use crate::image::{self, ImageBuilder, LayerFile};
use crate::process::{HostChange, Proc, free_port, record_host_change};
use crate::tools;

/// Where Debian's `containernetworking-plugins` installs the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Debian's runc.
pub const RUNC: &str = "/usr/sbin/runc";
/// The sysctls the kubelet sets on start (restored when the node goes).
const KUBELET_SYSCTLS: [&str; 6] = [
    "/proc/sys/vm/overcommit_memory",
    "/proc/sys/vm/panic_on_oom",
    "/proc/sys/kernel/panic",
    "/proc/sys/kernel/panic_on_oops",
    "/proc/sys/kernel/keys/root_maxkeys",
    "/proc/sys/kernel/keys/root_maxbytes",
];

/// The node's network: a bridge of this bed holding `10.213.<n>.1/24`, an address of this
/// machine that nothing outside it routes to.
pub struct Network {
    /// The bridge's name.
    pub bridge: String,
    /// The third octet of the /24.
    n: u8,
}

impl Network {
    /// Creates a bridge with a /24 no other interface or route of this machine uses.
    pub fn create(bed_dir: &Path) -> Result<Network> {
        let used = run("ip", &["-4", "-o", "addr"])? + &run("ip", &["-4", "route"])?;
        let start: u8 = rand::random();
        let n = (0..=255u8)
            .map(|i| start.wrapping_add(i))
            .find(|n| !used.contains(&format!("10.213.{n}.")))
            .context("no free 10.213.x.0/24 for the real node's bridge")?;
        let bridge = format!("imagegc{:06x}", rand::random::<u32>() & 0xff_ffff);
        record_host_change(bed_dir, &HostChange::Bridge(bridge.clone()))?;
        let net = Network { bridge, n };
        run("ip", &["link", "add", &net.bridge, "type", "bridge"])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", net.gateway()),
                "dev",
                &net.bridge,
            ],
        )?;
        run("ip", &["link", "set", &net.bridge, "up"])?;
        Ok(net)
    }

    /// The bridge's address: the node's IP and the API server's.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.n, 1)
    }

    /// The pods' subnet.
    pub fn subnet(&self) -> String {
        format!("10.213.{}.0/24", self.n)
    }

    /// How the API server must serve for pods to reach it as the `kubernetes` Service: on the
    /// bridge's address, port 443, with a Service range whose first address is that address.
    pub fn cluster_options(&self) -> ClusterOptions {
        ClusterOptions {
            address: IpAddr::V4(self.gateway()),
            port: Some(443),
            service_cidr: format!("10.213.{}.0/28", self.n),
            node_authorization: true,
        }
    }

    fn cni_config(&self, ipam_dir: &Path) -> String {
        let n = self.n;
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "imagegc-testbed",
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                // The bridge has its address already; isGateway would also turn on IP
                // forwarding for the whole machine, which pods here never need.
                "isGateway": false,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{
                        "subnet": self.subnet(),
                        "rangeStart": format!("10.213.{n}.32"),
                        "rangeEnd": format!("10.213.{n}.250"),
                    }]],
                    "dataDir": ipam_dir,
                },
            }],
        })
        .to_string()
    }
}

/// A running real node.
pub struct RealNode {
    /// The Node's name.
    pub name: String,
    /// containerd's socket, alone in its directory (the chart mounts that directory).
    pub socket: PathBuf,
    /// containerd's root directory (its content and snapshots).
    pub containerd_root: PathBuf,
    /// The kubelet's root directory (pods' volumes).
    pub kubelet_dir: PathBuf,
    /// The pods' network.
    pub network: Network,
    dir: PathBuf,
    // Stopped in this order on drop: kubelet first, containerd last.
    kubelet: Option<Proc>,
    scheduler: Option<Proc>,
    controller_manager: Option<Proc>,
    containerd: Option<Proc>,
}

impl RealNode {
    /// Starts the node `name` under `bed_dir/<name>` on `network`, joined to `cluster` (started
    /// with [`Network::cluster_options`]); waits until the Node is Ready.
    pub async fn start(
        bed_dir: &Path,
        name: &str,
        network: Network,
        cluster: &Cluster,
    ) -> Result<RealNode> {
        check_prerequisites()?;
        let dir = bed_dir.join(name);
        let run_dir = dir.join("run");
        fs::create_dir_all(&run_dir)?;
        let mut node = RealNode {
            name: name.to_string(),
            socket: run_dir.join("containerd.sock"),
            containerd_root: dir.join("containerd"),
            kubelet_dir: dir.join("kubelet"),
            network,
            dir,
            kubelet: None,
            scheduler: None,
            controller_manager: None,
            containerd: None,
        };
        let cgroup = format!("imagegc-testbed-{}", node.network.bridge);
        create_cgroup(bed_dir, &cgroup)?;
        // The kubelet makes these at fixed paths (its device plugin socket, its container log
        // links); whatever was not there before goes with the node.
        for path in ["/var/lib/kubelet", "/var/log/containers"] {
            if !Path::new(path).exists() {
                record_host_change(bed_dir, &HostChange::Created(path.into()))?;
            }
        }
        for path in KUBELET_SYSCTLS {
            let value = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
            record_host_change(
                bed_dir,
                &HostChange::Sysctl(path.into(), value.trim().into()),
            )?;
        }
        node.start_containerd(bed_dir).await?;
        node.import_pause_image().await?;
        node.start_control_plane(bed_dir, cluster)?;
        node.start_kubelet(bed_dir, cluster, &cgroup)?;
        node.wait_ready(cluster, Duration::from_secs(120)).await?;
        Ok(node)
    }

    fn containerd_config(&self) -> String {
        let d = self.dir.display();
        format!(
            r#"version = 3
root = "{root}"
state = "{d}/state"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{d}/state/ttrpc.sock"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{SANDBOX_IMAGE}'
[plugins.'io.containerd.cri.v1.runtime']
  # Lowering oom_score_adj is not permitted on every machine (CRI asks -998 for sandboxes).
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['{CNI_BIN_DIR}']
    conf_dir = '{d}/cni'
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = 'io.containerd.runc.v2'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = '{RUNC}'
      SystemdCgroup = false
[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.internal.v1.opt']
  path = '{d}/opt'
"#,
            root = self.containerd_root.display(),
            sock = self.socket.display(),
        )
    }

    async fn start_containerd(&mut self, bed_dir: &Path) -> Result<()> {
        let bin = tools::go_tool("containerd")?;
        // containerd finds its shim next to itself or on PATH.
        tools::go_tool("containerd-shim-runc-v2")?;
        let cni_dir = self.dir.join("cni");
        fs::create_dir_all(&cni_dir)?;
        fs::write(
            cni_dir.join("10-imagegc-testbed.conflist"),
            self.network.cni_config(&self.dir.join("cni-ipam")),
        )?;
        let config = self.dir.join("containerd.toml");
        fs::write(&config, self.containerd_config())?;
        let path = format!(
            "{}:/usr/sbin:/usr/bin:/sbin:/bin",
            bin.parent().unwrap_or(Path::new("/")).display()
        );
        let mut proc = Proc::spawn(
            &format!("containerd[{}]", self.name),
            &bin,
            &["--config".into(), config.display().to_string()],
            &[("PATH".into(), path)],
            bed_dir,
            &self.dir.join("containerd.log"),
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if !proc.is_running() || Instant::now() > deadline {
                bail!(
                    "containerd of the real node did not serve:\n{}",
                    proc.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.containerd = Some(proc);
        Ok(())
    }

    /// Imports the sandbox image: `hack/pause.c` built static, the only file of its image.
    /// Imported without any label: pinning it is the CRI plugin's job (its `pinned_images`).
    async fn import_pause_image(&self) -> Result<()> {
        let pause = tools::go_tool("pause")?;
        let layer = image::files_tar(&[LayerFile {
            path: "/pause".into(),
            mode: 0o755,
            bytes: fs::read(&pause).with_context(|| format!("reading {}", pause.display()))?,
        }])?;
        let img = ImageBuilder::new("pause")
            .layer_tars(vec![layer])
            .entrypoint(&["/pause"])
            .user("65535:65535")
            .build();
        image::import(
            &self.socket,
            "k8s.io",
            &img,
            &[SANDBOX_IMAGE.to_string()],
            &Default::default(),
        )
        .await
        .context("importing the pause image")
    }

    fn start_control_plane(&mut self, bed_dir: &Path, cluster: &Cluster) -> Result<()> {
        let kcm_kubeconfig = cluster.client_cert_kubeconfig(
            "kube-controller-manager",
            "system:kube-controller-manager",
            None,
        )?;
        let args = vec![
            format!("--kubeconfig={}", kcm_kubeconfig.display()),
            format!("--authentication-kubeconfig={}", kcm_kubeconfig.display()),
            format!("--authorization-kubeconfig={}", kcm_kubeconfig.display()),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()?),
            format!("--cert-dir={}", self.dir.join("kcm-certs").display()),
            "--leader-elect=false".into(),
            "--use-service-account-credentials=true".into(),
            format!(
                "--service-account-private-key-file={}",
                cluster.service_account_key_file().display()
            ),
            format!("--root-ca-file={}", cluster.ca_file().display()),
            "--allocate-node-cidrs=false".into(),
            "--profiling=false".into(),
        ];
        self.controller_manager = Some(Proc::spawn(
            "kube-controller-manager",
            &tools::go_tool("kube-controller-manager")?,
            &args,
            &[],
            bed_dir,
            &self.dir.join("kube-controller-manager.log"),
        )?);

        let sched_kubeconfig =
            cluster.client_cert_kubeconfig("kube-scheduler", "system:kube-scheduler", None)?;
        let sched_config = self.dir.join("kube-scheduler.yaml");
        fs::write(
            &sched_config,
            format!(
                "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\nclientConnection:\n  kubeconfig: {}\nleaderElection:\n  leaderElect: false\n",
                sched_kubeconfig.display()
            ),
        )?;
        let args = vec![
            format!("--config={}", sched_config.display()),
            format!("--authentication-kubeconfig={}", sched_kubeconfig.display()),
            format!("--authorization-kubeconfig={}", sched_kubeconfig.display()),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()?),
            format!("--cert-dir={}", self.dir.join("scheduler-certs").display()),
        ];
        self.scheduler = Some(Proc::spawn(
            "kube-scheduler",
            &tools::go_tool("kube-scheduler")?,
            &args,
            &[],
            bed_dir,
            &self.dir.join("kube-scheduler.log"),
        )?);
        Ok(())
    }

    fn kubelet_config(&self, cluster: &Cluster, cgroup: &str) -> Result<String> {
        let endpoint = format!("unix://{}", self.socket.display());
        Ok(format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {address}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
# This machine has cgroup v1 only, managed by no systemd.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
failSwapOn: false
containerRuntimeEndpoint: {endpoint}
imageServiceEndpoint: {endpoint}
podLogsDir: {logs}
volumePluginDir: {plugins}
makeIPTablesUtilChains: false
registerNode: true
serializeImagePulls: false
nodeStatusUpdateFrequency: 5s
syncFrequency: 10s
# The machine's disk is shared: evict only when it is really full.
evictionHard:
  memory.available: 100Mi
  nodefs.available: 2%
  imagefs.available: 2%
  nodefs.inodesFree: 2%
"#,
            address = self.network.gateway(),
            port = free_port()?,
            healthz = free_port()?,
            ca = cluster.ca_file().display(),
            logs = self.dir.join("pod-logs").display(),
            plugins = self.dir.join("volume-plugins").display(),
        ))
    }

    fn start_kubelet(&mut self, bed_dir: &Path, cluster: &Cluster, cgroup: &str) -> Result<()> {
        let kubeconfig = cluster.client_cert_kubeconfig(
            &format!("kubelet-{}", self.name),
            &format!("system:node:{}", self.name),
            Some("system:nodes"),
        )?;
        let config = self.dir.join("kubelet.yaml");
        fs::write(&config, self.kubelet_config(cluster, cgroup)?)?;
        let args = vec![
            format!("--config={}", config.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--root-dir={}", self.kubelet_dir.display()),
            format!("--cert-dir={}", self.dir.join("kubelet-certs").display()),
            format!("--hostname-override={}", self.name),
            format!("--node-ip={}", self.network.gateway()),
        ];
        self.kubelet = Some(Proc::spawn(
            "kubelet",
            &tools::go_tool("kubelet")?,
            &args,
            &[("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into())],
            bed_dir,
            &self.dir.join("kubelet.log"),
        )?);
        Ok(())
    }

    async fn wait_ready(&mut self, cluster: &Cluster, timeout: Duration) -> Result<()> {
        let nodes = Api::<Node>::all(cluster.admin_client().await?);
        let deadline = Instant::now() + timeout;
        loop {
            for (what, p) in [
                ("kubelet", &mut self.kubelet),
                ("kube-controller-manager", &mut self.controller_manager),
                ("kube-scheduler", &mut self.scheduler),
                ("containerd", &mut self.containerd),
            ] {
                if let Some(p) = p
                    && !p.is_running()
                {
                    bail!("{what} of the real node exited:\n{}", p.log_tail(30));
                }
            }
            if let Some(node) = nodes.get_opt(&self.name).await?
                && is_ready(&node)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                let tail = self
                    .kubelet
                    .as_ref()
                    .map(|p| p.log_tail(30))
                    .unwrap_or_default();
                bail!(
                    "node {} not Ready after {timeout:?}; kubelet log:\n{tail}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Imports an OCI archive (`make image`'s) into the node's `k8s.io` namespace with `ctr`,
    /// as an operator would on a node without a registry.
    pub fn ctr_import(&self, archive: &Path) -> Result<String> {
        let out = std::process::Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io", "images", "import"])
            .arg(archive)
            .output()
            .context("running ctr (Debian package containerd)")?;
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("ctr images import {}: {text}", archive.display());
        }
        Ok(text)
    }

    /// The node's directory (logs of its daemons, their configuration).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The kubelet's log file.
    pub fn kubelet_log(&self) -> PathBuf {
        self.dir.join("kubelet.log")
    }

    /// Where the kubelet keeps containers' logs (`<namespace>_<pod>_<uid>/<container>/N.log`).
    pub fn pod_logs_dir(&self) -> PathBuf {
        self.dir.join("pod-logs")
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        // The kubelet first, so it restarts nothing; the pods' processes, mounts and network
        // namespaces are released with the bed's host state, after containerd is gone.
        for p in [
            &mut self.kubelet,
            &mut self.scheduler,
            &mut self.controller_manager,
            &mut self.containerd,
        ] {
            if let Some(mut p) = p.take() {
                p.stop(Duration::from_secs(10));
            }
        }
    }
}

fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn check_prerequisites() -> Result<()> {
    for (path, package) in [
        (RUNC, "runc"),
        ("/usr/lib/cni/bridge", "containernetworking-plugins"),
        ("/usr/lib/cni/host-local", "containernetworking-plugins"),
        ("/usr/lib/cni/loopback", "containernetworking-plugins"),
        ("/usr/bin/ctr", "containerd"),
    ] {
        if !Path::new(path).exists() {
            bail!("the real node needs {path}: apt-get install {package} (make deps does)");
        }
    }
    if !is_root() {
        bail!("the real node needs root (it makes a bridge, cgroups and mounts)");
    }
    Ok(())
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0")
}

/// Creates cgroup `name` in every cgroup v1 hierarchy (the kubelet's `cgroupRoot`), with the
/// parent's CPUs and memory nodes so that pods can be placed in it.
fn create_cgroup(bed_dir: &Path, name: &str) -> Result<()> {
    record_host_change(bed_dir, &HostChange::Cgroup(name.into()))?;
    for entry in fs::read_dir("/sys/fs/cgroup").context("reading /sys/fs/cgroup")? {
        let entry = entry?;
        if entry.file_type()?.is_symlink() || entry.file_name() == "unified" {
            continue;
        }
        let dir = entry.path().join(name);
        fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = fs::read_to_string(entry.path().join(file)) {
                fs::write(dir.join(file), value.trim())
                    .with_context(|| format!("writing {}", dir.join(file).display()))?;
            }
        }
    }
    Ok(())
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
