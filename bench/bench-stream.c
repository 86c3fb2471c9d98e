/*
 * bench/bench-stream.c - throughput of the stream layer alone: save a
 * 256 MiB iterable device into memory, then load it back, 5 runs each;
 * prints min/median/max in GB/s. This is the ceiling the record layer
 * (copy into the section body + XXH3 check) puts on a migration.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ferry/ferry.h"

#define PAGE 4096u
#define NPAGES (65536u)          /* 256 MiB */
#define RUNS 5

struct bram {
	uint8_t *mem;
	uint32_t next;           /* next page to send */
	uint32_t loaded;
};

static void pend(void *o, bool exact, uint64_t *m, uint64_t *c)
{
	struct bram *b = o;
	(void)exact;
	*m = (uint64_t)(NPAGES - b->next) * PAGE;
	*c = 0;
}

static int setup(struct ferry_chan *c, void *o, struct ferry_error *e)
{
	(void)o; (void)e;
	ferry_put_be32(c, NPAGES);
	return 0;
}

static int iter(struct ferry_chan *c, void *o, uint64_t budget, struct ferry_error *e)
{
	struct bram *b = o;
	uint64_t sent = 0;
	(void)e;
	while (b->next < NPAGES && (!budget || sent < budget)) {
		ferry_put_be32(c, b->next);
		ferry_put_buf(c, b->mem + (size_t)b->next * PAGE, PAGE);
		b->next++;
		sent += PAGE;
	}
	ferry_put_be32(c, ~0u);
	return 0;
}

static int complete(struct ferry_chan *c, void *o, struct ferry_error *e)
{
	return iter(c, o, 0, e);
}

static int load(struct ferry_chan *c, void *o, uint32_t v, struct ferry_error *e)
{
	struct bram *b = o;
	(void)v;
	if (!b->loaded++) {
		ferry_get_be32(c);
		return ferry_chan_error(c, e);
	}
	for (;;) {
		uint32_t pg = ferry_get_be32(c);
		if (ferry_chan_error(c, e) || pg == ~0u)
			return ferry_chan_error(c, e);
		if (pg >= NPAGES)
			return ferry_error_set(e, -34, "bad page");
		ferry_get_buf(c, b->mem + (size_t)pg * PAGE, PAGE);
	}
}

static const struct ferry_dev_ops ops = {
	.size = sizeof(struct ferry_dev_ops),
	.save_setup = setup, .save_pending = pend, .save_iterate = iter,
	.save_complete = complete, .load_state = load,
};

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

int main(void)
{
	double save[RUNS], loadt[RUNS], gb = (double)NPAGES * PAGE / 1e9;
	struct bram src = { 0 }, dst = { 0 };

	src.mem = malloc((size_t)NPAGES * PAGE);
	dst.mem = malloc((size_t)NPAGES * PAGE);
	for (size_t i = 0; i < (size_t)NPAGES * PAGE; i += 8)
		*(uint64_t *)(src.mem + i) = i * 0x9e3779b97f4a7c15ull;
	memset(dst.mem, 0, (size_t)NPAGES * PAGE);
	for (int r = 0; r < RUNS; r++) {
		struct ferry_error err = { 0 };
		struct ferry_ctx *a = ferry_ctx_new(NULL), *b = ferry_ctx_new(NULL);
		struct ferry_chan *w = ferry_chan_new_mem_writer(0), *rd;
		const uint8_t *d;
		size_t n;
		double t0;

		src.next = 0;
		dst.loaded = 0;
		ferry_register(a, "ram", 0, 1, 1, &ops, &src, NULL);
		ferry_register(b, "ram", 0, 1, 1, &ops, &dst, NULL);
		t0 = now();
		if (ferry_save_all(a, w, 0, &err)) {
			fprintf(stderr, "save: %s\n", err.msg);
			return 1;
		}
		save[r] = now() - t0;
		d = ferry_chan_mem_data(w, &n);
		rd = ferry_chan_new_mem_reader(d, n);
		t0 = now();
		if (ferry_load(b, rd, NULL, &err)) {
			fprintf(stderr, "load: %s\n", err.msg);
			return 1;
		}
		loadt[r] = now() - t0;
		if (memcmp(src.mem, dst.mem, (size_t)NPAGES * PAGE)) {
			fprintf(stderr, "mismatch\n");
			return 1;
		}
		ferry_chan_free(rd);
		ferry_chan_free(w);
		ferry_ctx_free(a);
		ferry_ctx_free(b);
	}
	qsort(save, RUNS, sizeof(double), cmp);
	qsort(loadt, RUNS, sizeof(double), cmp);
	printf("stream_save_256MiB_GBps min %.2f median %.2f max %.2f\n",
	       gb / save[RUNS - 1], gb / save[RUNS / 2], gb / save[0]);
	printf("stream_load_256MiB_GBps min %.2f median %.2f max %.2f\n",
	       gb / loadt[RUNS - 1], gb / loadt[RUNS / 2], gb / loadt[0]);
	free(src.mem);
	free(dst.mem);
	return 0;
}
