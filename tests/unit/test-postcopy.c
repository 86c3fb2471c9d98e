/*
 * tests/unit/test-postcopy.c - postcopy in one process: two minivms over
 * unix sockets, switched by hand, by the automatic rule, with and without
 * the preempt channel; a destination that fails before RUN (the source
 * resumes); a capability set on one side only; and the destination's
 * state machine, discard checks and exactly-once placement driven
 * directly. Every test needs userfaultfd and skips without it.
 */
#include "../harness.h"

#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "../e2e/vmproc.h"
#include "minivm.h"
#include "internal.h"
#include "postcopy.h"

#define X(name, timeout) TEST(name);
#include "../list.h"
#undef X

#define MB (1ull << 20)

static void need_uffd(void)
{
	int64_t r = ferry_pc_bare_roundtrip_ns(4);

	if (r < 0)
		SKIP("userfaultfd is not available here");
}

static const char *incoming(struct minivm *d, const char *name)
{
	struct ferry_error err = { 0 };
	const char *uri = minivm_uri(name);

	ASSERT_OK_E(ferry_mig_incoming(d->mig, uri, &err), err);
	return uri;
}

static void both(struct minivm *s, struct minivm *d, const char *cap)
{
	minivm_set(s, cap, 1);
	minivm_set(d, cap, 1);
}

/* Migrate s -> d, switching to postcopy at once; both end completed. */
static void run_postcopy(struct minivm *s, struct minivm *d,
			 struct ferry_mig_info *is, struct ferry_mig_info *id)
{
	struct ferry_error err = { 0 };
	const char *uri = incoming(d, "pc");

	ASSERT_OK_E(ferry_mig_start(s->mig, uri, &err), err);
	ASSERT_OK_E(ferry_mig_start_postcopy(s->mig, &err), err);
	*is = minivm_wait(s, 60000);
	*id = minivm_wait(d, 60000);
	if (is->status != FERRY_MIG_COMPLETED || id->status != FERRY_MIG_COMPLETED)
		FAIL("source %s (%s), destination %s (%s)",
		     ferry_mig_status_name(is->status), is->error,
		     ferry_mig_status_name(id->status), id->error);
	ASSERT(minivm_logged(s, "out:postcopy-active"));
	ASSERT(minivm_logged(d, "in:postcopy-active"));
	ASSERT_EQ(minivm_state(s), FERRY_RUN_POSTMIGRATE);
}

/* Postcopy with the destination kept paused after RUN: the pages come in
 * the background; once END is through both VMs are the same. */
TEST(postcopy_paused_dest_same_vm)
{
	struct minivm s, d;
	struct ferry_mig_info is, id;

	need_uffd();
	minivm_init(&s, 64 * MB, 32 * MB, 0, true, false);
	minivm_init(&d, 64 * MB, 32 * MB, 0, false, false);
	both(&s, &d, "postcopy-ram");
	minivm_wait_pages(&s, 4096);
	run_postcopy(&s, &d, &is, &id);
	ASSERT_EQ(minivm_state(&d), FERRY_RUN_PAUSED);
	ASSERT_EQ_U64(minivm_digest(&d), minivm_digest(&s));
	ASSERT_EQ_U64(minivm_verify(&d), 0);
	ASSERT_EQ_U64(d.dev.pages, s.dev.pages);
	ASSERT_GT(is.downtime_ns, 0);
	ASSERT_GT(is.postcopy_bytes, 0);
	minivm_free(&s);
	minivm_free(&d);
}

/* The destination runs at RUN, its writer faulting on missing pages: the
 * fault thread asks for them, they come ahead of the background, every
 * page ends whole. Done twice: main stream and preempt channel. */
static void running_dest(bool preempt)
{
	struct minivm s, d;
	struct ferry_mig_info is, id;

	need_uffd();
	minivm_init(&s, 64 * MB, 64 * MB, 0, true, false);
	minivm_init(&d, 64 * MB, 64 * MB, 0, false, true);
	both(&s, &d, "postcopy-ram");
	if (preempt)
		both(&s, &d, "postcopy-preempt");
	/* Fill all of RAM before the switch, so the writer on the other
	 * side needs pages that have not come yet. */
	minivm_wait_pages(&s, 64 * MB / MINIVM_PAGE);
	run_postcopy(&s, &d, &is, &id);
	ASSERT_EQ(d.starts, 1);
	ASSERT_EQ(s.starts, 0);
	ASSERT_GT(id.postcopy_faults, 0);
	ASSERT_GT(id.postcopy_requests, 0);
	ASSERT_GT(is.postcopy_requests, 0);
	ASSERT(id.postcopy_lat_max_us >= id.postcopy_lat_p50_us);
	minivm_wait_pages(&d, 1000);
	minivm_park(&d);
	ASSERT_EQ_U64(minivm_verify(&d), 0);
	ASSERT_GE(d.dev.pages, s.dev.pages + 1000);
	minivm_free(&s);
	minivm_free(&d);
}

TEST(postcopy_running_dest_faults)
{
	running_dest(false);
}

TEST(postcopy_preempt_running_dest)
{
	running_dest(true);
}

/* The destination fails loading the package, before RUN: it never ran
 * the VM, it says so, and the source resumes. */
TEST(postcopy_fail_before_run_resumes_source)
{
	struct minivm s, d;
	struct ferry_error err = { 0 };
	struct ferry_mig_info is, id;
	const char *uri;

	need_uffd();
	minivm_init(&s, 32 * MB, 16 * MB, 0, true, false);
	minivm_init(&d, 32 * MB, 16 * MB, 0, false, true);
	both(&s, &d, "postcopy-ram");
	minivm_wait_pages(&s, 1024);
	ASSERT_OK_E(ferry_mig_inject_fault(d.mig, "fail-package", &err), err);
	uri = incoming(&d, "pc");
	ASSERT_OK_E(ferry_mig_start(s.mig, uri, &err), err);
	ASSERT_OK_E(ferry_mig_start_postcopy(s.mig, &err), err);
	is = minivm_wait(&s, 60000);
	id = minivm_wait(&d, 60000);
	ASSERT_EQ(is.status, FERRY_MIG_FAILED);
	ASSERT_EQ(id.status, FERRY_MIG_FAILED);
	ASSERT_CONTAINS(is.error, "fail-package");
	ASSERT_EQ(minivm_state(&s), FERRY_RUN_RUNNING);
	ASSERT_EQ(d.starts, 0);
	minivm_wait_pages(&s, 100);  /* it really runs */
	minivm_free(&s);
	minivm_free(&d);
}

/* postcopy-ram on the source only: refused at setup, the source runs on;
 * and migrate-start-postcopy without the capability is refused. */
TEST(postcopy_capability_both_sides)
{
	struct minivm s, d;
	struct ferry_error err = { 0 };
	struct ferry_mig_info is;
	const char *uri;

	need_uffd();
	minivm_init(&s, 16 * MB, 8 * MB, 0, true, false);
	minivm_init(&d, 16 * MB, 8 * MB, 0, false, true);
	ASSERT_ERR(ferry_mig_start_postcopy(s.mig, &err), -EINVAL);
	minivm_set(&s, "postcopy-ram", 1);
	uri = incoming(&d, "pc");
	ASSERT_OK_E(ferry_mig_start(s.mig, uri, &err), err);
	is = minivm_wait(&s, 60000);
	minivm_wait(&d, 60000);
	ASSERT_EQ(is.status, FERRY_MIG_FAILED);
	ASSERT_CONTAINS(is.error, "postcopy-ram");
	ASSERT_EQ(minivm_state(&s), FERRY_RUN_RUNNING);
	minivm_free(&s);
	minivm_free(&d);
}

/* Postcopy advised on both sides but never switched to: precopy converges,
 * and the fault thread the destination started at ADVISE is gone with
 * the migration (it kept a pool thread and the userfaultfd before). */
TEST(postcopy_advised_unswitched_leaves_no_thread)
{
	struct minivm s, d;
	struct ferry_error err = { 0 };
	const char *uri;

	need_uffd();
	minivm_init(&s, 16 * MB, 1 * MB, 1 * MB, true, false);
	minivm_init(&d, 16 * MB, 1 * MB, 1 * MB, false, true);
	both(&s, &d, "postcopy-ram");
	uri = incoming(&d, "pc-unswitched");
	ASSERT_OK_E(ferry_mig_start(s.mig, uri, &err), err);
	ASSERT_EQ(minivm_wait(&s, 60000).status, FERRY_MIG_COMPLETED);
	ASSERT_EQ(minivm_wait(&d, 60000).status, FERRY_MIG_COMPLETED);
	ASSERT_EQ(minivm_state(&d), FERRY_RUN_RUNNING);
	ASSERT_EQ(ferry__pool_busy(d.ctx), 0);
	minivm_free(&s);
	minivm_free(&d);
}

/* On a link capped below the dirty rate precopy cannot converge; with
 * postcopy-after-passes the source switches by itself and completes. */
TEST(postcopy_auto_switch_capped_link)
{
	struct minivm s, d;
	struct ferry_error err = { 0 };
	struct ferry_mig_info is, id;
	const char *uri;

	need_uffd();
	minivm_init(&s, 64 * MB, 32 * MB, 0, true, false);
	minivm_init(&d, 64 * MB, 32 * MB, 0, false, false);
	both(&s, &d, "postcopy-ram");
	minivm_set(&s, "multifd", 0);
	minivm_set(&s, "max-bandwidth", 48 * MB);
	minivm_set(&s, "downtime-limit", 10);
	minivm_set(&s, "postcopy-after-passes", 2);
	uri = incoming(&d, "pc");
	ASSERT_OK_E(ferry_mig_start(s.mig, uri, &err), err);
	is = minivm_wait(&s, 120000);
	id = minivm_wait(&d, 120000);
	ASSERT_EQ(is.status, FERRY_MIG_COMPLETED);
	ASSERT_EQ(id.status, FERRY_MIG_COMPLETED);
	ASSERT(minivm_logged(&s, "out:postcopy-active"));
	ASSERT_EQ_U64(minivm_digest(&d), minivm_digest(&s));
	ASSERT_EQ_U64(minivm_verify(&d), 0);
	minivm_free(&s);
	minivm_free(&d);
}

/* ---- the destination's state machine and placement, driven directly ---- */

struct pcd_fixture {
	uint8_t *mem;
	size_t size;
	struct ferry_ram *ram;
	struct ferry_pcd *pcd;
	struct ferry_ctx *ctx;        /* its pool runs the fault thread */
	unsigned requests;
};

static int count_request(void *opaque, const char *block, uint64_t start,
			 uint32_t len)
{
	(void)block; (void)start; (void)len;
	__atomic_fetch_add(&((struct pcd_fixture *)opaque)->requests, 1,
			   __ATOMIC_RELAXED);
	return 0;
}

static void fixture(struct pcd_fixture *f, size_t size)
{
	struct ferry_error err = { 0 };
	struct ferry_ram_block b;

	f->size = size;
	f->mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ASSERT(f->mem != MAP_FAILED);
	b = (struct ferry_ram_block){ "ram0", f->mem, size, 4096 };
	f->ram = ferry_ram_new(&b, 1, NULL, NULL, &err);
	ASSERT_PTR(f->ram);
	f->pcd = ferry__pcd_new(f->ram, (uint64_t)sysconf(_SC_PAGESIZE), 4096,
				NULL, NULL, &err);
	ASSERT_PTR(f->pcd);
	f->ctx = ferry_ctx_new(NULL);
	ASSERT_PTR(f->ctx);
}

static void fixture_free(struct pcd_fixture *f)
{
	ferry__pcd_free(f->pcd);
	ferry_ctx_free(f->ctx);
	ferry_ram_free(f->ram);
	munmap(f->mem, f->size);
}

static int discard1(struct pcd_fixture *f, uint64_t s, uint64_t l,
		    uint64_t s2, uint64_t l2, uint32_t n, struct ferry_error *err)
{
	uint8_t r[32];

	for (int i = 0; i < 8; i++) {
		r[i] = (uint8_t)(s >> (56 - 8 * i));
		r[8 + i] = (uint8_t)(l >> (56 - 8 * i));
		r[16 + i] = (uint8_t)(s2 >> (56 - 8 * i));
		r[24 + i] = (uint8_t)(l2 >> (56 - 8 * i));
	}
	ferry_error_clear(err);
	return ferry__pcd_discard(f->pcd, "ram0", n, r, err);
}

/* Every command out of order is refused with both states named; discard
 * ranges are checked before anything is dropped. */
TEST(postcopy_dest_state_machine)
{
	struct pcd_fixture f = { 0 };
	struct ferry_error err = { 0 };

	need_uffd();
	fixture(&f, 1 * MB);
	/* Page sizes must match. */
	ASSERT_NULL(ferry__pcd_new(f.ram, 4096, 8192, NULL, NULL, &err));
	ASSERT_CONTAINS(err.msg, "target page size");
	ferry_error_clear(&err);
	/* ADVISE: RUN and END are out of order. */
	ASSERT_ERR(ferry__pcd_move(f.pcd, FERRY_PC_LISTENING, FERRY_PC_RUNNING,
				   "POSTCOPY_RUN", &err), -EPROTO);
	ASSERT_CONTAINS(err.msg, "state advise");
	ASSERT_CONTAINS(err.msg, "state listening");
	ferry_error_clear(&err);
	/* Discards: outside, empty, unaligned, overlapping; none applies. */
	memset(f.mem, 0xab, 1 * MB);
	ASSERT_ERR(discard1(&f, 1 * MB, 4096, 0, 0, 1, &err), -ERANGE);
	ASSERT_CONTAINS(err.msg, "outside");
	ASSERT_ERR(discard1(&f, 4096, 0, 0, 0, 1, &err), -ERANGE);
	ASSERT_ERR(discard1(&f, 100, 4096, 0, 0, 1, &err), -ERANGE);
	ASSERT_ERR(discard1(&f, 1 * MB - 4096, 8192, 0, 0, 1, &err), -ERANGE);
	ASSERT_ERR(discard1(&f, 0, 8192, 4096, 4096, 2, &err), -EINVAL);
	ASSERT_CONTAINS(err.msg, "overlaps");
	ASSERT_EQ(f.mem[0], 0xab);
	ASSERT_EQ(f.mem[4096], 0xab);
	/* A good one drops the pages. */
	ASSERT_OK_E(discard1(&f, 0, 8192, 65536, 4096, 2, &err), err);
	ASSERT_EQ(f.mem[0], 0);
	ASSERT_EQ(f.mem[65536], 0);
	ASSERT_EQ(f.mem[8192], 0xab);
	/* LISTEN: discards end, RUN is next. */
	ASSERT_OK_E(ferry__pcd_listen(f.pcd, f.ctx, count_request, &f, &err), err);
	ASSERT_EQ(ferry__pcd_state(f.pcd), FERRY_PC_LISTENING);
	ASSERT_ERR(discard1(&f, 0, 4096, 0, 0, 1, &err), -EPROTO);
	ASSERT_CONTAINS(err.msg, "state listening");
	ferry_error_clear(&err);
	ASSERT_ERR(ferry__pcd_listen(f.pcd, f.ctx, count_request, &f, &err), -EPROTO);
	ferry_error_clear(&err);
	ASSERT_ERR(ferry__pcd_move(f.pcd, FERRY_PC_RUNNING, FERRY_PC_END,
				   "POSTCOPY_END", &err), -EPROTO);
	ASSERT_CONTAINS(err.msg, "state listening");
	ASSERT_CONTAINS(err.msg, "state running");
	ASSERT_OK_E(ferry__pcd_move(f.pcd, FERRY_PC_LISTENING, FERRY_PC_RUNNING,
				    "POSTCOPY_RUN", &err), err);
	ASSERT_OK_E(ferry__pcd_move(f.pcd, FERRY_PC_RUNNING, FERRY_PC_END,
				    "POSTCOPY_END", &err), err);
	ferry__pcd_finish(f.pcd);
	fixture_free(&f);
}

struct placer {
	struct pcd_fixture *f;
	uint8_t fill;
	int ret;
	unsigned run;   /* 0: page by page; else runs of this many (the
			   listen thread's background pages) */
};

static void *place_all(void *arg)
{
	struct placer *p = arg;
	static __thread uint8_t pages[FERRY_PC_RUN_PAGES * 4096];
	size_t step = p->run ? p->run * 4096ul : 4096;

	memset(pages, p->fill, sizeof(pages));
	for (size_t off = 0; off < p->f->size && !p->ret; off += step) {
		size_t n = (p->f->size - off) / 4096;

		if (!p->run)
			p->ret = ferry__pcd_place(p->f->pcd, 0, off, pages, NULL);
		else
			p->ret = ferry__pcd_place_run(p->f->pcd, 0, off,
						      n < p->run ? (unsigned)n :
						      p->run, pages, NULL);
	}
	return NULL;
}

static void *touch_all(void *arg)
{
	struct pcd_fixture *f = arg;
	uintptr_t bad = 0;

	/* Backwards, to meet the placers half way: some pages fault. */
	for (size_t off = f->size; off > 0; off -= 4096)
		bad += f->mem[off - 4096] != 0x11 && f->mem[off - 4096] != 0x22;
	return (void *)bad;
}

/* Two placers race over every page (the background in runs of 64 pages
 * but the last, and requests page by page), a third thread faults on
 * them: each page is placed exactly once, whole, and the faulting thread
 * is always woken. */
TEST(postcopy_place_exactly_once)
{
	struct pcd_fixture f = { 0 };
	struct ferry_error err = { 0 };
	struct placer a = { &f, 0x11, 0, 0 }, b = { &f, 0x22, 0, 64 };
	struct ferry_pcd_stats st;
	pthread_t ta, tb, tt;
	void *bad;
	size_t pages = 8 * MB / 4096 + 3;   /* a last run that is short */

	need_uffd();
	fixture(&f, 8 * MB + 3 * 4096);
	ASSERT_OK_E(ferry__pcd_listen(f.pcd, f.ctx, count_request, &f, &err), err);
	ASSERT_OK(pthread_create(&tt, NULL, touch_all, &f));
	ASSERT_OK(pthread_create(&ta, NULL, place_all, &a));
	ASSERT_OK(pthread_create(&tb, NULL, place_all, &b));
	pthread_join(ta, NULL);
	pthread_join(tb, NULL);
	pthread_join(tt, &bad);
	ASSERT_OK(a.ret);
	ASSERT_OK(b.ret);
	ASSERT_EQ((uintptr_t)bad, 0);
	ferry__pcd_get_stats(f.pcd, &st);
	ASSERT_EQ_U64(st.placed, pages);
	ASSERT_EQ_U64(st.duplicates, pages);
	/* Whole pages: each one all 0x11 or all 0x22. */
	for (size_t off = 0; off < f.size; off += 4096)
		for (size_t i = 1; i < 4096; i++)
			if (f.mem[off + i] != f.mem[off])
				FAIL("page at 0x%zx is torn", off);
	ferry__pcd_move(f.pcd, FERRY_PC_LISTENING, FERRY_PC_RUNNING, "RUN", NULL);
	ferry__pcd_move(f.pcd, FERRY_PC_RUNNING, FERRY_PC_END, "END", NULL);
	ferry__pcd_finish(f.pcd);
	fixture_free(&f);
}

/* ---- recovery --------------------------------------------------------- */

static struct ferry_mig_info wait_status(struct minivm *vm,
					 enum ferry_mig_status st)
{
	struct ferry_mig_info i = { .size = sizeof(i) };

	for (int k = 0; k < 3000; k++) {
		ferry_mig_query(vm->mig, &i);
		if (i.status == st)
			return i;
		usleep(10000);
	}
	FAIL("status %s, waited for %s (%s)", ferry_mig_status_name(i.status),
	     ferry_mig_status_name(st), i.error);
}

static void recover(struct minivm *s, struct minivm *d, const char *name)
{
	struct ferry_error err = { 0 };
	const char *uri = minivm_uri(name);

	ASSERT_OK_E(ferry_mig_recover(d->mig, uri, &err), err);
	ASSERT_OK_E(ferry_mig_resume(s->mig, uri, &err), err);
}

/* The link breaks during postcopy (reset, then a stalled destination):
 * both sides pause, the source VM stays stopped, nothing is lost; each
 * time migrate-recover and migrate resume bring it back, and the VM ends
 * whole. */
static void break_and_recover(const char *fault, bool on_source, bool preempt)
{
	struct minivm s, d;
	struct ferry_error err = { 0 };
	struct ferry_mig_info is, id;
	const char *uri;

	need_uffd();
	minivm_init(&s, 64 * MB, 64 * MB, 0, true, false);
	minivm_init(&d, 64 * MB, 64 * MB, 0, false, true);
	both(&s, &d, "postcopy-ram");
	if (preempt)
		both(&s, &d, "postcopy-preempt");
	minivm_set(&s, "peer-timeout", 1000);
	minivm_set(&d, "peer-timeout", 1000);
	/* Slow enough that the breaks come in the middle of postcopy. */
	minivm_set(&s, "max-bandwidth", 24 * MB);
	minivm_wait_pages(&s, 64 * MB / MINIVM_PAGE);
	ASSERT_OK_E(ferry_mig_inject_fault(on_source ? s.mig : d.mig, fault,
					   &err), err);
	uri = incoming(&d, "pc");
	ASSERT_OK_E(ferry_mig_start(s.mig, uri, &err), err);
	ASSERT_OK_E(ferry_mig_start_postcopy(s.mig, &err), err);
	for (int round = 0; round < 2; round++) {
		uint64_t pages;

		is = wait_status(&s, FERRY_MIG_POSTCOPY_PAUSED);
		id = wait_status(&d, FERRY_MIG_POSTCOPY_PAUSED);
		ASSERT(is.error[0] && id.error[0]);
		/* The source VM stays stopped; cont is not the engine's to
		 * allow, and a cancel is refused. */
		ASSERT_EQ(minivm_state(&s), FERRY_RUN_FINISH_MIGRATE);
		pages = __atomic_load_n(&s.dev.pages, __ATOMIC_ACQUIRE);
		usleep(50000);
		ASSERT_EQ_U64(__atomic_load_n(&s.dev.pages, __ATOMIC_ACQUIRE),
			      pages);
		ASSERT_ERR(ferry_mig_cancel(s.mig, &err), -EBUSY);
		ferry_error_clear(&err);
		recover(&s, &d, round ? "r2" : "r1");
		if (!round) {
			wait_status(&s, FERRY_MIG_POSTCOPY_ACTIVE);
			wait_status(&d, FERRY_MIG_POSTCOPY_ACTIVE);
			ASSERT_OK_E(ferry_mig_inject_fault(on_source ? s.mig : d.mig,
							   fault, &err), err);
		}
	}
	is = minivm_wait(&s, 60000);
	id = minivm_wait(&d, 60000);
	if (is.status != FERRY_MIG_COMPLETED || id.status != FERRY_MIG_COMPLETED)
		FAIL("source %s (%s), destination %s (%s)",
		     ferry_mig_status_name(is.status), is.error,
		     ferry_mig_status_name(id.status), id.error);
	ASSERT(minivm_logged(&s, "out:postcopy-recover"));
	ASSERT(minivm_logged(&d, "in:postcopy-recover"));
	ASSERT_EQ(minivm_state(&s), FERRY_RUN_POSTMIGRATE);
	minivm_wait_pages(&d, 1000);
	minivm_park(&d);
	ASSERT_EQ_U64(minivm_verify(&d), 0);
	minivm_free(&s);
	minivm_free(&d);
}

TEST(postcopy_link_cut_recovered_twice)
{
	break_and_recover("postcopy-cut", true, false);
}

/* The same with the preempt channel: it comes back with the recovery. */
TEST(postcopy_preempt_link_cut_recovered_twice)
{
	break_and_recover("postcopy-cut", true, true);
}

TEST(postcopy_dest_stalled_recovered_twice)
{
	break_and_recover("stall-postcopy", false, false);
}

/* ---- the commands' places in the stream ----------------------------------- */

static int accept_all(void *opaque, const struct ferry_cmd_msg *m,
		      struct ferry_error *err)
{
	(void)opaque; (void)m; (void)err;
	return 0;
}

/* A stream of @ncmd top-level commands (a PACKAGED one holds @inner). */
static int load_cmds(const uint16_t *cmds, unsigned ncmd, uint16_t inner,
		     struct ferry_error *err)
{
	struct ferry_ctx *ctx = ferry_ctx_new(NULL);
	struct ferry_chan *c = ferry_chan_new_mem_writer(0), *r;
	struct ferry_load_opts opts = { .size = sizeof(opts),
					.on_command = accept_all };
	struct ferry_save *s = ferry_save_begin(ctx, c, NULL);
	const uint8_t *d;
	size_t n;
	int rc;

	ASSERT_PTR(s);
	for (unsigned i = 0; i < ncmd; i++) {
		if (cmds[i] == FERRY_CMD_PACKAGED) {
			struct ferry_chan *pkg = ferry_chan_new_mem_writer(0);
			struct ferry_record_io pio = { .chan = pkg };
			uint8_t b[2] = { (uint8_t)(inner >> 8), (uint8_t)inner };

			ASSERT_OK(ferry_record_write(&pio, FERRY_REC_COMMAND, b, 2, NULL));
			ASSERT_OK(ferry_record_write(&pio, FERRY_REC_EOF, NULL, 0, NULL));
			d = ferry_chan_mem_data(pkg, &n);
			ASSERT_OK(ferry_save_command(s, cmds[i], d, n, NULL));
			ferry_chan_free(pkg);
		} else {
			uint8_t st[4] = { 0 };
			size_t len = cmds[i] == FERRY_CMD_POSTCOPY_END ? 4 : 0;

			ASSERT_OK(ferry_save_command(s, cmds[i], st, len, NULL));
		}
	}
	ASSERT_OK(ferry_save_complete(s, NULL));
	ferry_save_end(s);
	d = ferry_chan_mem_data(c, &n);
	r = ferry_chan_new_mem_reader(d, n);
	rc = ferry_load(ctx, r, &opts, err);
	ferry_chan_free(r);
	ferry_chan_free(c);
	ferry_ctx_free(ctx);
	return rc;
}

/* RUN belongs inside the package, LISTEN before it, END after RUN. */
TEST(postcopy_commands_in_their_places)
{
	struct ferry_error err = { 0 };
	const uint16_t run_top[] = { FERRY_CMD_POSTCOPY_RUN };
	const uint16_t listen_in[] = { FERRY_CMD_PACKAGED };
	const uint16_t end_early[] = { FERRY_CMD_POSTCOPY_END };
	const uint16_t good[] = { FERRY_CMD_POSTCOPY_LISTEN, FERRY_CMD_PACKAGED };

	ASSERT_ERR(load_cmds(run_top, 1, 0, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "POSTCOPY_RUN outside the package");
	ferry_error_clear(&err);
	ASSERT_ERR(load_cmds(listen_in, 1, FERRY_CMD_POSTCOPY_LISTEN, &err),
		   -EBADMSG);
	ASSERT_CONTAINS(err.msg, "POSTCOPY_LISTEN inside the package");
	ferry_error_clear(&err);
	ASSERT_ERR(load_cmds(end_early, 1, 0, &err), -EBADMSG);
	ASSERT_CONTAINS(err.msg, "POSTCOPY_END before postcopy runs");
	ferry_error_clear(&err);
	ASSERT_OK_E(load_cmds(good, 2, FERRY_CMD_POSTCOPY_RUN, &err), err);
}

/* The destination's RAM is not fresh (a VMM writes its guest image at
 * boot), and its prepopulate helpers fault in what the source announced -
 * still at work when an early switch comes: every page postcopy has to
 * send must be dropped before the guest may touch it, and stay dropped,
 * or a stale (or prepopulated zero) copy would stay. Once with some
 * precopy first, once switching at once. */
static void stale_dest(bool at_once)
{
	struct minivm s, d;
	struct ferry_error err = { 0 };
	struct ferry_mig_info is, id;
	uint64_t size = 128 * MB;
	const char *uri;

	need_uffd();
	minivm_init(&s, size, size, 0, true, false);
	minivm_init(&d, size, size, 0, false, false);
	both(&s, &d, "postcopy-ram");
	memset(d.mem, 0xee, size / 2);
	minivm_wait_pages(&s, size / MINIVM_PAGE);
	if (!at_once) {
		/* Some pages land, are dirtied again, and must go. */
		minivm_set(&s, "max-bandwidth", 256 * MB);
		minivm_set(&s, "postcopy-after-ms", 200);
	}
	uri = incoming(&d, "pc");
	ASSERT_OK_E(ferry_mig_start(s.mig, uri, &err), err);
	if (at_once)
		ASSERT_OK_E(ferry_mig_start_postcopy(s.mig, &err), err);
	is = minivm_wait(&s, 60000);
	id = minivm_wait(&d, 60000);
	if (is.status != FERRY_MIG_COMPLETED || id.status != FERRY_MIG_COMPLETED)
		FAIL("source %s (%s), destination %s (%s)",
		     ferry_mig_status_name(is.status), is.error,
		     ferry_mig_status_name(id.status), id.error);
	ASSERT(minivm_logged(&s, "out:postcopy-active"));
	ASSERT_EQ_U64(minivm_verify(&d), 0);
	ASSERT_EQ_U64(minivm_digest(&d), minivm_digest(&s));
	minivm_free(&s);
	minivm_free(&d);
}

TEST(postcopy_stale_dest_pages_dropped)
{
	stale_dest(false);
	stale_dest(true);
}

/* A device the source does not send: the destination finds it at RUN,
 * before it runs anything, and the source resumes. */
TEST(postcopy_missing_device_refused_before_run)
{
	static const struct ferry_vms_field f[] = {
		FERRY_VMS_U64(struct minivm_dev, pages), FERRY_VMS_END_OF_LIST };
	static const struct ferry_vmsd extra = { .name = "only-here",
		.version = 1, .minimum_version = 1, .fields = f };
	struct minivm_dev obj = { 0 };
	struct minivm s, d;
	struct ferry_error err = { 0 };
	struct ferry_mig_info is, id;
	const char *uri;

	need_uffd();
	minivm_init(&s, 32 * MB, 16 * MB, 0, true, false);
	minivm_init(&d, 32 * MB, 16 * MB, 0, false, true);
	ASSERT_OK_E(ferry_register_vmstate(d.ctx, &extra, 0, &obj, &err), err);
	both(&s, &d, "postcopy-ram");
	minivm_wait_pages(&s, 1024);
	uri = incoming(&d, "pc");
	ASSERT_OK_E(ferry_mig_start(s.mig, uri, &err), err);
	ASSERT_OK_E(ferry_mig_start_postcopy(s.mig, &err), err);
	is = minivm_wait(&s, 60000);
	id = minivm_wait(&d, 60000);
	ASSERT_EQ(is.status, FERRY_MIG_FAILED);
	ASSERT_EQ(id.status, FERRY_MIG_FAILED);
	ASSERT_CONTAINS(id.error, "no state in the postcopy package");
	ASSERT_CONTAINS(is.error, "only-here");
	ASSERT_EQ(d.starts, 0);
	ASSERT_EQ(minivm_state(&s), FERRY_RUN_RUNNING);
	minivm_wait_pages(&s, 100);
	minivm_free(&s);
	minivm_free(&d);
}

/* Both sides paused, nobody recovers: freeing the engines (the VMs going
 * away) ends every thread, on both sides, without a hang. */
TEST(postcopy_free_while_paused)
{
	struct minivm s, d;
	struct ferry_error err = { 0 };
	const char *uri;

	need_uffd();
	minivm_init(&s, 64 * MB, 64 * MB, 0, true, false);
	minivm_init(&d, 64 * MB, 64 * MB, 0, false, true);
	both(&s, &d, "postcopy-ram");
	minivm_set(&s, "max-bandwidth", 24 * MB);
	minivm_wait_pages(&s, 64 * MB / MINIVM_PAGE);
	ASSERT_OK_E(ferry_mig_inject_fault(s.mig, "postcopy-cut", &err), err);
	uri = incoming(&d, "pc");
	ASSERT_OK_E(ferry_mig_start(s.mig, uri, &err), err);
	ASSERT_OK_E(ferry_mig_start_postcopy(s.mig, &err), err);
	wait_status(&s, FERRY_MIG_POSTCOPY_PAUSED);
	wait_status(&d, FERRY_MIG_POSTCOPY_PAUSED);
	/* The destination's writer may wait on a missing page; it is
	 * stopped by minivm_free after the engine (which lets it go). */
	ferry_mig_free(d.mig);
	d.mig = NULL;
	ferry_mig_free(s.mig);
	s.mig = NULL;
	minivm_free(&s);
	minivm_free(&d);
}

/* ---- the context's thread pool (lib/pool.c) ----------------------------- */

struct pool_probe {
	int release;       /* atomic: the long job may end */
	int ran;           /* atomic */
};

static void long_job(void *arg)
{
	struct pool_probe *p = arg;

	__atomic_fetch_add(&p->ran, 1, __ATOMIC_RELAXED);
	while (!__atomic_load_n(&p->release, __ATOMIC_ACQUIRE))
		usleep(200);
}

static void short_job(void *arg)
{
	__atomic_fetch_add(&((struct pool_probe *)arg)->ran, 1,
			   __ATOMIC_RELEASE);
}

/* A job that runs for ever (a fault thread until every page is in) never
 * holds up the next one: each job of a batch gets a thread of its own. */
TEST(pool_long_jobs_each_get_a_thread)
{
	struct ferry_error err = { 0 };
	struct ferry_ctx *ctx = ferry_ctx_new(NULL);
	struct pool_probe lp = { 0 }, sp = { 0 };
	void *la = &lp, *sa = &sp;
	struct ferry__pool_batch *lb, *sb;
	double end = now_ms() + 10000;

	ASSERT_PTR(ctx);
	ASSERT_OK_E(ferry__pool_reserve_idle(ctx, 1, &err), err);
	ASSERT_PTR(lb = ferry__pool_submit(ctx, 1, long_job, &la, &err));
	/* The one idle thread is taken: this one must not queue behind it. */
	ASSERT_PTR(sb = ferry__pool_submit(ctx, 1, short_job, &sa, &err));
	while (!__atomic_load_n(&sp.ran, __ATOMIC_ACQUIRE) && now_ms() < end)
		usleep(500);
	ASSERT_EQ(__atomic_load_n(&sp.ran, __ATOMIC_ACQUIRE), 1);
	ferry__pool_wait(ctx, sb);
	__atomic_store_n(&lp.release, 1, __ATOMIC_RELEASE);
	ferry__pool_wait(ctx, lb);
	ASSERT_EQ(lp.ran, 1);
	ASSERT_ERR(ferry__pool_reserve_idle(ctx, FERRY__POOL_MAX + 1, &err),
		   -EAGAIN);
	/* More jobs than the pool may have threads: the rest wait for one
	 * (a source saving more devices than that), they do not fail. */
	{
		void *args[FERRY__POOL_MAX + 4];
		struct pool_probe many = { 0 };

		for (unsigned i = 0; i < FERRY__POOL_MAX + 4; i++)
			args[i] = &many;
		ASSERT_PTR(sb = ferry__pool_submit(ctx, FERRY__POOL_MAX + 4,
						   short_job, args, &err));
		ferry__pool_wait(ctx, sb);
		ASSERT_EQ(__atomic_load_n(&many.ran, __ATOMIC_ACQUIRE),
			  FERRY__POOL_MAX + 4);
	}
	ferry_ctx_free(ctx);
}

/* The switch windows' scheduling (ferry__pc_sched_raise): raised, raised
 * again without losing what to put back, and put back exactly. */
struct sched_probe {
	int policy[5], nice[5];
	int child_policy, child_nice;  /* a thread started while raised */
	bool capable;
};

static void *sched_child(void *arg)
{
	struct sched_probe *sp = arg;

	sp->child_policy = sched_getscheduler(0);
	errno = 0;
	sp->child_nice = getpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid));
	return NULL;
}

/* The kernel's word (glibc's pthread_getschedparam may answer from a
 * cache that sched_setscheduler does not update); without the
 * reset-on-fork flag, which the child's policy shows the effect of. */
static void sched_now(struct sched_probe *sp, int i)
{
	sp->policy[i] = sched_getscheduler(0) & ~0x40000000;
	errno = 0;
	sp->nice[i] = getpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid));
}

static void *sched_main(void *arg)
{
	struct sched_probe *sp = arg;
	struct ferry__pc_sched s = { 0 };
	struct sched_param fifo = { .sched_priority = 1 }, other = { 0 };

	/* What this thread may do decides what to expect. */
	sp->capable = !pthread_setschedparam(pthread_self(), SCHED_FIFO, &fifo);
	if (sp->capable)
		pthread_setschedparam(pthread_self(), SCHED_OTHER, &other);
	sched_now(sp, 0);
	ferry__pc_sched_raise(&s, true);
	sched_now(sp, 1);
	{
		pthread_t c;

		if (!pthread_create(&c, NULL, sched_child, sp))
			pthread_join(c, NULL);
	}
	ferry__pc_sched_raise(&s, true);   /* idempotent */
	ferry__pc_sched_restore(&s);
	sched_now(sp, 2);
	ferry__pc_sched_raise(&s, false);
	sched_now(sp, 3);
	ferry__pc_sched_restore(&s);
	ferry__pc_sched_restore(&s);       /* nothing left to put back */
	sched_now(sp, 4);
	return NULL;
}

TEST(postcopy_switch_priority_raised_and_restored)
{
	struct sched_probe sp = { 0 };
	pthread_t t;

	ASSERT_EQ(pthread_create(&t, NULL, sched_main, &sp), 0);
	pthread_join(t, NULL);
	ASSERT_EQ(sp.policy[0], SCHED_OTHER);
	/* SCHED_FIFO exactly when this thread may have it. */
	ASSERT_EQ(sp.policy[1], sp.capable ? SCHED_FIFO : SCHED_OTHER);
	/* A thread started inside the window (a VMM's vCPU at vm_start, say)
	 * does not inherit it: SCHED_OTHER at nice 0 (or, nothing raised,
	 * what its creator had). */
	ASSERT_EQ(sp.child_policy, SCHED_OTHER);
	ASSERT_EQ(sp.child_nice, sp.capable ? 0 : sp.nice[0]);
	if (sp.capable) {
		ASSERT_EQ(sp.policy[3], SCHED_OTHER);
		ASSERT_EQ(sp.nice[3], -10);
	}
	for (int i = 2; i <= 4; i += 2) {
		ASSERT_EQ(sp.policy[i], sp.policy[0]);
		ASSERT_EQ(sp.nice[i], sp.nice[0]);
	}
}
