#!/usr/bin/env python3
"""Publish to a fanout channel straight into Redis, with `redis` and `msgpack`.

    FANOUT_REDIS_URL=redis://redis:6379 python3 publish_redis.py [CHANNEL]

Environment: FANOUT_REDIS_URL (default redis://127.0.0.1:6379), FANOUT_REDIS_PREFIX
(default fanout:, must match the gateway's), FANOUT_CHANNEL (default examples:demo; an
argument wins), FANOUT_REDIS_SHARDS (comma-separated URLs: the gateways' redis_shards,
same order; used instead of FANOUT_REDIS_URL). Only for a cluster whose nodes run with
Redis: nodes on the embedded broker never see Redis.

With shards, each channel lives on shard key_slot(prefix + channel) % len(shards), where
key_slot is Redis Cluster's slot function (CRC16/XMODEM of the key, or of its {hash tag},
modulo 16384); `shard_url` below is the whole of it.

Prints one JSON line per publication with the `ts` it carries and how many Redis
subscribers (gateway nodes with a subscriber on the channel) received it. Exits 1 when
Redis refuses (a wrong password), 69 when it cannot be reached or does not answer.

With FANOUT_STORED=1 it publishes with `FCALL fanout_publish` instead (Redis 7, the
Function library every fanout node loads): in a namespace that keeps history the
publication is stored and gets an offset, which it prints instead of the receivers, and
each carries an idempotency key, so running the same publication again cannot publish
it twice.
"""

import json
import os
import sys
import time

import msgpack
import redis

import binascii

REDIS_URL = os.environ.get("FANOUT_REDIS_URL", "redis://127.0.0.1:6379")
SHARDS = [u.strip() for u in os.environ.get("FANOUT_REDIS_SHARDS", "").split(",") if u.strip()]
PREFIX = os.environ.get("FANOUT_REDIS_PREFIX", "fanout:")
CHANNEL = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("FANOUT_CHANNEL", "examples:demo")
STORED = os.environ.get("FANOUT_STORED") == "1"

PUBLICATIONS = [
    "héllo wörld ☃ 日本",
    {
        "order": {
            "id": 1042,
            "customer": {"name": "Zoë Ångström", "tags": ["vip", "beta"]},
            "lines": [{"sku": "A-1", "qty": 2, "price": 9.5}, {"sku": "B-7", "qty": 1, "price": 120.25}],
            "paid": True,
            "coupon": None,
        }
    },
    "0123456789" * 6000,
]

# Sent with enc "msgpack": JSON subscribers get the same value as JSON.
MSGPACK_PUBLICATION = {
    "enc": "msgpack",
    "n": -7,
    "big": 4294967296,
    "ratio": 0.25,
    "flags": [True, False, None],
    "name": "Zoë",
    "empty": {},
}


def envelope(ts, enc, data):
    """The envelope the gateway reads from Redis: a MessagePack map of v, ts, enc, data."""
    return msgpack.packb(
        {
            "v": 1,
            "ts": ts,
            "enc": enc,
            # `data` must be MessagePack bin, not str: pass bytes, and keep use_bin_type
            # (msgpack's default) on.
            "data": data,
        },
        use_bin_type=True,
    )


def key_slot(key):
    """Redis Cluster's HASH_SLOT: CRC16/XMODEM (binascii.crc_hqx) of the key, or of the
    text between its first { and the next } when that is not empty."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % 16384


def shard_url(channel):
    """The Redis that carries `channel`: its shard with redis_shards, else FANOUT_REDIS_URL."""
    if not SHARDS:
        return REDIS_URL
    return SHARDS[key_slot((PREFIX + channel).encode("utf-8")) % len(SHARDS)]


def main():
    client = redis.Redis.from_url(shard_url(CHANNEL), socket_timeout=5, socket_connect_timeout=5)
    items = [("json", json.dumps(p, ensure_ascii=False, separators=(",", ":")).encode("utf-8")) for p in PUBLICATIONS]
    items.append(("msgpack", msgpack.packb(MSGPACK_PUBLICATION, use_bin_type=True)))
    try:
        # One connection, one PUBLISH after the other: subscribers get them in this order.
        for n, (enc, data) in enumerate(items):
            # Microseconds since the Unix epoch, set once here; subscribers see it unchanged.
            ts = time.time_ns() // 1000
            if STORED:
                # Stored and published in one atomic step; the key makes a retry safe.
                key = f"example-{ts}-{n}"
                offset = client.fcall("fanout_publish", 1, PREFIX + CHANNEL, envelope(ts, enc, data), key)
                print(json.dumps({"channel": CHANNEL, "enc": enc, "ts": ts, "offset": offset}), flush=True)
                continue
            receivers = client.publish(PREFIX + CHANNEL, envelope(ts, enc, data))
            print(json.dumps({"channel": CHANNEL, "enc": enc, "ts": ts, "receivers": receivers}), flush=True)
    except (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError) as e:
        print(f"publish_redis: rejected by Redis: {e}", file=sys.stderr)
        return 1
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        # A PUBLISH that timed out may still have been delivered: see docs/publishing.md
        # before retrying.
        print(f"publish_redis: unavailable: {e}", file=sys.stderr)
        return 69
    return 0


if __name__ == "__main__":
    sys.exit(main())
