/*
 * cli/main.c - `ferry SUBCOMMAND ...`: dispatch through the command table.
 */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "ferry/common.h"
#include "cli.h"

static int cmd_help(int argc, char **argv);
static int cmd_version(int argc, char **argv);

static const struct cli_cmd commands[] = {
	{ "inspect", "decode and verify a migration stream file", cmd_inspect },
	{ "vmstate-schema", "print the JSON schema of every device description",
	  cmd_vmstate_schema },
	{ "vm", "run the reference VMM (KVM or thread backend)", cmd_vm },
	{ "ctl", "send one command to a VM's control socket", cmd_ctl },
	{ "migrate", "live-migrate a running VM, with progress and statistics",
	  cmd_migrate },
	{ "demo", "start two VMs, live-migrate one to the other, prove it",
	  cmd_demo },
	{ "version", "print the version", cmd_version },
	{ "help", "list commands", cmd_help },
};

void cli_err(const char *fmt, ...)
{
	va_list ap;

	fputs("ferry: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static int cmd_version(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	printf("ferry %s\n", FERRY_VERSION_STRING);
	return 0;
}

static int cmd_help(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	printf("usage: ferry COMMAND [ARGS...]\n\ncommands:\n");
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		printf("  %-16s %s\n", commands[i].name, commands[i].summary);
	printf("\nRun 'ferry COMMAND --help' for a command's options.\n");
	return 0;
}

int main(int argc, char **argv)
{
	/* A peer that goes away must surface as EPIPE on the channel, not kill
	 * the process (and with it a running source VM). */
	signal(SIGPIPE, SIG_IGN);
	if (argc < 2) {
		cmd_help(argc, argv);
		return 2;
	}
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))
		return cmd_help(argc, argv);
	if (!strcmp(argv[1], "--version"))
		return cmd_version(argc, argv);
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (!strcmp(argv[1], commands[i].name))
			return commands[i].run(argc - 1, argv + 1);
	cli_err("unknown command '%s' (try 'ferry help')", argv[1]);
	return 2;
}
