/*
 * tests/e2e/vmproc.h - helpers for end-to-end tests of `ferry vm`.
 * Every helper FAILs the test on error, so callers need not check.
 */
#ifndef FERRY_TEST_VMPROC_H
#define FERRY_TEST_VMPROC_H

#include <jansson.h>
#include <stdbool.h>
#include <sys/types.h>

struct proc {
	pid_t pid;
	char sock[512];
	char log[512];
	int fd;      /* control connection */
};

/*
 * True in ThreadSanitizer/AddressSanitizer builds: the VMM sends several
 * times slower there while the guest still dirties memory at full speed,
 * so tests with a dirtying guest let the VMM throttle it (auto-converge)
 * where they do not test convergence itself.
 */
bool slow_build(void);
/* A loopback TCP port that was free a moment ago. */
int free_port(void);
/* CLOCK_MONOTONIC in milliseconds. */
double now_ms(void);
/* A connection to 127.0.0.1:@port (FAILs if refused). */
int tcp_connect(int port);
/* Send all of @buf; false when the peer is gone (no SIGPIPE). */
bool send_all(int fd, const void *buf, size_t len);
/* SKIP unless @backend ("kvm" or "thread") can run here. */
void need_backend(const char *backend);
/* Start `ferry vm --control SOCK ARGS`; returns once it answers. */
void vm_spawn(struct proc *p, const char *name, const char *args);
/* The same inside network namespace /run/netns/@netns (tests/e2e/netns.h);
 * the control socket is a path, reachable from every namespace. */
void vm_spawn_ns(struct proc *p, const char *netns, const char *name,
		 const char *args);
/* Execute a command (takes @args); returns the "return" value. */
json_t *call(struct proc *p, const char *cmd, json_t *args);
/* Execute a command that must be refused: its error (desc into @msg). */
int call_fails(struct proc *p, const char *cmd, json_t *args, char *msg,
	       size_t len);
long long geti(json_t *o, const char *key);
const char *gets(json_t *o, const char *key);
long long generation(struct proc *p);
void wait_generation(struct proc *p, long long n);
void vm_quit(struct proc *p);
/* Wait for the VM process to exit by itself with @status. */
void vm_wait_exit(struct proc *p, int status);
const char *status_of(struct proc *p);
/* Wait (up to 60 s, 300 s in sanitizer builds) while an incoming VM is
 * still loading. */
void wait_loaded(struct proc *p);
/* query-ram-digest's "digest" into @out (at least 64 bytes). */
void ram_digest(struct proc *p, char *out);
json_t *verify(struct proc *p);
/* `cont`, then the guest's own verify pass must find 0 bad pages. */
void cont_verified(struct proc *p);
/* Poll query-migrate until @want; FAIL on another terminal status. */
void wait_migration(struct proc *p, const char *want);
/* Poll query-migrate until the status is @want (a live one, say "device"). */
void wait_migration_live(struct proc *p, const char *want);
/* Wait (up to 10 s) until @p's migration waits at pause point @point
 * (x-migrate-fault "pause-..."; query-migrate "paused-at"). */
void wait_paused_at(struct proc *p, const char *point);

#endif
