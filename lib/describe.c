/*
 * describe.c - JSON description of the registered devices.
 *
 * One document serves two readers: the VMDESC record at the end of every
 * stream (so `ferry inspect` can name what it sees without the VMM), and
 * `ferry vmstate-schema` (so two builds can be diffed for compatibility).
 * Keys are emitted in a fixed order, so equal schemas give equal text.
 */
#include <stdlib.h>

#include <jansson.h>

#include "internal.h"
#include "vmstate-json.h"

char *ferry__describe(struct ferry_ctx *ctx, bool pretty)
{
	json_t *root = json_object(), *devs = json_array();
	char *out = NULL;

	if (!root || !devs)
		goto done;
	json_object_set_new(root, "format-version", json_integer(FERRY_STREAM_VERSION));
	json_object_set_new(root, "ferry-version", json_string(FERRY_VERSION_STRING));
	for (struct ferry_dev *d = ctx->devs; d; d = d->next) {
		json_t *o = json_object();

		if (!o)
			goto done;
		json_object_set_new(o, "name", json_string(d->idstr));
		json_object_set_new(o, "instance", json_integer(d->instance));
		json_object_set_new(o, "section-id", json_integer(d->section_id));
		json_object_set_new(o, "version", json_integer(d->version));
		json_object_set_new(o, "minimum-version", json_integer(d->min_version));
		json_object_set_new(o, "iterable", json_boolean(ferry__dev_iterable(d)));
		if (d->ops->save_complete_thread)
			json_object_set_new(o, "complete-in-thread", json_true());
		if (d->vmsd)
			json_object_set_new(o, "vmstate", ferry__vmsd_to_json(d->vmsd));
		json_array_append_new(devs, o);
	}
	json_object_set_new(root, "devices", devs);
	devs = NULL;
	out = json_dumps(root, JSON_PRESERVE_ORDER |
			 (pretty ? JSON_INDENT(2) : JSON_COMPACT));
done:
	json_decref(devs);
	json_decref(root);
	return out;
}
