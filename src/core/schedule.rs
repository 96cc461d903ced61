//! When a policy runs on a node: its cron schedule (UTC, standard 5-field syntax), each node's
//! fixed offset after the scheduled minute (so 5,000 nodes do not prune in the same second).
//! Pure: times are Unix seconds and
//! "now" is a parameter.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::Cron;

/// A parsed cron schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
}

/// Why a schedule cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// Neither 5 fields nor a macro.
    #[error(
        "schedule {expr:?} has {fields} fields; write 5 (minute hour day-of-month month day-of-week, e.g. \"0 3 * * *\") or a macro such as @daily"
    )]
    Fields {
        /// The schedule as written (trimmed).
        expr: String,
        /// How many fields it has.
        fields: usize,
    },
    /// 5 fields that are not valid cron.
    #[error("schedule {expr:?} is not valid cron: {reason}")]
    Cron {
        /// The schedule as written (trimmed).
        expr: String,
        /// What the cron parser said.
        reason: String,
    },
}

/// The macros a schedule may be instead of 5 fields.
const MACROS: [&str; 6] = [
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@hourly",
];

impl Schedule {
    /// Parses `minute hour day-of-month month day-of-week` (as Kubernetes CronJobs and crontab
    /// do: day-of-week 0 or 7 is Sunday; when both day fields are restricted, either matches)
    /// or one of `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`, `@annually`. Times
    /// are UTC.
    pub fn parse(expr: &str) -> Result<Schedule, ScheduleError> {
        let expr = expr.trim();
        let fields = expr.split_whitespace().count();
        let is_macro = MACROS.contains(&expr);
        if !is_macro && fields != 5 {
            return Err(ScheduleError::Fields {
                expr: expr.to_string(),
                fields,
            });
        }
        let cron = Cron::from_str(expr).map_err(|e| ScheduleError::Cron {
            expr: expr.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Schedule { cron })
    }

    /// The first scheduled time strictly after `after`, if any (an impossible date such as
    /// `0 0 30 2 *` has none).
    pub fn next_after(&self, after: i64) -> Option<i64> {
        let t: DateTime<Utc> = DateTime::from_timestamp(after, 0)?;
        self.cron
            .find_next_occurrence(&t, false)
            .ok()
            .map(|t| t.timestamp())
    }
}

/// This node's fixed offset (seconds) after every scheduled time of a policy: a hash of the
/// node's name and the policy's UID, spread evenly over `[0, window)`. Stable across agent
/// restarts, different between nodes, and 0 when `window` is 0 or less.
pub fn jitter(node: &str, policy_uid: &str, window: i64) -> i64 {
    if window <= 0 {
        return 0;
    }
    // FNV-1a (64 bit): stable across versions and platforms, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node.bytes().chain([0]).chain(policy_uid.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % window as u64) as i64
}

/// The window a node's jitter is drawn from for the tick at `tick`: `max_jitter`, but at most
/// half the gap to the following tick, so a run never slides past the next one.
pub fn jitter_window(schedule: &Schedule, tick: i64, max_jitter: i64) -> i64 {
    match schedule.next_after(tick) {
        Some(following) => max_jitter.min((following - tick) / 2).max(0),
        None => max_jitter.max(0),
    }
}

/// When this node next runs a scheduled policy: the first tick after `last` (the previous
/// run's tick, or when the agent started following the policy), plus the node's jitter.
/// `None` when the schedule has no next tick.
pub fn next_run(
    schedule: &Schedule,
    last: i64,
    node: &str,
    policy_uid: &str,
    max_jitter: i64,
) -> Option<(i64, i64)> {
    let tick = schedule.next_after(last)?;
    let window = jitter_window(schedule, tick, max_jitter);
    Some((tick, tick + jitter(node, policy_uid, window)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2027-01-15 08:00:00 UTC, a Friday.
    const FRI_8AM: i64 = 1_800_000_000;
    const MIN: i64 = 60;
    const HOUR: i64 = 3_600;
    const DAY: i64 = 86_400;

    #[test]
    fn five_fields_and_macros_parse_in_utc() {
        let daily = Schedule::parse("0 3 * * *").unwrap();
        assert_eq!(daily.next_after(FRI_8AM), Some(FRI_8AM + 19 * HOUR));
        let every_minute = Schedule::parse("* * * * *").unwrap();
        assert_eq!(every_minute.next_after(FRI_8AM), Some(FRI_8AM + MIN));
        assert_eq!(every_minute.next_after(FRI_8AM + 1), Some(FRI_8AM + MIN));
        let hourly = Schedule::parse("@hourly").unwrap();
        assert_eq!(hourly.next_after(FRI_8AM), Some(FRI_8AM + HOUR));
        let midnight = Schedule::parse("@daily").unwrap();
        assert_eq!(midnight.next_after(FRI_8AM), Some(FRI_8AM + 16 * HOUR));
        let steps = Schedule::parse("*/15 * * * *").unwrap();
        assert_eq!(steps.next_after(FRI_8AM), Some(FRI_8AM + 15 * MIN));
    }

    #[test]
    fn day_of_week_counts_from_sunday_as_zero() {
        // Monday is 1, as in crontab (some cron crates count Sunday as 1).
        let monday = Schedule::parse("0 3 * * 1").unwrap();
        assert_eq!(
            monday.next_after(FRI_8AM),
            Some(FRI_8AM + 3 * DAY - 5 * HOUR)
        );
        let sunday0 = Schedule::parse("0 3 * * 0").unwrap();
        let sunday7 = Schedule::parse("0 3 * * 7").unwrap();
        assert_eq!(
            sunday0.next_after(FRI_8AM),
            Some(FRI_8AM + 2 * DAY - 5 * HOUR)
        );
        assert_eq!(sunday0.next_after(FRI_8AM), sunday7.next_after(FRI_8AM));
    }

    #[test]
    fn bad_schedules_are_errors_that_say_why() {
        for bad in [
            "",
            "* * * *",
            "0 * * * * *",
            "0 0 0 * * * *",
            "61 * * * *",
            "a b c d e",
            "@midnight",
        ] {
            let e = Schedule::parse(bad).unwrap_err().to_string();
            assert!(e.contains("schedule"), "{bad:?}: {e}");
        }
        assert!(
            Schedule::parse("0 * * * * *")
                .unwrap_err()
                .to_string()
                .contains("6 fields")
        );
    }

    #[test]
    fn an_impossible_date_has_no_next_tick() {
        let never = Schedule::parse("0 0 30 2 *").unwrap();
        assert_eq!(never.next_after(FRI_8AM), None);
        assert_eq!(next_run(&never, FRI_8AM, "n", "u", 60), None);
    }

    #[test]
    fn jitter_is_stable_bounded_and_spread() {
        assert_eq!(jitter("node-1", "uid", 0), 0);
        assert_eq!(jitter("node-1", "uid", -5), 0);
        assert_eq!(jitter("node-1", "uid", 300), jitter("node-1", "uid", 300));
        let window = 300;
        let mut buckets = [0u32; 10];
        for n in 0..5000 {
            let j = jitter(&format!("node-{n}"), "policy-uid", window);
            assert!((0..window).contains(&j));
            buckets[(j * 10 / window) as usize] += 1;
        }
        // 5,000 nodes over 10 buckets of 30 s: each within 20 % of the mean (500).
        assert!(
            buckets.iter().all(|b| (400..=600).contains(b)),
            "{buckets:?}"
        );
        // Another policy gives the same node another offset (most of the time).
        let differ = (0..100)
            .filter(|n| {
                let node = format!("node-{n}");
                jitter(&node, "a", window) != jitter(&node, "b", window)
            })
            .count();
        assert!(differ > 90, "{differ}");
    }

    #[test]
    fn the_window_never_reaches_the_next_tick() {
        let every_minute = Schedule::parse("* * * * *").unwrap();
        assert_eq!(jitter_window(&every_minute, FRI_8AM, 300), 30);
        assert_eq!(jitter_window(&every_minute, FRI_8AM, 10), 10);
        assert_eq!(jitter_window(&every_minute, FRI_8AM, 0), 0);
        let daily = Schedule::parse("0 3 * * *").unwrap();
        assert_eq!(jitter_window(&daily, FRI_8AM, 300), 300);
    }

    #[test]
    fn next_run_is_the_next_tick_plus_this_nodes_jitter() {
        let daily = Schedule::parse("0 3 * * *").unwrap();
        let (tick, at) = next_run(&daily, FRI_8AM, "node-7", "uid-1", 300).unwrap();
        assert_eq!(tick, FRI_8AM + 19 * HOUR);
        assert_eq!(at, tick + jitter("node-7", "uid-1", 300));
        // After running at `at`, the next run is the following day's tick, same offset.
        let (tick2, at2) = next_run(&daily, at, "node-7", "uid-1", 300).unwrap();
        assert_eq!(tick2, tick + DAY);
        assert_eq!(at2 - tick2, at - tick);
    }
}
