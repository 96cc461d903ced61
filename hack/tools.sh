#!/usr/bin/env bash
# Builds the test bed's Go binaries from their Go modules (pinned in versions.env) and
# caches them outside the repository. Prints the directory holding each binary.
#
#   hack/tools.sh all            build everything missing, print nothing but progress
#   hack/tools.sh path NAME      print the directory holding NAME (building it if missing)
#
# NAME is one of: kube-apiserver kubectl kubelet kube-controller-manager kube-scheduler etcd helm
# containerd containerd-shim-runc-v2 crictl pause. The Kubernetes binaries are built together in
# one `go build` (they share most packages), and so are containerd and its runc shim.
# crio (with its pinns helper) is built only when asked for: `all` leaves it out.
# If KUBEBUILDER_ASSETS holds kube-apiserver, etcd and kubectl, those are used instead.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${IMAGEGC_CACHE:-$HOME/.cache/imagegc}
export GOFLAGS=-buildvcs=false
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}

log() { echo "tools: $*" >&2; }

kubernetes_tools=(kube-apiserver kubectl kubelet kube-controller-manager kube-scheduler)

need_go() {
  command -v go >/dev/null || { log "Go is required to build test binaries; install Go 1.26+ or set KUBEBUILDER_ASSETS"; exit 1; }
}

# build_in_module OUT PKGS STAGING REQUIRES... : build the space-separated PKGS in a scratch module
# that requires the given module@version pairs; every "=> ./..." local replace of the first
# required module is turned into its published version STAGING (the staging-module trick that
# makes k8s.io/kubernetes usable as a module). OUT is a file for one package, a directory
# ending in / for several.
build_in_module() {
  local out=$1 pkgs=$2 staging_version=$3; shift 3
  local work rc=0; work=$(mktemp -d)
  (
    cd "$work"
    go mod init imagegc.dev/testbed-tools >/dev/null 2>&1
    local first=$1
    for req in "$@"; do go mod edit -require="$req"; done
    if [ -n "$staging_version" ]; then
      local gomod
      gomod=$(go mod download -json "$first" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
      # Lines look like: k8s.io/api => ./staging/src/k8s.io/api
      { grep -E '^\s*[^ ]+ => \./' "$gomod" || true; } | awk '{print $1}' | while read -r m; do
        go mod edit -replace="$m=$m@$staging_version"
      done
    fi
    { printf 'package tools\n\n'; for pkg in $pkgs; do printf 'import _ "%s"\n' "$pkg"; done; } > tools.go
    go mod tidy >/dev/null 2>&1 || go mod tidy
    local extra=""
    if [ -n "${LDFLAGS_FN:-}" ]; then extra=$("$LDFLAGS_FN"); fi
    # shellcheck disable=SC2086
    go build -trimpath -ldflags "-s -w $extra" -o "$out" $pkgs
  ) || rc=$?
  rm -rf "$work"
  return $rc
}

# What helm's own release build passes (its Makefile), run inside the scratch module: the
# version, and the Kubernetes version `helm template` and `helm lint` assume when they do not
# ask a cluster, taken from the client-go helm is built with. Without it they assume v1.20 and
# refuse a chart whose kubeVersion asks for more.
helm_ldflags() {
  local v minor
  v=$(go list -m -f '{{.Version}}' k8s.io/client-go) # v0.34.2
  v=${v#v0.}
  minor=${v%%.*}
  echo "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor" \
    "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor"
}

# What Kubernetes' own release build stamps (hack/lib/version.sh): without it the binaries say
# v0.0.0-master, and `helm install` refuses a chart whose kubeVersion asks for >=1.30.
kube_ldflags() {
  local minor=${KUBERNETES_VERSION#v1.}
  minor=${minor%%.*}
  local p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    echo "-X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
}

build() {
  local name=$1 dir
  case $name in
    kube-apiserver|kubectl|kubelet|kube-controller-manager|kube-scheduler)
      # "-stamped": built with kube_ldflags (an earlier cache without them is not reused).
      dir="$cache/bin/kubernetes-$KUBERNETES_VERSION-stamped"
      [ -x "$dir/$name" ] && { echo "$dir"; return; }
      need_go; mkdir -p "$dir"
      # Every missing one at once: one go build shares the compiled packages between them.
      local missing=() pkgs=""
      for t in "${kubernetes_tools[@]}"; do
        [ -x "$dir/$t" ] || { missing+=("$t"); pkgs+=" k8s.io/kubernetes/cmd/$t"; }
      done
      log "building ${missing[*]} $KUBERNETES_VERSION from k8s.io/kubernetes (several minutes, once)"
      LDFLAGS_FN=kube_ldflags build_in_module "$dir/" "${pkgs# }" "v0.${KUBERNETES_VERSION#v1.}" \
        "k8s.io/kubernetes@$KUBERNETES_VERSION"
      ;;
    etcd)
      dir="$cache/bin/etcd-$ETCD_VERSION"
      [ -x "$dir/etcd" ] && { echo "$dir"; return; }
      need_go; mkdir -p "$dir"
      log "building etcd $ETCD_VERSION from go.etcd.io/etcd/server/v3"
      build_in_module "$dir/etcd" "go.etcd.io/etcd/server/v3" "" \
        "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
      ;;
    containerd|containerd-shim-runc-v2)
      dir="$cache/bin/containerd-$CONTAINERD_VERSION"
      [ -x "$dir/$name" ] && { echo "$dir"; return; }
      need_go; mkdir -p "$dir"
      local missing=() pkgs=""
      for t in containerd containerd-shim-runc-v2; do
        [ -x "$dir/$t" ] || { missing+=("$t"); pkgs+=" github.com/containerd/containerd/v2/cmd/$t"; }
      done
      log "building ${missing[*]} $CONTAINERD_VERSION from github.com/containerd/containerd/v2"
      CGO_ENABLED=0 GOFLAGS="$GOFLAGS -tags=no_btrfs,no_devmapper,no_zfs" \
        build_in_module "$dir/" "${pkgs# }" "" \
        "github.com/containerd/containerd/v2@$CONTAINERD_VERSION"
      ;;
    pause)
      # The real node's sandbox image: a static binary that sleeps until signalled and reaps
      # orphans, like Kubernetes' own pause. Keyed by its source, so an edit rebuilds it.
      local sum; sum=$(sha256sum "$here/pause.c" | cut -c1-12)
      dir="$cache/bin/pause-$sum"
      [ -x "$dir/pause" ] && { echo "$dir"; return; }
      command -v gcc >/dev/null || { log "gcc is required to build the pause binary (apt-get install gcc libc6-dev)"; exit 1; }
      mkdir -p "$dir"
      log "building pause from hack/pause.c"
      gcc -static -Os -s -o "$dir/pause.tmp" "$here/pause.c" && mv "$dir/pause.tmp" "$dir/pause"
      ;;
    helm)
      # "-k8s": built with helm_ldflags (an earlier cache without them is not reused).
      dir="$cache/bin/helm-$HELM_VERSION-k8s"
      [ -x "$dir/helm" ] && { echo "$dir"; return; }
      need_go; mkdir -p "$dir"
      log "building helm $HELM_VERSION from helm.sh/helm/v3"
      LDFLAGS_FN=helm_ldflags \
        build_in_module "$dir/helm" "helm.sh/helm/v3/cmd/helm" "" "helm.sh/helm/v3@$HELM_VERSION"
      ;;
    crictl)
      dir="$cache/bin/crictl-$CRICTL_VERSION"
      [ -x "$dir/crictl" ] && { echo "$dir"; return; }
      need_go; mkdir -p "$dir"
      log "building crictl $CRICTL_VERSION from sigs.k8s.io/cri-tools"
      build_in_module "$dir/crictl" "sigs.k8s.io/cri-tools/cmd/crictl" "" "sigs.k8s.io/cri-tools@$CRICTL_VERSION"
      ;;
    crio)
      dir="$cache/bin/crio-$CRIO_VERSION"
      [ -x "$dir/crio" ] && [ -x "$dir/pinns" ] && { echo "$dir"; return; }
      need_go; mkdir -p "$dir"
      log "building crio $CRIO_VERSION from github.com/cri-o/cri-o (several minutes, once)"
      # Built inside a copy of CRI-O's own module, so its go.sum vouches for every dependency
      # (some of them are not in the checksum database). Without cgo: OpenPGP in Go instead of
      # gpgme, no btrfs or devicemapper graph drivers, no ostree, no libseccomp (the tests run
      # no seccomp profiles).
      local src work rc=0
      src=$(go mod download -json "github.com/cri-o/cri-o@$CRIO_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
      work=$(mktemp -d)
      cp -r "$src"/. "$work" && chmod -R u+w "$work"
      (
        cd "$work"
        CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" \
          -tags "containers_image_openpgp containers_image_ostree_stub exclude_graphdriver_btrfs exclude_graphdriver_devicemapper" \
          -o "$dir/crio" ./cmd/crio
        # pinns (C, in the same module) pins a pod's namespaces; CRI-O runs it for every pod.
        cc -std=c99 -O2 -Wall -static -o "$dir/pinns" pinns/src/*.c
      ) || rc=$?
      rm -rf "$work"
      [ $rc -eq 0 ] || exit $rc
      ;;
    *) log "unknown tool '$name'"; exit 2 ;;
  esac
  echo "$dir"
}

path() {
  local name=$1
  if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/$name" ]; then
    echo "$KUBEBUILDER_ASSETS"; return
  fi
  build "$name"
}

case ${1:-} in
  all)  for t in etcd containerd kube-apiserver helm crictl pause; do path "$t" >/dev/null; done ;;
  path) path "${2:?usage: tools.sh path NAME}" ;;
  *) echo "usage: $0 all | path NAME" >&2; exit 2 ;;
esac
