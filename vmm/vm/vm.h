/*
 * vmm/vm/vm.h - the reference VMM: one guest, its RAM, devices, backend,
 * control socket, and its migrations.
 *
 * The VMM uses libferry only through the public headers, as any VMM would.
 */
#ifndef FERRY_VMM_VM_H
#define FERRY_VMM_VM_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "ferry/ferry.h"
#include "devices/devices.h"
#include "guest/layout.h"
#include "vm/backend.h"

enum vm_backend_kind { VM_BACKEND_AUTO, VM_BACKEND_KVM, VM_BACKEND_THREAD };

/* The guest workload, as given by --workload. */
struct vm_workload {
	uint32_t kind;        /* enum guest_workload */
	uint32_t pattern;     /* enum guest_pattern */
	uint64_t ws_bytes;    /* 0 = all of the data area */
	uint64_t rate_mbps;   /* 0 = flat out */
};

/* --device bulk,size=SIZE[,dirty-rate=MBPS][,precopy=on|off] */
#define VM_MAX_BULK 8u
struct vm_bulk_spec {
	uint64_t size;
	uint64_t dirty_rate;          /* MB/s, 0 = never changes */
	bool precopy;
};

struct vm_config {
	uint64_t mem;                 /* bytes of guest RAM */
	unsigned vcpus;
	enum vm_backend_kind backend;
	struct vm_workload workload;
	unsigned ndevices;            /* virtio-like devices */
	const char *control;          /* unix socket path, or NULL */
	const char *incoming;         /* URI to load from, or NULL */
	bool paused;                  /* stay paused after start/load */
	bool memfd;                   /* memfd-backed RAM instead of anonymous */
	bool postcopy;                /* capability postcopy-ram from the start */
	bool prealloc;                /* fault in all guest RAM at creation */
	struct vm_bulk_spec bulk[VM_MAX_BULK];
	unsigned nbulk;
	const char *device_state_channel; /* "main" | "multifd", or NULL */
	const char *tls_creds;          /* parameter tls-creds, or NULL */
	const char *tls_authz;          /* parameter tls-authz, or NULL */
	bool bar_reversed;            /* --bar-layout reversed (vm-devices.c) */
};

/* Run states are libferry's (enum ferry_run_state, QEMU's names): the
 * engine moves the VM through finish-migrate, postmigrate and inmigrate. */
int vm_parse_workload(const char *spec, struct vm_workload *wl,
		      struct ferry_error *err);
int vm_parse_size(const char *s, uint64_t *out);
/* Add one --device spec to @cfg (vm-bulk.c). */
int vm_parse_device(const char *spec, struct vm_config *cfg,
		    struct ferry_error *err);

struct vm;

struct vm *vm_create(const struct vm_config *cfg, struct ferry_error *err);
void vm_destroy(struct vm *vm);

/* Boot a fresh guest and run it unless paused. An incoming VM (--incoming)
 * is already waiting for its state: the engine loads it and runs it (or
 * leaves it paused) on its own; a failed load ends the process with 1. */
int vm_start(struct vm *vm, struct ferry_error *err);
/* Serve the control socket until quit or the guest fails. Returns the
 * process exit status. */
int vm_main_loop(struct vm *vm);

/* Ask the main loop to return; async-signal-safe. */
void vm_request_quit_async(struct vm *vm);

int vm_stop(struct vm *vm, struct ferry_error *err);
int vm_cont(struct vm *vm, struct ferry_error *err);
enum ferry_run_state vm_run_state(struct vm *vm);

/* Guest view, from the status block. */
struct vm_guest_info {
	uint64_t generation, heartbeat, verify_passes, bad_pages;
	uint64_t first_bad_page, last_bad_page, verify_seq;
	uint32_t state, workload;
	bool booted;
};
void vm_guest_info(struct vm *vm, struct vm_guest_info *gi);
/* Ask the guest for a verify pass; returns the sequence number to wait for. */
uint64_t vm_guest_verify(struct vm *vm);
/* Wait until the guest finished verify pass @seq (timeout_ms, -1 forever). */
int vm_guest_wait_verify(struct vm *vm, uint64_t seq, int timeout_ms,
			 struct ferry_error *err);

/* XXH3-128 of all guest RAM, as 32 hex digits; VM must be stopped. */
int vm_ram_digest(struct vm *vm, char out[33], struct ferry_error *err);

/* Outgoing migration to @uri, run by the engine (vm-migrate.c). */
/* @resume: reconnect a paused postcopy (QMP migrate "resume": true). */
int vm_migrate(struct vm *vm, const char *uri, bool resume,
	       struct ferry_error *err);

/*
 * Register every device description the VMM uses (both vCPU flavours,
 * serial, timer, virtio), in stream order, for `ferry vmstate-schema`.
 * Objects are placeholders: describe() reads descriptions, never state.
 */
int vm_register_schema(struct ferry_ctx *ctx, struct ferry_error *err);

/* Backends use these. */
uint8_t *vm_ram(struct vm *vm);
uint64_t vm_ram_size(struct vm *vm);
unsigned vm_vcpus(struct vm *vm);
/* Fill the command block for a first boot (workload, TSC frequency). */
void vm_guest_setup_cmd(struct vm *vm, uint64_t tsc_hz);

#endif
