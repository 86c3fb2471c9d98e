/*
 * load.c - the load loop: verify each record, then dispatch it.
 *
 * Order of trust: ferry_record_read() has verified a record's length and
 * check before we look inside, so everything here is about *meaning*: a
 * section for a device we do not have, a PART before its START, a version
 * outside the window, a device that leaves bytes unread. Each is a load
 * failure whose message names the stream offset and the section.
 *
 * Device-state buffers (DEVSTATE records) are handed to a per-device load
 * thread through a bounded queue: the main load thread keeps reading the
 * stream while devices with expensive loads (think VFIO) work in parallel,
 * and a slow device applies backpressure instead of eating memory.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "internal.h"

/* Bytes of device-state buffers queued for one device before the reader
 * waits for the device's load thread to catch up. */
#define DEVSTATE_QUEUE_BYTES (64u << 20)
/* PACKAGED may nest records one level deep, never a package in a package. */
#define MAX_PACKAGE_DEPTH 1

enum slot_state { SLOT_NONE, SLOT_STARTED, SLOT_ENDED, SLOT_FULL };

struct dsbuf {
	struct dsbuf *next;
	size_t len;
	uint8_t data[];
};

/* A device's load thread and its queue. */
struct dsworker {
	pthread_t thread;
	bool running;
	pthread_mutex_t lock;
	pthread_cond_t cond;          /* signalled on push, pop and close */
	struct dsbuf *head, **tail;   /* guarded by lock */
	size_t queued;                /* guarded by lock */
	bool closed;                  /* guarded by lock: no more pushes */
	bool busy;                    /* guarded by lock: a buffer is being applied */
	bool failed;                  /* guarded by lock */
	uint32_t next_seq;            /* reader thread only */
	struct ferry_error err;       /* worker thread; read after join */
};

struct slot {
	struct ferry_dev *dev;
	enum slot_state state;
	uint32_t stream_id;           /* section id chosen by the source */
	uint32_t version;
	bool loaded;                  /* any state arrived */
	struct dsworker *ds;
};

struct loader;

/* Postcopy's listen thread: from the package on it reads the stream (RAM
 * pages, END, EOF) while the load thread loads the package, so a device
 * whose load touches a page that has not arrived yet waits for that page
 * instead of for itself. It may load only the RAM section (the others
 * belong to the load thread now), and the load thread joins it before it
 * looks at anything it wrote. */
struct listen_thread {
	struct loader *L;
	struct slot *ram;             /* immutable: the "ram" slot */
	pthread_t thread;
	int ret;                      /* read after join */
	struct ferry_error err;       /* listen thread; read after join */
};

struct loader {
	struct ferry_ctx *ctx;
	const struct ferry__load_hooks *hooks; /* may be NULL */
	bool listening;               /* POSTCOPY_LISTEN accepted */
	bool stream_done;             /* the listen thread read through EOF */
	bool in_package;              /* loading postcopy's package */
	const struct ferry_load_opts *opts; /* = &o, or NULL */
	struct ferry_load_opts o;     /* the caller's, at this layout */
	struct ferry_record_io *io;   /* the top-level reader */
	bool dev_load_open;           /* device_load_begin ran, end not yet */
	struct slot *slots;           /* one per registered device */
	unsigned nslots;
	struct ferry_error *err;
	char last[FERRY_IDSTR_MAX + 32]; /* last section loaded, for messages */
	struct ferry_load_stats stats;
	XXH3_state_t digest;             /* over FULL sections, see save.c */
};


static struct slot *slot_by_dev(struct loader *L, const char *idstr,
				uint32_t instance)
{
	for (unsigned i = 0; i < L->nslots; i++)
		if (L->slots[i].dev->instance == instance &&
		    !strcmp(L->slots[i].dev->idstr, idstr))
			return &L->slots[i];
	return NULL;
}

static struct slot *slot_by_id(struct loader *L, uint32_t id)
{
	for (unsigned i = 0; i < L->nslots; i++)
		if (L->slots[i].state != SLOT_NONE && L->slots[i].stream_id == id)
			return &L->slots[i];
	return NULL;
}

/* ---- device-state load threads ---------------------------------------- */

static void *ds_main(void *arg)
{
	struct slot *sl = arg;
	struct dsworker *w = sl->ds;

	for (;;) {
		struct dsbuf *b;
		int r;

		ferry__mutex_lock(&w->lock);
		while (!w->head && !w->closed)
			pthread_cond_wait(&w->cond, &w->lock);
		b = w->head;
		if (b) {
			w->head = b->next;
			if (!w->head)
				w->tail = &w->head;
			w->queued -= b->len;
			w->busy = true;
			pthread_cond_broadcast(&w->cond);
		}
		ferry__mutex_unlock(&w->lock);
		if (!b)
			return NULL;
		/* After a failure, drain without loading. */
		if (!w->err.code) {
			r = sl->dev->ops->load_buffer(sl->dev->opaque, b->data,
						      b->len, &w->err);
			if (r) {
				if (!w->err.code)
					ferry_error_set(&w->err, r, "load_buffer failed");
				ferry__mutex_lock(&w->lock);
				w->failed = true;
				ferry__mutex_unlock(&w->lock);
			}
		}
		free(b);
		ferry__mutex_lock(&w->lock);
		w->busy = false;
		pthread_cond_broadcast(&w->cond);
		ferry__mutex_unlock(&w->lock);
	}
}

static int ds_start(struct slot *sl, struct ferry_error *err)
{
	struct dsworker *w = calloc(1, sizeof(*w));
	int e;

	if (!w)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->cond, NULL);
	w->tail = &w->head;
	sl->ds = w;
	e = pthread_create(&w->thread, NULL, ds_main, sl);
	if (e)
		return ferry_error_set(err, -e, "cannot start load thread: %s",
				       strerror(e));
	w->running = true;
	return 0;
}

static int ds_push(struct slot *sl, const uint8_t *data, size_t len,
		   struct ferry_error *err)
{
	struct dsworker *w = sl->ds;
	struct dsbuf *b = malloc(sizeof(*b) + len);
	bool failed;

	if (!b)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	b->next = NULL;
	b->len = len;
	memcpy(b->data, data, len);
	ferry__mutex_lock(&w->lock);
	while (w->queued && w->queued + len > DEVSTATE_QUEUE_BYTES && !w->failed)
		pthread_cond_wait(&w->cond, &w->lock);
	*w->tail = b;
	w->tail = &b->next;
	w->queued += len;
	failed = w->failed;
	pthread_cond_broadcast(&w->cond);
	ferry__mutex_unlock(&w->lock);
	/* Stop reading early if the device already failed. */
	return failed ? -ECANCELED : 0;
}

/*
 * Wait until the device's load thread has applied every buffer queued so
 * far: a device's own sections (its configuration) load only after all of
 * its data. -ECANCELED if the thread failed (ds_finish reports why).
 */
static int ds_drain(struct slot *sl)
{
	struct dsworker *w = sl->ds;
	bool failed;

	if (!w)
		return 0;
	ferry__mutex_lock(&w->lock);
	while ((w->head || w->busy) && !w->failed)
		pthread_cond_wait(&w->cond, &w->lock);
	failed = w->failed;
	ferry__mutex_unlock(&w->lock);
	return failed ? -ECANCELED : 0;
}

/* Close every queue, join every worker, report the first device error. */
static int ds_finish(struct loader *L, int r)
{
	for (unsigned i = 0; i < L->nslots; i++) {
		struct dsworker *w = L->slots[i].ds;

		if (!w)
			continue;
		if (w->running) {
			ferry__mutex_lock(&w->lock);
			w->closed = true;
			pthread_cond_broadcast(&w->cond);
			ferry__mutex_unlock(&w->lock);
			pthread_join(w->thread, NULL);
		}
		/* -ECANCELED means the reader stopped because this worker
		 * failed; the worker's error is the real one. */
		if (w->err.code && (!r || r == -ECANCELED)) {
			ferry_error_propagate(L->err, &w->err);
			r = ferry_error_prefix(L->err,
				"device '%s' instance %u (load thread): ",
				L->slots[i].dev->idstr, L->slots[i].dev->instance);
		}
		pthread_mutex_destroy(&w->lock);
		pthread_cond_destroy(&w->cond);
		free(w);
		L->slots[i].ds = NULL;
	}
	return r;
}

/* ---- records ------------------------------------------------------------ */

static int load_section(struct loader *L, const struct ferry_record *rec)
{
	struct ferry_chan *c = ferry_chan_new_mem_reader(rec->body, rec->len);
	struct ferry_error *err = L->err;
	char idstr[FERRY_IDSTR_MAX + 1] = "";
	uint32_t id, instance = 0, version = 0;
	struct slot *sl = NULL;
	uint64_t t0 = 0;
	size_t left;
	int r;

	if (!c)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	id = ferry_get_be32(c);
	if (rec->type == FERRY_REC_SECTION_START ||
	    rec->type == FERRY_REC_SECTION_FULL) {
		ferry_get_str8(c, idstr, sizeof(idstr));
		instance = ferry_get_be32(c);
		version = ferry_get_be32(c);
	}
	if ((r = ferry_chan_error(c, err))) {
		ferry_error_prefix(err, "offset %llu: %s section header: ",
				   (unsigned long long)rec->offset,
				   ferry_record_type_name(rec->type));
		goto out;
	}
	if (rec->type == FERRY_REC_SECTION_START ||
	    rec->type == FERRY_REC_SECTION_FULL) {
		bool full = rec->type == FERRY_REC_SECTION_FULL;

		sl = slot_by_dev(L, idstr, instance);
		if (!sl) {
			r = ferry_error_set(err, -ENOENT,
				"offset %llu: section '%s' instance %u: no such device here",
				(unsigned long long)rec->offset, idstr, instance);
			goto out;
		}
		if (sl->state != SLOT_NONE || slot_by_id(L, id)) {
			r = ferry_error_set(err, -EBADMSG,
				"offset %llu: section '%s' instance %u (id %u) appears twice",
				(unsigned long long)rec->offset, idstr, instance, id);
			goto out;
		}
		if (ferry__dev_iterable(sl->dev) == full) {
			r = ferry_error_set(err, -EBADMSG,
				"offset %llu: section '%s' instance %u: %s section for %s device",
				(unsigned long long)rec->offset, idstr, instance,
				full ? "FULL" : "START",
				full ? "an iterable" : "a non-iterable");
			goto out;
		}
		if (version < sl->dev->min_version || version > sl->dev->version) {
			r = ferry_error_set(err, -EINVAL,
				"offset %llu: section '%s' instance %u: version %u "
				"outside [%u, %u] supported here",
				(unsigned long long)rec->offset, idstr, instance,
				version, sl->dev->min_version, sl->dev->version);
			goto out;
		}
		sl->state = full ? SLOT_FULL : SLOT_STARTED;
		sl->stream_id = id;
		sl->version = version;
	} else {
		sl = slot_by_id(L, id);
		if (!sl || sl->state != SLOT_STARTED) {
			r = ferry_error_set(err, -EBADMSG,
				"offset %llu: %s for section id %u %s",
				(unsigned long long)rec->offset,
				ferry_record_type_name(rec->type), id,
				!sl ? "that was never started" :
				sl->state == SLOT_ENDED ? "after its END" :
				"of a non-iterable device");
			goto out;
		}
		if (rec->type == FERRY_REC_SECTION_END)
			sl->state = SLOT_ENDED;
	}
	sl->loaded = true;
	snprintf(L->last, sizeof(L->last), "'%s' instance %u", sl->dev->idstr,
		 sl->dev->instance);
	if ((r = ds_drain(sl)))
		goto out;
	if (rec->type == FERRY_REC_SECTION_FULL) {
		size_t off = rec->len - ferry_chan_mem_remaining(c);

		if (!L->stats.t_first_full) {
			L->stats.t_first_full = ferry__mono_ns();
			if (L->opts && L->opts->device_load_begin) {
				r = L->opts->device_load_begin(L->opts->opaque, err);
				if (r) {
					if (!err || !err->code)
						ferry_error_set(err, r, "failed");
					ferry_error_prefix(err, "device_load_begin: ");
					goto out;
				}
				L->dev_load_open = true;
			}
		}
		ferry__digest_section(&L->digest, idstr, instance, rec->body + off,
				      rec->len - off);
		t0 = ferry__mono_ns();
	}
	r = sl->dev->ops->load_state(c, sl->dev->opaque, sl->version, err);
	if (rec->type == FERRY_REC_SECTION_FULL)
		L->stats.device_load_ns += ferry__mono_ns() - t0;
	if (!r)
		r = ferry_chan_error(c, err);
	if (!r && (left = ferry_chan_mem_remaining(c)))
		r = ferry_error_set(err, -EBADMSG,
			"%zu bytes left unread (format mismatch)", left);
	if (r) {
		if (!err || !err->code)
			ferry_error_set(err, r, "load failed");
		ferry_error_prefix(err, "offset %llu: section '%s' instance %u (%s): ",
				   (unsigned long long)rec->offset, sl->dev->idstr,
				   sl->dev->instance,
				   ferry_record_type_name(rec->type));
	}
out:
	ferry_chan_free(c);
	return r;
}

static int load_devstate(struct loader *L, const struct ferry_record *rec)
{
	struct ferry_chan *c = ferry_chan_new_mem_reader(rec->body, rec->len);
	struct ferry_error *err = L->err;
	char idstr[FERRY_IDSTR_MAX + 1];
	uint32_t instance, seq;
	struct slot *sl;
	int r;

	if (!c)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	ferry_get_str8(c, idstr, sizeof(idstr));
	instance = ferry_get_be32(c);
	seq = ferry_get_be32(c);
	if ((r = ferry_chan_error(c, err))) {
		ferry_error_prefix(err, "offset %llu: DEVSTATE header: ",
				   (unsigned long long)rec->offset);
		goto out;
	}
	sl = slot_by_dev(L, idstr, instance);
	if (!sl || !sl->dev->ops->load_buffer) {
		r = ferry_error_set(err, -ENOENT,
			"offset %llu: device state for '%s' instance %u, which %s",
			(unsigned long long)rec->offset, idstr, instance,
			sl ? "takes no buffers" : "does not exist here");
		goto out;
	}
	if (!sl->ds && (r = ds_start(sl, err)))
		goto out;
	if (seq != sl->ds->next_seq) {
		r = ferry_error_set(err, -EBADMSG,
			"offset %llu: device state for '%s' instance %u: buffer %u "
			"arrived, expected %u",
			(unsigned long long)rec->offset, idstr, instance, seq,
			sl->ds->next_seq);
		goto out;
	}
	sl->ds->next_seq++;
	sl->loaded = true;
	{
		size_t off = rec->len - ferry_chan_mem_remaining(c);
		r = ds_push(sl, rec->body + off, rec->len - off, err);
	}
out:
	ferry_chan_free(c);
	return r;
}

static int load_records(struct loader *L, struct ferry_chan *in, unsigned depth);

/* The VMM's end of the non-iterable load (a memory-map commit, say): after
 * the last FULL section - at EOF, or at postcopy's RUN, which comes after
 * every device's state - and device-load time too: the destination cannot
 * run before it. */
static int device_load_close(struct loader *L, int r)
{
	uint64_t t0;
	struct ferry_error e2 = { 0 };
	int r2;

	if (!L->dev_load_open)
		return r;
	L->dev_load_open = false;
	t0 = ferry__mono_ns();
	r2 = L->opts->device_load_end(L->opts->opaque, r, r ? &e2 : L->err);
	L->stats.device_load_ns += ferry__mono_ns() - t0;
	if (r2 && !r) {
		if (!L->err->code)
			ferry_error_set(L->err, r2, "failed");
		r = ferry_error_prefix(L->err, "device_load_end: ");
	}
	return r;
}

/* A complete stream carries every device: a missing one would leave a
 * device in its reset state on the destination - silent data loss. At
 * postcopy's RUN (@postcopy) the same holds for every device but RAM,
 * which goes on. */
static int check_complete(struct loader *L, bool postcopy)
{
	for (unsigned i = 0; i < L->nslots; i++) {
		struct slot *sl = &L->slots[i];

		if (postcopy && !strcmp(sl->dev->idstr, "ram") && !sl->dev->instance)
			continue;
		if (sl->state == SLOT_STARTED)
			return ferry_error_set(L->err, -EBADMSG,
				"section '%s' instance %u: %s without its END",
				sl->dev->idstr, sl->dev->instance,
				postcopy ? "POSTCOPY_RUN" : "stream ended");
		if (!sl->loaded)
			return ferry_error_set(L->err, -ENODATA,
				"device '%s' instance %u: no state in the %s",
				sl->dev->idstr, sl->dev->instance,
				postcopy ? "postcopy package" : "stream");
	}
	return 0;
}

/* Postcopy's RUN: the device state is all here (and is what the source
 * sent, by its digest); publish the load's figures for the engine, which
 * runs the VM from on_command. */
static int before_run(struct loader *L, uint64_t src_digest)
{
	uint64_t digest = XXH3_64bits_digest(&L->digest);
	int r = ds_finish(L, 0);

	if (!r)
		r = check_complete(L, true);
	if (!r && src_digest && src_digest != digest)
		r = ferry_error_set(L->err, -EBADMSG, "the device state loaded "
			"(digest %016llx) is not what the source sent (%016llx)",
			(unsigned long long)digest, (unsigned long long)src_digest);
	r = device_load_close(L, r);
	if (!r && L->opts->stats) {
		L->stats.device_digest = digest;
		L->stats.size = sizeof(L->stats);
		ferry__fill_sized(L->opts->stats, &L->stats, sizeof(L->stats));
	}
	return r;
}

/* ---- postcopy: the listen thread ------------------------------------------ */

static int listen_section(struct listen_thread *lt, const struct ferry_record *rec)
{
	struct ferry_chan *c = ferry_chan_new_mem_reader(rec->body, rec->len);
	struct slot *sl = lt->ram;
	struct ferry_error *err = &lt->err;
	size_t left;
	uint32_t id;
	int r;

	if (!c)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	id = ferry_get_be32(c);
	if ((r = ferry_chan_error(c, err)))
		goto out;
	if (id != sl->stream_id || sl->state != SLOT_STARTED) {
		r = ferry_error_set(err, -EBADMSG, "offset %llu: %s for section "
			"id %u after POSTCOPY_LISTEN (only RAM, id %u, may "
			"follow it%s)", (unsigned long long)rec->offset,
			ferry_record_type_name(rec->type), id, sl->stream_id,
			sl->state == SLOT_ENDED ? ", and RAM has ended" : "");
		goto out;
	}
	if (rec->type == FERRY_REC_SECTION_END)
		sl->state = SLOT_ENDED;
	r = sl->dev->ops->load_state(c, sl->dev->opaque, sl->version, err);
	if (!r)
		r = ferry_chan_error(c, err);
	if (!r && (left = ferry_chan_mem_remaining(c)))
		r = ferry_error_set(err, -EBADMSG,
			"%zu bytes left unread (format mismatch)", left);
	if (r)
		ferry_error_prefix(err, "offset %llu: section 'ram' (%s, postcopy): ",
				   (unsigned long long)rec->offset,
				   ferry_record_type_name(rec->type));
out:
	ferry_chan_free(c);
	return r;
}

static int listen_command(struct listen_thread *lt, const struct ferry_record *rec)
{
	struct loader *L = lt->L;
	struct ferry_cmd_msg m = { 0 };
	size_t plen = rec->len >= 2 ? rec->len - 2 : 0;
	int r;

	if (rec->len < 2)
		return ferry_error_set(&lt->err, -EBADMSG,
			"offset %llu: COMMAND record too short",
			(unsigned long long)rec->offset);
	m.cmd = ferry__get_be16(rec->body);
	if (m.cmd == FERRY_CMD_HEARTBEAT && !plen)
		return 0;
	if (m.cmd == FERRY_CMD_PING && plen == 4)
		m.u.ping = ferry__get_be32(rec->body + 2);
	else if (m.cmd == FERRY_CMD_POSTCOPY_END && plen == 4)
		m.u.status = ferry__get_be32(rec->body + 2);
	else
		return ferry_error_set(&lt->err, -EBADMSG,
			"offset %llu: command %s (%zu-byte payload) after "
			"POSTCOPY_LISTEN, where only RAM, PING, HEARTBEAT and "
			"POSTCOPY_END may come", (unsigned long long)rec->offset,
			ferry_cmd_name(m.cmd), plen);
	r = L->opts->on_command(L->opts->opaque, &m, &lt->err);
	if (r)
		ferry_error_prefix(&lt->err, "offset %llu: command %s: ",
				   (unsigned long long)rec->offset,
				   ferry_cmd_name(m.cmd));
	return r;
}

static void *listen_main(void *arg)
{
	struct listen_thread *lt = arg;
	struct loader *L = lt->L;
	struct ferry_record rec;
	int r;

	for (;;) {
		r = ferry_record_read(L->io, &rec, &lt->err);
		if (r && L->hooks && L->hooks->reconnect) {
			/* Postcopy cannot give up: wait for a new link. */
			int rr = L->hooks->reconnect(L->hooks->opaque, L->io, r,
						     &lt->err);

			if (!rr) {
				ferry_error_clear(&lt->err);
				continue;
			}
			if (rr == 1) {
				ferry_error_clear(&lt->err);
				lt->ret = 0;
				return NULL;
			}
			r = rr;
		}
		if (r) {
			ferry_error_prefix(&lt->err, "postcopy: ");
			break;
		}
		switch (rec.type) {
		case FERRY_REC_SECTION_PART:
		case FERRY_REC_SECTION_END:
			r = listen_section(lt, &rec);
			break;
		case FERRY_REC_COMMAND:
			r = listen_command(lt, &rec);
			break;
		case FERRY_REC_EOF:
			L->stats.t_eof = ferry__mono_ns();
			if (rec.len)
				r = ferry_error_set(&lt->err, -EBADMSG,
					"offset %llu: EOF record with a body",
					(unsigned long long)rec.offset);
			lt->ret = r;
			return NULL;
		default:
			if (rec.type & 0x80)
				break;
			r = ferry_error_set(&lt->err, -EBADMSG,
				"offset %llu: %s record after POSTCOPY_LISTEN",
				(unsigned long long)rec.offset,
				ferry_record_type_name(rec.type));
		}
		if (r)
			break;
	}
	lt->ret = r;
	return NULL;
}

/* The records of a package (@c), which must end with its EOF. */
static int load_package(struct loader *L, struct ferry_chan *c, unsigned depth)
{
	int r = load_records(L, c, depth);

	if (!r && ferry_chan_mem_remaining(c))
		r = ferry_error_set(L->err, -EBADMSG,
			"%zu bytes after the package's EOF",
			ferry_chan_mem_remaining(c));
	return r;
}

/* Load the package (@c) while a listen thread reads the rest of the
 * stream; then wait for that thread, which ends at the stream's EOF. */
static int load_package_listening(struct loader *L, struct ferry_chan *c)
{
	struct listen_thread lt = { .L = L };
	int r, e;

	lt.ram = slot_by_dev(L, "ram", 0);
	if (!lt.ram || lt.ram->state != SLOT_STARTED)
		return ferry_error_set(L->err, -EBADMSG, "PACKAGED after "
				       "POSTCOPY_LISTEN, but no RAM section is open");
	e = pthread_create(&lt.thread, NULL, listen_main, &lt);
	if (e)
		return ferry_error_set(L->err, -e, "cannot start the listen thread");
	L->in_package = true;
	r = load_package(L, c, 1);
	L->in_package = false;
	if (r && L->hooks && L->hooks->stop_listen)
		L->hooks->stop_listen(L->hooks->opaque);
	pthread_join(lt.thread, NULL);
	L->stream_done = true;
	if (!r && lt.ret) {
		ferry_error_propagate(L->err, &lt.err);
		r = lt.ret;
	}
	return r;
}

static int load_command(struct loader *L, const struct ferry_record *rec,
			unsigned depth)
{
	struct ferry_error *err = L->err;
	struct ferry_cmd_msg m;
	const uint8_t *p = rec->body + 2;
	size_t plen;
	int r = 0;

	if (rec->len < 2)
		return ferry_error_set(err, -EBADMSG,
			"offset %llu: COMMAND record too short",
			(unsigned long long)rec->offset);
	memset(&m, 0, sizeof(m));
	m.cmd = ferry__get_be16(rec->body);
	plen = rec->len - 2;

#define WANT_LEN(n) do { if (plen != (n)) goto bad_len; } while (0)
	switch (m.cmd) {
	case FERRY_CMD_HEARTBEAT:
		/* Keeps a quiet stream alive; nothing to do. */
		WANT_LEN(0);
		return 0;
	case FERRY_CMD_SWITCHOVER_GO:
	case FERRY_CMD_SWITCHOVER_ABORT:
		WANT_LEN(0);
		return ferry_error_set(err, -EBADMSG,
			"offset %llu: %s inside the stream (it may only follow "
			"EOF)", (unsigned long long)rec->offset,
			ferry_cmd_name(m.cmd));
	case FERRY_CMD_OPEN_RETURN_PATH:
		/* Version 2 says how often the source wants to hear from us. */
		if (plen == 4)
			m.u.peer_timeout_ms = ferry__get_be32(p);
		else
			WANT_LEN(0);
		break;
	case FERRY_CMD_POSTCOPY_LISTEN:
	case FERRY_CMD_POSTCOPY_RUN:
		/* RUN may carry the source's device-state digest. */
		if (m.cmd == FERRY_CMD_POSTCOPY_RUN && plen == 8)
			m.u.run_digest = ferry__get_be64(p);
		else
			WANT_LEN(0);
		/* LISTEN hands the stream to a listen thread at the package;
		 * RUN must follow the device state, so it lives inside the
		 * package, after it. */
		if ((m.cmd == FERRY_CMD_POSTCOPY_LISTEN) != (depth == 0))
			return ferry_error_set(err, -EBADMSG,
				"offset %llu: %s %s the package",
				(unsigned long long)rec->offset,
				ferry_cmd_name(m.cmd), depth ? "inside" : "outside");
		break;
	case FERRY_CMD_SWITCHOVER_START:
		WANT_LEN(0);
		break;
	case FERRY_CMD_POSTCOPY_END:
	case FERRY_CMD_POSTCOPY_RESUME:
		return ferry_error_set(err, -EBADMSG,
			"offset %llu: %s before postcopy runs",
			(unsigned long long)rec->offset, ferry_cmd_name(m.cmd));
	case FERRY_CMD_PING:
		WANT_LEN(4);
		m.u.ping = ferry__get_be32(p);
		break;
	case FERRY_CMD_POSTCOPY_ADVISE:
		WANT_LEN(16);
		m.u.advise.host_page_size = ferry__get_be64(p);
		m.u.advise.target_page_size = ferry__get_be64(p + 8);
		break;
	case FERRY_CMD_POSTCOPY_DISCARD: {
		size_t nl;
		uint32_t n;

		if (plen < 1 || plen < 1 + (size_t)p[0] + 4)
			goto bad_len;
		nl = p[0];
		memcpy(m.u.discard.block, p + 1, nl);
		m.u.discard.block[nl] = 0;
		if (memchr(p + 1, 0, nl))
			goto bad_len;
		n = ferry__get_be32(p + 1 + nl);
		if (n > FERRY_DISCARD_MAX_RANGES)
			goto bad_len;
		WANT_LEN(1 + nl + 4 + (size_t)n * 16);
		m.u.discard.n = n;
		m.u.discard.ranges = p + 1 + nl + 4;
		break;
	}
	case FERRY_CMD_PACKAGED: {
		struct ferry_chan *c;

		if (depth >= MAX_PACKAGE_DEPTH)
			return ferry_error_set(err, -EBADMSG,
				"offset %llu: PACKAGED inside PACKAGED",
				(unsigned long long)rec->offset);
		/* The nested records live in the current record buffer, which
		 * the nested reader must not reuse: copy them out first. */
		{
			uint8_t *copy = malloc(plen ? plen : 1);
			if (!copy)
				return ferry_error_set(err, -ENOMEM, "out of memory");
			memcpy(copy, p, plen);
			c = ferry_chan_new_mem_reader(copy, plen);
			if (!c) {
				free(copy);
				return ferry_error_set(err, -ENOMEM, "out of memory");
			}
			/* Listening matters only to a VM with RAM to fault
			 * on; without one the package loads inline. */
			if (L->listening && slot_by_dev(L, "ram", 0))
				r = load_package_listening(L, c);
			else
				r = load_package(L, c, depth + 1);
			ferry_chan_free(c);
			free(copy);
		}
		if (r)
			ferry_error_prefix(err, "in PACKAGED at offset %llu: ",
					   (unsigned long long)rec->offset);
		return r;
	}
	default:
		return ferry_error_set(err, -EBADMSG,
			"offset %llu: unknown command %u",
			(unsigned long long)rec->offset, m.cmd);
	}
#undef WANT_LEN

	if (m.cmd == FERRY_CMD_SWITCHOVER_START) {
		for (unsigned i = 0; i < L->nslots && !r; i++) {
			struct ferry_dev *d = L->slots[i].dev;
			if (d->ops->switchover_start)
				r = d->ops->switchover_start(d->opaque, err);
			if (r)
				ferry_error_prefix(err, "device '%s' switchover_start: ",
						   d->idstr);
		}
		return r;
	}
	if (m.cmd == FERRY_CMD_POSTCOPY_RUN && L->in_package &&
	    (r = before_run(L, m.u.run_digest)))
		return ferry_error_prefix(err, "offset %llu: command %s: ",
					  (unsigned long long)rec->offset,
					  ferry_cmd_name(m.cmd));
	if (L->opts && L->opts->on_command) {
		r = L->opts->on_command(L->opts->opaque, &m, err);
		if (r)
			ferry_error_prefix(err, "offset %llu: command %s: ",
					   (unsigned long long)rec->offset,
					   ferry_cmd_name(m.cmd));
		else if (m.cmd == FERRY_CMD_POSTCOPY_LISTEN)
			L->listening = true;
		return r;
	}
	if (m.cmd == FERRY_CMD_OPEN_RETURN_PATH || m.cmd == FERRY_CMD_PING)
		return 0;
	return ferry_error_set(err, -EOPNOTSUPP,
		"offset %llu: command %s: postcopy not enabled on this destination",
		(unsigned long long)rec->offset, ferry_cmd_name(m.cmd));
bad_len:
	return ferry_error_set(err, -EBADMSG,
		"offset %llu: command %s with a malformed %zu-byte payload",
		(unsigned long long)rec->offset, ferry_cmd_name(m.cmd), plen);
}

/* Say which section a record that failed verification belongs to: from
 * its own (untrusted) header bytes if they survived, else the last good. */
static void name_damaged(struct loader *L, const struct ferry_record *rec)
{
	char idstr[FERRY_IDSTR_MAX + 1];
	uint32_t id = 0;
	int h = ferry_record_section_hint(rec, &id, idstr, sizeof(idstr));
	struct slot *sl = (h & 1) ? slot_by_id(L, id) : NULL;

	if (h & 2)
		ferry_error_prefix(L->err, "section '%s' (id %u): ", idstr, id);
	else if (sl)
		ferry_error_prefix(L->err, "section '%s' instance %u (id %u): ",
				   sl->dev->idstr, sl->dev->instance, id);
	else if (L->last[0])
		ferry_error_prefix(L->err, "after section %s: ", L->last);
	else
		ferry_error_prefix(L->err, "before the first section: ");
}

/* Records until EOF. The record buffer belongs to this level's reader:
 * the caller's for the stream itself, a local one inside a package. */
static int load_records(struct loader *L, struct ferry_chan *in, unsigned depth)
{
	struct ferry_record_io local = {
		.chan = in,
		.max_len = L->opts ? L->opts->max_record : 0,
	};
	struct ferry_record_io *io = depth ? &local : L->io;
	struct ferry_record rec;
	int r;

	for (;;) {
		r = ferry_record_read(io, &rec, L->err);
		if (r) {
			name_damaged(L, &rec);
			break;
		}
		switch (rec.type) {
		case FERRY_REC_SECTION_START:
		case FERRY_REC_SECTION_PART:
		case FERRY_REC_SECTION_END:
		case FERRY_REC_SECTION_FULL:
			r = load_section(L, &rec);
			break;
		case FERRY_REC_COMMAND:
			r = load_command(L, &rec, depth);
			/* Postcopy: the listen thread has read the rest. */
			if (L->stream_done) {
				ferry_record_io_release(&local);
				return r;
			}
			break;
		case FERRY_REC_DEVSTATE:
			r = load_devstate(L, &rec);
			break;
		case FERRY_REC_VMDESC:
			/* Descriptive only (for `ferry inspect`); verified by its
			 * check like everything else, not interpreted. */
			break;
		case FERRY_REC_EOF:
			if (!depth)
				L->stats.t_eof = ferry__mono_ns();
			if (rec.len)
				r = ferry_error_set(L->err, -EBADMSG,
					"offset %llu: EOF record with a body",
					(unsigned long long)rec.offset);
			ferry_record_io_release(&local);
			return r;
		default:
			/* Types with the high bit set are optional: skip them.
			 * Anything else we do not know could be state we would
			 * silently drop, so refuse it. */
			if (rec.type & 0x80)
				break;
			r = ferry_error_set(L->err, -EBADMSG,
				"offset %llu: unknown record type 0x%02x",
				(unsigned long long)rec.offset, rec.type);
		}
		if (r)
			break;
	}
	ferry_record_io_release(&local);
	return r;
}

int ferry__load(struct ferry_ctx *ctx, struct ferry_chan *in,
		const struct ferry_load_opts *opts,
		const struct ferry__load_hooks *hooks, struct ferry_record_io *io,
		uint32_t *version, struct ferry_error *err)
{
	struct ferry_error local = { 0 };
	struct loader L = { .ctx = ctx, .err = err ? err : &local, .io = io,
			    .hooks = hooks };
	unsigned i = 0;
	int r;

	if (opts) {
		r = ferry__copy_sized(&L.o, sizeof(L.o), opts, "ferry_load_opts",
				      err);
		if (r)
			return r;
		L.opts = &L.o;
		io->max_len = L.o.max_record;
	}
	XXH3_INITSTATE(&L.digest);
	XXH3_64bits_reset(&L.digest);
	L.slots = calloc(ctx->ndevs ? ctx->ndevs : 1, sizeof(*L.slots));
	if (!L.slots)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	for (struct ferry_dev *d = ctx->devs; d; d = d->next)
		L.slots[i++].dev = d;
	L.nslots = i;

	r = ferry__stream_read_header(in, version, L.err);
	for (i = 0; i < L.nslots && !r; i++) {
		struct ferry_dev *d = L.slots[i].dev;
		if (d->ops->load_setup && (r = d->ops->load_setup(d->opaque, L.err)))
			ferry_error_prefix(L.err, "device '%s' instance %u load_setup: ",
					   d->idstr, d->instance);
	}
	if (!r)
		r = load_records(&L, in, 0);
	r = ds_finish(&L, r);
	if (!r)
		r = check_complete(&L, false);
	r = device_load_close(&L, r);
	for (i = 0; i < L.nslots; i++) {
		struct ferry_dev *d = L.slots[i].dev;
		if (d->ops->load_cleanup)
			d->ops->load_cleanup(d->opaque);
	}
	free(L.slots);
	if (L.opts && L.opts->stats) {
		L.stats.device_digest = XXH3_64bits_digest(&L.digest);
		L.stats.bytes = ferry_chan_offset(in);
		L.stats.size = sizeof(L.stats);
		ferry__fill_sized(L.opts->stats, &L.stats, sizeof(L.stats));
	}
	return r;
}

int ferry_load(struct ferry_ctx *ctx, struct ferry_chan *in,
	       const struct ferry_load_opts *opts, struct ferry_error *err)
{
	struct ferry_record_io io = { .chan = in };
	uint32_t version;
	int r = ferry__load(ctx, in, opts, NULL, &io, &version, err);

	ferry_record_io_release(&io);
	return r;
}
