/*
 * tests/harness.c - helpers used inside a test's child process.
 * The runner itself (fork, timeout, summary) lives in tests/main.c.
 */
#include "harness.h"

#include <stdarg.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

uint64_t test_seed;
static uint64_t rng_state;
char test_tmpdir_path[256];
int test_timeout_scale = 1;

uint64_t test_rand(void)
{
	/* splitmix64: tiny, good enough, and reproducible from the seed. */
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

void test_rand_reset(uint64_t seed);
void test_rand_reset(uint64_t seed)
{
	rng_state = seed;
}

const char *test_tmpdir(void)
{
	return test_tmpdir_path;
}

const char *test_ferry_bin(void)
{
	const char *b = getenv("FERRY_BIN");
	return b && *b ? b : "build/ferry";
}

const char *test_fmt(const char *fmt, ...)
{
	static char ring[8][4096];
	static unsigned next;
	char *buf = ring[next++ % 8];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(ring[0]), fmt, ap);
	va_end(ap);
	return buf;
}

void test_fail_(const char *file, int line, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "  FAIL %s:%d: ", file, line);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	fflush(NULL);
	_exit(HARNESS_EXIT_FAIL);
}

void test_skip_(const char *reason)
{
	fprintf(stderr, "  SKIP: %s\n", reason);
	fflush(NULL);
	_exit(HARNESS_EXIT_SKIP);
}

int test_run(char **output, const char *fmt, ...)
{
	char cmd[8192];
	size_t cap = 4096, len = 0;
	char *buf;
	FILE *p;
	va_list ap;
	int st;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd) - 8, fmt, ap);
	va_end(ap);
	strcat(cmd, " 2>&1");
	p = popen(cmd, "r");
	if (!p)
		return -1;
	buf = malloc(cap);
	if (!buf)
		FAIL("out of memory");
	for (;;) {
		size_t n;
		if (len + 1024 > cap) {
			cap *= 2;
			buf = realloc(buf, cap);
			if (!buf)
				FAIL("out of memory");
		}
		n = fread(buf + len, 1, cap - len - 1, p);
		if (n == 0)
			break;
		len += n;
	}
	buf[len] = 0;
	st = pclose(p);
	if (output)
		*output = buf;
	else
		free(buf);
	if (st == -1 || !WIFEXITED(st))
		return -1;
	return WEXITSTATUS(st);
}
