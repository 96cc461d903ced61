//! Watches of imagegc's own kinds that one malformed object cannot wedge.
//!
//! A typed watch fails its whole listing when one stored object does not decode (say, left by
//! an older version with a different schema), and retries forever. These watches decode each
//! object on its own: one that does not decode is logged and left out; the rest flow. The
//! controller also hears of each one ([`tolerant_reporting`]) and says so in a Warning Event on
//! the object, where `kubectl describe` shows it.
//!
//! Not kube's `DeserializeGuard` (yet): with it, the reflector stores of both processes would
//! hold `Result`s that every reader (the agent's pass, the controller's folds and mappers)
//! unwraps, for the sake of reporting an undecodable object in its own status, which its
//! schema-checked spec makes rare; a malformed object is logged and given an Event instead.

use std::fmt::Debug;
use std::time::Duration;

use futures::{Stream, TryStreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;

/// What a reflector over one of imagegc's kinds (or a Kubernetes kind) needs of it.
pub trait Reflected:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static
{
}

impl<K> Reflected for K where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static
{
}

/// An object that does not decode as its kind: which one (at which version), and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Undecodable {
    /// The object (boxed: an error value stays small).
    pub regarding: Box<ObjectReference>,
    /// What serde said.
    pub error: String,
}

/// Watches every object of kind `K` (cluster-scoped), decoding each one separately.
pub fn tolerant<K>(
    client: Client,
    config: watcher::Config,
) -> impl Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: Reflected,
{
    tolerant_reporting(client, config, None)
}

/// [`tolerant`], also sending each object that does not decode to `undecodable` (every time
/// it is seen: a relist sees it again).
pub fn tolerant_reporting<K>(
    client: Client,
    config: watcher::Config,
    undecodable: Option<UnboundedSender<Undecodable>>,
) -> impl Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: Reflected,
{
    let resource = ApiResource::erase::<K>(&());
    let api = Api::<DynamicObject>::all_with(client, &resource);
    watcher::watcher(api, config).try_filter_map(move |event| {
        let keep = |o| kept(decode(o), undecodable.as_ref());
        let event = match event {
            Event::Apply(o) => keep(o).map(Event::Apply),
            Event::InitApply(o) => keep(o).map(Event::InitApply),
            Event::Delete(o) => keep(o).map(Event::Delete),
            Event::Init => Some(Event::Init),
            Event::InitDone => Some(Event::InitDone),
        };
        async move { Ok(event) }
    })
}

/// The decoded object; an undecodable one is logged, sent to `undecodable` and left out.
fn kept<K>(
    decoded: Result<K, Undecodable>,
    undecodable: Option<&UnboundedSender<Undecodable>>,
) -> Option<K> {
    match decoded {
        Ok(k) => Some(k),
        Err(u) => {
            tracing::warn!(
                kind = u.regarding.kind.as_deref().unwrap_or_default(),
                name = u.regarding.name.as_deref().unwrap_or_default(),
                error = %u.error,
                "ignoring an object that does not match this version's schema; fix or delete it"
            );
            if let Some(tx) = undecodable {
                // The receiver goes only when the controller stops leading.
                let _ = tx.send(u);
            }
            None
        }
    }
}

/// The backoff of the controller's watches: 0.5 s doubling to at most 5 s, back to 0.5 s after
/// any success. kube's default goes up to 30 s, right for thousands of agents but slow for the
/// one controller: after an API-server restart its watches fail several times in a row
/// (refused connections, then 403 until the authorizer has synced, then 410 for a resumed
/// resource version) and, at 30 s, took over a minute to list again.
#[derive(Clone, Debug)]
pub struct ControllerBackoff {
    next: Duration,
}

impl ControllerBackoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(5);
}

impl Default for ControllerBackoff {
    fn default() -> Self {
        ControllerBackoff { next: Self::FIRST }
    }
}

impl Iterator for ControllerBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.next;
        self.next = (wait * 2).min(Self::MAX);
        Some(wait)
    }
}

impl Backoff for ControllerBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// The backoff of a kube `Controller` over its merged trigger streams: none. Every watch feeding
/// it already backs off by itself ([`ControllerBackoff`]); kube's default here pauses *all*
/// triggers after an error in any one of them, for up to 30 s and until two quiet minutes have
/// passed, so after an API-server restart a removal's new reports went unseen for over 30 s.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPause;

impl Iterator for NoPause {
    type Item = Duration;

    /// Always zero: `None` would end the controller's trigger stream.
    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl Backoff for NoPause {
    fn reset(&mut self) {}
}

/// Clears an object's managedFields before a reflector stores it: nothing in imagegc reads them,
/// and they are a large share of every cached object (the controller's memory grows with the
/// node count).
pub fn drop_managed_fields<K: Resource>(object: &mut K) {
    object.managed_fields_mut().clear();
}

/// Decodes one object as `K`, or says which object does not fit `K`'s shape and why.
pub fn decode<K>(object: DynamicObject) -> Result<K, Undecodable>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    serde_json::to_value(&object)
        .and_then(serde_json::from_value::<K>)
        .map_err(|e| Undecodable {
            regarding: Box::new(ObjectReference {
                api_version: Some(K::api_version(&()).into_owned()),
                kind: Some(K::kind(&()).into_owned()),
                name: Some(object.name_any()),
                uid: object.metadata.uid.clone(),
                resource_version: object.metadata.resource_version.clone(),
                ..Default::default()
            }),
            error: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ImageRemoval;

    fn dynamic(spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImageRemoval",
            "metadata": {"name": "x", "uid": "u1"}, "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn good_objects_decode_and_bad_ones_are_left_out_and_reported() {
        let good = decode::<ImageRemoval>(dynamic(serde_json::json!({"images": ["nginx"]})));
        let good = good.expect("decodes");
        assert_eq!(good.spec.images, ["nginx"]);
        assert_eq!(good.uid().as_deref(), Some("u1"));
        let bad = decode::<ImageRemoval>(dynamic(serde_json::json!({"images": 5})));
        let bad = bad.expect_err("does not decode");
        assert_eq!(bad.regarding.kind.as_deref(), Some("ImageRemoval"));
        assert_eq!(bad.regarding.name.as_deref(), Some("x"));
        assert_eq!(bad.regarding.uid.as_deref(), Some("u1"));
        assert!(bad.error.contains("invalid type"), "{}", bad.error);

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        assert!(kept(Err::<ImageRemoval, _>(bad.clone()), Some(&tx)).is_none());
        assert_eq!(rx.try_recv().ok(), Some(bad.clone()));
        assert!(kept(Err::<ImageRemoval, _>(bad), None).is_none());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn the_controller_backoff_doubles_to_five_seconds_and_resets() {
        let mut b = ControllerBackoff::default();
        let secs: Vec<f64> = b.by_ref().take(6).map(|d| d.as_secs_f64()).collect();
        assert_eq!(secs, [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]);
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(500)));
    }

    /// kube ends a trigger stream whose backoff returns `None`: this one never waits and never
    /// gives up.
    #[test]
    fn no_pause_never_waits_and_never_ends() {
        assert!(NoPause.take(1000).all(|d| d.is_zero()));
        assert_eq!(NoPause.nth(1_000_000), Some(Duration::ZERO));
    }
}
