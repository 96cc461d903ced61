//! The imagegc container image, built without Docker (`make image`): the binary and exactly the
//! shared libraries it links, as `ldd` resolves them on this machine, at the same paths; the
//! Dockerfile's entrypoint and non-root user; written as an OCI image-layout tarball that
//! `ctr images import` reads.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::image::{self, BuiltImage, ImageBuilder, LayerFile};

/// Where the binary lives in the image (the Dockerfile's `COPY` destination and entrypoint).
pub const BINARY_PATH: &str = "/usr/local/bin/imagegc";

/// The image's default user: distroless' `nonroot` (the chart sets the user of each pod).
pub const USER: &str = "65532:65532";

/// The shared libraries (and the dynamic loader) in `ldd`'s output, in its order; empty for a
/// static binary. A library `ldd` cannot find is an error naming it.
pub fn parse_ldd(output: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") || line.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux-x86-64.so.2
        // (0x…)", or the kernel's "linux-vdso.so.1 (0x…)", which is no file.
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("ldd cannot find {}, which the binary needs", name.trim());
                }
                rest.split_whitespace().next().unwrap_or_default()
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// The files of the image: `binary` at [`BINARY_PATH`] and every library it links at the path
/// the loader looks for it (symbolic links resolved into plain files).
pub fn runtime_files(binary: &Path) -> Result<Vec<LayerFile>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (Debian package libc-bin)")?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let libs = parse_ldd(&text).with_context(|| format!("ldd {}", binary.display()))?;
    let mut files = vec![LayerFile {
        path: BINARY_PATH.into(),
        mode: 0o755,
        bytes: fs::read(binary).with_context(|| format!("reading {}", binary.display()))?,
    }];
    for lib in libs {
        files.push(LayerFile {
            path: lib.to_string_lossy().into_owned(),
            mode: 0o755,
            bytes: fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?,
        });
    }
    Ok(files)
}

/// The image of `binary`: one layer of [`runtime_files`], entrypoint [`BINARY_PATH`], user
/// [`USER`], for this host's platform.
pub fn build(binary: &Path, version: &str) -> Result<BuiltImage> {
    let layer = image::files_tar(&runtime_files(binary)?)?;
    Ok(ImageBuilder::new("imagegc")
        .layer_tars(vec![layer])
        .entrypoint(&[BINARY_PATH])
        .user(USER)
        .config_label("org.opencontainers.image.title", "imagegc")
        .config_label("org.opencontainers.image.version", version)
        .build())
}

/// Builds the image of `binary` and writes it to `out` as an OCI archive named `name`.
pub fn write(binary: &Path, name: &str, out: &Path) -> Result<BuiltImage> {
    let version = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    let img = build(binary, version)?;
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    image::write_oci_archive(&img, name, out)?;
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_of_a_dynamic_binary() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn ldd_output_of_a_static_binary_and_a_missing_library() {
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
        assert!(
            parse_ldd("\tnot a dynamic executable\n")
                .unwrap()
                .is_empty()
        );
        let err = parse_ldd("\tlibssl.so.3 => not found\n").unwrap_err();
        assert!(err.to_string().contains("libssl.so.3"), "{err}");
    }
}
