/*
 * pool.c - the context's worker threads: save_complete_thread hooks on a
 * source, postcopy's fault and listen threads on a destination.
 *
 * Why a pool: these run from the switchover on, with the guest stopped,
 * and starting a thread there costs downtime for nothing (0.2-3 ms each
 * measured on a postcopy destination, where the new stack's mmap waits
 * for mmap_lock behind the threads placing pages). The save reserves the
 * threads at setup (ferry_save_setup), the destination at POSTCOPY_ADVISE;
 * they wait on a condition variable, and the switchover only hands them
 * jobs. A job may run as long as it likes (a fault thread runs until every
 * page is in): submit makes sure each job of a batch has a thread of its
 * own, never one that a long job holds - while at most FERRY__POOL_MAX
 * jobs are busy; past that, jobs queue for a thread (a source with more
 * devices than that saving in parallel).
 *
 * Locks: p->lock guards the job list, the quit flag, the busy count and
 * every batch's countdown; the jobs themselves run without it. Batches are
 * submitted by the context's one migration thread at a time (the source's
 * migration thread, the destination's load thread), each is waited for
 * once, by one thread.
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
	unsigned busy;              /* lock: jobs queued or running */
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
		p->busy--;
		pthread_cond_broadcast(&p->done);
	}
	ferry__mutex_unlock(&p->lock);
	return NULL;
}

/* The pool of @ctx, created empty if it has none. The context's one
 * migration thread at a time calls this (save setup, the load thread). */
static struct ferry__pool *pool_of(struct ferry_ctx *ctx,
				   struct ferry_error *err)
{
	struct ferry__pool *p = ctx->pool;

	if (p)
		return p;
	p = calloc(1, sizeof(*p));
	if (!p) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->work, NULL);
	pthread_cond_init(&p->done, NULL);
	p->tail = &p->head;
	ctx->pool = p;
	return p;
}

/* At least @n threads, or with @idle @n threads beyond the busy ones;
 * with @cap at most FERRY__POOL_MAX (jobs beyond queue), else -EAGAIN
 * past it. Lock held. */
static int reserve_locked(struct ferry__pool *p, unsigned n, bool idle,
			  bool cap, struct ferry_error *err)
{
	if (idle)
		n += p->busy;
	if (n > FERRY__POOL_MAX && cap)
		n = FERRY__POOL_MAX;
	if (n > FERRY__POOL_MAX)
		return ferry_error_set(err, -EAGAIN, "more than %u jobs for the "
				       "context's threads", FERRY__POOL_MAX);
	while (p->nthreads < n) {
		int e = pthread_create(&p->threads[p->nthreads], NULL,
				       pool_main, p);

		if (e)
			return ferry_error_set(err, -e, "cannot start a worker "
					       "thread: %s", strerror(e));
		p->nthreads++;
	}
	return 0;
}

static int reserve(struct ferry_ctx *ctx, unsigned n, bool idle,
		   struct ferry_error *err)
{
	struct ferry__pool *p;
	int r;

	if (!n && !ctx->pool)
		return 0;
	if (!(p = pool_of(ctx, err)))
		return -ENOMEM;
	ferry__mutex_lock(&p->lock);
	r = reserve_locked(p, n, idle, false, err);
	ferry__mutex_unlock(&p->lock);
	return r;
}

int ferry__pool_reserve(struct ferry_ctx *ctx, unsigned n,
			struct ferry_error *err)
{
	return reserve(ctx, n > FERRY__POOL_MAX ? FERRY__POOL_MAX : n, false,
		       err);
}

int ferry__pool_reserve_idle(struct ferry_ctx *ctx, unsigned n,
			     struct ferry_error *err)
{
	return reserve(ctx, n, true, err);
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

	if (!(p = pool_of(ctx, err)))
		return NULL;
	batch = calloc(1, sizeof(*batch) + (size_t)n * sizeof(batch->jobs[0]));
	if (!batch) {
		ferry_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	ferry__mutex_lock(&p->lock);
	/* A thread for each job (up to the cap: more jobs than that wait for
	 * one), counted and queued in one go. */
	if (reserve_locked(p, n, true, true, err)) {
		ferry__mutex_unlock(&p->lock);
		free(batch);
		return NULL;
	}
	batch->left = n;
	p->busy += n;
	for (unsigned i = 0; i < n; i++) {
		batch->jobs[i] = (struct pool_job){ .fn = fn, .arg = args[i],
						    .left = &batch->left };
		*p->tail = &batch->jobs[i];
		p->tail = &batch->jobs[i].next;
		/* One waiter per job: waking every idle thread to fight for
		 * the lock costs the submitter (inside the downtime). */
		pthread_cond_signal(&p->work);
	}
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

unsigned ferry__pool_busy(struct ferry_ctx *ctx)
{
	struct ferry__pool *p = ctx->pool;
	unsigned n;

	if (!p)
		return 0;
	ferry__mutex_lock(&p->lock);
	n = p->busy;
	ferry__mutex_unlock(&p->lock);
	return n;
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
