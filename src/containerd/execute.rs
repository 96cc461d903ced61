//! Carries out a [`Plan`]: write one journal naming the last record of each image, delete the
//! records (a few at a time, in an order that keeps every started image findable), the very last
//! delete synchronous (one garbage collection per batch), verify nothing of a removed image came
//! back, delete the journal and measure what was freed. Every listing asks containerd only for
//! the records and blobs this run is about (up to 64 of each; beyond, a plain listing), so what
//! is sent and decoded follows the request; containerd still walks its metadata to filter.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use futures::{StreamExt, TryStreamExt};

use crate::containerd::{Runtime, RuntimeError};
use crate::core::inventory::Journal;
use crate::core::plan::{Outcome, Plan};

/// How many times a removal is re-checked: the CRI plugin handles image events
/// asynchronously and may re-create a `sha256:<id>` record for a name it saw just before
/// that name was deleted.
const VERIFY_ROUNDS: usize = 3;
/// containerd calls in flight at once. Its metadata store serialises writes; concurrency
/// overlaps the round trips and event handling around them.
pub const DELETE_CONCURRENCY: usize = 8;

/// What an execution did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Executed {
    /// The plan that was carried out.
    pub plan: Plan,
    /// Record names deleted (CRI backend: the IDs of the images removed).
    pub deleted: Vec<String>,
    /// Record names already gone when their delete ran (someone else removed them; CRI
    /// backend: image IDs no longer listed when the batch started).
    pub already_gone: Vec<String>,
    /// Bytes of the removed images' content blobs for this platform ([`Plan::content`]: the
    /// indexes walked, manifests, configs, compressed layers) that left the namespace's
    /// content store during this run. Blobs the collection also released for other platforms
    /// of an index are not counted, nor are unpacked snapshots (freed too, but containerd
    /// reports no size for them cheaply). Content another namespace still holds stays on
    /// disk.
    /// CRI backend: the runtime's sizes of the images removed (layers they shared with other
    /// images counted with each, so an upper bound).
    pub freed_bytes: i64,
    /// Synchronous garbage collections run (1 per batch that deleted anything; more only if
    /// verification had to delete again). CRI backend: 0, the runtime collects on its own.
    pub gc_runs: u32,
    /// How long each step took, in order: the journal write (with the first listing of the
    /// removed images' blobs), the deletes, the last delete (which waits for the garbage
    /// collection), the check that nothing came back (with the second listing of those blobs),
    /// the journal delete.
    pub phases: Vec<(&'static str, Duration)>,
}

/// Executes `plan` against `rt`. With nothing to delete it only removes journals whose
/// records are all gone (an earlier run that was interrupted after its last delete).
pub async fn execute(rt: &Runtime, plan: Plan) -> Result<Executed, RuntimeError> {
    let mut done = Executed {
        plan,
        ..Default::default()
    };
    if done.plan.deletes.is_empty() {
        if !done.plan.journals.is_empty() {
            let journalled = journalled_names(&done.plan.journals);
            let names: BTreeSet<String> = rt
                .list_images_named(&journalled)
                .await?
                .into_iter()
                .map(|r| r.name)
                .collect();
            finish_journals(rt, &done.plan.journals, &names).await?;
        }
        return Ok(done);
    }
    let mut clock = Instant::now();
    // The journal goes first: from here on, an interruption leaves it for the next run. It
    // is written alongside the first listing of the blobs the removal may free; if that
    // listing fails, the batch is committed all the same and the next run finishes it
    // (re-checking pinned and in use).
    let (before, journal) = tokio::try_join!(rt.content_sizes_of(&done.plan.content), async {
        match done.plan.marks.is_empty() {
            true => Ok(None),
            false => rt.create_journal(&done.plan.marks).await.map(Some),
        }
    })?;
    lap(&mut done, &mut clock, "journal");

    // Marked records (this run's marks, and records an earlier run left pending) go after
    // every other record, so until its image is gone each started image keeps one.
    let marked: BTreeSet<String> = done
        .plan
        .marks
        .iter()
        .chain(&done.plan.pending)
        .cloned()
        .collect();
    let deletes = done.plan.deletes.clone();
    delete_batch(rt, &deletes, &marked, &mut done, &mut clock).await?;

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
    // What the check lists: those, and every journalled name (a journal goes once none of
    // its records is left).
    let mut watched = journalled_names(&done.plan.journals);
    watched.extend(removed.iter().cloned());
    // The first check and the listing that measures what was freed run together; the
    // listing is taken again only if records had to be deleted again.
    let mut remaining = BTreeSet::new();
    let mut after = None;
    for round in 0..VERIFY_ROUNDS {
        let (records, sizes) = if round == 0 {
            let (records, sizes) = tokio::try_join!(
                rt.list_images_named(&watched),
                rt.content_sizes_of(&done.plan.content)
            )?;
            (records, Some(sizes))
        } else {
            (rt.list_images_named(&watched).await?, None)
        };
        remaining = records.into_iter().map(|r| r.name).collect();
        let again: Vec<String> = remaining.intersection(&removed).cloned().collect();
        if again.is_empty() {
            after = sizes;
            break;
        }
        tracing::info!(records = ?again, "records of removed images reappeared; deleting again");
        delete_batch(rt, &again, &BTreeSet::new(), &mut done, &mut clock).await?;
        remaining.retain(|n| !removed.contains(n));
    }

    let mut journals = done.plan.journals.clone();
    journals.extend(journal.map(|id| Journal {
        id,
        names: done.plan.marks.iter().cloned().collect(),
    }));
    lap(&mut done, &mut clock, "verify");
    finish_journals(rt, &journals, &remaining).await?;
    lap(&mut done, &mut clock, "journal delete");

    let after = match after {
        Some(after) => after,
        None => rt.content_sizes_of(&done.plan.content).await?,
    };
    done.freed_bytes = freed_bytes(&done.plan.content, &before, &after);
    Ok(done)
}

/// Bytes of the blobs among `content` that `before` lists and `after` does not. The listings
/// may hold other blobs (past a filter's limit containerd lists them all): only `content`
/// counts.
fn freed_bytes(
    content: &BTreeSet<String>,
    before: &BTreeMap<String, i64>,
    after: &BTreeMap<String, i64>,
) -> i64 {
    content
        .iter()
        .filter(|digest| !after.contains_key(*digest))
        .filter_map(|digest| before.get(digest))
        .fold(0i64, |sum, size| sum.saturating_add((*size).max(0)))
}

/// Every record name the journals list.
fn journalled_names(journals: &[Journal]) -> BTreeSet<String> {
    journals
        .iter()
        .flat_map(|j| j.names.iter().cloned())
        .collect()
}

/// Records the time since `clock` as `phase`, and restarts the clock.
fn lap(done: &mut Executed, clock: &mut Instant, phase: &'static str) {
    let now = Instant::now();
    done.phases.push((phase, now - *clock));
    *clock = now;
}

/// Deletes each of `journals` none of whose records is among `remaining`.
async fn finish_journals(
    rt: &Runtime,
    journals: &[Journal],
    remaining: &BTreeSet<String>,
) -> Result<(), RuntimeError> {
    let finished = journals
        .iter()
        .filter(|j| j.names.is_disjoint(remaining))
        .map(|j| rt.delete_lease(&j.id));
    try_join_all(finished).await?;
    Ok(())
}

/// Deletes `names`: the unmarked ones [`DELETE_CONCURRENCY`] at a time, then the marked ones
/// likewise, then the last one synchronously, so containerd collects garbage once, after
/// everything.
async fn delete_batch(
    rt: &Runtime,
    names: &[String],
    marked: &BTreeSet<String>,
    done: &mut Executed,
    clock: &mut Instant,
) -> Result<(), RuntimeError> {
    let Some((last, rest)) = names.split_last() else {
        return Ok(());
    };
    let (unmarked, marks): (Vec<&String>, Vec<&String>) =
        rest.iter().partition(|n| !marked.contains(*n));
    // Within a phase a window of deletes stays in flight; the marks wait for every unmarked
    // delete, so an image keeps its marked record until its other records are gone.
    for phase in [unmarked, marks] {
        // A loop, not a closure: a closure over `&&String` makes the caller's future fail
        // the `Send` check for every lifetime (a rustc limitation).
        let mut calls = Vec::with_capacity(phase.len());
        for name in &phase {
            calls.push(rt.delete_image(name, false));
        }
        let existed: Vec<bool> = futures::stream::iter(calls)
            .buffered(DELETE_CONCURRENCY)
            .try_collect()
            .await?;
        for (name, existed) in phase.iter().zip(existed) {
            record(done, name, existed);
        }
    }
    lap(done, clock, "deletes");
    let existed = rt.delete_image(last, true).await?;
    record(done, last, existed);
    if !existed {
        // The synchronous delete found nothing, so no collection ran: run one explicitly.
        rt.collect_garbage().await?;
    }
    done.gc_runs += 1;
    lap(done, clock, "last delete and garbage collection");
    Ok(())
}

fn record(done: &mut Executed, name: &str, existed: bool) {
    if existed {
        done.deleted.push(name.to_string());
    } else {
        done.already_gone.push(name.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn sizes(v: &[(&str, i64)]) -> BTreeMap<String, i64> {
        v.iter().map(|(d, n)| (d.to_string(), *n)).collect()
    }

    #[test]
    fn freed_is_what_left_of_the_removed_images_content() {
        let content = set(&["manifest", "config", "layer", "shared", "never-there"]);
        let before = sizes(&[
            ("manifest", 500),
            ("config", 100),
            ("layer", 4000),
            ("shared", 9000),
            ("someone-elses", 7000),
        ]);
        // The shared layer stays (another image holds it); a blob outside the request
        // left too, but is not this run's.
        let after = sizes(&[("shared", 9000)]);
        assert_eq!(freed_bytes(&content, &before, &after), 4600);
        assert_eq!(freed_bytes(&BTreeSet::new(), &before, &after), 0);
        assert_eq!(freed_bytes(&content, &before, &before), 0);
    }

    #[test]
    fn journalled_names_are_every_journals_records() {
        let journals = [
            Journal {
                id: "a".into(),
                names: set(&["x:1", "y:1"]),
            },
            Journal {
                id: "b".into(),
                names: set(&["y:1", "z:1"]),
            },
        ];
        assert_eq!(journalled_names(&journals), set(&["x:1", "y:1", "z:1"]));
        assert!(journalled_names(&[]).is_empty());
    }
}
