/*
 * postcopy.c - postcopy's RAM side: on the source, the discard set, the
 * page requests and the pages sent ahead of the background; on the
 * destination, userfaultfd: discarded pages dropped, missing-page faults
 * read by a fault thread and turned into requests, pages placed atomically
 * exactly once.
 *
 * Destination rules (the why):
 *
 * What is received. The load marks every page it places in precopy (the
 * RAM sections and the multifd channels set the page's bit in its block's
 * recv_map) and every DISCARD clears the bits of the pages it drops. The
 * source discards every page it will send again, so at LISTEN the map
 * holds exactly the pages precopy left valid - all present - and every
 * other page is missing (dropped, or never touched here), which is what
 * userfaultfd keys on. (mincore() of RAM would say the same, at 1.6 ms per
 * GiB inside the downtime here.) The prepopulate helpers are stopped
 * before the first discard, so nothing makes a dropped page present
 * behind our back; a placement that finds a page there anyway fails
 * rather than keep it.
 *
 * Exactly once. Two threads place pages: the listen thread (the main
 * stream's background pages and requested pages) and, with preempt, the
 * preempt channel's reader. Whoever sets a page's received bit first (an
 * atomic fetch-or) places it; the other drops its copy. UFFDIO_COPY and
 * UFFDIO_ZEROPAGE install the page and wake every thread waiting on it in
 * one step (mode 0), and the kernel re-checks the page table after queuing
 * a fault, so a thread is either woken by the placement or never waits.
 * The fault thread therefore never wakes anyone: a fault for a page whose
 * bit is set is being placed right now, and the placement wakes it.
 *
 * Fault latency is measured from reading the fault to placing the page.
 * The fault thread records each fault it forwards in a small table; a
 * placement looks for its page there. Recording and placing race like a
 * store buffer (the fault thread bumps a count and then reads the bit, the
 * placer sets the bit and then reads the count), so with sequentially
 * consistent atomics on both sides at least one sees the other: no fault
 * is left in the table after its page came.
 *
 * Never close the userfaultfd while a page is missing: a thread waiting on
 * it would be woken, fault again with nothing registered, and get a fresh
 * zero page where guest data belongs. The fd closes only at END (or before
 * LISTEN, when nothing is registered).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <linux/userfaultfd.h>

#include "postcopy.h"
#include "ram-internal.h"

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

/* DISCARD ranges per command (16 bytes each: 1 MiB payloads). */
#define PC_DISCARD_CHUNK 65536u
/* Faults whose latency is being timed at once. */
#define PC_PENDING_MAX 256u
/* Latency histogram: exact below 16 ns, then 16 linear steps per power of
 * two (about 6% wide). */
#define LAT_BUCKETS (16 + 60 * 16)

static const char *const state_names[FERRY_PC__MAX] = {
	[FERRY_PC_NONE] = "none",
	[FERRY_PC_ADVISE] = "advise",
	[FERRY_PC_LISTENING] = "listening",
	[FERRY_PC_RUNNING] = "running",
	[FERRY_PC_END] = "end",
};

const char *ferry_pc_state_name(enum ferry_pc_state s)
{
	return (unsigned)s < FERRY_PC__MAX ? state_names[s] : "?";
}

/* ========================================================================
 * Source
 * ======================================================================== */

static int find_block(struct ferry_ram *ram, const char *name)
{
	for (unsigned i = 0; i < ram->nblocks; i++)
		if (!strcmp(ram->blocks[i].name, name))
			return (int)i;
	return -1;
}

int ferry__ram_pc_discard(struct ferry_ram *ram,
			  int (*emit)(void *arg, const void *payload, size_t len,
				      struct ferry_error *err),
			  void *arg, struct ferry_error *err)
{
	size_t cap = 1 + FERRY_IDSTR_MAX + 4 + (size_t)PC_DISCARD_CHUNK * 16;
	uint8_t *buf = malloc(cap);
	int r = 0;

	if (!buf)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	for (unsigned bi = 0; bi < ram->nblocks && !r; bi++) {
		struct ram_block *b = &ram->blocks[bi];
		size_t nl = strlen(b->name), head = 1 + nl + 4, n = 0;
		uint64_t s, l, p = 0;

		buf[0] = (uint8_t)nl;
		memcpy(buf + 1, b->name, nl);
		/* Runs of set bits: the pages the destination must not keep. */
		while (!r && ferry__next_run(b->bitmap, b->npages, p, &s, &l)) {
			p = s + l;
			ferry__put_be64(buf + head + n * 16, s * b->page_size);
			ferry__put_be64(buf + head + n * 16 + 8, l * b->page_size);
			if (++n == PC_DISCARD_CHUNK) {
				ferry__put_be32(buf + 1 + nl, (uint32_t)n);
				r = emit(arg, buf, head + n * 16, err);
				n = 0;
			}
		}
		if (n && !r) {
			ferry__put_be32(buf + 1 + nl, (uint32_t)n);
			r = emit(arg, buf, head + n * 16, err);
		}
	}
	free(buf);
	return r;
}

void ferry__ram_pc_enter(struct ferry_ram *ram)
{
	ram->pc_mode = true;
	ram->round_done = false;
}

/* A page request from the wire: the block's index, or -errno. */
static int check_request(struct ferry_ram *ram, const char *block,
			 uint64_t start, uint64_t len, struct ferry_error *err)
{
	int bi = find_block(ram, block);
	struct ram_block *b;

	if (bi < 0)
		return ferry_error_set(err, -EINVAL, "page request for unknown "
				       "RAM block '%s'", block);
	b = &ram->blocks[bi];
	if (!len || start % b->page_size || len % b->page_size ||
	    start >= b->size || len > b->size - start)
		return ferry_error_set(err, -ERANGE, "page request outside RAM "
			"block '%s' or unaligned (0x%llx + 0x%llx)", block,
			(unsigned long long)start, (unsigned long long)len);
	return bi;
}

int ferry__ram_pc_request(struct ferry_ram *ram, const char *block,
			  uint64_t start, uint64_t len, struct ferry_error *err)
{
	int bi = check_request(ram, block, start, len, err);
	struct ram_block *b;
	struct pc_req *q;

	if (bi < 0)
		return bi;
	b = &ram->blocks[bi];
	ferry__mutex_lock(&ram->req_lock);
	if (ram->nreqs == ram->reqs_cap) {
		size_t nc = ram->reqs_cap ? ram->reqs_cap * 2 : 64;
		struct pc_req *nq = nc <= (1u << 20) ?
			realloc(ram->reqs, nc * sizeof(*nq)) : NULL;

		if (!nq) {
			ferry__mutex_unlock(&ram->req_lock);
			return ferry_error_set(err, -ENOMEM, "too many page "
					       "requests queued");
		}
		ram->reqs = nq;
		ram->reqs_cap = nc;
	}
	q = &ram->reqs[ram->nreqs++];
	*q = (struct pc_req){ (unsigned)bi, start / b->page_size,
			      len / b->page_size };
	ferry__mutex_unlock(&ram->req_lock);
	__atomic_store_n(&ram->pc_hint,
			 ((uint64_t)bi << 48 | (q->page + q->npages)) + 1,
			 __ATOMIC_RELAXED);
	return 0;
}

/* Take a page's send bit: the background walk will not send it again. */
static void clear_bit(struct ferry_ram *ram, struct ram_block *b, uint64_t pg)
{
	uint64_t bit = 1ull << (pg % WORD_BITS);
	uint64_t old = __atomic_fetch_and(&b->bitmap[pg / WORD_BITS], ~bit,
					  __ATOMIC_ACQ_REL);

	if (old & bit) {
		__atomic_fetch_sub(&ram->dirty_pages, 1, __ATOMIC_RELAXED);
		__atomic_fetch_sub(&ram->dirty_bytes, b->page_size,
				   __ATOMIC_RELAXED);
	}
}

uint64_t ferry__ram_pc_send_requests(struct ferry_ram *ram, struct ferry_chan *c)
{
	uint64_t bytes = 0;

	for (;;) {
		struct pc_req q;

		ferry__mutex_lock(&ram->req_lock);
		if (!ram->nreqs) {
			ferry__mutex_unlock(&ram->req_lock);
			return bytes;
		}
		q = ram->reqs[0];
		memmove(ram->reqs, ram->reqs + 1, --ram->nreqs * sizeof(q));
		ferry__mutex_unlock(&ram->req_lock);
		/* A request is always answered, sent before or not: the
		 * destination asks only for what it does not have (a copy in
		 * flight is dropped there), and a page never written here has
		 * no bit but must still come, as a zero page. */
		for (uint64_t i = 0; i < q.npages; i++) {
			clear_bit(ram, &ram->blocks[q.block], q.page + i);
			bytes += ferry__ram_send_page(ram, c, q.block, q.page + i);
			__atomic_fetch_add(&ram->pc_served, 1, __ATOMIC_RELAXED);
		}
	}
}

void ferry__ram_pc_follow_hint(struct ferry_ram *ram)
{
	uint64_t h = __atomic_exchange_n(&ram->pc_hint, 0, __ATOMIC_RELAXED);
	unsigned bi;

	if (!h--)
		return;
	/* The guest is working near its last fault: the pages after it are
	 * the likeliest next ones, so the background continues there. */
	bi = (unsigned)(h >> 48);
	if (bi >= ram->nblocks)
		return;
	ram->cur_block = bi;
	ram->cur_page = (h & ((1ull << 48) - 1)) / WORD_BITS * WORD_BITS;
	if (ram->cur_page >= ram->blocks[bi].npages) {
		ram->cur_block = bi + 1 < ram->nblocks ? bi + 1 : 0;
		ram->cur_page = 0;
	}
}

size_t ferry__ram_pc_requests(struct ferry_ram *ram)
{
	size_t n;

	ferry__mutex_lock(&ram->req_lock);
	n = ram->nreqs;
	ferry__mutex_unlock(&ram->req_lock);
	return n;
}

bool ferry__ram_pc_idle(struct ferry_ram *ram)
{
	size_t n;

	ferry__mutex_lock(&ram->req_lock);
	n = ram->nreqs;
	ferry__mutex_unlock(&ram->req_lock);
	return !n && !__atomic_load_n(&ram->dirty_pages, __ATOMIC_ACQUIRE);
}

int ferry__ram_pc_send_preempt(struct ferry_ram *ram, struct ferry_record_io *io,
			       const char *block, uint64_t start, uint64_t len,
			       struct ferry_error *err)
{
	int bi = check_request(ram, block, start, len, err), r = 0;
	struct ram_block *b;

	if (bi < 0)
		return bi;
	b = &ram->blocks[bi];
	__atomic_store_n(&ram->pc_hint,
			 ((uint64_t)bi << 48 | (start + len) / b->page_size) + 1,
			 __ATOMIC_RELAXED);
	for (uint64_t off = start; off < start + len && !r; off += b->page_size) {
		const uint8_t *p = b->host + off;
		bool zero;
		uint8_t hdr[8 + 1 + FERRY_IDSTR_MAX];
		size_t nl = strlen(b->name);

		clear_bit(ram, b, off / b->page_size);
		zero = ferry__page_is_zero(p, b->page_size);
		ferry__put_be64(hdr, off | (zero ? FERRY_RAM_ZERO : FERRY_RAM_PAGE));
		hdr[8] = (uint8_t)nl;
		memcpy(hdr + 9, b->name, nl);
		r = ferry_record_write2(io, FERRY_REC_PAGE, hdr, 9 + nl,
					zero ? NULL : p, zero ? 0 : b->page_size,
					err);
		__atomic_fetch_add(&ram->pc_served, 1, __ATOMIC_RELAXED);
	}
	if (!r && ferry_chan_flush(io->chan))
		r = ferry_chan_error(io->chan, err);
	return r;
}

int ferry__ram_pc_resend(struct ferry_ram *ram, const char *block,
			 uint64_t pages, const uint8_t *received,
			 struct ferry_error *err)
{
	int bi = find_block(ram, block);
	struct ram_block *b;
	uint64_t added = 0;

	if (bi < 0)
		return ferry_error_set(err, -EINVAL, "received bitmap for unknown "
				       "RAM block '%s'", block);
	b = &ram->blocks[bi];
	if (pages != b->npages)
		return ferry_error_set(err, -EINVAL, "received bitmap of RAM "
			"block '%s': %llu pages, the block has %llu", block,
			(unsigned long long)pages, (unsigned long long)b->npages);
	/* Whatever was in flight when the link broke is lost: everything
	 * not received goes again. Pages never written here are among them
	 * and cost a zero marker each. */
	for (uint64_t pg = 0; pg < pages; pg++) {
		uint64_t bit = 1ull << (pg % WORD_BITS), old;

		if (received[pg / 8] >> (pg % 8) & 1)
			continue;
		old = __atomic_fetch_or(&b->bitmap[pg / WORD_BITS], bit,
					__ATOMIC_RELEASE);
		if (!(old & bit))
			added++;
	}
	__atomic_fetch_add(&ram->dirty_pages, added, __ATOMIC_RELAXED);
	__atomic_fetch_add(&ram->dirty_bytes, added * b->page_size,
			   __ATOMIC_RELAXED);
	return 0;
}

void ferry__ram_pc_rewind(struct ferry_ram *ram)
{
	ram->cur_block = 0;
	ram->cur_page = 0;
	ram->round_done = false;
}

/* ========================================================================
 * Destination
 * ======================================================================== */

/* Dropped pages moved away, to be freed after RUN (at most this many
 * ranges; the rest are dropped in place). */
#define PC_HELD_MAX 4096u

struct held {
	void *addr;
	size_t len;
};

struct pending_fault {
	uintptr_t page;               /* host address of the page */
	uint64_t t;                   /* CLOCK_MONOTONIC ns, fault read */
};

struct ferry_pcd {
	struct ferry_ram *ram;        /* immutable */
	int state;                    /* atomic, enum ferry_pc_state */
	ferry_pcd_trace_fn trace;     /* immutable */
	void *trace_opaque;
	int uffd;                     /* load thread at ADVISE (ferry__pcd_prepare),
					 then immutable; -1 before */
	bool registered;              /* load/listen thread */
	bool zeropage;                /* UFFDIO_ZEROPAGE available */
	int wake;                     /* eventfd: stop the fault thread */
	struct ferry_ctx *pool_ctx;   /* whose pool runs the fault thread */
	struct ferry__pool_batch *fault_job; /* load/listen thread */
	bool fault_live;              /* load/listen thread */
	ferry_pcd_request_fn req;     /* set before the fault job starts (ADVISE),
					 then immutable */
	void *req_opaque;
	uint64_t *received[FERRY_RAM_MAX_BLOCKS];  /* atomic words: the RAM
						      blocks' recv_map */
	uint64_t *requested[FERRY_RAM_MAX_BLOCKS]; /* atomic words */
	uint8_t *zero;                /* a zero page, without ZEROPAGE */

	pthread_mutex_t lock;
	struct pending_fault pend[PC_PENDING_MAX]; /* lock */
	unsigned npend;               /* atomic (written under lock) */
	uint64_t hist[LAT_BUCKETS];   /* lock */
	uint64_t lat_max, lat_n;      /* lock */
	uint64_t blocktime;           /* lock */

	uint64_t requests, faults, placed, duplicates; /* atomic */
	uint64_t discards, discarded; /* load thread: ranges, pages */
	uint64_t discard_ns, prepop_ns; /* load thread: dropping, stopping the
					   prepopulate helpers */
	struct held held[PC_HELD_MAX];  /* load thread */
	unsigned nheld;
};

static void pcd_trace(struct ferry_pcd *pcd, const char *fmt, ...)
	FERRY_PRINTF(2, 3);

static void pcd_trace(struct ferry_pcd *pcd, const char *fmt, ...)
{
	char line[512];
	va_list ap;

	if (!pcd->trace)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	pcd->trace(pcd->trace_opaque, line);
}

enum ferry_pc_state ferry__pcd_state(const struct ferry_pcd *pcd)
{
	return pcd ? (enum ferry_pc_state)__atomic_load_n(&pcd->state,
							  __ATOMIC_SEQ_CST)
		   : FERRY_PC_NONE;
}

int ferry__pcd_move(struct ferry_pcd *pcd, enum ferry_pc_state from,
		    enum ferry_pc_state to, const char *cmd,
		    struct ferry_error *err)
{
	int expect = (int)from;

	if (!pcd || !__atomic_compare_exchange_n(&pcd->state, &expect, (int)to,
						 false, __ATOMIC_SEQ_CST,
						 __ATOMIC_SEQ_CST))
		return ferry_error_set(err, -EPROTO, "%s in postcopy state %s "
			"(it belongs in state %s)", cmd,
			ferry_pc_state_name(ferry__pcd_state(pcd)),
			ferry_pc_state_name(from));
	pcd_trace(pcd, "postcopy: %s -> %s (%s)", ferry_pc_state_name(from),
		  ferry_pc_state_name(to), cmd);
	return 0;
}

struct ferry_pcd *ferry__pcd_new(struct ferry_ram *ram, uint64_t host_page,
				 uint64_t target_page, ferry_pcd_trace_fn trace,
				 void *trace_opaque, struct ferry_error *err)
{
	uint64_t my_host = (uint64_t)sysconf(_SC_PAGESIZE);
	struct ferry_pcd *pcd;

	if (host_page != my_host) {
		ferry_error_set(err, -EINVAL, "postcopy: the source's host page "
			"size is %llu bytes, this host's %llu",
			(unsigned long long)host_page, (unsigned long long)my_host);
		return NULL;
	}
	for (unsigned i = 0; i < ram->nblocks; i++)
		if (ram->blocks[i].page_size != target_page ||
		    ram->blocks[i].page_size % my_host) {
			ferry_error_set(err, -EINVAL, "postcopy: the source's "
				"target page size is %llu bytes, RAM block '%s' "
				"here has %u-byte pages",
				(unsigned long long)target_page,
				ram->blocks[i].name, ram->blocks[i].page_size);
			return NULL;
		}
	pcd = calloc(1, sizeof(*pcd));
	if (!pcd) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	pcd->ram = ram;
	pcd->uffd = -1;
	pcd->wake = -1;
	pcd->trace = trace;
	pcd->trace_opaque = trace_opaque;
	pthread_mutex_init(&pcd->lock, NULL);
	for (unsigned i = 0; i < ram->nblocks; i++) {
		uint64_t n = words_for(ram->blocks[i].npages);

		pcd->received[i] = ram->blocks[i].recv_map;
		pcd->requested[i] = calloc(n, sizeof(uint64_t));
		if (!pcd->requested[i]) {
			ferry__pcd_free(pcd);
			ferry_error_set(err, -ENOMEM, "out of memory");
			return NULL;
		}
	}
	pcd->state = FERRY_PC_ADVISE;
	__atomic_store_n(&ram->pc_advised, true, __ATOMIC_RELAXED);
	pcd_trace(pcd, "postcopy: none -> advise (POSTCOPY_ADVISE, %llu-byte "
		  "pages)", (unsigned long long)target_page);
	return pcd;
}

static void fault_thread_stop(struct ferry_pcd *pcd)
{
	uint64_t one = 1;

	if (!pcd->fault_live)
		return;
	if (write(pcd->wake, &one, sizeof(one)) != sizeof(one))
		abort();  /* an eventfd write cannot fail here */
	ferry__pool_wait(pcd->pool_ctx, pcd->fault_job);
	pcd->fault_job = NULL;
	pcd->fault_live = false;
}

static void unregister_all(struct ferry_pcd *pcd)
{
	if (!pcd->registered)
		return;
	for (unsigned i = 0; i < pcd->ram->nblocks; i++) {
		struct uffdio_range rg = {
			.start = (uintptr_t)pcd->ram->blocks[i].host,
			.len = pcd->ram->blocks[i].size,
		};
		ioctl(pcd->uffd, UFFDIO_UNREGISTER, &rg);
	}
	pcd->registered = false;
}

void ferry__pcd_free(struct ferry_pcd *pcd)
{
	if (!pcd)
		return;
	fault_thread_stop(pcd);
	unregister_all(pcd);
	ferry__pcd_release_dropped(pcd);
	if (pcd->ram->pcd == pcd)
		pcd->ram->pcd = NULL;
	if (pcd->uffd >= 0)
		close(pcd->uffd);
	if (pcd->wake >= 0)
		close(pcd->wake);
	for (unsigned i = 0; i < FERRY_RAM_MAX_BLOCKS; i++)
		free(pcd->requested[i]);
	free(pcd->zero);
	pthread_mutex_destroy(&pcd->lock);
	free(pcd);
}

/*
 * Drop pages so that they fault. Shared memory (memfd, shmem) keeps its
 * pages in the page cache after MADV_DONTNEED: punch them out.
 *
 * Private memory: freeing pages is what costs (8 ms per 256 MiB here,
 * inside the downtime, and it does not scale with threads). A large range
 * is moved away instead - mremap(MREMAP_DONTUNMAP) moves whole page tables
 * and leaves the range mapped and empty, exactly as MADV_DONTNEED would,
 * in about a tenth of the time - and the pages are freed after RUN
 * (ferry__pcd_release_dropped), when the guest already runs. No hole is
 * ever left in guest RAM, so no other thread's mmap can land in it.
 */
#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif
#define DROP_MOVE_MIN (2u << 20)

static int drop(struct ferry_pcd *pcd, void *addr, size_t len)
{
	if (!madvise(addr, len, MADV_REMOVE))
		return 0;
	if (errno != EINVAL && errno != EOPNOTSUPP)
		return -errno;
	if (len >= DROP_MOVE_MIN && pcd->nheld < PC_HELD_MAX) {
		void *h = mremap(addr, len, len, MREMAP_MAYMOVE | MREMAP_DONTUNMAP);

		if (h != MAP_FAILED) {
			pcd->held[pcd->nheld++] = (struct held){ h, len };
			return 0;
		}
		/* Older kernels, other memory: the slow way. */
	}
	return madvise(addr, len, MADV_DONTNEED) ? -errno : 0;
}

void ferry__pcd_release_dropped(struct ferry_pcd *pcd)
{
	for (unsigned i = 0; i < pcd->nheld; i++)
		munmap(pcd->held[i].addr, pcd->held[i].len);
	pcd->nheld = 0;
}

/* Clear bits [first, first + n) of an atomic bitmap a word at a time: a
 * switch's discards cover 100k+ pages, and one atomic per page cost
 * 0.4-0.5 ms of downtime. */
static void clear_bits(uint64_t *map, uint64_t first, uint64_t n)
{
	while (n) {
		uint64_t bit = first % WORD_BITS;
		uint64_t take = WORD_BITS - bit < n ? WORD_BITS - bit : n;
		uint64_t mask = take == WORD_BITS ? ~0ull :
				((1ull << take) - 1) << bit;

		__atomic_fetch_and(&map[first / WORD_BITS], ~mask,
				   __ATOMIC_RELAXED);
		first += take;
		n -= take;
	}
}

int ferry__pcd_discard(struct ferry_pcd *pcd, const char *block, uint32_t n,
		       const uint8_t *ranges, struct ferry_error *err)
{
	struct ferry_ram *ram = pcd->ram;
	int bi = find_block(ram, block), r;
	uint64_t prev_end = 0, t0;
	struct ram_block *b;

	if (ferry__pcd_state(pcd) != FERRY_PC_ADVISE)
		return ferry_error_set(err, -EPROTO, "POSTCOPY_DISCARD in "
			"postcopy state %s (it belongs in state advise)",
			ferry_pc_state_name(ferry__pcd_state(pcd)));
	if (bi < 0)
		return ferry_error_set(err, -EINVAL, "discard for unknown RAM "
				       "block '%s'", block);
	b = &ram->blocks[bi];
	/* The prepopulate helpers would fault dropped pages back in (as
	 * zeros that then count as received): they stop before the first
	 * page is dropped. */
	t0 = ferry__mono_ns();
	ferry__ram_prepop_stop(ram);
	pcd->prepop_ns += ferry__mono_ns() - t0;
	/* Check every range before dropping any: a bad message changes
	 * nothing. */
	for (uint32_t i = 0; i < n; i++) {
		uint64_t s = ferry__get_be64(ranges + i * 16);
		uint64_t l = ferry__get_be64(ranges + i * 16 + 8);

		if (!l || s % b->page_size || l % b->page_size ||
		    s >= b->size || l > b->size - s)
			return ferry_error_set(err, -ERANGE, "discard range %u "
				"of RAM block '%s' (0x%llx + 0x%llx) is empty, "
				"unaligned or outside the block (0x%llx bytes)",
				i, block, (unsigned long long)s,
				(unsigned long long)l, (unsigned long long)b->size);
		if (i && s < prev_end)
			return ferry_error_set(err, -EINVAL, "discard range %u "
				"of RAM block '%s' (0x%llx) overlaps or precedes "
				"the one before it (ending at 0x%llx)", i, block,
				(unsigned long long)s,
				(unsigned long long)prev_end);
		prev_end = s + l;
	}
	pcd->discards += n;
	t0 = ferry__mono_ns();
	for (uint32_t i = 0; i < n; i++) {
		uint64_t s = ferry__get_be64(ranges + i * 16);
		uint64_t l = ferry__get_be64(ranges + i * 16 + 8);

		pcd->discarded += l / b->page_size;
		clear_bits(pcd->received[bi], s / b->page_size, l / b->page_size);
		if ((r = drop(pcd, b->host + s, l)))
			return ferry_error_set(err, r, "discarding 0x%llx + 0x%llx "
				"of RAM block '%s': %s", (unsigned long long)s,
				(unsigned long long)l, block, strerror(-r));
	}
	pcd->discard_ns += ferry__mono_ns() - t0;
	return 0;
}

static int uffd_open(struct ferry_error *err)
{
	int fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);

	/* Without CAP_SYS_PTRACE and vm.unprivileged_userfaultfd the syscall
	 * refuses kernel-mode faults (KVM's); /dev/userfaultfd is the other
	 * door, governed by its file mode. */
	if (fd < 0 && (errno == EPERM || errno == ENOSYS)) {
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);

		if (dev >= 0) {
			fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
			close(dev);
		}
	}
	if (fd < 0)
		return ferry_error_set(err, -errno, "userfaultfd: %s (postcopy "
			"needs it: run as root or set "
			"vm.unprivileged_userfaultfd=1)", strerror(errno));
	return fd;
}

/* ---- latency -------------------------------------------------------------- */

static unsigned lat_bucket(uint64_t v)
{
	unsigned e;

	if (v < 16)
		return (unsigned)v;
	e = 63u - (unsigned)__builtin_clzll(v);
	return 16 + (e - 4) * 16 + (unsigned)((v >> (e - 4)) & 15);
}

/* The middle of a bucket. */
static uint64_t lat_value(unsigned i)
{
	unsigned e;

	if (i < 16)
		return i;
	e = (i - 16) / 16 + 4;
	return ((uint64_t)(16 + (i - 16) % 16) << (e - 4)) +
	       ((1ull << (e - 4)) >> 1);
}

static uint64_t lat_pct(const struct ferry_pcd *pcd, unsigned pct)
{
	uint64_t want = (pcd->lat_n * pct + 99) / 100, seen = 0;

	if (!pcd->lat_n)
		return 0;
	for (unsigned i = 0; i < LAT_BUCKETS; i++) {
		seen += pcd->hist[i];
		if (seen >= want) {
			uint64_t v = lat_value(i);
			return v > pcd->lat_max ? pcd->lat_max : v;
		}
	}
	return pcd->lat_max;
}

/* A page was placed: settle the faults that waited for it. */
static void settle_faults(struct ferry_pcd *pcd, uintptr_t page)
{
	uint64_t now;

	if (!__atomic_load_n(&pcd->npend, __ATOMIC_SEQ_CST))
		return;
	now = ferry__mono_ns();
	ferry__mutex_lock(&pcd->lock);
	for (unsigned i = 0; i < pcd->npend;) {
		uint64_t d;

		if (pcd->pend[i].page != page) {
			i++;
			continue;
		}
		d = now - pcd->pend[i].t;
		pcd->hist[lat_bucket(d)]++;
		pcd->lat_n++;
		pcd->blocktime += d;
		if (d > pcd->lat_max)
			pcd->lat_max = d;
		pcd->pend[i] = pcd->pend[pcd->npend - 1];
		__atomic_store_n(&pcd->npend, pcd->npend - 1, __ATOMIC_SEQ_CST);
	}
	ferry__mutex_unlock(&pcd->lock);
}

/* ---- placing ---------------------------------------------------------------- */

/* Copy @len bytes (whole pages) to @addr; EAGAIN (the mappings were
 * changing) and a partial copy go on from where the kernel stopped. */
static int copy_in(struct ferry_pcd *pcd, uintptr_t addr, const uint8_t *src,
		   uint64_t len)
{
	while (len) {
		struct uffdio_copy cp = { .dst = addr, .src = (uintptr_t)src,
					  .len = len };

		if (!ioctl(pcd->uffd, UFFDIO_COPY, &cp))
			return 0;
		if (errno != EAGAIN)
			return -errno;
		if (cp.copy > 0) {
			addr += (uint64_t)cp.copy;
			src += cp.copy;
			len -= (uint64_t)cp.copy;
		}
	}
	return 0;
}

static int place_failed(struct ram_block *b, uint64_t off, int e,
			struct ferry_error *err)
{
	/* EEXIST would mean a page present here that the source still had
	 * to send - one the discards should have dropped. Keeping it would
	 * keep stale data: fail instead. */
	return ferry_error_set(err, e, "placing page 0x%llx of RAM block "
		"'%s': %s", (unsigned long long)off, b->name, e == -EEXIST ?
		"a page is already there (stale data the discards did not "
		"drop)" : strerror(-e));
}

int ferry__pcd_place_run(struct ferry_pcd *pcd, unsigned block, uint64_t off,
			 unsigned n, const void *data, struct ferry_error *err)
{
	struct ram_block *b = &pcd->ram->blocks[block];
	const uint8_t *src = data;
	uint64_t pg0 = off / b->page_size;
	unsigned i = 0;

	while (i < n) {
		unsigned j;
		int e;

		/* Claim a stretch: each page's bit, the first to set it places
		 * it (a requested copy may have won some). */
		for (j = i; j < n; j++) {
			uint64_t pg = pg0 + j, bit = 1ull << (pg % WORD_BITS);

			if (__atomic_fetch_or(&pcd->received[block][pg / WORD_BITS],
					      bit, __ATOMIC_SEQ_CST) & bit)
				break;
		}
		if (j > i) {
			e = copy_in(pcd, (uintptr_t)b->host + off + i * b->page_size,
				    src + (size_t)i * b->page_size,
				    (uint64_t)(j - i) * b->page_size);
			if (e)
				return place_failed(b, off + i * b->page_size, e, err);
			__atomic_fetch_add(&pcd->placed, j - i, __ATOMIC_RELAXED);
			for (unsigned k = i; k < j; k++)
				settle_faults(pcd, (uintptr_t)b->host + off +
					      k * b->page_size);
		}
		if (j < n) {   /* page j was someone else's */
			__atomic_fetch_add(&pcd->duplicates, 1, __ATOMIC_RELAXED);
			j++;
		}
		i = j;
	}
	return 0;
}

int ferry__pcd_place(struct ferry_pcd *pcd, unsigned block, uint64_t off,
		     const void *data, struct ferry_error *err)
{
	struct ram_block *b = &pcd->ram->blocks[block];
	uint64_t pg = off / b->page_size, bit = 1ull << (pg % WORD_BITS);
	uintptr_t addr = (uintptr_t)b->host + off;
	struct uffdio_zeropage zp = {
		.range = { .start = addr, .len = b->page_size } };
	int r;

	if (data || !pcd->zeropage)
		return ferry__pcd_place_run(pcd, block, off, 1,
					    data ? data : pcd->zero, err);
	/* A zero page: the same claim, then UFFDIO_ZEROPAGE. */
	if (__atomic_fetch_or(&pcd->received[block][pg / WORD_BITS], bit,
			      __ATOMIC_SEQ_CST) & bit) {
		__atomic_fetch_add(&pcd->duplicates, 1, __ATOMIC_RELAXED);
		return 0;
	}
	/* EAGAIN: the mappings were changing; the page is not in. */
	do
		r = ioctl(pcd->uffd, UFFDIO_ZEROPAGE, &zp) ? -errno : 0;
	while (r == -EAGAIN);
	if (r)
		return place_failed(b, off, r, err);
	__atomic_fetch_add(&pcd->placed, 1, __ATOMIC_RELAXED);
	settle_faults(pcd, addr);
	return 0;
}

int ferry__pcd_page_record(struct ferry_pcd *pcd, const uint8_t *body,
			   size_t len, struct ferry_error *err)
{
	char name[FERRY_IDSTR_MAX + 1];
	uint64_t hdr, flags, off;
	struct ram_block *b;
	size_t nl, want;
	int bi;

	if (len < 9 || len < 9 + (size_t)body[8])
		return ferry_error_set(err, -EBADMSG, "PAGE record too short");
	hdr = ferry__get_be64(body);
	nl = body[8];
	memcpy(name, body + 9, nl);
	name[nl] = 0;
	flags = hdr & FERRY_RAM_FLAGS;
	off = hdr & ~FERRY_RAM_FLAGS;
	if ((bi = find_block(pcd->ram, name)) < 0)
		return ferry_error_set(err, -EINVAL, "PAGE for unknown RAM block "
				       "'%s'", name);
	b = &pcd->ram->blocks[bi];
	want = 9 + nl + (flags == FERRY_RAM_PAGE ? b->page_size : 0);
	if ((flags != FERRY_RAM_PAGE && flags != FERRY_RAM_ZERO) || len != want ||
	    off % b->page_size || off >= b->size)
		return ferry_error_set(err, -EBADMSG, "PAGE record (flags 0x%llx, "
			"offset 0x%llx, %zu bytes) malformed or outside RAM "
			"block '%s'", (unsigned long long)flags,
			(unsigned long long)off, len, name);
	if (ferry__pcd_state(pcd) < FERRY_PC_LISTENING ||
	    ferry__pcd_state(pcd) == FERRY_PC_END)
		return ferry_error_set(err, -EPROTO, "PAGE in postcopy state %s",
			ferry_pc_state_name(ferry__pcd_state(pcd)));
	return ferry__pcd_place(pcd, (unsigned)bi, off,
				flags == FERRY_RAM_PAGE ? body + 9 + nl : NULL, err);
}

/* ---- the fault thread ---------------------------------------------------------- */

static bool locate(struct ferry_pcd *pcd, uintptr_t addr, unsigned *bi,
		   uint64_t *pg)
{
	for (unsigned i = 0; i < pcd->ram->nblocks; i++) {
		struct ram_block *b = &pcd->ram->blocks[i];
		uintptr_t base = (uintptr_t)b->host;

		if (addr >= base && addr - base < b->size) {
			*bi = i;
			*pg = (addr - base) / b->page_size;
			return true;
		}
	}
	return false;
}

static void ask(struct ferry_pcd *pcd, unsigned bi, uint64_t pg)
{
	struct ram_block *b = &pcd->ram->blocks[bi];
	uint64_t bit = 1ull << (pg % WORD_BITS);

	if (__atomic_fetch_or(&pcd->requested[bi][pg / WORD_BITS], bit,
			      __ATOMIC_SEQ_CST) & bit)
		return;
	__atomic_fetch_add(&pcd->requests, 1, __ATOMIC_RELAXED);
	/* A request lost with the link is asked again at recovery. */
	pcd->req(pcd->req_opaque, b->name, pg * b->page_size, b->page_size);
}

static void on_fault(struct ferry_pcd *pcd, uintptr_t addr)
{
	unsigned bi;
	uint64_t pg, bit;
	uintptr_t page;
	bool placed;

	__atomic_fetch_add(&pcd->faults, 1, __ATOMIC_RELAXED);
	if (!locate(pcd, addr, &bi, &pg))
		return;  /* not ours: cannot happen with our registrations */
	bit = 1ull << (pg % WORD_BITS);
	page = (uintptr_t)pcd->ram->blocks[bi].host +
	       pg * pcd->ram->blocks[bi].page_size;
	/* Count first, then look at the bit (see the top comment). */
	ferry__mutex_lock(&pcd->lock);
	__atomic_store_n(&pcd->npend, pcd->npend + 1, __ATOMIC_SEQ_CST);
	placed = __atomic_load_n(&pcd->received[bi][pg / WORD_BITS],
				 __ATOMIC_SEQ_CST) & bit;
	if (placed || pcd->npend > PC_PENDING_MAX) {
		__atomic_store_n(&pcd->npend, pcd->npend - 1, __ATOMIC_SEQ_CST);
	} else {
		pcd->pend[pcd->npend - 1] = (struct pending_fault){
			page, ferry__mono_ns() };
	}
	ferry__mutex_unlock(&pcd->lock);
	/* Being placed right now: the placement wakes the thread. */
	if (!placed)
		ask(pcd, bi, pg);
}

#ifndef SCHED_RESET_ON_FORK
#define SCHED_RESET_ON_FORK 0x40000000
#endif

/*
 * A fault's round trip crosses four threads on two hosts; on a busy host
 * each hop can wait a scheduler tick behind the background stream. Those
 * threads do little and must do it now: nice -10.
 *
 * The switch windows (the source from its stop to the package sent, the
 * destination's load thread from the drain's PONG to RUN) are the
 * downtime itself, and a nice value is not enough there: the fair
 * scheduler bounds a thread's share, not its wait, and a thread that has
 * used its share waits out another's whole slice. Measured on a 2-core
 * host, 4 GiB switched at once: with nice -10 the load thread lost the CPU
 * for 2-4 ms at a time (involuntary switches, no blocking) in one run of
 * three; with SCHED_FIFO every run's downtime was within 0.6 ms of the
 * best. Those windows block on reads and condition variables and do
 * bounded work (the package is capped), so a real-time priority cannot
 * starve the host; the kernel's RT throttling is the backstop.
 *
 * A raised thread must not hand its priority down: the windows call the
 * VMM (vm_start, device loads), which may start threads there - KVM's
 * vCPU threads are created at the start - and a vCPU running SCHED_FIFO
 * (or at nice -10) for the rest of its life would starve the host. So
 * every raise sets SCHED_RESET_ON_FORK: threads created meanwhile start
 * SCHED_OTHER at nice 0. (A helper that wants the window's priority asks
 * for it explicitly, as the thread backend's split dirty sync does.) Only
 * CAP_SYS_NICE may clear the flag again: a thread raised under
 * RLIMIT_RTPRIO alone keeps it, and gets its policy back all the same.
 */
void ferry__pc_sched_raise(struct ferry__pc_sched *was, bool realtime)
{
	id_t tid = (id_t)syscall(SYS_gettid);
	struct ferry__pc_sched s = { .raised = true };
	struct sched_param rt = { .sched_priority = 1 };

	/* Raised already, or tried and not allowed: once per window (the
	 * destination asks again at every command of its window). */
	if (was && (was->raised || was->tried))
		return;
	if (was)
		was->tried = true;
	errno = 0;
	s.nice = getpriority(PRIO_PROCESS, tid);
	if (s.nice == -1 && errno)
		s.nice = 0;
	if ((s.policy = sched_getscheduler(0)) < 0 ||
	    sched_getparam(0, &s.param))
		return;  /* nothing changed, nothing to put back */
	if (!realtime || (s.policy & ~SCHED_RESET_ON_FORK) != SCHED_OTHER ||
	    sched_setscheduler(0, SCHED_FIFO | SCHED_RESET_ON_FORK, &rt)) {
		/* Not SCHED_FIFO: nice -10, if allowed. */
		if (setpriority(PRIO_PROCESS, tid, -10))
			return;
		(void)sched_setscheduler(0, s.policy | SCHED_RESET_ON_FORK,
					 &s.param);
	}
	s.tried = true;
	if (was)
		*was = s;
}

void ferry__pc_sched_restore(struct ferry__pc_sched *was)
{
	if (!was->raised)
		return;
	/* The policy as it was (its reset-on-fork flag too, if allowed: see
	 * above), then the nice value (a policy change keeps it). */
	if (sched_setscheduler(0, was->policy, &was->param) && errno == EPERM)
		(void)sched_setscheduler(0, was->policy | SCHED_RESET_ON_FORK,
					 &was->param);
	(void)setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), was->nice);
	was->raised = false;
	was->tried = false;
}

static void fault_loop(struct ferry_pcd *pcd)
{
	for (;;) {
		struct pollfd pf[2] = {
			{ .fd = pcd->uffd, .events = POLLIN },
			{ .fd = pcd->wake, .events = POLLIN },
		};
		struct uffd_msg msgs[32];
		ssize_t n;

		if (poll(pf, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		if (pf[1].revents)
			return;
		n = read(pcd->uffd, msgs, sizeof(msgs));
		if (n < 0)
			continue;  /* EAGAIN: another reader got there */
		for (ssize_t i = 0; i < n / (ssize_t)sizeof(msgs[0]); i++)
			if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
				on_fault(pcd, (uintptr_t)msgs[i].arg.pagefault.address);
	}
}

/* The fault thread, a job on the context's pool (pool.c: no thread is
 * created in the downtime). The thread's nice value goes back with it. */
static void fault_main(void *arg)
{
	struct ferry__pc_sched was = { 0 };

	ferry__pc_sched_raise(&was, false);
	fault_loop(arg);
	ferry__pc_sched_restore(&was);
}

/*
 * The userfaultfd and the fault thread come at ADVISE, while the guest
 * still runs on the source: nothing is registered yet, so the thread
 * polls a descriptor that stays quiet until LISTEN. Opening the fd and
 * waking a pool thread for the job inside the switch cost 0.1-3 ms of
 * downtime on a busy host (the woken thread and the pool's lock).
 */
int ferry__pcd_prepare(struct ferry_pcd *pcd, struct ferry_ctx *ctx,
		       ferry_pcd_request_fn req, void *req_opaque,
		       struct ferry_error *err)
{
	void *job_arg = pcd;
	struct uffdio_api api = { .api = UFFD_API };
	int e;

	if (pcd->fault_live)
		return 0;
	pcd->req = req;
	pcd->req_opaque = req_opaque;
	if (pcd->uffd < 0) {
		if ((e = uffd_open(err)) < 0)
			return e;
		if (ioctl(e, UFFDIO_API, &api)) {
			int api_err = -errno;

			close(e);
			return ferry_error_set(err, api_err, "UFFDIO_API: %s",
					       strerror(-api_err));
		}
		pcd->uffd = e;
	}
	if (pcd->wake < 0 && (pcd->wake = eventfd(0, EFD_CLOEXEC)) < 0)
		return ferry_error_set(err, -errno, "eventfd: %s", strerror(errno));
	pcd->pool_ctx = ctx;
	pcd->fault_job = ferry__pool_submit(ctx, 1, fault_main, &job_arg, err);
	if (!pcd->fault_job)
		return ferry_error_prefix(err, "the fault thread: ");
	pcd->fault_live = true;
	return 0;
}

int ferry__pcd_listen(struct ferry_pcd *pcd, struct ferry_ctx *ctx,
		      ferry_pcd_request_fn req, void *req_opaque,
		      struct ferry_error *err)
{
	struct ferry_ram *ram = pcd->ram;
	uint64_t t0 = ferry__mono_ns();
	int e;

	if (ferry__pcd_state(pcd) != FERRY_PC_ADVISE)
		return ferry_error_set(err, -EPROTO, "POSTCOPY_LISTEN in postcopy "
			"state %s (it belongs in state advise)",
			ferry_pc_state_name(ferry__pcd_state(pcd)));
	for (unsigned i = 1; i < ram->nblocks; i++)
		if (ram->blocks[i].page_size > ram->blocks[0].page_size)
			return ferry_error_set(err, -EINVAL, "postcopy needs one "
					       "page size for every RAM block");
	if ((e = ferry__pcd_prepare(pcd, ctx, req, req_opaque, err)))
		return e;
	/* Nothing may make pages present behind the received bitmap. */
	ferry__ram_prepop_stop(ram);
	if (!ram->pc_page && !(ram->pc_page = malloc(FERRY_PC_RUN_PAGES *
						      ram->blocks[0].page_size)))
		return ferry_error_set(err, -ENOMEM, "out of memory");
	ram->pc_run_n = 0;
	for (unsigned i = 0; i < ram->nblocks; i++) {
		struct uffdio_register rg = {
			.range = { .start = (uintptr_t)ram->blocks[i].host,
				   .len = ram->blocks[i].size },
			.mode = UFFDIO_REGISTER_MODE_MISSING,
		};

		if (ioctl(pcd->uffd, UFFDIO_REGISTER, &rg)) {
			e = -errno;
			unregister_all(pcd);
			return ferry_error_set(err, e, "registering RAM block '%s' "
				"with userfaultfd: %s%s", ram->blocks[i].name,
				strerror(-e), e == -EBUSY ? " (already "
				"registered, e.g. for dirty tracking)" : "");
		}
		pcd->registered = true;
		if (!(rg.ioctls & (1ull << _UFFDIO_COPY)))
			return ferry_error_set(err, -EOPNOTSUPP, "userfaultfd cannot "
				"place pages in RAM block '%s'", ram->blocks[i].name);
		pcd->zeropage = rg.ioctls & (1ull << _UFFDIO_ZEROPAGE);
	}
	if (!pcd->zeropage) {
		pcd->zero = calloc(1, ram->blocks[0].page_size);
		if (!pcd->zero)
			return ferry_error_set(err, -ENOMEM, "out of memory");
	}
	/* From here every page goes in through ferry__pcd_place. */
	ram->pcd = pcd;
	pcd_trace(pcd, "postcopy: %llu pages dropped (%llu ranges) in %.2f ms "
		  "(prepopulating stopped in %.2f ms); registered in %.2f ms",
		  (unsigned long long)pcd->discarded,
		  (unsigned long long)pcd->discards, (double)pcd->discard_ns / 1e6,
		  (double)pcd->prepop_ns / 1e6,
		  (double)(ferry__mono_ns() - t0) / 1e6);
	return ferry__pcd_move(pcd, FERRY_PC_ADVISE, FERRY_PC_LISTENING,
			       "POSTCOPY_LISTEN", err);
}

void ferry__pcd_finish(struct ferry_pcd *pcd)
{
	fault_thread_stop(pcd);
	unregister_all(pcd);
	pcd->ram->pcd = NULL;
}

int ferry__pcd_received(struct ferry_pcd *pcd, unsigned bi, uint8_t **out,
			uint64_t *pages, struct ferry_error *err)
{
	struct ram_block *b = &pcd->ram->blocks[bi];
	uint8_t *m = calloc(1, (size_t)(b->npages + 7) / 8);

	if (!m)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	for (uint64_t pg = 0; pg < b->npages; pg++)
		if (__atomic_load_n(&pcd->received[bi][pg / WORD_BITS],
				    __ATOMIC_SEQ_CST) >> (pg % WORD_BITS) & 1)
			m[pg / 8] |= (uint8_t)(1u << (pg % 8));
	*out = m;
	*pages = b->npages;
	return 0;
}

int ferry__pcd_block_name(struct ferry_pcd *pcd, unsigned bi, char *buf,
			  size_t len)
{
	if (bi >= pcd->ram->nblocks)
		return -ENOENT;
	snprintf(buf, len, "%s", pcd->ram->blocks[bi].name);
	return 0;
}

void ferry__pcd_rerequest(struct ferry_pcd *pcd)
{
	uintptr_t pages[PC_PENDING_MAX];
	unsigned n;

	/* Nothing asked before the break is known to have arrived: forget
	 * it all; waiting threads are asked for again now, the rest comes
	 * with the resent background. */
	for (unsigned i = 0; i < pcd->ram->nblocks; i++)
		for (uint64_t w = 0; w < words_for(pcd->ram->blocks[i].npages); w++)
			__atomic_store_n(&pcd->requested[i][w], 0, __ATOMIC_SEQ_CST);
	ferry__mutex_lock(&pcd->lock);
	n = pcd->npend;
	for (unsigned i = 0; i < n; i++)
		pages[i] = pcd->pend[i].page;
	ferry__mutex_unlock(&pcd->lock);
	for (unsigned i = 0; i < n; i++) {
		unsigned bi;
		uint64_t pg;

		if (locate(pcd, pages[i], &bi, &pg) &&
		    !(__atomic_load_n(&pcd->received[bi][pg / WORD_BITS],
				      __ATOMIC_SEQ_CST) >> (pg % WORD_BITS) & 1))
			ask(pcd, bi, pg);
	}
}

void ferry__pcd_get_stats(struct ferry_pcd *pcd, struct ferry_pcd_stats *st)
{
	memset(st, 0, sizeof(*st));
	if (!pcd)
		return;
	st->state = ferry__pcd_state(pcd);
	st->requests = __atomic_load_n(&pcd->requests, __ATOMIC_RELAXED);
	st->faults = __atomic_load_n(&pcd->faults, __ATOMIC_RELAXED);
	st->placed = __atomic_load_n(&pcd->placed, __ATOMIC_RELAXED);
	st->duplicates = __atomic_load_n(&pcd->duplicates, __ATOMIC_RELAXED);
	ferry__mutex_lock(&pcd->lock);
	st->blocktime_ns = pcd->blocktime;
	st->lat_p50_ns = lat_pct(pcd, 50);
	st->lat_p99_ns = lat_pct(pcd, 99);
	st->lat_max_ns = pcd->lat_max;
	st->lat_samples = pcd->lat_n;
	ferry__mutex_unlock(&pcd->lock);
}

/* ---- the floor ---------------------------------------------------------------------- */

struct bare {
	int uffd;
	uint8_t *mem;
	unsigned n;
	uint64_t total;
};

static void *bare_toucher(void *arg)
{
	struct bare *b = arg;
	long ps = sysconf(_SC_PAGESIZE);

	for (unsigned i = 0; i < b->n; i++) {
		uint64_t t0 = ferry__mono_ns();
		volatile uint8_t *p = b->mem + (size_t)i * (size_t)ps;

		(void)*p;
		b->total += ferry__mono_ns() - t0;
	}
	return NULL;
}

int64_t ferry_pc_bare_roundtrip_ns(unsigned n)
{
	long ps = sysconf(_SC_PAGESIZE);
	struct uffdio_api api = { .api = UFFD_API };
	struct bare b = { .n = n };
	uint8_t *page = calloc(1, (size_t)ps);
	pthread_t t;
	unsigned done = 0;
	int64_t r = -EIO;

	b.uffd = uffd_open(NULL);
	if (b.uffd < 0 || !page) {
		free(page);
		return b.uffd < 0 ? b.uffd : -ENOMEM;
	}
	memset(page, 0x5a, (size_t)ps);
	b.mem = mmap(NULL, (size_t)n * (size_t)ps, PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (b.mem == MAP_FAILED || ioctl(b.uffd, UFFDIO_API, &api))
		goto out;
	{
		struct uffdio_register rg = {
			.range = { (uintptr_t)b.mem, (uint64_t)n * (uint64_t)ps },
			.mode = UFFDIO_REGISTER_MODE_MISSING };
		if (ioctl(b.uffd, UFFDIO_REGISTER, &rg))
			goto out;
	}
	if (pthread_create(&t, NULL, bare_toucher, &b))
		goto out;
	/* Read each fault and place its page, as the fault thread and a
	 * placer do, minus the network. */
	while (done < n) {
		struct pollfd pf = { .fd = b.uffd, .events = POLLIN };
		struct uffd_msg msg;

		if (poll(&pf, 1, 1000) <= 0)
			break;
		if (read(b.uffd, &msg, sizeof(msg)) != sizeof(msg) ||
		    msg.event != UFFD_EVENT_PAGEFAULT)
			continue;
		{
			struct uffdio_copy cp = {
				.dst = msg.arg.pagefault.address & ~((uint64_t)ps - 1),
				.src = (uintptr_t)page, .len = (uint64_t)ps };
			if (ioctl(b.uffd, UFFDIO_COPY, &cp) && errno != EEXIST)
				break;
		}
		done++;
	}
	/* On a failure, closing the fd lets the toucher fault in zero
	 * pages and finish. */
	if (done < n) {
		close(b.uffd);
		b.uffd = -1;
	}
	pthread_join(t, NULL);
	if (done == n)
		r = (int64_t)(b.total / n);
out:
	if (b.mem != MAP_FAILED)
		munmap(b.mem, (size_t)n * (size_t)ps);
	if (b.uffd >= 0)
		close(b.uffd);
	free(page);
	return r;
}
