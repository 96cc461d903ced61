#!/usr/bin/env bash
# make demo: a local test bed (3 simulated containerd nodes, one real kubelet node, etcd +
# kube-apiserver), imagegc installed with helm (its agent and controller run as pods on the real
# node, from `make image`'s image imported with ctr), one agent process per simulated node,
# demo images on every node, then examples/imageremoval.yaml applied and watched until it is
# finished. Everything is torn down at the end, on every exit path.
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
helm=$(bash hack/tools.sh path helm)/helm
ns=imagegc-system
# make image's archive (the Makefile passes both).
: "${IMAGE_TAR:?run through make demo, which builds the image first}" "${IMAGE_NAME:?}"

pids=()
cleanup() {
  local rc=$?
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  bash hack/testbed down
  if [ "$rc" = 0 ]; then
    rm -rf "$IMAGEGC_TESTBED_STATE"
  else
    echo "demo failed; logs of the bed, agents and controller are in $IMAGEGC_TESTBED_STATE" >&2
  fi
}

step "start the test bed: 3 simulated containerd nodes, a real kubelet node and an API server"
bash hack/testbed up --nodes 3 --real-node
trap cleanup EXIT
eval "$(bash hack/testbed env)"
state=$IMAGEGC_TESTBED_STATE

step "import make image's image on the real node (no registry here), as an operator would"
show ctr --address "$REAL_NODE_SOCKET" --namespace k8s.io images import "$IMAGE_TAR"

step "helm install: CRDs, RBAC, admission policy, the agent DaemonSet and the controller"
show "$helm" install imagegc charts/imagegc --namespace "$ns" --create-namespace \
  --set image.repository="${IMAGE_NAME%:*}" --set image.tag="${IMAGE_NAME##*:}" --set image.pullPolicy=Never \
  --set containerd.socket="$REAL_NODE_SOCKET" --set containerd.root="$REAL_NODE_CONTAINERD_ROOT" \
  --set agent.allowForce=true --set agent.prune.minImageAgeSeconds=0 \
  --wait --timeout 3m

step "three simulated Nodes: node-0 and node-1 in the blue pool, node-2 in the green one; the real node joins blue"
"$kubectl" label node "$REAL_NODE" pool=blue >/dev/null
for i in 0 1 2; do
  pool=blue; [ "$i" = 2 ] && pool=green
  "$kubectl" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Node
metadata: {name: node-$i, labels: {pool: $pool}}
YAML
done
show "$kubectl" get nodes -L pool

step "put demo images on every node (an app, a web image in use, the pinned sandbox image)"
# shellcheck disable=SC2086
"$CARGO_TARGET_DIR/debug/testbed" seed $NODE_SOCKETS
# The real node has a real sandbox image, pinned by its CRI, and real containers: only the images.
"$CARGO_TARGET_DIR/debug/testbed" seed --images-only "$REAL_NODE_SOCKET"

# What a kubelet would give each agent: a token of the agent ServiceAccount bound to its Pod,
# which carries the node's name (the admission policy checks it). The Pods never run here.
kubeconfig_for() { # user token file
  cp "$KUBECONFIG" "$3"
  "$kubectl" --kubeconfig "$3" config set-credentials "$1" --token "$2" >/dev/null
  "$kubectl" --kubeconfig "$3" config set-context --current --user "$1" >/dev/null
}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

step "start one agent process per simulated node (as the DaemonSet would if they had a kubelet)"
sockets=($NODE_SOCKETS)
for i in 0 1 2; do
  # Named as the DaemonSet controller names the agent's pods (imagegc-agent-<5 generated
  # characters), which the admission policy requires.
  read -r pod uid < <("$kubectl" -n "$ns" create -o jsonpath='{.metadata.name} {.metadata.uid}' -f - <<YAML
apiVersion: v1
kind: Pod
metadata: {generateName: imagegc-agent-}
spec:
  nodeName: node-$i
  serviceAccountName: imagegc-agent
  tolerations: [{operator: Exists}]
  containers: [{name: agent, image: ghcr.io/imagegc/imagegc:0.1.0}]
YAML
  ) || true # jsonpath prints no newline, so read reports end of input after reading both words
  [ -n "$pod" ] && [ -n "$uid" ] || { echo "creating the agent pod for node-$i failed" >&2; exit 1; }
  token=$("$kubectl" -n "$ns" create token imagegc-agent --duration 1h \
    --bound-object-kind Pod --bound-object-name "$pod" --bound-object-uid "$uid")
  kubeconfig_for "agent-node-$i" "$token" "$state/agent-$i.kubeconfig"
  KUBECONFIG=$state/agent-$i.kubeconfig NODE_NAME=node-$i \
    "$imagegc" agent --socket "${sockets[$i]}" --listen "127.0.0.1:$(port)" \
    --image-fs "$(dirname "${sockets[$i]}")/root" --watermark-check 2s \
    --protect 'registry.k8s.io/pause:*' --allow-force --prune-min-image-age 0s \
    >"$state/agent-$i.log" 2>&1 &
  pids+=($!)
  echo "agent on node-$i: pid $!, log $state/agent-$i.log"
done

step "the agent pod Running on the real node beside the simulated nodes' (which have no kubelet)"
show "$kubectl" get nodes -L pool
show "$kubectl" get pods -n "$ns" -o wide

step "every agent reports its node's images"
for _ in $(seq 1 60); do
  [ "$("$kubectl" get nodeimagereports -o name | wc -l)" = 4 ] && break; sleep 0.5
done
show "$kubectl" get nodeimagereports

wait_done() { # name: until every target node has reported on the current generation
  for _ in $(seq 1 120); do
    got=$("$kubectl" get imageremoval "$1" -o jsonpath='{.metadata.generation}/{.status.observedGeneration}/{.status.pending}/{.status.targetNodes}' 2>/dev/null || true)
    IFS=/ read -r gen observed pending targets <<<"$got"
    [ -n "$targets" ] && [ "$gen" = "$observed" ] && [ "$pending" = 0 ] && [ "$targets" != 0 ] && return 0
    sleep 0.5
  done
  echo "demo: $1 did not finish in 60 s" >&2; return 1
}

step "apply examples/imageremoval.yaml: remove acme/app:1.0 from the blue pool (node-0, node-1, the real node)"
cat examples/imageremoval.yaml
show "$kubectl" apply -f examples/imageremoval.yaml
wait_done retire-app-1.0
show "$kubectl" get imageremovals,nodeimagereports

step "what happened on the real node, per image (its agent pod did it through the node's containerd)"
show "$kubectl" get nodeimagereport "$REAL_NODE" -o jsonpath='{range .status.removals[*].images[*]}{.image}{"\t"}{.outcome}{"\t"}{.message}{"\n"}{end}'
show ctr --address "$REAL_NODE_SOCKET" --namespace k8s.io images list -q

step "what happened on node-0, per image"
show "$kubectl" get nodeimagereport node-0 -o jsonpath='{range .status.removals[*].images[*]}{.image}{"\t"}{.outcome}{"\t"}{.message}{"\n"}{end}'

step "the protections: remove the in-use web image and the pinned sandbox image everywhere"
"$kubectl" apply -f - <<YAML
apiVersion: imagegc.dev/v1alpha1
kind: ImageRemoval
metadata: {name: protected}
spec:
  images: [docker.io/acme/web:2.3, registry.k8s.io/pause:3.10]
YAML
wait_done protected
show "$kubectl" get imageremovals
show "$kubectl" get imageremoval protected -o jsonpath='{range .status.failures[*]}{.node}{"\t"}{.image}{"\t"}{.reason}{"\n"}{end}'
step "the Events the agents and the controller published"
show "$kubectl" get events.v1.events.k8s.io -n default \
  -o custom-columns=TYPE:.type,REASON:.reason,OBJECT:.regarding.name,FROM:.reportingController

step "force it: a new generation removes the in-use web image too; pause stays pinned"
show "$kubectl" patch imageremoval protected --type merge -p '{"spec":{"force":true}}'
wait_done protected
show "$kubectl" get imageremovals -o wide

step "afterwards: acme/app is gone from the blue pool only (node-2 keeps it); web is gone everywhere (forced); pause stays"
show "$imagegc" images --socket "$NODE0_SOCKET"
show "$imagegc" images --socket "$NODE2_SOCKET"

step "a standing policy, as a dry run: a disk guard at 1 % (this machine's disk is fuller) down to 0 %"
"$kubectl" apply -f - <<YAML
apiVersion: imagegc.dev/v1alpha1
kind: ImagePrunePolicy
metadata: {name: disk-guard-demo}
spec:
  watermark: {highPercent: 1, lowPercent: 0}
  dryRun: true
YAML
for _ in $(seq 1 60); do
  [ "$("$kubectl" get imageprunepolicy disk-guard-demo -o jsonpath='{.status.nodesEvaluated}' 2>/dev/null)" = 4 ] && break; sleep 0.5
done
show "$kubectl" get imageprunepolicies
step "what the policy would remove on node-2, least recently used first (in-use and pinned images never)"
show "$kubectl" get nodeimagereport node-2 -o jsonpath='{range .status.policies[*].images[*]}{.references[0]}{"\t"}{.outcome}{"\t"}{.reason}{"\n"}{end}'

step "done; stopping the agents, the real node and the API server, tearing down"
