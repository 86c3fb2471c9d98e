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
	enum ferry_run_state s = vm_run_state(vm);

	(void)args;
	(void)err;
	*ret = json_pack("{s:s, s:b}", "status", ferry_run_state_name(s),
			 "running", s == FERRY_RUN_RUNNING);
	return 0;
}

/* device-verify: every bulk device checks its stamps. */
static int h_device_verify(void *opaque, json_t *args, json_t **ret,
			   struct ferry_error *err)
{
	(void)args;
	(void)err;
	*ret = json_pack("{s:o}", "devices", vm_bulk_verify(opaque));
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

	if (wait && vm_run_state(vm) != FERRY_RUN_RUNNING)
		return ferry_error_set(err, -EINVAL,
			"the guest is %s; it verifies only while running "
			"(or pass \"wait\": false)", ferry_run_state_name(vm_run_state(vm)));
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
	json_t *resume = json_object_get(args, "resume");

	(void)ret;
	if (!uri)
		return ferry_error_set(err, -EINVAL, "migrate needs \"uri\"");
	if (resume && !json_is_boolean(resume))
		return ferry_error_set(err, -EINVAL, "migrate: \"resume\" is a "
				       "boolean");
	return vm_migrate(opaque, uri, json_is_true(resume), err);
}

static int h_migrate_start_postcopy(void *opaque, json_t *args, json_t **ret,
				    struct ferry_error *err)
{
	struct vm *vm = opaque;

	(void)args;
	(void)ret;
	return ferry_mig_start_postcopy(vm->mig, err);
}

/* migrate-recover: a paused incoming postcopy listens on "uri"; the reply
 * names the real address (a tcp: port 0 becomes the bound port). */
static int h_migrate_recover(void *opaque, json_t *args, json_t **ret,
			     struct ferry_error *err)
{
	struct vm *vm = opaque;
	const char *uri = json_string_value(json_object_get(args, "uri"));
	char buf[4096];
	int r;

	if (!uri)
		return ferry_error_set(err, -EINVAL, "migrate-recover needs \"uri\"");
	r = ferry_mig_recover(vm->mig, uri, err);
	if (!r && ferry_mig_recover_uri(vm->mig, buf, sizeof(buf)))
		*ret = json_pack("{s:s}", "uri", buf);
	return r;
}

/* The postcopy figures, where there are any. */
static void postcopy_fields(json_t *o, const struct ferry_mig_info *i)
{
	if (!i->postcopy)
		return;
	json_object_set_new(o, "postcopy-requests",
			    json_integer((json_int_t)i->postcopy_requests));
	if (i->incoming) {
		json_object_set_new(o, "postcopy-faults",
				    json_integer((json_int_t)i->postcopy_faults));
		json_object_set_new(o, "postcopy-latency", json_pack(
			"{s:I, s:I, s:I}",
			"p50-us", (json_int_t)i->postcopy_lat_p50_us,
			"p99-us", (json_int_t)i->postcopy_lat_p99_us,
			"max-us", (json_int_t)i->postcopy_lat_max_us));
		json_object_set_new(o, "postcopy-blocktime",
				    json_integer((json_int_t)i->postcopy_blocktime_ms));
	} else {
		json_object_set_new(o, "postcopy-time",
				    json_integer((json_int_t)i->postcopy_time_ms));
	}
}

/* Devices with state in buffers: "device-state" and the "devices" list. */
static void device_fields(json_t *o, const struct ferry_mig_info *i)
{
	json_t *list;

	if (!i->ndevices && !i->devstate_switchover_bytes)
		return;
	json_object_set_new(o, "device-state", json_pack("{s:I, s:I}",
		"precopy-bytes", (json_int_t)i->devstate_precopy_bytes,
		"switchover-bytes", (json_int_t)i->devstate_switchover_bytes));
	list = json_array();
	for (unsigned k = 0; k < i->ndevices; k++) {
		const struct ferry_mig_dev_info *d = &i->devices[k];
		json_t *e = json_pack("{s:s, s:i, s:I, s:I}", "id", d->id,
				      "instance", (int)d->instance,
				      "precopy-bytes", (json_int_t)d->precopy_bytes,
				      "switchover-bytes",
				      (json_int_t)d->switchover_bytes);

		if (i->incoming) {
			json_object_set_new(e, "data-load-ms",
					    json_real(d->data_load_ms));
			json_object_set_new(e, "config-load-ms",
					    json_real(d->config_load_ms));
		}
		json_array_append_new(list, e);
	}
	json_object_set_new(o, "devices", list);
}

/* The connections: TLS on them, and (destination) connections
 * turned away while waiting. */
static void connection_fields(json_t *o, const struct ferry_mig_info *i)
{
	/* Test only: where a pause fault point holds this side. */
	if (i->paused_at[0])
		json_object_set_new(o, "paused-at", json_string(i->paused_at));
	if (i->tls)
		json_object_set_new(o, "tls", json_pack(
			"{s:s, s:s, s:s, s:i, s:i, s:i}",
			"version", i->tls_version, "cipher", i->tls_cipher,
			"peer", i->tls_peer, "connections", (int)i->tls_connections,
			"ktls-tx", (int)i->tls_ktls_tx,
			"ktls-rx", (int)i->tls_ktls_rx));
	if (i->incoming && i->refused) {
		json_object_set_new(o, "refused-connections",
				    json_integer((json_int_t)i->refused));
		json_object_set_new(o, "last-refused",
				    json_string(i->refused_reason));
	}
}

/* Destination: the memory map during the non-iterable load. */
static void load_fields(struct vm *vm, json_t *o)
{
	pthread_mutex_lock(&vm->lock);
	if (vm->load_stats) {
		json_object_set_new(o, "memory-commits",
				    json_integer((json_int_t)vm->load_commits));
		json_object_set_new(o, "flatview-rebuilds",
				    json_integer((json_int_t)vm->load_rebuilds));
		json_object_set_new(o, "memory-commit-ms",
				    json_real((double)vm->load_commit_ns / 1e6));
		json_object_set_new(o, "device-load-transaction",
				    json_boolean(vm->load_tx));
	}
	pthread_mutex_unlock(&vm->lock);
}

static int h_migrate_cancel(void *opaque, json_t *args, json_t **ret,
			    struct ferry_error *err)
{
	struct vm *vm = opaque;

	(void)args;
	(void)ret;
	return ferry_mig_cancel(vm->mig, err);
}

/* query-migrate: the engine's snapshot in QEMU's shape, plus ferry's
 * "switchover" and "downtime-phases". */
static int h_query_migrate(void *opaque, json_t *args, json_t **ret,
			   struct ferry_error *err)
{
	struct vm *vm = opaque;
	struct ferry_mig_info i = { .size = sizeof(i) };
	json_t *o;

	(void)args;
	(void)err;
	ferry_mig_query(vm->mig, &i);
	o = json_pack("{s:s}", "status", ferry_mig_status_name(i.status));
	if (i.switchover != FERRY_SWO_NONE)
		json_object_set_new(o, "switchover",
				    json_string(ferry_switchover_name(i.switchover)));
	if (i.error[0])
		json_object_set_new(o, "error-desc", json_string(i.error));
	if (i.incoming) {
		if (i.status != FERRY_MIG_NONE) {
			json_object_set_new(o, "incoming", json_true());
			json_object_set_new(o, "total-time",
				json_integer((json_int_t)i.total_time_ms));
			postcopy_fields(o, &i);
			device_fields(o, &i);
			load_fields(vm, o);
			connection_fields(o, &i);
		}
		*ret = o;
		return 0;
	}
	if (i.status != FERRY_MIG_NONE) {
		json_t *ph = json_object();

		json_object_set_new(o, "total-time",
				    json_integer((json_int_t)i.total_time_ms));
		json_object_set_new(o, "setup-time",
				    json_integer((json_int_t)i.setup_time_ms));
		json_object_set_new(o, "expected-downtime",
				    json_integer((json_int_t)i.expected_downtime_ms));
		json_object_set_new(o, "pass", json_integer((json_int_t)i.pass));
		json_object_set_new(o, "cpu-throttle-percentage",
				    json_integer(i.throttle_pct));
		postcopy_fields(o, &i);
		device_fields(o, &i);
		connection_fields(o, &i);
		if (i.switchover_acked)
			json_object_set_new(o, "switchover-acked", json_true());
		/* Postcopy knows its downtime as soon as the destination runs. */
		if (i.status == FERRY_MIG_COMPLETED ||
		    (i.status == FERRY_MIG_POSTCOPY_ACTIVE && i.downtime_ns)) {
			json_object_set_new(o, "downtime",
				json_integer((json_int_t)((i.downtime_ns + 500000) / 1000000)));
			json_object_set_new(o, "downtime-us",
				json_integer((json_int_t)(i.downtime_ns / 1000)));
			for (int p = 0; p < FERRY_PHASE__MAX; p++)
				json_object_set_new(ph, ferry_phase_name(p),
						    json_real(i.phase_ms[p]));
			json_object_set_new(o, "downtime-phases", ph);
		} else {
			json_decref(ph);
		}
		json_object_set_new(o, "ram", json_pack(
			"{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:I, s:I, s:I}",
			"total", (json_int_t)i.ram_total,
			/* Pages on multifd channels count like pages in the
			 * main stream (the RAM device's counters include them). */
			"transferred", (json_int_t)i.ram_transferred,
			"remaining", (json_int_t)i.ram_remaining,
			"duplicate", (json_int_t)i.ram_duplicate,
			"normal", (json_int_t)i.ram_normal,
			"normal-bytes", (json_int_t)i.ram_normal_bytes,
			"dirty-sync-count", (json_int_t)i.ram_dirty_sync_count,
			"dirty-pages-rate", (json_int_t)i.dirty_pages_rate,
			"mbps", i.mbps,
			"precopy-bytes", (json_int_t)i.precopy_bytes,
			"downtime-bytes", (json_int_t)i.downtime_bytes,
			"multifd-bytes", (json_int_t)i.multifd_bytes));
		json_object_set_new(json_object_get(o, "ram"), "postcopy-bytes",
				    json_integer((json_int_t)i.postcopy_bytes));
		json_object_set_new(o, "bandwidth",
				    json_integer((json_int_t)i.bandwidth));
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

/* A JSON value as a setting of @info's type, or -EINVAL. */
static int json_setting(const struct ferry_setting_info *info, json_t *v,
			struct ferry_setting *out, struct ferry_error *err)
{
	*out = (struct ferry_setting){ .name = info->name };
	switch (info->type) {
	case FERRY_SETTING_BOOL:
		if (!json_is_boolean(v))
			break;
		out->u = json_is_true(v);
		return 0;
	case FERRY_SETTING_U64:
		if (!json_is_integer(v) || json_integer_value(v) < 0)
			break;
		out->u = (uint64_t)json_integer_value(v);
		return 0;
	case FERRY_SETTING_STR:
	case FERRY_SETTING_TEXT:
		if (!json_is_string(v))
			break;
		out->s = json_string_value(v);
		return 0;
	}
	return ferry_error_set(err, -EINVAL, "bad value for '%s'", info->name);
}

static const struct ferry_setting_info *setting_named(const char *name,
						      bool capability)
{
	const struct ferry_setting_info *info;

	for (unsigned k = 0; (info = ferry_mig_setting_info(k)); k++)
		if (info->capability == capability && !strcmp(info->name, name))
			return info;
	return NULL;
}

/* Names the engine knows of one kind, for error messages. */
static void list_settings(char *buf, size_t len, bool capability)
{
	const struct ferry_setting_info *info;
	size_t n = 0;

	buf[0] = 0;
	for (unsigned k = 0; (info = ferry_mig_setting_info(k)) && n < len; k++)
		if (info->capability == capability)
			n += (size_t)snprintf(buf + n, len - n, "%s%s",
					      n ? ", " : "", info->name);
}

/* migrate-set-capabilities / migrate-set-parameters: checked and applied
 * by the engine all at once, or not at all. */
static int set_settings(struct vm *vm, json_t *list, bool capability,
			struct ferry_error *err)
{
	struct ferry_setting v[32];
	unsigned n = 0;
	size_t idx;
	const char *key;
	json_t *c;
	char known[512];

	list_settings(known, sizeof(known), capability);
	if (capability) {
		if (!json_is_array(list))
			return ferry_error_set(err, -EINVAL,
					       "\"capabilities\" must be a list");
		json_array_foreach(list, idx, c) {
			const char *name = json_string_value(
				json_object_get(c, "capability"));
			const struct ferry_setting_info *info =
				name ? setting_named(name, true) : NULL;

			if (!info || n == 32)
				return ferry_error_set(err, -EINVAL,
					"unknown capability: %s (known: %s)",
					name ? name : "?", known);
			if (json_setting(info, json_object_get(c, "state"),
					 &v[n++], err))
				return -EINVAL;
		}
	} else {
		json_object_foreach(list, key, c) {
			const struct ferry_setting_info *info =
				setting_named(key, false);

			if (!info || n == 32)
				return ferry_error_set(err, -EINVAL,
					"unknown parameter: %s (known: %s)",
					key, known);
			if (json_setting(info, c, &v[n++], err))
				return -EINVAL;
		}
	}
	return ferry_mig_set(vm->mig, v, n, err);
}

static int h_set_caps(void *opaque, json_t *args, json_t **ret,
		      struct ferry_error *err)
{
	(void)ret;
	return set_settings(opaque, json_object_get(args, "capabilities"), true,
			    err);
}

static int h_set_params(void *opaque, json_t *args, json_t **ret,
			struct ferry_error *err)
{
	(void)ret;
	return set_settings(opaque, args, false, err);
}

/* query-migrate-capabilities / query-migrate-parameters. */
static json_t *query_settings(struct vm *vm, bool capability)
{
	const struct ferry_setting_info *info;
	json_t *o = capability ? json_array() : json_object();

	for (unsigned k = 0; (info = ferry_mig_setting_info(k)); k++) {
		struct ferry_setting v;
		json_t *j;

		if (info->capability != capability ||
		    ferry_mig_get(vm->mig, info->name, &v, NULL))
			continue;
		if (info->type == FERRY_SETTING_TEXT) {
			char text[4200];

			j = ferry_mig_get_text(vm->mig, info->name, text,
					       sizeof(text), NULL) ? json_null()
					       : json_string(text);
		} else {
			j = info->type == FERRY_SETTING_BOOL ? json_boolean(v.u) :
			    info->type == FERRY_SETTING_STR ? json_string(v.s) :
			    json_integer((json_int_t)v.u);
		}
		if (capability)
			json_array_append_new(o, json_pack("{s:s, s:o}",
				"capability", info->name, "state", j));
		else
			json_object_set_new(o, info->name, j);
	}
	return o;
}

static int h_query_caps(void *opaque, json_t *args, json_t **ret,
			struct ferry_error *err)
{
	(void)args;
	(void)err;
	*ret = query_settings(opaque, true);
	return 0;
}

static int h_query_params(void *opaque, json_t *args, json_t **ret,
			  struct ferry_error *err)
{
	(void)args;
	(void)err;
	*ret = query_settings(opaque, false);
	return 0;
}

/* Test hook: arm one of the engine's fault points (engine.h). */
static int h_migrate_fault(void *opaque, json_t *args, json_t **ret,
			   struct ferry_error *err)
{
	struct vm *vm = opaque;
	json_t *p = json_object_get(args, "point");

	(void)ret;
	if (p && !json_is_string(p))
		return ferry_error_set(err, -EINVAL, "\"point\" must be a string");
	return ferry_mig_inject_fault(vm->mig, json_string_value(p), err);
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
	for (unsigned i = 0; v && i < v->nr; i++) {
		const struct memmap_range *r = &v->ranges[i];

		json_array_append_new(view, json_pack("{s:I, s:I, s:s, s:I, s:s}",
			"gpa", (json_int_t)r->gpa, "size", (json_int_t)r->size,
			"region", memmap_region_name(r->mr),
			"offset", (json_int_t)r->offset,
			"kind", memmap_region_kind(r->mr) == MEMMAP_RAM ? "ram" : "mmio"));
	}
	pthread_mutex_lock(&vm->lock);
	if (vm->run_state != FERRY_RUN_INMIGRATE) {
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
		{ "device-verify", h_device_verify },
		{ "migrate", h_migrate },
		{ "migrate-cancel", h_migrate_cancel },
		{ "migrate-start-postcopy", h_migrate_start_postcopy },
		{ "migrate-recover", h_migrate_recover },
		{ "query-migrate", h_query_migrate },
		{ "migrate-incoming", h_migrate_incoming },
		{ "migrate-set-capabilities", h_set_caps },
		{ "query-migrate-capabilities", h_query_caps },
		{ "migrate-set-parameters", h_set_params },
		{ "query-migrate-parameters", h_query_params },
		{ "x-corrupt-page", h_corrupt_page },
		{ "x-migrate-fault", h_migrate_fault },
		{ "x-query-memslots", h_query_memslots },
	};

	struct control *c = control_create(vm->cfg.control, err);

	if (!c)
		return err && err->code ? err->code : -EIO;
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		int r = control_register(c, cmds[i].name, cmds[i].fn, vm);
		if (r) {
			control_destroy(c);
			return ferry_error_set(err, r, "registering %s", cmds[i].name);
		}
	}
	/* Published under vm->lock: the engine's threads send events. */
	pthread_mutex_lock(&vm->lock);
	vm->control = c;
	pthread_mutex_unlock(&vm->lock);
	return control_start(c, err);
}

void vm_control_stop(struct vm *vm)
{
	struct control *c;

	pthread_mutex_lock(&vm->lock);
	c = vm->control;
	vm->control = NULL;
	pthread_mutex_unlock(&vm->lock);
	/* Joins the server thread: no handler runs after this. */
	control_destroy(c);
}
