/*
 * tests/unit/test-ram.c - RAM precopy: block list, dirty rounds, zero
 * pages, never-populated pages, VMM-side writes, hostile page records.
 */
#include "../harness.h"

#include "ferry/ferry.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

#define PS 4096u

/* A fake dirty log: the test "guest" writes through fake_write(). */
struct fake {
	unsigned nblocks;
	uint8_t *mem[2];
	uint64_t npages[2];
	uint64_t *log[2];        /* dirty since last sync */
	uint8_t *populated[2];   /* page ever written */
	bool tracking;
	unsigned syncs, starts, stops;
	unsigned final_syncs, syncs_after_final;
};

static void fake_write(struct fake *f, unsigned b, uint64_t page, uint64_t v)
{
	uint64_t *p = (uint64_t *)(f->mem[b] + page * PS);
	for (unsigned i = 0; i < PS / 8; i++)
		p[i] = v + i;
	f->populated[b][page] = 1;
	if (f->tracking)
		f->log[b][page / 64] |= 1ull << (page % 64);
}

static int f_start(void *o, struct ferry_error *e)
{
	struct fake *f = o;
	(void)e;
	f->tracking = true;
	f->starts++;
	return 0;
}

static int f_sync(void *o, unsigned b, uint64_t *bm, struct ferry_error *e)
{
	struct fake *f = o;
	(void)e;
	for (uint64_t w = 0; w < (f->npages[b] + 63) / 64; w++) {
		bm[w] |= f->log[b][w];
		f->log[b][w] = 0;
	}
	f->syncs++;
	f->syncs_after_final += f->final_syncs > 0;
	return 0;
}

/* The switchover's sync: reports, re-arms nothing (the log stays). */
static int f_sync_final(void *o, unsigned b, uint64_t *bm,
			struct ferry_error *e)
{
	struct fake *f = o;
	(void)e;
	for (uint64_t w = 0; w < (f->npages[b] + 63) / 64; w++)
		bm[w] |= f->log[b][w];
	f->final_syncs++;
	return 0;
}

static void f_stop(void *o)
{
	struct fake *f = o;
	f->tracking = false;
	f->stops++;
}

static int f_populated(void *o, unsigned b, uint64_t *bm, struct ferry_error *e)
{
	struct fake *f = o;
	(void)e;
	for (uint64_t p = 0; p < f->npages[b]; p++)
		if (f->populated[b][p])
			bm[p / 64] |= 1ull << (p % 64);
	return 0;
}


static const struct ferry_ram_dirty_ops fake_ops = {
	.size = sizeof(struct ferry_ram_dirty_ops),
	.start = f_start, .sync = f_sync, .stop = f_stop, .populated = f_populated,
};

static const struct ferry_ram_dirty_ops fake_ops_final = {
	.size = sizeof(struct ferry_ram_dirty_ops),
	.start = f_start, .sync = f_sync, .stop = f_stop, .populated = f_populated,
	.sync_final = f_sync_final,
};

static void fake_init(struct fake *f, uint64_t p0, uint64_t p1)
{
	memset(f, 0, sizeof(*f));
	f->nblocks = 2;
	f->npages[0] = p0;
	f->npages[1] = p1;
	for (int b = 0; b < 2; b++) {
		f->mem[b] = calloc(f->npages[b], PS);
		f->log[b] = calloc((f->npages[b] + 63) / 64, 8);
		f->populated[b] = calloc(f->npages[b], 1);
		ASSERT_PTR(f->mem[b]);
	}
}

static void fake_free(struct fake *f)
{
	for (int b = 0; b < 2; b++) {
		free(f->mem[b]);
		free(f->log[b]);
		free(f->populated[b]);
	}
}

static const struct ferry_ram_dirty_ops *src_ops = &fake_ops;

static struct ferry_ram *ram_for(struct fake *f, bool src, struct ferry_ctx **ctx)
{
	struct ferry_error err = { 0 };
	struct ferry_ram_block blocks[2] = {
		{ "pc.ram", f->mem[0], f->npages[0] * PS, PS },
		{ "hi.ram", f->mem[1], f->npages[1] * PS, PS },
	};
	struct ferry_ram *ram = ferry_ram_new(blocks, 2, src ? src_ops : NULL, f, &err);

	if (!ram)
		FAIL("ferry_ram_new: %s", err.msg);
	*ctx = ferry_ctx_new(NULL);
	ASSERT_OK_E(ferry_ram_register(ram, *ctx, &err), err);
	return ram;
}

static void load_into(struct fake *dst, const uint8_t *d, size_t n)
{
	struct ferry_error err = { 0 };
	struct ferry_ctx *ctx;
	struct ferry_ram *ram = ram_for(dst, false, &ctx);
	struct ferry_chan *r = ferry_chan_new_mem_reader(d, n);

	ASSERT_OK_E(ferry_load(ctx, r, NULL, &err), err);
	ferry_chan_free(r);
	ferry_ctx_free(ctx);
	ferry_ram_free(ram);
}

TEST(ram_stopped_vm_roundtrip)
{
	struct fake src, dst;
	struct ferry_error err = { 0 };
	struct ferry_ctx *ctx;
	struct ferry_ram *ram;
	struct ferry_ram_stats st;
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	const uint8_t *d;
	size_t n;

	fake_init(&src, 300, 70);
	fake_init(&dst, 300, 70);
	for (uint64_t p = 0; p < 300; p += 3)
		fake_write(&src, 0, p, test_rand());
	for (uint64_t p = 1; p < 70; p += 7)
		fake_write(&src, 1, p, test_rand());
	/* A populated page that is zero again: sent as a marker. */
	fake_write(&src, 0, 7, 0);
	memset(src.mem[0] + 7 * PS, 0, PS);
	/* Destination garbage in a page the source has as zero must go. */
	memset(dst.mem[0] + 7 * PS, 0xee, PS);

	ram = ram_for(&src, true, &ctx);
	ASSERT_OK_E(ferry_save_all(ctx, c, 0, &err), err);
	ferry_ram_get_stats(ram, &st);
	ASSERT_EQ(st.normal, 100 + 10);  /* page 7 is not a multiple of 3 */
	ASSERT_EQ(st.duplicate, 1);
	ASSERT_EQ(st.skipped, 370 - 111);
	ASSERT_EQ(st.remaining, 0);
	ASSERT_EQ(st.total, 370ull * PS);
	ASSERT_EQ(src.starts, 1);
	ASSERT_EQ(src.stops, 1);
	d = ferry_chan_mem_data(c, &n);
	load_into(&dst, d, n);
	ASSERT_MEMEQ(dst.mem[0], src.mem[0], 300ull * PS);
	ASSERT_MEMEQ(dst.mem[1], src.mem[1], 70ull * PS);
	ferry_chan_free(c);
	ferry_ctx_free(ctx);
	ferry_ram_free(ram);
	fake_free(&src);
	fake_free(&dst);
}

/* Writes during precopy (tracked by the log) and VMM-side writes (marked
 * by hand) all reach the destination in their final form. */
static void precopy_with_dirtying(const struct ferry_ram_dirty_ops *ops,
				  unsigned *final_syncs)
{
	struct fake src, dst;
	struct ferry_error err = { 0 };
	struct ferry_ctx *ctx;
	struct ferry_ram *ram;
	struct ferry_ram_stats st;
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	struct ferry_save *s;
	uint64_t must, can;
	const uint8_t *d;
	size_t n;

	fake_init(&src, 500, 64);
	fake_init(&dst, 500, 64);
	for (uint64_t p = 0; p < 500; p++)
		fake_write(&src, 0, p, p * 77);
	src_ops = ops;
	ram = ram_for(&src, true, &ctx);
	src_ops = &fake_ops;
	s = ferry_save_begin(ctx, c, &err);
	ASSERT_PTR(s);
	for (int round = 0; round < 12; round++) {
		ferry_save_pending(s, true, &must, &can);
		ASSERT_OK_E(ferry_save_round(s, 50 * PS, &err), err);
		for (int k = 0; k < 20; k++)
			fake_write(&src, (unsigned)(test_rand() % 2),
				   test_rand() % 64, test_rand());
		/* The VMM writes a page behind the guest's back. */
		{
			uint64_t pg = test_rand() % 500;
			memset(src.mem[0] + pg * PS, 0x5a, PS);
			ferry_ram_mark_dirty(ram, 0, pg * PS + 100, 10);
		}
	}
	/* The last writes: only the final sync can report them. */
	for (uint64_t p = 100; p < 110; p++)
		fake_write(&src, 0, p, p * 1234567);
	ASSERT_OK_E(ferry_save_complete(s, &err), err);
	ASSERT_EQ(src.syncs_after_final, 0);
	*final_syncs = src.final_syncs;
	ferry_save_end(s);
	ferry_ram_get_stats(ram, &st);
	ASSERT_GE(st.dirty_sync_count, 2);
	ASSERT_GE(st.rounds, 2);
	ASSERT_EQ(st.remaining, 0);
	d = ferry_chan_mem_data(c, &n);
	load_into(&dst, d, n);
	ASSERT_MEMEQ(dst.mem[0], src.mem[0], 500ull * PS);
	ASSERT_MEMEQ(dst.mem[1], src.mem[1], 64ull * PS);
	ferry_chan_free(c);
	ferry_ctx_free(ctx);
	ferry_ram_free(ram);
	fake_free(&src);
	fake_free(&dst);
}

TEST(ram_precopy_with_dirtying)
{
	unsigned finals;

	precopy_with_dirtying(&fake_ops, &finals);
	ASSERT_EQ(finals, 0);
}

/* With sync_final, the switchover's sync is that one, and the last: what
 * it reports arrives though nothing was re-armed. */
TEST(ram_final_sync_without_rearm)
{
	unsigned finals;

	precopy_with_dirtying(&fake_ops_final, &finals);
	ASSERT_EQ(finals, 2);   /* one call per block */
}

static uint8_t *section_stream(const void *start, size_t slen, const void *part,
			       size_t plen, size_t *out_len)
{
	struct ferry_chan *c = ferry_chan_new_mem_writer(0), *b;
	struct ferry_record_io io = { .chan = c };
	const uint8_t *d;
	uint8_t *copy;
	size_t n;

	ferry_stream_write_header(c, NULL);
	b = ferry_chan_new_mem_writer(0);
	ferry_put_be32(b, 1);
	ferry_put_str8(b, "ram");
	ferry_put_be32(b, 0);
	ferry_put_be32(b, 1);
	ferry_put_buf(b, start, slen);
	d = ferry_chan_mem_data(b, &n);
	ferry_record_write(&io, FERRY_REC_SECTION_START, d, n, NULL);
	ferry_chan_free(b);
	b = ferry_chan_new_mem_writer(0);
	ferry_put_be32(b, 1);
	ferry_put_buf(b, part, plen);
	d = ferry_chan_mem_data(b, &n);
	ferry_record_write(&io, FERRY_REC_SECTION_END, d, n, NULL);
	ferry_chan_free(b);
	ferry_record_write(&io, FERRY_REC_EOF, NULL, 0, NULL);
	d = ferry_chan_mem_data(c, &n);
	copy = malloc(n);
	memcpy(copy, d, n);
	*out_len = n;
	ferry_chan_free(c);
	return copy;
}

static void expect_ram_fail(struct fake *dst, const void *start, size_t slen,
			    const void *part, size_t plen, int code,
			    const char *needle)
{
	struct ferry_error err = { 0 };
	struct ferry_ctx *ctx;
	struct ferry_ram *ram = ram_for(dst, false, &ctx);
	size_t n;
	uint8_t *d = section_stream(start, slen, part, plen, &n);
	struct ferry_chan *r = ferry_chan_new_mem_reader(d, n);

	ASSERT_ERR(ferry_load(ctx, r, NULL, &err), code);
	ASSERT_CONTAINS(err.msg, needle);
	ASSERT_CONTAINS(err.msg, "section 'ram'");
	ferry_chan_free(r);
	free(d);
	ferry_ctx_free(ctx);
	ferry_ram_free(ram);
}

TEST(ram_hostile_records)
{
	struct fake dst;
	/* Block list matching a (4 pages, 2 pages) destination. */
	static const uint8_t good[] = {
		0, 0, 0, 2,
		6, 'p', 'c', '.', 'r', 'a', 'm', 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0x10, 0,
		6, 'h', 'i', '.', 'r', 'a', 'm', 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0x10, 0,
		0, 0, 0, 0, 0, 0, 0, 0x10,
	};
	uint8_t bad[sizeof(good)];
	uint8_t rec[64];

	fake_init(&dst, 4, 2);
	/* Size mismatch. */
	memcpy(bad, good, sizeof(good));
	bad[17] = 0x50;
	expect_ram_fail(&dst, bad, sizeof(bad), "", 0, -EINVAL,
			"source has 'pc.ram' (20480 bytes");
	/* Page beyond the block: offset 0x4000 in a 0x4000-byte block. */
	memcpy(rec, "\0\0\0\0\0\0\x40\x02\x06pc.ram\0\0\0\0\0\0\0\x10", 23);
	expect_ram_fail(&dst, good, sizeof(good), rec, 23, -ERANGE,
			"page offset 0x4000 outside");
	/* Unknown block. */
	memcpy(rec, "\0\0\0\0\0\0\0\x02\x03xyz\0\0\0\0\0\0\0\x10", 20);
	expect_ram_fail(&dst, good, sizeof(good), rec, 20, -EINVAL,
			"unknown RAM block 'xyz'");
	/* CONTINUE with no block named before. */
	memcpy(rec, "\0\0\0\0\0\0\0\x22\0\0\0\0\0\0\0\x10", 16);
	expect_ram_fail(&dst, good, sizeof(good), rec, 16, -EBADMSG,
			"continues a block never named");
	/* Unknown flags. */
	memcpy(rec, "\0\0\0\0\0\0\0\x0a\0\0\0\0\0\0\0\x10", 16);
	expect_ram_fail(&dst, good, sizeof(good), rec, 16, -EBADMSG,
			"bad RAM record flags 0xa");
	/* Page data truncated inside the section. */
	memcpy(rec, "\0\0\0\0\0\0\0\x08\x06pc.ram\x01\x02\x03", 18);
	expect_ram_fail(&dst, good, sizeof(good), rec, 18, -EBADMSG,
			"unexpected end");
	fake_free(&dst);
}

TEST(ram_rejects_bad_blocks)
{
	struct ferry_error err = { 0 };
	uint8_t mem[8192];
	struct ferry_ram_block b[2] = {
		{ "a", mem, 8192, 4096 }, { "a", mem, 4096, 4096 },
	};

	ASSERT_NULL(ferry_ram_new(b, 2, NULL, NULL, &err));
	ASSERT_CONTAINS(err.msg, "RAM block 'a' twice");
	b[0].size = 5000;
	ferry_error_clear(&err);
	ASSERT_NULL(ferry_ram_new(b, 1, NULL, NULL, &err));
	ASSERT_CONTAINS(err.msg, "multiple");
	ASSERT_NULL(ferry_ram_new(b, 0, NULL, NULL, NULL));
}

/* "remaining" and the pending bytes count each block's pages at that
 * block's page size (a 2 MiB-page block next to a 4 KiB one). */
TEST(ram_remaining_per_block_page_size)
{
	const uint64_t huge = 2u << 20;
	uint8_t *small = calloc(16, PS), *big = malloc(4 * huge);
	struct ferry_ram_block blocks[2] = {
		{ "pc.ram", small, 16 * PS, PS },
		{ "huge.ram", big, 4 * huge, (uint32_t)huge },
	};
	struct ferry_error err = { 0 };
	struct ferry_ram_stats st;
	struct ferry_ram *ram;

	ASSERT_PTR(big);
	ram = ferry_ram_new(blocks, 2, NULL, NULL, &err);
	ASSERT_PTR(ram);
	ferry_ram_mark_dirty(ram, 1, 0, 2 * huge);  /* two huge pages */
	ferry_ram_mark_dirty(ram, 0, 0, 3 * PS);    /* three small ones */
	ferry_ram_get_stats(ram, &st);
	ASSERT_EQ_U64(st.remaining, 2 * huge + 3 * PS);
	ferry_ram_free(ram);
	free(small);
	free(big);
}
