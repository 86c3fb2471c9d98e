/*
 * vmm/kvm/kvm-slots.c - the pure part of KVM memslots following the flat view:
 * slot table bookkeeping, page alignment, dirty bitmap placement, MMIO
 * dispatch through a view. No KVM calls and no locks here: backend-kvm.c
 * owns the table and serialises access to it (see its struct kvm_backend).
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "kvm/kvm-slots.h"

#define PAGE KVM_SLOTS_PAGE

/* ---- slot table ---------------------------------------------------------- */

void kvm_slot_table_init(struct kvm_slot_table *t, int kvm_max)
{
	memset(t, 0, sizeof(*t));
	t->limit = kvm_max <= 0 || kvm_max > KVM_VM_MAX_SLOTS ?
		   KVM_VM_MAX_SLOTS : (unsigned)kvm_max;
}

int kvm_slot_table_alloc(const struct kvm_slot_table *t)
{
	for (unsigned i = 0; i < t->limit; i++)
		if (!t->e[i].used)
			return (int)i;
	return -ENOSPC;
}

int kvm_slot_table_find(const struct kvm_slot_table *t,
			const struct memmap_range *r)
{
	for (unsigned i = 0; i < t->limit; i++) {
		const struct memmap_range *q = &t->e[i].range;

		if (t->e[i].used && q->gpa == r->gpa && q->size == r->size &&
		    q->mr == r->mr && q->offset == r->offset)
			return (int)i;
	}
	return -ENOENT;
}

void kvm_slot_table_set(struct kvm_slot_table *t, unsigned id,
			const struct memmap_range *r, uint64_t gpa,
			uint64_t size, uint64_t offset, uint8_t *hva,
			bool guest_ram, bool dirty_log)
{
	struct kvm_slot_ent *e = &t->e[id];

	*e = (struct kvm_slot_ent){
		.used = true, .guest_ram = guest_ram, .dirty_log = dirty_log,
		.gpa = gpa, .size = size, .offset = offset, .hva = hva,
		.range = *r,
	};
	snprintf(e->region, sizeof(e->region), "%s", memmap_region_name(r->mr));
}

void kvm_slot_table_clear(struct kvm_slot_table *t, unsigned id)
{
	memset(&t->e[id], 0, sizeof(t->e[id]));
}

bool kvm_slot_fit(const struct memmap_range *r, uint64_t *gpa, uint64_t *size,
		  uint64_t *offset, uint8_t **hva)
{
	uint64_t start, last, delta;
	uint8_t *h;

	if (!r->host || !r->size || memmap_region_kind(r->mr) != MEMMAP_RAM)
		return false;
	if (r->gpa > UINT64_MAX - (PAGE - 1))
		return false;
	/* Inclusive bounds: the view never wraps, but its last byte may be
	 * UINT64_MAX, where an exclusive end would overflow. */
	start = (r->gpa + PAGE - 1) & ~(PAGE - 1);
	last = r->gpa + (r->size - 1);
	if ((last & (PAGE - 1)) != PAGE - 1) {
		/* The last page is partial: the interior ends before it. */
		if (last < PAGE)
			return false;
		last = (last & ~(PAGE - 1)) - 1;
	}
	if (last < start || last - start < PAGE - 1)
		return false;
	delta = start - r->gpa;
	h = r->host + delta;
	if ((uintptr_t)h & (PAGE - 1))
		return false;
	*gpa = start;
	*size = last - start + 1;
	*offset = r->offset + delta;
	*hva = h;
	return true;
}

/* ---- dirty bitmaps ----------------------------------------------------------- */

int kvm_dirty_bitmap_place(uint64_t *dst, uint64_t dst_pages,
			   const uint64_t *src, uint64_t src_pages,
			   uint64_t first)
{
	uint64_t words = (src_pages + 63) / 64, base = first / 64;
	unsigned sh = (unsigned)(first % 64);

	if (first > dst_pages || src_pages > dst_pages - first)
		return -ERANGE;
	for (uint64_t w = 0; w < words; w++) {
		uint64_t v = src[w];

		if (w == words - 1 && src_pages % 64)
			v &= (1ull << (src_pages % 64)) - 1;
		if (!v)
			continue;
		/*
		 * Bit b of word w is slot page 64w + b, i.e. guest RAM page
		 * 64(base + w) + sh + b: the low 64 - sh bits stay in word
		 * base + w, the high sh bits spill into the next word. A spill
		 * is non-zero only for pages inside the slot, so it never
		 * writes past dst_pages.
		 */
		dst[base + w] |= v << sh;
		if (sh && (v >> (64 - sh)))
			dst[base + w + 1] |= v >> (64 - sh);
	}
	return 0;
}

void kvm_bitmap_set_range(uint64_t *bm, uint64_t first, uint64_t n)
{
	uint64_t p = first, end = first + n;

	while (p < end && p % 64)
		bm[p / 64] |= 1ull << (p % 64), p++;
	for (; end - p >= 64; p += 64)
		bm[p / 64] = ~0ull;
	for (; p < end; p++)
		bm[p / 64] |= 1ull << (p % 64);
}

/* ---- MMIO dispatch ----------------------------------------------------------- */

int kvm_mmio_dispatch(const struct memmap_view *view, uint64_t gpa,
		      bool write, uint8_t *data, uint32_t len,
		      const struct memmap_region *ram,
		      uint64_t ram_pages[KVM_MMIO_MAX_LEN],
		      unsigned *nr_ram_pages)
{
	uint32_t done = 0;
	bool hole = false;

	if (nr_ram_pages)
		*nr_ram_pages = 0;
	if (len > KVM_MMIO_MAX_LEN || !len || gpa + (len - 1) < gpa) {
		if (!write)
			memset(data, 0xff, len > KVM_MMIO_MAX_LEN ?
			       KVM_MMIO_MAX_LEN : len);
		return -EFAULT;
	}
	/* Range by range: the view copies RAM and splits MMIO into aligned
	 * accesses; a hole is skipped a byte at a time (at most 8). */
	while (done < len) {
		uint64_t p = gpa + done;
		const struct memmap_range *r = memmap_lookup(view, p);
		uint32_t n;

		if (!r) {
			if (!write)
				data[done] = 0xff;
			hole = true;
			done++;
			continue;
		}
		n = r->gpa + r->size - p < len - done ?
		    (uint32_t)(r->gpa + r->size - p) : len - done;
		if (write)
			memmap_view_write(view, p, data + done, n);
		else
			memmap_view_read(view, p, data + done, n);
		if (write && ram && r->mr == ram && nr_ram_pages) {
			uint64_t o = r->offset + (p - r->gpa);

			for (uint64_t pg = o / PAGE; pg <= (o + n - 1) / PAGE; pg++)
				if (*nr_ram_pages < KVM_MMIO_MAX_LEN &&
				    (!*nr_ram_pages ||
				     ram_pages[*nr_ram_pages - 1] != pg))
					ram_pages[(*nr_ram_pages)++] = pg;
		}
		done += n;
	}
	return hole ? -EFAULT : 0;
}
