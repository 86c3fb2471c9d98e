// SPDX-License-Identifier: MIT
/*
 * vmm/kvm/kvm.c - KVM wrapper for ferry's reference VMM: the VM, its memory
 * slots, the dirty log and the guest's identity-map page tables.  See kvm.h
 * for the API; vCPUs are in kvm-vcpu.c, their saved state in kvm-state.c,
 * what the three share in kvm-internal.h.
 *
 * Design notes
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
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "kvm/kvm-internal.h"

#define KVM_DEV_PATH	"/dev/kvm"
#define PAGE_SIZE	4096ULL

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
