/*
 * tests/e2e/vmproc.c - drive `ferry vm` processes from tests: spawn with a
 * control socket, call commands, wait for guest progress and migrations.
 */
#include "../harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/socket.h>
#include <jansson.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "control/control.h"
#include "vm/backend.h"
#include "vmproc.h"


bool slow_build(void)
{
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
	return true;
#else
	return false;
#endif
}

double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

int tcp_connect(int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	ASSERT_GE(fd, 0);
	sa.sin_port = htons((uint16_t)port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		FAIL("connect to port %d: %s", port, strerror(errno));
	return fd;
}

bool send_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return false;
		p += n;
		len -= (size_t)n;
	}
	return true;
}

int free_port(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET };
	socklen_t len = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port;

	ASSERT(fd >= 0);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	ASSERT_OK(bind(fd, (struct sockaddr *)&a, sizeof(a)) ? -errno : 0);
	ASSERT_OK(getsockname(fd, (struct sockaddr *)&a, &len) ? -errno : 0);
	port = ntohs(a.sin_port);
	close(fd);
	return port;
}

void need_backend(const char *backend)
{
	char why[300];

	if (!strcmp(backend, "kvm") && !backend_kvm_usable(why, sizeof(why)))
		SKIP(test_fmt("KVM unavailable: %s", why));
}

/* Start `ferry vm` with @args plus a control socket, in network namespace
 * /run/netns/@netns unless NULL; wait until it answers. */
static void spawn_in(struct proc *p, const char *netns, const char *name,
		     const char *args)
{
	struct ferry_error err = { 0 };
	char cmd[2048];

	snprintf(p->sock, sizeof(p->sock), "%s/%s.sock", test_tmpdir(), name);
	snprintf(p->log, sizeof(p->log), "%s/%s.log", test_tmpdir(), name);
	snprintf(cmd, sizeof(cmd), "exec %s vm --control %s %s >%s 2>&1",
		 test_ferry_bin(), p->sock, args, p->log);
	p->pid = fork();
	ASSERT(p->pid >= 0);
	if (p->pid == 0) {
		if (netns) {
			int fd = open(test_fmt("/run/netns/%s", netns),
				      O_RDONLY | O_CLOEXEC);

			if (fd < 0 || setns(fd, CLONE_NEWNET)) {
				fprintf(stderr, "netns %s: %s\n", netns,
					strerror(errno));
				_exit(127);
			}
			close(fd);
		}
		execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
		_exit(127);
	}
	/* 30 s, scaled: a VM with 2 GiB of device state to stamp takes
	 * longer than that to start under ThreadSanitizer. */
	for (int i = 0; i < 3000 * test_timeout_scale; i++) {
		int st;

		if (access(p->sock, F_OK) == 0) {
			p->fd = control_client_connect(p->sock, 5000, &err);
			if (p->fd >= 0)
				return;
			ferry_error_clear(&err);
		}
		if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
			char *out = NULL;
			test_run(&out, "cat %s", p->log);
			FAIL("ferry vm %s exited early: %s", args, out);
		}
		usleep(10000);
	}
	FAIL("ferry vm did not open its control socket");
}

void vm_spawn(struct proc *p, const char *name, const char *args)
{
	spawn_in(p, NULL, name, args);
}

void vm_spawn_ns(struct proc *p, const char *netns, const char *name,
		 const char *args)
{
	spawn_in(p, netns, name, args);
}

json_t *call(struct proc *p, const char *cmd, json_t *args)
{
	struct ferry_error err = { 0 };
	json_t *ret = NULL;
	int r = control_client_call(p->fd, cmd, args, &ret, 120000, &err);

	json_decref(args);
	if (r)
		FAIL("%s: %s", cmd, err.msg);
	return ret;
}

int call_fails(struct proc *p, const char *cmd, json_t *args, char *msg,
	       size_t len)
{
	struct ferry_error err = { 0 };
	json_t *ret = NULL;
	int r = control_client_call(p->fd, cmd, args, &ret, 120000, &err);

	json_decref(args);
	json_decref(ret);
	if (!r)
		FAIL("%s succeeded; it should have been refused", cmd);
	snprintf(msg, len, "%s", err.msg);
	return r;
}

long long geti(json_t *o, const char *key)
{
	json_t *v = json_object_get(o, key);
	if (!json_is_integer(v))
		FAIL("no integer '%s' in %s", key, json_dumps(o, 0));
	return json_integer_value(v);
}

const char *gets(json_t *o, const char *key)
{
	const char *s = json_string_value(json_object_get(o, key));
	if (!s)
		FAIL("no string '%s' in %s", key, json_dumps(o, 0));
	return s;
}

long long generation(struct proc *p)
{
	json_t *g = call(p, "query-guest", NULL);
	long long v = geti(g, "generation");
	json_decref(g);
	return v;
}

/* Wait until the guest has booted and written at least @n pages. */
void wait_generation(struct proc *p, long long n)
{
	for (int i = 0; i < 6000; i++) {
		if (generation(p) >= n)
			return;
		usleep(10000);
	}
	FAIL("guest generation stuck below %lld", n);
}

void vm_quit(struct proc *p)
{
	int st;

	call(p, "quit", NULL);
	close(p->fd);
	for (int i = 0; i < 1000; i++) {
		if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
			/* A clean quit exits 0; a sanitizer that found
			 * something (a race, a leak at exit) makes it
			 * non-zero. */
			if (!WIFEXITED(st) || WEXITSTATUS(st))
				FAIL("ferry vm quit with status 0x%x (see its "
				     "log)", st);
			return;
		}
		usleep(10000);
	}
	kill(p->pid, SIGKILL);
	waitpid(p->pid, &st, 0);
	FAIL("ferry vm did not quit");
}

void vm_wait_exit(struct proc *p, int status)
{
	int st;

	for (int i = 0; i < 3000; i++) {
		if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
			close(p->fd);
			if (!WIFEXITED(st) || WEXITSTATUS(st) != status)
				FAIL("ferry vm exited with status 0x%x, wanted %d",
				     st, status);
			return;
		}
		usleep(10000);
	}
	FAIL("ferry vm did not exit");
}

const char *status_of(struct proc *p)
{
	static char buf[64];
	json_t *s = call(p, "query-status", NULL);
	snprintf(buf, sizeof(buf), "%s", gets(s, "status"));
	json_decref(s);
	return buf;
}

void wait_loaded(struct proc *p)
{
	/* A sanitizer build loads a multi-GiB image several times slower. */
	int limit = slow_build() ? 30000 : 6000;

	for (int i = 0; i < limit && !strcmp(status_of(p), "inmigrate"); i++)
		usleep(10000);
}

void ram_digest(struct proc *p, char *out)
{
	json_t *d = call(p, "query-ram-digest", NULL);

	snprintf(out, 64, "%s", gets(d, "digest"));
	json_decref(d);
}

json_t *verify(struct proc *p)
{
	return call(p, "guest-verify", json_pack("{s:b}", "wait", 1));
}

void cont_verified(struct proc *p)
{
	json_t *v;

	json_decref(call(p, "cont", NULL));
	v = verify(p);
	ASSERT_EQ(geti(v, "bad-pages"), 0);
	json_decref(v);
}

void wait_migration_live(struct proc *p, const char *want)
{
	for (int i = 0; i < 12000 * test_timeout_scale; i++) {
		json_t *m = call(p, "query-migrate", NULL);
		bool hit = !strcmp(gets(m, "status"), want);

		json_decref(m);
		if (hit)
			return;
		usleep(5000);
	}
	FAIL("migration never reached %s", want);
}

void wait_migration(struct proc *p, const char *want)
{
	/* 2 minutes, scaled (a sanitizer build moves state slower). */
	for (int i = 0; i < 12000 * test_timeout_scale; i++) {
		json_t *m = call(p, "query-migrate", NULL);
		const char *s = gets(m, "status");

		if (!strcmp(s, want)) {
			json_decref(m);
			return;
		}
		if (!strcmp(s, "failed") || !strcmp(s, "cancelled") ||
		    !strcmp(s, "completed"))
			FAIL("migration %s, wanted %s: %s", s, want, json_dumps(m, 0));
		json_decref(m);
		usleep(10000);
	}
	FAIL("migration never reached %s", want);
}


void wait_paused_at(struct proc *p, const char *point)
{
	for (int i = 0; i < 2000; i++) {
		json_t *m = call(p, "query-migrate", NULL);
		const char *at = json_string_value(json_object_get(m, "paused-at"));
		bool there = at && !strcmp(at, point);

		json_decref(m);
		if (there)
			return;
		usleep(5000);
	}
	FAIL("the migration never paused at %s", point);
}
