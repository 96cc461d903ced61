//! What every end-to-end test shares: one tokio runtime, fresh test beds, and ways to look at a
//! node's containerd (its records, its content, the CRI plugin's view).

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::LazyLock;

use anyhow::{Context, Result};
use libtest_mimic::{Failed, Trial};
use testbed::image::{self, BuiltImage};
use testbed::{Flavor, Options, TestBed};

pub use testbed::cri::{NS, state};

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
        real_node: false,
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

/// Runs the `imagegc` binary with `args`; returns (exit code, stdout, stderr).
pub fn imagegc(args: &[&str]) -> Result<(i32, String, String)> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imagegc"))
        .args(args)
        .env_remove("IMAGEGC_SOCKET")
        .env_remove("IMAGEGC_NAMESPACE")
        .env_remove("IMAGEGC_RUNTIME")
        .output()
        .context("running imagegc")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `GET http://127.0.0.1:<port><path>`; returns (status code, body). Enough HTTP for the
/// processes' own `/metrics`, `/livez` and `/readyz`.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("HTTP response without a blank line")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .context("HTTP status line")?
        .parse()?;
    Ok((code, body.to_string()))
}

/// The `imagegc` binary the long-running processes are started from: `IMAGEGC_BIN` if set
/// (`make bench-operator` measures a release build), else the one Cargo built for this test.
pub fn imagegc_bin() -> std::path::PathBuf {
    std::env::var_os("IMAGEGC_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_imagegc").into())
}

/// Waits up to 30 s until `path` on `port` answers 200.
pub async fn wait_http_ok(port: u16, path: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = http_get(port, path).await {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{path} on port {port} did not answer 200 in 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
