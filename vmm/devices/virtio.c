/*
 * vmm/devices/virtio.c - virtio-like devices: config space with BARs,
 * registers in BAR0, queues whose ring translations are cached through the
 * flat view.
 *
 * See virtio.h for the model and the locking rule. The point of the device
 * for migration is its post_load: it re-maps BARs into the memory map and
 * rebuilds queue caches, the expensive part a loader batches by wrapping
 * all device loads in one memory map transaction.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "devices/virtio.h"

struct virtio_queue {
	uint16_t num;          /* ring size; 0 = not configured */
	bool ready;
	uint64_t desc, avail, used;
	uint16_t last_avail;   /* avail index consumed at the last notify */
	uint32_t notifies;
};

/* Host address of one ring, translated through a flat view. */
struct ring_cache {
	uint64_t gpa, len;
	uint8_t *host;   /* NULL: not inside one RAM range (or queue not ready) */
};

struct queue_cache {
	bool valid;
	struct ring_cache ring[VIRTIO_NR_RINGS];
};

struct virtio_dev {
	/* BAR1's RAM window: first, so the page alignment of the whole struct
	 * (aligned_alloc) makes it page aligned, as a KVM memslot needs. */
	uint8_t bar1_mem[VIRTIO_BAR1_SIZE] __attribute__((aligned(4096)));

	/* ---- migrated (virtio_vmsd) ---- */
	/* Config space: touched only by map-writer calls (cfg accessors,
	 * load), never by vCPU MMIO, so it needs no lock. */
	uint8_t cfg[256];
	/* Registers and queues: under lock. */
	uint32_t status;
	uint32_t queue_sel;
	uint32_t num_queues;   /* VARRAY count; must equal nq after a load */
	struct virtio_queue queues[VIRTIO_MAX_QUEUES];
	uint16_t bar1_len;     /* VBUFFER length: 0 or VIRTIO_BAR1_SIZE */

	/* ---- not migrated ---- */
	struct memmap *mm;
	unsigned index;
	unsigned nq;               /* configured queue count */
	uint8_t wmask[256];        /* guest-writable config bits */
	uint8_t reset_cfg[256];    /* config at reset: read-only bits' truth */
	struct memmap_region *bar_mr[VPCI_NUM_BARS];
	/* Where each BAR is mapped: map-writer thread only. */
	bool bar_mapped[VPCI_NUM_BARS];
	uint64_t bar_addr[VPCI_NUM_BARS];
	struct memmap_listener listener;

	pthread_mutex_t lock;  /* guards registers, queues, caches, stats */
	struct queue_cache cache[VIRTIO_MAX_QUEUES];
	struct virtio_stats stats;
};

/* ---- queue caches (called with d->lock held) ------------------------------ */

/* Split ring sizes for a ring of @num entries: 16-byte descriptors; avail
 * and used have flags, idx, the ring and an event index. */
static uint64_t ring_len(uint16_t num, enum virtio_ring ring)
{
	switch (ring) {
	case VIRTIO_RING_DESC:  return 16ull * num;
	case VIRTIO_RING_AVAIL: return 6 + 2ull * num;
	default:                return 6 + 8ull * num;
	}
}

/* Where a ring is in host memory through @view. Only a ring wholly inside
 * one RAM range gets a direct pointer; anything else is a guest bug here
 * and reads fail. */
static uint8_t *ring_host(const struct memmap_view *view, bool ready,
			  uint64_t gpa, uint64_t len)
{
	const struct memmap_range *r;

	if (!ready || gpa + len < gpa)
		return NULL;
	r = memmap_lookup(view, gpa);
	if (r && r->host && gpa + len <= r->gpa + r->size)
		return r->host + (gpa - r->gpa);
	return NULL;
}

static void cache_rebuild(struct virtio_dev *d, unsigned q,
			  const struct memmap_view *view)
{
	struct virtio_queue *vq = &d->queues[q];
	struct queue_cache *c = &d->cache[q];
	const uint64_t addr[] = { vq->desc, vq->avail, vq->used };
	int i;

	for (i = 0; i < VIRTIO_NR_RINGS; i++) {
		struct ring_cache *rc = &c->ring[i];

		rc->gpa = addr[i];
		rc->len = ring_len(vq->num, i);
		rc->host = ring_host(view, vq->ready, rc->gpa, rc->len);
	}
	c->valid = true;
	d->stats.cache_rebuilds++;
}

/* Rebuild every invalid cache of a ready queue against @view, or against
 * the current view if @view is NULL. */
static void caches_rebuild(struct virtio_dev *d, const struct memmap_view *view)
{
	const struct memmap_view *own = NULL;
	unsigned q;

	for (q = 0; q < d->nq; q++) {
		if (d->cache[q].valid)
			continue;
		if (!view)
			view = own = memmap_view_get(d->mm);
		/* Refused inside our own open transaction (release builds):
		 * the caches stay invalid until the commit rebuilds them. */
		if (!view)
			return;
		cache_rebuild(d, q, view);
	}
	memmap_view_put(own);
}

static void caches_invalidate(struct virtio_dev *d)
{
	unsigned q;

	for (q = 0; q < d->nq; q++)
		d->cache[q].valid = false;
}

static int queue_read_locked(struct virtio_dev *d, unsigned q,
			     enum virtio_ring ring, uint64_t off, void *buf,
			     size_t len)
{
	struct ring_cache *rc;

	if (q >= d->nq || ring >= VIRTIO_NR_RINGS)
		return -EINVAL;
	if (!d->cache[q].valid) {
		const struct memmap_view *v = memmap_view_get(d->mm);

		if (!v)
			return -EBUSY;
		cache_rebuild(d, q, v);
		memmap_view_put(v);
	}
	rc = &d->cache[q].ring[ring];
	if (off > rc->len || len > rc->len - off)
		return -EINVAL;
	if (!rc->host)
		return -EFAULT;
	memcpy(buf, rc->host + off, len);
	return 0;
}

/* ---- memory map listener ------------------------------------------------- */

/*
 * After a commit, a valid cache stays valid only if each of its rings still
 * resolves to the same host memory in the new view: a lookup per ring
 * (O(log n)), so a commit costs each device the same whatever the number
 * of devices, and mapping a BAR far from the rings costs nothing. (The
 * listener takes no region_add/region_del, which would show every device
 * every change: quadratic with many devices.)
 */
static void caches_check(struct virtio_dev *d, const struct memmap_view *v)
{
	unsigned q;
	int i;

	for (q = 0; q < d->nq; q++) {
		struct queue_cache *c = &d->cache[q];

		if (!c->valid)
			continue;
		for (i = 0; i < VIRTIO_NR_RINGS && c->valid; i++) {
			const struct ring_cache *rc = &c->ring[i];

			if (ring_host(v, d->queues[q].ready, rc->gpa, rc->len) !=
			    rc->host)
				c->valid = false;
		}
	}
}

static void listener_commit(struct memmap_listener *l, const struct memmap_view *v)
{
	struct virtio_dev *d = (struct virtio_dev *)((char *)l -
		offsetof(struct virtio_dev, listener));

	pthread_mutex_lock(&d->lock);
	caches_check(d, v);
	caches_rebuild(d, v);
	pthread_mutex_unlock(&d->lock);
}

/* ---- config space and BARs ----------------------------------------------- */

static uint32_t cfg_get(const uint8_t *cfg, unsigned off, unsigned size)
{
	uint32_t v = 0;
	unsigned i;

	for (i = 0; i < size; i++)
		v |= (uint32_t)cfg[off + i] << (8 * i);
	return v;
}

static void cfg_put(uint8_t *cfg, unsigned off, uint32_t v, unsigned size)
{
	unsigned i;

	for (i = 0; i < size; i++)
		cfg[off + i] = (uint8_t)(v >> (8 * i));
}

/*
 * Make the memory map match the config space: a BAR is mapped iff memory
 * decoding is on and its address is neither 0 nor the top window of the
 * 32-bit space (where a sized but never programmed BAR points after the
 * guest wrote all-ones). Caller: a map writer, not holding d->lock, inside
 * a transaction so several BARs change in one rebuild.
 */
static int bars_update(struct virtio_dev *d, struct ferry_error *err)
{
	bool decode = cfg_get(d->cfg, VPCI_COMMAND, 2) & VPCI_CMD_MEMORY;
	int i, r = 0;

	for (i = 0; i < VPCI_NUM_BARS && !r; i++) {
		struct memmap_region *mr = d->bar_mr[i];
		uint64_t addr, size;
		bool want;

		if (!mr)
			continue;
		addr = cfg_get(d->cfg, VPCI_BAR0 + 4 * i, 4) & VPCI_BAR_MEM_MASK;
		size = memmap_region_size(mr);
		want = decode && addr != 0 && addr + size < (1ull << 32);
		if (d->bar_mapped[i] && !want) {
			r = memmap_del_subregion(mr, err);
			if (!r)
				d->bar_mapped[i] = false;
		} else if (d->bar_mapped[i] && addr != d->bar_addr[i]) {
			r = memmap_move_subregion(mr, addr, err);
		} else if (!d->bar_mapped[i] && want) {
			r = memmap_add_subregion(memmap_root(d->mm), addr, mr,
						 VIRTIO_BAR_PRIORITY, err);
			if (!r)
				d->bar_mapped[i] = true;
		}
		if (!r)
			d->bar_addr[i] = addr;
	}
	return r;
}

static bool cfg_access_ok(unsigned off, unsigned size)
{
	return (size == 1 || size == 2 || size == 4) && off < 256 &&
	       (off & 3) + size <= 4;
}

uint32_t virtio_cfg_read(struct virtio_dev *d, unsigned off, unsigned size)
{
	if (!cfg_access_ok(off, size))
		return 0xffffffffu;
	return cfg_get(d->cfg, off, size);
}

int virtio_cfg_write(struct virtio_dev *d, unsigned off, uint32_t val,
		     unsigned size, struct ferry_error *err)
{
	unsigned i;
	int r, r2;

	if (!cfg_access_ok(off, size))
		return 0;
	/* Only writable bits change: this is what makes BAR sizing work, as
	 * writing all-ones leaves exactly the size mask and the flag bits. */
	for (i = 0; i < size; i++) {
		uint8_t m = d->wmask[off + i];

		d->cfg[off + i] = (d->cfg[off + i] & ~m) | ((uint8_t)(val >> (8 * i)) & m);
	}
	if (off + size <= VPCI_COMMAND ||
	    (off >= VPCI_COMMAND + 2 && off < VPCI_BAR0) ||
	    off >= VPCI_BAR0 + 4 * VPCI_NUM_BARS)
		return 0;
	memmap_begin(d->mm);
	r = bars_update(d, err);
	r2 = memmap_commit(d->mm, err);
	return r ? r : r2;
}

/* ---- BAR0 registers (any thread: vCPU MMIO) ------------------------------ */

static uint32_t reg_read(struct virtio_dev *d, uint64_t off)
{
	struct virtio_queue *vq = d->queue_sel < d->nq ? &d->queues[d->queue_sel] : NULL;

	switch (off) {
	case VIRTIO_REG_MAGIC:      return VIRTIO_MAGIC;
	case VIRTIO_REG_STATUS:     return d->status;
	case VIRTIO_REG_QUEUE_SEL:  return d->queue_sel;
	case VIRTIO_REG_QUEUE_MAX:  return VIRTIO_QUEUE_MAX_SIZE;
	case VIRTIO_REG_NUM_QUEUES: return d->nq;
	}
	if (!vq)
		return 0;
	switch (off) {
	case VIRTIO_REG_QUEUE_NUM:   return vq->num;
	case VIRTIO_REG_QUEUE_READY: return vq->ready;
	case VIRTIO_REG_DESC_LO:     return (uint32_t)vq->desc;
	case VIRTIO_REG_DESC_HI:     return (uint32_t)(vq->desc >> 32);
	case VIRTIO_REG_AVAIL_LO:    return (uint32_t)vq->avail;
	case VIRTIO_REG_AVAIL_HI:    return (uint32_t)(vq->avail >> 32);
	case VIRTIO_REG_USED_LO:     return (uint32_t)vq->used;
	case VIRTIO_REG_USED_HI:     return (uint32_t)(vq->used >> 32);
	}
	return 0;
}

static void set_half(uint64_t *v, bool hi, uint32_t val)
{
	*v = hi ? (*v & 0xffffffffu) | (uint64_t)val << 32
		: (*v & ~0xffffffffull) | val;
}

static void reg_write(struct virtio_dev *d, uint64_t off, uint32_t val)
{
	struct virtio_queue *vq = d->queue_sel < d->nq ? &d->queues[d->queue_sel] : NULL;
	uint16_t idx;

	switch (off) {
	case VIRTIO_REG_STATUS:
		d->status = val;
		if (val == 0) { /* reset */
			memset(d->queues, 0, sizeof(d->queues));
			d->queue_sel = 0;
			caches_invalidate(d);
		}
		return;
	case VIRTIO_REG_QUEUE_SEL:
		d->queue_sel = val;
		return;
	case VIRTIO_REG_NOTIFY:
		/* Consume the avail index through the cache: the fast path a
		 * real device takes on every kick. */
		if (val < d->nq && d->queues[val].ready &&
		    !queue_read_locked(d, val, VIRTIO_RING_AVAIL, 2, &idx, 2)) {
			d->queues[val].last_avail = idx; /* little-endian host */
			d->queues[val].notifies++;
			d->stats.notifies++;
		}
		return;
	}
	if (!vq)
		return;
	switch (off) {
	case VIRTIO_REG_QUEUE_NUM:
		if (val && val <= VIRTIO_QUEUE_MAX_SIZE && !(val & (val - 1)))
			vq->num = (uint16_t)val;
		break;
	case VIRTIO_REG_QUEUE_READY: vq->ready = (val & 1) && vq->num; break;
	case VIRTIO_REG_DESC_LO:     set_half(&vq->desc, false, val); break;
	case VIRTIO_REG_DESC_HI:     set_half(&vq->desc, true, val); break;
	case VIRTIO_REG_AVAIL_LO:    set_half(&vq->avail, false, val); break;
	case VIRTIO_REG_AVAIL_HI:    set_half(&vq->avail, true, val); break;
	case VIRTIO_REG_USED_LO:     set_half(&vq->used, false, val); break;
	case VIRTIO_REG_USED_HI:     set_half(&vq->used, true, val); break;
	default: return;
	}
	/* Any queue register may move a ring: recompute on next use. */
	d->cache[d->queue_sel].valid = false;
}

static uint64_t bar0_read(void *opaque, uint64_t off, unsigned size)
{
	struct virtio_dev *d = opaque;
	uint64_t v;

	pthread_mutex_lock(&d->lock);
	if (size == 8)
		v = reg_read(d, off) | (uint64_t)reg_read(d, off + 4) << 32;
	else /* narrow reads see the byte lanes of the 32-bit register */
		v = (reg_read(d, off & ~3ull) >> (8 * (off & 3))) &
		    (0xffffffffu >> (8 * (4 - size)));
	pthread_mutex_unlock(&d->lock);
	return v;
}

static void bar0_write(void *opaque, uint64_t off, uint64_t val, unsigned size)
{
	struct virtio_dev *d = opaque;

	pthread_mutex_lock(&d->lock);
	if (size == 8) {
		reg_write(d, off, (uint32_t)val);
		reg_write(d, off + 4, (uint32_t)(val >> 32));
	} else if (size == 4) { /* narrower writes are ignored */
		reg_write(d, off, (uint32_t)val);
	}
	pthread_mutex_unlock(&d->lock);
}

static const struct memmap_mmio_ops bar0_ops = {
	.read = bar0_read,
	.write = bar0_write,
};

/* ---- queue accessors ------------------------------------------------------- */

int virtio_queue_read(struct virtio_dev *d, unsigned q, enum virtio_ring ring,
		      uint64_t off, void *buf, size_t len)
{
	int r;

	pthread_mutex_lock(&d->lock);
	r = queue_read_locked(d, q, ring, off, buf, len);
	pthread_mutex_unlock(&d->lock);
	return r;
}

void *virtio_queue_host(struct virtio_dev *d, unsigned q, enum virtio_ring ring)
{
	void *p = NULL;

	pthread_mutex_lock(&d->lock);
	if (q < d->nq && ring < VIRTIO_NR_RINGS) {
		caches_rebuild(d, NULL);
		/* Still invalid inside our own open transaction: no pointer. */
		if (d->cache[q].valid)
			p = d->cache[q].ring[ring].host;
	}
	pthread_mutex_unlock(&d->lock);
	return p;
}

uint16_t virtio_queue_last_avail(struct virtio_dev *d, unsigned q)
{
	uint16_t v;

	pthread_mutex_lock(&d->lock);
	v = q < d->nq ? d->queues[q].last_avail : 0;
	pthread_mutex_unlock(&d->lock);
	return v;
}

void virtio_get_stats(struct virtio_dev *d, struct virtio_stats *st)
{
	pthread_mutex_lock(&d->lock);
	*st = d->stats;
	pthread_mutex_unlock(&d->lock);
}

unsigned virtio_dev_index(const struct virtio_dev *d)
{
	return d->index;
}

/* ---- migration ------------------------------------------------------------- */

/*
 * Runs in the load thread, VM not running, after every field is loaded.
 * Validate what came from the wire, then re-create what derives from it:
 * BAR mappings and queue caches.
 */
static int virtio_post_load(void *obj, uint32_t version, struct ferry_error *err)
{
	struct virtio_dev *d = obj;
	unsigned i;
	int r, r2;

	(void)version;
	if (d->num_queues != d->nq)
		return ferry_error_set(err, -EINVAL, "virtio%u: %u queues in the stream, device has %u",
				       d->index, d->num_queues, d->nq);
	if (d->bar1_len != (d->bar_mr[1] ? VIRTIO_BAR1_SIZE : 0))
		return ferry_error_set(err, -EINVAL, "virtio%u: BAR1 size %u does not match the device",
				       d->index, d->bar1_len);
	/* Read-only config bits must be ours: this catches a different device
	 * model, different BAR sizes or flags, and a corrupt stream. */
	for (i = 0; i < sizeof(d->cfg); i++)
		if ((d->cfg[i] ^ d->reset_cfg[i]) & ~d->wmask[i])
			return ferry_error_set(err, -EINVAL, "virtio%u: config byte 0x%02x is 0x%02x, read-only bits expect 0x%02x",
					       d->index, i, d->cfg[i], d->reset_cfg[i]);
	for (i = 0; i < d->nq; i++) {
		const struct virtio_queue *vq = &d->queues[i];

		if (vq->num > VIRTIO_QUEUE_MAX_SIZE || (vq->num & (vq->num - 1)) ||
		    (vq->ready && !vq->num))
			return ferry_error_set(err, -EINVAL, "virtio%u: queue %u: bad size %u",
					       d->index, i, vq->num);
	}

	pthread_mutex_lock(&d->lock);
	caches_invalidate(d);
	pthread_mutex_unlock(&d->lock);

	/* Our own transaction: alone it commits here; nested in a loader's
	 * outer transaction it costs nothing until the outer commit. */
	memmap_begin(d->mm);
	r = bars_update(d, err);
	r2 = memmap_commit(d->mm, err);
	if (r || r2)
		return ferry_error_prefix(err, "virtio%u: mapping BARs: ", d->index);

	/* Inside an outer transaction the flat view is stale until the outer
	 * commit, whose listener call rebuilds the caches (or the first access
	 * does, if that commit changed nothing). Outside, the view is current:
	 * rebuild now, so the cost is paid during the load, not at the first
	 * guest kick. */
	if (!memmap_in_transaction(d->mm)) {
		pthread_mutex_lock(&d->lock);
		caches_rebuild(d, NULL);
		pthread_mutex_unlock(&d->lock);
	}
	return 0;
}

static const struct ferry_vms_field virtio_queue_fields[] = {
	FERRY_VMS_U16(struct virtio_queue, num),
	FERRY_VMS_BOOL(struct virtio_queue, ready),
	FERRY_VMS_U64(struct virtio_queue, desc),
	FERRY_VMS_U64(struct virtio_queue, avail),
	FERRY_VMS_U64(struct virtio_queue, used),
	FERRY_VMS_U16(struct virtio_queue, last_avail),
	FERRY_VMS_U32(struct virtio_queue, notifies),
	FERRY_VMS_END_OF_LIST,
};

static const struct ferry_vmsd virtio_queue_vmsd = {
	.name = "virtio-queue", .version = 1, .minimum_version = 1,
	.fields = virtio_queue_fields,
};

static const struct ferry_vms_field virtio_fields[] = {
	FERRY_VMS_BUFFER(struct virtio_dev, cfg),
	FERRY_VMS_U32(struct virtio_dev, status),
	FERRY_VMS_U32(struct virtio_dev, queue_sel),
	FERRY_VMS_U32(struct virtio_dev, num_queues),
	FERRY_VMS_STRUCT_VARRAY(struct virtio_dev, queues, struct virtio_queue,
				num_queues, virtio_queue_vmsd),
	FERRY_VMS_U16(struct virtio_dev, bar1_len),
	FERRY_VMS_VBUFFER(struct virtio_dev, bar1_mem, bar1_len),
	FERRY_VMS_END_OF_LIST,
};

const struct ferry_vmsd virtio_vmsd = {
	.name = "virtio", .version = 1, .minimum_version = 1,
	.fields = virtio_fields, .post_load = virtio_post_load,
};

/* ---- lifetime ---------------------------------------------------------------- */

static void cfg_reset(struct virtio_dev *d)
{
	int i;

	memset(d->cfg, 0, sizeof(d->cfg));
	memset(d->wmask, 0, sizeof(d->wmask));
	cfg_put(d->cfg, VPCI_VENDOR_ID, VIRTIO_VENDOR_ID, 2);
	cfg_put(d->cfg, VPCI_DEVICE_ID, VIRTIO_DEVICE_ID, 2);
	d->cfg[VPCI_REVISION] = 1;
	cfg_put(d->cfg, VPCI_CLASS_PROG, 0xff0000, 3); /* class: unassigned */
	cfg_put(d->cfg, VPCI_SUBSYS_VENDOR, VIRTIO_VENDOR_ID, 2);
	cfg_put(d->cfg, VPCI_SUBSYS_ID, VIRTIO_DEVICE_ID, 2);
	cfg_put(d->wmask, VPCI_COMMAND, VPCI_CMD_MEMORY | VPCI_CMD_MASTER, 2);
	d->wmask[VPCI_INT_LINE] = 0xff;
	for (i = 0; i < VPCI_NUM_BARS; i++) {
		uint32_t size;

		if (!d->bar_mr[i])
			continue; /* unimplemented: reads 0, ignores writes */
		size = (uint32_t)memmap_region_size(d->bar_mr[i]);
		/* The address bits above the size are writable; the low bits
		 * read as the flags, so all-ones reads back as the size mask. */
		cfg_put(d->wmask, VPCI_BAR0 + 4 * i, ~(size - 1) & VPCI_BAR_MEM_MASK, 4);
		cfg_put(d->cfg, VPCI_BAR0 + 4 * i,
			memmap_region_kind(d->bar_mr[i]) == MEMMAP_RAM ? VPCI_BAR_PREFETCH : 0, 4);
	}
	memcpy(d->reset_cfg, d->cfg, sizeof(d->cfg));
}

struct virtio_dev *virtio_dev_create(struct memmap *mm, unsigned index,
				     struct ferry_error *err)
{
	return virtio_dev_create_opts(mm, index, NULL, err);
}

struct virtio_dev *virtio_dev_create_opts(struct memmap *mm, unsigned index,
					  const struct virtio_dev_opts *opts,
					  struct ferry_error *err)
{
	unsigned nq = opts && opts->num_queues ? opts->num_queues : VIRTIO_DEFAULT_QUEUES;
	struct virtio_dev *d;
	char name[32];

	if (!mm || nq > VIRTIO_MAX_QUEUES) {
		ferry_error_set(err, -EINVAL, "virtio%u: bad options", index);
		return NULL;
	}
	d = aligned_alloc(4096, sizeof(*d)); /* sizeof is a page multiple */
	if (!d) {
		ferry_error_set(err, -ENOMEM, "virtio%u: out of memory", index);
		return NULL;
	}
	memset(d, 0, sizeof(*d));
	d->mm = mm;
	d->index = index;
	d->nq = d->num_queues = nq;
	pthread_mutex_init(&d->lock, NULL);
	/* No queue is ready, so the empty caches are valid as they are. */
	for (unsigned q = 0; q < nq; q++)
		d->cache[q].valid = true;

	snprintf(name, sizeof(name), "virtio%u.bar0", index);
	d->bar_mr[0] = memmap_region_new_mmio(mm, name, VIRTIO_BAR0_SIZE,
					      &bar0_ops, d, err);
	if (!d->bar_mr[0])
		goto fail;
	if (opts && opts->bar1) {
		snprintf(name, sizeof(name), "virtio%u.bar1", index);
		d->bar_mr[1] = memmap_region_new_ram(mm, name, d->bar1_mem,
						     VIRTIO_BAR1_SIZE, err);
		if (!d->bar_mr[1])
			goto fail;
		d->bar1_len = VIRTIO_BAR1_SIZE;
	}
	cfg_reset(d);
	d->listener.commit = listener_commit;
	memmap_listener_register(mm, &d->listener);
	return d;
fail:
	memmap_region_free(d->bar_mr[0]);
	pthread_mutex_destroy(&d->lock);
	free(d);
	return NULL;
}

void virtio_dev_destroy(struct virtio_dev *d)
{
	int i;

	if (!d)
		return;
	memmap_listener_unregister(d->mm, &d->listener);
	memmap_begin(d->mm);
	for (i = 0; i < VPCI_NUM_BARS; i++)
		memmap_region_free(d->bar_mr[i]); /* unmaps if mapped */
	memmap_commit(d->mm, NULL);
	pthread_mutex_destroy(&d->lock);
	free(d);
}
