/*
 * tests/unit/minivm.c - see minivm.h.
 *
 * Dirty tracking is the writer's own: it writes a page, then marks it
 * dirty (ferry_ram_mark_dirty). In that order a page written after the
 * migration copied it is always marked again, so it goes in a later pass.
 */
#include "../harness.h"

#include <stdarg.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "minivm.h"

static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

/* This plays the guest, whose writes race the migration's copies by
 * design (a page written during its copy is dirty again and resent), so
 * ThreadSanitizer must not see them, as it cannot see a KVM guest's. */
#if defined(__SANITIZE_THREAD__)
__attribute__((no_sanitize_thread))
#endif
static void write_page(uint8_t *p, uint64_t index, uint64_t gen)
{
	uint64_t *w = (uint64_t *)p;

	w[0] = index;
	w[1] = gen;
	for (unsigned i = 2; i < MINIVM_PAGE / 8; i++)
		w[i] = mix(index * 0x100000001b3ull ^ gen ^ i);
}

static bool page_ok(const uint8_t *p, uint64_t index)
{
	const uint64_t *w = (const uint64_t *)p;
	bool zero = true;

	for (unsigned i = 0; i < MINIVM_PAGE / 8 && zero; i++)
		zero = !w[i];
	if (zero)
		return true;   /* never written */
	if (w[0] != index)
		return false;
	for (unsigned i = 2; i < MINIVM_PAGE / 8; i++)
		if (w[i] != mix(index * 0x100000001b3ull ^ w[1] ^ i))
			return false;
	return true;
}

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *writer_main(void *arg)
{
	struct minivm *vm = arg;
	uint64_t npages, gen = 0, done = 0, t0 = mono_ns();

	pthread_mutex_lock(&vm->lock);
	npages = vm->ws / MINIVM_PAGE;
	for (;;) {
		uint64_t rate, throttle;

		while (!vm->run && !vm->quit) {
			vm->parked = true;
			pthread_cond_broadcast(&vm->cond);
			pthread_cond_wait(&vm->cond, &vm->lock);
			t0 = mono_ns();
			done = 0;
		}
		if (vm->quit)
			break;
		vm->parked = false;
		rate = vm->rate;
		throttle = vm->throttle;
		pthread_mutex_unlock(&vm->lock);

		/* One batch of 64 pages: write first, then mark dirty. */
		for (unsigned i = 0; i < 64; i++) {
			uint64_t p = vm->dev.pages % npages;

			if (!p)
				vm->dev.generation = ++gen;
			write_page(vm->mem + p * MINIVM_PAGE, p, gen);
			ferry_ram_mark_dirty(vm->ram, 0, p * MINIVM_PAGE,
					     MINIVM_PAGE);
			__atomic_store_n(&vm->dev.pages, vm->dev.pages + 1,
					 __ATOMIC_RELEASE);
		}
		done += 64 * MINIVM_PAGE;
		if (rate) {
			uint64_t due = done * 1000000000ull / rate;
			uint64_t el = mono_ns() - t0;

			if (due > el)
				usleep((useconds_t)((due - el) / 1000));
		}
		if (throttle)
			usleep((useconds_t)(throttle * 50));
		pthread_mutex_lock(&vm->lock);
	}
	vm->parked = true;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	return NULL;
}

/* ---- the VMM hooks ---------------------------------------------------------- */

static void park_locked(struct minivm *vm)
{
	vm->run = false;
	pthread_cond_broadcast(&vm->cond);
	while (!vm->parked)
		pthread_cond_wait(&vm->cond, &vm->lock);
}

static int h_stop(void *opaque, enum ferry_run_state to,
		  enum ferry_run_state *was, struct ferry_error *err)
{
	struct minivm *vm = opaque;

	(void)err;
	pthread_mutex_lock(&vm->lock);
	*was = vm->state;
	park_locked(vm);
	vm->state = to;
	vm->stops++;
	pthread_mutex_unlock(&vm->lock);
	return 0;
}

static int h_start(void *opaque, struct ferry_error *err)
{
	struct minivm *vm = opaque;

	(void)err;
	pthread_mutex_lock(&vm->lock);
	vm->run = true;
	vm->state = FERRY_RUN_RUNNING;
	vm->starts++;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	return 0;
}

static void h_set_state(void *opaque, enum ferry_run_state to)
{
	struct minivm *vm = opaque;

	pthread_mutex_lock(&vm->lock);
	vm->state = to;
	pthread_mutex_unlock(&vm->lock);
}

static void h_throttle(void *opaque, unsigned pct)
{
	struct minivm *vm = opaque;

	pthread_mutex_lock(&vm->lock);
	vm->throttle = pct;
	pthread_mutex_unlock(&vm->lock);
}

static void h_event(void *opaque, const struct ferry_mig_event *ev)
{
	struct minivm *vm = opaque;

	pthread_mutex_lock(&vm->lock);
	if (vm->nlog < sizeof(vm->log) / sizeof(vm->log[0])) {
		if (ev->kind == FERRY_EV_PASS)
			snprintf(vm->log[vm->nlog++], sizeof(vm->log[0]), "pass");
		else
			snprintf(vm->log[vm->nlog++], sizeof(vm->log[0]), "%s:%s",
				 ev->incoming ? "in" : "out",
				 ferry_mig_status_name(ev->to));
	}
	pthread_mutex_unlock(&vm->lock);
}

static void h_trace(void *opaque, const char *line)
{
	(void)opaque;
	if (getenv("FERRY_TRACE"))
		fprintf(stderr, "[minivm %p] %s\n", opaque, line);
}

static const struct ferry_vmm_ops minivm_ops = {
	.size = sizeof(struct ferry_vmm_ops),
	.vm_stop = h_stop,
	.vm_start = h_start,
	.vm_set_state = h_set_state,
	.vm_throttle = h_throttle,
	.event = h_event,
	.trace = h_trace,
};

/* The writer's dirty log is the RAM bitmap itself. */
static int d_start(void *o, struct ferry_error *e) { (void)o; (void)e; return 0; }
static int d_sync(void *o, unsigned b, uint64_t *bm, struct ferry_error *e)
{
	struct minivm *vm = o;
	uint64_t us;

	(void)b; (void)bm; (void)e;
	pthread_mutex_lock(&vm->lock);
	us = vm->sync_delay_us;
	pthread_mutex_unlock(&vm->lock);
	if (us)
		usleep((useconds_t)us);  /* a slow dirty log (large guest) */
	return 0;
}
static void d_stop(void *o) { (void)o; }
/* Pages the writer ever stamped hold data (their generation word is never
 * zero); the rest are untouched, as a VMM's page tables would say. The
 * destination prepopulates what this reports. Reads guest memory the
 * writer may be writing (see write_page). */
#if defined(__SANITIZE_THREAD__)
__attribute__((no_sanitize_thread))
#endif
static int d_populated(void *o, unsigned b, uint64_t *bm, struct ferry_error *e)
{
	struct minivm *vm = o;

	(void)b; (void)e;
	for (uint64_t pg = 0; pg < vm->size / MINIVM_PAGE; pg++)
		if (((const volatile uint64_t *)(vm->mem + pg * MINIVM_PAGE))[1])
			bm[pg / 64] |= 1ull << (pg % 64);
	return 0;
}

static const struct ferry_ram_dirty_ops minivm_dirty = {
	.size = sizeof(struct ferry_ram_dirty_ops),
	.start = d_start, .sync = d_sync, .stop = d_stop,
	.populated = d_populated,
};

static const struct ferry_vms_field dev_fields[] = {
	FERRY_VMS_U64(struct minivm_dev, generation),
	FERRY_VMS_U64(struct minivm_dev, pages),
	FERRY_VMS_END_OF_LIST,
};
static const struct ferry_vmsd dev_vmsd = {
	.name = "minivm-dev", .version = 1, .minimum_version = 1,
	.fields = dev_fields,
};

void minivm_init(struct minivm *vm, uint64_t size, uint64_t ws, uint64_t rate,
		 bool source, bool autostart)
{
	struct ferry_error err = { 0 };
	struct ferry_ram_block block;
	struct ferry_mig_config cfg = {
		.size = sizeof(cfg), .ops = &minivm_ops, .opaque = vm,
		.autostart = autostart,
	};

	memset(vm, 0, sizeof(*vm));
	vm->size = size;
	vm->ws = ws ? ws : size;
	vm->rate = rate;
	vm->mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	ASSERT(vm->mem != MAP_FAILED);
	pthread_mutex_init(&vm->lock, NULL);
	pthread_cond_init(&vm->cond, NULL);
	vm->state = source ? FERRY_RUN_RUNNING : FERRY_RUN_INMIGRATE;
	vm->run = source;
	vm->ctx = ferry_ctx_new(&err);
	ASSERT_PTR(vm->ctx);
	block = (struct ferry_ram_block){ "ram0", vm->mem, size, MINIVM_PAGE };
	vm->ram = ferry_ram_new(&block, 1, &minivm_dirty, vm, &err);
	ASSERT_PTR(vm->ram);
	ASSERT_OK_E(ferry_ram_register(vm->ram, vm->ctx, &err), err);
	ASSERT_OK_E(ferry_register_vmstate(vm->ctx, &dev_vmsd, 0, &vm->dev, &err),
		    err);
	cfg.ctx = vm->ctx;
	cfg.ram = vm->ram;
	vm->mig = ferry_mig_new(&cfg, &err);
	ASSERT_PTR(vm->mig);
	ASSERT_OK(pthread_create(&vm->writer, NULL, writer_main, vm));
}

void minivm_free(struct minivm *vm)
{
	ferry_mig_free(vm->mig);
	pthread_mutex_lock(&vm->lock);
	vm->quit = true;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	pthread_join(vm->writer, NULL);
	ferry_ctx_free(vm->ctx);
	ferry_ram_free(vm->ram);
	munmap(vm->mem, vm->size);
	pthread_mutex_destroy(&vm->lock);
	pthread_cond_destroy(&vm->cond);
}

void minivm_wait_pages(struct minivm *vm, uint64_t pages)
{
	uint64_t want = __atomic_load_n(&vm->dev.pages, __ATOMIC_ACQUIRE) + pages;

	for (int i = 0; i < 20000; i++) {
		if (__atomic_load_n(&vm->dev.pages, __ATOMIC_ACQUIRE) >= want)
			return;
		usleep(1000);
	}
	FAIL("the writer did not write %llu pages", (unsigned long long)pages);
}

void minivm_cont(struct minivm *vm)
{
	h_start(vm, NULL);
}

void minivm_park(struct minivm *vm)
{
	pthread_mutex_lock(&vm->lock);
	park_locked(vm);
	pthread_mutex_unlock(&vm->lock);
}

enum ferry_run_state minivm_state(struct minivm *vm)
{
	enum ferry_run_state s;

	pthread_mutex_lock(&vm->lock);
	s = vm->state;
	pthread_mutex_unlock(&vm->lock);
	return s;
}

uint64_t minivm_verify(struct minivm *vm)
{
	uint64_t bad = 0;

	for (uint64_t p = 0; p < vm->size / MINIVM_PAGE; p++)
		bad += !page_ok(vm->mem + p * MINIVM_PAGE, p);
	return bad;
}

uint64_t minivm_digest(struct minivm *vm)
{
	return XXH3_64bits(vm->mem, vm->size) ^
	       XXH3_64bits(&vm->dev, sizeof(vm->dev));
}

void minivm_set(struct minivm *vm, const char *name, uint64_t value)
{
	struct ferry_error err = { 0 };
	struct ferry_setting s = { .name = name, .u = value };

	ASSERT_OK_E(ferry_mig_set(vm->mig, &s, 1, &err), err);
}

void minivm_set_str(struct minivm *vm, const char *name, const char *value)
{
	struct ferry_error err = { 0 };
	struct ferry_setting s = { .name = name, .s = value };

	ASSERT_OK_E(ferry_mig_set(vm->mig, &s, 1, &err), err);
}

struct ferry_mig_info minivm_wait(struct minivm *vm, int timeout_ms)
{
	struct ferry_mig_info i = { .size = sizeof(i) };

	if (ferry_mig_wait(vm->mig, timeout_ms)) {
		ferry_mig_query(vm->mig, &i);
		FAIL("migration still %s after %d ms",
		     ferry_mig_status_name(i.status), timeout_ms);
	}
	ferry_mig_query(vm->mig, &i);
	return i;
}

bool minivm_logged(struct minivm *vm, const char *what)
{
	bool found = false;

	pthread_mutex_lock(&vm->lock);
	for (unsigned i = 0; i < vm->nlog && !found; i++)
		found = !strcmp(vm->log[i], what);
	pthread_mutex_unlock(&vm->lock);
	return found;
}

void minivm_wait_status(struct minivm *vm, enum ferry_mig_status st,
			int timeout_ms)
{
	struct ferry_mig_info i = { .size = sizeof(i) };

	for (int t = 0; t < timeout_ms; t++) {
		ferry_mig_query(vm->mig, &i);
		if (i.status == st)
			return;
		usleep(1000);
	}
	FAIL("status %s, waited for %s", ferry_mig_status_name(i.status),
	     ferry_mig_status_name(st));
}

const char *minivm_uri(const char *name)
{
	return test_fmt("unix:%s/%s.sock", test_tmpdir(), name);
}
