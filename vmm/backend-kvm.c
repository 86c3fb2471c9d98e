/*
 * vmm/backend-kvm.c - run the guest on KVM.
 *
 * Guest RAM is one memslot at GPA 0. The guest never runs ring-0 code (see
 * vmm/guest/layout.h), so a vCPU's whole state is its registers, FPU/XSAVE,
 * XCRs, MSRs, events and debug registers (struct kvm_vcpu_state); there is
 * no in-kernel irqchip to migrate. The vCPU state is a vmstate device
 * "cpu-kvm" per vCPU: pre_save reads it from KVM (vCPUs are paused at
 * switchover), post_load writes it back before the first KVM_RUN.
 *
 * Doorbells (MMIO stores outside RAM) are the guest's only exits: IDLE
 * sleeps the vCPU thread briefly so an idle guest leaves the host CPU alone;
 * PANIC stops the vCPU and marks the VM failed.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "kvm.h"
#include "vm.h"

#define MAX_VCPUS 8

struct kvm_cpu {
	struct kvm_backend *kb;         /* immutable */
	unsigned index;                 /* immutable */
	struct kvm_vcpu *vcpu;          /* immutable after create */
	pthread_t thread;               /* main thread only */
	bool thread_started;
	/* Staging area for migration: filled by pre_save, consumed by
	 * post_load. Only touched while the vCPU is paused or not started. */
	struct kvm_vcpu_state st;
};

struct kvm_backend {
	struct vm *vm;                  /* immutable */
	struct kvm_vm *kvm;             /* immutable after create */
	unsigned ncpus;
	struct kvm_cpu cpus[MAX_VCPUS];
	pthread_mutex_t lock;
	bool failed;                    /* guarded by lock */
	char fail_msg[320];             /* guarded by lock */
};

static int kerr(struct ferry_error *err, int r, const struct kvm_err *ke)
{
	return ferry_error_set(err, r < 0 ? r : -EIO, "%s", ke->msg);
}

bool backend_kvm_usable(char *why, size_t len)
{
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	struct kvm_vm *vm = NULL;
	struct kvm_vm_opts opts = { .manual_dirty_log = true };
	struct kvm_err ke = { 0 };

	if (fd < 0) {
		snprintf(why, len, "/dev/kvm: %s", strerror(errno));
		return false;
	}
	close(fd);
	if (kvm_vm_create(&vm, &opts, &ke)) {
		snprintf(why, len, "cannot create a KVM VM: %s", ke.msg);
		return false;
	}
	kvm_vm_destroy(vm);
	return true;
}

static void set_failed(struct kvm_backend *kb, const char *msg)
{
	pthread_mutex_lock(&kb->lock);
	if (!kb->failed) {
		kb->failed = true;
		snprintf(kb->fail_msg, sizeof(kb->fail_msg), "%.300s", msg);
	}
	pthread_mutex_unlock(&kb->lock);
}

static void *vcpu_thread(void *arg)
{
	struct kvm_cpu *c = arg;
	struct guest_status *status =
		(struct guest_status *)(vm_ram(c->kb->vm) + GUEST_STATUS_GPA);
	struct kvm_vcpu_exit ex;
	struct kvm_err ke = { 0 };
	char msg[300];
	int r;

	r = kvm_vcpu_thread_init(c->vcpu, &ke);
	while (!r) {
		uint32_t val;

		r = kvm_vcpu_run(c->vcpu, &ex, &ke);
		if (r || ex.kind == KVM_VCPU_EXIT_STOPPED)
			break;
		if (ex.kind == KVM_VCPU_EXIT_MMIO && ex.mmio.write &&
		    ex.mmio.len == 4 && ex.mmio.gpa == GUEST_MMIO_IDLE) {
			struct timespec ts = { 0, 0 };

			memcpy(&val, ex.mmio.data, 4);
			if (val > GUEST_IDLE_MAX_US)
				val = GUEST_IDLE_MAX_US;
			ts.tv_nsec = (long)val * 1000L;
			nanosleep(&ts, NULL);
			continue;
		}
		if (ex.kind == KVM_VCPU_EXIT_MMIO && ex.mmio.gpa == GUEST_MMIO_PANIC) {
			memcpy(&val, ex.mmio.data, 4);
			snprintf(msg, sizeof(msg), "guest panic %u on vCPU %u: %.64s",
				 val, c->index, (const char *)status->panic_msg);
			set_failed(c->kb, msg);
			r = -EIO;
			break;
		}
		snprintf(msg, sizeof(msg),
			 "vCPU %u: unexpected exit %u (mmio 0x%llx, port 0x%x)",
			 c->index, ex.reason, (unsigned long long)ex.mmio.gpa,
			 ex.io.port);
		set_failed(c->kb, msg);
		r = -EIO;
	}
	if (r && ke.msg[0]) {
		snprintf(msg, sizeof(msg), "vCPU %u: %s", c->index, ke.msg);
		set_failed(c->kb, msg);
	}
	kvm_vcpu_thread_exit(c->vcpu);
	return NULL;
}

static void kvm_destroy(void *priv)
{
	struct kvm_backend *kb = priv;

	if (!kb)
		return;
	for (unsigned i = 0; i < kb->ncpus; i++) {
		struct kvm_cpu *c = &kb->cpus[i];
		if (c->thread_started) {
			kvm_vcpu_stop(c->vcpu);
			pthread_join(c->thread, NULL);
		}
		kvm_vcpu_destroy(c->vcpu);
	}
	kvm_vm_destroy(kb->kvm);
	pthread_mutex_destroy(&kb->lock);
	free(kb);
}

static int kvm_create(struct vm *vm, void **priv, struct ferry_error *err)
{
	struct kvm_vm_opts opts = { .manual_dirty_log = true };
	struct kvm_backend *kb;
	struct kvm_err ke = { 0 };
	int r;

	if (vm_vcpus(vm) > MAX_VCPUS)
		return ferry_error_set(err, -EINVAL, "at most %d vCPUs", MAX_VCPUS);
	kb = calloc(1, sizeof(*kb));
	if (!kb)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	kb->vm = vm;
	pthread_mutex_init(&kb->lock, NULL);
	r = kvm_vm_create(&kb->kvm, &opts, &ke);
	if (!r)
		r = kvm_vm_set_memslot(kb->kvm, 0, 0, vm_ram_size(vm), vm_ram(vm),
				       0, &ke);
	for (unsigned i = 0; !r && i < vm_vcpus(vm); i++) {
		kb->cpus[i].kb = kb;
		kb->cpus[i].index = i;
		r = kvm_vcpu_create(kb->kvm, i, &kb->cpus[i].vcpu, &ke);
		if (!r)
			kb->ncpus = i + 1;
	}
	if (r) {
		kerr(err, r, &ke);
		kvm_destroy(kb);
		return r;
	}
	*priv = kb;
	return 0;
}

static int kvm_boot(void *priv, struct ferry_error *err)
{
	struct kvm_backend *kb = priv;
	size_t img = (size_t)(ferry_guest_image_end - ferry_guest_image);
	struct kvm_err ke = { 0 };
	uint32_t khz = 0;
	int r;

	if (img > GUEST_IMAGE_MAX)
		return ferry_error_set(err, -E2BIG, "guest image of %zu bytes", img);
	r = kvm_vm_write(kb->kvm, GUEST_IMAGE_GPA, ferry_guest_image, img, &ke);
	if (!r)
		r = kvm_vm_build_identity_map(kb->kvm, GUEST_PT_GPA, GUEST_PT_SIZE,
					      GUEST_MAP_SIZE, &ke);
	if (!r)
		r = kvm_vcpu_get_tsc_khz(kb->cpus[0].vcpu, &khz, &ke);
	if (r)
		return kerr(err, r, &ke);
	vm_guest_setup_cmd(kb->vm, (uint64_t)khz * 1000);
	for (unsigned i = 0; i < kb->ncpus; i++) {
		struct kvm_regs regs;
		int fd = kvm_vcpu_fd(kb->cpus[i].vcpu);

		/* Each vCPU gets its own slice of the guest stack and its index
		 * in RDI (the guest's first argument). */
		r = kvm_vcpu_setup_user_long_mode(kb->cpus[i].vcpu, GUEST_PT_GPA,
						  GUEST_IMAGE_GPA,
						  GUEST_INITIAL_RSP -
						  i * (GUEST_STACK_SIZE / MAX_VCPUS),
						  &ke);
		if (r)
			return kerr(err, r, &ke);
		if (ioctl(fd, KVM_GET_REGS, &regs) < 0)
			return ferry_error_set(err, -errno, "KVM_GET_REGS: %s",
					       strerror(errno));
		regs.rdi = i;
		if (ioctl(fd, KVM_SET_REGS, &regs) < 0)
			return ferry_error_set(err, -errno, "KVM_SET_REGS: %s",
					       strerror(errno));
	}
	return 0;
}

static int kvm_start(void *priv, struct ferry_error *err)
{
	struct kvm_backend *kb = priv;

	for (unsigned i = 0; i < kb->ncpus; i++) {
		struct kvm_cpu *c = &kb->cpus[i];
		int e = pthread_create(&c->thread, NULL, vcpu_thread, c);
		if (e)
			return ferry_error_set(err, -e, "cannot start vCPU %u: %s", i,
					       strerror(e));
		c->thread_started = true;
	}
	return 0;
}

static int kvm_pause(void *priv, struct ferry_error *err)
{
	struct kvm_backend *kb = priv;
	struct kvm_err ke = { 0 };
	int r = kvm_vm_pause(kb->kvm, &ke);

	return r ? kerr(err, r, &ke) : 0;
}

static void kvm_resume(void *priv)
{
	kvm_vm_resume(((struct kvm_backend *)priv)->kvm);
}

static int kvm_dirty_start(void *priv, struct ferry_error *err)
{
	struct kvm_backend *kb = priv;
	struct kvm_err ke = { 0 };
	int r = kvm_vm_set_dirty_logging(kb->kvm, 0, true, &ke);

	return r ? kerr(err, r, &ke) : 0;
}

static int kvm_dirty_sync(void *priv, uint64_t *bitmap, struct ferry_error *err)
{
	struct kvm_backend *kb = priv;
	struct kvm_err ke = { 0 };
	int r = kvm_vm_dirty_log_sync(kb->kvm, 0, bitmap, &ke);

	return r ? kerr(err, r, &ke) : 0;
}

static void kvm_dirty_stop(void *priv)
{
	struct kvm_backend *kb = priv;
	struct kvm_err ke = { 0 };

	kvm_vm_set_dirty_logging(kb->kvm, 0, false, &ke);
}

static bool kvm_failed(void *priv, char *msg, size_t len)
{
	struct kvm_backend *kb = priv;
	bool f;

	pthread_mutex_lock(&kb->lock);
	f = kb->failed;
	if (f)
		snprintf(msg, len, "%s", kb->fail_msg);
	pthread_mutex_unlock(&kb->lock);
	return f;
}

static void *kvm_cpu_state(void *priv, unsigned index)
{
	struct kvm_backend *kb = priv;
	return index < kb->ncpus ? &kb->cpus[index] : NULL;
}

static int cpu_pre_save(void *obj, struct ferry_error *err)
{
	struct kvm_cpu *c = obj;
	struct kvm_err ke = { 0 };
	int r = kvm_vcpu_save_state(c->vcpu, &c->st, &ke);

	return r ? kerr(err, r, &ke) : 0;
}

static int cpu_post_load(void *obj, uint32_t version, struct ferry_error *err)
{
	struct kvm_cpu *c = obj;
	struct kvm_err ke = { 0 };
	int r;

	(void)version;
	/* Counts came from the wire; the vmstate layer bounded them by the
	 * array sizes, and KVM validates the register contents itself. */
	r = kvm_vcpu_load_state(c->vcpu, &c->st, &ke);
	return r ? kerr(err, r, &ke) : 0;
}

static const struct ferry_vms_field msr_fields[] = {
	FERRY_VMS_U32(struct kvm_msr_entry, index),
	FERRY_VMS_U64(struct kvm_msr_entry, data),
	FERRY_VMS_END_OF_LIST,
};

static const struct ferry_vmsd msr_vmsd = {
	.name = "msr", .version = 1, .minimum_version = 1, .fields = msr_fields,
};

/* struct kvm_vcpu_state, field by field; kernel ABI structs travel raw
 * (x86-64 to x86-64 only). */
static const struct ferry_vms_field cpu_fields[] = {
	FERRY_VMS_U32(struct kvm_cpu, st.flags),
	FERRY_VMS_U32(struct kvm_cpu, st.tsc_khz),
	FERRY_VMS_RAW(struct kvm_cpu, st.regs),
	FERRY_VMS_RAW(struct kvm_cpu, st.sregs),
	FERRY_VMS_RAW(struct kvm_cpu, st.xcrs),
	FERRY_VMS_RAW(struct kvm_cpu, st.events),
	FERRY_VMS_RAW(struct kvm_cpu, st.debugregs),
	FERRY_VMS_RAW(struct kvm_cpu, st.mp_state),
	FERRY_VMS_U32(struct kvm_cpu, st.nmsrs),
	FERRY_VMS_STRUCT_VARRAY(struct kvm_cpu, st.msrs, struct kvm_msr_entry,
				st.nmsrs, msr_vmsd),
	FERRY_VMS_U32(struct kvm_cpu, st.xsave_size),
	FERRY_VMS_VBUFFER(struct kvm_cpu, st.xsave, st.xsave_size),
	FERRY_VMS_END_OF_LIST,
};

static const struct ferry_vmsd cpu_kvm_vmsd = {
	.name = "cpu-kvm", .version = 1, .minimum_version = 1,
	.fields = cpu_fields,
	.pre_save = cpu_pre_save,
	.post_load = cpu_post_load,
};

const struct backend_ops backend_kvm_ops = {
	.name = "kvm",
	.create = kvm_create,
	.boot = kvm_boot,
	.start = kvm_start,
	.pause = kvm_pause,
	.resume = kvm_resume,
	.dirty_start = kvm_dirty_start,
	.dirty_sync = kvm_dirty_sync,
	.dirty_stop = kvm_dirty_stop,
	.cpu_vmsd = &cpu_kvm_vmsd,
	.cpu_state = kvm_cpu_state,
	.failed = kvm_failed,
	.destroy = kvm_destroy,
};
