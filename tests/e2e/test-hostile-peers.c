/*
 * tests/e2e/test-hostile-peers.c - hostile peers against a real `ferry vm`:
 * what reaches the incoming port (random bytes, a header then garbage,
 * half-open connections, a second source, a flood of connections, a
 * multifd channel of another session) and what reaches the control socket
 * (junk, a 10 MiB line, a crowd, a client that never reads, commands in the
 * wrong state). Each is turned away with a clear error; the destination
 * keeps listening where that makes sense, and a real migration afterwards
 * completes with a guest that verifies clean.
 */
#include "../harness.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "control/control.h"
#include "ferry/ferry.h"
#include "ferry/multifd.h"
#include "vmproc.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

/* A small guest that dirties memory: quick to migrate, still real. */
#define GUEST "--backend thread --mem 128M --workload dirty,ws=32M,rate=20"

static void put_be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

/* Bytes that are none of ferry's magics and do not look like TLS. */
static void random_junk(uint8_t *buf, size_t len)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = (uint8_t)test_rand();
	if (len)
		buf[0] = (uint8_t)('a' + test_rand() % 26);
}

/* Open descriptors of process @pid. */
static int fd_count(pid_t pid)
{
	DIR *d = opendir(test_fmt("/proc/%d/fd", (int)pid));
	struct dirent *e;
	int n = 0;

	ASSERT_PTR(d);
	while ((e = readdir(d)))
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n;
}

static long long refused_count(json_t *m)
{
	json_t *v = json_object_get(m, "refused-connections");

	return json_is_integer(v) ? json_integer_value(v) : 0;
}

/*
 * The destination @d still waits for its source, has turned away at least
 * @n connections so far (waiting up to 5 s for the count), and says @why
 * about the last one. Returns the count.
 */
static long long dest_refused(struct proc *d, long long n, const char *why)
{
	json_t *m = NULL;
	long long got;

	for (int i = 0; i < 500; i++) {
		json_decref(m);
		m = call(d, "query-migrate", NULL);
		if (refused_count(m) >= n)
			break;
		usleep(10000);
	}
	got = refused_count(m);
	if (got < n)
		FAIL("the destination refused %lld connections, wanted %lld: %s",
		     got, n, json_dumps(m, 0));
	ASSERT(json_is_true(json_object_get(m, "incoming")));
	ASSERT_STREQ(gets(m, "status"), "setup");
	if (why)
		ASSERT_CONTAINS(gets(m, "last-refused"), why);
	json_decref(m);
	ASSERT_STREQ(status_of(d), "inmigrate");
	return got;
}

/* The destination @d refuses nothing more than @n for a moment. */
static void dest_refused_exactly(struct proc *d, long long n)
{
	json_t *m;

	usleep(100000);
	m = call(d, "query-migrate", NULL);
	ASSERT_EQ(refused_count(m), n);
	json_decref(m);
}

static void spawn_dest(struct proc *d, const char *name, int port,
		       const char *extra)
{
	vm_spawn(d, name, test_fmt("--backend thread --mem 128M --paused %s "
				   "--incoming tcp:127.0.0.1:%d", extra, port));
}

/* A real migration of @s to @d on @port: it completes, and the guest
 * verifies clean on @d. Returns how long the migration took (ms). */
static double real_migration(struct proc *s, struct proc *d, int port)
{
	double t0 = now_ms(), ms;

	json_decref(call(s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	wait_migration(s, "completed");
	ms = now_ms() - t0;
	ASSERT_STREQ(status_of(s), "postmigrate");
	wait_loaded(d);
	wait_migration(d, "completed");
	cont_verified(d);
	return ms;
}

/* ---- the incoming port ---------------------------------------------------- */

/*
 * Random bytes, TLS records, an HTTP request, a lone byte: each connection
 * is refused with its reason and counted, the destination keeps waiting
 * (nothing of it was loaded), and then the real source migrates.
 */
TEST(hostile_port_random_bytes)
{
	static const char http[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
	struct proc s, d;
	uint8_t junk[8192];
	int port = free_port(), fd;
	long long n = 0;

	vm_spawn(&s, "src", GUEST);
	spawn_dest(&d, "dst", port, "");
	wait_generation(&s, 1000);

	for (int round = 0; round < 8; round++) {
		size_t len = 4 + test_rand() % (sizeof(junk) - 4);

		random_junk(junk, len);
		fd = tcp_connect(port);
		send_all(fd, junk, len);
		n = dest_refused(&d, n + 1, "neither a ferry stream nor a "
				 "multifd channel");
		close(fd);
	}
	/* Almost the stream magic. */
	fd = tcp_connect(port);
	send_all(fd, "FRRX and more", 13);
	n = dest_refused(&d, n + 1, "neither a ferry stream");
	close(fd);
	fd = tcp_connect(port);
	send_all(fd, http, sizeof(http) - 1);
	n = dest_refused(&d, n + 1, "neither a ferry stream");
	close(fd);
	/* A TLS ClientHello's record header on this plaintext port. */
	fd = tcp_connect(port);
	send_all(fd, "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11);
	n = dest_refused(&d, n + 1, "a TLS client reached this plaintext "
			 "destination");
	close(fd);
	/* Connected and gone without a byte: nothing to refuse. */
	fd = tcp_connect(port);
	close(fd);
	dest_refused_exactly(&d, n);

	real_migration(&s, &d, port);
	vm_quit(&s);
	vm_quit(&d);
}

/*
 * A valid stream header, then garbage: that connection is the migration
 * (nothing tells it from a real source whose stream was damaged), so the
 * incoming migration fails naming the offset, and the destination ends
 * with status 1 having run nothing. A second such peer while the first
 * one's load runs is turned away. A fresh destination then takes the real
 * source, which never noticed any of it.
 */
TEST(hostile_port_header_then_garbage)
{
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	struct proc s, d;
	uint8_t junk[4096];
	const uint8_t *hdr;
	size_t hlen;
	char *log = NULL;
	int port = free_port(), fd;

	ASSERT_PTR(c);
	ASSERT_OK(ferry_stream_write_header(c, NULL));
	hdr = ferry_chan_mem_data(c, &hlen);
	ASSERT_EQ(hlen, FERRY_STREAM_HEADER_SIZE);

	vm_spawn(&s, "src", GUEST);
	spawn_dest(&d, "dst", port, "");
	random_junk(junk, sizeof(junk));
	/* A record type the stream does not have, with a plausible length. */
	junk[0] = 0x3c;
	put_be32(junk + 1, 64);
	fd = tcp_connect(port);
	ASSERT(send_all(fd, hdr, hlen));
	ASSERT(send_all(fd, junk, sizeof(junk)));
	vm_wait_exit(&d, 1);
	close(fd);
	test_run(&log, "cat %s", d.log);
	ASSERT_CONTAINS(log, "incoming migration from tcp:");
	ASSERT_CONTAINS(log, "offset 16");
	ASSERT_CONTAINS(log, "before the first section");
	free(log);

	/* The header alone, then silence: the load waits for the rest (as it
	 * would for a slow source) and a second stream is turned away. */
	port = free_port();
	spawn_dest(&d, "dst2", port, "");
	fd = tcp_connect(port);
	ASSERT(send_all(fd, hdr, hlen));
	{
		int fd2 = tcp_connect(port);

		ASSERT(send_all(fd2, hdr, hlen));
		for (int i = 0; i < 500; i++) {
			json_t *m = call(&d, "query-migrate", NULL);
			bool hit = refused_count(m) >= 1;

			if (hit)
				ASSERT_CONTAINS(gets(m, "last-refused"),
						"a second migration stream");
			json_decref(m);
			if (hit)
				break;
			ASSERT_LT(i, 499);
			usleep(10000);
		}
		close(fd2);
	}
	/* The peer hangs up inside the stream: the load fails at once. */
	close(fd);
	vm_wait_exit(&d, 1);
	test_run(&log, "cat %s", d.log);
	ASSERT_CONTAINS(log, "offset 16");
	free(log);

	ferry_chan_free(c);
	port = free_port();
	spawn_dest(&d, "dst3", port, "");
	wait_generation(&s, 1000);
	ASSERT_STREQ(status_of(&s), "running");
	real_migration(&s, &d, port);
	vm_quit(&s);
	vm_quit(&d);
}

/*
 * Half-open connections that never send (and one that stops inside the
 * stream magic) must not delay a real source: the migration that starts
 * right after them completes in far less than peer-timeout (10 s). With a
 * short peer-timeout, a destination drops such connections by itself and
 * says why.
 */
TEST(hostile_port_half_open)
{
	struct proc s, d, d2;
	int port = free_port(), silent[6];
	/* Sanitizer builds migrate several times slower: a longer
	 * peer-timeout keeps the proof (far below it) meaningful there. */
	int patience = slow_build() ? 60000 : 10000;
	double ms;

	vm_spawn(&s, "src", GUEST);
	if (slow_build()) {
		vm_spawn(&d, "dst", "--backend thread --mem 128M --paused "
			 "--incoming defer");
		json_decref(call(&d, "migrate-set-parameters",
				 json_pack("{s:i}", "peer-timeout", patience)));
		json_decref(call(&d, "migrate-incoming", json_pack("{s:s}", "uri",
				 test_fmt("tcp:127.0.0.1:%d", port))));
	} else {
		spawn_dest(&d, "dst", port, "");
	}
	wait_generation(&s, 1000);
	for (int i = 0; i < 6; i++) {
		silent[i] = tcp_connect(port);
		/* One stops inside the magic, one inside a multifd handshake. */
		if (i == 4)
			ASSERT(send_all(silent[i], "FR", 2));
		if (i == 5)
			ASSERT(send_all(silent[i], "FRMF\0\0\0\1", 8));
	}
	usleep(100000);
	ms = real_migration(&s, &d, port);
	/* A 128 MiB guest takes well under a second here; peer-timeout
	 * would mean the source waited for the silent ones to time out. */
	if (ms > patience / 2)
		FAIL("the real migration took %.0f ms behind half-open "
		     "connections (peer-timeout %d ms)", ms, patience);

	/* A destination with peer-timeout 1 s drops them itself. */
	port = free_port();
	vm_spawn(&d2, "dst2", "--backend thread --mem 128M --paused "
		 "--incoming defer");
	json_decref(call(&d2, "migrate-set-parameters",
			 json_pack("{s:i}", "peer-timeout", 1000)));
	json_decref(call(&d2, "migrate-incoming", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	for (int i = 0; i < 6; i++)
		close(silent[i]);
	for (int i = 0; i < 3; i++)
		silent[i] = tcp_connect(port);
	ASSERT(send_all(silent[2], "FRR", 3));
	dest_refused(&d2, 3, "sent nothing for 1000 ms");
	for (int i = 0; i < 3; i++)
		close(silent[i]);
	/* The guest, now on @d, moves on to @d2. */
	real_migration(&d, &d2, port);
	vm_quit(&s);
	vm_quit(&d);
	vm_quit(&d2);
}

/*
 * A second source connecting while a migration loads is refused with a
 * clear error (on the second source, which runs on, and in the
 * destination's query-migrate), and the first migration completes.
 */
TEST(hostile_port_second_source)
{
	struct proc a, b, d;
	int port = free_port();
	json_t *m, *v;

	vm_spawn(&a, "srca", "--backend thread --mem 128M --workload fill");
	vm_spawn(&b, "srcb", GUEST);
	spawn_dest(&d, "dst", port, "");
	wait_generation(&a, 20000);
	wait_generation(&b, 1000);
	/* Slow enough that the second source arrives in the middle. */
	json_decref(call(&a, "migrate-set-parameters",
			 json_pack("{s:i}", "max-bandwidth", 40 << 20)));
	json_decref(call(&a, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	for (int i = 0;; i++) {
		m = call(&a, "query-migrate", NULL);
		if (!strcmp(gets(m, "status"), "active") &&
		    geti(json_object_get(m, "ram"), "transferred") > (4 << 20)) {
			json_decref(m);
			break;
		}
		ASSERT(strcmp(gets(m, "status"), "completed"));
		ASSERT(strcmp(gets(m, "status"), "failed"));
		json_decref(m);
		ASSERT_LT(i, 1000);
		usleep(10000);
	}

	json_decref(call(&b, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	for (int i = 0;; i++) {
		m = call(&b, "query-migrate", NULL);
		if (!strcmp(gets(m, "status"), "failed"))
			break;
		ASSERT(strcmp(gets(m, "status"), "completed"));
		json_decref(m);
		ASSERT_LT(i, 1000);
		usleep(10000);
	}
	ASSERT_CONTAINS(gets(m, "error-desc"), "already receiving a migration");
	json_decref(m);
	ASSERT_STREQ(status_of(&b), "running");
	/* The destination says so too, while the first one still loads
	 * (the last connection it turned away may be the second source's
	 * main stream, or one of its multifd channels: those carry another
	 * session id than the migration under way). */
	m = call(&d, "query-migrate", NULL);
	ASSERT_GE(refused_count(m), 1);
	if (!strstr(gets(m, "last-refused"), "a second migration stream"))
		ASSERT_CONTAINS(gets(m, "last-refused"),
				"a channel of another migration");
	ASSERT_STREQ(gets(m, "status"), "active");
	json_decref(m);

	json_decref(call(&a, "migrate-set-parameters",
			 json_pack("{s:i}", "max-bandwidth", 0)));
	wait_migration(&a, "completed");
	wait_loaded(&d);
	wait_migration(&d, "completed");
	cont_verified(&d);
	v = verify(&b);
	ASSERT_EQ(geti(v, "bad-pages"), 0);
	json_decref(v);
	vm_quit(&a);
	vm_quit(&b);
	vm_quit(&d);
}

/* A connection to @port, or -1 if it did not complete within @ms (its SYN
 * dropped because the listen backlog was full: the flood goes on). */
static int tcp_connect_within(int port, int ms)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	struct pollfd pf;
	int e = 0;
	socklen_t el = sizeof(e);

	ASSERT_GE(fd, 0);
	sa.sin_port = htons((uint16_t)port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) && errno != EINPROGRESS)
		FAIL("connect to port %d: %s", port, strerror(errno));
	pf = (struct pollfd){ .fd = fd, .events = POLLOUT };
	if (poll(&pf, 1, ms) != 1 ||
	    getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &el) || e) {
		if (e)
			FAIL("connect to port %d: %s", port, strerror(e));
		close(fd);
		return -1;
	}
	return fd;
}

/*
 * Two thousand connections opened and dropped, in every way (closed at
 * once, reset, a byte of junk, half a magic), in crowds held open at once:
 * the destination keeps listening, holds no descriptor more than before,
 * and takes the real source afterwards.
 */
TEST(hostile_port_connection_flood)
{
	enum { TOTAL = 2000, CROWD = 250 };
	struct linger rst = { .l_onoff = 1, .l_linger = 0 };
	struct proc s, d;
	int port = free_port(), before, after = 0, held[CROWD];
	int opened = 0, attempts = 0;
	double t0 = now_ms();

	vm_spawn(&s, "src", GUEST);
	spawn_dest(&d, "dst", port, "");
	usleep(100000);
	before = fd_count(d.pid);
	while (opened < TOTAL) {
		int k = 0;

		for (; k < CROWD && opened < TOTAL; attempts++) {
			int fd = tcp_connect_within(port, 20);

			if (fd < 0)
				continue;
			held[k++] = fd;
			switch (opened++ % 4) {
			case 1: /* a byte of junk */
				send_all(fd, "x", 1);
				break;
			case 2: /* reset on close */
				setsockopt(fd, SOL_SOCKET, SO_LINGER, &rst,
					   sizeof(rst));
				break;
			case 3: /* half of a magic */
				send_all(fd, "FR", 2);
				break;
			}
		}
		while (k--)
			close(held[k]);
		if (now_ms() - t0 > (slow_build() ? 40000 : 15000))
			FAIL("only %d of %d connections in %.0f ms (%d attempts)",
			     opened, TOTAL, now_ms() - t0, attempts);
	}
	/* The destination still waits (and answers). */
	dest_refused(&d, 1, NULL);
	/* At most the connections it lets wait to say what they are (those
	 * that sent part of a magic and left stay until peer-timeout). */
	after = fd_count(d.pid);
	if (after > before + 16)
		FAIL("the destination holds %d descriptors after the flood, "
		     "%d before", after, before);
	wait_generation(&s, 1000);
	real_migration(&s, &d, port);
	/* Done: its listener and every waiting connection are closed. */
	after = fd_count(d.pid);
	if (after >= before)
		FAIL("the destination holds %d descriptors after its migration, "
		     "%d before", after, before);
	vm_quit(&s);
	vm_quit(&d);
}

/* A multifd handshake (docs/stream-format.md, "Multifd channels"). */
static void mf_handshake(uint8_t hs[FERRY_MULTIFD_HANDSHAKE_SIZE],
			 const uint8_t session[16], uint32_t id, uint32_t nch)
{
	uint64_t check;

	memset(hs, 0, FERRY_MULTIFD_HANDSHAKE_SIZE);
	put_be32(hs, FERRY_MULTIFD_MAGIC);
	put_be32(hs + 4, FERRY_MULTIFD_VERSION);
	memcpy(hs + 8, session, 16);
	put_be32(hs + 24, id);
	put_be32(hs + 28, nch);
	put_be32(hs + 36, FERRY_MULTIFD_PACKET_PAGES_DEFAULT);
	check = XXH3_64bits_withSeed(hs, 56, 0);
	put_be32(hs + 56, (uint32_t)(check >> 32));
	put_be32(hs + 60, (uint32_t)check);
}

/* A foreign multifd channel: connected, its handshake sent, and (until
 * closed) held open like a real channel would be. */
static int mf_foreign(int port, const uint8_t hs[FERRY_MULTIFD_HANDSHAKE_SIZE])
{
	int fd = tcp_connect(port);

	ASSERT(send_all(fd, hs, FERRY_MULTIFD_HANDSHAKE_SIZE));
	return fd;
}

/*
 * Multifd channels that are not the source's, before and during a real
 * migration: damaged handshakes (wrong check, version, flags, an
 * impossible channel count), each refused at once, and well-formed
 * handshakes of another session - before the source (they wait for the
 * main stream to name its session and are then turned away: the first
 * channel to arrive must not claim the migration) and while it runs. The
 * real source's channels carry its migration, which completes and
 * verifies clean.
 */
TEST(hostile_port_multifd_wrong_session)
{
	uint8_t hs[FERRY_MULTIFD_HANDSHAKE_SIZE], other[16];
	struct proc s, d;
	int port = free_port(), fd[8], n = 0;
	json_t *m;

	vm_spawn(&s, "src", "--backend thread --mem 128M --workload fill");
	spawn_dest(&d, "dst", port, "");
	wait_generation(&s, 20000);
	json_decref(call(&s, "migrate-set-parameters",
			 json_pack("{s:i, s:i}", "multifd-channels", 2,
				   "max-bandwidth", 64 << 20)));
	for (int i = 0; i < 16; i++)
		other[i] = (uint8_t)test_rand();

	/* Before the source: damaged handshakes, each refused on its own. */
	mf_handshake(hs, other, 0, 100000);
	fd[n++] = mf_foreign(port, hs);
	dest_refused(&d, 1, "multifd channel: handshake of channel 0 of 100000");
	mf_handshake(hs, other, 0, 2);
	hs[60] ^= 1;                            /* its check */
	fd[n++] = mf_foreign(port, hs);
	dest_refused(&d, 2, "handshake check mismatch");
	mf_handshake(hs, other, 1, 2);
	put_be32(hs + 4, 7);                    /* a version from the future */
	fd[n++] = mf_foreign(port, hs);
	dest_refused(&d, 3, "handshake version 7");
	mf_handshake(hs, other, 1, 2);
	hs[35] = 0x40;                          /* unknown flags, check redone */
	{
		uint64_t ck = XXH3_64bits_withSeed(hs, 56, 0);

		put_be32(hs + 56, (uint32_t)(ck >> 32));
		put_be32(hs + 60, (uint32_t)ck);
	}
	fd[n++] = mf_foreign(port, hs);
	dest_refused(&d, 4, "unknown flags");
	/* Well-formed channels of another session, before the source's own:
	 * they wait (nothing tells them from the real ones yet). */
	mf_handshake(hs, other, 0, 2);
	fd[n++] = mf_foreign(port, hs);
	mf_handshake(hs, other, 1, 2);
	fd[n++] = mf_foreign(port, hs);
	dest_refused_exactly(&d, 4);
	ASSERT_STREQ(status_of(&d), "inmigrate");

	/* The real source; while it runs, another session's channels. */
	json_decref(call(&s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	wait_migration_live(&s, "active");
	mf_handshake(hs, other, 0, 2);
	fd[n++] = mf_foreign(port, hs);
	mf_handshake(hs, other, 1, 2);
	fd[n++] = mf_foreign(port, hs);
	json_decref(call(&s, "migrate-set-parameters",
			 json_pack("{s:i}", "max-bandwidth", 0)));
	wait_migration(&s, "completed");
	m = call(&s, "query-migrate", NULL);
	ASSERT_GT(geti(json_object_get(m, "ram"), "multifd-bytes"), 64 << 20);
	json_decref(m);
	wait_loaded(&d);
	wait_migration(&d, "completed");
	/* The four strangers were turned away, the waiting ones for their
	 * session. */
	m = call(&d, "query-migrate", NULL);
	ASSERT_EQ(refused_count(m), 8);
	ASSERT_CONTAINS(gets(m, "last-refused"), "session id mismatch");
	json_decref(m);
	cont_verified(&d);
	while (n--)
		close(fd[n]);
	vm_quit(&s);
	vm_quit(&d);
}

/* ---- the control socket ------------------------------------------------------ */

static int unix_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	ASSERT_GE(fd, 0);
	ASSERT_LT(strlen(path), sizeof(sa.sun_path));
	strcpy(sa.sun_path, path);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		FAIL("connect(%s): %s", path, strerror(errno));
	return fd;
}

static json_t *read_msg(int fd)
{
	struct ferry_error err = { 0 };
	json_t *m = NULL;

	ASSERT_OK_E(control_client_read(fd, &m, 10000, &err), err);
	return m;
}

/* The next reply on @fd (events skipped). */
static json_t *read_reply(int fd)
{
	for (;;) {
		json_t *m = read_msg(fd);

		if (!json_object_get(m, "event"))
			return m;
		json_decref(m);
	}
}

static const char *err_desc(json_t *reply)
{
	return json_string_value(json_object_get(json_object_get(reply, "error"),
						 "desc"));
}

/* The VM answers a brand-new client, and its guest makes progress. */
static void vm_alive(struct proc *p)
{
	struct proc fresh = *p;
	struct ferry_error err = { 0 };
	long long g;

	fresh.fd = control_client_connect(p->sock, 5000, &err);
	if (fresh.fd < 0)
		FAIL("a new client cannot talk to the VM: %s", err.msg);
	ASSERT_STREQ(status_of(&fresh), "running");
	g = generation(&fresh);
	wait_generation(&fresh, g + 10);
	close(fresh.fd);
}

/* Malformed JSON, binary junk and a 10 MiB line against a real VM. */
TEST(hostile_control_junk)
{
	static const char *bad[] = {
		"{\"execute\": ]}\n",
		"{\"execute\": \"query-status\", \"arguments\": {\"a\": tru}}\n",
		"[\"execute\", \"quit\"]\n",
		"{\"execute\": \"quit\", \"extra\": 1}\n",
		"{\"execute\": \"quit\", \"arguments\": \"now\"}\n",
		"{\"execute\": \"no-such-command\"}\n",
		"{\"execute\": \"migrate\", \"arguments\": {\"uri\": 42}}\n",
		"{\"execute\": \"migrate\", \"arguments\": {\"uri\": \"bogus:x\"}}\n",
		"{\"execute\": \"migrate-set-parameters\", \"arguments\": "
		"{\"downtime-limit\": \"soon\"}}\n",
		"{\"execute\": \"x-corrupt-page\", \"arguments\": {\"page\": -1}}\n",
		"{\"execute\": \"x-corrupt-page\", \"arguments\": "
		"{\"page\": 9223372036854775807}}\n",
		"{\"execute\": \"migrate-set-capabilities\", \"arguments\": "
		"{\"capabilities\": [{\"capability\": \"warp-drive\", "
		"\"state\": true}]}}\n",
		"{\"execute\": \"migrate-set-parameters\", \"arguments\": "
		"{\"no-such-parameter\": 1}}\n",
		"{\"execute\": \"x-migrate-fault\", \"arguments\": "
		"{\"point\": \"everywhere\"}}\n",
		"nonsense\n",
		"\xff\xfe\x01\x02\n",
	};
	struct proc p;
	uint8_t junk[65536];
	char *line;
	size_t big = 10u << 20, sent = 0;
	json_t *r;
	int fd;

	vm_spawn(&p, "vm", GUEST);
	wait_generation(&p, 100);
	fd = unix_connect(p.sock);
	json_decref(read_msg(fd)); /* greeting */
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ASSERT(send_all(fd, bad[i], strlen(bad[i])));
		r = read_reply(fd);
		if (!json_object_get(r, "error"))
			FAIL("input %zu (%s) was not refused: %s", i, bad[i],
			     json_dumps(r, 0));
		json_decref(r);
		/* One reply per bad line: the next request gets its own. */
		ASSERT(send_all(fd, "{\"execute\": \"query-status\", \"id\": 1}\n", 37));
		r = read_reply(fd);
		ASSERT_EQ(json_integer_value(json_object_get(r, "id")), 1);
		ASSERT_STREQ(gets(json_object_get(r, "return"), "status"), "running");
		json_decref(r);
	}

	/* Binary junk: errors, then in sync again after a newline. */
	for (int round = 0; round < 8; round++) {
		for (size_t i = 0; i < sizeof(junk); i++) {
			junk[i] = (uint8_t)test_rand();
			if (strchr("{}[]\"", junk[i]) && junk[i])
				junk[i] = 'x';
		}
		ASSERT(send_all(fd, junk, sizeof(junk)));
		ASSERT(send_all(fd, "\n{\"execute\": \"query-status\", \"id\": \"probe\"}\n",
				44));
		for (;;) {
			r = read_reply(fd);
			if (json_object_get(r, "id"))
				break;
			ASSERT_PTR(err_desc(r));
			json_decref(r);
		}
		ASSERT_STREQ(json_string_value(json_object_get(r, "id")), "probe");
		json_decref(r);
	}
	close(fd);

	/* A request that never ends (an object left open): nothing is
	 * answered on that connection until it ends, when the server says a
	 * request was cut short; other clients are served meanwhile. */
	fd = unix_connect(p.sock);
	json_decref(read_msg(fd));
	ASSERT(send_all(fd, "{\"execute\": \"query-status\"\n"
			"{\"execute\": \"quit\"}\n", 47));
	vm_alive(&p);
	shutdown(fd, SHUT_WR);
	r = read_reply(fd);
	ASSERT_CONTAINS(err_desc(r), "end of input inside a request");
	json_decref(r);
	close(fd);

	/* A 10 MiB line: refused with an error, that connection closed, the
	 * VM unharmed. */
	line = malloc(big);
	ASSERT_PTR(line);
	memset(line, 'a', big);
	memcpy(line, "{\"execute\": \"query-status\", \"arguments\": {\"s\": \"", 48);
	fd = unix_connect(p.sock);
	json_decref(read_msg(fd));
	while (sent < big) {
		ssize_t n = send(fd, line + sent, big - sent, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break; /* the VM hung up part-way, as it should */
		sent += (size_t)n;
	}
	ASSERT_LT(sent, big);
	r = read_reply(fd);
	ASSERT_CONTAINS(err_desc(r), "exceeds");
	json_decref(r);
	{
		struct ferry_error err = { 0 };

		r = NULL;
		ASSERT_ERR(control_client_read(fd, &r, 5000, &err), -ECONNRESET);
	}
	close(fd);
	free(line);

	/* The first client saw nothing of it, and the guest's memory was
	 * not touched by any refused command. */
	ASSERT_STREQ(status_of(&p), "running");
	vm_alive(&p);
	r = verify(&p);
	ASSERT_EQ(geti(r, "bad-pages"), 0);
	json_decref(r);
	vm_quit(&p);
}

/*
 * 200 clients at once, each with a request: the first CONTROL_MAX_CLIENTS
 * are served, the rest are told "too many control connections" and closed;
 * the VM runs on, and once they leave a new client is served.
 */
TEST(hostile_control_crowd)
{
	enum { N = 200 };
	struct proc p;
	int fd[N], served = 0, turned = 0;

	vm_spawn(&p, "vm", GUEST);
	wait_generation(&p, 100);
	for (int i = 0; i < N; i++)
		fd[i] = unix_connect(p.sock);
	for (int i = 0; i < N; i++)
		send_all(fd[i], test_fmt("{\"execute\": \"query-status\", "
					 "\"id\": %d}\n", i),
			 strlen(test_fmt("{\"execute\": \"query-status\", "
					 "\"id\": %d}\n", i)));
	for (int i = 0; i < N; i++) {
		json_t *g = read_msg(fd[i]), *r;

		if (json_object_get(g, "QMP")) {
			r = read_reply(fd[i]);
			ASSERT_EQ(json_integer_value(json_object_get(r, "id")), i);
			ASSERT_STREQ(gets(json_object_get(r, "return"), "status"),
				     "running");
			json_decref(r);
			served++;
		} else {
			ASSERT_CONTAINS(err_desc(g), "too many control connections");
			turned++;
		}
		json_decref(g);
	}
	/* The VM's own test helper holds one connection. */
	ASSERT_EQ(served, CONTROL_MAX_CLIENTS - 1);
	ASSERT_EQ(turned, N - served);
	for (int i = 0; i < N; i++)
		close(fd[i]);
	/* Room again once they are gone. */
	for (int i = 0; i < 100; i++) {
		struct ferry_error err = { 0 };
		int c = control_client_connect(p.sock, 2000, &err);
		bool ok = c >= 0 && !control_client_call(c, "query-status", NULL,
							 NULL, 2000, &err);

		if (c >= 0)
			close(c);
		if (ok)
			break;
		ASSERT_LT(i, 99);
		usleep(20000);
	}
	vm_alive(&p);
	vm_quit(&p);
}

/*
 * A client that never reads: it asks for more replies than it will ever
 * take in and receives every event, while another client is answered at
 * once throughout; once its unsent output passes CONTROL_MAX_OUTPUT it is
 * disconnected, and the VM runs on.
 */
TEST(hostile_control_non_reader)
{
	static const char req[] = "{\"execute\": \"query-commands\"}\n";
	struct proc p;
	char *burst;
	size_t per = sizeof(req) - 1, nreq = 4096;
	double worst = 0;
	int fd, got_eof = 0;

	vm_spawn(&p, "vm", GUEST);
	wait_generation(&p, 100);
	fd = unix_connect(p.sock);
	burst = malloc(per * nreq);
	ASSERT_PTR(burst);
	for (size_t i = 0; i < nreq; i++)
		memcpy(burst + i * per, req, per);
	/* Never read, keep asking; events (stop/cont) pile up too. */
	for (int round = 0; round < 40; round++) {
		double t0;

		if (!send_all(fd, burst, per * nreq))
			break; /* dropped already */
		t0 = now_ms();
		json_decref(call(&p, round % 2 ? "cont" : "stop", NULL));
		ASSERT_STREQ(status_of(&p), round % 2 ? "running" : "paused");
		if (now_ms() - t0 > worst)
			worst = now_ms() - t0;
	}
	json_decref(call(&p, "cont", NULL));
	/* The other client never waited for the stuck one. */
	if (worst > (slow_build() ? 5000 : 1000))
		FAIL("a call took %.0f ms while a client did not read", worst);
	/* Reading now: what was queued, then the end (it was dropped). */
	for (;;) {
		char buf[65536];
		struct pollfd pf = { .fd = fd, .events = POLLIN };
		ssize_t n;

		if (poll(&pf, 1, 10000) != 1)
			FAIL("the client that did not read was never dropped");
		n = read(fd, buf, sizeof(buf));
		if (n <= 0) {
			got_eof = 1;
			break;
		}
	}
	ASSERT(got_eof);
	close(fd);
	free(burst);
	vm_alive(&p);
	vm_quit(&p);
}

/* Refused with a GenericError whose desc contains @why. */
static void refused_cmd(struct proc *p, const char *cmd, json_t *args,
			const char *why)
{
	char msg[512];

	call_fails(p, cmd, args, msg, sizeof(msg));
	ASSERT_CONTAINS(msg, why);
}

/*
 * Commands in the wrong state: cont, migrate and migrate-incoming on a VM
 * waiting for its state; migrate-incoming twice; migrate twice; and
 * others that only make sense elsewhere. Each is refused with a reason,
 * nothing changes state, and the migration then goes through.
 */
TEST(hostile_control_wrong_state)
{
	struct proc s, d, dd;
	int port = free_port(), port2 = free_port();
	json_t *m;

	vm_spawn(&s, "src", GUEST);
	spawn_dest(&d, "dst", port, "");
	vm_spawn(&dd, "defer", "--backend thread --mem 128M --incoming defer");
	wait_generation(&s, 1000);

	/* A destination waiting for its source. */
	refused_cmd(&d, "cont", NULL, "incoming migration not finished");
	refused_cmd(&d, "migrate", json_pack("{s:s}", "uri",
		    test_fmt("tcp:127.0.0.1:%d", port2)), "inmigrate");
	refused_cmd(&d, "migrate-incoming", json_pack("{s:s}", "uri",
		    test_fmt("tcp:127.0.0.1:%d", port2)), "--incoming defer");
	refused_cmd(&d, "migrate-recover", json_pack("{s:s}", "uri",
		    "tcp:127.0.0.1:0"), "no paused postcopy to recover here");
	ASSERT_STREQ(status_of(&d), "inmigrate");

	/* migrate-incoming twice (and cont in between). */
	refused_cmd(&dd, "cont", NULL, "incoming migration not finished");
	json_decref(call(&dd, "migrate-incoming", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port2))));
	refused_cmd(&dd, "migrate-incoming", json_pack("{s:s}", "uri",
		    test_fmt("tcp:127.0.0.1:%d", free_port())),
		    "a migration is already setup");
	refused_cmd(&dd, "migrate-incoming", json_pack("{s:s}", "uri",
		    test_fmt("tcp:127.0.0.1:%d", port2)),
		    "a migration is already setup");
	refused_cmd(&dd, "cont", NULL, "incoming migration not finished");
	m = call(&dd, "query-migrate", NULL);
	ASSERT_STREQ(gets(m, "status"), "setup");
	json_decref(m);

	/* A source: migrate twice, settings that may not change now. */
	refused_cmd(&s, "migrate-start-postcopy", NULL,
		    "no precopy to switch to postcopy");
	refused_cmd(&s, "migrate-incoming", json_pack("{s:s}", "uri",
		    "tcp:127.0.0.1:0"), "--incoming defer");
	json_decref(call(&s, "migrate-set-parameters",
			 json_pack("{s:i}", "max-bandwidth", 20 << 20)));
	json_decref(call(&s, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	refused_cmd(&s, "migrate", json_pack("{s:s}", "uri",
		    test_fmt("tcp:127.0.0.1:%d", port2)),
		    "a migration is already");
	refused_cmd(&s, "migrate-set-capabilities", json_pack(
		    "{s:[{s:s, s:b}]}", "capabilities", "capability",
		    "auto-converge", "state", 1),
		    "cannot change while a migration runs");
	refused_cmd(&s, "migrate", json_pack("{s:s, s:b}", "uri",
		    test_fmt("tcp:127.0.0.1:%d", port2), "resume", 1),
		    "no paused postcopy to resume");
	/* The other destination was never contacted. */
	m = call(&dd, "query-migrate", NULL);
	ASSERT_STREQ(gets(m, "status"), "setup");
	json_decref(m);

	json_decref(call(&s, "migrate-set-parameters",
			 json_pack("{s:i}", "max-bandwidth", 0)));
	wait_migration(&s, "completed");
	wait_loaded(&d);
	wait_migration(&d, "completed");
	cont_verified(&d);
	/* And the deferred one still takes a real migration. */
	real_migration(&d, &dd, port2);
	/* Running, it never takes another state: that would load over a
	 * live guest. */
	refused_cmd(&dd, "migrate-incoming", json_pack("{s:s}", "uri",
		    test_fmt("tcp:127.0.0.1:%d", free_port())),
		    "this one is running");
	/* Migrated out to a destination that confirmed it, it may (the
	 * soak's ping-pong), and the guest comes back whole. */
	vm_quit(&d);
	port = free_port();
	spawn_dest(&d, "dst2", port, "");
	real_migration(&dd, &d, port);
	json_decref(call(&dd, "migrate-incoming", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port2 = free_port()))));
	ASSERT_STREQ(status_of(&dd), "inmigrate");
	refused_cmd(&dd, "cont", NULL, "incoming migration not finished");
	real_migration(&d, &dd, port2);
	/* Migrated out with the destination's ack lost: in doubt, it may
	 * hold the only copy, and takes no state. */
	vm_quit(&d);
	port = free_port();
	spawn_dest(&d, "dst3", port, "");
	json_decref(call(&d, "x-migrate-fault", json_pack("{s:s}", "point",
			 "lose-ack")));
	json_decref(call(&dd, "migrate-set-parameters",
			 json_pack("{s:i}", "peer-timeout", 2000)));
	json_decref(call(&dd, "migrate", json_pack("{s:s}", "uri",
			 test_fmt("tcp:127.0.0.1:%d", port))));
	wait_migration(&dd, "failed");
	m = call(&dd, "query-migrate", NULL);
	ASSERT_STREQ(gets(m, "switchover"), "in-doubt");
	json_decref(m);
	ASSERT_STREQ(status_of(&dd), "postmigrate");
	refused_cmd(&dd, "migrate-incoming", json_pack("{s:s}", "uri",
		    test_fmt("tcp:127.0.0.1:%d", free_port())),
		    "may hold the only copy");
	ASSERT_STREQ(status_of(&dd), "postmigrate");
	vm_quit(&s);
	vm_quit(&d);
	vm_quit(&dd);
}

/* The control socket of a real VM is mode 0600 whatever the umask. */
TEST(hostile_control_socket_mode)
{
	struct proc p;
	struct stat st;
	mode_t old = umask(0);

	vm_spawn(&p, "vm", "--backend thread --mem 64M --paused");
	umask(old);
	ASSERT_OK(stat(p.sock, &st) ? -errno : 0);
	ASSERT(S_ISSOCK(st.st_mode));
	if ((st.st_mode & 07777) != 0600)
		FAIL("control socket mode %o, wanted 600", st.st_mode & 07777);
	vm_quit(&p);
}
