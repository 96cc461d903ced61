//! Removal, judged against containerd's own CRI `RemoveImage`: for each scenario two nodes get
//! identical states; imagegc removes on one, CRI on the other, and the remaining image records
//! and content blobs must be identical — with each backend: containerd's own API, and the CRI
//! backend on containerd's CRI socket. Then the deliberate differences, each with its own test:
//! pinned images are never removed, images in use only with force, bad input touches nothing,
//! and an interrupted removal is finished by the next run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result, ensure};
use imagegc::agent::report::{self, Run};
use imagegc::containerd::Runtime;
use imagegc::core::inventory::Inventory;
use imagegc::core::plan::{self, Plan, Request};
use imagegc::core::platform::{Matcher, Platform};
use imagegc::runtime::{Backend, Connector};
use libtest_mimic::Trial;
use testbed::Flavor;
use testbed::image::{self, BuiltImage, ImageBuilder};

use crate::support::{self, FLAVORS, NS, import, import_labelled, nodes, state, trial};

/// One image to put on both nodes.
struct Import {
    namespace: &'static str,
    image: BuiltImage,
    names: Vec<String>,
}

/// A scenario: what the nodes hold, what is asked to be removed, and the outcome imagegc must
/// report for each requested string.
struct Scenario {
    imports: Vec<Import>,
    remove: Vec<String>,
    expect: Vec<&'static str>,
}

fn imp(image: &BuiltImage, names: &[&str]) -> Import {
    Import {
        namespace: NS,
        image: image.clone(),
        names: support::strings(names),
    }
}

fn short(id: &str, n: usize) -> String {
    id.trim_start_matches("sha256:")[..n].to_string()
}

/// An image record pointing at `img`'s manifest for this host instead of its index.
fn platform_manifest(img: &BuiltImage) -> BuiltImage {
    let digest = &img.manifest_digests[&image::host_platform()];
    let mut m = img.clone();
    m.target = img
        .blobs
        .iter()
        .find(|b| &b.digest == digest)
        .expect("manifest blob")
        .descriptor();
    m
}

/// Two images whose IDs share their first two hex digits.
fn colliding_pair() -> (BuiltImage, BuiltImage) {
    let mut by_prefix: BTreeMap<String, BuiltImage> = BTreeMap::new();
    for i in 0.. {
        let img = ImageBuilder::new("prefix")
            .config_label("n", i.to_string())
            .build();
        let p = short(&img.id(), 2);
        if let Some(other) = by_prefix.remove(&p) {
            return (other, img);
        }
        by_prefix.insert(p, img);
    }
    unreachable!()
}

fn scenarios() -> Vec<(&'static str, Scenario)> {
    let a = ImageBuilder::new("a").layer_sizes(&[4096, 2048]).build();
    let b = ImageBuilder::new("b").build();
    let keep = ImageBuilder::new("keep").build();
    let multi = ImageBuilder::new("multi")
        .platforms(&[
            image::host_platform().as_str(),
            "linux/arm64",
            "linux/arm/v7",
        ])
        .build();
    let docker = ImageBuilder::new("docker").docker().build();
    let base_a = ImageBuilder::new("sa")
        .shared_base("base", 8192)
        .layer_sizes(&[1000])
        .build();
    let base_b = ImageBuilder::new("sb")
        .shared_base("base", 8192)
        .layer_sizes(&[2000])
        .build();
    let (p1, p2) = colliding_pair();
    let a_digest_ref = format!(
        "docker.io/library/a@{}",
        a.manifest_digests[&image::host_platform()]
    );
    let multi_digest_ref = format!(
        "docker.io/library/multi@{}",
        multi.manifest_digests[&image::host_platform()]
    );
    let s = support::strings;
    vec![
        (
            "one_tag",
            Scenario {
                imports: vec![
                    imp(&a, &["docker.io/library/a:1"]),
                    imp(&keep, &["docker.io/library/keep:1"]),
                ],
                remove: s(&["docker.io/library/a:1"]),
                expect: vec!["Removed"],
            },
        ),
        (
            "several_tags_of_one_image",
            Scenario {
                imports: vec![
                    imp(
                        &a,
                        &[
                            "docker.io/library/a:1",
                            "docker.io/library/a:2",
                            "quay.io/x/a:latest",
                        ],
                    ),
                    imp(&keep, &["docker.io/library/keep:1"]),
                ],
                remove: s(&["a:2"]),
                expect: vec!["Removed"],
            },
        ),
        (
            "tag_digest_reference_and_id_by_digest",
            Scenario {
                imports: vec![
                    imp(&a, &["docker.io/library/a:1", &a_digest_ref]),
                    imp(&keep, &["docker.io/library/keep:1"]),
                ],
                remove: vec![a_digest_ref.clone()],
                expect: vec!["Removed"],
            },
        ),
        (
            "multi_arch_index_and_platform_digest_name",
            Scenario {
                imports: vec![
                    imp(&multi, &["docker.io/library/multi:1"]),
                    Import {
                        namespace: NS,
                        image: platform_manifest(&multi),
                        names: vec![multi_digest_ref.clone()],
                    },
                    imp(&keep, &["docker.io/library/keep:1"]),
                ],
                remove: s(&["multi:1"]),
                expect: vec!["Removed"],
            },
        ),
        (
            "full_id",
            Scenario {
                imports: vec![
                    imp(&a, &["docker.io/library/a:1", "docker.io/library/a:2"]),
                    imp(&keep, &["docker.io/library/keep:1"]),
                ],
                remove: vec![a.id()],
                expect: vec!["Removed"],
            },
        ),
        (
            "short_id",
            Scenario {
                imports: vec![
                    imp(&a, &["docker.io/library/a:1"]),
                    imp(&keep, &["docker.io/library/keep:1"]),
                ],
                remove: vec![short(&a.id(), 12)],
                expect: vec!["Removed"],
            },
        ),
        (
            "ambiguous_short_id",
            Scenario {
                imports: vec![
                    imp(&p1, &["docker.io/library/p:1"]),
                    imp(&p2, &["docker.io/library/p:2"]),
                ],
                remove: vec![short(&p1.id(), 2)],
                expect: vec!["Ambiguous"],
            },
        ),
        (
            "bare_name",
            Scenario {
                imports: vec![
                    imp(&a, &["docker.io/library/nginx:latest"]),
                    imp(&keep, &["docker.io/library/nginx:1.27"]),
                ],
                remove: s(&["nginx"]),
                expect: vec!["Removed"],
            },
        ),
        (
            "docker_hub_spellings",
            Scenario {
                imports: vec![
                    imp(&a, &["docker.io/library/redis:7"]),
                    imp(&b, &["docker.io/acme/tool:latest"]),
                    imp(&keep, &["docker.io/library/keep:1"]),
                ],
                remove: s(&["index.docker.io/library/redis:7", "acme/tool"]),
                expect: vec!["Removed", "Removed"],
            },
        ),
        (
            "absent_image",
            Scenario {
                imports: vec![imp(&keep, &["docker.io/library/keep:1"])],
                remove: vec!["docker.io/library/absent:1".into(), a.id()],
                expect: vec!["NotPresent", "NotPresent"],
            },
        ),
        (
            "image_only_in_another_namespace",
            Scenario {
                imports: vec![
                    Import {
                        namespace: "other",
                        image: a.clone(),
                        names: s(&["docker.io/library/a:1"]),
                    },
                    imp(&keep, &["docker.io/library/keep:1"]),
                ],
                remove: vec!["docker.io/library/a:1".into(), a.id()],
                expect: vec!["NotPresent", "NotPresent"],
            },
        ),
        (
            "several_images_in_one_call",
            Scenario {
                imports: vec![
                    imp(&a, &["docker.io/library/a:1"]),
                    imp(&b, &["docker.io/library/b:1", "docker.io/library/b:2"]),
                    imp(&docker, &["docker.io/library/docker:1"]),
                    imp(&keep, &["docker.io/library/keep:1"]),
                ],
                remove: vec!["a:1".into(), b.id(), "docker.io/library/docker:1".into()],
                expect: vec!["Removed", "Removed", "Removed"],
            },
        ),
        (
            "images_sharing_layers",
            Scenario {
                imports: vec![
                    imp(&base_a, &["docker.io/library/sa:1"]),
                    imp(&base_b, &["docker.io/library/sb:1"]),
                ],
                remove: s(&["sa:1"]),
                expect: vec!["Removed"],
            },
        ),
    ]
}

/// Puts `scenario`'s images on `socket` and waits until the CRI plugin has adopted them.
async fn setup(socket: &Path, scenario: &Scenario) -> Result<()> {
    let mut ids = Vec::new();
    let mut refs: Vec<&str> = Vec::new();
    for i in &scenario.imports {
        image::import(socket, i.namespace, &i.image, &i.names, &Default::default()).await?;
        if i.namespace == NS {
            ids.push(i.image.id());
            refs.extend(i.names.iter().map(String::as_str));
        }
    }
    testbed::cri::wait_synced(socket, &ids, &refs).await
}

/// The plan for `images` on `inv`, with no protection globs (as `imagegc rmi` plans).
/// A plain function: the request's compiled globs then never sit in an async test's state.
fn plan_of(images: &[String], force: bool, inv: &Inventory) -> Plan {
    plan::plan(
        &Request {
            images: images.to_vec(),
            force,
            ..Default::default()
        },
        inv,
    )
}

/// Removes `images` from `socket` through the library with `backend`, as `imagegc rmi` does
/// (reading content only for what the request may delete).
pub async fn remove(
    socket: &Path,
    images: &[String],
    force: bool,
    backend: Backend,
) -> Result<Vec<&'static str>> {
    let rt = Connector::new(Some(socket.into()), backend, NS)
        .connect(false)
        .await?;
    ensure!(
        backend == Backend::Auto || rt.backend() == backend.as_str(),
        "asked for {backend:?}, got {}",
        rt.backend()
    );
    let matcher = Matcher::only(Platform::host());
    let (inv, _) = rt.inventory_for(images, &matcher).await?;
    let plan = plan_of(images, force, &inv);
    // What the report says once the plan ran.
    let kinds = plan
        .items
        .iter()
        .map(|i| report::image_outcome(&i.outcome, Run::Executed).as_str())
        .collect();
    rt.execute(plan).await?;
    Ok(kinds)
}

async fn differential(flavor: Flavor, backend: Backend, scenario: Scenario) -> Result<()> {
    let bed = nodes(flavor, 2).await?;
    let (ours, oracle) = (&bed.nodes[0].socket, &bed.nodes[1].socket);
    setup(ours, &scenario).await?;
    setup(oracle, &scenario).await?;
    let namespaces = [NS, "other"];
    let before = state(ours, &namespaces).await?;
    ensure!(
        before == state(oracle, &namespaces).await?,
        "the two nodes differ before removal"
    );

    let kinds = remove(ours, &scenario.remove, false, backend).await?;
    ensure!(
        kinds == scenario.expect,
        "imagegc reported {kinds:?}, expected {:?}",
        scenario.expect
    );
    for image in &scenario.remove {
        // CRI's errors (an ambiguous short ID) are part of its behaviour; only state counts.
        let _ = testbed::cri::remove(oracle, image).await?;
    }

    let ours_after = state(ours, &namespaces).await?;
    let oracle_after = state(oracle, &namespaces).await?;
    ensure!(
        ours_after == oracle_after,
        "imagegc and CRI RemoveImage left different states\n imagegc: {ours_after:#?}\n     CRI: {oracle_after:#?}"
    );
    let removed_something = scenario.expect.contains(&"Removed");
    ensure!(
        removed_something == (ours_after != before),
        "state changed: {}, but outcomes were {kinds:?}",
        ours_after != before
    );
    Ok(())
}

/// `imagegc rmi` against `socket`; returns (exit code, stdout).
fn rmi(socket: &Path, args: &[&str]) -> Result<(i32, String)> {
    let socket = socket.to_str().context("socket path")?;
    let mut all = vec!["rmi", "--socket", socket];
    all.extend_from_slice(args);
    let (code, out, err) = support::imagegc(&all)?;
    ensure!(err.is_empty() || code == 2, "unexpected stderr: {err}");
    Ok((code, out))
}

async fn pinned_is_never_removed(flavor: Flavor) -> Result<()> {
    let bed = nodes(flavor, 1).await?;
    let socket = &bed.nodes[0].socket;
    let pause = ImageBuilder::new("pause").build();
    import_labelled(
        socket,
        &pause,
        &["registry.k8s.io/pause:3.10"],
        &[("io.cri-containerd.pinned", "pinned")],
    )
    .await?;
    testbed::cri::wait_synced(socket, &[pause.id()], &["registry.k8s.io/pause:3.10"]).await?;
    let before = state(socket, &[NS]).await?;
    for args in [
        &["registry.k8s.io/pause:3.10"][..],
        &["--force", "registry.k8s.io/pause:3.10"],
        &["--force", &pause.id()],
    ] {
        let (code, out) = rmi(socket, args)?;
        ensure!(code == 1, "exit {code} for {args:?}: {out}");
        ensure!(
            out.contains("Pinned") && out.contains("never removed"),
            "{out}"
        );
    }
    ensure!(
        before == state(socket, &[NS]).await?,
        "a pinned image's records or content changed"
    );
    Ok(())
}

async fn in_use_is_kept_unless_forced(flavor: Flavor) -> Result<()> {
    let bed = nodes(flavor, 1).await?;
    let socket = &bed.nodes[0].socket;
    let app = ImageBuilder::new("app").build();
    let web = ImageBuilder::new("web").build();
    import(socket, &app, &["docker.io/library/app:1"]).await?;
    import(socket, &web, &["docker.io/library/web:1"]).await?;
    testbed::cri::wait_synced(socket, &[app.id(), web.id()], &[]).await?;
    // One container created by the CRI (metadata names the image ID), one by another client
    // (only the image name).
    image::create_container(
        socket,
        NS,
        "cri-made",
        "docker.io/library/app:1",
        Some(&app.id()),
    )
    .await?;
    image::create_container(socket, NS, "plain", "web:1", None).await?;
    let before = state(socket, &[NS]).await?;
    let (code, out) = rmi(socket, &["app:1", "docker.io/library/web:1"])?;
    ensure!(code == 1, "exit {code}: {out}");
    ensure!(out.matches("InUse").count() == 2, "{out}");
    ensure!(out.contains("cri-made") && out.contains("plain"), "{out}");
    ensure!(
        before == state(socket, &[NS]).await?,
        "an in-use image changed"
    );

    let (code, out) = rmi(socket, &["--force", "app:1", "web:1"])?;
    ensure!(code == 0, "exit {code}: {out}");
    let left = image::image_names(socket, NS).await?;
    ensure!(
        left.is_empty(),
        "records left after a forced removal: {left:?}"
    );
    Ok(())
}

/// A long-lived connection (the agent's) reuses the last inventory's selections only while
/// every blob they were read from is present: after an image's config is deleted, its warm
/// inventory equals a fresh connection's, and the image no longer reads as one.
async fn warm_inventory_equals_a_fresh_one(flavor: Flavor) -> Result<()> {
    let bed = nodes(flavor, 1).await?;
    let socket = &bed.nodes[0].socket;
    let a = ImageBuilder::new("warm-a").build();
    let b = ImageBuilder::new("warm-b")
        .platforms(&["linux/amd64", "linux/arm64"])
        .build();
    import(
        socket,
        &a,
        &["docker.io/library/a:1", "docker.io/library/a:2"],
    )
    .await?;
    import(socket, &b, &["docker.io/library/b:1"]).await?;
    testbed::cri::wait_synced(
        socket,
        &[a.id(), b.id()],
        &[
            "docker.io/library/a:1",
            "docker.io/library/a:2",
            "docker.io/library/b:1",
        ],
    )
    .await?;
    let matcher = Matcher::only(Platform::host());
    let warm = Runtime::connect(socket, NS).await?;
    let first = warm.inventory(&matcher).await?;
    ensure!(first.images.contains_key(&a.id()), "{first:#?}");
    let fresh = || async {
        Runtime::connect(socket, NS)
            .await?
            .inventory(&matcher)
            .await
    };
    ensure!(
        warm.inventory(&matcher).await? == fresh().await?,
        "warm differs from fresh"
    );
    let listed = || async {
        let rt = Runtime::connect(socket, NS).await?;
        anyhow::Ok(rt.inventory_listed(&matcher).await?)
    };
    let (l, _, stats) = listed().await?;
    ensure!(
        l == fresh().await?,
        "from listings differs from fresh\n listed: {l:#?}"
    );
    ensure!(
        stats.targets_read == 0,
        "every image has its ID record and labels, yet {} target(s) were read",
        stats.targets_read
    );

    image::delete_content(socket, NS, &a.id()).await?;
    let (w, f) = (warm.inventory(&matcher).await?, fresh().await?);
    ensure!(
        w == f,
        "after the config went, warm differs from fresh\n warm: {w:#?}\nfresh: {f:#?}"
    );
    ensure!(
        !w.images.contains_key(&a.id()),
        "a still reads as an image: {w:#?}"
    );
    ensure!(
        w.skipped
            .iter()
            .filter(|s| s.name.starts_with("docker.io/library/a:"))
            .count()
            == 2,
        "{w:#?}"
    );
    ensure!(w.images.len() == first.images.len() - 1, "{w:#?}");
    let (l, _, _) = listed().await?;
    ensure!(
        l == f,
        "after the config went, from listings differs from fresh\n listed: {l:#?}"
    );
    Ok(())
}

/// A `sha256:<id>` record that claims an ID its target's content does not give (made by hand:
/// the CRI plugin names its records after the config it read) is caught before anything is
/// deleted: the removal reads every image and ends as CRI's does, whether the image is named
/// by a tag or by the ID the false record hides.
async fn a_false_id_record_is_caught(flavor: Flavor) -> Result<()> {
    let bed = nodes(flavor, 2).await?;
    let (ours, oracle) = (&bed.nodes[0].socket, &bed.nodes[1].socket);
    let a = ImageBuilder::new("false-a").build();
    let b = ImageBuilder::new("false-b").build();
    let keep = ImageBuilder::new("keep").build();
    let (false_a, false_b) = (
        format!("sha256:{}", "e".repeat(64)),
        format!("sha256:{}", "d".repeat(64)),
    );
    let names = [
        "docker.io/library/a:1",
        "docker.io/library/b:1",
        "docker.io/library/keep:1",
    ];
    let managed = [("io.cri-containerd.image", "managed")];
    for socket in [ours, oracle] {
        import(socket, &a, &names[..1]).await?;
        import(socket, &b, &names[1..2]).await?;
        import(socket, &keep, &names[2..]).await?;
        testbed::cri::wait_synced(socket, &[a.id(), b.id(), keep.id()], &names).await?;
        // The only ID record of a (and of b) claims a false ID.
        import_labelled(socket, &a, &[&false_a], &managed).await?;
        import_labelled(socket, &b, &[&false_b], &managed).await?;
        leave_only_false_claims(socket, &[a.id(), b.id()]).await?;
    }
    let before = state(ours, &[NS]).await?;
    ensure!(
        before == state(oracle, &[NS]).await?,
        "the two nodes differ before removal"
    );

    let rt = Runtime::connect(ours, NS).await?;
    let matcher = Matcher::only(Platform::host());
    let (_, stats) = rt
        .inventory_for(&support::strings(&names[..1]), &matcher)
        .await?;
    ensure!(stats.read_all, "the false claim was not caught: {stats:?}");
    for request in [names[0].to_string(), b.id()] {
        let kinds = remove(
            ours,
            std::slice::from_ref(&request),
            false,
            Backend::Containerd,
        )
        .await?;
        ensure!(kinds == ["Removed"], "{request}: {kinds:?}");
        let _ = testbed::cri::remove(oracle, &request).await?;
        let (o, c) = (state(ours, &[NS]).await?, state(oracle, &[NS]).await?);
        ensure!(
            o == c,
            "{request}: imagegc and CRI differ\n imagegc: {o:#?}\n     CRI: {c:#?}"
        );
    }
    let after = state(ours, &[NS]).await?;
    ensure!(
        after.records[NS].len() == 2,
        "keep:1 and its ID should remain: {after:#?}"
    );
    Ok(())
}

/// Deletes the true ID records `ids` once the CRI plugin has handled the false ones (it
/// re-creates an ID record for a name it has not handled yet, so delete until none comes back).
async fn leave_only_false_claims(socket: &Path, ids: &[String]) -> Result<()> {
    for _ in 0..20 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let names = image::image_names(socket, NS).await?;
        let back: Vec<&String> = ids.iter().filter(|id| names.contains(*id)).collect();
        if back.is_empty() {
            return Ok(());
        }
        for id in back {
            image::delete_image(socket, NS, id, false).await?;
        }
    }
    anyhow::bail!("the CRI plugin keeps re-creating {ids:?}")
}

async fn bad_input_changes_nothing(flavor: Flavor) -> Result<()> {
    let bed = nodes(flavor, 1).await?;
    let socket = &bed.nodes[0].socket;
    let (p1, p2) = colliding_pair();
    import(socket, &p1, &["docker.io/library/p:1"]).await?;
    import(socket, &p2, &["docker.io/library/p:2"]).await?;
    testbed::cri::wait_synced(socket, &[p1.id(), p2.id()], &["docker.io/library/p:1"]).await?;
    let before = state(socket, &[NS]).await?;
    let upper = p1.id().to_uppercase().replace("SHA256", "sha256");
    let ambiguous = short(&p1.id(), 2);
    for bad in [
        "",
        "p:*",
        "docker.io/Library/p:1",
        upper.as_str(),
        "foo:",
        ambiguous.as_str(),
    ] {
        // A valid request next to the bad one: the whole batch is refused.
        let (code, out) = rmi(socket, &["p:2", bad])?;
        ensure!(code == 1, "exit {code} for {bad:?}: {out}");
        ensure!(
            out.contains("nothing removed"),
            "no refusal for {bad:?}: {out}"
        );
        ensure!(
            before == state(socket, &[NS]).await?,
            "{bad:?} changed the node"
        );
    }
    Ok(())
}

/// An interrupted removal (records journalled, some deleted, then the process died) is
/// finished by the next run, whatever it was asked; the end state equals a clean CRI removal.
async fn interrupted_removal_is_finished(flavor: Flavor) -> Result<()> {
    let bed = nodes(flavor, 2).await?;
    let (ours, oracle) = (&bed.nodes[0].socket, &bed.nodes[1].socket);
    let a = ImageBuilder::new("a").layer_sizes(&[10_000]).build();
    let keep = ImageBuilder::new("keep").build();
    let names = [
        "docker.io/library/a:1",
        "docker.io/library/a:2",
        "docker.io/library/a:3",
    ];
    for socket in [ours, oracle] {
        import(socket, &a, &names).await?;
        import(socket, &keep, &["docker.io/library/keep:1"]).await?;
        testbed::cri::wait_synced(socket, &[a.id(), keep.id()], &names).await?;
    }
    // The first half of a run, as the executor does it: the plan's marks journalled, then the first two deletes (the ID record and one name) done before the
    // "crash".
    let rt = Runtime::connect(ours, NS).await?;
    let inv = rt.inventory(&Matcher::only(Platform::host())).await?;
    let p = plan_of(&[names[0].to_string()], false, &inv);
    ensure!(p.marks.len() == 1 && p.deletes.len() == 4, "{p:?}");
    ensure!(p.deletes[0] == a.id(), "{p:?}");
    rt.create_journal(&p.marks).await?;
    // And a journal of a run interrupted after its last delete: nothing left to delete, only
    // the journal to clean up.
    rt.create_journal(&["docker.io/library/long-gone:1".to_string()])
        .await?;
    rt.delete_image(&p.deletes[0], false).await?;
    rt.delete_image(&p.deletes[1], false).await?;

    let (code, out) = rmi(ours, &["docker.io/library/absent:1"])?;
    ensure!(code == 0, "exit {code}: {out}");
    ensure!(out.contains("finishing an interrupted removal"), "{out}");
    let journals = rt.list_journals().await?;
    ensure!(
        journals.is_empty(),
        "the finished journal is left: {journals:?}"
    );
    let _ = testbed::cri::remove(oracle, names[0]).await?;
    let (o, c) = (state(ours, &[NS]).await?, state(oracle, &[NS]).await?);
    ensure!(
        o == c,
        "resumed removal differs from CRI's\n imagegc: {o:#?}\n     CRI: {c:#?}"
    );
    Ok(())
}

/// The bytes freed are the removed image's own blobs for this platform that left the store:
/// not the base layer another image keeps, not the blobs of the index's other platform (which
/// the collection removes too). The listings behind that figure ask containerd only for the
/// names and digests they need, quoted, so a name no record has matches nothing.
async fn freed_bytes_are_the_removed_images_own_blobs(flavor: Flavor) -> Result<()> {
    let bed = nodes(flavor, 1).await?;
    let socket = &bed.nodes[0].socket;
    let host = image::host_platform();
    let other = if host == "linux/arm64" {
        "linux/amd64"
    } else {
        "linux/arm64"
    };
    let a = ImageBuilder::new("freed-a")
        .platforms(&[&host, other])
        .shared_base("freed-base", 5_000)
        .layer_sizes(&[10_000, 20_000])
        .build();
    let b = ImageBuilder::new("freed-b")
        .shared_base("freed-base", 5_000)
        .layer_sizes(&[3_000])
        .build();
    import(socket, &a, &["docker.io/library/a:1"]).await?;
    import(socket, &b, &["docker.io/library/b:1"]).await?;
    let refs = ["docker.io/library/a:1", "docker.io/library/b:1"];
    testbed::cri::wait_synced(socket, &[a.id(), b.id()], &refs).await?;

    let rt = Runtime::connect(socket, NS).await?;
    let asked: BTreeSet<String> = [
        "docker.io/library/a:1",
        "docker.io/library/a:1\"",
        "docker.io/library/none:1",
        // containerd's scanner takes U+FFFD written out for a decoding error.
        "docker.io/library/\u{fffd}\u{1f600}:1",
    ]
    .map(String::from)
    .into();
    let named: Vec<String> = rt
        .list_images_named(&asked)
        .await?
        .into_iter()
        .map(|r| r.name)
        .collect();
    ensure!(
        named == ["docker.io/library/a:1"],
        "named listing: {named:?}"
    );
    let config = a.id_for(&host);
    let missing = format!("sha256:{}", "0".repeat(64));
    let sizes = rt
        .content_sizes_of(&[config.clone(), missing].into())
        .await?;
    ensure!(sizes.keys().eq([&config]), "digest listing: {sizes:?}");

    // The removed image's own blobs for this host: the index, the host's manifest and config,
    // its own layers (the base stays: b keeps it).
    let b_blobs = b.digests();
    let own: BTreeSet<&String> = [&a.target.digest, &a.manifest_digests[&host], &config]
        .into_iter()
        .chain(&a.layer_digests[&host])
        .filter(|d| !b_blobs.contains(*d))
        .collect();
    let expected: i64 = a
        .blobs
        .iter()
        .filter(|blob| own.contains(&blob.digest))
        .map(|blob| blob.bytes.len() as i64)
        .sum();
    let before = state(socket, &[NS]).await?;
    let inv = rt.inventory(&Matcher::only(Platform::host())).await?;
    let plan = plan_of(&["docker.io/library/a:1".into()], false, &inv);
    let done = imagegc::containerd::execute(&rt, plan).await?;
    ensure!(
        done.freed_bytes == expected,
        "freed {} bytes, expected {expected} ({} blobs)",
        done.freed_bytes,
        own.len()
    );
    // The other platform's blobs went too, uncounted; the base stayed.
    let after = state(socket, &[NS]).await?;
    let gone: BTreeSet<&String> = before.content[NS].difference(&after.content[NS]).collect();
    let other_manifest = &a.manifest_digests[other];
    ensure!(
        own.iter().all(|d| gone.contains(d)) && gone.contains(other_manifest),
        "left the store: {gone:?}"
    );
    ensure!(
        b_blobs.iter().all(|d| after.content[NS].contains(d)),
        "b's blobs must stay"
    );
    Ok(())
}

/// The agent with `--runtime cri` on containerd's CRI socket: an ImageRemoval is executed
/// through the CRI backend (every name of the image goes, by ID) and reported, and the agent
/// says which runtime it chose.
async fn agent_on_the_cri_backend() -> Result<()> {
    let mut op = crate::operator::Operator::start(&[&[]]).await?;
    op.stop_agent(0);
    op.agent_args = vec!["--runtime".into(), "cri".into()];
    op.start_agent(0)?;
    let socket = op.socket(0);
    let app = ImageBuilder::new("cri-agent-app").build();
    let names = ["docker.io/library/app:1", "docker.io/library/app:2"];
    import(&socket, &app, &names).await?;
    testbed::cri::wait_synced(&socket, &[app.id()], &names).await?;
    op.create_removal("app", serde_json::json!({"images": ["app:2"]}))
        .await?;
    let r = op.wait_result(0, "app").await?;
    ensure!(
        r.images.len() == 1 && r.images[0].outcome == "Removed",
        "{r:?}"
    );
    let left = image::image_names(&socket, NS).await?;
    ensure!(
        !left
            .iter()
            .any(|n| names.contains(&n.as_str()) || *n == app.id()),
        "left after the agent's CRI removal: {left:?}"
    );
    let log = op.agent_log(0);
    ensure!(
        log.contains("container runtime chosen") && log.contains("CRI API"),
        "the agent does not say it chose CRI:\n{log}"
    );
    Ok(())
}

pub fn trials() -> Vec<Trial> {
    let mut out = vec![trial(
        "removal::agent_on_the_cri_backend",
        agent_on_the_cri_backend,
    )];
    for flavor in FLAVORS {
        let f = flavor.label();
        for (name, scenario) in scenarios() {
            out.push(trial(
                format!("removal::differential::{f}::{name}"),
                move || differential(flavor, Backend::Containerd, scenario),
            ));
        }
        for (name, scenario) in scenarios() {
            out.push(trial(
                format!("removal::differential::{f}::cri::{name}"),
                move || differential(flavor, Backend::Cri, scenario),
            ));
        }
        out.push(trial(
            format!("removal::{f}::pinned_is_never_removed"),
            move || pinned_is_never_removed(flavor),
        ));
        out.push(trial(
            format!("removal::{f}::in_use_is_kept_unless_forced"),
            move || in_use_is_kept_unless_forced(flavor),
        ));
        out.push(trial(
            format!("removal::{f}::bad_input_changes_nothing"),
            move || bad_input_changes_nothing(flavor),
        ));
        out.push(trial(
            format!("removal::{f}::warm_inventory_equals_a_fresh_one"),
            move || warm_inventory_equals_a_fresh_one(flavor),
        ));
        out.push(trial(
            format!("removal::{f}::a_false_id_record_is_caught"),
            move || a_false_id_record_is_caught(flavor),
        ));
        out.push(trial(
            format!("removal::{f}::freed_bytes_are_the_removed_images_own_blobs"),
            move || freed_bytes_are_the_removed_images_own_blobs(flavor),
        ));
        out.push(trial(
            format!("removal::{f}::interrupted_removal_is_finished"),
            move || interrupted_removal_is_finished(flavor),
        ));
    }
    out
}
