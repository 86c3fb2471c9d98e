/*
 * vmm/vm/vm-devices.c - the VM's memory map and its virtio-like devices.
 *
 * Guest RAM is one RAM region at GPA 0 in the memory map. Each virtio-like
 * device gets its BAR0 (4 KiB of registers) at VIRTIO_BAR_BASE + 4 KiB * i
 * and its queue rings in the reserved guest area between the stack and the
 * guest image, programmed at creation the way firmware and a driver would:
 * through config space and MMIO writes that travel the flat view. An
 * incoming VM is programmed the same way and then overwritten by the load,
 * whose post_load re-maps the BARs and rebuilds the queue caches.
 *
 * The BAR window is at 0xa0000, in the guest area the layout reserves
 * below the guest image, after the rings of up to MAX_DEVICES devices (on
 * a PC, the legacy VGA window: device memory too). BARs have priority over
 * RAM, so guest RAM there is hidden and the flat view splits guest RAM
 * around the window; the KVM backend gives each part its own memslot. The
 * guest never uses those pages, whatever its RAM size. (The window used to
 * sit just below 4 GiB, on RAM that guests of more than ~4 GiB do use:
 * harmless only while one memslot covered all of guest RAM.)
 *
 * Past the first LOW_DEVICES devices (up to MAX_DEVICES: many devices are
 * what makes the non-iterable load's memory commits expensive), BARs go to
 * a window at 3 GiB, where a PC has its PCI hole - above guest RAM, so such
 * guests may have at most 3 GiB of it (the BARs are 32-bit) - and rings to
 * the top of guest RAM. The guest never drives the devices: their rings are
 * addresses the queue caches translate, nothing writes them.
 *
 * --bar-layout reversed gives device i the BAR slot of device n-1-i in its
 * window (as if the guest had reprogrammed them): a destination created
 * with the normal layout then really remaps every BAR at the load.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "devices/virtio.h"
#include "memory/memmap.h"
#include "vm/vm-internal.h"

#define RING_AREA_GPA 0x20000ull      /* up to VIRTIO_BAR_BASE: 512 KiB */
#define RING_QUEUE_SIZE 64u
#define LOW_DEVICES 32u
#define MAX_DEVICES 1024u
#define VIRTIO_BAR_BASE 0xa0000ull
#define HIGH_BAR_BASE 0xc0000000ull   /* 3 GiB: the PCI hole */
_Static_assert(RING_AREA_GPA + LOW_DEVICES * VIRTIO_DEFAULT_QUEUES * 0x1000ull
	       <= VIRTIO_BAR_BASE, "rings of every device fit below the BARs");
_Static_assert(VIRTIO_BAR_BASE + LOW_DEVICES * 0x1000ull <= GUEST_IMAGE_GPA,
	       "the BAR window ends below the guest image");
_Static_assert(HIGH_BAR_BASE + (MAX_DEVICES - LOW_DEVICES) * 0x1000ull <
	       (1ull << 32), "the high BARs are 32-bit addresses");
/* The high devices' rings at the top of guest RAM, inside its data area. */
_Static_assert((MAX_DEVICES - LOW_DEVICES) * VIRTIO_DEFAULT_QUEUES * 0x1000ull
	       <= GUEST_MIN_RAM - GUEST_DATA_GPA, "high rings fit in any guest");

static int reg_write(struct vm *vm, uint64_t gpa, uint32_t v)
{
	return memmap_write(vm->memmap, gpa, &v, sizeof(v));
}

/* What firmware and a driver would do: place BAR0, enable decoding, set up
 * every queue with rings in guest RAM. */
/* Device @i's BAR0 slot: low or high window, maybe reversed in it. */
static uint64_t bar_of(const struct vm *vm, unsigned i)
{
	unsigned n = vm->cfg.ndevices;
	bool rev = vm->cfg.bar_reversed;

	if (i < LOW_DEVICES) {
		unsigned nlow = n < LOW_DEVICES ? n : LOW_DEVICES;

		return VIRTIO_BAR_BASE + (uint64_t)(rev ? nlow - 1 - i : i) * 0x1000;
	}
	return HIGH_BAR_BASE +
	       (uint64_t)(rev ? n - 1 - i : i - LOW_DEVICES) * 0x1000;
}

static uint64_t ring_of(const struct vm *vm, unsigned i, uint32_t nq,
			uint32_t q)
{
	if (i < LOW_DEVICES)
		return RING_AREA_GPA + ((uint64_t)i * nq + q) * 0x1000;
	return vm->cfg.mem - ((uint64_t)(i - LOW_DEVICES) * nq + q + 1) * 0x1000;
}

static int program_device(struct vm *vm, struct virtio_dev *d, unsigned i,
			  struct ferry_error *err)
{
	uint64_t bar = bar_of(vm, i);
	uint32_t nq;
	int r;

	r = virtio_cfg_write(d, VPCI_BAR0, (uint32_t)bar, 4, err);
	if (!r)
		r = virtio_cfg_write(d, 0x04, VPCI_CMD_MEMORY | VPCI_CMD_MASTER, 2, err);
	if (r)
		return r;
	if (memmap_read(vm->memmap, bar + VIRTIO_REG_NUM_QUEUES, &nq, 4))
		return ferry_error_set(err, -EIO, "virtio %u: BAR0 not mapped", i);
	for (uint32_t q = 0; q < nq; q++) {
		/* One 4 KiB page per queue: descriptors, then avail, then used. */
		uint64_t ring = ring_of(vm, i, nq, q);

		if (i < LOW_DEVICES ? ring + 0x1000 > VIRTIO_BAR_BASE :
		    ring < GUEST_DATA_GPA)
			return ferry_error_set(err, -ENOSPC,
				"no guest memory left for the rings of device %u", i);
		if (reg_write(vm, bar + VIRTIO_REG_QUEUE_SEL, q) ||
		    reg_write(vm, bar + VIRTIO_REG_QUEUE_NUM, RING_QUEUE_SIZE) ||
		    reg_write(vm, bar + VIRTIO_REG_DESC_LO, (uint32_t)ring) ||
		    reg_write(vm, bar + VIRTIO_REG_DESC_HI, 0) ||
		    reg_write(vm, bar + VIRTIO_REG_AVAIL_LO, (uint32_t)ring + 0x400) ||
		    reg_write(vm, bar + VIRTIO_REG_AVAIL_HI, 0) ||
		    reg_write(vm, bar + VIRTIO_REG_USED_LO, (uint32_t)ring + 0x800) ||
		    reg_write(vm, bar + VIRTIO_REG_USED_HI, 0) ||
		    reg_write(vm, bar + VIRTIO_REG_QUEUE_READY, 1))
			return ferry_error_set(err, -EIO,
					       "virtio %u: programming queue %u", i, q);
	}
	return reg_write(vm, bar + VIRTIO_REG_STATUS, 0xf) ?
	       ferry_error_set(err, -EIO, "virtio %u: status", i) : 0;
}

int vm_devices_create(struct vm *vm, struct ferry_error *err)
{
	struct memmap_region *ram;
	int r;

	if (vm->cfg.ndevices > MAX_DEVICES)
		return ferry_error_set(err, -EINVAL, "--devices is at most %u",
				       MAX_DEVICES);
	if (vm->cfg.ndevices > LOW_DEVICES && vm->cfg.mem > HIGH_BAR_BASE)
		return ferry_error_set(err, -EINVAL, "more than %u devices need "
			"their BARs at 3 GiB: at most 3G of --mem with them",
			LOW_DEVICES);
	vm->memmap = memmap_new(err);
	if (!vm->memmap)
		return err && err->code ? err->code : -ENOMEM;
	ram = memmap_region_new_ram(vm->memmap, "ram0", vm->ram, vm->cfg.mem, err);
	if (!ram)
		return err && err->code ? err->code : -ENOMEM;
	r = memmap_add_subregion(memmap_root(vm->memmap), 0, ram, 0, err);
	if (r)
		return r;
	vm->ram_region = ram;
	vm->virtio = calloc(vm->cfg.ndevices ? vm->cfg.ndevices : 1,
			    sizeof(*vm->virtio));
	if (!vm->virtio)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	/* Firmware programs every device in one memory transaction. */
	memmap_begin(vm->memmap);
	for (unsigned i = 0; i < vm->cfg.ndevices && !r; i++) {
		vm->virtio[i] = virtio_dev_create(vm->memmap, i, err);
		if (!vm->virtio[i]) {
			r = err && err->code ? err->code : -ENOMEM;
			break;
		}
		vm->nvirtio = i + 1;
		r = ferry_register_vmstate(vm->ctx, &virtio_vmsd, i, vm->virtio[i], err);
	}
	{
		int c = memmap_commit(vm->memmap, err);
		if (!r)
			r = c;
	}
	for (unsigned i = 0; i < vm->nvirtio && !r; i++)
		r = program_device(vm, vm->virtio[i], i, err);
	return r;
}

void vm_devices_destroy(struct vm *vm)
{
	for (unsigned i = 0; i < vm->nvirtio; i++)
		virtio_dev_destroy(vm->virtio[i]);
	free(vm->virtio);
	vm->virtio = NULL;
	vm->nvirtio = 0;
	if (vm->ram_region)
		memmap_region_free(vm->ram_region);
	vm->ram_region = NULL;
	memmap_free(vm->memmap);
	vm->memmap = NULL;
}

int vm_register_schema(struct ferry_ctx *ctx, struct ferry_error *err)
{
	/* Never read or written: the schema is the descriptions alone. */
	static uint64_t placeholder[64];
	int r;

	r = ferry_register_vmstate(ctx, backend_kvm_ops.cpu_vmsd, 0, placeholder, err);
	if (!r)
		r = ferry_register_vmstate(ctx, backend_thread_ops.cpu_vmsd, 0,
					   placeholder, err);
	if (!r)
		r = ferry_register_vmstate(ctx, &serial_vmsd, 0, placeholder, err);
	if (!r)
		r = ferry_register_vmstate(ctx, &timer_vmsd, 0, placeholder, err);
	if (!r)
		r = ferry_register_vmstate(ctx, &virtio_vmsd, 0, placeholder, err);
	return r;
}
