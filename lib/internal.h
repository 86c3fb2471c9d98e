/*
 * internal.h - library-private structures shared by registry.c, save.c,
 * load.c and describe.c. Not installed; nothing here is exported.
 */
#ifndef FERRY_INTERNAL_H
#define FERRY_INTERNAL_H

#include <pthread.h>
#include <stdint.h>

#include "ferry/migration.h"

/* Lock helpers: a failing pthread call is a broken invariant, not bad
 * input, so it aborts (the one place the library may). */
void ferry__mutex_lock(pthread_mutex_t *m);
void ferry__mutex_unlock(pthread_mutex_t *m);

/* A channel's timeout (ferry_chan_set_timeout), for ops backends that
 * wait themselves (TLS sessions). */
struct ferry_chan;
int ferry__chan_timeout(const struct ferry_chan *c);

/* After a write of @w bytes of @*iov (@*n entries): skip what went out,
 * trim a partly written entry. */
struct iovec;
void ferry__iov_advance(struct iovec **iov, int *n, size_t w);

/* Big-endian fields in byte buffers (the stream's byte order). */
static inline void ferry__put_be16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static inline uint16_t ferry__get_be16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static inline void ferry__put_be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

static inline void ferry__put_be64(uint8_t *p, uint64_t v)
{
	ferry__put_be32(p, (uint32_t)(v >> 32));
	ferry__put_be32(p + 4, (uint32_t)v);
}

static inline uint32_t ferry__get_be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
	       (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t ferry__get_be64(const uint8_t *p)
{
	return (uint64_t)ferry__get_be32(p) << 32 | ferry__get_be32(p + 4);
}

/* One registered device. Immutable after registration. */
struct ferry_dev {
	char idstr[FERRY_IDSTR_MAX + 1];
	uint32_t instance;
	uint32_t version, min_version;
	uint32_t section_id;              /* source-side id, from 1 */
	const struct ferry_dev_ops *ops;  /* = &ops_copy */
	struct ferry_dev_ops ops_copy;    /* the caller's, at this layout */
	void *opaque;
	const struct ferry_vmsd *vmsd;    /* vmstate devices only */
	void *obj;                        /* vmstate devices only */
	struct ferry_dev *next;
	/* Owned by the save in progress (reset when it starts): section
	 * bytes before the switchover (START, PART) and during it (END, FULL,
	 * buffers). Migration thread, and the device's save thread for the
	 * buffers, which the migration thread reads after joining it. */
	uint64_t sent_precopy, sent_switchover;
};

/*
 * The context. The registry may change only while no save or load runs on
 * the context (the VMM registers devices at start-up, on its main thread);
 * save and load only read it, so they take no lock on it.
 */
struct ferry__pool;
struct ferry__dsq;

struct ferry_ctx {
	struct ferry_dev *devs;   /* registration order = stream order */
	struct ferry_dev **tail;
	unsigned ndevs;
	uint32_t next_section_id;

	/* Threads for save_complete_thread hooks, started before the
	 * switchover (so starting them is not downtime) and kept until
	 * ferry_ctx_free. Used by the save, one at a time. */
	struct ferry__pool *pool;

	/* The load in progress, for buffers and approvals that come from
	 * other threads (ferry_load_devstate, ferry_load_switchover_ack).
	 * load_lock guards the pointers and the user count; the load waits
	 * for users to leave before it frees what they point to. */
	pthread_mutex_t load_lock;
	pthread_cond_t load_cond;   /* users reached 0 */
	struct ferry__dsq *dsq;     /* load_lock */
	void *loader;               /* load_lock: struct loader, load.c */
	unsigned load_users;        /* load_lock */
};

/* ---- the context's thread pool (pool.c) ----------------------------------- */

/* At least @n threads in @ctx's pool (at most FERRY__POOL_MAX). */
#define FERRY__POOL_MAX 16u
int ferry__pool_reserve(struct ferry_ctx *ctx, unsigned n,
			struct ferry_error *err);
/* At least @n threads of @ctx's pool idle (no job queued or running on
 * them), so that @n jobs submitted later start at once. -EAGAIN if that
 * would take more than FERRY__POOL_MAX threads. */
int ferry__pool_reserve_idle(struct ferry_ctx *ctx, unsigned n,
			     struct ferry_error *err);
/* A batch of jobs: fn(args[i]) for every i, each on a pool thread of its
 * own, started at once (threads are added when too few are idle; with
 * more than FERRY__POOL_MAX jobs busy, the rest wait for a thread). NULL
 * on failure, nothing queued. */
struct ferry__pool_batch;
struct ferry__pool_batch *ferry__pool_submit(struct ferry_ctx *ctx, unsigned n,
					     void (*fn)(void *arg),
					     void *const *args,
					     struct ferry_error *err);
/* Wait for every job of @batch, and free it. NULL is a no-op. */
void ferry__pool_wait(struct ferry_ctx *ctx, struct ferry__pool_batch *batch);
/* Jobs queued or running on @ctx's pool now. */
unsigned ferry__pool_busy(struct ferry_ctx *ctx);
void ferry__pool_free(struct ferry__pool *p);

static inline bool ferry__dev_iterable(const struct ferry_dev *d)
{
	return d->ops->save_iterate != NULL;
}

struct ferry_dev *ferry__find_dev(struct ferry_ctx *ctx, const char *idstr,
				  uint32_t instance);

/* CLOCK_MONOTONIC in nanoseconds (timestamps in save/load stats). */
uint64_t ferry__mono_ns(void);

/*
 * Feed one FULL section into the device-state digest: idstr, be32 instance,
 * payload. Save and load must hash exactly the same bytes, so both call
 * this. @xxh3 is an XXH3_state_t (kept opaque here so this header does not
 * pull in xxhash).
 */
void ferry__digest_section(void *xxh3, const char *idstr, uint32_t instance,
			   const void *payload, size_t len);

/* Is the page all zero? The first word decides for most data pages; the
 * rest is ORed eight words at a time. @len is a multiple of 64. */
static inline bool ferry__page_is_zero(const uint8_t *p, size_t len)
{
	const uint64_t *w = (const uint64_t *)p;
	uint64_t acc = 0;

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

/* Build the VMDESC/describe document (jansson), used by save and the CLI. */
char *ferry__describe(struct ferry_ctx *ctx, bool pretty);

/*
 * Versioned structs from the caller (first member: size_t size). Copy
 * @src into @dst (the library's layout, @dst_size bytes): an older, smaller
 * caller's missing fields read as zero; a newer, larger caller's extra
 * bytes must be zero (fields this library does not know, left unset).
 * -EINVAL for size 0 (".size not set"), -E2BIG for unknown fields set.
 */
int ferry__copy_sized(void *dst, size_t dst_size, const void *src,
		      const char *what, struct ferry_error *err);
/* The other way: fill a caller's versioned output struct @dst (its .size
 * set by the caller) from the library's @src of @src_size bytes, without
 * writing past the caller's size. */
void ferry__fill_sized(void *dst, const void *src, size_t src_size);

/* ---- save internals for the engine (save.c) ---------------------------- */

/* ferry_save_complete, with @before_eof (may be NULL) called after every
 * record but EOF is written (not all of them flushed), outside the writers'
 * lock: a non-zero return ends the save there, without EOF, so the
 * destination can never complete the load. The caller's commit point. */
int ferry__save_complete(struct ferry_save *s,
			 int (*before_eof)(void *arg, struct ferry_error *err),
			 void *arg, struct ferry_error *err);
/* Flush the stream under the writers' lock. */
int ferry__save_flush(struct ferry_save *s, struct ferry_error *err);
/* Heartbeat: a HEARTBEAT command, flushed, if nothing was written for
 * @idle_ns. Never waits for a busy writer. 0 or -errno. Any thread. */
int ferry__save_heartbeat(struct ferry_save *s, uint64_t idle_ns);
/* Bytes written to the stream so far (under the writers' lock). */
uint64_t ferry__save_offset(struct ferry_save *s);
/* Bound every later write of the stream (ferry_chan_set_timeout), under
 * the writers' lock. */
void ferry__save_set_timeout(struct ferry_save *s, int timeout_ms);
/* The switchover verdict (GO or ABORT) after EOF. Returns 0 only when
 * every byte of the record was handed to the kernel; otherwise the peer
 * cannot read a whole verdict. */
int ferry__save_verdict(struct ferry_save *s, uint16_t cmd,
			struct ferry_error *err);

/* Postcopy. A RAM PART section whose body @fn writes (the switch). */
int ferry__save_ram_section(struct ferry_save *s,
			    int (*fn)(struct ferry_chan *c, void *opaque,
				      struct ferry_error *err),
			    struct ferry_error *err);
/* A RAM PART section of about @budget bytes (or the END section), flushed. */
int ferry__save_ram_round(struct ferry_save *s, uint64_t budget, bool end,
			  struct ferry_error *err);
/* The package: every device's final state but RAM's, POSTCOPY_RUN, EOF,
 * as one PACKAGED command, flushed. *@sent: every byte of it reached the
 * kernel (from then on the destination may run the VM). */
int ferry__save_package(struct ferry_save *s, bool *sent,
			struct ferry_error *err);
/* Postcopy recovery: continue the stream on @out (a new connection):
 * a new header, record sequence from 0; sections keep their ids. */
int ferry__save_rebind(struct ferry_save *s, struct ferry_chan *out,
		       struct ferry_error *err);
/* POSTCOPY_END (status 0) and EOF, flushed: every page was sent. */
int ferry__save_postcopy_end(struct ferry_save *s, struct ferry_error *err);

/* return-path.c: ferry_rp_send/recv with RECV_BITMAP's bits (m->start
 * pages, (pages + 7) / 8 bytes; received: pointing into @io's buffer,
 * valid until its next read). */
int ferry__rp_send(struct ferry_record_io *io, const struct ferry_rp_msg *m,
		   const uint8_t *bitmap, struct ferry_error *err);
int ferry__rp_recv(struct ferry_record_io *io, struct ferry_rp_msg *m,
		   const uint8_t **bitmap, struct ferry_error *err);

struct ferry_multifd;
/* multifd.c: a destination's channels set page @pg's bit in @map (block
 * @bi) once they placed it (postcopy's received bitmap). Before channels
 * are added. */
void ferry__multifd_track(struct ferry_multifd *m, unsigned bi, uint64_t *map);

/* A multifd channel's handshake (FERRY_MULTIFD_HANDSHAKE_SIZE bytes), its
 * fields checked on their own - magic, version, check, flags, channel id
 * within the count - not against any receiver. 0 or -errno with @err. */
struct ferry__mf_handshake {
	uint8_t session[16];
	uint32_t id, channels, comp, packet_pages;
};
int ferry__multifd_parse_handshake(const uint8_t *hs,
				   struct ferry__mf_handshake *h,
				   struct ferry_error *err);

/* ---- RAM internals for the engine (ram.c) ------------------------------ */

/* The body of the RAM PART section before postcopy's switch (VM running):
 * a multifd sync point and a dirty sync. */
int ferry__ram_pc_prepare_section(struct ferry_chan *c, void *opaque,
				  struct ferry_error *err);
/* The body of the RAM PART section that switches to postcopy. */
int ferry__ram_pc_switch_section(struct ferry_chan *c, void *opaque,
				 struct ferry_error *err);

struct ferry_ram;
struct ferry_multifd;
/* Give @m the RAM's block table (ferry_multifd_set_blocks). */
int ferry__ram_give_blocks(struct ferry_ram *ram, struct ferry_multifd *m,
			   struct ferry_error *err);
/* Destination: where the RAM load gets its multifd receiver when START
 * announces multifd (the source's @session and channel count) and none is
 * set (load thread; NULL fn = none). The receiver returned already has the
 * block table. */
void ferry__ram_set_multifd_provider(struct ferry_ram *ram,
	struct ferry_multifd *(*fn)(void *opaque, const uint8_t session[16],
				    unsigned channels, struct ferry_error *err),
	void *opaque);

/* ---- load internals for the engine (load.c) ---------------------------- */

/*
 * ferry_load, and then some (@hooks may be NULL): *@version receives the stream's format
 * version, and @io (zeroed by the caller, io->chan = @in) is the reader the
 * load used, left positioned after EOF, so the caller can read what a live
 * stream sends after it (the switchover verdict). The caller releases it
 * (ferry_record_io_release).
 */
struct ferry__load_hooks {
	/* Make the stream's reader return: postcopy's package failed to
	 * load while the listen thread reads the stream (the engine tells
	 * the source first that the VM did not run here; load thread), or a
	 * device's load thread failed (any thread, holding the device-state
	 * queues' lock: it must not call into them). */
	void (*stop_listen)(void *opaque);
	/* Postcopy: the listen thread's stream broke (@why). Return 0 with
	 * @io moved onto a new connection (recovered: read on), 1 if the
	 * stream is not needed any more (every page placed: as at EOF), or
	 * a negative errno to fail. Listen thread; may block for as long as
	 * the recovery takes. */
	int (*reconnect)(void *opaque, struct ferry_record_io *io, int why,
			 struct ferry_error *err);
	void *opaque;
};

/* Source: send complete-in-thread buffers on @mf (NULL: the main stream).
 * Set before the switchover, migration thread. */
void ferry__save_devstate_multifd(struct ferry_save *s, struct ferry_multifd *mf);

int ferry__load(struct ferry_ctx *ctx, struct ferry_chan *in,
		const struct ferry_load_opts *opts,
		const struct ferry__load_hooks *hooks, struct ferry_record_io *io,
		uint32_t *version, struct ferry_error *err);

/* Read the stream header; *version receives the format version (1..2). */
int ferry__stream_read_header(struct ferry_chan *c, uint32_t *version,
			      struct ferry_error *err);

#endif
