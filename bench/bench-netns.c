/*
 * bench/bench-netns.c - live migration across "hosts": the source VM in
 * one network namespace, the destination in another, joined by a link
 * that ferry-linkemu (tools/linkemu.c) shapes in user space.
 *
 * First the emulator alone: one TCP stream from side a to side b for 3 s
 * over an unshaped link and over 10 ms / 1 Gbit/s, at MTU 1500, 9000 and
 * 64000 (the default), with the emulator's CPU. Then a 1 GiB guest
 * dirtying 256 MiB at 50 MiB/s migrates over 10 ms / 1 Gbit/s, 50 ms /
 * 1 Gbit/s and 50 ms / 1 Gbit/s with 1% loss, with 1, 2 and 4 multifd
 * channels: total time, downtime, throughput, CPU of both VMs (the
 * source's includes its vCPU, busy all the time) and of the emulator, as
 * min/median/max. A case that has not converged after 60 s (no
 * auto-converge here: the link is what is measured) is cancelled and
 * says so.
 *
 * Usage: bench-netns [FERRY_BINARY] [RUNS] [ONLY]
 *   ONLY picks cases whose label ("emulator mtu 9000 10ms-1G",
 *   "10ms-1G 2ch", "50ms-1G-loss1 4ch") contains it. Needs root and a
 *   kernel with network namespaces and TUN (else it says so and exits 0).
 *   LINKEMU_MTU=N migrates over a link of that MTU instead of the default.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "benchvm.h"

struct emu {
	pid_t pid;
	FILE *ctl, *out;
	char ns[2][64], addr[2][32];
};

static char linkemu[512];

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Start the emulator; false if it cannot make namespaces here. */
static bool emu_up(struct emu *e, const char *shape, int mtu)
{
	char line[512], mtus[16], log[300];
	int in[2], out[2];

	if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC))
		die("pipe");
	snprintf(mtus, sizeof(mtus), "%d", mtu);
	snprintf(log, sizeof(log), "%s/linkemu.log", bench_dir);
	e->pid = fork();
	if (e->pid == 0) {
		int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);

		setpgid(0, 0);
		prctl(PR_SET_PDEATHSIG, SIGTERM);
		dup2(in[0], 0);
		dup2(out[1], 1);
		if (fd >= 0)
			dup2(fd, 2);
		if (mtu)
			execl(linkemu, linkemu, "--shape", shape, "--mtu", mtus,
			      (char *)NULL);
		else
			execl(linkemu, linkemu, "--shape", shape, (char *)NULL);
		_exit(127);
	}
	close(in[0]);
	close(out[1]);
	e->ctl = fdopen(in[1], "w");
	e->out = fdopen(out[0], "r");
	if (!fgets(line, sizeof(line), e->out) ||
	    sscanf(line, "ready %31s %31s %63s %63s", e->addr[0], e->addr[1],
		   e->ns[0], e->ns[1]) != 4) {
		int st;

		waitpid(e->pid, &st, 0);
		fclose(e->ctl);
		fclose(e->out);
		return false;
	}
	return true;
}

static void emu_down(struct emu *e)
{
	int st;

	fputs("quit\n", e->ctl);
	fclose(e->ctl);
	fclose(e->out);
	waitpid(e->pid, &st, 0);
}

static int enter(const char *ns)
{
	char path[128];
	int fd;

	snprintf(path, sizeof(path), "/run/netns/%s", ns);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || setns(fd, CLONE_NEWNET))
		return -1;
	close(fd);
	return 0;
}

/* One TCP stream a -> b for @secs: Mbit/s received; emulator CPU into
 * @cpu (share of one core). */
static double stream(struct emu *e, double secs, double *cpu)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(5001) };
	int p[2], ready[2];
	pid_t rx, tx;
	double got = 0, t0, c0;
	char c;

	if (pipe(p) || pipe(ready))
		die("pipe");
	sa.sin_addr.s_addr = inet_addr(e->addr[1]);
	rx = fork();
	if (rx == 0) {
		static char buf[1 << 20];
		int one = 1, l, s;
		double n = 0, t;
		ssize_t r;

		if (enter(e->ns[1]))
			_exit(1);
		l = socket(AF_INET, SOCK_STREAM, 0);
		setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(l, (struct sockaddr *)&sa, sizeof(sa)) || listen(l, 1))
			_exit(1);
		if (write(ready[1], "r", 1) != 1)
			_exit(1);
		s = accept(l, NULL, NULL);
		t = now_s();
		while ((r = read(s, buf, sizeof(buf))) > 0)
			n += (double)r;
		n = n * 8 / 1e6 / (now_s() - t);
		if (write(p[1], &n, sizeof(n)) != sizeof(n))
			_exit(1);
		_exit(0);
	}
	if (read(ready[0], &c, 1) != 1)
		die("stream receiver");
	c0 = cpu_s(e->pid);
	t0 = now_s();
	tx = fork();
	if (tx == 0) {
		static char buf[1 << 20];
		int s;

		if (enter(e->ns[0]))
			_exit(1);
		s = socket(AF_INET, SOCK_STREAM, 0);
		if (connect(s, (struct sockaddr *)&sa, sizeof(sa)))
			_exit(1);
		while (now_s() - t0 < secs)
			if (write(s, buf, sizeof(buf)) < 0)
				_exit(1);
		_exit(0);
	}
	waitpid(tx, NULL, 0);
	if (read(p[0], &got, sizeof(got)) != sizeof(got))
		die("stream");
	*cpu = (cpu_s(e->pid) - c0) / (now_s() - t0);
	waitpid(rx, NULL, 0);
	close(p[0]);
	close(p[1]);
	close(ready[0]);
	close(ready[1]);
	return got;
}

static void bench_emulator(const char *only)
{
	static const int mtus[] = { 1500, 9000, 64000 };
	static const char *const shapes[][2] = { { "unshaped", "" },
						 { "10ms-1G", "delay=5 rate=1G" } };

	for (size_t s = 0; s < 2; s++)
		for (size_t m = 0; m < 3; m++) {
			char label[96];
			double mbit, cpu;
			struct emu e;

			snprintf(label, sizeof(label), "emulator mtu %d %s", mtus[m],
				 shapes[s][0]);
			if (only && !strstr(label, only))
				continue;
			if (!emu_up(&e, shapes[s][1], mtus[m]))
				die("ferry-linkemu did not start");
			mbit = stream(&e, 3, &cpu);
			emu_down(&e);
			printf("  %-34s %7.0f Mbit/s, emulator CPU %3.0f%% of a core\n",
			       label, mbit, cpu * 100);
			fflush(stdout);
		}
}

static void bench(const char *backend, const char *label, const char *shape,
		  int mtu, int channels, int runs)
{
	const char *wl = "dirty,ws=256M,rate=50";
	double total[MAXRUNS], down[MAXRUNS], tput[MAXRUNS], cs[MAXRUNS],
	       cd[MAXRUNS], ce[MAXRUNS];
	const char *ferry = bench_ferry;
	char ferry_ns[2][700];

	for (int r = 0; r < runs; r++) {
		struct vmp s, d;
		struct emu e;
		struct bench_mig bm;
		double e0;
		json_t *m;
		char args[512];

		if (!emu_up(&e, shape, mtu))
			die("ferry-linkemu did not start");
		for (int i = 0; i < 2; i++)
			snprintf(ferry_ns[i], sizeof(ferry_ns[i]),
				 "ip netns exec %s %s", e.ns[i], ferry);
		bench_ferry = ferry_ns[0];
		snprintf(args, sizeof(args), "--backend %s --mem 1G --workload %s",
			 backend, wl);
		spawn(&s, "src", args);
		bench_ferry = ferry_ns[1];
		snprintf(args, sizeof(args), "--backend %s --mem 1G --paused "
			 "--incoming tcp:%s:4444", backend, e.addr[1]);
		spawn(&d, "dst", args);
		bench_ferry = ferry;
		wait_workload(&s, wl, 1ull << 30);
		json_decref(call(&s, "migrate-set-parameters",
				 json_pack("{s:i}", "multifd-channels", channels)));
		e0 = cpu_s(e.pid);
		snprintf(args, sizeof(args), "tcp:%s:4444", e.addr[1]);
		m = bench_migrate(&s, &d, args, 60, &bm);
		if (!m) {
			quit(&s);
			kill(d.pid, SIGKILL);
			waitpid(d.pid, NULL, 0);
			emu_down(&e);
			printf("%s 1G %s over %s (%s), %d channel%s: gave up\n",
			       backend, wl, label, shape, channels,
			       channels > 1 ? "s" : "");
			return;
		}
		cs[r] = bm.cpu_src;
		cd[r] = bm.cpu_dst;
		ce[r] = cpu_s(e.pid) - e0;
		total[r] = bm.total_ms;
		down[r] = bm.downtime_ms;
		tput[r] = bm.mib_s * 1048576.0 * 8 / 1e6;   /* Mbit/s */
		json_decref(m);
		quit(&s);
		quit(&d);
		emu_down(&e);
	}
	printf("%s 1G %s over %s (%s), %d channel%s (%d runs)\n", backend, wl,
	       label, shape, channels, channels > 1 ? "s" : "", runs);
	stat3("total time", total, runs, "ms");
	stat3("downtime", down, runs, "ms");
	stat3("throughput", tput, runs, "Mbit/s");
	stat3("CPU source", cs, runs, "s");
	stat3("CPU destination", cd, runs, "s");
	stat3("CPU emulator", ce, runs, "s");
	fflush(stdout);
}

int main(int argc, char **argv)
{
	static const char *const links[][2] = {
		{ "10ms-1G", "delay=5 rate=1G" },
		{ "50ms-1G", "delay=25 rate=1G" },
		{ "50ms-1G-loss1", "delay=25 loss=1 rate=1G" },
	};
	static const int chans[] = { 1, 2, 4 };
	const char *backend, *only = NULL, *slash, *m = getenv("LINKEMU_MTU");
	int runs = 3, mtu = m ? atoi(m) : 0;
	struct emu e;

	bench_start(argc, argv, "bench-netns", &runs, &only);
	slash = strrchr(bench_ferry, '/');
	snprintf(linkemu, sizeof(linkemu), "%.*sferry-linkemu",
		 slash ? (int)(slash - bench_ferry + 1) : 0, bench_ferry);
	if (geteuid() != 0 || !emu_up(&e, "", 0)) {
		printf("(skipped: no network namespaces with TUN here, or not root;"
		       " see %s/linkemu.log)\n", bench_dir);
		return bench_end() ? 1 : 0;
	}
	emu_down(&e);
	bench_emulator(only);
	backend = bench_backend();
	for (size_t l = 0; l < 3; l++)
		for (size_t c = 0; c < 3; c++) {
			char label[96];

			snprintf(label, sizeof(label), "%s %dch", links[l][0], chans[c]);
			if (!only || strstr(label, only))
				bench(backend, links[l][0], links[l][1], mtu, chans[c],
				      runs);
		}
	return bench_end();
}
