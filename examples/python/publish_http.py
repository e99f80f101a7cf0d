#!/usr/bin/env python3
"""Publish to a fanout channel through a node's internal HTTP API, with `requests`.

    FANOUT_API_URL=http://gateway:9090 FANOUT_API_KEY=secret python3 publish_http.py [CHANNEL]

Environment: FANOUT_API_URL (default http://127.0.0.1:9090), FANOUT_API_KEY (unset: no
Authorization header), FANOUT_CHANNEL (default examples:demo; an argument wins).
Prints one JSON line per publication; exits 1 on a rejected request (4xx, don't retry),
69 when the gateway is unavailable or too slow.
"""

import json
import os
import sys
import time

import requests

API_URL = os.environ.get("FANOUT_API_URL", "http://127.0.0.1:9090").rstrip("/")
API_KEY = os.environ.get("FANOUT_API_KEY")
CHANNEL = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("FANOUT_CHANNEL", "examples:demo")

# What every example publishes: a non-ASCII string, a nested object, and a string close
# to the default 64 KiB limit on `data` (60,002 bytes as JSON).
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

# Retry only what may pass later (503, connection refused, a timeout) and only a few
# times: delivery is at most once, and a timed-out request may already have been
# delivered, so a retry can deliver it twice.
RETRIES = 3


class Unavailable(Exception):
    pass


def publish(session, channel, data):
    body = json.dumps({"channel": channel, "data": data}, ensure_ascii=False).encode("utf-8")
    for attempt in range(RETRIES + 1):
        try:
            resp = session.post(f"{API_URL}/api/publish", data=body, timeout=5)
        except (requests.ConnectionError, requests.Timeout) as e:
            error = Unavailable(str(e))
        else:
            if resp.status_code == 200:
                return
            if resp.status_code not in (429, 502, 503, 504):
                # 400 bad body or channel, 401 wrong key, 413 too large: the same request
                # fails the same way again.
                raise requests.HTTPError(f"HTTP {resp.status_code}: {resp.text}", response=resp)
            error = Unavailable(f"HTTP {resp.status_code}: {resp.text}")
        if attempt < RETRIES:
            time.sleep(0.05 * 2**attempt)
    raise error


def main():
    session = requests.Session()
    session.headers["Content-Type"] = "application/json"
    if API_KEY:
        session.headers["Authorization"] = f"Bearer {API_KEY}"
    try:
        for data in PUBLICATIONS:
            publish(session, CHANNEL, data)
            print(json.dumps({"channel": CHANNEL, "enc": "json"}), flush=True)
    except requests.HTTPError as e:
        print(f"publish_http: rejected: {e}", file=sys.stderr)
        return 1
    except Unavailable as e:
        print(f"publish_http: unavailable: {e}", file=sys.stderr)
        return 69
    return 0


if __name__ == "__main__":
    sys.exit(main())
