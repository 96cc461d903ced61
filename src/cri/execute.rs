//! Carries out a [`Plan`] through CRI: one `RemoveImage` per image, by its ID as the runtime
//! spells it (CRI-O untags only the given name when asked by name), all of a batch's calls in
//! flight at once as `crictl rmi` sends them, so the runtime can coalesce its garbage
//! collection; then the listing is checked until no removed image is left.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;

use crate::containerd::Executed;
use crate::core::inventory::normalize_id;
use crate::core::plan::{Outcome, Plan};
use crate::cri::Runtime;
use crate::runtime::RuntimeError;

/// `RemoveImage` calls in flight at once (a policy run removes at most 100 images).
pub const CONCURRENCY: usize = 32;
/// How many times an image still listed after its removal is asked for again.
const VERIFY_ROUNDS: usize = 3;

/// Executes `plan` against `rt`: removes each image of the plan's `Remove` outcomes by ID.
/// The plan's record names are containerd's business and are not used here.
pub async fn execute(rt: &Runtime, plan: Plan) -> Result<Executed, RuntimeError> {
    let wanted: BTreeSet<String> = plan
        .items
        .iter()
        .filter_map(|i| match &i.outcome {
            Outcome::Remove { id, .. } => Some(id.clone()),
            _ => None,
        })
        .collect();
    let mut done = Executed {
        plan,
        ..Default::default()
    };
    if wanted.is_empty() {
        return Ok(done);
    }
    // The runtime's own spelling of each ID, and its size, from a fresh listing.
    let listed: BTreeMap<String, (String, i64)> = rt
        .list_images()
        .await?
        .into_iter()
        .map(|i| (normalize_id(&i.id), (i.id, i.size)))
        .collect();
    let (present, gone): (Vec<&String>, Vec<&String>) =
        wanted.iter().partition(|id| listed.contains_key(*id));
    done.already_gone = gone.into_iter().cloned().collect();
    let targets: BTreeMap<String, String> = present
        .into_iter()
        .map(|id| (id.clone(), listed[id].0.clone()))
        .collect();

    let mut errors = remove_all(rt, targets.clone()).await;
    let mut still = BTreeMap::new();
    for round in 1..=VERIFY_ROUNDS {
        let now: BTreeSet<String> = rt
            .list_images()
            .await?
            .into_iter()
            .map(|i| normalize_id(&i.id))
            .collect();
        still = targets
            .iter()
            .filter(|(id, _)| now.contains(*id))
            .map(|(id, spelled)| (id.clone(), spelled.clone()))
            .collect();
        // A call that failed for an image that is gone anyway (removed by someone else) is
        // success; one whose image is still there is the batch's error.
        errors.retain(|(id, _)| still.contains_key(id));
        if let Some((_, e)) = errors.into_iter().next() {
            return Err(e);
        }
        if still.is_empty() || round == VERIFY_ROUNDS {
            break;
        }
        tracing::info!(images = ?still.keys().collect::<Vec<_>>(), "images still listed after RemoveImage; asking again");
        errors = remove_all(rt, still.clone()).await;
    }
    if let Some(id) = still.into_keys().next() {
        return Err(RuntimeError::NotRemoved {
            id,
            attempts: VERIFY_ROUNDS,
        });
    }
    done.freed_bytes = targets.keys().map(|id| listed[id].1).sum();
    done.deleted = targets.into_keys().collect();
    Ok(done)
}

/// `RemoveImage` for each normalized ID → the runtime's spelling, [`CONCURRENCY`] in flight;
/// the failures, by normalized ID.
async fn remove_all(
    rt: &Runtime,
    targets: BTreeMap<String, String>,
) -> Vec<(String, RuntimeError)> {
    let mut calls = Vec::new();
    for (id, spelled) in targets {
        let rt = rt.clone();
        calls.push(async move {
            let result = rt.remove_image(&spelled).await;
            (id, result)
        });
    }
    let results: Vec<(String, Result<(), RuntimeError>)> = futures::stream::iter(calls)
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results
        .into_iter()
        .filter_map(|(id, result)| result.err().map(|e| (id, e)))
        .collect()
}
