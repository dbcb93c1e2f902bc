#!/usr/bin/env bash
# tern's test command: installs what the tests need (idempotent, quick when already there), then
# runs the whole workspace's tests in release mode (guests run faster with an optimised VMM).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo test --release --workspace "$@"
