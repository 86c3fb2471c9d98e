/*
 * ferry/migration.h - the migration context, device registry, hooks, and the
 * save and load loops that drive them.
 *
 * Everything hangs off a struct ferry_ctx; there is no global state, so two
 * migrations (or a source and a destination) can live in one process.
 *
 * A device or subsystem registers either
 *   - a vmstate description (non-iterable state, one FULL section), or
 *   - a struct ferry_dev_ops (iterable state such as RAM, or state with its
 *     own encoding), with an opaque pointer passed back to every hook.
 *
 * The save side emits, in order (see docs/stream-format.md):
 *   header; START section per iterable device (save_setup);
 *   rounds of PART sections (save_iterate) while data remains;
 *   at switchover, with vCPUs paused: END sections (save_complete) while
 *   save_complete_thread hooks run in their own threads and send DEVSTATE
 *   buffers; FULL sections for non-iterable devices (save_state / vmstate);
 *   a VMDESC record (JSON description); EOF.
 *
 * Hook return convention, all hooks: 0 on success, -errno on failure with
 * @err filled (err may be NULL). A failing save hook fails the migration,
 * never the source VM: the VMM keeps running. A failing load hook fails the
 * load; the destination must not run the VM.
 *
 * Buffer ownership: channels passed to hooks belong to the library and are
 * valid only during the call. Buffers passed to load_buffer belong to the
 * library and are valid only during the call; buffers given to
 * ferry_devstate_send() are copied before it returns.
 */
#ifndef FERRY_MIGRATION_H
#define FERRY_MIGRATION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ferry/channel.h"
#include "ferry/common.h"
#include "ferry/stream.h"
#include "ferry/vmstate.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ferry_ctx;
struct ferry_devstate_sink;

struct ferry_dev_ops {
	/* sizeof(struct ferry_dev_ops) as the caller compiled it: the library
	 * copies the ops at registration and treats hooks past .size as NULL,
	 * so hooks can be added without breaking older callers. */
	size_t size;

	/* ---- save side (source) ---- */

	/* Thread: migration thread. Phase: setup, vCPUs running.
	 * Write the START section payload (e.g. the RAM block list) and start
	 * dirty tracking. Only called for iterable devices (save_iterate set). */
	int (*save_setup)(struct ferry_chan *c, void *opaque,
			  struct ferry_error *err);
	/* Thread: migration thread. Phase: precopy, vCPUs running (or paused
	 * at switchover). Report bytes still to send: those that must go
	 * before the destination runs, and those postcopy could fetch later.
	 * @exact asks for a precise figure (e.g. after a dirty-log sync).
	 * Cannot fail. */
	void (*save_pending)(void *opaque, bool exact, uint64_t *must_precopy,
			     uint64_t *can_postcopy);
	/* Thread: migration thread. Phase: precopy, vCPUs running.
	 * Write one PART section: send some of the pending data, at most about
	 * @budget bytes (0 = no limit), and return. Returns 0 or -errno. */
	int (*save_iterate)(struct ferry_chan *c, void *opaque, uint64_t budget,
			    struct ferry_error *err);
	/* Thread: migration thread. Phase: switchover, vCPUs paused.
	 * Write the END section: everything that remains. */
	int (*save_complete)(struct ferry_chan *c, void *opaque,
			     struct ferry_error *err);
	/* Thread: its own thread, started at switchover, vCPUs paused; runs
	 * concurrently with save_complete of other devices and with the FULL
	 * sections. Sends device state as buffers with ferry_devstate_send();
	 * the destination gets them, in order, through load_buffer. */
	int (*save_complete_thread)(struct ferry_devstate_sink *sink,
				    void *opaque, struct ferry_error *err);
	/* Thread: migration thread. Phase: switchover, vCPUs paused.
	 * Non-iterable devices: write the FULL section payload. */
	int (*save_state)(struct ferry_chan *c, void *opaque,
			  struct ferry_error *err);
	/* Thread: migration thread. Phase: after completion or failure.
	 * Undo save_setup (stop dirty tracking, free buffers). Idempotent and
	 * safe when save_setup never ran. */
	void (*save_cleanup)(void *opaque);

	/* ---- load side (destination) ---- */

	/* Thread: load thread. Phase: before the first record is read. */
	int (*load_setup)(void *opaque, struct ferry_error *err);
	/* Thread: load thread. Phase: incoming, VM not running.
	 * Load one section payload (START, PART, END or FULL) of stream
	 * version @version from @c. Must consume exactly the payload; leftover
	 * bytes fail the load. */
	int (*load_state)(struct ferry_chan *c, void *opaque, uint32_t version,
			  struct ferry_error *err);
	/* Thread: the device's own load thread (never the main load thread).
	 * Phase: incoming. One DEVSTATE buffer, in the order sent. */
	int (*load_buffer)(void *opaque, const void *buf, size_t len,
			   struct ferry_error *err);
	/* Thread: load thread. Phase: when SWITCHOVER_START arrives (the
	 * source is about to send the final state). */
	int (*switchover_start)(void *opaque, struct ferry_error *err);
	/* Thread: load thread. Phase: after the load, success or failure.
	 * Idempotent and safe when load_setup never ran. */
	void (*load_cleanup)(void *opaque);

	/* Thread: the load thread, the one that may change the memory map
	 * (never a device load thread). Phase: incoming, after every buffer
	 * the device sent before it was applied by load_buffer. The device's
	 * config state: the buffer its save_complete_thread sent with
	 * ferry_devstate_send_config(). @buf belongs to the library. */
	int (*load_config)(void *opaque, const void *buf, size_t len,
			   struct ferry_error *err);
	/* Thread: load thread. Phase: load setup, when the source uses
	 * capability switchover-ack. Return true if the source must not stop
	 * the VM before this device approves (ferry_load_switchover_ack),
	 * typically once it has loaded its initial precopy data. */
	bool (*switchover_ack_needed)(void *opaque);
};

/* ---- context and registry --------------------------------------------- */

FERRY_API struct ferry_ctx *ferry_ctx_new(struct ferry_error *err);
/* Frees the context; registered devices are forgotten, not freed. */
FERRY_API void ferry_ctx_free(struct ferry_ctx *ctx);

/*
 * Register a device. (@idstr, @instance) must be unique. @version is the
 * version written; loads accept [@min_version, @version]. @ops is copied
 * (its .size must be set). A device with save_iterate is iterable;
 * otherwise it needs save_state and load_state.
 */
FERRY_API int ferry_register(struct ferry_ctx *ctx, const char *idstr,
			     uint32_t instance, uint32_t version,
			     uint32_t min_version,
			     const struct ferry_dev_ops *ops, void *opaque,
			     struct ferry_error *err);
/* Register non-iterable state described by @vmsd at @obj; the idstr is
 * vmsd->name. @vmsd and @obj must outlive the registration. */
FERRY_API int ferry_register_vmstate(struct ferry_ctx *ctx,
				     const struct ferry_vmsd *vmsd,
				     uint32_t instance, void *obj,
				     struct ferry_error *err);
FERRY_API int ferry_unregister(struct ferry_ctx *ctx, const char *idstr,
			       uint32_t instance);

/*
 * JSON (malloc'd string, caller frees) describing every registered device,
 * with the full vmstate schema of vmstate devices. Stable key order, so two
 * builds can be diffed. NULL on ENOMEM.
 */
FERRY_API char *ferry_ctx_describe_json(struct ferry_ctx *ctx, bool pretty);

/* ---- device state over parallel channels ------------------------------ */

/* Callable only from the device's own save_complete_thread (one thread
 * per sink: the buffers of a device are numbered in the order sent, and
 * the destination relies on that order). @buf is copied or written before
 * return. The buffers go on the main stream or on the
 * multifd channels (parameter device-state-channel); the destination gets
 * them in order, in load_buffer. Returns 0 or -errno. */
FERRY_API int ferry_devstate_send(struct ferry_devstate_sink *sink,
				  const void *buf, size_t len,
				  struct ferry_error *err);
/* The same for the device's config state, its last buffer: the destination
 * loads it with load_config, on its load thread, after all the device's
 * data. Nothing may be sent after it. */
FERRY_API int ferry_devstate_send_config(struct ferry_devstate_sink *sink,
					 const void *buf, size_t len,
					 struct ferry_error *err);

/* ---- saving ----------------------------------------------------------- */

struct ferry_save;  /* one outgoing migration */

/*
 * Start saving to @out (not owned; must outlive the save). Writes the header
 * and the START sections (save_setup hooks). Thread: migration thread.
 */
FERRY_API struct ferry_save *ferry_save_begin(struct ferry_ctx *ctx,
					      struct ferry_chan *out,
					      struct ferry_error *err);
/*
 * The same in two steps, so commands can precede the setup sections (the
 * return path must be open before the destination checks them):
 * ferry_save_new() writes the header only, ferry_save_setup() the START
 * sections. On failure of either, call ferry_save_end().
 */
FERRY_API struct ferry_save *ferry_save_new(struct ferry_ctx *ctx,
					    struct ferry_chan *out,
					    struct ferry_error *err);
FERRY_API int ferry_save_setup(struct ferry_save *s, struct ferry_error *err);
/* Sum of save_pending over iterable devices. */
FERRY_API void ferry_save_pending(struct ferry_save *s, bool exact,
				  uint64_t *must_precopy,
				  uint64_t *can_postcopy);
/* One precopy round: a PART section per iterable device with data pending,
 * each given @budget bytes (0 = unlimited). */
FERRY_API int ferry_save_round(struct ferry_save *s, uint64_t budget,
			       struct ferry_error *err);
/* Send a command record (payload already encoded per enum ferry_cmd). */
FERRY_API int ferry_save_command(struct ferry_save *s, uint16_t cmd,
				 const void *payload, size_t len,
				 struct ferry_error *err);
/*
 * Switchover, vCPUs must be paused by the caller: END sections, complete-
 * in-thread hooks, FULL sections, VMDESC, EOF, flush.
 */
FERRY_API int ferry_save_complete(struct ferry_save *s,
				  struct ferry_error *err);
/* Timestamps (CLOCK_MONOTONIC, ns; 0 = not reached) and a digest of the
 * device state sent, for downtime accounting and end-to-end proof. Set
 * .size = sizeof(struct ferry_save_stats); fields past it are not written. */
struct ferry_save_stats {
	size_t size;
	uint64_t t_final_sync;    /* switchover: first exact pending done */
	uint64_t t_iterable_done; /* END sections written */
	uint64_t t_done;          /* EOF written and flushed */
	/* XXH3-64 over every FULL section (idstr, be32 instance, payload) in
	 * stream order; the destination computes the same over what it
	 * loaded (ferry_load_stats.device_digest). */
	uint64_t device_digest;
	uint64_t bytes;           /* stream bytes written so far */
};
FERRY_API void ferry_save_get_stats(struct ferry_save *s,
				    struct ferry_save_stats *st);

/* Run save_cleanup hooks and free. Safe at any point; NULL is a no-op. */
FERRY_API void ferry_save_end(struct ferry_save *s);

/* Stop-and-copy in one call: begin, rounds until nothing is pending (at
 * most @max_rounds, 0 = 64), complete, end. For saving a paused VM. */
FERRY_API int ferry_save_all(struct ferry_ctx *ctx, struct ferry_chan *out,
			     unsigned max_rounds, struct ferry_error *err);

/* ---- loading ---------------------------------------------------------- */

/* A decoded command, as delivered to ferry_load_opts.on_command. */
struct ferry_cmd_msg {
	uint16_t cmd;
	union {
		uint32_t ping;
		uint32_t peer_timeout_ms;  /* OPEN_RETURN_PATH (0 = v1, none) */
		uint32_t status;           /* POSTCOPY_END */
		uint32_t agree;            /* AGREE: FERRY_AGREE_* flags */
		uint32_t devstate_flags;   /* SWITCHOVER_START, DEVSTATE_DONE:
					      with FERRY_DEVSTATE_MULTIFD the
					      handler must sync the channels
					      (ferry_multifd_recv_sync) */
		uint64_t run_digest;       /* POSTCOPY_RUN: the source's device
					      digest (0: not sent); checked by
					      the library before on_command */
		struct { uint64_t host_page_size, target_page_size; } advise;
		struct {
			char block[FERRY_IDSTR_MAX + 1];
			uint32_t n;
			const uint8_t *ranges; /* n x (be64 start, be64 len) */
		} discard;
	} u;
};

/* Filled by ferry_load when ferry_load_opts.stats is set. Fields may be
 * added at the end: set .size = sizeof(struct ferry_load_stats). */
struct ferry_load_stats {
	size_t size;
	uint64_t t_first_full;    /* CLOCK_MONOTONIC ns: first FULL record read */
	uint64_t t_eof;           /* EOF record read, everything loaded */
	uint64_t device_load_ns;  /* time inside FULL sections' load hooks */
	uint64_t device_digest;   /* see ferry_save_stats.device_digest */
	uint64_t bytes;           /* stream bytes read */
	/* Device state in buffers (save_complete_thread / load_buffer). */
	uint64_t devstate_bytes;     /* buffers received, every device */
	uint64_t devstate_wait_ns;   /* the load waited for load threads to
					apply data the stream had finished */
	uint64_t devstate_config_ns; /* inside load_config hooks */
};

/* One device's buffers, as delivered to ferry_load_opts.device_stats. */
struct ferry_load_dev_stats {
	const char *idstr;
	uint32_t instance;
	uint64_t buffers, bytes;
	uint64_t data_ns;         /* inside load_buffer, summed */
	uint64_t config_ns;       /* inside load_config */
};

struct ferry_load_opts {
	size_t size;              /* sizeof(struct ferry_load_opts) */
	/* Cap on one record body (0 = FERRY_RECORD_MAX_DEFAULT). */
	uint32_t max_record;
	/* Called in the load thread for every command except PACKAGED and
	 * HEARTBEAT (handled by the library; SWITCHOVER_START, DEVSTATE_DONE
	 * and AGREE are handled by it too, and passed on); after
	 * POSTCOPY_LISTEN, PING and POSTCOPY_END come from the listen thread
	 * while the load thread loads the package (so it must be
	 * thread-safe then). May be
	 * NULL: then OPEN_RETURN_PATH and PING are accepted and ignored, and
	 * postcopy commands fail the load ("postcopy not enabled"). */
	int (*on_command)(void *opaque, const struct ferry_cmd_msg *cmd,
			  struct ferry_error *err);
	void *opaque;
	/* Optional: receives timing and the device-state digest. */
	struct ferry_load_stats *stats;
	/* Optional, around the non-iterable load (thread: the load thread).
	 * begin: before the first FULL section is loaded. end: after EOF (or
	 * on failure, with @result set), once every device load thread has
	 * finished; its time counts as device load. Either failing fails the
	 * load. end is called once for each begin. */
	int (*device_load_begin)(void *opaque, struct ferry_error *err);
	int (*device_load_end)(void *opaque, int result,
			       struct ferry_error *err);
	/* Per device taking buffers: at most this many buffers and bytes
	 * queued before the reader waits for the device's load thread
	 * (0 = 64 buffers, 64 MiB). */
	uint32_t max_queued_buffers;
	uint64_t max_queued_bytes;
	/* Load config buffers only after every iterable section has ended;
	 * otherwise each as soon as its device's data is in. */
	bool load_config_after_iter;
	/* Capability switchover-ack (the source's AGREE command): called
	 * once every device whose switchover_ack_needed said so has called
	 * ferry_load_switchover_ack() (at once if none). Thread: whichever
	 * approved last, or the load thread. */
	void (*switchover_ack)(void *opaque);
	/* At the end of the load, for every device that received buffers.
	 * Thread: the load thread. */
	void (*device_stats)(void *opaque, const struct ferry_load_dev_stats *st);
};

/*
 * Load a whole stream from @in until EOF: header, records, commands, device
 * state buffers (into per-device load threads), then load_cleanup hooks.
 * Every record is verified before any byte reaches a device; errors name the
 * stream offset and the section. Thread: the caller's (the load thread).
 */
FERRY_API int ferry_load(struct ferry_ctx *ctx, struct ferry_chan *in,
			 const struct ferry_load_opts *opts,
			 struct ferry_error *err);

/*
 * Destination, any thread: buffer @seq of device @idstr/@instance, received
 * out of band (a multifd channel, ferry_multifd_params.devstate_seq), for
 * the load running on @ctx. Buffers may come in any order, from several
 * threads at once; the device's load thread applies them in order. Blocks
 * while the device's queue is full (max_queued_buffers / bytes). @config:
 * the device's config state (its last buffer). Returns 0, -ECANCELED if no
 * load runs or it failed, or the error that fails the load (a duplicate or
 * impossible index).
 */
FERRY_API int ferry_load_devstate(struct ferry_ctx *ctx, const char *idstr,
				  uint32_t instance, uint32_t seq, bool config,
				  const void *buf, size_t len,
				  struct ferry_error *err);

/*
 * Destination, any thread (typically the device's load_state hook):
 * @idstr/@instance, a device whose switchover_ack_needed returned true, has
 * what it needs before the switchover (capability switchover-ack).
 * Idempotent. -ENOENT when no load runs or the device did not ask.
 */
FERRY_API int ferry_load_switchover_ack(struct ferry_ctx *ctx,
					const char *idstr, uint32_t instance);

/* ---- return path -------------------------------------------------------- */

/* SHUT and LOADED values (be64 each), in this order; readers ignore extra
 * values and treat missing ones as 0. */
enum ferry_rp_shut_value {
	FERRY_SHUT_T_EOF,         /* dest CLOCK_MONOTONIC ns: EOF read */
	FERRY_SHUT_T_RESUMED,     /* dest CLOCK_MONOTONIC ns: vCPUs running, or
				     ready to run if kept paused */
	FERRY_SHUT_DEVICE_LOAD_NS,/* time in device-state load hooks, and in
				     the VMM's device_load_end */
	FERRY_SHUT_DEVICE_DIGEST, /* ferry_load_stats.device_digest */
	FERRY_SHUT_T_RESUMED_REAL,/* dest CLOCK_REALTIME ns of T_RESUMED */
	FERRY_SHUT_BOOT_ID,       /* XXH3-64 of the dest's kernel boot id: equal
				     on one host, where monotonic clocks agree */
	FERRY_SHUT_T_LOADED,      /* dest CLOCK_MONOTONIC ns: LOADED sent */
	FERRY_SHUT_T_GO,          /* dest CLOCK_MONOTONIC ns: GO read */
	FERRY_SHUT_DEVSTATE_WAIT_NS,  /* ferry_load_stats.devstate_wait_ns */
	FERRY_SHUT_DEVSTATE_CONFIG_NS,/* ferry_load_stats.devstate_config_ns */
	FERRY_SHUT__MAX
};

/* A decoded return-path message. */
struct ferry_rp_msg {
	uint16_t type;                       /* enum ferry_rp */
	uint32_t status;                     /* SHUT: 0 or an errno value */
	char reason[256];                    /* SHUT */
	uint64_t values[FERRY_SHUT__MAX];    /* SHUT, LOADED */
	uint32_t pong;                       /* PONG */
	uint32_t peer_timeout_ms;            /* HEARTBEAT */
	char block[FERRY_IDSTR_MAX + 1];     /* REQ_PAGES */
	uint64_t start;                      /* REQ_PAGES */
	uint32_t len;                        /* REQ_PAGES */
	/* RECV_BITMAP: block, and the page count in start; its bits are
	 * the engine's (ferry_rp_recv checks them, ferry_rp_send cannot
	 * make one). */
};

/* Write one RETURN record on @io (the destination's return channel; flushes).
 * Not thread-safe: one writer thread, or the caller's lock. */
FERRY_API int ferry_rp_send(struct ferry_record_io *io,
			    const struct ferry_rp_msg *m,
			    struct ferry_error *err);
/* Read and validate the next RETURN record (any other record type, or a
 * malformed payload, is -EBADMSG). Blocks until one arrives. */
FERRY_API int ferry_rp_recv(struct ferry_record_io *io, struct ferry_rp_msg *m,
			    struct ferry_error *err);

#ifdef __cplusplus
}
#endif
#endif
