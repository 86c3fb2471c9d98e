/*
 * vmm/vm/vm-internal.h - struct vm, shared by vm.c, vm-migrate.c,
 * vm-control.c and vm-devices.c. Locking rules: see vm.c.
 */
#ifndef FERRY_VMM_VM_INTERNAL_H
#define FERRY_VMM_VM_INTERNAL_H

#include <pthread.h>
#include <signal.h>

#include "vm/vm.h"

#include <jansson.h>

struct control;
struct memmap;
struct vm_bulk;
struct virtio_dev;

struct vm {
	struct vm_config cfg;          /* immutable after create */
	bool trace;                    /* immutable: FERRY_TRACE=1 */

	pthread_mutex_t lock;          /* guards the fields below */
	enum ferry_run_state run_state;
	bool started;                  /* vCPU threads exist */
	bool quit;
	volatile sig_atomic_t quit_async; /* set from signal handlers */
	pthread_cond_t quit_cond;

	uint8_t *ram;                  /* guest RAM; immutable mapping */
	const struct backend_ops *be;  /* immutable after create */
	void *be_priv;

	struct ferry_ctx *ctx;         /* registry: changed only at create */
	struct ferry_ram *ram_dev;

	/* Devices: state guarded by the migration protocol (saved and loaded
	 * only while vCPUs are paused). */
	struct serial_state serial;
	struct timer_state timer;
	struct memmap *memmap;
	struct memmap_region *ram_region;
	struct virtio_dev **virtio;
	unsigned nvirtio;
	struct vm_bulk **bulk;         /* --device bulk (vm-bulk.c) */
	unsigned nbulk;

	/* The non-iterable load (vm-migrate.c): the incoming thread owns
	 * these between device_load_begin and device_load_end; the figures
	 * are published under lock for query-migrate. */
	bool load_tx;                  /* one memory transaction around it */
	uint64_t load_commits0, load_rebuilds0;
	uint64_t load_commits, load_rebuilds; /* lock: during the last load */
	uint64_t load_commit_ns;       /* lock: the outer commit's cost */
	bool load_stats;               /* lock: the figures above are set */

	struct control *control;

	/* The migration engine (libferry): outgoing and incoming migrations,
	 * their threads and state. Created at vm_create, freed first thing in
	 * vm_destroy; its hooks are in vm-migrate.c. */
	struct ferry_mig *mig;
	bool incoming_defer;           /* immutable: --incoming defer */
	int exit_status;               /* lock: main loop's return value */

	/* Auto-converge: throttle thread, guarded by lock. */
	pthread_t throttle_thread;
	bool throttle_live;
	unsigned throttle_pct;         /* 0 = off */
	bool throttle_stop;
	pthread_cond_t throttle_cond;
};

void vm_trace(struct vm *vm, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
void vm_set_run_state(struct vm *vm, enum ferry_run_state to);
int vm_resume_locked(struct vm *vm, struct ferry_error *err);
void vm_request_quit(struct vm *vm);

int vm_control_start(struct vm *vm, struct ferry_error *err);
void vm_control_stop(struct vm *vm);
/* Create the engine (vm_create); with cfg->incoming other than "defer",
 * start the incoming migration at once, so its port accepts before the
 * control socket answers. */
int vm_migration_init(struct vm *vm, struct ferry_error *err);
/* migrate-incoming: only for a VM started with --incoming defer. */
int vm_migrate_incoming(struct vm *vm, const char *uri, struct ferry_error *err);
void vm_set_throttle(struct vm *vm, unsigned pct);
void vm_throttle_stop(struct vm *vm);
int vm_devices_create(struct vm *vm, struct ferry_error *err);
/* Bulk devices (vm-bulk.c): create and register, free, follow the run
 * state (vm->lock held), verify into a JSON list for device-verify. */
int vm_bulk_create(struct vm *vm, struct ferry_error *err);
void vm_bulk_destroy(struct vm *vm);
void vm_bulk_run_state(struct vm *vm, enum ferry_run_state to);
json_t *vm_bulk_verify(struct vm *vm);
void vm_devices_destroy(struct vm *vm);

#endif
