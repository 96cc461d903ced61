//! The `imagegc` binary: one process, several roles.
#![warn(clippy::too_many_lines)]

use std::process::ExitCode;

use std::io::Write;

use clap::{Parser, Subcommand};
use imagegc::cli::{self, Format, Target};

#[derive(Parser)]
#[command(
    name = "imagegc",
    version,
    about = "Remove container images from Kubernetes nodes, safely"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the node's images grouped by ID: references, size, pinned, in use.
    Images {
        #[command(flatten)]
        target: Target,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Remove images by ID, short ID or reference, with every reference, as CRI RemoveImage
    /// does; pinned images are never removed and in-use images only with --force.
    Rmi {
        #[command(flatten)]
        target: Target,
        /// Print what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also remove images that containers use (pinned images are still kept).
        #[arg(long)]
        force: bool,
        /// Image IDs, short IDs or references.
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<String>,
    },
    /// Run the node agent (a DaemonSet): execute the ImageRemovals that target this node and
    /// report in its NodeImageReport.
    Agent(imagegc::agent::AgentArgs),
    /// Print the CustomResourceDefinitions generated from the API types (`crds/` holds them).
    Crdgen,
    /// Fold every node's NodeImageReport into ImageRemoval status (leader-elected Deployment).
    Controller(imagegc::controller::ControllerArgs),
    /// Check that an installation works: CRDs served, agents and controller ready, reports
    /// written (the chart's `helm test`).
    Check(imagegc::check::CheckArgs),
}

fn main() -> ExitCode {
    let args = Cli::parse();
    // The controller folds every node's report: it gets a worker thread per core. Every other
    // role (the agent on each node, the local commands) waits on I/O almost all the time and
    // runs on this one thread: no worker threads, their stacks and malloc arenas, in the
    // process that runs on every node, and a quicker start for the commands.
    let runtime = match args.command {
        Command::Controller(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    }
    .enable_all()
    .build();
    match runtime {
        Ok(runtime) => runtime.block_on(run(args)),
        Err(e) => {
            eprintln!("imagegc: starting the async runtime: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Cli) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let result = match args.command {
        Command::Crdgen => imagegc::api::crds_yaml()
            .map_err(|e| e.to_string())
            .and_then(|y| out.write_all(y.as_bytes()).map_err(|e| e.to_string()))
            .map(|()| true)
            .map_err(cli::CliError::Generate),
        Command::Controller(args) => {
            return match imagegc::controller::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("imagegc controller: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Command::Check(args) => {
            return match imagegc::check::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("imagegc check: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Command::Images { target, output } => {
            cli::images(&target, output, &mut out).await.map(|()| true)
        }
        Command::Rmi {
            target,
            dry_run,
            force,
            images,
        } => cli::rmi(&target, images, force, dry_run, &mut out).await,
        Command::Agent(args) => {
            return match imagegc::agent::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("imagegc agent: {e}");
                    ExitCode::from(1)
                }
            };
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("imagegc: {e}");
            ExitCode::from(2)
        }
    }
}
