/*
 * tests/e2e/test-devices-vm.c - `ferry vm --device bulk,...` end to end:
 * VMs with devices of large, changing, verifiable state (VFIO-style),
 * migrated live with a dirtying guest, their state over multifd with load
 * threads or on the main channel, and proven: the devices' own stamp
 * checks pass on both sides, their state digests are equal, RAM digests
 * are equal, the guest verifies clean.
 */
#include "../harness.h"

#include <unistd.h>

#include "vmproc.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

/* Every device's stamps check out on @p; its list (caller frees). */
static json_t *device_verify(struct proc *p, unsigned n)
{
	json_t *r = call(p, "device-verify", NULL);
	json_t *l = json_object_get(r, "devices");

	ASSERT_EQ(json_array_size(l), n);
	for (unsigned i = 0; i < n; i++)
		ASSERT_EQ(geti(json_array_get(l, i), "bad-chunks"), 0);
	return r;
}

static void assert_devices_equal(json_t *a, json_t *b, unsigned n)
{
	json_t *la = json_object_get(a, "devices"), *lb = json_object_get(b, "devices");

	for (unsigned i = 0; i < n; i++) {
		json_t *x = json_array_get(la, i), *y = json_array_get(lb, i);

		ASSERT_STREQ(gets(x, "id"), gets(y, "id"));
		ASSERT_EQ(geti(x, "size"), geti(y, "size"));
		ASSERT_STREQ(gets(x, "digest"), gets(y, "digest"));
	}
}

/*
 * @n devices of @size each, dirtying at @rate MB/s (with precopy unless
 * @precopy_off), a guest dirtying memory; device state on @channel;
 * @extra params for both sides (JSON object, may be NULL), @caps a list of
 * capabilities to turn on on both sides (may be NULL).
 */
static void devices(const char *backend, unsigned n, const char *size,
		    unsigned rate, bool precopy_off, const char *channel,
		    json_t *extra, const char *const *caps)
{
	char spec[512] = "", d1[64], d2[64];
	struct proc s, d;
	json_t *m, *vs, *vd, *ph, *list;
	int port = free_port();

	need_backend(backend);
	for (unsigned i = 0; i < n; i++)
		snprintf(spec + strlen(spec), sizeof(spec) - strlen(spec),
			 " --device bulk,size=%s,dirty-rate=%u%s", size, rate,
			 precopy_off ? ",precopy=off" : "");
	vm_spawn(&s, "src", test_fmt("--backend %s --mem 256M --workload "
		 "dirty,ws=64M,rate=100%s --device-state-channel %s", backend,
		 spec, channel));
	vm_spawn(&d, "dst", test_fmt("--backend %s --mem 256M%s --incoming "
		 "defer --paused --device-state-channel %s", backend, spec,
		 channel));
	/* A sanitizer build sends several times slower while the guest
	 * dirties as fast: let the VMM throttle it. */
	if (slow_build())
		json_decref(call(&s, "migrate-set-capabilities", json_pack(
			"{s:[{s:s, s:b}]}", "capabilities", "capability",
			"auto-converge", "state", 1)));
	for (const char *const *c = caps; c && *c; c++) {
		json_t *a = json_pack("{s:[{s:s, s:b}]}", "capabilities",
				      "capability", *c, "state", 1);

		json_decref(call(&s, "migrate-set-capabilities", json_incref(a)));
		json_decref(call(&d, "migrate-set-capabilities", a));
	}
	if (extra) {
		json_decref(call(&s, "migrate-set-parameters", json_incref(extra)));
		json_decref(call(&d, "migrate-set-parameters", extra));
	}
	json_decref(call(&d, "migrate-incoming", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	wait_generation(&s, 2000);
	json_decref(call(&s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	wait_migration(&s, "completed");

	m = call(&s, "query-migrate", NULL);
	list = json_object_get(m, "devices");
	ASSERT_EQ(json_array_size(list), n);
	ASSERT_GT(geti(json_object_get(m, "device-state"), "switchover-bytes"), 0);
	if (precopy_off)   /* section markers only: no 64 KiB chunk went */
		ASSERT_LT(geti(json_object_get(m, "device-state"), "precopy-bytes"),
			  64 * 1024);
	else
		ASSERT_GT(geti(json_object_get(m, "device-state"), "precopy-bytes"), 0);
	for (const char *const *c = caps; c && *c; c++)
		if (!strcmp(*c, "switchover-ack"))
			ASSERT(json_is_true(json_object_get(m, "switchover-acked")));
	ph = json_object_get(m, "downtime-phases");
	ASSERT(json_is_number(json_object_get(ph, "device-data")));
	ASSERT(json_is_number(json_object_get(ph, "device-config")));
	json_decref(m);

	/* Both stopped (the destination is paused): the devices' state and
	 * RAM must be the same, and whole. */
	wait_loaded(&d);
	ASSERT_STREQ(status_of(&d), "paused");
	m = call(&d, "query-migrate", NULL);
	ASSERT_EQ(json_array_size(json_object_get(m, "devices")), n);
	ASSERT(json_number_value(json_object_get(json_array_get(
		json_object_get(m, "devices"), 0), "data-load-ms")) >= 0);
	json_decref(m);
	vs = device_verify(&s, n);
	vd = device_verify(&d, n);
	assert_devices_equal(vs, vd, n);
	json_decref(vs);
	json_decref(vd);
	ram_digest(&s, d1);
	ram_digest(&d, d2);
	ASSERT_STREQ(d1, d2);

	/* It runs on there: the guest verifies, the devices keep changing
	 * and stay whole. */
	cont_verified(&d);
	if (rate) {
		usleep(300000);
		vd = device_verify(&d, n);
		json_decref(vd);
	}
	vm_quit(&s);
	vm_quit(&d);
}

/*
 * The 4 x 512 MiB, each changing at 20 MB/s. Under
 * ThreadSanitizer the channels carry 35-40 MB/s, less than the devices'
 * 80 MB/s of changes, so precopy never converges (as it should not), and
 * starting two VMs with 2 GiB of state took 2.5 minutes: there the devices
 * are 64 MiB changing at 2 MB/s, which runs every thread and queue the
 * same way.
 */
#ifdef __SANITIZE_THREAD__
#define BIG_DEVICE "64M"
#define BIG_RATE 2
#else
#define BIG_DEVICE "512M"
#define BIG_RATE 20
#endif

#define DEVICE_TESTS(be)						\
TEST(devices_##be##_4x512M_multifd)					\
{ devices(#be, 4, BIG_DEVICE, BIG_RATE, false, "multifd", NULL, NULL); }	\
TEST(devices_##be##_4x512M_main)					\
{ devices(#be, 4, BIG_DEVICE, BIG_RATE, false, "main", NULL, NULL); }		\
TEST(devices_##be##_stop_copy_only_multifd)				\
{	/* All of it moves in the downtime, and the engine counts it. */	\
	devices(#be, 2, "256M", 0, true, "multifd",			\
		json_pack("{s:I}", "downtime-limit", (json_int_t)10000), NULL); \
}									\
TEST(devices_##be##_switchover_ack_capped)				\
{									\
	static const char *const caps[] = { "switchover-ack", NULL };	\
	devices(#be, 2, "128M", 20, false, "multifd",			\
		json_pack("{s:I}", "max-bandwidth",			\
			  (json_int_t)(256 << 20)), caps);		\
}
DEVICE_TESTS(kvm)
DEVICE_TESTS(thread)

/* A paused source: its devices cannot precopy, say at once that they
 * have no initial data to wait for, and switchover-ack lets the switch
 * happen. */
TEST(devices_thread_switchover_ack_paused_source)
{
	struct proc s, d;
	json_t *a, *m;
	int port = free_port();

	need_backend("thread");
	vm_spawn(&s, "src", "--backend thread --mem 128M --device "
		 "bulk,size=32M,dirty-rate=10");
	vm_spawn(&d, "dst", "--backend thread --mem 128M --device bulk,size=32M "
		 "--incoming defer --paused");
	a = json_pack("{s:[{s:s, s:b}]}", "capabilities", "capability",
		      "switchover-ack", "state", 1);
	json_decref(call(&s, "migrate-set-capabilities", json_incref(a)));
	json_decref(call(&d, "migrate-set-capabilities", a));
	json_decref(call(&s, "migrate-set-parameters", json_pack("{s:I}",
			 "switchover-ack-timeout", (json_int_t)5000)));
	json_decref(call(&d, "migrate-incoming", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	json_decref(call(&s, "stop", NULL));
	json_decref(call(&s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	wait_migration(&s, "completed");
	m = call(&s, "query-migrate", NULL);
	ASSERT(json_is_true(json_object_get(m, "switchover-acked")));
	json_decref(m);
	vm_quit(&s);
	vm_quit(&d);
}

/* The two sides disagree on the channel: refused at setup with a message
 * that names it, the source runs on, and a later migration with matching
 * settings succeeds. */
TEST(devices_channel_mismatch_then_ok)
{
	struct proc s, d, d2;
	char msg[1024];
	json_t *m;
	int port = free_port(), port2;

	need_backend("thread");
	vm_spawn(&s, "src", "--backend thread --mem 128M --workload "
		 "dirty,ws=32M,rate=50 --device bulk,size=32M,dirty-rate=10");
	vm_spawn(&d, "dst", test_fmt("--backend thread --mem 128M --device "
		 "bulk,size=32M --incoming tcp:127.0.0.1:%d "
		 "--device-state-channel main", port));
	json_decref(call(&s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	wait_migration(&s, "failed");
	m = call(&s, "query-migrate", NULL);
	snprintf(msg, sizeof(msg), "%s", gets(m, "error-desc"));
	json_decref(m);
	ASSERT_CONTAINS(msg, "device-state-channel");
	ASSERT_STREQ(status_of(&s), "running");
	vm_wait_exit(&d, 1);   /* a failed incoming VM exits */
	port2 = free_port();
	vm_spawn(&d2, "dst2", test_fmt("--backend thread --mem 128M --device "
		 "bulk,size=32M --incoming tcp:127.0.0.1:%d", port2));
	json_decref(call(&s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port2))));
	wait_migration(&s, "completed");
	vm_quit(&s);
	vm_quit(&d2);
}
