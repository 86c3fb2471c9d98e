/*
 * engine-out.c - the outgoing migration: setup, precopy until the rest fits
 * the downtime limit, the switchover and its handshake, and putting the VM
 * back as it was when anything fails before GO.
 *
 * Threads. The migration thread runs everything below except:
 *   - the return-path reader, which reads the destination's messages
 *     (LOADED, SHUT, PONG, HEARTBEAT) and hands them over under rp->lock;
 *     its reads time out after peer-timeout, so a destination that stops
 *     talking is noticed even while the migration thread waits;
 *   - the heartbeat sender, which puts a HEARTBEAT on the main stream
 *     whenever it was idle for a quarter of peer-timeout (with multifd the
 *     main stream is quiet for whole passes), so the destination can tell a
 *     silent source from a slow one;
 *   - cancel (any thread), which sets o->cancel under m->lock and shuts
 *     every connection down, so every thread of the migration returns at
 *     once.
 *
 * The switchover rule (see docs/architecture.md): the source stops the VM,
 * sends the rest and waits for LOADED; only then, and only if no cancel
 * came, it sends GO. "GO sent" means every byte of the GO record was handed
 * to the kernel: before that point any failure resumes the VM (and an
 * ABORT tells a destination that is still listening); after it the source
 * never resumes by itself. It then waits up to peer-timeout for the
 * destination's ack (SHUT); without it the switchover is in doubt and the
 * VM stays stopped here.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "engine-internal.h"
#include "postcopy.h"
#include "ram-internal.h"
#include "tls.h"

/* Bytes per PART section: small enough that cancel, rate limiting and the
 * convergence check react quickly, large enough to amortise a section. */
#define ROUND_BUDGET (16ull << 20)
/* A pass "still shrinks the rest" if it leaves less than this share of the
 * previous pass's remainder (percent). */
#define SHRINK_PCT 80
/* Once the rest fits the limit, at most this many more passes to shrink it
 * further: the rest of a busy guest can go up again, and a chance to switch
 * must not be waited away. */
#define MAX_EXTRA_PASSES 5
/* The PING before the switchover: best effort, this long at most. */
#define DRAIN_TIMEOUT_MS 10000
/* Longest sleep slice of the rate limiter (cancel is checked between). */
#define RATE_SLICE_NS 50000000ull
/* Bandwidth is measured over windows at least this long: a pass can last
 * a few milliseconds, too short to say anything about the link. */
#define BW_WINDOW_NS 100000000ull
/* A pass that neither fits the downtime limit nor shrinks the rest starts
 * no sooner than this after the previous one (see precopy()). */
#define MIN_STUCK_PASS_NS 10000000ull
/* Bytes of background pages per postcopy section: a requested page waits
 * behind at most this much of our own buffer (the socket's is another
 * matter: that is what postcopy-preempt is for). */
#define PC_BUDGET (256ull << 10)

/* ---- the return path, source side --------------------------------------- */

struct mig_out;

struct rp_reader {
	struct mig_out *o;              /* immutable: cut on failure */
	pthread_mutex_t lock;
	pthread_cond_t cond;            /* monotonic; anything below changed */
	struct ferry_record_io io;      /* reader thread */
	struct ferry_chan *chan;        /* reader thread (shut down by others) */
	pthread_t thread;
	bool live;                      /* migration thread */
	uint64_t timeout_ms;            /* immutable */

	/* lock */
	bool done;                      /* the reader ended */
	int err;                        /* why, if not a SHUT */
	char errmsg[FERRY_ERROR_MSG_MAX];
	bool loaded;
	struct ferry_rp_msg loaded_msg;
	uint64_t t_loaded;              /* our clock, when LOADED arrived */
	bool shut;
	struct ferry_rp_msg shut_msg;
	uint64_t t_shut;
	uint32_t pong;
	bool running;                   /* postcopy: RUNNING read */
	bool resumed;                   /* postcopy recovery: RESUME_ACK read */
	struct ferry_rp_msg running_msg;
	uint64_t t_running;
	bool swo_acked;                 /* switchover-ack: SWITCHOVER_ACK read */
};

struct heartbeat {
	pthread_mutex_t lock;
	pthread_cond_t cond;            /* monotonic */
	pthread_t thread;
	bool live;                      /* migration thread */
	bool stop;                      /* lock */
	bool silent;                    /* lock: a lose-* fault fired */
	uint64_t own_ms;                /* immutable: our peer-timeout */
	uint32_t peer_ms;               /* atomic: the destination's, as it
					   announced it (0 = not yet) */
	struct ferry_save *s;           /* immutable while live */
};

struct mig_out {
	struct ferry_mig *m;
	char uri[4096];                 /* immutable */
	struct ferry_uri u;             /* immutable */
	pthread_t thread;               /* joined by mig_out_free */
	bool thread_started;

	/* m->lock */
	bool cancel;                    /* cancel or kill: wind down */
	bool killed;                    /* ferry_mig_free: even past GO */
	bool committing;                /* GO on its way: too late to cancel */
	bool eof_sent;                  /* the stream is complete */
	bool cut;                       /* connections shut down */
	bool cut_by_rp;                 /* ... first by a return-path failure */
	int fd;                         /* main connection, or -1 */
	struct ferry_multifd *mf;       /* while it exists */
	bool pc_requested;              /* migrate-start-postcopy */
	bool resume_req;                /* ferry_mig_resume: try resume_uri */
	char resume_uri[4096];
	bool pc_switched;               /* the VM stopped for postcopy */
	int pre_fd;                     /* postcopy preempt connection, or -1 */

	/* Postcopy: the return-path reader answers page requests once this
	 * is set (atomic), on the preempt channel when there is one. */
	bool pc_on;
	pthread_mutex_t pre_lock;       /* the preempt channel's writer */
	struct ferry_chan *pre_chan;    /* pre_lock (set before pc_on) */
	struct ferry_record_io pre_io;  /* pre_lock */
	bool pre_closed;                /* pre_lock: END's marker went out */

	/* Migration thread only. */
	struct mig_settings set;
	bool use_rp;
	struct ferry_save *s;
	struct ferry_chan *c;
	struct ferry_tls *tls;          /* tls-creds: the source's credentials */
	struct ferry_tls_conn *tls_main; /* the main connection's session
					   (shared by c and the RP reader) */
	struct rp_reader rp;
	struct heartbeat hb;
	enum ferry_run_state was;       /* run state before vm_stop */
	bool stopped;                   /* vm_stop succeeded */
	bool throttled;
	bool committed;                 /* GO went out (or lose-go said so) */
	bool in_doubt;
	bool completed;
	uint64_t t_start, t_stop;
	uint64_t t_ack_wait;            /* switchover-ack: the rest first fit */
	uint64_t t_pc_sync, t_pc_discard; /* postcopy: switch section, DISCARDs */
	uint64_t t_pc_start, pc_bytes0;
	uint64_t pc_rate_t0, pc_rate_b0;  /* the rate limit's window */
	unsigned recoveries;
	struct ferry_save_stats ss;
	struct ferry_mig_info prog;     /* published into m->out_info */
};

static uint64_t now_ns(void)
{
	return ferry__mono_ns();
}

static void rp_cut(struct mig_out *o);

/*
 * A page request (the return-path reader's thread). On the preempt channel
 * the pages go out from here at once, never behind the background; else
 * they are queued for the migration thread's next section. After END's
 * marker every page has been sent: a late request is for a page the
 * destination's END will settle.
 */
static int serve_request(struct mig_out *o, const struct ferry_rp_msg *msg,
			 struct ferry_error *err)
{
	struct ferry_ram *ram = o->m->ram;
	int r = 0;

	if (!ram || !__atomic_load_n(&o->pc_on, __ATOMIC_ACQUIRE))
		return ferry_error_set(err, -EBADMSG, "return path: page request "
				       "outside postcopy");
	if (!o->pre_chan)
		return ferry__ram_pc_request(ram, msg->block, msg->start,
					     msg->len, err);
	ferry__mutex_lock(&o->pre_lock);
	if (!o->pre_closed)
		r = ferry__ram_pc_send_preempt(ram, &o->pre_io, msg->block,
					       msg->start, msg->len, err);
	ferry__mutex_unlock(&o->pre_lock);
	return r;
}

/* A message the protocol does not allow here: the reader ends. rp->lock
 * held. */
static bool rp_unexpected(struct rp_reader *rp, uint16_t type)
{
	rp->err = -EBADMSG;
	snprintf(rp->errmsg, sizeof(rp->errmsg), "return path: unexpected %s "
		 "message", ferry_rp_name(type));
	return true;
}

static void *rp_main(void *arg)
{
	struct rp_reader *rp = arg;

	/* It answers postcopy's page requests on the preempt channel. */
	if (rp->o->set.postcopy_preempt)
		ferry__pc_sched_raise(NULL, false);

	for (;;) {
		struct ferry_error err = { 0 };
		struct ferry_rp_msg msg;
		const uint8_t *bits = NULL;
		int r = ferry__rp_recv(&rp->io, &msg, &bits, &err);
		bool end = false;

		if (!r && msg.type == FERRY_RP_REQ_PAGES &&
		    !(r = serve_request(rp->o, &msg, &err)))
			continue;
		ferry__mutex_lock(&rp->lock);
		if (r == -ETIMEDOUT) {
			rp->err = r;
			snprintf(rp->errmsg, sizeof(rp->errmsg),
				 "no word from the destination for %llu ms",
				 (unsigned long long)rp->timeout_ms);
			end = true;
		} else if (r) {
			rp->err = r;
			snprintf(rp->errmsg, sizeof(rp->errmsg), "%s", err.msg);
			end = true;
		} else switch (msg.type) {
		case FERRY_RP_LOADED:
			if (rp->loaded || msg.status) {
				end = rp_unexpected(rp, msg.type);
				break;
			}
			rp->loaded = true;
			rp->loaded_msg = msg;
			rp->t_loaded = now_ns();
			break;
		case FERRY_RP_SHUT:
			rp->shut = true;
			rp->shut_msg = msg;
			rp->t_shut = now_ns();
			end = true;
			break;
		case FERRY_RP_PONG:
			rp->pong = msg.pong;
			break;
		case FERRY_RP_RECV_BITMAP: {
			struct ferry_error e2 = { 0 };

			/* Only while resuming: the migration thread waits. */
			if (rp->resumed || !rp->o->m->ram ||
			    ferry__ram_pc_resend(rp->o->m->ram, msg.block,
						 msg.start, bits, &e2)) {
				rp->err = -EBADMSG;
				snprintf(rp->errmsg, sizeof(rp->errmsg),
					 "return path: bad RECV_BITMAP: %.400s", e2.msg);
				end = true;
			}
			break;
		}
		case FERRY_RP_RESUME_ACK:
			rp->resumed = true;
			break;
		case FERRY_RP_SWITCHOVER_ACK:
			if (rp->swo_acked || !rp->o->set.switchover_ack) {
				end = rp_unexpected(rp, msg.type);
				break;
			}
			rp->swo_acked = true;
			break;
		case FERRY_RP_RUNNING:
			if (rp->running || msg.status ||
			    !__atomic_load_n(&rp->o->pc_on, __ATOMIC_ACQUIRE)) {
				end = rp_unexpected(rp, msg.type);
				break;
			}
			rp->running = true;
			rp->running_msg = msg;
			rp->t_running = now_ns();
			break;
		case FERRY_RP_HEARTBEAT:
			/* It says how long it waits for us: beat faster than
			 * that, whatever our own setting. */
			__atomic_store_n(&rp->o->hb.peer_ms, msg.peer_timeout_ms,
					 __ATOMIC_RELAXED);
			break;
		default:
			end = rp_unexpected(rp, msg.type);
		}
		if (end)
			rp->done = true;
		pthread_cond_broadcast(&rp->cond);
		ferry__mutex_unlock(&rp->lock);
		if (end && (r || msg.status))
			rp_cut(rp->o);
		if (end)
			return NULL;
	}
}

static int rp_start(struct rp_reader *rp, int fd, struct ferry_tls_conn *tc,
		    uint64_t timeout_ms, struct ferry_error *err)
{
	int dfd = tc ? -1 : dup(fd), e;

	/* Over TLS the reader shares the main connection's session (its
	 * lock lets one reader and one writer in at a time). */
	if (!tc && dfd < 0)
		return ferry_error_set(err, -errno, "dup: %s", strerror(errno));
	rp->chan = tc ? ferry__tls_chan_new(tc, FERRY_CHAN_READ, -1)
		      : ferry_chan_new_fd(dfd, FERRY_CHAN_READ, true);
	if (!rp->chan) {
		if (dfd >= 0)
			close(dfd);
		return ferry_error_set(err, -ENOMEM, "out of memory");
	}
	rp->timeout_ms = timeout_ms;
	ferry_chan_set_timeout(rp->chan, (int)timeout_ms);
	rp->io = (struct ferry_record_io){ .chan = rp->chan };
	e = pthread_create(&rp->thread, NULL, rp_main, rp);
	if (e)
		return ferry_error_set(err, -e, "cannot start the return-path "
				       "reader");
	rp->live = true;
	return 0;
}

static void rp_stop(struct rp_reader *rp)
{
	if (rp->live) {
		ferry_chan_shutdown(rp->chan);
		pthread_join(rp->thread, NULL);
		rp->live = false;
	}
	ferry_chan_free(rp->chan);
	rp->chan = NULL;
	ferry_record_io_release(&rp->io);
}

/* Give the reader up to @ms to end (its last word may be on its way: a
 * SHUT naming the destination's reason). rp->lock held. */
static void rp_wait_end_locked(struct rp_reader *rp, uint64_t ms)
{
	uint64_t deadline = ferry__mono_ns() + ms * 1000000ull;

	while (!rp->done && mig_cond_wait_until(&rp->cond, &rp->lock, deadline))
		;
}

/* Did the destination give up, vanish or fall silent? Fills @err. rp->lock
 * held. */
static int rp_failure_locked(struct rp_reader *rp, struct ferry_error *err)
{
	if (rp->shut && rp->shut_msg.status)
		return ferry_error_set(err, -(int)rp->shut_msg.status,
				       "destination: %s", rp->shut_msg.reason);
	if (rp->done && rp->err)
		return ferry_error_set(err, rp->err, "destination: %s",
				       rp->errmsg);
	return 0;
}

/*
 * Capability switchover-ack: may the VM stop yet? 1 once the ack came.
 * Otherwise 0 after waiting a little for it (the caller loops, so precopy
 * goes on), and an error once switchover-ack-timeout has passed since the
 * rest first fit: a lost ack costs a failed migration, never a stuck one.
 */
static int swo_ack_ready(struct mig_out *o, struct ferry_error *err)
{
	struct rp_reader *rp = &o->rp;
	uint64_t now = ferry__mono_ns();
	bool acked;

	if (!o->set.switchover_ack)
		return 1;
	ferry__mutex_lock(&rp->lock);
	if (!rp->swo_acked && !rp->done)
		mig_cond_wait_until(&rp->cond, &rp->lock, now + 10000000ull);
	acked = rp->swo_acked;
	ferry__mutex_unlock(&rp->lock);
	if (acked) {
		if (o->t_ack_wait)
			mig_trace(o->m, "switchover-ack: the destination is "
				  "ready after %llu ms of waiting",
				  (unsigned long long)(now - o->t_ack_wait) / 1000000);
		o->prog.switchover_acked = true;
		return 1;
	}
	if (!o->t_ack_wait) {
		o->t_ack_wait = now;
		mig_trace(o->m, "switchover-ack: waiting for the destination "
			  "before stopping the VM");
	} else if (now - o->t_ack_wait >=
		   o->set.switchover_ack_timeout_ms * 1000000ull) {
		return ferry_error_set(err, -ETIMEDOUT, "switchover-ack: no ack "
			"from the destination within %llu ms of converging "
			"(switchover-ack-timeout)",
			(unsigned long long)o->set.switchover_ack_timeout_ms);
	}
	return 0;
}

static int rp_failed(struct rp_reader *rp, struct ferry_error *err)
{
	int r;

	if (!rp->live)
		return 0;
	ferry__mutex_lock(&rp->lock);
	r = rp_failure_locked(rp, err);
	ferry__mutex_unlock(&rp->lock);
	return r;
}

/* ---- heartbeats ------------------------------------------------------------ */

/* A quarter of the shorter of the two peer-timeouts. */
static uint64_t hb_interval_ns(struct heartbeat *hb)
{
	uint64_t peer = __atomic_load_n(&hb->peer_ms, __ATOMIC_RELAXED);
	uint64_t ms = peer && peer < hb->own_ms ? peer : hb->own_ms;

	return ms * 1000000ull / 4;
}

static void *hb_main(void *arg)
{
	struct heartbeat *hb = arg;

	ferry__mutex_lock(&hb->lock);
	while (!hb->stop) {
		uint64_t interval = hb_interval_ns(hb);
		uint64_t deadline = now_ns() + interval;

		while (!hb->stop && mig_cond_wait_until(&hb->cond, &hb->lock,
							deadline))
			;
		if (hb->stop || hb->silent)
			continue;
		ferry__mutex_unlock(&hb->lock);
		/* A failure here is the connection's: the migration thread
		 * meets it on its next write or through the return path. */
		ferry__save_heartbeat(hb->s, interval);
		ferry__mutex_lock(&hb->lock);
	}
	ferry__mutex_unlock(&hb->lock);
	return NULL;
}

static int hb_start(struct heartbeat *hb, struct ferry_save *s,
		    uint64_t peer_timeout_ms, struct ferry_error *err)
{
	int e;

	hb->s = s;
	hb->own_ms = peer_timeout_ms;
	hb->live = true;  /* before the thread reads its neighbours */
	e = pthread_create(&hb->thread, NULL, hb_main, hb);
	if (e) {
		hb->live = false;
		return ferry_error_set(err, -e, "cannot start the heartbeat");
	}
	return 0;
}

static void hb_silence(struct heartbeat *hb)
{
	ferry__mutex_lock(&hb->lock);
	hb->silent = true;
	ferry__mutex_unlock(&hb->lock);
}

static void hb_stop(struct heartbeat *hb)
{
	if (!hb->live)
		return;
	ferry__mutex_lock(&hb->lock);
	hb->stop = true;
	pthread_cond_broadcast(&hb->cond);
	ferry__mutex_unlock(&hb->lock);
	pthread_join(hb->thread, NULL);
	hb->live = false;
}

/* ---- cancel ------------------------------------------------------------------ */

/*
 * Shut every connection down: blocked reads and writes return at once.
 * m->lock held. The fds stay open (their owners close them after joining
 * their threads), so no fd number can be reused under a shutdown. Once
 * the stream is complete nothing blocks on the main connection any more
 * (its writes are bounded by peer-timeout from then on), and it must stay
 * up: it carries the ABORT that tells a listening destination we keep the
 * VM.
 */
static void cut_locked(struct mig_out *o)
{
	o->cut = true;
	/* ferry_mig_free does not wait for the ABORT to get through. */
	if (o->fd >= 0 && (!o->eof_sent || o->killed))
		shutdown(o->fd, SHUT_RDWR);
	if (o->pre_fd >= 0)
		shutdown(o->pre_fd, SHUT_RDWR);
	if (o->mf)
		ferry_multifd_cancel(o->mf, -ECANCELED, "cancelled");
	pthread_cond_broadcast(&o->m->cond);
}

/* A flag guarded by m->lock, read from any thread of the migration. */
static bool locked_flag(struct mig_out *o, const bool *flag)
{
	bool v;

	ferry__mutex_lock(&o->m->lock);
	v = *flag;
	ferry__mutex_unlock(&o->m->lock);
	return v;
}

static bool cancelled(struct mig_out *o)
{
	return locked_flag(o, &o->cancel);
}

/* Under m->lock, with the transition to cancelling that follows. */
static int cancel_check(struct ferry_mig *m, void *arg, struct ferry_error *err)
{
	(void)arg;
	struct mig_out *o = m->out;

	if (!o)
		return 1;
	switch (m->out_info.status) {
	case FERRY_MIG_SETUP:
	case FERRY_MIG_ACTIVE:
	case FERRY_MIG_DEVICE:
		if (o->committing)
			return ferry_error_set(err, -EBUSY, o->use_rp ?
				"too late to cancel: the destination has been "
				"told to run the VM" :
				"too late to cancel: the stream is complete");
		o->cancel = true;
		cut_locked(o);
		return 0;
	case FERRY_MIG_POSTCOPY_ACTIVE:
	case FERRY_MIG_POSTCOPY_PAUSED:
	case FERRY_MIG_POSTCOPY_RECOVER:
		return ferry_error_set(err, -EBUSY, "too late to cancel: in "
			"postcopy the destination runs the VM and this side holds "
			"the rest of its memory");
	default:
		return 1;  /* nothing to cancel (QEMU: not an error) */
	}
}

/* The return path failed (silence, reset, the destination gave up): the
 * migration is over, so unblock whoever waits on a connection. */
static void rp_cut(struct mig_out *o)
{
	ferry__mutex_lock(&o->m->lock);
	if (!o->cut)
		o->cut_by_rp = true;
	cut_locked(o);
	ferry__mutex_unlock(&o->m->lock);
}

int mig_out_cancel(struct ferry_mig *m, struct ferry_error *err)
{
	/* The check, the cut and the transition happen under one hold of the
	 * locks, and the migration thread takes the same lock to commit to
	 * GO: a cancel either comes first (and there is no GO) or is refused;
	 * and no status of the migration thread can slip in between. */
	int r = mig_transition_if(m, false, FERRY_MIG_CANCELLING, cancel_check,
				  NULL, "cancelled", err);

	return r < 0 ? r : 0;
}

void mig_out_kill(struct mig_out *o)
{
	ferry__mutex_lock(&o->m->lock);
	o->cancel = true;
	o->killed = true;
	cut_locked(o);
	pthread_cond_broadcast(&o->m->cond);
	ferry__mutex_unlock(&o->m->lock);
	ferry__mutex_lock(&o->rp.lock);
	pthread_cond_broadcast(&o->rp.cond);
	ferry__mutex_unlock(&o->rp.lock);
}

/* ---- progress ------------------------------------------------------------------ */

static uint64_t multifd_bytes(struct mig_out *o)
{
	struct ferry_multifd_stats st;
	uint64_t b = 0;

	if (!o->mf)
		return 0;
	ferry_multifd_get_stats(o->mf, &st);
	for (unsigned i = 0; i < st.channels; i++)
		b += st.chan[i].bytes;
	return b;
}

/* Every byte this migration put on any connection (the main stream's
 * count under the writers' lock: the heartbeat sender writes it too). */
static uint64_t total_bytes(struct mig_out *o)
{
	return (o->s ? ferry__save_offset(o->s) : 0) + multifd_bytes(o);
}

static void publish(struct mig_out *o)
{
	struct ferry_mig *m = o->m;
	struct ferry_mig_info *i = &o->prog;

	/* The RAM counters belong to this thread (ferry_ram_get_stats may
	 * only be called here): copy them into the snapshot. */
	if (m->ram) {
		struct ferry_ram_stats st;

		ferry_ram_get_stats(m->ram, &st);
		i->ram_total = st.total;
		i->ram_transferred = st.transferred;
		i->ram_remaining = st.remaining;
		i->ram_duplicate = st.duplicate;
		i->ram_normal = st.normal;
		i->ram_normal_bytes = st.normal_bytes;
		i->ram_dirty_sync_count = st.dirty_sync_count;
	}
	i->multifd_bytes = multifd_bytes(o);
	/* Devices with state in buffers: their counters belong to this
	 * thread too (the save threads' part is read after they joined). */
	i->ndevices = 0;
	i->devstate_precopy_bytes = i->devstate_switchover_bytes = 0;
	for (struct ferry_dev *d = m->ctx->devs; d; d = d->next) {
		struct ferry_mig_dev_info *di = &i->devices[i->ndevices];

		if (!d->ops->save_complete_thread)
			continue;
		i->devstate_precopy_bytes += d->sent_precopy;
		i->devstate_switchover_bytes += d->sent_switchover;
		if (i->ndevices == sizeof(i->devices) / sizeof(i->devices[0]))
			continue;
		snprintf(di->id, sizeof(di->id), "%s", d->idstr);
		di->instance = d->instance;
		di->precopy_bytes = d->sent_precopy;
		di->switchover_bytes = d->sent_switchover;
		i->ndevices++;
	}
	ferry__mutex_lock(&m->lock);
#define CP(f) m->out_info.f = i->f
	CP(setup_time_ms); CP(expected_downtime_ms); CP(bandwidth); CP(pass);
	CP(throttle_pct); CP(mbps); CP(dirty_pages_rate); CP(precopy_bytes);
	CP(downtime_bytes); CP(multifd_bytes); CP(ram_total);
	CP(ram_transferred); CP(ram_remaining); CP(ram_duplicate);
	CP(ram_normal); CP(ram_normal_bytes); CP(ram_dirty_sync_count);
	CP(downtime_ns); CP(postcopy_bytes); CP(postcopy_requests);
	CP(postcopy_time_ms); CP(postcopy); CP(devstate_precopy_bytes);
	CP(devstate_switchover_bytes); CP(switchover_acked); CP(ndevices);
	memcpy(m->out_info.devices, i->devices, sizeof(i->devices));
	memcpy(m->out_info.phase_ms, i->phase_ms, sizeof(i->phase_ms));
#undef CP
	ferry__mutex_unlock(&m->lock);
}

static void pass_event(struct ferry_mig *m, uint64_t pass)
{
	struct ferry_mig_event ev = { .kind = FERRY_EV_PASS, .pass = pass };

	ferry__mutex_lock(&m->ev_lock);
	if (m->ops.event)
		m->ops.event(m->opaque, &ev);
	ferry__mutex_unlock(&m->ev_lock);
}

/* The parameters that apply to a running migration, re-read every pass. */
static void refresh_live(struct mig_out *o)
{
	struct ferry_mig *m = o->m;

	ferry__mutex_lock(&m->lock);
	o->set.downtime_limit_ms = m->set.downtime_limit_ms;
	o->set.max_bandwidth = m->set.max_bandwidth;
	o->set.avail_switchover_bandwidth = m->set.avail_switchover_bandwidth;
	o->set.throttle_initial = m->set.throttle_initial;
	o->set.throttle_increment = m->set.throttle_increment;
	o->set.throttle_max = m->set.throttle_max;
	o->set.postcopy_after_ms = m->set.postcopy_after_ms;
	o->set.postcopy_after_passes = m->set.postcopy_after_passes;
	ferry__mutex_unlock(&m->lock);
}

static bool postcopy_wanted(struct mig_out *o)
{
	return locked_flag(o, &o->pc_requested);
}

/* Sleep as needed so that every channel's bytes since the start stay
 * within max-bandwidth. Sleeps in slices, so a cancel is not kept waiting. */
static int rate_limit(struct mig_out *o, uint64_t bytes0)
{
	for (;;) {
		uint64_t d = mig_rate_delay_ns(o->set.max_bandwidth,
					       total_bytes(o) - bytes0,
					       now_ns() - o->t_start);
		struct timespec ts;

		if (!d)
			return 0;
		if (cancelled(o))
			return -ECANCELED;
		if (d > RATE_SLICE_NS)
			d = RATE_SLICE_NS;
		ts.tv_sec = (time_t)(d / 1000000000ull);
		ts.tv_nsec = (long)(d % 1000000000ull);
		nanosleep(&ts, NULL);
	}
}

/* ---- setup --------------------------------------------------------------------- */

/*
 * A connection to @uri for this migration: keepalive set, and with
 * tls-creds its TLS handshake done (*tc, the session; NULL without TLS).
 * Returns the fd or -errno.
 */
static int out_connect(struct mig_out *o, const char *uri,
		       struct ferry_tls_conn **tc, struct ferry_error *err)
{
	int fd = ferry_transport_connect(uri, (int)o->set.peer_timeout_ms, err);

	*tc = NULL;
	if (fd < 0)
		return fd;
	mig_socket_keepalive(fd, o->set.peer_timeout_ms);
	if (!o->tls)
		return fd;
	{
		/* The name to check is that of the host this connection goes
		 * to (a postcopy resume may go elsewhere than the start),
		 * unless tls-hostname says otherwise. A unix: URI names no
		 * host: the CA's signature is then the whole check. */
		struct ferry_uri u;
		char host[256] = "";

		if (!o->set.tls_hostname[0] && !ferry_uri_parse(uri, &u, NULL) &&
		    u.kind == FERRY_URI_TCP)
			snprintf(host, sizeof(host), "%s", u.host);
		*tc = ferry__tls_conn_new(o->tls, fd, o->set.tls_hostname[0] ?
					  NULL : host, err);
	}
	if (*tc) {
		int r = ferry__tls_handshake(*tc, (int)o->set.peer_timeout_ms, err);

		if (!r) {
			mig_tls_note(o->m, false, *tc);
			return fd;
		}
		ferry__tls_unref(*tc);
		*tc = NULL;
	}
	close(fd);
	return err && err->code ? err->code : -EPROTO;
}

/* A channel on a connection from out_connect; it closes @fd when freed. */
static struct ferry_chan *out_chan(int fd, struct ferry_tls_conn *tc,
				   enum ferry_chan_dir dir)
{
	return tc ? ferry__tls_chan_new(tc, dir, fd)
		  : ferry_chan_new_fd(fd, dir, true);
}

static int connect_multifd(struct mig_out *o, struct ferry_error *err)
{
	struct ferry_mig *m = o->m;
	struct ferry_multifd_params mp = {
		.size = sizeof(mp),
		.channels = (unsigned)o->set.multifd_channels,
		.compression = o->set.compression ? FERRY_MULTIFD_COMP_ZSTD
						  : FERRY_MULTIFD_COMP_NONE,
		.zstd_level = 1,
		/* A channel the destination stopped reading is broken even
		 * while the main stream and the return path are fine. */
		.timeout_ms = (uint32_t)o->set.peer_timeout_ms,
	};
	int fds[FERRY_MULTIFD_MAX_CHANNELS];
	struct ferry_tls_conn *tcs[FERRY_MULTIFD_MAX_CHANNELS];
	struct ferry_multifd *mf;
	unsigned i;
	int r;

	for (i = 0; i < mp.channels; i++) {
		fds[i] = out_connect(o, o->uri, &tcs[i], err);
		if (fds[i] < 0)
			break;
	}
	if (i < mp.channels) {
		while (i--) {
			ferry__tls_unref(tcs[i]);
			close(fds[i]);
		}
		return ferry_error_prefix(err, "multifd channel: ");
	}
	/* The sessions pass to the multifd object with the fds. */
	mf = ferry__multifd_send_new_tls(&mp, fds, o->tls ? tcs : NULL, err);
	if (!mf)
		return err && err->code ? err->code : -EIO;
	r = ferry_ram_set_multifd_send(m->ram, mf, err);
	if (r) {
		ferry_multifd_free(mf);
		return r;
	}
	ferry__mutex_lock(&m->lock);
	o->mf = mf;
	if (o->cancel)
		cut_locked(o);
	ferry__mutex_unlock(&m->lock);
	return 0;
}

/* The preempt channel: its own connection, announced by its magic. */
static int connect_preempt(struct mig_out *o, const char *uri,
			   struct ferry_error *err)
{
	struct ferry_tls_conn *tc;
	struct ferry_chan *c;
	int fd = out_connect(o, uri, &tc, err);

	if (fd < 0)
		return ferry_error_prefix(err, "postcopy preempt channel: ");
	c = out_chan(fd, tc, FERRY_CHAN_WRITE);
	ferry__tls_unref(tc);
	if (!c) {
		close(fd);
		return ferry_error_set(err, -ENOMEM, "out of memory");
	}
	/* A stalled destination must not hold the return-path reader, which
	 * writes here, for longer than a silent one would. */
	ferry_chan_set_timeout(c, (int)o->set.peer_timeout_ms);
	ferry_put_be32(c, FERRY_PREEMPT_MAGIC);
	ferry_put_buf(c, (const uint8_t[16]){ 0 }, 16);
	if (ferry_chan_flush(c)) {
		int r = ferry_chan_error(c, err);
		ferry_chan_free(c);
		ferry_error_prefix(err, "postcopy preempt channel: ");
		return r;
	}
	ferry__mutex_lock(&o->m->lock);
	o->pre_fd = fd;
	if (o->cancel)
		cut_locked(o);
	ferry__mutex_unlock(&o->m->lock);
	o->pre_chan = c;
	o->pre_io = (struct ferry_record_io){ .chan = c };
	return 0;
}

/*
 * AGREE: what both sides must share, checked by the destination before any
 * section (it fails the load with a message naming both choices). Device
 * state goes over multifd only when multifd really runs (a socket URI).
 */
static int agree(struct mig_out *o, struct ferry_error *err)
{
	uint32_t flags = 0;
	uint8_t be[4];

	if (o->set.switchover_ack && !o->use_rp)
		return ferry_error_set(err, -EINVAL, "switchover-ack needs a "
			"return path (a socket URI and capability return-path)");
	/* Multifd runs with RAM over a socket: the destination reckons the
	 * same way (agree_check). */
	if (mig_ds_multifd(&o->set) && o->mf) {
		flags |= FERRY_AGREE_DEVSTATE_MULTIFD;
		ferry__save_devstate_multifd(o->s, o->mf);
	}
	if (o->set.switchover_ack)
		flags |= FERRY_AGREE_SWITCHOVER_ACK;
	for (struct ferry_dev *d = o->m->ctx->devs; d; d = d->next)
		if (d->ops->save_complete_thread)
			flags |= FERRY_AGREE_DEVSTATE_BUFFERS;
	ferry__put_be32(be, flags);
	return ferry_save_command(o->s, FERRY_CMD_AGREE, be, 4, err);
}

/* Postcopy at setup: ADVISE before any page, and the preempt channel. */
static int postcopy_setup(struct mig_out *o, struct ferry_error *err)
{
	struct ferry_mig *m = o->m;
	uint8_t adv[16];
	int r;

	if (!o->use_rp || !m->ram)
		return ferry_error_set(err, -EINVAL, "postcopy-ram needs %s",
			!m->ram ? "the VM's RAM given to the engine" :
			"a return path (a socket URI and capability return-path)");
	ferry__put_be64(adv, (uint64_t)sysconf(_SC_PAGESIZE));
	ferry__put_be64(adv + 8, m->ram->blocks[0].page_size);
	r = ferry_save_command(o->s, FERRY_CMD_POSTCOPY_ADVISE, adv, 16, err);
	if (!r && o->set.postcopy_preempt)
		r = connect_preempt(o, o->uri, err);
	return r;
}

/* tls-creds: the source's credentials, checked before any connection. */
static int tls_setup(struct mig_out *o, bool socket, struct ferry_error *err)
{
	struct ferry_tls_config cfg = {
		.dir = o->set.tls_creds,
		.server = false,
		/* Without it, each connection checks its URI's host
		 * (out_connect). */
		.hostname = o->set.tls_hostname,
		.ktls = o->set.tls_ktls,
	};

	if (!o->set.tls_creds[0])
		return 0;
	if (!socket)
		return ferry_error_set(err, -EINVAL, "tls-creds is set but %s is "
				       "not a connection: TLS needs tcp: or unix:",
				       o->uri);
	o->tls = ferry__tls_new(&cfg, err);
	return o->tls ? 0 : (err && err->code ? err->code : -EINVAL);
}

static int setup(struct mig_out *o, struct ferry_error *err)
{
	struct ferry_mig *m = o->m;
	bool socket = ferry_uri_is_socket(&o->u);
	int fd, r;

	o->use_rp = o->set.return_path && socket;
	/*
	 * The channels first, their handshakes written, then the main
	 * connection: the destination tells connections apart by their first
	 * bytes, so by the time it reads the main stream its multifd receiver
	 * exists.
	 */
	if ((r = tls_setup(o, socket, err)))
		return r;
	if (o->set.multifd && socket && m->ram && (r = connect_multifd(o, err)))
		return r;
	fd = out_connect(o, o->uri, &o->tls_main, err);
	if (fd < 0)
		return fd;
	o->c = out_chan(fd, o->tls_main, FERRY_CHAN_WRITE);
	if (!o->c) {
		close(fd);
		return ferry_error_set(err, -ENOMEM, "out of memory");
	}
	if (socket && !o->use_rp)
		ferry_chan_set_timeout(o->c, (int)o->set.peer_timeout_ms);
	ferry__mutex_lock(&m->lock);
	o->fd = fd;
	if (o->cancel)
		cut_locked(o);
	ferry__mutex_unlock(&m->lock);
	if (o->use_rp &&
	    (r = rp_start(&o->rp, fd, o->tls_main, o->set.peer_timeout_ms, err)))
		return r;
	o->s = ferry_save_new(m->ctx, o->c, err);
	if (!o->s)
		return err && err->code ? err->code : -EIO;
	if (o->use_rp) {
		/* Open the return path first: a destination that refuses
		 * the setup sections can then say why. It also learns how
		 * long we wait for its heartbeats. */
		uint8_t be[4];

		ferry__put_be32(be, (uint32_t)o->set.peer_timeout_ms);
		r = ferry_save_command(o->s, FERRY_CMD_OPEN_RETURN_PATH, be, 4,
				       err);
		if (!r)
			r = hb_start(&o->hb, o->s, o->set.peer_timeout_ms, err);
		if (r)
			return r;
	}
	if ((r = agree(o, err)))
		return r;
	if (o->set.postcopy_ram && (r = postcopy_setup(o, err)))
		return r;
	r = ferry_save_setup(o->s, err);
	if (r)
		return r;
	o->prog.setup_time_ms = (now_ns() - o->t_start) / 1000000;
	publish(o);
	return 0;
}

/* ---- precopy -------------------------------------------------------------------- */

/*
 * Precopy until the rest fits the downtime limit and further passes stop
 * shrinking it. Decisions are taken when a pass ends (a dirty-log sync),
 * when "remaining" is the dirty set of a whole pass; in between, rounds
 * just send. Bandwidth is every byte on every connection over the pass, so
 * with multifd (where the main stream carries almost nothing) the expected
 * downtime is what the link really gives.
 */
static int precopy(struct mig_out *o, struct ferry_error *err)
{
	struct ferry_mig *m = o->m;
	struct ferry_mig_info *p = &o->prog;
	uint64_t bytes0 = total_bytes(o), pass_t0 = now_ns(), pass_b0 = bytes0;
	uint64_t bw_t0 = pass_t0, bw_b0 = bytes0, dirty = 0;
	uint64_t paced = 0;  /* ns this bandwidth window slept (see below) */
	uint64_t last_sync = 0, prev_rest = 0, bw = 0, bw_prev = 0;
	unsigned strikes = 0, fit_passes = 0, stuck = 0;

	for (;;) {
		uint64_t must, can, rest, sync = 0, sync_ns = 0;
		enum mig_fault f;
		int r;

		if (cancelled(o))
			return ferry_error_set(err, -ECANCELED, "cancelled");
		if (postcopy_wanted(o)) {
			publish(o);
			return 1;
		}
		if ((r = rp_failed(&o->rp, err)))
			return r;
		ferry_save_pending(o->s, true, &must, &can);
		rest = must + can;
		if (m->ram) {
			struct ferry_ram_stats st;

			ferry_ram_get_stats(m->ram, &st);
			sync = st.dirty_sync_count;
			dirty = st.dirty_pages_last_sync;
			sync_ns = st.last_sync_ns;
		} else {
			sync = last_sync + 1;  /* no dirty log: a round is a pass */
		}
		if (sync != last_sync) {
			uint64_t now = now_ns(), sent = total_bytes(o) - pass_b0;
			uint64_t dt = now > pass_t0 ? now - pass_t0 : 1, avail;
			uint64_t exp_us;
			bool fits, shrinks, idle;

			refresh_live(o);
			/* A window shorter than that says nothing about the
			 * link: until one is long enough, nothing "fits" but
			 * an empty rest. */
			if (now - bw_t0 >= BW_WINDOW_NS) {
				uint64_t wb = total_bytes(o) - bw_b0, w = 0;

				/* Over the time spent sending: the pacing
				 * below is ours, not the link's. */
				if (wb)
					w = (uint64_t)((unsigned __int128)wb *
						1000000000ull / (now - bw_t0 -
						(paced < now - bw_t0 ? paced : 0)));
				/* Bursts after a pause may outrun the cap for a
				 * moment (the rate limiter's credit); the link as
				 * precopy sees it is never faster than the cap. */
				if (o->set.max_bandwidth && w > o->set.max_bandwidth)
					w = o->set.max_bandwidth;
				/*
				 * The switchover is priced at the slower of the
				 * last two windows: a rate must hold for two
				 * before the VM is stopped on it. On a loaded
				 * host one short window of the main stream has
				 * read 4-5 times the window before it, and the
				 * rest then went at a fifth of that with the
				 * vCPUs stopped (1.3 s for a 300 ms limit:
				 * docs/performance.md, "Soak"). A link that
				 * really got faster costs one more window.
				 */
				if (w) {
					bw = bw_prev && bw_prev < w ? bw_prev : w;
					bw_prev = w;
				}
				bw_t0 = now;
				bw_b0 = total_bytes(o);
				paced = 0;
			}
			avail = o->set.avail_switchover_bandwidth ?
				o->set.avail_switchover_bandwidth : bw;
			p->pass++;
			p->bandwidth = bw;
			p->mbps = (double)sent * 8 / 1e6 / ((double)dt / 1e9);
			p->dirty_pages_rate = (uint64_t)((unsigned __int128)
				dirty * 1000000000ull / dt);
			/* The final sync is downtime too, and not free: a
			 * thread-backend guest of 4 GiB takes 2-6 ms for it
			 * here. Priced at what the last one took, even with
			 * nothing left to send: the switchover syncs anyway. */
			exp_us = sync_ns / 1000 + (avail ? (uint64_t)
				((unsigned __int128)rest * 1000000u / avail) : 0);
			p->expected_downtime_ms = avail || !rest ? exp_us / 1000 : 0;
			/* A whole pass that moved nothing: the rest can only go
			 * at the switchover (a device without precopy, say, on
			 * an idle or paused guest). Iterating cannot help; with
			 * no bandwidth ever measured there is no estimate to
			 * wait for either, so switch. */
			idle = last_sync && !sent && rest && rest == prev_rest;
			fits = ((avail || !rest) && p->expected_downtime_ms <=
				o->set.downtime_limit_ms) ||
			       (idle && !avail);
			if (idle && !avail)
				mig_trace(m, "pass %llu: nothing precopy can send, "
					  "and no bandwidth measured: switching",
					  (unsigned long long)p->pass + 1);
			shrinks = !last_sync ||
				  rest * 100 < prev_rest * SHRINK_PCT;
			mig_trace(m, "pass %llu: rest %llu bytes, %llu bytes/s over "
				  "every channel, expected downtime %llu ms%s%s",
				  (unsigned long long)p->pass,
				  (unsigned long long)rest,
				  (unsigned long long)bw,
				  (unsigned long long)p->expected_downtime_ms,
				  fits ? ", fits" : "", shrinks ? ", shrinking" : "");
			pass_event(m, p->pass);
			/* Test pause: a later pass begins (whether or not it
			 * will be the last). */
			if (p->pass >= 2)
				mig_fault_pause(m, false, FAULT_PAUSE_PASS_2,
						&o->cancel);
			if (fits && (!rest || !shrinks ||
				     fit_passes++ >= MAX_EXTRA_PASSES)) {
				/* switchover-ack: not before the destination
				 * says so; precopy goes on meanwhile. */
				if ((r = swo_ack_ready(o, err)) < 0)
					return r;
				if (r) {
					publish(o);
					return 0;
				}
			}
			/* The automatic switch to postcopy (docs/architecture.md,
			 * "Postcopy"): precopy is not converging. */
			stuck = !fits && !shrinks ? stuck + 1 : 0;
			if (o->set.postcopy_ram &&
			    ((o->set.postcopy_after_passes &&
			      stuck >= o->set.postcopy_after_passes) ||
			     (!fits && o->set.postcopy_after_ms &&
			      now - o->t_start >= o->set.postcopy_after_ms *
						  1000000ull))) {
				mig_trace(m, "postcopy: switching by itself (%s)",
					  stuck >= o->set.postcopy_after_passes &&
					  o->set.postcopy_after_passes ?
					  "passes stopped shrinking" :
					  "precopy ran too long");
				publish(o);
				return 1;
			}
			/* Auto-converge: the guest dirties faster than we send. */
			if (!fits && !shrinks && o->set.auto_converge &&
			    ++strikes >= 2) {
				unsigned pct = p->throttle_pct ?
					p->throttle_pct + (unsigned)o->set.throttle_increment :
					(unsigned)o->set.throttle_initial;

				if (pct > o->set.throttle_max)
					pct = (unsigned)o->set.throttle_max;
				if (pct != p->throttle_pct) {
					p->throttle_pct = pct;
					m->ops.vm_throttle(m->opaque, pct);
					o->throttled = true;
					mig_trace(m, "auto-converge: throttle %u%%",
						  pct);
				}
				strikes = 0;
			}
			prev_rest = rest;
			last_sync = sync;
			pass_t0 = now;
			pass_b0 = total_bytes(o);
			/* Not converging (a rest that only the switchover can
			 * move, or a guest as fast as the link): passes of a
			 * few pages each, back to back, would only burn a core
			 * on dirty-log syncs. At most one such pass per
			 * MIN_STUCK_PASS_NS: the dirty set then grows into
			 * passes worth a sync. */
			if (!fits && !shrinks && dt < MIN_STUCK_PASS_NS) {
				usleep((useconds_t)((MIN_STUCK_PASS_NS - dt) / 1000));
				paced += MIN_STUCK_PASS_NS - dt;
			}
		}
		p->precopy_bytes = total_bytes(o) - bytes0;
		publish(o);
		r = ferry_save_round(o->s, ROUND_BUDGET, err);
		if (r)
			return r;
		/* Test pause: in the middle of the first pass (passes count
		 * dirty syncs; the first sync is at setup). */
		f = __atomic_load_n(&m->fault, __ATOMIC_RELAXED);
		if (f == FAULT_PAUSE_PASS_1 && p->pass <= 1)
			mig_fault_pause(m, false, FAULT_PAUSE_PASS_1, &o->cancel);
		if ((r = rate_limit(o, bytes0)))
			return ferry_error_set(err, r, "cancelled");
	}
}

/*
 * Before stopping the guest, let the destination catch up: it answers a
 * PING only once it has loaded everything before it on the main stream,
 * including the last pass's multifd sync point, so pages still sitting in
 * socket buffers are applied now, while the guest runs, instead of inside
 * the downtime. Best effort.
 */
static void drain(struct mig_out *o)
{
	struct rp_reader *rp = &o->rp;
	uint32_t value = (uint32_t)o->prog.pass + 1;
	uint64_t deadline = now_ns() + DRAIN_TIMEOUT_MS * 1000000ull;
	uint8_t be[4];

	ferry__put_be32(be, value);
	if (!rp->live || ferry_save_command(o->s, FERRY_CMD_PING, be, 4, NULL) ||
	    ferry__save_flush(o->s, NULL))
		return;
	ferry__mutex_lock(&rp->lock);
	while (rp->pong != value && !rp->done &&
	       mig_cond_wait_until(&rp->cond, &rp->lock, deadline))
		;
	ferry__mutex_unlock(&rp->lock);
}

/* ---- the switchover ---------------------------------------------------------------- */

/* Wait for LOADED, a failure of the destination, or a cancel. 0 when the
 * destination holds the whole state. */
static int wait_loaded(struct mig_out *o, struct ferry_error *err)
{
	struct rp_reader *rp = &o->rp;
	int r = 0;

	ferry__mutex_lock(&rp->lock);
	for (;;) {
		if (rp->loaded)
			break;
		if ((r = rp_failure_locked(rp, err)))
			break;
		if (rp->done) {
			r = ferry_error_set(err, -EPROTO, "destination: closed "
					    "the return path without LOADED");
			break;
		}
		ferry__mutex_unlock(&rp->lock);
		if (cancelled(o)) {
			r = ferry_error_set(err, -ECANCELED, "cancelled");
			ferry__mutex_lock(&rp->lock);
			break;
		}
		ferry__mutex_lock(&rp->lock);
		/* The reader's own reads time out after peer-timeout; this
		 * wait only needs to notice a cancel now and then. */
		mig_cond_wait_until(&rp->cond, &rp->lock,
				    now_ns() + 100 * 1000000ull);
	}
	ferry__mutex_unlock(&rp->lock);
	return r;
}

static bool killed(struct mig_out *o)
{
	return locked_flag(o, &o->killed);
}

/* After GO: the destination's ack (SHUT), within peer-timeout (or until
 * ferry_mig_free, which does not wait for it). */
static bool wait_ack(struct mig_out *o)
{
	struct rp_reader *rp = &o->rp;
	uint64_t deadline = now_ns() + o->set.peer_timeout_ms * 1000000ull;
	uint32_t status = 0;
	char reason[sizeof(rp->shut_msg.reason)];
	bool ack;

	ferry__mutex_lock(&rp->lock);
	while (!rp->shut && !rp->done && now_ns() < deadline) {
		ferry__mutex_unlock(&rp->lock);
		if (killed(o)) {
			ferry__mutex_lock(&rp->lock);
			break;
		}
		ferry__mutex_lock(&rp->lock);
		mig_cond_wait_until(&rp->cond, &rp->lock,
				    now_ns() + 100 * 1000000ull);
	}
	ack = rp->shut;
	if (ack) {
		status = rp->shut_msg.status;
		snprintf(reason, sizeof(reason), "%s", rp->shut_msg.reason);
	}
	ferry__mutex_unlock(&rp->lock);
	if (status)
		/* It has the VM, but says something went wrong running it:
		 * that is its side's report; ours is that it has the VM. */
		mig_trace(o->m, "destination acknowledged GO with status %u: %s",
			  status, reason);
	return ack;
}

static double span_ms(uint64_t a, uint64_t b)
{
	return b > a ? (double)(b - a) / 1e6 : 0;
}

/* The destination's part of the stream's tail: its device loading (data
 * its load threads were still applying, config state, the rest), each
 * clamped so the slices never add up to more than the tail. */
static void split_tail(double *ph, double tail, double data, double cfg,
		       double dev)
{
	const double want[3] = { data, cfg, dev };
	const enum ferry_phase at[3] = { FERRY_PHASE_DEVICE_DATA,
		FERRY_PHASE_DEVICE_CONFIG, FERRY_PHASE_DEVICE_LOAD };

	for (int i = 0; i < 3; i++) {
		ph[at[i]] = want[i] < tail ? want[i] : tail;
		tail -= ph[at[i]];
	}
	ph[FERRY_PHASE_TRANSFER] = tail;
}

/* Downtime and its phases, from both sides' timestamps. */
static void account_downtime(struct mig_out *o)
{
	const struct ferry_save_stats *ss = &o->ss;
	struct rp_reader *rp = &o->rp;
	const uint64_t *lv = rp->loaded_msg.values, *av = rp->shut_msg.values;
	double *ph = o->prog.phase_ms, dev, data, cfg;
	uint64_t t0 = o->t_stop, end = ss->t_done;

	memset(ph, 0, sizeof(o->prog.phase_ms));
	ph[FERRY_PHASE_FINAL_SYNC] = span_ms(t0, ss->t_final_sync);
	ph[FERRY_PHASE_REMAINING_RAM] = span_ms(ss->t_final_sync,
						ss->t_iterable_done);
	ph[FERRY_PHASE_DEVICE_SAVE] = span_ms(ss->t_iterable_done, ss->t_done);
	dev = (double)lv[FERRY_SHUT_DEVICE_LOAD_NS] / 1e6;
	data = (double)lv[FERRY_SHUT_DEVSTATE_WAIT_NS] / 1e6;
	cfg = (double)lv[FERRY_SHUT_DEVSTATE_CONFIG_NS] / 1e6;
	if (o->use_rp && rp->shut && av[FERRY_SHUT_T_RESUMED] &&
	    lv[FERRY_SHUT_BOOT_ID] == mig_boot_id_hash()) {
		/* One host: both monotonic clocks are the same clock. A
		 * destination left paused reports when it was ready to run:
		 * the wait for `cont` is not downtime. Device loading that
		 * overlapped our own device-save is not counted twice: the
		 * phases are slices of one span and add up to the downtime. */
		double tail = span_ms(ss->t_done, lv[FERRY_SHUT_T_LOADED]);
		/* LOADED can be stamped before our own t_done: the phases
		 * are consecutive slices, so the handshake starts at the
		 * later of the two. */
		uint64_t hs0 = lv[FERRY_SHUT_T_LOADED] > ss->t_done ?
			       lv[FERRY_SHUT_T_LOADED] : ss->t_done;

		split_tail(ph, tail, data, cfg, dev);
		ph[FERRY_PHASE_HANDSHAKE] = span_ms(hs0, av[FERRY_SHUT_T_GO]);
		ph[FERRY_PHASE_RESUME] = span_ms(av[FERRY_SHUT_T_GO],
						 av[FERRY_SHUT_T_RESUMED]);
		end = av[FERRY_SHUT_T_RESUMED];
	} else if (o->use_rp && rp->shut) {
		/* Two hosts: our clock bounds it, the destination's clock
		 * gives its own durations. */
		double tail = span_ms(ss->t_done, rp->t_loaded);
		double resume = span_ms(av[FERRY_SHUT_T_GO],
					av[FERRY_SHUT_T_RESUMED]);
		double hs = span_ms(rp->t_loaded, rp->t_shut) - resume;

		split_tail(ph, tail, data, cfg, dev);
		ph[FERRY_PHASE_HANDSHAKE] = hs > 0 ? hs : 0;
		ph[FERRY_PHASE_RESUME] = resume;
		end = rp->t_shut;
	}
	o->prog.downtime_ns = end > t0 ? end - t0 : 0;
}

/*
 * Called by the save just before it writes EOF. With a return path, this
 * is where the main connection becomes the verdict's: from here a cancel
 * leaves it up (it carries the ABORT) and its writes are bounded. Without
 * one, EOF *is* the verdict: this is the commit point, taken under the
 * lock a cancel takes, so a cancel either comes first (no EOF goes out) or
 * is refused.
 */
static int before_eof(void *arg, struct ferry_error *err)
{
	struct mig_out *o = arg;
	struct ferry_mig *m = o->m;
	bool cancel;

	ferry__mutex_lock(&m->lock);
	cancel = o->cancel;
	if (!cancel) {
		o->eof_sent = true;
		if (!o->use_rp)
			o->committing = true;
	}
	ferry__mutex_unlock(&m->lock);
	if (cancel)
		return ferry_error_set(err, -ECANCELED, "cancelled");
	ferry__save_set_timeout(o->s, (int)o->set.peer_timeout_ms);
	return 0;
}

/* Wait in device until cancelled (the hold-device fault point). */
static void hold(struct mig_out *o)
{
	struct ferry_mig *m = o->m;

	ferry__mutex_lock(&m->lock);
	while (!o->cancel)
		pthread_cond_wait(&m->cond, &m->lock);
	ferry__mutex_unlock(&m->lock);
}

/* Stop the vCPUs for the switchover (finish-migrate), and end throttling:
 * from here the guest writes nothing. */
static int stop_vm(struct mig_out *o, struct ferry_error *err)
{
	struct ferry_mig *m = o->m;
	int r = m->ops.vm_stop(m->opaque, FERRY_RUN_FINISH_MIGRATE, &o->was, err);

	if (r)
		return ferry_error_prefix(err, "stopping the VM: ");
	o->stopped = true;
	o->t_stop = now_ns();
	if (o->throttled) {
		m->ops.vm_throttle(m->opaque, 0);
		o->throttled = false;
	}
	return 0;
}

static int switchover(struct mig_out *o, struct ferry_error *err)
{
	struct ferry_mig *m = o->m;
	uint64_t bytes_before;
	bool abort_go;
	int r;

	/* The guest must not write while the rest is sent. */
	if ((r = stop_vm(o, err)))
		return r;
	if (!mig_move_status(m, false, FERRY_MIG_ACTIVE, FERRY_MIG_DEVICE))
		return ferry_error_set(err, -ECANCELED, "cancelled");
	mig_fault_pause(m, false, FAULT_PAUSE_STOPPED, &o->cancel);
	if (mig_fault_take(m, FAULT_HOLD_DEVICE))
		hold(o);
	if (cancelled(o))
		return ferry_error_set(err, -ECANCELED, "cancelled");
	if (m->ops.switchover_begin &&
	    (r = m->ops.switchover_begin(m->opaque, err)))
		return ferry_error_prefix(err, "switchover_begin: ");
	bytes_before = total_bytes(o);
	if (mig_fault_take(m, FAULT_LOSE_EOF)) {
		/* The link goes silent before the rest arrives. */
		hb_silence(&o->hb);
	} else {
		r = ferry__save_complete(o->s, before_eof, o, err);
		if (r)
			return r;
	}
	o->ss.size = sizeof(o->ss);
	ferry_save_get_stats(o->s, &o->ss);
	o->prog.downtime_bytes = total_bytes(o) - bytes_before;
	publish(o);
	if (!o->use_rp) {
		/* No one to ask: the complete stream (flushed whole) was the
		 * verdict, committed in before_eof. */
		o->committed = true;
		o->completed = true;
		account_downtime(o);
		return 0;
	}

	mig_fault_pause(m, false, FAULT_PAUSE_EOF, &o->cancel);
	r = wait_loaded(o, err);
	if (r)
		return r;
	mig_set_switchover(m, false, FERRY_SWO_LOADED);
	/* The destination must hold what we sent: its digest of every
	 * device's state is ours, or it ran into something we did not send. */
	if (o->rp.loaded_msg.values[FERRY_SHUT_DEVICE_DIGEST] !=
	    o->ss.device_digest)
		return ferry_error_set(err, -EBADMSG, "the destination loaded "
			"other device state than was sent (digest %016llx, "
			"sent %016llx)",
			(unsigned long long)o->rp.loaded_msg.values[FERRY_SHUT_DEVICE_DIGEST],
			(unsigned long long)o->ss.device_digest);
	/* The commit point. A cancel that came first wins; one that comes
	 * later is refused (cancel_check). A return path that already broke
	 * would swallow GO and leave both sides in doubt: keep the VM. */
	ferry__mutex_lock(&m->lock);
	abort_go = o->cancel;
	if (!abort_go)
		o->committing = true;
	ferry__mutex_unlock(&m->lock);
	if (abort_go)
		return ferry_error_set(err, -ECANCELED, "cancelled");
	if ((r = rp_failed(&o->rp, err))) {
		ferry__mutex_lock(&m->lock);
		o->committing = false;
		ferry__mutex_unlock(&m->lock);
		return r;
	}
	if (mig_fault_take(m, FAULT_LOSE_GO)) {
		/* As if GO went out and was lost on the way. */
		hb_silence(&o->hb);
		o->committed = true;
	} else {
		r = ferry__save_verdict(o->s, FERRY_CMD_SWITCHOVER_GO, err);
		if (r)
			return ferry_error_prefix(err, "sending GO: ");
		o->committed = true;
	}
	mig_set_switchover(m, false, FERRY_SWO_GO);
	if (!wait_ack(o)) {
		o->in_doubt = true;
		return ferry_error_set(err, -ETIMEDOUT,
			"switchover in doubt: GO was sent but the destination "
			"did not confirm it within %llu ms; the VM stays stopped "
			"here. Continue the destination if it runs or holds the "
			"loaded VM (its switchover is \"in-doubt\"); continue "
			"this side only if the destination is gone",
			(unsigned long long)o->set.peer_timeout_ms);
	}
	o->completed = true;
	account_downtime(o);
	return 0;
}

/* ---- postcopy ------------------------------------------------------------------------ */

static int emit_discard(void *arg, const void *payload, size_t len,
			struct ferry_error *err)
{
	struct mig_out *o = arg;

	return ferry_save_command(o->s, FERRY_CMD_POSTCOPY_DISCARD, payload, len,
				  err);
}

/* How the destination stands, from the return path: 0 while postcopy
 * goes on; -errno with @err once it failed or went away. *@ran: it runs
 * the VM (RUNNING came). */
static int pc_peer(struct mig_out *o, bool *ran, struct ferry_error *err)
{
	struct rp_reader *rp = &o->rp;
	int r;

	ferry__mutex_lock(&rp->lock);
	*ran = rp->running;
	r = rp_failure_locked(rp, err);
	if (!r && rp->done && !rp->shut)
		r = ferry_error_set(err, -EPROTO, "destination: closed the "
				    "return path");
	ferry__mutex_unlock(&rp->lock);
	return r;
}

/*
 * A write of ours failed after the package went out. The destination may
 * have refused the package (and closed the connection, which is what broke
 * our write): its SHUT says so, and then the VM never ran there and may
 * resume here. Anything else after the package is postcopy broken.
 */
static int pc_write_failed(struct mig_out *o, int r, struct ferry_error *err)
{
	struct rp_reader *rp = &o->rp;
	struct ferry_error dest = { 0 };

	ferry__mutex_lock(&rp->lock);
	rp_wait_end_locked(rp, 1000);
	if (rp->shut && rp->shut_msg.status && !rp->running &&
	    rp_failure_locked(rp, &dest)) {
		o->committed = false;
		ferry_error_clear(err);
		ferry_error_propagate(err, &dest);
		r = dest.code;
	}
	ferry__mutex_unlock(&rp->lock);
	return r;
}

static void pc_account(struct mig_out *o)
{
	const uint64_t *v = o->rp.running_msg.values;
	double *ph = o->prog.phase_ms, dev, data, cfg;
	uint64_t t0 = o->t_stop, end = o->rp.t_running;

	memset(ph, 0, sizeof(o->prog.phase_ms));
	ph[FERRY_PHASE_FINAL_SYNC] = span_ms(t0, o->t_pc_sync);
	ph[FERRY_PHASE_REMAINING_RAM] = span_ms(o->t_pc_sync, o->t_pc_discard);
	ph[FERRY_PHASE_DEVICE_SAVE] = span_ms(o->t_pc_discard, o->ss.t_done);
	dev = (double)v[FERRY_SHUT_DEVICE_LOAD_NS] / 1e6;
	data = (double)v[FERRY_SHUT_DEVSTATE_WAIT_NS] / 1e6;
	cfg = (double)v[FERRY_SHUT_DEVSTATE_CONFIG_NS] / 1e6;
	if (v[FERRY_SHUT_BOOT_ID] == mig_boot_id_hash() && v[FERRY_SHUT_T_RESUMED])
		end = v[FERRY_SHUT_T_RESUMED];  /* one host, one clock */
	{
		double resume = span_ms(v[FERRY_SHUT_T_GO], v[FERRY_SHUT_T_RESUMED]);
		double tail = span_ms(o->ss.t_done, end) - resume;

		if (tail < 0)
			tail = 0;
		split_tail(ph, tail, data, cfg, dev);
		ph[FERRY_PHASE_RESUME] = resume;
	}
	o->prog.downtime_ns = end > t0 ? end - t0 : 0;
}

/*
 * Postcopy (docs/architecture.md, "Postcopy"): stop the VM; a last multifd
 * sync point and dirty sync; DISCARD every page still to send; LISTEN; the
 * device state and RUN in one package. Once every byte of the package is
 * in the kernel the destination may run the VM, and this side never
 * resumes - unless the destination says it failed before it ran. Then the
 * rest of RAM, requested pages first, and END.
 */
static int pc_run(struct mig_out *o, struct ferry_error *err);
static int pc_pause(struct mig_out *o, struct ferry_error *err);
static void cut_link(struct mig_out *o);

/* The switch: stop, the final sync, DISCARD, LISTEN, the package (which
 * holds RUN). *sent: the package is all in the kernel. */
static int pc_switch(struct mig_out *o, bool *sent, struct ferry_error *err)
{
	struct ferry_mig *m = o->m;
	bool cancel;
	int r;

	*sent = false;
	if ((r = stop_vm(o, err)))
		return r;
	ferry__mutex_lock(&m->lock);
	o->pc_switched = true;
	ferry__mutex_unlock(&m->lock);
	if (m->ops.switchover_begin &&
	    (r = m->ops.switchover_begin(m->opaque, err)))
		return ferry_error_prefix(err, "switchover_begin: ");
	o->prog.postcopy = true;
	o->pc_bytes0 = o->pc_rate_b0 = total_bytes(o);
	o->t_pc_start = o->pc_rate_t0 = o->t_stop;
	r = ferry__save_ram_section(o->s, ferry__ram_pc_switch_section, err);
	o->t_pc_sync = now_ns();
	if (!r)
		r = ferry__ram_pc_discard(m->ram, emit_discard, o, err);
	o->t_pc_discard = now_ns();
	if (!r)
		r = ferry_save_command(o->s, FERRY_CMD_POSTCOPY_LISTEN, NULL, 0, err);
	if (r)
		return r;
	/* The commit point, taken under the lock a cancel takes. */
	ferry__mutex_lock(&m->lock);
	cancel = o->cancel;
	if (!cancel)
		o->committing = true;
	ferry__mutex_unlock(&m->lock);
	if (cancel)
		return ferry_error_set(err, -ECANCELED, "cancelled");
	/* Requests may come while the destination loads the package. */
	__atomic_store_n(&o->pc_on, true, __ATOMIC_RELEASE);
	return ferry__save_package(o->s, sent, err);
}

static int postcopy(struct mig_out *o, struct ferry_error *err)
{
	struct ferry_mig *m = o->m;
	struct ferry__pc_sched sched = { 0 };
	bool sent;
	int r;

	/* While the VM still runs: the channels' pages in flight are
	 * applied, and every page that will be sent again is discarded now
	 * (ram.c, ferry__ram_pc_prepare_section); a PING the destination
	 * answers once it is through lets the switch start from there. The
	 * switch's own discards then cover only what the guest writes from
	 * here to the stop. */
	r = ferry__save_ram_section(o->s, ferry__ram_pc_prepare_section, err);
	if (!r)
		r = ferry__ram_pc_discard(m->ram, emit_discard, o, err);
	if (r)
		return r;
	drain(o);
	/* The switch window at real-time priority (postcopy.c,
	 * ferry__pc_sched_raise): the final sync's page-table walk in it
	 * took 1.4-1.7 ms, or 2.8-3.2 when preempted. */
	ferry__pc_sched_raise(&sched, true);
	r = pc_switch(o, &sent, err);
	ferry__pc_sched_restore(&sched);
	if (sent) {
		o->committed = true;
		mig_move_status(m, false, FERRY_MIG_ACTIVE,
				FERRY_MIG_POSTCOPY_ACTIVE);
	}
	if (r)
		return sent ? pc_write_failed(o, r, err) : r;
	o->ss.size = sizeof(o->ss);
	ferry_save_get_stats(o->s, &o->ss);
	o->prog.downtime_bytes = total_bytes(o) - o->pc_bytes0;
	mig_fault_pause(m, false, FAULT_PAUSE_RUN, &o->cancel);
	/* From here on a broken link pauses, it never fails: the guest's
	 * memory is split between the two sides. */
	while ((r = pc_run(o, err)) > 0)
		if ((r = pc_pause(o, err)))
			return r;
	if (r)
		return r;
	if (!o->prog.downtime_ns)
		pc_account(o);
	o->prog.postcopy_time_ms = (now_ns() - o->t_pc_start) / 1000000;
	o->completed = true;
	return 0;
}

/*
 * The rest of RAM, then END, then the destination's word that every page
 * is in. 0: done. 1: the link broke (pause and recover). <0: the
 * destination failed before it ran the VM (committed is cleared: resume).
 */
static int pc_run(struct mig_out *o, struct ferry_error *err)
{
	struct ferry_mig *m = o->m;
	uint64_t last_pub = 0, budget = PC_BUDGET;
	bool ran = false;
	int r;

	for (;;) {
		uint64_t now = now_ns();

		if ((r = pc_peer(o, &ran, err))) {
			/* Failed before it ran the VM: the VM is still whole
			 * here (never touched since the stop), so resume. */
			if (!ran && o->rp.shut && o->rp.shut_msg.status) {
				o->committed = false;
				return r;
			}
			return 1;
		}
		if (ran && !o->prog.downtime_ns)
			pc_account(o);
		if (ferry__ram_pc_idle(m->ram))
			break;
		/* The fault point fires once the destination runs the VM, so
		 * the break is one recovery can mend. */
		if (ran && mig_fault_take(m, FAULT_POSTCOPY_CUT))
			cut_link(o);
		r = ferry__save_ram_round(o->s, budget, false, err);
		if (r) {
			ferry_error_prefix(err, "postcopy: ");
			r = pc_write_failed(o, r, err);
			return o->committed ? 1 : r;
		}
		/* max-bandwidth holds in postcopy too; a page request cuts
		 * the wait short (it goes out with one background page). */
		budget = PC_BUDGET;
		for (;;) {
			uint64_t d = mig_rate_delay_ns(o->set.max_bandwidth,
						       total_bytes(o) - o->pc_rate_b0,
						       now_ns() - o->pc_rate_t0);
			struct timespec ts = { 0, (long)(d < 2000000 ? d : 2000000) };

			if (!d)
				break;
			if (ferry__ram_pc_requests(m->ram)) {
				budget = 1;
				break;
			}
			nanosleep(&ts, NULL);
		}
		if (now - last_pub >= 100000000ull) {
			o->prog.postcopy_bytes = total_bytes(o) - o->pc_bytes0;
			o->prog.postcopy_requests = __atomic_load_n(
				&m->ram->pc_served, __ATOMIC_RELAXED);
			publish(o);
			last_pub = now;
		}
	}
	/* Every page is out. The preempt channel's last record goes first,
	 * so END on the main stream cannot overtake a requested page. */
	if (o->pre_chan) {
		ferry__mutex_lock(&o->pre_lock);
		o->pre_closed = true;
		r = ferry_record_write(&o->pre_io, FERRY_REC_EOF, NULL, 0, err);
		if (!r && ferry_chan_flush(o->pre_chan))
			r = ferry_chan_error(o->pre_chan, err);
		ferry__mutex_unlock(&o->pre_lock);
		if (r) {
			ferry_error_prefix(err, "postcopy preempt channel: ");
			return 1;
		}
	}
	r = ferry__save_ram_round(o->s, 0, true, err);
	if (!r)
		r = ferry__save_postcopy_end(o->s, err);
	if (r) {
		ferry_error_prefix(err, "postcopy: ");
		return 1;
	}
	o->prog.postcopy_bytes = total_bytes(o) - o->pc_bytes0;
	o->prog.postcopy_requests = __atomic_load_n(&m->ram->pc_served,
						    __ATOMIC_RELAXED);
	/* The destination answers once every page is in place. */
	ferry__mutex_lock(&o->rp.lock);
	while (!o->rp.shut && !o->rp.done)
		pthread_cond_wait(&o->rp.cond, &o->rp.lock);
	ferry__mutex_unlock(&o->rp.lock);
	if (pc_peer(o, &ran, err) || !o->rp.shut)
		return 1;
	return 0;
}

/* The postcopy-cut fault point: the link resets under us - every
 * connection of it, the idle multifd channels too. */
static void cut_link(struct mig_out *o)
{
	ferry__mutex_lock(&o->m->lock);
	if (o->fd >= 0)
		shutdown(o->fd, SHUT_RDWR);
	if (o->pre_fd >= 0)
		shutdown(o->pre_fd, SHUT_RDWR);
	if (o->mf)
		ferry_multifd_cancel(o->mf, -ECONNRESET, "link reset");
	ferry__mutex_unlock(&o->m->lock);
}

/* After the return-path reader is joined: cancel has no fd left to cut,
 * and the preempt channel (which owns its fd) is closed. */
static void forget_connections(struct mig_out *o)
{
	ferry__mutex_lock(&o->m->lock);
	o->fd = -1;
	o->pre_fd = -1;
	ferry__mutex_unlock(&o->m->lock);
	ferry_record_io_release(&o->pre_io);
	ferry_chan_free(o->pre_chan);
	o->pre_chan = NULL;
}

/* Drop every connection of a broken postcopy; the save keeps its state. */
static void pc_disconnect(struct mig_out *o)
{
	struct ferry_mig *m = o->m;

	hb_stop(&o->hb);
	ferry__mutex_lock(&m->lock);
	if (o->fd >= 0)
		shutdown(o->fd, SHUT_RDWR);
	if (o->pre_fd >= 0)
		shutdown(o->pre_fd, SHUT_RDWR);
	ferry__mutex_unlock(&m->lock);
	rp_stop(&o->rp);
	ferry__mutex_lock(&o->pre_lock);
	o->pre_closed = true;
	ferry__mutex_unlock(&o->pre_lock);
	forget_connections(o);
	ferry_chan_free(o->c);
	o->c = NULL;
	ferry__tls_unref(o->tls_main);
	o->tls_main = NULL;
}

/* One attempt to resume on @uri: a new connection and return path, then
 * the destination's received bitmaps, after which everything it lacks is
 * queued again. */
static int pc_reconnect(struct mig_out *o, const char *uri,
			struct ferry_error *err)
{
	struct ferry_mig *m = o->m;
	struct rp_reader *rp = &o->rp;
	uint8_t be[4];
	int fd, r;

	/* The preempt channel again, first: the destination takes it while
	 * it waits for the stream, and the return-path reader that writes
	 * on it starts only below. */
	if (o->set.postcopy_preempt) {
		ferry__mutex_lock(&o->pre_lock);
		o->pre_closed = false;
		ferry__mutex_unlock(&o->pre_lock);
		if ((r = connect_preempt(o, uri, err)))
			return r;
	}
	ferry__tls_unref(o->tls_main);
	fd = out_connect(o, uri, &o->tls_main, err);
	if (fd < 0)
		return fd;
	o->c = out_chan(fd, o->tls_main, FERRY_CHAN_WRITE);
	if (!o->c) {
		close(fd);
		return ferry_error_set(err, -ENOMEM, "out of memory");
	}
	ferry__mutex_lock(&m->lock);
	o->fd = fd;
	o->cut = o->cut_by_rp = false;
	ferry__mutex_unlock(&m->lock);
	ferry__mutex_lock(&rp->lock);
	rp->done = rp->shut = rp->resumed = false;
	rp->err = 0;
	rp->errmsg[0] = 0;
	ferry__mutex_unlock(&rp->lock);
	if ((r = ferry__save_rebind(o->s, o->c, err)) ||
	    (r = rp_start(rp, fd, o->tls_main, o->set.peer_timeout_ms, err)))
		return r;
	ferry__put_be32(be, (uint32_t)o->set.peer_timeout_ms);
	o->hb.stop = o->hb.silent = false;
	if ((r = ferry_save_command(o->s, FERRY_CMD_OPEN_RETURN_PATH, be, 4, err)) ||
	    (r = hb_start(&o->hb, o->s, o->set.peer_timeout_ms, err)) ||
	    (r = ferry_save_command(o->s, FERRY_CMD_POSTCOPY_RESUME, NULL, 0, err)) ||
	    (r = ferry__save_flush(o->s, err)))
		return r;
	ferry__mutex_lock(&rp->lock);
	while (!rp->resumed && !(r = rp_failure_locked(rp, err)) && !rp->done)
		pthread_cond_wait(&rp->cond, &rp->lock);
	if (!rp->resumed && !r)
		r = ferry_error_set(err, -EPROTO, "destination: closed the "
				    "return path while resuming");
	ferry__mutex_unlock(&rp->lock);
	if (r)
		return r;
	ferry__ram_pc_rewind(m->ram);
	/* The pause is no credit for a burst. */
	o->pc_rate_t0 = now_ns();
	o->pc_rate_b0 = total_bytes(o);
	return 0;
}

/*
 * A broken link after RUN: postcopy-paused. Nothing is given up: the VM
 * stays stopped here (finish-migrate: the VMM refuses `cont`), its RAM
 * stays, and ferry_mig_resume (QMP migrate with "resume": true) tries a
 * new connection - as often as it takes. 0 once running again; -errno
 * only when the engine is being freed.
 */
static int pc_pause(struct mig_out *o, struct ferry_error *err)
{
	struct ferry_mig *m = o->m;
	char uri[sizeof(o->uri)];

	mig_trace(m, "postcopy paused: %s", err->msg);
	pc_disconnect(o);
	mig_set_status(m, false, FERRY_MIG_POSTCOPY_PAUSED,
		       err->msg[0] ? err->msg : "the connection broke");
	for (;;) {
		struct ferry_error e2 = { 0 };

		ferry__mutex_lock(&m->lock);
		while (!o->resume_req && !o->killed)
			pthread_cond_wait(&m->cond, &m->lock);
		if (o->killed) {
			ferry__mutex_unlock(&m->lock);
			return ferry_error_set(err, -ECANCELED, "postcopy paused "
				"when the engine was freed");
		}
		o->resume_req = false;
		snprintf(uri, sizeof(uri), "%s", o->resume_uri);
		ferry__mutex_unlock(&m->lock);
		mig_set_status(m, false, FERRY_MIG_POSTCOPY_RECOVER, NULL);
		mig_trace(m, "postcopy: resuming on %s", uri);
		if (!pc_reconnect(o, uri, &e2)) {
			o->recoveries++;
			ferry_error_clear(err);
			mig_set_status(m, false, FERRY_MIG_POSTCOPY_ACTIVE, NULL);
			return 0;
		}
		pc_disconnect(o);
		mig_set_status(m, false, FERRY_MIG_POSTCOPY_PAUSED, e2.msg);
	}
}

int mig_out_resume(struct ferry_mig *m, const char *uri, struct ferry_error *err)
{
	struct ferry_uri u;
	int r;

	if (!uri || strlen(uri) >= sizeof(m->out->uri))
		return ferry_error_set(err, -EINVAL, "bad URI");
	if ((r = ferry_uri_parse(uri, &u, err)))
		return r;
	if (!ferry_uri_is_socket(&u))
		return ferry_error_set(err, -EINVAL, "resume needs a socket URI");
	ferry__mutex_lock(&m->lock);
	if (!m->out || !m->out_used ||
	    m->out_info.status != FERRY_MIG_POSTCOPY_PAUSED) {
		r = ferry_error_set(err, -EINVAL, "no paused postcopy to resume "
			"(status %s)", ferry_mig_status_name(m->out_info.status));
	} else {
		snprintf(m->out->resume_uri, sizeof(m->out->resume_uri), "%s", uri);
		m->out->resume_req = true;
		pthread_cond_broadcast(&m->cond);
	}
	ferry__mutex_unlock(&m->lock);
	return r;
}

int mig_out_start_postcopy(struct ferry_mig *m, struct ferry_error *err)
{
	int r = 0;

	ferry__mutex_lock(&m->lock);
	if (!m->out || !m->out_used ||
	    (m->out_info.status != FERRY_MIG_ACTIVE &&
	     m->out_info.status != FERRY_MIG_SETUP) || m->out->pc_switched)
		r = ferry_error_set(err, -EINVAL, "no precopy to switch to "
			"postcopy (status %s)",
			ferry_mig_status_name(m->out_info.status));
	else if (!m->out->set.postcopy_ram)
		r = ferry_error_set(err, -EINVAL, "postcopy needs capability "
			"postcopy-ram, set on both sides before the migration");
	else
		m->out->pc_requested = true;
	ferry__mutex_unlock(&m->lock);
	if (!r)
		mig_trace(m, "postcopy: switch requested");
	return r;
}

/* ---- the migration thread ---------------------------------------------------------- */

static bool eof_sent(struct mig_out *o)
{
	return locked_flag(o, &o->eof_sent);
}

/* Tear down in a fixed order, put the VM where it belongs, and only then
 * publish the terminal status. */
static void finish(struct mig_out *o, int r, struct ferry_error *err)
{
	struct ferry_mig *m = o->m;
	enum ferry_mig_status st;
	char msg[FERRY_ERROR_MSG_MAX];
	bool was_cancel, by_rp;

	if (o->throttled)
		m->ops.vm_throttle(m->opaque, 0);
	if (o->completed) {
		/* As QEMU does: once completed, "mbps" is the whole
		 * migration's average, not the last (tiny) pass's rate. */
		uint64_t dt = now_ns() - o->t_start;

		o->prog.mbps = (double)(o->prog.precopy_bytes +
					o->prog.downtime_bytes) * 8 / 1e6 /
			       ((double)(dt ? dt : 1) / 1e9);
	}
	/* The last figures, while the channels (which count the RAM pages
	 * they carried) still exist. */
	publish(o);
	ferry__mutex_lock(&m->lock);
	by_rp = o->cut_by_rp;
	ferry__mutex_unlock(&m->lock);
	/* A connection error is often the echo of the destination giving up
	 * (its SHUT says why), and a failure of ours after the return path
	 * broke is its consequence: report the root cause. A failure of our
	 * own (a device, a cancel) resumes the VM at once. */
	if (r && o->rp.live && !o->committed && !cancelled(o) &&
	    (by_rp || r == -EPIPE || r == -ECONNRESET || r == -ESHUTDOWN ||
	     r == -ETIMEDOUT || r == -ECANCELED)) {
		struct ferry_error dest = { 0 };

		ferry__mutex_lock(&o->rp.lock);
		rp_wait_end_locked(&o->rp, 1000);
		if (rp_failure_locked(&o->rp, &dest) && (o->rp.shut || by_rp)) {
			ferry_error_clear(err);
			ferry_error_propagate(err, &dest);
		}
		ferry__mutex_unlock(&o->rp.lock);
	}
	/* A destination still listening after EOF learns that we keep the
	 * VM (best effort: the connection may be gone). */
	if (r && eof_sent(o) && !o->committed && !killed(o))
		ferry__save_verdict(o->s, FERRY_CMD_SWITCHOVER_ABORT, NULL);
	/* A heartbeat blocked on a peer that stopped reading returns once
	 * the connection is down. */
	if (r && o->c)
		ferry_chan_shutdown(o->c);
	hb_stop(&o->hb);
	if (o->mf) {
		if (r)
			ferry_multifd_cancel(o->mf, r, "the migration failed");
		ferry_ram_set_multifd_send(m->ram, NULL, NULL);
	}
	ferry_save_end(o->s);
	o->s = NULL;
	if (o->c)
		ferry_chan_shutdown(o->c);
	rp_stop(&o->rp);
	forget_connections(o);
	if (o->mf) {
		struct ferry_multifd *mf = o->mf;

		ferry__mutex_lock(&m->lock);
		o->mf = NULL;
		ferry__mutex_unlock(&m->lock);
		ferry_multifd_free(mf);
	}
	ferry_chan_free(o->c);
	o->c = NULL;
	ferry__tls_unref(o->tls_main);
	o->tls_main = NULL;

	/* The VM. Completed or in doubt: it stays stopped for good here. */
	if (o->completed || o->committed) {
		m->ops.vm_set_state(m->opaque, FERRY_RUN_POSTMIGRATE);
	} else if (o->stopped) {
		struct ferry_error e2 = { 0 };

		if (o->was == FERRY_RUN_RUNNING) {
			if (m->ops.vm_start(m->opaque, &e2))
				mig_trace(m, "cannot resume the VM after a failed "
					  "migration: %s", e2.msg);
		} else {
			m->ops.vm_set_state(m->opaque, o->was);
		}
	}
	if (o->stopped && m->ops.switchover_end)
		m->ops.switchover_end(m->opaque, o->completed);

	if (o->in_doubt)
		mig_set_switchover(m, false, FERRY_SWO_IN_DOUBT);
	else if (o->completed && o->use_rp)
		mig_set_switchover(m, false, FERRY_SWO_DONE);
	else if (eof_sent(o) && o->use_rp)
		mig_set_switchover(m, false, FERRY_SWO_ABORTED);

	ferry__mutex_lock(&m->lock);
	was_cancel = o->cancel && !o->killed;
	ferry__mutex_unlock(&m->lock);
	if (!r) {
		st = FERRY_MIG_COMPLETED;
	} else if (was_cancel && !o->committed) {
		/* Whatever broke on the way down was the cancel's doing. */
		snprintf(msg, sizeof(msg), "cancelled");
		st = FERRY_MIG_CANCELLED;
	} else {
		snprintf(msg, sizeof(msg), "%s", err->msg[0] ? err->msg
							     : strerror(-r));
		mig_trace(m, "migration to %s failed: %s", o->uri, msg);
		st = FERRY_MIG_FAILED;
	}
	mig_set_status(m, false, st, r ? msg : NULL);
}

static void *out_main(void *arg)
{
	struct mig_out *o = arg;
	struct ferry_error err = { 0 };
	int r;

	mig_fault_pause(o->m, false, FAULT_PAUSE_SETUP, &o->cancel);
	r = setup(o, &err);
	if (!r)
		mig_fault_pause(o->m, false, FAULT_PAUSE_CONNECTED, &o->cancel);
	if (!r && !mig_move_status(o->m, false, FERRY_MIG_SETUP, FERRY_MIG_ACTIVE))
		r = ferry_error_set(&err, -ECANCELED, "cancelled");
	if (!r)
		r = precopy(o, &err);
	if (r == 1) {
		r = postcopy(o, &err);
	} else {
		if (!r)
			drain(o);
		if (!r)
			r = switchover(o, &err);
	}
	finish(o, r, &err);
	return NULL;
}

struct start {
	struct mig_out *o;
	struct mig_out *old;            /* the previous migration, to free */
};

/* Under the engine's locks, with the move to setup that follows: nothing
 * can start in between (two starts at once: one wins, one gets -EBUSY). */
static int start_check(struct ferry_mig *m, void *arg, struct ferry_error *err)
{
	struct start *st = arg;
	struct mig_out *o = st->o;
	enum ferry_mig_status s;
	int r = mig_busy_locked(m, err);

	if (r)
		return r;
	if (m->set.auto_converge && !m->ops.vm_throttle)
		return ferry_error_set(err, -EOPNOTSUPP, "auto-converge needs "
				       "the VMM's vm_throttle hook");
	o->set = m->set;
	st->old = m->out;
	m->out = o;
	m->out_used = true;
	/* Fresh figures; the status moves on from the last one. */
	s = m->out_info.status;
	memset(&m->out_info, 0, sizeof(m->out_info));
	m->out_info.size = sizeof(m->out_info);
	m->out_info.status = s;
	m->out_t0 = o->t_start = now_ns();
	return 0;
}

int mig_out_start(struct ferry_mig *m, const char *uri, struct ferry_error *err)
{
	struct start st = { 0 };
	struct mig_out *o;
	int e;

	o = calloc(1, sizeof(*o));
	if (!o)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	if (!uri || strlen(uri) >= sizeof(o->uri)) {
		free(o);
		return ferry_error_set(err, -EINVAL, "bad URI");
	}
	if ((e = ferry_uri_parse(uri, &o->u, err))) {
		free(o);
		return e;
	}
	snprintf(o->uri, sizeof(o->uri), "%s", uri);
	o->m = m;
	o->fd = -1;
	o->rp.o = o;
	o->pre_fd = -1;
	pthread_mutex_init(&o->pre_lock, NULL);
	pthread_mutex_init(&o->rp.lock, NULL);
	mig_cond_init(&o->rp.cond);
	pthread_mutex_init(&o->hb.lock, NULL);
	mig_cond_init(&o->hb.cond);

	st.o = o;
	e = mig_transition_if(m, false, FERRY_MIG_SETUP, start_check, &st, NULL,
			      err);
	if (e) {
		mig_out_free(o);
		return e;
	}
	/* The previous migration's thread has finished (terminal status). */
	mig_out_free(st.old);
	mig_trace(m, "migration to %s", uri);
	/* Set before the thread exists: once it ends the migration (maybe
	 * at once), the next start may free this one and must join it. */
	o->thread_started = true;
	e = pthread_create(&o->thread, NULL, out_main, o);
	if (e) {
		o->thread_started = false;
		mig_set_status(m, false, FERRY_MIG_FAILED,
			       "cannot start the migration thread");
		return ferry_error_set(err, -e, "cannot start the migration "
				       "thread");
	}
	return 0;
}

void mig_out_free(struct mig_out *o)
{
	if (!o)
		return;
	if (o->thread_started)
		pthread_join(o->thread, NULL);
	pthread_mutex_destroy(&o->rp.lock);
	pthread_cond_destroy(&o->rp.cond);
	pthread_mutex_destroy(&o->hb.lock);
	pthread_cond_destroy(&o->hb.cond);
	pthread_mutex_destroy(&o->pre_lock);
	ferry__tls_unref(o->tls_main);
	ferry__tls_free(o->tls);
	free(o);
}
