/*
 * lib/transport.c - tcp:/unix:/fd:/file: URIs turned into file descriptors.
 *
 * Design notes (the why):
 *
 *  - Everything ends as a plain blocking fd. The channel layer does its own
 *    buffering and loops on short transfers, so the transport only has to
 *    produce a connected descriptor and then get out of the way.
 *
 *  - connect() is done non-blocking followed by poll(): a blocking connect to
 *    a black-holed address can hang for minutes (the kernel's SYN retries),
 *    and a migration must fail in bounded time. One deadline covers every
 *    getaddrinfo() result, which are all tried in order (a name may resolve
 *    to ::1 first while the peer listens on 127.0.0.1 only). Once connected
 *    the socket goes back to blocking mode, which is what the channel expects.
 *
 *  - fd:N is dup()ed (F_DUPFD_CLOEXEC): the caller keeps N and the returned
 *    fd is ours to close (or to hand to a channel with own_fd), so closing it
 *    never pulls the descriptor out from under whoever passed N in, and one
 *    fd:N URI can be opened more than once.
 *
 *  - CLOEXEC everywhere (SOCK_CLOEXEC, accept4, O_CLOEXEC): a VMM forks
 *    helpers, and a leaked migration socket in a child keeps the connection
 *    open after we close it, so the peer never sees EOF.
 *
 *  - TCP_NODELAY: the stream is a mix of bulk pages and small control
 *    records; Nagle would add latency exactly to the small ones. Buffer
 *    sizes are left to the kernel's autotuning.
 *
 *  - The listening socket is non-blocking and accept waits in poll(): that
 *    gives the timeout, and a connection that is reset between poll() and
 *    accept() cannot block us (we just wait again).
 *
 *  - A unix: listener's socket is mode 0600 (owner only).
 *
 *  - A unix: listener unlinks a stale socket at PATH before bind (only a
 *    socket: a regular file there is reported, not deleted), and on close
 *    removes PATH only if it is still the socket it created, so closing an
 *    old listener never deletes a newer listener's path.
 *
 *  - No global state: every function works only on its arguments.
 */
#include "ferry/transport.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* Room for a burst: a flood of strangers must not push a real source's
 * SYN out of the queue (its retry would cost a second). */
#define LISTEN_BACKLOG 128
#define URI_MAX 4400 /* "unix:" + path[4096], or "tcp:[host]:port" */

struct ferry_listener {
	int fd;
	enum ferry_uri_kind kind;
	char uri[URI_MAX];      /* what clients should connect to */
	char path[4096];        /* unix: the socket path to unlink */
	dev_t dev;              /* unix: identity of the socket we bound */
	ino_t ino;
	bool have_ino;
};

/* ---- helpers ------------------------------------------------------------ */

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Deadline for @timeout_ms (< 0: none, represented as -1). */
static int64_t deadline_of(int timeout_ms)
{
	return timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
}

/* Milliseconds left until @deadline for poll(): -1 forever, 0 if passed. */
static int remaining_ms(int64_t deadline)
{
	int64_t left;

	if (deadline < 0)
		return -1;
	left = deadline - now_ms();
	if (left <= 0)
		return 0;
	return left > INT_MAX ? INT_MAX : (int)left;
}

static int set_nonblock(int fd, bool on)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0)
		return -errno;
	fl = on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
	if (fcntl(fd, F_SETFL, fl) < 0)
		return -errno;
	return 0;
}

static void close_keep_errno(int fd)
{
	int saved = errno;

	close(fd);
	errno = saved;
}

/* Map a getaddrinfo() failure to a negative errno. */
static int gai_to_errno(int rc)
{
	switch (rc) {
	case EAI_SYSTEM:
		return errno ? -errno : -EIO;
	case EAI_MEMORY:
		return -ENOMEM;
	case EAI_AGAIN:
		return -EAGAIN;
	case EAI_FAMILY:
		return -EAFNOSUPPORT;
	case EAI_SERVICE:
	case EAI_BADFLAGS:
		return -EINVAL;
	default: /* EAI_NONAME, EAI_NODATA, EAI_ADDRFAMILY, EAI_FAIL */
		return -EHOSTUNREACH;
	}
}

static bool all_digits(const char *s)
{
	if (!*s)
		return false;
	for (; *s; s++)
		if (*s < '0' || *s > '9')
			return false;
	return true;
}

/* "host:port" with host possibly bracketed; @u->host/port filled. */
static int parse_hostport(const char *uri, const char *s, struct ferry_uri *u,
			  struct ferry_error *err)
{
	const char *host, *colon;
	size_t hlen;
	unsigned long port;

	if (*s == '[') {
		const char *rb = strchr(s, ']');

		if (!rb)
			return ferry_error_set(err, -EINVAL,
					       "%s: missing ']' after IPv6 address",
					       uri);
		host = s + 1;
		hlen = (size_t)(rb - host);
		if (hlen == 0)
			return ferry_error_set(err, -EINVAL,
					       "%s: empty IPv6 address in []", uri);
		if (memchr(host, '[', hlen))
			return ferry_error_set(err, -EINVAL,
					       "%s: malformed IPv6 brackets", uri);
		if (rb[1] != ':')
			return ferry_error_set(err, -EINVAL,
					       "%s: expected ':PORT' after ']'", uri);
		colon = rb + 1;
	} else {
		colon = strrchr(s, ':');
		if (!colon)
			return ferry_error_set(err, -EINVAL,
					       "%s: missing port (expected tcp:HOST:PORT)",
					       uri);
		host = s;
		hlen = (size_t)(colon - host);
		if (memchr(host, ':', hlen))
			return ferry_error_set(err, -EINVAL,
					       "%s: IPv6 address must be written in "
					       "brackets: tcp:[ADDR]:PORT", uri);
		if (memchr(host, '[', hlen) || memchr(host, ']', hlen))
			return ferry_error_set(err, -EINVAL,
					       "%s: malformed IPv6 brackets", uri);
	}
	if (hlen >= sizeof(u->host))
		return ferry_error_set(err, -EINVAL, "%s: host name too long", uri);
	for (size_t i = 0; i < hlen; i++)
		if ((unsigned char)host[i] <= ' ' || host[i] == 0x7f)
			return ferry_error_set(err, -EINVAL,
					       "%s: bad character in host", uri);

	if (!colon[1])
		return ferry_error_set(err, -EINVAL, "%s: missing port", uri);
	if (!all_digits(colon + 1))
		return ferry_error_set(err, -EINVAL,
				       "%s: port '%s' is not a number", uri,
				       colon + 1);
	if (strlen(colon + 1) > 5 ||
	    (port = strtoul(colon + 1, NULL, 10)) > 65535)
		return ferry_error_set(err, -EINVAL,
				       "%s: port '%s' out of range (0-65535)", uri,
				       colon + 1);

	memcpy(u->host, host, hlen);
	u->host[hlen] = '\0';
	/* Canonical decimal, so "tcp:h:007" and "tcp:h:7" behave the same. */
	snprintf(u->port, sizeof(u->port), "%lu", port);
	return 0;
}

/* ---- URI parsing -------------------------------------------------------- */

int ferry_uri_parse(const char *uri, struct ferry_uri *out,
		    struct ferry_error *err)
{
	const char *rest;

	if (!uri || !out)
		return ferry_error_set(err, -EINVAL, "no URI given");
	memset(out, 0, sizeof(*out));
	out->fd = -1;

	if (!strncmp(uri, "tcp:", 4)) {
		out->kind = FERRY_URI_TCP;
		return parse_hostport(uri, uri + 4, out, err);
	}
	if (!strncmp(uri, "unix:", 5)) {
		struct sockaddr_un sa;

		rest = uri + 5;
		out->kind = FERRY_URI_UNIX;
		if (!*rest)
			return ferry_error_set(err, -EINVAL,
					       "%s: empty socket path", uri);
		/* sun_path must hold the path and its NUL. */
		if (strlen(rest) >= sizeof(sa.sun_path))
			return ferry_error_set(err, -ENAMETOOLONG,
					       "%s: socket path longer than %zu bytes",
					       uri, sizeof(sa.sun_path) - 1);
		strcpy(out->path, rest);
		return 0;
	}
	if (!strncmp(uri, "file:", 5)) {
		rest = uri + 5;
		out->kind = FERRY_URI_FILE;
		if (!*rest)
			return ferry_error_set(err, -EINVAL, "%s: empty file path",
					       uri);
		if (strlen(rest) >= sizeof(out->path))
			return ferry_error_set(err, -ENAMETOOLONG,
					       "%s: file path too long", uri);
		strcpy(out->path, rest);
		return 0;
	}
	if (!strncmp(uri, "fd:", 3)) {
		unsigned long n;

		rest = uri + 3;
		out->kind = FERRY_URI_FD;
		if (!all_digits(rest))
			return ferry_error_set(err, -EINVAL,
					       "%s: expected fd:N with N a "
					       "non-negative decimal number", uri);
		errno = 0;
		n = strtoul(rest, NULL, 10);
		if (errno || n > INT_MAX)
			return ferry_error_set(err, -EINVAL,
					       "%s: file descriptor out of range",
					       uri);
		if (fcntl((int)n, F_GETFD) < 0)
			return ferry_error_set(err, -EBADF,
					       "%s: file descriptor %lu is not open",
					       uri, n);
		out->fd = (int)n;
		return 0;
	}
	return ferry_error_set(err, -EINVAL,
			       "%s: unknown transport (expected tcp:, unix:, "
			       "fd: or file:)", uri);
}

bool ferry_uri_is_socket(const struct ferry_uri *u)
{
	return u && (u->kind == FERRY_URI_TCP || u->kind == FERRY_URI_UNIX);
}

/* ---- outgoing ----------------------------------------------------------- */

/*
 * Connect @fd (non-blocking) to @sa, waiting until @deadline. Returns 0 or
 * -errno (-ETIMEDOUT when the deadline passes).
 */
static int connect_wait(int fd, const struct sockaddr *sa, socklen_t salen,
			int64_t deadline)
{
	struct pollfd pfd = { .fd = fd, .events = POLLOUT };
	int soerr = 0;
	socklen_t len = sizeof(soerr);

	for (;;) {
		if (connect(fd, sa, salen) == 0)
			return 0;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN && sa->sa_family == AF_UNIX) {
			/* Listener's backlog is full: retry until the deadline. */
			int left = remaining_ms(deadline);

			if (left == 0)
				return -ETIMEDOUT;
			poll(NULL, 0, left < 0 || left > 10 ? 10 : left);
			continue;
		}
		if (errno != EINPROGRESS)
			return -errno;
		break;
	}

	for (;;) {
		int left = remaining_ms(deadline);
		int n;

		if (left == 0 && deadline >= 0) {
			/* One last non-blocking look before giving up. */
			n = poll(&pfd, 1, 0);
			if (n == 0)
				return -ETIMEDOUT;
		} else {
			n = poll(&pfd, 1, left);
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n > 0)
			break;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0)
		return -errno;
	return soerr ? -soerr : 0;
}

static void set_nodelay(int fd)
{
	int one = 1;

	/* Best effort: a failure only costs latency. */
	(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static int connect_tcp(const char *uri, const struct ferry_uri *u,
		       int timeout_ms, struct ferry_error *err)
{
	/* No AI_ADDRCONFIG: it hides loopback-only setups, and an address
	 * family we cannot reach just fails fast and we try the next one. */
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_NUMERICSERV };
	struct addrinfo *res = NULL, *ai;
	int64_t deadline = deadline_of(timeout_ms);
	int rc, fd = -1, last = -EHOSTUNREACH;

	if (!strcmp(u->port, "0"))
		return ferry_error_set(err, -EINVAL,
				       "%s: cannot connect to port 0", uri);
	rc = getaddrinfo(u->host[0] ? u->host : NULL, u->port, &hints, &res);
	if (rc)
		return ferry_error_set(err, gai_to_errno(rc),
				       "%s: cannot resolve '%s': %s", uri,
				       u->host, gai_strerror(rc));

	for (ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family,
			    ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
			    ai->ai_protocol);
		if (fd < 0) {
			last = -errno;
			continue;
		}
		rc = connect_wait(fd, ai->ai_addr, ai->ai_addrlen, deadline);
		if (rc == 0)
			break;
		last = rc;
		close(fd);
		fd = -1;
		if (rc == -ETIMEDOUT)
			break; /* the budget is for the whole call */
	}
	freeaddrinfo(res);
	if (fd < 0) {
		if (last == -ETIMEDOUT)
			return ferry_error_set(err, last,
					       "%s: connect timed out after %d ms",
					       uri, timeout_ms);
		return ferry_error_set(err, last, "%s: connect failed: %s", uri,
				       strerror(-last));
	}
	rc = set_nonblock(fd, false);
	if (rc) {
		close(fd);
		return ferry_error_set(err, rc, "%s: fcntl: %s", uri,
				       strerror(-rc));
	}
	set_nodelay(fd);
	return fd;
}

static int connect_unix(const char *uri, const struct ferry_uri *u,
			int timeout_ms, struct ferry_error *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd, rc;

	strcpy(sa.sun_path, u->path); /* length checked by the parser */
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return ferry_error_set(err, -errno, "%s: socket: %s", uri,
				       strerror(errno));
	rc = connect_wait(fd, (struct sockaddr *)&sa, sizeof(sa),
			  deadline_of(timeout_ms));
	if (!rc)
		rc = set_nonblock(fd, false);
	if (rc) {
		close(fd);
		if (rc == -ETIMEDOUT)
			return ferry_error_set(err, rc,
					       "%s: connect timed out after %d ms",
					       uri, timeout_ms);
		return ferry_error_set(err, rc, "%s: connect failed: %s", uri,
				       strerror(-rc));
	}
	return fd;
}

static int dup_fd(const char *uri, const struct ferry_uri *u,
		  struct ferry_error *err)
{
	int fd = fcntl(u->fd, F_DUPFD_CLOEXEC, 0);

	if (fd < 0)
		return ferry_error_set(err, -errno, "%s: cannot dup fd %d: %s",
				       uri, u->fd, strerror(errno));
	return fd;
}

/* @uri parsed into *@out, which the caller frees (also on failure, when
 * it may be NULL). struct ferry_uri is ~4.4 KiB: kept off small thread
 * stacks. */
static int uri_parse_heap(const char *uri, struct ferry_uri **out,
			  struct ferry_error *err)
{
	*out = malloc(sizeof(**out));
	if (!*out)
		return ferry_error_set(err, -ENOMEM, "%s: out of memory",
				       uri ? uri : "(null)");
	return ferry_uri_parse(uri, *out, err);
}

int ferry_transport_connect(const char *uri, int timeout_ms,
			    struct ferry_error *err)
{
	struct ferry_uri *u;
	int rc = uri_parse_heap(uri, &u, err);

	if (rc)
		goto out;
	switch (u->kind) {
	case FERRY_URI_TCP:
		rc = connect_tcp(uri, u, timeout_ms, err);
		break;
	case FERRY_URI_UNIX:
		rc = connect_unix(uri, u, timeout_ms, err);
		break;
	case FERRY_URI_FD:
		rc = dup_fd(uri, u, err);
		break;
	case FERRY_URI_FILE:
		rc = open(u->path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
			  0600);
		if (rc < 0)
			rc = ferry_error_set(err, -errno, "%s: cannot create: %s",
					     uri, strerror(errno));
		break;
	default:
		rc = ferry_error_set(err, -EINVAL, "%s: bad URI kind", uri);
		break;
	}
out:
	free(u);
	return rc;
}

/* ---- incoming ----------------------------------------------------------- */

static int listen_tcp(struct ferry_listener *l, const char *uri,
		      const struct ferry_uri *u, struct ferry_error *err)
{
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
	struct addrinfo *res = NULL, *ai;
	struct sockaddr_storage ss;
	socklen_t sslen = sizeof(ss);
	char host[NI_MAXHOST], port[NI_MAXSERV];
	int rc, fd = -1, last = -EADDRNOTAVAIL, one = 1;
	const char *what = "bind";

	rc = getaddrinfo(u->host[0] ? u->host : NULL, u->port, &hints, &res);
	if (rc)
		return ferry_error_set(err, gai_to_errno(rc),
				       "%s: cannot resolve '%s': %s", uri,
				       u->host, gai_strerror(rc));
	/* First address that binds wins (with port 0, binding several would
	 * give several different ports, and the URI can name only one). */
	for (ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family,
			    ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
			    ai->ai_protocol);
		if (fd < 0) {
			last = -errno;
			what = "socket";
			continue;
		}
		if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one,
			       sizeof(one)) < 0) {
			last = -errno;
			what = "setsockopt(SO_REUSEADDR)";
		} else if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
			last = -errno;
			what = "bind";
		} else if (listen(fd, LISTEN_BACKLOG) < 0) {
			last = -errno;
			what = "listen";
		} else {
			break;
		}
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0)
		return ferry_error_set(err, last, "%s: %s: %s", uri, what,
				       strerror(-last));

	if (getsockname(fd, (struct sockaddr *)&ss, &sslen) < 0 ||
	    getnameinfo((struct sockaddr *)&ss, sslen, host, sizeof(host), port,
			sizeof(port), NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
		rc = errno ? -errno : -EIO;
		close(fd);
		return ferry_error_set(err, rc, "%s: cannot read bound address",
				       uri);
	}
	/* Keep the caller's host name (it is what they gave peers); use the
	 * bound numeric address only when none was given. */
	{
		const char *h = u->host[0] ? u->host : host;
		bool v6 = strchr(h, ':') != NULL;

		snprintf(l->uri, sizeof(l->uri), "tcp:%s%s%s:%s", v6 ? "[" : "",
			 h, v6 ? "]" : "", port);
	}
	l->fd = fd;
	return 0;
}

static int listen_unix(struct ferry_listener *l, const char *uri,
		       const struct ferry_uri *u, struct ferry_error *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int fd, rc;

	strcpy(sa.sun_path, u->path); /* length checked by the parser */
	if (lstat(u->path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode))
			return ferry_error_set(err, -EEXIST,
					       "%s: path exists and is not a socket",
					       uri);
		if (unlink(u->path) < 0 && errno != ENOENT)
			return ferry_error_set(err, -errno,
					       "%s: cannot remove stale socket: %s",
					       uri, strerror(errno));
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return ferry_error_set(err, -errno, "%s: socket: %s", uri,
				       strerror(errno));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		rc = -errno;
		close(fd);
		return ferry_error_set(err, rc, "%s: bind: %s", uri,
				       strerror(-rc));
	}
	/* Owner only: a migration socket takes a VM's memory and a control
	 * socket drives the VM. Before listen(), so nobody connects in
	 * between (a bound socket that does not listen refuses). */
	if (chmod(u->path, 0600) < 0 || listen(fd, LISTEN_BACKLOG) < 0) {
		rc = -errno;
		close(fd);
		unlink(u->path);
		return ferry_error_set(err, rc, "%s: listen: %s", uri,
				       strerror(-rc));
	}
	if (stat(u->path, &st) == 0) {
		l->dev = st.st_dev;
		l->ino = st.st_ino;
		l->have_ino = true;
	}
	strcpy(l->path, u->path);
	snprintf(l->uri, sizeof(l->uri), "unix:%s", u->path);
	l->fd = fd;
	return 0;
}

/* Listen on @uri; 0 and *out set, or -errno with @err filled. */
static int listen_uri(const char *uri, struct ferry_listener **out,
		      struct ferry_error *err)
{
	struct ferry_listener *l;
	struct ferry_uri *u;
	int rc;

	*out = NULL;
	l = calloc(1, sizeof(*l));
	u = malloc(sizeof(*u));
	if (!l || !u) {
		rc = ferry_error_set(err, -ENOMEM, "%s: out of memory",
				     uri ? uri : "(null)");
		goto fail;
	}
	l->fd = -1;
	rc = ferry_uri_parse(uri, u, err);
	if (rc)
		goto fail;
	l->kind = u->kind;
	switch (u->kind) {
	case FERRY_URI_TCP:
		rc = listen_tcp(l, uri, u, err);
		break;
	case FERRY_URI_UNIX:
		rc = listen_unix(l, uri, u, err);
		break;
	default:
		rc = ferry_error_set(err, -EINVAL,
				     "%s: only tcp: and unix: can listen", uri);
		break;
	}
	if (rc)
		goto fail;
	free(u);
	*out = l;
	return 0;
fail:
	free(u);
	free(l);
	return rc;
}

struct ferry_listener *ferry_transport_listen(const char *uri,
					      struct ferry_error *err)
{
	struct ferry_listener *l;

	return listen_uri(uri, &l, err) ? NULL : l;
}

int ferry_listener_accept(struct ferry_listener *l, int timeout_ms,
			  struct ferry_error *err)
{
	int64_t deadline = deadline_of(timeout_ms);
	struct pollfd pfd;
	int fd, n;

	if (!l || l->fd < 0)
		return ferry_error_set(err, -EINVAL, "accept on a closed listener");
	pfd.fd = l->fd;
	pfd.events = POLLIN;
	for (;;) {
		pfd.revents = 0;
		n = poll(&pfd, 1, remaining_ms(deadline));
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return ferry_error_set(err, -errno, "%s: poll: %s", l->uri,
					       strerror(errno));
		}
		if (n == 0) {
			if (remaining_ms(deadline) != 0)
				continue; /* woke early; wait the rest */
			return ferry_error_set(err, -ETIMEDOUT,
					       "%s: no connection within %d ms",
					       l->uri, timeout_ms);
		}
		/* Accepted sockets do not inherit O_NONBLOCK on Linux. */
		fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd >= 0)
			break;
		switch (errno) {
		case EINTR:
		case EAGAIN:
#if EWOULDBLOCK != EAGAIN
		case EWOULDBLOCK:
#endif
		case ECONNABORTED:
		case EPROTO:
			/* The pending connection went away: wait again. */
			continue;
		default:
			return ferry_error_set(err, -errno, "%s: accept: %s",
					       l->uri, strerror(errno));
		}
	}
	if (l->kind == FERRY_URI_TCP)
		set_nodelay(fd);
	return fd;
}

const char *ferry_listener_uri(const struct ferry_listener *l)
{
	return l ? l->uri : NULL;
}

int ferry_listener_fd(const struct ferry_listener *l)
{
	return l ? l->fd : -1;
}

void ferry_listener_close(struct ferry_listener *l)
{
	struct stat st;

	if (!l)
		return;
	if (l->fd >= 0)
		close_keep_errno(l->fd);
	/* Remove the path only if it is still our socket. */
	if (l->kind == FERRY_URI_UNIX && l->path[0] && l->have_ino &&
	    lstat(l->path, &st) == 0 && S_ISSOCK(st.st_mode) &&
	    st.st_dev == l->dev && st.st_ino == l->ino)
		unlink(l->path);
	free(l);
}

int ferry_transport_open_incoming(const char *uri, int timeout_ms,
				  struct ferry_error *err)
{
	struct ferry_listener *l;
	struct ferry_uri *u;
	int rc = uri_parse_heap(uri, &u, err);

	if (rc)
		goto out;
	switch (u->kind) {
	case FERRY_URI_FILE:
		rc = open(u->path, O_RDONLY | O_CLOEXEC);
		if (rc < 0)
			rc = ferry_error_set(err, -errno, "%s: cannot open: %s",
					     uri, strerror(errno));
		break;
	case FERRY_URI_FD:
		rc = dup_fd(uri, u, err);
		break;
	default:
		rc = listen_uri(uri, &l, err);
		if (rc)
			break;
		rc = ferry_listener_accept(l, timeout_ms, err);
		ferry_listener_close(l);
		break;
	}
out:
	free(u);
	return rc;
}
