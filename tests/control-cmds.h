/*
 * tests/control-cmds.h - the control-protocol test commands shared by the
 * unit tests (tests/unit/test-control.c) and the fuzz target
 * (tests/fuzz/fuzz-control.c). Header-only: the fuzz target is built by
 * its own rule, with clang.
 */
#ifndef FERRY_TEST_CONTROL_CMDS_H
#define FERRY_TEST_CONTROL_CMDS_H

#include <errno.h>

#include <jansson.h>

#include "control/control.h"

/* echo: returns its arguments (any JSON the parser let through). */
static inline int cmd_echo(void *opaque, json_t *args, json_t **ret,
			   struct ferry_error *err)
{
	(void)opaque;
	(void)err;
	*ret = json_incref(args);
	return 0;
}

/* fail {"errno": N, "msg": S}: fails with -N (EINVAL unless 1..200) and
 * S; without S the reply's text is strerror's. The value it sets in *ret
 * must never reach the reply. */
static inline int cmd_fail(void *opaque, json_t *args, json_t **ret,
			   struct ferry_error *err)
{
	json_int_t e = json_integer_value(json_object_get(args, "errno"));
	const char *msg = json_string_value(json_object_get(args, "msg"));

	(void)opaque;
	*ret = json_string("must be ignored");
	/* Handlers return -errno: keep it one. */
	if (e < 1 || e > 200)
		e = EINVAL;
	if (!msg)
		return -(int)e;
	return ferry_error_set(err, -(int)e, "%s", msg);
}

/* add {"a": N, "b": N} -> {"sum": N}: argument checks like a real
 * handler's. The sum wraps (unsigned) rather than overflow: the fuzzer
 * sends any integers. */
static inline int cmd_add(void *opaque, json_t *args, json_t **ret,
			  struct ferry_error *err)
{
	json_t *a = json_object_get(args, "a"), *b = json_object_get(args, "b");

	(void)opaque;
	if (!json_is_integer(a) || !json_is_integer(b))
		return ferry_error_set(err, -EINVAL, "'a' and 'b' must be integers");
	*ret = json_pack("{s:I}", "sum", (json_int_t)((uint64_t)json_integer_value(a) +
						       (uint64_t)json_integer_value(b)));
	return 0;
}

#endif
