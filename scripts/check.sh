#!/bin/sh
# Run every test. Usage: scripts/check.sh BUILD_DIR
# Builds the libFuzzer targets when clang can, so the runner's fuzz smoke tests
# run instead of skipping. The runner's closing line is the last line.
set -u
B=${1:-build}
[ $# -gt 0 ] && shift
cd "$(dirname "$0")/.." || exit 1
export FERRY_BIN="$PWD/$B/ferry"
# The example VMM, built against the installed library (make check builds it).
[ -x "$B/examples/mini-vmm" ] && export FERRY_EXAMPLE_BIN="$PWD/$B/examples/mini-vmm"
if command -v clang >/dev/null 2>&1 && make --no-print-directory -s "$B/fuzz-load" >/dev/null 2>"$B/fuzz-build.log"; then
	export FERRY_FUZZ_BIN="$PWD/$B/fuzz-load"
else
	echo "note: fuzz target not built (see $B/fuzz-build.log)"
fi
if command -v clang >/dev/null 2>&1 && make --no-print-directory -s "$B/fuzz-control" >/dev/null 2>>"$B/fuzz-build.log"; then
	export FERRY_FUZZ_CONTROL_BIN="$PWD/$B/fuzz-control"
else
	echo "note: control fuzz target not built (see $B/fuzz-build.log)"
fi
# Under ThreadSanitizer: guest RAM is copied while the guest writes it, by
# design (tests/tsan.supp says why), and everything runs several times slower.
case "$B" in
*-thread)
	export TSAN_OPTIONS="suppressions=$PWD/tests/tsan.supp ${TSAN_OPTIONS:-}"
	set -- --timeout-scale 4 "$@" ;;
*-address|*-undefined)
	set -- --timeout-scale 2 "$@" ;;
esac
exec "$B/ferry-test" "$@"
