/*
 * tests/unit/testdev.h - test devices that exercise every hook:
 *   tram    iterable: pages with a dirty bitmap (a miniature RAM)
 *   tregs   vmstate: a register file with nested structs and arrays
 *   tblob   complete-in-thread: device state sent as numbered buffers
 */
#ifndef FERRY_TESTDEV_H
#define FERRY_TESTDEV_H

#include <stdbool.h>
#include <stdint.h>

#include "ferry/ferry.h"

#define TRAM_PAGE 4096u
#define TRAM_MAX_PAGES 1024u

struct tram {
	uint32_t npages;
	uint8_t *mem;                 /* npages * TRAM_PAGE */
	uint8_t dirty[TRAM_MAX_PAGES];
	/* Hook call counters, to assert the loop drove them. */
	unsigned setups, iterates, completes, cleanups, load_setups,
		 load_cleanups, loads;
	/* Test knobs. */
	int fail_iterate;             /* -errno returned by save_iterate */
	int fail_load;                /* -errno returned by load_state */
	uint32_t redirty;             /* iterate re-dirties page 0 this many
					 more times (pending stays > 0) */
};

struct tregs_inner {
	uint16_t sel;
	uint64_t base;
};

struct tregs {
	uint32_t ctrl;
	int64_t delta;
	bool enabled;
	uint8_t mac[6];
	uint32_t irq[4];
	struct tregs_inner seg[2];
	uint8_t nq;
	uint16_t queue[8];
};

struct tblob {
	uint32_t nbufs;               /* save: buffers to send */
	uint32_t bufsize;
	/* load side */
	uint32_t received;
	uint64_t sum;                 /* checksum of received content, in order */
	bool switchover_seen;
	bool order_ok;
	unsigned load_delay_us;       /* knob: each load_buffer takes this long */
	bool config_before_data;      /* load_state ran before every buffer */
};

void tram_init(struct tram *t, uint32_t npages, uint64_t seed);
void tram_free(struct tram *t);
void tram_dirty(struct tram *t, uint32_t page, uint64_t seed);

extern const struct ferry_dev_ops tram_ops;
extern const struct ferry_vmsd tregs_vmsd;
extern const struct ferry_dev_ops tblob_ops;

void tregs_fill(struct tregs *r, uint64_t seed);
uint64_t tblob_expected_sum(uint32_t nbufs, uint32_t bufsize);

/* A source context with one of each device, and a destination twin. */
struct testvm {
	struct ferry_ctx *ctx;
	struct tram ram;
	struct tregs regs;
	struct tblob blob;
};
void testvm_init(struct testvm *vm, bool source, uint64_t seed);
/* The same with a tiny geometry (3 pages, 3 small buffers): for tests that
 * load a stream thousands of times. */
void testvm_init_small(struct testvm *vm, bool source, uint64_t seed);
void testvm_free(struct testvm *vm);

/* Save @vm into a malloc'd buffer (all of it, stop-and-copy). */
uint8_t *testvm_save(struct testvm *vm, size_t *len);

#endif
