// SPDX-License-Identifier: MIT
/*
 * vmm/kvm/kvm.c - KVM wrapper for ferry's reference VMM.  See kvm.h for the
 * API.
 *
 * Design notes
 *
 * Pausing.  A vCPU thread spends nearly all its time inside KVM_RUN.  To get
 * it out, kvm_vcpu_pause() sets a request flag and kvm_run.immediate_exit,
 * then sends the kick signal to the thread.  Whatever the thread is doing,
 * it ends up parked in kvm_vcpu_run():
 *   - in guest mode: the signal forces KVM_RUN to return -EINTR;
 *   - about to call KVM_RUN: immediate_exit makes KVM_RUN return -EINTR at
 *     once, after completing any pending port/MMIO instruction;
 *   - in the caller, handling an exit: its next kvm_vcpu_run() enters
 *     KVM_RUN with immediate_exit set, as above.
 * The request flag and immediate_exit are set, and immediate_exit is cleared
 * again, under the vCPU's mutex, so a kick cannot be lost between the check
 * and KVM_RUN.  Going through KVM_RUN with immediate_exit (rather than
 * parking before it) matters: KVM finishes an `in`/`out` only on the next
 * KVM_RUN, and until then RIP still points at the instruction.
 * kvm_vm_hold() parks vCPUs the same way around memory slot changes, under
 * its own counter, so that a slot change never resumes a paused vCPU.
 *
 * Interrupt controller.  We do not create an in-kernel irqchip.  The guest
 * runs at CPL 3 with IF=0 and takes no interrupts, so there is no LAPIC,
 * IOAPIC, PIC or PIT state to save; KVM_GET_LAPIC would fail with ENXIO.
 * The vCPU's MP state is always RUNNABLE.  A guest that needed timers
 * would need KVM_CREATE_IRQCHIP and KVM_GET/SET_LAPIC in the vCPU state.
 *
 * MSRs.  Only MSRs that survive a KVM_GET_MSRS on one vCPU followed by
 * KVM_SET_MSRS on a fresh vCPU of another VM are saved; see msr_candidates.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "kvm/kvm.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define KVM_DEV_PATH	"/dev/kvm"
#define PAGE_SIZE	4096ULL
#define MAX_VCPUS	64

/*
 * ioctl with an argument pointer whose type is checked against the size
 * encoded in the request number, so passing the wrong struct fails to
 * compile.  Variable-length arguments pass their fixed header.
 */
#define kvm_ioctl(fd, req, arg)						\
	({								\
		_Static_assert(sizeof(*(arg)) == _IOC_SIZE(req),	\
			       #req ": wrong argument type");		\
		ioctl(fd, req, arg);					\
	})

struct kvm_slot {
	bool used;
	uint32_t flags;		/* KVM_VM_SLOT_* */
	uint64_t gpa;
	uint64_t size;
	void *hva;
};

struct kvm_vm {
	int sys_fd;
	int fd;
	struct kvm_caps caps;
	int kick_signal;
	bool manual_dirty_log;
	struct kvm_slot slots[KVM_VM_MAX_SLOTS];
	struct kvm_cpuid2 *cpuid;	/* host-supported CPUID */
	uint32_t msrs[KVM_VCPU_STATE_MAX_MSRS];	/* saved on this host */
	size_t nmsrs;
	struct kvm_vcpu *vcpus[MAX_VCPUS];
};

struct kvm_vcpu {
	struct kvm_vm *vm;
	uint32_t id;
	int fd;
	struct kvm_run *run;
	size_t run_size;

	/* Pause protocol; see the top of the file.  All under lock. */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	pthread_t thread;
	bool has_thread;	/* a thread called kvm_vcpu_thread_init() */
	bool pause_req;
	unsigned hold;		/* kvm_vm_hold() depth; parks like a pause */
	bool stop_req;
	bool parked;		/* thread is waiting in kvm_vcpu_run() */
};

/* Under vcpu->lock: is anything asking the thread to park? A pause and a
 * hold are independent, so releasing a hold never resumes a paused vCPU
 * and resuming never ends a hold. */
static bool park_wanted(const struct kvm_vcpu *vcpu)
{
	return vcpu->pause_req || vcpu->hold;
}

/*
 * MSRs saved and restored with the vCPU, in restore order.  Measured on the
 * kvm_pvm host this was written on (kvmprobe): each was read from a vCPU
 * that had run the guest, written to a fresh vCPU of another VM and read
 * back unchanged.  Candidates missing from the host's
 * KVM_GET_MSR_INDEX_LIST are dropped at VM creation; TSC_AUX and SPEC_CTRL
 * are missing there, which leaves 19 MSRs.
 *
 * Left out on purpose:
 *   - KVM_ASYNC_PF_INT (0x4b564d06): KVM_SET_MSRS rejects even the 0 it
 *     returns from KVM_GET_MSRS.
 *   - IA32_ARCH_CAPABILITIES (0x10a): writing the host's feature value
 *     (KVM_GET_MSRS on /dev/kvm) is rejected under kvm_pvm; the vCPU's own
 *     value is 0.  Feature MSRs (ARCH_CAPABILITIES, PERF_CAPABILITIES,
 *     PLATFORM_INFO, microcode revision) describe the CPU model: the VMM
 *     configures them identically on both sides, they are not state.
 *   - MCG_*, SMI_COUNT, HWCR, VM_HSAVE_PA, VIRT_SPEC_CTRL, POWER_CTL, LBR
 *     MSRs: they round-trip but a CPL-3 guest cannot touch them.
 *   - TSC_DEADLINE: meaningless without an in-kernel LAPIC.
 * TSC comes last: KVM takes a host write to IA32_TSC as "make the guest's
 * TSC read this value now", so the guest TSC stands still while the vCPU
 * is stopped and continues from where it was.  (KVM_VCPU_TSC_OFFSET would
 * instead keep the offset to the host TSC, which only makes sense on the
 * same host.)
 */
static const uint32_t msr_candidates[] = {
	0x00000174,	/* IA32_SYSENTER_CS */
	0x00000175,	/* IA32_SYSENTER_ESP */
	0x00000176,	/* IA32_SYSENTER_EIP */
	0x00000277,	/* IA32_PAT */
	0x000001a0,	/* IA32_MISC_ENABLE */
	0x000001d9,	/* IA32_DEBUGCTL */
	0xc0000081,	/* STAR */
	0xc0000082,	/* LSTAR */
	0xc0000083,	/* CSTAR */
	0xc0000084,	/* SFMASK */
	0xc0000102,	/* KERNEL_GS_BASE */
	0xc0000103,	/* TSC_AUX */
	0x00000048,	/* IA32_SPEC_CTRL */
	0x4b564d00,	/* KVM_WALL_CLOCK_NEW */
	0x4b564d01,	/* KVM_SYSTEM_TIME_NEW */
	0x4b564d02,	/* KVM_ASYNC_PF_EN */
	0x4b564d03,	/* KVM_STEAL_TIME */
	0x4b564d04,	/* KVM_PV_EOI_EN */
	0x4b564d05,	/* KVM_POLL_CONTROL */
	0x0000003b,	/* IA32_TSC_ADJUST */
	0x00000010,	/* IA32_TSC */
};

_Static_assert(sizeof(msr_candidates) / sizeof(msr_candidates[0]) <=
	       KVM_VCPU_STATE_MAX_MSRS, "too many MSRs for kvm_vcpu_state");

__attribute__((format(printf, 3, 4)))
static int fail(struct kvm_err *err, int code, const char *fmt, ...)
{
	va_list ap;

	if (err) {
		err->code = code;
		va_start(ap, fmt);
		vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
		va_end(ap);
	}
	return code;
}

/* fail() for a failed syscall: appends strerror(errno). */
#define fail_errno(err, what, ...)					\
	({								\
		int __e = errno;					\
		fail(err, -__e, what ": %s", ##__VA_ARGS__,		\
		     strerror(__e));					\
	})

/* ---- VM -------------------------------------------------------------- */

static int check_cap(struct kvm_vm *vm, long cap)
{
	int r = ioctl(vm->fd, KVM_CHECK_EXTENSION, cap);

	return r < 0 ? 0 : r;
}

static void probe_caps(struct kvm_vm *vm)
{
	struct kvm_caps *c = &vm->caps;
	int r;

	c->nr_memslots = check_cap(vm, KVM_CAP_NR_MEMSLOTS);
	c->immediate_exit = check_cap(vm, KVM_CAP_IMMEDIATE_EXIT);
	c->manual_dirty_log = check_cap(vm, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
	c->sregs2 = check_cap(vm, KVM_CAP_SREGS2);
	c->xsave = check_cap(vm, KVM_CAP_XSAVE);
	r = check_cap(vm, KVM_CAP_XSAVE2);
	c->xsave2 = r > 0;
	c->xsave_size = r > (int)sizeof(struct kvm_xsave) ?
			(uint32_t)r : sizeof(struct kvm_xsave);
	c->xcrs = check_cap(vm, KVM_CAP_XCRS);
	c->debugregs = check_cap(vm, KVM_CAP_DEBUGREGS);
	c->vcpu_events = check_cap(vm, KVM_CAP_VCPU_EVENTS);
	c->tsc_khz = check_cap(vm, KVM_CAP_GET_TSC_KHZ);
	c->tsc_control = check_cap(vm, KVM_CAP_TSC_CONTROL);
	c->vcpu_mmap_size = ioctl(vm->sys_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
}

/* Fetch a variable-length list from /dev/kvm, growing the buffer on E2BIG. */
static int get_cpuid(struct kvm_vm *vm, struct kvm_err *err)
{
	uint32_t n = 64;

	for (;;) {
		struct kvm_cpuid2 *c;

		c = calloc(1, sizeof(*c) + n * sizeof(c->entries[0]));
		if (!c)
			return fail(err, -ENOMEM, "out of memory");
		c->nent = n;
		if (kvm_ioctl(vm->sys_fd, KVM_GET_SUPPORTED_CPUID, c) == 0) {
			vm->cpuid = c;
			return 0;
		}
		free(c);
		if (errno != E2BIG || n >= 4096)
			return fail_errno(err, "KVM_GET_SUPPORTED_CPUID");
		n *= 2;
	}
}

static int pick_msrs(struct kvm_vm *vm, struct kvm_err *err)
{
	struct kvm_msr_list *list;
	uint32_t n = 256;
	size_t i, j;

	for (;;) {
		list = calloc(1, sizeof(*list) + n * sizeof(list->indices[0]));
		if (!list)
			return fail(err, -ENOMEM, "out of memory");
		list->nmsrs = n;
		if (kvm_ioctl(vm->sys_fd, KVM_GET_MSR_INDEX_LIST, list) == 0)
			break;
		free(list);
		if (errno != E2BIG || n >= 16384)
			return fail_errno(err, "KVM_GET_MSR_INDEX_LIST");
		n *= 4;
	}

	vm->nmsrs = 0;
	for (i = 0; i < sizeof(msr_candidates) / sizeof(msr_candidates[0]); i++) {
		for (j = 0; j < list->nmsrs; j++) {
			if (list->indices[j] == msr_candidates[i]) {
				vm->msrs[vm->nmsrs++] = msr_candidates[i];
				break;
			}
		}
	}
	free(list);
	return 0;
}

static int enable_manual_dirty_log(struct kvm_vm *vm, bool initially_set,
				   struct kvm_err *err)
{
	int avail = check_cap(vm, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
	struct kvm_enable_cap cap = {
		.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
		.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
	};

	if (!avail)
		return 0;	/* fall back to KVM_GET_DIRTY_LOG alone */
	if (initially_set && (avail & KVM_DIRTY_LOG_INITIALLY_SET))
		cap.args[0] |= KVM_DIRTY_LOG_INITIALLY_SET;
	if (kvm_ioctl(vm->fd, KVM_ENABLE_CAP, &cap) < 0)
		return fail_errno(err, "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)");
	vm->manual_dirty_log = true;
	return 0;
}

int kvm_vm_create(struct kvm_vm **out, const struct kvm_vm_opts *opts,
		  struct kvm_err *err)
{
	struct kvm_vm_opts defaults = { 0 };
	struct kvm_vm *vm;
	int r;

	if (!opts)
		opts = &defaults;
	vm = calloc(1, sizeof(*vm));
	if (!vm)
		return fail(err, -ENOMEM, "out of memory");
	vm->fd = -1;
	vm->kick_signal = opts->kick_signal ? opts->kick_signal : SIGUSR1;

	vm->sys_fd = open(KVM_DEV_PATH, O_RDWR | O_CLOEXEC);
	if (vm->sys_fd < 0) {
		r = fail_errno(err, "open " KVM_DEV_PATH
			       " (is KVM loaded and accessible?)");
		goto err_free;
	}

	vm->caps.api_version = ioctl(vm->sys_fd, KVM_GET_API_VERSION, 0);
	if (vm->caps.api_version != KVM_API_VERSION) {
		r = fail(err, -ENOTSUP, "KVM API version %d, expected %d",
			 vm->caps.api_version, KVM_API_VERSION);
		goto err_sys;
	}

	vm->fd = ioctl(vm->sys_fd, KVM_CREATE_VM, 0);
	if (vm->fd < 0) {
		r = fail_errno(err, "KVM_CREATE_VM");
		goto err_sys;
	}

	probe_caps(vm);
	if (!vm->caps.immediate_exit) {
		r = fail(err, -ENOTSUP, "KVM_CAP_IMMEDIATE_EXIT not supported");
		goto err_vm;
	}
	if (vm->caps.vcpu_mmap_size < (int)sizeof(struct kvm_run)) {
		r = fail_errno(err, "KVM_GET_VCPU_MMAP_SIZE");
		goto err_vm;
	}

	if (opts->manual_dirty_log) {
		r = enable_manual_dirty_log(vm, opts->dirty_log_initially_set,
					    err);
		if (r)
			goto err_vm;
	}

	r = get_cpuid(vm, err);
	if (r)
		goto err_vm;
	r = pick_msrs(vm, err);
	if (r)
		goto err_cpuid;

	*out = vm;
	return 0;

err_cpuid:
	free(vm->cpuid);
err_vm:
	close(vm->fd);
err_sys:
	close(vm->sys_fd);
err_free:
	free(vm);
	return r;
}

void kvm_vm_destroy(struct kvm_vm *vm)
{
	size_t i;

	if (!vm)
		return;
	for (i = 0; i < MAX_VCPUS; i++)
		kvm_vcpu_destroy(vm->vcpus[i]);
	close(vm->fd);
	close(vm->sys_fd);
	free(vm->cpuid);
	free(vm);
}

const struct kvm_caps *kvm_vm_caps(const struct kvm_vm *vm)
{
	return &vm->caps;
}

int kvm_vm_fd(const struct kvm_vm *vm)
{
	return vm->fd;
}

bool kvm_vm_manual_dirty_log(const struct kvm_vm *vm)
{
	return vm->manual_dirty_log;
}

static int apply_slot(struct kvm_vm *vm, uint32_t slot, struct kvm_err *err)
{
	const struct kvm_slot *s = &vm->slots[slot];
	struct kvm_userspace_memory_region region = {
		.slot = slot,
		.guest_phys_addr = s->gpa,
		.memory_size = s->used ? s->size : 0,
		.userspace_addr = (uintptr_t)s->hva,
	};

	if (s->flags & KVM_VM_SLOT_DIRTY_LOG)
		region.flags |= KVM_MEM_LOG_DIRTY_PAGES;
	if (s->flags & KVM_VM_SLOT_READONLY)
		region.flags |= KVM_MEM_READONLY;
	if (kvm_ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		return fail_errno(err, "KVM_SET_USER_MEMORY_REGION(slot %u, "
				  "gpa %#llx, size %#llx)", slot,
				  (unsigned long long)s->gpa,
				  (unsigned long long)s->size);
	return 0;
}

int kvm_vm_set_memslot(struct kvm_vm *vm, uint32_t slot, uint64_t gpa,
		       uint64_t size, void *hva, uint32_t flags,
		       struct kvm_err *err)
{
	struct kvm_slot old;
	int r;

	if (slot >= KVM_VM_MAX_SLOTS)
		return fail(err, -EINVAL, "memslot %u out of range", slot);
	if ((gpa | size | (uintptr_t)hva) & (PAGE_SIZE - 1))
		return fail(err, -EINVAL, "memslot %u not page aligned", slot);

	old = vm->slots[slot];
	/* KVM cannot resize or move a slot: delete it first. */
	if (old.used && size && (old.gpa != gpa || old.size != size ||
				 old.hva != hva)) {
		vm->slots[slot].used = false;
		r = apply_slot(vm, slot, err);
		if (r) {
			vm->slots[slot] = old;
			return r;
		}
	}

	vm->slots[slot] = (struct kvm_slot){
		.used = size != 0, .flags = flags,
		.gpa = gpa, .size = size, .hva = hva,
	};
	r = apply_slot(vm, slot, err);
	if (r)
		vm->slots[slot].used = false;
	return r;
}

int kvm_vm_set_dirty_logging(struct kvm_vm *vm, uint32_t slot, bool on,
			     struct kvm_err *err)
{
	struct kvm_slot *s;
	uint32_t old;
	int r;

	if (slot >= KVM_VM_MAX_SLOTS || !vm->slots[slot].used)
		return fail(err, -EINVAL, "memslot %u not in use", slot);
	s = &vm->slots[slot];
	old = s->flags;
	if (on)
		s->flags |= KVM_VM_SLOT_DIRTY_LOG;
	else
		s->flags &= ~KVM_VM_SLOT_DIRTY_LOG;
	r = apply_slot(vm, slot, err);
	if (r)
		s->flags = old;
	return r;
}

void *kvm_vm_gpa_to_hva(const struct kvm_vm *vm, uint64_t gpa, uint64_t len)
{
	size_t i;

	for (i = 0; i < KVM_VM_MAX_SLOTS; i++) {
		const struct kvm_slot *s = &vm->slots[i];

		if (s->used && gpa >= s->gpa && len <= s->size &&
		    gpa - s->gpa <= s->size - len)
			return (uint8_t *)s->hva + (gpa - s->gpa);
	}
	return NULL;
}

int kvm_vm_write(struct kvm_vm *vm, uint64_t gpa, const void *src,
		 uint64_t len, struct kvm_err *err)
{
	void *dst = kvm_vm_gpa_to_hva(vm, gpa, len);

	if (!dst)
		return fail(err, -EFAULT, "guest range %#llx+%#llx not in RAM",
			    (unsigned long long)gpa, (unsigned long long)len);
	memcpy(dst, src, len);
	return 0;
}

/* ---- dirty log ------------------------------------------------------- */

static int check_log_slot(struct kvm_vm *vm, uint32_t slot,
			  struct kvm_err *err)
{
	if (slot >= KVM_VM_MAX_SLOTS || !vm->slots[slot].used)
		return fail(err, -EINVAL, "memslot %u not in use", slot);
	if (!(vm->slots[slot].flags & KVM_VM_SLOT_DIRTY_LOG))
		return fail(err, -EINVAL, "memslot %u: dirty logging is off",
			    slot);
	return 0;
}

int kvm_vm_dirty_log_get(struct kvm_vm *vm, uint32_t slot, uint64_t *bitmap,
			 struct kvm_err *err)
{
	struct kvm_dirty_log log = { .slot = slot, .dirty_bitmap = bitmap };
	int r = check_log_slot(vm, slot, err);

	if (r)
		return r;
	if (kvm_ioctl(vm->fd, KVM_GET_DIRTY_LOG, &log) < 0)
		return fail_errno(err, "KVM_GET_DIRTY_LOG(slot %u)", slot);
	return 0;
}

int kvm_vm_dirty_log_clear(struct kvm_vm *vm, uint32_t slot, uint64_t first,
			   uint64_t npages, const uint64_t *bitmap,
			   struct kvm_err *err)
{
	struct kvm_clear_dirty_log clr = {
		.slot = slot,
		.first_page = first,
		.num_pages = (uint32_t)npages,
		.dirty_bitmap = (void *)bitmap,
	};
	int r = check_log_slot(vm, slot, err);

	if (r)
		return r;
	if (!vm->manual_dirty_log)
		return fail(err, -EOPNOTSUPP,
			    "KVM_CLEAR_DIRTY_LOG needs manual dirty-log mode");
	if (npages > UINT32_MAX)
		return fail(err, -EINVAL, "too many pages to clear at once");
	if (kvm_ioctl(vm->fd, KVM_CLEAR_DIRTY_LOG, &clr) < 0)
		return fail_errno(err, "KVM_CLEAR_DIRTY_LOG(slot %u, %llu+%llu)",
				  slot, (unsigned long long)first,
				  (unsigned long long)npages);
	return 0;
}

int kvm_vm_dirty_log_sync(struct kvm_vm *vm, uint32_t slot, uint64_t *bitmap,
			  struct kvm_err *err)
{
	uint64_t pages, words, lo, hi, first, n;
	int r;

	r = kvm_vm_dirty_log_get(vm, slot, bitmap, err);
	if (r || !vm->manual_dirty_log)
		return r;

	/*
	 * Re-arm only the span that has dirty pages: clearing walks the span
	 * in the kernel even where the bitmap is zero.
	 */
	pages = vm->slots[slot].size / PAGE_SIZE;
	words = kvm_dirty_bitmap_words(vm->slots[slot].size);
	for (lo = 0; lo < words && !bitmap[lo]; lo++)
		;
	if (lo == words)
		return 0;
	for (hi = words; !bitmap[hi - 1]; hi--)
		;
	first = lo * 64;
	n = (hi * 64 > pages ? pages : hi * 64) - first;
	return kvm_vm_dirty_log_clear(vm, slot, first, n, bitmap + lo, err);
}

/* ---- page tables ----------------------------------------------------- */

#define PTE_P		(1ULL << 0)
#define PTE_RW		(1ULL << 1)
#define PTE_US		(1ULL << 2)
#define PTE_PS		(1ULL << 7)

int kvm_vm_build_identity_map(struct kvm_vm *vm, uint64_t pt_gpa,
			      uint64_t pt_size, uint64_t map_bytes,
			      struct kvm_err *err)
{
	uint64_t npd = (map_bytes + (1ULL << 30) - 1) >> 30;
	uint64_t *pml4, *pdpt, *pd, i, j;

	if (npd > 512)
		return fail(err, -EINVAL, "identity map limited to 512 GiB");
	if ((2 + npd) * PAGE_SIZE > pt_size)
		return fail(err, -ENOSPC, "page tables for %llu MiB need %llu "
			    "bytes, %llu available",
			    (unsigned long long)(map_bytes >> 20),
			    (unsigned long long)((2 + npd) * PAGE_SIZE),
			    (unsigned long long)pt_size);
	if (pt_gpa & (PAGE_SIZE - 1))
		return fail(err, -EINVAL, "page tables not page aligned");
	pml4 = kvm_vm_gpa_to_hva(vm, pt_gpa, (2 + npd) * PAGE_SIZE);
	if (!pml4)
		return fail(err, -EFAULT, "page tables at %#llx not in RAM",
			    (unsigned long long)pt_gpa);

	memset(pml4, 0, (2 + npd) * PAGE_SIZE);
	pdpt = pml4 + 512;
	pd = pdpt + 512;

	/* U/S must be set at every level for CPL-3 access. */
	pml4[0] = (pt_gpa + PAGE_SIZE) | PTE_P | PTE_RW | PTE_US;
	for (i = 0; i < npd; i++) {
		pdpt[i] = (pt_gpa + (2 + i) * PAGE_SIZE) | PTE_P | PTE_RW |
			  PTE_US;
		for (j = 0; j < 512; j++)
			pd[i * 512 + j] = ((i << 30) | (j << 21)) | PTE_P |
					  PTE_RW | PTE_US | PTE_PS;
	}
	return 0;
}

/* ---- vCPU ------------------------------------------------------------ */

int kvm_vcpu_create(struct kvm_vm *vm, uint32_t id, struct kvm_vcpu **out,
		    struct kvm_err *err)
{
	struct kvm_vcpu *vcpu;
	int r;

	if (id >= MAX_VCPUS || vm->vcpus[id])
		return fail(err, -EINVAL, "vCPU id %u invalid or in use", id);

	vcpu = calloc(1, sizeof(*vcpu));
	if (!vcpu)
		return fail(err, -ENOMEM, "out of memory");
	vcpu->vm = vm;
	vcpu->id = id;
	pthread_mutex_init(&vcpu->lock, NULL);
	pthread_cond_init(&vcpu->cond, NULL);

	vcpu->fd = ioctl(vm->fd, KVM_CREATE_VCPU, (unsigned long)id);
	if (vcpu->fd < 0) {
		r = fail_errno(err, "KVM_CREATE_VCPU(%u)", id);
		goto err_free;
	}

	vcpu->run_size = (size_t)vm->caps.vcpu_mmap_size;
	vcpu->run = mmap(NULL, vcpu->run_size, PROT_READ | PROT_WRITE,
			 MAP_SHARED, vcpu->fd, 0);
	if (vcpu->run == MAP_FAILED) {
		r = fail_errno(err, "mmap kvm_run of vCPU %u", id);
		goto err_close;
	}

	if (kvm_ioctl(vcpu->fd, KVM_SET_CPUID2, vm->cpuid) < 0) {
		r = fail_errno(err, "KVM_SET_CPUID2(vCPU %u)", id);
		goto err_unmap;
	}

	vm->vcpus[id] = vcpu;
	*out = vcpu;
	return 0;

err_unmap:
	munmap(vcpu->run, vcpu->run_size);
err_close:
	close(vcpu->fd);
err_free:
	pthread_cond_destroy(&vcpu->cond);
	pthread_mutex_destroy(&vcpu->lock);
	free(vcpu);
	return r;
}

void kvm_vcpu_destroy(struct kvm_vcpu *vcpu)
{
	if (!vcpu)
		return;
	vcpu->vm->vcpus[vcpu->id] = NULL;
	munmap(vcpu->run, vcpu->run_size);
	close(vcpu->fd);
	pthread_cond_destroy(&vcpu->cond);
	pthread_mutex_destroy(&vcpu->lock);
	free(vcpu);
}

int kvm_vcpu_fd(const struct kvm_vcpu *vcpu)
{
	return vcpu->fd;
}

uint32_t kvm_vcpu_id(const struct kvm_vcpu *vcpu)
{
	return vcpu->id;
}

struct kvm_run *kvm_vcpu_run_page(const struct kvm_vcpu *vcpu)
{
	return vcpu->run;
}

#define CR0_PE		(1ULL << 0)
#define CR0_MP		(1ULL << 1)
#define CR0_ET		(1ULL << 4)
#define CR0_NE		(1ULL << 5)
#define CR0_WP		(1ULL << 16)
#define CR0_PG		(1ULL << 31)
#define CR4_PAE		(1ULL << 5)
#define CR4_OSFXSR	(1ULL << 9)
#define CR4_OSXMMEXCPT	(1ULL << 10)
#define EFER_LME	(1ULL << 8)
#define EFER_LMA	(1ULL << 10)
#define RFLAGS_FIXED	(1ULL << 1)
#define RFLAGS_IOPL3	(3ULL << 12)

/*
 * Selectors as if there were a GDT laid out like Linux's (user data 5,
 * user code 6).  There is none: segment state lives in the hidden parts
 * set here, and the guest never reloads a segment register.
 */
#define SEL_USER_DS	((5 << 3) | 3)
#define SEL_USER_CS	((6 << 3) | 3)
#define SEL_TSS		(8 << 3)

int kvm_vcpu_setup_user_long_mode(struct kvm_vcpu *vcpu, uint64_t cr3,
				  uint64_t rip, uint64_t rsp,
				  struct kvm_err *err)
{
	struct kvm_segment code = {
		.base = 0, .limit = 0xffffffff, .selector = SEL_USER_CS,
		.type = 11,	/* execute/read, accessed */
		.present = 1, .dpl = 3, .db = 0, .s = 1, .l = 1, .g = 1,
	};
	struct kvm_segment data = {
		.base = 0, .limit = 0xffffffff, .selector = SEL_USER_DS,
		.type = 3,	/* read/write, accessed */
		.present = 1, .dpl = 3, .db = 1, .s = 1, .l = 0, .g = 1,
	};
	/* VM entry insists on a busy 64-bit TSS even if nothing uses it. */
	struct kvm_segment tss = {
		.base = 0, .limit = 0x67, .selector = SEL_TSS,
		.type = 11, .present = 1, .s = 0,
	};
	struct kvm_segment ldt = { .type = 2, .unusable = 1 };
	struct kvm_sregs sregs;
	struct kvm_regs regs = {
		.rip = rip,
		.rsp = rsp,
		.rflags = RFLAGS_FIXED | RFLAGS_IOPL3,	/* IF = 0 */
	};

	if (kvm_ioctl(vcpu->fd, KVM_GET_SREGS, &sregs) < 0)
		return fail_errno(err, "KVM_GET_SREGS");

	sregs.cs = code;
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
	sregs.tr = tss;
	sregs.ldt = ldt;
	sregs.gdt = (struct kvm_dtable){ 0 };
	sregs.idt = (struct kvm_dtable){ 0 };	/* exceptions triple-fault */
	sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
	sregs.cr3 = cr3;
	sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
	sregs.efer = EFER_LME | EFER_LMA;
	memset(sregs.interrupt_bitmap, 0, sizeof(sregs.interrupt_bitmap));

	if (kvm_ioctl(vcpu->fd, KVM_SET_SREGS, &sregs) < 0)
		return fail_errno(err, "KVM_SET_SREGS (64-bit CPL 3)");
	if (kvm_ioctl(vcpu->fd, KVM_SET_REGS, &regs) < 0)
		return fail_errno(err, "KVM_SET_REGS");
	return 0;
}

int kvm_vcpu_get_tsc_khz(struct kvm_vcpu *vcpu, uint32_t *khz,
			 struct kvm_err *err)
{
	int r;

	if (!vcpu->vm->caps.tsc_khz)
		return fail(err, -ENOTSUP, "KVM_GET_TSC_KHZ not supported");
	r = ioctl(vcpu->fd, KVM_GET_TSC_KHZ, 0);
	if (r <= 0)
		return r < 0 ? fail_errno(err, "KVM_GET_TSC_KHZ") :
			       fail(err, -EIO, "KVM_GET_TSC_KHZ returned 0");
	*khz = (uint32_t)r;
	return 0;
}

/* ---- running --------------------------------------------------------- */

static void kick_handler(int sig)
{
	(void)sig;	/* the only point is to interrupt KVM_RUN */
}

int kvm_vcpu_thread_init(struct kvm_vcpu *vcpu, struct kvm_err *err)
{
	int sig = vcpu->vm->kick_signal;
	struct sigaction sa, old;
	sigset_t set;

	/*
	 * A handler (not SIG_IGN, whose signals are discarded) is what makes
	 * the signal interrupt KVM_RUN.  Install ours only where nothing is
	 * installed yet; any handler does the job.
	 */
	if (sigaction(sig, NULL, &old) < 0)
		return fail_errno(err, "sigaction(%d)", sig);
	if (old.sa_handler == SIG_DFL || old.sa_handler == SIG_IGN) {
		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = kick_handler;
		sigemptyset(&sa.sa_mask);
		if (sigaction(sig, &sa, NULL) < 0)
			return fail_errno(err, "sigaction(%d)", sig);
	}
	sigemptyset(&set);
	sigaddset(&set, sig);
	pthread_sigmask(SIG_UNBLOCK, &set, NULL);

	pthread_mutex_lock(&vcpu->lock);
	vcpu->thread = pthread_self();
	vcpu->has_thread = true;
	vcpu->stop_req = false;
	if (!park_wanted(vcpu))
		__atomic_store_n(&vcpu->run->immediate_exit, 0,
				 __ATOMIC_SEQ_CST);
	pthread_mutex_unlock(&vcpu->lock);
	return 0;
}

void kvm_vcpu_thread_exit(struct kvm_vcpu *vcpu)
{
	pthread_mutex_lock(&vcpu->lock);
	vcpu->has_thread = false;
	vcpu->parked = false;
	pthread_cond_broadcast(&vcpu->cond);
	pthread_mutex_unlock(&vcpu->lock);
}

/* Mark a kick request and make sure the thread notices.  Under lock. */
static void kick_locked(struct kvm_vcpu *vcpu)
{
	__atomic_store_n(&vcpu->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
	if (vcpu->has_thread && !pthread_equal(vcpu->thread, pthread_self()))
		pthread_kill(vcpu->thread, vcpu->vm->kick_signal);
}

/*
 * KVM_RUN returned -EINTR: park while a pause is requested.  Returns true
 * if the vCPU is to stop.
 */
static bool handle_kick(struct kvm_vcpu *vcpu)
{
	bool stop;

	pthread_mutex_lock(&vcpu->lock);
	while (park_wanted(vcpu) && !vcpu->stop_req) {
		if (!vcpu->parked) {
			vcpu->parked = true;
			pthread_cond_broadcast(&vcpu->cond);
		}
		pthread_cond_wait(&vcpu->cond, &vcpu->lock);
	}
	vcpu->parked = false;
	stop = vcpu->stop_req;
	if (!stop)
		__atomic_store_n(&vcpu->run->immediate_exit, 0,
				 __ATOMIC_SEQ_CST);
	pthread_mutex_unlock(&vcpu->lock);
	return stop;
}

static uint64_t guest_rip(struct kvm_vcpu *vcpu)
{
	struct kvm_regs regs;

	if (kvm_ioctl(vcpu->fd, KVM_GET_REGS, &regs) < 0)
		return ~0ULL;
	return regs.rip;
}

static int exit_error(struct kvm_vcpu *vcpu, struct kvm_err *err)
{
	struct kvm_run *run = vcpu->run;
	unsigned long long rip = guest_rip(vcpu);

	switch (run->exit_reason) {
	case KVM_EXIT_SHUTDOWN:
		return fail(err, -EIO, "vCPU %u: guest shut down (triple "
			    "fault) at rip %#llx", vcpu->id, rip);
	case KVM_EXIT_FAIL_ENTRY:
		return fail(err, -EIO, "vCPU %u: VM entry failed, hardware "
			    "reason %#llx, rip %#llx", vcpu->id,
			    (unsigned long long)run->fail_entry
				    .hardware_entry_failure_reason, rip);
	case KVM_EXIT_INTERNAL_ERROR: {
		char data[96] = "";
		uint32_t i, n = run->internal.ndata;
		size_t len = 0;

		if (n > 4)
			n = 4;
		for (i = 0; i < n && len < sizeof(data); i++)
			len += (size_t)snprintf(data + len, sizeof(data) - len,
						" %#llx", (unsigned long long)
						run->internal.data[i]);
		return fail(err, -EIO, "vCPU %u: KVM internal error, "
			    "suberror %u, rip %#llx, data:%s", vcpu->id,
			    run->internal.suberror, rip, data);
	}
	default:
		return fail(err, -EIO, "vCPU %u: unexpected exit reason %u at "
			    "rip %#llx", vcpu->id, run->exit_reason, rip);
	}
}

int kvm_vcpu_run(struct kvm_vcpu *vcpu, struct kvm_vcpu_exit *exit,
		 struct kvm_err *err)
{
	struct kvm_run *run = vcpu->run;

	for (;;) {
		if (ioctl(vcpu->fd, KVM_RUN, 0) < 0) {
			if (errno != EINTR && errno != EAGAIN)
				return fail_errno(err, "KVM_RUN(vCPU %u)",
						  vcpu->id);
			if (handle_kick(vcpu)) {
				memset(exit, 0, sizeof(*exit));
				exit->kind = KVM_VCPU_EXIT_STOPPED;
				exit->reason = KVM_EXIT_INTR;
				return 0;
			}
			continue;
		}

		memset(exit, 0, sizeof(*exit));
		exit->reason = run->exit_reason;
		switch (run->exit_reason) {
		case KVM_EXIT_IO:
			exit->kind = KVM_VCPU_EXIT_IO;
			exit->io.port = run->io.port;
			exit->io.size = run->io.size;
			exit->io.out = run->io.direction == KVM_EXIT_IO_OUT;
			exit->io.count = run->io.count;
			exit->io.data = (uint8_t *)run + run->io.data_offset;
			return 0;
		case KVM_EXIT_MMIO:
			exit->kind = KVM_VCPU_EXIT_MMIO;
			exit->mmio.gpa = run->mmio.phys_addr;
			exit->mmio.len = run->mmio.len;
			exit->mmio.write = run->mmio.is_write;
			exit->mmio.data = run->mmio.data;
			return 0;
		case KVM_EXIT_HLT:
			exit->kind = KVM_VCPU_EXIT_HLT;
			return 0;
		case KVM_EXIT_INTR:
			/* Signal seen on the way in; treat like -EINTR. */
			if (handle_kick(vcpu)) {
				exit->kind = KVM_VCPU_EXIT_STOPPED;
				return 0;
			}
			continue;
		default:
			return exit_error(vcpu, err);
		}
	}
}

/* Request a pause; the caller then waits with wait_parked(). */
static void request_pause(struct kvm_vcpu *vcpu)
{
	pthread_mutex_lock(&vcpu->lock);
	vcpu->pause_req = true;
	kick_locked(vcpu);
	pthread_mutex_unlock(&vcpu->lock);
}

/* A vCPU's own thread, handling an exit, is out of KVM_RUN already: it
 * does not wait for itself (it parks on its next kvm_vcpu_run()). */
static void wait_parked(struct kvm_vcpu *vcpu)
{
	pthread_mutex_lock(&vcpu->lock);
	while (vcpu->has_thread && !vcpu->parked && park_wanted(vcpu) &&
	       !pthread_equal(vcpu->thread, pthread_self()))
		pthread_cond_wait(&vcpu->cond, &vcpu->lock);
	pthread_mutex_unlock(&vcpu->lock);
}

int kvm_vcpu_pause(struct kvm_vcpu *vcpu, struct kvm_err *err)
{
	(void)err;
	request_pause(vcpu);
	wait_parked(vcpu);
	return 0;
}

void kvm_vcpu_resume(struct kvm_vcpu *vcpu)
{
	pthread_mutex_lock(&vcpu->lock);
	vcpu->pause_req = false;
	pthread_cond_broadcast(&vcpu->cond);
	pthread_mutex_unlock(&vcpu->lock);
}

void kvm_vcpu_stop(struct kvm_vcpu *vcpu)
{
	pthread_mutex_lock(&vcpu->lock);
	vcpu->stop_req = true;
	kick_locked(vcpu);
	pthread_cond_broadcast(&vcpu->cond);
	pthread_mutex_unlock(&vcpu->lock);
}

int kvm_vm_pause(struct kvm_vm *vm, struct kvm_err *err)
{
	size_t i;

	(void)err;
	/* Kick everyone first so the vCPUs leave KVM_RUN in parallel. */
	for (i = 0; i < MAX_VCPUS; i++)
		if (vm->vcpus[i])
			request_pause(vm->vcpus[i]);
	for (i = 0; i < MAX_VCPUS; i++)
		if (vm->vcpus[i])
			wait_parked(vm->vcpus[i]);
	return 0;
}

void kvm_vm_resume(struct kvm_vm *vm)
{
	size_t i;

	for (i = 0; i < MAX_VCPUS; i++)
		if (vm->vcpus[i])
			kvm_vcpu_resume(vm->vcpus[i]);
}

int kvm_vm_hold(struct kvm_vm *vm, struct kvm_err *err)
{
	size_t i;

	(void)err;
	for (i = 0; i < MAX_VCPUS; i++) {
		struct kvm_vcpu *vcpu = vm->vcpus[i];

		if (!vcpu)
			continue;
		pthread_mutex_lock(&vcpu->lock);
		vcpu->hold++;
		kick_locked(vcpu);
		pthread_mutex_unlock(&vcpu->lock);
	}
	for (i = 0; i < MAX_VCPUS; i++)
		if (vm->vcpus[i])
			wait_parked(vm->vcpus[i]);
	return 0;
}

void kvm_vm_release(struct kvm_vm *vm)
{
	size_t i;

	for (i = 0; i < MAX_VCPUS; i++) {
		struct kvm_vcpu *vcpu = vm->vcpus[i];

		if (!vcpu)
			continue;
		pthread_mutex_lock(&vcpu->lock);
		if (vcpu->hold)
			vcpu->hold--;
		pthread_cond_broadcast(&vcpu->cond);
		pthread_mutex_unlock(&vcpu->lock);
	}
}

/* ---- state ----------------------------------------------------------- */

/* The sregs2 layout is sregs minus interrupt_bitmap plus flags/pdptrs. */
static void sregs_to_sregs2(const struct kvm_sregs *s, struct kvm_sregs2 *s2)
{
	memset(s2, 0, sizeof(*s2));
	s2->cs = s->cs; s2->ds = s->ds; s2->es = s->es;
	s2->fs = s->fs; s2->gs = s->gs; s2->ss = s->ss;
	s2->tr = s->tr; s2->ldt = s->ldt;
	s2->gdt = s->gdt; s2->idt = s->idt;
	s2->cr0 = s->cr0; s2->cr2 = s->cr2; s2->cr3 = s->cr3;
	s2->cr4 = s->cr4; s2->cr8 = s->cr8;
	s2->efer = s->efer;
	s2->apic_base = s->apic_base;
}

static void sregs2_to_sregs(const struct kvm_sregs2 *s2, struct kvm_sregs *s)
{
	memset(s, 0, sizeof(*s));
	s->cs = s2->cs; s->ds = s2->ds; s->es = s2->es;
	s->fs = s2->fs; s->gs = s2->gs; s->ss = s2->ss;
	s->tr = s2->tr; s->ldt = s2->ldt;
	s->gdt = s2->gdt; s->idt = s2->idt;
	s->cr0 = s2->cr0; s->cr2 = s2->cr2; s->cr3 = s2->cr3;
	s->cr4 = s2->cr4; s->cr8 = s2->cr8;
	s->efer = s2->efer;
	s->apic_base = s2->apic_base;
	/* interrupt_bitmap stays empty: pending interrupts travel in events */
}

/*
 * Room for a struct kvm_msrs header and its entries, as KVM_GET/SET_MSRS
 * take them.  A plain word array keeps it on the stack without the GNU
 * extension of a flexible-array struct inside another struct.
 */
#define MSR_BUF_WORDS							\
	((sizeof(struct kvm_msrs) + KVM_VCPU_STATE_MAX_MSRS *		\
	  sizeof(struct kvm_msr_entry)) / sizeof(uint64_t))

static int save_msrs(struct kvm_vcpu *vcpu, struct kvm_vcpu_state *st,
		     struct kvm_err *err)
{
	struct kvm_vm *vm = vcpu->vm;
	uint64_t buf[MSR_BUF_WORDS] = { 0 };
	struct kvm_msrs *msrs = (struct kvm_msrs *)buf;
	size_t i;
	int r;

	msrs->nmsrs = (uint32_t)vm->nmsrs;
	for (i = 0; i < vm->nmsrs; i++)
		msrs->entries[i].index = vm->msrs[i];
	r = kvm_ioctl(vcpu->fd, KVM_GET_MSRS, msrs);
	if (r < 0)
		return fail_errno(err, "KVM_GET_MSRS");
	if ((size_t)r != vm->nmsrs)
		return fail(err, -EIO, "KVM_GET_MSRS: MSR %#x unreadable",
			    vm->msrs[r]);
	memcpy(st->msrs, msrs->entries, vm->nmsrs * sizeof(st->msrs[0]));
	st->nmsrs = (uint32_t)vm->nmsrs;
	return 0;
}

static int load_msrs(struct kvm_vcpu *vcpu, const struct kvm_vcpu_state *st,
		     struct kvm_err *err)
{
	uint64_t buf[MSR_BUF_WORDS] = { 0 };
	struct kvm_msrs *msrs = (struct kvm_msrs *)buf;
	int r;

	if (st->nmsrs > KVM_VCPU_STATE_MAX_MSRS)
		return fail(err, -EINVAL, "state has %u MSRs, max %u",
			    st->nmsrs, KVM_VCPU_STATE_MAX_MSRS);
	msrs->nmsrs = st->nmsrs;
	memcpy(msrs->entries, st->msrs, st->nmsrs * sizeof(st->msrs[0]));
	r = kvm_ioctl(vcpu->fd, KVM_SET_MSRS, msrs);
	if (r < 0)
		return fail_errno(err, "KVM_SET_MSRS");
	/* KVM stops at the first MSR it rejects and returns the count. */
	if ((uint32_t)r != st->nmsrs)
		return fail(err, -EINVAL, "KVM_SET_MSRS: MSR %#x = %#llx "
			    "rejected", st->msrs[r].index,
			    (unsigned long long)st->msrs[r].data);
	return 0;
}

int kvm_vcpu_save_state(struct kvm_vcpu *vcpu, struct kvm_vcpu_state *st,
			struct kvm_err *err)
{
	const struct kvm_caps *caps = &vcpu->vm->caps;
	int r;

	memset(st, 0, sizeof(*st));

	if (kvm_ioctl(vcpu->fd, KVM_GET_REGS, &st->regs) < 0)
		return fail_errno(err, "KVM_GET_REGS");

	if (caps->sregs2) {
		if (kvm_ioctl(vcpu->fd, KVM_GET_SREGS2, &st->sregs) < 0)
			return fail_errno(err, "KVM_GET_SREGS2");
	} else {
		struct kvm_sregs sregs;

		if (kvm_ioctl(vcpu->fd, KVM_GET_SREGS, &sregs) < 0)
			return fail_errno(err, "KVM_GET_SREGS");
		sregs_to_sregs2(&sregs, &st->sregs);
	}

	if (caps->xsave) {
		struct kvm_xsave *xs = (struct kvm_xsave *)st->xsave;

		if (caps->xsave_size > sizeof(st->xsave))
			return fail(err, -ENOSPC, "XSAVE area of %u bytes "
				    "exceeds %zu", caps->xsave_size,
				    sizeof(st->xsave));
		/* KVM_GET_XSAVE2 writes xsave_size bytes, plain GET 4096. */
		if (caps->xsave2)
			r = kvm_ioctl(vcpu->fd, KVM_GET_XSAVE2, xs);
		else
			r = kvm_ioctl(vcpu->fd, KVM_GET_XSAVE, xs);
		if (r < 0)
			return fail_errno(err, "KVM_GET_XSAVE");
		st->xsave_size = caps->xsave_size;
		st->flags |= KVM_VCPU_STATE_XSAVE;
	} else {
		struct kvm_fpu *fpu = (struct kvm_fpu *)st->xsave;

		if (kvm_ioctl(vcpu->fd, KVM_GET_FPU, fpu) < 0)
			return fail_errno(err, "KVM_GET_FPU");
		st->xsave_size = sizeof(*fpu);
	}

	if (caps->xcrs) {
		if (kvm_ioctl(vcpu->fd, KVM_GET_XCRS, &st->xcrs) < 0)
			return fail_errno(err, "KVM_GET_XCRS");
		st->flags |= KVM_VCPU_STATE_XCRS;
	}

	if (caps->vcpu_events) {
		if (kvm_ioctl(vcpu->fd, KVM_GET_VCPU_EVENTS, &st->events) < 0)
			return fail_errno(err, "KVM_GET_VCPU_EVENTS");
		st->flags |= KVM_VCPU_STATE_EVENTS;
	}

	if (caps->debugregs) {
		if (kvm_ioctl(vcpu->fd, KVM_GET_DEBUGREGS, &st->debugregs) < 0)
			return fail_errno(err, "KVM_GET_DEBUGREGS");
		st->flags |= KVM_VCPU_STATE_DEBUGREGS;
	}

	if (kvm_ioctl(vcpu->fd, KVM_GET_MP_STATE, &st->mp_state) < 0)
		return fail_errno(err, "KVM_GET_MP_STATE");
	st->flags |= KVM_VCPU_STATE_MP_STATE;

	r = save_msrs(vcpu, st, err);
	if (r)
		return r;

	if (caps->tsc_khz) {
		r = ioctl(vcpu->fd, KVM_GET_TSC_KHZ, 0);
		if (r > 0) {
			st->tsc_khz = (uint32_t)r;
			st->flags |= KVM_VCPU_STATE_TSC_KHZ;
		}
	}
	return 0;
}

/*
 * Restore order matters: control registers and EFER first (they decide
 * which XCR0 bits and MSRs are legal), then XCRs before the XSAVE image
 * (XCR0 decides which components it may hold), MSRs, pending events and
 * finally the general registers.
 */
int kvm_vcpu_load_state(struct kvm_vcpu *vcpu,
			const struct kvm_vcpu_state *st, struct kvm_err *err)
{
	const struct kvm_caps *caps = &vcpu->vm->caps;
	int r;

	if (st->flags & KVM_VCPU_STATE_TSC_KHZ && caps->tsc_khz &&
	    caps->tsc_control) {
		r = ioctl(vcpu->fd, KVM_GET_TSC_KHZ, 0);
		if (r > 0 && (uint32_t)r != st->tsc_khz &&
		    ioctl(vcpu->fd, KVM_SET_TSC_KHZ, st->tsc_khz) < 0)
			return fail_errno(err, "KVM_SET_TSC_KHZ(%u)",
					  st->tsc_khz);
	}

	if (caps->sregs2) {
		if (kvm_ioctl(vcpu->fd, KVM_SET_SREGS2, &st->sregs) < 0)
			return fail_errno(err, "KVM_SET_SREGS2");
	} else {
		struct kvm_sregs sregs;

		sregs2_to_sregs(&st->sregs, &sregs);
		if (kvm_ioctl(vcpu->fd, KVM_SET_SREGS, &sregs) < 0)
			return fail_errno(err, "KVM_SET_SREGS");
	}

	if (st->flags & KVM_VCPU_STATE_XCRS) {
		if (!caps->xcrs)
			return fail(err, -ENOTSUP, "state has XCRs, host "
				    "lacks KVM_CAP_XCRS");
		if (kvm_ioctl(vcpu->fd, KVM_SET_XCRS, &st->xcrs) < 0)
			return fail_errno(err, "KVM_SET_XCRS");
	}

	if (st->flags & KVM_VCPU_STATE_XSAVE) {
		if (!caps->xsave)
			return fail(err, -ENOTSUP, "state has XSAVE, host "
				    "lacks KVM_CAP_XSAVE");
		if (st->xsave_size > caps->xsave_size)
			return fail(err, -ENOSPC, "XSAVE image of %u bytes, "
				    "host takes %u", st->xsave_size,
				    caps->xsave_size);
		if (kvm_ioctl(vcpu->fd, KVM_SET_XSAVE,
			      (const struct kvm_xsave *)st->xsave) < 0)
			return fail_errno(err, "KVM_SET_XSAVE");
	} else {
		if (kvm_ioctl(vcpu->fd, KVM_SET_FPU,
			      (const struct kvm_fpu *)st->xsave) < 0)
			return fail_errno(err, "KVM_SET_FPU");
	}

	r = load_msrs(vcpu, st, err);
	if (r)
		return r;

	if (st->flags & KVM_VCPU_STATE_EVENTS) {
		struct kvm_vcpu_events ev = st->events;

		/* Restore the NMI and SIPI fields too, not just the defaults. */
		ev.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING |
			    KVM_VCPUEVENT_VALID_SIPI_VECTOR;
		if (kvm_ioctl(vcpu->fd, KVM_SET_VCPU_EVENTS, &ev) < 0)
			return fail_errno(err, "KVM_SET_VCPU_EVENTS");
	}

	if (st->flags & KVM_VCPU_STATE_MP_STATE &&
	    kvm_ioctl(vcpu->fd, KVM_SET_MP_STATE, &st->mp_state) < 0)
		return fail_errno(err, "KVM_SET_MP_STATE(%u)",
				  st->mp_state.mp_state);

	if (st->flags & KVM_VCPU_STATE_DEBUGREGS &&
	    kvm_ioctl(vcpu->fd, KVM_SET_DEBUGREGS, &st->debugregs) < 0)
		return fail_errno(err, "KVM_SET_DEBUGREGS");

	if (kvm_ioctl(vcpu->fd, KVM_SET_REGS, &st->regs) < 0)
		return fail_errno(err, "KVM_SET_REGS");
	return 0;
}

size_t kvm_vcpu_state_msrs(const struct kvm_vcpu *vcpu, const uint32_t **idx)
{
	*idx = vcpu->vm->msrs;
	return vcpu->vm->nmsrs;
}
