/*
 * bench/soak.c - `make soak`: many live migrations back and forth between
 * two long-lived `ferry vm` processes, checking after every one that
 * nothing was lost and that neither process leaks.
 *
 * How it runs:
 *   - Two processes, A and B, started with `--incoming defer`, live for the
 *     whole soak. A third one boots the guest (a dirtying workload), hands
 *     it to A and quits. From then on the VM goes A -> B -> A -> ...: the
 *     side that holds it migrates to the other, which was the source of
 *     the migration before (`migrate-incoming` on a VM in postmigrate).
 *   - Migration i uses multifd off / on / on with zstd (i % 3), and
 *     auto-converge on for i % 6 >= 3. Faults do not move the VM, so the
 *     direction's parity shifts every 10 migrations and both directions
 *     see every combination.
 *   - Every 10th migration injects a fault whose outcome is defined: the
 *     migration fails (or is cancelled), the source keeps running the VM
 *     and verifies clean, the destination never runs it, and the next
 *     migration must succeed. A destination whose incoming migration
 *     fails ends its process by design (docs/control.md), so faulted
 *     migrations go to a throwaway third process: A and B stay the same
 *     processes for the whole soak, and their RSS and fds say whether the
 *     failure paths leak on the source.
 *   - After every completed migration: the source is postmigrate and the
 *     destination paused (A and B load with --paused), their RAM digests
 *     are equal, the destination then runs (never both, never neither),
 *     and the guest's own verify pass on it finds 0 bad pages. After a fault: the
 *     source runs and its verify pass finds 0 bad pages.
 *   - After every migration, VmRSS (/proc/PID/status) and the number of
 *     open fds (/proc/PID/fd) of A and B. In the per-100 lines "src" is
 *     the side that last migrated out (idle, postmigrate) and "dst" the
 *     side that holds the VM.
 *   - The VMs run with GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072
 *     (unless --default-malloc or GLIBC_TUNABLES is set): see main().
 *
 * Verdict (exit 1 unless all hold): 0 migrations that failed when they
 * should not have (or completed when a fault should have failed them),
 * 0 bad pages, every fd count after the warm-up equal to the count at the
 * end of the warm-up for the same process in the same role (idle or
 * holding the VM), and each process's RSS after the warm-up at most
 * --rss-tolerance MiB (default 4) above its largest value during the
 * warm-up. docs/performance.md, "Soak", says why these tolerances.
 *
 * Usage: ferry-soak [--ferry BIN] [-n MIGRATIONS] [--every N] [--warmup N]
 *                   [--fault-every N] [--fault NAME] [--mem SIZE]
 *                   [--workload SPEC] [--rss-tolerance MIB]
 *                   [--default-malloc] [--json FILE] [--keep] [-v]
 *   defaults: 1000 migrations, a report every 100, warm-up 100 (a fifth
 *   of a shorter run), a fault every 10th, 128M, dirty,ws=64M,rate=200.
 *   FERRY_TRACE=1 in the environment traces every VM's state changes into
 *   its log; --keep keeps the logs.
 */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "benchvm.h"

/* ---- options ---------------------------------------------------------- */

static int n_migrations = 1000;
static int report_every = 100;
static int fault_every = 10;
static int only_fault;                  /* --fault NAME: that one only */
static int warmup = -1;                 /* default: report_every */
static const char *mem = "128M";
static const char *workload = "dirty,ws=64M,rate=200";
static double rss_tolerance_mib = 4;
static bool default_malloc;
static const char *json_path;
static bool keep, verbose;
static const char *backend;

/* ---- processes -------------------------------------------------------- */

struct side {
	struct vmp v;
	const char *name;
	bool alive;
};

static struct side sa = { .name = "A" }, sb = { .name = "B" },
		   sx = { .name = "X" }, ss = { .name = "S" };

static bool finished;   /* main returned: no logs to show */
static char last_x[16] = "x";   /* the last throwaway destination's name */

static void cleanup(void)
{
	struct side *all[] = { &sa, &sb, &sx, &ss };
	char cmd[160];

	/* Ended early (die, exit): what the VMs said last. */
	if (!finished && bench_dir[0] && !strstr(bench_dir, "XXXXXX")) {
		fflush(stdout);
		snprintf(cmd, sizeof(cmd), "cd %s && tail -n 8 [abs].log %s.log "
			 ">&2 2>/dev/null", bench_dir, last_x);
		if (system(cmd))
			fprintf(stderr, "soak: no logs in %s\n", bench_dir);
	}

	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
		if (all[i]->alive && all[i]->v.pid > 0) {
			kill(all[i]->v.pid, SIGKILL);
			waitpid(all[i]->v.pid, NULL, 0);
			all[i]->alive = false;
		}
	if (keep || !bench_dir[0] || strstr(bench_dir, "XXXXXX"))
		return;
	snprintf(cmd, sizeof(cmd), "rm -rf %s", bench_dir);
	if (system(cmd))
		fprintf(stderr, "soak: could not remove %s\n", bench_dir);
}

/* Killed (SIGTERM from a timeout, say): the VMs go too, or their guests
 * would dirty memory for ever. Only kill() here; the scratch directory
 * stays. */
static void on_signal(int sig)
{
	struct side *all[] = { &sa, &sb, &sx, &ss };

	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
		if (all[i]->alive && all[i]->v.pid > 0)
			kill(all[i]->v.pid, SIGKILL);
	signal(sig, SIG_DFL);
	raise(sig);
}

/* Its control socket and log are DIR/NAME.sock and DIR/NAME.log; NULL:
 * the side's name in lower case. */
static void side_spawn(struct side *s, const char *name_or_null,
		       const char *args)
{
	char name[16];

	snprintf(name, sizeof(name), "%s", name_or_null ? name_or_null : "");
	if (!name_or_null)
		snprintf(name, sizeof(name), "%c", s->name[0] | 0x20);
	/* spawn() sets the pid right after fork: a VM that never answers is
	 * killed on the way out too. */
	s->v.pid = 0;
	s->alive = true;
	spawn(&s->v, name, args);
}

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* A command that may be refused: the reply, or NULL with the reason. */
static json_t *try_call(struct side *s, const char *cmd, json_t *args,
			char *why, size_t len)
{
	struct ferry_error err = { 0 };
	json_t *ret = NULL;
	int r = control_client_call(s->v.fd, cmd, args, &ret, 120000, &err);

	json_decref(args);
	if (r) {
		snprintf(why, len, "%s", err.msg);
		return NULL;
	}
	return ret;
}

static const char *jstr(json_t *o, const char *k)
{
	const char *s = json_string_value(json_object_get(o, k));
	return s ? s : "";
}

static void run_state(struct side *s, char *out, size_t len)
{
	json_t *r = call(&s->v, "query-status", NULL);

	snprintf(out, len, "%s", jstr(r, "status"));
	json_decref(r);
}

/* The process exited within @ms: its wait status in *st. */
static bool reaped(struct side *s, int ms, int *st)
{
	for (int i = 0; i < ms / 10; i++) {
		if (waitpid(s->v.pid, st, WNOHANG) == s->v.pid) {
			close(s->v.fd);
			s->alive = false;
			return true;
		}
		usleep(10000);
	}
	return false;
}

static long rss_kib(pid_t pid)
{
	char path[64], line[256];
	long kb = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	if (!(f = fopen(path, "r")))
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
			break;
	fclose(f);
	return kb;
}

static int count_fds(pid_t pid)
{
	char path[64];
	struct dirent *e;
	int n = 0;
	DIR *d;

	snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
	if (!(d = opendir(path)))
		return -1;
	while ((e = readdir(d)))
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n;
}

/* ---- one migration ---------------------------------------------------- */

enum fault {
	F_NONE,
	F_STALL_LOAD,      /* destination stops answering while it loads */
	F_LOSE_LOADED,     /* destination's LOADED never leaves */
	F_HOLD_CANCEL,     /* source held in device (vCPUs stopped), cancelled */
	F_KILL_DEST,       /* destination SIGKILLed during precopy */
	F_LOSE_EOF,        /* source falls silent before EOF */
	F_CANCEL_PRECOPY,  /* migrate-cancel during precopy */
	F_STOP_DEST,       /* destination SIGSTOPped during precopy, released */
	F_LOSE_SWO_ACK,    /* switchover-ack never comes */
	F__MAX
};

static const char *const fault_names[F__MAX] = {
	[F_NONE] = "none",
	[F_STALL_LOAD] = "stall-load",
	[F_LOSE_LOADED] = "lose-loaded",
	[F_HOLD_CANCEL] = "hold-device+cancel",
	[F_KILL_DEST] = "kill-destination",
	[F_LOSE_EOF] = "lose-eof",
	[F_CANCEL_PRECOPY] = "cancel-in-precopy",
	[F_STOP_DEST] = "stop-destination",
	[F_LOSE_SWO_ACK] = "lose-switchover-ack",
};

/* The source's error-desc must contain this (or the status is cancelled). */
static const char *const fault_error[F__MAX] = {
	[F_STALL_LOAD] = "no word from the destination",
	[F_LOSE_LOADED] = "no word from the destination",
	[F_HOLD_CANCEL] = "cancelled",
	[F_KILL_DEST] = "",
	[F_LOSE_EOF] = "no data from the source",
	[F_CANCEL_PRECOPY] = "cancelled",
	[F_STOP_DEST] = "no word from the destination",
	[F_LOSE_SWO_ACK] = "switchover-ack",
};

struct totals {
	int done, completed, intended, unintended;
	long long bad_pages;
	int fault_count[F__MAX];
};

static struct totals tot, win;
static double *downtimes_ms, *win_downtimes_ms, *mig_seconds;
static double last_downtime_ms;          /* of the last completed one */
/* The longest downtime: which migration, and what its source said. */
static double worst_ms = -1;
static int worst_i;
static char *worst_info;
static int n_down, n_win_down;

static bool this_bad;   /* the current migration went wrong */

static void unintended(int i, const char *what, const char *detail)
{
	fprintf(stderr, "soak: migration %d: UNINTENDED: %s%s%s\n", i, what,
		detail && detail[0] ? ": " : "", detail ? detail : "");
	this_bad = true;
}

static void set_config(struct side *src, struct side *dst, int i,
		       enum fault f)
{
	int mf = i % 3;
	bool ac = i % 6 >= 3, ack = f == F_LOSE_SWO_ACK;
	bool slow = f == F_KILL_DEST || f == F_CANCEL_PRECOPY ||
		    f == F_STOP_DEST;
	json_t *caps = json_pack("[{s:s,s:b},{s:s,s:b},{s:s,s:b}]",
				 "capability", "multifd", "state", mf > 0,
				 "capability", "auto-converge", "state", ac,
				 "capability", "switchover-ack", "state", ack);

	json_decref(call(&src->v, "migrate-set-capabilities",
			 json_pack("{s:O}", "capabilities", caps)));
	json_decref(call(&dst->v, "migrate-set-capabilities",
			 json_pack("{s:o}", "capabilities", caps)));
	/* A peer-timeout of 2 s on the side that must notice a silent peer
	 * (the default 10 s would only make the soak slower), and only
	 * there: a destination's acceptor also drops a connection it has
	 * not heard from within peer-timeout of accepting it, and on this
	 * shared 2-core machine 1 s of not being scheduled happens
	 * (docs/performance.md, "Soak"). 16 MiB/s for the faults that must
	 * land in the middle of precopy. */
	bool src_short = f == F_STALL_LOAD || f == F_LOSE_LOADED ||
			 f == F_STOP_DEST;

	json_decref(call(&src->v, "migrate-set-parameters", json_pack(
		"{s:i,s:s,s:i,s:I,s:i}", "multifd-channels", 2,
		"multifd-compression", mf == 2 ? "zstd" : "none",
		"peer-timeout", src_short ? 2000 : 10000,
		"max-bandwidth", (json_int_t)(slow ? 16 << 20 : 0),
		"switchover-ack-timeout", ack ? 1000 : 60000)));
	json_decref(call(&dst->v, "migrate-set-parameters", json_pack(
		"{s:i,s:s,s:i}", "multifd-channels", 2,
		"multifd-compression", mf == 2 ? "zstd" : "none",
		"peer-timeout", f == F_LOSE_EOF ? 2000 : 10000)));
}

/* migrate-incoming on a fresh port (another process may take the one
 * free_port found), then migrate. */
static void start(struct side *src, struct side *dst)
{
	char uri[64], why[512] = "";
	json_t *r = NULL;

	for (int t = 0; t < 5 && !r; t++) {
		snprintf(uri, sizeof(uri), "tcp:127.0.0.1:%d", free_port());
		r = try_call(dst, "migrate-incoming",
			     json_pack("{s:s}", "uri", uri), why, sizeof(why));
	}
	if (!r) {
		fprintf(stderr, "soak: migrate-incoming on %s: %s\n", dst->name, why);
		exit(1);
	}
	json_decref(r);
	json_decref(call(&src->v, "migrate", json_pack("{s:s}", "uri", uri)));
}

/* Poll the source's query-migrate until a terminal status (returned). */
static json_t *wait_end(struct side *src, int timeout_s)
{
	double t0 = now_s();

	for (;;) {
		json_t *m = call(&src->v, "query-migrate", NULL);
		const char *st = jstr(m, "status");

		if (!strcmp(st, "completed") || !strcmp(st, "failed") ||
		    !strcmp(st, "cancelled"))
			return m;
		json_decref(m);
		if (now_s() - t0 > timeout_s)
			return NULL;
		usleep(2000);
	}
}

/* Poll until the source's status is @want, or RAM it sent passed
 * @min_bytes while active; false on a terminal status or after 60 s.
 * ram.precopy-bytes, not ram.transferred: in a process that migrated
 * before, ram.transferred starts from the last migration's count (the RAM
 * counters are never reset), so it would pass at once. */
static bool wait_point(struct side *src, const char *want, long long min_bytes)
{
	for (int t = 0; t < 30000; t++) {
		json_t *m = call(&src->v, "query-migrate", NULL);
		const char *st = jstr(m, "status");
		bool hit = want ? !strcmp(st, want) :
			  !strcmp(st, "active") &&
			  geti(json_object_get(m, "ram"), "precopy-bytes") >= min_bytes;
		bool over = !strcmp(st, "completed") || !strcmp(st, "failed") ||
			    !strcmp(st, "cancelled");

		if (hit && verbose) {
			char *d = json_dumps(m, JSON_COMPACT);

			printf("soak: the fault's moment: %s\n", d);
			free(d);
		}
		json_decref(m);
		if (hit)
			return true;
		if (over)
			return false;
		usleep(2000);
	}
	return false;
}

static long long guest_bad_pages(struct side *s)
{
	json_t *v = call(&s->v, "guest-verify", json_pack("{s:b}", "wait", 1));
	long long bad = geti(v, "bad-pages");

	if (bad)
		fprintf(stderr, "soak: %s: %lld bad pages (first %lld, last %lld)\n",
			s->name, bad, geti(v, "first-bad-page"),
			geti(v, "last-bad-page"));
	json_decref(v);
	return bad;
}

/* A normal migration, src -> dst. True when the VM moved. */
/* The destination's side of a completed migration (up to 10 s). */
static void wait_dest_completed(struct side *dst)
{
	for (int t = 0; t < 5000; t++) {
		json_t *dm = call(&dst->v, "query-migrate", NULL);
		bool done = !strcmp(jstr(dm, "status"), "completed");

		json_decref(dm);
		if (done)
			return;
		usleep(2000);
	}
}

/* Equal RAM digests of two stopped sides. */
static bool same_ram(struct side *a, struct side *b)
{
	json_t *da = call(&a->v, "query-ram-digest", NULL);
	json_t *db = call(&b->v, "query-ram-digest", NULL);
	bool same = !strcmp(jstr(da, "digest"), jstr(db, "digest")) &&
		    *jstr(da, "digest");

	json_decref(da);
	json_decref(db);
	return same;
}

/* A migration that does not end: the source's and (unless NULL: killed or
 * stopped by the fault) the destination's query-migrate and status, so the
 * report says where it stuck. */
static void dump_stuck(struct side *src, struct side *dst)
{
	struct side *both[2] = { src, dst };

	for (int k = 0; k < 2 && both[k]; k++) {
		json_t *m = call(&both[k]->v, "query-migrate", NULL);
		json_t *st = call(&both[k]->v, "query-status", NULL);
		char *js = json_dumps(m, JSON_COMPACT);

		fprintf(stderr, "soak: %s (%s, %s): %s\n", both[k]->name,
			k ? "destination" : "source", jstr(st, "status"),
			js ? js : "?");
		free(js);
		json_decref(m);
		json_decref(st);
	}
}

static bool migrate_once(int i, struct side *src, struct side *dst)
{
	char s1[32], s2[32];
	json_t *m;
	bool moved = false;

	set_config(src, dst, i, F_NONE);
	start(src, dst);
	m = wait_end(src, 300);
	if (!m) {
		unintended(i, "no end after 300 s", "");
		dump_stuck(src, dst);
		exit(1);
	}
	if (!strcmp(jstr(m, "status"), "completed")) {
		double d = (double)geti(m, "downtime-us") / 1000.0;

		downtimes_ms[n_down++] = d;
		win_downtimes_ms[n_win_down++] = d;
		last_downtime_ms = d;
		if (d > worst_ms) {
			json_t *w = json_pack("{s:O?,s:O?,s:O?,s:O?,s:O?}",
				"total-time", json_object_get(m, "total-time"),
				"expected-downtime",
				json_object_get(m, "expected-downtime"),
				"downtime-phases",
				json_object_get(m, "downtime-phases"),
				"pass", json_object_get(m, "pass"),
				"cpu-throttle-percentage",
				json_object_get(m, "cpu-throttle-percentage"));

			free(worst_info);
			worst_info = json_dumps(w, JSON_COMPACT | JSON_REAL_PRECISION(4));
			json_decref(w);
			worst_ms = d;
			worst_i = i;
		}
		wait_dest_completed(dst);
		/* Both stopped (the destination loads --paused): the same
		 * RAM on both sides, byte for byte; then the guest resumes. */
		run_state(src, s1, sizeof(s1));
		run_state(dst, s2, sizeof(s2));
		if (strcmp(s1, "postmigrate") || strcmp(s2, "paused")) {
			char d2[96];

			snprintf(d2, sizeof(d2), "source %s, destination %s", s1, s2);
			unintended(i, "completed, but", d2);
		} else if (!same_ram(src, dst)) {
			unintended(i, "completed, but", "the RAM digests differ");
		} else {
			json_decref(call(&dst->v, "cont", NULL));
			run_state(dst, s2, sizeof(s2));
			if (strcmp(s2, "running")) {
				unintended(i, "cont, but the destination is", s2);
			} else {
				tot.completed++;
				win.completed++;
				moved = true;
			}
		}
		tot.bad_pages += guest_bad_pages(dst);
	} else {
		int st;

		unintended(i, jstr(m, "status"), jstr(m, "error-desc"));
		/* Carry on where the VM is, if it is whole somewhere. */
		run_state(src, s1, sizeof(s1));
		if (strcmp(s1, "running")) {
			fprintf(stderr, "soak: the source is %s; stopping\n", s1);
			exit(1);
		}
		tot.bad_pages += guest_bad_pages(src);
		if (reaped(dst, 15000, &st)) {
			fprintf(stderr, "soak: %s exited (0x%x); the soak cannot "
				"go on with the same processes\n", dst->name, st);
			exit(1);
		}
	}
	json_decref(m);
	return moved;
}

/* A migration with a fault, src -> the throwaway X. The VM stays on src. */
static void migrate_faulted(int i, struct side *src, enum fault f)
{
	char args[256], s1[32], s2[32] = "gone", why[700], xname[16];
	const char *want = fault_error[f];
	bool ok = true, x_stays = f == F_STALL_LOAD;
	json_t *m;
	int st;

	snprintf(args, sizeof(args), "--backend %s --mem %s --incoming defer",
		 backend, mem);
	if (sx.alive) {   /* never left behind, but never leaked either */
		kill(sx.v.pid, SIGKILL);
		reaped(&sx, 10000, &st);
	}
	/* A log of its own (x60.log), kept with --keep. */
	snprintf(xname, sizeof(xname), "x%d", i);
	snprintf(last_x, sizeof(last_x), "%s", xname);
	side_spawn(&sx, xname, args);
	set_config(src, &sx, i, f);
	if (f == F_STALL_LOAD || f == F_LOSE_LOADED || f == F_LOSE_SWO_ACK)
		json_decref(call(&sx.v, "x-migrate-fault", json_pack("{s:s}",
				 "point", f == F_STALL_LOAD ? "stall-load" :
				 f == F_LOSE_LOADED ? "lose-loaded" :
				 "lose-switchover-ack")));
	if (f == F_HOLD_CANCEL || f == F_LOSE_EOF)
		json_decref(call(&src->v, "x-migrate-fault", json_pack("{s:s}",
				 "point", f == F_HOLD_CANCEL ? "hold-device" :
				 "lose-eof")));
	start(src, &sx);
	switch (f) {
	case F_HOLD_CANCEL:
		ok = wait_point(src, "device", 0);
		if (ok) {
			run_state(src, s1, sizeof(s1));
			ok = !strcmp(s1, "finish-migrate");
		}
		json_decref(try_call(src, "migrate-cancel", NULL, why,
				     sizeof(why)));
		break;
	case F_CANCEL_PRECOPY:
		ok = wait_point(src, NULL, 8 << 20);
		json_decref(try_call(src, "migrate-cancel", NULL, why,
				     sizeof(why)));
		break;
	case F_KILL_DEST:
		ok = wait_point(src, NULL, 8 << 20);
		kill(sx.v.pid, SIGKILL);
		break;
	case F_STOP_DEST:
		ok = wait_point(src, NULL, 8 << 20);
		kill(sx.v.pid, SIGSTOP);
		break;
	default:
		break;
	}
	if (!ok)
		unintended(i, fault_names[f], "the fault's moment never came");
	m = wait_end(src, 120);
	if (!m) {
		unintended(i, fault_names[f], "no end after 120 s");
		dump_stuck(src, NULL);
		exit(1);
	}
	if (f == F_STOP_DEST)
		kill(sx.v.pid, SIGCONT);   /* released: it must give up */
	/* Never both running: X must not have started the VM (a killed or
	 * exiting X counts as gone). */
	if (f != F_KILL_DEST) {
		json_t *r = try_call(&sx, "query-status", NULL, why, sizeof(why));

		if (r)
			snprintf(s2, sizeof(s2), "%s", jstr(r, "status"));
		json_decref(r);
	}
	run_state(src, s1, sizeof(s1));
	st = !strcmp(jstr(m, "status"), "cancelled");
	if (!strcmp(jstr(m, "status"), "completed") ||
	    !strstr(st ? "cancelled" : jstr(m, "error-desc"), want)) {
		snprintf(why, sizeof(why), "%s: %s", jstr(m, "status"),
			 jstr(m, "error-desc"));
		unintended(i, fault_names[f], why);
		ok = false;
	} else if (strcmp(s1, "running") || !strcmp(s2, "running")) {
		snprintf(why, sizeof(why), "source %s, destination %s", s1, s2);
		unintended(i, fault_names[f], why);
		ok = false;
	}
	json_decref(m);
	tot.bad_pages += guest_bad_pages(src);
	/* The throwaway destination: gone by itself with status 1 (it could
	 * not take the VM), except a stalled one, which waits for quit. */
	if (x_stays) {
		json_decref(try_call(&sx, "quit", NULL, why, sizeof(why)));
		if (!reaped(&sx, 20000, &st)) {
			unintended(i, fault_names[f], "the stalled destination "
				   "did not quit");
			kill(sx.v.pid, SIGKILL);
			reaped(&sx, 10000, &st);
			ok = false;
		}
	} else if (!reaped(&sx, 20000, &st)) {
		json_t *r = try_call(&sx, "query-migrate", NULL, why, sizeof(why));
		char *d = r ? json_dumps(r, JSON_COMPACT) : NULL;

		unintended(i, fault_names[f], "the destination did not exit");
		fprintf(stderr, "soak: its query-migrate: %s\n", d ? d : why);
		free(d);
		json_decref(r);
		if (getenv("SOAK_GDB")) {
			char cmd[128];

			snprintf(cmd, sizeof(cmd), "gdb -p %d -batch -ex 'thread "
				 "apply all bt' >&2 2>/dev/null", (int)sx.v.pid);
			if (system(cmd))
				fprintf(stderr, "soak: gdb failed\n");
		}
		kill(sx.v.pid, SIGKILL);
		reaped(&sx, 10000, &st);
		ok = false;
	} else if (f != F_KILL_DEST && !(WIFEXITED(st) && WEXITSTATUS(st) == 1)) {
		snprintf(why, sizeof(why), "destination wait status 0x%x", st);
		unintended(i, fault_names[f], why);
		ok = false;
	}
	if (ok && !this_bad) {
		tot.intended++;
		win.intended++;
	}
	tot.fault_count[f]++;
}

/* ---- leak accounting ---------------------------------------------------- */

/*
 * Open fds per process (A, B) and role (0: idle, having migrated out, 1:
 * holding the VM): after the warm-up, every count must equal the last one
 * of the warm-up in the same role. RSS per process, whatever its role (the
 * idle side keeps its copy of guest RAM): after the warm-up it must stay
 * within --rss-tolerance of the largest value seen in the warm-up; the
 * slope of a least-squares line through the samples after the warm-up is
 * printed too (a leak is a slope, an allocator's cache a step).
 */
struct fd_use {
	int base;                /* the last count of the warm-up; -1 none */
	int min, max, samples;   /* after the warm-up */
};

struct rss_use {
	long warm_max;           /* KiB */
	long max, last;          /* after the warm-up */
	double n, sx, sy, sxx, sxy;   /* for the slope */
};

static struct fd_use fduse[2][2];
static struct rss_use rssuse[2];

static void usage_init(void)
{
	for (int p = 0; p < 2; p++)
		for (int r = 0; r < 2; r++)
			fduse[p][r] = (struct fd_use){ .base = -1, .min = 1 << 30 };
}

static void sample(struct side *s, int p, int role, int i)
{
	struct fd_use *f = &fduse[p][role];
	struct rss_use *u = &rssuse[p];
	long rss = rss_kib(s->v.pid);
	int fds = count_fds(s->v.pid);

	if (i <= warmup) {
		u->warm_max = rss > u->warm_max ? rss : u->warm_max;
		f->base = fds;
		return;
	}
	if (f->base < 0)   /* the warm-up never saw this role */
		f->base = fds;
	f->min = fds < f->min ? fds : f->min;
	f->max = fds > f->max ? fds : f->max;
	f->samples++;
	if (!u->warm_max)
		u->warm_max = rss;
	u->last = rss;
	u->max = rss > u->max ? rss : u->max;
	u->n += 1;
	u->sx += i;
	u->sy += (double)rss;
	u->sxx += (double)i * i;
	u->sxy += (double)i * (double)rss;
}

/* KiB per 100 migrations. */
static double rss_slope(const struct rss_use *u)
{
	double d = u->n * u->sxx - u->sx * u->sx;

	return u->n < 3 || d == 0 ? 0 :
	       100 * (u->n * u->sxy - u->sx * u->sy) / d;
}

static int cmpd(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static void pct(double *v, int n, double *p50, double *p99, double *max)
{
	if (!n) {
		*p50 = *p99 = *max = 0;
		return;
	}
	qsort(v, (size_t)n, sizeof(*v), cmpd);
	*p50 = v[(n - 1) / 2];
	*p99 = v[(int)((n - 1) * 0.99 + 0.5)];
	*max = v[n - 1];
}

static void report(int i, struct side *src, struct side *dst, double t0,
		   double tw)
{
	double p50, p99, max;

	pct(win_downtimes_ms, n_win_down, &p50, &p99, &max);
	printf("soak: %4d/%d  completed %d  failed as intended %d  "
	       "unintended %d  bad pages %lld | src %s rss %.1f MiB fds %d, "
	       "dst %s rss %.1f MiB fds %d | downtime p50 %.1f p99 %.1f "
	       "max %.1f ms | %.2f s/migration, %.0f s in all\n",
	       i, n_migrations, tot.completed, tot.intended, tot.unintended,
	       tot.bad_pages, src->name, rss_kib(src->v.pid) / 1024.0,
	       count_fds(src->v.pid), dst->name, rss_kib(dst->v.pid) / 1024.0,
	       count_fds(dst->v.pid), p50, p99, max,
	       (now_s() - tw) / (double)(win.completed + win.intended +
					  win.unintended), now_s() - t0);
	fflush(stdout);
	memset(&win, 0, sizeof(win));
	n_win_down = 0;
}

/* `quit`, then the process must exit with status 0. */
static bool quit_clean(struct side *s)
{
	char why[512];
	int st;

	json_decref(try_call(s, "quit", NULL, why, sizeof(why)));
	if (!reaped(s, 60000, &st)) {
		fprintf(stderr, "soak: %s did not quit\n", s->name);
		return false;
	}
	if (!WIFEXITED(st) || WEXITSTATUS(st)) {
		fprintf(stderr, "soak: %s ended with wait status 0x%x after "
			"quit\n", s->name, st);
		return false;
	}
	return true;
}

/* ---- main --------------------------------------------------------------- */

static void usage_exit(int status)
{
	fprintf(status ? stderr : stdout, "usage: ferry-soak [--ferry BIN] [-n MIGRATIONS] "
		"[--every N] [--warmup N] [--fault-every N] [--fault NAME] [--mem SIZE] [--workload SPEC] "
		"[--rss-tolerance MIB] [--default-malloc] [--json FILE] [--keep] [-v]\n"
		"(bench/soak.c and docs/performance.md, \"Soak\", say more)\n");
	exit(status);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "ferry", required_argument, NULL, 'f' },
		{ "migrations", required_argument, NULL, 'n' },
		{ "every", required_argument, NULL, 'e' },
		{ "warmup", required_argument, NULL, 'w' },
		{ "fault-every", required_argument, NULL, 'F' },
		{ "fault", required_argument, NULL, 'o' },
		{ "mem", required_argument, NULL, 'm' },
		{ "workload", required_argument, NULL, 'l' },
		{ "rss-tolerance", required_argument, NULL, 'r' },
		{ "json", required_argument, NULL, 'j' },
		{ "keep", no_argument, NULL, 'k' },
		{ "default-malloc", no_argument, NULL, 'M' },
		{ "verbose", no_argument, NULL, 'v' },
		{ "help", no_argument, NULL, 'h' },
		{ 0 }
	};
	struct side *holder = &sa, *other = &sb;
	double t0, tw, p50, p99, max, w50, w99, wmax;
	bool fds_ok = true, rss_ok = true, exits_ok, pass;
	long rss_growth = 0;
	int c, fd_growth = 0;
	char args[256];
	json_t *m;

	bench_name = "soak";
	while ((c = getopt_long(argc, argv, "n:vh", opts, NULL)) != -1) {
		switch (c) {
		case 'f': bench_ferry = optarg; break;
		case 'n': n_migrations = atoi(optarg); break;
		case 'e': report_every = atoi(optarg); break;
		case 'w': warmup = atoi(optarg); break;
		case 'F': fault_every = atoi(optarg); break;
		case 'o':
			for (int f = 1; f < F__MAX; f++)
				if (!strcmp(optarg, fault_names[f]))
					only_fault = f;
			if (!only_fault)
				usage_exit(2);
			break;
		case 'm': mem = optarg; break;
		case 'l': workload = optarg; break;
		case 'r': rss_tolerance_mib = atof(optarg); break;
		case 'j': json_path = optarg; break;
		case 'k': keep = true; break;
		case 'M': default_malloc = true; break;
		case 'v': verbose = true; break;
		case 'h': usage_exit(0); break;
		default: usage_exit(2);
		}
	}
	if (optind != argc || n_migrations < 1 || report_every < 1 ||
	    fault_every < 1)
		usage_exit(2);
	if (warmup < 0)
		warmup = report_every < n_migrations ? report_every : n_migrations / 5;
	downtimes_ms = calloc((size_t)n_migrations, sizeof(double));
	win_downtimes_ms = calloc((size_t)n_migrations, sizeof(double));
	mig_seconds = calloc((size_t)n_migrations + 1, sizeof(double));
	if (!downtimes_ms || !win_downtimes_ms || !mig_seconds)
		die("out of memory");
	/* A name of its own, so nobody takes it for a benchmark's. */
	snprintf(bench_dir, sizeof("/tmp/ferry-bench-XXXXXX"),
		 "/tmp/ferry-soak-XXXXXX");
	if (!mkdtemp(bench_dir))
		die("mkdtemp");
	atexit(cleanup);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	signal(SIGHUP, on_signal);
	/* glibc keeps freed large buffers: its mmap threshold rises to the
	 * largest block freed (up to 32 MiB) and each thread's arena keeps
	 * its own, so a VMM that runs a new migration thread now and then
	 * grows by a ~17 MiB step whenever one lands in a new arena. Not a
	 * leak, but it hides one: with a fixed threshold, large blocks go
	 * back to the kernel when freed and RSS follows what is live.
	 * --default-malloc measures glibc's defaults instead. */
	if (!default_malloc && !getenv("GLIBC_TUNABLES"))
		setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072", 1);
	backend = bench_backend();
	usage_init();
	setvbuf(stdout, NULL, _IOLBF, 0);

	printf("soak: %d migrations between two %s %s VMs (%s), a fault every "
	       "%d; report every %d, warm-up %d, RSS tolerance %.0f MiB; "
	       "GLIBC_TUNABLES=%s\n",
	       n_migrations, mem, backend, workload, fault_every,
	       report_every, warmup,
	       rss_tolerance_mib, getenv("GLIBC_TUNABLES") ?
	       getenv("GLIBC_TUNABLES") : "(glibc defaults)");
	/* A and B wait for their first incoming; S boots the guest and hands
	 * it to A. */
	snprintf(args, sizeof(args), "--backend %s --mem %s --paused "
		 "--incoming defer", backend, mem);
	side_spawn(&sa, NULL, args);
	side_spawn(&sb, NULL, args);
	snprintf(args, sizeof(args), "--backend %s --mem %s --workload %s",
		 backend, mem, workload);
	side_spawn(&ss, NULL, args);
	wait_workload(&ss.v, workload, 0);
	start(&ss, &sa);
	m = wait_end(&ss, 300);
	if (!m || strcmp(jstr(m, "status"), "completed"))
		die("the first migration, from the booting VM to A, failed");
	json_decref(m);
	wait_dest_completed(&sa);
	if (!same_ram(&ss, &sa))
		die("the first migration, to A: the RAM digests differ");
	json_decref(call(&sa.v, "cont", NULL));
	quit(&ss.v);
	ss.alive = false;
	if (guest_bad_pages(&sa))
		die("bad pages after the first migration");

	t0 = tw = now_s();
	for (int i = 1; i <= n_migrations; i++) {
		enum fault f = i % fault_every ? F_NONE : only_fault ?
			       (enum fault)only_fault : (enum fault)
			       (1 + (i / fault_every - 1) % (F__MAX - 1));
		double ts = now_s();

		this_bad = false;
		if (f == F_NONE) {
			if (migrate_once(i, holder, other)) {
				struct side *t = holder;

				holder = other;
				other = t;
			}
		} else {
			migrate_faulted(i, holder, f);
		}
		mig_seconds[i] = now_s() - ts;
		if (this_bad) {
			tot.unintended++;
			win.unintended++;
		}
		if (verbose && f == F_NONE && !this_bad)
			printf("soak: %d %s -> %s, multifd %s%s%s: %.2f s, "
			       "downtime %.1f ms\n", i, other->name,
			       holder->name, i % 3 ? "on" : "off",
			       i % 3 == 2 ? " zstd" : "", i % 6 >= 3 ?
			       ", auto-converge" : "", mig_seconds[i],
			       last_downtime_ms);
		else if (verbose)
			printf("soak: %d %s %s -> %s, multifd %s%s%s: %.2f s\n", i,
			       fault_names[f], f ? holder->name :
			       other->name, f ? "X" : holder->name,
			       i % 3 ? "on" : "off", i % 3 == 2 ? " zstd" :
			       "", i % 6 >= 3 ? ", auto-converge" : "",
			       mig_seconds[i]);
		tot.done = i;
		/* Role 0: idle (last migrated out), 1: holds the VM. */
		sample(&sa, 0, holder == &sa, i);
		sample(&sb, 1, holder == &sb, i);
		if (i % report_every == 0 || i == n_migrations) {
			report(i, other, holder, t0, tw);
			tw = now_s();
		}
	}
	/* Both must end cleanly when told to (under AddressSanitizer that
	 * includes its leak check at exit). */
	exits_ok = quit_clean(&sa) & quit_clean(&sb);

	/* The verdict. */
	for (int p = 0; p < 2; p++) {
		struct rss_use *u = &rssuse[p];
		long g = u->max - u->warm_max;

		for (int r = 0; r < 2; r++) {
			struct fd_use *f = &fduse[p][r];

			if (!f->samples)
				continue;
			if (f->min != f->base || f->max != f->base) {
				fds_ok = false;
				if (f->max - f->base > fd_growth)
					fd_growth = f->max - f->base;
			}
			printf("soak: %s %s: fds %d at the end of the warm-up, "
			       "%d..%d after it\n", p ? "B" : "A",
			       r ? "holding the VM" : "idle", f->base, f->min,
			       f->max);
		}
		if (!u->n)
			continue;
		rss_growth = g > rss_growth ? g : rss_growth;
		if (g > (long)(rss_tolerance_mib * 1024))
			rss_ok = false;
		printf("soak: %s: RSS at most %.1f MiB in the warm-up, %.1f MiB "
		       "after it (last %.1f); slope %+.0f KiB per 100 "
		       "migrations\n", p ? "B" : "A", u->warm_max / 1024.0,
		       u->max / 1024.0, u->last / 1024.0, rss_slope(u));
	}
	pct(downtimes_ms, n_down, &p50, &p99, &max);
	pct(mig_seconds + 1, n_migrations, &w50, &w99, &wmax);
	pass = !tot.unintended && !tot.bad_pages && fds_ok && rss_ok && exits_ok &&
	       tot.completed + tot.intended == n_migrations;
	printf("soak: faults:");
	for (int f = 1; f < F__MAX; f++)
		printf(" %s %d%s", fault_names[f], tot.fault_count[f],
		       f + 1 < F__MAX ? "," : "\n");
	printf("soak: %s: %d migrations in %.0f s (%.2f s each): %d completed, "
	       "%d failed as intended, %d unintended, %lld bad pages;%s fds %s; "
	       "RSS growth %.1f MiB (tolerance %.0f); downtime p50 %.1f p99 "
	       "%.1f max %.1f ms\n", pass ? "PASS" : "FAIL", n_migrations,
	       now_s() - t0, (now_s() - t0) / n_migrations, tot.completed,
	       tot.intended, tot.unintended, tot.bad_pages,
	       exits_ok ? "" : " A or B did not exit cleanly;",
	       fds_ok ? "steady" : "GREW", rss_growth / 1024.0,
	       rss_tolerance_mib, p50, p99, max);
	printf("soak: wall time per migration p50 %.2f p99 %.2f max %.2f s\n",
	       w50, w99, wmax);
	if (worst_info)
		printf("soak: the longest downtime, %.1f ms, was migration %d "
		       "(multifd %s%s%s): %s\n", worst_ms, worst_i,
		       worst_i % 3 ? "on" : "off", worst_i % 3 == 2 ? " zstd" : "",
		       worst_i % 6 >= 3 ? ", auto-converge" : "", worst_info);
	if (json_path) {
		json_t *o = json_pack("{s:i,s:i,s:i,s:i,s:I,s:b,s:i,s:f,s:f,s:f,"
				      "s:f,s:f,s:b,s:b}",
			"migrations", n_migrations, "completed", tot.completed,
			"failed-as-intended", tot.intended,
			"unintended", tot.unintended,
			"bad-pages", (json_int_t)tot.bad_pages,
			"fds-steady", fds_ok, "fd-growth", fd_growth,
			"rss-growth-mib", rss_growth / 1024.0,
			"downtime-p50-ms", p50, "downtime-p99-ms", p99,
			"downtime-max-ms", max, "seconds", now_s() - t0,
			"exits-clean", exits_ok, "pass", pass);

		if (json_dump_file(o, json_path, JSON_INDENT(2)))
			fprintf(stderr, "soak: cannot write %s\n", json_path);
		json_decref(o);
	}
	finished = true;
	return pass ? 0 : 1;
}
