//! `imagegc check`: does an installation work? The chart's `helm test` hook runs it in a pod
//! of the imagegc image itself, so checking needs no other image.
//!
//! It checks, with the caller's credentials (the hook's own ServiceAccount, which may read
//! exactly these objects): that the three CRDs are served, that the agent DaemonSet has a
//! ready, up-to-date pod on every node it targets, that the controller Deployment has a ready
//! replica, and that there are at least as many NodeImageReports as ready agents (each agent
//! writes its node's report through the admission policy, so a report proves the agent's
//! credentials work). It retries until everything holds or `--timeout-seconds` pass.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::api::{Api, ListParams};
use kube::{Client, Resource};

use crate::api::{ImagePrunePolicy, ImageRemoval, NodeImageReport};

/// Flags of `imagegc check`.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// Namespace of the agent DaemonSet and the controller Deployment.
    #[arg(long)]
    pub namespace: String,
    /// Name of the agent DaemonSet.
    #[arg(long, default_value = "imagegc-agent")]
    pub daemonset: String,
    /// Name of the controller Deployment.
    #[arg(long, default_value = "imagegc-controller")]
    pub deployment: String,
    /// Give up (and fail) after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_seconds: u64,
}

/// Why `imagegc check` failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// No usable Kubernetes credentials.
    #[error(
        "cannot build a Kubernetes client (in a pod: its ServiceAccount token; elsewhere: KUBECONFIG): {0}"
    )]
    Config(#[source] kube::Error),
    /// A check still failed when the time ran out.
    #[error("not working after {seconds} s:\n  {}", failures.join("\n  "))]
    Failed {
        /// How long it waited.
        seconds: u64,
        /// What still failed, one line each.
        failures: Vec<String>,
    },
}

/// One check's result: a line for a human, and whether it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Whether the check holds.
    pub ok: bool,
    /// What was found.
    pub message: String,
}

impl Finding {
    fn ok(message: String) -> Finding {
        Finding { ok: true, message }
    }
    fn failed(message: String) -> Finding {
        Finding { ok: false, message }
    }
}

/// The agent DaemonSet is rolled out: every node it targets runs a ready pod of the current
/// template, and it targets at least one node.
pub fn daemonset_ready(name: &str, ds: &DaemonSet) -> Finding {
    let generation = ds.metadata.generation.unwrap_or(0);
    let Some(s) = &ds.status else {
        return Finding::failed(format!("DaemonSet {name}: no status yet"));
    };
    let (desired, ready) = (s.desired_number_scheduled, s.number_ready);
    let updated = s.updated_number_scheduled.unwrap_or(0);
    let summary =
        format!("DaemonSet {name}: {ready} of {desired} agent pods ready, {updated} up to date");
    if s.observed_generation.unwrap_or(0) < generation {
        Finding::failed(format!(
            "{summary} (the DaemonSet controller has not seen the latest spec)"
        ))
    } else if desired == 0 {
        Finding::failed(format!(
            "{summary} (it targets no node: check agent.nodeSelector and agent.tolerations)"
        ))
    } else if ready < desired || updated < desired {
        Finding::failed(summary)
    } else {
        Finding::ok(summary)
    }
}

/// The controller Deployment has at least one ready replica (the others are standbys).
pub fn deployment_ready(name: &str, d: &Deployment) -> Finding {
    let ready = d
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let summary = format!("Deployment {name}: {ready} of {wanted} controller replicas ready");
    if ready >= 1 {
        Finding::ok(summary)
    } else {
        Finding::failed(summary)
    }
}

/// Every ready agent has written its node's report.
pub fn reports_written(reports: usize, ready_agents: i32) -> Finding {
    let summary = format!("{reports} NodeImageReports for {ready_agents} ready agents");
    if i64::try_from(reports).unwrap_or(i64::MAX) >= i64::from(ready_agents) {
        Finding::ok(summary)
    } else {
        Finding::failed(format!(
            "{summary} (an agent that cannot write its report: see its log, and the admission policy's message)"
        ))
    }
}

/// Whether the resource of `K` is served: a list of at most one object succeeds.
async fn served<K>(client: &Client) -> Finding
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let plural = K::plural(&()).into_owned();
    match Api::<K>::all(client.clone())
        .list_metadata(&ListParams::default().limit(1))
        .await
    {
        Ok(_) => Finding::ok(format!("{}/{plural} is served", K::group(&()))),
        Err(e) => Finding::failed(format!("{}/{plural} cannot be listed: {e}", K::group(&()))),
    }
}

/// Every check, once.
async fn check_once(client: &Client, args: &CheckArgs) -> Vec<Finding> {
    let mut out = vec![
        served::<ImageRemoval>(client).await,
        served::<ImagePrunePolicy>(client).await,
        served::<NodeImageReport>(client).await,
    ];
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), &args.namespace);
    let ds_name = format!("{}/{}", args.namespace, args.daemonset);
    let ready_agents = match daemonsets.get(&args.daemonset).await {
        Ok(ds) => {
            out.push(daemonset_ready(&ds_name, &ds));
            ds.status.map(|s| s.number_ready).unwrap_or(0)
        }
        Err(e) => {
            out.push(Finding::failed(format!("DaemonSet {ds_name}: {e}")));
            0
        }
    };
    let deployments = Api::<Deployment>::namespaced(client.clone(), &args.namespace);
    let deploy_name = format!("{}/{}", args.namespace, args.deployment);
    out.push(match deployments.get(&args.deployment).await {
        Ok(d) => deployment_ready(&deploy_name, &d),
        Err(e) => Finding::failed(format!("Deployment {deploy_name}: {e}")),
    });
    out.push(
        match Api::<NodeImageReport>::all(client.clone())
            .list_metadata(&ListParams::default())
            .await
        {
            Ok(list) => reports_written(list.items.len(), ready_agents),
            Err(e) => Finding::failed(format!("NodeImageReports cannot be listed: {e}")),
        },
    );
    out
}

/// Runs the checks until they all hold (printing each finding) or the time runs out.
pub async fn run(args: CheckArgs) -> Result<(), CheckError> {
    let client = Client::try_default().await.map_err(CheckError::Config)?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds);
    loop {
        let findings = check_once(&client, &args).await;
        let failures: Vec<String> = findings
            .iter()
            .filter(|f| !f.ok)
            .map(|f| f.message.clone())
            .collect();
        if failures.is_empty() {
            for f in &findings {
                println!("ok: {}", f.message);
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CheckError::Failed {
                seconds: args.timeout_seconds,
                failures,
            });
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DaemonSetStatus, DeploymentSpec, DeploymentStatus};

    fn ds(generation: i64, observed: i64, desired: i32, ready: i32, updated: i32) -> DaemonSet {
        let mut ds = DaemonSet::default();
        ds.metadata.generation = Some(generation);
        ds.status = Some(DaemonSetStatus {
            observed_generation: Some(observed),
            desired_number_scheduled: desired,
            number_ready: ready,
            updated_number_scheduled: Some(updated),
            ..Default::default()
        });
        ds
    }

    #[test]
    fn daemonset_is_ready_only_when_every_targeted_node_runs_a_current_ready_pod() {
        assert!(daemonset_ready("a", &ds(2, 2, 3, 3, 3)).ok);
        assert!(
            !daemonset_ready("a", &ds(2, 2, 3, 2, 3)).ok,
            "one not ready"
        );
        assert!(!daemonset_ready("a", &ds(2, 2, 3, 3, 2)).ok, "one outdated");
        assert!(
            !daemonset_ready("a", &ds(3, 2, 3, 3, 3)).ok,
            "spec not observed"
        );
        let none = daemonset_ready("a", &ds(1, 1, 0, 0, 0));
        assert!(
            !none.ok && none.message.contains("targets no node"),
            "{none:?}"
        );
        assert!(!daemonset_ready("a", &DaemonSet::default()).ok, "no status");
    }

    #[test]
    fn deployment_needs_one_ready_replica() {
        let mut d = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(!deployment_ready("c", &d).ok);
        d.status = Some(DeploymentStatus {
            ready_replicas: Some(1),
            ..Default::default()
        });
        let f = deployment_ready("c", &d);
        assert!(f.ok && f.message.contains("1 of 2"), "{f:?}");
    }

    #[test]
    fn reports_must_cover_the_ready_agents() {
        assert!(reports_written(3, 3).ok);
        assert!(reports_written(4, 3).ok);
        assert!(!reports_written(2, 3).ok);
        assert!(reports_written(0, 0).ok);
    }
}
