/*
 * tests/unit/test-devstate.c - device state in buffers, destination side:
 * the per-device queues by index (lib/devstate.c) through the public API,
 * ferry_load() reading a stream from a pipe while feeder threads deliver
 * buffers with ferry_load_devstate() the way multifd channel threads do.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

#include "ferry/ferry.h"
#include "../harness.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

#define BUF 4096u

/* A device that takes buffers: checks their order and content, counts
 * what is queued (the feeders' "accepted" minus its "applied"). */
struct qdev {
	char name[16];
	uint32_t instance;
	uint32_t nbufs;               /* data buffers expected */
	unsigned delay_us;            /* per load_buffer */
	uint32_t fail_at;             /* load_buffer fails at this index (0 = never) */
	atomic_bool started;          /* load_setup ran */
	atomic_uint applied;
	atomic_uint accepted;         /* by the feeders */
	unsigned max_backlog;         /* accepted - applied, at worst */
	bool order_ok, content_ok;
	atomic_bool config_loaded;
	bool config_after_data, config_on_load_thread;
	pthread_t load_thread;        /* the thread running ferry_load */
	uint64_t t_config, t_last_apply;
};

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void fill(uint8_t *b, uint32_t inst, uint32_t seq)
{
	for (unsigned i = 0; i < BUF; i++)
		b[i] = (uint8_t)(seq * 7 + i + inst * 13);
}

static int q_load_setup(void *opaque, struct ferry_error *err)
{
	struct qdev *q = opaque;

	(void)err;
	q->load_thread = pthread_self();
	atomic_store(&q->started, true);
	return 0;
}

static int q_load_buffer(void *opaque, const void *buf, size_t len,
			 struct ferry_error *err)
{
	struct qdev *q = opaque;
	unsigned n = atomic_load(&q->applied), acc = atomic_load(&q->accepted);
	uint8_t want[BUF];

	if (q->fail_at && n == q->fail_at)
		return ferry_error_set(err, -EIO, "injected failure at %u", n);
	if (q->delay_us)
		usleep(q->delay_us);
	fill(want, q->instance, n);
	if (len != BUF || memcmp(buf, want, BUF))
		q->order_ok = false;
	if (acc > n && acc - n > q->max_backlog)
		q->max_backlog = acc - n;
	atomic_store(&q->applied, n + 1);
	q->t_last_apply = mono_ns();
	return 0;
}

static int q_load_config(void *opaque, const void *buf, size_t len,
			 struct ferry_error *err)
{
	struct qdev *q = opaque;

	(void)err;
	q->config_after_data = atomic_load(&q->applied) == q->nbufs;
	q->config_on_load_thread = pthread_equal(pthread_self(), q->load_thread);
	q->content_ok = len == 4 && !memcmp(buf, "CONF", 4);
	q->t_config = mono_ns();
	atomic_store(&q->config_loaded, true);
	return 0;
}

static int q_save_state(struct ferry_chan *c, void *opaque,
			struct ferry_error *err)
{
	(void)c;
	(void)opaque;
	(void)err;
	return 0;
}

static int q_load_state(struct ferry_chan *c, void *opaque, uint32_t v,
			struct ferry_error *err)
{
	(void)c;
	(void)opaque;
	(void)v;
	(void)err;
	return 0;
}

static const struct ferry_dev_ops q_ops = {
	.size = sizeof(struct ferry_dev_ops),
	.save_state = q_save_state,
	.load_setup = q_load_setup,
	.load_state = q_load_state,
	.load_buffer = q_load_buffer,
	.load_config = q_load_config,
};

/* The destination: a context with the devices, ferry_load() on a pipe in
 * its own thread. */
struct dest {
	struct ferry_ctx *ctx;
	int wfd;                      /* the stream's writing end */
	struct ferry_chan *w;
	struct ferry_record_io wio;
	int rfd;
	pthread_t thread;
	int ret;
	struct ferry_error err;
	struct ferry_load_opts opts;
};

static void *dest_main(void *arg)
{
	struct dest *d = arg;
	struct ferry_chan *c = ferry_chan_new_fd(d->rfd, FERRY_CHAN_READ, false);

	d->ret = ferry_load(d->ctx, c, &d->opts, &d->err);
	ferry_chan_free(c);
	return NULL;
}

static void dest_start2(struct dest *d, struct qdev *qs, unsigned n,
			uint32_t max_buffers, bool after_iter)
{
	struct ferry_error err = { 0 };
	int p[2];

	memset(d, 0, sizeof(*d));
	d->ctx = ferry_ctx_new(&err);
	ASSERT_PTR(d->ctx);
	for (unsigned i = 0; i < n; i++) {
		qs[i].order_ok = true;
		ASSERT_OK_E(ferry_register(d->ctx, qs[i].name, qs[i].instance,
					   1, 1, &q_ops, &qs[i], &err), err);
	}
	d->opts.size = sizeof(d->opts);
	d->opts.max_queued_buffers = max_buffers;
	d->opts.load_config_after_iter = after_iter;
	ASSERT_OK(pipe(p));
	d->rfd = p[0];
	d->wfd = p[1];
	d->w = ferry_chan_new_fd(d->wfd, FERRY_CHAN_WRITE, false);
	d->wio.chan = d->w;
	ASSERT_OK(ferry_stream_write_header(d->w, NULL));
	ASSERT_OK(pthread_create(&d->thread, NULL, dest_main, d));
}

static void dest_start(struct dest *d, struct qdev *qs, unsigned n,
		       uint32_t max_buffers)
{
	dest_start2(d, qs, n, max_buffers, false);
}

static void dest_rec(struct dest *d, uint8_t type, const void *p, size_t n)
{
	ferry_record_write(&d->wio, type, p, n, NULL);
	ferry_chan_flush(d->w);
}

/* A command whose payload lists the devices (with counts, and the
 * DEVSTATE_DONE flags word, when @counts is given). */
static void dest_list(struct dest *d, uint16_t cmd, struct qdev *qs,
		      unsigned n, const uint32_t *counts)
{
	uint8_t p[512];
	size_t off = 0;

	p[off++] = (uint8_t)(cmd >> 8);
	p[off++] = (uint8_t)cmd;
	memset(p + off, 0, 4);   /* flags: no multifd sync to wait for */
	off += 4;
	p[off++] = 0; p[off++] = 0; p[off++] = 0; p[off++] = (uint8_t)n;
	for (unsigned i = 0; i < n; i++) {
		size_t l = strlen(qs[i].name);

		p[off++] = (uint8_t)l;
		memcpy(p + off, qs[i].name, l);
		off += l;
		p[off++] = 0; p[off++] = 0; p[off++] = 0;
		p[off++] = (uint8_t)qs[i].instance;
		if (counts) {
			p[off++] = (uint8_t)(counts[i] >> 24);
			p[off++] = (uint8_t)(counts[i] >> 16);
			p[off++] = (uint8_t)(counts[i] >> 8);
			p[off++] = (uint8_t)counts[i];
		}
	}
	dest_rec(d, FERRY_REC_COMMAND, p, off);
}

static int dest_finish(struct dest *d)
{
	dest_rec(d, FERRY_REC_EOF, NULL, 0);
	ferry_chan_free(d->w);
	close(d->wfd);
	pthread_join(d->thread, NULL);
	close(d->rfd);
	ferry_ctx_free(d->ctx);
	return d->ret;
}

/* Feeders: like multifd channel threads, each delivers a share of the
 * buffers of every device, in an order of its own. */
struct feeder {
	struct ferry_ctx *ctx;
	struct qdev *q;
	const uint32_t *seqs;         /* indexes to deliver, in this order */
	unsigned n;
	int ret;                      /* first failure */
	struct ferry_error err;
	uint64_t rng;                 /* this thread's own random numbers */
};

static uint64_t feeder_rand(struct feeder *f)
{
	f->rng ^= f->rng << 13;
	f->rng ^= f->rng >> 7;
	f->rng ^= f->rng << 17;
	return f->rng;
}

static void *feed_main(void *arg)
{
	struct feeder *f = arg;
	uint8_t buf[BUF];

	while (!atomic_load(&f->q->started))
		usleep(100);
	for (unsigned i = 0; i < f->n && !f->ret; i++) {
		bool config = f->seqs[i] == f->q->nbufs;

		/* Channels run at their own pace. */
		if (feeder_rand(f) % 8 == 0)
			usleep((useconds_t)(feeder_rand(f) % 200));
		const void *p = config ? (const void *)"CONF" : buf;

		fill(buf, f->q->instance, f->seqs[i]);
		f->ret = ferry_load_devstate(f->ctx, f->q->name, f->q->instance,
					     f->seqs[i], config, p,
					     config ? 4 : BUF, &f->err);
		if (!f->ret)
			atomic_fetch_add(&f->q->accepted, 1);
	}
	return NULL;
}

/* Deliver buffers 0..nbufs (the last one the config) of @q over @nf
 * feeders. Each keeps its own indexes in ascending order, as a channel
 * does (the source numbers and sends them in order); with @scramble each
 * index goes to a random feeder, as the next idle channel would be. */
static void feed(struct dest *d, struct qdev *q, unsigned nf, bool scramble,
		 struct feeder *fs, pthread_t *ts, uint32_t **seqs)
{
	unsigned n[8] = { 0 };

	for (unsigned k = 0; k < nf; k++)
		seqs[k] = calloc(q->nbufs + 1, sizeof(uint32_t));
	for (uint32_t s = 0; s <= q->nbufs; s++) {
		unsigned k = scramble ? (unsigned)(test_rand() % nf) : s % nf;

		seqs[k][n[k]++] = s;
	}
	for (unsigned k = 0; k < nf; k++) {
		fs[k] = (struct feeder){ .ctx = d->ctx, .q = q, .seqs = seqs[k],
					 .n = n[k], .rng = test_rand() | 1 };
		ASSERT_OK(pthread_create(&ts[k], NULL, feed_main, &fs[k]));
	}
}

static void feed_join(unsigned nf, pthread_t *ts, uint32_t **seqs)
{
	for (unsigned k = 0; k < nf; k++) {
		pthread_join(ts[k], NULL);
		free(seqs[k]);
	}
}

/* Buffers arrive out of order over three threads; the device sees them
 * in order, then its config, on the load thread, after all its data. */
TEST(devstate_out_of_order_applied_in_order)
{
	struct qdev q = { .name = "q", .nbufs = 300 };
	struct feeder fs[3];
	pthread_t ts[3];
	uint32_t *seqs[3];
	struct dest d;
	uint32_t count = q.nbufs + 1;

	dest_start(&d, &q, 1, 0);
	dest_list(&d, FERRY_CMD_SWITCHOVER_START, &q, 1, NULL);
	feed(&d, &q, 3, true, fs, ts, seqs);
	feed_join(3, ts, seqs);
	for (int k = 0; k < 3; k++)
		ASSERT_OK_E(fs[k].ret, fs[k].err);
	dest_list(&d, FERRY_CMD_DEVSTATE_DONE, &q, 1, &count);
	ASSERT_OK_E(dest_finish(&d), d.err);
	ASSERT_EQ(atomic_load(&q.applied), q.nbufs);
	ASSERT(q.order_ok);
	ASSERT(q.config_loaded);
	ASSERT(q.config_after_data);
	ASSERT(q.config_on_load_thread);
	ASSERT(q.content_ok);
}

/* One index delivered twice fails the load, naming it. */
TEST(devstate_duplicate_index_fails)
{
	struct qdev q = { .name = "q", .nbufs = 10 };
	struct ferry_error err = { 0 };
	uint8_t buf[BUF];
	struct dest d;

	dest_start(&d, &q, 1, 0);
	dest_list(&d, FERRY_CMD_SWITCHOVER_START, &q, 1, NULL);
	while (!atomic_load(&q.started))
		usleep(100);
	fill(buf, 0, 5);
	ASSERT_OK_E(ferry_load_devstate(d.ctx, "q", 0, 5, false, buf, BUF, &err),
		    err);
	ASSERT_ERR(ferry_load_devstate(d.ctx, "q", 0, 5, false, buf, BUF, &err),
		   -EBADMSG);
	ASSERT_CONTAINS(err.msg, "buffer 5 twice");
	ASSERT_ERR(dest_finish(&d), -EBADMSG);
	ASSERT_CONTAINS(d.err.msg, "buffer 5 twice");
}

/* An index no honest source could send, one past the count the source
 * announced, and data after the config are refused. */
TEST(devstate_impossible_index_fails)
{
	static const struct { uint32_t seq; bool config; const char *why; }
	cases[] = {
		{ 5u << 20, false, "impossible index" },
		{ 12, false, "buffer 12 arrived, but the source sent 10" },
		{ 4, false, "after its config state" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct qdev q = { .name = "q", .nbufs = 9 };
		struct ferry_error err = { 0 };
		uint8_t buf[BUF] = { 0 };
		uint32_t count = 10;
		struct dest d;
		int r;

		(void)count;

		dest_start(&d, &q, 1, 0);
		dest_list(&d, FERRY_CMD_SWITCHOVER_START, &q, 1, NULL);
		while (!atomic_load(&q.started))
			usleep(100);
		if (i == 1) {
			/* Index 12 is taken (it could be early), but once
			 * DEVSTATE_DONE counts 10 it is one too many. */
			ASSERT_OK(ferry_load_devstate(d.ctx, "q", 0, 12, false,
						      buf, BUF, &err));
			dest_list(&d, FERRY_CMD_DEVSTATE_DONE, &q, 1, &count);
			ASSERT_ERR(dest_finish(&d), -EBADMSG);
			ASSERT_CONTAINS(d.err.msg, cases[i].why);
			continue;
		}
		if (i == 2)
			ASSERT_OK(ferry_load_devstate(d.ctx, "q", 0, 3, true,
						      "CONF", 4, &err));
		r = ferry_load_devstate(d.ctx, "q", 0, cases[i].seq,
					cases[i].config, buf, BUF, &err);
		ASSERT_ERR(r, -EBADMSG);
		ASSERT_CONTAINS(err.msg, cases[i].why);
		ASSERT_ERR(dest_finish(&d), -EBADMSG);
		ASSERT_CONTAINS(d.err.msg, cases[i].why);
	}
}

/* DEVSTATE_DONE says 10 were sent; buffer 6 never came: the load fails at
 * once, naming it (the channels were synced: it is lost, not late). */
TEST(devstate_missing_buffer_fails)
{
	struct qdev q = { .name = "q", .nbufs = 9 };
	struct ferry_error err = { 0 };
	uint8_t buf[BUF];
	uint32_t count = 10;
	struct dest d;

	dest_start(&d, &q, 1, 0);
	dest_list(&d, FERRY_CMD_SWITCHOVER_START, &q, 1, NULL);
	while (!atomic_load(&q.started))
		usleep(100);
	for (uint32_t s = 0; s < 10; s++) {
		if (s == 6)
			continue;
		fill(buf, 0, s);
		ASSERT_OK_E(ferry_load_devstate(d.ctx, "q", 0, s, s == 9,
			s == 9 ? (void *)"CONF" : buf, s == 9 ? 4 : BUF, &err), err);
	}
	dest_list(&d, FERRY_CMD_DEVSTATE_DONE, &q, 1, &count);
	ASSERT_ERR(dest_finish(&d), -EBADMSG);
	ASSERT_CONTAINS(d.err.msg, "buffer 6 of 10 never arrived");
	ASSERT(!q.config_loaded);
}

/* A stream that names a device in SWITCHOVER_START but ends without its
 * DEVSTATE_DONE fails (its buffers would be dropped); a config buffer
 * arriving after a later data buffer fails at once. */
TEST(devstate_incomplete_streams_fail)
{
	struct ferry_error err = { 0 };
	uint8_t buf[BUF];

	for (int c = 0; c < 2; c++) {
		struct qdev q = { .name = "q", .nbufs = 9 };
		struct dest d;

		dest_start(&d, &q, 1, 0);
		dest_list(&d, FERRY_CMD_SWITCHOVER_START, &q, 1, NULL);
		while (!atomic_load(&q.started))
			usleep(100);
		fill(buf, 0, 0);
		ASSERT_OK(ferry_load_devstate(d.ctx, "q", 0, c ? 5 : 0, false,
					      buf, BUF, &err));
		if (c) {
			ASSERT_ERR(ferry_load_devstate(d.ctx, "q", 0, 3, true,
						       "CONF", 4, &err), -EBADMSG);
			ASSERT_CONTAINS(err.msg, "nothing may follow the config");
		}
		ASSERT_ERR(dest_finish(&d), -EBADMSG);
		ASSERT_CONTAINS(d.err.msg, c ? "nothing may follow the config" :
				"without DEVSTATE_DONE");
	}
}

/* A slow load thread and eager feeders: the queue never holds more than
 * max-queued-buffers (plus the one the load thread needs, plus one per
 * feeder between its push and its count), whatever the order. */
TEST(devstate_queue_cap_applies_backpressure)
{
	struct qdev q = { .name = "q", .nbufs = 200, .delay_us = 300 };
	struct feeder fs[2];
	pthread_t ts[2];
	uint32_t *seqs[2];
	uint32_t count = q.nbufs + 1;
	struct dest d;

	dest_start(&d, &q, 1, 4);
	dest_list(&d, FERRY_CMD_SWITCHOVER_START, &q, 1, NULL);
	feed(&d, &q, 2, true, fs, ts, seqs);
	feed_join(2, ts, seqs);
	for (int k = 0; k < 2; k++)
		ASSERT_OK_E(fs[k].ret, fs[k].err);
	dest_list(&d, FERRY_CMD_DEVSTATE_DONE, &q, 1, &count);
	ASSERT_OK_E(dest_finish(&d), d.err);
	ASSERT(q.order_ok);
	ASSERT_EQ(atomic_load(&q.applied), q.nbufs);
	/* Without backpressure the feeders run 200 ahead. */
	ASSERT_LE(q.max_backlog, 4 + 1 + 2 + 1);
	ASSERT_GT(q.max_backlog, 0);
}

/* The load thread fails at buffer 20: feeders blocked on the full queue
 * return at once, the load fails with the device's error, every thread
 * ends (the test's own timeout catches one left blocked). */
TEST(devstate_load_thread_failure_stops_everything)
{
	struct qdev q = { .name = "q", .nbufs = 400, .fail_at = 20,
			  .delay_us = 200 };
	struct feeder fs[2];
	pthread_t ts[2];
	uint32_t *seqs[2];
	struct dest d;
	uint64_t t0;

	dest_start(&d, &q, 1, 4);
	dest_list(&d, FERRY_CMD_SWITCHOVER_START, &q, 1, NULL);
	t0 = mono_ns();
	feed(&d, &q, 2, false, fs, ts, seqs);
	feed_join(2, ts, seqs);
	/* Both stopped early, refused. */
	ASSERT(fs[0].ret == -ECANCELED || fs[1].ret == -ECANCELED);
	ASSERT_LT(atomic_load(&q.accepted), 60);
	ASSERT_LT(mono_ns() - t0, 5000000000ull);
	ASSERT_ERR(dest_finish(&d), -EIO);
	ASSERT_CONTAINS(d.err.msg, "injected failure at 20");
	ASSERT_CONTAINS(d.err.msg, "load thread");
}

/* Two devices: the fast one loads its config while the slow one is still
 * applying data - one wait for whichever is ready, not one per device in
 * a fixed order (the slow one is listed first). */
TEST(devstate_ready_device_loads_config_first)
{
	struct qdev qs[2] = {
		{ .name = "slow", .nbufs = 60, .delay_us = 5000 },
		{ .name = "fast", .nbufs = 60 },
	};
	struct feeder fs[2];
	pthread_t ts[2];
	uint32_t *seqs[2];
	uint32_t counts[2] = { 61, 61 };
	struct dest d;

	dest_start(&d, qs, 2, 0);
	dest_list(&d, FERRY_CMD_SWITCHOVER_START, qs, 2, NULL);
	feed(&d, &qs[0], 1, false, &fs[0], &ts[0], &seqs[0]);
	feed(&d, &qs[1], 1, false, &fs[1], &ts[1], &seqs[1]);
	feed_join(1, &ts[0], &seqs[0]);
	feed_join(1, &ts[1], &seqs[1]);
	dest_list(&d, FERRY_CMD_DEVSTATE_DONE, qs, 2, counts);
	ASSERT_OK_E(dest_finish(&d), d.err);
	for (int i = 0; i < 2; i++) {
		ASSERT(qs[i].order_ok);
		ASSERT(qs[i].config_after_data);
		ASSERT(qs[i].config_on_load_thread);
	}
	ASSERT_LT(qs[1].t_config, qs[0].t_last_apply);
}

/* A device whose data is all in loads its config at the next record -
 * unless load_config_after_iter holds it until the iterable sections are
 * done (DEVSTATE_DONE here). */
TEST(devstate_config_after_iter)
{
	for (int after = 0; after < 2; after++) {
		struct qdev q = { .name = "q", .nbufs = 8 };
		struct ferry_error err = { 0 };
		uint8_t buf[BUF], ping[6] = { 0, FERRY_CMD_PING, 0, 0, 0, 1 };
		uint32_t count = 9;
		struct dest d;

		dest_start2(&d, &q, 1, 0, after);
		dest_list(&d, FERRY_CMD_SWITCHOVER_START, &q, 1, NULL);
		while (!atomic_load(&q.started))
			usleep(100);
		for (uint32_t s = 0; s < 9; s++) {
			fill(buf, 0, s);
			ASSERT_OK_E(ferry_load_devstate(d.ctx, "q", 0, s, s == 8,
				s == 8 ? (void *)"CONF" : buf, s == 8 ? 4 : BUF,
				&err), err);
		}
		/* Let the load thread apply the data, then send a record. */
		for (int i = 0; i < 2000 && atomic_load(&q.applied) < 8; i++)
			usleep(1000);
		usleep(20000);
		dest_rec(&d, FERRY_REC_COMMAND, ping, sizeof(ping));
		usleep(50000);
		ASSERT_EQ(atomic_load(&q.config_loaded), !after);
		dest_list(&d, FERRY_CMD_DEVSTATE_DONE, &q, 1, &count);
		ASSERT_OK_E(dest_finish(&d), d.err);
		ASSERT(q.config_loaded && q.config_after_data);
	}
}

/* ---- through the migration engine ----------------------------------------- */

#include "minivm.h"

#define MB (1024u * 1024u)
#define TBUFS 64u
#define TBUF (64u * 1024u)

/* A device with large state on both sides of an engine migration. */
struct tdev {
	uint32_t fail_at;             /* destination: load_buffer fails here */
	unsigned delay_ms;            /* destination: per load_buffer */
	bool ack_needed;              /* destination: switchover_ack_needed */
	atomic_uint applied;
	bool order_ok, config_loaded, config_after_data;
};

static uint64_t tword(uint32_t b, uint32_t i)
{
	uint64_t x = ((uint64_t)b << 32 | i) * 0x9e3779b97f4a7c15ull;

	return x ^ (x >> 29);
}

static int t_thread(struct ferry_devstate_sink *sink, void *opaque,
		    struct ferry_error *err)
{
	uint64_t *buf = malloc(TBUF);
	int r = 0;

	(void)opaque;
	if (!buf)
		return ferry_error_set(err, -ENOMEM, "oom");
	for (uint32_t b = 0; b < TBUFS && !r; b++) {
		for (uint32_t i = 0; i < TBUF / 8; i++)
			buf[i] = tword(b, i);
		r = ferry_devstate_send(sink, buf, TBUF, err);
	}
	free(buf);
	return r ? r : ferry_devstate_send_config(sink, "CONF", 4, err);
}

static int t_load_buffer(void *opaque, const void *buf, size_t len,
			 struct ferry_error *err)
{
	struct tdev *t = opaque;
	uint32_t n = atomic_load(&t->applied);
	const uint64_t *w = buf;

	if (t->fail_at && n == t->fail_at)
		return ferry_error_set(err, -EIO, "injected failure at %u", n);
	if (t->delay_ms)
		usleep(t->delay_ms * 1000);
	if (len != TBUF || w[0] != tword(n, 0) || w[TBUF / 8 - 1] !=
	    tword(n, TBUF / 8 - 1))
		t->order_ok = false;
	atomic_store(&t->applied, n + 1);
	return 0;
}

static int t_load_config(void *opaque, const void *buf, size_t len,
			 struct ferry_error *err)
{
	struct tdev *t = opaque;

	(void)err;
	t->config_loaded = len == 4 && !memcmp(buf, "CONF", 4);
	t->config_after_data = atomic_load(&t->applied) == TBUFS;
	return 0;
}

static bool t_ack_needed(void *opaque)
{
	return ((struct tdev *)opaque)->ack_needed;
}

static const struct ferry_dev_ops t_ops = {
	.size = sizeof(struct ferry_dev_ops),
	.save_state = q_save_state,
	.save_complete_thread = t_thread,
	.load_state = q_load_state,
	.load_buffer = t_load_buffer,
	.load_config = t_load_config,
	.switchover_ack_needed = t_ack_needed,
};

static void pair(struct minivm *s, struct minivm *d, struct tdev *ts,
		 struct tdev *td)
{
	struct ferry_error err = { 0 };

	minivm_init(s, 32 * MB, 8 * MB, 0, true, false);
	minivm_init(d, 32 * MB, 8 * MB, 0, false, false);
	td->order_ok = true;
	ASSERT_OK_E(ferry_register(s->ctx, "t", 0, 1, 1, &t_ops, ts, &err), err);
	ASSERT_OK_E(ferry_register(d->ctx, "t", 0, 1, 1, &t_ops, td, &err), err);
}

static void go(struct minivm *s, struct minivm *d, const char *name)
{
	struct ferry_error err = { 0 };
	const char *uri = minivm_uri(name);

	ASSERT_OK_E(ferry_mig_incoming(d->mig, uri, &err), err);
	ASSERT_OK_E(ferry_mig_start(s->mig, uri, &err), err);
}

/* The device's buffers through the engine, on multifd and on the main
 * channel: all in order, config last, and the figures in query-migrate. */
TEST(devstate_engine_both_channels)
{
	static const char *const chans[] = { "multifd", "main" };

	for (int c = 0; c < 2; c++) {
		struct tdev ts = { 0 }, td = { 0 };
		struct ferry_mig_info is, id;
		struct minivm s, d;

		pair(&s, &d, &ts, &td);
		minivm_set_str(&s, "device-state-channel", chans[c]);
		minivm_set_str(&d, "device-state-channel", chans[c]);
		go(&s, &d, chans[c]);
		is = minivm_wait(&s, 60000);
		id = minivm_wait(&d, 60000);
		ASSERT_STREQ(ferry_mig_status_name(is.status), "completed");
		ASSERT_STREQ(ferry_mig_status_name(id.status), "completed");
		ASSERT_EQ(atomic_load(&td.applied), TBUFS);
		ASSERT(td.order_ok);
		ASSERT(td.config_loaded && td.config_after_data);
		ASSERT_EQ(is.ndevices, 1);
		ASSERT_STREQ(is.devices[0].id, "t");
		ASSERT_EQ_U64(is.devices[0].switchover_bytes, TBUFS * TBUF + 4);
		ASSERT_EQ(id.ndevices, 1);
		ASSERT_EQ_U64(id.devstate_switchover_bytes, TBUFS * TBUF + 4);
		ASSERT(id.devices[0].data_load_ms > 0);
		/* Over multifd the buffers are on the channels' count. */
		if (c == 0)
			ASSERT_GT(is.multifd_bytes, TBUFS * TBUF);
		ASSERT_EQ_U64(minivm_digest(&d), minivm_digest(&s));
		minivm_free(&s);
		minivm_free(&d);
	}
}

/* device-state-channel differs: refused at setup, saying so; the source
 * runs on. */
TEST(devstate_engine_channel_mismatch_refused)
{
	struct tdev ts = { 0 }, td = { 0 };
	struct ferry_mig_info is;
	struct minivm s, d;

	pair(&s, &d, &ts, &td);
	minivm_set_str(&s, "device-state-channel", "main");
	go(&s, &d, "mm");
	is = minivm_wait(&s, 60000);
	minivm_wait(&d, 60000);
	ASSERT_STREQ(ferry_mig_status_name(is.status), "failed");
	ASSERT_CONTAINS(is.error, "device-state-channel");
	ASSERT_EQ(minivm_state(&s), FERRY_RUN_RUNNING);
	ASSERT_EQ(atomic_load(&td.applied), 0);
	minivm_free(&s);
	minivm_free(&d);
}

/* A device load thread fails mid-stream: the migration fails with its
 * error, the destination never runs, the source runs on. */
TEST(devstate_engine_load_failure_source_runs)
{
	struct tdev ts = { 0 }, td = { .fail_at = 10 };
	struct ferry_mig_info is, id;
	struct minivm s, d;

	pair(&s, &d, &ts, &td);
	go(&s, &d, "lf");
	is = minivm_wait(&s, 60000);
	id = minivm_wait(&d, 60000);
	ASSERT_STREQ(ferry_mig_status_name(is.status), "failed");
	ASSERT_STREQ(ferry_mig_status_name(id.status), "failed");
	ASSERT_CONTAINS(id.error, "injected failure at 10");
	ASSERT_CONTAINS(is.error, "injected failure at 10");
	ASSERT_EQ(minivm_state(&s), FERRY_RUN_RUNNING);
	ASSERT_EQ(d.starts, 0);
	minivm_wait_pages(&s, 100);   /* it really runs */
	minivm_free(&s);
	minivm_free(&d);
}

/* switchover-ack: the source keeps precopying until the destination's
 * device approves, then switches. */
TEST(devstate_switchover_ack_delays_switch)
{
	struct tdev ts = { 0 }, td = { .ack_needed = true };
	struct ferry_mig_info is, id;
	struct ferry_setting st;
	struct minivm s, d;

	pair(&s, &d, &ts, &td);
	minivm_set(&s, "switchover-ack", 1);
	minivm_set(&d, "switchover-ack", 1);
	go(&s, &d, "ack");
	/* Converged long ago (8 MiB working set), but not acked. */
	usleep(1500000);
	ASSERT_OK(ferry_mig_get(s.mig, "switchover-ack", &st, NULL));
	ASSERT_EQ(st.u, 1);
	is = (struct ferry_mig_info){ .size = sizeof(is) };
	ferry_mig_query(s.mig, &is);
	ASSERT_STREQ(ferry_mig_status_name(is.status), "active");
	ASSERT(!is.switchover_acked);
	ASSERT_EQ(minivm_state(&s), FERRY_RUN_RUNNING);
	ASSERT(!minivm_logged(&s, "out:device"));
	ASSERT_GT(is.pass, 2);
	/* A device that never asked cannot approve. */
	ASSERT_ERR(ferry_load_switchover_ack(d.ctx, "nope", 0), -ENOENT);
	ASSERT_OK(ferry_load_switchover_ack(d.ctx, "t", 0));
	is = minivm_wait(&s, 60000);
	id = minivm_wait(&d, 60000);
	ASSERT_STREQ(ferry_mig_status_name(is.status), "completed");
	ASSERT_STREQ(ferry_mig_status_name(id.status), "completed");
	ASSERT(is.switchover_acked);
	ASSERT_EQ_U64(minivm_digest(&d), minivm_digest(&s));
	minivm_free(&s);
	minivm_free(&d);
}

/* The ack is lost: the source gives up after switchover-ack-timeout,
 * cleanly - failed, running, never stopped. */
TEST(devstate_switchover_ack_lost_times_out)
{
	struct tdev ts = { 0 }, td = { 0 };
	struct ferry_mig_info is;
	struct minivm s, d;

	pair(&s, &d, &ts, &td);
	minivm_set(&s, "switchover-ack", 1);
	minivm_set(&d, "switchover-ack", 1);
	minivm_set(&s, "switchover-ack-timeout", 400);
	ASSERT_OK(ferry_mig_inject_fault(d.mig, "lose-switchover-ack", NULL));
	go(&s, &d, "lost");
	is = minivm_wait(&s, 60000);
	minivm_wait(&d, 60000);
	ASSERT_STREQ(ferry_mig_status_name(is.status), "failed");
	ASSERT_CONTAINS(is.error, "switchover-ack");
	ASSERT_EQ(minivm_state(&s), FERRY_RUN_RUNNING);
	ASSERT_EQ(s.stops, 0);
	ASSERT_EQ(d.starts, 0);
	minivm_free(&s);
	minivm_free(&d);
}

/* Cancel while the device state moves (a slow destination device, its
 * queue full, channels waiting): every thread on both sides returns
 * promptly, the source runs on, the destination never does. */
TEST(devstate_engine_cancel_during_device_state)
{
	struct tdev ts = { 0 }, td = { .delay_ms = 100 };
	struct ferry_error err = { 0 };
	struct ferry_mig_info is, id;
	struct minivm s, d;
	uint64_t t0;

	pair(&s, &d, &ts, &td);
	minivm_set(&d, "max-queued-buffers", 2);
	go(&s, &d, "cancel");
	minivm_wait_status(&s, FERRY_MIG_DEVICE, 30000);
	while (atomic_load(&td.applied) < 2)
		usleep(1000);
	t0 = mono_ns();
	ASSERT_OK_E(ferry_mig_cancel(s.mig, &err), err);
	is = minivm_wait(&s, 10000);
	id = minivm_wait(&d, 10000);
	ASSERT_LT(mono_ns() - t0, 3000000000ull);
	ASSERT_STREQ(ferry_mig_status_name(is.status), "cancelled");
	ASSERT(id.status == FERRY_MIG_FAILED || id.status == FERRY_MIG_CANCELLED);
	ASSERT_LT(atomic_load(&td.applied), TBUFS);
	ASSERT_EQ(minivm_state(&s), FERRY_RUN_RUNNING);
	ASSERT_EQ(d.starts, 0);
	minivm_wait_pages(&s, 100);
	minivm_free(&s);
	minivm_free(&d);
}
