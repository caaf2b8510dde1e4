/*
 * The QEMU side of the multiboot image: everything godwit's VMM does for the guest, done by the
 * guest itself at CPL3, so that QEMU can run the same workload code (workload.c, compiled with
 * -DGODWIT_QEMU) with nothing but its stock devices.
 *
 * mb_main (entered from mb.S at CPL3) reads the multiboot information: the memory size (low RAM,
 * and from the memory map the RAM above 4 GiB, which mb.S maps right after it) and the command
 * line. The command line carries the workload as key=value words (decimal numbers; the
 * Go side, guest.MultibootCmdline, writes them):
 *
 *   workload content pattern seed rate batch wss touch idle_us hot hot_prob pool peak   (guest.Config)
 *   tsc_khz    the TSC frequency (required: QEMU gives the guest no way to learn it)
 *   vcpus      must be 1 (only the bootstrap processor runs)
 *   hb_us      at most one heartbeat line per this many microseconds (0: one per unit of work)
 *   verify_ms  verify the memory every this many milliseconds (0: never)
 *   exit_ms    verify and exit after this many milliseconds (0: never)
 *
 * It lays the single slice out exactly like guest.Layout, writes the params page exactly like
 * guest.EncodeParams, zeroes whatever the firmware left in the data area (SeaBIOS keeps tables
 * at the top of RAM), then calls guest_main as the VMM's vCPU 0 would be entered.
 *
 * The paravirtual ports become text on isa-debugcon (port 0xe9), one line per event:
 *
 *   godwit-qemu boot mem=BYTES high=BYTES pages=N wss=N tsc_khz=K scrubbed=N
 *   console TEXT                           the guest's console text (its start message)
 *   hb UNITS                               a heartbeat; UNITS is the work done so far
 *   verify-begin SEQ                       a verification pass starts
 *   verify SEQ pages=N mismatches=M versioned=V first_bad_pfn=X offset=X expected=X found=X
 *   exit STATUS                            then isa-debug-exit (port 0xf4) with 0
 *   panic TEXT                             then isa-debug-exit with 1
 *
 * so QEMU's exit status is 1 after a clean exit and 3 after a panic. Heartbeat lines are ticked
 * out while the workload verifies or sleeps too, so that a gap between two lines, timestamped
 * by the host, means the vCPU did not run.
 */
#include <stdint.h>

#include "abi.h"
#include "platform.h"

#define PORT_DEBUGCON 0xe9
#define PORT_DEBUG_EXIT 0xf4

#define MB_LOADER_MAGIC 0x2BADB002
#define MBI_FLAGS 0
#define MBI_MEM_UPPER 8
#define MBI_CMDLINE 16
#define MBI_MMAP_LENGTH 44
#define MBI_MMAP_ADDR 48
#define MBI_HAS_MEMORY (1u << 0)
#define MBI_HAS_CMDLINE (1u << 2)
#define MBI_HAS_MMAP (1u << 6)
#define MMAP_RAM 1

#define MIN_MEMORY (16ULL << 20)
#define MAPPED_MEMORY ((uint64_t)MAX_PDS << 30) /* what mb.S's page tables map */
#define HIGH_RAM_GPA (4ULL << 30)
#define HUGE_PAGE (2ULL << 20)

void __attribute__((noreturn)) guest_main(uint64_t index, uint64_t params_gpa);
void __attribute__((noreturn)) mb_main(uint32_t mbi);

static struct {
	uint64_t tsc_khz;
	uint64_t hb_ticks;     /* TSC ticks between heartbeat lines; 0: one per heartbeat */
	uint64_t verify_ticks; /* 0: never */
	uint64_t exit_ticks;   /* 0: never */
	uint64_t start;
	uint64_t last_hb;
	uint64_t last_verify;
	volatile uint64_t *mailbox;
} st;

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %w1" : : "a"(v), "Nd"(port) : "memory");
}

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %w1" : : "a"(v), "Nd"(port) : "memory");
}

static void put_c(char c)
{
	outb(PORT_DEBUGCON, (uint8_t)c);
}

static void put_s(const char *s)
{
	while (*s)
		put_c(*s++);
}

static void put_n(const char *s, uint64_t n)
{
	for (uint64_t i = 0; i < n && s[i]; i++)
		put_c(s[i] == '\n' ? ' ' : s[i]);
}

static void put_u(uint64_t v)
{
	char d[20];
	int n = 0;

	do {
		d[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n > 0)
		put_c(d[--n]);
}

static void put_x(uint64_t v)
{
	static const char hex[16] = "0123456789abcdef";
	int digits = 1;

	while (digits < 16 && (v >> (4 * digits)))
		digits++;
	put_s("0x");
	while (digits > 0)
		put_c(hex[(v >> (4 * --digits)) & 15]);
}

static void __attribute__((noreturn)) debug_exit(uint32_t code)
{
	for (;;)
		outl(PORT_DEBUG_EXIT, code);
}

static void __attribute__((noreturn)) fail(const char *what, const char *detail, uint64_t n)
{
	put_s("panic godwit-qemu: ");
	put_s(what);
	if (detail) {
		put_c(' ');
		put_n(detail, 64);
	}
	put_c(' ');
	put_u(n);
	put_c('\n');
	debug_exit(1);
}

static inline uint64_t mb_u32(uint32_t addr)
{
	return *(const volatile uint32_t *)(uintptr_t)addr;
}

static inline uint64_t mb_u64(uint32_t addr)
{
	return mb_u32(addr) | mb_u32(addr + 4) << 32;
}

/*
 * The bytes of RAM the loader's memory map has from 4 GiB on, in one range: QEMU puts there
 * what does not fit below its PCI hole. Each entry is a 32-bit size (not counting itself), then
 * a 64-bit base, a 64-bit length and a 32-bit type.
 */
static uint64_t high_ram(uint32_t mbi, uint32_t flags)
{
	if (!(flags & MBI_HAS_MMAP))
		return 0;
	uint32_t at = (uint32_t)mb_u32(mbi + MBI_MMAP_ADDR);
	uint32_t end = at + (uint32_t)mb_u32(mbi + MBI_MMAP_LENGTH);
	while (at < end) {
		uint32_t size = (uint32_t)mb_u32(at);
		if (size < 20)
			fail("multiboot memory map entry too short:", 0, size);
		if (mb_u64(at + 4) == HIGH_RAM_GPA && mb_u32(at + 20) == MMAP_RAM)
			return mb_u64(at + 12) & ~(uint64_t)(PAGE_SIZE - 1);
		at += size + 4;
	}
	return 0;
}

static inline uint64_t mbox(uint64_t off)
{
	return st.mailbox[off / 8];
}

static void heartbeat_line(uint64_t now)
{
	st.last_hb = now;
	put_s("hb ");
	put_u(mbox(MB_WORK_UNITS));
	put_c('\n');
}

void godwit_qemu_tick(void)
{
	if (st.hb_ticks == 0)
		return;
	uint64_t now = cpu_tsc();
	if (now - st.last_hb >= st.hb_ticks)
		heartbeat_line(now);
}

static void verify_begin(void)
{
	put_s("verify-begin ");
	put_u(mbox(MB_VERIFY_SEQ) + 1);
	put_c('\n');
}

uint32_t godwit_qemu_in(uint16_t port)
{
	if (port != PORT_HEARTBEAT)
		return 0xffffffff;
	uint64_t now = cpu_tsc();
	if (st.hb_ticks == 0 || now - st.last_hb >= st.hb_ticks)
		heartbeat_line(now);
	if (st.exit_ticks != 0 && now - st.start >= st.exit_ticks) {
		verify_begin();
		return CMD_EXIT;
	}
	if (st.verify_ticks != 0 && now - st.last_verify >= st.verify_ticks) {
		verify_begin();
		return CMD_VERIFY;
	}
	return CMD_CONTINUE;
}

static void verified(void)
{
	st.last_verify = cpu_tsc();
	put_s("verify ");
	put_u(mbox(MB_VERIFY_SEQ));
	put_s(" pages=");
	put_u(mbox(MB_PAGES_CHECKED));
	put_s(" mismatches=");
	put_u(mbox(MB_MISMATCHES));
	put_s(" versioned=");
	put_u(mbox(MB_PAGES_VERSIONED));
	put_s(" first_bad_pfn=");
	put_x(mbox(MB_FIRST_BAD_PAGE));
	put_s(" offset=");
	put_x(mbox(MB_FIRST_BAD_OFFSET));
	put_s(" expected=");
	put_x(mbox(MB_EXPECTED));
	put_s(" found=");
	put_x(mbox(MB_FOUND));
	put_c('\n');
}

static void sleep_us(uint32_t us)
{
	uint64_t until = cpu_tsc() + (uint64_t)us * st.tsc_khz / 1000;

	while (cpu_tsc() < until)
		godwit_qemu_tick();
}

void godwit_qemu_out(uint16_t port, uint32_t val)
{
	const char *console = (const char *)st.mailbox + MB_CONSOLE;

	switch (port) {
	case PORT_CONSOLE:
		put_s("console ");
		put_n(console, val < MB_CONSOLE_MAX ? val : MB_CONSOLE_MAX);
		put_c('\n');
		break;
	case PORT_SLEEP:
		sleep_us(val);
		break;
	case PORT_VERIFIED:
		verified();
		break;
	case PORT_EXIT:
		put_s("exit ");
		put_u(val);
		put_c('\n');
		debug_exit(val == 0 ? 0 : 2);
	case PORT_PANIC:
		put_s("panic ");
		put_n(console, val < MB_CONSOLE_MAX ? val : MB_CONSOLE_MAX);
		put_c('\n');
		debug_exit(1);
	default:
		fail("write to unknown port", 0, port);
	}
}

/* The command line's parameters, in the order of the key table below. */
enum {
	K_WORKLOAD,
	K_CONTENT,
	K_PATTERN,
	K_SEED,
	K_RATE,
	K_BATCH,
	K_WSS,
	K_TOUCH,
	K_IDLE_US,
	K_HOT,
	K_HOT_PROB,
	K_POOL,
	K_PEAK,
	K_PRIVATE,
	K_NEAR,
	K_PRIVATE_SEED,
	K_TSC_KHZ,
	K_VCPUS,
	K_HB_US,
	K_VERIFY_MS,
	K_EXIT_MS,
	K_COUNT
};

static const char *const keys[K_COUNT] = {
	"workload", "content", "pattern", "seed", "rate", "batch", "wss", "touch", "idle_us",
	"hot", "hot_prob", "pool", "peak", "private", "near", "private_seed", "tsc_khz", "vcpus",
	"hb_us", "verify_ms", "exit_ms",
};

static int is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n';
}

/* Parses the key=value words of s into v; words without '=' (the image's path) are skipped. */
static void parse_cmdline(const char *s, uint64_t *v)
{
	while (*s) {
		while (is_space(*s))
			s++;
		const char *word = s, *eq = 0;
		while (*s && !is_space(*s)) {
			if (*s == '=' && !eq)
				eq = s;
			s++;
		}
		if (!eq)
			continue;
		int k = 0;
		for (; k < K_COUNT; k++) {
			const char *a = keys[k], *b = word;
			while (*a && b < eq && *a == *b)
				a++, b++;
			if (!*a && b == eq)
				break;
		}
		if (k == K_COUNT)
			fail("unknown parameter", word, (uint64_t)(eq - word));
		uint64_t n = 0;
		const char *d = eq + 1;
		if (d == s)
			fail("parameter without a value", word, 0);
		for (; d < s; d++) {
			if (*d < '0' || *d > '9' || n > (~0ULL - 9) / 10)
				fail("parameter value is not a decimal number", word, 0);
			n = n * 10 + (uint64_t)(*d - '0');
		}
		v[k] = n;
	}
}

static inline void par_set(uint64_t off, uint64_t val)
{
	*(volatile uint64_t *)(uintptr_t)(PARAMS_GPA + off) = val;
}

/* Zeroes the page at gpa unless it is zero already (reading keeps untouched RAM unallocated). */
static int scrub(uint64_t gpa)
{
	volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)gpa;
	uint64_t acc = 0;

	for (int i = 0; i < PAGE_SIZE / 8; i++)
		acc |= p[i];
	if (acc == 0)
		return 0;
	for (int i = 0; i < PAGE_SIZE / 8; i++)
		p[i] = 0;
	return 1;
}

void mb_main(uint32_t mbi)
{
	uint64_t v[K_COUNT] = {0};
	uint32_t flags = (uint32_t)mb_u32(mbi + MBI_FLAGS);

	/* guest.DefaultConfig, with the QEMU-only settings' defaults. */
	v[K_WORKLOAD] = WORKLOAD_DIRTY;
	v[K_CONTENT] = CONTENT_TEXT;
	v[K_PATTERN] = PATTERN_RANDOM;
	v[K_SEED] = 1;
	v[K_BATCH] = 64;
	v[K_TOUCH] = 1000;
	v[K_IDLE_US] = 1000;
	v[K_HOT] = 100;
	v[K_HOT_PROB] = 900;
	v[K_POOL] = 256;
	v[K_VCPUS] = 1;
	v[K_HB_US] = 1000;
	v[K_VERIFY_MS] = 3000;

	/* Until the mailbox address is in the params, vCPU 0's fixed one serves. */
	st.mailbox = (volatile uint64_t *)(uintptr_t)MAILBOX_GPA;

	if (!(flags & MBI_HAS_MEMORY))
		fail("the loader gave no memory size; flags", 0, flags);
	if (flags & MBI_HAS_CMDLINE)
		parse_cmdline((const char *)(uintptr_t)mb_u32(mbi + MBI_CMDLINE), v);

	/*
	 * Low RAM, then (as mb.S maps it) the RAM above 4 GiB right after it. QEMU's mem_upper
	 * leaves out the firmware's last 128 KiB below the end of low RAM; when RAM goes on
	 * above 4 GiB, low RAM ends at the 2 MiB page mb.S rounded up to (at 3 GiB, or at
	 * max-ram-below-4g), and the workload takes the firmware's pages too, as it does the
	 * tables SeaBIOS leaves elsewhere.
	 */
	uint64_t low = ((mb_u32(mbi + MBI_MEM_UPPER) + 1024) * 1024) & ~(uint64_t)(PAGE_SIZE - 1);
	uint64_t high = high_ram(mbi, flags);
	if (high)
		low = (low + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
	uint64_t mem = low + high;
	if (mem < MIN_MEMORY || mem > MAPPED_MEMORY)
		fail("memory size out of range:", 0, mem);
	if (v[K_VCPUS] != 1)
		fail("only 1 vcpu runs under QEMU; vcpus=", 0, v[K_VCPUS]);
	if (v[K_TSC_KHZ] == 0)
		fail("tsc_khz= is required", 0, 0);

	/* guest.Layout for one vCPU. */
	uint64_t slice_pages = (mem - DATA_GPA) / PAGE_SIZE;
	uint64_t data_pages = slice_pages - (slice_pages + 1024) / 1025;
	uint64_t table_pages = (data_pages + 1023) / 1024;
	uint64_t wss = v[K_WSS] ? v[K_WSS] : data_pages;
	if (wss > data_pages)
		fail("wss (pages) is larger than the data pages", 0, data_pages);

	/* guest.EncodeParams. */
	for (uint64_t off = 0; off < PARAMS_SIZE; off += 8)
		par_set(off, 0);
	par_set(PAR_MAGIC, PARAMS_MAGIC);
	par_set(PAR_ABI_VERSION, ABI_VERSION);
	par_set(PAR_NR_VCPUS, 1);
	par_set(PAR_TSC_KHZ, v[K_TSC_KHZ]);
	par_set(PAR_WORKLOAD, v[K_WORKLOAD]);
	par_set(PAR_CONTENT, v[K_CONTENT]);
	par_set(PAR_PATTERN, v[K_PATTERN]);
	par_set(PAR_SEED, v[K_SEED]);
	par_set(PAR_RATE, v[K_RATE]);
	par_set(PAR_BATCH_PAGES, v[K_BATCH]);
	par_set(PAR_TOUCH_PERMILLE, v[K_TOUCH]);
	par_set(PAR_IDLE_INTERVAL_US, v[K_IDLE_US]);
	par_set(PAR_HOT_PERMILLE, v[K_HOT]);
	par_set(PAR_HOT_PROB_PERMILLE, v[K_HOT_PROB]);
	par_set(PAR_IMAGE_POOL_PAGES, v[K_POOL]);
	par_set(PAR_PEAK_PERMILLE, v[K_PEAK]);
	par_set(PAR_PRIVATE_PERMILLE, v[K_PRIVATE]);
	par_set(PAR_NEAR_PERMILLE, v[K_NEAR]);
	par_set(PAR_PRIVATE_SEED, v[K_PRIVATE_SEED]);
	par_set(PARAMS_VCPU_OFFSET + VCPU_VERSION_TABLE_GPA, DATA_GPA);
	par_set(PARAMS_VCPU_OFFSET + VCPU_DATA_GPA, DATA_GPA + table_pages * PAGE_SIZE);
	par_set(PARAMS_VCPU_OFFSET + VCPU_DATA_PAGES, data_pages);
	par_set(PARAMS_VCPU_OFFSET + VCPU_WSS_PAGES, wss);
	par_set(PARAMS_VCPU_OFFSET + VCPU_MAILBOX_GPA, MAILBOX_GPA);
	par_set(PARAMS_VCPU_OFFSET + VCPU_STACK_TOP, STACK_GPA + STACK_SIZE);

	/* Version tables and data must start out zero, as in a fresh godwit VM. */
	uint64_t scrubbed = 0;
	for (uint64_t gpa = DATA_GPA; gpa < DATA_GPA + (table_pages + data_pages) * PAGE_SIZE;
	     gpa += PAGE_SIZE)
		scrubbed += (uint64_t)scrub(gpa);
	for (uint64_t off = 0; off < PAGE_SIZE; off += 8)
		st.mailbox[off / 8] = 0;

	st.tsc_khz = v[K_TSC_KHZ];
	st.hb_ticks = v[K_HB_US] * st.tsc_khz / 1000;
	st.verify_ticks = v[K_VERIFY_MS] * st.tsc_khz;
	st.exit_ticks = v[K_EXIT_MS] * st.tsc_khz;
	st.start = cpu_tsc();
	st.last_hb = st.start;
	st.last_verify = st.start;

	put_s("godwit-qemu boot mem=");
	put_u(mem);
	put_s(" high=");
	put_u(high);
	put_s(" pages=");
	put_u(data_pages);
	put_s(" wss=");
	put_u(wss);
	put_s(" tsc_khz=");
	put_u(st.tsc_khz);
	put_s(" scrubbed=");
	put_u(scrubbed);
	put_c('\n');

	guest_main(0, PARAMS_GPA);
}
