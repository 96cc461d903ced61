//! The agent's whole input surface, over the wire: pseudo-random ImageRemovals (fixed seed, so
//! a failure replays) sent through the real API server to a running agent. Whatever the schema
//! accepts, the agent must not panic, must report every removal that targets its node with one
//! outcome per requested string, and must remove nothing that no removal named: sentinel
//! images (never named) and a pinned image (named often) stay throughout.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use imagegc::agent::report;
use imagegc::api::ImageRemoval;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use libtest_mimic::Trial;
use testbed::image::{self, BuiltImage, ImageBuilder};

use crate::operator::Operator;
use crate::support::{NS, http_get, import, import_labelled, trial};

/// Removals sent per run.
const INPUTS: usize = 300;
/// Seed of the generator (printed on failure).
const SEED: u64 = 0x1a2b_3c4d_5e6f_7081;
/// Images removals may name (re-imported every 25 inputs, so Removed stays reachable).
const VICTIMS: usize = 4;
/// Images no removal names.
const SENTINELS: usize = 3;
const PINNED_TAG: &str = "docker.io/library/fzpinned:1";

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "fuzz::agent_survives_arbitrary_removals",
            agent_survives_arbitrary_removals,
        ),
        trial(
            "fuzz::agent_survives_arbitrary_policies",
            agent_survives_arbitrary_policies,
        ),
    ]
}

/// xorshift64*: small, deterministic, good enough to pick inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn hex(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| char::from(b"0123456789abcdef"[self.below(16)]))
            .collect()
    }

    fn text(&mut self, len: usize) -> String {
        const ALPHABET: &[char] = &[
            'a', 'Z', '0', '9', ':', '/', '@', '.', '-', '_', '+', '%', '#', '!', '~', 'é', 'ß',
            '漢', '\u{200b}', '"', '\'', '\\', '{', '}', '$', '^', '|', '=', ',', ';',
        ];
        (0..len)
            .map(|_| ALPHABET[self.below(ALPHABET.len())])
            .collect()
    }
}

/// The strings a removal may request.
struct Names {
    victims: Vec<(String, String)>,
    /// Hex prefixes a random short ID must not start with (the sentinels' IDs).
    sentinel_ids: Vec<String>,
}

impl Names {
    fn image(&self, rng: &mut Rng) -> String {
        let (tag, id) = &self.victims[rng.below(self.victims.len())];
        match rng.below(16) {
            0..=2 => tag.clone(),
            3 => id.clone(),
            4 => id["sha256:".len().."sha256:".len() + 12].to_string(),
            5 => tag.trim_start_matches("docker.io/library/").to_string(),
            6 => PINNED_TAG.to_string(),
            7 => "nginx".to_string(),
            8 => format!("sha256:{}", rng.hex(64)),
            9 => loop {
                let len = 1 + rng.below(20);
                let short = rng.hex(len);
                if !self.sentinel_ids.iter().any(|s| s.starts_with(&short)) {
                    break short;
                }
            },
            10 => format!("sha256:{}", rng.hex(64)).to_uppercase(),
            11 => {
                let len = 1 + rng.below(40);
                rng.text(len)
            }
            12 => "a".repeat(1 + rng.below(600)),
            13 => ["*", "fz?:1", "x y", "[a]", "", " "][rng.below(6)].to_string(),
            14 => format!("{tag}@sha256:{}", rng.hex(64)),
            _ => format!("localhost:5000/{}:{}", rng.text(8), rng.text(4)),
        }
    }

    fn spec(&self, rng: &mut Rng) -> serde_json::Value {
        let images: Vec<String> = (0..1 + rng.below(5)).map(|_| self.image(rng)).collect();
        let mut spec = serde_json::json!({ "images": images });
        let selector = match rng.below(6) {
            0 => None,
            1 => Some(serde_json::json!({"matchLabels": {"pool": "a"}})),
            2 => Some(serde_json::json!({"matchLabels": {"pool": "b"}})),
            3 => {
                let operator = ["In", "NotIn"][rng.below(2)];
                Some(serde_json::json!({"matchExpressions": [
                    {"key": "pool", "operator": operator, "values": ["a", "c"]}]}))
            }
            4 => {
                let operator = ["Exists", "DoesNotExist", "Bogus", "in"][rng.below(4)];
                Some(serde_json::json!({"matchExpressions": [
                    {"key": "pool", "operator": operator}]}))
            }
            _ => {
                let mut labels = serde_json::Map::new();
                labels.insert(rng.text(6), serde_json::Value::String(rng.text(3)));
                Some(serde_json::json!({ "matchLabels": labels }))
            }
        };
        if let Some(s) = selector {
            spec["nodeSelector"] = s;
        }
        if rng.chance(30) {
            spec["force"] = serde_json::json!(true);
        }
        if rng.chance(30) {
            spec["dryRun"] = serde_json::json!(true);
        }
        // Not 0: the removal would be deleted before its result can be read (the operator
        // suite covers the TTL).
        if rng.chance(20) {
            let ttl = [-1, 3600, 9_999_999][rng.below(3)];
            spec["ttlSecondsAfterFinished"] = serde_json::json!(ttl);
        }
        spec
    }
}

async fn agent_survives_arbitrary_removals() -> Result<()> {
    let op = Operator::start(&[&[("pool", "a")]]).await?;
    let socket = op.socket(0);
    let labels: BTreeMap<String, String> = [("pool".to_string(), "a".to_string())].into();

    let victims: Vec<(BuiltImage, String)> = (0..VICTIMS)
        .map(|n| {
            let img = ImageBuilder::new(format!("fz-victim-{n}")).build();
            (img, format!("docker.io/library/fz{n}:1"))
        })
        .collect();
    let sentinels: Vec<(BuiltImage, String)> = (0..SENTINELS)
        .map(|n| {
            let img = ImageBuilder::new(format!("fz-sentinel-{n}")).build();
            (img, format!("docker.io/library/sentinel{n}:1"))
        })
        .collect();
    for (img, tag) in &sentinels {
        import(&socket, img, &[tag]).await?;
    }
    let pinned = ImageBuilder::new("fz-pinned").build();
    import_labelled(
        &socket,
        &pinned,
        &[PINNED_TAG],
        &[("io.cri-containerd.pinned", "pinned")],
    )
    .await?;
    let names = Names {
        victims: victims.iter().map(|(i, t)| (t.clone(), i.id())).collect(),
        sentinel_ids: sentinels
            .iter()
            .map(|(i, _)| i.id().trim_start_matches("sha256:").to_string())
            .collect(),
    };

    let api = Api::<ImageRemoval>::all(op.admin.clone());
    let mut rng = Rng(SEED);
    let (mut accepted, mut rejected, mut targeted) = (0, 0, 0);
    for n in 0..INPUTS {
        if n % 25 == 0 {
            for (img, tag) in &victims {
                import(&socket, img, &[tag]).await?;
            }
        }
        let spec = names.spec(&mut rng);
        let name = format!("fz-{n}");
        let removal: ImageRemoval = serde_json::from_value(serde_json::json!({
            "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImageRemoval",
            "metadata": {"name": name}, "spec": spec,
        }))
        .with_context(|| format!("input {n} (seed {SEED:#x}) does not even deserialize: {spec}"))?;
        match api.create(&PostParams::default(), &removal).await {
            Ok(_) => accepted += 1,
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
                rejected += 1;
                continue;
            }
            Err(e) => bail!("input {n} (seed {SEED:#x}): unexpected API error {e}: {spec}"),
        }
        let selector: Option<LabelSelector> = removal.spec.node_selector.clone();
        if report::targets(selector.as_ref(), &labels) != Ok(true) {
            continue;
        }
        targeted += 1;
        let r = op
            .wait_result(0, &name)
            .await
            .with_context(|| format!("input {n} (seed {SEED:#x}): {spec}"))?;
        ensure!(
            r.images.len() == removal.spec.images.len(),
            "input {n}: {} outcomes for {} images: {r:?}",
            r.images.len(),
            removal.spec.images.len()
        );
        for (asked, got) in removal.spec.images.iter().zip(&r.images) {
            ensure!(
                same_image(asked, &got.image),
                "input {n}: outcome order {r:?}"
            );
            if asked == PINNED_TAG {
                ensure!(
                    got.outcome == "Pinned" || got.outcome == "Skipped",
                    "input {n}: the pinned image got {got:?}"
                );
            }
        }
    }

    let present = image::image_names(&socket, NS).await?;
    for tag in sentinels
        .iter()
        .map(|(_, t)| t.as_str())
        .chain([PINNED_TAG])
    {
        ensure!(
            present.contains(tag),
            "{tag} was removed; left: {present:?}"
        );
    }
    let pid = op.agent_pid(0).context("agent not running")?;
    ensure!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the agent exited:\n{}",
        op.agent_log(0)
    );
    ensure!(
        !op.agent_log(0).contains("panicked"),
        "the agent panicked:\n{}",
        op.agent_log(0)
    );
    let (code, _) = http_get(op.agent_port(0), "/readyz").await?;
    ensure!(code == 200, "agent not ready after the inputs");
    println!(
        "fuzz: {INPUTS} removals sent (seed {SEED:#x}): {accepted} accepted by the API server, {rejected} rejected, {targeted} executed on the node"
    );
    ensure!(
        accepted > INPUTS / 3 && rejected > 0,
        "the generator covers too little: {accepted} accepted, {rejected} rejected"
    );
    Ok(())
}

/// Whether the report's `reported` names `asked`: equal, or cut to the report's bound with an
/// ellipsis.
fn same_image(asked: &str, reported: &str) -> bool {
    reported == asked
        || (asked.len() > imagegc::api::MAX_MESSAGE
            && reported
                .strip_suffix('…')
                .is_some_and(|head| asked.starts_with(head)))
}

/// Policies sent per run.
const POLICY_INPUTS: usize = 120;
/// Seed of the policy generator (printed on failure).
const POLICY_SEED: u64 = 0x7f4a_7c15_9e37_79b9;

/// A pseudo-random ImagePrunePolicy spec: schedules that fire every minute or never parse,
/// watermarks that fire on this host's disk or not, globs that parse or not, any selection.
fn policy_spec(rng: &mut Rng) -> serde_json::Value {
    const SCHEDULES: [&str; 8] = [
        "* * * * *",
        "*/1 * * * *",
        "@hourly",
        "0 3 * *",
        "61 * * * *",
        "0 0 30 2 *",
        "* * * * * *",
        "",
    ];
    const GLOBS: [&str; 10] = [
        "*",
        "docker.io/*",
        "*fz*",
        "[",
        "{a,b}",
        "**",
        "*:1",
        "sha256:*",
        "*/fzguard:*",
        "\\",
    ];
    const DURATIONS: [&str; 8] = ["0s", "1s", "7d", "", "1h30m", "7 days", "1w", "99999d"];
    let mut spec = serde_json::json!({});
    if rng.chance(70) {
        let schedule = match rng.below(10) {
            0..=7 => SCHEDULES[rng.below(SCHEDULES.len())].to_string(),
            _ => {
                let len = 1 + rng.below(12);
                rng.text(len)
            }
        };
        spec["schedule"] = serde_json::json!(schedule);
    }
    if rng.chance(40) {
        spec["watermark"] = serde_json::json!({
            "highPercent": rng.below(111), "lowPercent": rng.below(111),
        });
    }
    for field in ["unusedFor", "olderThan"] {
        if rng.chance(40) {
            spec[field] = serde_json::json!(DURATIONS[rng.below(DURATIONS.len())]);
        }
    }
    for field in ["include", "exclude"] {
        if rng.chance(40) {
            let globs: Vec<String> = (0..rng.below(3))
                .map(|_| {
                    if rng.chance(80) {
                        GLOBS[rng.below(GLOBS.len())].to_string()
                    } else {
                        let len = rng.below(10);
                        rng.text(len)
                    }
                })
                .collect();
            spec[field] = serde_json::json!(globs);
        }
    }
    if rng.chance(40) {
        spec["keepNewest"] = serde_json::json!(rng.below(4) as i64 - 1);
    }
    if rng.chance(40) {
        spec["maxImagesPerRun"] = serde_json::json!(rng.below(5) as i64 - 1);
    }
    if rng.chance(30) {
        spec["dryRun"] = serde_json::json!(true);
    }
    if rng.chance(50) {
        let pool = ["a", "b"][rng.below(2)];
        spec["nodeSelector"] = serde_json::json!({"matchLabels": {"pool": pool}});
    }
    spec
}

/// Pseudo-random ImagePrunePolicies (fixed seed) through the real API server to a running
/// agent whose watermark check runs every second and whose scheduled runs have no offset:
/// whatever the schema accepts, the agent must not panic, must stay ready, must never remove
/// a pinned, in-use or protected image, and must only report images of its node for policies
/// that exist. Old unprotected images are there to be removed.
async fn agent_survives_arbitrary_policies() -> Result<()> {
    use imagegc::api::ImagePrunePolicy;
    use imagegc::core::last_used::FIRST_SEEN_LABEL;

    let mut op = Operator::start(&[&[("pool", "a")]]).await?;
    op.agent_args = vec![
        "--protect=docker.io/library/fzguard:*".into(),
        "--watermark-check=1s".into(),
        "--prune-max-jitter=0s".into(),
    ];
    op.stop_agent(0);
    let socket = op.socket(0);
    let old = (crate::operator::now_seconds() - 30 * 86_400).to_string();
    let aged = [(FIRST_SEEN_LABEL, old.as_str())];
    let guard = ImageBuilder::new("fzp-guard").build();
    import_labelled(&socket, &guard, &["docker.io/library/fzguard:1"], &aged).await?;
    let pinned = ImageBuilder::new("fzp-pinned").build();
    import_labelled(
        &socket,
        &pinned,
        &[PINNED_TAG],
        &[("io.cri-containerd.pinned", "pinned"), aged[0]],
    )
    .await?;
    let busy = ImageBuilder::new("fzp-busy").build();
    import_labelled(&socket, &busy, &["docker.io/library/fzbusy:1"], &aged).await?;
    image::create_container(&socket, NS, "fzbusy", "docker.io/library/fzbusy:1", None).await?;
    for n in 0..6 {
        let img = ImageBuilder::new(format!("fzp-victim-{n}")).build();
        import_labelled(
            &socket,
            &img,
            &[&format!("docker.io/library/fzv{}:{n}", n % 2)],
            &aged,
        )
        .await?;
    }
    let kept = [
        "docker.io/library/fzguard:1",
        PINNED_TAG,
        "docker.io/library/fzbusy:1",
    ];
    let kept_ids = [guard.id(), pinned.id(), busy.id()];
    op.start_agent(0)?;

    let api = Api::<ImagePrunePolicy>::all(op.admin.clone());
    let raw = Api::<DynamicObject>::all_with(
        op.admin.clone(),
        &ApiResource::erase::<ImagePrunePolicy>(&()),
    );
    let mut rng = Rng(POLICY_SEED);
    let (mut accepted, mut rejected) = (0, 0);
    for n in 0..POLICY_INPUTS {
        let spec = policy_spec(&mut rng);
        // Raw JSON (a DynamicObject): negative numbers and other values the Rust types
        // cannot hold must reach the API server too.
        let body: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImagePrunePolicy",
            "metadata": {"name": format!("fzp-{n}")}, "spec": spec,
        }))?;
        let created = raw.create(&PostParams::default(), &body).await;
        match created {
            Ok(_) => accepted += 1,
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => rejected += 1,
            Err(e) => bail!("policy {n} (seed {POLICY_SEED:#x}): unexpected API error {e}: {spec}"),
        }
    }

    // Every scheduled policy fires within the next minute; watermarks every second.
    tokio::time::sleep(Duration::from_secs(75)).await;

    let present = image::image_names(&socket, NS).await?;
    for tag in kept {
        ensure!(
            present.contains(tag),
            "{tag} was removed by a policy; left: {present:?}\n{}",
            op.agent_log(0)
        );
    }
    let reports = Api::<imagegc::api::NodeImageReport>::all(op.admin.clone());
    let report = reports.get(&op.node(0)).await?;
    let runs = report.status.unwrap_or_default().policies;
    let live: std::collections::BTreeSet<String> = api
        .list(&Default::default())
        .await?
        .items
        .iter()
        .map(kube::ResourceExt::name_any)
        .collect();
    for run in &runs {
        ensure!(
            live.contains(&run.name),
            "a run of a policy that does not exist: {run:?}"
        );
        for image in &run.images {
            ensure!(
                !kept_ids.contains(&image.id) || image.outcome != "Removed",
                "{run:?} removed a protected image"
            );
        }
    }
    let pid = op.agent_pid(0).context("agent not running")?;
    ensure!(
        std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !op.agent_log(0).contains("panicked"),
        "the agent exited or panicked:\n{}",
        op.agent_log(0)
    );
    let (code, _) = http_get(op.agent_port(0), "/readyz").await?;
    ensure!(code == 200, "agent not ready after the inputs");
    let removed = runs.iter().map(|r| r.total_removed).sum::<i64>();
    println!(
        "fuzz: {POLICY_INPUTS} policies sent (seed {POLICY_SEED:#x}): {accepted} accepted by the API server, {rejected} rejected; {} runs reported, {removed} images removed",
        runs.len()
    );
    ensure!(
        accepted > POLICY_INPUTS / 4 && rejected > 0 && !runs.is_empty(),
        "the generator covers too little: {accepted} accepted, {rejected} rejected, {} runs",
        runs.len()
    );
    Ok(())
}
