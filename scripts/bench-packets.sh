#!/usr/bin/env bash
# Benchmark packets capture: hping3 floods SYNs at a port nobody serves on 127.0.0.1 for
# SECONDS (default 10), redtap (release) stores one record per SYN into two Redis backends
# weighted 30/70. Prints SYNs sent (hping3's count), records stored, kernel drops, queue-full
# drops and records/s. FLOODERS=K runs K hping3 at once (default 1);
# REDTAP_ARGS adds flags (e.g. "--ring-size 1MiB" to see drops counted). Needs root (CAP_NET_RAW); traffic stays on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

need redis-server redis-server
need redis-cli redis-tools
need hping3 hping3
need curl curl
ensure_libpcap_dev
seconds=${SECONDS_TO_FLOOD:-${1:-10}}

cargo build --release --quiet --bin redtap
bin=target/release/redtap
start_two_redis
"$bin" run --listen "127.0.0.1:$listen" --admin "127.0.0.1:$admin" --serve none --agent bench \
    --backend "A=redis://127.0.0.1:$port_a@30" --backend "B=redis://127.0.0.1:$port_b@70" \
    ${REDTAP_ARGS:-} 2>"$work/redtap.log" &
redtap=$!
pids+=($redtap)
until curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null 2>&1; do sleep 0.1; done

flooders=${FLOODERS:-1}
echo "==> $flooders x: timeout -s INT $seconds hping3 -q -S --flood -k -s 10000 -p $listen 127.0.0.1"
fl=()
for i in $(seq "$flooders"); do
    timeout -s INT "$seconds" hping3 -q -S --flood -k -s 10000 -p "$listen" 127.0.0.1 >"$work/hping.$i" 2>&1 &
    fl+=($!)
done
for p in "${fl[@]}"; do wait "$p" || true; done
sent=$(cat "$work"/hping.* | grep -o '^[0-9]* packets transmitted' | grep -o '^[0-9]*' | awk "{ s += \$1 } END { print s }")
# Let the queue drain into Redis, then stop redtap (its shutdown summary goes to the log).
prev=-1
while :; do
    stored=$(( $(stream_records "$port_a" bench) + $(stream_records "$port_b" bench) ))
    [ "$stored" = "$prev" ] && break
    prev=$stored; sleep 1
done
metrics=$(curl -s "http://127.0.0.1:$admin/metrics")
m() { echo "$metrics" | awk -v k="$1" '$1 == k { print $2 }'; }
kdrop=$(m 'redtap_kernel_drops_total{cause="ring"}')
qfull=$(m 'redtap_records_dropped_total{reason="queue_full"}')
kill -TERM "$redtap"; wait "$redtap" 2>/dev/null || true
a=$(stream_records "$port_a" bench); b=$(stream_records "$port_b" bench)
echo "SYNs sent (hping3):        $sent"
echo "records stored:            $stored (A $a, B $b)"
echo "kernel ring drops:         $kdrop"
echo "dropped, queue full:       $qfull"
awk -v s="$sent" -v r="$stored" -v t="$seconds" 'BEGIN {
    printf "loss:                      %d (%.2f%%)\n", s - r, s ? 100 * (s - r) / s : 0
    printf "records/s:                 %.0f\n", r / t }'
grep -E "capture stopped|redtap stopped|lost frames" "$work/redtap.log" | tail -4
