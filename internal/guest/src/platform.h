/*
 * What the workload code needs from the machine it runs on: port I/O, the TSC, and the mapping
 * from guest physical addresses to pointers.
 *
 * In the guest image (the default) guest virtual equals guest physical, and in/out exit to the
 * VMM. Built with -DGODWIT_NATIVE, the same workload code runs as an ordinary host process: the
 * native harness (harness.c) supplies the ports as functions and keeps "guest memory" in one
 * mapping at godwit_native_base. Built with -DGODWIT_QEMU, it is the multiboot image for QEMU
 * (mb.S, qemu.c). Only these few lines differ between the builds; the page generators, write
 * loops and verification are the same source compiled with the same flags.
 */
#ifndef GODWIT_PLATFORM_H
#define GODWIT_PLATFORM_H

#include <stdint.h>

static inline uint64_t cpu_tsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

#if defined(GODWIT_QEMU)

/*
 * The multiboot image for QEMU (qemu.c): the same workload code, but QEMU has none of godwit's
 * paravirtual ports, so every port access goes to qemu.c, which plays the VMM's part inside the
 * guest (debugcon text, TSC-timed sleeps, periodic verification) and ticks a heartbeat line
 * out even while the workload verifies or sleeps.
 */
uint32_t godwit_qemu_in(uint16_t port);
void godwit_qemu_out(uint16_t port, uint32_t val);
void godwit_qemu_tick(void);

/*
 * The workload's addresses are virtual here: mb.S maps them to QEMU's RAM, contiguous across
 * the PCI hole below 4 GiB.
 */
static inline void *gpa_ptr(uint64_t gpa)
{
	return (void *)(uintptr_t)gpa;
}

static inline uint32_t port_in32(uint16_t port)
{
	__asm__ volatile("" ::: "memory");
	return godwit_qemu_in(port);
}

static inline void port_out32(uint16_t port, uint32_t val)
{
	__asm__ volatile("" ::: "memory");
	godwit_qemu_out(port, val);
}

/* Called in long loops that end in no heartbeat (verification, the idle workload's first touch). */
static inline void platform_tick(void)
{
	godwit_qemu_tick();
}

#elif defined(GODWIT_NATIVE)

extern uintptr_t godwit_native_base;
uint32_t godwit_native_in(uint16_t port);
void godwit_native_out(uint16_t port, uint32_t val);

static inline void *gpa_ptr(uint64_t gpa)
{
	return (void *)(godwit_native_base + (uintptr_t)gpa);
}

static inline uint32_t port_in32(uint16_t port)
{
	return godwit_native_in(port);
}

static inline void port_out32(uint16_t port, uint32_t val)
{
	/* The harness reads guest memory (mailbox, console) when a port is written. */
	__asm__ volatile("" ::: "memory");
	godwit_native_out(port, val);
}

static inline void platform_tick(void)
{
}

#else

static inline void *gpa_ptr(uint64_t gpa)
{
	return (void *)(uintptr_t)gpa;
}

/*
 * The "memory" clobbers order the accesses with the mailbox and console stores around them: the
 * VMM reads guest memory while the vCPU sits in the I/O exit.
 */
static inline uint32_t port_in32(uint16_t port)
{
	uint32_t val;
	__asm__ volatile("inl %w1, %0" : "=a"(val) : "Nd"(port) : "memory");
	return val;
}

static inline void port_out32(uint16_t port, uint32_t val)
{
	__asm__ volatile("outl %0, %w1" : : "a"(val), "Nd"(port) : "memory");
}

/* Under godwit's VMM every heartbeat exits to the VMM anyway: nothing to do between them. */
static inline void platform_tick(void)
{
}

#endif

#endif
