//! The `imagegc` binary at a node's shell: `images` and `rmi`, their output, exit codes and
//! one-line errors.

use std::os::unix::fs::PermissionsExt;

use anyhow::{Context, Result, ensure};
use libtest_mimic::Trial;
use testbed::Flavor;
use testbed::image::{self, ImageBuilder};

use crate::support::{self, NS, import, import_labelled, state, trial};

async fn images_groups_and_flags() -> Result<()> {
    let bed = support::nodes(Flavor::V2, 1).await?;
    let socket = &bed.nodes[0].socket;
    let sock = socket.to_str().context("socket")?;
    let app = ImageBuilder::new("app").layer_sizes(&[300_000]).build();
    let pause = ImageBuilder::new("pause").build();
    let web = ImageBuilder::new("web").build();
    import(
        socket,
        &app,
        &["docker.io/library/app:1", "docker.io/library/app:2"],
    )
    .await?;
    import_labelled(
        socket,
        &pause,
        &["registry.k8s.io/pause:3.10"],
        &[("io.cri-containerd.pinned", "pinned")],
    )
    .await?;
    import(socket, &web, &["docker.io/library/web:1"]).await?;
    testbed::cri::wait_synced(socket, &[app.id(), pause.id(), web.id()], &[]).await?;
    image::create_container(socket, NS, "c1", "docker.io/library/web:1", Some(&web.id())).await?;

    let (code, out, err) = support::imagegc(&["images", "--socket", sock, "-o", "json"])?;
    ensure!(code == 0, "exit {code}: {err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    ensure!(rows.len() == 3, "{out}");
    let row = |id: &str| {
        rows.iter()
            .find(|r| r["id"] == id)
            .cloned()
            .unwrap_or_default()
    };
    let a = row(&app.id());
    ensure!(
        a["references"]
            == serde_json::json!([
                "docker.io/library/app:1",
                "docker.io/library/app:2",
                app.id()
            ]),
        "app references: {}",
        a["references"]
    );
    ensure!(a["size"].as_i64().unwrap_or(0) >= 300_000, "{a}");
    ensure!(a["pinned"] == false && a["in_use"] == false, "{a}");
    ensure!(row(&pause.id())["pinned"] == true, "{out}");
    let w = row(&web.id());
    ensure!(
        w["in_use"] == true && w["used_by"] == serde_json::json!(["c1"]),
        "{w}"
    );

    let (code, table, _) = support::imagegc(&["images", "--socket", sock])?;
    ensure!(code == 0 && table.starts_with("IMAGE ID"), "{table}");
    let app_line = table
        .lines()
        .find(|l| l.contains("app:1"))
        .context("app line")?;
    ensure!(
        app_line.contains("docker.io/library/app:2") && app_line.contains("KiB"),
        "{table}"
    );
    Ok(())
}

async fn rmi_dry_run_then_remove() -> Result<()> {
    let bed = support::nodes(Flavor::V2, 1).await?;
    let socket = &bed.nodes[0].socket;
    let sock = socket.to_str().context("socket")?;
    let app = ImageBuilder::new("app").layer_sizes(&[100_000]).build();
    import(
        socket,
        &app,
        &["docker.io/library/app:1", "docker.io/library/app:2"],
    )
    .await?;
    testbed::cri::wait_synced(socket, &[app.id()], &[]).await?;
    let before = state(socket, &[NS]).await?;

    let (code, out, _) =
        support::imagegc(&["rmi", "--socket", sock, "--dry-run", "app:1", "gone:1"])?;
    ensure!(code == 0, "exit {code}: {out}");
    ensure!(
        out.contains("app:1: would remove image") && out.contains("3 reference(s)"),
        "{out}"
    );
    ensure!(out.contains("gone:1: NotPresent"), "{out}");
    ensure!(
        out.contains("dry run: 3 record(s) would be deleted"),
        "{out}"
    );
    ensure!(
        before == state(socket, &[NS]).await?,
        "--dry-run changed the node"
    );

    let (code, out, _) = support::imagegc(&["rmi", "--socket", sock, "app:1"])?;
    ensure!(code == 0, "exit {code}: {out}");
    ensure!(
        out.contains("app:1: removed image") && out.contains("deleted 3 record(s)"),
        "{out}"
    );
    // The freed figure is the content that left the store: at least the 100 kB layer.
    let freed = out
        .lines()
        .find(|l| l.starts_with("deleted"))
        .context("summary")?;
    ensure!(freed.contains("KiB of content freed"), "{freed}");
    ensure!(
        image::image_names(socket, NS).await?.is_empty(),
        "records left"
    );
    ensure!(
        image::content_digests(socket, NS).await?.is_empty(),
        "content left"
    );

    // Removing it again: not present is success.
    let (code, out, _) = support::imagegc(&["rmi", "--socket", sock, "app:1"])?;
    ensure!(
        code == 0 && out.contains("NotPresent"),
        "exit {code}: {out}"
    );
    Ok(())
}

fn one_line(err: &str) -> bool {
    err.lines().count() == 1 && !err.contains("panicked")
}

async fn errors_are_one_clear_line() -> Result<()> {
    let bed = support::nodes(Flavor::V2, 1).await?;
    let sock = bed.nodes[0].socket.to_str().context("socket")?.to_string();
    let dir = tempfile::tempdir()?;

    let missing = dir.path().join("nope.sock");
    let (code, _, err) = support::imagegc(&["images", "--socket", missing.to_str().unwrap()])?;
    ensure!(
        code == 2 && one_line(&err) && err.contains("does not exist"),
        "exit {code}: {err}"
    );

    let not_a_socket = dir.path().join("file");
    std::fs::write(&not_a_socket, "")?;
    let (code, _, err) =
        support::imagegc(&["rmi", "--socket", not_a_socket.to_str().unwrap(), "x"])?;
    ensure!(
        code == 2 && one_line(&err) && err.contains("cannot connect"),
        "exit {code}: {err}"
    );

    let (code, _, err) = support::imagegc(&["images", "--socket", &sock, "-n", "bad ns"])?;
    ensure!(
        code == 2 && one_line(&err) && err.contains("invalid containerd namespace"),
        "exit {code}: {err}"
    );

    let (code, out, err) = support::imagegc(&["images", "--socket", &sock, "-n", "empty"])?;
    ensure!(
        code == 0 && out.trim() == format!("no images in namespace empty at {sock}"),
        "exit {code}: {out}{err}"
    );

    // An unprivileged user: the binary is copied where that user may run it.
    let bin = dir.path().join("imagegc");
    std::fs::copy(env!("CARGO_BIN_EXE_imagegc"), &bin)?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["images", "--socket", &sock])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2) && one_line(&err) && err.contains("permission denied"),
        "exit {:?}: {err}",
        out.status.code()
    );
    Ok(())
}

/// `imagegc` run in a mount namespace of its own whose `/run` (and so `/var/run`) is an empty
/// tmpfs, after `setup` (shell) has put sockets there; (exit code, stdout, stderr).
fn in_private_run(setup: &str, args: &str) -> Result<(i32, String, String)> {
    let script = format!(
        "set -e; mount -t tmpfs tmpfs /run; {setup}; exec {} {args}",
        env!("CARGO_BIN_EXE_imagegc")
    );
    let out = std::process::Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .env_remove("IMAGEGC_SOCKET")
        .env_remove("IMAGEGC_RUNTIME")
        .output()
        .context("running imagegc under unshare")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// With no --socket the known paths are probed: where only k3s's path holds a socket (a test
/// containerd bind-mounted there), it is chosen; the CRI backend works through it as well;
/// where none answers, one line names every path and why.
async fn finds_the_socket_among_the_known_paths() -> Result<()> {
    let bed = support::nodes(Flavor::V2, 1).await?;
    let socket = &bed.nodes[0].socket;
    let app = ImageBuilder::new("app").build();
    import(socket, &app, &["docker.io/library/app:1"]).await?;
    testbed::cri::wait_synced(socket, &[app.id()], &["docker.io/library/app:1"]).await?;
    let k3s = format!(
        "mkdir -p /run/k3s/containerd; touch /run/k3s/containerd/containerd.sock; \
         mount --bind {} /run/k3s/containerd/containerd.sock",
        socket.display()
    );
    for runtime in ["auto", "cri"] {
        let (code, out, err) = in_private_run(&k3s, &format!("images --runtime {runtime}"))?;
        ensure!(
            code == 0 && out.contains("docker.io/library/app:1"),
            "{runtime}: exit {code}: {out}{err}"
        );
    }

    let (code, out, err) = in_private_run("true", "images")?;
    ensure!(code == 2 && one_line(&err), "exit {code}: {out}{err}");
    ensure!(err.contains("no container runtime found"), "{err}");
    for known in imagegc::runtime::detect::KNOWN_SOCKETS {
        ensure!(err.contains(known.path), "{known:?} not named: {err}");
    }
    Ok(())
}

/// A socket that accepts connections but never answers (not a runtime) fails within the
/// probe's timeout with one line, instead of hanging.
async fn a_silent_socket_times_out() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    std::thread::spawn(move || {
        // Hold every connection open without a byte in reply.
        let held: Vec<_> = listener.incoming().map_while(Result::ok).collect();
        drop(held);
    });
    let started = std::time::Instant::now();
    let (code, _, err) = support::imagegc(&["images", "--socket", path.to_str().context("path")?])?;
    let took = started.elapsed();
    ensure!(
        code == 2 && one_line(&err) && err.contains("did not answer within 5s"),
        "exit {code}: {err}"
    );
    ensure!(took < std::time::Duration::from_secs(15), "took {took:?}");
    Ok(())
}

pub fn trials() -> Vec<Trial> {
    vec![
        trial("cli::images_groups_and_flags", images_groups_and_flags),
        trial("cli::rmi_dry_run_then_remove", rmi_dry_run_then_remove),
        trial("cli::errors_are_one_clear_line", errors_are_one_clear_line),
        trial(
            "cli::finds_the_socket_among_the_known_paths",
            finds_the_socket_among_the_known_paths,
        ),
        trial("cli::a_silent_socket_times_out", a_silent_socket_times_out),
    ]
}
