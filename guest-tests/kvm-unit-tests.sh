#!/usr/bin/env bash
# Runs kvm-unit-tests' x86 suite under tern and prints a table: test, PASS/FAIL/SKIP/timeout, time,
# and the first failing line (or why it was skipped).
#
#   guest-tests/kvm-unit-tests.sh [--markdown] [--list] [TEST...]
#
# The suite comes from the vendored tarball (sha256 checked), is built once under
# target/kvm-unit-tests/ and reused. Each test of x86/unittests.cfg runs with its smp, test_args,
# qemu_params (translated: -m, -smp, -append, -cpu when tern's CPU already matches) and timeout
# (scaled by KUT_TIMEOUT_SCALE, default 2). Tests restricted to another arch or accel, in the
# nodefault group (run_tests.sh skips those too), failing their `check`, or needing what tern does
# not have (a device, a CPU model, hiding a CPU feature) are SKIPped with the reason.
#
# Environment: TERN (default target/release/tern, built if missing), KUT_TIMEOUT_SCALE,
# KUT_LOG_DIR (default target/kvm-unit-tests/logs).
# Exit status: 0 when no test failed or timed out, 1 otherwise, 2 on a setup error.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# The workplace's vendored sources sit beside the repository (../shared/vendor); a clone made
# elsewhere finds them at the workplace's own path.
KUT_NAME=kvm-unit-tests-1da1819e.tar.gz
VENDOR_TAR=${KUT_TARBALL:-$ROOT/../shared/vendor/$KUT_NAME}
if [ -z "${KUT_TARBALL:-}" ] && [ ! -f "$VENDOR_TAR" ] && [ -f "/work/shared/vendor/$KUT_NAME" ]; then
	VENDOR_TAR=/work/shared/vendor/$KUT_NAME
fi
VENDOR_SHA=ae1c2a734c8d6efed4c2afaacf08008d4bf9e95e00105befc4dc7775ecd819b7
BUILD=$ROOT/target/kvm-unit-tests
SRC=$BUILD/src-1da1819e
TERN=${TERN:-$ROOT/target/release/tern}
SCALE=${KUT_TIMEOUT_SCALE:-2}
LOGS=${KUT_LOG_DIR:-$BUILD/logs}
# QEMU's default RAM, which the suite is written for.
DEFAULT_MEM=128

markdown=no
list=no
only=()
for a in "$@"; do
	case $a in
	--markdown) markdown=yes ;;
	--list) list=yes ;;
	-h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	-*) echo "unknown option $a" >&2; exit 2 ;;
	*) only+=("$a") ;;
	esac
done

die() { echo "kvm-unit-tests.sh: $*" >&2; exit 2; }

# Build once: a stamp records that this exact tarball was extracted and built.
build_suite() {
	local stamp=$SRC/.tern-built-$VENDOR_SHA
	[ -f "$stamp" ] && return 0
	[ -f "$VENDOR_TAR" ] || die "vendored source not found: $VENDOR_TAR"
	local sum
	sum=$(sha256sum "$VENDOR_TAR" | cut -d' ' -f1)
	[ "$sum" = "$VENDOR_SHA" ] || die "sha256 mismatch for $VENDOR_TAR: $sum"
	if ! command -v gcc >/dev/null || ! command -v make >/dev/null || ! command -v objcopy >/dev/null; then
		echo "installing build-essential (apt-get) to build kvm-unit-tests ..." >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends build-essential \
			>"$BUILD/apt.log" 2>&1 || die "gcc, make and binutils are needed: apt-get install build-essential failed (see $BUILD/apt.log)"
	fi
	rm -rf "$SRC" && mkdir -p "$SRC"
	tar xzf "$VENDOR_TAR" -C "$SRC" --strip-components=1 || die "cannot extract $VENDOR_TAR"
	echo "building kvm-unit-tests in $SRC ..." >&2
	(cd "$SRC" && ./configure --arch=x86_64 && make -j"$(nproc)") >"$BUILD/build.log" 2>&1 ||
		die "build failed, see $BUILD/build.log"
	touch "$stamp"
}

# Host CPU flags (what tern's CPUID passes through, less what it hides).
HOST_FLAGS=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
HOST_VENDOR=$(grep -m1 '^vendor_id' /proc/cpuinfo | awk '{print $3}')
# QEMU feature names that differ from /proc/cpuinfo's.
cpu_flag_name() {
	case $1 in
	tsc-deadline) echo tsc_deadline_timer ;;
	*) echo "${1//-/_}" ;;
	esac
}
# CPUID bits tern always hides (vmm/src/cpu/cpuid.rs).
TERN_HIDDEN=" cx16 xsave "

# Translates one -cpu argument. Prints nothing when tern's CPU can run the test, else the reason.
cpu_reason() {
	local spec=$1 model opts o f
	model=${spec%%,*}
	opts=${spec#"$model"}
	opts=${opts#,}
	case $model in
	max | host | qemu64) ;;
	*) echo "-cpu $model: tern has no CPU models"; return ;;
	esac
	IFS=, read -ra o <<<"$opts"
	for f in "${o[@]}"; do
		case $f in
		"" | host-phys-bits | migratable=no) ;;
		vendor=*) [ "${f#vendor=}" = "$HOST_VENDOR" ] || { echo "-cpu $f: the host is $HOST_VENDOR"; return; } ;;
		-*) echo "-cpu $f: tern cannot hide CPUID features per run"; return ;;
		+*)
			local name
			name=$(cpu_flag_name "${f#+}")
			if [[ $HOST_FLAGS != *" $name "* ]] || [[ $TERN_HIDDEN == *" $name "* ]]; then
				echo "-cpu $f: this host's KVM does not offer ${f#+}"
				return
			fi
			;;
		*) echo "-cpu option $f not supported by tern"; return ;;
		esac
	done
}

# Sets TERN_ARGS / MEM / SKIP_REASON from a test's qemu_params.
translate_params() {
	local -a p
	eval "p=($1)"
	local i=0
	while [ $i -lt ${#p[@]} ]; do
		local a=${p[$i]} v=${p[$((i + 1))]:-}
		case $a in
		-m)
			case $v in
			*[gG]) MEM=$((${v%[gG]} * 1024)) ;;
			*[mM]) MEM=${v%[mM]} ;;
			*) MEM=$v ;;
			esac
			i=$((i + 2))
			;;
		-smp) SMP=${v%%,*}; i=$((i + 2)) ;;
		-append) APPEND="$APPEND $v"; i=$((i + 2)) ;;
		-cpu)
			SKIP_REASON=$(cpu_reason "$v")
			[ -n "$SKIP_REASON" ] && return
			i=$((i + 2))
			;;
		-enable-kvm) i=$((i + 1)) ;;
		# tern's in-kernel PIT stays unprogrammed unless the guest uses it.
		-machine | -M)
			if [ "$v" = pit=off ]; then i=$((i + 2)); continue; fi
			SKIP_REASON="$a $v: tern has no such machine option"
			return
			;;
		-device) SKIP_REASON="-device ${v%%,*}: tern has no such device"; return ;;
		*) SKIP_REASON="$a $v: not supported by tern"; return ;;
		esac
	done
}

# Skips a test whose `check` (path=value ...) does not hold on this host.
check_reason() {
	local c path want have
	for c in $1; do
		path=${c%%=*}
		want=${c#*=}
		have=$(cat "$path" 2>/dev/null) || have="(missing)"
		if [ "$have" != "$want" ]; then
			echo "check $path=$want (is $have)"
			return
		fi
	done
}

# Parses unittests.cfg into lines: name|file|smp|test_args|qemu_params|arch|accel|timeout|groups|check
parse_cfg() {
	awk '
	function flush() { if (name != "") print name "|" f["file"] "|" f["smp"] "|" f["test_args"] "|" \
		f["qemu_params"] f["extra_params"] "|" f["arch"] "|" f["accel"] "|" f["timeout"] "|" f["groups"] "|" f["check"] }
	/^[[:space:]]*#/ { next }
	/^\[.*\]/ { flush(); name = substr($0, 2, index($0, "]") - 2); delete f; next }
	/=/ { k = $0; sub(/[[:space:]]*=.*/, "", k); v = $0; sub(/^[^=]*=[[:space:]]*/, "", v); f[k] = v }
	END { flush() }
	' "$SRC/x86/unittests.cfg"
	# asyncpf once more with tern owning the async-PF protocol (issue 12).
	echo "asyncpf-tern|asyncpf.flat|||-cpu host -m 2048|||||"
}

elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" -v d="$2" 'BEGIN { printf "%.*f", d, b - a }'; }

strip_quotes() { local s=$1; s=${s#[\"\']}; s=${s%[\"\']}; echo "$s"; }

# The guest's last line (tern's own `tern: ...` lines left out).
last_guest_line() { grep -v '^tern: ' "$1" | tail -n1; }

first_failure() {
	local log=$1
	grep -m1 -E '^(FAIL|ABORT)|tern: error|Unhandled exception|instruction cannot be emulated|triple fault|KVM entry failed|assert failed|Assertion' "$log" ||
		tail -n1 "$log"
}

mkdir -p "$BUILD"
# One build at a time (the CI test and a manual run may start together).
exec 9>"$BUILD/.lock"
flock 9
build_suite
flock -u 9
if [ "$list" = yes ]; then parse_cfg | cut -d'|' -f1; exit 0; fi
if [ ! -x "$TERN" ]; then
	(cd "$ROOT" && cargo build --release -q) || die "cannot build tern"
fi
mkdir -p "$LOGS"
# The environment module (kvm-unit-tests reads KEY=VALUE lines from it). tern has the
# pc-testdev, so TEST_DEVICE stays at its default; NR_CPUS comes from fw_cfg.
env_file=$BUILD/environ
printf 'TARGET=tern\n' >"$env_file"

declare -A count=([PASS]=0 [FAIL]=0 [SKIP]=0 [timeout]=0)
total_start=$EPOCHREALTIME
if [ "$markdown" = yes ]; then
	echo "| test | result | time (s) | first failing line / reason |"
	echo "|---|---|---|---|"
else
	printf '%-42s %-8s %8s  %s\n' TEST RESULT TIME DETAIL
fi
row() {
	count[$2]=$((count[$2] + 1))
	# Guest lines end in CR LF.
	local plain=${4//$'\r'/}
	local detail=${plain//|/\\|}
	if [ "$markdown" = yes ]; then
		echo "| $1 | $2 | $3 | ${detail:0:160} |"
	else
		printf '%-42s %-8s %8s  %s\n' "$1" "$2" "$3" "${plain:0:160}"
	fi
}

# asyncpf needs the host to evict guest RAM while the guest touches it: a memory cgroup smaller
# than the guest around tern. Without swap the kernel can only OOM-kill tern instead.
CGROUP_LIMIT=512M
asyncpf_reason() {
	local swap
	swap=$(awk '/^SwapTotal:/ {print $2}' /proc/meminfo)
	if [ "${swap:-0}" -eq 0 ]; then
		echo "needs host eviction of guest RAM (memory cgroup of $CGROUP_LIMIT): this host has no swap, so the cgroup would OOM-kill tern"
	elif [ ! -w /sys/fs/cgroup/memory ] && ! grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
		echo "needs a memory cgroup (cgroup v1 memory or v2 memory controller, writable)"
	fi
}
# Runs "$@" in a fresh memory cgroup limited to $CGROUP_LIMIT (v2, else v1); removes it after.
in_memory_cgroup() {
	local cg limit_file procs rc
	if grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
		cg=/sys/fs/cgroup/tern-kut-$$ limit_file=memory.max procs=cgroup.procs
	else
		cg=/sys/fs/cgroup/memory/tern-kut-$$ limit_file=memory.limit_in_bytes procs=tasks
	fi
	mkdir -p "$cg" && echo "$CGROUP_LIMIT" >"$cg/$limit_file" || return 2
	bash -c 'echo $$ >"$1/$2" && shift 2 && exec "$@"' _ "$cg" "$procs" "$@"
	rc=$?
	rmdir "$cg" 2>/dev/null
	return $rc
}

failed=0
while IFS='|' read -r name file smp targs qparams arch accel tmo groups check; do
	if [ ${#only[@]} -gt 0 ] && [[ " ${only[*]} " != *" $name "* ]]; then continue; fi
	SKIP_REASON=""
	MEM=$DEFAULT_MEM
	SMP=${smp:-1}
	APPEND=""
	if [ -n "$arch" ] && [ "$arch" != x86_64 ]; then
		SKIP_REASON="arch = $arch (this is the x86_64 build)"
	elif [ -n "$accel" ] && [ "$accel" != kvm ]; then
		SKIP_REASON="accel = $accel"
	elif [[ " $groups " == *" nodefault "* ]]; then
		SKIP_REASON="group nodefault (run_tests.sh skips it too)"
	elif [ -n "$check" ]; then
		SKIP_REASON=$(check_reason "$check")
	fi
	[ -z "$SKIP_REASON" ] && translate_params "$qparams"
	WRAP=()
	APF_MODE=kvm
	if [ "$file" = asyncpf.flat ] && [ -z "$SKIP_REASON" ]; then
		SKIP_REASON=$(asyncpf_reason)
		WRAP=(in_memory_cgroup)
		[ "$name" = asyncpf-tern ] && APF_MODE=tern
	fi
	[ -z "$SKIP_REASON" ] && [ ! -f "$SRC/x86/$file" ] && SKIP_REASON="x86/$file was not built"
	if [ -n "$SKIP_REASON" ]; then
		row "$name" SKIP - "$SKIP_REASON"
		continue
	fi
	# test_args may hold backticks (kvmclock_test: `date +%s`): run_tests.sh evaluates them too.
	args=$(eval echo "$(strip_quotes "$targs")")
	args="${args}${APPEND}"
	tmo=${tmo:-90}
	tmo=${tmo%s}
	limit=$((tmo * SCALE))
	log=$LOGS/$name.log
	start=$EPOCHREALTIME
	"${WRAP[@]}" timeout --kill-after=5 "$limit" "$TERN" --testdev on --kernel "$SRC/x86/$file" \
		--initramfs "$env_file" --cmdline "$args" --cpus "boot=$SMP" --memory "size=${MEM}M" \
		--async-pf "$APF_MODE" --serial tty >"$log" 2>&1 </dev/null
	rc=$?
	secs=$(elapsed "$start" 1)
	case $rc in
	1) row "$name" PASS "$secs" "$(grep -m1 '^SUMMARY' "$log")" ;;
	77) row "$name" SKIP "$secs" "$(grep -m1 -E '^SKIP' "$log" || grep -m1 '^SUMMARY' "$log")" ;;
	124 | 137) row "$name" timeout "$secs" "limit ${limit}s; last guest line: $(last_guest_line "$log")"; failed=1 ;;
	*) row "$name" FAIL "$secs" "exit $rc: $(first_failure "$log")"; failed=1 ;;
	esac
done < <(parse_cfg)

total=$(elapsed "$total_start" 0)
summary="PASS ${count[PASS]}, FAIL ${count[FAIL]}, SKIP ${count[SKIP]}, timeout ${count[timeout]}; ${total} s in all"
if [ "$markdown" = yes ]; then echo; echo "$summary"; else echo "$summary"; fi
exit $failed
