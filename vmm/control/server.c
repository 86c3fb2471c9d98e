/*
 * vmm/control/server.c - the QMP-style control server. The protocol and the
 * threading rules are described in control.h; the client helpers are in
 * client.c.
 *
 * Server design:
 *
 *   - One thread runs a poll() loop over: a wake-up pipe, the listening
 *     socket and every connection. All sockets are non-blocking, so a client
 *     that stops reading (or sends half a request and stalls) never holds up
 *     the others.
 *
 *   - Output is queued, never written from the caller's thread: replies are
 *     queued by the server thread, events by whichever thread calls
 *     control_event(). The queue of each client is protected by c->lock and
 *     drained by the server thread when poll() says the socket is writable.
 *     The pipe wakes the server when another thread queued something.
 *
 *   - Input framing is done here, not by the JSON parser: a small scanner
 *     tracks {}/[] depth, strings and escapes to find where one top-level
 *     value ends, and only then is that slice handed to json_loadb(). Asking
 *     jansson whether a buffer holds a complete value cannot tell "cut in the
 *     middle of a literal" (`tru`) from "malformed", and would re-parse the
 *     whole buffer on every read. The scanner keeps its state across reads,
 *     so a request trickling in one byte at a time costs O(length).
 *
 *   - Recovery after garbage: skip to the next '{' or past the next newline,
 *     whichever comes first. A line-per-request client so gets exactly one
 *     error per bad line, and a concatenated stream resumes at the next
 *     object.
 */
#include "control/control.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ferry/transport.h"

#define READ_CHUNK 65536

struct command {
	char *name;
	control_handler_fn fn;
	void *opaque;
};

/* Where the input scanner is inside the value that starts the buffer. */
struct scanner {
	size_t pos;     /* bytes of the current value scanned so far */
	size_t depth;   /* open { and [ */
	bool in_str;
	bool esc;       /* previous byte was a backslash inside a string */
};

struct client {
	int fd;

	/* Input: touched by the server thread only. */
	char *in;
	size_t in_len, in_cap;
	struct scanner scan;
	bool resync;    /* skipping garbage up to the next '{' or newline */
	bool closing;   /* no more input: close once the output is drained */
	bool drop;      /* close now (I/O error, peer gone) */

	/* Output: under control.lock (events are queued from any thread). */
	char *out;
	size_t out_off, out_len, out_cap;
	bool overflow;  /* output limit hit: close without flushing */
};

struct control {
	struct ferry_listener *listener;
	int wake[2];            /* pipe: [0] polled by the server, [1] written */

	/* Written before control_start() only, then read-only. */
	struct command *cmds;
	size_t ncmds, cmds_cap;
	bool started;
	pthread_t thread;

	/*
	 * lock protects: the clients array (the server thread is the only one
	 * that adds or removes entries, other threads only walk it), every
	 * client's output queue, and stopping.
	 */
	pthread_mutex_t lock;
	struct client **clients;
	size_t nclients, clients_cap;
	bool stopping;
};

static void lock(struct control *c)
{
	if (pthread_mutex_lock(&c->lock))
		abort(); /* broken invariant, see common.h */
}

static void unlock(struct control *c)
{
	if (pthread_mutex_unlock(&c->lock))
		abort();
}

/* Nudge the server thread out of poll(). A full pipe already means a
 * wake-up is pending, so a failed write needs no handling. */
static void wake(struct control *c)
{
	ssize_t n = write(c->wake[1], "", 1);

	(void)n;
}

/* ---- output queue ---------------------------------------------------- */

/* Append @len bytes and a newline to @cl's queue. Caller holds c->lock. */
static void queue_locked(struct client *cl, const char *s, size_t len)
{
	size_t pending = cl->out_len - cl->out_off;
	size_t need = pending + len + 1;

	if (cl->overflow)
		return;
	if (need > CONTROL_MAX_OUTPUT) {
		/* The client is not reading: cutting a message in half would
		 * corrupt the stream, so stop talking to it altogether. */
		cl->overflow = true;
		return;
	}
	if (cl->out_off && cl->out_len + len + 1 > cl->out_cap) {
		memmove(cl->out, cl->out + cl->out_off, pending);
		cl->out_off = 0;
		cl->out_len = pending;
	}
	if (cl->out_len + len + 1 > cl->out_cap) {
		size_t cap = cl->out_cap ? cl->out_cap : 4096;
		char *p;

		while (cap < cl->out_len + len + 1)
			cap *= 2;
		p = realloc(cl->out, cap);
		if (!p) {
			cl->overflow = true;
			return;
		}
		cl->out = p;
		cl->out_cap = cap;
	}
	memcpy(cl->out + cl->out_len, s, len);
	cl->out[cl->out_len + len] = '\n';
	cl->out_len += len + 1;
}

/* Serialise @msg (consumed) and queue it for one client. */
static void send_msg(struct control *c, struct client *cl, json_t *msg)
{
	char *s = json_dumps(msg, JSON_COMPACT);

	json_decref(msg);
	if (!s) {
		/* Only a value jansson cannot encode gets here (a handler
		 * returned something odd): say so instead of going silent. */
		s = strdup("{\"error\": {\"class\": \"GenericError\", "
			   "\"desc\": \"reply could not be encoded\"}}");
		if (!s)
			return;
	}
	lock(c);
	queue_locked(cl, s, strlen(s));
	unlock(c);
	free(s);
}

static void send_error(struct control *c, struct client *cl, json_t *id,
		       const char *cls, const char *fmt, ...) FERRY_PRINTF(5, 6);

/* Queue {"error": {...}, "id": @id}; @id is borrowed (may be NULL). */
static void send_error(struct control *c, struct client *cl, json_t *id,
		       const char *cls, const char *fmt, ...)
{
	char desc[FERRY_ERROR_MSG_MAX + 64];
	json_t *msg;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(desc, sizeof(desc), fmt, ap);
	va_end(ap);
	msg = json_pack("{s:{s:s,s:s}}", "error", "class", cls, "desc", desc);
	if (msg && id)
		json_object_set(msg, "id", id);
	if (msg)
		send_msg(c, cl, msg);
}

/* Write as much queued output as the socket takes. Server thread only. */
static void flush_client(struct control *c, struct client *cl)
{
	lock(c);
	while (!cl->overflow && cl->out_off < cl->out_len) {
		/* Non-blocking send: holding the lock here is brief. */
		ssize_t n = send(cl->fd, cl->out + cl->out_off,
				 cl->out_len - cl->out_off,
				 MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				cl->drop = true;
			break;
		}
		cl->out_off += (size_t)n;
	}
	if (cl->out_off == cl->out_len)
		cl->out_off = cl->out_len = 0;
	unlock(c);
}

/* ---- requests ---------------------------------------------------------- */

static const struct command *find_command(const struct control *c,
					  const char *name)
{
	for (size_t i = 0; i < c->ncmds; i++)
		if (!strcmp(c->cmds[i].name, name))
			return &c->cmds[i];
	return NULL;
}

/* The mapping documented in control.h. */
static const char *error_class(int rc)
{
	switch (rc) {
	case -ENOSYS:
	case -EOPNOTSUPP:
		return "CommandNotFound";
	case -ENODEV:
	case -ENOENT:
		return "DeviceNotFound";
	default:
		return "GenericError";
	}
}

/* Validate and run one parsed request (@req is borrowed). */
static void run_request(struct control *c, struct client *cl, json_t *req)
{
	struct ferry_error err = { 0 };
	const struct command *cmd;
	json_t *id, *exec, *args, *ret = NULL, *msg;
	const char *key, *name;
	json_t *val;
	int rc;

	if (!json_is_object(req)) {
		send_error(c, cl, NULL, "GenericError",
			   "request must be a JSON object");
		return;
	}
	id = json_object_get(req, "id");
	json_object_foreach(req, key, val) {
		if (strcmp(key, "execute") && strcmp(key, "arguments") &&
		    strcmp(key, "id")) {
			send_error(c, cl, id, "GenericError",
				   "request member '%s' is unexpected", key);
			return;
		}
	}
	exec = json_object_get(req, "execute");
	if (!exec) {
		send_error(c, cl, id, "GenericError",
			   "request has no 'execute' member");
		return;
	}
	if (!json_is_string(exec)) {
		send_error(c, cl, id, "GenericError",
			   "'execute' must be a string");
		return;
	}
	name = json_string_value(exec);
	args = json_object_get(req, "arguments");
	if (args && !json_is_object(args)) {
		send_error(c, cl, id, "GenericError",
			   "'arguments' must be a JSON object");
		return;
	}
	cmd = find_command(c, name);
	if (!cmd) {
		send_error(c, cl, id, "CommandNotFound",
			   "the command '%s' has not been found", name);
		return;
	}

	/* Handlers always see an object, so they need no NULL checks. */
	args = args ? json_incref(args) : json_object();
	if (!args) {
		send_error(c, cl, id, "GenericError", "out of memory");
		return;
	}
	rc = cmd->fn(cmd->opaque, args, &ret, &err);
	json_decref(args);
	if (rc < 0) {
		json_decref(ret);
		send_error(c, cl, id, error_class(rc), "%s",
			   err.msg[0] ? err.msg : strerror(-rc));
		return;
	}
	if (!ret)
		ret = json_object();
	msg = json_object();
	if (!msg || !ret || json_object_set_new(msg, "return", ret)) {
		json_decref(msg);
		send_error(c, cl, id, "GenericError", "out of memory");
		return;
	}
	if (id)
		json_object_set(msg, "id", id);
	send_msg(c, cl, msg);
}

/* Parse the complete value in @buf[0, @len) and run it. */
static void handle_value(struct control *c, struct client *cl, const char *buf,
			 size_t len)
{
	json_error_t je;
	json_t *req;

	/* The scanner already found the end, so EOF checking would only
	 * complain about nothing; JSON_DISABLE_EOF_CHECK keeps it tolerant. */
	req = json_loadb(buf, len, JSON_DISABLE_EOF_CHECK, &je);
	if (!req) {
		send_error(c, cl, NULL, "GenericError", "JSON parse error: %s",
			   je.text);
		cl->resync = true;
		return;
	}
	run_request(c, cl, req);
	json_decref(req);
}

/*
 * Advance @s over @p[s->pos, @len), where @p starts with '{' or '['.
 * Returns true when the value ends (its length is then s->pos). A raw control
 * character inside a string also ends it: the value is malformed anyway, and
 * ending there lets the parser report it at once rather than waiting for a
 * closing quote that a line-based client will never send.
 */
static bool scan_value(struct scanner *s, const char *p, size_t len)
{
	while (s->pos < len) {
		unsigned char ch = (unsigned char)p[s->pos++];

		if (s->in_str) {
			if (s->esc)
				s->esc = false;
			else if (ch == '\\')
				s->esc = true;
			else if (ch == '"')
				s->in_str = false;
			else if (ch < 0x20)
				return true;
			continue;
		}
		switch (ch) {
		case '"':
			s->in_str = true;
			break;
		case '{':
		case '[':
			s->depth++;
			break;
		case '}':
		case ']':
			if (--s->depth == 0)
				return true;
			break;
		}
	}
	return false;
}

static bool is_space(char ch)
{
	return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
}

/* Run every complete request in @cl's input buffer; keep the incomplete
 * tail for the next read. */
static void process_input(struct control *c, struct client *cl)
{
	size_t off = 0;

	while (off < cl->in_len && !cl->closing) {
		const char *p = cl->in + off;
		size_t left = cl->in_len - off;

		if (cl->resync) {
			size_t i = 0;

			while (i < left && p[i] != '{' && p[i] != '\n')
				i++;
			if (i < left) {
				cl->resync = false;
				if (p[i] == '\n')
					i++;
			}
			off += i;
			continue;
		}
		if (cl->scan.pos == 0) {
			if (is_space(p[0])) {
				off++;
				continue;
			}
			if (p[0] != '{' && p[0] != '[') {
				send_error(c, cl, NULL, "GenericError",
					   "expected a JSON object, got '%c'",
					   p[0] >= 0x20 && p[0] < 0x7f ? p[0] : '?');
				cl->resync = true;
				off++;
				continue;
			}
		}
		if (!scan_value(&cl->scan, p, left))
			break; /* incomplete: wait for more */
		off += cl->scan.pos;
		handle_value(c, cl, p, cl->scan.pos);
		memset(&cl->scan, 0, sizeof(cl->scan));
	}

	if (off) {
		memmove(cl->in, cl->in + off, cl->in_len - off);
		cl->in_len -= off;
	}
	if (cl->in_len > CONTROL_MAX_REQUEST && !cl->closing) {
		/* No way to find the end of this request without buffering
		 * without bound: report and hang up. */
		send_error(c, cl, NULL, "GenericError",
			   "request exceeds %u bytes; closing the connection",
			   CONTROL_MAX_REQUEST);
		cl->closing = true;
	}
	if (cl->closing)
		cl->in_len = 0;
	if (!cl->in_len && cl->in_cap > 4 * READ_CHUNK) {
		/* Do not keep a 1 MiB buffer for one big request forever. */
		free(cl->in);
		cl->in = NULL;
		cl->in_cap = 0;
	}
}

/* Read what the socket has and process it. Server thread only. */
static void read_client(struct control *c, struct client *cl)
{
	ssize_t n;

	if (cl->in_cap - cl->in_len < READ_CHUNK) {
		size_t cap = cl->in_len + READ_CHUNK;
		char *p = realloc(cl->in, cap);

		if (!p) {
			cl->drop = true;
			return;
		}
		cl->in = p;
		cl->in_cap = cap;
	}
	do
		n = recv(cl->fd, cl->in + cl->in_len, READ_CHUNK, MSG_DONTWAIT);
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			cl->drop = true;
		return;
	}
	if (n == 0) {
		/* End of input (maybe only a half-close): everything complete
		 * was answered already; say so if a request was cut short,
		 * then close once the replies are out. */
		if (cl->scan.pos && !cl->closing)
			send_error(c, cl, NULL, "GenericError",
				   "end of input inside a request");
		cl->closing = true;
		cl->in_len = 0;
		return;
	}
	cl->in_len += (size_t)n;
	process_input(c, cl);
}

/* ---- connections ------------------------------------------------------- */

static void free_client(struct client *cl)
{
	if (cl->fd >= 0)
		close(cl->fd);
	free(cl->in);
	free(cl->out);
	free(cl);
}

static json_t *greeting(void)
{
	return json_pack("{s:{s:{s:s},s:[]}}", "QMP", "version", "ferry",
			 FERRY_VERSION_STRING, "capabilities");
}

static void accept_clients(struct control *c)
{
	for (;;) {
		int fd = accept4(ferry_listener_fd(c->listener), NULL, NULL,
				 SOCK_NONBLOCK | SOCK_CLOEXEC);
		struct client *cl;
		bool full;

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			return; /* EAGAIN, or a transient EMFILE: poll again */
		}
		lock(c);
		full = c->nclients >= CONTROL_MAX_CLIENTS;
		unlock(c);
		cl = full ? NULL : calloc(1, sizeof(*cl));
		if (!cl) {
			static const char msg[] =
				"{\"error\": {\"class\": \"GenericError\", "
				"\"desc\": \"too many control connections\"}}\n";
			ssize_t n = send(fd, msg, sizeof(msg) - 1,
					 MSG_NOSIGNAL | MSG_DONTWAIT);

			(void)n;
			close(fd);
			continue;
		}
		cl->fd = fd;
		/* The greeting goes first in the queue, before the client is
		 * visible to control_event(), so no event can precede it. */
		send_msg(c, cl, greeting());
		lock(c);
		if (c->nclients == c->clients_cap) {
			size_t cap = c->clients_cap ? c->clients_cap * 2 : 8;
			struct client **p = realloc(c->clients,
						    cap * sizeof(*p));

			if (!p) {
				unlock(c);
				free_client(cl);
				continue;
			}
			c->clients = p;
			c->clients_cap = cap;
		}
		c->clients[c->nclients++] = cl;
		unlock(c);
	}
}

/* Remove clients that are done. Server thread only. */
static void reap_clients(struct control *c)
{
	size_t i = 0;

	lock(c);
	while (i < c->nclients) {
		struct client *cl = c->clients[i];
		bool done = cl->drop || cl->overflow ||
			    (cl->closing && cl->out_off == cl->out_len);

		if (!done) {
			i++;
			continue;
		}
		c->clients[i] = c->clients[--c->nclients];
		free_client(cl); /* unreachable from other threads now */
	}
	unlock(c);
}

static void *server_thread(void *arg)
{
	struct control *c = arg;
	struct pollfd *pfds = NULL;
	size_t pcap = 0;

	for (;;) {
		size_t n, i;
		char drain[256];

		lock(c);
		if (c->stopping) {
			unlock(c);
			break;
		}
		n = c->nclients;
		if (n + 2 > pcap) {
			struct pollfd *p = realloc(pfds, (n + 2) * sizeof(*p));

			if (!p) {
				/* Try again shortly rather than spin or die. */
				unlock(c);
				poll(NULL, 0, 10);
				continue;
			}
			pfds = p;
			pcap = n + 2;
		}
		pfds[0] = (struct pollfd){ .fd = c->wake[0], .events = POLLIN };
		pfds[1] = (struct pollfd){ .fd = ferry_listener_fd(c->listener),
					   .events = POLLIN };
		for (i = 0; i < n; i++) {
			struct client *cl = c->clients[i];
			short ev = cl->closing ? 0 : POLLIN;

			/* No read backpressure keyed on queued output: events
			 * share the queue, so a busy event stream would starve
			 * requests. A client that does not read at all hits
			 * CONTROL_MAX_OUTPUT and is dropped instead. */
			if (cl->out_len > cl->out_off)
				ev |= POLLOUT;
			pfds[i + 2] = (struct pollfd){ .fd = cl->fd, .events = ev };
		}
		unlock(c);

		if (poll(pfds, n + 2, -1) < 0) {
			/* EINTR, or ENOMEM: nothing to do but try again. */
			if (errno != EINTR)
				poll(NULL, 0, 10);
			continue;
		}
		if (pfds[0].revents)
			while (read(c->wake[0], drain, sizeof(drain)) > 0)
				;
		/* Only this thread adds or removes clients, so clients[i]
		 * still matches pfds[i + 2]. */
		for (i = 0; i < n; i++) {
			struct client *cl = c->clients[i];
			short re = pfds[i + 2].revents;

			if (re & (POLLIN | POLLHUP | POLLERR))
				read_client(c, cl);
			/* Write right away rather than wait a poll round:
			 * replies to what was just read are usually ready. */
			if (!cl->drop)
				flush_client(c, cl);
		}
		reap_clients(c);
		if (pfds[1].revents & POLLIN)
			accept_clients(c);
	}
	free(pfds);
	return NULL;
}

/* ---- built-in commands --------------------------------------------------- */

static int cmd_qmp_capabilities(void *opaque, json_t *args, json_t **ret,
				struct ferry_error *err)
{
	/* No capabilities to negotiate: accept anything QMP clients send. */
	(void)opaque;
	(void)args;
	(void)ret;
	(void)err;
	return 0;
}

static int cmd_query_commands(void *opaque, json_t *args, json_t **ret,
			      struct ferry_error *err)
{
	struct control *c = opaque;
	json_t *list = json_array();

	(void)args;
	if (!list)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	for (size_t i = 0; i < c->ncmds; i++)
		if (json_array_append_new(list, json_pack("{s:s}", "name",
							  c->cmds[i].name))) {
			json_decref(list);
			return ferry_error_set(err, -ENOMEM, "out of memory");
		}
	*ret = list;
	return 0;
}

/* ---- without sockets, for tests and fuzzing ------------------------------------ */

char *control_feed(struct control *c, const void *input, size_t len,
		   size_t chunk, size_t *outlen)
{
	struct client *cl = calloc(1, sizeof(*cl));
	const char *in = input;
	size_t off = 0;
	char *out = NULL;

	*outlen = 0;
	if (!c || c->started || !cl) {
		free(cl);
		return NULL;
	}
	cl->fd = -1;
	if (!chunk || chunk > READ_CHUNK)
		chunk = READ_CHUNK;
	/* What read_client() does with each piece the socket gives. */
	while (off < len && !cl->closing && !cl->drop && !cl->overflow) {
		size_t n = len - off < chunk ? len - off : chunk;

		if (cl->in_cap - cl->in_len < n) {
			char *p = realloc(cl->in, cl->in_len + n);

			if (!p)
				break;
			cl->in = p;
			cl->in_cap = cl->in_len + n;
		}
		memcpy(cl->in + cl->in_len, in + off, n);
		cl->in_len += n;
		off += n;
		process_input(c, cl);
	}
	/* Then the end of input. */
	if (cl->scan.pos && !cl->closing)
		send_error(c, cl, NULL, "GenericError",
			   "end of input inside a request");
	if (!cl->overflow && cl->out_len > cl->out_off) {
		*outlen = cl->out_len - cl->out_off;
		out = malloc(*outlen);
		if (out)
			memcpy(out, cl->out + cl->out_off, *outlen);
		else
			*outlen = 0;
	}
	free_client(cl);
	return out;
}

/* ---- public server API ----------------------------------------------------- */

struct control *control_create(const char *path, struct ferry_error *err)
{
	struct control *c;
	char *uri;

	if (!path || !*path) {
		ferry_error_set(err, -EINVAL, "control socket path is empty");
		return NULL;
	}
	c = calloc(1, sizeof(*c));
	uri = malloc(strlen(path) + sizeof("unix:"));
	if (!c || !uri) {
		free(c);
		free(uri);
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	c->wake[0] = c->wake[1] = -1;
	if (pthread_mutex_init(&c->lock, NULL)) {
		free(c);
		free(uri);
		ferry_error_set(err, -ENOMEM, "cannot create a mutex");
		return NULL;
	}
	if (pipe2(c->wake, O_NONBLOCK | O_CLOEXEC) < 0) {
		ferry_error_set(err, -errno, "control: pipe: %s",
				strerror(errno));
		goto fail;
	}
	/* The transport replaces a stale socket, refuses to clobber any
	 * other file, and on close unlinks the path only if it is still our
	 * socket. */
	sprintf(uri, "unix:%s", path);
	c->listener = ferry_transport_listen(uri, err);
	if (!c->listener)
		goto fail;
	if (control_register(c, "qmp_capabilities", cmd_qmp_capabilities, c) ||
	    control_register(c, "query-commands", cmd_query_commands, c)) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	free(uri);
	return c;
fail:
	free(uri);
	control_destroy(c);
	return NULL;
}

int control_register(struct control *c, const char *name,
		     control_handler_fn fn, void *opaque)
{
	struct command *cmd;

	if (!c || !name || !*name || !fn)
		return -EINVAL;
	if (c->started)
		return -EBUSY;
	if (find_command(c, name))
		return -EEXIST;
	if (c->ncmds == c->cmds_cap) {
		size_t cap = c->cmds_cap ? c->cmds_cap * 2 : 16;
		struct command *p = realloc(c->cmds, cap * sizeof(*p));

		if (!p)
			return -ENOMEM;
		c->cmds = p;
		c->cmds_cap = cap;
	}
	cmd = &c->cmds[c->ncmds];
	cmd->name = strdup(name);
	if (!cmd->name)
		return -ENOMEM;
	cmd->fn = fn;
	cmd->opaque = opaque;
	c->ncmds++;
	return 0;
}

int control_start(struct control *c, struct ferry_error *err)
{
	sigset_t all, old;
	int rc;

	if (!c)
		return ferry_error_set(err, -EINVAL, "control_start(NULL)");
	if (c->started)
		return ferry_error_set(err, -EBUSY, "control server already started");
	/* The server thread takes no signals: they belong to the VMM's main
	 * thread (SIGINT, SIGCHLD), and poll() there needs no EINTR dance. */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	rc = -pthread_create(&c->thread, NULL, server_thread, c);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc)
		return ferry_error_set(err, rc, "control: cannot start thread: %s",
				       strerror(-rc));
	c->started = true;
	return 0;
}

void control_event(struct control *c, const char *name, json_t *data)
{
	struct timespec ts;
	json_t *msg;
	char *s;

	if (!c || !name) {
		json_decref(data);
		return;
	}
	clock_gettime(CLOCK_REALTIME, &ts);
	msg = json_pack("{s:s,s:o,s:{s:I,s:I}}", "event", name,
			"data", data ? data : json_object(),
			"timestamp", "seconds", (json_int_t)ts.tv_sec,
			"microseconds", (json_int_t)(ts.tv_nsec / 1000));
	/* json_pack's "o" consumed @data, even on failure. */
	if (!msg)
		return;
	s = json_dumps(msg, JSON_COMPACT);
	json_decref(msg);
	if (!s)
		return;
	lock(c);
	for (size_t i = 0; i < c->nclients; i++)
		queue_locked(c->clients[i], s, strlen(s));
	unlock(c);
	free(s);
	wake(c);
}

void control_destroy(struct control *c)
{
	if (!c)
		return;
	if (c->started) {
		lock(c);
		c->stopping = true;
		unlock(c);
		wake(c);
		pthread_join(c->thread, NULL);
	}
	/* Single-threaded from here. Give queued output (a final event, say)
	 * one non-blocking chance to go out before closing. */
	for (size_t i = 0; i < c->nclients; i++) {
		flush_client(c, c->clients[i]);
		free_client(c->clients[i]);
	}
	free(c->clients);
	ferry_listener_close(c->listener);
	for (size_t i = 0; i < c->ncmds; i++)
		free(c->cmds[i].name);
	free(c->cmds);
	if (c->wake[0] >= 0)
		close(c->wake[0]);
	if (c->wake[1] >= 0)
		close(c->wake[1]);
	pthread_mutex_destroy(&c->lock);
	free(c);
}
