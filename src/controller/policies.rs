//! The shell around [`super::policy_fold`]: folds every ImagePrunePolicy whenever a policy, a
//! report or a Node's labels change (at most once per debounce interval), writes the status
//! that changed, and publishes a Warning Event when a policy becomes invalid.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::Notify;

use super::{Debounce, Metrics, RESYNC, Stores, Synced, policy_fold};
use crate::api::{ImagePrunePolicy, ImagePrunePolicyStatus, READY};
use crate::events::{Publisher, Severity};
use crate::serve::Shutdown;

/// What the policy loop reads and writes with.
pub(super) struct PolicyLoop {
    pub client: Client,
    pub publisher: Publisher,
    pub metrics: Metrics,
    pub synced: Synced,
    pub policies: Store<ImagePrunePolicy>,
    pub stores: Stores,
    /// Pinged by every policy, report and Node label change.
    pub changed: Arc<Notify>,
    /// The least time between two passes (as between two writes of a removal's status:
    /// every status write reaches every agent's watch).
    pub debounce: Debounce,
}

fn ready_status(status: Option<&ImagePrunePolicyStatus>) -> Option<String> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| c.status.clone())
}

impl PolicyLoop {
    /// Runs until `shutdown`.
    pub(super) async fn run(self, mut shutdown: Shutdown) {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = self.synced.wait_for(Synced::ALL | Synced::POLICIES) => {}
        }
        loop {
            self.pass().await;
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(RESYNC) => {}
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(self.interval()) => {}
            }
        }
    }

    /// The time between two passes: the removals' write interval for the cluster's node count.
    fn interval(&self) -> Duration {
        let nodes = i32::try_from(self.stores.nodes.state().len()).unwrap_or(i32::MAX);
        self.debounce.interval(nodes)
    }

    /// Folds every policy and writes the statuses that changed.
    async fn pass(&self) {
        let now = Timestamp::from_second(Timestamp::now().as_second())
            .unwrap_or_else(|_| Timestamp::now());
        let (nodes, reports) = (self.stores.nodes.state(), self.stores.reports.state());
        for policy in self.policies.state() {
            if policy.meta().deletion_timestamp.is_some() {
                continue;
            }
            let status = policy_fold::fold(
                &policy,
                nodes
                    .iter()
                    .map(|n| (n.metadata.name.as_deref().unwrap_or_default(), n.labels())),
                reports.iter().map(|r| &**r),
                now,
            );
            if policy.status.as_ref() == Some(&status) {
                continue;
            }
            let name = policy.name_any();
            match super::apply_status::<ImagePrunePolicy>(&self.client, &name, &status).await {
                Ok(_) => {
                    self.metrics.policy_status_writes.inc();
                    tracing::info!(
                        policy = %name,
                        targets = status.target_nodes,
                        evaluated = status.nodes_evaluated,
                        removed = status.images_removed,
                        bytes_freed = status.bytes_freed,
                        "policy status written"
                    );
                }
                Err(kube::Error::Api(e)) if e.code == 404 => continue,
                Err(e) => {
                    tracing::warn!(policy = %name, error = %e, "writing the policy status failed; retrying at the next change");
                    continue;
                }
            }
            let before = ready_status(policy.status.as_ref());
            if ready_status(Some(&status)).as_deref() == Some("False")
                && before.as_deref() != Some("False")
                && let Some(c) = status.conditions.iter().find(|c| c.type_ == READY)
            {
                self.publisher
                    .publish(
                        &*policy,
                        Severity::Warning,
                        &c.reason,
                        "Validate",
                        &c.message,
                    )
                    .await;
                self.metrics.events.inc();
            }
        }
    }
}
