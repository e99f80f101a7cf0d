#!/usr/bin/env bash
# loadtest/idle-multi.sh: idle memory at more connections than one process may open here.
# Starts redis-server and NODES fanout nodes pinned to CPU 0 and one fanout-loadtest per
# node pinned to CPU 1 (the container's hard fd limit is 20000 per process), each holding
# TOTAL/NODES idle subscribed connections, and prints each node's RSS per connection.
#   loadtest/idle-multi.sh [TOTAL=50000] [NODES=3]
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${1:-50000}
NODES=${2:-3}
cargo build --release -p fanout-server -p fanout-loadtest >&2
work=$(mktemp -d)
trap 'kill "${pids[@]}" $RPID 2>/dev/null || true; rm -rf "$work"' EXIT
RP=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
taskset -c 0 redis-server --port $RP --save "" --appendonly no >/dev/null 2>&1 & RPID=$!
sleep 0.5
pids=(); urls=()
for i in $(seq 1 "$NODES"); do
  taskset -c 0 target/release/fanout serve --redis-url redis://127.0.0.1:$RP --public-addr 127.0.0.1:0 --internal-addr 127.0.0.1:0 --max-connections-per-ip-per-second 0 --command-rate 0 2> "$work/node$i.log" & pids+=($!)
done
sleep 1
for i in $(seq 1 "$NODES"); do urls+=($(grep -o 'public=[0-9.:]*' "$work/node$i.log" | cut -d= -f2)); done
gen=()
for i in $(seq 0 $((NODES - 1))); do
  n=$((TOTAL / NODES + (i < TOTAL % NODES ? 1 : 0)))
  taskset -c 1 target/release/fanout-loadtest run idle --subscribers $n --channels 1000 --duration 8s --url ws://${urls[$i]}/ws --gateway-pid ${pids[$i]} --source-addrs 127.0.$((i+1)).2,127.0.$((i+1)).3 --json-out "$work/idle-node$((i+1)).json" > "$work/gen$i.log" 2>&1 & gen+=($!)
done
for g in "${gen[@]}"; do wait $g || true; done
for i in $(seq 0 $((NODES - 1))); do echo "node $((i+1)):"; grep -E "connections  |gateway memory" "$work/gen$i.log"; done
