/*
 * tests/e2e/netns.c - two network namespaces joined by a link that
 * build/ferry-linkemu shapes in user space (see netns.h).
 */
#include "../harness.h"

#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "netns.h"

static const char *linkemu_bin(void)
{
	const char *e = getenv("FERRY_LINKEMU"), *f = test_ferry_bin(),
		   *slash = strrchr(f, '/');

	if (e && *e)
		return e;
	if (!slash)
		return "ferry-linkemu";
	return test_fmt("%.*s/ferry-linkemu", (int)(slash - f), f);
}

/* Can this process make a network namespace with a TUN device in it?
 * Tried in a child, inside a namespace of its own: nothing is left. */
static void need_netns(void)
{
	int st, p[2];
	char why[200] = "";
	pid_t pid;
	ssize_t n;

	if (geteuid() != 0)
		SKIP("network namespaces need root");
	if (access("/dev/net/tun", R_OK | W_OK))
		SKIP(test_fmt("no /dev/net/tun: %s", strerror(errno)));
	ASSERT_OK(pipe2(p, O_CLOEXEC) ? -errno : 0);
	pid = fork();
	ASSERT(pid >= 0);
	if (pid == 0) {
		struct ifreq ifr = { .ifr_flags = IFF_TUN | IFF_NO_PI };
		int fd;

		close(p[0]);
		if (unshare(CLONE_NEWNET)) {
			dprintf(p[1], "unshare(CLONE_NEWNET): %s", strerror(errno));
			_exit(1);
		}
		fd = open("/dev/net/tun", O_RDWR);
		snprintf(ifr.ifr_name, IFNAMSIZ, "probe0");
		if (fd < 0 || ioctl(fd, TUNSETIFF, &ifr)) {
			dprintf(p[1], "TUN device: %s", strerror(errno));
			_exit(1);
		}
		_exit(0);
	}
	close(p[1]);
	n = read(p[0], why, sizeof(why) - 1);
	close(p[0]);
	ASSERT_EQ(waitpid(pid, &st, 0), pid);
	if (!WIFEXITED(st) || WEXITSTATUS(st))
		SKIP(test_fmt("no network namespace with a TUN device: %s",
			      n > 0 ? why : "child failed"));
}

/* One line of the emulator's stdout (without the newline), or FAIL. */
static void read_line(struct netlink_pair *l, char *buf, size_t len,
		      int timeout_ms)
{
	size_t n = 0;
	struct timespec t0, t;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		struct pollfd pf = { .fd = l->out, .events = POLLIN };
		long left;
		ssize_t r;

		clock_gettime(CLOCK_MONOTONIC, &t);
		left = timeout_ms - ((t.tv_sec - t0.tv_sec) * 1000 +
				     (t.tv_nsec - t0.tv_nsec) / 1000000);
		if (left <= 0 || poll(&pf, 1, (int)left) == 0) {
			char *log = NULL;
			test_run(&log, "cat %s", l->log);
			FAIL("ferry-linkemu said nothing for %d ms: %s", timeout_ms,
			     log);
		}
		r = read(l->out, buf + n, 1);
		if (r == 1 && buf[n] == '\n') {
			buf[n] = 0;
			return;
		}
		if (r <= 0) {
			char *log = NULL;
			buf[n] = 0;
			test_run(&log, "cat %s", l->log);
			FAIL("ferry-linkemu exited (said \"%s\"): %s", buf, log);
		}
		if (n + 2 < len)
			n++;
	}
}

void netns_up(struct netlink_pair *l, const char *shape)
{
	char spec[512] = "", line[512], ready[16], netem[32], mtu[32] = "";
	char buf[512], *save = NULL, *tok;
	int in[2], out[2];
	const char *bin = linkemu_bin();

	need_netns();
	if (access(bin, X_OK))
		FAIL("%s: %s (make builds it)", bin, strerror(errno));
	memset(l, 0, sizeof(*l));
	/* "mtu=N" is the emulator's option, the rest its shape. */
	snprintf(buf, sizeof(buf), "%s", shape ? shape : "");
	for (tok = strtok_r(buf, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
		if (!strncmp(tok, "mtu=", 4))
			snprintf(mtu, sizeof(mtu), "%s", tok + 4);
		else
			snprintf(spec + strlen(spec), sizeof(spec) - strlen(spec),
				 "%s%s", *spec ? " " : "", tok);
	}
	snprintf(l->log, sizeof(l->log), "%s/linkemu.log", test_tmpdir());
	ASSERT_OK(pipe2(in, O_CLOEXEC) ? -errno : 0);
	ASSERT_OK(pipe2(out, O_CLOEXEC) ? -errno : 0);
	l->pid = fork();
	ASSERT(l->pid >= 0);
	if (l->pid == 0) {
		int log = open(l->log, O_WRONLY | O_CREAT | O_TRUNC, 0644);

		/* Out of the test's process group: the runner kills that
		 * group at the end; the emulator goes when the test does
		 * and removes the namespaces first. */
		setpgid(0, 0);
		prctl(PR_SET_PDEATHSIG, SIGTERM);
		dup2(in[0], 0);
		dup2(out[1], 1);
		if (log >= 0)
			dup2(log, 2);
		if (*mtu)
			execl(bin, bin, "--mtu", mtu, "--seed",
			      test_fmt("%llu", (unsigned long long)test_rand()),
			      "--shape", spec, (char *)NULL);
		else
			execl(bin, bin, "--seed",
			      test_fmt("%llu", (unsigned long long)test_rand()),
			      "--shape", spec, (char *)NULL);
		_exit(127);
	}
	close(in[0]);
	close(out[1]);
	l->ctl = in[1];
	l->out = out[0];
	read_line(l, line, sizeof(line), 20000);
	if (sscanf(line, "%15s %31s %31s %63s %63s mtu=%d netem=%31s", ready,
		   l->addr[0], l->addr[1], l->ns[0], l->ns[1], &l->mtu, netem) != 7 ||
	    strcmp(ready, "ready"))
		FAIL("ferry-linkemu: unexpected \"%s\"", line);
	l->netem = !strcmp(netem, "yes");
}

static void command(struct netlink_pair *l, const char *cmd, char *reply,
		    size_t len)
{
	char line[1024];

	snprintf(line, sizeof(line), "%s\n", cmd);
	if (write(l->ctl, line, strlen(line)) != (ssize_t)strlen(line))
		FAIL("ferry-linkemu: write: %s", strerror(errno));
	for (;;) {
		read_line(l, line, sizeof(line), 10000);
		if (!strcmp(line, "ok"))
			return;
		if (!strncmp(line, "error", 5))
			FAIL("ferry-linkemu: %s: %s", cmd, line);
		if (reply)
			snprintf(reply + strlen(reply), len - strlen(reply),
				 "%s\n", line);
	}
}

void netns_shape(struct netlink_pair *l, const char *shape)
{
	if (!strcmp(shape, "down") || !strcmp(shape, "up"))
		command(l, shape, NULL, 0);
	else
		command(l, test_fmt("set %s", shape), NULL, 0);
}

static uint64_t field(const char *line, const char *key)
{
	const char *p = strstr(line, test_fmt(" %s=", key));

	if (!p)
		FAIL("no %s in \"%s\"", key, line);
	return strtoull(p + strlen(key) + 2, NULL, 10);
}

void netns_stats(struct netlink_pair *l, const char *dir,
		 struct netlink_stats *st)
{
	char reply[2048] = "", *line;

	command(l, "stats", reply, sizeof(reply));
	line = strstr(reply, test_fmt("stats %s ", dir));
	if (!line)
		FAIL("no stats for %s in \"%s\"", dir, reply);
	*strchrnul(line, '\n') = 0;
	st->rx = field(line, "rx");
	st->tx = field(line, "tx");
	st->tx_bytes = field(line, "tx-bytes");
	st->lost = field(line, "lost");
	st->tail_drop = field(line, "tail-drop");
	st->overflow = field(line, "overflow");
	st->down_drop = field(line, "down-drop");
}

void netns_down(struct netlink_pair *l)
{
	int st, i;

	if (l->pid <= 0)
		return;
	if (write(l->ctl, "quit\n", 5) != 5)
		kill(l->pid, SIGTERM);
	close(l->ctl);
	close(l->out);
	for (i = 0; i < 500 && waitpid(l->pid, &st, WNOHANG) != l->pid; i++)
		usleep(10000);
	if (i == 500) {
		kill(l->pid, SIGKILL);
		waitpid(l->pid, &st, 0);
		FAIL("ferry-linkemu did not quit");
	}
	l->pid = 0;
	if (!WIFEXITED(st) || WEXITSTATUS(st))
		FAIL("ferry-linkemu exited with status 0x%x", st);
	for (i = 0; i < 2; i++)
		if (!access(test_fmt("/run/netns/%s", l->ns[i]), F_OK))
			FAIL("namespace %s left behind", l->ns[i]);
}
