// SPDX-License-Identifier: MIT
/*
 * vmm/threads/backend-thread.c - the guest workload in host threads.  See
 * backend-thread.h for the API.
 *
 * The workload (guest/workload.h) is compiled here a second time, hosted,
 * with these platform hooks:
 *   idle  - sleep on the VM's condition variable for up to the requested
 *           time; a pause or stop request wakes it early;
 *   poll  - the safe point, reached between page writes and in every wait
 *           loop: park while a pause is requested, leave on stop;
 *   panic - record the message and stop this vCPU's thread.
 *
 * Pausing.  The fast path of a safe point is one relaxed atomic load of
 * `gate`, which is non-zero while a pause or stop is requested, so the
 * workload runs at full speed.  The slow path takes the lock, counts itself
 * parked, signals `parked_cond` and sleeps on `wake`.  thread_vm_pause()
 * raises the gate and waits until every live vCPU thread is parked.  A page
 * write takes about a microsecond, so the wait is short.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "threads/backend-thread.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "guest/workload.h"

/*
 * ThreadSanitizer.  Guest RAM is shared between vCPU threads and the VMM
 * the way a real VM's is: by plain memory accesses, ordered by the
 * layout.h protocol, not by locks or atomics.  To TSan that is a stream of
 * races, so under TSan a vCPU thread's accesses are ignored while it runs
 * guest code (as KVM guest accesses are invisible to it), and tracked again
 * inside the platform hooks, where it touches VMM state.
 */
#ifdef __SANITIZE_THREAD__
void AnnotateIgnoreReadsBegin(const char *file, int line);
void AnnotateIgnoreReadsEnd(const char *file, int line);
void AnnotateIgnoreWritesBegin(const char *file, int line);
void AnnotateIgnoreWritesEnd(const char *file, int line);
#define guest_code_begin()						\
	do {								\
		AnnotateIgnoreReadsBegin(__FILE__, __LINE__);		\
		AnnotateIgnoreWritesBegin(__FILE__, __LINE__);		\
	} while (0)
#define guest_code_end()						\
	do {								\
		AnnotateIgnoreWritesEnd(__FILE__, __LINE__);		\
		AnnotateIgnoreReadsEnd(__FILE__, __LINE__);		\
	} while (0)
#else
#define guest_code_begin()	do { } while (0)
#define guest_code_end()	do { } while (0)
#endif

struct thread_vm;

/* One vCPU.  Immutable after creation except ctx, owned by its thread. */
struct thread_vcpu {
	struct thread_vm *vm;
	unsigned index;
	pthread_t thread;
	bool created;		/* thread exists (controlling thread's view) */
	struct wl_ctx ctx;	/* owned by the vCPU thread */
};

struct thread_vm {
	/* Immutable after thread_vm_create(). */
	uint8_t *ram;
	uint64_t ram_size;
	unsigned nvcpus;

	/* Read lock-free by vCPU threads; written under lock. */
	int gate;		/* pause_req || stop_req */

	pthread_mutex_t lock;
	pthread_cond_t wake;	/* vCPU threads wait here (idle, parked) */
	pthread_cond_t parked_cond;	/* the controller waits here */
	/* Under lock. */
	bool started;
	bool pause_req;
	bool stop_req;
	unsigned live;		/* vCPU threads that have not exited */
	unsigned parked;	/* of those, parked at a safe point */
	bool panicked;
	char panic_msg[160];

	struct thread_vcpu vcpus[GUEST_MAX_VCPUS];
};

/* ---- workload.h platform hooks ---------------------------------------- */

static void timespec_add_us(struct timespec *ts, uint32_t us)
{
	ts->tv_nsec += (long)us * 1000L;
	while (ts->tv_nsec >= 1000000000L) {
		ts->tv_nsec -= 1000000000L;
		ts->tv_sec++;
	}
}

static void wl_plat_idle(struct wl_ctx *c, uint32_t us)
{
	struct thread_vcpu *v = c->plat;
	struct thread_vm *t = v->vm;
	struct timespec deadline;

	guest_code_end();
	if (us > GUEST_IDLE_MAX_US)
		us = GUEST_IDLE_MAX_US;
	clock_gettime(CLOCK_MONOTONIC, &deadline);
	timespec_add_us(&deadline, us);
	pthread_mutex_lock(&t->lock);
	/* A spurious or early wake-up only shortens the nap: callers loop. */
	if (!t->pause_req && !t->stop_req)
		pthread_cond_timedwait(&t->wake, &t->lock, &deadline);
	pthread_mutex_unlock(&t->lock);
	guest_code_begin();
}

static void wl_plat_poll(struct wl_ctx *c)
{
	struct thread_vcpu *v = c->plat;
	struct thread_vm *t = v->vm;

	if (__builtin_expect(!__atomic_load_n(&t->gate, __ATOMIC_RELAXED), 1))
		return;

	guest_code_end();
	pthread_mutex_lock(&t->lock);
	if (t->pause_req && !t->stop_req) {
		t->parked++;
		pthread_cond_broadcast(&t->parked_cond);
		while (t->pause_req && !t->stop_req)
			pthread_cond_wait(&t->wake, &t->lock);
		t->parked--;
	}
	if (t->stop_req)
		c->stop = 1;
	pthread_mutex_unlock(&t->lock);
	guest_code_begin();
}

/* The VM panics with the message @fmt makes; the first panic stays. */
static void record_panic(struct thread_vm *t, const char *fmt, ...)
	FERRY_PRINTF(2, 3);

static void record_panic(struct thread_vm *t, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&t->lock);
	if (!t->panicked) {
		t->panicked = true;
		va_start(ap, fmt);
		vsnprintf(t->panic_msg, sizeof(t->panic_msg), fmt, ap);
		va_end(ap);
	}
	pthread_mutex_unlock(&t->lock);
}

static void wl_plat_panic(struct wl_ctx *c, uint32_t code)
{
	struct thread_vcpu *v = c->plat;
	struct thread_vm *t = v->vm;

	char msg[sizeof(c->status->panic_msg) + 1];

	/* panic_msg is guest memory: copy it (bounded) as guest code. */
	memcpy(msg, c->status->panic_msg, sizeof(msg) - 1);
	msg[sizeof(msg) - 1] = 0;
	guest_code_end();
	record_panic(t, "guest panic %u on vCPU %u: %s", code, v->index, msg);
	guest_code_begin();
	c->stop = 1;
}

/* ---- vCPU threads ------------------------------------------------------- */

static void *vcpu_main(void *arg)
{
	struct thread_vcpu *v = arg;
	struct thread_vm *t = v->vm;
	const struct guest_cmd *cmd =
		(const struct guest_cmd *)(t->ram + GUEST_CMD_GPA);
	uint64_t dp;
	bool run;

	/* Created with the VM, run from thread_vm_start (see there). */
	pthread_mutex_lock(&t->lock);
	while (!t->started && !t->stop_req)
		pthread_cond_wait(&t->wake, &t->lock);
	run = t->started;       /* counted in live: must uncount itself */
	pthread_mutex_unlock(&t->lock);
	if (!run)
		return NULL;

	wl_ctx_init(&v->ctx, (uintptr_t)t->ram, v->index, v);
	guest_code_begin();
	/*
	 * In the thread backend a page index is a host address: the guest's
	 * own range check (data_pages <= gen[] entries) is not enough, the
	 * data area must also fit in this mapping. Checked here, by the vCPU,
	 * and not in thread_vm_start: the command block is guest memory, and
	 * on a postcopy destination reading it may wait for the page to come
	 * from the source - 3-4 ms measured, which the VM's start (the end of
	 * the downtime, vm->lock held) must not wait for; a vCPU may.
	 */
	dp = WL_READ_ONCE(cmd->data_pages);
	if (dp <= GUEST_DATA_PAGES(t->ram_size)) {
		wl_run(&v->ctx);	/* returns on stop or panic */
		guest_code_end();
	} else {
		/* Caught by the host, as KVM would report an internal error. */
		guest_code_end();
		record_panic(t, "vCPU %u: command block asks for %llu data "
			     "pages, RAM holds %llu", v->index,
			     (unsigned long long)dp,
			     (unsigned long long)GUEST_DATA_PAGES(t->ram_size));
	}

	pthread_mutex_lock(&t->lock);
	t->live--;
	/* A pause may be waiting for this thread to park: it never will. */
	pthread_cond_broadcast(&t->parked_cond);
	pthread_mutex_unlock(&t->lock);
	return NULL;
}

/* Under lock: raise or lower the gate to match the requests. */
static void update_gate_locked(struct thread_vm *t)
{
	__atomic_store_n(&t->gate, t->pause_req || t->stop_req,
			 __ATOMIC_RELAXED);
	pthread_cond_broadcast(&t->wake);
}

static int check_ram(uint8_t *ram, uint64_t ram_size, struct ferry_error *err)
{
	if (!ram || ((uintptr_t)ram | ram_size) & (GUEST_PAGE_SIZE - 1))
		return ferry_error_set(err, -EINVAL, "guest RAM %p+%#llx not "
				       "page aligned", (void *)ram,
				       (unsigned long long)ram_size);
	if (ram_size < GUEST_MIN_RAM || ram_size > GUEST_MAX_RAM)
		return ferry_error_set(err, -EINVAL, "guest RAM of %llu MiB "
				       "outside %llu MiB..%llu GiB",
				       (unsigned long long)(ram_size >> 20),
				       (unsigned long long)(GUEST_MIN_RAM >> 20),
				       (unsigned long long)(GUEST_MAX_RAM >> 30));
	return 0;
}

/* Stop and join every created vCPU thread. */
static void stop_all(struct thread_vm *t)
{
	unsigned i;

	pthread_mutex_lock(&t->lock);
	t->stop_req = true;
	update_gate_locked(t);
	pthread_mutex_unlock(&t->lock);
	for (i = 0; i < t->nvcpus; i++) {
		if (t->vcpus[i].created)
			pthread_join(t->vcpus[i].thread, NULL);
		t->vcpus[i].created = false;
	}
}

/*
 * The vCPU threads, waiting for thread_vm_start. Created with the VM and
 * not at its start: on a postcopy destination the start ends the downtime,
 * and creating a thread there took 0.2-2 ms (its stack's mmap waits for
 * mmap_lock, which the threads placing pages hold).
 */
static int spawn_all(struct thread_vm *t, struct ferry_error *err)
{
	sigset_t all, old;
	unsigned i;
	int r = 0;

	/* vCPU threads take no signals: they belong to the VMM's threads. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	for (i = 0; i < t->nvcpus; i++) {
		struct thread_vcpu *v = &t->vcpus[i];

		r = pthread_create(&v->thread, NULL, vcpu_main, v);
		if (r) {
			r = ferry_error_set(err, -r, "vCPU %u thread: %s", i,
					    strerror(r));
			break;
		}
		v->created = true;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return r;
}

int thread_vm_create(struct thread_vm **out, uint8_t *ram, uint64_t ram_size,
		     unsigned nvcpus, struct ferry_error *err)
{
	pthread_condattr_t ca;
	struct thread_vm *t;
	unsigned i;
	int r;

	*out = NULL;
	r = check_ram(ram, ram_size, err);
	if (r)
		return r;
	if (nvcpus < 1 || nvcpus > GUEST_MAX_VCPUS)
		return ferry_error_set(err, -EINVAL, "%u vCPUs: the guest "
				       "layout has room for 1..%d", nvcpus,
				       GUEST_MAX_VCPUS);
	t = calloc(1, sizeof(*t));
	if (!t)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	t->ram = ram;
	t->ram_size = ram_size;
	t->nvcpus = nvcpus;
	for (i = 0; i < nvcpus; i++) {
		t->vcpus[i].vm = t;
		t->vcpus[i].index = i;
	}

	pthread_mutex_init(&t->lock, NULL);
	/* Idle naps use absolute CLOCK_MONOTONIC deadlines. */
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&t->wake, &ca);
	pthread_condattr_destroy(&ca);
	pthread_cond_init(&t->parked_cond, NULL);
	r = spawn_all(t, err);
	if (r) {
		thread_vm_destroy(t);
		return r;
	}
	*out = t;
	return 0;
}

int thread_vm_start(struct thread_vm *t, struct ferry_error *err)
{
	unsigned i;

	pthread_mutex_lock(&t->lock);
	if (t->started || t->stop_req) {
		pthread_mutex_unlock(&t->lock);
		return ferry_error_set(err, -EBUSY, "thread VM already %s",
				       t->started ? "started" : "stopped");
	}
	/* The threads exist (spawn_all): let them go. The command block's
	 * data_pages is checked by each of them (vcpu_main), not here: see
	 * there. */
	t->started = true;
	for (i = 0; i < t->nvcpus; i++)
		t->live += t->vcpus[i].created;
	update_gate_locked(t);
	pthread_mutex_unlock(&t->lock);
	return 0;
}

int thread_vm_pause(struct thread_vm *t, struct ferry_error *err)
{
	(void)err;
	pthread_mutex_lock(&t->lock);
	t->pause_req = true;
	update_gate_locked(t);
	while (t->parked < t->live)
		pthread_cond_wait(&t->parked_cond, &t->lock);
	pthread_mutex_unlock(&t->lock);
	return 0;
}

void thread_vm_resume(struct thread_vm *t)
{
	pthread_mutex_lock(&t->lock);
	t->pause_req = false;
	update_gate_locked(t);
	pthread_mutex_unlock(&t->lock);
}

void thread_vm_destroy(struct thread_vm *t)
{
	if (!t)
		return;
	stop_all(t);
	pthread_cond_destroy(&t->parked_cond);
	pthread_cond_destroy(&t->wake);
	pthread_mutex_destroy(&t->lock);
	free(t);
}

bool thread_vm_panicked(struct thread_vm *t, char *msg, size_t len)
{
	bool p;

	pthread_mutex_lock(&t->lock);
	p = t->panicked;
	if (p && msg && len)
		snprintf(msg, len, "%s", t->panic_msg);
	pthread_mutex_unlock(&t->lock);
	return p;
}

/* ---- guest set-up shared with the KVM backend -------------------------- */

int guest_cmd_fill(uint8_t *ram, uint64_t ram_size, uint64_t tsc_hz,
		   struct ferry_error *err)
{
	struct guest_cmd *cmd = (struct guest_cmd *)(ram + GUEST_CMD_GPA);
	int r = check_ram(ram, ram_size, err);

	if (r)
		return r;
	cmd->version = GUEST_LAYOUT_VERSION;
	cmd->data_pages = GUEST_DATA_PAGES(ram_size);
	WL_WRITE_ONCE(cmd->tsc_hz, tsc_hz);
	wl_barrier();
	cmd->magic = GUEST_CMD_MAGIC;
	return 0;
}

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/*
 * Read the clock and the TSC as close together as we can: retry while a
 * preemption or interrupt stretched the pair.
 */
static void clock_tsc_pair(uint64_t *ns, uint64_t *tsc)
{
	uint64_t best = UINT64_MAX;
	int i;

	for (i = 0; i < 5; i++) {
		uint64_t t0 = wl_rdtsc(), n = mono_ns(), t1 = wl_rdtsc();

		if (t1 - t0 < best) {
			best = t1 - t0;
			*ns = n;
			*tsc = t0 + (t1 - t0) / 2;
		}
	}
}

uint64_t host_tsc_hz(void)
{
	struct timespec nap = { 0, 10 * 1000 * 1000 };
	uint64_t n0, c0, n1, c1;

	clock_tsc_pair(&n0, &c0);
	while (nanosleep(&nap, &nap) < 0 && errno == EINTR)
		;
	clock_tsc_pair(&n1, &c1);
	if (n1 <= n0)
		return 0;
	return (uint64_t)((unsigned __int128)(c1 - c0) * 1000000000ULL /
			  (n1 - n0) + 500) / 1000 * 1000;
}
