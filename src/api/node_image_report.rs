//! `NodeImageReport`: one per node, written only by that node's agent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// At most this many removals are kept in a report (the most recent ones).
pub const MAX_REMOVALS: usize = 20;
/// At most this many references are listed per image result.
pub const MAX_REFERENCES: usize = 8;
/// At most this many policies are kept in a report.
pub const MAX_POLICIES: usize = 20;
/// At most this many images are listed per policy run (the counts cover them all).
pub const MAX_POLICY_IMAGES: usize = 10;
/// Messages are cut to this many bytes.
pub const MAX_MESSAGE: usize = 256;

/// A node's images and what happened to the removals that target it. Named after the node.
// kube's derive takes one `printcolumn(...)` per column, which clippy sees as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "imagegc.dev",
    version = "v1alpha1",
    kind = "NodeImageReport",
    status = "NodeImageReportStatus",
    shortname = "nir",
    category = "imagegc",
    selectable = ".spec.nodeName",
    doc = "One node's images and the outcome of each removal on it; written by that node's agent.",
    printcolumn(
        name = "Images",
        type_ = "integer",
        json_path = ".status.inventory.images"
    ),
    printcolumn(
        name = "Bytes",
        type_ = "integer",
        json_path = ".status.inventory.bytes"
    ),
    printcolumn(
        name = "Pinned",
        type_ = "integer",
        json_path = ".status.inventory.pinned"
    ),
    printcolumn(
        name = "InUse",
        type_ = "integer",
        json_path = ".status.inventory.inUse"
    ),
    printcolumn(name = "Updated", type_ = "date", json_path = ".status.updated")
)]
#[serde(rename_all = "camelCase")]
pub struct NodeImageReportSpec {
    /// The node this report describes (equal to the object's name).
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
}

/// What the node's agent last saw and did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeImageReportStatus {
    /// The node's images (CRI view of the containerd namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<InventorySummary>,
    /// One entry per ImageRemoval targeting this node (most recent 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub removals: Vec<RemovalResult>,
    /// The latest run of each ImagePrunePolicy that selects this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub policies: Vec<PolicyRun>,
    /// When the agent last wrote this report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<Time>,
}

/// Counts over the node's images.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InventorySummary {
    /// CRI images (grouped by ID).
    pub images: i32,
    /// Their content size (shared layers counted once); on the CRI backend, the image
    /// filesystem's usage as the runtime reports it.
    pub bytes: i64,
    /// Pinned images.
    pub pinned: i32,
    /// Images that containers use.
    pub in_use: i32,
}

/// How a removal ended on this node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RemovalPhase {
    /// Every image is removed or was not present (for a dry run: would be).
    #[default]
    Succeeded,
    /// At least one image was not removed.
    Failed,
}

/// The outcome of one ImageRemoval on this node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemovalResult {
    /// The ImageRemoval's name.
    pub name: String,
    /// Its UID (a re-created removal of the same name is a new one).
    pub uid: String,
    /// The generation that was executed.
    pub generation: i64,
    /// How it ended.
    pub phase: RemovalPhase,
    /// Whether it was a dry run (nothing was removed).
    #[serde(default)]
    pub dry_run: bool,
    /// Content bytes freed on this node.
    #[serde(default)]
    pub bytes_freed: i64,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<Time>,
    /// One entry per requested image, in request order.
    #[serde(default)]
    pub images: Vec<ImageResult>,
}

/// The outcome for one requested image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageResult {
    /// The string as requested.
    pub image: String,
    /// `Removed`, `WouldRemove` (dry run), `NotPresent`, `InUse`, `Pinned`, `Protected`,
    /// `Invalid`, `Ambiguous`, `ForceNotAllowed`, or `Skipped` (not attempted: another image of
    /// the request is invalid or ambiguous on this node, and a request never half-runs).
    pub outcome: ImageOutcome,
    /// The image ID it resolved to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// References deleted (or, in a dry run, that would be), up to 8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<String>,
    /// Why, in words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// What happened to one requested (or chosen) image on a node. The CRD lists the same values.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ImageOutcome {
    /// Every reference of the image was deleted.
    Removed,
    /// A dry run (or a policy run that did not remove): it would be removed.
    WouldRemove,
    /// No such image on this node: nothing to do, and that is success.
    NotPresent,
    /// Containers use the image; kept (a forced removal takes it where forcing is enabled).
    InUse,
    /// Pinned by the runtime (e.g. the sandbox image); never removed.
    Pinned,
    /// Protected by the agent's globs, or the node opted out; never removed, forced or not.
    Protected,
    /// Not an image ID or reference, or the request is malformed; nothing is touched.
    Invalid,
    /// A short ID that matches several images; nothing is touched.
    Ambiguous,
    /// Not attempted: another image of the request is invalid or ambiguous on this node, and a
    /// request never half-runs.
    Skipped,
    /// A forced removal on a node where forcing is not enabled; nothing is removed.
    ForceNotAllowed,
}

impl ImageOutcome {
    /// The outcomes that count as success; every other one fails the removal on the node.
    pub const SUCCESS: [ImageOutcome; 3] = [
        ImageOutcome::Removed,
        ImageOutcome::WouldRemove,
        ImageOutcome::NotPresent,
    ];

    /// Whether this outcome counts as success (see [`ImageOutcome::SUCCESS`]).
    pub fn is_success(self) -> bool {
        Self::SUCCESS.contains(&self)
    }

    /// The value as written in the report (`Removed`, `InUse`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageOutcome::Removed => "Removed",
            ImageOutcome::WouldRemove => "WouldRemove",
            ImageOutcome::NotPresent => "NotPresent",
            ImageOutcome::InUse => "InUse",
            ImageOutcome::Pinned => "Pinned",
            ImageOutcome::Protected => "Protected",
            ImageOutcome::Invalid => "Invalid",
            ImageOutcome::Ambiguous => "Ambiguous",
            ImageOutcome::Skipped => "Skipped",
            ImageOutcome::ForceNotAllowed => "ForceNotAllowed",
        }
    }
}

impl std::fmt::Display for ImageOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for ImageOutcome {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ImageOutcome {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// What triggered a policy run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Trigger {
    /// The policy's cron schedule.
    #[default]
    Schedule,
    /// The image filesystem's usage reached the high watermark.
    Watermark,
}

/// The latest run of one ImagePrunePolicy on this node, and its running totals.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRun {
    /// The ImagePrunePolicy's name.
    pub name: String,
    /// Its UID.
    pub uid: String,
    /// The generation that ran.
    pub generation: i64,
    /// What started the run.
    pub trigger: Trigger,
    /// Whether it was a dry run (nothing was removed).
    #[serde(default)]
    pub dry_run: bool,
    /// When the run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<Time>,
    /// When the schedule runs it next on this node (its jitter included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<Time>,
    /// Images the run chose: removed or, in a dry run, that would be.
    #[serde(default)]
    pub chosen: i32,
    /// Of those, images removed (0 in a dry run).
    #[serde(default)]
    pub removed: i32,
    /// Content bytes the run freed (in a dry run: would free).
    #[serde(default)]
    pub bytes_freed: i64,
    /// Image-filesystem usage when the run started, in percent (watermark runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_percent: Option<i32>,
    /// Images removed by every run of this policy on this node.
    #[serde(default)]
    pub total_removed: i64,
    /// Content bytes freed by every run of this policy on this node.
    #[serde(default)]
    pub total_bytes_freed: i64,
    /// The first 10 images chosen, in removal order (least recently used first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<PrunedImage>,
    /// What went wrong, if anything, in words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// One image a policy run chose.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrunedImage {
    /// The image ID.
    pub id: String,
    /// Its references, up to 8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<String>,
    /// Its content size in bytes.
    #[serde(default)]
    pub size: i64,
    /// `Removed`, `WouldRemove`, or why it was not removed after all (`InUse`, `Pinned`,
    /// `NotPresent`).
    pub outcome: ImageOutcome,
    /// Why the policy chose it, in words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}
