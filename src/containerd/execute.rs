//! Carries out a [`Plan`]: label the last record of each image pending, delete the records in
//! the plan's order with the last delete synchronous (one garbage collection per batch), then
//! verify nothing of a removed image came back and measure what was freed.

use std::collections::BTreeSet;

use crate::containerd::{Runtime, RuntimeError};
use crate::core::inventory::PENDING_LABEL;
use crate::core::plan::{Outcome, Plan};
use crate::core::platform::Matcher;

/// How many times a removal is re-checked: the CRI plugin handles image events
/// asynchronously and may re-create a `sha256:<id>` record for a name it saw just before
/// that name was deleted.
const VERIFY_ROUNDS: usize = 3;

/// What an execution did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Executed {
    /// The plan that was carried out.
    pub plan: Plan,
    /// Record names deleted.
    pub deleted: Vec<String>,
    /// Record names already gone when their delete ran (someone else removed them).
    pub already_gone: Vec<String>,
    /// Bytes of content blobs that left the namespace's content store during this run: the
    /// compressed layers, configs, manifests and indexes that garbage collection released.
    /// Unpacked snapshots are not counted (they are freed too, but containerd reports no
    /// size for them cheaply). Content another namespace still holds stays on disk.
    pub freed_bytes: i64,
    /// Synchronous garbage collections run (1 per batch that deleted anything; more only if
    /// verification had to delete again).
    pub gc_runs: u32,
}

/// Executes `plan` against `rt`. With an empty delete list it touches nothing.
pub async fn execute(
    rt: &Runtime,
    plan: Plan,
    matcher: &Matcher,
) -> Result<Executed, RuntimeError> {
    let mut done = Executed {
        plan,
        ..Default::default()
    };
    if done.plan.deletes.is_empty() {
        return Ok(done);
    }
    let before = rt.content_sizes().await?;
    for name in &done.plan.marks {
        rt.set_label(name, PENDING_LABEL, "true").await?;
    }
    let deletes = done.plan.deletes.clone();
    delete_batch(rt, &deletes, &mut done).await?;

    let removed: BTreeSet<String> = done
        .plan
        .items
        .iter()
        .filter_map(|i| match &i.outcome {
            Outcome::Remove { id, .. } => Some(id.clone()),
            _ => None,
        })
        .collect();
    for _ in 0..VERIFY_ROUNDS {
        let inv = rt.inventory(matcher).await?;
        let mut again: Vec<String> = inv.pending.iter().cloned().collect();
        for id in &removed {
            if let Some(image) = inv.images.get(id) {
                again.extend(image.references.iter().cloned());
            }
        }
        again.sort();
        again.dedup();
        if again.is_empty() {
            break;
        }
        tracing::info!(records = ?again, "records of removed images reappeared; deleting again");
        delete_batch(rt, &again, &mut done).await?;
    }

    let after = rt.content_sizes().await?;
    done.freed_bytes = before
        .iter()
        .filter(|(digest, _)| !after.contains_key(*digest))
        .map(|(_, size)| size)
        .sum();
    Ok(done)
}

async fn delete_batch(
    rt: &Runtime,
    names: &[String],
    done: &mut Executed,
) -> Result<(), RuntimeError> {
    let last = names.len().saturating_sub(1);
    let mut last_existed = false;
    for (i, name) in names.iter().enumerate() {
        let existed = rt.delete_image(name, i == last).await?;
        if existed {
            done.deleted.push(name.clone());
        } else {
            done.already_gone.push(name.clone());
        }
        last_existed = existed;
    }
    if !last_existed {
        // The synchronous delete found nothing, so no collection ran: run one explicitly.
        rt.collect_garbage().await?;
    }
    done.gc_runs += 1;
    Ok(())
}
