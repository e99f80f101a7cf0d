#!/usr/bin/env bash
# A burst of clients joining one presence channel: how long until presence_stats counts
# every one of them (from the first connect, and after the last subscribe), and what the
# burst costs Redis in CPU. Runs the load tester's idle scenario with all clients on one
# channel of a presence namespace, through loadtest/run-local.sh.
#
#   loadtest/presence-burst.sh [CLIENTS]      (default 10000)
#
# Environment as for run-local.sh (BUILD=0, FANOUT_BIN, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
out=$(mktemp -d -t fanout-presence.XXXXXX)
trap 'rm -rf "$out"' EXIT
# The hook runs next to the load tester: it samples Redis CPU, then polls presence_stats
# until it counts every client.
HOOK='
set -u
cpu() { redis-cli -p "$FANOUT_LOADTEST_REDIS_PORT" INFO cpu | awk -F: "/^used_cpu_(user|sys):/ {s += \$2} END {printf \"%.6f\", s}"; }
start=$(date +%s.%N); before=$(cpu)
while :; do
  n=$(curl -s -H "content-type: application/json" -d "{\"channel\":\"loadtest:presence:0\"}" "http://$FANOUT_LOADTEST_INTERNAL/api/presence_stats" | python3 -c "import json,sys; print(json.load(sys.stdin).get(\"clients\",0))" 2>/dev/null || echo 0)
  [ "$n" -ge '"$N"' ] && break
  sleep 0.05
done
end=$(date +%s.%N); after=$(cpu)
python3 -c "print(f\"presence_stats exact at $n clients {($end - $start):.2f} s after the burst began; Redis CPU {($after - $before):.3f} s ({($after - $before) * 1e6 / $n:.1f} µs per join)\")" > '"$out"'/result
'
PRESENCE=1 HOOK="$HOOK" loadtest/run-local.sh idle -n "$N" -c 1 --duration 5s --run-id presence \
    --connect-rate 5000 -q --json-out "$out/idle.json" >"$out/table" 2>&1 || { cat "$out/table"; exit 1; }
grep -E "connect latency|established" "$out/table" || true
python3 -c "import json; r=json.load(open('$out/idle.json')); c=r['connect']; print(f\"connected {c['established']} in {c.get('seconds', 0)} s\")" 2>/dev/null || true
cat "$out/result"
