/*
 * tests/unit/test-cli.c - the ferry command: inspect and vmstate-schema,
 * run as a user would run them.
 */
#include "../harness.h"

#include <fcntl.h>
#include <jansson.h>
#include <unistd.h>

#include "ferry/ferry.h"
#include "testdev.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

static const char *save_file(uint64_t seed, size_t *len, uint8_t **data)
{
	const char *path = test_fmt("%s/vm.img", test_tmpdir());
	struct testvm src;
	uint8_t *d;
	size_t n;
	FILE *f;

	testvm_init(&src, true, seed);
	d = testvm_save(&src, &n);
	f = fopen(path, "wb");
	ASSERT_PTR(f);
	ASSERT_EQ(fwrite(d, 1, n, f), n);
	fclose(f);
	testvm_free(&src);
	if (len)
		*len = n;
	if (data)
		*data = d;
	else
		free(d);
	return path;
}

static void need_ferry(void)
{
	if (access(test_ferry_bin(), X_OK))
		FAIL("ferry binary not found at %s", test_ferry_bin());
}

TEST(cli_inspect_shows_every_section)
{
	const char *path;
	char *out;

	need_ferry();
	path = save_file(21, NULL, NULL);
	ASSERT_EQ(test_run(&out, "%s inspect %s", test_ferry_bin(), path), 0);
	ASSERT_CONTAINS(out, "format version 2");
	ASSERT_CONTAINS(out, "SECTION_START");
	ASSERT_CONTAINS(out, "'tram' instance 0 (id 1) version 1");
	ASSERT_CONTAINS(out, "SECTION_PART");
	ASSERT_CONTAINS(out, "SECTION_END");
	ASSERT_CONTAINS(out, "'tregs' instance 0 (id 2)");
	ASSERT_CONTAINS(out, "SWITCHOVER_START");
	ASSERT_CONTAINS(out, "'tblob' instance 0 buffer 4");
	ASSERT_CONTAINS(out, "VMDESC");
	ASSERT_CONTAINS(out, "every check verified");
	ASSERT_CONTAINS(out, "tram/0 version 1 (iterable)");
	free(out);
}

TEST(cli_inspect_json)
{
	json_error_t je;
	json_t *root, *recs, *last;
	const char *path;
	char *out;

	need_ferry();
	path = save_file(22, NULL, NULL);
	ASSERT_EQ(test_run(&out, "%s inspect --json %s", test_ferry_bin(), path), 0);
	root = json_loads(out, 0, &je);
	if (!root)
		FAIL("not JSON (%s): %s", je.text, out);
	ASSERT(json_is_true(json_object_get(root, "ok")));
	recs = json_object_get(root, "records");
	ASSERT_GT(json_array_size(recs), 5);
	last = json_array_get(recs, json_array_size(recs) - 1);
	ASSERT_STREQ(json_string_value(json_object_get(last, "type")), "EOF");
	ASSERT_EQ(json_array_size(json_object_get(json_object_get(root, "description"),
						  "devices")), 3);
	json_decref(root);
	free(out);
}

/* Damage inside the tram PART section: exit 1, offset and section named. */
TEST(cli_inspect_damaged)
{
	const char *path;
	uint8_t *d;
	size_t n;
	char *out;
	int fd;
	size_t at;

	need_ferry();
	path = save_file(23, &n, &d);
	/* First PART record: after the header and the START record. */
	{
		size_t start_len = (size_t)d[17] << 24 | (size_t)d[18] << 16 |
				   (size_t)d[19] << 8 | d[20];
		at = 16 + FERRY_RECORD_OVERHEAD + start_len + 5 + 4 + 100;
	}
	fd = open(path, O_WRONLY);
	ASSERT_GE(fd, 0);
	d[at] ^= 0x10;
	ASSERT_EQ(pwrite(fd, d + at, 1, (off_t)at), 1);
	close(fd);
	ASSERT_EQ(test_run(&out, "%s inspect %s", test_ferry_bin(), path), 1);
	ASSERT_CONTAINS(out, "section 'tram/0'");
	ASSERT_CONTAINS(out, "fails its check");
	ASSERT_CONTAINS(out, test_fmt("offset %zu", 16 + FERRY_RECORD_OVERHEAD +
				      ((size_t)d[17] << 24 | (size_t)d[18] << 16 |
				       (size_t)d[19] << 8 | d[20])));
	free(out);

	/* Undamaged but truncated: also exit 1 with the place named. */
	d[at] ^= 0x10;
	fd = open(path, O_WRONLY);
	ASSERT_EQ(pwrite(fd, d + at, 1, (off_t)at), 1);
	close(fd);
	ASSERT_OK(truncate(path, (off_t)(n - 30)));
	ASSERT_EQ(test_run(&out, "%s inspect %s", test_ferry_bin(), path), 1);
	ASSERT_CONTAINS(out, "truncated");
	ASSERT_CONTAINS(out, "offset");
	free(out);
	free(d);
}

TEST(cli_vmstate_schema)
{
	json_error_t je;
	json_t *root, *devs, *serial;
	char *out;

	need_ferry();
	ASSERT_EQ(test_run(&out, "%s vmstate-schema 2>/dev/null", test_ferry_bin()), 0);
	root = json_loads(out, 0, &je);
	if (!root)
		FAIL("not JSON (%s): %s", je.text, out);
	devs = json_object_get(root, "devices");
	ASSERT_EQ(json_array_size(devs), 5);
	ASSERT_STREQ(json_string_value(json_object_get(json_array_get(devs, 0), "name")),
		     "cpu-kvm");
	serial = json_array_get(devs, 2);
	ASSERT_STREQ(json_string_value(json_object_get(serial, "name")), "serial");
	ASSERT_PTR(json_object_get(json_object_get(serial, "vmstate"), "fields"));
	ASSERT_STREQ(json_string_value(json_object_get(json_array_get(devs, 4), "name")),
		     "virtio");
	json_decref(root);
	free(out);
}

TEST(cli_unknown_command)
{
	char *out;

	need_ferry();
	ASSERT_EQ(test_run(&out, "%s frobnicate", test_ferry_bin()), 2);
	ASSERT_CONTAINS(out, "unknown command 'frobnicate'");
	free(out);
	ASSERT_EQ(test_run(&out, "%s inspect /nonexistent/x", test_ferry_bin()), 1);
	ASSERT_CONTAINS(out, "cannot open /nonexistent/x");
	free(out);
}
