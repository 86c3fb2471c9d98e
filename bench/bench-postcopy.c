/*
 * bench/bench-postcopy.c - postcopy of the reference VM over loopback:
 * 1 GiB and 4 GiB guests dirtying 256 MiB, and dirtying all of their RAM,
 * flat out; switched to postcopy at once, with and without the preempt
 * channel; the destination runs from RUN on, so its guest faults on the
 * pages it lacks. Prints total time, downtime, postcopy time, pages
 * requested, the fault latency (p50/p99/max), the time the guest was
 * blocked on faults and the downtime's phases, as min/median/max over
 * several runs; once more switched after precopy's first pass (the usual
 * practice: the destination is settled, most pages are there); and, to
 * compare:
 *   - this machine's bare userfaultfd round trip (a thread faults, another
 *     reads the fault and places the page: the floor of fault latency);
 *   - a precopy with auto-converge of the same guest (the other way to
 *     finish a guest that dirties faster than the link carries);
 *   - both again on a link capped at 200 MB/s (max-bandwidth).
 *
 * Usage: bench-postcopy [FERRY_BINARY] [RUNS] [ONLY]
 *   (default build/ferry, 3 runs, every case); ONLY picks cases whose label
 *   contains it, e.g. "1G ws=256M".
 */
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "benchvm.h"
#include "ferry/engine.h"
#include "postcopy.h"

enum mode { POSTCOPY, PREEMPT, PREEMPT_PASS1, PRECOPY_AC };

static const char *const mode_names[] = { "postcopy", "postcopy+preempt",
	"postcopy+preempt after the first pass", "precopy+auto-converge" };

/* Medians of one case, for the targets at the end (0: not run). */
struct result {
	double total, down, p50;
};

static struct result bench(const char *backend, uint64_t mem, const char *ws,
			   enum mode mode, uint64_t cap, int runs)
{
	double total[MAXRUNS], down[MAXRUNS], pct[MAXRUNS], req[MAXRUNS],
	       p50[MAXRUNS], p99[MAXRUNS], pmax[MAXRUNS], block[MAXRUNS],
	       ph[FERRY_PHASE__MAX][MAXRUNS];

	for (int r = 0; r < runs; r++) {
		struct vmp s, d;
		int port = free_port();
		json_t *m, *dm, *lat;
		char args[512], wl[64];

		snprintf(wl, sizeof(wl), "dirty,ws=%s,rate=0", ws);
		snprintf(args, sizeof(args), "--backend %s --mem %llu --workload %s",
			 backend, (unsigned long long)mem, wl);
		spawn(&s, "src", args);
		snprintf(args, sizeof(args), "--backend %s --mem %llu --postcopy "
			 "--incoming tcp:127.0.0.1:%d", backend,
			 (unsigned long long)mem, port);
		spawn(&d, "dst", args);
		wait_workload(&s, wl, mem);
		json_decref(call(&s, "migrate-set-capabilities", json_pack(
			"{s:[{s:s, s:b}, {s:s, s:b}, {s:s, s:b}]}", "capabilities",
			"capability", "postcopy-ram", "state", mode != PRECOPY_AC,
			"capability", "postcopy-preempt", "state",
			mode == PREEMPT || mode == PREEMPT_PASS1,
			"capability", "auto-converge", "state", mode == PRECOPY_AC)));
		/* After the first pass: a precopy that would converge by
		 * itself must not end first. */
		json_decref(call(&s, "migrate-set-parameters",
				 json_pack("{s:I, s:I}", "max-bandwidth", (json_int_t)cap,
					   "downtime-limit", (json_int_t)
					   (mode == PREEMPT_PASS1 ? 1 : 300))));
		snprintf(args, sizeof(args), "tcp:127.0.0.1:%d", port);
		json_decref(call(&s, "migrate", json_pack("{s:s}", "uri", args)));
		if (mode == PREEMPT_PASS1) {
			for (;;) {
				m = call(&s, "query-migrate", NULL);
				if (getd(m, "pass") >= 1) {
					json_decref(m);
					break;
				}
				json_decref(m);
				usleep(2000);
			}
		}
		if (mode != PRECOPY_AC)
			json_decref(call(&s, "migrate-start-postcopy", NULL));
		m = wait_completed(&s);
		/* The destination's own view: its faults and their latency. */
		for (;;) {
			dm = call(&d, "query-migrate", NULL);
			if (!strcmp(json_string_value(json_object_get(dm, "status")),
				    "completed"))
				break;
			json_decref(dm);
			usleep(5000);
		}
		lat = json_object_get(dm, "postcopy-latency");
		total[r] = getd(m, "total-time");
		down[r] = getd(m, "downtime-us") / 1000.0;
		pct[r] = getd(m, "postcopy-time");
		req[r] = getd(dm, "postcopy-requests");
		p50[r] = getd(lat, "p50-us");
		p99[r] = getd(lat, "p99-us");
		pmax[r] = getd(lat, "max-us");
		block[r] = getd(dm, "postcopy-blocktime");
		for (int i = 0; i < FERRY_PHASE__MAX; i++)
			ph[i][r] = getd(json_object_get(m, "downtime-phases"),
					ferry_phase_name(i));
		json_decref(m);
		json_decref(dm);
		quit(&s);
		quit(&d);
	}
	printf("%s %lluG dirty ws=%s, %s%s (%d runs)\n", backend,
	       (unsigned long long)(mem >> 30), ws, mode_names[mode],
	       cap ? ", link capped at 200 MB/s" : "", runs);
	stat3("total time", total, runs, "ms");
	stat3("downtime", down, runs, "ms");
	for (int i = 0; i < FERRY_PHASE__MAX; i++)
		stat3(ferry_phase_name(i), ph[i], runs, "ms");
	if (mode != PRECOPY_AC) {
		stat3("postcopy time", pct, runs, "ms");
		stat3("pages requested", req, runs, "");
		stat3("fault latency p50", p50, runs, "us");
		stat3("fault latency p99", p99, runs, "us");
		stat3("fault latency max", pmax, runs, "us");
		stat3("blocktime", block, runs, "ms");
	}
	fflush(stdout);
	/* stat3 sorted each array: the median is in the middle. */
	return (struct result){ total[runs / 2], down[runs / 2],
				mode != PRECOPY_AC ? p50[runs / 2] : 0 };
}

/* "fault p50 ...x the bare round trip (<= 1.5x: met|not met)" */
static void p50_verdict(double p50, double floor_us)
{
	printf("fault p50 %.2fx the bare round trip (<= 1.5x: %s)",
	       p50 / floor_us, verdict(p50 <= 1.5 * floor_us));
}

/* The targets against this run's medians. */
static void targets(struct result res[2][2][PRECOPY_AC + 1],
		    struct result capped[PRECOPY_AC + 1], double floor_us)
{
	static const char *const ws_names[2] = { "256 MiB", "all RAM" };
	const struct result *pre = &res[0][0][PREEMPT], *ac = &res[0][0][PRECOPY_AC];

	printf("targets, from this run's medians:\n");
	for (int mi = 0; mi < 2; mi++)
		for (int w = 0; w < 2; w++)
			for (int mode = POSTCOPY; mode < PRECOPY_AC; mode++) {
				struct result *r = &res[mi][w][mode];

				if (!r->total)
					continue;
				printf("  %dG dirtying %s, %s: downtime %.1f ms "
				       "(< 5: %s)", mi ? 4 : 1, ws_names[w],
				       mode_names[mode], r->down,
				       verdict(r->down < 5));
				if (mode != POSTCOPY) {
					printf(", ");
					p50_verdict(r->p50, floor_us);
				}
				printf("\n");
			}
	for (int mode = PREEMPT; mode <= PREEMPT_PASS1; mode++)
		if (capped[mode].total) {
			printf("  capped, %s: ", mode_names[mode]);
			p50_verdict(capped[mode].p50, floor_us);
			printf("\n");
		}
	if (pre->total && ac->total)
		printf("  1G dirtying 256 MiB, total time of postcopy+preempt / "
		       "precopy+auto-converge: %.2f (< 0.5: %s)\n",
		       pre->total / ac->total, verdict(pre->total < 0.5 * ac->total));
	if (capped[PREEMPT].total && capped[PRECOPY_AC].total)
		printf("  the same, link capped: %.2f\n",
		       capped[PREEMPT].total / capped[PRECOPY_AC].total);
}

int main(int argc, char **argv)
{
	static const uint64_t mems[] = { 1ull << 30, 4ull << 30 };
	static struct result res[2][2][PRECOPY_AC + 1], capped[PRECOPY_AC + 1];
	const char *backend, *only = NULL;
	int runs = 3;
	int64_t floor_ns;

	bench_start(argc, argv, "bench-postcopy", &runs, &only);
	floor_ns = ferry_pc_bare_roundtrip_ns(2000);
	if (floor_ns < 0) {
		printf("(userfaultfd unavailable: no postcopy here)\n");
		return 0;
	}
	printf("bare userfaultfd fault-to-placement round trip: %.1f us "
	       "(2000 faults, average)\n", (double)floor_ns / 1000.0);
	backend = bench_backend();
	for (size_t mi = 0; mi < 2; mi++) {
		char all[32];
		const char *wss[2] = { "256M", all };

		snprintf(all, sizeof(all), "%lluM",
			 (unsigned long long)(mems[mi] >> 20));
		for (int w = 0; w < 2; w++)
			for (int mode = POSTCOPY; mode <= PRECOPY_AC; mode++) {
				char label[96];

				snprintf(label, sizeof(label), "%lluG ws=%s %s",
					 (unsigned long long)(mems[mi] >> 30),
					 wss[w], mode_names[mode]);
				if (!only || strstr(label, only))
					res[mi][w][mode] = bench(backend, mems[mi],
						wss[w], (enum mode)mode, 0, runs);
			}
	}
	/* A link slower than the guest dirties: where postcopy matters. */
	for (int mode = POSTCOPY; mode <= PRECOPY_AC; mode++) {
		char label[96];

		snprintf(label, sizeof(label), "1G ws=256M %s capped",
			 mode_names[mode]);
		if (!only || strstr(label, only))
			capped[mode] = bench(backend, 1ull << 30, "256M",
					     (enum mode)mode, 200ull * 1000 * 1000,
					     runs);
	}
	targets(res, capped, (double)floor_ns / 1000.0);
	return bench_end();
}
