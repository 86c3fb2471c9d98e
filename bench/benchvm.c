/*
 * bench/benchvm.c - what the benchmarks that drive `ferry vm` processes
 * share: spawning a VM with a control socket, calling it, CPU time, a free
 * port, waiting for the workload, and min/median/max lines.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "benchvm.h"
#include "vm/backend.h"
#include "guest/layout.h"

const char *bench_ferry = "build/ferry";
char bench_dir[] = "/tmp/ferry-bench-XXXXXX";
const char *bench_name = "bench";

void die(const char *msg)
{
	fprintf(stderr, "%s: %s\n", bench_name, msg);
	exit(1);
}

int free_port(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET };
	socklen_t len = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port;

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) ||
	    getsockname(fd, (struct sockaddr *)&a, &len))
		die("no free port");
	port = ntohs(a.sin_port);
	close(fd);
	return port;
}

void spawn(struct vmp *v, const char *name, const char *args)
{
	struct ferry_error err = { 0 };
	char cmd[1024];

	snprintf(v->sock, sizeof(v->sock), "%s/%s.sock", bench_dir, name);
	unlink(v->sock);
	snprintf(cmd, sizeof(cmd), "exec %s vm --control %s %s >%s/%s.log 2>&1",
		 bench_ferry, v->sock, args, bench_dir, name);
	v->pid = fork();
	if (v->pid == 0) {
		execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
		_exit(127);
	}
	for (int i = 0; i < 3000; i++) {
		if (!access(v->sock, F_OK) &&
		    (v->fd = control_client_connect(v->sock, 5000, &err)) >= 0)
			return;
		ferry_error_clear(&err);
		usleep(10000);
	}
	die("a VM did not start");
}

json_t *call(struct vmp *v, const char *cmd, json_t *args)
{
	struct ferry_error err = { 0 };
	json_t *ret = NULL;

	if (control_client_call(v->fd, cmd, args, &ret, 600000, &err)) {
		fprintf(stderr, "%s: %s: %s\n", bench_name, cmd, err.msg);
		exit(1);
	}
	json_decref(args);
	return ret;
}

void quit(struct vmp *v)
{
	int st;
	json_decref(call(v, "quit", NULL));
	close(v->fd);
	waitpid(v->pid, &st, 0);
}

/* utime + stime of a process, seconds. */
double cpu_s(pid_t pid)
{
	char path[64], buf[1024], *p;
	unsigned long ut = 0, st = 0;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	f = fopen(path, "r");
	if (!f || !fgets(buf, sizeof(buf), f)) {
		if (f)
			fclose(f);
		return 0;
	}
	fclose(f);
	p = strrchr(buf, ')');
	if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
			 &ut, &st) != 2)
		return 0;
	return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

long long geti(json_t *o, const char *k)
{
	return json_integer_value(json_object_get(o, k));
}

double getd(json_t *o, const char *k)
{
	return json_number_value(json_object_get(o, k));
}

const char *bench_backend(void)
{
	char why[300];

	if (backend_kvm_usable(why, sizeof(why)))
		return "kvm";
	printf("(KVM unusable: %s; thread backend)\n", why);
	return "thread";
}

void wait_workload(struct vmp *v, const char *wl, uint64_t mem)
{
	uint64_t want = !strcmp(wl, "fill") ? GUEST_DATA_PAGES(mem) : 0;

	for (int i = 0; i < 60000; i++) {
		json_t *g = call(v, "query-guest", NULL);
		long long gen = geti(g, "generation");
		int booted = json_is_true(json_object_get(g, "booted"));

		json_decref(g);
		if (booted && (uint64_t)gen >= want)
			break;
		usleep(10000);
	}
	if (!strncmp(wl, "dirty", 5))
		sleep(2);
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

void stat3(const char *label, double *v, int n, const char *unit)
{
	qsort(v, (size_t)n, sizeof(double), cmp);
	printf("  %-22s min %9.2f median %9.2f max %9.2f %s\n", label, v[0],
	       v[n / 2], v[n - 1], unit);
}

const char *verdict(bool met)
{
	return met ? "met" : "not met";
}


static double mono_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

json_t *wait_completed_within(struct vmp *v, double secs)
{
	double t0 = mono_s();

	for (;;) {
		json_t *m = call(v, "query-migrate", NULL);
		const char *st = json_string_value(json_object_get(m, "status"));

		if (!strcmp(st, "completed"))
			return m;
		if (!strcmp(st, "failed") || !strcmp(st, "cancelled")) {
			fprintf(stderr, "%s: migration %s: %s\n", bench_name, st,
				json_string_value(json_object_get(m, "error-desc")));
			exit(1);
		}
		if (secs > 0 && mono_s() - t0 > secs) {
			printf("  did not converge in %.0f s: %lld passes, %.0f Mbit/s,"
			       " expected downtime %lld ms\n", secs,
			       geti(json_object_get(m, "ram"), "dirty-sync-count"),
			       (double)geti(m, "bandwidth") * 8 / 1e6,
			       geti(m, "expected-downtime"));
			json_decref(m);
			json_decref(call(v, "migrate-cancel", NULL));
			return NULL;
		}
		json_decref(m);
		usleep(5000);
	}
}

json_t *wait_completed(struct vmp *v)
{
	return wait_completed_within(v, 0);
}

json_t *bench_migrate(struct vmp *s, struct vmp *d, const char *uri,
		      double secs, struct bench_mig *out)
{
	double s0 = cpu_s(s->pid), d0 = cpu_s(d->pid);
	json_t *m;

	json_decref(call(s, "migrate", json_pack("{s:s}", "uri", uri)));
	m = wait_completed_within(s, secs);
	if (!m)
		return NULL;
	out->cpu_src = cpu_s(s->pid) - s0;
	out->cpu_dst = cpu_s(d->pid) - d0;
	out->total_ms = (double)geti(m, "total-time");
	out->downtime_ms = (double)geti(m, "downtime-us") / 1000.0;
	out->mib_s = (double)geti(json_object_get(m, "ram"), "transferred") /
		     1048576.0 / (out->total_ms > 0 ? out->total_ms / 1000.0 : 1);
	return m;
}

void bench_start(int argc, char **argv, const char *name, int *runs,
		const char **only)
{
	bench_name = name;
	*runs = 3;
	*only = NULL;
	if (argc > 1)
		bench_ferry = argv[1];
	if (argc > 2)
		*runs = atoi(argv[2]);
	if (argc > 3)
		*only = argv[3];
	if (*runs < 1 || *runs > MAXRUNS)
		die("RUNS must be 1..9");
	if (!mkdtemp(bench_dir))
		die("mkdtemp");
	signal(SIGPIPE, SIG_IGN);
}

int bench_end(void)
{
	char cmd[128];

	snprintf(cmd, sizeof(cmd), "rm -rf %s", bench_dir);
	return system(cmd) ? 1 : 0;
}
