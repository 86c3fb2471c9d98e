/* SPDX-License-Identifier: MIT */
/*
 * vmm/threads/backend-thread.h - run the test guest's workload in host threads.
 *
 * The thread backend is what the reference VMM uses when /dev/kvm is
 * missing.  Each vCPU is a host thread running the guest's own workload
 * code (vmm/guest/workload.h, the same source the KVM guest is built from)
 * directly over the host mapping of guest RAM, laid out as in layout.h.
 * There are no registers to migrate: all guest state is in RAM, so a
 * thread_vm created over a copy of a paused VM's RAM continues where the
 * original stopped.
 *
 * Threads: thread_vm_* are called by one controlling thread at a time (the
 * caller serializes them); thread_vm_panicked() may be called from any
 * thread.  The vCPU threads belong to the thread_vm.  While the VM is
 * paused no vCPU thread touches RAM, and the controlling thread may read
 * or write all of it.  While it runs, the VMM may read the status block
 * and write the command block, as with KVM.
 */
#ifndef FERRY_VMM_BACKEND_THREAD_H
#define FERRY_VMM_BACKEND_THREAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ferry/common.h"

struct thread_vm;

/*
 * A VM of nvcpus (1..GUEST_MAX_VCPUS) vCPUs over ram (ram_size bytes,
 * page aligned, GUEST_MIN_RAM..GUEST_MAX_RAM, owned by the caller and
 * outliving the VM).  Its vCPU threads are created here and wait for
 * thread_vm_start(); nothing runs yet.
 */
int thread_vm_create(struct thread_vm **out, uint8_t *ram, uint64_t ram_size,
		     unsigned nvcpus, struct ferry_error *err);

/*
 * Let the vCPU threads run (no thread is created here: quick, and it
 * cannot fail for want of memory).  The command block must be filled in
 * first (guest_cmd_fill()).  RAM whose status.magic is set is a guest resumed
 * from a snapshot: it continues from RAM.  -EBUSY if already started.
 * Touches no guest memory (on a postcopy destination a page may still be
 * on its way): a bad command block, or one asking for more data pages than
 * RAM holds, is reported by the vCPUs, as a panic.
 */
int thread_vm_start(struct thread_vm *t, struct ferry_error *err);

/*
 * Stop every vCPU at a safe point (between two page writes, or while
 * idle) and wait until all are parked.  Typically well under 1 ms.  RAM is
 * then consistent: a copy of it is a snapshot.  Does nothing if not
 * started or already paused.
 */
int thread_vm_pause(struct thread_vm *t, struct ferry_error *err);
void thread_vm_resume(struct thread_vm *t);

/* Stop and join all vCPU threads, free the VM (not the RAM).  NULL is ok. */
void thread_vm_destroy(struct thread_vm *t);

/*
 * True once a vCPU panicked (its thread has stopped; the others go on
 * until destroyed).  The first panic's description goes into msg.
 */
bool thread_vm_panicked(struct thread_vm *t, char *msg, size_t len);

/* ---- guest set-up shared with the KVM backend ------------------------ */

/*
 * Fill in the command block of the guest in ram for boot: magic, version,
 * data_pages (all of the data area) and tsc_hz.  The workload fields are
 * left alone (zero in fresh RAM: idle).  For a guest resumed from a
 * snapshot, call it again on the new host: it refreshes tsc_hz and leaves
 * the rest as the snapshot had it.  -EINVAL for a RAM size the layout
 * cannot hold.
 */
int guest_cmd_fill(uint8_t *ram, uint64_t ram_size, uint64_t tsc_hz,
		   struct ferry_error *err);

/*
 * Frequency of the host's TSC in Hz, calibrated against CLOCK_MONOTONIC
 * over about 10 ms (the KVM backend asks KVM instead: KVM_GET_TSC_KHZ).
 * Rounded to kHz.  Takes ~10 ms: call it once and keep the result.
 */
uint64_t host_tsc_hz(void);

#endif /* FERRY_VMM_BACKEND_THREAD_H */
