// Test support: real redis-server and fanout processes on free loopback ports, started
// and stopped by the tests themselves; nothing is mocked.

import { spawn, execFileSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, writeFileSync, existsSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { WebSocket as WsWebSocket } from "ws";

// Node 22 has a global WebSocket; older ones get the `ws` package's (the client takes
// either), so the tests run on whatever Node the machine has.
globalThis.WebSocket ??= WsWebSocket;

const REPO = resolve(fileURLToPath(new URL(".", import.meta.url)), "../../..");

/** The fanout binary: FANOUT_BIN, else the workspace's debug build (built if missing). */
export function fanoutBin() {
  if (process.env.FANOUT_BIN) return process.env.FANOUT_BIN;
  const bin = join(REPO, "target/debug/fanout");
  if (!existsSync(bin)) {
    execFileSync("cargo", ["build", "-p", "fanout-server", "--bin", "fanout"], { cwd: REPO, stdio: "inherit" });
  }
  return bin;
}

export function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

export async function eventually(what, check, within = 10_000) {
  const started = Date.now();
  for (;;) {
    if (await check()) return Date.now() - started;
    if (Date.now() - started > within) throw new Error(`did not happen within ${within} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export class Redis {
  static async start() {
    const r = new Redis();
    r.port = await freePort();
    r.proc = spawn("redis-server", ["--port", String(r.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
      stdio: "ignore",
    });
    await eventually("redis answers", () => {
      try {
        return execFileSync("redis-cli", ["-p", String(r.port), "ping"]).toString().includes("PONG");
      } catch {
        return false;
      }
    });
    return r;
  }
  get url() {
    return `redis://127.0.0.1:${this.port}`;
  }
  stop() {
    this.proc.kill("SIGKILL");
  }
}

/** The environment without FANOUT_CONFIG, so a developer's own file cannot leak in. */
function withoutConfig() {
  const env = { ...process.env };
  delete env.FANOUT_CONFIG;
  return env;
}

export class Node {
  /** `fanout serve` on port 0 with `args`; resolves once /readyz answers 200. */
  static async start(args = []) {
    const n = new Node();
    n.logs = "";
    n.proc = spawn(
      fanoutBin(),
      ["serve", "--public-addr", "127.0.0.1:0", "--internal-addr", "127.0.0.1:0", "--log-level", "info", ...args],
      { stdio: ["ignore", "ignore", "pipe"], env: withoutConfig() },
    );
    n.exited = new Promise((res) => n.proc.once("exit", (code, signal) => res({ code, signal })));
    n.proc.stderr.on("data", (d) => {
      n.logs += d.toString();
    });
    await eventually("the node reports its addresses", () => /listening public=(\S+) internal=([^\s"]+)/.test(n.logs)).catch(
      (e) => {
        n.proc.kill("SIGKILL");
        throw new Error(`${e.message}; its log:\n${n.logs}`);
      },
    );
    const [, pub, internal] = n.logs.match(/listening public=(\S+) internal=([^\s"]+)/);
    n.public = pub;
    n.internal = internal;
    await eventually("the node is ready", async () => {
      try {
        return (await fetch(`http://${n.internal}/readyz`)).status === 200;
      } catch {
        return false;
      }
    });
    return n;
  }
  get ws() {
    return `ws://${this.public}/ws`;
  }
  async publish(channel, data, extra = {}) {
    const r = await fetch(`http://${this.internal}/api/publish`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ channel, data, ...extra }),
    });
    return { status: r.status, body: await r.json() };
  }
  signal(sig) {
    this.proc.kill(sig);
  }
  stop() {
    this.proc.kill("SIGKILL");
  }
}

/** A config file with `toml`, for --config. */
export function configFile(toml) {
  const dir = mkdtempSync(join(tmpdir(), "fanout-js-"));
  const path = join(dir, "fanout.toml");
  writeFileSync(path, toml);
  return path;
}

/** An HS256 connection token for `sub`, valid for `seconds`. */
export function token(secret, sub, seconds, claims = {}) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({
    sub,
    exp: Math.floor(Date.now() / 1000) + seconds,
    subscribe: ["chat:*", "h:*"],
    publish: ["chat:*", "h:*"],
    ...claims,
  })}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

/** Resolves with the next value `on` delivers that `pick` accepts. */
export function next(on, pick = () => true, within = 10_000) {
  return new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Error("timed out waiting for an event")), within);
    const off = on((...args) => {
      if (!pick(...args)) return;
      clearTimeout(timer);
      off();
      res(args[0]);
    });
  });
}
