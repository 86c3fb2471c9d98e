/*
 * tests/e2e/test-migrate-cli.c - `ferry migrate` and `ferry demo` as a user
 * runs them: usage errors, an unreachable VM, a live migration between two
 * `ferry vm` processes, and the demo end to end (thread backend always, KVM
 * when /dev/kvm works), including its cleanup on timeout and Ctrl-C.
 */
#include "../harness.h"

#include <dirent.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "control/control.h"
#include "vm/backend.h"
#include "vmproc.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

/* Run a ferry command line; expect exit status @want and @needle in its
 * combined output. */
static void expect(int want, const char *needle, const char *args)
{
	char *out = NULL;
	int st = test_run(&out, "%s %s", test_ferry_bin(), args);

	if (st != want)
		FAIL("ferry %s: exit %d, expected %d: %s", args, st, want, out);
	if (needle)
		ASSERT_CONTAINS(out, needle);
	free(out);
}

TEST(migrate_cli_usage)
{
	/* ferry migrate: everything is checked before connecting, so none of
	 * these needs a VM (the socket named does not exist). */
	expect(0, "--from SOCKET", "migrate --help");
	expect(0, "--downtime-limit MS", "migrate --help");
	expect(2, "--from SOCKET is required", "migrate");
	expect(2, "--to URI is required", "migrate --from /nonexistent.sock");
	expect(2, "--from SOCKET is required", "migrate --to tcp:127.0.0.1:1");
	expect(2, "bad URI 'bogus'", "migrate --from x.sock --to bogus");
	expect(2, "bad URI 'fd:x'", "migrate --from x.sock --to fd:x");
	expect(2, "--multifd needs a channel count",
	       "migrate --from x.sock --to tcp:127.0.0.1:1 --multifd two");
	expect(2, "--multifd needs a channel count",
	       "migrate --from x.sock --to tcp:127.0.0.1:1 --multifd -1");
	expect(2, "--multifd needs a channel count",
	       "migrate --from x.sock --to tcp:127.0.0.1:1 --multifd");
	expect(2, "--compression is zstd or none",
	       "migrate --from x.sock --to tcp:127.0.0.1:1 --compression lz4");
	expect(2, "--compression zstd needs multifd",
	       "migrate --from x.sock --to tcp:127.0.0.1:1 --multifd 0 --compression zstd");
	expect(2, "--downtime-limit needs milliseconds",
	       "migrate --from x.sock --to tcp:127.0.0.1:1 --downtime-limit 1.5");
	expect(2, "--max-bandwidth needs bytes per second",
	       "migrate --from x.sock --to tcp:127.0.0.1:1 --max-bandwidth 10X");
	expect(2, "unknown option '--frobnicate'",
	       "migrate --from x.sock --to tcp:127.0.0.1:1 --frobnicate");
	expect(2, "unexpected argument 'extra'",
	       "migrate --from x.sock --to tcp:127.0.0.1:1 extra");

	/* ferry demo: same flags, same checks, plus its own. */
	expect(0, "--workload SPEC", "demo --help");
	expect(0, "--multifd N", "demo --help");
	expect(2, "bad --mem '3Q'", "demo --mem 3Q");
	expect(2, "--backend is kvm, thread or auto", "demo --backend xen");
	expect(2, "--workload", "demo --workload dirty,speed=3");
	expect(2, "--timeout needs seconds", "demo --timeout 0");
	expect(2, "--compression is zstd or none", "demo --compression gzip");
	expect(2, "unknown option '--bogus'", "demo --bogus");
	expect(2, "--mem needs a value", "demo --mem");
}

TEST(migrate_cli_no_socket)
{
	const char *sock = test_fmt("%s/nobody.sock", test_tmpdir());

	expect(1, "cannot talk to the source VM",
	       test_fmt("migrate --from %s --to tcp:127.0.0.1:1", sock));
	expect(1, "nobody.sock",
	       test_fmt("migrate --from %s --to tcp:127.0.0.1:1 --json", sock));
}

/* ---- live runs ------------------------------------------------------------ */

/* Processes whose command line mentions @s: the demo's VMs name their
 * sockets inside the demo's TMPDIR (the demo itself gets it from the
 * environment, so it does not count). */
static int procs_mentioning(const char *s)
{
	DIR *d = opendir("/proc");
	struct dirent *e;
	int n = 0;

	ASSERT_PTR(d);
	while ((e = readdir(d))) {
		char path[300], buf[8192];
		ssize_t len;
		int fd;

		if (e->d_name[0] < '0' || e->d_name[0] > '9' ||
		    atoi(e->d_name) == getpid())
			continue;
		snprintf(path, sizeof(path), "/proc/%s/cmdline", e->d_name);
		fd = open(path, O_RDONLY);
		if (fd < 0)
			continue;
		len = read(fd, buf, sizeof(buf) - 1);
		close(fd);
		if (len <= 0)
			continue;
		for (ssize_t i = 0; i < len; i++)
			if (!buf[i])
				buf[i] = ' ';
		buf[len] = 0;
		if (strstr(buf, s))
			n++;
	}
	closedir(d);
	return n;
}

static bool dir_empty(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	bool empty = true;

	ASSERT_PTR(d);
	while ((e = readdir(d)))
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
			empty = false;
	closedir(d);
	return empty;
}

/* A fresh directory for the demo's TMPDIR, to check it cleans up. */
static const char *demo_tmpdir(void)
{
	const char *d = test_fmt("%s/demo-tmp", test_tmpdir());

	ASSERT_OK(mkdir(d, 0700) ? -errno : 0);
	return d;
}

static char *slurp(const char *path)
{
	char *out = NULL;

	test_run(&out, "cat %s", path);
	return out;
}

/* Run `ferry demo ARGS --json` with stdout alone captured, and parse it. */
static json_t *run_demo_json(const char *args, int want_exit)
{
	const char *tmp = demo_tmpdir();
	const char *err = test_fmt("%s/demo.err", test_tmpdir());
	json_t *j;
	json_error_t je;
	char *out = NULL;
	int st;

	st = test_run(&out, "{ TMPDIR=%s %s demo %s%s --json --no-progress 2>%s; }",
		      tmp, test_ferry_bin(), args,
		      slow_build() ? " --auto-converge" : "", err);
	if (st != want_exit)
		FAIL("ferry demo %s: exit %d, expected %d\nstdout: %s\nstderr: %s",
		     args, st, want_exit, out, slurp(err));
	j = json_loads(out, 0, &je);
	if (!j)
		FAIL("ferry demo --json printed no JSON (%s): %s\nstderr: %s",
		     je.text, out, slurp(err));
	free(out);
	/* Nothing left behind: no directory, no socket, no VM. */
	if (!dir_empty(tmp))
		FAIL("ferry demo left files in its TMPDIR %s", tmp);
	ASSERT_EQ(procs_mentioning(tmp), 0);
	return j;
}

static void check_verified(json_t *j)
{
	json_t *d = json_object_get(j, "digests");
	json_t *v = json_object_get(j, "guest-verify");
	char *s = json_dumps(j, 0);

	if (!json_is_true(json_object_get(j, "verified")))
		FAIL("not verified: %s", s);
	ASSERT_STREQ(json_string_value(json_object_get(j, "status")), "completed");
	ASSERT(json_is_true(json_object_get(d, "equal")));
	ASSERT_STREQ(json_string_value(json_object_get(d, "source")),
		     json_string_value(json_object_get(d, "destination")));
	ASSERT(json_is_integer(json_object_get(v, "bad-pages")));
	ASSERT_EQ(json_integer_value(json_object_get(v, "bad-pages")), 0);
	ASSERT(json_is_number(json_object_get(j, "downtime")));
	ASSERT(json_is_object(json_object_get(j, "ram")));
	ASSERT_STREQ(json_string_value(json_object_get(
			     json_object_get(j, "demo"), "source-status")),
		     "postmigrate");
	free(s);
}

static void demo_verified(const char *backend, const char *extra)
{
	json_t *j;

	need_backend(backend);
	j = run_demo_json(test_fmt("--mem 256M --backend %s %s", backend, extra), 0);
	check_verified(j);
	ASSERT_STREQ(json_string_value(json_object_get(
			     json_object_get(j, "demo"), "backend")), backend);
	json_decref(j);
}

/* The newcomer's run, as is. */
TEST(demo_thread_verified) { demo_verified("thread", ""); }
/* On KVM the guest dirties memory faster than loopback carries it: let
 * auto-converge throttle it, which also keeps the test short. */
TEST(demo_kvm_verified) { demo_verified("kvm", "--auto-converge"); }

/* Every migration flag, passed through to both VMs: RAM must then travel
 * on the multifd channels. */
TEST(demo_thread_multifd_zstd)
{
	json_t *j, *mb;

	j = run_demo_json("--mem 256M --backend thread --multifd 3 "
			  "--compression zstd --auto-converge "
			  "--downtime-limit 500 --max-bandwidth 0", 0);
	check_verified(j);
	mb = json_object_get(json_object_get(j, "ram"), "multifd-bytes");
	if (!json_is_integer(mb) || json_integer_value(mb) <= 0)
		FAIL("ram.multifd-bytes is %s: RAM did not travel on the multifd "
		     "channels", mb ? json_dumps(mb, JSON_ENCODE_ANY) : "absent");
	json_decref(j);
}

/* --tls: a test CA of the demo's own, TLS on every connection (main and
 * the multifd channels), verified as any other run. */
TEST(demo_thread_tls)
{
	json_t *j, *t;
	char *out = NULL;

	if (test_run(&out, "openssl version") != 0)
		SKIP("the openssl command-line tool is not installed");
	free(out);
	j = run_demo_json("--mem 256M --backend thread --tls --multifd 2", 0);
	check_verified(j);
	t = json_object_get(j, "tls");
	if (!json_is_object(t))
		FAIL("no \"tls\" in the demo's result: %s", json_dumps(j, 0));
	ASSERT_STREQ(json_string_value(json_object_get(t, "version")), "TLSv1.3");
	ASSERT_EQ(json_integer_value(json_object_get(t, "connections")), 3);
	json_decref(j);
}

/* Devices with large state on both VMs, their state on the main channel:
 * the proof adds their stamp checks and state digests. */
TEST(demo_thread_devices)
{
	json_t *j, *dv;

	j = run_demo_json("--mem 256M --backend thread --device "
			  "bulk,size=64M,dirty-rate=20 --device "
			  "bulk,size=32M,precopy=off --device-state-channel main "
			  "--downtime-limit 2000", 0);
	check_verified(j);
	dv = json_object_get(j, "device-verify");
	ASSERT_EQ(json_integer_value(json_object_get(dv, "devices")), 2);
	ASSERT(json_is_true(json_object_get(dv, "equal")));
	ASSERT_EQ(json_integer_value(json_object_get(dv, "bad-chunks")), 0);
	ASSERT_EQ(json_array_size(json_object_get(j, "devices")), 2);
	json_decref(j);
}

/* The overall timeout: a clear message, exit 1, nothing left behind. */
TEST(demo_timeout_cleans_up)
{
	json_t *j = run_demo_json("--mem 256M --backend thread --timeout 1", 1);
	const char *err = test_fmt("%s/demo.err", test_tmpdir());

	ASSERT(json_is_false(json_object_get(j, "verified")));
	ASSERT_STREQ(json_string_value(json_object_get(j, "error")), "timed out");
	ASSERT_CONTAINS(slurp(err), "timed out");
	json_decref(j);
}

/* Ctrl-C during the migration (slowed down so it is surely still going):
 * the migration is cancelled, exit 1 "interrupted", VMs and files gone. */
TEST(demo_sigint_cleans_up)
{
	const char *tmp = demo_tmpdir();
	const char *log = test_fmt("%s/demo.log", test_tmpdir());
	char *out;
	pid_t pid;
	int st = 0, i;

	pid = fork();
	ASSERT(pid >= 0);
	if (pid == 0) {
		int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0600);

		if (fd < 0)
			_exit(127);
		dup2(fd, 1);
		dup2(fd, 2);
		setenv("TMPDIR", tmp, 1);
		execl(test_ferry_bin(), "ferry", "demo", "--mem", "256M",
		      "--backend", "thread", "--max-bandwidth", "16M",
		      (char *)NULL);
		_exit(127);
	}
	for (i = 0; i < 3000; i++) {
		out = slurp(log);
		if (strstr(out, "demo: migrating")) {
			free(out);
			break;
		}
		free(out);
		usleep(10000);
	}
	ASSERT_LT(i, 3000);
	usleep(500000);
	ASSERT_EQ(procs_mentioning(tmp), 2);
	kill(pid, SIGINT);
	for (i = 0; i < 3000; i++) {
		if (waitpid(pid, &st, WNOHANG) == pid)
			break;
		usleep(10000);
	}
	if (i == 3000) {
		kill(pid, SIGKILL);
		waitpid(pid, &st, 0);
		FAIL("ferry demo did not stop within 30 s of SIGINT: %s", slurp(log));
	}
	out = slurp(log);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 1)
		FAIL("ferry demo after SIGINT: wait status %#x: %s", st, out);
	ASSERT_CONTAINS(out, "cancelling the migration");
	ASSERT_CONTAINS(out, "migration cancelled");
	ASSERT_CONTAINS(out, "interrupted");
	free(out);
	ASSERT(dir_empty(tmp));
	ASSERT_EQ(procs_mentioning(tmp), 0);
}

/* ---- ferry migrate against two ferry vm processes ----------------------- */

/* `ferry migrate` to a destination on @port; its stdout, exit status 0. */
static char *migrate_to(struct proc *src, struct proc *dst, int port,
			const char *flags)
{
	const char *err = test_fmt("%s/migrate.err", test_tmpdir());
	char *out = NULL;
	int st;

	st = test_run(&out, "{ %s migrate --from %s --to tcp:127.0.0.1:%d %s%s 2>%s; }",
		      test_ferry_bin(), src->sock, port, flags,
		      slow_build() ? " --auto-converge" : "", err);
	if (st != 0)
		FAIL("ferry migrate %s: exit %d: %s\n%s\nsource: %s\ndestination: %s",
		     flags, st, out, slurp(err), slurp(src->log), slurp(dst->log));
	return out;
}

TEST(migrate_cli_thread_live)
{
	struct proc a, b, c;
	char *out = NULL;
	json_t *j;
	int port;

	vm_spawn(&a, "src", "--backend thread --mem 256M "
		 "--workload dirty,ws=128M,rate=0");
	usleep(500000);

	/* The table, to a first destination (listening by the time its
	 * control socket answers). */
	port = free_port();
	vm_spawn(&b, "dst", test_fmt("--backend thread --mem 256M --paused "
				     "--incoming tcp:127.0.0.1:%d", port));
	out = migrate_to(&a, &b, port, "--downtime-limit 400");
	ASSERT_CONTAINS(out, "completed");
	ASSERT_CONTAINS(out, "downtime");
	ASSERT_CONTAINS(out, "transferred");
	free(out);
	ASSERT_EQ(test_run(&out, "%s ctl %s query-status", test_ferry_bin(),
			   a.sock), 0);
	ASSERT_CONTAINS(out, "postmigrate");
	free(out);

	/* JSON, migrating the (stopped) source once more to a second one. */
	port = free_port();
	vm_spawn(&c, "dst2", test_fmt("--backend thread --mem 256M --paused "
				      "--incoming tcp:127.0.0.1:%d", port));
	out = migrate_to(&a, &c, port, "--json");
	j = json_loads(out, 0, NULL);
	if (!j)
		FAIL("ferry migrate --json printed no JSON: %s", out);
	ASSERT_STREQ(json_string_value(json_object_get(j, "status")), "completed");
	ASSERT(json_is_number(json_object_get(j, "total-time")));
	ASSERT(json_is_object(json_object_get(j, "ram")));
	json_decref(j);
	free(out);

	vm_quit(&a);
	vm_quit(&b);
	vm_quit(&c);
}
