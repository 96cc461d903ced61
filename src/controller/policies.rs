//! The shell around [`super::policy_fold`]: folds every ImagePrunePolicy whenever a policy, a
//! report or a Node's labels change (at most once per debounce interval), writes the status
//! that changed, and publishes a Warning Event when a policy becomes invalid. A pass whose
//! write failed is retried with backoff, not only at the next change.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::Notify;

use super::{Applied, Debounce, Metrics, RESYNC, Stores, Synced, policy_fold};
use crate::api::{ImagePrunePolicy, ImagePrunePolicyStatus, READY};
use crate::events::{Publisher, Severity};
use crate::serve::{Shutdown, backoff};

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

/// The `Ready` condition of `after` if it says the policy just became invalid (it was not
/// `False` in `before`): what a Warning Event reports.
fn newly_invalid<'a>(
    before: Option<&ImagePrunePolicyStatus>,
    after: &'a ImagePrunePolicyStatus,
) -> Option<&'a Condition> {
    let was = ready_status(before);
    if ready_status(Some(after)).as_deref() != Some("False") || was.as_deref() == Some("False") {
        return None;
    }
    after.conditions.iter().find(|c| c.type_ == READY)
}

/// How long the loop sleeps at most after a pass: the resync period, or the backoff after
/// `failed` consecutive passes with a failed write.
fn resync_after(failed: u32) -> Duration {
    if failed == 0 {
        RESYNC
    } else {
        backoff(failed).min(RESYNC)
    }
}

impl PolicyLoop {
    /// Runs until `shutdown`.
    pub(super) async fn run(self, mut shutdown: Shutdown) {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = self.synced.wait_for(Synced::ALL | Synced::POLICIES) => {}
        }
        let mut failed = 0;
        loop {
            failed = if self.pass().await { 0 } else { failed + 1 };
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(resync_after(failed)) => {}
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

    /// Folds every policy and writes the statuses that changed. Returns whether every write
    /// succeeded. Every policy, not only the one that changed: the usual wake-ups are a
    /// report or a Node's labels, and either can change any policy's status. A fold is linear
    /// in nodes and reports, and passes are at most one per debounce interval (which grows
    /// with the node count), so a full pass stays cheap; writes happen only on change.
    async fn pass(&self) -> bool {
        let now = Timestamp::from_second(Timestamp::now().as_second())
            .unwrap_or_else(|_| Timestamp::now());
        let (nodes, reports) = (self.stores.nodes.state(), self.stores.reports.state());
        let mut ok = true;
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
            ok &= self.write(&policy, &status).await;
        }
        ok
    }

    /// Writes one policy's status, and publishes a Warning Event if it just became invalid.
    /// Returns whether the write succeeded (a deleted policy counts as success).
    async fn write(&self, policy: &ImagePrunePolicy, status: &ImagePrunePolicyStatus) -> bool {
        let name = policy.name_any();
        match super::apply_status::<ImagePrunePolicy>(&self.client, &name, status).await {
            Ok(Applied::Written) => {
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
            Ok(Applied::Gone) => return true,
            Err(e) => {
                tracing::warn!(policy = %name, error = %e, "writing the policy status failed; retrying with backoff");
                return false;
            }
        }
        if let Some(c) = newly_invalid(policy.status.as_ref(), status) {
            self.publisher
                .publish(policy, Severity::Warning, &c.reason, "Validate", &c.message)
                .await;
            self.metrics.events.inc();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn status(ready: &str) -> ImagePrunePolicyStatus {
        ImagePrunePolicyStatus {
            conditions: vec![Condition {
                type_: READY.into(),
                status: ready.into(),
                reason: "InvalidSpec".into(),
                message: "bad".into(),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
                observed_generation: None,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn only_the_transition_to_invalid_is_reported() {
        let (ok, bad) = (status("True"), status("False"));
        assert!(newly_invalid(None, &bad).is_some());
        assert!(newly_invalid(Some(&ok), &bad).is_some());
        assert!(newly_invalid(Some(&bad), &bad).is_none(), "already invalid");
        assert!(newly_invalid(Some(&bad), &ok).is_none());
        assert!(newly_invalid(None, &ok).is_none());
    }

    #[test]
    fn a_failed_write_is_retried_with_backoff() {
        assert_eq!(resync_after(0), RESYNC);
        assert_eq!(resync_after(1), Duration::from_secs(1));
        assert_eq!(resync_after(3), Duration::from_secs(4));
        assert_eq!(resync_after(40), RESYNC);
    }
}
