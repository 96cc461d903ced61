//! ImagePrunePolicies end to end: the operator harness of `operator.rs` (real API server with
//! the rendered chart, one agent process per simulated node, the controller), with policies
//! that fire on a real cron minute and on a real filesystem's usage.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use imagegc::api::{ImagePrunePolicy, NodeImageReport, PolicyRun, Trigger};
use imagegc::core::inventory::PINNED_LABEL;
use imagegc::core::last_used::{FIRST_SEEN_LABEL, LAST_USED_LABEL};
use kube::api::{Api, PostParams};
use libtest_mimic::Trial;
use testbed::image::{self, BuiltImage, ImageBuilder};

use crate::operator::{Operator, now_seconds, wait_for};
use crate::support::{NS, import_labelled, trial};

const DAY: i64 = 86_400;
/// A scheduled run happens at the next minute plus at most the jitter: well within this.
const SCHEDULED: Duration = Duration::from_secs(100);
/// The agents' jitter window in these tests (seconds).
const JITTER: i64 = 10;

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "policy::schedule_prunes_exactly_the_chosen_images_on_selected_nodes",
            schedule_prunes_exactly_the_chosen_images_on_selected_nodes,
        ),
        trial(
            "policy::watermark_prunes_least_recently_used_down_to_the_low_mark",
            watermark_prunes_least_recently_used_down_to_the_low_mark,
        ),
        trial(
            "policy::bad_policies_are_refused_or_reported",
            bad_policies_are_refused_or_reported,
        ),
    ]
}

async fn create_policy(op: &Operator, name: &str, spec: serde_json::Value) -> Result<()> {
    let policy: ImagePrunePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImagePrunePolicy",
        "metadata": {"name": name}, "spec": spec,
    }))?;
    Api::<ImagePrunePolicy>::all(op.admin.clone())
        .create(&PostParams::default(), &policy)
        .await?;
    Ok(())
}

/// Waits until node `i`'s report has a run of policy `name` that satisfies `done`.
pub async fn wait_run(
    op: &Operator,
    i: usize,
    name: &str,
    timeout: Duration,
    done: impl Fn(&PolicyRun) -> bool,
) -> Result<PolicyRun> {
    let reports = &Api::<NodeImageReport>::all(op.admin.clone());
    let node = &op.node(i);
    let done = &done;
    wait_for(&format!("{node}'s run of {name}"), timeout, || async move {
        let Some(report) = reports.get_opt(node).await? else {
            return Ok(None);
        };
        Ok(report
            .status
            .and_then(|s| s.policies.into_iter().find(|r| r.name == name && done(r))))
    })
    .await
    .with_context(|| op.logs())
}

/// Imports `img` as `names` on node `i` with first-seen (and last-used) labels `age` (and
/// `used`) seconds in the past, as a running agent would have recorded them.
async fn import_aged(
    op: &Operator,
    i: usize,
    img: &BuiltImage,
    names: &[&str],
    seen_ago: i64,
    used_ago: Option<i64>,
) -> Result<()> {
    let now = now_seconds();
    let seen = (now - seen_ago).to_string();
    let used = used_ago.map(|u| (now - u).to_string());
    let mut labels = vec![(FIRST_SEEN_LABEL, seen.as_str())];
    if let Some(used) = &used {
        labels.push((LAST_USED_LABEL, used.as_str()));
    }
    import_labelled(&op.socket(i), img, names, &labels).await?;
    testbed::cri::wait_synced(&op.socket(i), &[img.id()], names).await
}

/// Two policies, one per pool: on pool `a` a real one, on pool `b` the same rules as a dry run
/// (unused for 7 days, keep the newest image of every repository, exclude `*:skipped`). Each
/// node holds the same images of one repository, one per rule: two old and unused (chosen,
/// one with two tags), the newest (kept), and old ones that are used by a container, pinned,
/// protected by the agent's flag or excluded by the policy; plus an old image alone in its
/// repository (kept as its newest). Pool `a` loses exactly the chosen ones; pool `b` loses
/// nothing and reports the same set; each node runs at the minute plus its own offset; the
/// controller sums it up.
async fn schedule_prunes_exactly_the_chosen_images_on_selected_nodes() -> Result<()> {
    let mut op = Operator::start(&[&[("pool", "a")], &[("pool", "a")], &[("pool", "b")]]).await?;
    op.agent_args = vec![
        "--protect=docker.io/library/app:guarded".into(),
        format!("--prune-max-jitter={JITTER}s"),
    ];
    for i in 0..3 {
        op.stop_agent(i);
        op.start_agent(i)?;
    }

    let build = |seed: &str| ImageBuilder::new(format!("pp-{seed}")).build();
    let (old_a, old_b, fresh) = (build("old-a"), build("old-b"), build("fresh"));
    let (busy, pinned, guarded, skipped, solo) = (
        build("busy"),
        build("pinned"),
        build("guarded"),
        build("skipped"),
        build("solo"),
    );
    for i in 0..3 {
        let socket = op.socket(i);
        import_aged(
            &op,
            i,
            &old_a,
            &["docker.io/library/app:old-a"],
            10 * DAY,
            Some(9 * DAY),
        )
        .await?;
        import_aged(
            &op,
            i,
            &old_b,
            &[
                "docker.io/library/app:old-b",
                "docker.io/library/app:old-b2",
            ],
            12 * DAY,
            None,
        )
        .await?;
        import_aged(&op, i, &fresh, &["docker.io/library/app:fresh"], 3600, None).await?;
        import_aged(
            &op,
            i,
            &busy,
            &["docker.io/library/app:busy"],
            10 * DAY,
            Some(9 * DAY),
        )
        .await?;
        image::create_container(&socket, NS, "busy", "docker.io/library/app:busy", None).await?;
        let seen = (now_seconds() - 10 * DAY).to_string();
        import_labelled(
            &socket,
            &pinned,
            &["docker.io/library/app:pinned"],
            &[(PINNED_LABEL, "pinned"), (FIRST_SEEN_LABEL, &seen)],
        )
        .await?;
        import_aged(
            &op,
            i,
            &guarded,
            &["docker.io/library/app:guarded"],
            10 * DAY,
            None,
        )
        .await?;
        import_aged(
            &op,
            i,
            &skipped,
            &["docker.io/library/app:skipped"],
            10 * DAY,
            None,
        )
        .await?;
        import_aged(&op, i, &solo, &["docker.io/library/solo:1"], 20 * DAY, None).await?;
    }
    let before: Vec<BTreeSet<String>> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(image::image_names(&op.socket(i), NS).await?);
        }
        v
    };

    let rules = serde_json::json!({
        "schedule": "* * * * *",
        "unusedFor": "7d",
        "keepNewest": 1,
        "exclude": ["*:skipped"],
    });
    let mut real = rules.clone();
    real["nodeSelector"] = serde_json::json!({"matchLabels": {"pool": "a"}});
    let mut dry = rules.clone();
    dry["nodeSelector"] = serde_json::json!({"matchLabels": {"pool": "b"}});
    dry["dryRun"] = serde_json::json!(true);
    create_policy(&op, "nightly", real).await?;
    create_policy(&op, "nightly-dry", dry).await?;

    let chosen: BTreeSet<String> = [old_a.id(), old_b.id()].into();
    let gone: BTreeSet<&str> = [
        "docker.io/library/app:old-a",
        "docker.io/library/app:old-b",
        "docker.io/library/app:old-b2",
    ]
    .into();
    let mut runs = Vec::new();
    for i in 0..3 {
        let name = if i < 2 { "nightly" } else { "nightly-dry" };
        let run = wait_run(&op, i, name, SCHEDULED, |_| true).await?;
        runs.push(run);
    }
    for (i, run) in runs.iter().enumerate() {
        let ids: BTreeSet<String> = run.images.iter().map(|im| im.id.clone()).collect();
        ensure!(
            ids == chosen,
            "node {i} chose {ids:?}, expected {chosen:?}: {run:#?}"
        );
        ensure!(
            run.trigger == Trigger::Schedule && run.chosen == 2,
            "node {i}: {run:#?}"
        );
        let last = run.last_run.as_ref().context("lastRun")?.0.as_second();
        let next = run.next_run.as_ref().context("nextRun")?.0.as_second();
        // Runs start at the minute plus this node's offset, and the next is a minute later
        // at the same offset.
        ensure!(
            (0..JITTER).contains(&(next % 60)) && next > last,
            "node {i}: next run {next} is not a minute plus at most {JITTER} s (last {last})"
        );
        let after = image::image_names(&op.socket(i), NS).await?;
        if i < 2 {
            ensure!(
                !run.dry_run && run.removed == 2 && run.bytes_freed > 0,
                "node {i}: {run:#?}"
            );
            ensure!(
                run.images.iter().all(|im| im.outcome == "Removed"),
                "node {i}: {:?}",
                run.images
            );
            let expected: BTreeSet<String> = before[i]
                .iter()
                .filter(|n| !gone.contains(n.as_str()) && !chosen.contains(*n))
                .cloned()
                .collect();
            ensure!(
                after == expected,
                "node {i}: left {after:?}, expected {expected:?}"
            );
            ensure!(
                run.total_removed == 2 && run.total_bytes_freed == run.bytes_freed,
                "node {i}: {run:#?}"
            );
        } else {
            ensure!(
                run.dry_run && run.removed == 0 && run.total_removed == 0,
                "node {i}: {run:#?}"
            );
            ensure!(
                run.images.iter().all(|im| im.outcome == "WouldRemove"),
                "node {i}: {:?}",
                run.images
            );
            ensure!(
                after == before[i],
                "the dry run changed node {i}: {after:?}"
            );
        }
    }

    // The controller's view.
    let policies = &Api::<ImagePrunePolicy>::all(op.admin.clone());
    let status = |name: &'static str| async move {
        let p = policies.get(name).await?;
        Ok::<_, anyhow::Error>(p.status.unwrap_or_default())
    };
    let real = wait_for("nightly's status", Duration::from_secs(30), || async {
        let s = status("nightly").await?;
        Ok((s.nodes_evaluated == 2).then_some(s))
    })
    .await
    .with_context(|| op.logs())?;
    ensure!(
        real.target_nodes == 2
            && real.images_removed >= 4
            && real.bytes_freed >= runs[0].bytes_freed + runs[1].bytes_freed
            && real.last_run.is_some(),
        "{real:#?}"
    );
    let dry = wait_for("nightly-dry's status", Duration::from_secs(30), || async {
        let s = status("nightly-dry").await?;
        Ok((s.nodes_evaluated == 1).then_some(s))
    })
    .await
    .with_context(|| op.logs())?;
    ensure!(
        dry.target_nodes == 1 && dry.images_removed == 0 && dry.last_run_chosen == 2,
        "{dry:#?}"
    );
    ensure!(
        dry.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "{dry:#?}"
    );

    // The next minute's run finds nothing more to remove on pool a.
    let first = runs[0].last_run.clone();
    let again = wait_run(&op, 0, "nightly", SCHEDULED, |r| r.last_run != first).await?;
    ensure!(
        again.chosen == 0 && again.total_removed == 2,
        "second run: {again:#?}"
    );
    Ok(())
}

/// A node whose containerd root is a 64 MiB filesystem, filled past the high mark by images
/// of 4 MiB each, last used at different times: the policy removes the least recently used
/// first and stops once usage is at or below the low mark; the most recently used stay.
async fn watermark_prunes_least_recently_used_down_to_the_low_mark() -> Result<()> {
    const MIB: usize = 1 << 20;
    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    op.agent_args = vec!["--watermark-check=1s".into()];
    op.stop_agent(0);
    op.bed.nodes[0].use_small_filesystem(64 * MIB as u64)?;
    let root = op.bed.nodes[0].root.clone();

    // Image k was last used k+1 hours ago: image 0 is the most recently used.
    let images: Vec<BuiltImage> = (0..8)
        .map(|k| {
            ImageBuilder::new(format!("wm-{k}"))
                .layer_sizes(&[4 * MIB])
                .build()
        })
        .collect();
    for (k, img) in images.iter().enumerate() {
        let name = format!("docker.io/library/wm{k}:1");
        import_aged(&op, 0, img, &[&name], DAY, Some((k as i64 + 1) * 3600)).await?;
    }
    let usage = || imagegc::agent::policies::filesystem_usage(&root).map_err(anyhow::Error::from);
    let percent = |u: &imagegc::core::prune::Usage| u.used_bytes * 100 / u.capacity_bytes;
    let start = usage()?;
    ensure!(
        percent(&start) >= 45,
        "the images fill only {}% of the filesystem",
        percent(&start)
    );
    op.start_agent(0)?;
    create_policy(
        &op,
        "disk-guard",
        serde_json::json!({"watermark": {"highPercent": 40, "lowPercent": 20}}),
    )
    .await?;
    let run = wait_run(&op, 0, "disk-guard", Duration::from_secs(60), |r| {
        r.removed > 0
    })
    .await?;
    ensure!(
        run.trigger == Trigger::Watermark && run.usage_percent.is_some_and(|p| p >= 40),
        "{run:#?}"
    );
    let after = usage()?;
    ensure!(
        percent(&after) <= 20,
        "usage is {}% after the run (was {}%): {run:#?}",
        percent(&after),
        percent(&start)
    );
    // Least recently used first: the removed images are the oldest-used ones, a suffix of
    // `images`, and at least the two most recently used are still there.
    let names = image::image_names(&op.socket(0), NS).await?;
    let present: Vec<bool> = (0..images.len())
        .map(|k| names.contains(&format!("docker.io/library/wm{k}:1")))
        .collect();
    let kept = present.iter().take_while(|p| **p).count();
    ensure!(
        kept >= 2 && present[kept..].iter().all(|p| !p) && kept < images.len(),
        "kept {present:?} (true = present; image 0 most recently used)"
    );
    ensure!(
        run.removed as usize == images.len() - kept,
        "the report says {} removed, the node lost {}",
        run.removed,
        images.len() - kept
    );
    let ordered: Vec<String> = run.images.iter().map(|i| i.id.clone()).collect();
    let expected: Vec<String> = images[kept..].iter().rev().map(BuiltImage::id).collect();
    ensure!(
        ordered == expected,
        "removal order {ordered:?}, expected {expected:?}"
    );

    // The agent's metrics count the run and the images it removed.
    let (code, metrics) = crate::support::http_get(op.agent_port(0), "/metrics").await?;
    ensure!(code == 200, "/metrics answered {code}");
    let sample = |prefix: &str, labels: &[&str]| -> Option<f64> {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix) && labels.iter().all(|want| l.contains(want)))
            .find_map(|l| l.rsplit(' ').next()?.parse().ok())
    };
    ensure!(
        sample(
            "imagegc_agent_policy_runs_total{",
            &["trigger=\"Watermark\"", "dry_run=\"false\""]
        )
        .is_some_and(|v| v >= 1.0)
            && sample(
                "imagegc_agent_policy_images_total{",
                &["outcome=\"Removed\""]
            ) == Some(f64::from(run.removed))
            && sample("imagegc_agent_image_fs_usage_percent", &[]).is_some(),
        "metrics do not show the run:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("policy") || l.contains("image_fs"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Below the high mark nothing more goes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = image::image_names(&op.socket(0), NS).await?;
    ensure!(
        still == names,
        "more images went below the high mark: {still:?}"
    );
    Ok(())
}

/// Mistakes the schema can catch are refused by the API server with a message; mistakes it
/// cannot (cron syntax) make the policy not Ready, with a Warning Event, and no agent acts.
async fn bad_policies_are_refused_or_reported() -> Result<()> {
    let op = Operator::start(&[&[("pool", "a")]]).await?;
    let old = ImageBuilder::new("bad-old").build();
    import_aged(
        &op,
        0,
        &old,
        &["docker.io/library/badold:1"],
        30 * DAY,
        None,
    )
    .await?;
    let before = image::image_names(&op.socket(0), NS).await?;

    let refused: [(serde_json::Value, &str); 4] = [
        (
            serde_json::json!({"unusedFor": "7d"}),
            "set a schedule, a watermark, or both",
        ),
        (
            serde_json::json!({"watermark": {"highPercent": 70, "lowPercent": 85}}),
            "lowPercent must be below highPercent",
        ),
        (
            serde_json::json!({"schedule": "@daily", "unusedFor": "7 days"}),
            "spec.unusedFor",
        ),
        (
            serde_json::json!({"schedule": "@daily", "maxImagesPerRun": 0}),
            "spec.maxImagesPerRun",
        ),
    ];
    for (n, (spec, message)) in refused.iter().enumerate() {
        let err = create_policy(&op, &format!("refused-{n}"), spec.clone())
            .await
            .err()
            .with_context(|| format!("the API server accepted {spec}"))?;
        ensure!(
            format!("{err:#}").contains(message),
            "{spec}: {err:#} does not say {message:?}"
        );
    }

    create_policy(
        &op,
        "typo",
        serde_json::json!({"schedule": "0 3 * *", "unusedFor": "1d"}),
    )
    .await?;
    let policies = &Api::<ImagePrunePolicy>::all(op.admin.clone());
    let ready = wait_for(
        "typo's Ready condition",
        Duration::from_secs(30),
        || async {
            let p = policies.get("typo").await?;
            Ok(p.status
                .unwrap_or_default()
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready"))
        },
    )
    .await
    .with_context(|| op.logs())?;
    ensure!(
        ready.status == "False"
            && ready.reason == "InvalidSpec"
            && ready.message.contains("4 fields"),
        "{ready:?}"
    );
    let events = op.bed.cluster()?.kubectl(&[
        "get",
        "events",
        "-n",
        "default",
        "--field-selector",
        "involvedObject.name=typo",
        "-o",
        "jsonpath={.items[*].reason}",
    ])?;
    ensure!(events.contains("InvalidSpec"), "events: {events:?}");
    let after = image::image_names(&op.socket(0), NS).await?;
    ensure!(
        after == before,
        "an invalid policy changed the node: {after:?}"
    );
    let reports = Api::<NodeImageReport>::all(op.admin.clone());
    let report = reports.get(&op.node(0)).await?;
    ensure!(
        report.status.unwrap_or_default().policies.is_empty(),
        "an invalid policy has a run"
    );
    Ok(())
}
