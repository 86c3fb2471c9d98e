/*
 * vmm/kvm/backend-kvm.c - run the guest on KVM.
 *
 * Memory: KVM memslots follow the VM's memory map (vmm/memory/memmap.h). The
 * backend's memmap listener turns every RAM range of the flat view into a
 * memslot and deletes it again when the range goes away; MMIO ranges and
 * holes get no slot, so guest accesses there exit (KVM_EXIT_MMIO) and the
 * vCPU thread dispatches them through the flat view (kvm-slots.h). Guest
 * RAM ("ram0") may therefore be split over several slots, e.g. around a
 * device BAR; dirty logging covers every slot of it and places each slot's
 * bits at its offset in guest RAM.
 *
 * The guest never runs ring-0 code (see vmm/guest/layout.h), so a vCPU's
 * whole state is its registers, FPU/XSAVE, XCRs, MSRs, events and debug
 * registers (struct kvm_vcpu_state); there is no in-kernel irqchip to
 * migrate. The vCPU state is a vmstate device "cpu-kvm" per vCPU: pre_save
 * reads it from KVM (vCPUs are paused at switchover), post_load writes it
 * back before the first KVM_RUN.
 *
 * Doorbells (MMIO stores to the guest's doorbell window, which the memory
 * map leaves empty) are handled before any dispatch: IDLE sleeps the vCPU
 * thread briefly so an idle guest leaves the host CPU alone; PANIC stops
 * the vCPU and marks the VM failed.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "kvm/kvm-slots.h"
#include "kvm/kvm.h"
#include "memory/memmap.h"
#include "vm/backend.h"
#include "vm/vm.h"

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

	/* Set once by backend_kvm_attach_memmap(), before vCPU threads
	 * start; immutable afterwards. */
	struct memmap *mm;
	struct memmap_region *ram_mr;   /* guest RAM ("ram0") */
	struct memmap_listener listener;
	bool attached;
	uint64_t ram_pages;             /* guest RAM size in pages */

	/*
	 * Memslots. Who touches them:
	 *   - the memory map's tree owner (main thread at creation, the load
	 *     thread during an incoming migration) creates and deletes slots
	 *     from the listener callbacks;
	 *   - the migration thread toggles dirty logging and fetches the
	 *     logs (dirty_start/sync/stop);
	 *   - the control thread reads the table (x-query-memslots);
	 *   - vCPU threads mark pages they wrote through an exit (a RAM range
	 *     without a slot) while dirty logging is on.
	 * slot_lock guards the table, the kvm.c slot table behind it (kvm.h:
	 * calls on one VM handle must be serialised), dirty_on and the dirty
	 * bitmaps; the counters are atomics.
	 *
	 * vCPUs and slot changes: KVM publishes each slot change atomically
	 * (a running vCPU sees the slot set before or after it), so adding a
	 * slot needs nothing from us: an access that misses it exits and is
	 * dispatched through the flat view, which the memory map publishes
	 * before it notifies us. Deleting is different: KVM cannot shrink,
	 * move or split a slot, so a range that stays RAM is deleted and
	 * created again, and a vCPU running in between finds nothing there.
	 * Data accesses would exit harmlessly, but instruction fetches and
	 * page-table walks cannot be emulated from a hole (the guest
	 * triple-faults: memslot_kvm_remap_running_guest). So a commit that
	 * deletes a slot holds the vCPUs (kvm_vm_hold, independent of pause)
	 * from its first delete to its commit callback; commits that only add
	 * slots leave them running. `held` is the tree owner's alone.
	 *
	 * Lock order: vm->lock, then slot_lock. vCPU threads take only
	 * slot_lock, and nobody waits for a vCPU while holding it (the hold is
	 * taken before slot_lock).
	 */
	bool held;
	pthread_mutex_t slot_lock;
	struct kvm_slot_table slots;
	bool dirty_on;
	uint64_t *dirty_pending;        /* guest RAM pages dirtied outside
					   any live slot's log (deleted
					   slots, writes through exits) */
	uint64_t *dirty_scratch;        /* one slot's log */
	uint64_t unmapped;              /* RAM ranges left without a slot */
	char slot_error[256];           /* last slot failure */
	uint64_t mmio_exits, mmio_hole, mmio_ram;   /* atomics */
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

/*
 * A KVM_EXIT_MMIO that is not a doorbell: dispatch it through the current
 * flat view (lock-free: the view is an immutable snapshot). A read's data
 * goes into the kvm_run page, which KVM copies into the guest on the next
 * KVM_RUN. A hole ignores writes and reads as all ones: a guest poking at
 * nothing must not take the VM down.
 */
static void mmio_dispatch(struct kvm_backend *kb, struct kvm_vcpu_exit *ex)
{
	uint64_t pages[KVM_MMIO_MAX_LEN];
	unsigned npages = 0;
	int r = -EFAULT;

	__atomic_add_fetch(&kb->mmio_exits, 1, __ATOMIC_RELAXED);
	if (kb->mm) {
		const struct memmap_view *v = memmap_view_get(kb->mm);

		/* A vCPU never holds a memory transaction open here, so the
		 * view is always there; a hole if it were not. */
		if (v)
			r = kvm_mmio_dispatch(v, ex->mmio.gpa, ex->mmio.write,
					      ex->mmio.data, ex->mmio.len,
					      kb->ram_mr, pages, &npages);
		memmap_view_put(v);
	} else if (!ex->mmio.write) {
		memset(ex->mmio.data, 0xff, ex->mmio.len <= KVM_MMIO_MAX_LEN ?
		       ex->mmio.len : KVM_MMIO_MAX_LEN);
	}
	if (r)
		__atomic_add_fetch(&kb->mmio_hole, 1, __ATOMIC_RELAXED);
	if (npages) {
		/* Guest RAM written without a slot: KVM's log missed it. */
		__atomic_add_fetch(&kb->mmio_ram, 1, __ATOMIC_RELAXED);
		pthread_mutex_lock(&kb->slot_lock);
		if (kb->dirty_on)
			for (unsigned i = 0; i < npages; i++)
				if (pages[i] < kb->ram_pages)
					kvm_bitmap_set_range(kb->dirty_pending,
							     pages[i], 1);
		pthread_mutex_unlock(&kb->slot_lock);
	}
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
		if (ex.kind == KVM_VCPU_EXIT_MMIO) {
			mmio_dispatch(c->kb, &ex);
			continue;
		}
		snprintf(msg, sizeof(msg), "vCPU %u: unexpected exit %u (port 0x%x)",
			 c->index, ex.reason, ex.io.port);
		set_failed(c->kb, msg);
		r = -EIO;
	}
	if (r && ke.msg[0]) {
		/* kvm-vcpu.c names the vCPU in exit errors already. */
		if (strncmp(ke.msg, "vCPU ", 5))
			snprintf(msg, sizeof(msg), "vCPU %u: %s", c->index, ke.msg);
		else
			snprintf(msg, sizeof(msg), "%s", ke.msg);
		set_failed(c->kb, msg);
	}
	kvm_vcpu_thread_exit(c->vcpu);
	return NULL;
}

/* ---- memslots following the flat view ---------------------------------- */

/* Caller holds slot_lock. Each failure is printed; the last one stays
 * for x-query-memslots. */
static void slot_fail(struct kvm_backend *kb, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static void slot_fail(struct kvm_backend *kb, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(kb->slot_error, sizeof(kb->slot_error), fmt, ap);
	va_end(ap);
	fprintf(stderr, "ferry vm: %s\n", kb->slot_error);
}

static void listener_add(struct memmap_listener *l, const struct memmap_range *r)
{
	struct kvm_backend *kb = (struct kvm_backend *)
		((char *)l - offsetof(struct kvm_backend, listener));
	uint64_t gpa, size, off;
	uint8_t *hva;
	struct kvm_err ke = { 0 };
	bool ram, log;
	int id;

	if (memmap_region_kind(r->mr) != MEMMAP_RAM)
		return;         /* MMIO: no slot, accesses exit */
	pthread_mutex_lock(&kb->slot_lock);
	/*
	 * Anything left without a slot still works, only slowly: its accesses
	 * exit and the dispatch copies to or from the same host memory through
	 * the view (guest code cannot run from there, though).
	 */
	if (!kvm_slot_fit(r, &gpa, &size, &off, &hva)) {
		kb->unmapped++;
		goto out;
	}
	ram = r->mr == kb->ram_mr;
	if (ram && (off % KVM_SLOTS_PAGE || off / KVM_SLOTS_PAGE +
		    size / KVM_SLOTS_PAGE > kb->ram_pages)) {
		/* Cannot happen (guest RAM is page aligned in both spaces);
		 * refuse rather than mis-place dirty bits. */
		slot_fail(kb, "guest RAM range at %#llx: offset %#llx not usable "
			  "for a slot", (unsigned long long)r->gpa,
			  (unsigned long long)off);
		kb->unmapped++;
		goto out;
	}
	id = kvm_slot_table_alloc(&kb->slots);
	if (id < 0) {
		slot_fail(kb, "no free KVM memslot (%u in use) for %s at %#llx",
			  kb->slots.limit, memmap_region_name(r->mr),
			  (unsigned long long)gpa);
		kb->unmapped++;
		goto out;
	}
	/* Only guest RAM is migrated through the dirty log; other RAM
	 * (a device's RAM BAR) travels with its device's state. */
	log = ram && kb->dirty_on;
	if (kvm_vm_set_memslot(kb->kvm, (uint32_t)id, gpa, size, hva,
			       log ? KVM_VM_SLOT_DIRTY_LOG : 0, &ke)) {
		slot_fail(kb, "%s at %#llx: %s", memmap_region_name(r->mr),
			  (unsigned long long)gpa, ke.msg);
		kb->unmapped++;
		goto out;
	}
	kvm_slot_table_set(&kb->slots, (unsigned)id, r, gpa, size, off, hva,
			   ram, log);
out:
	pthread_mutex_unlock(&kb->slot_lock);
}

static void listener_del(struct memmap_listener *l, const struct memmap_range *r)
{
	struct kvm_backend *kb = (struct kvm_backend *)
		((char *)l - offsetof(struct kvm_backend, listener));
	struct kvm_err ke = { 0 };
	struct kvm_slot_ent *e;
	char msg[300];
	int id;

	if (memmap_region_kind(r->mr) != MEMMAP_RAM)
		return;
	if (!kb->held) {
		/* Until the commit callback: see struct kvm_backend. */
		kvm_vm_hold(kb->kvm, NULL);
		kb->held = true;
	}
	pthread_mutex_lock(&kb->slot_lock);
	id = kvm_slot_table_find(&kb->slots, r);
	if (id < 0) {
		/* It never got a slot. */
		if (kb->unmapped)
			kb->unmapped--;
		pthread_mutex_unlock(&kb->slot_lock);
		return;
	}
	e = &kb->slots.e[id];
	/*
	 * KVM drops a slot's dirty log with the slot, and vCPUs may write
	 * between a last fetch and the delete: count every page of it as
	 * dirty (a map change during a migration costs a resend of that
	 * range, never a lost page).
	 */
	if (e->dirty_log && kb->dirty_pending)
		kvm_bitmap_set_range(kb->dirty_pending, e->offset / KVM_SLOTS_PAGE,
				     e->size / KVM_SLOTS_PAGE);
	/* Size 0 deletes; KVM cannot shrink or move a slot in place. */
	if (kvm_vm_set_memslot(kb->kvm, (uint32_t)id, e->gpa, 0, NULL, 0, &ke)) {
		/* The slot still maps RAM where the map now has something
		 * else: the guest would see the wrong memory. */
		slot_fail(kb, "cannot delete memslot %d: %s", id, ke.msg);
		snprintf(msg, sizeof(msg), "memory map change failed: %s",
			 kb->slot_error);
		pthread_mutex_unlock(&kb->slot_lock);
		set_failed(kb, msg);
		return;
	}
	kvm_slot_table_clear(&kb->slots, (unsigned)id);
	pthread_mutex_unlock(&kb->slot_lock);
}

static void listener_commit(struct memmap_listener *l,
			    const struct memmap_view *view)
{
	struct kvm_backend *kb = (struct kvm_backend *)
		((char *)l - offsetof(struct kvm_backend, listener));

	(void)view;
	if (kb->held) {
		kb->held = false;
		kvm_vm_release(kb->kvm);
	}
}

int backend_kvm_attach_memmap(void *priv, struct memmap *mm,
			      struct memmap_region *ram, struct ferry_error *err)
{
	struct kvm_backend *kb = priv;
	int r = 0;

	if (kb->attached)
		return ferry_error_set(err, -EBUSY, "memory map attached already");
	if (memmap_region_kind(ram) != MEMMAP_RAM ||
	    memmap_region_size(ram) != vm_ram_size(kb->vm))
		return ferry_error_set(err, -EINVAL, "guest RAM region does not "
				       "match the VM's RAM");
	kb->mm = mm;
	kb->ram_mr = ram;
	kb->listener = (struct memmap_listener){
		.region_add = listener_add, .region_del = listener_del,
		.commit = listener_commit,
	};
	kb->attached = true;
	/* Replays the current view as region_adds. */
	memmap_listener_register(mm, &kb->listener);
	pthread_mutex_lock(&kb->slot_lock);
	if (kb->slot_error[0] || kb->unmapped)
		r = ferry_error_set(err, -ENOSPC, "KVM memslots for the memory "
				    "map: %s", kb->slot_error[0] ?
				    kb->slot_error : "RAM not page aligned");
	pthread_mutex_unlock(&kb->slot_lock);
	return r;
}

void backend_kvm_memslots(void *priv, struct kvm_slots_report *rep)
{
	struct kvm_backend *kb = priv;

	memset(rep, 0, sizeof(*rep));
	pthread_mutex_lock(&kb->slot_lock);
	for (unsigned i = 0; i < kb->slots.limit; i++) {
		const struct kvm_slot_ent *e = &kb->slots.e[i];
		struct kvm_slot_info *o;

		if (!e->used)
			continue;
		o = &rep->slot[rep->nr++];
		o->slot = i;
		o->gpa = e->gpa;
		o->size = e->size;
		o->offset = e->offset;
		snprintf(o->region, sizeof(o->region), "%s", e->region);
		o->guest_ram = e->guest_ram;
		o->dirty_log = e->dirty_log;
	}
	rep->limit = kb->slots.limit;
	rep->dirty_logging = kb->dirty_on;
	rep->unmapped = kb->unmapped;
	snprintf(rep->error, sizeof(rep->error), "%s", kb->slot_error);
	pthread_mutex_unlock(&kb->slot_lock);
	rep->mmio_exits = __atomic_load_n(&kb->mmio_exits, __ATOMIC_RELAXED);
	rep->mmio_hole = __atomic_load_n(&kb->mmio_hole, __ATOMIC_RELAXED);
	rep->mmio_ram = __atomic_load_n(&kb->mmio_ram, __ATOMIC_RELAXED);
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
	/* The map outlives us (vm_destroy frees devices after the backend);
	 * stop listening before the slots vanish with the VM. */
	if (kb->attached)
		memmap_listener_unregister(kb->mm, &kb->listener);
	kvm_vm_destroy(kb->kvm);
	free(kb->dirty_pending);
	free(kb->dirty_scratch);
	pthread_mutex_destroy(&kb->slot_lock);
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
	/* The vCPU state's XSAVE area is 64-byte aligned: more than calloc
	 * promises. */
	kb = aligned_alloc(_Alignof(struct kvm_backend), sizeof(*kb));
	if (kb)
		memset(kb, 0, sizeof(*kb));
	if (!kb)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	kb->vm = vm;
	kb->ram_pages = vm_ram_size(vm) / KVM_SLOTS_PAGE;
	pthread_mutex_init(&kb->lock, NULL);
	pthread_mutex_init(&kb->slot_lock, NULL);
	/* No memslot yet: they follow the memory map once it is attached
	 * (backend_kvm_attach_memmap), before anything runs. */
	r = kvm_vm_create(&kb->kvm, &opts, &ke);
	if (!r)
		kvm_slot_table_init(&kb->slots, kvm_vm_caps(kb->kvm)->nr_memslots);
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
	/* Through the slots: the image and the page tables must be in RAM
	 * that KVM maps (code cannot run from a range that exits). */
	pthread_mutex_lock(&kb->slot_lock);
	r = kvm_vm_write(kb->kvm, GUEST_IMAGE_GPA, ferry_guest_image, img, &ke);
	if (!r)
		r = kvm_vm_build_identity_map(kb->kvm, GUEST_PT_GPA, GUEST_PT_SIZE,
					      GUEST_MAP_SIZE, &ke);
	pthread_mutex_unlock(&kb->slot_lock);
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

/*
 * Dirty logging covers every slot of guest RAM. The caller's bitmap is
 * indexed by page of guest RAM (vm_ram()), so each slot's log is fetched
 * into a scratch bitmap and ORed in at the slot's page offset in guest RAM,
 * shifted when that offset is not a multiple of 64 pages (a slot starting
 * right after a 4 KiB BAR, say). Manual protection (KVM_CLEAR_DIRTY_LOG)
 * re-arms each slot separately, in slot-relative pages.
 */
static int kvm_dirty_start(void *priv, struct ferry_error *err)
{
	struct kvm_backend *kb = priv;
	size_t words = kvm_dirty_bitmap_words(vm_ram_size(kb->vm));
	struct kvm_err ke = { 0 };
	int r = 0;

	pthread_mutex_lock(&kb->slot_lock);
	if (kb->dirty_on)
		goto out;
	kb->dirty_pending = calloc(words, sizeof(uint64_t));
	kb->dirty_scratch = calloc(words, sizeof(uint64_t));
	if (!kb->dirty_pending || !kb->dirty_scratch) {
		r = ferry_error_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	for (unsigned i = 0; i < kb->slots.limit && !r; i++) {
		struct kvm_slot_ent *e = &kb->slots.e[i];

		if (!e->used || !e->guest_ram)
			continue;
		r = kvm_vm_set_dirty_logging(kb->kvm, i, true, &ke);
		if (r)
			kerr(err, r, &ke);
		else
			e->dirty_log = true;
	}
	if (r)
		goto fail;
	kb->dirty_on = true;
	goto out;
fail:
	for (unsigned i = 0; i < kb->slots.limit; i++) {
		struct kvm_slot_ent *e = &kb->slots.e[i];

		if (e->used && e->dirty_log &&
		    !kvm_vm_set_dirty_logging(kb->kvm, i, false, &ke))
			e->dirty_log = false;
	}
	free(kb->dirty_pending);
	free(kb->dirty_scratch);
	kb->dirty_pending = kb->dirty_scratch = NULL;
out:
	pthread_mutex_unlock(&kb->slot_lock);
	return r;
}

/* @final changes nothing here: KVM_GET_DIRTY_LOG re-arms as it fetches
 * (without manual-protect mode there is no fetch that does not). */
static int kvm_dirty_sync(void *priv, uint64_t *bitmap, bool final,
			  struct ferry_error *err)
{
	struct kvm_backend *kb = priv;
	size_t words = kvm_dirty_bitmap_words(vm_ram_size(kb->vm));
	struct kvm_err ke = { 0 };
	int r = 0;

	(void)final;
	pthread_mutex_lock(&kb->slot_lock);
	if (!kb->dirty_on) {
		r = ferry_error_set(err, -EINVAL, "dirty logging is off");
		goto out;
	}
	for (unsigned i = 0; i < kb->slots.limit && !r; i++) {
		const struct kvm_slot_ent *e = &kb->slots.e[i];
		uint64_t pages = e->size / KVM_SLOTS_PAGE;

		if (!e->used || !e->dirty_log)
			continue;
		/* Fetch and re-arm (KVM writes the whole slot bitmap). */
		r = kvm_vm_dirty_log_sync(kb->kvm, i, kb->dirty_scratch, &ke);
		if (r) {
			kerr(err, r, &ke);
			break;
		}
		r = kvm_dirty_bitmap_place(bitmap, kb->ram_pages, kb->dirty_scratch,
					   pages, e->offset / KVM_SLOTS_PAGE);
		if (r)
			r = ferry_error_set(err, r, "memslot %u (%#llx pages at "
					    "page %#llx) outside guest RAM", i,
					    (unsigned long long)pages,
					    (unsigned long long)(e->offset /
								 KVM_SLOTS_PAGE));
	}
	/* Pages of deleted slots and writes through exits. */
	for (size_t w = 0; !r && w < words; w++) {
		bitmap[w] |= kb->dirty_pending[w];
		kb->dirty_pending[w] = 0;
	}
out:
	pthread_mutex_unlock(&kb->slot_lock);
	return r;
}

static void kvm_dirty_stop(void *priv)
{
	struct kvm_backend *kb = priv;
	struct kvm_err ke = { 0 };

	pthread_mutex_lock(&kb->slot_lock);
	for (unsigned i = 0; i < kb->slots.limit; i++) {
		struct kvm_slot_ent *e = &kb->slots.e[i];

		if (e->used && e->dirty_log &&
		    !kvm_vm_set_dirty_logging(kb->kvm, i, false, &ke))
			e->dirty_log = false;
	}
	kb->dirty_on = false;
	free(kb->dirty_pending);
	free(kb->dirty_scratch);
	kb->dirty_pending = kb->dirty_scratch = NULL;
	pthread_mutex_unlock(&kb->slot_lock);
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
