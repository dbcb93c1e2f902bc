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

# The minimal Linux guest kernel and initramfs with tern's guest programs (guest-tests/linux/*),
# cached by a hash of their inputs; the first build takes minutes and prints progress.
say "building the Linux guest kernel and initramfs (cached)"
guest-tests/linux/build.sh >/dev/null
say "ready"
