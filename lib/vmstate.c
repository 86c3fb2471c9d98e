/*
 * vmstate.c - the field-table interpreter, its validator and its JSON schema.
 *
 * Why it is built this way:
 *  - Save and load are one walker with a direction flag, so the two sides
 *    cannot drift apart on field order, version skipping or array bounds.
 *  - The table is trusted (ferry_vmstate_validate() runs at registration);
 *    the stream is not. Everything the stream controls (counts, bools,
 *    markers, subsection names, versions, lengths) is checked before use.
 *    The table is re-checked at run time only where a bad entry would
 *    touch memory it should not (count widths, element widths, depth).
 *  - Memory values are native, wire values big-endian: every element moves
 *    through memcpy at the width implied by its type, never through a typed
 *    pointer, so a table can describe packed structs.
 *  - A subsection is length-prefixed so its body is bounded. The length is
 *    only known after the body is encoded, so the body is saved into a
 *    memory writer first; on load it is read into a buffer (grown as bytes
 *    arrive, so a lying length costs little) and parsed through a memory
 *    reader of its own, so a lying body can never read the bytes that
 *    follow it, and leftovers are detected exactly. channel.h cannot say
 *    what kind a channel is, but ferry_chan_mem_remaining() is nonzero only
 *    for memory readers, which is all the up-front length check needs.
 *  - Unknown subsections and versions outside a window are -EINVAL (the
 *    two builds disagree); damaged or truncated bytes are -EBADMSG.
 *  - Messages are built in a private error object and prefixed as the
 *    walker unwinds ("vmstate 'dev': field 'regs[3].x': ..."), then copied
 *    out, so an error the caller already holds is never rewritten.
 *  - A nested struct (FERRY_VMS_STRUCT*) has no version on the wire: it is
 *    saved and loaded at its own description's version. Subsections carry
 *    theirs.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ferry/vmstate.h"
#include "vmstate-json.h"

#define VMS_MAX_ENTRIES 65536u          /* fields or subsections per table */
#define VMS_MAX_SUBSECTION (16u << 20)  /* body bytes, either direction */
#define VMS_READ_CHUNK (64u << 10)

struct walk {
	bool load;
	int depth;
	struct ferry_error *err; /* private, see finish() */
	size_t plen;
	char path[256];          /* "regs[3].x": element being moved */
};

static const char *nm(const struct ferry_vmsd *vmsd)
{
	return vmsd && vmsd->name ? vmsd->name : "?";
}

/* Wire width of an integer/bool type; 0 for the others. */
static size_t type_width(enum ferry_vms_type t)
{
	switch (t) {
	case FERRY_VMS_T_U8: case FERRY_VMS_T_I8: case FERRY_VMS_T_BOOL:
		return 1;
	case FERRY_VMS_T_U16: case FERRY_VMS_T_I16:
		return 2;
	case FERRY_VMS_T_U32: case FERRY_VMS_T_I32:
		return 4;
	case FERRY_VMS_T_U64: case FERRY_VMS_T_I64:
		return 8;
	default:
		return 0;
	}
}

const char *ferry_vms_type_name(enum ferry_vms_type t)
{
	static const char *const names[] = {
		[FERRY_VMS_END] = "end",
		[FERRY_VMS_T_U8] = "uint8", [FERRY_VMS_T_U16] = "uint16",
		[FERRY_VMS_T_U32] = "uint32", [FERRY_VMS_T_U64] = "uint64",
		[FERRY_VMS_T_I8] = "int8", [FERRY_VMS_T_I16] = "int16",
		[FERRY_VMS_T_I32] = "int32", [FERRY_VMS_T_I64] = "int64",
		[FERRY_VMS_T_BOOL] = "bool", [FERRY_VMS_T_BUFFER] = "buffer",
		[FERRY_VMS_T_STRUCT] = "struct",
	};

	if ((unsigned)t < sizeof(names) / sizeof(names[0]))
		return names[t];
	return "unknown";
}

/* ---- small helpers ------------------------------------------------------ */

static uint64_t native_get(const void *p, size_t width)
{
	uint8_t b; uint16_t h; uint32_t l; uint64_t q;

	switch (width) {
	case 1: memcpy(&b, p, 1); return b;
	case 2: memcpy(&h, p, 2); return h;
	case 4: memcpy(&l, p, 4); return l;
	default: memcpy(&q, p, 8); return q;
	}
}

static void native_put(void *p, size_t width, uint64_t v)
{
	uint8_t b = (uint8_t)v; uint16_t h = (uint16_t)v; uint32_t l = (uint32_t)v;

	switch (width) {
	case 1: memcpy(p, &b, 1); break;
	case 2: memcpy(p, &h, 2); break;
	case 4: memcpy(p, &l, 4); break;
	default: memcpy(p, &v, 8); break;
	}
}

static void wire_put(struct ferry_chan *c, size_t width, uint64_t v)
{
	switch (width) {
	case 1: ferry_put_u8(c, (uint8_t)v); break;
	case 2: ferry_put_be16(c, (uint16_t)v); break;
	case 4: ferry_put_be32(c, (uint32_t)v); break;
	default: ferry_put_be64(c, v); break;
	}
}

static uint64_t wire_get(struct ferry_chan *c, size_t width)
{
	switch (width) {
	case 1: return ferry_get_u8(c);
	case 2: return ferry_get_be16(c);
	case 4: return ferry_get_be32(c);
	default: return ferry_get_be64(c);
	}
}

static int fail(struct walk *w, int code, const char *fmt, ...)
	FERRY_PRINTF(3, 4);
static int fail(struct walk *w, int code, const char *fmt, ...)
{
	char msg[FERRY_ERROR_MSG_MAX];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (w->plen)
		return ferry_error_set(w->err, code, "field '%s': %s", w->path, msg);
	return ferry_error_set(w->err, code, "%s", msg);
}

/* The channel's sticky error, reported at the current path; 0 if none. */
static int chan_check(struct walk *w, struct ferry_chan *c)
{
	struct ferry_error ce = {0};
	int r = ferry_chan_error(c, &ce);

	return r ? fail(w, r, "%s", ce.msg) : 0;
}

/* Append to the path; returns the length to restore with path_pop(). */
static size_t path_push(struct walk *w, const char *fmt, ...) FERRY_PRINTF(2, 3);
static size_t path_push(struct walk *w, const char *fmt, ...)
{
	size_t old = w->plen;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(w->path + old, sizeof(w->path) - old, fmt, ap);
	va_end(ap);
	w->plen = strlen(w->path);
	return old;
}

static void path_pop(struct walk *w, size_t old)
{
	w->plen = old;
	w->path[old] = 0;
}

/* Turn a hook's result into ours, keeping the hook's own message. */
static int hook_result(struct walk *w, const struct ferry_vmsd *vmsd,
		       const char *hook, int r, const struct ferry_error *he)
{
	if (r == 0)
		return 0;
	if (r > 0)
		r = -EINVAL;
	if (he->code)
		return fail(w, r, "%s of '%s': %s", hook, nm(vmsd), he->msg);
	return fail(w, r, "%s of '%s' failed: %s", hook, nm(vmsd), strerror(-r));
}

/* ---- the interpreter ---------------------------------------------------- */

static int walk_struct(struct walk *w, struct ferry_chan *c,
		       const struct ferry_vmsd *vmsd, uint8_t *obj,
		       uint32_t version);

static int walk_field(struct walk *w, struct ferry_chan *c,
		      const struct ferry_vms_field *f, uint8_t *obj)
{
	uint8_t *base = obj + f->offset;
	size_t width = type_width(f->type), mark;
	uint32_t count = f->n, i;
	int r = 0;

	if (f->flags & FERRY_VMS_F_VARRAY) {
		if (f->count_size != 1 && f->count_size != 2 && f->count_size != 4)
			return fail(w, -EINVAL, "count width %u is not 1, 2 or 4",
				    f->count_size);
		count = (uint32_t)native_get(obj + f->count_offset, f->count_size);
		if (count > f->n)
			return fail(w, w->load ? -EBADMSG : -EINVAL,
				    "count %" PRIu32 " exceeds capacity %" PRIu32,
				    count, f->n);
	}
	if (f->type == FERRY_VMS_T_STRUCT) {
		if (!f->vmsd)
			return fail(w, -EINVAL, "struct field without a description");
		for (i = 0; i < count && !r; i++) {
			mark = (f->n > 1 || (f->flags & FERRY_VMS_F_VARRAY)) ?
			       path_push(w, "[%" PRIu32 "]", i) : w->plen;
			r = walk_struct(w, c, f->vmsd, base + (size_t)i * f->size,
					f->vmsd->version);
			path_pop(w, mark);
		}
		return r;
	}
	/* Byte runs: raw buffers and 8-bit integer arrays are the same bytes
	 * on the wire and in memory. */
	if (f->type == FERRY_VMS_T_BUFFER ||
	    (width == 1 && f->type != FERRY_VMS_T_BOOL && f->size == 1)) {
		if (w->load)
			ferry_get_buf(c, base, (size_t)count * f->size);
		else
			ferry_put_buf(c, base, (size_t)count * f->size);
		return chan_check(w, c);
	}
	if (!width || f->size != width)
		return fail(w, -EINVAL, "type %d with element size %zu",
			    (int)f->type, f->size);
	for (i = 0; i < count; i++) {
		uint8_t *p = base + (size_t)i * width;
		uint64_t v;

		if (!w->load) {
			v = native_get(p, width);
			wire_put(c, width, f->type == FERRY_VMS_T_BOOL ? v != 0 : v);
			continue;
		}
		v = wire_get(c, width);
		if (ferry_chan_error(c, NULL))
			break;
		if (f->type == FERRY_VMS_T_BOOL && v > 1) {
			if (f->n > 1 || (f->flags & FERRY_VMS_F_VARRAY))
				path_push(w, "[%" PRIu32 "]", i);
			return fail(w, -EBADMSG, "bool value %" PRIu64
				    " is not 0 or 1", v);
		}
		native_put(p, width, v);
	}
	return chan_check(w, c);
}

/* Walk a subsection body with a fresh path; prefix its errors. */
static int walk_sub(struct walk *w, struct ferry_chan *c,
		    const struct ferry_vmsd *sub, uint8_t *obj, uint32_t version)
{
	char saved[sizeof(w->path)];
	size_t plen = w->plen;
	int r;

	memcpy(saved, w->path, plen + 1);
	path_pop(w, 0);
	r = walk_struct(w, c, sub, obj, version);
	memcpy(w->path, saved, plen + 1);
	w->plen = plen;
	if (r)
		ferry_error_prefix(w->err, "%s%s%ssubsection '%s': ",
				   plen ? "field '" : "", w->path,
				   plen ? "': " : "", nm(sub));
	return r;
}

static int save_subsections(struct walk *w, struct ferry_chan *c,
			    const struct ferry_vmsd *vmsd, uint8_t *obj)
{
	const struct ferry_vmsd *const *sp;

	for (sp = vmsd->subsections; sp && *sp; sp++) {
		const struct ferry_vmsd *sub = *sp;
		struct ferry_chan *mc;
		const uint8_t *body;
		size_t len = 0;
		int r;

		if (sub->needed && !sub->needed(obj))
			continue;
		mc = ferry_chan_new_mem_writer(VMS_MAX_SUBSECTION);
		if (!mc)
			return fail(w, -ENOMEM, "subsection '%s': out of memory",
				    nm(sub));
		r = walk_sub(w, mc, sub, obj, sub->version);
		if (!r) {
			body = ferry_chan_mem_data(mc, &len);
			ferry_put_u8(c, FERRY_VMS_SUBSECTION);
			ferry_put_str8(c, sub->name);
			ferry_put_be32(c, sub->version);
			ferry_put_be32(c, (uint32_t)len);
			ferry_put_buf(c, body, len);
		}
		ferry_chan_free(mc);
		if (r || (r = chan_check(w, c)))
			return r;
	}
	ferry_put_u8(c, FERRY_VMS_SUBSECTION_END);
	return chan_check(w, c);
}

/* Read @len bytes, growing the buffer only as bytes actually arrive. */
static int read_body(struct walk *w, struct ferry_chan *c, uint32_t len,
		     uint8_t **out)
{
	uint8_t *buf = NULL, *nb;
	size_t got = 0, cap = 0, n;

	while (got < len) {
		n = len - got < VMS_READ_CHUNK ? len - got : VMS_READ_CHUNK;
		if (got + n > cap) {
			cap = cap * 2 > got + n ? cap * 2 : got + n;
			cap = cap < len ? cap : len;
			if (!(nb = realloc(buf, cap))) {
				free(buf);
				return fail(w, -ENOMEM, "out of memory");
			}
			buf = nb;
		}
		ferry_get_buf(c, buf + got, n);
		if (ferry_chan_error(c, NULL)) {
			free(buf);
			return chan_check(w, c);
		}
		got += n;
	}
	*out = buf;
	return 0;
}

static int load_one_subsection(struct walk *w, struct ferry_chan *c,
			       const struct ferry_vmsd *vmsd, uint8_t *obj)
{
	const struct ferry_vmsd *const *sp, *sub = NULL;
	struct ferry_chan *rc;
	uint8_t *body = NULL;
	uint32_t version, len;
	size_t left;
	char name[256];
	int r;

	ferry_get_str8(c, name, sizeof(name));
	version = ferry_get_be32(c);
	len = ferry_get_be32(c);
	if ((r = chan_check(w, c)))
		return r;
	for (sp = vmsd->subsections; sp && *sp && !sub; sp++)
		if ((*sp)->name && !strcmp((*sp)->name, name))
			sub = *sp;
	if (!sub)
		return fail(w, -EINVAL, "unknown subsection '%s' in '%s'",
			    name, nm(vmsd));
	if (version < sub->minimum_version || version > sub->version)
		return fail(w, -EINVAL, "subsection '%s': version %" PRIu32
			    " outside [%" PRIu32 ", %" PRIu32 "]", name,
			    version, sub->minimum_version, sub->version);
	/* Nonzero only for memory readers: then the exact bytes left. */
	left = ferry_chan_mem_remaining(c);
	if (len > VMS_MAX_SUBSECTION || (left && len > left))
		return fail(w, -EBADMSG, "subsection '%s': length %" PRIu32
			    " exceeds the %zu bytes available", name, len,
			    left && left < VMS_MAX_SUBSECTION ? left :
			    (size_t)VMS_MAX_SUBSECTION);
	if ((r = read_body(w, c, len, &body)))
		return r;
	rc = ferry_chan_new_mem_reader(body ? (const void *)body : "", len);
	if (!rc) {
		free(body);
		return fail(w, -ENOMEM, "out of memory");
	}
	r = walk_sub(w, rc, sub, obj, version);
	if (!r && (left = ferry_chan_mem_remaining(rc)))
		r = fail(w, -EBADMSG, "subsection '%s': %zu trailing bytes",
			 name, left);
	ferry_chan_free(rc);
	free(body);
	return r;
}

static int load_subsections(struct walk *w, struct ferry_chan *c,
			    const struct ferry_vmsd *vmsd, uint8_t *obj)
{
	for (;;) {
		uint8_t m = ferry_get_u8(c);
		int r = chan_check(w, c);

		if (r || m == FERRY_VMS_SUBSECTION_END)
			return r;
		if (m != FERRY_VMS_SUBSECTION)
			return fail(w, -EBADMSG, "bad subsection marker 0x%02x "
				    "after the fields of '%s'", m, nm(vmsd));
		if ((r = load_one_subsection(w, c, vmsd, obj)))
			return r;
	}
}

static int walk_struct(struct walk *w, struct ferry_chan *c,
		       const struct ferry_vmsd *vmsd, uint8_t *obj,
		       uint32_t version)
{
	struct ferry_error he = {0};
	const struct ferry_vms_field *f;
	size_t mark;
	int r = 0, r2;

	if (w->depth >= FERRY_VMS_MAX_DEPTH)
		return fail(w, -EINVAL, "'%s' nested deeper than %d",
			    nm(vmsd), FERRY_VMS_MAX_DEPTH);
	w->depth++;
	if (w->load && vmsd->pre_load)
		r = hook_result(w, vmsd, "pre_load", vmsd->pre_load(obj, &he), &he);
	else if (!w->load && vmsd->pre_save)
		r = hook_result(w, vmsd, "pre_save", vmsd->pre_save(obj, &he), &he);
	if (r)
		goto out;
	for (f = vmsd->fields; f && f->type != FERRY_VMS_END && !r; f++) {
		if (f->version_id > version)
			continue;
		mark = path_push(w, "%s%s", w->plen ? "." : "",
				 f->name ? f->name : "?");
		r = walk_field(w, c, f, obj);
		path_pop(w, mark);
	}
	if (!r)
		r = w->load ? load_subsections(w, c, vmsd, obj) :
			      save_subsections(w, c, vmsd, obj);
	ferry_error_clear(&he);
	if (w->load && !r && vmsd->post_load)
		r = hook_result(w, vmsd, "post_load",
				vmsd->post_load(obj, version, &he), &he);
	else if (!w->load && vmsd->post_save) {
		/* Also after a failure: it undoes what pre_save did (but not
		 * when pre_save itself failed; it cleans up after itself). */
		r2 = vmsd->post_save(obj, &he);
		if (!r)
			r = hook_result(w, vmsd, "post_save", r2, &he);
	}
out:
	w->depth--;
	return r;
}

static int finish(struct walk *w, const struct ferry_vmsd *vmsd, int r,
		  struct ferry_error *err)
{
	if (!r)
		return 0;
	if (!w->err->code)
		fail(w, r, "%s", strerror(-r));
	ferry_error_prefix(w->err, "vmstate '%s': ", nm(vmsd));
	ferry_error_propagate(err, w->err);
	return r;
}

int ferry_vmstate_save(struct ferry_chan *c, const struct ferry_vmsd *vmsd,
		       void *obj, struct ferry_error *err)
{
	struct ferry_error e = {0};
	struct walk w = { .load = false, .err = &e };

	if (!c || !vmsd || !obj)
		return ferry_error_set(err, -EINVAL, "vmstate save: NULL argument");
	return finish(&w, vmsd, walk_struct(&w, c, vmsd, obj, vmsd->version), err);
}

int ferry_vmstate_load(struct ferry_chan *c, const struct ferry_vmsd *vmsd,
		       void *obj, uint32_t version, struct ferry_error *err)
{
	struct ferry_error e = {0};
	struct walk w = { .load = true, .err = &e };

	if (!c || !vmsd || !obj)
		return ferry_error_set(err, -EINVAL, "vmstate load: NULL argument");
	if (version < vmsd->minimum_version || version > vmsd->version)
		return ferry_error_set(err, -EINVAL, "vmstate '%s': version %"
				       PRIu32 " outside the supported window [%"
				       PRIu32 ", %" PRIu32 "]", nm(vmsd),
				       version, vmsd->minimum_version,
				       vmsd->version);
	return finish(&w, vmsd, walk_struct(&w, c, vmsd, obj, version), err);
}

/* ---- validation --------------------------------------------------------- */

static int check_vmsd(const struct ferry_vmsd *vmsd, int depth,
		      size_t objsize, struct ferry_error *e);

/* Does [off, off + size * n) fit in an object of @objsize (0 = unknown)? */
static bool fits(size_t objsize, size_t off, size_t size, size_t n)
{
	if (!objsize)
		return true;
	if (off > objsize || (size && n > (objsize - off) / size))
		return false;
	return true;
}

static int check_count(const struct ferry_vmsd *vmsd,
		       const struct ferry_vms_field *f, struct ferry_error *e)
{
	const struct ferry_vms_field *g;

	if (f->count_size != 1 && f->count_size != 2 && f->count_size != 4)
		return ferry_error_set(e, -EINVAL, "count width %u is not 1, 2 "
				       "or 4", f->count_size);
	for (g = vmsd->fields; g < f; g++) {
		if (g->offset != f->count_offset)
			continue;
		if (g->size != f->count_size || g->n != 1 || g->flags ||
		    (g->type != FERRY_VMS_T_U8 && g->type != FERRY_VMS_T_U16 &&
		     g->type != FERRY_VMS_T_U32))
			return ferry_error_set(e, -EINVAL, "count field '%s' is "
					       "not an unsigned scalar of %u "
					       "bytes", g->name, f->count_size);
		if (g->version_id > f->version_id)
			return ferry_error_set(e, -EINVAL, "count field '%s' is "
					       "newer (version %" PRIu32 ") than "
					       "the array", g->name, g->version_id);
		return 0;
	}
	return ferry_error_set(e, -EINVAL, "count at offset %zu is not an "
			       "earlier field of the table", f->count_offset);
}

static int check_field(const struct ferry_vmsd *vmsd,
		       const struct ferry_vms_field *f, int depth,
		       size_t objsize, struct ferry_error *e)
{
	size_t width = type_width(f->type);

	if (f->type == FERRY_VMS_END || (unsigned)f->type > FERRY_VMS_T_STRUCT)
		return ferry_error_set(e, -EINVAL, "unknown type %d", (int)f->type);
	if (f->flags & ~FERRY_VMS_F_VARRAY)
		return ferry_error_set(e, -EINVAL, "unknown flags 0x%x",
				       (unsigned)f->flags);
	if (width && f->size != width)
		return ferry_error_set(e, -EINVAL, "%s of size %zu",
				       ferry_vms_type_name(f->type), f->size);
	if (!f->size || !f->n)
		return ferry_error_set(e, -EINVAL, "empty (size %zu, count %"
				       PRIu32 ")", f->size, f->n);
	if (f->type == FERRY_VMS_T_BUFFER &&
	    (f->n != 1 || (f->flags & FERRY_VMS_F_VARRAY)))
		return ferry_error_set(e, -EINVAL, "a buffer is one element; "
				       "use FERRY_VMS_VBUFFER for variable length");
	if (f->version_id > vmsd->version)
		return ferry_error_set(e, -EINVAL, "version_id %" PRIu32 " above "
				       "the description's version %" PRIu32,
				       f->version_id, vmsd->version);
	if (!fits(objsize, f->offset, f->size, f->n) ||
	    ((f->flags & FERRY_VMS_F_VARRAY) &&
	     !fits(objsize, f->count_offset, f->count_size, 1)))
		return ferry_error_set(e, -EINVAL, "does not fit in the %zu-byte "
				       "struct", objsize);
	if ((f->flags & FERRY_VMS_F_VARRAY) && check_count(vmsd, f, e))
		return e->code;
	if (f->type == FERRY_VMS_T_STRUCT) {
		if (!f->vmsd)
			return ferry_error_set(e, -EINVAL, "struct without a "
					       "description");
		if (check_vmsd(f->vmsd, depth + 1, f->size, e))
			return ferry_error_prefix(e, "struct '%s': ", nm(f->vmsd));
	}
	return 0;
}

static int check_vmsd(const struct ferry_vmsd *vmsd, int depth,
		      size_t objsize, struct ferry_error *e)
{
	const struct ferry_vms_field *f;
	const struct ferry_vmsd *const *sp, *const *sq;
	unsigned i;

	if (!vmsd)
		return ferry_error_set(e, -EINVAL, "NULL description");
	if (!vmsd->name || !vmsd->name[0] || strlen(vmsd->name) > 255)
		return ferry_error_set(e, -EINVAL, "name empty or over 255 bytes");
	if (depth >= FERRY_VMS_MAX_DEPTH)
		return ferry_error_set(e, -EINVAL, "nested deeper than %d",
				       FERRY_VMS_MAX_DEPTH);
	if (vmsd->minimum_version > vmsd->version)
		return ferry_error_set(e, -EINVAL, "minimum_version %" PRIu32
				       " above version %" PRIu32,
				       vmsd->minimum_version, vmsd->version);
	for (i = 0, f = vmsd->fields; f && f->type != FERRY_VMS_END; f++, i++) {
		if (i >= VMS_MAX_ENTRIES)
			return ferry_error_set(e, -EINVAL, "no end of list "
					       "within %u fields", i);
		if (!f->name || !f->name[0])
			return ferry_error_set(e, -EINVAL, "field #%u has no "
					       "name", i);
		if (check_field(vmsd, f, depth, objsize, e))
			return ferry_error_prefix(e, "field '%s': ", f->name);
	}
	for (i = 0, sp = vmsd->subsections; sp && *sp; sp++, i++) {
		if (i >= VMS_MAX_ENTRIES)
			return ferry_error_set(e, -EINVAL, "no end of "
					       "subsection list");
		if (check_vmsd(*sp, depth + 1, objsize, e))
			return ferry_error_prefix(e, "subsection '%s': ", nm(*sp));
		for (sq = vmsd->subsections; sq < sp; sq++)
			if (!strcmp((*sq)->name, (*sp)->name))
				return ferry_error_set(e, -EINVAL, "two "
						       "subsections named "
						       "'%s'", (*sp)->name);
	}
	return 0;
}

int ferry_vmstate_validate(const struct ferry_vmsd *vmsd,
			   struct ferry_error *err)
{
	struct ferry_error e = {0};

	if (!check_vmsd(vmsd, 0, 0, &e))
		return 0;
	ferry_error_prefix(&e, "vmstate '%s': ", nm(vmsd));
	return ferry_error_propagate(err, &e);
}

/* ---- JSON schema -------------------------------------------------------- */

static json_t *vmsd_json(const struct ferry_vmsd *vmsd, int depth);

static json_t *field_json(const struct ferry_vms_field *f, int depth)
{
	json_t *o = json_object();
	int bad = !o;

	if (bad)
		return NULL;
	bad |= json_object_set_new(o, "name", json_string(f->name ? f->name : ""));
	bad |= json_object_set_new(o, "type",
				   json_string(ferry_vms_type_name(f->type)));
	bad |= json_object_set_new(o, "size", json_integer((json_int_t)f->size));
	bad |= json_object_set_new(o, "count", json_integer(f->n));
	if (f->flags & FERRY_VMS_F_VARRAY)
		bad |= json_object_set_new(o, "varray", json_true());
	bad |= json_object_set_new(o, "version_id", json_integer(f->version_id));
	if (f->type == FERRY_VMS_T_STRUCT)
		bad |= json_object_set_new(o, "struct",
					   vmsd_json(f->vmsd, depth + 1));
	if (bad) {
		json_decref(o);
		return NULL;
	}
	return o;
}

static json_t *vmsd_json(const struct ferry_vmsd *vmsd, int depth)
{
	const struct ferry_vms_field *f;
	const struct ferry_vmsd *const *sp;
	json_t *o, *fields, *subs;
	int bad;

	if (!vmsd || depth >= FERRY_VMS_MAX_DEPTH)
		return NULL;
	o = json_object();
	fields = json_array();
	subs = json_array();
	bad = !o || !fields || !subs;
	if (!bad) {
		bad |= json_object_set_new(o, "name",
					   json_string(vmsd->name ? vmsd->name : ""));
		bad |= json_object_set_new(o, "version",
					   json_integer(vmsd->version));
		bad |= json_object_set_new(o, "minimum_version",
					   json_integer(vmsd->minimum_version));
		for (f = vmsd->fields; !bad && f && f->type != FERRY_VMS_END; f++)
			bad |= json_array_append_new(fields, field_json(f, depth));
		for (sp = vmsd->subsections; !bad && sp && *sp; sp++)
			bad |= json_array_append_new(subs, vmsd_json(*sp, depth + 1));
	}
	if (bad) {
		json_decref(o);
		json_decref(fields);
		json_decref(subs);
		return NULL;
	}
	if (json_object_set_new(o, "fields", fields)) {
		json_decref(subs);
		json_decref(o);
		return NULL;
	}
	if (json_object_set_new(o, "subsections", subs)) {
		json_decref(o);
		return NULL;
	}
	return o;
}

json_t *ferry__vmsd_to_json(const struct ferry_vmsd *vmsd)
{
	return vmsd_json(vmsd, 0);
}
