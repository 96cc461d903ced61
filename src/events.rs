//! Kubernetes Events about imagegc's cluster-scoped objects.
//!
//! Events are namespaced; like the kubelet's Events about Nodes, Events about a cluster-scoped
//! object go to the `default` namespace, where `kubectl describe` and `kubectl events` find them.
//!
//! Not kube-runtime's `Recorder`, which writes the same Events but turns a repeat within six
//! minutes into a PATCH of an Event series: that needs `patch` on Events, which the chart does
//! not grant (only `create`, in `default` only), and imagegc publishes one Event per failure
//! streak or terminal transition, so there is nothing to aggregate.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::{Client, Resource};

/// Namespace that holds Events about cluster-scoped objects.
pub const EVENTS_NAMESPACE: &str = "default";
/// Events' notes are cut to this many bytes (the API allows 1 kB).
const MAX_NOTE: usize = 1000;

/// Severity of an Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// Something worth knowing.
    Normal,
    /// Something someone should look at.
    Warning,
}

/// Publishes Events as one component (`imagegc-agent` or `imagegc-controller`).
#[derive(Clone)]
pub struct Publisher {
    api: Api<Event>,
    controller: String,
    instance: String,
}

impl Publisher {
    /// A publisher for `controller` (e.g. `imagegc.dev/agent`) running as `instance`.
    pub fn new(client: Client, controller: &str, instance: &str) -> Publisher {
        Publisher {
            api: Api::namespaced(client, EVENTS_NAMESPACE),
            controller: controller.to_string(),
            instance: instance.to_string(),
        }
    }

    /// Publishes one Event about `regarding`. Failures are logged, never returned: an Event
    /// that cannot be written must not stop the work it describes.
    pub async fn publish<K>(
        &self,
        regarding: &K,
        severity: Severity,
        reason: &str,
        action: &str,
        note: &str,
    ) where
        K: Resource<DynamicType = ()>,
    {
        let regarding = ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: regarding.meta().name.clone(),
            uid: regarding.meta().uid.clone(),
            resource_version: regarding.meta().resource_version.clone(),
            ..Default::default()
        };
        self.publish_about(regarding, severity, reason, action, note)
            .await;
    }

    /// [`Publisher::publish`] about an object known only by reference (one that does not
    /// decode as its kind, say).
    pub async fn publish_about(
        &self,
        regarding: ObjectReference,
        severity: Severity,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        let now = k8s_openapi::jiff::Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                // `<object>.<nanoseconds in hex>`, as client-go names Events. (A `generateName`
                // ending in `.` is rejected: only a trailing `-` is allowed in a prefix.)
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or("object"),
                    now.as_nanosecond()
                )),
                namespace: Some(EVENTS_NAMESPACE.into()),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(
                match severity {
                    Severity::Normal => "Normal",
                    Severity::Warning => "Warning",
                }
                .into(),
            ),
            reason: Some(reason.into()),
            action: Some(action.into()),
            note: Some(truncate(note, MAX_NOTE)),
            regarding: Some(regarding),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        if let Err(e) = self.api.create(&PostParams::default(), &event).await {
            tracing::warn!(error = %e, reason, "publishing an Event failed");
        }
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut with `…`.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn truncate_respects_bytes_and_characters() {
        assert_eq!(truncate("short", 10), "short");
        let cut = truncate("ééééé", 6);
        assert!(cut.len() <= 6, "{cut}");
        assert!(cut.ends_with('…'));
        assert_eq!(truncate(&"a".repeat(300), 256).len(), 256);
    }
}
