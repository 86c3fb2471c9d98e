/*
 * tests/e2e/test-soak.c - the soak of `make soak` (bench/soak.c), cut to 50
 * migrations of a 64M guest (the soak's is 128M): back and forth between
 * two long-lived VMs, multifd off/on, zstd and auto-converge alternating, a
 * fault every 10th (the first 5 of its 8 kinds).
 * The same invariants as the long run: no migration failed that should
 * not have, every fault failed its migration with the source running, 0
 * bad pages, the open fds of both processes never moved after the
 * warm-up, and both quit with status 0 (in an ASan build, after its leak
 * check). RSS is checked too (at most 8 MiB above the warm-up's, twice
 * the long run's tolerance: the first migrations after a short warm-up
 * still settle), except in sanitizer builds, whose allocators keep freed
 * memory on purpose. About 40 s here, 55 s with ASan.
 */
#include "../harness.h"

#include <jansson.h>
#include <unistd.h>

#include "vmproc.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

static const char *soak_bin(void)
{
	const char *e = getenv("FERRY_SOAK"), *f = test_ferry_bin(),
		   *slash = strrchr(f, '/');

	if (e && *e)
		return e;
	if (!slash)
		return "ferry-soak";
	return test_fmt("%.*s/ferry-soak", (int)(slash - f), f);
}

static long long jint(json_t *o, const char *k)
{
	json_t *v = json_object_get(o, k);

	if (!json_is_integer(v))
		FAIL("no integer '%s' in the soak's summary", k);
	return json_integer_value(v);
}

/*
 * The guest dirties its 32 MiB at 200 MB/s. Under ThreadSanitizer a
 * channel carries 35-57 MB/s, less than that, and the migrations without
 * auto-converge never converge (as they should not): there it dirties at
 * 20 MB/s.
 */
#ifdef __SANITIZE_THREAD__
#define SOAK_RATE "20"
#else
#define SOAK_RATE "200"
#endif

TEST(soak_50_migrations)
{
	const char *bin = soak_bin(), *js = test_fmt("%s/soak.json", test_tmpdir());
	json_error_t jerr;
	char *out = NULL;
	json_t *o;
	int st;

	if (access(bin, X_OK))
		FAIL("%s is missing: `make check` builds it", bin);
	/* Warm-up: the first 10 migrations (one of each configuration and a
	 * fault), after which fds must not move at all. */
	st = test_run(&out, "%s --ferry %s -n 50 --every 10 --warmup 10 "
		      "--mem 64M --workload dirty,ws=32M,rate=" SOAK_RATE " "
		      "--rss-tolerance %d --json %s", bin, test_ferry_bin(),
		      slow_build() ? 100000 : 8, js);
	o = json_load_file(js, 0, &jerr);
	if (!o)
		FAIL("no summary from the soak (exit %d):\n%s", st, out);
	if (st != 0 || !json_is_true(json_object_get(o, "pass")))
		FAIL("the soak failed (exit %d):\n%s", st, out);
	ASSERT_EQ(jint(o, "migrations"), 50);
	ASSERT_EQ(jint(o, "completed"), 45);
	ASSERT_EQ(jint(o, "failed-as-intended"), 5);
	ASSERT_EQ(jint(o, "unintended"), 0);
	ASSERT_EQ(jint(o, "bad-pages"), 0);
	ASSERT(json_is_true(json_object_get(o, "fds-steady")));
	ASSERT_EQ(jint(o, "fd-growth"), 0);
	/* Both long-lived VMs quit with status 0 (in an ASan build, after
	 * its leak check). */
	ASSERT(json_is_true(json_object_get(o, "exits-clean")));
	json_decref(o);
	free(out);
}
