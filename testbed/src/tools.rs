//! Where the bed's binaries come from: `KUBEBUILDER_ASSETS` (the envtest convention) if it holds
//! the binary, else the cache filled by `hack/tools.sh` (built from pinned Go modules; built on
//! first use if missing), else a clear error saying what is missing and how to provide it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

/// The repository root (the test bed crate lives in `<root>/testbed`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of a Go-built tool: `kube-apiserver`, `etcd`, `kubectl`, `helm`, `containerd`, `crictl`.
pub fn go_tool(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS") {
        let p = Path::new(&dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let script = repo_root().join("hack/tools.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("path")
        .arg(name)
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let p = Path::new(&dir).join(name);
            if p.is_file() {
                return Ok(p);
            }
            bail!("{name} is missing: {} did not produce it", script.display())
        }
        Ok(out) => bail!(
            "{name} is missing and could not be built ({}): {}; run `hack/tools.sh all` \
             with Go and the Go module proxy reachable, or set KUBEBUILDER_ASSETS to a \
             directory holding kube-apiserver, etcd and kubectl",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("no output")
        ),
        Err(e) => bail!("{name} is missing: cannot run {}: {e}", script.display()),
    }
}

/// Path of Debian's packaged containerd 1.6 (`apt-get install containerd`).
pub fn debian_containerd() -> Result<PathBuf> {
    let p = PathBuf::from("/usr/bin/containerd");
    if p.is_file() {
        Ok(p)
    } else {
        bail!(
            "Debian's containerd 1.6 is missing: run `apt-get install containerd` (make deps does)"
        )
    }
}
