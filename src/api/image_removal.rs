//! `ImageRemoval`: "remove these images from these nodes".

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// At most this many images per removal (keeps every node's report bounded).
pub const MAX_IMAGES: usize = 100;
/// At most this many failure samples in a removal's status.
pub const MAX_FAILURE_SAMPLES: usize = 10;

/// Remove images from the nodes a selector picks, with CRI RemoveImage semantics: every
/// reference of each image goes; pinned images never do; images in use only with `force`.
// kube's derive takes one `printcolumn(...)` per column, which clippy sees as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "imagegc.dev",
    version = "v1alpha1",
    kind = "ImageRemoval",
    status = "ImageRemovalStatus",
    shortname = "irm",
    category = "imagegc",
    doc = "Removes container images from the nodes a selector picks.",
    printcolumn(name = "Targets", type_ = "integer", json_path = ".status.targetNodes"),
    printcolumn(name = "Succeeded", type_ = "integer", json_path = ".status.succeeded"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failed"),
    printcolumn(name = "Pending", type_ = "integer", json_path = ".status.pending"),
    printcolumn(
        name = "Complete",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Complete\")].status"
    ),
    printcolumn(
        name = "Freed",
        type_ = "integer",
        json_path = ".status.bytesFreed",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ImageRemovalSpec {
    /// Images to remove: image IDs (`sha256:<64 hex>`), short IDs, or references
    /// (`nginx`, `registry.k8s.io/pause:3.10`, `repo@sha256:…`). 1 to 100 entries.
    #[schemars(length(min = 1, max = 100), inner(length(min = 1, max = 512)))]
    #[x_kube(validation = Rule::new("self.all(i, !i.matches('[*?\\\\[\\\\]\\\\s]'))").message("images must not contain whitespace or wildcards (*, ?, [, ]): name each image by ID, short ID or reference"))]
    pub images: Vec<String>,
    /// Which nodes (a label selector over Nodes); empty or absent selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Also remove images that containers use. Pinned images are never removed.
    #[serde(default)]
    pub force: bool,
    /// Report what would be removed; remove nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Delete this object this many seconds after it finished (0 to 30 days); absent keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2_592_000))]
    pub ttl_seconds_after_finished: Option<i64>,
}

/// Aggregated over the target nodes' NodeImageReports by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageRemovalStatus {
    /// The generation these counts describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes the selector picks.
    #[serde(default)]
    pub target_nodes: i32,
    /// Target nodes where every image is removed or was not present.
    #[serde(default)]
    pub succeeded: i32,
    /// Target nodes where at least one image was not removed (see `failures`).
    #[serde(default)]
    pub failed: i32,
    /// Target nodes that have not reported on this generation yet.
    #[serde(default)]
    pub pending: i32,
    /// Content bytes freed on all nodes together.
    #[serde(default)]
    pub bytes_freed: i64,
    /// Up to 10 examples of what failed where.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<FailureSample>,
    /// When every target node had reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// `Complete` and `Failed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One image that was not removed on one node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureSample {
    /// The node.
    pub node: String,
    /// The image string as requested.
    pub image: String,
    /// `InUse`, `Pinned`, `Invalid`, `Ambiguous` or `Skipped`.
    pub reason: String,
    /// What happened, in words.
    pub message: String,
}
