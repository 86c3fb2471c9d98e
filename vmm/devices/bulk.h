/*
 * vmm/devices/bulk.h - an emulated device with large internal state that
 * speaks the VFIO migration protocol (a standalone model: the libferry
 * migration glue is written against this API elsewhere).
 *
 * Why it exists: RAM is not the only big thing a VM migrates. A GPU or a
 * SmartNIC behind VFIO carries hundreds of MiB of device state that changes
 * while the guest runs, and that state leaves through the device's own
 * protocol, not through guest memory. This device stands in for one:
 *
 *   - internal state of @size bytes in 64 KiB chunks (BULK_CHUNK), each
 *     stamped so a destination can prove it holds exactly what the source
 *     had (bulk_verify): a header {magic, device tag, chunk offset,
 *     generation, check} and a fill derived from (tag, offset, generation);
 *   - an optional dirtier thread (bulk_start) that rewrites random chunks
 *     with generation + 1 at a set rate while the device runs;
 *   - the VFIO v2 device state machine (enum bulk_state, the arcs of
 *     VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE in linux/vfio.h without the P2P
 *     states), with PRE_COPY sizing (bulk_pending) as VFIO_MIG_GET_PRECOPY_INFO;
 *   - the data path of the VFIO v1 design: a region with registers
 *     (pending_bytes, data_offset, data_size) and a staged data area that
 *     the source reads records from and the destination writes records to.
 *
 * Records. The source stages one record per data_offset read: a 16-byte
 * header {le32 BULK_REC_MAGIC, le32 count, le64 offset of the first chunk}
 * followed by @count consecutive chunks (1..BULK_REC_MAX_CHUNKS). A record
 * is self-describing: the loader needs its bytes only. Later records win,
 * so a chunk re-sent because it was dirtied again simply overwrites.
 *
 * Save session. Entering PRE_COPY (from RUNNING) or STOP_COPY (from STOP)
 * starts a session: a cursor sweeps every chunk once ("initial" bytes),
 * and a chunk rewritten after the cursor passed it is marked dirty ("dirty"
 * bytes) and re-sent. PRE_COPY->STOP_COPY keeps the session going; in
 * STOP_COPY the device no longer changes, so the remainder is exact.
 *
 * Threads and locks. d->lock guards everything that changes after
 * bulk_new: the state machine, the content, the dirty bitmap, the region
 * and its registers, the statistics. Every function below takes it unless
 * said otherwise, so any thread may call them; the dirtier takes it for
 * one chunk rewrite at a time. The region's register sequence (data_offset,
 * data_size, writes) is per device, not per caller: one migration thread
 * drives it. bulk_new, bulk_free, bulk_start and bulk_stop are the owner's
 * (one control thread); bulk_free must not race with any other call.
 *
 * Errors: 0 or -errno, with an optional struct ferry_error filled only on
 * failure. Bad input never aborts. A failure inside the device (a record
 * it cannot consume, incomplete data at the end of a load) moves it to
 * BULK_ERROR, which only bulk_reset leaves.
 */
#ifndef FERRY_VMM_BULK_H
#define FERRY_VMM_BULK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ferry/common.h"

#define BULK_CHUNK          (64u * 1024)     /* state granule */
#define BULK_STAMP_MAGIC    0x4b4e48434b4c5542ull /* "BULKCHNK" in memory (LE) */
#define BULK_STAMP_SIZE     40u              /* 5 x u64 at each chunk's start */

/* ---- region layout ---------------------------------------------------- */

/* Registers at the start of the region, as VFIO v1's struct
 * vfio_device_migration_info. The register functions below are the
 * accesses with effects; bulk_region_read of this area returns the values
 * as last latched and has no side effect. */
#define BULK_REG_DEVICE_STATE 0x00  /* u32: enum bulk_state */
#define BULK_REG_PENDING      0x08  /* u64: pending_bytes */
#define BULK_REG_DATA_OFFSET  0x10  /* u64: data_offset */
#define BULK_REG_DATA_SIZE    0x18  /* u64: data_size */

#define BULK_REC_MAGIC      0x43455242u  /* "BREC" */
#define BULK_REC_HDR_SIZE   16u
#define BULK_REC_MAX_CHUNKS 16u
/* Largest record, and the size of the region's data area. */
#define BULK_REC_MAX        (BULK_REC_HDR_SIZE + BULK_REC_MAX_CHUNKS * BULK_CHUNK)
/* The data area starts so that the chunks of a record (after its 16-byte
 * header) are page aligned in the region: a zero-copy reader that maps the
 * region gets page-aligned chunk data. */
#define BULK_DATA_OFFSET    (4096u - BULK_REC_HDR_SIZE)
#define BULK_REGION_SIZE    (BULK_DATA_OFFSET + BULK_REC_MAX) /* 1 MiB + 4 KiB */

/* Config blob (bulk_config_save) size. */
#define BULK_CONFIG_SIZE    80u

/* Largest accepted dirty rate: keeps the pacer's arithmetic far from
 * overflow. */
#define BULK_MAX_RATE_MBPS  (1u << 20)

/* ---- device ------------------------------------------------------------ */

/* VFIO v2 migration states (linux/vfio.h enum vfio_device_mig_state
 * without the P2P states; the values are ours, not the kernel's). */
enum bulk_state {
	BULK_RUNNING,
	BULK_STOP,
	BULK_PRE_COPY,
	BULK_STOP_COPY,
	BULK_RESUMING,
	BULK_ERROR,
	BULK_NR_STATES
};

struct bulk_dev;

/* Cumulative over the device's life (bulk_reset keeps them). "Bytes" are
 * record bytes, headers included: what crosses the wire. */
struct bulk_stats {
	uint64_t precopy_bytes, precopy_records;   /* handed out in PRE_COPY */
	uint64_t stopcopy_bytes, stopcopy_records; /* handed out in STOP_COPY */
	uint64_t loaded_bytes, loaded_records;     /* consumed in RESUMING */
	uint64_t chunks_dirtied;                   /* dirtier rewrites */
};

/*
 * Create device @id with @size bytes of state (a positive multiple of
 * BULK_CHUNK), every chunk stamped with generation 1. @dirty_rate_mbps is
 * the dirtier's rate in MiB/s (0: bulk_start starts nothing); @precopy says
 * whether the device offers PRE_COPY (VFIO_MIGRATION_PRE_COPY): without it
 * the PRE_COPY arcs are rejected. The device starts in BULK_RUNNING.
 * The device tag (XXH3-64 of @id) is in every stamp, so a destination
 * must be created with the source's id. NULL on failure.
 */
struct bulk_dev *bulk_new(const char *id, uint64_t size,
			  uint64_t dirty_rate_mbps, bool precopy,
			  struct ferry_error *err);
/* Stops the dirtier and frees. NULL is a no-op. */
void bulk_free(struct bulk_dev *d);
const char *bulk_id(const struct bulk_dev *d);   /* no lock: immutable */
uint64_t bulk_size(const struct bulk_dev *d);    /* no lock: immutable */
uint64_t bulk_tag(const struct bulk_dev *d);     /* no lock: immutable */
bool bulk_has_precopy(const struct bulk_dev *d); /* no lock: immutable */
void bulk_get_stats(struct bulk_dev *d, struct bulk_stats *st);

/*
 * The dirtier: a thread that, while the device is RUNNING or PRE_COPY,
 * rewrites random chunks at the device's rate in 10 ms steps (the lock is
 * held for one chunk at a time). It idles in the other states. Owner's
 * calls: bulk_start on a running dirtier is -EBUSY, with rate 0 it starts
 * nothing and returns 0; bulk_stop joins it and may be called at any time.
 */
int bulk_start(struct bulk_dev *d, struct ferry_error *err);
void bulk_stop(struct bulk_dev *d);

/*
 * Check every chunk's stamp (magic, device tag, offset, check) and
 * regenerate its fill; *bad_chunks counts the chunks that fail. *digest
 * (optional) is XXH3-64 over the whole state. Holds the lock for the whole
 * pass, so the result is one consistent snapshot even with the dirtier
 * running (which waits meanwhile). Returns 0 (a bad chunk is a result,
 * not an error).
 */
int bulk_verify(struct bulk_dev *d, uint64_t *bad_chunks, uint64_t *digest);

/* ---- state machine ------------------------------------------------------ */

const char *bulk_state_name(enum bulk_state s);  /* "?" when out of range */
enum bulk_state bulk_get_state(struct bulk_dev *d);

/*
 * Move to @to along one direct arc:
 *   RUNNING->STOP, RUNNING->PRE_COPY, PRE_COPY->RUNNING,
 *   PRE_COPY->STOP_COPY, STOP->RUNNING, STOP->STOP_COPY, STOP->RESUMING,
 *   STOP_COPY->STOP, RESUMING->STOP,
 * or stay (@to == current, a no-op, as the kernel does) in any state but
 * ERROR. Anything else is -EINVAL naming both states, state unchanged;
 * nothing leaves ERROR but bulk_reset. RESUMING->STOP with a record half
 * written to the data area is -EIO and the device enters ERROR: the state
 * it loaded is incomplete. Leaving a save state discards the staged record
 * (if its data_size was never read, its chunks are queued again).
 */
int bulk_set_state(struct bulk_dev *d, enum bulk_state to,
		   struct ferry_error *err);
/* Device reset (VFIO_DEVICE_RESET): back to RUNNING from any state, with
 * sessions and the region cleared; the content stays as it is. */
void bulk_reset(struct bulk_dev *d);

/*
 * Bytes of state still to send in this save session (chunk bytes, record
 * headers not counted): never sent yet (@initial_bytes) and sent but
 * rewritten since (@dirty_bytes). An estimate in PRE_COPY (the dirtier
 * adds to it), exact in STOP_COPY. -EINVAL in other states.
 */
int bulk_pending(struct bulk_dev *d, uint64_t *initial_bytes,
		 uint64_t *dirty_bytes);

/* ---- the staged-buffer region (VFIO v1 data path) ----------------------- */

/*
 * Source, in PRE_COPY or STOP_COPY:
 *   bulk_read_pending_bytes  initial + dirty bytes (as bulk_pending);
 *   bulk_read_data_offset    stage the next record into the data area (the
 *                            staged chunks count as sent from now on) and
 *                            return BULK_DATA_OFFSET. Reading it again
 *                            before data_size re-reads the same record;
 *   bulk_read_data_size      the staged record's size, 0 when nothing was
 *                            pending; -EINVAL unless data_offset was read
 *                            first for this record;
 *   then bulk_region_read (or the mapping) of that many bytes.
 * Destination, in RESUMING:
 *   bulk_read_data_offset    where the next record goes (BULK_DATA_OFFSET);
 *   bulk_region_write        the record's bytes, inside the data area and
 *                            contiguous from its start (a gap is -EINVAL);
 *   bulk_write_data_size     the device consumes the record. A record it
 *                            cannot make sense of (-EBADMSG: magic, count,
 *                            offset; -EINVAL: a size that disagrees with
 *                            the header or the bytes written) changes no
 *                            state byte and moves the device to ERROR.
 * Accesses in any other state, or out of sequence, are -EINVAL and change
 * nothing.
 */
int bulk_read_pending_bytes(struct bulk_dev *d, uint64_t *out,
			    struct ferry_error *err);
int bulk_read_data_offset(struct bulk_dev *d, uint64_t *off,
			  struct ferry_error *err);
int bulk_read_data_size(struct bulk_dev *d, uint64_t *sz,
			struct ferry_error *err);
int bulk_write_data_size(struct bulk_dev *d, uint64_t sz,
			 struct ferry_error *err);

/* Plain region access, [off, off + len) within BULK_REGION_SIZE, else
 * -EINVAL. Reads work in every state; writes as described above. */
int bulk_region_read(struct bulk_dev *d, uint64_t off, void *buf, size_t len,
		     struct ferry_error *err);
int bulk_region_write(struct bulk_dev *d, uint64_t off, const void *buf,
		      size_t len, struct ferry_error *err);
/*
 * The region itself, for zero-copy reads (*len = BULK_REGION_SIZE); valid
 * until bulk_free. An optimisation only: bulk_region_read always works and
 * a caller must be able to fall back to it. Reads through the pointer take
 * no lock, so they are only meaningful for the data area between the
 * migration thread's own data_size read and its next data_offset read,
 * when nothing else writes there.
 */
const void *bulk_region_map(struct bulk_dev *d, size_t *len);

/* ---- what the migration glue calls --------------------------------------- */

/*
 * Source: one record through the v1 sequence (pending_bytes, data_offset,
 * data_size, region read) into @buf. *len = 0: nothing pending. @cap must
 * be at least BULK_REC_MAX (checked before anything is staged, so no data
 * is lost to a small buffer).
 */
int bulk_save_chunk(struct bulk_dev *d, void *buf, size_t cap, size_t *len,
		    struct ferry_error *err);
/* Destination: one record (the bytes bulk_save_chunk produced) through
 * data_offset, region write, data_size. */
int bulk_load_chunk(struct bulk_dev *d, const void *buf, size_t len,
		    struct ferry_error *err);

/*
 * Config state: a BULK_CONFIG_SIZE blob {magic, version, size, tag, chunk
 * size, flags, data_offset register, region size, records and chunk bytes
 * handed out in this session, pending bytes, XXH3 check}. Saved in STOP_COPY (returns 0 elsewhere, or when @cap is
 * short); the flags say whether the session was drained (nothing pending).
 * Loaded in RESUMING after the data: a blob from a device of another size
 * or id is -EINVAL (state unchanged); a damaged blob is -EBADMSG; when the
 * source was drained, every chunk must have arrived in this RESUMING
 * session and the record count must match, else -EIO and ERROR.
 */
size_t bulk_config_save(struct bulk_dev *d, void *buf, size_t cap);
int bulk_config_load(struct bulk_dev *d, const void *buf, size_t len,
		     struct ferry_error *err);

#endif
