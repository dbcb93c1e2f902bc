#!/usr/bin/env bash
# The Linux test guest with tern's guest programs in it: builds every program under
# guest-tests/linux/*/ as a static binary (target/linux-guest/), then runs
# resources/build-guest.sh with them (TERN_GUEST_PROGRAMS). Same output contract as that script:
# stdout is exactly `KERNEL=...` and `INITRAMFS=...`, progress goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="$repo/target/linux-guest"
programs=()
for manifest in "$here"/*/Cargo.toml; do
    name="$(basename "$(dirname "$manifest")")"
    echo "linux-guest: building $name (static)" >&2
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
        --manifest-path "$manifest" --target x86_64-unknown-linux-gnu --target-dir "$target" >&2
    programs+=("$target/x86_64-unknown-linux-gnu/release/$name")
done
TERN_GUEST_PROGRAMS="${programs[*]}" exec "$repo/resources/build-guest.sh"
