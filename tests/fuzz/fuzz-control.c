/*
 * tests/fuzz/fuzz-control.c - libFuzzer target for the control socket's
 * protocol parser (vmm/control/server.c): the input scanner that frames
 * requests, the recovery after garbage, the JSON parse, the request checks
 * and the dispatch to handlers, driven through control_feed() - one
 * client's bytes in, what it would be sent out, no socket, no thread.
 *
 * Besides the sanitizers, two oracles:
 *   - everything sent back is compact JSON, one object per line, each a
 *     reply: {"return": ...} or {"error": {"class", "desc"}}, with at most
 *     an "id" beside it, and a known error class;
 *   - the replies do not depend on how the bytes were split into reads:
 *     all at once, one byte at a time, and in pieces of a size the input
 *     picks (its first byte) give the same output.
 *
 * Build and run: `make fuzz` (long) or the short smoke run in `make check`
 * (test control_fuzz_smoke). Seeds: tests/fuzz/seeds-control/.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "control/control.h"
#include "../control-cmds.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct control *srv;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	char dir[] = "/tmp/ferry-fuzz-control-XXXXXX", path[64];
	struct ferry_error err = { 0 };

	(void)argc;
	(void)argv;
	if (!mkdtemp(dir))
		abort();
	snprintf(path, sizeof(path), "%s/c.sock", dir);
	srv = control_create(path, &err);
	if (!srv) {
		fprintf(stderr, "control_create: %s\n", err.msg);
		abort();
	}
	/* The listening socket stays open, unused; its path need not. */
	unlink(path);
	rmdir(dir);
	if (control_register(srv, "echo", cmd_echo, NULL) ||
	    control_register(srv, "fail", cmd_fail, NULL) ||
	    control_register(srv, "add", cmd_add, NULL))
		abort();
	return 0;
}

static void check_replies(const char *out, size_t len)
{
	size_t off = 0;

	if (len && out[len - 1] != '\n') {
		fprintf(stderr, "output does not end with a newline\n");
		abort();
	}
	while (off < len) {
		const char *nl = memchr(out + off, '\n', len - off);
		size_t l = (size_t)(nl - (out + off));
		json_error_t je;
		json_t *m = json_loadb(out + off, l, 0, &je), *e, *v;
		const char *key, *cls;
		int kinds = 0;

		if (!json_is_object(m)) {
			fprintf(stderr, "reply line is not a JSON object (%s): "
				"%.*s\n", je.text, (int)l, out + off);
			abort();
		}
		json_object_foreach(m, key, v) {
			if (!strcmp(key, "return")) {
				kinds++;
			} else if (!strcmp(key, "error")) {
				kinds++;
				e = v;
				cls = json_string_value(json_object_get(e, "class"));
				if (!cls || !json_is_string(json_object_get(e, "desc")) ||
				    (strcmp(cls, "GenericError") &&
				     strcmp(cls, "CommandNotFound") &&
				     strcmp(cls, "DeviceNotFound"))) {
					fprintf(stderr, "malformed error reply: %.*s\n",
						(int)l, out + off);
					abort();
				}
			} else if (strcmp(key, "id")) {
				fprintf(stderr, "reply with member '%s': %.*s\n",
					key, (int)l, out + off);
				abort();
			}
		}
		if (kinds != 1) {
			fprintf(stderr, "not one reply: %.*s\n", (int)l, out + off);
			abort();
		}
		json_decref(m);
		off += l + 1;
	}
}

static void same(const char *what, const char *a, size_t alen, const char *b,
		 size_t blen)
{
	if (alen != blen || (alen && memcmp(a, b, alen))) {
		fprintf(stderr, "replies differ when the input is read %s:\n"
			"--- all at once (%zu bytes)\n%.*s--- %s (%zu bytes)\n%.*s",
			what, alen, (int)alen, a, what, blen, (int)blen, b);
		abort();
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t n1, n2, n3, piece = size ? (size_t)data[0] % 97 + 2 : 1;
	char *o1, *o2, *o3;

	o1 = control_feed(srv, data, size, 0, &n1);
	check_replies(o1, n1);
	/* Past CONTROL_MAX_REQUEST where a read ends decides whether a long
	 * request is refused, as on a socket: compare below it only. */
	if (size < CONTROL_MAX_REQUEST) {
		o2 = control_feed(srv, data, size, 1, &n2);
		same("one byte at a time", o1, n1, o2, n2);
		o3 = control_feed(srv, data, size, piece, &n3);
		same("in pieces", o1, n1, o3, n3);
		free(o2);
		free(o3);
	}
	free(o1);
	return 0;
}
