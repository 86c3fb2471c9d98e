/*
 * registry.c - the context and its device registry.
 *
 * Registration order is stream order: devices are saved in the order they
 * were registered, so a VMM controls dependencies (RAM before the devices
 * whose state points into it) simply by the order it registers them.
 * vmstate devices are ordinary devices whose hooks run the interpreter.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

void ferry__mutex_lock(pthread_mutex_t *m)
{
	int r = pthread_mutex_lock(m);
	if (r) {
		fprintf(stderr, "ferry: pthread_mutex_lock: %s\n", strerror(r));
		abort();
	}
}

void ferry__mutex_unlock(pthread_mutex_t *m)
{
	int r = pthread_mutex_unlock(m);
	if (r) {
		fprintf(stderr, "ferry: pthread_mutex_unlock: %s\n", strerror(r));
		abort();
	}
}

uint64_t ferry__mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int ferry__copy_sized(void *dst, size_t dst_size, const void *src,
		      const char *what, struct ferry_error *err)
{
	size_t n = *(const size_t *)src;
	const uint8_t *extra = (const uint8_t *)src + dst_size;

	if (n < sizeof(size_t))
		return ferry_error_set(err, -EINVAL,
			"%s: .size is not set (use sizeof(struct %s))", what, what);
	/* A caller built against a newer libferry may know fields we do not:
	 * fine while it left them zero, refused once it relies on one. */
	for (size_t i = 0; n > dst_size && i < n - dst_size; i++)
		if (extra[i])
			return ferry_error_set(err, -E2BIG,
				"%s: field at byte %zu needs a newer libferry",
				what, dst_size + i);
	memset(dst, 0, dst_size);
	memcpy(dst, src, n < dst_size ? n : dst_size);
	*(size_t *)dst = dst_size;
	return 0;
}

void ferry__fill_sized(void *dst, const void *src, size_t src_size)
{
	size_t n = *(const size_t *)dst;

	if (n > src_size)
		n = src_size;
	/* Never write the caller's size field, nor past what it has. */
	if (n > sizeof(size_t))
		memcpy((uint8_t *)dst + sizeof(size_t),
		       (const uint8_t *)src + sizeof(size_t), n - sizeof(size_t));
}

struct ferry_ctx *ferry_ctx_new(struct ferry_error *err)
{
	struct ferry_ctx *ctx = calloc(1, sizeof(*ctx));

	if (!ctx) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	ctx->tail = &ctx->devs;
	ctx->next_section_id = 1;
	pthread_mutex_init(&ctx->load_lock, NULL);
	pthread_cond_init(&ctx->load_cond, NULL);
	return ctx;
}

void ferry_ctx_free(struct ferry_ctx *ctx)
{
	struct ferry_dev *d, *n;

	if (!ctx)
		return;
	ferry__pool_free(ctx->pool);
	pthread_mutex_destroy(&ctx->load_lock);
	pthread_cond_destroy(&ctx->load_cond);
	for (d = ctx->devs; d; d = n) {
		n = d->next;
		free(d);
	}
	free(ctx);
}

struct ferry_dev *ferry__find_dev(struct ferry_ctx *ctx, const char *idstr,
				  uint32_t instance)
{
	for (struct ferry_dev *d = ctx->devs; d; d = d->next)
		if (d->instance == instance && !strcmp(d->idstr, idstr))
			return d;
	return NULL;
}

static int add_dev(struct ferry_ctx *ctx, struct ferry_dev *nd,
		   struct ferry_error *err)
{
	size_t n = strlen(nd->idstr);

	if (n == 0 || n > FERRY_IDSTR_MAX) {
		free(nd);
		return ferry_error_set(err, -EINVAL,
			"device name must be 1..%u bytes", FERRY_IDSTR_MAX);
	}
	if (ferry__find_dev(ctx, nd->idstr, nd->instance)) {
		ferry_error_set(err, -EEXIST,
			"device '%s' instance %u is already registered",
			nd->idstr, nd->instance);
		free(nd);
		return -EEXIST;
	}
	if (nd->min_version > nd->version) {
		ferry_error_set(err, -EINVAL,
			"device '%s': minimum version %u > version %u",
			nd->idstr, nd->min_version, nd->version);
		free(nd);
		return -EINVAL;
	}
	nd->section_id = ctx->next_section_id++;
	*ctx->tail = nd;
	ctx->tail = &nd->next;
	ctx->ndevs++;
	return 0;
}

int ferry_register(struct ferry_ctx *ctx, const char *idstr, uint32_t instance,
		   uint32_t version, uint32_t min_version,
		   const struct ferry_dev_ops *ops, void *opaque,
		   struct ferry_error *err)
{
	struct ferry_dev_ops o;
	struct ferry_dev *d;
	int r;

	if (!ops || !idstr)
		return ferry_error_set(err, -EINVAL, "device needs a name and ops");
	r = ferry__copy_sized(&o, sizeof(o), ops, "ferry_dev_ops", err);
	if (r)
		return r;
	ops = &o;
	if (!ops->load_state || (!ops->save_iterate && !ops->save_state &&
				 !ops->save_complete_thread))
		return ferry_error_set(err, -EINVAL,
			"device '%s': needs load_state and save_iterate or save_state",
			idstr);
	if (ops->save_iterate && (!ops->save_pending || !ops->save_setup ||
				  !ops->save_complete))
		return ferry_error_set(err, -EINVAL,
			"device '%s': iterable devices need save_setup, save_pending "
			"and save_complete", idstr);
	d = calloc(1, sizeof(*d));
	if (!d)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	snprintf(d->idstr, sizeof(d->idstr), "%s", idstr);
	if (strlen(idstr) > FERRY_IDSTR_MAX)
		d->idstr[0] = 0; /* rejected by add_dev */
	d->instance = instance;
	d->version = version;
	d->min_version = min_version;
	d->ops_copy = o;
	d->ops = &d->ops_copy;
	d->opaque = opaque;
	return add_dev(ctx, d, err);
}

/* vmstate devices: the opaque of the hooks is the registry entry. */
static int vms_save_state(struct ferry_chan *c, void *opaque,
			  struct ferry_error *err)
{
	struct ferry_dev *d = opaque;
	return ferry_vmstate_save(c, d->vmsd, d->obj, err);
}

static int vms_load_state(struct ferry_chan *c, void *opaque, uint32_t version,
			  struct ferry_error *err)
{
	struct ferry_dev *d = opaque;
	return ferry_vmstate_load(c, d->vmsd, d->obj, version, err);
}

static const struct ferry_dev_ops vmstate_dev_ops = {
	.size = sizeof(struct ferry_dev_ops),
	.save_state = vms_save_state,
	.load_state = vms_load_state,
};

int ferry_register_vmstate(struct ferry_ctx *ctx, const struct ferry_vmsd *vmsd,
			   uint32_t instance, void *obj, struct ferry_error *err)
{
	struct ferry_dev *d;
	int r;

	if (!vmsd || !vmsd->name || !obj)
		return ferry_error_set(err, -EINVAL,
				       "vmstate registration needs a description and an object");
	r = ferry_vmstate_validate(vmsd, err);
	if (r)
		return r;
	d = calloc(1, sizeof(*d));
	if (!d)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	snprintf(d->idstr, sizeof(d->idstr), "%s", vmsd->name);
	if (strlen(vmsd->name) > FERRY_IDSTR_MAX)
		d->idstr[0] = 0;
	d->instance = instance;
	d->version = vmsd->version;
	d->min_version = vmsd->minimum_version;
	d->ops_copy = vmstate_dev_ops;
	d->ops = &d->ops_copy;
	d->opaque = d;
	d->vmsd = vmsd;
	d->obj = obj;
	return add_dev(ctx, d, err);
}

int ferry_unregister(struct ferry_ctx *ctx, const char *idstr, uint32_t instance)
{
	struct ferry_dev **pp;

	for (pp = &ctx->devs; *pp; pp = &(*pp)->next) {
		struct ferry_dev *d = *pp;
		if (d->instance == instance && !strcmp(d->idstr, idstr)) {
			*pp = d->next;
			if (ctx->tail == &d->next)
				ctx->tail = pp;
			ctx->ndevs--;
			free(d);
			return 0;
		}
	}
	return -ENOENT;
}

char *ferry_ctx_describe_json(struct ferry_ctx *ctx, bool pretty)
{
	return ferry__describe(ctx, pretty);
}
