/*
 * ferry/channel.h - buffered byte channels.
 *
 * A channel is one direction of a byte stream: a reader or a writer. It
 * buffers, offers big-endian put/get helpers, counts bytes, and keeps a
 * *sticky first error*: once an operation fails, every later operation is a
 * no-op (getters return 0) and ferry_chan_error() reports the first failure.
 * Hot loops therefore just put/get and check the error at batch boundaries.
 *
 * Backends: a file descriptor (socket, pipe, file), a caller-owned memory
 * buffer (reader), a growable memory buffer (writer), or caller-supplied ops
 * (so TLS or fault injection can be stacked underneath without touching the
 * users of the channel).
 *
 * Threads: a channel is not thread-safe; one thread uses it at a time. The
 * library serialises its own concurrent writers with its own locks.
 */
#ifndef FERRY_CHANNEL_H
#define FERRY_CHANNEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "ferry/common.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ferry_chan;

/*
 * Backend operations for ferry_chan_new_ops(). Each returns the number of
 * bytes moved (> 0), 0 for end of stream (read only), or -errno. Short
 * transfers are fine: the channel loops. EINTR/EAGAIN handling is the
 * backend's job. close() is called once by ferry_chan_free(); shutdown()
 * may be called from another thread to unblock a blocked read or write
 * (it must be async-safe w.r.t. read/write) and may be NULL.
 */
struct ferry_chan_ops {
	ssize_t (*read)(void *opaque, void *buf, size_t len);
	ssize_t (*write)(void *opaque, const void *buf, size_t len);
	int (*shutdown)(void *opaque);
	int (*close)(void *opaque);
};

enum ferry_chan_dir { FERRY_CHAN_READ, FERRY_CHAN_WRITE };

/* Wrap @fd. If @own_fd, ferry_chan_free() closes it. NULL on ENOMEM. */
FERRY_API struct ferry_chan *ferry_chan_new_fd(int fd, enum ferry_chan_dir dir,
					       bool own_fd);
/* Read from [buf, buf+len). The caller keeps ownership of @buf, which must
 * outlive the channel. Reading past the end is an error (-EBADMSG). */
FERRY_API struct ferry_chan *ferry_chan_new_mem_reader(const void *buf,
						       size_t len);
/* Write into a growable buffer owned by the channel (see ferry_chan_mem_*).
 * Writes beyond @limit bytes fail with -EFBIG (0 = no limit). */
FERRY_API struct ferry_chan *ferry_chan_new_mem_writer(size_t limit);
FERRY_API struct ferry_chan *ferry_chan_new_ops(const struct ferry_chan_ops *ops,
						void *opaque,
						enum ferry_chan_dir dir);
/* Flush (writers), close the backend if owned, free. NULL is a no-op. */
FERRY_API void ferry_chan_free(struct ferry_chan *c);

/*
 * fd and TLS channels: a read or write that makes no progress for @timeout_ms
 * fails with -ETIMEDOUT (a peer that stopped talking or reading); 0 (the
 * default) waits for ever. Set it before the channel is shared.
 */
FERRY_API void ferry_chan_set_timeout(struct ferry_chan *c, int timeout_ms);

/* Unblock a reader/writer blocked in another thread; sets -ESHUTDOWN. */
FERRY_API void ferry_chan_shutdown(struct ferry_chan *c);

/* Memory writers: the bytes written so far (valid until the next write). */
FERRY_API const uint8_t *ferry_chan_mem_data(const struct ferry_chan *c,
					     size_t *len);
/* Memory writers: drop the contents, keep the allocation and counters. */
FERRY_API void ferry_chan_mem_reset(struct ferry_chan *c);
/* Memory readers: bytes not read yet. */
FERRY_API size_t ferry_chan_mem_remaining(const struct ferry_chan *c);

/* Sticky error: 0 or the first -errno; @err (optional) receives the message. */
FERRY_API int ferry_chan_error(const struct ferry_chan *c,
			       struct ferry_error *err);
/* Record an error on the channel (first one wins). Returns @code. */
FERRY_API int ferry_chan_set_error(struct ferry_chan *c, int code,
				   const char *fmt, ...) FERRY_PRINTF(3, 4);

/* Bytes moved through the channel so far (written, or consumed by reads). */
FERRY_API uint64_t ferry_chan_offset(const struct ferry_chan *c);

/* Writers. On error they do nothing; check ferry_chan_error(). */
FERRY_API void ferry_put_u8(struct ferry_chan *c, uint8_t v);
FERRY_API void ferry_put_be16(struct ferry_chan *c, uint16_t v);
FERRY_API void ferry_put_be32(struct ferry_chan *c, uint32_t v);
FERRY_API void ferry_put_be64(struct ferry_chan *c, uint64_t v);
FERRY_API void ferry_put_buf(struct ferry_chan *c, const void *buf, size_t len);
/* u8 length + bytes (no NUL); strings longer than 255 set -ENAMETOOLONG. */
FERRY_API void ferry_put_str8(struct ferry_chan *c, const char *s);
/* Push buffered bytes to the backend. Returns the sticky error. */
FERRY_API int ferry_chan_flush(struct ferry_chan *c);

/* Readers. On error (including a short read) they return 0 / leave the
 * buffer zeroed and set the sticky error; check ferry_chan_error(). */
FERRY_API uint8_t ferry_get_u8(struct ferry_chan *c);
FERRY_API uint16_t ferry_get_be16(struct ferry_chan *c);
FERRY_API uint32_t ferry_get_be32(struct ferry_chan *c);
FERRY_API uint64_t ferry_get_be64(struct ferry_chan *c);
FERRY_API void ferry_get_buf(struct ferry_chan *c, void *buf, size_t len);
/* Read a u8-length string into @buf (size @size >= 256 recommended), always
 * NUL-terminated; embedded NULs or overlong strings set -EBADMSG. */
FERRY_API void ferry_get_str8(struct ferry_chan *c, char *buf, size_t size);
/* Read up to @len bytes; returns bytes read (< len only at end of stream,
 * which is not an error here), or -errno. */
FERRY_API ssize_t ferry_get_partial(struct ferry_chan *c, void *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
