/*
 * vmm/vm/vm-internal.h - struct vm, shared by vm.c, vm-migrate.c,
 * vm-control.c and vm-devices.c. Locking rules: see vm.c.
 */
#ifndef FERRY_VMM_VM_INTERNAL_H
#define FERRY_VMM_VM_INTERNAL_H

#include <pthread.h>
#include <signal.h>

#include "vm/vm.h"

struct control;
struct memmap;
struct virtio_dev;

/* Source-side migration states (query-migrate "status"). */
enum mig_status {
	MIG_NONE, MIG_SETUP, MIG_ACTIVE, MIG_DEVICE, MIG_COMPLETED,
	MIG_FAILED, MIG_CANCELLING, MIG_CANCELLED, MIG__MAX
};
const char *mig_status_name(enum mig_status s);

enum mig_phase {
	MIG_PHASE_FINAL_SYNC, MIG_PHASE_REMAINING_RAM, MIG_PHASE_DEVICE_SAVE,
	MIG_PHASE_TRANSFER, MIG_PHASE_DEVICE_LOAD, MIG_PHASE_RESUME,
	MIG_PHASE__MAX
};
extern const char *const mig_phase_names[MIG_PHASE__MAX];

/* migrate-set-capabilities / migrate-set-parameters (QEMU names). */
struct mig_params {
	bool auto_converge;
	bool multifd;
	bool return_path;
	unsigned multifd_channels;
	bool zstd;
	uint64_t downtime_limit_ms;
	uint64_t max_bandwidth;        /* bytes/s, 0 = unlimited */
	unsigned throttle_initial, throttle_increment, throttle_max;
};
void mig_params_default(struct mig_params *p);

/* Live figures of the running migration, for query-migrate. */
struct mig_progress {
	uint64_t pass;
	double mbps;                   /* recent throughput, Mbit/s */
	uint64_t dirty_pages_rate;     /* pages/s, from the last sync */
	uint64_t expected_downtime_ms;
	uint64_t precopy_bytes, downtime_bytes, multifd_bytes;
	/* The RAM device's counters, channel pages included. Only the
	 * migration thread may call ferry_ram_get_stats (it owns the RAM
	 * device's save state and the multifd object, which it frees); other
	 * threads read this copy under mig_lock. */
	struct ferry_ram_stats ram;
	unsigned throttle_pct;
};

struct vm {
	struct vm_config cfg;          /* immutable after create */
	bool trace;                    /* immutable: FERRY_TRACE=1 */

	pthread_mutex_t lock;          /* guards the fields below */
	enum vm_run_state run_state;
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

	struct control *control;

	/* Outgoing migration: the thread handle is the main/control thread's;
	 * mig_* fields are guarded by mig_lock. */
	pthread_mutex_t mig_lock;
	pthread_t mig_thread;
	bool mig_thread_live;          /* a thread exists (running or done) */
	enum mig_status mig_status;
	char mig_uri[4096];
	char mig_error[FERRY_ERROR_MSG_MAX];
	uint64_t mig_start_ns, mig_end_ns, mig_downtime_ns, mig_setup_ns;
	bool mig_cancel;               /* set by migrate-cancel */
	int mig_fd;                    /* main connection while it exists, or -1;
					  cancel shuts it down to unblock writes */
	struct ferry_multifd *mig_mf;  /* its multifd channels, or NULL */
	struct mig_params params;      /* set by migrate-set-*; copied at start */
	struct mig_progress prog;      /* live figures for query-migrate */
	/* Downtime phases of the last completed migration, ms. */
	double phase_ms[MIG_PHASE__MAX];

	/* Incoming migration (guarded by mig_lock). */
	enum mig_status in_status;
	char in_error[FERRY_ERROR_MSG_MAX];
	char in_uri[4096];             /* set by --incoming or migrate-incoming */
	pthread_cond_t in_cond;        /* signalled when in_uri is set */
	bool in_defer;                 /* --incoming defer: wait for the URI */
	/* Bound as soon as the URI is known (at create for --incoming, inside
	 * migrate-incoming otherwise), so a source told "the destination is
	 * up" never finds the port closed; vm_incoming takes it. */
	struct ferry_listener *in_listener;
	struct ferry_rp_msg in_shut;   /* verdict for the source */
	struct ferry_chan *in_rp_chan; /* return path writer, or NULL */
	struct ferry_record_io in_rp_io;
	int in_fd;                     /* main connection, until the verdict */
	uint64_t in_device_digest;

	/* Auto-converge: throttle thread, guarded by lock. */
	pthread_t throttle_thread;
	bool throttle_live;
	unsigned throttle_pct;         /* 0 = off */
	bool throttle_stop;
	pthread_cond_t throttle_cond;
};

void vm_trace(struct vm *vm, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
void vm_set_run_state(struct vm *vm, enum vm_run_state to);
int vm_resume_locked(struct vm *vm, struct ferry_error *err);
void vm_request_quit(struct vm *vm);
uint64_t vm_now_ns(void);

int vm_control_start(struct vm *vm, struct ferry_error *err);
void vm_control_stop(struct vm *vm);
void vm_migrate_join(struct vm *vm);
int vm_migrate_cancel(struct vm *vm, struct ferry_error *err);
int vm_migrate_incoming(struct vm *vm, const char *uri, struct ferry_error *err);
/* Bind the listener of a socket --incoming URI (no-op otherwise). */
int vm_incoming_bind(struct vm *vm, struct ferry_error *err);
/* Load cfg->incoming (or wait for migrate-incoming): vm.c calls it. */
int vm_incoming(struct vm *vm, struct ferry_error *err);
void vm_incoming_done(struct vm *vm, bool resumed);
void vm_set_throttle(struct vm *vm, unsigned pct);
void vm_throttle_stop(struct vm *vm);
int vm_devices_create(struct vm *vm, struct ferry_error *err);
void vm_devices_destroy(struct vm *vm);

#endif
