/*
 * devstate.c - the destination's per-device queues and load threads for
 * device state sent in buffers (see devstate.h for who calls what).
 *
 * Why a sorted queue per device and not one FIFO: on multifd the buffers
 * of one device travel on several connections and arrive in any order.
 * Each queue holds them sorted by index; the device's load thread applies
 * the head only when it is the next index. The last buffer may be the
 * device's config state: the load thread does not apply it, it marks the
 * device ready and the load thread of the stream (the one allowed to
 * change the memory map) loads it, after all of that device's data.
 *
 * Bounded memory without deadlock. A push waits while the device's queue
 * is over its caps (buffers or bytes), except for the index the load
 * thread needs next. Why that is enough: the buffers queued below the
 * lowest missing index can be applied by the load thread without anyone's
 * help, and once they are, the lowest missing index is the next one and is
 * taken at once. So the earliest buffer still on the wire always gets in
 * (it is the lowest missing one of its device: the source numbers and
 * sends each device's buffers in order), whatever the other channels hold,
 * and a queue exceeds its caps by that one buffer at most. Every channel that
 * waits here stops reading its socket: that is the backpressure the source
 * feels.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "devstate.h"

#define DSQ_MAX_BUFFERS_DEFAULT 64u
#define DSQ_MAX_BYTES_DEFAULT (64u << 20)
/* An index this far past the next one cannot be honest: a source keeps at
 * most a few buffers per channel in flight. */
#define DSQ_MAX_AHEAD (1u << 20)

struct dsq_buf {
	struct dsq_buf *next;       /* sorted by seq, or the free list */
	uint32_t seq;
	bool config;
	size_t len, cap;
	uint8_t data[];
};

/* Spare buffers kept for reuse, at most this many: enough for a full queue
 * per device and one in flight per channel. Why: on this kind of host,
 * memory the kernel hands out fresh costs a page fault per 4 KiB (about
 * 0.3-1 GB/s), and a malloc'd MiB freed in another thread goes back to the
 * kernel often enough to make that the bottleneck of a device's load. */
#define DSQ_SPARE_MAX 96u

struct dsq_dev {
	struct ferry__dsq *q;
	struct ferry_dev *dev;          /* immutable */

	/* Guarded by q->lock. */
	bool declared;                  /* SWITCHOVER_START named it */
	struct dsq_buf *head;           /* sorted; every seq >= next_apply */
	unsigned nbuf;
	size_t bytes;
	uint32_t next_apply;            /* index the load thread applies next */
	bool busy;                      /* the load thread is in load_buffer */
	bool have_config;               /* the config buffer arrived */
	uint32_t config_seq;
	struct dsq_buf *config;         /* ready for the stream's load thread */
	bool config_loaded;
	bool have_expect;               /* DEVSTATE_DONE gave the count */
	uint32_t expect;
	bool thread_started;
	pthread_t thread;
	pthread_cond_t work;            /* its head became applicable */
	pthread_cond_t space;           /* its queue shrank */
	struct ferry__dsq_stats st;
};

struct ferry__dsq {
	struct ferry_ctx *ctx;          /* immutable */
	unsigned max_buffers;           /* immutable */
	size_t max_bytes;               /* immutable */
	struct dsq_dev *devs;           /* immutable array */
	unsigned ndevs;

	pthread_mutex_t lock;
	/* Who waits where (one waiter kind per variable, so a wake-up never
	 * goes to threads that have nothing to do: futex wake-ups are dear
	 * under nested virtualisation): the load thread of the stream on
	 * main (a config ready, a buffer applied, a failure), each device's
	 * load thread on its work, the threads pushing to it on its space. */
	pthread_cond_t main;
	bool closed;                    /* lock: finish has begun */
	int error;                      /* lock: first failure, or 0 */
	struct ferry_error err;         /* lock: its message */
	void (*on_fail)(void *arg);     /* immutable once loading */
	void *on_fail_arg;
	struct dsq_buf *spare;          /* lock: buffers to reuse */
	unsigned nspare;                /* lock */
};

/* A buffer for @len bytes: a spare one if it fits. Lock not held. */
static struct dsq_buf *buf_get(struct ferry__dsq *q, size_t len)
{
	struct dsq_buf *b = NULL, **pp;

	ferry__mutex_lock(&q->lock);
	for (pp = &q->spare; *pp; pp = &(*pp)->next)
		if ((*pp)->cap >= len) {
			b = *pp;
			*pp = b->next;
			q->nspare--;
			break;
		}
	ferry__mutex_unlock(&q->lock);
	if (!b) {
		b = malloc(sizeof(*b) + len);
		if (!b)
			return NULL;
		b->cap = len;
	}
	b->len = len;
	return b;
}

/* Give @b back for reuse (or free it). Lock held. */
static void buf_put_locked(struct ferry__dsq *q, struct dsq_buf *b)
{
	if (!b)
		return;
	if (q->nspare >= DSQ_SPARE_MAX || q->closed) {
		free(b);
		return;
	}
	b->next = q->spare;
	q->spare = b;
	q->nspare++;
}

static void fail_locked(struct ferry__dsq *q, int code, const char *fmt, ...)
	FERRY_PRINTF(3, 4);

/* A failure or the close: every waiter must look. */
static void wake_all_locked(struct ferry__dsq *q)
{
	pthread_cond_broadcast(&q->main);
	for (unsigned i = 0; i < q->ndevs; i++) {
		pthread_cond_broadcast(&q->devs[i].work);
		pthread_cond_broadcast(&q->devs[i].space);
	}
}

static void fail_locked(struct ferry__dsq *q, int code, const char *fmt, ...)
{
	va_list ap;

	if (q->error)
		return;
	q->error = code;
	va_start(ap, fmt);
	vsnprintf(q->err.msg, sizeof(q->err.msg), fmt, ap);
	va_end(ap);
	q->err.code = code;
	wake_all_locked(q);
	if (q->on_fail)
		q->on_fail(q->on_fail_arg);
}

void ferry__dsq_on_fail(struct ferry__dsq *q, void (*fn)(void *arg), void *arg)
{
	q->on_fail = fn;
	q->on_fail_arg = arg;
}

struct ferry__dsq *ferry__dsq_new(struct ferry_ctx *ctx, unsigned max_buffers,
				  size_t max_bytes, struct ferry_error *err)
{
	struct ferry__dsq *q = calloc(1, sizeof(*q));
	unsigned n = 0;

	if (!q) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	for (struct ferry_dev *d = ctx->devs; d; d = d->next)
		n += d->ops->load_buffer != NULL;
	q->devs = calloc(n ? n : 1, sizeof(*q->devs));
	if (!q->devs) {
		free(q);
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	for (struct ferry_dev *d = ctx->devs; d; d = d->next)
		if (d->ops->load_buffer) {
			q->devs[q->ndevs].q = q;
			q->devs[q->ndevs].dev = d;
			q->devs[q->ndevs].st.dev = d;
			q->ndevs++;
		}
	q->ctx = ctx;
	q->max_buffers = max_buffers ? max_buffers : DSQ_MAX_BUFFERS_DEFAULT;
	q->max_bytes = max_bytes ? max_bytes : DSQ_MAX_BYTES_DEFAULT;
	pthread_mutex_init(&q->lock, NULL);
	pthread_cond_init(&q->main, NULL);
	for (unsigned i = 0; i < q->ndevs; i++) {
		pthread_cond_init(&q->devs[i].work, NULL);
		pthread_cond_init(&q->devs[i].space, NULL);
	}
	return q;
}

static struct dsq_dev *find(struct ferry__dsq *q, const char *idstr,
			    uint32_t instance)
{
	for (unsigned i = 0; i < q->ndevs; i++)
		if (q->devs[i].dev->instance == instance &&
		    !strcmp(q->devs[i].dev->idstr, idstr))
			return &q->devs[i];
	return NULL;
}

/* ---- the device's load thread ------------------------------------------ */

static bool applicable_locked(const struct dsq_dev *e)
{
	return e->head && e->head->seq == e->next_apply;
}

static void *dsq_main(void *arg)
{
	struct dsq_dev *e = arg;
	struct ferry__dsq *q = e->q;

	ferry__mutex_lock(&q->lock);
	for (;;) {
		struct ferry_error err = { 0 };
		struct dsq_buf *b;
		uint64_t t0;
		int r;

		while (!applicable_locked(e) && !q->closed && !q->error)
			pthread_cond_wait(&e->work, &q->lock);
		if (q->closed || q->error)
			break;
		b = e->head;
		e->head = b->next;
		e->nbuf--;
		e->bytes -= b->len;
		e->next_apply++;
		if (b->config) {
			/* The stream's load thread loads it (ferry__dsq_configs). */
			e->config = b;
			pthread_cond_signal(&q->main);
			continue;
		}
		e->busy = true;
		pthread_cond_broadcast(&e->space);
		ferry__mutex_unlock(&q->lock);

		t0 = ferry__mono_ns();
		r = e->dev->ops->load_buffer(e->dev->opaque, b->data, b->len, &err);

		ferry__mutex_lock(&q->lock);
		buf_put_locked(q, b);
		e->st.t_applied = ferry__mono_ns();
		e->st.data_ns += e->st.t_applied - t0;
		e->busy = false;
		if (r)
			fail_locked(q, r, "device '%s' instance %u (load thread): "
				    "buffer %u: %s", e->dev->idstr,
				    e->dev->instance, e->next_apply - 1,
				    err.code ? err.msg : "load_buffer failed");
		pthread_cond_signal(&q->main);
	}
	ferry__mutex_unlock(&q->lock);
	return NULL;
}

static int start_locked(struct ferry__dsq *q, struct dsq_dev *e,
			struct ferry_error *err)
{
	int rc;

	if (e->thread_started)
		return 0;
	rc = pthread_create(&e->thread, NULL, dsq_main, e);
	if (rc) {
		fail_locked(q, -rc, "cannot start the load thread of '%s'",
			    e->dev->idstr);
		return ferry_error_set(err, -rc, "device '%s': cannot start its "
				       "load thread", e->dev->idstr);
	}
	e->thread_started = true;
	return 0;
}

int ferry__dsq_declare(struct ferry__dsq *q, const char *idstr,
		       uint32_t instance, struct ferry_error *err)
{
	struct dsq_dev *e = find(q, idstr, instance);
	int r;

	if (!e)
		return ferry_error_set(err, -ENOENT, "device '%s' instance %u "
			"sends its state in buffers, which %s", idstr, instance,
			ferry__find_dev(q->ctx, idstr, instance) ?
			"it takes none here" : "does not exist here");
	ferry__mutex_lock(&q->lock);
	if (e->declared)
		r = ferry_error_set(err, -EBADMSG, "device '%s' instance %u "
				    "named twice", idstr, instance);
	else
		r = start_locked(q, e, err);
	e->declared = !r;
	ferry__mutex_unlock(&q->lock);
	return r;
}

/* ---- buffers in -------------------------------------------------------- */

static uint32_t last_seq_locked(const struct dsq_dev *e)
{
	const struct dsq_buf *b = e->head;

	while (b->next)
		b = b->next;
	return b->seq;
}

/* Index validity, under lock: 0, or an error that fails the whole set. */
static int check_seq_locked(struct dsq_dev *e, uint32_t seq, bool config,
			    char *why, size_t whylen)
{
	if (seq < e->next_apply)
		snprintf(why, whylen, "buffer %u twice", seq);
	else if (seq - e->next_apply > DSQ_MAX_AHEAD)
		snprintf(why, whylen, "buffer %u when %u is due (impossible "
			 "index)", seq, e->next_apply);
	else if (e->have_expect && seq >= e->expect)
		snprintf(why, whylen, "buffer %u, but only %u were sent", seq,
			 e->expect);
	else if (e->have_config && seq > e->config_seq)
		snprintf(why, whylen, "buffer %u after its config state "
			 "(buffer %u, the last)", seq, e->config_seq);
	else if (config && e->have_config)
		snprintf(why, whylen, "two config buffers (%u and %u)",
			 e->config_seq, seq);
	else if (config && e->head && last_seq_locked(e) > seq)
		snprintf(why, whylen, "config buffer %u, but buffer %u came "
			 "(nothing may follow the config state)", seq,
			 last_seq_locked(e));
	else if (config && !e->dev->ops->load_config)
		snprintf(why, whylen, "a config buffer, but the device here "
			 "has no load_config");
	else
		return 0;
	return -EBADMSG;
}

/* The smallest index neither applied nor queued. */
static uint32_t lowest_missing_locked(const struct dsq_dev *e)
{
	uint32_t m = e->next_apply;

	for (const struct dsq_buf *b = e->head; b && b->seq == m; b = b->next)
		m++;
	return m;
}

int ferry__dsq_push(struct ferry__dsq *q, const char *idstr, uint32_t instance,
		    uint32_t seq, bool config, bool in_order, const void *buf,
		    size_t len, struct ferry_error *err)
{
	struct dsq_dev *e = find(q, idstr, instance);
	struct dsq_buf *b, **pp;
	char why[160];
	int r = 0;

	if (!e)
		return ferry_error_set(err, -ENOENT, "device state for '%s' "
			"instance %u, which %s", idstr, instance,
			ferry__find_dev(q->ctx, idstr, instance) ?
			"takes no buffers" : "does not exist here");
	b = buf_get(q, len);
	if (!b)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	b->seq = seq;
	b->config = config;
	memcpy(b->data, buf, len);

	ferry__mutex_lock(&q->lock);
	for (;;) {
		bool over = e->nbuf >= q->max_buffers ||
			    e->bytes + len > q->max_bytes;

		if (q->error || q->closed)
			break;
		if ((r = check_seq_locked(e, seq, config, why, sizeof(why))))
			break;
		if (in_order && seq != lowest_missing_locked(e)) {
			snprintf(why, sizeof(why), "buffer %u arrived, expected %u",
				 seq, lowest_missing_locked(e));
			r = -EBADMSG;
			break;
		}
		for (pp = &e->head; *pp && (*pp)->seq < seq; pp = &(*pp)->next)
			;
		if (*pp && (*pp)->seq == seq) {
			snprintf(why, sizeof(why), "buffer %u twice", seq);
			r = -EBADMSG;
			break;
		}
		/* The one the load thread waits for always gets in (see the
		 * top of the file). */
		if (!over || seq == e->next_apply)
			break;
		pthread_cond_wait(&e->space, &q->lock);
	}
	if (r) {
		fail_locked(q, r, "device '%s' instance %u: %s", idstr, instance,
			    why);
	} else if (q->error || q->closed) {
		r = -ECANCELED;
	} else {
		b->next = *pp;
		*pp = b;
		b = NULL;
		e->nbuf++;
		e->bytes += len;
		e->st.buffers++;
		e->st.bytes += len;
		if (!e->st.t_first)
			e->st.t_first = ferry__mono_ns();
		if (config) {
			e->have_config = true;
			e->config_seq = seq;
		}
		if (!e->thread_started)
			r = start_locked(q, e, err);
		if (applicable_locked(e))
			pthread_cond_signal(&e->work);
	}
	if (r == -ECANCELED)
		ferry_error_set(err, r, "%s", q->error ? q->err.msg : "closed");
	else if (r && (!err || !err->code))
		ferry_error_propagate(err, &q->err);
	buf_put_locked(q, b);
	ferry__mutex_unlock(&q->lock);
	return r;
}

int ferry__dsq_drain(struct ferry__dsq *q, const struct ferry_dev *dev)
{
	struct dsq_dev *e = find(q, dev->idstr, dev->instance);
	int r;

	if (!e)
		return 0;
	ferry__mutex_lock(&q->lock);
	while ((applicable_locked(e) || e->busy) && !q->error && !q->closed)
		pthread_cond_wait(&q->main, &q->lock);
	r = q->error ? -ECANCELED : 0;
	ferry__mutex_unlock(&q->lock);
	return r;
}

int ferry__dsq_expect(struct ferry__dsq *q, const char *idstr,
		      uint32_t instance, uint32_t count, struct ferry_error *err)
{
	struct dsq_dev *e = find(q, idstr, instance);
	const struct dsq_buf *b;
	uint32_t have;
	int r = 0;

	if (!e)
		return ferry_error_set(err, -ENOENT, "DEVSTATE_DONE for '%s' "
			"instance %u, which takes no buffers here", idstr, instance);
	ferry__mutex_lock(&q->lock);
	if (!e->declared || e->have_expect) {
		r = ferry_error_set(err, -EBADMSG, "DEVSTATE_DONE for '%s' "
			"instance %u %s", idstr, instance, !e->declared ?
			"which SWITCHOVER_START did not name" : "twice");
		goto out;
	}
	/* Everything sent has arrived (the caller synced the channels), so
	 * the queue must hold every index from next_apply up to count. */
	have = e->next_apply;
	for (b = e->head; b && b->seq == have; b = b->next)
		have++;
	for (b = e->head; b && b->next; b = b->next)
		;
	if ((b && b->seq >= count) || e->next_apply > count)
		r = ferry_error_set(err, -EBADMSG, "device '%s' instance %u: "
			"buffer %u arrived, but the source sent %u", idstr,
			instance, b && b->seq >= count ? b->seq :
			e->next_apply - 1, count);
	else if (have < count)
		r = ferry_error_set(err, -EBADMSG, "device '%s' instance %u: "
			"buffer %u of %u never arrived", idstr, instance, have,
			count);
	else if (e->have_config && e->config_seq != count - 1)
		r = ferry_error_set(err, -EBADMSG, "device '%s' instance %u: "
			"its config state is buffer %u, not the last (%u)",
			idstr, instance, e->config_seq, count - 1);
	if (r) {
		fail_locked(q, r, "%s", err ? err->msg : "missing buffers");
		goto out;
	}
	e->have_expect = true;
	e->expect = count;
	pthread_cond_signal(&q->main);
out:
	ferry__mutex_unlock(&q->lock);
	return r;
}

/* Every declared device has applied all it announced, config included. */
static bool all_done_locked(struct ferry__dsq *q)
{
	for (unsigned i = 0; i < q->ndevs; i++) {
		struct dsq_dev *e = &q->devs[i];

		if (!e->declared)
			continue;
		if (!e->have_expect || e->next_apply < e->expect || e->busy ||
		    (e->have_config && !e->config_loaded))
			return false;
	}
	return true;
}

int ferry__dsq_configs(struct ferry__dsq *q, bool wait, uint64_t *config_ns,
		       struct ferry_error *err)
{
	int r = 0;

	ferry__mutex_lock(&q->lock);
	for (;;) {
		struct dsq_dev *ready = NULL;
		struct ferry_error e2 = { 0 };
		struct dsq_buf *b;
		uint64_t t0;

		if (q->error || q->closed)
			break;
		for (unsigned i = 0; i < q->ndevs && !ready; i++)
			if (q->devs[i].config && !q->devs[i].busy)
				ready = &q->devs[i];
		if (!ready) {
			if (!wait || all_done_locked(q))
				break;
			/* One wait for all of them: whichever is ready first
			 * loads first. */
			pthread_cond_wait(&q->main, &q->lock);
			continue;
		}
		b = ready->config;
		ready->config = NULL;
		ferry__mutex_unlock(&q->lock);

		t0 = ferry__mono_ns();
		r = ready->dev->ops->load_config(ready->dev->opaque, b->data,
						 b->len, &e2);

		t0 = ferry__mono_ns() - t0;
		if (config_ns)
			*config_ns += t0;
		ferry__mutex_lock(&q->lock);
		buf_put_locked(q, b);
		ready->st.config_ns += t0;
		ready->config_loaded = true;
		if (r) {
			fail_locked(q, r, "device '%s' instance %u: load_config: %s",
				    ready->dev->idstr, ready->dev->instance,
				    e2.code ? e2.msg : "failed");
			break;
		}
	}
	if (q->error) {
		r = q->error;
		ferry_error_propagate(err, &q->err);
	} else if (q->closed) {
		r = ferry_error_set(err, -ECANCELED, "closed");
	}
	ferry__mutex_unlock(&q->lock);
	return r;
}

int ferry__dsq_check_done(struct ferry__dsq *q, struct ferry_error *err)
{
	int r = 0;

	ferry__mutex_lock(&q->lock);
	for (unsigned i = 0; i < q->ndevs && !r; i++) {
		struct dsq_dev *e = &q->devs[i];

		if (e->nbuf || e->busy || e->config ||
		    (e->have_config && !e->config_loaded))
			r = ferry_error_set(err, -EBADMSG, "device '%s' instance "
				"%u: %u buffer(s) of its state never loaded (the "
				"stream ended without its DEVSTATE_DONE)",
				e->dev->idstr, e->dev->instance,
				e->nbuf + (e->config != NULL));
	}
	ferry__mutex_unlock(&q->lock);
	return r;
}

void ferry__dsq_fail(struct ferry__dsq *q, int code, const char *why)
{
	ferry__mutex_lock(&q->lock);
	fail_locked(q, code, "%s", why);
	ferry__mutex_unlock(&q->lock);
}

int ferry__dsq_finish(struct ferry__dsq *q, int r, struct ferry_error *err)
{
	ferry__mutex_lock(&q->lock);
	q->closed = true;
	wake_all_locked(q);
	ferry__mutex_unlock(&q->lock);
	for (unsigned i = 0; i < q->ndevs; i++) {
		struct dsq_dev *e = &q->devs[i];

		if (e->thread_started)
			pthread_join(e->thread, NULL);
		/* Pushers may still be in ferry__dsq_push (they see the
		 * close and leave): the queues change under the lock only. */
		ferry__mutex_lock(&q->lock);
		e->thread_started = false;
		while (e->head) {
			struct dsq_buf *b = e->head;

			e->head = b->next;
			free(b);
		}
		free(e->config);
		e->config = NULL;
		e->nbuf = 0;
		e->bytes = 0;
		ferry__mutex_unlock(&q->lock);
	}
	/* A device's failure is the root cause of whatever else failed: the
	 * channels that fed it stop (-ECANCELED), the source cuts the
	 * stream, and the load thread sees the stream break. Unless @err is
	 * that failure already, with where the stream had it (a buffer
	 * refused as it was read: its offset). */
	if (q->error && !(r == q->error && err && q->err.msg[0] &&
			  strstr(err->msg, q->err.msg))) {
		ferry_error_clear(err);
		ferry_error_propagate(err, &q->err);
		r = q->error;
	}
	return r;
}

bool ferry__dsq_stats(struct ferry__dsq *q, unsigned i,
		      struct ferry__dsq_stats *st)
{
	if (i >= q->ndevs)
		return false;
	*st = q->devs[i].st;
	return true;
}

void ferry__dsq_free(struct ferry__dsq *q)
{
	if (!q)
		return;
	ferry__dsq_finish(q, 0, NULL);
	while (q->spare) {
		struct dsq_buf *b = q->spare;

		q->spare = b->next;
		free(b);
	}
	pthread_mutex_destroy(&q->lock);
	pthread_cond_destroy(&q->main);
	for (unsigned i = 0; i < q->ndevs; i++) {
		pthread_cond_destroy(&q->devs[i].work);
		pthread_cond_destroy(&q->devs[i].space);
	}
	free(q->devs);
	free(q);
}
