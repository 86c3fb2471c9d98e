/*
 * tests/unit/test-transport.c - URI parsing and the tcp:/unix:/fd:/file:
 * transports, over loopback only.
 */
#include "../harness.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ferry/transport.h"

/* Prototypes for every listed test (keeps -Wmissing-prototypes happy). */
#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

/* ---- helpers ------------------------------------------------------------ */

static void send_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = write(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			FAIL("write(fd %d): %s", fd, strerror(errno));
		p += n;
		len -= (size_t)n;
	}
}

static void recv_all(int fd, void *buf, size_t len)
{
	char *p = buf;

	while (len) {
		ssize_t n = read(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			FAIL("read(fd %d): %s", fd, strerror(errno));
		if (n == 0)
			FAIL("read(fd %d): unexpected end of stream", fd);
		p += n;
		len -= (size_t)n;
	}
}

static void fill_random(void *buf, size_t len)
{
	unsigned char *p = buf;

	for (size_t i = 0; i < len; i++)
		p[i] = (unsigned char)test_rand();
}

/* Move @len bytes @from -> @to in chunks small enough for any socket
 * buffer, so one thread can do both ends without deadlocking. */
static void pump(int from, int to, const unsigned char *out, unsigned char *in,
		 size_t len)
{
	const size_t chunk = 16384;

	for (size_t off = 0; off < len; off += chunk) {
		size_t n = len - off < chunk ? len - off : chunk;

		send_all(from, out + off, n);
		recv_all(to, in + off, n);
	}
}

/* Send @len random bytes a -> b and b -> a, check both arrive intact. */
static void exchange(int a, int b, size_t len)
{
	unsigned char *out = malloc(len), *in = malloc(len);

	ASSERT_PTR(out);
	ASSERT_PTR(in);
	fill_random(out, len);
	pump(a, b, out, in, len);
	ASSERT_MEMEQ(in, out, len);
	fill_random(out, len);
	pump(b, a, out, in, len);
	ASSERT_MEMEQ(in, out, len);
	free(out);
	free(in);
}

static void assert_cloexec(int fd)
{
	int fl = fcntl(fd, F_GETFD);

	ASSERT_GE(fl, 0);
	if (!(fl & FD_CLOEXEC))
		FAIL("fd %d lacks FD_CLOEXEC", fd);
}

static void assert_blocking(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	ASSERT_GE(fl, 0);
	if (fl & O_NONBLOCK)
		FAIL("fd %d is left non-blocking", fd);
}

static void assert_nodelay(int fd)
{
	int v = 0;
	socklen_t len = sizeof(v);

	ASSERT_OK(getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, &len));
	ASSERT_NE(v, 0);
}

static int64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- URI parsing -------------------------------------------------------- */

struct parse_case {
	const char *uri;
	int rc;
	enum ferry_uri_kind kind;
	const char *host;  /* tcp */
	const char *port;  /* tcp */
	const char *path;  /* unix, file */
};

TEST(transport_uri_parse)
{
	static const struct parse_case cases[] = {
		/* valid */
		{ "tcp:127.0.0.1:4444", 0, FERRY_URI_TCP, "127.0.0.1", "4444", NULL },
		{ "tcp:localhost:0", 0, FERRY_URI_TCP, "localhost", "0", NULL },
		{ "tcp:host.example:65535", 0, FERRY_URI_TCP, "host.example", "65535", NULL },
		{ "tcp:[::1]:80", 0, FERRY_URI_TCP, "::1", "80", NULL },
		{ "tcp:[fe80::1%lo]:1", 0, FERRY_URI_TCP, "fe80::1%lo", "1", NULL },
		{ "tcp::4444", 0, FERRY_URI_TCP, "", "4444", NULL },
		{ "tcp:h:007", 0, FERRY_URI_TCP, "h", "7", NULL },
		{ "unix:/tmp/x.sock", 0, FERRY_URI_UNIX, NULL, NULL, "/tmp/x.sock" },
		{ "unix:rel/path", 0, FERRY_URI_UNIX, NULL, NULL, "rel/path" },
		{ "file:/tmp/state.bin", 0, FERRY_URI_FILE, NULL, NULL, "/tmp/state.bin" },
		{ "file:a:b", 0, FERRY_URI_FILE, NULL, NULL, "a:b" },
		/* invalid */
		{ "", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp", -EINVAL, 0, NULL, NULL, NULL },
		{ "http://x:1", -EINVAL, 0, NULL, NULL, NULL },
		{ "TCP:127.0.0.1:1", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:127.0.0.1", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:127.0.0.1:", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:127.0.0.1:65536", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:127.0.0.1:99999999999999999999", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:127.0.0.1:-1", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:127.0.0.1:+1", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:127.0.0.1: 80", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:127.0.0.1:80x", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:127.0.0.1:http", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:::1:80", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:[::1]", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:[::1]:", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:[::1]80", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:[::1:80", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:[]:80", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:::1]:80", -EINVAL, 0, NULL, NULL, NULL },
		{ "tcp:a b:80", -EINVAL, 0, NULL, NULL, NULL },
		{ "unix:", -EINVAL, 0, NULL, NULL, NULL },
		{ "file:", -EINVAL, 0, NULL, NULL, NULL },
		{ "fd:", -EINVAL, 0, NULL, NULL, NULL },
		{ "fd:abc", -EINVAL, 0, NULL, NULL, NULL },
		{ "fd:-1", -EINVAL, 0, NULL, NULL, NULL },
		{ "fd:+3", -EINVAL, 0, NULL, NULL, NULL },
		{ "fd:3x", -EINVAL, 0, NULL, NULL, NULL },
		{ "fd: 3", -EINVAL, 0, NULL, NULL, NULL },
		{ "fd:99999999999", -EINVAL, 0, NULL, NULL, NULL },
		{ "fd:2147483648", -EINVAL, 0, NULL, NULL, NULL },
	};
	struct ferry_uri u;
	struct sockaddr_un sa;
	char longpath[300];
	size_t i;
	int rc, fd;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const struct parse_case *c = &cases[i];
		struct ferry_error e = {0};

		rc = ferry_uri_parse(c->uri, &u, &e);
		if (rc != c->rc)
			FAIL("parse \"%s\" = %d (%s), expected %d", c->uri, rc,
			     e.msg, c->rc);
		if (rc) {
			ASSERT_EQ(e.code, rc);
			ASSERT(e.msg[0] != '\0');
			/* The message names the URI (when there is one). */
			if (c->uri[0])
				ASSERT_CONTAINS(e.msg, c->uri);
			continue;
		}
		ASSERT_EQ(e.code, 0);
		ASSERT_EQ(u.kind, c->kind);
		if (c->host)
			ASSERT_STREQ(u.host, c->host);
		if (c->port)
			ASSERT_STREQ(u.port, c->port);
		if (c->path)
			ASSERT_STREQ(u.path, c->path);
		ASSERT_EQ(ferry_uri_is_socket(&u),
			  c->kind == FERRY_URI_TCP || c->kind == FERRY_URI_UNIX);
	}

	/* NULL arguments are errors, not crashes. */
	ASSERT_ERR(ferry_uri_parse(NULL, &u, NULL), -EINVAL);
	ASSERT(!ferry_uri_is_socket(NULL));

	/* unix: the path and its NUL must fit sun_path. */
	memset(longpath, 'a', sizeof(longpath));
	memcpy(longpath, "unix:", 5);
	longpath[5 + sizeof(sa.sun_path) - 1] = '\0';
	ASSERT_OK(ferry_uri_parse(longpath, &u, NULL));
	ASSERT_EQ(strlen(u.path), sizeof(sa.sun_path) - 1);
	memset(longpath, 'a', sizeof(longpath));
	memcpy(longpath, "unix:", 5);
	longpath[5 + sizeof(sa.sun_path)] = '\0';
	{
		struct ferry_error e = {0};

		ASSERT_ERR(ferry_uri_parse(longpath, &u, &e), -ENAMETOOLONG);
		ASSERT_CONTAINS(e.msg, "unix:aaaa");
	}
	longpath[sizeof(longpath) - 1] = '\0';
	ASSERT_ERR(ferry_uri_parse(longpath, &u, NULL), -ENAMETOOLONG);

	/* fd: an open descriptor parses; a closed one is -EBADF. */
	fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	ASSERT_GE(fd, 0);
	ASSERT_OK(ferry_uri_parse(test_fmt("fd:%d", fd), &u, NULL));
	ASSERT_EQ(u.kind, FERRY_URI_FD);
	ASSERT_EQ(u.fd, fd);
	ASSERT(!ferry_uri_is_socket(&u));
	close(fd);
	{
		struct ferry_error e = {0};
		const char *uri = test_fmt("fd:%d", fd);

		ASSERT_ERR(ferry_uri_parse(uri, &u, &e), -EBADF);
		ASSERT_CONTAINS(e.msg, uri);
	}

	/* The first error recorded wins. */
	{
		struct ferry_error e = {0};

		ASSERT_ERR(ferry_uri_parse("tcp:x", &u, &e), -EINVAL);
		ASSERT_ERR(ferry_uri_parse("unix:", &u, &e), -EINVAL);
		ASSERT_CONTAINS(e.msg, "tcp:x");
	}
}

/* ---- tcp ---------------------------------------------------------------- */

TEST(transport_tcp_roundtrip)
{
	struct ferry_error e = {0};
	struct ferry_listener *l;
	const char *uri;
	int c, s;

	l = ferry_transport_listen("tcp:127.0.0.1:0", &e);
	if (!l)
		FAIL("listen: %s", e.msg);
	uri = ferry_listener_uri(l);
	ASSERT_PTR(uri);
	/* The real port, not 0. */
	ASSERT(!strncmp(uri, "tcp:127.0.0.1:", 14));
	ASSERT(atoi(uri + 14) > 0);
	ASSERT_GE(ferry_listener_fd(l), 0);
	assert_cloexec(ferry_listener_fd(l));

	c = ferry_transport_connect(uri, 5000, &e);
	if (c < 0)
		FAIL("connect %s: %s", uri, e.msg);
	s = ferry_listener_accept(l, 5000, &e);
	if (s < 0)
		FAIL("accept: %s", e.msg);
	ASSERT_EQ(e.code, 0);

	assert_cloexec(c);
	assert_cloexec(s);
	assert_blocking(c);
	assert_blocking(s);
	assert_nodelay(c);
	assert_nodelay(s);

	exchange(c, s, 1);
	exchange(c, s, 1 << 20);

	/* EOF propagates. */
	close(c);
	{
		char b;

		ASSERT_EQ(read(s, &b, 1), 0);
	}
	close(s);
	ferry_listener_close(l);
}

TEST(transport_tcp_multi_channel)
{
	enum { N = 6 };
	struct ferry_error e = {0};
	struct ferry_listener *l;
	int c[N], s[N];
	uint32_t tag;

	l = ferry_transport_listen("tcp:127.0.0.1:0", &e);
	if (!l)
		FAIL("listen: %s", e.msg);
	/* Connect them all first: the backlog holds them until accepted. */
	for (int i = 0; i < N; i++) {
		c[i] = ferry_transport_connect(ferry_listener_uri(l), 5000, &e);
		if (c[i] < 0)
			FAIL("connect %d: %s", i, e.msg);
		tag = (uint32_t)i;
		send_all(c[i], &tag, sizeof(tag));
	}
	for (int i = 0; i < N; i++) {
		s[i] = ferry_listener_accept(l, 5000, &e);
		if (s[i] < 0)
			FAIL("accept %d: %s", i, e.msg);
		/* Accept order follows connect order; check by tag anyway. */
		recv_all(s[i], &tag, sizeof(tag));
		ASSERT_LT(tag, N);
		exchange(c[tag], s[i], 4096 + 17 * (size_t)i);
	}
	for (int i = 0; i < N; i++) {
		close(c[i]);
		close(s[i]);
	}
	ferry_listener_close(l);
}

TEST(transport_tcp_ipv6_loopback)
{
	struct ferry_error e = {0};
	struct ferry_listener *l;
	const char *uri;
	int c, s;

	l = ferry_transport_listen("tcp:[::1]:0", &e);
	if (!l)
		SKIP("no IPv6 loopback here");
	uri = ferry_listener_uri(l);
	ASSERT(!strncmp(uri, "tcp:[::1]:", 10));
	ASSERT(atoi(uri + 10) > 0);
	c = ferry_transport_connect(uri, 5000, &e);
	if (c < 0)
		FAIL("connect %s: %s", uri, e.msg);
	s = ferry_listener_accept(l, 5000, &e);
	if (s < 0)
		FAIL("accept: %s", e.msg);
	exchange(c, s, 65536);
	close(c);
	close(s);
	ferry_listener_close(l);
}

TEST(transport_tcp_refused)
{
	struct ferry_error e = {0};
	struct ferry_listener *l;
	char uri[64];
	int fd;

	/* Find a free port by binding one, then close it. */
	l = ferry_transport_listen("tcp:127.0.0.1:0", &e);
	if (!l)
		FAIL("listen: %s", e.msg);
	snprintf(uri, sizeof(uri), "%s", ferry_listener_uri(l));
	ferry_listener_close(l);

	fd = ferry_transport_connect(uri, 5000, &e);
	ASSERT_ERR(fd, -ECONNREFUSED);
	ASSERT_EQ(e.code, -ECONNREFUSED);
	ASSERT_CONTAINS(e.msg, uri);

	/* Port 0 is not a destination. */
	{
		struct ferry_error e2 = {0};

		ASSERT_ERR(ferry_transport_connect("tcp:127.0.0.1:0", 1000, &e2),
			   -EINVAL);
		ASSERT_CONTAINS(e2.msg, "tcp:127.0.0.1:0");
	}
	/* Parse errors come through connect and listen too. */
	{
		struct ferry_error e3 = {0};

		ASSERT_ERR(ferry_transport_connect("tcp:127.0.0.1", 1000, &e3),
			   -EINVAL);
		ASSERT_CONTAINS(e3.msg, "tcp:127.0.0.1");
		ASSERT_NULL(ferry_transport_listen("bogus:1", NULL));
	}
}

TEST(transport_accept_timeout)
{
	struct ferry_error e = {0};
	struct ferry_listener *l;
	int64_t t0, dt;

	l = ferry_transport_listen("tcp:127.0.0.1:0", &e);
	if (!l)
		FAIL("listen: %s", e.msg);
	t0 = mono_ms();
	ASSERT_ERR(ferry_listener_accept(l, 150, &e), -ETIMEDOUT);
	dt = mono_ms() - t0;
	ASSERT_GE(dt, 140);
	ASSERT_LT(dt, 3000);
	ASSERT_EQ(e.code, -ETIMEDOUT);
	ASSERT_CONTAINS(e.msg, ferry_listener_uri(l));

	/* A zero timeout polls once. */
	ASSERT_ERR(ferry_listener_accept(l, 0, NULL), -ETIMEDOUT);

	/* The listener still works after timing out. */
	{
		struct ferry_error e2 = {0};
		int c = ferry_transport_connect(ferry_listener_uri(l), 5000, &e2);
		int s;

		if (c < 0)
			FAIL("connect: %s", e2.msg);
		s = ferry_listener_accept(l, 0, &e2);
		if (s < 0) /* the handshake may still be in flight */
			s = ferry_listener_accept(l, 5000, &e2);
		if (s < 0)
			FAIL("accept: %s", e2.msg);
		exchange(c, s, 100);
		close(c);
		close(s);
	}
	ferry_listener_close(l);
	ASSERT_ERR(ferry_listener_accept(NULL, 0, NULL), -EINVAL);
	ferry_listener_close(NULL);
}

/* Signals interrupting the wait must not end it early. */
static void on_alarm(int sig)
{
	(void)sig;
}

TEST(transport_accept_eintr)
{
	struct sigaction sa = { .sa_handler = on_alarm };
	struct itimerval it = {0};
	struct ferry_listener *l;
	int64_t t0, dt;

	sigemptyset(&sa.sa_mask);
	ASSERT_OK(sigaction(SIGALRM, &sa, NULL)); /* no SA_RESTART */
	l = ferry_transport_listen("tcp:127.0.0.1:0", NULL);
	ASSERT_PTR(l);
	it.it_interval.tv_usec = 50000; /* a signal every 50 ms */
	it.it_value.tv_usec = 50000;
	ASSERT_OK(setitimer(ITIMER_REAL, &it, NULL));
	t0 = mono_ms();
	ASSERT_ERR(ferry_listener_accept(l, 400, NULL), -ETIMEDOUT);
	dt = mono_ms() - t0;
	memset(&it, 0, sizeof(it));
	ASSERT_OK(setitimer(ITIMER_REAL, &it, NULL));
	ASSERT_GE(dt, 390);
	ferry_listener_close(l);
}

/* ---- unix --------------------------------------------------------------- */

TEST(transport_unix_roundtrip)
{
	struct ferry_error e = {0};
	struct ferry_listener *l;
	const char *path = test_fmt("%s/mig.sock", test_tmpdir());
	const char *uri = test_fmt("unix:%s", path);
	struct stat st;
	int c, s, c2, s2;

	/* A stale socket left behind by a dead process is replaced. */
	{
		struct sockaddr_un sa = { .sun_family = AF_UNIX };
		int fd = socket(AF_UNIX, SOCK_STREAM, 0);

		ASSERT_GE(fd, 0);
		snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
		ASSERT_OK(bind(fd, (struct sockaddr *)&sa, sizeof(sa)));
		close(fd);
		ASSERT_OK(lstat(path, &st));
	}

	l = ferry_transport_listen(uri, &e);
	if (!l)
		FAIL("listen: %s", e.msg);
	ASSERT_STREQ(ferry_listener_uri(l), uri);
	assert_cloexec(ferry_listener_fd(l));
	/* Owner only, whatever the umask. */
	ASSERT_OK(lstat(path, &st));
	ASSERT_EQ(st.st_mode & 0777, 0600);

	c = ferry_transport_connect(uri, 5000, &e);
	if (c < 0)
		FAIL("connect: %s", e.msg);
	s = ferry_listener_accept(l, 5000, &e);
	if (s < 0)
		FAIL("accept: %s", e.msg);
	assert_cloexec(c);
	assert_cloexec(s);
	assert_blocking(c);
	assert_blocking(s);
	exchange(c, s, 1 << 20);

	/* A second channel on the same listener. */
	c2 = ferry_transport_connect(uri, 5000, &e);
	ASSERT_GE(c2, 0);
	s2 = ferry_listener_accept(l, 5000, &e);
	ASSERT_GE(s2, 0);
	exchange(c2, s2, 333);
	close(c2);
	close(s2);

	/* Closing the listener removes the path; connections survive. */
	ferry_listener_close(l);
	ASSERT_ERR(lstat(path, &st), -1);
	ASSERT_EQ(errno, ENOENT);
	exchange(c, s, 10);
	close(c);
	close(s);

	/* Nobody listening: -ENOENT (no such path) with the URI named. */
	{
		struct ferry_error e2 = {0};

		ASSERT_ERR(ferry_transport_connect(uri, 1000, &e2), -ENOENT);
		ASSERT_CONTAINS(e2.msg, uri);
	}
}

TEST(transport_unix_not_a_socket)
{
	struct ferry_error e = {0};
	const char *path = test_fmt("%s/precious", test_tmpdir());
	struct stat st;
	int fd;

	/* A regular file at the path is reported, never deleted. */
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	ASSERT_GE(fd, 0);
	close(fd);
	ASSERT_NULL(ferry_transport_listen(test_fmt("unix:%s", path), &e));
	ASSERT_EQ(e.code, -EEXIST);
	ASSERT_CONTAINS(e.msg, path);
	ASSERT_OK(stat(path, &st));
	ASSERT(S_ISREG(st.st_mode));
}

TEST(transport_unix_close_keeps_newer)
{
	const char *path = test_fmt("%s/s", test_tmpdir());
	const char *uri = test_fmt("unix:%s", path);
	struct ferry_listener *a, *b;
	struct stat st;
	int c, s;

	/* b replaces a's path; closing a must not remove b's socket. */
	a = ferry_transport_listen(uri, NULL);
	ASSERT_PTR(a);
	b = ferry_transport_listen(uri, NULL);
	ASSERT_PTR(b);
	ferry_listener_close(a);
	ASSERT_OK(lstat(path, &st));
	c = ferry_transport_connect(uri, 5000, NULL);
	ASSERT_GE(c, 0);
	s = ferry_listener_accept(b, 5000, NULL);
	ASSERT_GE(s, 0);
	exchange(c, s, 64);
	close(c);
	close(s);
	ferry_listener_close(b);
	ASSERT_ERR(lstat(path, &st), -1);
}

TEST(transport_unix_connect_timeout)
{
	/* Fill a unix listener's backlog without accepting: a further
	 * connect cannot complete and must give up at the deadline. */
	const char *uri = test_fmt("unix:%s/full.sock", test_tmpdir());
	struct ferry_listener *l = ferry_transport_listen(uri, NULL);
	int fds[64], n = 0, rc = 0;
	struct ferry_error e = {0};
	int64_t t0 = 0;

	ASSERT_PTR(l);
	while (n < (int)(sizeof(fds) / sizeof(fds[0]))) {
		t0 = mono_ms();
		rc = ferry_transport_connect(uri, 100, &e);
		if (rc < 0)
			break;
		fds[n++] = rc;
	}
	if (rc >= 0)
		SKIP("backlog never filled");
	ASSERT_ERR(rc, -ETIMEDOUT);
	ASSERT_GE(mono_ms() - t0, 90);
	ASSERT_CONTAINS(e.msg, uri);
	ASSERT_GE(n, 1);
	while (n > 0)
		close(fds[--n]);
	ferry_listener_close(l);
}

TEST(transport_open_incoming_socket)
{
	/* One-shot incoming on unix: a child connects once the path exists. */
	const char *path = test_fmt("%s/in.sock", test_tmpdir());
	const char *uri = test_fmt("unix:%s", path);
	struct ferry_error e = {0};
	char buf[6];
	pid_t pid;
	int fd, status;

	pid = fork();
	ASSERT_GE(pid, 0);
	if (pid == 0) {
		for (int i = 0; i < 500; i++) {
			fd = ferry_transport_connect(uri, 1000, NULL);
			if (fd >= 0) {
				send_all(fd, "hello", 6);
				close(fd);
				_exit(0);
			}
			usleep(10000);
		}
		_exit(1);
	}
	fd = ferry_transport_open_incoming(uri, 5000, &e);
	if (fd < 0)
		FAIL("open_incoming: %s", e.msg);
	assert_cloexec(fd);
	recv_all(fd, buf, sizeof(buf));
	ASSERT_STREQ(buf, "hello");
	close(fd);
	ASSERT_EQ(waitpid(pid, &status, 0), pid);
	ASSERT(WIFEXITED(status) && WEXITSTATUS(status) == 0);

	/* Nobody connects: timeout, and the path is cleaned up. */
	{
		struct ferry_error e2 = {0};
		struct stat st;

		ASSERT_ERR(ferry_transport_open_incoming(uri, 50, &e2),
			   -ETIMEDOUT);
		ASSERT_CONTAINS(e2.msg, uri);
		ASSERT_ERR(lstat(path, &st), -1);
	}
}

/* ---- fd ----------------------------------------------------------------- */

TEST(transport_fd_roundtrip)
{
	struct ferry_error e = {0};
	int sp[2], a, b;

	ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM, 0, sp));
	a = ferry_transport_connect(test_fmt("fd:%d", sp[0]), 1000, &e);
	if (a < 0)
		FAIL("connect fd: %s", e.msg);
	b = ferry_transport_open_incoming(test_fmt("fd:%d", sp[1]), 1000, &e);
	if (b < 0)
		FAIL("incoming fd: %s", e.msg);
	/* Dups, not the caller's descriptors. */
	ASSERT_NE(a, sp[0]);
	ASSERT_NE(b, sp[1]);
	assert_cloexec(a);
	assert_cloexec(b);
	exchange(a, b, 100000);

	/* The caller keeps N: closing the dup leaves it usable... */
	close(a);
	exchange(sp[0], b, 10);
	/* ...and closing N leaves the dup usable. */
	close(sp[1]);
	exchange(sp[0], b, 10);
	close(b);
	close(sp[0]);

	/* A closed fd is rejected with the URI in the message. */
	{
		struct ferry_error e2 = {0};
		const char *uri = test_fmt("fd:%d", sp[0]);

		ASSERT_ERR(ferry_transport_connect(uri, 1000, &e2), -EBADF);
		ASSERT_CONTAINS(e2.msg, uri);
	}
	/* fd: cannot listen. */
	ASSERT_OK(pipe(sp));
	ASSERT_NULL(ferry_transport_listen(test_fmt("fd:%d", sp[0]), NULL));
	close(sp[0]);
	close(sp[1]);
}

/* ---- file --------------------------------------------------------------- */

TEST(transport_file_roundtrip)
{
	const char *path = test_fmt("%s/state.bin", test_tmpdir());
	const char *uri = test_fmt("file:%s", path);
	struct ferry_error e = {0};
	unsigned char out[8192], in[8192 + 1];
	struct stat st;
	int fd;

	/* Outgoing truncates an existing file. */
	fd = open(path, O_WRONLY | O_CREAT, 0644);
	ASSERT_GE(fd, 0);
	memset(in, 'x', sizeof(in));
	send_all(fd, in, sizeof(in));
	close(fd);

	fill_random(out, sizeof(out));
	fd = ferry_transport_connect(uri, 1000, &e);
	if (fd < 0)
		FAIL("connect file: %s", e.msg);
	assert_cloexec(fd);
	send_all(fd, out, sizeof(out));
	close(fd);

	/* A freshly created file is private; check it on a new path. */
	{
		const char *p2 = test_fmt("%s/new.bin", test_tmpdir());

		fd = ferry_transport_connect(test_fmt("file:%s", p2), 1000, NULL);
		ASSERT_GE(fd, 0);
		close(fd);
		mode_t mask = umask(0);

		umask(mask);
		ASSERT_OK(stat(p2, &st));
		ASSERT_EQ(st.st_mode & 0777, 0600 & ~mask);
	}
	ASSERT_OK(stat(path, &st));
	ASSERT_EQ(st.st_size, sizeof(out));

	fd = ferry_transport_open_incoming(uri, 1000, &e);
	if (fd < 0)
		FAIL("open_incoming file: %s", e.msg);
	assert_cloexec(fd);
	/* Read-only. */
	ASSERT_EQ(fcntl(fd, F_GETFL) & O_ACCMODE, O_RDONLY);
	recv_all(fd, in, sizeof(out));
	ASSERT_MEMEQ(in, out, sizeof(out));
	ASSERT_EQ(read(fd, in, 1), 0);
	close(fd);

	/* Missing file: -ENOENT naming the URI. */
	{
		struct ferry_error e2 = {0};
		const char *missing = test_fmt("file:%s/nope", test_tmpdir());

		ASSERT_ERR(ferry_transport_open_incoming(missing, 1000, &e2),
			   -ENOENT);
		ASSERT_CONTAINS(e2.msg, missing);
	}
	/* file: cannot listen. */
	ASSERT_NULL(ferry_transport_listen(uri, NULL));
}

/* ---- names and hygiene -------------------------------------------------- */

TEST(transport_tcp_hostnames)
{
	struct ferry_error e = {0};
	struct ferry_listener *l;
	const char *uri, *port;
	int c, s;

	/* A name may resolve to several addresses (::1 and 127.0.0.1): the
	 * listener binds one, connect must try them all. */
	l = ferry_transport_listen("tcp:localhost:0", &e);
	if (!l)
		SKIP("localhost does not resolve here");
	uri = ferry_listener_uri(l);
	ASSERT(!strncmp(uri, "tcp:localhost:", 14));
	c = ferry_transport_connect(uri, 5000, &e);
	if (c < 0)
		FAIL("connect %s: %s", uri, e.msg);
	s = ferry_listener_accept(l, 5000, &e);
	ASSERT_GE(s, 0);
	exchange(c, s, 1000);
	close(c);
	close(s);
	ferry_listener_close(l);

	/* An empty host on the connecting side means this machine. */
	l = ferry_transport_listen("tcp:127.0.0.1:0", &e);
	ASSERT_PTR(l);
	port = strrchr(ferry_listener_uri(l), ':') + 1;
	c = ferry_transport_connect(test_fmt("tcp::%s", port), 5000, &e);
	if (c < 0)
		FAIL("connect tcp::%s: %s", port, e.msg);
	s = ferry_listener_accept(l, 5000, &e);
	ASSERT_GE(s, 0);
	exchange(c, s, 10);
	close(c);
	close(s);
	ferry_listener_close(l);
}

static int count_fds(void)
{
	int n = 0;

	for (int fd = 0; fd < 1024; fd++)
		if (fcntl(fd, F_GETFD) >= 0)
			n++;
	return n;
}

TEST(transport_no_fd_leaks)
{
	struct ferry_listener *l;
	int before, fd;
	char port_uri[64], sock[300], file[300];

	/* Own copies: test_fmt() recycles its buffers. */
	snprintf(sock, sizeof(sock), "unix:%s/leak.sock", test_tmpdir());
	snprintf(file, sizeof(file), "file:%s/none", test_tmpdir());

	l = ferry_transport_listen("tcp:127.0.0.1:0", NULL);
	ASSERT_PTR(l);
	snprintf(port_uri, sizeof(port_uri), "%s", ferry_listener_uri(l));
	ferry_listener_close(l);

	before = count_fds();
	for (int i = 0; i < 20; i++) {
		/* Failure paths must close what they opened. */
		ASSERT_ERR(ferry_transport_connect(port_uri, 1000, NULL),
			   -ECONNREFUSED);
		ASSERT_LT(ferry_transport_connect(sock, 1000, NULL), 0);
		ASSERT_ERR(ferry_transport_open_incoming(file, 0, NULL), -ENOENT);
		ASSERT_ERR(ferry_transport_open_incoming(sock, 0, NULL),
			   -ETIMEDOUT);
		ASSERT_NULL(ferry_transport_listen("tcp:127.0.0.1:x", NULL));
		/* And success paths hand back exactly one fd. */
		l = ferry_transport_listen(sock, NULL);
		ASSERT_PTR(l);
		fd = ferry_transport_connect(sock, 1000, NULL);
		ASSERT_GE(fd, 0);
		close(fd);
		fd = ferry_listener_accept(l, 1000, NULL);
		ASSERT_GE(fd, 0);
		close(fd);
		ferry_listener_close(l);
	}
	ASSERT_EQ(count_fds(), before);
}
