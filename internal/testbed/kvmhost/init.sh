#!/bin/busybox sh
# PID 1 of a kvmhost VM (busybox ash, from the initramfs built by prepare.go).
#
# It loads the kernel modules listed in /lib/modules/order and order.bg (each in dependency
# order, the second list in the background), mounts the host's root filesystem (9p, mount tag
# "hostroot") on /newroot with the VM's own proc, sys, dev, run and cgroup mounts on top, and runs
# RUNDIR/run.sh chrooted into it with stdout and stderr going to RUNDIR/stdout and RUNDIR/stderr:
# RUNDIR is a directory on the host named by kvmhost.dir= on the kernel command line, so the host
# sees the output as it is written (each write on this 9p mount is a synchronous round trip to
# QEMU). The exit status goes to RUNDIR/status. Every failure prints
# "kvmhost-init: FAILED: <step>" and recent kernel messages on the serial console and powers off;
# the host then reports the missing status with the console's last lines.

/bin/busybox --install -s /bin
export PATH=/bin
umask 022

say() { echo "kvmhost-init: $*"; }
fail() {
	say "FAILED: $*"
	dmesg 2>/dev/null | tail -n 25
	poweroff -f
	sleep 60
}

mount -t proc proc /proc || fail "mount /proc in the initramfs"
mount -t sysfs sysfs /sys || fail "mount /sys in the initramfs"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev in the initramfs"

dir=
verbose=0
cache=mmap
for w in $(cat /proc/cmdline); do
	case "$w" in
	kvmhost.dir=*) dir="${w#kvmhost.dir=}" ;;
	kvmhost.verbose=*) verbose="${w#kvmhost.verbose=}" ;;
	kvmhost.cache=*) cache="${w#kvmhost.cache=}" ;;
	esac
done
[ -n "$dir" ] || fail "no kvmhost.dir= on the kernel command line"
step() { [ "$verbose" = 1 ] && say "$(cut -d' ' -f1 /proc/uptime)s: $*"; }

# load_modules LIST: insmod each "module [args]" line of LIST in order. On failure it records the
# module in /modfail and stops (it may run in the background, where fail would be too early).
load_modules() {
	while read -r mod args; do
		[ -n "$mod" ] || continue
		if ! insmod "/lib/modules/$mod.ko" $args; then
			echo "$mod.ko $args" >/modfail
			return 1
		fi
	done <"$1"
}

step "loading modules for the host root"
load_modules /lib/modules/order || fail "insmod $(cat /modfail)"
# KVM and the network modules load while the root is mounted.
load_modules /lib/modules/order.bg &
bgload=$!

step "mounting the host root"
r=/newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=$cache hostroot $r ||
	fail "mount the host root (9p tag hostroot) on $r"
[ -d "$r$dir" ] || fail "run directory $dir is not visible through the host root mount"

# The RTC gives the kernel whole seconds only, so the clock starts up to a second behind the
# host's. A file created on the host root carries the host's time to the nanosecond, and busybox
# date can set whole seconds: wait for the host's next whole second and set it then (within a
# few tens of ms). It runs in the background, overlapping the rest of the set-up.
(
	u0=$(cut -d' ' -f1 /proc/uptime)
	: >"$r$dir/clock" || exit
	set -- $(stat -c '%Y %y' "$r$dir/clock") # 1795322550 2026-11-22 04:42:30.948269015 +0000
	sec=$1 frac=${3#*.}
	u1=$(cut -d' ' -f1 /proc/uptime)
	# Nanoseconds to the next whole second, less the time since the file was created (uptime
	# is in hundredths). "1$frac" keeps leading zeros from making the number octal.
	wait_ns=$((2000000000 - 1$frac - (${u1%.*}${u1#*.} - ${u0%.*}${u0#*.}) * 10000000))
	[ $wait_ns -gt 0 ] && usleep $((wait_ns / 1000))
	date -s "@$((sec + 1))" >/dev/null
) &
clock=$!

mount -t proc proc $r/proc || fail "mount proc on $r/proc"
mount -t sysfs sysfs $r/sys || fail "mount sysfs on $r/sys"
mount -t cgroup2 cgroup2 $r/sys/fs/cgroup 2>/dev/null || say "warning: no cgroup2 on /sys/fs/cgroup"
mount -t devtmpfs devtmpfs $r/dev || fail "mount devtmpfs on $r/dev"
mkdir -p $r/dev/pts $r/dev/shm $r/dev/mqueue
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts $r/dev/pts || fail "mount devpts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $r/dev/shm || fail "mount tmpfs on /dev/shm"
mount -t mqueue mqueue $r/dev/mqueue 2>/dev/null
ln -sf /proc/self/fd $r/dev/fd
ln -sf /proc/self/fd/0 $r/dev/stdin
ln -sf /proc/self/fd/1 $r/dev/stdout
ln -sf /proc/self/fd/2 $r/dev/stderr
# /run is the VM's own: `ip netns add` keeps its namespace files in /run/netns, and the host's
# /run (its sockets, pid files, the host's own named namespaces) means nothing in here.
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs $r/run || fail "mount tmpfs on /run"
mkdir -p $r/run/netns $r/run/lock $r/run/kvmhost
# The command's TMPDIR (unless kept as the host's): unix sockets cannot be bound on the 9p root.
mkdir -m 1777 $r/run/kvmhost/tmp
# run.sh runs under this busybox, so it needs no shell or env from the host's installation.
cp /bin/busybox $r/run/kvmhost/busybox || fail "copy busybox to /run/kvmhost"

step "mounted"
ip link set lo up || fail "bring lo up"
hostname kvmhost

step "waiting for the clock and the modules"
wait $clock
wait $bgload
[ -e /modfail ] && fail "insmod $(cat /modfail)"
[ -c /dev/kvm ] || fail "/dev/kvm does not exist after loading the KVM modules (does the CPU model expose svm?)"

step "running the command"
: >"$r$dir/started"
chroot $r /run/kvmhost/busybox sh "$dir/run.sh" </dev/null >"$r$dir/stdout" 2>"$r$dir/stderr"
rc=$?
step "command exited with status $rc"
echo "$rc" >"$r$dir/status.tmp" && mv "$r$dir/status.tmp" "$r$dir/status" ||
	fail "write the exit status to $dir/status"
sync
poweroff -f
sleep 60
