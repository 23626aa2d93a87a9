#!/bin/sh
# Install the Debian packages the QEMU guest harness (tests/vm/harness.py)
# needs, when missing.  Idempotent and fast when already done (one dpkg-query,
# no apt-get).  Needs root (or password-less sudo) and Debian's package mirror.
#
#   sh tests/vm/setup.sh                  # prints what it does on stderr
#   PMD_VM_SETUP_QUIET=1 sh tests/vm/setup.sh
set -eu

# pciutils: lspci, whose -vv output tests/test_cli.py compares with what pmd parses, in the guest
# linux-source-6.1, linux-headers-amd64, make, xz-utils: the guest's vfio.ko rebuilt with
# CONFIG_VFIO_NOIOMMU for the no-IOMMU tests (tests/vm/harness.py build_noiommu_vfio;
# Debian's kernel compiles that mode out); the headers match linux-image-amd64's kernel
# iproute2: ip and tc, for the RSS device's looped-back multi-queue tap (harness.py _rss_netns)
PACKAGES="qemu-system-x86 qemu-utils linux-image-amd64 busybox-static kmod cpio pciutils iproute2
linux-source-6.1 linux-headers-amd64 make xz-utils"

say() { [ -n "${PMD_VM_SETUP_QUIET:-}" ] || echo "tests/vm/setup.sh: $*" >&2; }

have_kernel() {   # a /boot/vmlinuz-V with /lib/modules/V (not the running kernel)
    for k in /boot/vmlinuz-*; do
        [ -e "$k" ] || continue
        [ -d "/lib/modules/${k#/boot/vmlinuz-}/kernel" ] && return 0
    done
    return 1
}

missing=""
if command -v dpkg-query >/dev/null 2>&1; then
    for p in $PACKAGES; do
        case "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" in
            *" installed") ;;
            *) missing="$missing $p" ;;
        esac
    done
else
    echo "tests/vm/setup.sh: not a Debian system (no dpkg-query); install $PACKAGES by hand" >&2
    exit 1
fi
if [ -z "$missing" ] && ! have_kernel; then missing=" linux-image-amd64"; fi

if [ -z "$missing" ]; then
    say "all present"
    exit 0
fi

say "missing:$missing; installing"
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "tests/vm/setup.sh: need root to apt-get install$missing" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >&2
# shellcheck disable=SC2086
$SUDO apt-get install -y -q --no-install-recommends $missing >&2
if ! have_kernel; then
    echo "tests/vm/setup.sh: still no /boot/vmlinuz-* with /lib/modules after install" >&2
    exit 1
fi
say "done"
