/*
 * tests/e2e/test-memslots.c - KVM memslots follow the memory map.
 *
 * `ferry vm` processes, through x-query-memslots: a fresh VM's slots are
 * exactly the RAM ranges of its flat view (guest RAM split around the
 * device BAR window), they come back the same after a restore from a file,
 * and a live migration whose dirty log spans several slots, one starting at
 * a page offset that is not a multiple of 64, delivers equal RAM.
 *
 * In-process (vm_create, the test thread owns the memory map): mapping and
 * unmapping over guest RAM while dirty logging is on re-slots RAM and loses
 * no dirty page; a running guest whose data page is replaced by an MMIO
 * region keeps working through exits dispatched by the vCPU thread.
 *
 * Everything here needs KVM (skipped without /dev/kvm), except the thread
 * backend's empty answer.
 */
#include "../harness.h"

#include <jansson.h>
#include <unistd.h>

#include "kvm/kvm-slots.h"
#include "memory/memmap.h"
#include "vm/vm-internal.h"
#include "vmproc.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

#define PAGE 4096ull
#define BAR_WINDOW 0xa0000ull   /* vmm/vm/vm-devices.c */

/* ---- through the control socket ----------------------------------------- */

static uint64_t getu(json_t *o, const char *key)
{
	return (uint64_t)geti(o, key);
}

/*
 * @q (x-query-memslots) must show: a view of guest RAM [0, mem) with
 * @ndev 4 KiB BARs at BAR_WINDOW and nothing else, and one KVM slot per
 * RAM range of it, same gpa, size, region and offset, dirty-logged or not
 * as @dirty says. Returns the number of slots.
 */
static unsigned check_slots(json_t *q, uint64_t mem, unsigned ndev, bool dirty)
{
	json_t *slots = json_object_get(q, "slots"), *view = json_object_get(q, "view");
	uint64_t end = 0, ram_bytes = 0;
	unsigned nram = 0, nbar = 0;
	size_t i, j;

	ASSERT_STREQ(gets(q, "backend"), "kvm");
	ASSERT(json_is_array(slots) && json_is_array(view));
	ASSERT(json_is_object(json_object_get(q, "memmap")));
	ASSERT_EQ(geti(json_object_get(q, "memmap"), "ranges"),
		  (long long)json_array_size(view));
	ASSERT(json_object_get(q, "error") == NULL);
	ASSERT_EQ(geti(q, "unmapped-ram-ranges"), 0);
	for (i = 0; i < json_array_size(view); i++) {
		json_t *r = json_array_get(view, i);
		bool found = false;

		/* Contiguous from 0: no hole anywhere in [0, mem). */
		ASSERT_EQ_U64(getu(r, "gpa"), end);
		end += getu(r, "size");
		if (!strcmp(gets(r, "kind"), "mmio")) {
			ASSERT_EQ_U64(getu(r, "gpa"), BAR_WINDOW + nbar * PAGE);
			ASSERT_EQ_U64(getu(r, "size"), PAGE);
			ASSERT_STREQ(gets(r, "region"), test_fmt("virtio%u.bar0", nbar));
			nbar++;
			continue;
		}
		ASSERT_STREQ(gets(r, "region"), "ram0");
		ASSERT_EQ_U64(getu(r, "offset"), getu(r, "gpa"));
		nram++;
		ram_bytes += getu(r, "size");
		for (j = 0; j < json_array_size(slots); j++) {
			json_t *s = json_array_get(slots, j);

			if (getu(s, "gpa") != getu(r, "gpa"))
				continue;
			ASSERT(!found);
			found = true;
			ASSERT_EQ_U64(getu(s, "size"), getu(r, "size"));
			ASSERT_EQ_U64(getu(s, "offset"), getu(r, "offset"));
			ASSERT_STREQ(gets(s, "region"), "ram0");
			ASSERT(json_is_true(json_object_get(s, "guest-ram")));
			ASSERT_EQ(json_is_true(json_object_get(s, "dirty-log")), dirty);
			ASSERT_LT(geti(s, "slot"), geti(q, "slot-limit"));
		}
		if (!found)
			FAIL("no slot for RAM range at %#llx: %s",
			     (unsigned long long)getu(r, "gpa"), json_dumps(q, 0));
	}
	ASSERT_EQ_U64(end, mem);
	ASSERT_EQ(nbar, ndev);
	ASSERT_EQ_U64(ram_bytes, mem - ndev * PAGE);
	ASSERT_EQ((long long)json_array_size(slots), nram);
	return nram;
}

static json_t *memslots(struct proc *p)
{
	return call(p, "x-query-memslots", NULL);
}

TEST(memslot_kvm_one_slot_without_devices)
{
	struct proc p;
	json_t *q, *s;

	need_backend("kvm");
	vm_spawn(&p, "vm", "--backend kvm --mem 256M --devices 0");
	q = memslots(&p);
	ASSERT_EQ(check_slots(q, 256ull << 20, 0, false), 1);
	s = json_array_get(json_object_get(q, "slots"), 0);
	ASSERT_EQ_U64(getu(s, "gpa"), 0);
	ASSERT_EQ_U64(getu(s, "size"), 256ull << 20);
	ASSERT(!json_is_true(json_object_get(q, "dirty-logging")));
	json_decref(q);
	vm_quit(&p);
}

TEST(memslot_thread_no_slots)
{
	struct proc p;
	json_t *q;

	vm_spawn(&p, "vm", "--backend thread --mem 256M");
	q = memslots(&p);
	ASSERT_STREQ(gets(q, "backend"), "thread");
	ASSERT_EQ((long long)json_array_size(json_object_get(q, "slots")), 0);
	/* The map is the same on both backends: RAM around two BARs. */
	ASSERT_EQ((long long)json_array_size(json_object_get(q, "view")), 4);
	ASSERT_EQ(geti(json_object_get(q, "memmap"), "ranges"), 4);
	ASSERT_GE(geti(json_object_get(q, "memmap"), "rebuilds"), 1);
	json_decref(q);
	vm_quit(&p);
}

/* Save a running guest to a file and restore it in a new process: the
 * slots (guest RAM split around the BARs) are the same on both sides, RAM
 * digests are equal, and the restored guest verifies clean. */
TEST(memslot_kvm_slots_survive_restore)
{
	const char *img = test_fmt("%s/vm.img", test_tmpdir());
	char digest[64], loaded[64];
	struct proc a, b;
	json_t *qa, *qb, *v;
	long long gen_saved;

	need_backend("kvm");
	/* A slow guest: the point is the slots, not convergence (a file
	 * migration under ThreadSanitizer moves ~30 MB/s). */
	vm_spawn(&a, "src", "--backend kvm --mem 1G "
		 "--workload dirty,ws=256M,rate=5");
	qa = memslots(&a);
	ASSERT_EQ(check_slots(qa, 1ull << 30, 2, false), 2);
	wait_generation(&a, 1000);
	call(&a, "migrate", json_pack("{s:s}", "uri", test_fmt("file:%s", img)));
	wait_migration(&a, "completed");
	gen_saved = generation(&a);
	ram_digest(&a, digest);
	vm_quit(&a);

	vm_spawn(&b, "dst", test_fmt("--backend kvm --mem 1G --paused "
				     "--incoming file:%s", img));
	wait_loaded(&b);
	ASSERT_STREQ(status_of(&b), "paused");
	qb = memslots(&b);
	ASSERT_EQ(check_slots(qb, 1ull << 30, 2, false), 2);
	ASSERT(json_equal(json_object_get(qa, "slots"), json_object_get(qb, "slots")));
	ASSERT(json_equal(json_object_get(qa, "view"), json_object_get(qb, "view")));
	ASSERT_EQ(generation(&b), gen_saved);
	ram_digest(&b, loaded);
	ASSERT_STREQ(loaded, digest);
	call(&b, "cont", NULL);
	wait_generation(&b, gen_saved + 100);
	v = verify(&b);
	ASSERT_EQ(geti(v, "bad-pages"), 0);
	json_decref(v);
	json_decref(qa);
	json_decref(qb);
	vm_quit(&b);
}

/*
 * Live migration with guest RAM in two slots, the second one starting at
 * page 165 (160 + 5 BARs), 37 bits into a bitmap word: the source logs
 * both slots while it migrates, and the guest's writes during the
 * migration land where they belong (equal digests, clean verify).
 */
TEST(memslot_kvm_live_split_ram)
{
	const char *args = "--backend kvm --mem 512M --devices 5";
	struct proc s, d;
	json_t *q;
	bool seen_logging = false;
	char digest[64], loaded[64];
	int port = free_port();

	need_backend("kvm");
	vm_spawn(&s, "src", test_fmt("%s --workload dirty,ws=128M,rate=20", args));
	vm_spawn(&d, "dst", test_fmt("%s --paused --incoming tcp:127.0.0.1:%d",
				     args, port));
	q = memslots(&s);
	ASSERT_EQ(check_slots(q, 512ull << 20, 5, false), 2);
	json_decref(q);
	wait_generation(&s, 5000);
	/* A capped link keeps the migration going long enough to look. */
	json_decref(call(&s, "migrate-set-parameters",
			 json_pack("{s:I}", "max-bandwidth", (json_int_t)(128 << 20))));
	json_decref(call(&s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	for (int i = 0; i < 20000; i++) {
		json_t *m = call(&s, "query-migrate", NULL);
		bool done = !strcmp(gets(m, "status"), "completed") ||
			    !strcmp(gets(m, "status"), "failed");

		json_decref(m);
		if (done)
			break;
		q = memslots(&s);
		if (json_is_true(json_object_get(q, "dirty-logging"))) {
			/* Every slot of guest RAM is logged. */
			check_slots(q, 512ull << 20, 5, true);
			seen_logging = true;
		}
		json_decref(q);
		usleep(2000);
	}
	wait_migration(&s, "completed");
	ASSERT(seen_logging);
	/* Logging ends with the migration. */
	for (int i = 0; i < 500; i++) {
		q = memslots(&s);
		if (!json_is_true(json_object_get(q, "dirty-logging")))
			break;
		json_decref(q);
		q = NULL;
		usleep(10000);
	}
	ASSERT_PTR(q);
	check_slots(q, 512ull << 20, 5, false);
	json_decref(q);

	ram_digest(&s, digest);
	ram_digest(&d, loaded);
	ASSERT_STREQ(loaded, digest);
	q = memslots(&d);
	check_slots(q, 512ull << 20, 5, false);
	json_decref(q);
	cont_verified(&d);
	vm_quit(&s);
	vm_quit(&d);
}

/* ---- in-process: the test thread owns the memory map ------------------- */

static struct vm *kvm_vm(const char *workload, bool paused)
{
	struct vm_config cfg = {
		.mem = 64ull << 20, .vcpus = 1, .backend = VM_BACKEND_KVM,
		.ndevices = 0, .paused = paused,
	};
	struct ferry_error err = { 0 };
	struct vm *vm;

	need_backend("kvm");
	ASSERT_OK_E(vm_parse_workload(workload, &cfg.workload, &err), err);
	vm = vm_create(&cfg, &err);
	if (!vm)
		FAIL("vm_create: %s", err.msg);
	ASSERT_OK_E(vm_start(vm, &err), err);
	return vm;
}

static void report(struct vm *vm, struct kvm_slots_report *rep)
{
	backend_kvm_memslots(vm->be_priv, rep);
	if (rep->error[0])
		FAIL("memslot error: %s", rep->error);
	ASSERT_EQ_U64(rep->unmapped, 0);
}

static uint64_t popcount(const uint64_t *bm, size_t words)
{
	uint64_t n = 0;

	for (size_t w = 0; w < words; w++)
		n += (uint64_t)__builtin_popcountll(bm[w]);
	return n;
}

static uint64_t nop_read(void *opaque, uint64_t off, unsigned size)
{
	(void)opaque, (void)off, (void)size;
	return 0;
}

static void nop_write(void *opaque, uint64_t off, uint64_t val, unsigned size)
{
	(void)opaque, (void)off, (void)val, (void)size;
}

static const struct memmap_mmio_ops nop_ops = { nop_read, nop_write };

/*
 * With dirty logging on (and the guest stopped, so only the map changes
 * dirty anything): an MMIO region mapped over guest RAM at page 8197 (5
 * bits into a word) splits the one slot into two logged slots; the deleted
 * slot's pages all come back dirty at the next sync (KVM dropped its log,
 * so the backend must assume the worst), and nothing after that. Unmapped
 * again, the two slots merge back into one, and every page except the two
 * under the region comes back dirty.
 */
TEST(memslot_kvm_remap_while_logging)
{
	struct vm *vm = kvm_vm("idle", true);
	const uint64_t pages = (64ull << 20) / PAGE, at = GUEST_DATA_GPA + 5 * PAGE;
	size_t words = (size_t)(pages / 64);
	uint64_t *bm = calloc(words, sizeof(uint64_t));
	struct kvm_slots_report *rep = calloc(1, sizeof(*rep));
	struct ferry_error err = { 0 };
	struct memmap_region *dev;

	ASSERT(bm && rep);
	ASSERT_EQ((long long)(at / PAGE % 64), 5);
	report(vm, rep);
	ASSERT_EQ(rep->nr, 1);
	ASSERT(!rep->slot[0].dirty_log);

	ASSERT_OK_E(vm->be->dirty_start(vm->be_priv, &err), err);
	report(vm, rep);
	ASSERT(rep->dirty_logging && rep->slot[0].dirty_log);
	ASSERT_OK_E(vm->be->dirty_sync(vm->be_priv, bm, false, &err), err);
	ASSERT_EQ_U64(popcount(bm, words), 0);

	dev = memmap_region_new_mmio(vm->memmap, "dev", 2 * PAGE, &nop_ops, NULL, &err);
	ASSERT_PTR(dev);
	ASSERT_OK_E(memmap_add_subregion(memmap_root(vm->memmap), at, dev, 1, &err), err);
	report(vm, rep);
	ASSERT_EQ(rep->nr, 2);
	for (unsigned i = 0; i < 2; i++) {
		const struct kvm_slot_info *s = &rep->slot[i];

		ASSERT(s->dirty_log && s->guest_ram);
		ASSERT_EQ_U64(s->offset, s->gpa);
		if (s->gpa == 0)
			ASSERT_EQ_U64(s->size, at);
		else
			ASSERT(s->gpa == at + 2 * PAGE &&
			       s->size == (64ull << 20) - at - 2 * PAGE);
	}
	ASSERT_OK_E(vm->be->dirty_sync(vm->be_priv, bm, false, &err), err);
	ASSERT_EQ_U64(popcount(bm, words), pages);
	memset(bm, 0, words * 8);
	ASSERT_OK_E(vm->be->dirty_sync(vm->be_priv, bm, false, &err), err);
	ASSERT_EQ_U64(popcount(bm, words), 0);

	ASSERT_OK_E(memmap_del_subregion(dev, &err), err);
	report(vm, rep);
	ASSERT_EQ(rep->nr, 1);
	ASSERT(rep->slot[0].gpa == 0 && rep->slot[0].size == 64ull << 20);
	ASSERT(rep->slot[0].dirty_log);
	ASSERT_OK_E(vm->be->dirty_sync(vm->be_priv, bm, false, &err), err);
	ASSERT_EQ_U64(popcount(bm, words), pages - 2);
	ASSERT(!(bm[at / PAGE / 64] >> (at / PAGE % 64) & 3));

	vm->be->dirty_stop(vm->be_priv);
	report(vm, rep);
	ASSERT(!rep->dirty_logging && !rep->slot[0].dirty_log);
	ASSERT_ERR(vm->be->dirty_sync(vm->be_priv, bm, false, &err), -EINVAL);

	memmap_region_free(dev);
	vm_destroy(vm);
	free(bm);
	free(rep);
}

/* A page of "RAM" behind MMIO callbacks: what the guest stores, it reads
 * back. Counters are read by the test while the guest runs. */
struct shadow {
	uint8_t mem[4096];
	uint64_t reads, writes;
};

static uint64_t shadow_read(void *opaque, uint64_t off, unsigned size)
{
	struct shadow *s = opaque;
	uint64_t v = 0;

	memcpy(&v, s->mem + off, size);
	__atomic_add_fetch(&s->reads, 1, __ATOMIC_RELAXED);
	return v;
}

static void shadow_write(void *opaque, uint64_t off, uint64_t val, unsigned size)
{
	struct shadow *s = opaque;

	memcpy(s->mem + off, &val, size);
	__atomic_add_fetch(&s->writes, 1, __ATOMIC_RELAXED);
}

static const struct memmap_mmio_ops shadow_ops = { shadow_read, shadow_write };

static uint64_t guest_verify(struct vm *vm)
{
	struct ferry_error err = { 0 };
	struct vm_guest_info gi;
	uint64_t seq = vm_guest_verify(vm);

	ASSERT_OK_E(vm_guest_wait_verify(vm, seq, 60000, &err), err);
	vm_guest_info(vm, &gi);
	return gi.bad_pages;
}

/*
 * A running guest rewrites 4 data pages; data page 1 is replaced, while
 * the guest runs, by an MMIO region that behaves like RAM. Its stores and
 * its verify pass's loads now exit and the vCPU thread dispatches them to
 * the region through the flat view (reads fill the exit's data, which KVM
 * hands to the guest), so the guest still verifies clean. Unmapped again
 * (paused, the page copied back), it carries on from RAM.
 */
TEST(memslot_kvm_mmio_dispatch_guest)
{
	struct vm *vm = kvm_vm("dirty,ws=16K,rate=1,pattern=seq", false);
	const uint64_t at = GUEST_DATA_GPA + PAGE;
	struct kvm_slots_report *rep = calloc(1, sizeof(*rep));
	struct shadow *sh = calloc(1, sizeof(*sh));
	struct ferry_error err = { 0 };
	struct memmap_region *dev;
	struct vm_guest_info gi;
	uint64_t g0;

	ASSERT(rep && sh);
	for (int i = 0; i < 3000; i++) {
		vm_guest_info(vm, &gi);
		if (gi.generation >= 100)
			break;
		usleep(10000);
	}
	ASSERT_GE(gi.generation, 100);

	memcpy(sh->mem, vm_ram(vm) + at, sizeof(sh->mem));
	dev = memmap_region_new_mmio(vm->memmap, "shadow", PAGE, &shadow_ops, sh, &err);
	ASSERT_PTR(dev);
	ASSERT_OK_E(memmap_add_subregion(memmap_root(vm->memmap), at, dev, 1, &err), err);
	report(vm, rep);
	ASSERT_EQ(rep->nr, 2);

	/* Two whole page writes at least: the page is the guest's again. */
	for (int i = 0; i < 6000 && __atomic_load_n(&sh->writes, __ATOMIC_RELAXED) <
					   3 * 512; i++)
		usleep(10000);
	ASSERT_GE(__atomic_load_n(&sh->writes, __ATOMIC_RELAXED), 3 * 512);
	ASSERT_EQ_U64(guest_verify(vm), 0);
	ASSERT_GE(__atomic_load_n(&sh->reads, __ATOMIC_RELAXED), 512);
	report(vm, rep);
	ASSERT_GE(rep->mmio_exits, 3 * 512 + 512);
	ASSERT_EQ_U64(rep->mmio_hole, 0);
	ASSERT_EQ_U64(rep->mmio_ram, 0);
	ASSERT(!vm->be->failed(vm->be_priv, (char[64]){0}, 64));

	ASSERT_OK_E(vm_stop(vm, &err), err);
	ASSERT_OK_E(memmap_del_subregion(dev, &err), err);
	memcpy(vm_ram(vm) + at, sh->mem, sizeof(sh->mem));
	report(vm, rep);
	ASSERT_EQ(rep->nr, 1);
	vm_guest_info(vm, &gi);
	g0 = gi.generation;
	ASSERT_OK_E(vm_cont(vm, &err), err);
	for (int i = 0; i < 3000; i++) {
		vm_guest_info(vm, &gi);
		if (gi.generation >= g0 + 20)
			break;
		usleep(10000);
	}
	ASSERT_GE(gi.generation, g0 + 20);
	ASSERT_EQ_U64(guest_verify(vm), 0);

	ASSERT_OK_E(vm_stop(vm, &err), err);
	memmap_region_free(dev);
	vm_destroy(vm);
	free(rep);
	free(sh);
}

/*
 * Map and unmap a region over guest RAM, again and again, while the guest
 * runs flat out: every change deletes the slot holding the guest's code,
 * stack and page tables and creates new ones. The guest must not notice
 * (no failure, clean verify), and nothing is left behind.
 */
TEST(memslot_kvm_remap_running_guest)
{
	struct vm *vm = kvm_vm("dirty,ws=1M,rate=0", false);
	const uint64_t at = (64ull << 20) - 16 * PAGE;   /* outside the ws */
	struct kvm_slots_report *rep = calloc(1, sizeof(*rep));
	struct ferry_error err = { 0 };
	struct memmap_region *dev;
	struct vm_guest_info gi;
	char msg[320] = "";
	uint64_t g0;

	ASSERT_PTR(rep);
	dev = memmap_region_new_mmio(vm->memmap, "dev", PAGE, &nop_ops, NULL, &err);
	ASSERT_PTR(dev);
	vm_guest_info(vm, &gi);
	g0 = gi.generation;
	for (int i = 0; i < 200; i++) {
		ASSERT_OK_E(memmap_add_subregion(memmap_root(vm->memmap), at, dev, 1,
						 &err), err);
		ASSERT_OK_E(memmap_del_subregion(dev, &err), err);
		if (vm->be->failed(vm->be_priv, msg, sizeof(msg)))
			FAIL("after %d remaps: %s", i + 1, msg);
	}
	report(vm, rep);
	ASSERT_EQ(rep->nr, 1);
	for (int i = 0; i < 3000; i++) {
		vm_guest_info(vm, &gi);
		if (gi.generation >= g0 + 1000)
			break;
		usleep(10000);
	}
	ASSERT_GE(gi.generation, g0 + 1000);
	ASSERT_EQ_U64(guest_verify(vm), 0);
	ASSERT(!vm->be->failed(vm->be_priv, msg, sizeof(msg)));

	ASSERT_OK_E(vm_stop(vm, &err), err);
	memmap_region_free(dev);
	vm_destroy(vm);
	free(rep);
}
