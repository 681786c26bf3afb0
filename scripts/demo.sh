#!/usr/bin/env bash
# The main job in one command: build, reproduce the incident in a lab on this kernel (a stale
# entry makes a request hang right after the handshake), then `sockmap-gc audit` shows the
# stale keys and `sockmap-gc sweep --execute` removes them, and the stuck ports work again.
# Run as root on a Debian machine; the lab removes everything it created when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

# SMGC_BIN=DIR uses binaries already built there (scripts/kernel-check.sh runs this in a guest).
if [ -n "${SMGC_BIN:-}" ]; then
  bin=$SMGC_BIN
else
  bash scripts/setup.sh
  cargo build --release --workspace --locked
  bin=$PWD/target/release
fi

# audit exits 1 when it finds stale entries: here that is the expected finding.
cure="$bin/sockmap-gc audit --map {map}; test \$? -eq 1 && $bin/sockmap-gc sweep --map {map} --execute"
exec "$bin/sockmap-gc-lab" incident --id demo --cure-exec "$cure"
