#!/bin/sh
# Run every benchmark, one at a time (never beside a build), printing one
# figure per line. Usage: scripts/bench.sh BUILD_DIR
set -eu
B=${1:-build}
cd "$(dirname "$0")/.."
echo "== stream layer (in memory) =="
"$B/bench-stream"
