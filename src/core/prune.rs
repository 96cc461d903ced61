//! The selection of one ImagePrunePolicy run on one node: which images the policy picks, in
//! which order, and why every other image is kept. Pure: "now" is a parameter, times are `i64`
//! unix seconds, sizes are bytes, and nothing here reads a clock, a disk or a socket. Whether
//! the run is a dry run is the caller's business: this module only chooses.
//!
//! The rules, in the order a candidate meets them:
//!
//! 1. **Pinned and in-use images are never chosen**, whatever the policy says (policies have no
//!    `force`).
//! 2. **Global protections** (the agent's exclude globs, e.g. the pause image and the agent's
//!    own image) and the **policy's exclude globs** keep an image when any of its references
//!    matches — its `sha256:<id>` record and its ID included, so an image can be protected by
//!    ID. An over-broad exclude only keeps more. Between the two, the agent's **minimum image
//!    age** keeps an image created (or first seen) less than that long ago, as the kubelet's
//!    `imageMinimumGCAge` does: a freshly pulled image is about to be used.
//! 3. **Include globs** (empty = every image) are matched only against references that are
//!    not bare `sha256:<hex>` ID records: a glob such as `*` or `docker.io/*` is about
//!    repositories, so an image known only by its ID (a dangling image) is included by the
//!    empty list and by no glob. An over-broad include would delete more, so it gets no help.
//! 4. **Never delete on missing data**: an image's last use is `last_used`, or `first_seen`
//!    when there is no record (it counts as used when first observed); its creation is
//!    `created`, or `first_seen`. `unused_for` keeps images last used after
//!    `now - unused_for`; `older_than` keeps images created after `now - older_than`. An image
//!    exactly at the threshold is old enough.
//! 5. **keep_newest N** keeps, in every repository, the N images with the newest creation
//!    (ties broken by the smaller ID), counting every candidate — pinned, in-use, protected,
//!    excluded or not included alike, since they are real images the node keeps. An image in
//!    several repositories is kept if it is among the N newest of any of them.
//! 6. What is left is ordered least recently used first, then largest first, then by ID, and
//!    taken in that order until the policy's cap (`max_images`) is reached or, when there is a
//!    byte target (the watermark's), until the chosen sizes add up to it.
//!
//! Globs use [`globset`] syntax with its defaults: `*` matches any run of characters, `/`
//! included (`docker.io/library/*` matches `docker.io/library/nginx:1.25`), `?` one character,
//! `[...]` a class, `{a,b}` alternatives; matching is case-sensitive.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use globset::{Glob, GlobSet, GlobSetBuilder};

/// One image on the node, as the policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The image ID, `sha256:<hex>`. Candidates are expected to have distinct IDs.
    pub id: String,
    /// Its normalized references (`docker.io/library/nginx:1.25`,
    /// `docker.io/library/nginx@sha256:...`), possibly with its bare `sha256:<id>` record.
    pub references: Vec<String>,
    /// Content size in bytes.
    pub size: i64,
    /// When the image was created (first pulled) on the node; `None` = unknown.
    pub created: Option<i64>,
    /// The last time a container referenced it; `None` = no record.
    pub last_used: Option<i64>,
    /// When the agent first observed the image.
    pub first_seen: i64,
    /// Pinned by the runtime (never removed).
    pub pinned: bool,
    /// Used by a container (never removed by a policy).
    pub in_use: bool,
}

impl Candidate {
    /// Its last use: `last_used`, or `first_seen` when there is no record.
    pub fn last_use(&self) -> i64 {
        self.last_used.unwrap_or(self.first_seen)
    }

    /// Its creation: `created`, or `first_seen` when unknown.
    pub fn creation(&self) -> i64 {
        self.created.unwrap_or(self.first_seen)
    }
}

/// What an ImagePrunePolicy selects (its criteria; `manifest::Selection` is another thing:
/// the manifest chosen for a platform).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Criteria {
    /// Only images unused for at least this many seconds.
    pub unused_for: Option<i64>,
    /// Only images created at least this many seconds ago.
    pub older_than: Option<i64>,
    /// Globs on references; an image is included if any matches. Empty = every image.
    pub include: Vec<String>,
    /// Globs on references; an image is kept if any matches.
    pub exclude: Vec<String>,
    /// Keep the N newest images of every repository.
    pub keep_newest: Option<u32>,
    /// Choose at most this many images per run.
    pub max_images: Option<u32>,
}

/// What the agent protects whatever the policy says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Protections {
    /// Global exclude globs from the agent's configuration (the pause image, the agent's own
    /// image, ...).
    pub exclude: Vec<String>,
    /// No policy chooses an image created (or first seen) less than this many seconds ago,
    /// as the kubelet's `imageMinimumGCAge`: a freshly pulled image is about to be used.
    pub min_image_age: i64,
}

/// Image-filesystem watermarks, in percent of capacity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watermark {
    /// Usage at or above which pruning starts.
    pub high_percent: u8,
    /// Usage pruning aims to get down to.
    pub low_percent: u8,
}

/// Image-filesystem usage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Bytes used.
    pub used_bytes: i64,
    /// Bytes the filesystem holds.
    pub capacity_bytes: i64,
}

/// Why a policy or watermark cannot be used. Nothing is selected with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PruneError {
    /// A glob that does not parse.
    #[error("invalid {field} glob {glob:?}: {reason}")]
    InvalidGlob {
        /// Which list it is in (`include`, `exclude`, `protections`).
        field: &'static str,
        /// The glob as written.
        glob: String,
        /// Why it is invalid, in words.
        reason: String,
    },
    /// A duration below zero.
    #[error("{field} must not be negative (got {seconds}s)")]
    NegativeDuration {
        /// Which duration (`unusedFor`, `olderThan`).
        field: &'static str,
        /// Its value in seconds.
        seconds: i64,
    },
    /// Watermarks that do not satisfy `low < high <= 100`.
    #[error("invalid watermarks high {high}% low {low}%: need low < high <= 100")]
    InvalidWatermark {
        /// The high watermark, in percent.
        high: u8,
        /// The low watermark, in percent.
        low: u8,
    },
}

/// A list of globs compiled once, remembering each glob's text for reports.
#[derive(Clone, Debug)]
struct Globs {
    /// The compiled globs.
    set: GlobSet,
    /// Each glob as written, by its index in `set`.
    text: Vec<String>,
}

impl Globs {
    /// Compiles `globs`; an empty or unparsable glob is an error naming `field`.
    fn compile(field: &'static str, globs: &[String]) -> Result<Globs, PruneError> {
        let mut builder = GlobSetBuilder::new();
        for g in globs {
            let invalid = |reason: String| PruneError::InvalidGlob {
                field,
                glob: g.clone(),
                reason,
            };
            if g.trim().is_empty() {
                return Err(invalid("the glob is empty".into()));
            }
            builder.add(Glob::new(g).map_err(|e| invalid(e.kind().to_string()))?);
        }
        let set = builder.build().map_err(|e| PruneError::InvalidGlob {
            field,
            glob: e.glob().unwrap_or_default().to_string(),
            reason: e.kind().to_string(),
        })?;
        Ok(Globs {
            set,
            text: globs.to_vec(),
        })
    }

    /// The first of `names` that matches, with the first glob it matches.
    fn first_match<'a>(
        &self,
        mut names: impl Iterator<Item = &'a str>,
    ) -> Option<(String, String)> {
        names.find_map(|n| {
            let first = self.set.matches(n).into_iter().min()?;
            Some((n.to_string(), self.text[first].clone()))
        })
    }

    /// Whether any of `names` matches.
    fn any_match<'a>(&self, mut names: impl Iterator<Item = &'a String>) -> bool {
        names.any(|n| self.set.is_match(n.as_str()))
    }
}

/// The agent's protection globs, compiled: images no removal and no policy may take, forced
/// or not. An image is protected when any of its references, or its ID, matches.
#[derive(Clone, Debug, Default)]
pub struct Protected {
    /// `None` when nothing is protected by name.
    globs: Option<Globs>,
}

impl Protected {
    /// Compiles `globs`; an empty or unparsable glob is an error.
    pub fn new(globs: &[String]) -> Result<Protected, PruneError> {
        if globs.is_empty() {
            return Ok(Protected::default());
        }
        Ok(Protected {
            globs: Some(Globs::compile("protections", globs)?),
        })
    }

    /// The first of `references` (then `id`) that a protection glob matches, with that glob.
    pub fn matching(&self, id: &str, references: &[String]) -> Option<(String, String)> {
        self.globs
            .as_ref()?
            .first_match(references.iter().map(String::as_str).chain([id]))
    }

    /// The globs as written.
    pub fn globs(&self) -> &[String] {
        self.globs.as_ref().map_or(&[], |g| g.text.as_slice())
    }
}

impl PartialEq for Protected {
    fn eq(&self, other: &Protected) -> bool {
        self.globs() == other.globs()
    }
}

impl Eq for Protected {}

/// A policy's selection and the agent's protections, validated and compiled: build it once
/// per policy, before selecting anything.
#[derive(Clone, Debug)]
pub struct Selector {
    /// The policy's `unused_for`, in seconds.
    unused_for: Option<i64>,
    /// The policy's `older_than`, in seconds.
    older_than: Option<i64>,
    /// `None` when the policy includes every image.
    include: Option<Globs>,
    /// The policy's exclude globs.
    exclude: Globs,
    /// The agent's protection globs.
    protections: Protected,
    /// The agent's minimum image age, in seconds.
    min_image_age: i64,
    /// The policy's `keep_newest`.
    keep_newest: Option<u32>,
    /// The policy's `max_images`.
    max_images: Option<u32>,
}

impl Selector {
    /// Validates and compiles `selection` and `protections`: every glob must parse and be
    /// non-empty, durations must not be negative.
    pub fn new(selection: &Criteria, protections: &Protections) -> Result<Selector, PruneError> {
        for (field, value) in [
            ("unusedFor", selection.unused_for),
            ("olderThan", selection.older_than),
        ] {
            if let Some(seconds) = value
                && seconds < 0
            {
                return Err(PruneError::NegativeDuration { field, seconds });
            }
        }
        let include = if selection.include.is_empty() {
            None
        } else {
            Some(Globs::compile("include", &selection.include)?)
        };
        Ok(Selector {
            unused_for: selection.unused_for,
            older_than: selection.older_than,
            include,
            exclude: Globs::compile("exclude", &selection.exclude)?,
            protections: Protected::new(&protections.exclude)?,
            min_image_age: protections.min_image_age.max(0),
            keep_newest: selection.keep_newest,
            max_images: selection.max_images,
        })
    }
}

/// An image the run removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    /// The image ID.
    pub id: String,
    /// Its references, as given.
    pub references: Vec<String>,
    /// Its size in bytes.
    pub size: i64,
    /// Why, in words (e.g. `unused for 9d 2h, created 30d ago`).
    pub reason: String,
}

/// Why an image is not chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// Pinned by the runtime.
    Pinned,
    /// Used by a container.
    InUse,
    /// A reference matches one of the agent's protection globs.
    Protected {
        /// The matching reference (or the ID).
        reference: String,
        /// The glob it matches.
        glob: String,
    },
    /// Created (or first seen) less than the agent's minimum image age ago: a freshly
    /// pulled image is about to be used, whatever the policy says.
    TooNew {
        /// Seconds since its creation (or since first seen, when unknown).
        ago: i64,
        /// The agent's minimum image age in seconds.
        min_age: i64,
    },
    /// A reference matches one of the policy's exclude globs.
    Excluded {
        /// The matching reference (or the ID).
        reference: String,
        /// The glob it matches.
        glob: String,
    },
    /// No reference matches the policy's include globs.
    NotIncluded,
    /// Used more recently than `unused_for`.
    UsedRecently {
        /// Seconds since its last use (or since first seen, without a record).
        ago: i64,
        /// Whether there is a record of its last use.
        recorded: bool,
        /// The policy's threshold in seconds.
        unused_for: i64,
    },
    /// Created more recently than `older_than`.
    CreatedRecently {
        /// Seconds since its creation (or since first seen, when unknown).
        ago: i64,
        /// Whether its creation time is known.
        known: bool,
        /// The policy's threshold in seconds.
        older_than: i64,
    },
    /// Among the `keep` newest images of `repository`.
    KeptNewest {
        /// The repository (a reference without tag and digest).
        repository: String,
        /// The policy's `keep_newest`.
        keep: u32,
    },
    /// Eligible, but the run's cap is reached.
    CapReached {
        /// The policy's `max_images`.
        max: u32,
    },
    /// Eligible, but the images chosen before it free enough.
    TargetReached {
        /// The bytes to free.
        target: i64,
    },
    /// The same ID was listed before; it is considered once.
    Duplicate,
}

impl SkipReason {
    /// A stable one-word name (for output columns, metrics and status).
    pub fn kind(&self) -> &'static str {
        match self {
            SkipReason::Pinned => "Pinned",
            SkipReason::InUse => "InUse",
            SkipReason::Protected { .. } => "Protected",
            SkipReason::TooNew { .. } => "TooNew",
            SkipReason::Excluded { .. } => "Excluded",
            SkipReason::NotIncluded => "NotIncluded",
            SkipReason::UsedRecently { .. } => "UsedRecently",
            SkipReason::CreatedRecently { .. } => "CreatedRecently",
            SkipReason::KeptNewest { .. } => "KeptNewest",
            SkipReason::CapReached { .. } => "CapReached",
            SkipReason::TargetReached { .. } => "TargetReached",
            SkipReason::Duplicate => "Duplicate",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::Pinned => write!(f, "pinned by the container runtime"),
            SkipReason::InUse => write!(f, "in use by a container"),
            SkipReason::Protected { reference, glob } => {
                write!(f, "{reference} matches the agent's protection glob {glob}")
            }
            SkipReason::TooNew { ago, min_age } => write!(
                f,
                "on the node for {}, less than the agent's minimum image age of {}",
                human_duration(*ago),
                human_duration(*min_age)
            ),
            SkipReason::Excluded { reference, glob } => {
                write!(f, "{reference} matches the policy's exclude glob {glob}")
            }
            SkipReason::NotIncluded => write!(f, "matches none of the policy's include globs"),
            SkipReason::UsedRecently {
                ago,
                recorded,
                unused_for,
            } => {
                let (ago, limit) = (human_duration(*ago), human_duration(*unused_for));
                if *recorded {
                    write!(f, "used {ago} ago, less than {limit}")
                } else {
                    write!(
                        f,
                        "no recorded use but first seen {ago} ago, less than {limit}"
                    )
                }
            }
            SkipReason::CreatedRecently {
                ago,
                known,
                older_than,
            } => {
                let (ago, limit) = (human_duration(*ago), human_duration(*older_than));
                if *known {
                    write!(f, "created {ago} ago, less than {limit}")
                } else {
                    write!(
                        f,
                        "creation unknown but first seen {ago} ago, less than {limit}"
                    )
                }
            }
            SkipReason::KeptNewest { repository, keep } => {
                write!(f, "kept as one of the {keep} newest of {repository}")
            }
            SkipReason::CapReached { max } => {
                write!(f, "the cap of {max} image(s) per run is reached")
            }
            SkipReason::TargetReached { target } => {
                write!(f, "the images chosen before free {target} bytes already")
            }
            SkipReason::Duplicate => write!(f, "listed twice; considered once"),
        }
    }
}

/// An image not chosen, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    /// The image ID.
    pub id: String,
    /// Why it is kept.
    pub reason: SkipReason,
}

/// The outcome of a selection: every candidate is either chosen or skipped, once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Choice {
    /// The images to remove, in removal order.
    pub chosen: Vec<Chosen>,
    /// The other images, by ID.
    pub skipped: Vec<Kept>,
    /// Sum of the chosen sizes (negative sizes count as 0).
    pub bytes: i64,
}

/// Whether `reference` is a bare ID record, `sha256:<hex>`.
pub fn is_id_record(reference: &str) -> bool {
    reference
        .strip_prefix("sha256:")
        .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The repository of `reference`: the reference without its digest (after `@`) and tag (after
/// the last `:`, if that comes after the last `/`, so `host:5000/app` keeps its port). `None`
/// for a bare ID record.
pub fn repository(reference: &str) -> Option<&str> {
    if is_id_record(reference) {
        return None;
    }
    let name = reference.split_once('@').map_or(reference, |(n, _)| n);
    let slash = name.rfind('/');
    match name.rfind(':') {
        Some(colon) if slash.is_none_or(|s| colon > s) => Some(&name[..colon]),
        _ => Some(name),
    }
}

/// The repositories `c` belongs to.
fn repositories(c: &Candidate) -> BTreeSet<&str> {
    c.references.iter().filter_map(|r| repository(r)).collect()
}

/// For every image kept by `keep_newest = keep`, the first repository (by name) in which it is
/// among the `keep` newest. Every candidate counts.
fn kept_newest<'a>(candidates: &[&'a Candidate], keep: u32) -> BTreeMap<&'a str, String> {
    let mut by_repo: BTreeMap<&str, Vec<&Candidate>> = BTreeMap::new();
    for c in candidates {
        for repo in repositories(c) {
            by_repo.entry(repo).or_default().push(c);
        }
    }
    let mut kept: BTreeMap<&str, String> = BTreeMap::new();
    for (repo, mut images) in by_repo {
        images.sort_by_key(|c| (Reverse(c.creation()), c.id.as_str()));
        for c in images.into_iter().take(keep as usize) {
            kept.entry(c.id.as_str())
                .or_insert_with(|| repo.to_string());
        }
    }
    kept
}

/// Seconds from `then` to `now` (saturating).
fn age(now: i64, then: i64) -> i64 {
    now.saturating_sub(then)
}

/// Whether `then` is at least `threshold` seconds before `now` (exact, no overflow).
fn old_enough(now: i64, then: i64, threshold: i64) -> bool {
    i128::from(then) <= i128::from(now) - i128::from(threshold)
}

/// Why `c` is not eligible under `selector` at `now`, if it is not. The newest-per-repository
/// rule is checked by the caller.
fn ineligible(c: &Candidate, selector: &Selector, now: i64) -> Option<SkipReason> {
    if c.pinned {
        return Some(SkipReason::Pinned);
    }
    if c.in_use {
        return Some(SkipReason::InUse);
    }
    if let Some((reference, glob)) = selector.protections.matching(&c.id, &c.references) {
        return Some(SkipReason::Protected { reference, glob });
    }
    if selector.min_image_age > 0 && !old_enough(now, c.creation(), selector.min_image_age) {
        return Some(SkipReason::TooNew {
            ago: age(now, c.creation()),
            min_age: selector.min_image_age,
        });
    }
    let names = || {
        c.references
            .iter()
            .map(String::as_str)
            .chain([c.id.as_str()])
    };
    if let Some((reference, glob)) = selector.exclude.first_match(names()) {
        return Some(SkipReason::Excluded { reference, glob });
    }
    if let Some(include) = &selector.include
        && !include.any_match(c.references.iter().filter(|r| !is_id_record(r)))
    {
        return Some(SkipReason::NotIncluded);
    }
    if let Some(unused_for) = selector.unused_for
        && !old_enough(now, c.last_use(), unused_for)
    {
        return Some(SkipReason::UsedRecently {
            ago: age(now, c.last_use()),
            recorded: c.last_used.is_some(),
            unused_for,
        });
    }
    if let Some(older_than) = selector.older_than
        && !old_enough(now, c.creation(), older_than)
    {
        return Some(SkipReason::CreatedRecently {
            ago: age(now, c.creation()),
            known: c.created.is_some(),
            older_than,
        });
    }
    None
}

/// Why `c` is chosen, in words.
fn chosen_reason(c: &Candidate, now: i64) -> String {
    let seen = human_duration(age(now, c.first_seen));
    let used = match c.last_used {
        Some(t) => format!("unused for {}", human_duration(age(now, t))),
        None => format!("no recorded use since first seen {seen} ago"),
    };
    match (c.created, c.last_used) {
        (Some(t), _) => format!("{used}, created {} ago", human_duration(age(now, t))),
        (None, Some(_)) => format!("{used}, first seen {seen} ago"),
        (None, None) => used,
    }
}

/// Chooses what one run of the policy compiled into `selector` removes from `candidates` at
/// `now`. With `bytes_to_free`, choosing stops as soon as the chosen sizes reach it (so
/// `Some(0)` or less chooses nothing); without, only the cap limits the run. The result does
/// not depend on the order of `candidates`, provided their IDs are distinct (a repeated ID is
/// considered once, at its first occurrence).
pub fn select(
    candidates: &[Candidate],
    selector: &Selector,
    now: i64,
    bytes_to_free: Option<i64>,
) -> Choice {
    let mut choice = Choice::default();
    let mut ids: BTreeSet<&str> = BTreeSet::new();
    let mut unique: Vec<&Candidate> = Vec::new();
    for c in candidates {
        if ids.insert(c.id.as_str()) {
            unique.push(c);
        } else {
            choice.skipped.push(Kept {
                id: c.id.clone(),
                reason: SkipReason::Duplicate,
            });
        }
    }
    let kept = match selector.keep_newest {
        Some(keep) => kept_newest(&unique, keep),
        None => BTreeMap::new(),
    };
    let mut eligible: Vec<&Candidate> = Vec::new();
    for c in unique {
        let reason = ineligible(c, selector, now).or_else(|| {
            kept.get(c.id.as_str()).map(|repo| SkipReason::KeptNewest {
                repository: repo.clone(),
                keep: selector.keep_newest.unwrap_or_default(),
            })
        });
        match reason {
            Some(reason) => choice.skipped.push(Kept {
                id: c.id.clone(),
                reason,
            }),
            None => eligible.push(c),
        }
    }
    eligible.sort_by_key(|c| (c.last_use(), Reverse(c.size), c.id.as_str()));
    let mut bytes: i128 = 0;
    for c in eligible {
        let reason = match (selector.max_images, bytes_to_free) {
            (Some(max), _) if choice.chosen.len() >= max as usize => {
                Some(SkipReason::CapReached { max })
            }
            (_, Some(target)) if bytes >= i128::from(target) => {
                Some(SkipReason::TargetReached { target })
            }
            _ => None,
        };
        match reason {
            Some(reason) => choice.skipped.push(Kept {
                id: c.id.clone(),
                reason,
            }),
            None => {
                bytes += i128::from(c.size.max(0));
                choice.chosen.push(Chosen {
                    id: c.id.clone(),
                    references: c.references.clone(),
                    size: c.size,
                    reason: chosen_reason(c, now),
                });
            }
        }
    }
    choice.bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
    choice.skipped.sort_by(|a, b| a.id.cmp(&b.id));
    choice
}

/// Checks `low < high <= 100`.
pub fn validate_watermark(wm: &Watermark) -> Result<(), PruneError> {
    if wm.low_percent < wm.high_percent && wm.high_percent <= 100 {
        Ok(())
    } else {
        Err(PruneError::InvalidWatermark {
            high: wm.high_percent,
            low: wm.low_percent,
        })
    }
}

/// Bytes to free for `usage` under `wm`, or `None` when the watermark does not fire.
///
/// "Usage at or above `high_percent`" means `used * 100 >= high * capacity`, exactly, in
/// integers. When it fires, the target is the fewest bytes `f` with
/// `(used - f) * 100 <= low * capacity`, i.e. `ceil((used * 100 - low * capacity) / 100)`,
/// never negative. Missing data never deletes: a capacity of 0 or less, or a negative usage,
/// gives `None`. Invalid watermarks are an error.
pub fn watermark_target(usage: &Usage, wm: &Watermark) -> Result<Option<i64>, PruneError> {
    validate_watermark(wm)?;
    if usage.capacity_bytes <= 0 || usage.used_bytes < 0 {
        return Ok(None);
    }
    let used = i128::from(usage.used_bytes) * 100;
    let capacity = i128::from(usage.capacity_bytes);
    if used < i128::from(wm.high_percent) * capacity {
        return Ok(None);
    }
    let excess = (used - i128::from(wm.low_percent) * capacity).max(0);
    let bytes = (excess + 99) / 100;
    // At most `used_bytes`, so it fits.
    Ok(Some(i64::try_from(bytes).unwrap_or(i64::MAX)))
}

/// `secs` in words, its two largest units: `9d 2h`, `3h`, `1m 30s`, `0s`. Smaller units are
/// truncated; a negative duration (a clock skew) gets a leading `-`.
pub fn human_duration(secs: i64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let sign = if secs < 0 { "-" } else { "" };
    let mut rest = secs.unsigned_abs();
    let mut parts: Vec<String> = Vec::new();
    for (i, (unit, name)) in UNITS.iter().enumerate() {
        let n = rest / unit;
        rest %= unit;
        if n > 0 {
            parts.push(format!("{n}{name}"));
            if let Some((next, next_name)) = UNITS.get(i + 1) {
                let m = rest / next;
                if m > 0 {
                    parts.push(format!("{m}{next_name}"));
                }
            }
            break;
        }
    }
    if parts.is_empty() {
        return "0s".into();
    }
    format!("{sign}{}", parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;
    /// "Now" in every test: day 100.
    const NOW: i64 = 100 * DAY;

    fn id(n: u64) -> String {
        format!("sha256:{n:064x}")
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// An unpinned, unused, 100-byte image first seen on day 0, never used, creation unknown.
    fn cand(n: u64, refs: &[&str]) -> Candidate {
        Candidate {
            id: id(n),
            references: strings(refs),
            size: 100,
            created: None,
            last_used: None,
            first_seen: 0,
            pinned: false,
            in_use: false,
        }
    }

    fn selector(selection: Criteria) -> Selector {
        Selector::new(&selection, &Protections::default()).expect("valid selection")
    }

    fn chosen_ids(c: &Choice) -> Vec<String> {
        c.chosen.iter().map(|c| c.id.clone()).collect()
    }

    fn reason_of(c: &Choice, image: &str) -> SkipReason {
        c.skipped
            .iter()
            .find(|s| s.id == image)
            .unwrap_or_else(|| panic!("{image} not skipped: {c:?}"))
            .reason
            .clone()
    }

    #[test]
    fn empty_policy_chooses_every_unprotected_image() {
        let cands = [
            cand(1, &["docker.io/library/a:1"]),
            cand(2, &[&id(2)]),
            Candidate {
                pinned: true,
                ..cand(3, &["registry.k8s.io/pause:3.9"])
            },
            Candidate {
                in_use: true,
                ..cand(4, &["docker.io/library/redis:7"])
            },
            Candidate {
                pinned: true,
                in_use: true,
                ..cand(5, &["docker.io/library/b:1"])
            },
        ];
        let c = select(&cands, &selector(Criteria::default()), NOW, None);
        assert_eq!(chosen_ids(&c), [id(1), id(2)]);
        assert_eq!(c.bytes, 200);
        assert_eq!(reason_of(&c, &id(3)), SkipReason::Pinned);
        assert_eq!(reason_of(&c, &id(4)), SkipReason::InUse);
        // Pinned is reported first.
        assert_eq!(reason_of(&c, &id(5)), SkipReason::Pinned);
        assert_eq!(c.skipped.len(), 3);
    }

    #[test]
    fn nothing_in_nothing_out() {
        let c = select(&[], &selector(Criteria::default()), NOW, Some(1000));
        assert_eq!(c, Choice::default());
    }

    #[test]
    fn unused_for_threshold_is_inclusive() {
        let at = |t: i64| Candidate {
            last_used: Some(t),
            ..cand(t as u64, &["docker.io/library/a:1"])
        };
        let cands = [
            at(NOW - 7 * DAY),
            at(NOW - 7 * DAY + 1),
            at(NOW - 7 * DAY - 1),
        ];
        let s = selector(Criteria {
            unused_for: Some(7 * DAY),
            ..Criteria::default()
        });
        let c = select(&cands, &s, NOW, None);
        // Least recently used first.
        assert_eq!(
            chosen_ids(&c),
            [id((NOW - 7 * DAY - 1) as u64), id((NOW - 7 * DAY) as u64)]
        );
        assert_eq!(
            reason_of(&c, &id((NOW - 7 * DAY + 1) as u64)),
            SkipReason::UsedRecently {
                ago: 7 * DAY - 1,
                recorded: true,
                unused_for: 7 * DAY,
            }
        );
        // Zero means any past use qualifies, and a use right now too.
        let zero = selector(Criteria {
            unused_for: Some(0),
            ..Criteria::default()
        });
        let now_used = Candidate {
            last_used: Some(NOW),
            ..cand(9, &["docker.io/library/a:1"])
        };
        assert_eq!(chosen_ids(&select(&[now_used], &zero, NOW, None)), [id(9)]);
    }

    #[test]
    fn missing_last_use_counts_as_used_when_first_seen() {
        let s = selector(Criteria {
            unused_for: Some(7 * DAY),
            ..Criteria::default()
        });
        let fresh = Candidate {
            first_seen: NOW - DAY,
            ..cand(1, &["docker.io/library/a:1"])
        };
        let old = Candidate {
            first_seen: NOW - 7 * DAY,
            ..cand(2, &["docker.io/library/a:2"])
        };
        // A record wins over first_seen, both ways.
        let used_recently = Candidate {
            last_used: Some(NOW - DAY),
            ..old.clone()
        };
        let c = select(&[fresh.clone(), old.clone()], &s, NOW, None);
        assert_eq!(chosen_ids(&c), [id(2)]);
        assert_eq!(
            reason_of(&c, &id(1)),
            SkipReason::UsedRecently {
                ago: DAY,
                recorded: false,
                unused_for: 7 * DAY,
            }
        );
        assert_eq!(
            c.chosen[0].reason,
            "no recorded use since first seen 7d ago"
        );
        assert!(select(&[used_recently], &s, NOW, None).chosen.is_empty());
        let stale = Candidate {
            last_used: Some(NOW - 8 * DAY),
            ..fresh
        };
        assert_eq!(chosen_ids(&select(&[stale], &s, NOW, None)), [id(1)]);
    }

    #[test]
    fn older_than_uses_created_or_first_seen_inclusively() {
        let s = selector(Criteria {
            older_than: Some(30 * DAY),
            ..Criteria::default()
        });
        let cands = [
            Candidate {
                created: Some(NOW - 30 * DAY),
                first_seen: NOW,
                ..cand(1, &["docker.io/library/a:1"])
            },
            Candidate {
                created: Some(NOW - 30 * DAY + 1),
                first_seen: 0,
                ..cand(2, &["docker.io/library/a:2"])
            },
            Candidate {
                first_seen: NOW - 31 * DAY,
                ..cand(3, &["docker.io/library/a:3"])
            },
            Candidate {
                first_seen: NOW - 29 * DAY,
                ..cand(4, &["docker.io/library/a:4"])
            },
        ];
        let c = select(&cands, &s, NOW, None);
        assert_eq!(chosen_ids(&c), [id(3), id(1)]);
        assert_eq!(
            reason_of(&c, &id(2)),
            SkipReason::CreatedRecently {
                ago: 30 * DAY - 1,
                known: true,
                older_than: 30 * DAY,
            }
        );
        assert_eq!(
            reason_of(&c, &id(4)),
            SkipReason::CreatedRecently {
                ago: 29 * DAY,
                known: false,
                older_than: 30 * DAY,
            }
        );
    }

    #[test]
    fn both_ages_must_hold() {
        let s = selector(Criteria {
            unused_for: Some(DAY),
            older_than: Some(10 * DAY),
            ..Criteria::default()
        });
        let young_but_unused = Candidate {
            created: Some(NOW - 5 * DAY),
            last_used: Some(NOW - 5 * DAY),
            ..cand(1, &["docker.io/library/a:1"])
        };
        let old_but_used = Candidate {
            created: Some(NOW - 50 * DAY),
            last_used: Some(NOW - 60),
            ..cand(2, &["docker.io/library/a:2"])
        };
        let c = select(&[young_but_unused, old_but_used], &s, NOW, None);
        assert!(c.chosen.is_empty());
        assert_eq!(reason_of(&c, &id(1)).kind(), "CreatedRecently");
        assert_eq!(reason_of(&c, &id(2)).kind(), "UsedRecently");
    }

    #[test]
    fn images_younger_than_the_minimum_age_are_never_chosen() {
        let now = 1_000_000;
        let s = Selector::new(
            &Criteria::default(),
            &Protections {
                min_image_age: 120,
                ..Default::default()
            },
        )
        .unwrap();
        let fresh = Candidate {
            created: Some(now - 30),
            ..cand(1, &["docker.io/library/a:1"])
        };
        let unknown_but_seen_now = Candidate {
            created: None,
            first_seen: now,
            ..cand(2, &["docker.io/library/a:2"])
        };
        let old = Candidate {
            created: Some(now - 120),
            ..cand(3, &["docker.io/library/a:3"])
        };
        let c = select(&[fresh, unknown_but_seen_now, old], &s, now, None);
        assert_eq!(
            chosen_ids(&c),
            [id(3)],
            "exactly the minimum age is old enough"
        );
        assert_eq!(
            reason_of(&c, &id(1)),
            SkipReason::TooNew {
                ago: 30,
                min_age: 120
            }
        );
        assert_eq!(reason_of(&c, &id(2)).kind(), "TooNew");
        assert_eq!(
            reason_of(&c, &id(1)).to_string(),
            "on the node for 30s, less than the agent's minimum image age of 2m"
        );
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let s = selector(Criteria {
            unused_for: Some(i64::MAX),
            older_than: Some(i64::MAX),
            ..Criteria::default()
        });
        let ancient = Candidate {
            created: Some(i64::MIN),
            last_used: Some(i64::MIN),
            ..cand(1, &["docker.io/library/a:1"])
        };
        let future = Candidate {
            created: Some(i64::MAX),
            last_used: Some(i64::MAX),
            ..cand(2, &["docker.io/library/a:2"])
        };
        // i64::MIN is exactly i64::MAX + 1 seconds before 0: old enough.
        let c = select(&[ancient.clone(), future.clone()], &s, 0, None);
        assert_eq!(chosen_ids(&c), [id(1)]);
        assert_eq!(reason_of(&c, &id(2)).kind(), "UsedRecently");
        // A second earlier it is one second short.
        assert!(
            select(std::slice::from_ref(&ancient), &s, -2, None)
                .chosen
                .is_empty()
        );
        let c = select(&[ancient, future], &selector(Criteria::default()), 0, None);
        assert_eq!(chosen_ids(&c), [id(1), id(2)]);
        assert!(c.chosen[0].reason.starts_with("unused for "), "{c:?}");
    }

    #[test]
    fn include_globs_match_any_reference_but_not_bare_ids() {
        let cands = [
            cand(1, &["docker.io/library/nginx:1.25", &id(1)]),
            cand(2, &["docker.io/library/redis:7", "quay.io/x/nginx:2"]),
            cand(3, &["docker.io/library/redis:6"]),
            cand(4, &[&id(4)]),
            cand(5, &[]),
        ];
        let s = selector(Criteria {
            include: strings(&["*/nginx:*"]),
            ..Criteria::default()
        });
        let c = select(&cands, &s, NOW, None);
        assert_eq!(chosen_ids(&c), [id(1), id(2)]);
        for n in [3, 4, 5] {
            assert_eq!(reason_of(&c, &id(n)), SkipReason::NotIncluded);
        }
        // `*` is about repositories: a dangling image (its ID record only) is not included.
        let all = selector(Criteria {
            include: strings(&["*"]),
            ..Criteria::default()
        });
        assert_eq!(
            chosen_ids(&select(&cands, &all, NOW, None)),
            [id(1), id(2), id(3)]
        );
        // Neither is it by an ID glob; only the empty include list takes it.
        let by_id = selector(Criteria {
            include: strings(&["sha256:*"]),
            ..Criteria::default()
        });
        assert!(select(&cands, &by_id, NOW, None).chosen.is_empty());
        assert_eq!(
            select(&cands, &selector(Criteria::default()), NOW, None)
                .chosen
                .len(),
            5
        );
    }

    #[test]
    fn star_crosses_slashes_and_alternatives_work() {
        let cands = [
            cand(1, &["docker.io/library/nginx:1.25"]),
            cand(2, &["localhost:5000/team/app:pr-12"]),
            cand(3, &["ghcr.io/org/tool@sha256:abcd"]),
        ];
        let s = selector(Criteria {
            include: strings(&["docker.io/*", "{localhost:5000,ghcr.io}/**/*:pr-*"]),
            ..Criteria::default()
        });
        let c = select(&cands, &s, NOW, None);
        assert_eq!(chosen_ids(&c), [id(1), id(2)]);
        assert_eq!(reason_of(&c, &id(3)), SkipReason::NotIncluded);
    }

    #[test]
    fn excludes_and_protections_match_any_reference_and_the_id() {
        let agent = "ghcr.io/imagegc/agent:v1";
        let cands = [
            cand(1, &["docker.io/library/nginx:1.25", &id(1)]),
            cand(
                2,
                &[
                    "docker.io/library/nginx:latest",
                    "registry.k8s.io/pause:3.9",
                ],
            ),
            cand(3, &[agent]),
            cand(4, &["docker.io/library/redis:7"]),
            cand(5, &["docker.io/library/busybox:1"]),
        ];
        let protections = Protections {
            exclude: strings(&["registry.k8s.io/pause:*", "ghcr.io/imagegc/*"]),
            ..Default::default()
        };
        let selection = Criteria {
            exclude: strings(&["*:latest", "*:1.25", "docker.io/library/redis*"]),
            ..Criteria::default()
        };
        let s = Selector::new(&selection, &protections).unwrap();
        let c = select(&cands, &s, NOW, None);
        assert_eq!(chosen_ids(&c), [id(5)]);
        assert_eq!(
            reason_of(&c, &id(1)),
            SkipReason::Excluded {
                reference: "docker.io/library/nginx:1.25".into(),
                glob: "*:1.25".into(),
            }
        );
        // The protection is reported before the policy's exclude that also matches.
        assert_eq!(
            reason_of(&c, &id(2)),
            SkipReason::Protected {
                reference: "registry.k8s.io/pause:3.9".into(),
                glob: "registry.k8s.io/pause:*".into(),
            }
        );
        assert_eq!(
            reason_of(&c, &id(3)),
            SkipReason::Protected {
                reference: agent.into(),
                glob: "ghcr.io/imagegc/*".into(),
            }
        );
        assert_eq!(reason_of(&c, &id(4)).kind(), "Excluded");

        // An image can be protected by its ID even without an ID record.
        let short = &id(5)[..12];
        let by_id = Selector::new(
            &Criteria::default(),
            &Protections {
                exclude: vec![format!("{short}*")],
                ..Default::default()
            },
        )
        .unwrap();
        let c = select(&cands[4..], &by_id, NOW, None);
        assert_eq!(
            reason_of(&c, &id(5)),
            SkipReason::Protected {
                reference: id(5),
                glob: format!("{short}*"),
            }
        );
    }

    #[test]
    fn exclude_wins_over_include() {
        let s = selector(Criteria {
            include: strings(&["docker.io/*"]),
            exclude: strings(&["docker.io/library/nginx:*"]),
            ..Criteria::default()
        });
        let c = select(
            &[
                cand(1, &["docker.io/library/nginx:1"]),
                cand(2, &["docker.io/x/y:1"]),
            ],
            &s,
            NOW,
            None,
        );
        assert_eq!(chosen_ids(&c), [id(2)]);
        assert_eq!(reason_of(&c, &id(1)).kind(), "Excluded");
    }

    #[test]
    fn invalid_globs_and_durations_are_errors_before_selecting() {
        let bad = |selection: Criteria, protections: Protections| {
            Selector::new(&selection, &protections).unwrap_err()
        };
        let err = bad(
            Criteria {
                include: strings(&["docker.io/*", "[abc"]),
                ..Criteria::default()
            },
            Protections::default(),
        );
        assert!(
            matches!(&err, PruneError::InvalidGlob { field: "include", glob, .. } if glob == "[abc"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "invalid include glob \"[abc\": unclosed character class; missing ']'"
        );
        let err = bad(
            Criteria {
                exclude: strings(&["a{b"]),
                ..Criteria::default()
            },
            Protections::default(),
        );
        assert!(
            matches!(
                err,
                PruneError::InvalidGlob {
                    field: "exclude",
                    ..
                }
            ),
            "{err:?}"
        );
        let err = bad(
            Criteria::default(),
            Protections {
                exclude: strings(&["ok/*", "[z-a]"]),
                ..Default::default()
            },
        );
        assert!(
            matches!(&err, PruneError::InvalidGlob { field: "protections", reason, .. } if reason.contains("range")),
            "{err:?}"
        );
        let err = bad(
            Criteria {
                include: strings(&[" "]),
                ..Criteria::default()
            },
            Protections::default(),
        );
        assert!(err.to_string().contains("empty"), "{err}");
        let err = bad(
            Criteria {
                older_than: Some(-1),
                ..Criteria::default()
            },
            Protections::default(),
        );
        assert_eq!(
            err,
            PruneError::NegativeDuration {
                field: "olderThan",
                seconds: -1,
            }
        );
        assert_eq!(err.to_string(), "olderThan must not be negative (got -1s)");
        let err = bad(
            Criteria {
                unused_for: Some(-5),
                ..Criteria::default()
            },
            Protections::default(),
        );
        assert!(matches!(
            err,
            PruneError::NegativeDuration {
                field: "unusedFor",
                ..
            }
        ));
        // It is a std error.
        let _: &dyn std::error::Error = &err;
    }

    #[test]
    fn repository_strips_tag_and_digest_but_not_port() {
        let cases = [
            (
                "docker.io/library/nginx:1.25",
                Some("docker.io/library/nginx"),
            ),
            (
                "docker.io/library/nginx@sha256:abc",
                Some("docker.io/library/nginx"),
            ),
            (
                "docker.io/library/nginx:1.25@sha256:abc",
                Some("docker.io/library/nginx"),
            ),
            (
                "localhost:5000/team/app:v1",
                Some("localhost:5000/team/app"),
            ),
            ("localhost:5000/team/app", Some("localhost:5000/team/app")),
            ("localhost:5000/app@sha256:abc", Some("localhost:5000/app")),
            ("docker.io/library/nginx", Some("docker.io/library/nginx")),
            (&id(7), None),
            ("sha256:", Some("sha256")),
            ("sha256:xyz", Some("sha256")),
        ];
        for (reference, expected) in cases {
            assert_eq!(repository(reference), expected, "{reference}");
        }
        assert!(is_id_record(&id(1)));
        assert!(is_id_record("sha256:AbC0"));
        assert!(!is_id_record("sha256:"));
        assert!(!is_id_record("docker.io/library/sha256:abc"));
    }

    /// An image of `refs` created on `day`, used a long time ago.
    fn created(n: u64, day: i64, refs: &[&str]) -> Candidate {
        Candidate {
            created: Some(day * DAY),
            ..cand(n, refs)
        }
    }

    #[test]
    fn keep_newest_per_repository_with_ties_by_id() {
        let cands = [
            created(1, 10, &["docker.io/library/app:1"]),
            created(2, 20, &["docker.io/library/app:2"]),
            created(
                3,
                30,
                &["docker.io/library/app:3", "docker.io/library/app:latest"],
            ),
            // Ties with 2: the smaller ID (2) is the newer.
            created(4, 20, &["docker.io/library/app:4"]),
            created(5, 5, &["docker.io/library/other:1"]),
        ];
        let s = selector(Criteria {
            keep_newest: Some(2),
            ..Criteria::default()
        });
        let c = select(&cands, &s, NOW, None);
        assert_eq!(chosen_ids(&c), [id(1), id(4)]);
        for n in [2, 3] {
            assert_eq!(
                reason_of(&c, &id(n)),
                SkipReason::KeptNewest {
                    repository: "docker.io/library/app".into(),
                    keep: 2,
                }
            );
        }
        assert_eq!(
            reason_of(&c, &id(5)).to_string(),
            "kept as one of the 2 newest of docker.io/library/other"
        );
        // Zero keeps nothing.
        let zero = selector(Criteria {
            keep_newest: Some(0),
            ..Criteria::default()
        });
        assert_eq!(select(&cands, &zero, NOW, None).chosen.len(), 5);
    }

    #[test]
    fn keep_newest_uses_first_seen_when_creation_is_unknown() {
        let cands = [
            Candidate {
                first_seen: 50 * DAY,
                ..cand(1, &["docker.io/library/app:1"])
            },
            created(2, 40, &["docker.io/library/app:2"]),
        ];
        let s = selector(Criteria {
            keep_newest: Some(1),
            ..Criteria::default()
        });
        assert_eq!(chosen_ids(&select(&cands, &s, NOW, None)), [id(2)]);
    }

    #[test]
    fn keep_newest_multi_repository_images_and_ports() {
        let cands = [
            // In both repositories; the newest of `b` only.
            created(1, 50, &["localhost:5000/a:1", "localhost:5000/b:1"]),
            created(2, 60, &["localhost:5000/a:2"]),
            created(3, 40, &["localhost:5000/b:2", "localhost:5000/b@sha256:ff"]),
            // `localhost:5000/a` too, by digest only.
            created(4, 10, &["localhost:5000/a@sha256:ee", &id(4)]),
            // A dangling image belongs to no repository.
            created(5, 99, &[&id(5)]),
        ];
        let s = selector(Criteria {
            keep_newest: Some(1),
            ..Criteria::default()
        });
        let c = select(&cands, &s, NOW, None);
        // Equal last use and size: by ID.
        assert_eq!(chosen_ids(&c), [id(3), id(4), id(5)]);
        assert_eq!(
            reason_of(&c, &id(1)),
            SkipReason::KeptNewest {
                repository: "localhost:5000/b".into(),
                keep: 1,
            }
        );
        assert_eq!(
            reason_of(&c, &id(2)),
            SkipReason::KeptNewest {
                repository: "localhost:5000/a".into(),
                keep: 1,
            }
        );
    }

    #[test]
    fn an_image_counts_once_per_repository() {
        let cands = [
            created(1, 50, &["x.io/b:1", "x.io/b:latest", "x.io/b@sha256:ff"]),
            created(2, 40, &["x.io/b:2"]),
            created(3, 30, &["x.io/b:3"]),
        ];
        let s = selector(Criteria {
            keep_newest: Some(2),
            ..Criteria::default()
        });
        assert_eq!(chosen_ids(&select(&cands, &s, NOW, None)), [id(3)]);
    }

    #[test]
    fn protected_images_count_toward_keep_newest() {
        let cands = [
            Candidate {
                in_use: true,
                ..created(1, 30, &["docker.io/library/app:3"])
            },
            Candidate {
                pinned: true,
                ..created(2, 20, &["docker.io/library/app:2"])
            },
            created(3, 10, &["docker.io/library/app:1"]),
            created(4, 25, &["docker.io/library/app:excluded"]),
        ];
        let s = selector(Criteria {
            keep_newest: Some(2),
            exclude: strings(&["*:excluded"]),
            include: strings(&["*:1", "*:2", "*:3"]),
            ..Criteria::default()
        });
        let c = select(&cands, &s, NOW, None);
        // The in-use and the excluded images are the two newest: image 3 is not kept.
        assert_eq!(chosen_ids(&c), [id(3)]);
        assert_eq!(reason_of(&c, &id(1)), SkipReason::InUse);
        assert_eq!(reason_of(&c, &id(2)), SkipReason::Pinned);
        assert_eq!(reason_of(&c, &id(4)).kind(), "Excluded");
    }

    #[test]
    fn order_is_least_recently_used_then_largest_then_id() {
        let mk = |n: u64, used: i64, size: i64| Candidate {
            last_used: Some(used),
            size,
            ..cand(n, &["docker.io/library/a:1"])
        };
        let cands = [
            mk(1, 50, 10),
            mk(2, 10, 10),
            mk(3, 10, 500),
            mk(4, 30, 99),
            mk(5, 10, 500),
            // No record: last use is first_seen (day 0), the oldest.
            Candidate {
                size: 1,
                ..cand(6, &["docker.io/library/a:1"])
            },
        ];
        let c = select(&cands, &selector(Criteria::default()), NOW, None);
        assert_eq!(chosen_ids(&c), [id(6), id(3), id(5), id(2), id(4), id(1)]);
        assert_eq!(c.bytes, 10 + 10 + 500 + 99 + 500 + 1);
    }

    #[test]
    fn cap_limits_the_run_and_reports_the_rest() {
        let cands: Vec<Candidate> = (1..=5)
            .map(|n| Candidate {
                last_used: Some(n as i64),
                ..cand(n, &["docker.io/library/a:1"])
            })
            .collect();
        let s = selector(Criteria {
            max_images: Some(2),
            ..Criteria::default()
        });
        let c = select(&cands, &s, NOW, None);
        assert_eq!(chosen_ids(&c), [id(1), id(2)]);
        for n in 3..=5 {
            assert_eq!(reason_of(&c, &id(n)), SkipReason::CapReached { max: 2 });
        }
        let zero = selector(Criteria {
            max_images: Some(0),
            ..Criteria::default()
        });
        assert!(select(&cands, &zero, NOW, None).chosen.is_empty());
    }

    #[test]
    fn byte_target_stops_once_reached() {
        let cands: Vec<Candidate> = (1..=4)
            .map(|n| Candidate {
                last_used: Some(n as i64),
                size: 100 * n as i64,
                ..cand(n, &["docker.io/library/a:1"])
            })
            .collect();
        let s = selector(Criteria::default());
        // 100 + 200 = 300 < 301; + 300 = 600 >= 301.
        let c = select(&cands, &s, NOW, Some(301));
        assert_eq!(chosen_ids(&c), [id(1), id(2), id(3)]);
        assert_eq!(c.bytes, 600);
        assert_eq!(
            reason_of(&c, &id(4)),
            SkipReason::TargetReached { target: 301 }
        );
        // Exactly reached: stop there.
        assert_eq!(
            chosen_ids(&select(&cands, &s, NOW, Some(300))),
            [id(1), id(2)]
        );
        // More than there is: everything, and still short.
        let c = select(&cands, &s, NOW, Some(10_000));
        assert_eq!(c.chosen.len(), 4);
        assert_eq!(c.bytes, 1000);
        // Nothing to free, nothing chosen.
        for target in [0, -5] {
            let c = select(&cands, &s, NOW, Some(target));
            assert!(c.chosen.is_empty(), "{target}");
            assert_eq!(c.skipped.len(), 4);
        }
        // The cap applies together with the target.
        let capped = selector(Criteria {
            max_images: Some(1),
            ..Criteria::default()
        });
        assert_eq!(
            chosen_ids(&select(&cands, &capped, NOW, Some(301))),
            [id(1)]
        );
    }

    #[test]
    fn duplicates_are_considered_once() {
        let a = cand(1, &["docker.io/library/a:1"]);
        let c = select(
            &[a.clone(), a.clone()],
            &selector(Criteria::default()),
            NOW,
            None,
        );
        assert_eq!(chosen_ids(&c), [id(1)]);
        assert_eq!(
            c.skipped,
            vec![Kept {
                id: id(1),
                reason: SkipReason::Duplicate,
            }]
        );
    }

    #[test]
    fn chosen_reasons_say_why_in_words() {
        let s = selector(Criteria::default());
        let mk = |created: Option<i64>, last_used: Option<i64>| Candidate {
            created,
            last_used,
            first_seen: NOW - 40 * DAY,
            ..cand(1, &["docker.io/library/a:1"])
        };
        let reason = |c: Candidate| select(&[c], &s, NOW, None).chosen[0].reason.clone();
        assert_eq!(
            reason(mk(Some(NOW - 30 * DAY), Some(NOW - 9 * DAY - 2 * 3600))),
            "unused for 9d 2h, created 30d ago"
        );
        assert_eq!(
            reason(mk(None, Some(NOW - 90))),
            "unused for 1m 30s, first seen 40d ago"
        );
        assert_eq!(
            reason(mk(Some(NOW - 3600), None)),
            "no recorded use since first seen 40d ago, created 1h ago"
        );
        assert_eq!(
            reason(mk(None, None)),
            "no recorded use since first seen 40d ago"
        );
    }

    #[test]
    fn skip_reasons_have_kinds_and_words() {
        let all = [
            (
                SkipReason::Pinned,
                "Pinned",
                "pinned by the container runtime",
            ),
            (SkipReason::InUse, "InUse", "in use by a container"),
            (
                SkipReason::Protected {
                    reference: "registry.k8s.io/pause:3.9".into(),
                    glob: "*pause*".into(),
                },
                "Protected",
                "registry.k8s.io/pause:3.9 matches the agent's protection glob *pause*",
            ),
            (
                SkipReason::Excluded {
                    reference: "docker.io/x/y:1".into(),
                    glob: "docker.io/x/*".into(),
                },
                "Excluded",
                "docker.io/x/y:1 matches the policy's exclude glob docker.io/x/*",
            ),
            (
                SkipReason::NotIncluded,
                "NotIncluded",
                "matches none of the policy's include globs",
            ),
            (
                SkipReason::UsedRecently {
                    ago: 2 * DAY,
                    recorded: true,
                    unused_for: 7 * DAY,
                },
                "UsedRecently",
                "used 2d ago, less than 7d",
            ),
            (
                SkipReason::UsedRecently {
                    ago: 3600,
                    recorded: false,
                    unused_for: DAY,
                },
                "UsedRecently",
                "no recorded use but first seen 1h ago, less than 1d",
            ),
            (
                SkipReason::CreatedRecently {
                    ago: 5 * DAY,
                    known: true,
                    older_than: 30 * DAY,
                },
                "CreatedRecently",
                "created 5d ago, less than 30d",
            ),
            (
                SkipReason::CreatedRecently {
                    ago: 60,
                    known: false,
                    older_than: 120,
                },
                "CreatedRecently",
                "creation unknown but first seen 1m ago, less than 2m",
            ),
            (
                SkipReason::KeptNewest {
                    repository: "docker.io/library/nginx".into(),
                    keep: 3,
                },
                "KeptNewest",
                "kept as one of the 3 newest of docker.io/library/nginx",
            ),
            (
                SkipReason::CapReached { max: 10 },
                "CapReached",
                "the cap of 10 image(s) per run is reached",
            ),
            (
                SkipReason::TargetReached { target: 5000 },
                "TargetReached",
                "the images chosen before free 5000 bytes already",
            ),
            (
                SkipReason::Duplicate,
                "Duplicate",
                "listed twice; considered once",
            ),
        ];
        for (reason, kind, words) in all {
            assert_eq!(reason.kind(), kind);
            assert_eq!(reason.to_string(), words);
        }
    }

    #[test]
    fn skipped_are_sorted_by_id() {
        let cands = [
            Candidate {
                pinned: true,
                ..cand(3, &[])
            },
            Candidate {
                in_use: true,
                ..cand(1, &[])
            },
            Candidate {
                pinned: true,
                ..cand(2, &[])
            },
        ];
        let c = select(&cands, &selector(Criteria::default()), NOW, None);
        let ids: Vec<&str> = c.skipped.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, [id(1), id(2), id(3)]);
    }

    fn usage(used: i64, capacity: i64) -> Usage {
        Usage {
            used_bytes: used,
            capacity_bytes: capacity,
        }
    }

    fn wm(high: u8, low: u8) -> Watermark {
        Watermark {
            high_percent: high,
            low_percent: low,
        }
    }

    #[test]
    fn watermark_fires_at_exactly_high_and_aims_at_low() {
        let w = wm(85, 80);
        assert_eq!(watermark_target(&usage(849, 1000), &w), Ok(None));
        assert_eq!(watermark_target(&usage(850, 1000), &w), Ok(Some(50)));
        assert_eq!(watermark_target(&usage(1000, 1000), &w), Ok(Some(200)));
        // More used than the capacity (e.g. reserved blocks): still a target.
        assert_eq!(watermark_target(&usage(1200, 1000), &w), Ok(Some(400)));
        // Ceil: 85% of 999 is 849.15, so 850 fires; 80% of 999 is 799.2: keep 799, free 51.
        assert_eq!(watermark_target(&usage(849, 999), &w), Ok(None));
        assert_eq!(watermark_target(&usage(850, 999), &w), Ok(Some(51)));
        // Low 0 frees everything; high 100 fires only when full.
        assert_eq!(
            watermark_target(&usage(900, 1000), &wm(90, 0)),
            Ok(Some(900))
        );
        assert_eq!(watermark_target(&usage(999, 1000), &wm(100, 99)), Ok(None));
        assert_eq!(
            watermark_target(&usage(1000, 1000), &wm(100, 99)),
            Ok(Some(10))
        );
        // Huge filesystems do not overflow.
        assert_eq!(
            watermark_target(&usage(i64::MAX, i64::MAX), &wm(90, 50)),
            Ok(Some(i64::MAX - i64::MAX / 2))
        );
    }

    #[test]
    fn watermark_without_data_never_fires() {
        let w = wm(85, 80);
        assert_eq!(watermark_target(&usage(0, 0), &w), Ok(None));
        assert_eq!(watermark_target(&usage(500, 0), &w), Ok(None));
        assert_eq!(watermark_target(&usage(500, -1), &w), Ok(None));
        assert_eq!(watermark_target(&usage(-1, 1000), &w), Ok(None));
        assert_eq!(watermark_target(&usage(0, 1000), &w), Ok(None));
    }

    #[test]
    fn invalid_watermarks_are_errors() {
        for (high, low) in [(80, 80), (80, 90), (101, 50), (0, 0), (255, 0)] {
            let err = watermark_target(&usage(100, 100), &wm(high, low)).unwrap_err();
            assert_eq!(err, PruneError::InvalidWatermark { high, low });
            assert_eq!(validate_watermark(&wm(high, low)), Err(err));
        }
        assert_eq!(
            PruneError::InvalidWatermark { high: 80, low: 90 }.to_string(),
            "invalid watermarks high 80% low 90%: need low < high <= 100"
        );
        for (high, low) in [(100, 0), (1, 0), (100, 99), (85, 80)] {
            assert_eq!(validate_watermark(&wm(high, low)), Ok(()));
        }
    }

    #[test]
    fn human_durations() {
        let cases = [
            (0, "0s"),
            (1, "1s"),
            (59, "59s"),
            (60, "1m"),
            (90, "1m 30s"),
            (3600, "1h"),
            (3661, "1h 1m"),
            (DAY, "1d"),
            (9 * DAY + 2 * 3600 + 5 * 60 + 7, "9d 2h"),
            (9 * DAY + 5 * 60, "9d"),
            (400 * DAY, "400d"),
            (-90, "-1m 30s"),
        ];
        for (secs, words) in cases {
            assert_eq!(human_duration(secs), words, "{secs}");
        }
        assert!(human_duration(i64::MIN).starts_with('-'));
        assert!(human_duration(i64::MAX).ends_with('h'));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const REPOS: [&str; 4] = [
            "docker.io/library/app0",
            "docker.io/library/app1",
            "localhost:5000/app2",
            "localhost:5000/app3",
        ];
        /// Policy excludes: a prefix and a suffix form.
        const EXCLUDES: [&str; 2] = ["docker.io/library/app1*", "*:v3"];
        /// Agent protections.
        const PROTECTED: [&str; 1] = ["localhost:5000/app2:v0*"];
        /// Includes.
        const INCLUDES: [&str; 2] = ["localhost:5000/*", "*:v1"];

        /// The glob forms used here, matched by hand: `prefix*` or `*suffix`.
        fn oracle(glob: &str, name: &str) -> bool {
            match (glob.strip_prefix('*'), glob.strip_suffix('*')) {
                (Some(suffix), _) => name.ends_with(suffix),
                (None, Some(prefix)) => name.starts_with(prefix),
                (None, None) => glob == name,
            }
        }

        fn reference(r: u8) -> String {
            let repo = REPOS[(r % 4) as usize];
            if r >= 24 {
                format!("{repo}@sha256:{r:064x}")
            } else {
                format!("{repo}:v{}", r / 4)
            }
        }

        fn gen_candidate(n: usize) -> impl Strategy<Value = Candidate> {
            (
                proptest::collection::btree_set(0u8..28, 0..3),
                any::<bool>(),
                0i64..500,
                proptest::option::of(0i64..100),
                proptest::option::of(0i64..100),
                0i64..100,
                proptest::bool::weighted(0.15),
                proptest::bool::weighted(0.15),
            )
                .prop_map(
                    move |(
                        refs,
                        id_record,
                        size,
                        created,
                        last_used,
                        first_seen,
                        pinned,
                        in_use,
                    )| {
                        let mut references: Vec<String> = refs.into_iter().map(reference).collect();
                        if id_record {
                            references.push(id(n as u64));
                        }
                        Candidate {
                            id: id(n as u64),
                            references,
                            size,
                            created,
                            last_used,
                            first_seen,
                            pinned,
                            in_use,
                        }
                    },
                )
        }

        fn gen_candidates() -> impl Strategy<Value = Vec<Candidate>> {
            (0usize..14).prop_flat_map(|len| (0..len).map(gen_candidate).collect::<Vec<_>>())
        }

        fn subset(pool: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
            proptest::sample::subsequence(pool, 0..=pool.len())
                .prop_map(|v| v.into_iter().map(String::from).collect())
        }

        fn gen_selection() -> impl Strategy<Value = (Criteria, Protections)> {
            (
                proptest::option::of(0i64..60),
                proptest::option::of(0i64..60),
                subset(&INCLUDES),
                subset(&EXCLUDES),
                subset(&PROTECTED),
                proptest::option::of(0u32..3),
                proptest::option::of(0u32..6),
            )
                .prop_map(
                    |(unused_for, older_than, include, exclude, protected, keep_newest, max)| {
                        (
                            Criteria {
                                unused_for,
                                older_than,
                                include,
                                exclude,
                                keep_newest,
                                max_images: max,
                            },
                            Protections {
                                exclude: protected,
                                ..Default::default()
                            },
                        )
                    },
                )
        }

        /// The time every property selects at.
        const T: i64 = 100;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn selection_respects_every_rule(
                cands in gen_candidates(),
                (selection, protections) in gen_selection(),
                target in proptest::option::of(0i64..1500),
            ) {
                let s = Selector::new(&selection, &protections).unwrap();
                let c = select(&cands, &s, T, target);
                let by_id: BTreeMap<&str, &Candidate> =
                    cands.iter().map(|c| (c.id.as_str(), c)).collect();

                // Every candidate is accounted for exactly once; chosen is a subset.
                let mut seen: Vec<&str> = c
                    .chosen
                    .iter()
                    .map(|x| x.id.as_str())
                    .chain(c.skipped.iter().map(|x| x.id.as_str()))
                    .collect();
                seen.sort_unstable();
                let mut all: Vec<&str> = by_id.keys().copied().collect();
                all.sort_unstable();
                prop_assert_eq!(seen, all);

                let mut total = 0i64;
                for x in &c.chosen {
                    let img = by_id[x.id.as_str()];
                    total += img.size;
                    prop_assert_eq!(&x.references, &img.references);
                    prop_assert_eq!(x.size, img.size);
                    prop_assert!(!img.pinned && !img.in_use, "protected image chosen: {:?}", img);
                    let names: Vec<&String> =
                        img.references.iter().chain(std::iter::once(&img.id)).collect();
                    for g in selection.exclude.iter().chain(&protections.exclude) {
                        prop_assert!(
                            !names.iter().any(|n| oracle(g, n)),
                            "{} chosen although it matches {}", img.id, g
                        );
                    }
                    if !selection.include.is_empty() {
                        prop_assert!(img.references.iter().any(|r| {
                            !is_id_record(r) && selection.include.iter().any(|g| oracle(g, r))
                        }), "{} chosen but not included", img.id);
                    }
                    if let Some(u) = selection.unused_for {
                        prop_assert!(img.last_use() <= T - u);
                    }
                    if let Some(o) = selection.older_than {
                        prop_assert!(img.creation() <= T - o);
                    }
                }
                prop_assert_eq!(c.bytes, total);

                // Cap, and the byte target reached with no image to spare.
                if let Some(max) = selection.max_images {
                    prop_assert!(c.chosen.len() <= max as usize);
                }
                if let Some(t) = target {
                    let before_last = total - c.chosen.last().map_or(0, |x| x.size);
                    prop_assert!(c.chosen.is_empty() || before_last < t);
                    let stopped = c.skipped.iter().any(|x| x.reason.kind() == "TargetReached");
                    prop_assert!(!stopped || total >= t);
                }

                // Removal order: least recently used, largest, ID.
                let keys: Vec<(i64, Reverse<i64>, &str)> = c
                    .chosen
                    .iter()
                    .map(|x| {
                        let img = by_id[x.id.as_str()];
                        (img.last_use(), Reverse(img.size), img.id.as_str())
                    })
                    .collect();
                prop_assert!(keys.windows(2).all(|w| w[0] < w[1]), "{:?}", keys);

                // The N newest of every repository stay.
                if let Some(n) = selection.keep_newest {
                    for repo in REPOS {
                        let mut members: Vec<&Candidate> = cands
                            .iter()
                            .filter(|c| c.references.iter().any(|r| repository(r) == Some(repo)))
                            .collect();
                        members.sort_by_key(|c| (Reverse(c.creation()), c.id.clone()));
                        for m in members.iter().take(n as usize) {
                            prop_assert!(
                                !c.chosen.iter().any(|x| x.id == m.id),
                                "{} is among the {} newest of {}", m.id, n, repo
                            );
                        }
                    }
                }
            }

            #[test]
            fn selection_does_not_depend_on_input_order(
                (cands, shuffled) in gen_candidates()
                    .prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
                (selection, protections) in gen_selection(),
                target in proptest::option::of(0i64..1500),
            ) {
                let s = Selector::new(&selection, &protections).unwrap();
                prop_assert_eq!(select(&cands, &s, T, target), select(&shuffled, &s, T, target));
            }

            #[test]
            fn watermark_target_is_the_least_that_reaches_low(
                capacity in 1i64..=i64::MAX,
                used_fraction in 0u32..=1200,
                (high, low) in (1u8..=100).prop_flat_map(|h| (Just(h), 0..h)),
            ) {
                let used = i64::try_from(
                    i128::from(capacity) * i128::from(used_fraction) / 1000,
                ).unwrap_or(i64::MAX);
                let u = usage(used, capacity);
                let (used, cap) = (i128::from(used), i128::from(capacity));
                match watermark_target(&u, &wm(high, low)).unwrap() {
                    None => prop_assert!(used * 100 < i128::from(high) * cap),
                    Some(f) => {
                        let f = i128::from(f);
                        prop_assert!(used * 100 >= i128::from(high) * cap);
                        prop_assert!(f > 0 && f <= used);
                        prop_assert!((used - f) * 100 <= i128::from(low) * cap);
                        prop_assert!((used - f + 1) * 100 > i128::from(low) * cap);
                    }
                }
            }
        }
    }
}
