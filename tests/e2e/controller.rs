//! `imagegc controller` as a real process with the chart's ServiceAccount and RBAC, against
//! the real API server. The test acts as the agents would: it server-side-applies
//! NodeImageReports, and watches the controller fold them into ImageRemoval status.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use imagegc::api::{ImageRemoval, ImageRemovalStatus, NodeImageReport};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use libtest_mimic::Trial;
use serde_json::json;
use testbed::process::{Proc, free_port};
use testbed::{Flavor, Options, TestBed};

use crate::support::{http_get, imagegc_bin, trial};

const NAMESPACE: &str = "imagegc-system";
const ACCOUNT: &str = "imagegc-controller";
const LEASE: &str = "imagegc-controller";

/// A running `imagegc controller`; stopped (SIGTERM, then SIGKILL) when dropped.
struct Controller {
    proc: Proc,
    port: u16,
    identity: String,
}

impl Controller {
    /// Starts one replica acting as the controller's ServiceAccount, with short lease timings.
    async fn start(bed: &TestBed, identity: &str) -> Result<Controller> {
        let cluster = bed.cluster()?;
        let token = cluster
            .service_account_token(NAMESPACE, ACCOUNT, None)
            .await?;
        let kubeconfig = cluster.token_kubeconfig(&format!("{identity}.kubeconfig"), &token)?;
        let port = free_port()?;
        let args: Vec<String> = [
            "controller",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--lease-namespace",
            NAMESPACE,
            "--lease-name",
            LEASE,
            "--identity",
            identity,
            "--lease-duration",
            "4s",
            "--lease-renew",
            "1s",
            "--status-debounce",
            "300ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let env = [
            (
                "KUBECONFIG".to_string(),
                kubeconfig.to_string_lossy().into_owned(),
            ),
            ("IMAGEGC_LOG".to_string(), "info".to_string()),
        ];
        let proc = Proc::spawn(
            identity,
            &imagegc_bin(),
            &args,
            &env,
            bed.dir(),
            &bed.dir().join(format!("{identity}.log")),
        )?;
        Ok(Controller {
            proc,
            port,
            identity: identity.to_string(),
        })
    }

    /// Waits until `/readyz` answers 200.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            ensure!(
                self.proc.is_running(),
                "{} exited:\n{}",
                self.identity,
                self.proc.log_tail(30)
            );
            if let Ok((200, _)) = http_get(self.port, "/readyz").await {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{} not ready after {timeout:?}:\n{}",
                self.identity,
                self.proc.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn create_node(admin: &Client, name: &str, pool: &str) -> Result<()> {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"pool": pool}}
    }))?;
    Api::<Node>::all(admin.clone())
        .create(&PostParams::default(), &node)
        .await?;
    Ok(())
}

async fn relabel(admin: &Client, name: &str, pool: &str) -> Result<()> {
    Api::<Node>::all(admin.clone())
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"pool": pool}}})),
        )
        .await?;
    Ok(())
}

async fn create_removal(
    admin: &Client,
    name: &str,
    spec: serde_json::Value,
) -> Result<ImageRemoval> {
    let removal: ImageRemoval = serde_json::from_value(json!({
        "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImageRemoval",
        "metadata": {"name": name}, "spec": spec
    }))?;
    Ok(Api::<ImageRemoval>::all(admin.clone())
        .create(&PostParams::default(), &removal)
        .await?)
}

/// Applies `node`'s report with one entry per `(removal, generation, phase, bytes, images)`,
/// as that node's agent would (its own field manager, server-side apply).
async fn apply_report(
    admin: &Client,
    node: &str,
    entries: &[(&ImageRemoval, i64, &str, i64, serde_json::Value)],
) -> Result<()> {
    let api = Api::<NodeImageReport>::all(admin.clone());
    let manager = PatchParams::apply(&format!("imagegc-agent-{node}")).force();
    let object = json!({
        "apiVersion": "imagegc.dev/v1alpha1", "kind": "NodeImageReport",
        "metadata": {"name": node}, "spec": {"nodeName": node}
    });
    api.patch(node, &manager, &Patch::Apply(&object)).await?;
    let removals: Vec<serde_json::Value> = entries
        .iter()
        .map(|(removal, generation, phase, bytes, images)| {
            json!({
                "name": removal.name_any(), "uid": removal.uid(), "generation": generation,
                "phase": phase, "bytesFreed": bytes, "images": images
            })
        })
        .collect();
    let status = json!({
        "apiVersion": "imagegc.dev/v1alpha1", "kind": "NodeImageReport",
        "status": {"removals": removals}
    });
    api.patch_status(node, &manager, &Patch::Apply(&status))
        .await?;
    Ok(())
}

fn removed(images: &[&str]) -> serde_json::Value {
    images
        .iter()
        .map(|i| json!({"image": i, "outcome": "Removed"}))
        .collect()
}

fn condition<'s>(status: &'s ImageRemovalStatus, type_: &str) -> Option<(&'s str, &'s str)> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

/// Waits until `name`'s status satisfies `what`; returns it. Fails with the last status seen.
async fn wait_status(
    admin: &Client,
    name: &str,
    timeout: Duration,
    what: impl Fn(&ImageRemovalStatus) -> bool,
) -> Result<ImageRemovalStatus> {
    let api = Api::<ImageRemoval>::all(admin.clone());
    let deadline = Instant::now() + timeout;
    loop {
        let status = api.get(name).await?.status.unwrap_or_default();
        if what(&status) {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("{name}: status not as expected after {timeout:?}: {status:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn cluster_bed() -> Result<(TestBed, Client)> {
    let bed = TestBed::start(&Options {
        nodes: 0,
        flavor: Flavor::V2,
        cluster: true,
        real_node: false,
    })
    .await?;
    // The chart's rendered manifests: CRDs, ServiceAccounts, RBAC, admission policy.
    crate::operator::install(&bed).await?;
    let admin = bed.cluster()?.admin_client().await?;
    Ok((bed, admin))
}

const T: Duration = Duration::from_secs(20);

async fn folds_reports_into_status() -> Result<()> {
    let (bed, admin) = cluster_bed().await?;
    for (node, pool) in [("n-0", "blue"), ("n-1", "blue"), ("n-2", "green")] {
        create_node(&admin, node, pool).await?;
    }
    let mut controller = Controller::start(&bed, "controller-0").await?;
    controller.wait_ready(Duration::from_secs(30)).await?;
    let result = async {
        let rm = create_removal(
            &admin,
            "blue",
            json!({"images": ["nginx", "redis"], "nodeSelector": {"matchLabels": {"pool": "blue"}}}),
        )
        .await?;
        let s = wait_status(&admin, "blue", T, |s| s.observed_generation == Some(1)).await?;
        ensure!(
            (s.target_nodes, s.pending, s.succeeded) == (2, 2, 0),
            "{s:#?}"
        );
        ensure!(condition(&s, "Complete") == Some(("False", "InProgress")), "{s:#?}");

        let images = removed(&["nginx", "redis"]);
        apply_report(&admin, "n-0", &[(&rm, 1, "Succeeded", 100, images.clone())]).await?;
        apply_report(&admin, "n-1", &[(&rm, 1, "Succeeded", 23, images.clone())]).await?;
        let s = wait_status(&admin, "blue", T, |s| s.succeeded == 2).await?;
        ensure!((s.target_nodes, s.pending, s.failed) == (2, 0, 0), "{s:#?}");
        ensure!(s.bytes_freed == 123, "{s:#?}");
        ensure!(condition(&s, "Complete") == Some(("True", "Succeeded")), "{s:#?}");
        ensure!(s.completion_time.is_some(), "{s:#?}");

        // A third node starts matching: it is pending, and the removal is not complete.
        relabel(&admin, "n-2", "blue").await?;
        let s = wait_status(&admin, "blue", T, |s| s.target_nodes == 3).await?;
        ensure!((s.pending, s.succeeded) == (1, 2), "{s:#?}");
        ensure!(condition(&s, "Complete") == Some(("False", "InProgress")), "{s:#?}");
        ensure!(s.completion_time.is_none(), "{s:#?}");

        // A report about an older generation of the removal does not count.
        apply_report(&admin, "n-2", &[(&rm, 0, "Succeeded", 5, images.clone())]).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let s = wait_status(&admin, "blue", T, |_| true).await?;
        ensure!((s.pending, s.succeeded, s.bytes_freed) == (1, 2, 123), "{s:#?}");

        // The node fails: Failed=True with a sample, and a Warning Event.
        let failing = json!([
            {"image": "nginx", "outcome": "InUse", "message": "used by container web"},
            {"image": "redis", "outcome": "Removed"}
        ]);
        apply_report(&admin, "n-2", &[(&rm, 1, "Failed", 0, failing)]).await?;
        let s = wait_status(&admin, "blue", T, |s| s.failed == 1).await?;
        ensure!((s.pending, s.succeeded) == (0, 2), "{s:#?}");
        ensure!(condition(&s, "Failed") == Some(("True", "NodesFailed")), "{s:#?}");
        ensure!(condition(&s, "Complete") == Some(("False", "NodesFailed")), "{s:#?}");
        let sample = s.failures.first().context("a failure sample")?;
        ensure!(
            (sample.node.as_str(), sample.image.as_str(), sample.reason.as_str())
                == ("n-2", "nginx", "InUse"),
            "{s:#?}"
        );
        let deadline = Instant::now() + T;
        loop {
            let events = Api::<Event>::namespaced(admin.clone(), "default")
                .list(&ListParams::default())
                .await?;
            let warning = events.items.iter().find(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.reason.as_deref() == Some("Failed")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("blue")
            });
            if let Some(e) = warning {
                let note = e.note.clone().unwrap_or_default();
                ensure!(note.contains("n-2") && note.contains("InUse"), "{note}");
                break;
            }
            ensure!(Instant::now() < deadline, "no Warning Event: {:#?}", events.items);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // Editing the spec makes a new generation: every report is stale again.
        Api::<ImageRemoval>::all(admin.clone())
            .patch(
                "blue",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"images": ["nginx", "redis", "busybox"]}})),
            )
            .await?;
        let s = wait_status(&admin, "blue", T, |s| s.observed_generation == Some(2)).await?;
        ensure!(
            (s.target_nodes, s.pending, s.succeeded, s.failed) == (3, 3, 0, 0),
            "{s:#?}"
        );
        ensure!(s.completion_time.is_none() && s.failures.is_empty(), "{s:#?}");

        // A finished removal with a TTL goes away.
        create_removal(
            &admin,
            "short-lived",
            json!({"images": ["nginx"], "nodeSelector": {"matchLabels": {"pool": "none"}},
                   "ttlSecondsAfterFinished": 1}),
        )
        .await?;
        let deadline = Instant::now() + T;
        while Api::<ImageRemoval>::all(admin.clone())
            .get_opt("short-lived")
            .await?
            .is_some()
        {
            ensure!(Instant::now() < deadline, "short-lived was not deleted after its TTL");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // The test can see the object gone before the controller has read the answer to its
        // delete call and counted it, so the counter is polled, not read once.
        let needles = [
            "imagegc_controller_is_leader 1",
            "imagegc_controller_status_writes_total",
            "imagegc_controller_ttl_deletions_total 1",
            "imagegc_controller_reconciles_total{result=\"ok\"}",
        ];
        let deadline = Instant::now() + T;
        loop {
            let (code, metrics) = http_get(controller.port, "/metrics").await?;
            ensure!(code == 200, "/metrics answered {code}");
            let Some(missing) = needles.iter().find(|n| !metrics.contains(*n)) else {
                break;
            };
            ensure!(
                Instant::now() < deadline,
                "/metrics lacks {missing}:\n{metrics}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // SIGTERM: the controller releases the Lease for a fast takeover.
        controller.proc.stop(Duration::from_secs(10));
        let lease = Api::<Lease>::namespaced(admin.clone(), NAMESPACE)
            .get(LEASE)
            .await?;
        let holder = lease.spec.and_then(|s| s.holder_identity);
        ensure!(holder.is_none(), "Lease still held by {holder:?}");
        let log = controller.proc.log_tail(5);
        ensure!(log.contains("released the leader Lease"), "{log}");
        Ok(())
    }
    .await;
    result.map_err(|e| e.context(format!("controller log:\n{}", controller.proc.log_tail(40))))
}

async fn holder(admin: &Client) -> Result<Option<String>> {
    Ok(Api::<Lease>::namespaced(admin.clone(), NAMESPACE)
        .get_opt(LEASE)
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity))
}

async fn standby_takes_over_when_the_leader_dies() -> Result<()> {
    let (bed, admin) = cluster_bed().await?;
    create_node(&admin, "n-0", "blue").await?;
    let mut a = Controller::start(&bed, "controller-a").await?;
    let mut b = Controller::start(&bed, "controller-b").await?;
    a.wait_ready(Duration::from_secs(30)).await?;
    b.wait_ready(Duration::from_secs(30)).await?;
    let deadline = Instant::now() + T;
    let leader = loop {
        if let Some(h) = holder(&admin).await? {
            break h;
        }
        ensure!(Instant::now() < deadline, "nobody took the Lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (dead, survivor) = if leader == a.identity {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    create_removal(&admin, "before", json!({"images": ["nginx"]})).await?;
    wait_status(&admin, "before", T, |s| s.target_nodes == 1).await?;

    dead.proc.kill_hard();
    let killed = Instant::now();
    create_removal(&admin, "after", json!({"images": ["nginx"]})).await?;
    // Lease duration 4s, checked every 1s: the survivor folds within a few seconds more.
    let s = wait_status(&admin, "after", Duration::from_secs(15), |s| {
        s.target_nodes == 1
    })
    .await
    .map_err(|e| e.context(format!("survivor log:\n{}", survivor.proc.log_tail(30))))?;
    ensure!(s.pending == 1, "{s:#?}");
    ensure!(
        holder(&admin).await?.as_deref() == Some(survivor.identity.as_str()),
        "Lease not taken over by {}",
        survivor.identity
    );
    eprintln!(
        "failover: folded by the standby {:?} after the leader's SIGKILL",
        killed.elapsed()
    );
    Ok(())
}

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "controller::folds_reports_into_status",
            folds_reports_into_status,
        ),
        trial(
            "controller::standby_takes_over_when_the_leader_dies",
            standby_takes_over_when_the_leader_dies,
        ),
    ]
}
