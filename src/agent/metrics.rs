//! The agent's Prometheus metrics (prefix `imagegc_agent_`).

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::api::{ImageOutcome, InventorySummary, PolicyRun, RemovalPhase, RemovalResult, Trigger};
use crate::containerd::RuntimeError;

type Labels = Vec<(&'static str, String)>;

/// Every metric the agent exports.
pub struct Metrics {
    removals: Family<Labels, Counter>,
    images: Family<Labels, Counter>,
    bytes_freed: Counter,
    runtime_errors: Family<Labels, Counter>,
    /// Writes of the NodeImageReport (object and status).
    pub report_writes: Counter,
    inventory_images: Gauge,
    inventory_bytes: Gauge,
    removal_seconds: Histogram,
    policy_runs: Family<Labels, Counter>,
    policy_images: Family<Labels, Counter>,
    image_fs_usage: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            removals: Family::default(),
            images: Family::default(),
            bytes_freed: Counter::default(),
            runtime_errors: Family::default(),
            report_writes: Counter::default(),
            inventory_images: Gauge::default(),
            inventory_bytes: Gauge::default(),
            removal_seconds: Histogram::new([
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            policy_runs: Family::default(),
            policy_images: Family::default(),
            image_fs_usage: Gauge::default(),
        };
        registry.register(
            "removals",
            "ImageRemovals finished on this node, by phase and dry run",
            m.removals.clone(),
        );
        registry.register(
            "images",
            "Requested images by outcome (Removed, NotPresent, InUse, Pinned, Invalid, ...)",
            m.images.clone(),
        );
        registry.register_with_unit(
            "freed",
            "Content bytes freed by removals",
            Unit::Bytes,
            m.bytes_freed.clone(),
        );
        registry.register(
            "containerd_errors",
            "Failed containerd calls, by kind",
            m.runtime_errors.clone(),
        );
        registry.register(
            "report_writes",
            "Writes of this node's NodeImageReport",
            m.report_writes.clone(),
        );
        registry.register(
            "inventory_images",
            "CRI images on this node",
            m.inventory_images.clone(),
        );
        registry.register_with_unit(
            "inventory",
            "Content bytes in this node's containerd namespace",
            Unit::Bytes,
            m.inventory_bytes.clone(),
        );
        registry.register_with_unit(
            "removal_duration",
            "Time to plan and execute one ImageRemoval on this node",
            Unit::Seconds,
            m.removal_seconds.clone(),
        );
        registry.register(
            "policy_runs",
            "ImagePrunePolicy runs on this node, by trigger and dry run",
            m.policy_runs.clone(),
        );
        registry.register(
            "policy_images",
            "Images ImagePrunePolicy runs chose, by outcome (Removed; WouldRemove in dry runs; Kept when found in use or pinned at removal time)",
            m.policy_images.clone(),
        );
        registry.register(
            "image_fs_usage_percent",
            "Usage of containerd's image filesystem, as the watermarks read it",
            m.image_fs_usage.clone(),
        );
        m
    }

    /// Counts one policy run.
    pub fn policy_run(&self, run: &PolicyRun) {
        let trigger = match run.trigger {
            Trigger::Schedule => "Schedule",
            Trigger::Watermark => "Watermark",
        };
        self.policy_runs
            .get_or_create(&vec![
                ("trigger", trigger.to_string()),
                ("dry_run", run.dry_run.to_string()),
            ])
            .inc();
        let (outcome, count) = if run.dry_run {
            (ImageOutcome::WouldRemove.as_str(), run.chosen)
        } else {
            (ImageOutcome::Removed.as_str(), run.removed)
        };
        let kept = if run.dry_run {
            0
        } else {
            run.chosen - run.removed
        };
        for (outcome, count) in [(outcome, count), ("Kept", kept)] {
            if count > 0 {
                self.policy_images
                    .get_or_create(&vec![("outcome", outcome.to_string())])
                    .inc_by(count as u64);
            }
        }
        self.bytes_freed.inc_by(if run.dry_run {
            0
        } else {
            run.bytes_freed.max(0) as u64
        });
    }

    /// Sets the image filesystem's usage gauge.
    pub fn image_fs_usage(&self, percent: i64) {
        self.image_fs_usage.set(percent);
    }

    /// Counts one finished removal.
    pub fn executed(&self, result: &RemovalResult, took: Duration) {
        let phase = match result.phase {
            RemovalPhase::Succeeded => "Succeeded",
            RemovalPhase::Failed => "Failed",
        };
        self.removals
            .get_or_create(&vec![
                ("phase", phase.to_string()),
                ("dry_run", result.dry_run.to_string()),
            ])
            .inc();
        self.bytes_freed.inc_by(result.bytes_freed.max(0) as u64);
        self.removal_seconds.observe(took.as_secs_f64());
    }

    /// Counts one image outcome.
    pub fn image_outcome(&self, outcome: ImageOutcome) {
        self.images
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
    }

    /// Counts one containerd failure.
    pub fn runtime_error(&self, e: &RuntimeError) {
        self.runtime_errors
            .get_or_create(&vec![("kind", e.metric_label().to_string())])
            .inc();
    }

    /// Sets the inventory gauges.
    pub fn inventory(&self, summary: &InventorySummary) {
        self.inventory_images.set(summary.images as i64);
        self.inventory_bytes.set(summary.bytes);
    }
}
