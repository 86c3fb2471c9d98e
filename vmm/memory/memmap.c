/*
 * vmm/memory/memmap.c - region tree, flat view rendering, transactions,
 * listeners.
 *
 * See memmap.h for the model and the threading rule. In short: the tree is
 * touched by one thread at a time (the caller serialises); the flat view is
 * an immutable refcounted snapshot that any thread may hold.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "memory/memmap.h"

/* Bound on container/alias nesting while rendering: a cycle through
 * aliases that the add-time check cannot see fails the commit with -ELOOP
 * instead of recursing forever. */
#define MEMMAP_MAX_DEPTH 32

struct memmap_region {
	struct memmap *mm;
	enum memmap_kind kind;
	char name[32];
	uint64_t size;
	/* Owner + one per view that points at it + one per alias onto it.
	 * Atomic: the last view may be put on a vCPU thread. */
	int refs;

	/* Leaf and alias data: immutable after creation, so threads holding a
	 * view may read them without locks. */
	uint8_t *host;                          /* RAM */
	const struct memmap_mmio_ops *ops;      /* MMIO */
	void *opaque;                           /* MMIO */
	struct memmap_region *alias_target;     /* ALIAS (holds a ref) */
	uint64_t alias_offset;                  /* ALIAS */

	/* Topology: tree-owner thread only. */
	struct memmap_region *parent;
	struct memmap_region *children; /* CONTAINER: in stacking order, the
					 * first one wins where they overlap */
	struct memmap_region *next;     /* sibling */
	uint64_t addr;                  /* offset in parent */
	int priority;
	bool enabled;
};

struct memmap {
	struct memmap_region *root;

	/* Tree-owner thread only, but for txn_depth and txn_owner, which any
	 * thread reads (atomically) to tell whether it is the owner of a
	 * pending transaction: only that thread can find both true. */
	int txn_depth;
	pthread_t txn_owner;            /* who began the outermost one */
	bool dirty;       /* tree changed since the view was built */
	bool notifying;   /* inside listener callbacks: no changes allowed */
	struct memmap_listener *listeners;
	uint64_t changes, commits, rebuilds;

	/* view_lock guards the published pointer only: readers take their
	 * reference under it, the committer swaps under it. Nothing else is
	 * ever done while holding it. */
	pthread_mutex_t view_lock;
	struct memmap_view *view;
};

/* ---- regions ----------------------------------------------------------- */

static void region_ref(struct memmap_region *r)
{
	__atomic_add_fetch(&r->refs, 1, __ATOMIC_RELAXED);
}

static void region_unref(struct memmap_region *r)
{
	if (!r || __atomic_sub_fetch(&r->refs, 1, __ATOMIC_ACQ_REL) != 0)
		return;
	region_unref(r->alias_target);
	free(r);
}

static struct memmap_region *region_new(struct memmap *mm, enum memmap_kind k,
					const char *name, uint64_t size,
					struct ferry_error *err)
{
	struct memmap_region *r;

	if (!mm) {
		ferry_error_set(err, -EINVAL, "region '%s': no memory map", name);
		return NULL;
	}
	if (size == 0) {
		ferry_error_set(err, -EINVAL, "region '%s': size 0", name);
		return NULL;
	}
	r = calloc(1, sizeof(*r));
	if (!r) {
		ferry_error_set(err, -ENOMEM, "region '%s': out of memory", name);
		return NULL;
	}
	r->mm = mm;
	r->kind = k;
	snprintf(r->name, sizeof(r->name), "%s", name ? name : "");
	r->size = size;
	r->refs = 1;
	r->enabled = true;
	return r;
}

struct memmap_region *memmap_region_new_ram(struct memmap *mm, const char *name,
					    void *host, uint64_t size,
					    struct ferry_error *err)
{
	struct memmap_region *r;

	if (!host) {
		ferry_error_set(err, -EINVAL, "RAM region '%s': no host memory", name);
		return NULL;
	}
	r = region_new(mm, MEMMAP_RAM, name, size, err);
	if (r)
		r->host = host;
	return r;
}

struct memmap_region *memmap_region_new_mmio(struct memmap *mm, const char *name,
					     uint64_t size,
					     const struct memmap_mmio_ops *ops,
					     void *opaque,
					     struct ferry_error *err)
{
	struct memmap_region *r;

	if (!ops) {
		ferry_error_set(err, -EINVAL, "MMIO region '%s': no ops", name);
		return NULL;
	}
	r = region_new(mm, MEMMAP_MMIO, name, size, err);
	if (r) {
		r->ops = ops;
		r->opaque = opaque;
	}
	return r;
}

struct memmap_region *memmap_region_new_container(struct memmap *mm,
						  const char *name, uint64_t size,
						  struct ferry_error *err)
{
	return region_new(mm, MEMMAP_CONTAINER, name, size, err);
}

struct memmap_region *memmap_region_new_alias(struct memmap *mm, const char *name,
					      struct memmap_region *target,
					      uint64_t offset, uint64_t size,
					      struct ferry_error *err)
{
	struct memmap_region *r;

	if (!target || target->mm != mm) {
		ferry_error_set(err, -EINVAL, "alias '%s': bad target", name);
		return NULL;
	}
	if (offset + size < offset) {
		ferry_error_set(err, -ERANGE, "alias '%s': window wraps", name);
		return NULL;
	}
	r = region_new(mm, MEMMAP_ALIAS, name, size, err);
	if (r) {
		region_ref(target);
		r->alias_target = target;
		r->alias_offset = offset;
	}
	return r;
}

void memmap_region_free(struct memmap_region *r)
{
	if (!r)
		return;
	/* One transaction for the whole teardown. Errors are ignored: the
	 * region goes away regardless, and a failed rebuild is retried by
	 * the next commit. */
	memmap_begin(r->mm);
	if (r->parent)
		memmap_del_subregion(r, NULL);
	while (r->children)
		memmap_del_subregion(r->children, NULL);
	memmap_commit(r->mm, NULL);
	region_unref(r);
}

enum memmap_kind memmap_region_kind(const struct memmap_region *r) { return r->kind; }
const char *memmap_region_name(const struct memmap_region *r) { return r->name; }
uint64_t memmap_region_size(const struct memmap_region *r) { return r->size; }
void *memmap_region_opaque(const struct memmap_region *r)
{
	return r->kind == MEMMAP_MMIO ? r->opaque : NULL;
}
bool memmap_region_attached(const struct memmap_region *r) { return r->parent != NULL; }

/* ---- tree changes -------------------------------------------------------- */

/* Every change is bracketed by change_begin/change_end, which makes a
 * change outside a transaction an implicit one-change transaction. */
static int change_begin(struct memmap *mm, struct ferry_error *err)
{
	if (mm->notifying)
		return ferry_error_set(err, -EDEADLK,
				       "memory map changed from a listener");
	memmap_begin(mm);
	return 0;
}

static int change_end(struct memmap *mm, bool changed, struct ferry_error *err)
{
	if (changed) {
		mm->changes++;
		mm->dirty = true;
	}
	return memmap_commit(mm, err);
}

/* Does rendering @r reach @t (through children or alias targets)? */
static bool reaches(const struct memmap_region *r, const struct memmap_region *t,
		    int depth)
{
	const struct memmap_region *c;

	if (r == t || depth > MEMMAP_MAX_DEPTH)
		return true;
	if (r->kind == MEMMAP_ALIAS)
		return reaches(r->alias_target, t, depth + 1);
	for (c = r->children; c; c = c->next)
		if (reaches(c, t, depth + 1))
			return true;
	return false;
}

int memmap_add_subregion(struct memmap_region *container, uint64_t offset,
			 struct memmap_region *sub, int priority,
			 struct ferry_error *err)
{
	struct memmap_region **pp, *a;
	int r;

	if (!container || !sub || container->kind != MEMMAP_CONTAINER ||
	    container->mm != sub->mm)
		return ferry_error_set(err, -EINVAL, "add '%s': not a container of the same map",
				       sub ? sub->name : "?");
	if (sub->parent || sub == sub->mm->root)
		return ferry_error_set(err, -EBUSY, "add '%s': already attached", sub->name);
	if (offset + sub->size < offset)
		return ferry_error_set(err, -ERANGE, "add '%s' at 0x%llx: wraps",
				       sub->name, (unsigned long long)offset);
	for (a = container; a; a = a->parent)
		if (reaches(sub, a, 0))
			return ferry_error_set(err, -ELOOP, "add '%s' to '%s': cycle",
					       sub->name, container->name);
	r = change_begin(sub->mm, err);
	if (r)
		return r;
	/* Stacking order: before every sibling of lower or equal priority, so
	 * at equal priority the later-added region wins. */
	for (pp = &container->children; *pp && (*pp)->priority > priority;
	     pp = &(*pp)->next)
		;
	sub->next = *pp;
	*pp = sub;
	sub->parent = container;
	sub->addr = offset;
	sub->priority = priority;
	return change_end(sub->mm, true, err);
}

int memmap_del_subregion(struct memmap_region *sub, struct ferry_error *err)
{
	struct memmap_region **pp;
	int r;

	if (!sub || !sub->parent)
		return ferry_error_set(err, -ENOENT, "del '%s': not attached",
				       sub ? sub->name : "?");
	r = change_begin(sub->mm, err);
	if (r)
		return r;
	for (pp = &sub->parent->children; *pp != sub; pp = &(*pp)->next)
		;
	*pp = sub->next;
	sub->next = NULL;
	sub->parent = NULL;
	return change_end(sub->mm, true, err);
}

int memmap_move_subregion(struct memmap_region *sub, uint64_t offset,
			  struct ferry_error *err)
{
	int r;

	if (!sub || !sub->parent)
		return ferry_error_set(err, -ENOENT, "move '%s': not attached",
				       sub ? sub->name : "?");
	if (offset + sub->size < offset)
		return ferry_error_set(err, -ERANGE, "move '%s' to 0x%llx: wraps",
				       sub->name, (unsigned long long)offset);
	r = change_begin(sub->mm, err);
	if (r)
		return r;
	bool changed = sub->addr != offset;
	sub->addr = offset;
	return change_end(sub->mm, changed, err);
}

int memmap_set_enabled(struct memmap_region *reg, bool enabled,
		       struct ferry_error *err)
{
	int r = change_begin(reg->mm, err);

	if (r)
		return r;
	bool changed = reg->enabled != enabled;
	reg->enabled = enabled;
	return change_end(reg->mm, changed, err);
}

/* ---- rendering ------------------------------------------------------------ */

struct builder {
	struct memmap_range *r;
	unsigned n, cap;
};

static uint64_t range_end(const struct memmap_range *r) { return r->gpa + r->size; }

static int builder_insert(struct builder *b, unsigned i, struct memmap_range x)
{
	if (b->n == b->cap) {
		unsigned cap = b->cap ? 2 * b->cap : 16;
		struct memmap_range *n = realloc(b->r, cap * sizeof(*n));

		if (!n)
			return -ENOMEM;
		b->r = n;
		b->cap = cap;
	}
	memmove(&b->r[i + 1], &b->r[i], (b->n - i) * sizeof(*b->r));
	b->r[i] = x;
	b->n++;
	return 0;
}

/*
 * Put leaf @mr's bytes [off, off + size) at @gpa, but only into the holes
 * left by what is already rendered: rendering goes from the winner down,
 * so whatever is there already has a higher priority.
 */
static int fill_holes(struct builder *b, uint64_t gpa, uint64_t size,
		      struct memmap_region *mr, uint64_t off)
{
	uint64_t cur = gpa, end = gpa + size;
	unsigned lo = 0, hi = b->n;

	while (lo < hi) { /* first range ending after gpa */
		unsigned mid = lo + (hi - lo) / 2;

		if (range_end(&b->r[mid]) <= gpa)
			lo = mid + 1;
		else
			hi = mid;
	}
	while (cur < end) {
		if (lo < b->n && b->r[lo].gpa <= cur) {
			cur = range_end(&b->r[lo++]); /* covered: skip it */
			continue;
		}
		uint64_t stop = lo < b->n && b->r[lo].gpa < end ? b->r[lo].gpa : end;
		struct memmap_range x = {
			.gpa = cur, .size = stop - cur, .mr = mr,
			.offset = off + (cur - gpa),
		};
		if (builder_insert(b, lo++, x))
			return -ENOMEM;
		cur = stop;
	}
	return 0;
}

/* Render @mr's own address space [off, off + len) at @gpa. */
static int render(struct builder *b, struct memmap_region *mr, uint64_t gpa,
		  uint64_t off, uint64_t len, int depth)
{
	struct memmap_region *c;
	uint64_t end;
	int r;

	if (depth > MEMMAP_MAX_DEPTH)
		return -ELOOP;
	if (!mr->enabled || off >= mr->size)
		return 0;
	end = off + len < mr->size ? off + len : mr->size; /* clip to mr */
	switch (mr->kind) {
	case MEMMAP_RAM:
	case MEMMAP_MMIO:
		return fill_holes(b, gpa, end - off, mr, off);
	case MEMMAP_ALIAS:
		return render(b, mr->alias_target, gpa, mr->alias_offset + off,
			      end - off, depth + 1);
	case MEMMAP_CONTAINER:
		for (c = mr->children; c; c = c->next) {
			uint64_t s = off > c->addr ? off : c->addr;
			uint64_t e = end < c->addr + c->size ? end : c->addr + c->size;

			if (s >= e)
				continue;
			r = render(b, c, gpa + (s - off), s - c->addr, e - s, depth + 1);
			if (r)
				return r;
		}
		return 0;
	}
	return 0;
}

/* Merge neighbours that continue the same leaf; set host pointers. */
static void merge_ranges(struct builder *b)
{
	unsigned i, o = 0;

	for (i = 0; i < b->n; i++) {
		struct memmap_range *p = o ? &b->r[o - 1] : NULL, *x = &b->r[i];

		if (p && p->mr == x->mr && range_end(p) == x->gpa &&
		    p->offset + p->size == x->offset) {
			p->size += x->size;
			continue;
		}
		b->r[o++] = *x;
	}
	b->n = o;
	for (i = 0; i < b->n; i++)
		b->r[i].host = b->r[i].mr->kind == MEMMAP_RAM ?
			b->r[i].mr->host + b->r[i].offset : NULL;
}

static struct memmap_view *view_alloc(struct memmap_range *ranges, unsigned n)
{
	struct memmap_view *v = calloc(1, sizeof(*v));
	unsigned i;

	if (!v)
		return NULL;
	v->refs_ = 1;
	v->nr = n;
	v->ranges = v->storage_ = ranges;
	for (i = 0; i < n; i++)
		region_ref(ranges[i].mr);
	return v;
}

static int build_view(struct memmap *mm, struct memmap_view **out)
{
	struct builder b = {0};
	int r = render(&b, mm->root, 0, 0, mm->root->size, 0);

	if (!r) {
		merge_ranges(&b);
		*out = view_alloc(b.r, b.n);
		if (*out)
			return 0;
		r = -ENOMEM;
	}
	free(b.r);
	return r;
}

/* ---- views ---------------------------------------------------------------- */

/*
 * The thread whose transaction is pending would read a view that its own
 * changes have made stale: a BAR it moved, a region it disabled, are not
 * in it yet. A silent stale read is the bug the transaction rule exists to
 * prevent (a device that caches a translation during its load), so it is
 * caught: an assertion in debug builds, an error in release builds. Other
 * threads read the published view as always (vCPUs dispatching MMIO while
 * a device reprograms its BARs see the map before or after, never a torn
 * one); during a migration's non-iterable load no vCPU runs.
 */
static bool stale_read(struct memmap *mm)
{
	if (__atomic_load_n(&mm->txn_depth, __ATOMIC_ACQUIRE) == 0 ||
	    !pthread_equal(__atomic_load_n(&mm->txn_owner, __ATOMIC_RELAXED),
			   pthread_self()))
		return false;
#ifndef NDEBUG
	fprintf(stderr, "memmap: the flat view read inside a pending "
		"transaction by the thread that opened it (it is stale until "
		"the commit: build from the view after it, in a listener)\n");
	abort();
#endif
	return true;
}

const struct memmap_view *memmap_view_get(struct memmap *mm)
{
	struct memmap_view *v;

	if (stale_read(mm))
		return NULL;
	pthread_mutex_lock(&mm->view_lock);
	v = mm->view;
	__atomic_add_fetch(&v->refs_, 1, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&mm->view_lock);
	return v;
}

void memmap_view_put(const struct memmap_view *cv)
{
	struct memmap_view *v = (struct memmap_view *)cv;
	unsigned i;

	if (!v || __atomic_sub_fetch(&v->refs_, 1, __ATOMIC_ACQ_REL) != 0)
		return;
	for (i = 0; i < v->nr; i++)
		region_unref(v->storage_[i].mr);
	free(v->storage_);
	free(v);
}

const struct memmap_range *memmap_lookup(const struct memmap_view *v, uint64_t gpa)
{
	unsigned lo = 0, hi = v->nr;

	while (lo < hi) { /* last range starting at or before gpa */
		unsigned mid = lo + (hi - lo) / 2;

		if (v->ranges[mid].gpa <= gpa)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo == 0 || gpa >= range_end(&v->ranges[lo - 1]))
		return NULL;
	return &v->ranges[lo - 1];
}

/* Split an MMIO transfer into naturally aligned 1/2/4/8-byte accesses. */
static void mmio_access(struct memmap_region *mr, uint64_t off, uint8_t *buf,
			size_t len, bool write)
{
	while (len) {
		unsigned size = 8, i;
		uint64_t val = 0;

		while (size > len || (off & (size - 1)))
			size >>= 1;
		if (write) {
			for (i = 0; i < size; i++)
				val |= (uint64_t)buf[i] << (8 * i);
			if (mr->ops->write)
				mr->ops->write(mr->opaque, off, val, size);
		} else {
			if (mr->ops->read)
				val = mr->ops->read(mr->opaque, off, size);
			for (i = 0; i < size; i++)
				buf[i] = (uint8_t)(val >> (8 * i));
		}
		off += size;
		buf += size;
		len -= size;
	}
}

static int view_access(const struct memmap_view *v, uint64_t gpa, uint8_t *buf,
		       size_t len, bool write)
{
	if (len && gpa + (len - 1) < gpa)
		return -ERANGE;
	while (len) {
		const struct memmap_range *r = memmap_lookup(v, gpa);

		if (!r) {
			if (!write)
				memset(buf, 0xff, len);
			return -EFAULT;
		}
		uint64_t in = gpa - r->gpa;
		size_t n = r->size - in < len ? (size_t)(r->size - in) : len;

		if (r->host && write)
			memcpy(r->host + in, buf, n);
		else if (r->host)
			memcpy(buf, r->host + in, n);
		else
			mmio_access(r->mr, r->offset + in, buf, n, write);
		gpa += n;
		buf += n;
		len -= n;
	}
	return 0;
}

int memmap_view_read(const struct memmap_view *v, uint64_t gpa, void *buf, size_t len)
{
	return view_access(v, gpa, buf, len, false);
}

int memmap_view_write(const struct memmap_view *v, uint64_t gpa,
		      const void *buf, size_t len)
{
	/* The write path never writes to buf; the cast only shares code. */
	return view_access(v, gpa, (uint8_t *)buf, len, true);
}

int memmap_read(struct memmap *mm, uint64_t gpa, void *buf, size_t len)
{
	const struct memmap_view *v = memmap_view_get(mm);
	int r;

	if (!v)
		return -EBUSY;
	r = memmap_view_read(v, gpa, buf, len);

	memmap_view_put(v);
	return r;
}

int memmap_write(struct memmap *mm, uint64_t gpa, const void *buf, size_t len)
{
	const struct memmap_view *v = memmap_view_get(mm);
	int r;

	if (!v)
		return -EBUSY;
	r = memmap_view_write(v, gpa, buf, len);

	memmap_view_put(v);
	return r;
}

/* ---- transactions and listeners ---------------------------------------- */

static bool same_range(const struct memmap_range *a, const struct memmap_range *b)
{
	return a->gpa == b->gpa && a->size == b->size && a->mr == b->mr &&
	       a->offset == b->offset;
}

/* One pass of the old/new difference: dels (@adding false) or adds. Both
 * views are sorted, so this is a merge walk. */
static void diff_pass(const struct memmap_view *old, const struct memmap_view *new,
		      struct memmap_listener *l, bool adding)
{
	unsigned i = 0, j = 0;

	while (i < old->nr || j < new->nr) {
		const struct memmap_range *o = i < old->nr ? &old->ranges[i] : NULL;
		const struct memmap_range *n = j < new->nr ? &new->ranges[j] : NULL;

		if (o && n && same_range(o, n)) {
			i++, j++;
		} else if (o && (!n || o->gpa <= n->gpa)) {
			if (!adding && l->region_del)
				l->region_del(l, o);
			i++;
		} else {
			if (adding && l->region_add)
				l->region_add(l, n);
			j++;
		}
	}
}

static void notify(struct memmap *mm, const struct memmap_view *old,
		   const struct memmap_view *new)
{
	struct memmap_listener *l;

	mm->notifying = true;
	for (l = mm->listeners; l; l = l->next_)
		if (l->begin)
			l->begin(l);
	/* A listener that only wants the commit costs no walk of the views:
	 * with a listener per device, walking both views for each would make
	 * one commit quadratic in the number of devices. */
	for (l = mm->listeners; l; l = l->next_)
		if (l->region_del)
			diff_pass(old, new, l, false);
	for (l = mm->listeners; l; l = l->next_)
		if (l->region_add)
			diff_pass(old, new, l, true);
	for (l = mm->listeners; l; l = l->next_)
		if (l->commit)
			l->commit(l, new);
	mm->notifying = false;
}

void memmap_begin(struct memmap *mm)
{
	if (mm->txn_depth == 0)
		__atomic_store_n(&mm->txn_owner, pthread_self(), __ATOMIC_RELAXED);
	/* Release: whoever sees the depth sees the owner written before. */
	__atomic_store_n(&mm->txn_depth, mm->txn_depth + 1, __ATOMIC_RELEASE);
}

bool memmap_in_transaction(const struct memmap *mm)
{
	return __atomic_load_n(&mm->txn_depth, __ATOMIC_RELAXED) > 0;
}

int memmap_commit(struct memmap *mm, struct ferry_error *err)
{
	struct memmap_view *new, *old;
	int r;

	if (mm->txn_depth == 0)
		return ferry_error_set(err, -EINVAL, "memmap_commit without memmap_begin");
	__atomic_store_n(&mm->txn_depth, mm->txn_depth - 1, __ATOMIC_RELAXED);
	if (mm->txn_depth > 0)
		return 0;
	mm->commits++;
	if (!mm->dirty)
		return 0;
	r = build_view(mm, &new);
	if (r)
		return ferry_error_set(err, r, "memory map rebuild failed: %s",
				       r == -ELOOP ? "regions nest too deep (alias cycle?)"
						   : "out of memory");
	mm->dirty = false;
	mm->rebuilds++;
	new->generation = mm->rebuilds;
	pthread_mutex_lock(&mm->view_lock);
	old = mm->view;
	mm->view = new;
	pthread_mutex_unlock(&mm->view_lock);
	notify(mm, old, new);
	memmap_view_put(old);
	return 0;
}

void memmap_listener_register(struct memmap *mm, struct memmap_listener *l)
{
	static const struct memmap_view empty;
	struct memmap_listener **pp;

	for (pp = &mm->listeners; *pp; pp = &(*pp)->next_)
		;
	l->next_ = NULL;
	*pp = l;
	/* Replay: the difference from an empty view is every range. */
	mm->notifying = true;
	if (l->begin)
		l->begin(l);
	diff_pass(&empty, mm->view, l, true);
	if (l->commit)
		l->commit(l, mm->view);
	mm->notifying = false;
}

void memmap_listener_unregister(struct memmap *mm, struct memmap_listener *l)
{
	struct memmap_listener **pp;

	for (pp = &mm->listeners; *pp; pp = &(*pp)->next_) {
		if (*pp == l) {
			*pp = l->next_;
			l->next_ = NULL;
			return;
		}
	}
}

void memmap_get_stats(const struct memmap *mm, struct memmap_stats *st)
{
	st->changes = mm->changes;
	st->commits = mm->commits;
	st->rebuilds = mm->rebuilds;
	/* The tree owner is the only writer of mm->view, so no lock here. */
	st->nr_ranges = mm->view->nr;
}

/* ---- the map ---------------------------------------------------------------- */

struct memmap *memmap_new(struct ferry_error *err)
{
	struct memmap *mm = calloc(1, sizeof(*mm));

	if (!mm)
		goto nomem;
	mm->view = view_alloc(NULL, 0);
	if (!mm->view)
		goto nomem;
	/* The root spans [0, 2^64 - 1): UINT64_MAX is the largest size. */
	mm->root = region_new(mm, MEMMAP_CONTAINER, "root", UINT64_MAX, err);
	if (!mm->root) {
		free(mm->view);
		free(mm);
		return NULL;
	}
	pthread_mutex_init(&mm->view_lock, NULL);
	return mm;
nomem:
	free(mm);
	ferry_error_set(err, -ENOMEM, "memory map: out of memory");
	return NULL;
}

void memmap_free(struct memmap *mm)
{
	if (!mm)
		return;
	/* Regions still attached to the root are only detached: their owners
	 * were told to free them first. */
	while (mm->root->children) {
		struct memmap_region *c = mm->root->children;

		mm->root->children = c->next;
		c->next = NULL;
		c->parent = NULL;
	}
	memmap_view_put(mm->view);
	region_unref(mm->root);
	pthread_mutex_destroy(&mm->view_lock);
	free(mm);
}

struct memmap_region *memmap_root(struct memmap *mm)
{
	return mm->root;
}
