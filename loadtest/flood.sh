#!/usr/bin/env bash
# loadtest/flood.sh [RATE]: a flood straight into Redis far faster than one node fans out
# (one node, 2,000 subscribers, `broadcast --transport redis`), with the node's RSS
# sampled every 250 ms and its drop counters read at the end. See docs/benchmarks.md.
# Environment as for run-local.sh (FANOUT_BIN, LOADTEST_BIN, BUILD=0 ...).
set -uo pipefail
cd "$(dirname "$0")/.."
rate=${1:-2000}
bin=${FANOUT_BIN:-target/release/fanout}
out=$(mktemp -d -t fanout-flood.XXXXXX)
export NODES=1 FANOUT_BIN="$bin"
(
  max=0 port=""
  while sleep 0.25; do
    pid=$(pgrep -f "^$bin serve" | head -1)
    [ -n "$pid" ] || continue
    rss=$(awk '/VmRSS/{print $2}' "/proc/$pid/status" 2>/dev/null)
    [ -n "$rss" ] || continue
    if [ "$rss" -gt "$max" ]; then max=$rss; echo "$max" >"$out/max_rss_kib"; fi
    if [ -z "$port" ]; then # the listener that serves /metrics is the internal one
      for p in $(ss -ltnpH 2>/dev/null | grep "pid=$pid," | awk '{print $4}' | sed 's/.*://'); do
        curl -s "127.0.0.1:$p/metrics" | grep -q '^fanout_' && port=$p && break
      done
    fi
    [ -n "$port" ] && curl -s "127.0.0.1:$port/metrics" |
      grep -E '^fanout_(publications_dropped_total|broker_backlog_bytes|broker_publications_received_total)' >"$out/metrics.tmp" &&
      mv "$out/metrics.tmp" "$out/metrics"
  done
) &
sampler=$!
loadtest/run-local.sh broadcast --transport redis --rate "$rate" --duration 15s | tee "$out/report.txt"
kill "$sampler" 2>/dev/null
echo "node peak RSS: $(cat "$out/max_rss_kib" 2>/dev/null || echo '?') KiB"
cat "$out/metrics" 2>/dev/null
