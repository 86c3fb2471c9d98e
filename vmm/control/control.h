/*
 * vmm/control/control.h - a QMP-style JSON control socket for the VMM, and a
 * small client for it.
 *
 * Wire protocol (one AF_UNIX stream socket, UTF-8 JSON both ways):
 *
 *   server -> client on connect (the greeting):
 *     {"QMP": {"version": {"ferry": "0.1.0"}, "capabilities": []}}
 *   client -> server, any number of requests, one JSON object each, either
 *   newline separated or simply concatenated:
 *     {"execute": NAME, "arguments": {...}, "id": ANY}
 *     ("arguments" and "id" are optional; no other members are accepted)
 *   server -> client, exactly one reply per request, in request order:
 *     {"return": VALUE, "id": ANY}
 *     {"error": {"class": CLASS, "desc": TEXT}, "id": ANY}
 *     ("id" only when the request carried one; it is echoed verbatim)
 *   server -> client at any time, between replies, never inside one:
 *     {"event": NAME, "data": {...},
 *      "timestamp": {"seconds": S, "microseconds": US}}
 *
 * Everything the server sends is compact JSON ending in '\n', and a message
 * never contains a raw newline, so clients may read line by line.
 *
 * "qmp_capabilities" is accepted (and returns {}) for compatibility with QMP
 * clients, but is not required before other commands. "query-commands"
 * returns [{"name": NAME}, ...] for every command, built-ins included.
 *
 * Input that is not a JSON object gets an error reply and the connection
 * stays usable: the server resynchronises at the next '{' or newline. A
 * request that grows past CONTROL_MAX_REQUEST bytes without completing gets
 * an error reply, then the server closes that connection (there is no safe
 * place to resume). A client that stops reading while its unsent output
 * exceeds CONTROL_MAX_OUTPUT is disconnected rather than buffered without
 * bound.
 *
 * Error classes. A handler returns a negative errno; the class is chosen
 * from it, so handlers never build protocol objects themselves:
 *   -ENOSYS, -EOPNOTSUPP  -> "CommandNotFound"  (the command exists but is not
 *                                                available in this VM)
 *   -ENODEV, -ENOENT      -> "DeviceNotFound"   (the object named in the
 *                                                arguments does not exist)
 *   anything else         -> "GenericError"
 * The server itself uses "CommandNotFound" for unknown commands and
 * "GenericError" for malformed input. "desc" is err->msg, or strerror() when
 * the handler left the message empty.
 *
 * Threads and locks:
 *   - control_register() only before control_start(), from the thread that
 *     created the server: the command table is then read without a lock.
 *   - One server thread (started by control_start) owns the listening socket
 *     and every connection: it accepts, reads, parses, runs the handlers and
 *     writes. Handlers therefore run serially on that thread and must not
 *     block for long (no waiting for a migration to finish): start long work
 *     elsewhere, return at once, and report progress with control_event().
 *   - control_event() may be called from any thread, including from inside a
 *     handler. It only queues bytes under the server's mutex and wakes the
 *     server thread, so it never blocks on a slow client.
 *   - control_destroy() must not race with control_event() calls: stop the
 *     threads that emit events first.
 */
#ifndef FERRY_VMM_CONTROL_H
#define FERRY_VMM_CONTROL_H

#include <jansson.h>

#include "ferry/common.h"

/* Longest request the server buffers before giving up on a connection. */
#define CONTROL_MAX_REQUEST (1u << 20)
/* Most unsent output queued for one client before it is disconnected. */
#define CONTROL_MAX_OUTPUT (16u << 20)
/* Most simultaneous connections; more are told so and closed. */
#define CONTROL_MAX_CLIENTS 64

struct control;

/*
 * A command handler. @args is always a JSON object (empty when the request
 * had no "arguments") and is borrowed: json_incref() it to keep it. On
 * success return 0 and optionally set *ret to a new reference, which becomes
 * the "return" value (the server takes ownership; NULL means {}). On failure
 * return a negative errno and describe the problem in @err; *ret is then
 * ignored (and released if set). Runs on the server thread.
 */
typedef int (*control_handler_fn)(void *opaque, json_t *args, json_t **ret,
				  struct ferry_error *err);

/*
 * Create a server listening on the unix socket @path (a stale socket there is
 * replaced; any other file is an error). Clients may connect at once, but are
 * not served until control_start(). NULL on failure, with @err filled.
 */
struct control *control_create(const char *path, struct ferry_error *err);

/*
 * Add command @name. Before control_start() only (-EBUSY after). -EEXIST for
 * a name already taken (built-ins included), -EINVAL for an empty name.
 */
int control_register(struct control *c, const char *name,
		     control_handler_fn fn, void *opaque);

/* Start the server thread. 0 or -errno (-EBUSY if already started). */
int control_start(struct control *c, struct ferry_error *err);

/*
 * Send event @name to every connected client. Takes ownership of @data
 * (like json_object_set_new; NULL sends "data": {}). Any thread. Events with
 * no client connected are dropped. Safe before control_start() (nothing is
 * connected yet, so nothing is sent).
 */
void control_event(struct control *c, const char *name, json_t *data);

/* Stop and join the server thread, close every connection, remove the
 * socket path (only if it is still ours) and free @c. NULL is a no-op. */
void control_destroy(struct control *c);

/*
 * For tests and fuzzing (tests/fuzz/fuzz-control.c): run @len bytes through
 * the input framing and command dispatch of one client of @c, as if its
 * socket delivered them @chunk bytes at a time (0, or more than a read
 * takes: as much as one read takes) and then ended, and return what that
 * client would be sent: malloc'd, *outlen
 * bytes (NULL when nothing; no greeting). No socket and no server thread:
 * only on a server not started (NULL otherwise). Handlers run on the
 * caller's thread.
 */
char *control_feed(struct control *c, const void *input, size_t len,
		   size_t chunk, size_t *outlen);

/* ---- client side -------------------------------------------------------- */

/*
 * Connect to the control socket at @path, read the greeting and negotiate
 * capabilities. Returns the connected fd (>= 0; the caller closes it) or
 * -errno. @timeout_ms bounds the whole exchange (-1: no limit).
 */
int control_client_connect(const char *path, int timeout_ms,
			   struct ferry_error *err);

/*
 * Execute @cmd with @args (a JSON object, borrowed; NULL for none) and wait
 * for its reply, skipping any events that arrive first. On success *ret (if
 * @ret is not NULL) receives a new reference to the "return" value. An error
 * reply gives -EREMOTEIO with err->msg set to "CLASS: desc". -ETIMEDOUT when
 * @timeout_ms passes, -ECONNRESET when the server closes the connection.
 */
int control_client_call(int fd, const char *cmd, json_t *args, json_t **ret,
			int timeout_ms, struct ferry_error *err);

/*
 * Read the next message (reply or event) from the server: *msg receives a new
 * reference. Reads exactly one line, so nothing after it is consumed: calls
 * may be mixed freely with control_client_call(). -ETIMEDOUT, -ECONNRESET on
 * end of stream, -EBADMSG for a line that is not a JSON object.
 */
int control_client_read(int fd, json_t **msg, int timeout_ms,
			struct ferry_error *err);

#endif
