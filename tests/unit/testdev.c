/*
 * tests/unit/testdev.c - the test devices (see testdev.h).
 */
#include "testdev.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../harness.h"

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	return x;
}

void tram_dirty(struct tram *t, uint32_t page, uint64_t seed)
{
	uint64_t *p = (uint64_t *)(t->mem + (size_t)page * TRAM_PAGE);

	for (unsigned i = 0; i < TRAM_PAGE / 8; i++)
		p[i] = mix(seed + page * 1000003ull + i);
	t->dirty[page] = 1;
}

void tram_init(struct tram *t, uint32_t npages, uint64_t seed)
{
	memset(t, 0, sizeof(*t));
	t->npages = npages;
	t->mem = calloc(npages, TRAM_PAGE);
	ASSERT_PTR(t->mem);
	if (seed)
		for (uint32_t i = 0; i < npages; i++)
			tram_dirty(t, i, seed);
}

void tram_free(struct tram *t)
{
	free(t->mem);
	t->mem = NULL;
}

/* Wire: START = be32 npages, be32 page size; PART/END = records of
 * (be32 page, page bytes), terminated by be32 0xffffffff. */
static int tram_save_setup(struct ferry_chan *c, void *opaque,
			   struct ferry_error *err)
{
	struct tram *t = opaque;
	(void)err;
	t->setups++;
	ferry_put_be32(c, t->npages);
	ferry_put_be32(c, TRAM_PAGE);
	return 0;
}

static void tram_pending(void *opaque, bool exact, uint64_t *must, uint64_t *can)
{
	struct tram *t = opaque;
	(void)exact;
	for (uint32_t i = 0; i < t->npages; i++)
		*must += t->dirty[i] ? TRAM_PAGE : 0;
	*can = 0;
}

static void tram_send(struct tram *t, struct ferry_chan *c, uint64_t budget)
{
	uint64_t sent = 0;

	for (uint32_t i = 0; i < t->npages; i++) {
		if (!t->dirty[i])
			continue;
		if (budget && sent >= budget)
			break;
		ferry_put_be32(c, i);
		ferry_put_buf(c, t->mem + (size_t)i * TRAM_PAGE, TRAM_PAGE);
		t->dirty[i] = 0;
		sent += TRAM_PAGE;
	}
	ferry_put_be32(c, 0xffffffffu);
}

static int tram_iterate(struct ferry_chan *c, void *opaque, uint64_t budget,
			struct ferry_error *err)
{
	struct tram *t = opaque;
	t->iterates++;
	if (t->fail_iterate)
		return ferry_error_set(err, t->fail_iterate, "injected iterate failure");
	tram_send(t, c, budget);
	if (t->redirty) {
		t->redirty--;
		t->dirty[0] = 1;
	}
	return 0;
}

static int tram_complete(struct ferry_chan *c, void *opaque,
			 struct ferry_error *err)
{
	struct tram *t = opaque;
	(void)err;
	t->completes++;
	tram_send(t, c, 0);
	return 0;
}

static void tram_cleanup(void *opaque)
{
	((struct tram *)opaque)->cleanups++;
}

static int tram_load_setup(void *opaque, struct ferry_error *err)
{
	(void)err;
	((struct tram *)opaque)->load_setups++;
	return 0;
}

static void tram_load_cleanup(void *opaque)
{
	((struct tram *)opaque)->load_cleanups++;
}

static int tram_load(struct ferry_chan *c, void *opaque, uint32_t version,
		     struct ferry_error *err)
{
	struct tram *t = opaque;
	(void)version;

	t->loads++;
	if (t->fail_load)
		return ferry_error_set(err, t->fail_load, "injected load failure");
	if (t->loads == 1) {
		uint32_t n = ferry_get_be32(c), ps = ferry_get_be32(c);
		if (ferry_chan_error(c, err))
			return ferry_chan_error(c, err);
		if (n != t->npages || ps != TRAM_PAGE)
			return ferry_error_set(err, -EINVAL,
				"geometry mismatch: %u pages of %u, have %u of %u",
				n, ps, t->npages, TRAM_PAGE);
		return 0;
	}
	for (;;) {
		uint32_t pg = ferry_get_be32(c);
		if (ferry_chan_error(c, err))
			return ferry_chan_error(c, err);
		if (pg == 0xffffffffu)
			return 0;
		if (pg >= t->npages)
			return ferry_error_set(err, -ERANGE, "page %u beyond %u", pg,
					       t->npages);
		ferry_get_buf(c, t->mem + (size_t)pg * TRAM_PAGE, TRAM_PAGE);
	}
}

const struct ferry_dev_ops tram_ops = {
	.size = sizeof(struct ferry_dev_ops),
	.save_setup = tram_save_setup,
	.save_pending = tram_pending,
	.save_iterate = tram_iterate,
	.save_complete = tram_complete,
	.save_cleanup = tram_cleanup,
	.load_setup = tram_load_setup,
	.load_state = tram_load,
	.load_cleanup = tram_load_cleanup,
};

static const struct ferry_vms_field tregs_inner_fields[] = {
	FERRY_VMS_U16(struct tregs_inner, sel),
	FERRY_VMS_U64(struct tregs_inner, base),
	FERRY_VMS_END_OF_LIST,
};
static const struct ferry_vmsd tregs_inner_vmsd = {
	.name = "tregs-seg", .version = 1, .minimum_version = 1,
	.fields = tregs_inner_fields,
};
static const struct ferry_vms_field tregs_fields[] = {
	FERRY_VMS_U32(struct tregs, ctrl),
	FERRY_VMS_I64(struct tregs, delta),
	FERRY_VMS_BOOL(struct tregs, enabled),
	FERRY_VMS_BUFFER(struct tregs, mac),
	FERRY_VMS_ARRAY(struct tregs, irq, uint32_t),
	FERRY_VMS_STRUCT_ARRAY(struct tregs, seg, struct tregs_inner, tregs_inner_vmsd),
	FERRY_VMS_U8(struct tregs, nq),
	FERRY_VMS_VARRAY(struct tregs, queue, uint16_t, nq),
	FERRY_VMS_END_OF_LIST,
};
const struct ferry_vmsd tregs_vmsd = {
	.name = "tregs", .version = 1, .minimum_version = 1,
	.fields = tregs_fields,
};

void tregs_fill(struct tregs *r, uint64_t seed)
{
	memset(r, 0, sizeof(*r));
	r->ctrl = (uint32_t)mix(seed);
	r->delta = -(int64_t)(mix(seed + 1) >> 2);
	r->enabled = true;
	for (int i = 0; i < 6; i++)
		r->mac[i] = (uint8_t)mix(seed + 10 + i);
	for (int i = 0; i < 4; i++)
		r->irq[i] = (uint32_t)mix(seed + 20 + i);
	for (int i = 0; i < 2; i++) {
		r->seg[i].sel = (uint16_t)mix(seed + 30 + i);
		r->seg[i].base = mix(seed + 40 + i);
	}
	r->nq = 5;
	for (int i = 0; i < 5; i++)
		r->queue[i] = (uint16_t)mix(seed + 50 + i);
}

static uint64_t blob_word(uint32_t buf, uint32_t i)
{
	return mix(((uint64_t)buf << 32) | i);
}

uint64_t tblob_expected_sum(uint32_t nbufs, uint32_t bufsize)
{
	uint64_t sum = 0;
	for (uint32_t b = 0; b < nbufs; b++)
		for (uint32_t i = 0; i < bufsize / 8; i++)
			sum = sum * 31 + blob_word(b, i);
	return sum;
}

static int tblob_complete_thread(struct ferry_devstate_sink *sink, void *opaque,
				 struct ferry_error *err)
{
	struct tblob *b = opaque;
	uint64_t *buf = malloc(b->bufsize);
	int r = 0;

	if (!buf)
		return ferry_error_set(err, -ENOMEM, "oom");
	for (uint32_t n = 0; n < b->nbufs && !r; n++) {
		for (uint32_t i = 0; i < b->bufsize / 8; i++)
			buf[i] = blob_word(n, i);
		r = ferry_devstate_send(sink, buf, b->bufsize, err);
	}
	free(buf);
	return r;
}

/* The FULL section carries the geometry, so the load can check totals. */
static int tblob_save_state(struct ferry_chan *c, void *opaque,
			    struct ferry_error *err)
{
	struct tblob *b = opaque;
	(void)err;
	ferry_put_be32(c, b->nbufs);
	ferry_put_be32(c, b->bufsize);
	return 0;
}

static int tblob_load_state(struct ferry_chan *c, void *opaque, uint32_t v,
			    struct ferry_error *err)
{
	struct tblob *b = opaque;
	(void)v;
	b->nbufs = ferry_get_be32(c);
	b->bufsize = ferry_get_be32(c);
	/* The configuration comes after all of the device's data. */
	if (b->received != b->nbufs)
		b->config_before_data = true;
	return ferry_chan_error(c, err);
}

static int tblob_load_buffer(void *opaque, const void *buf, size_t len,
			     struct ferry_error *err)
{
	struct tblob *b = opaque;
	const uint64_t *w = buf;

	if (len % 8)
		return ferry_error_set(err, -EBADMSG, "odd buffer size %zu", len);
	if (b->load_delay_us)
		usleep(b->load_delay_us);
	if (len >= 8 && w[0] != blob_word(b->received, 0))
		b->order_ok = false;
	for (size_t i = 0; i < len / 8; i++)
		b->sum = b->sum * 31 + w[i];
	b->received++;
	return 0;
}

static int tblob_switchover(void *opaque, struct ferry_error *err)
{
	(void)err;
	((struct tblob *)opaque)->switchover_seen = true;
	return 0;
}

const struct ferry_dev_ops tblob_ops = {
	.size = sizeof(struct ferry_dev_ops),
	.save_state = tblob_save_state,
	.save_complete_thread = tblob_complete_thread,
	.load_state = tblob_load_state,
	.load_buffer = tblob_load_buffer,
	.switchover_start = tblob_switchover,
};

static void testvm_setup(struct testvm *vm, bool source, uint64_t seed,
			 uint32_t pages, uint32_t nbufs, uint32_t bufsize)
{
	struct ferry_error err = { 0 };

	memset(vm, 0, sizeof(*vm));
	vm->ctx = ferry_ctx_new(&err);
	ASSERT_PTR(vm->ctx);
	tram_init(&vm->ram, pages, source ? seed : 0);
	if (source) {
		tregs_fill(&vm->regs, seed);
		vm->blob.nbufs = nbufs;
		vm->blob.bufsize = bufsize;
	}
	vm->blob.order_ok = true;
	ASSERT_OK_E(ferry_register(vm->ctx, "tram", 0, 1, 1, &tram_ops, &vm->ram,
				   &err), err);
	ASSERT_OK_E(ferry_register_vmstate(vm->ctx, &tregs_vmsd, 0, &vm->regs,
					   &err), err);
	ASSERT_OK_E(ferry_register(vm->ctx, "tblob", 0, 1, 1, &tblob_ops,
				   &vm->blob, &err), err);
}

void testvm_init(struct testvm *vm, bool source, uint64_t seed)
{
	testvm_setup(vm, source, seed, 64, 5, 3000 * 8);
}

void testvm_init_small(struct testvm *vm, bool source, uint64_t seed)
{
	testvm_setup(vm, source, seed, 3, 3, 64);
}

void testvm_free(struct testvm *vm)
{
	ferry_ctx_free(vm->ctx);
	tram_free(&vm->ram);
}

uint8_t *testvm_save(struct testvm *vm, size_t *len)
{
	struct ferry_error err = { 0 };
	struct ferry_chan *c = ferry_chan_new_mem_writer(0);
	const uint8_t *data;
	uint8_t *copy;

	ASSERT_PTR(c);
	ASSERT_OK_E(ferry_save_all(vm->ctx, c, 0, &err), err);
	data = ferry_chan_mem_data(c, len);
	copy = malloc(*len);
	ASSERT_PTR(copy);
	memcpy(copy, data, *len);
	ferry_chan_free(c);
	return copy;
}
