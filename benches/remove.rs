//! `make bench-remove`: the time to remove K images from a real containerd through imagegc's
//! engine, against a sequential CRI `RemoveImage` loop (what Eraser and `crictl rmi` do).
//!
//! One test bed with two containerd daemons (no API server), of the flavor `IMAGEGC_CONTAINERD`
//! selects. Every repetition imports K fresh images on both nodes and waits until the CRI
//! plugin has adopted them on both; then imagegc removes them on one node (connect + inventory +
//! plan + execute) and the CRI loop on the other (connect + K `RemoveImage` calls), and both
//! nodes must end with identical image records and content. Each image has two tags plus the
//! `sha256:<id>` record the CRI plugin creates, a base layer shared by all images and two small
//! layers of its own; a few images that stay on the node (sharing the base) make the inventory
//! realistic.
//!
//! Prints one row per K with the median over the repetitions, and exits non-zero if the nodes
//! ever differ or if a row with K ≥ 20 misses the target ratio (CRI loop / imagegc ≥ 2).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use imagegc::containerd::{self, Runtime};
use imagegc::core::plan::{self, Outcome, Request};
use imagegc::core::platform::{Matcher, Platform};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, RemoveImageRequest};
use testbed::cri::{self, NS};
use testbed::image::{self, BuiltImage, ImageBuilder};
use testbed::{Flavor, Options, TestBed};

/// How many images to remove per row.
const KS: [usize; 3] = [1, 20, 100];
/// Repetitions per row (the median is reported).
const REPS: usize = 3;
/// Images that stay on both nodes throughout, unless `IMAGEGC_BENCH_KEEP` says otherwise
/// (containerd's garbage collection walks everything the namespace holds, so the cost of each
/// of the CRI loop's collections grows with it).
const KEEP: usize = 10;

fn keep() -> usize {
    std::env::var("IMAGEGC_BENCH_KEEP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(KEEP)
}
/// Rows with at least this many images must reach [`TARGET_RATIO`].
const TARGET_MIN_K: usize = 20;
/// CRI loop time / imagegc time that rows with K ≥ [`TARGET_MIN_K`] must reach.
const TARGET_RATIO: f64 = 2.0;
/// Pause after both nodes are synced, so the CRI plugin's event handling is done before timing.
const SETTLE: Duration = Duration::from_millis(300);

fn main() -> ExitCode {
    let result = testbed::run_bench(run());
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!(
                "bench remove: BELOW TARGET (CRI loop / imagegc < {TARGET_RATIO}× for K ≥ {TARGET_MIN_K})"
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench remove: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Timings of one repetition.
struct Sample {
    imagegc: Duration,
    cri: Duration,
    /// imagegc's phases: connect, inventory, plan, execute.
    phases: [Duration; 4],
}

/// Runs every row; returns whether every row met its target.
async fn run() -> Result<bool> {
    let flavor = Flavor::from_env();
    let bed = TestBed::start(&Options {
        nodes: 2,
        flavor,
        cluster: false,
    })
    .await
    .context("starting the test bed")?;
    let sockets = [bed.nodes[0].socket.as_path(), bed.nodes[1].socket.as_path()];
    let binary = match flavor {
        Flavor::V2 => testbed::tools::go_tool("containerd")?,
        Flavor::Debian16 => testbed::tools::debian_containerd()?,
    };
    println!(
        "containerd: {} ({}), 2 nodes, {} repetitions per row, {} images kept on each node",
        flavor.label(),
        version(&binary),
        REPS,
        keep(),
    );
    println!(
        "each image: 2 tags + sha256:<id> record, shared 4 KiB base layer + 1 KiB and 2 KiB layers"
    );

    // Images that stay: the CRI loop and imagegc both leave them (and the shared base) alone.
    let mut kept = Vec::new();
    for i in 0..keep() {
        kept.push(Prepared::new(format!("keep-{i}")));
    }
    for socket in sockets {
        setup(socket, &kept).await?;
    }

    let mut rows = Vec::new();
    for k in KS {
        let mut samples = Vec::new();
        for rep in 0..REPS {
            let images: Vec<Prepared> = (0..k)
                .map(|i| Prepared::new(format!("k{k}-r{rep}-{i}")))
                .collect();
            samples.push(
                repetition(sockets, &images, rep)
                    .await
                    .with_context(|| format!("K={k}, repetition {}", rep + 1))?,
            );
        }
        rows.push((k, samples));
    }

    println!();
    println!(
        "{:>5} {:>12} {:>14} {:>8}  {:<14} target",
        "K", "imagegc ms", "CRI loop ms", "ratio", "end states"
    );
    let mut all_met = true;
    for (k, samples) in &rows {
        let ours = median(samples.iter().map(|s| s.imagegc));
        let cri = median(samples.iter().map(|s| s.cri));
        let ratio = ms(cri) / ms(ours);
        let met = ratio >= TARGET_RATIO;
        let required = *k >= TARGET_MIN_K;
        all_met &= met || !required;
        let verdict = match (met, required) {
            (true, true) => "PASS",
            (false, true) => "BELOW TARGET",
            (true, false) => "PASS (not required: K < 20)",
            (false, false) => "BELOW TARGET (not required: K < 20)",
        };
        println!(
            "{k:>5} {:>12.1} {:>14.1} {:>7.2}×  {:<14} {verdict}",
            ms(ours),
            ms(cri),
            ratio,
            "identical"
        );
    }
    println!();
    println!("per repetition (imagegc ms / CRI loop ms) and imagegc's phases (median ms):");
    for (k, samples) in &rows {
        let reps: Vec<String> = samples
            .iter()
            .map(|s| format!("{:.1}/{:.1}", ms(s.imagegc), ms(s.cri)))
            .collect();
        let phase = |i: usize| ms(median(samples.iter().map(|s| s.phases[i])));
        println!(
            "{k:>5}  reps [{}]  connect {:.1}  inventory {:.1}  plan {:.2}  execute {:.1}",
            reps.join(", "),
            phase(0),
            phase(1),
            phase(2),
            phase(3),
        );
    }
    drop(bed);
    Ok(all_met)
}

/// One image to import, with its names.
struct Prepared {
    image: BuiltImage,
    tags: Vec<String>,
}

impl Prepared {
    fn new(seed: String) -> Prepared {
        let image = ImageBuilder::new(seed.clone())
            .shared_base("bench-base", 4096)
            .layer_sizes(&[1024, 2048])
            .build();
        let repo = format!("registry.bench.local/{seed}");
        Prepared {
            image,
            tags: vec![format!("{repo}:v1"), format!("{repo}:latest")],
        }
    }
}

/// Imports `images` into `socket` and waits until the CRI plugin has adopted them.
async fn setup(socket: &Path, images: &[Prepared]) -> Result<()> {
    for p in images {
        image::import(socket, NS, &p.image, &p.tags, &HashMap::new())
            .await
            .context("importing")?;
    }
    let ids: Vec<String> = images.iter().map(|p| p.image.id()).collect();
    let refs: Vec<&str> = images
        .iter()
        .flat_map(|p| p.tags.iter().map(String::as_str))
        .collect();
    cri::wait_synced(socket, &ids, &refs).await
}

/// Imports `images` on both nodes, removes them with imagegc on one and the CRI loop on the
/// other, and checks that both nodes end identical. Odd repetitions swap nodes and order.
async fn repetition(sockets: [&Path; 2], images: &[Prepared], rep: usize) -> Result<Sample> {
    for socket in sockets {
        setup(socket, images).await?;
    }
    let before = [
        cri::state(sockets[0], &[NS]).await?,
        cri::state(sockets[1], &[NS]).await?,
    ];
    ensure!(
        before[0] == before[1],
        "the two nodes differ before removal"
    );
    let ids: Vec<String> = images.iter().map(|p| p.image.id()).collect();
    tokio::time::sleep(SETTLE).await;

    // Even repetitions: imagegc on node-0, first; odd ones: the CRI loop on node-0, first.
    let even = rep.is_multiple_of(2);
    let (ours, oracle) = if even {
        (sockets[0], sockets[1])
    } else {
        (sockets[1], sockets[0])
    };
    let (imagegc, phases, cri) = if even {
        let (t, phases) = imagegc_remove(ours, &ids).await?;
        (t, phases, cri_loop(oracle, &ids).await?)
    } else {
        let cri = cri_loop(oracle, &ids).await?;
        let (t, phases) = imagegc_remove(ours, &ids).await?;
        (t, phases, cri)
    };

    let ours_after = cri::state(ours, &[NS]).await?;
    let oracle_after = cri::state(oracle, &[NS]).await?;
    ensure!(
        ours_after == oracle_after,
        "imagegc and the CRI loop left different states\n imagegc: {ours_after:#?}\n     CRI: {oracle_after:#?}"
    );
    for id in &ids {
        ensure!(
            !ours_after.records[NS].contains(id),
            "{id} still has its record after removal"
        );
    }
    let removed: BTreeSet<&String> = before[0].content[NS]
        .difference(&ours_after.content[NS])
        .collect();
    ensure!(
        !removed.is_empty(),
        "removing {} images freed no content",
        ids.len()
    );
    Ok(Sample {
        imagegc,
        cri,
        phases,
    })
}

/// imagegc's whole path, as `imagegc rmi` runs it: connect, inventory, plan, execute.
async fn imagegc_remove(socket: &Path, ids: &[String]) -> Result<(Duration, [Duration; 4])> {
    let start = Instant::now();
    let rt = Runtime::connect(socket, NS).await?;
    let connected = Instant::now();
    let matcher = Matcher::only(Platform::host());
    let inv = rt.inventory(&matcher).await?;
    let inventoried = Instant::now();
    let plan = plan::plan(
        &Request {
            images: ids.to_vec(),
            force: false,
        },
        &inv,
    );
    let planned = Instant::now();
    let not_removed: Vec<&'static str> = plan
        .items
        .iter()
        .filter(|i| !matches!(i.outcome, Outcome::Remove { .. }))
        .map(|i| i.outcome.kind())
        .collect();
    containerd::execute(&rt, plan).await?;
    let end = Instant::now();
    ensure!(
        not_removed.is_empty(),
        "imagegc did not plan to remove everything: {not_removed:?}"
    );
    Ok((
        end - start,
        [
            connected - start,
            inventoried - connected,
            planned - inventoried,
            end - planned,
        ],
    ))
}

/// The Eraser / `crictl rmi` way: one connection, one CRI `RemoveImage` per image, in order.
async fn cri_loop(socket: &Path, ids: &[String]) -> Result<Duration> {
    let start = Instant::now();
    let channel = containerd_client::connect(socket).await?;
    let mut client = ImageServiceClient::new(channel);
    for id in ids {
        let req = RemoveImageRequest {
            image: Some(ImageSpec {
                image: id.clone(),
                ..Default::default()
            }),
        };
        client
            .remove_image(req)
            .await
            .with_context(|| format!("CRI RemoveImage {id}"))?;
    }
    Ok(start.elapsed())
}

/// The version line of a containerd binary.
fn version(binary: &Path) -> String {
    std::process::Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(2)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "version unknown".into())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(values: impl Iterator<Item = Duration>) -> Duration {
    let mut v: Vec<Duration> = values.collect();
    v.sort();
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------------------------
// Looking at a node (as tests/e2e/support.rs does; a bench cannot import test modules).
