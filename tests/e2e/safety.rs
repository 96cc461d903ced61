//! The agent's safety rules on every removal, against the real API server and containerd:
//! protected images and opted-out nodes are never touched, forced or not; `force` works only
//! where the operator enabled it, and a forced request elsewhere is refused, never run as an
//! unforced one; images of the node's own pods that have not started, and images mounted as
//! image volumes, count as in use; policies never choose an image younger than the minimum
//! age.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use imagegc::api::ImagePrunePolicy;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use libtest_mimic::Trial;
use testbed::image::{self, ImageBuilder};

use crate::operator::{Operator, condition, now_seconds, outcomes, pairs, records};
use crate::support::{NS, import, import_labelled, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "safety::protected_images_and_opted_out_nodes_survive_forced_removals",
            protected_images_and_opted_out_nodes_survive_forced_removals,
        ),
        trial(
            "safety::force_is_refused_where_not_allowed",
            force_is_refused_where_not_allowed,
        ),
        trial(
            "safety::images_of_the_nodes_pods_are_in_use",
            images_of_the_nodes_pods_are_in_use,
        ),
        trial(
            "safety::policies_keep_images_younger_than_the_minimum_age",
            policies_keep_images_younger_than_the_minimum_age,
        ),
    ]
}

/// Labels node `i`'s Node object (server-side apply, as an administrator would).
async fn label_node(op: &Operator, i: usize, key: &str, value: &str) -> Result<()> {
    let patch = serde_json::json!({"metadata": {"labels": {key: value}}});
    Api::<Node>::all(op.admin.clone())
        .patch(&op.node(i), &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

/// A protection glob keeps its images from a forced ImageRemoval, named by reference or by
/// ID, while the unprotected image of the same request goes; a node labelled
/// `imagegc.dev/exclude=true` keeps everything, and reports why.
async fn protected_images_and_opted_out_nodes_survive_forced_removals() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    op.agent_args = vec!["--protect=docker.io/library/guarded:*".into()];
    op.stop_agent(0);
    op.start_agent(0)?;
    let socket = op.socket(0);
    let guarded = ImageBuilder::new("sf-guarded").build();
    let plain = ImageBuilder::new("sf-plain").build();
    import(&socket, &guarded, &["docker.io/library/guarded:1"]).await?;
    import(&socket, &plain, &["docker.io/library/plain:1"]).await?;
    testbed::cri::wait_synced(
        &socket,
        &[guarded.id(), plain.id()],
        &["docker.io/library/guarded:1", "docker.io/library/plain:1"],
    )
    .await?;

    let id = guarded.id();
    op.create_removal(
        "forced",
        serde_json::json!({"images": ["guarded:1", id, "plain:1"], "force": true}),
    )
    .await?;
    let r = op.wait_result(0, "forced").await?;
    ensure!(
        outcomes(&r)
            == pairs(&[
                ("guarded:1", "Protected"),
                (&id, "Protected"),
                ("plain:1", "Removed")
            ]),
        "{r:?}"
    );
    ensure!(
        r.images[0].message.contains("docker.io/library/guarded:*"),
        "the report names the glob: {r:?}"
    );
    let left = records(&op, 0).await?;
    ensure!(
        left.contains("docker.io/library/guarded:1") && !left.contains("docker.io/library/plain:1"),
        "{left:?}"
    );
    let failed = op
        .wait_status("forced", "Failed with the protection as reason", |r| {
            condition(r, "Failed").as_deref() == Some("True")
        })
        .await?;
    let reasons: BTreeSet<String> = failed
        .status
        .context("status")?
        .failures
        .into_iter()
        .map(|f| f.reason)
        .collect();
    ensure!(
        reasons == BTreeSet::from(["Protected".to_string()]),
        "{reasons:?}"
    );

    // The node opts out; the agent restarts so it reads the label before the request.
    let other = ImageBuilder::new("sf-other").build();
    import(&socket, &other, &["docker.io/library/other:1"]).await?;
    testbed::cri::wait_synced(&socket, &[other.id()], &["docker.io/library/other:1"]).await?;
    op.stop_agent(0);
    label_node(&op, 0, "imagegc.dev/exclude", "true").await?;
    op.start_agent(0)?;
    let before = records(&op, 0).await?;
    op.create_removal(
        "excluded",
        serde_json::json!({"images": ["other:1"], "force": true}),
    )
    .await?;
    let r = op.wait_result(0, "excluded").await?;
    ensure!(outcomes(&r) == pairs(&[("other:1", "Protected")]), "{r:?}");
    ensure!(
        r.images[0].message.contains("imagegc.dev/exclude=true"),
        "{r:?}"
    );
    ensure!(
        records(&op, 0).await? == before,
        "an opted-out node lost images"
    );
    Ok(())
}

/// Without `--allow-force` (the chart's default), a forced request is refused as a whole on
/// the node: every image `ForceNotAllowed`, the unused one included, nothing removed. The same
/// request without `force` runs normally.
async fn force_is_refused_where_not_allowed() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    op.agent_args = vec!["--no-allow-force".into()];
    op.stop_agent(0);
    op.start_agent(0)?;
    let socket = op.socket(0);
    let used = ImageBuilder::new("sf-used").build();
    let free = ImageBuilder::new("sf-free").build();
    import(&socket, &used, &["docker.io/library/used:1"]).await?;
    import(&socket, &free, &["docker.io/library/free:1"]).await?;
    testbed::cri::wait_synced(
        &socket,
        &[used.id(), free.id()],
        &["docker.io/library/used:1", "docker.io/library/free:1"],
    )
    .await?;
    image::create_container(&socket, NS, "web", "docker.io/library/used:1", None).await?;
    let before = records(&op, 0).await?;

    op.create_removal(
        "forced",
        serde_json::json!({"images": ["used:1", "free:1"], "force": true}),
    )
    .await?;
    let r = op.wait_result(0, "forced").await?;
    ensure!(
        outcomes(&r) == pairs(&[("used:1", "ForceNotAllowed"), ("free:1", "ForceNotAllowed")]),
        "{r:?}"
    );
    ensure!(
        r.images[0].message.contains("agent.allowForce"),
        "the reason says how to enable it: {r:?}"
    );
    ensure!(
        records(&op, 0).await? == before,
        "a refused request removed something"
    );
    op.wait_status("forced", "Failed", |r| {
        condition(r, "Failed").as_deref() == Some("True")
    })
    .await?;

    op.patch_spec("forced", serde_json::json!({"force": false}))
        .await?;
    let r = op.wait_result(0, "forced").await?;
    ensure!(
        outcomes(&r) == pairs(&[("used:1", "InUse"), ("free:1", "Removed")]),
        "{r:?}"
    );
    Ok(())
}

/// A Pod bound to the node whose containers do not exist yet (no kubelet runs it here: it
/// stays Pending, as one does while its images are pulled) keeps its container image and the
/// image it mounts as an image volume from an unforced removal, and the report names the pod;
/// once the Pod is gone, they are removed.
async fn images_of_the_nodes_pods_are_in_use() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    let socket = op.socket(0);
    let names = [
        "docker.io/library/starting:1",
        "docker.io/library/mounted:1",
        "docker.io/library/idle:1",
    ];
    let mut ids = Vec::new();
    for name in names {
        let img = ImageBuilder::new(format!("sf-{name}")).build();
        import(&socket, &img, &[name]).await?;
        ids.push(img.id());
    }
    testbed::cri::wait_synced(&socket, &ids, &names).await?;

    // The agent restarts after the Pod exists, so its first listing has it.
    op.stop_agent(0);
    let cluster = op.bed.cluster()?;
    cluster.ensure_service_account("default", "default").await?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "nodeName": op.node(0),
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "starting:1",
                            "volumeMounts": [{"name": "model", "mountPath": "/model"}]}],
            "volumes": [{"name": "model", "image": {"reference": "docker.io/library/mounted:1"}}],
        },
    }))?;
    let pods = Api::<Pod>::namespaced(op.admin.clone(), "default");
    let created = pods.create(&PostParams::default(), &pod).await?;
    ensure!(
        created
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .is_some_and(|v| v[0].image.is_some()),
        "the API server dropped the image volume: {created:?}"
    );
    op.start_agent(0)?;

    op.create_removal(
        "pods",
        serde_json::json!({"images": ["starting:1", "mounted:1", "idle:1"]}),
    )
    .await?;
    let r = op.wait_result(0, "pods").await?;
    ensure!(
        outcomes(&r)
            == pairs(&[
                ("starting:1", "InUse"),
                ("mounted:1", "InUse"),
                ("idle:1", "Removed")
            ]),
        "{r:?}"
    );
    ensure!(
        r.images[..2]
            .iter()
            .all(|i| i.message.contains("pod default/web")),
        "the report names the pod: {r:?}"
    );
    ensure!(
        records(&op, 0)
            .await?
            .contains("docker.io/library/starting:1")
    );

    // The Pod goes; the agent restarts so it has seen that before the new generation.
    pods.delete("web", &DeleteParams::default().grace_period(0))
        .await?;
    op.stop_agent(0);
    op.start_agent(0)?;
    op.patch_spec(
        "pods",
        serde_json::json!({"images": ["starting:1", "mounted:1"]}),
    )
    .await?;
    let r = op.wait_result(0, "pods").await?;
    ensure!(
        outcomes(&r) == pairs(&[("starting:1", "Removed"), ("mounted:1", "Removed")]),
        "{r:?}"
    );
    let left = records(&op, 0).await?;
    ensure!(
        !left.contains("docker.io/library/starting:1")
            && !left.contains("docker.io/library/mounted:1"),
        "{left:?}"
    );
    Ok(())
}

/// A policy that sets neither `unusedFor` nor `olderThan` (a watermark at 1 %, which the
/// machine's disk is over) still never chooses an image the node got less than the minimum
/// age ago; the old image next to it is chosen.
async fn policies_keep_images_younger_than_the_minimum_age() -> Result<()> {
    use imagegc::core::last_used::FIRST_SEEN_LABEL;

    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    op.agent_args = vec![
        "--prune-min-image-age=1h".into(),
        "--watermark-check=1s".into(),
    ];
    op.stop_agent(0);
    let socket = op.socket(0);
    let young = ImageBuilder::new("sf-young").build();
    let old = ImageBuilder::new("sf-old").build();
    import(&socket, &young, &["docker.io/library/young:1"]).await?;
    let two_days_ago = (now_seconds() - 2 * 86_400).to_string();
    import_labelled(
        &socket,
        &old,
        &["docker.io/library/old:1"],
        &[(FIRST_SEEN_LABEL, two_days_ago.as_str())],
    )
    .await?;
    testbed::cri::wait_synced(
        &socket,
        &[young.id(), old.id()],
        &["docker.io/library/young:1", "docker.io/library/old:1"],
    )
    .await?;
    op.start_agent(0)?;

    let policy: ImagePrunePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImagePrunePolicy",
        "metadata": {"name": "full-disk"},
        "spec": {"watermark": {"highPercent": 1, "lowPercent": 0}, "dryRun": true},
    }))?;
    Api::<ImagePrunePolicy>::all(op.admin.clone())
        .create(&PostParams::default(), &policy)
        .await?;
    let run =
        crate::policy::wait_run(&op, 0, "full-disk", Duration::from_secs(60), |_| true).await?;
    let chosen: Vec<&str> = run.images.iter().map(|i| i.id.as_str()).collect();
    ensure!(
        chosen == [old.id().as_str()] && run.chosen == 1,
        "only the old image is chosen: {run:?}"
    );
    ensure!(
        op.agent_log(0).contains("TooNew"),
        "the young image is kept as TooNew: {}",
        op.agent_log(0)
    );
    Ok(())
}
