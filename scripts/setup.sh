#!/usr/bin/env bash
# Installs what tern's tests need on a fresh Debian machine. Idempotent: a second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "setup: $*" >&2; }

if [ ! -e /dev/kvm ]; then
    say "/dev/kvm is missing: tern needs KVM"
    exit 2
fi
command -v cargo >/dev/null || { say "cargo is missing: install a Rust toolchain first"; exit 2; }
