/*
 * vmm/kvm/kvm-slots.h - KVM memslots that follow the memory map's flat view.
 *
 * The KVM backend (backend-kvm.c) registers a memmap listener on the VM's
 * memory map. Every RAM range of the flat view becomes one KVM memslot;
 * MMIO ranges and holes get none, so guest accesses there exit
 * (KVM_EXIT_MMIO) and the vCPU thread dispatches them through the view.
 *
 * This header has two parts:
 *   - pure helpers (no KVM, no locks), unit-tested in
 *     tests/unit/test-kvm-slots.c: the slot table bookkeeping, the page
 *     alignment of a range, the placement of one slot's dirty bitmap in the
 *     guest-RAM-wide bitmap, and MMIO dispatch through a view;
 *   - the backend's entry points that the VMM calls (vm.c, vm-control.c).
 *
 * KVM ABI facts the helpers encode:
 *   - a slot's gpa, size and host address must be page aligned; a range
 *     that is not gets only its aligned interior as a slot, and the pages at
 *     its edges are reached through exits (slow, but the same semantics:
 *     the view maps them to the same host memory);
 *   - a slot cannot be moved or resized, only deleted and created again;
 *     the memmap listener protocol delivers all region_dels of a commit
 *     before its region_adds, so a slot id and its guest range are free
 *     again before an overlapping slot is created;
 *   - a slot's dirty bitmap has one bit per page of the slot (bit 0 is the
 *     slot's first page); where the slot sits in guest RAM decides where its
 *     bits go in the migration's bitmap, at any page offset, not only at
 *     multiples of 64 pages.
 */
#ifndef FERRY_VMM_KVM_SLOTS_H
#define FERRY_VMM_KVM_SLOTS_H

#include <stdbool.h>
#include <stdint.h>

#include "ferry/common.h"
#include "kvm/kvm.h"
#include "memory/memmap.h"

#define KVM_SLOTS_PAGE 4096ull

/* One KVM memslot and the flat-view range it was made for. */
struct kvm_slot_ent {
	bool used;
	bool guest_ram;         /* maps the guest RAM region: dirty-logged */
	bool dirty_log;         /* KVM_MEM_LOG_DIRTY_PAGES is set on it */
	uint64_t gpa, size;     /* what KVM maps: page aligned */
	uint64_t offset;        /* into the region, of gpa */
	uint8_t *hva;
	/* The range as the flat view had it (region_del matches on it). The
	 * region pointer is compared, never dereferenced: the name is copied. */
	struct memmap_range range;
	char region[32];
};

/* Index = KVM slot id. */
struct kvm_slot_table {
	unsigned limit;         /* ids [0, limit) may be used */
	struct kvm_slot_ent e[KVM_VM_MAX_SLOTS];
};

/* An empty table using ids below min(@kvm_max, KVM_VM_MAX_SLOTS);
 * @kvm_max <= 0 (KVM did not say) means KVM_VM_MAX_SLOTS. */
void kvm_slot_table_init(struct kvm_slot_table *t, int kvm_max);
/* The lowest free id, or -ENOSPC. */
int kvm_slot_table_alloc(const struct kvm_slot_table *t);
/* The id of the slot made for @r (same gpa, size, region, offset), or
 * -ENOENT. */
int kvm_slot_table_find(const struct kvm_slot_table *t,
			const struct memmap_range *r);
/* Record slot @id for @r with the geometry kvm_slot_fit() computed. */
void kvm_slot_table_set(struct kvm_slot_table *t, unsigned id,
			const struct memmap_range *r, uint64_t gpa,
			uint64_t size, uint64_t offset, uint8_t *hva,
			bool guest_ram, bool dirty_log);
void kvm_slot_table_clear(struct kvm_slot_table *t, unsigned id);

/*
 * The part of RAM range @r that a KVM slot can map: its page-aligned
 * interior [*gpa, *gpa + *size), at *offset into the region and host
 * address *hva. False if @r is not RAM, if no whole page is inside it, or
 * if its host address is not page aligned where its gpa is (then no page
 * of it can be a slot, and every access to it exits).
 */
bool kvm_slot_fit(const struct memmap_range *r, uint64_t *gpa, uint64_t *size,
		  uint64_t *offset, uint8_t **hva);

/*
 * OR a slot's dirty bitmap @src (@src_pages bits, bit i = page i of the
 * slot) into @dst (@dst_pages bits) at page @first: bit i of @src lands on
 * bit first + i of @dst. @first need not be a multiple of 64: words are
 * shifted across word boundaries. Bits of @src's last word beyond
 * @src_pages are ignored (KVM leaves them clear, but the caller's buffer
 * may be longer than the slot). -ERANGE (and nothing written) if the slot
 * does not fit: first + src_pages > dst_pages.
 */
int kvm_dirty_bitmap_place(uint64_t *dst, uint64_t dst_pages,
			   const uint64_t *src, uint64_t src_pages,
			   uint64_t first);
/* Set bits [first, first + n) of @bm. */
void kvm_bitmap_set_range(uint64_t *bm, uint64_t first, uint64_t n);

/*
 * One MMIO exit through @view: a write of @len bytes of @data at @gpa, or
 * a read into @data. @len is 1..KVM_MMIO_MAX_LEN (KVM's limit; anything
 * else is treated as a hole). RAM ranges are copied, MMIO ranges go to the
 * region's callbacks (split into naturally aligned accesses by the view),
 * and bytes in a hole are ignored on write and read as all ones, as on a
 * bus with nothing behind it; the bytes around a hole are still
 * transferred. Returns 0, or -EFAULT if any byte fell into a hole.
 *
 * If @ram is not NULL, the pages of @ram (page offsets within it) that a
 * write stored into go to @ram_pages (at most KVM_MMIO_MAX_LEN, no
 * duplicates in a row) and their number to *nr_ram_pages. That happens
 * when the guest RAM region is reached through an exit because no slot
 * maps it; the caller marks them dirty, as KVM's log never sees writes
 * that do not go through a slot.
 */
#define KVM_MMIO_MAX_LEN 8u
int kvm_mmio_dispatch(const struct memmap_view *view, uint64_t gpa,
		      bool write, uint8_t *data, uint32_t len,
		      const struct memmap_region *ram,
		      uint64_t ram_pages[KVM_MMIO_MAX_LEN],
		      unsigned *nr_ram_pages);

/* ---- the KVM backend (backend-kvm.c) ----------------------------------- */

/*
 * Make the KVM memslots follow @mm's flat view from now on: registers the
 * backend's listener (which replays the current view) on @mm. @ram is the
 * guest RAM region, the only one whose slots are dirty-logged for
 * migration (their bits land at their offset in guest RAM). Call from the
 * memory map's tree owner before vCPUs start; the backend unregisters at
 * destroy, so @mm must outlive the backend. Fails if the initial guest RAM
 * could not all be given slots.
 */
int backend_kvm_attach_memmap(void *be_priv, struct memmap *mm,
			      struct memmap_region *ram,
			      struct ferry_error *err);

struct kvm_slot_info {
	uint32_t slot;
	uint64_t gpa, size, offset;
	char region[32];
	bool guest_ram, dirty_log;
};

/* A consistent snapshot for x-query-memslots (any thread). */
struct kvm_slots_report {
	unsigned nr;
	struct kvm_slot_info slot[KVM_VM_MAX_SLOTS];
	unsigned limit;             /* usable slot ids */
	bool dirty_logging;         /* between dirty_start and dirty_stop */
	uint64_t mmio_exits;        /* MMIO exits dispatched through the view */
	uint64_t mmio_hole;         /* ... of which hit (partly) a hole */
	uint64_t mmio_ram;          /* ... of which wrote RAM without a slot */
	uint64_t unmapped;          /* RAM ranges left without a slot */
	char error[256];            /* last slot failure, or "" */
};
void backend_kvm_memslots(void *be_priv, struct kvm_slots_report *rep);

#endif
