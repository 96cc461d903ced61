//! The CRI backend on a real CRI-O (built from its Go module by `hack/tools.sh`; conmon, runc
//! and skopeo from Debian; `make e2e-crio`): remove by tag, by ID and short ID, several tags of one image,
//! pinned and in-use images kept, not found is success. CRI-O's own `RemoveImage` by name only
//! untags that name; the first test shows it beside imagegc, which removes by ID.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result, ensure};
use imagegc::cri;
use imagegc::runtime::{Backend, Connector, Runtime};
use libtest_mimic::Trial;
use testbed::BedDir;
use testbed::crio::{self, Crio};
use testbed::image::{BuiltImage, ImageBuilder};

use crate::removal;
use crate::support::{self, trial};

/// One CRI-O in a bed directory of its own (the daemon stops before the directory goes).
struct Node {
    crio: Crio,
    _dir: BedDir,
}

fn node(pinned: &[&str]) -> Result<Node> {
    testbed::process::install_signal_handler();
    let dir = BedDir::new()?;
    let crio = Crio::start(dir.path(), "crio", pinned)?;
    Ok(Node { crio, _dir: dir })
}

/// CRI-O's images: normalized ID → tags and digest references.
async fn listing(socket: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    Ok(testbed::cri::images(socket)
        .await?
        .into_iter()
        .map(|(id, refs)| (imagegc::core::inventory::normalize_id(&id), refs))
        .collect())
}

fn tags(listing: &BTreeMap<String, BTreeSet<String>>, id: &str) -> BTreeSet<String> {
    listing
        .get(id)
        .map(|refs| refs.iter().filter(|r| !r.contains('@')).cloned().collect())
        .unwrap_or_default()
}

/// `imagegc rmi` on CRI-O's socket (the backend found on its own); (exit code, stdout).
fn rmi(socket: &Path, args: &[&str]) -> Result<(i32, String, String)> {
    let socket = socket.to_str().context("socket path")?;
    let mut all = vec!["rmi", "--socket", socket];
    all.extend_from_slice(args);
    support::imagegc(&all)
}

fn bare(id: &str) -> &str {
    id.trim_start_matches("sha256:")
}

const A_NAMES: [&str; 3] = [
    "docker.io/library/a:1",
    "docker.io/library/a:2",
    "quay.io/x/a:3",
];

fn images() -> (BuiltImage, BuiltImage) {
    (
        ImageBuilder::new("crio-a").layer_sizes(&[4096]).build(),
        ImageBuilder::new("crio-keep").build(),
    )
}

/// By tag, an image with several tags goes with every tag (one RemoveImage by ID), where
/// CRI-O's own RemoveImage by that tag leaves the other two; by ID, CRI-O agrees.
async fn a_tag_removes_every_name_where_crio_untags_one() -> Result<()> {
    let (ours, theirs) = (node(&[])?, node(&[])?);
    let (a, keep) = images();
    for n in [&ours, &theirs] {
        n.crio.import(&a, &A_NAMES)?;
        n.crio.import(&keep, &["docker.io/library/keep:1"])?;
    }
    let before = listing(&ours.crio.socket).await?;
    ensure!(
        tags(&before, &a.id())
            == support::strings(&A_NAMES)
                .into_iter()
                .collect::<BTreeSet<_>>(),
        "CRI-O does not list a under its three tags: {before:?}"
    );

    let (code, out, err) = rmi(&ours.crio.socket, &["a:2"])?;
    ensure!(code == 0, "exit {code}: {out}{err}");
    ensure!(
        out.contains("a:2: removed image") && out.contains("removed 1 image(s) by ID"),
        "{out}"
    );
    let after = listing(&ours.crio.socket).await?;
    ensure!(
        after.keys().collect::<Vec<_>>() == [&keep.id()],
        "left on CRI-O: {after:?}"
    );

    // CRI-O's own RemoveImage by the same tag: only that tag goes.
    testbed::cri::remove(&theirs.crio.socket, "docker.io/library/a:2")
        .await?
        .map_err(anyhow::Error::msg)?;
    let untagged = listing(&theirs.crio.socket).await?;
    ensure!(
        tags(&untagged, &a.id())
            == BTreeSet::from(["docker.io/library/a:1", "quay.io/x/a:3"].map(String::from)),
        "CRI-O's RemoveImage by tag did more than untag: {untagged:?}"
    );
    // By ID it removes the image, and both CRI-Os end the same.
    testbed::cri::remove(&theirs.crio.socket, bare(&a.id()))
        .await?
        .map_err(anyhow::Error::msg)?;
    ensure!(
        listing(&theirs.crio.socket).await? == after,
        "CRI-O's RemoveImage by ID and imagegc differ"
    );
    Ok(())
}

/// By full ID, by short ID and by digest reference, several images in one call.
async fn ids_and_digests_in_one_batch() -> Result<()> {
    let n = node(&[])?;
    let (a, keep) = images();
    let b = ImageBuilder::new("crio-b").build();
    let c = ImageBuilder::new("crio-c").build();
    n.crio.import(&a, &["docker.io/library/a:1"])?;
    n.crio
        .import(&b, &["docker.io/library/b:1", "docker.io/library/b:2"])?;
    n.crio.import(&c, &["docker.io/library/c:1"])?;
    n.crio.import(&keep, &["docker.io/library/keep:1"])?;
    let before = listing(&n.crio.socket).await?;
    let c_digest = before[&c.id()]
        .iter()
        .find(|r| r.contains('@'))
        .cloned()
        .context("CRI-O lists no digest reference for c")?;
    let b_id = b.id();
    let short_b = &bare(&b_id)[..12];
    let (code, out, err) = rmi(&n.crio.socket, &[&a.id(), short_b, &c_digest])?;
    ensure!(code == 0, "exit {code}: {out}{err}");
    ensure!(out.contains("removed 3 image(s) by ID"), "{out}");
    let after = listing(&n.crio.socket).await?;
    ensure!(
        after.keys().collect::<Vec<_>>() == [&keep.id()],
        "left on CRI-O: {after:?}"
    );
    Ok(())
}

/// Pinned (CRI-O's `pinned_images` and its pause image) and in-use images are kept; a forced
/// removal of an image a container uses is refused by CRI-O itself and reported as an error.
async fn pinned_and_in_use_are_kept() -> Result<()> {
    let n = node(&["docker.io/library/pinned:1"])?;
    let (app, _) = images();
    let pinned = ImageBuilder::new("crio-pinned").build();
    let pause = ImageBuilder::new("crio-pause").build();
    n.crio.import(&app, &["docker.io/library/app:1"])?;
    n.crio.import(&pinned, &["docker.io/library/pinned:1"])?;
    n.crio.import(&pause, &[crio::PAUSE_IMAGE])?;
    let container = crio::create_container(&n.crio.socket, "web", "docker.io/library/app:1")
        .await
        .with_context(|| n.crio.log_tail(20))?;
    let before = listing(&n.crio.socket).await?;

    let socket = n.crio.socket.to_str().context("socket")?;
    let (code, json, err) = support::imagegc(&["images", "--socket", socket, "-o", "json"])?;
    ensure!(code == 0, "exit {code}: {err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json)?;
    let row = |id: &str| rows.iter().find(|r| r["id"] == id).cloned();
    let app_row = row(&app.id()).context("app not listed")?;
    ensure!(
        app_row["in_use"] == true && app_row["used_by"][0] == container.as_str(),
        "{app_row}"
    );
    for id in [pinned.id(), pause.id()] {
        ensure!(row(&id).is_some_and(|r| r["pinned"] == true), "{json}");
    }

    let (code, out, _) = rmi(
        &n.crio.socket,
        &["--force", "pinned:1", crio::PAUSE_IMAGE, &pinned.id()],
    )?;
    ensure!(
        code == 1 && out.matches("Pinned").count() == 3,
        "exit {code}: {out}"
    );
    let (code, out, _) = rmi(&n.crio.socket, &["app:1"])?;
    ensure!(
        code == 1 && out.contains("InUse") && out.contains(&container),
        "{out}"
    );
    // Forced: CRI-O's storage refuses an image a container uses; its reason is the one line.
    let (code, _, err) = rmi(&n.crio.socket, &["--force", "app:1"])?;
    ensure!(
        code == 2 && err.lines().count() == 1 && err.contains("in use by a container"),
        "exit {code}: {err}"
    );
    ensure!(
        listing(&n.crio.socket).await? == before,
        "a pinned or in-use image changed"
    );
    Ok(())
}

/// An absent tag or ID is success, through the CLI and through the backend's own call; an image
/// removed by someone else between the plan and its execution is "already gone".
async fn not_found_is_success() -> Result<()> {
    let n = node(&[])?;
    let (a, keep) = images();
    n.crio.import(&keep, &["docker.io/library/keep:1"])?;
    let (code, out, err) = rmi(&n.crio.socket, &["docker.io/library/absent:1", &a.id()])?;
    ensure!(code == 0, "exit {code}: {out}{err}");
    ensure!(out.matches("NotPresent").count() == 2, "{out}");

    let rt = cri::Runtime::connect(&n.crio.socket, Default::default()).await?;
    rt.remove_image(bare(&a.id())).await?;
    rt.remove_image("docker.io/library/absent:1").await?;

    n.crio.import(&a, &["docker.io/library/a:1"])?;
    let kinds = removal::remove(&n.crio.socket, &["a:1".into()], false, Backend::Cri).await?;
    ensure!(kinds == ["Removed"], "{kinds:?}");
    n.crio.import(&a, &["docker.io/library/a:1"])?;
    let rt = Connector::new(Some(n.crio.socket.clone()), Backend::Auto, "k8s.io")
        .connect(false)
        .await?;
    ensure!(matches!(rt, Runtime::Cri(_)), "auto chose {}", rt.backend());
    let matcher = imagegc::core::platform::Matcher::only(imagegc::core::platform::Platform::host());
    let inv = rt.inventory(&matcher).await?;
    let plan = imagegc::core::plan::plan(
        &imagegc::core::plan::Request {
            images: vec!["a:1".into()],
            force: false,
            ..Default::default()
        },
        &inv,
    );
    testbed::cri::remove(&n.crio.socket, bare(&a.id()))
        .await?
        .map_err(anyhow::Error::msg)?;
    let done = rt.execute(plan).await?;
    ensure!(
        done.already_gone == [a.id()] && done.deleted.is_empty(),
        "{done:?}"
    );
    Ok(())
}

/// The backend is found on its own, and naming the wrong one says what to do.
async fn auto_finds_cri_and_containerd_backend_says_use_cri() -> Result<()> {
    let n = node(&[])?;
    let (a, _) = images();
    n.crio.import(&a, &["docker.io/library/a:1"])?;
    let socket = n.crio.socket.to_str().context("socket")?;
    let (code, table, err) = support::imagegc(&["images", "--socket", socket])?;
    ensure!(
        code == 0 && table.contains("docker.io/library/a:1"),
        "exit {code}: {table}{err}"
    );
    let (code, _, err) =
        support::imagegc(&["images", "--socket", socket, "--runtime", "containerd"])?;
    ensure!(
        code == 2 && err.lines().count() == 1 && err.contains("--runtime cri"),
        "exit {code}: {err}"
    );
    Ok(())
}

/// CRI-O's trials run with `make e2e-crio` (`--ignored crio::`): they need CRI-O built from its
/// Go module and three more Debian packages, which `make test` does not install.
pub fn trials() -> Vec<Trial> {
    let trials = vec![
        trial(
            "crio::a_tag_removes_every_name_where_crio_untags_one",
            a_tag_removes_every_name_where_crio_untags_one,
        ),
        trial(
            "crio::ids_and_digests_in_one_batch",
            ids_and_digests_in_one_batch,
        ),
        trial(
            "crio::pinned_and_in_use_are_kept",
            pinned_and_in_use_are_kept,
        ),
        trial("crio::not_found_is_success", not_found_is_success),
        trial(
            "crio::auto_finds_cri_and_containerd_backend_says_use_cri",
            auto_finds_cri_and_containerd_backend_says_use_cri,
        ),
    ];
    trials
        .into_iter()
        .map(|t| t.with_ignored_flag(true))
        .collect()
}
