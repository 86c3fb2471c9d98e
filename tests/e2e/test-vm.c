/*
 * tests/e2e/test-vm.c - the reference VMM end to end, as a user drives it:
 * `ferry vm` processes, their control sockets, save to file, restore in a
 * new process. Every scenario runs on KVM (skipped without /dev/kvm) and on
 * the thread backend.
 */
#include "../harness.h"

#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "control/control.h"
#include "vm/backend.h"
#include "vmproc.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

/* Run, stop, cont, verify clean; then corrupt a page and verify it is the
 * one reported. */
static void run_and_verify(const char *backend)
{
	struct proc p;
	long long g1, g2;
	json_t *v;

	need_backend(backend);
	vm_spawn(&p, "vm", test_fmt("--backend %s --mem 512M "
				    "--workload dirty,ws=256M,rate=0", backend));
	ASSERT_STREQ(status_of(&p), "running");
	wait_generation(&p, 1000);
	g1 = generation(&p);
	usleep(100000);
	g2 = generation(&p);
	ASSERT_GT(g2, g1);

	call(&p, "stop", NULL);
	ASSERT_STREQ(status_of(&p), "paused");
	g1 = generation(&p);
	usleep(100000);
	ASSERT_EQ(generation(&p), g1);
	call(&p, "cont", NULL);
	ASSERT_STREQ(status_of(&p), "running");
	usleep(100000);
	ASSERT_GT(generation(&p), g1);

	v = verify(&p);
	ASSERT_EQ(geti(v, "bad-pages"), 0);
	ASSERT_GE(geti(v, "verify-passes"), 1);
	json_decref(v);

	/* The verifier sees a page changed behind the guest's back: pick one
	 * outside the working set, so the guest does not rewrite it. */
	call(&p, "x-corrupt-page", json_pack("{s:i}", "page", 100000));
	v = verify(&p);
	ASSERT_EQ(geti(v, "bad-pages"), 1);
	ASSERT_EQ(geti(v, "first-bad-page"), 100000);
	ASSERT_EQ(geti(v, "last-bad-page"), 100000);
	json_decref(v);
	vm_quit(&p);
}

TEST(vm_kvm_run_stop_cont_verify) { run_and_verify("kvm"); }
TEST(vm_thread_run_stop_cont_verify) { run_and_verify("thread"); }

static void save_restore(const char *backend, const char *extra)
{
	const char *img = test_fmt("%s/vm.img", test_tmpdir());
	char digest[64], loaded[64];
	struct proc a, b;
	long long gen_saved;
	json_t *v;

	need_backend(backend);
	vm_spawn(&a, "src", test_fmt("--backend %s --mem 1G %s "
				     "--workload dirty,ws=256M,rate=0", backend, extra));
	wait_generation(&a, 20000);
	/* The guest dirties flat out: a sender slowed down (by a sanitizer,
	 * say) converges only if it may throttle it. */
	call(&a, "migrate-set-capabilities",
	     json_pack("{s:[{s:s, s:b}]}", "capabilities", "capability",
		       "auto-converge", "state", 1));
	call(&a, "migrate", json_pack("{s:s}", "uri", test_fmt("file:%s", img)));
	wait_migration(&a, "completed");
	ASSERT_STREQ(status_of(&a), "postmigrate");
	gen_saved = generation(&a);
	ram_digest(&a, digest);
	vm_quit(&a);

	vm_spawn(&b, "dst", test_fmt("--backend %s --mem 1G %s --paused "
				     "--incoming file:%s", backend, extra, img));
	wait_loaded(&b);
	ASSERT_STREQ(status_of(&b), "paused");
	ASSERT_EQ(generation(&b), gen_saved);
	ram_digest(&b, loaded);
	ASSERT_STREQ(loaded, digest);
	call(&b, "cont", NULL);
	wait_generation(&b, gen_saved + 1000);
	v = verify(&b);
	ASSERT_EQ(geti(v, "bad-pages"), 0);
	json_decref(v);
	vm_quit(&b);
}

TEST(vm_kvm_save_restore) { save_restore("kvm", ""); }
TEST(vm_thread_save_restore) { save_restore("thread", ""); }
TEST(vm_kvm_save_restore_2vcpu_memfd) { save_restore("kvm", "--vcpus 2 --memfd"); }

/* A damaged image: the incoming VM exits non-zero naming where it broke;
 * the saving VM is unaffected. */
TEST(vm_incoming_damaged_file_fails)
{
	const char *img = test_fmt("%s/vm.img", test_tmpdir());
	struct proc a;
	struct stat stt;
	char *out = NULL;
	int fd, st;
	uint8_t byte;

	vm_spawn(&a, "src", "--backend thread --mem 256M --workload fill");
	wait_generation(&a, 1000);
	call(&a, "migrate", json_pack("{s:s}", "uri", test_fmt("file:%s", img)));
	wait_migration(&a, "completed");
	vm_quit(&a);
	ASSERT_OK(stat(img, &stt));
	/* Flip a byte in the middle (inside the RAM sections). */
	fd = open(img, O_RDWR);
	ASSERT_GE(fd, 0);
	ASSERT_EQ(pread(fd, &byte, 1, stt.st_size / 2), 1);
	byte ^= 0x01;
	ASSERT_EQ(pwrite(fd, &byte, 1, stt.st_size / 2), 1);
	close(fd);
	st = test_run(&out, "%s vm --backend thread --mem 256M --incoming file:%s",
		      test_ferry_bin(), img);
	ASSERT_EQ(st, 1);
	ASSERT_CONTAINS(out, "incoming migration from file:");
	ASSERT_CONTAINS(out, "section 'ram'");
	ASSERT_CONTAINS(out, "offset ");
	free(out);
	/* A mismatched machine is refused by name. */
	st = test_run(&out, "%s vm --backend thread --mem 512M --incoming file:%s",
		      test_ferry_bin(), img);
	ASSERT_EQ(st, 1);
	free(out);
}

/* Resident anonymous memory of @pid, KiB (RssAnon in /proc/PID/status). */
static long long rss_anon_kb(pid_t pid)
{
	char path[64], line[256];
	long long kb = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	f = fopen(path, "r");
	ASSERT(f != NULL);
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "RssAnon: %lld kB", &kb) == 1)
			break;
	fclose(f);
	ASSERT_GE(kb, 0);
	return kb;
}

/* --prealloc commits all guest RAM before the VM answers; without it a
 * paused idle VM has touched only what it booted with. */
TEST(vm_prealloc_commits_ram)
{
	struct proc a, b;

	vm_spawn(&a, "pre", "--backend thread --mem 256M --paused --prealloc");
	vm_spawn(&b, "lazy", "--backend thread --mem 256M --paused");
	ASSERT_GE(rss_anon_kb(a.pid), 256 * 1024);
	ASSERT_LT(rss_anon_kb(b.pid), 128 * 1024);
	vm_quit(&a);
	vm_quit(&b);
}

TEST(vm_help_and_bad_options)
{
	char *out = NULL;

	ASSERT_EQ(test_run(&out, "%s vm --help", test_ferry_bin()), 0);
	ASSERT_CONTAINS(out, "--mem SIZE");
	ASSERT_CONTAINS(out, "--workload SPEC");
	ASSERT_CONTAINS(out, "--incoming URI");
	ASSERT_CONTAINS(out, "--paused");
	ASSERT_CONTAINS(out, "--backend");
	free(out);
	ASSERT_EQ(test_run(&out, "%s vm --workload dirty,speed=3", test_ferry_bin()), 2);
	ASSERT_CONTAINS(out, "unknown workload option 'speed'");
	free(out);
	ASSERT_EQ(test_run(&out, "%s vm --mem 3M", test_ferry_bin()), 1);
	ASSERT_CONTAINS(out, "--mem must be");
	free(out);
}
