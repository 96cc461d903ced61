#!/usr/bin/env bash
# Installs what building and testing imagegc needs on a fresh Debian machine, then builds the
# Go test binaries into the cache (hack/tools.sh). Safe to run again: it skips what is there.
#
#   hack/deps.sh         everything `make test` needs
#   hack/deps.sh crio    and what the CRI-O tests need (make e2e-crio): CRI-O built from its
#                        Go module, conmon and skopeo from Debian
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# containerd (1.6) also brings ctr, which imports `make image`'s tarball; runc runs the real
# node's pods, containernetworking-plugins gives them a network (bridge, host-local), iproute2
# makes the bridge, gcc and libc6-dev build the static pause binary.
packages=(containerd runc protobuf-compiler util-linux ca-certificates python3 python3-venv
  containernetworking-plugins iproute2 gcc libc6-dev)
if [ "${1:-}" = crio ]; then packages+=(conmon skopeo); fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "deps: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's containerd package may start a system daemon; the test bed never uses it.

command -v cargo >/dev/null || { echo "deps: Rust (cargo) is required: install it with rustup" >&2; exit 1; }
command -v protoc >/dev/null || { echo "deps: protoc is missing after install" >&2; exit 1; }
command -v setpriv >/dev/null || { echo "deps: setpriv (util-linux) is missing after install" >&2; exit 1; }

bash "$here/tools.sh" all
if [ "${1:-}" = crio ]; then bash "$here/tools.sh" path crio >/dev/null; fi
