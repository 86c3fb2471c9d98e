/*
 * tests/e2e/test-tls.c - migrations over TLS 1.3 with both ends verified
 * (parameters tls-creds, tls-hostname, tls-authz): every connection of a
 * migration runs TLS, every kind of bad peer is refused with a clear error
 * on both sides, the source keeps running, and the destination keeps
 * waiting for the real source.
 */
#include "../harness.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "postcopy.h"
#include "vmproc.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

/* A credential set made by scripts/gen-certs.sh in the test's directory;
 * @flags are the script's options. Returns its path. */
static const char *certs(const char *name, const char *flags)
{
	const char *dir = test_fmt("%s/%s", test_tmpdir(), name);
	char *out = NULL;

	if (test_run(&out, "openssl version") != 0)
		SKIP("the openssl command-line tool is not installed");
	free(out);
	if (test_run(&out, "scripts/gen-certs.sh %s %s", flags, dir) != 0)
		FAIL("gen-certs.sh %s: %s", flags, out);
	free(out);
	/* test_fmt's buffers are reused: keep our own copy. */
	return strdup(dir);
}

static void set_tls(struct proc *p, const char *creds, const char *host)
{
	json_decref(call(p, "migrate-set-parameters", json_pack("{s:s, s:s}",
			 "tls-creds", creds, "tls-hostname", host)));
}

/* Start a migration of @s to @port that must fail; its error. */
static char *migrate_refused(struct proc *s, int port)
{
	static char msg[1024];

	json_decref(call(s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	for (int i = 0; i < 3000; i++) {
		json_t *m = call(s, "query-migrate", NULL);
		const char *st = gets(m, "status");

		if (!strcmp(st, "failed")) {
			snprintf(msg, sizeof(msg), "%s", gets(m, "error-desc"));
			json_decref(m);
			/* The source VM never stopped. */
			ASSERT_STREQ(status_of(s), "running");
			return msg;
		}
		if (!strcmp(st, "completed"))
			FAIL("a migration that must be refused completed");
		json_decref(m);
		usleep(10000);
	}
	FAIL("the refused migration never ended");
}

/* The destination still waits, has refused @n connections so far, and
 * says why it refused the last one. */
static void dest_refused(struct proc *d, long long n, const char *why)
{
	json_t *m = NULL;

	/* The source may report before the destination has written it down. */
	for (int i = 0; i < 200; i++) {
		json_decref(m);
		m = call(d, "query-migrate", NULL);
		if (json_object_get(m, "refused-connections") &&
		    geti(m, "refused-connections") >= n)
			break;
		usleep(10000);
	}
	ASSERT_STREQ(gets(m, "status"), "setup");
	ASSERT_EQ(geti(m, "refused-connections"), n);
	ASSERT_CONTAINS(gets(m, "last-refused"), why);
	json_decref(m);
	ASSERT_STREQ(status_of(d), "inmigrate");
}

/* Both sides report TLS 1.3 on @conns connections with the right peer. */
static void tls_stats(struct proc *p, int conns, const char *peer)
{
	json_t *m = call(p, "query-migrate", NULL);
	json_t *t = json_object_get(m, "tls");

	ASSERT(json_is_object(t));
	ASSERT_STREQ(gets(t, "version"), "TLSv1.3");
	ASSERT_EQ(geti(t, "connections"), conns);
	ASSERT_CONTAINS(gets(t, "peer"), peer);
	json_decref(m);
}

static void finish_and_verify(struct proc *s, struct proc *d)
{
	wait_migration(s, "completed");
	ASSERT_STREQ(status_of(s), "postmigrate");
	wait_loaded(d);
	wait_migration(d, "completed");
}

/* A dirtying guest over TLS with multifd: three connections, each
 * verified, equal RAM on both sides, a clean verify pass after. */
TEST(tls_live_multifd)
{
	const char *ca = certs("ca", "");
	struct proc s, d;
	char digest[64], loaded[64];
	int port = free_port();

	need_backend("thread");
	vm_spawn(&s, "src", "--backend thread --mem 256M --workload "
		 "dirty,ws=64M,rate=100");
	vm_spawn(&d, "dst", test_fmt("--backend thread --mem 256M --paused "
		 "--tls-creds %s --tls-authz 'CN=ferry-source' "
		 "--incoming tcp:127.0.0.1:%d", ca, port));
	wait_generation(&s, 2000);
	set_tls(&s, ca, "");
	json_decref(call(&s, "migrate-set-parameters",
			 json_pack("{s:i}", "multifd-channels", 2)));
	json_decref(call(&s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	finish_and_verify(&s, &d);
	/* Main stream (with its return path) and two multifd channels. */
	tls_stats(&s, 3, "CN=localhost");
	tls_stats(&d, 3, "CN=ferry-source");
	ram_digest(&s, digest);
	ram_digest(&d, loaded);
	ASSERT_STREQ(loaded, digest);
	cont_verified(&d);
	vm_quit(&s);
	vm_quit(&d);
}

/*
 * One TLS destination, a row of bad sources: another CA, an expired
 * certificate, a subject outside tls-authz, a wrong expected hostname, no
 * certificate at all, a plaintext source, missing credentials. Each is
 * refused with its reason on both sides, the source runs on, the
 * destination keeps waiting - and then the real source migrates.
 */
TEST(tls_refused_peers)
{
	const char *ca = certs("ca", "");
	const char *other = certs("other", "");
	const char *expired = certs("expired", test_fmt("--expired --ca-from %s", ca));
	const char *intruder = certs("intruder", test_fmt("--ca-from %s "
				     "--client-cn intruder", ca));
	struct proc s, d;
	char *out = NULL, *msg;
	int port = free_port(), refused = 0;

	need_backend("thread");
	vm_spawn(&s, "src", "--backend thread --mem 128M --workload "
		 "dirty,ws=32M,rate=50");
	vm_spawn(&d, "dst", test_fmt("--backend thread --mem 128M --paused "
		 "--tls-creds %s --tls-authz 'CN=ferry-source; CN=backup' "
		 "--incoming tcp:127.0.0.1:%d", ca, port));
	/* Fail fast: one connection per attempt. */
	json_decref(call(&s, "migrate-set-capabilities", json_pack(
		"{s:[{s:s, s:b}]}", "capabilities", "capability", "multifd",
		"state", 0)));

	set_tls(&s, other, "");
	msg = migrate_refused(&s, port);
	ASSERT_CONTAINS(msg, "not signed by the CA in tls-creds");
	dest_refused(&d, ++refused, "unknown ca");

	set_tls(&s, expired, "");
	msg = migrate_refused(&s, port);
	ASSERT_CONTAINS(msg, "certificate expired");
	dest_refused(&d, ++refused, "certificate has expired");

	set_tls(&s, intruder, "");
	msg = migrate_refused(&s, port);
	ASSERT_CONTAINS(msg, "'CN=intruder' is not in the destination's tls-authz");
	dest_refused(&d, ++refused, "not in the destination's tls-authz");

	set_tls(&s, ca, "migration.example.org");
	msg = migrate_refused(&s, port);
	ASSERT_CONTAINS(msg, "hostname mismatch");
	dest_refused(&d, ++refused, "bad certificate");

	/* No client certificate at all: the openssl tool as the client. */
	test_run(&out, "openssl s_client -connect 127.0.0.1:%d -tls1_3 -CAfile "
		 "%s/ca-cert.pem -quiet </dev/null", port, ca);
	free(out);
	dest_refused(&d, ++refused, "the source sent no certificate");

	set_tls(&s, "", "");
	msg = migrate_refused(&s, port);
	ASSERT_CONTAINS(msg, "the destination speaks TLS");
	dest_refused(&d, ++refused, "a plaintext peer reached this TLS listener");

	/* Credentials that are not there fail before any connection. */
	set_tls(&s, test_fmt("%s/none", test_tmpdir()), "");
	msg = migrate_refused(&s, port);
	ASSERT_CONTAINS(msg, "none/ca-cert.pem: No such file or directory");
	dest_refused(&d, refused, "a plaintext peer");

	/* The real source, after all that (on the main stream alone, which
	 * a sanitizer build makes slower than the guest dirties). */
	set_tls(&s, ca, "localhost");
	if (slow_build())
		json_decref(call(&s, "migrate-set-capabilities", json_pack(
			"{s:[{s:s, s:b}]}", "capabilities", "capability",
			"auto-converge", "state", 1)));
	json_decref(call(&s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	finish_and_verify(&s, &d);
	tls_stats(&d, 1, "CN=ferry-source");
	cont_verified(&d);
	vm_quit(&s);
	vm_quit(&d);
}

/* A TLS source and a plaintext destination: refused on both sides, and
 * the destination still takes a plaintext migration after. */
TEST(tls_source_plain_dest)
{
	const char *ca = certs("ca", "");
	struct proc s, d;
	char *msg;
	int port = free_port();

	need_backend("thread");
	vm_spawn(&s, "src", "--backend thread --mem 128M --workload "
		 "dirty,ws=32M,rate=50");
	vm_spawn(&d, "dst", test_fmt("--backend thread --mem 128M --paused "
		 "--incoming tcp:127.0.0.1:%d", port));
	set_tls(&s, ca, "");
	msg = migrate_refused(&s, port);
	ASSERT_CONTAINS(msg, "is tls-creds set on the destination");
	/* Every connection of the attempt is turned away (multifd too). */
	dest_refused(&d, 1, "a TLS client reached this plaintext destination");
	set_tls(&s, "", "");
	json_decref(call(&s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	finish_and_verify(&s, &d);
	cont_verified(&d);
	vm_quit(&s);
	vm_quit(&d);
}

/* A guest rewriting 64 MiB flat out, migrated over TLS with postcopy and
 * its preempt channel (switched at once, at 64 MiB/s so it lasts), with
 * the fault point @fault armed (or none). */
static void postcopy_tls(struct proc *s, struct proc *d, const char *fault)
{
	const char *ca = certs("ca", "");
	int port = free_port();

	need_backend("thread");
	if (ferry_pc_bare_roundtrip_ns(4) < 0)
		SKIP("userfaultfd is not available here");
	vm_spawn(s, "src", "--backend thread --mem 256M --workload "
		 "dirty,ws=64M,rate=0");
	vm_spawn(d, "dst", test_fmt("--backend thread --mem 256M --postcopy "
		 "--tls-creds %s --incoming tcp:127.0.0.1:%d", ca, port));
	wait_generation(s, 2000);
	set_tls(s, ca, "");
	json_decref(call(s, "migrate-set-capabilities", json_pack(
		"{s:[{s:s, s:b}, {s:s, s:b}]}", "capabilities",
		"capability", "postcopy-ram", "state", 1,
		"capability", "postcopy-preempt", "state", 1)));
	json_decref(call(s, "migrate-set-parameters",
			 json_pack("{s:i}", "max-bandwidth", 64 << 20)));
	if (fault)
		json_decref(call(s, "x-migrate-fault", json_pack("{s:s}",
				 "point", fault)));
	json_decref(call(s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	json_decref(call(s, "migrate-start-postcopy", NULL));
}

/* Postcopy with a preempt channel over TLS: four connections, pages
 * requested and served through TLS, the guest running on the
 * destination verifies clean. */
TEST(tls_postcopy_preempt)
{
	struct proc s, d;
	json_t *m;

	postcopy_tls(&s, &d, NULL);
	wait_migration_live(&d, "postcopy-active");
	m = verify(&d);
	ASSERT_EQ(geti(m, "bad-pages"), 0);
	json_decref(m);
	finish_and_verify(&s, &d);
	m = call(&d, "query-migrate", NULL);
	ASSERT_GT(geti(m, "postcopy-requests"), 0);
	json_decref(m);
	/* Main, two multifd channels, the preempt channel. */
	tls_stats(&s, 4, "CN=localhost");
	tls_stats(&d, 4, "CN=ferry-source");
	ASSERT_STREQ(status_of(&d), "running");
	m = verify(&d);
	ASSERT_EQ(geti(m, "bad-pages"), 0);
	json_decref(m);
	vm_quit(&s);
	vm_quit(&d);
}

/* A postcopy over TLS whose link breaks after RUN: the recovery's new main
 * connection and preempt channel are TLS sessions too (six in all on the
 * destination), and the guest verifies clean. */
TEST(tls_postcopy_recover)
{
	struct proc s, d;
	const char *uri;
	json_t *m;

	postcopy_tls(&s, &d, "postcopy-cut");
	wait_migration_live(&s, "postcopy-paused");
	wait_migration_live(&d, "postcopy-paused");
	m = call(&d, "migrate-recover", json_pack("{s:s}", "uri",
						  "tcp:127.0.0.1:0"));
	uri = test_fmt("%s", gets(m, "uri"));
	json_decref(m);
	json_decref(call(&s, "migrate", json_pack("{s:s, s:b}", "uri", uri,
						  "resume", 1)));
	wait_migration(&s, "completed");
	wait_migration(&d, "completed");
	tls_stats(&s, 6, "CN=localhost");
	tls_stats(&d, 6, "CN=ferry-source");
	m = verify(&d);
	ASSERT_EQ(geti(m, "bad-pages"), 0);
	json_decref(m);
	vm_quit(&s);
	vm_quit(&d);
}

/* A crowd of clients that connect and never finish (or never start) a
 * handshake, more than the destination keeps waiting at once: the real
 * source still gets through at once, the crowd is counted as refused. */
TEST(tls_silent_crowd)
{
	const char *ca = certs("ca", "");
	struct sockaddr_in sa = { .sin_family = AF_INET };
	struct proc s, d;
	int port = free_port(), crowd[40];
	json_t *m;

	need_backend("thread");
	vm_spawn(&s, "src", "--backend thread --mem 128M --workload "
		 "dirty,ws=32M,rate=20");
	vm_spawn(&d, "dst", test_fmt("--backend thread --mem 128M --paused "
		 "--tls-creds %s --incoming tcp:127.0.0.1:%d", ca, port));
	sa.sin_port = htons((uint16_t)port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	for (int i = 0; i < 40; i++) {
		crowd[i] = socket(AF_INET, SOCK_STREAM, 0);
		ASSERT_GE(crowd[i], 0);
		ASSERT_OK(connect(crowd[i], (struct sockaddr *)&sa, sizeof(sa)));
		/* Half of them start a TLS record and stop. */
		if (i % 2)
			ASSERT_EQ(write(crowd[i], "\x16\x03\x01\x02", 4), 4);
	}
	usleep(200000);
	set_tls(&s, ca, "");
	json_decref(call(&s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	/* Well before the crowd's peer-timeout (10 s) runs out. */
	for (int i = 0; i < 500; i++) {
		m = call(&s, "query-migrate", NULL);
		if (!strcmp(gets(m, "status"), "completed")) {
			json_decref(m);
			break;
		}
		ASSERT(strcmp(gets(m, "status"), "failed"));
		json_decref(m);
		ASSERT_LT(i, 499);
		usleep(10000);
	}
	wait_migration(&d, "completed");
	m = call(&d, "query-migrate", NULL);
	ASSERT_GE(geti(m, "refused-connections"), 40 - 16);
	json_decref(m);
	for (int i = 0; i < 40; i++)
		close(crowd[i]);
	cont_verified(&d);
	vm_quit(&s);
	vm_quit(&d);
}
