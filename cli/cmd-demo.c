/*
 * cli/cmd-demo.c - `ferry demo`: the one command a newcomer runs. It starts
 * a source VM running a memory-dirtying workload and a destination VM
 * waiting on a loopback port, live-migrates the one to the other (the same
 * display as `ferry migrate`), and then proves the result:
 *
 *   1. the source ends stopped for good (postmigrate);
 *   2. the XXH3 digest of all guest RAM is the same on both sides, taken
 *      with both VMs stopped after the switchover (the destination stays
 *      paused after the load because it was started with --paused), so the
 *      digests cost nothing in the downtime;
 *   3. the destination, once resumed, makes progress and its guest's own
 *      verifier finds no bad page.
 *
 * Everything lives in a private mkdtemp() directory that is removed at the
 * end; the VMs are our children, in their own process group (Ctrl-C reaches
 * only us, and we shut them down in order) and are killed with us if we die
 * (PR_SET_PDEATHSIG). Exit status: 0 only when verified; 1 otherwise; 2 bad
 * usage.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <pthread.h>

#include <jansson.h>

#include "ferry/common.h"
#include "cli.h"
#include "control/control.h"
#include "vm/backend.h"
#include "vm/vm.h"

#define CALL_TIMEOUT_MS 10000
#define START_TIMEOUT_MS 30000    /* a VM's control socket appears */
#define BOOT_TIMEOUT_MS 30000     /* the guest starts writing pages */
#define WARMUP_MS 2000            /* workload runs before migrating */
#define LOAD_TIMEOUT_MS 60000     /* destination done loading */
#define VERIFY_TIMEOUT_MS 60000   /* one guest verify pass */
#define DEFAULT_TIMEOUT_S 600
#define LOG_TAIL 8192             /* how much of a dead VM's log to show */

struct child {
	const char *name;   /* "source" / "destination" */
	pid_t pid;          /* 0 once reaped */
	int status;         /* wait status once reaped */
	bool reported;      /* its death was reported (with its log) */
	int fd;             /* control connection, -1 if none */
	char sock[4200];
	char log[4200];
};

static volatile sig_atomic_t interrupted;
static int64_t deadline;  /* migrate_now_ms() at which we give up */
static bool timeout_reported;

static void on_signal(int sig)
{
	(void)sig;
	if (interrupted < 100)
		interrupted++;
}

static void usage(FILE *f)
{
	fprintf(f,
"usage: ferry demo [OPTIONS]\n"
"Start a source VM running a memory-dirtying workload and a destination VM,\n"
"live-migrate the source to the destination over loopback TCP, then prove\n"
"it: equal RAM digests on both sides, and the guest's own verifier clean on\n"
"the destination after it resumes. Everything runs in a private temporary\n"
"directory, removed at the end.\n"
"\n"
"  --mem SIZE           guest RAM (default 1G)\n"
"  --workload SPEC      as for 'ferry vm' (default dirty,ws=256M,rate=0)\n"
"  --backend B          kvm | thread | auto (default auto: KVM if usable)\n"
"  --timeout SEC        give up after SEC seconds (default %d)\n"
"  --tls                migrate over TLS 1.3 with both ends verified, with a\n"
"                       test CA made by scripts/gen-certs.sh (or the\n"
"                       credentials given with --tls-creds DIR)\n"
"  --device SPEC        a device with large state on both VMs, as for\n"
"                       'ferry vm --device' (repeatable); the proof adds\n"
"                       its digests and its own stamp check\n"
"%s"
"  -h, --help           this text\n"
"\n"
"With --json, prints the source's final query-migrate object plus\n"
"\"verified\", \"digests\", \"guest-verify\" and \"demo\" keys.\n"
"Exit status: 0 verified, 1 not verified or a failure, 2 usage error.\n",
		DEFAULT_TIMEOUT_S, migrate_opts_help);
}

/* ---- stopping: signals and the overall timeout ---------------------------- */

static bool should_stop(void)
{
	if (interrupted)
		return true;
	if (migrate_now_ms() > deadline) {
		if (!timeout_reported)
			cli_err("demo: timed out (see --timeout); stopping");
		timeout_reported = true;
		return true;
	}
	return false;
}

static void nap(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

/* ---- the VM processes ------------------------------------------------------ */

/* Has @c exited? Reaps it (once) if so. */
static bool child_dead(struct child *c)
{
	if (!c->pid)
		return true;
	if (waitpid(c->pid, &c->status, WNOHANG) == c->pid) {
		c->pid = 0;
		return true;
	}
	return false;
}

static void describe_status(char *buf, size_t len, int st)
{
	if (WIFEXITED(st))
		snprintf(buf, len, "exited with status %d", WEXITSTATUS(st));
	else if (WIFSIGNALED(st))
		snprintf(buf, len, "was killed by signal %d (%s)", WTERMSIG(st),
			 strsignal(WTERMSIG(st)));
	else
		snprintf(buf, len, "ended (wait status %#x)", st);
}

/* Print the tail of @c's log, so the reason it failed is in front of the
 * user rather than in a directory we are about to delete. */
static void print_log(struct child *c)
{
	char buf[LOG_TAIL + 1];
	ssize_t n;
	off_t size;
	int fd = open(c->log, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return;
	size = lseek(fd, 0, SEEK_END);
	if (size > LOG_TAIL)
		lseek(fd, size - LOG_TAIL, SEEK_SET);
	else
		lseek(fd, 0, SEEK_SET);
	n = read(fd, buf, LOG_TAIL);
	close(fd);
	if (n <= 0) {
		fprintf(stderr, "--- the %s VM's log is empty ---\n", c->name);
		return;
	}
	buf[n] = 0;
	fprintf(stderr, "--- log of the %s VM%s ---\n%s%s--- end of log ---\n",
		c->name, size > LOG_TAIL ? " (last part)" : "", buf,
		buf[n - 1] == '\n' ? "" : "\n");
}

/* Has @c died? Says so once, with its log. Until the demo shuts the VMs
 * down, any exit is a failure. */
static bool report_if_dead(struct child *c)
{
	char how[96];

	if (!child_dead(c))
		return false;
	if (!c->reported) {
		c->reported = true;
		describe_status(how, sizeof(how), c->status);
		cli_err("demo: the %s VM %s", c->name, how);
		print_log(c);
	}
	return true;
}

/* fork + exec this same binary as `ferry vm ARGS...`, output to c->log. */
/* Append "--device SPEC" pairs at @n; returns the new count. */
static unsigned add_devices(char **args, unsigned n, const char *const *spec,
			    unsigned nspec)
{
	for (unsigned i = 0; i < nspec; i++) {
		args[n++] = "--device";
		args[n++] = (char *)spec[i];
	}
	args[n] = NULL;
	return n;
}

static int spawn_vm(struct child *c, char *const *args)
{
	char *argv[48];
	int n = 0, logfd;
	pid_t pid, parent = getpid();

	argv[n++] = "ferry";
	argv[n++] = "vm";
	while (*args && n < 47)
		argv[n++] = *args++;
	argv[n] = NULL;

	logfd = open(c->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (logfd < 0) {
		cli_err("demo: cannot create %s: %s", c->log, strerror(errno));
		return -1;
	}
	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		cli_err("demo: fork: %s", strerror(errno));
		close(logfd);
		return -1;
	}
	if (pid == 0) {
		int devnull = open("/dev/null", O_RDONLY);

		/* Our own process group: a terminal's Ctrl-C reaches only the
		 * demo, which shuts the VMs down in order. And die with the
		 * demo, whatever kills it. */
		setpgid(0, 0);
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(127); /* the demo is already gone */
		signal(SIGINT, SIG_DFL);
		signal(SIGTERM, SIG_DFL);
		if (devnull >= 0)
			dup2(devnull, STDIN_FILENO);
		dup2(logfd, STDOUT_FILENO);
		dup2(logfd, STDERR_FILENO);
		/* /proc/self/exe is the very binary we are, even if the file
		 * was replaced since (a rebuild during the run). */
		execv("/proc/self/exe", argv);
		fprintf(stderr, "ferry demo: cannot run /proc/self/exe: %s\n",
			strerror(errno));
		_exit(127);
	}
	close(logfd);
	c->pid = pid;
	return 0;
}

/* Wait for @c's control socket and connect. */
static int connect_vm(struct child *c)
{
	struct ferry_error err = { 0 };
	int64_t until = migrate_now_ms() + START_TIMEOUT_MS;

	while (!should_stop()) {
		if (report_if_dead(c)) {
			cli_err("demo: the %s VM did not start", c->name);
			return -1;
		}
		if (access(c->sock, F_OK) == 0) {
			ferry_error_clear(&err);
			c->fd = control_client_connect(c->sock, 2000, &err);
			if (c->fd >= 0)
				return 0;
		}
		if (migrate_now_ms() > until) {
			cli_err("demo: the %s VM did not open its control socket in %d s%s%s",
				c->name, START_TIMEOUT_MS / 1000,
				err.msg[0] ? ": " : "", err.msg);
			print_log(c);
			return -1;
		}
		nap(20);
	}
	return -1;
}

/*
 * One control call; prints a clear error (and the VM's log if it died) on
 * failure. @args is consumed. Returns 0 or -1.
 */
static int vm_call(struct child *c, const char *cmd, json_t *args, json_t **ret,
		   int timeout_ms)
{
	struct ferry_error err = { 0 };
	int r = control_client_call(c->fd, cmd, args, ret, timeout_ms, &err);

	json_decref(args);
	if (!r)
		return 0;
	cli_err("demo: %s on the %s VM: %s", cmd, c->name, err.msg);
	report_if_dead(c);
	return -1;
}

/* A string member of a reply, copied into @buf ("" if absent). */
static void reply_str(json_t *o, const char *key, char *buf, size_t len)
{
	const char *s = json_string_value(json_object_get(o, key));

	snprintf(buf, len, "%s", s ? s : "");
}

static int query_status(struct child *c, char *buf, size_t len)
{
	json_t *r = NULL;

	if (vm_call(c, "query-status", NULL, &r, CALL_TIMEOUT_MS))
		return -1;
	reply_str(r, "status", buf, len);
	json_decref(r);
	return 0;
}

static int generation(struct child *c, long long *gen)
{
	json_t *r = NULL, *g;

	if (vm_call(c, "query-guest", NULL, &r, CALL_TIMEOUT_MS))
		return -1;
	g = json_object_get(r, "generation");
	*gen = json_is_integer(g) ? json_integer_value(g) : -1;
	json_decref(r);
	if (*gen < 0) {
		cli_err("demo: query-guest on the %s VM has no generation", c->name);
		return -1;
	}
	return 0;
}

/* Wait until the guest has booted (its status block is live). */
static int wait_booted(struct child *c, int timeout_ms)
{
	int64_t until = migrate_now_ms() + timeout_ms;

	while (!should_stop()) {
		json_t *r = NULL;
		bool up;

		if (vm_call(c, "query-guest", NULL, &r, CALL_TIMEOUT_MS))
			return -1;
		up = json_is_true(json_object_get(r, "booted"));
		json_decref(r);
		if (up)
			return 0;
		if (migrate_now_ms() > until) {
			cli_err("demo: the %s VM's guest did not boot", c->name);
			return -1;
		}
		nap(20);
	}
	return -1;
}

/* Wait until the guest's generation passes @above (it is writing pages). */
static int wait_generation(struct child *c, long long above, int timeout_ms,
			   long long *now_gen)
{
	int64_t until = migrate_now_ms() + timeout_ms;

	while (!should_stop()) {
		if (generation(c, now_gen))
			return -1;
		if (*now_gen > above)
			return 0;
		if (migrate_now_ms() > until) {
			cli_err("demo: the %s VM's guest is not making progress (generation stuck at %lld)",
				c->name, *now_gen);
			return -1;
		}
		nap(20);
	}
	return -1;
}

/*
 * Quit, then wait; escalate to SIGTERM and SIGKILL if it lingers. Always
 * leaves @c reaped. A VM that would not quit cleanly, or exited in error,
 * gets its log shown: that is where the reason is.
 */
static void stop_vm(struct child *c)
{
	static const int sigs[] = { 0, SIGTERM, SIGKILL };
	bool clean = false, was_running = c->pid != 0;

	if (c->fd >= 0) {
		struct ferry_error err = { 0 };

		if (c->pid)
			clean = !control_client_call(c->fd, "quit", NULL, NULL,
						     2000, &err);
		close(c->fd);
		c->fd = -1;
	}
	for (size_t s = 0; s < sizeof(sigs) / sizeof(sigs[0]) && c->pid; s++) {
		if (sigs[s])
			kill(c->pid, sigs[s]);
		for (int i = 0; i < 300 && !child_dead(c); i++)
			nap(10);
	}
	if (c->pid) { /* SIGKILL cannot be ignored; just reap it */
		waitpid(c->pid, &c->status, 0);
		c->pid = 0;
	}
	if (was_running && !c->reported && (!clean || c->status)) {
		char how[96];

		c->reported = true;
		describe_status(how, sizeof(how), c->status);
		cli_err("demo: the %s VM %s%s", c->name,
			clean ? "" : "did not quit when asked and ", how);
		print_log(c);
	}
}

/* Remove the private directory: our logs and any socket the VMs left. */
static void remove_dir(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *e;

	if (d) {
		while ((e = readdir(d)))
			if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
				unlinkat(dirfd(d), e->d_name, 0);
		closedir(d);
	}
	if (rmdir(dir))
		cli_err("demo: cannot remove %s: %s", dir, strerror(errno));
}

/* ---- the destination's port ----------------------------------------------- */

/* A loopback port that was free a moment ago: bind port 0, read it back. */
static int pick_port(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET };
	socklen_t len = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), port = -1;

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd >= 0 && !bind(fd, (struct sockaddr *)&a, sizeof(a)) &&
	    !getsockname(fd, (struct sockaddr *)&a, &len))
		port = ntohs(a.sin_port);
	if (fd >= 0)
		close(fd);
	if (port < 0)
		cli_err("demo: cannot find a free loopback port: %s", strerror(errno));
	return port;
}

/* Is something listening on TCP @port? 1 yes, 0 no, -1 cannot tell. Read
 * from /proc rather than probed with connect(): the destination takes the
 * first connection as the migration stream. */
static int port_listening(int port)
{
	char line[512];
	FILE *f = fopen("/proc/net/tcp", "re");
	int found = 0;

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		unsigned addr, lport, st;

		if (sscanf(line, " %*d: %x:%x %*x:%*x %x", &addr, &lport, &st) == 3 &&
		    (int)lport == port && st == 0x0A /* TCP_LISTEN */) {
			found = 1;
			break;
		}
	}
	fclose(f);
	return found;
}

static int wait_listening(struct child *c, int port)
{
	int64_t until = migrate_now_ms() + START_TIMEOUT_MS;

	while (!should_stop()) {
		int l = port_listening(port);

		if (report_if_dead(c)) {
			cli_err("demo: the destination VM exited before the migration");
			return -1;
		}
		if (l < 0) {
			nap(300); /* no /proc: give it a moment and hope */
			return 0;
		}
		if (l)
			return 0;
		if (migrate_now_ms() > until) {
			cli_err("demo: the destination VM is not listening on port %d after %d s",
				port, START_TIMEOUT_MS / 1000);
			print_log(c);
			return -1;
		}
		nap(20);
	}
	return -1;
}

/* ---- the report --------------------------------------------------------------- */

struct proof {
	bool writes;               /* the workload keeps writing (dirty) */
	bool have_src_digest, have_dst_digest;
	char src_digest[80], dst_digest[80];
	char src_status[32];
	long long gen_before, gen_after;  /* destination, around `cont` */
	json_t *verify;                   /* guest-verify reply */
	long long bad_pages;              /* -1: not run */
	bool verified;
	bool early_digest;                /* postcopy: equal while faulting */
	unsigned ndev;                    /* --device: devices checked */
	bool devices_equal;               /* their digests, both sides */
	long long device_bad;             /* bad chunks, both sides summed */
};

/*
 * Postcopy: as soon as the destination holds the VM (paused, right after
 * RUN) its RAM digest is taken - by the VMM's own thread, reading every
 * page, so pages that have not arrived yet fault and are fetched on
 * demand while the background stream goes on. That is both a workout of
 * the fault path (the latency printed) and an early proof: the source has
 * been stopped since the switch, so every page read is final.
 */
struct early_digest {
	const char *sock;          /* the destination's control socket */
	pthread_t thread;
	bool started;
	volatile bool stop;
	bool have;
	char digest[80];
	char error[FERRY_ERROR_MSG_MAX];
};

static void *early_digest_main(void *arg)
{
	struct early_digest *e = arg;
	struct ferry_error err = { 0 };
	int fd = control_client_connect(e->sock, 2000, &err);
	json_t *r = NULL;

	if (fd < 0) {
		snprintf(e->error, sizeof(e->error), "%s", err.msg);
		return NULL;
	}
	while (!e->stop) {
		const char *st;

		r = NULL;
		if (control_client_call(fd, "query-status", NULL, &r,
					CALL_TIMEOUT_MS, &err))
			break;
		st = json_string_value(json_object_get(r, "status"));
		if (st && !strcmp(st, "paused")) {
			json_decref(r);
			r = NULL;
			if (!control_client_call(fd, "query-ram-digest", NULL, &r,
						 120000, &err)) {
				reply_str(r, "digest", e->digest, sizeof(e->digest));
				e->have = e->digest[0] != 0;
			}
			break;
		}
		json_decref(r);
		r = NULL;
		nap(2);
	}
	if (err.msg[0])
		snprintf(e->error, sizeof(e->error), "%s", err.msg);
	json_decref(r);
	close(fd);
	return NULL;
}

/* The destination's postcopy figures (fault latency, blocktime) into
 * @final, beside the source's. */
static void merge_dest_postcopy(struct child *dst, json_t *final)
{
	static const char *const keys[] = { "postcopy-latency",
		"postcopy-blocktime", "postcopy-faults", NULL };
	json_t *m = NULL;

	if (!final || dst->fd < 0 ||
	    vm_call(dst, "query-migrate", NULL, &m, CALL_TIMEOUT_MS))
		return;
	for (int i = 0; keys[i]; i++) {
		json_t *v = json_object_get(m, keys[i]);

		if (v)
			json_object_set(final, keys[i], v);
	}
	json_decref(m);
}

static const char *yesno(bool b)
{
	return b ? "yes" : "no";
}

/* --tls: scripts/gen-certs.sh (beside the binary's build directory, or in
 * the current one) makes a test CA and both pairs in @dir/tls. */
static int make_test_creds(const char *dir, char *out, size_t len)
{
	char exe[4096], script[4400], cmd[9000];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	char *slash;

	script[0] = 0;
	if (n > 0) {
		exe[n] = 0;
		slash = strrchr(exe, '/');
		if (slash) {
			*slash = 0;
			snprintf(script, sizeof(script), "%s/../scripts/gen-certs.sh",
				 exe);
		}
	}
	if (!script[0] || access(script, X_OK))
		snprintf(script, sizeof(script), "scripts/gen-certs.sh");
	if (access(script, X_OK)) {
		cli_err("demo: --tls: scripts/gen-certs.sh not found; give "
			"credentials with --tls-creds DIR");
		return -1;
	}
	snprintf(out, len, "%s/tls", dir);
	snprintf(cmd, sizeof(cmd), "'%s' '%s' >/dev/null", script, out);
	fprintf(stderr, "demo: making a test CA and certificates in %s\n", out);
	if (system(cmd) != 0) {
		cli_err("demo: --tls: %s failed (is openssl installed?)", script);
		return -1;
	}
	return 0;
}

static void print_report(const char *backend, const char *mem,
			 const char *workload, json_t *final,
			 const struct proof *p, int64_t wall_ms)
{
	bool equal = p->have_src_digest && p->have_dst_digest &&
		     !strcmp(p->src_digest, p->dst_digest);

	printf("\nferry demo: live migration over loopback TCP\n");
	printf("  %-22s %s\n", "backend", backend);
	printf("  %-22s %s\n", "memory", mem);
	printf("  %-22s %s\n", "workload", workload);
	printf("  %-22s %.1f s\n", "demo wall time", (double)wall_ms / 1000.0);
	if (final) {
		json_t *lat = json_object_get(final, "postcopy-latency");

		printf("migration:\n");
		migrate_print_stats(stdout, final);
		if (json_is_object(lat))
			printf("  %-22s p50 %lld us, p99 %lld us, max %lld us\n",
			       "fault latency",
			       (long long)json_integer_value(json_object_get(lat, "p50-us")),
			       (long long)json_integer_value(json_object_get(lat, "p99-us")),
			       (long long)json_integer_value(json_object_get(lat, "max-us")));
		if (json_object_get(final, "postcopy-blocktime"))
			printf("  %-22s %lld ms\n", "blocked on faults",
			       (long long)json_integer_value(json_object_get(final,
							"postcopy-blocktime")));
	}
	printf("proof:\n");
	if (!p->src_status[0])
		printf("  (not reached: the migration did not complete)\n");
	if (p->src_status[0])
		printf("  %-22s %s\n", "source afterwards", p->src_status);
	if (p->have_src_digest)
		printf("  %-22s %s\n", "source RAM digest", p->src_digest);
	if (p->have_dst_digest)
		printf("  %-22s %s\n", "destination digest", p->dst_digest);
	if (p->have_src_digest || p->have_dst_digest) {
		printf("  %-22s %s\n", "digests equal", yesno(equal));
		printf("  %-22s %s\n", "",
		       "(taken after the switchover with both VMs stopped: not part of the downtime)");
	}
	if (p->ndev)
		printf("  %-22s %u, state digests %s, bad chunks %lld\n",
		       "devices", p->ndev, p->devices_equal ? "equal" : "DIFFER",
		       p->device_bad);
	if (p->early_digest)
		printf("  %-22s %s\n", "during postcopy",
		       "the destination's digest, taken while its pages were "
		       "still arriving, is the same");
	if (p->gen_after > p->gen_before && p->gen_before >= 0)
		printf("  %-22s %lld -> %lld after cont on the destination\n",
		       "guest generation", p->gen_before, p->gen_after);
	if (p->bad_pages >= 0)
		printf("  %-22s bad-pages %lld\n", "guest-verify", p->bad_pages);
	printf("verified: %s\n", yesno(p->verified));
	fflush(stdout);
}

static void print_json(const char *backend, const char *mem,
		       const char *workload, json_t *final,
		       const struct proof *p, const char *error)
{
	json_t *o = final ? json_deep_copy(final) : json_object();
	char *s;

	if (!o)
		return;
	json_object_set_new(o, "verified", json_boolean(p->verified));
	json_object_set_new(o, "digests", json_pack("{s:s?, s:s?, s:b, s:s}",
		"source", p->have_src_digest ? p->src_digest : NULL,
		"destination", p->have_dst_digest ? p->dst_digest : NULL,
		"equal", p->have_src_digest && p->have_dst_digest &&
			 !strcmp(p->src_digest, p->dst_digest),
		"note", "taken after the switchover with both VMs stopped; "
			"not part of the downtime"));
	if (p->verify)
		json_object_set(o, "guest-verify", p->verify);
	if (p->ndev)
		json_object_set_new(o, "device-verify", json_pack("{s:i, s:b, s:I}",
			"devices", (int)p->ndev, "equal", p->devices_equal,
			"bad-chunks", (json_int_t)p->device_bad));
	json_object_set_new(o, "demo", json_pack("{s:s, s:s, s:s, s:s?}",
		"backend", backend, "mem", mem, "workload", workload,
		"source-status", p->src_status[0] ? p->src_status : NULL));
	if (error)
		json_object_set_new(o, "error", json_string(error));
	s = json_dumps(o, JSON_INDENT(2));
	if (s)
		puts(s);
	free(s);
	json_decref(o);
	fflush(stdout);
}

/* ---- the command ---------------------------------------------------------------- */

/* After a completed migration: the checks that make it "verified". */
/* --device: each device's stamps check out on both sides, and its state
 * digest is the same (both VMs stopped: the destination is paused). */
static int prove_devices(struct child *src, struct child *dst,
			 struct proof *p)
{
	json_t *a = NULL, *b = NULL, *la, *lb;
	int r = -1;

	if (vm_call(src, "device-verify", NULL, &a, 60000) ||
	    vm_call(dst, "device-verify", NULL, &b, 60000))
		goto out;
	la = json_object_get(a, "devices");
	lb = json_object_get(b, "devices");
	if (json_array_size(la) != p->ndev || json_array_size(lb) != p->ndev) {
		cli_err("demo: device-verify lists %zu and %zu devices, not %u",
			json_array_size(la), json_array_size(lb), p->ndev);
		goto out;
	}
	p->devices_equal = true;
	p->device_bad = 0;
	for (unsigned i = 0; i < p->ndev; i++) {
		json_t *x = json_array_get(la, i), *y = json_array_get(lb, i);
		const char *dx = json_string_value(json_object_get(x, "digest"));
		const char *dy = json_string_value(json_object_get(y, "digest"));

		p->device_bad += json_integer_value(json_object_get(x, "bad-chunks")) +
				 json_integer_value(json_object_get(y, "bad-chunks"));
		if (!dx || !dy || strcmp(dx, dy)) {
			cli_err("demo: device %u's state differs: source %s, "
				"destination %s", i, dx ? dx : "?", dy ? dy : "?");
			p->devices_equal = false;
		}
	}
	if (p->device_bad)
		cli_err("demo: %lld bad chunks in the devices' state", p->device_bad);
	r = p->devices_equal && !p->device_bad ? 0 : -1;
out:
	json_decref(a);
	json_decref(b);
	return r;
}

static int prove(struct child *src, struct child *dst, struct proof *p)
{
	char st[32];
	json_t *r = NULL, *bad;
	int64_t until;

	if (query_status(src, p->src_status, sizeof(p->src_status)))
		return -1;
	if (strcmp(p->src_status, "postmigrate")) {
		cli_err("demo: the source is '%s' after the migration, expected postmigrate",
			p->src_status);
		return -1;
	}
	if (vm_call(src, "query-ram-digest", NULL, &r, 60000))
		return -1;
	reply_str(r, "digest", p->src_digest, sizeof(p->src_digest));
	p->have_src_digest = p->src_digest[0] != 0;
	json_decref(r);

	/* The destination finishes loading a moment after the source reports
	 * completed; --paused keeps it stopped, so its RAM holds still. */
	until = migrate_now_ms() + LOAD_TIMEOUT_MS;
	for (;;) {
		if (should_stop() || query_status(dst, st, sizeof(st)))
			return -1;
		if (strcmp(st, "inmigrate"))
			break;
		if (migrate_now_ms() > until) {
			cli_err("demo: the destination is still loading after %d s",
				LOAD_TIMEOUT_MS / 1000);
			return -1;
		}
		nap(20);
	}
	if (strcmp(st, "paused")) {
		cli_err("demo: the destination is '%s' after the load, expected paused", st);
		return -1;
	}
	r = NULL;
	if (vm_call(dst, "query-ram-digest", NULL, &r, 60000))
		return -1;
	reply_str(r, "digest", p->dst_digest, sizeof(p->dst_digest));
	p->have_dst_digest = p->dst_digest[0] != 0;
	json_decref(r);
	if (!p->have_src_digest || !p->have_dst_digest ||
	    strcmp(p->src_digest, p->dst_digest)) {
		cli_err("demo: RAM digests differ: source %s, destination %s",
			p->src_digest, p->dst_digest);
		return -1;
	}
	if (p->ndev && prove_devices(src, dst, p))
		return -1;

	/* Now let the guest run where it landed and check its own work. */
	/* A dirtying guest must carry on writing; idle and finished fill
	 * guests have nothing to write, their proof is the verify pass. */
	if (generation(dst, &p->gen_before) ||
	    vm_call(dst, "cont", NULL, NULL, CALL_TIMEOUT_MS))
		return -1;
	p->gen_after = p->gen_before;
	if (p->writes &&
	    wait_generation(dst, p->gen_before, BOOT_TIMEOUT_MS, &p->gen_after))
		return -1;
	if (vm_call(dst, "guest-verify",
		    json_pack("{s:b, s:i}", "wait", 1, "timeout", VERIFY_TIMEOUT_MS),
		    &p->verify, VERIFY_TIMEOUT_MS + CALL_TIMEOUT_MS))
		return -1;
	bad = json_object_get(p->verify, "bad-pages");
	if (!json_is_integer(bad)) {
		cli_err("demo: guest-verify on the destination reported no bad-pages");
		return -1;
	}
	p->bad_pages = json_integer_value(bad);
	if (p->bad_pages) {
		cli_err("demo: the guest's verifier found %lld bad page(s) on the destination",
			p->bad_pages);
		return -1;
	}
	p->verified = true;
	return 0;
}

int cmd_demo(int argc, char **argv)
{
	struct ferry_error err = { 0 };
	struct migrate_opts o;
	struct vm_workload wl;
	struct sigaction sa;
	struct child src = { .name = "source", .fd = -1 };
	struct child dst = { .name = "destination", .fd = -1 };
	struct proof p = { .gen_before = -1, .bad_pages = -1 };
	const char *mem = "1G", *workload = "dirty,ws=256M,rate=0";
	const char *backend = "auto", *timeout_arg = NULL, *tmp, *error = NULL;
	const char *devspec[VM_MAX_BULK];
	unsigned ndevspec = 0;
	char dir[4096] = "", uri[64];
	json_t *final = NULL;
	long long timeout_s = DEFAULT_TIMEOUT_S, g0 = 0, g1 = 0;
	int64_t t0 = migrate_now_ms();
	uint64_t mem_bytes;
	int rc, port;
	bool ok = false, postcopy, tls = false, made_creds = false;
	struct early_digest early = { 0 };

	migrate_opts_init(&o);
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], **dstp = NULL, *v;

		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			usage(stdout);
			return 0;
		}
		rc = migrate_parse_opt(&o, "demo", argc, argv, &i);
		if (rc < 0)
			return 2;
		if (rc > 0)
			continue;
		if (!strcmp(a, "--tls")) {
			tls = true;
			continue;
		}
		if (!strcmp(a, "--mem") || !strncmp(a, "--mem=", 6))
			dstp = &mem;
		else if (!strcmp(a, "--workload") || !strncmp(a, "--workload=", 11))
			dstp = &workload;
		else if (!strcmp(a, "--backend") || !strncmp(a, "--backend=", 10))
			dstp = &backend;
		else if (!strcmp(a, "--timeout") || !strncmp(a, "--timeout=", 10))
			dstp = &timeout_arg;
		else if ((!strcmp(a, "--device") || !strncmp(a, "--device=", 9)) &&
			 ndevspec < VM_MAX_BULK)
			dstp = &devspec[ndevspec++];
		if (!dstp) {
			cli_err("demo: %s '%s'", a[0] == '-' ? "unknown option" :
				"unexpected argument", a);
			usage(stderr);
			return 2;
		}
		v = strchr(a, '=');
		if (v)
			v++;
		else if (i + 1 < argc)
			v = argv[++i];
		else {
			cli_err("demo: %s needs a value", a);
			return 2;
		}
		*dstp = v;
	}
	if (timeout_arg) {
		char *end;

		errno = 0;
		timeout_s = strtoll(timeout_arg, &end, 10);
		if (errno || end == timeout_arg || *end || timeout_s <= 0 ||
		    timeout_s > 86400) {
			cli_err("demo: --timeout needs seconds (1 to 86400), got '%s'",
				timeout_arg);
			return 2;
		}
	}
	/* Check what we can here, so a typo is a usage error rather than a
	 * VM that fails to start. */
	if (vm_parse_size(mem, &mem_bytes)) {
		cli_err("demo: bad --mem '%s' (like 512M or 1G)", mem);
		return 2;
	}
	if (vm_parse_workload(workload, &wl, &err)) {
		cli_err("demo: --workload: %s", err.msg);
		return 2;
	}
	if (strcmp(backend, "kvm") && strcmp(backend, "thread") &&
	    strcmp(backend, "auto")) {
		cli_err("demo: --backend is kvm, thread or auto, got '%s'", backend);
		return 2;
	}
	if (migrate_check_opts(&o, "demo"))
		return 2;
	for (unsigned i = 0; i < ndevspec; i++) {
		struct vm_config dummy = { 0 };

		if (vm_parse_device(devspec[i], &dummy, &err)) {
			cli_err("demo: --device: %s", err.msg);
			return 2;
		}
	}
	p.ndev = ndevspec;
	postcopy = o.postcopy || o.postcopy_preempt || o.postcopy_after >= 0;

	/* Resolve the backend once, so both VMs use the same one and the
	 * report can name it. */
	{
		char why[300] = "";
		bool kvm = backend_kvm_usable(why, sizeof(why));

		if (!strcmp(backend, "kvm") && !kvm) {
			cli_err("demo: KVM is not usable here: %s (try --backend thread)", why);
			return 1;
		}
		if (!strcmp(backend, "auto"))
			backend = kvm ? "kvm" : "thread";
	}

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	deadline = t0 + timeout_s * 1000;

	tmp = getenv("TMPDIR");
	snprintf(dir, sizeof(dir), "%s/ferry-demo.XXXXXX", tmp && *tmp ? tmp : "/tmp");
	if (!mkdtemp(dir)) {
		cli_err("demo: cannot create a directory like %s: %s", dir,
			strerror(errno));
		return 1;
	}
	/* --tls without credentials: a test CA of our own, in the demo's
	 * directory (removed with it). */
	if (tls && !o.tls_creds[0]) {
		made_creds = true;
		if (make_test_creds(dir, o.tls_creds, sizeof(o.tls_creds)))
			goto out;
	}
	snprintf(src.sock, sizeof(src.sock), "%s/source.sock", dir);
	snprintf(src.log, sizeof(src.log), "%s/source.log", dir);
	snprintf(dst.sock, sizeof(dst.sock), "%s/destination.sock", dir);
	snprintf(dst.log, sizeof(dst.log), "%s/destination.log", dir);

	/* 1. The source, and its workload going. */
	fprintf(stderr, "demo: starting the source VM (%s, %s, workload %s)\n",
		backend, mem, workload);
	{
		char *args[12 + 2 * VM_MAX_BULK] = { "--control", src.sock,
			"--backend", (char *)backend, "--mem", (char *)mem,
			"--workload", (char *)workload };

		add_devices(args, 8, devspec, ndevspec);
		if (spawn_vm(&src, args) || connect_vm(&src))
			goto out;
	}
	p.writes = wl.kind == GUEST_WORK_DIRTY;
	if (wait_booted(&src, BOOT_TIMEOUT_MS) || generation(&src, &g0))
		goto out;
	fprintf(stderr, "demo: guest booted, letting the workload run for %d s\n",
		WARMUP_MS / 1000);
	for (int64_t until = migrate_now_ms() + WARMUP_MS;
	     migrate_now_ms() < until && !should_stop();)
		nap(50);
	if (p.writes && wait_generation(&src, g0, BOOT_TIMEOUT_MS, &g1))
		goto out;

	/* 2. The destination, waiting on a loopback port. */
	port = pick_port();
	if (port < 0)
		goto out;
	snprintf(uri, sizeof(uri), "tcp:127.0.0.1:%d", port);
	fprintf(stderr, "demo: starting the destination VM (incoming on %s)\n", uri);
	{
		char *args[16 + 2 * VM_MAX_BULK] = { "--control", dst.sock,
			"--backend", (char *)backend, "--mem", (char *)mem,
			"--incoming", uri, "--paused" };
		unsigned n = add_devices(args, 9, devspec, ndevspec);

		/* Settings the destination must have before it listens. */
		if (o.device_state_channel) {
			args[n++] = "--device-state-channel";
			args[n++] = (char *)o.device_state_channel;
		}
		if (postcopy)
			args[n++] = "--postcopy";
		if (o.tls_creds[0]) {
			args[n++] = "--tls-creds";
			args[n++] = o.tls_creds;
		}

		if (spawn_vm(&dst, args) || connect_vm(&dst) ||
		    wait_listening(&dst, port))
			goto out;
	}

	/* 3. Migrate. Settings go to both sides: a destination that needs to
	 * know them (multifd, compression) has them before the stream comes;
	 * one that does not need them may refuse, which is only a note. */
	if (migrate_apply(src.fd, &o, &err)) {
		cli_err("demo: the source VM refused the migration settings: %s", err.msg);
		goto out;
	}
	ferry_error_clear(&err);
	/* The destination took postcopy-ram on its command line (--postcopy):
	 * a capability cannot change once it listens. */
	struct migrate_opts od = o;

	od.postcopy = od.postcopy_preempt = false;
	od.postcopy_after = -1;
	od.tls_creds[0] = 0;    /* it has its own, from its command line */
	if (migrate_apply(dst.fd, &od, &err)) {
		fprintf(stderr, "demo: note: the destination did not take the settings (%s)\n",
			err.msg);
		ferry_error_clear(&err);
	}
	fprintf(stderr, "demo: migrating (generation %lld) to %s%s\n", g1, uri,
		postcopy ? " with postcopy" : "");
	if (postcopy) {
		early.sock = dst.sock;
		early.started = !pthread_create(&early.thread, NULL,
						early_digest_main, &early);
	}
	rc = migrate_follow(src.fd, uri, &o, &interrupted, deadline, &final);
	if (early.started) {
		if (rc)
			early.stop = true;
		pthread_join(early.thread, NULL);
		early.started = false;
	}
	if (!rc && postcopy)
		merge_dest_postcopy(&dst, final);
	if (rc) {
		report_if_dead(&src);
		/* The destination's own view usually names the cause. */
		if (!report_if_dead(&dst) && dst.fd >= 0) {
			json_t *m = NULL;

			if (!control_client_call(dst.fd, "query-migrate", NULL, &m,
						 2000, &err)) {
				const char *e = json_string_value(
					json_object_get(m, "error-desc"));
				if (e)
					cli_err("demo: the destination says: %s", e);
			}
			json_decref(m);
		}
		goto out;
	}

	/* 4. Prove it. */
	fprintf(stderr, "demo: migration completed; comparing RAM digests and verifying the guest\n");
	if (prove(&src, &dst, &p))
		goto out;
	if (postcopy) {
		/* The digest read while pages were still coming in. */
		if (!early.have || strcmp(early.digest, p.dst_digest)) {
			cli_err("demo: the destination's digest during postcopy %s%s%s",
				early.have ? "differs: " : "was not taken",
				early.have ? early.digest : "",
				early.error[0] ? early.error : "");
			p.verified = false;
			goto out;
		}
		p.early_digest = true;
	}
	ok = true;
out:
	if (!ok) {
		report_if_dead(&src);
		report_if_dead(&dst);
		if (interrupted)
			error = "interrupted";
		else if (timeout_reported || migrate_now_ms() > deadline)
			error = "timed out";
		else
			error = "failed; see the messages above";
	}
	stop_vm(&dst);
	stop_vm(&src);
	if (made_creds)
		remove_dir(o.tls_creds);
	if (dir[0])
		remove_dir(dir);
	if (o.json)
		print_json(backend, mem, workload, final, &p, error);
	else if (final || ok)
		print_report(backend, mem, workload, final, &p,
			     migrate_now_ms() - t0);
	if (!ok)
		cli_err("demo: not verified (%s)", error);
	json_decref(final);
	json_decref(p.verify);
	return p.verified && ok ? 0 : 1;
}
