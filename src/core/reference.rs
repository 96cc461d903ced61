//! Docker image reference grammar, as containerd's CRI plugin reads it.
//!
//! This mirrors `distribution/reference` v0.6 (used by containerd 1.7.19+ and 2.x) and the
//! `go-digest` v1 parser it relies on:
//!
//! ```text
//! reference        := name [ ":" tag ] [ "@" digest ]
//! name             := [domain "/"] path
//! domain           := host [":" port]          host := domain-name | "[" ipv6 "]"
//! domain-name      := component ("." component)*   component := [a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?
//! path             := path-component ("/" path-component)*
//! path-component   := [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*
//! tag              := [\w][\w.-]{0,127}
//! digest           := algorithm ":" hex        (sha256/384/512, lowercase hex of exact length)
//! ```
//!
//! The parsers are hand-written rather than regex-based; each helper states which production
//! it implements. Where the upstream regular expressions could match in more than one way,
//! the leftmost-first choice (a domain is preferred when both readings are valid) is kept.

use std::fmt;

/// Maximum length of the repository path (the name without its domain).
///
/// distribution/reference v0.6 (containerd 1.7.19+ and 2.x) checks the path only; containerd
/// 1.6's own copy checked `domain/path`, so it also rejected names whose domain pushed them
/// over the limit.
pub const REPOSITORY_PATH_LENGTH_MAX: usize = 255;

/// Registry that unqualified names belong to.
pub const DEFAULT_DOMAIN: &str = "docker.io";

/// Tag added by [`parse_docker_ref`] when a reference has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

/// The historic Docker Hub name, rewritten to [`DEFAULT_DOMAIN`].
const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";

/// Namespace of official images on Docker Hub (`nginx` is `library/nginx`).
const OFFICIAL_REPO_PREFIX: &str = "library/";

/// Maximum tag length (`[\w][\w.-]{0,127}`).
const TAG_MAX_LEN: usize = 128;

/// Minimum number of hex characters the reference grammar accepts after `@alg:`.
const REFERENCE_DIGEST_MIN_HEX: usize = 32;

/// Digest algorithms go-digest knows, with the length of their hex encoding.
const KNOWN_ALGORITHMS: [(&str, usize); 3] = [("sha256", 64), ("sha384", 96), ("sha512", 128)];

/// Length of the hex encoding of `algorithm`, if it is one go-digest supports
/// (`sha256`, `sha384`, `sha512`; exact, lowercase names only).
pub fn known_algorithm_hex_len(algorithm: &str) -> Option<usize> {
    KNOWN_ALGORITHMS
        .iter()
        .find(|(name, _)| *name == algorithm)
        .map(|(_, len)| *len)
}

/// Why a string is not a valid reference or digest. Every variant names the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The input was the empty string.
    #[error("invalid reference: the name is empty; a repository name needs at least one component")]
    Empty,
    /// A bare 64-hex string: upstream reserves it for image IDs, never a repository name.
    #[error(
        "invalid repository name {0:?}: a 64-character hexadecimal string is an image ID, not a name"
    )]
    HexIdentifier(String),
    /// The repository path has uppercase letters.
    #[error("invalid reference {0:?}: the repository name must be lowercase")]
    Uppercase(String),
    /// The string does not follow the reference grammar.
    #[error(
        "invalid reference format {0:?}: expected [registry[:port]/]path[:tag][@algorithm:hex]"
    )]
    InvalidFormat(String),
    /// The repository path is longer than [`REPOSITORY_PATH_LENGTH_MAX`].
    #[error(
        "invalid reference {input:?}: the repository path is {len} characters long, at most \
         255 are allowed"
    )]
    NameTooLong {
        /// The string that was parsed.
        input: String,
        /// Length of the normalized repository path in bytes.
        len: usize,
    },
    /// Not of the form `algorithm:hex` (or hex not lowercase, or bad characters).
    #[error("invalid digest {0:?}: expected <algorithm>:<lowercase hex>, e.g. sha256:<64 hex>")]
    DigestInvalidFormat(String),
    /// A known algorithm whose hex part has the wrong length.
    #[error(
        "invalid digest {digest:?}: {algorithm} needs exactly {expected} hex characters, got {actual}"
    )]
    DigestInvalidLength {
        /// The digest string.
        digest: String,
        /// Its algorithm.
        algorithm: String,
        /// The required hex length.
        expected: usize,
        /// The hex length found.
        actual: usize,
    },
    /// A well-formed digest with an algorithm other than sha256, sha384 or sha512.
    #[error(
        "unsupported digest algorithm {algorithm:?} in {digest:?}: only sha256, sha384 and \
         sha512 are supported"
    )]
    DigestUnsupported {
        /// The digest string.
        digest: String,
        /// The unknown algorithm.
        algorithm: String,
    },
}

/// A validated content digest `algorithm:hex` (go-digest rules: known algorithm, lowercase hex
/// of the exact length).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: String,
    hex: String,
}

impl Digest {
    /// The algorithm, e.g. `sha256`.
    pub fn algorithm(&self) -> &str {
        &self.algorithm
    }

    /// The lowercase hex encoding of the hash.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

/// Parses `algorithm:hex` like go-digest v1 `digest.Parse`.
///
/// Errors: no `:`, empty parts or characters outside the digest grammar give
/// [`ReferenceError::DigestInvalidFormat`]; a grammatical digest with an unknown algorithm gives
/// [`ReferenceError::DigestUnsupported`]; a known algorithm with the wrong hex length gives
/// [`ReferenceError::DigestInvalidLength`] (checked before the hex characters, as upstream, so
/// `sha256:ABC` is a length error and a 64-character uppercase hex is a format error).
pub fn parse_digest(s: &str) -> Result<Digest, ReferenceError> {
    let invalid = || ReferenceError::DigestInvalidFormat(s.to_string());
    let Some((algorithm, hex)) = s.split_once(':') else {
        return Err(invalid());
    };
    if algorithm.is_empty() || hex.is_empty() {
        return Err(invalid());
    }
    let Some(expected) = known_algorithm_hex_len(algorithm) else {
        return Err(
            if is_digest_algorithm(algorithm) && is_digest_encoded(hex) {
                ReferenceError::DigestUnsupported {
                    digest: s.to_string(),
                    algorithm: algorithm.to_string(),
                }
            } else {
                invalid()
            },
        );
    };
    if hex.len() != expected {
        return Err(ReferenceError::DigestInvalidLength {
            digest: s.to_string(),
            algorithm: algorithm.to_string(),
            expected,
            actual: hex.len(),
        });
    }
    if !hex.bytes().all(is_lower_hex) {
        return Err(invalid());
    }
    Ok(Digest {
        algorithm: algorithm.to_string(),
        hex: hex.to_string(),
    })
}

/// A parsed, named image reference: `domain/path[:tag][@digest]`.
///
/// `domain` is empty only in the rare case where the first component looked like a registry
/// (it contains `.` or `:`) but is not a valid host name, yet the whole string is a valid path,
/// e.g. `a_b.com/foo`; upstream then keeps the whole name as the path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// The registry, e.g. `docker.io` or `localhost:5000` (may be empty, see the type docs).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path inside the registry, e.g. `library/nginx`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The tag, if any.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if any.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The repository name `domain/path` without tag or digest.
    pub fn name(&self) -> String {
        if self.domain.is_empty() {
            self.path.clone()
        } else {
            format!("{}/{}", self.domain, self.path)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.domain.is_empty() {
            write!(f, "{}/", self.domain)?;
        }
        f.write_str(&self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Either a named reference or a bare digest, as returned by [`parse_any_reference`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AnyReference {
    /// A repository name with optional tag and digest.
    Named(Reference),
    /// A digest on its own (`sha256:<hex>`, or a bare 64-hex image ID).
    Digest(Digest),
}

impl AnyReference {
    /// Preference rank in CRI's reference order: 1 name+tag+digest, 2 name+tag,
    /// 3 name+digest, 4 name only, 5 bare digest (6, unparseable, is never an `AnyReference`).
    pub fn rank(&self) -> u8 {
        match self {
            AnyReference::Named(r) => match (r.tag.is_some(), r.digest.is_some()) {
                (true, true) => 1,
                (true, false) => 2,
                (false, true) => 3,
                (false, false) => 4,
            },
            AnyReference::Digest(_) => 5,
        }
    }
}

impl fmt::Display for AnyReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnyReference::Named(r) => r.fmt(f),
            AnyReference::Digest(d) => d.fmt(f),
        }
    }
}

/// Parses a user-facing name the way containerd's `ParseDockerRef` does.
///
/// Normalizes with [`parse_normalized_named`] (`nginx` → `docker.io/library/nginx`), then keeps
/// only the digest when both tag and digest are present, and adds the tag `latest` when
/// neither is. The [`Display`](fmt::Display) form is the key CRI uses for its reference cache,
/// e.g. `docker.io/library/nginx:latest`.
pub fn parse_docker_ref(s: &str) -> Result<Reference, ReferenceError> {
    let mut reference = parse_normalized_named(s)?;
    match (reference.tag.is_some(), reference.digest.is_some()) {
        (true, true) => reference.tag = None,
        (false, false) => reference.tag = Some(DEFAULT_TAG.to_string()),
        _ => {}
    }
    Ok(reference)
}

/// Parses a possibly familiar name into its fully qualified form (`ParseNormalizedNamed`),
/// without adding a default tag.
///
/// Rules: a bare 64-hex string is rejected; the part before the first `/` is the registry only
/// if it contains `.` or `:`, is `localhost`, or has an uppercase letter; otherwise the
/// registry is `docker.io`. `index.docker.io` becomes `docker.io`, and a single-component path
/// on `docker.io` gets the `library/` prefix. The repository path must be lowercase.
pub fn parse_normalized_named(s: &str) -> Result<Reference, ReferenceError> {
    if s.is_empty() {
        return Err(ReferenceError::Empty);
    }
    if is_identifier(s) {
        return Err(ReferenceError::HexIdentifier(s.to_string()));
    }
    let (domain, remainder) = split_docker_domain(s);
    // Only the repository part is checked here: tags may legitimately contain uppercase.
    let remote = remainder
        .split_once(':')
        .map_or(remainder.as_str(), |(r, _)| r);
    if remote.to_lowercase() != remote {
        return Err(ReferenceError::Uppercase(s.to_string()));
    }
    parse_reference(&format!("{domain}/{remainder}"), s)
}

/// Parses a string that may be an image ID, a digest or a name (`ParseAnyReference`):
/// a bare 64-hex string is the digest `sha256:<hex>`, a valid `algorithm:hex` is a digest,
/// anything else goes through [`parse_normalized_named`] (no `latest` is added).
pub fn parse_any_reference(s: &str) -> Result<AnyReference, ReferenceError> {
    if is_identifier(s) {
        return Ok(AnyReference::Digest(Digest {
            algorithm: "sha256".to_string(),
            hex: s.to_string(),
        }));
    }
    if let Ok(digest) = parse_digest(s) {
        return Ok(AnyReference::Digest(digest));
    }
    parse_normalized_named(s).map(AnyReference::Named)
}

/// Orders image names the way CRI orders an image's `References`: by rank (see
/// [`AnyReference::rank`]: name+tag+digest, name+tag, name+digest, name, bare digest), ties
/// broken by the byte order of the *normalized* string, then unparseable names last in byte
/// order of the name itself.
///
/// Deliberate difference from upstream (`reference.Sort`, containerd's `sortReferences`): those
/// return the rewritten normalized strings (`nginx:latest` becomes
/// `docker.io/library/nginx:latest`, a bare 64-hex name becomes `sha256:<hex>`), so CRI later
/// deletes names that may not exist and leaves the real records behind. This function returns
/// the ORIGINAL input strings in that order, because they are the record names to delete.
/// Entries that normalize to the same string keep a stable order by their original string.
pub fn sort_references(refs: &[String]) -> Vec<String> {
    let mut parsed: Vec<(u8, String, &String)> = Vec::new();
    let mut unparseable: Vec<&String> = Vec::new();
    for original in refs {
        match parse_any_reference(original) {
            Ok(any) => parsed.push((any.rank(), any.to_string(), original)),
            Err(_) => unparseable.push(original),
        }
    }
    parsed.sort();
    unparseable.sort();
    parsed
        .into_iter()
        .map(|(_, _, original)| original.clone())
        .chain(unparseable.into_iter().cloned())
        .collect()
}

/// Splits off the registry like upstream `splitDockerDomain`; the result is
/// `(domain, remainder)` where remainder is `path[:tag][@digest]`.
fn split_docker_domain(name: &str) -> (&str, String) {
    let Some((maybe_domain, maybe_remainder)) = name.split_once('/') else {
        // A single element ("ubuntu", "ubuntu:latest", even "localhost:5000") is a Hub name.
        return (DEFAULT_DOMAIN, format!("{OFFICIAL_REPO_PREFIX}{name}"));
    };
    let (domain, remainder) = if maybe_domain == "localhost" {
        (maybe_domain, maybe_remainder)
    } else if maybe_domain == LEGACY_DEFAULT_DOMAIN {
        (DEFAULT_DOMAIN, maybe_remainder)
    } else if maybe_domain.contains(['.', ':'])
        // Repository paths are lowercase, so an uppercase first element can only be a host.
        || maybe_domain.to_lowercase() != maybe_domain
    {
        (maybe_domain, maybe_remainder)
    } else {
        (DEFAULT_DOMAIN, name)
    };
    if domain == DEFAULT_DOMAIN && !remainder.contains('/') {
        return (domain, format!("{OFFICIAL_REPO_PREFIX}{remainder}"));
    }
    (domain, remainder.to_string())
}

/// The pieces of a string matched by the full reference grammar.
struct RawReference<'a> {
    domain: &'a str,
    path: &'a str,
    tag: Option<&'a str>,
    digest: Option<&'a str>,
}

/// Upstream `Parse`: the grammar on an already normalized string, plus the path length and
/// digest checks. `input` is the user's original string, for error messages.
fn parse_reference(s: &str, input: &str) -> Result<Reference, ReferenceError> {
    let Some(raw) = match_reference(s) else {
        let lower = s.to_lowercase();
        if lower != s && match_reference(&lower).is_some() {
            return Err(ReferenceError::Uppercase(input.to_string()));
        }
        return Err(ReferenceError::InvalidFormat(input.to_string()));
    };
    if raw.path.len() > REPOSITORY_PATH_LENGTH_MAX {
        return Err(ReferenceError::NameTooLong {
            input: input.to_string(),
            len: raw.path.len(),
        });
    }
    let digest = raw.digest.map(parse_digest).transpose()?;
    Ok(Reference {
        domain: raw.domain.to_string(),
        path: raw.path.to_string(),
        tag: raw.tag.map(str::to_string),
        digest,
    })
}

/// Matches `[domain "/"] path [":" tag] ["@" digest]`, preferring the reading with a domain.
fn match_reference(s: &str) -> Option<RawReference<'_>> {
    // A domain never contains '/', so if present it is exactly what precedes the first '/'.
    if let Some((domain, rest)) = s.split_once('/')
        && is_domain_and_port(domain)
        && let Some(raw) = match_path_tag_digest(rest)
    {
        return Some(RawReference { domain, ..raw });
    }
    match_path_tag_digest(s)
}

/// Matches `path [":" tag] ["@" digest]` (domain left empty).
fn match_path_tag_digest(s: &str) -> Option<RawReference<'_>> {
    // Tags start with ':' and digests with '@', neither of which is a path character, so the
    // path is exactly the longest run of path characters.
    let path_end = s.find(|c: char| !is_path_char(c)).unwrap_or(s.len());
    let (path, mut rest) = s.split_at(path_end);
    if !is_remote_name(path) {
        return None;
    }
    let mut tag = None;
    if let Some(after_colon) = rest.strip_prefix(':') {
        let tag_end = after_colon.find('@').unwrap_or(after_colon.len());
        let (t, r) = after_colon.split_at(tag_end);
        if !is_tag(t) {
            return None;
        }
        tag = Some(t);
        rest = r;
    }
    let mut digest = None;
    if let Some(d) = rest.strip_prefix('@') {
        if !is_reference_digest(d) {
            return None;
        }
        digest = Some(d);
        rest = "";
    }
    rest.is_empty().then_some(RawReference {
        domain: "",
        path,
        tag,
        digest,
    })
}

/// `identifier := [a-f0-9]{64}`.
fn is_identifier(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(is_lower_hex)
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/')
}

/// `path-component := [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*`.
fn is_path_component(s: &str) -> bool {
    let bytes = s.as_bytes();
    let mut i = 0;
    loop {
        let run_start = i;
        while i < bytes.len() && is_lower_alnum(bytes[i]) {
            i += 1;
        }
        if i == run_start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        let separator_start = i;
        while i < bytes.len() && !is_lower_alnum(bytes[i]) {
            i += 1;
        }
        let separator = &s[separator_start..i];
        let dashes = separator.bytes().all(|b| b == b'-');
        if !(dashes || matches!(separator, "." | "_" | "__")) {
            return false;
        }
    }
}

/// `path := path-component ("/" path-component)*`.
fn is_remote_name(s: &str) -> bool {
    s.split('/').all(is_path_component)
}

/// `component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`.
fn is_domain_component(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `domain := (domain-name | "[" [a-fA-F0-9:]+ "]") (":" [0-9]+)?`.
fn is_domain_and_port(s: &str) -> bool {
    let (host_ok, after_host) = if let Some(bracketed) = s.strip_prefix('[') {
        let Some((inner, after)) = bracketed.split_once(']') else {
            return false;
        };
        let ipv6_ok =
            !inner.is_empty() && inner.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
        (ipv6_ok, after)
    } else {
        let host_end = s.find(':').unwrap_or(s.len());
        let (host, after) = s.split_at(host_end);
        (host.split('.').all(is_domain_component), after)
    };
    let port_ok = after_host.is_empty()
        || after_host
            .strip_prefix(':')
            .is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

/// `tag := [\w][\w.-]{0,127}`.
fn is_tag(s: &str) -> bool {
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = s.as_bytes();
    match bytes.split_first() {
        Some((first, rest)) => {
            bytes.len() <= TAG_MAX_LEN
                && is_word(*first)
                && rest.iter().all(|&b| is_word(b) || b == b'.' || b == b'-')
        }
        None => false,
    }
}

/// The digest production of the reference grammar (looser than go-digest, which then decides):
/// `[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)* ":" [0-9a-fA-F]{32,}`.
fn is_reference_digest(s: &str) -> bool {
    let Some((algorithm, hex)) = s.split_once(':') else {
        return false;
    };
    let component_ok = |c: &str| {
        let mut bytes = c.bytes();
        bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
            && bytes.all(|b| b.is_ascii_alphanumeric())
    };
    algorithm.split(['-', '_', '+', '.']).all(component_ok)
        && hex.len() >= REFERENCE_DIGEST_MIN_HEX
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

/// go-digest algorithm grammar: `[a-z0-9]+([.+_-][a-z0-9]+)*`.
fn is_digest_algorithm(s: &str) -> bool {
    s.split(['.', '+', '_', '-'])
        .all(|c| !c.is_empty() && c.bytes().all(is_lower_alnum))
}

/// go-digest encoded-part grammar: `[a-zA-Z0-9=_-]+`.
fn is_digest_encoded(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const H64: &str = "dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c";
    const H64B: &str = "86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa";

    fn h(n: usize) -> String {
        "0123456789abcdef".repeat(8)[..n].to_string()
    }

    /// `(input, normalized ParseDockerRef string)` that must parse.
    fn valid_vectors() -> Vec<(String, String)> {
        let v = |a: &str, b: &str| (a.to_string(), b.to_string());
        vec![
            v("nginx", "docker.io/library/nginx:latest"),
            v("nginx:1.25", "docker.io/library/nginx:1.25"),
            v("library/nginx", "docker.io/library/nginx:latest"),
            v("docker.io/nginx", "docker.io/library/nginx:latest"),
            v(
                "docker.io/library/nginx:latest",
                "docker.io/library/nginx:latest",
            ),
            v(
                "docker.io/library/foo/bar",
                "docker.io/library/foo/bar:latest",
            ),
            v("index.docker.io/foo", "docker.io/library/foo:latest"),
            v(
                "index.docker.io/library/debian",
                "docker.io/library/debian:latest",
            ),
            v(
                "index.docker.io/docker/docker",
                "docker.io/docker/docker:latest",
            ),
            v("docker/docker", "docker.io/docker/docker:latest"),
            v("store/foo/bar", "docker.io/store/foo/bar:latest"),
            v("other/library", "docker.io/other/library:latest"),
            v("localhost/foo", "localhost/foo:latest"),
            v("localhost:5000/foo/bar:tag", "localhost:5000/foo/bar:tag"),
            // A lone "host:port" has no '/', so it is a Hub name with a tag (upstream FIXME).
            v("localhost:5000", "docker.io/library/localhost:5000"),
            v("[::1]:5000/x", "[::1]:5000/x:latest"),
            v("[fc00::1]:5000/docker", "[fc00::1]:5000/docker:latest"),
            v(
                "[fc00:1:2:3:4:5:6:7]:5000/library/debian",
                "[fc00:1:2:3:4:5:6:7]:5000/library/debian:latest",
            ),
            v("127.0.0.1:5000/debian", "127.0.0.1:5000/debian:latest"),
            v("192.168.0.1", "docker.io/library/192.168.0.1:latest"),
            v("192.168.0.1:80", "docker.io/library/192.168.0.1:80"),
            v("192.168.0.1:8/debian", "192.168.0.1:8/debian:latest"),
            v(
                "example.com:8000/private/moonbase",
                "example.com:8000/private/moonbase:latest",
            ),
            v("test_com/foo", "docker.io/test_com/foo:latest"),
            v("test.com:8080/foo", "test.com:8080/foo:latest"),
            v("test-com:8080/foo", "test-com:8080/foo:latest"),
            v("xn--n3h.com:18080/foo", "xn--n3h.com:18080/foo:latest"),
            v("Foo.com/bar", "Foo.com/bar:latest"),
            v("Foo/bar", "Foo/bar:latest"),
            v("FOO/bar", "FOO/bar:latest"),
            v("Docker/docker", "Docker/docker:latest"),
            // Looks like a registry but is not a valid host: the whole name is the path.
            v("a_b.com/foo", "a_b.com/foo:latest"),
            v(
                "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
                "docker.io/library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev:latest",
            ),
            v(
                "docker-rules/docker",
                "docker.io/docker-rules/docker:latest",
            ),
            v(
                "docker---rules/docker",
                "docker.io/docker---rules/docker:latest",
            ),
            v("dock__er/docker", "docker.io/dock__er/docker:latest"),
            v("d/docker", "docker.io/d/docker:latest"),
            v("jess/t", "docker.io/jess/t:latest"),
            v(
                "ubuntu-12.04-base",
                "docker.io/library/ubuntu-12.04-base:latest",
            ),
            v("dbcc1", "docker.io/library/dbcc1:latest"),
            v("abc123", "docker.io/library/abc123:latest"),
            v("foo:Tag_1.x-Y", "docker.io/library/foo:Tag_1.x-Y"),
            // A short digest-looking string is a name with a tag.
            v("sha256:abc", "docker.io/library/sha256:abc"),
            v("sha256:ABC", "docker.io/library/sha256:ABC"),
            (
                format!("docker.io/{H64}"),
                format!("docker.io/library/{H64}:latest"),
            ),
            (
                H64[..63].to_string(),
                format!("docker.io/library/{}:latest", &H64[..63]),
            ),
            (
                format!("foo/bar@sha256:{H64}"),
                format!("docker.io/foo/bar@sha256:{H64}"),
            ),
        ]
        .into_iter()
        .chain(valid_digest_vectors())
        .collect()
    }

    /// The part of [`valid_vectors`] with digests or at the length limits.
    fn valid_digest_vectors() -> Vec<(String, String)> {
        vec![
            (
                format!("foo:tag@sha256:{H64}"),
                format!("docker.io/library/foo@sha256:{H64}"),
            ),
            (
                format!("busybox:latest@sha256:{H64B}"),
                format!("docker.io/library/busybox@sha256:{H64B}"),
            ),
            (
                format!("docker.io/library/redis@sha256:{H64}"),
                format!("docker.io/library/redis@sha256:{H64}"),
            ),
            (
                format!("example.com/foo@sha512:{}", h(128)),
                format!("example.com/foo@sha512:{}", h(128)),
            ),
            (
                format!("foo@sha384:{}", h(96)),
                format!("docker.io/library/foo@sha384:{}", h(96)),
            ),
            (
                format!("foo:{}", "t".repeat(128)),
                format!("docker.io/library/foo:{}", "t".repeat(128)),
            ),
            // Path of exactly 255 characters; the domain does not count.
            (
                format!("example.com/{}", "a".repeat(255)),
                format!("example.com/{}:latest", "a".repeat(255)),
            ),
            (
                format!("{}a:tag-puts-this-over-max", "a/".repeat(127)),
                format!("docker.io/{}a:tag-puts-this-over-max", "a/".repeat(127)),
            ),
        ]
    }

    /// Inputs `parse_docker_ref` must reject.
    fn invalid_vectors() -> Vec<String> {
        let mut v: Vec<String> = [
            "",
            "https://github.com/docker/docker",
            "docker/Docker",
            "-docker",
            "-docker/docker",
            "-docker.io/docker/docker",
            "docker///docker",
            "docker.io/docker/Docker",
            "docker.io/docker///docker",
            "[fc00::1]",
            "[fc00::1]:5000",
            "fc00::1:5000/debian",
            "[fe80::1%eth0]:5000/debian",
            "[2001:db8:3:4::192.0.2.33]:5000/debian",
            "docker-/docker",
            "-docker-/docker",
            "____/____",
            "_docker/_docker",
            "dock..er/docker",
            "dock_.er/docker",
            "dock-.er/docker",
            "dock___er/docker",
            "docker/",
            "a//b",
            "foo/",
            "/foo",
            "-a",
            "a-",
            "FOO",
            "Uppercase:tag",
            "localhost:5000/Foo",
            "foo bar",
            "foo:",
            "foo:-tag",
            "foo:.tag",
            "foo:tag:tag",
            "foo:tag/x",
            "foo@",
            "foo:tag@",
            ":tag",
            "@sha256:abc",
            "foo@sha256:short",
            "foo@md5",
            "example.com:/foo",
            "example.com:abc/foo",
            "[::1/foo",
            "[]:5000/foo",
            "ex_ample.com:5000/foo",
            "foo*",
            "foo?",
            "nginx\n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(H64.to_string());
        v.push(format!("foo:{}", "t".repeat(129)));
        v.push(format!("foo@sha256:{}", H64.to_uppercase()));
        v.push(format!("foo@sha256:{}", &H64[..63]));
        v.push(format!("foo@md5:{}", h(32)));
        v.push(format!("foo@SHA256:{H64}"));
        v.push(format!("example.com/{}", "a".repeat(256)));
        // "library/" pushes a 250-character single name over the limit.
        v.push("a".repeat(250));
        v.push(format!(
            "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_{}/docker",
            "x".repeat(200)
        ));
        v
    }

    #[test]
    fn valid_references_normalize() {
        let vectors = valid_vectors();
        assert!(vectors.len() >= 40);
        for (input, expected) in vectors {
            let parsed = parse_docker_ref(&input);
            assert_eq!(
                parsed.as_ref().map(ToString::to_string),
                Ok(expected.clone()),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn invalid_references_are_rejected() {
        let vectors = invalid_vectors();
        assert!(vectors.len() >= 40);
        for input in vectors {
            assert!(
                parse_docker_ref(&input).is_err(),
                "{input:?} parsed as {:?}",
                parse_docker_ref(&input)
            );
        }
    }

    #[test]
    fn error_kinds_name_the_problem() {
        assert_eq!(
            parse_docker_ref(H64),
            Err(ReferenceError::HexIdentifier(H64.to_string()))
        );
        assert_eq!(
            parse_docker_ref("docker/Docker"),
            Err(ReferenceError::Uppercase("docker/Docker".to_string()))
        );
        assert_eq!(parse_docker_ref(""), Err(ReferenceError::Empty));
        assert_eq!(
            parse_docker_ref("a//b"),
            Err(ReferenceError::InvalidFormat("a//b".to_string()))
        );
        assert!(matches!(
            parse_docker_ref(&format!("example.com/{}", "a".repeat(256))),
            Err(ReferenceError::NameTooLong { len: 256, .. })
        ));
        assert!(matches!(
            parse_docker_ref(&format!("foo@md5:{}", h(32))),
            Err(ReferenceError::DigestUnsupported { .. })
        ));
        assert!(matches!(
            parse_docker_ref(&format!("foo@sha256:{}", H64.to_uppercase())),
            Err(ReferenceError::DigestInvalidFormat(_))
        ));
        let message = parse_docker_ref("docker/Docker")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("docker/Docker") && message.contains("lowercase"));
    }

    #[test]
    fn accessors_expose_the_parts() {
        let r = parse_docker_ref("localhost:5000/foo/bar:tag").unwrap();
        assert_eq!(r.domain(), "localhost:5000");
        assert_eq!(r.path(), "foo/bar");
        assert_eq!(r.tag(), Some("tag"));
        assert_eq!(r.digest(), None);
        assert_eq!(r.name(), "localhost:5000/foo/bar");

        let r = parse_docker_ref(&format!("foo:tag@sha256:{H64}")).unwrap();
        assert_eq!(
            (r.domain(), r.path(), r.tag()),
            ("docker.io", "library/foo", None)
        );
        let d = r.digest().unwrap();
        assert_eq!((d.algorithm(), d.hex()), ("sha256", H64));

        let r = parse_docker_ref("Foo/bar").unwrap();
        assert_eq!((r.domain(), r.path()), ("Foo", "bar"));

        let r = parse_docker_ref("a_b.com/foo").unwrap();
        assert_eq!((r.domain(), r.path()), ("", "a_b.com/foo"));
        assert_eq!(r.name(), "a_b.com/foo");
    }

    #[test]
    fn normalized_named_keeps_tag_and_digest_and_adds_no_latest() {
        let r = parse_normalized_named(&format!("busybox:latest@sha256:{H64B}")).unwrap();
        assert_eq!(
            r.to_string(),
            format!("docker.io/library/busybox:latest@sha256:{H64B}")
        );
        assert_eq!(
            parse_normalized_named("redis").unwrap().to_string(),
            "docker.io/library/redis"
        );
    }

    #[test]
    fn parse_any_reference_vectors() {
        let cases = [
            (
                "redis".to_string(),
                "docker.io/library/redis".to_string(),
                4,
            ),
            (
                "redis:latest".to_string(),
                "docker.io/library/redis:latest".to_string(),
                2,
            ),
            (
                format!("dmcgowan/myapp@sha256:{H64}"),
                format!("docker.io/dmcgowan/myapp@sha256:{H64}"),
                3,
            ),
            (H64.to_string(), format!("sha256:{H64}"), 5),
            (format!("sha256:{H64}"), format!("sha256:{H64}"), 5),
            (
                H64[..63].to_string(),
                format!("docker.io/library/{}", &H64[..63]),
                4,
            ),
            (
                "dbcc1".to_string(),
                "docker.io/library/dbcc1".to_string(),
                4,
            ),
        ];
        for (input, expected, rank) in cases {
            let any = parse_any_reference(&input).unwrap();
            assert_eq!(any.to_string(), expected, "input {input:?}");
            assert_eq!(any.rank(), rank, "input {input:?}");
        }
        assert!(parse_any_reference("Not Valid").is_err());
    }

    #[test]
    fn parse_digest_vectors() {
        for ok in [
            format!("sha256:{H64}"),
            format!("sha384:{}", h(96)),
            format!("sha512:{}", h(128)),
        ] {
            let d = parse_digest(&ok).unwrap();
            assert_eq!(d.to_string(), ok);
        }
        let length = |s: String| {
            assert!(
                matches!(
                    parse_digest(&s),
                    Err(ReferenceError::DigestInvalidLength { .. })
                ),
                "{s:?}"
            )
        };
        length(format!("sha256:{}", &H64[..63]));
        length(format!("sha256:{H64}0"));
        length("sha256:abc".to_string());
        length("sha256:ABC".to_string());
        length(format!("sha512:{H64}"));
        length(format!("sha256:{H64}:x"));
        let format = |s: String| {
            assert!(
                matches!(
                    parse_digest(&s),
                    Err(ReferenceError::DigestInvalidFormat(_))
                ),
                "{s:?}"
            )
        };
        format(format!("sha256:{}", H64.to_uppercase()));
        format(format!("sha256:{}g", &H64[..63]));
        format(format!("SHA256:{H64}"));
        format(H64.to_string());
        format("abc".to_string());
        format(":abc".to_string());
        format("sha256:".to_string());
        format(String::new());
        format("Md5:abc".to_string());
        format("md5:a b".to_string());
        format("md5..x:abc".to_string());
        let unsupported = |s: &str| {
            assert!(
                matches!(
                    parse_digest(s),
                    Err(ReferenceError::DigestUnsupported { .. })
                ),
                "{s:?}"
            )
        };
        unsupported("md5:abc");
        unsupported("sha256+b64:abc=");
        unsupported("foo.bar_baz-1:x_Y-z");
        assert_eq!(known_algorithm_hex_len("sha384"), Some(96));
        assert_eq!(known_algorithm_hex_len("md5"), None);
    }

    #[test]
    fn sort_orders_by_rank_then_normalized_string() {
        let id = format!("sha256:{}", "0".repeat(64));
        let input: Vec<String> = vec![
            id.clone(),
            "docker.io/library/nginx:latest".to_string(),
            format!("nginx@sha256:{H64}"),
            "not a ref!".to_string(),
            format!("docker.io/library/nginx:1.25@sha256:{H64}"),
            "docker.io/library/nginx".to_string(),
            "ALSO BAD".to_string(),
            H64.to_string(),
            "busybox:1".to_string(),
        ];
        let expected: Vec<String> = vec![
            format!("docker.io/library/nginx:1.25@sha256:{H64}"),
            "busybox:1".to_string(),
            "docker.io/library/nginx:latest".to_string(),
            format!("nginx@sha256:{H64}"),
            "docker.io/library/nginx".to_string(),
            id,
            H64.to_string(),
            "ALSO BAD".to_string(),
            "not a ref!".to_string(),
        ];
        assert_eq!(sort_references(&input), expected);
    }

    #[test]
    fn sort_compares_normalized_strings_but_returns_originals() {
        // By original string "e.io/x:1" < "zz:1", but normalized
        // "docker.io/library/zz:1" < "e.io/x:1".
        let input = vec!["e.io/x:1".to_string(), "zz:1".to_string()];
        assert_eq!(sort_references(&input), vec!["zz:1", "e.io/x:1"]);
        // A bare 64-hex name sorts as "sha256:<hex>" but is returned as written.
        let zero = format!("sha256:{}", "0".repeat(64));
        let input = vec![H64.to_string(), zero.clone()];
        assert_eq!(sort_references(&input), vec![zero, H64.to_string()]);
        // Names equal after normalization keep a deterministic order.
        let input = vec![
            "docker.io/library/nginx:latest".to_string(),
            "nginx:latest".to_string(),
            "nginx".to_string(),
        ];
        assert_eq!(
            sort_references(&input),
            vec!["docker.io/library/nginx:latest", "nginx:latest", "nginx"]
        );
        assert!(sort_references(&[]).is_empty());
    }

    #[test]
    fn sort_puts_unparseable_names_last() {
        let input = vec![
            "b-".to_string(),
            "A".to_string(),
            "nginx".to_string(),
            String::new(),
        ];
        assert_eq!(sort_references(&input), vec!["nginx", "", "A", "b-"]);
    }

    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,6}((\\.|_|__|-{1,3})[a-z0-9]{1,6}){0,2}"
    }

    fn grammar_reference() -> impl Strategy<Value = String> {
        let domain = prop_oneof![
            Just(String::new()),
            Just("localhost/".to_string()),
            Just("docker.io/".to_string()),
            Just("index.docker.io/".to_string()),
            Just("[::1]:5000/".to_string()),
            Just("Foo.com/".to_string()),
            "[a-z0-9]{1,8}(\\.[a-z0-9]{1,8}){0,2}(:[0-9]{1,5})?/",
        ];
        let path = prop::collection::vec(component(), 1..4).prop_map(|c| c.join("/"));
        let tag = prop::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}");
        let digest = prop::option::of("[a-f0-9]{64}");
        (domain, path, tag, digest).prop_map(|(domain, path, tag, digest)| {
            let mut s = format!("{domain}{path}");
            if let Some(tag) = tag {
                s.push(':');
                s.push_str(&tag);
            }
            if let Some(hex) = digest {
                s.push_str("@sha256:");
                s.push_str(&hex);
            }
            s
        })
    }

    fn assert_idempotent(s: &str) {
        if let Ok(once) = parse_docker_ref(s) {
            let twice = parse_docker_ref(&once.to_string());
            assert_eq!(twice.as_ref(), Ok(&once), "input {s:?}");
            assert!(once.tag().is_some() != once.digest().is_some());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s in any::<String>()) {
            let _ = parse_digest(&s);
            let _ = parse_any_reference(&s);
            let _ = sort_references(&[s.clone(), "nginx".to_string()]);
            assert_idempotent(&s);
        }

        #[test]
        fn reference_like_strings_never_panic(s in "[a-zA-Z0-9._:/@\\[\\]-]{0,40}") {
            let _ = parse_any_reference(&s);
            assert_idempotent(&s);
        }

        #[test]
        fn grammar_strings_parse_and_normalize_idempotently(s in grammar_reference()) {
            let once = parse_docker_ref(&s);
            prop_assert!(once.is_ok(), "{s:?}: {once:?}");
            assert_idempotent(&s);
        }

        #[test]
        fn sort_is_a_permutation(v in prop::collection::vec(
            prop_oneof![grammar_reference(), "[a-f0-9]{64}", any::<String>()], 0..8)) {
            let mut sorted = sort_references(&v);
            let mut original = v.clone();
            sorted.sort();
            original.sort();
            prop_assert_eq!(sorted, original);
        }
    }
}
