#!/usr/bin/env bash
# The data path under AddressSanitizer: build the extensions with PMD_DEBUG=1
# (bounds checks, -O0 -g) and PMD_SANITIZE=address in a copy of the checkout
# (never in place: the normal build stays as it is), then run the data-path
# tests and the ring fuzzers against that copy with gcc's libasan preloaded
# (python itself is not instrumented). Any ASan report fails the run: the
# process aborts (abort_on_error), and reports from child processes (the
# isolated tests, the built-in device) are caught in log files too.
#
#   scripts/sanitize.sh                  # the default set of tests, a few minutes
#   scripts/sanitize.sh tests/test_burst.py -k runt     # or pytest arguments of your own
#
# Works on a fresh Debian 12 machine after scripts/setup.sh: libasan comes
# with gcc (libasan8 for gcc 12) and is installed here if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CC=${CC:-gcc}

if ! command -v "$CC" >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev
fi
asan=$("$CC" -print-file-name=libasan.so)
if [ ! -e "$asan" ]; then
    # gcc knows the name but the runtime is a separate package (libasanN, N per gcc version)
    ver=$("$CC" -dumpversion | cut -d. -f1)
    pkg=$(apt-cache search --names-only '^libasan[0-9]+$' | awk '{print $1}' | sort -V | tail -1)
    echo "sanitize.sh: $asan not found; installing ${pkg:-libasan} (gcc $ver)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkg:-libasan8}" "libgcc-$ver-dev" >/dev/null
    asan=$("$CC" -print-file-name=libasan.so)
fi
[ -e "$asan" ] || { echo "sanitize.sh: no libasan.so for $CC; install libasan (apt-get install libasan8)" >&2; exit 2; }
"$PYTHON" -c "import Cython, numpy, pytest" 2>/dev/null || {
    echo "sanitize.sh: needs Cython, numpy and pytest: run scripts/setup.sh first" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/pmd-asan.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp -r pmd csrc tests setup.py pyproject.toml "$work/"
find "$work" \( -name '*.so' -o -name '*.c' -o -name __pycache__ \) -prune -exec rm -rf {} +
echo "sanitize.sh: building with PMD_DEBUG=1 PMD_SANITIZE=address in $work" >&2
(cd "$work" && PMD_DEBUG=1 PMD_SANITIZE=address CC="$CC" "$PYTHON" setup.py -q build_ext --inplace --force \
    >"$work/build.log" 2>&1) || { tail -40 "$work/build.log" >&2; exit 1; }

mkdir -p "$work/asan-reports"
if [ $# -eq 0 ]; then
    set -- tests/test_memory.py tests/test_pool.py tests/test_virtqueue.py tests/test_device.py \
        tests/test_burst.py tests/test_loopback.py tests/test_properties.py tests/test_layout.py \
        tests/test_teardown.py tests/test_fuzz_rings.py
fi
status=0
(
    cd "$work"
    # detect_leaks=0: CPython and numpy keep memory to the end on purpose;
    # a leak of ours shows in the tests' own accounting (pools, fds, pins).
    export LD_PRELOAD="$asan${LD_PRELOAD:+:$LD_PRELOAD}"
    export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:log_path=$work/asan-reports/asan"
    export PYTHONPATH="$work" PYTHONMALLOC=malloc PYTHONFAULTHANDLER=1
    export PMD_FUZZ_SECONDS="${PMD_FUZZ_SECONDS:-8}"
    # ASan's mlock is a no-op (it reserves shadow memory it cannot lock), so
    # the one test that reads VmLck back cannot pass under it.
    "$PYTHON" -m pytest -q -p no:cacheprovider -m "not qemu and not vfio and not slow" \
        --deselect tests/test_memory.py::test_memory_is_locked_when_asked "$@"
) || status=$?
if compgen -G "$work/asan-reports/asan*" >/dev/null; then
    echo "sanitize.sh: AddressSanitizer reports:" >&2
    cat "$work"/asan-reports/asan* >&2
    exit 1
fi
[ "$status" -eq 0 ] && echo "sanitize.sh: no AddressSanitizer reports" >&2
exit "$status"
