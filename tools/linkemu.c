/*
 * tools/linkemu.c - ferry-linkemu: two network namespaces joined by a
 * shaped link, so tests can migrate between two "hosts" on one machine.
 *
 * It creates the namespaces PREFIX-PID-a and PREFIX-PID-b (as `ip netns
 * add` does: a bind mount of the namespace under /run/netns), a TUN device
 * in each with 10.213.N.1/24 (a) and 10.213.N.2/24 (b) and brings lo up in
 * both; every packet one side sends comes out of its TUN here and goes into
 * the other side's TUN after the link's shaping: rate (a serialising link
 * with a bounded FIFO, tail drop), random loss, delay and jitter (never
 * reordering). Nothing outside the two namespaces is touched.
 *
 * The kernels this was written on have no netem qdisc, so the emulation is
 * in user space everywhere (the same figures on every kernel); whether
 * netem exists is detected and reported in the ready line only.
 *
 * Once a probe datagram went both ways through the link it prints
 *   ready ADDR_A ADDR_B NS_A NS_B mtu=M netem=yes|no
 * and reads commands on stdin, one per line, answering "ok" or "error ...":
 *   set SPEC     change the shape (only the fields given), SPEC as --shape
 *   down | up    drop everything (and what is queued) / carry packets again
 *   stats        one line of counters per direction, then "ok"
 *   quit         exit
 * SPEC is space-separated KEY=VALUE: delay=MS jitter=MS loss=PERCENT
 * rate=BITS/S (k/M/G suffixes, 0 = unlimited) queue=BYTES (0 = the
 * default: a bandwidth-delay product, at least 16 packets), the words
 * "down", "up" and "clear" (no shaping); "ab:KEY=V" or "ba:KEY=V" sets one
 * direction only (a to b, b to a).
 *
 * It removes both namespaces when it exits: on SIGTERM, SIGINT or SIGHUP,
 * on EOF on stdin, on "quit", and when its parent dies (PR_SET_PDEATHSIG).
 * At start it removes namespaces of its prefix whose creator is gone (a
 * SIGKILLed emulator cannot clean up after itself); --cleanup does only
 * that.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NETNS_DIR "/run/netns"
#define MAX_PKT 65536
#define HDR 16u                 /* ring record header, also the alignment */
#define WRAP UINT32_MAX         /* record length: continue at the start */

static const char *prog = "ferry-linkemu";

static void msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void msg(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- shaping --------------------------------------------------------------- */

struct shape {
	uint64_t delay_ns, jitter_ns;
	double loss;            /* percent */
	uint64_t rate;          /* bits/s, 0 = unlimited */
	uint64_t queue;         /* bytes, 0 = default */
};

/* A packet record in a direction's byte ring: header, then the packet. */
struct rec {
	uint32_t len;
	uint32_t pad;
	uint64_t due_ns;
};

struct dir {
	const char *name;
	int in_fd, out_fd;
	struct shape sh;
	uint64_t queue_bytes;   /* effective limit */
	uint64_t link_free_ns;  /* the serialiser is busy until then */
	uint64_t last_due_ns;   /* no packet leaves before the one ahead */
	uint64_t rng;
	/* ring: records from head to tail, HDR-aligned */
	uint8_t *ring;
	size_t size, head, tail, used;
	/* counters */
	uint64_t rx, rx_bytes, tx, tx_bytes, lost, tail_drop, overflow,
		 down_drop, write_err;
};

static struct dir dirs[2];
static bool link_down;
static int mtu = 64000;

static uint64_t rnd(struct dir *d)
{
	uint64_t z = (d->rng += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* The FIFO in front of the serialiser: what was asked for, or a
 * bandwidth-delay product (rate x round trip, both directions' delay and
 * jitter), at least 16 full packets. */
static void update_queue(struct dir *d)
{
	uint64_t q = d->sh.queue, rtt_ns;

	if (!q) {
		rtt_ns = dirs[0].sh.delay_ns + dirs[1].sh.delay_ns +
			 dirs[0].sh.jitter_ns + dirs[1].sh.jitter_ns;
		q = (uint64_t)((double)d->sh.rate / 8 * (double)rtt_ns / 1e9);
		if (q < 16ull * (uint64_t)mtu)
			q = 16ull * (uint64_t)mtu;
	}
	d->queue_bytes = q;
}

static void flush(struct dir *d)
{
	while (d->used) {
		struct rec *r = (struct rec *)(d->ring + d->head);

		if (r->len == WRAP) {
			d->used -= d->size - d->head;
			d->head = 0;
			continue;
		}
		d->down_drop++;
		d->used -= HDR + ((r->len + HDR - 1) & ~(HDR - 1));
		d->head += HDR + ((r->len + HDR - 1) & ~(HDR - 1));
		if (d->head == d->size)
			d->head = 0;
	}
	d->head = d->tail = 0;
	d->link_free_ns = d->last_due_ns = 0;
}

static int parse_num(const char *s, double *v)
{
	char *end;

	errno = 0;
	*v = strtod(s, &end);
	if (errno || end == s || *v < 0)
		return -1;
	switch (*end) {
	case 0: return 0;
	case 'k': case 'K': *v *= 1e3; break;
	case 'M': *v *= 1e6; break;
	case 'G': *v *= 1e9; break;
	default: return -1;
	}
	return end[1] ? -1 : 0;
}

/* Apply a shape SPEC; on error nothing changes and @err says why. */
static int apply_spec(const char *spec, char *err, size_t errlen)
{
	struct shape sh[2] = { dirs[0].sh, dirs[1].sh };
	bool down = link_down;
	char buf[1024], *save = NULL, *tok;

	snprintf(buf, sizeof(buf), "%s", spec);
	for (tok = strtok_r(buf, " \t\r\n", &save); tok;
	     tok = strtok_r(NULL, " \t\r\n", &save)) {
		int lo = 0, hi = 1;
		char *eq;
		double v;

		if (!strcmp(tok, "down")) { down = true; continue; }
		if (!strcmp(tok, "up")) { down = false; continue; }
		if (!strcmp(tok, "clear")) {
			memset(sh, 0, sizeof(sh));
			continue;
		}
		if (!strncmp(tok, "ab:", 3)) { hi = 0; tok += 3; }
		else if (!strncmp(tok, "ba:", 3)) { lo = 1; tok += 3; }
		eq = strchr(tok, '=');
		if (!eq || parse_num(eq + 1, &v)) {
			snprintf(err, errlen, "bad shape item '%s'", tok);
			return -1;
		}
		*eq = 0;
		for (int i = lo; i <= hi; i++) {
			if (!strcmp(tok, "delay"))
				sh[i].delay_ns = (uint64_t)(v * 1e6);
			else if (!strcmp(tok, "jitter"))
				sh[i].jitter_ns = (uint64_t)(v * 1e6);
			else if (!strcmp(tok, "loss") && v <= 100)
				sh[i].loss = v;
			else if (!strcmp(tok, "rate"))
				sh[i].rate = (uint64_t)v;
			else if (!strcmp(tok, "queue"))
				sh[i].queue = (uint64_t)v;
			else {
				snprintf(err, errlen, "bad shape item '%s=%s'",
					 tok, eq + 1);
				return -1;
			}
		}
	}
	for (int i = 0; i < 2; i++)
		dirs[i].sh = sh[i];
	for (int i = 0; i < 2; i++)
		update_queue(&dirs[i]);
	if (down && !link_down)
		for (int i = 0; i < 2; i++)
			flush(&dirs[i]);
	link_down = down;
	return 0;
}

/* Free contiguous room for a record of up to MAX_PKT at the tail (wrapping
 * the tail to the start if that is where the room is), or NULL. */
static uint8_t *room(struct dir *d)
{
	size_t need = HDR + MAX_PKT;

	if (d->used == 0)
		d->head = d->tail = 0;
	if (d->tail >= d->head && d->used < d->size) {
		/* free: [tail, size) and [0, head) */
		if (d->size - d->tail >= need)
			return d->ring + d->tail;
		if (d->head >= need + HDR) {
			/* mark the end skipped, continue at the start */
			((struct rec *)(d->ring + d->tail))->len = WRAP;
			d->used += d->size - d->tail;
			d->tail = 0;
			return d->ring;
		}
		return NULL;
	}
	/* tail < head: free is [tail, head) */
	if (d->head - d->tail >= need && d->used < d->size)
		return d->ring + d->tail;
	return NULL;
}

static void commit(struct dir *d, uint32_t len, uint64_t due)
{
	struct rec *r = (struct rec *)(d->ring + d->tail);
	size_t sz = HDR + ((len + HDR - 1) & ~(HDR - 1));

	r->len = len;
	r->due_ns = due;
	d->tail += sz;
	d->used += sz;
	if (d->tail == d->size)
		d->tail = 0;
}

static void deliver(struct dir *d, const uint8_t *p, uint32_t len)
{
	if (write(d->out_fd, p, len) == (ssize_t)len) {
		d->tx++;
		d->tx_bytes += len;
	} else {
		d->write_err++;
	}
}

/* Decide a packet's fate: 0 = dropped, else its due time. */
static uint64_t admit(struct dir *d, uint32_t len, uint64_t now)
{
	uint64_t due, depart = now;

	if (link_down) {
		d->down_drop++;
		return 0;
	}
	if (d->sh.rate) {
		uint64_t start = d->link_free_ns > now ? d->link_free_ns : now;
		double backlog = (double)(start - now) * (double)d->sh.rate / 8e9;

		if (backlog + len > (double)d->queue_bytes) {
			d->tail_drop++;
			return 0;
		}
		d->link_free_ns = start + (uint64_t)((double)len * 8e9 /
						     (double)d->sh.rate);
		depart = d->link_free_ns;
	}
	if (d->sh.loss > 0 && (d->sh.loss >= 100 ||
	    (double)rnd(d) < d->sh.loss / 100 * 18446744073709551616.0)) {
		d->lost++;
		return 0;
	}
	due = depart + d->sh.delay_ns;
	if (d->sh.jitter_ns) {
		uint64_t span = 2 * d->sh.jitter_ns + 1;
		int64_t j = (int64_t)(rnd(d) % span) - (int64_t)d->sh.jitter_ns;

		due = (int64_t)due + j < (int64_t)depart ? depart : due + (uint64_t)j;
	}
	if (due < d->last_due_ns)
		due = d->last_due_ns;
	d->last_due_ns = due;
	return due ? due : 1;
}

/* Read what the source side sent (up to a batch), shape it. */
static void pump_in(struct dir *d)
{
	static uint8_t scratch[MAX_PKT];

	for (int n = 0; n < 64; n++) {
		uint8_t *slot = room(d);
		uint8_t *buf = slot ? slot + HDR : scratch;
		ssize_t len = read(d->in_fd, buf, MAX_PKT);
		uint64_t now, due;

		if (len <= 0)
			return;
		d->rx++;
		d->rx_bytes += (uint64_t)len;
		now = now_ns();
		due = admit(d, (uint32_t)len, now);
		if (!due)
			continue;
		if (!slot) {
			d->overflow++;
			continue;
		}
		if (due <= now && d->used == 0) {
			deliver(d, buf, (uint32_t)len);
			continue;
		}
		commit(d, (uint32_t)len, due);
	}
}

/* Send what is due; returns the next due time (0 = nothing queued). */
static uint64_t pump_out(struct dir *d, uint64_t now)
{
	while (d->used) {
		struct rec *r = (struct rec *)(d->ring + d->head);
		size_t sz;

		if (r->len == WRAP) {
			d->used -= d->size - d->head;
			d->head = 0;
			continue;
		}
		if (r->due_ns > now)
			return r->due_ns;
		deliver(d, d->ring + d->head + HDR, r->len);
		sz = HDR + ((r->len + HDR - 1) & ~(HDR - 1));
		d->head += sz;
		d->used -= sz;
		if (d->head == d->size)
			d->head = 0;
	}
	return 0;
}

static void print_stats(FILE *f)
{
	for (int i = 0; i < 2; i++) {
		struct dir *d = &dirs[i];

		fprintf(f, "stats %s rx=%" PRIu64 " rx-bytes=%" PRIu64 " tx=%" PRIu64
			" tx-bytes=%" PRIu64 " lost=%" PRIu64 " tail-drop=%" PRIu64
			" overflow=%" PRIu64 " down-drop=%" PRIu64 " write-err=%" PRIu64
			" queue=%" PRIu64 " delay-ms=%.3f jitter-ms=%.3f loss=%g"
			" rate=%" PRIu64 "%s\n", d->name, d->rx, d->rx_bytes, d->tx,
			d->tx_bytes, d->lost, d->tail_drop, d->overflow, d->down_drop,
			d->write_err, d->queue_bytes, (double)d->sh.delay_ns / 1e6,
			(double)d->sh.jitter_ns / 1e6, d->sh.loss, d->sh.rate,
			link_down ? " down" : "");
	}
}

/* ---- namespaces --------------------------------------------------------------- */

static char ns_name[2][64], ns_path[2][128];
static bool ns_made[2];

static void ns_remove(const char *path)
{
	if (umount2(path, MNT_DETACH) && errno != EINVAL && errno != ENOENT)
		msg("umount %s: %s", path, strerror(errno));
	if (unlink(path) && errno != ENOENT)
		msg("unlink %s: %s", path, strerror(errno));
}

static void cleanup(void)
{
	for (int i = 0; i < 2; i++)
		if (ns_made[i]) {
			ns_remove(ns_path[i]);
			ns_made[i] = false;
		}
}

/* Is @pid a running ferry-linkemu? */
static bool emulator_alive(long pid)
{
	char path[64], comm[64] = "";
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%ld/comm", pid);
	f = fopen(path, "r");
	if (!f)
		return false;
	if (!fgets(comm, sizeof(comm), f))
		comm[0] = 0;
	fclose(f);
	comm[strcspn(comm, "\n")] = 0;
	return !strcmp(comm, "ferry-linkemu");
}

/* Remove PREFIX-PID-a/-b whose PID is no longer an emulator. */
static void remove_stale(const char *prefix)
{
	size_t pl = strlen(prefix);
	DIR *dir = opendir(NETNS_DIR);
	struct dirent *e;

	if (!dir)
		return;
	while ((e = readdir(dir))) {
		const char *p = e->d_name;
		char *end, path[512];
		long pid;

		if (strncmp(p, prefix, pl) || p[pl] != '-' || !isdigit((unsigned char)p[pl + 1]))
			continue;
		pid = strtol(p + pl + 1, &end, 10);
		if ((strcmp(end, "-a") && strcmp(end, "-b")) || pid == getpid() ||
		    emulator_alive(pid))
			continue;
		snprintf(path, sizeof(path), "%s/%s", NETNS_DIR, p);
		msg("removing stale namespace %s", p);
		ns_remove(path);
	}
	closedir(dir);
}

/* As `ip netns add`: /run/netns a shared mount point, so the bind mounts
 * below propagate to (and are released in) every mount namespace. */
static int prepare_netns_dir(void)
{
	bool made = false;

	if (mkdir(NETNS_DIR, 0755) && errno != EEXIST)
		return -errno;
	while (mount("", NETNS_DIR, "none", MS_SHARED | MS_REC, NULL)) {
		if (errno != EINVAL || made)
			return -errno;
		if (mount(NETNS_DIR, NETNS_DIR, "none", MS_BIND | MS_REC, NULL))
			return -errno;
		made = true;
	}
	return 0;
}

static int ifreq_ioctl(int s, unsigned long req, struct ifreq *ifr,
		       const char *what)
{
	if (ioctl(s, req, ifr) == 0)
		return 0;
	msg("%s on %s: %s", what, ifr->ifr_name, strerror(errno));
	return -1;
}

static int set_addr(int s, const char *ifname, unsigned long req,
		    in_addr_t addr, const char *what)
{
	struct ifreq ifr = { 0 };
	struct sockaddr_in sin = { .sin_family = AF_INET };

	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
	sin.sin_addr.s_addr = addr;
	memcpy(&ifr.ifr_addr, &sin, sizeof(sin));
	return ifreq_ioctl(s, req, &ifr, what);
}

static int link_up(int s, const char *ifname)
{
	struct ifreq ifr = { 0 };

	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
	if (ifreq_ioctl(s, SIOCGIFFLAGS, &ifr, "SIOCGIFFLAGS"))
		return -1;
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	return ifreq_ioctl(s, SIOCSIFFLAGS, &ifr, "SIOCSIFFLAGS");
}

/*
 * Create namespace @i and, inside it, TUN @ifname with @addr/24, MTU and
 * lo up; a UDP socket bound to @addr for the probe. The calling thread
 * ends up back in the namespace it started in (@home).
 */
static int make_side(int i, int home, const char *ifname, in_addr_t addr,
		     int *tun, int *probe)
{
	struct ifreq ifr = { 0 };
	struct sockaddr_in sin = { .sin_family = AF_INET };
	char sys[128];
	int fd, s = -1, rc = -1;

	fd = open(ns_path[i], O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0);
	if (fd < 0) {
		msg("create %s: %s", ns_path[i], strerror(errno));
		return -1;
	}
	close(fd);
	ns_made[i] = true;
	if (unshare(CLONE_NEWNET)) {
		msg("unshare(CLONE_NEWNET): %s", strerror(errno));
		return -1;
	}
	if (mount("/proc/thread-self/ns/net", ns_path[i], "none", MS_BIND, NULL)) {
		msg("bind mount %s: %s", ns_path[i], strerror(errno));
		goto out;
	}
	*tun = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
	if (*tun < 0) {
		msg("/dev/net/tun: %s", strerror(errno));
		goto out;
	}
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
	ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
	if (ioctl(*tun, TUNSETIFF, &ifr)) {
		msg("TUNSETIFF: %s", strerror(errno));
		goto out;
	}
	s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		goto out;
	if (link_up(s, "lo"))
		goto out;
	/* No IPv6 on the link: no router solicitations or MLD in the way. */
	snprintf(sys, sizeof(sys), "/proc/sys/net/ipv6/conf/%s/disable_ipv6", ifname);
	fd = open(sys, O_WRONLY | O_CLOEXEC);
	if (fd >= 0) {
		if (write(fd, "1", 1) != 1)
			msg("%s: %s", sys, strerror(errno));
		close(fd);
	}
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
	ifr.ifr_mtu = mtu;
	if (ifreq_ioctl(s, SIOCSIFMTU, &ifr, "SIOCSIFMTU") ||
	    set_addr(s, ifname, SIOCSIFADDR, addr, "SIOCSIFADDR") ||
	    set_addr(s, ifname, SIOCSIFNETMASK, htonl(0xffffff00u), "SIOCSIFNETMASK") ||
	    link_up(s, ifname))
		goto out;
	*probe = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	sin.sin_addr.s_addr = addr;
	sin.sin_port = htons(7);
	if (*probe < 0 || bind(*probe, (struct sockaddr *)&sin, sizeof(sin))) {
		msg("probe socket: %s", strerror(errno));
		goto out;
	}
	rc = 0;
out:
	if (s >= 0)
		close(s);
	if (setns(home, CLONE_NEWNET)) {
		msg("setns back: %s", strerror(errno));
		rc = -1;
	}
	return rc;
}

/* Run tc -n NS ARGS... quietly; its exit status, 127 if it cannot run. */
static int run_tc(const char *const *args)
{
	const char *argv[16] = { "tc", "-n", ns_name[0] };
	pid_t pid;
	int st, n = 3;

	while (*args && n < 15)
		argv[n++] = *args++;
	argv[n] = NULL;
	pid = fork();
	if (pid < 0)
		return 127;
	if (pid == 0) {
		int null = open("/dev/null", O_RDWR);

		dup2(null, 0);
		dup2(null, 1);
		dup2(null, 2);
		execvp("tc", (char *const *)argv);
		_exit(127);
	}
	if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st))
		return 127;
	return WEXITSTATUS(st);
}

/* Can this kernel do netem? Asked of tc inside namespace a, on its lo
 * (removed again at once). */
static const char *detect_netem(void)
{
	static const char *const add[] = { "qdisc", "add", "dev", "lo", "root",
					   "netem", "delay", "1ms", NULL };
	static const char *const del[] = { "qdisc", "del", "dev", "lo", "root",
					   NULL };

	switch (run_tc(add)) {
	case 0:
		run_tc(del);
		return "yes";
	case 127:
		return "unknown";
	default:
		return "no";
	}
}

/* ---- main ------------------------------------------------------------------ */

static void usage(FILE *f)
{
	fprintf(f,
"usage: ferry-linkemu [--prefix P] [--subnet N] [--mtu M] [--seed S]\n"
"                     [--ring BYTES] [--shape SPEC]\n"
"       ferry-linkemu --cleanup [--prefix P]\n"
"Two network namespaces P-PID-a and P-PID-b (default prefix ferry-t) joined\n"
"by a link shaped in user space: 10.213.N.1 in a, 10.213.N.2 in b (N from\n"
"--subnet, default from the pid). SPEC: delay=MS jitter=MS loss=PERCENT\n"
"rate=BITS/S queue=BYTES down up clear, ab:/ba: for one direction.\n"
"Prints \"ready ADDR_A ADDR_B NS_A NS_B mtu=M netem=yes|no\", then takes\n"
"commands on stdin: set SPEC, down, up, stats, quit.\n"
"Default MTU %d, ring 32 MiB per direction.\n", mtu);
}

static int handle_line(char *line)
{
	char err[256];

	line[strcspn(line, "\r\n")] = 0;
	if (!*line)
		return 0;
	if (!strcmp(line, "quit"))
		return 1;
	if (!strcmp(line, "stats")) {
		print_stats(stdout);
		printf("ok\n");
	} else if (!strcmp(line, "down") || !strcmp(line, "up")) {
		apply_spec(line, err, sizeof(err));
		printf("ok\n");
	} else if (!strncmp(line, "set ", 4) || !strcmp(line, "set")) {
		if (apply_spec(line + 3, err, sizeof(err)))
			printf("error %s\n", err);
		else
			printf("ok\n");
	} else {
		printf("error unknown command '%s'\n", line);
	}
	fflush(stdout);
	return 0;
}

int main(int argc, char **argv)
{
	const char *prefix = "ferry-t", *shape = "";
	int subnet = (int)(getpid() % 250) + 1, probe[2] = { -1, -1 }, tun[2];
	uint64_t seed = now_ns() ^ (uint64_t)getpid() << 32;
	size_t ring = 32u << 20;
	bool only_cleanup = false, ready = false, got[2] = { false, false };
	char addr[2][32], inbuf[4096], err[256];
	size_t inlen = 0;
	in_addr_t ip[2];
	uint64_t next_probe = 0;
	sigset_t sigs;
	int home, sfd, rc = 1;

	for (int a = 1; a < argc; a++) {
		const char *v = a + 1 < argc ? argv[a + 1] : NULL;

		if (!strcmp(argv[a], "--cleanup")) { only_cleanup = true; continue; }
		if (!strcmp(argv[a], "--help") || !strcmp(argv[a], "-h")) {
			usage(stdout);
			return 0;
		}
		if (!v) {
			usage(stderr);
			return 2;
		}
		a++;
		if (!strcmp(argv[a - 1], "--prefix")) prefix = v;
		else if (!strcmp(argv[a - 1], "--subnet")) subnet = atoi(v);
		else if (!strcmp(argv[a - 1], "--mtu")) mtu = atoi(v);
		else if (!strcmp(argv[a - 1], "--seed")) seed = strtoull(v, NULL, 0);
		else if (!strcmp(argv[a - 1], "--ring")) ring = strtoull(v, NULL, 0);
		else if (!strcmp(argv[a - 1], "--shape")) shape = v;
		else {
			usage(stderr);
			return 2;
		}
	}
	if (subnet < 1 || subnet > 254 || mtu < 576 || mtu > 65535 ||
	    ring < 4 * (HDR + MAX_PKT) || strlen(prefix) > 40) {
		usage(stderr);
		return 2;
	}
	ring &= ~(size_t)(HDR - 1);

	/* Signals (and the parent's death) come in through a signalfd. */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	sigprocmask(SIG_BLOCK, &sigs, NULL);
	signal(SIGPIPE, SIG_IGN);
	sfd = signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK);
	prctl(PR_SET_PDEATHSIG, SIGTERM);
	if (getppid() == 1)
		return 1;
	prctl(PR_SET_TIMERSLACK, 1000ul);

	remove_stale(prefix);
	if (only_cleanup)
		return 0;
	if (getuid() != 0 && geteuid() != 0)
		msg("not root: creating namespaces will probably fail");
	if (prepare_netns_dir()) {
		msg("%s: %s", NETNS_DIR, strerror(errno));
		return 1;
	}
	home = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (home < 0) {
		msg("own netns: %s", strerror(errno));
		return 1;
	}
	for (int i = 0; i < 2; i++) {
		snprintf(ns_name[i], sizeof(ns_name[i]), "%s-%d-%c", prefix,
			 (int)getpid(), 'a' + i);
		snprintf(ns_path[i], sizeof(ns_path[i]), NETNS_DIR "/%s", ns_name[i]);
		snprintf(addr[i], sizeof(addr[i]), "10.213.%d.%d", subnet, i + 1);
		ip[i] = inet_addr(addr[i]);
	}
	for (int i = 0; i < 2; i++)
		if (make_side(i, home, i ? "ferry-b" : "ferry-a", ip[i], &tun[i],
			      &probe[i]))
			goto out;
	for (int i = 0; i < 2; i++) {
		struct dir *d = &dirs[i];

		d->name = i ? "ba" : "ab";
		d->in_fd = tun[i];
		d->out_fd = tun[1 - i];
		d->rng = seed + (uint64_t)i * 0x5851f42d4c957f2dull;
		d->size = ring;
		d->ring = mmap(NULL, ring, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (d->ring == MAP_FAILED) {
			msg("mmap: %s", strerror(errno));
			goto out;
		}
	}
	if (apply_spec(shape, err, sizeof(err))) {
		msg("%s", err);
		goto out;
	}
	msg("namespaces %s (%s) and %s (%s), mtu %d, seed %" PRIu64, ns_name[0],
	    addr[0], ns_name[1], addr[1], mtu, seed);

	for (;;) {
		struct pollfd pf[6] = {
			{ .fd = tun[0], .events = POLLIN },
			{ .fd = tun[1], .events = POLLIN },
			{ .fd = 0, .events = POLLIN },
			{ .fd = sfd, .events = POLLIN },
			{ .fd = ready ? -1 : probe[0], .events = POLLIN },
			{ .fd = ready ? -1 : probe[1], .events = POLLIN },
		};
		uint64_t now = now_ns(), next = 0;
		struct timespec ts, *tp = NULL;

		for (int i = 0; i < 2; i++) {
			uint64_t n = pump_out(&dirs[i], now);

			if (n && (!next || n < next))
				next = n;
		}
		if (!ready) {
			if (now >= next_probe) {
				struct sockaddr_in to = { .sin_family = AF_INET,
							  .sin_port = htons(7) };

				for (int i = 0; i < 2; i++) {
					to.sin_addr.s_addr = ip[1 - i];
					if (sendto(probe[i], "probe", 5, 0,
						   (struct sockaddr *)&to, sizeof(to)) < 0)
						msg("probe: %s", strerror(errno));
				}
				next_probe = now + 100000000ull;
			}
			if (!next || next_probe < next)
				next = next_probe;
		}
		if (next) {
			uint64_t wait = next > now ? next - now : 0;

			ts.tv_sec = (time_t)(wait / 1000000000ull);
			ts.tv_nsec = (long)(wait % 1000000000ull);
			tp = &ts;
		}
		if (ppoll(pf, 6, tp, NULL) < 0) {
			if (errno == EINTR)
				continue;
			msg("ppoll: %s", strerror(errno));
			goto out;
		}
		if (pf[3].revents) {
			struct signalfd_siginfo si;

			if (read(sfd, &si, sizeof(si)) > 0)
				msg("signal %u: exiting", si.ssi_signo);
			rc = 0;
			goto out;
		}
		for (int i = 0; i < 2; i++)
			if (pf[i].revents & POLLIN)
				pump_in(&dirs[i]);
		for (int i = 0; i < 2; i++)
			if (pf[4 + i].revents & POLLIN) {
				char b[16];

				while (recv(probe[i], b, sizeof(b), 0) > 0)
					got[i] = true;
			}
		if (!ready && got[0] && got[1]) {
			ready = true;
			close(probe[0]);
			close(probe[1]);
			printf("ready %s %s %s %s mtu=%d netem=%s\n", addr[0], addr[1],
			       ns_name[0], ns_name[1], mtu, detect_netem());
			fflush(stdout);
		}
		if (pf[2].revents) {
			ssize_t n = read(0, inbuf + inlen, sizeof(inbuf) - 1 - inlen);
			char *nl;

			if (n <= 0) {
				rc = 0;
				goto out;
			}
			inlen += (size_t)n;
			inbuf[inlen] = 0;
			while ((nl = strchr(inbuf, '\n'))) {
				*nl = 0;
				if (handle_line(inbuf)) {
					rc = 0;
					goto out;
				}
				inlen -= (size_t)(nl + 1 - inbuf);
				memmove(inbuf, nl + 1, inlen + 1);
			}
			if (inlen == sizeof(inbuf) - 1)
				inlen = 0;
		}
	}
out:
	print_stats(stderr);
	cleanup();
	return rc;
}
