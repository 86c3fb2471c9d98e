/*
 * cli/cmd-ctl.c - `ferry ctl SOCKET COMMAND [JSON-ARGS]`: send one command to
 * a VM's control socket and print the reply.
 *
 * Exit status: 0 with the "return" value as pretty JSON on stdout; 1 for an
 * error reply ("error: CLASS: desc" on stderr), a connection failure or a
 * timeout; 2 for bad usage, including JSON-ARGS that is not a JSON object
 * (checked before connecting, so a typo never reaches the VM).
 */
#include <errno.h>
#include <stdbool.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "ferry/common.h"
#include "cli.h"
#include "control/control.h"

static void usage(FILE *f)
{
	fprintf(f,
		"usage: ferry ctl [OPTIONS] SOCKET COMMAND [JSON-ARGS]\n"
		"Send COMMAND (with JSON-ARGS, a JSON object) to the control socket\n"
		"SOCKET and print the reply's return value as JSON.\n"
		"\n"
		"  --timeout MS   give up after MS milliseconds per wait (default\n"
		"                 10000; 0 waits forever)\n"
		"  --events N     after the reply, print the next N events, one\n"
		"                 compact JSON object per line, then exit\n"
		"  --help         show this help\n"
		"\n"
		"Exit status: 0 success, 1 error reply or connection failure,\n"
		"2 usage error. Try COMMAND query-commands for the list.\n");
}

/* Parse a non-negative int option value. */
static int parse_count(const char *opt, const char *s, int *out)
{
	char *end;
	long v;

	errno = 0;
	v = s ? strtol(s, &end, 10) : -1;
	if (!s || errno || end == s || *end || v < 0 || v > INT_MAX) {
		cli_err("ctl: %s needs a non-negative integer, got '%s'", opt,
			s ? s : "");
		return -EINVAL;
	}
	*out = (int)v;
	return 0;
}

int cmd_ctl(int argc, char **argv)
{
	struct ferry_error err = { 0 };
	const char *pos[3] = { NULL, NULL, NULL };
	int npos = 0, timeout = 10000, nevents = 0, fd, rc;
	bool only_pos = false;
	json_t *args = NULL, *ret = NULL;
	char *s;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];

		if (!only_pos && !strcmp(a, "--")) {
			only_pos = true;
		} else if (!only_pos && (!strcmp(a, "--help") || !strcmp(a, "-h"))) {
			usage(stdout);
			return 0;
		} else if (!only_pos && !strcmp(a, "--timeout")) {
			if (parse_count(a, i + 1 < argc ? argv[++i] : NULL,
					&timeout))
				return 2;
		} else if (!only_pos && !strncmp(a, "--timeout=", 10)) {
			if (parse_count("--timeout", a + 10, &timeout))
				return 2;
		} else if (!only_pos && !strcmp(a, "--events")) {
			if (parse_count(a, i + 1 < argc ? argv[++i] : NULL,
					&nevents))
				return 2;
		} else if (!only_pos && !strncmp(a, "--events=", 9)) {
			if (parse_count("--events", a + 9, &nevents))
				return 2;
		} else if (!only_pos && a[0] == '-' && a[1]) {
			cli_err("ctl: unknown option '%s'", a);
			usage(stderr);
			return 2;
		} else if (npos < 3) {
			pos[npos++] = a;
		} else {
			cli_err("ctl: too many arguments ('%s')", a);
			usage(stderr);
			return 2;
		}
	}
	if (npos < 2) {
		usage(stderr);
		return 2;
	}
	if (timeout == 0)
		timeout = -1; /* the library's "no limit" */

	if (pos[2]) {
		json_error_t je;

		args = json_loads(pos[2], JSON_DECODE_ANY, &je);
		if (!args) {
			cli_err("ctl: JSON-ARGS is not valid JSON: %s (at column %d)",
				je.text, je.column);
			return 2;
		}
		if (!json_is_object(args)) {
			cli_err("ctl: JSON-ARGS must be a JSON object, like '{\"key\": 1}'");
			json_decref(args);
			return 2;
		}
	}

	fd = control_client_connect(pos[0], timeout, &err);
	if (fd < 0) {
		cli_err("ctl: cannot talk to %s: %s", pos[0], err.msg);
		json_decref(args);
		return 1;
	}
	rc = control_client_call(fd, pos[1], args, &ret, timeout, &err);
	json_decref(args);
	if (rc == -EREMOTEIO) {
		fprintf(stderr, "error: %s\n", err.msg);
		close(fd);
		return 1;
	}
	if (rc) {
		cli_err("ctl: %s: %s", pos[1], err.msg);
		close(fd);
		return 1;
	}
	s = json_dumps(ret, JSON_INDENT(2) | JSON_ENCODE_ANY);
	json_decref(ret);
	if (!s) {
		cli_err("ctl: out of memory");
		close(fd);
		return 1;
	}
	puts(s);
	free(s);
	fflush(stdout);

	/* Events are printed compact, one per line, so a script can read
	 * them as they come. */
	for (int n = 0; n < nevents;) {
		json_t *msg;

		rc = control_client_read(fd, &msg, timeout, &err);
		if (rc) {
			cli_err("ctl: waiting for event %d of %d: %s", n + 1,
				nevents, err.msg);
			close(fd);
			return 1;
		}
		if (json_object_get(msg, "event")) {
			s = json_dumps(msg, JSON_COMPACT);
			if (s)
				puts(s);
			free(s);
			fflush(stdout);
			n++;
		}
		json_decref(msg);
	}
	close(fd);
	return 0;
}
