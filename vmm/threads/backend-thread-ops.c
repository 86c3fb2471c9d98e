/*
 * vmm/threads/backend-thread-ops.c - the thread backend behind struct
 * backend_ops.
 *
 * Host threads run the guest workload over guest RAM
 * (vmm/threads/backend-thread.c) and userfaultfd write-protection in async
 * mode provides the dirty log (vmm/threads/dirty-uffd.c), so migration sees
 * real kernel dirty tracking without /dev/kvm. A thread vCPU keeps all of
 * its state in guest RAM; its vmstate ("cpu-thread") carries only its
 * index, which the load checks, so a stream from a VM with a different vCPU
 * layout is refused.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "threads/backend-thread.h"
#include "threads/dirty-uffd.h"
#include "vm/backend.h"
#include "vm/vm.h"

#define MAX_VCPUS 8

struct thread_cpu {
	uint32_t index;      /* migrated */
	uint32_t expect;     /* this VM's index for it; not migrated */
};

struct thread_backend {
	struct vm *vm;
	struct thread_vm *t;
	struct uffd_dirty *dirty;   /* created on first dirty_start */
	struct thread_cpu cpus[MAX_VCPUS];
};

static int tb_create(struct vm *vm, void **priv, struct ferry_error *err)
{
	struct thread_backend *tb = calloc(1, sizeof(*tb));
	int r;

	if (!tb)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	tb->vm = vm;
	for (unsigned i = 0; i < MAX_VCPUS; i++)
		tb->cpus[i].index = tb->cpus[i].expect = i;
	r = thread_vm_create(&tb->t, vm_ram(vm), vm_ram_size(vm), vm_vcpus(vm),
			     err);
	if (r) {
		free(tb);
		return r;
	}
	*priv = tb;
	return 0;
}

static int tb_boot(void *priv, struct ferry_error *err)
{
	struct thread_backend *tb = priv;
	(void)err;
	/* The image is not needed: the workload code is linked into the VMM.
	 * The command block is all the guest needs to boot. */
	vm_guest_setup_cmd(tb->vm, host_tsc_hz());
	return 0;
}

static int tb_start(void *priv, struct ferry_error *err)
{
	return thread_vm_start(((struct thread_backend *)priv)->t, err);
}

static int tb_pause(void *priv, struct ferry_error *err)
{
	return thread_vm_pause(((struct thread_backend *)priv)->t, err);
}

static void tb_resume(void *priv)
{
	thread_vm_resume(((struct thread_backend *)priv)->t);
}

static int tb_dirty_start(void *priv, struct ferry_error *err)
{
	struct thread_backend *tb = priv;
	int r;

	if (!tb->dirty) {
		r = uffd_dirty_create(&tb->dirty, vm_ram(tb->vm), vm_ram_size(tb->vm),
				      err);
		if (r)
			return r;
	}
	return uffd_dirty_start(tb->dirty, err);
}

static int tb_dirty_sync(void *priv, uint64_t *bitmap, bool final,
			 struct ferry_error *err)
{
	struct thread_backend *tb = priv;

	if (!tb->dirty)
		return ferry_error_set(err, -EINVAL, "dirty tracking not started");
	return final ? uffd_dirty_sync_final(tb->dirty, bitmap, err) :
		       uffd_dirty_sync(tb->dirty, bitmap, err);
}

static void tb_dirty_stop(void *priv)
{
	struct thread_backend *tb = priv;

	/* Tracking ends at once; pages stay protected until written (one
	 * minor fault each, resolved by the kernel: dirty-uffd.c). */
	if (tb->dirty)
		uffd_dirty_stop(tb->dirty, NULL);
}

static void tb_dirty_release(void *priv)
{
	struct thread_backend *tb = priv;

	/* Unregistering walks all of RAM to drop what protection is left
	 * (0.2 s per GiB here); the next dirty_start registers again. The
	 * fds stay: a VM that migrates back and forth keeps a steady
	 * count. */
	if (tb->dirty)
		uffd_dirty_release(tb->dirty);
}

static bool tb_failed(void *priv, char *msg, size_t len)
{
	return thread_vm_panicked(((struct thread_backend *)priv)->t, msg, len);
}

static void *tb_cpu_state(void *priv, unsigned index)
{
	struct thread_backend *tb = priv;
	return index < MAX_VCPUS ? &tb->cpus[index] : NULL;
}

static void tb_destroy(void *priv)
{
	struct thread_backend *tb = priv;

	if (!tb)
		return;
	thread_vm_destroy(tb->t);
	uffd_dirty_destroy(tb->dirty);
	free(tb);
}

static int cpu_post_load(void *obj, uint32_t version, struct ferry_error *err)
{
	struct thread_cpu *c = obj;
	(void)version;
	if (c->index != c->expect)
		return ferry_error_set(err, -EINVAL,
			"vCPU state for index %u loaded into vCPU %u", c->index,
			c->expect);
	return 0;
}

static const struct ferry_vms_field cpu_fields[] = {
	FERRY_VMS_U32(struct thread_cpu, index),
	FERRY_VMS_END_OF_LIST,
};

static const struct ferry_vmsd cpu_thread_vmsd = {
	.name = "cpu-thread", .version = 1, .minimum_version = 1,
	.fields = cpu_fields, .post_load = cpu_post_load,
};

const struct backend_ops backend_thread_ops = {
	.name = "thread",
	.create = tb_create,
	.boot = tb_boot,
	.start = tb_start,
	.pause = tb_pause,
	.resume = tb_resume,
	.dirty_start = tb_dirty_start,
	.dirty_sync = tb_dirty_sync,
	.dirty_stop = tb_dirty_stop,
	.dirty_release = tb_dirty_release,
	.cpu_vmsd = &cpu_thread_vmsd,
	.cpu_state = tb_cpu_state,
	.failed = tb_failed,
	.destroy = tb_destroy,
};
