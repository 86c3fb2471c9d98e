/*
 * tests/unit/test-backend.c - userfaultfd dirty tracking, the populated-page
 * map, and the thread backend running the guest workload in host threads.
 *
 * Everything here works without /dev/kvm.  Timing is never asserted: waits
 * poll with sleeps under generous deadlines, so a loaded 2-core machine only
 * makes the tests slower.
 */
#include "../harness.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "guest/layout.h"
#include "threads/backend-thread.h"
#include "threads/dirty-uffd.h"

/* Prototypes for every listed test (keeps -Wmissing-prototypes happy). */
#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

#define PAGE 4096UL
#define WAIT_MS 20000	/* deadline for anything the guest should do */

/* ---- helpers ------------------------------------------------------------ */

/* Resident pages of this process (/proc/self/statm, second field). */
static long resident_pages(void)
{
	long size = 0, rss = -1;
	FILE *f = fopen("/proc/self/statm", "re");

	if (f) {
		if (fscanf(f, "%ld %ld", &size, &rss) != 2)
			rss = -1;
		fclose(f);
	}
	return rss;
}

/*
 * Does a read of never-written anonymous memory map the shared zero page?
 * Most kernels do (the page holds no data and is not counted as resident);
 * some configurations back every read fault with a fresh zeroed page,
 * which then is populated memory like any other.
 */
static bool reads_map_zero_page(void)
{
	enum { N = 1024 };
	uint8_t *m = mmap(NULL, N * 4096UL, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	volatile uint8_t sink = 0;
	long before, after;

	if (m == MAP_FAILED)
		FAIL("mmap: %s", strerror(errno));
	madvise(m, N * 4096UL, MADV_NOHUGEPAGE);
	before = resident_pages();
	for (size_t i = 0; i < N; i++)
		sink += m[i * 4096UL];
	after = resident_pages();
	(void)sink;
	munmap(m, N * 4096UL);
	return after - before < N / 2;
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static uint8_t *map_anon(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

	if (p == MAP_FAILED)
		FAIL("mmap %zu: %s", len, strerror(errno));
	return p;
}

static uint8_t *map_memfd(size_t len)
{
	int fd = memfd_create("ferry-test", MFD_CLOEXEC);
	void *p;

	if (fd < 0)
		FAIL("memfd_create: %s", strerror(errno));
	if (ftruncate(fd, (off_t)len) < 0)
		FAIL("ftruncate: %s", strerror(errno));
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		FAIL("mmap memfd %zu: %s", len, strerror(errno));
	close(fd);
	return p;
}

static uint64_t *bitmap_new(size_t len)
{
	uint64_t *b = calloc(uffd_dirty_bitmap_words(len), sizeof(uint64_t));

	ASSERT_PTR(b);
	return b;
}

static bool test_bit(const uint64_t *b, size_t i)
{
	return b[i / 64] >> (i % 64) & 1;
}

static size_t popcount(const uint64_t *b, size_t words)
{
	size_t i, n = 0;

	for (i = 0; i < words; i++)
		n += (size_t)__builtin_popcountll(b[i]);
	return n;
}

/* bitmap must have exactly the bits of pages[] set. */
static void expect_bits(const uint64_t *b, size_t len, const size_t *pages,
			size_t n, const char *what)
{
	size_t npages = len / PAGE, i, j;

	for (i = 0; i < npages; i++) {
		bool want = false;

		for (j = 0; j < n; j++)
			want |= pages[j] == i;
		if (test_bit(b, i) != want)
			FAIL("%s: page %zu is %s, expected %s", what, i,
			     test_bit(b, i) ? "set" : "clear",
			     want ? "set" : "clear");
	}
}

/* Create uffd tracking or skip the test with the kernel's reason. */
static struct uffd_dirty *uffd_or_skip(void *base, size_t len)
{
	struct ferry_error e = { 0 };
	struct uffd_dirty *d;
	int r = uffd_dirty_create(&d, base, len, &e);

	if (r == -EOPNOTSUPP || r == -EPERM || r == -ENOSYS)
		SKIP(test_fmt("uffd dirty tracking unavailable: %s", e.msg));
	ASSERT_OK_E(r, e);
	return d;
}

/* The dirty-tracking scenario, on memory of either kind. */
static void uffd_exact(uint8_t *mem, size_t len)
{
	static const size_t touched_before[] = { 1, 2, 40, 41, 300 };
	static const size_t written[] = {
		0, 1, 40, 63, 64, 65, 127, 128, 1000, 1001, 1002, 2047,
	};
	size_t words = uffd_dirty_bitmap_words(len), i;
	uint64_t *b = bitmap_new(len);
	struct ferry_error e = { 0 };
	struct uffd_dirty *d;
	volatile uint8_t sink;

	/* Some pages are populated before tracking starts, most are not. */
	for (i = 0; i < sizeof(touched_before) / sizeof(touched_before[0]); i++)
		mem[touched_before[i] * PAGE] = 0x11;

	d = uffd_or_skip(mem, len);
	ASSERT_OK_E(uffd_dirty_start(d, &e), e);

	/* Nothing written yet: the first sync is empty. */
	ASSERT_OK_E(uffd_dirty_sync(d, b, &e), e);
	ASSERT_EQ(popcount(b, words), 0);

	/* Reads, of touched and never-touched pages, are not writes. */
	sink = mem[2 * PAGE];
	sink = mem[500 * PAGE];
	(void)sink;

	for (i = 0; i < sizeof(written) / sizeof(written[0]); i++)
		mem[written[i] * PAGE + (i * 64) % PAGE] = (uint8_t)(i + 1);
	/* The last page of the range, at its last byte. */
	mem[len - 1] = 0x5a;

	ASSERT_OK_E(uffd_dirty_sync(d, b, &e), e);
	{
		size_t want[sizeof(written) / sizeof(written[0]) + 1];

		memcpy(want, written, sizeof(written));
		want[sizeof(written) / sizeof(written[0])] = len / PAGE - 1;
		expect_bits(b, len, want, sizeof(want) / sizeof(want[0]),
			    "first sync");
	}

	/* Nothing written since: empty. */
	memset(b, 0, words * sizeof(*b));
	ASSERT_OK_E(uffd_dirty_sync(d, b, &e), e);
	ASSERT_EQ(popcount(b, words), 0);

	/* Written again (re-armed pages) and one more never-touched page. */
	mem[65 * PAGE] = 1;
	mem[1001 * PAGE + 7] = 2;
	mem[3000 * PAGE] = 3;
	ASSERT_OK_E(uffd_dirty_sync(d, b, &e), e);
	{
		static const size_t want[] = { 65, 1001, 3000 };

		expect_bits(b, len, want, 3, "third sync");
	}

	/* Stopped: writes no longer reported; sync refuses. */
	ASSERT_OK_E(uffd_dirty_stop(d, &e), e);
	mem[66 * PAGE] = 1;
	ASSERT_ERR(uffd_dirty_sync(d, b, NULL), -EINVAL);

	/* Started again: everything re-armed. */
	ASSERT_OK_E(uffd_dirty_start(d, &e), e);
	memset(b, 0, words * sizeof(*b));
	mem[67 * PAGE] = 1;
	ASSERT_OK_E(uffd_dirty_sync(d, b, &e), e);
	{
		static const size_t want[] = { 67 };

		expect_bits(b, len, want, 1, "after restart");
	}

	uffd_dirty_destroy(d);
	free(b);
}

/* ---- a thread-backend VM ------------------------------------------------- */

struct tvm {
	uint8_t *ram;
	uint64_t size;
	struct thread_vm *t;
	volatile struct guest_status *st;
	volatile struct guest_cmd *cmd;
};

static void tvm_attach(struct tvm *v, uint8_t *ram, uint64_t size,
		       unsigned nvcpus)
{
	struct ferry_error e = { 0 };

	v->ram = ram;
	v->size = size;
	v->st = (volatile struct guest_status *)(ram + GUEST_STATUS_GPA);
	v->cmd = (volatile struct guest_cmd *)(ram + GUEST_CMD_GPA);
	ASSERT_OK_E(thread_vm_create(&v->t, ram, size, nvcpus, &e), e);
}

/* Fresh RAM, command block filled, started, booted. */
static void tvm_boot(struct tvm *v, uint64_t size, unsigned nvcpus,
		     uint64_t tsc_hz);

static void tvm_check_alive(struct tvm *v, const char *what)
{
	char msg[200];

	if (thread_vm_panicked(v->t, msg, sizeof(msg)))
		FAIL("waiting for %s: %s", what, msg);
}

#define WAIT_FOR(v, cond, what)						\
	do {								\
		uint64_t end_ = now_ms() + WAIT_MS;			\
		while (!(cond)) {					\
			tvm_check_alive(v, what);			\
			if (now_ms() > end_)				\
				FAIL("timeout waiting for %s (state %u, " \
				     "gen %llu)", what, (v)->st->state,	\
				     (unsigned long long)(v)->st->generation); \
			sleep_ms(2);					\
		}							\
	} while (0)

static void tvm_boot(struct tvm *v, uint64_t size, unsigned nvcpus,
		     uint64_t tsc_hz)
{
	struct ferry_error e = { 0 };

	tvm_attach(v, map_anon(size), size, nvcpus);
	ASSERT_OK_E(guest_cmd_fill(v->ram, size, tsc_hz, &e), e);
	ASSERT_OK_E(thread_vm_start(v->t, &e), e);
	WAIT_FOR(v, v->st->magic == GUEST_STATUS_MAGIC, "boot");
	ASSERT_EQ_U64(v->st->data_pages, GUEST_DATA_PAGES(size));
}

static void tvm_workload(struct tvm *v, uint32_t kind, uint32_t pattern,
			 uint64_t ws_pages, uint64_t rate)
{
	uint64_t seq;

	v->cmd->workload = kind;
	v->cmd->pattern = pattern;
	v->cmd->ws_pages = ws_pages;
	v->cmd->rate_mbps = rate;
	v->cmd->seed = 42;
	/* Volatile stores stay in order, and x86 does not reorder stores:
	 * the guest sees the fields before the new seq. */
	seq = v->cmd->seq + 1;
	v->cmd->seq = seq;
	WAIT_FOR(v, v->st->cmd_seq == seq, "command");
}

static void tvm_verify(struct tvm *v)
{
	uint64_t seq = v->cmd->verify_seq + 1;

	v->cmd->verify_seq = seq;
	WAIT_FOR(v, v->st->verify_seq == seq, "verify");
	ASSERT_EQ_U64(v->st->verify_pages, v->st->data_pages);
}

static void tvm_destroy(struct tvm *v)
{
	thread_vm_destroy(v->t);
	munmap(v->ram, v->size);
}

#define RAM_64M (64ULL << 20)

/* ---- tests ---------------------------------------------------------------- */

TEST(backend_uffd_dirty_exact)
{
	size_t len = 16UL << 20;
	uint8_t *mem = map_anon(len);

	uffd_exact(mem, len);
	munmap(mem, len);
}

TEST(backend_uffd_dirty_memfd)
{
	size_t len = 16UL << 20;
	uint8_t *mem = map_memfd(len);

	uffd_exact(mem, len);
	munmap(mem, len);
}

/* A range of 1 GiB and more is synced by two threads, one half each (the
 * halves meet at a multiple of 64 pages): every write is reported, on
 * either side of the seam and at both ends, once, and nothing else. */
TEST(backend_uffd_dirty_split)
{
	size_t len = (1UL << 30) + 20 * PAGE, npages = len / PAGE;
	size_t half = npages / 2, seam = half - half % 64;
	size_t pages[] = { 0, seam - 1, seam, seam + 1, half, npages - 1 };
	uint64_t *b = bitmap_new(len);
	uint8_t *mem = map_anon(len);
	struct ferry_error e = { 0 };
	struct uffd_dirty *d = uffd_or_skip(mem, len);

	ASSERT_OK_E(uffd_dirty_start(d, &e), e);
	for (size_t i = 0; i < sizeof(pages) / sizeof(pages[0]); i++)
		mem[pages[i] * PAGE + 8] = (uint8_t)(i + 1);
	ASSERT_OK_E(uffd_dirty_sync(d, b, &e), e);
	expect_bits(b, len, pages, sizeof(pages) / sizeof(pages[0]), "split");
	memset(b, 0, uffd_dirty_bitmap_words(len) * sizeof(*b));
	mem[(seam - 1) * PAGE] = 9;
	ASSERT_OK_E(uffd_dirty_sync(d, b, &e), e);
	expect_bits(b, len, pages + 1, 1, "split, again");
	/* The switchover's sync, split the same way (the helper's third job). */
	memset(b, 0, uffd_dirty_bitmap_words(len) * sizeof(*b));
	mem[(npages - 1) * PAGE] = 7;
	ASSERT_OK_E(uffd_dirty_sync_final(d, b, &e), e);
	expect_bits(b, len, pages + 5, 1, "split, final");
	uffd_dirty_destroy(d);
	munmap(mem, len);
	free(b);
}

/* Page @p's uffd-wp bit in /proc/self/pagemap (bit 57), or -1. */
static int pagemap_wp(const void *p)
{
	uint64_t ent = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	ssize_t n = fd < 0 ? -1 : pread(fd, &ent, sizeof(ent),
				       (off_t)((uintptr_t)p / PAGE * 8));

	if (fd >= 0)
		close(fd);
	return n == sizeof(ent) ? (int)(ent >> 57 & 1) : -1;
}

/* Write page @page, sync (or sync_final), and expect exactly that page. */
static void write_sync_expect(struct uffd_dirty *d, uint8_t *mem, size_t len,
			      uint64_t *b, size_t page, bool final,
			      const char *what)
{
	struct ferry_error e = { 0 };

	mem[page * PAGE]++;
	memset(b, 0, uffd_dirty_bitmap_words(len) * sizeof(*b));
	if (final)
		ASSERT_OK_E(uffd_dirty_sync_final(d, b, &e), e);
	else
		ASSERT_OK_E(uffd_dirty_sync(d, b, &e), e);
	expect_bits(b, len, &page, 1, what);
}

/*
 * Stopping ends tracking at once and leaves the protection where nothing
 * writes: a protected page's write goes through (the kernel resolves it),
 * a page nobody writes stays protected until a start or the unregister,
 * and a start right after a stop tracks exactly - as does one after a
 * release.
 */
TEST(backend_uffd_dirty_stop_lazy)
{
	size_t len = 96UL << 20, words = uffd_dirty_bitmap_words(len);
	static const size_t touched[] = { 3, 9000, 20000 };
	uint64_t *b = bitmap_new(len);
	uint8_t *mem = map_anon(len);
	struct ferry_error e = { 0 };
	struct uffd_dirty *d = uffd_or_skip(mem, len);

	for (size_t i = 0; i < sizeof(touched) / sizeof(touched[0]); i++)
		mem[touched[i] * PAGE] = 1;
	ASSERT_OK_E(uffd_dirty_start(d, &e), e);
	for (size_t i = 0; i < sizeof(touched) / sizeof(touched[0]); i++)
		ASSERT_EQ(pagemap_wp(mem + touched[i] * PAGE), 1);
	ASSERT_OK_E(uffd_dirty_stop(d, &e), e);
	ASSERT_ERR(uffd_dirty_sync(d, b, NULL), -EINVAL);
	mem[3 * PAGE] = 2;
	mem[12 * PAGE] = 2;  /* never touched before: a marker's write */
	ASSERT_EQ(mem[3 * PAGE] + mem[12 * PAGE], 4);
	ASSERT_EQ(pagemap_wp(mem + 3 * PAGE), 0);
	ASSERT_EQ(pagemap_wp(mem + 9000 * PAGE), 1);

	ASSERT_OK_E(uffd_dirty_start(d, &e), e);
	mem[7 * PAGE] = 1;
	mem[9000 * PAGE] = 2;
	memset(b, 0, words * sizeof(*b));
	ASSERT_OK_E(uffd_dirty_sync(d, b, &e), e);
	{
		static const size_t want[] = { 7, 9000 };

		expect_bits(b, len, want, 2, "start right after a stop");
	}
	/* Released (for a postcopy load's own registration): nothing
	 * protected is left; a start registers again and tracks exactly. */
	uffd_dirty_release(d);
	ASSERT_EQ(pagemap_wp(mem + 20000 * PAGE), 0);
	ASSERT_ERR(uffd_dirty_sync(d, b, NULL), -EINVAL);
	ASSERT_OK_E(uffd_dirty_start(d, &e), e);
	ASSERT_EQ(pagemap_wp(mem + 20000 * PAGE), 1);
	write_sync_expect(d, mem, len, b, 11, false, "start after a release");
	ASSERT_OK_E(uffd_dirty_stop(d, &e), e);
	uffd_dirty_destroy(d);
	/* Unregistered: nothing protected is left. */
	ASSERT_EQ(pagemap_wp(mem + 20000 * PAGE), 0);
	munmap(mem, len);
	free(b);
}

/* The switchover's sync reports exactly what a sync would and leaves
 * those pages unprotected; a start re-arms everything. */
TEST(backend_uffd_dirty_sync_final)
{
	size_t len = 96UL << 20, words = uffd_dirty_bitmap_words(len);
	static const size_t written[] = { 5, 4097, 20000 };
	uint64_t *b = bitmap_new(len);
	uint8_t *mem = map_anon(len);
	struct ferry_error e = { 0 };
	struct uffd_dirty *d = uffd_or_skip(mem, len);

	memset(mem, 1, len);
	ASSERT_OK_E(uffd_dirty_start(d, &e), e);
	for (size_t i = 0; i < sizeof(written) / sizeof(written[0]); i++)
		mem[written[i] * PAGE] = 2;
	memset(b, 0, words * sizeof(*b));
	ASSERT_OK_E(uffd_dirty_sync_final(d, b, &e), e);
	expect_bits(b, len, written, 3, "final sync");
	ASSERT_EQ(pagemap_wp(mem + 5 * PAGE), 0);
	ASSERT_EQ(pagemap_wp(mem + 6 * PAGE), 1);
	/* Not re-armed: a sync now reports them again (more, never less). */
	memset(b, 0, words * sizeof(*b));
	ASSERT_OK_E(uffd_dirty_sync(d, b, &e), e);
	expect_bits(b, len, written, 3, "sync after a final sync");
	/* A start protects everything again: only new writes count. */
	ASSERT_OK_E(uffd_dirty_stop(d, &e), e);
	ASSERT_ERR(uffd_dirty_sync_final(d, b, NULL), -EINVAL);
	ASSERT_OK_E(uffd_dirty_start(d, &e), e);
	ASSERT_EQ(pagemap_wp(mem + 5 * PAGE), 1);
	write_sync_expect(d, mem, len, b, 77, true,
			  "final sync after a new start");
	uffd_dirty_destroy(d);
	munmap(mem, len);
	free(b);
}

TEST(backend_uffd_dirty_rejects)
{
	struct ferry_error e = { 0 };
	struct uffd_dirty *d = NULL;
	uint8_t *mem = map_anon(1 << 20);

	ASSERT_ERR(uffd_dirty_create(&d, mem + 1, PAGE, &e), -EINVAL);
	ASSERT_NULL(d);
	ASSERT_CONTAINS(e.msg, "page aligned");
	munmap(mem, 1 << 20);
}

TEST(backend_mem_present_pages)
{
	size_t len = 8UL << 20, words = uffd_dirty_bitmap_words(len);
	static const size_t written[] = { 0, 5, 100, 101, 102, 103, 2047 };
	/* The same plus page 7, where a read-only page holds a real page. */
	static const size_t populated[] = { 0, 5, 7, 100, 101, 102, 103, 2047 };
	bool zero_page = reads_map_zero_page();
	uint64_t *b = bitmap_new(len);
	struct ferry_error e = { 0 };
	uint8_t *mem = map_anon(len), *shm;
	volatile uint8_t sink;
	size_t i;

	ASSERT_OK_E(mem_present_pages(mem, len, b, &e), e);
	ASSERT_EQ(popcount(b, words), 0);

	for (i = 0; i < sizeof(written) / sizeof(written[0]); i++)
		mem[written[i] * PAGE + 9] = 1;
	/* Only read: maps the shared zero page, holds no data (where the
	 * kernel backs read faults with real pages, it is populated). */
	sink = mem[7 * PAGE];
	(void)sink;
	ASSERT_OK_E(mem_present_pages(mem, len, b, &e), e);
	if (zero_page)
		expect_bits(b, len, written, sizeof(written) / sizeof(written[0]),
			    "present pages");
	else
		expect_bits(b, len, populated,
			    sizeof(populated) / sizeof(populated[0]),
			    "present pages (read faults back real pages here)");

	/* A sub-range: bit 0 is its first page. */
	memset(b, 0, words * sizeof(*b));
	ASSERT_OK_E(mem_present_pages(mem + 100 * PAGE, 8 * PAGE, b, &e), e);
	ASSERT_EQ_U64(b[0], 0xfULL);

	/* Shared memory cannot be judged from page tables: all reported. */
	shm = map_memfd(len);
	shm[PAGE] = 1;
	memset(b, 0, words * sizeof(*b));
	ASSERT_OK_E(mem_present_pages(shm, len, b, &e), e);
	ASSERT_EQ(popcount(b, words), len / PAGE);
	munmap(shm, len);

	/* Unmapped memory is an error, not "absent". */
	munmap(mem + len - PAGE, PAGE);
	ASSERT_ERR(mem_present_pages(mem, len, b, &e), -EFAULT);
	munmap(mem, len - PAGE);
	free(b);
}

TEST(backend_thread_run_pause_resume)
{
	struct ferry_error e = { 0 };
	uint64_t g, hb1, t0;
	struct tvm v;
	int i;

	tvm_boot(&v, RAM_64M, 2, host_tsc_hz());
	ASSERT_EQ(v.st->version, GUEST_LAYOUT_VERSION);
	/* vCPU 1 runs its heartbeat loop. */
	WAIT_FOR(&v, v.st->cpu_heartbeat[1] > 3, "vCPU 1 heartbeat");

	tvm_workload(&v, GUEST_WORK_DIRTY, GUEST_PATTERN_RANDOM, 0, 0);
	g = v.st->generation;
	WAIT_FOR(&v, v.st->generation > g + 1000, "generation to rise");

	for (i = 0; i < 3; i++) {
		ASSERT_OK_E(thread_vm_pause(v.t, &e), e);
		g = v.st->generation;
		hb1 = v.st->cpu_heartbeat[1];
		sleep_ms(50);
		ASSERT_EQ_U64(v.st->generation, g);
		ASSERT_EQ_U64(v.st->cpu_heartbeat[1], hb1);
		/* Pausing twice is harmless. */
		ASSERT_OK_E(thread_vm_pause(v.t, &e), e);
		thread_vm_resume(v.t);
		WAIT_FOR(&v, v.st->generation > g + 100, "generation after resume");
		WAIT_FOR(&v, v.st->cpu_heartbeat[1] > hb1, "heartbeat after resume");
	}

	/* Paced: still advances, through the idle hook. */
	tvm_workload(&v, GUEST_WORK_DIRTY, GUEST_PATTERN_SEQ, 0, 20);
	g = v.st->generation;
	WAIT_FOR(&v, v.st->generation > g + 100, "paced generation");

	/* Pause works from idle too (vCPUs asleep in the idle hook). */
	tvm_workload(&v, GUEST_WORK_IDLE, 0, 0, 0);
	ASSERT_OK_E(thread_vm_pause(v.t, &e), e);
	t0 = v.st->heartbeat;
	sleep_ms(20);
	ASSERT_EQ_U64(v.st->heartbeat, t0);
	thread_vm_resume(v.t);

	ASSERT(!thread_vm_panicked(v.t, NULL, 0));
	tvm_destroy(&v);
}

TEST(backend_thread_verify_and_corruption)
{
	struct ferry_error e = { 0 };
	uint64_t bad_page = 4321, *p;
	struct tvm v;

	tvm_boot(&v, RAM_64M, 1, host_tsc_hz());
	/* Fresh memory verifies (all zero, gen[] all zero). */
	tvm_verify(&v);
	ASSERT_EQ_U64(v.st->bad_pages, 0);

	tvm_workload(&v, GUEST_WORK_FILL, 0, 0, 0);
	WAIT_FOR(&v, v.st->fill_passes >= 1, "fill");
	tvm_workload(&v, GUEST_WORK_DIRTY, GUEST_PATTERN_RANDOM, 0, 0);
	sleep_ms(50);
	tvm_verify(&v);
	ASSERT_EQ_U64(v.st->bad_pages, 0);
	ASSERT_EQ_U64(v.st->first_bad_page, GUEST_NO_PAGE);

	/* Stop rewriting pages, then flip one bit behind the guest's back. */
	tvm_workload(&v, GUEST_WORK_IDLE, 0, 0, 0);
	ASSERT_OK_E(thread_vm_pause(v.t, &e), e);
	p = (uint64_t *)(v.ram + GUEST_DATA_GPA + bad_page * GUEST_PAGE_SIZE);
	p[300] ^= 1ULL << 17;
	thread_vm_resume(v.t);
	tvm_verify(&v);
	ASSERT_EQ_U64(v.st->bad_pages, 1);
	ASSERT_EQ_U64(v.st->first_bad_page, bad_page);
	ASSERT_EQ_U64(v.st->last_bad_page, bad_page);

	tvm_destroy(&v);
}

TEST(backend_thread_snapshot_restore)
{
	struct ferry_error e = { 0 };
	uint64_t tsc_hz = host_tsc_hz(), g, hb1;
	struct tvm a, b;

	tvm_boot(&a, RAM_64M, 2, tsc_hz);
	tvm_workload(&a, GUEST_WORK_DIRTY, GUEST_PATTERN_RANDOM, 0, 0);
	WAIT_FOR(&a, a.st->generation > 20000, "some dirtying");

	/* Snapshot = RAM of the paused VM. */
	ASSERT_OK_E(thread_vm_pause(a.t, &e), e);
	g = a.st->generation;
	hb1 = a.st->cpu_heartbeat[1];
	tvm_attach(&b, map_anon(RAM_64M), RAM_64M, 2);
	memcpy(b.ram, a.ram, RAM_64M);
	thread_vm_resume(a.t);

	/* The copy resumes from RAM alone: generation goes on from g. */
	ASSERT_OK_E(guest_cmd_fill(b.ram, RAM_64M, tsc_hz, &e), e);
	ASSERT_EQ_U64(b.st->generation, g);
	ASSERT_OK_E(thread_vm_start(b.t, &e), e);
	WAIT_FOR(&b, b.st->generation > g + 1000, "restored generation");
	WAIT_FOR(&b, b.st->cpu_heartbeat[1] > hb1, "restored vCPU 1");
	tvm_verify(&b);
	ASSERT_EQ_U64(b.st->bad_pages, 0);

	/* Both copies keep going independently and stay consistent. */
	tvm_verify(&a);
	ASSERT_EQ_U64(a.st->bad_pages, 0);
	ASSERT(a.st->generation > g);

	tvm_destroy(&b);
	tvm_destroy(&a);
}

TEST(backend_thread_panic)
{
	struct ferry_error e = { 0 };
	char msg[200] = "";
	struct tvm v;
	uint64_t end;

	/* Fresh RAM, no command block: the guest panics, the VMM sees it. */
	tvm_attach(&v, map_anon(RAM_64M), RAM_64M, 2);
	ASSERT_OK_E(thread_vm_start(v.t, &e), e);
	ASSERT_ERR(thread_vm_start(v.t, NULL), -EBUSY);
	end = now_ms() + WAIT_MS;
	while (!thread_vm_panicked(v.t, msg, sizeof(msg)) && now_ms() < end)
		sleep_ms(2);
	ASSERT_CONTAINS(msg, "bad command block");
	ASSERT_EQ(v.st->state, GUEST_STATE_PANIC);
	ASSERT_EQ_U64(v.st->panic_code, GUEST_PANIC_BAD_CMD);
	/* Pause does not wait for the dead vCPU. */
	ASSERT_OK_E(thread_vm_pause(v.t, &e), e);
	thread_vm_resume(v.t);
	tvm_destroy(&v);

	/* A command block asking for more RAM than there is: the vCPU
	 * refuses to run it, as a panic. */
	tvm_attach(&v, map_anon(RAM_64M), RAM_64M, 1);
	ASSERT_OK_E(guest_cmd_fill(v.ram, RAM_64M, 0, &e), e);
	v.cmd->data_pages = GUEST_DATA_PAGES(RAM_64M) + 1;
	ASSERT_OK_E(thread_vm_start(v.t, &e), e);
	end = now_ms() + WAIT_MS;
	while (!thread_vm_panicked(v.t, msg, sizeof(msg)) && now_ms() < end)
		sleep_ms(2);
	ASSERT_CONTAINS(msg, "command block asks for");
	tvm_destroy(&v);
}

/*
 * The start touches no guest memory: on a postcopy destination a page may
 * not have arrived, and the start (the end of the downtime) must not wait
 * for it. Here the command block is missing behind a userfaultfd nobody
 * serves until the start has returned; then the vCPU's fault is served
 * and the guest boots.
 */
TEST(backend_thread_start_touches_no_guest_memory)
{
	struct ferry_error e = { 0 };
	uint8_t *cmd_copy = aligned_alloc(PAGE, PAGE);
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_register reg;
	struct uffdio_copy cp;
	struct uffd_msg msg;
	struct pollfd pfd;
	struct tvm v;
	int uffd;

	ASSERT(cmd_copy != NULL);
	tvm_attach(&v, map_anon(RAM_64M), RAM_64M, 1);
	ASSERT_OK_E(guest_cmd_fill(v.ram, RAM_64M, 0, &e), e);
	memcpy(cmd_copy, v.ram + GUEST_CMD_GPA, PAGE);
	uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api)) {
		free(cmd_copy);
		tvm_destroy(&v);
		SKIP(test_fmt("userfaultfd unavailable: %s", strerror(errno)));
	}
	ASSERT_OK(madvise(v.ram + GUEST_CMD_GPA, PAGE, MADV_DONTNEED));
	reg = (struct uffdio_register){
		.range = { (uintptr_t)v.ram + GUEST_CMD_GPA, PAGE },
		.mode = UFFDIO_REGISTER_MODE_MISSING };
	ASSERT_OK(ioctl(uffd, UFFDIO_REGISTER, &reg));

	/* Would hang here (the test's timeout) if it read the page. */
	ASSERT_OK_E(thread_vm_start(v.t, &e), e);
	pfd = (struct pollfd){ .fd = uffd, .events = POLLIN };
	ASSERT_EQ(poll(&pfd, 1, WAIT_MS), 1);
	ASSERT_EQ(read(uffd, &msg, sizeof(msg)), (ssize_t)sizeof(msg));
	ASSERT_EQ(msg.event, UFFD_EVENT_PAGEFAULT);
	ASSERT_EQ_U64(msg.arg.pagefault.address & ~(uint64_t)(PAGE - 1),
		      (uintptr_t)v.ram + GUEST_CMD_GPA);
	cp = (struct uffdio_copy){ .dst = (uintptr_t)v.ram + GUEST_CMD_GPA,
				   .src = (uintptr_t)cmd_copy, .len = PAGE };
	ASSERT_OK(ioctl(uffd, UFFDIO_COPY, &cp));
	WAIT_FOR(&v, v.st->magic == GUEST_STATUS_MAGIC, "boot");
	tvm_destroy(&v);
	close(uffd);
	free(cmd_copy);
}

/*
 * The whole point: precopy a running thread-backend VM with uffd dirty
 * tracking.  After the final sync of the paused source, the copy must be
 * byte-identical, and it must run on and verify clean.
 */
TEST(backend_thread_precopy_uffd)
{
	size_t words = uffd_dirty_bitmap_words(RAM_64M), i, npages;
	uint64_t tsc_hz = host_tsc_hz(), *bm = bitmap_new(RAM_64M), g;
	struct ferry_error e = { 0 };
	struct uffd_dirty *d;
	struct tvm src, dst;
	int round;

	tvm_boot(&src, RAM_64M, 2, tsc_hz);
	/* Half the data area written once, then a hot random working set. */
	tvm_workload(&src, GUEST_WORK_FILL, 0, 0, 0);
	WAIT_FOR(&src, src.st->fill_passes >= 1, "fill");
	tvm_workload(&src, GUEST_WORK_DIRTY, GUEST_PATTERN_RANDOM,
		     GUEST_DATA_PAGES(RAM_64M) / 2, 0);

	d = uffd_or_skip(src.ram, RAM_64M);
	tvm_attach(&dst, map_anon(RAM_64M), RAM_64M, 2);

	/* Round 0: everything populated, then only what was written. */
	ASSERT_OK_E(uffd_dirty_start(d, &e), e);
	ASSERT_OK_E(mem_present_pages(src.ram, RAM_64M, bm, &e), e);
	npages = RAM_64M / PAGE;
	for (round = 0; round < 4; round++) {
		for (i = 0; i < npages; i++)
			if (test_bit(bm, i))
				memcpy(dst.ram + i * PAGE, src.ram + i * PAGE,
				       PAGE);
		memset(bm, 0, words * sizeof(*bm));
		sleep_ms(30);
		ASSERT_OK_E(uffd_dirty_sync(d, bm, &e), e);
		ASSERT(popcount(bm, words) > 0);	/* the guest is busy */
	}

	/* Switchover: pause, last sync, last copy. */
	ASSERT_OK_E(thread_vm_pause(src.t, &e), e);
	ASSERT_OK_E(uffd_dirty_sync(d, bm, &e), e);
	for (i = 0; i < npages; i++)
		if (test_bit(bm, i))
			memcpy(dst.ram + i * PAGE, src.ram + i * PAGE, PAGE);
	for (i = 0; i < npages; i++)
		if (memcmp(dst.ram + i * PAGE, src.ram + i * PAGE, PAGE))
			FAIL("page %zu differs after the final copy", i);
	g = src.st->generation;

	ASSERT_OK_E(guest_cmd_fill(dst.ram, RAM_64M, tsc_hz, &e), e);
	ASSERT_OK_E(thread_vm_start(dst.t, &e), e);
	WAIT_FOR(&dst, dst.st->generation > g + 1000, "destination running");
	tvm_verify(&dst);
	ASSERT_EQ_U64(dst.st->bad_pages, 0);

	uffd_dirty_destroy(d);
	tvm_destroy(&dst);
	tvm_destroy(&src);
	free(bm);
}
