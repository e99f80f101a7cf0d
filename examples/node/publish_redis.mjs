// Publish to a fanout channel straight into Redis, with `redis` and `@msgpack/msgpack`.
//
//   FANOUT_REDIS_URL=redis://redis:6379 node publish_redis.mjs [CHANNEL]
//
// Environment: FANOUT_REDIS_URL (default redis://127.0.0.1:6379), FANOUT_REDIS_PREFIX
// (default fanout:, must match the gateway's), FANOUT_CHANNEL (default examples:demo; an
// argument wins), FANOUT_REDIS_SHARDS (comma-separated URLs: the gateways' redis_shards,
// same order; used instead of FANOUT_REDIS_URL). Only for a cluster whose nodes run with
// Redis: nodes on the embedded broker never see Redis.
//
// With shards, each channel lives on shard keySlot(prefix + channel) % shards.length,
// where keySlot is Redis Cluster's slot function (CRC16/XMODEM of the key, or of its
// {hash tag}, modulo 16384); `shardUrl` below is the whole of it.
//
// Prints one JSON line per publication with the `ts` it carries and how many Redis
// subscribers (gateway nodes with a subscriber on the channel) received it. Exits 1 when
// Redis refuses (a wrong password), 69 when it cannot be reached or does not answer.
//
// With FANOUT_STORED=1 it publishes with `FCALL fanout_publish` instead (Redis 7, the
// Function library every fanout node loads): in a namespace that keeps history the
// publication is stored and gets an offset, which it prints instead of the receivers, and
// each carries an idempotency key, so running the same publication again cannot publish
// it twice.

import { encode } from "@msgpack/msgpack";
import { createClient, ErrorReply } from "redis";

const REDIS_URL = process.env.FANOUT_REDIS_URL ?? "redis://127.0.0.1:6379";
const PREFIX = process.env.FANOUT_REDIS_PREFIX ?? "fanout:";
const CHANNEL = process.argv[2] ?? process.env.FANOUT_CHANNEL ?? "examples:demo";
const STORED = process.env.FANOUT_STORED === "1";
const SHARDS = (process.env.FANOUT_REDIS_SHARDS ?? "")
  .split(",")
  .map((u) => u.trim())
  .filter((u) => u);

// Redis Cluster's HASH_SLOT: CRC16/XMODEM (polynomial 0x1021, initial 0) of the key, or
// of the text between its first { and the next } when that is not empty.
function keySlot(key) {
  let bytes = Buffer.from(key, "utf8");
  const open = bytes.indexOf("{");
  if (open >= 0) {
    const close = bytes.indexOf("}", open + 1);
    if (close > open + 1) bytes = bytes.subarray(open + 1, close);
  }
  let crc = 0;
  for (const b of bytes) {
    crc ^= b << 8;
    for (let i = 0; i < 8; i++) crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
  }
  return crc % 16384;
}

// The Redis that carries `channel`: its shard with redis_shards, else FANOUT_REDIS_URL.
function shardUrl(channel) {
  return SHARDS.length ? SHARDS[keySlot(PREFIX + channel) % SHARDS.length] : REDIS_URL;
}

const PUBLICATIONS = [
  "héllo wörld ☃ 日本",
  {
    order: {
      id: 1042,
      customer: { name: "Zoë Ångström", tags: ["vip", "beta"] },
      lines: [
        { sku: "A-1", qty: 2, price: 9.5 },
        { sku: "B-7", qty: 1, price: 120.25 },
      ],
      paid: true,
      coupon: null,
    },
  },
  "0123456789".repeat(6000),
];

// Sent with enc "msgpack": JSON subscribers get the same value as JSON.
const MSGPACK_PUBLICATION = {
  enc: "msgpack",
  n: -7,
  big: 4294967296,
  ratio: 0.25,
  flags: [true, false, null],
  name: "Zoë",
  empty: {},
};

// The envelope the gateway reads from Redis: a MessagePack map of v, ts, enc, data.
// `data` must be MessagePack bin, which @msgpack/msgpack writes for a Uint8Array (a
// Buffer is one); a string would be written as str and the gateway would drop it.
function envelope(ts, enc, data) {
  return Buffer.from(encode({ v: 1, ts, enc, data }));
}

// Microseconds since the Unix epoch, from the wall clock (millisecond resolution is
// plenty; performance.now() would drift from it in a long-running service). A JS number
// holds integers exactly up to 2^53, far beyond any microsecond timestamp of this era.
function nowMicros() {
  return Date.now() * 1000;
}

const items = PUBLICATIONS.map((p) => ["json", Buffer.from(JSON.stringify(p), "utf8")]);
items.push(["msgpack", encode(MSGPACK_PUBLICATION)]);

// No reconnect loop: a one-shot publisher should fail fast and say so.
const client = createClient({ url: shardUrl(CHANNEL), socket: { connectTimeout: 5000, reconnectStrategy: false } });
client.on("error", () => {}); // reported by the command that fails
try {
  await client.connect();
  // One connection, one PUBLISH after the other: subscribers get them in this order.
  for (const [n, [enc, data]] of items.entries()) {
    const ts = nowMicros();
    if (STORED) {
      // Stored and published in one atomic step; the key makes a retry safe.
      const key = `example-${ts}-${n}`;
      const offset = await client.fCall("fanout_publish", {
        keys: [PREFIX + CHANNEL],
        arguments: [envelope(ts, enc, data), key],
      });
      console.log(JSON.stringify({ channel: CHANNEL, enc, ts, offset }));
      continue;
    }
    const receivers = await client.publish(PREFIX + CHANNEL, envelope(ts, enc, data));
    console.log(JSON.stringify({ channel: CHANNEL, enc, ts, receivers }));
  }
  await client.close();
} catch (e) {
  // Redis error replies (wrong password, …) are rejections; everything else is the
  // connection. A PUBLISH whose answer was lost may still have been delivered.
  const rejected = e instanceof ErrorReply;
  console.error(`publish_redis: ${rejected ? "rejected by Redis" : "unavailable"}: ${e.message}`);
  process.exitCode = rejected ? 1 : 69;
  client.destroy();
}
