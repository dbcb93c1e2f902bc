#!/usr/bin/env bash
# build-guest.sh — build tern's minimal Linux guest kernel and initramfs, cached by their inputs.
#
# Usage:  resources/build-guest.sh            (progress on stderr)
#         eval "$(resources/build-guest.sh)"  (stdout is only the two result lines)
#
# stdout, last two lines:   KERNEL=<cache>/guest/<key>/vmlinux
#                           INITRAMFS=<cache>/guest/<key>/initramfs.cpio
# Environment:
#   TERN_CACHE             cache root (default: <repo>/.cache); artefacts go to $TERN_CACHE/guest/
#   TERN_GUEST_PROGRAMS    space-separated paths of static binaries to put in the initramfs's /bin
#   TERN_GUEST_EXTRA_PKGS  extra Debian packages to require (a test uses it to simulate a failing install)
#   TERN_GUEST_JOBS        make -j value (default: nproc)
#   TERN_GUEST_KEEP        result directories kept in the cache, newest first (default: 6)
# Exit codes: 0 built or cache hit; 2 a package cannot be installed; 1 anything else.
# See resources/README.md for the cache layout and the kernel command line.
set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
RES=$(dirname "$SCRIPT")
REPO=$(dirname "$RES")
FRAGMENT="$RES/kernel/tern-guest.config"
INITRAMFS_SRC="$RES/initramfs"
CACHE_ROOT="${TERN_CACHE:-$REPO/.cache}"
GUEST="$CACHE_ROOT/guest"
START=$(date +%s)

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
elapsed() { echo "$(( $(date +%s) - START ))s"; }

# The Debian source package of the kernel: linux-source-<major.minor>. `linux-source` is only a
# metapackage pointing at it; we name the versioned one so the tarball path is known.
KSRC_PKG=linux-source-6.1
KSRC_TAR=/usr/src/linux-source-6.1.tar.xz
PKGS=("$KSRC_PKG" build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils busybox-static)
# shellcheck disable=SC2206  # word splitting is the point
[[ -n "${TERN_GUEST_EXTRA_PKGS:-}" ]] && PKGS+=(${TERN_GUEST_EXTRA_PKGS})

[[ -f "$FRAGMENT" ]] || die "missing $FRAGMENT"
[[ -f "$INITRAMFS_SRC/init" ]] || die "missing $INITRAMFS_SRC/init"

mkdir -p "$GUEST"
# One builder at a time (parallel tests call this concurrently); the others wait, then hit the cache.
exec 9>"$GUEST/.lock"
if ! flock -n 9; then
    log "another build-guest holds $GUEST/.lock; waiting"
    flock 9
fi

# ---------------------------------------------------------------- 1. packages
pkg_installed() { dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null | grep -qx installed; }
pkg_version() { dpkg-query -W -f='${Version}' "$1"; }

missing=()
for p in "${PKGS[@]}"; do pkg_installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
    log "installing ${missing[*]} (apt-get)"
    apt_out=$(mktemp)
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o DPkg::Lock::Timeout=300 "${missing[@]}" >"$apt_out" 2>&1
    }
    if ! apt_install; then
        # Stale or missing package lists are the usual cause: refresh them once and retry.
        log "apt-get install failed; running apt-get update and retrying"
        if DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$apt_out" 2>&1 && apt_install; then
            :
        else
            reason=$(grep '^E: ' "$apt_out" | head -n 3 | sed 's/^E: //' | paste -sd ';' -)
            [[ -n "$reason" ]] || reason=$(tail -n 1 "$apt_out")
            echo "build-guest: cannot install ${missing[*]}: ${reason:-apt-get failed}" >&2
            rm -f "$apt_out"
            exit 2
        fi
    fi
    rm -f "$apt_out"
    log "installed ${missing[*]} ($(elapsed))"
fi
[[ -f "$KSRC_TAR" ]] || die "$KSRC_PKG is installed but $KSRC_TAR is missing"
[[ -x /bin/busybox ]] || die "busybox-static is installed but /bin/busybox is missing"

# ---------------------------------------------------------------- 2. cache keys
# Guest programs: each must be a file, statically linked (no PT_INTERP), with a distinct name.
read -r -a PROGRAMS <<<"${TERN_GUEST_PROGRAMS:-}"
declare -A seen=()
for prog in "${PROGRAMS[@]}"; do
    [[ -f "$prog" ]] || die "TERN_GUEST_PROGRAMS: $prog is not a file"
    if LC_ALL=C readelf -l "$prog" 2>/dev/null | grep -q 'Requesting program interpreter'; then
        die "TERN_GUEST_PROGRAMS: $prog is dynamically linked; link it statically"
    fi
    name=$(basename "$prog")
    [[ -z "${seen[$name]:-}" ]] || die "TERN_GUEST_PROGRAMS: two programs named $name"
    seen[$name]=1
done

KSRC_VERSION=$(pkg_version "$KSRC_PKG")
BUSYBOX_VERSION=$(pkg_version busybox-static)
CC_VERSION=$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)

# The kernel depends only on the fragment, this script, the kernel source and the compiler, so a
# change of guest programs re-packs the initramfs without touching the kernel.
kernel_hash() { # fragment
    { echo "kernel-source $KSRC_VERSION"; echo "gcc $CC_VERSION"
      echo "fragment"; cat "$1"; echo "script"; cat "$SCRIPT"; } | sha256sum | cut -c1-16
}
initramfs_hash() { # initramfs-dir program...
    local dir=$1; shift
    { echo "busybox $BUSYBOX_VERSION"; echo "script"; cat "$SCRIPT"
      (cd "$dir" && find . -type f | LC_ALL=C sort | while read -r f; do
          echo "file $f $(stat -c %a "$f")"; sha256sum <"$f"; done)
      for prog in "$@"; do echo "program $(basename "$prog")"; sha256sum <"$prog"; done
    } | sha256sum | cut -c1-16
}
set_keys() { # fragment initramfs-dir program...
    kernel_key=$(kernel_hash "$1"); shift
    initramfs_key=$(initramfs_hash "$@")
    KEY=$(echo "$kernel_key $initramfs_key" | sha256sum | cut -c1-16)
    OUT="$GUEST/$KEY"
    KOUT="$GUEST/kernel-$kernel_key"
}
set_keys "$FRAGMENT" "$INITRAMFS_SRC" "${PROGRAMS[@]}"

# Keep the newest results (by mtime; a hit refreshes it) and drop older ones, so the cache does not
# grow without bound as guest programs change.
KEEP=${TERN_GUEST_KEEP:-6}
prune() {
    local d re
    for re in '/[0-9a-f]{16}$' '/kernel-[0-9a-f]{16}$'; do
        # shellcheck disable=SC2012  # the names are hex keys
        ls -1dt "$GUEST"/* | grep -E "$re" | tail -n +$((KEEP + 1)) | while read -r d; do
            [[ "$d" == "$OUT" || "$d" == "$KOUT" ]] || rm -rf "$d"
        done
    done
}

finish() {
    touch "$OUT"
    prune
    ln -sfn "$KEY" "$GUEST/current.tmp" && mv -T "$GUEST/current.tmp" "$GUEST/current"
    echo "KERNEL=$OUT/vmlinux"
    echo "INITRAMFS=$OUT/initramfs.cpio"
    exit 0
}

if [[ -f "$OUT/vmlinux" && -f "$OUT/bzImage" && -f "$OUT/initramfs.cpio" && -f "$OUT/config" ]]; then
    log "cache hit $OUT"
    finish
fi
WORK="$GUEST/work"
mkdir -p "$WORK"
# Build from a snapshot of the inputs, keyed by the snapshot, so that an edit made while this runs
# cannot end up in a result filed under the old key.
STAGE=$(mktemp -d "$WORK/inputs.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
cp "$FRAGMENT" "$STAGE/tern-guest.config"
cp -a "$INITRAMFS_SRC" "$STAGE/initramfs"
mkdir "$STAGE/programs"
STAGED_PROGRAMS=()
for prog in "${PROGRAMS[@]}"; do
    cp "$prog" "$STAGE/programs/"
    STAGED_PROGRAMS+=("$STAGE/programs/$(basename "$prog")")
done
FRAGMENT="$STAGE/tern-guest.config"
INITRAMFS_SRC="$STAGE/initramfs"
PROGRAMS=("${STAGED_PROGRAMS[@]}")
set_keys "$FRAGMENT" "$INITRAMFS_SRC" "${PROGRAMS[@]}"
if [[ -f "$OUT/vmlinux" && -f "$OUT/bzImage" && -f "$OUT/initramfs.cpio" && -f "$OUT/config" ]]; then
    log "cache hit $OUT (inputs changed while starting)"
    finish
fi
log "cache miss: key $KEY (kernel $kernel_key, initramfs $initramfs_key)"

KTREE="$WORK/$KSRC_PKG-$KSRC_VERSION"   # extracted source, shared by every key
KBUILD="$WORK/build"                     # out-of-tree build dir, reused so rebuilds are incremental

# ---------------------------------------------------------------- 3. kernel
extract_source() {
    [[ -f "$KTREE/.tern-extracted" ]] && return
    log "extracting $KSRC_TAR (once per source version)"
    rm -rf "$KTREE" "$KTREE.tmp"
    mkdir -p "$KTREE.tmp"
    tar -xJf "$KSRC_TAR" -C "$KTREE.tmp" --strip-components=1
    touch "$KTREE.tmp/.tern-extracted"
    mv "$KTREE.tmp" "$KTREE"
    # A build dir configured against another source tree cannot be reused.
    rm -rf "$KBUILD"
    log "extracted ($(elapsed))"
}

# Compare the fragment with the final .config: every `=value` and every `is not set` must survive.
verify_config() {
    local cfg=$1 bad=0 line sym val
    while IFS= read -r line; do
        if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            sym=${BASH_REMATCH[1]} val=${BASH_REMATCH[2]}
            if ! grep -qxF "$sym=$val" "$cfg"; then
                log "config: $sym=$val did not survive olddefconfig (now: $(grep -E "^(# )?$sym[= ]" "$cfg" || echo absent))"
                bad=1
            fi
        elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set ]]; then
            sym=${BASH_REMATCH[1]}
            if grep -qE "^$sym=" "$cfg"; then
                log "config: $sym should be off but is $(grep -E "^$sym=" "$cfg")"
                bad=1
            fi
        fi
    done <"$FRAGMENT"
    return $bad
}

build_kernel() {
    extract_source
    mkdir -p "$KBUILD"
    local mk=(make -C "$KTREE" O="$KBUILD" ARCH=x86_64
              KBUILD_BUILD_USER=tern KBUILD_BUILD_HOST=tern KBUILD_BUILD_TIMESTAMP="tern $kernel_key")
    log "configuring: tinyconfig + $(basename "$FRAGMENT")"
    "${mk[@]}" -s tinyconfig >"$WORK/config.log" 2>&1 || { cat "$WORK/config.log" >&2; die "make tinyconfig failed"; }
    (cd "$KBUILD" && "$KTREE/scripts/kconfig/merge_config.sh" -m -O "$KBUILD" "$KBUILD/.config" "$FRAGMENT") \
        >>"$WORK/config.log" 2>&1 || { cat "$WORK/config.log" >&2; die "merge_config.sh failed"; }
    "${mk[@]}" -s olddefconfig >>"$WORK/config.log" 2>&1 || { cat "$WORK/config.log" >&2; die "make olddefconfig failed"; }
    verify_config "$KBUILD/.config" || die "the kernel configuration lost options from resources/kernel/tern-guest.config (dependencies?); see above"

    local jobs=${TERN_GUEST_JOBS:-$(nproc)} blog="$WORK/build.log"
    log "compiling the kernel with make -j$jobs (nice 10; ~10 min on 2 cores the first time; log: $blog)"
    nice -n 10 "${mk[@]}" -j"$jobs" bzImage >"$blog" 2>&1 &
    local pid=$! last=0 now
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        now=$(date +%s)
        if (( now - last >= 30 )); then
            last=$now
            log "  compiling: $(elapsed) elapsed, $(find "$KBUILD" -name '*.o' 2>/dev/null | wc -l) objects built"
        fi
    done
    if ! wait "$pid"; then
        tail -n 40 "$blog" >&2
        die "kernel build failed (full log: $blog)"
    fi
    log "kernel built ($(elapsed))"

    rm -rf "$KOUT.tmp"; mkdir -p "$KOUT.tmp"
    cp "$KBUILD/vmlinux" "$KOUT.tmp/vmlinux"
    cp "$KBUILD/arch/x86/boot/bzImage" "$KOUT.tmp/bzImage"
    cp "$KBUILD/.config" "$KOUT.tmp/config"
    rm -rf "$KOUT"; mv "$KOUT.tmp" "$KOUT"
}

if [[ -f "$KOUT/vmlinux" && -f "$KOUT/bzImage" && -f "$KOUT/config" ]]; then
    log "kernel cache hit $KOUT"
else
    build_kernel
fi

# ---------------------------------------------------------------- 4. initramfs
# gen_init_cpio (the kernel's own tool, one C file) writes device nodes and root-owned files from a
# text list, so no root privileges and no directory tree of the image are needed.
GEN="$WORK/gen_init_cpio-$KSRC_VERSION"
if [[ ! -x "$GEN" ]]; then
    extract_source
    gcc -O2 -o "$GEN.tmp" "$KTREE/usr/gen_init_cpio.c" && mv "$GEN.tmp" "$GEN"
fi

log "packing the initramfs (busybox $BUSYBOX_VERSION${PROGRAMS[*]:+, programs: $(for p in "${PROGRAMS[@]}"; do basename "$p"; done | paste -sd " " -)})"
list="$STAGE/cpio.list"
{
    for d in /bin /sbin /usr /usr/bin /usr/sbin /dev /proc /sys /tmp /run /root /etc; do
        echo "dir $d 0755 0 0"
    done
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "nod /dev/null 0666 0 0 c 1 3"
    echo "file /bin/busybox /bin/busybox 0755 0 0"
    # One symlink per applet (e.g. /bin/sh, /sbin/poweroff), all to /bin/busybox.
    /bin/busybox --list-full | LC_ALL=C sort | while read -r applet; do
        [[ "/$applet" == /bin/busybox ]] && continue
        echo "slink /$applet /bin/busybox 0777 0 0"
    done
    echo "file /init $INITRAMFS_SRC/init 0755 0 0"
    # Anything else under resources/initramfs/ (except init and README*) lands at the same path.
    (cd "$INITRAMFS_SRC" && find . -type f ! -name init ! -name 'README*' | LC_ALL=C sort) | while read -r f; do
        echo "file ${f#.} $INITRAMFS_SRC/${f#./} $(stat -c %a "$INITRAMFS_SRC/$f") 0 0"
    done
    for prog in "${PROGRAMS[@]}"; do
        echo "file /bin/$(basename "$prog") $prog 0755 0 0"
    done
} >"$list"

rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp"
# Uncompressed: the guest kernel unpacks it at CPL0, which this machine emulates; inflating the
# gzip'd archive (1 MB) cost ~55 s of a ~100 s boot, reading the plain one (2 MB) a few seconds.
"$GEN" -t 0 "$list" >"$OUT.tmp/initramfs.cpio"
# Hard links: the kernel files exist once on disk however many initramfs variants use them.
for f in vmlinux bzImage config; do ln -f "$KOUT/$f" "$OUT.tmp/$f" 2>/dev/null || cp "$KOUT/$f" "$OUT.tmp/$f"; done
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
log "done in $(elapsed): $OUT"
finish
