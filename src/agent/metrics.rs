//! The agent's Prometheus metrics (prefix `imagegc_agent_`).

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::api::{InventorySummary, RemovalPhase, RemovalResult};
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
        m
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
    pub fn image_outcome(&self, outcome: &str) {
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
