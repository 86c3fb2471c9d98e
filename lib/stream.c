/*
 * stream.c - the checked record layer of the migration stream.
 *
 * Why length + check on every record (QEMU has neither): a QEMU destination
 * that meets a field it does not expect reads garbage as the next section
 * header and fails far from the cause, or worse, loads it. Here the reader
 * knows each record's extent before parsing it, refuses damaged records
 * before any byte reaches a device, and seeds the check with the record's
 * sequence number so a dropped, duplicated or reordered record is caught as
 * surely as a flipped bit.
 *
 * The reader never trusts a length: it grows its buffer as bytes arrive,
 * so a claimed 200 MiB body on a 1 KiB truncated stream costs 64 KiB.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "ferry/stream.h"
#include "internal.h"

static const char *const rec_names[256] = {
	[FERRY_REC_EOF] = "EOF",
	[FERRY_REC_SECTION_START] = "SECTION_START",
	[FERRY_REC_SECTION_PART] = "SECTION_PART",
	[FERRY_REC_SECTION_END] = "SECTION_END",
	[FERRY_REC_SECTION_FULL] = "SECTION_FULL",
	[FERRY_REC_VMDESC] = "VMDESC",
	[FERRY_REC_COMMAND] = "COMMAND",
	[FERRY_REC_DEVSTATE] = "DEVSTATE",
	[FERRY_REC_DEVSTATE_CONFIG] = "DEVSTATE_CONFIG",
	[FERRY_REC_PAGE] = "PAGE",
	[FERRY_REC_RETURN] = "RETURN",
};

static const char *const cmd_names[FERRY_CMD__MAX] = {
	[FERRY_CMD_INVALID] = "INVALID",
	[FERRY_CMD_OPEN_RETURN_PATH] = "OPEN_RETURN_PATH",
	[FERRY_CMD_PING] = "PING",
	[FERRY_CMD_POSTCOPY_ADVISE] = "POSTCOPY_ADVISE",
	[FERRY_CMD_POSTCOPY_LISTEN] = "POSTCOPY_LISTEN",
	[FERRY_CMD_POSTCOPY_RUN] = "POSTCOPY_RUN",
	[FERRY_CMD_POSTCOPY_DISCARD] = "POSTCOPY_DISCARD",
	[FERRY_CMD_PACKAGED] = "PACKAGED",
	[FERRY_CMD_SWITCHOVER_START] = "SWITCHOVER_START",
	[FERRY_CMD_HEARTBEAT] = "HEARTBEAT",
	[FERRY_CMD_SWITCHOVER_GO] = "SWITCHOVER_GO",
	[FERRY_CMD_SWITCHOVER_ABORT] = "SWITCHOVER_ABORT",
	[FERRY_CMD_POSTCOPY_END] = "POSTCOPY_END",
	[FERRY_CMD_POSTCOPY_RESUME] = "POSTCOPY_RESUME",
	[FERRY_CMD_DEVSTATE_DONE] = "DEVSTATE_DONE",
	[FERRY_CMD_AGREE] = "AGREE",
};

static const char *const rp_names[FERRY_RP__MAX] = {
	[FERRY_RP_INVALID] = "INVALID",
	[FERRY_RP_SHUT] = "SHUT",
	[FERRY_RP_PONG] = "PONG",
	[FERRY_RP_REQ_PAGES] = "REQ_PAGES",
	[FERRY_RP_SWITCHOVER_ACK] = "SWITCHOVER_ACK",
	[FERRY_RP_LOADED] = "LOADED",
	[FERRY_RP_HEARTBEAT] = "HEARTBEAT",
	[FERRY_RP_RUNNING] = "RUNNING",
	[FERRY_RP_RECV_BITMAP] = "RECV_BITMAP",
	[FERRY_RP_RESUME_ACK] = "RESUME_ACK",
};

const char *ferry_record_type_name(unsigned type)
{
	return type < 256 && rec_names[type] ? rec_names[type] : "UNKNOWN";
}

const char *ferry_cmd_name(unsigned cmd)
{
	return cmd < FERRY_CMD__MAX ? cmd_names[cmd] : "UNKNOWN";
}

const char *ferry_rp_name(unsigned type)
{
	return type < FERRY_RP__MAX ? rp_names[type] : "UNKNOWN";
}

int ferry_stream_write_header(struct ferry_chan *c, struct ferry_error *err)
{
	ferry_put_be32(c, FERRY_STREAM_MAGIC);
	ferry_put_be32(c, FERRY_STREAM_VERSION);
	ferry_put_be32(c, 0); /* flags: none defined */
	ferry_put_be32(c, 0); /* reserved */
	return ferry_chan_error(c, err);
}

int ferry_stream_read_header(struct ferry_chan *c, struct ferry_error *err)
{
	uint32_t version;

	return ferry__stream_read_header(c, &version, err);
}

int ferry__stream_read_header(struct ferry_chan *c, uint32_t *version_out,
			      struct ferry_error *err)
{
	uint32_t magic = ferry_get_be32(c);
	uint32_t version = ferry_get_be32(c);
	uint32_t flags = ferry_get_be32(c);
	uint32_t reserved = ferry_get_be32(c);

	if (ferry_chan_error(c, err))
		return ferry_error_prefix(err, "stream header: offset 0: ");
	if (magic != FERRY_STREAM_MAGIC)
		return ferry_error_set(err, -EBADMSG,
			"stream header: offset 0: not a ferry stream (magic 0x%08x, expected 0x%08x)",
			magic, FERRY_STREAM_MAGIC);
	if (version < FERRY_STREAM_VERSION_MIN || version > FERRY_STREAM_VERSION)
		return ferry_error_set(err, -EPROTONOSUPPORT,
			"stream header: offset 4: stream format version %u not supported (this build reads %u to %u)",
			version, FERRY_STREAM_VERSION_MIN, FERRY_STREAM_VERSION);
	if (flags || reserved)
		return ferry_error_set(err, -EPROTONOSUPPORT,
			"stream header: offset 8: unknown stream flags 0x%08x/0x%08x", flags, reserved);
	*version_out = version;
	return 0;
}

static void put_hdr(uint8_t hdr[5], uint8_t type, uint32_t len)
{
	hdr[0] = type;
	ferry__put_be32(hdr + 1, len);
}

static uint64_t check2(uint64_t seq, const uint8_t hdr[5], const void *a,
		       size_t alen, const void *b, size_t blen)
{
	XXH3_state_t st;

	/* xxhash 0.8.1 reads seed/extSecret in reset: initialise first. */
	XXH3_INITSTATE(&st);

	XXH3_64bits_reset_withSeed(&st, seq);
	XXH3_64bits_update(&st, hdr, 5);
	if (alen)
		XXH3_64bits_update(&st, a, alen);
	if (blen)
		XXH3_64bits_update(&st, b, blen);
	return XXH3_64bits_digest(&st);
}

uint64_t ferry_record_check(uint64_t seq, uint8_t type, const void *body,
			    size_t len)
{
	uint8_t hdr[5];

	put_hdr(hdr, type, (uint32_t)len);
	return check2(seq, hdr, body, len, NULL, 0);
}

int ferry_record_write2(struct ferry_record_io *io, uint8_t type,
			const void *a, size_t alen, const void *b, size_t blen,
			struct ferry_error *err)
{
	uint8_t hdr[5];
	size_t len = alen + blen;

	if (len > UINT32_MAX)
		return ferry_error_set(err, -EFBIG,
			"%s record of %zu bytes is too large",
			ferry_record_type_name(type), len);
	put_hdr(hdr, type, (uint32_t)len);
	ferry_put_buf(io->chan, hdr, sizeof(hdr));
	ferry_put_buf(io->chan, a, alen);
	ferry_put_buf(io->chan, b, blen);
	ferry_put_be64(io->chan, check2(io->seq, hdr, a, alen, b, blen));
	io->seq++;
	return ferry_chan_error(io->chan, err);
}

int ferry_record_write(struct ferry_record_io *io, uint8_t type,
		       const void *body, size_t len, struct ferry_error *err)
{
	return ferry_record_write2(io, type, body, len, NULL, 0, err);
}

/* Read exactly @len body bytes into io->buf, growing it as data arrives. */
static int read_body(struct ferry_record_io *io, uint32_t len, size_t *got)
{
	size_t have = 0;

	*got = 0;
	while (have < len) {
		size_t want = len - have, chunk;
		ssize_t n;

		if (have == io->buf_size) {
			/* Double, starting at 64 KiB, but never past len. */
			size_t nsize = io->buf_size ? io->buf_size * 2 : 65536;
			uint8_t *nb;

			if (nsize > len)
				nsize = len;
			nb = realloc(io->buf, nsize);
			if (!nb)
				return -ENOMEM;
			io->buf = nb;
			io->buf_size = nsize;
		}
		chunk = io->buf_size - have;
		if (chunk > want)
			chunk = want;
		n = ferry_get_partial(io->chan, io->buf + have, chunk);
		if (n < 0)
			return (int)n;
		have += (size_t)n;
		*got = have;
		if ((size_t)n < chunk)
			return -EBADMSG; /* end of stream inside the body */
	}
	return 0;
}

int ferry_record_read(struct ferry_record_io *io, struct ferry_record *rec,
		      struct ferry_error *err)
{
	uint32_t max = io->max_len ? io->max_len : FERRY_RECORD_MAX_DEFAULT;
	uint8_t hdr[5], cb[8];
	uint64_t check, want;
	size_t got;
	ssize_t n;
	int r;

	memset(rec, 0, sizeof(*rec));
	rec->offset = ferry_chan_offset(io->chan);
	rec->seq = io->seq;
	n = ferry_get_partial(io->chan, hdr, sizeof(hdr));
	if (n < 0)
		return ferry_chan_error(io->chan, err);
	if (n == 0) {
		rec->at_end = true;
		return ferry_error_set(err, -EBADMSG,
			"offset %llu: stream ends without an EOF record",
			(unsigned long long)rec->offset);
	}
	if ((size_t)n < sizeof(hdr))
		return ferry_error_set(err, -EBADMSG,
			"offset %llu: truncated record header (%zd of 5 bytes)",
			(unsigned long long)rec->offset, n);
	rec->type = hdr[0];
	rec->len = ferry__get_be32(hdr + 1);
	if (rec->len > max)
		return ferry_error_set(err, -EBADMSG,
			"offset %llu: %s record claims %u bytes (limit %u)",
			(unsigned long long)rec->offset,
			ferry_record_type_name(rec->type), rec->len, max);
	r = read_body(io, rec->len, &got);
	/* Expose what arrived, so callers can name the damaged section. */
	rec->body = io->buf;
	rec->got = (uint32_t)got;
	if (r == -ENOMEM)
		return ferry_error_set(err, r, "offset %llu: out of memory",
				       (unsigned long long)rec->offset);
	if (r == -EBADMSG)
		return ferry_error_set(err, r,
			"offset %llu: truncated %s record (%zu of %u body bytes)",
			(unsigned long long)rec->offset,
			ferry_record_type_name(rec->type), got, rec->len);
	if (r < 0)
		return ferry_chan_error(io->chan, err);
	n = ferry_get_partial(io->chan, cb, sizeof(cb));
	if (n < 0)
		return ferry_chan_error(io->chan, err);
	if ((size_t)n < sizeof(cb))
		return ferry_error_set(err, -EBADMSG,
			"offset %llu: truncated %s record (check value missing)",
			(unsigned long long)rec->offset,
			ferry_record_type_name(rec->type));
	check = ferry__get_be64(cb);
	want = check2(io->seq, hdr, io->buf, rec->len, NULL, 0);
	if (check != want)
		return ferry_error_set(err, -EBADMSG,
			"offset %llu: %s record #%llu (%u bytes) fails its check "
			"(damaged, reordered or lost data)",
			(unsigned long long)rec->offset,
			ferry_record_type_name(rec->type),
			(unsigned long long)io->seq, rec->len);
	io->seq++;
	return 0;
}

int ferry_record_section_hint(const struct ferry_record *rec, uint32_t *id,
			      char *idstr, size_t idsize)
{
	const uint8_t *b = rec->body;
	uint32_t n = rec->got;
	int found = 0;

	if (idsize)
		idstr[0] = 0;
	if (rec->type < FERRY_REC_SECTION_START ||
	    rec->type > FERRY_REC_SECTION_FULL || !b || n < 4)
		return 0;
	*id = ferry__get_be32(b);
	found |= 1;
	if ((rec->type == FERRY_REC_SECTION_START ||
	     rec->type == FERRY_REC_SECTION_FULL) && n >= 5 &&
	    n >= 5u + b[4] && idsize > b[4]) {
		memcpy(idstr, b + 5, b[4]);
		idstr[b[4]] = 0;
		/* Not trusted: make it printable. */
		for (size_t i = 0; i < b[4]; i++)
			if ((unsigned char)idstr[i] < 0x20 ||
			    (unsigned char)idstr[i] > 0x7e)
				idstr[i] = '?';
		found |= 2;
	}
	return found;
}

void ferry_record_io_release(struct ferry_record_io *io)
{
	free(io->buf);
	io->buf = NULL;
	io->buf_size = 0;
}
