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
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ferry/ram.h"

struct ram_block {
	char name[FERRY_IDSTR_MAX + 1];
	uint8_t *host;
	uint64_t size;
	uint32_t page_size;
	uint64_t npages;
	uint64_t *bitmap;     /* source: pages to send (atomic words) */
	uint64_t *scratch;    /* source: sync/populated staging */
};

struct ferry_ram {
	struct ram_block blocks[FERRY_RAM_MAX_BLOCKS];
	unsigned nblocks;
	const struct ferry_ram_dirty_ops *ops;
	void *opaque;
	bool tracking;

	/* Migration thread only. */
	unsigned cur_block;   /* round cursor */
	uint64_t cur_page;
	bool round_done;      /* a walk reached the end since the last sync */
	unsigned last_sent_block; /* for CONTINUE; UINT32_MAX = none yet */
	unsigned load_sections;   /* destination: sections loaded */
	int last_load_block;      /* destination: block of the last record */

	/* Counters: written by the migration thread, read by anyone. */
	uint64_t dirty_pages; /* bits set across all bitmaps (approximate) */
	struct ferry_ram_stats st;
};

#define WORD_BITS 64u

static uint64_t words_for(uint64_t npages)
{
	return (npages + WORD_BITS - 1) / WORD_BITS;
}

static bool page_is_zero(const uint8_t *p, size_t len)
{
	const uint64_t *w = (const uint64_t *)p;
	uint64_t acc = 0;

	/* Early exit on the first word: most data pages fail here. */
	if (w[0])
		return false;
	for (size_t i = 0; i < len / 8; i += 8) {
		acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] |
		       w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
		if (acc)
			return false;
	}
	return true;
}

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
	ram->ops = ops;
	ram->opaque = opaque;
	ram->last_sent_block = UINT32_MAX;
	ram->last_load_block = -1;
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
		ram->nblocks = i + 1;
		if (!b->bitmap || !b->scratch) {
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

void ferry_ram_free(struct ferry_ram *ram)
{
	if (!ram)
		return;
	if (ram->tracking && ram->ops && ram->ops->stop)
		ram->ops->stop(ram->opaque);
	for (unsigned i = 0; i < ram->nblocks; i++) {
		free(ram->blocks[i].bitmap);
		free(ram->blocks[i].scratch);
	}
	free(ram);
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
		uint64_t old = __atomic_fetch_or(&b->bitmap[p / WORD_BITS], bit,
						 __ATOMIC_RELAXED);
		if (!(old & bit))
			__atomic_fetch_add(&ram->dirty_pages, 1, __ATOMIC_RELAXED);
	}
}

void ferry_ram_get_stats(struct ferry_ram *ram, struct ferry_ram_stats *st)
{
	uint64_t remaining = 0;

	*st = ram->st;
	/* Pages differ in size only between blocks; use the first block's. */
	remaining = __atomic_load_n(&ram->dirty_pages, __ATOMIC_RELAXED) *
		    ram->blocks[0].page_size;
	st->remaining = remaining;
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
		__atomic_fetch_add(&ram->dirty_pages,
				   (uint64_t)__builtin_popcountll(add & ~old),
				   __ATOMIC_RELAXED);
		b->scratch[w] = 0;
	}
}

static int ram_sync(struct ferry_ram *ram, struct ferry_error *err)
{
	uint64_t found = 0;

	if (!ram->ops || !ram->ops->sync)
		return 0;
	for (unsigned i = 0; i < ram->nblocks; i++) {
		struct ram_block *b = &ram->blocks[i];
		int r = ram->ops->sync(ram->opaque, i, b->scratch, err);
		if (r)
			return ferry_error_prefix(err, "RAM block '%s' dirty sync: ",
						  b->name);
		merge_scratch(ram, b, &found);
	}
	ram->st.dirty_sync_count++;
	ram->st.dirty_pages_last_sync = found;
	ram->round_done = false;
	return 0;
}

/* ---- save hooks --------------------------------------------------------- */

static int ram_save_setup(struct ferry_chan *c, void *opaque,
			  struct ferry_error *err)
{
	struct ferry_ram *ram = opaque;
	int r;

	ram->cur_block = 0;
	ram->cur_page = 0;
	ram->round_done = false;
	ram->last_sent_block = UINT32_MAX;
	__atomic_store_n(&ram->dirty_pages, 0, __ATOMIC_RELAXED);
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

		memset(b->bitmap, 0, n * sizeof(uint64_t));
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
	ferry_put_be64(c, FERRY_RAM_EOS);
	return ferry_chan_error(c, err);
}

static void ram_save_pending(void *opaque, bool exact, uint64_t *must,
			     uint64_t *can)
{
	struct ferry_ram *ram = opaque;

	/* A sync that fails here surfaces on the next iterate, which syncs
	 * again and reports the error. */
	if (exact && ram->round_done)
		ram_sync(ram, NULL);
	*must += __atomic_load_n(&ram->dirty_pages, __ATOMIC_RELAXED) *
		 ram->blocks[0].page_size;
	*can += 0;
}

/* Send one page; the caller has already cleared its bit. */
static uint64_t send_page(struct ferry_ram *ram, struct ferry_chan *c,
			  unsigned bi, uint64_t page)
{
	struct ram_block *b = &ram->blocks[bi];
	uint64_t off = page * b->page_size;
	const uint8_t *p = b->host + off;
	bool zero = page_is_zero(p, b->page_size);
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

/*
 * Send dirty pages from the cursor until @budget bytes (0 = until the end
 * of the bitmaps). Returns with round_done set if the walk reached the end.
 */
static void send_dirty(struct ferry_ram *ram, struct ferry_chan *c,
		       uint64_t budget)
{
	uint64_t sent = 0;

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
			while (bits) {
				unsigned bit = (unsigned)__builtin_ctzll(bits);
				bits &= bits - 1;
				sent += send_page(ram, c, ram->cur_block,
						  w * WORD_BITS + bit);
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
		if (budget && sent >= budget)
			goto out;
	}
	/* End of the bitmaps: the round is complete. */
	ram->cur_block = 0;
	ram->cur_page = 0;
	ram->round_done = true;
	ram->st.rounds++;
out:
	ferry_put_be64(c, FERRY_RAM_EOS);
}

static int ram_save_iterate(struct ferry_chan *c, void *opaque, uint64_t budget,
			    struct ferry_error *err)
{
	struct ferry_ram *ram = opaque;
	int r;

	if (ram->round_done && (r = ram_sync(ram, err)))
		return r;
	send_dirty(ram, c, budget);
	return ferry_chan_error(c, err);
}

static int ram_save_complete(struct ferry_chan *c, void *opaque,
			     struct ferry_error *err)
{
	struct ferry_ram *ram = opaque;
	int r;

	/* vCPUs are paused: this sync is final. Send everything. */
	r = ram_sync(ram, err);
	if (r)
		return r;
	ram->cur_block = 0;
	ram->cur_page = 0;
	send_dirty(ram, c, 0);
	return ferry_chan_error(c, err);
}

static void ram_save_cleanup(void *opaque)
{
	struct ferry_ram *ram = opaque;

	if (ram->tracking && ram->ops && ram->ops->stop)
		ram->ops->stop(ram->opaque);
	ram->tracking = false;
}

/* ---- load hooks --------------------------------------------------------- */

static int ram_load_setup(void *opaque, struct ferry_error *err)
{
	struct ferry_ram *ram = opaque;
	(void)err;
	ram->load_sections = 0;
	ram->last_load_block = -1;
	return 0;
}

static int load_blocks(struct ferry_ram *ram, struct ferry_chan *c,
		       struct ferry_error *err)
{
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
	if (ferry_get_be64(c) != FERRY_RAM_EOS)
		return ferry_error_set(err, -EBADMSG, "RAM block list not terminated");
	return ferry_chan_error(c, err);
}

static int load_pages(struct ferry_ram *ram, struct ferry_chan *c,
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
		if (flags & FERRY_RAM_PAGE) {
			ferry_get_buf(c, p, b->page_size);
			ram->st.normal++;
		} else {
			if (!page_is_zero(p, b->page_size))
				memset(p, 0, b->page_size);
			ram->st.duplicate++;
		}
	}
}

static int ram_load_state(struct ferry_chan *c, void *opaque, uint32_t version,
			  struct ferry_error *err)
{
	struct ferry_ram *ram = opaque;
	(void)version;

	/* The first section of the stream (START) carries the block list;
	 * every later one carries pages. */
	if (ram->load_sections++ == 0)
		return load_blocks(ram, c, err);
	return load_pages(ram, c, err);
}

static const struct ferry_dev_ops ram_ops = {
	.save_setup = ram_save_setup,
	.save_pending = ram_save_pending,
	.save_iterate = ram_save_iterate,
	.save_complete = ram_save_complete,
	.save_cleanup = ram_save_cleanup,
	.load_setup = ram_load_setup,
	.load_state = ram_load_state,
};

int ferry_ram_register(struct ferry_ram *ram, struct ferry_ctx *ctx,
		       struct ferry_error *err)
{
	return ferry_register(ctx, "ram", 0, 1, 1, &ram_ops, ram, err);
}
