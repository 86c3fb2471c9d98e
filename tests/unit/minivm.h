/*
 * tests/unit/minivm.h - a VM without a hypervisor, for testing the
 * migration engine in one process: guest RAM written by a "vCPU" thread
 * (self-verifying pages), one vmstate device, RAM dirty tracking by the
 * writer itself, and the VMM hooks the engine needs, recording what the
 * engine asked for.
 *
 * Every page the writer touches holds (page index, generation) in its
 * first 16 bytes and a pattern derived from them in the rest, so
 * minivm_verify() can tell a page that is whole from one that is torn,
 * stale or misplaced, without knowing the source.
 */
#ifndef FERRY_TEST_MINIVM_H
#define FERRY_TEST_MINIVM_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "ferry/ferry.h"

#define MINIVM_PAGE 4096u

struct minivm_dev {
	uint64_t generation;   /* passes the writer made over its working set */
	uint64_t pages;        /* pages written */
};

struct minivm {
	uint8_t *mem;
	uint64_t size;
	struct ferry_ctx *ctx;
	struct ferry_ram *ram;
	struct ferry_mig *mig;
	struct minivm_dev dev;     /* written by the writer while it runs */

	pthread_t writer;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	/* lock */
	enum ferry_run_state state;
	bool run;                  /* the writer may write */
	bool parked;               /* the writer is not writing */
	bool quit;
	uint64_t rate;             /* bytes/s dirtied, 0 = flat out */
	uint64_t ws;               /* working set, bytes */
	unsigned throttle;         /* percent, from vm_throttle */
	uint64_t sync_delay_us;    /* each dirty sync takes this long */
	unsigned starts, stops;    /* vm_start / vm_stop calls */
	char log[64][40];          /* "out:setup", "in:completed", "pass" ... */
	unsigned nlog;
	bool both_running_seen;    /* set by a twin check, see minivm_pair */
};

/* A VM of @size bytes (multiple of 4 KiB) whose writer dirties @ws bytes
 * at @rate bytes/s (0 = flat out). A source starts running (writer on);
 * a destination starts in inmigrate. @autostart is the destination's. */
void minivm_init(struct minivm *vm, uint64_t size, uint64_t ws, uint64_t rate,
		 bool source, bool autostart);
void minivm_free(struct minivm *vm);

/* Let the writer write at least @pages more pages (it must be running). */
void minivm_wait_pages(struct minivm *vm, uint64_t pages);
/* Run the writer again (as a `cont` would). */
void minivm_cont(struct minivm *vm);
/* Stop the writer (as a `stop` would); the run state is left alone. */
void minivm_park(struct minivm *vm);
enum ferry_run_state minivm_state(struct minivm *vm);
/* Every page whole? Returns the number of bad pages. */
uint64_t minivm_verify(struct minivm *vm);
/* XXH3-64 of all memory and the device. */
uint64_t minivm_digest(struct minivm *vm);

/* Set one capability or parameter (FAILs if the engine refuses). */
void minivm_set(struct minivm *vm, const char *name, uint64_t value);
void minivm_set_str(struct minivm *vm, const char *name, const char *value);
/* Wait for a terminal status of the current migration (FAILs after
 * @timeout_ms) and return the engine's snapshot. */
struct ferry_mig_info minivm_wait(struct minivm *vm, int timeout_ms);
/* Was "@what" logged (events: "out:device", "in:failed", "pass")? */
bool minivm_logged(struct minivm *vm, const char *what);
/* Wait until the outgoing (or incoming) status is @st. */
void minivm_wait_status(struct minivm *vm, enum ferry_mig_status st,
			int timeout_ms);

/* A unix-socket URI in the test's scratch directory. */
const char *minivm_uri(const char *name);

#endif
