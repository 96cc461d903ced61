//! The plan: what to do with each requested string, and the exact deletes, in a crash-safe
//! order, that carry it out. Pure: it reads an [`Inventory`] and touches nothing.

use std::collections::BTreeSet;
use std::fmt;

use crate::core::inventory::Inventory;
use crate::core::resolve::{Resolution, resolve};

/// What the caller asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// Image IDs, short IDs or references, as a user typed them.
    pub images: Vec<String>,
    /// Remove images that containers use (pinned images are never removed).
    pub force: bool,
}

/// The decision for one requested string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The image will be removed: every one of its references.
    Remove {
        /// The image ID.
        id: String,
        /// Every record name that will be deleted.
        references: Vec<String>,
        /// Content size of the image for this platform.
        size: i64,
        /// Containers that use it (non-empty only with `force`).
        used_by: Vec<String>,
    },
    /// No such image on this node: nothing to do, and that is success.
    NotPresent,
    /// Containers use the image; it is kept (ask with `force` to remove it anyway).
    InUse {
        /// The image ID.
        id: String,
        /// The containers that use it.
        used_by: Vec<String>,
    },
    /// The image is pinned by the runtime (e.g. the sandbox image) and is never removed.
    Pinned {
        /// The image ID.
        id: String,
    },
    /// The string is not an image ID or reference; nothing is touched.
    Invalid {
        /// Why, in words.
        reason: String,
    },
    /// The short ID matches several images; nothing is touched.
    Ambiguous {
        /// The matching IDs.
        candidates: Vec<String>,
    },
}

impl Outcome {
    /// A stable one-word name (for output columns, metrics and status).
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Remove { .. } => "Removed",
            Outcome::NotPresent => "NotPresent",
            Outcome::InUse { .. } => "InUse",
            Outcome::Pinned { .. } => "Pinned",
            Outcome::Invalid { .. } => "Invalid",
            Outcome::Ambiguous { .. } => "Ambiguous",
        }
    }

    /// Whether this outcome counts as a failure of the request (the caller must act).
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Invalid { .. } | Outcome::Ambiguous { .. })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Remove {
                id,
                references,
                used_by,
                ..
            } => {
                write!(f, "image {id}: {} reference(s)", references.len())?;
                if !used_by.is_empty() {
                    write!(f, " (forced although used by {})", used_by.join(", "))?;
                }
                Ok(())
            }
            Outcome::NotPresent => write!(f, "not present on this node"),
            Outcome::InUse { id, used_by } => write!(
                f,
                "image {id} is used by container(s) {}; kept (use force to remove it anyway)",
                used_by.join(", ")
            ),
            Outcome::Pinned { id } => write!(
                f,
                "image {id} is pinned by the container runtime (e.g. the sandbox image); never removed"
            ),
            Outcome::Invalid { reason } => write!(f, "invalid: {reason}"),
            Outcome::Ambiguous { candidates } => write!(
                f,
                "short ID matches {} images ({}); give more characters",
                candidates.len(),
                candidates.join(", ")
            ),
        }
    }
}

/// One requested string and its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// The string as requested.
    pub input: String,
    /// What will be done.
    pub outcome: Outcome,
}

/// A full plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// One entry per requested string, in request order.
    pub items: Vec<Item>,
    /// Record names to delete, in order. Per image the `sha256:<id>` record goes first and
    /// the other names follow in CRI order, so an interruption never strands a record that
    /// only an ID reaches; records left pending by an interrupted run come first of all.
    /// The executor marks all of them pending before deleting any, and makes the last
    /// delete synchronous (one garbage collection per batch).
    pub deletes: Vec<String>,
    /// Which of `deletes` finish an earlier, interrupted removal.
    pub resumed: Vec<String>,
}

/// Plans `request` against `inventory`.
pub fn plan(request: &Request, inventory: &Inventory) -> Plan {
    let ids = inventory.ids();
    let mut plan = Plan::default();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for name in &inventory.pending {
        plan.resumed.push(name.clone());
        plan.deletes.push(name.clone());
        seen.insert(name.clone());
    }
    for input in &request.images {
        let outcome = match resolve(input, &ids, &inventory.ref_to_id) {
            Err(invalid) => Outcome::Invalid {
                reason: invalid.to_string(),
            },
            Ok(Resolution::NotFound) => Outcome::NotPresent,
            Ok(Resolution::Ambiguous(candidates)) => Outcome::Ambiguous { candidates },
            Ok(Resolution::Found(id)) => match inventory.images.get(&id) {
                None => Outcome::NotPresent,
                Some(image) if image.pinned => Outcome::Pinned { id },
                Some(image) if !image.used_by.is_empty() && !request.force => Outcome::InUse {
                    id,
                    used_by: image.used_by.clone(),
                },
                Some(image) => {
                    let (first, rest): (Vec<&String>, Vec<&String>) =
                        image.references.iter().partition(|r| **r == image.id);
                    for r in first.into_iter().chain(rest) {
                        if seen.insert(r.clone()) {
                            plan.deletes.push(r.clone());
                        }
                    }
                    Outcome::Remove {
                        id,
                        references: image.references.clone(),
                        size: image.size,
                        used_by: image.used_by.clone(),
                    }
                }
            },
        };
        plan.items.push(Item {
            input: input.clone(),
            outcome,
        });
    }
    plan
}
