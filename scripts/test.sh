#!/usr/bin/env bash
# The whole test suite: style gates, unit tests, and the integration tests on the real kernel.
# Run as root on a Debian machine; CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The integration tests run the built binaries (the product and the lab's peers).
cargo build --workspace --locked
cargo test --workspace --locked
