//! The end-to-end suite: real containerd daemons (2.x and Debian's 1.6), a real kube-apiserver
//! with etcd, and the `imagegc` binary. One test binary, so it is linked once.
//!
//! Run a subset with `make e2e ARGS=removal::differential`.

mod api;
mod bed;
mod bench;
mod chart;
mod cli;
mod controller;
mod crio;
mod faults;
mod fuzz;
mod node;
mod operator;
mod policy;
mod removal;
mod safety;
mod security;
mod support;

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let mut trials = Vec::new();
    trials.extend(api::trials());
    trials.extend(bed::trials());
    trials.extend(bench::trials());
    trials.extend(chart::trials());
    trials.extend(cli::trials());
    trials.extend(controller::trials());
    trials.extend(crio::trials());
    trials.extend(faults::trials());
    trials.extend(fuzz::trials());
    trials.extend(node::trials());
    trials.extend(operator::trials());
    trials.extend(policy::trials());
    trials.extend(removal::trials());
    trials.extend(safety::trials());
    trials.extend(security::trials());
    let conclusion = libtest_mimic::run(&args, trials);
    testbed::process::cleanup_all();
    conclusion.exit();
}
