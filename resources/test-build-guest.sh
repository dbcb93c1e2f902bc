#!/usr/bin/env bash
# test-build-guest.sh — checks of build-guest.sh: result lines, files, cache hit, failure message.
# The first run builds the kernel (minutes) unless the cache already holds it. Ends with the line
# `build-guest: N passed, N failed`; exit status 0 only when nothing failed.
set -uo pipefail

HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
BUILD="$HERE/build-guest.sh"
pass=0 fail=0
ok() { echo "ok   - $*"; pass=$((pass + 1)); }
bad() { echo "FAIL - $*"; fail=$((fail + 1)); }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. a build (or hit) prints KERNEL= and INITRAMFS= as the last two stdout lines, and the files exist
if bash "$BUILD" >"$tmp/out1" 2>"$tmp/err1"; then
    kernel=$(tail -n 2 "$tmp/out1" | sed -n 's/^KERNEL=//p')
    initramfs=$(tail -n 1 "$tmp/out1" | sed -n 's/^INITRAMFS=//p')
    if [[ -n "$kernel" && -n "$initramfs" ]]; then ok "result lines"; else bad "result lines: $(cat "$tmp/out1")"; fi
    dir=$(dirname "$kernel")
    if [[ "$(head -c 4 "$kernel" | od -An -c | tr -d ' ')" == '177ELF' ]]; then ok "vmlinux is ELF"; else bad "vmlinux is not ELF: $kernel"; fi
    if [[ "$(head -c 518 "$dir/bzImage" | tail -c 4)" == HdrS ]]; then ok "bzImage has a boot header"; else bad "bzImage: $dir/bzImage"; fi
    if cpio -t <"$initramfs" 2>/dev/null | grep -qx init; then ok "initramfs has /init"; else bad "initramfs: no /init"; fi
    if grep -qx 'CONFIG_KVM_GUEST=y' "$dir/config"; then ok "config has KVM_GUEST"; else bad "config"; fi
else
    bad "build failed: $(tail -n 5 "$tmp/err1")"
fi

# 2. the second run is a cache hit and fast
start=$(date +%s%N)
if bash "$BUILD" >"$tmp/out2" 2>"$tmp/err2"; then
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    if grep -q '^build-guest: cache hit ' "$tmp/err2"; then ok "second run is a cache hit (${ms} ms)"; else bad "second run: $(cat "$tmp/err2")"; fi
    if ((ms < 2000)); then ok "cache hit under 2 s"; else bad "cache hit took ${ms} ms"; fi
    if cmp -s "$tmp/out1" "$tmp/out2"; then ok "same result paths"; else bad "paths differ"; fi
else
    bad "second run failed"
fi

# 3. a package that cannot be installed: exit 2 and a clear message
TERN_GUEST_EXTRA_PKGS=tern-no-such-package bash "$BUILD" >"$tmp/out3" 2>"$tmp/err3"
rc=$?
if ((rc == 2)); then ok "missing package exits 2"; else bad "missing package exits $rc"; fi
if grep -q '^build-guest: cannot install tern-no-such-package: ' "$tmp/err3"; then
    ok "message: $(grep '^build-guest: cannot install' "$tmp/err3")"
else
    bad "no clear message: $(cat "$tmp/err3")"
fi

echo "build-guest: $pass passed, $fail failed"
((fail == 0))
