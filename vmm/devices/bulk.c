/*
 * vmm/devices/bulk.c - a device with large, verifiable internal state and
 * the VFIO migration protocol (v2 state machine, v1 staged-buffer data path).
 *
 * See bulk.h for the model. The notes here are about the implementation.
 *
 * Content. Chunk c (offset o = c * BULK_CHUNK) holds the stamp
 * {BULK_STAMP_MAGIC, tag, o, generation, check} as host-order u64 (this is
 * device memory, copied raw; both ends of a migration share a byte order)
 * and then a xorshift64 stream seeded from (tag, o, generation). Writing
 * and checking cost one shift-xor chain per 8 bytes (about 0.15 s per
 * 512 MiB; faulting the memory in costs more, see bulk_new), and a
 * destination can prove every byte without the source's help. check hashes the other four fields so that a chunk
 * whose generation is torn from its fill is caught even when the fill
 * alone would look plausible.
 *
 * Save session bookkeeping: cursor sweeps chunks in order; a chunk below
 * the cursor has been handed out once and gets a dirty bit when rewritten.
 * A chunk at or above the cursor needs no dirty bit, because the sweep
 * will carry its latest content anyway. So initial = chunks above the
 * cursor, dirty = set bits, and the two never overlap: the remainder in
 * STOP_COPY is exact.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "devices/bulk.h"

#define BULK_CFG_MAGIC    0x47464342u  /* "BCFG" */
#define BULK_CFG_VERSION  1u
#define BULK_CFG_COMPLETE 0x1u         /* session drained at save time */

#define WORDS_PER_CHUNK   (BULK_CHUNK / 8)
#define STAMP_WORDS       (BULK_STAMP_SIZE / 8)
#define DIRTY_STEP_NS     10000000ull  /* dirtier pacing step: 10 ms */

/* Where the migration thread is in the region's register sequence. */
enum seq {
	SEQ_IDLE,        /* nothing staged */
	SEQ_SRC_STAGED,  /* source: data_offset read, data_size not yet */
	SEQ_SRC_SIZED,   /* source: data_size read, record being read out */
	SEQ_DST_OPEN,    /* destination: data_offset read, record being written */
};

struct bulk_dev {
	/* ---- immutable after bulk_new: read without the lock ---- */
	char *id;
	uint64_t tag;          /* XXH3-64 of id, in every stamp */
	uint64_t size;
	uint64_t nchunks;
	uint64_t nwords;       /* u64 words per bitmap */
	uint64_t rate_mbps;
	bool precopy;
	uint8_t *mem;          /* the state (mmap); content under lock */
	uint8_t *region;       /* BULK_REGION_SIZE (mmap); content under lock */

	pthread_mutex_t lock;  /* guards every field below but the dirtier's own */
	pthread_cond_t wake;   /* with lock: wakes the dirtier for bulk_stop */

	enum bulk_state state;

	/* Save session (PRE_COPY / STOP_COPY). */
	uint64_t *dirty;       /* chunk sent, then rewritten: send again */
	uint64_t ndirty;       /* bits set in dirty */
	uint64_t cursor;       /* chunks [0, cursor) handed out at least once */
	uint64_t dirty_scan;   /* where the next dirty search starts */
	uint64_t sess_records; /* records handed out (data_size read) */
	uint64_t sess_bytes;   /* their chunk bytes */

	/* Load session (RESUMING). */
	uint64_t *recv;        /* chunk written at least once this session */
	uint64_t nrecv;
	uint64_t ld_records;

	/* Region sequence. */
	enum seq seq;
	uint64_t staged_first, staged_count; /* source: the staged chunks */
	uint64_t data_size;    /* source: staged record size (register) */
	uint64_t wr_len;       /* destination: bytes written from the area start */

	struct bulk_stats stats;
	bool stop_req;         /* dirtier: exit at the next wake-up */

	/* ---- the owner's (bulk_start/bulk_stop caller) ---- */
	pthread_t thread;
	bool thread_running;

	/* ---- the dirtier thread's alone ---- */
	uint64_t rng;
};

/* ---- little helpers --------------------------------------------------------- */

static void put_le32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_le32(const uint8_t *p)
{
	uint32_t v = 0;

	for (int i = 0; i < 4; i++)
		v |= (uint32_t)p[i] << (8 * i);
	return v;
}

static uint64_t get_le64(const uint8_t *p)
{
	uint64_t v = 0;

	for (int i = 0; i < 8; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

static bool bit_test(const uint64_t *bm, uint64_t i)
{
	return bm[i / 64] >> (i % 64) & 1;
}

static void bit_set(uint64_t *bm, uint64_t i)
{
	bm[i / 64] |= 1ull << (i % 64);
}

static void bit_clear(uint64_t *bm, uint64_t i)
{
	bm[i / 64] &= ~(1ull << (i % 64));
}

/* First set bit at or after @from, or @nbits. */
static uint64_t bit_next(const uint64_t *bm, uint64_t nbits, uint64_t from)
{
	uint64_t w, word;

	if (from >= nbits)
		return nbits;
	w = from / 64;
	word = bm[w] & (~0ull << (from % 64));
	for (;;) {
		if (word) {
			uint64_t i = w * 64 + (uint64_t)__builtin_ctzll(word);

			return i < nbits ? i : nbits;
		}
		if (++w * 64 >= nbits)
			return nbits;
		word = bm[w];
	}
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- content: stamps and fill ------------------------------------------------ */

static uint64_t splitmix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

/* xorshift64 must not start at 0 (it would stay there). */
static uint64_t fill_seed(uint64_t tag, uint64_t off, uint64_t gen)
{
	uint64_t s = splitmix64(tag ^ splitmix64(off ^ splitmix64(gen)));

	return s ? s : 0x9e3779b97f4a7c15ull;
}

static inline uint64_t xorshift64(uint64_t x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

static uint64_t stamp_check(const uint64_t *w)
{
	return XXH3_64bits_withSeed(w, 4 * sizeof(uint64_t), BULK_STAMP_MAGIC);
}

/* Write chunk @c at generation @gen. Caller holds the lock, or owns the
 * device exclusively (bulk_new). */
static void chunk_write(struct bulk_dev *d, uint64_t c, uint64_t gen)
{
	uint64_t *w = (uint64_t *)(d->mem + c * BULK_CHUNK);
	uint64_t off = c * BULK_CHUNK;
	uint64_t x = fill_seed(d->tag, off, gen);

	w[0] = BULK_STAMP_MAGIC;
	w[1] = d->tag;
	w[2] = off;
	w[3] = gen;
	w[4] = stamp_check(w);
	for (uint64_t i = STAMP_WORDS; i < WORDS_PER_CHUNK; i++) {
		x = xorshift64(x);
		w[i] = x;
	}
}

static bool chunk_ok(const struct bulk_dev *d, uint64_t c)
{
	const uint64_t *w = (const uint64_t *)(d->mem + c * BULK_CHUNK);
	uint64_t off = c * BULK_CHUNK, diff = 0, x;

	if (w[0] != BULK_STAMP_MAGIC || w[1] != d->tag || w[2] != off ||
	    w[4] != stamp_check(w))
		return false;
	/* OR the differences rather than branch per word: the loop stays a
	 * straight xorshift chain. */
	x = fill_seed(d->tag, off, w[3]);
	for (uint64_t i = STAMP_WORDS; i < WORDS_PER_CHUNK; i++) {
		x = xorshift64(x);
		diff |= w[i] ^ x;
	}
	return diff == 0;
}

/* ---- registers and sessions (lock held) -------------------------------------- */

static bool saving(enum bulk_state s)
{
	return s == BULK_PRE_COPY || s == BULK_STOP_COPY;
}

static uint64_t pending_locked(const struct bulk_dev *d)
{
	if (!saving(d->state))
		return 0;
	return (d->nchunks - d->cursor + d->ndirty) * BULK_CHUNK;
}

/* Mirror the registers into the region, so a plain region read of the
 * register area sees what the register functions last returned. */
static void regs_sync(struct bulk_dev *d)
{
	put_le32(d->region + BULK_REG_DEVICE_STATE, (uint32_t)d->state);
	put_le64(d->region + BULK_REG_PENDING, pending_locked(d));
	put_le64(d->region + BULK_REG_DATA_OFFSET, BULK_DATA_OFFSET);
	put_le64(d->region + BULK_REG_DATA_SIZE, d->data_size);
}

static void seq_reset(struct bulk_dev *d)
{
	d->seq = SEQ_IDLE;
	d->staged_first = d->staged_count = 0;
	d->data_size = 0;
	d->wr_len = 0;
}

static void save_session_start(struct bulk_dev *d)
{
	memset(d->dirty, 0, d->nwords * sizeof(uint64_t));
	d->ndirty = 0;
	d->cursor = 0;
	d->dirty_scan = 0;
	d->sess_records = d->sess_bytes = 0;
}

/*
 * A record staged but whose size was never read cannot have been read out
 * correctly, yet its chunks already count as sent: queue them again rather
 * than lose them. (Once data_size was read, the caller had what it needed.)
 */
static void unstage(struct bulk_dev *d)
{
	if (d->seq != SEQ_SRC_STAGED)
		return;
	for (uint64_t c = d->staged_first; c < d->staged_first + d->staged_count; c++) {
		if (!bit_test(d->dirty, c)) {
			bit_set(d->dirty, c);
			d->ndirty++;
		}
	}
}

static void enter_error(struct bulk_dev *d)
{
	d->state = BULK_ERROR;
	seq_reset(d);
	regs_sync(d);
}

/* Stage the next record into the data area: the initial sweep first, then
 * dirty chunks round robin, runs of consecutive chunks up to the area. */
static void stage(struct bulk_dev *d)
{
	uint8_t *rec = d->region + BULK_DATA_OFFSET;
	uint64_t first = 0, count = 0;

	if (d->cursor < d->nchunks) {
		first = d->cursor;
		count = d->nchunks - first;
		if (count > BULK_REC_MAX_CHUNKS)
			count = BULK_REC_MAX_CHUNKS;
		d->cursor += count;
	} else if (d->ndirty) {
		first = bit_next(d->dirty, d->nchunks, d->dirty_scan);
		if (first == d->nchunks)
			first = bit_next(d->dirty, d->nchunks, 0);
		while (count < BULK_REC_MAX_CHUNKS && first + count < d->nchunks &&
		       bit_test(d->dirty, first + count)) {
			bit_clear(d->dirty, first + count);
			count++;
		}
		d->ndirty -= count;
		d->dirty_scan = first + count;
	}
	d->staged_first = first;
	d->staged_count = count;
	d->data_size = 0;
	if (count) {
		put_le32(rec, BULK_REC_MAGIC);
		put_le32(rec + 4, (uint32_t)count);
		put_le64(rec + 8, first * BULK_CHUNK);
		memcpy(rec + BULK_REC_HDR_SIZE, d->mem + first * BULK_CHUNK,
		       count * BULK_CHUNK);
		d->data_size = BULK_REC_HDR_SIZE + count * BULK_CHUNK;
	}
	d->seq = SEQ_SRC_STAGED;
}

/* ---- device ----------------------------------------------------------------- */

struct bulk_dev *bulk_new(const char *id, uint64_t size,
			  uint64_t dirty_rate_mbps, bool precopy,
			  struct ferry_error *err)
{
	struct bulk_dev *d;
	pthread_condattr_t ca;
	int r;

	if (!id || !*id) {
		ferry_error_set(err, -EINVAL, "bulk: device id is empty");
		return NULL;
	}
	if (!size || size % BULK_CHUNK) {
		ferry_error_set(err, -EINVAL, "bulk %s: size %" PRIu64 " is not a "
				"positive multiple of %u", id, size, BULK_CHUNK);
		return NULL;
	}
	if (dirty_rate_mbps > BULK_MAX_RATE_MBPS) {
		ferry_error_set(err, -EINVAL, "bulk %s: dirty rate %" PRIu64
				" MiB/s above the limit (%u)", id, dirty_rate_mbps,
				BULK_MAX_RATE_MBPS);
		return NULL;
	}
	d = calloc(1, sizeof(*d));
	if (!d) {
		ferry_error_set(err, -ENOMEM, "bulk %s: out of memory", id);
		return NULL;
	}
	d->mem = d->region = MAP_FAILED;
	d->id = strdup(id);
	d->size = size;
	d->nchunks = size / BULK_CHUNK;
	d->nwords = (d->nchunks + 63) / 64;
	d->rate_mbps = dirty_rate_mbps;
	d->precopy = precopy;
	d->tag = XXH3_64bits(id, strlen(id));
	d->rng = splitmix64(d->tag) | 1;
	d->dirty = calloc(d->nwords, sizeof(uint64_t));
	d->recv = calloc(d->nwords, sizeof(uint64_t));
	if (!d->id || !d->dirty || !d->recv) {
		r = ferry_error_set(err, -ENOMEM, "bulk %s: out of memory", id);
		goto fail;
	}
	/* NORESERVE: a big device should not need swap accounting up front;
	 * the fill below touches every page anyway. */
	d->mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (d->mem == MAP_FAILED) {
		r = ferry_error_set(err, -errno, "bulk %s: mmap of %" PRIu64
				    " bytes: %s", id, size, strerror(errno));
		goto fail;
	}
	/* First touch dominates creation: on a test VM, faulting in 512 MiB
	 * of 4 KiB pages costs ~2 s, of THP ~1 s, while the fill itself costs
	 * ~0.15 s. Huge pages also make bulk_verify's sweep cheaper. Advice
	 * only: failure (no THP) changes nothing. */
	madvise(d->mem, size, MADV_HUGEPAGE);
	d->region = mmap(NULL, BULK_REGION_SIZE, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (d->region == MAP_FAILED) {
		r = ferry_error_set(err, -errno, "bulk %s: mmap of the region: %s",
				    id, strerror(errno));
		goto fail;
	}
	if ((r = -pthread_mutex_init(&d->lock, NULL))) {
		ferry_error_set(err, r, "bulk %s: mutex: %s", id, strerror(-r));
		goto fail;
	}
	/* The dirtier sleeps on absolute CLOCK_MONOTONIC deadlines. */
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	r = -pthread_cond_init(&d->wake, &ca);
	pthread_condattr_destroy(&ca);
	if (r) {
		pthread_mutex_destroy(&d->lock);
		ferry_error_set(err, r, "bulk %s: condvar: %s", id, strerror(-r));
		goto fail;
	}
	for (uint64_t c = 0; c < d->nchunks; c++)
		chunk_write(d, c, 1);
	d->state = BULK_RUNNING;
	regs_sync(d);
	return d;

fail:
	if (d->region != MAP_FAILED)
		munmap(d->region, BULK_REGION_SIZE);
	if (d->mem != MAP_FAILED)
		munmap(d->mem, size);
	free(d->recv);
	free(d->dirty);
	free(d->id);
	free(d);
	return NULL;
}

void bulk_free(struct bulk_dev *d)
{
	if (!d)
		return;
	bulk_stop(d);
	pthread_cond_destroy(&d->wake);
	pthread_mutex_destroy(&d->lock);
	munmap(d->region, BULK_REGION_SIZE);
	munmap(d->mem, d->size);
	free(d->recv);
	free(d->dirty);
	free(d->id);
	free(d);
}

const char *bulk_id(const struct bulk_dev *d) { return d->id; }
uint64_t bulk_size(const struct bulk_dev *d) { return d->size; }
uint64_t bulk_tag(const struct bulk_dev *d) { return d->tag; }
bool bulk_has_precopy(const struct bulk_dev *d) { return d->precopy; }

void bulk_get_stats(struct bulk_dev *d, struct bulk_stats *st)
{
	pthread_mutex_lock(&d->lock);
	*st = d->stats;
	pthread_mutex_unlock(&d->lock);
}

/* ---- the dirtier --------------------------------------------------------------- */

/* Rewrite one random chunk with the next generation. Lock held: a reader
 * (staging, verify) never sees half a chunk. */
static void dirty_one(struct bulk_dev *d)
{
	uint64_t c, gen;

	d->rng = xorshift64(d->rng);
	c = d->rng % d->nchunks;
	memcpy(&gen, d->mem + c * BULK_CHUNK + 3 * sizeof(uint64_t), sizeof(gen));
	chunk_write(d, c, gen + 1);
	d->stats.chunks_dirtied++;
	/* Only a chunk already handed out needs sending again (see the top). */
	if (d->state == BULK_PRE_COPY && c < d->cursor && !bit_test(d->dirty, c)) {
		bit_set(d->dirty, c);
		d->ndirty++;
	}
}

static void *dirtier_main(void *arg)
{
	struct bulk_dev *d = arg;
	/* Bytes per ns, and a cap on saved-up credit so a long stall (a
	 * STOP, a descheduled thread) does not come back as a burst. */
	const double rate = (double)(d->rate_mbps << 20) / 1e9;
	double cap = rate * DIRTY_STEP_NS * 4, credit = 0;
	uint64_t last = now_ns(), next = last;

	if (cap < BULK_CHUNK)
		cap = BULK_CHUNK;
	pthread_mutex_lock(&d->lock);
	while (!d->stop_req) {
		struct timespec ts;
		uint64_t now;

		next += DIRTY_STEP_NS;
		ts.tv_sec = (time_t)(next / 1000000000ull);
		ts.tv_nsec = (long)(next % 1000000000ull);
		while (!d->stop_req &&
		       pthread_cond_timedwait(&d->wake, &d->lock, &ts) != ETIMEDOUT)
			;
		if (d->stop_req)
			break;
		now = now_ns();
		if (now > next + 10 * DIRTY_STEP_NS)  /* fell far behind: resync */
			next = now;
		credit += (double)(now - last) * rate;
		last = now;
		if (credit > cap)
			credit = cap;
		while (credit >= BULK_CHUNK && !d->stop_req &&
		       (d->state == BULK_RUNNING || d->state == BULK_PRE_COPY)) {
			dirty_one(d);
			credit -= BULK_CHUNK;
			/* One chunk per lock hold: let the migration in. */
			pthread_mutex_unlock(&d->lock);
			pthread_mutex_lock(&d->lock);
		}
		if (d->state != BULK_RUNNING && d->state != BULK_PRE_COPY)
			credit = 0;
	}
	pthread_mutex_unlock(&d->lock);
	return NULL;
}

int bulk_start(struct bulk_dev *d, struct ferry_error *err)
{
	int r;

	if (d->thread_running)
		return ferry_error_set(err, -EBUSY, "bulk %s: dirtier already "
				       "running", d->id);
	if (!d->rate_mbps)
		return 0;
	pthread_mutex_lock(&d->lock);
	d->stop_req = false;
	pthread_mutex_unlock(&d->lock);
	r = pthread_create(&d->thread, NULL, dirtier_main, d);
	if (r)
		return ferry_error_set(err, -r, "bulk %s: dirtier thread: %s",
				       d->id, strerror(r));
	d->thread_running = true;
	return 0;
}

void bulk_stop(struct bulk_dev *d)
{
	if (!d->thread_running)
		return;
	pthread_mutex_lock(&d->lock);
	d->stop_req = true;
	pthread_cond_signal(&d->wake);
	pthread_mutex_unlock(&d->lock);
	pthread_join(d->thread, NULL);
	d->thread_running = false;
}

int bulk_verify(struct bulk_dev *d, uint64_t *bad_chunks, uint64_t *digest)
{
	XXH3_state_t hs;
	uint64_t bad = 0;

	/* One pass for both, chunk by chunk, while the chunk is in cache. */
	XXH3_64bits_reset(&hs);
	pthread_mutex_lock(&d->lock);
	for (uint64_t c = 0; c < d->nchunks; c++) {
		if (!chunk_ok(d, c))
			bad++;
		if (digest)
			XXH3_64bits_update(&hs, d->mem + c * BULK_CHUNK, BULK_CHUNK);
	}
	pthread_mutex_unlock(&d->lock);
	if (bad_chunks)
		*bad_chunks = bad;
	if (digest)
		*digest = XXH3_64bits_digest(&hs);
	return 0;
}

/* ---- state machine ------------------------------------------------------------- */

static const char *const state_names[BULK_NR_STATES] = {
	[BULK_RUNNING] = "RUNNING",
	[BULK_STOP] = "STOP",
	[BULK_PRE_COPY] = "PRE_COPY",
	[BULK_STOP_COPY] = "STOP_COPY",
	[BULK_RESUMING] = "RESUMING",
	[BULK_ERROR] = "ERROR",
};

/*
 * arc[from][to]: the direct arcs of linux/vfio.h's migration FSM (P2P
 * states left out) plus staying put, which the kernel accepts as a no-op.
 * No arc leads into ERROR (only a failure does) and none leaves it.
 */
static const bool arc[BULK_NR_STATES][BULK_NR_STATES] = {
	[BULK_RUNNING]   = { [BULK_RUNNING] = true, [BULK_STOP] = true,
			     [BULK_PRE_COPY] = true },
	[BULK_STOP]      = { [BULK_STOP] = true, [BULK_RUNNING] = true,
			     [BULK_STOP_COPY] = true, [BULK_RESUMING] = true },
	[BULK_PRE_COPY]  = { [BULK_PRE_COPY] = true, [BULK_RUNNING] = true,
			     [BULK_STOP_COPY] = true },
	[BULK_STOP_COPY] = { [BULK_STOP_COPY] = true, [BULK_STOP] = true },
	[BULK_RESUMING]  = { [BULK_RESUMING] = true, [BULK_STOP] = true },
	[BULK_ERROR]     = { 0 },
};

const char *bulk_state_name(enum bulk_state s)
{
	return (unsigned)s < BULK_NR_STATES ? state_names[s] : "?";
}

enum bulk_state bulk_get_state(struct bulk_dev *d)
{
	enum bulk_state s;

	pthread_mutex_lock(&d->lock);
	s = d->state;
	pthread_mutex_unlock(&d->lock);
	return s;
}

static int set_state_locked(struct bulk_dev *d, enum bulk_state to,
			    struct ferry_error *err)
{
	enum bulk_state from = d->state;

	if ((unsigned)to >= BULK_NR_STATES)
		return ferry_error_set(err, -EINVAL, "bulk %s: no state %d",
				       d->id, (int)to);
	if (!arc[from][to])
		return ferry_error_set(err, -EINVAL, "bulk %s: no arc %s -> %s%s",
				       d->id, bulk_state_name(from),
				       bulk_state_name(to), from == BULK_ERROR ?
				       " (only a reset leaves ERROR)" : "");
	if (to == BULK_PRE_COPY && !d->precopy)
		return ferry_error_set(err, -EINVAL, "bulk %s: no arc %s -> %s: "
				       "the device has no PRE_COPY", d->id,
				       bulk_state_name(from), bulk_state_name(to));
	if (from == to)
		return 0;

	if (from == BULK_RESUMING && d->seq == SEQ_DST_OPEN && d->wr_len) {
		uint64_t got = d->wr_len;

		enter_error(d);
		return ferry_error_set(err, -EIO, "bulk %s: RESUMING -> STOP with "
				       "a record half written (%" PRIu64 " bytes, "
				       "data_size never written): state incomplete",
				       d->id, got);
	}
	if (saving(from))
		unstage(d);
	seq_reset(d);
	if ((from == BULK_RUNNING && to == BULK_PRE_COPY) ||
	    (from == BULK_STOP && to == BULK_STOP_COPY))
		save_session_start(d);
	if (to == BULK_RESUMING) {
		memset(d->recv, 0, d->nwords * sizeof(uint64_t));
		d->nrecv = 0;
		d->ld_records = 0;
	}
	d->state = to;
	regs_sync(d);
	return 0;
}

int bulk_set_state(struct bulk_dev *d, enum bulk_state to,
		   struct ferry_error *err)
{
	int r;

	pthread_mutex_lock(&d->lock);
	r = set_state_locked(d, to, err);
	pthread_mutex_unlock(&d->lock);
	return r;
}

void bulk_reset(struct bulk_dev *d)
{
	pthread_mutex_lock(&d->lock);
	seq_reset(d);
	save_session_start(d);
	d->state = BULK_RUNNING;
	regs_sync(d);
	pthread_mutex_unlock(&d->lock);
}

int bulk_pending(struct bulk_dev *d, uint64_t *initial_bytes,
		 uint64_t *dirty_bytes)
{
	int r = -EINVAL;
	uint64_t ini = 0, dirty = 0;

	pthread_mutex_lock(&d->lock);
	if (saving(d->state)) {
		ini = (d->nchunks - d->cursor) * BULK_CHUNK;
		dirty = d->ndirty * BULK_CHUNK;
		r = 0;
	}
	pthread_mutex_unlock(&d->lock);
	if (initial_bytes)
		*initial_bytes = ini;
	if (dirty_bytes)
		*dirty_bytes = dirty;
	return r;
}

/* ---- region ---------------------------------------------------------------------- */

static int wrong_state(struct bulk_dev *d, const char *what,
		       struct ferry_error *err)
{
	return ferry_error_set(err, -EINVAL, "bulk %s: %s in state %s", d->id,
			       what, bulk_state_name(d->state));
}

int bulk_read_pending_bytes(struct bulk_dev *d, uint64_t *out,
			    struct ferry_error *err)
{
	int r = 0;

	pthread_mutex_lock(&d->lock);
	if (!saving(d->state)) {
		r = wrong_state(d, "pending_bytes read", err);
	} else {
		*out = pending_locked(d);
		regs_sync(d);
	}
	pthread_mutex_unlock(&d->lock);
	return r;
}

int bulk_read_data_offset(struct bulk_dev *d, uint64_t *off,
			  struct ferry_error *err)
{
	int r = 0;

	pthread_mutex_lock(&d->lock);
	if (saving(d->state)) {
		/* A second read before data_size is the same record: staging
		 * again would hand out (and lose) the first one. */
		if (d->seq != SEQ_SRC_STAGED)
			stage(d);
	} else if (d->state == BULK_RESUMING) {
		if (d->seq != SEQ_DST_OPEN) {
			d->seq = SEQ_DST_OPEN;
			d->wr_len = 0;
		}
	} else {
		r = wrong_state(d, "data_offset read", err);
	}
	if (!r) {
		*off = BULK_DATA_OFFSET;
		regs_sync(d);
	}
	pthread_mutex_unlock(&d->lock);
	return r;
}

int bulk_read_data_size(struct bulk_dev *d, uint64_t *sz,
			struct ferry_error *err)
{
	int r = 0;

	pthread_mutex_lock(&d->lock);
	if (!saving(d->state)) {
		r = wrong_state(d, "data_size read", err);
	} else if (d->seq == SEQ_IDLE) {
		r = ferry_error_set(err, -EINVAL, "bulk %s: invalid sequence: "
				    "data_size read before data_offset", d->id);
	} else {
		/* The record counts as handed out once its size is known. */
		if (d->seq == SEQ_SRC_STAGED && d->staged_count) {
			uint64_t bytes = d->data_size;

			if (d->state == BULK_PRE_COPY) {
				d->stats.precopy_bytes += bytes;
				d->stats.precopy_records++;
			} else {
				d->stats.stopcopy_bytes += bytes;
				d->stats.stopcopy_records++;
			}
			d->sess_records++;
			d->sess_bytes += d->staged_count * BULK_CHUNK;
		}
		d->seq = SEQ_SRC_SIZED;
		*sz = d->data_size;
	}
	pthread_mutex_unlock(&d->lock);
	return r;
}

static bool range_ok(uint64_t off, size_t len, uint64_t lo, uint64_t hi)
{
	return off >= lo && off <= hi && len <= hi - off;
}

int bulk_region_read(struct bulk_dev *d, uint64_t off, void *buf, size_t len,
		     struct ferry_error *err)
{
	if (!range_ok(off, len, 0, BULK_REGION_SIZE) || (!buf && len))
		return ferry_error_set(err, -EINVAL, "bulk %s: region read of %zu "
				       "bytes at %" PRIu64 " outside the region "
				       "(%u bytes)", d->id, len, off,
				       BULK_REGION_SIZE);
	pthread_mutex_lock(&d->lock);
	memcpy(buf, d->region + off, len);
	pthread_mutex_unlock(&d->lock);
	return 0;
}

int bulk_region_write(struct bulk_dev *d, uint64_t off, const void *buf,
		      size_t len, struct ferry_error *err)
{
	int r = 0;

	pthread_mutex_lock(&d->lock);
	if (d->state != BULK_RESUMING) {
		r = wrong_state(d, "region write", err);
	} else if (d->seq != SEQ_DST_OPEN) {
		r = ferry_error_set(err, -EINVAL, "bulk %s: invalid sequence: "
				    "region write before data_offset", d->id);
	} else if (!range_ok(off, len, BULK_DATA_OFFSET, BULK_REGION_SIZE) ||
		   (!buf && len)) {
		r = ferry_error_set(err, -EINVAL, "bulk %s: write of %zu bytes at "
				    "%" PRIu64 " outside the staged area [%u, %u)",
				    d->id, len, off, BULK_DATA_OFFSET,
				    BULK_REGION_SIZE);
	} else if (off - BULK_DATA_OFFSET > d->wr_len) {
		/* Writes must grow one run from the area's start: then "the
		 * first sz bytes were written" is a single comparison, and no
		 * stale bytes of an earlier record can slip into this one. */
		r = ferry_error_set(err, -EINVAL, "bulk %s: write at %" PRIu64
				    " leaves a gap after the %" PRIu64 " bytes "
				    "written so far", d->id, off, d->wr_len);
	} else {
		uint64_t end = off - BULK_DATA_OFFSET + len;

		memcpy(d->region + off, buf, len);
		if (end > d->wr_len)
			d->wr_len = end;
	}
	pthread_mutex_unlock(&d->lock);
	return r;
}

/* Consume the record in the data area: validate all of it, then copy. */
static int consume_locked(struct bulk_dev *d, uint64_t sz,
			  struct ferry_error *err)
{
	const uint8_t *rec = d->region + BULK_DATA_OFFSET;
	uint32_t magic, count;
	uint64_t off, first;

	if (sz < BULK_REC_HDR_SIZE || sz > BULK_REC_MAX)
		return ferry_error_set(err, -EINVAL, "bulk %s: data_size %" PRIu64
				       " is not a record size (%u..%u)", d->id,
				       sz, BULK_REC_HDR_SIZE, BULK_REC_MAX);
	if (sz > d->wr_len)
		return ferry_error_set(err, -EINVAL, "bulk %s: data_size %" PRIu64
				       " but only %" PRIu64 " bytes written",
				       d->id, sz, d->wr_len);
	magic = get_le32(rec);
	count = get_le32(rec + 4);
	off = get_le64(rec + 8);
	if (magic != BULK_REC_MAGIC)
		return ferry_error_set(err, -EBADMSG, "bulk %s: record magic "
				       "0x%08x, expected 0x%08x", d->id, magic,
				       BULK_REC_MAGIC);
	if (!count || count > BULK_REC_MAX_CHUNKS)
		return ferry_error_set(err, -EBADMSG, "bulk %s: record of %u "
				       "chunks (1..%u)", d->id, count,
				       BULK_REC_MAX_CHUNKS);
	if (off % BULK_CHUNK || off >= d->size ||
	    count > (d->size - off) / BULK_CHUNK)
		return ferry_error_set(err, -EBADMSG, "bulk %s: record of %u "
				       "chunks at offset %" PRIu64 " does not fit "
				       "%" PRIu64 " bytes of aligned state", d->id,
				       count, off, d->size);
	if (sz != BULK_REC_HDR_SIZE + (uint64_t)count * BULK_CHUNK)
		return ferry_error_set(err, -EINVAL, "bulk %s: data_size %" PRIu64
				       " disagrees with a record of %u chunks",
				       d->id, sz, count);
	memcpy(d->mem + off, rec + BULK_REC_HDR_SIZE, (size_t)count * BULK_CHUNK);
	first = off / BULK_CHUNK;
	for (uint64_t c = first; c < first + count; c++) {
		if (!bit_test(d->recv, c)) {
			bit_set(d->recv, c);
			d->nrecv++;
		}
	}
	d->ld_records++;
	d->stats.loaded_records++;
	d->stats.loaded_bytes += sz;
	return 0;
}

int bulk_write_data_size(struct bulk_dev *d, uint64_t sz,
			 struct ferry_error *err)
{
	int r;

	pthread_mutex_lock(&d->lock);
	if (d->state != BULK_RESUMING) {
		r = wrong_state(d, "data_size write", err);
	} else if (d->seq != SEQ_DST_OPEN) {
		r = ferry_error_set(err, -EINVAL, "bulk %s: invalid sequence: "
				    "data_size written before data_offset", d->id);
	} else {
		/* Anything wrong with the record itself is the device failing
		 * to load: ERROR, so the load cannot be mistaken for done. */
		r = consume_locked(d, sz, err);
		if (r) {
			enter_error(d);
		} else {
			seq_reset(d);
			regs_sync(d);
		}
	}
	pthread_mutex_unlock(&d->lock);
	return r;
}

const void *bulk_region_map(struct bulk_dev *d, size_t *len)
{
	if (len)
		*len = BULK_REGION_SIZE;
	return d->region;
}

/* ---- glue helpers ----------------------------------------------------------------- */

int bulk_save_chunk(struct bulk_dev *d, void *buf, size_t cap, size_t *len,
		    struct ferry_error *err)
{
	uint64_t pending, off, sz;
	int r;

	if (!buf || !len || cap < BULK_REC_MAX)
		return ferry_error_set(err, -EINVAL, "bulk %s: save buffer of %zu "
				       "bytes, need %u", d->id, buf ? cap : 0,
				       BULK_REC_MAX);
	*len = 0;
	if ((r = bulk_read_pending_bytes(d, &pending, err)))
		return r;
	if (!pending)
		return 0;
	if ((r = bulk_read_data_offset(d, &off, err)) ||
	    (r = bulk_read_data_size(d, &sz, err)))
		return r;
	if (!sz)
		return 0;
	if ((r = bulk_region_read(d, off, buf, sz, err)))
		return r;
	*len = sz;
	return 0;
}

int bulk_load_chunk(struct bulk_dev *d, const void *buf, size_t len,
		    struct ferry_error *err)
{
	uint64_t off;
	int r;

	/* Refused before the device sees it: no half-written record. */
	if (!buf || len > BULK_REC_MAX)
		return ferry_error_set(err, -EINVAL, "bulk %s: record of %zu "
				       "bytes (at most %u)", d->id, len,
				       BULK_REC_MAX);
	if ((r = bulk_read_data_offset(d, &off, err)) ||
	    (r = bulk_region_write(d, off, buf, len, err)))
		return r;
	return bulk_write_data_size(d, len, err);
}

/* ---- config blob ------------------------------------------------------------------ */

/* Layout, little endian:
 *   0 magic u32   4 version u32   8 size u64   16 tag u64
 *  24 chunk u32  28 flags u32    32 data_offset u64   40 region size u64
 *  48 records u64  56 chunk bytes u64  64 pending bytes u64
 *  72 XXH3-64 of bytes 0..71 */
size_t bulk_config_save(struct bulk_dev *d, void *buf, size_t cap)
{
	uint8_t *p = buf;
	uint64_t pending;

	if (!buf || cap < BULK_CONFIG_SIZE)
		return 0;
	pthread_mutex_lock(&d->lock);
	if (d->state != BULK_STOP_COPY) {
		pthread_mutex_unlock(&d->lock);
		return 0;
	}
	pending = pending_locked(d);
	memset(p, 0, BULK_CONFIG_SIZE);
	put_le32(p, BULK_CFG_MAGIC);
	put_le32(p + 4, BULK_CFG_VERSION);
	put_le64(p + 8, d->size);
	put_le64(p + 16, d->tag);
	put_le32(p + 24, BULK_CHUNK);
	/* A record staged but not sized is queued again by the next state
	 * change, so it is pending too. */
	put_le32(p + 28, pending || (d->seq == SEQ_SRC_STAGED &&
				     d->staged_count) ? 0 : BULK_CFG_COMPLETE);
	put_le64(p + 32, BULK_DATA_OFFSET);
	put_le64(p + 40, BULK_REGION_SIZE);
	put_le64(p + 48, d->sess_records);
	put_le64(p + 56, d->sess_bytes);
	put_le64(p + 64, pending);
	pthread_mutex_unlock(&d->lock);
	put_le64(p + 72, XXH3_64bits(p, 72));
	return BULK_CONFIG_SIZE;
}

int bulk_config_load(struct bulk_dev *d, const void *buf, size_t len,
		     struct ferry_error *err)
{
	const uint8_t *p = buf;
	uint64_t size, tag, records;
	int r = 0;

	if (!buf || len != BULK_CONFIG_SIZE)
		return ferry_error_set(err, -EBADMSG, "bulk %s: config of %zu "
				       "bytes, expected %u", d->id, buf ? len : 0,
				       BULK_CONFIG_SIZE);
	if (get_le32(p) != BULK_CFG_MAGIC || get_le32(p + 4) != BULK_CFG_VERSION ||
	    get_le64(p + 72) != XXH3_64bits(p, 72))
		return ferry_error_set(err, -EBADMSG, "bulk %s: config damaged "
				       "(magic, version or check)", d->id);
	size = get_le64(p + 8);
	tag = get_le64(p + 16);
	records = get_le64(p + 48);
	if (get_le32(p + 24) != BULK_CHUNK || get_le64(p + 32) != BULK_DATA_OFFSET ||
	    get_le64(p + 40) != BULK_REGION_SIZE)
		return ferry_error_set(err, -EINVAL, "bulk %s: config from a device "
				       "with another layout (chunk %u, data "
				       "offset %" PRIu64 ", region %" PRIu64 ")",
				       d->id, get_le32(p + 24), get_le64(p + 32),
				       get_le64(p + 40));
	if (size != d->size)
		return ferry_error_set(err, -EINVAL, "bulk %s: config from a device "
				       "of %" PRIu64 " bytes, this one has %"
				       PRIu64, d->id, size, d->size);
	if (tag != d->tag)
		return ferry_error_set(err, -EINVAL, "bulk %s: config from a device "
				       "with tag %016" PRIx64 ", this one has %016"
				       PRIx64 " (created with another id?)",
				       d->id, tag, d->tag);

	pthread_mutex_lock(&d->lock);
	if (d->state != BULK_RESUMING) {
		r = wrong_state(d, "config load", err);
	} else if (d->seq == SEQ_DST_OPEN && d->wr_len) {
		r = ferry_error_set(err, -EINVAL, "bulk %s: config load with a "
				    "record half written", d->id);
	} else if (get_le32(p + 28) & BULK_CFG_COMPLETE &&
		   (d->nrecv != d->nchunks || d->ld_records != records)) {
		/* The source drained its session: it sent every chunk, so all
		 * must be here, in as many records as it handed out. */
		r = ferry_error_set(err, -EIO, "bulk %s: incomplete state: %"
				    PRIu64 " of %" PRIu64 " chunks and %" PRIu64
				    " of %" PRIu64 " records arrived", d->id,
				    d->nrecv, d->nchunks, d->ld_records, records);
		enter_error(d);
	}
	pthread_mutex_unlock(&d->lock);
	return r;
}
