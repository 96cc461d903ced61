//! The node's container runtime, whichever it is: the agent and the local commands talk to
//! [`Runtime`] and never care which backend answers.
//!
//! - [`crate::containerd`]: containerd's own API. The full semantics: every image record,
//!   content sizes, first-seen and last-used labels, a removal journal for crash safety.
//! - [`crate::cri`]: the CRI API alone, for CRI-O and any other CRI runtime. Inventory from
//!   `ListImages`/`ListContainers`, removal by image ID through `RemoveImage`.
//!
//! [`Connector`] finds the socket ([`detect`]: the known paths of containerd, k3s/RKE2,
//! microk8s, k0s and CRI-O when none is given), picks the backend, and remembers what the
//! CRI backend cannot store on the node (first-seen and last-used) across reconnections.

pub mod detect;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use tonic::Status;

use crate::containerd::{self, Executed, ReadStats};
use crate::core::inventory::{ImageRecord, Inventory};
use crate::core::plan::Plan;
use crate::core::platform::Matcher;
use crate::cri;
use detect::{Api, Probe};

/// How long a socket may take to answer the first call before it counts as not a runtime: a
/// wrong socket fails loudly instead of hanging.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which API to use on the socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// containerd's own API where the socket serves it, else the CRI API.
    #[default]
    Auto,
    /// containerd's own API (containerd, k3s, RKE2, microk8s, k0s).
    Containerd,
    /// The CRI API (CRI-O, or any CRI runtime; containerd's CRI plugin too).
    Cri,
}

impl Backend {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Containerd => "containerd",
            Backend::Cri => "cri",
        }
    }
}

/// Errors talking to the container runtime, each naming the socket or object and what to do.
/// One type for both backends: the agent retries, counts and reports them alike.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The socket file does not exist.
    #[error(
        "socket {0} does not exist: is the container runtime running, and is this the right path (--socket)?"
    )]
    SocketMissing(PathBuf),
    /// The socket exists but we may not connect.
    #[error(
        "permission denied on container runtime socket {0}: run as root or as a user allowed to use it"
    )]
    PermissionDenied(PathBuf),
    /// Connecting failed for another reason.
    #[error("cannot connect to {socket}: {reason}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        reason: String,
    },
    /// The socket accepted the connection but did not answer in time.
    #[error(
        "{socket} did not answer within {}s: is it a container runtime's socket (--socket)?",
        .after.as_secs()
    )]
    Timeout {
        /// The socket.
        socket: PathBuf,
        /// How long we waited.
        after: Duration,
    },
    /// The socket answers, but not the API that was asked for.
    #[error("{socket} does not serve {wanted}: {reason}; {hint}")]
    WrongApi {
        /// The socket.
        socket: PathBuf,
        /// The API asked for.
        wanted: &'static str,
        /// What it said.
        reason: String,
        /// What to do.
        hint: &'static str,
    },
    /// No socket was given and none of the known ones answers.
    #[error(
        "no container runtime found: {tried}; mount the runtime's socket and set --socket (and --runtime)"
    )]
    NotFound {
        /// Each known path and why it was not taken.
        tried: String,
    },
    /// The namespace name is not valid for containerd.
    #[error(
        "invalid containerd namespace {0:?}: use letters, digits, '.', '_' and '-' (e.g. k8s.io)"
    )]
    InvalidNamespace(String),
    /// A gRPC call failed.
    #[error("{op} failed: {status}")]
    Call {
        /// The runtime and operation, with its object (`containerd delete image x:1`).
        op: String,
        /// The gRPC status.
        status: Box<Status>,
    },
    /// The runtime said an image was removed, but it is still listed after retries.
    #[error(
        "CRI RemoveImage {id} succeeded but the runtime still lists the image after {attempts} attempts"
    )]
    NotRemoved {
        /// The image ID.
        id: String,
        /// How many times it was asked.
        attempts: usize,
    },
}

impl RuntimeError {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            RuntimeError::SocketMissing(_) => "socket_missing",
            RuntimeError::PermissionDenied(_) => "permission_denied",
            RuntimeError::Connect { .. } => "connect",
            RuntimeError::Timeout { .. } => "timeout",
            RuntimeError::WrongApi { .. } => "wrong_api",
            RuntimeError::NotFound { .. } => "not_found",
            RuntimeError::InvalidNamespace(_) => "invalid_namespace",
            RuntimeError::Call { .. } => "call",
            RuntimeError::NotRemoved { .. } => "not_removed",
        }
    }
}

/// Checks that `socket` can be connected to, with an error that says why not (tonic reports
/// every failure as "transport error").
pub fn check_socket(socket: &Path) -> Result<(), RuntimeError> {
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => Ok(()),
        Err(e) => Err(match e.kind() {
            std::io::ErrorKind::NotFound => RuntimeError::SocketMissing(socket.into()),
            std::io::ErrorKind::PermissionDenied => RuntimeError::PermissionDenied(socket.into()),
            _ => RuntimeError::Connect {
                socket: socket.into(),
                reason: e.to_string(),
            },
        }),
    }
}

/// A gRPC channel to `socket`, given up after [`PROBE_TIMEOUT`].
pub async fn channel(socket: &Path) -> Result<tonic::transport::Channel, RuntimeError> {
    check_socket(socket)?;
    match tokio::time::timeout(PROBE_TIMEOUT, containerd_client::connect(socket)).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(RuntimeError::Connect {
            socket: socket.into(),
            reason: e.to_string(),
        }),
        Err(_) => Err(RuntimeError::Timeout {
            socket: socket.into(),
            after: PROBE_TIMEOUT,
        }),
    }
}

/// The flags that say where the runtime is, shared by `imagegc images`, `imagegc rmi` and
/// `imagegc agent`.
#[derive(Clone, Debug, clap::Args)]
pub struct RuntimeArgs {
    /// The runtime's gRPC socket (default: the first of the known sockets of containerd,
    /// k3s/RKE2, microk8s, k0s and CRI-O that answers).
    #[arg(long, env = "IMAGEGC_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Which API to use: containerd's own (full semantics), CRI (CRI-O, any CRI runtime), or
    /// auto (containerd's where the socket serves it, else CRI).
    #[arg(long, env = "IMAGEGC_RUNTIME", value_enum, default_value = "auto")]
    pub runtime: Backend,
    /// containerd namespace (the CRI plugin uses k8s.io; not used with CRI).
    #[arg(long, short = 'n', env = "IMAGEGC_NAMESPACE", default_value = containerd::DEFAULT_NAMESPACE)]
    pub namespace: String,
}

impl RuntimeArgs {
    /// A connector for these flags.
    pub fn connector(&self) -> Connector {
        Connector::new(self.socket.clone(), self.runtime, &self.namespace)
    }
}

/// Where and how to reach the runtime: the flags, and what the CRI backend remembers.
#[derive(Clone, Debug)]
pub struct Connector {
    socket: Option<PathBuf>,
    backend: Backend,
    namespace: String,
    /// First-seen and last-used of the CRI backend's images (kept here so they outlive a
    /// reconnection; they do not outlive the process).
    memory: Arc<cri::Memory>,
}

impl Connector {
    /// A connector for `socket` (none: detect among [`detect::KNOWN_SOCKETS`]), `backend` and,
    /// for containerd, `namespace`.
    pub fn new(socket: Option<PathBuf>, backend: Backend, namespace: &str) -> Connector {
        Connector {
            socket: socket.filter(|s| !s.as_os_str().is_empty()),
            backend,
            namespace: namespace.to_string(),
            memory: Arc::default(),
        }
    }

    /// Connects: probes the given socket, or the known ones, picks the backend and logs the
    /// choice and why (at `info` when `verbose`, else `debug`).
    pub async fn connect(&self, verbose: bool) -> Result<Runtime, RuntimeError> {
        if self.backend != Backend::Cri && !containerd::valid_namespace(&self.namespace) {
            return Err(RuntimeError::InvalidNamespace(self.namespace.clone()));
        }
        let (socket, api, why) = match &self.socket {
            Some(socket) => {
                let probe = detect::probe(socket, self.backend).await;
                let api = detect::accept(probe, self.backend)?;
                (
                    socket.clone(),
                    api,
                    format!("--socket {}", socket.display()),
                )
            }
            None => {
                // All at once: a silent socket costs one timeout, not one per path.
                let mut pending = Vec::new();
                for known in detect::KNOWN_SOCKETS {
                    pending.push(detect::probe(Path::new(known.path), self.backend));
                }
                let probes: Vec<Probe> = futures::future::join_all(pending).await;
                let choice = detect::choose(probes, self.backend)?;
                (choice.socket, choice.api, choice.why)
            }
        };
        let rt = match api {
            Api::Containerd { .. } => {
                Runtime::Containerd(containerd::Runtime::connect(&socket, &self.namespace).await?)
            }
            Api::Cri { .. } => {
                Runtime::Cri(cri::Runtime::connect(&socket, self.memory.clone()).await?)
            }
        };
        if verbose {
            tracing::info!(socket = %socket.display(), backend = rt.backend(), api = %api, why = %why, "container runtime chosen");
        } else {
            tracing::debug!(socket = %socket.display(), backend = rt.backend(), api = %api, why = %why, "container runtime chosen");
        }
        Ok(rt)
    }
}

/// A connection to the node's runtime through one backend.
#[derive(Clone)]
pub enum Runtime {
    /// containerd's own API.
    Containerd(containerd::Runtime),
    /// The CRI API.
    Cri(cri::Runtime),
}

impl Runtime {
    /// `containerd` or `cri`.
    pub fn backend(&self) -> &'static str {
        match self {
            Runtime::Containerd(_) => Backend::Containerd.as_str(),
            Runtime::Cri(_) => Backend::Cri.as_str(),
        }
    }

    /// Where the images are, in words (`namespace k8s.io at <socket>`, `CRI at <socket>`).
    pub fn location(&self) -> String {
        match self {
            Runtime::Containerd(rt) => {
                format!("namespace {} at {}", rt.namespace(), rt.socket().display())
            }
            Runtime::Cri(rt) => format!("CRI at {}", rt.socket().display()),
        }
    }

    /// The node's images as the core sees them.
    pub async fn inventory(&self, matcher: &Matcher) -> Result<Inventory, RuntimeError> {
        Ok(self.inventory_and_records(matcher).await?.0)
    }

    /// The inventory and the records whose labels say when each image was first seen and last
    /// used (on CRI: records made up from what this process remembers).
    pub async fn inventory_and_records(
        &self,
        matcher: &Matcher,
    ) -> Result<(Inventory, Vec<ImageRecord>), RuntimeError> {
        match self {
            Runtime::Containerd(rt) => rt.inventory_and_records(matcher).await,
            Runtime::Cri(rt) => rt.inventory_and_records().await,
        }
    }

    /// [`Runtime::inventory_and_records`] with as few content reads as the listings allow (for
    /// showing the node's images; see [`containerd::Runtime::inventory_listed`]). The CRI
    /// backend's inventory is one listing already: its stats are empty.
    pub async fn inventory_listed(
        &self,
        matcher: &Matcher,
    ) -> Result<(Inventory, Vec<ImageRecord>, ReadStats), RuntimeError> {
        match self {
            Runtime::Containerd(rt) => rt.inventory_listed(matcher).await,
            Runtime::Cri(rt) => {
                let (inventory, records) = rt.inventory_and_records().await?;
                Ok((inventory, records, ReadStats::default()))
            }
        }
    }

    /// The inventory a removal of `request` needs, reading content only for what it may delete
    /// (see [`containerd::Runtime::inventory_for`]). The CRI backend's inventory is one listing
    /// already: its stats are empty.
    pub async fn inventory_for(
        &self,
        request: &[String],
        matcher: &Matcher,
    ) -> Result<(Inventory, ReadStats), RuntimeError> {
        match self {
            Runtime::Containerd(rt) => rt.inventory_for(request, matcher).await,
            Runtime::Cri(rt) => Ok((rt.inventory_and_records().await?.0, ReadStats::default())),
        }
    }

    /// Sets `key=value` on `record` (on CRI: in this process's memory).
    pub async fn label_record(
        &self,
        record: &ImageRecord,
        key: &str,
        value: &str,
    ) -> Result<(), RuntimeError> {
        match self {
            Runtime::Containerd(rt) => rt.label_record(record, key, value).await,
            Runtime::Cri(rt) => {
                rt.remember(record, key, value);
                Ok(())
            }
        }
    }

    /// Bytes the images take: containerd's content (shared layers once); on CRI, the image
    /// filesystem's usage as the runtime reports it (`ImageFsInfo`).
    pub async fn image_bytes(&self) -> Result<i64, RuntimeError> {
        match self {
            Runtime::Containerd(rt) => Ok(rt.content_sizes().await?.values().sum()),
            Runtime::Cri(rt) => rt.image_fs_used().await,
        }
    }

    /// One item per container created, for as long as the connection lasts. The CRI backend
    /// yields nothing (it sees containers at each inventory instead).
    pub async fn container_creations(&self) -> Result<BoxStream<'static, ()>, RuntimeError> {
        use futures::StreamExt;
        match self {
            Runtime::Containerd(rt) => Ok(rt.container_creations().await?.boxed()),
            Runtime::Cri(_) => Ok(futures::stream::pending().boxed()),
        }
    }

    /// Carries out `plan`.
    pub async fn execute(&self, plan: Plan) -> Result<Executed, RuntimeError> {
        match self {
            Runtime::Containerd(rt) => containerd::execute(rt, plan).await,
            Runtime::Cri(rt) => cri::execute(rt, plan).await,
        }
    }
}
