/*
 * tests/e2e/test-example.c - the worked example (examples/mini-vmm.c),
 * built by `make check` as a VMM author would build it: against the
 * installed libferry.so, through pkg-config. It live-migrates itself
 * between two processes and exits 0 only with equal digests and a whole
 * guest on the destination.
 */
#include "../harness.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

static const char *example_bin(void)
{
	const char *bin = getenv("FERRY_EXAMPLE_BIN");

	if (!bin || !*bin)
		SKIP("the example is built by `make check` (FERRY_EXAMPLE_BIN unset)");
	return bin;
}

TEST(example_mini_vmm_migrates)
{
	char *out = NULL;
	int st = test_run(&out, "%s", example_bin());

	if (st != 0)
		FAIL("mini-vmm exited %d:\n%s", st, out);
	ASSERT_CONTAINS(out, "digests equal: yes");
	ASSERT_CONTAINS(out, "bad pages on the destination: 0");
	free(out);
	st = test_run(&out, "%s --mem 128 --ws 64 --channels 4", example_bin());
	if (st != 0)
		FAIL("mini-vmm --channels 4 exited %d:\n%s", st, out);
	free(out);
}

/* It is linked against the shared library, whose soname is the ABI. */
TEST(example_links_libferry_so_1)
{
	char *out = NULL;
	int st = test_run(&out, "ldd %s", example_bin());

	ASSERT_EQ(st, 0);
	ASSERT_CONTAINS(out, "libferry.so.1 => ");
	free(out);
}
