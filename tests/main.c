/*
 * tests/main.c - the test runner: explicit list, one child per test with a
 * timeout, --filter/--seed/--list/--timeout/-v, closing summary line.
 */
#include "harness.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define X(name, timeout) TEST(name);
#include "list.h"
#undef X

struct test_entry {
	const char *name;
	void (*fn)(void);
	int timeout; /* seconds */
};

static const struct test_entry tests[] = {
#define X(name, timeout) { #name, test_##name, timeout },
#include "list.h"
#undef X
};

extern char test_tmpdir_path[256];
void test_rand_reset(uint64_t seed);

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void rm_rf(const char *path)
{
	char cmd[600];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", path);
	if (system(cmd) != 0)
		fprintf(stderr, "warning: could not remove %s\n", path);
}

/* Returns 0 pass, 1 fail, 2 skip. */
static int run_one(const struct test_entry *t, int timeout_scale, bool verbose)
{
	double t0 = now_s();
	int timeout = t->timeout * timeout_scale;
	int status = 0, res;
	pid_t pid, w;

	snprintf(test_tmpdir_path, sizeof(test_tmpdir_path),
		 "/tmp/ferry-test-%d-%s", (int)getpid(), t->name);
	rm_rf(test_tmpdir_path);
	if (mkdir(test_tmpdir_path, 0700)) {
		perror("mkdir");
		return 1;
	}
	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		perror("fork");
		return 1;
	}
	if (pid == 0) {
		/* Own process group, so a timeout kills helpers too. */
		setpgid(0, 0);
		/* Each test draws its own stream from the seed and its name,
		 * so --filter reproduces the same values as a full run. */
		uint64_t h = test_seed;
		for (const char *p = t->name; *p; p++)
			h = (h ^ (uint8_t)*p) * 0x100000001b3ull;
		test_rand_reset(h);
		t->fn();
		fflush(NULL);
		_exit(0);
	}
	setpgid(pid, pid);
	for (;;) {
		w = waitpid(pid, &status, WNOHANG);
		if (w == pid)
			break;
		if (now_s() - t0 > timeout) {
			kill(-pid, SIGKILL);
			kill(pid, SIGKILL);
			waitpid(pid, &status, 0);
			fprintf(stderr, "  FAIL: timed out after %d s\n", timeout);
			status = -1;
			break;
		}
		usleep(2000);
	}
	/* Reap anything the test left in its process group. */
	kill(-pid, SIGKILL);

	if (status == -1)
		res = 1;
	else if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		res = 0;
	else if (WIFEXITED(status) && WEXITSTATUS(status) == HARNESS_EXIT_SKIP)
		res = 2;
	else {
		if (WIFSIGNALED(status))
			fprintf(stderr, "  FAIL: killed by signal %d (%s)\n",
				WTERMSIG(status), strsignal(WTERMSIG(status)));
		res = 1;
	}
	if (res != 1)
		rm_rf(test_tmpdir_path);
	else
		fprintf(stderr, "  (scratch files kept in %s)\n", test_tmpdir_path);
	printf("%-4s %-44s %7.2fs\n", res == 0 ? "ok" : res == 1 ? "FAIL" : "skip",
	       t->name, now_s() - t0);
	(void)verbose;
	fflush(stdout);
	return res;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: ferry-test [--filter SUBSTR] [--seed N] [--list] "
		"[--timeout-scale N] [-v]\n");
}

int main(int argc, char **argv)
{
	const char *filter = NULL;
	bool list = false, verbose = false, seeded = false;
	int scale = 1, passed = 0, failed = 0, skipped = 0;
	size_t i;

	for (int a = 1; a < argc; a++) {
		if (!strcmp(argv[a], "--filter") && a + 1 < argc)
			filter = argv[++a];
		else if (!strcmp(argv[a], "--seed") && a + 1 < argc) {
			test_seed = strtoull(argv[++a], NULL, 0);
			seeded = true;
		} else if (!strcmp(argv[a], "--list"))
			list = true;
		else if (!strcmp(argv[a], "--timeout-scale") && a + 1 < argc)
			scale = atoi(argv[++a]);
		else if (!strcmp(argv[a], "-v"))
			verbose = true;
		else {
			usage();
			return 2;
		}
	}
	if (scale < 1)
		scale = 1;
	test_timeout_scale = scale;
	if (!seeded) {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		test_seed = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^
			    (uint64_t)getpid();
	}
	if (list) {
		for (i = 0; i < sizeof(tests) / sizeof(tests[0]); i++)
			printf("%s\n", tests[i].name);
		return 0;
	}
	signal(SIGPIPE, SIG_IGN);
	printf("seed %llu (rerun with --seed %llu)\n",
	       (unsigned long long)test_seed, (unsigned long long)test_seed);
	for (i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
		if (filter && !strstr(tests[i].name, filter))
			continue;
		switch (run_one(&tests[i], scale, verbose)) {
		case 0: passed++; break;
		case 1: failed++; break;
		default: skipped++; break;
		}
	}
	printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
	return failed ? 1 : 0;
}
