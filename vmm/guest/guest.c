// SPDX-License-Identifier: MIT
/*
 * guest.c - the freestanding test guest of ferry's reference VMM.
 *
 * The guest is a single 64-bit function running at CPL 3 on an identity
 * map; there is no OS, no firmware, no interrupt handling and no ring-0
 * code (under software virtualization ring-0 code is emulated and roughly
 * a thousand times slower, ring 3 runs natively).  It talks to the VMM
 * through two pages described in layout.h: it polls the command block and
 * keeps the status block current.
 *
 * Workloads:
 *   idle   - exit to the VMM (GUEST_MMIO_IDLE doorbell) so it can sleep
 *   fill   - write every data page once, then behave as idle
 *   dirty  - rewrite pages of the working set, sequentially or at random,
 *            paced to rate_mbps using the TSC (0 = flat out)
 *
 * Every page write takes the next value of the generation counter (in
 * struct guest_work), stamps the page with (index, generation) followed by
 * a pattern derived from both, and records the generation in gen[index].  A verify pass
 * recomputes each page from gen[] and reports mismatches; it runs when the
 * VMM increments cmd.verify_seq.  Because gen[] and the pages live in guest
 * RAM, a migration that loses or tears a page is caught on the destination.
 *
 * The workload itself is in workload.h, shared with the VMM's thread
 * backend, which runs the same code in host threads.  This file only binds
 * it to bare metal: the doorbells, the entry point, and memset/memcpy.
 *
 * All state the guest needs lives in its RAM (struct guest_work, the two
 * blocks, gen[], the stacks) and its registers; the guest deliberately has
 * no mutable globals.  So it survives migration as long as RAM and vCPU
 * state do.  A guest restarted at _start over RAM captured between two
 * page writes resumes too (status.magic is set); the thread backend pauses
 * only there, a KVM pause can stop mid-page, hence KVM also restores the
 * registers.  The rate pacer tolerates the TSC jump across a
 * migration: it never tries to catch up on more than WL_PACE_SLACK_MS of
 * lost time.
 *
 * vCPUs: the VMM passes the vCPU index in RDI (the first argument of
 * _start) and RSP = GUEST_VCPU_RSP(index).  vCPU 0 runs the workload, the
 * others a heartbeat loop (see wl_secondary()).
 */
#define FERRY_GUEST 1
#include "workload.h"

typedef uint8_t u8;
typedef uint32_t u32;
typedef uint64_t u64;

/*
 * gcc may emit calls to these even with -ffreestanding, and the guest has
 * no libc.  They are written with string instructions so that gcc cannot
 * recognise the loop and turn it back into a call to itself.
 */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;

	__asm__ __volatile__("rep stosb"
			     : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;

	__asm__ __volatile__("rep movsb"
			     : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

/*
 * Ring a doorbell: a 32-bit store to the unbacked MMIO window exits to the
 * VMM (KVM_EXIT_MMIO).  A plain `mov` from a register keeps KVM's
 * instruction emulator on its simplest path.
 */
static inline void doorbell(u64 gpa, u32 val)
{
	__asm__ __volatile__("movl %0, (%1)" : : "r"(val), "r"(gpa) : "memory");
}

/* ---- workload.h platform hooks -------------------------------------- */

static void wl_plat_idle(struct wl_ctx *c, uint32_t us)
{
	(void)c;
	doorbell(GUEST_MMIO_IDLE, us);
}

/* Bare metal has no safe-point duty: the VMM stops us anywhere. */
static void wl_plat_poll(struct wl_ctx *c)
{
	(void)c;
}

static __attribute__((noreturn)) void wl_plat_panic(struct wl_ctx *c,
						    uint32_t code)
{
	(void)c;
	for (;;)
		doorbell(GUEST_MMIO_PANIC, code);
}

/* ---- entry ------------------------------------------------------------ */

/*
 * Entry point, placed first in the image by guest.ld.  The VMM starts us
 * with RSP = GUEST_VCPU_RSP(cpu) and RDI = cpu, as if we had been called.
 * The image's .bss is not part of the flat binary, so vCPU 0 clears it
 * first (the guest keeps no globals, so this is belt and braces: nothing
 * another vCPU could be using).
 */
void _start(u64 cpu);
extern u8 __bss_start[], __bss_end[];	/* from guest.ld */

__attribute__((section(".text.entry"), noreturn, used))
void _start(u64 cpu)
{
	struct wl_ctx ctx;

	if (cpu == 0)
		memset(__bss_start, 0, (size_t)(__bss_end - __bss_start));
	wl_barrier();
	wl_ctx_init(&ctx, 0, (uint32_t)cpu, NULL);
	wl_run(&ctx);
	/* Only a hosted platform sets ctx.stop; here wl_run() never returns. */
	for (;;)
		wl_plat_idle(&ctx, GUEST_IDLE_MAX_US);
}
