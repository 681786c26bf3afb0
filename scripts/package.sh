#!/usr/bin/env bash
# Builds the Debian package with cargo-deb and prints its path on the last line:
# target/debian/sockmap-gc_VERSION-1_ARCH.deb. The release binary is built (incrementally) first,
# then the man page and shell completions are generated from it into target/release/generated/
# (`sockmap-gc generate ...`, from the same clap definitions as --help). Installs cargo-deb with
# `cargo install --locked` if it is missing. Needs what scripts/setup.sh installs; no root.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
# One run at a time (the package and image tests both run this): cargo-deb's install, the
# generated files and the package are all rewritten below.
mkdir -p "$target/debian"
exec 9>"$target/debian/.package.lock"
flock 9

CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version >/dev/null 2>&1; then
  echo "package.sh: installing cargo-deb $CARGO_DEB_VERSION (cargo install --locked)" >&2
  start=$(date +%s)
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" --quiet
  echo "package.sh: cargo-deb installed in $(( $(date +%s) - start )) s" >&2
fi

cargo build --release --locked -p sockmap-gc --bin sockmap-gc
bin="$target/release/sockmap-gc"
# cargo-deb reads the assets under target/release/ in Cargo.toml from the real target directory.
generated="$target/release/generated"
mkdir -p "$generated"
"$bin" generate man | gzip -9n >"$generated/sockmap-gc.1.gz"
"$bin" generate complete-bash >"$generated/sockmap-gc.bash"
"$bin" generate complete-zsh >"$generated/_sockmap-gc"
"$bin" generate complete-fish >"$generated/sockmap-gc.fish"

# Dependencies are listed in Cargo.toml ([package.metadata.deb] depends), so dpkg-shlibdeps
# (dpkg-dev) is not needed.
# Made aside and moved in: a test still reading the previous package keeps reading it whole.
deb="$target/debian/sockmap-gc_$("$bin" --version | awk '{print $2}')-1_$(dpkg --print-architecture).deb"
made=$(mktemp -d "$target/debian/.made.XXXXXX")
# --strip: the release profile keeps line tables (debug = 1) for backtraces; the package does not.
cargo deb --no-build --strip --locked -p sockmap-gc --output "$made/" >&2
[ -f "$made/${deb##*/}" ] || { echo "package.sh: $deb was not made" >&2; rm -rf "$made"; exit 1; }
mv "$made/${deb##*/}" "$deb"
rm -rf "$made"
find "$target/debian" -maxdepth 1 -name 'sockmap-gc_*.deb' ! -name "${deb##*/}" -delete
echo "$deb"
