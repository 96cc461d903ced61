//! The agent's Prometheus metrics (prefix `imagegc_agent_`).

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::api::{ImageOutcome, InventorySummary, PolicyRun, RemovalPhase, RemovalResult, Trigger};
use crate::containerd::RuntimeError;

/// Label sets, as in the controller: fixed names, values from a closed set.
type Labels<const N: usize> = [(&'static str, &'static str); N];

/// Every metric the agent exports.
pub struct Metrics {
    removals: Family<Labels<2>, Counter>,
    images: Family<Labels<1>, Counter>,
    bytes_freed: Counter,
    runtime_errors: Family<Labels<1>, Counter>,
    /// Writes of the NodeImageReport (object and status).
    pub report_writes: Counter,
    inventory_images: Gauge,
    inventory_bytes: Gauge,
    removal_seconds: Histogram,
    policy_runs: Family<Labels<2>, Counter>,
    policy_images: Family<Labels<1>, Counter>,
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
            .get_or_create(&[("trigger", trigger), ("dry_run", bool_label(run.dry_run))])
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
                    .get_or_create(&[("outcome", outcome)])
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
            .get_or_create(&[("phase", phase), ("dry_run", bool_label(result.dry_run))])
            .inc();
        self.bytes_freed.inc_by(result.bytes_freed.max(0) as u64);
        self.removal_seconds.observe(took.as_secs_f64());
    }

    /// Counts one image outcome.
    pub fn image_outcome(&self, outcome: ImageOutcome) {
        self.images
            .get_or_create(&[("outcome", outcome.as_str())])
            .inc();
    }

    /// Counts one containerd failure.
    pub fn runtime_error(&self, e: &RuntimeError) {
        self.runtime_errors
            .get_or_create(&[("kind", e.metric_label())])
            .inc();
    }

    /// Sets the inventory gauges.
    pub fn inventory(&self, summary: &InventorySummary) {
        self.inventory_images.set(summary.images as i64);
        self.inventory_bytes.set(summary.bytes);
    }
}

fn bool_label(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn counters_carry_their_labels_under_the_agent_prefix() {
        let mut registry = Registry::with_prefix("imagegc_agent");
        let m = Metrics::register(&mut registry);
        let result = RemovalResult {
            phase: RemovalPhase::Succeeded,
            bytes_freed: 700,
            ..Default::default()
        };
        m.executed(&result, Duration::from_millis(20));
        m.image_outcome(ImageOutcome::Removed);
        m.image_outcome(ImageOutcome::Removed);
        m.policy_run(&PolicyRun {
            trigger: Trigger::Watermark,
            chosen: 3,
            removed: 2,
            bytes_freed: 300,
            ..Default::default()
        });
        let text = encoded(&registry);
        for line in [
            r#"imagegc_agent_removals_total{phase="Succeeded",dry_run="false"} 1"#,
            r#"imagegc_agent_images_total{outcome="Removed"} 2"#,
            r#"imagegc_agent_policy_runs_total{trigger="Watermark",dry_run="false"} 1"#,
            r#"imagegc_agent_policy_images_total{outcome="Removed"} 2"#,
            r#"imagegc_agent_policy_images_total{outcome="Kept"} 1"#,
            "imagegc_agent_freed_bytes_total 1000",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn a_dry_run_counts_what_it_would_remove_and_frees_nothing() {
        let mut registry = Registry::with_prefix("imagegc_agent");
        let m = Metrics::register(&mut registry);
        m.policy_run(&PolicyRun {
            trigger: Trigger::Schedule,
            dry_run: true,
            chosen: 4,
            bytes_freed: 999,
            ..Default::default()
        });
        let text = encoded(&registry);
        assert!(
            text.contains(r#"imagegc_agent_policy_images_total{outcome="WouldRemove"} 4"#),
            "{text}"
        );
        assert!(text.contains("imagegc_agent_freed_bytes_total 0"), "{text}");
        assert!(!text.contains(r#"outcome="Kept""#), "{text}");
    }
}
