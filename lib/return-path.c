/*
 * return-path.c - messages from the destination back to the source.
 *
 * They travel as RETURN records, with the same length and check as the
 * main stream, so a confused or hostile destination cannot make the source
 * misread its answer: a source that keeps its VM stopped or resumes it on
 * the strength of a SHUT must be sure the SHUT is one.
 */
#include <errno.h>
#include <string.h>

#include "ferry/migration.h"
#include "internal.h"

int ferry_rp_send(struct ferry_record_io *io, const struct ferry_rp_msg *m,
		  struct ferry_error *err)
{
	return ferry__rp_send(io, m, NULL, err);
}

int ferry__rp_send(struct ferry_record_io *io, const struct ferry_rp_msg *m,
		   const uint8_t *bitmap, struct ferry_error *err)
{
	struct ferry_chan *b;
	const uint8_t *d;
	size_t n;
	int r;

	if (m->type == FERRY_RP_RECV_BITMAP &&
	    (!bitmap || m->start > FERRY_RP_BITMAP_MAX_PAGES))
		return ferry_error_set(err, -EINVAL, "RECV_BITMAP of %llu pages%s",
				       (unsigned long long)m->start,
				       bitmap ? "" : " without its bits");
	b = ferry_chan_new_mem_writer(65536 + (m->type == FERRY_RP_RECV_BITMAP ?
					       (size_t)(m->start + 7) / 8 : 0));
	if (!b)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	ferry_put_be16(b, m->type);
	switch (m->type) {
	case FERRY_RP_SHUT:
	case FERRY_RP_LOADED:
	case FERRY_RP_RUNNING:
		ferry_put_be32(b, m->status);
		ferry_put_str8(b, m->reason);
		ferry_put_be32(b, FERRY_SHUT__MAX);
		for (int i = 0; i < FERRY_SHUT__MAX; i++)
			ferry_put_be64(b, m->values[i]);
		break;
	case FERRY_RP_PONG:
		ferry_put_be32(b, m->pong);
		break;
	case FERRY_RP_REQ_PAGES:
		ferry_put_str8(b, m->block);
		ferry_put_be64(b, m->start);
		ferry_put_be32(b, m->len);
		break;
	case FERRY_RP_HEARTBEAT:
		ferry_put_be32(b, m->peer_timeout_ms);
		break;
	case FERRY_RP_RECV_BITMAP:
		ferry_put_str8(b, m->block);
		ferry_put_be64(b, m->start);
		ferry_put_buf(b, bitmap, (size_t)((m->start + 7) / 8));
		break;
	case FERRY_RP_SWITCHOVER_ACK:
	case FERRY_RP_RESUME_ACK:
		break;
	default:
		ferry_chan_free(b);
		return ferry_error_set(err, -EINVAL, "unknown return-path message %u",
				       m->type);
	}
	r = ferry_chan_error(b, err);
	if (!r) {
		d = ferry_chan_mem_data(b, &n);
		r = ferry_record_write(io, FERRY_REC_RETURN, d, n, err);
	}
	if (!r && ferry_chan_flush(io->chan))
		r = ferry_chan_error(io->chan, err);
	ferry_chan_free(b);
	return r;
}

int ferry_rp_recv(struct ferry_record_io *io, struct ferry_rp_msg *m,
		  struct ferry_error *err)
{
	return ferry__rp_recv(io, m, NULL, err);
}

int ferry__rp_recv(struct ferry_record_io *io, struct ferry_rp_msg *m,
		   const uint8_t **bitmap, struct ferry_error *err)
{
	struct ferry_record rec;
	struct ferry_chan *c;
	int r;

	memset(m, 0, sizeof(*m));
	r = ferry_record_read(io, &rec, err);
	/* A TLS destination's answer to a plaintext source: an alert record
	 * (type 21, version 3.x) where our first record belongs. */
	if (r && rec.offset == 0 && rec.type == 21 && rec.len >> 24 == 3) {
		ferry_error_clear(err);
		return ferry_error_set(err, -EPROTO, "the destination speaks TLS "
				       "(it answered with a TLS alert): set "
				       "tls-creds on this side too (both sides "
				       "need it)");
	}
	if (r && rec.at_end)
		return ferry_error_set(err, -ECONNRESET,
				       "return path: closed by the peer");
	if (r)
		return ferry_error_prefix(err, "return path: ");
	if (rec.type != FERRY_REC_RETURN)
		return ferry_error_set(err, -EBADMSG,
			"return path: %s record where a RETURN record belongs",
			ferry_record_type_name(rec.type));
	c = ferry_chan_new_mem_reader(rec.body, rec.len);
	if (!c)
		return ferry_error_set(err, -ENOMEM, "out of memory");
	m->type = ferry_get_be16(c);
	switch (m->type) {
	case FERRY_RP_SHUT:
	case FERRY_RP_LOADED:
	case FERRY_RP_RUNNING: {
		uint32_t nv;

		m->status = ferry_get_be32(c);
		ferry_get_str8(c, m->reason, sizeof(m->reason));
		nv = ferry_get_be32(c);
		if (nv > 64)
			ferry_chan_set_error(c, -EBADMSG, "SHUT with %u values", nv);
		for (uint32_t i = 0; i < nv && !ferry_chan_error(c, NULL); i++) {
			uint64_t v = ferry_get_be64(c);
			if (i < FERRY_SHUT__MAX)
				m->values[i] = v;
		}
		break;
	}
	case FERRY_RP_PONG:
		m->pong = ferry_get_be32(c);
		break;
	case FERRY_RP_REQ_PAGES:
		ferry_get_str8(c, m->block, sizeof(m->block));
		m->start = ferry_get_be64(c);
		m->len = ferry_get_be32(c);
		break;
	case FERRY_RP_HEARTBEAT:
		m->peer_timeout_ms = ferry_get_be32(c);
		break;
	case FERRY_RP_RECV_BITMAP:
		ferry_get_str8(c, m->block, sizeof(m->block));
		m->start = ferry_get_be64(c);
		if (ferry_chan_error(c, NULL))
			break;
		/* Exactly the announced bits: the rest of the body. */
		if (m->start > FERRY_RP_BITMAP_MAX_PAGES ||
		    ferry_chan_mem_remaining(c) != (m->start + 7) / 8) {
			ferry_chan_set_error(c, -EBADMSG, "RECV_BITMAP of %llu "
				"pages with %zu bytes", (unsigned long long)m->start,
				ferry_chan_mem_remaining(c));
			break;
		}
		if (bitmap)
			*bitmap = rec.body + (rec.len - ferry_chan_mem_remaining(c));
		{
			/* Consume the bitmap (read in place above). */
			size_t left = ferry_chan_mem_remaining(c);
			uint8_t tmp[256];
			while (left && !ferry_chan_error(c, NULL)) {
				size_t k = left < sizeof(tmp) ? left : sizeof(tmp);
				ferry_get_buf(c, tmp, k);
				left -= k;
			}
		}
		break;
	case FERRY_RP_SWITCHOVER_ACK:
	case FERRY_RP_RESUME_ACK:
		break;
	default:
		ferry_chan_set_error(c, -EBADMSG, "unknown message type %u", m->type);
	}
	r = ferry_chan_error(c, err);
	if (!r && ferry_chan_mem_remaining(c))
		r = ferry_error_set(err, -EBADMSG, "%s message with %zu extra bytes",
				    ferry_rp_name(m->type), ferry_chan_mem_remaining(c));
	if (r)
		ferry_error_prefix(err, "return path: ");
	ferry_chan_free(c);
	return r;
}
