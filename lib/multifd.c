/*
 * multifd.c - RAM pages and device state over parallel sockets.
 *
 * Layout of the work (see include/ferry/multifd.h for the contract):
 *
 * Source. Every channel has one job slot and a state:
 *   IDLE      the slot is empty; anyone may reserve it (under lock)
 *   RESERVED  a producer owns the slot and is filling it (no lock needed);
 *             a device-state sender owns the whole channel and writes its
 *             packet on the socket itself (packet number and check state
 *             included: the channel thread touches them only when QUEUED)
 *   QUEUED    the channel thread owns it and is writing it out
 * The migration thread fills m->fill (its own job) with offsets only; when
 * it is full it swaps it with an IDLE channel's empty slot - a pointer swap,
 * no page is touched in the migration thread. The channel thread copies the
 * pages into its staging buffer *first*: the guest keeps running and the
 * check must cover exactly the bytes sent. A page written after the copy
 * has its dirty bit set again and goes in a later round.
 *
 * Destination. One thread per socket reads a packet into its own buffers,
 * verifies everything (lengths against caps before reading, the check
 * before applying, every offset against the block), then copies the pages
 * into guest memory. Zero pages are written only if the destination page
 * is not zero already, so untouched memory stays uncommitted.
 *
 * Locks: m->lock guards channel states, sync counters, the error, the
 * handshake bookkeeping and the source's device sequence table; m->ds_lock
 * guards the destination's device-state reorder table and serialises the
 * devstate callback. Never take lock while holding ds_lock. Statistics are
 * relaxed atomics. Buffers marked "channel thread" are touched by that
 * thread only. No socket is closed before its thread is joined, so
 * shutdown(2) from another thread never hits a reused fd.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <xxhash.h>
#include <zstd.h>

#include "ferry/multifd.h"
#include "internal.h"
#include "tls.h"

enum ch_state { CH_IDLE, CH_RESERVED, CH_QUEUED };
/* Device state is not a job: its sender writes it on a reserved channel
 * itself (ferry_multifd_send_devstate). */
enum job_kind { JOB_RAM, JOB_SYNC };

struct job {
	enum job_kind kind;
	uint32_t block;             /* RAM */
	uint32_t n;                 /* RAM: pages queued */
	uint64_t *offs;             /* RAM: packet_pages entries */
};

struct mf_chan {
	struct ferry_multifd *m;
	unsigned idx;               /* slot; equals the channel id on the source */
	int fd;                     /* set before the thread starts; closed in free */
	struct ferry_tls_conn *tls; /* with the fd, when TLS is on; freed with it */
	pthread_t thread;
	bool started;
	pthread_cond_t work;        /* source: a job was queued (or quit) */

	/* Guarded by m->lock. */
	enum ch_state state;        /* source */
	struct job *job;            /* source: the slot */
	uint64_t syncs_done;        /* source: SYNC packets written */
	bool at_sync;               /* destination: waiting at a sync point */
	bool ended;                 /* destination: clean EOF between packets */
	bool hs_ok;                 /* destination: handshake accepted */
	bool hs_sent;               /* source: handshake written */

	/* Channel thread only. */
	unsigned id;                /* channel id from the handshake */
	unsigned comp;              /* compression kind of this channel */
	uint64_t pkt_num;           /* next packet number */
	uint8_t *stage;             /* raw pages (both sides) */
	size_t stage_cap;
	uint8_t *zbuf;              /* compressed payload (both sides) */
	size_t zcap;
	uint64_t *wire;             /* be64 offsets as on the wire */
	uint64_t *zoffs;            /* source: zero-page offsets */
	size_t offs_cap;            /* entries in wire / zoffs */
	XXH3_state_t *xxh;
	ZSTD_CCtx *cctx;
	ZSTD_DCtx *dctx;

	/* Relaxed atomics, read by anyone. */
	uint64_t bytes, packets;
};

struct ds_pending {
	struct ds_pending *next;    /* sorted by seq */
	uint32_t seq;
	size_t len;
	uint8_t data[];
};

struct ds_dev {
	char idstr[FERRY_IDSTR_MAX + 1];
	uint32_t instance;
	uint32_t next_seq;
	struct ds_pending *pend;    /* destination: arrived early */
};

struct mf_block {
	uint8_t *host;
	uint64_t size;
	uint32_t page_size;
	uint32_t ppp;               /* pages per packet for this block */
	uint64_t *recv_map;         /* destination: bit per page placed
				       (atomic words), or NULL */
};

struct ferry_multifd {
	bool source;                /* immutable */
	struct ferry_multifd_params p; /* immutable (normalised copy) */
	unsigned nch;               /* immutable: params.channels */

	/* Set once before any page moves (ferry_multifd_set_blocks). */
	struct mf_block blk[FERRY_RAM_MAX_BLOCKS];
	unsigned nblocks;

	pthread_mutex_t lock;
	pthread_cond_t cv;          /* state changes: idle, sync, error */
	struct mf_chan ch[FERRY_MULTIFD_MAX_CHANNELS];
	unsigned nadded;            /* lock: destination channels added */
	int error;                  /* lock: first error code */
	struct ferry_error err;     /* lock: its message */
	bool quit;                  /* lock: free() in progress */
	unsigned rr;                /* lock: round-robin start for idle search */

	/* Source: migration thread only. */
	struct job *fill;
	struct job jobs[FERRY_MULTIFD_MAX_CHANNELS + 1];
	uint64_t sync_target;       /* lock */

	/* Device sequence tables. Source: under lock. Destination: ds_lock. */
	pthread_mutex_t ds_lock;
	struct ds_dev *devs;
	unsigned ndevs;
	size_t reorder_bytes;       /* ds_lock: charged bytes held out of order */
	unsigned reorder_count;     /* ds_lock: buffers held out of order */

	/* Destination handshake bookkeeping (lock). */
	bool session_known;         /* from params, a handshake or the stream */
	uint32_t ids_seen;          /* bit per channel id */
	int hs_comp;                /* -1 until the first handshake */
	uint32_t hs_pkt_pages;
	int expect_comp;            /* -1 until ferry_multifd_recv_expect */
	unsigned arrived;           /* channels at the current sync point */
	uint64_t release_gen;       /* bumped when a sync point is released */

	/* Relaxed atomics. */
	uint64_t normal_pages, zero_pages, raw_bytes, payload_bytes, syncs;
	uint64_t ds_packets, ds_bytes;
};

/* ---- small helpers ------------------------------------------------------- */

static void stat_add(uint64_t *c, uint64_t v)
{
	__atomic_fetch_add(c, v, __ATOMIC_RELAXED);
}

/* Pages of @page_size per packet of @packet_pages 4 KiB pages' worth of
 * bytes: blocks with larger pages get fewer, at least one. */
static uint32_t block_ppp(uint64_t packet_pages, uint32_t page_size)
{
	uint64_t ppp = packet_pages * 4096 / page_size;

	return ppp ? (uint32_t)ppp : 1;
}

/* Grow a channel-thread buffer; contents are not preserved. */
static int grow(uint8_t **buf, size_t *cap, size_t need)
{
	uint8_t *n;

	if (need <= *cap)
		return 0;
	n = malloc(need);
	if (!n)
		return -ENOMEM;
	free(*buf);
	*buf = n;
	*cap = need;
	return 0;
}

/* All of @iov, or -errno. MSG_NOSIGNAL: a vanished peer is EPIPE here, not
 * a SIGPIPE that kills the VMM. With @timeout_ms, a peer that takes
 * nothing for that long is -ETIMEDOUT (sockets only). */
static int write_iov(struct mf_chan *c, struct iovec *iov, int n, int timeout_ms)
{
	int fd = c->fd;

	if (c->tls)
		return ferry__tls_writev(c->tls, iov, n, timeout_ms);
	while (n > 0) {
		struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
		ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL);

		if (w < 0 && errno == ENOTSOCK)
			w = writev(fd, iov, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			/* SO_SNDTIMEO expired without progress. */
			if ((errno == EAGAIN || errno == EWOULDBLOCK) &&
			    timeout_ms > 0)
				return -ETIMEDOUT;
			return -errno;
		}
		ferry__iov_advance(&iov, &n, (size_t)w);
	}
	return 0;
}

void ferry__iov_advance(struct iovec **iov, int *n, size_t w)
{
	while (*n > 0 && w >= (*iov)->iov_len) {
		w -= (*iov)->iov_len;
		(*iov)++;
		(*n)--;
	}
	if (*n > 0) {
		(*iov)->iov_base = (uint8_t *)(*iov)->iov_base + w;
		(*iov)->iov_len -= w;
	}
}

/* Read exactly @len bytes. Returns len, the bytes read before EOF (< len),
 * or -errno. */
static ssize_t read_full(struct mf_chan *c, void *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		/* TLS: no read timeout here either; a shutdown ends the wait. */
		ssize_t r = c->tls ? ferry__tls_read(c->tls, (uint8_t *)buf + got,
						     len - got, 0)
			  : read(c->fd, (uint8_t *)buf + got, len - got);
		if (r < 0 && c->tls) {
			errno = (int)-r;
			r = -1;
		}
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			break;
		got += (size_t)r;
	}
	return (ssize_t)got;
}

/* ---- errors -------------------------------------------------------------- */

static void shutdown_all_locked(struct ferry_multifd *m)
{
	for (unsigned i = 0; i < FERRY_MULTIFD_MAX_CHANNELS; i++)
		if (m->ch[i].fd >= 0)
			shutdown(m->ch[i].fd, SHUT_RDWR);
}

static void wake_all_locked(struct ferry_multifd *m)
{
	pthread_cond_broadcast(&m->cv);
	for (unsigned i = 0; i < FERRY_MULTIFD_MAX_CHANNELS; i++)
		pthread_cond_broadcast(&m->ch[i].work);
}

/*
 * Record the first error, wake every waiter and shut every socket down so
 * threads blocked in read/write return. Returns the recorded first code, so
 * callers report the root cause rather than its echo.
 */
static int mf_fail(struct ferry_multifd *m, int code, const char *fmt, ...)
	FERRY_PRINTF(3, 4);
static int mf_fail(struct ferry_multifd *m, int code, const char *fmt, ...)
{
	va_list ap;
	int r;

	ferry__mutex_lock(&m->lock);
	if (!m->error) {
		va_start(ap, fmt);
		ferry_error_setv(&m->err, code, fmt, ap);
		va_end(ap);
		ferry_error_prefix(&m->err, "multifd: ");
		m->error = code;
		wake_all_locked(m);
		shutdown_all_locked(m);
	}
	r = m->error;
	ferry__mutex_unlock(&m->lock);
	return r;
}

static int report_locked(struct ferry_multifd *m, struct ferry_error *err)
{
	if (m->error)
		ferry_error_propagate(err, &m->err);
	return m->error;
}

int ferry_multifd_error(struct ferry_multifd *m, struct ferry_error *err)
{
	int r;

	ferry__mutex_lock(&m->lock);
	r = report_locked(m, err);
	ferry__mutex_unlock(&m->lock);
	return r;
}

void ferry_multifd_cancel(struct ferry_multifd *m, int code, const char *why)
{
	mf_fail(m, code < 0 ? code : -ECANCELED, "%s",
		why ? why : "cancelled");
}

/* ---- creation / teardown -------------------------------------------------- */

static struct ferry_multifd *mf_alloc(const struct ferry_multifd_params *up,
				      bool source, struct ferry_error *err)
{
	struct ferry_multifd_params pc, *p = NULL;
	struct ferry_multifd *m;

	if (up && !ferry__copy_sized(&pc, sizeof(pc), up,
				     "ferry_multifd_params", err))
		p = &pc;
	else if (up)
		return NULL;
	if (!p || !p->channels || p->channels > FERRY_MULTIFD_MAX_CHANNELS) {
		ferry_error_set(err, -EINVAL, "multifd: %u channels (1..%u allowed)",
				p ? p->channels : 0, FERRY_MULTIFD_MAX_CHANNELS);
		return NULL;
	}
	if (p->compression > FERRY_MULTIFD_COMP_ZSTD ||
	    p->packet_pages > FERRY_MULTIFD_PACKET_PAGES_MAX) {
		ferry_error_set(err, -EINVAL,
			"multifd: unknown compression %u or more than %u pages "
			"per packet", (unsigned)p->compression,
			FERRY_MULTIFD_PACKET_PAGES_MAX);
		return NULL;
	}
	m = calloc(1, sizeof(*m));
	if (!m) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	m->source = source;
	m->p = *p;
	if (!m->p.packet_pages)
		m->p.packet_pages = FERRY_MULTIFD_PACKET_PAGES_DEFAULT;
	if (!m->p.zstd_level)
		m->p.zstd_level = 1;
	m->nch = p->channels;
	m->hs_comp = -1;
	m->expect_comp = -1;
	pthread_mutex_init(&m->lock, NULL);
	pthread_mutex_init(&m->ds_lock, NULL);
	pthread_cond_init(&m->cv, NULL);
	for (unsigned i = 0; i < FERRY_MULTIFD_MAX_CHANNELS; i++) {
		m->ch[i].m = m;
		m->ch[i].idx = i;
		m->ch[i].fd = -1;
		pthread_cond_init(&m->ch[i].work, NULL);
	}
	return m;
}

static int chan_alloc_common(struct mf_chan *c)
{
	c->xxh = XXH3_createState();
	return c->xxh ? 0 : -ENOMEM;
}

void ferry_multifd_free(struct ferry_multifd *m)
{
	bool busy = false;

	if (!m)
		return;
	ferry__mutex_lock(&m->lock);
	m->quit = true;
	for (unsigned i = 0; i < m->nch; i++)
		busy |= m->ch[i].state != CH_IDLE;
	wake_all_locked(m);
	/* Receivers sit in read(); a source with work in flight may sit in
	 * write(). An idle source's data is already in the kernel and its
	 * sockets are closed normally, so the peer gets all of it. */
	if (!m->source || busy || m->error)
		shutdown_all_locked(m);
	ferry__mutex_unlock(&m->lock);
	/* Every thread first: until the last one is gone, any of them may
	 * still fail and wake (or shut down) every channel, so no condition
	 * variable is destroyed and no socket closed before that. */
	for (unsigned i = 0; i < FERRY_MULTIFD_MAX_CHANNELS; i++)
		if (m->ch[i].started)
			pthread_join(m->ch[i].thread, NULL);
	for (unsigned i = 0; i < FERRY_MULTIFD_MAX_CHANNELS; i++) {
		struct mf_chan *c = &m->ch[i];

		ferry__tls_unref(c->tls);
		if (c->fd >= 0)
			close(c->fd);
		free(c->stage);
		free(c->zbuf);
		free(c->wire);
		free(c->zoffs);
		XXH3_freeState(c->xxh);
		ZSTD_freeCCtx(c->cctx);
		ZSTD_freeDCtx(c->dctx);
		pthread_cond_destroy(&c->work);
	}
	for (unsigned i = 0; i < FERRY_MULTIFD_MAX_CHANNELS + 1; i++) {
		free(m->jobs[i].offs);
	}
	for (unsigned i = 0; i < m->ndevs; i++)
		while (m->devs[i].pend) {
			struct ds_pending *p = m->devs[i].pend;
			m->devs[i].pend = p->next;
			free(p);
		}
	free(m->devs);
	pthread_cond_destroy(&m->cv);
	pthread_mutex_destroy(&m->lock);
	pthread_mutex_destroy(&m->ds_lock);
	free(m);
}

void ferry_multifd_session(const struct ferry_multifd *m, uint8_t out[16])
{
	memcpy(out, m->p.session, 16);
}

unsigned ferry_multifd_channels(const struct ferry_multifd *m)
{
	return m->nch;
}

unsigned ferry_multifd_compression(const struct ferry_multifd *m)
{
	return (unsigned)m->p.compression;
}

void ferry__multifd_track(struct ferry_multifd *m, unsigned bi, uint64_t *map)
{
	ferry__mutex_lock(&m->lock);
	if (bi < m->nblocks)
		m->blk[bi].recv_map = map;
	ferry__mutex_unlock(&m->lock);
}

int ferry_multifd_set_blocks(struct ferry_multifd *m,
			     const struct ferry_ram_block *blocks,
			     unsigned nblocks, struct ferry_error *err)
{
	int r = 0;

	if (!nblocks || nblocks > FERRY_RAM_MAX_BLOCKS)
		return ferry_error_set(err, -EINVAL, "multifd: %u RAM blocks",
				       nblocks);
	ferry__mutex_lock(&m->lock);
	if (m->nblocks || m->nadded) {
		r = ferry_error_set(err, -EBUSY,
			"multifd: block table set twice or after channels");
		goto out;
	}
	for (unsigned i = 0; i < nblocks; i++) {
		uint32_t ps = blocks[i].page_size;
		uint64_t ppp;

		if (!blocks[i].host || ps < 4096 || (ps & (ps - 1)) ||
		    !blocks[i].size || blocks[i].size % ps) {
			r = ferry_error_set(err, -EINVAL,
				"multifd: RAM block %u is malformed", i);
			goto out;
		}
		ppp = block_ppp(m->p.packet_pages, ps);
		m->blk[i] = (struct mf_block){ blocks[i].host, blocks[i].size,
					       ps, (uint32_t)ppp };
	}
	m->nblocks = nblocks;
out:
	ferry__mutex_unlock(&m->lock);
	return r;
}

/* ---- source: packets out ------------------------------------------------- */

static int send_handshake(struct mf_chan *c)
{
	struct ferry_multifd *m = c->m;
	uint8_t hs[FERRY_MULTIFD_HANDSHAKE_SIZE] = { 0 };
	struct iovec iov = { hs, sizeof(hs) };
	int r;

	ferry__put_be32(hs, FERRY_MULTIFD_MAGIC);
	ferry__put_be32(hs + 4, FERRY_MULTIFD_VERSION);
	memcpy(hs + 8, m->p.session, 16);
	ferry__put_be32(hs + 24, c->idx);
	ferry__put_be32(hs + 28, m->nch);
	ferry__put_be32(hs + 32, (uint32_t)m->p.compression << 1);
	ferry__put_be32(hs + 36, m->p.packet_pages);
	ferry__put_be64(hs + 56, XXH3_64bits_withSeed(hs, 56, 0));
	r = write_iov(c, &iov, 1, (int)m->p.timeout_ms);
	if (r)
		return mf_fail(m, r, "channel %u: writing the handshake: %s",
			       c->idx, strerror(-r));
	stat_add(&c->bytes, sizeof(hs));
	return 0;
}

/* Header bytes 0..39; the check goes in 40..47. */
static void fill_header(uint8_t *h, uint32_t flags, uint32_t block,
			uint64_t num, uint32_t a, uint32_t b, uint32_t payload)
{
	memset(h, 0, FERRY_MULTIFD_HEADER_SIZE);
	ferry__put_be32(h, FERRY_MULTIFD_PACKET_MAGIC);
	ferry__put_be32(h + 4, FERRY_MULTIFD_VERSION);
	ferry__put_be32(h + 8, flags);
	ferry__put_be32(h + 12, block);
	ferry__put_be64(h + 16, num);
	ferry__put_be32(h + 24, a);
	ferry__put_be32(h + 28, b);
	ferry__put_be32(h + 32, payload);
}

static int send_packet(struct mf_chan *c, uint8_t *h, const void *meta,
		       size_t mlen, const void *payload, size_t plen)
{
	struct iovec iov[3] = {
		{ h, FERRY_MULTIFD_HEADER_SIZE },
		{ (void *)meta, mlen },
		{ (void *)payload, plen },
	};
	int r;

	XXH3_64bits_reset_withSeed(c->xxh, c->id);
	XXH3_64bits_update(c->xxh, h, 40);
	XXH3_64bits_update(c->xxh, meta, mlen);
	XXH3_64bits_update(c->xxh, payload, plen);
	ferry__put_be64(h + 40, XXH3_64bits_digest(c->xxh));
	r = write_iov(c, iov, 3, (int)c->m->p.timeout_ms);
	if (r == -ETIMEDOUT)
		return mf_fail(c->m, r, "channel %u: the destination took no data "
			       "for %u ms (packet %llu)", c->id,
			       c->m->p.timeout_ms, (unsigned long long)c->pkt_num);
	if (r)
		return mf_fail(c->m, r, "channel %u: write failed at packet %llu: %s",
			       c->id, (unsigned long long)c->pkt_num, strerror(-r));
	c->pkt_num++;
	stat_add(&c->bytes, FERRY_MULTIFD_HEADER_SIZE + mlen + plen);
	stat_add(&c->packets, 1);
	return 0;
}

static int send_ram(struct mf_chan *c, struct job *j)
{
	struct ferry_multifd *m = c->m;
	const struct mf_block *b = &m->blk[j->block];
	uint32_t ps = b->page_size, nn = 0, nz = 0;
	uint8_t h[FERRY_MULTIFD_HEADER_SIZE];
	const void *payload;
	size_t plen;

	if (grow(&c->stage, &c->stage_cap, (size_t)j->n * ps))
		return mf_fail(m, -ENOMEM, "out of memory");
	/* Snapshot first: the guest may write while we look. */
	for (uint32_t i = 0; i < j->n; i++) {
		uint8_t *dst = c->stage + (size_t)nn * ps;

		memcpy(dst, b->host + j->offs[i], ps);
		if (ferry__page_is_zero(dst, ps))
			c->zoffs[nz++] = j->offs[i];
		else
			ferry__put_be64((uint8_t *)&c->wire[nn++], j->offs[i]);
	}
	for (uint32_t i = 0; i < nz; i++)
		ferry__put_be64((uint8_t *)&c->wire[nn + i], c->zoffs[i]);
	payload = c->stage;
	plen = (size_t)nn * ps;
	if (c->comp == FERRY_MULTIFD_COMP_ZSTD && nn) {
		size_t bound = ZSTD_compressBound(plen), z;

		if (grow(&c->zbuf, &c->zcap, bound))
			return mf_fail(m, -ENOMEM, "out of memory");
		z = ZSTD_compressCCtx(c->cctx, c->zbuf, c->zcap, c->stage, plen,
				      m->p.zstd_level);
		if (ZSTD_isError(z))
			return mf_fail(m, -EIO, "channel %u: zstd: %s", c->id,
				       ZSTD_getErrorName(z));
		payload = c->zbuf;
		plen = z;
	}
	fill_header(h, c->comp << 1, j->block, c->pkt_num, nn, nz,
		    (uint32_t)plen);
	stat_add(&m->normal_pages, nn);
	stat_add(&m->zero_pages, nz);
	stat_add(&m->raw_bytes, (uint64_t)nn * ps);
	stat_add(&m->payload_bytes, plen);
	return send_packet(c, h, c->wire, (size_t)(nn + nz) * 8, payload, plen);
}

static int send_job(struct mf_chan *c, struct job *j)
{
	uint8_t h[FERRY_MULTIFD_HEADER_SIZE];

	switch (j->kind) {
	case JOB_RAM:
		return send_ram(c, j);
	case JOB_SYNC:
		fill_header(h, FERRY_MULTIFD_FLAG_SYNC | c->comp << 1, 0,
			    c->pkt_num, 0, 0, 0);
		return send_packet(c, h, NULL, 0, NULL, 0);
	}
	return -EINVAL;
}

static void *send_main(void *arg)
{
	struct mf_chan *c = arg;
	struct ferry_multifd *m = c->m;

	/* The write timeout is the socket's own (SO_SNDTIMEO): a blocking
	 * send that gives up after that long without progress. Cheaper than
	 * non-blocking sends and a poll per packet, whose wake-ups cost dear
	 * under nested virtualisation (a channel's throughput fell by a
	 * third). */
	if (m->p.timeout_ms) {
		struct timeval tv = { .tv_sec = m->p.timeout_ms / 1000,
			.tv_usec = (suseconds_t)(m->p.timeout_ms % 1000) * 1000 };

		setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	}
	if (send_handshake(c))
		return NULL;
	ferry__mutex_lock(&m->lock);
	c->hs_sent = true;
	pthread_cond_broadcast(&m->cv);
	ferry__mutex_unlock(&m->lock);
	for (;;) {
		struct job *j;
		int r;

		ferry__mutex_lock(&m->lock);
		while (c->state != CH_QUEUED && !m->quit && !m->error)
			pthread_cond_wait(&c->work, &m->lock);
		if (m->quit || m->error) {
			ferry__mutex_unlock(&m->lock);
			return NULL;
		}
		j = c->job;
		ferry__mutex_unlock(&m->lock);

		r = send_job(c, j);

		ferry__mutex_lock(&m->lock);
		if (!r && j->kind == JOB_SYNC)
			c->syncs_done++;
		j->n = 0;
		c->state = CH_IDLE;
		pthread_cond_broadcast(&m->cv);
		ferry__mutex_unlock(&m->lock);
		if (r)
			return NULL;
	}
}

struct ferry_multifd *ferry_multifd_send_new(const struct ferry_multifd_params *p,
					     const int *fds,
					     struct ferry_error *err)
{
	return ferry__multifd_send_new_tls(p, fds, NULL, err);
}

struct ferry_multifd *
ferry__multifd_send_new_tls(const struct ferry_multifd_params *p, const int *fds,
			    struct ferry_tls_conn *const *tls,
			    struct ferry_error *err)
{
	struct ferry_multifd *m = mf_alloc(p, true, err);
	static const uint8_t zero16[16];
	unsigned i;

	if (!m) {
		for (i = 0; p && fds && i < p->channels &&
			    i < FERRY_MULTIFD_MAX_CHANNELS; i++) {
			if (tls)
				ferry__tls_unref(tls[i]);
			close(fds[i]);
		}
		return NULL;
	}
	for (i = 0; i < m->nch; i++) {
		m->ch[i].fd = fds[i];
		m->ch[i].tls = tls ? tls[i] : NULL;
	}
	if (!memcmp(m->p.session, zero16, 16) &&
	    getrandom(m->p.session, 16, 0) != 16) {
		ferry_error_set(err, -errno, "multifd: no random session id");
		goto fail;
	}
	for (i = 0; i < m->nch + 1; i++) {
		m->jobs[i].offs = calloc(m->p.packet_pages, sizeof(uint64_t));
		if (!m->jobs[i].offs)
			goto nomem;
	}
	m->fill = &m->jobs[m->nch];
	for (i = 0; i < m->nch; i++) {
		struct mf_chan *c = &m->ch[i];
		int e;

		c->id = i;
		c->comp = (unsigned)m->p.compression;
		c->job = &m->jobs[i];
		c->offs_cap = m->p.packet_pages;
		c->wire = calloc(c->offs_cap, 8);
		c->zoffs = calloc(c->offs_cap, 8);
		if (!c->wire || !c->zoffs || chan_alloc_common(c))
			goto nomem;
		if (c->comp == FERRY_MULTIFD_COMP_ZSTD && !(c->cctx = ZSTD_createCCtx()))
			goto nomem;
		e = pthread_create(&c->thread, NULL, send_main, c);
		if (e) {
			ferry_error_set(err, -e, "multifd: cannot start a thread");
			goto fail;
		}
		c->started = true;
	}
	return m;
nomem:
	ferry_error_set(err, -ENOMEM, "out of memory");
fail:
	mf_fail(m, err && err->code ? err->code : -ENOMEM, "setup failed");
	ferry_multifd_free(m);
	return NULL;
}

/* Wait for an IDLE channel (any if @want < 0) and reserve it. Lock held. */
static struct mf_chan *reserve_any_locked(struct ferry_multifd *m, int want,
					  bool written);

static struct mf_chan *reserve_locked(struct ferry_multifd *m, int want)
{
	return reserve_any_locked(m, want, false);
}

/* @written: only a channel whose handshake is out (for a caller that
 * writes on its socket itself). */
static struct mf_chan *reserve_any_locked(struct ferry_multifd *m, int want,
					  bool written)
{
	for (;;) {
		if (m->error || m->quit)
			return NULL;
		if (want >= 0) {
			if (m->ch[want].state == CH_IDLE) {
				m->ch[want].state = CH_RESERVED;
				return &m->ch[want];
			}
		} else {
			for (unsigned k = 0; k < m->nch; k++) {
				struct mf_chan *c = &m->ch[(m->rr + k) % m->nch];
				if (c->state == CH_IDLE && (!written || c->hs_sent)) {
					m->rr = (c->idx + 1) % m->nch;
					c->state = CH_RESERVED;
					return c;
				}
			}
		}
		pthread_cond_wait(&m->cv, &m->lock);
	}
}

static void queue_locked(struct mf_chan *c)
{
	c->state = CH_QUEUED;
	pthread_cond_signal(&c->work);
}

/* Hand the migration thread's packet to an idle channel: a pointer swap. */
static int flush_fill(struct ferry_multifd *m, struct ferry_error *err)
{
	struct mf_chan *c;
	struct job *j;
	int r = 0;

	if (!m->fill->n)
		return 0;
	ferry__mutex_lock(&m->lock);
	c = reserve_locked(m, -1);
	if (!c) {
		r = m->error ? report_locked(m, err)
			     : ferry_error_set(err, -ECANCELED, "multifd: closing");
	} else {
		j = c->job;
		c->job = m->fill;
		m->fill = j;
		queue_locked(c);
	}
	ferry__mutex_unlock(&m->lock);
	m->fill->n = 0;
	return r;
}

int ferry_multifd_queue_page(struct ferry_multifd *m, unsigned block,
			     uint64_t offset, struct ferry_error *err)
{
	struct job *f = m->fill;
	const struct mf_block *b;
	int r;

	if (block >= m->nblocks)
		return ferry_error_set(err, -EINVAL, "multifd: no RAM block %u",
				       block);
	b = &m->blk[block];
	if (offset % b->page_size || offset >= b->size)
		return ferry_error_set(err, -ERANGE,
			"multifd: offset 0x%llx outside block %u",
			(unsigned long long)offset, block);
	if (f->n && f->block != block && (r = flush_fill(m, err)))
		return r;
	f = m->fill;
	f->kind = JOB_RAM;
	f->block = block;
	f->offs[f->n++] = offset;
	if (f->n >= b->ppp)
		return flush_fill(m, err);
	return 0;
}

int ferry_multifd_send_sync(struct ferry_multifd *m, struct ferry_error *err)
{
	uint64_t target;
	int r;

	if ((r = flush_fill(m, err)))
		return r;
	ferry__mutex_lock(&m->lock);
	target = ++m->sync_target;
	/*
	 * Each channel's SYNC goes behind whatever that channel has queued,
	 * and all of them at once: every channel is reserved first, then the
	 * SYNCs are queued together. Queued one by one, a device-state sender
	 * (another thread) could write a packet on a channel whose SYNC is
	 * already out, and a later packet of the same device on one whose SYNC
	 * is not: the destination, stopped at the first sync point, would wait
	 * for the later packet's channel, whose reader waits (queue full) for
	 * the earlier one. With the SYNCs together, each packet is before the
	 * sync point on every channel or after it on every channel.
	 */
	for (unsigned i = 0; i < m->nch; i++) {
		if (!reserve_locked(m, (int)i)) {
			for (unsigned k = 0; k < i; k++)
				m->ch[k].state = CH_IDLE;
			pthread_cond_broadcast(&m->cv);
			goto out;
		}
		m->ch[i].job->kind = JOB_SYNC;
	}
	for (unsigned i = 0; i < m->nch; i++)
		queue_locked(&m->ch[i]);
	for (;;) {
		unsigned done = 0;

		if (m->error || m->quit)
			break;
		for (unsigned i = 0; i < m->nch; i++)
			done += m->ch[i].syncs_done >= target;
		if (done == m->nch) {
			stat_add(&m->syncs, 1);
			break;
		}
		pthread_cond_wait(&m->cv, &m->lock);
	}
out:
	r = m->error ? report_locked(m, err)
		     : m->quit ? ferry_error_set(err, -ECANCELED, "multifd: closing")
			       : 0;
	ferry__mutex_unlock(&m->lock);
	return r;
}

static struct ds_dev *find_dev(struct ferry_multifd *m, const char *idstr,
			       uint32_t instance, bool create)
{
	for (unsigned i = 0; i < m->ndevs; i++)
		if (m->devs[i].instance == instance &&
		    !strcmp(m->devs[i].idstr, idstr))
			return &m->devs[i];
	if (!create || m->ndevs >= FERRY_MULTIFD_MAX_DEVICES)
		return NULL;
	if (!m->devs) {
		m->devs = calloc(FERRY_MULTIFD_MAX_DEVICES, sizeof(*m->devs));
		if (!m->devs)
			return NULL;
	}
	snprintf(m->devs[m->ndevs].idstr, sizeof(m->devs[0].idstr), "%s", idstr);
	m->devs[m->ndevs].instance = instance;
	return &m->devs[m->ndevs++];
}

int ferry_multifd_send_devstate(struct ferry_multifd *m, const char *idstr,
				uint32_t instance, uint32_t flags,
				const void *buf, size_t len,
				struct ferry_error *err)
{
	size_t il = idstr ? strlen(idstr) : 0;
	struct ds_dev *d;
	uint8_t h[FERRY_MULTIFD_HEADER_SIZE];
	struct mf_chan *c;
	uint32_t seq;
	int r = 0;

	if (!m->source)
		return ferry_error_set(err, -EINVAL, "multifd: not a source");
	if (flags & ~FERRY_MULTIFD_FLAG_DEVICE_CONFIG)
		return ferry_error_set(err, -EINVAL, "multifd: device state "
				       "flags 0x%x", flags);
	if (!il || il > FERRY_IDSTR_MAX || len > FERRY_MULTIFD_DEVSTATE_MAX)
		return ferry_error_set(err, -EMSGSIZE,
			"multifd: device state for '%s': name of 1..%u bytes and "
			"at most %u bytes per buffer", idstr ? idstr : "",
			FERRY_IDSTR_MAX, FERRY_MULTIFD_DEVSTATE_MAX);
	ferry__mutex_lock(&m->lock);
	d = find_dev(m, idstr, instance, true);
	if (!d) {
		ferry__mutex_unlock(&m->lock);
		return ferry_error_set(err, -ENOSPC,
			"multifd: more than %u devices send state",
			FERRY_MULTIFD_MAX_DEVICES);
	}
	c = reserve_any_locked(m, -1, true);
	if (!c) {
		r = m->error ? report_locked(m, err)
			     : ferry_error_set(err, -ECANCELED, "multifd: closing");
		ferry__mutex_unlock(&m->lock);
		return r;
	}
	/* Numbered only once a channel is ours: a failed call leaves no gap. */
	seq = d->next_seq++;
	ferry__mutex_unlock(&m->lock);

	/*
	 * RESERVED: the channel is ours (its thread writes QUEUED jobs only),
	 * so we write the packet on its socket ourselves, straight from the
	 * caller's buffer: no copy, and no hand-off to the channel thread and
	 * back, whose wake-ups cost more than the copy under nested
	 * virtualisation. Callers in several threads write on several
	 * channels at once.
	 */
	fill_header(h, FERRY_MULTIFD_FLAG_DEVICE_STATE | flags, instance,
		    c->pkt_num, (uint32_t)il, seq, (uint32_t)len);
	r = send_packet(c, h, idstr, il, buf, len);
	if (!r) {
		stat_add(&m->ds_packets, 1);
		stat_add(&m->ds_bytes, len);
	}
	ferry__mutex_lock(&m->lock);
	c->state = CH_IDLE;
	pthread_cond_broadcast(&m->cv);
	if (r)
		report_locked(m, err);
	ferry__mutex_unlock(&m->lock);
	return r;
}

/* ---- destination: packets in --------------------------------------------- */

/* Read exactly @len bytes of packet @what; EOF or a short read fails. */
static int recv_bytes(struct mf_chan *c, void *buf, size_t len, const char *what)
{
	ssize_t r;

	if (!len)
		return 0;
	r = read_full(c, buf, len);
	if (r == (ssize_t)len) {
		stat_add(&c->bytes, len);
		return 0;
	}
	if (r < 0)
		return mf_fail(c->m, (int)r, "channel %u: read failed in packet "
			       "%llu (%s): %s", c->id,
			       (unsigned long long)c->pkt_num, what,
			       strerror((int)-r));
	return mf_fail(c->m, -EBADMSG, "channel %u: truncated packet %llu "
		       "(%s: %zd of %zu bytes)", c->id,
		       (unsigned long long)c->pkt_num, what, r, len);
}

int ferry__multifd_parse_handshake(const uint8_t *hs,
				   struct ferry__mf_handshake *h,
				   struct ferry_error *err)
{
	static const uint8_t zero_tail[16];
	uint32_t magic = ferry__get_be32(hs), version = ferry__get_be32(hs + 4);
	uint32_t flags = ferry__get_be32(hs + 32);

	memcpy(h->session, hs + 8, 16);
	h->id = ferry__get_be32(hs + 24);
	h->channels = ferry__get_be32(hs + 28);
	h->comp = flags >> 1;
	h->packet_pages = ferry__get_be32(hs + 36);
	if (magic != FERRY_MULTIFD_MAGIC)
		return ferry_error_set(err, -EBADMSG, "bad handshake magic "
				       "0x%08x (not a multifd channel)", magic);
	if (version != FERRY_MULTIFD_VERSION)
		return ferry_error_set(err, -EPROTONOSUPPORT, "handshake version "
				       "%u, this side speaks %u", version,
				       FERRY_MULTIFD_VERSION);
	if (ferry__get_be64(hs + 56) != XXH3_64bits_withSeed(hs, 56, 0))
		return ferry_error_set(err, -EBADMSG, "handshake check mismatch");
	if (memcmp(hs + 40, zero_tail, 16) || flags & ~FERRY_MULTIFD_FLAG_COMP_MASK ||
	    h->comp > FERRY_MULTIFD_COMP_ZSTD || !h->packet_pages ||
	    h->packet_pages > FERRY_MULTIFD_PACKET_PAGES_MAX)
		return ferry_error_set(err, -EBADMSG, "handshake with unknown "
				       "flags 0x%x or %u pages per packet", flags,
				       h->packet_pages);
	if (!h->channels || h->channels > FERRY_MULTIFD_MAX_CHANNELS ||
	    h->id >= h->channels)
		return ferry_error_set(err, -EINVAL, "handshake of channel %u "
				       "of %u", h->id, h->channels);
	return 0;
}

static int recv_handshake(struct mf_chan *c)
{
	struct ferry_multifd *m = c->m;
	uint8_t hs[FERRY_MULTIFD_HANDSHAKE_SIZE];
	struct ferry__mf_handshake h;
	struct ferry_error e = { 0 };
	ssize_t got = read_full(c, hs, sizeof(hs));
	int r = 0;

	if (got != (ssize_t)sizeof(hs))
		return mf_fail(m, got < 0 ? (int)got : -EBADMSG,
			       "connection %u: handshake %s", c->idx,
			       got < 0 ? strerror((int)-got) : "truncated");
	stat_add(&c->bytes, sizeof(hs));
	if ((r = ferry__multifd_parse_handshake(hs, &h, &e))) {
		r = mf_fail(m, r, "connection %u: %s", c->idx, e.msg);
		ferry_error_clear(&e);
		return r;
	}
	if (h.channels != m->nch)
		return mf_fail(m, -EINVAL, "connection %u: channel %u of %u, "
			       "this destination expects %u channels", c->idx,
			       h.id, h.channels, m->nch);

	ferry__mutex_lock(&m->lock);
	/* Without a session from the caller, the first handshake fixes it
	 * provisionally: waiting for the main stream's START instead would
	 * tie the channels to when the source flushes its main stream. Every
	 * other channel must agree at once, and the main stream must agree
	 * when START is loaded (ferry_multifd_recv_expect), or the migration
	 * fails - the VM never runs on pages of a foreign session. */
	if (!m->session_known) {
		memcpy(m->p.session, h.session, 16);
		m->session_known = true;
	}
	if (m->error || m->quit) {
		ferry__mutex_unlock(&m->lock);
		return -ECANCELED;
	}
	if (memcmp(h.session, m->p.session, 16))
		r = -EPERM;
	else if (m->ids_seen & (1u << h.id))
		r = -EEXIST;
	else if ((m->hs_comp >= 0 && (unsigned)m->hs_comp != h.comp) ||
		 (m->expect_comp >= 0 && (unsigned)m->expect_comp != h.comp) ||
		 (m->hs_pkt_pages && m->hs_pkt_pages != h.packet_pages))
		r = -EINVAL;
	if (!r) {
		m->ids_seen |= 1u << h.id;
		m->hs_comp = (int)h.comp;
		m->hs_pkt_pages = h.packet_pages;
		c->hs_ok = true;
		pthread_cond_broadcast(&m->cv);
	}
	ferry__mutex_unlock(&m->lock);
	if (r == -EPERM)
		return mf_fail(m, r, "connection %u: channel of another "
			       "migration (session id mismatch)", c->idx);
	if (r == -EEXIST)
		return mf_fail(m, r, "connection %u: duplicate channel id %u",
			       c->idx, h.id);
	if (r)
		return mf_fail(m, r, "connection %u: channel %u disagrees on "
			       "compression or packet size", c->idx, h.id);
	c->id = h.id;
	c->comp = h.comp;
	c->offs_cap = h.packet_pages;
	c->wire = calloc(h.packet_pages, 8);
	if (!c->wire || (c->comp == FERRY_MULTIFD_COMP_ZSTD &&
			 !(c->dctx = ZSTD_createDCtx())))
		return mf_fail(m, -ENOMEM, "out of memory");
	return 0;
}

/* Deliver one device-state buffer in per-device order (ds_lock held by
 * the caller); early arrivals wait in a bounded, sorted list. */
static int ds_deliver(struct mf_chan *c, const char *idstr, uint32_t instance,
		      uint32_t seq, const uint8_t *data, size_t len,
		      struct ferry_error *e)
{
	struct ferry_multifd *m = c->m;
	struct ds_dev *d = find_dev(m, idstr, instance, true);
	struct ds_pending **pp, *p;
	int r;

	if (!d)
		return ferry_error_set(e, -ENOSPC, "more than %u devices send "
				       "state", FERRY_MULTIFD_MAX_DEVICES);
	if (seq != d->next_seq) {
		if (seq < d->next_seq || seq - d->next_seq > (1u << 20))
			return ferry_error_set(e, -EBADMSG, "device '%s' "
				"instance %u: buffer %u arrived, expected %u",
				idstr, instance, seq, d->next_seq);
		for (pp = &d->pend; *pp && (*pp)->seq < seq; pp = &(*pp)->next)
			;
		if (*pp && (*pp)->seq == seq)
			return ferry_error_set(e, -EBADMSG, "device '%s' "
				"instance %u: buffer %u twice", idstr, instance, seq);
		/* Bounded by bytes and by count, checked before the sorted
		 * insert walks the list: empty buffers cost something too. */
		if (m->reorder_count >= FERRY_MULTIFD_REORDER_MAX_BUFFERS ||
		    m->reorder_bytes + len + FERRY_MULTIFD_REORDER_OVERHEAD >
		    FERRY_MULTIFD_REORDER_MAX)
			return ferry_error_set(e, -ENOBUFS, "device '%s' "
				"instance %u: more than %u buffers or %u bytes of "
				"device state out of order", idstr, instance,
				FERRY_MULTIFD_REORDER_MAX_BUFFERS,
				FERRY_MULTIFD_REORDER_MAX);
		p = malloc(sizeof(*p) + len);
		if (!p)
			return ferry_error_set(e, -ENOMEM, "out of memory");
		p->seq = seq;
		p->len = len;
		memcpy(p->data, data, len);
		p->next = *pp;
		*pp = p;
		m->reorder_bytes += len + FERRY_MULTIFD_REORDER_OVERHEAD;
		m->reorder_count++;
		return 0;
	}
	r = m->p.devstate(m->p.opaque, idstr, instance, data, len, e);
	d->next_seq++;
	while (!r && d->pend && d->pend->seq == d->next_seq) {
		p = d->pend;
		d->pend = p->next;
		m->reorder_bytes -= p->len + FERRY_MULTIFD_REORDER_OVERHEAD;
		m->reorder_count--;
		r = m->p.devstate(m->p.opaque, idstr, instance, p->data,
				  p->len, e);
		d->next_seq++;
		free(p);
	}
	if (r && !e->code)
		ferry_error_set(e, r, "failed");
	return r;
}

static int recv_devstate(struct mf_chan *c, const uint8_t *h)
{
	struct ferry_multifd *m = c->m;
	uint32_t flags = ferry__get_be32(h + 8), instance = ferry__get_be32(h + 12);
	uint32_t il = ferry__get_be32(h + 24), seq = ferry__get_be32(h + 28), plen = ferry__get_be32(h + 32);
	struct ferry_error e = { 0 };
	char idstr[FERRY_IDSTR_MAX + 1];
	int r;

	if ((flags & ~FERRY_MULTIFD_FLAG_DEVICE_CONFIG) !=
	    FERRY_MULTIFD_FLAG_DEVICE_STATE || !il ||
	    il > FERRY_IDSTR_MAX || plen > FERRY_MULTIFD_DEVSTATE_MAX)
		return mf_fail(m, -EBADMSG, "channel %u: packet %llu: malformed "
			       "device-state header (flags 0x%x, name %u bytes, "
			       "%u bytes)", c->id, (unsigned long long)c->pkt_num,
			       flags, il, plen);
	if (!m->p.devstate && !m->p.devstate_seq)
		return mf_fail(m, -EOPNOTSUPP, "channel %u: device state "
			       "received but this destination takes none", c->id);
	if (grow(&c->stage, &c->stage_cap, plen ? plen : 1))
		return mf_fail(m, -ENOMEM, "out of memory");
	if ((r = recv_bytes(c, idstr, il, "device name")) ||
	    (r = recv_bytes(c, c->stage, plen, "device state")))
		return r;
	idstr[il] = 0;
	XXH3_64bits_reset_withSeed(c->xxh, c->id);
	XXH3_64bits_update(c->xxh, h, 40);
	XXH3_64bits_update(c->xxh, idstr, il);
	XXH3_64bits_update(c->xxh, c->stage, plen);
	if (XXH3_64bits_digest(c->xxh) != ferry__get_be64(h + 40))
		return mf_fail(m, -EBADMSG, "channel %u: packet %llu: check "
			       "mismatch (damaged device state)", c->id,
			       (unsigned long long)c->pkt_num);
	if (memchr(idstr, 0, il))
		return mf_fail(m, -EBADMSG, "channel %u: device name with NUL",
			       c->id);
	stat_add(&m->ds_packets, 1);
	stat_add(&m->ds_bytes, plen);
	if (m->p.devstate_seq) {
		/* The callee orders them, and may block here: that is its
		 * backpressure (this channel stops reading meanwhile). */
		r = m->p.devstate_seq(m->p.opaque, idstr, instance, seq,
				      flags & FERRY_MULTIFD_FLAG_DEVICE_CONFIG,
				      c->stage, plen, &e);
		if (r && !e.code)
			ferry_error_set(&e, r, "failed");
		return r ? mf_fail(m, r, "channel %u: %s", c->id, e.msg) : 0;
	}
	if (flags & FERRY_MULTIFD_FLAG_DEVICE_CONFIG)
		return mf_fail(m, -EBADMSG, "channel %u: packet %llu: a device "
			       "config buffer, which this destination does not "
			       "take", c->id, (unsigned long long)c->pkt_num);
	ferry__mutex_lock(&m->ds_lock);
	r = ds_deliver(c, idstr, instance, seq, c->stage, plen, &e);
	ferry__mutex_unlock(&m->ds_lock);
	if (r)
		return mf_fail(m, r, "channel %u: %s", c->id, e.msg);
	return 0;
}

/* A SYNC packet: stop until the load thread releases this sync point. */
static int recv_sync_point(struct mf_chan *c)
{
	struct ferry_multifd *m = c->m;
	uint64_t gen;
	int r;

	ferry__mutex_lock(&m->lock);
	c->at_sync = true;
	m->arrived++;
	gen = m->release_gen;
	pthread_cond_broadcast(&m->cv);
	while (m->release_gen == gen && !m->error && !m->quit)
		pthread_cond_wait(&m->cv, &m->lock);
	r = m->error ? m->error : m->quit ? -ECANCELED : 0;
	ferry__mutex_unlock(&m->lock);
	return r;
}

static int recv_ram(struct mf_chan *c, const uint8_t *h)
{
	struct ferry_multifd *m = c->m;
	uint32_t flags = ferry__get_be32(h + 8), bi = ferry__get_be32(h + 12);
	uint32_t nn = ferry__get_be32(h + 24), nz = ferry__get_be32(h + 28), plen = ferry__get_be32(h + 32);
	unsigned long long num = (unsigned long long)c->pkt_num;
	const struct mf_block *b;
	const uint8_t *pages;
	size_t raw = 0;
	int r;

	if ((flags & FERRY_MULTIFD_FLAG_COMP_MASK) >> 1 != c->comp)
		return mf_fail(m, -EBADMSG, "channel %u: packet %llu: "
			       "compression %u, channel uses %u", c->id, num,
			       (flags & FERRY_MULTIFD_FLAG_COMP_MASK) >> 1, c->comp);
	if (flags & FERRY_MULTIFD_FLAG_SYNC) {
		if (bi || nn || nz || plen)
			return mf_fail(m, -EBADMSG, "channel %u: packet %llu: "
				       "SYNC packet with pages", c->id, num);
	} else {
		if (bi >= m->nblocks)
			return mf_fail(m, -EBADMSG, "channel %u: packet %llu: "
				       "RAM block %u of %u", c->id, num, bi,
				       m->nblocks);
		b = &m->blk[bi];
		if (!nn && !nz)
			return mf_fail(m, -EBADMSG, "channel %u: packet %llu: "
				       "empty RAM packet", c->id, num);
		/* The source's packet size (its handshake), not ours: a
		 * source may use larger packets than our default. */
		if (nn > c->offs_cap || nz > c->offs_cap ||
		    nn + nz > block_ppp(c->offs_cap, b->page_size))
			return mf_fail(m, -EBADMSG, "channel %u: packet %llu: "
				       "%u + %u pages, at most %u per packet",
				       c->id, num, nn, nz,
				       block_ppp(c->offs_cap, b->page_size));
		raw = (size_t)nn * b->page_size;
		if (c->comp == FERRY_MULTIFD_COMP_NONE ? plen != raw
		    : nn ? (!plen || plen > ZSTD_compressBound(raw)) : plen != 0)
			return mf_fail(m, -EBADMSG, "channel %u: packet %llu: "
				       "payload of %u bytes for %u pages",
				       c->id, num, plen, nn);
		if (grow(&c->stage, &c->stage_cap, raw ? raw : 1) ||
		    (c->comp && grow(&c->zbuf, &c->zcap, plen ? plen : 1)))
			return mf_fail(m, -ENOMEM, "out of memory");
	}
	if ((r = recv_bytes(c, c->wire, (size_t)(nn + nz) * 8, "offsets")) ||
	    (r = recv_bytes(c, c->comp ? c->zbuf : c->stage, plen, "pages")))
		return r;
	XXH3_64bits_reset_withSeed(c->xxh, c->id);
	XXH3_64bits_update(c->xxh, h, 40);
	XXH3_64bits_update(c->xxh, c->wire, (size_t)(nn + nz) * 8);
	XXH3_64bits_update(c->xxh, c->comp ? c->zbuf : c->stage, plen);
	if (XXH3_64bits_digest(c->xxh) != ferry__get_be64(h + 40))
		return mf_fail(m, -EBADMSG, "channel %u: packet %llu: check "
			       "mismatch (damaged packet)", c->id, num);
	if (flags & FERRY_MULTIFD_FLAG_SYNC)
		return recv_sync_point(c);

	b = &m->blk[bi];
	for (uint32_t i = 0; i < nn + nz; i++) {
		uint64_t off = ferry__get_be64((const uint8_t *)&c->wire[i]);
		if (off % b->page_size || off >= b->size)
			return mf_fail(m, -ERANGE, "channel %u: packet %llu: "
				       "page offset 0x%llx outside RAM block %u "
				       "(0x%llx bytes) or unaligned", c->id, num,
				       (unsigned long long)off, bi,
				       (unsigned long long)b->size);
	}
	pages = c->stage;
	if (c->comp == FERRY_MULTIFD_COMP_ZSTD && nn) {
		size_t z = ZSTD_decompressDCtx(c->dctx, c->stage, raw, c->zbuf, plen);
		if (ZSTD_isError(z) || z != raw)
			return mf_fail(m, -EBADMSG, "channel %u: packet %llu: "
				       "zstd payload does not decode to %u pages%s%s",
				       c->id, num, nn, ZSTD_isError(z) ? ": " : "",
				       ZSTD_isError(z) ? ZSTD_getErrorName(z) : "");
	}
	for (uint32_t i = 0; i < nn; i++)
		memcpy(b->host + ferry__get_be64((const uint8_t *)&c->wire[i]),
		       pages + (size_t)i * b->page_size, b->page_size);
	for (uint32_t i = nn; i < nn + nz; i++) {
		uint8_t *p = b->host + ferry__get_be64((const uint8_t *)&c->wire[i]);
		/* Reading a never-touched page maps the shared zero page;
		 * writing would commit memory for nothing. */
		if (!ferry__page_is_zero(p, b->page_size))
			memset(p, 0, b->page_size);
	}
	if (b->recv_map)
		for (uint32_t i = 0; i < nn + nz; i++) {
			uint64_t pg = ferry__get_be64((const uint8_t *)&c->wire[i]) /
				      b->page_size;

			__atomic_fetch_or(&b->recv_map[pg / 64], 1ull << (pg % 64),
					  __ATOMIC_RELAXED);
		}
	stat_add(&m->normal_pages, nn);
	stat_add(&m->zero_pages, nz);
	stat_add(&m->raw_bytes, raw);
	stat_add(&m->payload_bytes, plen);
	return 0;
}

/* One packet: 0, 1 at a clean EOF between packets, or -errno (reported). */
static int recv_packet(struct mf_chan *c)
{
	struct ferry_multifd *m = c->m;
	uint8_t h[FERRY_MULTIFD_HEADER_SIZE];
	ssize_t got = read_full(c, h, sizeof(h));
	uint32_t magic, version, flags;
	uint64_t num;
	int r;

	if (got == 0)
		return 1;
	if (got < 0)
		return mf_fail(m, (int)got, "channel %u: read failed before "
			       "packet %llu: %s", c->id,
			       (unsigned long long)c->pkt_num, strerror((int)-got));
	if (got != (ssize_t)sizeof(h))
		return mf_fail(m, -EBADMSG, "channel %u: truncated packet %llu "
			       "(header: %zd of %u bytes)", c->id,
			       (unsigned long long)c->pkt_num, got,
			       FERRY_MULTIFD_HEADER_SIZE);
	stat_add(&c->bytes, sizeof(h));
	magic = ferry__get_be32(h);
	version = ferry__get_be32(h + 4);
	flags = ferry__get_be32(h + 8);
	num = ferry__get_be64(h + 16);
	if (magic != FERRY_MULTIFD_PACKET_MAGIC)
		return mf_fail(m, -EBADMSG, "channel %u: packet %llu: bad magic "
			       "0x%08x", c->id, (unsigned long long)c->pkt_num, magic);
	if (version != FERRY_MULTIFD_VERSION || ferry__get_be32(h + 36) ||
	    flags & ~(FERRY_MULTIFD_FLAG_SYNC | FERRY_MULTIFD_FLAG_COMP_MASK |
		      FERRY_MULTIFD_FLAG_DEVICE_STATE |
		      FERRY_MULTIFD_FLAG_DEVICE_CONFIG) ||
	    ((flags & FERRY_MULTIFD_FLAG_DEVICE_CONFIG) &&
	     !(flags & FERRY_MULTIFD_FLAG_DEVICE_STATE)) ||
	    (flags & FERRY_MULTIFD_FLAG_SYNC &&
	     flags & FERRY_MULTIFD_FLAG_DEVICE_STATE))
		return mf_fail(m, -EBADMSG, "channel %u: packet %llu: version %u, "
			       "flags 0x%x: not understood", c->id,
			       (unsigned long long)c->pkt_num, version, flags);
	if (num != c->pkt_num)
		return mf_fail(m, -EBADMSG, "channel %u: packet number %llu, "
			       "expected %llu (lost or replayed packet)", c->id,
			       (unsigned long long)num,
			       (unsigned long long)c->pkt_num);
	r = flags & FERRY_MULTIFD_FLAG_DEVICE_STATE ? recv_devstate(c, h)
						     : recv_ram(c, h);
	if (!r) {
		c->pkt_num++;
		stat_add(&c->packets, 1);
	}
	return r;
}

static void *recv_main(void *arg)
{
	struct mf_chan *c = arg;
	struct ferry_multifd *m = c->m;
	int r = recv_handshake(c);

	while (!r)
		r = recv_packet(c);
	ferry__mutex_lock(&m->lock);
	/* A clean EOF between packets is how a finished source says goodbye;
	 * it only becomes an error if a sync point still needs this channel
	 * (see ferry_multifd_recv_sync). */
	if (r == 1)
		c->ended = true;
	pthread_cond_broadcast(&m->cv);
	ferry__mutex_unlock(&m->lock);
	return NULL;
}

struct ferry_multifd *ferry_multifd_recv_new(const struct ferry_multifd_params *p,
					     struct ferry_error *err)
{
	static const uint8_t zero16[16];
	struct ferry_multifd *m = mf_alloc(p, false, err);

	if (m)
		m->session_known = memcmp(m->p.session, zero16, 16) != 0;
	return m;
}

int ferry_multifd_recv_add_channel(struct ferry_multifd *m, int fd,
				   struct ferry_error *err)
{
	return ferry__multifd_recv_add_channel_tls(m, fd, NULL, err);
}

int ferry__multifd_recv_add_channel_tls(struct ferry_multifd *m, int fd,
					struct ferry_tls_conn *tls,
					struct ferry_error *err)
{
	struct mf_chan *c;
	int e;

	ferry__mutex_lock(&m->lock);
	if (m->source || !m->nblocks || m->nadded >= m->nch || m->error) {
		int r = m->error ? report_locked(m, err)
			: ferry_error_set(err, m->nadded >= m->nch ? -ENOSPC : -EINVAL,
				"multifd: %s", m->source ? "not a destination" :
				!m->nblocks ? "block table not set" :
				"all channels connected already");
		ferry__mutex_unlock(&m->lock);
		ferry__tls_unref(tls);
		close(fd);
		return r;
	}
	c = &m->ch[m->nadded++];
	c->fd = fd;
	c->tls = tls;
	ferry__mutex_unlock(&m->lock);
	if (chan_alloc_common(c)) {
		mf_fail(m, -ENOMEM, "out of memory");
		return ferry_multifd_error(m, err);
	}
	e = pthread_create(&c->thread, NULL, recv_main, c);
	if (e) {
		mf_fail(m, -e, "cannot start a channel thread");
		return ferry_multifd_error(m, err);
	}
	c->started = true;
	return 0;
}

int ferry_multifd_recv_expect(struct ferry_multifd *m, const uint8_t session[16],
			      unsigned channels, unsigned compression,
			      struct ferry_error *err)
{
	int r = 0;

	ferry__mutex_lock(&m->lock);
	if (channels != m->nch)
		r = -EINVAL;
	else if (m->session_known && memcmp(m->p.session, session, 16))
		r = -EPERM;
	else if (compression > FERRY_MULTIFD_COMP_ZSTD ||
		 (m->hs_comp >= 0 && (unsigned)m->hs_comp != compression))
		r = -EBADMSG;
	if (!r) {
		memcpy(m->p.session, session, 16);
		m->session_known = true;
		m->expect_comp = (int)compression;
		pthread_cond_broadcast(&m->cv);
	}
	ferry__mutex_unlock(&m->lock);
	if (r == -EINVAL)
		r = mf_fail(m, r, "the source uses %u channels, this destination "
			    "%u", channels, m->nch);
	else if (r == -EPERM)
		r = mf_fail(m, r, "the main stream belongs to another session "
			    "than this destination's channels");
	else if (r)
		r = mf_fail(m, r, "the main stream announces compression %u, "
			    "the channels use another", compression);
	return r ? ferry_multifd_error(m, err) : 0;
}

int ferry_multifd_recv_sync(struct ferry_multifd *m, struct ferry_error *err)
{
	int r = 0;

	ferry__mutex_lock(&m->lock);
	for (;;) {
		unsigned gone = UINT32_MAX;

		if (m->error || m->quit)
			break;
		if (m->arrived == m->nch)
			break;
		for (unsigned i = 0; i < m->nadded; i++)
			if (m->ch[i].ended && !m->ch[i].at_sync)
				gone = i;
		if (gone != UINT32_MAX) {
			ferry__mutex_unlock(&m->lock);
			mf_fail(m, -EPIPE, "channel %u closed by the source "
				"before a sync point", m->ch[gone].id);
			ferry__mutex_lock(&m->lock);
			break;
		}
		pthread_cond_wait(&m->cv, &m->lock);
	}
	if (m->error || m->quit) {
		r = m->error ? report_locked(m, err)
			     : ferry_error_set(err, -ECANCELED, "multifd: closing");
	} else {
		m->arrived = 0;
		for (unsigned i = 0; i < m->nch; i++)
			m->ch[i].at_sync = false;
		m->release_gen++;
		stat_add(&m->syncs, 1);
		pthread_cond_broadcast(&m->cv);
	}
	ferry__mutex_unlock(&m->lock);
	return r;
}

void ferry_multifd_get_stats(struct ferry_multifd *m,
			     struct ferry_multifd_stats *st)
{
	memset(st, 0, sizeof(*st));
	st->channels = m->nch;
	for (unsigned i = 0; i < m->nch; i++) {
		st->chan[i].bytes = __atomic_load_n(&m->ch[i].bytes, __ATOMIC_RELAXED);
		st->chan[i].packets = __atomic_load_n(&m->ch[i].packets,
						      __ATOMIC_RELAXED);
	}
#define LD(x) __atomic_load_n(&m->x, __ATOMIC_RELAXED)
	st->normal_pages = LD(normal_pages);
	st->zero_pages = LD(zero_pages);
	st->raw_bytes = LD(raw_bytes);
	st->payload_bytes = LD(payload_bytes);
	st->syncs = LD(syncs);
	st->devstate_packets = LD(ds_packets);
	st->devstate_bytes = LD(ds_bytes);
#undef LD
}
