/*
 * tests/unit/test-bulk.c - the bulk device model (vmm/devices/bulk.h): its
 * VFIO state machine arc by arc, the staged-buffer register sequence and
 * what it refuses, hostile records and config blobs, exact STOP_COPY
 * accounting, the dirtier, and a live round trip proven by stamps and
 * digests.
 */
#include "../harness.h"

#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "devices/bulk.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

#define MiB (1024ull * 1024)

/* ---- helpers ------------------------------------------------------------ */

static struct bulk_dev *mk(const char *id, uint64_t size, uint64_t rate,
			   bool precopy)
{
	struct ferry_error e = {0};
	struct bulk_dev *d = bulk_new(id, size, rate, precopy, &e);

	if (!d)
		FAIL("bulk_new(%s, %llu): %d %s", id, (unsigned long long)size,
		     e.code, e.msg);
	return d;
}

static void set(struct bulk_dev *d, enum bulk_state s)
{
	struct ferry_error e = {0};

	ASSERT_OK_E(bulk_set_state(d, s, &e), e);
	ASSERT_EQ(bulk_get_state(d), s);
}

/* From RUNNING to @s along allowed arcs; ERROR through a record the
 * device cannot consume. */
static void go(struct bulk_dev *d, enum bulk_state s)
{
	uint8_t junk[BULK_REC_HDR_SIZE] = {0};
	uint64_t off;

	ASSERT_EQ(bulk_get_state(d), BULK_RUNNING);
	switch (s) {
	case BULK_RUNNING:
		break;
	case BULK_STOP:
		set(d, BULK_STOP);
		break;
	case BULK_PRE_COPY:
		set(d, BULK_PRE_COPY);
		break;
	case BULK_STOP_COPY:
		set(d, BULK_STOP);
		set(d, BULK_STOP_COPY);
		break;
	case BULK_RESUMING:
		set(d, BULK_STOP);
		set(d, BULK_RESUMING);
		break;
	default:
		set(d, BULK_STOP);
		set(d, BULK_RESUMING);
		ASSERT_OK(bulk_read_data_offset(d, &off, NULL));
		ASSERT_OK(bulk_region_write(d, off, junk, sizeof(junk), NULL));
		ASSERT_ERR(bulk_write_data_size(d, sizeof(junk), NULL), -EBADMSG);
		break;
	}
	ASSERT_EQ(bulk_get_state(d), s);
}

static void verify(struct bulk_dev *d, uint64_t *bad, uint64_t *digest)
{
	ASSERT_OK(bulk_verify(d, bad, digest));
}

static void verify_clean(struct bulk_dev *d, uint64_t *digest)
{
	uint64_t bad = ~0ull;

	verify(d, &bad, digest);
	ASSERT_EQ_U64(bad, 0);
}

/* Save every pending record of @src (in a save state) into one buffer:
 * records back to back, each preceded by its u64 length. */
struct recs {
	uint8_t *buf;
	size_t len, cap;
	unsigned n;
	uint64_t chunk_bytes;
};

static size_t save_one(struct bulk_dev *src, struct recs *r)
{
	struct ferry_error e = {0};
	size_t len = 0;
	uint64_t l;

	if (r->cap - r->len < BULK_REC_MAX + 8) {
		r->cap = r->cap * 2 + BULK_REC_MAX + 8;
		r->buf = realloc(r->buf, r->cap);
		ASSERT_PTR(r->buf);
	}
	ASSERT_OK_E(bulk_save_chunk(src, r->buf + r->len + 8, BULK_REC_MAX,
				    &len, &e), e);
	if (!len)
		return 0;
	ASSERT_GT(len, BULK_REC_HDR_SIZE);
	ASSERT_LE(len, BULK_REC_MAX);
	ASSERT_EQ((len - BULK_REC_HDR_SIZE) % BULK_CHUNK, 0);
	l = len;
	memcpy(r->buf + r->len, &l, 8);
	r->len += 8 + len;
	r->n++;
	r->chunk_bytes += len - BULK_REC_HDR_SIZE;
	return len;
}

static void drain(struct bulk_dev *src, struct recs *r)
{
	while (save_one(src, r))
		;
}

/* Record @i of @r (pointer and length). */
static uint8_t *rec_at(struct recs *r, unsigned i, size_t *len)
{
	size_t pos = 0;
	uint64_t l;

	for (;;) {
		ASSERT_LT(pos, r->len);
		memcpy(&l, r->buf + pos, 8);
		if (!i--)
			break;
		pos += 8 + l;
	}
	*len = l;
	return r->buf + pos + 8;
}

static void load_all(struct bulk_dev *dst, struct recs *r)
{
	for (unsigned i = 0; i < r->n; i++) {
		struct ferry_error e = {0};
		size_t len;
		uint8_t *p = rec_at(r, i, &len);

		ASSERT_OK_E(bulk_load_chunk(dst, p, len, &e), e);
	}
}

static uint64_t le64(const uint8_t *p)
{
	uint64_t v = 0;

	for (int i = 0; i < 8; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

static void put_le32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- creation and content ------------------------------------------------ */

TEST(bulk_new_rejects_bad_args)
{
	struct ferry_error e = {0};

	ASSERT_NULL(bulk_new("x", 0, 0, true, &e));
	ASSERT_EQ(e.code, -EINVAL);
	ferry_error_clear(&e);
	ASSERT_NULL(bulk_new("x", BULK_CHUNK + 4096, 0, true, &e));
	ASSERT_EQ(e.code, -EINVAL);
	ASSERT_CONTAINS(e.msg, "multiple");
	ferry_error_clear(&e);
	ASSERT_NULL(bulk_new("", BULK_CHUNK, 0, true, &e));
	ASSERT_EQ(e.code, -EINVAL);
	ferry_error_clear(&e);
	ASSERT_NULL(bulk_new(NULL, BULK_CHUNK, 0, true, &e));
	ASSERT_EQ(e.code, -EINVAL);
	ferry_error_clear(&e);
	ASSERT_NULL(bulk_new("x", BULK_CHUNK, BULK_MAX_RATE_MBPS + 1ull, true, &e));
	ASSERT_EQ(e.code, -EINVAL);
	/* NULL err is fine too. */
	ASSERT_NULL(bulk_new("x", 3, 0, true, NULL));
	bulk_free(NULL);
}

TEST(bulk_fill_verifies_clean)
{
	struct bulk_dev *a = mk("dev-a", 8 * MiB, 0, true);
	struct bulk_dev *a2 = mk("dev-a", 8 * MiB, 0, true);
	struct bulk_dev *b = mk("dev-b", 8 * MiB, 0, true);
	uint64_t da, da2, db;

	ASSERT_STREQ(bulk_id(a), "dev-a");
	ASSERT_EQ_U64(bulk_size(a), 8 * MiB);
	ASSERT_NE(bulk_tag(a), bulk_tag(b));
	verify_clean(a, &da);
	verify_clean(a2, &da2);
	verify_clean(b, &db);
	/* Content is a function of (id, offset, generation): same id, same
	 * bytes; another id, other bytes. */
	ASSERT_EQ_U64(da, da2);
	ASSERT_NE(da, db);
	bulk_free(a);
	bulk_free(a2);
	bulk_free(b);
}

/* ---- state machine ---------------------------------------------------- */

/* The spec table, written out independently of the device's own. */
static bool spec_arc(enum bulk_state f, enum bulk_state t)
{
	if (f == t)
		return f != BULK_ERROR;
	return (f == BULK_RUNNING && t == BULK_STOP) ||
	       (f == BULK_RUNNING && t == BULK_PRE_COPY) ||
	       (f == BULK_PRE_COPY && t == BULK_RUNNING) ||
	       (f == BULK_PRE_COPY && t == BULK_STOP_COPY) ||
	       (f == BULK_STOP && t == BULK_RUNNING) ||
	       (f == BULK_STOP && t == BULK_STOP_COPY) ||
	       (f == BULK_STOP && t == BULK_RESUMING) ||
	       (f == BULK_STOP_COPY && t == BULK_STOP) ||
	       (f == BULK_RESUMING && t == BULK_STOP);
}

TEST(bulk_state_arcs_exhaustive)
{
	struct bulk_dev *d = mk("arcs", 4 * BULK_CHUNK, 0, true);
	unsigned ok = 0, rejected = 0;

	for (int f = 0; f < BULK_NR_STATES; f++) {
		for (int t = 0; t < BULK_NR_STATES; t++) {
			struct ferry_error e = {0};
			int r;

			bulk_reset(d);
			go(d, f);
			r = bulk_set_state(d, t, &e);
			if (spec_arc(f, t)) {
				if (r)
					FAIL("%s -> %s refused: %s",
					     bulk_state_name(f),
					     bulk_state_name(t), e.msg);
				ASSERT_EQ(e.code, 0);
				ASSERT_EQ(bulk_get_state(d), t);
				ok++;
			} else {
				if (r != -EINVAL)
					FAIL("%s -> %s = %d, expected -EINVAL",
					     bulk_state_name(f),
					     bulk_state_name(t), r);
				ASSERT_EQ(bulk_get_state(d), f);
				ASSERT_CONTAINS(e.msg, test_fmt("%s -> %s",
					bulk_state_name(f), bulk_state_name(t)));
				rejected++;
			}
		}
	}
	ASSERT_EQ(ok, 9 + 5);
	ASSERT_EQ(rejected, 36 - 14);

	/* Out-of-range targets and names. */
	bulk_reset(d);
	ASSERT_ERR(bulk_set_state(d, (enum bulk_state)42, NULL), -EINVAL);
	ASSERT_ERR(bulk_set_state(d, (enum bulk_state)-1, NULL), -EINVAL);
	ASSERT_EQ(bulk_get_state(d), BULK_RUNNING);
	ASSERT_STREQ(bulk_state_name(BULK_STOP_COPY), "STOP_COPY");
	ASSERT_STREQ(bulk_state_name((enum bulk_state)42), "?");
	bulk_free(d);
}

TEST(bulk_no_precopy_device)
{
	struct bulk_dev *d = mk("nopre", 4 * BULK_CHUNK, 0, false);
	struct ferry_error e = {0};
	uint64_t ini, dirty;

	ASSERT(!bulk_has_precopy(d));
	ASSERT_ERR(bulk_set_state(d, BULK_PRE_COPY, &e), -EINVAL);
	ASSERT_CONTAINS(e.msg, "PRE_COPY");
	ASSERT_EQ(bulk_get_state(d), BULK_RUNNING);
	/* Stop-and-copy still works. */
	set(d, BULK_STOP);
	set(d, BULK_STOP_COPY);
	ASSERT_OK(bulk_pending(d, &ini, &dirty));
	ASSERT_EQ_U64(ini, 4 * BULK_CHUNK);
	ASSERT_EQ_U64(dirty, 0);
	bulk_free(d);
}

TEST(bulk_error_only_reset_leaves)
{
	struct bulk_dev *d = mk("err", 4 * BULK_CHUNK, 0, true);
	uint64_t before, after, off, v;
	uint8_t reg[8];

	verify_clean(d, &before);
	go(d, BULK_ERROR);
	for (int t = 0; t < BULK_NR_STATES; t++)
		ASSERT_ERR(bulk_set_state(d, t, NULL), -EINVAL);
	ASSERT_ERR(bulk_read_data_offset(d, &off, NULL), -EINVAL);
	ASSERT_ERR(bulk_read_pending_bytes(d, &v, NULL), -EINVAL);
	ASSERT_ERR(bulk_region_write(d, BULK_DATA_OFFSET, reg, 1, NULL), -EINVAL);
	/* Plain reads work in every state; the register shows ERROR. */
	ASSERT_OK(bulk_region_read(d, BULK_REG_DEVICE_STATE, reg, 4, NULL));
	ASSERT_EQ(reg[0], BULK_ERROR);
	bulk_reset(d);
	ASSERT_EQ(bulk_get_state(d), BULK_RUNNING);
	ASSERT_OK(bulk_region_read(d, BULK_REG_DEVICE_STATE, reg, 4, NULL));
	ASSERT_EQ(reg[0], BULK_RUNNING);
	/* The refused record changed nothing; the reset keeps content. */
	verify_clean(d, &after);
	ASSERT_EQ_U64(before, after);
	set(d, BULK_PRE_COPY);
	bulk_free(d);
}

/* ---- staged-buffer sequence ----------------------------------------------- */

TEST(bulk_seq_data_size_before_offset)
{
	struct bulk_dev *d = mk("seq", 2 * MiB, 0, true);
	struct ferry_error e = {0};
	uint64_t off, off2, sz, p0, p1;
	uint8_t hdr[BULK_REC_HDR_SIZE];

	set(d, BULK_PRE_COPY);
	ASSERT_ERR(bulk_read_data_size(d, &sz, &e), -EINVAL);
	ASSERT_CONTAINS(e.msg, "before data_offset");

	ASSERT_OK(bulk_read_pending_bytes(d, &p0, NULL));
	ASSERT_EQ_U64(p0, 2 * MiB);
	ASSERT_OK(bulk_read_data_offset(d, &off, NULL));
	ASSERT_EQ_U64(off, BULK_DATA_OFFSET);
	/* A second data_offset before data_size is the same record. */
	ASSERT_OK(bulk_read_data_offset(d, &off2, NULL));
	ASSERT_EQ_U64(off2, off);
	ASSERT_OK(bulk_read_pending_bytes(d, &p1, NULL));
	ASSERT_EQ_U64(p1, 2 * MiB - BULK_REC_MAX_CHUNKS * BULK_CHUNK);
	ASSERT_OK(bulk_read_data_size(d, &sz, NULL));
	ASSERT_EQ_U64(sz, BULK_REC_MAX);
	ASSERT_OK(bulk_region_read(d, off, hdr, sizeof(hdr), NULL));
	ASSERT_EQ_U64(le64(hdr + 8), 0);  /* first record starts at chunk 0 */

	/* A state change forgets the sequence. */
	set(d, BULK_STOP_COPY);
	ferry_error_clear(&e);
	ASSERT_ERR(bulk_read_data_size(d, &sz, &e), -EINVAL);
	ASSERT_CONTAINS(e.msg, "before data_offset");
	ASSERT_OK(bulk_read_data_offset(d, &off, NULL));
	ASSERT_OK(bulk_read_data_size(d, &sz, NULL));
	ASSERT_OK(bulk_region_read(d, off, hdr, sizeof(hdr), NULL));
	ASSERT_EQ_U64(le64(hdr + 8), BULK_REC_MAX_CHUNKS * BULK_CHUNK);
	bulk_free(d);
}

TEST(bulk_seq_wrong_state_access)
{
	struct bulk_dev *d = mk("wrong", 4 * BULK_CHUNK, 0, true);
	struct ferry_error e = {0};
	uint64_t v, off;
	uint8_t b[16] = {0}, cfg[BULK_CONFIG_SIZE];
	enum bulk_state quiet[] = { BULK_RUNNING, BULK_STOP };
	uint8_t *big = malloc(BULK_REC_MAX);

	ASSERT_PTR(big);

	for (unsigned i = 0; i < 2; i++) {
		bulk_reset(d);
		go(d, quiet[i]);
		ferry_error_clear(&e);
		ASSERT_ERR(bulk_read_data_offset(d, &off, &e), -EINVAL);
		ASSERT_CONTAINS(e.msg, bulk_state_name(quiet[i]));
		ASSERT_ERR(bulk_read_data_size(d, &v, NULL), -EINVAL);
		ASSERT_ERR(bulk_read_pending_bytes(d, &v, NULL), -EINVAL);
		ASSERT_ERR(bulk_pending(d, &v, &v), -EINVAL);
		ASSERT_ERR(bulk_region_write(d, BULK_DATA_OFFSET, b, 16, NULL), -EINVAL);
		ASSERT_ERR(bulk_write_data_size(d, 16, NULL), -EINVAL);
		ASSERT_ERR(bulk_save_chunk(d, big, BULK_REC_MAX, &(size_t){0},
					   NULL), -EINVAL);
		ASSERT_EQ(bulk_config_save(d, cfg, sizeof(cfg)), 0);
		ASSERT_OK(bulk_region_read(d, 0, b, 16, NULL));
		ASSERT_EQ(bulk_get_state(d), quiet[i]);
	}
	/* Source-only registers on a destination and the other way round. */
	bulk_reset(d);
	go(d, BULK_RESUMING);
	ASSERT_ERR(bulk_read_pending_bytes(d, &v, NULL), -EINVAL);
	ASSERT_ERR(bulk_read_data_size(d, &v, NULL), -EINVAL);
	ASSERT_EQ(bulk_config_save(d, cfg, sizeof(cfg)), 0);
	bulk_reset(d);
	go(d, BULK_PRE_COPY);
	ASSERT_OK(bulk_read_data_offset(d, &off, NULL));
	ASSERT_ERR(bulk_region_write(d, off, b, 16, NULL), -EINVAL);
	ASSERT_ERR(bulk_write_data_size(d, 16, NULL), -EINVAL);
	/* A short buffer is refused before anything is staged. */
	ASSERT_ERR(bulk_save_chunk(d, b, sizeof(b), &(size_t){0}, NULL), -EINVAL);
	ASSERT_EQ(bulk_get_state(d), BULK_PRE_COPY);
	free(big);
	bulk_free(d);
}

TEST(bulk_region_write_bounds)
{
	struct bulk_dev *src = mk("rw", 2 * MiB, 0, true);
	struct bulk_dev *d = mk("rw", 2 * MiB, 0, true);
	struct ferry_error e = {0};
	struct recs r = {0};
	struct bulk_stats st;
	uint64_t off;
	uint8_t b[64] = {0};
	size_t len;
	uint8_t *rec;

	go(src, BULK_STOP_COPY);
	drain(src, &r);
	ASSERT_EQ(r.n, 2);
	rec = rec_at(&r, 0, &len);

	go(d, BULK_RESUMING);
	/* Before data_offset: nothing may be written or consumed. */
	ASSERT_ERR(bulk_region_write(d, BULK_DATA_OFFSET, b, 8, &e), -EINVAL);
	ASSERT_CONTAINS(e.msg, "before data_offset");
	ASSERT_ERR(bulk_write_data_size(d, 16, NULL), -EINVAL);

	ASSERT_OK(bulk_read_data_offset(d, &off, NULL));
	ASSERT_EQ_U64(off, BULK_DATA_OFFSET);
	ferry_error_clear(&e);
	ASSERT_ERR(bulk_region_write(d, off - 1, b, 2, &e), -EINVAL);
	ASSERT_CONTAINS(e.msg, "outside the staged area");
	ASSERT_ERR(bulk_region_write(d, 0, b, 8, NULL), -EINVAL);  /* registers */
	ASSERT_ERR(bulk_region_write(d, BULK_REGION_SIZE - 8, b, 16, NULL), -EINVAL);
	ASSERT_ERR(bulk_region_write(d, BULK_REGION_SIZE, b, 1, NULL), -EINVAL);
	ASSERT_ERR(bulk_region_write(d, UINT64_MAX - 2, b, 8, NULL), -EINVAL);
	/* A gap after what was written so far. */
	ferry_error_clear(&e);
	ASSERT_ERR(bulk_region_write(d, off + 100, b, 8, &e), -EINVAL);
	ASSERT_CONTAINS(e.msg, "gap");
	/* Reads out of the region. */
	ASSERT_ERR(bulk_region_read(d, BULK_REGION_SIZE, b, 1, NULL), -EINVAL);
	ASSERT_ERR(bulk_region_read(d, UINT64_MAX, b, 2, NULL), -EINVAL);
	ASSERT_ERR(bulk_region_read(d, BULK_REGION_SIZE - 4, b, 8, NULL), -EINVAL);
	ASSERT_OK(bulk_region_read(d, BULK_REGION_SIZE - 8, b, 8, NULL));

	/* None of that hurt: the device is still resuming and takes a
	 * record written in two pieces, the second overlapping the first. */
	ASSERT_EQ(bulk_get_state(d), BULK_RESUMING);
	ASSERT_OK_E(bulk_region_write(d, off, rec, 1000, &e), e);
	ASSERT_OK_E(bulk_region_write(d, off + 500, rec + 500, len - 500, &e), e);
	ASSERT_OK_E(bulk_write_data_size(d, len, &e), e);
	bulk_get_stats(d, &st);
	ASSERT_EQ_U64(st.loaded_records, 1);
	ASSERT_EQ_U64(st.loaded_bytes, len);
	/* The area closes with the record: another write needs data_offset. */
	ASSERT_ERR(bulk_region_write(d, off, b, 8, NULL), -EINVAL);
	set(d, BULK_STOP);
	free(r.buf);
	bulk_free(src);
	bulk_free(d);
}

/* ---- hostile records ------------------------------------------------------- */

enum corrupt { C_MAGIC, C_COUNT0, C_COUNT17, C_MISALIGNED, C_BEYOND,
	       C_RUNS_PAST, C_SZ_SHORT, C_SZ_UNWRITTEN, C_SZ_ZERO, C_NR };

TEST(bulk_corrupt_records_enter_error)
{
	struct bulk_dev *src = mk("bad", 2 * MiB, 0, true);
	struct bulk_dev *d = mk("bad", 2 * MiB, 0, true);
	struct recs r = {0};
	uint8_t *good, *rec = malloc(BULK_REC_MAX);
	uint64_t before, after, off;
	size_t len;

	ASSERT_PTR(rec);
	go(src, BULK_STOP_COPY);
	drain(src, &r);
	good = rec_at(&r, 0, &len);
	ASSERT_EQ_U64(len, BULK_REC_MAX);
	verify_clean(d, &before);

	for (int c = 0; c < C_NR; c++) {
		struct ferry_error e = {0};
		size_t wlen = len;
		uint64_t sz = len;
		int want = -EBADMSG;

		memcpy(rec, good, len);
		switch (c) {
		case C_MAGIC:      rec[0] ^= 1; break;
		case C_COUNT0:     put_le32(rec + 4, 0); break;
		case C_COUNT17:    put_le32(rec + 4, BULK_REC_MAX_CHUNKS + 1); break;
		case C_MISALIGNED: put_le64(rec + 8, 8); break;
		case C_BEYOND:     put_le64(rec + 8, 2 * MiB); break;
		case C_RUNS_PAST:  put_le64(rec + 8, 2 * MiB - BULK_CHUNK); break;
		case C_SZ_SHORT:   sz = len - 1; want = -EINVAL; break;
		case C_SZ_UNWRITTEN: wlen = len / 2; want = -EINVAL; break;
		case C_SZ_ZERO:    sz = 0; want = -EINVAL; break;
		}
		bulk_reset(d);
		go(d, BULK_RESUMING);
		ASSERT_OK(bulk_read_data_offset(d, &off, NULL));
		ASSERT_OK(bulk_region_write(d, off, rec, wlen, NULL));
		if (bulk_write_data_size(d, sz, &e) != want)
			FAIL("case %d: %d (%s), expected %d", c, e.code, e.msg, want);
		ASSERT(e.msg[0]);
		ASSERT_EQ(bulk_get_state(d), BULK_ERROR);
		ASSERT_ERR(bulk_set_state(d, BULK_STOP, NULL), -EINVAL);
	}
	/* Every record was checked whole before a byte was copied. */
	verify_clean(d, &after);
	ASSERT_EQ_U64(before, after);

	/* An oversized record never reaches the device. */
	bulk_reset(d);
	go(d, BULK_RESUMING);
	ASSERT_ERR(bulk_load_chunk(d, rec, BULK_REC_MAX + 1, NULL), -EINVAL);
	ASSERT_EQ(bulk_get_state(d), BULK_RESUMING);
	free(rec);
	free(r.buf);
	bulk_free(src);
	bulk_free(d);
}

TEST(bulk_resuming_half_record_eio)
{
	struct bulk_dev *d = mk("half", 4 * BULK_CHUNK, 0, true);
	struct ferry_error e = {0};
	uint8_t b[100] = {0};
	uint64_t off;

	/* data_offset read but nothing written: nothing is half done. */
	go(d, BULK_RESUMING);
	ASSERT_OK(bulk_read_data_offset(d, &off, NULL));
	set(d, BULK_STOP);

	set(d, BULK_RESUMING);
	ASSERT_OK(bulk_read_data_offset(d, &off, NULL));
	ASSERT_OK(bulk_region_write(d, off, b, sizeof(b), NULL));
	ASSERT_ERR(bulk_set_state(d, BULK_STOP, &e), -EIO);
	ASSERT_CONTAINS(e.msg, "half written");
	ASSERT_EQ(bulk_get_state(d), BULK_ERROR);
	bulk_free(d);
}

/* ---- config ------------------------------------------------------------------ */

TEST(bulk_config_mismatch)
{
	struct bulk_dev *src = mk("cfg-a", 1 * MiB, 0, true);
	struct bulk_dev *bigger = mk("cfg-a", 2 * MiB, 0, true);
	struct bulk_dev *other = mk("cfg-b", 1 * MiB, 0, true);
	struct bulk_dev *same = mk("cfg-a", 1 * MiB, 0, true);
	struct ferry_error e = {0};
	uint8_t cfg[256], bad[BULK_CONFIG_SIZE];
	struct recs r = {0};
	size_t n;

	ASSERT_EQ(bulk_config_save(src, cfg, sizeof(cfg)), 0);  /* RUNNING */
	go(src, BULK_STOP_COPY);
	ASSERT_EQ(bulk_config_save(src, cfg, BULK_CONFIG_SIZE - 1), 0);
	drain(src, &r);
	n = bulk_config_save(src, cfg, sizeof(cfg));
	ASSERT_EQ(n, BULK_CONFIG_SIZE);
	ASSERT_LT(n, 256);

	go(bigger, BULK_RESUMING);
	ASSERT_ERR(bulk_config_load(bigger, cfg, n, &e), -EINVAL);
	ASSERT_CONTAINS(e.msg, "1048576 bytes");
	ASSERT_EQ(bulk_get_state(bigger), BULK_RESUMING);

	go(other, BULK_RESUMING);
	load_all(other, &r);
	ferry_error_clear(&e);
	ASSERT_ERR(bulk_config_load(other, cfg, n, &e), -EINVAL);
	ASSERT_CONTAINS(e.msg, "tag");
	ASSERT_EQ(bulk_get_state(other), BULK_RESUMING);

	/* Right device, wrong moment: config comes in RESUMING. */
	ASSERT_ERR(bulk_config_load(same, cfg, n, NULL), -EINVAL);
	go(same, BULK_RESUMING);
	load_all(same, &r);
	/* Damaged or cut short. */
	memcpy(bad, cfg, n);
	bad[20] ^= 0x40;
	ASSERT_ERR(bulk_config_load(same, bad, n, NULL), -EBADMSG);
	ASSERT_ERR(bulk_config_load(same, cfg, n - 1, NULL), -EBADMSG);
	ASSERT_ERR(bulk_config_load(same, NULL, n, NULL), -EBADMSG);
	ASSERT_EQ(bulk_get_state(same), BULK_RESUMING);
	ferry_error_clear(&e);
	ASSERT_OK_E(bulk_config_load(same, cfg, n, &e), e);
	set(same, BULK_STOP);
	free(r.buf);
	bulk_free(src);
	bulk_free(bigger);
	bulk_free(other);
	bulk_free(same);
}

TEST(bulk_config_detects_lost_record)
{
	struct bulk_dev *src = mk("lost", 2 * MiB, 0, true);
	struct bulk_dev *d = mk("lost", 2 * MiB, 0, true);
	struct ferry_error e = {0};
	struct recs r = {0};
	uint8_t cfg[BULK_CONFIG_SIZE];
	uint8_t *p;
	size_t len;

	go(src, BULK_STOP_COPY);
	drain(src, &r);
	ASSERT_EQ(r.n, 2);
	ASSERT_EQ(bulk_config_save(src, cfg, sizeof(cfg)), BULK_CONFIG_SIZE);

	/* Only the second record arrives: every stamp still verifies (the
	 * destination's own content is valid), so the config must tell. */
	go(d, BULK_RESUMING);
	p = rec_at(&r, 1, &len);
	ASSERT_OK(bulk_load_chunk(d, p, len, NULL));
	ASSERT_ERR(bulk_config_load(d, cfg, sizeof(cfg), &e), -EIO);
	ASSERT_CONTAINS(e.msg, "16 of 32 chunks");
	ASSERT_EQ(bulk_get_state(d), BULK_ERROR);

	/* All of them: accepted. */
	bulk_reset(d);
	go(d, BULK_RESUMING);
	load_all(d, &r);
	ferry_error_clear(&e);
	ASSERT_OK_E(bulk_config_load(d, cfg, sizeof(cfg), &e), e);
	set(d, BULK_STOP);
	free(r.buf);
	bulk_free(src);
	bulk_free(d);
}

/* ---- save accounting ------------------------------------------------------------ */

TEST(bulk_stop_copy_pending_exact)
{
	/* 51 chunks: three full records and a short one. */
	const uint64_t size = 51ull * BULK_CHUNK;
	struct bulk_dev *d = mk("exact", size, 0, false);
	struct recs r = {0};
	struct bulk_stats st;
	uint64_t ini, dirty, left;
	size_t len;

	go(d, BULK_STOP_COPY);
	ASSERT_OK(bulk_pending(d, &ini, &dirty));
	ASSERT_EQ_U64(ini, size);
	ASSERT_EQ_U64(dirty, 0);
	left = size;
	while ((len = save_one(d, &r))) {
		left -= len - BULK_REC_HDR_SIZE;
		ASSERT_OK(bulk_read_pending_bytes(d, &ini, NULL));
		ASSERT_EQ_U64(ini, left);
	}
	ASSERT_EQ_U64(left, 0);
	ASSERT_EQ(r.n, 4);
	ASSERT_EQ_U64(r.chunk_bytes, size);
	rec_at(&r, 3, &len);
	ASSERT_EQ_U64(len, BULK_REC_HDR_SIZE + 3 * BULK_CHUNK);
	ASSERT_OK(bulk_pending(d, &ini, &dirty));
	ASSERT_EQ_U64(ini + dirty, 0);
	bulk_get_stats(d, &st);
	ASSERT_EQ_U64(st.stopcopy_records, 4);
	ASSERT_EQ_U64(st.stopcopy_bytes, size + 4 * BULK_REC_HDR_SIZE);
	ASSERT_EQ_U64(st.precopy_bytes, 0);
	free(r.buf);
	bulk_free(d);
}

TEST(bulk_unread_staged_record_requeued)
{
	struct bulk_dev *src = mk("requeue", 2 * MiB, 0, true);
	struct bulk_dev *dst = mk("requeue", 2 * MiB, 0, true);
	struct recs r = {0};
	uint8_t cfg[BULK_CONFIG_SIZE];
	uint64_t off, ini, dirty;

	go(src, BULK_PRE_COPY);
	ASSERT_OK(bulk_read_data_offset(src, &off, NULL));
	ASSERT_OK(bulk_pending(src, &ini, &dirty));
	ASSERT_EQ_U64(ini, 1 * MiB);
	ASSERT_EQ_U64(dirty, 0);
	/* data_size was never read: the state change must not lose it. */
	set(src, BULK_STOP_COPY);
	ASSERT_OK(bulk_pending(src, &ini, &dirty));
	ASSERT_EQ_U64(ini, 1 * MiB);
	ASSERT_EQ_U64(dirty, 1 * MiB);
	drain(src, &r);
	ASSERT_EQ_U64(r.chunk_bytes, 2 * MiB);
	ASSERT_EQ(bulk_config_save(src, cfg, sizeof(cfg)), BULK_CONFIG_SIZE);
	go(dst, BULK_RESUMING);
	load_all(dst, &r);
	ASSERT_OK(bulk_config_load(dst, cfg, sizeof(cfg), NULL));
	free(r.buf);
	bulk_free(src);
	bulk_free(dst);
}

TEST(bulk_region_map_matches_read)
{
	struct bulk_dev *d = mk("map", 2 * MiB, 0, true);
	uint8_t *buf = malloc(BULK_REC_MAX);
	const uint8_t *map;
	uint64_t off, sz;
	size_t mlen = 0;
	uint8_t reg[8];

	ASSERT_PTR(buf);
	go(d, BULK_STOP_COPY);
	map = bulk_region_map(d, &mlen);
	ASSERT_PTR(map);
	ASSERT_EQ_U64(mlen, BULK_REGION_SIZE);
	ASSERT_OK(bulk_read_data_offset(d, &off, NULL));
	ASSERT_OK(bulk_read_data_size(d, &sz, NULL));
	ASSERT_EQ_U64(sz, BULK_REC_MAX);
	ASSERT_OK(bulk_region_read(d, off, buf, sz, NULL));
	ASSERT_MEMEQ(map + off, buf, sz);
	/* Chunk data lands page aligned in the region. */
	ASSERT_EQ((off + BULK_REC_HDR_SIZE) % 4096, 0);
	/* The register area mirrors the registers. */
	ASSERT_OK(bulk_region_read(d, BULK_REG_DATA_SIZE, reg, 8, NULL));
	ASSERT_EQ_U64(le64(reg), sz);
	ASSERT_OK(bulk_region_read(d, BULK_REG_DATA_OFFSET, reg, 8, NULL));
	ASSERT_EQ_U64(le64(reg), off);
	ASSERT_OK(bulk_region_read(d, BULK_REG_PENDING, reg, 8, NULL));
	ASSERT_EQ_U64(le64(reg), 1 * MiB);
	ASSERT_EQ(map[BULK_REG_DEVICE_STATE], BULK_STOP_COPY);
	free(buf);
	bulk_free(d);
}

/* ---- dirtier ---------------------------------------------------------------------- */

static uint64_t dirtied(struct bulk_dev *d)
{
	struct bulk_stats st;

	bulk_get_stats(d, &st);
	return st.chunks_dirtied;
}

TEST(bulk_dirtier_paced_and_stops)
{
	struct bulk_dev *d = mk("dirty", 4 * MiB, 100, true);
	struct bulk_dev *idle = mk("idle", 4 * MiB, 0, true);
	struct ferry_error e = {0};
	uint64_t n, n2, d0, d1;

	verify_clean(d, &d0);
	ASSERT_OK_E(bulk_start(d, &e), e);
	ASSERT_ERR(bulk_start(d, NULL), -EBUSY);
	usleep(200 * 1000);
	/* Stamps stay whole while chunks are rewritten under us. */
	verify_clean(d, &d1);
	ASSERT_NE(d0, d1);
	/* 100 MiB/s for 0.2 s is 320 chunks; allow for a slow machine, but
	 * not for an unpaced loop. */
	n = dirtied(d);
	if (n < 50 || n > 800)
		FAIL("%llu chunks dirtied in 0.2 s at 100 MiB/s",
		     (unsigned long long)n);
	/* Stopped devices do not change: the state is checked per chunk
	 * under the lock, so the count is final when set_state returns. */
	set(d, BULK_STOP);
	n = dirtied(d);
	usleep(60 * 1000);
	ASSERT_EQ_U64(dirtied(d), n);
	verify_clean(d, &d0);
	usleep(30 * 1000);
	verify_clean(d, &d1);
	ASSERT_EQ_U64(d0, d1);
	set(d, BULK_RUNNING);
	usleep(60 * 1000);
	n2 = dirtied(d);
	ASSERT_GT(n2, n);
	bulk_stop(d);
	bulk_stop(d);  /* idempotent */
	ASSERT_EQ_U64(dirtied(d), n2);
	ASSERT_OK(bulk_start(d, NULL));  /* restartable */

	/* Rate 0: nothing to start, nothing changes. */
	ASSERT_OK(bulk_start(idle, NULL));
	usleep(30 * 1000);
	ASSERT_EQ_U64(dirtied(idle), 0);
	bulk_free(d);  /* stops the dirtier */
	bulk_free(idle);
}

/* ---- round trip --------------------------------------------------------------------- */

TEST(bulk_roundtrip_precopy_dirtying)
{
	const uint64_t size = 4 * MiB;
	struct bulk_dev *src = mk("gpu0", size, 50, true);
	struct bulk_dev *dst = mk("gpu0", size, 0, true);
	struct ferry_error e = {0};
	struct bulk_stats ss, ds;
	struct recs r = {0};
	uint8_t cfg[BULK_CONFIG_SIZE];
	uint64_t ini, dirty, rest, bad, dsrc, ddst, d0;
	unsigned pre_records;
	double t0;

	verify_clean(dst, &d0);
	ASSERT_OK_E(bulk_start(src, &e), e);
	usleep(20 * 1000);
	set(src, BULK_PRE_COPY);
	/* The destination loads as records arrive, as a live one would. */
	go(dst, BULK_RESUMING);

	/* Pre-copy for a while so that chunks get dirtied after being
	 * sent, then until what is left is small. */
	t0 = now_s();
	for (;;) {
		if (!save_one(src, &r))
			usleep(1000);
		load_all(dst, &r);
		r.n = 0;
		r.len = 0;
		ASSERT_OK(bulk_pending(src, &ini, &dirty));
		if (now_s() - t0 > 0.15 && ini + dirty <= 256 * 1024)
			break;
		if (now_s() - t0 > 1.5)
			FAIL("pre-copy did not converge: %llu + %llu pending",
			     (unsigned long long)ini, (unsigned long long)dirty);
	}
	bulk_get_stats(src, &ss);
	pre_records = (unsigned)ss.precopy_records;
	ASSERT_EQ_U64(ini, 0);
	/* More than the initial sweep went out: dirty chunks were re-sent. */
	ASSERT_GT(ss.precopy_records, size / (BULK_REC_MAX_CHUNKS * BULK_CHUNK));
	ASSERT_GT(ss.chunks_dirtied, 0);

	/* Let the dirtier get ahead again so that stop-copy has dirty chunks
	 * to send, then switch over: the device stops changing and the
	 * remainder is exact. */
	usleep(30 * 1000);
	set(src, BULK_STOP_COPY);
	ASSERT_OK(bulk_pending(src, &ini, &dirty));
	ASSERT_EQ_U64(ini, 0);
	ASSERT_GT(dirty, 0);
	rest = ini + dirty;
	r.n = 0;
	r.len = 0;
	r.chunk_bytes = 0;
	drain(src, &r);
	ASSERT_EQ_U64(r.chunk_bytes, rest);
	ASSERT_OK(bulk_pending(src, &ini, &dirty));
	ASSERT_EQ_U64(ini + dirty, 0);
	ASSERT_EQ(bulk_config_save(src, cfg, sizeof(cfg)), BULK_CONFIG_SIZE);
	set(src, BULK_STOP);
	bulk_stop(src);
	verify_clean(src, &dsrc);
	ASSERT_NE(dsrc, d0);  /* the source really changed */

	load_all(dst, &r);
	ASSERT_OK_E(bulk_config_load(dst, cfg, sizeof(cfg), &e), e);
	set(dst, BULK_STOP);
	verify(dst, &bad, &ddst);
	ASSERT_EQ_U64(bad, 0);
	ASSERT_EQ_U64(ddst, dsrc);
	bulk_get_stats(src, &ss);
	bulk_get_stats(dst, &ds);
	ASSERT_EQ_U64(ds.loaded_records, pre_records + r.n);
	ASSERT_EQ_U64(ds.loaded_records, ss.precopy_records + ss.stopcopy_records);
	ASSERT_EQ_U64(ds.loaded_bytes, ss.precopy_bytes + ss.stopcopy_bytes);
	free(r.buf);
	bulk_free(src);
	bulk_free(dst);
}

/* ---- verify ------------------------------------------------------------------------ */

/* A stopped source's records, loaded into a fresh destination after
 * @mangle had its way with them. */
static struct bulk_dev *load_mangled(const char *id, void (*mangle)(struct recs *),
				     uint64_t *src_digest)
{
	struct bulk_dev *src = mk(id, 2 * MiB, 0, true);
	struct bulk_dev *dst = mk(id, 2 * MiB, 0, true);
	struct recs r = {0};

	go(src, BULK_STOP_COPY);
	drain(src, &r);
	ASSERT_EQ(r.n, 2);
	mangle(&r);
	go(dst, BULK_RESUMING);
	load_all(dst, &r);
	set(dst, BULK_STOP);
	verify_clean(src, src_digest);
	free(r.buf);
	bulk_free(src);
	return dst;
}

static void flip_fill_and_generation(struct recs *r)
{
	size_t len;
	uint8_t *p = rec_at(r, 0, &len);

	p[BULK_REC_HDR_SIZE + 5 * BULK_CHUNK + 1000] ^= 0x10;  /* chunk 5 fill */
	p[BULK_REC_HDR_SIZE + 7 * BULK_CHUNK + 24] ^= 0x01;    /* chunk 7 gen */
}

static void nothing(struct recs *r)
{
	(void)r;
}

TEST(bulk_verify_detects_flipped_byte)
{
	uint64_t bad, dsrc, ddst;
	struct bulk_dev *dst = load_mangled("flip", nothing, &dsrc);

	verify(dst, &bad, &ddst);
	ASSERT_EQ_U64(bad, 0);
	ASSERT_EQ_U64(ddst, dsrc);
	bulk_free(dst);

	dst = load_mangled("flip", flip_fill_and_generation, &dsrc);
	verify(dst, &bad, &ddst);
	ASSERT_EQ_U64(bad, 2);
	ASSERT_NE(ddst, dsrc);
	bulk_free(dst);
}

/* Record 0 relabelled to land on record 1's chunks. */
static void misplace(struct recs *r)
{
	size_t len;
	uint8_t *p = rec_at(r, 0, &len);

	put_le64(p + 8, BULK_REC_MAX_CHUNKS * BULK_CHUNK);
	/* and record 1 dropped, so only the misplaced copy lands there */
	r->n = 1;
}

TEST(bulk_verify_detects_misplaced_chunk)
{
	uint64_t bad, dsrc, ddst;
	struct bulk_dev *dst = load_mangled("place", misplace, &dsrc);

	/* Chunks 16..31 hold chunks 0..15: right tag, valid fill, wrong
	 * offset in every stamp. */
	verify(dst, &bad, &ddst);
	ASSERT_EQ_U64(bad, BULK_REC_MAX_CHUNKS);
	bulk_free(dst);
}
