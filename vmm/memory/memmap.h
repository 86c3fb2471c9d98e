/*
 * vmm/memory/memmap.h - the reference VMM's guest physical memory map.
 *
 * A tree of regions describes what the guest sees:
 *   RAM        host memory (host pointer + size), e.g. guest RAM, a RAM BAR;
 *   MMIO       read/write callbacks + opaque, e.g. device registers;
 *   CONTAINER  holds subregions at offsets, with priorities;
 *   ALIAS      a window [offset, offset + size) onto another region.
 * The tree is rendered into a FLAT VIEW: a sorted array of non-overlapping
 * ranges, each pointing at RAM (host address) or at an MMIO region + offset.
 *
 * Rendering rules:
 *   - among overlapping siblings, the higher priority wins; at equal
 *     priority the one added later wins (moving a region keeps its place);
 *   - a container clips its subregions to [0, size); an alias clips its
 *     target to its window;
 *   - disabled regions (and everything under them) render as holes, which
 *     lower-priority siblings may fill;
 *   - adjacent ranges of the same leaf region at contiguous offsets are
 *     merged (e.g. two aliases laid end to end); ranges of different regions
 *     never are, so a listener can always tie a range to one region.
 *
 * Transactions: every change happens inside memmap_begin()/memmap_commit().
 * They nest; only the outermost commit rebuilds the flat view (once, and only
 * if something changed) and notifies listeners. A change made outside a
 * transaction is an implicit one-change transaction. Loading many devices
 * inside one outer transaction therefore costs one rebuild, not one each.
 * While a transaction is open, the thread that opened it must not read the
 * flat view (memmap_view_get, memmap_read/write): the view does not show
 * its changes yet. Such a read is caught (an assertion in debug builds,
 * NULL / -EBUSY in release builds), never served stale. Work that needs
 * the view (a device's address caches) belongs in a listener's commit
 * callback, which runs with the new view.
 *
 * Threads and locks (the rule):
 *   - the TREE (regions, transactions, listeners) belongs to one thread at a
 *     time: the caller serialises every mutating call (in the VMM, the main
 *     or load thread holding the VMM's big lock). Listener callbacks run in
 *     that thread, with no memmap lock held, and must not mutate the tree
 *     (changes from a callback fail with -EDEADLK).
 *   - the FLAT VIEW is an immutable, refcounted snapshot. Any thread (vCPUs
 *     doing MMIO dispatch) takes one with memmap_view_get(), uses it without
 *     locks, and drops it with memmap_view_put(). A commit builds a new view
 *     and swaps the published pointer under mm->view_lock; readers holding
 *     the old view keep using it until they put it. A view holds a reference
 *     on every region it points at, so a region's struct and callbacks stay
 *     valid while a snapshot uses it. Host memory behind RAM regions and the
 *     MMIO opaque are the owner's: free them only when no vCPU dispatches.
 */
#ifndef FERRY_VMM_MEMMAP_H
#define FERRY_VMM_MEMMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ferry/common.h"

struct memmap;
struct memmap_region;

enum memmap_kind {
	MEMMAP_RAM,
	MEMMAP_MMIO,
	MEMMAP_CONTAINER,
	MEMMAP_ALIAS,
};

/*
 * MMIO callbacks. @off is relative to the region; @size is 1, 2, 4 or 8 and
 * the access is naturally aligned (memmap_read/write split larger or
 * unaligned buffers, little-endian). Called from any thread that dispatches
 * (vCPU threads): the device does its own locking. Guest accesses cannot
 * fail: a device ignores writes and returns 0 (or ~0) for reads it does not
 * implement.
 */
struct memmap_mmio_ops {
	uint64_t (*read)(void *opaque, uint64_t off, unsigned size);
	void (*write)(void *opaque, uint64_t off, uint64_t val, unsigned size);
};

/* One range of a flat view: [gpa, gpa + size) maps @mr at @offset. */
struct memmap_range {
	uint64_t gpa;
	uint64_t size;
	struct memmap_region *mr;   /* leaf: RAM or MMIO */
	uint64_t offset;            /* into mr */
	uint8_t *host;              /* RAM: host address of gpa; MMIO: NULL */
};

/* An immutable flat view (see the threading rule above). */
struct memmap_view {
	unsigned nr;
	const struct memmap_range *ranges;  /* sorted by gpa, disjoint */
	uint64_t generation;                /* 0 for the initial empty view */
	/* private: refcount (atomic), storage */
	int refs_;
	struct memmap_range *storage_;
};

struct memmap_stats {
	uint64_t changes;   /* tree changes (add, del, move, enable, ...) */
	uint64_t commits;   /* outermost commits, implicit ones included */
	uint64_t rebuilds;  /* flat views built */
	unsigned nr_ranges; /* in the current view */
};

/*
 * Listeners see a commit as a difference: region_del for each range of the
 * old view that is not in the new one, then region_add for each new range,
 * bracketed by begin and commit. A range is "the same" only if gpa, size,
 * region and offset all match, so an unchanged range produces no callback:
 * a KVM memslot listener touches only the slots that changed, and a cache
 * can tell whether a change overlaps what it caches. All dels come before
 * all adds, so a slot can be freed before an overlapping one is created.
 * Any callback may be NULL. Embed the struct and use container_of.
 */
struct memmap_listener {
	void (*begin)(struct memmap_listener *l);
	void (*region_del)(struct memmap_listener *l,
			   const struct memmap_range *r);
	void (*region_add)(struct memmap_listener *l,
			   const struct memmap_range *r);
	/* The new view is published already; it is valid during the call
	 * (take a reference with memmap_view_get() to keep one). */
	void (*commit)(struct memmap_listener *l,
		       const struct memmap_view *view);
	struct memmap_listener *next_;  /* private: owned by the memmap */
};

/* ---- the map ---------------------------------------------------------- */

/* A map with an empty root container covering the whole address space. */
struct memmap *memmap_new(struct ferry_error *err);
/* Free the root and the current view. Free every other region and
 * unregister every listener first. NULL is a no-op. */
void memmap_free(struct memmap *mm);
struct memmap_region *memmap_root(struct memmap *mm);

/* ---- regions ---------------------------------------------------------- */

/* @name is copied (truncated to 31 characters). NULL on failure. */
struct memmap_region *memmap_region_new_ram(struct memmap *mm,
					    const char *name, void *host,
					    uint64_t size,
					    struct ferry_error *err);
struct memmap_region *memmap_region_new_mmio(struct memmap *mm,
					     const char *name, uint64_t size,
					     const struct memmap_mmio_ops *ops,
					     void *opaque,
					     struct ferry_error *err);
struct memmap_region *memmap_region_new_container(struct memmap *mm,
						  const char *name,
						  uint64_t size,
						  struct ferry_error *err);
/* A window of @size bytes onto @target starting at @offset. The alias keeps
 * @target's struct alive (not its mapping) until the alias is freed. */
struct memmap_region *memmap_region_new_alias(struct memmap *mm,
					      const char *name,
					      struct memmap_region *target,
					      uint64_t offset, uint64_t size,
					      struct ferry_error *err);
/* Detach @r from its container (an implicit change), detach its
 * subregions, and drop the owner's reference. NULL is a no-op. */
void memmap_region_free(struct memmap_region *r);

enum memmap_kind memmap_region_kind(const struct memmap_region *r);
const char *memmap_region_name(const struct memmap_region *r);
uint64_t memmap_region_size(const struct memmap_region *r);
/* MMIO: the opaque passed at creation; NULL otherwise. */
void *memmap_region_opaque(const struct memmap_region *r);
/* Attached to a container? (Even if that container is not in the tree.) */
bool memmap_region_attached(const struct memmap_region *r);

/*
 * Tree changes. Each returns 0 or -errno. Outside a transaction each is an
 * implicit transaction: a failed rebuild (-ENOMEM) is returned, the tree
 * change stays, and the next commit retries the rebuild.
 *   add: -EBUSY if @sub is attached already, -EINVAL if @container is not
 *        a container or the regions belong to different maps, -ERANGE if
 *        @offset + size overflows, -ELOOP if it would make a cycle.
 */
int memmap_add_subregion(struct memmap_region *container, uint64_t offset,
			 struct memmap_region *sub, int priority,
			 struct ferry_error *err);
/* -ENOENT if @sub is not attached. */
int memmap_del_subregion(struct memmap_region *sub, struct ferry_error *err);
/* Change @sub's offset in its container; keeps its stacking order. */
int memmap_move_subregion(struct memmap_region *sub, uint64_t offset,
			  struct ferry_error *err);
/* Regions start enabled. A disabled region renders as a hole. */
int memmap_set_enabled(struct memmap_region *r, bool enabled,
		       struct ferry_error *err);

/* ---- transactions and listeners -------------------------------------- */

void memmap_begin(struct memmap *mm);
/* Ends the innermost transaction; the outermost rebuilds (if anything
 * changed) and notifies. Returns 0 or -errno (-ENOMEM: the old view stays
 * published and the next commit retries). */
int memmap_commit(struct memmap *mm, struct ferry_error *err);
/* True inside begin/commit (a device may defer work to the commit). */
bool memmap_in_transaction(const struct memmap *mm);

/* Registering replays the current view as region_adds (begin/adds/commit),
 * so a late listener starts in sync. */
void memmap_listener_register(struct memmap *mm, struct memmap_listener *l);
void memmap_listener_unregister(struct memmap *mm, struct memmap_listener *l);

/* Tree-owner thread (the counters are not atomic). */
void memmap_get_stats(const struct memmap *mm, struct memmap_stats *st);

/* ---- views and access (any thread) ----------------------------------- */

/* A reference to the current view. NULL only for the thread that holds a
 * transaction open (its changes are not in the view yet: see the rule
 * above), and only in release builds: debug builds abort there. */
const struct memmap_view *memmap_view_get(struct memmap *mm);
void memmap_view_put(const struct memmap_view *view);
/* The range containing @gpa, or NULL for a hole. O(log n). */
const struct memmap_range *memmap_lookup(const struct memmap_view *view,
					 uint64_t gpa);

/*
 * Access [gpa, gpa + len) through @view: RAM by memcpy, MMIO by callbacks,
 * crossing range boundaries as needed. -EFAULT at the first hole (bytes
 * before it were transferred; the rest of a read buffer is filled with
 * 0xff, as a bus with nothing behind it returns), -ERANGE if it wraps.
 */
int memmap_view_read(const struct memmap_view *view, uint64_t gpa,
		     void *buf, size_t len);
int memmap_view_write(const struct memmap_view *view, uint64_t gpa,
		      const void *buf, size_t len);
/* Same, through the current view. */
int memmap_read(struct memmap *mm, uint64_t gpa, void *buf, size_t len);
int memmap_write(struct memmap *mm, uint64_t gpa, const void *buf,
		 size_t len);

#endif
