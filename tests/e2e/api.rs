//! The generated CRDs on the real API server: accepted, served, and rejecting bad input.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use imagegc::api::{ImageRemoval, crds};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use libtest_mimic::Trial;
use testbed::{Flavor, Options, TestBed};

use crate::support::trial;

fn removal(name: &str, spec: serde_json::Value) -> Result<ImageRemoval> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "imagegc.dev/v1alpha1", "kind": "ImageRemoval",
        "metadata": {"name": name}, "spec": spec
    }))?)
}

async fn crds_are_accepted_and_validate() -> Result<()> {
    let bed = TestBed::start(&Options {
        nodes: 0,
        flavor: Flavor::V2,
        cluster: true,
        real_node: false,
    })
    .await?;
    let admin = bed.cluster()?.admin_client().await?;
    let api = Api::<CustomResourceDefinition>::all(admin.clone());
    for crd in crds() {
        api.create(&PostParams::default(), &crd).await?;
    }
    let removals = Api::<ImageRemoval>::all(admin);
    let good = removal(
        "good",
        serde_json::json!({"images": ["nginx", "sha256:abc"], "ttlSecondsAfterFinished": 60}),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match removals.create(&PostParams::default(), &good).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
    let stored = removals.get("good").await?;
    ensure!(
        !stored.spec.force && !stored.spec.dry_run,
        "defaults: {:?}",
        stored.spec
    );

    let many: Vec<String> = (0..101).map(|i| format!("img{i}")).collect();
    for (name, spec, needle) in [
        (
            "empty-list",
            serde_json::json!({"images": []}),
            "spec.images",
        ),
        (
            "empty-string",
            serde_json::json!({"images": [""]}),
            "spec.images[0]",
        ),
        (
            "wildcard",
            serde_json::json!({"images": ["nginx*"]}),
            "wildcards",
        ),
        (
            "whitespace",
            serde_json::json!({"images": ["nginx latest"]}),
            "wildcards",
        ),
        (
            "too-many",
            serde_json::json!({"images": many}),
            "spec.images",
        ),
        (
            "ttl",
            serde_json::json!({"images": ["nginx"], "ttlSecondsAfterFinished": -1}),
            "ttlSecondsAfterFinished",
        ),
    ] {
        match removals
            .create(&PostParams::default(), &removal(name, spec)?)
            .await
        {
            Err(kube::Error::Api(s)) if s.code == 422 => {
                ensure!(s.message.contains(needle), "{name}: {}", s.message)
            }
            other => bail!("{name} was not rejected: {other:?}"),
        }
    }
    Ok(())
}

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "api::crds_are_accepted_and_validate",
        crds_are_accepted_and_validate,
    )]
}
