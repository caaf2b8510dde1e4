/*
 * godwit's built-in workload guest: page content generators, the idle, dirty and churn
 * workloads, verification, free page reporting, and the entry function guest_main.
 *
 * Every vCPU runs guest_main on its own stack and touches only its own slice of the data area
 * and its own mailbox page, so there is no shared mutable state and no locking: all state lives
 * on the stack. The image has no .data or .bss that it writes.
 *
 * Page content is a pure function of (seed, content kind, page frame number, version), so a
 * page can be regenerated at any time to check it, and a page that migration left stale (an
 * older version, or a page from another address) does not match. Two kinds are weaker by
 * design: zero pages all look alike, and image pages repeat, so a stale image page goes unseen
 * when its old and new version happen to draw the same pool page (1 in ImagePoolPages).
 */
#include <stdint.h>

#include "abi.h"
#include "platform.h"

typedef uint64_t v2u64 __attribute__((vector_size(16)));
typedef uint64_t u64_unaligned __attribute__((aligned(1), may_alias));

#define PAGE_WORDS (PAGE_SIZE / 8)
#define PAGE_VECS (PAGE_SIZE / 16)
#define GOLDEN 0x9e3779b97f4a7c15ULL

/* Domain separation: each use of the seed gets its own derived key. */
#define DOMAIN_RANDOM 0x72616e646f6d3031ULL
#define DOMAIN_TEXT 0x7465787474657874ULL
#define DOMAIN_IMAGE_POOL 0x696d616765706f6fULL
#define DOMAIN_IMAGE_PICK 0x696d6167657069ccULL
#define DOMAIN_PATTERN 0x7061747465726e31ULL
#define DOMAIN_CHURN 0x636875726e636875ULL
#define DOMAIN_PATCH 0x7061746368706174ULL
#define DOMAIN_IMAGE_KIND 0x696d6167656b6e64ULL
#define DOMAIN_PRIVATE 0x7072697661746531ULL
#define DOMAIN_NEAR 0x6e65617264757031ULL
#define DOMAIN_DIVERGE 0x6469766572676531ULL

/* Words of a pool page that a near-duplicate changes. */
#define NEAR_WORDS 4

/* Patch content: the page's 64-byte slots, one of which each version rewrites. */
#define PATCH_SLOTS 64
#define PATCH_SLOT_WORDS (PAGE_SIZE / 8 / PATCH_SLOTS)

/* Marks a page while verify walks the allocator's slots, to find one listed twice. */
#define VERSION_SEEN 0x40000000u

/* Longest single sleep request; longer waits are split so that eax never overflows. */
#define MAX_SLEEP_US 1000000u

/* Bounds that keep the pacing arithmetic within 64 bits (batch * tsc_khz * 1000 < 2^58). */
#define MAX_RATE (1ULL << 32)
#define MAX_TSC_KHZ (1ULL << 24)

/* The splitmix64 finalizer: a bijection on 64-bit words with good avalanche. */
static inline uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/*
 * The identity of one version of one page. Page frame numbers stay below 2^24 (64 GiB of guest
 * memory) and versions are 32 bits, so distinct (pfn, version) pairs give distinct keys, and
 * mixing a key with a seed-derived word through a bijection keeps them distinct.
 */
static inline uint64_t page_key(uint64_t pfn, uint32_t version)
{
	return (pfn << 32) | version;
}

/*
 * Fills a 4 KiB page with the xorshift64 stream of eight independent lanes seeded from key.
 * Eight lanes in four SSE2 registers hide the shift/xor latency: this runs faster than the
 * memory it writes. The result is incompressible.
 */
static void fill_stream(uint64_t *page, uint64_t key)
{
	v2u64 a = {mix64(key + 1 * GOLDEN) | 1, mix64(key + 2 * GOLDEN) | 1};
	v2u64 b = {mix64(key + 3 * GOLDEN) | 1, mix64(key + 4 * GOLDEN) | 1};
	v2u64 c = {mix64(key + 5 * GOLDEN) | 1, mix64(key + 6 * GOLDEN) | 1};
	v2u64 d = {mix64(key + 7 * GOLDEN) | 1, mix64(key + 8 * GOLDEN) | 1};
	v2u64 *out = (v2u64 *)page;

#define XORSHIFT(x) \
	do { \
		x ^= x << 13; \
		x ^= x >> 7; \
		x ^= x << 17; \
	} while (0)

	for (int i = 0; i < PAGE_VECS; i += 4) {
		XORSHIFT(a);
		XORSHIFT(b);
		XORSHIFT(c);
		XORSHIFT(d);
		out[i] = a;
		out[i + 1] = b;
		out[i + 2] = c;
		out[i + 3] = d;
	}
#undef XORSHIFT
}

static void fill_zero(uint64_t *page)
{
	v2u64 zero = {0, 0};
	v2u64 *out = (v2u64 *)page;

	for (int i = 0; i < PAGE_VECS; i++)
		out[i] = zero;
}

static void fill_random(uint64_t *page, uint64_t seed, uint64_t pfn, uint32_t version)
{
	fill_stream(page, mix64(page_key(pfn, version) ^ mix64(seed ^ DOMAIN_RANDOM)));
}

/*
 * Image pages are copies of pool page k. The pool page depends only on (seed, k), so the same
 * page shows up at many addresses of a VM and in every VM started with the same seed: what
 * deduplication can find. Pool pages are incompressible, so that any saving on this content
 * comes from deduplication alone.
 */
static inline uint64_t image_pick(uint64_t pool_pages, uint64_t pfn, uint32_t version)
{
	uint64_t h = mix64(page_key(pfn, version) ^ DOMAIN_IMAGE_PICK);

	/* Multiply-shift maps the high 32 bits uniformly onto [0, pool_pages) without a divide. */
	return ((h >> 32) * pool_pages) >> 32;
}

/* Parameters shared by all vCPUs, copied out of the params page. */
struct config {
	uint64_t nr_vcpus;
	uint64_t tsc_khz;
	uint64_t workload;
	uint64_t content;
	uint64_t pattern;
	uint64_t seed;
	uint64_t rate;
	uint64_t batch_pages;
	uint64_t touch_permille;
	uint64_t idle_interval_us;
	uint64_t hot_permille;
	uint64_t hot_prob_permille;
	uint64_t image_pool_pages;
	uint64_t peak_permille;
	uint64_t private_permille;
	uint64_t near_permille;
	uint64_t private_seed;
};

/* A uniform draw from [0, n) out of h's high 32 bits, by multiply-shift (no divide). */
static inline uint64_t draw(uint64_t h, uint64_t n)
{
	return ((h >> 32) * n) >> 32;
}

/*
 * Beside the pool, as VMs cloned from one image hold data of their own, each version of a page
 * is drawn to be one of the VM's own (private_permille: random content of its private seed),
 * a near-duplicate (near_permille: a pool page with NEAR_WORDS words changed, where and to what
 * by the private seed: what sub-page deduplication and differential compression can find), or
 * a pool page. With both shares 0 every page is a pool page, as before they existed.
 */
static void fill_image(uint64_t *page, const struct config *cfg, uint64_t pfn, uint32_t version)
{
	uint64_t key = page_key(pfn, version);
	uint64_t kind = draw(mix64(key ^ DOMAIN_IMAGE_KIND), 1000);

	if (kind < cfg->private_permille) {
		fill_stream(page, mix64(key ^ mix64(cfg->private_seed ^ DOMAIN_PRIVATE)));
		return;
	}
	fill_stream(page, mix64(image_pick(cfg->image_pool_pages, pfn, version) ^
				mix64(cfg->seed ^ DOMAIN_IMAGE_POOL)));
	if (kind < cfg->private_permille + cfg->near_permille) {
		uint64_t h = mix64(key ^ mix64(cfg->private_seed ^ DOMAIN_NEAR));

		/* Each change flips at least one bit, and two at one word differ from each other. */
		for (int i = 0; i < NEAR_WORDS; i++, h = mix64(h + GOLDEN))
			page[h & (PAGE_WORDS - 1)] ^= h | 1;
	}
}

/*
 * The text dictionary. Each entry is a word with its separator, at most 8 bytes, zero padded;
 * the writer stores all 8 bytes and advances by the entry's length, so the padding is
 * overwritten by the next word. The 82 distinct words and phrases have as many entries as their
 * weight, a skewed distribution like real text's: a page compresses about 3x on its own with
 * gzip, a run of pages about 4x.
 */
static const char text_words[256][8] __attribute__((aligned(8))) = {
	"the ", "the ", "the ", "the ", "the ", "the ", "the ", "the ",
	"the ", "the ", "the ", "the ", "the ", "the ", "the ", "the ",
	"the ", "of the ", "of the ", "of the ", "of the ", "of the ", "of the ", "of the ",
	"of the ", "of the ", "of the ", "and ", "and ", "and ", "and ", "and ",
	"and ", "and ", "and ", "and ", "and ", "to the ", "to the ", "to the ",
	"to the ", "to the ", "to the ", "to the ", "to the ", "in the ", "in the ", "in the ",
	"in the ", "in the ", "in the ", "in the ", "in the ", "of ", "of ", "of ",
	"of ", "of ", "of ", "of ", "of ", "a ", "a ", "a ",
	"a ", "a ", "a ", "a ", "a ", "to ", "to ", "to ",
	"to ", "to ", "to ", "to ", "to ", "is ", "is ", "is ",
	"is ", "is ", "is ", "in ", "in ", "in ", "in ", "in ",
	"it is ", "it is ", "it is ", "it is ", "it is ", "that ", "that ", "that ",
	"that ", "that ", "for the ", "for the ", "for the ", "for the ", "on the ", "on the ",
	"on the ", "on the ", "with ", "with ", "with ", "with ", "as ", "as ",
	"as ", "as ", "was ", "was ", "was ", "was ", "by the ", "by the ",
	"by the ", "can be ", "can be ", "can be ", "this ", "this ", "this ", "are ",
	"are ", "are ", "from ", "from ", "from ", "or ", "or ", "or ",
	"at the ", "at the ", "at the ", "which ", "which ", "which ", "not ", "not ",
	"not ", "but ", "but ", "we ", "we ", "has ", "has ", "will ",
	"will ", "page ", "page ", "page ", "page ", "page ", "page ", "pages ",
	"pages ", "pages ", "pages ", "memory ", "memory ", "memory ", "memory ", "memory ",
	"memory ", "guest ", "guest ", "guest ", "guest ", "host ", "host ", "host ",
	"host ", "dirty ", "dirty ", "dirty ", "dirty ", "copy ", "copy ", "copy ",
	"data ", "data ", "data ", "data ", "state ", "state ", "state ", "time ",
	"time ", "time ", "rate ", "round ", "send ", "link ", "vcpu ", "when ",
	"then ", "each ", "source ", "target ", "fault ", "network ", "buffer ", "kernel ",
	"table ", "bytes ", "can ", "must ", "should ", "after ", "before ", "only ",
	"new ", "old ", "page, ", "page, ", "time, ", "time, ", "data, ", "data, ",
	"host, ", "host, ", "page. ", "page. ", "page. ", "time. ", "time. ", "data. ",
	"data. ", "host. ", "host. ", "guest. ", "guest. ", "done. ", "done. ", "page.\n",
	"page.\n", "page.\n", "time.\n", "time.\n", "data.\n", "data.\n", "host.\n", "host.\n",
	"guest.\n", "guest.\n", "done.\n", "done.\n", "memory.\n", "memory.\n", "pages.\n", "pages.\n",
};

static const char hex_digits[16] = "0123456789abcdef";

static uint64_t put_hex(uint8_t *dst, uint64_t pos, uint64_t val, int digits)
{
	for (int i = digits - 1; i >= 0; i--)
		dst[pos++] = (uint8_t)hex_digits[(val >> (4 * i)) & 15];
	return pos;
}

static uint64_t put_str(uint8_t *dst, uint64_t pos, const char *s)
{
	while (*s)
		dst[pos++] = (uint8_t)*s++;
	return pos;
}

/*
 * A text page: a header line naming the page frame and version (so a stale or misplaced page is
 * visible to a person reading a dump), then words drawn eight at a time from one random word,
 * then spaces up to a final newline.
 */
static void fill_text(uint8_t *page, uint64_t seed, uint64_t pfn, uint32_t version)
{
	uint64_t state = mix64(page_key(pfn, version) ^ mix64(seed ^ DOMAIN_TEXT));
	uint64_t pos = 0;

	pos = put_str(page, pos, "[godwit page 0x");
	pos = put_hex(page, pos, pfn, 10);
	pos = put_str(page, pos, " version 0x");
	pos = put_hex(page, pos, version, 8);
	pos = put_str(page, pos, "]\n");

	/* Eight words take at most 64 bytes, the last store included. */
	while (pos <= PAGE_SIZE - 64) {
		uint64_t r = mix64(state += GOLDEN);

		for (int j = 0; j < 8; j++) {
			uint64_t w = *(const u64_unaligned *)text_words[r & 255];

			*(u64_unaligned *)(page + pos) = w;
			pos += 8 - ((uint64_t)__builtin_clzll(w) >> 3);
			r >>= 8;
		}
	}
	uint64_t r = mix64(state += GOLDEN);
	while (pos <= PAGE_SIZE - 8) {
		uint64_t w = *(const u64_unaligned *)text_words[r & 255];

		*(u64_unaligned *)(page + pos) = w;
		pos += 8 - ((uint64_t)__builtin_clzll(w) >> 3);
		r >>= 8;
	}
	while (pos < PAGE_SIZE - 1)
		page[pos++] = ' ';
	page[PAGE_SIZE - 1] = '\n';
}

/*
 * Patch: a page that each version changes a little, as a program that updates a record in
 * place does. The base is the page's text of version 0; version v rewrote slot v % 64 (64
 * bytes) with a stamp of (pfn, v), so slot j holds the stamp of the latest version w <= v with
 * w % 64 == j, or the base where there is none. Version v and v+1 differ in one slot.
 */
static void fill_patch(uint64_t *page, uint64_t seed, uint64_t pfn, uint32_t version)
{
	fill_text((uint8_t *)page, seed, pfn, 0);
	for (uint32_t j = 0; j < PATCH_SLOTS; j++) {
		if (version < j)
			break;
		uint32_t w = version - (version - j) % PATCH_SLOTS;

		if (w == 0)
			continue;
		uint64_t key = mix64(seed ^ DOMAIN_PATCH ^ page_key(pfn, w));

		for (uint32_t k = 0; k < PATCH_SLOT_WORDS; k++)
			page[j * PATCH_SLOT_WORDS + k] = mix64(key + k * GOLDEN);
	}
}


/*
 * The churn workload's page allocator over its vCPU's slice. The first meta_pages data pages
 * hold slots, one uint32 data page index per pool page: slots[0, free) are the free pages,
 * slots[free, pool) the allocated ones. The first `balloon` free slots are the balloon's:
 * pages handed to the VMM, which releases their memory; they come back (deflate) when the
 * target falls or the allocator finds no other free page. The last `pending` free slots are
 * pages freed since the last report while reporting is on; only the slots between may be
 * allocated, so a page the VMM was told is free stays free until the report that names it has
 * returned. The struct itself lives on the vCPU's stack (guest memory, so it migrates with the
 * rest).
 */
struct allocator {
	uint32_t *slots;
	uint64_t meta_pages;
	uint64_t pool;
	uint64_t free;
	uint64_t pending;
	uint64_t reporting;
	uint64_t balloon;
	uint32_t target; /* the VMM's: pages, or BALLOON_AUTO | per mille of the free pages */
	/* CmdBalloonList: balloon slots [relist_next, relist_end) are still to be named again. */
	uint64_t relist_next;
	uint64_t relist_end;
	/* The fewest free pages in the current and the last second (BALLOON_WINDOW). */
	uint64_t window_tsc;
	uint64_t free_min_now;
	uint64_t free_min_last;
};

/* Largest inflation per unit of work: a few lists, so a unit stays short. */
#define INFLATE_PER_UNIT (4 * MB_FREE_MAX)
/* Pages a deflate on demand gives back at once. */
#define DEFLATE_ON_DEMAND 64
/*
 * The balloon takes only memory the guest has not needed for a while: it never holds more
 * than the fewest free pages of the last one to two seconds (two windows of this many ms).
 * Memory the guest needs again soon would otherwise go round through the balloon, each time at
 * the cost of a release and of a fresh page from the host (Linux's free page reporting waits
 * 2 s for the same reason). Without the TSC frequency there are no windows.
 */
#define BALLOON_WINDOW_MS 1000

/* One vCPU's view: its configuration, slice and mailbox. Lives on that vCPU's stack. */
struct vcpu {
	struct allocator *alloc; /* churn only */
	uint64_t index;
	struct config cfg;
	uint32_t *versions;
	uint8_t *data;
	uint64_t data_pfn;
	uint64_t data_pages;
	uint64_t wss_pages;
	volatile uint64_t *mailbox;
	char *console;
};

/* Generates the content of (pfn, version) into page; content kind zero writes zeros. */
static void fill_page(const struct config *cfg, uint64_t *page, uint64_t pfn, uint32_t version)
{
	switch (cfg->content) {
	case CONTENT_TEXT:
		fill_text((uint8_t *)page, cfg->seed, pfn, version);
		break;
	case CONTENT_RANDOM:
		fill_random(page, cfg->seed, pfn, version);
		break;
	case CONTENT_IMAGE:
		fill_image(page, cfg, pfn, version);
		break;
	case CONTENT_PATCH:
		fill_patch(page, cfg->seed, pfn, version);
		break;
	default:
		fill_zero(page);
		break;
	}
}

/*
 * Writes data page idx at version (0 is skipped: it means never written). Zero content still rewrites the page (with zeros)
 * so that the write dirties it like any other. The version is stored only after the page is
 * complete; the compiler barrier keeps the stores in that order (x86 keeps them so for other
 * observers).
 */
static inline void write_version(struct vcpu *c, uint64_t idx, uint32_t version)
{
	if (version == 0)
		version = 1;
	fill_page(&c->cfg, (uint64_t *)(c->data + idx * PAGE_SIZE), c->data_pfn + idx, version);
	__asm__ volatile("" ::: "memory");
	c->versions[idx] = version;
}

static inline void write_page(struct vcpu *c, uint64_t idx)
{
	write_version(c, idx, c->versions[idx] + 1);
}

static inline uint64_t mb_get(const struct vcpu *c, uint64_t off)
{
	return c->mailbox[off / 8];
}

static inline void mb_set(struct vcpu *c, uint64_t off, uint64_t val)
{
	c->mailbox[off / 8] = val;
}

/* Console output: text is built in the mailbox console area, then announced by length. */
struct text {
	char *buf;
	uint32_t len;
};

static void text_str(struct text *t, const char *s)
{
	while (*s && t->len < MB_CONSOLE_MAX)
		t->buf[t->len++] = *s++;
}

static void text_u64(struct text *t, uint64_t v)
{
	char digits[20];
	int n = 0;

	do {
		digits[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n > 0 && t->len < MB_CONSOLE_MAX)
		t->buf[t->len++] = digits[--n];
}

static void text_hex(struct text *t, uint64_t v)
{
	int digits = 1;

	while (digits < 16 && (v >> (4 * digits)))
		digits++;
	text_str(t, "0x");
	while (digits > 0 && t->len < MB_CONSOLE_MAX)
		t->buf[t->len++] = hex_digits[(v >> (4 * --digits)) & 15];
}

static const char *workload_name(uint64_t w)
{
	switch (w) {
	case WORKLOAD_IDLE:
		return "idle";
	case WORKLOAD_DIRTY:
		return "dirty";
	case WORKLOAD_CHURN:
		return "churn";
	}
	return "?";
}

static const char *content_name(uint64_t k)
{
	switch (k) {
	case CONTENT_ZERO:
		return "zero";
	case CONTENT_TEXT:
		return "text";
	case CONTENT_RANDOM:
		return "random";
	case CONTENT_IMAGE:
		return "image";
	case CONTENT_PATCH:
		return "patch";
	}
	return "?";
}

static const char *pattern_name(uint64_t p)
{
	switch (p) {
	case PATTERN_SEQUENTIAL:
		return "sequential";
	case PATTERN_RANDOM:
		return "random";
	case PATTERN_HOTCOLD:
		return "hotcold";
	}
	return "?";
}

/* Reports an internal error and never comes back, even if the VMM resumes the vCPU. */
static void __attribute__((noreturn)) guest_panic(struct text *t)
{
	for (;;)
		port_out32(PORT_PANIC, t->len);
}

static void __attribute__((noreturn)) panic_value(struct vcpu *c, const char *what, uint64_t val)
{
	struct text t = {c->console, 0};

	text_str(&t, "godwit guest: vcpu ");
	text_u64(&t, c->index);
	text_str(&t, ": ");
	text_str(&t, what);
	text_str(&t, " ");
	text_hex(&t, val);
	guest_panic(&t);
}

static void sleep_us(uint64_t us)
{
	while (us > MAX_SLEEP_US) {
		port_out32(PORT_SLEEP, MAX_SLEEP_US);
		us -= MAX_SLEEP_US;
	}
	port_out32(PORT_SLEEP, (uint32_t)us);
}

/* Returns the word index of the first difference, or -1 when the pages are equal. */
static int compare_page(const uint64_t *have, const uint64_t *want)
{
	const v2u64 *h = (const v2u64 *)have;
	const v2u64 *w = (const v2u64 *)want;
	v2u64 diff = {0, 0};

	for (int i = 0; i < PAGE_VECS; i++)
		diff |= h[i] ^ w[i];
	if ((diff[0] | diff[1]) == 0)
		return -1;
	for (int i = 0; i < PAGE_WORDS; i++)
		if (have[i] != want[i])
			return i;
	return -1;
}

static int find_nonzero(const uint64_t *have)
{
	const v2u64 *h = (const v2u64 *)have;
	v2u64 acc = {0, 0};

	for (int i = 0; i < PAGE_VECS; i++)
		acc |= h[i];
	if ((acc[0] | acc[1]) == 0)
		return -1;
	for (int i = 0; i < PAGE_WORDS; i++)
		if (have[i] != 0)
			return i;
	return -1;
}

/* What a verify pass found wrong: how much, and the first instance. */
struct finding {
	uint64_t count, pfn, off, expected, found;
};

static void note_bad(struct finding *f, uint64_t pfn, uint64_t off, uint64_t expected, uint64_t found)
{
	if (f->count++ == 0) {
		f->pfn = pfn;
		f->off = off;
		f->expected = expected;
		f->found = found;
	}
}

/*
 * Checks the churn allocator's own structures: its counts, and that the slots list every pool
 * page exactly once, flagged free in the version table exactly when it sits in the free part.
 * A bad slot is reported at its place in the slot pages (found = its value), a wrong flag at
 * the data page (expected and found = the flag).
 */
static void check_allocator(struct vcpu *c, struct finding *f)
{
	struct allocator *a = c->alloc;

	if (a->pool + a->meta_pages != c->data_pages || a->free > a->pool || a->pending > a->free ||
	    a->balloon > a->free - a->pending) {
		note_bad(f, c->data_pfn, 0, a->pool, a->free);
		return;
	}
	for (uint64_t i = 0; i < a->pool; i++) {
		uint32_t s = a->slots[i];
		uint64_t where = c->data_pfn + i * 4 / PAGE_SIZE, off = (i * 4 % PAGE_SIZE) & ~7ULL;

		if (s < a->meta_pages || s >= c->data_pages) {
			note_bad(f, where, off, a->meta_pages, s);
			continue;
		}
		uint32_t v = c->versions[s];
		uint32_t want = i < a->free ? VERSION_FREE : 0;

		if (v & VERSION_SEEN) {
			note_bad(f, where, off, 0, s);
			continue;
		}
		if ((v & VERSION_FREE) != want)
			note_bad(f, c->data_pfn + s, 0, want, v & VERSION_FREE);
		c->versions[s] = v | VERSION_SEEN;
	}
	for (uint64_t i = 0; i < a->pool; i++) {
		uint32_t s = a->slots[i];

		if (s >= a->meta_pages && s < c->data_pages)
			c->versions[s] &= ~VERSION_SEEN;
	}
}

/*
 * Checks every data page of the slice against its version and fills in the mailbox report.
 * A page with version 0, and every page of zero content, must be all zero. Under churn the
 * allocator's slot pages are checked as structures instead, and a free page may hold anything.
 */
static void verify_and_report(struct vcpu *c)
{
	uint64_t scratch[PAGE_WORDS] __attribute__((aligned(16)));
	uint64_t versioned = 0, nfree = 0;
	struct finding f = {0, ~0ULL, 0, 0, 0};

	for (uint64_t idx = 0; idx < c->data_pages; idx++) {
		const uint64_t *have = (const uint64_t *)(c->data + idx * PAGE_SIZE);
		uint32_t version = c->versions[idx];
		int word;

		platform_tick();
		if (c->alloc) {
			if (idx < c->alloc->meta_pages)
				continue;
			if (version & VERSION_FREE) {
				nfree++;
				continue;
			}
			version &= VERSION_MASK;
		}
		int zero = version == 0 || c->cfg.content == CONTENT_ZERO;

		if (version != 0)
			versioned++;
		if (zero) {
			word = find_nonzero(have);
		} else {
			fill_page(&c->cfg, scratch, c->data_pfn + idx, version);
			word = compare_page(have, scratch);
		}
		if (word >= 0)
			note_bad(&f, c->data_pfn + idx, (uint64_t)word * 8, zero ? 0 : scratch[word], have[word]);
	}
	if (c->alloc)
		check_allocator(c, &f);

	mb_set(c, MB_PAGES_CHECKED, c->data_pages);
	mb_set(c, MB_MISMATCHES, f.count);
	mb_set(c, MB_FIRST_BAD_PAGE, f.pfn);
	mb_set(c, MB_FIRST_BAD_OFFSET, f.off);
	mb_set(c, MB_EXPECTED, f.expected);
	mb_set(c, MB_FOUND, f.found);
	mb_set(c, MB_PAGES_VERSIONED, versioned);
	mb_set(c, MB_PAGES_FREE, nfree);
	mb_set(c, MB_VERIFY_SEQ, mb_get(c, MB_VERIFY_SEQ) + 1);
	port_out32(PORT_VERIFIED, 0);
}

/*
 * Names the pages in slots[first, first+n) to the VMM through port, in mailbox lists of
 * MB_FREE_MAX. Each write blocks until the VMM has taken the list.
 */
static void name_slots(struct vcpu *c, uint16_t port, uint64_t first, uint64_t n)
{
	volatile uint32_t *list = (volatile uint32_t *)((volatile uint8_t *)c->mailbox + MB_FREE_LIST);

	while (n > 0) {
		uint64_t k = n < MB_FREE_MAX ? n : MB_FREE_MAX;

		for (uint64_t j = 0; j < k; j++)
			list[j] = (uint32_t)(c->data_pfn + c->alloc->slots[first + j]);
		port_out32(port, (uint32_t)k);
		first += k;
		n -= k;
	}
}

/*
 * Reports the pages in slots[first, first+n) free. Until the write that lists a page returns,
 * it cannot be allocated (this vCPU is the only one that allocates them, and it sits in the
 * write).
 */
static void report_free(struct vcpu *c, uint64_t first, uint64_t n)
{
	name_slots(c, PORT_FREE_PAGES, first, n);
}

/* Reports the pages freed since the last report; they may be allocated afterwards. */
static void flush_pending(struct vcpu *c)
{
	struct allocator *a = c->alloc;

	report_free(c, a->free - a->pending, a->pending);
	a->pending = 0;
}

/*
 * Rewrites permille/1000 of the slice's data pages once (which ones: by salt), each with its
 * version advanced by a step of the salt's own, so that clones of one template that diverge
 * with different salts write different content to the same pages. The step stays below 2^28
 * so that versions keep clear of the flag bits churn uses (this is for idle and dirty work).
 */
static void diverge(struct vcpu *c, uint64_t permille, uint64_t salt)
{
	uint32_t step = 1 + ((uint32_t)(salt & 0xfff) << 16);
	uint64_t key = mix64(salt ^ DOMAIN_DIVERGE);
	uint64_t written = 0;

	if (c->alloc)
		panic_value(c, "diverge under churn, salt", salt);
	for (uint64_t idx = 0; idx < c->data_pages; idx++) {
		if (draw(mix64(key ^ ((c->data_pfn + idx) * GOLDEN)), 1000) >= permille)
			continue;
		platform_tick();
		write_version(c, idx, c->versions[idx] + step);
		written++;
	}
	mb_set(c, MB_PAGES_WRITTEN, mb_get(c, MB_PAGES_WRITTEN) + written);
}

/* Ends one unit of work: tells the VMM and does what it answers. */
static void heartbeat(struct vcpu *c)
{
	uint32_t cmd = port_in32(PORT_HEARTBEAT);

	switch (cmd) {
	case CMD_CONTINUE:
		return;
	case CMD_VERIFY:
		verify_and_report(c);
		return;
	case CMD_EXIT:
		verify_and_report(c);
		for (;;)
			port_out32(PORT_EXIT, 0);
	case CMD_REPORT_FREE:
		if (c->alloc == 0) {
			port_out32(PORT_FREE_DONE, 0);
			return;
		}
		c->alloc->reporting = 1;
		c->alloc->pending = 0;
		/* The balloon's pages are released already: no need to name them. */
		report_free(c, c->alloc->balloon, c->alloc->free - c->alloc->balloon);
		port_out32(PORT_FREE_DONE, 1);
		return;
	case CMD_BALLOON: {
		uint32_t target = port_in32(PORT_BALLOON_TARGET);

		if (c->alloc)
			c->alloc->target = target;
		return;
	}
	case CMD_DIVERGE: {
		uint64_t permille = port_in32(PORT_DIVERGE);
		uint64_t salt = port_in32(PORT_DIVERGE);

		if (permille > 1000)
			panic_value(c, "diverge per mille above 1000:", permille);
		diverge(c, permille, salt);
		return;
	}
	case CMD_BALLOON_LIST:
		if (c->alloc) {
			c->alloc->relist_next = 0;
			c->alloc->relist_end = c->alloc->balloon;
		}
		return;
	}
	panic_value(c, "unknown heartbeat command", cmd);
}

/*
 * Idle: the first touch_permille/1000 of the slice's data pages (the lowest addresses, so the
 * touched part is one contiguous range) get version 1 once; then the vCPU only sleeps and
 * heartbeats.
 */
static void __attribute__((noreturn)) run_idle(struct vcpu *c)
{
	uint64_t touched = c->data_pages * c->cfg.touch_permille / 1000;

	for (uint64_t idx = 0; idx < touched; idx++) {
		platform_tick();
		write_page(c, idx);
	}
	mb_set(c, MB_PAGES_WRITTEN, mb_get(c, MB_PAGES_WRITTEN) + touched);
	for (;;) {
		sleep_us(c->cfg.idle_interval_us);
		mb_set(c, MB_WORK_UNITS, mb_get(c, MB_WORK_UNITS) + 1);
		heartbeat(c);
	}
}

static inline uint64_t xorshift64(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

/* Maps 32 random bits uniformly onto [0, n) for n < 2^32. */
static inline uint64_t below(uint64_t r32, uint64_t n)
{
	return (r32 * n) >> 32;
}

/*
 * Pacing to cfg.rate pages per second: the vCPU sleeps off whatever time it is ahead of the
 * schedule; when it falls far behind (a pause, a long verify, a rate it cannot reach) the
 * schedule restarts from now instead of catching up in a burst.
 */
struct pacer {
	uint64_t tsc_hz, due, due_rem;
};

static struct pacer pacer_start(const struct vcpu *c)
{
	struct pacer p = {c->cfg.tsc_khz * 1000, cpu_tsc(), 0};

	return p;
}

/* Accounts for batch more pages and sleeps if the vCPU is ahead of its schedule. */
static void pace(const struct vcpu *c, struct pacer *p, uint64_t batch)
{
	if (c->cfg.rate == 0)
		return;
	/* due advances by batch/rate seconds in TSC ticks, the remainder carried. */
	uint64_t num = batch * p->tsc_hz + p->due_rem;
	uint64_t step = num / c->cfg.rate;
	uint64_t now = cpu_tsc();

	p->due += step;
	p->due_rem = num % c->cfg.rate;
	/*
	 * Ahead by more than two batches can only mean the TSC went back (a migration to a host
	 * whose TSC is not kept in step): wait one batch, not the jump.
	 */
	if (now < p->due && p->due - now > 2 * step)
		p->due = now + step;
	if (now < p->due) {
		uint64_t ahead = p->due - now, khz = c->cfg.tsc_khz;

		sleep_us(ahead / khz * 1000 + ahead % khz * 1000 / khz);
	} else if (now - p->due > p->tsc_hz / 10) {
		p->due = now;
	}
}

/*
 * Dirty: units of batch_pages page writes at pattern-chosen pages of the working set, each unit
 * ended by a heartbeat. Paced to rate pages per second (pace).
 */
static void __attribute__((noreturn)) run_dirty(struct vcpu *c)
{
	const uint64_t wss = c->wss_pages;
	const uint64_t batch = c->cfg.batch_pages;
	uint64_t hot = wss * c->cfg.hot_permille / 1000;
	uint64_t rng = mix64(c->cfg.seed ^ DOMAIN_PATTERN ^ (c->index * GOLDEN)) | 1;
	uint64_t cursor = 0;
	struct pacer p = pacer_start(c);

	if (hot == 0 && c->cfg.hot_permille != 0)
		hot = 1;
	const uint64_t cold = wss - hot;

	for (;;) {
		switch (c->cfg.pattern) {
		case PATTERN_SEQUENTIAL:
			for (uint64_t j = 0; j < batch; j++) {
				write_page(c, cursor);
				if (++cursor == wss)
					cursor = 0;
			}
			break;
		case PATTERN_RANDOM:
			for (uint64_t j = 0; j < batch; j++)
				write_page(c, below(xorshift64(&rng) >> 32, wss));
			break;
		default: /* PATTERN_HOTCOLD */
			for (uint64_t j = 0; j < batch; j++) {
				uint64_t r = xorshift64(&rng);
				int to_hot = below(r & 0xffffffff, 1000) < c->cfg.hot_prob_permille;

				if (cold == 0 || (to_hot && hot != 0))
					write_page(c, below(r >> 32, hot));
				else
					write_page(c, hot + below(r >> 32, cold));
			}
			break;
		}
		mb_set(c, MB_PAGES_WRITTEN, mb_get(c, MB_PAGES_WRITTEN) + batch);
		mb_set(c, MB_WORK_UNITS, mb_get(c, MB_WORK_UNITS) + 1);
		pace(c, &p, batch);
		heartbeat(c);
	}
}

/* Writes the next version of a churn page: the same content as write_page, flags cleared. */
static void write_churn_page(struct vcpu *c, uint64_t idx)
{
	uint32_t version = (c->versions[idx] & VERSION_MASK) + 1;

	if (version > VERSION_MASK)
		version = 1;
	fill_page(&c->cfg, (uint64_t *)(c->data + idx * PAGE_SIZE), c->data_pfn + idx, version);
	__asm__ volatile("" ::: "memory");
	c->versions[idx] = version;
}

/* Frees a random allocated page: it keeps its content, flagged free. */
static void free_one(struct vcpu *c, uint64_t *rng)
{
	struct allocator *a = c->alloc;

	if (a->free == a->pool)
		return;
	if (a->reporting && a->pending == MB_FREE_MAX)
		flush_pending(c);
	uint64_t i = a->free + below(xorshift64(rng) >> 32, a->pool - a->free);
	uint32_t page = a->slots[i];

	a->slots[i] = a->slots[a->free];
	a->slots[a->free] = page;
	a->free++;
	c->versions[page] |= VERSION_FREE;
	if (a->reporting)
		a->pending++;
}

/*
 * Gives back n balloon pages to the free part (the top of the balloon's slots): they read as
 * zero until written. on_demand: the allocator needed them, rather than the target falling.
 */
static void deflate(struct vcpu *c, uint64_t n, int on_demand)
{
	c->alloc->balloon -= n;
	mb_set(c, MB_BALLOON_PAGES, c->alloc->balloon);
	mb_set(c, MB_BALLOON_DEFLATED, mb_get(c, MB_BALLOON_DEFLATED) + n);
	if (on_demand)
		mb_set(c, MB_BALLOON_DEMAND, mb_get(c, MB_BALLOON_DEMAND) + n);
}

/* Names balloon pages again (CmdBalloonList), up to INFLATE_PER_UNIT per unit of work. */
static void relist(struct vcpu *c)
{
	struct allocator *a = c->alloc;
	/* Deflated pages left from the top of the balloon: they are no longer the balloon's. */
	uint64_t end = a->relist_end < a->balloon ? a->relist_end : a->balloon;
	uint64_t k = a->relist_next < end ? end - a->relist_next : 0;

	if (k > INFLATE_PER_UNIT)
		k = INFLATE_PER_UNIT;
	name_slots(c, PORT_BALLOON_HELD, a->relist_next, k);
	a->relist_next += k;
	if (a->relist_next >= end)
		a->relist_next = a->relist_end = 0;
}

/*
 * Moves up to n free pages that are not pending a report into the balloon and hands them to
 * the VMM, a list at a time; each write returns once the VMM took the list.
 */
static void inflate(struct vcpu *c, uint64_t n)
{
	struct allocator *a = c->alloc;
	uint64_t room = a->free - a->pending - a->balloon;

	if (n > room)
		n = room;
	name_slots(c, PORT_BALLOON_INFLATE, a->balloon, n);
	a->balloon += n;
	mb_set(c, MB_BALLOON_PAGES, a->balloon);
}

/*
 * Brings the balloon toward its target after a unit of work: up to INFLATE_PER_UNIT pages in,
 * or all the way out. An automatic target is a share of the free pages (balloon included).
 */
static void balloon_adjust(struct vcpu *c)
{
	struct allocator *a = c->alloc;
	uint64_t want = a->target;

	if (a->target & BALLOON_AUTO)
		want = a->free * (a->target & ~BALLOON_AUTO) / 1000;
	if (want > a->pool)
		want = a->pool;
	if (c->cfg.tsc_khz != 0) {
		uint64_t now = cpu_tsc();

		if (now - a->window_tsc >= c->cfg.tsc_khz * BALLOON_WINDOW_MS) {
			a->free_min_last = a->free_min_now;
			a->free_min_now = a->free;
			a->window_tsc = now;
		}
		if (a->free < a->free_min_now)
			a->free_min_now = a->free;
		if (want > a->free_min_now)
			want = a->free_min_now;
		if (want > a->free_min_last)
			want = a->free_min_last;
	}
	if (want < a->balloon)
		deflate(c, a->balloon - want, 0);
	else if (want > a->balloon)
		inflate(c, want - a->balloon < INFLATE_PER_UNIT ? want - a->balloon : INFLATE_PER_UNIT);
}

/*
 * Allocates a random free page that is neither the balloon's nor pending a report, and writes
 * it; with none left it reports the pending ones, then deflates the balloon a little. The
 * pending block stays at the top of the free part: the last allocatable slot fills the taken
 * one's place, the top pending slot moves down into the allocatable part's new end, and the
 * page takes the top.
 */
static void alloc_one(struct vcpu *c, uint64_t *rng)
{
	struct allocator *a = c->alloc;

	if (a->free - a->pending == a->balloon && a->pending > 0)
		flush_pending(c);
	if (a->free == a->balloon && a->balloon > 0)
		deflate(c, a->balloon < DEFLATE_ON_DEMAND ? a->balloon : DEFLATE_ON_DEMAND, 1);
	if (a->free == 0)
		return;
	uint64_t reported = a->free - a->pending;
	uint64_t j = a->balloon + below(xorshift64(rng) >> 32, reported - a->balloon);
	uint32_t page = a->slots[j];

	a->slots[j] = a->slots[reported - 1];
	a->slots[reported - 1] = a->slots[a->free - 1];
	a->slots[a->free - 1] = page;
	a->free--;
	write_churn_page(c, page);
}

/*
 * Churn: an OS's page allocator in miniature. At start every pool page is allocated and
 * written, then all but touch_permille/1000 of them are freed at random, keeping their
 * content. Each unit of work then frees batch_pages random allocated pages and allocates and
 * writes as many random free ones, paced to rate allocations per second. With a peak above
 * touch the allocated share swings instead: units that only allocate until it reaches
 * peak_permille/1000, then units that only free until it is back at touch. Once the VMM asks
 * (CmdReportFree) the vCPU reports its free pages, and from then on every page it frees.
 */
static void __attribute__((noreturn)) run_churn(struct vcpu *c)
{
	struct allocator a = {0};
	uint64_t rng = mix64(c->cfg.seed ^ DOMAIN_CHURN ^ (c->index * GOLDEN)) | 1;
	const uint64_t batch = c->cfg.batch_pages;

	a.slots = (uint32_t *)c->data;
	a.meta_pages = (c->data_pages * 4 + PAGE_SIZE - 1) / PAGE_SIZE;
	a.pool = c->data_pages - a.meta_pages;
	for (uint64_t i = 0; i < a.pool; i++) {
		platform_tick();
		a.slots[i] = (uint32_t)(a.meta_pages + i);
		write_churn_page(c, a.meta_pages + i);
	}
	a.free_min_now = a.free_min_last = ~0ULL; /* no history yet: the first window is now */
	c->alloc = &a;
	uint64_t keep = a.pool * c->cfg.touch_permille / 1000;

	uint64_t peak = a.pool * c->cfg.peak_permille / 1000;
	int growing = 1;

	while (a.pool - a.free > keep)
		free_one(c, &rng);
	mb_set(c, MB_PAGES_WRITTEN, mb_get(c, MB_PAGES_WRITTEN) + a.pool);

	struct pacer p = pacer_start(c);

	for (;;) {
		uint64_t used = a.pool - a.free;

		if (used >= peak)
			growing = 0;
		else if (used <= keep)
			growing = 1;
		for (uint64_t j = 0; j < batch; j++) {
			if (peak <= keep || !growing)
				free_one(c, &rng);
			if (peak <= keep || growing)
				alloc_one(c, &rng);
		}
		if (a.target != 0 || a.balloon != 0)
			balloon_adjust(c);
		if (a.relist_end != 0)
			relist(c);
		mb_set(c, MB_PAGES_WRITTEN, mb_get(c, MB_PAGES_WRITTEN) + batch);
		mb_set(c, MB_WORK_UNITS, mb_get(c, MB_WORK_UNITS) + 1);
		pace(c, &p, batch);
		heartbeat(c);
	}
}

static inline uint64_t par_u64(const uint8_t *base, uint64_t off)
{
	return *(const volatile uint64_t *)(base + off);
}

static void start_message(struct vcpu *c)
{
	struct text t = {c->console, 0};

	text_str(&t, "godwit guest: ");
	text_u64(&t, c->cfg.nr_vcpus);
	text_str(&t, c->cfg.nr_vcpus == 1 ? " vcpu, workload " : " vcpus, workload ");
	text_str(&t, workload_name(c->cfg.workload));
	text_str(&t, ", content ");
	text_str(&t, content_name(c->cfg.content));
	if (c->cfg.workload == WORKLOAD_DIRTY) {
		text_str(&t, ", pattern ");
		text_str(&t, pattern_name(c->cfg.pattern));
		text_str(&t, ", wss ");
		text_u64(&t, c->wss_pages);
		text_str(&t, " of ");
	} else if (c->cfg.workload == WORKLOAD_CHURN) {
		text_str(&t, ", ");
		text_u64(&t, c->cfg.touch_permille);
		if (c->cfg.peak_permille > c->cfg.touch_permille) {
			text_str(&t, " to ");
			text_u64(&t, c->cfg.peak_permille);
		}
		text_str(&t, " per mille in use of ");
	} else {
		text_str(&t, ", ");
	}
	text_u64(&t, c->data_pages);
	text_str(&t, " data pages per vcpu");
	port_out32(PORT_CONSOLE, t.len);
}

/*
 * Entry of every vCPU (entry.S jumps here): index is the vCPU number, params_gpa the params
 * page. Validates what it is given and runs the workload; it never returns.
 */
void __attribute__((noreturn)) guest_main(uint64_t index, uint64_t params_gpa)
{
	const uint8_t *par = gpa_ptr(params_gpa);
	struct vcpu c = {0};

	/* Until the record is checked, panic through the mailbox the fixed layout gives. */
	c.index = index;
	c.mailbox = gpa_ptr(MAILBOX_GPA + (index % MAX_VCPUS) * PAGE_SIZE);
	c.console = (char *)c.mailbox + MB_CONSOLE;

	if (par_u64(par, PAR_MAGIC) != PARAMS_MAGIC)
		panic_value(&c, "bad params magic", par_u64(par, PAR_MAGIC));
	if (par_u64(par, PAR_ABI_VERSION) != ABI_VERSION)
		panic_value(&c, "params ABI version is not 1:", par_u64(par, PAR_ABI_VERSION));

	c.cfg.nr_vcpus = par_u64(par, PAR_NR_VCPUS);
	c.cfg.tsc_khz = par_u64(par, PAR_TSC_KHZ);
	c.cfg.workload = par_u64(par, PAR_WORKLOAD);
	c.cfg.content = par_u64(par, PAR_CONTENT);
	c.cfg.pattern = par_u64(par, PAR_PATTERN);
	c.cfg.seed = par_u64(par, PAR_SEED);
	c.cfg.rate = par_u64(par, PAR_RATE);
	c.cfg.batch_pages = par_u64(par, PAR_BATCH_PAGES);
	c.cfg.touch_permille = par_u64(par, PAR_TOUCH_PERMILLE);
	c.cfg.idle_interval_us = par_u64(par, PAR_IDLE_INTERVAL_US);
	c.cfg.hot_permille = par_u64(par, PAR_HOT_PERMILLE);
	c.cfg.hot_prob_permille = par_u64(par, PAR_HOT_PROB_PERMILLE);
	c.cfg.image_pool_pages = par_u64(par, PAR_IMAGE_POOL_PAGES);
	c.cfg.peak_permille = par_u64(par, PAR_PEAK_PERMILLE);
	c.cfg.private_permille = par_u64(par, PAR_PRIVATE_PERMILLE);
	c.cfg.near_permille = par_u64(par, PAR_NEAR_PERMILLE);
	c.cfg.private_seed = par_u64(par, PAR_PRIVATE_SEED);

	if (c.cfg.nr_vcpus == 0 || c.cfg.nr_vcpus > MAX_VCPUS)
		panic_value(&c, "bad vcpu count", c.cfg.nr_vcpus);
	if (index >= c.cfg.nr_vcpus)
		panic_value(&c, "vcpu index beyond the vcpu count", c.cfg.nr_vcpus);

	const uint8_t *rec = par + PARAMS_VCPU_OFFSET + index * PARAMS_VCPU_RECORD;
	uint64_t vt_gpa = par_u64(rec, VCPU_VERSION_TABLE_GPA);
	uint64_t data_gpa = par_u64(rec, VCPU_DATA_GPA);
	uint64_t mailbox_gpa = par_u64(rec, VCPU_MAILBOX_GPA);

	if (mailbox_gpa % PAGE_SIZE != 0 || mailbox_gpa < MAILBOX_GPA ||
	    mailbox_gpa >= MAILBOX_GPA + MAX_VCPUS * PAGE_SIZE)
		panic_value(&c, "bad mailbox address", mailbox_gpa);
	c.mailbox = gpa_ptr(mailbox_gpa);
	c.console = (char *)c.mailbox + MB_CONSOLE;
	c.data_pages = par_u64(rec, VCPU_DATA_PAGES);
	c.wss_pages = par_u64(rec, VCPU_WSS_PAGES);
	c.data_pfn = data_gpa / PAGE_SIZE;

	if (c.cfg.workload > WORKLOAD_CHURN)
		panic_value(&c, "unknown workload", c.cfg.workload);
	if (c.cfg.content > CONTENT_PATCH)
		panic_value(&c, "unknown content kind", c.cfg.content);
	if (c.cfg.pattern > PATTERN_HOTCOLD)
		panic_value(&c, "unknown write pattern", c.cfg.pattern);
	if (c.cfg.touch_permille > 1000)
		panic_value(&c, "touch per mille above 1000:", c.cfg.touch_permille);
	if (c.cfg.private_permille > 1000 || c.cfg.near_permille > 1000 - c.cfg.private_permille)
		panic_value(&c, "private and near-duplicate per mille above 1000:",
			    c.cfg.private_permille + c.cfg.near_permille);
	if (c.cfg.hot_permille > 1000)
		panic_value(&c, "hot per mille above 1000:", c.cfg.hot_permille);
	if (c.cfg.peak_permille > 1000)
		panic_value(&c, "peak per mille above 1000:", c.cfg.peak_permille);
	if (c.cfg.hot_prob_permille > 1000)
		panic_value(&c, "hot probability per mille above 1000:", c.cfg.hot_prob_permille);
	if (c.cfg.content == CONTENT_IMAGE &&
	    (c.cfg.image_pool_pages == 0 || c.cfg.image_pool_pages > 0xffffffffULL))
		panic_value(&c, "bad image pool size", c.cfg.image_pool_pages);
	if (data_gpa % PAGE_SIZE != 0 || data_gpa < DATA_GPA)
		panic_value(&c, "bad data address", data_gpa);
	if (vt_gpa % 4 != 0 || vt_gpa < DATA_GPA)
		panic_value(&c, "bad version table address", vt_gpa);
	if (c.data_pages == 0 || c.data_pages > (1ULL << 24))
		panic_value(&c, "bad data page count", c.data_pages);
	if (c.cfg.workload == WORKLOAD_DIRTY && (c.wss_pages == 0 || c.wss_pages > c.data_pages))
		panic_value(&c, "bad working set size (pages)", c.wss_pages);
	if (c.cfg.workload == WORKLOAD_CHURN && c.data_pages < 2)
		panic_value(&c, "churn needs 2 data pages at least, has", c.data_pages);
	if (c.cfg.workload != WORKLOAD_IDLE) {
		if (c.cfg.batch_pages == 0 || c.cfg.batch_pages > (1ULL << 24))
			panic_value(&c, "bad batch size (pages)", c.cfg.batch_pages);
		if (c.cfg.rate > MAX_RATE)
			panic_value(&c, "rate above 2^32 pages/s:", c.cfg.rate);
		if (c.cfg.rate != 0 && (c.cfg.tsc_khz == 0 || c.cfg.tsc_khz > MAX_TSC_KHZ))
			panic_value(&c, "a rate needs the TSC frequency; tsc_khz is", c.cfg.tsc_khz);
	}
	c.versions = gpa_ptr(vt_gpa);
	c.data = gpa_ptr(data_gpa);

	if (index == 0)
		start_message(&c);
	if (c.cfg.workload == WORKLOAD_IDLE)
		run_idle(&c);
	if (c.cfg.workload == WORKLOAD_CHURN)
		run_churn(&c);
	run_dirty(&c);
}
