/*
 * cli/cli.h - the ferry command: one file per subcommand, one table.
 */
#ifndef FERRY_CLI_H
#define FERRY_CLI_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include <jansson.h>

struct cli_cmd {
	const char *name;
	const char *summary;
	int (*run)(int argc, char **argv); /* argv[0] is the subcommand */
};

int cmd_inspect(int argc, char **argv);
int cmd_vmstate_schema(int argc, char **argv);
int cmd_ctl(int argc, char **argv);
int cmd_vm(int argc, char **argv);
int cmd_migrate(int argc, char **argv);
int cmd_demo(int argc, char **argv);

/* Print "ferry: <msg>" to stderr. */
void cli_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- migration driving, shared by `ferry migrate` and `ferry demo`
 * (cli/cmd-migrate.c) ---- */

struct ferry_error;

/* The migration flags; -1 / NULL / false leave the VM's own default, so a
 * plain `ferry migrate` sends no settings at all. */
struct migrate_opts {
	int multifd;              /* channels; 0 turns multifd off */
	const char *compression;  /* "zstd" | "none" */
	bool auto_converge;
	long long downtime_limit; /* ms */
	long long max_bandwidth;  /* bytes/s, 0 = unlimited */
	bool no_progress;
	bool json;
	bool postcopy;            /* switch to postcopy at once */
	bool postcopy_preempt;
	long long postcopy_after; /* s of precopy before switching; -1 none */
	const char *device_state_channel; /* "main" | "multifd", or NULL */
	char tls_creds[4096];     /* absolute path, or "" */
	const char *tls_hostname; /* or NULL */
};

/* Help text for the flags above (for a command's usage()). */
extern const char migrate_opts_help[];

void migrate_opts_init(struct migrate_opts *o);
/* Try argv[*i] as one of the flags above (taking its value, "--x V" or
 * "--x=V"). 1: consumed (*i advanced past a separate value); 0: not a
 * migration flag; -1: bad value (message printed, exit 2). @cmd prefixes
 * messages. */
int migrate_parse_opt(struct migrate_opts *o, const char *cmd, int argc,
		      char **argv, int *i);
/* Checks across flags after parsing: 0 or -1 (message printed). */
int migrate_check_opts(const struct migrate_opts *o, const char *cmd);
/* Is @uri a migration URI the VM could use? 0 or -1 (message printed). */
int migrate_check_uri(const char *uri, const char *cmd);
/* Send the capabilities and parameters the user set (nothing if none) to
 * the VM on control connection @fd. 0 or -errno with @err filled. */
int migrate_apply(int fd, const struct migrate_opts *o, struct ferry_error *err);
/*
 * Issue `migrate` to @uri on @fd and poll query-migrate until it ends,
 * drawing progress on stderr. When *stop becomes non-zero (a signal) or
 * monotonic @deadline_ms passes (0: none), sends migrate-cancel once and
 * keeps waiting (at most 30 s; a later signal stops waiting). *final gets
 * the last query-migrate object (NULL if there is none). Returns 0 if the
 * migration completed, 1 otherwise (the reason already printed).
 */
int migrate_follow(int fd, const char *uri, const struct migrate_opts *o,
		   volatile sig_atomic_t *stop, int64_t deadline_ms,
		   json_t **final);
/* The final statistics of a query-migrate object, as an aligned table. */
void migrate_print_stats(FILE *f, json_t *m);
/* CLOCK_MONOTONIC in milliseconds. */
int64_t migrate_now_ms(void);

#endif
