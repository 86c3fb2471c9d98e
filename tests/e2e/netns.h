/*
 * tests/e2e/netns.h - two network namespaces joined by a shaped link, for
 * tests across "hosts" on one machine: build/ferry-linkemu (tools/linkemu.c)
 * creates them and moves every packet between them in user space with the
 * link's delay, jitter, loss and rate (docs/architecture.md, "Tests across
 * hosts: namespaces and the link emulator").
 *
 *   struct netlink_pair l;
 *   netns_up(&l, "delay=5 rate=1G");         // SKIPs where it cannot run
 *   vm_spawn_ns(&s, l.ns[0], "src", "...");  // the source on side a
 *   vm_spawn_ns(&d, l.ns[1], "dst", test_fmt("... --incoming tcp:%s:%d",
 *               l.addr[1], NETNS_PORT));
 *   netns_shape(&l, "down"); ... netns_shape(&l, "up");
 *   netns_down(&l);                          // both namespaces gone
 *
 * Every helper FAILs the test on error. If the test fails or is killed,
 * the emulator (in a process group of its own, so the runner's kill of the
 * test's group leaves it the time to clean up) sees its parent die
 * (PR_SET_PDEATHSIG) or its stdin close and removes both namespaces; one
 * SIGKILLed itself is cleaned up by the next emulator to start.
 */
#ifndef FERRY_TEST_NETNS_H
#define FERRY_TEST_NETNS_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

/* Nothing else listens inside the namespaces: a fixed port is free. */
#define NETNS_PORT 4444

struct netlink_pair {
	pid_t pid;           /* the emulator */
	int ctl;             /* its stdin: commands */
	int out;             /* its stdout: replies */
	char ns[2][64];      /* [0] side a, [1] side b (under /run/netns) */
	char addr[2][32];    /* side a's address, side b's */
	int mtu;
	bool netem;          /* the kernel has netem (unused: see the docs) */
	char log[512];       /* the emulator's stderr */
};

/* Counters of one direction ("ab": a to b, "ba"), from `stats`. */
struct netlink_stats {
	uint64_t rx, tx, tx_bytes, lost, tail_drop, overflow, down_drop;
};

/*
 * Create the pair with the initial @shape (ferry-linkemu's SPEC: delay=MS
 * jitter=MS loss=PERCENT rate=BITS/S queue=BYTES, ab:/ba: for one
 * direction; "mtu=N" here picks the link's MTU). Returns once a datagram
 * went both ways. SKIPs when not root or when this kernel cannot make a
 * network namespace with a TUN device.
 */
void netns_up(struct netlink_pair *l, const char *shape);
/* Change the shape while it runs: "down", "up", "set" fields (the others
 * stay), e.g. "delay=25 loss=1". */
void netns_shape(struct netlink_pair *l, const char *shape);
void netns_stats(struct netlink_pair *l, const char *dir,
		 struct netlink_stats *st);
/* Stop the emulator; both namespaces must be gone. */
void netns_down(struct netlink_pair *l);

#endif
