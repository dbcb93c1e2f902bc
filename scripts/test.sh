#!/usr/bin/env bash
# tern's test command: installs what the tests need (idempotent, quick when already there), checks
# formatting and lints, then runs the whole workspace's tests in release mode (guests run faster
# with an optimised VMM).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "test: cargo fmt --check" >&2
cargo fmt --all --check
echo "test: cargo clippy --all-targets -- -D warnings" >&2
cargo clippy --release --workspace --all-targets -- -D warnings
exec cargo test --release --workspace "$@"
