/* SPDX-License-Identifier: MIT */
/*
 * vmm/kvm/kvm.h - a small KVM wrapper for ferry's reference VMM (x86-64 only).
 *
 * Two handles, no global state: a struct kvm_vm owns the /dev/kvm and VM
 * file descriptors, the memory slot table and its vCPUs; a struct kvm_vcpu
 * owns a vCPU fd, its mmap'ed struct kvm_run and its pause state.  Guest
 * memory belongs to the caller (anonymous or memfd mapping); the VM only
 * records where each slot lives.
 *
 * Error convention: every function that can fail returns 0 or a negative
 * errno.  It also fills *err (if err is not NULL) with a message naming the
 * failing ioctl or check.
 *
 * Threads: each vCPU is run by one thread that calls kvm_vcpu_thread_init()
 * once and then kvm_vcpu_run() in a loop.  Any other thread may pause,
 * resume or stop it.  While a vCPU is paused its thread is parked inside
 * kvm_vcpu_run(), out of KVM_RUN, and the controlling thread may read or
 * write its state and the VM's memory.  All other functions on one handle
 * must be serialized by the caller.
 *
 * The guest model is deliberately narrow: 64-bit code at CPL 3 on an
 * identity map, IF=0, no in-kernel irqchip.  Such a guest takes no
 * interrupts, so the VM has no LAPIC, IOAPIC or PIT state to migrate.
 */
#ifndef FERRY_VMM_KVM_H
#define FERRY_VMM_KVM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <linux/kvm.h>

struct kvm_vm;
struct kvm_vcpu;

/* Message buffer filled by failing calls; adapted to ferry_error later. */
struct kvm_err {
	int code;		/* negative errno, same as the return value */
	char msg[256];
};

/* What the host KVM offers; filled by kvm_vm_create(). */
struct kvm_caps {
	int api_version;
	int nr_memslots;
	bool immediate_exit;	/* required */
	bool manual_dirty_log;	/* KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 */
	bool sregs2;
	bool xsave;
	bool xsave2;		/* KVM_GET_XSAVE2 */
	uint32_t xsave_size;	/* KVM_CAP_XSAVE2 size, 4096 without it */
	bool xcrs;
	bool debugregs;
	bool vcpu_events;
	bool tsc_khz;		/* KVM_GET_TSC_KHZ */
	bool tsc_control;	/* KVM_SET_TSC_KHZ (TSC scaling) */
	int vcpu_mmap_size;
};

struct kvm_vm_opts {
	/*
	 * Signal used to kick vCPU threads out of KVM_RUN; 0 means SIGUSR1.
	 * kvm_vcpu_thread_init() installs an empty handler for it, which is
	 * process-wide: pick a signal nothing else in the process uses.
	 */
	int kick_signal;
	/*
	 * Use KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 when the host has it: fetching
	 * the dirty log no longer re-protects pages, kvm_vm_dirty_log_clear()
	 * does, and only for the pages asked for.
	 */
	bool manual_dirty_log;
	/*
	 * With manual_dirty_log: start every slot's log as all-dirty instead of
	 * write-protecting all of memory when logging is enabled.
	 */
	bool dirty_log_initially_set;
};

/* ---- VM -------------------------------------------------------------- */

int kvm_vm_create(struct kvm_vm **out, const struct kvm_vm_opts *opts,
		  struct kvm_err *err);
/* Destroys any remaining vCPUs (their threads must be gone) and the VM. */
void kvm_vm_destroy(struct kvm_vm *vm);

const struct kvm_caps *kvm_vm_caps(const struct kvm_vm *vm);
int kvm_vm_fd(const struct kvm_vm *vm);
/* True if manual dirty-log protection was requested and is in effect. */
bool kvm_vm_manual_dirty_log(const struct kvm_vm *vm);

#define KVM_VM_MAX_SLOTS	32

/* Memory slot flags for kvm_vm_set_memslot(). */
#define KVM_VM_SLOT_DIRTY_LOG	(1u << 0)
#define KVM_VM_SLOT_READONLY	(1u << 1)

/*
 * Map size bytes of host memory at hva into the guest at gpa as slot
 * number slot (< KVM_VM_MAX_SLOTS).  gpa, size and hva must be page
 * aligned.  Calling it again for a slot in use replaces it; size 0
 * deletes it.
 */
int kvm_vm_set_memslot(struct kvm_vm *vm, uint32_t slot, uint64_t gpa,
		       uint64_t size, void *hva, uint32_t flags,
		       struct kvm_err *err);
/* Turn dirty logging of one slot on or off. */
int kvm_vm_set_dirty_logging(struct kvm_vm *vm, uint32_t slot, bool on,
			     struct kvm_err *err);
/* Host address of [gpa, gpa + len), or NULL if not inside one slot. */
void *kvm_vm_gpa_to_hva(const struct kvm_vm *vm, uint64_t gpa, uint64_t len);
/* Copy into guest memory; -EFAULT if the range is not inside one slot. */
int kvm_vm_write(struct kvm_vm *vm, uint64_t gpa, const void *src,
		 uint64_t len, struct kvm_err *err);

/*
 * Dirty log.  A bitmap has one bit per 4 KiB page of the slot (bit i of
 * word i / 64 is page i) and must hold kvm_dirty_bitmap_words(size) words.
 *
 * kvm_vm_dirty_log_get():   KVM_GET_DIRTY_LOG.  Without manual protection
 *     this also clears the log and write-protects the pages it returns.
 * kvm_vm_dirty_log_clear(): KVM_CLEAR_DIRTY_LOG for pages
 *     [first, first + npages) whose bits are set in bitmap (whose bit 0 is
 *     page first); first and npages must be multiples of 64, except that the
 *     range may end at the end of the slot.  -EOPNOTSUPP without manual
 *     protection.
 * kvm_vm_dirty_log_sync():  both: after it returns, bitmap holds the pages
 *     dirtied since the last sync and they are armed again, so any later
 *     write shows up in the next sync.  Copy the pages after the sync.
 */
static inline size_t kvm_dirty_bitmap_words(uint64_t slot_size)
{
	return (size_t)((slot_size / 4096 + 63) / 64);
}

int kvm_vm_dirty_log_get(struct kvm_vm *vm, uint32_t slot, uint64_t *bitmap,
			 struct kvm_err *err);
int kvm_vm_dirty_log_clear(struct kvm_vm *vm, uint32_t slot, uint64_t first,
			   uint64_t npages, const uint64_t *bitmap,
			   struct kvm_err *err);
int kvm_vm_dirty_log_sync(struct kvm_vm *vm, uint32_t slot, uint64_t *bitmap,
			  struct kvm_err *err);

/*
 * Build identity-mapping page tables for [0, map_bytes) in guest memory at
 * pt_gpa: one PML4, one PDPT, then page directories of 2 MiB pages, every
 * level present, writable and user-accessible.  pt_size bytes are
 * available there; -ENOSPC if that is not enough.  The result is the CR3
 * value pt_gpa.
 */
int kvm_vm_build_identity_map(struct kvm_vm *vm, uint64_t pt_gpa,
			      uint64_t pt_size, uint64_t map_bytes,
			      struct kvm_err *err);

/* Pause / resume every vCPU of the VM (see kvm_vcpu_pause()). */
int kvm_vm_pause(struct kvm_vm *vm, struct kvm_err *err);
void kvm_vm_resume(struct kvm_vm *vm);

/*
 * Hold / release every vCPU of the VM around a memory slot change that
 * deletes a slot, in the thread making the change.  KVM cannot move,
 * shrink or split a slot: it is deleted and created again, and a vCPU
 * running in between finds no memory there.  A data access then merely
 * exits as MMIO, but an instruction fetch or a page-table walk cannot be
 * emulated from a hole and the guest dies (a triple fault here).  A hold
 * parks vCPUs like a pause but independently of it: a hold never resumes
 * a paused vCPU, and resume does not end a hold.  Holds nest.  A vCPU's
 * own thread may hold (from an exit handler): it does not wait for itself.
 */
int kvm_vm_hold(struct kvm_vm *vm, struct kvm_err *err);
void kvm_vm_release(struct kvm_vm *vm);

/* ---- vCPU ------------------------------------------------------------ */

/*
 * Create vCPU id and give it the host-supported CPUID.  The source and the
 * destination of a migration must configure CPUID identically, which this
 * does on identical hosts; CPUID is not part of struct kvm_vcpu_state.
 */
int kvm_vcpu_create(struct kvm_vm *vm, uint32_t id, struct kvm_vcpu **out,
		    struct kvm_err *err);
void kvm_vcpu_destroy(struct kvm_vcpu *vcpu);

int kvm_vcpu_fd(const struct kvm_vcpu *vcpu);
uint32_t kvm_vcpu_id(const struct kvm_vcpu *vcpu);
struct kvm_run *kvm_vcpu_run_page(const struct kvm_vcpu *vcpu);

/*
 * Put the vCPU in 64-bit mode at CPL 3: paging on cr3 (see
 * kvm_vm_build_identity_map()), flat CS/SS with DPL 3, IF = 0, no GDT and
 * no IDT (an exception becomes a triple fault, KVM_EXIT_SHUTDOWN).
 * RFLAGS.IOPL is 3 so that in/out work under hardware virtualization;
 * kvm_pvm ignores it and raises #GP, so use MMIO to reach the VMM.
 * rsp should be 16-byte aligned minus 8.
 */
int kvm_vcpu_setup_user_long_mode(struct kvm_vcpu *vcpu, uint64_t cr3,
				  uint64_t rip, uint64_t rsp,
				  struct kvm_err *err);

/* Guest TSC frequency in kHz (KVM_GET_TSC_KHZ). */
int kvm_vcpu_get_tsc_khz(struct kvm_vcpu *vcpu, uint32_t *khz,
			 struct kvm_err *err);

/* ---- running --------------------------------------------------------- */

enum kvm_vcpu_exit_kind {
	KVM_VCPU_EXIT_IO = 1,	/* port I/O: see exit.io */
	KVM_VCPU_EXIT_MMIO,	/* access outside memory: see exit.mmio */
	KVM_VCPU_EXIT_HLT,
	KVM_VCPU_EXIT_STOPPED,	/* kvm_vcpu_stop() was called */
};

struct kvm_vcpu_exit {
	enum kvm_vcpu_exit_kind kind;
	uint32_t reason;	/* raw KVM_EXIT_* */
	union {
		struct {
			uint16_t port;
			uint8_t size;	/* 1, 2 or 4 */
			bool out;	/* guest wrote (out) or reads (in) */
			uint32_t count;	/* > 1 for rep ins/outs */
			/*
			 * size * count bytes inside the kvm_run page: the data
			 * of an out, or where to put the data of an in before
			 * the next kvm_vcpu_run().
			 */
			void *data;
		} io;
		struct {
			uint64_t gpa;
			uint32_t len;
			bool write;
			/*
			 * 8 bytes in the kvm_run page: the data of a write,
			 * or where to put the data of a read before the next
			 * kvm_vcpu_run().
			 */
			uint8_t *data;
		} mmio;
	};
};

/*
 * Call once on the thread that will run vcpu, before kvm_vcpu_run().
 * kvm_vcpu_thread_exit() detaches it again (so a later pause does not wait
 * for a thread that is gone).
 */
int kvm_vcpu_thread_init(struct kvm_vcpu *vcpu, struct kvm_err *err);
void kvm_vcpu_thread_exit(struct kvm_vcpu *vcpu);

/*
 * Run the vCPU until an exit that the caller has to handle.  Interruptions
 * are handled inside: a pause parks the thread here until resume.
 * Returns 0 and fills *exit, or a negative errno for a dead guest: -EIO on
 * KVM_EXIT_SHUTDOWN (triple fault), KVM_EXIT_FAIL_ENTRY,
 * KVM_EXIT_INTERNAL_ERROR or an unexpected exit, with the details and the
 * guest's RIP in *err.
 */
int kvm_vcpu_run(struct kvm_vcpu *vcpu, struct kvm_vcpu_exit *exit,
		 struct kvm_err *err);

/*
 * Pause: kick the vCPU out of KVM_RUN (signal + immediate_exit) and wait
 * until its thread is parked.  Any pending port or MMIO exit has been
 * completed by then, so the vCPU state is consistent.  Returns at once if
 * no thread runs the vCPU.  Resume lets it continue; stop makes the current
 * or next kvm_vcpu_run() return KVM_VCPU_EXIT_STOPPED, also from a pause.
 */
int kvm_vcpu_pause(struct kvm_vcpu *vcpu, struct kvm_err *err);
void kvm_vcpu_resume(struct kvm_vcpu *vcpu);
void kvm_vcpu_stop(struct kvm_vcpu *vcpu);

/* ---- state ----------------------------------------------------------- */

#define KVM_VCPU_STATE_MAX_MSRS		32
#define KVM_VCPU_STATE_XSAVE_MAX	16384

/* kvm_vcpu_state.flags: which optional parts were captured. */
#define KVM_VCPU_STATE_XSAVE		(1u << 0)	/* else xsave holds kvm_fpu */
#define KVM_VCPU_STATE_XCRS		(1u << 1)
#define KVM_VCPU_STATE_EVENTS		(1u << 2)
#define KVM_VCPU_STATE_DEBUGREGS	(1u << 3)
#define KVM_VCPU_STATE_MP_STATE		(1u << 4)
#define KVM_VCPU_STATE_TSC_KHZ		(1u << 5)

/*
 * Everything needed to continue a vCPU in another VM, possibly in another
 * process.  Plain fixed-size data: the kernel structures are the KVM ABI
 * and have no pointers.  sregs is always the sregs2 layout (converted from
 * KVM_GET_SREGS on hosts without KVM_CAP_SREGS2).  Restore into a vCPU
 * configured like the source (same CPUID) in a VM whose memory already
 * holds the guest's RAM.
 */
struct kvm_vcpu_state {
	uint32_t flags;
	uint32_t nmsrs;		/* entries used in msrs[] */
	uint32_t xsave_size;	/* bytes used in xsave[] */
	uint32_t tsc_khz;
	struct kvm_regs regs;
	struct kvm_sregs2 sregs;
	struct kvm_xcrs xcrs;
	struct kvm_vcpu_events events;
	struct kvm_debugregs debugregs;
	struct kvm_mp_state mp_state;
	struct kvm_msr_entry msrs[KVM_VCPU_STATE_MAX_MSRS];
	uint8_t xsave[KVM_VCPU_STATE_XSAVE_MAX] __attribute__((aligned(64)));
};

/* The vCPU must not be running: paused, or its thread not started. */
int kvm_vcpu_save_state(struct kvm_vcpu *vcpu, struct kvm_vcpu_state *st,
			struct kvm_err *err);
int kvm_vcpu_load_state(struct kvm_vcpu *vcpu,
			const struct kvm_vcpu_state *st, struct kvm_err *err);

/* MSR indices kvm_vcpu_save_state() captures on this host (for reports). */
size_t kvm_vcpu_state_msrs(const struct kvm_vcpu *vcpu, const uint32_t **idx);

#endif /* FERRY_VMM_KVM_H */
