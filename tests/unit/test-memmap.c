/*
 * tests/unit/test-memmap.c - the reference VMM's memory map (flat view
 * rendering, transactions, listeners, access dispatch, snapshots) and the
 * virtio-like devices built on it (BARs, registers, queue caches, vmstate).
 */
#include "../harness.h"

#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ferry/channel.h"
#include "ferry/migration.h"
#include "ferry/vmstate.h"
#include "devices/virtio.h"
#include "memmap-util.h"
#include "memory/memmap.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

/* ---- helpers ------------------------------------------------------------ */

struct exp {
	uint64_t gpa, size;
	const struct memmap_region *mr;
	uint64_t off;
};

/* The current flat view must be exactly @e[0..n). */
static void *view_get_main(void *mm)
{
	return (void *)memmap_view_get(mm);
}

/* The current view, as another thread (a vCPU) sees it: the thread that
 * holds a transaction open may not read it (memmap.h). */
static const struct memmap_view *reader_view(struct memmap *mm)
{
	pthread_t t;
	void *v = NULL;

	if (!memmap_in_transaction(mm))
		return memmap_view_get(mm);
	ASSERT_OK(pthread_create(&t, NULL, view_get_main, mm));
	pthread_join(t, &v);
	return v;
}

static void check_view_(struct memmap *mm, const struct exp *e, unsigned n,
			int line)
{
	const struct memmap_view *v = reader_view(mm);
	unsigned i;

	if (v->nr != n)
		test_fail_(__FILE__, line, "view has %u ranges, expected %u", v->nr, n);
	for (i = 0; i < n; i++) {
		const struct memmap_range *r = &v->ranges[i];

		if (r->gpa != e[i].gpa || r->size != e[i].size ||
		    r->mr != e[i].mr || r->offset != e[i].off)
			test_fail_(__FILE__, line,
				   "range %u: [0x%llx +0x%llx) %s@0x%llx, expected "
				   "[0x%llx +0x%llx) %s@0x%llx", i,
				   (unsigned long long)r->gpa, (unsigned long long)r->size,
				   memmap_region_name(r->mr), (unsigned long long)r->offset,
				   (unsigned long long)e[i].gpa, (unsigned long long)e[i].size,
				   memmap_region_name(e[i].mr), (unsigned long long)e[i].off);
		if ((memmap_region_kind(r->mr) == MEMMAP_RAM) != (r->host != NULL))
			test_fail_(__FILE__, line, "range %u: host pointer", i);
	}
	memmap_view_put(v);
}
#define CHECK_VIEW(mm, ...) do {					\
	const struct exp e_[] = { __VA_ARGS__ };			\
	check_view_(mm, e_, sizeof(e_) / sizeof(e_[0]), __LINE__);	\
} while (0)
#define CHECK_VIEW_EMPTY(mm) check_view_(mm, NULL, 0, __LINE__)

static void add(struct memmap_region *c, uint64_t off, struct memmap_region *r,
		int prio)
{
	struct ferry_error err = {0};

	ASSERT_OK_E(memmap_add_subregion(c, off, r, prio, &err), err);
}

static uint64_t rebuilds(struct memmap *mm)
{
	struct memmap_stats st;

	memmap_get_stats(mm, &st);
	return st.rebuilds;
}

/* A 16-byte MMIO register file that logs every access. */
struct mdev {
	uint8_t regs[16];
	unsigned nlog;
	struct { uint64_t off; unsigned size; bool write; } log[64];
};

static uint64_t mdev_read(void *opaque, uint64_t off, unsigned size)
{
	struct mdev *m = opaque;
	uint64_t v = 0;
	unsigned i;

	for (i = 0; i < size; i++)
		v |= (uint64_t)m->regs[off + i] << (8 * i);
	if (m->nlog < 64)
		m->log[m->nlog++] = (__typeof__(m->log[0])){ off, size, false };
	return v;
}

static void mdev_write(void *opaque, uint64_t off, uint64_t val, unsigned size)
{
	struct mdev *m = opaque;
	unsigned i;

	for (i = 0; i < size; i++)
		m->regs[off + i] = (uint8_t)(val >> (8 * i));
	if (m->nlog < 64)
		m->log[m->nlog++] = (__typeof__(m->log[0])){ off, size, true };
}

static const struct memmap_mmio_ops mdev_ops = { mdev_read, mdev_write };

static struct memmap_region *mmio(struct memmap *mm, const char *name,
				  uint64_t size, struct mdev *m)
{
	struct ferry_error err = {0};
	struct memmap_region *r = memmap_region_new_mmio(mm, name, size, &mdev_ops,
							 m, &err);
	if (!r)
		FAIL("mmio %s: %s", name, err.msg);
	return r;
}

static struct memmap_region *alias(struct memmap *mm, const char *name,
				   struct memmap_region *t, uint64_t off,
				   uint64_t size)
{
	struct ferry_error err = {0};
	struct memmap_region *r = memmap_region_new_alias(mm, name, t, off, size, &err);

	if (!r)
		FAIL("alias %s: %s", name, err.msg);
	return r;
}

/* ---- flat view rendering -------------------------------------------------- */

TEST(memmap_flat_priorities)
{
	static uint8_t ha[0x10000], hb[0x2000], hc[0x4000];
	struct memmap *mm = new_map();
	struct mdev md = {0};
	struct memmap_region *root = memmap_root(mm);
	struct memmap_region *a = ram(mm, "a", ha, sizeof(ha));
	struct memmap_region *m = mmio(mm, "m", 0x2000, &md);
	struct memmap_region *b = ram(mm, "b", hb, sizeof(hb));
	struct memmap_region *c = ram(mm, "c", hc, sizeof(hc));
	const struct memmap_view *v;

	CHECK_VIEW_EMPTY(mm);
	add(root, 0, a, 0);
	CHECK_VIEW(mm, { 0, 0x10000, a, 0 });
	/* Higher priority punches through, whatever the order of adding. */
	add(root, 0x4000, m, 1);
	CHECK_VIEW(mm, { 0, 0x4000, a, 0 }, { 0x4000, 0x2000, m, 0 },
		   { 0x6000, 0xa000, a, 0x6000 });
	/* Equal priority: the later-added region wins the overlap. */
	add(root, 0x5000, b, 1);
	CHECK_VIEW(mm, { 0, 0x4000, a, 0 }, { 0x4000, 0x1000, m, 0 },
		   { 0x5000, 0x2000, b, 0 }, { 0x7000, 0x9000, a, 0x7000 });
	/* Lower priority only fills what nobody else covers. */
	add(root, 0xf000, c, -1);
	CHECK_VIEW(mm, { 0, 0x4000, a, 0 }, { 0x4000, 0x1000, m, 0 },
		   { 0x5000, 0x2000, b, 0 }, { 0x7000, 0x9000, a, 0x7000 },
		   { 0x10000, 0x3000, c, 0x1000 });

	v = memmap_view_get(mm);
	ASSERT(memmap_lookup(v, 0x10fff)->mr == c);
	/* A range's host pointer is that of its first byte. */
	ASSERT(memmap_lookup(v, 0x10fff)->host == hc + 0x1000);
	ASSERT(memmap_lookup(v, 0x4fff)->mr == m);
	ASSERT(memmap_lookup(v, 0x5000)->host == hb);
	ASSERT_NULL(memmap_lookup(v, 0x13000));
	ASSERT_NULL(memmap_lookup(v, UINT64_MAX));
	memmap_view_put(v);

	memmap_region_free(a);
	memmap_region_free(m);
	memmap_region_free(b);
	memmap_region_free(c);
	CHECK_VIEW_EMPTY(mm);
	memmap_free(mm);
}

TEST(memmap_flat_containers_aliases)
{
	static uint8_t hr[0x10000], hs[0x1000];
	struct ferry_error err = {0};
	struct memmap *mm = new_map();
	struct memmap_region *root = memmap_root(mm);
	struct memmap_region *r = ram(mm, "r", hr, sizeof(hr));
	struct memmap_region *s = ram(mm, "s", hs, sizeof(hs));
	struct memmap_region *p = memmap_region_new_container(mm, "p", 0x3000, &err);
	struct memmap_region *q = memmap_region_new_container(mm, "q", 0x2000, &err);
	struct memmap_region *al, *ap;

	ASSERT_PTR(p);
	ASSERT_PTR(q);
	/* A container clips what it holds: r is 64 KiB, p only 12 KiB. */
	add(p, 0x1000, r, 0);
	add(root, 0x100000, p, 0);
	CHECK_VIEW(mm, { 0x101000, 0x2000, r, 0 });
	/* Nested container: q inside p; s inside q; positions add up. */
	add(q, 0x800, s, 0);
	add(p, 0, q, 1);
	CHECK_VIEW(mm, { 0x100800, 0x1000, s, 0 }, { 0x101800, 0x1800, r, 0x800 });
	/* An alias is a window onto its target at an offset. */
	al = alias(mm, "al", r, 0x8000, 0x2000);
	add(root, 0x200000, al, 0);
	CHECK_VIEW(mm, { 0x100800, 0x1000, s, 0 }, { 0x101800, 0x1800, r, 0x800 },
		   { 0x200000, 0x2000, r, 0x8000 });
	/* An alias of a container renders the container's contents, clipped
	 * to the window: p's [0x1000, 0x2000) is s's second half then r. */
	ap = alias(mm, "ap", p, 0x1000, 0x1000);
	add(root, 0x300000, ap, 0);
	CHECK_VIEW(mm, { 0x100800, 0x1000, s, 0 }, { 0x101800, 0x1800, r, 0x800 },
		   { 0x200000, 0x2000, r, 0x8000 },
		   { 0x300000, 0x800, s, 0x800 }, { 0x300800, 0x800, r, 0x800 });
	hr[0x900] = 0x5a;
	{
		uint8_t x = 0;

		ASSERT_OK(memmap_read(mm, 0x300900, &x, 1));
		ASSERT_EQ(x, 0x5a);
		ASSERT_OK(memmap_read(mm, 0x101900, &x, 1));
		ASSERT_EQ(x, 0x5a);
	}

	memmap_region_free(ap);
	memmap_region_free(al);
	memmap_region_free(q);
	memmap_region_free(s);
	memmap_region_free(r);
	memmap_region_free(p);
	CHECK_VIEW_EMPTY(mm);
	memmap_free(mm);
}

TEST(memmap_flat_disabled_and_merge)
{
	static uint8_t ha[0x4000], hb[0x1000], hc[0x1000];
	struct ferry_error err = {0};
	struct memmap *mm = new_map();
	struct memmap_region *root = memmap_root(mm);
	struct memmap_region *a = ram(mm, "a", ha, sizeof(ha));
	struct memmap_region *b = ram(mm, "b", hb, sizeof(hb));
	struct memmap_region *c = ram(mm, "c", hc, sizeof(hc));
	struct memmap_region *k = memmap_region_new_container(mm, "k", 0x1000, &err);
	struct memmap_region *a1 = alias(mm, "a1", a, 0, 0x2000);
	struct memmap_region *a2 = alias(mm, "a2", a, 0x2000, 0x2000);
	struct memmap_region *a3 = alias(mm, "a3", a, 0x1000, 0x1000);

	ASSERT_PTR(k);
	/* Two aliases laid end to end at contiguous offsets of one region
	 * render as one range. */
	add(root, 0x10000, a1, 0);
	add(root, 0x12000, a2, 0);
	CHECK_VIEW(mm, { 0x10000, 0x4000, a, 0 });
	/* Adjacent but not contiguous in the region: two ranges. */
	add(root, 0x14000, a3, 0);
	CHECK_VIEW(mm, { 0x10000, 0x4000, a, 0 }, { 0x14000, 0x1000, a, 0x1000 });
	/* Different regions never merge, even when adjacent. */
	add(root, 0x20000, b, 0);
	add(root, 0x21000, c, 0);
	CHECK_VIEW(mm, { 0x10000, 0x4000, a, 0 }, { 0x14000, 0x1000, a, 0x1000 },
		   { 0x20000, 0x1000, b, 0 }, { 0x21000, 0x1000, c, 0 });
	/* A disabled region is a hole that a lower one shows through... */
	ASSERT_OK(memmap_del_subregion(c, NULL));
	add(root, 0x20000, c, 1);
	CHECK_VIEW(mm, { 0x10000, 0x4000, a, 0 }, { 0x14000, 0x1000, a, 0x1000 },
		   { 0x20000, 0x1000, c, 0 });
	ASSERT_OK(memmap_set_enabled(c, false, NULL));
	CHECK_VIEW(mm, { 0x10000, 0x4000, a, 0 }, { 0x14000, 0x1000, a, 0x1000 },
		   { 0x20000, 0x1000, b, 0 });
	/* ...and disabling a container hides everything inside it. */
	ASSERT_OK(memmap_set_enabled(c, true, NULL));
	ASSERT_OK(memmap_del_subregion(a3, NULL));
	add(k, 0, a3, 0);
	add(root, 0x30000, k, 0);
	CHECK_VIEW(mm, { 0x10000, 0x4000, a, 0 }, { 0x20000, 0x1000, c, 0 },
		   { 0x30000, 0x1000, a, 0x1000 });
	ASSERT_OK(memmap_set_enabled(k, false, NULL));
	CHECK_VIEW(mm, { 0x10000, 0x4000, a, 0 }, { 0x20000, 0x1000, c, 0 });
	/* Setting the same state again is not a change. */
	uint64_t before = rebuilds(mm);
	ASSERT_OK(memmap_set_enabled(k, false, NULL));
	ASSERT_EQ(rebuilds(mm), before);

	memmap_region_free(a1);
	memmap_region_free(a2);
	memmap_region_free(a3);
	memmap_region_free(k);
	/* The aliases kept a's struct alive; freeing in any order is fine. */
	memmap_region_free(a);
	memmap_region_free(b);
	memmap_region_free(c);
	CHECK_VIEW_EMPTY(mm);
	memmap_free(mm);
}

TEST(memmap_move_del_and_errors)
{
	static uint8_t ha[0x1000], hb[0x1000];
	struct ferry_error err = {0};
	struct memmap *mm = new_map();
	struct memmap *other = new_map();
	struct memmap_region *root = memmap_root(mm);
	struct memmap_region *a = ram(mm, "a", ha, sizeof(ha));
	struct memmap_region *b = ram(mm, "b", hb, sizeof(hb));
	struct memmap_region *k = memmap_region_new_container(mm, "k", 0x10000, &err);
	struct memmap_region *k2 = memmap_region_new_container(mm, "k2", 0x10000, &err);
	struct memmap_region *ak, *foreign = ram(other, "f", ha, sizeof(ha));

	add(root, 0x1000, a, 0);
	add(root, 0x2000, b, 0);
	ASSERT_OK(memmap_move_subregion(a, 0x2000, NULL));
	/* Moving keeps the stacking order: b (added later) still wins. */
	CHECK_VIEW(mm, { 0x2000, 0x1000, b, 0 });
	ASSERT_OK(memmap_move_subregion(a, 0x8000, NULL));
	CHECK_VIEW(mm, { 0x2000, 0x1000, b, 0 }, { 0x8000, 0x1000, a, 0 });
	ASSERT_OK(memmap_del_subregion(b, NULL));
	CHECK_VIEW(mm, { 0x8000, 0x1000, a, 0 });

	ASSERT_ERR(memmap_del_subregion(b, NULL), -ENOENT);
	ASSERT_ERR(memmap_move_subregion(b, 0, NULL), -ENOENT);
	ASSERT_ERR(memmap_add_subregion(root, 0, a, 0, NULL), -EBUSY);
	ASSERT_ERR(memmap_add_subregion(a, 0, b, 0, NULL), -EINVAL);
	ASSERT_ERR(memmap_add_subregion(root, 0, foreign, 0, NULL), -EINVAL);
	ASSERT_ERR(memmap_add_subregion(root, UINT64_MAX - 0x800, b, 0, NULL), -ERANGE);
	ASSERT_ERR(memmap_add_subregion(k, 0, root, 0, NULL), -EBUSY);
	/* Cycles: a container into itself or its descendant, an alias of a
	 * container into that container. */
	ASSERT_ERR(memmap_add_subregion(k, 0, k, 0, NULL), -ELOOP);
	add(k, 0, k2, 0);
	ASSERT_ERR(memmap_add_subregion(k2, 0, k, 0, NULL), -ELOOP);
	ak = alias(mm, "ak", k, 0, 0x1000);
	ferry_error_clear(&err);
	ASSERT_ERR(memmap_add_subregion(k2, 0, ak, 0, &err), -ELOOP);
	ASSERT_CONTAINS(err.msg, "cycle");
	ASSERT_ERR(memmap_commit(mm, NULL), -EINVAL); /* no begin */
	ASSERT_NULL(memmap_region_new_ram(mm, "z", ha, 0, NULL));
	ASSERT_NULL(memmap_region_new_alias(mm, "z", foreign, 0, 1, NULL));
	CHECK_VIEW(mm, { 0x8000, 0x1000, a, 0 });

	memmap_region_free(ak);
	memmap_region_free(k2);
	memmap_region_free(k);
	memmap_region_free(a);
	memmap_region_free(b);
	memmap_region_free(foreign);
	memmap_free(other);
	memmap_free(mm);
}

/* ---- transactions and listeners ----------------------------------------- */

struct rec {
	struct memmap_listener l;
	unsigned begins, commits, adds, dels;
	bool adding;        /* set once an add is seen: dels must come first */
	bool order_ok;
	char log[2048];
	struct memmap *mm;  /* for the "changes from a listener" check */
	int change_result;
};

static void rec_begin(struct memmap_listener *l)
{
	struct rec *r = (struct rec *)l;

	r->begins++;
	r->adding = false;
}

static void rec_range(struct rec *r, char op, const struct memmap_range *x)
{
	size_t n = strlen(r->log);

	snprintf(r->log + n, sizeof(r->log) - n, "%c%s@%llx+%llx ", op,
		 memmap_region_name(x->mr), (unsigned long long)x->gpa,
		 (unsigned long long)x->size);
}

static void rec_add(struct memmap_listener *l, const struct memmap_range *x)
{
	struct rec *r = (struct rec *)l;

	r->adds++;
	r->adding = true;
	rec_range(r, '+', x);
}

static void rec_del(struct memmap_listener *l, const struct memmap_range *x)
{
	struct rec *r = (struct rec *)l;

	r->dels++;
	if (r->adding)
		r->order_ok = false;
	rec_range(r, '-', x);
}

static void rec_commit(struct memmap_listener *l, const struct memmap_view *v)
{
	struct rec *r = (struct rec *)l;

	(void)v;
	r->commits++;
	if (r->mm)
		r->change_result = memmap_set_enabled(memmap_root(r->mm), false, NULL);
}

static void rec_init(struct rec *r)
{
	memset(r, 0, sizeof(*r));
	r->l.begin = rec_begin;
	r->l.region_add = rec_add;
	r->l.region_del = rec_del;
	r->l.commit = rec_commit;
	r->order_ok = true;
}

static void rec_reset(struct rec *r)
{
	r->begins = r->commits = r->adds = r->dels = 0;
	r->log[0] = 0;
}

/* A child that is about to make a stale read (quietly: the abort's
 * message would only clutter the test output). */
static pid_t caught_fork(void)
{
	pid_t pid;

	fflush(NULL);
	pid = fork();
	ASSERT(pid >= 0);
	if (pid == 0 && !freopen("/dev/null", "w", stderr))
		_exit(2);
	return pid;
}

/* It was caught: an abort in debug builds; in release builds the child
 * exits 0 when the read was refused. */
static void assert_caught(pid_t pid)
{
	int st;

	ASSERT_EQ(waitpid(pid, &st, 0), pid);
#ifdef NDEBUG
	ASSERT(WIFEXITED(st) && WEXITSTATUS(st) == 0);
#else
	ASSERT(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT);
#endif
}

/* The thread that holds a transaction open reads the flat view: caught,
 * never served stale - an abort in debug builds, an error in release
 * builds. Another thread meanwhile reads the last published view. */
TEST(memmap_stale_read_caught)
{
	static uint8_t h[0x2000];
	struct memmap *mm = new_map();
	struct memmap_region *r = ram(mm, "r", h, sizeof(h));
	const struct memmap_view *v;
	uint8_t b;
	pid_t pid;

	add(memmap_root(mm), 0, r, 0);
	memmap_begin(mm);
	ASSERT_OK(memmap_move_subregion(r, 0x10000, NULL));
	v = reader_view(mm);          /* another thread: the old view */
	ASSERT_EQ(v->nr, 1);
	ASSERT_EQ(v->ranges[0].gpa, 0);
	memmap_view_put(v);
	pid = caught_fork();
	if (pid == 0)
		_exit(memmap_read(mm, 0, &b, 1) == -EBUSY &&
		      !memmap_view_get(mm) ? 0 : 1);
	assert_caught(pid);
	ASSERT_OK(memmap_commit(mm, NULL));
	/* Committed: the owner reads again, and sees its change. */
	v = memmap_view_get(mm);
	ASSERT_PTR(v);
	ASSERT_EQ(v->ranges[0].gpa, 0x10000);
	memmap_view_put(v);
	memmap_region_free(r);
	memmap_free(mm);
}

TEST(memmap_transactions_nest)
{
	static uint8_t h[0x8000];
	struct memmap *mm = new_map();
	struct memmap_region *root = memmap_root(mm);
	struct memmap_region *r[4];
	struct memmap_stats st0, st;
	struct rec rec;
	int i;

	rec_init(&rec);
	memmap_listener_register(mm, &rec.l);
	for (i = 0; i < 4; i++)
		r[i] = ram(mm, test_fmt("r%d", i), h + i * 0x2000, 0x2000);

	/* Outside a transaction: each change is its own commit and rebuild. */
	memmap_get_stats(mm, &st0);
	add(root, 0, r[0], 0);
	add(root, 0x2000, r[1], 0);
	memmap_get_stats(mm, &st);
	ASSERT_EQ(st.rebuilds - st0.rebuilds, 2);
	ASSERT_EQ(st.commits - st0.commits, 2);
	ASSERT_EQ(rec.commits, 3); /* + the replay at registration */

	/* Nested: only the outermost commit rebuilds and notifies, once. */
	rec_reset(&rec);
	memmap_get_stats(mm, &st0);
	memmap_begin(mm);
	add(root, 0x4000, r[2], 0);
	memmap_begin(mm);
	ASSERT(memmap_in_transaction(mm));
	add(root, 0x6000, r[3], 0);
	ASSERT_OK(memmap_move_subregion(r[0], 0x10000, NULL));
	ASSERT_OK(memmap_commit(mm, NULL));
	ASSERT_OK(memmap_del_subregion(r[1], NULL));
	ASSERT_EQ(rec.commits, 0);
	ASSERT_EQ(rebuilds(mm), st0.rebuilds);
	/* Not yet visible: readers still see the old view. */
	CHECK_VIEW(mm, { 0, 0x2000, r[0], 0 }, { 0x2000, 0x2000, r[1], 0 });
	ASSERT_OK(memmap_commit(mm, NULL));
	ASSERT(!memmap_in_transaction(mm));
	memmap_get_stats(mm, &st);
	ASSERT_EQ(st.rebuilds - st0.rebuilds, 1);
	ASSERT_EQ(st.commits - st0.commits, 1);
	ASSERT_EQ(st.changes - st0.changes, 4);
	ASSERT_EQ(rec.begins, 1);
	ASSERT_EQ(rec.commits, 1);
	CHECK_VIEW(mm, { 0x4000, 0x2000, r[2], 0 }, { 0x6000, 0x2000, r[3], 0 },
		   { 0x10000, 0x2000, r[0], 0 });
	ASSERT_EQ(rec.dels, 2);
	ASSERT_EQ(rec.adds, 3);

	/* A transaction with no change neither rebuilds nor notifies. */
	memmap_begin(mm);
	memmap_begin(mm);
	ASSERT_OK(memmap_commit(mm, NULL));
	ASSERT_OK(memmap_commit(mm, NULL));
	ASSERT_EQ(rebuilds(mm), st.rebuilds);
	ASSERT_EQ(rec.commits, 1);

	memmap_listener_unregister(mm, &rec.l);
	for (i = 0; i < 4; i++)
		memmap_region_free(r[i]);
	ASSERT_EQ(rec.commits, 1); /* unregistered: not told */
	memmap_free(mm);
}

TEST(memmap_listener_diff)
{
	static uint8_t ha[0x10000], hb[0x1000];
	struct memmap *mm = new_map();
	struct memmap_region *root = memmap_root(mm);
	struct memmap_region *a = ram(mm, "a", ha, sizeof(ha));
	struct memmap_region *b = ram(mm, "b", hb, sizeof(hb));
	struct mdev md = {0};
	struct memmap_region *m = mmio(mm, "m", 0x2000, &md);
	struct rec rec, late;

	rec_init(&rec);
	memmap_listener_register(mm, &rec.l);
	ASSERT_EQ(rec.adds, 0); /* empty map: nothing to replay */
	add(root, 0, a, 0);
	add(root, 0x100000, b, 0);
	ASSERT_STREQ(rec.log, "+a@0+10000 +b@100000+1000 ");

	/* Overlaying MMIO splits a: the old range goes, three come; b is
	 * untouched, so no callback mentions it. Dels come first. */
	rec_reset(&rec);
	add(root, 0x4000, m, 1);
	ASSERT_STREQ(rec.log, "-a@0+10000 +a@0+4000 +m@4000+2000 +a@6000+a000 ");
	ASSERT(rec.order_ok);

	/* Moving m reshapes a around it; b again is not mentioned. */
	rec_reset(&rec);
	ASSERT_OK(memmap_move_subregion(m, 0x8000, NULL));
	ASSERT_STREQ(rec.log, "-a@0+4000 -m@4000+2000 -a@6000+a000 "
			      "+a@0+8000 +m@8000+2000 +a@a000+6000 ");
	ASSERT(rec.order_ok);

	/* A late listener is replayed the current view. */
	rec_init(&late);
	memmap_listener_register(mm, &late.l);
	ASSERT_EQ(late.begins, 1);
	ASSERT_EQ(late.commits, 1);
	ASSERT_STREQ(late.log, "+a@0+8000 +m@8000+2000 +a@a000+6000 "
			       "+b@100000+1000 ");

	/* Listeners must not change the map from a callback. */
	late.mm = mm;
	ASSERT_OK(memmap_del_subregion(b, NULL));
	ASSERT_ERR(late.change_result, -EDEADLK);
	memmap_listener_unregister(mm, &late.l);

	memmap_listener_unregister(mm, &rec.l);
	memmap_region_free(a);
	memmap_region_free(b);
	memmap_region_free(m);
	memmap_free(mm);
}

/* ---- access dispatch -------------------------------------------------------- */

TEST(memmap_rw_across_boundaries)
{
	static uint8_t ha[0x1000], hb[0x1000];
	uint8_t buf[0x40], back[0x40];
	struct memmap *mm = new_map();
	struct memmap_region *root = memmap_root(mm);
	struct memmap_region *a = ram(mm, "a", ha, sizeof(ha));
	struct memmap_region *b = ram(mm, "b", hb, sizeof(hb));
	struct mdev md = {0};
	struct memmap_region *m = mmio(mm, "m", sizeof(md.regs), &md);
	unsigned i;

	/* a [0, 0x1000) | m [0x1000, 0x1010) | b [0x1010, 0x2010) */
	add(root, 0, a, 0);
	add(root, 0x1000, m, 0);
	add(root, 0x1010, b, 0);
	for (i = 0; i < sizeof(buf); i++)
		buf[i] = (uint8_t)(i + 1);

	/* One write spanning RAM, MMIO, RAM. */
	ASSERT_OK(memmap_write(mm, 0xff8, buf, 0x30));
	ASSERT_MEMEQ(ha + 0xff8, buf, 8);
	ASSERT_MEMEQ(md.regs, buf + 8, 16);
	ASSERT_MEMEQ(hb, buf + 24, 0x30 - 24);
	/* MMIO got naturally aligned 8-byte accesses. */
	ASSERT_EQ(md.nlog, 2);
	ASSERT(md.log[0].write && md.log[0].off == 0 && md.log[0].size == 8);
	ASSERT(md.log[1].off == 8 && md.log[1].size == 8);

	memset(back, 0, sizeof(back));
	ASSERT_OK(memmap_read(mm, 0xff8, back, 0x30));
	ASSERT_MEMEQ(back, buf, 0x30);

	/* Unaligned MMIO accesses are split to natural alignment. */
	md.nlog = 0;
	ASSERT_OK(memmap_write(mm, 0x1003, buf, 7));
	ASSERT_EQ(md.nlog, 3);
	ASSERT(md.log[0].off == 3 && md.log[0].size == 1);
	ASSERT(md.log[1].off == 4 && md.log[1].size == 4);
	ASSERT(md.log[2].off == 8 && md.log[2].size == 2);
	ASSERT_MEMEQ(md.regs + 3, buf, 7);

	/* A hole: bytes before it are done, the rest of a read is 0xff. */
	memset(back, 0, sizeof(back));
	ASSERT_ERR(memmap_read(mm, 0x2008, back, 16), -EFAULT);
	ASSERT_MEMEQ(back, hb + 0xff8, 8);
	for (i = 8; i < 16; i++)
		ASSERT_EQ(back[i], 0xff);
	ASSERT_ERR(memmap_write(mm, 0x5000, buf, 1), -EFAULT);
	ASSERT_ERR(memmap_read(mm, UINT64_MAX - 3, back, 8), -ERANGE);
	ASSERT_OK(memmap_read(mm, 0x5000, back, 0));

	memmap_region_free(a);
	memmap_region_free(b);
	memmap_region_free(m);
	memmap_free(mm);
}

/* A reader thread keeps dispatching through snapshots while the main
 * thread commits: run under SAN=thread/address to check the rule. */
struct reader_arg {
	struct memmap *mm;
	int stop;           /* atomic */
	unsigned long lookups, hits;  /* atomic */
};

static void *reader_thread(void *p)
{
	struct reader_arg *ra = p;

	while (!__atomic_load_n(&ra->stop, __ATOMIC_ACQUIRE)) {
		const struct memmap_view *v = memmap_view_get(ra->mm);
		const struct memmap_range *r = memmap_lookup(v, 0x1000);
		uint8_t x;

		__atomic_add_fetch(&ra->lookups, 1, __ATOMIC_RELAXED);
		if (r) {
			/* A snapshot's regions stay alive while it is held. */
			if (memmap_region_size(r->mr) != 0x1000 || !r->host)
				abort();
			if (!memmap_view_read(v, 0x1000, &x, 1))
				__atomic_add_fetch(&ra->hits, 1, __ATOMIC_RELAXED);
		}
		memmap_view_put(v);
	}
	return NULL;
}

TEST(memmap_view_snapshot_threads)
{
	static uint8_t h[0x1000];
	struct memmap *mm = new_map();
	struct memmap_region *root = memmap_root(mm);
	struct memmap_region *a = ram(mm, "a", h, sizeof(h));
	struct reader_arg ra = { .mm = mm };
	const struct memmap_view *old;
	pthread_t t;
	int i;

	/* A held snapshot does not change under a commit. */
	add(root, 0x1000, a, 0);
	old = memmap_view_get(mm);
	ASSERT_OK(memmap_del_subregion(a, NULL));
	ASSERT_EQ(old->nr, 1);
	ASSERT(memmap_lookup(old, 0x1000)->mr == a);
	CHECK_VIEW_EMPTY(mm);
	memmap_view_put(old);

	ASSERT_OK(pthread_create(&t, NULL, reader_thread, &ra));
	/* Keep committing until the reader has raced with us a while. */
	for (i = 0; i < 2000 ||
		    __atomic_load_n(&ra.hits, __ATOMIC_RELAXED) < 1000; i++) {
		/* Fresh regions each round, freed while a reader may still
		 * hold a view that points at them. */
		struct memmap_region *r = ram(mm, "r", h, sizeof(h));

		add(root, 0x1000, r, 0);
		memmap_region_free(r);
	}
	__atomic_store_n(&ra.stop, 1, __ATOMIC_RELEASE);
	pthread_join(t, NULL);
	ASSERT_GE(ra.hits, 1000);
	memmap_region_free(a);
	memmap_free(mm);
}

/* ---- virtio-like devices ------------------------------------------------------ */

#define BAR0_ADDR 0xfe000000u
#define GUEST_RAM (1u << 20)

static struct virtio_dev *vdev(struct memmap *mm, unsigned index, bool bar1)
{
	struct ferry_error err = {0};
	struct virtio_dev_opts o = { .bar1 = bar1 };
	struct virtio_dev *d = virtio_dev_create_opts(mm, index, &o, &err);

	if (!d)
		FAIL("virtio_dev_create: %s", err.msg);
	return d;
}

static void cfgw(struct virtio_dev *d, unsigned off, uint32_t v, unsigned size)
{
	struct ferry_error err = {0};

	ASSERT_OK_E(virtio_cfg_write(d, off, v, size, &err), err);
}

static void reg_w(struct memmap *mm, uint64_t base, unsigned off, uint32_t v)
{
	ASSERT_OK(memmap_write(mm, base + off, &v, 4));
}

static uint32_t reg_r(struct memmap *mm, uint64_t base, unsigned off)
{
	uint32_t v = 0;

	ASSERT_OK(memmap_read(mm, base + off, &v, 4));
	return v;
}

TEST(memmap_virtio_bar_sizing)
{
	struct memmap *mm = new_map();
	struct virtio_dev *d = vdev(mm, 0, true);
	struct virtio_dev *d2 = vdev(mm, 1, false);

	ASSERT_EQ(virtio_cfg_read(d, VPCI_VENDOR_ID, 2), VIRTIO_VENDOR_ID);
	ASSERT_EQ(virtio_cfg_read(d, VPCI_DEVICE_ID, 2), VIRTIO_DEVICE_ID);
	ASSERT_EQ_U64(virtio_cfg_read(d, 0, 4),
		      VIRTIO_VENDOR_ID | (uint32_t)VIRTIO_DEVICE_ID << 16);
	/* Read-only registers ignore writes. */
	cfgw(d, VPCI_VENDOR_ID, 0x1234, 2);
	ASSERT_EQ(virtio_cfg_read(d, VPCI_VENDOR_ID, 2), VIRTIO_VENDOR_ID);
	/* Command: memory and bus master are writable, I/O is not (no I/O BAR). */
	cfgw(d, VPCI_COMMAND, 0xffff, 2);
	ASSERT_EQ(virtio_cfg_read(d, VPCI_COMMAND, 2), VPCI_CMD_MEMORY | VPCI_CMD_MASTER);
	cfgw(d, VPCI_COMMAND, 0, 2);

	/* Sizing: all-ones reads back the size mask with the flag bits. */
	cfgw(d, VPCI_BAR0, 0xffffffff, 4);
	ASSERT_EQ_U64(virtio_cfg_read(d, VPCI_BAR0, 4), ~(VIRTIO_BAR0_SIZE - 1u));
	cfgw(d, VPCI_BAR0 + 4, 0xffffffff, 4);
	ASSERT_EQ_U64(virtio_cfg_read(d, VPCI_BAR0 + 4, 4),
		      ~(VIRTIO_BAR1_SIZE - 1u) | VPCI_BAR_PREFETCH);
	cfgw(d, VPCI_BAR0 + 8, 0xffffffff, 4);     /* unimplemented */
	ASSERT_EQ(virtio_cfg_read(d, VPCI_BAR0 + 8, 4), 0);
	cfgw(d2, VPCI_BAR0 + 4, 0xffffffff, 4);    /* d2 has no BAR1 */
	ASSERT_EQ(virtio_cfg_read(d2, VPCI_BAR0 + 4, 4), 0);
	/* Byte-wide sizing works the same: low bits stay read-only. */
	cfgw(d, VPCI_BAR0, 0xff, 1);
	ASSERT_EQ(virtio_cfg_read(d, VPCI_BAR0, 1), 0);
	ASSERT_EQ(virtio_cfg_read(d, VPCI_BAR0 + 1, 1), 0xf0);
	/* Programming an address; a sized BAR with decode on maps nothing. */
	cfgw(d, VPCI_COMMAND, VPCI_CMD_MEMORY, 2);
	CHECK_VIEW_EMPTY(mm);
	cfgw(d, VPCI_BAR0, BAR0_ADDR | 0x123, 4);
	ASSERT_EQ_U64(virtio_cfg_read(d, VPCI_BAR0, 4), BAR0_ADDR);
	/* Bad accesses: all-ones, ignored. */
	ASSERT_EQ_U64(virtio_cfg_read(d, 0x3, 2), 0xffffffffu);
	ASSERT_EQ_U64(virtio_cfg_read(d, 256, 1), 0xffffffffu);
	ASSERT_EQ_U64(virtio_cfg_read(d, 0, 3), 0xffffffffu);

	virtio_dev_destroy(d);
	virtio_dev_destroy(d2);
	CHECK_VIEW_EMPTY(mm);
	memmap_free(mm);
}

TEST(memmap_virtio_bar_decode)
{
	struct memmap *mm = new_map();
	struct virtio_dev *d = vdev(mm, 0, true);
	const struct memmap_view *v;
	const struct memmap_range *r;
	uint8_t buf[16], back[16];

	cfgw(d, VPCI_BAR0, BAR0_ADDR, 4);
	cfgw(d, VPCI_BAR0 + 4, BAR0_ADDR + 0x10000, 4);
	CHECK_VIEW_EMPTY(mm); /* decode off */

	/* Enabling memory decode maps both BARs, in one rebuild. */
	uint64_t before = rebuilds(mm);
	cfgw(d, VPCI_COMMAND, VPCI_CMD_MEMORY, 2);
	ASSERT_EQ(rebuilds(mm), before + 1);
	v = memmap_view_get(mm);
	ASSERT_EQ(v->nr, 2);
	r = memmap_lookup(v, BAR0_ADDR + 0x10);
	ASSERT_PTR(r);
	ASSERT_EQ(memmap_region_kind(r->mr), MEMMAP_MMIO);
	ASSERT(memmap_region_opaque(r->mr) == d);
	r = memmap_lookup(v, BAR0_ADDR + 0x10000);
	ASSERT_PTR(r);
	ASSERT_EQ(memmap_region_kind(r->mr), MEMMAP_RAM);
	memmap_view_put(v);

	/* MMIO reaches the device registers. */
	ASSERT_EQ_U64(reg_r(mm, BAR0_ADDR, VIRTIO_REG_MAGIC), VIRTIO_MAGIC);
	ASSERT_EQ(reg_r(mm, BAR0_ADDR, VIRTIO_REG_NUM_QUEUES), VIRTIO_DEFAULT_QUEUES);
	reg_w(mm, BAR0_ADDR, VIRTIO_REG_QUEUE_SEL, 2);
	reg_w(mm, BAR0_ADDR, VIRTIO_REG_QUEUE_NUM, 64);
	reg_w(mm, BAR0_ADDR, VIRTIO_REG_DESC_HI, 0x1);
	ASSERT_EQ(reg_r(mm, BAR0_ADDR, VIRTIO_REG_QUEUE_SEL), 2);
	ASSERT_EQ(reg_r(mm, BAR0_ADDR, VIRTIO_REG_QUEUE_NUM), 64);
	ASSERT_EQ(reg_r(mm, BAR0_ADDR, VIRTIO_REG_DESC_HI), 1);
	reg_w(mm, BAR0_ADDR, VIRTIO_REG_QUEUE_NUM, 100); /* not a power of 2 */
	ASSERT_EQ(reg_r(mm, BAR0_ADDR, VIRTIO_REG_QUEUE_NUM), 64);
	/* A 64-bit access covers a LO/HI pair. */
	uint64_t a64 = 0x1122334455667788ull, b64 = 0;
	ASSERT_OK(memmap_write(mm, BAR0_ADDR + VIRTIO_REG_AVAIL_LO, &a64, 8));
	ASSERT_OK(memmap_read(mm, BAR0_ADDR + VIRTIO_REG_AVAIL_LO, &b64, 8));
	ASSERT_EQ_U64(b64, a64);
	/* BAR1 is RAM: what is written reads back. */
	memset(buf, 0xa5, sizeof(buf));
	ASSERT_OK(memmap_write(mm, BAR0_ADDR + 0x10000 + 8, buf, sizeof(buf)));
	ASSERT_OK(memmap_read(mm, BAR0_ADDR + 0x10000 + 8, back, sizeof(back)));
	ASSERT_MEMEQ(back, buf, sizeof(buf));

	/* Reprogramming the address while decoding moves the BAR. */
	cfgw(d, VPCI_BAR0, BAR0_ADDR + 0x4000, 4);
	ASSERT_ERR(memmap_read(mm, BAR0_ADDR, back, 4), -EFAULT);
	ASSERT_EQ_U64(reg_r(mm, BAR0_ADDR + 0x4000, VIRTIO_REG_MAGIC), VIRTIO_MAGIC);
	/* Sizing with decode on unmaps it (top window), restoring remaps. */
	cfgw(d, VPCI_BAR0, 0xffffffff, 4);
	ASSERT_ERR(memmap_read(mm, BAR0_ADDR + 0x4000, back, 4), -EFAULT);
	cfgw(d, VPCI_BAR0, BAR0_ADDR, 4);
	ASSERT_EQ_U64(reg_r(mm, BAR0_ADDR, VIRTIO_REG_MAGIC), VIRTIO_MAGIC);
	/* Decode off unmaps everything. */
	cfgw(d, VPCI_COMMAND, 0, 2);
	CHECK_VIEW_EMPTY(mm);

	virtio_dev_destroy(d);
	memmap_free(mm);
}

/* Program queue @q: @num entries, rings at @desc/@avail/@used, enabled. */
static void setup_queue(struct memmap *mm, uint64_t bar, unsigned q,
			unsigned num, uint64_t desc, uint64_t avail, uint64_t used)
{
	reg_w(mm, bar, VIRTIO_REG_QUEUE_SEL, q);
	reg_w(mm, bar, VIRTIO_REG_QUEUE_NUM, num);
	reg_w(mm, bar, VIRTIO_REG_DESC_LO, (uint32_t)desc);
	reg_w(mm, bar, VIRTIO_REG_DESC_HI, (uint32_t)(desc >> 32));
	reg_w(mm, bar, VIRTIO_REG_AVAIL_LO, (uint32_t)avail);
	reg_w(mm, bar, VIRTIO_REG_AVAIL_HI, (uint32_t)(avail >> 32));
	reg_w(mm, bar, VIRTIO_REG_USED_LO, (uint32_t)used);
	reg_w(mm, bar, VIRTIO_REG_USED_HI, (uint32_t)(used >> 32));
	reg_w(mm, bar, VIRTIO_REG_QUEUE_READY, 1);
}

static void set_u16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

TEST(memmap_virtio_queue_cache)
{
	uint8_t *ha = calloc(1, GUEST_RAM), *hb = calloc(1, GUEST_RAM);
	struct memmap *mm = new_map();
	struct memmap_region *root = memmap_root(mm);
	struct memmap_region *ra, *rb;
	struct virtio_dev *d = vdev(mm, 0, false);
	struct virtio_stats st0, st;
	uint8_t desc[16];

	ASSERT_PTR(ha);
	ASSERT_PTR(hb);
	ra = ram(mm, "ram-a", ha, GUEST_RAM);
	rb = ram(mm, "ram-b", hb, GUEST_RAM);
	add(root, 0, ra, 0);
	cfgw(d, VPCI_BAR0, BAR0_ADDR, 4);
	cfgw(d, VPCI_COMMAND, VPCI_CMD_MEMORY, 2);
	setup_queue(mm, BAR0_ADDR, 1, 16, 0x1000, 0x2000, 0x3000);

	/* The cache points straight into the RAM behind the flat view. */
	ASSERT(virtio_queue_host(d, 1, VIRTIO_RING_DESC) == ha + 0x1000);
	ASSERT(virtio_queue_host(d, 1, VIRTIO_RING_USED) == ha + 0x3000);
	ASSERT_NULL(virtio_queue_host(d, 0, VIRTIO_RING_DESC)); /* not ready */
	memset(ha + 0x1000, 0x11, 16);
	ASSERT_OK(virtio_queue_read(d, 1, VIRTIO_RING_DESC, 0, desc, 16));
	ASSERT_EQ(desc[15], 0x11);
	ASSERT_ERR(virtio_queue_read(d, 1, VIRTIO_RING_DESC, 16 * 16 - 8, desc, 16), -EINVAL);
	ASSERT_ERR(virtio_queue_read(d, 9, VIRTIO_RING_DESC, 0, desc, 1), -EINVAL);
	/* A kick consumes the avail index through the cache. */
	set_u16(ha + 0x2002, 7);
	reg_w(mm, BAR0_ADDR, VIRTIO_REG_NOTIFY, 1);
	ASSERT_EQ(virtio_queue_last_avail(d, 1), 7);

	/* Map changes away from the rings leave the cache alone. */
	virtio_get_stats(d, &st0);
	cfgw(d, VPCI_BAR0, BAR0_ADDR + 0x8000, 4);
	virtio_get_stats(d, &st);
	ASSERT_EQ(st.cache_rebuilds, st0.cache_rebuilds);

	/* Remapping the RAM under the rings: the listener invalidates the
	 * cache and the commit recomputes it against the new view. */
	memmap_begin(mm);
	ASSERT_OK(memmap_del_subregion(ra, NULL));
	add(root, 0, rb, 0);
	ASSERT(virtio_queue_host(d, 1, VIRTIO_RING_DESC) == ha + 0x1000); /* stale view */
	ASSERT_OK(memmap_commit(mm, NULL));
	virtio_get_stats(d, &st);
	ASSERT_EQ(st.cache_rebuilds, st0.cache_rebuilds + 1);
	ASSERT(virtio_queue_host(d, 1, VIRTIO_RING_DESC) == hb + 0x1000);
	set_u16(hb + 0x2002, 42);
	reg_w(mm, BAR0_ADDR + 0x8000, VIRTIO_REG_NOTIFY, 1);
	ASSERT_EQ(virtio_queue_last_avail(d, 1), 42);

	/* No RAM under the rings: reads fail, kicks are ignored. */
	ASSERT_OK(memmap_del_subregion(rb, NULL));
	ASSERT_NULL(virtio_queue_host(d, 1, VIRTIO_RING_DESC));
	ASSERT_ERR(virtio_queue_read(d, 1, VIRTIO_RING_DESC, 0, desc, 16), -EFAULT);
	/* RAM back at another place: the add is seen too. */
	add(root, 0x1000, rb, 0);
	ASSERT(virtio_queue_host(d, 1, VIRTIO_RING_DESC) == hb);
	/* Moving a ring by register write recomputes it on next use. */
	reg_w(mm, BAR0_ADDR + 0x8000, VIRTIO_REG_QUEUE_SEL, 1);
	reg_w(mm, BAR0_ADDR + 0x8000, VIRTIO_REG_DESC_LO, 0x5000);
	ASSERT(virtio_queue_host(d, 1, VIRTIO_RING_DESC) == hb + 0x4000);
	/* Reset clears the queues. */
	reg_w(mm, BAR0_ADDR + 0x8000, VIRTIO_REG_STATUS, 0);
	ASSERT_NULL(virtio_queue_host(d, 1, VIRTIO_RING_DESC));

	virtio_dev_destroy(d);
	memmap_region_free(ra);
	memmap_region_free(rb);
	memmap_free(mm);
	free(ha);
	free(hb);
}

/* ---- virtio migration ---------------------------------------------------------- */

/* A guest: RAM at 0 and @n virtio devices, each with BAR0 and BAR1 mapped
 * and every queue programmed. */
struct vm {
	struct memmap *mm;
	struct memmap_region *ram;
	uint8_t *mem;
	unsigned n;
	struct virtio_dev *dev[8];
};

static uint64_t bar0_of(unsigned i) { return BAR0_ADDR + i * 0x20000ull; }

static void vm_init(struct vm *vm, unsigned n, bool configure)
{
	unsigned i, q;

	memset(vm, 0, sizeof(*vm));
	vm->mm = new_map();
	vm->mem = calloc(1, GUEST_RAM);
	ASSERT_PTR(vm->mem);
	vm->ram = ram(vm->mm, "ram", vm->mem, GUEST_RAM);
	add(memmap_root(vm->mm), 0, vm->ram, 0);
	vm->n = n;
	for (i = 0; i < n; i++) {
		vm->dev[i] = vdev(vm->mm, i, true);
		if (!configure)
			continue;
		cfgw(vm->dev[i], VPCI_BAR0, (uint32_t)bar0_of(i), 4);
		cfgw(vm->dev[i], VPCI_BAR0 + 4, (uint32_t)bar0_of(i) + 0x10000, 4);
		cfgw(vm->dev[i], VPCI_INT_LINE, 10 + i, 1);
		cfgw(vm->dev[i], VPCI_COMMAND, VPCI_CMD_MEMORY | VPCI_CMD_MASTER, 2);
		for (q = 0; q < VIRTIO_DEFAULT_QUEUES; q++) {
			uint64_t base = 0x10000 + (i * 8 + q) * 0x3000ull;

			setup_queue(vm->mm, bar0_of(i), q, 32, base, base + 0x1000,
				    base + 0x2000);
			set_u16(vm->mem + base + 0x1002, (uint16_t)(100 * i + q));
			reg_w(vm->mm, bar0_of(i), VIRTIO_REG_NOTIFY, q);
		}
		reg_w(vm->mm, bar0_of(i), VIRTIO_REG_QUEUE_SEL, 2);
		reg_w(vm->mm, bar0_of(i), VIRTIO_REG_STATUS, 0xf);
		uint32_t tag = 0xc0de0000u + i;
		ASSERT_OK(memmap_write(vm->mm, bar0_of(i) + 0x10000 + 0x100, &tag, 4));
	}
}

static void vm_free(struct vm *vm)
{
	unsigned i;

	for (i = 0; i < vm->n; i++)
		virtio_dev_destroy(vm->dev[i]);
	memmap_region_free(vm->ram);
	memmap_free(vm->mm);
	free(vm->mem);
}

static uint8_t *save_dev(struct virtio_dev *d, size_t *len)
{
	struct ferry_error err = {0};
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	const uint8_t *data;
	uint8_t *out;

	ASSERT_PTR(c);
	ASSERT_OK_E(ferry_vmstate_save(c, &virtio_vmsd, d, &err), err);
	data = ferry_chan_mem_data(c, len);
	out = malloc(*len);
	ASSERT_PTR(out);
	memcpy(out, data, *len);
	ferry_chan_free(c);
	return out;
}

static int load_dev(struct virtio_dev *d, const uint8_t *buf, size_t len,
		    struct ferry_error *err)
{
	struct ferry_chan *c = ferry_chan_new_mem_reader(buf, len);
	int r;

	ASSERT_PTR(c);
	r = ferry_vmstate_load(c, &virtio_vmsd, d, 1, err);
	if (!r)
		ASSERT_EQ(ferry_chan_mem_remaining(c), 0);
	ferry_chan_free(c);
	return r;
}

/* Destination device @i of @dst must match source device @i of @src. */
static void check_same_dev(struct vm *src, struct vm *dst, unsigned i)
{
	struct virtio_dev *s = src->dev[i], *d = dst->dev[i];
	const struct memmap_view *v;
	const struct memmap_range *r;
	unsigned off, q;
	uint32_t tag = 0;

	for (off = 0; off < 256; off += 4)
		ASSERT_EQ_U64(virtio_cfg_read(d, off, 4), virtio_cfg_read(s, off, 4));
	/* The BARs are mapped on the destination, at the same addresses. */
	v = memmap_view_get(dst->mm);
	r = memmap_lookup(v, bar0_of(i) + VIRTIO_REG_STATUS);
	ASSERT_PTR(r);
	ASSERT(memmap_region_opaque(r->mr) == d);
	memmap_view_put(v);
	ASSERT_EQ(reg_r(dst->mm, bar0_of(i), VIRTIO_REG_STATUS), 0xf);
	ASSERT_EQ(reg_r(dst->mm, bar0_of(i), VIRTIO_REG_QUEUE_SEL), 2);
	ASSERT_OK(memmap_read(dst->mm, bar0_of(i) + 0x10000 + 0x100, &tag, 4));
	ASSERT_EQ_U64(tag, 0xc0de0000u + i);
	for (q = 0; q < VIRTIO_DEFAULT_QUEUES; q++) {
		uint64_t base = 0x10000 + (i * 8 + q) * 0x3000ull;

		reg_w(dst->mm, bar0_of(i), VIRTIO_REG_QUEUE_SEL, q);
		ASSERT_EQ(reg_r(dst->mm, bar0_of(i), VIRTIO_REG_QUEUE_NUM), 32);
		ASSERT_EQ(reg_r(dst->mm, bar0_of(i), VIRTIO_REG_QUEUE_READY), 1);
		ASSERT_EQ_U64(reg_r(dst->mm, bar0_of(i), VIRTIO_REG_AVAIL_LO), base + 0x1000);
		ASSERT_EQ(virtio_queue_last_avail(d, q), 100 * i + q);
		/* Caches point into the destination's RAM. */
		ASSERT(virtio_queue_host(d, q, VIRTIO_RING_DESC) == dst->mem + base);
		ASSERT(virtio_queue_host(d, q, VIRTIO_RING_USED) == dst->mem + base + 0x2000);
	}
	reg_w(dst->mm, bar0_of(i), VIRTIO_REG_QUEUE_SEL, 2);
}

TEST(memmap_virtio_vmstate_roundtrip)
{
	struct ferry_error err = {0};
	struct vm src, dst;
	struct virtio_dev *wrong;
	struct virtio_dev_opts o = { .num_queues = 2, .bar1 = true };
	struct virtio_stats st;
	uint8_t *buf;
	size_t len;

	ASSERT_OK_E(ferry_vmstate_validate(&virtio_vmsd, &err), err);
	vm_init(&src, 1, true);
	/* Registered per instance, the device struct as obj. */
	struct ferry_ctx *ctx = ferry_ctx_new(&err);
	ASSERT_PTR(ctx);
	ASSERT_OK_E(ferry_register_vmstate(ctx, &virtio_vmsd,
					   virtio_dev_index(src.dev[0]),
					   src.dev[0], &err), err);
	ferry_ctx_free(ctx);
	vm_init(&dst, 1, false);
	memcpy(dst.mem, src.mem, GUEST_RAM); /* as RAM migration would have */
	CHECK_VIEW(dst.mm, { 0, GUEST_RAM, dst.ram, 0 });

	buf = save_dev(src.dev[0], &len);
	ASSERT_OK_E(load_dev(dst.dev[0], buf, len, &err), err);
	virtio_get_stats(dst.dev[0], &st);
	/* Outside a transaction post_load rebuilt the caches itself. */
	ASSERT_EQ(st.cache_rebuilds, VIRTIO_DEFAULT_QUEUES);
	check_same_dev(&src, &dst, 0);

	/* Loading into a different device model fails by name. */
	wrong = virtio_dev_create_opts(dst.mm, 5, &o, &err);
	ASSERT_PTR(wrong);
	ferry_error_clear(&err);
	ASSERT_ERR(load_dev(wrong, buf, len, &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "queues");
	virtio_dev_destroy(wrong);
	/* A read-only config bit flipped on the wire is refused. */
	buf[VPCI_DEVICE_ID] ^= 1;
	ferry_error_clear(&err);
	ASSERT_ERR(load_dev(dst.dev[0], buf, len, &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "read-only");

	free(buf);
	vm_free(&src);
	vm_free(&dst);
}

TEST(memmap_virtio_load_one_rebuild)
{
	struct ferry_error err = {0};
	struct vm src, dst;
	uint8_t *buf[8];
	size_t len[8];
	uint64_t before;
	unsigned i, pass;

	vm_init(&src, 8, true);
	for (i = 0; i < 8; i++)
		buf[i] = save_dev(src.dev[i], &len[i]);

	for (pass = 0; pass < 2; pass++) {
		bool batched = pass == 1;

		vm_init(&dst, 8, false);
		memcpy(dst.mem, src.mem, GUEST_RAM);
		before = rebuilds(dst.mm);
		if (batched)
			memmap_begin(dst.mm);
		for (i = 0; i < 8; i++)
			ASSERT_OK_E(load_dev(dst.dev[i], buf[i], len[i], &err), err);
		if (batched) {
			/* Nothing visible until the outer commit. */
			ASSERT_EQ(rebuilds(dst.mm), before);
			ASSERT_OK_E(memmap_commit(dst.mm, &err), err);
			ASSERT_EQ(rebuilds(dst.mm), before + 1);
		} else {
			/* One rebuild per device (both its BARs in one). */
			ASSERT_EQ(rebuilds(dst.mm), before + 8);
		}
		for (i = 0; i < 8; i++) {
			struct virtio_stats st;

			/* Either way each device's caches were built once. */
			virtio_get_stats(dst.dev[i], &st);
			ASSERT_EQ(st.cache_rebuilds, VIRTIO_DEFAULT_QUEUES);
			check_same_dev(&src, &dst, i);
		}
		vm_free(&dst);
	}
	for (i = 0; i < 8; i++)
		free(buf[i]);
	vm_free(&src);
}

/* A device that reads the flat view during a batched load (here: reading
 * its queue, which translates the ring address through the view) is
 * caught, because the view does not show the BARs and rings the load just
 * set; the same read after the commit works and sees the source's rings. */
TEST(memmap_virtio_read_during_load_caught)
{
	struct ferry_error err = {0};
	struct vm src, dst;
	uint8_t *buf, ring[16], want[16];
	size_t len;
	pid_t pid;

	vm_init(&src, 2, true);
	buf = save_dev(src.dev[1], &len);
	ASSERT_OK(virtio_queue_read(src.dev[1], 0, VIRTIO_RING_AVAIL, 0, want,
				    sizeof(want)));
	vm_init(&dst, 2, false);
	memcpy(dst.mem, src.mem, GUEST_RAM);
	memmap_begin(dst.mm);
	ASSERT_OK_E(load_dev(dst.dev[1], buf, len, &err), err);
	pid = caught_fork();
	if (pid == 0)
		_exit(virtio_queue_read(dst.dev[1], 0, VIRTIO_RING_AVAIL, 0, ring,
					sizeof(ring)) == -EBUSY ? 0 : 1);
	assert_caught(pid);
	ASSERT_OK_E(memmap_commit(dst.mm, &err), err);
	ASSERT_OK(virtio_queue_read(dst.dev[1], 0, VIRTIO_RING_AVAIL, 0, ring,
				    sizeof(ring)));
	ASSERT(!memcmp(ring, want, sizeof(ring)));
	free(buf);
	vm_free(&dst);
	vm_free(&src);
}
