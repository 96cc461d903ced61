//! `ImagePrunePolicy`: "keep every selected node's images under control", a standing rule each
//! node's agent evaluates on its own schedule or when its image filesystem fills up.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// At most this many globs in `include` and in `exclude`.
pub const MAX_GLOBS: usize = 50;

/// A standing pruning rule. Pinned images, images in use and the agent's protected images
/// (by default the pause image and imagegc's own) are never removed, whatever it says.
// kube's derive takes one `printcolumn(...)` per column, which clippy sees as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "imagegc.dev",
    version = "v1alpha1",
    kind = "ImagePrunePolicy",
    status = "ImagePrunePolicyStatus",
    shortname = "ipp",
    category = "imagegc",
    doc = "Prunes images on the nodes a selector picks, on a schedule or when disk usage crosses a watermark.",
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(
        name = "High",
        type_ = "integer",
        json_path = ".spec.watermark.highPercent"
    ),
    printcolumn(name = "DryRun", type_ = "boolean", json_path = ".spec.dryRun"),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".status.targetNodes"),
    printcolumn(
        name = "Evaluated",
        type_ = "integer",
        json_path = ".status.nodesEvaluated"
    ),
    printcolumn(
        name = "Removed",
        type_ = "integer",
        json_path = ".status.imagesRemoved"
    ),
    printcolumn(name = "Freed", type_ = "integer", json_path = ".status.bytesFreed"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Last Run", type_ = "date", json_path = ".status.lastRun"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("has(self.schedule) || has(self.watermark)").message("set a schedule, a watermark, or both: a policy without a trigger never runs")
)]
#[serde(rename_all = "camelCase")]
pub struct ImagePrunePolicySpec {
    /// Which nodes (a label selector over Nodes); empty or absent selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// When to run, as a standard 5-field cron expression in UTC (`minute hour day-of-month
    /// month day-of-week`, e.g. `0 3 * * *`) or `@hourly`, `@daily`, `@weekly`, `@monthly`.
    /// Each node runs at its own offset after the scheduled minute (the agent's jitter), so a
    /// large fleet does not prune in the same second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub schedule: Option<String>,
    /// Prune when the image filesystem's usage reaches `highPercent`, until it is at or below
    /// `lowPercent` (checked by each agent every few seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<WatermarkSpec>,
    /// Only images no container has used for at least this long (`7d`, `36h`, `1d12h`, `90m`).
    /// An image with no recorded use counts as used when the agent first saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]{1,9}[dhms])+$"))]
    pub unused_for: Option<String>,
    /// Only images on the node for at least this long (same format as `unusedFor`): since
    /// containerd pulled them, or since the agent first saw them if that is earlier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]{1,9}[dhms])+$"))]
    pub older_than: Option<String>,
    /// Only images with a reference matching one of these globs (`docker.io/library/*`,
    /// `*:pr-*`); empty means every image. References are normalized
    /// (`docker.io/library/nginx:1.25`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50), inner(length(min = 1, max = 512)))]
    pub include: Vec<String>,
    /// Never images with a reference matching one of these globs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50), inner(length(min = 1, max = 512)))]
    pub exclude: Vec<String>,
    /// Keep the N most recently pulled images of every repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub keep_newest: Option<u32>,
    /// Report what would be removed; remove nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Remove at most this many images per node per run (1 to 100; default 100: a run is one
    /// batch, and the report lists a bounded number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_images_per_run: Option<u32>,
}

/// Image-filesystem usage thresholds, in percent of its capacity.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("self.lowPercent < self.highPercent").message("lowPercent must be below highPercent")
)]
#[serde(rename_all = "camelCase")]
pub struct WatermarkSpec {
    /// Start pruning when usage is at or above this (1 to 100).
    #[schemars(range(min = 1, max = 100))]
    pub high_percent: u8,
    /// Prune until usage is at or below this (0 to 99).
    #[schemars(range(min = 0, max = 99))]
    pub low_percent: u8,
}

/// Aggregated over the selected nodes' NodeImageReports by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagePrunePolicyStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes the selector picks.
    #[serde(default)]
    pub target_nodes: i32,
    /// Selected nodes that have run this generation at least once.
    #[serde(default)]
    pub nodes_evaluated: i32,
    /// Images removed on all nodes together since the policy was created.
    #[serde(default)]
    pub images_removed: i64,
    /// Content bytes freed on all nodes together since the policy was created.
    #[serde(default)]
    pub bytes_freed: i64,
    /// Images the latest run on each node chose (removed, or would remove in a dry run),
    /// summed over the nodes.
    #[serde(default)]
    pub last_run_chosen: i64,
    /// The latest run on any node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<Time>,
    /// `Ready`: the policy is valid and the agents evaluate it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
