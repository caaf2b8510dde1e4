/*
 * The native harness: runs the guest's workload code (workload.c built with -DGODWIT_NATIVE) as
 * an ordinary host process, one thread per vCPU, with "guest memory" in one anonymous mapping
 * and the VMM's side of the ports played by the functions below. The Go tests and the native
 * throughput benchmark drive it; it prints one line per event on stdout:
 *
 *   start vcpus=N mem=BYTES tsc_khz=K
 *   console vcpu=I text=...
 *   verified vcpu=I seq=S checked=C mismatches=M first_bad_page=P first_bad_offset=O
 *            expected=E found=F versioned=V free=R ns=T        (one line)
 *   exit vcpu=I status=S units=U pages=P write_ns=T write_cpu_ns=C slept_us=Z
 *   free vcpu=I done=D supported=S reported=R notfree=N inflated=B balloon=P relisted=L
 *            deflated=F demand=G      (one line, with -r or -b, before that vCPU's exit line;
 *            balloon, deflated, demand: the mailbox's counts at exit)
 *
 * write_ns is the wall time from the vCPU's start to its last heartbeat, write_cpu_ns the
 * thread's CPU time over the same span: on a busy machine the CPU time still shows what the
 * write loop costs, while the wall time also counts the time other processes had the CPU.
 *   panic vcpu=I text=...
 *
 * Usage: harness -p PARAMS -m MEMBYTES -u UNITS [-v VERIFY_AT] [-r REPORT_AT] [-b TARGET] [-l LIST_AT] [-c VCPU:GPA] [-d DUMP] [-s] [-P]
 *   -p  the params page (8 KiB, as guest.EncodeParams makes it), placed at ParamsGPA
 *   -m  bytes of guest memory
 *   -u  each vCPU gets CmdExit at its UNITS-th heartbeat
 *   -v  each vCPU gets CmdVerify at its VERIFY_AT-th heartbeat
 *   -c  at that heartbeat vCPU VCPU first flips the byte at GPA (xor 0xff), and flips it back
 *       once the verify report is in: a corruption the verify must see, undone before the work
 *       goes on
 *   -d  write all guest memory to DUMP after every vCPU has exited
 *   -s  really sleep on PortSleep (otherwise sleeps are only counted)
 *   -r  each vCPU gets CmdReportFree at its REPORT_AT-th heartbeat; every page it reports is
 *       checked to be flagged free in its version table right then (notfree counts those that
 *       are not: an allocator that reports a page in use)
 *   -b  each vCPU gets CmdBalloon at its first heartbeat and TARGET from PortBalloonTarget;
 *       every page it inflates is checked like a reported one (notfree), then zeroed as the
 *       VMM's release would
 *   -l  each vCPU gets CmdBalloonList at its LIST_AT-th heartbeat; every page it names again
 *       (PortBalloonHeld) is checked and zeroed like an inflated one (relisted counts them)
 *   -P  fault all guest memory in and write (zeros to) every cache line of it before the vCPUs
 *       start, so that a throughput figure shows the write loop rather than first-touch costs.
 *       MAP_POPULATE alone is not enough where the host is itself a VM: there, the first
 *       write to a populated page can still cost far more than later ones.
 *
 * harness -t measures the TSC frequency against CLOCK_MONOTONIC and prints "tsc_khz=K": the
 * value a VMM would put into the params page (it comes from KVM there).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "abi.h"

uintptr_t godwit_native_base;

void guest_main(uint64_t index, uint64_t params_gpa) __attribute__((noreturn));

struct vstate {
	uint64_t index;
	pthread_t thread;
	uint64_t heartbeats;
	uint64_t start_ns;
	uint64_t write_ns;
	uint64_t start_cpu_ns;
	uint64_t write_cpu_ns;
	uint64_t verify_start_ns;
	uint64_t slept_us;
	uint32_t exit_status;
	int exited;
	int corrupted;
	uint64_t free_done, free_supported, free_reported, free_notfree, inflated, relisted;
	jmp_buf done; /* PortExit returns here, out of guest_main, which never returns */
};

static struct {
	const char *params_path;
	uint64_t mem_bytes;
	uint64_t units;
	uint64_t verify_at;
	uint64_t report_at;
	int balloon;
	uint32_t balloon_target;
	uint64_t list_at;
	int corrupt;
	uint64_t corrupt_vcpu;
	uint64_t corrupt_gpa;
	const char *dump_path;
	int real_sleep;
	int populate;
} opt;

static uint64_t nr_vcpus;
static struct vstate vcpus[MAX_VCPUS];
static __thread struct vstate *self;
static pthread_mutex_t out_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_barrier_t start_barrier;

static void __attribute__((noreturn, format(printf, 1, 2))) die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fprintf(stderr, "harness: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(2);
}

static void __attribute__((format(printf, 1, 2))) emit(const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&out_mu);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fflush(stdout);
	pthread_mutex_unlock(&out_mu);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t thread_cpu_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static uint8_t *host(uint64_t gpa)
{
	return (uint8_t *)(godwit_native_base + gpa);
}

static uint64_t read_u64(uint64_t gpa)
{
	uint64_t v;

	memcpy(&v, host(gpa), 8);
	return v;
}

static uint64_t mailbox_gpa(uint64_t index)
{
	return read_u64(PARAMS_GPA + PARAMS_VCPU_OFFSET + index * PARAMS_VCPU_RECORD +
			VCPU_MAILBOX_GPA);
}

static uint64_t mb(uint64_t index, uint64_t off)
{
	return read_u64(mailbox_gpa(index) + off);
}

/* Console text up to its length, with line breaks shown as \n so that one event is one line. */
static void emit_text(const char *what, uint32_t len)
{
	/*
	 * main checked that the record's mailbox lies in the mailbox area. Until the guest has
	 * checked its params it writes to the fixed-layout mailbox, which is the same page for
	 * params made by EncodeParams.
	 */
	const char *text = (const char *)host(mailbox_gpa(self->index) + MB_CONSOLE);
	char buf[2 * MB_CONSOLE_MAX + 1];
	uint32_t n = 0;

	if (len > MB_CONSOLE_MAX)
		len = MB_CONSOLE_MAX;
	for (uint32_t i = 0; i < len; i++) {
		if (text[i] == '\n') {
			buf[n++] = '\\';
			buf[n++] = 'n';
		} else {
			buf[n++] = text[i];
		}
	}
	buf[n] = 0;
	emit("%s vcpu=%" PRIu64 " text=%s\n", what, self->index, buf);
}

static void flip_corrupt_byte(void)
{
	if (opt.corrupt_gpa >= opt.mem_bytes)
		die("corrupt address 0x%" PRIx64 " is beyond guest memory", opt.corrupt_gpa);
	*host(opt.corrupt_gpa) ^= 0xff;
}

uint32_t godwit_native_in(uint16_t port)
{
	struct vstate *v = self;

	if (port == PORT_BALLOON_TARGET && opt.balloon)
		return opt.balloon_target;
	if (port != PORT_HEARTBEAT)
		die("vcpu %" PRIu64 ": in from port 0x%x", v->index, port);
	v->heartbeats++;
	if (v->heartbeats == 1 && opt.balloon)
		return CMD_BALLOON;
	if (v->heartbeats == opt.units) {
		v->write_ns = now_ns() - v->start_ns;
		v->write_cpu_ns = thread_cpu_ns() - v->start_cpu_ns;
		return CMD_EXIT;
	}
	if (v->heartbeats == opt.verify_at) {
		if (opt.corrupt && opt.corrupt_vcpu == v->index) {
			flip_corrupt_byte();
			v->corrupted = 1;
		}
		v->verify_start_ns = now_ns();
		return CMD_VERIFY;
	}
	if (v->heartbeats == opt.report_at)
		return CMD_REPORT_FREE;
	if (v->heartbeats == opt.list_at)
		return CMD_BALLOON_LIST;
	return CMD_CONTINUE;
}

void godwit_native_out(uint16_t port, uint32_t val)
{
	struct vstate *v = self;
	uint64_t i = v->index;

	switch (port) {
	case PORT_CONSOLE:
		emit_text("console", val);
		return;
	case PORT_SLEEP:
		v->slept_us += val;
		if (opt.real_sleep) {
			struct timespec ts = {val / 1000000, (long)(val % 1000000) * 1000};

			while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
				;
		}
		return;
	case PORT_VERIFIED: {
		uint64_t start = v->verify_start_ns;

		if (v->heartbeats == opt.units)
			start = v->start_ns + v->write_ns;
		emit("verified vcpu=%" PRIu64 " seq=%" PRIu64 " checked=%" PRIu64
		     " mismatches=%" PRIu64 " first_bad_page=0x%" PRIx64
		     " first_bad_offset=%" PRIu64 " expected=0x%" PRIx64 " found=0x%" PRIx64
		     " versioned=%" PRIu64 " free=%" PRIu64 " ns=%" PRIu64 "\n",
		     i, mb(i, MB_VERIFY_SEQ), mb(i, MB_PAGES_CHECKED), mb(i, MB_MISMATCHES),
		     mb(i, MB_FIRST_BAD_PAGE), mb(i, MB_FIRST_BAD_OFFSET), mb(i, MB_EXPECTED),
		     mb(i, MB_FOUND), mb(i, MB_PAGES_VERSIONED), mb(i, MB_PAGES_FREE), now_ns() - start);
		if (v->corrupted) {
			flip_corrupt_byte();
			v->corrupted = 0;
		}
		return;
	}
	case PORT_FREE_PAGES:
	case PORT_BALLOON_INFLATE:
	case PORT_BALLOON_HELD: {
		uint64_t rec = PARAMS_GPA + PARAMS_VCPU_OFFSET + i * PARAMS_VCPU_RECORD;
		uint64_t table = read_u64(rec + VCPU_VERSION_TABLE_GPA);
		uint64_t data_pfn = read_u64(rec + VCPU_DATA_GPA) / PAGE_SIZE;
		uint64_t pages = read_u64(rec + VCPU_DATA_PAGES);

		if (val > MB_FREE_MAX)
			die("vcpu %" PRIu64 ": free page report of %u entries", i, val);
		for (uint32_t k = 0; k < val; k++) {
			uint32_t pfn, version;

			memcpy(&pfn, host(mailbox_gpa(i) + MB_FREE_LIST + 4 * k), 4);
			if (pfn < data_pfn || pfn >= data_pfn + pages) {
				v->free_notfree++;
				continue;
			}
			memcpy(&version, host(table + 4 * (pfn - data_pfn)), 4);
			if (!(version & VERSION_FREE))
				v->free_notfree++;
			else if (port != PORT_FREE_PAGES)
				memset(host((uint64_t)pfn * PAGE_SIZE), 0, PAGE_SIZE);
		}
		if (port == PORT_BALLOON_INFLATE)
			v->inflated += val;
		else if (port == PORT_BALLOON_HELD)
			v->relisted += val;
		else
			v->free_reported += val;
		return;
	}
	case PORT_FREE_DONE:
		v->free_done++;
		v->free_supported = val;
		return;
	case PORT_EXIT:
		if (opt.report_at || opt.balloon)
			emit("free vcpu=%" PRIu64 " done=%" PRIu64 " supported=%" PRIu64
			     " reported=%" PRIu64 " notfree=%" PRIu64 " inflated=%" PRIu64
			     " balloon=%" PRIu64 " relisted=%" PRIu64 " deflated=%" PRIu64
			     " demand=%" PRIu64 "\n",
			     i, v->free_done, v->free_supported, v->free_reported, v->free_notfree,
			     v->inflated, mb(i, MB_BALLOON_PAGES), v->relisted, mb(i, MB_BALLOON_DEFLATED),
			     mb(i, MB_BALLOON_DEMAND));
		v->exit_status = val;
		v->exited = 1;
		emit("exit vcpu=%" PRIu64 " status=%u units=%" PRIu64 " pages=%" PRIu64
		     " write_ns=%" PRIu64 " write_cpu_ns=%" PRIu64 " slept_us=%" PRIu64 "\n",
		     i, val, mb(i, MB_WORK_UNITS), mb(i, MB_PAGES_WRITTEN), v->write_ns,
		     v->write_cpu_ns, v->slept_us);
		longjmp(v->done, 1);
	case PORT_PANIC:
		emit_text("panic", val);
		exit(3);
	}
	die("vcpu %" PRIu64 ": out 0x%x to port 0x%x", i, val, port);
}

static void *vcpu_thread(void *arg)
{
	self = arg;
	pthread_barrier_wait(&start_barrier);
	if (setjmp(self->done) == 0) {
		self->start_ns = now_ns();
		self->start_cpu_ns = thread_cpu_ns();
		guest_main(self->index, PARAMS_GPA);
	}
	return NULL;
}

/* The TSC frequency in kHz, measured against CLOCK_MONOTONIC over 50 ms. */
static uint64_t measure_tsc_khz(void)
{
	struct timespec pause = {0, 50000000};
	uint64_t t0 = now_ns(), c0 = rdtsc();

	nanosleep(&pause, NULL);
	uint64_t t1 = now_ns(), c1 = rdtsc();
	return (c1 - c0) * 1000000 / (t1 - t0);
}

static uint64_t parse_u64(const char *s, const char *what)
{
	char *end;

	errno = 0;
	uint64_t v = strtoull(s, &end, 0);
	if (errno != 0 || end == s || *end != 0)
		die("bad %s '%s'", what, s);
	return v;
}

static void load_params(void)
{
	FILE *f = fopen(opt.params_path, "rb");

	if (!f)
		die("open params %s: %s", opt.params_path, strerror(errno));
	size_t n = fread(host(PARAMS_GPA), 1, PARAMS_SIZE, f);
	if (n != PARAMS_SIZE)
		die("params %s: read %zu bytes, want %d", opt.params_path, n, PARAMS_SIZE);
	fclose(f);
}

static void dump_memory(void)
{
	FILE *f = fopen(opt.dump_path, "wb");

	if (!f)
		die("create dump %s: %s", opt.dump_path, strerror(errno));
	if (fwrite(host(0), 1, opt.mem_bytes, f) != opt.mem_bytes || fclose(f) != 0)
		die("write dump %s: %s", opt.dump_path, strerror(errno));
}

int main(int argc, char **argv)
{
	if (argc == 2 && strcmp(argv[1], "-t") == 0) {
		printf("tsc_khz=%" PRIu64 "\n", measure_tsc_khz());
		return 0;
	}
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];

		if (a[0] != '-' || a[1] == 0 || a[2] != 0)
			die("unknown argument %s", a);
		if (a[1] == 's' || a[1] == 'P') {
			if (a[1] == 's')
				opt.real_sleep = 1;
			else
				opt.populate = 1;
			continue;
		}
		if (i + 1 >= argc)
			die("%s needs a value", a);
		const char *val = argv[++i];
		switch (a[1]) {
		case 'p':
			opt.params_path = val;
			break;
		case 'm':
			opt.mem_bytes = parse_u64(val, "memory size");
			break;
		case 'u':
			opt.units = parse_u64(val, "unit count");
			break;
		case 'v':
			opt.verify_at = parse_u64(val, "verify heartbeat");
			break;
		case 'r':
			opt.report_at = parse_u64(val, "report heartbeat");
			break;
		case 'b':
			opt.balloon = 1;
			opt.balloon_target = (uint32_t)parse_u64(val, "balloon target");
			break;
		case 'l':
			opt.list_at = parse_u64(val, "balloon list heartbeat");
			break;
		case 'c': {
			char *colon = strchr(val, ':');

			if (!colon)
				die("-c wants VCPU:GPA, got %s", val);
			*colon = 0;
			opt.corrupt = 1;
			opt.corrupt_vcpu = parse_u64(val, "corrupt vcpu");
			opt.corrupt_gpa = parse_u64(colon + 1, "corrupt address");
			break;
		}
		case 'd':
			opt.dump_path = val;
			break;
		default:
			die("unknown option %s", a);
		}
	}
	if (!opt.params_path || opt.mem_bytes < DATA_GPA || opt.mem_bytes % PAGE_SIZE != 0 ||
	    opt.units == 0)
		die("usage: harness -p PARAMS -m MEMBYTES -u UNITS [-v N] [-r N] [-b TARGET] [-c VCPU:GPA] [-d DUMP] [-s] [-P]"
		    " (memory at least 0x%x, page aligned; units at least 1)",
		    DATA_GPA);

	void *mem = mmap(NULL, opt.mem_bytes, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (opt.populate ? MAP_POPULATE : 0),
			 -1, 0);
	if (mem == MAP_FAILED)
		die("mmap %" PRIu64 " bytes of guest memory: %s", opt.mem_bytes, strerror(errno));
	godwit_native_base = (uintptr_t)mem;
	if (opt.populate) {
		for (uint64_t off = 0; off < opt.mem_bytes; off += 64)
			*(volatile uint8_t *)host(off) = 0;
	}
	load_params();

	nr_vcpus = read_u64(PARAMS_GPA + PAR_NR_VCPUS);
	if (nr_vcpus == 0 || nr_vcpus > MAX_VCPUS)
		die("params: %" PRIu64 " vcpus", nr_vcpus);
	for (uint64_t i = 0; i < nr_vcpus; i++) {
		uint64_t m = mailbox_gpa(i);

		if (m < MAILBOX_GPA || m + PAGE_SIZE > ENTRY_GPA)
			die("params: vcpu %" PRIu64 " mailbox at 0x%" PRIx64, i, m);
	}
	uint64_t tsc_khz = read_u64(PARAMS_GPA + PAR_TSC_KHZ);
	emit("start vcpus=%" PRIu64 " mem=%" PRIu64 " tsc_khz=%" PRIu64 "\n", nr_vcpus,
	     opt.mem_bytes, tsc_khz);

	pthread_barrier_init(&start_barrier, NULL, (unsigned)nr_vcpus);
	for (uint64_t i = 0; i < nr_vcpus; i++) {
		vcpus[i].index = i;
		int err = pthread_create(&vcpus[i].thread, NULL, vcpu_thread, &vcpus[i]);
		if (err != 0)
			die("start vcpu %" PRIu64 " thread: %s", i, strerror(err));
	}
	int status = 0;
	for (uint64_t i = 0; i < nr_vcpus; i++) {
		pthread_join(vcpus[i].thread, NULL);
		if (!vcpus[i].exited || vcpus[i].exit_status != 0)
			status = 1;
	}
	if (opt.dump_path)
		dump_memory();
	return status;
}
