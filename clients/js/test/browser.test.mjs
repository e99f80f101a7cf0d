// The demo page in a real headless Chromium (Debian's, driven by puppeteer-core; never a
// downloaded browser): two pages on two nodes chat through Redis, one node is drained,
// both pages reconnect and no message is lost or doubled. Saves a screenshot of the demo.
//
// CHROMIUM (default /usr/bin/chromium) names the browser; FANOUT_SKIP_BROWSER=1 skips.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, before, test } from "node:test";

import puppeteer from "puppeteer-core";

import { eventually, Node, Redis } from "./harness.mjs";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
// FANOUT_DEMO_SCREENSHOT=docs/demo.png refreshes the README's picture.
const SCREENSHOT = resolve(process.env.FANOUT_DEMO_SCREENSHOT ?? join(tmpdir(), "fanout-demo.png"));
const skip = process.env.FANOUT_SKIP_BROWSER === "1";

let redis, a, b, browser;

before(async () => {
  if (skip) return;
  assert.ok(existsSync(CHROMIUM), `no browser at ${CHROMIUM}: apt-get install chromium (scripts/test.sh does)`);
  redis = await Redis.start();
  [a, b] = await Promise.all([
    Node.start(["--redis-url", redis.url, "--demo"]),
    Node.start(["--redis-url", redis.url, "--demo"]),
  ]);
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
});

after(async () => {
  await browser?.close();
  for (const n of [a, b]) n?.stop();
  redis?.stop();
});

/** The texts of the chat's messages on `page`, in order. */
async function messages(page) {
  return page.$$eval("#messages li", (lis) => lis.map((li) => li.lastChild.textContent));
}

async function say(page, text) {
  await page.type("#text", text);
  await page.keyboard.press("Enter");
}

test("two pages on two nodes chat through Redis and lose nothing when a node drains", { skip }, async () => {
  // Each page is served by a node itself (Chromium keeps pages of other origins off loopback).
  const open = async (node, other, name) => {
    const page = await browser.newPage();
    page.on("pageerror", (e) => console.error(`${name}: ${e.message}`));
    await page.setViewport({ width: 1000, height: 560 });
    await page.goto(`http://${node.public}/demo?name=${name}&nodes=${node.ws},${other.ws}`);
    await page.waitForFunction(() => document.querySelector("#state")?.textContent === "connected");
    await page.waitForFunction(() => window.fanoutDemo?.chat.state === "subscribed");
    return page;
  };
  const alice = await open(a, b, "alice");
  const bob = await open(b, a, "bob");

  await say(alice, "hello from node a");
  await say(bob, "hello from node b");
  const both = ["hello from node a", "hello from node b"];
  for (const page of [alice, bob]) {
    await eventually("both messages on both pages", async () => (await messages(page)).length === 2);
    assert.deepEqual((await messages(page)).sort(), [...both].sort());
  }

  // Node a drains: alice's page reconnects to b and recovers what it missed meanwhile.
  a.signal("SIGTERM");
  // The page's event log keeps the disconnect, however briefly it lasted.
  await alice.waitForFunction(() => document.querySelector("#log")?.textContent.includes("connection disconnected"), {
    polling: 50,
  });
  for (let i = 0; i < 5; i++) await say(bob, `while a drains ${i}`);
  assert.equal((await a.exited).code, 0, "the drained node exits 0");
  // Polled on a timer, not the default requestAnimationFrame: alice's is a background tab
  // now, and a background tab gets no animation frames, so a raf-polled wait sees only
  // the page as it was when the wait began.
  await alice.waitForFunction(() => document.querySelector("#state")?.textContent === "connected", {
    timeout: 15_000,
    polling: 50,
  });
  await say(alice, "alice is back");
  const want = [...both, ...Array.from({ length: 5 }, (_, i) => `while a drains ${i}`), "alice is back"];
  for (const [name, page] of [["alice", alice], ["bob", bob]]) {
    await eventually(`${name} has every message`, async () => (await messages(page)).length >= want.length, 15_000);
    const got = await messages(page);
    assert.equal(got.length, want.length, `${name}: none twice: ${JSON.stringify(got)}`);
    assert.deepEqual([...got].sort(), [...want].sort(), `${name}: none lost`);
  }
  // The counter is shared too.
  await bob.click("#inc button");
  await alice.waitForFunction(() => document.querySelector("#count")?.textContent === "1", { polling: 50 });
  await alice.screenshot({ path: SCREENSHOT });
});
