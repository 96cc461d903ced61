//! Faults injected into the running operator: containerd SIGKILLed in the middle of a batch,
//! containerd absent when the agent starts, the API server SIGKILLed and restarted while a
//! removal is in flight. Each time the operator must converge to the right end state without
//! repeating work.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use imagegc::api::ImageRemoval;
use k8s_openapi::api::events::v1::Event;
use kube::api::Api;
use libtest_mimic::Trial;
use testbed::image::{self, BuiltImage, ImageBuilder};

use crate::operator::{Operator, wait_for};
use crate::support::{NS, http_get, import, trial, wait_http_ok};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "faults::containerd_killed_mid_batch_is_retried",
            containerd_killed_mid_batch_is_retried,
        ),
        trial(
            "faults::agent_waits_for_containerd",
            agent_waits_for_containerd,
        ),
        trial(
            "faults::apiserver_restart_during_removal",
            apiserver_restart_during_removal,
        ),
        trial(
            "faults::watches_relist_after_410_gone",
            watches_relist_after_410_gone,
        ),
        trial(
            "faults::agent_sigkilled_at_random_points",
            agent_sigkilled_at_random_points,
        ),
        trial(
            "faults::agent_sigkilled_during_policy_runs",
            agent_sigkilled_during_policy_runs,
        ),
        trial(
            "faults::malformed_object_does_not_wedge_watches",
            malformed_object_does_not_wedge_watches,
        ),
        trial(
            "faults::etcd_outage_during_removal",
            etcd_outage_during_removal,
        ),
    ]
}

/// containerd is SIGKILLed while the agent is deleting a batch and restarted a moment later:
/// the agent's call fails, it retries with backoff, and the batch completes — once.
async fn containerd_killed_mid_batch_is_retried() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    let (built, tags) = op.seed(0, "ck", 60).await?;
    op.stop_agent(0);
    op.create_removal("batch", serde_json::json!({ "images": tags }))
        .await?;
    op.start_agent(0)?;
    op.wait_pending_mark(0).await?;
    op.bed.nodes[0].kill_hard();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    op.bed.nodes[0].restart()?;

    let r = op.wait_result(0, "batch").await?;
    ensure!(
        r.images
            .iter()
            .all(|i| i.outcome == "Removed" || i.outcome == "NotPresent"),
        "{r:?}"
    );
    op.assert_all_gone(0, "ck", &built).await?;
    let (_, metrics) = http_get(op.agent_port(0), "/metrics").await?;
    ensure!(
        metrics.contains(r#"imagegc_agent_removals_total{phase="Succeeded",dry_run="false"} 1"#),
        "the batch finished exactly once: {metrics}"
    );
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("imagegc_agent_containerd_errors_total") && !l.ends_with(" 0")),
        "the failure was seen and counted: {metrics}"
    );
    Ok(())
}

/// The agent starts while containerd is down (its socket absent): it is alive but not ready,
/// says so once, and becomes ready and does its work as soon as containerd is back.
async fn agent_waits_for_containerd() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    let (built, tags) = op.seed(0, "wc", 3).await?;
    op.stop_agent(0);
    op.bed.nodes[0].kill_hard();
    let _ = std::fs::remove_file(op.socket(0));
    op.create_removal("later", serde_json::json!({ "images": tags }))
        .await?;
    op.start_agent(0)?;
    let port = op.agent_port(0);
    wait_http_ok(port, "/livez")
        .await
        .with_context(|| op.logs())?;
    // Give it several retry rounds without containerd.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (code, _) = http_get(port, "/readyz").await?;
    ensure!(code == 503, "/readyz without containerd: {code}");
    let log = op.agent_log(0);
    let complaints = log
        .lines()
        .filter(|l| l.contains("the container runtime does not answer"))
        .count();
    ensure!(complaints == 1, "one clear line, not {complaints}:\n{log}");
    ensure!(
        log.contains("does not exist"),
        "the line says what is wrong:\n{log}"
    );

    op.bed.nodes[0].restart()?;
    wait_http_ok(port, "/readyz")
        .await
        .with_context(|| op.logs())?;
    let r = op.wait_result(0, "later").await?;
    ensure!(r.images.iter().all(|i| i.outcome == "Removed"), "{r:?}");
    op.assert_all_gone(0, "wc", &built).await
}

/// The API server is SIGKILLed and restarted right after a removal is created (the agents are
/// executing or reporting it): their watches resume (a removal created after the restart is
/// seen), the reports and the status converge, and no node runs a removal twice.
async fn apiserver_restart_during_removal() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")], &[("pool", "a")]]).await?;
    let mut all = Vec::new();
    for i in 0..2 {
        let (built, tags) = op.seed(i, "ar", 20).await?;
        all.push((built, tags));
    }
    op.create_removal("during", serde_json::json!({ "images": all[0].1 }))
        .await?;
    op.bed
        .cluster
        .as_mut()
        .context("cluster")?
        .restart_apiserver()
        .await?;
    // A second removal created after the restart is seen too (the watches resumed).
    op.create_removal("after", serde_json::json!({ "images": ["ar0:2"] }))
        .await?;
    converged_once(&op, ["during", "after"], "ar", &all).await
}

/// A forced `410 Gone`: while the API server is down, etcd's history is compacted past every
/// revision the agent's watches have seen, so the restarted server can answer their resumption
/// only with 410 (Expired). The agent must relist: it logs the 410 ("too old resource version")
/// for its ImageRemoval watch, executes a removal created
/// afterwards, and does not run the one it had finished before again.
async fn watches_relist_after_410_gone() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    let (built, tags) = op.seed(0, "gone", 2).await?;
    op.create_removal("before", serde_json::json!({ "images": [tags[0]] }))
        .await?;
    let r = op.wait_result(0, "before").await?;
    ensure!(r.images[0].outcome == "Removed", "{r:?}");

    let cluster = op.bed.cluster.as_mut().context("cluster")?;
    cluster.kill_apiserver();
    let compacted = cluster.compact_etcd().await?;
    cluster.start_apiserver_again().await?;
    wait_for(
        &format!("the agent's watch to be refused with 410 (etcd compacted at {compacted})"),
        Duration::from_secs(60),
        || async {
            let log = op.agent_log(0);
            Ok(log
                .lines()
                // 410 Expired, as kube's watcher words it.
                .any(|l| {
                    l.contains("watch failed")
                        && l.contains("kind=ImageRemoval")
                        && l.contains("too old resource version")
                })
                .then_some(()))
        },
    )
    .await
    .with_context(|| format!("agent log:\n{}", op.agent_log(0)))?;

    op.create_removal("after", serde_json::json!({ "images": [tags[1]] }))
        .await?;
    let r = op.wait_result(0, "after").await?;
    ensure!(r.images[0].outcome == "Removed", "{r:?}");
    op.assert_all_gone(0, "gone", &built).await?;
    let (_, metrics) = http_get(op.agent_port(0), "/metrics").await?;
    ensure!(
        metrics.contains(r#"imagegc_agent_removals_total{phase="Succeeded",dry_run="false"} 2"#),
        "each removal ran once: {metrics}"
    );
    Ok(())
}

/// Kill iterations of [`agent_sigkilled_at_random_points`].
const KILL_ITERATIONS: usize = 50;

/// The agent is SIGKILLed at a pseudo-random point (fixed seed, so a failure replays) while it
/// works on a fresh removal of 16 images that also names a pinned and an in-use image, then
/// restarted. Even iterations kill 0–40 ms after the first pending mark appears (inside the
/// batch, or just after it); odd ones 0–1.2 s after the agent starts (before, during or after
/// it). Every iteration must converge: the 16 images wholly gone (no record, no pending mark,
/// no content), the protected ones untouched.
async fn agent_sigkilled_at_random_points() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    let socket = op.socket(0);
    let pinned = ImageBuilder::new("chaos-pinned").build();
    let used = ImageBuilder::new("chaos-used").build();
    crate::support::import_labelled(
        &socket,
        &pinned,
        &["docker.io/library/keep:1"],
        &[(imagegc::core::inventory::PINNED_LABEL, "pinned")],
    )
    .await?;
    import(&socket, &used, &["docker.io/library/used:1"]).await?;
    testbed::cri::wait_synced(
        &socket,
        &[pinned.id(), used.id()],
        &["docker.io/library/keep:1", "docker.io/library/used:1"],
    )
    .await?;
    image::create_container(&socket, NS, "web", "docker.io/library/used:1", None).await?;

    let mut seed: u64 = 0x5eed;
    let mut mid_batch = 0;
    for n in 0..KILL_ITERATIONS {
        let prefix = format!("it{n}x");
        let (built, mut tags) = op.seed(0, &prefix, 16).await?;
        tags.extend(["keep:1".to_string(), "used:1".to_string()]);
        op.stop_agent(0);
        let name = format!("chaos-{n}");
        op.create_removal(&name, serde_json::json!({ "images": tags }))
            .await?;
        op.start_agent(0)?;
        let (delay, marked) = kill_at_a_seeded_point(
            &mut op,
            &mut seed,
            n,
            &tags[0],
            1200,
            "the agent never started the batch",
        )
        .await?;
        mid_batch += usize::from(marked);
        op.start_agent(0)?;
        let r = op
            .wait_result(0, &name)
            .await
            .with_context(|| format!("iteration {n}, killed after {delay:?}"))?;
        let outcomes: Vec<&str> = r.images.iter().map(|i| i.outcome.as_str()).collect();
        ensure!(
            outcomes[..16]
                .iter()
                .all(|o| *o == "Removed" || *o == "NotPresent")
                && outcomes[16..] == ["Pinned", "InUse"],
            "iteration {n}: {outcomes:?}"
        );
        op.assert_all_gone(0, &prefix, &built)
            .await
            .with_context(|| format!("iteration {n}, killed after {delay:?}"))?;
        let left = image::image_names(&socket, NS).await?;
        ensure!(
            left.contains("docker.io/library/keep:1") && left.contains("docker.io/library/used:1"),
            "iteration {n}: a protected image went: {left:?}"
        );
    }
    eprintln!(
        "faults::agent_sigkilled_at_random_points: {KILL_ITERATIONS} kills, {mid_batch} landed mid-batch (pending marks on disk)"
    );
    ensure!(
        mid_batch >= 5,
        "only {mid_batch} of {KILL_ITERATIONS} kills landed mid-batch: the delays miss the window"
    );
    Ok(())
}

/// SIGKILLs node 0's agent at a pseudo-random point of iteration `n` (`seed` advances): on even
/// iterations 0–40 ms after the first pending mark appears (or `first_tag` is gone), on odd
/// ones 0–`late_ms` ms from now. Returns the delay and whether marks were on disk after the
/// kill; fails with `never` if an even iteration's batch does not start within 60 s.
async fn kill_at_a_seeded_point(
    op: &mut Operator,
    seed: &mut u64,
    n: usize,
    first_tag: &str,
    late_ms: u64,
    never: &str,
) -> Result<(Duration, bool)> {
    let socket = op.socket(0);
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let r = *seed >> 33;
    let delay = if n.is_multiple_of(2) {
        // Poll tightly: a batch of 16 takes tens of milliseconds.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let marked = op.pending_marks(0).await? > 0;
            let finished = !image::image_names(&socket, NS).await?.contains(first_tag);
            if marked || finished {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "iteration {n}: {never}{}",
                op.logs()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Duration::from_millis(r % 40)
    } else {
        Duration::from_millis(r % late_ms)
    };
    tokio::time::sleep(delay).await;
    op.kill_agent(0);
    Ok((delay, op.pending_marks(0).await? > 0))
}

/// Kills of the agent during ImagePrunePolicy runs.
const POLICY_KILL_ITERATIONS: usize = 20;

/// The agent is SIGKILLed at a pseudo-random point (fixed seed) while a watermark policy
/// (high 1 %, low 0 %: it fires at every check and wants every image it may take) prunes 16
/// fresh images, next to a pinned and an in-use image; then restarted. Every time the next
/// run finishes what the killed one started: no record, mark or content of the 16 is left,
/// and the protected images stay.
async fn agent_sigkilled_during_policy_runs() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    op.agent_args = vec!["--watermark-check=1s".into()];
    let socket = op.socket(0);
    let usage = imagegc::agent::policies::filesystem_usage(&op.bed.nodes[0].root)?;
    ensure!(
        usage.used_bytes * 100 >= usage.capacity_bytes,
        "the test bed's filesystem is under 1 % full: the watermark would not fire"
    );
    let pinned = ImageBuilder::new("pchaos-pinned").build();
    let used = ImageBuilder::new("pchaos-used").build();
    crate::support::import_labelled(
        &socket,
        &pinned,
        &["docker.io/library/keep:1"],
        &[(imagegc::core::inventory::PINNED_LABEL, "pinned")],
    )
    .await?;
    import(&socket, &used, &["docker.io/library/used:1"]).await?;
    image::create_container(&socket, NS, "web", "docker.io/library/used:1", None).await?;
    op.stop_agent(0);
    let policy: imagegc::api::ImagePrunePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImagePrunePolicy",
        "metadata": {"name": "chaos-guard"},
        "spec": {"watermark": {"highPercent": 1, "lowPercent": 0}},
    }))?;
    kube::api::Api::<imagegc::api::ImagePrunePolicy>::all(op.admin.clone())
        .create(&Default::default(), &policy)
        .await?;

    let mut seed: u64 = 0x9e37_79b9;
    let mut mid_batch = 0;
    for n in 0..POLICY_KILL_ITERATIONS {
        let prefix = format!("pk{n}x");
        let (built, tags) = op.seed(0, &prefix, 16).await?;
        op.start_agent(0)?;
        let (delay, marked) = kill_at_a_seeded_point(
            &mut op,
            &mut seed,
            n,
            &tags[0],
            2500,
            "the policy never started",
        )
        .await?;
        mid_batch += usize::from(marked);
        op.start_agent(0)?;
        wait_for(
            &format!("iteration {n}: the 16 images gone (killed after {delay:?})"),
            Duration::from_secs(60),
            || async {
                Ok(op
                    .assert_all_gone(0, &prefix, &built)
                    .await
                    .is_ok()
                    .then_some(()))
            },
        )
        .await
        .with_context(|| op.logs())?;
        let left = image::image_names(&socket, NS).await?;
        ensure!(
            left.contains("docker.io/library/keep:1") && left.contains("docker.io/library/used:1"),
            "iteration {n}: a protected image went: {left:?}"
        );
        op.stop_agent(0);
    }
    eprintln!(
        "faults::agent_sigkilled_during_policy_runs: {POLICY_KILL_ITERATIONS} kills, {mid_batch} landed mid-batch (pending marks on disk)"
    );
    ensure!(
        mid_batch >= 3,
        "only {mid_batch} of {POLICY_KILL_ITERATIONS} kills landed mid-batch: the delays miss the window"
    );
    Ok(())
}

/// An ImageRemoval that does not fit the current schema (written while the CRD accepted
/// anything, as an older version might have left one) is logged and skipped by the agent and
/// the controller, whose watches keep serving every other object.
async fn malformed_object_does_not_wedge_watches() -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::PostParams;

    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    let (built, tags) = op.seed(0, "mo", 1).await?;
    let crds = Api::<CustomResourceDefinition>::all(op.admin.clone());
    let name = "imageremovals.imagegc.dev";
    let strict = crds.get(name).await?;
    let mut loose = serde_json::to_value(&strict)?;
    loose["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"] =
        serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    crds.replace(
        name,
        &PostParams::default(),
        &serde_json::from_value(loose)?,
    )
    .await?;
    op.stop_agent(0);
    let removals = Api::<kube::api::DynamicObject>::all_with(
        op.admin.clone(),
        &kube::api::ApiResource::erase::<ImageRemoval>(&()),
    );
    let bad: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImageRemoval",
        "metadata": {"name": "malformed"}, "spec": {"images": 5},
    }))?;
    let removals = &removals;
    let bad = &bad;
    wait_for(
        "the loosened schema to accept the object",
        Duration::from_secs(30),
        || async move {
            Ok(removals
                .create(&PostParams::default(), bad)
                .await
                .ok()
                .map(|_| ()))
        },
    )
    .await?;
    // Back to the strict schema; the stored object stays as it was.
    let mut restored = crds.get(name).await?;
    restored.spec = strict.spec.clone();
    crds.replace(name, &PostParams::default(), &restored)
        .await?;

    // The agent lists the malformed object at start, and still does its work.
    op.start_agent(0)?;
    op.create_removal("wellformed", serde_json::json!({ "images": tags }))
        .await?;
    let r = op.wait_result(0, "wellformed").await?;
    ensure!(r.images[0].outcome == "Removed", "{r:?}");
    op.assert_all_gone(0, "mo", &built).await?;
    op.wait_status("wellformed", "Complete", |r: &ImageRemoval| {
        r.status
            .as_ref()
            .is_some_and(|s| s.target_nodes == 1 && s.succeeded == 1)
    })
    .await?;
    let log = op.agent_log(0);
    ensure!(
        log.contains("ignoring an object that does not match") && log.contains("malformed"),
        "the agent says what it skipped:\n{log}"
    );
    // The controller says so on the object itself, once for this version of it (its watches
    // relisted nothing new meanwhile; the agent, one of many, only logs).
    let warnings = || async {
        let events = Api::<Event>::namespaced(op.admin.clone(), "default")
            .list(&Default::default())
            .await?;
        Ok::<_, anyhow::Error>(
            events
                .items
                .into_iter()
                .filter(|e| {
                    e.reason.as_deref() == Some("InvalidObject")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("malformed")
                })
                .collect::<Vec<Event>>(),
        )
    };
    let found = wait_for(
        "a Warning Event on the malformed ImageRemoval",
        Duration::from_secs(30),
        || async { Ok(Some(warnings().await?).filter(|w| !w.is_empty())) },
    )
    .await?;
    let e = &found[0];
    let note = e.note.clone().unwrap_or_default();
    ensure!(
        e.type_.as_deref() == Some("Warning")
            && e.reporting_controller.as_deref() == Some("imagegc.dev/controller")
            && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("ImageRemoval")
            && note.contains("ImageRemoval malformed does not match")
            && note.contains("invalid type"),
        "{e:#?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = warnings().await?;
    ensure!(
        all.len() == 1,
        "one Event per version, got {}: {all:#?}",
        all.len()
    );
    Ok(())
}

/// etcd is SIGKILLed right after a removal is created and stays down for 5 s while two
/// agents and the controller run: writes fail and are retried, watches resume, every removal
/// runs once per node and both ImageRemovals complete.
async fn etcd_outage_during_removal() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")], &[("pool", "a")]]).await?;
    let mut all = Vec::new();
    for i in 0..2 {
        all.push(op.seed(i, "eo", 10).await?);
    }
    op.create_removal("before", serde_json::json!({ "images": all[0].1 }))
        .await?;
    op.bed
        .cluster
        .as_mut()
        .context("cluster")?
        .restart_etcd(Duration::from_secs(5))
        .await?;
    op.create_removal("after", serde_json::json!({ "images": ["eo0:2"] }))
        .await?;
    converged_once(&op, ["before", "after"], "eo", &all).await
}

/// Both removals (`names`, each seeded on its node under `prefix`) ended on every node as
/// they should (the first removed everything, the second found its image gone), each ran
/// exactly once per node, and both ImageRemovals are Complete on every node.
async fn converged_once(
    op: &Operator,
    names: [&str; 2],
    prefix: &str,
    seeded: &[(Vec<BuiltImage>, Vec<String>)],
) -> Result<()> {
    for (i, (built, _)) in seeded.iter().enumerate() {
        let r = op.wait_result(i, names[0]).await?;
        ensure!(
            r.images.iter().all(|i| i.outcome == "Removed"),
            "node {i}: {r:?}"
        );
        let r = op.wait_result(i, names[1]).await?;
        ensure!(r.images[0].outcome == "NotPresent", "node {i}: {r:?}");
        op.assert_all_gone(i, prefix, built).await?;
        let (_, metrics) = http_get(op.agent_port(i), "/metrics").await?;
        ensure!(
            metrics
                .contains(r#"imagegc_agent_removals_total{phase="Succeeded",dry_run="false"} 2"#),
            "node {i} ran each removal once: {metrics}"
        );
    }
    for name in names {
        op.wait_status(name, "Complete on every node", |r: &ImageRemoval| {
            r.status.as_ref().is_some_and(|s| {
                s.target_nodes == seeded.len() as i32 && s.succeeded == s.target_nodes
            })
        })
        .await?;
    }
    Ok(())
}
