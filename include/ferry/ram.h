/*
 * ferry/ram.h - guest RAM as an iterable migration device (precopy).
 *
 * The VMM describes its RAM blocks and provides dirty tracking; libferry
 * does the rest: the block list in setup, dirty pages in rounds, zero pages
 * as markers, the final sync and the rest at switchover, and on the
 * destination, bounds-checked page placement.
 *
 * Wire format of the "ram" sections (docs/stream-format.md, "RAM"):
 *   START: be32 nblocks, then per block str8 name, be64 size, be32 page size;
 *          then be64 FERRY_RAM_EOS
 *   PART/END: records be64 (offset | flags) [str8 block unless CONTINUE]
 *          [page bytes if PAGE], ending with a record whose flags are EOS.
 *
 * Threads: ferry_ram_mark_dirty() may be called from any thread (VMM
 * threads writing guest memory behind the guest's back); everything else
 * runs in the migration thread (source) or the load thread (destination).
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
#define FERRY_RAM_FLAGS    0xfffull /* flags live below 4 KiB */

#define FERRY_RAM_MAX_BLOCKS 64

struct ferry_ram_block {
	const char *name;        /* unique, 1..255 bytes; copied */
	void *host;              /* the block's mapping in this process */
	uint64_t size;           /* bytes; a multiple of page_size */
	uint32_t page_size;      /* 4096 (a power of two >= 4096) */
};

/*
 * Dirty tracking, provided by the VMM (KVM dirty log, userfaultfd-wp, ...).
 * All callbacks run in the migration thread and return 0 or -errno.
 */
struct ferry_ram_dirty_ops {
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

/* Mark [offset, offset+len) of block @block dirty (VMM writes). Any thread. */
FERRY_API void ferry_ram_mark_dirty(struct ferry_ram *ram, unsigned block,
				    uint64_t offset, uint64_t len);

/* Snapshot of the counters (any thread; values may be slightly stale). */
FERRY_API void ferry_ram_get_stats(struct ferry_ram *ram,
				   struct ferry_ram_stats *st);

#ifdef __cplusplus
}
#endif
#endif
