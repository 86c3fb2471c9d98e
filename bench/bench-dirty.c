/*
 * bench/bench-dirty.c - dirty tracking on the reference VMM: how long one
 * dirty-log collection takes and what write rate the guest achieves under
 * tracking, for 1 GiB and 4 GiB guests, on KVM (if usable) and on the
 * thread backend. The guest rewrites all of its data area, random order,
 * flat out. Each figure is min/median/max over the collections.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vm/vm-internal.h"

#define SYNCS 10
#define INTERVAL_MS 200

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static void print3(const char *what, const char *unit, double *v, int n)
{
	qsort(v, (size_t)n, sizeof(double), cmp);
	printf("%-44s min %9.2f median %9.2f max %9.2f %s\n", what, v[0],
	       v[n / 2], v[n - 1], unit);
}

/* "kvm 1G: what" (one static buffer: one use per printf). */
static const char *test_label(const char *who, const char *what)
{
	static char buf[160];
	snprintf(buf, sizeof(buf), "%s: %s", who, what);
	return buf;
}

static uint64_t gen(struct vm *vm)
{
	struct vm_guest_info gi;
	vm_guest_info(vm, &gi);
	return gi.generation;
}

static int run(enum vm_backend_kind be, uint64_t mem)
{
	struct vm_config cfg = {
		.mem = mem, .vcpus = 1, .backend = be, .ndevices = 0,
		.workload = { .kind = GUEST_WORK_DIRTY,
			      .pattern = GUEST_PATTERN_RANDOM },
	};
	struct ferry_error err = { 0 };
	double sync_ms[SYNCS], rate[SYNCS], pages[SYNCS], untracked;
	uint64_t words = (mem / 4096 + 63) / 64, g0, g1, t0, t1;
	uint64_t *bm = calloc(words, 8);
	struct vm *vm;
	char label[128];

	vm = vm_create(&cfg, &err);
	if (!vm || vm_start(vm, &err)) {
		fprintf(stderr, "bench-dirty: %s\n", err.msg);
		return 1;
	}
	/* Let the guest touch its memory once, then measure it untracked. */
	sleep(mem > (1ull << 30) ? 6 : 2);
	g0 = gen(vm);
	t0 = now_ns();
	usleep(500000);
	g1 = gen(vm);
	t1 = now_ns();
	untracked = (double)(g1 - g0) * 4096 / 1048576 / ((double)(t1 - t0) / 1e9);

	if (vm->be->dirty_start(vm->be_priv, &err)) {
		fprintf(stderr, "bench-dirty: %s\n", err.msg);
		return 1;
	}
	vm->be->dirty_sync(vm->be_priv, bm, false, &err);
	for (int i = 0; i < SYNCS; i++) {
		uint64_t n = 0, ts, te, gb, ge;

		memset(bm, 0, words * 8);
		gb = gen(vm);
		usleep(INTERVAL_MS * 1000);
		ts = now_ns();
		if (vm->be->dirty_sync(vm->be_priv, bm, false, &err)) {
			fprintf(stderr, "bench-dirty: %s\n", err.msg);
			return 1;
		}
		te = now_ns();
		ge = gen(vm);
		for (uint64_t w = 0; w < words; w++)
			n += (uint64_t)__builtin_popcountll(bm[w]);
		sync_ms[i] = (double)(te - ts) / 1e6;
		pages[i] = (double)n;
		rate[i] = (double)(ge - gb) * 4096 / 1048576 /
			  ((double)(te - ts + INTERVAL_MS * 1000000ull) / 1e9);
	}
	vm->be->dirty_stop(vm->be_priv);
	snprintf(label, sizeof(label), "%s %lluG", vm->be->name,
		 (unsigned long long)(mem >> 30));
	printf("%-44s %9.0f MiB/s\n", test_label(label, "write rate untracked"),
	       untracked);
	print3(test_label(label, "dirty-log collection"), "ms", sync_ms, SYNCS);
	print3(test_label(label, "pages dirty per collection"), "pages", pages, SYNCS);
	print3(test_label(label, "write rate under tracking"), "MiB/s", rate, SYNCS);
	fflush(stdout);
	vm_stop(vm, NULL);
	vm_destroy(vm);
	free(bm);
	return 0;
}

int main(int argc, char **argv)
{
	static const uint64_t sizes[] = { 1ull << 30, 4ull << 30 };
	char why[300];
	int r = 0;

	(void)argc;
	(void)argv;
	for (size_t i = 0; i < 2; i++) {
		if (backend_kvm_usable(why, sizeof(why)))
			r |= run(VM_BACKEND_KVM, sizes[i]);
		else
			printf("kvm: skipped (%s)\n", why);
		r |= run(VM_BACKEND_THREAD, sizes[i]);
	}
	return r;
}
