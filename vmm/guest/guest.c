// SPDX-License-Identifier: MIT
/*
 * guest.c - the freestanding test guest of ferry's reference VMM.
 *
 * The guest is a single 64-bit function running at CPL 3 on an identity
 * map; there is no OS, no firmware, no interrupt handling and no ring-0
 * code (under software virtualization ring-0 code is emulated and roughly
 * a thousand times slower, ring 3 runs natively).  It talks to the VMM
 * through two pages described in layout.h: it polls the command block and
 * keeps the status block current.
 *
 * Workloads:
 *   idle   - exit to the VMM (GUEST_MMIO_IDLE doorbell) so it can sleep
 *   fill   - write every data page once, then behave as idle
 *   dirty  - rewrite pages of the working set, sequentially or at random,
 *            paced to rate_mbps using the TSC (0 = flat out)
 *
 * Every page write takes the next value of a global generation counter,
 * stamps the page with (index, generation) followed by a pattern derived
 * from both, and records the generation in gen[index].  A verify pass
 * recomputes each page from gen[] and reports mismatches; it runs when the
 * VMM increments cmd.verify_seq.  Because gen[] and the pages live in guest
 * RAM, a migration that loses or tears a page is caught on the destination.
 *
 * All state the guest needs lives in its RAM (globals, stack, the two
 * blocks, gen[]), so it survives migration as long as RAM and vCPU state do.
 * The rate pacer tolerates the TSC jump across a migration: it never tries
 * to catch up on more than PACE_SLACK_MS of lost time.
 */
#define FERRY_GUEST 1
#include "layout.h"

#include <stddef.h>

typedef uint8_t u8;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t s64;

#define READ_ONCE(x)		(*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v)	(*(volatile __typeof__(x) *)&(x) = (v))
#define barrier()		__asm__ __volatile__("" ::: "memory")

#define DIRTY_BATCH	16	/* pages written between command checks */
#define FILL_BATCH	64
#define PACE_SLACK_MS	100	/* most lost time the pacer makes up */
#define IDLE_EXIT_US	200	/* waits at least this long exit to the VMM */

static struct guest_status *const status =
	(struct guest_status *)GUEST_STATUS_GPA;
static const struct guest_cmd *const cmd =
	(const struct guest_cmd *)GUEST_CMD_GPA;
static u64 *const gen_table = (u64 *)GUEST_GEN_GPA;

/* Workload parameters, latched from the command block. */
struct work {
	u32 kind;
	u32 pattern;
	u64 ws_pages;
	u64 rate_mbps;
	u32 throttle_pct;
	u64 rng;		/* xorshift64 state for the random pattern */
	u64 cursor;		/* next page for seq pattern and fill */
	u64 tsc_hz;		/* the value cycles_per_page was computed for */
	u64 cycles_per_page;	/* 0 = no pacing */
	u64 next_tsc;		/* pacer deadline for the next page */
};

static struct work work;
static u64 data_pages;
static u64 generation;

/*
 * gcc may emit calls to these even with -ffreestanding, and the guest has
 * no libc.  They are written with string instructions so that gcc cannot
 * recognise the loop and turn it back into a call to itself.
 */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;

	__asm__ __volatile__("rep stosb"
			     : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;

	__asm__ __volatile__("rep movsb"
			     : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;

	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
	__asm__ __volatile__("pause" ::: "memory");
}

/*
 * Ring a doorbell: a 32-bit store to the unbacked MMIO window exits to the
 * VMM (KVM_EXIT_MMIO).  A plain `mov` from a register keeps KVM's
 * instruction emulator on its simplest path.
 */
static inline void doorbell(u64 gpa, u32 val)
{
	__asm__ __volatile__("movl %0, (%1)" : : "r"(val), "r"(gpa) : "memory");
}

static __attribute__((noreturn)) void panic(u32 code, const char *msg)
{
	size_t i;

	for (i = 0; msg[i] && i < sizeof(status->panic_msg) - 1; i++)
		status->panic_msg[i] = (u8)msg[i];
	status->panic_msg[i] = 0;
	WRITE_ONCE(status->panic_code, code);
	barrier();
	WRITE_ONCE(status->state, GUEST_STATE_PANIC);
	for (;;)
		doorbell(GUEST_MMIO_PANIC, code);
}

#define GUEST_ASSERT(cond)						\
	do {								\
		if (!(cond))						\
			panic(GUEST_PANIC_ASSERT, "assert: " #cond);	\
	} while (0)

/* splitmix64 finalizer: a cheap bijective 64-bit mixer. */
static inline u64 mix64(u64 x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return x;
}

static inline u64 xorshift64(u64 x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

/* Seed of a page's pattern; never 0, which is a fixed point of xorshift. */
static inline u64 page_seed(u64 idx, u64 gen)
{
	return mix64(idx * 0x9e3779b97f4a7c15ULL ^ mix64(gen)) | 1;
}

static inline u64 *page_ptr(u64 idx)
{
	return (u64 *)(GUEST_DATA_GPA + idx * GUEST_PAGE_SIZE);
}

/*
 * Page contents for (idx, gen):
 *   word 0        idx
 *   word 1        gen
 *   words 2..255  xorshift64 stream seeded from (idx, gen): incompressible
 *   words 256..511 the last stream value, repeated: compresses to nothing
 */
static void page_write(u64 idx)
{
	u64 *p = page_ptr(idx);
	u64 gen = ++generation;
	u64 x = page_seed(idx, gen);
	u64 i;

	p[0] = idx;
	p[1] = gen;
	for (i = GUEST_PAGE_HDR_WORDS; i < GUEST_PAGE_RANDOM_END; i++) {
		x = xorshift64(x);
		p[i] = x;
	}
	for (; i < GUEST_PAGE_WORDS; i++)
		p[i] = x;

	gen_table[idx] = gen;
	WRITE_ONCE(status->generation, gen);
}

/* True if page idx holds exactly what gen[idx] says it should. */
static int page_ok(u64 idx)
{
	const u64 *p = page_ptr(idx);
	u64 gen = gen_table[idx];
	u64 diff = 0, x, i;

	if (gen == 0) {
		/* Never written: must still be zero. */
		for (i = 0; i < GUEST_PAGE_WORDS; i++)
			diff |= p[i];
		return diff == 0;
	}

	if (p[0] != idx || p[1] != gen)
		return 0;
	x = page_seed(idx, gen);
	for (i = GUEST_PAGE_HDR_WORDS; i < GUEST_PAGE_RANDOM_END; i++) {
		x = xorshift64(x);
		diff |= p[i] ^ x;
	}
	for (; i < GUEST_PAGE_WORDS; i++)
		diff |= p[i] ^ x;
	return diff == 0;
}

static void verify(u64 seq)
{
	u64 start = rdtsc();
	u64 bad = 0, first = GUEST_NO_PAGE, last = GUEST_NO_PAGE;
	u64 idx;

	WRITE_ONCE(status->state, GUEST_STATE_VERIFY);
	for (idx = 0; idx < data_pages; idx++) {
		if (page_ok(idx))
			continue;
		if (!bad)
			first = idx;
		last = idx;
		bad++;
	}

	WRITE_ONCE(status->verify_pages, data_pages);
	WRITE_ONCE(status->bad_pages, bad);
	WRITE_ONCE(status->first_bad_page, first);
	WRITE_ONCE(status->last_bad_page, last);
	WRITE_ONCE(status->verify_cycles, rdtsc() - start);
	WRITE_ONCE(status->verify_passes, status->verify_passes + 1);
	/* Publish the results before the sequence number the VMM waits on. */
	barrier();
	WRITE_ONCE(status->verify_seq, seq);
}

/* Recompute the pacer when the rate or the TSC frequency changes. */
static void pace_update(void)
{
	u64 hz = READ_ONCE(cmd->tsc_hz);

	if (hz == work.tsc_hz && work.next_tsc)
		return;
	work.tsc_hz = hz;
	if (!work.rate_mbps || !hz)
		work.cycles_per_page = 0;
	else
		work.cycles_per_page =
			hz * GUEST_PAGE_SIZE / (work.rate_mbps << 20) ?: 1;
	work.next_tsc = rdtsc();
}

static void apply_cmd(u64 seq)
{
	u64 ws;

	work.kind = READ_ONCE(cmd->workload);
	work.pattern = READ_ONCE(cmd->pattern);
	ws = READ_ONCE(cmd->ws_pages);
	work.ws_pages = (!ws || ws > data_pages) ? data_pages : ws;
	work.rate_mbps = READ_ONCE(cmd->rate_mbps);
	work.throttle_pct = READ_ONCE(cmd->throttle_pct);
	if (work.throttle_pct > 99)
		work.throttle_pct = 99;
	work.rng = mix64(READ_ONCE(cmd->seed) ?: 0x5eed) | 1;
	work.cursor = 0;
	work.tsc_hz = 0;
	work.next_tsc = 0;
	pace_update();

	WRITE_ONCE(status->workload, work.kind);
	WRITE_ONCE(status->cmd_seq, seq);
}

/* True when the VMM has something new for us. */
static inline int cmd_pending(void)
{
	return READ_ONCE(cmd->seq) != status->cmd_seq ||
	       READ_ONCE(cmd->verify_seq) != status->verify_seq;
}

/*
 * Wait until the TSC reaches deadline, or a command arrives.  Long waits
 * exit to the VMM so it can sleep instead of letting us spin.
 */
static void wait_until(u64 deadline)
{
	for (;;) {
		u64 now = rdtsc(), us;

		if ((s64)(deadline - now) <= 0 || cmd_pending())
			return;
		us = work.tsc_hz ? (deadline - now) * 1000000 / work.tsc_hz : 0;
		if (us >= IDLE_EXIT_US)
			doorbell(GUEST_MMIO_IDLE,
			     us > GUEST_IDLE_MAX_US ? GUEST_IDLE_MAX_US : (u32)us);
		else
			cpu_relax();
	}
}

/* Rate pacing: called before each page write of the dirty workload. */
static void pace(void)
{
	u64 now, slack;

	if (!work.cycles_per_page)
		return;
	now = rdtsc();
	slack = work.tsc_hz / 1000 * PACE_SLACK_MS;
	/*
	 * Behind by more than the slack (a pause, a migration): forget the
	 * debt instead of writing in a burst.
	 */
	if ((s64)(now - work.next_tsc) > (s64)slack)
		work.next_tsc = now;
	wait_until(work.next_tsc);
	work.next_tsc += work.cycles_per_page;
}

/* Spend pct% of the time waiting, given the cycles just spent working. */
static void throttle(u64 busy_cycles)
{
	u64 pct = work.throttle_pct;

	if (pct)
		wait_until(rdtsc() + busy_cycles * pct / (100 - pct));
}

static u64 next_dirty_page(void)
{
	u64 idx;

	if (work.pattern == GUEST_PATTERN_RANDOM) {
		work.rng = xorshift64(work.rng);
		/* Multiply-shift range reduction: no division, no bias to speak of. */
		return (u64)(((unsigned __int128)work.rng * work.ws_pages) >> 64);
	}
	idx = work.cursor;
	if (++work.cursor >= work.ws_pages)
		work.cursor = 0;
	return idx;
}

static void do_dirty(void)
{
	u64 start = rdtsc();
	int i;

	WRITE_ONCE(status->state, GUEST_STATE_DIRTY);
	for (i = 0; i < DIRTY_BATCH; i++) {
		pace();
		page_write(next_dirty_page());
	}
	throttle(rdtsc() - start);
}

static void do_fill(void)
{
	u64 start = rdtsc();
	int i;

	if (work.cursor >= data_pages) {
		WRITE_ONCE(status->state, GUEST_STATE_IDLE);
		doorbell(GUEST_MMIO_IDLE, GUEST_IDLE_MAX_US);
		return;
	}

	WRITE_ONCE(status->state, GUEST_STATE_FILL);
	for (i = 0; i < FILL_BATCH && work.cursor < data_pages; i++)
		page_write(work.cursor++);
	if (work.cursor == data_pages)
		WRITE_ONCE(status->fill_passes, status->fill_passes + 1);
	throttle(rdtsc() - start);
}

static __attribute__((noreturn)) void guest_main(void)
{
	if (READ_ONCE(cmd->magic) != GUEST_CMD_MAGIC ||
	    READ_ONCE(cmd->version) != GUEST_LAYOUT_VERSION)
		panic(GUEST_PANIC_BAD_CMD, "bad command block magic/version");

	data_pages = READ_ONCE(cmd->data_pages);
	if (!data_pages || data_pages > GUEST_GEN_ENTRIES)
		panic(GUEST_PANIC_BAD_LAYOUT, "data_pages out of range");

	status->version = GUEST_LAYOUT_VERSION;
	status->data_pages = data_pages;
	status->first_bad_page = GUEST_NO_PAGE;
	status->last_bad_page = GUEST_NO_PAGE;
	status->state = GUEST_STATE_IDLE;
	barrier();
	WRITE_ONCE(status->magic, GUEST_STATUS_MAGIC);

	for (;;) {
		u64 seq;

		WRITE_ONCE(status->heartbeat, status->heartbeat + 1);
		WRITE_ONCE(status->tsc, rdtsc());

		seq = READ_ONCE(cmd->seq);
		if (seq != status->cmd_seq)
			apply_cmd(seq);
		pace_update();

		seq = READ_ONCE(cmd->verify_seq);
		if (seq != status->verify_seq)
			verify(seq);

		switch (work.kind) {
		case GUEST_WORK_FILL:
			do_fill();
			break;
		case GUEST_WORK_DIRTY:
			do_dirty();
			break;
		default:
			WRITE_ONCE(status->state, GUEST_STATE_IDLE);
			doorbell(GUEST_MMIO_IDLE, GUEST_IDLE_MAX_US);
			break;
		}
	}
}

/*
 * Entry point, placed first in the image by guest.ld.  The VMM starts us
 * with RSP = GUEST_INITIAL_RSP, as if we had been called.  The image's
 * .bss is not part of the flat binary, so clear it before anything else;
 * nothing has touched it yet.
 */
void _start(void);
extern u8 __bss_start[], __bss_end[];	/* from guest.ld */

__attribute__((section(".text.entry"), noreturn, used))
void _start(void)
{
	memset(__bss_start, 0, (size_t)(__bss_end - __bss_start));
	barrier();
	guest_main();
}
