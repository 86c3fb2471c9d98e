/*
 * vmm/vm/backend.h - what runs the guest: KVM, or host threads.
 *
 * Both backends run the same guest workload over the same guest RAM (one
 * anonymous mapping owned by struct vm), and both offer real kernel dirty
 * tracking, so every migration path is exercised with or without /dev/kvm.
 *
 * Threads: every op is called from the VMM's control paths (main, control
 * or migration thread) with vm->lock held, except dirty_* which the
 * migration thread calls while it owns the migration. vCPU threads belong
 * to the backend.
 */
#ifndef FERRY_VMM_BACKEND_H
#define FERRY_VMM_BACKEND_H

#include <stdbool.h>
#include <stdint.h>

#include "ferry/ferry.h"

struct vm;

struct backend_ops {
	const char *name;
	/* Create the backend over vm->ram (mapped, zero for a fresh VM).
	 * vCPUs exist but do not run. */
	int (*create)(struct vm *vm, void **priv, struct ferry_error *err);
	/* Fresh boot only: set up vCPU registers for the guest entry point. */
	int (*boot)(void *priv, struct ferry_error *err);
	/* Start vCPU threads; afterwards pause/resume control them. */
	int (*start)(void *priv, struct ferry_error *err);
	/* Stop every vCPU and wait until none runs guest code. */
	int (*pause)(void *priv, struct ferry_error *err);
	void (*resume)(void *priv);
	/* Dirty tracking over all of guest RAM (one bitmap, bit = 4 KiB page). */
	int (*dirty_start)(void *priv, struct ferry_error *err);
	/* @final: the switchover's sync (vCPUs stopped; no sync follows
	 * before dirty_stop or the next dirty_start), which need not re-arm
	 * tracking for the pages it reports. */
	int (*dirty_sync)(void *priv, uint64_t *bitmap, bool final,
			  struct ferry_error *err);
	void (*dirty_stop)(void *priv);
	/* Optional: let go of guest RAM for good (a stopped tracker may
	 * still hold it: the thread backend's userfaultfd registration), so
	 * that a postcopy load can register it with its own. Called where
	 * the VM waits for an incoming state; may be slow. */
	void (*dirty_release)(void *priv);
	/* Per-vCPU state description and object, registered as "cpu" N. */
	const struct ferry_vmsd *cpu_vmsd;
	void *(*cpu_state)(void *priv, unsigned index);
	/* Did the guest panic (or a vCPU fail)? Message into @msg. */
	bool (*failed)(void *priv, char *msg, size_t len);
	void (*destroy)(void *priv);
};

extern const struct backend_ops backend_kvm_ops;
extern const struct backend_ops backend_thread_ops;

/* Can this host run the KVM backend? (@why gets the reason if not.) */
bool backend_kvm_usable(char *why, size_t len);

#endif
