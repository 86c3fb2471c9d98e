/*
 * vmm/vm/vm-config.c - parsing of sizes and workload specs for `ferry vm`.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vm/vm.h"

/* "1G", "512M", "4096K", "123" (bytes). Binary units. */
int vm_parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;
	unsigned shift = 0;

	if (!s || !*s || *s == '-')
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s)
		return -EINVAL;
	switch (*end) {
	case 'k': case 'K': shift = 10; end++; break;
	case 'm': case 'M': shift = 20; end++; break;
	case 'g': case 'G': shift = 30; end++; break;
	case 't': case 'T': shift = 40; end++; break;
	case 0: break;
	default: return -EINVAL;
	}
	if (*end == 'i' || *end == 'B')
		end += (*end == 'i' && end[1] == 'B') ? 2 : 1;
	if (*end || (shift && v > (UINT64_MAX >> shift)))
		return -EINVAL;
	*out = (uint64_t)v << shift;
	return 0;
}

/*
 * idle | fill | dirty[,ws=SIZE][,rate=MBPS][,pattern=seq|random]
 */
int vm_parse_workload(const char *spec, struct vm_workload *wl,
		      struct ferry_error *err)
{
	char buf[256], *save = NULL, *tok;

	memset(wl, 0, sizeof(*wl));
	if (!spec || strlen(spec) >= sizeof(buf))
		return ferry_error_set(err, -EINVAL, "bad workload spec");
	strcpy(buf, spec);
	tok = strtok_r(buf, ",", &save);
	if (!tok)
		return ferry_error_set(err, -EINVAL, "empty workload spec");
	if (!strcmp(tok, "idle"))
		wl->kind = GUEST_WORK_IDLE;
	else if (!strcmp(tok, "fill"))
		wl->kind = GUEST_WORK_FILL;
	else if (!strcmp(tok, "dirty"))
		wl->kind = GUEST_WORK_DIRTY;
	else
		return ferry_error_set(err, -EINVAL,
			"unknown workload '%s' (idle, fill or dirty)", tok);
	while ((tok = strtok_r(NULL, ",", &save))) {
		char *eq = strchr(tok, '=');
		const char *val;

		if (!eq)
			return ferry_error_set(err, -EINVAL,
					       "workload option '%s' needs =VALUE", tok);
		*eq = 0;
		val = eq + 1;
		if (wl->kind != GUEST_WORK_DIRTY)
			return ferry_error_set(err, -EINVAL,
				"workload option '%s' applies to 'dirty' only", tok);
		if (!strcmp(tok, "ws")) {
			if (vm_parse_size(val, &wl->ws_bytes))
				return ferry_error_set(err, -EINVAL, "bad ws=%s", val);
		} else if (!strcmp(tok, "rate")) {
			char *end;
			unsigned long long v = strtoull(val, &end, 10);
			if (!*val || *end)
				return ferry_error_set(err, -EINVAL,
						       "bad rate=%s (MB/s)", val);
			wl->rate_mbps = v;
		} else if (!strcmp(tok, "pattern")) {
			if (!strcmp(val, "seq"))
				wl->pattern = GUEST_PATTERN_SEQ;
			else if (!strcmp(val, "random"))
				wl->pattern = GUEST_PATTERN_RANDOM;
			else
				return ferry_error_set(err, -EINVAL,
					"pattern=%s (seq or random)", val);
		} else {
			return ferry_error_set(err, -EINVAL,
				"unknown workload option '%s' (ws, rate, pattern)", tok);
		}
	}
	return 0;
}
