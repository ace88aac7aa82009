#!/usr/bin/env bash
# Local demo: two Redis instances weighted 30/70, redtap in front of them, live traffic, then a
# live change of weights to 50/50 — and the shares follow. Installs redis-server if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

need redis-server redis-server
need redis-cli redis-tools
need cc gcc
ensure_libpcap_dev

echo "==> building redtap (release build: the first one compiles every dependency and takes a few"
echo "    minutes on 2 cores; later runs take seconds)"
cargo build --release --bin redtap --example connload
bin=target/release/redtap
load=target/release/examples/connload

start_two_redis
echo "==> Redis A on :$port_a, Redis B on :$port_b"

"$bin" run --listen "127.0.0.1:$listen" --admin "127.0.0.1:$admin" --capture connections \
    --agent demo --retention 5m --state-file off \
    --backend "A=redis://127.0.0.1:$port_a@30" --backend "B=redis://127.0.0.1:$port_b@70" \
    2>"$work/redtap.log" &
pids+=($!)
export REDTAP_ADMIN="http://127.0.0.1:$admin"
until "$bin" weights >/dev/null 2>&1; do sleep 0.1; done
echo "==> redtap captures on 127.0.0.1:$listen, admin API on $REDTAP_ADMIN"

echo; echo "==> 10,000 connections at weights A=30 B=70"
"$load" "127.0.0.1:$listen" 10000
sleep 0.5
"$bin" weights

echo; echo "==> live change: redtap weights set A=50 B=50"
"$bin" weights set A=50 B=50 >/dev/null
echo "==> 10,000 more connections"
"$load" "127.0.0.1:$listen" 10000
sleep 0.5
"$bin" weights

echo; echo "==> what Redis holds (streams redtap:events:{demo}:<second>)"
echo "A: $(stream_records "$port_a" demo) records   B: $(stream_records "$port_b" demo) records"
newest=$(redis-cli -p "$port_b" --scan --pattern 'redtap:events:{demo}:*' | sort | tail -1)
echo "newest record in B ($newest):"
redis-cli -p "$port_b" xrevrange "$newest" + - COUNT 1
echo; echo "==> done; stopping redtap and both Redis instances"
