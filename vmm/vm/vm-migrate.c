/*
 * vmm/vm/vm-migrate.c - outgoing migration of the reference VM.
 *
 * One migration thread per migration: precopy rounds while the guest runs,
 * then the switchover under vm->lock (pause, final state, EOF). A failure at
 * any point before the stream is complete resumes the guest if it was
 * running, so the source carries on exactly as before; the destination
 * (or the half-written file) is simply abandoned.
 *
 * Status transitions are checked against a table and published with a
 * MIGRATION event; the terminal status is published only after the stream
 * is closed and cleanup has run.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "ferry/multifd.h"
#include "control/control.h"
#include "vm/vm-internal.h"

/* Bytes per PART section: small enough that cancel, rate limiting and the
 * convergence check react quickly, large enough to amortise a section. */
#define ROUND_BUDGET (16ull << 20)
/* A pass "still shrinks the rest" if it leaves less than this share of the
 * previous pass's remainder (percent). */
#define SHRINK_PCT 80
/* Give up waiting for the destination's verdict after this long. */
#define SHUT_TIMEOUT_MS 120000
/* Most passes before switching over even if the rest still shrinks. */
#define MAX_SHRINKING_PASSES 30

const char *const mig_phase_names[MIG_PHASE__MAX] = {
	[MIG_PHASE_FINAL_SYNC] = "final-sync",
	[MIG_PHASE_REMAINING_RAM] = "remaining-ram",
	[MIG_PHASE_DEVICE_SAVE] = "device-save",
	[MIG_PHASE_TRANSFER] = "transfer",
	[MIG_PHASE_DEVICE_LOAD] = "device-load",
	[MIG_PHASE_RESUME] = "resume",
};

void mig_params_default(struct mig_params *p)
{
	*p = (struct mig_params){
		.auto_converge = false,
		.multifd = true,
		.return_path = true,
		.multifd_channels = 2,
		.zstd = false,
		.downtime_limit_ms = 300,
		.max_bandwidth = 0,
		.throttle_initial = 20,
		.throttle_increment = 10,
		.throttle_max = 99,
	};
}

static const char *const mig_names[MIG__MAX] = {
	[MIG_NONE] = "none", [MIG_SETUP] = "setup", [MIG_ACTIVE] = "active",
	[MIG_DEVICE] = "device", [MIG_COMPLETED] = "completed",
	[MIG_FAILED] = "failed", [MIG_CANCELLING] = "cancelling",
	[MIG_CANCELLED] = "cancelled",
};

#define B(s) (1u << (s))
static const unsigned mig_allowed[MIG__MAX] = {
	[MIG_NONE] = B(MIG_SETUP),
	[MIG_SETUP] = B(MIG_ACTIVE) | B(MIG_FAILED) | B(MIG_CANCELLING),
	[MIG_ACTIVE] = B(MIG_DEVICE) | B(MIG_FAILED) | B(MIG_CANCELLING),
	[MIG_DEVICE] = B(MIG_COMPLETED) | B(MIG_FAILED) | B(MIG_CANCELLING),
	[MIG_CANCELLING] = B(MIG_CANCELLED) | B(MIG_FAILED),
	/* Terminal states may start over with a new migration. */
	[MIG_COMPLETED] = B(MIG_SETUP),
	[MIG_FAILED] = B(MIG_SETUP),
	[MIG_CANCELLED] = B(MIG_SETUP),
};
#undef B

const char *mig_status_name(enum mig_status s)
{
	return s < MIG__MAX ? mig_names[s] : "unknown";
}

uint64_t vm_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Caller holds mig_lock. */
static void set_mig_status_locked(struct vm *vm, enum mig_status to)
{
	enum mig_status from = vm->mig_status;

	if (!(mig_allowed[from] & (1u << to))) {
		fprintf(stderr, "ferry vm: invalid migration transition %s -> %s\n",
			mig_status_name(from), mig_status_name(to));
		abort();
	}
	vm->mig_status = to;
	if (to == MIG_COMPLETED || to == MIG_FAILED || to == MIG_CANCELLED)
		vm->mig_end_ns = vm_now_ns();
	vm_trace(vm, "migration %s -> %s", mig_status_name(from),
		 mig_status_name(to));
	if (vm->control) {
		json_t *d = json_pack("{s:s}", "status", mig_status_name(to));
		control_event(vm->control, "MIGRATION", d); /* takes d */
	}
}

/*
 * Move the migration forward unless it was cancelled. A cancel and the
 * migration thread meet here, under mig_lock: either the cancel came first
 * (we refuse to advance and the thread winds down) or the step happened
 * first (and a cancel during DEVICE is refused by vm_migrate_cancel).
 */
static bool mig_advance(struct vm *vm, enum mig_status to)
{
	bool ok;

	pthread_mutex_lock(&vm->mig_lock);
	ok = !vm->mig_cancel;
	if (ok)
		set_mig_status_locked(vm, to);
	pthread_mutex_unlock(&vm->mig_lock);
	return ok;
}

int vm_migrate_cancel(struct vm *vm, struct ferry_error *err)
{
	int r = 0;

	pthread_mutex_lock(&vm->mig_lock);
	switch (vm->mig_status) {
	case MIG_SETUP:
	case MIG_ACTIVE:
		vm->mig_cancel = true;
		set_mig_status_locked(vm, MIG_CANCELLING);
		/* The migration thread may be blocked writing to a destination
		 * that stopped reading: cut the connection so it returns. */
		if (vm->mig_fd >= 0)
			shutdown(vm->mig_fd, SHUT_RDWR);
		if (vm->mig_mf)
			ferry_multifd_cancel(vm->mig_mf, -ECANCELED, "cancelled");
		break;
	case MIG_DEVICE:
		r = ferry_error_set(err, -EBUSY,
			"the migration is switching over and cannot be cancelled");
		break;
	default:
		break; /* nothing to cancel: like QEMU, not an error */
	}
	pthread_mutex_unlock(&vm->mig_lock);
	return r;
}

/* ---- the return path, source side --------------------------------------- */

struct rp_reader {
	struct ferry_record_io io;
	struct ferry_chan *chan;
	pthread_t thread;
	bool live;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool done;                  /* guarded by lock: SHUT or an error */
	struct ferry_rp_msg shut;   /* guarded by lock */
	int err;                    /* guarded by lock */
	char errmsg[FERRY_ERROR_MSG_MAX];
	uint64_t t_shut;            /* source CLOCK_MONOTONIC when SHUT came */
	uint32_t pong;              /* guarded by lock: last PONG value */
};

static void *rp_main(void *arg)
{
	struct rp_reader *rp = arg;

	for (;;) {
		struct ferry_error err = { 0 };
		struct ferry_rp_msg m;
		int r = ferry_rp_recv(&rp->io, &m, &err);

		pthread_mutex_lock(&rp->lock);
		if (r) {
			rp->err = r;
			snprintf(rp->errmsg, sizeof(rp->errmsg), "%s", err.msg);
		} else if (m.type == FERRY_RP_SHUT) {
			rp->shut = m;
			rp->t_shut = vm_now_ns();
		}
		if (r || m.type == FERRY_RP_SHUT) {
			rp->done = true;
			pthread_cond_broadcast(&rp->cond);
			pthread_mutex_unlock(&rp->lock);
			return NULL;
		}
		if (m.type == FERRY_RP_PONG) {
			rp->pong = m.pong;
			pthread_cond_broadcast(&rp->cond);
		}
		pthread_mutex_unlock(&rp->lock);
	}
}

static int rp_start(struct rp_reader *rp, int fd, struct ferry_error *err)
{
	int dfd = dup(fd);

	pthread_mutex_init(&rp->lock, NULL);
	pthread_cond_init(&rp->cond, NULL);
	if (dfd < 0)
		return ferry_error_set(err, -errno, "dup: %s", strerror(errno));
	rp->chan = ferry_chan_new_fd(dfd, FERRY_CHAN_READ, true);
	if (!rp->chan) {
		close(dfd);
		return ferry_error_set(err, -ENOMEM, "out of memory");
	}
	rp->io.chan = rp->chan;
	if (pthread_create(&rp->thread, NULL, rp_main, rp))
		return ferry_error_set(err, -EAGAIN, "cannot start return-path thread");
	rp->live = true;
	return 0;
}

/* Did the destination give up (or vanish) already? */
static bool rp_failed(struct rp_reader *rp, struct ferry_error *err)
{
	bool failed = false;

	if (!rp->live)
		return false;
	pthread_mutex_lock(&rp->lock);
	if (rp->done && (rp->err || rp->shut.status)) {
		failed = true;
		if (rp->err)
			ferry_error_set(err, rp->err, "destination: %s", rp->errmsg);
		else
			ferry_error_set(err, -(int)rp->shut.status, "destination: %s",
					rp->shut.reason);
	}
	pthread_mutex_unlock(&rp->lock);
	return failed;
}

/* Wait for SHUT. 0 if the destination loaded the VM. */
static int rp_wait(struct rp_reader *rp, int timeout_ms, struct ferry_error *err)
{
	struct timespec ts;
	int r = 0;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += timeout_ms / 1000;
	pthread_mutex_lock(&rp->lock);
	while (!rp->done)
		if (pthread_cond_timedwait(&rp->cond, &rp->lock, &ts) == ETIMEDOUT)
			break;
	if (!rp->done)
		r = ferry_error_set(err, -ETIMEDOUT,
			"destination did not confirm the load within %d s",
			timeout_ms / 1000);
	else if (rp->err)
		r = ferry_error_set(err, rp->err,
			"destination closed the return path without confirming "
			"the load (%s)", rp->errmsg);
	else if (rp->shut.status)
		r = ferry_error_set(err, -(int)rp->shut.status,
			"destination failed to load: %s", rp->shut.reason);
	pthread_mutex_unlock(&rp->lock);
	return r;
}

/*
 * Before stopping the guest, let the destination catch up: it answers a
 * PING only once it has loaded everything before it on the main stream,
 * including the last pass's multifd sync point, so pages still sitting in
 * socket buffers or being placed are applied now, while the guest runs,
 * instead of inside the downtime. Best effort: a slow answer only means
 * the switchover starts anyway.
 */
static void rp_drain(struct rp_reader *rp, struct ferry_save *s,
		     struct ferry_chan *c, uint32_t value, int timeout_ms)
{
	uint8_t be[4] = { (uint8_t)(value >> 24), (uint8_t)(value >> 16),
			  (uint8_t)(value >> 8), (uint8_t)value };
	struct timespec ts;

	if (!rp->live || ferry_save_command(s, FERRY_CMD_PING, be, 4, NULL) ||
	    ferry_chan_flush(c))
		return;
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += timeout_ms / 1000;
	pthread_mutex_lock(&rp->lock);
	while (rp->pong != value && !rp->done)
		if (pthread_cond_timedwait(&rp->cond, &rp->lock, &ts) == ETIMEDOUT)
			break;
	pthread_mutex_unlock(&rp->lock);
}

static void rp_stop(struct rp_reader *rp)
{
	if (rp->live) {
		ferry_chan_shutdown(rp->chan);
		pthread_join(rp->thread, NULL);
		rp->live = false;
	}
	ferry_chan_free(rp->chan);
	rp->chan = NULL;
	ferry_record_io_release(&rp->io);
}

/* ---- the outgoing migration --------------------------------------------- */

static uint64_t boot_id_hash(void)
{
	char id[64] = "";
	FILE *f = fopen("/proc/sys/kernel/random/boot_id", "re");

	if (f) {
		if (!fgets(id, sizeof(id), f))
			id[0] = 0;
		fclose(f);
	}
	return XXH3_64bits(id, strlen(id));
}

/* Open the multifd channels: @n more connections to @uri. */
static struct ferry_multifd *multifd_connect(const char *uri,
					     const struct mig_params *p,
					     struct ferry_error *err)
{
	struct ferry_multifd_params mp = {
		.channels = p->multifd_channels,
		.compression = p->zstd ? FERRY_MULTIFD_COMP_ZSTD : FERRY_MULTIFD_COMP_NONE,
		.zstd_level = 1,
	};
	int fds[FERRY_MULTIFD_MAX_CHANNELS];
	struct ferry_multifd *m;
	unsigned i;

	for (i = 0; i < mp.channels; i++) {
		fds[i] = ferry_transport_connect(uri, 10000, err);
		if (fds[i] < 0)
			break;
	}
	if (i < mp.channels) {
		while (i--)
			close(fds[i]);
		ferry_error_prefix(err, "multifd channel: ");
		return NULL;
	}
	m = ferry_multifd_send_new(&mp, fds, err);
	return m;
}

static uint64_t multifd_bytes(struct ferry_multifd *m)
{
	struct ferry_multifd_stats st;
	uint64_t b = 0;

	if (!m)
		return 0;
	ferry_multifd_get_stats(m, &st);
	for (unsigned i = 0; i < st.channels; i++)
		b += st.chan[i].bytes;
	return b;
}

static void publish_progress(struct vm *vm, const struct mig_progress *p)
{
	pthread_mutex_lock(&vm->mig_lock);
	vm->prog = *p;
	pthread_mutex_unlock(&vm->mig_lock);
}

/* Sleep as needed so that @bytes since @t0 stay within @rate bytes/s. */
static void rate_limit(uint64_t rate, uint64_t bytes, uint64_t t0)
{
	uint64_t due_ns, now;

	if (!rate)
		return;
	due_ns = t0 + bytes * 1000000000ull / rate;
	now = vm_now_ns();
	if (due_ns > now) {
		uint64_t d = due_ns - now;
		struct timespec ts = { (time_t)(d / 1000000000ull),
				       (long)(d % 1000000000ull) };
		nanosleep(&ts, NULL);
	}
}

static bool cancel_requested(struct vm *vm)
{
	bool c;

	pthread_mutex_lock(&vm->mig_lock);
	c = vm->mig_cancel;
	pthread_mutex_unlock(&vm->mig_lock);
	return c;
}

/*
 * Precopy until the rest fits the downtime limit and further passes stop
 * shrinking it. Decisions are taken at sync points, when "remaining" is the
 * dirty set of a whole pass; in between, rounds just send.
 */
static int precopy(struct vm *vm, struct ferry_save *s, struct ferry_chan *c,
		   const struct mig_params *p, struct rp_reader *rp,
		   struct mig_progress *prog, struct ferry_error *err)
{
	uint64_t t_start = vm_now_ns(), bytes0 = ferry_chan_offset(c);
	uint64_t last_sync_count = 0, prev_rest = UINT64_MAX, shrinking = 0;
	uint64_t pass_t0 = t_start, pass_b0 = bytes0, bw = 0;
	unsigned strikes = 0;

	for (;;) {
		struct ferry_ram_stats st;
		uint64_t must, can, rest;
		int r;

		if (cancel_requested(vm))
			return ferry_error_set(err, -ECANCELED, "cancelled");
		if (rp_failed(rp, err))
			return err && err->code ? err->code : -EIO;
		ferry_save_pending(s, true, &must, &can);
		rest = must + can;
		ferry_ram_get_stats(vm->ram_dev, &st);
		if (st.dirty_sync_count != last_sync_count) {
			/* A pass ended: measure it, then decide. */
			uint64_t now = vm_now_ns(), sent = ferry_chan_offset(c) - pass_b0;
			uint64_t dt = now - pass_t0 ? now - pass_t0 : 1;
			bool fits, shrinks;

			if (sent)
				bw = sent * 1000000000ull / dt;
			prog->pass = st.dirty_sync_count;
			prog->mbps = (double)sent * 8 / 1e6 / ((double)dt / 1e9);
			prog->dirty_pages_rate = st.dirty_pages_last_sync *
						 1000000000ull / dt;
			prog->expected_downtime_ms = bw ? rest * 1000 / bw : 0;
			fits = bw && rest * 1000 / bw <= p->downtime_limit_ms;
			shrinks = rest * 100 < prev_rest * SHRINK_PCT;
			vm_trace(vm, "pass %llu: rest %llu bytes, %.0f Mbit/s, "
				 "expected downtime %llu ms%s%s",
				 (unsigned long long)prog->pass,
				 (unsigned long long)rest, prog->mbps,
				 (unsigned long long)prog->expected_downtime_ms,
				 fits ? ", fits" : "", shrinks ? ", shrinking" : "");
			if (vm->control) {
				json_t *d = json_pack("{s:I}", "pass",
						      (json_int_t)prog->pass);
				control_event(vm->control, "MIGRATION_PASS", d);
			}
			/* Nothing left means nothing can shrink further. */
			if (fits && (!rest || !shrinks ||
				     ++shrinking > MAX_SHRINKING_PASSES))
				return 0;
			/* Auto-converge: the guest dirties faster than we send. */
			if (!fits && !shrinks && p->auto_converge && ++strikes >= 2) {
				unsigned pct = prog->throttle_pct ?
					prog->throttle_pct + p->throttle_increment :
					p->throttle_initial;
				if (pct > p->throttle_max)
					pct = p->throttle_max;
				if (pct != prog->throttle_pct) {
					prog->throttle_pct = pct;
					vm_set_throttle(vm, pct);
					vm_trace(vm, "auto-converge: throttle %u%%", pct);
				}
				strikes = 0;
			}
			prev_rest = rest;
			last_sync_count = st.dirty_sync_count;
			pass_t0 = now;
			pass_b0 = ferry_chan_offset(c);
		}
		prog->precopy_bytes = ferry_chan_offset(c) - bytes0 +
				      multifd_bytes(vm->mig_mf);
		prog->multifd_bytes = multifd_bytes(vm->mig_mf);
		prog->ram = st;
		publish_progress(vm, prog);
		r = ferry_save_round(s, ROUND_BUDGET, err);
		if (r)
			return r;
		rate_limit(p->max_bandwidth, ferry_chan_offset(c) - bytes0 +
			   multifd_bytes(vm->mig_mf), t_start);
	}
}

static double ms(uint64_t a, uint64_t b)
{
	return b > a ? (double)(b - a) / 1e6 : 0;
}

/* Downtime and its phases, from both sides' timestamps. */
static void account_downtime(struct vm *vm, uint64_t t0,
			     const struct ferry_save_stats *ss,
			     const struct rp_reader *rp)
{
	double *ph = vm->phase_ms;
	const uint64_t *v = rp->shut.values;
	uint64_t end;

	memset(ph, 0, sizeof(vm->phase_ms));
	ph[MIG_PHASE_FINAL_SYNC] = ms(t0, ss->t_final_sync);
	ph[MIG_PHASE_REMAINING_RAM] = ms(ss->t_final_sync, ss->t_iterable_done);
	ph[MIG_PHASE_DEVICE_SAVE] = ms(ss->t_iterable_done, ss->t_done);
	end = ss->t_done;
	if (rp->live && v[FERRY_SHUT_BOOT_ID] == boot_id_hash() && v[FERRY_SHUT_T_EOF]) {
		/* One host: the monotonic clocks are the same clock. A
		 * destination left paused (--paused) reports when it was
		 * ready to run: the wait for `cont` is not downtime. */
		uint64_t t_res = v[FERRY_SHUT_T_RESUMED] ? v[FERRY_SHUT_T_RESUMED]
							 : v[FERRY_SHUT_T_EOF];
		double xfer = ms(ss->t_done, v[FERRY_SHUT_T_EOF]) -
			      (double)v[FERRY_SHUT_DEVICE_LOAD_NS] / 1e6;

		ph[MIG_PHASE_TRANSFER] = xfer > 0 ? xfer : 0;
		ph[MIG_PHASE_DEVICE_LOAD] = (double)v[FERRY_SHUT_DEVICE_LOAD_NS] / 1e6;
		ph[MIG_PHASE_RESUME] = ms(v[FERRY_SHUT_T_EOF], t_res);
		end = t_res;
	} else if (rp->live) {
		/* Two hosts: bound it by when the verdict reached us. */
		ph[MIG_PHASE_DEVICE_LOAD] = (double)v[FERRY_SHUT_DEVICE_LOAD_NS] / 1e6;
		ph[MIG_PHASE_TRANSFER] = ms(ss->t_done, rp->t_shut) -
					 ph[MIG_PHASE_DEVICE_LOAD];
		end = rp->t_shut;
	}
	vm->mig_downtime_ns = end > t0 ? end - t0 : 0;
}

static void *migration_thread(void *arg)
{
	struct vm *vm = arg;
	struct ferry_error err = { 0 };
	struct ferry_save *s = NULL;
	struct ferry_chan *c = NULL;
	struct rp_reader rp = { 0 };
	struct mig_progress prog = { 0 };
	struct ferry_save_stats ss = { 0 };
	struct ferry_multifd *mf = NULL;
	struct mig_params p;
	struct ferry_uri u;
	enum vm_run_state before = VM_RUNNING;
	bool paused = false, use_rp;
	uint64_t t0 = 0, bytes_before = 0;
	int fd, r = 0;

	pthread_mutex_lock(&vm->mig_lock);
	p = vm->params;
	pthread_mutex_unlock(&vm->mig_lock);
	ferry_uri_parse(vm->mig_uri, &u, NULL);
	use_rp = p.return_path && ferry_uri_is_socket(&u);

	/*
	 * The channels first, their handshakes written, then the main
	 * connection: the destination tells connections apart by their first
	 * bytes, and accepts in connection order, so by the time it reads the
	 * main stream its multifd receiver exists.
	 */
	if (p.multifd && ferry_uri_is_socket(&u)) {
		mf = multifd_connect(vm->mig_uri, &p, &err);
		if (!mf || (r = ferry_ram_set_multifd_send(vm->ram_dev, mf, &err))) {
			r = r ? r : (err.code ? err.code : -EIO);
			goto out;
		}
		pthread_mutex_lock(&vm->mig_lock);
		vm->mig_mf = mf;
		pthread_mutex_unlock(&vm->mig_lock);
	}
	fd = ferry_transport_connect(vm->mig_uri, 10000, &err);
	if (fd < 0) {
		r = fd;
		goto out;
	}
	c = ferry_chan_new_fd(fd, FERRY_CHAN_WRITE, true);
	if (!c) {
		close(fd);
		r = ferry_error_set(&err, -ENOMEM, "out of memory");
		goto out;
	}
	pthread_mutex_lock(&vm->mig_lock);
	vm->mig_fd = fd;
	/* A cancel that came while we connected. */
	if (vm->mig_cancel)
		shutdown(fd, SHUT_RDWR);
	pthread_mutex_unlock(&vm->mig_lock);
	if (use_rp && (r = rp_start(&rp, fd, &err)))
		goto out;
	t0 = vm_now_ns();
	s = ferry_save_new(vm->ctx, c, &err);
	if (!s) {
		r = err.code ? err.code : -EIO;
		goto out;
	}
	/* Open the return path first: a destination that refuses the setup
	 * sections can then say why. */
	if (use_rp && (r = ferry_save_command(s, FERRY_CMD_OPEN_RETURN_PATH,
					      NULL, 0, &err)))
		goto out;
	r = ferry_save_setup(s, &err);
	if (r)
		goto out;
	pthread_mutex_lock(&vm->mig_lock);
	vm->mig_setup_ns = vm_now_ns() - t0;
	pthread_mutex_unlock(&vm->mig_lock);
	if (!mig_advance(vm, MIG_ACTIVE)) {
		r = ferry_error_set(&err, -ECANCELED, "cancelled");
		goto out;
	}
	r = precopy(vm, s, c, &p, &rp, &prog, &err);
	if (r)
		goto out;
	rp_drain(&rp, s, c, (uint32_t)prog.pass + 1, 10000);

	/* Switchover: the guest must not write while the rest is sent. */
	pthread_mutex_lock(&vm->lock);
	before = vm->run_state;
	t0 = vm_now_ns();
	if (before == VM_RUNNING && (r = vm->be->pause(vm->be_priv, &err))) {
		pthread_mutex_unlock(&vm->lock);
		goto out;
	}
	vm_set_run_state(vm, VM_FINISH_MIGRATE);
	paused = true;
	pthread_mutex_unlock(&vm->lock);
	vm_set_throttle(vm, 0);
	if (!mig_advance(vm, MIG_DEVICE)) {
		r = ferry_error_set(&err, -ECANCELED, "cancelled");
		goto out;
	}
	bytes_before = ferry_chan_offset(c) + multifd_bytes(mf);
	r = ferry_save_complete(s, &err);
	if (!r && ferry_chan_flush(c))
		r = ferry_chan_error(c, &err);
	ferry_save_get_stats(s, &ss);
	prog.downtime_bytes = ferry_chan_offset(c) + multifd_bytes(mf) - bytes_before;
	prog.multifd_bytes = multifd_bytes(mf);
	ferry_ram_get_stats(vm->ram_dev, &prog.ram);
	publish_progress(vm, &prog);
	/* The source stays paused until the destination has the VM. */
	if (!r && use_rp)
		r = rp_wait(&rp, SHUT_TIMEOUT_MS, &err);
	if (!r) {
		uint64_t dt = vm_now_ns() - vm->mig_start_ns;

		pthread_mutex_lock(&vm->lock);
		vm_set_run_state(vm, VM_POSTMIGRATE);
		pthread_mutex_unlock(&vm->lock);
		account_downtime(vm, t0, &ss, &rp);
		/* As QEMU does: once completed, "mbps" is the whole migration's
		 * average, not the last (tiny) pass's rate. */
		prog.mbps = (double)(ferry_chan_offset(c) + prog.multifd_bytes) *
			    8 / 1e6 / ((double)(dt ? dt : 1) / 1e9);
		publish_progress(vm, &prog);
	}
out:
	vm_set_throttle(vm, 0);
	if (r && rp.live) {
		/* A write error is often the echo of the destination giving up:
		 * if it said why, that is the error worth reporting. */
		struct ferry_error dest = { 0 };

		if (rp_wait(&rp, 1000, &dest) && rp.shut.status) {
			ferry_error_clear(&err);
			ferry_error_propagate(&err, &dest);
		}
	}
	if (r && mf)
		ferry_multifd_cancel(mf, r, "the migration failed");
	ferry_save_end(s);
	if (c)
		ferry_chan_shutdown(c);
	rp_stop(&rp);
	pthread_mutex_lock(&vm->mig_lock);
	vm->mig_fd = -1;
	vm->mig_mf = NULL;
	pthread_mutex_unlock(&vm->mig_lock);
	if (mf) {
		ferry_ram_set_multifd_send(vm->ram_dev, NULL, NULL);
		ferry_multifd_free(mf);
	}
	ferry_chan_free(c);
	if (r) {
		/* Leave the source as it was: running if it ran. */
		if (paused) {
			struct ferry_error e2 = { 0 };
			pthread_mutex_lock(&vm->lock);
			if (before == VM_RUNNING) {
				if (vm_resume_locked(vm, &e2))
					fprintf(stderr, "ferry vm: cannot resume after a "
						"failed migration: %s\n", e2.msg);
			} else {
				vm_set_run_state(vm, before);
			}
			pthread_mutex_unlock(&vm->lock);
		}
		pthread_mutex_lock(&vm->mig_lock);
		snprintf(vm->mig_error, sizeof(vm->mig_error), "%s",
			 err.msg[0] ? err.msg : strerror(-r));
		fprintf(stderr, "ferry vm: migration to %s failed: %s\n",
			vm->mig_uri, vm->mig_error);
		set_mig_status_locked(vm, vm->mig_cancel ? MIG_CANCELLED : MIG_FAILED);
		pthread_mutex_unlock(&vm->mig_lock);
	} else {
		pthread_mutex_lock(&vm->mig_lock);
		set_mig_status_locked(vm, MIG_COMPLETED);
		pthread_mutex_unlock(&vm->mig_lock);
	}
	return NULL;
}

void vm_migrate_join(struct vm *vm)
{
	if (vm->mig_thread_live) {
		pthread_join(vm->mig_thread, NULL);
		vm->mig_thread_live = false;
	}
}

int vm_migrate(struct vm *vm, const char *uri, struct ferry_error *err)
{
	struct ferry_uri u;
	enum mig_status st;
	int e;

	if (ferry_uri_parse(uri, &u, err))
		return err && err->code ? err->code : -EINVAL;
	pthread_mutex_lock(&vm->mig_lock);
	st = vm->mig_status;
	pthread_mutex_unlock(&vm->mig_lock);
	if (st == MIG_SETUP || st == MIG_ACTIVE || st == MIG_DEVICE ||
	    st == MIG_CANCELLING)
		return ferry_error_set(err, -EBUSY, "a migration is already %s",
				       mig_status_name(st));
	switch (vm_run_state(vm)) {
	case VM_RUNNING:
	case VM_PAUSED:
	case VM_POSTMIGRATE:
		break;
	default:
		return ferry_error_set(err, -EINVAL, "cannot migrate a VM that is %s",
				       vm_run_state_name(vm_run_state(vm)));
	}
	/* The previous migration thread has finished (terminal status). */
	vm_migrate_join(vm);
	pthread_mutex_lock(&vm->mig_lock);
	snprintf(vm->mig_uri, sizeof(vm->mig_uri), "%s", uri);
	vm->mig_error[0] = 0;
	vm->mig_cancel = false;
	vm->mig_start_ns = vm_now_ns();
	vm->mig_end_ns = vm->mig_downtime_ns = vm->mig_setup_ns = 0;
	memset(&vm->prog, 0, sizeof(vm->prog));
	vm->mig_mf = NULL;
	memset(vm->phase_ms, 0, sizeof(vm->phase_ms));
	set_mig_status_locked(vm, MIG_SETUP);
	pthread_mutex_unlock(&vm->mig_lock);
	e = pthread_create(&vm->mig_thread, NULL, migration_thread, vm);
	if (e) {
		pthread_mutex_lock(&vm->mig_lock);
		set_mig_status_locked(vm, MIG_FAILED);
		pthread_mutex_unlock(&vm->mig_lock);
		return ferry_error_set(err, -e, "cannot start the migration thread");
	}
	vm->mig_thread_live = true;
	return 0;
}

/* ---- incoming ------------------------------------------------------------ */

struct incoming {
	struct vm *vm;
	int fd;                        /* main connection */
	struct ferry_chan *rp_chan;    /* return path writer, once opened */
	struct ferry_record_io rp_io;
};

static int in_on_command(void *opaque, const struct ferry_cmd_msg *m,
			 struct ferry_error *err)
{
	struct incoming *in = opaque;

	switch (m->cmd) {
	case FERRY_CMD_OPEN_RETURN_PATH: {
		int dfd;

		if (in->rp_chan)
			return ferry_error_set(err, -EBADMSG, "return path opened twice");
		dfd = dup(in->fd);
		if (dfd < 0)
			return ferry_error_set(err, -errno, "dup: %s", strerror(errno));
		in->rp_chan = ferry_chan_new_fd(dfd, FERRY_CHAN_WRITE, true);
		if (!in->rp_chan) {
			close(dfd);
			return ferry_error_set(err, -ENOMEM, "out of memory");
		}
		in->rp_io.chan = in->rp_chan;
		return 0;
	}
	case FERRY_CMD_PING: {
		struct ferry_rp_msg pong = { .type = FERRY_RP_PONG, .pong = m->u.ping };
		return in->rp_chan ? ferry_rp_send(&in->rp_io, &pong, err) : 0;
	}
	default:
		return ferry_error_set(err, -EOPNOTSUPP,
				       "postcopy is not enabled on this destination");
	}
}

static void set_in_status(struct vm *vm, enum mig_status st, const char *msg)
{
	pthread_mutex_lock(&vm->mig_lock);
	vm->in_status = st;
	if (msg)
		snprintf(vm->in_error, sizeof(vm->in_error), "%s", msg);
	pthread_mutex_unlock(&vm->mig_lock);
	vm_trace(vm, "incoming migration: %s", mig_status_name(st));
	if (vm->control) {
		json_t *d = json_pack("{s:s, s:b}", "status", mig_status_name(st),
				      "incoming", 1);
		control_event(vm->control, "MIGRATION", d);
	}
}

/*
 * The acceptor: on a socket URI the source opens its multifd channels, then
 * the main connection. They are told apart by their first bytes (the
 * multifd handshake magic or the stream magic). The first channel's
 * handshake says how many channels there are; that creates the receiver,
 * before the main connection is handed to the load. Runs until the load
 * is over.
 */
struct acceptor {
	struct vm *vm;
	struct ferry_listener *l;
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int main_fd;                   /* guarded by lock; -1 until it comes */
	struct ferry_multifd *mf;      /* guarded by lock; created on demand */
	bool stop;                     /* guarded by lock */
	int err;                       /* guarded by lock */
	char errmsg[FERRY_ERROR_MSG_MAX];
};

/* Peek at the first @len bytes of a new connection (waiting up to 10 s). */
static int peek_bytes(int fd, uint8_t *buf, size_t len)
{
	for (int i = 0; i < 1000; i++) {
		struct pollfd pf = { .fd = fd, .events = POLLIN };
		ssize_t n;

		if (poll(&pf, 1, 10) < 0 && errno != EINTR)
			return -errno;
		n = recv(fd, buf, len, MSG_PEEK | MSG_DONTWAIT);
		if (n == (ssize_t)len)
			return 0;
		if (n == 0)
			return -ECONNRESET;
		if (n < 0 && errno != EAGAIN && errno != EINTR)
			return -errno;
	}
	return -ETIMEDOUT;
}

static uint32_t be32_at(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
	       (uint32_t)p[2] << 8 | p[3];
}

static void *acceptor_main(void *arg)
{
	struct acceptor *a = arg;
	struct ferry_error err = { 0 };

	for (;;) {
		uint8_t hs[FERRY_MULTIFD_HANDSHAKE_SIZE];
		bool stop;
		int fd, r;

		pthread_mutex_lock(&a->lock);
		stop = a->stop;
		pthread_mutex_unlock(&a->lock);
		if (stop || a->vm->quit_async)
			break;
		fd = ferry_listener_accept(a->l, 200, &err);
		if (fd == -ETIMEDOUT) {
			ferry_error_clear(&err);
			continue;
		}
		if (fd < 0)
			break;
		r = peek_bytes(fd, hs, 4);
		if (!r && be32_at(hs) == FERRY_STREAM_MAGIC) {
			pthread_mutex_lock(&a->lock);
			if (a->main_fd < 0) {
				a->main_fd = fd;
				fd = -1;
				pthread_cond_broadcast(&a->cond);
			}
			pthread_mutex_unlock(&a->lock);
			if (fd >= 0) {
				vm_trace(a->vm, "a second main connection: refused");
				close(fd);
			}
			continue;
		}
		if (!r && be32_at(hs) == FERRY_MULTIFD_MAGIC &&
		    !(r = peek_bytes(fd, hs, sizeof(hs)))) {
			pthread_mutex_lock(&a->lock);
			if (!a->mf) {
				/* Bounds and the handshake's own check are the
				 * receiver's job; the count only sizes it. */
				struct ferry_multifd_params mp = {
					.channels = be32_at(hs + 28),
				};
				a->mf = ferry_multifd_recv_new(&mp, &err);
				if (a->mf && ferry_ram_set_multifd_recv(a->vm->ram_dev,
									a->mf, &err)) {
					ferry_multifd_free(a->mf);
					a->mf = NULL;
				}
				if (!a->mf) {
					a->err = err.code ? err.code : -EINVAL;
					snprintf(a->errmsg, sizeof(a->errmsg), "%s", err.msg);
				}
				pthread_cond_broadcast(&a->cond);
			}
			if (a->mf)
				ferry_multifd_recv_add_channel(a->mf, fd, &err);
			else
				close(fd);
			pthread_mutex_unlock(&a->lock);
			ferry_error_clear(&err);
			continue;
		}
		vm_trace(a->vm, "incoming connection that is neither a ferry "
			 "stream nor a multifd channel: closed");
		close(fd);
	}
	return NULL;
}

/* Bind @uri's listener now if it is a socket, so that it accepts from the
 * moment the caller learns the VM is waiting. Caller holds mig_lock. */
static int incoming_bind_locked(struct vm *vm, const char *uri,
				struct ferry_error *err)
{
	struct ferry_uri u;

	if (ferry_uri_parse(uri, &u, err))
		return err && err->code ? err->code : -EINVAL;
	if (!ferry_uri_is_socket(&u) || vm->in_listener)
		return 0;
	vm->in_listener = ferry_transport_listen(uri, err);
	if (!vm->in_listener)
		return err && err->code ? err->code : -EIO;
	vm_trace(vm, "listening for the migration on %s",
		 ferry_listener_uri(vm->in_listener));
	return 0;
}

int vm_incoming_bind(struct vm *vm, struct ferry_error *err)
{
	int r = 0;

	pthread_mutex_lock(&vm->mig_lock);
	if (vm->in_uri[0])
		r = incoming_bind_locked(vm, vm->in_uri, err);
	pthread_mutex_unlock(&vm->mig_lock);
	return r;
}

int vm_migrate_incoming(struct vm *vm, const char *uri, struct ferry_error *err)
{
	struct ferry_uri u;
	int r = 0;

	if (ferry_uri_parse(uri, &u, err))
		return err && err->code ? err->code : -EINVAL;
	pthread_mutex_lock(&vm->mig_lock);
	if (!vm->in_defer)
		r = ferry_error_set(err, -EINVAL,
			"migrate-incoming needs a VM started with --incoming defer");
	else if (vm->in_uri[0])
		r = ferry_error_set(err, -EBUSY, "incoming migration already set up");
	/* Like QEMU's: when the command returns, the port accepts. */
	else if (!(r = incoming_bind_locked(vm, uri, err))) {
		snprintf(vm->in_uri, sizeof(vm->in_uri), "%s", uri);
		pthread_cond_broadcast(&vm->in_cond);
	}
	pthread_mutex_unlock(&vm->mig_lock);
	return r;
}

/*
 * Load the incoming VM (vm_start calls this with the run state INMIGRATE),
 * then let vm_start resume or keep it paused, and finally tell the source
 * through the return path (vm_incoming_done).
 */
int vm_incoming(struct vm *vm, struct ferry_error *err)
{
	struct ferry_load_stats stats = { 0 };
	struct incoming in = { .vm = vm, .fd = -1 };
	struct ferry_load_opts opts = {
		.on_command = in_on_command, .opaque = &in, .stats = &stats,
	};
	struct acceptor acc = { .vm = vm, .main_fd = -1 };
	bool acc_live = false;
	struct ferry_chan *c = NULL;
	struct ferry_rp_msg shut = { .type = FERRY_RP_SHUT };
	struct ferry_uri u;
	char uri[4096];
	int r;

	pthread_mutex_lock(&vm->mig_lock);
	while (vm->in_defer && !vm->in_uri[0] && !vm->quit_async && !vm->quit) {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += 1;
		pthread_cond_timedwait(&vm->in_cond, &vm->mig_lock, &ts);
	}
	snprintf(uri, sizeof(uri), "%s", vm->in_uri);
	acc.l = vm->in_listener;       /* bound early, or NULL */
	vm->in_listener = NULL;
	pthread_mutex_unlock(&vm->mig_lock);
	if (!uri[0])
		return ferry_error_set(err, -ECANCELED, "quit while waiting for "
				       "migrate-incoming");
	pthread_mutex_init(&acc.lock, NULL);
	pthread_cond_init(&acc.cond, NULL);
	set_in_status(vm, MIG_ACTIVE, NULL);
	r = ferry_uri_parse(uri, &u, err);
	if (!r && ferry_uri_is_socket(&u)) {
		if (!acc.l)
			acc.l = ferry_transport_listen(uri, err);
		if (!acc.l)
			r = err && err->code ? err->code : -EIO;
		else
			vm_trace(vm, "waiting for the migration on %s",
				 ferry_listener_uri(acc.l));
		if (!r && pthread_create(&acc.thread, NULL, acceptor_main, &acc))
			r = ferry_error_set(err, -EAGAIN, "cannot start the acceptor");
		else if (!r)
			acc_live = true;
		/* Wait in short slices so `quit` or a signal can end the wait. */
		pthread_mutex_lock(&acc.lock);
		while (!r && acc.main_fd < 0 && !vm->quit && !vm->quit_async) {
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_nsec += 200000000L;
			if (ts.tv_nsec >= 1000000000L) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000L;
			}
			pthread_cond_timedwait(&acc.cond, &acc.lock, &ts);
		}
		in.fd = acc.main_fd;
		acc.main_fd = -1;
		pthread_mutex_unlock(&acc.lock);
		if (!r && in.fd < 0)
			r = ferry_error_set(err, -ECANCELED,
				"quit while waiting for the incoming connection");
	} else if (!r && (in.fd = ferry_transport_open_incoming(uri, -1, err)) < 0) {
		r = in.fd;
	}
	if (!r && !(c = ferry_chan_new_fd(in.fd, FERRY_CHAN_READ, false)))
		r = ferry_error_set(err, -ENOMEM, "out of memory");
	if (!r)
		r = ferry_load(vm->ctx, c, &opts, err);
	/* Stop accepting (shutting the listener down wakes a waiting accept
	 * at once: this is inside the downtime); a multifd failure is the
	 * root cause if there is one. */
	if (acc_live) {
		pthread_mutex_lock(&acc.lock);
		acc.stop = true;
		pthread_mutex_unlock(&acc.lock);
		shutdown(ferry_listener_fd(acc.l), SHUT_RDWR);
		pthread_join(acc.thread, NULL);
	}
	if (acc.mf) {
		struct ferry_error me = { 0 };
		if (ferry_multifd_error(acc.mf, &me) && r) {
			ferry_error_clear(err);
			ferry_error_propagate(err, &me);
		}
		if (r)
			ferry_multifd_cancel(acc.mf, r, "the load failed");
		ferry_ram_set_multifd_recv(vm->ram_dev, NULL, NULL);
		ferry_multifd_free(acc.mf);
	}
	if (r)
		ferry_error_prefix(err, "incoming migration from %s failed: ", uri);
	ferry_chan_free(c);
	ferry_listener_close(acc.l);
	pthread_mutex_destroy(&acc.lock);
	pthread_cond_destroy(&acc.cond);

	/* Keep what the verdict needs; vm_incoming_done sends it. */
	shut.status = r ? (uint32_t)-r : 0;
	if (r)
		snprintf(shut.reason, sizeof(shut.reason), "%.250s",
			 err && err->msg[0] ? err->msg : strerror(-r));
	shut.values[FERRY_SHUT_T_EOF] = stats.t_eof;
	shut.values[FERRY_SHUT_DEVICE_LOAD_NS] = stats.device_load_ns;
	shut.values[FERRY_SHUT_DEVICE_DIGEST] = stats.device_digest;
	shut.values[FERRY_SHUT_BOOT_ID] = boot_id_hash();
	pthread_mutex_lock(&vm->mig_lock);
	vm->in_shut = shut;
	vm->in_rp_chan = in.rp_chan;
	vm->in_rp_io = in.rp_io;
	vm->in_fd = in.fd;
	vm->in_device_digest = stats.device_digest;
	pthread_mutex_unlock(&vm->mig_lock);
	if (r) {
		vm_incoming_done(vm, false);
		set_in_status(vm, MIG_FAILED, err && err->msg[0] ? err->msg : NULL);
	}
	return r;
}

/* After the load: send the verdict (with when the VM resumed) and close. */
void vm_incoming_done(struct vm *vm, bool resumed)
{
	struct timespec rt;

	pthread_mutex_lock(&vm->mig_lock);
	/* A destination kept paused (--paused) reports when it was ready to
	 * run: waiting for `cont` is the user's time, not downtime. */
	(void)resumed;
	if (!vm->in_shut.status) {
		vm->in_shut.values[FERRY_SHUT_T_RESUMED] = vm_now_ns();
		clock_gettime(CLOCK_REALTIME, &rt);
		vm->in_shut.values[FERRY_SHUT_T_RESUMED_REAL] =
			(uint64_t)rt.tv_sec * 1000000000ull + (uint64_t)rt.tv_nsec;
	}
	if (vm->in_rp_chan) {
		struct ferry_error e = { 0 };
		if (ferry_rp_send(&vm->in_rp_io, &vm->in_shut, &e))
			fprintf(stderr, "ferry vm: could not confirm the load to the "
				"source: %s\n", e.msg);
		ferry_chan_free(vm->in_rp_chan);
		vm->in_rp_chan = NULL;
	}
	if (vm->in_fd >= 0)
		close(vm->in_fd);
	vm->in_fd = -1;
	pthread_mutex_unlock(&vm->mig_lock);
	if (!vm->in_shut.status)
		set_in_status(vm, MIG_COMPLETED, NULL);
}
