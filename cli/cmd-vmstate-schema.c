/*
 * cli/cmd-vmstate-schema.c - `ferry vmstate-schema`: the JSON description of
 * every device the reference VMM registers, with full field layouts. Diff
 * the output of two builds to see whether their streams are compatible.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ferry/ferry.h"
#include "cli.h"
#include "vm/vm.h"

int cmd_vmstate_schema(int argc, char **argv)
{
	struct ferry_error err = { 0 };
	struct ferry_ctx *ctx;
	char *json;

	if (argc > 1) {
		fprintf(stderr, "usage: ferry vmstate-schema\n"
			"Print the vmstate schema of every reference-VMM device as JSON.\n");
		return strcmp(argv[1], "--help") ? 2 : 0;
	}
	ctx = ferry_ctx_new(&err);
	if (!ctx || vm_register_schema(ctx, &err)) {
		cli_err("vmstate-schema: %s", err.msg);
		ferry_ctx_free(ctx);
		return 1;
	}
	json = ferry_ctx_describe_json(ctx, true);
	if (!json) {
		cli_err("vmstate-schema: out of memory");
		ferry_ctx_free(ctx);
		return 1;
	}
	puts(json);
	free(json);
	ferry_ctx_free(ctx);
	return 0;
}
