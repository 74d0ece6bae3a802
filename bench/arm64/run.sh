#!/usr/bin/env bash
# orch on arm64 (a Raspberry Pi 5's CPU) under qemu-user emulation, start to finish:
#   1. an arm64 Debian rootfs (debootstrap) and a cross-compiled llama-cpp-python wheel,
#      both cached by version outside the repository;
#   2. orch installed in the rootfs from this checkout (a wheel of it, its declared
#      dependencies from PyPI, the cross-built llama-cpp-python);
#   3. under QEMU_CPU=cortex-a76: the exactness tests (real 135M, generated Q4_0/Q4_K/Q8_0),
#      a 2-worker `orch run` on loopback, the memory test and the engine memory benchmark
#      (repacking on), and a mixed x86 + arm64 pipeline against the unsplit x86 model;
#   4. a markdown report on stdout and in $ARM64_CACHE/report.md (logs: the rootfs's
#      /opt/orch-run).
#
# Needs root (debootstrap, chroot, mounts), Debian's apt (the host packages are installed
# when missing) and the checkout's .venv (scripts/setup.sh). Timings under emulation say
# nothing about a Pi's speed; exactness and memory do.
#
#   sudo bash bench/arm64/run.sh                                      # every phase
#   sudo ARM64_PHASES="exact-real mixed" bash bench/arm64/run.sh      # some, in this order
#
# Phases: exact-generated exact-real orch-run mixed mixed-run memory engine-memory.
#
# Settings (environment): ARM64_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/orch-bench/arm64),
# ARM64_SUITE (Debian release of the rootfs; default bookworm, whose python3 is 3.11),
# ARM64_MIRROR (default: the host's Debian mirror from apt's sources), ARM64_QEMU_CPU
# (default cortex-a76), ARM64_ARCH_FLAGS (default armv8.2-a+dotprod+fp16),
# ARM64_PHASES (default: all), ARM64_THREADS (llama.cpp threads per process, default 1: on
# a busy 2-core machine two threads wait for each other at every ggml barrier; the tests
# take their thread count from the cores they may use, so with 1 they run on one core).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
here="$repo/bench/arm64"
cache="${ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orch-bench/arm64}"
suite="${ARM64_SUITE:-bookworm}"
qemu_cpu="${ARM64_QEMU_CPU:-cortex-a76}"
arch_flags="${ARM64_ARCH_FLAGS:-armv8.2-a+dotprod+fp16}"
threads="${ARM64_THREADS:-1}"
phases="${ARM64_PHASES:-exact-generated exact-real orch-run mixed mixed-run memory engine-memory}"
host_python="$repo/.venv/bin/python"
# Bump when the rootfs recipe changes: a cached rootfs of another recipe is not reused.
rootfs_recipe=1
rootfs_packages="python3,python3-venv,python3-pip,ca-certificates,libgomp1,libstdc++6"

log() { printf '[arm64 %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and mounts)"
[ -x "$host_python" ] || die "no .venv: run 'bash scripts/setup.sh' first"

# --- host tools ------------------------------------------------------------------------
need_pkgs=()
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need_pkgs+=(qemu-user-static binfmt-support)
command -v aarch64-linux-gnu-g++ >/dev/null || need_pkgs+=(g++-aarch64-linux-gnu)
command -v cmake >/dev/null || need_pkgs+=(cmake)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing host packages: ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 \
    || die "aarch64 binaries cannot run here (binfmt_misc: qemu-aarch64 not registered)"

llama_version="$("$host_python" - "$repo/pyproject.toml" <<'PY'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(next(d.split("==")[1] for d in deps if d.startswith("llama-cpp-python==")))
PY
)"
host_llama="$("$host_python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
[ "$host_llama" = "$llama_version" ] \
    || die "the host .venv has llama-cpp-python $host_llama, pyproject pins $llama_version"

mkdir -p "$cache"
rootfs="$cache/rootfs-$suite-arm64-r$rootfs_recipe"
wheeldir="$cache/wheel-llama-cpp-python-$llama_version-${arch_flags//+/_}"

declare -A took=()  # phase -> seconds
declare -A result=()  # phase -> one line
timed() {  # timed NAME CMD...: run, record its wall time; never stops the script
    local name="$1" t0 rc=0; shift
    t0=$(date +%s)
    "$@" || rc=$?
    took[$name]=$(( $(date +%s) - t0 ))
    return $rc
}

# --- 1a. the rootfs ----------------------------------------------------------------------
debian_mirror() {
    [ -n "${ARM64_MIRROR:-}" ] && { echo "$ARM64_MIRROR"; return; }
    local uri
    uri="$(grep -hE '^\s*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
    [ -n "$uri" ] || uri="$(grep -hE '^\s*deb\s' /etc/apt/sources.list 2>/dev/null \
        | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
    echo "${uri:-http://deb.debian.org/debian}"
}

build_rootfs() {
    local mirror tmp
    mirror="$(debian_mirror)"
    tmp="$rootfs.partial"
    rm -rf "$tmp"
    log "debootstrap $suite arm64 from $mirror (about 3 min; log: $cache/debootstrap.log)"
    debootstrap --arch=arm64 --variant=minbase --include="$rootfs_packages" \
        "$suite" "$tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 \
        || { tail -n 20 "$cache/debootstrap.log" >&2; die "debootstrap failed"; }
    finish_rootfs "$tmp"
    mv "$tmp" "$rootfs"
}
finish_rootfs() {
    # pip reaches PyPI with the host's CA bundle (it holds the host's extra certificates);
    # copied, not rebuilt by update-ca-certificates under emulation (minutes)
    cp -L /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/ca-certificates.crt"
    chroot "$1" /usr/bin/python3 -m venv /opt/orch-venv
}

# --- 1b. llama-cpp-python cross-compiled for aarch64 --------------------------------------
build_wheel() {
    local build="$cache/wheel-build" env="$cache/build-venv"
    rm -rf "$build" && mkdir -p "$build"
    [ -x "$env/bin/pip" ] || python3 -m venv "$env"
    "$env/bin/pip" install --quiet wheel
    cat >"$build/aarch64.cmake" <<CMAKE
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
CMAKE
    "$env/bin/pip" download --quiet --no-deps --no-binary :all: -d "$build" \
        "llama-cpp-python==$llama_version"
    log "cross-compiling llama-cpp-python $llama_version for aarch64 ($arch_flags; about" \
        "9 min on 2 cores; log: $cache/wheel-build.log)"
    CMAKE_ARGS="-DCMAKE_TOOLCHAIN_FILE=$build/aarch64.cmake -DGGML_NATIVE=OFF \
-DGGML_CPU_ARM_ARCH=$arch_flags -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
        "$env/bin/pip" wheel --no-deps -w "$build/out" "$build"/llama_cpp_python-*.tar.gz \
        >"$cache/wheel-build.log" 2>&1 \
        || { tail -n 30 "$cache/wheel-build.log" >&2; die "cross build failed"; }
    # scikit-build-core tags it for the machine that built it: it holds aarch64 code
    "$env/bin/python" -m wheel tags --remove --platform-tag linux_aarch64 "$build"/out/*.whl \
        >/dev/null
    mkdir -p "$wheeldir.partial"
    mv "$build"/out/*linux_aarch64.whl "$wheeldir.partial/"
    rm -rf "$wheeldir" && mv "$wheeldir.partial" "$wheeldir"
    rm -rf "$build"
}

t_setup=$(date +%s)
pids=()
if [ -d "$rootfs" ]; then log "rootfs: cached ($rootfs)"; else build_rootfs & pids+=($!); fi
if compgen -G "$wheeldir/*.whl" >/dev/null; then log "wheel: cached ($wheeldir)"
else build_wheel & pids+=($!); fi
for pid in "${pids[@]}"; do wait "$pid" || die "building the rootfs or the wheel failed"; done
took[build]=$(( $(date +%s) - t_setup ))

# --- 2. orch in the rootfs ---------------------------------------------------------------
mounted=()
unmount_all() {
    local i
    for (( i=${#mounted[@]}-1; i>=0; i-- )); do  # lazily if a process still holds it
        umount -R "${mounted[$i]}" 2>/dev/null || umount -R -l "${mounted[$i]}" || true
    done
}
trap unmount_all EXIT
for dir in proc sys dev; do
    if ! mountpoint -q "$rootfs/$dir"; then
        if [ "$dir" = proc ]; then mount -t proc proc "$rootfs/proc"
        else mount --rbind "/$dir" "$rootfs/$dir" && mount --make-rslave "$rootfs/$dir"; fi
        mounted+=("$rootfs/$dir")
    fi
done
cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf"

# A clean environment in the rootfs: no host pip configuration, the emulated CPU set.
chroot_env=(/usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb
    PATH=/opt/orch-venv/bin:/usr/local/bin:/usr/bin:/bin QEMU_CPU="$qemu_cpu"
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PYTHONDONTWRITEBYTECODE=1
    ORCH_DISCOVERY=off ORCH_WORKER_DISCOVERY=off HF_HUB_OFFLINE=1)
in_chroot() { chroot "$rootfs" "${chroot_env[@]}" "$@"; }
# In the background: `exec_in_chroot CMD &` makes $! the command's own pid (killable).
exec_in_chroot() { exec chroot "$rootfs" "${chroot_env[@]}" "$@"; }

install_orch() {
    local dist="$rootfs/opt/orch-dist" test_deps
    rm -rf "$dist" && mkdir -p "$dist"
    # a wheel of the checkout as it is (tracked and new files), built from a copy so that
    # setuptools leaves no build/ folder in it
    local src="$cache/orch-src"
    rm -rf "$src" && mkdir -p "$src"
    git -C "$repo" ls-files -z --cached --others --exclude-standard \
        | (cd "$repo" && tar --null -cf - -T -) | tar -xf - -C "$src"
    "$host_python" -m pip wheel --quiet --no-deps -w "$dist" "$src" >/dev/null
    rm -rf "$src"
    cp "$wheeldir"/*.whl "$dist/"
    # the test runner's own requirements, as pyproject states them
    test_deps="$("$host_python" - "$repo/pyproject.toml" <<'PY'
import sys, tomllib
dev = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["dev"]
print(" ".join(d for d in dev if d.split(">")[0].split("=")[0] in ("pytest", "pytest-timeout")))
PY
)"
    # orch's declared dependencies come with its wheel's metadata (whatever main adds)
    in_chroot bash -c "cd /opt/orch-dist && pip install --quiet --prefer-binary llama_cpp_python-*.whl \
orch_cluster-*.whl $test_deps && pip install --quiet --force-reinstall --no-deps \
orch_cluster-*.whl llama_cpp_python-*.whl"
    # the tests and benchmarks run from a copy, against the installed package
    rm -rf "$rootfs/opt/orch-src" && mkdir -p "$rootfs/opt/orch-src"
    cp -r "$repo/tests" "$repo/bench" "$repo/pyproject.toml" "$rootfs/opt/orch-src/"
}
log "installing orch from this checkout into the rootfs"
timed install install_orch || die "installing orch in the rootfs failed"

work="$rootfs/opt/orch-run"  # this run's logs and report; /opt/orch-run in the rootfs
rm -rf "$work" && mkdir -p "$work"
in_chroot python -m orchestrator.cli --help >/dev/null || die "orch does not start in the rootfs"
in_chroot python /opt/orch-src/bench/arm64/sysinfo.py >"$work/sysinfo.json"
log "rootfs: $(cat "$work/sysinfo.json")"

# --- 3. the checks -------------------------------------------------------------------------
# Each phase is a function that prints its log and returns its status; run_phase times it
# and keeps a one-line result.
pin=""  # the tests' llama.cpp threads follow the cores they may use
if [ "$threads" = 1 ]; then
    pin="taskset -c $(taskset -pc $$ | awk '{print $NF}' | cut -d, -f1 | cut -d- -f1)"
fi
prompt="The capital of France is"

run_phase() {  # run_phase NAME: phase_NAME's log in $work/NAME.log
    local name="$1" summary
    log "$name: running (log: $work/$name.log)"
    if timed "$name" "phase_${name//-/_}" >"$work/$name.log" 2>&1; then
        summary="$(grep -E '^[0-9]+ passed' "$work/$name.log" | tail -n1 || true)"
        result[$name]="pass${summary:+: $summary}"
    else
        summary="$(grep -E '[0-9]+ (passed|failed)|rror' "$work/$name.log" | tail -n1 || true)"
        result[$name]="FAIL: ${summary:-$(tail -n1 "$work/$name.log")}"
    fi
    log "$name: ${result[$name]} (${took[$name]} s)"
}

pytest_in_chroot() {
    in_chroot $pin bash -c "cd /opt/orch-src && python -m pytest -p no:cacheprovider -q -s \
-o addopts='' $*"
}

phase_exact_generated() {  # split == unsplit, generated models, the repacked quant types
    pytest_in_chroot tests/test_exact_generated.py -k "'Q4_0 or Q4_K or Q8_0'"
}
phase_exact_real() { pytest_in_chroot tests/test_exact_real.py; }  # the real 135M
phase_memory() { pytest_in_chroot tests/test_memory.py; }  # each worker's peak vs its budget

phase_orch_run() {  # the product end to end: 2 local workers in the rootfs, loopback
    in_chroot orch run smollm2-135m "$prompt" --local 2 --no-chat --max-tokens 16 \
        --threads 1 --stats
}

phase_engine_memory() {  # one engine per process: repacked (default) vs mapped weights
    in_chroot $pin python /opt/orch-src/bench/engine_memory.py --models 135m \
        --variants engine,no-repack --threads "$threads" --prompt-tokens 32 \
        --decode-tokens 8 --workdir /opt/orch-run/models
}

phase_mixed() {  # the KL measurement: x86 stage 0 -> arm64 stage 1 and the reverse
    local dir=/opt/orch-run/mixed
    "$host_python" "$here/mixed.py" x86-first "$rootfs$dir" --threads "$threads" \
        && in_chroot $pin python /opt/orch-src/bench/arm64/mixed.py arm64 "$dir" \
            --threads "$threads" \
        && "$host_python" "$here/mixed.py" x86-second "$rootfs$dir" --threads "$threads"
}

await_ready() {  # await_ready FILE: the worker's address once it listens
    local i
    for i in $(seq 600); do [ -s "$1" ] && { cat "$1"; return; }; sleep 0.5; done
    return 1
}
phase_mixed_run() {  # one real pipeline: an x86 worker here, an arm64 worker in the rootfs
    local dir="$work/mixed-run" token x86 arm rc=0 pid_x86 pid_arm
    local args=(--no-chat --max-tokens 16 --threads 1)
    rm -rf "$dir" && mkdir -p "$dir"
    token="$("$host_python" -c 'import secrets; print(secrets.token_urlsafe(24))')"
    ORCH_WORKER_TOKEN="$token" ORCH_WORKER_DISCOVERY=off "$host_python" -m orchestrator.cli \
        worker --host 127.0.0.1 --port 0 --threads 1 --cache-dir "$dir/x86" \
        --ready-file "$dir/x86.ready" >"$dir/x86.log" 2>&1 &
    pid_x86=$!
    exec_in_chroot ORCH_WORKER_TOKEN="$token" orch worker --host 127.0.0.1 --port 0 --threads 1 \
        --cache-dir /opt/orch-run/mixed-run/arm64 \
        --ready-file /opt/orch-run/mixed-run/arm64.ready >"$dir/arm64.log" 2>&1 &
    pid_arm=$!
    if x86="$(await_ready "$dir/x86.ready")" && arm="$(await_ready "$dir/arm64.ready")"; then
        # no probe: equal speeds; throughput objective: both workers get layers
        ORCH_TOKEN="$token" ORCH_DISCOVERY=off ORCH_PROBE=false "$host_python" -m \
            orchestrator.cli run smollm2-135m "$prompt" --workers "$x86,$arm" \
            --objective throughput "${args[@]}" --stats || rc=$?
        echo "--- the same run on 2 local x86 workers (= the unsplit x86 model) ---"
        ORCH_DISCOVERY=off "$host_python" -m orchestrator.cli run smollm2-135m "$prompt" \
            --local 2 "${args[@]}" || rc=$?
    else
        echo "a worker did not start:"; tail -n 5 "$dir/x86.log" "$dir/arm64.log"; rc=1
    fi
    kill "$pid_x86" "$pid_arm" 2>/dev/null || true
    wait "$pid_x86" "$pid_arm" 2>/dev/null || true
    return $rc
}

for name in $phases; do
    declare -F "phase_${name//-/_}" >/dev/null || die "unknown phase $name"
done
for name in $phases; do run_phase "$name"; done

want() { [[ " $phases " == *" $1 "* ]]; }

# --- 4. the report -------------------------------------------------------------------------
report="$work/report.md"
{
    echo "# orch on arm64 under emulation"
    echo
    echo "- date: $(date -Iseconds)"
    echo "- host: $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)," \
        "$(nproc) cores, kernel $(uname -r)"
    echo "- rootfs: Debian $suite arm64, QEMU_CPU=$qemu_cpu," \
        "$(qemu-aarch64-static --version | head -n1)"
    echo "- llama-cpp-python $llama_version cross-compiled with -DGGML_CPU_ARM_ARCH=$arch_flags"
    echo "- in the rootfs: $(cat "$work/sysinfo.json")"
    echo "- command: bash bench/arm64/run.sh (ARM64_PHASES=\"$phases\")"
    echo
    echo "| phase | result | wall time |"
    echo "| --- | --- | --- |"
    echo "| build rootfs + wheel (cached) | done | ${took[build]} s |"
    echo "| install orch in the rootfs | done | ${took[install]} s |"
    for name in $phases; do
        echo "| $name | ${result[$name]:-not run} | ${took[$name]:-} s |"
    done
    for name in mixed engine-memory; do
        if want "$name" && [ -f "$work/$name.log" ]; then
            echo; echo "## $name"; echo; echo '```'; cat "$work/$name.log"; echo '```'
        fi
    done
    for name in orch-run mixed-run; do
        if want "$name" && [ -f "$work/$name.log" ]; then
            echo; echo "## $name (answer and statistics)"; echo; echo '```'
            grep -vE '^\s*$' "$work/$name.log" | tail -n 40; echo '```'
        fi
    done
    if want memory; then
        echo; echo "## memory (tests/test_memory.py)"; echo; echo '```'
        grep -E '^stage [0-9]' "$work/memory.log" || true; echo '```'
    fi
} >"$report"
cp "$report" "$cache/report.md"
cat "$report"
log "report: $report (logs beside it; a copy in $cache/report.md)"
failed=0
for name in $phases; do [[ "${result[$name]:-}" == pass* ]] || failed=1; done
exit $failed
