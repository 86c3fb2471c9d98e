/*
 * ferry/common.h - export macro and the error object shared by every API.
 *
 * Error convention (the whole library, every hook):
 *   - functions return 0 on success or a negative errno value on failure;
 *     functions returning a pointer return NULL on failure;
 *   - an optional `struct ferry_error *err` (may be NULL) receives a
 *     human-readable description, and is filled only on failure;
 *   - the first error recorded in an error object wins: later calls to
 *     ferry_error_set() on an already-set object only keep the first message,
 *     so the root cause is what the user sees;
 *   - the library never exits the process and never aborts on bad input.
 *     It aborts only on broken internal invariants (a failed mutex, say).
 */
#ifndef FERRY_COMMON_H
#define FERRY_COMMON_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(FERRY_BUILDING_LIBRARY)
#define FERRY_API __attribute__((visibility("default")))
#else
#define FERRY_API
#endif

#define FERRY_PRINTF(a, b) __attribute__((format(printf, a, b)))

#define FERRY_ERROR_MSG_MAX 512

/* An error record. Zero-initialise it ({0}) before use. */
struct ferry_error {
	int code;                       /* negative errno; 0 = no error */
	char msg[FERRY_ERROR_MSG_MAX];  /* NUL-terminated description */
};

/*
 * Record an error in @err (which may be NULL) unless one is recorded already.
 * @code must be a negative errno. Returns @code, so callers can write
 * `return ferry_error_set(err, -EINVAL, "bad thing %d", x);`.
 */
FERRY_API int ferry_error_set(struct ferry_error *err, int code,
			      const char *fmt, ...) FERRY_PRINTF(3, 4);
FERRY_API int ferry_error_setv(struct ferry_error *err, int code,
			       const char *fmt, va_list ap) FERRY_PRINTF(3, 0);

/*
 * Prefix the message already recorded in @err with context ("section 'ram': ").
 * Does nothing when @err is NULL or holds no error. Returns err->code (or 0).
 */
FERRY_API int ferry_error_prefix(struct ferry_error *err, const char *fmt, ...)
	FERRY_PRINTF(2, 3);

/* Forget a recorded error. */
FERRY_API void ferry_error_clear(struct ferry_error *err);

/* Copy @src into @dst (first error wins in @dst). Returns src->code. */
FERRY_API int ferry_error_propagate(struct ferry_error *dst,
				    const struct ferry_error *src);

/* Product version, independent of the stream format version. */
#define FERRY_VERSION_STRING "0.1.0"

#ifdef __cplusplus
}
#endif
#endif
