/*
 * vmm/devices/devices.h - the reference VMM's emulated devices.
 *
 * Each device keeps its guest-visible state in a plain struct described by
 * a ferry vmstate table, so migrating a device is registering it. The
 * behaviour (port/MMIO handlers) works on the same struct.
 */
#ifndef FERRY_VMM_DEVICES_H
#define FERRY_VMM_DEVICES_H

#include <stdbool.h>
#include <stdint.h>

#include "ferry/ferry.h"

/* ---- serial console: a 16550-style UART, transmit side only ---------- */

#define SERIAL_PORT_BASE 0x3f8
#define SERIAL_LOG_MAX 4096

struct serial_state {
	uint8_t ier, iir, lcr, mcr, lsr, msr, scr, dll, dlm;
	/* Last bytes the guest wrote, kept for `query-console`; migrated so a
	 * console log survives the move. */
	uint16_t log_len;
	uint8_t log[SERIAL_LOG_MAX];
	int out_fd;               /* host side; not migrated */
};

extern const struct ferry_vmsd serial_vmsd;
void serial_init(struct serial_state *s, int out_fd);
/* Port I/O from a vCPU exit. @off is the port minus SERIAL_PORT_BASE. */
void serial_io(struct serial_state *s, unsigned off, bool is_write,
	       uint8_t *val);

/* ---- timer: a free-running counter with a programmable period -------- */

struct timer_state {
	uint64_t period_ns;       /* 0 = stopped */
	uint64_t ticks;           /* periods elapsed, as the guest sees it */
	uint64_t last_ns;         /* host time of the last update; rebased on load */
	bool enabled;
};

extern const struct ferry_vmsd timer_vmsd;
void timer_init(struct timer_state *t, uint64_t period_ns);
/* Advance to host time @now_ns (CLOCK_MONOTONIC). */
void timer_update(struct timer_state *t, uint64_t now_ns);


#endif
