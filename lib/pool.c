/*
 * pool.c - the context's worker threads for save_complete_thread hooks.
 *
 * Why a pool: the hooks run at the switchover, with the guest stopped, and
 * starting a thread there costs downtime for nothing. The save reserves
 * the threads at setup (ferry_save_setup), they wait on a condition
 * variable, and the switchover only hands them jobs.
 *
 * Locks: p->lock guards the job list, the quit flag and every batch's
 * countdown; the jobs themselves run without it. A batch is submitted and
 * waited for by one thread (the migration thread); its jobs must not
 * submit jobs themselves (they would wait for a thread they hold).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct pool_job {
	struct pool_job *next;
	void (*fn)(void *arg);
	void *arg;
	unsigned *left;             /* lock: its batch's countdown */
};

struct ferry__pool {
	pthread_mutex_t lock;
	pthread_cond_t work;        /* a job was queued, or quit */
	pthread_cond_t done;        /* a batch's countdown moved */
	struct pool_job *head, **tail; /* lock */
	bool quit;                  /* lock */
	unsigned nthreads;          /* lock */
	pthread_t threads[FERRY__POOL_MAX];
};

static void *pool_main(void *arg)
{
	struct ferry__pool *p = arg;

	ferry__mutex_lock(&p->lock);
	for (;;) {
		struct pool_job *j;

		while (!p->head && !p->quit)
			pthread_cond_wait(&p->work, &p->lock);
		if (!p->head)
			break;
		j = p->head;
		p->head = j->next;
		if (!p->head)
			p->tail = &p->head;
		ferry__mutex_unlock(&p->lock);
		j->fn(j->arg);
		ferry__mutex_lock(&p->lock);
		(*j->left)--;
		pthread_cond_broadcast(&p->done);
	}
	ferry__mutex_unlock(&p->lock);
	return NULL;
}

int ferry__pool_reserve(struct ferry_ctx *ctx, unsigned n,
			struct ferry_error *err)
{
	struct ferry__pool *p = ctx->pool;
	int r = 0;

	if (n > FERRY__POOL_MAX)
		n = FERRY__POOL_MAX;
	if (!p) {
		if (!n)
			return 0;
		p = calloc(1, sizeof(*p));
		if (!p)
			return ferry_error_set(err, -ENOMEM, "out of memory");
		pthread_mutex_init(&p->lock, NULL);
		pthread_cond_init(&p->work, NULL);
		pthread_cond_init(&p->done, NULL);
		p->tail = &p->head;
		ctx->pool = p;
	}
	ferry__mutex_lock(&p->lock);
	while (p->nthreads < n) {
		int e = pthread_create(&p->threads[p->nthreads], NULL,
				       pool_main, p);

		if (e) {
			r = ferry_error_set(err, -e, "cannot start a save thread: "
					    "%s", strerror(e));
			break;
		}
		p->nthreads++;
	}
	ferry__mutex_unlock(&p->lock);
	return r;
}

struct ferry__pool_batch {
	unsigned left;              /* pool lock: jobs not finished */
	struct pool_job jobs[];
};

struct ferry__pool_batch *ferry__pool_submit(struct ferry_ctx *ctx, unsigned n,
					     void (*fn)(void *arg),
					     void *const *args,
					     struct ferry_error *err)
{
	struct ferry__pool_batch *batch;
	struct ferry__pool *p;

	if (ferry__pool_reserve(ctx, n ? n : 1, err))
		return NULL;
	batch = calloc(1, sizeof(*batch) + (size_t)n * sizeof(batch->jobs[0]));
	if (!batch) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	p = ctx->pool;
	ferry__mutex_lock(&p->lock);
	batch->left = n;
	for (unsigned i = 0; i < n; i++) {
		batch->jobs[i] = (struct pool_job){ .fn = fn, .arg = args[i],
						    .left = &batch->left };
		*p->tail = &batch->jobs[i];
		p->tail = &batch->jobs[i].next;
	}
	pthread_cond_broadcast(&p->work);
	ferry__mutex_unlock(&p->lock);
	return batch;
}

void ferry__pool_wait(struct ferry_ctx *ctx, struct ferry__pool_batch *batch)
{
	struct ferry__pool *p = ctx->pool;

	if (!batch)
		return;
	ferry__mutex_lock(&p->lock);
	while (batch->left)
		pthread_cond_wait(&p->done, &p->lock);
	ferry__mutex_unlock(&p->lock);
	free(batch);
}

void ferry__pool_free(struct ferry__pool *p)
{
	if (!p)
		return;
	ferry__mutex_lock(&p->lock);
	p->quit = true;
	pthread_cond_broadcast(&p->work);
	ferry__mutex_unlock(&p->lock);
	for (unsigned i = 0; i < p->nthreads; i++)
		pthread_join(p->threads[i], NULL);
	pthread_mutex_destroy(&p->lock);
	pthread_cond_destroy(&p->work);
	pthread_cond_destroy(&p->done);
	free(p);
}
