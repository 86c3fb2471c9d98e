/*
 * engine-in.c - the incoming migration: the listener and the acceptor that
 * tells connections apart, the load, the return path and its heartbeats,
 * and the destination's half of the switchover handshake.
 *
 * Threads:
 *   - the incoming thread waits for the main connection, runs the load
 *     (every load hook but load_buffer), then the handshake, and calls the
 *     VMM's vm_start / vm_set_state;
 *   - the acceptor (socket URIs) polls the listener and every connection
 *     that has not yet said what it is, with a deadline each, so a client
 *     that connects and sends nothing holds up nobody; it hands the first
 *     stream connection to the incoming thread, adds multifd channels to
 *     the receiver, and turns away a second stream with a SHUT saying why;
 *   - the heartbeat sender puts a HEARTBEAT on the return path every
 *     quarter of peer-timeout, from the moment the source opens it until
 *     the handshake is over, so the source can tell a loading destination
 *     from a dead one;
 *   - the load's own helpers: multifd channel threads, device load
 *     threads, RAM pre-population.
 *
 * Connections are told apart by their first four bytes: the stream magic
 * (the main connection) or the multifd handshake magic. A postcopy preempt
 * channel or a connection after a reconnect gets its own magic and a case
 * in classify(); device state arriving on multifd channels is routed by
 * the receiver's devstate callback, which a later change connects to the
 * loader's per-device load threads.
 *
 * The switchover, destination side: after EOF it reports LOADED, then reads
 * what the source sends after EOF. GO: the VM is ours, run it (or keep it
 * paused without autostart) and ack with SHUT. ABORT: the source kept the
 * VM, fail. Anything else - silence for peer-timeout, a reset, the source
 * going away without a verdict - leaves us unable to know whether GO was
 * sent: the switchover is in doubt, the VM stays here, stopped, whole.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "engine-internal.h"
#include "tls.h"
#include "postcopy.h"

/* Connections the acceptor holds while they have not said what they are. */
#define ACC_MAX_PENDING 16
/* Multifd channels held until the main stream names its session. */
#define ACC_MAX_PARKED (2 * FERRY_MULTIFD_MAX_CHANNELS)

/* A multifd channel whose handshake was read (peeked) whole and is
 * well-formed, waiting for the session of the migration to be known. */
struct parked {
	int fd;
	struct ferry_tls_conn *tls;
	uint8_t session[16];
};

/* Refusals noted under acc_lock and reported after it (mig_refused takes
 * the engine lock, which is taken before acc_lock). */
struct refusals {
	unsigned n;
	char why[ACC_MAX_PARKED + 1][FERRY_ERROR_MSG_MAX];
};

struct mig_in {
	struct ferry_mig *m;
	char uri[4096];                 /* immutable */
	struct ferry_uri u;             /* immutable */
	char listen_uri[4096];          /* immutable once bound */
	struct ferry_listener *l;       /* bound at start; closed at the end */
	struct mig_settings set;        /* immutable: copied at start */
	pthread_t thread;
	bool thread_started;

	/* The acceptor. */
	/* The acceptor's life (acc_life): started by mig_in_start, stopped by
	 * the load thread at the end of the load - or first, when the link
	 * breaks in postcopy before that, by the listen thread, which then
	 * runs one for the recovery port. One runs at a time. The acceptor
	 * reads acc_l, acc_recovery and wake[0], set before it starts. */
	pthread_mutex_t acc_life;
	pthread_t acc_thread;
	bool acc_live;
	struct ferry_listener *acc_l;   /* l, or a postcopy recovery's */
	bool acc_recovery;              /* a stream resumes, a preempt
					   channel restarts, no multifd */
	int wake[2];                    /* pipe: stop the acceptor */
	pthread_mutex_t acc_lock;
	pthread_cond_t acc_cond;        /* monotonic: main_fd arrived, or stop */
	int main_fd;                    /* acc_lock: -1 until it comes */
	struct ferry_tls_conn *main_tls; /* acc_lock: its TLS session */
	bool main_taken;                /* acc_lock: the load has it */
	struct ferry_tls *tls;          /* tls-creds: immutable once started */
	struct ferry_multifd *mf;       /* acc_lock: made when the main
					   stream's RAM START names the session */
	bool session_known;             /* acc_lock: mf exists, for session */
	uint8_t session[16];            /* acc_lock */
	struct parked parked[ACC_MAX_PARKED]; /* acc_lock: oldest first */
	unsigned nparked;               /* acc_lock */
	struct refusals acc_rf;         /* acceptor thread only: scratch */
	struct refusals load_rf;        /* load thread only: scratch */

	/* m->lock */
	bool cancel;
	int fd;                         /* main connection, for cancel */
	struct ferry_tls_conn *fd_tls;  /* its TLS session (the load and the
					   return path share it); freed with
					   this struct */
	bool loaded_sent;               /* LOADED went out: no more cancel */

	/* The return path writer and its heartbeat (rp_lock). */
	pthread_mutex_t rp_lock;
	pthread_cond_t hb_cond;         /* monotonic */
	struct ferry_chan *rp_chan;
	struct ferry_record_io rp_io;
	bool rp_silent;                 /* a fault: say nothing more */
	bool hb_stop;
	uint32_t src_ms;                /* the source's peer-timeout, from
					   OPEN_RETURN_PATH (0 = not said) */
	pthread_t hb_thread;
	bool hb_live;                   /* incoming thread */

	/* Postcopy. The state lives in the pcd (postcopy.h); the pointer is
	 * set by the load thread at ADVISE under m->lock (query reads it
	 * there) and freed with this struct - never while a page may be
	 * missing. */
	struct ferry_pcd *pcd;
	bool pc_ran;                    /* m->lock: RUN took the VM */
	/* Load thread: how it was scheduled before the switch raised it
	 * (pc_switch_urgent); whether a DISCARD came (the drain's PING that
	 * follows opens the window). */
	struct ferry__pc_sched pc_sched;
	bool pc_discarded;
	struct ferry_listener *rec_l;   /* m->lock: migrate-recover's */
	char rec_uri[4096];             /* m->lock */
	struct ferry_chan *rec_chan;    /* listen thread: the stream after a
					   recovery (owns its fd) */
	uint64_t t_pc_run;              /* load thread: when */
	/* The preempt channel's reader (acceptor starts it, in_main joins). */
	pthread_t pre_thread;
	bool pre_live;                  /* acc_lock */
	int pre_fd;                     /* acc_lock: -1 until it comes */
	struct ferry_tls_conn *pre_tls; /* acc_lock: its TLS session */
	pthread_mutex_t pre_lock;
	pthread_cond_t pre_cond;        /* monotonic: pre_done changed */
	bool pre_done;                  /* pre_lock: EOF read, or it failed */

	/* Load thread only. */
	struct ferry_chan *main_chan;   /* the stream, while it is read */
	struct ferry_load_stats stats;
	uint32_t version;
	/* A lose-* fault: act as if the network between us failed - say
	 * nothing more, and keep the connection (held_fd) until freed, so
	 * the peer sees silence, not a close. */
	bool partitioned;
	int held_fd;
};

static uint64_t now_ns(void)
{
	return ferry__mono_ns();
}

/* A channel on an accepted connection, through its TLS session if it has
 * one; @own_fd: the channel closes @fd when freed. */
static struct ferry_chan *in_chan(int fd, struct ferry_tls_conn *tc,
				  enum ferry_chan_dir dir, bool own_fd)
{
	return tc ? ferry__tls_chan_new(tc, dir, own_fd ? fd : -1)
		  : ferry_chan_new_fd(fd, dir, own_fd);
}

/* ---- the return path ------------------------------------------------------- */

static int rp_send(struct mig_in *in, const struct ferry_rp_msg *msg,
		   struct ferry_error *err)
{
	int r = 0;

	ferry__mutex_lock(&in->rp_lock);
	if (in->rp_chan && !in->rp_silent)
		r = ferry_rp_send(&in->rp_io, msg, err);
	ferry__mutex_unlock(&in->rp_lock);
	return r;
}

static void rp_silence(struct mig_in *in)
{
	ferry__mutex_lock(&in->rp_lock);
	in->rp_silent = true;
	ferry__mutex_unlock(&in->rp_lock);
}

/* The stall-postcopy fault point, from the heartbeat (rp_lock held): as if
 * this process stopped while postcopy runs - nothing more on this return
 * path, until the source gives up on it and a recovery opens a new one. */
static bool stall_postcopy(struct mig_in *in)
{
	struct ferry_pcd *pcd;
	bool hit = false;

	ferry__mutex_unlock(&in->rp_lock);
	ferry__mutex_lock(&in->m->lock);
	pcd = in->pcd;
	ferry__mutex_unlock(&in->m->lock);
	if (ferry__pcd_state(pcd) == FERRY_PC_RUNNING)
		hit = mig_fault_take(in->m, FAULT_STALL_POSTCOPY);
	ferry__mutex_lock(&in->rp_lock);
	return hit;
}

/*
 * Beat at a quarter of the shorter of the two peer-timeouts: the source's
 * (it told us when it opened the return path) and ours (each beat tells
 * it, so it beats fast enough for us too). The first beat goes at once.
 */
static void *hb_main(void *arg)
{
	struct mig_in *in = arg;
	uint64_t ms = in->set.peer_timeout_ms;
	struct ferry_rp_msg beat = { .type = FERRY_RP_HEARTBEAT,
				     .peer_timeout_ms = (uint32_t)ms };
	uint64_t interval;

	if (in->src_ms && in->src_ms < ms)
		ms = in->src_ms;
	interval = ms * 1000000ull / 4;
	ferry__mutex_lock(&in->rp_lock);
	while (!in->hb_stop) {
		uint64_t deadline = now_ns() + interval;

		if (stall_postcopy(in))
			in->rp_silent = true;
		/* Written under rp_lock: if the source stopped reading, the
		 * write times out (peer-timeout) rather than hang. */
		if (!in->rp_silent && in->rp_chan)
			ferry_rp_send(&in->rp_io, &beat, NULL);
		while (!in->hb_stop && mig_cond_wait_until(&in->hb_cond,
							   &in->rp_lock, deadline))
			;
	}
	ferry__mutex_unlock(&in->rp_lock);
	return NULL;
}

static int rp_open(struct mig_in *in, uint32_t src_ms,
		   struct ferry_error *err)
{
	struct ferry_tls_conn *tc;
	int dfd, e;

	if (in->rp_chan)
		return ferry_error_set(err, -EBADMSG, "return path opened twice");
	/* After a postcopy recovery: a new return path, beating again. */
	in->hb_stop = false;
	in->rp_silent = false;
	if (!ferry_uri_is_socket(&in->u))
		return ferry_error_set(err, -EINVAL, "a return path needs a "
				       "socket (this stream comes from %s)",
				       in->uri);
	ferry__mutex_lock(&in->m->lock);
	tc = in->fd_tls;
	dfd = tc ? -1 : dup(in->fd);
	ferry__mutex_unlock(&in->m->lock);
	if (!tc && dfd < 0)
		return ferry_error_set(err, -errno, "dup: %s", strerror(errno));
	ferry__mutex_lock(&in->rp_lock);
	/* Over TLS the writer shares the stream's session. */
	in->rp_chan = tc ? ferry__tls_chan_new(tc, FERRY_CHAN_WRITE, -1)
			 : ferry_chan_new_fd(dfd, FERRY_CHAN_WRITE, true);
	if (in->rp_chan) {
		ferry_chan_set_timeout(in->rp_chan, (int)in->set.peer_timeout_ms);
		in->rp_io = (struct ferry_record_io){ .chan = in->rp_chan };
	}
	ferry__mutex_unlock(&in->rp_lock);
	if (!in->rp_chan) {
		if (dfd >= 0)
			close(dfd);
		return ferry_error_set(err, -ENOMEM, "out of memory");
	}
	in->src_ms = src_ms;
	/* The source now sends a heartbeat whenever its stream is idle:
	 * silence this long means it is gone or stalled. (A version-1 source
	 * says nothing of heartbeats: then there is no read timeout.) */
	if (src_ms)
		ferry_chan_set_timeout(in->main_chan,
				       (int)in->set.peer_timeout_ms);
	in->hb_live = true;  /* before the thread reads its neighbours */
	e = pthread_create(&in->hb_thread, NULL, hb_main, in);
	if (e) {
		in->hb_live = false;
		return ferry_error_set(err, -e, "cannot start the heartbeat");
	}
	return 0;
}

static void rp_close(struct mig_in *in)
{
	if (in->hb_live) {
		ferry__mutex_lock(&in->rp_lock);
		in->hb_stop = true;
		pthread_cond_broadcast(&in->hb_cond);
		ferry__mutex_unlock(&in->rp_lock);
		pthread_join(in->hb_thread, NULL);
		in->hb_live = false;
	}
	ferry__mutex_lock(&in->rp_lock);
	ferry_chan_free(in->rp_chan);
	in->rp_chan = NULL;
	ferry_record_io_release(&in->rp_io);
	ferry__mutex_unlock(&in->rp_lock);
}

/* ---- the acceptor ------------------------------------------------------------- */

/* Another source while one is loading: tell it why, and hang up. */
static void refuse_stream(struct mig_in *in, int fd, struct ferry_tls_conn *tc)
{
	struct ferry_chan *c = in_chan(fd, tc, FERRY_CHAN_WRITE, false);
	struct ferry_record_io io = { .chan = c };
	struct ferry_rp_msg shut = { .type = FERRY_RP_SHUT, .status = EBUSY };

	snprintf(shut.reason, sizeof(shut.reason),
		 "this destination is already receiving a migration");
	if (c) {
		/* A fresh socket has room for one small record; never wait. */
		ferry_chan_set_timeout(c, 100);
		ferry_rp_send(&io, &shut, NULL);
		ferry_chan_free(c);
	}
	mig_refused(in->m, "a second migration stream while one is loading");
	ferry__tls_unref(tc);
	close(fd);
}

/*
 * Multifd channels of a source may come before its main stream, and
 * anyone can open a connection and send a well-formed handshake: if the
 * first channel to arrive fixed the session, a stranger's channel could
 * claim it (and a slot) and the real source's migration would fail. So
 * channels wait here until the main stream - the one connection that is
 * the migration - names its session in RAM's START; then those of that
 * session join the receiver and the others are turned away.
 */
static void refuse_conn(struct refusals *rf, int fd, struct ferry_tls_conn *tc,
			const char *why)
{
	if (rf->n < ACC_MAX_PARKED + 1)
		snprintf(rf->why[rf->n++], sizeof(rf->why[0]), "%s", why);
	ferry__tls_unref(tc);
	if (fd >= 0)
		close(fd);
}

static void report_refusals(struct mig_in *in, const struct refusals *rf)
{
	for (unsigned i = 0; i < rf->n; i++)
		mig_refused(in->m, "multifd channel: %s", rf->why[i]);
}

/* acc_lock held, session known. Consumes @fd and @tc. */
static void join_receiver_locked(struct mig_in *in, int fd,
				 struct ferry_tls_conn *tc,
				 const uint8_t session[16], struct refusals *rf)
{
	struct ferry_error err = { 0 };

	if (memcmp(session, in->session, 16)) {
		refuse_conn(rf, fd, tc, "a channel of another migration "
			    "(session id mismatch)");
		return;
	}
	if (!in->mf) {
		refuse_conn(rf, fd, tc, "the migration's channels are closed");
		return;
	}
	/* On failure the receiver closed it (and took the session). */
	if (ferry__multifd_recv_add_channel_tls(in->mf, fd, tc, &err)) {
		refuse_conn(rf, -1, NULL, err.msg);
		ferry_error_clear(&err);
	}
}

/* acc_lock held, session not known yet. Consumes @fd and @tc. */
static void park_locked(struct mig_in *in, int fd, struct ferry_tls_conn *tc,
			const uint8_t session[16], struct refusals *rf)
{
	if (in->nparked == ACC_MAX_PARKED) {
		refuse_conn(rf, in->parked[0].fd, in->parked[0].tls,
			    "too many channels waiting for the main stream: "
			    "the oldest was dropped");
		memmove(in->parked, in->parked + 1,
			--in->nparked * sizeof(in->parked[0]));
	}
	in->parked[in->nparked] = (struct parked){ fd, tc, { 0 } };
	memcpy(in->parked[in->nparked++].session, session, 16);
}

/* acc_lock held: the acceptor is done. */
static void drop_parked_locked(struct mig_in *in, struct refusals *rf)
{
	for (unsigned i = 0; i < in->nparked; i++)
		refuse_conn(rf, in->parked[i].fd, in->parked[i].tls,
			    "the main stream never named its session");
	in->nparked = 0;
}

/* Device-state packets go to the load's per-device queues. */
static int mf_devstate(void *opaque, const char *idstr, uint32_t instance,
		       uint32_t seq, uint32_t flags, const void *buf, size_t len,
		       struct ferry_error *err)
{
	struct mig_in *in = opaque;

	return ferry_load_devstate(in->m->ctx, idstr, instance, seq,
				   flags & FERRY_MULTIFD_FLAG_DEVICE_CONFIG,
				   buf, len, err);
}

/* Load thread, at RAM's START: the receiver for @session, and the
 * channels that waited for it. */
static struct ferry_multifd *provide_receiver(void *opaque,
					      const uint8_t session[16],
					      unsigned channels,
					      struct ferry_error *err)
{
	struct mig_in *in = opaque;
	struct ferry_multifd_params mp = { .size = sizeof(mp),
					   .channels = channels,
					   .devstate_seq = mf_devstate,
					   .opaque = in };
	struct ferry_multifd *mf;
	struct refusals *rf = &in->load_rf;

	if (!in->m->ram) {
		ferry_error_set(err, -EOPNOTSUPP, "multifd: this destination "
				"has no RAM to receive into");
		return NULL;
	}
	memcpy(mp.session, session, 16);
	mf = ferry_multifd_recv_new(&mp, err);
	if (mf && ferry__ram_give_blocks(in->m->ram, mf, err)) {
		ferry_multifd_free(mf);
		mf = NULL;
	}
	if (!mf)
		return NULL;
	rf->n = 0;
	ferry__mutex_lock(&in->acc_lock);
	/* ram.c asks once per load; a second would be a broken invariant. */
	assert(!in->mf && !in->session_known);
	in->mf = mf;
	memcpy(in->session, session, 16);
	in->session_known = true;
	for (unsigned i = 0; i < in->nparked; i++)
		join_receiver_locked(in, in->parked[i].fd, in->parked[i].tls,
				     in->parked[i].session, rf);
	in->nparked = 0;
	ferry__mutex_unlock(&in->acc_lock);
	report_refusals(in, rf);
	return mf;
}

/* ---- postcopy --------------------------------------------------------------------- */

/*
 * The preempt channel: requested pages, each a PAGE record, placed the
 * moment they arrive; the listen thread places the main stream's. The
 * source's last record here is an EOF, sent before its END, so END can
 * wait for it and no requested page arrives after RAM is unregistered.
 */
static void *pre_main(void *arg)
{
	struct mig_in *in = arg;
	struct ferry_chan *c;
	struct ferry_record_io io;
	struct ferry_error err = { 0 };
	uint8_t session[16];
	/* The main connection this channel serves (not one after a
	 * recovery), known by the time its first page comes. */
	int r, main_fd = -1;

	ferry__mutex_lock(&in->acc_lock);
	c = in_chan(in->pre_fd, in->pre_tls, FERRY_CHAN_READ, false);
	ferry__mutex_unlock(&in->acc_lock);
	io = (struct ferry_record_io){ .chan = c };
	r = c ? 0 : -ENOMEM;
	ferry__pc_sched_raise(NULL, false);
	if (!r) {
		ferry_get_be32(c);  /* the magic, seen by classify() */
		ferry_get_buf(c, session, sizeof(session));
		r = ferry_chan_error(c, &err);
	}
	while (!r) {
		struct ferry_record rec;
		struct ferry_pcd *pcd;

		if ((r = ferry_record_read(&io, &rec, &err)))
			break;
		if (rec.type == FERRY_REC_EOF)
			break;
		if (rec.type != FERRY_REC_PAGE) {
			r = ferry_error_set(&err, -EBADMSG, "%s record on the "
				"preempt channel", ferry_record_type_name(rec.type));
			break;
		}
		ferry__mutex_lock(&in->m->lock);
		pcd = in->pcd;
		if (main_fd < 0)
			main_fd = in->fd;
		ferry__mutex_unlock(&in->m->lock);
		r = pcd ? ferry__pcd_page_record(pcd, rec.body, rec.len, &err)
			: ferry_error_set(&err, -EPROTO, "a page before "
					  "POSTCOPY_ADVISE");
	}
	if (r) {
		struct ferry_pcd *pcd;

		mig_trace(in->m, "postcopy preempt channel: %s", err.msg);
		/* Requested pages would be lost with it while postcopy runs:
		 * treat it as a broken link, so both sides pause and recover
		 * (on the main stream). */
		ferry__mutex_lock(&in->m->lock);
		pcd = in->pcd;
		if (ferry__pcd_state(pcd) == FERRY_PC_RUNNING && in->fd >= 0 &&
		    in->fd == main_fd)
			shutdown(in->fd, SHUT_RDWR);
		ferry__mutex_unlock(&in->m->lock);
	}
	ferry__mutex_lock(&in->pre_lock);
	in->pre_done = true;
	pthread_cond_broadcast(&in->pre_cond);
	ferry__mutex_unlock(&in->pre_lock);
	ferry_record_io_release(&io);
	ferry_chan_free(c);
	return NULL;
}

static void pre_stop(struct mig_in *in)
{
	bool live;

	ferry__mutex_lock(&in->acc_lock);
	live = in->pre_live;
	if (live)
		shutdown(in->pre_fd, SHUT_RDWR);  /* its session too */
	ferry__mutex_unlock(&in->acc_lock);
	if (live)
		pthread_join(in->pre_thread, NULL);
	ferry__mutex_lock(&in->acc_lock);
	in->pre_live = false;
	if (in->pre_fd >= 0)
		close(in->pre_fd);
	in->pre_fd = -1;
	ferry__tls_unref(in->pre_tls);
	in->pre_tls = NULL;
	ferry__mutex_unlock(&in->acc_lock);
}

static void pcd_trace(void *opaque, const char *line)
{
	mig_trace(((struct mig_in *)opaque)->m, "%s", line);
}

static void rp_close(struct mig_in *in);
static bool cancelled(struct mig_in *in);

/* The fault thread's requests (any thread but the heartbeat's). */
static int request_pages(void *opaque, const char *block, uint64_t start,
			 uint32_t len)
{
	struct mig_in *in = opaque;

	struct ferry_rp_msg msg = { .type = FERRY_RP_REQ_PAGES, .start = start,
				    .len = len };

	snprintf(msg.block, sizeof(msg.block), "%s", block);
	return rp_send(in, &msg, NULL);
}

/* The package failed while the listen thread reads: end its read. The
 * return path (the same socket) stays up for the SHUT that tells the
 * source the VM never ran here. */
static void stop_listen(void *opaque)
{
	struct mig_in *in = opaque;

	ferry__mutex_lock(&in->m->lock);
	if (in->fd >= 0)
		shutdown(in->fd, SHUT_RD);
	ferry__mutex_unlock(&in->m->lock);
}

static void shut_values(struct mig_in *in, struct ferry_rp_msg *msg);
static int take_vm(struct mig_in *in, struct ferry_error *err);

/* When the VM started running here, on both clocks (SHUT, RUNNING). */
static void stamp_resumed(struct ferry_rp_msg *msg)
{
	struct timespec rt;

	msg->values[FERRY_SHUT_T_RESUMED] = now_ns();
	clock_gettime(CLOCK_REALTIME, &rt);
	msg->values[FERRY_SHUT_T_RESUMED_REAL] =
		(uint64_t)rt.tv_sec * 1000000000ull + (uint64_t)rt.tv_nsec;
}

/*
 * From the source's stop to RUN the guest runs nowhere, and this thread
 * does everything that stands between it and running here. On a busy host
 * it lost the CPU for 2-4 ms at a time to the threads the switch itself
 * wakes (the listen thread's pool job, the vCPUs and the VMM's event
 * writer at RUN, the source's background stream arriving), most of the
 * downtime. Real-time priority for the window (ferry__pc_sched_raise), put
 * back once the VM runs. The window opens at the PONG that answers the
 * source's drain (after the discards made while its VM still ran, which
 * may be long - they are not downtime), or at LISTEN for a source that
 * sends none.
 */
static void pc_switch_urgent(struct mig_in *in, bool on)
{
	if (on)
		ferry__pc_sched_raise(&in->pc_sched, true);
	else
		ferry__pc_sched_restore(&in->pc_sched);
}

static int pc_command(struct mig_in *in, const struct ferry_cmd_msg *msg,
		      struct ferry_error *err)
{
	struct ferry_mig *m = in->m;
	struct ferry_pcd *pcd = in->pcd;
	int r;

	switch (msg->cmd) {
	case FERRY_CMD_POSTCOPY_ADVISE:
		if (!in->set.postcopy_ram)
			return ferry_error_set(err, -EOPNOTSUPP, "the source "
				"migrates with postcopy: set capability "
				"postcopy-ram on this side too");
		if (!m->ram)
			return ferry_error_set(err, -EOPNOTSUPP, "postcopy: this "
					       "destination has no RAM");
		if (pcd)
			return ferry_error_set(err, -EPROTO, "POSTCOPY_ADVISE in "
				"postcopy state %s (it belongs in state none)",
				ferry_pc_state_name(ferry__pcd_state(pcd)));
		/* The threads the switch will need, now, while the guest
		 * still runs on the source: the fault thread starts on one
		 * at once (ferry__pcd_prepare), the listen thread on the
		 * other at PACKAGED. */
		if ((r = ferry__pool_reserve_idle(m->ctx, 2, err)))
			return ferry_error_prefix(err, "postcopy: ");
		pcd = ferry__pcd_new(m->ram, msg->u.advise.host_page_size,
				     msg->u.advise.target_page_size, pcd_trace,
				     in, err);
		if (!pcd)
			return err && err->code ? err->code : -ENOMEM;
		ferry__mutex_lock(&m->lock);
		in->pcd = pcd;
		ferry__mutex_unlock(&m->lock);
		return ferry__pcd_prepare(pcd, m->ctx, request_pages, in, err);
	case FERRY_CMD_POSTCOPY_DISCARD:
		if (!pcd)
			break;
		in->pc_discarded = true;
		return ferry__pcd_discard(pcd, msg->u.discard.block,
					  msg->u.discard.n, msg->u.discard.ranges,
					  err);
	case FERRY_CMD_POSTCOPY_LISTEN:
		if (!pcd)
			break;
		pc_switch_urgent(in, true);
		return ferry__pcd_listen(pcd, m->ctx, request_pages, in, err);
	case FERRY_CMD_POSTCOPY_RUN: {
		struct ferry_rp_msg run = { .type = FERRY_RP_RUNNING };

		if (!pcd)
			break;
		if (mig_fault_take(m, FAULT_FAIL_PACKAGE))
			return ferry_error_set(err, -EIO, "fault point "
					       "fail-package");
		run.values[FERRY_SHUT_T_GO] = now_ns();
		if ((r = ferry__pcd_move(pcd, FERRY_PC_LISTENING,
					 FERRY_PC_RUNNING, "POSTCOPY_RUN", err)))
			return r;
		/* The VM is ours from here, whatever its pages' whereabouts:
		 * the source never resumes once it sent RUN. */
		ferry__mutex_lock(&m->lock);
		in->pc_ran = true;
		ferry__mutex_unlock(&m->lock);
		r = take_vm(in, err);
		/* Running (the events below are not downtime). */
		stamp_resumed(&run);
		in->t_pc_run = run.values[FERRY_SHUT_T_RESUMED];
		mig_set_switchover(m, true, FERRY_SWO_DONE);
		mig_move_status(m, true, FERRY_MIG_ACTIVE,
				FERRY_MIG_POSTCOPY_ACTIVE);
		shut_values(in, &run);
		rp_send(in, &run, NULL);
		pc_switch_urgent(in, false);
		/* The VM runs: now free what the discards moved away. */
		ferry__pcd_release_dropped(pcd);
		return r;
	}
	case FERRY_CMD_POSTCOPY_END: {
		uint64_t deadline = now_ns() + in->set.peer_timeout_ms * 1000000ull;

		if (msg->u.status)
			return ferry_error_set(err, -EPROTO, "the source ended "
					       "postcopy with status %u",
					       msg->u.status);
		if (ferry__pcd_state(pcd) != FERRY_PC_RUNNING)
			return ferry_error_set(err, -EPROTO, "POSTCOPY_END in "
				"postcopy state %s (it belongs in state running)",
				ferry_pc_state_name(ferry__pcd_state(pcd)));
		/* Requested pages on the preempt channel land first. */
		ferry__mutex_lock(&in->pre_lock);
		while (in->pre_live && !in->pre_done &&
		       mig_cond_wait_until(&in->pre_cond, &in->pre_lock, deadline))
			;
		ferry__mutex_unlock(&in->pre_lock);
		ferry__pcd_finish(pcd);
		return ferry__pcd_move(pcd, FERRY_PC_RUNNING, FERRY_PC_END,
				       "POSTCOPY_END", err);
	}
	default:
		break;
	}
	return ferry_error_set(err, -EPROTO, "%s in postcopy state none",
			       ferry_cmd_name(msg->cmd));
}

/* ---- postcopy recovery ------------------------------------------------------- */

/* A recovery's preempt channel: the old reader has ended with its
 * connection (or ends now); a new one reads this one. Listen thread. */
static void pre_restart(struct mig_in *in, int fd, struct ferry_tls_conn *tc)
{
	pre_stop(in);
	ferry__mutex_lock(&in->pre_lock);
	in->pre_done = false;
	ferry__mutex_unlock(&in->pre_lock);
	ferry__mutex_lock(&in->acc_lock);
	in->pre_fd = fd;
	in->pre_tls = tc;
	in->pre_live = !pthread_create(&in->pre_thread, NULL, pre_main, in);
	if (!in->pre_live) {
		in->pre_fd = -1;
		in->pre_tls = NULL;
		ferry__tls_unref(tc);
		close(fd);
	}
	ferry__mutex_unlock(&in->acc_lock);
	mig_trace(in->m, "postcopy recovery: preempt channel %s",
		  in->pre_live ? "reconnected" : "refused (no thread)");
}

static int acc_start_locked(struct mig_in *in, struct ferry_error *err);
static void acc_stop_locked(struct mig_in *in);
static int take_main(struct mig_in *in, struct ferry_tls_conn **tc,
		     struct ferry_error *err);

/*
 * The next connection on @l that is a ferry stream (its TLS session in
 * *tc); -ECANCELED. The same acceptor as the first connection's, so a
 * silent or half-finished stranger on the recovery port waits beside the
 * real source instead of in front of it; a preempt channel that comes
 * first is restarted at once.
 */
static int accept_stream(struct mig_in *in, struct ferry_listener *l,
			 struct ferry_tls_conn **tc, struct ferry_error *err)
{
	int fd, r;

	ferry__mutex_lock(&in->acc_lock);
	in->main_fd = -1;
	in->main_taken = false;
	ferry__mutex_unlock(&in->acc_lock);
	/* The first port's acceptor may still run (the link broke before
	 * the load ended): everything of this migration connected long ago,
	 * so it goes, and the recovery port gets one of its own. */
	ferry__mutex_lock(&in->acc_life);
	acc_stop_locked(in);
	in->acc_l = l;
	in->acc_recovery = true;
	r = acc_start_locked(in, err);
	ferry__mutex_unlock(&in->acc_life);
	if (r)
		return r;
	fd = take_main(in, tc, err);
	ferry__mutex_lock(&in->acc_life);
	acc_stop_locked(in);
	ferry__mutex_unlock(&in->acc_life);
	if (fd < 0)
		return ferry_error_set(err, -ECANCELED, "cancelled while postcopy "
				       "was paused");
	return fd;
}

/* One resume on @fd: the source's header, OPEN_RETURN_PATH and
 * POSTCOPY_RESUME; our received bitmaps and RESUME_ACK; the requests of
 * waiting threads again. @io reads on from there. */
static int resume_on(struct mig_in *in, struct ferry_record_io *io, int fd,
		     struct ferry_tls_conn *tc, struct ferry_error *err)
{
	struct ferry_chan *c = in_chan(fd, tc, FERRY_CHAN_READ, true);
	struct ferry_tls_conn *old;
	struct ferry_rp_msg ack = { .type = FERRY_RP_RESUME_ACK };
	struct ferry_record rec;
	uint32_t version;
	int r;

	if (!c) {
		ferry__tls_unref(tc);
		close(fd);
		return ferry_error_set(err, -ENOMEM, "out of memory");
	}
	mig_socket_keepalive(fd, in->set.peer_timeout_ms);
	ferry_chan_set_timeout(c, (int)in->set.peer_timeout_ms);
	/* The new session is the return path's from now on; the old
	 * connection's channel holds its own reference to the old one. */
	ferry__mutex_lock(&in->m->lock);
	in->fd = fd;
	old = in->fd_tls;
	in->fd_tls = tc;
	ferry__mutex_unlock(&in->m->lock);
	ferry__tls_unref(old);
	ferry_chan_free(in->rec_chan);
	in->rec_chan = c;
	in->main_chan = c;
	io->chan = c;
	io->seq = 0;
	if ((r = ferry__stream_read_header(c, &version, err)))
		return r;
	if ((r = ferry_record_read(io, &rec, err)))
		return r;
	if (rec.type != FERRY_REC_COMMAND || rec.len != 6 ||
	    ferry__get_be16(rec.body) != FERRY_CMD_OPEN_RETURN_PATH)
		return ferry_error_set(err, -EBADMSG, "resume: the stream does "
				       "not open with OPEN_RETURN_PATH");
	if ((r = rp_open(in, ferry__get_be32(rec.body + 2), err)))
		return r;
	if ((r = ferry_record_read(io, &rec, err)))
		return r;
	if (rec.type != FERRY_REC_COMMAND || rec.len != 2 ||
	    ferry__get_be16(rec.body) != FERRY_CMD_POSTCOPY_RESUME)
		return ferry_error_set(err, -EBADMSG, "resume: POSTCOPY_RESUME "
				       "expected");
	for (unsigned bi = 0; ; bi++) {
		struct ferry_rp_msg bm = { .type = FERRY_RP_RECV_BITMAP };
		uint8_t *bits;

		if (ferry__pcd_block_name(in->pcd, bi, bm.block, sizeof(bm.block)))
			break;
		if ((r = ferry__pcd_received(in->pcd, bi, &bits, &bm.start, err)))
			return r;
		ferry__mutex_lock(&in->rp_lock);
		r = in->rp_chan && !in->rp_silent ?
		    ferry__rp_send(&in->rp_io, &bm, bits, err) :
		    ferry_error_set(err, -EPIPE, "no return path");
		ferry__mutex_unlock(&in->rp_lock);
		free(bits);
		if (r)
			return r;
	}
	if ((r = rp_send(in, &ack, err)))
		return r;
	ferry__pcd_rerequest(in->pcd);
	return 0;
}

/*
 * The load's reconnect hook (the listen thread): a broken stream after RUN
 * pauses - the VM runs, and threads touching missing pages wait - until
 * ferry_mig_recover gives a listener and the source connects to it.
 */
static int reconnect(void *opaque, struct ferry_record_io *io, int why,
		     struct ferry_error *err)
{
	struct mig_in *in = opaque;
	struct ferry_mig *m = in->m;
	enum ferry_pc_state st = ferry__pcd_state(in->pcd);
	char reason[FERRY_ERROR_MSG_MAX];

	if (st == FERRY_PC_END)
		return 1;
	if (st != FERRY_PC_RUNNING)
		return why;
	snprintf(reason, sizeof(reason), "%s", err->msg[0] ? err->msg
							   : strerror(-why));
	ferry_error_clear(err);
	rp_close(in);
	mig_trace(m, "postcopy paused: %s", reason);
	mig_set_status(m, true, FERRY_MIG_POSTCOPY_PAUSED, reason);
	for (;;) {
		struct ferry_error e2 = { 0 };
		struct ferry_listener *l;
		struct ferry_tls_conn *tc;
		int fd;

		ferry__mutex_lock(&m->lock);
		while (!in->rec_l && !in->cancel)
			pthread_cond_wait(&m->cond, &m->lock);
		l = in->rec_l;
		ferry__mutex_unlock(&m->lock);
		if (!l)
			return ferry_error_set(err, -ECANCELED, "postcopy paused "
					       "when the engine was freed");
		mig_set_status(m, true, FERRY_MIG_POSTCOPY_RECOVER, NULL);
		fd = accept_stream(in, l, &tc, err);
		if (fd < 0)
			return fd;
		if (!resume_on(in, io, fd, tc, &e2)) {
			ferry__mutex_lock(&m->lock);
			in->rec_l = NULL;
			ferry__mutex_unlock(&m->lock);
			ferry_listener_close(l);
			mig_trace(m, "postcopy resumed");
			mig_set_status(m, true, FERRY_MIG_POSTCOPY_ACTIVE, NULL);
			return 0;
		}
		rp_close(in);
		mig_trace(m, "postcopy recovery failed: %s", e2.msg);
		mig_set_status(m, true, FERRY_MIG_POSTCOPY_PAUSED, e2.msg);
	}
}

int mig_in_recover(struct ferry_mig *m, const char *uri, struct ferry_error *err)
{
	struct ferry_listener *l = ferry_transport_listen(uri, err);
	int r = 0;

	if (!l)
		return err && err->code ? err->code : -EIO;
	ferry__mutex_lock(&m->lock);
	if (!m->in || m->out_used ||
	    m->in_info.status != FERRY_MIG_POSTCOPY_PAUSED || m->in->rec_l) {
		r = ferry_error_set(err, -EINVAL, "no paused postcopy to recover "
			"here (status %s%s)", ferry_mig_status_name(m->in_info.status),
			m->in && m->in->rec_l ? ", already listening" : "");
	} else {
		m->in->rec_l = l;
		snprintf(m->in->rec_uri, sizeof(m->in->rec_uri), "%s",
			 ferry_listener_uri(l));
		pthread_cond_broadcast(&m->cond);
		l = NULL;
	}
	ferry__mutex_unlock(&m->lock);
	ferry_listener_close(l);
	if (!r)
		mig_trace(m, "postcopy: waiting for the source on %s", uri);
	return r;
}

const char *ferry_mig_recover_uri(struct ferry_mig *m, char *buf, size_t len)
{
	const char *r = NULL;

	ferry__mutex_lock(&m->lock);
	if (m->in && m->in->rec_uri[0] && len) {
		snprintf(buf, len, "%s", m->in->rec_uri);
		r = buf;
	}
	ferry__mutex_unlock(&m->lock);
	return r;
}

void mig_in_postcopy_info(struct mig_in *in, struct ferry_mig_info *i)
{
	struct ferry_pcd_stats st;

	if (!in->pcd)
		return;
	ferry__pcd_get_stats(in->pcd, &st);
	i->postcopy = st.state >= FERRY_PC_RUNNING;
	i->postcopy_requests = st.requests;
	i->postcopy_faults = st.faults;
	i->postcopy_lat_p50_us = st.lat_p50_ns / 1000;
	i->postcopy_lat_p99_us = st.lat_p99_ns / 1000;
	i->postcopy_lat_max_us = st.lat_max_ns / 1000;
	i->postcopy_blocktime_ms = st.blocktime_ns / 1000000;
}

/* DONE: @fd is dealt with. WAIT: nothing yet. PARTIAL: some of its first
 * bytes came, not all (it stays readable: poll cannot wait on it). */
enum verdict { DONE, WAIT, PARTIAL };

/* The first @len bytes of @fd (through @tc), not consumed, not waited
 * for: how many came, or -1 with errno. */
static ssize_t peek_now(int fd, struct ferry_tls_conn *tc, void *buf,
			size_t len)
{
	ssize_t n;

	if (!tc)
		return recv(fd, buf, len, MSG_PEEK | MSG_DONTWAIT);
	n = ferry__tls_peek(tc, buf, len);
	if (n < 0) {
		errno = (int)-n;
		return -1;
	}
	return n;
}

/* What is this connection (@tc: its established TLS session, if any)?
 * Consumes @fd and @tc when it returns DONE. */
static enum verdict classify(struct mig_in *in, int fd, struct ferry_tls_conn *tc)
{
	uint8_t hs[FERRY_MULTIFD_HANDSHAKE_SIZE];
	ssize_t n = peek_now(fd, tc, hs, 4);

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return WAIT;
	if (n > 0 && n < 4)
		return PARTIAL;
	if (n == 4 && ferry__get_be32(hs) == FERRY_STREAM_MAGIC) {
		ferry__mutex_lock(&in->acc_lock);
		if (in->main_fd < 0 && !in->main_taken) {
			in->main_fd = fd;
			in->main_tls = tc;
			fd = -1;
			pthread_cond_broadcast(&in->acc_cond);
		}
		ferry__mutex_unlock(&in->acc_lock);
		if (fd >= 0)
			refuse_stream(in, fd, tc);
		return DONE;
	}
	if (n == 4 && ferry__get_be32(hs) == FERRY_PREEMPT_MAGIC &&
	    in->acc_recovery) {
		/* A source with preempt reconnects its channel first. */
		pre_restart(in, fd, tc);
		return DONE;
	}
	if (n == 4 && ferry__get_be32(hs) == FERRY_PREEMPT_MAGIC) {
		bool taken = false;

		ferry__mutex_lock(&in->acc_lock);
		if (in->pre_fd < 0 && !in->pre_live) {
			in->pre_fd = fd;
			in->pre_tls = tc;
			in->pre_live = !pthread_create(&in->pre_thread, NULL,
						       pre_main, in);
			taken = in->pre_live;
			if (!taken) {
				in->pre_fd = -1;
				in->pre_tls = NULL;
			}
		}
		ferry__mutex_unlock(&in->acc_lock);
		if (!taken) {
			mig_refused(in->m, "a second postcopy preempt channel");
			ferry__tls_unref(tc);
			close(fd);
		}
		return DONE;
	}
	if (n == 4 && ferry__get_be32(hs) == FERRY_MULTIFD_MAGIC &&
	    in->acc_recovery) {
		mig_refused(in->m, "postcopy recovery: a multifd channel (a "
			    "recovery reconnects the stream and preempt only)");
		ferry__tls_unref(tc);
		close(fd);
		return DONE;
	}
	if (n == 4 && ferry__get_be32(hs) == FERRY_MULTIFD_MAGIC) {
		struct ferry__mf_handshake h;
		struct ferry_error err = { 0 };
		struct refusals *rf = &in->acc_rf;

		n = peek_now(fd, tc, hs, sizeof(hs));
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return WAIT;
		if (n > 0 && n < (ssize_t)sizeof(hs))
			return PARTIAL;
		if (n == (ssize_t)sizeof(hs)) {
			/* A damaged handshake never reaches the receiver: it
			 * would fail the migration it does not belong to. */
			if (ferry__multifd_parse_handshake(hs, &h, &err)) {
				mig_refused(in->m, "multifd channel: %s", err.msg);
				ferry_error_clear(&err);
				ferry__tls_unref(tc);
				close(fd);
				return DONE;
			}
			rf->n = 0;
			ferry__mutex_lock(&in->acc_lock);
			if (in->session_known)
				join_receiver_locked(in, fd, tc, h.session, rf);
			else
				park_locked(in, fd, tc, h.session, rf);
			ferry__mutex_unlock(&in->acc_lock);
			report_refusals(in, rf);
			return DONE;
		}
	}
	if (n >= 3 && !tc && ferry__tls_looks_like_record(hs, (size_t)n))
		mig_refused(in->m, "a TLS client reached this plaintext "
			    "destination: set tls-creds here too (both sides "
			    "need it)");
	else if (n != 0)
		mig_refused(in->m, "an incoming connection that is neither a "
			    "ferry stream nor a multifd channel");
	ferry__tls_unref(tc);
	close(fd);
	return DONE;
}

/* How often a connection that sent only part of its first bytes is
 * looked at again. */
#define ACC_PARTIAL_NS 10000000ull

struct pending {
	int fd;
	uint64_t deadline;
	bool partial;
	int slot;                       /* its pollfd, or -1 */
	struct ferry_tls_conn *tls;     /* tls-creds: its session */
	bool hs_done;                   /* the TLS handshake is over */
	short events;                   /* what it waits for */
};

/*
 * Move @p on: its TLS handshake, one step at a time (a client that stops
 * half-way must not hold the acceptor), then what it is. A refused
 * handshake is counted and the wait goes on: an unauthenticated client
 * cannot end an incoming migration.
 */
static enum verdict advance(struct mig_in *in, struct pending *p)
{
	if (p->tls && !p->hs_done) {
		struct ferry_error err = { 0 };
		int r = ferry__tls_handshake_step(p->tls, &p->events, &err);

		if (r == -EAGAIN)
			return p->events ? WAIT : PARTIAL;
		if (r) {
			mig_refused(in->m, "%s", err.msg);
			ferry__tls_unref(p->tls);
			close(p->fd);
			return DONE;
		}
		p->hs_done = true;
		p->events = POLLIN;
		mig_tls_note(in->m, true, p->tls);
	}
	return classify(in, p->fd, p->tls);
}

static void *acc_main(void *arg)
{
	struct mig_in *in = arg;
	struct pending p[ACC_MAX_PENDING];
	uint64_t patience = in->set.peer_timeout_ms * 1000000ull;
	unsigned n = 0;

	for (;;) {
		struct pollfd pf[2 + ACC_MAX_PENDING];
		uint64_t now = now_ns(), next = UINT64_MAX;
		unsigned k = 0, polled;
		int timeout, pr;

		/* Drop those that said nothing in time: a half-open or idle
		 * connection must not keep a real source waiting. Look at it
		 * once more first: on a starved host its bytes may have come
		 * while this thread was not running, and a real source must
		 * not be dropped for our lateness. */
		for (unsigned i = 0; i < n;) {
			if (p[i].deadline <= now && advance(in, &p[i]) == DONE) {
				p[i] = p[--n];
				continue;
			}
			if (p[i].deadline <= now) {
				mig_refused(in->m, "an incoming connection sent "
					    "%s for %llu ms", p[i].tls &&
					    !p[i].hs_done ? "no complete TLS "
					    "handshake" : "nothing",
					    (unsigned long long)in->set.peer_timeout_ms);
				ferry__tls_unref(p[i].tls);
				close(p[i].fd);
				p[i] = p[--n];
				continue;
			}
			if (p[i].deadline < next)
				next = p[i].deadline;
			if (p[i].partial && now + ACC_PARTIAL_NS < next)
				next = now + ACC_PARTIAL_NS;
			i++;
		}
		pf[k++] = (struct pollfd){ .fd = in->wake[0], .events = POLLIN };
		/* Always accepting: when full, the oldest waiting connection
		 * makes room (below), so a crowd of silent or half-finished
		 * clients cannot keep the real source in the backlog until its
		 * own handshake times out. */
		pf[k++] = (struct pollfd){ .fd = ferry_listener_fd(in->acc_l),
					   .events = POLLIN };
		for (unsigned i = 0; i < n; i++) {
			p[i].slot = -1;
			if (!p[i].partial) {
				p[i].slot = (int)k;
				pf[k++] = (struct pollfd){ .fd = p[i].fd,
							   .events = p[i].events };
			}
		}
		timeout = next == UINT64_MAX ? -1
			: (int)((next - now + 999999) / 1000000);
		pr = poll(pf, k, timeout);
		if (pr < 0 && errno != EINTR)
			break;
		if (pr > 0 && pf[0].revents)
			break;
		polled = n;
		/* Several per wake-up: under a flood of strangers the backlog
		 * must drain faster than it fills, or a real source's SYN is
		 * dropped and retried a second later. */
		for (int burst = 0; pr > 0 && pf[1].revents && burst < 32; burst++) {
			struct ferry_error err = { 0 };
			struct ferry_tls_conn *tc = NULL;
			int fd = ferry_listener_accept(in->acc_l, 0, &err);

			if (fd == -ETIMEDOUT || fd == -EAGAIN)
				break;

			/* Every connection, not only the main one: a channel
			 * read (multifd, preempt) has no timeout of its own,
			 * and a link that dies while the load waits at a sync
			 * point must still end it (keepalive breaks it in
			 * about peer-timeout). */
			if (fd >= 0)
				mig_socket_keepalive(fd, in->set.peer_timeout_ms);
			if (fd >= 0 && in->tls &&
			    !(tc = ferry__tls_conn_new(in->tls, fd, NULL, &err))) {
				mig_refused(in->m, "%s", err.msg);
				close(fd);
			} else if (fd >= 0) {
				if (n == ACC_MAX_PENDING) {
					unsigned old = 0;

					for (unsigned i = 1; i < n; i++)
						if (p[i].deadline < p[old].deadline)
							old = i;
					mig_refused(in->m, "%u connections waited "
						    "to say what they are: the "
						    "oldest was dropped",
						    ACC_MAX_PENDING);
					ferry__tls_unref(p[old].tls);
					close(p[old].fd);
					/* Keep the looked-at range intact: the
					 * last polled entry moves into its place
					 * only if it was not polled itself. */
					p[old] = p[--n];
					if (polled > n)
						polled = n;
				}
				p[n++] = (struct pending){ fd, now_ns() + patience,
							   false, -1, tc, false,
							   POLLIN };
			} else if (fd != -EINTR && fd != -ECONNABORTED) {
				mig_trace(in->m, "accept: %s", err.msg);
				break;
			}
		}
		/* Backwards, so that moving the last entry into a finished
		 * one's place only moves entries already looked at. */
		for (unsigned i = polled; i-- > 0;) {
			enum verdict v;

			if (!p[i].partial && (p[i].slot < 0 || !pf[p[i].slot].revents))
				continue;
			v = advance(in, &p[i]);
			if (v == DONE)
				p[i] = p[--n];
			else
				p[i].partial = v == PARTIAL;
		}
	}
	for (unsigned i = 0; i < n; i++) {
		ferry__tls_unref(p[i].tls);
		close(p[i].fd);
	}
	in->acc_rf.n = 0;
	ferry__mutex_lock(&in->acc_lock);
	drop_parked_locked(in, &in->acc_rf);
	ferry__mutex_unlock(&in->acc_lock);
	report_refusals(in, &in->acc_rf);
	return NULL;
}

/* acc_life held. */
static int acc_start_locked(struct mig_in *in, struct ferry_error *err)
{
	int e;

	/* A recovery starts it again: the last one's pipe goes. */
	for (int k = 0; k < 2; k++)
		if (in->wake[k] >= 0) {
			close(in->wake[k]);
			in->wake[k] = -1;
		}
	if (pipe2(in->wake, O_CLOEXEC))
		return ferry_error_set(err, -errno, "pipe: %s", strerror(errno));
	e = pthread_create(&in->acc_thread, NULL, acc_main, in);
	if (e)
		return ferry_error_set(err, -e, "cannot start the acceptor");
	in->acc_live = true;
	return 0;
}

/* acc_life held. */
static void acc_stop_locked(struct mig_in *in)
{
	if (in->acc_live) {
		/* Inside the downtime: the acceptor must go at once. */
		if (write(in->wake[1], "x", 1) < 0)
			shutdown(ferry_listener_fd(in->acc_l), SHUT_RDWR);
		pthread_join(in->acc_thread, NULL);
		in->acc_live = false;
	}
}

static int acc_start(struct mig_in *in, struct ferry_error *err)
{
	int r;

	ferry__mutex_lock(&in->acc_life);
	r = acc_start_locked(in, err);
	ferry__mutex_unlock(&in->acc_life);
	return r;
}

/* Whichever acceptor runs. */
static void acc_stop(struct mig_in *in)
{
	ferry__mutex_lock(&in->acc_life);
	acc_stop_locked(in);
	ferry__mutex_unlock(&in->acc_life);
}

/* The first port's acceptor, not a recovery's (the load thread's end
 * must not take the port from a postcopy recovery under way). */
static void acc_stop_first(struct mig_in *in)
{
	ferry__mutex_lock(&in->acc_life);
	if (!in->acc_recovery)
		acc_stop_locked(in);
	ferry__mutex_unlock(&in->acc_life);
}

/* Wait for the acceptor's stream connection (its session in *@tc); a
 * cancel ends the wait. */
static int take_main(struct mig_in *in, struct ferry_tls_conn **tc,
		     struct ferry_error *err)
{
	struct ferry_mig *m = in->m;
	int fd = -1;

	*tc = NULL;

	ferry__mutex_lock(&in->acc_lock);
	for (;;) {
		bool stop;

		if (in->main_fd >= 0) {
			fd = in->main_fd;
			in->main_fd = -1;
			in->main_taken = true;
			/* The session goes where the fd goes (m->lock after
			 * acc_lock is not an order we take: publish below). */
			*tc = in->main_tls;
			in->main_tls = NULL;
			break;
		}
		ferry__mutex_unlock(&in->acc_lock);
		ferry__mutex_lock(&m->lock);
		stop = in->cancel;
		ferry__mutex_unlock(&m->lock);
		ferry__mutex_lock(&in->acc_lock);
		if (stop)
			break;
		mig_cond_wait_until(&in->acc_cond, &in->acc_lock,
				    now_ns() + 200 * 1000000ull);
	}
	ferry__mutex_unlock(&in->acc_lock);
	if (fd < 0)
		return ferry_error_set(err, -ECANCELED, "cancelled while waiting "
				       "for the source");
	return fd;
}

/* The first connection's stream; its session is the migration's. */
static int wait_main(struct mig_in *in, struct ferry_error *err)
{
	struct ferry_tls_conn *tc;
	int fd = take_main(in, &tc, err);

	if (fd >= 0) {
		ferry__mutex_lock(&in->m->lock);
		in->fd_tls = tc;
		ferry__mutex_unlock(&in->m->lock);
	}
	return fd;
}

/* ---- the load ----------------------------------------------------------------- */

/* AGREE: the source's choices that must match ours, at setup. */
static int agree_check(struct mig_in *in, uint32_t flags,
		       struct ferry_error *err)
{
	bool src_mf = flags & FERRY_AGREE_DEVSTATE_MULTIFD;
	bool src_ack = flags & FERRY_AGREE_SWITCHOVER_ACK;
	/* Multifd runs only over sockets, as on the source. */
	bool my_mf = mig_ds_multifd(&in->set) && ferry_uri_is_socket(&in->u) &&
		     in->m->ram;

	/* Where buffers go matters only if some device sends them. */
	if ((flags & FERRY_AGREE_DEVSTATE_BUFFERS) && src_mf != my_mf)
		return ferry_error_set(err, -EPROTO, "device-state-channel: the "
			"source sends device state on %s, this destination "
			"expects it on %s (set the same device-state-channel and "
			"multifd on both sides)", src_mf ? "multifd" : "main",
			my_mf ? "multifd" : "main");
	if (src_ack != in->set.switchover_ack)
		return ferry_error_set(err, -EPROTO, "capability switchover-ack "
			"is %s on the source and %s here: set it on both sides",
			src_ack ? "on" : "off",
			in->set.switchover_ack ? "on" : "off");
	return 0;
}

/* switchover-ack: every device that asked has what it needs. */
static void send_swo_ack(void *opaque)
{
	struct mig_in *in = opaque;
	struct ferry_rp_msg ack = { .type = FERRY_RP_SWITCHOVER_ACK };

	if (mig_fault_take(in->m, FAULT_LOSE_SWITCHOVER_ACK))
		return;
	mig_trace(in->m, "switchover-ack: devices ready, telling the source");
	rp_send(in, &ack, NULL);
}

/* Per device with buffers, at the end of the load: for query-migrate. */
static void dev_stats(void *opaque, const struct ferry_load_dev_stats *st)
{
	struct mig_in *in = opaque;
	struct ferry_mig *m = in->m;
	struct ferry_mig_info *i = &m->in_info;
	struct ferry_mig_dev_info *di;

	ferry__mutex_lock(&m->lock);
	i->devstate_switchover_bytes += st->bytes;
	if (i->ndevices < sizeof(i->devices) / sizeof(i->devices[0])) {
		di = &i->devices[i->ndevices++];
		snprintf(di->id, sizeof(di->id), "%s", st->idstr);
		di->instance = st->instance;
		di->switchover_bytes = st->bytes;
		di->data_load_ms = (double)st->data_ns / 1e6;
		di->config_load_ms = (double)st->config_ns / 1e6;
	}
	ferry__mutex_unlock(&m->lock);
}

static int on_command(void *opaque, const struct ferry_cmd_msg *msg,
		      struct ferry_error *err)
{
	struct mig_in *in = opaque;

	switch (msg->cmd) {
	case FERRY_CMD_OPEN_RETURN_PATH:
		return rp_open(in, msg->u.peer_timeout_ms, err);
	case FERRY_CMD_PING: {
		struct ferry_rp_msg pong = { .type = FERRY_RP_PONG,
					     .pong = msg->u.ping };

		/* The drain before a postcopy switch: the stop comes next. */
		if (in->pc_discarded && in->pcd &&
		    ferry__pcd_state(in->pcd) == FERRY_PC_ADVISE)
			pc_switch_urgent(in, true);
		return rp_send(in, &pong, err);
	}
	case FERRY_CMD_AGREE:
		return agree_check(in, msg->u.agree, err);
	case FERRY_CMD_SWITCHOVER_START:
	case FERRY_CMD_DEVSTATE_DONE: {
		struct ferry_multifd *mf;

		if (!(msg->u.devstate_flags & FERRY_DEVSTATE_MULTIFD))
			return 0;
		/* Every channel to its sync point: each buffer sent before
		 * is in its device's queue now. */
		ferry__mutex_lock(&in->acc_lock);
		mf = in->mf;
		ferry__mutex_unlock(&in->acc_lock);
		if (!mf)
			return ferry_error_set(err, -EPROTO, "device state over "
					       "multifd, but no multifd channels");
		return ferry_multifd_recv_sync(mf, err);
	}
	default:
		return pc_command(in, msg, err);
	}
}

static bool cancelled(struct mig_in *in)
{
	bool c;

	ferry__mutex_lock(&in->m->lock);
	c = in->cancel;
	ferry__mutex_unlock(&in->m->lock);
	return c;
}

static int dev_load_begin(void *opaque, struct ferry_error *err)
{
	struct mig_in *in = opaque;
	struct ferry_mig *m = in->m;

	if (mig_fault_take(m, FAULT_STALL_LOAD)) {
		/* As if the process stopped: no more heartbeats, no
		 * progress, until cancelled. */
		rp_silence(in);
		while (!cancelled(in))
			usleep(10000);
		return ferry_error_set(err, -ECANCELED, "cancelled while stalled");
	}
	return m->ops.device_load_begin ? m->ops.device_load_begin(m->opaque, err)
					: 0;
}

static int dev_load_end(void *opaque, int result, struct ferry_error *err)
{
	struct mig_in *in = opaque;
	struct ferry_mig *m = in->m;

	return m->ops.device_load_end ?
		m->ops.device_load_end(m->opaque, result, err) : 0;
}

/* The values LOADED and SHUT carry (see enum ferry_rp_shut_value). */
static void shut_values(struct mig_in *in, struct ferry_rp_msg *msg)
{
	msg->values[FERRY_SHUT_T_EOF] = in->stats.t_eof;
	msg->values[FERRY_SHUT_DEVICE_LOAD_NS] = in->stats.device_load_ns;
	msg->values[FERRY_SHUT_DEVICE_DIGEST] = in->stats.device_digest;
	msg->values[FERRY_SHUT_DEVSTATE_WAIT_NS] = in->stats.devstate_wait_ns;
	msg->values[FERRY_SHUT_DEVSTATE_CONFIG_NS] = in->stats.devstate_config_ns;
	msg->values[FERRY_SHUT_BOOT_ID] = mig_boot_id_hash();
}

/* Run the VM (or leave it paused without autostart): the destination has
 * it now. Also the path postcopy's RUN will take. */
static int take_vm(struct mig_in *in, struct ferry_error *err)
{
	struct ferry_mig *m = in->m;

	if (m->autostart)
		return m->ops.vm_start(m->opaque, err);
	m->ops.vm_set_state(m->opaque, FERRY_RUN_PAUSED);
	return 0;
}

/* After EOF on a live stream: LOADED, then the source's verdict. Returns 0
 * when the VM is ours; sets *swo either way. */
static int handshake(struct mig_in *in, struct ferry_record_io *io,
		     enum ferry_switchover *swo, struct ferry_error *err)
{
	struct ferry_mig *m = in->m;
	struct ferry_rp_msg msg = { .type = FERRY_RP_LOADED };
	struct ferry_error e2 = { 0 };
	int r;

	bool cancel;

	mig_fault_pause(m, true, FAULT_PAUSE_LOADED, &in->cancel);
	shut_values(in, &msg);
	msg.values[FERRY_SHUT_T_LOADED] = now_ns();
	/* From LOADED on the VM is held for the source's verdict: a cancel
	 * is refused, so one that came first wins here. */
	ferry__mutex_lock(&m->lock);
	cancel = in->cancel;
	in->loaded_sent = !cancel;
	ferry__mutex_unlock(&m->lock);
	if (cancel)
		return ferry_error_set(err, -ECANCELED, "cancelled");
	if (mig_fault_take(m, FAULT_LOSE_LOADED)) {
		rp_silence(in);
	} else if ((r = rp_send(in, &msg, err))) {
		/* The source never had LOADED, so no GO exists and it resumes
		 * the VM - unless it is gone (killed: the reset that broke
		 * this send may be its kernel closing its socket). This side
		 * cannot tell which, and in the second case it holds the only
		 * whole copy: keep it, paused, for the operator's rule rather
		 * than give it up. */
		*swo = FERRY_SWO_IN_DOUBT;
		return ferry_error_prefix(err, "switchover in doubt: this side "
			"holds the loaded VM but could not send LOADED, so the "
			"source resumed it unless it is gone; the VM stays "
			"paused. Continue it only if the source is gone. "
			"Sending LOADED: ");
	}
	*swo = FERRY_SWO_LOADED;
	mig_set_switchover(m, true, FERRY_SWO_LOADED);

	for (;;) {
		struct ferry_record rec;
		uint16_t cmd;

		r = ferry_record_read(io, &rec, &e2);
		if (r) {
			*swo = FERRY_SWO_IN_DOUBT;
			return ferry_error_set(err, r == -ETIMEDOUT ? r : -EPIPE,
				"switchover in doubt: this side holds the loaded "
				"VM and reported LOADED, but %s before the "
				"source's verdict; the VM stays paused. Continue "
				"it only if the source did not resume (its "
				"switchover is \"in-doubt\" or it is gone)",
				r == -ETIMEDOUT ? "the source fell silent" :
				rec.at_end ? "the source closed the connection" :
				"the connection broke");
		}
		cmd = rec.type == FERRY_REC_COMMAND && rec.len == 2 ?
		      ferry__get_be16(rec.body) : 0;
		if (cmd == FERRY_CMD_HEARTBEAT)
			continue;
		if (cmd == FERRY_CMD_SWITCHOVER_ABORT) {
			*swo = FERRY_SWO_ABORTED;
			return ferry_error_set(err, -ECANCELED,
				"the source kept the VM (it aborted the "
				"switchover)");
		}
		if (cmd == FERRY_CMD_SWITCHOVER_GO)
			break;
		*swo = FERRY_SWO_IN_DOUBT;
		return ferry_error_set(err, -EBADMSG, "switchover in doubt: a %s "
			"record where the source's verdict belongs",
			ferry_record_type_name(rec.type));
	}

	/* GO: the VM is ours, whatever happens next. */
	msg.values[FERRY_SHUT_T_GO] = now_ns();
	*swo = FERRY_SWO_DONE;
	mig_set_switchover(m, true, FERRY_SWO_DONE);
	r = take_vm(in, err);
	msg.type = FERRY_RP_SHUT;
	stamp_resumed(&msg);
	if (r) {
		msg.status = (uint32_t)-r;
		snprintf(msg.reason, sizeof(msg.reason), "%.250s", err->msg);
	}
	if (mig_fault_take(m, FAULT_LOSE_ACK)) {
		rp_silence(in);
		in->partitioned = true;
	} else {
		rp_send(in, &msg, NULL);  /* the VM is ours either way */
	}
	return r;
}

static void *in_main(void *arg)
{
	struct mig_in *in = arg;
	struct ferry_mig *m = in->m;
	struct ferry_error err = { 0 };
	struct ferry_record_io io = { 0 };
	struct ferry_chan *c = NULL;
	struct ferry_tls_conn *tc;
	struct ferry_multifd *mf;
	enum ferry_switchover swo = FERRY_SWO_NONE;
	struct ferry_load_opts opts = {
		.size = sizeof(opts), .on_command = on_command, .opaque = in,
		.stats = &in->stats, .device_load_begin = dev_load_begin,
		.device_load_end = dev_load_end,
		.max_queued_buffers = (uint32_t)in->set.max_queued_buffers,
		.max_queued_bytes = in->set.max_queued_bytes,
		.load_config_after_iter = in->set.load_config_after_iter,
		.switchover_ack = send_swo_ack,
		.device_stats = dev_stats,
	};
	struct ferry__load_hooks hooks = { .stop_listen = stop_listen,
					   .reconnect = reconnect, .opaque = in };
	bool socket = ferry_uri_is_socket(&in->u);
	char msg[FERRY_ERROR_MSG_MAX];
	int fd, r = 0;

	in->stats.size = sizeof(in->stats);
	if (socket)
		fd = wait_main(in, &err);
	else
		fd = ferry_transport_open_incoming(in->uri, -1, &err);
	if (fd < 0) {
		r = fd;
		goto out;
	}
	/* Without a return path there are no heartbeats to go by: a dead
	 * link is noticed by TCP, within about peer-timeout. */
	if (socket)
		mig_socket_keepalive(fd, in->set.peer_timeout_ms);
	ferry__mutex_lock(&m->lock);
	in->fd = fd;
	if (in->cancel)
		shutdown(fd, SHUT_RDWR);
	ferry__mutex_unlock(&m->lock);
	if (!mig_move_status(m, true, FERRY_MIG_SETUP, FERRY_MIG_ACTIVE)) {
		r = ferry_error_set(&err, -ECANCELED, "cancelled");
		goto out;
	}
	c = in_chan(fd, in->fd_tls, FERRY_CHAN_READ, false);
	if (!c) {
		r = ferry_error_set(&err, -ENOMEM, "out of memory");
		goto out;
	}
	/* The read timeout comes with the return path (rp_open): only then
	 * does the source send heartbeats whenever its stream is idle. */
	in->main_chan = c;
	io.chan = c;
	if (m->ram)
		ferry__ram_set_multifd_provider(m->ram, provide_receiver, in);
	r = ferry__load(m->ctx, c, &opts, &hooks, &io, &in->version, &err);
	/* A load that failed inside the switch window. */
	pc_switch_urgent(in, false);
	/* Postcopy advised but the VM never ran here (precopy converged, or
	 * anything failed before RUN): nobody will serve a fault, and the
	 * fault thread started at ADVISE must not outlive the load. */
	if (in->pcd && !in->pc_ran)
		ferry__pcd_finish(in->pcd);
	if (r == -ETIMEDOUT) {
		ferry_error_clear(&err);
		ferry_error_set(&err, r, "no data from the source for %llu ms",
				(unsigned long long)in->set.peer_timeout_ms);
	}
	/* Stop accepting at once (this is inside the downtime); a multifd
	 * failure is the root cause if there is one. */
	acc_stop_first(in);
	if (m->ram) {
		ferry__ram_set_multifd_provider(m->ram, NULL, NULL);
		ferry_ram_set_multifd_recv(m->ram, NULL, NULL);
	}
	/* The receiver leaves the acceptor's hands (a cancel may be using
	 * it, under acc_lock). */
	ferry__mutex_lock(&in->acc_lock);
	mf = in->mf;
	in->mf = NULL;
	ferry__mutex_unlock(&in->acc_lock);
	if (mf) {
		struct ferry_error me = { 0 };

		if (r && ferry_multifd_error(mf, &me) && me.code != -ECANCELED) {
			ferry_error_clear(&err);
			ferry_error_propagate(&err, &me);
		}
		if (r)
			ferry_multifd_cancel(mf, r, "the load failed");
		ferry_multifd_free(mf);
	}
	pre_stop(in);
	if (in->pc_ran) {
		/* Postcopy: the VM runs here since RUN. Done when every page
		 * is in; otherwise part of its memory is still at the source
		 * and the VM must wait for it (postcopy-paused): nothing here
		 * may zero-fill a missing page. */
		struct ferry_rp_msg shut = { .type = FERRY_RP_SHUT };

		if (!r) {
			shut_values(in, &shut);
			shut.values[FERRY_SHUT_T_RESUMED] = in->t_pc_run;
			rp_send(in, &shut, NULL);
		} else {
			ferry_error_prefix(&err, "postcopy from %s failed after "
				"the VM ran here (pages not yet received can no "
				"longer come): ", in->uri);
		}
	} else if (r) {
		struct ferry_rp_msg shut = { .type = FERRY_RP_SHUT,
					     .status = (uint32_t)-r };

		ferry_error_prefix(&err, "incoming migration from %s failed: ",
				   in->uri);
		snprintf(shut.reason, sizeof(shut.reason), "%.250s", err.msg);
		shut_values(in, &shut);
		rp_send(in, &shut, NULL);
	} else if (in->rp_chan && in->version >= 2) {
		r = handshake(in, &io, &swo, &err);
	} else {
		/* A file, or a source without a return path: nobody to ask,
		 * the complete stream is the verdict. */
		struct ferry_rp_msg shut = { .type = FERRY_RP_SHUT };

		r = take_vm(in, &err);
		shut_values(in, &shut);
		shut.values[FERRY_SHUT_T_RESUMED] = now_ns();
		rp_send(in, &shut, NULL);
	}
	if (swo == FERRY_SWO_IN_DOUBT) {
		/* Whole and stopped: the operator decides (see above). */
		m->ops.vm_set_state(m->opaque, FERRY_RUN_PAUSED);
	}
out:
	acc_stop_first(in);
	if (!in->partitioned)
		rp_close(in);
	ferry_record_io_release(&io);
	ferry_chan_free(c);
	ferry__mutex_lock(&m->lock);
	in->fd = -1;
	tc = in->partitioned ? NULL : in->fd_tls;
	if (tc)
		in->fd_tls = NULL;
	ferry__mutex_unlock(&m->lock);
	/* A partitioned connection stays open (with its session) until
	 * the engine is freed. */
	ferry__tls_unref(tc);
	if (in->partitioned)
		in->held_fd = fd;
	else if (fd >= 0)
		close(fd);
	ferry_listener_close(in->l);
	in->l = NULL;
	if (swo != FERRY_SWO_NONE && swo != FERRY_SWO_LOADED)
		mig_set_switchover(m, true, swo);
	if (r && in->pc_ran) {
		/* A broken link pauses inside the load (the reconnect hook);
		 * what ends the load after RUN cannot be recovered - a
		 * hostile stream, or the engine freed while paused. The VM
		 * runs on; a thread needing a page that never came waits (the
		 * userfaultfd stays until the engine is freed). */
		snprintf(msg, sizeof(msg), "%s", err.msg[0] ? err.msg : strerror(-r));
		mig_trace(m, "%s", msg);
		mig_set_status(m, true, FERRY_MIG_FAILED, msg);
	} else if (r) {
		snprintf(msg, sizeof(msg), "%s", err.msg[0] ? err.msg : strerror(-r));
		mig_trace(m, "%s", msg);
		/* A cancel before LOADED ends cancelled, whatever broke on
		 * the way down because of it. */
		bool by_cancel = cancelled(in) && swo == FERRY_SWO_NONE;

		mig_set_status(m, true, by_cancel ? FERRY_MIG_CANCELLED
						  : FERRY_MIG_FAILED,
			       by_cancel ? "cancelled" : msg);
	} else {
		mig_set_status(m, true, FERRY_MIG_COMPLETED, NULL);
	}
	return NULL;
}

/* ---- start, cancel, free -------------------------------------------------------- */

struct start {
	struct mig_in *in;
	struct mig_in *old;             /* the previous one, to free */
};

/* Under the engine's locks, with the move to setup that follows. */
static int start_check(struct ferry_mig *m, void *arg, struct ferry_error *err)
{
	struct start *st = arg;
	enum ferry_mig_status last = m->in_info.status;
	int r = mig_busy_locked(m, err);

	if (r)
		return r;
	st->old = m->in;
	m->in = st->in;
	m->out_used = false;   /* query and wait follow this side now */
	memset(&m->in_info, 0, sizeof(m->in_info));
	m->in_info.size = sizeof(m->in_info);
	m->in_info.incoming = true;
	m->in_info.status = last;
	m->in_t0 = now_ns();
	return 0;
}

int mig_in_start(struct ferry_mig *m, const char *uri, struct ferry_error *err)
{
	struct start st = { 0 };
	struct mig_in *in;
	int e;

	in = calloc(1, sizeof(*in));
	if (!in)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	in->m = m;
	in->fd = -1;
	in->held_fd = -1;
	in->main_fd = -1;
	in->pre_fd = -1;
	in->wake[0] = in->wake[1] = -1;
	pthread_mutex_init(&in->pre_lock, NULL);
	mig_cond_init(&in->pre_cond);
	pthread_mutex_init(&in->acc_lock, NULL);
	pthread_mutex_init(&in->acc_life, NULL);
	mig_cond_init(&in->acc_cond);
	pthread_mutex_init(&in->rp_lock, NULL);
	mig_cond_init(&in->hb_cond);
	if (!uri || strlen(uri) >= sizeof(in->uri)) {
		mig_in_free(in);
		return ferry_error_set(err, -EINVAL, "bad URI");
	}
	if ((e = ferry_uri_parse(uri, &in->u, err))) {
		mig_in_free(in);
		return e;
	}
	snprintf(in->uri, sizeof(in->uri), "%s", uri);
	/* A first look, so a busy engine does not even bind; the real
	 * check is start_check's. */
	ferry__mutex_lock(&m->lock);
	e = mig_busy_locked(m, err);
	in->set = m->set;
	ferry__mutex_unlock(&m->lock);
	if (e) {
		mig_in_free(in);
		return e;
	}
	if (in->set.tls_creds[0]) {
		struct ferry_tls_config cfg = {
			.dir = in->set.tls_creds, .server = true,
			.authz = in->set.tls_authz, .ktls = in->set.tls_ktls,
		};

		if (!ferry_uri_is_socket(&in->u)) {
			mig_in_free(in);
			return ferry_error_set(err, -EINVAL, "tls-creds is set but "
					       "%s is not a connection: TLS needs "
					       "tcp: or unix:", uri);
		}
		in->tls = ferry__tls_new(&cfg, err);
		if (!in->tls) {
			mig_in_free(in);
			return err && err->code ? err->code : -EINVAL;
		}
	}
	/* Like QEMU's: when this returns, the port accepts. */
	if (ferry_uri_is_socket(&in->u)) {
		in->l = ferry_transport_listen(uri, err);
		if (!in->l) {
			mig_in_free(in);
			return err && err->code ? err->code : -EIO;
		}
		snprintf(in->listen_uri, sizeof(in->listen_uri), "%s",
			 ferry_listener_uri(in->l));
		in->acc_l = in->l;
		if ((e = acc_start(in, err))) {
			mig_in_free(in);
			return e;
		}
	}
	st.in = in;
	e = mig_transition_if(m, true, FERRY_MIG_SETUP, start_check, &st, NULL,
			      err);
	if (e) {
		mig_in_free(in);
		return e;
	}
	mig_in_free(st.old);
	if (in->l)
		mig_trace(m, "waiting for the migration on %s", in->listen_uri);
	/* Set before the thread exists (see mig_out_start). */
	in->thread_started = true;
	e = pthread_create(&in->thread, NULL, in_main, in);
	if (e) {
		in->thread_started = false;
		ferry__mutex_lock(&m->lock);
		in->cancel = true;
		ferry__mutex_unlock(&m->lock);
		acc_stop(in);
		mig_set_status(m, true, FERRY_MIG_FAILED,
			       "cannot start the incoming thread");
		return ferry_error_set(err, -e, "cannot start the incoming "
				       "thread");
	}
	return 0;
}

const char *mig_in_uri(struct mig_in *in)
{
	return in->listen_uri[0] ? in->listen_uri : in->uri;
}

/* m->lock held. */
static void cut_locked(struct mig_in *in)
{
	in->cancel = true;
	if (in->fd >= 0)
		shutdown(in->fd, SHUT_RDWR);
	/* A paused postcopy waits on the engine's cond for a recovery. */
	pthread_cond_broadcast(&in->m->cond);
}

/* After cut_locked: stop the multifd receiver and end wait_main. The
 * receiver is the acceptor's (acc_lock, which may be taken inside the
 * engine lock: that pins @in). */
static void cut_receiver(struct mig_in *in)
{
	ferry__mutex_lock(&in->acc_lock);
	if (in->mf)
		ferry_multifd_cancel(in->mf, -ECANCELED, "cancelled");
	pthread_cond_broadcast(&in->acc_cond);
	ferry__mutex_unlock(&in->acc_lock);
}

int mig_in_cancel(struct ferry_mig *m, struct ferry_error *err)
{
	struct mig_in *in;
	int r = 0;

	ferry__mutex_lock(&m->lock);
	in = m->in;
	if (in && mig_status_live(m->in_info.status)) {
		if (in->pc_ran) {
			r = ferry_error_set(err, -EBUSY, "too late to cancel: in "
				"postcopy the VM runs here and part of its memory "
				"is still at the source");
		} else if (in->loaded_sent) {
			r = ferry_error_set(err, -EBUSY,
				"too late to cancel: the VM is loaded and the "
				"source decides the switchover");
		} else {
			cut_locked(in);
			cut_receiver(in);
		}
	}
	ferry__mutex_unlock(&m->lock);
	return r;
}

void mig_in_kill(struct mig_in *in)
{
	ferry__mutex_lock(&in->m->lock);
	cut_locked(in);
	ferry__mutex_unlock(&in->m->lock);
	cut_receiver(in);
}

void mig_in_free(struct mig_in *in)
{
	if (!in)
		return;
	if (in->thread_started)
		pthread_join(in->thread, NULL);
	acc_stop(in);
	pre_stop(in);
	/* The fault thread sends on the return path: stop it first. */
	ferry__pcd_free(in->pcd);
	rp_close(in);
	ferry_chan_free(in->rec_chan);
	ferry_listener_close(in->rec_l);
	if (in->held_fd >= 0)
		close(in->held_fd);
	if (in->main_fd >= 0)
		close(in->main_fd);
	ferry__tls_unref(in->main_tls);
	ferry__tls_unref(in->fd_tls);
	ferry__tls_free(in->tls);
	ferry_multifd_free(in->mf);
	for (unsigned i = 0; i < in->nparked; i++) {  /* no acceptor ran */
		ferry__tls_unref(in->parked[i].tls);
		close(in->parked[i].fd);
	}
	ferry_listener_close(in->l);
	if (in->wake[0] >= 0)
		close(in->wake[0]);
	if (in->wake[1] >= 0)
		close(in->wake[1]);
	pthread_mutex_destroy(&in->acc_lock);
	pthread_mutex_destroy(&in->acc_life);
	pthread_cond_destroy(&in->acc_cond);
	pthread_mutex_destroy(&in->rp_lock);
	pthread_cond_destroy(&in->hb_cond);
	pthread_mutex_destroy(&in->pre_lock);
	pthread_cond_destroy(&in->pre_cond);
	free(in);
}
