/*
 * tls.h - TLS 1.3 with mutual authentication on the migration's sockets
 * (library-private; the engine's parameters tls-creds, tls-hostname,
 * tls-authz and tls-ktls are the public face).
 *
 * A struct ferry_tls holds one side's credentials for one migration; a
 * struct ferry_tls_conn is one session on one socket. The rest of the
 * engine keeps working with the socket's fd for what is not I/O
 * (shutdown, keepalive, close); every read and write of a TLS socket goes
 * through the session.
 *
 * Threads: a session may have one reader and one writer at a time, in
 * different threads (the main stream and its return path share one
 * socket). Both go through one lock around OpenSSL, never held while
 * waiting: the socket is non-blocking and a thread that OpenSSL tells to
 * wait polls the socket with the lock dropped.
 *
 * Ownership: a session dups the fd it is given and closes its copy when
 * the last reference goes, so the caller's fd keeps its own life (close it
 * when you would without TLS). Sessions are reference-counted because the
 * main stream's writer and the return path's reader share one.
 */
#ifndef FERRY_TLS_H
#define FERRY_TLS_H

#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "ferry/channel.h"
#include "ferry/common.h"

struct ferry_tls;
struct ferry_tls_conn;

struct ferry_tls_config {
	const char *dir;        /* QEMU's x509 layout: ca-cert.pem, then
				   server-cert/key.pem or client-cert/key.pem */
	bool server;            /* destination */
	const char *hostname;   /* client: the name the server's certificate
				   must carry (DNS name or IP address); NULL
				   or "" = no name check (CA check only) */
	const char *authz;      /* server: accepted client subjects, ';'
				   separated; NULL or "" = any client the CA
				   signed */
	bool ktls;              /* ask for kernel TLS where the kernel has it */
	uint64_t rekey_bytes;   /* a TLS 1.3 key update after this many bytes
				   sent (0: FERRY_TLS_REKEY_BYTES) */
};

/*
 * RFC 8446 5.5: AES-GCM keys are good for about 2^24.5 full records
 * (~380 GiB) per direction; a large VM moves that much on one channel.
 * Each writer updates its sending key every 16 GiB (one small record, no
 * round trip; the peer's reader follows).
 */
#define FERRY_TLS_REKEY_BYTES (16ull << 30)

/* Load the credentials. NULL with @err on a missing or bad file. */
struct ferry_tls *ferry__tls_new(const struct ferry_tls_config *cfg,
				 struct ferry_error *err);
/* Sessions made from @t stay valid (they hold their own references). */
void ferry__tls_free(struct ferry_tls *t);

/*
 * A session on @fd (dup'ed; @fd is left as it was except that the socket
 * becomes non-blocking, a property of the shared file description). No
 * byte moves until a handshake step. Client: @host (NULL: the config's
 * hostname) is the name the server's certificate must carry.
 */
struct ferry_tls_conn *ferry__tls_conn_new(struct ferry_tls *t, int fd,
					   const char *host,
					   struct ferry_error *err);
struct ferry_tls_conn *ferry__tls_ref(struct ferry_tls_conn *c);
void ferry__tls_unref(struct ferry_tls_conn *c);

/*
 * One step of the handshake, for event loops: 0 once the session is
 * established and its verdict exchanged, -EAGAIN with *events (POLLIN or
 * POLLOUT) to wait for, or -errno with @err saying why the peer or we
 * refused. On the server, the verdict (tls-authz) is sent as part of it:
 * a refused client learns why before the connection closes.
 */
int ferry__tls_handshake_step(struct ferry_tls_conn *c, short *events,
			      struct ferry_error *err);
/* The whole handshake, at most @timeout_ms (<= 0: no limit). */
int ferry__tls_handshake(struct ferry_tls_conn *c, int timeout_ms,
			 struct ferry_error *err);

/* Up to @len bytes (> 0), 0 at the end of the stream, -ETIMEDOUT after
 * @timeout_ms (<= 0: none) without a byte, or -errno. */
ssize_t ferry__tls_read(struct ferry_tls_conn *c, void *buf, size_t len,
			int timeout_ms);
/* All of @iov (the array is modified), or -errno / -ETIMEDOUT when the
 * peer took nothing for @timeout_ms. */
int ferry__tls_writev(struct ferry_tls_conn *c, struct iovec *iov, int n,
		      int timeout_ms);
/* Established sessions: up to @len bytes without consuming them and
 * without waiting; -EAGAIN when none has come. */
ssize_t ferry__tls_peek(struct ferry_tls_conn *c, void *buf, size_t len);
/* Unblock this session's reader and writer (shutdown of the socket). */
void ferry__tls_shutdown(struct ferry_tls_conn *c);

/* What was negotiated, for query-migrate and traces. */
struct ferry_tls_info {
	char version[16];
	char cipher[64];
	char peer[256];         /* the peer certificate's subject */
	bool ktls_tx, ktls_rx;
	uint64_t key_updates;   /* sending-key updates so far */
};
void ferry__tls_get_info(struct ferry_tls_conn *c, struct ferry_tls_info *i);

/*
 * A channel over the session (takes a reference). ferry_chan_set_timeout
 * applies to it as to an fd channel. If @close_fd >= 0 the channel closes
 * it when freed, like an own_fd channel.
 */
struct ferry_chan *ferry__tls_chan_new(struct ferry_tls_conn *c,
				       enum ferry_chan_dir dir, int close_fd);

/*
 * Does @p (at least 3 bytes) start like a TLS record? Lets a plaintext
 * listener or reader say "the peer speaks TLS" rather than "garbage".
 */
bool ferry__tls_looks_like_record(const unsigned char *p, size_t len);

/*
 * Multifd over TLS (lib/multifd.c): as ferry_multifd_send_new and
 * ferry_multifd_recv_add_channel, with each channel's established session
 * (@tls may be NULL: plain sockets). The sessions' references pass to the
 * multifd object, failure included.
 */
struct ferry_multifd;
struct ferry_multifd_params;
struct ferry_multifd *
ferry__multifd_send_new_tls(const struct ferry_multifd_params *p, const int *fds,
			    struct ferry_tls_conn *const *tls,
			    struct ferry_error *err);
int ferry__multifd_recv_add_channel_tls(struct ferry_multifd *m, int fd,
					struct ferry_tls_conn *tls,
					struct ferry_error *err);

#endif
