/*
 * error.c - the error object. First error wins: the root cause is usually
 * the first failure, and everything after it is fallout (a closed socket
 * after a bad record, say), so later reports only add nothing.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "ferry/common.h"

int ferry_error_setv(struct ferry_error *err, int code, const char *fmt,
		     va_list ap)
{
	if (code >= 0)
		code = -EINVAL; /* callers must pass -errno; keep it an error */
	if (!err || err->code)
		return code;
	err->code = code;
	vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
	return code;
}

int ferry_error_set(struct ferry_error *err, int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	code = ferry_error_setv(err, code, fmt, ap);
	va_end(ap);
	return code;
}

int ferry_error_prefix(struct ferry_error *err, const char *fmt, ...)
{
	char prefix[FERRY_ERROR_MSG_MAX], old[FERRY_ERROR_MSG_MAX];
	va_list ap;

	if (!err || !err->code)
		return 0;
	va_start(ap, fmt);
	vsnprintf(prefix, sizeof(prefix), fmt, ap);
	va_end(ap);
	memcpy(old, err->msg, sizeof(old));
	/* Truncation is fine: the message is for humans. */
	{
		size_t pl = strnlen(prefix, sizeof(err->msg) - 1);
		memcpy(err->msg, prefix, pl);
		snprintf(err->msg + pl, sizeof(err->msg) - pl, "%.*s",
			 (int)(sizeof(err->msg) - pl - 1), old);
	}
	return err->code;
}

void ferry_error_clear(struct ferry_error *err)
{
	if (err) {
		err->code = 0;
		err->msg[0] = 0;
	}
}

int ferry_error_propagate(struct ferry_error *dst, const struct ferry_error *src)
{
	if (!src || !src->code)
		return 0;
	return ferry_error_set(dst, src->code, "%s", src->msg);
}
