// The client against real fanout nodes and a real Redis: publish and subscribe across
// nodes, reconnects after a kill and a freeze, a drain with zero loss in a history
// namespace, token refresh and 1008, backoff bounds, bounded queues.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { backoffDelay, Client, FanoutError, tokenExpiry } from "../dist/index.js";
import { configFile, eventually, next, Node, Redis, token } from "./harness.mjs";

const HISTORY = configFile(
  '[namespaces.h]\nhistory_size = 1000\nhistory_ttl = "10m"\n\n[namespaces.room]\npresence = true\njoin_leave = true\n',
);
const fast = { minReconnectDelay: 20, maxReconnectDelay: 200 };

describe("against two nodes sharing a Redis", () => {
  let redis, a, b;
  const clients = [];
  const client = (opts) => {
    const c = new Client({ ...fast, ...opts });
    clients.push(c);
    return c;
  };
  before(async () => {
    redis = await Redis.start();
    [a, b] = await Promise.all([
      Node.start(["--redis-url", redis.url, "--config", HISTORY]),
      Node.start(["--redis-url", redis.url, "--config", HISTORY]),
    ]);
  });
  after(() => {
    for (const c of clients) c.close();
    for (const n of [a, b]) n?.stop();
    redis?.stop();
  });

  test("publishes and receives both ways across nodes", async () => {
    const x = client({ url: a.ws });
    const y = client({ url: b.ws });
    const gotX = [];
    const gotY = [];
    const sx = x.subscribe("chat:1", { onMessage: (m) => gotX.push(m.data) });
    const sy = y.subscribe("chat:1", { onMessage: (m) => gotY.push(m.data) });
    await Promise.all([next((f) => sx.on("subscribed", f)), next((f) => sy.on("subscribed", f))]);
    assert.deepEqual(await x.publish("chat:1", { from: "x" }), {}, "no offset outside history");
    await y.publish("chat:1", { from: "y" });
    await eventually("both got both", () => gotX.length === 2 && gotY.length === 2);
    assert.deepEqual(gotX, [{ from: "x" }, { from: "y" }]);
    assert.deepEqual(gotY, gotX);
    const stored = await x.publish("h:ack", 1);
    assert.equal(stored.offset, 1);
    assert.equal(typeof stored.epoch, "string");
    const h = await y.history("h:ack");
    assert.deepEqual(h.publications.map((p) => p.data), [1]);
    await assert.rejects(x.history("chat:1"), (e) => e instanceof FanoutError && e.code === "bad_request");
  });

  test("presence: who is there, how many, and join/leave events", async () => {
    const x = client({ url: a.ws });
    const y = client({ url: b.ws });
    const joins = [];
    const sx = x.subscribe("room:js");
    sx.on("join", (e) => joins.push(e));
    await next((f) => sx.on("subscribed", f));
    const sy = y.subscribe("room:js");
    await next((f) => sy.on("subscribed", f));
    await eventually("x saw two joins (its own and y's)", () => joins.length >= 2);
    await eventually("both present", async () => (await x.presenceStats("room:js")).clients === 2);
    assert.equal((await y.presence("room:js")).length, 2);
    const left = next((f) => sx.on("leave", f));
    sy.unsubscribe();
    assert.equal(typeof (await left).client, "string");
  });

  test("a frozen node is detected and the client moves to the other one", async () => {
    const c = client({ url: [a.ws, b.ws], pingInterval: 300, pongTimeout: 300 });
    const got = [];
    const s = c.subscribe("chat:frozen", { onMessage: (m) => got.push(m.data) });
    await next((f) => s.on("subscribed", f));
    a.signal("SIGSTOP");
    try {
      await next((f) => c.on("disconnected", f), () => true, 5000);
      await next((f) => s.on("subscribed", f), () => true, 5000);
      assert.equal(c.state, "connected");
      await b.publish("chat:frozen", "after");
      await eventually("delivered on the other node", () => got.includes("after"));
    } finally {
      a.signal("SIGCONT");
    }
  });

  test("draining a node loses nothing in a history namespace", async () => {
    const c = client({ url: [a.ws, b.ws] });
    const offsets = [];
    const s = c.subscribe("h:drain", { onMessage: (m) => offsets.push(m.offset) });
    await next((f) => s.on("subscribed", f));
    const N = 300;
    let recovered;
    s.on("subscribed", (e) => {
      recovered = e.recovered;
    });
    const publishing = (async () => {
      for (let i = 1; i <= N; i++) {
        const r = await b.publish("h:drain", i, { idempotency_key: `d${i}` });
        assert.equal(r.status, 200);
        await new Promise((res) => setTimeout(res, 3));
      }
    })();
    await new Promise((res) => setTimeout(res, 200));
    a.signal("SIGTERM");
    await publishing;
    await eventually("every offset arrived", () => offsets.length >= N, 15_000);
    assert.equal(recovered, true, "resubscribed with since and recovered");
    assert.deepEqual(offsets, Array.from({ length: N }, (_, i) => i + 1), "every offset once, in order");
    assert.equal(s.position.offset, N);
    a = await Node.start(["--redis-url", redis.url, "--config", HISTORY]);
  });

  test("a killed node: the client reconnects elsewhere and resubscribes", async () => {
    const c = client({ url: [a.ws, b.ws] });
    const got = [];
    const states = [];
    c.on("state", (s) => states.push(s));
    const s = c.subscribe("chat:kill", { onMessage: (m) => got.push(m.data) });
    await next((f) => s.on("subscribed", f));
    a.stop();
    await next((f) => s.on("subscribed", f));
    assert.ok(states.includes("disconnected") && states.at(-1) === "connected", states.join(","));
    await b.publish("chat:kill", "back");
    await eventually("delivered after the reconnect", () => got.includes("back"));
    a = await Node.start(["--redis-url", redis.url, "--config", HISTORY]);
  });
});

describe("tokens", () => {
  const SECRET = "0123456789abcdef0123456789abcdef-test";
  let node;
  before(async () => {
    node = await Node.start(["--jwt-hmac-secret", SECRET, "--config", configFile('[auth]\nleeway = "0s"\n')]);
  });
  after(() => node?.stop());

  test("refreshes the token before it expires, so the connection stays", async () => {
    let minted = 0;
    const getToken = async () => {
      minted += 1;
      return token(SECRET, "u1", 3);
    };
    const first = token(SECRET, "u1", 2);
    const c = new Client({ ...fast, url: node.ws, token: first, getToken, refreshMargin: 1000 });
    const s = c.subscribe("chat:t");
    await next((f) => s.on("subscribed", f));
    const closes = [];
    c.on("disconnected", (e) => closes.push(e.code));
    // Past the first token's expiry (the server's leeway is 0 here) and a second refresh.
    await eventually("refreshed twice, past the first expiry", () => minted >= 2 && Date.now() > tokenExpiry(first) * 1000 + 500);
    assert.deepEqual(closes, [], "never disconnected");
    assert.ok(tokenExpiry(token(SECRET, "u", 5)) > Date.now() / 1000);
    c.close();
  });

  test("after 1008 it fetches a new token and reconnects", async () => {
    let minted = 0;
    const getToken = async () => {
      minted += 1;
      return token(SECRET, "u2", 60);
    };
    // A refresh margin below zero never refreshes early: the server cuts it at expiry.
    const c = new Client({ ...fast, url: node.ws, token: token(SECRET, "u2", 1), getToken, refreshMargin: -60_000 });
    const s = c.subscribe("chat:expire");
    await next((f) => s.on("subscribed", f));
    const closed = await next((f) => c.on("disconnected", f), () => true, 5000);
    assert.equal(closed.code, 1008);
    await next((f) => s.on("subscribed", f), () => true, 5000);
    assert.equal(minted, 1);
    assert.equal(c.state, "connected");
    c.close();
  });

  test("4009 from the server API closes the client for good, without reconnecting", async () => {
    const getToken = async () => token(SECRET, "kicked", 60);
    const c = new Client({ ...fast, url: node.ws, token: token(SECRET, "kicked", 60), getToken });
    const s = c.subscribe("chat:k");
    await next((f) => s.on("subscribed", f));
    const states = [];
    c.on("state", (st) => states.push(st));
    const r = await fetch(`http://${node.internal}/api/disconnect`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user: "kicked" }),
    });
    assert.equal(r.status, 200);
    const closed = await next((f) => c.on("closed", f));
    assert.equal(closed.code, 4009);
    await new Promise((res) => setTimeout(res, 300));
    assert.deepEqual(states, ["disconnected", "closed"], "no reconnect attempt");
  });

  test("without getToken, 1008 at expiry closes the client for good", async () => {
    const c = new Client({ ...fast, url: node.ws, token: token(SECRET, "u3", 1) });
    const s = c.subscribe("chat:gone");
    await next((f) => s.on("subscribed", f));
    const closed = await next((f) => c.on("closed", f), () => true, 5000);
    assert.equal(closed.code, 1008);
    assert.equal(c.state, "closed");
    await assert.rejects(c.publish("chat:gone", 1), (e) => e.code === "closed");
  });
});

test("backoff: full jitter within a cap that doubles up to the maximum", () => {
  for (let attempt = 0; attempt < 40; attempt++) {
    const cap = Math.min(10_000, 200 * 2 ** attempt);
    assert.equal(backoffDelay(attempt, 200, 10_000, () => 0), 0);
    const top = backoffDelay(attempt, 200, 10_000, () => 0.999999);
    assert.ok(top <= cap && top >= cap - 1, `attempt ${attempt}: ${top} vs ${cap}`);
    for (let i = 0; i < 50; i++) {
      const d = backoffDelay(attempt, 200, 10_000);
      assert.ok(d >= 0 && d <= cap);
    }
  }
});

test("commands waiting for a connection are bounded and fail clearly on close", async () => {
  const c = new Client({ url: "ws://127.0.0.1:9/ws", maxQueued: 3, minReconnectDelay: 1000 });
  const waiting = [c.publish("chat:q", 1), c.publish("chat:q", 2), c.history("h:q")];
  await assert.rejects(c.publish("chat:q", 4), (e) => e.code === "queue_full");
  assert.equal(c.queued, 3);
  c.close();
  for (const p of waiting) await assert.rejects(p, (e) => e.code === "closed");
  await assert.rejects(c.publish("chat:q", 5), (e) => e.code === "closed");
  assert.throws(() => new Client({ url: [] }), FanoutError);
});
