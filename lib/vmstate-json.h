/*
 * vmstate-json.h - internal: the JSON schema of a vmstate description.
 * Implemented in lib/vmstate.c next to the interpreter that it mirrors.
 */
#ifndef FERRY_LIB_VMSTATE_JSON_H
#define FERRY_LIB_VMSTATE_JSON_H

#include <jansson.h>

#include "ferry/vmstate.h"

/*
 * A new JSON object describing @vmsd, or NULL (ENOMEM, NULL @vmsd, or
 * nesting deeper than FERRY_VMS_MAX_DEPTH). Keys, in this order:
 *   name, version, minimum_version,
 *   fields: [ { name, type, size, count (capacity), varray (only when
 *              true), version_id, struct (only for struct fields) } ],
 *   subsections: [ same shape as the top level ]
 * Arrays follow table order, so the output is deterministic.
 */
json_t *ferry__vmsd_to_json(const struct ferry_vmsd *vmsd);

#endif
