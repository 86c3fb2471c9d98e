/*
 * bench/bench-devload.c - the non-iterable load of many devices: 16, 64,
 * 256 and 1024 virtio-like devices, their BARs moved between save and load
 * (the source runs --bar-layout reversed), loaded inside one memory
 * transaction (device-load-transaction, the default) or with a commit per
 * device, several runs each. Prints the load time (the downtime's
 * device-load phase), the downtime, the destination's commits and flat-view
 * rebuilds, and what one commit costs at each size (the batched load's
 * outer commit: a rebuild of the whole map and the listeners' work).
 *
 * Usage: bench-devload [FERRY_BINARY] [RUNS] [ONLY]
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "benchvm.h"

static void bench(const char *backend, unsigned n, bool batched, int runs,
		  double *median_load)
{
	double load[MAXRUNS], down[MAXRUNS], commit[MAXRUNS], commits[MAXRUNS],
	       rebuilds[MAXRUNS];

	for (int r = 0; r < runs; r++) {
		char args[512];
		int port = free_port();
		struct vmp s, d;
		json_t *m;

		snprintf(args, sizeof(args), "--backend %s --mem 256M --workload "
			 "dirty,ws=32M,rate=50 --devices %u --bar-layout reversed",
			 backend, n);
		spawn(&s, "src", args);
		snprintf(args, sizeof(args), "--backend %s --mem 256M --devices %u "
			 "--incoming defer --paused", backend, n);
		spawn(&d, "dst", args);
		json_decref(call(&d, "migrate-set-parameters", json_pack("{s:b}",
				 "device-load-transaction", batched)));
		snprintf(args, sizeof(args), "tcp:127.0.0.1:%d", port);
		json_decref(call(&d, "migrate-incoming",
				 json_pack("{s:s}", "uri", args)));
		wait_workload(&s, "dirty,ws=32M,rate=50", 256u << 20);
		json_decref(call(&s, "migrate", json_pack("{s:s}", "uri", args)));
		m = wait_completed(&s);
		load[r] = getd(json_object_get(m, "downtime-phases"), "device-load");
		down[r] = getd(m, "downtime-us") / 1000.0;
		json_decref(m);
		for (;;) {
			m = call(&d, "query-migrate", NULL);
			if (json_object_get(m, "memory-commits"))
				break;
			json_decref(m);
			usleep(5000);
		}
		commit[r] = getd(m, "memory-commit-ms");
		commits[r] = getd(m, "memory-commits");
		rebuilds[r] = getd(m, "flatview-rebuilds");
		json_decref(m);
		quit(&s);
		quit(&d);
	}
	printf("%s %u devices, BARs moved, %s (%d runs)\n", backend, n,
	       batched ? "one memory transaction" : "a commit per device", runs);
	stat3("device-load", load, runs, "ms");
	stat3("downtime", down, runs, "ms");
	stat3("memory commits", commits, runs, "");
	stat3("flat-view rebuilds", rebuilds, runs, "");
	if (batched)
		stat3("the one commit", commit, runs, "ms");
	*median_load = load[runs / 2];
	fflush(stdout);
}

int main(int argc, char **argv)
{
	static const unsigned ns[] = { 16, 64, 256, 1024 };
	const char *backend, *only = NULL;
	double tx[4] = { 0 }, per[4] = { 0 };
	int runs = 3;

	bench_start(argc, argv, "bench-devload", &runs, &only);
	backend = bench_backend();
	for (int i = 0; i < 4; i++) {
		char label[32];

		snprintf(label, sizeof(label), "%u devices", ns[i]);
		if (only && !strstr(label, only))
			continue;
		bench(backend, ns[i], true, runs, &tx[i]);
		bench(backend, ns[i], false, runs, &per[i]);
	}
	printf("device-load medians, batched vs per-device commits:\n");
	for (int i = 0; i < 4; i++)
		if (tx[i] > 0)
			printf("  %4u devices  %8.2f ms  %8.2f ms  %5.1fx%s\n",
			       ns[i], tx[i], per[i], per[i] / tx[i],
			       ns[i] == 256 ? "  (target at 256: at least 5x)" : "");
	if (tx[0] > 0 && tx[3] > 0)
		printf("growth from 16 to 1024 devices (64x the devices): "
		       "batched %.0fx, per-device %.0fx\n", tx[3] / tx[0],
		       per[3] / per[0]);
	return bench_end();
}
