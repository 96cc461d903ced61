//! `make bench-operator`: the operator's latency, API cost and memory on the real test bed,
//! printed and compared with the targets; a missed target fails the run (after every figure is
//! printed). Ignored by `make test` (it measures, it does not judge correctness); run with
//! `cargo test --test e2e -- --ignored bench::`.
//!
//! - latency: ImageRemoval created → the node's NodeImageReport shows the outcome, 50 runs;
//! - API writes by the agent per removal (its own `report_writes` counter);
//! - agent memory: resident set idle, and the high-water mark after removing 500 images in one
//!   ImageRemoval; controller memory with 1,000 NodeImageReports to fold.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use imagegc::api::{ImageRemoval, NodeImageReport};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use libtest_mimic::Trial;
use testbed::image::ImageBuilder;

use crate::operator::{Operator, wait_for};
use crate::support::{http_get, import, trial, wait_http_ok};

pub fn trials() -> Vec<Trial> {
    vec![
        trial("bench::operator", operator).with_ignored_flag(true),
        trial("bench::soak", soak).with_ignored_flag(true),
    ]
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
/// A process's memory from /proc/<pid>/status, KiB.
struct Memory {
    /// Resident now.
    rss: u64,
    /// Resident at most so far.
    peak: u64,
    /// Resident and private: heap, stacks, written data.
    anon: u64,
    /// Resident pages of mapped files: mostly the binary's own code.
    file: u64,
}

fn memory(pid: u32) -> Result<Memory> {
    let field = |name: &str| {
        testbed::process::status_kib(pid, name).with_context(|| format!("{name} of {pid}"))
    };
    Ok(Memory {
        rss: field("VmRSS")?,
        peak: field("VmHWM")?,
        anon: field("RssAnon")?,
        file: field("RssFile")?,
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The targets a run missed, by name.
#[derive(Default)]
struct Misses(Vec<&'static str>);

impl Misses {
    /// `meets target`, or `MISSES target` (and `what` is recorded as missed).
    fn verdict(&mut self, what: &'static str, ok: bool) -> &'static str {
        if ok {
            "meets target"
        } else {
            self.0.push(what);
            "MISSES target"
        }
    }
}

async fn counter(port: u16, name: &str) -> Result<f64> {
    let (_, metrics) = http_get(port, "/metrics").await?;
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{name} in {metrics}"))
}

async fn operator() -> Result<()> {
    let op = Operator::start(&[&[("pool", "a")]]).await?;
    let port = op.agent_port(0);
    wait_http_ok(port, "/readyz").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agent_pid = op.agent_pid(0).context("agent pid")?;
    let idle = memory(agent_pid)?;
    let cpu_seconds = |pid| testbed::process::cpu_seconds(pid).context("agent CPU time");
    let (cpu_before, idle_window) = (cpu_seconds(agent_pid)?, Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_millicores =
        (cpu_seconds(agent_pid)? - cpu_before) / idle_window.elapsed().as_secs_f64() * 1000.0;

    // Latency and writes: 50 removals of a one-image request, one after another.
    const RUNS: usize = 50;
    let writes_before = counter(port, "imagegc_agent_report_writes_total").await?;
    let mut latencies = Vec::with_capacity(RUNS);
    for n in 0..RUNS {
        let img = ImageBuilder::new(format!("lat-{n}")).build();
        let tag = format!("docker.io/library/lat{n}:1");
        import(&op.socket(0), &img, &[&tag]).await?;
        testbed::cri::wait_synced(&op.socket(0), &[img.id()], &[&tag]).await?;
        let start = Instant::now();
        op.create_removal(&format!("lat-{n}"), serde_json::json!({ "images": [tag] }))
            .await?;
        let r = op.wait_result(0, &format!("lat-{n}")).await?;
        latencies.push(start.elapsed());
        ensure!(r.images[0].outcome == "Removed", "{r:?}");
    }
    let writes = counter(port, "imagegc_agent_report_writes_total").await? - writes_before;
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));

    // Peak memory: one removal of 500 images.
    let mut tags = Vec::new();
    for n in 0..500 {
        let img = ImageBuilder::new(format!("peak-{n}")).build();
        let tag = format!("docker.io/library/peak{n}:1");
        import(&op.socket(0), &img, &[&tag]).await?;
        tags.push(tag);
    }
    // Chunks of 100 (the schema's maximum per ImageRemoval), created together.
    let started = Instant::now();
    for (i, chunk) in tags.chunks(100).enumerate() {
        op.create_removal(&format!("peak-{i}"), serde_json::json!({ "images": chunk }))
            .await?;
    }
    for i in 0..tags.len().div_ceil(100) {
        op.wait_result(0, &format!("peak-{i}")).await?;
    }
    let removed_in = started.elapsed();
    let agent_peak = memory(op.agent_pid(0).context("agent pid")?)?.peak;

    // Controller memory with 1,000 reports (written by the admin, as 1,000 agents would).
    let nodes = Api::<Node>::all(op.admin.clone());
    let reports = Api::<NodeImageReport>::all(op.admin.clone());
    let removal = op
        .create_removal("wide", serde_json::json!({ "images": ["nothing:1"] }))
        .await?;
    let uid = removal.metadata.uid.clone().context("uid")?;
    for n in 0..1000 {
        let name = format!("sim-{n:04}");
        let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
        nodes.create(&PostParams::default(), &node).await?;
        let apply = PatchParams::apply("bench").force();
        let object = serde_json::json!({
            "apiVersion": "imagegc.dev/v1alpha1", "kind": "NodeImageReport",
            "metadata": {"name": name}, "spec": {"nodeName": name},
        });
        reports.patch(&name, &apply, &Patch::Apply(object)).await?;
        let status = serde_json::json!({
            "apiVersion": "imagegc.dev/v1alpha1", "kind": "NodeImageReport",
            "metadata": {"name": name},
            "status": {"inventory": {"images": 40, "bytes": 4_000_000_000i64, "pinned": 1, "inUse": 10},
                       "removals": [{"name": "wide", "uid": uid, "generation": 1, "phase": "Succeeded",
                                     "images": [{"image": "nothing:1", "outcome": "NotPresent"}]}]},
        });
        reports
            .patch_status(&name, &apply, &Patch::Apply(status))
            .await?;
    }
    let removals = Api::<ImageRemoval>::all(op.admin.clone());
    let removals = &removals;
    wait_for(
        "the controller to fold 1,001 reports",
        Duration::from_secs(120),
        || async move {
            let r = removals.get("wide").await?;
            Ok(r.status
                .filter(|s| s.target_nodes == 1001 && s.pending == 0)
                .map(|_| ()))
        },
    )
    .await
    .with_context(|| op.logs())?;
    let controller = memory(op.controller_pid().context("controller pid")?)?;

    let mut misses = Misses::default();
    println!("\nbench operator — one node (containerd 2.x), a real API server, 2 cores");
    println!(
        "  latency, ImageRemoval created → report shows the outcome, {RUNS} runs: p50 {:.0} ms, p99 {:.0} ms   targets p50 ≤ 2000 ms, p99 ≤ 10000 ms: {}",
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0,
        misses.verdict(
            "latency",
            p50 <= Duration::from_secs(2) && p99 <= Duration::from_secs(10)
        )
    );
    println!(
        "  agent writes per removal: {:.2}   target ≤ 2: {}",
        writes / RUNS as f64,
        misses.verdict("agent writes per removal", writes / RUNS as f64 <= 2.0)
    );
    println!(
        "  agent CPU idle over 10 s: {idle_millicores:.2} mCPU   target ≤ 2: {}",
        misses.verdict("agent idle CPU", idle_millicores <= 2.0)
    );
    println!(
        "  agent memory: idle {:.1} MiB ({:.1} private, {:.1} of mapped files) (target ≤ 12: {}); peak {:.1} MiB while removing 500 images in 5 ImageRemovals ({:.1} s) (target ≤ 24: {})",
        mib(idle.rss),
        mib(idle.anon),
        mib(idle.file),
        misses.verdict("agent idle memory", mib(idle.rss) <= 12.0),
        mib(agent_peak),
        removed_in.as_secs_f64(),
        misses.verdict("agent peak memory", mib(agent_peak) <= 24.0)
    );
    println!(
        "  controller memory with 1,001 NodeImageReports folded: {:.1} MiB now, {:.1} MiB peak (target ≤ 32: {})",
        mib(controller.rss),
        mib(controller.peak),
        misses.verdict("controller peak memory", mib(controller.peak) <= 32.0)
    );
    ensure!(
        misses.0.is_empty(),
        "missed targets: {}",
        misses.0.join(", ")
    );
    Ok(())
}

/// `make bench-soak`: memory stays flat as removals come and go. `IMAGEGC_SOAK_REMOVALS`
/// (10,000) ImageRemovals are created in waves of 100, each run by the node's agent (one
/// absent image: `NotPresent`), folded by the controller and deleted by it after its TTL
/// (0 s); the next wave starts when the last one is gone. The agent's and the controller's
/// resident memory is sampled after every 1,000; the last sample must be at most 10 % plus
/// 1 MiB above the one after 2,000 (the warm-up: allocator arenas, watch buffers). Exits
/// non-zero on a miss.
async fn soak() -> Result<()> {
    const WAVE: usize = 100;
    let total: usize = std::env::var("IMAGEGC_SOAK_REMOVALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let op = Operator::start(&[&[("pool", "a")]]).await?;
    wait_http_ok(op.agent_port(0), "/readyz").await?;
    let removals = Api::<ImageRemoval>::all(op.admin.clone());
    let (agent, controller) = (
        op.agent_pid(0).context("agent pid")?,
        op.controller_pid().context("controller pid")?,
    );
    let started = Instant::now();
    let mut samples: Vec<(usize, u64, u64)> = Vec::new();
    for wave in 0..total.div_ceil(WAVE) {
        for n in 0..WAVE {
            let removal: ImageRemoval = serde_json::from_value(serde_json::json!({
                "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImageRemoval",
                "metadata": {"name": format!("soak-{wave}-{n}"), "labels": {"soak": "yes"}},
                "spec": {"images": [format!("absent{n}:1")], "ttlSecondsAfterFinished": 0},
            }))?;
            removals.create(&PostParams::default(), &removal).await?;
        }
        let removals = &removals;
        wait_for(
            &format!("wave {wave} run, folded and deleted"),
            Duration::from_secs(300),
            || async move {
                let left = removals
                    .list_metadata(&ListParams::default().labels("soak=yes"))
                    .await?;
                Ok(left.items.is_empty().then_some(()))
            },
        )
        .await
        .with_context(|| op.logs())?;
        let done = (wave + 1) * WAVE;
        if done.is_multiple_of(1000) || done >= total {
            let a = memory(agent)?.rss;
            let c = memory(controller)?.rss;
            println!(
                "  {done:>6} removals done ({:.0} s): agent {:.1} MiB, controller {:.1} MiB",
                started.elapsed().as_secs_f64(),
                mib(a),
                mib(c)
            );
            samples.push((done, a, c));
        }
    }
    let flat = |after_warmup: u64, last: u64| last as f64 <= after_warmup as f64 * 1.1 + 1024.0;
    let warm = samples
        .iter()
        .find(|(done, ..)| *done >= 2000)
        .or(samples.first())
        .copied()
        .context("no sample")?;
    let last = *samples.last().context("no sample")?;
    // The ensure below judges; the verdicts only label the lines.
    let mut misses = Misses::default();
    println!(
        "\nbench soak — {total} ImageRemovals created, run, folded and deleted in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "  agent RSS after {} {:.1} MiB, after {} {:.1} MiB: {}",
        warm.0,
        mib(warm.1),
        last.0,
        mib(last.1),
        misses.verdict("agent memory flat", flat(warm.1, last.1))
    );
    println!(
        "  controller RSS after {} {:.1} MiB, after {} {:.1} MiB: {}",
        warm.0,
        mib(warm.2),
        last.0,
        mib(last.2),
        misses.verdict("controller memory flat", flat(warm.2, last.2))
    );
    ensure!(
        flat(warm.1, last.1) && flat(warm.2, last.2),
        "memory grew over the soak: {samples:?}"
    );
    Ok(())
}
