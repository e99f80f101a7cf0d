#!/usr/bin/env bash
# Runs a load-test scenario against a local cluster: one redis-server and two fanout nodes
# pinned to one CPU, the generator pinned to another, so the gateway's per-core figures
# are not polluted by the generator. Everything started here is stopped on exit.
#
#   loadtest/run-local.sh broadcast --rate 200 --duration 10s
#   loadtest/run-local.sh idle --subscribers 20000 --json-out idle.json
#
# Environment: NODES (default 2), GATEWAY_CPUS (default 0), LOADTEST_CPUS (default 1),
# FANOUT_BIN, LOADTEST_BIN (default target/release/...), BUILD=0 to skip cargo build,
# NODE_ARGS (flags for `fanout serve`; default lifts the per-client rate limits),
# NOFILE (open-file limit to ask for, default 1048576), HISTORY=N (the generator's
# namespace keeps N publications per channel; 10000 for the recovery scenario),
# PRESENCE=1 or PRESENCE=join_leave (the namespace tracks presence), HOOK=CMD (run in the
# background once the nodes are up, with FANOUT_LOADTEST_INTERNAL, FANOUT_LOADTEST_WS and
# FANOUT_LOADTEST_REDIS_PORT set), SHARDS=N (N independent redis-servers as the nodes'
# redis_shards instead of one; the generator's --redis-url is the first), SPIN=0 (the
# generator's subscriber workers sleep while they wait instead of spinning: with them
# asleep, every write that wakes one costs the gateway's CPU an interrupt to the
# generator's, which clients on other machines would not cost it). At the end it
# prints each Redis's CPU time and PUBLISH count over the run, and the CPU per publication.
set -euo pipefail

cd "$(dirname "$0")/.."
SCENARIO=${1:?usage: loadtest/run-local.sh SCENARIO [fanout-loadtest run flags...]}
shift

NODES=${NODES:-2}
GATEWAY_CPUS=${GATEWAY_CPUS:-0}
LOADTEST_CPUS=${LOADTEST_CPUS:-1}
FANOUT_BIN=${FANOUT_BIN:-target/release/fanout}
LOADTEST_BIN=${LOADTEST_BIN:-target/release/fanout-loadtest}
# The generator connects hundreds of clients per second from one address and publishes
# far above one client's command rate: lift the per-client limits for the local cluster.
NODE_ARGS=${NODE_ARGS:---max-connections-per-ip-per-second 0 --command-rate 0}

# Nodes and generator each hold one descriptor per connection: take as many as allowed
# (raising the hard limit works as root).
ulimit -Hn "${NOFILE:-1048576}" 2>/dev/null || true
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if [[ "${BUILD:-1}" != 0 ]]; then
    cargo build --release -p fanout-server -p fanout-loadtest >&2
fi

# Prefixes that pin a command to CPUs, empty when taskset or those CPUs are missing.
# (Arrays, not a function: a backgrounded function would run in a subshell and $!
# would be that subshell's pid rather than the server's.)
ncpu=$(nproc)
pin_prefix() {
    if command -v taskset >/dev/null && [[ "${1%%[,-]*}" -lt "$ncpu" ]]; then
        echo "taskset -c $1"
    fi
}
read -r -a PIN_GATEWAY <<<"$(pin_prefix "$GATEWAY_CPUS")"
read -r -a PIN_LOADTEST <<<"$(pin_prefix "$LOADTEST_CPUS")"

work=$(mktemp -d -t fanout-loadtest.XXXXXX)
pids=()
cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $status -ne 0 ]]; then
        for log in "$work"/*.log; do
            [[ -f "$log" ]] && { echo "--- $log" >&2; tail -n 20 "$log" >&2; }
        done
    fi
    rm -rf "$work"
    exit $status
}
trap cleanup EXIT INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Redis: one server, or SHARDS independent ones.
redis_ports=()
for s in $(seq 1 "${SHARDS:-1}"); do
    port=$(free_port)
    "${PIN_GATEWAY[@]}" redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis$s.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break
        sleep 0.05
    done
    redis-cli -p "$port" ping | grep -q PONG || { echo "redis-server did not start" >&2; exit 1; }
    redis_ports+=("$port")
done
redis_port=${redis_ports[0]}
if [[ ${#redis_ports[@]} -gt 1 ]]; then
    redis_flag=(--redis-shards "$(printf 'redis://127.0.0.1:%s,' "${redis_ports[@]}" | sed 's/,$//')")
else
    redis_flag=(--redis-url "redis://127.0.0.1:$redis_port")
fi
# CPU seconds (user + system) and PUBLISH calls (SPUBLISH and Function calls included) of a Redis.
redis_usage() {
    redis-cli -p "$1" INFO all | tr -d '\r' | awk -F'[:=,]' '
        /^used_cpu_(user|sys):/ {cpu += $2}
        /^cmdstat_publish:/ {pub = $3}
        END {printf "%.6f %d", cpu, pub}'
}

# History (HISTORY=N, and always for the recovery scenario): the generator's namespace
# `loadtest` keeps the last N publications of each channel.
if [[ "$SCENARIO" == recovery && -z "${HISTORY:-}" ]]; then
    HISTORY=10000
fi
# PRESENCE=1 (or PRESENCE=join_leave): the namespace tracks presence (and sends events).
ns_keys=""
if [[ -n "${HISTORY:-}" && "${HISTORY}" != 0 ]]; then
    ns_keys+=$(printf 'history_size = %s\nhistory_ttl = "10m"\n' "$HISTORY")$'\n'
fi
if [[ -n "${PRESENCE:-}" && "${PRESENCE}" != 0 ]]; then
    ns_keys+=$'presence = true\n'
    [[ "$PRESENCE" == join_leave ]] && ns_keys+=$'join_leave = true\n'
fi
if [[ -n "$ns_keys" ]]; then
    printf '[namespaces.loadtest]\n%s' "$ns_keys" >"$work/fanout.toml"
    NODE_ARGS="$NODE_ARGS --config $work/fanout.toml"
fi
export FANOUT_LOADTEST_WORK="$work" FANOUT_LOADTEST_REDIS_PORT="$redis_port"

# Gateway nodes: port 0, addresses read from the `listening public=… internal=…` line.
urls=()
metrics=()
gateway_pids=()
first_internal=""
for i in $(seq 1 "$NODES"); do
    log="$work/node$i.log"
    # shellcheck disable=SC2086
    "${PIN_GATEWAY[@]}" "$FANOUT_BIN" serve "${redis_flag[@]}" \
        --public-addr 127.0.0.1:0 --internal-addr 127.0.0.1:0 $NODE_ARGS >"$log" 2>&1 &
    pid=$!
    pids+=("$pid")
    gateway_pids+=("$pid")
    line=""
    for _ in $(seq 200); do
        line=$(grep -m1 -o 'listening public=[^ ]* internal=[^ "]*' "$log" 2>/dev/null || true)
        [[ -n "$line" ]] && break
        kill -0 "$pid" 2>/dev/null || { echo "fanout node $i exited" >&2; exit 1; }
        sleep 0.05
    done
    [[ -n "$line" ]] || { echo "fanout node $i did not report its addresses" >&2; exit 1; }
    public=${line#listening public=}
    public=${public%% *}
    internal=${line##*internal=}
    urls+=("ws://$public/ws")
    metrics+=(--metrics-url "http://$internal/metrics")
    [[ -n "$first_internal" ]] || first_internal=$internal
    echo "node $i: pid $pid public $public internal $internal" >&2
done

args=(run "$SCENARIO" --url "$(IFS=,; echo "${urls[*]}")" "${metrics[@]}"
    --http-url "http://$first_internal" --redis-url "redis://127.0.0.1:$redis_port")
for pid in "${gateway_pids[@]}"; do
    args+=(--gateway-pid "$pid")
done
[[ "${SPIN:-1}" != 0 ]] && args+=(--spin)

if [[ -n "${HOOK:-}" ]]; then
    FANOUT_LOADTEST_INTERNAL="$first_internal" FANOUT_LOADTEST_WS="$(IFS=,; echo "${urls[*]}")" bash -c "$HOOK" &
    pids+=($!)
fi

before=()
for port in "${redis_ports[@]}"; do before+=("$(redis_usage "$port")"); done
# Not exec: the trap must still tear the cluster down afterwards.
status=0
"${PIN_LOADTEST[@]}" "$LOADTEST_BIN" "${args[@]}" "$@" || status=$?
for i in "${!redis_ports[@]}"; do
    read -r cpu0 pub0 <<<"${before[$i]}"
    read -r cpu1 pub1 <<<"$(redis_usage "${redis_ports[$i]}")"
    python3 -c "
cpu, pubs = $cpu1 - $cpu0, $pub1 - $pub0
per = f'{cpu * 1e6 / pubs:.2f} µs per publication' if pubs else 'no publications'
print(f'redis shard $i: {cpu:.2f} s CPU, {pubs} PUBLISH, {per}')" >&2
done
exit "$status"
