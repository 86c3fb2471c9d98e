/*
 * vmm/control/client.c - the client helpers of the QMP-style control socket:
 * control_client_connect() (connect, read the greeting, qmp_capabilities),
 * control_client_call() (send one command and wait for the reply with its
 * id, skipping events and stale replies) and control_client_read() (the
 * next message). Every wait polls against a deadline, so a silent server
 * costs at most the caller's timeout. The protocol is described in
 * control.h; the server is in server.c.
 */
#include "control/control.h"

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ferry/transport.h"

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t now_ms(void)
{
	return now_ns() / 1000000;
}

/* -1 (no deadline) for a negative timeout. */
static int64_t deadline_of(int timeout_ms)
{
	return timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
}

static int remaining(int64_t deadline)
{
	int64_t left;

	if (deadline < 0)
		return -1;
	left = deadline - now_ms();
	return left <= 0 ? 0 : left > 1000000 ? 1000000 : (int)left;
}

/* Wait for @events on @fd until @deadline. 0, -ETIMEDOUT or -errno. */
static int wait_fd(int fd, short events, int64_t deadline)
{
	struct pollfd pfd = { .fd = fd, .events = events };

	for (;;) {
		int left = remaining(deadline);
		int n = poll(&pfd, 1, left);

		if (n > 0)
			return 0;
		if (n < 0 && errno != EINTR)
			return -errno;
		if (n == 0 && left == 0)
			return -ETIMEDOUT;
	}
}

static int client_send(int fd, const char *buf, size_t len, int64_t deadline,
		       struct ferry_error *err)
{
	while (len) {
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
		int rc;

		if (n > 0) {
			buf += n;
			len -= (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
			return ferry_error_set(err, -errno,
					       "control socket: send: %s",
					       strerror(errno));
		rc = wait_fd(fd, POLLOUT, deadline);
		if (rc == -ETIMEDOUT)
			return ferry_error_set(err, rc,
					       "control socket: send timed out");
		if (rc)
			return ferry_error_set(err, rc, "control socket: poll: %s",
					       strerror(-rc));
	}
	return 0;
}

/*
 * Read one '\n'-terminated line into a malloc'd buffer (terminator replaced
 * by NUL). Peeking first and then taking exactly up to the newline leaves
 * the next message in the socket, so the caller needs no buffer between
 * calls and the fd can be shared by every helper here.
 */
static int read_line(int fd, char **line, int64_t deadline,
		     struct ferry_error *err)
{
	char *buf = NULL;
	size_t len = 0, cap = 0;
	int rc;

	for (;;) {
		ssize_t n;
		char *nl;
		size_t take;

		if (cap - len < 4096 + 1) {
			size_t ncap = cap ? cap * 2 : 8192;
			char *p;

			if (ncap > CONTROL_MAX_OUTPUT + 1) {
				rc = ferry_error_set(err, -EMSGSIZE,
						     "control socket: message exceeds %u bytes",
						     CONTROL_MAX_OUTPUT);
				goto fail;
			}
			p = realloc(buf, ncap);
			if (!p) {
				rc = ferry_error_set(err, -ENOMEM, "out of memory");
				goto fail;
			}
			buf = p;
			cap = ncap;
		}
		rc = wait_fd(fd, POLLIN, deadline);
		if (rc == -ETIMEDOUT) {
			ferry_error_set(err, rc,
					"control socket: no reply within the timeout");
			goto fail;
		}
		if (rc) {
			ferry_error_set(err, rc, "control socket: poll: %s",
					strerror(-rc));
			goto fail;
		}
		n = recv(fd, buf + len, cap - len - 1, MSG_PEEK | MSG_DONTWAIT);
		if (n < 0 && (errno == EINTR || errno == EAGAIN ||
			      errno == EWOULDBLOCK))
			continue;
		if (n == 0 || (n < 0 && errno == ECONNRESET)) {
			rc = ferry_error_set(err, -ECONNRESET,
					     "control socket: connection closed by the server");
			goto fail;
		}
		if (n < 0) {
			rc = ferry_error_set(err, -errno,
					     "control socket: recv: %s",
					     strerror(errno));
			goto fail;
		}
		nl = memchr(buf + len, '\n', (size_t)n);
		take = nl ? (size_t)(nl - (buf + len)) + 1 : (size_t)n;
		/* The bytes are queued already and we are the only reader,
		 * so this takes exactly @take without blocking. */
		while (take) {
			n = recv(fd, buf + len, take, MSG_DONTWAIT);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				rc = ferry_error_set(err, -EIO,
						     "control socket: lost peeked data");
				goto fail;
			}
			len += (size_t)n;
			take -= (size_t)n;
		}
		if (nl) {
			buf[len - 1] = 0;
			*line = buf;
			return 0;
		}
	}
fail:
	free(buf);
	return rc;
}

static int read_msg(int fd, json_t **msg, int64_t deadline,
		    struct ferry_error *err)
{
	json_error_t je;
	char *line = NULL;
	json_t *m;
	int rc;

	rc = read_line(fd, &line, deadline, err);
	if (rc)
		return rc;
	m = json_loads(line, 0, &je);
	free(line);
	if (!json_is_object(m)) {
		json_decref(m);
		return ferry_error_set(err, -EBADMSG,
				       "control socket: server sent a malformed message%s%s",
				       m ? "" : ": ", m ? "" : je.text);
	}
	*msg = m;
	return 0;
}

int control_client_read(int fd, json_t **msg, int timeout_ms,
			struct ferry_error *err)
{
	if (fd < 0 || !msg)
		return ferry_error_set(err, -EINVAL, "control_client_read: bad arguments");
	return read_msg(fd, msg, deadline_of(timeout_ms), err);
}

static int call(int fd, const char *cmd, json_t *args, json_t **ret,
		int64_t deadline, struct ferry_error *err)
{
	char id[64];
	json_t *req, *msg = NULL;
	char *s;
	int rc;

	if (fd < 0 || !cmd || (args && !json_is_object(args)))
		return ferry_error_set(err, -EINVAL,
				       "control call: %s", args && !json_is_object(args) ?
				       "arguments must be a JSON object" : "bad arguments");
	/* A unique id lets us skip a stale reply left over from an earlier
	 * call that timed out on this same connection. */
	snprintf(id, sizeof(id), "ferry-%d-%lld", fd, (long long)now_ns());
	req = json_pack("{s:s,s:s}", "execute", cmd, "id", id);
	if (req && args)
		json_object_set(req, "arguments", args);
	s = req ? json_dumps(req, JSON_COMPACT) : NULL;
	json_decref(req);
	if (!s)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	rc = client_send(fd, s, strlen(s), deadline, err);
	if (!rc)
		rc = client_send(fd, "\n", 1, deadline, err);
	free(s);
	if (rc)
		return rc;

	for (;;) {
		json_t *rid, *val, *e;

		rc = read_msg(fd, &msg, deadline, err);
		if (rc)
			return rc;
		rid = json_object_get(msg, "id");
		if (json_object_get(msg, "event") ||
		    (rid && !(json_is_string(rid) &&
			      !strcmp(json_string_value(rid), id)))) {
			json_decref(msg);
			continue; /* an event, or a stale reply */
		}
		if ((val = json_object_get(msg, "return"))) {
			if (ret)
				*ret = json_incref(val);
			json_decref(msg);
			return 0;
		}
		e = json_object_get(msg, "error");
		if (e) {
			const char *cls = json_string_value(json_object_get(e, "class"));
			const char *desc = json_string_value(json_object_get(e, "desc"));

			rc = ferry_error_set(err, -EREMOTEIO, "%s: %s",
					     cls ? cls : "GenericError",
					     desc ? desc : "(no description)");
			json_decref(msg);
			return rc;
		}
		json_decref(msg);
		return ferry_error_set(err, -EBADMSG,
				       "control socket: reply has neither 'return' nor 'error'");
	}
}

int control_client_call(int fd, const char *cmd, json_t *args, json_t **ret,
			int timeout_ms, struct ferry_error *err)
{
	return call(fd, cmd, args, ret, deadline_of(timeout_ms), err);
}

int control_client_connect(const char *path, int timeout_ms,
			   struct ferry_error *err)
{
	int64_t deadline = deadline_of(timeout_ms);
	json_t *msg = NULL;
	char *uri;
	int fd, rc;

	if (!path || !*path)
		return ferry_error_set(err, -EINVAL, "control socket path is empty");
	uri = malloc(strlen(path) + sizeof("unix:"));
	if (!uri)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	sprintf(uri, "unix:%s", path);
	fd = ferry_transport_connect(uri, timeout_ms, err);
	free(uri);
	if (fd < 0)
		return fd;
	rc = read_msg(fd, &msg, deadline, err);
	if (!rc && !json_is_object(json_object_get(msg, "QMP"))) {
		/* A "too many connections" error, or not our protocol. */
		json_t *e = json_object_get(msg, "error");
		const char *desc = json_string_value(json_object_get(e, "desc"));

		rc = ferry_error_set(err, -EPROTO, "%s: %s", path,
				     desc ? desc : "no QMP greeting (not a control socket?)");
	}
	json_decref(msg);
	if (!rc)
		rc = call(fd, "qmp_capabilities", NULL, NULL, deadline, err);
	if (rc) {
		close(fd);
		return rc;
	}
	return fd;
}
