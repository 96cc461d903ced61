//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Every replica reads the Lease each period. The holder renews it; the others take it over
//! when it is absent, released (no holder), or has not changed for its lease duration *as
//! observed by this replica's own clock* — never by comparing `renewTime` with the local wall
//! clock, so clock skew between nodes cannot make two leaders. Every write carries the
//! resourceVersion that was read, so of two replicas racing for it exactly one wins.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};

use super::ControllerError;

/// What a replica does with the Lease it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The Lease does not exist: create it, holding it.
    Create,
    /// It is free or expired: take it over.
    Acquire,
    /// This replica holds it: renew it.
    Renew,
    /// Another replica holds it and renews it: wait.
    Wait,
}

/// Decides the step for `identity`, given the Lease (if any) and how long its content has
/// stayed unchanged as this replica observed it.
pub fn decide(
    lease: Option<&LeaseSpec>,
    identity: &str,
    unchanged_for: Duration,
    default_duration: Duration,
) -> Step {
    let Some(spec) = lease else {
        return Step::Create;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => Step::Acquire,
        Some(holder) if holder == identity => Step::Renew,
        Some(_) => {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(default_duration);
            if unchanged_for >= duration {
                Step::Acquire
            } else {
                Step::Wait
            }
        }
    }
}

/// One replica's view of the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The resourceVersion last read, and when it was first seen.
    observed: Option<(String, Instant)>,
}

impl Elector {
    /// An elector for Lease `name` in `api`'s namespace, as `identity`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Elector {
        Elector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
            observed: None,
        }
    }

    /// `namespace/name` of the Lease, for messages.
    pub fn lease(&self) -> String {
        format!("{}/{}", self.api.namespace().unwrap_or_default(), self.name)
    }

    /// Reads the Lease once and creates, takes over or renews it when this replica may.
    /// Returns whether this replica holds the Lease afterwards.
    pub async fn try_lead(&mut self) -> Result<bool, ControllerError> {
        // A conflict means someone wrote in between: read again and decide again, once.
        for _ in 0..2 {
            match self.attempt().await {
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(source) => {
                    return Err(ControllerError::Lease {
                        lease: self.lease(),
                        source,
                    });
                }
                Ok(held) => return Ok(held),
            }
        }
        Ok(false)
    }

    async fn attempt(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let current = self.api.get_opt(&self.name).await?;
        let unchanged_for = match &current {
            None => Duration::ZERO,
            Some(lease) => self.observe(lease.metadata.resource_version.clone()),
        };
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        match decide(spec, &self.identity, unchanged_for, self.duration) {
            Step::Wait => Ok(false),
            Step::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.held_spec(None, now)),
                };
                self.api.create(&PostParams::default(), &lease).await?;
                Ok(true)
            }
            Step::Acquire | Step::Renew => {
                let mut lease = current.unwrap_or_default();
                let previous = lease.spec.take().unwrap_or_default();
                lease.spec = Some(
                    if previous.holder_identity.as_deref() == Some(&self.identity) {
                        LeaseSpec {
                            renew_time: Some(now),
                            lease_duration_seconds: Some(seconds(self.duration)),
                            ..previous
                        }
                    } else {
                        self.held_spec(Some(&previous), now)
                    },
                );
                let written = self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await?;
                self.observe(written.metadata.resource_version);
                Ok(true)
            }
        }
    }

    /// The spec of a Lease this replica just took.
    fn held_spec(&self, previous: Option<&LeaseSpec>, now: MicroTime) -> LeaseSpec {
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(seconds(self.duration)),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(if previous.is_some() {
                transitions.saturating_add(1)
            } else {
                transitions
            }),
            ..Default::default()
        }
    }

    /// Records the resourceVersion read; returns how long it has been unchanged.
    fn observe(&mut self, version: Option<String>) -> Duration {
        let version = version.unwrap_or_default();
        match &self.observed {
            Some((seen, since)) if *seen == version => since.elapsed(),
            _ => {
                self.observed = Some((version, Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// Gives the Lease up (clears the holder) if this replica holds it, so that a standby
    /// takes over at its next poll instead of after the lease duration.
    pub async fn release(&mut self) -> Result<(), ControllerError> {
        let result: Result<(), kube::Error> = async {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(());
            };
            if spec.holder_identity.as_deref() != Some(&self.identity) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await?;
            Ok(())
        }
        .await;
        match result {
            // Someone else wrote it: it is not ours to release any more.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(source) => Err(ControllerError::Lease {
                lease: self.lease(),
                source,
            }),
            Ok(()) => Ok(()),
        }
    }
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    fn held_by(holder: Option<&str>, duration: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            lease_duration_seconds: duration,
            ..Default::default()
        }
    }

    #[test]
    fn absent_lease_is_created() {
        assert_eq!(decide(None, "me", Duration::ZERO, D), Step::Create);
    }

    #[test]
    fn released_lease_is_taken_at_once() {
        for holder in [None, Some("")] {
            let spec = held_by(holder, Some(1));
            assert_eq!(decide(Some(&spec), "me", Duration::ZERO, D), Step::Acquire);
        }
    }

    #[test]
    fn own_lease_is_renewed() {
        let spec = held_by(Some("me"), Some(15));
        assert_eq!(decide(Some(&spec), "me", Duration::ZERO, D), Step::Renew);
        assert_eq!(
            decide(Some(&spec), "me", Duration::from_secs(99), D),
            Step::Renew
        );
    }

    #[test]
    fn others_lease_is_taken_only_after_it_stopped_changing_for_its_duration() {
        let spec = held_by(Some("other"), Some(10));
        let wait = Duration::from_secs(9);
        assert_eq!(decide(Some(&spec), "me", wait, D), Step::Wait);
        let expired = Duration::from_secs(10);
        assert_eq!(decide(Some(&spec), "me", expired, D), Step::Acquire);
        // Without a duration on the Lease, this replica's own applies.
        let spec = held_by(Some("other"), None);
        assert_eq!(decide(Some(&spec), "me", expired, D), Step::Wait);
        assert_eq!(decide(Some(&spec), "me", D, D), Step::Acquire);
    }
}
