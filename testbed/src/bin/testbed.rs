//! `testbed up [--nodes N] [--containerd v2|1.6] [--no-cluster] [--real-node] --env-file FILE`:
//! starts a bed (with `--real-node`, also a real kubelet node; see `testbed::node`),
//! writes shell exports describing it to FILE, and keeps it running until SIGINT/SIGTERM, then
//! tears everything down (the bed's signal handler does it). `hack/testbed` wraps it as `up | down | env`.
//!
//! `testbed image --binary FILE --name REF --out FILE`: writes the imagegc container image of
//! that binary as an OCI archive (`make image`) and prints its path.
//!
//! `testbed seed [--images-only] SOCKET...`: puts the demo's images on each node: two tags of an
//! app sharing a base layer with a web image that a container uses, and a pinned sandbox image.
//! With `--images-only` (for the real node, whose kubelet runs real containers and whose CRI
//! pins its real sandbox image), only the app and web images.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use testbed::image::{self, ImageBuilder};
use testbed::{Flavor, Options, TestBed};

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("up") => {}
        Some("seed") => return seed(&args.collect::<Vec<_>>()).await,
        Some("image") => return image_archive(args),
        _ => bail!(
            "usage: testbed up [--nodes N] [--containerd v2|1.6] [--no-cluster] [--real-node] --env-file FILE\n       testbed image --binary FILE --name REF --out FILE\n       testbed seed [--images-only] SOCKET..."
        ),
    }
    let mut opts = Options::default();
    let mut env_file = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--nodes" => opts.nodes = args.next().context("--nodes N")?.parse()?,
            "--containerd" => {
                opts.flavor = match args.next().as_deref() {
                    Some("v2") => Flavor::V2,
                    Some("1.6") => Flavor::Debian16,
                    other => bail!("--containerd takes v2 or 1.6, not {other:?}"),
                }
            }
            "--no-cluster" => opts.cluster = false,
            "--real-node" => opts.real_node = true,
            "--env-file" => env_file = Some(args.next().context("--env-file FILE")?),
            other => bail!("unknown argument {other}"),
        }
    }
    let env_file = env_file.context("--env-file FILE is required")?;
    let bed = TestBed::start(&opts).await?;
    let mut env = format!(
        "export IMAGEGC_TESTBED_DIR_ACTIVE={}\n",
        bed.dir().display()
    );
    for (i, n) in bed.nodes.iter().enumerate() {
        env += &format!("export NODE{i}_SOCKET={}\n", n.socket.display());
    }
    env += &format!(
        "export NODE_SOCKETS='{}'\n",
        bed.nodes
            .iter()
            .map(|n| n.socket.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some(n) = &bed.real_node {
        env += &format!("export REAL_NODE={}\n", n.name);
        env += &format!("export REAL_NODE_SOCKET={}\n", n.socket.display());
        env += &format!(
            "export REAL_NODE_CONTAINERD_ROOT={}\n",
            n.containerd_root.display()
        );
        env += &format!("export REAL_NODE_DIR={}\n", n.dir().display());
    }
    if let Some(c) = &bed.cluster {
        env += &format!("export KUBECONFIG={}\n", c.admin_kubeconfig.display());
        env += &format!("export KUBE_SERVER={}\n", c.server);
    }
    std::fs::write(&env_file, env)?;
    eprintln!(
        "testbed: up ({} nodes); exports in {env_file}",
        bed.nodes.len()
    );
    // The bed's own SIGINT/SIGTERM handler stops every process and removes the bed
    // directory, then exits; until then there is nothing to do but keep it running.
    let _bed = bed;
    std::future::pending::<()>().await;
    Ok(())
}

fn image_archive(mut args: impl Iterator<Item = String>) -> Result<()> {
    let (mut binary, mut name, mut out) = (None, None, None);
    while let Some(a) = args.next() {
        let slot = match a.as_str() {
            "--binary" => &mut binary,
            "--name" => &mut name,
            "--out" => &mut out,
            other => bail!("unknown argument {other}"),
        };
        *slot = Some(args.next().with_context(|| format!("{a} needs a value"))?);
    }
    let binary = binary.context("--binary FILE is required")?;
    let name = name.context("--name REF is required")?;
    let out = out.context("--out FILE is required")?;
    let img = testbed::imagegc_image::write(Path::new(&binary), &name, Path::new(&out))?;
    eprintln!(
        "testbed: {name} (id {}, {} MiB) written as an OCI archive",
        img.id(),
        img.size() >> 20
    );
    println!("{out}");
    Ok(())
}

async fn seed(args: &[String]) -> Result<()> {
    const NS: &str = "k8s.io";
    let images_only = args.first().is_some_and(|a| a == "--images-only");
    let sockets = &args[usize::from(images_only)..];
    let app = ImageBuilder::new("demo-app")
        .shared_base("demo-base", 2 << 20)
        .layer_sizes(&[3 << 20])
        .build();
    let web = ImageBuilder::new("demo-web")
        .shared_base("demo-base", 2 << 20)
        .layer_sizes(&[1 << 20])
        .build();
    let pause = ImageBuilder::new("demo-pause").build();
    let none = HashMap::new();
    let pinned = HashMap::from([("io.cri-containerd.pinned".to_string(), "pinned".to_string())]);
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    for socket in sockets {
        let socket = Path::new(socket);
        image::import(
            socket,
            NS,
            &app,
            &names(&["docker.io/acme/app:1.0", "docker.io/acme/app:latest"]),
            &none,
        )
        .await?;
        image::import(socket, NS, &web, &names(&["docker.io/acme/web:2.3"]), &none).await?;
        if images_only {
            continue;
        }
        image::import(
            socket,
            NS,
            &pause,
            &names(&["registry.k8s.io/pause:3.10"]),
            &pinned,
        )
        .await?;
        image::create_container(
            socket,
            NS,
            "web-0",
            "docker.io/acme/web:2.3",
            Some(&web.id()),
        )
        .await?;
    }
    // Let the CRI plugin adopt the images (it adds their `sha256:<id>` records).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    Ok(())
}
