/*
 * ferry/transport.h - migration URIs behind one interface.
 *
 *   tcp:HOST:PORT   TCP (IPv4/IPv6; [v6addr]:port accepted). Port 0 on the
 *                   listening side picks a free port (see ferry_listener_uri).
 *   unix:PATH       AF_UNIX stream socket.
 *   fd:N            an already-open file descriptor (inherited or passed);
 *                   the transport dup()s it, the caller keeps N.
 *   file:PATH       a regular file: the outgoing side creates/truncates it,
 *                   the incoming side reads it.
 *
 * Outgoing: ferry_transport_connect() returns a connected fd. Incoming:
 * ferry_transport_listen() then ferry_listener_accept() (repeatable, for
 * multiple channels), or ferry_transport_open_incoming() for one-shot
 * (file:, fd:). All return fds the caller owns (close them or hand them to a
 * channel with own_fd). Sockets get CLOEXEC; TCP sockets get TCP_NODELAY.
 */
#ifndef FERRY_TRANSPORT_H
#define FERRY_TRANSPORT_H

#include <stdbool.h>

#include "ferry/common.h"

#ifdef __cplusplus
extern "C" {
#endif

enum ferry_uri_kind { FERRY_URI_TCP, FERRY_URI_UNIX, FERRY_URI_FD, FERRY_URI_FILE };

struct ferry_uri {
	enum ferry_uri_kind kind;
	char host[256];  /* tcp */
	char port[16];   /* tcp */
	char path[4096]; /* unix, file */
	int fd;          /* fd */
};

/* Parse @uri. -EINVAL with a message naming the problem (-ENAMETOOLONG for
 * a path that does not fit, -EBADF for fd:N when N is not an open fd). */
FERRY_API int ferry_uri_parse(const char *uri, struct ferry_uri *out,
			      struct ferry_error *err);
/* Does this transport carry several connections (tcp, unix)? */
FERRY_API bool ferry_uri_is_socket(const struct ferry_uri *u);

/* Outgoing: returns an fd (>= 0) or -errno. @timeout_ms bounds connect()
 * over all resolved addresses (-1 waits forever; -ETIMEDOUT when it passes). */
FERRY_API int ferry_transport_connect(const char *uri, int timeout_ms,
				      struct ferry_error *err);

struct ferry_listener;
/* Incoming sockets (tcp:, unix:). A unix: path is unlinked first and on
 * close. */
FERRY_API struct ferry_listener *ferry_transport_listen(const char *uri,
							struct ferry_error *err);
/* Wait up to @timeout_ms (-1 forever) for a connection; fd or -errno
 * (-ETIMEDOUT). */
FERRY_API int ferry_listener_accept(struct ferry_listener *l, int timeout_ms,
				    struct ferry_error *err);
/* The URI clients should connect to (tcp: with the real port). */
FERRY_API const char *ferry_listener_uri(const struct ferry_listener *l);
FERRY_API int ferry_listener_fd(const struct ferry_listener *l);
FERRY_API void ferry_listener_close(struct ferry_listener *l);

/* Incoming one-shot: file: opens for reading, fd: dups; sockets listen and
 * accept one connection (waiting up to @timeout_ms). */
FERRY_API int ferry_transport_open_incoming(const char *uri, int timeout_ms,
					    struct ferry_error *err);

#ifdef __cplusplus
}
#endif
#endif
