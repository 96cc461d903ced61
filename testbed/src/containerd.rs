//! containerd daemons, one per simulated node: own root, state, socket and config under the
//! bed directory, CRI plugin enabled on the same socket.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::process::Proc;
use crate::tools;

/// Which containerd to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// containerd 2.x built from its Go module (the default).
    V2,
    /// Debian's packaged containerd 1.6.
    Debian16,
}

impl Flavor {
    /// From `IMAGEGC_CONTAINERD` (`v2` or `1.6`), defaulting to 2.x.
    pub fn from_env() -> Flavor {
        match std::env::var("IMAGEGC_CONTAINERD").as_deref() {
            Ok("1.6") | Ok("debian") => Flavor::Debian16,
            _ => Flavor::V2,
        }
    }

    /// A short label for test names and logs.
    pub fn label(self) -> &'static str {
        match self {
            Flavor::V2 => "containerd-2",
            Flavor::Debian16 => "containerd-1.6",
        }
    }
}

/// The sandbox image the CRI plugin pins (2.x pins it by config; 1.6.20 predates pinning).
pub const SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.10";

/// One running containerd daemon.
pub struct Containerd {
    /// The simulated node's name.
    pub node: String,
    /// Which containerd this is.
    pub flavor: Flavor,
    /// Its gRPC socket (Images, Content, Containers and the CRI API).
    pub socket: PathBuf,
    /// Its root directory (content and snapshots live here).
    pub root: PathBuf,
    dir: PathBuf,
    proc: Option<Proc>,
    /// Whether `root` is a filesystem this bed mounted (unmounted when the daemon stops).
    mounted: bool,
}

impl Containerd {
    /// Starts a daemon for `node` under `bed_dir/<node>` and waits until it serves.
    pub fn start(bed_dir: &Path, node: &str, flavor: Flavor) -> Result<Containerd> {
        let dir = bed_dir.join(node);
        fs::create_dir_all(&dir)?;
        let mut c = Containerd {
            node: node.to_string(),
            flavor,
            socket: dir.join("containerd.sock"),
            root: dir.join("root"),
            dir,
            proc: None,
            mounted: false,
        };
        c.restart()?;
        Ok(c)
    }

    fn write_config(&self) -> Result<PathBuf> {
        let d = &self.dir;
        let cfg = match self.flavor {
            Flavor::V2 => format!(
                r#"version = 3
root = "{root}"
state = "{d}/state"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{d}/ttrpc.sock"
[debug]
  level = "info"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'native'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{SANDBOX_IMAGE}'
[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.internal.v1.opt']
  path = '{d}/opt'
"#,
                root = self.root.display(),
                d = d.display(),
                sock = self.socket.display()
            ),
            Flavor::Debian16 => format!(
                r#"version = 2
root = "{root}"
state = "{d}/state"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{d}/ttrpc.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  disable_tcp_service = true
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "native"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
                root = self.root.display(),
                d = d.display(),
                sock = self.socket.display()
            ),
        };
        let path = d.join("config.toml");
        fs::write(&path, cfg)?;
        Ok(path)
    }

    /// (Re)starts the daemon with the same root, state and socket; waits until it serves.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(10));
        }
        let bin = match self.flavor {
            Flavor::V2 => tools::go_tool("containerd")?,
            Flavor::Debian16 => tools::debian_containerd()?,
        };
        let config = self.write_config()?;
        let _ = fs::remove_file(&self.socket);
        let proc = Proc::spawn(
            &format!("containerd[{}]", self.node),
            &bin,
            &["--config".into(), config.display().to_string()],
            &[],
            self.dir.parent().unwrap_or(&self.dir),
            &self.dir.join("containerd.log"),
        )?;
        self.proc = Some(proc);
        self.wait_serving(Duration::from_secs(30))
    }

    fn wait_serving(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.proc.as_mut()
                && !p.is_running()
            {
                bail!(
                    "containerd for {} exited during start-up:\n{}",
                    self.node,
                    p.log_tail(20)
                );
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd for {} did not serve {} in {timeout:?}",
                    self.node,
                    self.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Gives the daemon a root of its own, a tmpfs of `bytes` (a real, small filesystem whose
    /// usage the images fill), and restarts it on it. What the old root held is hidden: call
    /// this before importing anything. Unmounted when the daemon is dropped.
    pub fn use_small_filesystem(&mut self, bytes: u64) -> Result<()> {
        self.stop();
        fs::create_dir_all(&self.root)?;
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0700"),
                "tmpfs",
            ])
            .arg(&self.root)
            .output()?;
        if !out.status.success() {
            bail!(
                "mounting a {bytes}-byte tmpfs on {} failed (this needs root): {}",
                self.root.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.mounted = true;
        self.restart()
    }

    /// SIGKILLs the daemon (fault injection); [`Containerd::restart`] brings it back.
    pub fn kill_hard(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill_hard();
        }
    }

    /// Stops the daemon gracefully.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    /// The daemon's PID, if running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// The daemon's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.mounted {
            self.stop();
            // Lazy: the bed's directory can then be removed even if something still holds
            // a file open in it.
            let _ = std::process::Command::new("umount")
                .arg("--lazy")
                .arg(&self.root)
                .status();
        }
    }
}
