/*
 * ferry/engine.h - the migration engine: a whole live migration, outgoing or
 * incoming, driven by libferry for the VMM that embeds it.
 *
 * A VMM gives the engine
 *   (a) its devices: a struct ferry_ctx with every device registered
 *       (ferry_register, ferry_register_vmstate, ferry_ram_register);
 *   (b) optionally its RAM as a struct ferry_ram (with the dirty-log start /
 *       sync / stop callbacks of ferry_ram_new): this enables multifd;
 *   (c) a small struct ferry_vmm_ops: stop and start the vCPUs, set the run
 *       state, throttle (auto-converge), optional hooks around the
 *       switchover and the non-iterable load, and sinks for events and
 *       trace lines.
 * The engine owns everything else: the URI, the connections, the migration
 * thread, the return-path reader, the acceptor, the heartbeats, the
 * convergence policy, the switchover handshake, the state machines,
 * statistics, cancel, and leaving the VM as it was after a failure.
 *
 * Threads the engine runs (all joined by ferry_mig_free):
 *   outgoing: the migration thread (every save hook, every VMM op below),
 *             the return-path reader, the heartbeat sender, multifd
 *             channel threads;
 *   incoming: the incoming thread (acceptor for the main connection, then
 *             the load: every load hook except load_buffer, and every VMM
 *             op below), the acceptor (extra connections while the load
 *             runs), the heartbeat sender, multifd channel threads, device
 *             load threads; in postcopy the listen thread (the rest of the
 *             stream after the package; status changes of a pause and a
 *             recovery), the fault thread and the preempt reader.
 * Every public function is thread-safe. None may be called from the event
 * or trace callbacks except ferry_mig_query and the name functions.
 *
 * The switchover rule (docs/architecture.md, "The switchover"): with a
 * return path, the source stops the VM and sends the rest; the destination
 * loads it and reports LOADED; only then does the source send GO, after
 * which it never resumes by itself; the destination runs only after it has
 * read GO. A source that fails before GO resumes (or stays as it was); a
 * destination that cannot load, or learns that the source kept the VM,
 * fails. If the link breaks between LOADED and the end of the handshake,
 * the side that cannot know reports switchover "in-doubt" and keeps the VM
 * stopped: query both sides to decide which one to continue.
 *
 * Postcopy (capability postcopy-ram on both sides; docs/architecture.md,
 * "Postcopy"): the package holding the device state and RUN plays GO's
 * part - once it is all in the kernel the source never resumes by itself,
 * unless the destination reports that it failed before RUN. From RUN on
 * the destination's VM runs while its missing pages are fetched; the VMM
 * sees vm_start there, in the incoming thread, as at GO. The source's run
 * state stays finish-migrate until every page is placed. A broken link
 * pauses both sides until ferry_mig_recover / ferry_mig_resume.
 */
#ifndef FERRY_ENGINE_H
#define FERRY_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ferry/common.h"
#include "ferry/migration.h"
#include "ferry/ram.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Migration status, with QEMU's names (ferry_mig_status_name). */
enum ferry_mig_status {
	FERRY_MIG_NONE,              /* "none" */
	FERRY_MIG_SETUP,             /* "setup": connecting, or listening */
	FERRY_MIG_ACTIVE,            /* "active": precopy, or loading */
	FERRY_MIG_DEVICE,            /* "device": source, vCPUs stopped */
	FERRY_MIG_POSTCOPY_ACTIVE,   /* "postcopy-active" */
	FERRY_MIG_POSTCOPY_PAUSED,   /* "postcopy-paused" */
	FERRY_MIG_POSTCOPY_RECOVER,  /* "postcopy-recover" */
	FERRY_MIG_COMPLETED,         /* "completed" */
	FERRY_MIG_FAILED,            /* "failed" */
	FERRY_MIG_CANCELLING,        /* "cancelling" */
	FERRY_MIG_CANCELLED,         /* "cancelled" */
	FERRY_MIG_STATUS__MAX
};

/* Where the switchover handshake stands (query-migrate "switchover"). */
enum ferry_switchover {
	FERRY_SWO_NONE,      /* "none": not reached */
	FERRY_SWO_LOADED,    /* "loaded": the destination holds the whole
			      * state and waits for GO (source: LOADED read) */
	FERRY_SWO_GO,        /* "go": the source has sent GO and will not
			      * resume; it waits for the destination's ack */
	FERRY_SWO_DONE,      /* "done": the destination has the VM */
	FERRY_SWO_ABORTED,   /* "aborted": the source kept the VM */
	FERRY_SWO_IN_DOUBT,  /* "in-doubt": the link broke inside the
			      * handshake; this side keeps the VM stopped */
	FERRY_SWO__MAX
};

/* VM run states, with QEMU's names (ferry_run_state_name). */
enum ferry_run_state {
	FERRY_RUN_PRELAUNCH,
	FERRY_RUN_INMIGRATE,
	FERRY_RUN_RUNNING,
	FERRY_RUN_PAUSED,
	FERRY_RUN_FINISH_MIGRATE,
	FERRY_RUN_POSTMIGRATE,
	FERRY_RUN_GUEST_PANICKED,
	FERRY_RUN_SHUTDOWN,
	FERRY_RUN__MAX
};

/* Downtime phases, in order; they add up to the downtime. */
enum ferry_phase {
	FERRY_PHASE_FINAL_SYNC,      /* "final-sync": last dirty-log sync */
	FERRY_PHASE_REMAINING_RAM,   /* "remaining-ram": the last dirty pages */
	FERRY_PHASE_DEVICE_SAVE,     /* "device-save": non-iterable state */
	FERRY_PHASE_TRANSFER,        /* "transfer": the stream's tail in flight */
	FERRY_PHASE_DEVICE_DATA,     /* "device-data": device load threads
					finishing data the stream had sent */
	FERRY_PHASE_DEVICE_CONFIG,   /* "device-config": devices' config state */
	FERRY_PHASE_DEVICE_LOAD,     /* "device-load": non-iterable load */
	FERRY_PHASE_HANDSHAKE,       /* "handshake": LOADED, GO */
	FERRY_PHASE_RESUME,          /* "resume": vCPUs running again */
	FERRY_PHASE__MAX
};

FERRY_API const char *ferry_mig_status_name(enum ferry_mig_status s);
FERRY_API const char *ferry_switchover_name(enum ferry_switchover s);
FERRY_API const char *ferry_run_state_name(enum ferry_run_state s);
FERRY_API const char *ferry_phase_name(enum ferry_phase p);

/* ---- events ------------------------------------------------------------ */

enum ferry_mig_event_kind {
	FERRY_EV_STATUS,   /* a status transition (QMP's MIGRATION event) */
	FERRY_EV_PASS,     /* a precopy pass ended (QMP's MIGRATION_PASS) */
};

/* Owned by the library, valid during the callback only. Fields may be
 * added at the end; the library never shrinks this struct. */
struct ferry_mig_event {
	enum ferry_mig_event_kind kind;
	bool incoming;                 /* which side of the migration */
	enum ferry_mig_status from, to;/* STATUS */
	enum ferry_switchover switchover; /* STATUS: where the handshake stood */
	const char *error;             /* STATUS to failed/cancelled: why */
	uint64_t pass;                 /* PASS: passes completed */
};

/* ---- the VMM interface ---------------------------------------------------- */

/*
 * Every hook returns 0 or -errno with @err filled (or nothing, where it has
 * no return value). The engine holds none of its locks while it calls a
 * hook - except the event hook and the trace lines of status changes,
 * called under the lock that keeps events in order - so a hook may call
 * ferry_mig_query. Hooks marked optional may be NULL. Growing this struct: set .size = sizeof(struct ferry_vmm_ops); a
 * library newer than the caller treats hooks past .size as NULL.
 */
struct ferry_vmm_ops {
	size_t size;

	/* Required. Thread: the migration thread. Phase: switchover (source).
	 * Stop every vCPU, wait until none runs guest code, and enter run
	 * state @to (FERRY_RUN_FINISH_MIGRATE). *@was receives the run state
	 * before the call, which the engine restores if the migration fails.
	 * While the run state is finish-migrate the VMM must refuse to run the
	 * vCPUs (a user's `cont`): only the engine ends that state. */
	int (*vm_stop)(void *opaque, enum ferry_run_state to,
		       enum ferry_run_state *was, struct ferry_error *err);
	/* Required. Thread: the migration thread (a failed migration whose VM
	 * was running) or the incoming thread (the destination at GO, when
	 * autostart is set). Run the vCPUs and enter FERRY_RUN_RUNNING. */
	int (*vm_start)(void *opaque, struct ferry_error *err);
	/* Required. Thread: the migration or the incoming thread. Enter run
	 * state @to with the vCPUs stopped: FERRY_RUN_POSTMIGRATE (source,
	 * the destination has the VM or may have it), FERRY_RUN_PAUSED
	 * (destination kept paused, or in doubt), or the state @was from
	 * vm_stop after a failure. Cannot fail. */
	void (*vm_set_state)(void *opaque, enum ferry_run_state to);
	/* Optional (needed for auto-converge). Thread: the migration thread.
	 * Phase: precopy. Slow the vCPUs so they run (100 - @pct)% of the
	 * time; 0 ends throttling (the engine always ends it). */
	void (*vm_throttle)(void *opaque, unsigned pct);

	/* Optional. Thread: the migration thread. Phase: switchover, vCPUs
	 * stopped, before the final state is sent. A failure fails the
	 * migration (the VM resumes). */
	int (*switchover_begin)(void *opaque, struct ferry_error *err);
	/* Optional. Thread: the migration thread. After the switchover ended,
	 * @completed or not (failed, cancelled or in doubt). */
	void (*switchover_end)(void *opaque, bool completed);

	/* Optional. Thread: the load thread (the incoming thread). Phase:
	 * incoming, VM stopped, when the first non-iterable (FULL) section
	 * arrives: the source is in its switchover. A failure fails the load.
	 * This pair wraps the non-iterable load: the place to open one
	 * memory transaction, so the devices' loads (BARs moved, regions
	 * enabled) cost one memory-map commit instead of one each - when the
	 * parameter device-load-transaction (ferry_mig_get) says so. Every
	 * load hook that may change the memory map (load_state of FULL
	 * sections, load_config) runs on this same thread, in between. */
	int (*device_load_begin)(void *opaque, struct ferry_error *err);
	/* Optional. Thread: the load thread. After the last non-iterable
	 * section (at EOF), before the destination reports LOADED; @result is
	 * 0 or the load's error. Work here counts as device-load downtime. A
	 * failure fails the load. Called once for each device_load_begin. */
	int (*device_load_end)(void *opaque, int result, struct ferry_error *err);

	/* Optional. Any engine thread, serialised (one call at a time, in the
	 * order things happened). Must not block for long. */
	void (*event)(void *opaque, const struct ferry_mig_event *ev);
	/* Optional. Any engine thread. One line, no newline: every state
	 * transition, every pass, every decision of the policy. */
	void (*trace)(void *opaque, const char *line);
};

struct ferry_mig_config {
	size_t size;                     /* sizeof(struct ferry_mig_config) */
	struct ferry_ctx *ctx;           /* required; must outlive the engine */
	struct ferry_ram *ram;           /* optional: RAM registered in ctx;
					    without it, no multifd */
	const struct ferry_vmm_ops *ops; /* required; copied */
	void *opaque;                    /* passed to every hook */
	/* Destination: run the VM once it is ours (QEMU without -S). */
	bool autostart;
};

struct ferry_mig;

/* NULL on failure (bad config, ENOMEM). */
FERRY_API struct ferry_mig *ferry_mig_new(const struct ferry_mig_config *cfg,
					  struct ferry_error *err);
/* Cancel whatever runs (cutting every connection), join every thread and
 * free. An outgoing migration past GO is not undone. NULL is a no-op. */
FERRY_API void ferry_mig_free(struct ferry_mig *m);

/* ---- capabilities and parameters (QEMU's names) -------------------------- */

enum ferry_setting_type {
	FERRY_SETTING_BOOL,
	FERRY_SETTING_U64,
	FERRY_SETTING_STR,
	FERRY_SETTING_TEXT,         /* free text of at most max bytes */
};

/* One capability or parameter. docs/control.md lists them. */
struct ferry_setting_info {
	const char *name;
	enum ferry_setting_type type;
	bool capability;            /* migrate-set-capabilities (else -parameters) */
	bool live;                  /* takes effect on a running migration */
	uint64_t min, max;          /* U64 bounds; TEXT: max length */
	const char *const *choices; /* STR: NULL-terminated */
	const char *doc;
};

/* The i-th setting, or NULL past the end (static storage). */
FERRY_API const struct ferry_setting_info *ferry_mig_setting_info(unsigned i);

struct ferry_setting {
	const char *name;
	uint64_t u;                 /* BOOL (0 or 1) and U64 */
	const char *s;              /* STR, and TEXT when setting */
};

/*
 * Set @n settings at once: all are checked first (name, type, bounds,
 * choice), then all applied, or none. Capabilities cannot change while a
 * migration runs (-EBUSY); parameters marked live apply to a running
 * migration at its next pass, the others to the next migration.
 */
FERRY_API int ferry_mig_set(struct ferry_mig *m, const struct ferry_setting *v,
			    unsigned n, struct ferry_error *err);
/* Read one setting (out->s points to static storage). -ENOENT if unknown.
 * TEXT settings give only their length in out->u (out->s = NULL): read
 * them with ferry_mig_get_text. */
FERRY_API int ferry_mig_get(struct ferry_mig *m, const char *name,
			    struct ferry_setting *out, struct ferry_error *err);
/* Copy a TEXT setting into @buf (NUL-terminated; -ERANGE if @len is too
 * small, -EINVAL if @name is not a TEXT setting). */
FERRY_API int ferry_mig_get_text(struct ferry_mig *m, const char *name,
				 char *buf, size_t len, struct ferry_error *err);

/* ---- driving it ------------------------------------------------------------ */

/*
 * Outgoing migration to @uri (tcp:, unix:, fd:, file:) in a new migration
 * thread; returns at once (-EBUSY while one runs or an incoming one is
 * set up). Progress: ferry_mig_query and the event hook.
 */
FERRY_API int ferry_mig_start(struct ferry_mig *m, const char *uri,
			      struct ferry_error *err);

/*
 * Incoming migration from @uri. For sockets the listener is bound before
 * this returns, so a source told "the destination is up" never finds the
 * port closed; the incoming thread then accepts, loads, and runs the VM (or
 * leaves it paused) by the switchover rule. -EBUSY if already set up.
 */
FERRY_API int ferry_mig_incoming(struct ferry_mig *m, const char *uri,
				 struct ferry_error *err);
/* The listening URI (tcp: with the real port) once ferry_mig_incoming
 * returned, else NULL. Copied into @buf. */
FERRY_API const char *ferry_mig_incoming_uri(struct ferry_mig *m, char *buf,
					     size_t len);

/*
 * Cancel the outgoing migration in setup, active or device: every
 * connection is shut down at once, so every thread of the migration
 * returns, and the VM resumes (or stays as it was). Once GO went out the
 * destination owns the VM: -EBUSY. Nothing running: 0 (as QEMU). An
 * incoming migration not yet holding the VM is cancelled too.
 */
FERRY_API int ferry_mig_cancel(struct ferry_mig *m, struct ferry_error *err);

/*
 * Switch the running outgoing precopy to postcopy (QMP's
 * migrate-start-postcopy): at the next step the source stops the VM,
 * sends the device state and the destination runs it, fetching the pages
 * it lacks on demand. Needs capability postcopy-ram on both sides, set
 * before the migration started. -EINVAL if there is no precopy to switch
 * (not started, already switched or past the switchover).
 */
FERRY_API int ferry_mig_start_postcopy(struct ferry_mig *m,
				       struct ferry_error *err);

/*
 * Recovery of a paused postcopy (status postcopy-paused: the link broke
 * after the destination started running the VM). On the destination,
 * ferry_mig_recover (QMP's migrate-recover) listens on @uri; the port
 * accepts when it returns. On the source, ferry_mig_resume (QMP's migrate
 * with "resume": true) connects there; the destination sends what it has
 * received, the source sends the rest, and postcopy goes on. Both may be
 * repeated, in any order, as often as the link breaks. -EINVAL when no
 * postcopy is paused on that side.
 */
FERRY_API int ferry_mig_recover(struct ferry_mig *m, const char *uri,
				struct ferry_error *err);
FERRY_API int ferry_mig_resume(struct ferry_mig *m, const char *uri,
			       struct ferry_error *err);
/* The URI ferry_mig_recover listens on (tcp: with the real port), copied
 * into @buf; NULL if none. */
FERRY_API const char *ferry_mig_recover_uri(struct ferry_mig *m, char *buf,
					    size_t len);

/* Wait until the current migration (outgoing, else incoming) reaches a
 * terminal status; -ETIMEDOUT after @timeout_ms (-1: no limit). The event
 * hook for that status may still be running when this returns. */
FERRY_API int ferry_mig_wait(struct ferry_mig *m, int timeout_ms);

/* ---- statistics ------------------------------------------------------------ */

/*
 * A snapshot, safe to take from any thread at any time (query-migrate).
 * Set info->size = sizeof(*info) before the call; fields past a smaller
 * size are not written. Bytes, pages and times as QEMU reports them.
 */
struct ferry_mig_info {
	size_t size;
	bool incoming;                   /* this describes the incoming side */
	enum ferry_mig_status status;
	enum ferry_switchover switchover;
	char error[FERRY_ERROR_MSG_MAX]; /* failed/cancelled: why; else "" */
	uint64_t total_time_ms;          /* start to now, or to the end */
	uint64_t setup_time_ms;
	uint64_t downtime_ns;            /* completed only */
	double phase_ms[FERRY_PHASE__MAX]; /* completed only */
	uint64_t expected_downtime_ms;   /* at the last pass */
	uint64_t bandwidth;              /* bytes/s over every channel, last pass */
	uint64_t pass;                   /* passes completed */
	unsigned throttle_pct;           /* auto-converge */
	double mbps;                     /* last pass; whole average once completed */
	uint64_t dirty_pages_rate;       /* pages/s at the last sync */
	uint64_t precopy_bytes;          /* every channel, before the switchover */
	uint64_t downtime_bytes;         /* every channel, during it */
	uint64_t multifd_bytes;          /* multifd channels only */
	/* RAM (struct ferry_ram_stats, flattened). */
	uint64_t ram_total, ram_transferred, ram_remaining, ram_duplicate;
	uint64_t ram_normal, ram_normal_bytes, ram_dirty_sync_count;
	/* Postcopy. Source: bytes sent after the switch, pages served on
	 * request. Destination: pages requested, the fault-to-placement
	 * latency (p50/p99/max, microseconds), the time threads spent
	 * blocked on missing pages, summed (ms). */
	uint64_t postcopy_bytes;
	uint64_t postcopy_time_ms;       /* switch to completion (or now) */
	uint64_t postcopy_requests;
	uint64_t postcopy_lat_p50_us, postcopy_lat_p99_us, postcopy_lat_max_us;
	uint64_t postcopy_blocktime_ms;
	uint64_t postcopy_faults;        /* destination: faults read */
	bool postcopy;                   /* this migration switched to postcopy */
	/* Devices that send state in buffers (save_complete_thread, e.g.
	 * VFIO-style devices). Source: bytes of their sections before the
	 * switchover and of their sections and buffers during it.
	 * Destination: bytes of buffers received, and load times. */
	uint64_t devstate_precopy_bytes, devstate_switchover_bytes;
	unsigned ndevices;
	struct ferry_mig_dev_info {
		char id[FERRY_IDSTR_MAX + 1];
		uint32_t instance;
		uint64_t precopy_bytes, switchover_bytes;
		double data_load_ms;     /* destination: in load_buffer */
		double config_load_ms;   /* destination: in load_config */
	} devices[16];
	/* Source, capability switchover-ack: the destination's ack came. */
	bool switchover_acked;
	/* TLS (parameter tls-creds): what the first connection negotiated,
	 * the peer's certificate subject, and how many connections of this
	 * migration run TLS, with the kernel doing the records (kTLS) in
	 * each direction. */
	bool tls;
	char tls_version[16], tls_cipher[64], tls_peer[256];
	unsigned tls_connections, tls_ktls_tx, tls_ktls_rx;
	/* Destination: connections turned away while it waited (failed TLS
	 * handshakes, plaintext/TLS mismatches, strangers), and why the last
	 * one was. They do not end the wait. */
	uint64_t refused;
	char refused_reason[FERRY_ERROR_MSG_MAX];
	/* Test only: the pause fault point this side waits at, or "". */
	char paused_at[32];
};

FERRY_API void ferry_mig_query(struct ferry_mig *m, struct ferry_mig_info *info);

/* ---- test hooks ------------------------------------------------------------ */

/*
 * Test only: arm one fault point (NULL or "" disarms). The point fires
 * once, in the next migration that reaches it. Points:
 *   "lose-eof"       source: stop talking just before EOF (a silent link)
 *   "lose-loaded"    destination: LOADED never leaves, then silence
 *   "lose-go"        source: act as if GO went out, but it never leaves
 *   "lose-ack"       destination: run, but the ack never leaves
 *   "hold-device"    source: wait in device (vCPUs stopped) until cancelled
 *   "stall-load"     destination: stop answering while loading
 *   "fail-package"   destination: fail loading the postcopy package
 *                    (before RUN: the source must resume)
 *   "postcopy-cut"   source: reset the main connection during postcopy
 *   "stall-postcopy" destination: its return path falls silent for
 *                    longer than peer-timeout during postcopy, then speaks
 *                    again (a stalled process)
 *   "lose-switchover-ack" destination: never send the switchover ack
 * Pauses: the side waits at the point (query-migrate "paused-at") until
 * "continue" is injected or the migration is cancelled, so a test can
 * strike exactly there:
 *   "pause-setup"     source: before any connection
 *   "pause-connected" source: connected and set up, before the first pass
 *   "pause-pass-1"    source: in the middle of the first pass
 *   "pause-pass-2"    source: in the middle of a later pass
 *   "pause-stopped"   source: VM stopped for the switchover, rest unsent
 *   "pause-eof"       source: the whole stream sent, no answer yet
 *   "pause-loaded"    destination: everything loaded, LOADED not sent
 *   "pause-run"       source: postcopy's RUN sent (the destination runs)
 * -EINVAL for an unknown point.
 */
FERRY_API int ferry_mig_inject_fault(struct ferry_mig *m, const char *point,
				     struct ferry_error *err);

#ifdef __cplusplus
}
#endif
#endif
