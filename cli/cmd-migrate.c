/*
 * cli/cmd-migrate.c - `ferry migrate --from SOCKET --to URI [flags]`: drive a
 * live migration of a running `ferry vm` through its control socket, with a
 * progress display and a final report.
 *
 * Only the settings the user gives are sent (migrate-set-capabilities,
 * migrate-set-parameters): anything left out keeps the VM's own default, and
 * a plain `ferry migrate` works against a VM that has neither command.
 *
 * The helpers below are shared with `ferry demo` (declared in cli.h).
 *
 * Exit status: 0 the migration completed; 1 it failed or was cancelled
 * (Ctrl-C cancels it), or the VM could not be reached; 2 bad usage (checked
 * before connecting).
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "ferry/common.h"
#include "ferry/engine.h"
#include "ferry/transport.h"
#include "cli.h"
#include "control/control.h"

/* Per control call. Generous: a loaded 2-core host can stall a reply. */
#define CALL_TIMEOUT_MS 10000
#define POLL_INTERVAL_MS 100
/* Without a terminal, a progress line this often. */
#define PLAIN_INTERVAL_MS 1000
/* After a cancel, how long to wait for the VM to wind down. */
#define CANCEL_GRACE_MS 30000

const char migrate_opts_help[] =
"  --multifd N          RAM over N parallel connections (0: off, on the main\n"
"                       stream; default: the VM's, 2 channels)\n"
"  --compression C      multifd page compression: zstd or none\n"
"  --auto-converge      throttle the guest's vCPUs when it dirties memory\n"
"                       faster than it can be sent\n"
"  --downtime-limit MS  longest acceptable pause at switchover (default 300)\n"
"  --max-bandwidth B    cap in bytes/s (K/M/G suffixes, powers of 1024;\n"
"                       0 = unlimited, the default)\n"
"  --postcopy           switch to postcopy at once: the destination runs the\n"
"                       VM and fetches what it lacks on demand (the\n"
"                       destination needs 'ferry vm --postcopy')\n"
"  --postcopy-after S   switch to postcopy if precopy has not converged\n"
"                       after S seconds\n"
"  --postcopy-preempt   requested pages on a connection of their own\n"
"  --device-state-channel C  main | multifd: where devices with large state\n"
"                       send it at the switchover (the destination must say\n"
"                       the same: 'ferry vm --device-state-channel C')\n"
"  --tls-creds DIR      TLS 1.3 with both ends verified (DIR: ca-cert.pem,\n"
"                       client-cert.pem, client-key.pem; the destination\n"
"                       needs 'ferry vm --tls-creds' with its server pair)\n"
"  --tls-hostname NAME  the name the destination's certificate must carry\n"
"                       (default: the host of the URI)\n"
"  --no-progress        no progress display\n"
"  --json               print the final query-migrate object as JSON\n";

int64_t migrate_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void migrate_opts_init(struct migrate_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->multifd = -1;
	o->downtime_limit = -1;
	o->max_bandwidth = -1;
	o->postcopy_after = -1;
}

/*
 * Does argv[*i] name option @name? Handles "--name VALUE" and "--name=VALUE"
 * for options with a value (*val set, NULL when missing) and exact matches
 * for flags (@val NULL).
 */
static bool opt_is(const char *name, int argc, char **argv, int *i,
		   const char **val)
{
	const char *a = argv[*i];
	size_t n = strlen(name);

	if (strncmp(a, name, n))
		return false;
	if (!val)
		return a[n] == 0;
	if (a[n] == '=') {
		*val = a + n + 1;
		return true;
	}
	if (a[n])
		return false;
	*val = *i + 1 < argc ? argv[++*i] : NULL;
	return true;
}

/* A non-negative integer in [0, max], with K/M/G (1024-based) suffixes when
 * @suffixes. */
static int parse_num(const char *s, bool suffixes, long long max,
		     long long *out)
{
	unsigned long long v, mul = 1;
	char *end;

	if (!s || !*s || *s == '-' || *s == '+')
		return -1;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s)
		return -1;
	if (suffixes && *end) {
		switch (*end) {
		case 'k': case 'K': mul = 1ull << 10; break;
		case 'm': case 'M': mul = 1ull << 20; break;
		case 'g': case 'G': mul = 1ull << 30; break;
		default: return -1;
		}
		end++;
	}
	if (*end || v > (unsigned long long)max / mul)
		return -1;
	*out = (long long)(v * mul);
	return 0;
}

int migrate_parse_opt(struct migrate_opts *o, const char *cmd, int argc,
		      char **argv, int *i)
{
	const char *v = NULL;
	long long n;

	if (opt_is("--multifd", argc, argv, i, &v)) {
		/* 255 is far past anything useful, but keeps typos out. */
		if (parse_num(v, false, 255, &n)) {
			cli_err("%s: --multifd needs a channel count from 0 to 255, got '%s'",
				cmd, v ? v : "");
			return -1;
		}
		o->multifd = (int)n;
	} else if (opt_is("--compression", argc, argv, i, &v)) {
		if (!v || (strcmp(v, "zstd") && strcmp(v, "none"))) {
			cli_err("%s: --compression is zstd or none, got '%s'", cmd,
				v ? v : "");
			return -1;
		}
		o->compression = v;
	} else if (opt_is("--auto-converge", argc, argv, i, NULL)) {
		o->auto_converge = true;
	} else if (opt_is("--downtime-limit", argc, argv, i, &v)) {
		if (parse_num(v, false, INT_MAX, &n)) {
			cli_err("%s: --downtime-limit needs milliseconds (a non-negative integer), got '%s'",
				cmd, v ? v : "");
			return -1;
		}
		o->downtime_limit = n;
	} else if (opt_is("--max-bandwidth", argc, argv, i, &v)) {
		if (parse_num(v, true, LLONG_MAX, &n)) {
			cli_err("%s: --max-bandwidth needs bytes per second (like 100M), got '%s'",
				cmd, v ? v : "");
			return -1;
		}
		o->max_bandwidth = n;
	} else if (opt_is("--postcopy", argc, argv, i, NULL)) {
		o->postcopy = true;
	} else if (opt_is("--postcopy-preempt", argc, argv, i, NULL)) {
		o->postcopy_preempt = true;
	} else if (opt_is("--postcopy-after", argc, argv, i, &v)) {
		if (parse_num(v, false, 86400, &n)) {
			cli_err("%s: --postcopy-after needs seconds (0 to 86400), got '%s'",
				cmd, v ? v : "");
			return -1;
		}
		o->postcopy_after = n;
	} else if (opt_is("--device-state-channel", argc, argv, i, &v)) {
		if (!v || (strcmp(v, "main") && strcmp(v, "multifd"))) {
			cli_err("%s: --device-state-channel is main or multifd, "
				"got '%s'", cmd, v ? v : "");
			return -1;
		}
		o->device_state_channel = v;
	} else if (opt_is("--tls-creds", argc, argv, i, &v)) {
		/* The VM resolves paths from its own directory: make it
		 * absolute here. */
		if (!v || !realpath(v, o->tls_creds)) {
			cli_err("%s: --tls-creds: %s: %s", cmd, v ? v : "",
				v ? strerror(errno) : "needs a directory");
			return -1;
		}
	} else if (opt_is("--tls-hostname", argc, argv, i, &v)) {
		if (!v || !*v) {
			cli_err("%s: --tls-hostname needs a name", cmd);
			return -1;
		}
		o->tls_hostname = v;
	} else if (opt_is("--no-progress", argc, argv, i, NULL)) {
		o->no_progress = true;
	} else if (opt_is("--json", argc, argv, i, NULL)) {
		o->json = true;
	} else {
		return 0;
	}
	return 1;
}

int migrate_check_opts(const struct migrate_opts *o, const char *cmd)
{
	/* Compression is a property of the multifd channels: asking for it
	 * with multifd off would be silently ignored, which is worse. */
	if (o->compression && o->multifd == 0 && !strcmp(o->compression, "zstd")) {
		cli_err("%s: --compression zstd needs multifd (drop --multifd 0)", cmd);
		return -1;
	}
	return 0;
}

int migrate_check_uri(const char *uri, const char *cmd)
{
	struct ferry_error err = { 0 };
	struct ferry_uri u;

	/* fd:N names a descriptor of the VM, not of this process: only its
	 * syntax can be checked here. */
	if (!strncmp(uri, "fd:", 3)) {
		long long n;

		if (parse_num(uri + 3, false, INT_MAX, &n)) {
			cli_err("%s: bad URI '%s': fd: needs a descriptor number", cmd, uri);
			return -1;
		}
		return 0;
	}
	if (ferry_uri_parse(uri, &u, &err)) {
		cli_err("%s: bad URI '%s': %s",
			cmd, uri, err.msg);
		return -1;
	}
	return 0;
}

int migrate_apply(int fd, const struct migrate_opts *o, struct ferry_error *err)
{
	json_t *caps = json_array(), *params = json_object();
	int r = 0;

	if (!caps || !params) {
		r = ferry_error_set(err, -ENOMEM, "out of memory");
		goto out;
	}
	if (o->multifd >= 0)
		json_array_append_new(caps, json_pack("{s:s, s:b}", "capability",
						      "multifd", "state",
						      o->multifd > 0));
	if (o->auto_converge)
		json_array_append_new(caps, json_pack("{s:s, s:b}", "capability",
						      "auto-converge", "state", 1));
	if (o->postcopy || o->postcopy_preempt || o->postcopy_after >= 0)
		json_array_append_new(caps, json_pack("{s:s, s:b}", "capability",
						      "postcopy-ram", "state", 1));
	if (o->postcopy_preempt)
		json_array_append_new(caps, json_pack("{s:s, s:b}", "capability",
						      "postcopy-preempt", "state", 1));
	if (o->postcopy_after >= 0)
		json_object_set_new(params, "postcopy-after-ms",
				    json_integer(o->postcopy_after * 1000));
	if (o->multifd > 0)
		json_object_set_new(params, "multifd-channels",
				    json_integer(o->multifd));
	if (o->compression)
		json_object_set_new(params, "multifd-compression",
				    json_string(o->compression));
	if (o->device_state_channel)
		json_object_set_new(params, "device-state-channel",
				    json_string(o->device_state_channel));
	if (o->tls_creds[0])
		json_object_set_new(params, "tls-creds", json_string(o->tls_creds));
	if (o->tls_hostname)
		json_object_set_new(params, "tls-hostname",
				    json_string(o->tls_hostname));
	if (o->downtime_limit >= 0)
		json_object_set_new(params, "downtime-limit",
				    json_integer(o->downtime_limit));
	if (o->max_bandwidth >= 0)
		json_object_set_new(params, "max-bandwidth",
				    json_integer(o->max_bandwidth));

	if (json_array_size(caps)) {
		json_t *a = json_pack("{s:O}", "capabilities", caps);

		r = control_client_call(fd, "migrate-set-capabilities", a, NULL,
					CALL_TIMEOUT_MS, err);
		json_decref(a);
		if (r) {
			ferry_error_prefix(err, "migrate-set-capabilities: ");
			goto out;
		}
	}
	if (json_object_size(params)) {
		r = control_client_call(fd, "migrate-set-parameters", params, NULL,
					CALL_TIMEOUT_MS, err);
		if (r)
			ferry_error_prefix(err, "migrate-set-parameters: ");
	}
out:
	json_decref(caps);
	json_decref(params);
	return r;
}

/* ---- reading query-migrate ---------------------------------------------- */

/* A number at @key of @o (integer or real); false when absent. */
static bool jnum(json_t *o, const char *key, double *out)
{
	json_t *v = json_object_get(o, key);

	if (!json_is_number(v))
		return false;
	*out = json_number_value(v);
	return true;
}

static double jnum0(json_t *o, const char *key)
{
	double v = 0;

	jnum(o, key, &v);
	return v;
}

static const char *mig_status(json_t *m)
{
	const char *s = json_string_value(json_object_get(m, "status"));

	return s ? s : "";
}

static bool status_terminal(const char *s)
{
	return !strcmp(s, "completed") || !strcmp(s, "failed") ||
	       !strcmp(s, "cancelled");
}

/* Bytes per page, from the stats themselves (4 KiB when they cannot tell). */
static double page_size(json_t *ram)
{
	double normal = jnum0(ram, "normal"), bytes = jnum0(ram, "normal-bytes");

	return normal > 0 && bytes > 0 ? bytes / normal : 4096;
}

static void fmt_bytes(char *buf, size_t len, double b)
{
	if (b >= 1024.0 * 1024 * 1024)
		snprintf(buf, len, "%.2f GiB", b / (1024.0 * 1024 * 1024));
	else if (b >= 1024.0 * 1024)
		snprintf(buf, len, "%.1f MiB", b / (1024.0 * 1024));
	else if (b >= 1024.0)
		snprintf(buf, len, "%.1f KiB", b / 1024.0);
	else
		snprintf(buf, len, "%.0f B", b);
}

/* ---- progress display ----------------------------------------------------- */

struct progress {
	bool on, tty, drawn;
	int64_t t0, last_t, last_print;
	double last_transferred, bps; /* smoothed throughput, bytes/s */
	char last_status[32];
};

static void progress_init(struct progress *p, const struct migrate_opts *o)
{
	memset(p, 0, sizeof(*p));
	p->on = !o->no_progress;
	p->tty = isatty(STDERR_FILENO);
	p->t0 = p->last_t = migrate_now_ms();
}

static int term_width(void)
{
	struct winsize ws;

	if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 20)
		return ws.ws_col;
	return 80;
}

/* Feed one query-migrate sample. */
static void progress_show(struct progress *p, json_t *m)
{
	json_t *ram = json_object_get(m, "ram");
	const char *status = mig_status(m);
	int64_t now = migrate_now_ms();
	double total = jnum0(ram, "total"), rem = jnum0(ram, "remaining");
	double xfer = jnum0(ram, "transferred"), pct = 0, dirty, dt, thr;
	double passes;
	char line[512], rems[32], bar[11];
	bool changed = strcmp(status, p->last_status) != 0;
	int n = 0, width;

	/* Throughput from our own samples, smoothed over about a second: the
	 * VM's own rate field has no agreed unit, bytes do. */
	dt = (double)(now - p->last_t) / 1000.0;
	if (dt > 0 && xfer >= p->last_transferred) {
		double inst = (xfer - p->last_transferred) / dt;
		double a = dt >= 1.0 ? 1.0 : dt;

		p->bps = p->bps > 0 ? p->bps + a * (inst - p->bps) : inst;
	}
	p->last_t = now;
	p->last_transferred = xfer;
	snprintf(p->last_status, sizeof(p->last_status), "%s", status);
	if (!p->on)
		return;
	if (!p->tty && !changed && now - p->last_print < PLAIN_INTERVAL_MS)
		return;
	p->last_print = now;

	/* "Done" is the part of RAM the destination holds a current copy
	 * of; it can move backwards when the guest dirties pages again.
	 * During setup nothing is known yet. */
	if (total > 0 && rem <= total && strcmp(status, "setup"))
		pct = 100.0 * (total - rem) / total;
	/* ferry's own precopy round counter, or QEMU's closest stand-in. */
	if (!jnum(m, "pass", &passes))
		passes = jnum0(ram, "dirty-sync-count");
	dirty = jnum0(ram, "dirty-pages-rate") * page_size(ram);
	fmt_bytes(rems, sizeof(rems), rem);
	thr = jnum0(m, "cpu-throttle-percentage");

	if (p->tty) {
		int fill = (int)(pct / 10.0 + 0.5);
		char thrs[24] = "";

		for (int i = 0; i < 10; i++)
			bar[i] = i < fill ? '#' : '-';
		bar[10] = 0;
		/* The throttle only matters once auto-converge kicks in. */
		if (thr > 0)
			snprintf(thrs, sizeof(thrs), " throttle %.0f%%", thr);
		if (!strncmp(status, "postcopy", 8))
			n = snprintf(line, sizeof(line),
				     "%s [%s] %3.0f%% left %s %.0f MB/s, %.0f pages "
				     "requested", status, bar, pct, rems,
				     p->bps / 1e6, jnum0(m, "postcopy-requests"));
		else
			n = snprintf(line, sizeof(line),
				     "%s pass %.0f [%s] %3.0f%% left %s %.0f MB/s dirty %.0f MB/s%s"
				     " downtime~%.0fms",
				     status, passes > 0 ? passes : 1, bar, pct, rems,
				     p->bps / 1e6, dirty / 1e6, thrs,
				     jnum0(m, "expected-downtime"));
		/* Never wrap: a wrapped line cannot be redrawn with \r. */
		width = term_width() - 1;
		if (n > width)
			line[width] = 0;
		fprintf(stderr, "\r\033[K%s", line);
		p->drawn = true;
	} else {
		fprintf(stderr,
			"migrate: %s, pass %.0f, %.1f%% done, %s left, %.1f MB/s, "
			"dirty %.1f MB/s, expected downtime %.0f ms, throttle %.0f%%\n",
			status, passes > 0 ? passes : 1, pct, rems, p->bps / 1e6,
			dirty / 1e6, jnum0(m, "expected-downtime"), thr);
	}
	fflush(stderr);
}

/* Leave the terminal on a fresh line. */
static void progress_end(struct progress *p)
{
	if (p->drawn) {
		fputs("\r\033[K", stderr);
		fflush(stderr);
		p->drawn = false;
	}
}

/* ---- following a migration ------------------------------------------------ */

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	/* EINTR just shortens the nap: the caller looks at its flags next. */
	nanosleep(&ts, NULL);
}

int migrate_follow(int fd, const char *uri, const struct migrate_opts *o,
		   volatile sig_atomic_t *stop, int64_t deadline_ms,
		   json_t **final)
{
	struct ferry_error err = { 0 };
	struct progress pr;
	bool cancel_sent = false, timed_out = false;
	int64_t cancel_ms = 0;
	sig_atomic_t stop_at_cancel = 0;
	json_t *m = NULL, *args;
	const char *status;
	char last[32] = "";
	int r;

	*final = NULL;
	if (*stop) {
		cli_err("migrate: interrupted before the migration started");
		return 1;
	}
	args = json_pack("{s:s}", "uri", uri);
	r = control_client_call(fd, "migrate", args, NULL, CALL_TIMEOUT_MS, &err);
	json_decref(args);
	if (r) {
		cli_err("migrate: the VM did not start the migration to %s: %s",
			uri, err.msg);
		return 1;
	}
	if (o->postcopy && control_client_call(fd, "migrate-start-postcopy", NULL,
					       NULL, CALL_TIMEOUT_MS, &err))
		cli_err("migrate: migrate-start-postcopy: %s (precopy goes on)",
			err.msg);
	progress_init(&pr, o);
	for (;;) {
		int64_t now;

		ferry_error_clear(&err);
		r = control_client_call(fd, "query-migrate", NULL, &m,
					CALL_TIMEOUT_MS, &err);
		if (r) {
			progress_end(&pr);
			cli_err("migrate: lost track of the migration (query-migrate: %s)",
				err.msg);
			return 1;
		}
		status = mig_status(m);
		if (!*status) {
			progress_end(&pr);
			cli_err("migrate: query-migrate returned no status");
			json_decref(m);
			return 1;
		}
		if (status_terminal(status))
			break;
		/* A paused postcopy waits for the operator: say how, once. */
		if (!strcmp(status, "postcopy-paused") && strcmp(last, status)) {
			const char *e = json_string_value(json_object_get(m,
								"error-desc"));

			progress_end(&pr);
			cli_err("migrate: postcopy paused (%s): the destination runs "
				"the VM and waits for the rest of its memory. Recover "
				"with 'ferry ctl DEST migrate-recover '{\"uri\": "
				"URI}'' and then 'ferry ctl SOURCE migrate '{\"uri\": "
				"URI, \"resume\": true}''", e ? e : "link lost");
		}
		snprintf(last, sizeof(last), "%s", status);
		progress_show(&pr, m);
		json_decref(m);
		m = NULL;

		now = migrate_now_ms();
		/* Another signal after the cancel went out means "stop
		 * waiting" (signals that came together, as one Ctrl-C
		 * delivered twice by a wrapper, count as one). */
		if ((cancel_sent && *stop > stop_at_cancel) ||
		    (cancel_sent && now > cancel_ms + CANCEL_GRACE_MS)) {
			progress_end(&pr);
			cli_err("migrate: stopped waiting for the migration to end (still '%s'%s)",
				last, *stop > stop_at_cancel ? "" :
				" long after the cancel");
			return 1;
		}
		if (deadline_ms && now > deadline_ms && !timed_out) {
			timed_out = true;
			progress_end(&pr);
			cli_err("migrate: timed out, cancelling the migration");
		}
		if ((*stop || timed_out) && !cancel_sent) {
			cancel_sent = true;
			cancel_ms = now;
			stop_at_cancel = *stop;
			progress_end(&pr);
			if (*stop)
				cli_err("migrate: interrupted, cancelling the migration "
					"(interrupt again to stop waiting)");
			ferry_error_clear(&err);
			if (control_client_call(fd, "migrate-cancel", NULL, NULL,
						CALL_TIMEOUT_MS, &err))
				/* Refused during the switchover: it ends on its
				 * own in a moment, either way. */
				cli_err("migrate: migrate-cancel: %s (waiting for the migration to end)",
					err.msg);
		}
		sleep_ms(POLL_INTERVAL_MS);
	}
	progress_end(&pr);
	*final = m;
	if (!strcmp(status, "completed")) {
		if (cancel_sent)
			cli_err("migrate: the migration completed before the cancel took effect");
		return 0;
	}
	if (!strcmp(status, "failed")) {
		const char *e = json_string_value(json_object_get(m, "error-desc"));

		cli_err("migrate: migration failed: %s", e ? e : "(the VM gave no reason)");
	} else {
		cli_err("migrate: migration cancelled%s",
			timed_out ? " (timed out)" : "");
	}
	return 1;
}

/* ---- final report ---------------------------------------------------------- */

static void row_ms(FILE *f, const char *name, json_t *o, const char *key)
{
	double v;

	if (jnum(o, key, &v))
		fprintf(f, "  %-22s %.0f ms\n", name, v);
}

void migrate_print_stats(FILE *f, json_t *m)
{
	json_t *ram = json_object_get(m, "ram");
	json_t *ph = json_object_get(m, "downtime-phases");
	const char *e = json_string_value(json_object_get(m, "error-desc"));
	const char *swo = json_string_value(json_object_get(m, "switchover"));
	double v, t;
	char b[32];

	fprintf(f, "  %-22s %s\n", "status", mig_status(m));
	/* "in-doubt" is the one the operator must act on (error says how). */
	if (swo && strcmp(swo, "done"))
		fprintf(f, "  %-22s %s\n", "switchover", swo);
	if (e)
		fprintf(f, "  %-22s %s\n", "error", e);
	if (jnum(m, "total-time", &t))
		fprintf(f, "  %-22s %.3f s\n", "total time", t / 1000.0);
	row_ms(f, "downtime", m, "downtime");
	if (json_is_object(ph)) {
		for (int i = 0; i < FERRY_PHASE__MAX; i++)
			if (jnum(ph, ferry_phase_name(i), &v))
				fprintf(f, "    %-20s %8.2f ms\n",
					ferry_phase_name(i), v);
	}
	row_ms(f, "setup time", m, "setup-time");
	row_ms(f, "expected downtime", m, "expected-downtime");
	if (json_is_object(json_object_get(m, "tls"))) {
		json_t *tj = json_object_get(m, "tls");
		double n = 0, k = 0;

		jnum(tj, "connections", &n);
		jnum(tj, "ktls-tx", &k);
		fprintf(f, "  %-22s %s %s, %.0f connection%s, peer %s, records "
			"in %s\n", "tls",
			json_string_value(json_object_get(tj, "version")),
			json_string_value(json_object_get(tj, "cipher")), n,
			n == 1 ? "" : "s",
			json_string_value(json_object_get(tj, "peer")),
			k > 0 ? "the kernel (kTLS)" : "user space");
	}
	if (jnum(ram, "transferred", &v)) {
		fmt_bytes(b, sizeof(b), v);
		fprintf(f, "  %-22s %s\n", "transferred", b);
		if (jnum(m, "total-time", &t) && t > 0)
			fprintf(f, "  %-22s %.1f MB/s\n", "throughput (average)",
				v / 1e6 / (t / 1000.0));
	}
	if (jnum(ram, "total", &v)) {
		fmt_bytes(b, sizeof(b), v);
		fprintf(f, "  %-22s %s\n", "guest RAM", b);
	}
	if (jnum(ram, "dirty-sync-count", &v))
		fprintf(f, "  %-22s %.0f\n", "dirty syncs", v);
	if (jnum(ram, "duplicate", &v))
		fprintf(f, "  %-22s %.0f\n", "zero pages", v);
	if (jnum(ram, "normal", &v))
		fprintf(f, "  %-22s %.0f\n", "normal pages", v);
	if (jnum(ram, "multifd-bytes", &v)) {
		fmt_bytes(b, sizeof(b), v);
		fprintf(f, "  %-22s %s\n", "multifd bytes", b);
	}
	{
		json_t *ds = json_object_get(m, "device-state");
		double pre, sw;

		if (jnum(ds, "precopy-bytes", &pre) &&
		    jnum(ds, "switchover-bytes", &sw)) {
			char b2[32];

			fmt_bytes(b, sizeof(b), pre);
			fmt_bytes(b2, sizeof(b2), sw);
			fprintf(f, "  %-22s %s before, %s at the switchover "
				"(%zu devices)\n", "device state", b, b2,
				json_array_size(json_object_get(m, "devices")));
		}
	}
	if (jnum(m, "cpu-throttle-percentage", &v) && v > 0)
		fprintf(f, "  %-22s %.0f%%\n", "cpu throttle", v);
	if (jnum(m, "postcopy-time", &v))
		fprintf(f, "  %-22s %.3f s\n", "postcopy time", v / 1000.0);
	if (jnum(m, "postcopy-requests", &v))
		fprintf(f, "  %-22s %.0f\n", "postcopy requests", v);
	if (jnum(ram, "postcopy-bytes", &v) && v > 0) {
		fmt_bytes(b, sizeof(b), v);
		fprintf(f, "  %-22s %s\n", "postcopy bytes", b);
	}
}

/* ---- the command ------------------------------------------------------------ */

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
	(void)sig;
	if (interrupted < 100)
		interrupted++;
}

static void usage(FILE *f)
{
	fprintf(f,
"usage: ferry migrate --from SOCKET --to URI [OPTIONS]\n"
"Live-migrate the VM whose control socket is SOCKET to URI (tcp:HOST:PORT,\n"
"unix:PATH, file:PATH or fd:N), showing progress, then print the statistics.\n"
"Settings not given keep the VM's defaults.\n"
"\n"
"  --from SOCKET        the source VM's control socket (ferry vm --control)\n"
"  --to URI             where to send it (the destination's --incoming URI)\n"
"%s"
"  -h, --help           this text\n"
"\n"
"Ctrl-C cancels the migration (the source VM carries on running).\n"
"Exit status: 0 completed, 1 failed, cancelled or VM unreachable,\n"
"2 usage error.\n", migrate_opts_help);
}

int cmd_migrate(int argc, char **argv)
{
	struct ferry_error err = { 0 };
	struct migrate_opts o;
	struct sigaction sa;
	const char *from = NULL, *to = NULL;
	json_t *final = NULL;
	int fd, rc;

	migrate_opts_init(&o);
	for (int i = 1; i < argc; i++) {
		const char *v = NULL;

		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			usage(stdout);
			return 0;
		}
		rc = migrate_parse_opt(&o, "migrate", argc, argv, &i);
		if (rc < 0)
			return 2;
		if (rc > 0)
			continue;
		if (opt_is("--from", argc, argv, &i, &v)) {
			if (!v || !*v) {
				cli_err("migrate: --from needs the source VM's control socket");
				return 2;
			}
			from = v;
		} else if (opt_is("--to", argc, argv, &i, &v)) {
			if (!v || !*v) {
				cli_err("migrate: --to needs a URI");
				return 2;
			}
			to = v;
		} else if (argv[i][0] == '-') {
			cli_err("migrate: unknown option '%s'", argv[i]);
			usage(stderr);
			return 2;
		} else {
			cli_err("migrate: unexpected argument '%s'", argv[i]);
			usage(stderr);
			return 2;
		}
	}
	if (!from || !to) {
		cli_err("migrate: %s is required", !from ? "--from SOCKET" : "--to URI");
		usage(stderr);
		return 2;
	}
	if (migrate_check_opts(&o, "migrate") || migrate_check_uri(to, "migrate"))
		return 2;

	fd = control_client_connect(from, CALL_TIMEOUT_MS, &err);
	if (fd < 0) {
		cli_err("migrate: cannot talk to the source VM at %s: %s", from,
			err.msg);
		return 1;
	}
	if (migrate_apply(fd, &o, &err)) {
		cli_err("migrate: the source VM refused the migration settings: %s",
			err.msg);
		close(fd);
		return 1;
	}

	/* No SA_RESTART: a pending sleep ends at once and the loop reacts. */
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigint;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	rc = migrate_follow(fd, to, &o, &interrupted, 0, &final);
	close(fd);
	if (final) {
		if (o.json) {
			char *s = json_dumps(final, JSON_INDENT(2));

			if (s)
				puts(s);
			free(s);
		} else {
			printf("migration to %s:\n", to);
			migrate_print_stats(stdout, final);
		}
		fflush(stdout);
		json_decref(final);
	}
	return rc;
}
