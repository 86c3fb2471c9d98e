/*
 * tests/unit/test-channel.c - buffered channels: encodings, sticky errors,
 * memory and fd backends.
 */
#include "../harness.h"

#include <unistd.h>

#include "ferry/channel.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

TEST(channel_be_golden)
{
	static const uint8_t want[] = {
		0xab, 0x12, 0x34, 0xde, 0xad, 0xbe, 0xef,
		0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
		0x03, 'r', 'a', 'm',
	};
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	const uint8_t *d;
	size_t n;

	ferry_put_u8(c, 0xab);
	ferry_put_be16(c, 0x1234);
	ferry_put_be32(c, 0xdeadbeef);
	ferry_put_be64(c, 0x0102030405060708ull);
	ferry_put_str8(c, "ram");
	ASSERT_OK(ferry_chan_error(c, NULL));
	d = ferry_chan_mem_data(c, &n);
	ASSERT_EQ(n, sizeof(want));
	ASSERT_MEMEQ(d, want, n);
	ASSERT_EQ(ferry_chan_offset(c), sizeof(want));
	ferry_chan_free(c);
}

TEST(channel_roundtrip_and_sticky_error)
{
	uint8_t buf[64] = { 0x80, 0xff, 0xfe, 0x00, 0x00, 0x00, 0x01 };
	struct ferry_chan *r = ferry_chan_new_mem_reader(buf, 7);
	struct ferry_error err = { 0 };
	char s[8];

	ASSERT_EQ(ferry_get_u8(r), 0x80);
	ASSERT_EQ(ferry_get_be16(r), 0xfffe);
	ASSERT_EQ(ferry_get_be32(r), 1);
	ASSERT_OK(ferry_chan_error(r, NULL));
	/* Past the end: error, zero value, and it sticks. */
	ASSERT_EQ(ferry_get_be64(r), 0);
	ASSERT_ERR(ferry_chan_error(r, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "unexpected end");
	ASSERT_EQ(ferry_get_u8(r), 0);
	ferry_get_str8(r, s, sizeof(s));
	ASSERT_STREQ(s, "");
	ferry_chan_free(r);
}

TEST(channel_str8_hostile)
{
	uint8_t toolong[] = { 10, 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j' };
	uint8_t nul[] = { 3, 'a', 0, 'b' };
	char s[8];
	struct ferry_chan *r = ferry_chan_new_mem_reader(toolong, sizeof(toolong));

	ferry_get_str8(r, s, sizeof(s));
	ASSERT_ERR(ferry_chan_error(r, NULL), -EBADMSG);
	ASSERT_STREQ(s, "");
	ferry_chan_free(r);
	r = ferry_chan_new_mem_reader(nul, sizeof(nul));
	ferry_get_str8(r, s, sizeof(s));
	ASSERT_ERR(ferry_chan_error(r, NULL), -EBADMSG);
	ferry_chan_free(r);
}

TEST(channel_mem_writer_limit)
{
	struct ferry_chan *c = ferry_chan_new_mem_writer(100);
	uint8_t big[200] = { 0 };

	ferry_put_buf(c, big, 60);
	ASSERT_OK(ferry_chan_error(c, NULL));
	ferry_put_buf(c, big, 60);
	ASSERT_ERR(ferry_chan_error(c, NULL), -EFBIG);
	ferry_chan_free(c);
}

TEST(channel_fd_large_and_small)
{
	/* Mixed small and buffer-bypassing writes through a pipe, read back by
	 * a child, must arrive intact and in order. */
	size_t big = 300 * 1024;
	uint8_t *src = malloc(big), *dst = malloc(big);
	int p[2];
	pid_t pid;

	ASSERT_PTR(src);
	ASSERT_PTR(dst);
	for (size_t i = 0; i < big; i++)
		src[i] = (uint8_t)(test_rand() >> 7);
	ASSERT_OK(pipe(p));
	pid = fork();
	ASSERT(pid >= 0);
	if (pid == 0) {
		struct ferry_chan *w = ferry_chan_new_fd(p[1], FERRY_CHAN_WRITE, true);
		close(p[0]);
		ferry_put_be32(w, 0xc0ffee);
		ferry_put_buf(w, src, 100);
		ferry_put_buf(w, src + 100, big - 100); /* bypasses the buffer */
		ferry_put_be64(w, 42);
		_exit(ferry_chan_flush(w) ? 1 : (ferry_chan_free(w), 0));
	}
	close(p[1]);
	{
		struct ferry_chan *r = ferry_chan_new_fd(p[0], FERRY_CHAN_READ, true);
		ASSERT_EQ(ferry_get_be32(r), 0xc0ffee);
		ferry_get_buf(r, dst, big);
		ASSERT_EQ(ferry_get_be64(r), 42);
		ASSERT_OK(ferry_chan_error(r, NULL));
		ASSERT_MEMEQ(dst, src, big);
		ASSERT_EQ(ferry_chan_offset(r), 4 + big + 8);
		/* End of stream is an error for get, not for get_partial. */
		ASSERT_EQ(ferry_get_partial(r, dst, 10), 0);
		ferry_get_u8(r);
		ASSERT_ERR(ferry_chan_error(r, NULL), -EBADMSG);
		ferry_chan_free(r);
	}
	free(src);
	free(dst);
}

TEST(channel_write_to_closed_peer)
{
	int p[2];
	struct ferry_chan *w;
	struct ferry_error err = { 0 };
	uint8_t buf[4096] = { 0 };

	signal(SIGPIPE, SIG_IGN);
	ASSERT_OK(pipe(p));
	close(p[0]);
	w = ferry_chan_new_fd(p[1], FERRY_CHAN_WRITE, true);
	ferry_put_buf(w, buf, sizeof(buf));
	ASSERT_ERR(ferry_chan_flush(w), -EPIPE);
	ASSERT_ERR(ferry_chan_error(w, &err), -EPIPE);
	ASSERT_CONTAINS(err.msg, "write failed");
	ferry_chan_free(w);
}
