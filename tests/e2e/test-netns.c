/*
 * tests/e2e/test-netns.c - live migration across "hosts": the source VM in
 * one network namespace, the destination in another, joined by a link
 * ferry-linkemu shapes (tests/e2e/netns.h): a round trip, a rate, loss, an
 * outage that heals and one that does not. Each ends with the guest's own
 * verify pass finding 0 bad pages (on the destination, or on the source
 * when the migration must fail).
 *
 * FERRY_NETNS_VERBOSE=1 prints each migration's figures.
 */
#include "../harness.h"

#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "netns.h"
#include "vmproc.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

struct pair {
	struct netlink_pair l;
	struct proc s, d;
};

static void set_caps(struct proc *p, bool autoconv)
{
	json_decref(call(p, "migrate-set-capabilities",
			 json_pack("{s:[{s:s, s:b}]}", "capabilities",
				   "capability", "auto-converge", "state",
				   autoconv)));
}

/*
 * The link, the source (running @workload) on side a, and the destination
 * on side b: paused after the load, its incoming port opened with
 * migrate-incoming so @dest_params (or NULL) apply to it.
 */
static void start_with(struct pair *p, const char *shape, const char *workload,
		       long long pages, json_t *dest_params, bool tls)
{
	netns_up(&p->l, shape);
	vm_spawn_ns(&p->s, p->l.ns[0], "src", test_fmt("--backend auto "
		    "--mem 256M --workload %s", workload));
	vm_spawn_ns(&p->d, p->l.ns[1], "dst", "--backend auto --mem 256M "
		    "--paused --incoming defer");
	if (tls) {
		/* A test CA whose server certificate names side b's address,
		 * which the source checks (the host of its URI). */
		const char *dir = test_fmt("%s/tls", test_tmpdir());
		char *out = NULL;

		if (test_run(&out, "openssl version") != 0)
			SKIP("the openssl command-line tool is not installed");
		free(out);
		if (test_run(&out, "scripts/gen-certs.sh --server-name %s %s",
			     p->l.addr[1], dir) != 0)
			FAIL("gen-certs.sh: %s", out);
		free(out);
		if (!dest_params)
			dest_params = json_object();
		json_object_set_new(dest_params, "tls-creds", json_string(dir));
		json_decref(call(&p->s, "migrate-set-parameters",
				 json_pack("{s:s}", "tls-creds", dir)));
	}
	if (dest_params)
		json_decref(call(&p->d, "migrate-set-parameters", dest_params));
	json_decref(call(&p->d, "migrate-incoming", json_pack("{s:s}", "uri",
			 test_fmt("tcp:%s:%d", p->l.addr[1], NETNS_PORT))));
	/* A sanitizer build sends several times slower while the guest
	 * dirties as fast: let the VMM throttle it. */
	set_caps(&p->s, slow_build());
	/* Let the guest dirty its working set (@pages) first. */
	wait_generation(&p->s, pages);
}

static void start(struct pair *p, const char *shape, const char *workload,
		  long long pages, json_t *dest_params)
{
	start_with(p, shape, workload, pages, dest_params, false);
}

/* A new destination on side b (the last one is gone), waiting on the
 * same port with the default settings. */
static void fresh_dest(struct pair *p)
{
	vm_spawn_ns(&p->d, p->l.ns[1], "dst2", "--backend auto --mem 256M "
		    "--paused --incoming defer");
	json_decref(call(&p->d, "migrate-incoming", json_pack("{s:s}", "uri",
			 test_fmt("tcp:%s:%d", p->l.addr[1], NETNS_PORT))));
}

static void migrate(struct pair *p)
{
	json_decref(call(&p->s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:%s:%d", p->l.addr[1], NETNS_PORT))));
}

/* Wait until precopy is active with at least @bytes sent. */
static void wait_transferred(struct proc *s, long long bytes)
{
	for (int i = 0; i < 6000; i++) {
		json_t *m = call(s, "query-migrate", NULL);
		const char *st = gets(m, "status");
		bool there = !strcmp(st, "active") &&
			     geti(json_object_get(m, "ram"), "transferred") >= bytes;

		if (strcmp(st, "active") && strcmp(st, "setup"))
			FAIL("migration %s before %lld bytes: %s", st, bytes,
			     json_dumps(m, 0));
		json_decref(m);
		if (there)
			return;
		usleep(10000);
	}
	FAIL("migration never sent %lld bytes", bytes);
}

/*
 * The migration completed on both sides, the RAM digests match with both
 * stopped, the destination runs the guest on and its verify pass finds 0
 * bad pages; the packets went through the emulator. Returns the source's
 * query-migrate.
 */
static json_t *completed(struct pair *p, const char *label)
{
	char digest[64], loaded[64];
	struct netlink_stats ab;
	json_t *m;
	long long g;

	wait_migration(&p->s, "completed");
	/* The destination completes right after its ack: wait for it too. */
	wait_migration(&p->d, "completed");
	m = call(&p->s, "query-migrate", NULL);
	ASSERT_STREQ(gets(m, "status"), "completed");
	ASSERT_STREQ(gets(m, "switchover"), "done");
	ASSERT_STREQ(status_of(&p->s), "postmigrate");
	ASSERT_STREQ(status_of(&p->d), "paused");
	ram_digest(&p->s, digest);
	ram_digest(&p->d, loaded);
	ASSERT_STREQ(loaded, digest);
	cont_verified(&p->d);
	g = generation(&p->d);
	wait_generation(&p->d, g + 100);
	netns_stats(&p->l, "ab", &ab);
	ASSERT_GE(ab.tx_bytes, (uint64_t)geti(json_object_get(m, "ram"),
					      "transferred"));
	if (getenv("FERRY_NETNS_VERBOSE"))
		fprintf(stderr, "  %s: total %lld ms, downtime %lld ms, %lld MiB, "
			"%.0f Mbit/s, %lld passes, throttle %lld%%; a->b %llu "
			"packets, %llu lost, %llu tail-dropped, %llu down\n", label,
			geti(m, "total-time"), geti(m, "downtime"),
			geti(json_object_get(m, "ram"), "transferred") >> 20,
			json_number_value(json_object_get(json_object_get(m, "ram"),
							  "mbps")),
			geti(json_object_get(m, "ram"), "dirty-sync-count"),
			geti(m, "cpu-throttle-percentage"),
			(unsigned long long)ab.rx, (unsigned long long)ab.lost,
			(unsigned long long)ab.tail_drop,
			(unsigned long long)ab.down_drop);
	return m;
}

static void finish(struct pair *p)
{
	vm_quit(&p->s);
	vm_quit(&p->d);
	netns_down(&p->l);
}

/* 10 ms round trip at 1 Gbit/s: a dirtying guest migrates live. */
TEST(netns_link_10ms_1gbit)
{
	struct pair p;
	json_t *m;

	start(&p, "delay=5 rate=1G", "dirty,ws=64M,rate=50", 16384, NULL);
	migrate(&p);
	m = completed(&p, "10 ms, 1 Gbit/s");
	/* Every connection needs a round trip before the first page. */
	ASSERT_GE(geti(m, "total-time"), 10);
	json_decref(m);
	finish(&p);
}

/*
 * The link goes down for 2 s in the middle of precopy. With peer-timeout
 * (5 s here, both sides) longer than the outage, TCP retransmits once the
 * link is back and the migration carries on and completes.
 */
static void outage_2s(bool tls)
{
	struct netlink_stats ab;
	struct pair p;
	json_t *m;

	start_with(&p, "delay=5 rate=1G", "dirty,ws=64M,rate=20", 4096,
		   json_pack("{s:i}", "peer-timeout", 5000), tls);
	json_decref(call(&p.s, "migrate-set-parameters", json_pack("{s:i, s:i}",
			 "peer-timeout", 5000, "max-bandwidth", 16 << 20)));
	migrate(&p);
	wait_transferred(&p.s, 8 << 20);
	netns_shape(&p.l, "down");
	usleep(2000000);
	m = call(&p.s, "query-migrate", NULL);
	ASSERT_STREQ(gets(m, "status"), "active");
	json_decref(m);
	netns_stats(&p.l, "ab", &ab);
	ASSERT_GT(ab.down_drop, 0);
	netns_shape(&p.l, "up");
	json_decref(call(&p.s, "migrate-set-parameters",
			 json_pack("{s:i}", "max-bandwidth", 0)));
	m = completed(&p, tls ? "down 2 s, TLS" : "down 2 s");
	ASSERT_GE(geti(m, "total-time"), 2000);
	/* TLS sessions ride the outage out like plain TCP does. */
	ASSERT_EQ(json_is_object(json_object_get(m, "tls")), tls);
	json_decref(m);
	finish(&p);
}

TEST(netns_link_down_2s) { outage_2s(false); }
TEST(netns_link_down_2s_tls) { outage_2s(true); }

/*
 * The link goes down for good mid-precopy. The source hears nothing from
 * the destination and gives up after its peer-timeout (1 s): status
 * failed within that and some slack, the guest running on and verifying
 * clean. With the link back, a second migration to a fresh destination
 * completes.
 */
TEST(netns_link_down_for_good)
{
	const int timeout_ms = 1000;
	struct pair p;
	double t0, took = 0;
	json_t *m, *v;
	long long g;

	start(&p, "delay=5 rate=1G", "dirty,ws=64M,rate=20", 4096,
	      json_pack("{s:i}", "peer-timeout", timeout_ms));
	json_decref(call(&p.s, "migrate-set-parameters", json_pack("{s:i, s:i}",
			 "peer-timeout", timeout_ms, "max-bandwidth", 16 << 20)));
	migrate(&p);
	wait_transferred(&p.s, 8 << 20);
	netns_shape(&p.l, "down");
	t0 = now_ms();
	for (;;) {
		const char *st;

		m = call(&p.s, "query-migrate", NULL);
		st = gets(m, "status");
		took = now_ms() - t0;
		if (!strcmp(st, "failed"))
			break;
		if (strcmp(st, "active"))
			FAIL("migration %s, wanted failed: %s", st, json_dumps(m, 0));
		if (took > timeout_ms + 5000)
			FAIL("the source did not notice a dead link in %.0f ms", took);
		json_decref(m);
		usleep(5000);
	}
	if (getenv("FERRY_NETNS_VERBOSE"))
		fprintf(stderr, "  failed %.0f ms after the link went down: %s\n",
			took, gets(m, "error-desc"));
	/* Not before peer-timeout less the last heartbeat's age (a quarter
	 * of it, more on a busy machine), not long after. */
	ASSERT_GE(took, timeout_ms / 2);
	ASSERT_LE(took, timeout_ms + 1500);
	ASSERT_CONTAINS(gets(m, "error-desc"), "no word from the destination");
	json_decref(m);
	ASSERT_STREQ(status_of(&p.s), "running");
	g = generation(&p.s);
	wait_generation(&p.s, g + 100);
	v = verify(&p.s);
	ASSERT_EQ(geti(v, "bad-pages"), 0);
	json_decref(v);
	/* The destination gives up too, on its own: after its peer-timeout
	 * when its load reads the main stream, through TCP keepalive (set to
	 * the same timeout, on every connection) when it waits at a multifd
	 * sync point on channel reads. A failed incoming VM exits with 1. */
	vm_wait_exit(&p.d, 1);

	/* Link back: the source migrates again, to a fresh destination. */
	netns_shape(&p.l, "up");
	fresh_dest(&p);
	json_decref(call(&p.s, "migrate-set-parameters",
			 json_pack("{s:i}", "max-bandwidth", 0)));
	migrate(&p);
	json_decref(completed(&p, "after the outage"));
	finish(&p);
}

/*
 * The link silently dropping everything at the switchover, struck at an
 * exact point (a pause point, then the link down, then go on):
 * - @on_dest false: the source stopped its VM, its rest not sent. It
 *   sends into the dead link, hears nothing for its peer-timeout and
 *   resumes (no GO was ever sent); the destination, short of its rest,
 *   gives up by itself.
 * - @on_dest true: the destination loaded everything; its LOADED goes
 *   into the dead link. The source resumes as above; the destination,
 *   which cannot tell a lost LOADED from a lost GO, keeps the whole VM
 *   paused, in doubt. Never both running.
 */
static void down_at_switchover(bool on_dest)
{
	const int timeout_ms = 1000;
	const char *point = on_dest ? "pause-loaded" : "pause-stopped";
	struct proc *at;
	struct pair p;
	double t0;
	json_t *m, *v;

	start(&p, "delay=5 rate=1G", "dirty,ws=64M,rate=20", 4096,
	      json_pack("{s:i}", "peer-timeout", timeout_ms));
	json_decref(call(&p.s, "migrate-set-parameters", json_pack("{s:i}",
			 "peer-timeout", timeout_ms)));
	at = on_dest ? &p.d : &p.s;
	json_decref(call(at, "x-migrate-fault", json_pack("{s:s}", "point",
							  point)));
	migrate(&p);
	wait_paused_at(at, point);
	netns_shape(&p.l, "down");
	json_decref(call(at, "x-migrate-fault", json_pack("{s:s}", "point",
							  "continue")));
	t0 = now_ms();
	wait_migration(&p.s, "failed");
	if (now_ms() - t0 > timeout_ms + 3000)
		FAIL("the source noticed the dead link after %.0f ms",
		     now_ms() - t0);
	m = call(&p.s, "query-migrate", NULL);
	ASSERT_STREQ(gets(m, "switchover"), "aborted");
	json_decref(m);
	ASSERT_STREQ(status_of(&p.s), "running");
	v = verify(&p.s);
	ASSERT_EQ(geti(v, "bad-pages"), 0);
	json_decref(v);
	if (!on_dest) {
		vm_wait_exit(&p.d, 1);
	} else {
		wait_migration(&p.d, "failed");
		m = call(&p.d, "query-migrate", NULL);
		ASSERT_STREQ(gets(m, "switchover"), "in-doubt");
		json_decref(m);
		ASSERT_STREQ(status_of(&p.d), "paused");
	}
	/* The source's guest is the one that runs: it migrates on. */
	netns_shape(&p.l, "up");
	if (on_dest)
		vm_quit(&p.d);
	fresh_dest(&p);
	json_decref(call(&p.s, "migrate-set-parameters",
			 json_pack("{s:i}", "peer-timeout", 10000)));
	migrate(&p);
	wait_migration(&p.s, "completed");
	wait_loaded(&p.d);
	cont_verified(&p.d);
	finish(&p);
}

TEST(netns_link_down_switchover_stopped) { down_at_switchover(false); }
TEST(netns_link_down_switchover_loaded) { down_at_switchover(true); }

/* 50 ms round trip with 1% loss each way, over TLS: TCP recovers, every
 * record arrives whole, it completes. */
TEST(netns_link_50ms_loss)
{
	struct netlink_stats ab;
	struct pair p;
	json_t *m;

	start_with(&p, "delay=25 loss=1 rate=1G", "dirty,ws=32M,rate=20", 8192,
		   NULL, true);
	migrate(&p);
	m = completed(&p, "50 ms, 1% loss, TLS");
	ASSERT(json_is_object(json_object_get(m, "tls")));
	ASSERT_EQ(geti(json_object_get(m, "tls"), "connections"), 3);
	json_decref(m);
	netns_stats(&p.l, "ab", &ab);
	ASSERT_GT(ab.lost, 0);
	finish(&p);
}


/*
 * 100 Mbit/s, a guest dirtying 64 MiB flat out (far faster than the
 * link): only auto-converge gets it across, and the throttle shows.
 */
TEST(netns_link_100mbit_autoconverge)
{
	struct pair p;
	json_t *m;

	start(&p, "delay=1 rate=100M", "dirty,ws=32M,rate=0", 8192, NULL);
	set_caps(&p.s, true);
	json_decref(call(&p.s, "migrate-set-parameters", json_pack("{s:i, s:i}",
			 "cpu-throttle-initial", 70, "cpu-throttle-increment", 20)));
	migrate(&p);
	m = completed(&p, "100 Mbit/s, auto-converge");
	ASSERT_GT(geti(m, "cpu-throttle-percentage"), 0);
	json_decref(m);
	finish(&p);
}
