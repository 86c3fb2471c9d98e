/*
 * load.c - the load loop: verify each record, then dispatch it.
 *
 * Order of trust: ferry_record_read() has verified a record's length and
 * check before we look inside, so everything here is about *meaning*: a
 * section for a device we do not have, a PART before its START, a version
 * outside the window, a device that leaves bytes unread. Each is a load
 * failure whose message names the stream offset and the section.
 *
 * Device-state buffers (DEVSTATE records here, or device-state packets on
 * multifd channels through ferry_load_devstate) are handed to a per-device
 * load thread through a bounded queue (devstate.c): the main load thread
 * keeps reading the stream while devices with expensive loads (think VFIO)
 * work in parallel, and a slow device applies backpressure instead of
 * eating memory. Their config state is loaded here, on the load thread.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "devstate.h"
#include "internal.h"
/* PACKAGED may nest records one level deep, never a package in a package. */
#define MAX_PACKAGE_DEPTH 1

enum slot_state { SLOT_NONE, SLOT_STARTED, SLOT_ENDED, SLOT_FULL };

struct slot {
	struct ferry_dev *dev;
	enum slot_state state;
	uint32_t stream_id;           /* section id chosen by the source */
	uint32_t version;
	bool loaded;                  /* any state arrived */
	/* switchover-ack, under ctx->load_lock: */
	bool ack_needed, ack_given;
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
	struct ferry__pool_batch *job; /* on the context's pool (pool.c) */
	int ret;                      /* read after the job's end */
	struct ferry_error err;       /* listen thread; read after the job's end */
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
	struct ferry__dsq *dsq;          /* device-state queues (devstate.c) */
	unsigned ds_declared;            /* devices SWITCHOVER_START named */
	/* switchover-ack, under ctx->load_lock: */
	bool ack_on;                     /* the source asked for it (AGREE) */
	bool ack_sent;
	unsigned acks_left;              /* devices still to approve */
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
	if (sl->dev->ops->load_buffer && ferry__dsq_drain(L->dsq, sl->dev)) {
		r = ferry__dsq_configs(L->dsq, false, NULL, err);
		goto out;
	}
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
	size_t off;
	int r;

	if (!c)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	ferry_get_str8(c, idstr, sizeof(idstr));
	instance = ferry_get_be32(c);
	seq = ferry_get_be32(c);
	if ((r = ferry_chan_error(c, err))) {
		ferry_error_prefix(err, "offset %llu: %s header: ",
				   (unsigned long long)rec->offset,
				   ferry_record_type_name(rec->type));
		goto out;
	}
	if ((sl = slot_by_dev(L, idstr, instance)))
		sl->loaded = true;
	off = rec->len - ferry_chan_mem_remaining(c);
	r = ferry__dsq_push(L->dsq, idstr, instance, seq,
			    rec->type == FERRY_REC_DEVSTATE_CONFIG, true,
			    rec->body + off, rec->len - off, err);
	if (r)
		ferry_error_prefix(err, "offset %llu: %s: ",
				   (unsigned long long)rec->offset,
				   ferry_record_type_name(rec->type));
out:
	ferry_chan_free(c);
	return r;
}

/*
 * SWITCHOVER_START and DEVSTATE_DONE name devices: be32 n, then per device
 * str8 idstr, be32 instance, and with @counts be32 buffers. Calls @fn for
 * each; the payload must be exactly that long.
 */
static int device_list(struct loader *L, const uint8_t *p, size_t plen,
		       bool counts, int (*fn)(struct loader *L, const char *idstr,
					      uint32_t instance, uint32_t count))
{
	size_t off = 4;
	uint32_t n;
	int r;

	if (plen < 4)
		return -EBADMSG;
	n = ferry__get_be32(p);
	if (n > L->nslots)
		return -EBADMSG;
	for (uint32_t i = 0; i < n; i++) {
		char idstr[FERRY_IDSTR_MAX + 1];
		size_t il;

		if (off >= plen || (il = p[off]) == 0 ||
		    plen - off < 1 + il + 4 + (counts ? 4 : 0) ||
		    memchr(p + off + 1, 0, il))
			return -EBADMSG;
		memcpy(idstr, p + off + 1, il);
		idstr[il] = 0;
		off += 1 + il;
		r = fn(L, idstr, ferry__get_be32(p + off),
		       counts ? ferry__get_be32(p + off + 4) : 0);
		if (r)
			return r;
		off += counts ? 8 : 4;
	}
	return off == plen ? 0 : -EBADMSG;
}

static int declare_one(struct loader *L, const char *idstr, uint32_t instance,
		       uint32_t count)
{
	(void)count;
	L->ds_declared++;
	return ferry__dsq_declare(L->dsq, idstr, instance, L->err);
}

static int expect_one(struct loader *L, const char *idstr, uint32_t instance,
		      uint32_t count)
{
	struct slot *sl = slot_by_dev(L, idstr, instance);

	if (sl)
		sl->loaded = true;
	L->ds_declared--;
	return ferry__dsq_expect(L->dsq, idstr, instance, count, L->err);
}

/*
 * DEVSTATE_DONE: every buffer is in (the caller synced the channels). Wait
 * for the load threads, loading config buffers here as their devices get
 * ready, in whatever order that happens.
 */
static int devstate_done(struct loader *L, const uint8_t *p, size_t plen)
{
	uint64_t t0 = ferry__mono_ns(), cfg = 0;
	int r;

	if (plen < 4)
		return -EBADMSG;
	r = device_list(L, p + 4, plen - 4, true, expect_one);

	if (r == -EBADMSG && !L->err->code)
		return r;
	if (!r && L->ds_declared)
		r = ferry_error_set(L->err, -EBADMSG, "DEVSTATE_DONE leaves out "
				    "%u device(s) that SWITCHOVER_START named",
				    L->ds_declared);
	if (!r)
		r = ferry__dsq_configs(L->dsq, true, &cfg, L->err);
	/* The wait, without the config loads inside it (counted apart). */
	L->stats.devstate_config_ns += cfg;
	t0 = ferry__mono_ns() - t0;
	L->stats.devstate_wait_ns += t0 > cfg ? t0 - cfg : 0;
	return r;
}

/* switchover-ack: tell the source once every device that asked approved.
 * ctx->load_lock held; returns whether the caller must send it. */
static bool ack_due_locked(struct loader *L)
{
	if (!L->ack_on || L->ack_sent || L->acks_left)
		return false;
	L->ack_sent = true;
	return true;
}

static void ack_send(struct loader *L)
{
	if (L->opts && L->opts->switchover_ack)
		L->opts->switchover_ack(L->opts->opaque);
}

int ferry_load_switchover_ack(struct ferry_ctx *ctx, const char *idstr,
			      uint32_t instance)
{
	void (*fn)(void *) = NULL;
	void *opaque = NULL;
	struct loader *L;
	struct slot *sl;
	int r = 0;

	ferry__mutex_lock(&ctx->load_lock);
	L = ctx->loader;
	sl = L && idstr ? slot_by_dev(L, idstr, instance) : NULL;
	if (!sl || !sl->ack_needed) {
		r = -ENOENT;
	} else if (!sl->ack_given) {
		sl->ack_given = true;
		L->acks_left--;
		/* The load may end as soon as we unlock (this can be any
		 * thread): take what the call needs now. */
		if (ack_due_locked(L) && L->opts) {
			fn = L->opts->switchover_ack;
			opaque = L->opts->opaque;
		}
	}
	ferry__mutex_unlock(&ctx->load_lock);
	if (fn)
		fn(opaque);
	return r;
}

int ferry_load_devstate(struct ferry_ctx *ctx, const char *idstr,
			uint32_t instance, uint32_t seq, bool config,
			const void *buf, size_t len, struct ferry_error *err)
{
	struct ferry__dsq *q;
	int r;

	if (!ctx || !idstr || (!buf && len))
		return ferry_error_set(err, -EINVAL, "invalid arguments");
	ferry__mutex_lock(&ctx->load_lock);
	q = ctx->dsq;
	if (q)
		ctx->load_users++;
	ferry__mutex_unlock(&ctx->load_lock);
	if (!q)
		return ferry_error_set(err, -ECANCELED, "device state for '%s': "
				       "no load is running", idstr);
	r = ferry__dsq_push(q, idstr, instance, seq, config, false, buf, len,
			    err);
	ferry__mutex_lock(&ctx->load_lock);
	if (!--ctx->load_users)
		pthread_cond_broadcast(&ctx->load_cond);
	ferry__mutex_unlock(&ctx->load_lock);
	return r;
}

static int load_records(struct loader *L, struct ferry_chan *in, unsigned depth);

/* SWITCHOVER_START's hooks: before any buffer can reach a device. */
static int switchover_start(struct loader *L)
{
	int r = 0;

	for (unsigned i = 0; i < L->nslots && !r; i++) {
		struct ferry_dev *d = L->slots[i].dev;

		if (d->ops->switchover_start &&
		    (r = d->ops->switchover_start(d->opaque, L->err)))
			ferry_error_prefix(L->err, "device '%s' switchover_start: ",
					   d->idstr);
	}
	return r;
}

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
	int r = ferry__dsq_check_done(L->dsq, L->err);

	r = ferry__dsq_finish(L->dsq, r, L->err);

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

static void listen_main(void *arg)
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
				return;
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
			return;
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
	void *job_arg;
	int r;

	lt.ram = slot_by_dev(L, "ram", 0);
	if (!lt.ram || lt.ram->state != SLOT_STARTED)
		return ferry_error_set(L->err, -EBADMSG, "PACKAGED after "
				       "POSTCOPY_LISTEN, but no RAM section is open");
	/* A job on the context's pool, whose thread waits for it since
	 * POSTCOPY_ADVISE: creating one here, in the downtime, took 0.2-3 ms. */
	job_arg = &lt;
	lt.job = ferry__pool_submit(L->ctx, 1, listen_main, &job_arg, L->err);
	if (!lt.job)
		return ferry_error_prefix(L->err, "the listen thread: ");
	L->in_package = true;
	r = load_package(L, c, 1);
	L->in_package = false;
	if (r && L->hooks && L->hooks->stop_listen)
		L->hooks->stop_listen(L->hooks->opaque);
	ferry__pool_wait(L->ctx, lt.job);
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
		/* Empty (older sources), or the devices sending buffers: their
		 * queues are ready before the channels are released (on_command
		 * syncs them). */
		if (plen) {
			if (plen < 4)
				goto bad_len;
			m.u.devstate_flags = ferry__get_be32(p);
			if (m.u.devstate_flags & ~FERRY_DEVSTATE_MULTIFD)
				goto bad_len;
			r = device_list(L, p + 4, plen - 4, false, declare_one);
			if (r == -EBADMSG && !err->code)
				goto bad_len;
		}
		if (!r)
			r = switchover_start(L);
		if (!r && plen && L->opts && L->opts->on_command)
			r = L->opts->on_command(L->opts->opaque, &m, err);
		if (r)
			ferry_error_prefix(err, "offset %llu: %s: ",
					   (unsigned long long)rec->offset,
					   ferry_cmd_name(m.cmd));
		return r;
	case FERRY_CMD_DEVSTATE_DONE:
		/* The engine syncs the multifd channels first (on_command),
		 * so every buffer sent is in a queue when we count. */
		if (plen < 4)
			goto bad_len;
		m.u.devstate_flags = ferry__get_be32(p);
		if (m.u.devstate_flags & ~FERRY_DEVSTATE_MULTIFD)
			goto bad_len;
		if (L->opts && L->opts->on_command &&
		    (r = L->opts->on_command(L->opts->opaque, &m, err)))
			return ferry_error_prefix(err, "offset %llu: %s: ",
				(unsigned long long)rec->offset,
				ferry_cmd_name(m.cmd));
		r = devstate_done(L, p, plen);
		if (r == -EBADMSG && !err->code)
			goto bad_len;
		if (r)
			ferry_error_prefix(err, "offset %llu: %s: ",
					   (unsigned long long)rec->offset,
					   ferry_cmd_name(m.cmd));
		return r;
	case FERRY_CMD_AGREE: {
		bool due;

		WANT_LEN(4);
		m.u.agree = ferry__get_be32(p);
		if (m.u.agree & ~FERRY_AGREE__KNOWN)
			return ferry_error_set(err, -EOPNOTSUPP, "offset %llu: "
				"the source uses features this destination does "
				"not know (AGREE flags 0x%x)",
				(unsigned long long)rec->offset, m.u.agree);
		if (L->opts && L->opts->on_command &&
		    (r = L->opts->on_command(L->opts->opaque, &m, err)))
			return r;
		ferry__mutex_lock(&L->ctx->load_lock);
		L->ack_on = m.u.agree & FERRY_AGREE_SWITCHOVER_ACK;
		due = ack_due_locked(L);
		ferry__mutex_unlock(&L->ctx->load_lock);
		if (due)
			ack_send(L);
		return 0;
	}
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
		case FERRY_REC_DEVSTATE_CONFIG:
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
		/* A device whose data is all in loads its config now, while
		 * others still receive (unless it must wait for the iterable
		 * sections, load_config_after_iter). */
		if (!r && L->ds_declared && !L->o.load_config_after_iter)
			r = ferry__dsq_configs(L->dsq, false,
					       &L->stats.devstate_config_ns, L->err);
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
	L.dsq = ferry__dsq_new(ctx, L.o.max_queued_buffers,
			       L.o.max_queued_bytes, L.err);
	if (!L.dsq) {
		free(L.slots);
		return L.err->code;
	}
	for (struct ferry_dev *d = ctx->devs; d; d = d->next)
		L.slots[i++].dev = d;
	L.nslots = i;
	/* A device that fails in its load thread stops the stream's reader
	 * too: the source may be waiting for us to read. */
	if (hooks && hooks->stop_listen)
		ferry__dsq_on_fail(L.dsq, hooks->stop_listen, hooks->opaque);
	ferry__mutex_lock(&ctx->load_lock);
	if (ctx->loader) {
		ferry__mutex_unlock(&ctx->load_lock);
		ferry__dsq_free(L.dsq);
		free(L.slots);
		return ferry_error_set(err, -EBUSY, "a load is already running "
				       "on this context");
	}
	ctx->loader = &L;
	ctx->dsq = L.dsq;
	ferry__mutex_unlock(&ctx->load_lock);

	r = ferry__stream_read_header(in, version, L.err);
	for (i = 0; i < L.nslots && !r; i++) {
		struct ferry_dev *d = L.slots[i].dev;
		if (d->ops->load_setup && (r = d->ops->load_setup(d->opaque, L.err)))
			ferry_error_prefix(L.err, "device '%s' instance %u load_setup: ",
					   d->idstr, d->instance);
	}
	/* Who must approve before the source may stop the VM, should it
	 * ask (switchover-ack, in its AGREE command). */
	ferry__mutex_lock(&ctx->load_lock);
	for (i = 0; i < L.nslots && !r; i++) {
		struct ferry_dev *d = L.slots[i].dev;

		if (d->ops->switchover_ack_needed &&
		    d->ops->switchover_ack_needed(d->opaque)) {
			L.slots[i].ack_needed = true;
			L.acks_left++;
		}
	}
	ferry__mutex_unlock(&ctx->load_lock);
	if (!r)
		r = load_records(&L, in, 0);
	if (!r && L.ds_declared)
		r = ferry_error_set(L.err, -EBADMSG, "the stream ended without "
				    "DEVSTATE_DONE for %u device(s) that "
				    "SWITCHOVER_START named", L.ds_declared);
	if (!r)
		r = ferry__dsq_check_done(L.dsq, L.err);
	r = ferry__dsq_finish(L.dsq, r, L.err);
	/* Buffers from other threads stop here: wait for them to leave. */
	ferry__mutex_lock(&ctx->load_lock);
	ctx->dsq = NULL;
	ctx->loader = NULL;
	while (ctx->load_users)
		pthread_cond_wait(&ctx->load_cond, &ctx->load_lock);
	ferry__mutex_unlock(&ctx->load_lock);
	{
		struct ferry__dsq_stats st;

		for (i = 0; ferry__dsq_stats(L.dsq, i, &st); i++) {
			struct ferry_load_dev_stats ds = {
				.idstr = st.dev->idstr,
				.instance = st.dev->instance,
				.buffers = st.buffers, .bytes = st.bytes,
				.data_ns = st.data_ns, .config_ns = st.config_ns,
			};

			L.stats.devstate_bytes += st.bytes;
			if (st.buffers && L.opts && L.opts->device_stats)
				L.opts->device_stats(L.opts->opaque, &ds);
		}
	}
	ferry__dsq_free(L.dsq);
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
