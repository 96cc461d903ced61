//! Platforms and the platform matcher containerd's CRI uses to pick a manifest.
//!
//! This follows `github.com/containerd/platforms`: [`Platform::normalize`] is its
//! `Normalize`, and [`Matcher::only`] is `platforms.Only`, the matcher behind
//! `platforms.Default()` that CRI uses to derive image IDs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// Highest numbered variant level (`vN`) expanded into lower levels by [`Matcher::only`].
///
/// Real levels stop at v4 (amd64) and v9 (arm); the cap keeps an absurd `--platform`
/// such as `linux/arm/v4000000000` from building a vector with billions of entries.
const MAX_VARIANT_LEVEL: u32 = 32;

/// An OCI platform: operating system, CPU architecture and optional CPU variant.
///
/// Deserializes from the OCI JSON used in descriptors and image configs (`os`,
/// `architecture`, `variant`). Other fields such as `os.version` and `os.features` are
/// ignored: they only matter for Windows images, which a Linux node never selects.
/// Missing or `null` fields read as empty, as Go's `encoding/json` does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub os: String,
    /// CPU architecture in Go's `GOARCH` spelling, e.g. `amd64`, `arm64`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub architecture: String,
    /// CPU variant, e.g. `v7` for 32-bit ARM; `None` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// Deserializes JSON `null` as the type's default, matching Go's `encoding/json`,
/// which leaves a field at its zero value on `null`.
pub(crate) fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

impl Platform {
    /// Builds a platform from its parts, without normalizing.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Platform {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// The platform of this node: Linux and the architecture this binary was built for,
    /// normalized.
    ///
    /// containerd also reads the CPU variant from `/proc/cpuinfo` (32-bit ARM: v5–v8;
    /// recent `containerd/platforms` versions: the amd64 micro-architecture level). This
    /// stays pure and uses the common default instead (arm → v7, others without a
    /// variant); pass an explicit platform when the node differs.
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "powerpc64" => "ppc64",
            "powerpc" => "ppc",
            "loongarch64" => "loong64",
            "mips" if cfg!(target_endian = "little") => "mipsle",
            "mips64" if cfg!(target_endian = "little") => "mips64le",
            "sparc64" => "sparc64",
            other => other,
        };
        Platform::new("linux", arch, None).normalize()
    }

    /// Returns the canonical form, as containerd's `platforms.Normalize`.
    ///
    /// - OS is lowercased; empty becomes `linux` (containerd substitutes its own OS,
    ///   and CRI runs on Linux); `macos` becomes `darwin`.
    /// - `i386` → `386`; `x86_64`, `x86-64` → `amd64` (variant `v1` dropped);
    ///   `aarch64` → `arm64` (variant `8`/`v8` dropped); `armhf` → `arm/v7`;
    ///   `armel` → `arm/v6`; `arm` without variant → `arm/v7`, and bare numbers
    ///   `5`–`8` gain a `v`.
    /// - An empty variant becomes `None`.
    pub fn normalize(&self) -> Platform {
        let os = match self.os.to_ascii_lowercase() {
            os if os.is_empty() => "linux".to_owned(),
            os if os == "macos" => "darwin".to_owned(),
            os => os,
        };
        let arch = self.architecture.to_ascii_lowercase();
        let variant = self
            .variant
            .as_deref()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let (architecture, variant) = match arch.as_str() {
            "i386" => ("386".to_owned(), String::new()),
            "x86_64" | "x86-64" | "amd64" => {
                let variant = if variant == "v1" {
                    String::new()
                } else {
                    variant
                };
                ("amd64".to_owned(), variant)
            }
            "aarch64" | "arm64" => {
                let variant = match variant.as_str() {
                    "8" | "v8" => String::new(),
                    _ => variant,
                };
                ("arm64".to_owned(), variant)
            }
            "armhf" => ("arm".to_owned(), "v7".to_owned()),
            "armel" => ("arm".to_owned(), "v6".to_owned()),
            "arm" => {
                let variant = match variant.as_str() {
                    "" | "7" => "v7".to_owned(),
                    "5" | "6" | "8" => format!("v{variant}"),
                    _ => variant,
                };
                ("arm".to_owned(), variant)
            }
            _ => (arch, variant),
        };
        Platform {
            os,
            architecture,
            variant: (!variant.is_empty()).then_some(variant),
        }
    }

    fn with_variant(&self, architecture: &str, variant: Option<String>) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: architecture.to_owned(),
            variant,
        }
    }
}

impl fmt::Display for Platform {
    /// Formats as `os/architecture[/variant]`, the `--platform` syntax.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// Why a platform specifier was rejected by [`Platform::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid platform {input:?}: {reason} (expected os/arch[/variant], e.g. linux/arm64)")]
pub struct PlatformParseError {
    /// The rejected input.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for Platform {
    type Err = PlatformParseError;

    /// Parses `os/arch[/variant]` (e.g. `linux/amd64`, `linux/arm/v7`) and normalizes it.
    ///
    /// Each part must match `[A-Za-z0-9_.-]+`, as in containerd's specifier syntax.
    /// The single-component forms (`linux`, `arm64`) are not accepted: they depend on
    /// the host, and an explicit platform should be explicit.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = |reason| PlatformParseError {
            input: s.to_owned(),
            reason,
        };
        let parts: Vec<&str> = s.split('/').collect();
        let (os, arch, variant) = match parts.as_slice() {
            [os, arch] => (*os, *arch, None),
            [os, arch, variant] => (*os, *arch, Some(*variant)),
            _ => return Err(error("needs two or three '/'-separated parts")),
        };
        let valid = |part: &str| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        };
        if !parts.iter().all(|part| valid(part)) {
            return Err(error(
                "each part must be non-empty and match [A-Za-z0-9_.-]+",
            ));
        }
        Ok(Platform::new(os, arch, variant).normalize())
    }
}

/// containerd's `platforms.Only(p)`: accepts `p` and the platforms it can run, in
/// order of preference.
///
/// Preference lists (after normalizing `p`):
/// - `amd64` → `[amd64, 386]`; `amd64/vN` → `[amd64/vN, …, amd64/v2, amd64, 386]`;
/// - `arm64` → `[arm64, arm/v8, arm/v7, arm/v6, arm/v5]` (`arm64/v8.x` and `arm64/v9.x`
///   first list their lower arm64 levels, as upstream);
/// - `arm/vN` → `[arm/vN, …, arm/v5]`;
/// - anything else → only itself.
///
/// A candidate matches an entry when its normalized OS, architecture and variant are
/// all equal; `amd64/v2` therefore does not match a plain `amd64` matcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    platform: Platform,
    preference: Vec<Platform>,
}

impl Matcher {
    /// Builds the matcher for `platform`, as `platforms.Only`.
    pub fn only(platform: Platform) -> Self {
        let platform = platform.normalize();
        let preference = preference_vector(&platform)
            .iter()
            .map(Platform::normalize)
            .collect();
        Matcher {
            platform,
            preference,
        }
    }

    /// The matcher for this node, `Matcher::only(Platform::host())`: containerd's
    /// `platforms.Default()` on a host without a detected CPU variant.
    pub fn host() -> Self {
        Matcher::only(Platform::host())
    }

    /// The platform the matcher was built for, normalized.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// The accepted platforms, most preferred first, all normalized.
    pub fn preference(&self) -> &[Platform] {
        &self.preference
    }

    /// Whether `candidate` (normalized first) is one of the accepted platforms.
    pub fn matches(&self, candidate: &Platform) -> bool {
        self.rank(candidate).is_some()
    }

    /// Position of `candidate` in the preference list (0 = most preferred), or `None`
    /// if it does not match. Ordering by rank is containerd's `Less`.
    pub fn rank(&self, candidate: &Platform) -> Option<usize> {
        let candidate = candidate.normalize();
        self.preference.iter().position(|p| *p == candidate)
    }
}

/// Parses a `vN` variant level as Go's `strconv.Atoi(strings.TrimPrefix(v, "v"))`
/// would for sane input.
fn variant_level(variant: &str) -> Option<u32> {
    variant.strip_prefix('v').unwrap_or(variant).parse().ok()
}

/// `platformVector` from `containerd/platforms` `compare.go`; `platform` is normalized.
fn preference_vector(platform: &Platform) -> Vec<Platform> {
    let mut vector = vec![platform.clone()];
    let variant = platform.variant.as_deref().unwrap_or_default();
    match platform.architecture.as_str() {
        "amd64" => {
            if let Some(level) = variant_level(variant).filter(|l| *l > 1) {
                for lower in (1..level.min(MAX_VARIANT_LEVEL + 1)).rev() {
                    vector.push(platform.with_variant("amd64", Some(format!("v{lower}"))));
                }
            }
            vector.push(platform.with_variant("386", None));
        }
        "arm" => {
            if let Some(level) = variant_level(variant).filter(|l| *l > 5) {
                for lower in (5..level.min(MAX_VARIANT_LEVEL + 1)).rev() {
                    vector.push(platform.with_variant("arm", Some(format!("v{lower}"))));
                }
            }
        }
        "arm64" => {
            let variant = if variant.is_empty() { "v8" } else { variant };
            let (major, minor_part) = match variant.split_once('.') {
                Some((major, minor)) => (major, Some(minor)),
                None => (variant, None),
            };
            if let Some(mut major) = variant_level(major).filter(|m| *m >= 8) {
                // Upstream only reads a single-digit minor ("v8.x").
                let mut minor = match minor_part {
                    Some(m) if variant.len() == 4 => m.parse::<u32>().unwrap_or(0),
                    _ => 0,
                };
                let level = |major: u32, minor: u32| {
                    if minor == 0 {
                        format!("v{major}")
                    } else {
                        format!("v{major}.{minor}")
                    }
                };
                if major == 9 {
                    for lower in (0..minor).rev() {
                        vector.push(platform.with_variant("arm64", Some(level(9, lower))));
                    }
                    // v9.0 diverged from v8.5: v9.x runs v8.(x+5) code.
                    minor += 5;
                    major = 8;
                    vector.push(platform.with_variant("arm64", Some(format!("v8.{minor}"))));
                }
                for lower in (0..minor).rev() {
                    vector.push(platform.with_variant("arm64", Some(level(major, lower))));
                }
            }
            let arm_variant = if variant.starts_with("v8.") || variant.starts_with("v9.") {
                "v8"
            } else {
                variant
            };
            let arm = platform.with_variant("arm", Some(arm_variant.to_owned()));
            vector.extend(preference_vector(&arm));
        }
        _ => {}
    }
    vector
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        let parts: Vec<&str> = s.split('/').collect();
        Platform::new(parts[0], parts[1], parts.get(2).copied())
    }

    fn names(m: &Matcher) -> Vec<String> {
        m.preference().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn normalization_table() {
        let table = [
            ("linux/aarch64", "linux/arm64"),
            ("linux/aarch64/v8", "linux/arm64"),
            ("linux/arm64/v8", "linux/arm64"),
            ("linux/arm64/8", "linux/arm64"),
            ("linux/arm64/v9", "linux/arm64/v9"),
            ("linux/x86_64", "linux/amd64"),
            ("linux/x86-64", "linux/amd64"),
            ("linux/amd64/v1", "linux/amd64"),
            ("linux/amd64/v3", "linux/amd64/v3"),
            ("linux/i386", "linux/386"),
            ("linux/armhf", "linux/arm/v7"),
            ("linux/armel", "linux/arm/v6"),
            ("linux/arm", "linux/arm/v7"),
            ("linux/arm/7", "linux/arm/v7"),
            ("linux/arm/6", "linux/arm/v6"),
            ("linux/arm/v5", "linux/arm/v5"),
            ("Linux/AMD64", "linux/amd64"),
            ("macos/arm64", "darwin/arm64"),
            ("windows/amd64", "windows/amd64"),
            ("linux/s390x", "linux/s390x"),
            ("linux/ppc64le", "linux/ppc64le"),
        ];
        for (input, want) in table {
            assert_eq!(p(input).normalize().to_string(), want, "normalize({input})");
        }
        assert_eq!(
            Platform::new("", "amd64", None).normalize(),
            p("linux/amd64")
        );
        assert_eq!(
            Platform::new("linux", "amd64", Some(""))
                .normalize()
                .variant,
            None
        );
        // Normalizing is idempotent.
        for (_, want) in table {
            assert_eq!(p(want).normalize().to_string(), want);
        }
    }

    #[test]
    fn parse_and_display() {
        assert_eq!("linux/amd64".parse::<Platform>(), Ok(p("linux/amd64")));
        assert_eq!("linux/arm/v7".parse::<Platform>(), Ok(p("linux/arm/v7")));
        assert_eq!("linux/arm".parse::<Platform>(), Ok(p("linux/arm/v7")));
        assert_eq!("linux/aarch64".parse::<Platform>(), Ok(p("linux/arm64")));
        assert_eq!("linux/arm64/v8".parse::<Platform>(), Ok(p("linux/arm64")));
        for bad in [
            "",
            "linux",
            "linux/",
            "/amd64",
            "linux/amd64/v1/x",
            "linux/am d64",
            "linux/*",
        ] {
            let err = bad.parse::<Platform>().expect_err(bad);
            assert_eq!(err.input, bad);
            assert!(err.to_string().contains("os/arch"), "{err}");
        }
        assert_eq!(p("linux/arm/v7").to_string(), "linux/arm/v7");
        assert_eq!(p("linux/amd64").to_string(), "linux/amd64");
    }

    #[test]
    fn host_is_linux_and_normalized() {
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        assert_eq!(host, host.normalize());
        assert!(Matcher::host().matches(&host));
        if cfg!(target_arch = "x86_64") {
            assert_eq!(host, p("linux/amd64"));
        }
        if cfg!(target_arch = "aarch64") {
            assert_eq!(host, p("linux/arm64"));
        }
    }

    #[test]
    fn deserializes_oci_json() {
        let json = r#"{"architecture":"arm","os":"linux","variant":"v7","os.version":"x","os.features":["a"]}"#;
        let plat: Platform = serde_json::from_str(json).expect("parse");
        assert_eq!(plat, p("linux/arm/v7"));
        let plat: Platform =
            serde_json::from_str(r#"{"architecture":null,"os":"linux","variant":null}"#)
                .expect("parse nulls");
        assert_eq!(plat, Platform::new("linux", "", None));
        let plat: Platform = serde_json::from_str("{}").expect("parse empty");
        assert_eq!(plat, Platform::default());
        assert!(serde_json::from_str::<Platform>(r#"{"os":5}"#).is_err());
        let back = serde_json::to_value(p("linux/amd64")).expect("serialize");
        assert_eq!(
            back,
            serde_json::json!({"os": "linux", "architecture": "amd64"})
        );
    }

    #[test]
    fn amd64_matcher() {
        let m = Matcher::only(p("linux/amd64"));
        assert_eq!(m.platform(), &p("linux/amd64"));
        assert_eq!(names(&m), ["linux/amd64", "linux/386"]);
        assert_eq!(m.rank(&p("linux/amd64")), Some(0));
        assert_eq!(m.rank(&p("linux/x86_64")), Some(0));
        assert_eq!(m.rank(&p("linux/amd64/v1")), Some(0));
        assert_eq!(m.rank(&p("linux/386")), Some(1));
        assert_eq!(m.rank(&p("linux/i386")), Some(1));
        for rejected in [
            "linux/arm64",
            "linux/arm/v7",
            "linux/amd64/v2",
            "linux/amd64/v3",
            "windows/amd64",
            "linux/s390x",
            "unknown/unknown",
        ] {
            assert!(!m.matches(&p(rejected)), "{rejected}");
        }
    }

    #[test]
    fn amd64_levels_matcher() {
        let m = Matcher::only(p("linux/amd64/v3"));
        assert_eq!(
            names(&m),
            [
                "linux/amd64/v3",
                "linux/amd64/v2",
                "linux/amd64",
                "linux/386"
            ]
        );
        assert!(!m.matches(&p("linux/amd64/v4")));
    }

    #[test]
    fn arm64_matcher() {
        let want = [
            "linux/arm64",
            "linux/arm/v8",
            "linux/arm/v7",
            "linux/arm/v6",
            "linux/arm/v5",
        ];
        for host in ["linux/arm64", "linux/aarch64", "linux/arm64/v8"] {
            assert_eq!(names(&Matcher::only(p(host))), want, "{host}");
        }
        let m = Matcher::only(p("linux/arm64"));
        assert_eq!(m.rank(&p("linux/arm64/v8")), Some(0));
        assert_eq!(m.rank(&p("linux/arm")), Some(2));
        assert_eq!(m.rank(&p("linux/armhf")), Some(2));
        assert_eq!(m.rank(&p("linux/armel")), Some(3));
        assert!(m.rank(&p("linux/arm64")) < m.rank(&p("linux/arm/v7")));
        assert!(!m.matches(&p("linux/amd64")));
        assert!(!m.matches(&p("linux/arm/v4")));
        assert!(!m.matches(&p("linux/arm64/v9")));
    }

    #[test]
    fn arm64_minor_levels_matcher() {
        assert_eq!(
            names(&Matcher::only(p("linux/arm64/v8.2"))),
            [
                "linux/arm64/v8.2",
                "linux/arm64/v8.1",
                "linux/arm64",
                "linux/arm/v8",
                "linux/arm/v7",
                "linux/arm/v6",
                "linux/arm/v5",
            ]
        );
        let v9 = names(&Matcher::only(p("linux/arm64/v9.1")));
        assert_eq!(
            v9[..4],
            [
                "linux/arm64/v9.1",
                "linux/arm64/v9",
                "linux/arm64/v8.6",
                "linux/arm64/v8.5"
            ]
        );
        assert!(v9.contains(&"linux/arm64".to_owned()));
        assert!(v9.contains(&"linux/arm/v5".to_owned()));
    }

    #[test]
    fn arm_matchers() {
        assert_eq!(
            names(&Matcher::only(p("linux/arm/v8"))),
            [
                "linux/arm/v8",
                "linux/arm/v7",
                "linux/arm/v6",
                "linux/arm/v5"
            ]
        );
        let v7 = Matcher::only(p("linux/arm/v7"));
        assert_eq!(names(&v7), ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]);
        assert_eq!(names(&Matcher::only(p("linux/arm"))), names(&v7));
        assert!(!v7.matches(&p("linux/arm64")));
        assert!(!v7.matches(&p("linux/arm/v8")));
        assert_eq!(
            names(&Matcher::only(p("linux/arm/v6"))),
            ["linux/arm/v6", "linux/arm/v5"]
        );
        assert_eq!(names(&Matcher::only(p("linux/arm/v5"))), ["linux/arm/v5"]);
    }

    #[test]
    fn other_platforms_match_only_themselves() {
        let m = Matcher::only(p("linux/s390x"));
        assert_eq!(names(&m), ["linux/s390x"]);
        assert!(!m.matches(&p("linux/amd64")));
        let m = Matcher::only(p("windows/amd64"));
        assert_eq!(names(&m), ["windows/amd64", "windows/386"]);
        assert!(!m.matches(&p("linux/amd64")));
    }

    #[test]
    fn absurd_levels_stay_bounded() {
        let m = Matcher::only(p("linux/arm/v4000000000"));
        assert!(m.preference().len() <= MAX_VARIANT_LEVEL as usize + 1);
        let m = Matcher::only(p("linux/amd64/v4000000000"));
        assert!(m.preference().len() <= MAX_VARIANT_LEVEL as usize + 2);
        let m = Matcher::only(p("linux/arm64/v99999999999999999999"));
        assert_eq!(m.preference().len(), 2);
    }
}
