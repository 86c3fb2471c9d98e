/*
 * postcopy.h - postcopy's RAM side on the destination (lib/postcopy.c),
 * for the engine (engine-in.c) and the load (load.c). Not installed.
 *
 * The destination's postcopy state (struct ferry_pcd, "pcd"):
 *
 *   NONE --ADVISE--> ADVISE --LISTEN--> LISTENING --RUN--> RUNNING --END--> END
 *
 *   NONE -> ADVISE        load thread, POSTCOPY_ADVISE (the pcd is created)
 *   ADVISE -> LISTENING   load thread, POSTCOPY_LISTEN (RAM registered with
 *                         userfaultfd, the fault thread started)
 *   LISTENING -> RUNNING  load thread, POSTCOPY_RUN inside the package
 *   RUNNING -> END        listen thread, POSTCOPY_END (every page placed)
 *
 * The state is one atomic word moved only by compare-and-swap: the load
 * thread, the listen thread and the fault thread all read it. A command in
 * the wrong state fails the load with an error naming both states. Every
 * transition is traced through the callback given at creation.
 */
#ifndef FERRY_POSTCOPY_H
#define FERRY_POSTCOPY_H

#include <stdbool.h>
#include <sched.h>
#include <stdint.h>

#include "ferry/ram.h"

enum ferry_pc_state {
	FERRY_PC_NONE,
	FERRY_PC_ADVISE,
	FERRY_PC_LISTENING,
	FERRY_PC_RUNNING,
	FERRY_PC_END,
	FERRY_PC__MAX
};

const char *ferry_pc_state_name(enum ferry_pc_state s);

struct ferry_pcd;

/* Where the fault thread sends page requests: (block name, byte offset,
 * bytes). Called from the fault thread; must not block for long. A failure
 * (the link is down) is remembered: the request is sent again by
 * ferry__pcd_rerequest after recovery. */
typedef int (*ferry_pcd_request_fn)(void *opaque, const char *block,
				    uint64_t start, uint32_t len);
typedef void (*ferry_pcd_trace_fn)(void *opaque, const char *line);

/* Destination statistics (query-migrate). */
struct ferry_pcd_stats {
	enum ferry_pc_state state;
	uint64_t requests;        /* pages requested */
	uint64_t faults;          /* page faults read */
	uint64_t placed;          /* pages placed in postcopy */
	uint64_t duplicates;      /* pages that came twice (placed once) */
	uint64_t blocktime_ns;    /* sum over faults of fault-to-placement */
	uint64_t lat_p50_ns, lat_p99_ns, lat_max_ns;
	uint64_t lat_samples;
};

/* POSTCOPY_ADVISE: check page sizes against @ram and create the state
 * (ADVISE). NULL with @err on failure. */
struct ferry_pcd *ferry__pcd_new(struct ferry_ram *ram, uint64_t host_page,
				 uint64_t target_page, ferry_pcd_trace_fn trace,
				 void *trace_opaque, struct ferry_error *err);
/* Stop the fault thread, unregister, free. Only once every page is placed
 * (state END) or before LISTEN: closing the userfaultfd earlier would let
 * a waiting thread fault in a zero page where guest data belongs. The
 * engine keeps a pcd alive for as long as that is not so. */
void ferry__pcd_free(struct ferry_pcd *pcd);

enum ferry_pc_state ferry__pcd_state(const struct ferry_pcd *pcd);
/* Compare-and-swap @from -> @to; -EPROTO naming both states if the state
 * is not @from. */
int ferry__pcd_move(struct ferry_pcd *pcd, enum ferry_pc_state from,
		    enum ferry_pc_state to, const char *cmd,
		    struct ferry_error *err);

/* POSTCOPY_DISCARD (state ADVISE): drop @n ranges (be64 start, be64 len,
 * bytes; page aligned, non-empty, inside the block, ascending and
 * disjoint) of block @block so they fault. */
int ferry__pcd_discard(struct ferry_pcd *pcd, const char *block, uint32_t n,
		       const uint8_t *ranges, struct ferry_error *err);

/* Free the pages the discards moved away (after RUN, off the downtime;
 * also done by ferry__pcd_free). Load thread. */
void ferry__pcd_release_dropped(struct ferry_pcd *pcd);

/* At POSTCOPY_ADVISE, off the downtime: open the userfaultfd and start the
 * fault thread (a job on @ctx's pool), which forwards faults through @req
 * once LISTEN registered RAM. Done by ferry__pcd_listen if not yet. Load
 * thread. */
int ferry__pcd_prepare(struct ferry_pcd *pcd, struct ferry_ctx *ctx,
		       ferry_pcd_request_fn req, void *req_opaque,
		       struct ferry_error *err);

/* POSTCOPY_LISTEN (ADVISE -> LISTENING): what is present now is what was
 * received; register RAM for missing-page faults (the fault thread starts
 * here unless ferry__pcd_prepare started it), and place every later page
 * through ferry__pcd_place. */
int ferry__pcd_listen(struct ferry_pcd *pcd, struct ferry_ctx *ctx,
		      ferry_pcd_request_fn req, void *req_opaque,
		      struct ferry_error *err);

/* Place one page received in postcopy (the listen thread, the preempt
 * reader; @off checked by the caller). @data NULL = a zero page. Placed
 * once whoever comes first; the second copy is dropped. */
int ferry__pcd_place(struct ferry_pcd *pcd, unsigned block, uint64_t off,
		     const void *data, struct ferry_error *err);

/* Background pages are placed in runs of up to this many: one UFFDIO_COPY
 * costs 2.3 us per page alone here, 0.7 us per page in runs of 64. */
#define FERRY_PC_RUN_PAGES 64u

/* Place @n consecutive pages from @off (@data: n pages) the same way: each
 * page once, whoever comes first; the pages another thread placed first
 * are skipped, the rest go in with one UFFDIO_COPY per stretch. */
int ferry__pcd_place_run(struct ferry_pcd *pcd, unsigned block, uint64_t off,
			 unsigned n, const void *data, struct ferry_error *err);

/* A PAGE record from the preempt channel: check it, place its page. */
int ferry__pcd_page_record(struct ferry_pcd *pcd, const uint8_t *body,
			   size_t len, struct ferry_error *err);

/* Unregister RAM from userfaultfd (state END): pages still missing are
 * the source's never-written ones and fault in as zero from now on. */
void ferry__pcd_finish(struct ferry_pcd *pcd);

/* Recovery: bytes of the received bitmap of block @bi, (pages + 7) / 8,
 * into @out (malloc'd, caller frees); page count in *pages. */
int ferry__pcd_received(struct ferry_pcd *pcd, unsigned bi, uint8_t **out,
			uint64_t *pages, struct ferry_error *err);
/* The name of RAM block @bi into @buf; -ENOENT past the last. */
int ferry__pcd_block_name(struct ferry_pcd *pcd, unsigned bi, char *buf,
			  size_t len);
/* Recovery: forget which requests went out and ask again for every page a
 * thread is waiting for. */
void ferry__pcd_rerequest(struct ferry_pcd *pcd);

void ferry__pcd_get_stats(struct ferry_pcd *pcd, struct ferry_pcd_stats *st);

/* How a thread was scheduled before ferry__pc_sched_raise changed it. */
struct ferry__pc_sched {
	bool raised;              /* changed, to be put back */
	bool tried;               /* raise ran (raised or not allowed) */
	int policy, nice;         /* before (policy with its reset-on-fork
				     flag, as sched_getscheduler says) */
	struct sched_param param; /* before */
};

/* Raise the calling thread's scheduling priority (best effort; needs
 * CAP_SYS_NICE or RLIMIT_RTPRIO/RLIMIT_NICE, without which nothing
 * changes). @realtime asks for SCHED_FIFO (the switch windows: a few ms
 * of blocking waits and bounded work), falling back to nice -10; else nice
 * -10 (the threads on a page request's path, for the whole of postcopy).
 * Threads the raised one creates do not inherit it (SCHED_RESET_ON_FORK).
 * @was (may be NULL for a thread that ends raised) records what to put
 * back with ferry__pc_sched_restore. Idempotent while raised. */
void ferry__pc_sched_raise(struct ferry__pc_sched *was, bool realtime);
void ferry__pc_sched_restore(struct ferry__pc_sched *was);

/* The bare userfaultfd round trip of this machine (bench): a thread faults
 * on a missing page, another reads the fault and places it. Average ns
 * over @n faults; -errno if userfaultfd is unavailable. */
int64_t ferry_pc_bare_roundtrip_ns(unsigned n);

#endif
