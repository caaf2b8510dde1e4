#!/bin/sh
# Builds godwit's flat guest image from the sources beside this script.
#
#   sh build.sh OUT             the image (flat binary, loaded at EntryGPA)
#   sh build.sh -native OUT     the native harness: the same workload code as a host program
#   sh build.sh -multiboot OUT  the multiboot image for QEMU (flat, with a multiboot header)
#
# All builds compile workload.c with the same CFLAGS; only platform.h's few port and address
# helpers differ (GODWIT_NATIVE, GODWIT_QEMU). The image builds are deterministic: no debug
# information, no build id, no paths in what objcopy keeps.
set -eu

src=$(cd "$(dirname "$0")" && pwd)
native=0
multiboot=0
if [ "${1:-}" = "-native" ]; then
	native=1
	shift
elif [ "${1:-}" = "-multiboot" ]; then
	multiboot=1
	shift
fi
if [ $# -ne 1 ]; then
	echo "usage: $0 [-native | -multiboot] OUT" >&2
	exit 2
fi
out=$1

CC=${CC:-gcc}
OBJCOPY=${OBJCOPY:-objcopy}
CFLAGS="-std=gnu11 -O2 -march=x86-64 -mtune=generic -ffreestanding -fno-builtin -fno-pic -fno-pie \
-fno-stack-protector -fno-asynchronous-unwind-tables -fno-unwind-tables -fcf-protection=none \
-fno-tree-loop-distribute-patterns -mno-red-zone -Wall -Wextra -Werror"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ $native -eq 1 ]; then
	$CC $CFLAGS -DGODWIT_NATIVE -c "$src/workload.c" -o "$tmp/workload.o"
	$CC -std=gnu11 -O2 -Wall -Wextra -Werror -fno-pie -c "$src/harness.c" -o "$tmp/harness.o"
	$CC -no-pie -pthread -o "$out" "$tmp/harness.o" "$tmp/workload.o"
	exit 0
fi

if [ $multiboot -eq 1 ]; then
	$CC $CFLAGS -c "$src/mb.S" -o "$tmp/mb.o"
	$CC $CFLAGS -DGODWIT_QEMU -c "$src/workload.c" -o "$tmp/workload.o"
	$CC $CFLAGS -DGODWIT_QEMU -c "$src/qemu.c" -o "$tmp/qemu.o"
	$CC $CFLAGS -c "$src/rt.c" -o "$tmp/rt.o"
	$CC -nostdlib -static -no-pie -Wl,--build-id=none -Wl,--no-warn-rwx-segments -Wl,-T,"$src/mb.ld" \
		-o "$tmp/mb.elf" "$tmp/mb.o" "$tmp/workload.o" "$tmp/qemu.o" "$tmp/rt.o"
	$OBJCOPY -O binary "$tmp/mb.elf" "$tmp/mb.bin"
	if [ -n "${GODWIT_GUEST_ELF:-}" ]; then
		cat "$tmp/mb.elf" >"$GODWIT_GUEST_ELF"
	fi
	cat "$tmp/mb.bin" >"$out"
	exit 0
fi

$CC $CFLAGS -c "$src/entry.S" -o "$tmp/entry.o"
$CC $CFLAGS -c "$src/workload.c" -o "$tmp/workload.o"
$CC $CFLAGS -c "$src/rt.c" -o "$tmp/rt.o"
$CC -nostdlib -static -no-pie -Wl,--build-id=none -Wl,-T,"$src/guest.ld" \
	-o "$tmp/guest.elf" "$tmp/entry.o" "$tmp/workload.o" "$tmp/rt.o"
$OBJCOPY -O binary "$tmp/guest.elf" "$tmp/image.bin"
# Tests disassemble the ELF (its .text alone) to check for instructions a CPL3 guest must not use.
if [ -n "${GODWIT_GUEST_ELF:-}" ]; then
	cat "$tmp/guest.elf" >"$GODWIT_GUEST_ELF"
fi

size=$(wc -c <"$tmp/image.bin")
if [ "$size" -gt 1048576 ]; then
	echo "$0: image is $size bytes, more than ImageMax (1 MiB)" >&2
	exit 1
fi
cat "$tmp/image.bin" >"$out"
