/* SPDX-License-Identifier: MIT */
/*
 * layout.h - the contract between the reference VMM and its test guest.
 *
 * Both sides compile this header: the VMM with the host compiler, the guest
 * freestanding (FERRY_GUEST defined).  It therefore uses fixed-width types
 * only, no libc, and every shared structure has a fixed, padding-free layout
 * checked by static assertions at the bottom.
 *
 * Guest physical memory (identity-mapped, all of it user-accessible):
 *
 *   0x0000_0000  page 0, unused
 *   0x0000_1000  PML4                       \
 *   0x0000_2000  PDPT                        > page tables, built by the VMM
 *   0x0000_3000  PD x 9 (2 MiB pages, 9 GiB) /
 *   0x0000_d000  workload state (guest private; see struct guest_work)
 *   0x0000_e000  status block   (guest writes, VMM reads)
 *   0x0000_f000  command block  (VMM writes, guest reads)
 *   0x0001_0000  stacks, 64 KiB: 8 KiB per vCPU, vCPU 0 at the top
 *   0x0010_0000  guest image (text, rodata, data, bss), at most 1 MiB
 *   0x0020_0000  generation table: uint64_t gen[page], 16 MiB
 *   0x0200_0000  data area, up to the end of RAM (at most 8 GiB)
 *   0x2_0000_0000 MMIO doorbell window, 1 GiB, no memory behind it
 *
 * The guest never runs ring-0 code.  The VMM starts it directly in 64-bit
 * mode at CPL 3 with IF=0 and no IDT, so any exception is a triple fault
 * (KVM_EXIT_SHUTDOWN).  It signals the VMM through MMIO doorbells
 * (KVM_EXIT_MMIO), see below.
 *
 * The same workload code (workload.h) also runs hosted, in host threads
 * over the same RAM layout (the thread backend).  Every piece of mutable
 * workload state therefore lives in RAM at a fixed address (the status
 * block and struct guest_work), never in globals: a guest snapshot is its
 * RAM (plus, under KVM, its registers), and a thread-backend guest started
 * over a copy of RAM whose status.magic is set resumes where it was.
 *
 * vCPUs: vCPU 0 runs the workload; every other vCPU only bumps its
 * status.cpu_heartbeat[] slot and waits on the idle doorbell.  Under KVM the
 * VMM passes the vCPU index in RDI and points RSP at GUEST_VCPU_RSP(index).
 *
 * Communication is through the two blocks in RAM, not through exits, so a
 * report costs nothing and is migrated along with the rest of memory:
 *
 *   - The VMM fills in the command block before the first KVM_RUN (at least
 *     magic, data_pages, tsc_hz).  To change the workload it writes the
 *     workload fields and then increments seq; the guest re-reads the fields
 *     when it sees seq change.  To request a verify pass it increments
 *     verify_seq; the guest answers by setting status.verify_seq to the same
 *     value once the result fields are valid.
 *   - The guest keeps the status block current; every field is a naturally
 *     aligned 32- or 64-bit value, so single-field reads are atomic.
 *
 * Self-verification: every page write stamps the page with (page index,
 * generation) and records the generation in gen[page].  The rest of the page
 * is a pattern derived from both, half pseudo-random and half a repeated
 * word, so the data is non-zero and partly compressible.  A page that was
 * never written must be entirely zero.  A verify pass recomputes every page
 * from gen[] and reports mismatches.
 */
#ifndef FERRY_VMM_GUEST_LAYOUT_H
#define FERRY_VMM_GUEST_LAYOUT_H

#include <stdint.h>

#define GUEST_PAGE_SIZE		4096ULL
#define GUEST_PAGE_SHIFT	12

/*
 * Page tables: one PML4, one PDPT, GUEST_PD_PAGES page directories of
 * 2 MiB pages mapping GUEST_MAP_SIZE (8 GiB of RAM, 1 GiB MMIO window).
 */
#define GUEST_PT_GPA		0x1000ULL
#define GUEST_PD_PAGES		9ULL
#define GUEST_PT_SIZE		((2 + GUEST_PD_PAGES) * GUEST_PAGE_SIZE)
#define GUEST_MAX_RAM		(8ULL << 30)

#define GUEST_WORK_GPA		0xd000ULL
#define GUEST_STATUS_GPA	0xe000ULL
#define GUEST_CMD_GPA		0xf000ULL

/* vCPUs the layout has room for (stacks, heartbeat slots). */
#define GUEST_MAX_VCPUS		8

#define GUEST_STACK_GPA		0x10000ULL
#define GUEST_STACK_SIZE	0x10000ULL
#define GUEST_STACK_TOP		(GUEST_STACK_GPA + GUEST_STACK_SIZE)
#define GUEST_VCPU_STACK_SIZE	(GUEST_STACK_SIZE / GUEST_MAX_VCPUS)
/*
 * Initial RSP of vCPU n: 16-byte aligned minus 8, as if _start had been
 * called.  vCPU 0 keeps the top of the stack area (GUEST_INITIAL_RSP).
 */
#define GUEST_VCPU_RSP(n)	(GUEST_STACK_TOP - (uint64_t)(n) * \
				 GUEST_VCPU_STACK_SIZE - 8)
#define GUEST_INITIAL_RSP	GUEST_VCPU_RSP(0)

/* The image is linked here (guest.ld must agree) and loaded here. */
#define GUEST_IMAGE_GPA		0x100000ULL
#define GUEST_IMAGE_MAX		0x100000ULL

#define GUEST_GEN_GPA		0x200000ULL
#define GUEST_GEN_SIZE		0x1000000ULL
#define GUEST_GEN_ENTRIES	(GUEST_GEN_SIZE / sizeof(uint64_t))

#define GUEST_DATA_GPA		0x2000000ULL

/* Smallest RAM that leaves a useful data area (32 MiB of data). */
#define GUEST_MIN_RAM		(GUEST_DATA_GPA + (32ULL << 20))

/* Data pages available for a given RAM size (RAM must be >= GUEST_DATA_GPA). */
#define GUEST_DATA_PAGES(ram)	(((ram) - GUEST_DATA_GPA) >> GUEST_PAGE_SHIFT)

/*
 * Doorbells.  The guest exits to the VMM only for events that need its
 * attention, by a 32-bit store into the MMIO window: a guest-physical range
 * the page tables map but no memory slot backs, so the store exits as
 * KVM_EXIT_MMIO.  (Port I/O would be the classic choice, but under kvm_pvm
 * an `out` at CPL 3 raises #GP even with RFLAGS.IOPL = 3.)
 *
 * GUEST_MMIO_IDLE: the value is how many microseconds the guest intends to
 *   wait.  The VMM may sleep up to that long before re-entering, which
 *   keeps an idle or rate-limited guest from burning a host CPU.
 * GUEST_MMIO_PANIC: the value is a GUEST_PANIC_* code; status.panic_msg
 *   holds a NUL-terminated message.  The guest repeats the store forever.
 */
#define GUEST_MMIO_GPA		GUEST_MAX_RAM
#define GUEST_MMIO_SIZE		(1ULL << 30)
#define GUEST_MMIO_IDLE		(GUEST_MMIO_GPA + 0x0)
#define GUEST_MMIO_PANIC	(GUEST_MMIO_GPA + 0x4)

/* The VMM identity-maps this much: all possible RAM plus the MMIO window. */
#define GUEST_MAP_SIZE		(GUEST_MMIO_GPA + GUEST_MMIO_SIZE)

#define GUEST_IDLE_MAX_US	1000

#define GUEST_STATUS_MAGIC	0x53595246U	/* "FRYS" */
#define GUEST_CMD_MAGIC		0x43595246U	/* "FRYC" */
#define GUEST_WORK_MAGIC	0x57595246U	/* "FRYW" */
/* 2: struct guest_work at GUEST_WORK_GPA, per-vCPU stacks and heartbeats. */
#define GUEST_LAYOUT_VERSION	2

/* Sentinel for "no page" in page-index fields. */
#define GUEST_NO_PAGE		UINT64_MAX

enum guest_workload {
	GUEST_WORK_IDLE = 0,	/* do nothing; exit to the VMM to wait */
	GUEST_WORK_FILL = 1,	/* write every data page once, then idle */
	GUEST_WORK_DIRTY = 2,	/* keep rewriting the working set */
};

enum guest_pattern {
	GUEST_PATTERN_SEQ = 0,	/* pages 0..ws-1 in order, wrapping */
	GUEST_PATTERN_RANDOM = 1,	/* uniformly random page in 0..ws-1 */
};

enum guest_state {
	GUEST_STATE_BOOT = 0,
	GUEST_STATE_IDLE = 1,
	GUEST_STATE_FILL = 2,
	GUEST_STATE_DIRTY = 3,
	GUEST_STATE_VERIFY = 4,
	GUEST_STATE_PANIC = 5,
};

enum guest_panic {
	GUEST_PANIC_BAD_CMD = 1,	/* command block magic/version wrong */
	GUEST_PANIC_BAD_LAYOUT = 2,	/* data_pages out of range */
	GUEST_PANIC_ASSERT = 3,
};

/* Written by the VMM, read by the guest.  One page at GUEST_CMD_GPA. */
struct guest_cmd {
	uint32_t magic;		/* GUEST_CMD_MAGIC */
	uint32_t version;	/* GUEST_LAYOUT_VERSION */

	/* Set once before boot; the guest reads them at start-up. */
	uint64_t data_pages;	/* size of the data area, GUEST_DATA_PAGES(ram) */

	/* May change at any time; read by the guest continuously. */
	uint64_t tsc_hz;	/* guest TSC frequency; 0 disables rate pacing */

	/* Workload, applied when seq changes. */
	uint64_t seq;
	uint32_t workload;	/* enum guest_workload */
	uint32_t pattern;	/* enum guest_pattern */
	uint64_t ws_pages;	/* working-set size; 0 or > data_pages = all */
	uint64_t rate_mbps;	/* MiB/s of page writes; 0 = flat out */
	uint64_t seed;		/* random pattern seed; 0 picks a fixed one */
	uint32_t throttle_pct;	/* 0..99: share of time spent waiting */
	uint32_t reserved0;

	/* Increment to request a verify pass. */
	uint64_t verify_seq;
};

/* Written by the guest, read by the VMM.  One page at GUEST_STATUS_GPA. */
struct guest_status {
	uint32_t magic;		/* GUEST_STATUS_MAGIC once the guest runs */
	uint32_t version;	/* GUEST_LAYOUT_VERSION */
	uint32_t state;		/* enum guest_state */
	uint32_t workload;	/* workload in effect */

	uint64_t generation;	/* page writes so far; page N gets gen N */
	uint64_t heartbeat;	/* main-loop iterations */
	uint64_t data_pages;	/* data area size the guest is using */
	uint64_t cmd_seq;	/* last command seq applied */
	uint64_t fill_passes;	/* completed fill passes */
	uint64_t tsc;		/* guest TSC at the last heartbeat */

	/* Result of the last verify pass; valid once verify_seq matches. */
	uint64_t verify_seq;
	uint64_t verify_passes;
	uint64_t verify_pages;	/* pages checked */
	uint64_t bad_pages;
	uint64_t first_bad_page;	/* index into the data area, or NO_PAGE */
	uint64_t last_bad_page;
	uint64_t verify_cycles;	/* TSC cycles the pass took */

	uint64_t panic_code;	/* enum guest_panic, 0 if none */
	uint8_t panic_msg[64];	/* NUL-terminated */

	/* Loop iterations of each vCPU (vCPU 0: main-loop iterations too). */
	uint64_t cpu_heartbeat[GUEST_MAX_VCPUS];
};

/*
 * The workload's own state, one page at GUEST_WORK_GPA.  Written only by
 * vCPU 0 running the workload; the VMM never writes it (it may read it for
 * debugging).  It is here rather than in guest globals so that RAM alone
 * says where the workload is: see the top of this file.  Fields marked
 * "latched" are copied from the command block when cmd.seq changes.
 */
struct guest_work {
	uint32_t magic;		/* GUEST_WORK_MAGIC once initialised */
	uint32_t kind;		/* latched: enum guest_workload */
	uint32_t pattern;	/* latched: enum guest_pattern */
	uint32_t throttle_pct;	/* latched, clamped to 0..99 */
	uint64_t ws_pages;	/* latched, clamped to 1..data_pages */
	uint64_t rate_mbps;	/* latched */
	uint64_t data_pages;	/* from cmd.data_pages at first boot */
	uint64_t generation;	/* last generation handed out */
	uint64_t rng;		/* xorshift64 state for the random pattern */
	uint64_t cursor;	/* next page for the seq pattern and fill */
	uint64_t tsc_hz;	/* the value cycles_per_page was computed for */
	uint64_t cycles_per_page;	/* pacer: 0 = no pacing */
	uint64_t next_tsc;	/* pacer deadline for the next page */
};

/* Byte offsets inside a data page. */
#define GUEST_PAGE_WORDS	(GUEST_PAGE_SIZE / sizeof(uint64_t))
#define GUEST_PAGE_HDR_WORDS	2	/* [0] = page index, [1] = generation */
#define GUEST_PAGE_RANDOM_END	(GUEST_PAGE_WORDS / 2)	/* words [2, 256) */

#ifndef __cplusplus
_Static_assert(sizeof(struct guest_cmd) == 80, "guest_cmd layout");
_Static_assert(sizeof(struct guest_status) == 256, "guest_status layout");
_Static_assert(sizeof(struct guest_work) == 88, "guest_work layout");
_Static_assert(GUEST_STATUS_GPA + GUEST_PAGE_SIZE <= GUEST_CMD_GPA,
	       "status block overlaps command block");
_Static_assert(GUEST_WORK_GPA + GUEST_PAGE_SIZE <= GUEST_STATUS_GPA,
	       "workload state overlaps status block");
_Static_assert(GUEST_PT_GPA + GUEST_PT_SIZE <= GUEST_WORK_GPA,
	       "page tables overlap workload state");
_Static_assert(GUEST_CMD_GPA + GUEST_PAGE_SIZE <= GUEST_STACK_GPA,
	       "command block overlaps the stacks");
_Static_assert(GUEST_VCPU_STACK_SIZE >= 4096 &&
	       GUEST_VCPU_STACK_SIZE % 16 == 0, "per-vCPU stacks too small");
_Static_assert(GUEST_GEN_ENTRIES >= GUEST_DATA_PAGES(GUEST_MAX_RAM),
	       "generation table too small for GUEST_MAX_RAM");
_Static_assert(GUEST_PD_PAGES << 30 >= GUEST_MAP_SIZE,
	       "not enough page directories for GUEST_MAP_SIZE");
_Static_assert(GUEST_GEN_GPA + GUEST_GEN_SIZE <= GUEST_DATA_GPA,
	       "generation table overlaps data area");
#endif

#ifndef FERRY_GUEST
/*
 * The flat guest binary, embedded into the VMM by vmm/guest/image.S.  It
 * must be copied to GUEST_IMAGE_GPA; its entry point is its first byte.
 */
extern const uint8_t ferry_guest_image[];
extern const uint8_t ferry_guest_image_end[];
#endif

#endif /* FERRY_VMM_GUEST_LAYOUT_H */
