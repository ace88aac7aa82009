#!/usr/bin/env bash
# Run redtap's whole test suite: unit and property tests, and end-to-end tests against real
# redis-server processes. Installs what is missing (as root), else says which package to install.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

need redis-server redis-server
need python3 python3
need cc gcc
need openssl openssl
need prlimit util-linux
ensure_libpcap_dev
need hping3 hping3
need tcpdump tcpdump
need setpriv util-linux
need ip iproute2
need chromium chromium
need chromedriver chromium-driver

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast "$@"
else
    cargo test --no-fail-fast "$@"
fi
