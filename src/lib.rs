//! imagegc: remove container images from Kubernetes nodes with the exact semantics of
//! containerd's CRI `RemoveImage`, safer (pinned and in-use images are protected), batched
//! (one garbage collection per batch) and crash-safe.
//!
//! Layout mirrors the architecture:
//! - [`core`]: pure functions over plain data — reference grammar, platform selection,
//!   the CRI view of a namespace, resolution and planning. No sockets, no clocks.
//! - [`containerd`]: the thin gRPC shell that reads a namespace into the core's types and
//!   executes a plan.
//! - [`api`]: the Kubernetes objects (CRDs generated from these types).
//! - [`agent`]: `imagegc agent`, the per-node DaemonSet.
//! - [`controller`]: `imagegc controller` — folds NodeImageReports into ImageRemoval status.
//! - [`check`]: `imagegc check`, the chart's `helm test`.
//! - [`events`], [`serve`], [`watch`]: what the long-running processes share — Events,
//!   logging, `/metrics`, `/livez`, `/readyz`, shutdown, watches one bad object cannot wedge.
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod check;
pub mod cli;
pub mod containerd;
pub mod controller;
pub mod core;
pub mod events;
pub mod serve;
pub mod watch;
