/*
 * ram-internal.h - the RAM device's private state, shared by ram.c
 * (precopy, both sides) and postcopy.c (postcopy, both sides).
 */
#ifndef FERRY_RAM_INTERNAL_H
#define FERRY_RAM_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "ferry/ram.h"
#include "internal.h"

#define PREPOP_MAX_THREADS 8u

struct ferry_pcd;

struct pop_range {
	unsigned block;
	uint64_t start, len;      /* bytes within the block */
};

/* Destination prepopulate helpers. */
struct prepop {
	pthread_t threads[PREPOP_MAX_THREADS];
	unsigned nthreads;        /* load thread: started helpers */
	pthread_mutex_t lock;     /* guards the cursor */
	size_t next_range;        /* lock */
	uint64_t next_off;        /* lock: offset inside next_range */
	bool stop;                /* atomic: load thread asks helpers to quit */
	int failed;               /* atomic: errno of a failed madvise (info) */
	struct pop_range *ranges; /* load thread fills, then read-only */
	size_t nranges, cap;
	uint64_t done;            /* atomic: bytes populated */
};

struct ram_block {
	char name[FERRY_IDSTR_MAX + 1];
	uint8_t *host;
	uint64_t size;
	uint32_t page_size;
	uint64_t npages;
	uint64_t *bitmap;     /* source: pages to send (atomic words) */
	uint64_t *recv_map;   /* destination: pages this load placed (atomic
				 words; multifd channels set them too): what
				 postcopy starts from, minus the discards */
	uint64_t *scratch;    /* source: sync/populated staging */
};

struct ferry_ram {
	struct ram_block blocks[FERRY_RAM_MAX_BLOCKS];
	unsigned nblocks;
	const struct ferry_ram_dirty_ops *ops; /* = &ops_copy, or NULL */
	struct ferry_ram_dirty_ops ops_copy;
	void *opaque;
	bool tracking;

	/* Migration thread only. */
	unsigned cur_block;   /* round cursor */
	uint64_t cur_page;
	bool round_done;      /* a walk reached the end since the last sync */
	unsigned last_sent_block; /* for CONTINUE; UINT32_MAX = none yet */
	unsigned load_sections;   /* destination: sections loaded */
	int last_load_block;      /* destination: block of the last record */
	uint32_t load_version;    /* destination: "ram" section version */

	/* Set before a migration starts, then read-only (mf_recv: or by the
	 * load thread, from the provider, when START announces multifd). */
	struct ferry_multifd *mf_send;
	struct ferry_multifd *mf_recv;
	struct ferry_multifd *(*mf_provider)(void *opaque,
					     const uint8_t session[16],
					     unsigned channels,
					     struct ferry_error *err);
	void *mf_provider_opaque;
	unsigned prepop_threads;  /* 0 = off (see ferry_ram_set_prepopulate) */

	/* Migration thread only: pages queued to multifd since its last sync,
	 * and whether an iterate call has run since setup. */
	bool mf_unsynced;
	bool iterated;

	/* Destination: prepopulate helpers (load thread starts and joins). */
	struct prepop pop;

	/* Postcopy, source (postcopy.c). */
	bool pc_mode;             /* migration thread: after the switch, an
				     iterate sends requested pages first and
				     never syncs the dirty log (VM stopped) */
	pthread_mutex_t req_lock;
	struct pc_req *reqs;      /* req_lock: pages asked for, not yet sent */
	size_t nreqs, reqs_cap;   /* req_lock */
	uint64_t pc_hint;         /* atomic: where the last request was, for
				     locality: (block << 48 | page) + 1; 0 none */
	uint64_t pc_served;       /* atomic: requested pages sent */
	/* Postcopy, destination: attached by the load thread at LISTEN,
	 * detached at the end; ram.c places pages through it then. */
	struct ferry_pcd *pcd;
	/* Listen thread: background pages staged in a run of consecutive
	 * pages of one block, placed with one UFFDIO_COPY (FERRY_PC_RUN_PAGES
	 * pages of the one page size postcopy allows). */
	uint8_t *pc_page;
	unsigned pc_run_block, pc_run_n;
	uint64_t pc_run_off;
	bool pc_advised;          /* atomic: ADVISE came (prepopulate helpers
				     take smaller steps) */

	/* Counters: written by the migration thread, read by anyone. */
	uint64_t dirty_pages; /* bits set across all bitmaps (approximate) */
	uint64_t dirty_bytes; /* the same in bytes: blocks differ in page size */
	struct ferry_ram_stats st;
};

struct pc_req {
	unsigned block;
	uint64_t page, npages;
};

#define WORD_BITS 64u

/* The next run of set bits of atomic bitmap @bm (@n bits) at or after
 * @from, a word at a time; false when there is none. */
bool ferry__next_run(const uint64_t *bm, uint64_t n, uint64_t from,
		     uint64_t *start, uint64_t *len);

static inline uint64_t words_for(uint64_t npages)
{
	return (npages + WORD_BITS - 1) / WORD_BITS;
}

/* ram.c: stop and join the prepopulate helpers (load thread). */
void ferry__ram_prepop_stop(struct ferry_ram *ram);

/* ---- postcopy.c: the source's half ------------------------------------ */

/* After the final sync, VM stopped: a DISCARD payload per run of up to
 * FERRY_PC_DISCARD_CHUNK ranges, for every page still to send, passed to
 * @emit. */
int ferry__ram_pc_discard(struct ferry_ram *ram,
			  int (*emit)(void *arg, const void *payload, size_t len,
				      struct ferry_error *err),
			  void *arg, struct ferry_error *err);
/* Switch the RAM device to postcopy (migration thread). */
void ferry__ram_pc_enter(struct ferry_ram *ram);
/* Queue a page request (any thread). */
int ferry__ram_pc_request(struct ferry_ram *ram, const char *block,
			  uint64_t start, uint64_t len, struct ferry_error *err);
/* Write requested pages at the front of a postcopy section (migration
 * thread); returns bytes written. */
uint64_t ferry__ram_pc_send_requests(struct ferry_ram *ram, struct ferry_chan *c);
/* Follow the locality hint (migration thread). */
void ferry__ram_pc_follow_hint(struct ferry_ram *ram);
/* Requests queued (any thread). */
size_t ferry__ram_pc_requests(struct ferry_ram *ram);
/* Nothing left to send and nothing asked for. */
bool ferry__ram_pc_idle(struct ferry_ram *ram);
/* Send the pages of one request as PAGE records on @io (the preempt
 * channel), now (the return-path reader's thread). */
int ferry__ram_pc_send_preempt(struct ferry_ram *ram, struct ferry_record_io *io,
			       const char *block, uint64_t start, uint64_t len,
			       struct ferry_error *err);
/* Recovery: mark every page of @block that the destination has not
 * received to be sent again (the return-path reader, while the migration
 * thread waits for it). */
int ferry__ram_pc_resend(struct ferry_ram *ram, const char *block,
			 uint64_t pages, const uint8_t *received,
			 struct ferry_error *err);
/* Recovery: the background starts over from the first page (migration
 * thread). */
void ferry__ram_pc_rewind(struct ferry_ram *ram);
/* One page record as ram.c writes them (header, block name unless
 * continuing, data unless zero); returns bytes written. */
uint64_t ferry__ram_send_page(struct ferry_ram *ram, struct ferry_chan *c,
			      unsigned bi, uint64_t page);

#endif
