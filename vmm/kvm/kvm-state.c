// SPDX-License-Identifier: MIT
/*
 * vmm/kvm/kvm-state.c - save and restore of a vCPU's state for migration:
 * general and special registers (sregs2, or sregs converted), the XSAVE
 * image or FPU, XCRs, pending events, debug registers, MP state, MSRs and
 * the TSC frequency, restored in the order KVM needs.  See kvm.h for
 * struct kvm_vcpu_state; the MSR list is picked at VM creation in kvm.c.
 *
 * Design notes
 *
 * Interrupt controller.  We do not create an in-kernel irqchip.  The guest
 * runs at CPL 3 with IF=0 and takes no interrupts, so there is no LAPIC,
 * IOAPIC, PIC or PIT state to save; KVM_GET_LAPIC would fail with ENXIO.
 * The vCPU's MP state is always RUNNABLE.  A guest that needed timers
 * would need KVM_CREATE_IRQCHIP and KVM_GET/SET_LAPIC in the vCPU state.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "kvm/kvm.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

#include "kvm/kvm-internal.h"

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
