#!/usr/bin/env bash
# make demo: a local test bed (3 containerd nodes, etcd + kube-apiserver), the CRDs installed,
# demo images on every node, then imagegc at a node's shell. Everything is torn down at the end.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/imagegc/target}
export IMAGEGC_TESTBED_STATE=${TMPDIR:-/tmp}/imagegc-demo-$$
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

cargo build -q -p testbed --bin testbed
cargo build -q --bin imagegc
imagegc=$CARGO_TARGET_DIR/debug/imagegc
kubectl=$(bash hack/tools.sh path kubectl)/kubectl

step "start the test bed: 3 containerd nodes and an API server"
bash hack/testbed up --nodes 3
trap 'bash hack/testbed down' EXIT
eval "$(bash hack/testbed env)"

step "install the CRDs generated from the API types"
show "$kubectl" apply -f crds/imagegc.dev.yaml
"$kubectl" wait --for condition=established --timeout=60s crd/imageremovals.imagegc.dev crd/nodeimagereports.imagegc.dev
show "$kubectl" get crd -o custom-columns=NAME:.metadata.name,SHORT:.spec.names.shortNames

step "put demo images on every node (an app, a web image in use, the pinned sandbox image)"
# shellcheck disable=SC2086
"$CARGO_TARGET_DIR/debug/testbed" seed $NODE_SOCKETS

step "node-0's images, grouped by ID"
show "$imagegc" images --socket "$NODE0_SOCKET"

step "what removing them would do (nothing changes)"
show "$imagegc" rmi --socket "$NODE0_SOCKET" --dry-run acme/app:1.0 docker.io/acme/web:2.3 registry.k8s.io/pause:3.10 || true

step "remove them: the app goes with every reference; the in-use and pinned images stay"
show "$imagegc" rmi --socket "$NODE0_SOCKET" acme/app:1.0 docker.io/acme/web:2.3 registry.k8s.io/pause:3.10 || true

step "node-0 afterwards; node-1 untouched"
show "$imagegc" images --socket "$NODE0_SOCKET"
show "$imagegc" images --socket "$NODE1_SOCKET"

step "done; tearing down"
