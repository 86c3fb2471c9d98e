// SPDX-License-Identifier: MIT
/*
 * vmm/kvm/kvm-vcpu.c - vCPUs of the KVM layer: creation and the initial
 * 64-bit CPL-3 setup, the run loop with its exits, and pause, resume, stop
 * and the VM-wide hold around memory slot changes.  See kvm.h for the API.
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
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "kvm/kvm.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kvm/kvm-internal.h"

/* Under vcpu->lock: is anything asking the thread to park? A pause and a
 * hold are independent, so releasing a hold never resumes a paused vCPU
 * and resuming never ends a hold. */
static bool park_wanted(const struct kvm_vcpu *vcpu)
{
	return vcpu->pause_req || vcpu->hold;
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
