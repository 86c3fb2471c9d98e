/*
 * engine.c - the migration engine's common part: capabilities and
 * parameters, the two state machines, events and trace lines, the
 * statistics snapshot, and creating and freeing an engine.
 *
 * The state machines are tables: allowed[from] is the set of statuses
 * reachable from it, for the outgoing and for the incoming side. Every
 * change goes through mig_set_status, which checks it, publishes it in the
 * side's snapshot, traces it and sends it as an event, in that order and
 * under ev_lock so no two events can overtake each other. A terminal status
 * is set only after the side's cleanup has run (the connections closed,
 * the VM resumed or stopped for good): a client that sees "failed" may
 * start the next migration at once.
 */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "engine-internal.h"
#include "tls.h"

/* ---- names ------------------------------------------------------------- */

static const char *const status_names[FERRY_MIG_STATUS__MAX] = {
	[FERRY_MIG_NONE] = "none",
	[FERRY_MIG_SETUP] = "setup",
	[FERRY_MIG_ACTIVE] = "active",
	[FERRY_MIG_DEVICE] = "device",
	[FERRY_MIG_POSTCOPY_ACTIVE] = "postcopy-active",
	[FERRY_MIG_POSTCOPY_PAUSED] = "postcopy-paused",
	[FERRY_MIG_POSTCOPY_RECOVER] = "postcopy-recover",
	[FERRY_MIG_COMPLETED] = "completed",
	[FERRY_MIG_FAILED] = "failed",
	[FERRY_MIG_CANCELLING] = "cancelling",
	[FERRY_MIG_CANCELLED] = "cancelled",
};

static const char *const swo_names[FERRY_SWO__MAX] = {
	[FERRY_SWO_NONE] = "none",
	[FERRY_SWO_LOADED] = "loaded",
	[FERRY_SWO_GO] = "go",
	[FERRY_SWO_DONE] = "done",
	[FERRY_SWO_ABORTED] = "aborted",
	[FERRY_SWO_IN_DOUBT] = "in-doubt",
};

static const char *const run_names[FERRY_RUN__MAX] = {
	[FERRY_RUN_PRELAUNCH] = "prelaunch",
	[FERRY_RUN_INMIGRATE] = "inmigrate",
	[FERRY_RUN_RUNNING] = "running",
	[FERRY_RUN_PAUSED] = "paused",
	[FERRY_RUN_FINISH_MIGRATE] = "finish-migrate",
	[FERRY_RUN_POSTMIGRATE] = "postmigrate",
	[FERRY_RUN_GUEST_PANICKED] = "guest-panicked",
	[FERRY_RUN_SHUTDOWN] = "shutdown",
};

static const char *const phase_names[FERRY_PHASE__MAX] = {
	[FERRY_PHASE_FINAL_SYNC] = "final-sync",
	[FERRY_PHASE_REMAINING_RAM] = "remaining-ram",
	[FERRY_PHASE_DEVICE_SAVE] = "device-save",
	[FERRY_PHASE_TRANSFER] = "transfer",
	[FERRY_PHASE_DEVICE_DATA] = "device-data",
	[FERRY_PHASE_DEVICE_CONFIG] = "device-config",
	[FERRY_PHASE_DEVICE_LOAD] = "device-load",
	[FERRY_PHASE_HANDSHAKE] = "handshake",
	[FERRY_PHASE_RESUME] = "resume",
};

const char *ferry_mig_status_name(enum ferry_mig_status s)
{
	return (unsigned)s < FERRY_MIG_STATUS__MAX ? status_names[s] : "unknown";
}

const char *ferry_switchover_name(enum ferry_switchover s)
{
	return (unsigned)s < FERRY_SWO__MAX ? swo_names[s] : "unknown";
}

const char *ferry_run_state_name(enum ferry_run_state s)
{
	return (unsigned)s < FERRY_RUN__MAX ? run_names[s] : "unknown";
}

const char *ferry_phase_name(enum ferry_phase p)
{
	return (unsigned)p < FERRY_PHASE__MAX ? phase_names[p] : "unknown";
}

/* ---- the state machines ------------------------------------------------ */

#define B(s) (1u << FERRY_MIG_##s)
#define TERMINAL_NEXT B(SETUP)  /* a finished migration may start over */

/* Outgoing. Postcopy arcs are in place for when postcopy arrives. */
static const unsigned out_allowed[FERRY_MIG_STATUS__MAX] = {
	[FERRY_MIG_NONE] = B(SETUP),
	[FERRY_MIG_SETUP] = B(ACTIVE) | B(FAILED) | B(CANCELLING),
	[FERRY_MIG_ACTIVE] = B(DEVICE) | B(POSTCOPY_ACTIVE) | B(FAILED) |
			     B(CANCELLING),
	[FERRY_MIG_DEVICE] = B(COMPLETED) | B(POSTCOPY_ACTIVE) | B(FAILED) |
			     B(CANCELLING),
	[FERRY_MIG_POSTCOPY_ACTIVE] = B(POSTCOPY_PAUSED) | B(COMPLETED) |
				      B(FAILED),
	[FERRY_MIG_POSTCOPY_PAUSED] = B(POSTCOPY_RECOVER) | B(FAILED),
	[FERRY_MIG_POSTCOPY_RECOVER] = B(POSTCOPY_ACTIVE) | B(POSTCOPY_PAUSED) |
				       B(FAILED),
	/* Cancel is refused once GO is on its way, so a cancelled migration
	 * never completes. */
	[FERRY_MIG_CANCELLING] = B(CANCELLED) | B(FAILED),
	[FERRY_MIG_COMPLETED] = TERMINAL_NEXT,
	[FERRY_MIG_FAILED] = TERMINAL_NEXT,
	[FERRY_MIG_CANCELLED] = TERMINAL_NEXT,
};

/* Incoming: the destination never stops vCPUs of its own, so it has no
 * "device"; POSTCOPY_RUN will take it from active to postcopy-active. */
static const unsigned in_allowed[FERRY_MIG_STATUS__MAX] = {
	[FERRY_MIG_NONE] = B(SETUP),
	[FERRY_MIG_SETUP] = B(ACTIVE) | B(FAILED) | B(CANCELLED),
	[FERRY_MIG_ACTIVE] = B(COMPLETED) | B(POSTCOPY_ACTIVE) | B(FAILED) |
			     B(CANCELLED),
	[FERRY_MIG_POSTCOPY_ACTIVE] = B(POSTCOPY_PAUSED) | B(COMPLETED) |
				      B(FAILED),
	[FERRY_MIG_POSTCOPY_PAUSED] = B(POSTCOPY_RECOVER) | B(FAILED),
	[FERRY_MIG_POSTCOPY_RECOVER] = B(POSTCOPY_ACTIVE) | B(POSTCOPY_PAUSED) |
				       B(FAILED),
	[FERRY_MIG_COMPLETED] = TERMINAL_NEXT,
	[FERRY_MIG_FAILED] = TERMINAL_NEXT,
	[FERRY_MIG_CANCELLED] = TERMINAL_NEXT,
};
#undef B

bool mig_status_live(enum ferry_mig_status s)
{
	return s != FERRY_MIG_NONE && s != FERRY_MIG_COMPLETED &&
	       s != FERRY_MIG_FAILED && s != FERRY_MIG_CANCELLED;
}

static bool terminal(enum ferry_mig_status s)
{
	return s == FERRY_MIG_COMPLETED || s == FERRY_MIG_FAILED ||
	       s == FERRY_MIG_CANCELLED;
}

void mig_trace(struct ferry_mig *m, const char *fmt, ...)
{
	char line[FERRY_ERROR_MSG_MAX + 128];
	va_list ap;

	if (!m->ops.trace)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	m->ops.trace(m->opaque, line);
}

/* Caller holds ev_lock and lock. Returns false (and changes nothing) if
 * the current status is not @from (when @from is not -1). */
static bool transition_locked(struct ferry_mig *m, bool incoming, int from,
			      enum ferry_mig_status to, const char *error,
			      struct ferry_mig_event *ev)
{
	struct ferry_mig_info *info = incoming ? &m->in_info : &m->out_info;
	const unsigned *allowed = incoming ? in_allowed : out_allowed;
	enum ferry_mig_status cur = info->status;
	uint64_t now = ferry__mono_ns(), t0 = incoming ? m->in_t0 : m->out_t0;

	if (from >= 0 && cur != (enum ferry_mig_status)from)
		return false;
	if (!(allowed[cur] & (1u << to))) {
		fprintf(stderr, "ferry: invalid %s migration transition %s -> %s\n",
			incoming ? "incoming" : "outgoing",
			ferry_mig_status_name(cur), ferry_mig_status_name(to));
		abort();
	}
	info->status = to;
	if ((to == FERRY_MIG_FAILED || to == FERRY_MIG_CANCELLED) && error &&
	    !info->error[0])
		snprintf(info->error, sizeof(info->error), "%s", error);
	/* A paused postcopy says why until it is running again. */
	if (to == FERRY_MIG_POSTCOPY_PAUSED && error)
		snprintf(info->error, sizeof(info->error), "%s", error);
	if (cur == FERRY_MIG_POSTCOPY_RECOVER && to == FERRY_MIG_POSTCOPY_ACTIVE)
		info->error[0] = 0;
	if (terminal(to))
		info->total_time_ms = (now - t0) / 1000000;
	*ev = (struct ferry_mig_event){
		.kind = FERRY_EV_STATUS, .incoming = incoming, .from = cur,
		.to = to, .switchover = info->switchover,
		.error = (terminal(to) || to == FERRY_MIG_POSTCOPY_PAUSED) &&
			 info->error[0] ? info->error : NULL,
	};
	pthread_cond_broadcast(&m->cond);
	return true;
}

/*
 * The one way a status changes: under ev_lock and lock, run @check (if
 * any; nonzero leaves the status alone and is returned as is), move from
 * @from (-1: from anywhere the table allows; returns 1 if the status is
 * not @from), then trace and send the event, still under ev_lock.
 */
static int transition(struct ferry_mig *m, bool incoming, int from,
		      enum ferry_mig_status to, const char *error,
		      int (*check)(struct ferry_mig *m, void *arg,
				   struct ferry_error *err),
		      void *arg, struct ferry_error *err)
{
	struct ferry_mig_event ev;
	char msg[FERRY_ERROR_MSG_MAX];
	int r;

	ferry__mutex_lock(&m->ev_lock);
	ferry__mutex_lock(&m->lock);
	r = check ? check(m, arg, err) : 0;
	if (!r && !transition_locked(m, incoming, from, to, error, &ev))
		r = 1;
	/* The event's error string lives in the snapshot, which may change
	 * once the lock is dropped: give the callback a copy. */
	if (!r && ev.error) {
		snprintf(msg, sizeof(msg), "%s", ev.error);
		ev.error = msg;
	}
	ferry__mutex_unlock(&m->lock);
	if (!r) {
		mig_trace(m, "%s migration: %s -> %s%s%s",
			  incoming ? "incoming" : "outgoing",
			  ferry_mig_status_name(ev.from),
			  ferry_mig_status_name(ev.to), ev.error ? ": " : "",
			  ev.error ? ev.error : "");
		if (m->ops.event)
			m->ops.event(m->opaque, &ev);
	}
	ferry__mutex_unlock(&m->ev_lock);
	return r;
}

void mig_set_status(struct ferry_mig *m, bool incoming,
		    enum ferry_mig_status to, const char *error)
{
	transition(m, incoming, -1, to, error, NULL, NULL, NULL);
}

bool mig_move_status(struct ferry_mig *m, bool incoming,
		     enum ferry_mig_status from, enum ferry_mig_status to)
{
	return !transition(m, incoming, (int)from, to, NULL, NULL, NULL, NULL);
}

int mig_transition_if(struct ferry_mig *m, bool incoming,
		      enum ferry_mig_status to,
		      int (*check)(struct ferry_mig *m, void *arg,
				   struct ferry_error *err),
		      void *arg, const char *error, struct ferry_error *err)
{
	return transition(m, incoming, -1, to, error, check, arg, err);
}

void mig_set_switchover(struct ferry_mig *m, bool incoming,
			enum ferry_switchover s)
{
	ferry__mutex_lock(&m->lock);
	(incoming ? &m->in_info : &m->out_info)->switchover = s;
	pthread_cond_broadcast(&m->cond);
	ferry__mutex_unlock(&m->lock);
	mig_trace(m, "%s switchover: %s", incoming ? "incoming" : "outgoing",
		  ferry_switchover_name(s));
}

/* ---- small shared helpers ------------------------------------------------ */

void mig_cond_init(pthread_cond_t *c)
{
	pthread_condattr_t a;

	/* Monotonic: a wall-clock jump must neither end a wait early nor
	 * stretch it (and deadlines are in milliseconds, not seconds). */
	pthread_condattr_init(&a);
	pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
	pthread_cond_init(c, &a);
	pthread_condattr_destroy(&a);
}

bool mig_cond_wait_until(pthread_cond_t *c, pthread_mutex_t *mu,
			 uint64_t deadline_ns)
{
	struct timespec ts = { (time_t)(deadline_ns / 1000000000ull),
			       (long)(deadline_ns % 1000000000ull) };

	if (ferry__mono_ns() >= deadline_ns)
		return false;
	pthread_cond_timedwait(c, mu, &ts);
	return ferry__mono_ns() < deadline_ns;
}

uint64_t mig_rate_delay_ns(uint64_t rate, uint64_t bytes, uint64_t elapsed_ns)
{
	/* bytes * 1e9 overflows 64 bits past ~18 GB: whole seconds and the
	 * remainder separately (the remainder times 1e9 fits, rate < 2^63). */
	uint64_t due;

	if (!rate)
		return 0;
	if (bytes / rate >= UINT64_MAX / 1000000000ull)
		return UINT64_MAX;
	due = bytes / rate * 1000000000ull +
	      (uint64_t)((unsigned __int128)(bytes % rate) * 1000000000ull / rate);
	return due > elapsed_ns ? due - elapsed_ns : 0;
}

void mig_socket_keepalive(int fd, uint64_t timeout_ms)
{
	int on = 1, idle = (int)(timeout_ms / 2000), intvl = (int)(timeout_ms / 4000);
	int cnt = 2;
	unsigned int user = timeout_ms > UINT32_MAX ? UINT32_MAX
						    : (unsigned int)timeout_ms;

	/* Best effort: a unix socket (or an fd: that is not a socket) has
	 * none of this, and that is fine. */
	if (setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on)))
		return;
	idle = idle < 1 ? 1 : idle;
	intvl = intvl < 1 ? 1 : intvl;
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user, sizeof(user));
}

uint64_t mig_boot_id_hash(void)
{
	char id[64] = "";
	FILE *f = fopen("/proc/sys/kernel/random/boot_id", "re");

	if (f) {
		if (!fgets(id, sizeof(id), f))
			id[0] = 0;
		fclose(f);
	}
	return XXH3_64bits(id, strlen(id));
}

/* ---- fault points ---------------------------------------------------------- */

static const char *const fault_names[FAULT__MAX] = {
	[FAULT_LOSE_EOF] = "lose-eof",
	[FAULT_LOSE_LOADED] = "lose-loaded",
	[FAULT_LOSE_GO] = "lose-go",
	[FAULT_LOSE_ACK] = "lose-ack",
	[FAULT_HOLD_DEVICE] = "hold-device",
	[FAULT_STALL_LOAD] = "stall-load",
	[FAULT_FAIL_PACKAGE] = "fail-package",
	[FAULT_POSTCOPY_CUT] = "postcopy-cut",
	[FAULT_STALL_POSTCOPY] = "stall-postcopy",
	[FAULT_LOSE_SWITCHOVER_ACK] = "lose-switchover-ack",
	[FAULT_PAUSE_SETUP] = "pause-setup",
	[FAULT_PAUSE_CONNECTED] = "pause-connected",
	[FAULT_PAUSE_PASS_1] = "pause-pass-1",
	[FAULT_PAUSE_PASS_2] = "pause-pass-2",
	[FAULT_PAUSE_STOPPED] = "pause-stopped",
	[FAULT_PAUSE_EOF] = "pause-eof",
	[FAULT_PAUSE_LOADED] = "pause-loaded",
	[FAULT_PAUSE_RUN] = "pause-run",
};

int ferry_mig_inject_fault(struct ferry_mig *m, const char *point,
			   struct ferry_error *err)
{
	enum mig_fault f = FAULT_NONE;

	if (point && !strcmp(point, "continue")) {
		ferry__mutex_lock(&m->lock);
		m->fault_continue = true;
		pthread_cond_broadcast(&m->cond);
		ferry__mutex_unlock(&m->lock);
		return 0;
	}
	if (point && *point) {
		for (f = FAULT_NONE + 1; f < FAULT__MAX; f++)
			if (!strcmp(point, fault_names[f]))
				break;
		if (f == FAULT__MAX)
			return ferry_error_set(err, -EINVAL,
				"unknown fault point '%s'", point);
	}
	ferry__mutex_lock(&m->lock);
	/* Atomic: the precopy loop peeks at it without the lock. */
	__atomic_store_n(&m->fault, f, __ATOMIC_RELAXED);
	m->fault_continue = false;
	ferry__mutex_unlock(&m->lock);
	if (f)
		mig_trace(m, "fault point armed: %s", fault_names[f]);
	return 0;
}

void mig_fault_pause(struct ferry_mig *m, bool incoming, enum mig_fault f,
		     const bool *cancel)
{
	struct ferry_mig_info *i = incoming ? &m->in_info : &m->out_info;

	if (!mig_fault_take(m, f))
		return;
	ferry__mutex_lock(&m->lock);
	snprintf(i->paused_at, sizeof(i->paused_at), "%s", fault_names[f]);
	while (!m->fault_continue && !*cancel && !m->freeing)
		pthread_cond_wait(&m->cond, &m->lock);
	m->fault_continue = false;
	i->paused_at[0] = 0;
	ferry__mutex_unlock(&m->lock);
	mig_trace(m, "fault point %s: going on", fault_names[f]);
}

bool mig_fault_take(struct ferry_mig *m, enum mig_fault f)
{
	bool hit;

	ferry__mutex_lock(&m->lock);
	hit = m->fault == f;
	if (hit)
		__atomic_store_n(&m->fault, FAULT_NONE, __ATOMIC_RELAXED);
	ferry__mutex_unlock(&m->lock);
	if (hit)
		mig_trace(m, "fault point fires: %s", fault_names[f]);
	return hit;
}

/* ---- TLS and refused connections ------------------------------------------- */

void mig_tls_note(struct ferry_mig *m, bool incoming, struct ferry_tls_conn *c)
{
	struct ferry_tls_info ti;
	struct ferry_mig_info *i = incoming ? &m->in_info : &m->out_info;

	ferry__tls_get_info(c, &ti);
	ferry__mutex_lock(&m->lock);
	if (!i->tls) {
		i->tls = true;
		snprintf(i->tls_version, sizeof(i->tls_version), "%s", ti.version);
		snprintf(i->tls_cipher, sizeof(i->tls_cipher), "%s", ti.cipher);
		snprintf(i->tls_peer, sizeof(i->tls_peer), "%s", ti.peer);
	}
	i->tls_connections++;
	i->tls_ktls_tx += ti.ktls_tx;
	i->tls_ktls_rx += ti.ktls_rx;
	ferry__mutex_unlock(&m->lock);
	mig_trace(m, "TLS: %s %s with '%s', records in %s (tx) and %s (rx)",
		  ti.version, ti.cipher, ti.peer,
		  ti.ktls_tx ? "the kernel" : "user space",
		  ti.ktls_rx ? "the kernel" : "user space");
}

void mig_refused(struct ferry_mig *m, const char *fmt, ...)
{
	char why[FERRY_ERROR_MSG_MAX];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	ferry__mutex_lock(&m->lock);
	m->in_info.refused++;
	snprintf(m->in_info.refused_reason, sizeof(m->in_info.refused_reason),
		 "%s", why);
	ferry__mutex_unlock(&m->lock);
	mig_trace(m, "incoming connection refused: %s", why);
}

/* ---- capabilities and parameters --------------------------------------------- */

static const char *const compression_choices[] = { "none", "zstd", NULL };
static const char *const ds_channel_choices[] = { "main", "multifd", NULL };

#define CAP(n, field, doc)						\
	{ { n, FERRY_SETTING_BOOL, true, false, 0, 1, NULL, doc },	\
	  offsetof(struct mig_settings, field), true }
#define PARAM(n, field, live, lo, hi, doc)				\
	{ { n, FERRY_SETTING_U64, false, live, lo, hi, NULL, doc },	\
	  offsetof(struct mig_settings, field), false }
#define PARAM_BOOL(n, field, doc)					\
	{ { n, FERRY_SETTING_BOOL, false, false, 0, 1, NULL, doc },	\
	  offsetof(struct mig_settings, field), true }
#define PARAM_TEXT(n, field, doc)					\
	{ { n, FERRY_SETTING_TEXT, false, false, 0,			\
	    sizeof(((struct mig_settings *)0)->field) - 1, NULL, doc },	\
	  offsetof(struct mig_settings, field), false }

static const struct setting {
	struct ferry_setting_info info;
	size_t off;
	bool is_bool;
} settings[] = {
	CAP("auto-converge", auto_converge,
	    "throttle the vCPUs when the guest dirties memory faster than it "
	    "can be sent (default off)"),
	CAP("multifd", multifd,
	    "RAM over multifd-channels extra connections (default on)"),
	CAP("return-path", return_path,
	    "the destination answers on the main connection: the switchover "
	    "handshake, heartbeats, its errors (default on for sockets)"),
	PARAM("multifd-channels", multifd_channels, false, 1,
	      FERRY_MULTIFD_MAX_CHANNELS, "parallel RAM connections (default 2)"),
	{ { "multifd-compression", FERRY_SETTING_STR, false, false, 0, 1,
	    compression_choices, "page compression on multifd channels: none "
	    "or zstd (default none)" },
	  offsetof(struct mig_settings, compression), false },
	PARAM("downtime-limit", downtime_limit_ms, true, 1, 2000000,
	      "longest acceptable pause at the switchover, ms (default 300)"),
	PARAM("max-bandwidth", max_bandwidth, true, 0, UINT64_MAX >> 1,
	      "bytes/s over every channel, 0 = unlimited (default)"),
	PARAM("avail-switchover-bandwidth", avail_switchover_bandwidth, true, 0,
	      UINT64_MAX >> 1, "bytes/s the switchover can count on; 0 = the "
	      "bandwidth measured over every channel (default)"),
	PARAM("cpu-throttle-initial", throttle_initial, true, 1, 99,
	      "auto-converge: first throttle, percent (default 20)"),
	PARAM("cpu-throttle-increment", throttle_increment, true, 1, 99,
	      "auto-converge: added per step, percent (default 10)"),
	PARAM("cpu-throttle-max", throttle_max, true, 1, 99,
	      "auto-converge: the most, percent (default 99)"),
	PARAM("peer-timeout", peer_timeout_ms, false, 100, 3600000,
	      "ms without a word from the peer before a live migration gives "
	      "up on it, on either side (default 10000)"),
	CAP("postcopy-ram", postcopy_ram,
	    "allow switching to postcopy (migrate-start-postcopy, or the "
	    "postcopy-after-* rule); set on both sides (default off)"),
	CAP("postcopy-preempt", postcopy_preempt,
	    "requested pages on a connection of their own, ahead of the "
	    "background pages (default off; needs postcopy-ram)"),
	PARAM("postcopy-after-ms", postcopy_after_ms, true, 0, 86400000,
	      "with postcopy-ram: switch to postcopy once precopy has run this "
	      "long without fitting the downtime limit; 0 = never (default)"),
	PARAM("postcopy-after-passes", postcopy_after_passes, true, 0, 1000000,
	      "with postcopy-ram: switch to postcopy after this many passes in "
	      "a row that neither fit the downtime limit nor shrink the rest; "
	      "0 = never (default)"),
	{ { "device-state-channel", FERRY_SETTING_STR, false, false, 0, 1,
	    ds_channel_choices, "where devices' final state in buffers goes: "
	    "main (the main stream) or multifd (the multifd channels, used "
	    "when capability multifd is on; default); the same on both "
	    "sides" },
	  offsetof(struct mig_settings, ds_channel), false },
	PARAM("max-queued-buffers", max_queued_buffers, false, 1, 1u << 20,
	      "destination: device-state buffers queued per device before "
	      "the channels wait for its load thread (default 64)"),
	PARAM("max-queued-bytes", max_queued_bytes, false, 1u << 16,
	      UINT64_MAX >> 1, "destination: the same cap in bytes "
	      "(default 64 MiB)"),
	PARAM_BOOL("load-config-after-iter", load_config_after_iter,
		   "destination: load devices' config state only after every "
		   "iterable section has ended (default off: each as soon as "
		   "its data is in)"),
	CAP("switchover-ack", switchover_ack,
	    "the source stops the VM only once the destination says its "
	    "devices loaded their initial precopy data; set on both sides "
	    "(default off)"),
	PARAM_BOOL("device-load-transaction", device_load_transaction,
		   "destination: the VMM loads the non-iterable device state "
		   "inside one memory transaction (one memory-map commit, one "
		   "flat-view rebuild); false: a commit per device (default "
		   "true)"),
	PARAM("switchover-ack-timeout", switchover_ack_timeout_ms, true, 100,
	      86400000, "with switchover-ack: ms the source waits for the ack "
	      "once the rest fits the downtime limit, then gives up "
	      "(default 60000)"),
	PARAM_TEXT("tls-creds", tls_creds,
		   "directory with ca-cert.pem and server-cert.pem/server-key.pem "
		   "(destination) or client-cert.pem/client-key.pem (source): "
		   "TLS 1.3 with both ends verified on every connection; the "
		   "same on both sides; empty = plain sockets (default)"),
	PARAM_TEXT("tls-hostname", tls_hostname,
		   "source: the name (or address) the destination's certificate "
		   "must carry; empty = the host of the URI (default)"),
	PARAM_TEXT("tls-authz", tls_authz,
		   "destination: client certificate subjects accepted, ';' "
		   "separated, each the whole RFC 2253 subject or CN=name; "
		   "empty = any client the CA signed (default)"),
	PARAM_BOOL("tls-ktls", tls_ktls,
		   "let the kernel do the TLS record layer where it can (the "
		   "tls ULP); user-space TLS otherwise (default true)"),
};
#undef CAP
#undef PARAM
#undef PARAM_BOOL
#undef PARAM_TEXT
#define NSETTINGS (sizeof(settings) / sizeof(settings[0]))

void mig_settings_default(struct mig_settings *s)
{
	*s = (struct mig_settings){
		.multifd = true,
		.return_path = true,
		.multifd_channels = 2,
		.downtime_limit_ms = 300,
		.throttle_initial = 20,
		.throttle_increment = 10,
		.throttle_max = 99,
		.peer_timeout_ms = 10000,
		.ds_channel = MIG_DS_MULTIFD,
		.max_queued_buffers = 64,
		.max_queued_bytes = 64u << 20,
		.switchover_ack_timeout_ms = 60000,
		.device_load_transaction = true,
		.tls_ktls = true,
	};
}

const struct ferry_setting_info *ferry_mig_setting_info(unsigned i)
{
	return i < NSETTINGS ? &settings[i].info : NULL;
}

static const struct setting *find_setting(const char *name)
{
	for (size_t i = 0; name && i < NSETTINGS; i++)
		if (!strcmp(settings[i].info.name, name))
			return &settings[i];
	return NULL;
}

/* Check @v against @st and store it into @set. */
static int apply_one(struct mig_settings *set, const struct setting *st,
		     const struct ferry_setting *v, struct ferry_error *err)
{
	void *field = (char *)set + st->off;

	switch (st->info.type) {
	case FERRY_SETTING_BOOL:
		if (v->u > 1)
			return ferry_error_set(err, -EINVAL,
				"'%s' takes true or false", st->info.name);
		*(bool *)field = v->u;
		return 0;
	case FERRY_SETTING_U64:
		if (v->u < st->info.min || v->u > st->info.max)
			return ferry_error_set(err, -ERANGE,
				"'%s' must be between %llu and %llu, not %llu",
				st->info.name,
				(unsigned long long)st->info.min,
				(unsigned long long)st->info.max,
				(unsigned long long)v->u);
		*(uint64_t *)field = v->u;
		return 0;
	case FERRY_SETTING_STR:
		for (uint64_t i = 0; v->s && st->info.choices[i]; i++)
			if (!strcmp(v->s, st->info.choices[i])) {
				*(uint64_t *)field = i;
				return 0;
			}
		return ferry_error_set(err, -EINVAL, "'%s' cannot be '%s'",
				       st->info.name, v->s ? v->s : "(null)");
	case FERRY_SETTING_TEXT:
		if (!v->s)
			return ferry_error_set(err, -EINVAL, "'%s' takes a string",
					       st->info.name);
		if (strlen(v->s) > st->info.max)
			return ferry_error_set(err, -ERANGE, "'%s' is at most "
					       "%llu bytes", st->info.name,
					       (unsigned long long)st->info.max);
		strcpy(field, v->s);
		return 0;
	}
	return -EINVAL;
}

static bool out_live_locked(struct ferry_mig *m)
{
	return m->out && mig_status_live(m->out_info.status);
}

static bool in_live_locked(struct ferry_mig *m)
{
	return m->in && mig_status_live(m->in_info.status);
}

int mig_busy_locked(struct ferry_mig *m, struct ferry_error *err)
{
	if (m->freeing)
		return ferry_error_set(err, -EBUSY, "the engine is being freed");
	if (out_live_locked(m) || in_live_locked(m))
		return ferry_error_set(err, -EBUSY, "a migration is already %s",
			ferry_mig_status_name(out_live_locked(m) ?
					      m->out_info.status :
					      m->in_info.status));
	return 0;
}

int ferry_mig_set(struct ferry_mig *m, const struct ferry_setting *v,
		  unsigned n, struct ferry_error *err)
{
	struct mig_settings next;
	int r = 0;

	ferry__mutex_lock(&m->lock);
	next = m->set;
	for (unsigned i = 0; i < n && !r; i++) {
		const struct setting *st = find_setting(v[i].name);

		if (!st)
			r = ferry_error_set(err, -ENOENT,
				"no capability or parameter '%s'",
				v[i].name ? v[i].name : "(null)");
		else if (st->info.capability &&
			 (out_live_locked(m) || in_live_locked(m)))
			r = ferry_error_set(err, -EBUSY,
				"capability '%s' cannot change while a migration "
				"runs", st->info.name);
		else
			r = apply_one(&next, st, &v[i], err);
	}
	if (!r)
		m->set = next;
	ferry__mutex_unlock(&m->lock);
	return r;
}

int ferry_mig_get(struct ferry_mig *m, const char *name,
		  struct ferry_setting *out, struct ferry_error *err)
{
	const struct setting *st = find_setting(name);
	const void *field;

	if (!st)
		return ferry_error_set(err, -ENOENT,
				       "no capability or parameter '%s'",
				       name ? name : "(null)");
	*out = (struct ferry_setting){ .name = st->info.name };
	ferry__mutex_lock(&m->lock);
	field = (const char *)&m->set + st->off;
	if (st->info.type == FERRY_SETTING_BOOL)
		out->u = *(const bool *)field;
	else if (st->info.type == FERRY_SETTING_TEXT)
		out->u = strlen(field);
	else
		out->u = *(const uint64_t *)field;
	ferry__mutex_unlock(&m->lock);
	if (st->info.type == FERRY_SETTING_STR)
		out->s = st->info.choices[out->u];
	return 0;
}

int ferry_mig_get_text(struct ferry_mig *m, const char *name, char *buf,
		       size_t len, struct ferry_error *err)
{
	const struct setting *st = find_setting(name);
	int r = 0;

	if (!st || st->info.type != FERRY_SETTING_TEXT)
		return ferry_error_set(err, st ? -EINVAL : -ENOENT,
				       "no text parameter '%s'",
				       name ? name : "(null)");
	ferry__mutex_lock(&m->lock);
	if ((size_t)snprintf(buf, len, "%s", (const char *)&m->set + st->off) >= len)
		r = ferry_error_set(err, -ERANGE, "'%s' is longer than the "
				    "buffer", name);
	ferry__mutex_unlock(&m->lock);
	return r;
}

/* ---- the engine ------------------------------------------------------------ */

struct ferry_mig *ferry_mig_new(const struct ferry_mig_config *ucfg,
				struct ferry_error *err)
{
	struct ferry_mig_config cfg;
	struct ferry_mig *m;

	if (!ucfg || ferry__copy_sized(&cfg, sizeof(cfg), ucfg,
				       "ferry_mig_config", err)) {
		if (!ucfg)
			ferry_error_set(err, -EINVAL, "no configuration");
		return NULL;
	}
	if (!cfg.ctx || !cfg.ops) {
		ferry_error_set(err, -EINVAL, "the engine needs a context and "
				"the VMM's ops");
		return NULL;
	}
	m = calloc(1, sizeof(*m));
	if (!m) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	if (ferry__copy_sized(&m->ops, sizeof(m->ops), cfg.ops, "ferry_vmm_ops",
			      err))
		goto fail;
	if (!m->ops.vm_stop || !m->ops.vm_start || !m->ops.vm_set_state) {
		ferry_error_set(err, -EINVAL, "ferry_vmm_ops: vm_stop, vm_start "
				"and vm_set_state are required");
		goto fail;
	}
	m->ctx = cfg.ctx;
	m->ram = cfg.ram;
	m->opaque = cfg.opaque;
	m->autostart = cfg.autostart;
	pthread_mutex_init(&m->ev_lock, NULL);
	pthread_mutex_init(&m->lock, NULL);
	mig_cond_init(&m->cond);
	mig_settings_default(&m->set);
	m->out_info.size = m->in_info.size = sizeof(struct ferry_mig_info);
	m->in_info.incoming = true;
	return m;
fail:
	free(m);
	return NULL;
}

void ferry_mig_free(struct ferry_mig *m)
{
	struct mig_out *o;
	struct mig_in *in;

	if (!m)
		return;
	ferry__mutex_lock(&m->lock);
	m->freeing = true;
	o = m->out;
	in = m->in;
	m->out = NULL;
	m->in = NULL;
	ferry__mutex_unlock(&m->lock);
	/* Cut first, join after: every thread returns at once. */
	if (o)
		mig_out_kill(o);
	if (in)
		mig_in_kill(in);
	mig_out_free(o);
	mig_in_free(in);
	pthread_cond_destroy(&m->cond);
	pthread_mutex_destroy(&m->lock);
	pthread_mutex_destroy(&m->ev_lock);
	free(m);
}

int ferry_mig_start(struct ferry_mig *m, const char *uri,
		    struct ferry_error *err)
{
	return mig_out_start(m, uri, err);
}

int ferry_mig_incoming(struct ferry_mig *m, const char *uri,
		       struct ferry_error *err)
{
	return mig_in_start(m, uri, err);
}

const char *ferry_mig_incoming_uri(struct ferry_mig *m, char *buf, size_t len)
{
	const char *u = NULL;

	ferry__mutex_lock(&m->lock);
	if (m->in && mig_in_uri(m->in)) {
		snprintf(buf, len, "%s", mig_in_uri(m->in));
		u = buf;
	}
	ferry__mutex_unlock(&m->lock);
	return u;
}

int ferry_mig_cancel(struct ferry_mig *m, struct ferry_error *err)
{
	int r = mig_out_cancel(m, err);

	return r ? r : mig_in_cancel(m, err);
}

int ferry_mig_start_postcopy(struct ferry_mig *m, struct ferry_error *err)
{
	return mig_out_start_postcopy(m, err);
}

int ferry_mig_resume(struct ferry_mig *m, const char *uri,
		     struct ferry_error *err)
{
	return mig_out_resume(m, uri, err);
}

int ferry_mig_recover(struct ferry_mig *m, const char *uri,
		      struct ferry_error *err)
{
	return mig_in_recover(m, uri, err);
}

int ferry_mig_wait(struct ferry_mig *m, int timeout_ms)
{
	uint64_t deadline = timeout_ms < 0 ? UINT64_MAX :
			    ferry__mono_ns() + (uint64_t)timeout_ms * 1000000ull;
	int r = 0;

	ferry__mutex_lock(&m->lock);
	for (;;) {
		const struct ferry_mig_info *i = m->out_used ? &m->out_info
							     : &m->in_info;

		if (!mig_status_live(i->status))
			break;
		if (!mig_cond_wait_until(&m->cond, &m->lock, deadline)) {
			r = -ETIMEDOUT;
			break;
		}
	}
	ferry__mutex_unlock(&m->lock);
	return r;
}

void ferry_mig_query(struct ferry_mig *m, struct ferry_mig_info *info)
{
	struct ferry_mig_info snap;

	ferry__mutex_lock(&m->lock);
	snap = m->out_used ? m->out_info : m->in_info;
	if (!m->out_used && m->in)
		mig_in_postcopy_info(m->in, &snap);
	if (mig_status_live(snap.status)) {
		uint64_t t0 = m->out_used ? m->out_t0 : m->in_t0;
		snap.total_time_ms = (ferry__mono_ns() - t0) / 1000000;
	}
	ferry__mutex_unlock(&m->lock);
	snap.size = sizeof(snap);
	ferry__fill_sized(info, &snap, sizeof(snap));
}
