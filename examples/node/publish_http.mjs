// Publish to a fanout channel through a node's internal HTTP API, with Node's built-in fetch.
//
//   FANOUT_API_URL=http://gateway:9090 FANOUT_API_KEY=secret node publish_http.mjs [CHANNEL]
//
// Environment: FANOUT_API_URL (default http://127.0.0.1:9090), FANOUT_API_KEY (unset: no
// Authorization header), FANOUT_CHANNEL (default examples:demo; an argument wins).
// Prints one JSON line per publication; exits 1 on a rejected request (4xx, don't retry),
// 69 when the gateway is unavailable or too slow. Needs no package: `fetch` is built in.

const API_URL = (process.env.FANOUT_API_URL ?? "http://127.0.0.1:9090").replace(/\/+$/, "");
const API_KEY = process.env.FANOUT_API_KEY;
const CHANNEL = process.argv[2] ?? process.env.FANOUT_CHANNEL ?? "examples:demo";

// What every example publishes: a non-ASCII string, a nested object, and a string close
// to the default 64 KiB limit on `data` (60,002 bytes as JSON).
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

// Retry only what may pass later (503, a refused connection, a timeout) and only a few
// times: delivery is at most once, and a timed-out request may already have been
// delivered, so a retry can deliver it twice.
const RETRIES = 3;
const RETRYABLE = new Set([429, 502, 503, 504]);

class Rejected extends Error {}

async function publish(channel, data) {
  const headers = { "Content-Type": "application/json" };
  if (API_KEY) headers.Authorization = `Bearer ${API_KEY}`;
  const body = JSON.stringify({ channel, data });
  let error;
  for (let attempt = 0; attempt <= RETRIES; attempt++) {
    try {
      const resp = await fetch(`${API_URL}/api/publish`, {
        method: "POST",
        headers,
        body,
        signal: AbortSignal.timeout(5000),
      });
      const text = await resp.text();
      if (resp.ok) return;
      // 400 bad body or channel, 401 wrong key, 413 too large: the same request fails again.
      if (!RETRYABLE.has(resp.status)) throw new Rejected(`HTTP ${resp.status}: ${text}`);
      error = new Error(`HTTP ${resp.status}: ${text}`);
    } catch (e) {
      if (e instanceof Rejected) throw e;
      error = e; // refused, reset, or the timeout's AbortError
    }
    if (attempt < RETRIES) await new Promise((r) => setTimeout(r, 50 * 2 ** attempt));
  }
  throw error;
}

try {
  for (const data of PUBLICATIONS) {
    await publish(CHANNEL, data);
    console.log(JSON.stringify({ channel: CHANNEL, enc: "json" }));
  }
} catch (e) {
  const rejected = e instanceof Rejected;
  console.error(`publish_http: ${rejected ? "rejected" : "unavailable"}: ${e.cause?.message ?? e.message}`);
  process.exitCode = rejected ? 1 : 69;
}
