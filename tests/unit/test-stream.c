/*
 * tests/unit/test-stream.c - the record layer: golden bytes, round trips,
 * and the checks that catch damage, reordering and lying lengths.
 */
#include "../harness.h"

#include "ferry/ferry.h"
#include "testdev.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

TEST(stream_header_golden)
{
	static const uint8_t want[16] = {
		'F', 'R', 'R', 'Y', 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0,
	};
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	const uint8_t *d;
	size_t n;

	ASSERT_OK(ferry_stream_write_header(c, NULL));
	d = ferry_chan_mem_data(c, &n);
	ASSERT_EQ(n, 16);
	ASSERT_MEMEQ(d, want, 16);
	ferry_chan_free(c);
}

/* The worked example of docs/stream-format.md: a FULL record with body "abc"
 * as the first record of a stream (sequence 0). */
TEST(stream_record_golden)
{
	static const uint8_t want[] = {
		0x04, 0x00, 0x00, 0x00, 0x03, 'a', 'b', 'c',
		0xe4, 0xf2, 0x3c, 0xae, 0x74, 0x1a, 0xc7, 0xca,
	};
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	struct ferry_record_io io = { .chan = c };
	const uint8_t *d;
	size_t n;

	ASSERT_OK(ferry_record_write(&io, FERRY_REC_SECTION_FULL, "abc", 3, NULL));
	d = ferry_chan_mem_data(c, &n);
	ASSERT_EQ(n, sizeof(want));
	ASSERT_MEMEQ(d, want, n);
	ASSERT_EQ_U64(ferry_record_check(7, 0, "", 0), 0x265481ba67495b52ull);
	ferry_chan_free(c);
}

/* A whole saved stream starts with the documented bytes for a vmstate
 * device: header, then a FULL section 'g' instance 0 version 1 holding
 * be32 0x01020304 and the end-of-subsections byte. */
struct g { uint32_t v; };
static const struct ferry_vms_field g_fields[] = {
	FERRY_VMS_U32(struct g, v), FERRY_VMS_END_OF_LIST,
};
static const struct ferry_vmsd g_vmsd = {
	.name = "g", .version = 1, .minimum_version = 1, .fields = g_fields,
};

TEST(stream_save_golden)
{
	static const uint8_t want[] = {
		'F', 'R', 'R', 'Y', 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0,
		0x04, 0x00, 0x00, 0x00, 0x13,           /* FULL, 19 bytes */
		0x00, 0x00, 0x00, 0x01,                 /* section id 1 */
		0x01, 'g',                              /* idstr */
		0x00, 0x00, 0x00, 0x00,                 /* instance 0 */
		0x00, 0x00, 0x00, 0x01,                 /* version 1 */
		0x01, 0x02, 0x03, 0x04,                 /* field v */
		0x00,                                   /* no subsections */
	};
	struct g obj = { 0x01020304 };
	struct ferry_error err = { 0 };
	struct ferry_ctx *ctx = ferry_ctx_new(NULL);
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	struct ferry_record_io io;
	struct ferry_record rec;
	struct ferry_chan *r;
	const uint8_t *d;
	size_t n;

	ASSERT_OK_E(ferry_register_vmstate(ctx, &g_vmsd, 0, &obj, &err), err);
	ASSERT_OK_E(ferry_save_all(ctx, c, 0, &err), err);
	d = ferry_chan_mem_data(c, &n);
	ASSERT_GT(n, sizeof(want) + 8);
	ASSERT_MEMEQ(d, want, sizeof(want));
	ASSERT_EQ_U64(((uint64_t)d[sizeof(want)] << 56) | ((uint64_t)d[sizeof(want) + 1] << 48) |
		      ((uint64_t)d[sizeof(want) + 2] << 40) | ((uint64_t)d[sizeof(want) + 3] << 32) |
		      ((uint64_t)d[sizeof(want) + 4] << 24) | ((uint64_t)d[sizeof(want) + 5] << 16) |
		      ((uint64_t)d[sizeof(want) + 6] << 8) | d[sizeof(want) + 7],
		      ferry_record_check(0, 0x04, want + 21, 19));
	/* Then VMDESC naming the device, then EOF as the very last record. */
	r = ferry_chan_new_mem_reader(d, n);
	memset(&io, 0, sizeof(io));
	io.chan = r;
	ASSERT_OK(ferry_stream_read_header(r, NULL));
	ASSERT_OK(ferry_record_read(&io, &rec, NULL));
	ASSERT_EQ(rec.type, FERRY_REC_SECTION_FULL);
	ASSERT_OK(ferry_record_read(&io, &rec, NULL));
	ASSERT_EQ(rec.type, FERRY_REC_VMDESC);
	{
		char *js = strndup((const char *)rec.body, rec.len);
		ASSERT_CONTAINS(js, "\"name\":\"g\"");
		free(js);
	}
	ASSERT_OK(ferry_record_read(&io, &rec, NULL));
	ASSERT_EQ(rec.type, FERRY_REC_EOF);
	ASSERT_EQ(rec.len, 0);
	ASSERT_EQ(ferry_chan_mem_remaining(r), 0);
	ferry_record_io_release(&io);
	ferry_chan_free(r);
	ferry_chan_free(c);
	ferry_ctx_free(ctx);
}

TEST(stream_record_roundtrip)
{
	struct ferry_chan *w = ferry_chan_new_mem_writer(0), *r;
	struct ferry_record_io wio = { .chan = w }, rio = { 0 };
	struct ferry_record rec;
	uint8_t *bodies[20];
	size_t lens[20];
	const uint8_t *d;
	size_t n;

	for (int i = 0; i < 20; i++) {
		lens[i] = test_rand() % (i == 7 ? 300000 : 2000);
		bodies[i] = malloc(lens[i] + 1);
		for (size_t j = 0; j < lens[i]; j++)
			bodies[i][j] = (uint8_t)test_rand();
		ASSERT_OK(ferry_record_write(&wio, (uint8_t)(1 + i % 4), bodies[i],
					     lens[i], NULL));
	}
	d = ferry_chan_mem_data(w, &n);
	r = ferry_chan_new_mem_reader(d, n);
	rio.chan = r;
	for (int i = 0; i < 20; i++) {
		ASSERT_OK(ferry_record_read(&rio, &rec, NULL));
		ASSERT_EQ(rec.type, 1 + i % 4);
		ASSERT_EQ(rec.len, lens[i]);
		ASSERT_EQ(rec.seq, i);
		if (lens[i])
			ASSERT_MEMEQ(rec.body, bodies[i], lens[i]);
		free(bodies[i]);
	}
	ASSERT_EQ(ferry_chan_mem_remaining(r), 0);
	ferry_record_io_release(&rio);
	ferry_chan_free(r);
	ferry_chan_free(w);
}

/* Two valid records swapped: each is intact, but the sequence-seeded check
 * catches the reordering. */
TEST(stream_check_detects_reorder)
{
	struct ferry_chan *w = ferry_chan_new_mem_writer(0), *r;
	struct ferry_record_io wio = { .chan = w }, rio = { 0 };
	struct ferry_record rec;
	struct ferry_error err = { 0 };
	uint8_t swapped[64];
	const uint8_t *d;
	size_t n;

	ASSERT_OK(ferry_record_write(&wio, 2, "first", 5, NULL));
	ASSERT_OK(ferry_record_write(&wio, 2, "later", 5, NULL));
	d = ferry_chan_mem_data(w, &n);
	ASSERT_EQ(n, 36);
	memcpy(swapped, d + 18, 18);
	memcpy(swapped + 18, d, 18);
	r = ferry_chan_new_mem_reader(swapped, 36);
	rio.chan = r;
	ASSERT_ERR(ferry_record_read(&rio, &rec, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "fails its check");
	ASSERT_CONTAINS(err.msg, "offset 0");
	ferry_record_io_release(&rio);
	ferry_chan_free(r);
	ferry_chan_free(w);
}

/* A record claiming 200 MiB on a short stream fails as truncated, and the
 * reader's buffer grows with what arrived, not with the claim. */
TEST(stream_lying_length_is_bounded)
{
	uint8_t buf[5 + 1000] = { 0x02, 0x0c, 0x80, 0x00, 0x00 };
	struct ferry_chan *r = ferry_chan_new_mem_reader(buf, sizeof(buf));
	struct ferry_record_io rio = { .chan = r };
	struct ferry_record rec;
	struct ferry_error err = { 0 };

	ASSERT_ERR(ferry_record_read(&rio, &rec, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "truncated");
	ASSERT_LE(rio.buf_size, 65536);
	ferry_record_io_release(&rio);
	ferry_chan_free(r);

	/* Over the cap: refused before reading the body. */
	buf[1] = 0xff;
	r = ferry_chan_new_mem_reader(buf, sizeof(buf));
	memset(&rio, 0, sizeof(rio));
	rio.chan = r;
	ferry_error_clear(&err);
	ASSERT_ERR(ferry_record_read(&rio, &rec, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "limit");
	ASSERT_EQ(rio.buf_size, 0);
	ferry_record_io_release(&rio);
	ferry_chan_free(r);
}

TEST(stream_bad_header)
{
	uint8_t h[16] = { 'F', 'R', 'R', 'Y', 0, 0, 0, 9 };
	struct ferry_error err = { 0 };
	struct ferry_chan *r = ferry_chan_new_mem_reader(h, sizeof(h));

	ASSERT_ERR(ferry_stream_read_header(r, &err), -EPROTONOSUPPORT);
	ASSERT_CONTAINS(err.msg, "version 9");
	ferry_chan_free(r);
	h[0] = 'Q';
	r = ferry_chan_new_mem_reader(h, sizeof(h));
	ferry_error_clear(&err);
	ASSERT_ERR(ferry_stream_read_header(r, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "not a ferry stream");
	ferry_chan_free(r);
	/* Version 1 (before the switchover handshake) still reads; 0 and 3
	 * do not. */
	for (uint8_t v = 0; v <= 3; v++) {
		h[0] = 'F';
		h[7] = v;
		r = ferry_chan_new_mem_reader(h, sizeof(h));
		ferry_error_clear(&err);
		if (v == 1 || v == 2)
			ASSERT_OK_E(ferry_stream_read_header(r, &err), err);
		else
			ASSERT_ERR(ferry_stream_read_header(r, &err),
				   -EPROTONOSUPPORT);
		ferry_chan_free(r);
	}
}
