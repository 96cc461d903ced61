//! Carries out a [`Plan`]: label the last record of each image pending, delete the records
//! (a few at a time, in an order that keeps every started image findable), the very last delete
//! synchronous (one garbage collection per batch), then verify nothing of a removed image came
//! back and measure what was freed.

use std::collections::{BTreeSet, HashMap};

use futures::future::try_join_all;

use crate::containerd::{Runtime, RuntimeError};
use crate::core::inventory::PENDING_LABEL;
use crate::core::plan::{Outcome, Plan};

/// How many times a removal is re-checked: the CRI plugin handles image events
/// asynchronously and may re-create a `sha256:<id>` record for a name it saw just before
/// that name was deleted.
const VERIFY_ROUNDS: usize = 3;
/// containerd calls in flight at once. Its metadata store serialises writes; concurrency
/// overlaps the round trips and event handling around them.
const CONCURRENCY: usize = 8;

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
pub async fn execute(rt: &Runtime, plan: Plan) -> Result<Executed, RuntimeError> {
    let mut done = Executed {
        plan,
        ..Default::default()
    };
    if done.plan.deletes.is_empty() {
        return Ok(done);
    }
    let (before, records) = tokio::try_join!(rt.content_sizes(), rt.list_images())?;
    let by_name: HashMap<&str, _> = records.iter().map(|r| (r.name.as_str(), r)).collect();
    let to_mark: Vec<_> = done
        .plan
        .marks
        .iter()
        .filter_map(|m| by_name.get(m.as_str()).copied())
        .collect();
    for chunk in to_mark.chunks(CONCURRENCY) {
        let calls: Vec<_> = chunk
            .iter()
            .map(|r| rt.label_record(r, PENDING_LABEL, "true"))
            .collect();
        try_join_all(calls).await?;
    }

    // Marked records (this run's marks, and records an earlier run left pending) go after
    // every other record, so until its image is gone each started image keeps one.
    let mut marked: BTreeSet<String> = done.plan.marks.iter().cloned().collect();
    marked.extend(
        records
            .iter()
            .filter(|r| r.labels.contains_key(PENDING_LABEL))
            .map(|r| r.name.clone()),
    );
    let deletes = done.plan.deletes.clone();
    delete_batch(rt, &deletes, &marked, &mut done).await?;

    // Every record of a removed image, by name: what must not be there any more.
    let removed: BTreeSet<String> = done
        .plan
        .items
        .iter()
        .filter_map(|i| match &i.outcome {
            Outcome::Remove { references, .. } => Some(references.clone()),
            _ => None,
        })
        .flatten()
        .chain(done.plan.resumed.iter().cloned())
        .collect();
    for _ in 0..VERIFY_ROUNDS {
        let again: Vec<String> = rt
            .list_images()
            .await?
            .into_iter()
            .filter(|r| removed.contains(&r.name) || r.labels.contains_key(PENDING_LABEL))
            .map(|r| r.name)
            .collect();
        if again.is_empty() {
            break;
        }
        tracing::info!(records = ?again, "records of removed images reappeared; deleting again");
        delete_batch(rt, &again, &BTreeSet::new(), &mut done).await?;
    }

    let after = rt.content_sizes().await?;
    done.freed_bytes = before
        .iter()
        .filter(|(digest, _)| !after.contains_key(*digest))
        .map(|(_, size)| size)
        .sum();
    Ok(done)
}

/// Deletes `names`: the unmarked ones a few at a time, then the marked ones likewise, then
/// the last one synchronously, so containerd collects garbage once, after everything.
async fn delete_batch(
    rt: &Runtime,
    names: &[String],
    marked: &BTreeSet<String>,
    done: &mut Executed,
) -> Result<(), RuntimeError> {
    let Some((last, rest)) = names.split_last() else {
        return Ok(());
    };
    let (unmarked, marks): (Vec<&String>, Vec<&String>) =
        rest.iter().partition(|n| !marked.contains(*n));
    for phase in [unmarked, marks] {
        for chunk in phase.chunks(CONCURRENCY) {
            let calls: Vec<_> = chunk.iter().map(|n| rt.delete_image(n, false)).collect();
            let existed = try_join_all(calls).await?;
            for (name, existed) in chunk.iter().zip(existed) {
                record(done, name, existed);
            }
        }
    }
    let existed = rt.delete_image(last, true).await?;
    record(done, last, existed);
    if !existed {
        // The synchronous delete found nothing, so no collection ran: run one explicitly.
        rt.collect_garbage().await?;
    }
    done.gc_runs += 1;
    Ok(())
}

fn record(done: &mut Executed, name: &str, existed: bool) {
    if existed {
        done.deleted.push(name.to_string());
    } else {
        done.already_gone.push(name.to_string());
    }
}
