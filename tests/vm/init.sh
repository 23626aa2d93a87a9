#!/bin/busybox sh
# /init of the pmd QEMU guest (packed into the initramfs by tests/vm/harness.py).
#
# Mounts the host's root (9p tag "hostroot", read-only) under an overlay with a
# tmpfs upper layer, the run's results directory (9p tag "results", read-write),
# loads the modules listed in /modules/order, binds the devices named in
# /share/guest.conf to vfio-pci, chroots into the host's root and runs
# /pmd-vm/run.sh there (written by the harness).  Output goes to
# /pmd-vm/output, the exit status to /pmd-vm/status.  Then powers off.
#
# Nothing here touches the host: the guest's /sys, /dev and /proc are its own,
# and the host's root is shared read-only.

/bin/busybox mkdir -p /bin /proc /sys /dev /lower /rw /newroot /share
/bin/busybox --install -s /bin
export PATH=/bin

log() { echo "pmd-vm: $*"; }

fatal() {
    log "FATAL: $*"
    if [ -f /share/guest.conf ]; then
        echo "pmd-vm: guest setup failed: $*" >> /share/output
        echo 255 > /share/status
        sync
    fi
    poweroff -f
    sleep 5
    echo o > /proc/sysrq-trigger
}

mount -t proc proc /proc || fatal "mount proc"
mount -t sysfs sysfs /sys || fatal "mount sysfs"
mount -t devtmpfs devtmpfs /dev || fatal "mount devtmpfs"

while read -r m; do
    case "$m" in virtio_net.ko) continue ;; esac   # after binding, see below
    insmod "/modules/$m" || fatal "insmod $m"
done < /modules/order
log "modules loaded"

mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /share \
    || fatal "mount 9p results"
[ -f /share/guest.conf ] || fatal "no guest.conf in the results share"
PMD_BIND=""
PMD_KNIC=""
PMD_HUGEPAGES=0
PMD_KEEP=""
PMD_NOIOMMU=0
. /share/guest.conf

mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower \
    || fatal "mount 9p hostroot"
mount -t tmpfs -o mode=0755 tmpfs /rw || fatal "mount tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || fatal "mount overlay"

# No-IOMMU mode (a vfio.ko rebuilt with CONFIG_VFIO_NOIOMMU, no vIOMMU): before
# binding, so that vfio-pci puts each device without an IOMMU group in a
# /dev/vfio/noiommu-N group of its own.
if [ "$PMD_NOIOMMU" = 1 ]; then
    p=/sys/module/vfio/parameters/enable_unsafe_noiommu_mode
    [ -e "$p" ] || fatal "vfio has no enable_unsafe_noiommu_mode (not the rebuilt vfio.ko?)"
    echo Y > "$p" || fatal "enable_unsafe_noiommu_mode"
    log "vfio: no-IOMMU mode on"
fi

# Bind the devices for pmd to vfio-pci (QEMU-VFIO.md): unbind, override, probe.
for bdf in $PMD_BIND; do
    d=/sys/bus/pci/devices/$bdf
    [ -e "$d" ] || fatal "no PCI device $bdf"
    if [ -e "$d/driver" ]; then echo "$bdf" > "$d/driver/unbind" || fatal "unbind $bdf"; fi
    echo vfio-pci > "$d/driver_override" || fatal "driver_override $bdf"
    echo "$bdf" > /sys/bus/pci/drivers_probe
    drv=$(readlink "$d/driver")
    [ "${drv##*/}" = vfio-pci ] || fatal "$bdf not bound to vfio-pci (driver: ${drv:-none})"
    group=$(readlink "$d/iommu_group")
    log "$bdf -> vfio-pci, /dev/vfio/${group##*/}"
done

# The optional kernel-driven NIC (frame-channel checks): virtio_net only now, so
# that it never probes the devices above.
if [ -n "$PMD_KNIC" ]; then
    [ -f /modules/virtio_net.ko ] && insmod /modules/virtio_net.ko
    for n in /sys/bus/pci/devices/$PMD_KNIC/virtio*/net/*; do
        [ -e "$n" ] || fatal "no network interface for $PMD_KNIC"
        ifname=${n##*/}
        echo 1 > /proc/sys/net/ipv6/conf/$ifname/disable_ipv6 2>/dev/null
        ip link set "$ifname" up || fatal "ip link set $ifname up"
        echo "PMD_VM_KNIC_IFNAME=$ifname" >> /share/guest.env
        log "kernel NIC $PMD_KNIC is $ifname"
    done
fi

if [ "$PMD_HUGEPAGES" -gt 0 ] 2>/dev/null; then
    echo "$PMD_HUGEPAGES" > /proc/sys/vm/nr_hugepages
fi

# The new root: the guest's own proc, sys, dev; fresh tmpfs for /tmp and /run.
R=/newroot
mount -t proc proc $R/proc || fatal "mount proc in new root"
mount -t sysfs sysfs $R/sys || fatal "mount sysfs in new root"
mount -t devtmpfs devtmpfs $R/dev || fatal "mount devtmpfs in new root"
mkdir -p $R/dev/pts $R/dev/shm $R/dev/hugepages
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t hugetlbfs hugetlbfs $R/dev/hugepages
# Directories under /tmp or /run that the command needs (a checkout, a virtual
# environment) would vanish under the fresh tmpfs: bind the overlay's view of
# each aside first and back over the tmpfs after (writable, like the rest).
mkdir -p /keep
i=0
for p in $PMD_KEEP; do
    i=$((i + 1))
    mkdir -p /keep/$i
    mount --bind "$R$p" /keep/$i || fatal "keep $p"
done
mount -t tmpfs -o mode=1777 tmpfs $R/tmp || fatal "mount tmpfs on /tmp"
mount -t tmpfs -o mode=0755 tmpfs $R/run
i=0
for p in $PMD_KEEP; do
    i=$((i + 1))
    mkdir -p "$R$p"
    mount --bind /keep/$i "$R$p" || fatal "bind $p back over the tmpfs"
done
# No udev: make the /dev/virtio-ports/NAME links it would make.
for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] || continue
    name=$(cat "$p/name")
    [ -n "$name" ] || continue
    mkdir -p $R/dev/virtio-ports
    ln -sf "../${p##*/}" "$R/dev/virtio-ports/$name"
done
mkdir -p $R/pmd-vm
mount --bind /share $R/pmd-vm || fatal "bind the results share"

up=$(cut -d' ' -f1 /proc/uptime)
echo "$up" > /share/started
log "running the command (guest uptime ${up}s)"
chroot $R /bin/sh /pmd-vm/run.sh >> /share/output 2>&1 < /dev/null
rc=$?
up=$(cut -d' ' -f1 /proc/uptime)
echo "$up" > /share/finished
echo "$rc" > /share/status
sync
log "command exited with $rc (guest uptime ${up}s); powering off"
umount $R/pmd-vm 2>/dev/null
umount /share 2>/dev/null
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
