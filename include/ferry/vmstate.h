/*
 * ferry/vmstate.h - declarative description of non-iterable device state.
 *
 * A device describes its state struct with a table of fields built by the
 * FERRY_VMS_* macros, which compute offsets and reject, at compile time, a
 * field whose C type does not match the macro. A small interpreter saves
 * and loads the struct from the table (lib/vmstate.c); the same table is
 * dumped as JSON (ferry_vmstate_schema_json) so two builds can be diffed.
 *
 * Wire encoding of one struct (see docs/stream-format.md):
 *   fields in table order, each big-endian at its natural width (bool as one
 *   byte 0/1, buffers raw, variable arrays prefixed by nothing: their count
 *   field is itself a field that must come earlier in the table), then zero
 *   or more subsections
 *       u8 0x05 | str8 name | be32 version | be32 len | body[len]
 *   then u8 0x00 (end of subsections). A field with version_id greater
 *   than the stream's version of the struct is neither saved nor loaded.
 *
 * Versioning: a description saves at `version`; it loads any version in
 * [minimum_version, version]. Prefer a subsection with needed() over a
 * version bump: old destinations can still load streams that do not need it.
 * A subsection the destination does not know fails the load by name.
 *
 * Hooks run in the thread that saves/loads (the migration thread on the
 * source with vCPUs paused; the load thread on the destination before the VM
 * runs). They return 0 or -errno and fill @err on failure.
 */
#ifndef FERRY_VMSTATE_H
#define FERRY_VMSTATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ferry/channel.h"
#include "ferry/common.h"

#ifdef __cplusplus
extern "C" {
#endif

enum ferry_vms_type {
	FERRY_VMS_END = 0, /* table terminator */
	FERRY_VMS_T_U8, FERRY_VMS_T_U16, FERRY_VMS_T_U32, FERRY_VMS_T_U64,
	FERRY_VMS_T_I8, FERRY_VMS_T_I16, FERRY_VMS_T_I32, FERRY_VMS_T_I64,
	FERRY_VMS_T_BOOL,
	FERRY_VMS_T_BUFFER,  /* raw bytes */
	FERRY_VMS_T_STRUCT,  /* nested description (field.vmsd) */
};

/* Field flags. */
#define FERRY_VMS_F_VARRAY 0x1u /* element count read from count_offset */

struct ferry_vmsd;

struct ferry_vms_field {
	const char *name;
	enum ferry_vms_type type;
	uint32_t flags;
	size_t offset;        /* of the field in the struct */
	size_t size;          /* of one element (BUFFER: of the whole buffer) */
	uint32_t n;           /* element capacity (1 for a scalar) */
	/* FERRY_VMS_F_VARRAY: offset and width (1/2/4 bytes) of the count field
	 * that holds the number of valid elements; loads reject count > n. */
	size_t count_offset;
	uint8_t count_size;
	uint32_t version_id;  /* first struct version that carries the field */
	const struct ferry_vmsd *vmsd; /* FERRY_VMS_T_STRUCT */
};

struct ferry_vmsd {
	const char *name;          /* idstr, or subsection name */
	uint32_t version;          /* version written */
	uint32_t minimum_version;  /* oldest version loaded */
	const struct ferry_vms_field *fields; /* ends with FERRY_VMS_END_OF_LIST */
	/* NULL-terminated list, or NULL. */
	const struct ferry_vmsd *const *subsections;
	/* Subsections only: is it sent? NULL means always. */
	bool (*needed)(const void *obj);
	int (*pre_save)(void *obj, struct ferry_error *err);
	int (*post_save)(void *obj, struct ferry_error *err);
	int (*pre_load)(void *obj, struct ferry_error *err);
	/* After every field of this struct (and its subsections) is loaded. */
	int (*post_load)(void *obj, uint32_t version, struct ferry_error *err);
};

/* ---- field macros ------------------------------------------------------ */

/* Zero at runtime; a compile error ("negative array size") if the
 * expression @e is not of type T. (Not a null-pointer subtraction: clang's
 * -Wextra warns about those.) */
#define FERRY__SAME_TYPE(e, T) \
	(0 * sizeof(char[1 - 2 * !__builtin_types_compatible_p(__typeof__(e), T)]))
/* Zero at runtime; a compile error if the field is not of type T. */
#define FERRY__TYPECHECK(S, f, T) FERRY__SAME_TYPE(((S *)0)->f, T)
#define FERRY__FIELD(S, f, T) (offsetof(S, f) + FERRY__TYPECHECK(S, f, T))
#define FERRY__ARRAY_LEN(S, f) \
	(sizeof(((S *)0)->f) / sizeof(((S *)0)->f[0]))
/* Zero at runtime; a compile error if S.f is not an array of T. */
#define FERRY__ARRAYCHECK(S, f, T) \
	(FERRY__SAME_TYPE(((S *)0)->f[0], T) + \
	 0 * sizeof(char[1 - 2 * !!__builtin_types_compatible_p( \
		__typeof__(((S *)0)->f), __typeof__(&((S *)0)->f[0]))]))

#define FERRY__SCALAR(S, f, T, TY, V) {				\
	.name = #f, .type = TY, .offset = FERRY__FIELD(S, f, T),	\
	.size = sizeof(T), .n = 1, .version_id = (V) }
/* 64-bit fields: uint64_t and the kernel's __u64 (unsigned long long) are
 * distinct C types of identical width and signedness; accept both. */
#define FERRY__SCALAR64(S, f, T, T2, TY, V) {				\
	.name = #f, .type = TY,						\
	.offset = offsetof(S, f) + 0 * sizeof(char[1 - 2 * !(		\
		__builtin_types_compatible_p(__typeof__(((S *)0)->f), T) ||	\
		__builtin_types_compatible_p(__typeof__(((S *)0)->f), T2))]),	\
	.size = sizeof(T), .n = 1, .version_id = (V) }
#define FERRY__ARRAY(S, f, T, TY, V) {					\
	.name = #f, .type = TY,						\
	.offset = offsetof(S, f) + FERRY__ARRAYCHECK(S, f, T),		\
	.size = sizeof(T), .n = FERRY__ARRAY_LEN(S, f), .version_id = (V) }
/* Count field of a variable array: any unsigned int of 8, 16 or 32 bits. */
#define FERRY__COUNT_OK(S, c) \
	(0 * sizeof(char[1 - 2 * !( \
		__builtin_types_compatible_p(__typeof__(((S *)0)->c), uint8_t) || \
		__builtin_types_compatible_p(__typeof__(((S *)0)->c), uint16_t) || \
		__builtin_types_compatible_p(__typeof__(((S *)0)->c), uint32_t))]))
#define FERRY__VARRAY(S, f, T, TY, c, V) {				\
	.name = #f, .type = TY, .flags = FERRY_VMS_F_VARRAY,		\
	.offset = offsetof(S, f) + FERRY__ARRAYCHECK(S, f, T),		\
	.size = sizeof(T), .n = FERRY__ARRAY_LEN(S, f),			\
	.count_offset = offsetof(S, c) + FERRY__COUNT_OK(S, c),		\
	.count_size = sizeof(((S *)0)->c), .version_id = (V) }

/* Scalars: FERRY_VMS_U32(struct type, field) etc. _V variants take the
 * struct version that introduced the field. */
#define FERRY_VMS_U8_V(S, f, v)   FERRY__SCALAR(S, f, uint8_t, FERRY_VMS_T_U8, v)
#define FERRY_VMS_U16_V(S, f, v)  FERRY__SCALAR(S, f, uint16_t, FERRY_VMS_T_U16, v)
#define FERRY_VMS_U32_V(S, f, v)  FERRY__SCALAR(S, f, uint32_t, FERRY_VMS_T_U32, v)
#define FERRY_VMS_U64_V(S, f, v)  FERRY__SCALAR64(S, f, uint64_t, unsigned long long, FERRY_VMS_T_U64, v)
#define FERRY_VMS_I8_V(S, f, v)   FERRY__SCALAR(S, f, int8_t, FERRY_VMS_T_I8, v)
#define FERRY_VMS_I16_V(S, f, v)  FERRY__SCALAR(S, f, int16_t, FERRY_VMS_T_I16, v)
#define FERRY_VMS_I32_V(S, f, v)  FERRY__SCALAR(S, f, int32_t, FERRY_VMS_T_I32, v)
#define FERRY_VMS_I64_V(S, f, v)  FERRY__SCALAR64(S, f, int64_t, long long, FERRY_VMS_T_I64, v)
#define FERRY_VMS_BOOL_V(S, f, v) FERRY__SCALAR(S, f, bool, FERRY_VMS_T_BOOL, v)
#define FERRY_VMS_U8(S, f)   FERRY_VMS_U8_V(S, f, 0)
#define FERRY_VMS_U16(S, f)  FERRY_VMS_U16_V(S, f, 0)
#define FERRY_VMS_U32(S, f)  FERRY_VMS_U32_V(S, f, 0)
#define FERRY_VMS_U64(S, f)  FERRY_VMS_U64_V(S, f, 0)
#define FERRY_VMS_I8(S, f)   FERRY_VMS_I8_V(S, f, 0)
#define FERRY_VMS_I16(S, f)  FERRY_VMS_I16_V(S, f, 0)
#define FERRY_VMS_I32(S, f)  FERRY_VMS_I32_V(S, f, 0)
#define FERRY_VMS_I64(S, f)  FERRY_VMS_I64_V(S, f, 0)
#define FERRY_VMS_BOOL(S, f) FERRY_VMS_BOOL_V(S, f, 0)

/* Fixed arrays of integers: FERRY_VMS_ARRAY(S, f, uint32_t). */
#define FERRY_VMS_ARRAY(S, f, T) \
	FERRY__ARRAY(S, f, T, FERRY__INT_TYPE(T), 0)
/* Variable arrays: S.f is T[cap]; S.count holds how many are valid. */
#define FERRY_VMS_VARRAY(S, f, T, count) \
	FERRY__VARRAY(S, f, T, FERRY__INT_TYPE(T), count, 0)
/* Fixed byte buffer: S.f is uint8_t[N] (or char[N]). */
#define FERRY_VMS_BUFFER(S, f) {					\
	.name = #f, .type = FERRY_VMS_T_BUFFER,				\
	.offset = offsetof(S, f) + 0 * sizeof(char[1 - 2 * !(sizeof(((S *)0)->f[0]) == 1)]), \
	.size = sizeof(((S *)0)->f), .n = 1 }
/*
 * Raw bytes of any field, e.g. a kernel ABI struct (struct kvm_regs) that
 * is only ever moved between hosts of the same architecture. The schema
 * records its size, not its layout: prefer typed fields where they exist.
 */
#define FERRY_VMS_RAW(S, f) {						\
	.name = #f, .type = FERRY_VMS_T_BUFFER,				\
	.offset = offsetof(S, f), .size = sizeof(((S *)0)->f), .n = 1 }
/* Variable byte buffer: S.f is uint8_t[cap], S.len holds the used length. */
#define FERRY_VMS_VBUFFER(S, f, len) \
	FERRY__VARRAY(S, f, uint8_t, FERRY_VMS_T_U8, len, 0)
/* Nested struct: S.f is of type T, described by @desc. */
#define FERRY_VMS_STRUCT(S, f, T, desc) {				\
	.name = #f, .type = FERRY_VMS_T_STRUCT,				\
	.offset = FERRY__FIELD(S, f, T), .size = sizeof(T), .n = 1,	\
	.vmsd = &(desc) }
/* Fixed array of structs: S.f is T[N]. */
#define FERRY_VMS_STRUCT_ARRAY(S, f, T, desc) {				\
	.name = #f, .type = FERRY_VMS_T_STRUCT,				\
	.offset = offsetof(S, f) + FERRY__ARRAYCHECK(S, f, T),		\
	.size = sizeof(T), .n = FERRY__ARRAY_LEN(S, f), .vmsd = &(desc) }
/* Variable array of structs: S.f is T[cap], S.count valid. */
#define FERRY_VMS_STRUCT_VARRAY(S, f, T, count, desc) {			\
	.name = #f, .type = FERRY_VMS_T_STRUCT, .flags = FERRY_VMS_F_VARRAY, \
	.offset = offsetof(S, f) + FERRY__ARRAYCHECK(S, f, T),		\
	.size = sizeof(T), .n = FERRY__ARRAY_LEN(S, f),			\
	.count_offset = offsetof(S, count) + FERRY__COUNT_OK(S, count),	\
	.count_size = sizeof(((S *)0)->count), .vmsd = &(desc) }
#define FERRY_VMS_END_OF_LIST { .name = NULL, .type = FERRY_VMS_END }

#define FERRY__INT_TYPE(T) _Generic((T)0,				\
	uint8_t: FERRY_VMS_T_U8, uint16_t: FERRY_VMS_T_U16,		\
	uint32_t: FERRY_VMS_T_U32, uint64_t: FERRY_VMS_T_U64,		\
	int8_t: FERRY_VMS_T_I8, int16_t: FERRY_VMS_T_I16,		\
	int32_t: FERRY_VMS_T_I32, int64_t: FERRY_VMS_T_I64,		\
	bool: FERRY_VMS_T_BOOL)

/* ---- interpreter ------------------------------------------------------- */

/* Subsection marker and end-of-subsections marker. */
#define FERRY_VMS_SUBSECTION 0x05
#define FERRY_VMS_SUBSECTION_END 0x00
/* Nesting depth limit for structs and subsections (hostile streams). */
#define FERRY_VMS_MAX_DEPTH 16

/* Save @obj described by @vmsd to @c at vmsd->version. Runs pre_save and
 * post_save (post_save also after a failure, to undo what pre_save did). */
FERRY_API int ferry_vmstate_save(struct ferry_chan *c,
				 const struct ferry_vmsd *vmsd, void *obj,
				 struct ferry_error *err);
/* Load @obj from @c, which holds a struct of @version (as announced by the
 * section header). Rejects versions outside the window. On failure @obj
 * may be partly written; the caller discards it. */
FERRY_API int ferry_vmstate_load(struct ferry_chan *c,
				 const struct ferry_vmsd *vmsd, void *obj,
				 uint32_t version, struct ferry_error *err);
/* Check a description (sentinel, sizes, count fields, nesting). Returns 0
 * or -EINVAL with the offending field named. Registration calls this. */
FERRY_API int ferry_vmstate_validate(const struct ferry_vmsd *vmsd,
				     struct ferry_error *err);
/* Name of a field type for JSON and messages ("uint32", "struct", ...). */
FERRY_API const char *ferry_vms_type_name(enum ferry_vms_type t);

#ifdef __cplusplus
}
#endif
#endif
