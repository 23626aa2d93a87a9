#!/usr/bin/env bash
# Set up everything the tests need and run them all: the package (scripts/setup.sh),
# QEMU and a guest kernel for the vfio-pci tests (tests/vm/setup.sh, Debian
# packages), the data-path tests under AddressSanitizer (scripts/sanitize.sh),
# DPDK's testpmd for the vhost-user tests, then pytest over tests/ and bench/.
# QEMU and DPDK tests may not skip here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

bash scripts/setup.sh
bash tests/vm/setup.sh
# tcpdump and tshark read pmd's pcap and pcapng files back in the tests (independent
# readers; tshark's question about capturing as non-root takes its default, no, under
# DEBIAN_FRONTEND=noninteractive);
# dpdk-testpmd (Debian's dpdk-dev) is the vhost-user backend of the interop tests.
missing=""
command -v tcpdump >/dev/null 2>&1 || missing="$missing tcpdump"
command -v tshark >/dev/null 2>&1 || missing="$missing tshark"
command -v dpdk-testpmd >/dev/null 2>&1 || missing="$missing dpdk-dev"
if [ -n "$missing" ]; then
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# The data-path tests and the ring fuzzers again under AddressSanitizer, from a
# separate build (a few minutes): any report fails the run.
PYTHON="$PYTHON" bash scripts/sanitize.sh
export PMD_REQUIRE_QEMU=1 PMD_REQUIRE_DPDK=1
exec "$PYTHON" -m pytest tests bench -q -rs -p no:cacheprovider "$@"
