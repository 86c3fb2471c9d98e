/*
 * vmm/vm/vm-control.c - the VM's QMP-style commands.
 *
 * Handlers run on the control server thread, one at a time. They never
 * block for long: a migration runs in its own thread and reports through
 * MIGRATION events and query-migrate; guest-verify waits for the guest at
 * most its "timeout" (default 60 s), which is a verify pass of the largest
 * guest on this machine with a wide margin.
 */
#include <errno.h>
#include <stddef.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "control/control.h"
#include "kvm/kvm-slots.h"
#include "memory/memmap.h"
#include "vm/vm-internal.h"

static int h_query_status(void *opaque, json_t *args, json_t **ret,
			  struct ferry_error *err)
{
	struct vm *vm = opaque;
	enum vm_run_state s = vm_run_state(vm);

	(void)args;
	(void)err;
	*ret = json_pack("{s:s, s:b}", "status", vm_run_state_name(s),
			 "running", s == VM_RUNNING);
	return 0;
}

static int h_stop(void *opaque, json_t *args, json_t **ret,
		  struct ferry_error *err)
{
	(void)args;
	(void)ret;
	return vm_stop(opaque, err);
}

static int h_cont(void *opaque, json_t *args, json_t **ret,
		  struct ferry_error *err)
{
	(void)args;
	(void)ret;
	return vm_cont(opaque, err);
}

static int h_quit(void *opaque, json_t *args, json_t **ret,
		  struct ferry_error *err)
{
	(void)args;
	(void)ret;
	(void)err;
	vm_request_quit(opaque);
	return 0;
}

static json_t *guest_json(struct vm *vm)
{
	struct vm_guest_info gi;

	vm_guest_info(vm, &gi);
	return json_pack("{s:b, s:I, s:I, s:I, s:I, s:I, s:I, s:i, s:i}",
			 "booted", gi.booted,
			 "generation", (json_int_t)gi.generation,
			 "heartbeat", (json_int_t)gi.heartbeat,
			 "verify-passes", (json_int_t)gi.verify_passes,
			 "bad-pages", (json_int_t)gi.bad_pages,
			 "first-bad-page", (json_int_t)(gi.bad_pages ? gi.first_bad_page : 0),
			 "last-bad-page", (json_int_t)(gi.bad_pages ? gi.last_bad_page : 0),
			 "state", (int)gi.state, "workload", (int)gi.workload);
}

static int h_query_guest(void *opaque, json_t *args, json_t **ret,
			 struct ferry_error *err)
{
	(void)args;
	(void)err;
	*ret = guest_json(opaque);
	return 0;
}

/* {"wait": true, "timeout": ms}: request a verify pass; with wait (the
 * default) reply with its result. */
static int h_guest_verify(void *opaque, json_t *args, json_t **ret,
			  struct ferry_error *err)
{
	struct vm *vm = opaque;
	json_t *w = json_object_get(args, "wait");
	json_t *t = json_object_get(args, "timeout");
	bool wait = !w || json_is_true(w);
	int timeout = json_is_integer(t) ? (int)json_integer_value(t) : 60000;
	uint64_t seq;
	int r;

	if (wait && vm_run_state(vm) != VM_RUNNING)
		return ferry_error_set(err, -EINVAL,
			"the guest is %s; it verifies only while running "
			"(or pass \"wait\": false)", vm_run_state_name(vm_run_state(vm)));
	seq = vm_guest_verify(vm);
	if (wait && (r = vm_guest_wait_verify(vm, seq, timeout, err)))
		return r;
	*ret = guest_json(vm);
	json_object_set_new(*ret, "verify-seq", json_integer((json_int_t)seq));
	return 0;
}

static int h_ram_digest(void *opaque, json_t *args, json_t **ret,
			struct ferry_error *err)
{
	char d[33];
	int r = vm_ram_digest(opaque, d, err);

	(void)args;
	if (r)
		return r;
	*ret = json_pack("{s:s}", "digest", d);
	return 0;
}

static int h_migrate(void *opaque, json_t *args, json_t **ret,
		     struct ferry_error *err)
{
	const char *uri = json_string_value(json_object_get(args, "uri"));

	(void)ret;
	if (!uri)
		return ferry_error_set(err, -EINVAL, "migrate needs \"uri\"");
	return vm_migrate(opaque, uri, err);
}

static int h_migrate_cancel(void *opaque, json_t *args, json_t **ret,
			    struct ferry_error *err)
{
	(void)args;
	(void)ret;
	return vm_migrate_cancel(opaque, err);
}

static int h_query_migrate(void *opaque, json_t *args, json_t **ret,
			   struct ferry_error *err)
{
	struct vm *vm = opaque;
	struct ferry_ram_stats st;
	struct mig_progress prog;
	enum mig_status s;
	json_t *o;
	uint64_t now = vm_now_ns(), total;

	(void)args;
	(void)err;
	pthread_mutex_lock(&vm->mig_lock);
	s = vm->mig_status;
	/* An incoming VM reports its side of the migration. */
	if (s == MIG_NONE && vm->in_status != MIG_NONE) {
		o = json_pack("{s:s, s:b}", "status", mig_status_name(vm->in_status),
			      "incoming", 1);
		if (vm->in_error[0])
			json_object_set_new(o, "error-desc", json_string(vm->in_error));
		pthread_mutex_unlock(&vm->mig_lock);
		*ret = o;
		return 0;
	}
	o = json_pack("{s:s}", "status", mig_status_name(s));
	prog = vm->prog;
	if (s != MIG_NONE) {
		json_t *ph = json_object();
		total = (vm->mig_end_ns ? vm->mig_end_ns : now) - vm->mig_start_ns;
		json_object_set_new(o, "total-time",
				    json_integer((json_int_t)(total / 1000000)));
		json_object_set_new(o, "setup-time",
				    json_integer((json_int_t)(vm->mig_setup_ns / 1000000)));
		json_object_set_new(o, "expected-downtime",
				    json_integer((json_int_t)vm->prog.expected_downtime_ms));
		json_object_set_new(o, "pass", json_integer((json_int_t)vm->prog.pass));
		json_object_set_new(o, "cpu-throttle-percentage",
				    json_integer(vm->prog.throttle_pct));
		if (s == MIG_COMPLETED) {
			json_object_set_new(o, "downtime",
				json_integer((json_int_t)((vm->mig_downtime_ns + 500000) / 1000000)));
			json_object_set_new(o, "downtime-us",
				json_integer((json_int_t)(vm->mig_downtime_ns / 1000)));
			for (int i = 0; i < MIG_PHASE__MAX; i++)
				json_object_set_new(ph, mig_phase_names[i],
						    json_real(vm->phase_ms[i]));
			json_object_set_new(o, "downtime-phases", ph);
		} else {
			json_decref(ph);
		}
		if (vm->mig_error[0])
			json_object_set_new(o, "error-desc", json_string(vm->mig_error));
	}
	pthread_mutex_unlock(&vm->mig_lock);
	if (s != MIG_NONE) {
		st = prog.ram;
		json_object_set_new(o, "ram", json_pack(
			"{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:I, s:I, s:I}",
			"total", (json_int_t)st.total,
			/* Pages on multifd channels count like pages in the
			 * main stream (the RAM device's counters include them). */
			"transferred", (json_int_t)st.transferred,
			"remaining", (json_int_t)st.remaining,
			"duplicate", (json_int_t)st.duplicate,
			"normal", (json_int_t)st.normal,
			"normal-bytes", (json_int_t)(st.normal * GUEST_PAGE_SIZE),
			"dirty-sync-count", (json_int_t)st.dirty_sync_count,
			"dirty-pages-rate", (json_int_t)prog.dirty_pages_rate,
			"mbps", prog.mbps,
			"precopy-bytes", (json_int_t)prog.precopy_bytes,
			"downtime-bytes", (json_int_t)prog.downtime_bytes,
			"multifd-bytes", (json_int_t)prog.multifd_bytes));
	}
	*ret = o;
	return 0;
}

static int h_migrate_incoming(void *opaque, json_t *args, json_t **ret,
			      struct ferry_error *err)
{
	const char *uri = json_string_value(json_object_get(args, "uri"));

	(void)ret;
	if (!uri)
		return ferry_error_set(err, -EINVAL, "migrate-incoming needs \"uri\"");
	return vm_migrate_incoming(opaque, uri, err);
}

static const struct {
	const char *name;
	size_t off;
} caps[] = {
	{ "auto-converge", offsetof(struct mig_params, auto_converge) },
	{ "multifd", offsetof(struct mig_params, multifd) },
	{ "return-path", offsetof(struct mig_params, return_path) },
};

static bool migration_running(struct vm *vm)
{
	enum mig_status s = vm->mig_status;
	return s == MIG_SETUP || s == MIG_ACTIVE || s == MIG_DEVICE ||
	       s == MIG_CANCELLING;
}

static int h_set_caps(void *opaque, json_t *args, json_t **ret,
		      struct ferry_error *err)
{
	struct vm *vm = opaque;
	json_t *list = json_object_get(args, "capabilities"), *c;
	struct mig_params p;
	size_t i;

	(void)ret;
	if (!json_is_array(list))
		return ferry_error_set(err, -EINVAL, "\"capabilities\" must be a list");
	pthread_mutex_lock(&vm->mig_lock);
	p = vm->params;
	json_array_foreach(list, i, c) {
		const char *name = json_string_value(json_object_get(c, "capability"));
		json_t *state = json_object_get(c, "state");
		size_t k;

		for (k = 0; name && k < sizeof(caps) / sizeof(caps[0]); k++)
			if (!strcmp(name, caps[k].name))
				break;
		if (!name || k == sizeof(caps) / sizeof(caps[0]) || !json_is_boolean(state)) {
			pthread_mutex_unlock(&vm->mig_lock);
			return ferry_error_set(err, -EINVAL,
				"unknown capability or state: %s (known: auto-converge, "
				"multifd, return-path)", name ? name : "?");
		}
		*(bool *)((char *)&p + caps[k].off) = json_is_true(state);
	}
	if (migration_running(vm)) {
		pthread_mutex_unlock(&vm->mig_lock);
		return ferry_error_set(err, -EBUSY, "a migration is running");
	}
	vm->params = p;
	pthread_mutex_unlock(&vm->mig_lock);
	return 0;
}

static int h_query_caps(void *opaque, json_t *args, json_t **ret,
			struct ferry_error *err)
{
	struct vm *vm = opaque;
	json_t *a = json_array();

	(void)args;
	(void)err;
	pthread_mutex_lock(&vm->mig_lock);
	for (size_t k = 0; k < sizeof(caps) / sizeof(caps[0]); k++)
		json_array_append_new(a, json_pack("{s:s, s:b}", "capability",
			caps[k].name, *(bool *)((char *)&vm->params + caps[k].off)));
	pthread_mutex_unlock(&vm->mig_lock);
	*ret = a;
	return 0;
}

/* Integer parameters: name, offset, width, bounds. */
static const struct {
	const char *name;
	size_t off;
	bool is64;
	uint64_t min, max;
} iparams[] = {
	{ "multifd-channels", offsetof(struct mig_params, multifd_channels), false, 1, 16 },
	{ "downtime-limit", offsetof(struct mig_params, downtime_limit_ms), true, 1, 2000000 },
	{ "max-bandwidth", offsetof(struct mig_params, max_bandwidth), true, 0, UINT64_MAX >> 1 },
	{ "cpu-throttle-initial", offsetof(struct mig_params, throttle_initial), false, 1, 99 },
	{ "cpu-throttle-increment", offsetof(struct mig_params, throttle_increment), false, 1, 99 },
	{ "cpu-throttle-max", offsetof(struct mig_params, throttle_max), false, 1, 99 },
};

static int h_set_params(void *opaque, json_t *args, json_t **ret,
			struct ferry_error *err)
{
	struct vm *vm = opaque;
	struct mig_params p;
	const char *key;
	json_t *v;

	(void)ret;
	pthread_mutex_lock(&vm->mig_lock);
	p = vm->params;
	json_object_foreach(args, key, v) {
		size_t k;

		if (!strcmp(key, "multifd-compression")) {
			const char *c = json_string_value(v);
			if (!c || (strcmp(c, "zstd") && strcmp(c, "none")))
				goto bad;
			p.zstd = !strcmp(c, "zstd");
			continue;
		}
		for (k = 0; k < sizeof(iparams) / sizeof(iparams[0]); k++)
			if (!strcmp(key, iparams[k].name))
				break;
		if (k == sizeof(iparams) / sizeof(iparams[0]) || !json_is_integer(v) ||
		    json_integer_value(v) < 0 ||
		    (uint64_t)json_integer_value(v) < iparams[k].min ||
		    (uint64_t)json_integer_value(v) > iparams[k].max)
			goto bad;
		if (iparams[k].is64)
			*(uint64_t *)((char *)&p + iparams[k].off) =
				(uint64_t)json_integer_value(v);
		else
			*(unsigned *)((char *)&p + iparams[k].off) =
				(unsigned)json_integer_value(v);
		continue;
bad:
		pthread_mutex_unlock(&vm->mig_lock);
		return ferry_error_set(err, -EINVAL, "bad value for parameter '%s'", key);
	}
	/* Like QEMU, parameters may change while a migration runs; this one
	 * read its copy at start. */
	vm->params = p;
	pthread_mutex_unlock(&vm->mig_lock);
	return 0;
}

static int h_query_params(void *opaque, json_t *args, json_t **ret,
			  struct ferry_error *err)
{
	struct vm *vm = opaque;
	json_t *o = json_object();

	(void)args;
	(void)err;
	pthread_mutex_lock(&vm->mig_lock);
	for (size_t k = 0; k < sizeof(iparams) / sizeof(iparams[0]); k++) {
		const char *base = (const char *)&vm->params + iparams[k].off;
		json_object_set_new(o, iparams[k].name, json_integer(iparams[k].is64 ?
			(json_int_t)*(const uint64_t *)base :
			(json_int_t)*(const unsigned *)base));
	}
	json_object_set_new(o, "multifd-compression",
			    json_string(vm->params.zstd ? "zstd" : "none"));
	pthread_mutex_unlock(&vm->mig_lock);
	*ret = o;
	return 0;
}

/* Test hook: flip one byte of data page @page behind the guest's back, as
 * a lost or torn page would. The next verify pass must report it. */
static int h_corrupt_page(void *opaque, json_t *args, json_t **ret,
			  struct ferry_error *err)
{
	struct vm *vm = opaque;
	json_t *p = json_object_get(args, "page");
	uint64_t page, off;

	(void)ret;
	if (!json_is_integer(p) || json_integer_value(p) < 0)
		return ferry_error_set(err, -EINVAL, "x-corrupt-page needs \"page\"");
	page = (uint64_t)json_integer_value(p);
	if (page >= GUEST_DATA_PAGES(vm->cfg.mem))
		return ferry_error_set(err, -ERANGE, "page %" PRIu64 " beyond %llu",
				       page,
				       (unsigned long long)GUEST_DATA_PAGES(vm->cfg.mem));
	off = GUEST_DATA_GPA + page * GUEST_PAGE_SIZE + 100;
	__atomic_fetch_xor(&vm->ram[off], 0x40, __ATOMIC_RELAXED);
	return 0;
}

/*
 * x-query-memslots: the KVM memslots next to the flat view they follow,
 * and the memory map's counters. Slots and view are safe from this thread
 * (the backend's slot lock; a refcounted view snapshot). The counters
 * belong to the map's tree owner: the map changes only while the VM is
 * created (before this server starts), during an incoming load (run state
 * inmigrate) and after this server stopped, and vm_start publishes the
 * run state after the load under vm->lock, so outside inmigrate, under
 * vm->lock, nothing writes them. In inmigrate "memmap" is null.
 */
static int h_query_memslots(void *opaque, json_t *args, json_t **ret,
			    struct ferry_error *err)
{
	struct vm *vm = opaque;
	struct kvm_slots_report *rep = NULL;
	const struct memmap_view *v;
	json_t *o, *slots = json_array(), *view = json_array(), *mm = json_null();

	(void)args;
	if (vm->be == &backend_kvm_ops) {
		rep = malloc(sizeof(*rep));
		if (!rep) {
			json_decref(slots);
			json_decref(view);
			return ferry_error_set(err, -ENOMEM, "out of memory");
		}
		backend_kvm_memslots(vm->be_priv, rep);
		for (unsigned i = 0; i < rep->nr; i++) {
			const struct kvm_slot_info *s = &rep->slot[i];

			json_array_append_new(slots, json_pack(
				"{s:i, s:I, s:I, s:s, s:I, s:b, s:b}",
				"slot", (int)s->slot, "gpa", (json_int_t)s->gpa,
				"size", (json_int_t)s->size, "region", s->region,
				"offset", (json_int_t)s->offset,
				"guest-ram", s->guest_ram, "dirty-log", s->dirty_log));
		}
	}
	v = memmap_view_get(vm->memmap);
	for (unsigned i = 0; i < v->nr; i++) {
		const struct memmap_range *r = &v->ranges[i];

		json_array_append_new(view, json_pack("{s:I, s:I, s:s, s:I, s:s}",
			"gpa", (json_int_t)r->gpa, "size", (json_int_t)r->size,
			"region", memmap_region_name(r->mr),
			"offset", (json_int_t)r->offset,
			"kind", memmap_region_kind(r->mr) == MEMMAP_RAM ? "ram" : "mmio"));
	}
	pthread_mutex_lock(&vm->lock);
	if (vm->run_state != VM_INMIGRATE) {
		struct memmap_stats st;

		memmap_get_stats(vm->memmap, &st);
		json_decref(mm);
		mm = json_pack("{s:I, s:I, s:I, s:i}", "changes",
			       (json_int_t)st.changes, "commits", (json_int_t)st.commits,
			       "rebuilds", (json_int_t)st.rebuilds,
			       "ranges", (int)st.nr_ranges);
	}
	pthread_mutex_unlock(&vm->lock);
	o = json_pack("{s:s, s:o, s:o, s:I, s:o}", "backend", vm->be->name,
		      "slots", slots, "view", view,
		      "generation", (json_int_t)v->generation, "memmap", mm);
	memmap_view_put(v);
	if (rep) {
		json_object_set_new(o, "slot-limit", json_integer(rep->limit));
		json_object_set_new(o, "dirty-logging", json_boolean(rep->dirty_logging));
		json_object_set_new(o, "unmapped-ram-ranges",
				    json_integer((json_int_t)rep->unmapped));
		json_object_set_new(o, "mmio", json_pack("{s:I, s:I, s:I}",
			"exits", (json_int_t)rep->mmio_exits,
			"hole", (json_int_t)rep->mmio_hole,
			"ram", (json_int_t)rep->mmio_ram));
		if (rep->error[0])
			json_object_set_new(o, "error", json_string(rep->error));
		free(rep);
	}
	*ret = o;
	return 0;
}

int vm_control_start(struct vm *vm, struct ferry_error *err)
{
	static const struct {
		const char *name;
		control_handler_fn fn;
	} cmds[] = {
		{ "query-status", h_query_status },
		{ "stop", h_stop },
		{ "cont", h_cont },
		{ "quit", h_quit },
		{ "query-guest", h_query_guest },
		{ "guest-verify", h_guest_verify },
		{ "query-ram-digest", h_ram_digest },
		{ "migrate", h_migrate },
		{ "migrate-cancel", h_migrate_cancel },
		{ "query-migrate", h_query_migrate },
		{ "migrate-incoming", h_migrate_incoming },
		{ "migrate-set-capabilities", h_set_caps },
		{ "query-migrate-capabilities", h_query_caps },
		{ "migrate-set-parameters", h_set_params },
		{ "query-migrate-parameters", h_query_params },
		{ "x-corrupt-page", h_corrupt_page },
		{ "x-query-memslots", h_query_memslots },
	};

	vm->control = control_create(vm->cfg.control, err);
	if (!vm->control)
		return err && err->code ? err->code : -EIO;
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		int r = control_register(vm->control, cmds[i].name, cmds[i].fn, vm);
		if (r)
			return ferry_error_set(err, r, "registering %s", cmds[i].name);
	}
	return control_start(vm->control, err);
}

void vm_control_stop(struct vm *vm)
{
	control_destroy(vm->control);
	vm->control = NULL;
}
