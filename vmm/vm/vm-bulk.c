/*
 * vmm/vm/vm-bulk.c - `--device bulk,...`: devices with large state
 * (devices/bulk.h, a VFIO-style model) wired to libferry the way QEMU's
 * VFIO migration is wired to its migration core.
 *
 * Stream items. Every section payload of a bulk device, and its config
 * buffer, is a sequence of items, each a be64 marker and its body:
 *   DEV_DATA        be32 length, one record of the device's staged buffer
 *   INIT_DATA_SENT  (empty) the precopy sweep sent every initial byte
 *   CONFIG_STATE    be32 length, the device's config blob
 *   END_OF_STATE    (empty) ends the payload
 * (The marker values are VFIO's in QEMU: facts of the format, not code.)
 *
 * Phases:
 *   precopy   PART sections of DEV_DATA items (PRE_COPY: initial sweep,
 *             then what the device dirtied), on the main stream;
 *   switchover the VM's stop moves the device PRE_COPY -> STOP_COPY (or
 *             RUNNING -> STOP -> STOP_COPY without precopy), then its
 *             save_complete_thread, on a libferry pool thread, sends the
 *             rest, one staged record per buffer (main stream or multifd:
 *             the engine's device-state-channel), and the config items
 *             last, with ferry_devstate_send_config;
 *   destination RESUMING from load setup; records are written as they come
 *             (sections on the load thread, buffers on the device's load
 *             thread); the config loads last, on the load thread, and the
 *             device goes to STOP, then RUNNING when the VM starts.
 *
 * Locks: each device's vmb->lock serialises the register sequences of its
 * staged buffer (data_offset, data_size and the region access between
 * them) between the threads that drive them: the load thread and the
 * device's load thread on the destination, the migration thread and the
 * save thread on the source. bulk.c's own lock guards each access.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "devices/bulk.h"
#include "vm/vm-internal.h"

#define MARK_END_OF_STATE   0xffffffffef100001ull
#define MARK_CONFIG_STATE   0xffffffffef100002ull
#define MARK_DEV_DATA       0xffffffffef100004ull
#define MARK_INIT_DATA_SENT 0xffffffffef100005ull

#define BULK_IDSTR "bulk"

struct vm_bulk {
	struct vm *vm;
	unsigned index;               /* instance */
	struct bulk_dev *dev;
	pthread_mutex_t lock;         /* register sequences, see the top */
	uint8_t *rec;                 /* lock: one record */
	bool init_sent;               /* migration thread: INIT_DATA_SENT went */
	bool dirtier;                 /* vm->lock: bulk_start done */
};

static void be64(uint8_t *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
}

static void be32(uint8_t *p, uint32_t v)
{
	for (int i = 3; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
}

/* ---- spec ---------------------------------------------------------------- */

int vm_parse_device(const char *spec, struct vm_config *cfg,
		    struct ferry_error *err)
{
	char buf[256], *save = NULL, *tok;
	struct vm_bulk_spec b = { .precopy = true };

	if (!spec || strlen(spec) >= sizeof(buf))
		return ferry_error_set(err, -EINVAL, "bad device spec");
	strcpy(buf, spec);
	tok = strtok_r(buf, ",", &save);
	if (!tok || strcmp(tok, "bulk"))
		return ferry_error_set(err, -EINVAL, "unknown device '%s' (bulk)",
				       tok ? tok : "");
	while ((tok = strtok_r(NULL, ",", &save))) {
		char *eq = strchr(tok, '='), *end;
		const char *val;

		if (!eq)
			return ferry_error_set(err, -EINVAL, "device option '%s' "
					       "needs =VALUE", tok);
		*eq = 0;
		val = eq + 1;
		if (!strcmp(tok, "size")) {
			if (vm_parse_size(val, &b.size) || !b.size ||
			    b.size % BULK_CHUNK)
				return ferry_error_set(err, -EINVAL, "bad size=%s "
					"(a multiple of 64K)", val);
		} else if (!strcmp(tok, "dirty-rate")) {
			b.dirty_rate = strtoull(val, &end, 10);
			if (!*val || *end || b.dirty_rate > BULK_MAX_RATE_MBPS)
				return ferry_error_set(err, -EINVAL,
					"bad dirty-rate=%s (MB/s)", val);
		} else if (!strcmp(tok, "precopy")) {
			if (strcmp(val, "on") && strcmp(val, "off"))
				return ferry_error_set(err, -EINVAL,
					"precopy=%s (on or off)", val);
			b.precopy = !strcmp(val, "on");
		} else {
			return ferry_error_set(err, -EINVAL, "unknown device "
				"option '%s' (size, dirty-rate, precopy)", tok);
		}
	}
	if (!b.size)
		return ferry_error_set(err, -EINVAL, "bulk device needs size=SIZE");
	if (cfg->nbulk >= VM_MAX_BULK)
		return ferry_error_set(err, -E2BIG, "at most %u bulk devices",
				       VM_MAX_BULK);
	cfg->bulk[cfg->nbulk++] = b;
	return 0;
}

/* ---- stream items ----------------------------------------------------------- */

static void put_item(struct ferry_chan *c, uint64_t mark, const void *p,
		     size_t len)
{
	ferry_put_be64(c, mark);
	if (mark == MARK_DEV_DATA || mark == MARK_CONFIG_STATE) {
		ferry_put_be32(c, (uint32_t)len);
		ferry_put_buf(c, p, len);
	}
}

/* Items from @c until END_OF_STATE (or, for a buffer, its end). */
static int load_items(struct vm_bulk *vb, struct ferry_chan *c, bool buffer,
		      struct ferry_error *err)
{
	for (;;) {
		uint64_t mark;
		uint32_t len;
		int r = 0;

		if (buffer && !ferry_chan_mem_remaining(c))
			return 0;
		mark = ferry_get_be64(c);
		if ((r = ferry_chan_error(c, err)))
			return r;
		switch (mark) {
		case MARK_END_OF_STATE:
			return 0;
		case MARK_INIT_DATA_SENT:
			/* Everything the device had at the start is here: the
			 * source may stop the VM as far as we are concerned. */
			ferry_load_switchover_ack(vb->vm->ctx, BULK_IDSTR,
						  vb->index);
			continue;
		case MARK_DEV_DATA:
		case MARK_CONFIG_STATE:
			len = ferry_get_be32(c);
			if ((r = ferry_chan_error(c, err)))
				return r;
			if (len > BULK_REC_MAX || len > ferry_chan_mem_remaining(c))
				return ferry_error_set(err, -EBADMSG, "bulk %u: "
					"item of %u bytes", vb->index, len);
			pthread_mutex_lock(&vb->lock);
			ferry_get_buf(c, vb->rec, len);
			r = ferry_chan_error(c, err);
			if (!r && mark == MARK_DEV_DATA)
				r = bulk_load_chunk(vb->dev, vb->rec, len, err);
			else if (!r)
				r = bulk_config_load(vb->dev, vb->rec, len, err);
			pthread_mutex_unlock(&vb->lock);
			if (r)
				return r;
			continue;
		default:
			return ferry_error_set(err, -EBADMSG, "bulk %u: unknown "
				"marker 0x%016" PRIx64, vb->index, mark);
		}
	}
}

/* ---- save hooks ---------------------------------------------------------------- */

static int b_save_setup(struct ferry_chan *c, void *opaque,
			struct ferry_error *err)
{
	struct vm_bulk *vb = opaque;
	int r = 0;

	vb->init_sent = false;
	/* Precopy needs the device running (the VM may be paused). */
	if (bulk_has_precopy(vb->dev) &&
	    bulk_get_state(vb->dev) == BULK_RUNNING)
		r = bulk_set_state(vb->dev, BULK_PRE_COPY, err);
	/* A device that has precopy but cannot use it now (a paused VM)
	 * has no initial data to wait for: say so at once, or a destination
	 * using switchover-ack would wait for it in vain. */
	if (!r && bulk_has_precopy(vb->dev) &&
	    bulk_get_state(vb->dev) != BULK_PRE_COPY) {
		put_item(c, MARK_INIT_DATA_SENT, NULL, 0);
		vb->init_sent = true;
	}
	put_item(c, MARK_END_OF_STATE, NULL, 0);
	return r;
}

static void b_save_pending(void *opaque, bool exact, uint64_t *must,
			   uint64_t *can)
{
	struct vm_bulk *vb = opaque;
	uint64_t init = 0, dirty = 0;

	(void)exact;
	*can = 0;
	/* Outside PRE_COPY/STOP_COPY nothing can be sent before the
	 * switchover, but all of the state will be sent then: count it, so
	 * the expected downtime is honest (as QEMU counts a VFIO device's
	 * stop-copy size). */
	if (bulk_pending(vb->dev, &init, &dirty)) {
		init = bulk_size(vb->dev);
		dirty = 0;
	}
	*must = init + dirty;
}

/* Records until @budget bytes (0: all) or nothing is pending. */
static int save_records(struct vm_bulk *vb, struct ferry_chan *c,
			uint64_t budget, struct ferry_error *err)
{
	uint64_t sent = 0;
	int r = 0;

	pthread_mutex_lock(&vb->lock);
	while (!budget || sent < budget) {
		size_t len = 0;

		r = bulk_save_chunk(vb->dev, vb->rec, BULK_REC_MAX, &len, err);
		if (r || !len)
			break;
		put_item(c, MARK_DEV_DATA, vb->rec, len);
		sent += len;
	}
	pthread_mutex_unlock(&vb->lock);
	return r;
}

static int b_save_iterate(struct ferry_chan *c, void *opaque, uint64_t budget,
			  struct ferry_error *err)
{
	struct vm_bulk *vb = opaque;
	uint64_t init = 0, dirty = 0;
	int r = 0;

	/* Without precopy there is nothing to send before the switchover:
	 * an empty section, which costs no record. */
	if (bulk_get_state(vb->dev) != BULK_PRE_COPY)
		return 0;
	r = save_records(vb, c, budget, err);

	if (!r && !vb->init_sent && !bulk_pending(vb->dev, &init, &dirty) &&
	    !init) {
		put_item(c, MARK_INIT_DATA_SENT, NULL, 0);
		vb->init_sent = true;
	}
	put_item(c, MARK_END_OF_STATE, NULL, 0);
	return r;
}

/* END section: the rest goes in save_complete_thread's buffers. */
static int b_save_complete(struct ferry_chan *c, void *opaque,
			   struct ferry_error *err)
{
	(void)opaque;
	(void)err;
	put_item(c, MARK_END_OF_STATE, NULL, 0);
	return 0;
}

/*
 * The rest of the device's state, at the switchover: the VFIO v1 sequence
 * (pending_bytes, data_offset stages a record, data_size), each record
 * sent straight from the device's region when it can be mapped (a plain
 * read into our buffer otherwise), then the config blob.
 */
static int b_save_thread(struct ferry_devstate_sink *sink, void *opaque,
			 struct ferry_error *err)
{
	struct vm_bulk *vb = opaque;
	struct bulk_dev *d = vb->dev;
	int r = 0;

	/* The VM's stop moved the device to STOP_COPY (vm_bulk_run_state):
	 * from here its state no longer changes. */
	if (bulk_get_state(d) != BULK_STOP_COPY)
		r = bulk_set_state(d, BULK_STOP_COPY, err);
	pthread_mutex_lock(&vb->lock);
	while (!r) {
		uint64_t pending = 0, off = 0, size = 0;
		const uint8_t *map;
		size_t maplen = 0;

		if ((r = bulk_read_pending_bytes(d, &pending, err)) || !pending)
			break;
		if ((r = bulk_read_data_offset(d, &off, err)) ||
		    (r = bulk_read_data_size(d, &size, err)) || !size)
			break;
		map = bulk_region_map(d, &maplen);
		if (map && off <= maplen && size <= maplen - off) {
			r = ferry_devstate_send(sink, map + off, size, err);
		} else {
			r = bulk_region_read(d, off, vb->rec, size, err);
			if (!r)
				r = ferry_devstate_send(sink, vb->rec, size, err);
		}
	}
	pthread_mutex_unlock(&vb->lock);
	if (!r) {
		uint8_t cfg[8 + 4 + 256 + 8];
		size_t n = bulk_config_save(d, cfg + 12, 256);

		if (!n) {
			r = ferry_error_set(err, -EIO, "bulk %u: no config state",
					    vb->index);
		} else {
			be64(cfg, MARK_CONFIG_STATE);
			be32(cfg + 8, (uint32_t)n);
			be64(cfg + 12 + n, MARK_END_OF_STATE);
			r = ferry_devstate_send_config(sink, cfg, 12 + n + 8, err);
		}
	}
	return r;
}

static void b_save_cleanup(void *opaque)
{
	struct vm_bulk *vb = opaque;

	/* The session ends: a migration that ended while the VM runs, or
	 * one that went through the switchover (the VM's resume, should it
	 * fail, runs the device again from STOP). */
	if (bulk_get_state(vb->dev) == BULK_PRE_COPY)
		bulk_set_state(vb->dev, BULK_RUNNING, NULL);
	else if (bulk_get_state(vb->dev) == BULK_STOP_COPY)
		bulk_set_state(vb->dev, BULK_STOP, NULL);
}

/* ---- load hooks ------------------------------------------------------------------ */

static int b_load_setup(void *opaque, struct ferry_error *err)
{
	struct vm_bulk *vb = opaque;
	int r = 0;

	bulk_stop(vb->dev);
	if (bulk_get_state(vb->dev) == BULK_RUNNING)
		r = bulk_set_state(vb->dev, BULK_STOP, err);
	if (!r && bulk_get_state(vb->dev) != BULK_RESUMING)
		r = bulk_set_state(vb->dev, BULK_RESUMING, err);
	return r;
}

static int b_load_state(struct ferry_chan *c, void *opaque, uint32_t version,
			struct ferry_error *err)
{
	(void)version;
	return load_items(opaque, c, false, err);
}

/* A data buffer is one record, as the device staged it. */
static int b_load_buffer(void *opaque, const void *buf, size_t len,
			 struct ferry_error *err)
{
	struct vm_bulk *vb = opaque;
	int r;

	pthread_mutex_lock(&vb->lock);
	r = bulk_load_chunk(vb->dev, buf, len, err);
	pthread_mutex_unlock(&vb->lock);
	return r;
}

/* The config buffer: CONFIG_STATE and END_OF_STATE items. */
static int b_load_config(void *opaque, const void *buf, size_t len,
			 struct ferry_error *err)
{
	struct vm_bulk *vb = opaque;
	struct ferry_chan *c = ferry_chan_new_mem_reader(buf, len);
	int r;

	if (!c)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	r = load_items(vb, c, true, err);
	ferry_chan_free(c);
	/* Every byte and the config are in: the device stops resuming, and
	 * runs when the VM does. */
	return r ? r : bulk_set_state(vb->dev, BULK_STOP, err);
}

static bool b_ack_needed(void *opaque)
{
	return bulk_has_precopy(((struct vm_bulk *)opaque)->dev);
}

static const struct ferry_dev_ops bulk_ops = {
	.size = sizeof(struct ferry_dev_ops),
	.save_setup = b_save_setup,
	.save_pending = b_save_pending,
	.save_iterate = b_save_iterate,
	.save_complete = b_save_complete,
	.save_complete_thread = b_save_thread,
	.save_cleanup = b_save_cleanup,
	.load_setup = b_load_setup,
	.load_state = b_load_state,
	.load_buffer = b_load_buffer,
	.load_config = b_load_config,
	.switchover_ack_needed = b_ack_needed,
};

/* ---- the VM's side ------------------------------------------------------------- */

int vm_bulk_create(struct vm *vm, struct ferry_error *err)
{
	if (!vm->cfg.nbulk)
		return 0;
	vm->bulk = calloc(vm->cfg.nbulk, sizeof(*vm->bulk));
	if (!vm->bulk)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	for (unsigned i = 0; i < vm->cfg.nbulk; i++) {
		const struct vm_bulk_spec *b = &vm->cfg.bulk[i];
		struct vm_bulk *vb = calloc(1, sizeof(*vb));
		char id[32];

		if (!vb)
			return ferry_error_set(err, -ENOMEM, "out of memory");
		vm->bulk[vm->nbulk++] = vb;
		vb->vm = vm;
		vb->index = i;
		pthread_mutex_init(&vb->lock, NULL);
		vb->rec = malloc(BULK_REC_MAX);
		if (!vb->rec)
			return ferry_error_set(err, -ENOMEM, "out of memory");
		snprintf(id, sizeof(id), "bulk%u", i);
		vb->dev = bulk_new(id, b->size, b->dirty_rate, b->precopy, err);
		if (!vb->dev)
			return err && err->code ? err->code : -ENOMEM;
		if (ferry_register(vm->ctx, BULK_IDSTR, i, 1, 1, &bulk_ops, vb,
				   err))
			return err->code;
	}
	return 0;
}

void vm_bulk_destroy(struct vm *vm)
{
	for (unsigned i = 0; i < vm->nbulk; i++) {
		struct vm_bulk *vb = vm->bulk[i];

		bulk_free(vb->dev);
		pthread_mutex_destroy(&vb->lock);
		free(vb->rec);
		free(vb);
	}
	free(vm->bulk);
	vm->bulk = NULL;
	vm->nbulk = 0;
}

/*
 * The VM's run state drives the devices, as a VMM's VM-state handler
 * drives VFIO devices: leaving RUNNING stops them (PRE_COPY goes on to
 * STOP_COPY: a migration is switching over); entering RUNNING runs them
 * (after a failed switchover, STOP_COPY -> STOP -> RUNNING). vm->lock held.
 */
void vm_bulk_run_state(struct vm *vm, enum ferry_run_state to)
{
	for (unsigned i = 0; i < vm->nbulk; i++) {
		struct bulk_dev *d = vm->bulk[i]->dev;
		enum bulk_state s = bulk_get_state(d);
		struct ferry_error err = { 0 };
		int r = 0;

		if (to == FERRY_RUN_RUNNING) {
			if (s == BULK_STOP_COPY || s == BULK_RESUMING)
				r = bulk_set_state(d, BULK_STOP, &err);
			if (!r && bulk_get_state(d) == BULK_STOP)
				r = bulk_set_state(d, BULK_RUNNING, &err);
			/* The dirtier keeps running across pauses (it
			 * idles outside RUNNING and PRE_COPY). */
			if (!r && !vm->bulk[i]->dirtier)
				r = bulk_start(d, &err);
			vm->bulk[i]->dirtier |= !r;
		} else if (s == BULK_PRE_COPY) {
			r = bulk_set_state(d, BULK_STOP_COPY, &err);
		} else if (s == BULK_RUNNING) {
			r = bulk_set_state(d, BULK_STOP, &err);
		}
		if (r)
			vm_trace(vm, "bulk %u: %s", i, err.msg);
	}
}

json_t *vm_bulk_verify(struct vm *vm)
{
	json_t *list = json_array();

	for (unsigned i = 0; i < vm->nbulk; i++) {
		struct bulk_dev *d = vm->bulk[i]->dev;
		uint64_t bad = 0, digest = 0;
		char hex[17];

		bulk_verify(d, &bad, &digest);
		snprintf(hex, sizeof(hex), "%016" PRIx64, digest);
		json_array_append_new(list, json_pack("{s:s, s:I, s:I, s:s, s:s}",
			"id", bulk_id(d), "size", (json_int_t)bulk_size(d),
			"bad-chunks", (json_int_t)bad, "digest", hex,
			"state", bulk_state_name(bulk_get_state(d))));
	}
	return list;
}
