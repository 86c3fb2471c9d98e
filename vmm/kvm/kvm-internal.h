/* SPDX-License-Identifier: MIT */
/*
 * vmm/kvm/kvm-internal.h - what the three parts of the KVM layer share:
 * kvm.c (VM, memslots, dirty log, page tables), kvm-vcpu.c (vCPUs, running,
 * pause/resume/hold) and kvm-state.c (vCPU state save/restore).  The
 * structures behind the opaque handles of kvm.h, the size-checked ioctl
 * macro and the error helpers.  Nothing outside vmm/kvm/kvm*.c includes it;
 * everyone else uses kvm.h.
 */
#ifndef FERRY_VMM_KVM_INTERNAL_H
#define FERRY_VMM_KVM_INTERNAL_H

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>

#include "kvm/kvm.h"

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

	/* Pause protocol; see the top of kvm-vcpu.c.  All under lock. */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	pthread_t thread;
	bool has_thread;	/* a thread called kvm_vcpu_thread_init() */
	bool pause_req;
	unsigned hold;		/* kvm_vm_hold() depth; parks like a pause */
	bool stop_req;
	bool parked;		/* thread is waiting in kvm_vcpu_run() */
};

__attribute__((format(printf, 3, 4)))
static inline int fail(struct kvm_err *err, int code, const char *fmt, ...)
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

#endif /* FERRY_VMM_KVM_INTERNAL_H */
