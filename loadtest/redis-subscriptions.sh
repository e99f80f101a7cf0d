#!/usr/bin/env bash
# What subscriptions cost Redis in memory: K connections (as K gateway nodes would hold)
# each SUBSCRIBE (or SSUBSCRIBE, on a one-node cluster) the same N channels named like
# fanout's; prints used_memory before and after, and the bytes per channel and per
# (channel, connection) subscription. For the capacity model in docs/benchmarks.md.
#
#   loadtest/redis-subscriptions.sh [CHANNELS] [CONNECTIONS]     (default 200000 4)
#
# Environment: SHARDED=1 uses a --cluster-enabled server and SSUBSCRIBE.
set -euo pipefail
N=${1:-200000}
K=${2:-4}
work=$(mktemp -d -t fanout-redis-subs.XXXXXX)
pid=""
cleanup() {
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
extra=()
if [[ "${SHARDED:-0}" == 1 ]]; then
    extra=(--cluster-enabled yes --cluster-config-file "$work/nodes.conf")
fi
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" "${extra[@]}" >"$work/redis.log" 2>&1 &
pid=$!
for _ in $(seq 100); do redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break; sleep 0.05; done
if [[ "${SHARDED:-0}" == 1 ]]; then
    redis-cli -p "$port" CLUSTER ADDSLOTSRANGE 0 16383 >/dev/null
    for _ in $(seq 100); do redis-cli -p "$port" CLUSTER INFO | grep -q cluster_state:ok && break; sleep 0.05; done
fi
python3 - "$port" "$N" "$K" "${SHARDED:-0}" <<'PY'
import socket, sys, binascii
port, n, k, sharded = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"

def used_memory():
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"INFO memory\r\n")
    data = b""
    while b"used_memory:" not in data or not data.endswith(b"\r\n"):
        data += s.recv(65536)
    s.close()
    return int(data.split(b"used_memory:")[1].split(b"\r\n")[0])

def command(words):
    out = b"*%d\r\n" % len(words)
    for w in words:
        out += b"$%d\r\n%s\r\n" % (len(w), w)
    return out

names = [b"fanout:room:%d" % i for i in range(n)]
groups = {}
if sharded:
    # SSUBSCRIBE takes channels of one slot per command.
    for name in names:
        groups.setdefault(binascii.crc_hqx(name, 0) % 16384, []).append(name)
    batches = list(groups.values())
else:
    batches = [names[i:i + 1000] for i in range(0, n, 1000)]
verb = b"SSUBSCRIBE" if sharded else b"SUBSCRIBE"
before = used_memory()
conns = []
for _ in range(k):
    s = socket.create_connection(("127.0.0.1", port))
    for batch in batches:
        s.sendall(command([verb] + batch))
    # Every channel is confirmed with one reply; count them to know all are in.
    want, got, buf = n, 0, b""
    while got < want:
        buf += s.recv(1 << 20)
        got = buf.count(b"subscribe\r\n")
    conns.append(s)
after = used_memory()
delta = after - before
print(f"{'SSUBSCRIBE' if sharded else 'SUBSCRIBE'}: {n} channels x {k} connections: used_memory {before} -> {after} "
      f"(+{delta / 2**20:.1f} MiB): {delta / n:.0f} bytes per channel, {delta / (n * k):.0f} bytes per subscription")
PY
