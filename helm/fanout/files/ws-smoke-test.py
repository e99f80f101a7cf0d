# helm/fanout/files/ws-smoke-test.py: owns the `helm test` round trip (standard library only).
# Opens a WebSocket to the public Service, subscribes to a channel, publishes to it
# through the internal API and waits for the message. Also runs by hand:
#   WS_URL=ws://127.0.0.1:8080/ws API_URL=http://127.0.0.1:9090 python3 ws-smoke-test.py
# With FANOUT_JWT_HMAC_SECRET set it connects with a short-lived token signed with it
# (JWT_ALGORITHM, JWT_AUDIENCE and JWT_ISSUER follow the chart's auth.* values).
import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

WS_URL = os.environ.get("WS_URL", "ws://127.0.0.1:8080/ws")
API_URL = os.environ.get("API_URL", "http://127.0.0.1:9090").rstrip("/")
API_KEY = os.environ.get("FANOUT_API_KEY", "")
CHANNEL = os.environ.get("CHANNEL", "helm-test")
DEADLINE = time.monotonic() + float(os.environ.get("TIMEOUT_SECONDS", "60"))
DATA = {"hello": "world"}
JWT_SECRET = os.environ.get("FANOUT_JWT_HMAC_SECRET", "")
JWT_ALGORITHM = os.environ.get("JWT_ALGORITHM") or "HS256"
JWT_AUDIENCE = os.environ.get("JWT_AUDIENCE", "")
JWT_ISSUER = os.environ.get("JWT_ISSUER", "")
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def log(msg):
    print("ws-smoke-test: " + msg, flush=True)


def remaining():
    left = DEADLINE - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class WebSocket:
    """Just enough RFC 6455 for one client: masked text frames out, any frames in."""

    def __init__(self, url, token=None):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "ws":
            raise ValueError("only ws:// URLs are supported, got " + url)
        host, port = u.hostname, u.port or 80
        path = (u.path or "/") + ("?" + u.query if u.query else "")
        self.sock = socket.create_connection((host, port), timeout=remaining())
        key = base64.b64encode(os.urandom(16))
        request = (
            "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: fanout.v1.json\r\n" % (path, host, port, key.decode())
        )
        if token:
            request += "Authorization: Bearer %s\r\n" % token
        request += "\r\n"
        self.sock.sendall(request.encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise RuntimeError("upgrade refused: " + lines[0])
        headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
        expected = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            raise RuntimeError("bad Sec-WebSocket-Accept")

    def _recv(self, until=None):
        timeout = remaining() if until is None else min(remaining(), until - time.monotonic())
        if timeout <= 0:
            raise socket.timeout("no data in time")
        self.sock.settimeout(timeout)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the TCP connection")
        return chunk

    def _frame(self):
        """Takes one complete frame off the buffer: (fin, opcode, payload), or None."""
        b = self.buf
        if len(b) < 2:
            return None
        n, pos = b[1] & 0x7F, 2
        if n == 126:
            if len(b) < 4:
                return None
            n, pos = struct.unpack("!H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, pos = struct.unpack("!Q", b[2:10])[0], 10
        mask = None
        if b[1] & 0x80:
            if len(b) < pos + 4:
                return None
            mask, pos = b[pos:pos + 4], pos + 4
        if len(b) < pos + n:
            return None
        payload, self.buf = b[pos:pos + n], b[pos + n:]
        if mask:
            payload = bytes(x ^ mask[i % 4] for i, x in enumerate(payload))
        return b[0] & 0x80, b[0] & 0x0F, payload

    def send(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send_json(self, obj):
        self.send(0x1, json.dumps(obj).encode())

    def recv_json(self, until=None):
        """Next text message as JSON (socket.timeout past `until`); answers pings, fails on close."""
        message, message_op = b"", None
        while True:
            frame = self._frame()
            if frame is None:
                self.buf += self._recv(until)
                continue
            fin, opcode, payload = frame
            if opcode == 0x9:
                self.send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise ConnectionError("server closed the WebSocket, code %s %r" % (code, payload[2:]))
            if opcode != 0x0:
                message_op = opcode
            message += payload
            if fin:
                if message_op != 0x1:
                    raise RuntimeError("expected a text frame, got opcode %s" % message_op)
                return json.loads(message)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token():
    """A 5-minute token for subscribing to CHANNEL, or None without an HMAC secret."""
    if not JWT_SECRET:
        return None
    claims = {"sub": "helm-test", "exp": int(time.time()) + 300, "subscribe": [CHANNEL]}
    if JWT_AUDIENCE:
        claims["aud"] = JWT_AUDIENCE
    if JWT_ISSUER:
        claims["iss"] = JWT_ISSUER
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[JWT_ALGORITHM]
    head = b64url(json.dumps({"alg": JWT_ALGORITHM, "typ": "JWT"}).encode()) + "." + \
        b64url(json.dumps(claims).encode())
    return head + "." + b64url(hmac.new(JWT_SECRET.encode(), head.encode(), digest).digest())


def publish():
    body = json.dumps({"channel": CHANNEL, "data": DATA}).encode()
    req = urllib.request.Request(API_URL + "/api/publish", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    if API_KEY:
        req.add_header("Authorization", "Bearer " + API_KEY)
    with urllib.request.urlopen(req, timeout=min(10, remaining())) as resp:
        reply = json.loads(resp.read())
    if reply != {"ok": True}:
        raise RuntimeError("unexpected publish reply %r" % reply)


def wait_for(ws, seconds, predicate):
    """Reads messages for up to `seconds`; returns the first matching one or None."""
    until = min(DEADLINE, time.monotonic() + seconds)
    while True:
        try:
            msg = ws.recv_json(until)
        except socket.timeout:
            return None
        if predicate(msg):
            return msg
        log("ignoring " + json.dumps(msg))


def main():
    # Retry the connection until the deadline: pods may still be coming up.
    while True:
        try:
            ws = WebSocket(WS_URL, token())
            break
        except (OSError, RuntimeError) as e:
            log("connect to %s failed (%s), retrying" % (WS_URL, e))
            time.sleep(min(2, remaining()))
    log("connected to %s%s" % (WS_URL, " with a %s token" % JWT_ALGORITHM if JWT_SECRET else ""))
    ws.send_json({"op": "subscribe", "channel": CHANNEL, "id": 1})
    reply = wait_for(ws, 10, lambda m: m.get("id") == 1)
    if reply != {"op": "subscribed", "channel": CHANNEL, "id": 1}:
        raise RuntimeError("subscribe failed: %r" % (reply,))
    log("subscribed to " + CHANNEL)

    def is_ours(m):
        return m.get("op") == "message" and m.get("channel") == CHANNEL and m.get("data") == DATA

    # The publish may land on another node than the subscriber's: publish again
    # (at most once a second) in case that node's broker subscription was not
    # in place yet. At-most-once delivery means a lost first try is legal.
    attempt = 0
    while True:
        attempt += 1
        try:
            publish()
        except urllib.error.HTTPError as e:
            raise RuntimeError("publish via %s: HTTP %d %s" % (API_URL, e.code, e.read()[:200]))
        except (urllib.error.URLError, OSError) as e:
            log("publish via %s failed (%s), retrying" % (API_URL, e))
        msg = wait_for(ws, 1.0, is_ours)
        if msg is not None:
            break
        log("publish attempt %d not delivered yet" % attempt)
        remaining()
    if not isinstance(msg.get("ts"), int) or isinstance(msg.get("ts"), bool):
        raise RuntimeError("message without an integer ts: %r" % msg)
    log("received %s after %d publish attempt(s): OK" % (json.dumps(msg), attempt))
    ws.send(0x8, struct.pack("!H", 1000))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one clear line for `helm test --logs`
        log("FAILED: %s: %s" % (type(e).__name__, e))
        sys.exit(1)
