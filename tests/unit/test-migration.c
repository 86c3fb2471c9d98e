/*
 * tests/unit/test-migration.c - the save and load loops driving real hooks:
 * file save/restore, precopy rounds, commands, failures, two contexts.
 */
#include "../harness.h"

#include <pthread.h>
#include <unistd.h>

#include "ferry/ferry.h"
#include "testdev.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

static void assert_same(struct testvm *a, struct testvm *b)
{
	ASSERT_EQ(a->ram.npages, b->ram.npages);
	ASSERT_MEMEQ(a->ram.mem, b->ram.mem, (size_t)a->ram.npages * TRAM_PAGE);
	ASSERT_MEMEQ(&a->regs, &b->regs, sizeof(a->regs));
	ASSERT_EQ(b->blob.received, a->blob.nbufs);
	ASSERT(!b->blob.config_before_data);
	ASSERT_EQ_U64(b->blob.sum, tblob_expected_sum(a->blob.nbufs, a->blob.bufsize));
	ASSERT(b->blob.order_ok);
	ASSERT(b->blob.switchover_seen);
}

static int load_buf(struct testvm *vm, const uint8_t *d, size_t n,
		    struct ferry_error *err)
{
	struct ferry_chan *r = ferry_chan_new_mem_reader(d, n);
	int ret = ferry_load(vm->ctx, r, NULL, err);
	ferry_chan_free(r);
	return ret;
}

/* Save to file: through the transport, restore in a fresh context. */
TEST(migration_file_roundtrip)
{
	struct testvm src, dst;
	struct ferry_error err = { 0 };
	const char *uri = test_fmt("file:%s/vm.img", test_tmpdir());
	struct ferry_chan *c;
	int fd;

	testvm_init(&src, true, test_rand());
	testvm_init(&dst, false, 0);
	fd = ferry_transport_connect(uri, 1000, &err);
	ASSERT_GE(fd, 0);
	c = ferry_chan_new_fd(fd, FERRY_CHAN_WRITE, true);
	ASSERT_OK_E(ferry_save_all(src.ctx, c, 0, &err), err);
	ferry_chan_free(c);
	/* Hooks ran exactly as documented. */
	ASSERT_EQ(src.ram.setups, 1);
	ASSERT_EQ(src.ram.completes, 1);
	ASSERT_EQ(src.ram.cleanups, 1);
	ASSERT_GE(src.ram.iterates, 1);

	fd = ferry_transport_open_incoming(uri, 1000, &err);
	ASSERT_GE(fd, 0);
	c = ferry_chan_new_fd(fd, FERRY_CHAN_READ, true);
	ASSERT_OK_E(ferry_load(dst.ctx, c, NULL, &err), err);
	ferry_chan_free(c);
	assert_same(&src, &dst);
	ASSERT_EQ(dst.ram.load_setups, 1);
	ASSERT_EQ(dst.ram.load_cleanups, 1);
	testvm_free(&src);
	testvm_free(&dst);
}

/* Live-style: pages dirtied between rounds end up in their final form. */
TEST(migration_precopy_rounds)
{
	struct testvm src, dst;
	struct ferry_error err = { 0 };
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	struct ferry_save *s;
	const uint8_t *d;
	uint64_t must, can, saved_digest = 0;
	size_t n;

	testvm_init(&src, true, 1 + test_rand());
	testvm_init(&dst, false, 0);
	s = ferry_save_begin(src.ctx, c, &err);
	ASSERT_PTR(s);
	ferry_save_pending(s, true, &must, &can);
	ASSERT_EQ(must, 64 * TRAM_PAGE);
	for (int round = 0; round < 5; round++) {
		ASSERT_OK_E(ferry_save_round(s, 16 * TRAM_PAGE, &err), err);
		/* The guest keeps writing. */
		for (int k = 0; k < 6; k++)
			tram_dirty(&src.ram, (uint32_t)(test_rand() % 64), test_rand());
	}
	ferry_save_pending(s, true, &must, &can);
	ASSERT_GT(must, 0);
	ASSERT_OK_E(ferry_save_complete(s, &err), err);
	{
		struct ferry_save_stats st = { .size = sizeof(st) };
		ferry_save_get_stats(s, &st);
		ASSERT_NE(st.device_digest, 0);
		ASSERT_GT(st.t_final_sync, 0);
		ASSERT_LE(st.t_final_sync, st.t_iterable_done);
		ASSERT_LE(st.t_iterable_done, st.t_done);
		saved_digest = st.device_digest;
	}
	ferry_save_end(s);
	/* 5 precopy rounds, and 1 more at switchover that drains the rest in
	 * a bounded PART before END. */
	ASSERT_EQ(src.ram.iterates, 6);
	d = ferry_chan_mem_data(c, &n);
	{
		struct ferry_load_stats ls = { .size = sizeof(ls) };
		struct ferry_load_opts lo = { .size = sizeof(lo), .stats = &ls };
		struct ferry_chan *r = ferry_chan_new_mem_reader(d, n);

		ASSERT_OK_E(ferry_load(dst.ctx, r, &lo, &err), err);
		ferry_chan_free(r);
		/* The device state loaded is the device state sent. */
		ASSERT_EQ_U64(ls.device_digest, saved_digest);
		ASSERT_GT(ls.t_eof, 0);
		ASSERT_LE(ls.t_first_full, ls.t_eof);
		ASSERT_EQ(ls.bytes, n);
	}
	assert_same(&src, &dst);
	/* START + 6 PART + END = 8 loads. */
	ASSERT_EQ(dst.ram.loads, 8);
	ferry_chan_free(c);
	testvm_free(&src);
	testvm_free(&dst);
}

struct cmdlog {
	int seen[FERRY_CMD__MAX];
	uint32_t ping;
	uint64_t hps, tps;
	char block[256];
	uint32_t nranges;
	uint64_t first_start, first_len;
};

static int on_cmd(void *opaque, const struct ferry_cmd_msg *m,
		  struct ferry_error *err)
{
	struct cmdlog *l = opaque;
	(void)err;
	l->seen[m->cmd]++;
	switch (m->cmd) {
	case FERRY_CMD_PING: l->ping = m->u.ping; break;
	case FERRY_CMD_POSTCOPY_ADVISE:
		l->hps = m->u.advise.host_page_size;
		l->tps = m->u.advise.target_page_size;
		break;
	case FERRY_CMD_POSTCOPY_DISCARD: {
		struct ferry_chan *c = ferry_chan_new_mem_reader(m->u.discard.ranges,
								 16 * m->u.discard.n);
		snprintf(l->block, sizeof(l->block), "%s", m->u.discard.block);
		l->nranges = m->u.discard.n;
		l->first_start = ferry_get_be64(c);
		l->first_len = ferry_get_be64(c);
		ferry_chan_free(c);
		break;
	}
	}
	return 0;
}

/* Every command reaches the destination decoded; PACKAGED nests records. */
TEST(migration_commands)
{
	struct testvm src, dst;
	struct ferry_error err = { 0 };
	struct ferry_chan *c = ferry_chan_new_mem_writer(0), *pkg;
	struct ferry_record_io pio;
	struct ferry_save *s;
	struct cmdlog log = { 0 };
	struct ferry_load_opts opts = { .size = sizeof(opts), .on_command = on_cmd,
					.opaque = &log };
	uint8_t adv[16] = { 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x10, 0 };
	uint8_t ping[4] = { 0xca, 0xfe, 0xba, 0xbe };
	uint8_t disc[4 + 4 + 32] = { 3, 'r', 'a', 'm', 0, 0, 0, 2,
				     0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0x30, 0 };
	const uint8_t *d;
	size_t n;

	testvm_init(&src, true, 7);
	testvm_init(&dst, false, 0);
	s = ferry_save_begin(src.ctx, c, &err);
	ASSERT_PTR(s);
	ASSERT_OK(ferry_save_command(s, FERRY_CMD_OPEN_RETURN_PATH, NULL, 0, &err));
	ASSERT_OK(ferry_save_command(s, FERRY_CMD_PING, ping, 4, &err));
	ASSERT_OK(ferry_save_command(s, FERRY_CMD_POSTCOPY_ADVISE, adv, 16, &err));
	ASSERT_OK(ferry_save_command(s, FERRY_CMD_POSTCOPY_DISCARD, disc, sizeof(disc), &err));
	/* LISTEN, then a package holding RUN, then EOF (this VM has no RAM:
	 * the package loads inline). */
	ASSERT_OK(ferry_save_command(s, FERRY_CMD_POSTCOPY_LISTEN, NULL, 0, &err));
	pkg = ferry_chan_new_mem_writer(0);
	memset(&pio, 0, sizeof(pio));
	pio.chan = pkg;
	{
		uint8_t r[2] = { 0, FERRY_CMD_POSTCOPY_RUN };
		ASSERT_OK(ferry_record_write(&pio, FERRY_REC_COMMAND, r, 2, NULL));
		ASSERT_OK(ferry_record_write(&pio, FERRY_REC_EOF, NULL, 0, NULL));
	}
	d = ferry_chan_mem_data(pkg, &n);
	ASSERT_OK(ferry_save_command(s, FERRY_CMD_PACKAGED, d, n, &err));
	ferry_chan_free(pkg);
	ASSERT_OK_E(ferry_save_round(s, 0, &err), err);
	ASSERT_OK_E(ferry_save_complete(s, &err), err);
	ferry_save_end(s);

	d = ferry_chan_mem_data(c, &n);
	{
		struct ferry_chan *r = ferry_chan_new_mem_reader(d, n);
		ASSERT_OK_E(ferry_load(dst.ctx, r, &opts, &err), err);
		ferry_chan_free(r);
	}
	assert_same(&src, &dst);
	ASSERT_EQ(log.seen[FERRY_CMD_OPEN_RETURN_PATH], 1);
	ASSERT_EQ(log.ping, 0xcafebabe);
	ASSERT_EQ(log.hps, 4096);
	ASSERT_EQ(log.tps, 4096);
	ASSERT_STREQ(log.block, "ram");
	ASSERT_EQ(log.nranges, 2);
	ASSERT_EQ(log.first_start, 0x2000);
	ASSERT_EQ(log.first_len, 0x3000);
	ASSERT_EQ(log.seen[FERRY_CMD_POSTCOPY_LISTEN], 1);
	ASSERT_EQ(log.seen[FERRY_CMD_POSTCOPY_RUN], 1);
	/* SWITCHOVER_START goes to the devices, and then to on_command (its
	 * handler syncs the multifd channels when the buffers go there). */
	ASSERT_EQ(log.seen[FERRY_CMD_SWITCHOVER_START], 1);

	/* Without a handler, postcopy commands are refused by name. */
	{
		struct testvm dst2;
		struct ferry_chan *r = ferry_chan_new_mem_reader(d, n);
		testvm_init(&dst2, false, 0);
		ferry_error_clear(&err);
		ASSERT_ERR(ferry_load(dst2.ctx, r, NULL, &err), -EOPNOTSUPP);
		ASSERT_CONTAINS(err.msg, "POSTCOPY_ADVISE");
		ferry_chan_free(r);
		testvm_free(&dst2);
	}
	ferry_chan_free(c);
	testvm_free(&src);
	testvm_free(&dst);
}

TEST(migration_save_failure_cleans_up)
{
	struct testvm src;
	struct ferry_error err = { 0 };
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);

	testvm_init(&src, true, 3);
	src.ram.fail_iterate = -EIO;
	ASSERT_ERR(ferry_save_all(src.ctx, c, 0, &err), -EIO);
	ASSERT_CONTAINS(err.msg, "section 'tram' instance 0 (SECTION_PART)");
	ASSERT_CONTAINS(err.msg, "injected iterate failure");
	ASSERT_EQ(src.ram.cleanups, 1);
	ferry_chan_free(c);
	testvm_free(&src);
}

TEST(migration_load_failure_names_section)
{
	struct testvm src, dst;
	struct ferry_error err = { 0 };
	uint8_t *d;
	size_t n;

	testvm_init(&src, true, 5);
	testvm_init(&dst, false, 0);
	d = testvm_save(&src, &n);
	dst.ram.fail_load = -EIO;
	ASSERT_ERR(load_buf(&dst, d, n, &err), -EIO);
	ASSERT_CONTAINS(err.msg, "section 'tram' instance 0");
	ASSERT_CONTAINS(err.msg, "injected load failure");
	ASSERT_EQ(dst.ram.load_cleanups, 1);
	free(d);
	testvm_free(&src);
	testvm_free(&dst);
}

TEST(migration_device_set_mismatch)
{
	struct testvm src, dst;
	struct ferry_error err = { 0 };
	struct tram extra;
	uint8_t *d;
	size_t n;

	testvm_init(&src, true, 5);
	d = testvm_save(&src, &n);

	/* Destination lacks a device the stream carries. */
	testvm_init(&dst, false, 0);
	ASSERT_OK(ferry_unregister(dst.ctx, "tregs", 0));
	ASSERT_ERR(load_buf(&dst, d, n, &err), -ENOENT);
	ASSERT_CONTAINS(err.msg, "section 'tregs' instance 0: no such device");
	testvm_free(&dst);

	/* Destination has a device the stream does not carry. */
	testvm_init(&dst, false, 0);
	tram_init(&extra, 2, 0);
	ASSERT_OK(ferry_register(dst.ctx, "tram", 1, 1, 1, &tram_ops, &extra, NULL));
	ferry_error_clear(&err);
	ASSERT_ERR(load_buf(&dst, d, n, &err), -ENODATA);
	ASSERT_CONTAINS(err.msg, "'tram' instance 1: no state in the stream");
	tram_free(&extra);
	testvm_free(&dst);

	/* Destination only accepts a newer version. */
	testvm_init(&dst, false, 0);
	ASSERT_OK(ferry_unregister(dst.ctx, "tram", 0));
	ASSERT_OK(ferry_register(dst.ctx, "tram", 0, 3, 2, &tram_ops, &dst.ram, NULL));
	ferry_error_clear(&err);
	ASSERT_ERR(load_buf(&dst, d, n, &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "version 1 outside [2, 3]");
	testvm_free(&dst);

	free(d);
	testvm_free(&src);
}

TEST(migration_registry_rules)
{
	struct ferry_error err = { 0 };
	struct ferry_ctx *ctx = ferry_ctx_new(NULL);
	struct tram t;
	static const struct ferry_dev_ops bad = { .size = sizeof(bad) };

	tram_init(&t, 1, 0);
	ASSERT_OK(ferry_register(ctx, "x", 0, 1, 1, &tram_ops, &t, &err));
	ASSERT_ERR(ferry_register(ctx, "x", 0, 1, 1, &tram_ops, &t, &err), -EEXIST);
	ASSERT_CONTAINS(err.msg, "already registered");
	ASSERT_ERR(ferry_register(ctx, "y", 0, 1, 1, &bad, &t, NULL), -EINVAL);
	ASSERT_ERR(ferry_register(ctx, "z", 0, 1, 2, &tram_ops, &t, NULL), -EINVAL);
	ASSERT_ERR(ferry_register(ctx, "", 0, 1, 1, &tram_ops, &t, NULL), -EINVAL);
	ASSERT_ERR(ferry_unregister(ctx, "nope", 0), -ENOENT);
	ferry_ctx_free(ctx);
	tram_free(&t);
}

/* No global state: two independent migrations at once, in two threads,
 * over pipes. */
struct pair {
	struct testvm src, dst;
	int fds[2];
	int save_ret, load_ret;
	struct ferry_error serr, lerr;
	pthread_t saver;
};

static void *saver_main(void *arg)
{
	struct pair *p = arg;
	struct ferry_chan *c = ferry_chan_new_fd(p->fds[1], FERRY_CHAN_WRITE, true);
	p->save_ret = ferry_save_all(p->src.ctx, c, 0, &p->serr);
	ferry_chan_free(c);
	return NULL;
}

static void *loader_main(void *arg)
{
	struct pair *p = arg;
	struct ferry_chan *c = ferry_chan_new_fd(p->fds[0], FERRY_CHAN_READ, true);
	p->load_ret = ferry_load(p->dst.ctx, c, NULL, &p->lerr);
	ferry_chan_free(c);
	return NULL;
}

TEST(migration_two_contexts_concurrently)
{
	struct pair p[2];
	pthread_t loaders[2];

	memset(p, 0, sizeof(p));
	for (int i = 0; i < 2; i++) {
		testvm_init(&p[i].src, true, 100 + (uint64_t)i);
		testvm_init(&p[i].dst, false, 0);
		ASSERT_OK(pipe(p[i].fds));
	}
	for (int i = 0; i < 2; i++) {
		ASSERT_OK(pthread_create(&p[i].saver, NULL, saver_main, &p[i]));
		ASSERT_OK(pthread_create(&loaders[i], NULL, loader_main, &p[i]));
	}
	for (int i = 0; i < 2; i++) {
		pthread_join(p[i].saver, NULL);
		pthread_join(loaders[i], NULL);
		ASSERT_OK_E(p[i].save_ret, p[i].serr);
		ASSERT_OK_E(p[i].load_ret, p[i].lerr);
		assert_same(&p[i].src, &p[i].dst);
		testvm_free(&p[i].src);
		testvm_free(&p[i].dst);
	}
}

/* Over a pipe, with a loader on the other end. */
static void pair_run(struct pair *p)
{
	pthread_t loader;

	ASSERT_OK(pipe(p->fds));
	ASSERT_OK(pthread_create(&p->saver, NULL, saver_main, p));
	ASSERT_OK(pthread_create(&loader, NULL, loader_main, p));
	pthread_join(p->saver, NULL);
	pthread_join(loader, NULL);
	ASSERT_OK_E(p->save_ret, p->serr);
	ASSERT_OK_E(p->load_ret, p->lerr);
	assert_same(&p->src, &p->dst);
}

/*
 * A device's configuration (its FULL section) loads only after all of its
 * data: the source writes it after the device's save thread is done, and
 * the destination waits for the device's load thread (slow here) before
 * loading it.
 */
TEST(migration_device_config_after_data)
{
	struct pair p;

	memset(&p, 0, sizeof(p));
	testvm_init(&p.src, true, 7);
	testvm_init(&p.dst, false, 0);
	p.src.blob.nbufs = 40;
	p.src.blob.bufsize = 64;
	p.dst.blob.load_delay_us = 2000;
	pair_run(&p);
	ASSERT(!p.dst.blob.config_before_data);
	testvm_free(&p.src);
	testvm_free(&p.dst);
}

/*
 * The switchover drains pending data in rounds, each flushing the main
 * channel, while a device's own thread appends buffers to it. Every byte
 * must reach the stream once, in record order (a flush racing an append
 * lost or repeated records).
 */
TEST(migration_flush_races_device_threads)
{
	struct pair p;

	memset(&p, 0, sizeof(p));
	testvm_init(&p.src, true, 9);
	testvm_init(&p.dst, false, 0);
	p.src.ram.redirty = 3000;
	p.src.blob.nbufs = 3000;
	p.src.blob.bufsize = 64;
	pair_run(&p);
	testvm_free(&p.src);
	testvm_free(&p.dst);
}
