// SPDX-License-Identifier: MIT
/*
 * vmm/threads/dirty-uffd.c - dirty tracking with async userfaultfd
 * write-protection and PAGEMAP_SCAN.  See dirty-uffd.h for the model.
 *
 * Kernel details this relies on (Linux >= 6.7):
 *   - UFFD_FEATURE_WP_ASYNC: a write to a uffd-wp protected page is
 *     resolved inside the fault handler by clearing the PTE's uffd-wp bit;
 *     no message is queued, nobody has to read the userfaultfd.  It implies
 *     WP_UNPOPULATED: write-protecting a never-touched page installs a PTE
 *     marker, so its first write is tracked like any other.
 *   - PAGEMAP_SCAN reports PAGE_IS_WRITTEN for a page whose PTE lacks the
 *     uffd-wp bit, and with PM_SCAN_WP_MATCHING sets the bit again on every
 *     page it reports, in the same page-table walk under the PTE lock.
 *     PM_SCAN_CHECK_WPASYNC makes it fail (-EPERM) rather than silently
 *     report nothing for a range not registered in async wp mode.
 * Shared memory (shmem, memfd) needs UFFD_FEATURE_WP_HUGETLBFS_SHMEM too.
 *
 * The system headers may predate these; the ABI constants are defined here
 * when missing (values from the kernel's uapi headers).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "threads/dirty-uffd.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <linux/fs.h>
#include <linux/userfaultfd.h>

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY		1
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM	(1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED	(1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC		(1 << 15)
#endif

#ifndef PAGEMAP_SCAN
struct page_region {
	uint64_t start;
	uint64_t end;
	uint64_t categories;
};

struct pm_scan_arg {
	uint64_t size;
	uint64_t flags;
	uint64_t start;
	uint64_t end;
	uint64_t walk_end;
	uint64_t vec;
	uint64_t vec_len;
	uint64_t max_pages;
	uint64_t category_inverted;
	uint64_t category_mask;
	uint64_t category_anyof_mask;
	uint64_t return_mask;
};

#define PAGEMAP_SCAN		_IOWR('f', 16, struct pm_scan_arg)
#define PM_SCAN_WP_MATCHING	(1 << 0)
#define PM_SCAN_CHECK_WPASYNC	(1 << 1)
#define PAGE_IS_WPALLOWED	(1 << 0)
#define PAGE_IS_WRITTEN		(1 << 1)
#define PAGE_IS_FILE		(1 << 2)
#define PAGE_IS_PRESENT		(1 << 3)
#define PAGE_IS_SWAPPED		(1 << 4)
#define PAGE_IS_PFNZERO		(1 << 5)
#endif

#ifndef SCHED_RESET_ON_FORK
#define SCHED_RESET_ON_FORK	0x40000000
#endif

#define PAGE_SIZE_	4096ULL
#define SCAN_VEC_LEN	512	/* regions per PAGEMAP_SCAN call */
#define SPLIT_MIN	(1ULL << 30)	/* sync ranges this large in two halves */

/* Everything belongs to the one thread using the handle (see the header). */
struct uffd_dirty {
	int uffd;		/* userfaultfd, registered over the range */
	int pagemap_fd;		/* /proc/self/pagemap, for PAGEMAP_SCAN */
	uintptr_t base;
	size_t len;
	bool started;
	bool registered;	/* the range, with uffd (uffd_dirty_release) */
	struct page_region vec[SCAN_VEC_LEN];
};

/* Set bits [first, first + n) of bitmap. */
static void set_bits(uint64_t *bitmap, uint64_t first, uint64_t n)
{
	while (n) {
		uint64_t bit = first % 64;
		uint64_t take = 64 - bit < n ? 64 - bit : n;
		uint64_t mask = take == 64 ? ~0ULL : ((1ULL << take) - 1) << bit;

		bitmap[first / 64] |= mask;
		first += take;
		n -= take;
	}
}

/*
 * One PAGEMAP_SCAN pass over [start, end): set the bitmap bits of every
 * reported page (bit 0 = page at base).  The kernel stops early when vec
 * fills up and says where in walk_end; go on from there.
 */
static int scan(int pagemap_fd, struct page_region *vec, size_t vec_len,
		uintptr_t base, uintptr_t start, uintptr_t end,
		uint64_t flags, uint64_t mask, uint64_t inverted,
		uint64_t anyof, uint64_t *bitmap)
{
	while (start < end) {
		struct pm_scan_arg arg = {
			.size = sizeof(arg),
			.flags = flags,
			.start = start,
			.end = end,
			.vec = (uintptr_t)vec,
			.vec_len = vec_len,
			.category_inverted = inverted,
			.category_mask = mask,
			.category_anyof_mask = anyof,
			.return_mask = mask | anyof,
		};
		long n, i;

		n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
		if (n < 0)
			return -errno;
		for (i = 0; i < n; i++)
			set_bits(bitmap, (vec[i].start - base) / PAGE_SIZE_,
				 (vec[i].end - vec[i].start) / PAGE_SIZE_);
		if (arg.walk_end <= start)	/* no progress: kernel bug */
			return -EIO;
		start = (uintptr_t)arg.walk_end;
	}
	return 0;
}

/* ---- uffd dirty tracking -------------------------------------------- */

static int open_uffd(struct ferry_error *err)
{
	int fd;

	/*
	 * User-mode-only faults are all we need: async wp faults are resolved
	 * before the kernel looks at who faulted.  It also keeps working when
	 * vm.unprivileged_userfaultfd is 0.  Kernels before 5.11 lack the flag.
	 */
	fd = (int)syscall(SYS_userfaultfd,
			  O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
	if (fd < 0 && errno == EINVAL)
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd >= 0)
		return fd;
	if (errno == ENOSYS)
		return ferry_error_set(err, -EOPNOTSUPP,
				       "userfaultfd: not built into this kernel");
	if (errno == EPERM)
		return ferry_error_set(err, -EPERM, "userfaultfd: not permitted "
				       "(vm.unprivileged_userfaultfd = 0?)");
	return ferry_error_set(err, -errno, "userfaultfd: %s", strerror(errno));
}

/* Which of the features we care about this kernel offers. */
static int probe_features(uint64_t *features, struct ferry_error *err)
{
	struct uffdio_api api = { .api = UFFD_API, .features = 0 };
	int fd = open_uffd(err), r = 0;

	if (fd < 0)
		return fd;
	/* Asking for no feature makes the kernel report all it has. */
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		r = ferry_error_set(err, -errno, "UFFDIO_API: %s",
				    strerror(errno));
	else
		*features = api.features;
	close(fd);
	return r;
}

/* Register the range for async write-protect tracking (at create, and
 * again at a start after uffd_dirty_release). */
static int register_wp(struct uffd_dirty *d, struct ferry_error *err)
{
	struct uffdio_register reg = {
		.range = { .start = d->base, .len = d->len },
		.mode = UFFDIO_REGISTER_MODE_WP,
	};
	int r;

	if (ioctl(d->uffd, UFFDIO_REGISTER, &reg) < 0) {
		r = -errno;
		if (r == -EINVAL)
			return ferry_error_set(err, -EOPNOTSUPP, "uffd dirty "
					       "tracking: cannot write-protect "
					       "%#" PRIxPTR "+%#zx (only anonymous, "
					       "shmem and memfd memory; shmem needs "
					       "WP_HUGETLBFS_SHMEM)", d->base, d->len);
		return ferry_error_set(err, r, "UFFDIO_REGISTER(wp, %#" PRIxPTR
				       "+%#zx): %s", d->base, d->len,
				       strerror(-r));
	}
	if (!(reg.ioctls & (1ULL << _UFFDIO_WRITEPROTECT))) {
		ioctl(d->uffd, UFFDIO_UNREGISTER, &reg.range);
		return ferry_error_set(err, -EOPNOTSUPP, "uffd dirty tracking: "
				       "UFFDIO_WRITEPROTECT not offered for this "
				       "memory");
	}
	d->registered = true;
	return 0;
}

int uffd_dirty_create(struct uffd_dirty **out, void *base, size_t len,
		      struct ferry_error *err)
{
	uint64_t have = 0, want;
	struct uffdio_api api = { .api = UFFD_API };
	struct uffd_dirty *d;
	int r;

	*out = NULL;
	if (!len || ((uintptr_t)base | len) & (PAGE_SIZE_ - 1))
		return ferry_error_set(err, -EINVAL, "uffd dirty tracking: "
				       "range %p+%#zx not page aligned", base, len);

	r = probe_features(&have, err);
	if (r)
		return r;
	if (!(have & UFFD_FEATURE_WP_ASYNC))
		return ferry_error_set(err, -EOPNOTSUPP, "uffd dirty tracking: "
				       "kernel lacks UFFD_FEATURE_WP_ASYNC "
				       "(needs Linux >= 6.7; features %#" PRIx64
				       ")", have);
	want = UFFD_FEATURE_WP_ASYNC;
	/* Both are optional: WP_ASYNC implies WP_UNPOPULATED; shmem needs
	 * the second, and registering shmem fails cleanly without it. */
	want |= have & (UFFD_FEATURE_WP_UNPOPULATED |
			UFFD_FEATURE_WP_HUGETLBFS_SHMEM);

	d = calloc(1, sizeof(*d));
	if (!d)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	d->base = (uintptr_t)base;
	d->len = len;
	d->pagemap_fd = -1;

	d->uffd = open_uffd(err);
	if (d->uffd < 0) {
		r = d->uffd;
		goto fail;
	}
	api.features = want;
	if (ioctl(d->uffd, UFFDIO_API, &api) < 0) {
		r = ferry_error_set(err, -errno, "UFFDIO_API(features %#" PRIx64
				    "): %s", want, strerror(errno));
		goto fail;
	}
	if ((r = register_wp(d, err)))
		goto fail;
	d->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (d->pagemap_fd < 0) {
		r = ferry_error_set(err, -errno, "open /proc/self/pagemap: %s",
				    strerror(errno));
		goto fail_unreg;
	}
	/*
	 * Probe PAGEMAP_SCAN with the flags sync uses, but no WP_MATCHING and
	 * room for one region: it fails with ENOTTY (or EINVAL) on kernels
	 * without it, and with EPERM if the range is not async-wp registered.
	 */
	{
		struct pm_scan_arg arg = {
			.size = sizeof(arg),
			.flags = PM_SCAN_CHECK_WPASYNC,
			.start = d->base,
			.end = d->base + len,
			.vec = (uintptr_t)d->vec,
			.vec_len = 1,
			.max_pages = 1,
			.category_mask = PAGE_IS_WRITTEN,
			.return_mask = PAGE_IS_WRITTEN,
		};

		if (ioctl(d->pagemap_fd, PAGEMAP_SCAN, &arg) < 0) {
			r = -errno;
			if (r == -ENOTTY || r == -EINVAL)
				r = ferry_error_set(err, -EOPNOTSUPP, "uffd dirty "
						    "tracking: kernel lacks "
						    "PAGEMAP_SCAN (Linux >= 6.7)");
			else
				r = ferry_error_set(err, r, "PAGEMAP_SCAN probe: "
						    "%s", strerror(-r));
			goto fail_unreg;
		}
	}

	*out = d;
	return 0;

fail_unreg:
	uffd_dirty_release(d);
fail:
	if (d->pagemap_fd >= 0)
		close(d->pagemap_fd);
	if (d->uffd >= 0)
		close(d->uffd);
	free(d);
	return r;
}

/* Protect the whole range (removing it is left to the next write, or to
 * the unregister: uffd_dirty_stop). */
static int protect_all(struct uffd_dirty *d, struct ferry_error *err)
{
	struct uffdio_writeprotect wp = {
		.range = { .start = d->base, .len = d->len },
		.mode = UFFDIO_WRITEPROTECT_MODE_WP,
	};

	if (ioctl(d->uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
		return ferry_error_set(err, -errno, "UFFDIO_WRITEPROTECT: %s",
				       strerror(errno));
	return 0;
}

int uffd_dirty_start(struct uffd_dirty *d, struct ferry_error *err)
{
	int r;

	if (!d->registered && (r = register_wp(d, err)))
		return r;
	r = protect_all(d, err);
	if (!r)
		d->started = true;
	return r;
}

/* The second half of a split sync, on a thread of its own. */
struct half {
	struct uffd_dirty *d;
	uintptr_t start, end;
	bool rearm;
	uint64_t *bitmap;
	struct page_region vec[SCAN_VEC_LEN];
	int r;
};

/* @rearm: write-protect the pages reported, in the same walk. */
static int scan_written(struct uffd_dirty *d, struct page_region *vec,
			uintptr_t start, uintptr_t end, bool rearm,
			uint64_t *bitmap)
{
	return scan(d->pagemap_fd, vec, SCAN_VEC_LEN, d->base, start, end,
		    (rearm ? PM_SCAN_WP_MATCHING : 0) | PM_SCAN_CHECK_WPASYNC,
		    PAGE_IS_WRITTEN, 0, 0, bitmap);
}

static void *half_main(void *arg)
{
	struct half *h = arg;

	h->r = scan_written(h->d, h->vec, h->start, h->end, h->rearm,
			    h->bitmap);
	return NULL;
}

/*
 * The helper walks at its caller's real-time policy, if it has one:
 * libferry raises the thread that runs a postcopy switch (SCHED_FIFO, with
 * SCHED_RESET_ON_FORK so that nothing it starts inherits it), and half of
 * the switch's walk on a thread the fair scheduler may keep waiting would
 * undo that. Asked for explicitly; the default, inheriting, gives
 * SCHED_OTHER there. (A caller only reniced - the fallback without
 * CAP_SYS_NICE - gets a helper at nice 0.)
 */
static int spawn_like_me(pthread_t *th, struct half *h)
{
	struct sched_param sp;
	pthread_attr_t a;
	int policy = sched_getscheduler(0), r;

	if (policy < 0 || sched_getparam(0, &sp) ||
	    (policy & ~SCHED_RESET_ON_FORK) == SCHED_OTHER)
		return pthread_create(th, NULL, half_main, h);
	pthread_attr_init(&a);
	pthread_attr_setinheritsched(&a, PTHREAD_EXPLICIT_SCHED);
	pthread_attr_setschedpolicy(&a, policy & ~SCHED_RESET_ON_FORK);
	pthread_attr_setschedparam(&a, &sp);
	r = pthread_create(th, &a, half_main, h);
	pthread_attr_destroy(&a);
	/* Not allowed after all: at the default priority. */
	return r == EPERM ? pthread_create(th, NULL, half_main, h) : r;
}

static int sync_written(struct uffd_dirty *d, uint64_t *bitmap, bool rearm,
			struct ferry_error *err)
{
	uintptr_t mid = d->base + d->len / 2;
	struct half *h = NULL;
	pthread_t th;
	int r;

	if (!d->started)
		return ferry_error_set(err, -EINVAL,
				       "uffd dirty tracking not started");
	/*
	 * A large range is walked by two threads, one half each: the walk
	 * of the page tables is the whole cost (4 GiB: 3-5 ms here, most of
	 * a postcopy switch's downtime), and the kernel walks disjoint
	 * ranges of one mm in parallel (both hold mmap_lock for reading,
	 * each its own PTE locks). The halves meet at a multiple of 64 pages
	 * so they never set bits in the same bitmap word.
	 */
	mid -= (mid - d->base) % (64 * PAGE_SIZE_);
	if (d->len >= SPLIT_MIN && (h = malloc(sizeof(*h)))) {
		*h = (struct half){ .d = d, .start = mid, .end = d->base + d->len,
				    .rearm = rearm, .bitmap = bitmap };
		if (spawn_like_me(&th, h)) {
			free(h);
			h = NULL;
		}
	}
	r = scan_written(d, d->vec, d->base, h ? mid : d->base + d->len, rearm,
			 bitmap);
	if (h) {
		pthread_join(th, NULL);
		if (!r)
			r = h->r;
		free(h);
	}
	if (r)
		return ferry_error_set(err, r, "PAGEMAP_SCAN(written%s): %s",
				       rearm ? ", re-protect" : "", strerror(-r));
	return 0;
}

int uffd_dirty_sync(struct uffd_dirty *d, uint64_t *bitmap,
		    struct ferry_error *err)
{
	return sync_written(d, bitmap, true, err);
}

int uffd_dirty_sync_final(struct uffd_dirty *d, uint64_t *bitmap,
			  struct ferry_error *err)
{
	return sync_written(d, bitmap, false, err);
}

/*
 * Tracking ends; the protection stays. Removing it is slow (a 1 GiB guest:
 * 0.2 s here, clearing every never-touched page's marker; a thread doing
 * it in the background starves the migration's teardown of CPU and of
 * mmap_lock), and nothing needs it: in async mode the kernel resolves a
 * protected page's write itself, so each page costs at most one minor
 * fault, on its first write (KVM too leaves the entries it protected for
 * dirty logging to the next write fault). A start protects
 * everything again; unregistering drops what is left.
 */
int uffd_dirty_stop(struct uffd_dirty *d, struct ferry_error *err)
{
	(void)err;
	d->started = false;
	return 0;
}

void uffd_dirty_release(struct uffd_dirty *d)
{
	struct uffdio_range range = { .start = d->base, .len = d->len };

	/* Unregistering also drops the protection left behind (walking
	 * the whole range: slow). */
	d->started = false;
	if (d->registered && !ioctl(d->uffd, UFFDIO_UNREGISTER, &range))
		d->registered = false;
}

void uffd_dirty_destroy(struct uffd_dirty *d)
{
	if (!d)
		return;
	uffd_dirty_release(d);
	close(d->uffd);
	close(d->pagemap_fd);
	free(d);
}

/* ---- populated pages ------------------------------------------------ */

/*
 * For every part of [start, end) that is not private anonymous memory
 * (shared, or backed by a file), set all its bits: page tables cannot tell
 * which of those pages hold data.  Parts not mapped at all are -EFAULT.
 */
static int mark_non_anon(uintptr_t start, uintptr_t end, uint64_t *bitmap,
			 struct ferry_error *err)
{
	FILE *f = fopen("/proc/self/maps", "re");
	uintptr_t covered = start;
	char line[512];
	int r = 0;

	if (!f)
		return ferry_error_set(err, -errno, "open /proc/self/maps: %s",
				       strerror(errno));
	while (fgets(line, sizeof(line), f)) {
		unsigned long long lo, hi, ino;
		char perms[8];
		uintptr_t a, b;
		int n;

		n = sscanf(line, "%llx-%llx %7s %*s %*s %llu", &lo, &hi, perms,
			   &ino);
		/* A line longer than the buffer: skip its remainder. */
		if (!strchr(line, '\n')) {
			int ch;

			while ((ch = fgetc(f)) != EOF && ch != '\n')
				;
		}
		if (n != 4 || hi <= start || lo >= end)
			continue;
		a = lo > start ? (uintptr_t)lo : start;
		b = hi < end ? (uintptr_t)hi : end;
		if (a > covered)
			break;	/* a gap: reported below */
		covered = b;
		if (perms[3] != 'p' || ino != 0)
			set_bits(bitmap, (a - start) / PAGE_SIZE_,
				 (b - a) / PAGE_SIZE_);
		if (covered >= end)
			break;
	}
	fclose(f);
	if (covered < end)
		r = ferry_error_set(err, -EFAULT, "mem_present_pages: %#lx is "
				    "not mapped", (unsigned long)covered);
	return r;
}

/* Fallback for kernels without PAGEMAP_SCAN: one 64-bit entry per page. */
static int present_from_pagemap(int fd, uintptr_t base, size_t len,
				uint64_t *bitmap, struct ferry_error *err)
{
	enum { CHUNK = 4096 };
	uint64_t *ent = malloc(CHUNK * sizeof(*ent));
	uint64_t npages = len / PAGE_SIZE_, i = 0;
	int r = 0;

	if (!ent)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	while (i < npages) {
		size_t want = npages - i < CHUNK ? (size_t)(npages - i) : CHUNK;
		off_t off = (off_t)((base / PAGE_SIZE_ + i) * sizeof(*ent));
		ssize_t got = pread(fd, ent, want * sizeof(*ent), off);
		size_t j;

		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0 || got % (ssize_t)sizeof(*ent)) {
			r = ferry_error_set(err, got < 0 ? -errno : -EIO,
					    "read /proc/self/pagemap: %s",
					    got < 0 ? strerror(errno) : "short");
			break;
		}
		for (j = 0; j < (size_t)got / sizeof(*ent); j++)
			if (ent[j] >> 62)	/* bit 63 present, 62 swapped */
				bitmap[(i + j) / 64] |= 1ULL << ((i + j) % 64);
		i += (uint64_t)got / sizeof(*ent);
	}
	free(ent);
	return r;
}

/* Is any swap device active? /proc/swaps has a header line, then one line
 * per device. Unknown (unreadable) counts as yes: the safe answer. */
static bool swap_configured(void)
{
	FILE *f = fopen("/proc/swaps", "re");
	char line[512];
	int lines = 0;

	if (!f)
		return true;
	while (fgets(line, sizeof(line), f))
		lines++;
	fclose(f);
	return lines > 1;
}

int mem_present_pages(void *base, size_t len, uint64_t *bitmap,
		      struct ferry_error *err)
{
	struct page_region *vec;
	uintptr_t b = (uintptr_t)base;
	int fd, r;

	if (((uintptr_t)base | len) & (PAGE_SIZE_ - 1))
		return ferry_error_set(err, -EINVAL, "mem_present_pages: range "
				       "%p+%#zx not page aligned", base, len);
	if (!len)
		return 0;

	fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return ferry_error_set(err, -errno, "open /proc/self/pagemap: %s",
				       strerror(errno));
	vec = malloc(SCAN_VEC_LEN * sizeof(*vec));
	if (!vec) {
		close(fd);
		return ferry_error_set(err, -ENOMEM, "out of memory");
	}
	/*
	 * Present or swapped, and not mapping the shared zero page (a page
	 * only ever read): the inverted PFNZERO bit must be set. With no swap
	 * device configured a swap-like entry can only be a uffd-wp marker on
	 * a never-touched page, so only present pages count: the map stays
	 * sparse even while dirty tracking is on.
	 */
	r = scan(fd, vec, SCAN_VEC_LEN, b, b, b + len, 0, PAGE_IS_PFNZERO,
		 PAGE_IS_PFNZERO,
		 swap_configured() ? PAGE_IS_PRESENT | PAGE_IS_SWAPPED
				   : PAGE_IS_PRESENT, bitmap);
	if (r == -ENOTTY || r == -EINVAL)
		r = present_from_pagemap(fd, b, len, bitmap, err);
	else if (r)
		r = ferry_error_set(err, r, "PAGEMAP_SCAN(present): %s",
				    strerror(-r));
	free(vec);
	close(fd);
	if (!r)
		r = mark_non_anon(b, b + len, bitmap, err);
	return r;
}
