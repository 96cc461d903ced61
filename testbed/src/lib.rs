//! The real local test bed for imagegc: N containerd daemons (one per simulated node, CRI
//! plugin on the same socket), etcd + kube-apiserver on loopback with generated certificates,
//! and a builder that makes OCI test images and imports them with no registry.
//!
//! Every process is started by this crate and stopped by it on every exit path (drop, panic,
//! SIGINT/SIGTERM via [`process::install_signal_handler`], and the kernel's parent-death
//! signal if the test process is SIGKILLed); every directory lives under
//! [`process::base_dir`] and is removed likewise.

pub mod cluster;
pub mod containerd;
pub mod cri;
pub mod crio;
pub mod image;
pub mod imagegc_image;
pub mod node;
pub mod process;
pub mod sockets;
pub mod tools;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

pub use cluster::Cluster;
pub use containerd::{Containerd, Flavor};
pub use node::RealNode;
pub use process::BedDir;

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of simulated nodes (containerd daemons), named `node-0`, `node-1`, ….
    pub nodes: usize,
    /// Which containerd the nodes run.
    pub flavor: Flavor,
    /// Whether to start etcd + kube-apiserver.
    pub cluster: bool,
    /// Whether to start a real node (kubelet, controller-manager, scheduler, containerd with
    /// runc and CNI) named [`REAL_NODE_NAME`]; implies `cluster`.
    pub real_node: bool,
}

/// The real node's name.
pub const REAL_NODE_NAME: &str = "real-node";

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 3,
            flavor: Flavor::from_env(),
            cluster: true,
            real_node: false,
        }
    }
}

/// A running bed. Dropping it stops every process and removes its directory.
pub struct TestBed {
    /// The real node, if requested (stopped before the API server).
    pub real_node: Option<RealNode>,
    /// The simulated nodes' containerd daemons.
    pub nodes: Vec<Containerd>,
    /// The API server, if requested.
    pub cluster: Option<Cluster>,
    // Declared last so it is dropped after the processes that use it.
    dir: BedDir,
}

impl TestBed {
    /// Starts a bed as described by `opts`.
    pub async fn start(opts: &Options) -> Result<TestBed> {
        process::install_signal_handler();
        let dir = BedDir::new()?;
        let mut nodes = Vec::with_capacity(opts.nodes);
        for i in 0..opts.nodes {
            nodes.push(Containerd::start(
                dir.path(),
                &format!("node-{i}"),
                opts.flavor,
            )?);
        }
        let network = if opts.real_node {
            Some(node::Network::create(dir.path())?)
        } else {
            None
        };
        let cluster = match &network {
            Some(net) => Some(Cluster::start_with(dir.path(), &net.cluster_options()).await?),
            None if opts.cluster => Some(Cluster::start(dir.path()).await?),
            None => None,
        };
        let real_node = match (network, &cluster) {
            (Some(net), Some(c)) => {
                Some(RealNode::start(dir.path(), REAL_NODE_NAME, net, c).await?)
            }
            _ => None,
        };
        Ok(TestBed {
            real_node,
            nodes,
            cluster,
            dir,
        })
    }

    /// The bed's directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The cluster, or an error saying the bed was started without one.
    pub fn cluster(&self) -> Result<&Cluster> {
        self.cluster
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("this test bed was started without a cluster"))
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or fails after `timeout` with `what` and
/// the last error `f` returned.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a benchmark's `main` future on a 2-thread runtime, then stops whatever the bed left
/// running. The bed must live inside `run`, so it is dropped (daemons stopped, directory
/// removed) on every return path before the final sweep.
pub fn run_bench<T>(run: impl Future<Output = Result<T>>) -> Result<T> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(run);
    drop(runtime);
    process::cleanup_all();
    result
}
