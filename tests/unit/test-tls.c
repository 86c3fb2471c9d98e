/*
 * tests/unit/test-tls.c - lib/tls.c on its own: a session with a reader
 * and a writer in different threads on each end (the main stream and its
 * return path share one socket), a record changed in flight, a peer that
 * never finishes its handshake, and credentials that are not there.
 */
#include "../harness.h"

#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tls.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

static const char *make_creds(void)
{
	const char *dir = test_fmt("%s/creds", test_tmpdir());
	char *out = NULL;

	if (test_run(&out, "openssl version") != 0)
		SKIP("the openssl command-line tool is not installed");
	free(out);
	if (test_run(&out, "scripts/gen-certs.sh %s", dir) != 0)
		FAIL("gen-certs.sh: %s", out);
	free(out);
	return strdup(dir);
}

/* Sending-key updates every this many bytes (0: the default). */
static uint64_t rekey;

static struct ferry_tls *creds(const char *dir, bool server)
{
	struct ferry_error e = { 0 };
	struct ferry_tls_config cfg = { .dir = dir, .server = server,
					.hostname = "localhost",
					.rekey_bytes = rekey };
	struct ferry_tls *t = ferry__tls_new(&cfg, &e);

	if (!t)
		FAIL("credentials: %s", e.msg);
	return t;
}

struct hs_arg {
	struct ferry_tls_conn *c;
	int r;
	struct ferry_error e;
};

static void *hs_main(void *p)
{
	struct hs_arg *a = p;

	a->r = ferry__tls_handshake(a->c, 10000, &a->e);
	return NULL;
}

/* Both ends of @fds handshaken, the server in a thread. */
static void pair(const char *dir, int fds[2], struct ferry_tls_conn **srv,
		 struct ferry_tls_conn **cli)
{
	struct ferry_tls *ts = creds(dir, true), *tc = creds(dir, false);
	struct ferry_error e = { 0 };
	struct hs_arg a = { 0 };
	pthread_t th;

	ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM, 0, fds));
	a.c = *srv = ferry__tls_conn_new(ts, fds[0], NULL, &e);
	*cli = ferry__tls_conn_new(tc, fds[1], NULL, &e);
	ASSERT(*srv && *cli);
	ASSERT_OK(pthread_create(&th, NULL, hs_main, &a));
	if (ferry__tls_handshake(*cli, 10000, &e))
		FAIL("client handshake: %s", e.msg);
	pthread_join(th, NULL);
	if (a.r)
		FAIL("server handshake: %s", a.e.msg);
	/* Sessions hold their own references to the credentials. */
	ferry__tls_free(ts);
	ferry__tls_free(tc);
}

#define STREAM_BYTES (48u << 20)

struct pump {
	struct ferry_tls_conn *c;
	uint32_t seed;
	int r;
	uint64_t bytes;
};

static uint8_t pattern(uint32_t seed, uint64_t i)
{
	return (uint8_t)((i * 2654435761u) >> 13 ^ seed);
}

/* Writes STREAM_BYTES of a pattern in iovecs of uneven pieces. */
static void *writer(void *p)
{
	struct pump *w = p;
	static __thread uint8_t buf[3][70000];
	uint64_t off = 0;

	while (off < STREAM_BYTES && !w->r) {
		size_t sz[3] = { 4096, 1 + (off % 5000), 70000 };
		struct iovec iov[3];

		for (int k = 0; k < 3; k++) {
			for (size_t i = 0; i < sz[k]; i++)
				buf[k][i] = pattern(w->seed, off + i);
			iov[k] = (struct iovec){ buf[k], sz[k] };
			off += sz[k];
		}
		w->r = ferry__tls_writev(w->c, iov, 3, 10000);
	}
	w->bytes = off;
	return NULL;
}

/* Reads until end of stream, checking the pattern. */
static void *reader(void *p)
{
	struct pump *rd = p;
	static __thread uint8_t buf[50000];

	for (;;) {
		ssize_t n = ferry__tls_read(rd->c, buf, sizeof(buf), 10000);

		if (n <= 0) {
			rd->r = (int)n;
			return NULL;
		}
		for (ssize_t i = 0; i < n; i++)
			if (buf[i] != pattern(rd->seed, rd->bytes + (uint64_t)i)) {
				rd->r = -EBADMSG;
				return NULL;
			}
		rd->bytes += (uint64_t)n;
	}
}

/* Each end writes and reads at once, from two threads: 48 MiB each way
 * arrive whole, in order - with each writer updating its key every 4 MiB
 * while the other direction runs. */
TEST(tls_session_full_duplex)
{
	const char *dir = make_creds();
	struct ferry_tls_conn *s, *c;
	struct pump ws, wc, rs, rc;
	pthread_t t[4];
	int fds[2];

	rekey = 4u << 20;
	pair(dir, fds, &s, &c);
	rekey = 0;
	ws = (struct pump){ .c = s, .seed = 1 };
	wc = (struct pump){ .c = c, .seed = 2 };
	rs = (struct pump){ .c = s, .seed = 2 };
	rc = (struct pump){ .c = c, .seed = 1 };
	ASSERT_OK(pthread_create(&t[0], NULL, writer, &ws));
	ASSERT_OK(pthread_create(&t[1], NULL, writer, &wc));
	ASSERT_OK(pthread_create(&t[2], NULL, reader, &rs));
	ASSERT_OK(pthread_create(&t[3], NULL, reader, &rc));
	pthread_join(t[0], NULL);
	pthread_join(t[1], NULL);
	ASSERT_OK(ws.r);
	ASSERT_OK(wc.r);
	/* The end of each direction: the readers see it as EOF. */
	shutdown(fds[0], SHUT_WR);
	shutdown(fds[1], SHUT_WR);
	pthread_join(t[2], NULL);
	pthread_join(t[3], NULL);
	ASSERT_EQ(rs.r, 0);
	ASSERT_EQ(rc.r, 0);
	ASSERT_EQ_U64(rs.bytes, wc.bytes);
	ASSERT_EQ_U64(rc.bytes, ws.bytes);
	{
		struct ferry_tls_info i;

		ferry__tls_get_info(c, &i);
		ASSERT_STREQ(i.version, "TLSv1.3");
		ASSERT_STREQ(i.peer, "CN=localhost");
		ASSERT_GE(i.key_updates, STREAM_BYTES / (4u << 20) - 1);
		ferry__tls_get_info(s, &i);
		ASSERT_STREQ(i.peer, "CN=ferry-source");
		ASSERT_GE(i.key_updates, STREAM_BYTES / (4u << 20) - 1);
	}
	ferry__tls_unref(s);
	ferry__tls_unref(c);
	close(fds[0]);
	close(fds[1]);
}

/* One bit changed in a record in flight: the reader fails with -EBADMSG,
 * it never returns the changed data. */
TEST(tls_session_tampered_record)
{
	const char *dir = make_creds();
	struct ferry_tls_conn *s, *c;
	uint8_t msg[1000], raw[2000], got[1000];
	struct iovec iov = { msg, sizeof(msg) };
	int fds[2];
	ssize_t n;

	pair(dir, fds, &s, &c);
	memset(msg, 0xab, sizeof(msg));
	ASSERT_OK(ferry__tls_writev(c, &iov, 1, 5000));
	/* The man in the middle: take the record off the server's socket
	 * before its session reads it, change one bit, and put it back on
	 * the wire from the client's end (raw bytes, as on a path). */
	usleep(100000);
	n = recv(fds[0], raw, sizeof(raw), MSG_DONTWAIT);
	ASSERT_GT(n, (ssize_t)sizeof(msg));
	raw[n / 2] ^= 0x10;
	ASSERT_EQ(send(fds[1], raw, (size_t)n, 0), n);
	n = ferry__tls_read(s, got, sizeof(got), 2000);
	ASSERT_EQ(n, -EBADMSG);
	ferry__tls_unref(s);
	ferry__tls_unref(c);
	close(fds[0]);
	close(fds[1]);
}

/* A client that connects and never says a word: the server's handshake
 * gives up after its timeout. */
TEST(tls_handshake_silent_peer)
{
	const char *dir = make_creds();
	struct ferry_tls *ts = creds(dir, true);
	struct ferry_error e = { 0 };
	struct ferry_tls_conn *s;
	int fds[2];

	ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM, 0, fds));
	s = ferry__tls_conn_new(ts, fds[0], NULL, &e);
	ASSERT(s);
	ASSERT_EQ(ferry__tls_handshake(s, 200, &e), -ETIMEDOUT);
	ASSERT_CONTAINS(e.msg, "no handshake from the source within 200 ms");
	ferry__tls_unref(s);
	ferry__tls_free(ts);
	close(fds[0]);
	close(fds[1]);
}

/* Missing files are named; a key that is not a key is refused. */
TEST(tls_credentials_checked)
{
	const char *dir = make_creds();
	struct ferry_error e = { 0 };
	struct ferry_tls_config cfg = { .dir = test_tmpdir(), .server = true };
	char *out = NULL;

	ASSERT(!ferry__tls_new(&cfg, &e));
	ASSERT_CONTAINS(e.msg, "ca-cert.pem: No such file or directory");
	ferry_error_clear(&e);
	test_run(&out, "cp %s/ca-cert.pem %s/server-cert.pem %s && "
		 "echo junk > %s/server-key.pem", dir, dir, test_tmpdir(),
		 test_tmpdir());
	free(out);
	ASSERT(!ferry__tls_new(&cfg, &e));
	ASSERT_CONTAINS(e.msg, "server-key.pem");
	ferry_error_clear(&e);
	cfg.dir = "";
	ASSERT(!ferry__tls_new(&cfg, &e));
	ASSERT_CONTAINS(e.msg, "no directory");
}

/* A ca-crl.pem beside the CA (QEMU's layout) revokes the client: the
 * server refuses it during the handshake, and the client hears why. */
TEST(tls_revoked_client)
{
	const char *dir = make_creds();
	struct ferry_tls *ts, *tc;
	struct ferry_error e = { 0 };
	struct ferry_tls_conn *s, *c;
	struct hs_arg a = { 0 };
	pthread_t th;
	char *out = NULL;
	int fds[2], r;

	/* The CA's revocation list, made with the openssl tool's own CA
	 * database format: one revoked entry, the client's serial. */
	if (test_run(&out, "cd %s && printf '[ca]\\ndefault_ca=d\\n[d]\\n"
		     "database=index.txt\\ndefault_md=sha256\\ndefault_crl_days=30\\n'"
		     " > crl.cnf && printf 'R\\t301001010000Z\\t240101000000Z\\t%%s"
		     "\\tunknown\\t/CN=ferry-source\\n' $(openssl x509 -in "
		     "client-cert.pem -noout -serial | cut -d= -f2) > index.txt && "
		     "openssl ca -gencrl -config crl.cnf -keyfile ca-key.pem -cert "
		     "ca-cert.pem -out ca-crl.pem", dir) != 0)
		FAIL("making the CRL: %s", out);
	free(out);
	ts = creds(dir, true);
	tc = creds(dir, false);
	ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM, 0, fds));
	a.c = s = ferry__tls_conn_new(ts, fds[0], NULL, &e);
	c = ferry__tls_conn_new(tc, fds[1], NULL, &e);
	ASSERT(s && c);
	ASSERT_OK(pthread_create(&th, NULL, hs_main, &a));
	r = ferry__tls_handshake(c, 10000, &e);
	pthread_join(th, NULL);
	ASSERT_NE(r, 0);
	ASSERT_CONTAINS(e.msg, "revoked");
	ASSERT_NE(a.r, 0);
	ASSERT_CONTAINS(a.e.msg, "certificate revoked");
	ferry__tls_unref(s);
	ferry__tls_unref(c);
	ferry__tls_free(ts);
	ferry__tls_free(tc);
	close(fds[0]);
	close(fds[1]);
}

/* A peer that went away: writes fail with an error, and no SIGPIPE
 * kills a process that did not ignore it (a VMM embedding the library). */
TEST(tls_session_peer_gone_no_sigpipe)
{
	const char *dir = make_creds();
	struct ferry_tls_conn *s, *c;
	static uint8_t buf[1 << 20];
	struct iovec iov = { buf, sizeof(buf) };
	int fds[2], r;

	signal(SIGPIPE, SIG_DFL);
	pair(dir, fds, &s, &c);
	ferry__tls_unref(c);
	close(fds[1]);
	r = ferry__tls_writev(s, &iov, 1, 2000);
	if (!r)  /* the first one may fit in the socket buffer */
		r = ferry__tls_writev(s, &iov, 1, 2000);
	ASSERT(r == -EPIPE || r == -ECONNRESET);
	ferry__tls_unref(s);
	close(fds[0]);
}
