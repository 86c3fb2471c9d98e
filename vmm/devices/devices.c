/*
 * vmm/devices/devices.c - serial console and timer devices with their vmstate.
 *
 * Small on purpose: they exist so that migration moves real, guest-visible
 * device state (registers the guest programmed, a console log, a counter
 * whose time base must be rebased on the destination), not just RAM.
 */
#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "devices/devices.h"

/* UART registers (offsets from the base port). */
enum { UART_THR = 0, UART_IER = 1, UART_IIR = 2, UART_LCR = 3, UART_MCR = 4,
       UART_LSR = 5, UART_MSR = 6, UART_SCR = 7 };
#define UART_LCR_DLAB 0x80
#define UART_LSR_THRE 0x20
#define UART_LSR_TEMT 0x40

static int serial_post_load(void *obj, uint32_t version, struct ferry_error *err)
{
	struct serial_state *s = obj;
	(void)version;
	/* The count came from the wire: the vmstate layer already refused a
	 * count above the array size, so this is a belt-and-braces check. */
	if (s->log_len > SERIAL_LOG_MAX)
		return ferry_error_set(err, -EINVAL, "console log length %u", s->log_len);
	return 0;
}

static const struct ferry_vms_field serial_fields[] = {
	FERRY_VMS_U8(struct serial_state, ier),
	FERRY_VMS_U8(struct serial_state, iir),
	FERRY_VMS_U8(struct serial_state, lcr),
	FERRY_VMS_U8(struct serial_state, mcr),
	FERRY_VMS_U8(struct serial_state, lsr),
	FERRY_VMS_U8(struct serial_state, msr),
	FERRY_VMS_U8(struct serial_state, scr),
	FERRY_VMS_U8(struct serial_state, dll),
	FERRY_VMS_U8(struct serial_state, dlm),
	FERRY_VMS_U16(struct serial_state, log_len),
	FERRY_VMS_VBUFFER(struct serial_state, log, log_len),
	FERRY_VMS_END_OF_LIST,
};

const struct ferry_vmsd serial_vmsd = {
	.name = "serial", .version = 1, .minimum_version = 1,
	.fields = serial_fields, .post_load = serial_post_load,
};

void serial_init(struct serial_state *s, int out_fd)
{
	memset(s, 0, sizeof(*s));
	s->lsr = UART_LSR_THRE | UART_LSR_TEMT;
	s->iir = 0x01; /* no interrupt pending */
	s->dll = 1;    /* 115200 baud */
	s->out_fd = out_fd;
}

static void serial_emit(struct serial_state *s, uint8_t c)
{
	if (s->log_len == SERIAL_LOG_MAX) {
		memmove(s->log, s->log + SERIAL_LOG_MAX / 2, SERIAL_LOG_MAX / 2);
		s->log_len = SERIAL_LOG_MAX / 2;
	}
	s->log[s->log_len++] = c;
	if (s->out_fd >= 0 && write(s->out_fd, &c, 1) < 0) {
		/* A closed console must not stop the guest. */
		s->out_fd = -1;
	}
}

void serial_io(struct serial_state *s, unsigned off, bool is_write, uint8_t *val)
{
	bool dlab = s->lcr & UART_LCR_DLAB;

	if (is_write) {
		switch (off) {
		case UART_THR: if (dlab) s->dll = *val; else serial_emit(s, *val); break;
		case UART_IER: if (dlab) s->dlm = *val; else s->ier = *val & 0x0f; break;
		case UART_LCR: s->lcr = *val; break;
		case UART_MCR: s->mcr = *val & 0x1f; break;
		case UART_SCR: s->scr = *val; break;
		default: break; /* IIR/FCR, LSR, MSR: writes ignored */
		}
		return;
	}
	switch (off) {
	case UART_THR: *val = dlab ? s->dll : 0; break;
	case UART_IER: *val = dlab ? s->dlm : s->ier; break;
	case UART_IIR: *val = s->iir; break;
	case UART_LCR: *val = s->lcr; break;
	case UART_MCR: *val = s->mcr; break;
	case UART_LSR: *val = s->lsr; break;
	case UART_MSR: *val = s->msr; break;
	case UART_SCR: *val = s->scr; break;
	default: *val = 0xff; break;
	}
}

static uint64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Host clocks differ between processes and hosts: the destination restarts
 * the period from its own clock, so the guest sees no jump. */
static int timer_post_load(void *obj, uint32_t version, struct ferry_error *err)
{
	struct timer_state *t = obj;
	(void)version;
	(void)err;
	t->last_ns = mono_ns();
	return 0;
}

static const struct ferry_vms_field timer_fields[] = {
	FERRY_VMS_U64(struct timer_state, period_ns),
	FERRY_VMS_U64(struct timer_state, ticks),
	FERRY_VMS_BOOL(struct timer_state, enabled),
	FERRY_VMS_END_OF_LIST,
};

const struct ferry_vmsd timer_vmsd = {
	.name = "timer", .version = 1, .minimum_version = 1,
	.fields = timer_fields, .post_load = timer_post_load,
};

void timer_init(struct timer_state *t, uint64_t period_ns)
{
	memset(t, 0, sizeof(*t));
	t->period_ns = period_ns;
	t->enabled = period_ns != 0;
	t->last_ns = mono_ns();
}

void timer_update(struct timer_state *t, uint64_t now_ns)
{
	uint64_t n;

	if (!t->enabled || !t->period_ns || now_ns <= t->last_ns)
		return;
	n = (now_ns - t->last_ns) / t->period_ns;
	t->ticks += n;
	t->last_ns += n * t->period_ns;
}
