/* SPDX-License-Identifier: MIT */
/*
 * workload.h - the test guest's workload, shared by its two platforms.
 *
 * One copy of the logic, compiled twice:
 *   - freestanding into the KVM guest (guest.c), where guest RAM starts at
 *     address 0 (base = 0);
 *   - hosted into the VMM's thread backend (backend-thread.c), where host
 *     threads run it over the host mapping of guest RAM (base = that
 *     mapping).
 * Hence: static inline functions only, no libc, no globals, and every
 * access to guest memory goes through a struct wl_ctx built from `base`.
 *
 * All mutable workload state is in guest RAM (struct guest_work at
 * GUEST_WORK_GPA, the status block, gen[]), so the workload is resumable
 * from RAM alone: wl_run() on RAM whose status.magic is already set skips
 * first-boot initialisation and carries on with the latched workload.  The
 * only state outside RAM is transient (loop locals: a verify pass in
 * progress, a pacing wait), and losing it just restarts that step.
 *
 * Platform hooks.  The includer defines these three static functions
 * (after including this file):
 *
 *   void wl_plat_idle(struct wl_ctx *c, uint32_t us)
 *       The workload intends to wait about `us` microseconds.  Guest: ring
 *       the GUEST_MMIO_IDLE doorbell.  Host: sleep up to that long, waking
 *       early for a pause or stop request.
 *   void wl_plat_poll(struct wl_ctx *c)
 *       A safe point: called between page writes (never inside one) and in
 *       every wait loop.  Guest: nothing.  Host: park here while a pause is
 *       requested; set c->stop when the vCPU must exit.
 *   void wl_plat_panic(struct wl_ctx *c, uint32_t code)
 *       The status block already holds the panic.  Guest: never returns.
 *       Host: record it and set c->stop.
 *
 * Every loop checks c->stop after a hook and returns, so in the host a
 * stop unwinds all the way out of wl_run().  In the guest it is never set.
 *
 * Memory ordering: the VMM reads the status block while the workload runs.
 * Fields are naturally aligned 32/64-bit words written with WL_WRITE_ONCE,
 * and where order matters (results before verify_seq, everything before
 * status.magic) a compiler barrier suffices: x86 stores are not reordered
 * with each other (TSO).  This file is x86-64 only (rdtsc, pause).
 */
#ifndef FERRY_VMM_GUEST_WORKLOAD_H
#define FERRY_VMM_GUEST_WORKLOAD_H

#include <stddef.h>
#include <stdint.h>

#include "layout.h"

/*
 * The guest's own code is outside the VMM's memory model: on KVM no
 * sanitizer sees it, and hosted it must not be seen either, or every page
 * the migration copies while the guest rewrites it (by design: the dirty log
 * sends it again) is a ThreadSanitizer report.
 */
#if defined(__SANITIZE_THREAD__)
#define WL_GUEST __attribute__((no_sanitize_thread))
#else
#define WL_GUEST
#endif

#define WL_READ_ONCE(x)		(*(const volatile __typeof__(x) *)&(x))
#define WL_WRITE_ONCE(x, v)	(*(volatile __typeof__(x) *)&(x) = (v))
#define wl_barrier()		__asm__ __volatile__("" ::: "memory")

#define WL_DIRTY_BATCH	16	/* pages written between command checks */
#define WL_FILL_BATCH	64
#define WL_PACE_SLACK_MS 100	/* most lost time the pacer makes up */
#define WL_IDLE_EXIT_US	200	/* waits at least this long use the idle hook */

/*
 * One vCPU's view of the guest.  Owned by the thread (or vCPU) running
 * it; nobody else touches it.  The pointers are derived from base once.
 */
struct wl_ctx {
	uintptr_t base;		/* host address of GPA 0 (0 in the guest) */
	uint32_t cpu;		/* vCPU index; 0 runs the workload */
	int stop;		/* set by hooks: unwind out of wl_run() */
	struct guest_status *status;
	const struct guest_cmd *cmd;
	struct guest_work *work;
	uint64_t *gen;		/* generation table, one entry per data page */
	void *plat;		/* the platform's per-vCPU cookie */
};

static void wl_plat_idle(struct wl_ctx *c, uint32_t us);
static void wl_plat_poll(struct wl_ctx *c);
static void wl_plat_panic(struct wl_ctx *c, uint32_t code);

WL_GUEST static inline void wl_ctx_init(struct wl_ctx *c, uintptr_t base, uint32_t cpu,
			       void *plat)
{
	c->base = base;
	c->cpu = cpu;
	c->stop = 0;
	/* Integer arithmetic, then a cast: no pointer arithmetic on NULL. */
	c->status = (struct guest_status *)(base + GUEST_STATUS_GPA);
	c->cmd = (const struct guest_cmd *)(base + GUEST_CMD_GPA);
	c->work = (struct guest_work *)(base + GUEST_WORK_GPA);
	c->gen = (uint64_t *)(base + GUEST_GEN_GPA);
	c->plat = plat;
}

/* rdtsc needs no privilege, so it works in the guest and in host threads. */
WL_GUEST static inline uint64_t wl_rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

WL_GUEST static inline void wl_cpu_relax(void)
{
	__asm__ __volatile__("pause" ::: "memory");
}

/* Record a panic in the status block, then let the platform act on it. */
WL_GUEST static inline void wl_panic(struct wl_ctx *c, uint32_t code, const char *msg)
{
	struct guest_status *st = c->status;
	size_t i;

	for (i = 0; msg[i] && i < sizeof(st->panic_msg) - 1; i++)
		st->panic_msg[i] = (uint8_t)msg[i];
	st->panic_msg[i] = 0;
	WL_WRITE_ONCE(st->panic_code, code);
	wl_barrier();
	WL_WRITE_ONCE(st->state, GUEST_STATE_PANIC);
	wl_plat_panic(c, code);
}

/* ---- page contents ---------------------------------------------------- */

/* splitmix64 finalizer: a cheap bijective 64-bit mixer. */
WL_GUEST static inline uint64_t wl_mix64(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return x;
}

WL_GUEST static inline uint64_t wl_xorshift64(uint64_t x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

/* Seed of a page's pattern; never 0, which is a fixed point of xorshift. */
WL_GUEST static inline uint64_t wl_page_seed(uint64_t idx, uint64_t gen)
{
	return wl_mix64(idx * 0x9e3779b97f4a7c15ULL ^ wl_mix64(gen)) | 1;
}

WL_GUEST static inline uint64_t *wl_page_ptr(const struct wl_ctx *c, uint64_t idx)
{
	return (uint64_t *)(c->base + GUEST_DATA_GPA + idx * GUEST_PAGE_SIZE);
}

/*
 * Page contents for (idx, gen):
 *   word 0         idx
 *   word 1         gen
 *   words 2..255   xorshift64 stream seeded from (idx, gen): incompressible
 *   words 256..511 the last stream value, repeated: compresses to nothing
 * The generation is taken before the page is written and gen[] updated
 * after it, so a snapshot taken between two page writes is consistent.
 */
WL_GUEST static inline void wl_page_write(struct wl_ctx *c, uint64_t idx)
{
	uint64_t *p = wl_page_ptr(c, idx);
	uint64_t gen = ++c->work->generation;
	uint64_t x = wl_page_seed(idx, gen);
	uint64_t i;

	p[0] = idx;
	p[1] = gen;
	for (i = GUEST_PAGE_HDR_WORDS; i < GUEST_PAGE_RANDOM_END; i++) {
		x = wl_xorshift64(x);
		p[i] = x;
	}
	for (; i < GUEST_PAGE_WORDS; i++)
		p[i] = x;

	c->gen[idx] = gen;
	WL_WRITE_ONCE(c->status->generation, gen);
}

/* True if page idx holds exactly what gen[idx] says it should. */
WL_GUEST static inline int wl_page_ok(const struct wl_ctx *c, uint64_t idx)
{
	const uint64_t *p = wl_page_ptr(c, idx);
	uint64_t gen = c->gen[idx];
	uint64_t diff = 0, x, i;

	if (gen == 0) {
		/* Never written: must still be zero. */
		for (i = 0; i < GUEST_PAGE_WORDS; i++)
			diff |= p[i];
		return diff == 0;
	}

	if (p[0] != idx || p[1] != gen)
		return 0;
	x = wl_page_seed(idx, gen);
	for (i = GUEST_PAGE_HDR_WORDS; i < GUEST_PAGE_RANDOM_END; i++) {
		x = wl_xorshift64(x);
		diff |= p[i] ^ x;
	}
	for (; i < GUEST_PAGE_WORDS; i++)
		diff |= p[i] ^ x;
	return diff == 0;
}

/*
 * Verify every data page and publish the result under sequence number seq.
 * A pause may park us between pages; a stop abandons the pass unpublished
 * (a resumed guest sees verify_seq still pending and starts over).
 */
WL_GUEST static inline void wl_verify(struct wl_ctx *c, uint64_t seq)
{
	struct guest_status *st = c->status;
	uint64_t n = c->work->data_pages;
	uint64_t start = wl_rdtsc();
	uint64_t bad = 0, first = GUEST_NO_PAGE, last = GUEST_NO_PAGE;
	uint64_t idx;

	WL_WRITE_ONCE(st->state, GUEST_STATE_VERIFY);
	for (idx = 0; idx < n; idx++) {
		wl_plat_poll(c);
		if (c->stop)
			return;
		if (wl_page_ok(c, idx))
			continue;
		if (!bad)
			first = idx;
		last = idx;
		bad++;
	}

	WL_WRITE_ONCE(st->verify_pages, n);
	WL_WRITE_ONCE(st->bad_pages, bad);
	WL_WRITE_ONCE(st->first_bad_page, first);
	WL_WRITE_ONCE(st->last_bad_page, last);
	WL_WRITE_ONCE(st->verify_cycles, wl_rdtsc() - start);
	WL_WRITE_ONCE(st->verify_passes, st->verify_passes + 1);
	/* Publish the results before the sequence number the VMM waits on. */
	wl_barrier();
	WL_WRITE_ONCE(st->verify_seq, seq);
}

/* ---- pacing ----------------------------------------------------------- */

/* Recompute the pacer when the rate or the TSC frequency changes. */
WL_GUEST static inline void wl_pace_update(struct wl_ctx *c)
{
	struct guest_work *w = c->work;
	uint64_t hz = WL_READ_ONCE(c->cmd->tsc_hz);

	if (hz == w->tsc_hz && w->next_tsc)
		return;
	w->tsc_hz = hz;
	if (!w->rate_mbps || !hz)
		w->cycles_per_page = 0;
	else
		w->cycles_per_page =
			hz * GUEST_PAGE_SIZE / (w->rate_mbps << 20) ?: 1;
	w->next_tsc = wl_rdtsc();
}

WL_GUEST static inline void wl_apply_cmd(struct wl_ctx *c, uint64_t seq)
{
	const struct guest_cmd *cmd = c->cmd;
	struct guest_work *w = c->work;
	uint64_t ws;

	w->kind = WL_READ_ONCE(cmd->workload);
	w->pattern = WL_READ_ONCE(cmd->pattern);
	ws = WL_READ_ONCE(cmd->ws_pages);
	w->ws_pages = (!ws || ws > w->data_pages) ? w->data_pages : ws;
	w->rate_mbps = WL_READ_ONCE(cmd->rate_mbps);
	w->throttle_pct = WL_READ_ONCE(cmd->throttle_pct);
	if (w->throttle_pct > 99)
		w->throttle_pct = 99;
	w->rng = wl_mix64(WL_READ_ONCE(cmd->seed) ?: 0x5eed) | 1;
	w->cursor = 0;
	w->tsc_hz = 0;
	w->next_tsc = 0;
	wl_pace_update(c);

	WL_WRITE_ONCE(c->status->workload, w->kind);
	WL_WRITE_ONCE(c->status->cmd_seq, seq);
}

/* True when the VMM has something new for us. */
WL_GUEST static inline int wl_cmd_pending(const struct wl_ctx *c)
{
	return WL_READ_ONCE(c->cmd->seq) != c->status->cmd_seq ||
	       WL_READ_ONCE(c->cmd->verify_seq) != c->status->verify_seq;
}

/*
 * Wait until the TSC reaches deadline, a command arrives or we must stop.
 * Long waits go through the idle hook so the platform can sleep instead of
 * letting us spin.
 */
WL_GUEST static inline void wl_wait_until(struct wl_ctx *c, uint64_t deadline)
{
	uint64_t hz = c->work->tsc_hz;

	for (;;) {
		uint64_t now = wl_rdtsc(), us;

		if ((int64_t)(deadline - now) <= 0 || wl_cmd_pending(c))
			return;
		us = hz ? (deadline - now) * 1000000 / hz : 0;
		if (us >= WL_IDLE_EXIT_US)
			wl_plat_idle(c, us > GUEST_IDLE_MAX_US ?
					GUEST_IDLE_MAX_US : (uint32_t)us);
		else
			wl_cpu_relax();
		wl_plat_poll(c);
		if (c->stop)
			return;
	}
}

/* Rate pacing: called before each page write of the dirty workload. */
WL_GUEST static inline void wl_pace(struct wl_ctx *c)
{
	struct guest_work *w = c->work;
	uint64_t now;
	int64_t slack;

	if (!w->cycles_per_page)
		return;
	now = wl_rdtsc();
	slack = (int64_t)(w->tsc_hz / 1000 * WL_PACE_SLACK_MS);
	/*
	 * Behind by more than the slack (a pause, a migration): forget the
	 * debt instead of writing in a burst.  Ahead by more than the slack
	 * can only mean the TSC went backwards (resumed on another host or
	 * in another process): start afresh rather than wait it out.
	 */
	if ((int64_t)(now - w->next_tsc) > slack ||
	    (int64_t)(w->next_tsc - now) > slack)
		w->next_tsc = now;
	wl_wait_until(c, w->next_tsc);
	w->next_tsc += w->cycles_per_page;
}

/* Spend pct% of the time waiting, given the cycles just spent working. */
WL_GUEST static inline void wl_throttle(struct wl_ctx *c, uint64_t busy_cycles)
{
	uint64_t pct = c->work->throttle_pct;

	if (pct)
		wl_wait_until(c, wl_rdtsc() + busy_cycles * pct / (100 - pct));
}

/* ---- workloads -------------------------------------------------------- */

WL_GUEST static inline uint64_t wl_next_dirty_page(struct wl_ctx *c)
{
	struct guest_work *w = c->work;
	uint64_t idx;

	if (w->pattern == GUEST_PATTERN_RANDOM) {
		w->rng = wl_xorshift64(w->rng);
		/* Multiply-shift range reduction: no division, no bias to speak of. */
		return (uint64_t)(((unsigned __int128)w->rng * w->ws_pages) >> 64);
	}
	idx = w->cursor;
	if (++w->cursor >= w->ws_pages)
		w->cursor = 0;
	return idx;
}

WL_GUEST static inline void wl_idle(struct wl_ctx *c)
{
	WL_WRITE_ONCE(c->status->state, GUEST_STATE_IDLE);
	wl_plat_idle(c, GUEST_IDLE_MAX_US);
	wl_plat_poll(c);
}

WL_GUEST static inline void wl_do_dirty(struct wl_ctx *c)
{
	uint64_t start = wl_rdtsc();
	int i;

	WL_WRITE_ONCE(c->status->state, GUEST_STATE_DIRTY);
	for (i = 0; i < WL_DIRTY_BATCH; i++) {
		wl_pace(c);
		wl_plat_poll(c);
		if (c->stop)
			return;
		wl_page_write(c, wl_next_dirty_page(c));
	}
	wl_throttle(c, wl_rdtsc() - start);
}

WL_GUEST static inline void wl_do_fill(struct wl_ctx *c)
{
	struct guest_work *w = c->work;
	uint64_t start = wl_rdtsc();
	int i;

	if (w->cursor >= w->data_pages) {
		wl_idle(c);
		return;
	}

	WL_WRITE_ONCE(c->status->state, GUEST_STATE_FILL);
	for (i = 0; i < WL_FILL_BATCH && w->cursor < w->data_pages; i++) {
		wl_plat_poll(c);
		if (c->stop)
			return;
		wl_page_write(c, w->cursor++);
	}
	if (w->cursor == w->data_pages)
		WL_WRITE_ONCE(c->status->fill_passes,
			      c->status->fill_passes + 1);
	wl_throttle(c, wl_rdtsc() - start);
}

/* ---- boot and main loop ----------------------------------------------- */

/*
 * First boot: latch data_pages, initialise struct guest_work, announce
 * ourselves.  Resume (status.magic already set: RAM restored from a
 * snapshot): check that RAM and the command block agree and carry on.
 * Returns 0, or -1 after a panic.
 */
WL_GUEST static inline int wl_boot(struct wl_ctx *c)
{
	const struct guest_cmd *cmd = c->cmd;
	struct guest_status *st = c->status;
	struct guest_work *w = c->work;
	uint64_t dp;

	if (WL_READ_ONCE(cmd->magic) != GUEST_CMD_MAGIC ||
	    WL_READ_ONCE(cmd->version) != GUEST_LAYOUT_VERSION) {
		wl_panic(c, GUEST_PANIC_BAD_CMD,
			 "bad command block magic/version");
		return -1;
	}
	dp = WL_READ_ONCE(cmd->data_pages);
	if (!dp || dp > GUEST_GEN_ENTRIES) {
		wl_panic(c, GUEST_PANIC_BAD_LAYOUT, "data_pages out of range");
		return -1;
	}

	if (WL_READ_ONCE(st->magic) == GUEST_STATUS_MAGIC) {
		if (w->magic != GUEST_WORK_MAGIC ||
		    st->version != GUEST_LAYOUT_VERSION) {
			wl_panic(c, GUEST_PANIC_BAD_LAYOUT,
				 "resume: workload state missing");
			return -1;
		}
		if (w->data_pages != dp || st->data_pages != dp) {
			wl_panic(c, GUEST_PANIC_BAD_LAYOUT,
				 "resume: data_pages changed");
			return -1;
		}
		/*
		 * Keep indices inside the data area whatever RAM says: in the
		 * thread backend a stray index is a host memory access.
		 */
		if (!w->ws_pages || w->ws_pages > dp)
			w->ws_pages = dp;
		if (w->cursor > dp)
			w->cursor = 0;
		/* The TSC of another run means nothing: re-arm the pacer. */
		w->tsc_hz = 0;
		w->next_tsc = 0;
		return 0;
	}

	{
		uint64_t *p = (uint64_t *)w;
		size_t i;

		for (i = 0; i < sizeof(*w) / sizeof(uint64_t); i++)
			p[i] = 0;
	}
	w->data_pages = dp;
	w->ws_pages = dp;
	w->kind = GUEST_WORK_IDLE;
	w->magic = GUEST_WORK_MAGIC;

	st->version = GUEST_LAYOUT_VERSION;
	st->data_pages = dp;
	st->first_bad_page = GUEST_NO_PAGE;
	st->last_bad_page = GUEST_NO_PAGE;
	st->state = GUEST_STATE_IDLE;
	wl_barrier();
	WL_WRITE_ONCE(st->magic, GUEST_STATUS_MAGIC);
	return 0;
}

/* One main-loop iteration of vCPU 0. */
WL_GUEST static inline void wl_step(struct wl_ctx *c)
{
	struct guest_status *st = c->status;
	uint64_t seq;

	WL_WRITE_ONCE(st->heartbeat, st->heartbeat + 1);
	WL_WRITE_ONCE(st->cpu_heartbeat[0], st->cpu_heartbeat[0] + 1);
	WL_WRITE_ONCE(st->tsc, wl_rdtsc());

	seq = WL_READ_ONCE(c->cmd->seq);
	if (seq != st->cmd_seq)
		wl_apply_cmd(c, seq);
	wl_pace_update(c);

	seq = WL_READ_ONCE(c->cmd->verify_seq);
	if (seq != st->verify_seq)
		wl_verify(c, seq);
	if (c->stop)
		return;

	switch (c->work->kind) {
	case GUEST_WORK_FILL:
		wl_do_fill(c);
		break;
	case GUEST_WORK_DIRTY:
		wl_do_dirty(c);
		break;
	default:
		wl_idle(c);
		break;
	}
}

/* The light loop of every vCPU but 0: a heartbeat, then idle. */
WL_GUEST static inline void wl_secondary(struct wl_ctx *c)
{
	uint64_t *hb;

	if (c->cpu >= GUEST_MAX_VCPUS) {
		wl_panic(c, GUEST_PANIC_BAD_LAYOUT, "vCPU index out of range");
		return;
	}
	hb = &c->status->cpu_heartbeat[c->cpu];
	while (!c->stop) {
		WL_WRITE_ONCE(*hb, *hb + 1);
		wl_plat_idle(c, GUEST_IDLE_MAX_US);
		wl_plat_poll(c);
	}
}

/*
 * Entry point of a vCPU on either platform.  Never returns in the guest;
 * in the host it returns once a hook has set c->stop.
 */
WL_GUEST static inline void wl_run(struct wl_ctx *c)
{
	if (c->cpu != 0) {
		wl_secondary(c);
		return;
	}
	if (wl_boot(c))
		return;
	while (!c->stop)
		wl_step(c);
}

#endif /* FERRY_VMM_GUEST_WORKLOAD_H */
