/*
 * vmm/vm/vm-migrate.c - the reference VM's side of the migration engine.
 *
 * libferry's engine (include/ferry/engine.h) runs every migration: the
 * threads, the connections, the convergence policy, the switchover and its
 * handshake, the state machines. This file is all the VMM has to give it,
 * as any VMM embedding libferry would: stopping and starting the vCPUs,
 * the run state, throttling for auto-converge, and where events and trace
 * lines go. No migration policy lives here.
 *
 * Every hook runs on an engine thread, never with an engine lock held; they
 * take vm->lock like any other run-state change.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "control/control.h"
#include "memory/memmap.h"
#include "vm/vm-internal.h"

static int hook_vm_stop(void *opaque, enum ferry_run_state to,
			enum ferry_run_state *was, struct ferry_error *err)
{
	struct vm *vm = opaque;
	int r = 0;

	pthread_mutex_lock(&vm->lock);
	*was = vm->run_state;
	switch (vm->run_state) {
	case FERRY_RUN_RUNNING:
		r = vm->be->pause(vm->be_priv, err);
		break;
	case FERRY_RUN_PAUSED:
	case FERRY_RUN_POSTMIGRATE:
		break;
	default:
		r = ferry_error_set(err, -EINVAL, "the VM is %s",
				    ferry_run_state_name(vm->run_state));
	}
	if (!r)
		vm_set_run_state(vm, to);
	pthread_mutex_unlock(&vm->lock);
	return r;
}

static int hook_vm_start(void *opaque, struct ferry_error *err)
{
	struct vm *vm = opaque;
	int r;

	pthread_mutex_lock(&vm->lock);
	r = vm_resume_locked(vm, err);
	pthread_mutex_unlock(&vm->lock);
	return r;
}

static void hook_vm_set_state(void *opaque, enum ferry_run_state to)
{
	struct vm *vm = opaque;

	pthread_mutex_lock(&vm->lock);
	/* A VM told to quit is shut down for good: the engine's last word
	 * on a migration the quit ended (postmigrate for a paused postcopy
	 * whose destination died, say) comes too late to matter. */
	if (vm->run_state == FERRY_RUN_SHUTDOWN)
		vm_trace(vm, "run state stays shutdown (the migration "
			 "asked for %s)", ferry_run_state_name(to));
	else
		vm_set_run_state(vm, to);
	pthread_mutex_unlock(&vm->lock);
}

static void hook_vm_throttle(void *opaque, unsigned pct)
{
	vm_set_throttle(opaque, pct);
}

static void hook_event(void *opaque, const struct ferry_mig_event *ev)
{
	struct vm *vm = opaque;
	json_t *d;

	if (ev->kind == FERRY_EV_PASS) {
		d = json_pack("{s:I}", "pass", (json_int_t)ev->pass);
	} else {
		d = json_pack("{s:s}", "status", ferry_mig_status_name(ev->to));
		if (ev->incoming)
			json_object_set_new(d, "incoming", json_true());
	}
	pthread_mutex_lock(&vm->lock);
	if (vm->control)
		control_event(vm->control, ev->kind == FERRY_EV_PASS ?
			      "MIGRATION_PASS" : "MIGRATION", d);
	else
		json_decref(d);
	/*
	 * A destination that could not take the VM has nothing to run: like
	 * QEMU it ends the process (status 1). Not when the switchover is in
	 * doubt or done: then this process holds the only whole copy of the
	 * VM, stopped, and the operator decides.
	 */
	if (ev->kind == FERRY_EV_STATUS && ev->incoming &&
	    (ev->to == FERRY_MIG_FAILED || ev->to == FERRY_MIG_CANCELLED) &&
	    ev->switchover != FERRY_SWO_IN_DOUBT &&
	    ev->switchover != FERRY_SWO_DONE) {
		fprintf(stderr, "ferry vm: %s\n", ev->error ? ev->error :
			"incoming migration failed");
		vm->exit_status = 1;
		vm->quit = true;
		pthread_cond_broadcast(&vm->quit_cond);
	}
	pthread_mutex_unlock(&vm->lock);
}

/*
 * The non-iterable load, wrapped (parameter device-load-transaction): one
 * memory transaction around every device's load, so moving BARs and
 * enabling regions costs one flat-view rebuild and one round of memslot
 * changes at the end instead of one per device. Devices whose load needs
 * the flat view (the vring caches) build it after the commit, from the
 * memory map's listener call (virtio.c): inside the transaction the view
 * is stale, and reading it is refused (memmap.h).
 */
static int hook_device_load_begin(void *opaque, struct ferry_error *err)
{
	struct vm *vm = opaque;
	struct ferry_setting tx = { 0 };
	struct memmap_stats st;

	(void)err;
	/* Batched unless the parameter says otherwise. */
	if (ferry_mig_get(vm->mig, "device-load-transaction", &tx, NULL))
		tx.u = 1;
	pthread_mutex_lock(&vm->lock);
	vm->load_tx = tx.u;
	pthread_mutex_unlock(&vm->lock);
	memmap_get_stats(vm->memmap, &st);
	vm->load_commits0 = st.commits;
	vm->load_rebuilds0 = st.rebuilds;
	if (vm->load_tx)
		memmap_begin(vm->memmap);
	return 0;
}

static int hook_device_load_end(void *opaque, int result,
				struct ferry_error *err)
{
	struct vm *vm = opaque;
	struct memmap_stats st;
	struct timespec a, b;
	int r = 0;

	(void)result;
	clock_gettime(CLOCK_MONOTONIC, &a);
	if (vm->load_tx)
		r = memmap_commit(vm->memmap, err);
	clock_gettime(CLOCK_MONOTONIC, &b);
	memmap_get_stats(vm->memmap, &st);
	pthread_mutex_lock(&vm->lock);
	vm->load_commits = st.commits - vm->load_commits0;
	vm->load_rebuilds = st.rebuilds - vm->load_rebuilds0;
	vm->load_commit_ns = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000ull +
			     (uint64_t)b.tv_nsec - (uint64_t)a.tv_nsec;
	vm->load_stats = true;
	pthread_mutex_unlock(&vm->lock);
	return r;
}

static void hook_trace(void *opaque, const char *line)
{
	vm_trace(opaque, "%s", line);
}

static const struct ferry_vmm_ops vmm_ops = {
	.size = sizeof(struct ferry_vmm_ops),
	.vm_stop = hook_vm_stop,
	.vm_start = hook_vm_start,
	.vm_set_state = hook_vm_set_state,
	.vm_throttle = hook_vm_throttle,
	.device_load_begin = hook_device_load_begin,
	.device_load_end = hook_device_load_end,
	.event = hook_event,
	.trace = hook_trace,
};

int vm_migration_init(struct vm *vm, struct ferry_error *err)
{
	struct ferry_mig_config cfg = {
		.size = sizeof(cfg),
		.ctx = vm->ctx,
		.ram = vm->ram_dev,
		.ops = &vmm_ops,
		.opaque = vm,
		.autostart = !vm->cfg.paused,
	};
	const char *in = vm->cfg.incoming;

	vm->mig = ferry_mig_new(&cfg, err);
	if (!vm->mig)
		return err && err->code ? err->code : -ENOMEM;
	if (vm->cfg.postcopy) {
		struct ferry_setting pc = { .name = "postcopy-ram", .u = 1 };
		int r = ferry_mig_set(vm->mig, &pc, 1, err);

		if (r)
			return r;
	}
	if (vm->cfg.device_state_channel) {
		struct ferry_setting ch = { .name = "device-state-channel",
					    .s = vm->cfg.device_state_channel };
		int r = ferry_mig_set(vm->mig, &ch, 1, err);

		if (r)
			return r;
	}
	if (vm->cfg.tls_creds || vm->cfg.tls_authz) {
		struct ferry_setting t[2];
		unsigned n = 0;
		int r;

		if (vm->cfg.tls_creds)
			t[n++] = (struct ferry_setting){ .name = "tls-creds",
							 .s = vm->cfg.tls_creds };
		if (vm->cfg.tls_authz)
			t[n++] = (struct ferry_setting){ .name = "tls-authz",
							 .s = vm->cfg.tls_authz };
		if ((r = ferry_mig_set(vm->mig, t, n, err)))
			return r;
	}
	if (!in)
		return 0;
	/* Waiting for (or loading) its state from here on, as QEMU's
	 * -incoming: nothing runs the vCPUs until the engine does. */
	pthread_mutex_lock(&vm->lock);
	vm_set_run_state(vm, FERRY_RUN_INMIGRATE);
	pthread_mutex_unlock(&vm->lock);
	if (!strcmp(in, "defer")) {
		vm->incoming_defer = true;
		return 0;
	}
	return ferry_mig_incoming(vm->mig, in, err);
}

int vm_migrate_incoming(struct vm *vm, const char *uri, struct ferry_error *err)
{
	enum ferry_run_state st = vm_run_state(vm);
	struct ferry_mig_info mi = { .size = sizeof(mi) };
	int r;

	if (!vm->incoming_defer)
		return ferry_error_set(err, -EINVAL,
			"migrate-incoming needs a VM started with --incoming defer");
	/*
	 * A VM takes a state only where none lives: still waiting for its
	 * first (inmigrate), or handed over to a destination that confirmed
	 * it has the VM (postmigrate after a switchover "done"; the soak's
	 * ping-pong between two processes). Never over a guest that runs or
	 * is paused here, and never over a source in doubt: it may hold the
	 * only whole copy (docs/faults.md, the operator's rule).
	 */
	if (st == FERRY_RUN_POSTMIGRATE) {
		ferry_mig_query(vm->mig, &mi);
		if (mi.status != FERRY_MIG_COMPLETED ||
		    mi.switchover != FERRY_SWO_DONE)
			return ferry_error_set(err, -EBUSY, "migrate-incoming: "
				"this VM's last migration ended with switchover "
				"'%s': it may hold the only copy of the guest "
				"(cont it, or quit it once the destination runs)",
				ferry_switchover_name(mi.switchover));
	} else if (st != FERRY_RUN_INMIGRATE) {
		return ferry_error_set(err, -EINVAL,
			"migrate-incoming needs a VM waiting for its state "
			"(inmigrate) or migrated out; this one is %s",
			ferry_run_state_name(st));
	}
	/* From here the VM waits for its state, as at start: the vCPUs stay
	 * stopped until the engine ends the load. */
	pthread_mutex_lock(&vm->lock);
	if (vm->run_state != st) {
		pthread_mutex_unlock(&vm->lock);
		return ferry_error_set(err, -EBUSY, "the VM changed state meanwhile");
	}
	vm_set_run_state(vm, FERRY_RUN_INMIGRATE);
	pthread_mutex_unlock(&vm->lock);
	/* A VM migrated out may still have its RAM registered for dirty
	 * tracking: a postcopy load could not register it (EBUSY). Its
	 * outgoing migration is over, so nothing tracks any more. */
	if (st == FERRY_RUN_POSTMIGRATE && vm->be->dirty_release)
		vm->be->dirty_release(vm->be_priv);
	r = ferry_mig_incoming(vm->mig, uri, err);
	if (r && st != FERRY_RUN_INMIGRATE) {
		pthread_mutex_lock(&vm->lock);
		vm_set_run_state(vm, st);
		pthread_mutex_unlock(&vm->lock);
	}
	return r;
}

int vm_migrate(struct vm *vm, const char *uri, bool resume,
	       struct ferry_error *err)
{
	enum ferry_run_state st = vm_run_state(vm);

	/* QMP's migrate with "resume": a paused postcopy reconnects. */
	if (resume)
		return ferry_mig_resume(vm->mig, uri, err);

	switch (st) {
	case FERRY_RUN_RUNNING:
	case FERRY_RUN_PAUSED:
	case FERRY_RUN_POSTMIGRATE:
		return ferry_mig_start(vm->mig, uri, err);
	default:
		return ferry_error_set(err, -EINVAL, "cannot migrate a VM that is %s",
				       ferry_run_state_name(st));
	}
}
