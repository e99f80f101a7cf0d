#!/usr/bin/env bash
# What one publication costs Redis: CPU time (user + system, from INFO) per publication
# for a plain PUBLISH and for the stored publish of a history namespace (the fanout
# Function, loaded by a real node), each with two subscribers on the channel, as the
# gateway has one per node. redis-benchmark drives both the same way.
#
#   loadtest/redis-cost.sh [REQUESTS]        (default 200000)
#
# Environment: FANOUT_BIN (default target/release/fanout), HISTORY_SIZE (default 1000),
# SUBSCRIBERS (subscriber connections per channel, default 2: nodes subscribed to it).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200000}
FANOUT_BIN=${FANOUT_BIN:-target/release/fanout}
HISTORY_SIZE=${HISTORY_SIZE:-1000}
work=$(mktemp -d -t fanout-redis-cost.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break; sleep 0.05; done

# A node loads the Function library with these settings, then stays out of the way.
printf '[namespaces.cost]\nhistory_size = %s\nhistory_ttl = "10m"\n' "$HISTORY_SIZE" >"$work/fanout.toml"
"$FANOUT_BIN" serve --redis-url "redis://127.0.0.1:$port" --config "$work/fanout.toml" \
    --public-addr 127.0.0.1:0 --internal-addr 127.0.0.1:0 >"$work/node.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do
    redis-cli -p "$port" FUNCTION LIST 2>/dev/null | grep -q fanout_publish && break
    sleep 0.05
done

# Two subscribers per channel, like two gateway nodes (SUBSCRIBERS to change it).
for ch in fanout:cost:plain fanout:cost:stored; do
    for _ in $(seq 1 "${SUBSCRIBERS:-2}"); do
        redis-cli -p "$port" SUBSCRIBE "$ch" >/dev/null &
        pids+=($!)
    done
done
sleep 0.5

# {"v":1,"ts":1,"enc":"json","data":bin("1")}: no zero byte, so it passes through argv.
envelope=$'\x84\xa1v\x01\xa2ts\x01\xa3enc\xa4json\xa4data\xc4\x011'
cpu() { redis-cli -p "$port" INFO cpu | awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {printf "%.6f", s}'; }
measure() {
    local label=$1
    shift
    local before after
    before=$(cpu)
    redis-benchmark -p "$port" -n "$N" -c 8 -q "$@" >/dev/null
    after=$(cpu)
    python3 -c "print(f'$label: {($after - $before) * 1e6 / $N:.2f} µs of Redis CPU per publication')"
}
measure "PUBLISH (plain)" PUBLISH fanout:cost:plain "$envelope"
measure "FCALL fanout_node_publish (history_size $HISTORY_SIZE)" \
    FCALL fanout_node_publish 1 fanout:cost:stored "$envelope" "$HISTORY_SIZE" 600 "" 300
measure "FCALL fanout_node_publish (history + idempotency key)" \
    -r 1000000000 FCALL fanout_node_publish 1 fanout:cost:stored "$envelope" "$HISTORY_SIZE" 600 key:__rand_int__ 300
echo "stream length: $(redis-cli -p "$port" XLEN '{fanout:cost:stored}:history') (history_size $HISTORY_SIZE)"
