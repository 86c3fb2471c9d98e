/*
 * ferry/ram.h - guest RAM as an iterable migration device (precopy).
 *
 * The VMM describes its RAM blocks and provides dirty tracking; libferry
 * does the rest: the block list in setup, dirty pages in rounds, zero pages
 * as markers, the final sync and the rest at switchover, and on the
 * destination, bounds-checked page placement.
 *
 * Wire format of the "ram" sections (docs/stream-format.md, "RAM"),
 * section version 2 (version 1 streams still load):
 *   START: be32 nblocks, then per block str8 name, be64 size, be32 page size;
 *          then optional records (v2): MULTIFD (session, channels,
 *          compression) and POPULATED (per block, the page ranges that hold
 *          data); then be64 FERRY_RAM_EOS
 *   PART/END: records be64 (offset | flags) [str8 block unless CONTINUE]
 *          [page bytes if PAGE], or a bare MULTIFD_FLUSH (v2), ending with a
 *          record whose flags are EOS.
 *
 * Multifd (ferry/multifd.h): with ferry_ram_set_multifd_send() the pages go
 * over the multifd channels instead of the sections; at each sync point (end
 * of a pass over the bitmaps, and at the start of END) the section gets a
 * MULTIFD_FLUSH record, and the destination's load waits there until every
 * channel has applied everything sent before it. The first PART after START
 * carries no pages (so START reaches the destination first), and the final
 * pass at switchover - vCPUs paused, normally a handful of pages - travels
 * in END itself, after its MULTIFD_FLUSH.
 *
 * Pre-population: the source sends which pages hold data; the destination
 * starts helper threads that fault those ranges in (MADV_POPULATE_WRITE)
 * ahead of the incoming pages, because page faults, not the link, limit a
 * receiver writing into fresh memory. Never-populated pages stay
 * uncommitted.
 *
 * Threads: ferry_ram_mark_dirty() may be called from any thread (VMM
 * threads writing guest memory behind the guest's back); everything else
 * runs in the migration thread (source) or the load thread (destination);
 * the prepopulate helpers are private threads of the destination.
 */
#ifndef FERRY_RAM_H
#define FERRY_RAM_H

#include <stdbool.h>
#include <stdint.h>

#include "ferry/common.h"
#include "ferry/migration.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Record flags in the low bits of the page-aligned offset. */
#define FERRY_RAM_ZERO     0x02ull  /* page is all zero; no data follows */
#define FERRY_RAM_PAGE     0x08ull  /* page data follows */
#define FERRY_RAM_EOS      0x10ull  /* end of this section's records */
#define FERRY_RAM_CONTINUE 0x20ull  /* same block as the previous record */
#define FERRY_RAM_MULTIFD_FLUSH 0x40ull /* PART/END: multifd sync point */
#define FERRY_RAM_MULTIFD  0x80ull  /* START: multifd session follows */
#define FERRY_RAM_POPULATED 0x100ull /* START: populated page ranges follow */
#define FERRY_RAM_FLAGS    0xfffull /* flags live below 4 KiB */

#define FERRY_RAM_MAX_BLOCKS 64
/* Cap on POPULATED ranges in one START section (all blocks together); a
 * source with more merges nearby ranges. */
#define FERRY_RAM_POPULATED_MAX_RANGES (1u << 20)
/* Default number of destination prepopulate threads. */
#define FERRY_RAM_PREPOPULATE_DEFAULT 2u

struct ferry_ram_block {
	const char *name;        /* unique, 1..255 bytes; copied */
	void *host;              /* the block's mapping in this process */
	uint64_t size;           /* bytes; a multiple of page_size */
	uint32_t page_size;      /* 4096 (a power of two >= 4096) */
};

/*
 * Dirty tracking, provided by the VMM (KVM dirty log, userfaultfd-wp, ...).
 * All callbacks run in the migration thread and return 0 or -errno. Copied
 * by ferry_ram_new; set .size = sizeof(struct ferry_ram_dirty_ops).
 */
struct ferry_ram_dirty_ops {
	size_t size;
	/* Start tracking every block; called once in save_setup. */
	int (*start)(void *opaque, struct ferry_error *err);
	/* OR the pages of @block dirtied since start or the previous sync into
	 * @bitmap (bit i = page i) and re-arm tracking for them. */
	int (*sync)(void *opaque, unsigned block, uint64_t *bitmap,
		    struct ferry_error *err);
	/* Stop tracking; idempotent. */
	void (*stop)(void *opaque);
	/* Optional: set the bits of pages that may hold data. Pages left clear
	 * were never touched (they read as zero) and are not sent at all. */
	int (*populated)(void *opaque, unsigned block, uint64_t *bitmap,
			 struct ferry_error *err);
	/* Optional: the switchover's sync, with the VM stopped - as sync, but
	 * nothing needs re-arming: no sync follows before stop or the next
	 * start. Where re-arming costs (write-protecting each page found,
	 * and the TLB flushes that takes) it is the cheaper call inside the
	 * downtime. NULL = sync. */
	int (*sync_final)(void *opaque, unsigned block, uint64_t *bitmap,
			  struct ferry_error *err);
};

/* Counters, in QEMU's query-migrate vocabulary. Pages are block pages. */
struct ferry_ram_stats {
	uint64_t total;            /* bytes of RAM */
	uint64_t transferred;      /* bytes written to the stream for RAM */
	uint64_t remaining;        /* dirty bytes not sent yet */
	uint64_t duplicate;        /* zero pages sent as markers */
	uint64_t skipped;          /* never-populated pages not sent at all */
	uint64_t normal;           /* pages sent with data */
	uint64_t normal_bytes;
	uint64_t dirty_sync_count;
	uint64_t dirty_pages_last_sync; /* pages found dirty by the last sync */
	uint64_t rounds;           /* completed passes over the bitmap */
	uint64_t multifd_syncs;    /* MULTIFD_FLUSH sync points */
	uint64_t prepopulated;     /* destination: bytes faulted in ahead */
	uint64_t last_sync_ns;     /* how long the last dirty sync took */
};

struct ferry_ram;

/*
 * Describe guest RAM. @ops may be NULL on a destination (or for a stopped
 * VM: then every page is sent once). Returns NULL on failure.
 */
FERRY_API struct ferry_ram *ferry_ram_new(const struct ferry_ram_block *blocks,
					  unsigned nblocks,
					  const struct ferry_ram_dirty_ops *ops,
					  void *opaque, struct ferry_error *err);
FERRY_API void ferry_ram_free(struct ferry_ram *ram);

/* Register as the iterable device "ram" instance 0 of @ctx. */
FERRY_API int ferry_ram_register(struct ferry_ram *ram, struct ferry_ctx *ctx,
				 struct ferry_error *err);

/* Mark [offset, offset+len) of block @block dirty (VMM writes). Any thread.
 * Call it after writing the memory: the mark is published with release
 * order, and the migration clears a page's bit before copying the page, so
 * a write is always either in the copy or marked again. */
FERRY_API void ferry_ram_mark_dirty(struct ferry_ram *ram, unsigned block,
				    uint64_t offset, uint64_t len);

struct ferry_multifd;

/*
 * Send pages over @m (source) / accept pages from @m (destination), which
 * must outlive the migration; NULL goes back to the main stream. Also gives
 * @m this RAM's block table. Call before ferry_save_begin / ferry_load, and
 * on the destination before adding channels.
 */
FERRY_API int ferry_ram_set_multifd_send(struct ferry_ram *ram,
					 struct ferry_multifd *m,
					 struct ferry_error *err);
FERRY_API int ferry_ram_set_multifd_recv(struct ferry_ram *ram,
					 struct ferry_multifd *m,
					 struct ferry_error *err);

/*
 * Pre-population, on by default (FERRY_RAM_PREPOPULATE_DEFAULT threads).
 * Source: 0 = do not send the populated ranges. Destination: number of
 * helper threads that fault in the announced ranges ahead of the data;
 * 0 = ignore the ranges. At most 8.
 */
FERRY_API void ferry_ram_set_prepopulate(struct ferry_ram *ram,
					 unsigned threads);

/* Snapshot of the counters. Call it from the thread that runs the save or
 * the load, or when none runs: the counters have that one writer, and with
 * multifd attached the figures come from the multifd object, which its
 * owner may free. A VMM that shows them elsewhere publishes a copy (the
 * reference VMM does, under its migration lock). */
FERRY_API void ferry_ram_get_stats(struct ferry_ram *ram,
				   struct ferry_ram_stats *st);

#ifdef __cplusplus
}
#endif
#endif
