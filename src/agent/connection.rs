//! The agent's connection to the node's container runtime: one remembered connection,
//! dropped on failure so the next call reconnects (the runtime may have restarted), the
//! node's images read with the node's pods counting as in use, readiness following whether
//! the runtime answers, and the first-seen and last-used labels written at each reading.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::Store;

use super::pods;
use crate::containerd::Executed;
use crate::core::inventory::{ImageRecord, Inventory};
use crate::core::last_used;
use crate::core::plan::Plan;
use crate::core::platform::{Matcher, Platform};
use crate::runtime::{Connector, Runtime, RuntimeError};
use crate::serve::Health;

/// An image in constant use has its last-used label rewritten at most this often (seconds).
const LAST_USED_REFRESH: i64 = 3600;

/// The node's images as one reading saw them: the CRI view and the records it was built from.
pub(super) struct Reading {
    /// The images, those of the node's pods marked in use.
    pub inventory: Inventory,
    /// The image records (containerd's; empty on the CRI backend).
    pub records: Vec<ImageRecord>,
    /// The connection it was read on.
    pub runtime: Runtime,
}

/// The runtime connection and what depends on it.
pub(super) struct Connection {
    connector: Connector,
    matcher: Matcher,
    runtime: Option<Runtime>,
    /// The node's own pods (slimmed): their images count as in use.
    pods: Store<Pod>,
    /// Whether the last call succeeded (logs only the transitions).
    answering: bool,
    health: Health,
}

impl Connection {
    /// A connection made on first use through `connector`.
    pub fn new(connector: Connector, pods: Store<Pod>, health: Health) -> Connection {
        Connection {
            connector,
            matcher: Matcher::only(Platform::host()),
            runtime: None,
            pods,
            answering: true,
            health,
        }
    }

    /// The readiness the agent reports.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Connects (once) to the runtime, remembering a working connection; the choice of socket
    /// and backend is logged.
    async fn runtime(&mut self) -> Result<Runtime, RuntimeError> {
        if let Some(rt) = &self.runtime {
            return Ok(rt.clone());
        }
        let rt = self.connector.connect(true).await?;
        self.runtime = Some(rt.clone());
        Ok(rt)
    }

    /// Reads the node's images (and the records they were built from), the images of the
    /// node's pods counting as in use; a failure marks the agent not ready.
    pub async fn read(&mut self) -> Result<Reading, RuntimeError> {
        let result = async {
            let runtime = self.runtime().await?;
            let (mut inventory, records) = runtime.inventory_and_records(&self.matcher).await?;
            pods::mark_in_use(&mut inventory, self.pods.state().iter().map(|p| &**p));
            Ok(Reading {
                inventory,
                records,
                runtime,
            })
        }
        .await;
        self.answered(result.as_ref().err());
        result
    }

    /// Reads the node's images and writes the labels that reading calls for (see
    /// [`stamp_first_seen_and_last_used`]).
    pub async fn read_and_stamp(&mut self) -> Result<Reading, RuntimeError> {
        let reading = self.read().await?;
        stamp_first_seen_and_last_used(&reading).await;
        Ok(reading)
    }

    /// Executes `plan` on `runtime`; a failure drops the connection and marks the agent not
    /// ready.
    pub async fn execute(
        &mut self,
        runtime: &Runtime,
        plan: Plan,
    ) -> Result<Executed, RuntimeError> {
        runtime.execute(plan).await.inspect_err(|_| {
            self.runtime = None;
            self.health.set_ready(false);
        })
    }

    /// Records whether the runtime answered: readiness, one log line per transition, and a
    /// fresh connection next time after a failure.
    fn answered(&mut self, error: Option<&RuntimeError>) {
        let ok = error.is_none();
        self.health.set_ready(ok);
        if ok != self.answering {
            match error {
                None => tracing::info!("the container runtime answers again"),
                Some(e) => tracing::warn!(
                    error = %e,
                    "the container runtime does not answer; not ready, retrying until it does"
                ),
            }
            self.answering = ok;
        }
        if !ok {
            self.runtime = None;
        }
    }
}

/// Labels the records of new images with when they were first seen, and those of images in
/// use with when they were last used (see `core::last_used`).
async fn stamp_first_seen_and_last_used(reading: &Reading) {
    let stamps = last_used::stamps(
        &reading.inventory,
        &reading.records,
        Timestamp::now().as_second(),
        LAST_USED_REFRESH,
    );
    if stamps.is_empty() {
        return;
    }
    let by_name: HashMap<&str, _> = reading
        .records
        .iter()
        .map(|r| (r.name.as_str(), r))
        .collect();
    for stamp in &stamps {
        let Some(record) = by_name.get(stamp.record.as_str()) else {
            continue;
        };
        if let Err(e) = reading
            .runtime
            .label_record(record, stamp.key, &stamp.value)
            .await
        {
            // Deleted meanwhile (kubelet's GC, a removal): the next pass sees the truth.
            tracing::debug!(record = %stamp.record, error = %e, "labelling a record failed");
        }
    }
    tracing::debug!(
        labels = stamps.len(),
        "first-seen and last-used labels written"
    );
}
