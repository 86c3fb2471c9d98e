/*
 * tests/unit/test-multifd.c - RAM over parallel channels: precopy rounds
 * with rewrites (sync ordering), 1/2/4 channels, zstd, loopback TCP, device
 * state ordering, hostile handshakes and packets, a channel killed
 * mid-stream, and destination pre-population.
 */
#include "../harness.h"

#include <pthread.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <xxhash.h>

#include "ferry/ferry.h"
#include "ferry/multifd.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

#define PS 4096u

/* ---- a guest with a fake dirty log --------------------------------------- */

struct guest {
	uint8_t *mem[2];
	uint64_t npages[2];
	uint64_t *log[2];
	uint8_t *populated[2];
	bool tracking;
};

static void g_init(struct guest *g, uint64_t p0, uint64_t p1)
{
	memset(g, 0, sizeof(*g));
	g->npages[0] = p0;
	g->npages[1] = p1;
	for (int b = 0; b < 2; b++) {
		/* mmap: fresh, uncommitted memory, like a destination VM's. */
		g->mem[b] = mmap(NULL, p0 * PS > p1 * PS ? p0 * PS : p1 * PS,
				 PROT_READ | PROT_WRITE,
				 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		ASSERT(g->mem[b] != MAP_FAILED);
		g->log[b] = calloc((g->npages[b] + 63) / 64, 8);
		g->populated[b] = calloc(g->npages[b], 1);
	}
}

static void g_free(struct guest *g)
{
	for (int b = 0; b < 2; b++) {
		munmap(g->mem[b], (g->npages[0] > g->npages[1] ? g->npages[0]
						: g->npages[1]) * PS);
		free(g->log[b]);
		free(g->populated[b]);
	}
}

/* Write page content: random, or all zero (a populated zero page). This
 * plays the guest, whose writes race the migration's copies by design, so
 * ThreadSanitizer must not see them (as it cannot see a KVM guest's). */
#if defined(__SANITIZE_THREAD__)
__attribute__((no_sanitize_thread))
#endif
static void g_write(struct guest *g, unsigned b, uint64_t page, bool zero)
{
	uint64_t *p = (uint64_t *)(g->mem[b] + page * PS);
	uint64_t v = test_rand();

	/* Odd pages random, even pages compressible (one word repeated). */
	for (unsigned i = 0; i < PS / 8; i++)
		p[i] = zero ? 0 : page % 2 ? v ^ (i * 0x9e3779b97f4a7c15ull) : v;
	g->populated[b][page] = 1;
	if (g->tracking)
		__atomic_fetch_or(&g->log[b][page / 64], 1ull << (page % 64),
				  __ATOMIC_RELAXED);
}

static int g_start(void *o, struct ferry_error *e)
{
	(void)e;
	((struct guest *)o)->tracking = true;
	return 0;
}

static int g_sync(void *o, unsigned b, uint64_t *bm, struct ferry_error *e)
{
	struct guest *g = o;
	(void)e;
	for (uint64_t w = 0; w < (g->npages[b] + 63) / 64; w++)
		bm[w] |= __atomic_exchange_n(&g->log[b][w], 0, __ATOMIC_RELAXED);
	return 0;
}

static void g_stop(void *o)
{
	((struct guest *)o)->tracking = false;
}

static int g_populated(void *o, unsigned b, uint64_t *bm, struct ferry_error *e)
{
	struct guest *g = o;
	(void)e;
	for (uint64_t p = 0; p < g->npages[b]; p++)
		if (g->populated[b][p])
			bm[p / 64] |= 1ull << (p % 64);
	return 0;
}

static const struct ferry_ram_dirty_ops g_ops = {
	.size = sizeof(struct ferry_ram_dirty_ops),
	.start = g_start, .sync = g_sync, .stop = g_stop, .populated = g_populated,
};

static struct ferry_ram *g_ram(struct guest *g, bool src)
{
	struct ferry_error err = { 0 };
	struct ferry_ram_block blocks[2] = {
		{ "pc.ram", g->mem[0], g->npages[0] * PS, PS },
		{ "hi.ram", g->mem[1], g->npages[1] * PS, PS },
	};
	struct ferry_ram *ram = ferry_ram_new(blocks, 2, src ? &g_ops : NULL, g,
					      &err);
	if (!ram)
		FAIL("ferry_ram_new: %s", err.msg);
	return ram;
}

/* Random, zero and never-populated pages. */
static void g_fill(struct guest *g)
{
	for (unsigned b = 0; b < 2; b++)
		for (uint64_t p = 0; p < g->npages[b]; p++) {
			unsigned k = (unsigned)(test_rand() % 8);
			if (k < 5)
				g_write(g, b, p, false);
			else if (k == 5)
				g_write(g, b, p, true);
			/* else: never touched */
		}
}

/* ---- a destination load thread -------------------------------------------- */

struct dest {
	struct guest g;
	struct ferry_ram *ram;
	struct ferry_ctx *ctx;
	struct ferry_multifd *mf;
	int main_fd;
	pthread_t thread;
	int ret;
	struct ferry_error err;
};

static void *dest_main(void *arg)
{
	struct dest *d = arg;
	struct ferry_chan *in = ferry_chan_new_fd(d->main_fd, FERRY_CHAN_READ, true);

	d->ret = ferry_load(d->ctx, in, NULL, &d->err);
	ferry_chan_free(in);
	return NULL;
}

/* Channel fds: fds[i][0] source end, fds[i][1] destination end. */
static void socketpairs(int (*fds)[2], unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds[i]));
}

static void dest_start(struct dest *d, unsigned channels, const int *chan_fds,
		       int main_fd)
{
	struct ferry_multifd_params p = { .size = sizeof(p), .channels = channels };

	d->ram = g_ram(&d->g, false);
	d->ctx = ferry_ctx_new(NULL);
	ASSERT_OK_E(ferry_ram_register(d->ram, d->ctx, &d->err), d->err);
	if (channels) {
		d->mf = ferry_multifd_recv_new(&p, &d->err);
		ASSERT_PTR(d->mf);
		ASSERT_OK_E(ferry_ram_set_multifd_recv(d->ram, d->mf, &d->err), d->err);
		/* Accept order need not be channel order. */
		for (unsigned i = channels; i-- > 0;)
			ASSERT_OK_E(ferry_multifd_recv_add_channel(d->mf, chan_fds[i],
								  &d->err), d->err);
	}
	d->main_fd = main_fd;
	ASSERT_OK(pthread_create(&d->thread, NULL, dest_main, d));
}

static void dest_finish(struct dest *d)
{
	pthread_join(d->thread, NULL);
	ferry_multifd_free(d->mf);
	ferry_ctx_free(d->ctx);
	ferry_ram_free(d->ram);
}

/* @n channel socketpairs plus the main one: source ends in @sfds and
 * main[0], destination ends in @dfds and main[1]. */
static void unix_links(unsigned n, int *sfds, int *dfds, int main[2])
{
	int fds[FERRY_MULTIFD_MAX_CHANNELS][2];

	socketpairs(fds, n);
	ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, main));
	for (unsigned i = 0; i < n; i++) {
		sfds[i] = fds[i][0];
		dfds[i] = fds[i][1];
	}
}

/* The source side: @g's RAM registered, multifd on @chan_fds attached,
 * the save begun on @main_fd. The test ends the save and frees `out`. */
struct src {
	struct ferry_ram *ram;
	struct ferry_ctx *ctx;
	struct ferry_multifd *mf;
	struct ferry_chan *out;
	struct ferry_save *s;
};

static void src_begin(struct src *S, struct guest *g,
		      const struct ferry_multifd_params *p, const int *chan_fds,
		      int main_fd)
{
	struct ferry_error err = { 0 };

	S->ram = g_ram(g, true);
	S->ctx = ferry_ctx_new(NULL);
	ASSERT_OK_E(ferry_ram_register(S->ram, S->ctx, &err), err);
	S->mf = ferry_multifd_send_new(p, chan_fds, &err);
	if (!S->mf)
		FAIL("multifd_send_new: %s", err.msg);
	ASSERT_OK_E(ferry_ram_set_multifd_send(S->ram, S->mf, &err), err);
	S->out = ferry_chan_new_fd(main_fd, FERRY_CHAN_WRITE, true);
	S->s = ferry_save_begin(S->ctx, S->out, &err);
	if (!S->s)
		FAIL("save_begin: %s", err.msg);
}

static void src_free(struct src *S)
{
	ferry_multifd_free(S->mf);
	ferry_ctx_free(S->ctx);
	ferry_ram_free(S->ram);
}

/*
 * A live migration: precopy rounds over @channels channels while the
 * "guest" rewrites a hot set of pages every round (the same pages are in
 * flight in consecutive rounds, on different channels: without the sync
 * points an older copy could land last), then switchover. The destination
 * must end byte-identical.
 */
/* Pages per packet the source uses in precopy() (0 = its default); the
 * destination keeps its own default whatever the source picks. */
static uint32_t src_packet_pages;

static void precopy(unsigned channels, enum ferry_multifd_compression comp,
		    bool tcp, uint64_t budget)
{
	struct guest src;
	struct dest d = { 0 };
	struct ferry_error err = { 0 };
	struct ferry_multifd_params p = { .size = sizeof(p), .channels = channels,
					  .compression = comp,
					  .packet_pages = src_packet_pages };
	int mainfd[2];
	int sfds[FERRY_MULTIFD_MAX_CHANNELS], dfds[FERRY_MULTIFD_MAX_CHANNELS];
	struct ferry_multifd_stats ms;
	struct ferry_ram_stats st;
	struct src S;

	g_init(&src, 3000, 200);
	g_init(&d.g, 3000, 200);
	g_fill(&src);
	/* Destination garbage where the source has a zero page. */
	g_write(&src, 0, 11, true);
	memset(d.g.mem[0] + 11 * PS, 0xee, PS);

	if (tcp) {
		struct ferry_listener *l = ferry_transport_listen("tcp:127.0.0.1:0",
								  &err);
		ASSERT_PTR(l);
		for (unsigned i = 0; i <= channels; i++) {
			int c = ferry_transport_connect(ferry_listener_uri(l), 5000,
							&err);
			int a = ferry_listener_accept(l, 5000, &err);
			ASSERT_GE(c, 0);
			ASSERT_GE(a, 0);
			if (i == channels) {
				mainfd[0] = c;
				mainfd[1] = a;
			} else {
				sfds[i] = c;
				dfds[i] = a;
			}
		}
		ferry_listener_close(l);
	} else {
		unix_links(channels, sfds, dfds, mainfd);
	}
	dest_start(&d, channels, dfds, mainfd[1]);
	src_begin(&S, &src, &p, sfds, mainfd[0]);
	for (int round = 0; round < 16; round++) {
		uint64_t must, can;

		ferry_save_pending(S.s, true, &must, &can);
		ASSERT_OK_E(ferry_save_round(S.s, budget, &err), err);
		/* Hot set: rewritten every round. */
		for (uint64_t pg = 0; pg < 512; pg++)
			g_write(&src, 0, pg, pg % 17 == (uint64_t)round);
		for (int k = 0; k < 200; k++)
			g_write(&src, (unsigned)(test_rand() % 2),
				test_rand() % 200, test_rand() % 5 == 0);
	}
	ASSERT_OK_E(ferry_save_complete(S.s, &err), err);
	ferry_save_end(S.s);
	ferry_chan_free(S.out);
	dest_finish(&d);
	ASSERT_OK_E(d.ret, d.err);

	ASSERT_MEMEQ(d.g.mem[0], src.mem[0], 3000ull * PS);
	ASSERT_MEMEQ(d.g.mem[1], src.mem[1], 200ull * PS);
	ferry_ram_get_stats(S.ram, &st);
	ferry_multifd_get_stats(S.mf, &ms);
	ASSERT_GE(st.multifd_syncs, 2);  /* at least one pass + END */
	ASSERT_EQ_U64(ms.syncs, st.multifd_syncs);
	ASSERT_GT(ms.zero_pages, 0);
	ASSERT_GT(ms.normal_pages, 3000 / 2);
	for (unsigned i = 0; i < channels; i++)
		ASSERT_GT(ms.chan[i].packets, 0);
	if (comp == FERRY_MULTIFD_COMP_ZSTD)
		ASSERT_LT(ms.payload_bytes, ms.raw_bytes);
	else
		ASSERT_EQ_U64(ms.payload_bytes, ms.raw_bytes);
	if (test_rand() % 2 == 0 && getenv("FERRY_TEST_VERBOSE"))
		printf("normal %llu zero %llu syncs %llu\n",
		       (unsigned long long)ms.normal_pages,
		       (unsigned long long)ms.zero_pages,
		       (unsigned long long)ms.syncs);
	src_free(&S);
	g_free(&src);
	g_free(&d.g);
}

TEST(multifd_precopy_1ch)
{
	precopy(1, FERRY_MULTIFD_COMP_NONE, false, 0);
}

TEST(multifd_precopy_2ch)
{
	precopy(2, FERRY_MULTIFD_COMP_NONE, false, 0);
}

TEST(multifd_precopy_4ch)
{
	precopy(4, FERRY_MULTIFD_COMP_NONE, false, 0);
}

/* Budgeted rounds: walks span several iterate calls and save_complete
 * restarts a walk that is not finished (the extra sync point). */
TEST(multifd_precopy_4ch_budget)
{
	precopy(4, FERRY_MULTIFD_COMP_NONE, false, 700 * PS);
}

TEST(multifd_precopy_1ch_zstd)
{
	precopy(1, FERRY_MULTIFD_COMP_ZSTD, false, 0);
}

TEST(multifd_precopy_2ch_zstd)
{
	precopy(2, FERRY_MULTIFD_COMP_ZSTD, false, 1000 * PS);
}

TEST(multifd_precopy_4ch_zstd)
{
	precopy(4, FERRY_MULTIFD_COMP_ZSTD, false, 0);
}

TEST(multifd_precopy_tcp)
{
	precopy(2, FERRY_MULTIFD_COMP_NONE, true, 0);
	precopy(4, FERRY_MULTIFD_COMP_ZSTD, true, 500 * PS);
}

/* The packet size is the source's to choose (its handshake says it): a
 * destination with the default of 128 pages takes 512 and 1024. */
TEST(multifd_source_packet_size)
{
	src_packet_pages = 512;
	precopy(2, FERRY_MULTIFD_COMP_NONE, false, 0);
	src_packet_pages = FERRY_MULTIFD_PACKET_PAGES_MAX;
	precopy(1, FERRY_MULTIFD_COMP_ZSTD, false, 0);
}

/* ---- device state ---------------------------------------------------------- */

#define DS_DEVS 3
#define DS_BUFS 300

struct ds_log {
	uint32_t next[DS_DEVS];
	unsigned calls;
};

static int ds_cb(void *o, const char *idstr, uint32_t instance, const void *buf,
		 size_t len, struct ferry_error *err)
{
	struct ds_log *l = o;
	uint32_t v[2];

	if (strcmp(idstr, "dev") || instance >= DS_DEVS || len < 8)
		return ferry_error_set(err, -EINVAL, "unexpected '%s' %u", idstr,
				       instance);
	memcpy(v, buf, 8);
	/* The buffer carries its device and number: order must be exact. */
	if (v[0] != instance || v[1] != l->next[instance])
		return ferry_error_set(err, -EBADMSG, "dev %u: got %u, expected %u",
				       instance, v[1], l->next[instance]);
	for (size_t i = 8; i < len; i++)
		if (((const uint8_t *)buf)[i] != (uint8_t)(v[1] + i))
			return ferry_error_set(err, -EBADMSG, "dev %u buffer %u damaged",
					       instance, v[1]);
	l->next[instance]++;
	l->calls++;
	return 0;
}

struct ds_sender {
	struct ferry_multifd *m;
	uint32_t dev;
	pthread_t t;
};

static void *ds_send_main(void *arg)
{
	struct ds_sender *s = arg;
	uint8_t *buf = malloc(70000);
	struct ferry_error err = { 0 };
	/* A private generator: test_rand() is not thread-safe. */
	uint64_t x = test_seed ^ (s->dev + 1) * 0x9e3779b97f4a7c15ull;

	for (uint32_t i = 0; i < DS_BUFS; i++) {
		size_t len;

		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		len = 8 + (size_t)(x % 60000);
		uint32_t v[2] = { s->dev, i };

		memcpy(buf, v, 8);
		for (size_t k = 8; k < len; k++)
			buf[k] = (uint8_t)(i + k);
		if (ferry_multifd_send_devstate(s->m, "dev", s->dev, 0, buf, len, &err))
			FAIL("send_devstate: %s", err.msg);
	}
	free(buf);
	return NULL;
}

struct syncer {
	struct ferry_multifd *m;
	int ret;
	struct ferry_error err;
	pthread_t t;
};

static void *sync_main(void *arg)
{
	struct syncer *s = arg;
	s->ret = ferry_multifd_recv_sync(s->m, &s->err);
	return NULL;
}

static uint8_t dummy_block[16 * PS] __attribute__((aligned(4096)));

static struct ferry_multifd *recv_for(unsigned channels, const uint8_t *session,
				      void *cb_opaque)
{
	struct ferry_error err = { 0 };
	struct ferry_multifd_params p = { .size = sizeof(p), .channels = channels,
					  .devstate = cb_opaque ? ds_cb : NULL,
					  .opaque = cb_opaque };
	struct ferry_ram_block blk = { "b", dummy_block, sizeof(dummy_block), PS };
	struct ferry_multifd *m;

	if (session)
		memcpy(p.session, session, 16);
	m = ferry_multifd_recv_new(&p, &err);
	ASSERT_PTR(m);
	ASSERT_OK_E(ferry_multifd_set_blocks(m, &blk, 1, &err), err);
	return m;
}

TEST(multifd_devstate_in_order)
{
	static const uint8_t session[16] = "devstate-test-01";
	struct ferry_multifd_params p = { .size = sizeof(p), .channels = 4 };
	struct ferry_error err = { 0 };
	struct ferry_multifd_stats st;
	struct ferry_multifd *src, *dst;
	struct ds_sender snd[DS_DEVS];
	struct ds_log log = { { 0 } };
	struct syncer sy = { 0 };
	int fds[4][2], sfds[4];
	struct ferry_ram_block blk = { "b", dummy_block, sizeof(dummy_block), PS };

	socketpairs(fds, 4);
	memcpy(p.session, session, 16);
	dst = recv_for(4, session, &log);
	for (unsigned i = 0; i < 4; i++) {
		sfds[i] = fds[i][0];
		ASSERT_OK_E(ferry_multifd_recv_add_channel(dst, fds[i][1], &err), err);
	}
	src = ferry_multifd_send_new(&p, sfds, &err);
	ASSERT_PTR(src);
	ASSERT_OK_E(ferry_multifd_set_blocks(src, &blk, 1, &err), err);
	sy.m = dst;
	ASSERT_OK(pthread_create(&sy.t, NULL, sync_main, &sy));
	/* Three devices at once, interleaved with some pages. */
	for (uint32_t i = 0; i < DS_DEVS; i++) {
		snd[i] = (struct ds_sender){ .m = src, .dev = i };
		ASSERT_OK(pthread_create(&snd[i].t, NULL, ds_send_main, &snd[i]));
	}
	for (uint64_t pg = 0; pg < 16; pg++)
		ASSERT_OK_E(ferry_multifd_queue_page(src, 0, pg * PS, &err), err);
	for (uint32_t i = 0; i < DS_DEVS; i++)
		pthread_join(snd[i].t, NULL);
	ASSERT_OK_E(ferry_multifd_send_sync(src, &err), err);
	pthread_join(sy.t, NULL);
	ASSERT_OK_E(sy.ret, sy.err);
	ASSERT_EQ(log.calls, DS_DEVS * DS_BUFS);
	for (uint32_t i = 0; i < DS_DEVS; i++)
		ASSERT_EQ(log.next[i], DS_BUFS);
	ferry_multifd_get_stats(dst, &st);
	ASSERT_EQ(st.devstate_packets, DS_DEVS * DS_BUFS);
	ASSERT_EQ(st.syncs, 1);
	/* Oversized buffers are refused at the source, not on the wire. */
	ASSERT_ERR(ferry_multifd_send_devstate(src, "dev", 0, 0, dummy_block,
					       FERRY_MULTIFD_DEVSTATE_MAX + 1ull,
					       NULL), -EMSGSIZE);
	ferry_multifd_free(src);
	ferry_multifd_free(dst);
}

/* ---- hostile input ------------------------------------------------------- */

static const uint8_t SESSION[16] = "0123456789abcdef";

static void be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

static void be64(uint8_t *p, uint64_t v)
{
	be32(p, (uint32_t)(v >> 32));
	be32(p + 4, (uint32_t)v);
}

/* A handshake as docs/stream-format.md describes it. */
static size_t hs(uint8_t *b, const uint8_t *session, uint32_t id, uint32_t nch,
		 uint32_t comp, uint32_t magic)
{
	memset(b, 0, 64);
	be32(b, magic);
	be32(b + 4, 1);
	memcpy(b + 8, session, 16);
	be32(b + 24, id);
	be32(b + 28, nch);
	be32(b + 32, comp << 1);
	be32(b + 36, 128);
	be64(b + 56, XXH3_64bits_withSeed(b, 56, 0));
	return 64;
}

/* Put the check into the @n-byte packet at @b: XXH3-64 seeded with the
 * channel id over header bytes 0..39, then everything after the header. */
static size_t seal(uint8_t *b, uint32_t chan, size_t n)
{
	XXH3_state_t *x = XXH3_createState();

	XXH3_64bits_reset_withSeed(x, chan);
	XXH3_64bits_update(x, b, 40);
	XXH3_64bits_update(x, b + 48, n - 48);
	be64(b + 40, XXH3_64bits_digest(x));
	XXH3_freeState(x);
	return n;
}

/* A RAM packet: offsets, then the payload. */
static size_t pkt(uint8_t *b, uint32_t chan, uint32_t flags, uint32_t block,
		  uint64_t num, uint32_t nn, uint32_t nz, const uint64_t *offs,
		  const void *payload, uint32_t plen)
{
	size_t n = 48;

	memset(b, 0, 48);
	be32(b, FERRY_MULTIFD_PACKET_MAGIC);
	be32(b + 4, 1);
	be32(b + 8, flags);
	be32(b + 12, block);
	be64(b + 16, num);
	be32(b + 24, nn);
	be32(b + 28, nz);
	be32(b + 32, plen);
	for (uint32_t i = 0; i < nn + nz; i++, n += 8)
		be64(b + n, offs[i]);
	if (plen)
		memcpy(b + n, payload, plen);
	n += plen;
	return seal(b, chan, n);
}

/* A DEVICE_STATE packet: the header's block field is the instance, its
 * two counts are the name length and the buffer's sequence number. */
static size_t dspkt(uint8_t *b, uint32_t chan, uint64_t num, const char *idstr,
		    uint32_t instance, uint32_t seq, const void *data,
		    uint32_t len)
{
	size_t il = strlen(idstr), n = 48;

	memset(b, 0, 48);
	be32(b, FERRY_MULTIFD_PACKET_MAGIC);
	be32(b + 4, 1);
	be32(b + 8, FERRY_MULTIFD_FLAG_DEVICE_STATE);
	be32(b + 12, instance);
	be64(b + 16, num);
	be32(b + 24, (uint32_t)il);
	be32(b + 28, seq);
	be32(b + 32, len);
	memcpy(b + n, idstr, il);
	n += il;
	if (len)
		memcpy(b + n, data, len);
	n += len;
	return seal(b, chan, n);
}

static void put_all(int fd, const void *buf, size_t len)
{
	while (len) {
		ssize_t w = send(fd, buf, len, MSG_NOSIGNAL);
		/* The receiver may reject early and hang up: that is fine. */
		if (w < 0 && errno == EPIPE)
			return;
		if (w <= 0)
			FAIL("write: %s", strerror(errno));
		buf = (const uint8_t *)buf + w;
		len -= (size_t)w;
	}
}

/* The device-state callback's opaque of expect_reject's destination
 * (NULL: it takes no device state). */
static void *reject_cb;

/* Feed @a (and @b on a second connection if set) to a destination; its
 * next sync point must fail with @code and a message containing @needle. */
static void expect_reject(const uint8_t *a, size_t alen, const uint8_t *b,
			  size_t blen, int code, const char *needle)
{
	struct ferry_error err = { 0 };
	unsigned n = b ? 2 : 1;
	struct ferry_multifd *m = recv_for(n, SESSION, reject_cb);
	int fds[2][2];

	socketpairs(fds, n);
	for (unsigned i = 0; i < n; i++)
		ASSERT_OK_E(ferry_multifd_recv_add_channel(m, fds[i][1], &err), err);
	put_all(fds[0][0], a, alen);
	if (b)
		put_all(fds[1][0], b, blen);
	/* The end of the stream, so a truncated packet is seen as one. (Not
	 * with two connections: an ended channel would race the verdict on
	 * the other one.) */
	if (n == 1)
		shutdown(fds[0][0], SHUT_WR);
	ASSERT_ERR(ferry_multifd_recv_sync(m, &err), code);
	ASSERT_CONTAINS(err.msg, needle);
	ASSERT_CONTAINS(err.msg, "multifd: ");
	ASSERT_ERR(ferry_multifd_error(m, NULL), code);
	ferry_multifd_free(m);
	for (unsigned i = 0; i < n; i++)
		close(fds[i][0]);
}

TEST(multifd_hostile_handshake)
{
	uint8_t a[128], b[128];
	static const uint8_t other[16] = "another-session!";

	hs(a, SESSION, 0, 1, 0, 0x51454d55);
	expect_reject(a, 64, NULL, 0, -EBADMSG, "bad handshake magic");
	hs(a, other, 0, 1, 0, FERRY_MULTIFD_MAGIC);
	expect_reject(a, 64, NULL, 0, -EPERM, "another migration");
	hs(a, SESSION, 1, 2, 0, FERRY_MULTIFD_MAGIC);
	hs(b, SESSION, 1, 2, 0, FERRY_MULTIFD_MAGIC);
	expect_reject(a, 64, b, 64, -EEXIST, "duplicate channel id 1");
	hs(a, SESSION, 0, 3, 0, FERRY_MULTIFD_MAGIC);
	expect_reject(a, 64, NULL, 0, -EINVAL, "expects 1 channels");
	hs(a, SESSION, 0, 1, 0, FERRY_MULTIFD_MAGIC);
	a[20] ^= 1;
	expect_reject(a, 64, NULL, 0, -EBADMSG, "handshake check mismatch");
	hs(a, SESSION, 0, 1, 0, FERRY_MULTIFD_MAGIC);
	be32(a + 4, 9);
	expect_reject(a, 64, NULL, 0, -EPROTONOSUPPORT, "handshake version 9");
	hs(a, SESSION, 0, 1, 0, FERRY_MULTIFD_MAGIC);
	expect_reject(a, 30, NULL, 0, -EBADMSG, "handshake truncated");
	hs(a, SESSION, 0, 1, 7, FERRY_MULTIFD_MAGIC);
	expect_reject(a, 64, NULL, 0, -EBADMSG, "unknown flags");
}

/* Device-state buffers that never become deliverable (buffer 0 never
 * comes) are held only up to a count, not just up to a byte total: empty
 * ones cost nothing in bytes and would otherwise pile up without end. */
TEST(multifd_devstate_reorder_bounded)
{
	const unsigned n = FERRY_MULTIFD_REORDER_MAX_BUFFERS + 8;
	uint8_t *buf = malloc(64 + (size_t)n * 64);
	struct ds_log log = { { 0 } };
	size_t len;

	ASSERT_PTR(buf);
	len = hs(buf, SESSION, 0, 1, 0, FERRY_MULTIFD_MAGIC);
	for (unsigned i = 0; i < n; i++)
		len += dspkt(buf + len, 0, i, "dev", 0, i + 1, NULL, 0);
	reject_cb = &log;
	expect_reject(buf, len, NULL, 0, -ENOBUFS, "out of order");
	reject_cb = NULL;
	ASSERT_EQ(log.calls, 0);
	free(buf);
}

TEST(multifd_hostile_packets)
{
	static uint8_t buf[64 + 2 * (48 + 200 * 8 + 200 * PS)];
	static uint8_t page[200 * PS];
	uint64_t offs[200];
	size_t n;

	for (unsigned i = 0; i < 200; i++)
		offs[i] = (uint64_t)(i % 16) * PS;
	memset(page, 0x42, sizeof(page));
	/* A good packet, then a bad one in each case. */
#define START() (n = hs(buf, SESSION, 0, 1, 0, FERRY_MULTIFD_MAGIC), \
		 n += pkt(buf + n, 0, 0, 0, 0, 1, 1, offs, page, PS))

	START();
	n += pkt(buf + n, 0, 0, 0, 1, 2, 0, offs, page, 2 * PS);
	buf[n - 5] ^= 0x10;
	expect_reject(buf, n, NULL, 0, -EBADMSG, "packet 1: check mismatch");

	START();
	offs[16] = 16 * PS;   /* one past the end of the 16-page block */
	n += pkt(buf + n, 0, 0, 0, 1, 1, 0, offs + 16, page, PS);
	expect_reject(buf, n, NULL, 0, -ERANGE, "page offset 0x10000 outside");
	offs[16] = 0;

	START();
	offs[3] = 3 * PS + 8;  /* unaligned */
	n += pkt(buf + n, 0, 0, 0, 1, 0, 4, offs, NULL, 0);
	expect_reject(buf, n, NULL, 0, -ERANGE, "or unaligned");
	offs[3] = 3 * PS;

	START();
	n += pkt(buf + n, 0, 0, 0, 1, 129, 0, offs, page, 129 * PS);
	expect_reject(buf, n, NULL, 0, -EBADMSG, "at most 128 per packet");

	START();
	n += pkt(buf + n, 0, 0, 0, 1, 0, 200, offs, NULL, 0);
	expect_reject(buf, n, NULL, 0, -EBADMSG, "0 + 200 pages");

	START();
	n += pkt(buf + n, 0, 0, 0, 1, 2, 0, offs, page, 2 * PS);
	expect_reject(buf, n - 100, NULL, 0, -EBADMSG, "truncated packet 1");

	START();
	expect_reject(buf, n + 20, NULL, 0, -EBADMSG, "truncated packet 1 (header");

	START();
	n += pkt(buf + n, 0, 0, 0, 1, 2, 0, offs, page, 3 * PS);
	expect_reject(buf, n, NULL, 0, -EBADMSG, "payload of 12288 bytes for 2");

	START();
	n += pkt(buf + n, 0, 0, 5, 1, 1, 0, offs, page, PS);
	expect_reject(buf, n, NULL, 0, -EBADMSG, "RAM block 5 of 1");

	START();
	n += pkt(buf + n, 0, 0, 0, 7, 1, 0, offs, page, PS);
	expect_reject(buf, n, NULL, 0, -EBADMSG, "packet number 7, expected 1");

	START();
	n += pkt(buf + n, 0, 0, 0, 1, 1, 0, offs, page, PS);
	be32(buf + n - 48 - 8 - PS, 0x11223344);
	expect_reject(buf, n, NULL, 0, -EBADMSG, "bad magic 0x11223344");

	START();
	n += pkt(buf + n, 0, 0x80, 0, 1, 1, 0, offs, page, PS);
	expect_reject(buf, n, NULL, 0, -EBADMSG, "flags 0x80");

	START();  /* compression kind the channel did not announce */
	n += pkt(buf + n, 0, 2, 0, 1, 1, 0, offs, page, PS);
	expect_reject(buf, n, NULL, 0, -EBADMSG, "compression 1, channel uses 0");

	START();  /* a SYNC carrying pages */
	n += pkt(buf + n, 0, FERRY_MULTIFD_FLAG_SYNC, 0, 1, 1, 0, offs, page, PS);
	expect_reject(buf, n, NULL, 0, -EBADMSG, "SYNC packet with pages");

	START();  /* device state nobody takes */
	n += pkt(buf + n, 0, FERRY_MULTIFD_FLAG_DEVICE_STATE, 0, 1, 0, 0, offs,
		 "abc", 3);
	expect_reject(buf, n, NULL, 0, -EBADMSG, "malformed device-state");

	/* zstd: a payload that passes its check but is not a zstd frame. */
	n = hs(buf, SESSION, 0, 1, 1, FERRY_MULTIFD_MAGIC);
	n += pkt(buf + n, 0, 2, 0, 0, 1, 0, offs, page, 100);
	expect_reject(buf, n, NULL, 0, -EBADMSG, "does not decode");

	/* A clean EOF between packets is fine until a sync point needs it. */
	START();
	expect_reject(buf, n, NULL, 0, -EPIPE, "closed by the source before");
#undef START
}

/* The good packets of the test above really apply. */
TEST(multifd_handcrafted_packets_apply)
{
	static uint8_t buf[4096 + 4 * PS];
	struct ferry_error err = { 0 };
	struct ferry_multifd *m = recv_for(1, SESSION, NULL);
	uint64_t offs[3] = { 2 * PS, 5 * PS, 9 * PS };
	uint8_t page[2 * PS];
	int fds[1][2];
	size_t n;

	memset(page, 0x42, PS);
	memset(page + PS, 0x43, PS);
	memset(dummy_block, 0x99, sizeof(dummy_block));
	socketpairs(fds, 1);
	ASSERT_OK_E(ferry_multifd_recv_add_channel(m, fds[0][1], &err), err);
	n = hs(buf, SESSION, 0, 1, 0, FERRY_MULTIFD_MAGIC);
	n += pkt(buf + n, 0, 0, 0, 0, 2, 1, offs, page, 2 * PS);
	n += pkt(buf + n, 0, FERRY_MULTIFD_FLAG_SYNC, 0, 1, 0, 0, NULL, NULL, 0);
	put_all(fds[0][0], buf, n);
	ASSERT_OK_E(ferry_multifd_recv_sync(m, &err), err);
	ASSERT_EQ(dummy_block[2 * PS], 0x42);
	ASSERT_EQ(dummy_block[6 * PS - 1], 0x43);
	ASSERT_EQ(dummy_block[9 * PS + 7], 0);
	ASSERT_EQ(dummy_block[8 * PS], 0x99);
	ferry_multifd_free(m);
	close(fds[0][0]);
}

/* ---- main-stream side of multifd and pre-population ---------------------- */

static int load_start(const uint8_t *body, size_t len, bool with_mf,
		      struct ferry_error *err)
{
	struct guest g;
	struct ferry_ctx *ctx;
	struct ferry_ram *ram;
	struct ferry_multifd *m = NULL;
	struct ferry_chan *c = ferry_chan_new_mem_writer(0), *b, *r;
	struct ferry_record_io io = { .chan = c };
	const uint8_t *d;
	size_t n;
	int ret;

	g_init(&g, 4, 2);
	ram = g_ram(&g, false);
	ctx = ferry_ctx_new(NULL);
	ASSERT_OK(ferry_ram_register(ram, ctx, NULL));
	if (with_mf) {
		struct ferry_multifd_params p = { .size = sizeof(p), .channels = 2 };
		m = ferry_multifd_recv_new(&p, NULL);
		ASSERT_OK(ferry_ram_set_multifd_recv(ram, m, NULL));
	}
	ferry_stream_write_header(c, NULL);
	b = ferry_chan_new_mem_writer(0);
	ferry_put_be32(b, 1);
	ferry_put_str8(b, "ram");
	ferry_put_be32(b, 0);
	ferry_put_be32(b, 2);
	ferry_put_be32(b, 2);
	ferry_put_str8(b, "pc.ram");
	ferry_put_be64(b, 4 * PS);
	ferry_put_be32(b, PS);
	ferry_put_str8(b, "hi.ram");
	ferry_put_be64(b, 2 * PS);
	ferry_put_be32(b, PS);
	ferry_put_buf(b, body, len);
	d = ferry_chan_mem_data(b, &n);
	ferry_record_write(&io, FERRY_REC_SECTION_START, d, n, NULL);
	ferry_chan_free(b);
	b = ferry_chan_new_mem_writer(0);
	ferry_put_be32(b, 1);
	ferry_put_be64(b, FERRY_RAM_EOS);
	d = ferry_chan_mem_data(b, &n);
	ferry_record_write(&io, FERRY_REC_SECTION_END, d, n, NULL);
	ferry_chan_free(b);
	ferry_record_write(&io, FERRY_REC_EOF, NULL, 0, NULL);
	d = ferry_chan_mem_data(c, &n);
	r = ferry_chan_new_mem_reader(d, n);
	ret = ferry_load(ctx, r, NULL, err);
	ferry_chan_free(r);
	ferry_chan_free(c);
	ferry_ctx_free(ctx);
	ferry_multifd_free(m);
	ferry_ram_free(ram);
	g_free(&g);
	return ret;
}

TEST(multifd_ram_start_hostile)
{
	uint8_t b[256];
	struct ferry_error err = { 0 };

#define POP(blk, n) (be64(b, FERRY_RAM_POPULATED), be32(b + 8, blk), be32(b + 12, n))
	/* Good: two ranges in block 0, one in block 1. */
	POP(0, 2);
	be64(b + 16, 0); be64(b + 24, 1); be64(b + 32, 2); be64(b + 40, 2);
	be64(b + 48, FERRY_RAM_POPULATED); be32(b + 56, 1); be32(b + 60, 1);
	be64(b + 64, 0); be64(b + 72, 2);
	be64(b + 80, FERRY_RAM_EOS);
	ASSERT_OK_E(load_start(b, 88, false, &err), err);

	/* Range past the end of the block. */
	POP(0, 1);
	be64(b + 16, 3); be64(b + 24, 2); be64(b + 32, FERRY_RAM_EOS);
	ASSERT_ERR(load_start(b, 40, false, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "outside the block (4 pages)");
	ferry_error_clear(&err);
	/* Out of order / overlapping. */
	POP(0, 2);
	be64(b + 16, 2); be64(b + 24, 1); be64(b + 32, 1); be64(b + 40, 1);
	be64(b + 48, FERRY_RAM_EOS);
	ASSERT_ERR(load_start(b, 56, false, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "out of order");
	ferry_error_clear(&err);
	/* Unknown block, and an absurd count. */
	POP(7, 1);
	ASSERT_ERR(load_start(b, 16, false, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "no such block");
	ferry_error_clear(&err);
	POP(0, 0xffffffffu);
	ASSERT_ERR(load_start(b, 16, false, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "populated ranges (1..");
	ferry_error_clear(&err);
	/* Count says more than the section holds. */
	POP(0, 3);
	ASSERT_ERR(load_start(b, 16, false, &err), -EBADMSG);
	ferry_error_clear(&err);
	/* Multifd announced to a destination without channels. */
	be64(b, FERRY_RAM_MULTIFD);
	memcpy(b + 8, SESSION, 16);
	be32(b + 24, 2); be32(b + 28, 0); be64(b + 32, FERRY_RAM_EOS);
	ASSERT_ERR(load_start(b, 40, false, &err), -EOPNOTSUPP);
	ASSERT_CONTAINS(err.msg, "no multifd channels");
	ferry_error_clear(&err);
	/* ... or with another channel count. */
	be32(b + 24, 3);
	ASSERT_ERR(load_start(b, 40, true, &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "the source uses 3 channels");
	ferry_error_clear(&err);
	/* Unknown setup record. */
	be64(b, 0x400);
	be64(b + 8, FERRY_RAM_EOS);
	ASSERT_ERR(load_start(b, 16, false, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "not terminated (record 0x400)");
#undef POP
}

/* MULTIFD_FLUSH in a stream that announced no channels. */
TEST(multifd_flush_without_channels)
{
	struct guest g;
	struct ferry_error err = { 0 };
	struct ferry_ctx *ctx;
	struct ferry_ram *ram;
	struct ferry_chan *c = ferry_chan_new_mem_writer(0), *b, *r;
	struct ferry_record_io io = { .chan = c };
	const uint8_t *d;
	size_t n;

	g_init(&g, 4, 2);
	ram = g_ram(&g, false);
	ctx = ferry_ctx_new(NULL);
	ASSERT_OK(ferry_ram_register(ram, ctx, NULL));
	ferry_stream_write_header(c, NULL);
	b = ferry_chan_new_mem_writer(0);
	ferry_put_be32(b, 1);
	ferry_put_str8(b, "ram");
	ferry_put_be32(b, 0);
	ferry_put_be32(b, 2);
	ferry_put_be32(b, 2);
	ferry_put_str8(b, "pc.ram");
	ferry_put_be64(b, 4 * PS);
	ferry_put_be32(b, PS);
	ferry_put_str8(b, "hi.ram");
	ferry_put_be64(b, 2 * PS);
	ferry_put_be32(b, PS);
	ferry_put_be64(b, FERRY_RAM_EOS);
	d = ferry_chan_mem_data(b, &n);
	ferry_record_write(&io, FERRY_REC_SECTION_START, d, n, NULL);
	ferry_chan_free(b);
	b = ferry_chan_new_mem_writer(0);
	ferry_put_be32(b, 1);
	ferry_put_be64(b, FERRY_RAM_MULTIFD_FLUSH);
	ferry_put_be64(b, FERRY_RAM_EOS);
	d = ferry_chan_mem_data(b, &n);
	ferry_record_write(&io, FERRY_REC_SECTION_END, d, n, NULL);
	ferry_chan_free(b);
	ferry_record_write(&io, FERRY_REC_EOF, NULL, 0, NULL);
	d = ferry_chan_mem_data(c, &n);
	r = ferry_chan_new_mem_reader(d, n);
	ASSERT_ERR(ferry_load(ctx, r, NULL, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "multifd sync point, but no multifd");
	ferry_chan_free(r);
	ferry_chan_free(c);
	ferry_ctx_free(ctx);
	ferry_ram_free(ram);
	g_free(&g);
}

/* ---- failure mid-stream --------------------------------------------------- */

/*
 * After a first round, the destination end of channel 1 is shut down (a
 * cut connection). Both sides must fail, promptly and with a message.
 */
TEST(multifd_channel_killed)
{
	struct guest src;
	struct dest d = { 0 };
	struct ferry_error err = { 0 };
	struct ferry_multifd_params p = { .size = sizeof(p), .channels = 2 };
	int mainfd[2], sfds[2], dfds[2], r = 0;
	struct src S;

	g_init(&src, 4096, 16);
	g_init(&d.g, 4096, 16);
	g_fill(&src);
	unix_links(2, sfds, dfds, mainfd);
	dest_start(&d, 2, dfds, mainfd[1]);
	src_begin(&S, &src, &p, sfds, mainfd[0]);
	ASSERT_OK_E(ferry_save_round(S.s, 0, &err), err);
	shutdown(dfds[1], SHUT_RDWR);
	for (int round = 0; round < 20 && !r; round++) {
		uint64_t must, can;
		for (uint64_t pg = 0; pg < 4096; pg++)
			g_write(&src, 0, pg, false);
		ferry_save_pending(S.s, true, &must, &can);
		r = ferry_save_round(S.s, 0, &err);
	}
	if (!r)
		r = ferry_save_complete(S.s, &err);
	ASSERT_LT(r, 0);
	ASSERT_CONTAINS(err.msg, "multifd: channel");
	ferry_save_end(S.s);
	/* What a VMM does when its migration fails: drop the connections. */
	ferry_chan_free(S.out);
	ferry_multifd_free(S.mf);
	S.mf = NULL;
	dest_finish(&d);
	ASSERT_LT(d.ret, 0);
	ASSERT(d.err.msg[0]);
	src_free(&S);
	g_free(&src);
	g_free(&d.g);
}

/* ---- pre-population ------------------------------------------------------ */

static bool resident(void *base, uint64_t page)
{
	unsigned char v = 0;

	ASSERT_OK(mincore((uint8_t *)base + page * PS, PS, &v));
	return v & 1;
}

/*
 * The START section lists the populated ranges; the destination faults
 * exactly those in ahead of the data, and never-touched pages stay
 * uncommitted (not resident) on the destination.
 */
TEST(multifd_prepopulate_ranges)
{
	struct guest src;
	struct dest d = { 0 };
	struct ferry_error err = { 0 };
	struct ferry_multifd_params p = { .size = sizeof(p), .channels = 2 };
	int mainfd[2], sfds[2], dfds[2];
	struct ferry_ram_stats st;
	struct src S;
	uint64_t pop = 0;
	struct timespec ts = { 0, 200 * 1000 * 1000 };

	if (sysconf(_SC_PAGESIZE) != PS)
		SKIP("host page size is not 4 KiB");
	g_init(&src, 4096, 64);
	g_init(&d.g, 4096, 64);
	/* Runs of populated pages with holes; a few populated zero pages. */
	for (uint64_t pg = 0; pg < 4096; pg++)
		if ((pg / 100) % 3 != 1) {
			g_write(&src, 0, pg, pg % 50 == 7);
			pop++;
		}
	unix_links(2, sfds, dfds, mainfd);
	dest_start(&d, 2, dfds, mainfd[1]);
	src_begin(&S, &src, &p, sfds, mainfd[0]);
	ferry_chan_flush(S.out);
	/* Give the helpers a head start, so the count below is exact. */
	nanosleep(&ts, NULL);
	ASSERT_OK_E(ferry_save_complete(S.s, &err), err);
	ferry_save_end(S.s);
	ferry_chan_free(S.out);
	pthread_join(d.thread, NULL);
	ASSERT_OK_E(d.ret, d.err);
	ferry_ram_get_stats(d.ram, &st);
	ASSERT_EQ_U64(st.prepopulated, pop * PS);
	/* Residency first: comparing reads pages (and maps the zero page). */
	for (uint64_t pg = 0; pg < 4096; pg++)
		if (resident(d.g.mem[0], pg) != ((pg / 100) % 3 != 1))
			FAIL("page %llu: resident %d", (unsigned long long)pg,
			     resident(d.g.mem[0], pg));
	for (uint64_t pg = 0; pg < 64; pg++)
		ASSERT(!resident(d.g.mem[1], pg));
	ASSERT_MEMEQ(d.g.mem[0], src.mem[0], 4096ull * PS);
	ferry_multifd_free(d.mf);
	ferry_ctx_free(d.ctx);
	ferry_ram_free(d.ram);
	src_free(&S);
	g_free(&src);
	g_free(&d.g);
}

/* Without multifd (main stream only) pre-population works the same, and
 * switching it off on the destination commits nothing ahead. */
TEST(ram_prepopulate_main_stream)
{
	struct guest src, dst;
	struct ferry_error err = { 0 };
	struct ferry_ctx *sctx, *dctx;
	struct ferry_ram *sram, *dram;
	struct ferry_ram_stats st;
	struct ferry_chan *c = ferry_chan_new_mem_writer(0), *r;
	const uint8_t *d;
	size_t n;

	g_init(&src, 512, 8);
	g_init(&dst, 512, 8);
	for (uint64_t pg = 0; pg < 256; pg++)
		g_write(&src, 0, pg, false);
	sram = g_ram(&src, true);
	sctx = ferry_ctx_new(NULL);
	ASSERT_OK(ferry_ram_register(sram, sctx, NULL));
	ASSERT_OK_E(ferry_save_all(sctx, c, 0, &err), err);
	d = ferry_chan_mem_data(c, &n);

	dram = g_ram(&dst, false);
	dctx = ferry_ctx_new(NULL);
	ASSERT_OK(ferry_ram_register(dram, dctx, NULL));
	ferry_ram_set_prepopulate(dram, 0);
	r = ferry_chan_new_mem_reader(d, n);
	ASSERT_OK_E(ferry_load(dctx, r, NULL, &err), err);
	ferry_chan_free(r);
	ferry_ram_get_stats(dram, &st);
	ASSERT_EQ(st.prepopulated, 0);
	for (uint64_t pg = 256; pg < 512; pg++)
		ASSERT(!resident(dst.mem[0], pg));
	ASSERT_MEMEQ(dst.mem[0], src.mem[0], 512ull * PS);
	ferry_chan_free(c);
	ferry_ctx_free(sctx);
	ferry_ctx_free(dctx);
	ferry_ram_free(sram);
	ferry_ram_free(dram);
	g_free(&src);
	g_free(&dst);
}
