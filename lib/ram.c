/*
 * ram.c - guest RAM precopy.
 *
 * Source: one bitmap per block, bit set = page must be (re)sent. Setup
 * starts dirty tracking *before* taking the first picture of which pages
 * hold data, so a write racing with setup is either in the picture or in
 * the next dirty sync - never in neither. Pages the VMM knows were never
 * populated are not read or sent: the destination's fresh memory already
 * reads as zero, and reading them here would fault them in for nothing.
 *
 * A round walks the bitmaps from a cursor; the budget bounds one section.
 * When a walk ends, the round is complete and the next pending(exact)
 * syncs the dirty log into the bitmaps.
 *
 * Bitmap words are updated with atomics because the VMM may mark pages
 * dirty from other threads (ferry_ram_mark_dirty) while the migration
 * thread clears bits it is sending. Sending clears a bit *before* reading
 * the page, so a write after the read sets it again and is sent later.
 *
 * Destination: every offset is checked against its block; a zero marker
 * only writes when the page is not zero already, so untouched memory stays
 * uncommitted.
 *
 * Multifd: the walk queues (block, offset) pairs to ferry_multifd instead of
 * writing pages into the section. Every page is sent at most once per walk,
 * so a sync point between walks is enough to keep two versions of a page
 * from racing on different channels. Each sync is paired with a
 * MULTIFD_FLUSH record in the section, at which the destination's load
 * waits for the channels; a sync point always ends the pages of its
 * section on the channels (see ram_save_complete for why that matters).
 *
 * Pre-population: the START section lists, per block, the page ranges the
 * source has data in. The destination faults them in from helper threads
 * (MADV_POPULATE_WRITE, a few MiB at a time, front to back like the data),
 * so the receivers find mapped pages instead of taking one fault per page.
 * Racing the receivers is harmless: populating a written page changes
 * nothing, and a page written first is simply skipped by the kernel.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ferry/multifd.h"
#include "ferry/ram.h"
#include "internal.h"
#include "postcopy.h"
#include "ram-internal.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* Bytes one prepopulate step faults in: large enough to amortise the
 * syscall, small enough that two helpers interleave and a stop request is
 * honoured quickly. */
#define PREPOP_CHUNK (4ull << 20)
/* With postcopy possible, the switch stops the helpers inside the
 * downtime and waits for the chunk each is faulting in (1-4 ms per MiB
 * here): smaller chunks. */
#define PREPOP_CHUNK_PC (512ull << 10)


struct ferry_ram *ferry_ram_new(const struct ferry_ram_block *blocks,
				unsigned nblocks,
				const struct ferry_ram_dirty_ops *ops,
				void *opaque, struct ferry_error *err)
{
	struct ferry_ram *ram;

	if (!nblocks || nblocks > FERRY_RAM_MAX_BLOCKS) {
		ferry_error_set(err, -EINVAL, "RAM: %u blocks (1..%u allowed)",
				nblocks, FERRY_RAM_MAX_BLOCKS);
		return NULL;
	}
	ram = calloc(1, sizeof(*ram));
	if (!ram) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	if (ops && ferry__copy_sized(&ram->ops_copy, sizeof(ram->ops_copy), ops,
				     "ferry_ram_dirty_ops", err)) {
		free(ram);
		return NULL;
	}
	ram->ops = ops ? &ram->ops_copy : NULL;
	ram->opaque = opaque;
	ram->last_sent_block = UINT32_MAX;
	ram->last_load_block = -1;
	ram->prepop_threads = FERRY_RAM_PREPOPULATE_DEFAULT;
	pthread_mutex_init(&ram->pop.lock, NULL);
	pthread_mutex_init(&ram->req_lock, NULL);
	for (unsigned i = 0; i < nblocks; i++) {
		const struct ferry_ram_block *d = &blocks[i];
		struct ram_block *b = &ram->blocks[i];
		size_t nl = d->name ? strlen(d->name) : 0;

		if (!nl || nl > FERRY_IDSTR_MAX || !d->host ||
		    d->page_size < 4096 || (d->page_size & (d->page_size - 1)) ||
		    !d->size || d->size % d->page_size) {
			ferry_error_set(err, -EINVAL,
				"RAM block %u ('%s'): needs a name, memory, and a "
				"size that is a multiple of a power-of-two page size",
				i, d->name ? d->name : "");
			goto fail;
		}
		for (unsigned j = 0; j < i; j++)
			if (!strcmp(ram->blocks[j].name, d->name)) {
				ferry_error_set(err, -EEXIST, "RAM block '%s' twice",
						d->name);
				goto fail;
			}
		memcpy(b->name, d->name, nl + 1);
		b->host = d->host;
		b->size = d->size;
		b->page_size = d->page_size;
		b->npages = d->size / d->page_size;
		b->bitmap = calloc(words_for(b->npages), sizeof(uint64_t));
		b->scratch = calloc(words_for(b->npages), sizeof(uint64_t));
		b->recv_map = calloc(words_for(b->npages), sizeof(uint64_t));
		ram->nblocks = i + 1;
		if (!b->bitmap || !b->scratch || !b->recv_map) {
			ferry_error_set(err, -ENOMEM, "out of memory");
			goto fail;
		}
		ram->st.total += d->size;
	}
	return ram;
fail:
	ferry_ram_free(ram);
	return NULL;
}

static void prepop_stop(struct ferry_ram *ram);

void ferry_ram_free(struct ferry_ram *ram)
{
	if (!ram)
		return;
	if (ram->tracking && ram->ops && ram->ops->stop)
		ram->ops->stop(ram->opaque);
	prepop_stop(ram);
	for (unsigned i = 0; i < ram->nblocks; i++) {
		free(ram->blocks[i].bitmap);
		free(ram->blocks[i].scratch);
		free(ram->blocks[i].recv_map);
	}
	pthread_mutex_destroy(&ram->pop.lock);
	pthread_mutex_destroy(&ram->req_lock);
	free(ram->reqs);
	free(ram->pc_page);
	free(ram);
}

/* The block table in the form ferry_multifd_set_blocks() takes. */
static int give_blocks(struct ferry_ram *ram, struct ferry_multifd *m,
		       struct ferry_error *err)
{
	struct ferry_ram_block t[FERRY_RAM_MAX_BLOCKS];
	int r;

	for (unsigned i = 0; i < ram->nblocks; i++)
		t[i] = (struct ferry_ram_block){ ram->blocks[i].name,
			ram->blocks[i].host, ram->blocks[i].size,
			ram->blocks[i].page_size };
	r = ferry_multifd_set_blocks(m, t, ram->nblocks, err);
	for (unsigned i = 0; i < ram->nblocks && !r; i++)
		ferry__multifd_track(m, i, ram->blocks[i].recv_map);
	return r;
}

int ferry_ram_set_multifd_send(struct ferry_ram *ram, struct ferry_multifd *m,
			       struct ferry_error *err)
{
	int r = m ? give_blocks(ram, m, err) : 0;

	if (!r)
		ram->mf_send = m;
	return r;
}

int ferry__ram_give_blocks(struct ferry_ram *ram, struct ferry_multifd *m,
			   struct ferry_error *err)
{
	return give_blocks(ram, m, err);
}

void ferry__ram_set_multifd_provider(struct ferry_ram *ram,
	struct ferry_multifd *(*fn)(void *opaque, const uint8_t session[16],
				    unsigned channels, struct ferry_error *err),
	void *opaque)
{
	ram->mf_provider = fn;
	ram->mf_provider_opaque = opaque;
}

int ferry_ram_set_multifd_recv(struct ferry_ram *ram, struct ferry_multifd *m,
			       struct ferry_error *err)
{
	int r = m ? give_blocks(ram, m, err) : 0;

	if (!r)
		ram->mf_recv = m;
	return r;
}

void ferry_ram_set_prepopulate(struct ferry_ram *ram, unsigned threads)
{
	ram->prepop_threads = threads > PREPOP_MAX_THREADS ? PREPOP_MAX_THREADS
							   : threads;
}

void ferry_ram_mark_dirty(struct ferry_ram *ram, unsigned block,
			  uint64_t offset, uint64_t len)
{
	struct ram_block *b;
	uint64_t first, last;

	if (block >= ram->nblocks || !len)
		return;
	b = &ram->blocks[block];
	if (offset >= b->size)
		return;
	if (len > b->size - offset)
		len = b->size - offset;
	first = offset / b->page_size;
	last = (offset + len - 1) / b->page_size;
	for (uint64_t p = first; p <= last; p++) {
		uint64_t bit = 1ull << (p % WORD_BITS);
		/* Release: the caller's writes to the page happen before the
		 * bit is seen set, which the sender's acquiring exchange pairs
		 * with, so it never copies the page older than the mark. */
		uint64_t old = __atomic_fetch_or(&b->bitmap[p / WORD_BITS], bit,
						 __ATOMIC_RELEASE);
		if (!(old & bit)) {
			__atomic_fetch_add(&ram->dirty_pages, 1, __ATOMIC_RELAXED);
			__atomic_fetch_add(&ram->dirty_bytes, b->page_size,
					   __ATOMIC_RELAXED);
		}
	}
}

void ferry_ram_get_stats(struct ferry_ram *ram, struct ferry_ram_stats *st)
{
	uint64_t remaining = 0;

	*st = ram->st;
	remaining = __atomic_load_n(&ram->dirty_bytes, __ATOMIC_RELAXED);
	st->remaining = remaining;
	st->prepopulated = __atomic_load_n(&ram->pop.done, __ATOMIC_RELAXED);
	/* With multifd the channel threads classify pages; take their view. */
	if (ram->mf_send || ram->mf_recv) {
		struct ferry_multifd_stats ms;

		ferry_multifd_get_stats(ram->mf_send ? ram->mf_send : ram->mf_recv,
					&ms);
		st->normal += ms.normal_pages;
		st->duplicate += ms.zero_pages;
		st->normal_bytes += ms.raw_bytes;
		for (unsigned i = 0; i < ms.channels; i++)
			st->transferred += ms.chan[i].bytes;
	}
}

/* OR scratch into the bitmap, counting newly set bits. */
static void merge_scratch(struct ferry_ram *ram, struct ram_block *b,
			  uint64_t *found)
{
	uint64_t n = words_for(b->npages);

	for (uint64_t w = 0; w < n; w++) {
		uint64_t add = b->scratch[w], old;
		if (!add)
			continue;
		*found += (uint64_t)__builtin_popcountll(add);
		old = __atomic_fetch_or(&b->bitmap[w], add, __ATOMIC_RELAXED);
		add = (uint64_t)__builtin_popcountll(add & ~old);
		__atomic_fetch_add(&ram->dirty_pages, add, __ATOMIC_RELAXED);
		__atomic_fetch_add(&ram->dirty_bytes, add * b->page_size,
				   __ATOMIC_RELAXED);
		b->scratch[w] = 0;
	}
}

/* @final: the switchover's, VM stopped (ferry_ram_dirty_ops.sync_final). */
static int ram_sync_how(struct ferry_ram *ram, bool final,
			struct ferry_error *err)
{
	uint64_t found = 0, t0 = ferry__mono_ns();
	int (*sync)(void *, unsigned, uint64_t *, struct ferry_error *);

	if (!ram->ops || !ram->ops->sync)
		return 0;
	sync = final && ram->ops->sync_final ? ram->ops->sync_final :
	       ram->ops->sync;
	for (unsigned i = 0; i < ram->nblocks; i++) {
		struct ram_block *b = &ram->blocks[i];
		int r = sync(ram->opaque, i, b->scratch, err);
		if (r)
			return ferry_error_prefix(err, "RAM block '%s' dirty sync: ",
						  b->name);
		merge_scratch(ram, b, &found);
	}
	ram->st.dirty_sync_count++;
	ram->st.dirty_pages_last_sync = found;
	ram->st.last_sync_ns = ferry__mono_ns() - t0;
	ram->round_done = false;
	return 0;
}

static int ram_sync(struct ferry_ram *ram, struct ferry_error *err)
{
	return ram_sync_how(ram, false, err);
}

/* ---- populated ranges ---------------------------------------------------- */

bool ferry__next_run(const uint64_t *bm, uint64_t n, uint64_t from,
		     uint64_t *start, uint64_t *len)
{
	uint64_t p = from;

	while (p < n) {
		uint64_t w = __atomic_load_n(&bm[p / WORD_BITS], __ATOMIC_RELAXED) >>
			     (p % WORD_BITS);
		if (w) {
			p += (uint64_t)__builtin_ctzll(w);
			break;
		}
		p = (p / WORD_BITS + 1) * WORD_BITS;
	}
	if (p >= n)
		return false;
	*start = p;
	while (p < n) {
		uint64_t w = ~__atomic_load_n(&bm[p / WORD_BITS], __ATOMIC_RELAXED) >>
			     (p % WORD_BITS);
		if (w) {
			p += (uint64_t)__builtin_ctzll(w);
			break;
		}
		p = (p / WORD_BITS + 1) * WORD_BITS;
	}
	*len = (p < n ? p : n) - *start;
	return true;
}

/*
 * Walk block @bi's runs, merging runs less than @gap pages apart; write
 * them to @c if not NULL. Returns the number of ranges.
 */
static uint64_t walk_ranges(struct ferry_ram *ram, unsigned bi, uint64_t gap,
			    struct ferry_chan *c)
{
	struct ram_block *b = &ram->blocks[bi];
	uint64_t n = 0, s, l, cs = 0, cl = 0, from = 0;

	while (ferry__next_run(b->bitmap, b->npages, from, &s, &l)) {
		from = s + l;
		if (cl && s - (cs + cl) < gap) {
			cl = s + l - cs;
			continue;
		}
		if (cl && c) {
			ferry_put_be64(c, cs);
			ferry_put_be64(c, cl);
		}
		n += cl != 0;
		cs = s;
		cl = l;
	}
	if (cl && c) {
		ferry_put_be64(c, cs);
		ferry_put_be64(c, cl);
	}
	return n + (cl != 0);
}

/* One POPULATED record for block @bi: the pages the setup bitmap will send
 * with data, as (first page, pages) ranges. Over the cap, nearby ranges are
 * merged - populating a few extra pages is harmless, a huge list is not. */
static void put_populated(struct ferry_ram *ram, struct ferry_chan *c,
			  unsigned bi)
{
	uint64_t budget = FERRY_RAM_POPULATED_MAX_RANGES / ram->nblocks;
	uint64_t gap = 1, n;

	while ((n = walk_ranges(ram, bi, gap, NULL)) > budget)
		gap *= 2;
	if (!n)
		return;
	ferry_put_be64(c, FERRY_RAM_POPULATED);
	ferry_put_be32(c, bi);
	ferry_put_be32(c, (uint32_t)n);
	walk_ranges(ram, bi, gap, c);
}

/* ---- prepopulate helpers (destination) ---------------------------------- */

static void *prepop_main(void *arg)
{
	struct ferry_ram *ram = arg;
	struct prepop *pp = &ram->pop;
	uintptr_t sys = (uintptr_t)sysconf(_SC_PAGESIZE);

	for (;;) {
		const struct pop_range *r;
		uintptr_t a, e;
		uint64_t off, len, chunk;

		if (__atomic_load_n(&pp->stop, __ATOMIC_RELAXED))
			return NULL;
		pthread_mutex_lock(&pp->lock);
		if (pp->next_range >= pp->nranges) {
			pthread_mutex_unlock(&pp->lock);
			return NULL;
		}
		r = &pp->ranges[pp->next_range];
		off = pp->next_off;
		chunk = __atomic_load_n(&ram->pc_advised, __ATOMIC_RELAXED) ?
			PREPOP_CHUNK_PC : PREPOP_CHUNK;
		len = r->len - off < chunk ? r->len - off : chunk;
		pp->next_off += len;
		if (pp->next_off == r->len) {
			pp->next_range++;
			pp->next_off = 0;
		}
		pthread_mutex_unlock(&pp->lock);

		/* Inward to whole host pages: never touch a neighbour. */
		a = (uintptr_t)ram->blocks[r->block].host + r->start + off;
		e = (a + len) & ~(sys - 1);
		a = (a + sys - 1) & ~(sys - 1);
		if (e <= a)
			continue;
		while (madvise((void *)a, e - a, MADV_POPULATE_WRITE)) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			/* Unsupported kernel or memory: the receivers fault
			 * pages in themselves, as without prepopulation. */
			__atomic_store_n(&pp->failed, errno, __ATOMIC_RELAXED);
			__atomic_store_n(&pp->stop, true, __ATOMIC_RELAXED);
			return NULL;
		}
		__atomic_fetch_add(&pp->done, e - a, __ATOMIC_RELAXED);
	}
}

static void prepop_start(struct ferry_ram *ram)
{
	struct prepop *pp = &ram->pop;

	pp->next_range = 0;
	pp->next_off = 0;
	__atomic_store_n(&pp->stop, false, __ATOMIC_RELAXED);
	for (unsigned i = 0; i < ram->prepop_threads && pp->nranges; i++) {
		/* A helper that cannot start costs speed, not correctness. */
		if (pthread_create(&pp->threads[pp->nthreads], NULL, prepop_main,
				   ram))
			break;
		pp->nthreads++;
	}
}

void ferry__ram_prepop_stop(struct ferry_ram *ram)
{
	prepop_stop(ram);
}

static void prepop_stop(struct ferry_ram *ram)
{
	struct prepop *pp = &ram->pop;

	__atomic_store_n(&pp->stop, true, __ATOMIC_RELAXED);
	for (unsigned i = 0; i < pp->nthreads; i++)
		pthread_join(pp->threads[i], NULL);
	pp->nthreads = 0;
	free(pp->ranges);
	pp->ranges = NULL;
	pp->nranges = pp->cap = 0;
}

/* ---- save hooks --------------------------------------------------------- */

/* The counters describe one migration, not the VM's life (a VM migrated
 * twice, or after a failed attempt, reports the last one). The thread
 * that owns them (migration or load thread) resets them at its setup. */
static void reset_counters(struct ferry_ram *ram)
{
	uint64_t total = ram->st.total;

	memset(&ram->st, 0, sizeof(ram->st));
	ram->st.total = total;
}

static int ram_save_setup(struct ferry_chan *c, void *opaque,
			  struct ferry_error *err)
{
	struct ferry_ram *ram = opaque;
	int r;

	reset_counters(ram);
	ram->cur_block = 0;
	ram->cur_page = 0;
	ram->round_done = false;
	ram->last_sent_block = UINT32_MAX;
	ram->mf_unsynced = false;
	ram->iterated = false;
	/* Track first, then look: see the design note at the top. */
	if (ram->ops && ram->ops->start) {
		r = ram->ops->start(ram->opaque, err);
		if (r)
			return ferry_error_prefix(err, "RAM: starting dirty tracking: ");
		ram->tracking = true;
	}
	for (unsigned i = 0; i < ram->nblocks; i++) {
		struct ram_block *b = &ram->blocks[i];
		uint64_t n = words_for(b->npages), found = 0;

		/* VMM threads may mark pages dirty right now: clear word by
		 * word and count what was cleared, so the counters always
		 * match the bits (a reset to zero beside a concurrent mark
		 * would let them wrap below zero). A mark lost here is of a
		 * page written before the look below, which finds it. */
		for (uint64_t w = 0; w < n; w++) {
			uint64_t old = __atomic_exchange_n(&b->bitmap[w], 0,
							   __ATOMIC_ACQ_REL);
			uint64_t k = (uint64_t)__builtin_popcountll(old);

			__atomic_fetch_sub(&ram->dirty_pages, k, __ATOMIC_RELAXED);
			__atomic_fetch_sub(&ram->dirty_bytes, k * b->page_size,
					   __ATOMIC_RELAXED);
		}
		if (ram->ops && ram->ops->populated) {
			memset(b->scratch, 0, n * sizeof(uint64_t));
			r = ram->ops->populated(ram->opaque, i, b->scratch, err);
			if (r)
				return ferry_error_prefix(err, "RAM block '%s': ",
							  b->name);
		} else {
			memset(b->scratch, 0xff, n * sizeof(uint64_t));
			if (b->npages % WORD_BITS)
				b->scratch[n - 1] = (1ull << (b->npages % WORD_BITS)) - 1;
		}
		merge_scratch(ram, b, &found);
		ram->st.skipped += b->npages - found;
	}
	ferry_put_be32(c, ram->nblocks);
	for (unsigned i = 0; i < ram->nblocks; i++) {
		ferry_put_str8(c, ram->blocks[i].name);
		ferry_put_be64(c, ram->blocks[i].size);
		ferry_put_be32(c, ram->blocks[i].page_size);
	}
	if (ram->mf_send) {
		uint8_t session[16];

		ferry_multifd_session(ram->mf_send, session);
		ferry_put_be64(c, FERRY_RAM_MULTIFD);
		ferry_put_buf(c, session, sizeof(session));
		ferry_put_be32(c, ferry_multifd_channels(ram->mf_send));
		ferry_put_be32(c, ferry_multifd_compression(ram->mf_send));
	}
	/* Only a VMM that knows what is populated can say what is not: without
	 * the hook every page counts, and populating all of RAM would commit
	 * memory that zero markers would have left alone. */
	if (ram->prepop_threads && ram->ops && ram->ops->populated)
		for (unsigned i = 0; i < ram->nblocks; i++)
			put_populated(ram, c, i);
	ferry_put_be64(c, FERRY_RAM_EOS);
	return ferry_chan_error(c, err);
}

static void ram_save_pending(void *opaque, bool exact, uint64_t *must,
			     uint64_t *can)
{
	struct ferry_ram *ram = opaque;

	/* A sync that fails here surfaces on the next iterate, which syncs
	 * again and reports the error. With nothing left to send a walk
	 * never runs, so it never ends: sync then too, or a caller waiting
	 * for the next sync would wait for ever. In postcopy the VM is
	 * stopped here: nothing new can be dirty. */
	if (exact && !ram->pc_mode && (ram->round_done ||
		      !__atomic_load_n(&ram->dirty_pages, __ATOMIC_RELAXED)))
		ram_sync(ram, NULL);
	*must += __atomic_load_n(&ram->dirty_bytes, __ATOMIC_RELAXED);
	*can += 0;
}

/* Send one page; the caller has already cleared its bit. */
uint64_t ferry__ram_send_page(struct ferry_ram *ram, struct ferry_chan *c,
			  unsigned bi, uint64_t page)
{
	struct ram_block *b = &ram->blocks[bi];
	uint64_t off = page * b->page_size;
	const uint8_t *p = b->host + off;
	bool zero = ferry__page_is_zero(p, b->page_size);
	uint64_t hdr = off | (zero ? FERRY_RAM_ZERO : FERRY_RAM_PAGE);
	uint64_t bytes = 8;

	if (ram->last_sent_block == bi)
		hdr |= FERRY_RAM_CONTINUE;
	ferry_put_be64(c, hdr);
	if (ram->last_sent_block != bi) {
		ferry_put_str8(c, b->name);
		bytes += 1 + strlen(b->name);
		ram->last_sent_block = bi;
	}
	if (zero) {
		ram->st.duplicate++;
	} else {
		ferry_put_buf(c, p, b->page_size);
		bytes += b->page_size;
		ram->st.normal++;
		ram->st.normal_bytes += b->page_size;
	}
	ram->st.transferred += bytes;
	return bytes;
}

/* A multifd sync point, and its MULTIFD_FLUSH record in the section. */
static int mf_flush(struct ferry_ram *ram, struct ferry_chan *c,
		    struct ferry_error *err)
{
	int r = ferry_multifd_send_sync(ram->mf_send, err);

	if (r) {
		/* (prefix returns 0 when the caller passed no error object) */
		ferry_error_prefix(err, "RAM: ");
		return r;
	}
	ferry_put_be64(c, FERRY_RAM_MULTIFD_FLUSH);
	ram->mf_unsynced = false;
	ram->st.multifd_syncs++;
	return 0;
}

/*
 * Send dirty pages from the cursor until @budget bytes (0 = until the end
 * of the bitmaps). Returns with round_done set if the walk reached the end.
 * With @mf (multifd), pages are queued to the channels and a finished walk
 * that queued pages ends with a sync point.
 */
static int send_dirty(struct ferry_ram *ram, struct ferry_chan *c,
		      uint64_t budget, struct ferry_multifd *mf,
		      struct ferry_error *err)
{
	uint64_t sent = 0;
	int r;

	/* Each section names its block again: a section can be loaded (or
	 * inspected) without the previous one. */
	ram->last_sent_block = UINT32_MAX;
	while (ram->cur_block < ram->nblocks) {
		struct ram_block *b = &ram->blocks[ram->cur_block];
		uint64_t nw = words_for(b->npages);

		for (uint64_t w = ram->cur_page / WORD_BITS; w < nw; w++) {
			uint64_t bits;

			if (!__atomic_load_n(&b->bitmap[w], __ATOMIC_RELAXED))
				continue;
			/* Take the whole word: bits set after this exchange
			 * belong to later rounds. */
			bits = __atomic_exchange_n(&b->bitmap[w], 0, __ATOMIC_ACQ_REL);
			__atomic_fetch_sub(&ram->dirty_pages,
					   (uint64_t)__builtin_popcountll(bits),
					   __ATOMIC_RELAXED);
			__atomic_fetch_sub(&ram->dirty_bytes,
					   (uint64_t)__builtin_popcountll(bits) *
					   b->page_size, __ATOMIC_RELAXED);
			while (bits) {
				unsigned bit = (unsigned)__builtin_ctzll(bits);
				uint64_t pg = w * WORD_BITS + bit;

				bits &= bits - 1;
				if (!mf) {
					sent += ferry__ram_send_page(ram, c, ram->cur_block, pg);
					continue;
				}
				/* Only the address moves here; a channel
				 * thread reads the page later. */
				r = ferry_multifd_queue_page(mf, ram->cur_block,
							     pg * b->page_size, err);
				if (r) {
					ferry_error_prefix(err, "RAM: ");
					return r;
				}
				ram->mf_unsynced = true;
				sent += b->page_size;
			}
			if (budget && sent >= budget) {
				ram->cur_page = (w + 1) * WORD_BITS;
				if (w + 1 < nw)
					goto out;
				break;
			}
		}
		ram->cur_block++;
		ram->cur_page = 0;
		/* A budget used up on the last word of the last block still
		 * ends the round here: left for the next call, the round's
		 * end would come as an empty walk after the next sync. */
		if (budget && sent >= budget && ram->cur_block < ram->nblocks)
			goto out;
	}
	/* End of the bitmaps: the round is complete. */
	ram->cur_block = 0;
	ram->cur_page = 0;
	ram->round_done = true;
	ram->st.rounds++;
	/* The next walk may send these pages again: nothing of it may
	 * overtake this one on another channel. */
	if (mf && ram->mf_unsynced && (r = mf_flush(ram, c, err)))
		return r;
out:
	ferry_put_be64(c, FERRY_RAM_EOS);
	return 0;
}

static int ram_save_iterate(struct ferry_chan *c, void *opaque, uint64_t budget,
			    struct ferry_error *err)
{
	struct ferry_ram *ram = opaque;
	int r;

	/* With multifd, the first PART carries no pages: its round ends with
	 * a flush of the main stream, which delivers START - the session and
	 * the populated ranges - before any page flows on the channels, so
	 * the destination prepopulates ahead of the bulk of the data. */
	if (ram->mf_send && !ram->iterated) {
		ram->iterated = true;
		ferry_put_be64(c, FERRY_RAM_EOS);
		return ferry_chan_error(c, err);
	}
	ram->iterated = true;
	if (ram->pc_mode) {
		/* Postcopy: what the destination waits for first, then the
		 * background from near it, over the main stream. */
		ram->last_sent_block = UINT32_MAX;
		ferry__ram_pc_send_requests(ram, c);
		ferry__ram_pc_follow_hint(ram);
		ram->round_done = false;
		if ((r = send_dirty(ram, c, budget, NULL, err)))
			return r;
		return ferry_chan_error(c, err);
	}
	if (ram->round_done && (r = ram_sync(ram, err)))
		return r;
	if ((r = send_dirty(ram, c, budget, ram->mf_send, err)))
		return r;
	return ferry_chan_error(c, err);
}

static int ram_save_complete(struct ferry_chan *c, void *opaque,
			     struct ferry_error *err)
{
	struct ferry_ram *ram = opaque;
	int r;

	/*
	 * Multifd: the final sync point comes first. The destination's load
	 * stops at its MULTIFD_FLUSH until every channel has applied every
	 * page queued so far, and only then reads on. The last pass (pages
	 * dirtied since the drain rounds: few, the vCPUs are paused) goes in
	 * this END section itself, after the flush. Queueing it to the
	 * channels instead would put pages behind a sync point in the same
	 * section: the destination's channels wait at that sync point for
	 * the load thread, which waits for this section, which would wait
	 * for the channels - a deadlock. It would also repeat pages of an
	 * unfinished pass without a sync point between the two copies.
	 */
	if (ram->pc_mode) {
		/* Postcopy's end: normally nothing is left by now. */
		ram->last_sent_block = UINT32_MAX;
		ferry__ram_pc_send_requests(ram, c);
		ram->cur_block = 0;
		ram->cur_page = 0;
		if ((r = send_dirty(ram, c, 0, NULL, err)))
			return r;
		return ferry_chan_error(c, err);
	}
	if (ram->mf_send && (r = mf_flush(ram, c, err)))
		return r;
	/* vCPUs are paused: this sync is final. Send everything. */
	r = ram_sync_how(ram, true, err);
	if (r)
		return r;
	ram->cur_block = 0;
	ram->cur_page = 0;
	if ((r = send_dirty(ram, c, 0, NULL, err)))
		return r;
	return ferry_chan_error(c, err);
}

/* Before postcopy's switch, VM still running: a multifd sync point, so
 * the pages in flight on the channels are applied before what follows,
 * and a dirty sync, so the bitmaps hold every page that will be sent again
 * - the engine discards them now, while the VM runs, and the switch only
 * drops what the guest writes from here to the stop. No page is sent in
 * between, so no discard can overtake a newer copy. */
int ferry__ram_pc_prepare_section(struct ferry_chan *c, void *opaque,
				  struct ferry_error *err)
{
	struct ferry_ram *ram = opaque;
	int r;

	if (ram->mf_send && ram->mf_unsynced && (r = mf_flush(ram, c, err)))
		return r;
	if ((r = ram_sync(ram, err)))
		return r;
	ferry_put_be64(c, FERRY_RAM_EOS);
	return ferry_chan_error(c, err);
}

/* The switch to postcopy, as a RAM PART section (VM stopped): the last
 * multifd sync point - the destination applies every page sent so far
 * before it reads the DISCARDs that follow - and the final dirty sync,
 * after which the bitmaps hold exactly the pages still to send. The sync
 * point only if pages went to the channels since the last one: after the
 * prepare section none have, and an empty sync point cost 0.2-0.6 ms of
 * downtime. */
int ferry__ram_pc_switch_section(struct ferry_chan *c, void *opaque,
				 struct ferry_error *err)
{
	struct ferry_ram *ram = opaque;
	int r;

	if (ram->mf_send && ram->mf_unsynced && (r = mf_flush(ram, c, err)))
		return r;
	if ((r = ram_sync_how(ram, true, err)))
		return r;
	ferry__ram_pc_enter(ram);
	ram->cur_block = 0;
	ram->cur_page = 0;
	ferry_put_be64(c, FERRY_RAM_EOS);
	return ferry_chan_error(c, err);
}

static void ram_save_cleanup(void *opaque)
{
	struct ferry_ram *ram = opaque;

	if (ram->tracking && ram->ops && ram->ops->stop)
		ram->ops->stop(ram->opaque);
	ram->tracking = false;
	ram->pc_mode = false;
	ferry__mutex_lock(&ram->req_lock);
	ram->nreqs = 0;
	ferry__mutex_unlock(&ram->req_lock);
	__atomic_store_n(&ram->pc_hint, 0, __ATOMIC_RELAXED);
}

/* ---- load hooks --------------------------------------------------------- */

static int ram_load_setup(void *opaque, struct ferry_error *err)
{
	struct ferry_ram *ram = opaque;
	(void)err;
	prepop_stop(ram);
	reset_counters(ram);
	__atomic_store_n(&ram->pop.done, 0, __ATOMIC_RELAXED);
	ram->load_sections = 0;
	ram->last_load_block = -1;
	return 0;
}

static void ram_load_cleanup(void *opaque)
{
	struct ferry_ram *ram = opaque;

	prepop_stop(ram);
	/* Cleared after a load, not before the next: a multifd channel may
	 * place a page before the load thread gets to its setup. Not while
	 * a postcopy that broke after RUN still holds it. */
	for (unsigned i = 0; i < ram->nblocks && !ram->pcd; i++)
		for (uint64_t w = 0; w < words_for(ram->blocks[i].npages); w++)
			__atomic_store_n(&ram->blocks[i].recv_map[w], 0,
					 __ATOMIC_RELAXED);
}

/* A POPULATED record: block index, count, sorted disjoint in-block ranges.
 * Kept (for the helpers) only when prepopulation is on here. */
static int load_populated(struct ferry_ram *ram, struct ferry_chan *c,
			  uint64_t *seen, struct ferry_error *err)
{
	struct prepop *pp = &ram->pop;
	uint32_t bi = ferry_get_be32(c), n = ferry_get_be32(c);
	uint64_t prev_end = 0;
	struct ram_block *b;

	if (ferry_chan_error(c, err))
		return ferry_chan_error(c, err);
	if (bi >= ram->nblocks || (*seen & (1ull << bi)))
		return ferry_error_set(err, -EBADMSG,
			"populated ranges for RAM block %u: no such block, or twice",
			bi);
	*seen |= 1ull << bi;
	b = &ram->blocks[bi];
	if (!n || n > FERRY_RAM_POPULATED_MAX_RANGES - pp->nranges)
		return ferry_error_set(err, -EBADMSG,
			"RAM block '%s': %u populated ranges (1..%u in all)",
			b->name, n, FERRY_RAM_POPULATED_MAX_RANGES);
	for (uint32_t i = 0; i < n; i++) {
		uint64_t first = ferry_get_be64(c), len = ferry_get_be64(c);

		if (ferry_chan_error(c, err))
			return ferry_chan_error(c, err);
		if (!len || first < prev_end || first >= b->npages ||
		    len > b->npages - first)
			return ferry_error_set(err, -EBADMSG,
				"RAM block '%s': populated range %u (page %llu, "
				"%llu pages) is empty, out of order or outside "
				"the block (%llu pages)", b->name, i,
				(unsigned long long)first, (unsigned long long)len,
				(unsigned long long)b->npages);
		prev_end = first + len;
		if (!ram->prepop_threads)
			continue;
		if (pp->nranges == pp->cap) {
			size_t nc = pp->cap ? pp->cap * 2 : 64;
			struct pop_range *nr = realloc(pp->ranges, nc * sizeof(*nr));
			if (!nr)
				return ferry_error_set(err, -ENOMEM, "out of memory");
			pp->ranges = nr;
			pp->cap = nc;
		}
		pp->ranges[pp->nranges++] = (struct pop_range){
			bi, first * b->page_size, len * b->page_size };
	}
	return 0;
}

static int load_multifd(struct ferry_ram *ram, struct ferry_chan *c,
			bool *seen, struct ferry_error *err)
{
	uint8_t session[16];
	uint32_t channels, comp;

	ferry_get_buf(c, session, sizeof(session));
	channels = ferry_get_be32(c);
	comp = ferry_get_be32(c);
	if (ferry_chan_error(c, err))
		return ferry_chan_error(c, err);
	if (*seen)
		return ferry_error_set(err, -EBADMSG, "RAM: multifd announced twice");
	*seen = true;
	/* The engine's receiver is made now, for this session: the channels
	 * that came first waited for it, those to come join it. */
	if (!ram->mf_recv && ram->mf_provider &&
	    !(ram->mf_recv = ram->mf_provider(ram->mf_provider_opaque, session,
					      channels, err)))
		return err && err->code ? err->code : -EIO;
	if (!ram->mf_recv)
		return ferry_error_set(err, -EOPNOTSUPP,
			"the source sends RAM over %u multifd channels; this "
			"destination has no multifd channels", channels);
	return ferry_multifd_recv_expect(ram->mf_recv, session, channels, comp,
					 err);
}

static int load_blocks(struct ferry_ram *ram, struct ferry_chan *c,
		       struct ferry_error *err)
{
	uint64_t pop_seen = 0;
	bool mf_seen = false;
	int r;

	uint32_t n = ferry_get_be32(c);

	if (ferry_chan_error(c, err))
		return ferry_chan_error(c, err);
	if (n != ram->nblocks)
		return ferry_error_set(err, -EINVAL,
			"source has %u RAM blocks, this VM has %u", n, ram->nblocks);
	for (uint32_t i = 0; i < n; i++) {
		char name[FERRY_IDSTR_MAX + 1];
		uint64_t size;
		uint32_t ps;

		ferry_get_str8(c, name, sizeof(name));
		size = ferry_get_be64(c);
		ps = ferry_get_be32(c);
		if (ferry_chan_error(c, err))
			return ferry_chan_error(c, err);
		if (strcmp(name, ram->blocks[i].name) || size != ram->blocks[i].size ||
		    ps != ram->blocks[i].page_size)
			return ferry_error_set(err, -EINVAL,
				"RAM block %u: source has '%s' (%llu bytes, %u-byte "
				"pages), this VM has '%s' (%llu bytes, %u-byte pages)",
				i, name, (unsigned long long)size, ps,
				ram->blocks[i].name,
				(unsigned long long)ram->blocks[i].size,
				ram->blocks[i].page_size);
	}
	/* Version 2: optional setup records before the EOS. */
	for (;;) {
		uint64_t rec = ferry_get_be64(c);

		if ((r = ferry_chan_error(c, err)))
			return r;
		if (rec == FERRY_RAM_EOS)
			break;
		if (ram->load_version < 2 ||
		    (rec != FERRY_RAM_MULTIFD && rec != FERRY_RAM_POPULATED))
			return ferry_error_set(err, -EBADMSG,
				"RAM block list not terminated (record 0x%llx)",
				(unsigned long long)rec);
		r = rec == FERRY_RAM_MULTIFD ? load_multifd(ram, c, &mf_seen, err)
					     : load_populated(ram, c, &pop_seen, err);
		if (r)
			return r;
	}
	/* The pages come after this section: start faulting in now. */
	prepop_start(ram);
	return 0;
}

static int load_pages_run(struct ferry_ram *ram, struct ferry_chan *c,
			  struct ferry_error *err);

/* Postcopy: place the staged run of background pages (listen thread). */
static int pc_flush(struct ferry_ram *ram, struct ferry_error *err)
{
	unsigned n = ram->pc_run_n;

	if (!n)
		return 0;
	ram->pc_run_n = 0;
	return ferry__pcd_place_run(ram->pcd, ram->pc_run_block, ram->pc_run_off,
				    n, ram->pc_page, err);
}

static int load_pages(struct ferry_ram *ram, struct ferry_chan *c,
		      struct ferry_error *err)
{
	/* A run never outlives its section: the end of each (EOS) places it,
	 * so no page waits here while the stream waits for the next. */
	int r = load_pages_run(ram, c, err);

	if (ram->pcd) {
		int f = pc_flush(ram, r ? NULL : err);

		if (!r)
			r = f;
	}
	return r;
}

static int load_pages_run(struct ferry_ram *ram, struct ferry_chan *c,
			  struct ferry_error *err)
{
	for (;;) {
		uint64_t hdr = ferry_get_be64(c), flags, off;
		struct ram_block *b;
		uint8_t *p;

		if (ferry_chan_error(c, err))
			return ferry_chan_error(c, err);
		flags = hdr & FERRY_RAM_FLAGS;
		off = hdr & ~FERRY_RAM_FLAGS;
		if (flags == FERRY_RAM_EOS && !off)
			return 0;
		if (flags == FERRY_RAM_MULTIFD_FLUSH && !off) {
			int r;

			if (ram->load_version < 2 || !ram->mf_recv)
				return ferry_error_set(err, -EBADMSG,
					"RAM: multifd sync point, but no multifd "
					"channels were announced");
			r = ferry_multifd_recv_sync(ram->mf_recv, err);
			if (r) {
				ferry_error_prefix(err, "RAM: waiting for the "
						   "multifd channels: ");
				return r;
			}
			ram->st.multifd_syncs++;
			continue;
		}
		if (flags & ~(FERRY_RAM_ZERO | FERRY_RAM_PAGE | FERRY_RAM_CONTINUE) ||
		    !(flags & (FERRY_RAM_ZERO | FERRY_RAM_PAGE)) ||
		    (flags & FERRY_RAM_ZERO && flags & FERRY_RAM_PAGE))
			return ferry_error_set(err, -EBADMSG,
				"bad RAM record flags 0x%llx", (unsigned long long)flags);
		if (!(flags & FERRY_RAM_CONTINUE)) {
			char name[FERRY_IDSTR_MAX + 1];
			unsigned i;

			ferry_get_str8(c, name, sizeof(name));
			if (ferry_chan_error(c, err))
				return ferry_chan_error(c, err);
			for (i = 0; i < ram->nblocks; i++)
				if (!strcmp(ram->blocks[i].name, name))
					break;
			if (i == ram->nblocks)
				return ferry_error_set(err, -EINVAL,
					"page for unknown RAM block '%s'", name);
			ram->last_load_block = (int)i;
		} else if (ram->last_load_block < 0) {
			return ferry_error_set(err, -EBADMSG,
				"RAM record continues a block never named");
		}
		b = &ram->blocks[ram->last_load_block];
		if (off % b->page_size || off >= b->size)
			return ferry_error_set(err, -ERANGE,
				"RAM block '%s': page offset 0x%llx outside the "
				"block (0x%llx bytes) or unaligned", b->name,
				(unsigned long long)off, (unsigned long long)b->size);
		p = b->host + off;
		if (ram->pcd) {
			/* Postcopy: RAM is registered with userfaultfd, so a
			 * page goes in whole and atomically, never by a write
			 * that would fault on the missing page itself. Pages
			 * that follow each other in one block are staged and
			 * placed as a run; anything else places the run first. */
			unsigned bi = (unsigned)ram->last_load_block;
			int r;

			if (ram->pc_run_n && (!(flags & FERRY_RAM_PAGE) ||
			    bi != ram->pc_run_block ||
			    off != ram->pc_run_off + ram->pc_run_n * b->page_size ||
			    ram->pc_run_n == FERRY_PC_RUN_PAGES) &&
			    (r = pc_flush(ram, err)))
				return r;
			if (flags & FERRY_RAM_PAGE) {
				if (!ram->pc_run_n) {
					ram->pc_run_block = bi;
					ram->pc_run_off = off;
				}
				ferry_get_buf(c, ram->pc_page + (size_t)ram->pc_run_n *
					      b->page_size, b->page_size);
				if ((r = ferry_chan_error(c, err)))
					return r;
				ram->pc_run_n++;
				ram->st.normal++;
				continue;
			}
			r = ferry__pcd_place(ram->pcd, bi, off, NULL, err);
			if (r)
				return r;
			ram->st.duplicate++;
			continue;
		}
		__atomic_fetch_or(&b->recv_map[off / b->page_size / WORD_BITS],
				  1ull << (off / b->page_size % WORD_BITS),
				  __ATOMIC_RELAXED);
		if (flags & FERRY_RAM_PAGE) {
			ferry_get_buf(c, p, b->page_size);
			ram->st.normal++;
		} else {
			if (!ferry__page_is_zero(p, b->page_size))
				memset(p, 0, b->page_size);
			ram->st.duplicate++;
		}
	}
}

static int ram_load_state(struct ferry_chan *c, void *opaque, uint32_t version,
			  struct ferry_error *err)
{
	struct ferry_ram *ram = opaque;
	int r;

	/* The first section of the stream (START) carries the block list;
	 * every later one carries pages. */
	if (ram->load_sections++ == 0) {
		ram->load_version = version;
		return load_blocks(ram, c, err);
	}
	/* A channel failure shows here without waiting for a sync point.
	 * Not in postcopy, which does not use the channels: a link that
	 * broke took them too, and recovery goes on without them. */
	if (ram->mf_recv && !ram->pcd &&
	    (r = ferry_multifd_error(ram->mf_recv, err))) {
		ferry_error_prefix(err, "RAM: ");
		return r;
	}
	return load_pages(ram, c, err);
}

static const struct ferry_dev_ops ram_ops = {
	.size = sizeof(struct ferry_dev_ops),
	.save_setup = ram_save_setup,
	.save_pending = ram_save_pending,
	.save_iterate = ram_save_iterate,
	.save_complete = ram_save_complete,
	.save_cleanup = ram_save_cleanup,
	.load_setup = ram_load_setup,
	.load_state = ram_load_state,
	.load_cleanup = ram_load_cleanup,
};

int ferry_ram_register(struct ferry_ram *ram, struct ferry_ctx *ctx,
		       struct ferry_error *err)
{
	/* Version 2 adds the START setup records and MULTIFD_FLUSH; version 1
	 * streams have neither and still load. */
	return ferry_register(ctx, "ram", 0, 2, 1, &ram_ops, ram, err);
}
