/* SPDX-License-Identifier: MIT */
/*
 * vmm/threads/dirty-uffd.h - kernel dirty tracking of host memory, without KVM.
 *
 * For the thread backend (and any host memory), using userfaultfd
 * write-protection in asynchronous mode (UFFD_FEATURE_WP_ASYNC, Linux 6.7)
 * together with the PAGEMAP_SCAN ioctl on /proc/self/pagemap:
 *
 *   start: register the range for uffd-wp and write-protect all of it.
 *          Pages never touched get PTE markers, so their first write is
 *          seen too.
 *   write: the first write to a protected page takes a fault that the
 *          kernel resolves by itself (async mode: no fault handler thread,
 *          no message): it clears the page's uffd-wp bit.  Later writes to
 *          the page run at full speed.
 *   sync:  PAGEMAP_SCAN lists the pages whose bit is clear ("written") and
 *          write-protects them again in the same walk, under the page table
 *          lock, so a write racing with the sync lands either in this sync
 *          or in the next one, never in neither.
 *
 * Works for private anonymous memory and for shared memory (memfd, shmem,
 * MAP_SHARED|MAP_ANONYMOUS).  Soft-dirty bits would be the other option
 * but need CONFIG_MEM_SOFT_DIRTY, which many kernels (this one) lack.
 *
 * Threads: one handle is used by one thread at a time (the migration
 * thread); any threads may write the memory meanwhile. A sync of 1 GiB or
 * more walks the second half on a helper thread of its own, joined before
 * it returns.
 *
 * The registration lives as long as the handle: the userfaultfd is kept
 * open and the range stays registered.  The range must not be unmapped or
 * remapped while registered.  A fork()ed child does not inherit it.
 */
#ifndef FERRY_VMM_DIRTY_UFFD_H
#define FERRY_VMM_DIRTY_UFFD_H

#include <stddef.h>
#include <stdint.h>

#include "ferry/common.h"

struct uffd_dirty;

/*
 * Check that the kernel supports async uffd-wp and PAGEMAP_SCAN, open a
 * userfaultfd and register [base, base + len) (page aligned) for
 * write-protect tracking.  Nothing is protected yet.  -EOPNOTSUPP (with
 * the missing feature named in err) when this kernel or this kind of
 * memory cannot do it; -EPERM if userfaultfd is not allowed.
 */
int uffd_dirty_create(struct uffd_dirty **out, void *base, size_t len,
		      struct ferry_error *err);

/*
 * Write-protect the whole range: every write from now on is reported by
 * the next uffd_dirty_sync().  Calling it again re-arms everything (and
 * forgets what was written since the last sync).
 */
int uffd_dirty_start(struct uffd_dirty *d, struct ferry_error *err);

/*
 * OR the pages written since the last sync (or start) into bitmap (bit i of
 * word i / 64 = page i of the range; uffd_dirty_bitmap_words() words) and
 * write-protect them again.  -EINVAL if not started.
 */
int uffd_dirty_sync(struct uffd_dirty *d, uint64_t *bitmap,
		    struct ferry_error *err);

/*
 * The same without write-protecting what it reports, for the last sync
 * before a stop (the switchover's, with the writers stopped): re-arming is
 * most of a sync's cost when many pages were written (each needs its PTE
 * changed and the TLB flushed: 4 GiB with 8 MiB written scattered, 4.7 ms
 * against 2.0 ms measured). A later sync without a start in between would
 * report those pages again (more, never fewer).
 */
int uffd_dirty_sync_final(struct uffd_dirty *d, uint64_t *bitmap,
			  struct ferry_error *err);

/* End tracking, at once: writes are no longer reported.  The protection
 * stays until a page is written (one minor fault, resolved by the kernel)
 * or the range is unregistered.  Always 0. */
int uffd_dirty_stop(struct uffd_dirty *d, struct ferry_error *err);

/* Stop, and let go of the range: unregister it (dropping the protection
 * left, slowly: the whole range is walked), so that another userfaultfd
 * may register it (a postcopy load).  The fds stay open; the next start
 * registers again. */
void uffd_dirty_release(struct uffd_dirty *d);

/* Release, close.  NULL is fine. */
void uffd_dirty_destroy(struct uffd_dirty *d);

static inline size_t uffd_dirty_bitmap_words(size_t len)
{
	return (len / 4096 + 63) / 64;
}

/*
 * Set bit i in bitmap for every page i of [base, base + len) that may hold
 * data: populated (present or swapped out) and not the shared zero page.
 * Pages never touched read as zero and need not be read or sent.  Cheap:
 * one PAGEMAP_SCAN walk of the page tables (fallback on older kernels:
 * /proc/self/pagemap, bits 63 present and 62 swapped).  Bits of other
 * pages are left alone (OR semantics), so clear the bitmap first.
 *
 * Only private anonymous memory can be judged from page tables: shared
 * memory (memfd, shmem) may hold data in pages this process never mapped,
 * or that were swapped out and unmapped, so for any shared or file-backed
 * part of the range every page is reported.  While uffd_dirty tracking is
 * started, write-protect markers on never-touched pages look like swap
 * entries and are reported too (correct, merely less sparse): take the
 * present map before uffd_dirty_start().
 */
int mem_present_pages(void *base, size_t len, uint64_t *bitmap,
		      struct ferry_error *err);

#endif /* FERRY_VMM_DIRTY_UFFD_H */
