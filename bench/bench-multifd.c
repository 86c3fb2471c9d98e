/*
 * bench/bench-multifd.c - RAM migration throughput over loopback TCP:
 * the main stream alone, then multifd with 1/2/4 channels, without and
 * with zstd, each into fresh destination memory without and with
 * pre-population. 1 GiB of fill-like data (half the pages random, half
 * compressible text-like words); prints GB/s of guest RAM moved, from
 * ferry_save_all() on the source to the end of ferry_load() on the
 * destination.
 *
 * Usage: bench-multifd [MiB]   (default 1024)
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "ferry/ferry.h"
#include "ferry/multifd.h"

#define PAGE 4096u

static uint64_t npages;

static int all_populated(void *o, unsigned b, uint64_t *bm,
			 struct ferry_error *e)
{
	(void)o; (void)b; (void)e;
	for (uint64_t p = 0; p < npages; p++)
		bm[p / 64] |= 1ull << (p % 64);
	return 0;
}

/* No dirty tracking (a paused VM); the populated hook feeds the ranges. */
static const struct ferry_ram_dirty_ops src_ops = {
	.size = sizeof(struct ferry_ram_dirty_ops), .populated = all_populated,
};

static void fill(uint8_t *mem)
{
	static const char *words[] = { "ferry ", "migrates ", "guest ", "pages ",
				       "over ", "parallel ", "channels ", "\n" };
	uint64_t x = 0x9e3779b97f4a7c15ull;

	for (uint64_t p = 0; p < npages; p++) {
		uint8_t *pg = mem + p * PAGE;

		if (p % 2) {
			for (unsigned i = 0; i < PAGE; i += 8) {
				x ^= x << 13;
				x ^= x >> 7;
				x ^= x << 17;
				memcpy(pg + i, &x, 8);
			}
		} else {
			unsigned i = 0;
			while (i < PAGE) {
				const char *w = words[(x = x * 6364136223846793005ull + p) >> 61];
				size_t l = strlen(w);
				if (l > PAGE - i)
					l = PAGE - i;
				memcpy(pg + i, w, l);
				i += (unsigned)l;
			}
		}
	}
}

struct dst {
	uint8_t *mem;
	int main_fd;
	int fds[FERRY_MULTIFD_MAX_CHANNELS];
	unsigned channels;
	unsigned prepop;
	int ret;
	struct ferry_error err;
	uint64_t prepopulated;
};

static void *dst_main(void *arg)
{
	struct dst *d = arg;
	struct ferry_ram_block blk = { "ram0", d->mem, npages * PAGE, PAGE };
	struct ferry_ram *ram = ferry_ram_new(&blk, 1, NULL, NULL, &d->err);
	struct ferry_ctx *ctx = ferry_ctx_new(&d->err);
	struct ferry_multifd *mf = NULL;
	struct ferry_chan *in;
	struct ferry_ram_stats st;

	if (!ram || !ctx || ferry_ram_register(ram, ctx, &d->err)) {
		d->ret = -1;
		return NULL;
	}
	ferry_ram_set_prepopulate(ram, d->prepop);
	if (d->channels) {
		struct ferry_multifd_params p = { .size = sizeof(p), .channels = d->channels };

		mf = ferry_multifd_recv_new(&p, &d->err);
		if (!mf || ferry_ram_set_multifd_recv(ram, mf, &d->err)) {
			d->ret = -1;
			return NULL;
		}
		for (unsigned i = 0; i < d->channels; i++)
			if (ferry_multifd_recv_add_channel(mf, d->fds[i], &d->err)) {
				d->ret = -1;
				return NULL;
			}
	}
	in = ferry_chan_new_fd(d->main_fd, FERRY_CHAN_READ, true);
	d->ret = ferry_load(ctx, in, NULL, &d->err);
	ferry_ram_get_stats(ram, &st);
	d->prepopulated = st.prepopulated;
	ferry_chan_free(in);
	ferry_multifd_free(mf);
	ferry_ctx_free(ctx);
	ferry_ram_free(ram);
	return NULL;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int run(uint8_t *src, unsigned channels, enum ferry_multifd_compression comp,
	       unsigned prepop)
{
	struct ferry_error err = { 0 };
	struct ferry_listener *l = ferry_transport_listen("tcp:127.0.0.1:0", &err);
	struct ferry_ram_block blk = { "ram0", src, npages * PAGE, PAGE };
	struct ferry_multifd_params p = { .size = sizeof(p), .channels = channels, .compression = comp };
	struct ferry_multifd_stats ms = { 0 };
	int sfds[FERRY_MULTIFD_MAX_CHANNELS], mainfd;
	struct ferry_multifd *mf = NULL;
	struct dst d = { .channels = channels, .prepop = prepop };
	struct ferry_ram *ram;
	struct ferry_ctx *ctx;
	struct ferry_chan *out;
	pthread_t t;
	double t0, t1;
	uint64_t wire = 0;
	int r;

	if (!l)
		goto fail;
	mainfd = ferry_transport_connect(ferry_listener_uri(l), 5000, &err);
	d.main_fd = ferry_listener_accept(l, 5000, &err);
	for (unsigned i = 0; i < channels; i++) {
		sfds[i] = ferry_transport_connect(ferry_listener_uri(l), 5000, &err);
		d.fds[i] = ferry_listener_accept(l, 5000, &err);
	}
	ferry_listener_close(l);
	if (err.code)
		goto fail;
	/* Fresh, uncommitted destination memory every run. */
	d.mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (d.mem == MAP_FAILED)
		return -1;
	ram = ferry_ram_new(&blk, 1, &src_ops, NULL, &err);
	ctx = ferry_ctx_new(&err);
	if (!ram || !ctx || ferry_ram_register(ram, ctx, &err))
		goto fail;
	if (channels) {
		mf = ferry_multifd_send_new(&p, sfds, &err);
		if (!mf || ferry_ram_set_multifd_send(ram, mf, &err))
			goto fail;
	}
	out = ferry_chan_new_fd(mainfd, FERRY_CHAN_WRITE, true);
	t0 = now();
	pthread_create(&t, NULL, dst_main, &d);
	r = ferry_save_all(ctx, out, 0, &err);
	ferry_chan_free(out);
	pthread_join(t, NULL);
	t1 = now();
	if (r || d.ret) {
		fprintf(stderr, "bench-multifd: %s%s\n", err.msg, d.err.msg);
		return -1;
	}
	if (mf) {
		ferry_multifd_get_stats(mf, &ms);
		for (unsigned i = 0; i < channels; i++)
			wire += ms.chan[i].bytes;
	}
	if (memcmp(d.mem, src, npages * PAGE)) {
		fprintf(stderr, "bench-multifd: destination differs!\n");
		return -1;
	}
	printf("%-8s ch=%u %-4s prepop=%-3s  %5.2f GB/s",
	       channels ? "multifd" : "main", channels,
	       comp == FERRY_MULTIFD_COMP_ZSTD ? "zstd" : "none",
	       prepop ? "on" : "off", npages * PAGE / (t1 - t0) / 1e9);
	if (mf)
		printf("  (wire %.0f%% of raw)", 100.0 * (double)wire /
		       (double)(npages * PAGE));
	if (prepop)
		printf("  prepopulated %llu MiB",
		       (unsigned long long)(d.prepopulated >> 20));
	printf("\n");
	fflush(stdout);
	munmap(d.mem, npages * PAGE);
	ferry_multifd_free(mf);
	ferry_ctx_free(ctx);
	ferry_ram_free(ram);
	return 0;
fail:
	fprintf(stderr, "bench-multifd: setup: %s\n", err.msg);
	return -1;
}

int main(int argc, char **argv)
{
	uint64_t mib = argc > 1 ? strtoull(argv[1], NULL, 0) : 1024;
	static const unsigned chans[] = { 1, 2, 4 };
	uint8_t *src;

	npages = mib * 256;
	src = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (src == MAP_FAILED || !npages)
		return 1;
	fill(src);
	printf("%llu MiB, half random / half text-like pages, loopback TCP\n",
	       (unsigned long long)mib);
	for (unsigned pp = 0; pp < 2; pp++)
		if (run(src, 0, FERRY_MULTIFD_COMP_NONE, pp ? 2 : 0))
			return 1;
	for (unsigned c = 0; c < 3; c++)
		for (unsigned z = 0; z < 2; z++)
			for (unsigned pp = 0; pp < 2; pp++)
				if (run(src, chans[c], z ? FERRY_MULTIFD_COMP_ZSTD
							 : FERRY_MULTIFD_COMP_NONE,
					pp ? 2 : 0))
					return 1;
	return 0;
}
