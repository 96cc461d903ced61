//! `make bench-remove`: the time to remove K images from a real containerd, imagegc against the
//! strongest peer (`crictl rmi`), Eraser's remover and the floor.
//!
//! One test bed with five containerd daemons (no API server), of the flavor
//! `IMAGEGC_CONTAINERD` selects. Every repetition imports K fresh images on all five nodes and
//! waits until the CRI plugin has adopted them; then each node removes them one way:
//! - the agent: imagegc's engine on a connection that is already open and has read the node
//!   once since the images arrived, as the long-running agent has (inventory + plan + execute);
//! - `imagegc rmi`: the release binary, timed as a whole process as a user runs it, with
//!   `--timings` so it reports where its time went;
//! - `crictl rmi`: the pinned crictl, timed as a whole process (it sends CRI `ImageStatus` and
//!   `RemoveImage` for all K images at once, so containerd coalesces their collections);
//! - the CRI loop: Eraser's remover (connect + `ListImages` + `ListContainers` + K sequential
//!   `RemoveImage` calls);
//! - the floor: the bench itself deletes the 3K records it knows, as concurrently as imagegc
//!   does, the last one synchronously (one garbage collection), with no reads and no journal.
//!   No tool that keeps CRI's end state can do less, so crictl / floor is the ceiling of any
//!   tool's ratio against crictl on that node.
//!
//! All five nodes must end with identical image records and content. Each image has two tags
//! plus the `sha256:<id>` record the CRI plugin creates, a base layer shared by all images and
//! two layers of its own.
//!
//! Node shapes: the images that stay on every node throughout (`IMAGEGC_BENCH_KEEP`, default
//! `10,100,300`), with KiB-sized layers on the native snapshotter (the removal's cost is the
//! metadata); then one realistic shape (`IMAGEGC_BENCH_REALISTIC` images kept, default 50; 0
//! skips it) on a fresh bed: every image unpacked on the overlayfs snapshotter, with a 4 MiB
//! shared base and two 1 MiB layers of its own, so the collection removes files and
//! directories.
//!
//! Targets, on rows with K ≥ 20 (median ratios in one run; the command exits non-zero on a
//! miss): `imagegc rmi` at least as fast as crictl; the agent ≥ 1.2× crictl where the ceiling
//! is ≥ 1.3×, else within 1.1× of the floor; both within 1.15× of the floor; both ≥ 5× the CRI
//! loop at K = 100 on the 300-image node.
//!
//! Listing a node: before each repetition's removals, `imagegc images` and `crictl images` are
//! timed as whole processes on the same node, [`LISTING_PAIRS`] times each, alternately; the
//! imagegc listing must name every image the repetition imported. Target, on nodes holding at
//! least [`LISTING_TARGET_MIN_IMAGES`] images: `imagegc images` within 1.5× of `crictl images`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::{StreamExt, TryStreamExt};
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
const KEEP: [usize; 3] = [10, 100, 300];
/// Images kept on the realistic shape, unless `IMAGEGC_BENCH_REALISTIC` says otherwise.
const REALISTIC_KEEP: usize = 50;
/// The realistic shape's snapshotter.
const SNAPSHOTTER: &str = "overlayfs";
/// Rows with at least this many images are held to the targets.
const TARGET_MIN_K: usize = 20;
/// `imagegc images` and `crictl images` runs per repetition, each.
const LISTING_PAIRS: usize = 2;
/// Nodes holding at least this many images are held to the listing target.
const LISTING_TARGET_MIN_IMAGES: usize = 400;
/// The most `imagegc images` may take, as a multiple of `crictl images`.
const LISTING_TARGET: f64 = 1.5;
/// Pause after the nodes are synced, so the CRI plugin's event handling is done before timing.
const SETTLE: Duration = Duration::from_millis(300);

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

fn realistic_keep() -> Result<usize> {
    match std::env::var("IMAGEGC_BENCH_REALISTIC") {
        Ok(v) => v.trim().parse().with_context(|| {
            format!("IMAGEGC_BENCH_REALISTIC={v}: want a count like 50 (0: skip)")
        }),
        Err(_) => Ok(REALISTIC_KEEP),
    }
}

fn main() -> ExitCode {
    match testbed::run_bench(run()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("bench remove: BELOW TARGET (see the rows marked MISS)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench remove: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The five nodes' roles.
const AGENT: usize = 0;
const RMI: usize = 1;
const CRICTL: usize = 2;
const CRI_LOOP: usize = 3;
const FLOOR: usize = 4;
const ROLES: usize = 5;

/// Timings of one repetition.
struct Sample {
    /// Wall time per role.
    times: [Duration; ROLES],
    /// The agent's phases: inventory, plan, then execute's own.
    agent_phases: Vec<(&'static str, Duration)>,
    /// What `imagegc rmi --timings` printed.
    rmi_timings: String,
    /// Wall times of `imagegc images` and of `crictl images` on the node before removal.
    listing: [Vec<Duration>; 2],
}

/// A node shape.
#[derive(Clone, Copy)]
struct Shape {
    keep: usize,
    realistic: bool,
}

impl Shape {
    fn label(self) -> String {
        match self.realistic {
            true => format!("{}*", self.keep),
            false => self.keep.to_string(),
        }
    }

    fn image(self, seed: String) -> Prepared {
        let builder = ImageBuilder::new(seed.clone());
        let image = match self.realistic {
            true => builder
                .shared_base("bench-base-real", 4 << 20)
                .layer_sizes(&[1 << 20, 1 << 20]),
            false => builder
                .shared_base("bench-base", 4096)
                .layer_sizes(&[1024, 2048]),
        }
        .build();
        let repo = format!("registry.bench.local/{seed}");
        Prepared {
            image,
            tags: vec![format!("{repo}:v1"), format!("{repo}:latest")],
            unpack: self.realistic,
        }
    }
}

/// The repetitions of one row: a node shape and K.
struct Row {
    shape: Shape,
    k: usize,
    samples: Vec<Sample>,
}

/// The external programs timed as whole processes.
struct Programs {
    imagegc: PathBuf,
    crictl: PathBuf,
}

/// Runs every row; returns whether every row met its targets.
async fn run() -> Result<bool> {
    let flavor = Flavor::from_env();
    let shapes = keep()?;
    let realistic = realistic_keep()?;
    let programs = Programs {
        imagegc: std::env::var_os("IMAGEGC_BIN").map(PathBuf::from).context(
            "IMAGEGC_BIN is not set: build the release binary (cargo build --release --bin imagegc) \
             and point IMAGEGC_BIN at it, as make bench-remove does",
        )?,
        crictl: testbed::tools::go_tool("crictl")?,
    };
    let binary = match flavor {
        Flavor::V2 => testbed::tools::go_tool("containerd")?,
        Flavor::Debian16 => testbed::tools::debian_containerd()?,
    };
    println!(
        "containerd: {} ({}), 5 nodes (imagegc agent, imagegc rmi, crictl rmi, CRI loop, floor), \
         {REPS} repetitions per row; node shapes: {shapes:?} images kept, then {realistic} unpacked \
         on {SNAPSHOTTER} (marked *)",
        flavor.label(),
        version(&binary),
    );
    println!(
        "each image: 2 tags + sha256:<id> record; native shapes: shared 4 KiB base + 1 KiB and 2 KiB \
         layers; * shape: shared 4 MiB base + two 1 MiB layers, unpacked"
    );

    let mut rows = Vec::new();
    let mut plan: Vec<Vec<Shape>> = vec![
        shapes
            .iter()
            .map(|&keep| Shape {
                keep,
                realistic: false,
            })
            .collect(),
    ];
    if realistic > 0 {
        plan.push(vec![Shape {
            keep: realistic,
            realistic: true,
        }]);
    }
    for bed_shapes in plan {
        let bed = TestBed::start(&Options {
            nodes: ROLES,
            flavor,
            cluster: false,
            real_node: false,
        })
        .await
        .context("starting the test bed")?;
        let sockets: [&Path; ROLES] = std::array::from_fn(|i| bed.nodes[i].socket.as_path());
        let mut kept = 0;
        for shape in bed_shapes {
            // Images that stay: every side leaves them (and the shared base) alone.
            let more: Vec<Prepared> = (kept..shape.keep)
                .map(|i| shape.image(format!("keep-{i}")))
                .collect();
            for socket in sockets {
                setup(socket, &more).await?;
            }
            kept = shape.keep;
            for k in KS {
                let mut samples = Vec::new();
                for rep in 0..REPS {
                    let unpacked = if shape.realistic { "u" } else { "" };
                    let images: Vec<Prepared> = (0..k)
                        .map(|i| shape.image(format!("n{}{unpacked}-k{k}-r{rep}-{i}", shape.keep)))
                        .collect();
                    let sample = repetition(sockets, &programs, &images, rep)
                        .await
                        .with_context(|| {
                            format!("{} kept, K={k}, repetition {}", shape.label(), rep + 1)
                        })?;
                    samples.push(sample);
                }
                let row = Row { shape, k, samples };
                // Progress, so that a long run shows where it is.
                let t = medians(&row);
                eprintln!(
                    "{} kept, K={k}: agent/rmi/crictl/loop/floor {:.1}/{:.1}/{:.1}/{:.1}/{:.1} ms",
                    shape.label(),
                    t[AGENT],
                    t[RMI],
                    t[CRICTL],
                    t[CRI_LOOP],
                    t[FLOOR]
                );
                rows.push(row);
            }
        }
    }
    let removals_met = report(&rows, shapes.last().copied());
    let listings_met = listing_report(&rows);
    Ok(removals_met && listings_met)
}

/// Prints the listing table (`imagegc images` against `crictl images`, medians over every run
/// of the row); returns whether every row held to the target met it.
fn listing_report(rows: &[Row]) -> bool {
    println!();
    println!(
        "listing the node before removal, whole processes, {} runs each per row:",
        LISTING_PAIRS * REPS
    );
    println!(
        "{:>5} {:>4} {:>7} {:>15} {:>15} {:>16} {:>16}  verdict",
        "kept", "K", "images", "imagegc ms", "crictl ms", "imagegc/crictl", "spread i / c"
    );
    let mut all_met = true;
    for row in rows {
        let [imagegc, crictl] = [0, 1].map(|i| {
            let mut v: Vec<Duration> = row
                .samples
                .iter()
                .flat_map(|s| s.listing[i].iter().copied())
                .collect();
            v.sort();
            v
        });
        let (i, c) = (
            ms(median(imagegc.iter().copied())),
            ms(median(crictl.iter().copied())),
        );
        let images = row.shape.keep + row.k;
        let ratio = i / c;
        let verdict = match (images >= LISTING_TARGET_MIN_IMAGES, ratio <= LISTING_TARGET) {
            (false, _) => format!("(< {LISTING_TARGET_MIN_IMAGES} images: not held to the target)"),
            (true, true) => "PASS".to_string(),
            (true, false) => format!("MISS: imagegc {ratio:.2}× crictl > {LISTING_TARGET}×"),
        };
        all_met &= !verdict.starts_with("MISS");
        println!(
            "{:>5} {:>4} {:>7} {:>15.1} {:>15.1} {:>15.2}× {:>7.2}× {:>6.2}×  {verdict}",
            row.shape.label(),
            row.k,
            images,
            i,
            c,
            ratio,
            spread(&imagegc),
            spread(&crictl),
        );
    }
    all_met
}

/// Largest over smallest of sorted, non-empty `times`.
fn spread(times: &[Duration]) -> f64 {
    match (times.first(), times.last()) {
        (Some(lo), Some(hi)) if !lo.is_zero() => hi.as_secs_f64() / lo.as_secs_f64(),
        _ => f64::NAN,
    }
}

/// The medians of a row, in ms, by role.
fn medians(row: &Row) -> [f64; ROLES] {
    std::array::from_fn(|role| ms(median(row.samples.iter().map(|s| s.times[role]))))
}

/// Checks a row against the targets; returns the misses, in words.
fn misses(row: &Row, t: &[f64; ROLES], largest: Option<usize>) -> Vec<String> {
    let mut misses = Vec::new();
    if row.k < TARGET_MIN_K {
        return misses;
    }
    let ceiling = t[CRICTL] / t[FLOOR];
    if t[CRICTL] / t[RMI] < 1.0 {
        misses.push(format!("rmi {:.2}× crictl < 1.0×", t[CRICTL] / t[RMI]));
    }
    if ceiling >= 1.3 && t[CRICTL] / t[AGENT] < 1.2 {
        misses.push(format!(
            "agent {:.2}× crictl < 1.2× (ceiling {ceiling:.2}×)",
            t[CRICTL] / t[AGENT]
        ));
    }
    if ceiling < 1.3 && t[AGENT] / t[FLOOR] > 1.1 {
        misses.push(format!(
            "agent {:.2}× the floor > 1.1×",
            t[AGENT] / t[FLOOR]
        ));
    }
    for (role, name) in [(AGENT, "agent"), (RMI, "rmi")] {
        if t[role] / t[FLOOR] > 1.15 {
            misses.push(format!(
                "{name} {:.2}× the floor > 1.15×",
                t[role] / t[FLOOR]
            ));
        }
        let eraser_row = !row.shape.realistic && Some(row.shape.keep) == largest && row.k == 100;
        if eraser_row && row.shape.keep >= 300 && t[CRI_LOOP] / t[role] < 5.0 {
            misses.push(format!(
                "{name} {:.2}× the CRI loop < 5×",
                t[CRI_LOOP] / t[role]
            ));
        }
    }
    misses
}

/// Prints the table and the details; returns whether every row met its targets.
fn report(rows: &[Row], largest: Option<usize>) -> bool {
    println!();
    println!(
        "{:>5} {:>4} {:>8} {:>7} {:>9} {:>8} {:>7} | {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>7} {:>7}  verdict",
        "kept",
        "K",
        "agent ms",
        "rmi ms",
        "crictl ms",
        "loop ms",
        "floor ms",
        "crictl/",
        "crictl/",
        "ceiling",
        "agent/",
        "rmi/",
        "loop/",
        "loop/"
    );
    println!(
        "{:>5} {:>4} {:>8} {:>7} {:>9} {:>8} {:>7} | {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>7} {:>7}",
        "", "", "", "", "", "", "", "agent", "rmi", "", "floor", "floor", "agent", "rmi"
    );
    let mut all_met = true;
    for row in rows {
        let t = medians(row);
        let misses = misses(row, &t, largest);
        all_met &= misses.is_empty();
        let verdict = match (row.k < TARGET_MIN_K, misses.is_empty()) {
            (true, _) => "(K < 20: not held to the targets)".to_string(),
            (false, true) => "PASS".to_string(),
            (false, false) => format!("MISS: {}", misses.join("; ")),
        };
        println!(
            "{:>5} {:>4} {:>8.1} {:>7.1} {:>9.1} {:>8.1} {:>7.1} | {:>7.2}× {:>7.2}× {:>7.2}× | {:>7.2}× {:>7.2}× | {:>6.2}× {:>6.2}×  {verdict}",
            row.shape.label(),
            row.k,
            t[AGENT],
            t[RMI],
            t[CRICTL],
            t[CRI_LOOP],
            t[FLOOR],
            t[CRICTL] / t[AGENT],
            t[CRICTL] / t[RMI],
            t[CRICTL] / t[FLOOR],
            t[AGENT] / t[FLOOR],
            t[RMI] / t[FLOOR],
            t[CRI_LOOP] / t[AGENT],
            t[CRI_LOOP] / t[RMI],
        );
    }
    println!();
    println!("all five nodes ended with identical image records and content in every repetition");
    println!(
        "per repetition (agent / rmi / crictl / loop / floor ms), then the agent's phases and"
    );
    println!("what `imagegc rmi --timings` printed (median ms of the agent's phases):");
    for row in rows {
        let reps: Vec<String> = row
            .samples
            .iter()
            .map(|s| {
                let t: Vec<String> = s.times.iter().map(|d| format!("{:.1}", ms(*d))).collect();
                t.join("/")
            })
            .collect();
        println!(
            "{:>5} {:>4}  reps [{}]",
            row.shape.label(),
            row.k,
            reps.join(", ")
        );
        let names: Vec<&str> = row.samples[0].agent_phases.iter().map(|p| p.0).collect();
        let agent: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let d = median(
                    row.samples
                        .iter()
                        .filter_map(|s| s.agent_phases.get(i).map(|p| p.1)),
                );
                format!("{name} {:.1}", ms(d))
            })
            .collect();
        println!("             agent: {}", agent.join(", "));
        for s in &row.samples {
            println!("             rmi: {}", s.rmi_timings);
        }
    }
    all_met
}

/// One image to import, with its names.
struct Prepared {
    image: BuiltImage,
    tags: Vec<String>,
    /// Whether to unpack it on [`SNAPSHOTTER`].
    unpack: bool,
}

/// Imports `images` into `socket` (unpacking those that ask for it) and waits until the CRI
/// plugin has adopted them.
async fn setup(socket: &Path, images: &[Prepared]) -> Result<()> {
    for p in images {
        image::import(socket, NS, &p.image, &p.tags, &HashMap::new())
            .await
            .context("importing")?;
        if p.unpack {
            image::unpack(socket, NS, &p.image, SNAPSHOTTER)
                .await
                .context("unpacking")?;
        }
    }
    let ids: Vec<String> = images.iter().map(|p| p.image.id()).collect();
    let refs: Vec<&str> = images
        .iter()
        .flat_map(|p| p.tags.iter().map(String::as_str))
        .collect();
    cri::wait_synced(socket, &ids, &refs).await
}

/// Imports `images` on all five nodes, removes them one way per node, and checks that all five
/// end identical. Each repetition rotates which node plays which role and which runs first.
async fn repetition(
    sockets: [&Path; ROLES],
    programs: &Programs,
    images: &[Prepared],
    rep: usize,
) -> Result<Sample> {
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

    let listing = time_listings(node(AGENT), programs, images, rep)?;

    let mut times = [Duration::ZERO; ROLES];
    let mut agent_phases = Vec::new();
    let mut rmi_timings = String::new();
    for i in 0..ROLES {
        let role = (i + rep) % ROLES;
        times[role] = match role {
            AGENT => {
                let (t, p) = agent_remove(&agent, &ids).await?;
                agent_phases = p;
                t
            }
            RMI => {
                let mut cmd = std::process::Command::new(&programs.imagegc);
                cmd.arg("rmi")
                    .arg("--socket")
                    .arg(node(RMI))
                    .args(["--namespace", NS, "--timings"])
                    .args(&ids);
                let (t, stderr) = whole_process(cmd)?;
                rmi_timings = stderr.trim().to_string();
                t
            }
            CRICTL => {
                let endpoint = format!("unix://{}", node(CRICTL).display());
                let mut cmd = std::process::Command::new(&programs.crictl);
                cmd.args([
                    "--runtime-endpoint",
                    &endpoint,
                    "--image-endpoint",
                    &endpoint,
                ])
                .args(["--timeout", "60s", "rmi"])
                .args(&ids);
                whole_process(cmd)?.0
            }
            CRI_LOOP => cri_loop(node(CRI_LOOP), &ids).await?,
            _ => floor_remove(node(FLOOR), &records).await?,
        };
    }

    let ours_after = cri::state(node(AGENT), &[NS]).await?;
    for (role, name) in [
        (RMI, "imagegc rmi"),
        (CRICTL, "crictl rmi"),
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
        times,
        agent_phases,
        rmi_timings,
        listing,
    })
}

/// Times `imagegc images` and `crictl images` on `socket`, [`LISTING_PAIRS`] runs each,
/// alternately (which goes first rotates with `rep`). Fails unless imagegc's listing names
/// every reference of `images`.
fn time_listings(
    socket: &Path,
    programs: &Programs,
    images: &[Prepared],
    rep: usize,
) -> Result<[Vec<Duration>; 2]> {
    let endpoint = format!("unix://{}", socket.display());
    let mut times: [Vec<Duration>; 2] = Default::default();
    for run in 0..2 * LISTING_PAIRS {
        let which = (run + rep) % 2;
        if which == 0 {
            let mut cmd = std::process::Command::new(&programs.imagegc);
            cmd.arg("images")
                .arg("--socket")
                .arg(socket)
                .args(["--namespace", NS]);
            let (t, stdout) = whole_process_output(cmd)?;
            for tag in images.iter().flat_map(|p| &p.tags) {
                ensure!(
                    stdout.contains(tag.as_str()),
                    "imagegc images does not list {tag}"
                );
            }
            times[0].push(t);
        } else {
            let mut cmd = std::process::Command::new(&programs.crictl);
            cmd.args(["--image-endpoint", &endpoint, "--timeout", "60s", "images"]);
            times[1].push(whole_process_output(cmd)?.0);
        }
    }
    Ok(times)
}

/// Runs `cmd` to its end; returns its wall time, from just before the start to the exit, and
/// its standard error. Fails if it exits non-zero.
fn whole_process(cmd: std::process::Command) -> Result<(Duration, String)> {
    let (elapsed, out) = run_to_end(cmd)?;
    Ok((elapsed, String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// [`whole_process`], returning the standard output instead.
fn whole_process_output(cmd: std::process::Command) -> Result<(Duration, String)> {
    let (elapsed, out) = run_to_end(cmd)?;
    Ok((elapsed, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Runs `cmd` to its end, timing it from just before the start to the exit; fails if it exits
/// non-zero.
fn run_to_end(mut cmd: std::process::Command) -> Result<(Duration, std::process::Output)> {
    let start = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    let elapsed = start.elapsed();
    ensure!(
        out.status.success(),
        "{:?} exited with {}: {}{}",
        cmd.get_program(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((elapsed, out))
}

/// The least any tool must do to reach CRI's end state, knowing the record names in advance:
/// delete every record, [`containerd::DELETE_CONCURRENCY`] in flight, the last one
/// synchronously (one garbage collection). No reads, no journal, no checks.
async fn floor_remove(socket: &Path, records: &[String]) -> Result<Duration> {
    let start = Instant::now();
    let rt = Runtime::connect(socket, NS).await?;
    let (last, rest) = records.split_last().context("no records")?;
    let calls: Vec<_> = rest.iter().map(|n| rt.delete_image(n, false)).collect();
    let _: Vec<bool> = futures::stream::iter(calls)
        .buffered(containerd::DELETE_CONCURRENCY)
        .try_collect()
        .await?;
    rt.delete_image(last, true).await?;
    Ok(start.elapsed())
}

/// The agent's path on its open connection: inventory, plan, execute; returns the wall time
/// and the phases (inventory, plan, then execute's own).
async fn agent_remove(
    rt: &Runtime,
    ids: &[String],
) -> Result<(Duration, Vec<(&'static str, Duration)>)> {
    let start = Instant::now();
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
    let done = containerd::execute(rt, plan).await?;
    let elapsed = start.elapsed();
    ensure!(
        not_removed.is_empty(),
        "imagegc did not plan to remove everything: {not_removed:?}"
    );
    let mut phases = vec![
        ("inventory", inventoried - start),
        ("plan", planned - inventoried),
    ];
    phases.extend(done.phases);
    Ok((elapsed, phases))
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
