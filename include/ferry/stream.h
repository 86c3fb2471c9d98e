/*
 * ferry/stream.h - the migration stream: wire constants and the record layer.
 *
 * docs/stream-format.md documents every byte; this header is its C mirror.
 * In short: a 16-byte header, then records. Every record is
 *
 *     u8 type | be32 body_len | body[body_len] | be64 check
 *
 * where check = XXH3-64 over (type, body_len, body) seeded with the record's
 * sequence number in its stream (0 for the first record after the header).
 * So a reader can skip what it does not understand, can never
 * desynchronise, and detects damage, lost records and reordered records
 * before it hands a byte to a device.
 *
 * All integers are big-endian.
 */
#ifndef FERRY_STREAM_H
#define FERRY_STREAM_H

#include <stdbool.h>
#include <stdint.h>

#include "ferry/channel.h"
#include "ferry/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define FERRY_STREAM_MAGIC 0x46525259u /* "FRRY" */
/* Format version: changes only when the framing changes, not per release.
 * Version 2 adds the switchover handshake of live streams (HEARTBEAT,
 * SWITCHOVER_GO/ABORT after EOF, RP LOADED and HEARTBEAT). Readers accept
 * every version from FERRY_STREAM_VERSION_MIN. */
#define FERRY_STREAM_VERSION 2u
#define FERRY_STREAM_VERSION_MIN 1u
#define FERRY_STREAM_HEADER_SIZE 16u
/* u8 type + be32 length before the body, be64 check after it. */
#define FERRY_RECORD_OVERHEAD 13u
/* Default cap on one record body; a larger length is rejected as damage. */
#define FERRY_RECORD_MAX_DEFAULT (256u << 20)
#define FERRY_IDSTR_MAX 255u

enum ferry_record_type {
	FERRY_REC_EOF = 0x00,           /* end of stream; empty body */
	FERRY_REC_SECTION_START = 0x01, /* first chunk of an iterable device */
	FERRY_REC_SECTION_PART = 0x02,  /* a precopy round's chunk */
	FERRY_REC_SECTION_END = 0x03,   /* last chunk, written at switchover */
	FERRY_REC_SECTION_FULL = 0x04,  /* whole state of a non-iterable device */
	FERRY_REC_VMDESC = 0x06,        /* JSON description of the devices */
	FERRY_REC_COMMAND = 0x08,       /* control command, see ferry_cmd */
	FERRY_REC_DEVSTATE = 0x09,      /* device-state buffer (complete-in-thread) */
	FERRY_REC_PAGE = 0x0a,          /* postcopy preempt channel: one page */
	FERRY_REC_DEVSTATE_CONFIG = 0x0b, /* as DEVSTATE: the device's config
					     state, its last buffer */
	FERRY_REC_RETURN = 0x20,        /* return-path message, see ferry_rp */
};

/*
 * Commands (FERRY_REC_COMMAND body: be16 cmd, then the payload). Payload
 * lengths are exact; anything else is rejected.
 */
enum ferry_cmd {
	FERRY_CMD_INVALID = 0,
	FERRY_CMD_OPEN_RETURN_PATH = 1, /* v1: empty; v2: be32 the source's
					   peer-timeout in ms (the destination
					   beats at least 4 times per it) */
	FERRY_CMD_PING = 2,             /* be32 value; answered by RP PONG */
	FERRY_CMD_POSTCOPY_ADVISE = 3,  /* be64 host page size, be64 target page size */
	FERRY_CMD_POSTCOPY_LISTEN = 4,  /* empty */
	FERRY_CMD_POSTCOPY_RUN = 5,     /* empty, or be64 the device digest */
	FERRY_CMD_POSTCOPY_DISCARD = 6, /* str8 block, be32 n, n x (be64 start, be64 len) */
	FERRY_CMD_PACKAGED = 7,         /* nested records, ending with EOF */
	FERRY_CMD_SWITCHOVER_START = 8, /* empty, or be32 flags, be32 n, n x
					   (str8 idstr, be32 instance): the
					   devices whose final state follows
					   in buffers */
	/* Version 2, live streams with a return path: */
	FERRY_CMD_HEARTBEAT = 9,        /* empty; the source is alive */
	FERRY_CMD_SWITCHOVER_GO = 10,   /* empty, after EOF: run the VM */
	FERRY_CMD_SWITCHOVER_ABORT = 11,/* empty, after EOF: the source keeps it */
	/* Postcopy (docs/stream-format.md, "Postcopy"): */
	FERRY_CMD_POSTCOPY_END = 12,    /* be32 status (0): every page was sent */
	FERRY_CMD_POSTCOPY_RESUME = 13, /* empty: first command of a stream that
					   resumes a paused postcopy */
	/* Device state in buffers (docs/stream-format.md, "Device state"): */
	FERRY_CMD_DEVSTATE_DONE = 14,   /* be32 flags, be32 n, n x (str8 idstr,
					   be32 instance, be32 buffers sent) */
	FERRY_CMD_AGREE = 15,           /* be32 flags (FERRY_AGREE_*): settings
					   both sides must share, at setup */
	FERRY_CMD__MAX
};

/* Return-path messages (FERRY_REC_RETURN body: be16 type, then payload). */
enum ferry_rp {
	FERRY_RP_INVALID = 0,
	FERRY_RP_SHUT = 1,           /* be32 status (0 = ok, else errno) + str8 reason */
	FERRY_RP_PONG = 2,           /* be32 value echoed from PING */
	FERRY_RP_REQ_PAGES = 3,      /* str8 block, be64 start, be32 len */
	FERRY_RP_SWITCHOVER_ACK = 4, /* empty */
	/* Version 2: */
	FERRY_RP_LOADED = 5,         /* as SHUT: loaded, waiting for GO */
	FERRY_RP_HEARTBEAT = 6,      /* be32 the destination's peer-timeout in
					ms; the destination is alive */
	/* Postcopy: */
	FERRY_RP_RUNNING = 7,        /* as SHUT: POSTCOPY_RUN loaded, the VM
					runs here (the source never resumes) */
	FERRY_RP_RECV_BITMAP = 8,    /* str8 block, be64 pages, bitmap bytes
					(bit i of byte i/8: page i received) */
	FERRY_RP_RESUME_ACK = 9,     /* empty: every RECV_BITMAP was sent */
	FERRY_RP__MAX
};

/* SWITCHOVER_START and DEVSTATE_DONE flags: the buffers go over multifd,
 * and a sync point on every channel follows the command (SWITCHOVER_START:
 * no buffer before it) or the last buffer (DEVSTATE_DONE). */
#define FERRY_DEVSTATE_MULTIFD 0x1u

/* FERRY_CMD_AGREE flags. */
#define FERRY_AGREE_DEVSTATE_MULTIFD 0x1u /* device state over multifd */
#define FERRY_AGREE_SWITCHOVER_ACK   0x2u /* capability switchover-ack */
#define FERRY_AGREE_DEVSTATE_BUFFERS 0x4u /* some device sends its final
					     state in buffers */
#define FERRY_AGREE__KNOWN           0x7u

/* Limits on command payloads received from the wire. */
#define FERRY_DISCARD_MAX_RANGES (1u << 20)
#define FERRY_PACKAGED_MAX (FERRY_RECORD_MAX_DEFAULT)
/* Largest RECV_BITMAP (pages of one block). */
#define FERRY_RP_BITMAP_MAX_PAGES (1ull << 32)
/* First four bytes of a postcopy preempt channel (then a 16-byte session
 * id), after which it carries FERRY_REC_PAGE records. */
#define FERRY_PREEMPT_MAGIC 0x46525050u /* "FRPP" */
#define FERRY_PREEMPT_HANDSHAKE_SIZE 20u

FERRY_API const char *ferry_record_type_name(unsigned type);
FERRY_API const char *ferry_cmd_name(unsigned cmd);
FERRY_API const char *ferry_rp_name(unsigned type);

/* A decoded record header and body, owned by the reader that produced it. */
struct ferry_record {
	uint8_t type;
	uint32_t len;         /* body length */
	const uint8_t *body;  /* valid until the next ferry_record_read() */
	uint32_t got;         /* body bytes available (< len after truncation) */
	uint64_t offset;      /* stream offset of the type byte */
	uint64_t seq;         /* sequence number (check seed) */
	bool at_end;          /* failed because the stream ended cleanly
				 before this record's first byte */
};

/* Record writer/reader state for one stream direction. */
struct ferry_record_io {
	struct ferry_chan *chan;   /* not owned */
	uint64_t seq;              /* next sequence number */
	uint32_t max_len;          /* reader: body cap (0 = default) */
	uint8_t *buf;              /* reader: body buffer, grown on demand */
	size_t buf_size;
};

/* Header: writes magic, version, flags (0), reserved (0). */
FERRY_API int ferry_stream_write_header(struct ferry_chan *c,
					struct ferry_error *err);
/* Reads and checks the header. Versions outside [FERRY_STREAM_VERSION_MIN,
 * FERRY_STREAM_VERSION] and unknown flags are rejected. */
FERRY_API int ferry_stream_read_header(struct ferry_chan *c,
				       struct ferry_error *err);

/* Write one record. Returns 0 or -errno (the channel's sticky error). */
FERRY_API int ferry_record_write(struct ferry_record_io *io, uint8_t type,
				 const void *body, size_t len,
				 struct ferry_error *err);
/* Write one record whose body is the concatenation of two buffers (a small
 * prefix and a payload), avoiding a copy. */
FERRY_API int ferry_record_write2(struct ferry_record_io *io, uint8_t type,
				  const void *a, size_t alen,
				  const void *b, size_t blen,
				  struct ferry_error *err);
/*
 * Read and verify one record. The body buffer grows with the bytes that
 * actually arrive, so a lying length costs at most about twice the bytes
 * received, never the claimed size. Errors name the offset; -EBADMSG for
 * damage (bad check, absurd length, truncation), -EIO etc. from the
 * transport.
 */
FERRY_API int ferry_record_read(struct ferry_record_io *io,
				struct ferry_record *rec,
				struct ferry_error *err);
/*
 * Best-effort identification of the section a (possibly damaged or
 * truncated) record belongs to, from the first rec->got body bytes: sets
 * *id for section records and copies the idstr of START/FULL records.
 * Returns a bitmask: 1 = id found, 2 = idstr found. For error messages only:
 * nothing it returns is trusted.
 */
FERRY_API int ferry_record_section_hint(const struct ferry_record *rec,
					uint32_t *id, char *idstr,
					size_t idsize);

/* Free the reader buffer. */
FERRY_API void ferry_record_io_release(struct ferry_record_io *io);

/* The check value of a record (exported for tools and tests). */
FERRY_API uint64_t ferry_record_check(uint64_t seq, uint8_t type,
				      const void *body, size_t len);

#ifdef __cplusplus
}
#endif
#endif
