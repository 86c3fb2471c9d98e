/*
 * tests/unit/test-kvm-slots.c - the pure part of KVM memslots following
 * the flat view (vmm/kvm/kvm-slots.c): slot geometry, the slot table, dirty
 * bitmap placement at page offsets that are not multiples of 64, and MMIO
 * dispatch through a view (holes included). No /dev/kvm needed; the KVM
 * side is covered end to end by tests/e2e/test-memslots.c.
 */
#include "../harness.h"

#include <sys/mman.h>

#include "kvm/kvm-slots.h"
#include "memmap-util.h"
#include "memory/memmap.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

#define PAGE 4096ull

/* ---- helpers ------------------------------------------------------------ */

static bool bit(const uint64_t *bm, uint64_t i)
{
	return bm[i / 64] >> (i % 64) & 1;
}

/* The obvious bit-by-bit placement, to compare against. */
static void place_ref(uint64_t *dst, const uint64_t *src, uint64_t src_pages,
		      uint64_t first)
{
	for (uint64_t i = 0; i < src_pages; i++)
		if (bit(src, i))
			dst[(first + i) / 64] |= 1ull << ((first + i) % 64);
}

/* A 16-byte register file. */
struct regs {
	uint8_t b[16];
	unsigned reads, writes;
};

static uint64_t regs_read(void *opaque, uint64_t off, unsigned size)
{
	struct regs *m = opaque;
	uint64_t v = 0;

	for (unsigned i = 0; i < size; i++)
		v |= (uint64_t)m->b[off + i] << (8 * i);
	m->reads++;
	return v;
}

static void regs_write(void *opaque, uint64_t off, uint64_t val, unsigned size)
{
	struct regs *m = opaque;

	for (unsigned i = 0; i < size; i++)
		m->b[off + i] = (uint8_t)(val >> (8 * i));
	m->writes++;
}

static const struct memmap_mmio_ops regs_ops = { regs_read, regs_write };

/* ---- bitmap placement --------------------------------------------------- */

TEST(kvm_slots_bitmap_place_unaligned)
{
	enum { DST_PAGES = 1000, WORDS = (DST_PAGES + 63) / 64 };
	uint64_t dst[WORDS], ref[WORDS], src[WORDS + 1];
	/* Offsets around word boundaries, and 162: guest RAM after a 640 KiB
	 * slot and two 4 KiB BARs. */
	static const uint64_t firsts[] = { 0, 1, 31, 63, 64, 65, 127, 128, 162,
					   500, 999 };

	for (unsigned k = 0; k < sizeof(firsts) / sizeof(firsts[0]); k++) {
		uint64_t first = firsts[k];

		for (uint64_t pages = 1; first + pages <= DST_PAGES;
		     pages += 1 + pages / 3) {
			/* Garbage beyond @pages in src's last word must be
			 * ignored; so must the words after it. */
			for (unsigned w = 0; w < WORDS + 1; w++)
				src[w] = test_rand();
			for (unsigned w = 0; w < WORDS; w++)
				dst[w] = ref[w] = test_rand() & test_rand();
			place_ref(ref, src, pages, first);
			ASSERT_OK(kvm_dirty_bitmap_place(dst, DST_PAGES, src,
							 pages, first));
			for (unsigned w = 0; w < WORDS; w++)
				if (dst[w] != ref[w])
					FAIL("first %llu, %llu pages: word %u is "
					     "%#llx, expected %#llx",
					     (unsigned long long)first,
					     (unsigned long long)pages, w,
					     (unsigned long long)dst[w],
					     (unsigned long long)ref[w]);
		}
	}
}

TEST(kvm_slots_bitmap_place_bounds)
{
	uint64_t dst[2] = { 0, 0 }, src[2] = { ~0ull, ~0ull };

	/* A slot ending exactly at the end of RAM; the spill into the next
	 * word stays within dst (100 pages = 2 words). */
	ASSERT_OK(kvm_dirty_bitmap_place(dst, 100, src, 70, 30));
	ASSERT_EQ_U64(dst[0], ~0ull << 30);
	ASSERT_EQ_U64(dst[1], (1ull << 36) - 1);
	/* Past the end: refused, nothing written. */
	dst[0] = dst[1] = 0;
	ASSERT_ERR(kvm_dirty_bitmap_place(dst, 100, src, 71, 30), -ERANGE);
	ASSERT_ERR(kvm_dirty_bitmap_place(dst, 100, src, 1, 101), -ERANGE);
	ASSERT_ERR(kvm_dirty_bitmap_place(dst, 100, src, UINT64_MAX, 2), -ERANGE);
	ASSERT_EQ_U64(dst[0] | dst[1], 0);
	/* Empty slot: fine, nothing written. */
	ASSERT_OK(kvm_dirty_bitmap_place(dst, 100, src, 0, 100));
	ASSERT_EQ_U64(dst[0] | dst[1], 0);
}

TEST(kvm_slots_bitmap_set_range)
{
	uint64_t bm[4], ref[4];

	for (int t = 0; t < 2000; t++) {
		uint64_t first = test_rand() % 256, n = test_rand() % (257 - first);

		memset(bm, 0, sizeof(bm));
		memset(ref, 0, sizeof(ref));
		for (uint64_t i = first; i < first + n; i++)
			ref[i / 64] |= 1ull << (i % 64);
		kvm_bitmap_set_range(bm, first, n);
		ASSERT_MEMEQ(bm, ref, sizeof(bm));
	}
}

/* ---- slot geometry and table -------------------------------------------- */

TEST(kvm_slots_fit_geometry)
{
	struct memmap *mm = new_map();
	uint8_t *host = mmap(NULL, 64 * PAGE, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct memmap_region *r0, *m;
	struct ferry_error err = { 0 };
	struct regs regs = { 0 };
	struct memmap_range rg;
	uint64_t gpa, size, off;
	uint8_t *hva;

	ASSERT(host != MAP_FAILED);
	r0 = ram(mm, "ram0", host, 64 * PAGE);
	m = memmap_region_new_mmio(mm, "dev", PAGE, &regs_ops, &regs, &err);
	ASSERT_PTR(m);

	/* Whole pages: the range itself. */
	rg = (struct memmap_range){ 0x10000, 8 * PAGE, r0, 2 * PAGE, host + 2 * PAGE };
	ASSERT(kvm_slot_fit(&rg, &gpa, &size, &off, &hva));
	ASSERT_EQ_U64(gpa, 0x10000);
	ASSERT_EQ_U64(size, 8 * PAGE);
	ASSERT_EQ_U64(off, 2 * PAGE);
	ASSERT(hva == host + 2 * PAGE);

	/* Partial pages at both ends: the aligned interior only. */
	rg = (struct memmap_range){ 0x10800, 3 * PAGE, r0, 0x800, host + 0x800 };
	ASSERT(kvm_slot_fit(&rg, &gpa, &size, &off, &hva));
	ASSERT_EQ_U64(gpa, 0x11000);
	ASSERT_EQ_U64(size, 2 * PAGE);
	ASSERT_EQ_U64(off, PAGE);
	ASSERT(hva == host + PAGE);

	/* No whole page inside. */
	rg = (struct memmap_range){ 0x10800, PAGE, r0, 0x800, host + 0x800 };
	ASSERT(!kvm_slot_fit(&rg, &gpa, &size, &off, &hva));
	rg = (struct memmap_range){ 0x10000, PAGE - 1, r0, 0, host };
	ASSERT(!kvm_slot_fit(&rg, &gpa, &size, &off, &hva));
	/* Host memory aligned differently from the gpa: no page can be a
	 * slot. */
	rg = (struct memmap_range){ 0x10000, 4 * PAGE, r0, 0x800, host + 0x800 };
	ASSERT(!kvm_slot_fit(&rg, &gpa, &size, &off, &hva));
	/* MMIO never. */
	rg = (struct memmap_range){ 0x10000, PAGE, m, 0, NULL };
	ASSERT(!kvm_slot_fit(&rg, &gpa, &size, &off, &hva));
	/* The top of the address space: no overflow. */
	rg = (struct memmap_range){ UINT64_MAX - 2 * PAGE + 1, 2 * PAGE, r0, 0, host };
	ASSERT(kvm_slot_fit(&rg, &gpa, &size, &off, &hva));
	ASSERT_EQ_U64(gpa, UINT64_MAX - 2 * PAGE + 1);
	ASSERT_EQ_U64(size, 2 * PAGE);
	rg = (struct memmap_range){ UINT64_MAX - 100, 101, r0, 0, host };
	ASSERT(!kvm_slot_fit(&rg, &gpa, &size, &off, &hva));

	memmap_region_free(m);
	memmap_region_free(r0);
	memmap_free(mm);
	munmap(host, 64 * PAGE);
}

TEST(kvm_slots_table_bookkeeping)
{
	struct memmap *mm = new_map();
	static uint8_t host[1];
	struct memmap_region *a = ram(mm, "a", host, 1 << 20);
	struct memmap_region *b = ram(mm, "b", host, 1 << 20);
	struct kvm_slot_table t;
	struct memmap_range r1 = { 0, 0x10000, a, 0, host };
	struct memmap_range r2 = { 0x20000, 0x10000, a, 0x20000, host };
	struct memmap_range r3 = { 0x20000, 0x10000, b, 0x20000, host };

	kvm_slot_table_init(&t, 0);
	ASSERT_EQ(t.limit, KVM_VM_MAX_SLOTS);
	kvm_slot_table_init(&t, 1000);
	ASSERT_EQ(t.limit, KVM_VM_MAX_SLOTS);
	kvm_slot_table_init(&t, 3);
	ASSERT_EQ(t.limit, 3);

	ASSERT_EQ(kvm_slot_table_alloc(&t), 0);
	kvm_slot_table_set(&t, 0, &r1, 0, 0x10000, 0, host, true, false);
	ASSERT_EQ(kvm_slot_table_alloc(&t), 1);
	kvm_slot_table_set(&t, 1, &r2, 0x20000, 0x10000, 0x20000, host, true, true);
	ASSERT_STREQ(t.e[1].region, "a");
	ASSERT_EQ(kvm_slot_table_find(&t, &r1), 0);
	ASSERT_EQ(kvm_slot_table_find(&t, &r2), 1);
	/* Same place, other region: not the same range. */
	ASSERT_EQ(kvm_slot_table_find(&t, &r3), -ENOENT);
	r3.mr = a;
	r3.offset = 0;
	ASSERT_EQ(kvm_slot_table_find(&t, &r3), -ENOENT);

	/* The lowest free id is reused first; the limit holds. */
	kvm_slot_table_clear(&t, 0);
	ASSERT_EQ(kvm_slot_table_find(&t, &r1), -ENOENT);
	ASSERT_EQ(kvm_slot_table_alloc(&t), 0);
	kvm_slot_table_set(&t, 0, &r1, 0, 0x10000, 0, host, true, false);
	kvm_slot_table_set(&t, 2, &r3, 0x20000, 0x10000, 0, host, false, false);
	ASSERT_EQ(kvm_slot_table_alloc(&t), -ENOSPC);

	memmap_region_free(a);
	memmap_region_free(b);
	memmap_free(mm);
}

/*
 * The listener's view of a BAR mapped over guest RAM and unmapped again:
 * the ranges a memslot listener must turn into slots, and where their dirty
 * bits go.
 */
struct model {
	struct memmap_listener l;
	struct memmap_region *ram;
	struct kvm_slot_table t;
	unsigned adds, dels;
};

static void model_add(struct memmap_listener *l, const struct memmap_range *r)
{
	struct model *m = (struct model *)l;
	uint64_t gpa, size, off;
	uint8_t *hva;
	int id;

	m->adds++;
	if (!kvm_slot_fit(r, &gpa, &size, &off, &hva))
		return;
	id = kvm_slot_table_alloc(&m->t);
	ASSERT(id >= 0);
	kvm_slot_table_set(&m->t, (unsigned)id, r, gpa, size, off, hva,
			   r->mr == m->ram, false);
}

static void model_del(struct memmap_listener *l, const struct memmap_range *r)
{
	struct model *m = (struct model *)l;
	int id = kvm_slot_table_find(&m->t, r);

	m->dels++;
	if (memmap_region_kind(r->mr) == MEMMAP_RAM)
		ASSERT(id >= 0);
	if (id >= 0)
		kvm_slot_table_clear(&m->t, (unsigned)id);
}

TEST(kvm_slots_follow_bar_over_ram)
{
	enum { RAM = 4 << 20, PAGES = RAM / 4096 };
	struct memmap *mm = new_map();
	uint8_t *host = mmap(NULL, RAM, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct model m = { .l = { .region_add = model_add, .region_del = model_del } };
	struct ferry_error err = { 0 };
	struct regs regs = { 0 };
	struct memmap_region *bar;
	uint64_t slot_bits[PAGES / 64], all[PAGES / 64];
	unsigned nslots = 0, i;

	ASSERT(host != MAP_FAILED);
	m.ram = ram(mm, "ram0", host, RAM);
	ASSERT_OK_E(memmap_add_subregion(memmap_root(mm), 0, m.ram, 0, &err), err);
	kvm_slot_table_init(&m.t, 0);
	memmap_listener_register(mm, &m.l);
	ASSERT_EQ(m.adds, 1);
	ASSERT(m.t.e[0].used && m.t.e[0].size == RAM && m.t.e[0].guest_ram);

	/* A 4 KiB BAR at page 161 splits RAM: [0, 161) and [162, PAGES). */
	bar = memmap_region_new_mmio(mm, "bar", PAGE, &regs_ops, &regs, &err);
	ASSERT_PTR(bar);
	ASSERT_OK_E(memmap_add_subregion(memmap_root(mm), 161 * PAGE, bar, 1,
					 &err), err);
	ASSERT_EQ(m.dels, 1);
	for (i = 0; i < KVM_VM_MAX_SLOTS; i++) {
		const struct kvm_slot_ent *e = &m.t.e[i];

		if (!e->used)
			continue;
		nslots++;
		ASSERT(e->guest_ram);
		/* Identity layout: a slot's gpa is its offset in RAM. */
		ASSERT_EQ_U64(e->gpa, e->offset);
		ASSERT(e->hva == host + e->offset);
		ASSERT(e->gpa + e->size <= 161 * PAGE || e->gpa >= 162 * PAGE);
	}
	ASSERT_EQ(nslots, 2);

	/* Every slot all dirty, placed at its offset: exactly RAM minus the
	 * BAR's page, across the word boundary at 128 and 192. */
	memset(all, 0, sizeof(all));
	memset(slot_bits, 0xff, sizeof(slot_bits));
	for (i = 0; i < KVM_VM_MAX_SLOTS; i++)
		if (m.t.e[i].used)
			ASSERT_OK(kvm_dirty_bitmap_place(all, PAGES, slot_bits,
							 m.t.e[i].size / PAGE,
							 m.t.e[i].offset / PAGE));
	for (i = 0; i < PAGES; i++)
		if (bit(all, i) != (i != 161))
			FAIL("page %u: bit %d", i, bit(all, i));

	/* Unmapped again: one slot over all of RAM. */
	ASSERT_OK_E(memmap_del_subregion(bar, &err), err);
	nslots = 0;
	for (i = 0; i < KVM_VM_MAX_SLOTS; i++)
		if (m.t.e[i].used) {
			nslots++;
			ASSERT_EQ_U64(m.t.e[i].gpa, 0);
			ASSERT_EQ_U64(m.t.e[i].size, RAM);
		}
	ASSERT_EQ(nslots, 1);

	memmap_listener_unregister(mm, &m.l);
	memmap_region_free(bar);
	memmap_region_free(m.ram);
	memmap_free(mm);
	munmap(host, RAM);
}

/* ---- MMIO dispatch ------------------------------------------------------- */

TEST(kvm_slots_mmio_dispatch)
{
	struct memmap *mm = new_map();
	uint8_t *host = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct ferry_error err = { 0 };
	struct regs regs = { 0 };
	struct memmap_region *r0, *r1, *dev;
	const struct memmap_view *v;
	uint64_t pages[KVM_MMIO_MAX_LEN];
	uint8_t d[8];
	unsigned np;
	uint32_t u;

	ASSERT(host != MAP_FAILED);
	/* ram0 [0, 0x2000), dev [0x2000, 0x2010), hole, other [0x3000, 0x4000),
	 * hole beyond. */
	r0 = ram(mm, "ram0", host, 2 * PAGE);
	r1 = ram(mm, "other", host + 3 * PAGE, PAGE);
	dev = memmap_region_new_mmio(mm, "dev", 16, &regs_ops, &regs, &err);
	ASSERT_PTR(dev);
	ASSERT_OK_E(memmap_add_subregion(memmap_root(mm), 0, r0, 0, &err), err);
	ASSERT_OK_E(memmap_add_subregion(memmap_root(mm), 0x2000, dev, 0, &err), err);
	ASSERT_OK_E(memmap_add_subregion(memmap_root(mm), 0x3000, r1, 0, &err), err);
	v = memmap_view_get(mm);

	/* A register write and read. */
	u = 0xdeadbeef;
	memcpy(d, &u, 4);
	ASSERT_OK(kvm_mmio_dispatch(v, 0x2004, true, d, 4, r0, pages, &np));
	ASSERT_EQ(np, 0);
	ASSERT_EQ(regs.writes, 1);
	memset(d, 0, sizeof(d));
	ASSERT_OK(kvm_mmio_dispatch(v, 0x2004, false, d, 4, r0, pages, &np));
	ASSERT_EQ_U64(d[0] | d[1] << 8 | d[2] << 16 | (uint32_t)d[3] << 24, 0xdeadbeef);

	/* A read running off the device into the hole: device bytes, then
	 * all ones. */
	memset(d, 0, sizeof(d));
	ASSERT_ERR(kvm_mmio_dispatch(v, 0x200c, false, d, 8, r0, pages, &np), -EFAULT);
	ASSERT_EQ(d[0], 0);
	ASSERT_EQ(d[4], 0xff);
	ASSERT_EQ(d[7], 0xff);

	/* The hole: reads all ones, writes go nowhere, nothing crashes. */
	memset(d, 0, sizeof(d));
	ASSERT_ERR(kvm_mmio_dispatch(v, 0x2800, false, d, 8, r0, pages, &np), -EFAULT);
	for (unsigned i = 0; i < 8; i++)
		ASSERT_EQ(d[i], 0xff);
	ASSERT_ERR(kvm_mmio_dispatch(v, 0x9000000000ull, true, d, 8, r0, pages,
				     &np), -EFAULT);
	ASSERT_EQ(np, 0);

	/* A write straddling hole -> RAM: the RAM half lands. */
	memcpy(d, "ABCDEFGH", 8);
	ASSERT_ERR(kvm_mmio_dispatch(v, 0x2ffc, true, d, 8, r0, pages, &np), -EFAULT);
	ASSERT_MEMEQ(host + 3 * PAGE, "EFGH", 4);
	ASSERT_EQ(np, 0);   /* "other" is not guest RAM */

	/* Guest RAM written through an exit: both pages it touched are
	 * reported, relative to ram0. */
	memcpy(d, "12345678", 8);
	ASSERT_OK(kvm_mmio_dispatch(v, 0xffc, true, d, 8, r0, pages, &np));
	ASSERT_MEMEQ(host + 0xffc, "12345678", 8);
	ASSERT_EQ(np, 2);
	ASSERT_EQ_U64(pages[0], 0);
	ASSERT_EQ_U64(pages[1], 1);
	/* RAM -> device: only the RAM page. */
	ASSERT_OK(kvm_mmio_dispatch(v, 0x1ffc, true, d, 8, r0, pages, &np));
	ASSERT_EQ(np, 1);
	ASSERT_EQ_U64(pages[0], 1);
	/* Reads report nothing. */
	ASSERT_OK(kvm_mmio_dispatch(v, 0xffc, false, d, 8, r0, pages, &np));
	ASSERT_EQ(np, 0);
	ASSERT_MEMEQ(d, "12345678", 8);

	/* Lengths KVM never sends, and a wrapping access: a hole. */
	memset(d, 0, sizeof(d));
	ASSERT_ERR(kvm_mmio_dispatch(v, 0, false, d, 0, r0, pages, &np), -EFAULT);
	ASSERT_ERR(kvm_mmio_dispatch(v, 0, false, d, 9, r0, pages, &np), -EFAULT);
	for (unsigned i = 0; i < 8; i++)
		ASSERT_EQ(d[i], 0xff);
	ASSERT_ERR(kvm_mmio_dispatch(v, UINT64_MAX - 3, true, d, 8, r0, pages, &np),
		   -EFAULT);

	memmap_view_put(v);
	memmap_region_free(dev);
	memmap_region_free(r1);
	memmap_region_free(r0);
	memmap_free(mm);
	munmap(host, 4 * PAGE);
}
