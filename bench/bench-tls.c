/*
 * bench/bench-tls.c - what TLS costs: a 1 GiB guest full of data migrated
 * over loopback in plain TCP and over TLS 1.3 (tls-creds, AES-128-GCM with
 * the CPU's AES instructions), with 1, 2 and 4 multifd channels, several
 * runs each. The destination preallocates its RAM, so the figures are the
 * link's and the ciphers', not first-touch page faults. Prints throughput,
 * total time, the CPU both processes spent, and TLS against plain.
 *
 * Kernel TLS: with tls-ktls (the default) OpenSSL hands the record layer
 * to the kernel where the kernel has the tls ULP; the bench says which one
 * ran (query-migrate "tls": "ktls-tx"/"ktls-rx"), and where kTLS ran it
 * also measures user-space TLS (tls-ktls false).
 *
 * Usage: bench-tls [FERRY_BINARY] [RUNS] [ONLY]   (ONLY: e.g. "2ch")
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "benchvm.h"

enum mode { PLAIN, TLS, TLS_USER };
static const char *const mode_name[] = { "plain", "TLS", "TLS (user space)" };

static char creds[512];

/* Median throughput (MiB/s) of @runs migrations; *ktls: kTLS ran. */
static double bench(const char *backend, enum mode mode, int channels,
		    int runs, bool *ktls)
{
	double total[MAXRUNS], tput[MAXRUNS], cs[MAXRUNS], cd[MAXRUNS];
	const char *tls = mode == PLAIN ? "" : creds;

	*ktls = false;
	for (int r = 0; r < runs; r++) {
		struct vmp s, d;
		int port = free_port();
		struct bench_mig bm;
		json_t *m, *t;
		char args[1024];

		snprintf(args, sizeof(args), "--backend %s --mem 1G --workload "
			 "fill", backend);
		spawn(&s, "src", args);
		snprintf(args, sizeof(args), "--backend %s --mem 1G --paused "
			 "--prealloc --incoming tcp:127.0.0.1:%d%s%s", backend,
			 port, mode == PLAIN ? "" : " --tls-creds ", tls);
		spawn(&d, "dst", args);
		wait_workload(&s, "fill", 1ull << 30);
		json_decref(call(&s, "migrate-set-parameters", json_pack(
			"{s:i, s:s, s:b}", "multifd-channels", channels,
			"tls-creds", tls, "tls-ktls", mode != TLS_USER)));
		if (mode == TLS_USER)
			json_decref(call(&d, "migrate-set-parameters",
					 json_pack("{s:b}", "tls-ktls", 0)));
		snprintf(args, sizeof(args), "tcp:127.0.0.1:%d", port);
		m = bench_migrate(&s, &d, args, 0, &bm);
		cs[r] = bm.cpu_src;
		cd[r] = bm.cpu_dst;
		total[r] = bm.total_ms;
		tput[r] = bm.mib_s;
		t = json_object_get(m, "tls");
		if (mode != PLAIN && !json_is_object(t))
			die("a TLS migration reports no TLS");
		if (t && geti(t, "ktls-tx") > 0)
			*ktls = true;
		json_decref(m);
		quit(&s);
		quit(&d);
	}
	printf("1G fill, %s, %d channel%s (%d runs)%s\n", mode_name[mode],
	       channels, channels > 1 ? "s" : "", runs,
	       *ktls ? ", kernel TLS" : "");
	stat3("throughput", tput, runs, "MiB/s");
	stat3("total time", total, runs, "ms");
	stat3("CPU source", cs, runs, "s");
	stat3("CPU destination", cd, runs, "s");
	fflush(stdout);
	/* stat3 sorted tput: the median is the middle one. */
	return tput[runs / 2];
}

int main(int argc, char **argv)
{
	static const int chans[] = { 1, 2, 4 };
	const char *backend, *only = NULL;
	double plain[3] = { 0 }, tls[3] = { 0 };
	bool any_ktls = false;
	int runs = 3;
	char cmd[1024];

	bench_start(argc, argv, "bench-tls", &runs, &only);
	backend = bench_backend();
	snprintf(creds, sizeof(creds), "%s/creds", bench_dir);
	snprintf(cmd, sizeof(cmd), "scripts/gen-certs.sh %s >/dev/null", creds);
	if (system(cmd) != 0)
		die("scripts/gen-certs.sh failed (is openssl installed?)");
	for (int c = 0; c < 3; c++) {
		char label[32];
		bool k;

		snprintf(label, sizeof(label), "%dch", chans[c]);
		if (only && !strstr(label, only))
			continue;
		plain[c] = bench(backend, PLAIN, chans[c], runs, &k);
		tls[c] = bench(backend, TLS, chans[c], runs, &k);
		any_ktls |= k;
		if (k)
			bench(backend, TLS_USER, chans[c], runs, &k);
	}
	printf("TLS against plain (median throughput; target >= 70%%):\n");
	for (int c = 0; c < 3; c++)
		if (plain[c] > 0)
			printf("  %d channel%s: %.0f vs %.0f MiB/s = %.0f%%\n",
			       chans[c], chans[c] > 1 ? "s" : "", tls[c], plain[c],
			       100.0 * tls[c] / plain[c]);
	if (!any_ktls)
		printf("kernel TLS: not used (this kernel has no tls ULP: "
		       "/proc/sys/net/ipv4/tcp_available_ulp); figures are "
		       "user-space TLS\n");
	return bench_end();
}
