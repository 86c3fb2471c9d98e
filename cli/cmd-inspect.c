/*
 * cli/cmd-inspect.c - `ferry inspect FILE [--json]`: decode a stream file,
 * verify every record's check, and print what is inside. On damage, exit 1
 * naming the offset and the section.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "ferry/ferry.h"
#include "cli.h"

struct secname {
	uint32_t id;
	char name[FERRY_IDSTR_MAX + 16];
};

struct inspector {
	struct secname *names;
	size_t nnames, cap;
	char last[FERRY_IDSTR_MAX + 16];
	json_t *records;   /* --json */
	json_t *desc;      /* parsed VMDESC */
	bool json;
};

static const char *name_of(struct inspector *in, uint32_t id)
{
	for (size_t i = 0; i < in->nnames; i++)
		if (in->names[i].id == id)
			return in->names[i].name;
	return NULL;
}

static void remember(struct inspector *in, uint32_t id, const char *idstr,
		     uint32_t instance)
{
	if (in->nnames == in->cap) {
		size_t ncap = in->cap ? in->cap * 2 : 64;
		struct secname *n = realloc(in->names, ncap * sizeof(*n));
		if (!n)
			return; /* names are a nicety */
		in->names = n;
		in->cap = ncap;
	}
	in->names[in->nnames].id = id;
	snprintf(in->names[in->nnames].name, sizeof(in->names[0].name),
		 "%s/%u", idstr, instance);
	in->nnames++;
}

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
	       (uint32_t)p[2] << 8 | p[3];
}

/* Describe one verified record; returns 0 or -EBADMSG for a malformed body. */
static int describe(struct inspector *in, const struct ferry_record *rec,
		    char *line, size_t size, json_t *o)
{
	const uint8_t *b = rec->body;
	uint32_t n = rec->len;

	line[0] = 0;
	switch (rec->type) {
	case FERRY_REC_SECTION_START:
	case FERRY_REC_SECTION_FULL: {
		char idstr[FERRY_IDSTR_MAX + 1];
		uint32_t id, inst, ver;
		uint8_t l;

		if (n < 5 || n < 5u + b[4] + 8)
			return -EBADMSG;
		id = be32(b);
		l = b[4];
		memcpy(idstr, b + 5, l);
		idstr[l] = 0;
		inst = be32(b + 5 + l);
		ver = be32(b + 9 + l);
		remember(in, id, idstr, inst);
		snprintf(in->last, sizeof(in->last), "%s/%u", idstr, inst);
		snprintf(line, size, "'%s' instance %u (id %u) version %u, %u payload bytes",
			 idstr, inst, id, ver, n - (13 + l));
		json_object_set_new(o, "section-id", json_integer(id));
		json_object_set_new(o, "idstr", json_string(idstr));
		json_object_set_new(o, "instance", json_integer(inst));
		json_object_set_new(o, "version", json_integer(ver));
		json_object_set_new(o, "payload", json_integer(n - (13 + l)));
		return 0;
	}
	case FERRY_REC_SECTION_PART:
	case FERRY_REC_SECTION_END: {
		const char *nm;
		if (n < 4)
			return -EBADMSG;
		nm = name_of(in, be32(b));
		snprintf(line, size, "'%s' (id %u), %u payload bytes",
			 nm ? nm : "?", be32(b), n - 4);
		if (nm)
			snprintf(in->last, sizeof(in->last), "%s", nm);
		json_object_set_new(o, "section-id", json_integer(be32(b)));
		if (nm)
			json_object_set_new(o, "section", json_string(nm));
		json_object_set_new(o, "payload", json_integer(n - 4));
		return 0;
	}
	case FERRY_REC_COMMAND: {
		unsigned cmd;
		if (n < 2)
			return -EBADMSG;
		cmd = (unsigned)b[0] << 8 | b[1];
		snprintf(line, size, "%s, %u payload bytes", ferry_cmd_name(cmd), n - 2);
		json_object_set_new(o, "command", json_string(ferry_cmd_name(cmd)));
		json_object_set_new(o, "payload", json_integer(n - 2));
		return 0;
	}
	case FERRY_REC_DEVSTATE:
	case FERRY_REC_DEVSTATE_CONFIG: {
		char idstr[FERRY_IDSTR_MAX + 1];
		uint8_t l;
		if (n < 1 || n < 1u + b[0] + 8)
			return -EBADMSG;
		l = b[0];
		memcpy(idstr, b + 1, l);
		idstr[l] = 0;
		snprintf(line, size, "'%s' instance %u buffer %u, %u bytes%s",
			 idstr, be32(b + 1 + l), be32(b + 5 + l), n - (9 + l),
			 rec->type == FERRY_REC_DEVSTATE_CONFIG ? " (config)" : "");
		json_object_set_new(o, "idstr", json_string(idstr));
		json_object_set_new(o, "instance", json_integer(be32(b + 1 + l)));
		json_object_set_new(o, "buffer", json_integer(be32(b + 5 + l)));
		return 0;
	}
	case FERRY_REC_VMDESC: {
		json_error_t je;
		json_t *d = json_loadb((const char *)b, n, 0, &je), *devs;
		if (!d)
			return -EBADMSG;
		devs = json_object_get(d, "devices");
		snprintf(line, size, "device description, %zu devices",
			 json_is_array(devs) ? json_array_size(devs) : 0);
		json_decref(in->desc);
		in->desc = d;
		return 0;
	}
	default:
		return 0;
	}
}

static void usage(void)
{
	fprintf(stderr, "usage: ferry inspect FILE [--json]\n"
		"Decode a ferry migration stream, verify every record, and\n"
		"print its header, sections, commands and device description.\n"
		"Exits 1 on damage, naming the offset and the section.\n");
}

int cmd_inspect(int argc, char **argv)
{
	struct inspector in = { 0 };
	struct ferry_error err = { 0 };
	struct ferry_record_io io = { 0 };
	struct ferry_record rec;
	const char *path = NULL;
	struct ferry_chan *c;
	unsigned long nrec = 0;
	int fd, r = 0;
	json_t *root = NULL;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--json"))
			in.json = true;
		else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			usage();
			return 0;
		} else if (!path && argv[i][0] != '-')
			path = argv[i];
		else {
			usage();
			return 2;
		}
	}
	if (!path) {
		usage();
		return 2;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		cli_err("inspect: cannot open %s: %s", path, strerror(errno));
		return 1;
	}
	c = ferry_chan_new_fd(fd, FERRY_CHAN_READ, true);
	if (!c) {
		close(fd);
		cli_err("inspect: out of memory");
		return 1;
	}
	io.chan = c;
	if (in.json) {
		root = json_object();
		in.records = json_array();
		json_object_set_new(root, "file", json_string(path));
	}
	r = ferry_stream_read_header(c, &err);
	if (!r) {
		if (in.json)
			json_object_set_new(root, "format-version",
					    json_integer(FERRY_STREAM_VERSION));
		else
			printf("%s: ferry stream, format version %u\n\n"
			       "%10s  %-14s %10s  %s\n", path, FERRY_STREAM_VERSION,
			       "offset", "record", "bytes", "contents");
	}
	while (!r) {
		char line[600];
		json_t *o = in.json ? json_object() : NULL;

		r = ferry_record_read(&io, &rec, &err);
		if (r) {
			char idstr[FERRY_IDSTR_MAX + 1];
			uint32_t id = 0;
			int h = ferry_record_section_hint(&rec, &id, idstr, sizeof(idstr));
			const char *nm = (h & 1) ? name_of(&in, id) : NULL;

			if (h & 2)
				ferry_error_prefix(&err, "section '%s': ", idstr);
			else if (nm)
				ferry_error_prefix(&err, "section '%s': ", nm);
			else if (in.last[0])
				ferry_error_prefix(&err, "after section '%s': ", in.last);
			else
				ferry_error_prefix(&err, "before the first section: ");
			json_decref(o);
			break;
		}
		nrec++;
		if (o) {
			json_object_set_new(o, "offset", json_integer((json_int_t)rec.offset));
			json_object_set_new(o, "type",
					    json_string(ferry_record_type_name(rec.type)));
			json_object_set_new(o, "length", json_integer(rec.len));
			json_object_set_new(o, "check", json_string("ok"));
		}
		if (describe(&in, &rec, line, sizeof(line), o)) {
			r = ferry_error_set(&err, -EBADMSG,
				"offset %llu: malformed %s record body (after section '%s')",
				(unsigned long long)rec.offset,
				ferry_record_type_name(rec.type), in.last);
			json_decref(o);
			break;
		}
		if (o)
			json_array_append_new(in.records, o);
		else
			printf("%10llu  %-14s %10u  %s\n", (unsigned long long)rec.offset,
			       ferry_record_type_name(rec.type), rec.len, line);
		if (rec.type == FERRY_REC_EOF)
			break;
	}
	if (in.json) {
		json_object_set_new(root, "records", in.records);
		if (in.desc)
			json_object_set(root, "description", in.desc);
		json_object_set_new(root, "ok", json_boolean(!r));
		if (r)
			json_object_set_new(root, "error", json_string(err.msg));
		json_dumpf(root, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
		putchar('\n');
		json_decref(root);
	} else if (!r) {
		json_t *devs = in.desc ? json_object_get(in.desc, "devices") : NULL;
		size_t i;
		json_t *d;

		printf("\n%lu records, every check verified; %llu bytes\n", nrec,
		       (unsigned long long)ferry_chan_offset(c));
		if (json_is_array(devs)) {
			printf("devices:\n");
			json_array_foreach(devs, i, d)
				printf("  %s/%lld version %lld%s\n",
				       json_string_value(json_object_get(d, "name")),
				       (long long)json_integer_value(json_object_get(d, "instance")),
				       (long long)json_integer_value(json_object_get(d, "version")),
				       json_is_true(json_object_get(d, "iterable")) ?
				       " (iterable)" : "");
		}
	}
	if (r)
		cli_err("inspect %s: %s", path, err.msg);
	json_decref(in.desc);
	free(in.names);
	ferry_record_io_release(&io);
	ferry_chan_free(c);
	return r ? 1 : 0;
}
