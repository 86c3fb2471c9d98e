/*
 * tests/e2e/test-devload-vm.c - the non-iterable load of many devices
 * inside one memory transaction, end to end: a source with 1024 virtio-like
 * devices whose BARs sit where a destination created afresh does not put
 * them (--bar-layout reversed), migrated live with a dirtying guest; the
 * destination remaps every BAR at the load, in one commit (or one per
 * device with device-load-transaction off), and ends up with the source's
 * memory map; RAM digests equal, the guest verifies clean, the devices'
 * state equal (the engine compares their digest before it lets the
 * destination run).
 */
#include "../harness.h"

#include "vmproc.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

/* The flat view as [gpa, size, region, kind] rows, comparable across VMs. */
static json_t *view_of(struct proc *p)
{
	json_t *m = call(p, "x-query-memslots", NULL);
	json_t *v = json_deep_copy(json_object_get(m, "view"));

	json_decref(m);
	return v;
}

static void devload(const char *backend, unsigned n, bool batched)
{
	char d1[64], d2[64];
	struct proc s, d;
	json_t *m, *vs, *vd;
	int port = free_port();

	need_backend(backend);
	vm_spawn(&s, "src", test_fmt("--backend %s --mem 256M --workload "
		 "dirty,ws=32M,rate=50 --devices %u --bar-layout reversed",
		 backend, n));
	vm_spawn(&d, "dst", test_fmt("--backend %s --mem 256M --devices %u "
		 "--incoming defer --paused", backend, n));
	json_decref(call(&d, "migrate-set-parameters", json_pack("{s:b}",
			 "device-load-transaction", batched)));
	json_decref(call(&d, "migrate-incoming", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	wait_generation(&s, 2000);
	json_decref(call(&s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	wait_migration(&s, "completed");
	m = call(&s, "query-migrate", NULL);
	ASSERT(json_number_value(json_object_get(json_object_get(m,
		"downtime-phases"), "device-load")) > 0);
	json_decref(m);

	wait_loaded(&d);
	ASSERT_STREQ(status_of(&d), "paused");
	m = call(&d, "query-migrate", NULL);
	ASSERT(json_is_boolean(json_object_get(m, "device-load-transaction")));
	ASSERT_EQ(json_is_true(json_object_get(m, "device-load-transaction")),
		  batched);
	if (batched) {
		/* Every BAR moved, yet one commit and one rebuild. */
		ASSERT_EQ(geti(m, "memory-commits"), 1);
		ASSERT_EQ(geti(m, "flatview-rebuilds"), 1);
	} else {
		ASSERT_GE(geti(m, "memory-commits"), n);
		ASSERT_GE(geti(m, "flatview-rebuilds"), n);
	}
	json_decref(m);
	/* The destination's map is the source's: the BARs were remapped. */
	vs = view_of(&s);
	vd = view_of(&d);
	ASSERT_GT(json_array_size(vs), n);
	ASSERT(json_equal(vs, vd));
	json_decref(vs);
	json_decref(vd);
	ram_digest(&s, d1);
	ram_digest(&d, d2);
	ASSERT_STREQ(d1, d2);
	cont_verified(&d);
	vm_quit(&s);
	vm_quit(&d);
}

TEST(devload_kvm_1024_batched) { devload("kvm", 1024, true); }
TEST(devload_thread_1024_batched) { devload("thread", 1024, true); }
TEST(devload_thread_256_per_device) { devload("thread", 256, false); }
