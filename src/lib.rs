//! imagegc: remove container images from Kubernetes nodes with the exact semantics of
//! containerd's CRI `RemoveImage`, safer (pinned and in-use images are protected), batched
//! (one garbage collection per batch) and crash-safe.
//!
//! Layout mirrors the architecture:
//! - [`core`]: pure functions over plain data — reference grammar, platform selection,
//!   the CRI view of a namespace, resolution and planning. No sockets, no clocks.
//! - [`runtime`]: the node's container runtime, whichever it is: socket detection, the
//!   backend choice, one error type. Its two backends are thin gRPC shells that read the
//!   node's images into the core's types and execute a plan:
//!   - [`containerd`]: containerd's own API (full semantics, crash-safe journal, labels);
//!   - [`cri`]: the CRI API alone (CRI-O and any CRI runtime), removal by image ID.
//! - [`api`]: the Kubernetes objects (CRDs generated from these types).
//! - [`agent`]: `imagegc agent`, the per-node DaemonSet.
//! - [`controller`]: `imagegc controller` — folds NodeImageReports into ImageRemoval status.
//! - [`check`]: `imagegc check`, the chart's `helm test`.
//! - [`events`], [`serve`], [`watch`]: what the long-running processes share — Events,
//!   logging, `/metrics`, `/livez`, `/readyz`, shutdown, watches one bad object cannot wedge.
//! - [`kube_client`]: the agent's API client, one HTTP/2 connection for all its watches.
#![forbid(unsafe_code)]
// No function over 100 lines (clippy's default): long-running shells are named steps.
#![warn(clippy::too_many_lines)]

pub mod agent;
pub mod api;
pub mod check;
pub mod cli;
pub mod containerd;
pub mod controller;
pub mod core;
pub mod cri;
pub mod events;
pub mod kube_client;
pub mod runtime;
pub mod serve;
pub mod watch;
