/*
 * save.c - the save loop: header, setup sections, precopy rounds, and the
 * switchover sequence.
 *
 * Every section body is built in a memory channel first, because a record
 * carries its length and check before its body. The copy costs little next
 * to the wire (memcpy runs at ~13 GB/s here, loopback TCP at ~1.7 GB/s), and
 * it buys records that can be skipped and verified. Iterable devices bound
 * each chunk with the budget, so section buffers stay small.
 *
 * Threads: everything runs in the caller's thread (the migration thread)
 * except save_complete_thread hooks, which get one thread each at
 * switchover, and the engine's heartbeat sender. They write records into
 * the same stream, so every record write *and every flush* takes out_lock:
 * a flush moves the channel's buffer to the socket, and a record appended
 * by another thread in the middle of it would be lost or sent twice.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "ferry/multifd.h"
#include "internal.h"

struct ferry_save {
	struct ferry_ctx *ctx;          /* immutable */
	struct ferry_record_io io;      /* guarded by out_lock */
	pthread_mutex_t out_lock;
	uint64_t last_write_ns;         /* out_lock: last record or flush */
	struct ferry_chan *body;        /* migration thread only */
	bool setup_ran;                 /* save_setup hooks were called */
	bool completed;
	struct ferry_save_stats stats;  /* migration thread only */
	/* Migration thread only: the body writer of ferry__save_ram_section. */
	int (*fn)(struct ferry_chan *c, void *opaque, struct ferry_error *err);
	XXH3_state_t digest;            /* migration thread only */
	/* The VMDESC record's JSON, built at setup: it depends on the
	 * registry only, which does not change during a save, and building it
	 * for a thousand devices takes a good part of 100 ms - not something
	 * to do with the guest stopped. Migration thread only. */
	char *desc;
	/* Set (atomically) when the switchover failed while the save threads
	 * run: their next send fails, so they end at once. */
	bool ds_abort;
	/* Where complete-in-thread buffers go: multifd, or NULL for the main
	 * stream. Set before the switchover (migration thread). */
	struct ferry_multifd *ds_mf;
};

/* One device's save_complete_thread; the pool thread running it owns
 * everything here until the migration thread joins the batch. */
struct ferry_devstate_sink {
	struct ferry_save *s;
	struct ferry_dev *dev;
	struct ferry_multifd *mf;       /* NULL: the main stream */
	uint32_t seq;                   /* buffers sent (= next index) */
	bool config_sent;               /* the last one went */
	uint64_t bytes;                 /* sent; added to the device's count
					   once the thread is joined */
	uint8_t prefix[FERRY_IDSTR_MAX + 1 + 12];
	size_t prefix_len;
	struct ferry_error err;
	int ret;
};

static int write_record2(struct ferry_save *s, uint8_t type, const void *a,
			 size_t alen, const void *b, size_t blen,
			 struct ferry_error *err)
{
	int r;

	ferry__mutex_lock(&s->out_lock);
	r = ferry_record_write2(&s->io, type, a, alen, b, blen, err);
	s->last_write_ns = ferry__mono_ns();
	ferry__mutex_unlock(&s->out_lock);
	return r;
}

/* Push the channel's buffer out, under out_lock (see the top comment). */
static int flush_out(struct ferry_save *s, struct ferry_error *err)
{
	int r;

	ferry__mutex_lock(&s->out_lock);
	r = ferry_chan_flush(s->io.chan) ? ferry_chan_error(s->io.chan, err) : 0;
	s->last_write_ns = ferry__mono_ns();
	ferry__mutex_unlock(&s->out_lock);
	return r;
}

/* Section header prefix: START/FULL carry the identity, PART/END the id. */
static size_t section_prefix(uint8_t *p, uint8_t type, const struct ferry_dev *d)
{
	size_t n = 0, idlen = strlen(d->idstr);

	ferry__put_be32(p, d->section_id);
	n += 4;
	if (type == FERRY_REC_SECTION_START || type == FERRY_REC_SECTION_FULL) {
		p[n++] = (uint8_t)idlen;
		memcpy(p + n, d->idstr, idlen);
		n += idlen;
		ferry__put_be32(p + n, d->instance);
		ferry__put_be32(p + n + 4, d->version);
		n += 8;
	}
	return n;
}

void ferry__digest_section(void *xxh3, const char *idstr, uint32_t instance,
			   const void *payload, size_t len)
{
	XXH3_state_t *st = xxh3;
	uint8_t inst[4];

	ferry__put_be32(inst, instance);
	XXH3_64bits_update(st, idstr, strlen(idstr));
	XXH3_64bits_update(st, inst, 4);
	XXH3_64bits_update(st, payload, len);
}

typedef int (*section_fn)(struct ferry_save *s, struct ferry_dev *d,
			  uint64_t budget, struct ferry_error *err);

static int write_section(struct ferry_save *s, uint8_t type,
			 struct ferry_dev *d, section_fn fn, uint64_t budget,
			 struct ferry_error *err)
{
	uint8_t prefix[FERRY_IDSTR_MAX + 13];
	const uint8_t *body;
	size_t plen, blen;
	int r;

	ferry_chan_mem_reset(s->body);
	r = fn(s, d, budget, err);
	if (!r)
		r = ferry_chan_error(s->body, err);
	if (r)
		return ferry_error_prefix(err, "section '%s' instance %u (%s): ",
					  d->idstr, d->instance,
					  ferry_record_type_name(type));
	plen = section_prefix(prefix, type, d);
	body = ferry_chan_mem_data(s->body, &blen);
	/* A round in which a device had nothing it could send (all of it
	 * waits for the switchover) costs no record: the engine then sees a
	 * pass that moved nothing. */
	if (type == FERRY_REC_SECTION_PART && !blen)
		return 0;
	if (type == FERRY_REC_SECTION_FULL)
		ferry__digest_section(&s->digest, d->idstr, d->instance, body, blen);
	if (type == FERRY_REC_SECTION_START || type == FERRY_REC_SECTION_PART)
		d->sent_precopy += blen;
	else
		d->sent_switchover += blen;
	return write_record2(s, type, prefix, plen, body, blen, err);
}

static int do_setup(struct ferry_save *s, struct ferry_dev *d, uint64_t b,
		    struct ferry_error *err)
{
	(void)b;
	return d->ops->save_setup(s->body, d->opaque, err);
}

static int do_iterate(struct ferry_save *s, struct ferry_dev *d, uint64_t b,
		      struct ferry_error *err)
{
	return d->ops->save_iterate(s->body, d->opaque, b, err);
}

static int do_complete(struct ferry_save *s, struct ferry_dev *d, uint64_t b,
		       struct ferry_error *err)
{
	(void)b;
	return d->ops->save_complete(s->body, d->opaque, err);
}

static int do_state(struct ferry_save *s, struct ferry_dev *d, uint64_t b,
		    struct ferry_error *err)
{
	(void)b;
	return d->ops->save_state(s->body, d->opaque, err);
}

struct ferry_save *ferry_save_new(struct ferry_ctx *ctx,
				  struct ferry_chan *out,
				  struct ferry_error *err)
{
	/* XXH3_state_t wants 64-byte alignment, more than calloc promises
	 * (sizeof is a multiple of the alignment, as aligned_alloc needs). */
	struct ferry_save *s = aligned_alloc(_Alignof(struct ferry_save),
					     sizeof(*s));

	if (s)
		memset(s, 0, sizeof(*s));
	if (!s) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	s->ctx = ctx;
	s->io.chan = out;
	XXH3_INITSTATE(&s->digest);
	XXH3_64bits_reset(&s->digest);
	pthread_mutex_init(&s->out_lock, NULL);
	s->body = ferry_chan_new_mem_writer(FERRY_RECORD_MAX_DEFAULT -
					    (FERRY_IDSTR_MAX + 13));
	if (!s->body) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	if (ferry_stream_write_header(out, err))
		goto fail;
	for (struct ferry_dev *d = ctx->devs; d; d = d->next)
		d->sent_precopy = d->sent_switchover = 0;
	return s;
fail:
	ferry_save_end(s);
	return NULL;
}

int ferry_save_setup(struct ferry_save *s, struct ferry_error *err)
{
	unsigned nthreads = 0;
	int r;

	s->setup_ran = true;
	/* The switchover's save threads, now rather than in the downtime. */
	for (struct ferry_dev *d = s->ctx->devs; d; d = d->next)
		nthreads += d->ops->save_complete_thread != NULL;
	if ((r = ferry__pool_reserve(s->ctx, nthreads, err)))
		return r;
	if (!s->desc && !(s->desc = ferry__describe(s->ctx, false)))
		return ferry_error_set(err, -ENOMEM, "out of memory");
	for (struct ferry_dev *d = s->ctx->devs; d; d = d->next)
		if (ferry__dev_iterable(d) &&
		    (r = write_section(s, FERRY_REC_SECTION_START, d, do_setup, 0, err)))
			return r;
	/* Out now: a destination hands its multifd channels to a receiver
	 * only once RAM's START named the session, so no page may go out on
	 * them while START still sits in our buffer. */
	return flush_out(s, err);
}

struct ferry_save *ferry_save_begin(struct ferry_ctx *ctx,
				    struct ferry_chan *out,
				    struct ferry_error *err)
{
	struct ferry_save *s = ferry_save_new(ctx, out, err);

	if (s && ferry_save_setup(s, err)) {
		ferry_save_end(s);
		return NULL;
	}
	return s;
}

/* At the switchover a device that completes in a thread sends what it has
 * left from there (on multifd, perhaps), not in drain rounds on the main
 * stream: @threaded false leaves it out. */
static bool in_round(const struct ferry_dev *d, bool threaded)
{
	return ferry__dev_iterable(d) &&
	       (threaded || !d->ops->save_complete_thread);
}

static void pending_of(struct ferry_save *s, bool exact, bool threaded,
		       uint64_t *must, uint64_t *can)
{
	*must = *can = 0;
	for (struct ferry_dev *d = s->ctx->devs; d; d = d->next) {
		uint64_t m = 0, c = 0;

		if (!in_round(d, threaded))
			continue;
		d->ops->save_pending(d->opaque, exact, &m, &c);
		*must += m;
		*can += c;
	}
}

static int round_of(struct ferry_save *s, uint64_t budget, bool threaded,
		    struct ferry_error *err)
{
	for (struct ferry_dev *d = s->ctx->devs; d; d = d->next) {
		uint64_t m = 0, c = 0;
		int r;

		if (!in_round(d, threaded))
			continue;
		d->ops->save_pending(d->opaque, false, &m, &c);
		if (!m && !c)
			continue;
		r = write_section(s, FERRY_REC_SECTION_PART, d, do_iterate,
				  budget, err);
		if (r)
			return r;
	}
	/* Push the round out now: the wire, not our buffer, should hold it. */
	return flush_out(s, err);
}

void ferry_save_pending(struct ferry_save *s, bool exact, uint64_t *must,
			uint64_t *can)
{
	pending_of(s, exact, true, must, can);
}

int ferry_save_round(struct ferry_save *s, uint64_t budget,
		     struct ferry_error *err)
{
	return round_of(s, budget, true, err);
}

int ferry_save_command(struct ferry_save *s, uint16_t cmd, const void *payload,
		       size_t len, struct ferry_error *err)
{
	uint8_t c[2];

	ferry__put_be16(c, cmd);
	return write_record2(s, FERRY_REC_COMMAND, c, 2, payload, len, err);
}

void ferry__save_devstate_multifd(struct ferry_save *s, struct ferry_multifd *mf)
{
	s->ds_mf = mf;
}

static int devstate_send(struct ferry_devstate_sink *k, bool config,
			 const void *buf, size_t len, struct ferry_error *err)
{
	uint8_t p[sizeof(k->prefix) + 4];
	size_t n = k->prefix_len;
	int r;

	if (k->config_sent)
		return ferry_error_set(err, -EINVAL, "device state sent after "
				       "the device's config state");
	if (__atomic_load_n(&k->s->ds_abort, __ATOMIC_RELAXED))
		return ferry_error_set(err, -ECANCELED, "the switchover failed");
	if (k->mf) {
		r = ferry_multifd_send_devstate(k->mf, k->dev->idstr,
			k->dev->instance, config ? FERRY_MULTIFD_FLAG_DEVICE_CONFIG
			: 0, buf, len, err);
	} else {
		memcpy(p, k->prefix, n);
		ferry__put_be32(p + n, k->seq);
		n += 4;
		r = write_record2(k->s, config ? FERRY_REC_DEVSTATE_CONFIG :
				  FERRY_REC_DEVSTATE, p, n, buf, len, err);
	}
	if (!r) {
		k->seq++;
		k->config_sent = config;
		k->bytes += len;
	}
	return r;
}

int ferry_devstate_send(struct ferry_devstate_sink *k, const void *buf,
			size_t len, struct ferry_error *err)
{
	return devstate_send(k, false, buf, len, err);
}

int ferry_devstate_send_config(struct ferry_devstate_sink *k, const void *buf,
			       size_t len, struct ferry_error *err)
{
	return devstate_send(k, true, buf, len, err);
}

static void complete_job(void *arg)
{
	struct ferry_devstate_sink *k = arg;

	k->ret = k->dev->ops->save_complete_thread(k, k->dev->opaque, &k->err);
	if (k->ret && !k->err.code)
		ferry_error_set(&k->err, k->ret, "failed");
}

/* Section size for data drained at switchover. */
#define SWITCHOVER_CHUNK (64ull << 20)
#define SWITCHOVER_MAX_ROUNDS 4096

int ferry_save_complete(struct ferry_save *s, struct ferry_error *err)
{
	return ferry__save_complete(s, NULL, NULL, err);
}

/* SWITCHOVER_START / DEVSTATE_DONE: be32 flags (FERRY_DEVSTATE_MULTIFD
 * when the buffers go on @multifd), be32 n, then per device str8 idstr,
 * be32 instance (and be32 buffers sent, with @counts). */
static int devstate_cmd(struct ferry_save *s, uint16_t cmd, bool multifd,
			const struct ferry_devstate_sink *k, unsigned n,
			bool counts, struct ferry_error *err)
{
	uint8_t *p = malloc(8 + (size_t)n * (1 + FERRY_IDSTR_MAX + 8));
	size_t off = 8;
	int r;

	if (!p)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	ferry__put_be32(p, multifd ? FERRY_DEVSTATE_MULTIFD : 0);
	ferry__put_be32(p + 4, n);
	for (unsigned i = 0; i < n; i++) {
		memcpy(p + off, k[i].prefix, k[i].prefix_len);
		off += k[i].prefix_len;
		if (counts) {
			ferry__put_be32(p + off, k[i].seq);
			off += 4;
		}
	}
	r = ferry_save_command(s, cmd, p, off, err);
	free(p);
	return r;
}

/*
 * The device state at the switchover, after the drain rounds:
 *   SWITCHOVER_START naming the devices that send buffers, whose
 *     save_complete_thread hooks start on the pool's threads;
 *   END sections (but "ram"'s when @postcopy: RAM goes on after it);
 *   FULL sections of the other non-iterable devices, while the threads run;
 *   once they are done: a multifd sync point if the buffers went there (so
 *     each of them is in before the destination reads on), DEVSTATE_DONE
 *     with each device's buffer count, and the FULL sections of the
 *     devices that sent buffers: their configuration loads after their data.
 */
static int final_state(struct ferry_save *s, bool postcopy,
		       struct ferry_error *err)
{
	struct ferry_devstate_sink *sinks = NULL;
	struct ferry__pool_batch *batch = NULL;
	struct ferry_multifd *mf = postcopy ? NULL : s->ds_mf;
	void **args = NULL;
	unsigned n = 0;
	int r = 0;

	for (struct ferry_dev *d = s->ctx->devs; d; d = d->next)
		n += d->ops->save_complete_thread != NULL;
	if (n) {
		sinks = calloc(n, sizeof(*sinks));
		args = calloc(n, sizeof(*args));
		if (!sinks || !args) {
			r = ferry_error_set(err, -ENOMEM, "out of memory");
			goto out;
		}
		n = 0;
		for (struct ferry_dev *d = s->ctx->devs; d; d = d->next) {
			struct ferry_devstate_sink *k = &sinks[n];
			size_t idlen = strlen(d->idstr);

			if (!d->ops->save_complete_thread)
				continue;
			k->s = s;
			k->dev = d;
			k->mf = mf;
			k->prefix[0] = (uint8_t)idlen;
			memcpy(k->prefix + 1, d->idstr, idlen);
			ferry__put_be32(k->prefix + 1 + idlen, d->instance);
			k->prefix_len = 1 + idlen + 4;
			args[n++] = k;
		}
		/* Tell the destination the final state follows, and from
		 * whom, so it readies their queues and load threads
		 * (switchover_start hooks) before the first buffer. */
		r = devstate_cmd(s, FERRY_CMD_SWITCHOVER_START, mf != NULL,
				 sinks, n, false, err);
		/* On multifd, a sync point behind it: the destination releases
		 * the channels only once it has read SWITCHOVER_START, so no
		 * buffer reaches a device before the device's precopy
		 * sections (on the main stream) are all loaded. */
		if (!r && mf && !(r = flush_out(s, err)))
			r = ferry_multifd_send_sync(mf, err);
		if (r)
			goto out;
		batch = ferry__pool_submit(s->ctx, n, complete_job, args, err);
		if (!batch) {
			r = err && err->code ? err->code : -ENOMEM;
			goto out;
		}
	}
	for (struct ferry_dev *d = s->ctx->devs; d && !r; d = d->next)
		if (ferry__dev_iterable(d) &&
		    !(postcopy && !strcmp(d->idstr, "ram") && !d->instance))
			r = write_section(s, FERRY_REC_SECTION_END, d,
					  do_complete, 0, err);
	if (!r)
		s->stats.t_iterable_done = ferry__mono_ns();
	for (struct ferry_dev *d = s->ctx->devs; d && !r; d = d->next)
		if (!ferry__dev_iterable(d) && d->ops->save_state &&
		    !d->ops->save_complete_thread)
			r = write_section(s, FERRY_REC_SECTION_FULL, d,
					  do_state, 0, err);
	if (!batch)
		goto out;
	/* Put what we wrote on the wire before waiting for the threads: a
	 * multifd sync point in the END sections holds the destination's
	 * channels (and so the threads' buffers) until it reads the matching
	 * flush on the main stream. */
	if (!r)
		r = flush_out(s, err);
	ferry__pool_wait(s->ctx, batch);
	batch = NULL;
	for (unsigned i = 0; i < n; i++)
		sinks[i].dev->sent_switchover += sinks[i].bytes;
	for (unsigned i = 0; i < n && !r; i++)
		if (sinks[i].ret) {
			ferry_error_propagate(err, &sinks[i].err);
			r = ferry_error_prefix(err, "device '%s' instance %u "
					       "(complete in thread): ",
					       sinks[i].dev->idstr,
					       sinks[i].dev->instance);
		}
	/* Every buffer on the channels is written before DEVSTATE_DONE, and
	 * the destination syncs there too: then a count that does not add
	 * up means a buffer was lost, not that it is late. */
	if (!r && mf)
		r = ferry_multifd_send_sync(mf, err);
	if (!r)
		r = devstate_cmd(s, FERRY_CMD_DEVSTATE_DONE, mf != NULL, sinks,
				 n, true, err);
	for (struct ferry_dev *d = s->ctx->devs; d && !r; d = d->next)
		if (!ferry__dev_iterable(d) && d->ops->save_state &&
		    d->ops->save_complete_thread)
			r = write_section(s, FERRY_REC_SECTION_FULL, d,
					  do_state, 0, err);
out:
	/* On an early failure the threads still run (they hold the sinks):
	 * stop them - their next send fails, and one blocked on a channel
	 * the destination holds at a sync point returns once the channels
	 * are down - then wait for them. */
	if (batch) {
		__atomic_store_n(&s->ds_abort, true, __ATOMIC_RELAXED);
		if (mf)
			ferry_multifd_cancel(mf, r ? r : -ECANCELED,
					     "the switchover failed");
	}
	ferry__pool_wait(s->ctx, batch);
	free(sinks);
	free(args);
	return r;
}

int ferry__save_complete(struct ferry_save *s,
			 int (*before_eof)(void *arg, struct ferry_error *err),
			 void *arg, struct ferry_error *err)
{
	char *desc;
	int r = 0;

	/*
	 * Drain what is pending in bounded PART sections first, so the END
	 * sections stay small whatever the device had left (a guest that
	 * dirtied all of its RAM just before the switchover, say). With the
	 * vCPUs paused the dirty set can only shrink between syncs, so this
	 * ends; the round cap only guards against a device whose pending
	 * never falls. save_complete then sends the rest.
	 */
	for (unsigned round = 0; !r && round < SWITCHOVER_MAX_ROUNDS; round++) {
		uint64_t must, can;

		pending_of(s, true, false, &must, &can);
		if (!round)
			s->stats.t_final_sync = ferry__mono_ns();
		if (!(must + can))
			break;
		r = round_of(s, SWITCHOVER_CHUNK, false, err);
	}
	if (!r)
		r = final_state(s, false, err);
	if (r)
		return r;
	desc = s->desc ? s->desc : ferry__describe(s->ctx, false);
	if (!desc)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	r = write_record2(s, FERRY_REC_VMDESC, desc, strlen(desc), NULL, 0, err);
	if (desc != s->desc)
		free(desc);
	/* The digest is final here: the caller may decide on it. */
	s->stats.device_digest = XXH3_64bits_digest(&s->digest);
	if (!r && before_eof)
		r = before_eof(arg, err);
	if (!r)
		r = write_record2(s, FERRY_REC_EOF, NULL, 0, NULL, 0, err);
	if (!r)
		r = flush_out(s, err);
	s->completed = !r;
	if (!r)
		s->stats.t_done = ferry__mono_ns();
	return r;
}

/*
 * A command that commits (the switchover verdict, postcopy's package),
 * out_lock held. Empty the buffer first: then a failed flush below means
 * some byte of the command itself never reached the kernel, so the peer
 * can never read a whole (checked) record of it. 0 only when all of it is
 * in the kernel.
 */
static int write_commit_locked(struct ferry_save *s, uint16_t cmd,
			       const void *payload, size_t len,
			       struct ferry_error *err)
{
	uint8_t c[2];
	int r;

	ferry__put_be16(c, cmd);
	r = ferry_chan_flush(s->io.chan);
	if (!r)
		r = ferry_record_write2(&s->io, FERRY_REC_COMMAND, c, 2, payload,
					len, NULL);
	if (!r)
		r = ferry_chan_flush(s->io.chan);
	if (r)
		r = ferry_chan_error(s->io.chan, err);
	s->last_write_ns = ferry__mono_ns();
	return r;
}

/* ---- postcopy (lib/engine-out.c) --------------------------------------------- */

static struct ferry_dev *ram_dev(struct ferry_save *s)
{
	return ferry__find_dev(s->ctx, "ram", 0);
}

static int do_fn(struct ferry_save *s, struct ferry_dev *d, uint64_t b,
		 struct ferry_error *err)
{
	(void)b;
	return s->fn(s->body, d->opaque, err);
}

int ferry__save_ram_section(struct ferry_save *s,
			    int (*fn)(struct ferry_chan *c, void *opaque,
				      struct ferry_error *err),
			    struct ferry_error *err)
{
	struct ferry_dev *d = ram_dev(s);

	if (!d)
		return ferry_error_set(err, -ENOENT, "no RAM device");
	s->fn = fn;
	return write_section(s, FERRY_REC_SECTION_PART, d, do_fn, 0, err);
}

int ferry__save_ram_round(struct ferry_save *s, uint64_t budget, bool end,
			  struct ferry_error *err)
{
	struct ferry_dev *d = ram_dev(s);
	int r;

	if (!d)
		return ferry_error_set(err, -ENOENT, "no RAM device");
	r = end ? write_section(s, FERRY_REC_SECTION_END, d, do_complete, 0, err)
		: write_section(s, FERRY_REC_SECTION_PART, d, do_iterate,
				budget, err);
	return r ? r : flush_out(s, err);
}

int ferry__save_rebind(struct ferry_save *s, struct ferry_chan *out,
		       struct ferry_error *err)
{
	int r;

	ferry__mutex_lock(&s->out_lock);
	s->io = (struct ferry_record_io){ .chan = out };
	r = ferry_stream_write_header(out, err);
	s->last_write_ns = ferry__mono_ns();
	ferry__mutex_unlock(&s->out_lock);
	return r;
}

int ferry__save_postcopy_end(struct ferry_save *s, struct ferry_error *err)
{
	uint8_t st[4] = { 0 };
	int r = ferry_save_command(s, FERRY_CMD_POSTCOPY_END, st, 4, err);

	if (!r)
		r = write_record2(s, FERRY_REC_EOF, NULL, 0, NULL, 0, err);
	if (!r)
		r = flush_out(s, err);
	s->completed = !r;
	return r;
}

int ferry__save_package(struct ferry_save *s, bool *sent,
			struct ferry_error *err)
{
	struct ferry_chan *pkg = ferry_chan_new_mem_writer(FERRY_PACKAGED_MAX - 2);
	struct ferry_record_io main_io;
	const uint8_t *d;
	size_t n;
	int r;

	*sent = false;
	if (!pkg)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	/* Everything written now - device state, complete-in-thread
	 * buffers, a heartbeat - goes into the package, a stream of its own
	 * (its own record sequence). */
	ferry__mutex_lock(&s->out_lock);
	main_io = s->io;
	s->io = (struct ferry_record_io){ .chan = pkg };
	ferry__mutex_unlock(&s->out_lock);
	s->stats.t_final_sync = ferry__mono_ns();
	r = final_state(s, true, err);
	s->stats.device_digest = XXH3_64bits_digest(&s->digest);
	if (!r) {
		/* The destination checks what it loaded before it runs. */
		uint8_t dg[8];

		ferry__put_be64(dg, s->stats.device_digest);
		r = ferry_save_command(s, FERRY_CMD_POSTCOPY_RUN, dg, 8, err);
	}
	if (!r)
		r = write_record2(s, FERRY_REC_EOF, NULL, 0, NULL, 0, err);
	ferry__mutex_lock(&s->out_lock);
	s->io = main_io;
	if (!r)
		r = ferry_chan_error(pkg, err);
	if (r) {
		ferry__mutex_unlock(&s->out_lock);
		ferry_chan_free(pkg);
		return ferry_error_prefix(err, "building the postcopy package: ");
	}
	/* As the switchover verdict: a package not all in the kernel never
	 * reaches the destination whole, which then never runs. */
	d = ferry_chan_mem_data(pkg, &n);
	r = write_commit_locked(s, FERRY_CMD_PACKAGED, d, n, err);
	*sent = !r;
	ferry__mutex_unlock(&s->out_lock);
	ferry_chan_free(pkg);
	if (!r)
		s->stats.t_done = ferry__mono_ns();
	return r;
}

void ferry_save_get_stats(struct ferry_save *s, struct ferry_save_stats *st)
{
	struct ferry_save_stats now = s->stats;

	now.size = sizeof(now);
	now.bytes = ferry__save_offset(s);
	ferry__fill_sized(st, &now, sizeof(now));
}

void ferry_save_end(struct ferry_save *s)
{
	if (!s)
		return;
	if (s->setup_ran)
		for (struct ferry_dev *d = s->ctx->devs; d; d = d->next)
			if (d->ops->save_cleanup)
				d->ops->save_cleanup(d->opaque);
	ferry_chan_free(s->body);
	pthread_mutex_destroy(&s->out_lock);
	free(s->desc);
	free(s);
}

/* Sections stay well under the record cap with this per-round budget. */
#define SAVE_ALL_BUDGET (64ull << 20)

int ferry_save_all(struct ferry_ctx *ctx, struct ferry_chan *out,
		   unsigned max_rounds, struct ferry_error *err)
{
	struct ferry_save *s = ferry_save_begin(ctx, out, err);
	int r = 0;

	if (!s)
		return err && err->code ? err->code : -EIO;
	if (!max_rounds)
		max_rounds = 64;
	for (unsigned i = 0; i < max_rounds; i++) {
		uint64_t must, can;
		ferry_save_pending(s, true, &must, &can);
		if (!must && !can)
			break;
		r = ferry_save_round(s, SAVE_ALL_BUDGET, err);
		if (r)
			break;
	}
	if (!r)
		r = ferry_save_complete(s, err);
	ferry_save_end(s);
	return r;
}

/* ---- for the engine (lib/engine-out.c) ------------------------------------ */

int ferry__save_flush(struct ferry_save *s, struct ferry_error *err)
{
	return flush_out(s, err);
}

int ferry__save_heartbeat(struct ferry_save *s, uint64_t idle_ns)
{
	uint8_t c[2] = { 0, FERRY_CMD_HEARTBEAT };
	int r = 0;

	/* A writer holding the lock is either moving bytes (the stream is
	 * not idle) or blocked on a peer that stopped reading (a heartbeat
	 * could not get through either): skip the beat, never wait. */
	if (pthread_mutex_trylock(&s->out_lock))
		return 0;
	if (ferry__mono_ns() - s->last_write_ns >= idle_ns) {
		r = ferry_record_write2(&s->io, FERRY_REC_COMMAND, c, 2, NULL, 0,
					NULL);
		if (!r)
			r = ferry_chan_flush(s->io.chan);
		s->last_write_ns = ferry__mono_ns();
	}
	ferry__mutex_unlock(&s->out_lock);
	return r;
}

uint64_t ferry__save_offset(struct ferry_save *s)
{
	uint64_t off;

	ferry__mutex_lock(&s->out_lock);
	off = ferry_chan_offset(s->io.chan);
	ferry__mutex_unlock(&s->out_lock);
	return off;
}

void ferry__save_set_timeout(struct ferry_save *s, int timeout_ms)
{
	ferry__mutex_lock(&s->out_lock);
	ferry_chan_set_timeout(s->io.chan, timeout_ms);
	ferry__mutex_unlock(&s->out_lock);
}

int ferry__save_verdict(struct ferry_save *s, uint16_t cmd,
			struct ferry_error *err)
{
	int r;

	ferry__mutex_lock(&s->out_lock);
	r = write_commit_locked(s, cmd, NULL, 0, err);
	ferry__mutex_unlock(&s->out_lock);
	return r;
}
