#!/bin/sh
# Run every benchmark, one at a time (never beside a build), printing one
# figure per line. Usage: scripts/bench.sh BUILD_DIR
set -eu
B=${1:-build}
cd "$(dirname "$0")/.."
echo "== stream layer (in memory) =="
"$B/bench-stream"
echo "== multifd RAM over loopback TCP (1 GiB, fresh destination memory) =="
"$B/bench-multifd"
echo "== dirty tracking on the reference VMM (1 GiB and 4 GiB guests) =="
"$B/bench-dirty"
echo "== live migration of the reference VM over loopback =="
"$B/bench-migrate" "$B/ferry" "${BENCH_RUNS:-3}"
echo "== postcopy of the reference VM over loopback =="
"$B/bench-postcopy" "$B/ferry" "${BENCH_RUNS:-3}"
echo "== devices with large state (VFIO-style) over loopback =="
"$B/bench-devices" "$B/ferry" "${BENCH_RUNS:-3}"
echo "== TLS against plain TCP over loopback (1 GiB full guest; 1, 2, 4 channels) =="
"$B/bench-tls" "$B/ferry" "${BENCH_RUNS:-3}"
echo "== the non-iterable load of many devices: one memory transaction vs a commit each =="
"$B/bench-devload" "$B/ferry" "${BENCH_RUNS:-3}"
echo "== live migration across network namespaces over emulated links (ferry-linkemu) =="
"$B/bench-netns" "$B/ferry" "${BENCH_RUNS:-3}"
