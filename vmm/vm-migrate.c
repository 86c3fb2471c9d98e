/*
 * vmm/vm-migrate.c - outgoing migration of the reference VM.
 *
 * One migration thread per migration: precopy rounds while the guest runs,
 * then the switchover under vm->lock (pause, final state, EOF). A failure at
 * any point before the stream is complete resumes the guest if it was
 * running, so the source carries on exactly as before; the destination
 * (or the half-written file) is simply abandoned.
 *
 * Status transitions are checked against a table and published with a
 * MIGRATION event; the terminal status is published only after the stream
 * is closed and cleanup has run.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "control.h"
#include "vm-internal.h"

/* Precopy policy until the convergence work (issue 4): rounds of at most
 * ROUND_BUDGET bytes per section, switch over once less than
 * SWITCHOVER_BYTES remain or after MAX_ROUNDS passes. */
#define ROUND_BUDGET (16ull << 20)
#define SWITCHOVER_BYTES (32ull << 20)
#define MAX_ROUNDS 20

static const char *const mig_names[MIG__MAX] = {
	[MIG_NONE] = "none", [MIG_SETUP] = "setup", [MIG_ACTIVE] = "active",
	[MIG_DEVICE] = "device", [MIG_COMPLETED] = "completed",
	[MIG_FAILED] = "failed", [MIG_CANCELLING] = "cancelling",
	[MIG_CANCELLED] = "cancelled",
};

#define B(s) (1u << (s))
static const unsigned mig_allowed[MIG__MAX] = {
	[MIG_NONE] = B(MIG_SETUP),
	[MIG_SETUP] = B(MIG_ACTIVE) | B(MIG_FAILED) | B(MIG_CANCELLING),
	[MIG_ACTIVE] = B(MIG_DEVICE) | B(MIG_FAILED) | B(MIG_CANCELLING),
	[MIG_DEVICE] = B(MIG_COMPLETED) | B(MIG_FAILED) | B(MIG_CANCELLING),
	[MIG_CANCELLING] = B(MIG_CANCELLED) | B(MIG_FAILED),
	/* Terminal states may start over with a new migration. */
	[MIG_COMPLETED] = B(MIG_SETUP),
	[MIG_FAILED] = B(MIG_SETUP),
	[MIG_CANCELLED] = B(MIG_SETUP),
};
#undef B

const char *mig_status_name(enum mig_status s)
{
	return s < MIG__MAX ? mig_names[s] : "unknown";
}

uint64_t vm_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Caller holds mig_lock. */
static void set_mig_status_locked(struct vm *vm, enum mig_status to)
{
	enum mig_status from = vm->mig_status;

	if (!(mig_allowed[from] & (1u << to))) {
		fprintf(stderr, "ferry vm: invalid migration transition %s -> %s\n",
			mig_status_name(from), mig_status_name(to));
		abort();
	}
	vm->mig_status = to;
	if (to == MIG_COMPLETED || to == MIG_FAILED || to == MIG_CANCELLED)
		vm->mig_end_ns = vm_now_ns();
	vm_trace(vm, "migration %s -> %s", mig_status_name(from),
		 mig_status_name(to));
	if (vm->control) {
		json_t *d = json_pack("{s:s}", "status", mig_status_name(to));
		control_event(vm->control, "MIGRATION", d); /* takes d */
	}
}

/*
 * Move the migration forward unless it was cancelled. A cancel and the
 * migration thread meet here, under mig_lock: either the cancel came first
 * (we refuse to advance and the thread winds down) or the step happened
 * first (and a cancel during DEVICE is refused by vm_migrate_cancel).
 */
static bool mig_advance(struct vm *vm, enum mig_status to)
{
	bool ok;

	pthread_mutex_lock(&vm->mig_lock);
	ok = !vm->mig_cancel;
	if (ok)
		set_mig_status_locked(vm, to);
	pthread_mutex_unlock(&vm->mig_lock);
	return ok;
}

int vm_migrate_cancel(struct vm *vm, struct ferry_error *err)
{
	int r = 0;

	pthread_mutex_lock(&vm->mig_lock);
	switch (vm->mig_status) {
	case MIG_SETUP:
	case MIG_ACTIVE:
		vm->mig_cancel = true;
		set_mig_status_locked(vm, MIG_CANCELLING);
		break;
	case MIG_DEVICE:
		r = ferry_error_set(err, -EBUSY,
			"the migration is switching over and cannot be cancelled");
		break;
	default:
		break; /* nothing to cancel: like QEMU, not an error */
	}
	pthread_mutex_unlock(&vm->mig_lock);
	return r;
}

static void *migration_thread(void *arg)
{
	struct vm *vm = arg;
	struct ferry_error err = { 0 };
	struct ferry_save *s = NULL;
	struct ferry_chan *c = NULL;
	enum vm_run_state before = VM_RUNNING;
	bool paused = false;
	uint64_t must, can, t0;
	int fd, r = 0;

	fd = ferry_transport_connect(vm->mig_uri, 10000, &err);
	if (fd < 0) {
		r = fd;
		goto out;
	}
	c = ferry_chan_new_fd(fd, FERRY_CHAN_WRITE, true);
	if (!c) {
		close(fd);
		r = ferry_error_set(&err, -ENOMEM, "out of memory");
		goto out;
	}
	t0 = vm_now_ns();
	s = ferry_save_begin(vm->ctx, c, &err);
	if (!s) {
		r = err.code ? err.code : -EIO;
		goto out;
	}
	vm->mig_setup_ns = vm_now_ns() - t0;
	if (!mig_advance(vm, MIG_ACTIVE)) {
		r = ferry_error_set(&err, -ECANCELED, "cancelled");
		goto out;
	}

	for (unsigned round = 0; round < MAX_ROUNDS; round++) {
		bool stop;

		pthread_mutex_lock(&vm->mig_lock);
		stop = vm->mig_cancel;
		pthread_mutex_unlock(&vm->mig_lock);
		if (stop) {
			r = ferry_error_set(&err, -ECANCELED, "cancelled");
			goto out;
		}
		ferry_save_pending(s, true, &must, &can);
		if (must + can <= SWITCHOVER_BYTES)
			break;
		r = ferry_save_round(s, ROUND_BUDGET, &err);
		if (r)
			goto out;
	}

	/* Switchover: the guest must not write while the rest is sent. */
	pthread_mutex_lock(&vm->lock);
	before = vm->run_state;
	if (before == VM_RUNNING) {
		t0 = vm_now_ns();
		r = vm->be->pause(vm->be_priv, &err);
		if (r) {
			pthread_mutex_unlock(&vm->lock);
			goto out;
		}
	} else {
		t0 = vm_now_ns();
	}
	vm_set_run_state(vm, VM_FINISH_MIGRATE);
	paused = true;
	if (!mig_advance(vm, MIG_DEVICE)) {
		pthread_mutex_unlock(&vm->lock);
		r = ferry_error_set(&err, -ECANCELED, "cancelled");
		goto out;
	}
	r = ferry_save_complete(s, &err);
	if (!r && ferry_chan_flush(c))
		r = ferry_chan_error(c, &err);
	vm->mig_downtime_ns = vm_now_ns() - t0;
	if (!r)
		vm_set_run_state(vm, VM_POSTMIGRATE);
	pthread_mutex_unlock(&vm->lock);
out:
	ferry_save_end(s);
	ferry_chan_free(c);
	if (r) {
		/* Leave the source as it was: running if it ran. */
		if (paused) {
			struct ferry_error e2 = { 0 };
			pthread_mutex_lock(&vm->lock);
			if (before == VM_RUNNING) {
				if (vm_resume_locked(vm, &e2))
					fprintf(stderr, "ferry vm: cannot resume after a "
						"failed migration: %s\n", e2.msg);
			} else {
				vm_set_run_state(vm, before);
			}
			pthread_mutex_unlock(&vm->lock);
		}
		pthread_mutex_lock(&vm->mig_lock);
		snprintf(vm->mig_error, sizeof(vm->mig_error), "%s",
			 err.msg[0] ? err.msg : strerror(-r));
		fprintf(stderr, "ferry vm: migration to %s failed: %s\n",
			vm->mig_uri, vm->mig_error);
		set_mig_status_locked(vm, vm->mig_cancel ? MIG_CANCELLED : MIG_FAILED);
		pthread_mutex_unlock(&vm->mig_lock);
	} else {
		pthread_mutex_lock(&vm->mig_lock);
		set_mig_status_locked(vm, MIG_COMPLETED);
		pthread_mutex_unlock(&vm->mig_lock);
	}
	return NULL;
}

void vm_migrate_join(struct vm *vm)
{
	if (vm->mig_thread_live) {
		pthread_join(vm->mig_thread, NULL);
		vm->mig_thread_live = false;
	}
}

int vm_migrate(struct vm *vm, const char *uri, struct ferry_error *err)
{
	struct ferry_uri u;
	enum mig_status st;
	int e;

	if (ferry_uri_parse(uri, &u, err))
		return err && err->code ? err->code : -EINVAL;
	pthread_mutex_lock(&vm->mig_lock);
	st = vm->mig_status;
	pthread_mutex_unlock(&vm->mig_lock);
	if (st == MIG_SETUP || st == MIG_ACTIVE || st == MIG_DEVICE ||
	    st == MIG_CANCELLING)
		return ferry_error_set(err, -EBUSY, "a migration is already %s",
				       mig_status_name(st));
	switch (vm_run_state(vm)) {
	case VM_RUNNING:
	case VM_PAUSED:
	case VM_POSTMIGRATE:
		break;
	default:
		return ferry_error_set(err, -EINVAL, "cannot migrate a VM that is %s",
				       vm_run_state_name(vm_run_state(vm)));
	}
	/* The previous migration thread has finished (terminal status). */
	vm_migrate_join(vm);
	pthread_mutex_lock(&vm->mig_lock);
	snprintf(vm->mig_uri, sizeof(vm->mig_uri), "%s", uri);
	vm->mig_error[0] = 0;
	vm->mig_cancel = false;
	vm->mig_start_ns = vm_now_ns();
	vm->mig_end_ns = vm->mig_downtime_ns = vm->mig_setup_ns = 0;
	set_mig_status_locked(vm, MIG_SETUP);
	pthread_mutex_unlock(&vm->mig_lock);
	e = pthread_create(&vm->mig_thread, NULL, migration_thread, vm);
	if (e) {
		pthread_mutex_lock(&vm->mig_lock);
		set_mig_status_locked(vm, MIG_FAILED);
		pthread_mutex_unlock(&vm->mig_lock);
		return ferry_error_set(err, -e, "cannot start the migration thread");
	}
	vm->mig_thread_live = true;
	return 0;
}
