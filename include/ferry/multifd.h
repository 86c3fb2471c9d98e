/*
 * ferry/multifd.h - parallel RAM (and device-state) transfer over extra
 * connections ("multifd").
 *
 * The main migration stream stays the single ordered channel for sections
 * and commands; RAM pages travel over N extra sockets in parallel, one
 * thread per socket on each side. Wire format: docs/stream-format.md,
 * "Multifd channels". In short:
 *
 *   per channel, once:  handshake (64 bytes): magic "FRMF", version,
 *                        16-byte session id, channel id, channels,
 *                        compression, packet pages, check
 *   then packets:       header (48 bytes), page offsets (be64, normal then
 *                        zero) or a device idstr, payload (raw pages or one
 *                        zstd frame), XXH3-64 check over all of it
 *
 * Source: the migration thread queues (block, offset) pairs without reading
 * the pages; a full packet is handed to an idle channel thread (pointer
 * swap), which copies the pages, detects zero pages, compresses, checks and
 * writes. When every channel is busy the migration thread waits: that is
 * the back-pressure.
 *
 * Sync points: ferry_multifd_send_sync() puts a SYNC packet on every
 * channel behind what is queued and waits until each is written; the RAM
 * device pairs each with a MULTIFD_FLUSH record on the main stream. On the
 * destination a channel thread that reads SYNC stops until the load thread
 * reaches that MULTIFD_FLUSH and calls ferry_multifd_recv_sync(), which waits
 * for every channel to arrive and releases them together. So no packet sent
 * after a sync is applied before every packet sent before it: a page of
 * round N never lands after the same page of round N+1.
 *
 * Errors fail everything fast: the first error (EOF inside a packet, a bad
 * packet, a write failure) is recorded, every waiter wakes, every socket is
 * shut down so blocked threads return, and every later call returns it.
 *
 * Threads: ferry_multifd_queue_page() and ferry_multifd_send_sync() belong to
 * the migration thread; ferry_multifd_send_devstate() may be called from any
 * thread (serialised per device by the caller); ferry_multifd_recv_sync()
 * belongs to the load thread; the stats and error getters are callable from
 * anywhere. The devstate callback runs in a channel thread, one call at a
 * time.
 */
#ifndef FERRY_MULTIFD_H
#define FERRY_MULTIFD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ferry/common.h"
#include "ferry/ram.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- wire constants (docs/stream-format.md, "Multifd channels") -------- */

#define FERRY_MULTIFD_MAGIC        0x46524d46u /* "FRMF": channel handshake */
#define FERRY_MULTIFD_PACKET_MAGIC 0x46524d50u /* "FRMP": every packet */
#define FERRY_MULTIFD_VERSION      1u
#define FERRY_MULTIFD_HANDSHAKE_SIZE 64u
#define FERRY_MULTIFD_HEADER_SIZE    48u

/* Packet flags. */
#define FERRY_MULTIFD_FLAG_SYNC         0x01u /* sync point; no pages */
#define FERRY_MULTIFD_FLAG_COMP_MASK    0x3eu /* compression kind << 1 */
#define FERRY_MULTIFD_FLAG_DEVICE_STATE 0x40u /* device state, not RAM */
/* With DEVICE_STATE: the device's config state, its last buffer. */
#define FERRY_MULTIFD_FLAG_DEVICE_CONFIG 0x80u

#define FERRY_MULTIFD_MAX_CHANNELS 16u
#define FERRY_MULTIFD_PACKET_PAGES_DEFAULT 128u  /* 512 KiB of 4 KiB pages */
#define FERRY_MULTIFD_PACKET_PAGES_MAX 1024u
/* Largest device-state buffer carried by one packet. */
#define FERRY_MULTIFD_DEVSTATE_MAX (16u << 20)
/* Distinct devices that may send state over one multifd instance. */
#define FERRY_MULTIFD_MAX_DEVICES 256u
/* Out-of-order device-state buffers a destination holds before failing:
 * bytes (each buffer costs its length plus FERRY_MULTIFD_REORDER_OVERHEAD)
 * and count, so neither large nor empty buffers can grow it without
 * bound. A real source has at most one buffer in flight per channel. */
#define FERRY_MULTIFD_REORDER_MAX (64u << 20)
#define FERRY_MULTIFD_REORDER_MAX_BUFFERS 1024u
#define FERRY_MULTIFD_REORDER_OVERHEAD 64u

enum ferry_multifd_compression {
	FERRY_MULTIFD_COMP_NONE = 0,
	FERRY_MULTIFD_COMP_ZSTD = 1,
};

struct ferry_multifd_params {
	size_t size;    /* sizeof(struct ferry_multifd_params) */
	/* Both sides: number of channels, 1..FERRY_MULTIFD_MAX_CHANNELS. */
	unsigned channels;
	/* Source: page compression (the destination follows the handshake). */
	enum ferry_multifd_compression compression;
	/* Source: zstd level (0 = 1). */
	int zstd_level;
	/* Source: pages per packet, 0 = 128. Also caps packet bytes at
	 * packet_pages * 4 KiB (blocks with larger pages get fewer per packet).
	 * The destination follows the source's handshake (up to
	 * FERRY_MULTIFD_PACKET_PAGES_MAX), whatever its own value. */
	uint32_t packet_pages;
	/* Source: the session id; all zero = random (see
	 * ferry_multifd_session()). Destination: the session to accept; all
	 * zero = learn it from the main stream (ferry_multifd_recv_expect()). */
	uint8_t session[16];
	/* Destination: device-state buffers, per device in the order sent.
	 * Runs in a channel thread, never concurrently with itself. NULL =
	 * device-state packets fail the migration. */
	int (*devstate)(void *opaque, const char *idstr, uint32_t instance,
			const void *buf, size_t len, struct ferry_error *err);
	void *opaque;
	/* Source: a channel write that makes no progress for this long fails
	 * the migration (a destination that stopped reading); 0 = no limit. */
	uint32_t timeout_ms;
	/* Destination, instead of devstate: every device-state buffer as it
	 * arrives, with its per-device index @seq and @flags (0 or
	 * FERRY_MULTIFD_FLAG_DEVICE_CONFIG); the callee orders them (e.g.
	 * ferry_load_devstate()). Runs in the channel threads, concurrently;
	 * it may block (backpressure: that channel stops reading). @buf is
	 * valid only during the call. */
	int (*devstate_seq)(void *opaque, const char *idstr, uint32_t instance,
			    uint32_t seq, uint32_t flags, const void *buf,
			    size_t len, struct ferry_error *err);
};

struct ferry_multifd_chan_stats {
	uint64_t bytes;     /* wire bytes, handshake included */
	uint64_t packets;
};

struct ferry_multifd_stats {
	unsigned channels;
	struct ferry_multifd_chan_stats chan[FERRY_MULTIFD_MAX_CHANNELS];
	uint64_t normal_pages;   /* pages carried with data */
	uint64_t zero_pages;     /* pages carried as offsets only */
	uint64_t raw_bytes;      /* data page bytes before compression */
	uint64_t payload_bytes;  /* data page bytes after compression */
	uint64_t syncs;          /* sync points completed */
	uint64_t devstate_packets;
	uint64_t devstate_bytes;
};

struct ferry_multifd;

/*
 * Source. Takes ownership of @fds (params->channels connected sockets, in
 * channel-id order): they are closed by ferry_multifd_free(), or before
 * returning on failure. Each channel thread writes its handshake first.
 */
FERRY_API struct ferry_multifd *
ferry_multifd_send_new(const struct ferry_multifd_params *p, const int *fds,
		       struct ferry_error *err);

/*
 * Destination. Channels are added as they are accepted, in any order.
 * Set the block table (ferry_multifd_set_blocks, done by
 * ferry_ram_set_multifd_recv) before adding channels.
 */
FERRY_API struct ferry_multifd *
ferry_multifd_recv_new(const struct ferry_multifd_params *p,
		       struct ferry_error *err);
/* Takes ownership of @fd (closed on failure too) and starts its thread,
 * which reads and validates the handshake. At most params->channels. */
FERRY_API int ferry_multifd_recv_add_channel(struct ferry_multifd *m, int fd,
					     struct ferry_error *err);
/* Destination: what the main stream says (the RAM START section): the
 * session, channel count and compression the source uses. A mismatch with
 * the parameters or with a handshake fails the migration. */
FERRY_API int ferry_multifd_recv_expect(struct ferry_multifd *m,
					const uint8_t session[16],
					unsigned channels, unsigned compression,
					struct ferry_error *err);

/* The session id (source: chosen at creation). */
FERRY_API void ferry_multifd_session(const struct ferry_multifd *m,
				     uint8_t out[16]);
/* Channel count and compression as configured. */
FERRY_API unsigned ferry_multifd_channels(const struct ferry_multifd *m);
FERRY_API unsigned ferry_multifd_compression(const struct ferry_multifd *m);

/*
 * The RAM block table page offsets refer to (block index = position).
 * Called once, by ferry_ram_set_multifd_send/recv; the table must stay
 * valid and unchanged until ferry_multifd_free().
 */
FERRY_API int ferry_multifd_set_blocks(struct ferry_multifd *m,
				       const struct ferry_ram_block *blocks,
				       unsigned nblocks,
				       struct ferry_error *err);

/* Source, migration thread: send page @offset of block @block. The page is
 * read later by a channel thread, so its dirty bit must be cleared first.
 * May block while every channel is busy. */
FERRY_API int ferry_multifd_queue_page(struct ferry_multifd *m, unsigned block,
				       uint64_t offset, struct ferry_error *err);
/* Source, migration thread: send the partial packet, a SYNC on every
 * channel, and wait until all of them are written. */
FERRY_API int ferry_multifd_send_sync(struct ferry_multifd *m,
				      struct ferry_error *err);
/* Source, any thread: one device-state buffer as a DEVICE_STATE packet on
 * some idle channel, written by the calling thread before it returns (no
 * copy: callers in several threads write on several channels at once);
 * per (idstr, instance) the buffers are numbered from 0 and delivered in
 * that order. @flags: 0, or
 * FERRY_MULTIFD_FLAG_DEVICE_CONFIG for the device's last buffer. */
FERRY_API int ferry_multifd_send_devstate(struct ferry_multifd *m,
					  const char *idstr, uint32_t instance,
					  uint32_t flags, const void *buf,
					  size_t len, struct ferry_error *err);

/* Destination, load thread: wait until every channel has reached its next
 * SYNC (everything before it applied), then release them. */
FERRY_API int ferry_multifd_recv_sync(struct ferry_multifd *m,
				      struct ferry_error *err);

/* The first error (0 if none), its message into @err. */
FERRY_API int ferry_multifd_error(struct ferry_multifd *m,
				  struct ferry_error *err);
/* Fail the migration from outside (e.g. the main stream broke): wakes and
 * unblocks everything. */
FERRY_API void ferry_multifd_cancel(struct ferry_multifd *m, int code,
				    const char *why);

FERRY_API void ferry_multifd_get_stats(struct ferry_multifd *m,
				       struct ferry_multifd_stats *st);

/* Stop the threads (shutting the sockets down if they are blocked), join
 * them, close the sockets, free. NULL is a no-op. */
FERRY_API void ferry_multifd_free(struct ferry_multifd *m);

#ifdef __cplusplus
}
#endif
#endif
