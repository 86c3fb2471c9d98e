/*
 * tests/unit/test-vmstate.c - the vmstate interpreter: exact wire bytes,
 * round trips of every field type, version windows, subsections, hostile
 * streams, validation, hooks, the JSON schema and the compile-time type
 * check of the field macros.
 */
#include "../harness.h"

#include <jansson.h>
#include <unistd.h>

#include "ferry/channel.h"
#include "ferry/vmstate.h"
#include "vmstate-json.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

/* ---- helpers ------------------------------------------------------------ */

/* Save @obj; returns a malloc'd copy of the bytes in *out / *len. */
static void save_to_buf(const struct ferry_vmsd *vmsd, void *obj,
			uint8_t **out, size_t *len)
{
	struct ferry_error err = {0};
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	const uint8_t *data;

	ASSERT_PTR(c);
	ASSERT_OK_E(ferry_vmstate_save(c, vmsd, obj, &err), err);
	data = ferry_chan_mem_data(c, len);
	*out = malloc(*len ? *len : 1);
	ASSERT_PTR(*out);
	memcpy(*out, data, *len);
	ferry_chan_free(c);
}

/*
 * Load @len bytes from a private heap copy (so ASan sees any over-read);
 * with @exact, a successful load must consume all of them. Returns the
 * result; @err receives the message.
 */
static int load_any(const struct ferry_vmsd *vmsd, void *obj,
		    uint32_t version, const uint8_t *buf, size_t len,
		    struct ferry_error *err, bool exact)
{
	uint8_t *copy = malloc(len ? len : 1);
	struct ferry_chan *c;
	int r;

	ASSERT_PTR(copy);
	memcpy(copy, buf, len);
	c = ferry_chan_new_mem_reader(copy, len);
	ASSERT_PTR(c);
	r = ferry_vmstate_load(c, vmsd, obj, version, err);
	if (r == 0 && exact)
		ASSERT_EQ(ferry_chan_mem_remaining(c), 0);
	ferry_chan_free(c);
	free(copy);
	return r;
}

static int load_from_buf(const struct ferry_vmsd *vmsd, void *obj,
			 uint32_t version, const uint8_t *buf, size_t len,
			 struct ferry_error *err)
{
	return load_any(vmsd, obj, version, buf, len, err, true);
}

/* ---- descriptions used by several tests --------------------------------- */

struct inner {
	uint16_t x;
	uint8_t y;
};

static const struct ferry_vms_field inner_fields[] = {
	FERRY_VMS_U16(struct inner, x),
	FERRY_VMS_U8(struct inner, y),
	FERRY_VMS_END_OF_LIST
};

static const struct ferry_vmsd inner_vmsd = {
	.name = "inner", .version = 1, .minimum_version = 1,
	.fields = inner_fields,
};

struct golden {
	uint8_t u8;
	uint16_t u16;
	uint32_t u32;
	uint64_t u64;
	int8_t i8;
	int16_t i16;
	int32_t i32;
	int64_t i64;
	bool b;
	uint16_t arr[3];
	uint8_t buf[4];
	struct inner in;
};

static const struct ferry_vms_field golden_fields[] = {
	FERRY_VMS_U8(struct golden, u8),
	FERRY_VMS_U16(struct golden, u16),
	FERRY_VMS_U32(struct golden, u32),
	FERRY_VMS_U64(struct golden, u64),
	FERRY_VMS_I8(struct golden, i8),
	FERRY_VMS_I16(struct golden, i16),
	FERRY_VMS_I32(struct golden, i32),
	FERRY_VMS_I64(struct golden, i64),
	FERRY_VMS_BOOL(struct golden, b),
	FERRY_VMS_ARRAY(struct golden, arr, uint16_t),
	FERRY_VMS_BUFFER(struct golden, buf),
	FERRY_VMS_STRUCT(struct golden, in, struct inner, inner_vmsd),
	FERRY_VMS_END_OF_LIST
};

static const struct ferry_vmsd golden_vmsd = {
	.name = "golden", .version = 1, .minimum_version = 1,
	.fields = golden_fields,
};

static const struct golden golden_value = {
	.u8 = 0x12, .u16 = 0x3456, .u32 = 0x789abcde,
	.u64 = 0x0102030405060708ull,
	.i8 = -2, .i16 = -3, .i32 = -4, .i64 = -5,
	.b = true,
	.arr = { 1, 0x200, 0xffff },
	.buf = { 0xde, 0xad, 0xbe, 0xef },
	.in = { .x = 0x1234, .y = 0x56 },
};

/* Each field big-endian at its natural width, in table order. */
static const uint8_t golden_bytes[] = {
	0x12,                                           /* u8 */
	0x34, 0x56,                                     /* u16 */
	0x78, 0x9a, 0xbc, 0xde,                         /* u32 */
	0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, /* u64 */
	0xfe,                                           /* i8 = -2 */
	0xff, 0xfd,                                     /* i16 = -3 */
	0xff, 0xff, 0xff, 0xfc,                         /* i32 = -4 */
	0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfb, /* i64 = -5 */
	0x01,                                           /* bool */
	0x00, 0x01, 0x02, 0x00, 0xff, 0xff,             /* arr[3] */
	0xde, 0xad, 0xbe, 0xef,                         /* buf, raw */
	0x12, 0x34,                                     /* in.x */
	0x56,                                           /* in.y */
	0x00,                                           /* in: no subsections */
	0x00,                                           /* golden: none either */
};
#define GOLDEN_BOOL_AT 30

/* Every field type, every array flavour, and a subsection. */
struct elem {
	uint32_t id;
	bool on;
	int16_t v[2];
};

static const struct ferry_vms_field elem_fields[] = {
	FERRY_VMS_U32(struct elem, id),
	FERRY_VMS_BOOL(struct elem, on),
	FERRY_VMS_ARRAY(struct elem, v, int16_t),
	FERRY_VMS_END_OF_LIST
};

static const struct ferry_vmsd elem_vmsd = {
	.name = "elem", .version = 1, .minimum_version = 1,
	.fields = elem_fields,
};

struct all {
	uint8_t u8;
	uint16_t u16;
	uint32_t u32;
	uint64_t u64;
	int8_t i8;
	int16_t i16;
	int32_t i32;
	int64_t i64;
	bool b;
	uint32_t a32[4];
	int64_t a64[2];
	bool abool[3];
	uint8_t raw[5];
	uint8_t nv;
	uint32_t varr[6];
	uint16_t vlen;
	uint8_t vbuf[16];
	struct elem one;
	struct elem fixed[2];
	uint32_t nelem;
	struct elem many[4];
	uint64_t extra;           /* subsection "all/extra" */
	bool send_extra;          /* not migrated: decides needed() */
};

static const struct ferry_vms_field all_fields[] = {
	FERRY_VMS_U8(struct all, u8),
	FERRY_VMS_U16(struct all, u16),
	FERRY_VMS_U32(struct all, u32),
	FERRY_VMS_U64(struct all, u64),
	FERRY_VMS_I8(struct all, i8),
	FERRY_VMS_I16(struct all, i16),
	FERRY_VMS_I32(struct all, i32),
	FERRY_VMS_I64(struct all, i64),
	FERRY_VMS_BOOL(struct all, b),
	FERRY_VMS_ARRAY(struct all, a32, uint32_t),
	FERRY_VMS_ARRAY(struct all, a64, int64_t),
	FERRY_VMS_ARRAY(struct all, abool, bool),
	FERRY_VMS_BUFFER(struct all, raw),
	FERRY_VMS_U8(struct all, nv),
	FERRY_VMS_VARRAY(struct all, varr, uint32_t, nv),
	FERRY_VMS_U16(struct all, vlen),
	FERRY_VMS_VBUFFER(struct all, vbuf, vlen),
	FERRY_VMS_STRUCT(struct all, one, struct elem, elem_vmsd),
	FERRY_VMS_STRUCT_ARRAY(struct all, fixed, struct elem, elem_vmsd),
	FERRY_VMS_U32(struct all, nelem),
	FERRY_VMS_STRUCT_VARRAY(struct all, many, struct elem, nelem, elem_vmsd),
	FERRY_VMS_END_OF_LIST
};

static bool all_extra_needed(const void *obj)
{
	return ((const struct all *)obj)->send_extra;
}

static const struct ferry_vms_field all_extra_fields[] = {
	FERRY_VMS_U64(struct all, extra),
	FERRY_VMS_END_OF_LIST
};

static const struct ferry_vmsd all_extra_vmsd = {
	.name = "all/extra", .version = 1, .minimum_version = 1,
	.fields = all_extra_fields, .needed = all_extra_needed,
};

static const struct ferry_vmsd *const all_subs[] = { &all_extra_vmsd, NULL };

static const struct ferry_vmsd all_vmsd = {
	.name = "all", .version = 1, .minimum_version = 1,
	.fields = all_fields, .subsections = all_subs,
};

static void fill_elem(struct elem *e)
{
	e->id = (uint32_t)test_rand();
	e->on = test_rand() & 1;
	e->v[0] = (int16_t)test_rand();
	e->v[1] = (int16_t)test_rand();
}

static void fill_all(struct all *a)
{
	size_t i;

	memset(a, 0, sizeof(*a));
	a->u8 = (uint8_t)test_rand();
	a->u16 = (uint16_t)test_rand();
	a->u32 = (uint32_t)test_rand();
	a->u64 = test_rand();
	a->i8 = (int8_t)test_rand();
	a->i16 = (int16_t)test_rand();
	a->i32 = (int32_t)test_rand();
	a->i64 = (int64_t)test_rand();
	a->b = test_rand() & 1;
	for (i = 0; i < 4; i++)
		a->a32[i] = (uint32_t)test_rand();
	for (i = 0; i < 2; i++)
		a->a64[i] = (int64_t)test_rand();
	for (i = 0; i < 3; i++)
		a->abool[i] = test_rand() & 1;
	for (i = 0; i < 5; i++)
		a->raw[i] = (uint8_t)test_rand();
	/* Fill the whole capacity, then declare only part of it valid: the
	 * tail must not travel. */
	for (i = 0; i < 6; i++)
		a->varr[i] = (uint32_t)test_rand() | 1;
	a->nv = 1 + test_rand() % 5;
	for (i = 0; i < 16; i++)
		a->vbuf[i] = (uint8_t)test_rand() | 1;
	a->vlen = 1 + test_rand() % 15;
	fill_elem(&a->one);
	fill_elem(&a->fixed[0]);
	fill_elem(&a->fixed[1]);
	for (i = 0; i < 4; i++)
		fill_elem(&a->many[i]);
	a->nelem = 1 + test_rand() % 3;
	a->extra = test_rand();
	a->send_extra = true;
}

static void assert_elem_eq(const struct elem *a, const struct elem *b)
{
	ASSERT_EQ_U64(a->id, b->id);
	ASSERT_EQ(a->on, b->on);
	ASSERT_EQ(a->v[0], b->v[0]);
	ASSERT_EQ(a->v[1], b->v[1]);
}

static void assert_all_eq(const struct all *a, const struct all *b)
{
	size_t i;

	ASSERT_EQ(a->u8, b->u8);
	ASSERT_EQ(a->u16, b->u16);
	ASSERT_EQ_U64(a->u32, b->u32);
	ASSERT_EQ_U64(a->u64, b->u64);
	ASSERT_EQ(a->i8, b->i8);
	ASSERT_EQ(a->i16, b->i16);
	ASSERT_EQ(a->i32, b->i32);
	ASSERT_EQ(a->i64, b->i64);
	ASSERT_EQ(a->b, b->b);
	ASSERT_MEMEQ(a->a32, b->a32, sizeof(a->a32));
	ASSERT_MEMEQ(a->a64, b->a64, sizeof(a->a64));
	ASSERT_MEMEQ(a->abool, b->abool, sizeof(a->abool));
	ASSERT_MEMEQ(a->raw, b->raw, sizeof(a->raw));
	ASSERT_EQ(a->nv, b->nv);
	ASSERT_MEMEQ(a->varr, b->varr, a->nv * sizeof(a->varr[0]));
	ASSERT_EQ(a->vlen, b->vlen);
	ASSERT_MEMEQ(a->vbuf, b->vbuf, a->vlen);
	assert_elem_eq(&a->one, &b->one);
	assert_elem_eq(&a->fixed[0], &b->fixed[0]);
	assert_elem_eq(&a->fixed[1], &b->fixed[1]);
	ASSERT_EQ_U64(a->nelem, b->nelem);
	for (i = 0; i < a->nelem; i++)
		assert_elem_eq(&a->many[i], &b->many[i]);
	ASSERT_EQ_U64(a->extra, b->extra);
}

/* ---- exact bytes ---------------------------------------------------------- */

TEST(vmstate_golden_bytes)
{
	struct ferry_error err = {0};
	struct golden g = golden_value, back;
	uint8_t *buf;
	size_t len;

	ASSERT_OK_E(ferry_vmstate_validate(&golden_vmsd, &err), err);
	save_to_buf(&golden_vmsd, &g, &buf, &len);
	ASSERT_EQ(len, sizeof(golden_bytes));
	ASSERT_MEMEQ(buf, golden_bytes, len);

	memset(&back, 0, sizeof(back));
	ASSERT_OK_E(load_from_buf(&golden_vmsd, &back, 1, golden_bytes,
				  sizeof(golden_bytes), &err), err);
	ASSERT_EQ(back.u8, g.u8);
	ASSERT_EQ(back.u16, g.u16);
	ASSERT_EQ_U64(back.u32, g.u32);
	ASSERT_EQ_U64(back.u64, g.u64);
	ASSERT_EQ(back.i8, -2);
	ASSERT_EQ(back.i16, -3);
	ASSERT_EQ(back.i32, -4);
	ASSERT_EQ(back.i64, -5);
	ASSERT(back.b);
	ASSERT_MEMEQ(back.arr, g.arr, sizeof(g.arr));
	ASSERT_MEMEQ(back.buf, g.buf, sizeof(g.buf));
	ASSERT_EQ(back.in.x, 0x1234);
	ASSERT_EQ(back.in.y, 0x56);
	free(buf);
}

TEST(vmstate_type_names)
{
	ASSERT_STREQ(ferry_vms_type_name(FERRY_VMS_T_U8), "uint8");
	ASSERT_STREQ(ferry_vms_type_name(FERRY_VMS_T_I64), "int64");
	ASSERT_STREQ(ferry_vms_type_name(FERRY_VMS_T_BOOL), "bool");
	ASSERT_STREQ(ferry_vms_type_name(FERRY_VMS_T_BUFFER), "buffer");
	ASSERT_STREQ(ferry_vms_type_name(FERRY_VMS_T_STRUCT), "struct");
	ASSERT_STREQ(ferry_vms_type_name((enum ferry_vms_type)99), "unknown");
}

/* ---- round trips ---------------------------------------------------------- */

TEST(vmstate_roundtrip_all_types)
{
	struct ferry_error err = {0};
	struct all a, b;
	uint8_t *buf;
	size_t len, i;
	int iter;

	ASSERT_OK_E(ferry_vmstate_validate(&all_vmsd, &err), err);
	for (iter = 0; iter < 50; iter++) {
		fill_all(&a);
		a.send_extra = iter & 1;
		save_to_buf(&all_vmsd, &a, &buf, &len);
		/* Only the valid part of variable arrays is on the wire. */
		ASSERT_EQ(len, 1 + 2 + 4 + 8 + 1 + 2 + 4 + 8 + 1 + 16 + 16 +
			       3 + 5 + 1 + 4u * a.nv + 2 + a.vlen +
			       10 * (1 + 2 + a.nelem) + 4 +
			       (a.send_extra ? 1 + 1 + 9 + 4 + 4 + 9 : 0) + 1);
		memset(&b, 0, sizeof(b));
		ASSERT_OK_E(load_from_buf(&all_vmsd, &b, 1, buf, len, &err), err);
		if (!a.send_extra)
			a.extra = 0;
		assert_all_eq(&a, &b);
		for (i = a.nv; i < 6; i++)
			ASSERT_EQ(b.varr[i], 0);
		for (i = a.vlen; i < 16; i++)
			ASSERT_EQ(b.vbuf[i], 0);
		for (i = a.nelem; i < 4; i++)
			ASSERT_EQ(b.many[i].id, 0);
		free(buf);
	}
}

TEST(vmstate_roundtrip_empty_varrays)
{
	struct ferry_error err = {0};
	struct all a, b;
	uint8_t *buf;
	size_t len;

	fill_all(&a);
	a.nv = 0;
	a.vlen = 0;
	a.nelem = 0;
	save_to_buf(&all_vmsd, &a, &buf, &len);
	memset(&b, 0xff, sizeof(b));
	ASSERT_OK_E(load_from_buf(&all_vmsd, &b, 1, buf, len, &err), err);
	ASSERT_EQ(b.nv, 0);
	ASSERT_EQ(b.vlen, 0);
	ASSERT_EQ(b.nelem, 0);
	/* Nothing was written past the (empty) valid part. */
	ASSERT_EQ_U64(b.varr[0], 0xffffffffu);
	ASSERT_EQ(b.vbuf[0], 0xff);
	free(buf);
}

TEST(vmstate_save_count_over_capacity)
{
	struct ferry_error err = {0};
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	struct all a;

	fill_all(&a);
	a.nelem = 5; /* capacity is 4 */
	ASSERT_ERR(ferry_vmstate_save(c, &all_vmsd, &a, &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "vmstate 'all': field 'many': count 5 "
			"exceeds capacity 4");
	ferry_chan_free(c);
}

/* ---- versions ------------------------------------------------------------- */

struct ver {
	uint32_t a;
	uint32_t b; /* since version 2 */
};

static const struct ferry_vms_field ver_fields[] = {
	FERRY_VMS_U32(struct ver, a),
	FERRY_VMS_U32_V(struct ver, b, 2),
	FERRY_VMS_END_OF_LIST
};

static const struct ferry_vmsd ver_vmsd = {
	.name = "ver", .version = 2, .minimum_version = 1,
	.fields = ver_fields,
};

TEST(vmstate_version_window)
{
	static const uint8_t v1[] = { 0, 0, 0, 7, 0x00 };
	static const uint8_t v2[] = { 0, 0, 0, 7, 0, 0, 0, 9, 0x00 };
	struct ferry_error err = {0};
	struct ver v = { .a = 7, .b = 9 }, back;
	uint8_t *buf;
	size_t len;

	ASSERT_OK_E(ferry_vmstate_validate(&ver_vmsd, &err), err);
	/* Saves always use the description's version: b is there. */
	save_to_buf(&ver_vmsd, &v, &buf, &len);
	ASSERT_EQ(len, sizeof(v2));
	ASSERT_MEMEQ(buf, v2, len);
	free(buf);

	back = (struct ver){ .a = 0, .b = 0xdead };
	ASSERT_OK_E(load_from_buf(&ver_vmsd, &back, 2, v2, sizeof(v2), &err), err);
	ASSERT_EQ(back.a, 7);
	ASSERT_EQ(back.b, 9);

	/* A version-1 stream has no b: it is neither read nor touched. */
	back = (struct ver){ .a = 0, .b = 0xdead };
	ASSERT_OK_E(load_from_buf(&ver_vmsd, &back, 1, v1, sizeof(v1), &err), err);
	ASSERT_EQ(back.a, 7);
	ASSERT_EQ(back.b, 0xdead);

	/* Read as version 1, the v2 bytes stop after a: b's first byte reads
	 * as the end marker, and the rest is left for the caller (the section
	 * layer) to reject as leftovers. */
	{
		struct ferry_chan *c = ferry_chan_new_mem_reader(v2, sizeof(v2));
		ASSERT_PTR(c);
		ASSERT_OK_E(ferry_vmstate_load(c, &ver_vmsd, &back, 1, &err), err);
		ASSERT_EQ(ferry_chan_mem_remaining(c), 4);
		ferry_chan_free(c);
	}

	ferry_error_clear(&err);
	ASSERT_ERR(load_from_buf(&ver_vmsd, &back, 0, v1, sizeof(v1), &err),
		   -EINVAL);
	ASSERT_CONTAINS(err.msg, "vmstate 'ver'");
	ASSERT_CONTAINS(err.msg, "version 0 outside");
	ASSERT_CONTAINS(err.msg, "[1, 2]");

	ferry_error_clear(&err);
	ASSERT_ERR(load_from_buf(&ver_vmsd, &back, 3, v2, sizeof(v2), &err),
		   -EINVAL);
	ASSERT_CONTAINS(err.msg, "vmstate 'ver'");
	ASSERT_CONTAINS(err.msg, "version 3 outside");
}

/* ---- subsections ---------------------------------------------------------- */

struct sdev {
	uint32_t a;
	uint16_t extra;
	bool has_extra; /* not migrated */
};

static bool sdev_extra_needed(const void *obj)
{
	return ((const struct sdev *)obj)->has_extra;
}

static const struct ferry_vms_field sdev_extra_fields[] = {
	FERRY_VMS_U16(struct sdev, extra),
	FERRY_VMS_END_OF_LIST
};

static const struct ferry_vmsd sdev_extra_vmsd = {
	.name = "sdev/extra", .version = 1, .minimum_version = 1,
	.fields = sdev_extra_fields, .needed = sdev_extra_needed,
};

static const struct ferry_vmsd *const sdev_subs[] = { &sdev_extra_vmsd, NULL };

static const struct ferry_vms_field sdev_fields[] = {
	FERRY_VMS_U32(struct sdev, a),
	FERRY_VMS_END_OF_LIST
};

static const struct ferry_vmsd sdev_vmsd = {
	.name = "sdev", .version = 1, .minimum_version = 1,
	.fields = sdev_fields, .subsections = sdev_subs,
};

/* The same device as built before the subsection existed. */
static const struct ferry_vmsd sdev_old_vmsd = {
	.name = "sdev", .version = 1, .minimum_version = 1,
	.fields = sdev_fields,
};

static const uint8_t sdev_without[] = {
	0x00, 0x00, 0x00, 0x2a, /* a */
	0x00,                   /* end of subsections */
};

static const uint8_t sdev_with[] = {
	0x00, 0x00, 0x00, 0x2a,                         /* a */
	0x05,                                           /* subsection */
	10, 's', 'd', 'e', 'v', '/', 'e', 'x', 't', 'r', 'a', /* str8 name */
	0x00, 0x00, 0x00, 0x01,                         /* version 1 */
	0x00, 0x00, 0x00, 0x03,                         /* len 3 */
	0xbe, 0xef,                                     /*   extra */
	0x00,                                           /*   its end marker */
	0x00,                                           /* end of subsections */
};
#define SDEV_LEN_AT 20

TEST(vmstate_subsection_not_needed)
{
	struct ferry_error err = {0};
	struct sdev s = { .a = 42, .extra = 0xbeef, .has_extra = false }, back;
	uint8_t *buf;
	size_t len;

	ASSERT_OK_E(ferry_vmstate_validate(&sdev_vmsd, &err), err);
	save_to_buf(&sdev_vmsd, &s, &buf, &len);
	ASSERT_EQ(len, sizeof(sdev_without));
	ASSERT_MEMEQ(buf, sdev_without, len);
	free(buf);

	/* A stream without the subsection loads into the new description,
	 * and the subsection's fields keep their value. */
	back = (struct sdev){ .extra = 0x1111 };
	ASSERT_OK_E(load_from_buf(&sdev_vmsd, &back, 1, sdev_without,
				  sizeof(sdev_without), &err), err);
	ASSERT_EQ(back.a, 42);
	ASSERT_EQ(back.extra, 0x1111);

	/* And into the old one. */
	back = (struct sdev){ 0 };
	ASSERT_OK_E(load_from_buf(&sdev_old_vmsd, &back, 1, sdev_without,
				  sizeof(sdev_without), &err), err);
	ASSERT_EQ(back.a, 42);
}

TEST(vmstate_subsection_needed)
{
	struct ferry_error err = {0};
	struct sdev s = { .a = 42, .extra = 0xbeef, .has_extra = true }, back;
	uint8_t *buf;
	size_t len;

	save_to_buf(&sdev_vmsd, &s, &buf, &len);
	ASSERT_EQ(len, sizeof(sdev_with));
	ASSERT_MEMEQ(buf, sdev_with, len);
	free(buf);

	back = (struct sdev){ 0 };
	ASSERT_OK_E(load_from_buf(&sdev_vmsd, &back, 1, sdev_with,
				  sizeof(sdev_with), &err), err);
	ASSERT_EQ(back.a, 42);
	ASSERT_EQ(back.extra, 0xbeef);
}

TEST(vmstate_subsection_unknown)
{
	struct ferry_error err = {0};
	struct sdev back = { 0 };

	ASSERT_ERR(load_from_buf(&sdev_old_vmsd, &back, 1, sdev_with,
				 sizeof(sdev_with), &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "vmstate 'sdev'");
	ASSERT_CONTAINS(err.msg, "unknown subsection 'sdev/extra' in 'sdev'");
}

TEST(vmstate_subsection_version)
{
	struct ferry_error err = {0};
	struct sdev back = { 0 };
	uint8_t bad[sizeof(sdev_with)];

	memcpy(bad, sdev_with, sizeof(bad));
	bad[SDEV_LEN_AT - 1] = 2; /* subsection version 2; we know 1 only */
	ASSERT_ERR(load_from_buf(&sdev_vmsd, &back, 1, bad, sizeof(bad), &err),
		   -EINVAL);
	ASSERT_CONTAINS(err.msg, "subsection 'sdev/extra': version 2 outside "
			"[1, 1]");
}

/* The parent is not a memory reader: lengths are checked as bytes arrive. */
TEST(vmstate_subsection_over_pipe)
{
	struct ferry_error err = {0};
	struct sdev back = { 0 };
	uint8_t bad[sizeof(sdev_with)];
	int pass;

	memcpy(bad, sdev_with, sizeof(bad));
	bad[SDEV_LEN_AT + 1] = 0x01; /* len 0x10003: far beyond the data */
	for (pass = 0; pass < 2; pass++) {
		const uint8_t *src = pass ? bad : sdev_with;
		struct ferry_chan *c;
		int fds[2];

		ASSERT_OK(pipe(fds));
		ASSERT_EQ(write(fds[1], src, sizeof(sdev_with)),
			  (long)sizeof(sdev_with));
		close(fds[1]);
		c = ferry_chan_new_fd(fds[0], FERRY_CHAN_READ, true);
		ASSERT_PTR(c);
		back = (struct sdev){ 0 };
		ferry_error_clear(&err);
		if (!pass) {
			ASSERT_OK_E(ferry_vmstate_load(c, &sdev_vmsd, &back, 1,
						       &err), err);
			ASSERT_EQ(back.extra, 0xbeef);
		} else {
			ASSERT_ERR(ferry_vmstate_load(c, &sdev_vmsd, &back, 1,
						      &err), -EBADMSG);
		}
		ferry_chan_free(c);
	}
}

/* ---- hostile input -------------------------------------------------------- */

TEST(vmstate_truncation)
{
	struct ferry_error err = {0};
	struct all a, b;
	uint8_t *buf;
	size_t len, cut;

	fill_all(&a);
	a.send_extra = true;
	save_to_buf(&all_vmsd, &a, &buf, &len);
	for (cut = 0; cut < len; cut++) {
		ferry_error_clear(&err);
		memset(&b, 0, sizeof(b));
		ASSERT_ERR(load_from_buf(&all_vmsd, &b, 1, buf, cut, &err),
			   -EBADMSG);
		ASSERT_EQ(err.code, -EBADMSG);
		ASSERT_CONTAINS(err.msg, "vmstate 'all': ");
	}
	free(buf);

	/* The same inside a subsection whose length is honest but whose parent
	 * is cut short, and the golden struct. */
	for (cut = 0; cut < sizeof(sdev_with); cut++) {
		struct sdev s = { 0 };
		ferry_error_clear(&err);
		ASSERT_ERR(load_from_buf(&sdev_vmsd, &s, 1, sdev_with, cut, &err),
			   -EBADMSG);
	}
	for (cut = 0; cut < sizeof(golden_bytes); cut++) {
		struct golden g;
		ASSERT_ERR(load_from_buf(&golden_vmsd, &g, 1, golden_bytes, cut,
					 NULL), -EBADMSG);
	}
}

TEST(vmstate_truncation_names_field)
{
	struct ferry_error err = {0};
	struct golden g;

	/* Cut inside in.y: the message names the nested field. */
	ASSERT_ERR(load_from_buf(&golden_vmsd, &g, 1, golden_bytes,
				 sizeof(golden_bytes) - 3, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "vmstate 'golden': field 'in.y': ");
}

TEST(vmstate_varray_count_over_capacity)
{
	struct ferry_error err = {0};
	struct all a, b;
	uint8_t *buf;
	size_t len, at;

	fill_all(&a);
	a.nv = 1;
	save_to_buf(&all_vmsd, &a, &buf, &len);
	/* nv follows u8..b (31 bytes), a32, a64, abool and raw. */
	at = 1 + 2 + 4 + 8 + 1 + 2 + 4 + 8 + 1 + 16 + 16 + 3 + 5;
	ASSERT_EQ(buf[at], 1);
	buf[at] = 7; /* capacity 6 */
	ASSERT_ERR(load_from_buf(&all_vmsd, &b, 1, buf, len, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "vmstate 'all': field 'varr': count 7 exceeds "
			"capacity 6");
	free(buf);
}

TEST(vmstate_bool_rejects_2)
{
	struct ferry_error err = {0};
	uint8_t bad[sizeof(golden_bytes)];
	struct golden g;

	memcpy(bad, golden_bytes, sizeof(bad));
	ASSERT_EQ(bad[GOLDEN_BOOL_AT], 1);
	bad[GOLDEN_BOOL_AT] = 2;
	ASSERT_ERR(load_from_buf(&golden_vmsd, &g, 1, bad, sizeof(bad), &err),
		   -EBADMSG);
	ASSERT_CONTAINS(err.msg, "vmstate 'golden': field 'b': bool value 2");
}

TEST(vmstate_bool_in_struct_array_named)
{
	struct ferry_error err = {0};
	struct all a, b;
	uint8_t *buf;
	size_t len, at;

	fill_all(&a);
	a.nv = 1;
	a.vlen = 1;
	a.send_extra = false;
	save_to_buf(&all_vmsd, &a, &buf, &len);
	/* fixed[1].on: after the scalars and fixed arrays (71 bytes), nv +
	 * varr (5), vlen + vbuf (3), one and fixed[0] (10 each: 9 bytes of
	 * fields and an end marker), fixed[1].id (4). */
	at = 71 + 5 + 3 + 10 + 10 + 4;
	ASSERT_EQ(buf[at], a.fixed[1].on);
	buf[at] = 0x80;
	ASSERT_ERR(load_from_buf(&all_vmsd, &b, 1, buf, len, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "vmstate 'all': field 'fixed[1].on': bool "
			"value 128");
	free(buf);
}

TEST(vmstate_bad_subsection_marker)
{
	struct ferry_error err = {0};
	uint8_t bad[sizeof(sdev_without)];
	struct sdev s = { 0 };

	memcpy(bad, sdev_without, sizeof(bad));
	bad[4] = 0x07;
	ASSERT_ERR(load_from_buf(&sdev_vmsd, &s, 1, bad, sizeof(bad), &err),
		   -EBADMSG);
	ASSERT_CONTAINS(err.msg, "bad subsection marker 0x07");

	/* A bad marker inside a subsection body, after its fields. */
	{
		uint8_t bad2[sizeof(sdev_with)];
		memcpy(bad2, sdev_with, sizeof(bad2));
		bad2[sizeof(bad2) - 2] = 0xff;
		ferry_error_clear(&err);
		ASSERT_ERR(load_from_buf(&sdev_vmsd, &s, 1, bad2, sizeof(bad2),
					 &err), -EBADMSG);
		ASSERT_CONTAINS(err.msg, "subsection 'sdev/extra': bad "
				"subsection marker 0xff");
	}
}

TEST(vmstate_subsection_bad_length)
{
	struct ferry_error err = {0};
	uint8_t bad[sizeof(sdev_with) + 4];
	struct sdev s = { 0 };
	static const uint32_t lens[] = { 5, 0x100, 0x01000000, 0xffffffff };
	size_t i;

	/* Longer than what is left in the parent. */
	for (i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
		memcpy(bad, sdev_with, sizeof(sdev_with));
		bad[SDEV_LEN_AT] = (uint8_t)(lens[i] >> 24);
		bad[SDEV_LEN_AT + 1] = (uint8_t)(lens[i] >> 16);
		bad[SDEV_LEN_AT + 2] = (uint8_t)(lens[i] >> 8);
		bad[SDEV_LEN_AT + 3] = (uint8_t)lens[i];
		ferry_error_clear(&err);
		ASSERT_ERR(load_from_buf(&sdev_vmsd, &s, 1, bad,
					 sizeof(sdev_with), &err), -EBADMSG);
		ASSERT_CONTAINS(err.msg, "subsection 'sdev/extra': length");
	}

	/* Shorter than the body: the body's own end marker is missing. */
	memcpy(bad, sdev_with, sizeof(sdev_with));
	bad[SDEV_LEN_AT + 3] = 2;
	ferry_error_clear(&err);
	ASSERT_ERR(load_from_buf(&sdev_vmsd, &s, 1, bad, sizeof(sdev_with), &err),
		   -EBADMSG);
	ASSERT_CONTAINS(err.msg, "subsection 'sdev/extra': ");

	/* Longer than the body, with the bytes there: trailing garbage. */
	memcpy(bad, sdev_with, SDEV_LEN_AT + 4 + 3);
	bad[SDEV_LEN_AT + 3] = 5;
	bad[SDEV_LEN_AT + 4 + 3] = 0xaa;
	bad[SDEV_LEN_AT + 4 + 4] = 0xbb;
	bad[SDEV_LEN_AT + 4 + 5] = 0x00;
	ferry_error_clear(&err);
	ASSERT_ERR(load_from_buf(&sdev_vmsd, &s, 1, bad, SDEV_LEN_AT + 4 + 6,
				 &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "subsection 'sdev/extra': 2 trailing bytes");
}

TEST(vmstate_random_garbage)
{
	uint8_t buf[256], *good;
	struct all a, b;
	size_t i, len, good_len;
	int iter, r;

	/* Whatever the bytes, the load fails or succeeds cleanly (ASan and
	 * UBSan builds check the "cleanly"). */
	for (iter = 0; iter < 2000; iter++) {
		len = test_rand() % sizeof(buf);
		for (i = 0; i < len; i++)
			buf[i] = (uint8_t)test_rand();
		memset(&b, 0, sizeof(b));
		r = load_any(&all_vmsd, &b, 1, buf, len, NULL, false);
		ASSERT(r == 0 || r == -EBADMSG || r == -EINVAL);
	}
	/* Mutations of a valid stream get much further in. */
	fill_all(&a);
	save_to_buf(&all_vmsd, &a, &good, &good_len);
	for (iter = 0; iter < 5000; iter++) {
		uint8_t *m = malloc(good_len);
		int flips = 1 + (int)(test_rand() % 4);

		ASSERT_PTR(m);
		memcpy(m, good, good_len);
		while (flips--)
			m[test_rand() % good_len] = (uint8_t)test_rand();
		len = good_len - (test_rand() % 4 == 0 ? test_rand() % good_len : 0);
		memset(&b, 0, sizeof(b));
		r = load_any(&all_vmsd, &b, 1, m, len, NULL, false);
		ASSERT(r == 0 || r == -EBADMSG || r == -EINVAL);
		free(m);
	}
	free(good);
}

/* ---- validation ----------------------------------------------------------- */

struct vbad {
	uint32_t arr[4];
	uint8_t n;
};

TEST(vmstate_validate_count_after_array)
{
	static const struct ferry_vms_field fields[] = {
		FERRY_VMS_VARRAY(struct vbad, arr, uint32_t, n),
		FERRY_VMS_U8(struct vbad, n),
		FERRY_VMS_END_OF_LIST
	};
	static const struct ferry_vmsd vmsd = {
		.name = "vbad", .version = 1, .minimum_version = 1,
		.fields = fields,
	};
	static const struct ferry_vms_field good_fields[] = {
		FERRY_VMS_U8(struct vbad, n),
		FERRY_VMS_VARRAY(struct vbad, arr, uint32_t, n),
		FERRY_VMS_END_OF_LIST
	};
	static const struct ferry_vmsd good = {
		.name = "vbad", .version = 1, .minimum_version = 1,
		.fields = good_fields,
	};
	struct ferry_error err = {0};

	ASSERT_ERR(ferry_vmstate_validate(&vmsd, &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "vmstate 'vbad': field 'arr': ");
	ASSERT_CONTAINS(err.msg, "not an earlier field");
	ferry_error_clear(&err);
	ASSERT_OK_E(ferry_vmstate_validate(&good, &err), err);
}

TEST(vmstate_validate_rejects)
{
	struct ferry_vms_field f[3] = {
		FERRY_VMS_U8(struct vbad, n),
		FERRY_VMS_VARRAY(struct vbad, arr, uint32_t, n),
		FERRY_VMS_END_OF_LIST
	};
	struct ferry_vmsd vmsd = {
		.name = "vbad", .version = 1, .minimum_version = 1, .fields = f,
	};
	struct ferry_error err = {0};

	ASSERT_OK_E(ferry_vmstate_validate(&vmsd, &err), err);

	/* Count field declared wider than the variable array thinks. */
	f[0].type = FERRY_VMS_T_U16;
	ASSERT_ERR(ferry_vmstate_validate(&vmsd, &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "field 'n': uint16 of size 1");
	f[0] = (struct ferry_vms_field)FERRY_VMS_U8(struct vbad, n);

	ferry_error_clear(&err);
	f[1].count_size = 2;
	ASSERT_ERR(ferry_vmstate_validate(&vmsd, &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "field 'arr': count field 'n'");
	f[1].count_size = 1;

	ferry_error_clear(&err);
	f[1].version_id = 3; /* above the description's version */
	ASSERT_ERR(ferry_vmstate_validate(&vmsd, &err), -EINVAL);
	f[1].version_id = 0;

	ferry_error_clear(&err);
	vmsd.minimum_version = 2;
	ASSERT_ERR(ferry_vmstate_validate(&vmsd, &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "minimum_version 2 above version 1");
	vmsd.minimum_version = 1;

	ferry_error_clear(&err);
	f[1].type = (enum ferry_vms_type)77;
	ASSERT_ERR(ferry_vmstate_validate(&vmsd, &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "unknown type 77");

	ASSERT_ERR(ferry_vmstate_validate(NULL, NULL), -EINVAL);
}

/* A description that contains itself: the depth limit stops every walker. */
static const struct ferry_vmsd loop_vmsd;
static const struct ferry_vms_field loop_fields[] = {
	{ .name = "self", .type = FERRY_VMS_T_STRUCT, .offset = 0, .size = 1,
	  .n = 1, .vmsd = &loop_vmsd },
	FERRY_VMS_END_OF_LIST
};
static const struct ferry_vmsd loop_vmsd = {
	.name = "loop", .version = 1, .minimum_version = 1,
	.fields = loop_fields,
};

TEST(vmstate_depth_limit)
{
	static const uint8_t zeros[64];
	struct ferry_error err = {0};
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	uint8_t obj[8] = { 0 };

	ASSERT_ERR(ferry_vmstate_validate(&loop_vmsd, &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "nested deeper than 16");
	ferry_error_clear(&err);
	ASSERT_ERR(ferry_vmstate_save(c, &loop_vmsd, obj, &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "nested deeper than 16");
	ferry_chan_free(c);
	ferry_error_clear(&err);
	ASSERT_ERR(load_from_buf(&loop_vmsd, obj, 1, zeros, sizeof(zeros), &err),
		   -EINVAL);
	ASSERT_NULL(ferry__vmsd_to_json(&loop_vmsd));
}

/* ---- hooks ---------------------------------------------------------------- */

struct hk {
	uint32_t a;
	struct inner in;
	uint16_t extra;
};

static char hook_log[512];
static int hook_fail; /* 1 pre_load, 2 post_load, 3 pre_save, 4 post_save */

static void hlog(const char *what)
{
	size_t n = strlen(hook_log);
	snprintf(hook_log + n, sizeof(hook_log) - n, "%s%s", n ? " " : "", what);
}

static int hk_pre_save(void *obj, struct ferry_error *err)
{
	(void)obj;
	hlog("pre_save");
	if (hook_fail == 3)
		return ferry_error_set(err, -EBUSY, "device is busy");
	return 0;
}

static int hk_post_save(void *obj, struct ferry_error *err)
{
	(void)obj;
	hlog("post_save");
	if (hook_fail == 4)
		return ferry_error_set(err, -EIO, "cannot resume");
	return 0;
}

static int hk_pre_load(void *obj, struct ferry_error *err)
{
	(void)obj;
	hlog("pre_load");
	if (hook_fail == 1)
		return ferry_error_set(err, -EPERM, "pre_load says no");
	return 0;
}

static int hk_post_load(void *obj, uint32_t version, struct ferry_error *err)
{
	char b[64];
	const struct hk *h = obj;

	snprintf(b, sizeof(b), "post_load(v%u,a=%u,x=%u,extra=%u)",
		 (unsigned)version, (unsigned)h->a, (unsigned)h->in.x,
		 (unsigned)h->extra);
	hlog(b);
	if (hook_fail == 2)
		return ferry_error_set(err, -ERANGE, "a out of range");
	return 0;
}

static int in_pre_save(void *obj, struct ferry_error *err)
{
	(void)obj; (void)err;
	hlog("in.pre_save");
	return 0;
}

static int in_post_save(void *obj, struct ferry_error *err)
{
	(void)obj; (void)err;
	hlog("in.post_save");
	return 0;
}

static int in_pre_load(void *obj, struct ferry_error *err)
{
	(void)obj; (void)err;
	hlog("in.pre_load");
	return 0;
}

static int in_post_load(void *obj, uint32_t version, struct ferry_error *err)
{
	(void)obj; (void)version; (void)err;
	hlog("in.post_load");
	return 0;
}

static int sub_pre_save(void *obj, struct ferry_error *err)
{
	(void)obj; (void)err;
	hlog("sub.pre_save");
	return 0;
}

static int sub_post_save(void *obj, struct ferry_error *err)
{
	(void)obj; (void)err;
	hlog("sub.post_save");
	return 0;
}

static int sub_pre_load(void *obj, struct ferry_error *err)
{
	(void)obj; (void)err;
	hlog("sub.pre_load");
	return 0;
}

static int sub_post_load(void *obj, uint32_t version, struct ferry_error *err)
{
	(void)obj; (void)err;
	hlog(version == 3 ? "sub.post_load(v3)" : "sub.post_load(?)");
	return 0;
}

static const struct ferry_vms_field hk_in_fields[] = {
	FERRY_VMS_U16(struct inner, x),
	FERRY_VMS_END_OF_LIST
};

static const struct ferry_vmsd hk_in_vmsd = {
	.name = "hk-in", .version = 1, .minimum_version = 1,
	.fields = hk_in_fields,
	.pre_save = in_pre_save, .post_save = in_post_save,
	.pre_load = in_pre_load, .post_load = in_post_load,
};

static const struct ferry_vms_field hk_sub_fields[] = {
	FERRY_VMS_U16(struct hk, extra),
	FERRY_VMS_END_OF_LIST
};

static const struct ferry_vmsd hk_sub_vmsd = {
	.name = "hk/sub", .version = 3, .minimum_version = 1,
	.fields = hk_sub_fields,
	.pre_save = sub_pre_save, .post_save = sub_post_save,
	.pre_load = sub_pre_load, .post_load = sub_post_load,
};

static const struct ferry_vmsd *const hk_subs[] = { &hk_sub_vmsd, NULL };

static const struct ferry_vms_field hk_fields[] = {
	FERRY_VMS_U32(struct hk, a),
	FERRY_VMS_STRUCT(struct hk, in, struct inner, hk_in_vmsd),
	FERRY_VMS_END_OF_LIST
};

static const struct ferry_vmsd hk_vmsd = {
	.name = "hk", .version = 2, .minimum_version = 1,
	.fields = hk_fields, .subsections = hk_subs,
	.pre_save = hk_pre_save, .post_save = hk_post_save,
	.pre_load = hk_pre_load, .post_load = hk_post_load,
};

TEST(vmstate_hooks_order)
{
	struct ferry_error err = {0};
	struct hk h = { .a = 5, .in = { .x = 6 }, .extra = 7 }, back = { 0 };
	uint8_t *buf;
	size_t len;

	ASSERT_OK_E(ferry_vmstate_validate(&hk_vmsd, &err), err);
	hook_log[0] = 0;
	save_to_buf(&hk_vmsd, &h, &buf, &len);
	ASSERT_STREQ(hook_log, "pre_save in.pre_save in.post_save sub.pre_save "
		     "sub.post_save post_save");

	hook_log[0] = 0;
	ASSERT_OK_E(load_from_buf(&hk_vmsd, &back, 2, buf, len, &err), err);
	/* post_load sees every field, subsections included. */
	ASSERT_STREQ(hook_log, "pre_load in.pre_load in.post_load sub.pre_load "
		     "sub.post_load(v3) post_load(v2,a=5,x=6,extra=7)");
	free(buf);
}

TEST(vmstate_hooks_fail_load)
{
	struct ferry_error err = {0};
	struct hk h = { .a = 5, .in = { .x = 6 }, .extra = 7 }, back = { 0 };
	uint8_t *buf;
	size_t len;

	save_to_buf(&hk_vmsd, &h, &buf, &len);

	hook_fail = 1;
	hook_log[0] = 0;
	ASSERT_ERR(load_from_buf(&hk_vmsd, &back, 2, buf, len, &err), -EPERM);
	ASSERT_CONTAINS(err.msg, "vmstate 'hk': ");
	ASSERT_CONTAINS(err.msg, "pre_load says no");
	ASSERT_STREQ(hook_log, "pre_load"); /* nothing read after it */
	ASSERT_EQ(back.a, 0);

	hook_fail = 2;
	ferry_error_clear(&err);
	ASSERT_ERR(load_from_buf(&hk_vmsd, &back, 2, buf, len, &err), -ERANGE);
	ASSERT_CONTAINS(err.msg, "vmstate 'hk': ");
	ASSERT_CONTAINS(err.msg, "a out of range");
	hook_fail = 0;
	free(buf);
}

TEST(vmstate_hooks_fail_save)
{
	struct ferry_error err = {0};
	struct hk h = { .a = 5 };
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	size_t len = 1;

	hook_fail = 3;
	hook_log[0] = 0;
	ASSERT_ERR(ferry_vmstate_save(c, &hk_vmsd, &h, &err), -EBUSY);
	ASSERT_CONTAINS(err.msg, "vmstate 'hk': pre_save of 'hk': device is busy");
	ASSERT_STREQ(hook_log, "pre_save");
	ferry_chan_mem_data(c, &len);
	ASSERT_EQ(len, 0);

	hook_fail = 4;
	hook_log[0] = 0;
	ferry_error_clear(&err);
	ASSERT_ERR(ferry_vmstate_save(c, &hk_vmsd, &h, &err), -EIO);
	ASSERT_CONTAINS(err.msg, "cannot resume");
	hook_fail = 0;
	ferry_chan_free(c);
}

/* post_save runs after a failed save too, to undo pre_save. */
struct ps {
	uint8_t n;
	uint8_t v[2];
};

static int ps_calls;

static int ps_pre_save(void *obj, struct ferry_error *err)
{
	(void)obj; (void)err;
	ps_calls += 1;
	return 0;
}

static int ps_post_save(void *obj, struct ferry_error *err)
{
	(void)obj; (void)err;
	ps_calls += 10;
	return 0;
}

TEST(vmstate_post_save_after_failure)
{
	static const struct ferry_vms_field fields[] = {
		FERRY_VMS_U8(struct ps, n),
		FERRY_VMS_VBUFFER(struct ps, v, n),
		FERRY_VMS_END_OF_LIST
	};
	static const struct ferry_vmsd vmsd = {
		.name = "ps", .version = 1, .minimum_version = 1,
		.fields = fields,
		.pre_save = ps_pre_save, .post_save = ps_post_save,
	};
	struct ferry_error err = {0};
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	struct ps p = { .n = 3 };

	ASSERT_ERR(ferry_vmstate_save(c, &vmsd, &p, &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "field 'v': count 3 exceeds capacity 2");
	ASSERT_EQ(ps_calls, 11);
	ferry_chan_free(c);
}

/* The caller's earlier error is never rewritten: first error wins. */
TEST(vmstate_error_first_wins)
{
	struct ferry_error err = {0};
	struct golden g;

	ferry_error_set(&err, -EIO, "earlier");
	ASSERT_ERR(load_from_buf(&golden_vmsd, &g, 1, golden_bytes, 3, &err),
		   -EBADMSG);
	ASSERT_STREQ(err.msg, "earlier");
}

/* ---- JSON schema ---------------------------------------------------------- */

TEST(vmstate_schema_json)
{
	json_t *j = ferry__vmsd_to_json(&sdev_vmsd), *k;
	char *s;

	ASSERT_PTR(j);
	s = json_dumps(j, JSON_COMPACT);
	ASSERT_PTR(s);
	ASSERT_STREQ(s,
		"{\"name\":\"sdev\",\"version\":1,\"minimum_version\":1,"
		"\"fields\":[{\"name\":\"a\",\"type\":\"uint32\",\"size\":4,"
		"\"count\":1,\"version_id\":0}],"
		"\"subsections\":[{\"name\":\"sdev/extra\",\"version\":1,"
		"\"minimum_version\":1,\"fields\":[{\"name\":\"extra\","
		"\"type\":\"uint16\",\"size\":2,\"count\":1,\"version_id\":0}],"
		"\"subsections\":[]}]}");
	free(s);
	json_decref(j);

	j = ferry__vmsd_to_json(&all_vmsd);
	ASSERT_PTR(j);
	k = json_array_get(json_object_get(j, "fields"), 14); /* varr */
	ASSERT_STREQ(json_string_value(json_object_get(k, "name")), "varr");
	ASSERT(json_is_true(json_object_get(k, "varray")));
	ASSERT_EQ(json_integer_value(json_object_get(k, "count")), 6);
	k = json_array_get(json_object_get(j, "fields"), 20); /* many */
	ASSERT_STREQ(json_string_value(json_object_get(k, "type")), "struct");
	ASSERT_STREQ(json_string_value(json_object_get(
		json_object_get(k, "struct"), "name")), "elem");
	ASSERT_NULL(json_object_get(json_array_get(json_object_get(j, "fields"),
						   0), "varray"));
	json_decref(j);
}

/* ---- compile-time type check ---------------------------------------------- */

TEST(vmstate_typecheck_rejects)
{
	char *out = NULL;
	int st;

	st = test_run(&out, "cc -std=gnu11 -Iinclude -fsyntax-only "
		      "tests/unit/vmstate-typecheck-bad.c");
	if (st == 127)
		SKIP("no cc on PATH");
	if (st == 0)
		FAIL("a uint16_t field declared as FERRY_VMS_U32 compiled");
	ASSERT_NE(st, -1);
	free(out);
	out = NULL;
	st = test_run(&out, "cc -std=gnu11 -Iinclude -fsyntax-only -DGOOD "
		      "tests/unit/vmstate-typecheck-bad.c");
	if (st != 0)
		FAIL("the good variant does not compile: %s", out ? out : "");
	free(out);
}
