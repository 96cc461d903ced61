//! The local commands an operator runs at a node's shell: `imagegc images` and `imagegc rmi`.
//! They use the same engine as the agent, so what they print is what the agent would do.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use serde::Serialize;

use crate::core::inventory::{CriImage, ImageRecord, Inventory};
use crate::core::last_used::{self, Seen};
use crate::core::plan::{self, Outcome, Request};
use crate::core::platform::{Matcher, Platform};
use crate::core::prune::human_duration;
use crate::runtime::{Runtime, RuntimeArgs, RuntimeError};

/// Where to find the container runtime, and how to read it.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// The runtime's socket, API and namespace.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Platform whose manifest defines an image's ID, as os/arch[/variant] (default: this host).
    #[arg(long, hide = true)]
    pub platform: Option<Platform>,
    /// Print how long each step took, on standard error (for benchmarks).
    #[arg(long, hide = true)]
    pub timings: bool,
}

impl Target {
    fn matcher(&self) -> Matcher {
        Matcher::only(self.platform.clone().unwrap_or_else(Platform::host))
    }

    async fn connect(&self) -> Result<Runtime, RuntimeError> {
        self.runtime.connector().connect(false).await
    }
}

/// Output format of `imagegc images`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// One JSON document.
    Json,
}

#[derive(Serialize)]
struct ImageRow<'a> {
    id: &'a str,
    references: &'a [String],
    size: i64,
    pinned: bool,
    in_use: bool,
    used_by: &'a [String],
    /// Unix seconds, from the agent's `imagegc.dev/first-seen` label.
    first_seen: Option<i64>,
    /// Unix seconds, from the agent's `imagegc.dev/last-used` label.
    last_used: Option<i64>,
}

/// The LAST USED cell: how long ago, "-" without a record.
fn last_used_cell(seen: Seen, now: i64) -> String {
    match seen.last_used {
        Some(at) => format!("{} ago", human_duration((now - at).max(0))),
        None => "-".into(),
    }
}

/// Human-readable bytes (binary units).
pub fn human_bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v.abs() >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// Renders an inventory as `imagegc images` prints it; `records` supply the agent's
/// first-seen and last-used labels, `now` (Unix seconds) the ages.
pub fn render_images(
    inv: &Inventory,
    records: &[ImageRecord],
    now: i64,
    format: Format,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let by_name: BTreeMap<&str, &ImageRecord> =
        records.iter().map(|r| (r.name.as_str(), r)).collect();
    let seen_of = |i: &CriImage| last_used::seen(&i.references, &by_name);
    match format {
        Format::Json => {
            let rows: Vec<ImageRow<'_>> = inv
                .images
                .values()
                .map(|i| ImageRow {
                    id: &i.id,
                    references: &i.references,
                    size: i.size,
                    pinned: i.pinned,
                    in_use: !i.used_by.is_empty(),
                    used_by: &i.used_by,
                    first_seen: seen_of(i).first_seen,
                    last_used: seen_of(i).last_used,
                })
                .collect();
            serde_json::to_writer_pretty(&mut *out, &rows)?;
            writeln!(out)
        }
        Format::Table => {
            writeln!(
                out,
                "{:<14} {:>9}  {:<6}  {:<6}  {:<12}  REFERENCES",
                "IMAGE ID", "SIZE", "PINNED", "IN USE", "LAST USED"
            )?;
            for i in inv.images.values() {
                let short = i.id.trim_start_matches("sha256:");
                let refs: Vec<&str> = i
                    .references
                    .iter()
                    .map(String::as_str)
                    .filter(|r| *r != i.id)
                    .collect();
                writeln!(
                    out,
                    "{:<14} {:>9}  {:<6}  {:<6}  {:<12}  {}",
                    &short[..short.len().min(13)],
                    human_bytes(i.size),
                    if i.pinned { "yes" } else { "no" },
                    if i.used_by.is_empty() { "no" } else { "yes" },
                    last_used_cell(seen_of(i), now),
                    if refs.is_empty() {
                        "<none>".to_string()
                    } else {
                        refs.join(", ")
                    }
                )?;
            }
            Ok(())
        }
    }
}

/// `imagegc images`.
pub async fn images(target: &Target, format: Format, out: &mut impl Write) -> Result<(), CliError> {
    let start = Instant::now();
    let rt = target.connect().await?;
    let (inv, records, stats) = rt.inventory_listed(&target.matcher()).await?;
    if target.timings {
        eprintln!(
            "timings (ms): listing {:.1}, content reads {:.1}; total {:.1}; {} target(s), {} blob(s) read",
            stats.listed.as_secs_f64() * 1000.0,
            (stats.elapsed - stats.listed).as_secs_f64() * 1000.0,
            start.elapsed().as_secs_f64() * 1000.0,
            stats.targets_read,
            stats.blobs_read
        );
    }
    if inv.images.is_empty() && matches!(format, Format::Table) {
        writeln!(out, "no images in {}", rt.location())?;
        return Ok(());
    }
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    render_images(&inv, &records, now, format, out)?;
    Ok(())
}

/// `imagegc rmi`: prints one line per image; returns whether every image ended as asked
/// (removed, or not present). If any string is invalid or ambiguous, nothing at all is removed:
/// a typo in a batch must not half-run it.
pub async fn rmi(
    target: &Target,
    images: Vec<String>,
    force: bool,
    dry_run: bool,
    out: &mut impl Write,
) -> Result<bool, CliError> {
    let start = Instant::now();
    let rt = target.connect().await?;
    let connected = start.elapsed();
    let matcher = target.matcher();
    let (inv, stats) = rt.inventory_for(&images, &matcher).await?;
    let plan = plan::plan(
        &Request {
            images,
            force,
            ..Default::default()
        },
        &inv,
    );
    let mut timings = vec![
        ("connect", connected),
        ("listing", stats.listed),
        ("content reads", stats.elapsed - stats.listed),
    ];
    let mut ok = true;
    let verb = if dry_run { "would remove" } else { "removed" };
    for item in &plan.items {
        let line = match &item.outcome {
            Outcome::Remove { .. } => format!("{verb} {}", item.outcome),
            other => {
                ok &= matches!(other, Outcome::NotPresent);
                format!("{}: {other}", other.kind())
            }
        };
        writeln!(out, "{}: {line}", item.input)?;
    }
    if plan.items.iter().any(|i| i.outcome.is_failure()) {
        writeln!(
            out,
            "nothing removed: fix the invalid or ambiguous image(s) above and run again"
        )?;
        return Ok(false);
    }
    if !plan.resumed.is_empty() {
        writeln!(
            out,
            "finishing an interrupted removal: {}",
            plan.resumed.join(", ")
        )?;
    }
    if dry_run {
        writeln!(
            out,
            "dry run: {} record(s) would be deleted, nothing changed",
            plan.deletes.len()
        )?;
        return Ok(ok);
    }
    let done = rt.execute(plan).await?;
    if target.timings {
        timings.extend(done.phases.iter().copied());
        let steps: Vec<String> = timings
            .iter()
            .map(|(step, d)| format!("{step} {:.1}", d.as_secs_f64() * 1000.0))
            .collect();
        eprintln!(
            "timings (ms): {}; total {:.1}; {} target(s), {} blob(s) read{}",
            steps.join(", "),
            start.elapsed().as_secs_f64() * 1000.0,
            stats.targets_read,
            stats.blobs_read,
            if stats.read_all {
                ", every image read"
            } else {
                ""
            }
        );
    }
    match rt {
        Runtime::Containerd(_) if !done.deleted.is_empty() || !done.already_gone.is_empty() => {
            writeln!(
                out,
                "deleted {} record(s); {} of content freed; {} garbage collection(s)",
                done.deleted.len(),
                human_bytes(done.freed_bytes),
                done.gc_runs
            )?
        }
        Runtime::Cri(_) if !done.deleted.is_empty() => writeln!(
            out,
            "removed {} image(s) by ID through CRI RemoveImage; up to {} freed (the runtime's image sizes)",
            done.deleted.len(),
            human_bytes(done.freed_bytes),
        )?,
        _ => {}
    }
    Ok(ok)
}

/// Errors of the local commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The container runtime could not be reached or refused a call.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Generating the CRDs failed.
    #[error("generating CRDs: {0}")]
    Generate(String),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::last_used::LAST_USED_LABEL;

    #[test]
    fn images_table_shows_when_each_image_was_last_used() {
        let mut inv = Inventory::default();
        for (id, name) in [("sha256:aaaa", "x:1"), ("sha256:bbbb", "y:1")] {
            inv.images.insert(
                id.into(),
                CriImage {
                    id: id.into(),
                    references: vec![name.into()],
                    size: 2048,
                    pinned: false,
                    used_by: vec![],
                    content: Default::default(),
                },
            );
        }
        let records = [ImageRecord {
            name: "x:1".into(),
            target: Default::default(),
            labels: [(LAST_USED_LABEL.to_string(), "1000".to_string())].into(),
            created: None,
        }];
        let mut table = Vec::new();
        render_images(&inv, &records, 1000 + 7_200 + 60, Format::Table, &mut table).unwrap();
        let table = String::from_utf8(table).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("LAST USED"), "{table}");
        assert!(
            lines[1].contains("2h 1m ago") && lines[1].ends_with("x:1"),
            "{table}"
        );
        assert!(
            lines[2].contains(" - ") && lines[2].ends_with("y:1"),
            "{table}"
        );

        let mut json = Vec::new();
        render_images(&inv, &records, 5000, Format::Json, &mut json).unwrap();
        let rows: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(rows[0]["last_used"], 1000);
        assert_eq!(rows[1]["last_used"], serde_json::Value::Null);
    }
}
