//! The node's own pods, as far as image removal cares: which images they are about to run or
//! mount. containerd's container records name only what has been created; a pod bound to the
//! node whose containers do not exist yet (the kubelet is pulling, or about to start them —
//! the pull/remove race), and the image volumes of running pods, use their images too.
//!
//! The agent watches only the pods whose `spec.nodeName` is its node, and keeps each one
//! slimmed to its image strings and phase, so the cost is a few hundred bytes per pod.

use k8s_openapi::api::core::v1::{Container, EphemeralContainer, Pod, PodSpec, PodStatus, Volume};

use crate::core::inventory::Inventory;

/// The images one pod runs or mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodImages {
    /// `pod <namespace>/<name>`: how a report names the user of an image.
    pub user: String,
    /// Its containers' (init, regular, ephemeral) images and its image volumes' references,
    /// as written in the spec, sorted, without repeats.
    pub images: Vec<String>,
}

/// The images `pod` runs or mounts, or `None` once it has finished (phase `Succeeded` or
/// `Failed`: the kubelet starts none of its containers again).
pub fn pod_images(pod: &Pod) -> Option<PodImages> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter_map(|c| c.image.clone());
    let ephemeral = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .filter_map(|c| c.image.clone());
    let volumes = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.image.as_ref()?.reference.clone());
    let mut images: Vec<String> = containers.chain(ephemeral).chain(volumes).collect();
    images.sort();
    images.dedup();
    Some(PodImages {
        user: format!(
            "pod {}/{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default()
        ),
        images,
    })
}

/// Marks every image that `pods` run or mount as used in `inventory` (see
/// [`Inventory::mark_used_by`]).
pub fn mark_in_use<'a>(inventory: &mut Inventory, pods: impl IntoIterator<Item = &'a Pod>) {
    for pod in pods {
        if let Some(p) = pod_images(pod) {
            for image in &p.images {
                inventory.mark_used_by(&p.user, image);
            }
        }
    }
}

/// Drops everything of `pod` that [`pod_images`] does not read, before the watch caches it.
pub fn slim(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.annotations = None;
    meta.labels = None;
    meta.managed_fields = None;
    meta.owner_references = None;
    if let Some(spec) = pod.spec.take() {
        let container = |c: Container| Container {
            name: c.name,
            image: c.image,
            ..Default::default()
        };
        let ephemeral = |c: EphemeralContainer| EphemeralContainer {
            name: c.name,
            image: c.image,
            ..Default::default()
        };
        let volume = |v: Volume| {
            v.image.is_some().then_some(Volume {
                name: v.name,
                image: v.image,
                ..Default::default()
            })
        };
        pod.spec = Some(PodSpec {
            containers: spec.containers.into_iter().map(container).collect(),
            init_containers: spec
                .init_containers
                .map(|cs| cs.into_iter().map(container).collect()),
            ephemeral_containers: spec
                .ephemeral_containers
                .map(|cs| cs.into_iter().map(ephemeral).collect()),
            volumes: spec
                .volumes
                .map(|vs| vs.into_iter().filter_map(volume).collect()),
            node_name: spec.node_name,
            ..Default::default()
        });
    }
    pod.status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        ..Default::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::inventory::CriImage;
    use std::collections::BTreeSet;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn web(phase: &str) -> Pod {
        pod(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "annotations": {"a": "b"}},
            "spec": {
                "nodeName": "node-1",
                "initContainers": [{"name": "init", "image": "busybox:1.36"}],
                "containers": [
                    {"name": "app", "image": "docker.io/acme/web:2.3", "args": ["--big"]},
                    {"name": "side", "image": "busybox:1.36"},
                ],
                "volumes": [
                    {"name": "data", "image": {"reference": "docker.io/acme/models:v1"}},
                    {"name": "tmp", "emptyDir": {}},
                ],
            },
            "status": {"phase": phase, "podIP": "10.0.0.1"},
        }))
    }

    #[test]
    fn a_pod_not_finished_uses_its_containers_and_image_volumes() {
        for phase in ["Pending", "Running", "Unknown"] {
            let p = pod_images(&web(phase)).unwrap();
            assert_eq!(p.user, "pod shop/web-1");
            assert_eq!(
                p.images,
                vec![
                    "busybox:1.36",
                    "docker.io/acme/models:v1",
                    "docker.io/acme/web:2.3"
                ],
                "{phase}"
            );
        }
    }

    #[test]
    fn a_finished_pod_uses_nothing() {
        assert_eq!(pod_images(&web("Succeeded")), None);
        assert_eq!(pod_images(&web("Failed")), None);
    }

    #[test]
    fn slimming_keeps_exactly_what_is_read() {
        let mut p = web("Pending");
        slim(&mut p);
        assert_eq!(pod_images(&p), pod_images(&web("Pending")));
        assert!(p.metadata.annotations.is_none());
        let spec = p.spec.as_ref().unwrap();
        assert!(spec.containers[0].args.is_none());
        assert_eq!(
            spec.volumes.as_ref().unwrap().len(),
            1,
            "only image volumes stay"
        );
        assert!(p.status.as_ref().unwrap().pod_ip.is_none());
        let mut finished = web("Succeeded");
        slim(&mut finished);
        assert_eq!(pod_images(&finished), None);
    }

    #[test]
    fn images_of_pods_are_marked_in_use_by_reference_or_id() {
        let id = |n: u64| format!("sha256:{n:064x}");
        let mut inv = Inventory::default();
        for (n, name) in [
            (1, "docker.io/acme/web:2.3"),
            (2, "docker.io/acme/models:v1"),
            (3, "docker.io/library/busybox:1.36"),
            (4, "docker.io/acme/unrelated:1"),
        ] {
            inv.ref_to_id.insert(name.into(), id(n));
            inv.images.insert(
                id(n),
                CriImage {
                    id: id(n),
                    references: vec![name.into()],
                    size: 1,
                    pinned: false,
                    used_by: if n == 3 { vec!["c1".into()] } else { vec![] },
                    content: BTreeSet::new(),
                },
            );
        }
        let by_id = pod(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": [{"name": "c", "image": id(4)}]},
            "status": {"phase": "Succeeded"},
        }));
        mark_in_use(&mut inv, [&web("Pending"), &web("Pending"), &by_id]);
        let users = |n| inv.images[&id(n)].used_by.clone();
        assert_eq!(users(1), vec!["pod shop/web-1"], "marked once per pod");
        assert_eq!(users(2), vec!["pod shop/web-1"], "an image volume is a use");
        assert_eq!(
            users(3),
            vec!["c1", "pod shop/web-1"],
            "short names resolve"
        );
        assert!(users(4).is_empty(), "a finished pod uses nothing");
    }
}
