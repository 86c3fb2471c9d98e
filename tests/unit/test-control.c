/*
 * tests/unit/test-control.c - the QMP-style control socket (vmm/control/)
 * and `ferry ctl`, over unix sockets in the test's scratch directory.
 *
 * Each test runs a server thread in the test process. Raw sockets are used
 * where the test is about bytes on the wire (framing, malformed input); the
 * client library everywhere else.
 */
#include "../harness.h"

#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "control/control.h"
#include "../control-cmds.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

#define TMO 5000

/* ---- test commands ---------------------------------------------------- */

/* sleep {"ms": N}: a slow handler, to hold a reply back. */
static int cmd_sleep(void *opaque, json_t *args, json_t **ret,
		     struct ferry_error *err)
{
	json_int_t ms = json_integer_value(json_object_get(args, "ms"));

	(void)opaque;
	(void)ret;
	(void)err;
	poll(NULL, 0, (int)ms);
	return 0;
}

/* emit {"n": N}: N events from inside the handler (before the reply). */
static int cmd_emit(void *opaque, json_t *args, json_t **ret,
		    struct ferry_error *err)
{
	json_int_t n = json_integer_value(json_object_get(args, "n"));

	(void)ret;
	(void)err;
	for (json_int_t i = 0; i < n; i++)
		control_event(opaque, "EMITTED", json_pack("{s:I}", "i", i));
	return 0;
}

static const char *sock_path(const char *name)
{
	return test_fmt("%s/%s.sock", test_tmpdir(), name);
}

static struct control *start_server(const char *path)
{
	struct ferry_error err = { 0 };
	struct control *c = control_create(path, &err);

	if (!c)
		FAIL("control_create(%s): %s", path, err.msg);
	ASSERT_OK(control_register(c, "echo", cmd_echo, NULL));
	ASSERT_OK(control_register(c, "fail", cmd_fail, NULL));
	ASSERT_OK(control_register(c, "add", cmd_add, NULL));
	ASSERT_OK(control_register(c, "sleep", cmd_sleep, NULL));
	ASSERT_OK(control_register(c, "emit", cmd_emit, c));
	ASSERT_OK_E(control_start(c, &err), err);
	return c;
}

static int client(const char *path)
{
	struct ferry_error err = { 0 };
	int fd = control_client_connect(path, TMO, &err);

	if (fd < 0)
		FAIL("control_client_connect(%s): %s", path, err.msg);
	return fd;
}

/* A bare connected socket: nothing read, nothing sent. */
static int raw_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	ASSERT(fd >= 0);
	ASSERT(strlen(path) < sizeof(sa.sun_path));
	strcpy(sa.sun_path, path);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		FAIL("connect(%s): %s", path, strerror(errno));
	return fd;
}

static void raw_send(int fd, const char *s)
{
	size_t len = strlen(s);

	while (len) {
		ssize_t n = send(fd, s, len, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			FAIL("send: %s", strerror(errno));
		s += n;
		len -= (size_t)n;
	}
}

static json_t *next_msg(int fd)
{
	struct ferry_error err = { 0 };
	json_t *m = NULL;

	ASSERT_OK_E(control_client_read(fd, &m, TMO, &err), err);
	return m;
}

static const char *error_class(json_t *reply)
{
	return json_string_value(json_object_get(json_object_get(reply, "error"),
						 "class"));
}

static const char *error_desc(json_t *reply)
{
	return json_string_value(json_object_get(json_object_get(reply, "error"),
						 "desc"));
}

/* Expect {"return": <JSON text @want>}. */
static void expect_return(json_t *reply, const char *want)
{
	json_t *w = json_loads(want, JSON_DECODE_ANY, NULL);
	json_t *got = json_object_get(reply, "return");

	ASSERT_PTR(w);
	if (!json_equal(got, w)) {
		char *s = json_dumps(reply, JSON_COMPACT);

		FAIL("reply %s, expected return %s", s, want);
	}
	json_decref(w);
}

/* Raw connect and swallow the greeting. */
static int raw_client(const char *path)
{
	int fd = raw_connect(path);

	json_decref(next_msg(fd));
	return fd;
}

/* ---- tests -------------------------------------------------------------- */

TEST(control_greeting)
{
	const char *path = sock_path("greet");
	struct control *c = start_server(path);
	json_t *g, *r, *cmds, *v;
	bool found_echo = false, found_qc = false;
	int fd = raw_connect(path);
	size_t i;

	g = next_msg(fd);
	ASSERT_STREQ(json_string_value(json_object_get(
		json_object_get(json_object_get(g, "QMP"), "version"), "ferry")),
		FERRY_VERSION_STRING);
	ASSERT(json_is_array(json_object_get(json_object_get(g, "QMP"),
					     "capabilities")));
	json_decref(g);

	raw_send(fd, "{\"execute\": \"qmp_capabilities\"}\n");
	r = next_msg(fd);
	expect_return(r, "{}");
	json_decref(r);

	raw_send(fd, "{\"execute\": \"query-commands\"}\n");
	r = next_msg(fd);
	cmds = json_object_get(r, "return");
	ASSERT(json_is_array(cmds));
	json_array_foreach(cmds, i, v) {
		const char *n = json_string_value(json_object_get(v, "name"));

		ASSERT_PTR(n);
		found_echo |= !strcmp(n, "echo");
		found_qc |= !strcmp(n, "query-commands");
	}
	ASSERT(found_echo && found_qc);
	json_decref(r);

	/* Registration rules. */
	ASSERT_ERR(control_register(c, "more", cmd_echo, NULL), -EBUSY);
	close(fd);
	control_destroy(c);
}

TEST(control_register_rules)
{
	const char *path = sock_path("reg");
	struct control *c = control_create(path, NULL);
	struct stat st;

	ASSERT_PTR(c);
	ASSERT_OK(stat(path, &st));
	ASSERT(S_ISSOCK(st.st_mode));
	ASSERT_OK(control_register(c, "x", cmd_echo, NULL));
	ASSERT_ERR(control_register(c, "x", cmd_echo, NULL), -EEXIST);
	ASSERT_ERR(control_register(c, "query-commands", cmd_echo, NULL), -EEXIST);
	ASSERT_ERR(control_register(c, "", cmd_echo, NULL), -EINVAL);
	/* Never started: destroy must still clean up, socket included. */
	control_destroy(c);
	ASSERT_NE(stat(path, &st), 0);

	/* A regular file in the way is reported, not deleted. */
	{
		struct ferry_error err = { 0 };
		FILE *f = fopen(path, "w");

		ASSERT_PTR(f);
		fclose(f);
		ASSERT_NULL(control_create(path, &err));
		ASSERT_NE(err.code, 0);
		ASSERT_OK(stat(path, &st));
		ASSERT(S_ISREG(st.st_mode));
	}
}

TEST(control_command_with_args)
{
	const char *path = sock_path("args");
	struct control *c = start_server(path);
	struct ferry_error err = { 0 };
	json_t *args, *ret = NULL;
	int fd = client(path);

	args = json_pack("{s:i,s:i}", "a", 40, "b", 2);
	ASSERT_OK_E(control_client_call(fd, "add", args, &ret, TMO, &err), err);
	ASSERT_EQ(json_integer_value(json_object_get(ret, "sum")), 42);
	json_decref(ret);
	json_decref(args);

	/* Nested arguments survive the round trip unchanged. */
	args = json_pack("{s:[i,s,{s:b}],s:n,s:f}", "list", 1, "two", "three",
			 1, "nothing", "pi", 3.5);
	ASSERT_OK_E(control_client_call(fd, "echo", args, &ret, TMO, &err), err);
	ASSERT(json_equal(args, ret));
	json_decref(ret);
	json_decref(args);

	/* No arguments: the handler sees {} and echoes it. */
	ASSERT_OK_E(control_client_call(fd, "echo", NULL, &ret, TMO, &err), err);
	ASSERT(json_is_object(ret) && json_object_size(ret) == 0);
	json_decref(ret);

	/* A handler that sets no return value replies {}. */
	args = json_pack("{s:i}", "ms", 1);
	ASSERT_OK_E(control_client_call(fd, "sleep", args, &ret, TMO, &err), err);
	ASSERT(json_is_object(ret) && json_object_size(ret) == 0);
	json_decref(ret);
	json_decref(args);

	close(fd);
	control_destroy(c);
}

TEST(control_error_reply)
{
	const char *path = sock_path("err");
	struct control *c = start_server(path);
	struct ferry_error err = { 0 };
	json_t *r, *ret = NULL;
	int fd = raw_client(path);

	raw_send(fd, "{\"execute\": \"fail\", \"arguments\": {\"msg\": \"disk on fire\"}}\n");
	r = next_msg(fd);
	ASSERT_NULL(json_object_get(r, "return"));
	ASSERT_STREQ(error_class(r), "GenericError");
	ASSERT_STREQ(error_desc(r), "disk on fire");
	json_decref(r);

	/* The errno -> class mapping. */
	raw_send(fd, "{\"execute\": \"fail\", \"arguments\": {\"errno\": 19, \"msg\": \"no such device 'x'\"}}\n");
	r = next_msg(fd);
	ASSERT_STREQ(error_class(r), "DeviceNotFound");
	json_decref(r);
	raw_send(fd, "{\"execute\": \"fail\", \"arguments\": {\"errno\": 38}}\n");
	r = next_msg(fd);
	ASSERT_STREQ(error_class(r), "CommandNotFound");
	/* No message from the handler: strerror() stands in. */
	ASSERT_STREQ(error_desc(r), strerror(ENOSYS));
	json_decref(r);

	/* The client library's view: -EREMOTEIO with "class: desc". */
	{
		int cfd = client(path);
		json_t *args = json_pack("{s:s}", "msg", "nope");

		ASSERT_ERR(control_client_call(cfd, "fail", args, &ret, TMO, &err),
			   -EREMOTEIO);
		ASSERT_STREQ(err.msg, "GenericError: nope");
		ASSERT_NULL(ret);
		json_decref(args);
		/* The connection is still fine. */
		ferry_error_clear(&err);
		ASSERT_OK_E(control_client_call(cfd, "echo", NULL, NULL, TMO, &err), err);
		close(cfd);
	}
	close(fd);
	control_destroy(c);
}

TEST(control_unknown_command)
{
	const char *path = sock_path("unknown");
	struct control *c = start_server(path);
	struct ferry_error err = { 0 };
	json_t *r;
	int fd = raw_client(path);

	raw_send(fd, "{\"execute\": \"no-such-thing\", \"id\": 7}\n");
	r = next_msg(fd);
	ASSERT_STREQ(error_class(r), "CommandNotFound");
	ASSERT_CONTAINS(error_desc(r), "no-such-thing");
	ASSERT_EQ(json_integer_value(json_object_get(r, "id")), 7);
	json_decref(r);
	close(fd);

	fd = client(path);
	ASSERT_ERR(control_client_call(fd, "nope", NULL, NULL, TMO, &err), -EREMOTEIO);
	ASSERT_CONTAINS(err.msg, "CommandNotFound: ");
	close(fd);
	control_destroy(c);
}

TEST(control_malformed_json)
{
	static const struct {
		const char *in;
		const char *desc; /* substring of the error's desc */
	} bad[] = {
		{ "{\"execute\": ]}\n", "parse error" },
		{ "this is not json\n", "expected a JSON object" },
		{ "{\"execute\": \"echo\", \"arguments\": {\"a\": tru}}\n", "parse error" },
		{ "{\"execute\": \"echo\n", "parse error" },  /* newline in a string */
		{ "[1, 2, 3]\n", "must be a JSON object" },
		{ "{}\n", "no 'execute'" },
		{ "{\"execute\": 5}\n", "must be a string" },
		{ "{\"execute\": \"echo\", \"arguments\": [1]}\n", "'arguments' must be" },
		{ "{\"execute\": \"echo\", \"bogus\": 1}\n", "'bogus' is unexpected" },
		{ "42\n", "expected a JSON object" },
		{ "\"str\"\n", "expected a JSON object" },
		{ "{\"execute\": \"echo\"}}\n", NULL }, /* a valid request, then junk */
	};
	const char *path = sock_path("malformed");
	struct control *c = start_server(path);
	int fd = raw_client(path);

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		json_t *r;

		raw_send(fd, bad[i].in);
		r = next_msg(fd);
		if (!bad[i].desc) {
			/* The valid part is answered, the junk reported. */
			expect_return(r, "{}");
			json_decref(r);
			r = next_msg(fd);
			ASSERT_STREQ(error_class(r), "GenericError");
			json_decref(r);
		} else {
			if (!error_desc(r))
				FAIL("input %zu (%s): no error reply", i, bad[i].in);
			ASSERT_STREQ(error_class(r), "GenericError");
			ASSERT_CONTAINS(error_desc(r), bad[i].desc);
			json_decref(r);
		}
		/* Exactly one reply per bad line: the connection is in sync
		 * and usable, so the next request gets its own answer. */
		raw_send(fd, "{\"execute\": \"echo\", \"arguments\": {\"ok\": 1}, \"id\": \"after\"}\n");
		r = next_msg(fd);
		ASSERT_STREQ(json_string_value(json_object_get(r, "id")), "after");
		expect_return(r, "{\"ok\": 1}");
		json_decref(r);
	}

	/* Random bytes: errors, no crash, still in sync afterwards. */
	{
		char junk[4097];
		json_t *r;

		for (int round = 0; round < 20; round++) {
			for (size_t i = 0; i < sizeof(junk) - 1; i++) {
				junk[i] = (char)(test_rand() % 255 + 1);
				/* Keep braces out so the junk cannot open a
				 * value that swallows the probe below. */
				if (strchr("{}[]\"", junk[i]))
					junk[i] = 'x';
			}
			junk[sizeof(junk) - 1] = 0;
			raw_send(fd, junk);
			raw_send(fd, "\n{\"execute\": \"echo\", \"id\": \"probe\"}\n");
			for (;;) {
				r = next_msg(fd);
				if (json_object_get(r, "id"))
					break;
				ASSERT_STREQ(error_class(r), "GenericError");
				json_decref(r);
			}
			ASSERT_STREQ(json_string_value(json_object_get(r, "id")), "probe");
			expect_return(r, "{}");
			json_decref(r);
		}
	}
	close(fd);
	control_destroy(c);
}

TEST(control_pipelined_and_split)
{
	const char *path = sock_path("split");
	struct control *c = start_server(path);
	const char *req = "{\"execute\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}, \"id\": \"s\"}";
	json_t *r;
	int fd = raw_client(path);

	/* Two requests in one write, concatenated without a separator. */
	raw_send(fd, "{\"execute\":\"echo\",\"arguments\":{\"n\":1},\"id\":1}"
		     "{\"execute\":\"echo\",\"arguments\":{\"n\":2},\"id\":2}");
	r = next_msg(fd);
	ASSERT_EQ(json_integer_value(json_object_get(r, "id")), 1);
	expect_return(r, "{\"n\": 1}");
	json_decref(r);
	r = next_msg(fd);
	ASSERT_EQ(json_integer_value(json_object_get(r, "id")), 2);
	expect_return(r, "{\"n\": 2}");
	json_decref(r);

	/* Many in one write, newline separated, answered in order. */
	{
		char buf[8192] = "";

		for (int i = 0; i < 50; i++)
			strcat(buf, test_fmt("{\"execute\":\"echo\",\"id\":%d}\n", i));
		raw_send(fd, buf);
		for (int i = 0; i < 50; i++) {
			r = next_msg(fd);
			ASSERT_EQ(json_integer_value(json_object_get(r, "id")), i);
			json_decref(r);
		}
	}

	/* One request split over several writes, at every possible cut of
	 * two pieces, then byte by byte. Braces and quotes inside strings
	 * must not confuse the framing. */
	for (size_t cut = 1; cut < strlen(req); cut++) {
		char a[256];

		memcpy(a, req, cut);
		a[cut] = 0;
		raw_send(fd, a);
		poll(NULL, 0, cut % 16 == 0 ? 2 : 0);
		raw_send(fd, req + cut);
		r = next_msg(fd);
		expect_return(r, "{\"sum\": 3}");
		json_decref(r);
	}
	for (const char *p = "{\"execute\":\"echo\",\"arguments\":{\"s\":\"a}\\\"]{b\"}}"; *p; p++) {
		char one[2] = { *p, 0 };

		raw_send(fd, one);
		poll(NULL, 0, 1);
	}
	r = next_msg(fd);
	expect_return(r, "{\"s\": \"a}\\\"]{b\"}");
	json_decref(r);

	/* A request ending one write and another starting it. */
	raw_send(fd, "{\"execute\":\"echo\",\"id\":\"x\"}{\"execute\":\"ec");
	r = next_msg(fd);
	ASSERT_STREQ(json_string_value(json_object_get(r, "id")), "x");
	json_decref(r);
	raw_send(fd, "ho\",\"id\":\"y\"}");
	r = next_msg(fd);
	ASSERT_STREQ(json_string_value(json_object_get(r, "id")), "y");
	json_decref(r);

	close(fd);
	control_destroy(c);
}

TEST(control_id_echo)
{
	static const char *ids[] = {
		"1", "\"abc\"", "{\"k\": [1, 2, {\"x\": null}]}", "[]", "null",
		"-3.25", "true",
	};
	const char *path = sock_path("id");
	struct control *c = start_server(path);
	int fd = raw_client(path);
	json_t *r;

	for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
		json_t *want = json_loads(ids[i], JSON_DECODE_ANY, NULL);

		ASSERT_PTR(want);
		raw_send(fd, test_fmt("{\"id\": %s, \"execute\": \"echo\"}\n", ids[i]));
		r = next_msg(fd);
		ASSERT(json_equal(json_object_get(r, "id"), want));
		json_decref(r);
		/* Error replies echo it too. */
		raw_send(fd, test_fmt("{\"id\": %s, \"execute\": \"fail\"}\n", ids[i]));
		r = next_msg(fd);
		ASSERT_PTR(error_class(r));
		ASSERT(json_equal(json_object_get(r, "id"), want));
		json_decref(r);
		json_decref(want);
	}
	/* No id in the request: none in the reply. */
	raw_send(fd, "{\"execute\": \"echo\"}\n");
	r = next_msg(fd);
	ASSERT_NULL(json_object_get(r, "id"));
	json_decref(r);
	close(fd);
	control_destroy(c);
}

struct emitter {
	struct control *c;
	int count;
	int interval_ms; /* pause after every @burst events; 0: none */
	int burst;       /* 0 means 1 */
	_Atomic int stop;
};

static void *emit_thread(void *arg)
{
	struct emitter *e = arg;

	for (int i = 0; (e->count < 0 || i < e->count) && !e->stop; i++) {
		control_event(e->c, "TICK", json_pack("{s:i}", "n", i));
		if (e->interval_ms && (i + 1) % (e->burst ? e->burst : 1) == 0)
			poll(NULL, 0, e->interval_ms);
	}
	return NULL;
}

TEST(control_events_two_clients)
{
	const char *path = sock_path("events");
	struct control *c = start_server(path);
	struct ferry_error err = { 0 };
	struct emitter em = { .c = c, .count = 200 };
	int a = client(path), b = client(path);
	struct timespec now;
	pthread_t t;
	json_t *r, *args;

	/* Events from another thread reach both clients, in order, with a
	 * plausible timestamp. */
	ASSERT_OK(pthread_create(&t, NULL, emit_thread, &em));
	clock_gettime(CLOCK_REALTIME, &now);
	for (int n = 0; n < 200; n++) {
		int fds[2] = { a, b };

		for (int k = 0; k < 2; k++) {
			json_t *ts;

			r = next_msg(fds[k]);
			ASSERT_STREQ(json_string_value(json_object_get(r, "event")), "TICK");
			ASSERT_EQ(json_integer_value(json_object_get(
				json_object_get(r, "data"), "n")), n);
			ts = json_object_get(r, "timestamp");
			ASSERT_LE(llabs(json_integer_value(json_object_get(ts, "seconds")) -
					(long long)now.tv_sec), 60);
			ASSERT_LT(json_integer_value(json_object_get(ts, "microseconds")),
				  1000000);
			ASSERT_GE(json_integer_value(json_object_get(ts, "microseconds")), 0);
			json_decref(r);
		}
	}
	pthread_join(t, NULL);

	/* Events emitted by a handler precede its reply, and the client
	 * library skips them; the other client sees them too. */
	args = json_pack("{s:i}", "n", 3);
	ASSERT_OK_E(control_client_call(a, "emit", args, NULL, TMO, &err), err);
	json_decref(args);
	for (int n = 0; n < 3; n++) {
		r = next_msg(b);
		ASSERT_STREQ(json_string_value(json_object_get(r, "event")), "EMITTED");
		json_decref(r);
	}

	/* NULL data becomes {}. */
	control_event(c, "EMPTY", NULL);
	r = next_msg(b);
	ASSERT_STREQ(json_string_value(json_object_get(r, "event")), "EMPTY");
	ASSERT(json_is_object(json_object_get(r, "data")));
	json_decref(r);

	close(a);
	close(b);
	control_destroy(c);
}

TEST(control_client_disconnects)
{
	const char *path = sock_path("disc");
	struct control *c = start_server(path);
	struct ferry_error err = { 0 };
	struct emitter em = { .c = c, .count = -1, .interval_ms = 1 };
	json_t *args, *ret = NULL;
	int keep = client(path);
	pthread_t t;

	/* Events keep flowing to everyone, the departed included. */
	ASSERT_OK(pthread_create(&t, NULL, emit_thread, &em));
	for (int round = 0; round < 30; round++) {
		int fd = raw_connect(path);

		switch (round % 5) {
		case 0: /* half a request, then gone */
			raw_send(fd, "{\"execute\": \"echo\", \"argu");
			break;
		case 1: /* a whole request, gone before the reply */
			raw_send(fd, "{\"execute\": \"sleep\", \"arguments\": {\"ms\": 5}}\n");
			break;
		case 2: /* gone before even reading the greeting */
			break;
		case 3: /* shut down writing only: the reply still arrives,
			 * and a request cut short by the end is reported */
			raw_send(fd, "{\"execute\": \"echo\", \"id\": 9}{\"exec");
			shutdown(fd, SHUT_WR);
			for (;;) {
				json_t *r = next_msg(fd);
				json_t *id = json_object_get(r, "id");

				if (id) {
					json_decref(r);
					break;
				}
				ASSERT_NULL(error_class(r));
				json_decref(r);
			}
			for (;;) {
				json_t *r = next_msg(fd);

				if (error_class(r)) {
					ASSERT_CONTAINS(error_desc(r), "end of input");
					json_decref(r);
					break;
				}
				json_decref(r);
			}
			break;
		case 4: /* pipelined requests, gone without reading */
			for (int i = 0; i < 100; i++)
				raw_send(fd, "{\"execute\": \"echo\"}");
			break;
		}
		close(fd);

		args = json_pack("{s:i,s:i}", "a", round, "b", 1);
		ASSERT_OK_E(control_client_call(keep, "add", args, &ret, TMO, &err), err);
		ASSERT_EQ(json_integer_value(json_object_get(ret, "sum")), round + 1);
		json_decref(ret);
		json_decref(args);
	}
	em.stop = 1;
	pthread_join(t, NULL);
	close(keep);
	control_destroy(c);
}

TEST(control_request_too_long)
{
	const char *path = sock_path("long");
	struct control *c = start_server(path);
	struct ferry_error err = { 0 };
	size_t total = CONTROL_MAX_REQUEST + 65536, sent = 0;
	char chunk[4096];
	json_t *r = NULL;
	int fd = raw_client(path), other = client(path);

	memset(chunk, 'a', sizeof(chunk));
	raw_send(fd, "{\"execute\": \"echo\", \"arguments\": {\"s\": \"");
	/* The server hangs up part-way: stop sending then. */
	while (sent < total) {
		ssize_t n = send(fd, chunk, sizeof(chunk), MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		sent += (size_t)n;
	}
	r = next_msg(fd);
	ASSERT_STREQ(error_class(r), "GenericError");
	ASSERT_CONTAINS(error_desc(r), "exceeds");
	json_decref(r);
	r = NULL;
	ASSERT_ERR(control_client_read(fd, &r, TMO, &err), -ECONNRESET);
	close(fd);

	/* A large request under the limit is fine. */
	{
		size_t len = CONTROL_MAX_REQUEST / 2;
		char *big = malloc(len + 1);
		json_t *args, *ret = NULL;

		ASSERT_PTR(big);
		memset(big, 'b', len);
		big[len] = 0;
		args = json_pack("{s:s}", "s", big);
		ferry_error_clear(&err);
		ASSERT_OK_E(control_client_call(other, "echo", args, &ret, TMO, &err), err);
		ASSERT_EQ(strlen(json_string_value(json_object_get(ret, "s"))), len);
		json_decref(ret);
		json_decref(args);
		free(big);
	}
	close(other);
	control_destroy(c);
}

TEST(control_destroy_with_clients)
{
	const char *path = sock_path("destroy");
	struct control *c = start_server(path);
	struct ferry_error err = { 0 };
	struct stat st;
	json_t *r = NULL;
	int a = client(path), b = raw_connect(path);

	raw_send(b, "{\"execute\": \"echo\", \"argu");
	/* A final event queued just before destroy still goes out. */
	control_event(c, "SHUTDOWN", NULL);
	control_destroy(c);
	ASSERT_NE(stat(path, &st), 0);
	r = next_msg(a);
	ASSERT_STREQ(json_string_value(json_object_get(r, "event")), "SHUTDOWN");
	json_decref(r);
	r = NULL;
	ASSERT_ERR(control_client_read(a, &r, TMO, &err), -ECONNRESET);
	close(a);
	close(b);

	/* Nothing listens any more. */
	ferry_error_clear(&err);
	ASSERT(control_client_connect(path, 200, &err) < 0);
}

struct drainer {
	int fd;
	int want;          /* events to read */
	_Atomic int got;
};

static void *drain_thread(void *arg)
{
	struct drainer *d = arg;
	struct ferry_error err = { 0 };

	while (d->got < d->want) {
		json_t *m = NULL;

		if (control_client_read(d->fd, &m, TMO, &err))
			break;
		if (json_object_get(m, "event"))
			d->got++;
		json_decref(m);
	}
	return NULL;
}

TEST(control_slow_reader_dropped)
{
	const char *path = sock_path("slow");
	struct control *c = start_server(path);
	struct ferry_error err = { 0 };
	struct drainer d;
	size_t big = 64 * 1024;
	int n = (int)(CONTROL_MAX_OUTPUT / big) + 16, seen = 0, rc;
	int stuck = client(path), reader = client(path);
	char *s = malloc(big + 1);
	pthread_t t;
	json_t *m;

	/* @stuck never reads while more than CONTROL_MAX_OUTPUT of events
	 * goes out: it is dropped (at a message boundary), while @reader,
	 * which keeps up, gets every event and stays connected. */
	ASSERT_PTR(s);
	memset(s, 'e', big);
	s[big] = 0;
	d = (struct drainer){ .fd = reader, .want = n };
	ASSERT_OK(pthread_create(&t, NULL, drain_thread, &d));
	for (int i = 0; i < n; i++) {
		/* Pace to the reader so only @stuck can fall behind. */
		while (d.got < i - 8)
			poll(NULL, 0, 1);
		control_event(c, "BIG", json_pack("{s:s}", "s", s));
	}
	pthread_join(t, NULL);
	ASSERT_EQ(d.got, n);
	ASSERT_OK_E(control_client_call(reader, "echo", NULL, NULL, TMO, &err), err);

	for (;;) {
		m = NULL;
		rc = control_client_read(stuck, &m, TMO, &err);
		if (rc)
			break;
		ASSERT_STREQ(json_string_value(json_object_get(m, "event")), "BIG");
		json_decref(m);
		seen++;
	}
	ASSERT_ERR(rc, -ECONNRESET);
	ASSERT_LT(seen, n);
	free(s);
	close(stuck);
	close(reader);
	control_destroy(c);
}

struct caller {
	const char *path;
	int id;
	int failed;
	char msg[FERRY_ERROR_MSG_MAX + 64];
};

static void *call_thread(void *arg)
{
	struct caller *cl = arg;
	struct ferry_error err = { 0 };
	int fd = control_client_connect(cl->path, TMO, &err);

	if (fd < 0) {
		cl->failed = 1;
		snprintf(cl->msg, sizeof(cl->msg), "connect: %s", err.msg);
		return NULL;
	}
	for (int i = 0; i < 200 && !cl->failed; i++) {
		json_t *args = json_pack("{s:i,s:i}", "a", cl->id, "b", i), *ret = NULL;

		if (control_client_call(fd, "add", args, &ret, TMO, &err)) {
			cl->failed = 1;
			snprintf(cl->msg, sizeof(cl->msg), "call %d: %s", i, err.msg);
		} else if (json_integer_value(json_object_get(ret, "sum")) != cl->id + i) {
			cl->failed = 1;
			snprintf(cl->msg, sizeof(cl->msg), "call %d: wrong sum", i);
		}
		json_decref(ret);
		json_decref(args);
	}
	close(fd);
	return NULL;
}

TEST(control_concurrent_clients)
{
	const char *path = sock_path("many");
	struct control *c = start_server(path);
	/* ~20k events/s: busy, yet readers keep up (an unbounded flood would
	 * rightly get slow readers dropped at CONTROL_MAX_OUTPUT). */
	struct emitter em = { .c = c, .count = -1, .interval_ms = 1, .burst = 20 };
	struct caller callers[8];
	pthread_t t[8], et;

	/* Calls from eight threads while another floods events: every reply
	 * reaches the right client and no event splits a reply. */
	ASSERT_OK(pthread_create(&et, NULL, emit_thread, &em));
	for (int i = 0; i < 8; i++) {
		callers[i] = (struct caller){ .path = path, .id = i * 1000 };
		ASSERT_OK(pthread_create(&t[i], NULL, call_thread, &callers[i]));
	}
	for (int i = 0; i < 8; i++) {
		pthread_join(t[i], NULL);
		if (callers[i].failed)
			FAIL("caller %d: %s", i, callers[i].msg);
	}
	em.stop = 1;
	pthread_join(et, NULL);
	control_destroy(c);
}

/*
 * control_feed() (what tests/fuzz/fuzz-control.c drives) answers a
 * client's bytes exactly as the server does over its socket: the same
 * input, sent on a connection that then half-closes, gets the same bytes
 * back after the greeting, however it is split.
 */
TEST(control_feed_like_a_socket)
{
	static const char *inputs[] = {
		"{\"execute\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}, \"id\": 1}\n",
		"{\"execute\":\"echo\",\"arguments\":{\"s\":\"a}\\\"]{b\"}}{\"execute\":\"nope\"}",
		"junk\n{\"execute\": ]}\n[1]\n{}\n{\"execute\": 5}\n\"s\"\n42\n",
		"{\"execute\": \"fail\", \"arguments\": {\"errno\": 19, \"msg\": \"x\"}, \"id\": [1]}",
		"{\"execute\": \"echo\"}}}]]\x01\x02{\"execute\": \"echo\", \"id\": 2}",
		"{\"execute\": \"echo\n{\"execute\": \"echo\", \"id\": 3}\n",
		"{\"execute\": \"echo\", \"arguments\": {\"a\": tru",
		"{\"execute\": \"echo\", \"arguments\": {\"a\": [[[{\"b\": \"\\u00e9\"}]]]}}",
		"",
	};
	const char *path = sock_path("feed");
	struct control *live = start_server(path);
	struct ferry_error err = { 0 };
	struct control *idle = control_create(sock_path("feed-idle"), &err);

	ASSERT_PTR(idle);
	ASSERT_OK(control_register(idle, "echo", cmd_echo, NULL));
	ASSERT_OK(control_register(idle, "fail", cmd_fail, NULL));
	ASSERT_OK(control_register(idle, "add", cmd_add, NULL));
	ASSERT_OK(control_register(idle, "sleep", cmd_sleep, NULL));
	ASSERT_OK(control_register(idle, "emit", cmd_emit, idle));
	for (size_t i = 0; i < sizeof(inputs) / sizeof(inputs[0]); i++) {
		size_t len = strlen(inputs[i]), got = 0, flen = 0;
		char sock_out[8192];
		int fd = raw_client(path);

		raw_send(fd, inputs[i]);
		shutdown(fd, SHUT_WR);
		for (;;) {
			ssize_t n = read(fd, sock_out + got, sizeof(sock_out) - got);

			ASSERT_GE(n, 0);
			if (!n)
				break;
			got += (size_t)n;
			ASSERT_LT(got, sizeof(sock_out));
		}
		close(fd);
		for (size_t chunk = 0; chunk <= len; chunk += chunk < 3 ? 1 : 7) {
			char *fed = control_feed(idle, inputs[i], len, chunk, &flen);

			if (flen != got || (got && memcmp(fed, sock_out, got)))
				FAIL("input %zu in pieces of %zu: fed \"%.*s\", the "
				     "socket \"%.*s\"", i, chunk, (int)flen,
				     fed ? fed : "", (int)got, sock_out);
			free(fed);
		}
	}
	/* Only on a server that does not run. */
	{
		size_t n = 1;

		ASSERT_NULL(control_feed(live, "{}", 2, 0, &n));
		ASSERT_EQ(n, 0);
	}
	control_destroy(idle);
	control_destroy(live);
}

/* ---- ferry ctl ---------------------------------------------------------- */

TEST(control_ctl_cli)
{
	const char *path = sock_path("ctl");
	const char *bin = test_ferry_bin();
	struct control *c;
	struct emitter em = { .interval_ms = 5, .count = -1 };
	json_error_t je;
	json_t *j;
	pthread_t t;
	char *out;

	if (access(bin, X_OK))
		FAIL("ferry binary not found at %s", bin);
	c = start_server(path);
	em.c = c;

	/* Success: pretty JSON of the return value on stdout, exit 0. */
	ASSERT_EQ(test_run(&out, "%s ctl %s add '{\"a\": 20, \"b\": 22}'", bin, path), 0);
	j = json_loads(out, 0, &je);
	if (!j)
		FAIL("stdout is not JSON (%s): %s", je.text, out);
	ASSERT_EQ(json_integer_value(json_object_get(j, "sum")), 42);
	json_decref(j);
	free(out);

	ASSERT_EQ(test_run(&out, "%s ctl --timeout 3000 %s echo '{\"nested\": {\"x\": [1, \"two\"]}}'",
			   bin, path), 0);
	j = json_loads(out, 0, &je);
	ASSERT_PTR(j);
	ASSERT_STREQ(json_string_value(json_array_get(json_object_get(
		json_object_get(j, "nested"), "x"), 1)), "two");
	json_decref(j);
	free(out);

	/* No arguments; a non-object return value. */
	ASSERT_EQ(test_run(&out, "%s ctl %s query-commands", bin, path), 0);
	j = json_loads(out, 0, &je);
	ASSERT(json_is_array(j));
	json_decref(j);
	ASSERT_CONTAINS(out, "\"echo\"");
	free(out);

	/* Error reply: exit 1, "error: CLASS: desc". */
	ASSERT_EQ(test_run(&out, "%s ctl %s fail '{\"msg\": \"it broke\"}'", bin, path), 1);
	ASSERT_CONTAINS(out, "error: GenericError: it broke");
	free(out);
	ASSERT_EQ(test_run(&out, "%s ctl %s frobnicate", bin, path), 1);
	ASSERT_CONTAINS(out, "error: CommandNotFound: ");
	free(out);

	/* Bad JSON-ARGS: exit 2, before connecting (the socket is fake). */
	ASSERT_EQ(test_run(&out, "%s ctl %s echo '{\"a\": '", bin, path), 2);
	ASSERT_CONTAINS(out, "not valid JSON");
	free(out);
	ASSERT_EQ(test_run(&out, "%s ctl /nonexistent/sock echo '[1, 2]'", bin), 2);
	ASSERT_CONTAINS(out, "must be a JSON object");
	free(out);
	/* Usage errors. */
	ASSERT_EQ(test_run(&out, "%s ctl %s", bin, path), 2);
	free(out);
	ASSERT_EQ(test_run(&out, "%s ctl --timeout soon %s echo", bin, path), 2);
	free(out);
	ASSERT_EQ(test_run(&out, "%s ctl --help", bin), 0);
	ASSERT_CONTAINS(out, "usage: ferry ctl");
	free(out);

	/* Nothing listening: a clear message, exit 1. */
	ASSERT_EQ(test_run(&out, "%s ctl %s/missing.sock echo", bin, test_tmpdir()), 1);
	ASSERT_CONTAINS(out, "missing.sock");
	free(out);

	/* --events N: the reply, then N events, one per line. */
	ASSERT_OK(pthread_create(&t, NULL, emit_thread, &em));
	ASSERT_EQ(test_run(&out, "%s ctl --events 3 %s echo '{\"k\": 1}'", bin, path), 0);
	{
		size_t off = 0, len = strlen(out);
		int events = 0;

		j = json_loadb(out, len, JSON_DISABLE_EOF_CHECK, &je);
		if (!j)
			FAIL("no reply JSON in: %s", out);
		ASSERT_EQ(json_integer_value(json_object_get(j, "k")), 1);
		json_decref(j);
		off = (size_t)je.position;
		while (off < len) {
			char *nl = strchr(out + off, '\n');
			size_t l = nl ? (size_t)(nl - (out + off)) : len - off;

			if (l) {
				j = json_loadb(out + off, l, 0, &je);
				if (!j)
					FAIL("event line is not JSON: %.*s", (int)l, out + off);
				ASSERT_STREQ(json_string_value(json_object_get(j, "event")),
					     "TICK");
				json_decref(j);
				events++;
			}
			off += l + 1;
		}
		ASSERT_EQ(events, 3);
	}
	free(out);
	em.stop = 1;
	pthread_join(t, NULL);

	/* --events with none coming: the timeout ends it with exit 1. */
	ASSERT_EQ(test_run(&out, "%s ctl --timeout 200 --events 1 %s echo", bin, path), 1);
	ASSERT_CONTAINS(out, "event 1 of 1");
	free(out);

	control_destroy(c);
}
