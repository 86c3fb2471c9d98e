/*
 * bench/benchvm.h - helpers for benchmarks that drive `ferry vm` processes
 * over their control sockets. Errors end the benchmark (die).
 */
#ifndef FERRY_BENCHVM_H
#define FERRY_BENCHVM_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include <jansson.h>

#include "control/control.h"

#define MAXRUNS 9

struct vmp {
	pid_t pid;
	int fd;
	char sock[256];
};

extern const char *bench_ferry;   /* the ferry binary */
extern char bench_dir[];          /* mkdtemp() template, then the dir */
extern const char *bench_name;    /* for messages */

void die(const char *msg);
/* Arguments [FERRY_BINARY] [RUNS] [ONLY], the scratch directory, SIGPIPE
 * ignored; bench_end removes the directory (its exit status). */
void bench_start(int argc, char **argv, const char *name, int *runs,
		 const char **only);
int bench_end(void);
int free_port(void);
/* `ferry vm --control DIR/NAME.sock ARGS`, connected. */
void spawn(struct vmp *v, const char *name, const char *args);
json_t *call(struct vmp *v, const char *cmd, json_t *args);
void quit(struct vmp *v);
/* utime + stime of a process, seconds. */
double cpu_s(pid_t pid);
long long geti(json_t *o, const char *k);
/* A JSON number (integer or real) as a double; 0 if absent. */
double getd(json_t *o, const char *k);
/* "kvm" if KVM works here, else "thread" (saying why on stdout). */
const char *bench_backend(void);
/* The guest booted (and a fill finished); a dirtying one runs 2 s more. */
void wait_workload(struct vmp *v, const char *wl, uint64_t mem);
/* Poll @v's query-migrate until completed (returned); a failure ends the
 * benchmark. */
json_t *wait_completed(struct vmp *v);
/* The same within @secs: NULL when it did not complete in time (then the
 * migration is cancelled, after a line saying how far it got). */
json_t *wait_completed_within(struct vmp *v, double secs);

/* One migration of @s to @uri, measured. */
struct bench_mig {
	double cpu_src, cpu_dst;   /* CPU seconds each side spent on it */
	double total_ms;           /* total-time */
	double downtime_ms;
	double mib_s;              /* RAM transferred over total-time */
};
/* Start the migration of @s (to @d) at @uri and wait up to @secs (0: no
 * limit) for it: its query-migrate (the caller frees it), the figures in
 * *@out; NULL if it gave up (wait_completed_within). */
json_t *bench_migrate(struct vmp *s, struct vmp *d, const char *uri,
		      double secs, struct bench_mig *out);
/* "label  min .. median .. max unit" over @n values (sorts @v). */
void stat3(const char *label, double *v, int n, const char *unit);
/* "met" or "not met", for a target checked at a bench's end. */
const char *verdict(bool met);

#endif
