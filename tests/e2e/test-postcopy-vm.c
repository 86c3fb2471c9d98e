/*
 * tests/e2e/test-postcopy-vm.c - postcopy between two `ferry vm` processes
 * over loopback, on both backends: a destination kept paused (equal RAM
 * digests once END is through), a destination whose guest runs against
 * faulting memory from RUN on (its verify passes find 0 bad pages), and a
 * link cut during postcopy, recovered through the control socket
 * (migrate-recover, migrate with "resume").
 */
#include "../harness.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "postcopy.h"
#include "vmproc.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

static void caps(struct proc *p, bool preempt)
{
	json_decref(call(p, "migrate-set-capabilities", json_pack(
		"{s:[{s:s, s:b}, {s:s, s:b}]}", "capabilities",
		"capability", "postcopy-ram", "state", 1,
		"capability", "postcopy-preempt", "state", preempt)));
}

/* A source whose guest rewrites 128 MiB flat out, and a destination that
 * allows postcopy (kept paused after RUN unless @run). */
static int pair(struct proc *s, struct proc *d, const char *backend, bool run)
{
	int port = free_port();

	need_backend(backend);
	if (ferry_pc_bare_roundtrip_ns(4) < 0)
		SKIP("userfaultfd is not available here");
	vm_spawn(s, "src", test_fmt("--backend %s --mem 512M --workload "
				    "dirty,ws=128M,rate=0", backend));
	vm_spawn(d, "dst", test_fmt("--backend %s --mem 512M --postcopy %s "
				    "--incoming tcp:127.0.0.1:%d", backend,
				    run ? "" : "--paused", port));
	wait_generation(s, 5000);
	return port;
}

static void migrate_postcopy(struct proc *s, int port)
{
	json_decref(call(s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	json_decref(call(s, "migrate-start-postcopy", NULL));
}

/* Paused destination: the postcopy statuses, the stats, equal digests. */
static void postcopy_paused(const char *backend)
{
	struct proc s, d;
	char digest[64], loaded[64];
	json_t *m;
	long long g;
	int port = pair(&s, &d, backend, false);

	caps(&s, false);
	migrate_postcopy(&s, port);
	wait_migration(&s, "completed");
	m = call(&s, "query-migrate", NULL);
	ASSERT_GT(geti(json_object_get(m, "ram"), "postcopy-bytes"), 0);
	ASSERT_GE(geti(m, "postcopy-time"), 0);
	ASSERT_GE(geti(m, "downtime"), 0);
	json_decref(m);
	ASSERT_STREQ(status_of(&s), "postmigrate");
	/* The destination completes right after its last word to the
	 * source, which may already have reported completed: wait. */
	wait_migration(&d, "completed");
	m = call(&d, "query-migrate", NULL);
	ASSERT(json_is_object(json_object_get(m, "postcopy-latency")));
	json_decref(m);
	ASSERT_STREQ(status_of(&d), "paused");
	ram_digest(&s, digest);
	ram_digest(&d, loaded);
	ASSERT_STREQ(loaded, digest);
	json_decref(call(&d, "cont", NULL));
	g = generation(&d);
	wait_generation(&d, g + 100);
	m = verify(&d);
	ASSERT_EQ(geti(m, "bad-pages"), 0);
	json_decref(m);
	vm_quit(&s);
	vm_quit(&d);
}

TEST(live_kvm_postcopy_paused) { postcopy_paused("kvm"); }
TEST(live_thread_postcopy_paused) { postcopy_paused("thread"); }

/* The destination runs from RUN on: its guest faults on missing pages,
 * asks for them on the preempt channel, and verifies clean - while
 * postcopy runs and after. */
static void postcopy_running(const char *backend)
{
	struct proc s, d;
	json_t *m, *lat;
	int port = pair(&s, &d, backend, true);

	caps(&s, true);
	/* Slow enough to look at both sides while pages still arrive. */
	json_decref(call(&s, "migrate-set-parameters",
			 json_pack("{s:i}", "max-bandwidth", 64 << 20)));
	migrate_postcopy(&s, port);
	wait_migration_live(&d, "postcopy-active");
	ASSERT_STREQ(status_of(&d), "running");
	ASSERT_STREQ(status_of(&s), "finish-migrate");
	/* A verify pass of the guest, against memory still faulting in. */
	m = verify(&d);
	ASSERT_EQ(geti(m, "bad-pages"), 0);
	json_decref(m);
	wait_migration(&s, "completed");
	ASSERT_STREQ(status_of(&s), "postmigrate");
	wait_loaded(&d);
	ASSERT_STREQ(status_of(&d), "running");
	m = call(&d, "query-migrate", NULL);
	ASSERT_STREQ(gets(m, "status"), "completed");
	ASSERT_GT(geti(m, "postcopy-faults"), 0);
	ASSERT_GT(geti(m, "postcopy-requests"), 0);
	lat = json_object_get(m, "postcopy-latency");
	ASSERT(geti(lat, "max-us") >= geti(lat, "p50-us"));
	json_decref(m);
	m = verify(&d);
	ASSERT_EQ(geti(m, "bad-pages"), 0);
	json_decref(m);
	vm_quit(&s);
	vm_quit(&d);
}

TEST(live_kvm_postcopy_running) { postcopy_running("kvm"); }
TEST(live_thread_postcopy_running) { postcopy_running("thread"); }

/* The link is cut in postcopy: both sides pause, the source VM stays
 * stopped, `cont` is refused there; the operator's migrate-recover and
 * migrate resume bring it back, and the guest verifies clean. */
static void postcopy_recover(const char *backend)
{
	struct proc s, d;
	char msg[512];
	json_t *m;
	int port = pair(&s, &d, backend, true), silent[3];
	const char *uri;
	double t0;

	caps(&s, false);
	json_decref(call(&s, "migrate-set-parameters",
			 json_pack("{s:i}", "max-bandwidth", 64 << 20)));
	json_decref(call(&s, "x-migrate-fault", json_pack("{s:s}", "point",
							  "postcopy-cut")));
	migrate_postcopy(&s, port);
	wait_migration_live(&s, "postcopy-paused");
	wait_migration_live(&d, "postcopy-paused");
	ASSERT_STREQ(status_of(&s), "finish-migrate");
	call_fails(&s, "cont", NULL, msg, sizeof(msg));
	call_fails(&s, "migrate-cancel", NULL, msg, sizeof(msg));
	ASSERT_CONTAINS(msg, "postcopy");
	m = call(&d, "migrate-recover", json_pack("{s:s}", "uri",
						  "tcp:127.0.0.1:0"));
	uri = test_fmt("%s", gets(m, "uri"));
	json_decref(m);
	/* Strangers on the recovery port first: silent, stopped inside the
	 * magic, a multifd handshake's start. They wait beside the source,
	 * not in front of it (each would cost peer-timeout, 10 s). */
	{
		const char *colon = strrchr(uri, ':');

		ASSERT(colon != NULL);
		for (int i = 0; i < 3; i++) {
			silent[i] = tcp_connect(atoi(colon + 1));
			if (i == 1)
				ASSERT(send_all(silent[i], "FR", 2));
			if (i == 2)
				ASSERT(send_all(silent[i], "FRMF", 4));
		}
	}
	usleep(100000);
	t0 = now_ms();
	json_decref(call(&s, "migrate", json_pack("{s:s, s:b}", "uri", uri,
						  "resume", 1)));
	wait_migration_live(&s, "postcopy-active");
	if (now_ms() - t0 > 5000)
		FAIL("the resume took %.0f ms behind silent connections",
		     now_ms() - t0);
	wait_migration(&s, "completed");
	wait_migration(&d, "completed");
	m = verify(&d);
	ASSERT_EQ(geti(m, "bad-pages"), 0);
	json_decref(m);
	for (int i = 0; i < 3; i++)
		close(silent[i]);
	vm_quit(&s);
	vm_quit(&d);
}

TEST(live_kvm_postcopy_recover) { postcopy_recover("kvm"); }
TEST(live_thread_postcopy_recover) { postcopy_recover("thread"); }

/* A postcopy under way, slowly (32 MiB/s, peer-timeout 1 s on the
 * source): the destination runs the guest while pages still arrive. */
static void postcopy_running_slowly(struct proc *s, struct proc *d,
				    const char *backend)
{
	int port = pair(s, d, backend, true);

	caps(s, false);
	json_decref(call(s, "migrate-set-parameters",
			 json_pack("{s:i, s:i}", "max-bandwidth", 32 << 20,
				   "peer-timeout", 1000)));
	migrate_postcopy(s, port);
	wait_migration_live(d, "postcopy-active");
}

/* The destination dies after RUN, the one case nothing can mend: the
 * source says so, and keeps its RAM and the VM stopped (cont refused). */
static void postcopy_dest_killed(const char *backend)
{
	struct proc s, d;
	char msg[512];
	json_t *m;
	int st;

	postcopy_running_slowly(&s, &d, backend);
	kill(d.pid, SIGKILL);
	waitpid(d.pid, &st, 0);
	wait_migration_live(&s, "postcopy-paused");
	m = call(&s, "query-migrate", NULL);
	ASSERT(strlen(gets(m, "error-desc")) > 0);
	json_decref(m);
	ASSERT_STREQ(status_of(&s), "finish-migrate");
	call_fails(&s, "cont", NULL, msg, sizeof(msg));
	usleep(300000);
	ASSERT_STREQ(status_of(&s), "finish-migrate");
	vm_quit(&s);
}

TEST(live_kvm_postcopy_dest_killed) { postcopy_dest_killed("kvm"); }
TEST(live_thread_postcopy_dest_killed) { postcopy_dest_killed("thread"); }

/*
 * The source killed after RUN: the guest runs on the destination with part
 * of its memory gone for good. The destination pauses (postcopy-paused,
 * naming the source), a vCPU that touches a missing page waits, nothing
 * is zero-filled and the migration never claims to be complete: the
 * documented window where no side holds a whole VM (docs/faults.md). The
 * process still quits cleanly.
 */
static void postcopy_src_killed(const char *backend)
{
	struct proc s, d;
	json_t *m;
	int st;

	postcopy_running_slowly(&s, &d, backend);
	kill(s.pid, SIGKILL);
	waitpid(s.pid, &st, 0);
	close(s.fd);
	wait_migration_live(&d, "postcopy-paused");
	m = call(&d, "query-migrate", NULL);
	ASSERT(strlen(gets(m, "error-desc")) > 0);
	json_decref(m);
	ASSERT_STREQ(status_of(&d), "running");
	usleep(500000);
	m = call(&d, "query-migrate", NULL);
	ASSERT_STREQ(gets(m, "status"), "postcopy-paused");
	json_decref(m);
	vm_quit(&d);
}

TEST(live_kvm_postcopy_src_killed) { postcopy_src_killed("kvm"); }
TEST(live_thread_postcopy_src_killed) { postcopy_src_killed("thread"); }

/*
 * A VM that migrated out takes a postcopy migration back (the soak's
 * ping-pong, with postcopy): its RAM, still registered for the dirty
 * tracking of its own outgoing migration on the thread backend, is let go
 * at migrate-incoming, so the postcopy load can register it; the guest
 * comes back whole.
 */
static void postcopy_back(const char *backend)
{
	struct proc s, a, b;
	json_t *m;
	long long g;
	int port = pair(&s, &a, backend, true), port2 = free_port();

	vm_quit(&a);
	vm_spawn(&a, "a", test_fmt("--backend %s --mem 512M --postcopy "
				   "--incoming defer", backend));
	json_decref(call(&a, "migrate-incoming", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	vm_spawn(&b, "b", test_fmt("--backend %s --mem 512M --postcopy "
				   "--incoming tcp:127.0.0.1:%d", backend, port2));
	/* s to a, then a to b: precopy, a now migrated out. */
	json_decref(call(&s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	wait_migration(&s, "completed");
	wait_loaded(&a);
	wait_generation(&a, generation(&a) + 50);
	json_decref(call(&a, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port2))));
	wait_migration(&a, "completed");
	ASSERT_STREQ(status_of(&a), "postmigrate");
	wait_loaded(&b);
	/* b back to a, in postcopy. */
	json_decref(call(&a, "migrate-incoming", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port = free_port()))));
	caps(&b, false);
	migrate_postcopy(&b, port);
	wait_migration(&b, "completed");
	ASSERT_STREQ(status_of(&b), "postmigrate");
	m = call(&b, "query-migrate", NULL);
	ASSERT_GT(geti(json_object_get(m, "ram"), "postcopy-bytes"), 0);
	json_decref(m);
	wait_loaded(&a);
	m = call(&a, "query-migrate", NULL);
	ASSERT_STREQ(gets(m, "status"), "completed");
	json_decref(m);
	ASSERT_STREQ(status_of(&a), "running");
	g = generation(&a);
	wait_generation(&a, g + 50);
	m = verify(&a);
	ASSERT_EQ(geti(m, "bad-pages"), 0);
	json_decref(m);
	vm_quit(&s);
	vm_quit(&a);
	vm_quit(&b);
}

TEST(live_kvm_postcopy_back) { postcopy_back("kvm"); }
TEST(live_thread_postcopy_back) { postcopy_back("thread"); }
