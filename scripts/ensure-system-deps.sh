#!/usr/bin/env bash
# System programs the tests and benchmarks need: redis-server (state/cache tests start their
# own server on a free 127.0.0.1 port), wrk (bench/serve.py) and nginx (the load balancer of
# deploy/nginx, which tests/test_cluster.py runs in the foreground on a free port; the package's
# own service is not started). Debian packages; installed once, only when missing.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
# /usr/sbin is not on every user's PATH.
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
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
# RUNLEVEL=1: invoke-rc.d starts no service (nginx would otherwise listen on port 80).
$SUDO env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
