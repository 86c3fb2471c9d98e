/*
 * channel.c - buffered byte channels with a sticky first error.
 *
 * Design: every channel is a reader or a writer over one of three backends:
 * a backend ops table (file descriptors use a built-in table), a caller's
 * memory (reader) or a growable memory buffer (writer). Stream backends get a
 * 64 KiB buffer; transfers larger than the buffer bypass it, so a page run
 * from guest RAM is written straight from guest memory with no copy.
 *
 * The sticky error is the heart of it: hot paths (ferry_put_be64 per page)
 * never branch on failure, and the first failure - with the stream offset at
 * which it happened - is what the caller reports.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ferry/channel.h"
#include "internal.h"

#define CHAN_BUF_SIZE (64u << 10)

enum chan_backend { BACKEND_OPS, BACKEND_MEM_READ, BACKEND_MEM_WRITE };

struct ferry_chan {
	enum ferry_chan_dir dir;
	enum chan_backend backend;

	/* BACKEND_OPS */
	const struct ferry_chan_ops *ops;
	void *opaque;
	int fd;      /* fd backend: the fd, and whether we close it */
	bool own_fd;
	int timeout_ms; /* fd backend: longest wait for progress, 0 = none */
	bool not_socket; /* fd backend: send() said ENOTSOCK once */

	/* Buffer: for OPS readers [pos, len) is unread data; for OPS writers
	 * [0, len) is unflushed data; for MEM_READ it aliases the caller's
	 * memory; for MEM_WRITE it is the growable result. */
	uint8_t *buf;
	size_t pos, len, cap;
	size_t limit;       /* MEM_WRITE cap, 0 = none */
	bool eof;           /* OPS reader hit end of stream */

	uint64_t offset;    /* bytes consumed (reader) or produced (writer) */
	struct ferry_error err;
};

/*
 * Wait until @fd is ready for @events, at most the channel's timeout.
 * Returns 0, or -ETIMEDOUT when the peer made no progress for that long.
 * Without a timeout it returns at once and the caller blocks in the
 * syscall itself.
 */
static int fd_wait(const struct ferry_chan *c, short events)
{
	struct pollfd p = { .fd = c->fd, .events = events };
	int r;

	if (c->timeout_ms <= 0)
		return 0;
	do
		r = poll(&p, 1, c->timeout_ms);
	while (r < 0 && errno == EINTR);
	return r == 0 ? -ETIMEDOUT : 0;
}

static ssize_t fd_read(void *opaque, void *buf, size_t len)
{
	struct ferry_chan *c = opaque;
	int fd = c->fd;
	for (;;) {
		ssize_t n;

		if (fd_wait(c, POLLIN))
			return -ETIMEDOUT;
		n = read(fd, buf, len);
		if (n >= 0)
			return n;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN) {
			struct pollfd p = { .fd = fd, .events = POLLIN };
			poll(&p, 1, -1);
			continue;
		}
		return -errno;
	}
}

static ssize_t fd_write(void *opaque, const void *buf, size_t len)
{
	struct ferry_chan *c = opaque;
	int fd = c->fd;
	for (;;) {
		/* MSG_NOSIGNAL: a vanished peer must become EPIPE on this
		 * channel, not a SIGPIPE that kills the source VM's process.
		 * Files and pipes are not sockets; they fall back to write(). */
		/* With a timeout, never block inside send(): wait for room
		 * in poll(), where the wait is bounded. */
		ssize_t n = c->not_socket ? write(fd, buf, len)
			: send(fd, buf, len, MSG_NOSIGNAL |
			       (c->timeout_ms > 0 ? MSG_DONTWAIT : 0));
		if (n < 0 && errno == ENOTSOCK && !c->not_socket) {
			c->not_socket = true;
			continue;
		}
		if (n >= 0)
			return n;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN) {
			struct pollfd p = { .fd = fd, .events = POLLOUT };

			if (c->timeout_ms > 0) {
				if (fd_wait(c, POLLOUT))
					return -ETIMEDOUT;
				continue;
			}
			poll(&p, 1, -1);
			continue;
		}
		return -errno;
	}
}

static int fd_shutdown(void *opaque)
{
	int fd = ((struct ferry_chan *)opaque)->fd;
	/* Works for sockets; for files and pipes there is nothing to unblock
	 * (reads of regular files never block indefinitely). */
	if (shutdown(fd, SHUT_RDWR) < 0 && errno != ENOTSOCK)
		return -errno;
	return 0;
}

static const struct ferry_chan_ops fd_ops = {
	.read = fd_read, .write = fd_write, .shutdown = fd_shutdown,
};

static struct ferry_chan *chan_alloc(enum ferry_chan_dir dir,
				     enum chan_backend b)
{
	struct ferry_chan *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->dir = dir;
	c->backend = b;
	c->fd = -1;
	return c;
}

struct ferry_chan *ferry_chan_new_ops(const struct ferry_chan_ops *ops,
				      void *opaque, enum ferry_chan_dir dir)
{
	struct ferry_chan *c = chan_alloc(dir, BACKEND_OPS);
	if (!c)
		return NULL;
	c->ops = ops;
	c->opaque = opaque;
	c->cap = CHAN_BUF_SIZE;
	c->buf = malloc(c->cap);
	if (!c->buf) {
		free(c);
		return NULL;
	}
	return c;
}

struct ferry_chan *ferry_chan_new_fd(int fd, enum ferry_chan_dir dir,
				     bool own_fd)
{
	struct ferry_chan *c = ferry_chan_new_ops(&fd_ops, NULL, dir);
	if (!c)
		return NULL;
	c->fd = fd;
	c->own_fd = own_fd;
	c->opaque = c;
	return c;
}

void ferry_chan_set_timeout(struct ferry_chan *c, int timeout_ms)
{
	c->timeout_ms = timeout_ms > 0 ? timeout_ms : 0;
}

int ferry__chan_timeout(const struct ferry_chan *c)
{
	return c->timeout_ms;
}

struct ferry_chan *ferry_chan_new_mem_reader(const void *buf, size_t len)
{
	struct ferry_chan *c = chan_alloc(FERRY_CHAN_READ, BACKEND_MEM_READ);
	if (!c)
		return NULL;
	c->buf = (uint8_t *)buf; /* never written through */
	c->len = len;
	return c;
}

struct ferry_chan *ferry_chan_new_mem_writer(size_t limit)
{
	struct ferry_chan *c = chan_alloc(FERRY_CHAN_WRITE, BACKEND_MEM_WRITE);
	if (!c)
		return NULL;
	c->limit = limit;
	return c;
}

void ferry_chan_free(struct ferry_chan *c)
{
	if (!c)
		return;
	if (c->dir == FERRY_CHAN_WRITE && c->backend == BACKEND_OPS)
		ferry_chan_flush(c);
	if (c->backend == BACKEND_OPS) {
		if (c->ops->close && c->ops != &fd_ops)
			c->ops->close(c->opaque);
		if (c->own_fd && c->fd >= 0)
			close(c->fd);
	}
	if (c->backend != BACKEND_MEM_READ)
		free(c->buf);
	free(c);
}

void ferry_chan_shutdown(struct ferry_chan *c)
{
	if (c->backend == BACKEND_OPS && c->ops->shutdown)
		c->ops->shutdown(c->opaque);
}

const uint8_t *ferry_chan_mem_data(const struct ferry_chan *c, size_t *len)
{
	*len = c->backend == BACKEND_MEM_WRITE ? c->len : 0;
	return c->buf;
}

void ferry_chan_mem_reset(struct ferry_chan *c)
{
	if (c->backend == BACKEND_MEM_WRITE)
		c->len = 0;
}

size_t ferry_chan_mem_remaining(const struct ferry_chan *c)
{
	if (c->backend != BACKEND_MEM_READ)
		return 0;
	return c->len - c->pos;
}

int ferry_chan_error(const struct ferry_chan *c, struct ferry_error *err)
{
	if (c->err.code)
		ferry_error_propagate(err, &c->err);
	return c->err.code;
}

int ferry_chan_set_error(struct ferry_chan *c, int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	code = ferry_error_setv(&c->err, code, fmt, ap);
	va_end(ap);
	return code;
}

uint64_t ferry_chan_offset(const struct ferry_chan *c)
{
	return c->offset;
}

/* ---- writing ------------------------------------------------------------ */

static int backend_write_all(struct ferry_chan *c, const uint8_t *p, size_t len)
{
	while (len) {
		ssize_t n = c->ops->write(c->opaque, p, len);
		if (n <= 0) {
			int e = n < 0 ? (int)n : -EIO;
			return ferry_chan_set_error(c, e,
				"write failed at offset %llu: %s",
				(unsigned long long)c->offset, strerror(-e));
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

int ferry_chan_flush(struct ferry_chan *c)
{
	if (c->err.code)
		return c->err.code;
	if (c->dir != FERRY_CHAN_WRITE || c->backend != BACKEND_OPS || !c->len)
		return 0;
	backend_write_all(c, c->buf, c->len);
	c->len = 0;
	return c->err.code;
}

static bool mem_grow(struct ferry_chan *c, size_t need)
{
	size_t cap = c->cap ? c->cap : 4096;
	uint8_t *nb;

	if (c->limit && need > c->limit) {
		ferry_chan_set_error(c, -EFBIG,
			"memory channel limit of %zu bytes exceeded", c->limit);
		return false;
	}
	while (cap < need)
		cap *= 2;
	if (c->limit && cap > c->limit)
		cap = c->limit;
	nb = realloc(c->buf, cap);
	if (!nb) {
		ferry_chan_set_error(c, -ENOMEM, "out of memory (%zu bytes)", cap);
		return false;
	}
	c->buf = nb;
	c->cap = cap;
	return true;
}

void ferry_put_buf(struct ferry_chan *c, const void *buf, size_t len)
{
	if (c->err.code || !len)
		return;
	if (c->dir != FERRY_CHAN_WRITE) {
		ferry_chan_set_error(c, -EBADF, "write on a read channel");
		return;
	}
	if (c->backend == BACKEND_MEM_WRITE) {
		if (c->len + len > c->cap && !mem_grow(c, c->len + len))
			return;
		memcpy(c->buf + c->len, buf, len);
		c->len += len;
	} else if (len >= c->cap) {
		/* Large writes skip the buffer: no copy of page runs. */
		if (ferry_chan_flush(c))
			return;
		backend_write_all(c, buf, len);
	} else {
		if (c->len + len > c->cap && ferry_chan_flush(c))
			return;
		memcpy(c->buf + c->len, buf, len);
		c->len += len;
	}
	if (!c->err.code)
		c->offset += len;
}

void ferry_put_u8(struct ferry_chan *c, uint8_t v)
{
	ferry_put_buf(c, &v, 1);
}

void ferry_put_be16(struct ferry_chan *c, uint16_t v)
{
	uint8_t b[2] = { v >> 8, v };
	ferry_put_buf(c, b, 2);
}

void ferry_put_be32(struct ferry_chan *c, uint32_t v)
{
	uint8_t b[4] = { v >> 24, v >> 16, v >> 8, v };
	ferry_put_buf(c, b, 4);
}

void ferry_put_be64(struct ferry_chan *c, uint64_t v)
{
	ferry_put_be32(c, (uint32_t)(v >> 32));
	ferry_put_be32(c, (uint32_t)v);
}

void ferry_put_str8(struct ferry_chan *c, const char *s)
{
	size_t n = strlen(s);

	if (n > 255) {
		ferry_chan_set_error(c, -ENAMETOOLONG,
				     "name longer than 255 bytes: %.40s...", s);
		return;
	}
	ferry_put_u8(c, (uint8_t)n);
	ferry_put_buf(c, s, n);
}

/* ---- reading ------------------------------------------------------------ */

ssize_t ferry_get_partial(struct ferry_chan *c, void *buf, size_t len)
{
	uint8_t *out = buf;
	size_t done = 0;

	if (c->err.code)
		return c->err.code;
	if (c->dir != FERRY_CHAN_READ)
		return ferry_chan_set_error(c, -EBADF, "read on a write channel");
	while (done < len) {
		size_t avail = c->len - c->pos;
		if (avail) {
			size_t n = avail < len - done ? avail : len - done;
			memcpy(out + done, c->buf + c->pos, n);
			c->pos += n;
			done += n;
			continue;
		}
		if (c->backend != BACKEND_OPS || c->eof)
			break;
		{
			/* Large reads go straight to the caller's buffer. */
			size_t want = len - done;
			bool direct = want >= c->cap;
			ssize_t n = c->ops->read(c->opaque,
						 direct ? out + done : c->buf,
						 direct ? want : c->cap);
			if (n < 0) {
				c->offset += done;
				return ferry_chan_set_error(c, (int)n,
					"read failed at offset %llu: %s",
					(unsigned long long)c->offset,
					strerror((int)-n));
			}
			if (n == 0) {
				c->eof = true;
				break;
			}
			if (direct) {
				done += (size_t)n;
			} else {
				c->pos = 0;
				c->len = (size_t)n;
			}
		}
	}
	c->offset += done;
	return (ssize_t)done;
}

void ferry_get_buf(struct ferry_chan *c, void *buf, size_t len)
{
	ssize_t n = ferry_get_partial(c, buf, len);

	if (n >= 0 && (size_t)n < len)
		ferry_chan_set_error(c, -EBADMSG,
			"unexpected end of stream at offset %llu (wanted %zu more bytes)",
			(unsigned long long)c->offset, len - (size_t)n);
	if (c->err.code && len)
		memset(buf, 0, len);
}

uint8_t ferry_get_u8(struct ferry_chan *c)
{
	uint8_t v;
	ferry_get_buf(c, &v, 1);
	return v;
}

uint16_t ferry_get_be16(struct ferry_chan *c)
{
	uint8_t b[2];
	ferry_get_buf(c, b, 2);
	return (uint16_t)(b[0] << 8 | b[1]);
}

uint32_t ferry_get_be32(struct ferry_chan *c)
{
	uint8_t b[4];
	ferry_get_buf(c, b, 4);
	return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 |
	       (uint32_t)b[2] << 8 | b[3];
}

uint64_t ferry_get_be64(struct ferry_chan *c)
{
	uint64_t hi = ferry_get_be32(c);
	return hi << 32 | ferry_get_be32(c);
}

void ferry_get_str8(struct ferry_chan *c, char *buf, size_t size)
{
	uint8_t n = ferry_get_u8(c);

	buf[0] = 0;
	if (c->err.code)
		return;
	if ((size_t)n + 1 > size) {
		ferry_chan_set_error(c, -EBADMSG,
			"name of %u bytes does not fit (max %zu) at offset %llu",
			n, size - 1, (unsigned long long)c->offset);
		return;
	}
	ferry_get_buf(c, buf, n);
	buf[c->err.code ? 0 : n] = 0;
	if (!c->err.code && memchr(buf, 0, n))
		ferry_chan_set_error(c, -EBADMSG,
			"name with an embedded NUL at offset %llu",
			(unsigned long long)c->offset);
}
