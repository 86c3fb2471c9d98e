/*
 * tests/unit/test-hostile.c - every incoming byte is hostile: truncations,
 * flips, absurd lengths, and well-formed records that mean nonsense. Each
 * must fail the load with an error naming the offset and the section,
 * without a crash, a hang or an unbounded allocation.
 */
#include "../harness.h"

#include <sys/resource.h>
#include <unistd.h>

#include "ferry/ferry.h"
#include "testdev.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

static int load_into_fresh(const uint8_t *d, size_t n, struct ferry_error *err)
{
	struct testvm dst;
	struct ferry_chan *r = ferry_chan_new_mem_reader(d, n);
	int ret;

	testvm_init_small(&dst, false, 0);
	ret = ferry_load(dst.ctx, r, NULL, err);
	ferry_chan_free(r);
	testvm_free(&dst);
	return ret;
}

static bool names_place(const char *msg)
{
	return strstr(msg, "offset ") &&
	       (strstr(msg, "section") || strstr(msg, "stream header"));
}

TEST(hostile_every_truncation)
{
	struct testvm src;
	uint8_t *d;
	size_t n;

	testvm_init_small(&src, true, 11);
	d = testvm_save(&src, &n);
	{
		struct ferry_error err = { 0 };
		ASSERT_OK_E(load_into_fresh(d, n, &err), err);
	}
	for (size_t len = 0; len < n; len++) {
		struct ferry_error err = { 0 };
		int r = load_into_fresh(d, len, &err);
		if (r == 0)
			FAIL("truncation to %zu of %zu bytes loaded", len, n);
		if (!names_place(err.msg))
			FAIL("truncation to %zu: error does not name the place: %s",
			     len, err.msg);
	}
	free(d);
	testvm_free(&src);
}

TEST(hostile_byte_flips)
{
	struct testvm src;
	uint8_t *d, *m;
	size_t n;

	testvm_init_small(&src, true, 12);
	d = testvm_save(&src, &n);
	m = malloc(n);
	for (int i = 0; i < 3000; i++) {
		struct ferry_error err = { 0 };
		size_t at = test_rand() % n;
		uint8_t bit = (uint8_t)(1u << (test_rand() % 8));

		memcpy(m, d, n);
		m[at] ^= bit;
		if (load_into_fresh(m, n, &err) == 0)
			FAIL("flip of bit 0x%02x at byte %zu was loaded", bit, at);
		if (!names_place(err.msg))
			FAIL("flip at %zu: error does not name the place: %s", at, err.msg);
	}
	free(m);
	free(d);
	testvm_free(&src);
}

/* Replace the length of the record at @off and load. */
TEST(hostile_absurd_lengths)
{
	static const uint32_t lens[] = {
		0xffffffffu, 0x7fffffffu, FERRY_RECORD_MAX_DEFAULT + 1,
		FERRY_RECORD_MAX_DEFAULT, 100u << 20, 70000,
	};
	struct rusage before, after;
	struct testvm src;
	uint8_t *d, *m;
	size_t n;

	testvm_init_small(&src, true, 13);
	d = testvm_save(&src, &n);
	m = malloc(n);
	getrusage(RUSAGE_SELF, &before);
	for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
		/* Every record in turn gets the absurd length. */
		size_t off = FERRY_STREAM_HEADER_SIZE;
		while (off + 5 <= n) {
			struct ferry_error err = { 0 };
			uint32_t real = (uint32_t)d[off + 1] << 24 |
					(uint32_t)d[off + 2] << 16 |
					(uint32_t)d[off + 3] << 8 | d[off + 4];
			memcpy(m, d, n);
			m[off + 1] = (uint8_t)(lens[i] >> 24);
			m[off + 2] = (uint8_t)(lens[i] >> 16);
			m[off + 3] = (uint8_t)(lens[i] >> 8);
			m[off + 4] = (uint8_t)lens[i];
			if (load_into_fresh(m, n, &err) == 0)
				FAIL("length %u at offset %zu was loaded", lens[i], off);
			ASSERT_CONTAINS(err.msg, "offset ");
			off += FERRY_RECORD_OVERHEAD + real;
		}
	}
	getrusage(RUSAGE_SELF, &after);
	/* The stream is ~13 KiB: no claim may make us allocate its size. */
	ASSERT_LT(after.ru_maxrss - before.ru_maxrss, 32 * 1024);
	free(m);
	free(d);
	testvm_free(&src);
}

/* Build a stream of well-formed (correctly checked) records. */
struct builder {
	struct ferry_chan *c;
	struct ferry_record_io io;
};

static void b_init(struct builder *b)
{
	b->c = ferry_chan_new_mem_writer(0);
	memset(&b->io, 0, sizeof(b->io));
	b->io.chan = b->c;
	ASSERT_OK(ferry_stream_write_header(b->c, NULL));
}

static void b_rec(struct builder *b, uint8_t type, const void *body, size_t len)
{
	ASSERT_OK(ferry_record_write(&b->io, type, body, len, NULL));
}

static void b_section(struct builder *b, uint8_t type, uint32_t id,
		      const char *name, uint32_t inst, uint32_t ver,
		      const void *payload, size_t plen)
{
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	const uint8_t *d;
	size_t n;

	ferry_put_be32(c, id);
	if (name) {
		ferry_put_str8(c, name);
		ferry_put_be32(c, inst);
		ferry_put_be32(c, ver);
	}
	ferry_put_buf(c, payload, plen);
	d = ferry_chan_mem_data(c, &n);
	b_rec(b, type, d, n);
	ferry_chan_free(c);
}

static void expect_fail(struct builder *b, int code, const char *needle)
{
	struct ferry_error err = { 0 };
	const uint8_t *d;
	size_t n;

	d = ferry_chan_mem_data(b->c, &n);
	ASSERT_ERR(load_into_fresh(d, n, &err), code);
	ASSERT_CONTAINS(err.msg, needle);
	ferry_chan_free(b->c);
}

TEST(hostile_semantics)
{
	struct builder b;
	uint8_t geo[8] = { 0, 0, 0, 3, 0, 0, 0x10, 0 };
	uint8_t cmd[64];

	b_init(&b); /* PART before START */
	b_section(&b, FERRY_REC_SECTION_PART, 9, NULL, 0, 0, "", 0);
	expect_fail(&b, -EBADMSG, "section id 9 that was never started");

	b_init(&b); /* unknown device */
	b_section(&b, FERRY_REC_SECTION_FULL, 1, "nosuch", 0, 1, "", 0);
	expect_fail(&b, -ENOENT, "'nosuch' instance 0: no such device");

	b_init(&b); /* START twice */
	b_section(&b, FERRY_REC_SECTION_START, 1, "tram", 0, 1, geo, 8);
	b_section(&b, FERRY_REC_SECTION_START, 1, "tram", 0, 1, geo, 8);
	expect_fail(&b, -EBADMSG, "appears twice");

	b_init(&b); /* FULL for an iterable device */
	b_section(&b, FERRY_REC_SECTION_FULL, 1, "tram", 0, 1, geo, 8);
	expect_fail(&b, -EBADMSG, "FULL section for an iterable device");

	b_init(&b); /* PART after END */
	b_section(&b, FERRY_REC_SECTION_START, 1, "tram", 0, 1, geo, 8);
	b_section(&b, FERRY_REC_SECTION_END, 1, NULL, 0, 0, "\xff\xff\xff\xff", 4);
	b_section(&b, FERRY_REC_SECTION_PART, 1, NULL, 0, 0, "\xff\xff\xff\xff", 4);
	expect_fail(&b, -EBADMSG, "after its END");

	b_init(&b); /* leftover payload bytes */
	b_section(&b, FERRY_REC_SECTION_START, 1, "tram", 0, 1,
		  "\0\0\0\3\0\0\x10\0junk", 12);
	expect_fail(&b, -EBADMSG, "4 bytes left unread");

	b_init(&b); /* device's own bounds check on a page index */
	b_section(&b, FERRY_REC_SECTION_START, 1, "tram", 0, 1, geo, 8);
	b_section(&b, FERRY_REC_SECTION_PART, 1, NULL, 0, 0, "\0\0\0\x63", 4);
	expect_fail(&b, -ERANGE, "section 'tram' instance 0 (SECTION_PART)");

	b_init(&b); /* unknown mandatory record type; optional one skipped */
	b_rec(&b, 0x81, "skip me", 7);
	b_rec(&b, 0x31, "", 0);
	expect_fail(&b, -EBADMSG, "unknown record type 0x31");

	b_init(&b); /* EOF with a body */
	b_rec(&b, FERRY_REC_EOF, "x", 1);
	expect_fail(&b, -EBADMSG, "EOF record with a body");

	b_init(&b); /* stream ends without EOF */
	expect_fail(&b, -EBADMSG, "without an EOF record");

	b_init(&b); /* unknown command */
	b_rec(&b, FERRY_REC_COMMAND, "\x00\x63", 2);
	expect_fail(&b, -EBADMSG, "unknown command 99");

	b_init(&b); /* PING with a short payload */
	b_rec(&b, FERRY_REC_COMMAND, "\x00\x02\x01", 3);
	expect_fail(&b, -EBADMSG, "PING with a malformed 1-byte payload");

	b_init(&b); /* DISCARD claiming more ranges than it carries */
	memcpy(cmd, "\x00\x06\x03ram\x00\x00\x00\x05", 10);
	memset(cmd + 10, 0, 16);
	b_rec(&b, FERRY_REC_COMMAND, cmd, 26);
	expect_fail(&b, -EBADMSG, "POSTCOPY_DISCARD with a malformed");

	b_init(&b); /* package in a package */
	{
		struct builder inner;
		const uint8_t *d;
		size_t n;
		uint8_t *pk;

		inner.c = ferry_chan_new_mem_writer(0);
		memset(&inner.io, 0, sizeof(inner.io));
		inner.io.chan = inner.c;
		b_rec(&inner, FERRY_REC_COMMAND, "\x00\x07", 2);
		d = ferry_chan_mem_data(inner.c, &n);
		pk = malloc(n + 2);
		pk[0] = 0;
		pk[1] = FERRY_CMD_PACKAGED;
		memcpy(pk + 2, d, n);
		b_rec(&b, FERRY_REC_COMMAND, pk, n + 2);
		free(pk);
		ferry_chan_free(inner.c);
	}
	expect_fail(&b, -EBADMSG, "PACKAGED inside PACKAGED");

	b_init(&b); /* device state for a device that takes none */
	{
		uint8_t ds[] = { 4, 't', 'r', 'a', 'm', 0, 0, 0, 0, 0, 0, 0, 0, 1 };
		b_rec(&b, FERRY_REC_DEVSTATE, ds, sizeof(ds));
	}
	expect_fail(&b, -ENOENT, "'tram' instance 0, which takes no buffers");

	b_init(&b); /* device state out of order */
	{
		uint8_t ds[] = { 5, 't', 'b', 'l', 'o', 'b', 0, 0, 0, 0, 0, 0, 0, 1, 1 };
		b_rec(&b, FERRY_REC_DEVSTATE, ds, sizeof(ds));
	}
	expect_fail(&b, -EBADMSG, "buffer 1 arrived, expected 0");
}

TEST(hostile_fuzz_smoke)
{
	const char *bin = getenv("FERRY_FUZZ_BIN");
	char *out = NULL;
	int st;

	if (!bin || access(bin, X_OK))
		SKIP("fuzz target not built (needs clang with libFuzzer; "
		     "set FERRY_FUZZ_BIN, as make check does)");
	st = test_run(&out, "%s -max_total_time=%s -rss_limit_mb=2048 "
		      "-print_final_stats=1 %s tests/fuzz/seeds", bin,
		      getenv("FERRY_FUZZ_SECONDS") ? getenv("FERRY_FUZZ_SECONDS") : "8",
		      test_tmpdir());
	if (st != 0)
		FAIL("fuzzer found a problem (exit %d):\n%s", st, out);
	ASSERT_CONTAINS(out, "Done");
	free(out);
}
