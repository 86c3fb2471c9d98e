/*
 * vmm/vm/vm.c - the reference VMM: guest RAM, backend, devices, run states,
 * and save/restore through libferry.
 *
 * Ownership and locking:
 *   - vm->lock guards the run state and every backend pause/resume, so a
 *     `stop` from the control socket and a migration's switchover cannot
 *     interleave. The control thread, the engine's threads (through the
 *     hooks in vm-migrate.c) and the main thread all take it; vCPU threads
 *     never do. It also guards vm->control for events from engine threads.
 *   - Migrations belong to libferry's engine (vm->mig), which keeps its own
 *     state and locks; the VMM never holds vm->lock while calling it.
 *   - Guest RAM belongs to the guest; the VMM writes only the command block,
 *     and every such write is reported to the RAM device as dirty, because
 *     no dirty log sees writes made through the VMM's own mapping.
 *
 * Run states follow QEMU's names. Every transition goes through
 * set_run_state(), which checks it against the table below and traces it
 * (FERRY_TRACE=1 prints transitions on stderr).
 */
#include <errno.h>
#include <stdarg.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "control/control.h"
#include "kvm/kvm-slots.h"
#include "threads/dirty-uffd.h"
#include "vm/vm-internal.h"

/* allowed[from] = bitmask of states reachable from it. */
#define B(s) (1u << FERRY_RUN_##s)
static const unsigned run_state_allowed[FERRY_RUN__MAX] = {
	[FERRY_RUN_PRELAUNCH] = B(RUNNING) | B(PAUSED) | B(INMIGRATE) | B(SHUTDOWN),
	/* POSTMIGRATE: a migrate-incoming into a migrated-out VM that could
	 * not even start (a bad URI, a busy port) gives the state back. */
	[FERRY_RUN_INMIGRATE] = B(RUNNING) | B(PAUSED) | B(POSTMIGRATE) |
				B(SHUTDOWN),
	[FERRY_RUN_RUNNING] = B(PAUSED) | B(FINISH_MIGRATE) | B(GUEST_PANICKED) |
			      B(SHUTDOWN),
	[FERRY_RUN_PAUSED] = B(RUNNING) | B(FINISH_MIGRATE) | B(SHUTDOWN),
	[FERRY_RUN_FINISH_MIGRATE] = B(POSTMIGRATE) | B(RUNNING) | B(PAUSED) |
				     B(SHUTDOWN),
	[FERRY_RUN_POSTMIGRATE] = B(RUNNING) | B(FINISH_MIGRATE) | B(INMIGRATE) |
				  B(SHUTDOWN),
	[FERRY_RUN_GUEST_PANICKED] = B(SHUTDOWN),
	[FERRY_RUN_SHUTDOWN] = 0,
};
#undef B

void vm_trace(struct vm *vm, const char *fmt, ...)
{
	va_list ap;
	struct timespec ts;

	if (!vm->trace)
		return;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	fprintf(stderr, "[%ld.%06ld] ferry-vm %d: ", (long)ts.tv_sec,
		ts.tv_nsec / 1000, (int)getpid());
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/* Caller holds vm->lock. A transition outside the table is a VMM bug. */
void vm_set_run_state(struct vm *vm, enum ferry_run_state to)
{
	enum ferry_run_state from = vm->run_state;

	if (from == to)
		return;
	if (!(run_state_allowed[from] & (1u << to))) {
		fprintf(stderr, "ferry vm: invalid run state transition %s -> %s\n",
			ferry_run_state_name(from), ferry_run_state_name(to));
		abort();
	}
	vm->run_state = to;
	vm_trace(vm, "run state %s -> %s", ferry_run_state_name(from),
		 ferry_run_state_name(to));
	if (to == FERRY_RUN_RUNNING || from == FERRY_RUN_RUNNING)
		vm_bulk_run_state(vm, to);
	if (vm->control) {
		json_t *d = json_pack("{s:s, s:s}", "status", ferry_run_state_name(to),
				      "from", ferry_run_state_name(from));
		if (to == FERRY_RUN_RUNNING)
			control_event(vm->control, "RESUME", NULL);
		else if (from == FERRY_RUN_RUNNING)
			control_event(vm->control, "STOP", NULL);
		control_event(vm->control, "RUN_STATE", d); /* takes d */
	}
}

enum ferry_run_state vm_run_state(struct vm *vm)
{
	enum ferry_run_state s;

	pthread_mutex_lock(&vm->lock);
	s = vm->run_state;
	pthread_mutex_unlock(&vm->lock);
	return s;
}

uint8_t *vm_ram(struct vm *vm) { return vm->ram; }
uint64_t vm_ram_size(struct vm *vm) { return vm->cfg.mem; }
unsigned vm_vcpus(struct vm *vm) { return vm->cfg.vcpus; }

static struct guest_cmd *cmd_block(struct vm *vm)
{
	return (struct guest_cmd *)(vm->ram + GUEST_CMD_GPA);
}

static const struct guest_status *status_block(struct vm *vm)
{
	return (const struct guest_status *)(vm->ram + GUEST_STATUS_GPA);
}

/* Every VMM write into guest RAM goes through here (see top comment). */
static void cmd_written(struct vm *vm)
{
	if (vm->ram_dev)
		ferry_ram_mark_dirty(vm->ram_dev, 0, GUEST_CMD_GPA, GUEST_PAGE_SIZE);
}

void vm_guest_setup_cmd(struct vm *vm, uint64_t tsc_hz)
{
	struct guest_cmd *c = cmd_block(vm);
	const struct vm_workload *wl = &vm->cfg.workload;

	c->magic = GUEST_CMD_MAGIC;
	c->version = GUEST_LAYOUT_VERSION;
	c->data_pages = GUEST_DATA_PAGES(vm->cfg.mem);
	c->tsc_hz = tsc_hz;
	c->workload = wl->kind;
	c->pattern = wl->pattern;
	c->ws_pages = wl->ws_bytes / GUEST_PAGE_SIZE;
	c->rate_mbps = wl->rate_mbps;
	c->seed = (uint64_t)time(NULL) ^ (uint64_t)getpid() << 20;
	__atomic_store_n(&c->seq, c->seq + 1, __ATOMIC_RELEASE);
	cmd_written(vm);
}

void vm_guest_info(struct vm *vm, struct vm_guest_info *gi)
{
	const struct guest_status *s = status_block(vm);

	gi->booted = __atomic_load_n(&s->magic, __ATOMIC_ACQUIRE) ==
		     GUEST_STATUS_MAGIC;
	gi->generation = __atomic_load_n(&s->generation, __ATOMIC_RELAXED);
	gi->heartbeat = __atomic_load_n(&s->heartbeat, __ATOMIC_RELAXED);
	gi->verify_seq = __atomic_load_n(&s->verify_seq, __ATOMIC_ACQUIRE);
	gi->verify_passes = s->verify_passes;
	gi->bad_pages = s->bad_pages;
	gi->first_bad_page = s->first_bad_page;
	gi->last_bad_page = s->last_bad_page;
	gi->state = s->state;
	gi->workload = s->workload;
}

uint64_t vm_guest_verify(struct vm *vm)
{
	struct guest_cmd *c = cmd_block(vm);
	uint64_t seq = __atomic_add_fetch(&c->verify_seq, 1, __ATOMIC_RELEASE);

	cmd_written(vm);
	return seq;
}

int vm_guest_wait_verify(struct vm *vm, uint64_t seq, int timeout_ms,
			 struct ferry_error *err)
{
	const struct guest_status *s = status_block(vm);

	for (int waited = 0; timeout_ms < 0 || waited < timeout_ms; waited++) {
		if (__atomic_load_n(&s->verify_seq, __ATOMIC_ACQUIRE) >= seq)
			return 0;
		usleep(1000);
	}
	return ferry_error_set(err, -ETIMEDOUT,
		"guest did not finish verify pass %" PRIu64 " (is it running?)", seq);
}

int vm_ram_digest(struct vm *vm, char out[33], struct ferry_error *err)
{
	enum ferry_run_state st = vm_run_state(vm);
	XXH128_hash_t h;

	if (st == FERRY_RUN_RUNNING)
		return ferry_error_set(err, -EBUSY,
			"the RAM digest needs a stopped VM (run 'stop' first)");
	h = XXH3_128bits(vm->ram, vm->cfg.mem);
	snprintf(out, 33, "%016" PRIx64 "%016" PRIx64, (uint64_t)h.high64,
		 (uint64_t)h.low64);
	return 0;
}

int vm_stop(struct vm *vm, struct ferry_error *err)
{
	int r = 0;

	pthread_mutex_lock(&vm->lock);
	if (vm->run_state == FERRY_RUN_RUNNING) {
		r = vm->be->pause(vm->be_priv, err);
		if (!r)
			vm_set_run_state(vm, FERRY_RUN_PAUSED);
	}
	pthread_mutex_unlock(&vm->lock);
	return r;
}

/* Caller holds vm->lock. Starts vCPU threads on the first run. */
int vm_resume_locked(struct vm *vm, struct ferry_error *err)
{
	int r;

	if (vm->run_state == FERRY_RUN_RUNNING)
		return 0;
	if (vm->run_state == FERRY_RUN_GUEST_PANICKED || vm->run_state == FERRY_RUN_SHUTDOWN)
		return ferry_error_set(err, -EINVAL, "the VM is %s",
				       ferry_run_state_name(vm->run_state));
	if (!vm->started) {
		r = vm->be->start(vm->be_priv, err);
		if (r)
			return r;
		vm->started = true;
	} else {
		vm->be->resume(vm->be_priv);
	}
	vm_set_run_state(vm, FERRY_RUN_RUNNING);
	return 0;
}

int vm_cont(struct vm *vm, struct ferry_error *err)
{
	int r;

	pthread_mutex_lock(&vm->lock);
	if (vm->run_state == FERRY_RUN_INMIGRATE)
		r = ferry_error_set(err, -EBUSY, "incoming migration not finished");
	/* The switchover stopped the vCPUs: only the migration may end that
	 * (by resuming on failure, or handing the VM over). Running them now
	 * would let the guest write after the final state was taken. */
	else if (vm->run_state == FERRY_RUN_FINISH_MIGRATE)
		r = ferry_error_set(err, -EBUSY, "a migration is switching over; "
				    "cancel it (migrate-cancel) to get the VM back");
	else
		r = vm_resume_locked(vm, err);
	pthread_mutex_unlock(&vm->lock);
	return r;
}

/* ---- RAM dirty tracking for libferry ------------------------------------ */

static int ram_dirty_start(void *opaque, struct ferry_error *err)
{
	struct vm *vm = opaque;
	return vm->be->dirty_start(vm->be_priv, err);
}

static int ram_dirty_sync(void *opaque, unsigned block, uint64_t *bitmap,
			  struct ferry_error *err)
{
	struct vm *vm = opaque;
	(void)block;
	return vm->be->dirty_sync(vm->be_priv, bitmap, false, err);
}

static int ram_dirty_sync_final(void *opaque, unsigned block,
				uint64_t *bitmap, struct ferry_error *err)
{
	struct vm *vm = opaque;
	(void)block;
	return vm->be->dirty_sync(vm->be_priv, bitmap, true, err);
}

static void ram_dirty_stop(void *opaque)
{
	struct vm *vm = opaque;
	vm->be->dirty_stop(vm->be_priv);
}

static int ram_populated(void *opaque, unsigned block, uint64_t *bitmap,
			 struct ferry_error *err)
{
	struct vm *vm = opaque;
	(void)block;
	return mem_present_pages(vm->ram, vm->cfg.mem, bitmap, err);
}

static const struct ferry_ram_dirty_ops ram_dirty_ops = {
	.size = sizeof(struct ferry_ram_dirty_ops),
	.start = ram_dirty_start,
	.sync = ram_dirty_sync,
	.stop = ram_dirty_stop,
	.populated = ram_populated,
	.sync_final = ram_dirty_sync_final,
};

/* ---- creation ------------------------------------------------------------ */

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

struct prealloc_job {
	uint8_t *base;
	uint64_t len;
	int error;                    /* errno of a failed populate, or 0 */
	bool threaded;                /* ran on a thread of its own */
};

static void *prealloc_thread(void *arg)
{
	struct prealloc_job *j = arg;

	while (madvise(j->base, j->len, MADV_POPULATE_WRITE))
		if (errno != EINTR && errno != EAGAIN) {
			j->error = errno;
			break;
		}
	return NULL;
}

/*
 * --prealloc (QEMU's mem-prealloc, Cloud Hypervisor's prefault): commit and
 * fault in all guest RAM now, one slice per online CPU, so neither the guest
 * nor an incoming migration pays for first touches later. Faulting fresh
 * memory is the slowest thing a destination does (see docs/architecture.md),
 * so a destination started ahead of time with --prealloc receives at the
 * speed of the link. The price is committing every page, zero or not.
 */
static int prealloc_ram(struct vm *vm, struct ferry_error *err)
{
	struct prealloc_job jobs[8];
	pthread_t tids[8];
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	unsigned n = ncpu < 1 ? 1 : ncpu > 8 ? 8 : (unsigned)ncpu, nj = 0;
	uint64_t slice = (vm->cfg.mem / n + 0x1fffff) & ~0x1fffffull, off = 0;
	int e = 0;

	for (; nj < n && off < vm->cfg.mem; nj++) {
		struct prealloc_job *j = &jobs[nj];

		*j = (struct prealloc_job){
			.base = vm->ram + off,
			.len = vm->cfg.mem - off < slice ? vm->cfg.mem - off : slice,
		};
		off += j->len;
		/* The last slice, and any slice no thread could be started
		 * for, runs on this thread. */
		j->threaded = off < vm->cfg.mem &&
			      !pthread_create(&tids[nj], NULL, prealloc_thread, j);
		if (!j->threaded)
			prealloc_thread(j);
	}
	for (unsigned i = 0; i < nj; i++) {
		if (jobs[i].threaded)
			pthread_join(tids[i], NULL);
		if (jobs[i].error && !e)
			e = jobs[i].error;
	}
	if (e)
		return ferry_error_set(err, -e, "cannot preallocate %" PRIu64
				       " bytes of guest RAM: %s", vm->cfg.mem,
				       strerror(e));
	return 0;
}

static int map_ram(struct vm *vm, struct ferry_error *err)
{
	int flags = MAP_NORESERVE;
	int fd = -1;

	if (vm->cfg.memfd) {
		fd = memfd_create("ferry-guest-ram", MFD_CLOEXEC);
		if (fd < 0 || ftruncate(fd, (off_t)vm->cfg.mem) < 0) {
			int e = errno;
			if (fd >= 0)
				close(fd);
			return ferry_error_set(err, -e, "memfd for guest RAM: %s",
					       strerror(e));
		}
		flags |= MAP_SHARED;
	} else {
		flags |= MAP_PRIVATE | MAP_ANONYMOUS;
	}
	vm->ram = mmap(NULL, vm->cfg.mem, PROT_READ | PROT_WRITE, flags, fd, 0);
	if (fd >= 0)
		close(fd);
	if (vm->ram == MAP_FAILED) {
		vm->ram = NULL;
		return ferry_error_set(err, -errno, "cannot map %" PRIu64
				       " bytes of guest RAM: %s", vm->cfg.mem,
				       strerror(errno));
	}
	/* Guest RAM is all 4 KiB pages to the dirty log; huge pages would
	 * make every dirty bit cost 2 MiB of copying. */
	madvise(vm->ram, vm->cfg.mem, MADV_NOHUGEPAGE);
	return vm->cfg.prealloc ? prealloc_ram(vm, err) : 0;
}

static int pick_backend(struct vm *vm, struct ferry_error *err)
{
	char why[300];

	switch (vm->cfg.backend) {
	case VM_BACKEND_KVM:
		if (!backend_kvm_usable(why, sizeof(why)))
			return ferry_error_set(err, -ENODEV, "KVM backend: %s", why);
		vm->be = &backend_kvm_ops;
		return 0;
	case VM_BACKEND_THREAD:
		vm->be = &backend_thread_ops;
		return 0;
	case VM_BACKEND_AUTO:
	default:
		if (backend_kvm_usable(why, sizeof(why))) {
			vm->be = &backend_kvm_ops;
		} else {
			vm_trace(vm, "KVM not usable (%s); using the thread backend", why);
			vm->be = &backend_thread_ops;
		}
		return 0;
	}
}

struct vm *vm_create(const struct vm_config *cfg, struct ferry_error *err)
{
	struct ferry_ram_block block;
	struct vm *vm;
	int r;

	if (cfg->mem < GUEST_MIN_RAM || cfg->mem > GUEST_MAX_RAM ||
	    cfg->mem % (2u << 20)) {
		ferry_error_set(err, -EINVAL,
			"--mem must be a multiple of 2 MiB between %llu MiB and %llu GiB",
			(unsigned long long)(GUEST_MIN_RAM >> 20),
			(unsigned long long)(GUEST_MAX_RAM >> 30));
		return NULL;
	}
	if (cfg->vcpus < 1 || cfg->vcpus > 8) {
		ferry_error_set(err, -EINVAL, "--vcpus must be 1..8");
		return NULL;
	}
	vm = calloc(1, sizeof(*vm));
	if (!vm) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	vm->cfg = *cfg;
	vm->trace = getenv("FERRY_TRACE") && *getenv("FERRY_TRACE") == '1';
	pthread_mutex_init(&vm->lock, NULL);
	pthread_cond_init(&vm->quit_cond, NULL);
	pthread_cond_init(&vm->throttle_cond, NULL);
	vm->run_state = FERRY_RUN_PRELAUNCH;

	r = map_ram(vm, err);
	if (!r)
		r = pick_backend(vm, err);
	if (!r)
		r = vm->be->create(vm, &vm->be_priv, err);
	if (r)
		goto fail;
	vm->ctx = ferry_ctx_new(err);
	if (!vm->ctx)
		goto fail;
	block = (struct ferry_ram_block){ "ram0", vm->ram, cfg->mem, 4096 };
	vm->ram_dev = ferry_ram_new(&block, 1, &ram_dirty_ops, vm, err);
	if (!vm->ram_dev || ferry_ram_register(vm->ram_dev, vm->ctx, err))
		goto fail;
	/* Registration order is stream order: RAM, then vCPUs, then devices. */
	for (unsigned i = 0; i < cfg->vcpus; i++)
		if (ferry_register_vmstate(vm->ctx, vm->be->cpu_vmsd, i,
					   vm->be->cpu_state(vm->be_priv, i), err))
			goto fail;
	serial_init(&vm->serial, -1);
	timer_init(&vm->timer, 1000000);
	if (ferry_register_vmstate(vm->ctx, &serial_vmsd, 0, &vm->serial, err) ||
	    ferry_register_vmstate(vm->ctx, &timer_vmsd, 0, &vm->timer, err))
		goto fail;
	if (vm_devices_create(vm, err) || vm_bulk_create(vm, err))
		goto fail;
	/* The memory map exists only now (devices register after the vCPUs,
	 * in stream order): from here on KVM's memslots follow it. */
	if (vm->be == &backend_kvm_ops &&
	    backend_kvm_attach_memmap(vm->be_priv, vm->memmap, vm->ram_region, err))
		goto fail;
	/* The engine, and an incoming migration's listener, before the
	 * control socket answers: whoever sees the VM up may start the source
	 * at once. */
	if (vm_migration_init(vm, err))
		goto fail;
	if (cfg->control && vm_control_start(vm, err))
		goto fail;
	return vm;
fail:
	vm_destroy(vm);
	return NULL;
}

void vm_destroy(struct vm *vm)
{
	if (!vm)
		return;
	vm_control_stop(vm);
	/* A migration still running is abandoned: the engine cuts its
	 * connections and joins its threads (which may still call the hooks,
	 * so this comes before the backend goes). */
	ferry_mig_free(vm->mig);
	vm->mig = NULL;
	vm_throttle_stop(vm);
	if (vm->be && vm->be_priv)
		vm->be->destroy(vm->be_priv);
	vm_devices_destroy(vm);
	vm_bulk_destroy(vm);
	ferry_ctx_free(vm->ctx);
	ferry_ram_free(vm->ram_dev);
	if (vm->ram)
		munmap(vm->ram, vm->cfg.mem);
	pthread_mutex_destroy(&vm->lock);
	pthread_cond_destroy(&vm->quit_cond);
	pthread_cond_destroy(&vm->throttle_cond);
	free(vm);
}

/* ---- start, incoming ---------------------------------------------------- */

int vm_start(struct vm *vm, struct ferry_error *err)
{
	int r;

	/* An incoming VM waits for the engine, which runs it (or leaves it
	 * paused) once its state is loaded and the switchover says so. */
	if (vm->cfg.incoming)
		return 0;
	pthread_mutex_lock(&vm->lock);
	r = vm->be->boot(vm->be_priv, err);
	if (!r && vm->cfg.paused)
		vm_set_run_state(vm, FERRY_RUN_PAUSED);
	else if (!r)
		r = vm_resume_locked(vm, err);
	pthread_mutex_unlock(&vm->lock);
	return r;
}

/* ---- auto-converge throttling ------------------------------------------ */

/*
 * Throttling is imposed by the VMM, not asked of the guest: every 10 ms
 * slice of running time is followed by a pause of pct/(100-pct) slices,
 * so a guest that dirties memory faster than the link can carry gets
 * slower, whatever it is doing. The pause goes through the same backend
 * primitive as `stop`, under vm->lock, so it composes with stop/cont and
 * with the switchover (which finds the vCPUs paused already and keeps
 * them so: the throttle only resumes a VM that is still RUNNING).
 */
#define THROTTLE_SLICE_NS 10000000ull

static void *throttle_main(void *arg)
{
	struct vm *vm = arg;

	pthread_mutex_lock(&vm->lock);
	while (!vm->throttle_stop) {
		unsigned pct = vm->throttle_pct;
		struct timespec ts;

		if (pct && vm->run_state == FERRY_RUN_RUNNING &&
		    !vm->be->pause(vm->be_priv, NULL)) {
			uint64_t ns = THROTTLE_SLICE_NS * pct / (100 - pct);
			struct timespec d = { (time_t)(ns / 1000000000ull),
					      (long)(ns % 1000000000ull) };

			pthread_mutex_unlock(&vm->lock);
			nanosleep(&d, NULL);
			pthread_mutex_lock(&vm->lock);
			if (vm->run_state == FERRY_RUN_RUNNING)
				vm->be->resume(vm->be_priv);
		}
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += (long)THROTTLE_SLICE_NS;
		if (ts.tv_nsec >= 1000000000L) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000L;
		}
		pthread_cond_timedwait(&vm->throttle_cond, &vm->lock, &ts);
	}
	pthread_mutex_unlock(&vm->lock);
	return NULL;
}

void vm_set_throttle(struct vm *vm, unsigned pct)
{
	if (pct > 99)
		pct = 99;
	pthread_mutex_lock(&vm->lock);
	vm->throttle_pct = pct;
	if (pct && !vm->throttle_live) {
		vm->throttle_stop = false;
		if (!pthread_create(&vm->throttle_thread, NULL, throttle_main, vm))
			vm->throttle_live = true;
	}
	pthread_cond_broadcast(&vm->throttle_cond);
	pthread_mutex_unlock(&vm->lock);
}

void vm_throttle_stop(struct vm *vm)
{
	pthread_mutex_lock(&vm->lock);
	vm->throttle_stop = true;
	vm->throttle_pct = 0;
	pthread_cond_broadcast(&vm->throttle_cond);
	pthread_mutex_unlock(&vm->lock);
	if (vm->throttle_live) {
		pthread_join(vm->throttle_thread, NULL);
		vm->throttle_live = false;
	}
}

void vm_request_quit(struct vm *vm)
{
	pthread_mutex_lock(&vm->lock);
	vm->quit = true;
	pthread_cond_broadcast(&vm->quit_cond);
	pthread_mutex_unlock(&vm->lock);
}

void vm_request_quit_async(struct vm *vm)
{
	vm->quit_async = 1;
}

int vm_main_loop(struct vm *vm)
{
	int status = 0;

	pthread_mutex_lock(&vm->lock);
	while (!vm->quit && !vm->quit_async) {
		struct timespec ts;
		char msg[300];

		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += 100 * 1000000L;
		if (ts.tv_nsec >= 1000000000L) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000L;
		}
		pthread_cond_timedwait(&vm->quit_cond, &vm->lock, &ts);
		if (vm->run_state != FERRY_RUN_GUEST_PANICKED &&
		    vm->be->failed(vm->be_priv, msg, sizeof(msg))) {
			fprintf(stderr, "ferry vm: %s\n", msg);
			if (vm->run_state == FERRY_RUN_RUNNING)
				vm_set_run_state(vm, FERRY_RUN_GUEST_PANICKED);
			if (vm->control) {
				json_t *d = json_pack("{s:s}", "message", msg);
				control_event(vm->control, "GUEST_PANICKED", d);
			}
			status = 1;
			/* Without a control socket nobody can inspect it. */
			if (!vm->control)
				break;
		}
		/* While the engine loads incoming state, or saves it at the
		 * switchover, device state is the migration's: the counter
		 * catches up afterwards (it is free-running). */
		if (vm->run_state != FERRY_RUN_INMIGRATE &&
		    vm->run_state != FERRY_RUN_FINISH_MIGRATE) {
			struct timespec mono;
			clock_gettime(CLOCK_MONOTONIC, &mono);
			timer_update(&vm->timer, (uint64_t)mono.tv_sec * 1000000000ull +
					     (uint64_t)mono.tv_nsec);
		}
	}
	if (vm->exit_status)
		status = vm->exit_status;
	if (vm->run_state != FERRY_RUN_SHUTDOWN)
		vm_set_run_state(vm, FERRY_RUN_SHUTDOWN);
	pthread_mutex_unlock(&vm->lock);
	/* Let the control thread deliver the reply to `quit` before the
	 * socket goes away. */
	usleep(20000);
	return status;
}
