//! Resolve a user's image string to one CRI image ID, as containerd's CRI `localResolve` does.
//!
//! The order is CRI's: a full digest is an image ID and is looked up exactly; otherwise a
//! string that parses as a docker reference is normalized and looked up among the image
//! record names; otherwise (and also when that name is unknown) the string is a possibly
//! shortened ID, matched by prefix like go-digest's `digestset.Lookup`.
//!
//! Before any of that, [`validate`] rejects strings CRI would accept but that are almost
//! certainly mistakes, the worst being `""`, which CRI resolves to the only image on a node.

use std::collections::{BTreeMap, BTreeSet};

use crate::core::reference::{
    ReferenceError, known_algorithm_hex_len, parse_digest, parse_docker_ref,
};

/// Longest input accepted, in bytes. Real references are far shorter (paths are capped at 255
/// characters, tags at 128, digests at 135).
pub const MAX_INPUT_LEN: usize = 4096;

/// Outcome of resolving a valid input against the CRI image set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Exactly one image: its full ID, `sha256:<hex>`, taken from the given ID set.
    Found(String),
    /// No image matches. CRI treats this as a successful removal of nothing.
    NotFound,
    /// A short ID matched several images (sorted IDs). CRI returns an error and removes nothing.
    Ambiguous(Vec<String>),
}

/// Why an input was refused before any lookup; nothing is touched for such inputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    /// Empty or only whitespace (CRI would match every image with it).
    #[error(
        "the image is empty: give an image reference (e.g. nginx:1.25), an image ID \
         (sha256:<64 hex>) or a short ID"
    )]
    Empty,
    /// Longer than [`MAX_INPUT_LEN`] bytes.
    #[error(
        "the image is {len} bytes long, at most {MAX_INPUT_LEN} are accepted; no image has such a name"
    )]
    TooLong {
        /// Length of the input in bytes.
        len: usize,
    },
    /// Contains whitespace or a control character.
    #[error(
        "the image {input:?} contains whitespace or a control character; image names and IDs \
         never do, check for stray spaces or line breaks"
    )]
    Whitespace {
        /// The offending input.
        input: String,
    },
    /// Contains a glob character; inputs are never patterns.
    #[error(
        "the image {input:?} contains the wildcard character {character:?}; patterns are not \
         supported, name each image exactly"
    )]
    Wildcard {
        /// The offending input.
        input: String,
        /// The first wildcard character found.
        character: char,
    },
    /// An image ID or digest written with uppercase letters, which never match.
    #[error(
        "the image {input:?} looks like an image ID or digest but has uppercase letters; IDs \
         and digests are lowercase hex, e.g. sha256:79b5a5d1"
    )]
    UppercaseHex {
        /// The offending input.
        input: String,
    },
    /// Neither a full digest, a docker reference nor a short ID.
    #[error(
        "the image {input:?} is neither an image reference, an image ID nor a short ID: {reason}"
    )]
    Unrecognized {
        /// The offending input.
        input: String,
        /// What the reference (or digest) parser objected to.
        reason: ReferenceError,
    },
}

/// Checks that `input` is something worth resolving, without looking anything up.
///
/// Accepted: a full digest (`sha256:<64 hex>`), a valid docker reference, or a short ID
/// (`[a-f0-9]+`, or `<algorithm>:[a-f0-9]+` with sha256/sha384/sha512). `[` and `]` are taken
/// as wildcards unless the whole input is a valid reference, where they can only be the
/// brackets of an IPv6 registry (`[fc00::1]:5000/app`).
pub fn validate(input: &str) -> Result<(), InvalidInput> {
    if input.trim().is_empty() {
        return Err(InvalidInput::Empty);
    }
    if input.len() > MAX_INPUT_LEN {
        return Err(InvalidInput::TooLong { len: input.len() });
    }
    if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(InvalidInput::Whitespace {
            input: input.to_string(),
        });
    }
    let as_reference = parse_docker_ref(input);
    let wildcard = input
        .chars()
        .find(|c| matches!(c, '*' | '?') || (matches!(c, '[' | ']') && as_reference.is_err()));
    if let Some(character) = wildcard {
        return Err(InvalidInput::Wildcard {
            input: input.to_string(),
            character,
        });
    }
    // Checked before the reference grammar: `sha256:ABC` is a valid name with tag `ABC`, but
    // the user surely meant an ID, and uppercase hex never matches one.
    if is_uppercase_hex_id(input) {
        return Err(InvalidInput::UppercaseHex {
            input: input.to_string(),
        });
    }
    let digest_error = match parse_digest(input) {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let reference_error = match as_reference {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    if is_short_id(input) {
        return Ok(());
    }
    // Explain with the digest error when the input was evidently meant as one.
    let meant_as_digest = input
        .split_once(':')
        .is_some_and(|(algorithm, _)| known_algorithm_hex_len(algorithm).is_some());
    let reason = if meant_as_digest {
        digest_error
    } else {
        reference_error
    };
    Err(InvalidInput::Unrecognized {
        input: input.to_string(),
        reason,
    })
}

/// Resolves `input` to one CRI image, exactly as CRI `RemoveImage` would, after [`validate`].
///
/// - `ids`: every CRI image ID (`sha256:<hex>`, the config digest) on the node.
/// - `ref_to_id`: every image record name, exactly as stored in containerd, mapped to its ID.
///
/// A reference is looked up by its normalized form only (`nginx` → the key
/// `docker.io/library/nginx:latest`), so a record stored under a non-normalized name such as
/// `nginx:latest` is not found by name; the input then falls through to the short-ID lookup,
/// as in CRI. [`Resolution::Found`] always carries an element of `ids`.
pub fn resolve(
    input: &str,
    ids: &BTreeSet<String>,
    ref_to_id: &BTreeMap<String, String>,
) -> Result<Resolution, InvalidInput> {
    validate(input)?;
    let key = if parse_digest(input).is_ok() {
        input
    } else if let Ok(reference) = parse_docker_ref(input)
        && let Some(id) = ref_to_id.get(&reference.to_string())
    {
        id.as_str()
    } else {
        input
    };
    Ok(lookup_id(key, ids))
}

/// Looks up a full or shortened ID in `ids` with go-digest `digestset.Lookup` semantics,
/// without validation.
///
/// Without a `:` (or when the string is not even digest-shaped) the whole string is a prefix
/// of the hex part under any algorithm; with `<algorithm>:<hex>` the algorithm must be equal
/// and the hex is a prefix. An exact hex match wins; otherwise one match is
/// [`Resolution::Found`] and several are [`Resolution::Ambiguous`]. Entries of `ids` that are
/// not valid digests are ignored, as a digest set cannot hold them.
///
/// Beware: the empty string is a prefix of everything (the CRI hazard [`validate`] prevents).
pub fn lookup_id(key: &str, ids: &BTreeSet<String>) -> Resolution {
    let (algorithm, prefix) = match parse_digest(key) {
        Ok(_)
        | Err(ReferenceError::DigestInvalidLength { .. })
        | Err(ReferenceError::DigestUnsupported { .. }) => match key.split_once(':') {
            Some((algorithm, hex)) => (Some(algorithm), hex),
            None => (None, key),
        },
        Err(_) => (None, key),
    };
    let mut matches = Vec::new();
    for id in ids {
        let Ok(digest) = parse_digest(id) else {
            continue;
        };
        if algorithm.is_some_and(|a| a != digest.algorithm()) || !digest.hex().starts_with(prefix) {
            continue;
        }
        if digest.hex() == prefix {
            return Resolution::Found(id.clone());
        }
        matches.push(id.clone());
    }
    match matches.len() {
        0 => Resolution::NotFound,
        1 => matches
            .pop()
            .map_or(Resolution::NotFound, Resolution::Found),
        _ => Resolution::Ambiguous(matches),
    }
}

/// `[a-f0-9]+` or `<known algorithm>:[a-f0-9]+`.
fn is_short_id(s: &str) -> bool {
    let is_lower_hex = |h: &str| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    match s.split_once(':') {
        Some((algorithm, hex)) => known_algorithm_hex_len(algorithm).is_some() && is_lower_hex(hex),
        None => is_lower_hex(s),
    }
}

/// An ID or digest form (`[0-9a-fA-F]+`, optionally after a known algorithm in any case) that
/// has at least one uppercase letter.
fn is_uppercase_hex_id(s: &str) -> bool {
    let hex = match s.split_once(':') {
        Some((algorithm, hex))
            if known_algorithm_hex_len(&algorithm.to_ascii_lowercase()).is_some() =>
        {
            hex
        }
        Some(_) => return false,
        None => s,
    };
    !hex.is_empty()
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && s.bytes().any(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: &str = "sha256:79b5a5d1e3c4b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7";
    const B: &str = "sha256:79b5ff00e3c4b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7";
    const C: &str = "sha256:abc123d1e3c4b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7";
    const MANIFEST: &str =
        "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn ids() -> BTreeSet<String> {
        [A, B, C].iter().map(|s| s.to_string()).collect()
    }

    fn refs() -> BTreeMap<String, String> {
        [
            ("docker.io/library/nginx:latest", A),
            ("docker.io/library/nginx:1.25", A),
            // A record stored under a non-normalized name.
            ("busybox:1", B),
            (&*format!("docker.io/library/app@{MANIFEST}"), C),
            // A name whose normalized form is also a short-ID prefix of B.
            ("docker.io/library/abc123:latest", B),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn run(input: &str) -> Result<Resolution, InvalidInput> {
        resolve(input, &ids(), &refs())
    }

    fn found(id: &str) -> Result<Resolution, InvalidInput> {
        Ok(Resolution::Found(id.to_string()))
    }

    #[test]
    fn full_id_is_looked_up_exactly() {
        assert_eq!(run(A), found(A));
        let missing = "sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";
        assert_eq!(run(missing), Ok(Resolution::NotFound));
    }

    #[test]
    fn manifest_digest_is_not_an_image_id() {
        // Full digests skip the reference lookup, so a manifest/index digest finds nothing.
        assert_eq!(run(MANIFEST), Ok(Resolution::NotFound));
    }

    #[test]
    fn references_are_normalized_before_lookup() {
        assert_eq!(run("nginx"), found(A));
        assert_eq!(run("nginx:latest"), found(A));
        assert_eq!(run("docker.io/library/nginx"), found(A));
        assert_eq!(run("index.docker.io/library/nginx:1.25"), found(A));
        assert_eq!(run(&format!("app@{MANIFEST}")), found(C));
        // The tag is dropped when a digest is present.
        assert_eq!(run(&format!("app:v1@{MANIFEST}")), found(C));
    }

    #[test]
    fn reference_miss_falls_back_to_short_id() {
        assert_eq!(run("nginx:1.26"), Ok(Resolution::NotFound));
        // Not a known name, but a unique prefix of C.
        assert_eq!(run("abc1"), found(C));
    }

    #[test]
    fn reference_lookup_wins_over_short_id() {
        // "abc123" is a prefix of C, but the name docker.io/library/abc123:latest is B.
        assert_eq!(run("abc123"), found(B));
    }

    #[test]
    fn raw_record_names_are_not_normalized() {
        // The record is named "busybox:1"; CRI looks up "docker.io/library/busybox:1".
        assert_eq!(run("busybox:1"), Ok(Resolution::NotFound));
        assert_eq!(run("docker.io/library/busybox:1"), Ok(Resolution::NotFound));
    }

    #[test]
    fn reference_to_an_unknown_id_is_not_found() {
        let mut map = refs();
        map.insert("docker.io/library/ghost:latest".into(), MANIFEST.into());
        assert_eq!(resolve("ghost", &ids(), &map), Ok(Resolution::NotFound));
    }

    #[test]
    fn short_ids() {
        assert_eq!(run("79b5a"), found(A));
        assert_eq!(run(&A[7..]), found(A));
        assert_eq!(
            run("79b5"),
            Ok(Resolution::Ambiguous(vec![A.to_string(), B.to_string()]))
        );
        assert_eq!(
            run("7"),
            Ok(Resolution::Ambiguous(vec![A.into(), B.into()]))
        );
        assert_eq!(run("dead"), Ok(Resolution::NotFound));
        assert_eq!(run("sha256:79b5f"), found(B));
        assert_eq!(
            run("sha256:79b5"),
            Ok(Resolution::Ambiguous(vec![A.into(), B.into()]))
        );
        // The algorithm must match when given.
        assert_eq!(run("sha512:79b5f"), Ok(Resolution::NotFound));
        assert_eq!(
            resolve("79b5a", &BTreeSet::new(), &refs()),
            Ok(Resolution::NotFound)
        );
    }

    #[test]
    fn lookup_id_follows_digestset() {
        let ids = ids();
        assert_eq!(
            lookup_id("", &ids),
            Resolution::Ambiguous(vec![A.into(), B.into(), C.into()])
        );
        let one: BTreeSet<String> = [A.to_string()].into();
        // The hazard validation exists for: "" matches the only image.
        assert_eq!(lookup_id("", &one), Resolution::Found(A.into()));
        assert_eq!(lookup_id("sha256:", &one), Resolution::NotFound);
        assert_eq!(lookup_id("sha256:79B5", &one), Resolution::NotFound);
        assert_eq!(lookup_id("md5:79b5", &one), Resolution::NotFound);
        // Invalid entries cannot be in a digest set.
        let junk: BTreeSet<String> = ["79b5".to_string(), "sha256:79b5".to_string()].into();
        assert_eq!(lookup_id("79b5", &junk), Resolution::NotFound);
    }

    #[test]
    fn invalid_inputs() {
        let invalid = |input: &str| run(input).err();
        assert_eq!(invalid(""), Some(InvalidInput::Empty));
        assert_eq!(invalid("   "), Some(InvalidInput::Empty));
        assert_eq!(invalid("\t\n"), Some(InvalidInput::Empty));
        assert!(matches!(
            invalid("nginx latest"),
            Some(InvalidInput::Whitespace { .. })
        ));
        assert!(matches!(
            invalid(" nginx"),
            Some(InvalidInput::Whitespace { .. })
        ));
        assert!(matches!(
            invalid("nginx\u{7f}"),
            Some(InvalidInput::Whitespace { .. })
        ));
        assert!(matches!(
            invalid("nginx\u{0}"),
            Some(InvalidInput::Whitespace { .. })
        ));
        for (input, character) in [
            ("nginx*", '*'),
            ("*", '*'),
            ("ngin?", '?'),
            ("nginx:1.[12]", '['),
            ("79b5]", ']'),
            ("[::1]", '['),
        ] {
            assert_eq!(
                invalid(input),
                Some(InvalidInput::Wildcard {
                    input: input.into(),
                    character
                })
            );
        }
        for input in [
            "79B5A5",
            "sha256:ABC",
            "sha256:79b5A",
            "SHA256:79b5",
            "FACE",
        ] {
            assert_eq!(
                invalid(input),
                Some(InvalidInput::UppercaseHex {
                    input: input.into()
                }),
                "{input:?}"
            );
        }
        let long = "a".repeat(MAX_INPUT_LEN + 1);
        assert_eq!(
            invalid(&long),
            Some(InvalidInput::TooLong {
                len: MAX_INPUT_LEN + 1
            })
        );
        for input in [
            "Nginx",
            "a//b",
            "-a",
            "foo:",
            "docker/Docker",
            "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a:",
            "sha256:xyz:1",
            "md5:",
        ] {
            assert!(
                matches!(invalid(input), Some(InvalidInput::Unrecognized { .. })),
                "{input:?} gave {:?}",
                run(input)
            );
        }
    }

    #[test]
    fn valid_edge_inputs() {
        // IPv6 registries use brackets legitimately.
        assert_eq!(validate("[fc00::1]:5000/app:1"), Ok(()));
        // A bare 64-hex ID is not a reference but is a (full-length) short ID.
        assert_eq!(validate(&A[7..]), Ok(()));
        assert_eq!(validate(&format!("sha512:{}", "ab".repeat(64))), Ok(()));
        // "sha256:abc" is both a valid name with a tag and a short ID.
        assert_eq!(validate("sha256:abc"), Ok(()));
        assert_eq!(validate(&"a".repeat(200)), Ok(()));
    }

    #[test]
    fn messages_say_what_to_do() {
        let text = |input: &str| run(input).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(text("").contains("empty"));
        assert!(text("nginx*").contains("wildcard"));
        assert!(text("sha256:ABC").contains("lowercase"));
        assert!(text("Nginx").contains("Nginx") && text("Nginx").contains("lowercase"));
        let digest = text(&format!("sha256:{}", "A".repeat(64)));
        assert!(digest.contains("uppercase"), "{digest}");
        let mixed = text("sha256:abc@x");
        assert!(
            mixed.contains("sha256:abc@x") && mixed.contains("64"),
            "{mixed}"
        );
    }

    fn hex_id() -> impl Strategy<Value = String> {
        "[0-9a-f]{64}".prop_map(|h| format!("sha256:{h}"))
    }

    proptest! {
        #[test]
        fn resolve_never_invents_ids(
            input in prop_oneof![
                any::<String>(),
                "[a-f0-9:sha256]{0,12}",
                "[a-z0-9./:@-]{0,24}",
            ],
            id_list in prop::collection::vec(
                prop_oneof![hex_id(), "sha256:[0-9a-f]{1,3}", "[a-f]{0,4}"], 0..6),
            names in prop::collection::vec(("[a-z]{1,3}", hex_id()), 0..4),
        ) {
            let ids: BTreeSet<String> = id_list.into_iter().collect();
            let map: BTreeMap<String, String> = names
                .into_iter()
                .map(|(n, id)| (format!("docker.io/library/{n}:latest"), id))
                .collect();
            match resolve(&input, &ids, &map) {
                Ok(Resolution::Found(id)) => prop_assert!(ids.contains(&id)),
                Ok(Resolution::Ambiguous(found)) => {
                    prop_assert!(found.len() >= 2);
                    prop_assert!(found.iter().all(|id| ids.contains(id)));
                }
                Ok(Resolution::NotFound) => {}
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn prefixes_of_present_ids_resolve_or_are_ambiguous(
            id_list in prop::collection::vec(hex_id(), 1..6),
            pick in any::<prop::sample::Index>(),
            len in 1usize..=64,
        ) {
            let ids: BTreeSet<String> = id_list.into_iter().collect();
            let all: Vec<&String> = ids.iter().collect();
            let target = all[pick.index(all.len())];
            let prefix = &target[7..7 + len];
            match resolve(prefix, &ids, &BTreeMap::new()) {
                Ok(Resolution::Found(id)) => prop_assert_eq!(&id, target),
                Ok(Resolution::Ambiguous(found)) => prop_assert!(found.contains(target)),
                other => prop_assert!(false, "{prefix:?} gave {other:?}"),
            }
        }
    }
}
