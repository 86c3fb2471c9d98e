/*
 * devstate.h - the destination's device-state queues: one per device that
 * receives its final state in buffers (DEVSTATE records on the main stream,
 * or device-state packets on multifd channels), each drained in order by
 * the device's own load thread.
 *
 * Who calls what:
 *   - the load thread (ferry__load): new, declare (SWITCHOVER_START),
 *     push (main-stream buffers), drain (before a section of the device),
 *     expect (DEVSTATE_DONE), configs, finish, free;
 *   - any thread, concurrently: push (multifd channel threads, through
 *     ferry_load_devstate()), fail.
 * One mutex guards everything in a set; the load thread waits for "some
 * device is ready" on one condition variable, in one wait, whatever order
 * the devices finish in (devstate.c: who waits on which).
 */
#ifndef FERRY_DEVSTATE_H
#define FERRY_DEVSTATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "internal.h"

struct ferry__dsq;

/* Per-device figures, for query-migrate's devices list. */
struct ferry__dsq_stats {
	const struct ferry_dev *dev;
	uint64_t buffers, bytes;
	uint64_t data_ns;      /* inside load_buffer, summed */
	uint64_t config_ns;    /* inside load_config */
	uint64_t t_first, t_applied; /* CLOCK_MONOTONIC: first buffer queued,
					last data buffer applied */
};

/* Queues for every device of @ctx that has load_buffer. Caps per device:
 * @max_buffers buffers and @max_bytes bytes queued (0 = defaults). */
struct ferry__dsq *ferry__dsq_new(struct ferry_ctx *ctx, unsigned max_buffers,
				  size_t max_bytes, struct ferry_error *err);
/* Called once when the set fails (from the failing thread, with the set's
 * lock held: it must not call into the set), so the stream's reader stops
 * waiting for a source that waits for us. */
void ferry__dsq_on_fail(struct ferry__dsq *q, void (*fn)(void *arg), void *arg);

/* SWITCHOVER_START named @idstr/@instance: its final state follows in
 * buffers. Starts its load thread. */
int ferry__dsq_declare(struct ferry__dsq *q, const char *idstr,
		       uint32_t instance, struct ferry_error *err);

/*
 * Queue buffer @seq of a device (any order; the load thread applies them in
 * order). Blocks while the device's queue is over its caps, unless @seq is
 * the lowest index still missing: that one is always taken, so a full
 * queue of early arrivals can never wait for the buffer that unblocks it.
 * A duplicate, an index past the device's config buffer or past the count
 * DEVSTATE_DONE announced, or a config buffer for a device without
 * load_config fails the whole set, and so does, with @in_order (one ordered
 * stream), any index but the next. -ECANCELED once the set failed or closed.
 */
int ferry__dsq_push(struct ferry__dsq *q, const char *idstr, uint32_t instance,
		    uint32_t seq, bool config, bool in_order, const void *buf,
		    size_t len, struct ferry_error *err);

/* Wait until @dev's load thread has applied everything it can apply now
 * (its sections load after its queued data). -ECANCELED if the set failed. */
int ferry__dsq_drain(struct ferry__dsq *q, const struct ferry_dev *dev);

/* DEVSTATE_DONE: @dev sent @count buffers, all of which have arrived
 * (the caller synced the channels first): any index still missing fails. */
int ferry__dsq_expect(struct ferry__dsq *q, const char *idstr,
		      uint32_t instance, uint32_t count, struct ferry_error *err);

/*
 * Load config buffers on the calling thread (the load thread: the one that
 * may change the memory map), in the order the devices become ready. With
 * @wait, until every declared device has applied every buffer it announced;
 * without, only those ready now. Adds the time spent in load_config to
 * *@config_ns (may be NULL).
 */
int ferry__dsq_configs(struct ferry__dsq *q, bool wait, uint64_t *config_ns,
		       struct ferry_error *err);
/* Load end, nothing failed: every buffer queued was applied and every
 * config loaded? -EBADMSG naming the device otherwise (a stream that ended
 * without DEVSTATE_DONE, or buffers for a device that was never named). */
int ferry__dsq_check_done(struct ferry__dsq *q, struct ferry_error *err);

/* Fail the set from outside: every waiter returns -ECANCELED. */
void ferry__dsq_fail(struct ferry__dsq *q, int code, const char *why);

/* Close every queue, join every load thread; returns @r, or the set's
 * first error if it has one (the root cause of anything else failing). */
int ferry__dsq_finish(struct ferry__dsq *q, int r, struct ferry_error *err);

/* Figures of device @i (false past the last). Only after finish. */
bool ferry__dsq_stats(struct ferry__dsq *q, unsigned i,
		      struct ferry__dsq_stats *st);

void ferry__dsq_free(struct ferry__dsq *q);

#endif
