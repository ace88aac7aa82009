# Shared helpers for scripts/*.sh. Source it; do not run it.

# need CMD PKG: make sure CMD exists, installing Debian package PKG when we are root, else
# stopping with a message that names the package.
need() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing $pkg (for $cmd)"
        if [ -z "${REDTAP_APT_UPDATED:-}" ]; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            REDTAP_APT_UPDATED=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
        command -v "$cmd" >/dev/null 2>&1 && return 0
    fi
    echo "redtap: '$cmd' is missing: install it with 'sudo apt-get install $pkg' and run this again" >&2
    exit 1
}

# free_port: print a TCP port that nothing listens on now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
        || echo $((20000 + RANDOM % 20000))
}

# ensure_libpcap_dev: the headers and library the `pcap` crate links against.
ensure_libpcap_dev() {
    [ -f /usr/include/pcap/pcap.h ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing libpcap-dev (redtap links libpcap for packet capture)"
        if [ -z "${REDTAP_APT_UPDATED:-}" ]; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            REDTAP_APT_UPDATED=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libpcap-dev >/dev/null
        [ -f /usr/include/pcap/pcap.h ] && return 0
    fi
    echo "redtap: libpcap headers are missing: install them with 'sudo apt-get install libpcap-dev' and run this again" >&2
    exit 1
}

# start_two_redis: make a work dir ($work) cleaned up at exit with every process in $pids, start
# two throwaway redis-servers on free ports ($port_a, $port_b) and wait until they answer; also
# pick free ports for redtap ($listen, $admin).
start_two_redis() {
    work=$(mktemp -d)
    pids=()
    trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"' EXIT
    port_a=$(free_port); port_b=$(free_port); listen=$(free_port); admin=$(free_port)
    local p
    for p in $port_a $port_b; do
        redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
            --logfile "$work/redis-$p.log" &
        pids+=($!)
    done
    for p in $port_a $port_b; do
        until redis-cli -p "$p" ping >/dev/null 2>&1; do sleep 0.1; done
    done
}

# stream_records PORT AGENT: records the stream schema holds for AGENT in the Redis on PORT,
# summed over its per-second bucket keys (redtap:events:{AGENT}:<second>).
stream_records() {
    local port=$1 agent=$2 n=0 k
    while read -r k; do
        [ -n "$k" ] && n=$(( n + $(redis-cli -p "$port" xlen "$k") ))
    done < <(redis-cli -p "$port" --scan --pattern "redtap:events:{$agent}:*")
    echo "$n"
}
