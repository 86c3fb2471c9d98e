/*
 * bench/bench-migrate.c - live migration of the reference VM over loopback:
 * 1 GiB and 4 GiB guests, idle / fill / dirtying 256 MiB flat out, 1, 2 and
 * 4 multifd channels, several runs each. Prints total time, downtime and
 * its phases, throughput, and the CPU time both processes spent during the
 * migration, as min/median/max.
 *
 * Usage: bench-migrate [FERRY_BINARY] [RUNS] [ONLY]
 *   (default build/ferry, 3 runs, every case). ONLY picks cases whose label
 *   ("4G fill 2ch") contains it, e.g. "4G fill" or "1G idle 4ch".
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "control/control.h"
#include "guest/layout.h"
#include "vm/backend.h"

#define MAXRUNS 9

static const char *ferry = "build/ferry";
static char dir[] = "/tmp/ferry-bench-XXXXXX";

struct vmp {
	pid_t pid;
	int fd;
	char sock[256];
};

static void die(const char *msg)
{
	fprintf(stderr, "bench-migrate: %s\n", msg);
	exit(1);
}

static int free_port(void)
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

static void spawn(struct vmp *v, const char *name, const char *args)
{
	struct ferry_error err = { 0 };
	char cmd[1024];

	snprintf(v->sock, sizeof(v->sock), "%s/%s.sock", dir, name);
	unlink(v->sock);
	snprintf(cmd, sizeof(cmd), "exec %s vm --control %s %s >%s/%s.log 2>&1",
		 ferry, v->sock, args, dir, name);
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

static json_t *call(struct vmp *v, const char *cmd, json_t *args)
{
	struct ferry_error err = { 0 };
	json_t *ret = NULL;

	if (control_client_call(v->fd, cmd, args, &ret, 600000, &err)) {
		fprintf(stderr, "bench-migrate: %s: %s\n", cmd, err.msg);
		exit(1);
	}
	json_decref(args);
	return ret;
}

static void quit(struct vmp *v)
{
	int st;
	json_decref(call(v, "quit", NULL));
	close(v->fd);
	waitpid(v->pid, &st, 0);
}

/* utime + stime of a process, seconds. */
static double cpu_s(pid_t pid)
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

static long long geti(json_t *o, const char *k)
{
	return json_integer_value(json_object_get(o, k));
}

static void wait_workload(struct vmp *v, const char *wl, uint64_t mem)
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

static void stat3(const char *label, double *v, int n, const char *unit)
{
	qsort(v, (size_t)n, sizeof(double), cmp);
	printf("  %-22s min %9.2f median %9.2f max %9.2f %s\n", label, v[0],
	       v[n / 2], v[n - 1], unit);
}

static void bench(const char *backend, uint64_t mem, const char *wl,
		  bool prealloc, int channels, int runs)
{
	double total[MAXRUNS], down[MAXRUNS], tput[MAXRUNS], cs[MAXRUNS],
	       cd[MAXRUNS], ph[FERRY_PHASE__MAX][MAXRUNS];

	for (int r = 0; r < runs; r++) {
		struct vmp s, d;
		int port = free_port();
		double s0, d0;
		json_t *m, *phj;
		char args[512];

		snprintf(args, sizeof(args), "--backend %s --mem %llu --workload %s",
			 backend, (unsigned long long)mem, wl);
		spawn(&s, "src", args);
		snprintf(args, sizeof(args), "--backend %s --mem %llu --paused "
			 "--incoming tcp:127.0.0.1:%d%s", backend,
			 (unsigned long long)mem, port,
			 prealloc ? " --prealloc" : "");
		spawn(&d, "dst", args);
		wait_workload(&s, wl, mem);
		json_decref(call(&s, "migrate-set-parameters",
				 json_pack("{s:i}", "multifd-channels", channels)));
		s0 = cpu_s(s.pid);
		d0 = cpu_s(d.pid);
		snprintf(args, sizeof(args), "tcp:127.0.0.1:%d", port);
		json_decref(call(&s, "migrate", json_pack("{s:s}", "uri", args)));
		for (;;) {
			const char *st;
			m = call(&s, "query-migrate", NULL);
			st = json_string_value(json_object_get(m, "status"));
			if (!strcmp(st, "completed"))
				break;
			if (!strcmp(st, "failed") || !strcmp(st, "cancelled")) {
				fprintf(stderr, "bench-migrate: migration %s: %s\n", st,
					json_string_value(json_object_get(m, "error-desc")));
				exit(1);
			}
			json_decref(m);
			usleep(5000);
		}
		cs[r] = cpu_s(s.pid) - s0;
		cd[r] = cpu_s(d.pid) - d0;
		total[r] = (double)geti(m, "total-time");
		down[r] = (double)geti(m, "downtime-us") / 1000.0;
		tput[r] = (double)geti(json_object_get(m, "ram"), "transferred") /
			  1048576.0 / (total[r] > 0 ? total[r] / 1000.0 : 1);
		phj = json_object_get(m, "downtime-phases");
		for (int i = 0; i < FERRY_PHASE__MAX; i++)
			ph[i][r] = json_real_value(json_object_get(phj,
						    ferry_phase_name(i)));
		json_decref(m);
		quit(&s);
		quit(&d);
	}
	printf("%s %lluG %s%s, %d channel%s (%d runs)\n", backend,
	       (unsigned long long)(mem >> 30), wl,
	       prealloc ? ", destination --prealloc" : "", channels,
	       channels > 1 ? "s" : "", runs);
	stat3("total time", total, runs, "ms");
	stat3("downtime", down, runs, "ms");
	for (int i = 0; i < FERRY_PHASE__MAX; i++)
		stat3(ferry_phase_name(i), ph[i], runs, "ms");
	stat3("throughput", tput, runs, "MiB/s");
	stat3("CPU source", cs, runs, "s");
	stat3("CPU destination", cd, runs, "s");
	fflush(stdout);
}

int main(int argc, char **argv)
{
	/* "fill prealloc": the destination faults in its RAM before the
	 * migration, as QEMU's -mem-prealloc does: on machines where first
	 * touches are slow this shows what the link itself can move. */
	static const char *const wls[] = { "idle", "fill", "fill prealloc",
					   "dirty,ws=256M,rate=0" };
	static const uint64_t mems[] = { 1ull << 30, 4ull << 30 };
	static const int chans[] = { 1, 2, 4 };
	const char *backend;
	char why[300];
	const char *only = NULL;
	int runs = 3;

	if (argc > 1)
		ferry = argv[1];
	if (argc > 2)
		runs = atoi(argv[2]);
	if (argc > 3)
		only = argv[3];
	if (runs < 1 || runs > MAXRUNS)
		die("RUNS must be 1..9");
	if (!mkdtemp(dir))
		die("mkdtemp");
	signal(SIGPIPE, SIG_IGN);
	backend = backend_kvm_usable(why, sizeof(why)) ? "kvm" : "thread";
	if (strcmp(backend, "kvm"))
		printf("(KVM unusable: %s; thread backend)\n", why);
	for (size_t m = 0; m < 2; m++)
		for (size_t w = 0; w < 4; w++)
			for (size_t c = 0; c < 3; c++) {
				bool pre = strstr(wls[w], " prealloc") != NULL;
				char label[96];

				snprintf(label, sizeof(label), "%lluG %s %dch",
					 (unsigned long long)(mems[m] >> 30),
					 wls[w], chans[c]);
				if (!only || strstr(label, only))
					bench(backend, mems[m], pre ? "fill" : wls[w],
					      pre, chans[c], runs);
			}
	{
		char cmd[128];
		snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
		if (system(cmd))
			return 1;
	}
	return 0;
}
