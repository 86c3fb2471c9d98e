/*
 * tests/harness.h - ferry's in-tree test runner.
 *
 * Tests are listed explicitly in tests/list.h (X-macro). Each runs in its own
 * child process with a timeout, so a crash or a hang fails one test, not the
 * run. A test function returns normally to pass, calls SKIP(reason) to skip,
 * and any failed ASSERT_* prints both operands with file:line and fails it.
 *
 * Runner flags: --filter SUBSTR, --seed N (printed either way), --list,
 * --timeout SEC, -v. The last line is "N passed, N failed, N skipped".
 */
#ifndef FERRY_TEST_HARNESS_H
#define FERRY_TEST_HARNESS_H

#include <errno.h>
#include <signal.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TEST(name) void test_##name(void)

/* Exit codes of the child process. */
#define HARNESS_EXIT_FAIL 1
#define HARNESS_EXIT_SKIP 77

/* Seed for this run (random unless --seed). Tests use test_rand(). */
extern uint64_t test_seed;
uint64_t test_rand(void);
/* Directory for scratch files, unique per test (removed after it passes). */
const char *test_tmpdir(void);
/* --timeout-scale (at least 1): waits of a test's own scale with it
 * (a sanitizer build starts and runs everything slower). */
extern int test_timeout_scale;
/* Path of the ferry binary (from $FERRY_BIN, or build/ferry). */
const char *test_ferry_bin(void);
/* Printf into a fresh static buffer ring; handy for paths. */
const char *test_fmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

void test_fail_(const char *file, int line, const char *fmt, ...)
	__attribute__((noreturn, format(printf, 3, 4)));
void test_skip_(const char *reason) __attribute__((noreturn));

#define SKIP(reason) test_skip_(reason)
#define FAIL(...) test_fail_(__FILE__, __LINE__, __VA_ARGS__)

#define ASSERT(cond) do { if (!(cond)) FAIL("assertion failed: %s", #cond); } while (0)

#define ASSERT_CMP_(a, op, b, T, fmt) do {				\
	T a_ = (T)(a), b_ = (T)(b);					\
	if (!(a_ op b_))						\
		FAIL("%s %s %s: " fmt " vs " fmt, #a, #op, #b, a_, b_);\
} while (0)
#define ASSERT_EQ(a, b) ASSERT_CMP_(a, ==, b, long long, "%lld")
#define ASSERT_NE(a, b) ASSERT_CMP_(a, !=, b, long long, "%lld")
#define ASSERT_LT(a, b) ASSERT_CMP_(a, <, b, long long, "%lld")
#define ASSERT_LE(a, b) ASSERT_CMP_(a, <=, b, long long, "%lld")
#define ASSERT_GT(a, b) ASSERT_CMP_(a, >, b, long long, "%lld")
#define ASSERT_GE(a, b) ASSERT_CMP_(a, >=, b, long long, "%lld")
#define ASSERT_EQ_U64(a, b) ASSERT_CMP_(a, ==, b, unsigned long long, "%llu")
#define ASSERT_PTR(p) do { if ((p) == NULL) FAIL("%s is NULL", #p); } while (0)
#define ASSERT_NULL(p) do { if ((p) != NULL) FAIL("%s is not NULL", #p); } while (0)

/* ASSERT_OK(expr): expr must return 0 (a -errno is printed with its name).
 * An optional struct ferry_error is printed when the test uses E_ as its
 * error variable, which is what ASSERT_OK_E does. */
#define ASSERT_OK(expr) do {						\
	long r_ = (long)(expr);						\
	if (r_ != 0)							\
		FAIL("%s = %ld (%s)", #expr, r_, strerror((int)-r_));	\
} while (0)
#define ASSERT_OK_E(expr, errobj) do {					\
	long r_ = (long)(expr);						\
	if (r_ != 0)							\
		FAIL("%s = %ld (%s): %s", #expr, r_, strerror((int)-r_), \
		     (errobj).msg);					\
} while (0)
#define ASSERT_ERR(expr, code) do {					\
	long r_ = (long)(expr);						\
	if (r_ != (long)(code))						\
		FAIL("%s = %ld, expected %ld (%s)", #expr, r_,		\
		     (long)(code), strerror((int)-(code)));		\
} while (0)
#define ASSERT_STREQ(a, b) do {						\
	const char *a_ = (a), *b_ = (b);				\
	if (!a_ || !b_ || strcmp(a_, b_))				\
		FAIL("%s == %s: \"%s\" vs \"%s\"", #a, #b,		\
		     a_ ? a_ : "(null)", b_ ? b_ : "(null)");		\
} while (0)
#define ASSERT_CONTAINS(hay, needle) do {				\
	const char *h_ = (hay), *n_ = (needle);				\
	if (!h_ || !strstr(h_, n_))					\
		FAIL("%s does not contain \"%s\": \"%s\"", #hay, n_,	\
		     h_ ? h_ : "(null)");				\
} while (0)
#define ASSERT_MEMEQ(a, b, n) do {					\
	const unsigned char *a_ = (const void *)(a), *b_ = (const void *)(b); \
	size_t n_ = (n), i_;						\
	for (i_ = 0; i_ < n_ && a_[i_] == b_[i_]; i_++)			\
		;							\
	if (i_ != n_)							\
		FAIL("%s and %s differ at byte %zu of %zu: 0x%02x vs 0x%02x", \
		     #a, #b, i_, n_, a_[i_], b_[i_]);			\
} while (0)

/* Run a command line with /bin/sh, capture stdout+stderr (malloc'd, NUL
 * terminated) and return the exit status (or -1). */
int test_run(char **output, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

#endif
