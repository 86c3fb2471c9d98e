/*
 * mini-vmm.c - the smallest VMM that live-migrates itself with libferry.
 *
 * It shows, with the public API only, what a VMM hands the migration
 * engine: its RAM with dirty tracking (ferry_ram_new), its device state as
 * a vmstate table (FERRY_VMS_*), and hooks to stop and start its vCPUs
 * (struct ferry_vmm_ops). The engine does all the rest. No KVM: the guest
 * is anonymous memory, its vCPU a thread that keeps rewriting pages. The
 * process forks into a destination (child) and a source (parent); after
 * the migration both hash RAM + device state, and the destination checks
 * that no page is torn or stale.
 *
 * Build against an installed libferry, and run:
 *   cc -o mini-vmm mini-vmm.c $(pkg-config --cflags --libs libferry)
 *   ./mini-vmm [--mem MIB] [--ws MIB] [--channels N]
 * MINI_VMM_TRACE=1 in the environment prints the engine's trace lines.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ferry/ferry.h>

#define PAGE 4096u
#define MIB (1024u * 1024u)

/* The one device (think of a timer): migrated as non-iterable state. */
struct mini_dev {
	uint64_t generation;     /* sweep over the working set in progress */
	uint64_t pages_written;
};

struct vm {
	const char *role;        /* "source" or "destination" */
	uint8_t *mem;
	uint64_t mem_size, ws_pages;
	struct ferry_ctx *ctx;
	struct ferry_ram *ram;
	struct ferry_mig *mig;
	pthread_t vcpu;
	pthread_mutex_t lock;    /* guards what follows */
	pthread_cond_t cond;
	bool run, parked, quit;
	enum ferry_run_state state;
	struct mini_dev dev;
};

static bool trace_on;
static char tmpdir[] = "/tmp/mini-vmm-XXXXXX", sock_path[64];
static pid_t source_pid;

/* The source removes its socket and directory on every exit. */
static void cleanup(void)
{
	if (getpid() == source_pid) {
		unlink(sock_path);
		rmdir(tmpdir);
	}
}

static void die(const char *who, const char *msg)
{
	fprintf(stderr, "mini-vmm: %s: %s\n", who, msg);
	cleanup();
	exit(1);
}

/* ---- the guest ---------------------------------------------------------- */

/* splitmix64's finaliser: a cheap, well-mixed pattern for page contents. */
static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

/* Words 0 and 1 stamp the page with (index, generation >= 1); the others
 * derive from the stamp, so a page mixing two versions does not verify.
 * These are the guest's writes: they race the migration's copies by design
 * (a page written during its copy is dirty again and goes again), so a
 * ThreadSanitizer build must not see them - as it cannot see a KVM guest. */
#if defined(__SANITIZE_THREAD__)
__attribute__((no_sanitize_thread))
#endif
static void write_page(uint64_t *w, uint64_t index, uint64_t gen)
{
	w[0] = index;
	w[1] = gen;
	for (unsigned i = 2; i < PAGE / 8; i++)
		w[i] = mix(index << 32 ^ gen << 12 ^ i);
}

/* Whole: written entirely by one write_page(), or never written (zero). */
static bool page_whole(const uint64_t *w, uint64_t index)
{
	if (w[0] != (w[1] ? index : 0))
		return false;
	for (unsigned i = 2; i < PAGE / 8; i++)
		if (w[i] != (w[1] ? mix(index << 32 ^ w[1] << 12 ^ i) : 0))
			return false;
	return true;
}

static void *vcpu_main(void *opaque)
{
	struct vm *vm = opaque;

	pthread_mutex_lock(&vm->lock);
	while (!vm->quit) {
		uint64_t n, p, gen;

		/* The vCPU parks here only: between two pages. A parked vCPU
		 * does not look at the device either: on the destination the
		 * engine is loading it. */
		vm->parked = !vm->run;
		if (vm->parked) {
			pthread_cond_broadcast(&vm->cond);
			pthread_cond_wait(&vm->cond, &vm->lock);
			continue;
		}
		n = vm->dev.pages_written;
		p = n % vm->ws_pages;
		gen = n / vm->ws_pages + 1;
		pthread_mutex_unlock(&vm->lock);
		/* A real vCPU leaves guest mode now and then (exits, halts).
		 * Ours never would: yielding every 64 pages (~100 us) keeps
		 * it from starving the engine's threads where CPUs are few
		 * (valgrind runs one thread at a time). */
		if (!(n % 64))
			sched_yield();
		/*
		 * Write the page, THEN mark it dirty. The engine clears a
		 * page's dirty bit before it copies the page, so our mark
		 * lands either after that clear (the page goes again in a
		 * later pass) or before it (and the copy reads our write).
		 * Marking first could let a copy read the old data and clear
		 * our mark: the destination would never see this write.
		 * (ferry_ram_mark_dirty publishes the bit with release order,
		 * so the page's stores are visible before it on any CPU.)
		 */
		write_page((uint64_t *)(vm->mem + p * PAGE), p, gen);
		ferry_ram_mark_dirty(vm->ram, 0, p * PAGE, PAGE);

		pthread_mutex_lock(&vm->lock);
		vm->dev.pages_written = n + 1;
		vm->dev.generation = gen;
	}
	vm->parked = true;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	return NULL;
}

/*
 * Dirty tracking, called in the migration thread. A KVM VMM starts, fetches
 * (into @bm) and stops the kernel's dirty log here. Our vCPU marks pages
 * straight into libferry's own bitmap: there is nothing to do.
 */
static int dirty_start(void *o, struct ferry_error *e)
{ (void)o; (void)e; return 0; }
static int dirty_sync(void *o, unsigned b, uint64_t *bm, struct ferry_error *e)
{ (void)o; (void)b; (void)bm; (void)e; return 0; }
static void dirty_stop(void *o) { (void)o; }

static const struct ferry_ram_dirty_ops dirty_ops = {
	.size = sizeof(struct ferry_ram_dirty_ops),
	.start = dirty_start, .sync = dirty_sync, .stop = dirty_stop,
};

/* The device's wire format: two u64 fields, in this order. */
static const struct ferry_vms_field dev_fields[] = {
	FERRY_VMS_U64(struct mini_dev, generation),
	FERRY_VMS_U64(struct mini_dev, pages_written),
	FERRY_VMS_END_OF_LIST,
};
static const struct ferry_vmsd dev_vmsd = {
	.name = "mini-dev", .version = 1, .minimum_version = 1,
	.fields = dev_fields,
};

/* ---- the VMM hooks ------------------------------------------------------ */

/* Source, migration thread, at switchover: park the vCPU, and wait until
 * it has finished its page. */
static int hook_vm_stop(void *opaque, enum ferry_run_state to,
			enum ferry_run_state *was, struct ferry_error *err)
{
	struct vm *vm = opaque;

	(void)err;
	pthread_mutex_lock(&vm->lock);
	*was = vm->state;        /* restored by the engine if it fails */
	vm->run = false;
	pthread_cond_broadcast(&vm->cond);
	while (!vm->parked)
		pthread_cond_wait(&vm->cond, &vm->lock);
	vm->state = to;
	pthread_mutex_unlock(&vm->lock);
	return 0;
}

static void vm_set(struct vm *vm, bool run, enum ferry_run_state state)
{
	pthread_mutex_lock(&vm->lock);
	vm->run = run;
	vm->state = state;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
}

/* Migration thread (a failed migration resumes the source), or incoming
 * thread (the destination at GO, with autostart). */
static int hook_vm_start(void *opaque, struct ferry_error *err)
{
	(void)err;
	vm_set(opaque, true, FERRY_RUN_RUNNING);
	return 0;
}

/* Migration or incoming thread, vCPU already stopped: postmigrate (source,
 * done), paused (destination without autostart), or the state from before
 * vm_stop after a failure. */
static void hook_vm_set_state(void *opaque, enum ferry_run_state to)
{
	vm_set(opaque, false, to);
}

/* Any engine thread, one call at a time: keep it short. */
static void hook_event(void *opaque, const struct ferry_mig_event *ev)
{
	if (ev->kind == FERRY_EV_STATUS)
		printf("[%s] MIGRATION %s -> %s%s%s\n",
		       ((struct vm *)opaque)->role,
		       ferry_mig_status_name(ev->from),
		       ferry_mig_status_name(ev->to),
		       ev->error ? ": " : "", ev->error ? ev->error : "");
}

/* Any engine thread. */
static void hook_trace(void *opaque, const char *line)
{
	if (trace_on)
		fprintf(stderr, "[%s trace] %s\n", ((struct vm *)opaque)->role,
			line);
}

static const struct ferry_vmm_ops vmm_ops = {
	.size = sizeof(struct ferry_vmm_ops),
	.vm_stop = hook_vm_stop,
	.vm_start = hook_vm_start,
	.vm_set_state = hook_vm_set_state,
	.event = hook_event,
	.trace = hook_trace,
};

/* ---- the VM ------------------------------------------------------------- */

static void vm_init(struct vm *vm, const char *role, uint64_t mem_size,
		    uint64_t ws_size, bool running)
{
	struct ferry_error err = { 0 };
	struct ferry_ram_block block;
	struct ferry_mig_config cfg = { .size = sizeof(cfg) };

	memset(vm, 0, sizeof(*vm));
	vm->role = role;
	vm->mem_size = mem_size;
	vm->ws_pages = ws_size / PAGE;
	vm->run = running;
	vm->state = running ? FERRY_RUN_RUNNING : FERRY_RUN_INMIGRATE;
	pthread_mutex_init(&vm->lock, NULL);
	pthread_cond_init(&vm->cond, NULL);
	vm->mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (vm->mem == MAP_FAILED)
		die(role, strerror(errno));

	block = (struct ferry_ram_block){ .name = "ram0", .host = vm->mem,
					  .size = mem_size, .page_size = PAGE };
	/* Registration order is stream order: RAM (sent while the guest
	 * runs) first, then the device (sent at switchover). */
	if (!(vm->ctx = ferry_ctx_new(&err)) ||
	    !(vm->ram = ferry_ram_new(&block, 1, &dirty_ops, vm, &err)) ||
	    ferry_ram_register(vm->ram, vm->ctx, &err) ||
	    ferry_register_vmstate(vm->ctx, &dev_vmsd, 0, &vm->dev, &err))
		die(role, err.msg);

	cfg.ctx = vm->ctx;
	cfg.ram = vm->ram;       /* optional; what enables multifd */
	cfg.ops = &vmm_ops;
	cfg.opaque = vm;
	/* Keep the destination paused, so that we compare exactly the state
	 * the source stopped in. A real VMM would usually let it run. */
	cfg.autostart = false;
	if (!(vm->mig = ferry_mig_new(&cfg, &err)))
		die(role, err.msg);
	if (pthread_create(&vm->vcpu, NULL, vcpu_main, vm))
		die(role, "cannot create the vCPU thread");
}

static void vm_destroy(struct vm *vm)
{
	/* The engine first: ferry_mig_free joins its threads, which use the
	 * RAM, the context and our hooks. */
	ferry_mig_free(vm->mig);
	pthread_mutex_lock(&vm->lock);
	vm->quit = true;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	pthread_join(vm->vcpu, NULL);
	ferry_ctx_free(vm->ctx);
	ferry_ram_free(vm->ram);
	munmap(vm->mem, vm->mem_size);
	pthread_mutex_destroy(&vm->lock);
	pthread_cond_destroy(&vm->cond);
}

/* FNV-1a over RAM and device, a 64-bit word at a time; vCPU parked. */
static uint64_t vm_digest(const struct vm *vm)
{
	const uint64_t *w = (const uint64_t *)vm->mem;
	uint64_t h = 0xcbf29ce484222325ull;

	for (uint64_t i = 0; i < vm->mem_size / 8; i++)
		h = (h ^ w[i]) * 0x100000001b3ull;
	h = (h ^ vm->dev.generation) * 0x100000001b3ull;
	return (h ^ vm->dev.pages_written) * 0x100000001b3ull;
}

static uint64_t vm_bad_pages(const struct vm *vm)
{
	uint64_t bad = 0;

	for (uint64_t p = 0; p < vm->mem_size / PAGE; p++)
		bad += !page_whole((const uint64_t *)(vm->mem + p * PAGE), p);
	return bad;
}

/* ---- the two sides ------------------------------------------------------ */

static int destination(const char *uri, uint64_t mem, uint64_t ws,
		       int ready_fd, int result_fd)
{
	struct ferry_error err = { 0 };
	struct ferry_mig_info i = { .size = sizeof(i) };
	uint64_t res[2];
	struct vm vm;

	vm_init(&vm, "destination", mem, ws, false);   /* inmigrate, parked */
	if (ferry_mig_incoming(vm.mig, uri, &err))
		die("destination", err.msg);
	/* The socket is listening now: the source may connect. */
	if (write(ready_fd, "", 1) != 1)
		die("destination", "cannot signal the source");
	if (ferry_mig_wait(vm.mig, 60000))
		die("destination", "no migration within 60 s");
	ferry_mig_query(vm.mig, &i);
	if (i.status != FERRY_MIG_COMPLETED)
		die("destination", i.error);
	/* vm.state and vm.dev need no lock: the engine wrote them before it
	 * published "completed", and nothing runs the vCPU. (The event hook
	 * may report "completed" just after this line: it runs after the
	 * status is published, which is what ferry_mig_wait waits for.) */
	printf("[destination] loaded, run state %s\n",
	       ferry_run_state_name(vm.state));
	res[0] = vm_digest(&vm);
	res[1] = vm_bad_pages(&vm);
	if (write(result_fd, res, sizeof(res)) != sizeof(res))
		die("destination", "cannot send the result");
	vm_destroy(&vm);
	return 0;
}

static void migrate(struct vm *vm, const char *uri, unsigned channels,
		    int ready_fd)
{
	struct ferry_error err = { 0 };
	struct ferry_mig_info i = { .size = sizeof(i) };
	struct ferry_setting set = { .name = "multifd-channels",
				     .u = channels };
	char c;

	if (ferry_mig_set(vm->mig, &set, 1, &err))
		die("source", err.msg);
	if (read(ready_fd, &c, 1) != 1)
		die("source", "the destination did not start");
	if (ferry_mig_start(vm->mig, uri, &err))
		die("source", err.msg);
	do {
		ferry_mig_query(vm->mig, &i);
		printf("[source] %-9s pass %2llu, sent %6.1f MiB, expected downtime %llu ms\n",
		       ferry_mig_status_name(i.status),
		       (unsigned long long)i.pass,
		       (double)i.ram_transferred / MIB,
		       (unsigned long long)i.expected_downtime_ms);
	} while (ferry_mig_wait(vm->mig, 100) == -ETIMEDOUT);

	ferry_mig_query(vm->mig, &i);
	if (i.status != FERRY_MIG_COMPLETED)
		die("source", i.error);
	printf("[source] completed in %llu ms, %llu passes; downtime %.2f ms:\n",
	       (unsigned long long)i.total_time_ms, (unsigned long long)i.pass,
	       (double)i.downtime_ns / 1e6);
	for (int p = 0; p < FERRY_PHASE__MAX; p++)
		printf("[source]   %-14s %6.2f ms\n",
		       ferry_phase_name((enum ferry_phase)p), i.phase_ms[p]);
}

int main(int argc, char **argv)
{
	unsigned long mem = 64, ws = 32, channels = 2;
	uint64_t dst[2];
	int ready[2], result[2], status;
	char uri[80];
	struct vm vm;
	bool equal;
	pid_t pid;

	for (int i = 1; i < argc; i++) {
		unsigned long *v = !strcmp(argv[i], "--mem") ? &mem :
				   !strcmp(argv[i], "--ws") ? &ws :
				   !strcmp(argv[i], "--channels") ? &channels :
				   NULL;
		char *end = NULL;

		if (v && i + 1 < argc)
			*v = strtoul(argv[++i], &end, 10);
		if (!end || *end || !*v)
			die("usage", "mini-vmm [--mem MIB] [--ws MIB] [--channels N]");
	}
	if (ws > mem)
		die("usage", "--ws must not exceed --mem");
	trace_on = getenv("MINI_VMM_TRACE") &&
		   !strcmp(getenv("MINI_VMM_TRACE"), "1");
	/* Whole lines, in order, from both processes and all threads. */
	setvbuf(stdout, NULL, _IOLBF, 0);

	source_pid = getpid();
	if (!mkdtemp(tmpdir) || pipe(ready) || pipe(result))
		die("setup", strerror(errno));
	snprintf(sock_path, sizeof(sock_path), "%s/migrate.sock", tmpdir);
	snprintf(uri, sizeof(uri), "unix:%s", sock_path);

	/* Fork before any thread exists: the child starts clean. */
	pid = fork();
	if (pid < 0)
		die("fork", strerror(errno));
	if (!pid) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);   /* die with the source */
		close(ready[0]);
		close(result[0]);
		return destination(uri, mem * MIB, ws * MIB, ready[1],
				   result[1]);
	}
	close(ready[1]);
	close(result[1]);

	vm_init(&vm, "source", mem * MIB, ws * MIB, true);
	/* Let the guest write its working set once before we start: there is
	 * something to send, and it keeps changing while we send it. */
	for (uint64_t gen = 0; gen < 2; usleep(10000)) {
		pthread_mutex_lock(&vm.lock);
		gen = vm.dev.generation;
		pthread_mutex_unlock(&vm.lock);
	}
	printf("[source] guest: %lu MiB, %lu MiB being rewritten; to %s, %lu channel(s)\n",
	       mem, ws, uri, channels);
	migrate(&vm, uri, (unsigned)channels, ready[0]);

	/* Our vCPU is parked for good (postmigrate): this digest is the state
	 * the destination must hold. */
	printf("[source] run state %s\n", ferry_run_state_name(vm.state));
	if (read(result[0], dst, sizeof(dst)) != sizeof(dst))
		die("source", "no result from the destination");
	equal = dst[0] == vm_digest(&vm);
	printf("digests equal: %s, bad pages on the destination: %llu\n",
	       equal ? "yes" : "no", (unsigned long long)dst[1]);
	vm_destroy(&vm);
	if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) ||
	    WEXITSTATUS(status))
		die("source", "the destination failed");
	if (!equal || dst[1])
		die("source", "the destination does not hold the source's VM");
	cleanup();
	printf("mini-vmm: migration verified\n");
	return 0;
}
