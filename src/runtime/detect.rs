//! Finding the runtime: the known socket paths, one probe per socket (which APIs answer, each
//! call bounded by [`super::PROBE_TIMEOUT`]), and the choice among the answers. The path list
//! and the choice are pure; only [`probe`] talks to a socket.

use std::fmt;
use std::path::{Path, PathBuf};

use super::{Backend, PROBE_TIMEOUT, RuntimeError};

/// A socket where a distribution puts its runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownSocket {
    /// The path on the node.
    pub path: &'static str,
    /// Whose it is.
    pub owner: &'static str,
}

/// The known sockets, in the order they are preferred when several answer.
pub const KNOWN_SOCKETS: &[KnownSocket] = &[
    KnownSocket {
        path: "/run/containerd/containerd.sock",
        owner: "containerd",
    },
    KnownSocket {
        path: "/run/k3s/containerd/containerd.sock",
        owner: "k3s or RKE2 (containerd)",
    },
    KnownSocket {
        path: "/var/snap/microk8s/common/run/containerd.sock",
        owner: "microk8s (containerd)",
    },
    KnownSocket {
        path: "/run/k0s/containerd.sock",
        owner: "k0s (containerd)",
    },
    KnownSocket {
        path: "/var/run/crio/crio.sock",
        owner: "CRI-O",
    },
];

/// Whose socket `path` is, if it is a known one.
pub fn owner(path: &Path) -> Option<&'static str> {
    KNOWN_SOCKETS
        .iter()
        .find(|k| Path::new(k.path) == path)
        .map(|k| k.owner)
}

/// The API a backend will use on a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Api {
    /// containerd's own API (its version).
    Containerd {
        /// `containerd --version` as the daemon reports it.
        version: String,
    },
    /// The CRI API (the runtime's name and version).
    Cri {
        /// `cri-o 1.34.0`, `containerd v2.2.9`, …
        runtime: String,
    },
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Api::Containerd { version } => write!(f, "containerd API ({version})"),
            Api::Cri { runtime } => write!(f, "CRI API ({runtime})"),
        }
    }
}

/// What one socket answered.
#[derive(Debug)]
pub struct Probe {
    /// The socket.
    pub socket: PathBuf,
    /// Why it could not be talked to at all, or what each API said.
    pub outcome: Result<Answers, RuntimeError>,
}

/// Each API's answer on a reachable socket: its version, or why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answers {
    /// containerd's Version service (not asked when only CRI was wanted).
    pub containerd: Result<String, String>,
    /// CRI's `RuntimeService/Version` (not asked when only containerd was wanted).
    pub cri: Result<String, String>,
}

/// What detection chose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The socket.
    pub socket: PathBuf,
    /// The API to use on it.
    pub api: Api,
    /// Why, in words (for the log).
    pub why: String,
}

/// The API `backend` uses on a socket that gave `answers`, or why none. `detecting`: the
/// socket is one of the known ones, not given by the user, so an `auto` choice also requires
/// CRI to answer — a containerd without CRI (Docker's, say) is not the one Kubernetes uses.
pub fn api_for(answers: &Answers, backend: Backend, detecting: bool) -> Result<Api, String> {
    let containerd = || {
        answers
            .containerd
            .clone()
            .map(|version| Api::Containerd { version })
    };
    let cri = || answers.cri.clone().map(|runtime| Api::Cri { runtime });
    match backend {
        Backend::Containerd => containerd().map_err(|e| format!("no containerd API: {e}")),
        Backend::Cri => cri().map_err(|e| format!("no CRI API: {e}")),
        Backend::Auto => match (containerd(), cri()) {
            (Ok(_), Err(e)) if detecting => Err(format!(
                "containerd without the CRI API ({e}): not Kubernetes' runtime"
            )),
            (Ok(api), _) => Ok(api),
            (Err(_), Ok(api)) => Ok(api),
            (Err(c), Err(e)) => Err(format!("no containerd API ({c}) and no CRI API ({e})")),
        },
    }
}

/// The API to use on a socket the user named, or an error that says what it is instead.
pub fn accept(probe: Probe, backend: Backend) -> Result<Api, RuntimeError> {
    let answers = probe.outcome?;
    api_for(&answers, backend, false).map_err(|reason| RuntimeError::WrongApi {
        socket: probe.socket,
        wanted: match backend {
            Backend::Containerd => "containerd's API",
            Backend::Cri => "the CRI API",
            Backend::Auto => "containerd's API or the CRI API",
        },
        reason,
        hint: match backend {
            Backend::Containerd => "for CRI-O or another CRI runtime use --runtime cri",
            _ => "is this a container runtime's socket?",
        },
    })
}

/// The first of `probes` (in [`KNOWN_SOCKETS`] order) that `backend` can use, with why; or
/// an error listing every path and why it was not taken.
pub fn choose(probes: Vec<Probe>, backend: Backend) -> Result<Choice, RuntimeError> {
    let mut taken: Option<(PathBuf, Api)> = None;
    let mut others: Vec<String> = Vec::new();
    for probe in probes {
        let verdict = match probe.outcome {
            Ok(answers) => api_for(&answers, backend, true),
            Err(e) => Err(short_reason(&e)),
        };
        let label = probe.socket.display().to_string();
        match verdict {
            Ok(api) if taken.is_none() => taken = Some((probe.socket, api)),
            Ok(api) => others.push(format!("{label}: also answers ({api}), not used")),
            Err(reason) => others.push(format!("{label}: {reason}")),
        }
    }
    let Some((socket, api)) = taken else {
        return Err(RuntimeError::NotFound {
            tried: others.join("; "),
        });
    };
    let whose = owner(&socket).unwrap_or("a runtime");
    let mut why = format!("no --socket given; the first known socket that answers is {whose}'s");
    if !others.is_empty() {
        why.push_str(&format!(" (others: {})", others.join("; ")));
    }
    Ok(Choice { socket, api, why })
}

/// A socket-level failure in a few words, for the list of paths tried.
fn short_reason(e: &RuntimeError) -> String {
    match e {
        RuntimeError::SocketMissing(_) => "does not exist".into(),
        RuntimeError::PermissionDenied(_) => "permission denied".into(),
        RuntimeError::Timeout { after, .. } => format!("no answer within {}s", after.as_secs()),
        RuntimeError::Connect { reason, .. } => format!("cannot connect ({reason})"),
        other => other.to_string(),
    }
}

/// Asks `socket` which APIs it serves: containerd's Version (unless `backend` is CRI) and
/// CRI's Version (unless it is containerd), each bounded by [`PROBE_TIMEOUT`]. A socket that
/// accepts but does not answer is a [`RuntimeError::Timeout`], never a hang.
pub async fn probe(socket: &Path, backend: Backend) -> Probe {
    let outcome = async {
        let channel = super::channel(socket).await?;
        let timeout = |_: tokio::time::error::Elapsed| RuntimeError::Timeout {
            socket: socket.into(),
            after: PROBE_TIMEOUT,
        };
        let containerd = match backend {
            Backend::Cri => Err("not asked".to_string()),
            _ => tokio::time::timeout(PROBE_TIMEOUT, containerd_version(channel.clone()))
                .await
                .map_err(timeout)?,
        };
        let cri = match backend {
            Backend::Containerd => Err("not asked".to_string()),
            _ => tokio::time::timeout(PROBE_TIMEOUT, cri_version(channel))
                .await
                .map_err(timeout)?,
        };
        Ok(Answers { containerd, cri })
    }
    .await;
    Probe {
        socket: socket.into(),
        outcome,
    }
}

async fn containerd_version(channel: tonic::transport::Channel) -> Result<String, String> {
    use containerd_client::services::v1::version_client::VersionClient;
    VersionClient::new(channel)
        .version(())
        .await
        .map(|r| r.into_inner().version)
        .map_err(|s| status_words(&s))
}

async fn cri_version(channel: tonic::transport::Channel) -> Result<String, String> {
    use k8s_cri::v1::VersionRequest;
    use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
    RuntimeServiceClient::new(channel)
        .version(VersionRequest {
            version: String::new(),
        })
        .await
        .map(|r| {
            let v = r.into_inner();
            format!("{} {}", v.runtime_name, v.runtime_version)
        })
        .map_err(|s| status_words(&s))
}

fn status_words(s: &tonic::Status) -> String {
    match s.code() {
        tonic::Code::Unimplemented => "not served".into(),
        code => format!("{code:?}: {}", s.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(containerd: Option<&str>, cri: Option<&str>) -> Answers {
        let a = |v: Option<&str>| {
            v.map(str::to_string)
                .ok_or_else(|| "not served".to_string())
        };
        Answers {
            containerd: a(containerd),
            cri: a(cri),
        }
    }

    fn probe_of(path: &str, outcome: Result<Answers, RuntimeError>) -> Probe {
        Probe {
            socket: path.into(),
            outcome,
        }
    }

    fn missing(path: &str) -> Probe {
        probe_of(path, Err(RuntimeError::SocketMissing(path.into())))
    }

    fn known(i: usize) -> &'static str {
        KNOWN_SOCKETS[i].path
    }

    #[test]
    fn the_known_paths_are_those_of_each_distribution_containerd_first() {
        let paths: Vec<&str> = KNOWN_SOCKETS.iter().map(|k| k.path).collect();
        assert_eq!(
            paths,
            [
                "/run/containerd/containerd.sock",
                "/run/k3s/containerd/containerd.sock",
                "/var/snap/microk8s/common/run/containerd.sock",
                "/run/k0s/containerd.sock",
                "/var/run/crio/crio.sock",
            ]
        );
        assert_eq!(owner(Path::new(known(4))), Some("CRI-O"));
        assert_eq!(owner(Path::new("/tmp/x.sock")), None);
    }

    #[test]
    fn auto_takes_containerd_api_where_it_answers_else_cri() {
        let both = answers(Some("v2.2.9"), Some("containerd v2.2.9"));
        assert_eq!(
            api_for(&both, Backend::Auto, true),
            Ok(Api::Containerd {
                version: "v2.2.9".into()
            })
        );
        let crio = answers(None, Some("cri-o 1.34.0"));
        assert_eq!(
            api_for(&crio, Backend::Auto, true),
            Ok(Api::Cri {
                runtime: "cri-o 1.34.0".into()
            })
        );
        // --runtime cri on containerd's socket: its CRI plugin.
        assert!(matches!(
            api_for(&both, Backend::Cri, true),
            Ok(Api::Cri { .. })
        ));
        assert!(api_for(&crio, Backend::Containerd, true).is_err());
    }

    #[test]
    fn a_containerd_without_cri_is_skipped_when_detecting_but_usable_when_named() {
        let docker = answers(Some("1.7.0"), None);
        let err = api_for(&docker, Backend::Auto, true).unwrap_err();
        assert!(err.contains("not Kubernetes' runtime"), "{err}");
        assert!(api_for(&docker, Backend::Auto, false).is_ok());
    }

    #[test]
    fn choose_takes_the_first_that_answers_and_says_why() {
        let probes = vec![
            missing(known(0)),
            probe_of(
                known(1),
                Ok(answers(
                    Some("v1.7.27-k3s1"),
                    Some("containerd v1.7.27-k3s1"),
                )),
            ),
            missing(known(2)),
            missing(known(3)),
            probe_of(known(4), Ok(answers(None, Some("cri-o 1.34.0")))),
        ];
        let c = choose(probes, Backend::Auto).unwrap();
        assert_eq!(c.socket, Path::new(known(1)));
        assert!(matches!(c.api, Api::Containerd { .. }));
        assert!(c.why.contains("k3s or RKE2"), "{}", c.why);
        assert!(
            c.why.contains(
                "/var/run/crio/crio.sock: also answers (CRI API (cri-o 1.34.0)), not used"
            ),
            "{}",
            c.why
        );
        assert!(
            c.why
                .contains("/run/containerd/containerd.sock: does not exist"),
            "{}",
            c.why
        );
    }

    #[test]
    fn choose_skips_dockers_containerd_for_crio() {
        let probes = vec![
            probe_of(known(0), Ok(answers(Some("1.7.0"), None))),
            missing(known(1)),
            missing(known(2)),
            missing(known(3)),
            probe_of(known(4), Ok(answers(None, Some("cri-o 1.34.0")))),
        ];
        let c = choose(probes, Backend::Auto).unwrap();
        assert_eq!(c.socket, Path::new(known(4)));
        assert!(matches!(c.api, Api::Cri { .. }));
    }

    #[test]
    fn none_answering_is_one_line_naming_every_path() {
        let probes = vec![
            missing(known(0)),
            probe_of(
                known(1),
                Err(RuntimeError::Timeout {
                    socket: known(1).into(),
                    after: PROBE_TIMEOUT,
                }),
            ),
            probe_of(
                known(2),
                Err(RuntimeError::PermissionDenied(known(2).into())),
            ),
            missing(known(3)),
            probe_of(known(4), Ok(answers(None, None))),
        ];
        let e = choose(probes, Backend::Auto).unwrap_err();
        let line = e.to_string();
        assert_eq!(e.metric_label(), "not_found");
        assert!(!line.contains('\n'), "{line}");
        for k in KNOWN_SOCKETS {
            assert!(line.contains(k.path), "{line}");
        }
        assert!(line.contains("no answer within 5s"), "{line}");
        assert!(line.contains("permission denied"), "{line}");
        assert!(line.contains("set --socket"), "{line}");
    }

    #[test]
    fn a_named_socket_that_serves_the_wrong_api_says_what_to_do() {
        let crio = probe_of("/x.sock", Ok(answers(None, Some("cri-o 1.34.0"))));
        let e = accept(crio, Backend::Containerd).unwrap_err();
        assert!(e.to_string().contains("--runtime cri"), "{e}");
        let missing = missing("/x.sock");
        assert!(matches!(
            accept(missing, Backend::Auto),
            Err(RuntimeError::SocketMissing(_))
        ));
    }
}
