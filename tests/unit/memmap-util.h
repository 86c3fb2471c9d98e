/*
 * tests/unit/memmap-util.h - memory-map constructors for unit tests that
 * FAIL the test instead of returning errors. Include after harness.h.
 */
#ifndef FERRY_TEST_MEMMAP_UTIL_H
#define FERRY_TEST_MEMMAP_UTIL_H

#include "memory/memmap.h"

static inline struct memmap *new_map(void)
{
	struct ferry_error err = { 0 };
	struct memmap *mm = memmap_new(&err);

	if (!mm)
		FAIL("memmap_new: %s", err.msg);
	return mm;
}

static inline struct memmap_region *ram(struct memmap *mm, const char *name,
					void *host, uint64_t size)
{
	struct ferry_error err = { 0 };
	struct memmap_region *r = memmap_region_new_ram(mm, name, host, size, &err);

	if (!r)
		FAIL("ram %s: %s", name, err.msg);
	return r;
}

#endif
