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

#include "benchvm.h"
#include "ferry/engine.h"

static void bench(const char *backend, uint64_t mem, const char *wl,
		  bool prealloc, int channels, int runs)
{
	double total[MAXRUNS], down[MAXRUNS], tput[MAXRUNS], cs[MAXRUNS],
	       cd[MAXRUNS], ph[FERRY_PHASE__MAX][MAXRUNS];

	for (int r = 0; r < runs; r++) {
		struct vmp s, d;
		int port = free_port();
		struct bench_mig bm;
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
		snprintf(args, sizeof(args), "tcp:127.0.0.1:%d", port);
		m = bench_migrate(&s, &d, args, 0, &bm);
		cs[r] = bm.cpu_src;
		cd[r] = bm.cpu_dst;
		total[r] = bm.total_ms;
		down[r] = bm.downtime_ms;
		tput[r] = bm.mib_s;
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
	const char *only = NULL;
	int runs = 3;

	bench_start(argc, argv, "bench-migrate", &runs, &only);
	backend = bench_backend();
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
	return bench_end();
}
