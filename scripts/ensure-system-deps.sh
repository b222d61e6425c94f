#!/usr/bin/env bash
# System programs the tests and benchmarks need: redis-server (state/cache tests start their
# own server on a free 127.0.0.1 port) and wrk (bench/serve.py). Debian packages; installed
# once, only when missing.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: ${missing[*]} not found and apt-get is not available; install them by hand" >&2
    exit 1
fi
echo "installing ${missing[*]} (Debian packages)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
