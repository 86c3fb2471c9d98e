/*
 * lib/tls.c - TLS 1.3 sessions on migration sockets (OpenSSL).
 *
 * Design notes (the why):
 *
 *  - TLS 1.3 only, both ends verify the other against the CA in tls-creds.
 *    The server demands a client certificate (VERIFY_FAIL_IF_NO_PEER_CERT);
 *    the client checks the server's name. No session tickets and no
 *    resumption: a migration opens a handful of connections once, and
 *    post-handshake tickets would be records that kernel TLS receive
 *    cannot pass through.
 *
 *  - The verdict. In TLS 1.3 a client's handshake is over once it has sent
 *    its Finished, before the server has judged its certificate: a refused
 *    client would only learn it from a failed write much later, as "broken
 *    pipe". So the server ends every handshake with a verdict of its own,
 *    the first application bytes on the connection: status (0 = accepted)
 *    and a short reason. The client waits for it, so a refusal reaches the
 *    source as the server's alert ("unknown ca", "certificate expired") or
 *    as the reason in the verdict ("not in tls-authz"). This is also when
 *    tls-authz is applied: after the chain is verified.
 *
 *  - One lock per session around every OpenSSL call, never held while
 *    waiting. An SSL object must not be entered by two threads at once,
 *    but the main stream's writer and the return path's reader share one
 *    socket. So the socket is non-blocking; a call that OpenSSL answers
 *    with WANT_READ/WANT_WRITE drops the lock and polls the socket. A
 *    shutdown() of the socket wakes both pollers.
 *
 *  - Writes are gathered into 64 KiB before they reach SSL_write: multifd
 *    hands us one iovec entry per 4 KiB page, and a TLS record per page
 *    would cost a record header, a tag and a cipher call each. Entries of
 *    64 KiB and more go straight through.
 *
 *  - Kernel TLS (tls-ktls): OpenSSL moves the record layer into the kernel
 *    when the kernel has the tls ULP; reads and writes then go through the
 *    socket as plain data and the kernel encrypts. When the kernel lacks
 *    it, OpenSSL silently stays in user space; ferry__tls_get_info says
 *    which one happened. With kTLS transmit on, writes bypass the gathering
 *    (the kernel builds full records itself) and go out with writev().
 *    Such a session makes no key updates (below): kernels before 6.x
 *    cannot change a kTLS key, and OpenSSL 3.0 would fail the write.
 *
 *  - Key updates: each writer replaces its sending key every rekey_bytes
 *    (FERRY_TLS_REKEY_BYTES), inside the AES-GCM usage limit of RFC 8446
 *    section 5.5, which one channel of a large migration can pass.
 *
 *  - A peer's TCP close without close_notify reads as end of stream
 *    (SSL_OP_IGNORE_UNEXPECTED_EOF), the same as on a plain socket: the
 *    migration stream is self-delimiting (EOF record, return-path SHUT), so
 *    a truncation is caught by the load, and a dead source must look the
 *    same with and without TLS.
 *
 *  - No SIGPIPE. OpenSSL's socket BIO writes with write(), which raises
 *    SIGPIPE on a connection the peer (or our own cancel, by shutdown())
 *    closed - and SIGPIPE kills a VMM that did not ignore it. Sessions use
 *    a socket BIO whose write is send(MSG_NOSIGNAL) instead; the method
 *    table is built once per process (pthread_once) and never changes,
 *    so it is not state. (With kernel TLS on, OpenSSL's own writes are
 *    only alerts; they keep the stock path, which knows how to send
 *    control records.)
 *
 *  - Certificate revocation: a ca-crl.pem next to ca-cert.pem (QEMU's
 *    layout) is loaded and checked for every certificate in the chain.
 *
 *  - A plaintext ferry peer reaching a TLS listener is told so in the only
 *    language it reads back: a TLS alert record (protocol_version), whose
 *    first bytes its return-path reader recognises (see
 *    ferry__tls_looks_like_record), instead of a silent close.
 */
#include "tls.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "internal.h"

#define GATHER_SIZE (64u << 10)
#define VERDICT_MAX 255

struct ferry_tls {
	SSL_CTX *ctx;
	bool server, ktls;
	uint64_t rekey_bytes;
	char hostname[256];
	char authz[1024];
};

enum hs_state {
	HS_PEEK,        /* server: is the peer speaking TLS at all? */
	HS_TLS,         /* the TLS handshake */
	HS_VERDICT,     /* server: sending it; client: reading it */
	HS_DONE,
};

struct ferry_tls_conn {
	pthread_mutex_t lock;           /* every OpenSSL call on ssl */
	SSL *ssl;                       /* lock */
	int fd;                         /* our dup of the socket; immutable */
	int refs;                       /* atomic */
	bool server;                    /* immutable */
	char authz[1024];               /* server: immutable */
	/* The handshake: only the thread running it touches these, and
	 * nobody else uses the session until it is HS_DONE. */
	enum hs_state hs;
	uint8_t verdict[2 + VERDICT_MAX];
	size_t vlen, vpos;
	bool refused;                   /* server: a refusing verdict */
	/* Set at HS_DONE, immutable after. */
	bool ktls_tx, ktls_rx;
	/* The writer's gathering buffer (one writer at a time). */
	uint8_t *gather;
	size_t glen;
	/* Key updates (lock): bytes sent since the last one, how many. */
	uint64_t rekey_bytes;           /* immutable */
	uint64_t tx_since_rekey;
	uint64_t key_updates;
};

/* ---- errors ------------------------------------------------------------- */

/* The most telling OpenSSL reason in the thread's queue, or "". */
static const char *ssl_reason(char *buf, size_t len)
{
	unsigned long e, last = 0;

	while ((e = ERR_get_error()))
		last = e;
	buf[0] = 0;
	if (last) {
		const char *r = ERR_reason_error_string(last);

		snprintf(buf, len, "%s", r ? r : "unknown error");
	}
	return buf;
}

/* Why the handshake failed, as the user should read it. */
static int hs_error(struct ferry_tls_conn *c, int ssl_err, int saved_errno,
		    struct ferry_error *err)
{
	const char *peer = c->server ? "source" : "destination";
	long v = SSL_get_verify_result(c->ssl);
	char why[256];

	ssl_reason(why, sizeof(why));
	if (v != X509_V_OK && strstr(why, "certificate verify failed"))
		return ferry_error_set(err, -EACCES, "TLS: the %s's certificate "
				       "is refused: %s%s", peer,
				       X509_verify_cert_error_string(v),
				       v == X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN ||
				       v == X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT ||
				       v == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY ||
				       v == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
				       ? " (not signed by the CA in tls-creds)" : "");
	if (strstr(why, "alert"))
		return ferry_error_set(err, -EACCES, "TLS: the %s refused the "
				       "handshake (%s)", peer, why);
	if (strstr(why, "peer did not return a certificate") ||
	    strstr(why, "certificate required"))
		return ferry_error_set(err, -EACCES, "TLS: the %s sent no "
				       "certificate", peer);
	if (strstr(why, "wrong version number") || strstr(why, "http request") ||
	    strstr(why, "packet length too long") ||
	    strstr(why, "record layer failure"))
		return ferry_error_set(err, -EPROTO, "TLS: the %s does not speak "
				       "TLS (%s); tls-creds must be set on both "
				       "sides", peer, why);
	if (ssl_err == SSL_ERROR_SYSCALL || strstr(why, "unexpected eof") ||
	    ssl_err == SSL_ERROR_ZERO_RETURN)
		return ferry_error_set(err, saved_errno ? -saved_errno : -ECONNRESET,
				       "TLS: the %s closed the connection during "
				       "the handshake%s%s%s", peer,
				       c->server ? "" : " (is tls-creds set on "
				       "the destination? both sides need it)",
				       saved_errno ? ": " : "",
				       saved_errno ? strerror(saved_errno) : "");
	if (ssl_err == SSL_ERROR_SSL && strstr(why, "version"))
		return ferry_error_set(err, -EPROTO, "TLS: the %s offers no TLS "
				       "1.3 (%s)", peer, why);
	return ferry_error_set(err, -EPROTO, "TLS handshake with the %s failed: "
			       "%s", peer, why[0] ? why : "unknown error");
}

/* ---- a socket BIO that never raises SIGPIPE -------------------------------- */

static BIO_METHOD *nosig_method;
static pthread_once_t nosig_once = PTHREAD_ONCE_INIT;

static int nosig_write(BIO *b, const char *buf, int len)
{
	int fd = -1;
	ssize_t n;

	/* kTLS: alerts go as control records, which only the stock socket
	 * write knows how to send. */
	if (BIO_get_ktls_send(b) > 0)
		return BIO_meth_get_write(BIO_s_socket())(b, buf, len);
	BIO_get_fd(b, &fd);
	BIO_clear_retry_flags(b);
	n = send(fd, buf, (size_t)len, MSG_NOSIGNAL);
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
		BIO_set_retry_write(b);
	return (int)n;
}

static void nosig_init(void)
{
	const BIO_METHOD *sock = BIO_s_socket();
	BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK |
				     BIO_TYPE_DESCRIPTOR, "ferry socket");

	if (!m)
		return;
	if (!BIO_meth_set_write(m, nosig_write) ||
	    !BIO_meth_set_read(m, BIO_meth_get_read(sock)) ||
	    !BIO_meth_set_puts(m, BIO_meth_get_puts(sock)) ||
	    !BIO_meth_set_ctrl(m, BIO_meth_get_ctrl(sock)) ||
	    !BIO_meth_set_create(m, BIO_meth_get_create(sock)) ||
	    !BIO_meth_set_destroy(m, BIO_meth_get_destroy(sock))) {
		BIO_meth_free(m);
		return;
	}
	nosig_method = m;
}

/* ---- credentials --------------------------------------------------------- */

static int cred_file(char *out, size_t len, const char *dir, const char *name,
		     struct ferry_error *err)
{
	if ((size_t)snprintf(out, len, "%s/%s", dir, name) >= len)
		return ferry_error_set(err, -ENAMETOOLONG, "tls-creds: path too "
				       "long");
	if (access(out, R_OK))
		return ferry_error_set(err, -errno, "tls-creds: %s: %s", out,
				       strerror(errno));
	return 0;
}

struct ferry_tls *ferry__tls_new(const struct ferry_tls_config *cfg,
				 struct ferry_error *err)
{
	const char *role = cfg->server ? "server" : "client";
	char ca[4200], cert[4200], key[4200], name[64], why[256];
	struct ferry_tls *t;

	if (!cfg->dir || !cfg->dir[0]) {
		ferry_error_set(err, -EINVAL, "tls-creds: no directory");
		return NULL;
	}
	snprintf(name, sizeof(name), "%s-cert.pem", role);
	if (cred_file(ca, sizeof(ca), cfg->dir, "ca-cert.pem", err) ||
	    cred_file(cert, sizeof(cert), cfg->dir, name, err))
		return NULL;
	snprintf(name, sizeof(name), "%s-key.pem", role);
	if (cred_file(key, sizeof(key), cfg->dir, name, err))
		return NULL;
	t = calloc(1, sizeof(*t));
	if (!t) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	t->server = cfg->server;
	t->ktls = cfg->ktls;
	t->rekey_bytes = cfg->rekey_bytes ? cfg->rekey_bytes
					  : FERRY_TLS_REKEY_BYTES;
	snprintf(t->hostname, sizeof(t->hostname), "%s",
		 cfg->hostname ? cfg->hostname : "");
	snprintf(t->authz, sizeof(t->authz), "%s", cfg->authz ? cfg->authz : "");
	ERR_clear_error();
	t->ctx = SSL_CTX_new(cfg->server ? TLS_server_method()
					 : TLS_client_method());
	if (!t->ctx)
		goto ssl_fail;
	if (!SSL_CTX_set_min_proto_version(t->ctx, TLS1_3_VERSION) ||
	    !SSL_CTX_set_max_proto_version(t->ctx, TLS1_3_VERSION) ||
	    /* AES-128-GCM first: as safe here and the fastest with AES-NI. */
	    !SSL_CTX_set_ciphersuites(t->ctx, "TLS_AES_128_GCM_SHA256:"
				      "TLS_AES_256_GCM_SHA384:"
				      "TLS_CHACHA20_POLY1305_SHA256"))
		goto ssl_fail;
	if (SSL_CTX_use_certificate_chain_file(t->ctx, cert) != 1) {
		ferry_error_set(err, -EINVAL, "tls-creds: %s: %s", cert,
				ssl_reason(why, sizeof(why)));
		goto fail;
	}
	if (SSL_CTX_use_PrivateKey_file(t->ctx, key, SSL_FILETYPE_PEM) != 1 ||
	    SSL_CTX_check_private_key(t->ctx) != 1) {
		ferry_error_set(err, -EINVAL, "tls-creds: %s: %s", key,
				ssl_reason(why, sizeof(why)));
		goto fail;
	}
	if (SSL_CTX_load_verify_locations(t->ctx, ca, NULL) != 1) {
		ferry_error_set(err, -EINVAL, "tls-creds: %s: %s", ca,
				ssl_reason(why, sizeof(why)));
		goto fail;
	}
	snprintf(ca, sizeof(ca), "%s/ca-crl.pem", cfg->dir);
	if (!access(ca, F_OK)) {
		X509_STORE *st = SSL_CTX_get_cert_store(t->ctx);

		if (X509_STORE_load_file(st, ca) != 1) {
			ferry_error_set(err, -EINVAL, "tls-creds: %s: %s", ca,
					ssl_reason(why, sizeof(why)));
			goto fail;
		}
		X509_STORE_set_flags(st, X509_V_FLAG_CRL_CHECK |
				     X509_V_FLAG_CRL_CHECK_ALL);
	}
	SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER |
			   (cfg->server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
			   NULL);
	SSL_CTX_set_session_cache_mode(t->ctx, SSL_SESS_CACHE_OFF);
	SSL_CTX_set_num_tickets(t->ctx, 0);
	SSL_CTX_set_options(t->ctx, SSL_OP_NO_TICKET |
			    SSL_OP_IGNORE_UNEXPECTED_EOF |
			    (cfg->ktls ? SSL_OP_ENABLE_KTLS : 0));
	SSL_CTX_set_mode(t->ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
			 SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
	return t;
ssl_fail:
	ferry_error_set(err, -ENOMEM, "TLS: %s", ssl_reason(why, sizeof(why)));
fail:
	ferry__tls_free(t);
	return NULL;
}

void ferry__tls_free(struct ferry_tls *t)
{
	if (!t)
		return;
	SSL_CTX_free(t->ctx);
	free(t);
}

/* ---- sessions ------------------------------------------------------------ */

struct ferry_tls_conn *ferry__tls_conn_new(struct ferry_tls *t, int fd,
					   const char *host,
					   struct ferry_error *err)
{
	struct ferry_tls_conn *c = calloc(1, sizeof(*c));
	BIO *bio = NULL;
	int fl;

	if (!c) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	c->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (c->fd < 0) {
		ferry_error_set(err, -errno, "dup: %s", strerror(errno));
		free(c);
		return NULL;
	}
	fl = fcntl(c->fd, F_GETFL);
	if (fl < 0 || fcntl(c->fd, F_SETFL, fl | O_NONBLOCK) < 0) {
		ferry_error_set(err, -errno, "fcntl: %s", strerror(errno));
		goto fail;
	}
	pthread_mutex_init(&c->lock, NULL);
	c->refs = 1;
	c->server = t->server;
	c->rekey_bytes = t->rekey_bytes;
	snprintf(c->authz, sizeof(c->authz), "%s", t->authz);
	c->hs = t->server ? HS_PEEK : HS_TLS;
	ERR_clear_error();
	c->ssl = SSL_new(t->ctx);
	pthread_once(&nosig_once, nosig_init);
	if (c->ssl && nosig_method && (bio = BIO_new(nosig_method)))
		BIO_set_fd(bio, c->fd, BIO_NOCLOSE);
	if (!c->ssl || !bio) {
		char why[256];

		ferry_error_set(err, -ENOMEM, "TLS: %s", ssl_reason(why, sizeof(why)));
		goto fail_ssl;
	}
	SSL_set_bio(c->ssl, bio, bio);  /* the SSL owns it from here */
	if (t->server) {
		SSL_set_accept_state(c->ssl);
	} else {
		struct in6_addr a6;
		struct in_addr a4;
		const char *h = host ? host : t->hostname;
		bool ip = inet_pton(AF_INET, h, &a4) == 1 ||
			  inet_pton(AF_INET6, h, &a6) == 1;

		SSL_set_connect_state(c->ssl);
		/* An IP address is checked against the certificate's IP
		 * entries, a name against its DNS entries (and sent as SNI). */
		if (h[0] && ip &&
		    !X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), h))
			goto bad_name;
		if (h[0] && !ip && (!SSL_set1_host(c->ssl, h) ||
				    !SSL_set_tlsext_host_name(c->ssl, h)))
			goto bad_name;
	}
	return c;
bad_name:
	ferry_error_set(err, -EINVAL, "tls-hostname: cannot check '%s'",
			host ? host : t->hostname);
fail_ssl:
	SSL_free(c->ssl);
	pthread_mutex_destroy(&c->lock);
fail:
	close(c->fd);
	free(c);
	return NULL;
}

struct ferry_tls_conn *ferry__tls_ref(struct ferry_tls_conn *c)
{
	__atomic_fetch_add(&c->refs, 1, __ATOMIC_RELAXED);
	return c;
}

void ferry__tls_unref(struct ferry_tls_conn *c)
{
	if (!c || __atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL))
		return;
	/* No close_notify: the stream ends with its own records, and a
	 * blocking shutdown here could stall a teardown on a dead peer. */
	SSL_free(c->ssl);
	close(c->fd);
	pthread_mutex_destroy(&c->lock);
	free(c->gather);
	free(c);
}

void ferry__tls_shutdown(struct ferry_tls_conn *c)
{
	shutdown(c->fd, SHUT_RDWR);
}

bool ferry__tls_looks_like_record(const unsigned char *p, size_t len)
{
	/* Content type handshake (22) or alert (21), legacy version 3.x. */
	return len >= 3 && (p[0] == 22 || p[0] == 21) && p[1] == 3 && p[2] <= 4;
}

/* ---- waiting ------------------------------------------------------------- */

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait until the socket is ready for @events; -ETIMEDOUT after @timeout_ms
 * (<= 0: for ever). */
static int wait_fd(int fd, short events, int timeout_ms)
{
	struct pollfd p = { .fd = fd, .events = events };
	int r;

	do
		r = poll(&p, 1, timeout_ms > 0 ? timeout_ms : -1);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		return -errno;
	return r == 0 ? -ETIMEDOUT : 0;
}

/* What a failed call wants: POLLIN/POLLOUT, or 0 for a real failure. */
static short wants(int ssl_err)
{
	return ssl_err == SSL_ERROR_WANT_READ ? POLLIN
	     : ssl_err == SSL_ERROR_WANT_WRITE ? POLLOUT : 0;
}

/* ---- the handshake ------------------------------------------------------- */

/* Does the client's subject pass tls-authz? Entries are ';' separated and
 * match the RFC 2253 subject as a whole or as "CN=<common name>". */
static bool authz_ok(const char *authz, const char *subject, const char *cn)
{
	const char *p = authz;

	if (!authz[0])
		return true;
	while (*p) {
		const char *end = strchr(p, ';');
		size_t n = end ? (size_t)(end - p) : strlen(p);
		char e[1024];

		while (n && (*p == ' ' || *p == '\t')) {
			p++;
			n--;
		}
		while (n && (p[n - 1] == ' ' || p[n - 1] == '\t'))
			n--;
		if (n && n < sizeof(e)) {
			memcpy(e, p, n);
			e[n] = 0;
			if (!strcmp(e, subject) ||
			    (!strncmp(e, "CN=", 3) && cn[0] && !strcmp(e + 3, cn)))
				return true;
		}
		if (!end)
			break;
		p = end + 1;
	}
	return false;
}

/*
 * The subject (RFC 2253) and its common name, as UTF-8. Returns false when
 * either cannot be trusted for tls-authz: a subject too long for @buf, a
 * CN with a NUL inside ("ferry-source\0.evil" must not pass as
 * "ferry-source"), or more than one CN (which one would be meant?); then
 * *cn is "".
 */
static bool subject_of(X509 *x, char *buf, size_t len, char *cn, size_t cnlen)
{
	X509_NAME *n = x ? X509_get_subject_name(x) : NULL;
	bool ok = true;
	BIO *b;
	int i;

	buf[0] = cn[0] = 0;
	if (!n)
		return false;
	b = BIO_new(BIO_s_mem());
	if (!b)
		return false;
	X509_NAME_print_ex(b, n, 0, XN_FLAG_RFC2253);
	if (BIO_pending(b) >= (int)len)
		ok = false;
	i = BIO_read(b, buf, (int)len - 1);
	buf[i > 0 ? i : 0] = 0;
	BIO_free(b);
	i = X509_NAME_get_index_by_NID(n, NID_commonName, -1);
	if (i >= 0 && X509_NAME_get_index_by_NID(n, NID_commonName, i) >= 0)
		return false;
	if (i >= 0) {
		unsigned char *u = NULL;
		int k = ASN1_STRING_to_UTF8(&u, X509_NAME_ENTRY_get_data(
					    X509_NAME_get_entry(n, i)));

		if (k >= 0 && (size_t)k < cnlen && strlen((char *)u) == (size_t)k)
			memcpy(cn, u, (size_t)k + 1);
		else
			ok = false;
		OPENSSL_free(u);
	}
	return ok;
}

/* Server: the verdict on an authenticated client. */
static void make_verdict(struct ferry_tls_conn *c)
{
	X509 *x = SSL_get1_peer_certificate(c->ssl);
	char subject[512], cn[256], msg[VERDICT_MAX + 1];
	int n = 0;

	bool clean = subject_of(x, subject, sizeof(subject), cn, sizeof(cn));

	X509_free(x);
	/* A name we could not read whole passes no list (any client is
	 * still fine without one). */
	c->refused = c->authz[0] && (!clean || !authz_ok(c->authz, subject, cn));
	if (c->refused)
		n = snprintf(msg, sizeof(msg), "client '%s' is not in the "
			     "destination's tls-authz", subject);
	if (n > VERDICT_MAX)
		n = VERDICT_MAX;
	c->verdict[0] = c->refused;
	c->verdict[1] = (uint8_t)n;
	memcpy(c->verdict + 2, msg, (size_t)n);
	c->vlen = 2 + (size_t)n;
	c->vpos = 0;
}

/* A plaintext peer on a TLS listener: tell it in TLS, then refuse. */
static int hs_peek(struct ferry_tls_conn *c, short *events,
		   struct ferry_error *err)
{
	static const uint8_t alert[] = { 21, 3, 3, 0, 2, 2, 70 };
	unsigned char b[3];
	ssize_t n = recv(c->fd, b, sizeof(b), MSG_PEEK | MSG_DONTWAIT);

	if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
		*events = POLLIN;
		return -EAGAIN;
	}
	if (n < 0)
		return ferry_error_set(err, -errno, "TLS: %s", strerror(errno));
	if (n == 0)
		return ferry_error_set(err, -ECONNRESET, "TLS: the source closed "
				       "the connection before its handshake");
	if (n < (ssize_t)sizeof(b)) {
		/* Too few bytes to judge: the caller looks again soon. */
		*events = 0;
		return -EAGAIN;
	}
	if (!ferry__tls_looks_like_record(b, sizeof(b))) {
		if (send(c->fd, alert, sizeof(alert), MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
			/* Best effort: it is leaving anyway. */
		}
		return ferry_error_set(err, -EPROTO, "TLS: a plaintext peer "
				       "reached this TLS listener (tls-creds "
				       "must be set on both sides)");
	}
	c->hs = HS_TLS;
	return 0;
}

static void hs_finish(struct ferry_tls_conn *c)
{
	c->ktls_tx = BIO_get_ktls_send(SSL_get_wbio(c->ssl)) > 0;
	c->ktls_rx = BIO_get_ktls_recv(SSL_get_rbio(c->ssl)) > 0;
	c->hs = HS_DONE;
}

/* A handshake call returned @r (not 1), errno then @saved: -EAGAIN with
 * *@events to wait for, or the failure. */
static int hs_stalled(struct ferry_tls_conn *c, int r, int saved, short *events,
		      struct ferry_error *err)
{
	int e = SSL_get_error(c->ssl, r);

	if ((*events = wants(e)))
		return -EAGAIN;
	return hs_error(c, e, saved, err);
}


int ferry__tls_handshake_step(struct ferry_tls_conn *c, short *events,
			      struct ferry_error *err)
{
	int r;
	size_t n;

	for (;;) {
		switch (c->hs) {
		case HS_DONE:
			return 0;
		case HS_PEEK:
			if ((r = hs_peek(c, events, err)))
				return r;
			continue;
		case HS_TLS:
			ERR_clear_error();
			errno = 0;
			r = SSL_do_handshake(c->ssl);
			if (r != 1)
				return hs_stalled(c, r, errno, events, err);
			c->hs = HS_VERDICT;
			if (c->server)
				make_verdict(c);
			else
				c->vlen = 2;   /* its header, first */
			continue;
		case HS_VERDICT:
			ERR_clear_error();
			errno = 0;
			if (c->server)
				r = SSL_write_ex(c->ssl, c->verdict + c->vpos,
						 c->vlen - c->vpos, &n);
			else
				r = SSL_read_ex(c->ssl, c->verdict + c->vpos,
						c->vlen - c->vpos, &n);
			if (r != 1)
				return hs_stalled(c, r, errno, events, err);
			c->vpos += n;
			if (!c->server && c->vpos == 2)
				c->vlen = 2 + (size_t)c->verdict[1];
			if (c->vpos < c->vlen)
				continue;
			if (c->server && c->refused)
				return ferry_error_set(err, -EACCES, "TLS: %.*s",
						       (int)c->vlen - 2,
						       (const char *)c->verdict + 2);
			if (!c->server && c->verdict[0])
				return ferry_error_set(err, -EACCES, "TLS: the "
						       "destination refused us: "
						       "%.*s", (int)c->vlen - 2,
						       (const char *)c->verdict + 2);
			hs_finish(c);
			return 0;
		}
	}
}

int ferry__tls_handshake(struct ferry_tls_conn *c, int timeout_ms,
			 struct ferry_error *err)
{
	int64_t deadline = timeout_ms > 0 ? now_ms() + timeout_ms : -1;

	for (;;) {
		short ev = 0;
		int left, r = ferry__tls_handshake_step(c, &ev, err);

		if (r != -EAGAIN)
			return r;
		left = deadline < 0 ? -1 : (int)(deadline - now_ms());
		if (deadline >= 0 && left <= 0)
			return ferry_error_set(err, -ETIMEDOUT, "TLS: no handshake "
					       "from the %s within %d ms",
					       c->server ? "source" : "destination",
					       timeout_ms);
		if (!ev) {
			/* A partial peek: look again shortly. */
			struct timespec ts = { 0, 5000000 };

			nanosleep(&ts, NULL);
			continue;
		}
		r = wait_fd(c->fd, ev, left > 0 ? left : -1);
		if (r && r != -ETIMEDOUT)
			return ferry_error_set(err, r, "TLS: %s", strerror(-r));
	}
}

/* ---- data ---------------------------------------------------------------- */

ssize_t ferry__tls_read(struct ferry_tls_conn *c, void *buf, size_t len,
			int timeout_ms)
{
	for (;;) {
		size_t n = 0;
		int ok, e, saved, w;
		char why[128];

		ferry__mutex_lock(&c->lock);
		ERR_clear_error();
		errno = 0;
		ok = SSL_read_ex(c->ssl, buf, len, &n);
		saved = errno;
		e = ok ? SSL_ERROR_NONE : SSL_get_error(c->ssl, 0);
		if (e == SSL_ERROR_SSL)
			ssl_reason(why, sizeof(why));
		ferry__mutex_unlock(&c->lock);
		if (ok)
			return (ssize_t)n;
		switch (e) {
		case SSL_ERROR_ZERO_RETURN:
			return 0;
		case SSL_ERROR_WANT_READ:
		case SSL_ERROR_WANT_WRITE:
			w = wait_fd(c->fd, wants(e), timeout_ms);
			if (w)
				return w;
			continue;
		case SSL_ERROR_SYSCALL:
			return saved ? -saved : 0;
		default:
			/* A record that fails its tag is tampering or
			 * corruption: the stream's own word for it. */
			return -EBADMSG;
		}
	}
}

static int write_all(struct ferry_tls_conn *c, const uint8_t *p, size_t len,
		     int timeout_ms)
{
	while (len) {
		size_t n = 0;
		int ok, e, saved, w;

		ferry__mutex_lock(&c->lock);
		ERR_clear_error();
		/* Only our sending key: OpenSSL sends the KeyUpdate record
		 * ahead of this write's data, and the peer's reader switches
		 * its receiving key when it reads it. Asking the peer to
		 * update too would make a reader-only peer write. */
		if (c->tx_since_rekey >= c->rekey_bytes &&
		    SSL_key_update(c->ssl, SSL_KEY_UPDATE_NOT_REQUESTED)) {
			c->tx_since_rekey = 0;
			c->key_updates++;
		}
		ERR_clear_error();
		errno = 0;
		ok = SSL_write_ex(c->ssl, p, len, &n);
		saved = errno;
		e = ok ? SSL_ERROR_NONE : SSL_get_error(c->ssl, 0);
		if (ok)
			c->tx_since_rekey += n;
		ferry__mutex_unlock(&c->lock);
		if (ok) {
			p += n;
			len -= n;
			continue;
		}
		if (wants(e)) {
			w = wait_fd(c->fd, wants(e), timeout_ms);
			if (w)
				return w;
			continue;
		}
		ERR_clear_error();
		return e == SSL_ERROR_SYSCALL && saved ? -saved : -EPIPE;
	}
	return 0;
}

/* kTLS transmit: the kernel makes the records; plain writev(). */
static int writev_kernel(struct ferry_tls_conn *c, struct iovec *iov, int n,
			 int timeout_ms)
{
	while (n > 0) {
		struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
		ssize_t w;

		ferry__mutex_lock(&c->lock);
		w = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
		if (w < 0)
			w = -errno;
		ferry__mutex_unlock(&c->lock);
		if (w == -EINTR)
			continue;
		if (w == -EAGAIN) {
			int r = wait_fd(c->fd, POLLOUT, timeout_ms);

			if (r)
				return r;
			continue;
		}
		if (w < 0)
			return (int)w;
		ferry__iov_advance(&iov, &n, (size_t)w);
	}
	return 0;
}

int ferry__tls_writev(struct ferry_tls_conn *c, struct iovec *iov, int n,
		      int timeout_ms)
{
	int r = 0;

	if (c->ktls_tx)
		return writev_kernel(c, iov, n, timeout_ms);
	if (!c->gather && !(c->gather = malloc(GATHER_SIZE)))
		return -ENOMEM;
	c->glen = 0;
	for (int i = 0; i < n && !r; i++) {
		const uint8_t *p = iov[i].iov_base;
		size_t len = iov[i].iov_len;

		if (len >= GATHER_SIZE) {
			if (c->glen)
				r = write_all(c, c->gather, c->glen, timeout_ms);
			c->glen = 0;
			if (!r)
				r = write_all(c, p, len, timeout_ms);
			continue;
		}
		while (len && !r) {
			size_t k = GATHER_SIZE - c->glen;

			if (k > len)
				k = len;
			memcpy(c->gather + c->glen, p, k);
			c->glen += k;
			p += k;
			len -= k;
			if (c->glen == GATHER_SIZE) {
				r = write_all(c, c->gather, c->glen, timeout_ms);
				c->glen = 0;
			}
		}
	}
	if (!r && c->glen)
		r = write_all(c, c->gather, c->glen, timeout_ms);
	c->glen = 0;
	return r;
}

ssize_t ferry__tls_peek(struct ferry_tls_conn *c, void *buf, size_t len)
{
	size_t n = 0;
	int ok, e;

	ferry__mutex_lock(&c->lock);
	ERR_clear_error();
	ok = SSL_peek_ex(c->ssl, buf, len, &n);
	e = ok ? SSL_ERROR_NONE : SSL_get_error(c->ssl, 0);
	ERR_clear_error();
	ferry__mutex_unlock(&c->lock);
	if (ok)
		return (ssize_t)n;
	if (wants(e))
		return -EAGAIN;
	return e == SSL_ERROR_ZERO_RETURN || e == SSL_ERROR_SYSCALL ? 0 : -EBADMSG;
}

void ferry__tls_get_info(struct ferry_tls_conn *c, struct ferry_tls_info *i)
{
	char cn[256];
	X509 *x;

	memset(i, 0, sizeof(*i));
	ferry__mutex_lock(&c->lock);
	snprintf(i->version, sizeof(i->version), "%s", SSL_get_version(c->ssl));
	snprintf(i->cipher, sizeof(i->cipher), "%s",
		 SSL_CIPHER_get_name(SSL_get_current_cipher(c->ssl)));
	x = SSL_get1_peer_certificate(c->ssl);
	subject_of(x, i->peer, sizeof(i->peer), cn, sizeof(cn));
	X509_free(x);
	ferry__mutex_unlock(&c->lock);
	i->ktls_tx = c->ktls_tx;
	i->ktls_rx = c->ktls_rx;
	ferry__mutex_lock(&c->lock);
	i->key_updates = c->key_updates;
	ferry__mutex_unlock(&c->lock);
}

/* ---- channels ------------------------------------------------------------ */

struct tls_chan {
	struct ferry_tls_conn *conn;
	struct ferry_chan *chan;        /* for its timeout */
	int close_fd;
};

static ssize_t tc_read(void *opaque, void *buf, size_t len)
{
	struct tls_chan *tc = opaque;

	return ferry__tls_read(tc->conn, buf, len, ferry__chan_timeout(tc->chan));
}

static ssize_t tc_write(void *opaque, const void *buf, size_t len)
{
	struct tls_chan *tc = opaque;
	struct iovec iov = { (void *)buf, len };
	int r;

	/* One record run per flush: gathering is the channel's own job. */
	if (tc->conn->ktls_tx)
		r = writev_kernel(tc->conn, &iov, 1, ferry__chan_timeout(tc->chan));
	else
		r = write_all(tc->conn, buf, len, ferry__chan_timeout(tc->chan));
	return r ? r : (ssize_t)len;
}

static int tc_shutdown(void *opaque)
{
	ferry__tls_shutdown(((struct tls_chan *)opaque)->conn);
	return 0;
}

static int tc_close(void *opaque)
{
	struct tls_chan *tc = opaque;

	ferry__tls_unref(tc->conn);
	if (tc->close_fd >= 0)
		close(tc->close_fd);
	free(tc);
	return 0;
}

static const struct ferry_chan_ops tls_chan_ops = {
	.read = tc_read, .write = tc_write, .shutdown = tc_shutdown,
	.close = tc_close,
};

struct ferry_chan *ferry__tls_chan_new(struct ferry_tls_conn *c,
				       enum ferry_chan_dir dir, int close_fd)
{
	struct tls_chan *tc = calloc(1, sizeof(*tc));

	if (!tc)
		return NULL;
	tc->chan = ferry_chan_new_ops(&tls_chan_ops, tc, dir);
	if (!tc->chan) {
		free(tc);
		return NULL;
	}
	tc->conn = ferry__tls_ref(c);
	tc->close_fd = close_fd;
	return tc->chan;
}
