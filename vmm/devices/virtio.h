/*
 * vmm/devices/virtio.h - "virtio-like" PCI-ish devices for the reference VMM.
 *
 * Not real virtio: just enough machinery to make loading device state
 * realistic and expensive. Each device has
 *   - a 256-byte PCI type-0 config space: vendor/device id, a command
 *     register whose memory-enable bit turns BAR decoding on, and six BARs
 *     of which BAR0 is a 4 KiB MMIO register block and BAR1 (optional) a
 *     4 KiB RAM window. Writing all-ones to a BAR reads back its size mask;
 *   - registers in BAR0 (below): status, queue select, per-queue ring
 *     addresses, size and enable, and a notify register;
 *   - N queues, each with a cache of the host addresses of its three rings,
 *     translated through the memory map's flat view. A memmap listener
 *     invalidates a cache when a change touches its rings, and recomputes
 *     it at the commit (as QEMU's memory region caches do).
 *
 * Migration: virtio_vmsd saves config space, registers, queues (a VARRAY of
 * structs) and BAR1's contents. Its post_load checks the read-only config
 * bits against the device's own, re-maps the BARs into the memory map at
 * the addresses in the loaded config space (if memory decoding is on) and
 * rebuilds the queue caches. It brackets its own map changes with
 * memmap_begin/commit, so a loader that wraps all device loads in one outer
 * transaction gets a single flat-view rebuild for all of them.
 *
 * Threads and locks: d->lock (inside the device) guards registers, queues
 * and caches; MMIO callbacks (vCPU threads), listener callbacks and the
 * queue accessors take it. Calls that change the memory map
 * (virtio_cfg_write, post_load, create/destroy) are memory-map writers:
 * the caller serialises them with every other map change (memmap.h), and
 * they never hold d->lock while touching the map, because a commit calls
 * the device's own listener.
 */
#ifndef FERRY_VMM_VIRTIO_H
#define FERRY_VMM_VIRTIO_H

#include <stdbool.h>
#include <stdint.h>

#include "ferry/ferry.h"
#include "memory/memmap.h"

#define VIRTIO_VENDOR_ID      0xfe77  /* made up: this is not virtio */
#define VIRTIO_DEVICE_ID      0x0001
#define VIRTIO_MAX_QUEUES     8
#define VIRTIO_DEFAULT_QUEUES 4
#define VIRTIO_QUEUE_MAX_SIZE 256
#define VIRTIO_BAR0_SIZE      0x1000
#define VIRTIO_BAR1_SIZE      0x1000
/* Priority of BAR mappings in the root container (guest RAM uses 0), so a
 * BAR programmed over RAM shadows it, as on a real PCI host bridge. */
#define VIRTIO_BAR_PRIORITY   1

/* Config space offsets and bits (PCI type-0 header). */
#define VPCI_VENDOR_ID   0x00
#define VPCI_DEVICE_ID   0x02
#define VPCI_COMMAND     0x04
#define VPCI_STATUS      0x06
#define VPCI_REVISION    0x08
#define VPCI_CLASS_PROG  0x09
#define VPCI_HEADER_TYPE 0x0e
#define VPCI_BAR0        0x10  /* BARn at VPCI_BAR0 + 4 * n */
#define VPCI_SUBSYS_VENDOR 0x2c
#define VPCI_SUBSYS_ID   0x2e
#define VPCI_INT_LINE    0x3c
#define VPCI_CMD_IO      0x1
#define VPCI_CMD_MEMORY  0x2
#define VPCI_CMD_MASTER  0x4
#define VPCI_BAR_MEM_MASK (~0xfu)  /* address bits of a memory BAR */
#define VPCI_BAR_PREFETCH 0x8
#define VPCI_NUM_BARS    6

/* BAR0 registers, 32 bits each (8-byte accesses cover two). */
#define VIRTIO_REG_MAGIC       0x00  /* ro: VIRTIO_MAGIC */
#define VIRTIO_REG_STATUS      0x04  /* rw: writing 0 resets the device */
#define VIRTIO_REG_QUEUE_SEL   0x08  /* rw */
#define VIRTIO_REG_QUEUE_MAX   0x0c  /* ro: VIRTIO_QUEUE_MAX_SIZE */
#define VIRTIO_REG_QUEUE_NUM   0x10  /* rw: ring size, power of two */
#define VIRTIO_REG_QUEUE_READY 0x14  /* rw: 1 = enabled */
#define VIRTIO_REG_DESC_LO     0x18
#define VIRTIO_REG_DESC_HI     0x1c
#define VIRTIO_REG_AVAIL_LO    0x20
#define VIRTIO_REG_AVAIL_HI    0x24
#define VIRTIO_REG_USED_LO     0x28
#define VIRTIO_REG_USED_HI     0x2c
#define VIRTIO_REG_NOTIFY      0x30  /* wo: queue index */
#define VIRTIO_REG_NUM_QUEUES  0x34  /* ro */
#define VIRTIO_MAGIC           0x79727266u /* "ferry" little-endian-ish */

enum virtio_ring { VIRTIO_RING_DESC, VIRTIO_RING_AVAIL, VIRTIO_RING_USED,
		   VIRTIO_NR_RINGS };

struct virtio_dev;

struct virtio_dev_opts {
	unsigned num_queues;  /* 1..VIRTIO_MAX_QUEUES; 0 = default */
	bool bar1;            /* implement BAR1 (a 4 KiB RAM window) */
};

struct virtio_stats {
	uint64_t cache_rebuilds;  /* queue caches recomputed */
	uint64_t notifies;        /* notify writes that reached a ready queue */
};

/* Create device @index (its vmstate instance id) with default options:
 * VIRTIO_DEFAULT_QUEUES queues, no BAR1. Nothing is mapped until the guest
 * (or a load) enables memory decoding with BAR addresses set. */
struct virtio_dev *virtio_dev_create(struct memmap *mm, unsigned index,
				     struct ferry_error *err);
struct virtio_dev *virtio_dev_create_opts(struct memmap *mm, unsigned index,
					  const struct virtio_dev_opts *opts,
					  struct ferry_error *err);
/* Unmaps the BARs and frees. Unregister the vmstate first. NULL is a no-op. */
void virtio_dev_destroy(struct virtio_dev *d);
unsigned virtio_dev_index(const struct virtio_dev *d);

/* Config space access as a guest does it (e.g. via a CF8/CFC or ECAM
 * mechanism the VMM wires up). @size is 1, 2 or 4 and must not cross a
 * 4-byte boundary; bad accesses read as all-ones and are ignored on write.
 * A write may map, move or unmap BARs, so it returns 0 or the -errno of the
 * memory map change. */
uint32_t virtio_cfg_read(struct virtio_dev *d, unsigned off, unsigned size);
int virtio_cfg_write(struct virtio_dev *d, unsigned off, uint32_t val,
		     unsigned size, struct ferry_error *err);

/* Read @len bytes at @off within ring @ring of queue @q through the cache
 * (rebuilt first if invalid). -EINVAL: bad queue/ring or out of the ring;
 * -EFAULT: the ring is not entirely inside one RAM range of the map. */
int virtio_queue_read(struct virtio_dev *d, unsigned q, enum virtio_ring ring,
		      uint64_t off, void *buf, size_t len);
/* The cached host address of a ring (validating the cache), or NULL. */
void *virtio_queue_host(struct virtio_dev *d, unsigned q, enum virtio_ring ring);
/* Queue state as the guest programmed it / the device consumed it. */
uint16_t virtio_queue_last_avail(struct virtio_dev *d, unsigned q);

void virtio_get_stats(struct virtio_dev *d, struct virtio_stats *st);

/* Register with the device struct as obj and virtio_dev_index() as the
 * instance id. */
extern const struct ferry_vmsd virtio_vmsd;

#endif
