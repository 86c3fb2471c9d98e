/*
 * engine-internal.h - the migration engine's private structures, shared by
 * engine.c (settings, state machines, events, query), engine-out.c (the
 * outgoing migration) and engine-in.c (the incoming one).
 *
 * Locks, in the order they may be taken:
 *   m->ev_lock   serialises events and transition trace lines: taken by
 *                whoever changes a status, held across the VMM's event
 *                callback, so events arrive in the order things happened;
 *   m->lock      everything marked (lock) below; never held while the
 *                engine calls into the VMM or blocks on I/O;
 *   per-object locks (the return-path reader's, the destination's RP
 *                writer, the acceptor's), never held with m->lock taken
 *                after them.
 */
#ifndef FERRY_ENGINE_INTERNAL_H
#define FERRY_ENGINE_INTERNAL_H

#include <pthread.h>

#include "ferry/engine.h"
#include "ferry/multifd.h"
#include "ferry/transport.h"
#include "internal.h"

/* ---- settings ---------------------------------------------------------- */

struct mig_settings {
	bool auto_converge, multifd, return_path;
	uint64_t multifd_channels;
	uint64_t compression;          /* index into the choices: none, zstd */
	uint64_t downtime_limit_ms;
	uint64_t max_bandwidth;        /* bytes/s, 0 = unlimited */
	uint64_t avail_switchover_bandwidth; /* bytes/s, 0 = measured */
	uint64_t throttle_initial, throttle_increment, throttle_max;
	uint64_t peer_timeout_ms;
	bool postcopy_ram, postcopy_preempt;
	uint64_t postcopy_after_ms, postcopy_after_passes;
	uint64_t ds_channel;           /* enum mig_ds_channel */
	uint64_t max_queued_buffers, max_queued_bytes;
	bool load_config_after_iter;
	bool switchover_ack;
	uint64_t switchover_ack_timeout_ms;
	bool device_load_transaction;  /* read by the VMM (ferry_mig_get) */
	char tls_creds[4096];          /* "" = plain sockets */
	char tls_hostname[256];        /* "" = the URI's host */
	char tls_authz[1024];
	bool tls_ktls;
};

enum mig_ds_channel { MIG_DS_MAIN, MIG_DS_MULTIFD };

/* Device state in buffers goes over multifd: asked for, and multifd on. */
static inline bool mig_ds_multifd(const struct mig_settings *s)
{
	return s->ds_channel == MIG_DS_MULTIFD && s->multifd;
}

void mig_settings_default(struct mig_settings *s);

/* ---- fault points (test only) ------------------------------------------ */

enum mig_fault {
	FAULT_NONE,
	FAULT_LOSE_EOF,
	FAULT_LOSE_LOADED,
	FAULT_LOSE_GO,
	FAULT_LOSE_ACK,
	FAULT_HOLD_DEVICE,
	FAULT_STALL_LOAD,
	FAULT_FAIL_PACKAGE,
	FAULT_POSTCOPY_CUT,
	FAULT_STALL_POSTCOPY,
	FAULT_LOSE_SWITCHOVER_ACK,
	/* Pauses: the side stops at that point until "continue" (or a
	 * cancel), so a test can strike exactly there (kill, stop, cut). */
	FAULT_PAUSE_SETUP,             /* source: before any connection */
	FAULT_PAUSE_CONNECTED,         /* source: set up, before pass 1 */
	FAULT_PAUSE_PASS_1,            /* source: in the first pass */
	FAULT_PAUSE_PASS_2,            /* source: in a later pass */
	FAULT_PAUSE_STOPPED,           /* source: VM stopped, nothing sent */
	FAULT_PAUSE_EOF,               /* source: EOF sent, no answer yet */
	FAULT_PAUSE_LOADED,            /* destination: loaded, LOADED not sent */
	FAULT_PAUSE_RUN,               /* source: postcopy RUN sent */
	FAULT__MAX
};

/* ---- the engine -------------------------------------------------------- */

struct mig_out;
struct mig_in;

struct ferry_mig {
	/* Immutable after ferry_mig_new. */
	struct ferry_ctx *ctx;
	struct ferry_ram *ram;
	struct ferry_vmm_ops ops;
	void *opaque;
	bool autostart;

	pthread_mutex_t ev_lock;
	pthread_mutex_t lock;
	pthread_cond_t cond;           /* CLOCK_MONOTONIC; any status change */

	struct mig_settings set;       /* lock */
	enum mig_fault fault;          /* lock (written atomically: read
					  without it by the precopy loop):
					  armed, fires once */
	bool fault_continue;           /* lock: "continue" ends a pause */
	bool freeing;                  /* lock: ferry_mig_free in progress */

	/* The sides. Created by ferry_mig_start / ferry_mig_incoming (which
	 * own the pointers, under lock), freed by the next start or by
	 * ferry_mig_free after their threads are joined. */
	struct mig_out *out;           /* lock */
	struct mig_in *in;             /* lock */

	/* Published snapshots (lock): each side writes its own. */
	struct ferry_mig_info out_info, in_info;
	uint64_t out_t0, in_t0;        /* lock: CLOCK_MONOTONIC ns at start */
	bool out_used;                 /* lock: the side started last is the
					  outgoing one (query, wait) */
};

/* Trace a line through ops.trace (no lock needed). */
void mig_trace(struct ferry_mig *m, const char *fmt, ...) FERRY_PRINTF(2, 3);

/*
 * Move one side's status, checked against its transition table (an
 * invalid transition is an engine bug: abort), published in the snapshot,
 * traced and sent as an event. @error (may be NULL) is recorded for
 * failed/cancelled. Takes ev_lock and lock; the caller holds neither.
 */
void mig_set_status(struct ferry_mig *m, bool incoming,
		    enum ferry_mig_status to, const char *error);
/* The same, only if the current status is @from; returns whether it moved. */
bool mig_move_status(struct ferry_mig *m, bool incoming,
		     enum ferry_mig_status from, enum ferry_mig_status to);
/*
 * Check and move in one step: @check runs under lock (it may change the
 * side's fields) and returns 0 to move to @to, or anything else to leave
 * the status alone (returned as is). Events and the caller's own
 * transitions cannot come in between.
 */
int mig_transition_if(struct ferry_mig *m, bool incoming,
		      enum ferry_mig_status to,
		      int (*check)(struct ferry_mig *m, void *arg,
				   struct ferry_error *err),
		      void *arg, const char *error, struct ferry_error *err);
/* Update the switchover field of one side's snapshot (lock inside). */
void mig_set_switchover(struct ferry_mig *m, bool incoming,
			enum ferry_switchover s);

/* Take the armed fault if it is @f (fires once). */
bool mig_fault_take(struct ferry_mig *m, enum mig_fault f);
/* If the pause point @f is armed: show it (query-migrate "paused-at") and
 * wait until "continue" is injected, *cancel (m->lock) is set, or the
 * engine is being freed. The caller holds no lock. */
void mig_fault_pause(struct ferry_mig *m, bool incoming, enum mig_fault f,
		     const bool *cancel);

bool mig_status_live(enum ferry_mig_status s);

/* -EBUSY (and @err) while either side is live or the engine is being
 * freed: no new migration may start. m->lock held. */
int mig_busy_locked(struct ferry_mig *m, struct ferry_error *err);

/* CLOCK_MONOTONIC deadline helpers for timed waits. */
void mig_cond_init(pthread_cond_t *c);
/* Wait on @c until signalled or @deadline_ns (CLOCK_MONOTONIC) passed.
 * Returns false once the deadline has passed. */
bool mig_cond_wait_until(pthread_cond_t *c, pthread_mutex_t *mu,
			 uint64_t deadline_ns);

/* Bytes of a rate-limited transfer due by now, and how long to sleep so
 * that @bytes sent since @t0 stay within @rate bytes/s. Overflow-safe for
 * any byte count. */
uint64_t mig_rate_delay_ns(uint64_t rate, uint64_t bytes, uint64_t elapsed_ns);

/* TLS: count an established session in the side's snapshot (the first
 * one's version, cipher and peer are shown) and trace it. */
struct ferry_tls_conn;
void mig_tls_note(struct ferry_mig *m, bool incoming, struct ferry_tls_conn *c);
/* Destination: a connection turned away, and why (traced, counted, shown
 * in query-migrate). */
void mig_refused(struct ferry_mig *m, const char *fmt, ...) FERRY_PRINTF(2, 3);

/* TCP keepalive and TCP_USER_TIMEOUT on @fd, so a dead link (no ACKs, no
 * replies to probes) breaks the connection within about @timeout_ms even
 * where no heartbeat is expected. Best effort; no-op on unix sockets. */
void mig_socket_keepalive(int fd, uint64_t timeout_ms);

/* XXH3-64 of this host's boot id: equal on one host (same monotonic
 * clock). */
uint64_t mig_boot_id_hash(void);

/* ---- sides ------------------------------------------------------------- */

/* engine-out.c */
int mig_out_start(struct ferry_mig *m, const char *uri, struct ferry_error *err);
int mig_out_cancel(struct ferry_mig *m, struct ferry_error *err);
int mig_out_start_postcopy(struct ferry_mig *m, struct ferry_error *err);
int mig_out_resume(struct ferry_mig *m, const char *uri, struct ferry_error *err);
/* Join the thread and free; @m->lock not held. */
void mig_out_free(struct mig_out *o);
/* Cut everything (ferry_mig_free): like cancel, even past GO. */
void mig_out_kill(struct mig_out *o);

/* engine-in.c */
int mig_in_start(struct ferry_mig *m, const char *uri, struct ferry_error *err);
int mig_in_cancel(struct ferry_mig *m, struct ferry_error *err);
const char *mig_in_uri(struct mig_in *in);
/* The destination's postcopy figures into @i (m->lock held). */
void mig_in_postcopy_info(struct mig_in *in, struct ferry_mig_info *i);
int mig_in_recover(struct ferry_mig *m, const char *uri, struct ferry_error *err);
void mig_in_free(struct mig_in *in);
void mig_in_kill(struct mig_in *in);

#endif
