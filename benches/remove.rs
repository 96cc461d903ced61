//! `make bench-remove`: the time to remove K images from a real containerd through imagegc's
//! engine, against Eraser's remover: CRI `ListImages` and `ListContainers`, then a sequential
//! CRI `RemoveImage` loop (a `crictl rmi` loop makes the same removal calls).
//!
//! One test bed with four containerd daemons (no API server), of the flavor
//! `IMAGEGC_CONTAINERD` selects. Every repetition imports K fresh images on all four nodes and
//! waits until the CRI plugin has adopted them; then each node removes them one way:
//! - the agent: imagegc's engine on a connection that is already open and has read the node
//!   once since the images arrived, as the long-running agent has (inventory + plan + execute);
//! - `imagegc rmi`: the same engine from a cold start (connect + inventory + plan + execute);
//! - the CRI loop: Eraser's remover (connect + `ListImages` + `ListContainers` + K
//!   `RemoveImage` calls);
//! - the floor: the bench itself deletes the 3K records it knows, as concurrently as imagegc
//!   does, the last one synchronously (one garbage collection), with no reads and no journal.
//!   No tool that keeps CRI's end state can do less, so CRI loop / floor is the ceiling of any
//!   tool's ratio on that node.
//!
//! All four nodes must end with identical image records and content. Each image has two tags
//! plus the `sha256:<id>` record the CRI plugin creates, a base layer shared by all images and
//! two small layers of its own.
//!
//! Node shapes: the images that stay on every node throughout (`IMAGEGC_BENCH_KEEP`, default
//! `10,100`: a near-empty node, then one holding 100 images). Each of the CRI loop's garbage
//! collections walks everything the namespace holds, so the loop's cost grows with the node.
//!
//! Prints one row per shape and K with the median over the repetitions, and exits non-zero if
//! the nodes ever differ or if a row with K ≥ 20 misses the target ratio (CRI loop / agent
//! ≥ 2; the agent is what removes images on a node) on a node where the floor itself reaches
//! it (ceiling ≥ 2); a row whose ceiling is below 2 is reported as such, since no tool could
//! meet the target there. `imagegc rmi`'s ratio is printed beside it.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use imagegc::containerd::{self, Runtime};
use imagegc::core::plan::{self, Outcome, Request};
use imagegc::core::platform::{Matcher, Platform};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{ImageSpec, ListContainersRequest, ListImagesRequest, RemoveImageRequest};
use testbed::cri::{self, NS};
use testbed::image::{self, BuiltImage, ImageBuilder};
use testbed::{Flavor, Options, TestBed};

/// How many images to remove per row.
const KS: [usize; 3] = [1, 20, 100];
/// Repetitions per row (the median is reported).
const REPS: usize = 3;
/// Node shapes, by the number of images that stay on every node throughout, unless
/// `IMAGEGC_BENCH_KEEP` (a comma-separated list, ascending) says otherwise.
const KEEP: [usize; 2] = [10, 100];

fn keep() -> Result<Vec<usize>> {
    let Ok(v) = std::env::var("IMAGEGC_BENCH_KEEP") else {
        return Ok(KEEP.to_vec());
    };
    let shapes = v
        .split(',')
        .map(|n| n.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("IMAGEGC_BENCH_KEEP={v}: want counts like 10,100"))?;
    ensure!(
        !shapes.is_empty() && shapes.is_sorted(),
        "IMAGEGC_BENCH_KEEP={v}: want ascending counts like 10,100"
    );
    Ok(shapes)
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
    agent: Duration,
    rmi: Duration,
    cri: Duration,
    floor: Duration,
    /// The agent's phases: connect (none: its connection is open), inventory, plan, execute.
    agent_phases: [Duration; 4],
    /// `imagegc rmi`'s phases: connect, inventory, plan, execute.
    rmi_phases: [Duration; 4],
}

/// The repetitions of one row: a node shape and K.
struct Row {
    keep: usize,
    k: usize,
    samples: Vec<Sample>,
}

/// The four nodes' roles.
const AGENT: usize = 0;
const RMI: usize = 1;
const CRI_LOOP: usize = 2;
const FLOOR: usize = 3;
const ROLES: usize = 4;

/// Runs every row; returns whether every row met its target.
async fn run() -> Result<bool> {
    let flavor = Flavor::from_env();
    let shapes = keep()?;
    let bed = TestBed::start(&Options {
        nodes: ROLES,
        flavor,
        cluster: false,
        real_node: false,
    })
    .await
    .context("starting the test bed")?;
    let sockets: [&Path; ROLES] = std::array::from_fn(|i| bed.nodes[i].socket.as_path());
    let binary = match flavor {
        Flavor::V2 => testbed::tools::go_tool("containerd")?,
        Flavor::Debian16 => testbed::tools::debian_containerd()?,
    };
    println!(
        "containerd: {} ({}), 4 nodes (imagegc agent, imagegc rmi, CRI loop, floor), {} repetitions per row, node shapes: {:?} images kept",
        flavor.label(),
        version(&binary),
        REPS,
        shapes,
    );
    println!(
        "each image: 2 tags + sha256:<id> record, shared 4 KiB base layer + 1 KiB and 2 KiB layers"
    );

    let mut rows = Vec::new();
    let mut kept = 0;
    for keep in shapes {
        // Images that stay: every side leaves them (and the shared base) alone.
        let more: Vec<Prepared> = (kept..keep)
            .map(|i| Prepared::new(format!("keep-{i}")))
            .collect();
        for socket in sockets {
            setup(socket, &more).await?;
        }
        kept = keep;
        for k in KS {
            let mut samples = Vec::new();
            for rep in 0..REPS {
                let images: Vec<Prepared> = (0..k)
                    .map(|i| Prepared::new(format!("n{keep}-k{k}-r{rep}-{i}")))
                    .collect();
                samples.push(
                    repetition(sockets, &images, rep)
                        .await
                        .with_context(|| format!("{keep} kept, K={k}, repetition {}", rep + 1))?,
                );
            }
            rows.push(Row { keep, k, samples });
        }
    }

    println!();
    println!(
        "{:>5} {:>5} {:>9} {:>7} {:>12} {:>9} {:>7} {:>7} {:>8}  target (agent ratio)",
        "kept", "K", "agent ms", "rmi ms", "CRI loop ms", "floor ms", "agent", "rmi", "ceiling"
    );
    let mut all_met = true;
    for row in &rows {
        let agent = median(row.samples.iter().map(|s| s.agent));
        let rmi = median(row.samples.iter().map(|s| s.rmi));
        let cri = median(row.samples.iter().map(|s| s.cri));
        let floor = median(row.samples.iter().map(|s| s.floor));
        let ratio = ms(cri) / ms(agent);
        let ceiling = ms(cri) / ms(floor);
        let met = ratio >= TARGET_RATIO;
        let reachable = ceiling >= TARGET_RATIO;
        let required = row.k >= TARGET_MIN_K;
        all_met &= met || !required || !reachable;
        let verdict = match (met, required, reachable) {
            (true, true, _) => "PASS",
            (false, true, true) => "BELOW TARGET",
            (false, true, false) => "below 2×, as is the floor: no tool can reach 2× here",
            (true, false, _) => "PASS (not required: K < 20)",
            (false, false, _) => "below (not required: K < 20)",
        };
        println!(
            "{:>5} {:>5} {:>9.1} {:>7.1} {:>12.1} {:>9.1} {:>6.2}× {:>6.2}× {:>7.2}×  {verdict}",
            row.keep,
            row.k,
            ms(agent),
            ms(rmi),
            ms(cri),
            ms(floor),
            ratio,
            ms(cri) / ms(rmi),
            ceiling,
        );
    }
    println!();
    println!("all four nodes ended with identical image records and content in every repetition");
    println!("per repetition (agent / rmi / CRI loop / floor ms) and phases (median ms):");
    for row in &rows {
        let reps: Vec<String> = row
            .samples
            .iter()
            .map(|s| {
                format!(
                    "{:.1}/{:.1}/{:.1}/{:.1}",
                    ms(s.agent),
                    ms(s.rmi),
                    ms(s.cri),
                    ms(s.floor)
                )
            })
            .collect();
        let phase = |f: fn(&Sample) -> &[Duration; 4], i: usize| {
            ms(median(row.samples.iter().map(|s| f(s)[i])))
        };
        println!(
            "{:>5} {:>5}  reps [{}]  agent: inventory {:.1} plan {:.2} execute {:.1}  rmi: connect {:.1} inventory {:.1} plan {:.2} execute {:.1}",
            row.keep,
            row.k,
            reps.join(", "),
            phase(|s| &s.agent_phases, 1),
            phase(|s| &s.agent_phases, 2),
            phase(|s| &s.agent_phases, 3),
            phase(|s| &s.rmi_phases, 0),
            phase(|s| &s.rmi_phases, 1),
            phase(|s| &s.rmi_phases, 2),
            phase(|s| &s.rmi_phases, 3),
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

/// Imports `images` on all four nodes, removes them with imagegc's agent engine (warm), with
/// `imagegc rmi` (cold), the CRI loop and the floor, one node each, and checks that all four
/// end identical. Each repetition rotates which node plays which role and which side runs
/// first.
async fn repetition(sockets: [&Path; ROLES], images: &[Prepared], rep: usize) -> Result<Sample> {
    for socket in sockets {
        setup(socket, images).await?;
    }
    let before = cri::state(sockets[0], &[NS]).await?;
    for socket in &sockets[1..] {
        ensure!(
            cri::state(socket, &[NS]).await? == before,
            "the nodes differ before removal"
        );
    }
    let ids: Vec<String> = images.iter().map(|p| p.image.id()).collect();
    let records: Vec<String> = images
        .iter()
        .flat_map(|p| std::iter::once(p.image.id()).chain(p.tags.iter().cloned()))
        .collect();
    let node = |role: usize| sockets[(role + rep) % ROLES];
    // The agent's connection is open and has read the node since the images arrived (it
    // reads the node at start, for every removal and policy run, and every 5 minutes; images
    // pulled since its last read are read cold, as `imagegc rmi` reads them).
    let agent = Runtime::connect(node(AGENT), NS).await?;
    agent.inventory(&Matcher::only(Platform::host())).await?;
    tokio::time::sleep(SETTLE).await;

    let mut times = [Duration::ZERO; ROLES];
    let (mut agent_phases, mut rmi_phases) = ([Duration::ZERO; 4], [Duration::ZERO; 4]);
    for i in 0..ROLES {
        let role = (i + rep) % ROLES;
        times[role] = match role {
            AGENT => {
                let (t, p) = imagegc_remove(node(AGENT), Some(&agent), &ids).await?;
                agent_phases = p;
                t
            }
            RMI => {
                let (t, p) = imagegc_remove(node(RMI), None, &ids).await?;
                rmi_phases = p;
                t
            }
            CRI_LOOP => cri_loop(node(CRI_LOOP), &ids).await?,
            _ => floor_remove(node(FLOOR), &records).await?,
        };
    }

    let ours_after = cri::state(node(AGENT), &[NS]).await?;
    for (role, name) in [
        (RMI, "imagegc rmi"),
        (CRI_LOOP, "the CRI loop"),
        (FLOOR, "the floor"),
    ] {
        let theirs = cri::state(node(role), &[NS]).await?;
        ensure!(
            ours_after == theirs,
            "the agent and {name} left different states\n agent: {ours_after:#?}\n {name}: {theirs:#?}"
        );
    }
    for id in &ids {
        ensure!(
            !ours_after.records[NS].contains(id),
            "{id} still has its record after removal"
        );
    }
    let removed: BTreeSet<&String> = before.content[NS]
        .difference(&ours_after.content[NS])
        .collect();
    ensure!(
        !removed.is_empty(),
        "removing {} images freed no content",
        ids.len()
    );
    Ok(Sample {
        agent: times[AGENT],
        rmi: times[RMI],
        cri: times[CRI_LOOP],
        floor: times[FLOOR],
        agent_phases,
        rmi_phases,
    })
}

/// The least any tool must do to reach CRI's end state, knowing the record names in advance:
/// delete every record, [`containerd::DELETE_CONCURRENCY`] at a time, the last one
/// synchronously (one garbage collection). No reads, no journal, no checks.
async fn floor_remove(socket: &Path, records: &[String]) -> Result<Duration> {
    let start = Instant::now();
    let rt = Runtime::connect(socket, NS).await?;
    let (last, rest) = records.split_last().context("no records")?;
    for chunk in rest.chunks(containerd::DELETE_CONCURRENCY) {
        let calls: Vec<_> = chunk.iter().map(|n| rt.delete_image(n, false)).collect();
        futures::future::try_join_all(calls).await?;
    }
    rt.delete_image(last, true).await?;
    Ok(start.elapsed())
}

/// imagegc's whole path: connect (unless `open` is the agent's connection), inventory, plan,
/// execute.
async fn imagegc_remove(
    socket: &Path,
    open: Option<&Runtime>,
    ids: &[String],
) -> Result<(Duration, [Duration; 4])> {
    let start = Instant::now();
    let rt = match open {
        Some(rt) => rt.clone(),
        None => Runtime::connect(socket, NS).await?,
    };
    let connected = Instant::now();
    let matcher = Matcher::only(Platform::host());
    let inv = rt.inventory(&matcher).await?;
    let inventoried = Instant::now();
    let plan = plan::plan(
        &Request {
            images: ids.to_vec(),
            force: false,
            ..Default::default()
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

/// Eraser's remover, call for call: one connection, CRI `ListImages` and `ListContainers` (to
/// tell running images from the others), then one CRI `RemoveImage` per image, in order.
async fn cri_loop(socket: &Path, ids: &[String]) -> Result<Duration> {
    let start = Instant::now();
    let channel = containerd_client::connect(socket).await?;
    let mut client = ImageServiceClient::new(channel.clone());
    let listed = client
        .list_images(ListImagesRequest::default())
        .await
        .context("CRI ListImages")?
        .into_inner()
        .images
        .len();
    RuntimeServiceClient::new(channel)
        .list_containers(ListContainersRequest::default())
        .await
        .context("CRI ListContainers")?;
    ensure!(listed >= ids.len(), "CRI lists {listed} images");
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
