/*
 * cli/cli.h - the ferry command: one file per subcommand, one table.
 */
#ifndef FERRY_CLI_H
#define FERRY_CLI_H

struct cli_cmd {
	const char *name;
	const char *summary;
	int (*run)(int argc, char **argv); /* argv[0] is the subcommand */
};

int cmd_inspect(int argc, char **argv);
int cmd_vmstate_schema(int argc, char **argv);
int cmd_ctl(int argc, char **argv);
int cmd_vm(int argc, char **argv);

/* Print "ferry: <msg>" to stderr. */
void cli_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
