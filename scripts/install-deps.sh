#!/bin/sh
# Install the Debian 12 packages ferry needs to build, test and run its demo.
# Idempotent: does nothing (and needs no network) when everything is present.
# Called by `make check`, `make demo` and `.ci/run`; safe to run by hand as root.
set -eu

PKGS="build-essential pkg-config libzstd-dev libjansson-dev libxxhash-dev \
libssl-dev openssl clang libclang-rt-14-dev iproute2"

missing=""
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
		missing="$missing $p"
done
[ -z "$missing" ] && exit 0

echo "install-deps: installing:$missing" >&2
if [ "$(id -u)" -ne 0 ]; then
	if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
		echo "install-deps: need root to install:$missing" >&2; exit 1; fi
else
	SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing
