// The fanout client: one connection to a fanout cluster that reconnects with backoff,
// resubscribes (recovering missed publications with `since` in history namespaces),
// refreshes its token and detects dead connections, for browsers and Node 20+.
//
// Wire contract: docs/protocol.md of the fanout repository (JSON subprotocol).

/** The connection's state. */
export type ClientState = "connecting" | "connected" | "disconnected" | "closed";

/** A subscription's state. */
export type SubscriptionState = "subscribing" | "subscribed" | "unsubscribed";

/** A place in a channel's history (history namespaces only). */
export interface Position {
  offset: number;
  epoch: string;
}

/** A publication as a subscriber receives it. */
export interface Message<T = unknown> {
  channel: string;
  data: T;
  /** Microseconds since the Unix epoch, stamped where the publication entered fanout. */
  ts: number;
  /** Its offset, in a namespace that keeps history. */
  offset?: number;
}

/** What a publish was answered with: where it was stored, in a history namespace. */
export interface PublishResult {
  offset?: number;
  epoch?: string;
}

export interface HistoryResult<T = unknown> {
  offset: number;
  epoch: string;
  publications: { data: T; offset: number; ts: number }[];
}

/** The minimal WebSocket the client needs: the browser's, Node 22's, or the `ws` package's. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface ClientOptions {
  /** A node's WebSocket URL (`ws://host:8080/ws`), or several: tried in turn on reconnects. */
  url: string | string[];
  /** Connection token (sent as the `token` query parameter). */
  token?: string;
  /**
   * Called for a fresh token before the current one expires (sent with `refresh`), and
   * after the server closed with 1008 (auth failed or expired) before reconnecting.
   */
  getToken?: () => Promise<string>;
  /** The WebSocket implementation; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** First reconnect delay cap, ms (full jitter: a random delay up to the cap). Default 200. */
  minReconnectDelay?: number;
  /** Largest reconnect delay cap, ms. Default 10000. */
  maxReconnectDelay?: number;
  /** How often the client pings when it has heard nothing, ms. Default 20000. */
  pingInterval?: number;
  /** How long without any frame (after a ping) before the connection counts as dead, ms. Default 10000. */
  pongTimeout?: number;
  /** How long a command waits for its reply, ms. Default 10000. */
  commandTimeout?: number;
  /** Publishes and reads waiting for a connection at most; beyond it they fail at once. Default 1000. */
  maxQueued?: number;
  /** How long before the token's `exp` to refresh it, ms. Default 30000. */
  refreshMargin?: number;
  /** Start connecting at once (default true); otherwise call `connect()`. */
  autoConnect?: boolean;
}

/** A command the server refused, or that could not be carried out. */
export class FanoutError extends Error {
  /** The contract's error code (`bad_request`, `forbidden`, …) or `timeout`, `closed`, `queue_full`. */
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = "FanoutError";
    this.code = code;
  }
}

/** Close codes with a meaning to the client (docs/protocol.md). */
export const CloseCode = {
  Normal: 1000,
  Draining: 1001,
  ProtocolError: 1002,
  InvalidUtf8: 1007,
  AuthFailed: 1008,
  TooLarge: 1009,
  SlowConsumer: 4008,
  Disconnected: 4009,
} as const;

/** Most listeners one event may have; beyond it `on` throws (a leak, not a use). */
const MAX_LISTENERS = 1000;

type Listener<A extends unknown[]> = (...args: A) => void;

/** A bounded set of listeners per event name. */
class Emitter<E extends Record<string, unknown[]>> {
  // Stored untyped: `on` and `emit` are what keep each event's arguments right.
  private listeners = new Map<keyof E, Set<(...args: unknown[]) => void>>();

  on<K extends keyof E>(event: K, fn: Listener<E[K]>): () => void {
    let set = this.listeners.get(event);
    if (!set) {
      set = new Set();
      this.listeners.set(event, set);
    }
    if (set.size >= MAX_LISTENERS) {
      throw new FanoutError("too_many_listeners", `more than ${MAX_LISTENERS} listeners for ${String(event)}`);
    }
    const stored = fn as unknown as (...args: unknown[]) => void;
    set.add(stored);
    return () => set?.delete(stored);
  }

  protected emit<K extends keyof E>(event: K, ...args: E[K]): void {
    for (const fn of [...(this.listeners.get(event) ?? [])]) {
      try {
        fn(...args);
      } catch (e) {
        // A listener's bug must not break the client; surface it asynchronously.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}

/**
 * The delay before reconnect attempt `attempt` (0 = first), ms: "full jitter" — uniform
 * in [0, min(max, min·2^attempt)] — so a whole fleet of clients cut off at once does not
 * come back at once.
 */
export function backoffDelay(attempt: number, min: number, max: number, random: () => number = Math.random): number {
  const cap = Math.min(max, min * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

/** The `exp` claim of a JWT, seconds since the epoch; undefined when it has none. */
export function tokenExpiry(token: string): number | undefined {
  const part = token.split(".")[1];
  if (!part) return undefined;
  try {
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
    const exp = (JSON.parse(json) as { exp?: unknown }).exp;
    return typeof exp === "number" ? exp : undefined;
  } catch {
    return undefined;
  }
}

function randomKey(): string {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return "js-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

type SubscriptionEvents = {
  message: [Message];
  /** Subscribed (again): `recovered` says whether missed publications follow (only after a reconnect with a position). */
  subscribed: [{ recovered?: boolean; position?: Position }];
  /** The gap since the last position could not be filled: reload state from the application. */
  unrecovered: [Position];
  /** Publications may have been lost (the history was lost): reload state; live ones continue after the position. */
  resync: [Position];
  unsubscribed: [{ reason?: string }];
  /** A connection subscribed to the channel (namespaces with `join_leave`). */
  join: [{ client: string; user: string }];
  /** A connection left the channel. */
  leave: [{ client: string; user: string }];
  error: [FanoutError];
};

/** One channel the client is subscribed to; resubscribed after every reconnect. */
export class Subscription<T = unknown> extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  state: SubscriptionState = "subscribing";
  /** The last position seen, in a history namespace: where a reconnect recovers from. */
  position: Position | undefined;
  private readonly client: Client;

  /** @internal */
  constructor(client: Client, channel: string, since?: Position) {
    super();
    this.client = client;
    this.channel = channel;
    this.position = since;
  }

  /** Adds a message handler; returns a function that removes it. */
  onMessage(fn: (m: Message<T>) => void): () => void {
    return this.on("message", fn as (m: Message) => void);
  }

  /** Leaves the channel; no more messages, no resubscribe. */
  unsubscribe(): void {
    this.client["removeSubscription"](this);
  }

  /** @internal */
  handleSubscribed(reply: Record<string, unknown>, sentSince: boolean): void {
    this.state = "subscribed";
    const top =
      typeof reply.offset === "number" && typeof reply.epoch === "string"
        ? { offset: reply.offset, epoch: reply.epoch }
        : undefined;
    const recovered = typeof reply.recovered === "boolean" ? reply.recovered : undefined;
    if (top && (!this.position || !sentSince || recovered === false)) {
      if (sentSince && recovered === false) this.emit("unrecovered", top);
      this.position = top;
    }
    this.emit("subscribed", { recovered, position: this.position });
  }

  /** @internal */
  handleMessage(m: Message): void {
    if (typeof m.offset === "number" && this.position) {
      // The server never sends one twice; this only guards the application against a bug.
      if (m.offset <= this.position.offset) return;
      this.position = { offset: m.offset, epoch: this.position.epoch };
    }
    this.emit("message", m);
  }

  /** @internal */
  handleResync(position: Position): void {
    this.position = position;
    this.emit("resync", position);
  }

  /** @internal */
  handleUnsubscribed(reason?: string): void {
    this.state = "unsubscribed";
    this.emit("unsubscribed", { reason });
  }

  /** @internal */
  handlePresence(op: "join" | "leave", client: string, user: string): void {
    this.emit(op, { client, user });
  }

  /** @internal */
  handleError(e: FanoutError): void {
    this.emit("error", e);
  }
}

type ClientEvents = {
  state: [ClientState];
  connected: [];
  disconnected: [{ code: number; reason: string }];
  closed: [{ code: number; reason: string }];
  error: [FanoutError];
};

interface Pending {
  resolve: (reply: Record<string, unknown>) => void;
  reject: (e: FanoutError) => void;
  timer: ReturnType<typeof setTimeout> | undefined;
}

/** A command waiting for a connection, or sent and not yet answered. */
interface Command {
  frame: Record<string, unknown>;
  pending: Pending;
  /** Publishes are resent after a reconnect (with their idempotency key); reads too. */
  resend: boolean;
}

/** A connection to a fanout cluster. */
export class Client extends Emitter<ClientEvents> {
  state: ClientState = "disconnected";
  private readonly urls: string[];
  private readonly opts: Required<Omit<ClientOptions, "token" | "getToken" | "WebSocket" | "url">>;
  private readonly WS: WebSocketConstructor;
  private readonly getToken: (() => Promise<string>) | undefined;
  private token: string | undefined;
  private ws: WebSocketLike | undefined;
  private attempt = 0;
  private urlIndex = 0;
  private nextId = 1;
  private readonly subscriptions = new Map<string, Subscription>();
  /** Subscribe commands in flight: id → (subscription, whether `since` was sent). */
  private readonly subscribing = new Map<number, [Subscription, boolean]>();
  private readonly inflight = new Map<number, Command>();
  private queue: Command[] = [];
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private heartbeat: ReturnType<typeof setInterval> | undefined;
  private lastFrame = 0;
  private pinged = false;

  constructor(options: ClientOptions) {
    super();
    this.urls = Array.isArray(options.url) ? [...options.url] : [options.url];
    if (this.urls.length === 0) throw new FanoutError("bad_options", "at least one url is needed");
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) throw new FanoutError("bad_options", "no WebSocket: pass one as options.WebSocket (Node < 22)");
    this.WS = WS;
    this.token = options.token;
    this.getToken = options.getToken;
    this.opts = {
      minReconnectDelay: options.minReconnectDelay ?? 200,
      maxReconnectDelay: options.maxReconnectDelay ?? 10_000,
      pingInterval: options.pingInterval ?? 20_000,
      pongTimeout: options.pongTimeout ?? 10_000,
      commandTimeout: options.commandTimeout ?? 10_000,
      maxQueued: options.maxQueued ?? 1000,
      refreshMargin: options.refreshMargin ?? 30_000,
      autoConnect: options.autoConnect ?? true,
    };
    if (this.opts.autoConnect) this.connect();
  }

  /** Starts connecting (again, after `close`). */
  connect(): void {
    if (this.state === "connecting" || this.state === "connected") return;
    this.open();
  }

  /** Closes for good: no reconnect; queued and unanswered commands fail with `closed`. */
  close(): void {
    this.stopTimers();
    const ws = this.ws;
    this.ws = undefined;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = null;
      // A handler, not null: some implementations (the `ws` package) throw an error event
      // nobody listens to, and closing a socket that is still connecting raises one.
      ws.onerror = () => {};
      try {
        ws.close(CloseCode.Normal);
      } catch {
        // already closed
      }
    }
    this.failAll(new FanoutError("closed", "the client was closed"));
    this.setState("closed");
    this.emit("closed", { code: CloseCode.Normal, reason: "closed by the application" });
  }

  /**
   * Subscribes to `channel`. With `since` (a position saved earlier), missed publications
   * are recovered first. The subscription survives reconnects.
   */
  subscribe<T = unknown>(channel: string, options: { since?: Position; onMessage?: (m: Message<T>) => void } = {}): Subscription<T> {
    if (this.subscriptions.has(channel)) {
      throw new FanoutError("already_subscribed", `already subscribed to ${channel}`);
    }
    const sub = new Subscription<T>(this, channel, options.since);
    if (options.onMessage) sub.onMessage(options.onMessage);
    this.subscriptions.set(channel, sub as Subscription);
    if (this.state === "connected") this.sendSubscribe(sub as Subscription);
    return sub;
  }

  /**
   * Publishes `data`. Resolves with the ack (the offset and epoch in a history namespace).
   * Every publish carries an idempotency key (yours, or a random one), so the client can
   * resend it after a reconnect without publishing it twice.
   */
  publish(channel: string, data: unknown, options: { idempotencyKey?: string } = {}): Promise<PublishResult> {
    const frame = { op: "publish", channel, data, idempotency_key: options.idempotencyKey ?? randomKey() };
    return this.command(frame, true).then((r) => {
      const out: PublishResult = {};
      if (typeof r.offset === "number") out.offset = r.offset;
      if (typeof r.epoch === "string") out.epoch = r.epoch;
      return out;
    });
  }

  /** Reads a channel's history: after `since` (or everything kept), at most `limit`, oldest first. */
  history<T = unknown>(channel: string, options: { since?: Position; limit?: number } = {}): Promise<HistoryResult<T>> {
    const frame: Record<string, unknown> = { op: "history", channel };
    if (options.since) frame.since = options.since;
    if (options.limit !== undefined) frame.limit = options.limit;
    return this.command(frame, true).then((r) => ({
      offset: r.offset as number,
      epoch: r.epoch as string,
      publications: r.publications as HistoryResult<T>["publications"],
    }));
  }

  /** Who is subscribed to `channel` (needs presence on the channel's namespace; at most 1,000 listed). */
  presence(channel: string): Promise<{ client: string; user: string }[]> {
    return this.command({ op: "presence", channel }, true).then((r) => r.clients as { client: string; user: string }[]);
  }

  /** How many connections and distinct users are subscribed to `channel`. */
  presenceStats(channel: string): Promise<{ clients: number; users: number }> {
    return this.command({ op: "presence_stats", channel }, true).then((r) => ({
      clients: r.clients as number,
      users: r.users as number,
    }));
  }

  /** Publishes and reads waiting for a connection. */
  get queued(): number {
    return this.queue.length;
  }

  // --- the connection ---

  private open(): void {
    this.setState("connecting");
    const base = this.urls[this.urlIndex % this.urls.length] as string;
    const url = this.token ? `${base}${base.includes("?") ? "&" : "?"}token=${encodeURIComponent(this.token)}` : base;
    let ws: WebSocketLike;
    try {
      ws = new this.WS(url, "fanout.v1.json");
    } catch (e) {
      this.emit("error", new FanoutError("connect", String(e)));
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onopen = () => this.onOpen(ws);
    ws.onmessage = (ev) => this.onFrame(ws, ev.data);
    ws.onclose = (ev) => this.onClose(ws, ev.code, ev.reason);
    ws.onerror = () => {
      // onclose follows and decides.
    };
  }

  private onOpen(ws: WebSocketLike): void {
    if (ws !== this.ws) return;
    this.attempt = 0;
    this.lastFrame = Date.now();
    this.setState("connected");
    this.emit("connected");
    for (const sub of this.subscriptions.values()) this.sendSubscribe(sub);
    const queue = this.queue;
    this.queue = [];
    for (const cmd of queue) this.send(cmd);
    this.startHeartbeat(ws);
    this.scheduleRefresh();
  }

  private onClose(ws: WebSocketLike, code: number, reason: string): void {
    if (ws !== this.ws) return;
    this.ws = undefined;
    this.stopTimers();
    // Unanswered commands wait for the next connection; publishes keep their key.
    const unanswered = [...this.inflight.values()].sort((a, b) => (a.frame.id as number) - (b.frame.id as number));
    this.inflight.clear();
    this.subscribing.clear();
    for (const cmd of unanswered) {
      if (cmd.pending.timer) clearTimeout(cmd.pending.timer);
      if (cmd.resend) this.queue.push(cmd);
      else cmd.pending.reject(new FanoutError("disconnected", "the connection closed before the answer"));
    }
    for (const sub of this.subscriptions.values()) sub.state = "subscribing";
    this.setState("disconnected");
    this.emit("disconnected", { code, reason });
    if (code === CloseCode.Disconnected) {
      // Disconnected by the backend: do not come back with the same token.
      this.failAll(new FanoutError("disconnected", "disconnected by the server (4009)"));
      this.setState("closed");
      this.emit("closed", { code, reason });
      return;
    }
    if (code === CloseCode.AuthFailed) {
      if (!this.getToken) {
        this.failAll(new FanoutError("auth_failed", `authentication failed (1008 ${reason})`));
        this.setState("closed");
        this.emit("closed", { code, reason });
        return;
      }
      this.getToken().then(
        (t) => {
          this.token = t;
          this.scheduleReconnect();
        },
        (e) => {
          this.emit("error", new FanoutError("auth_failed", `getToken failed: ${String(e)}`));
          this.scheduleReconnect();
        },
      );
      return;
    }
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (this.state === "closed") return;
    const delay = backoffDelay(this.attempt, this.opts.minReconnectDelay, this.opts.maxReconnectDelay);
    this.attempt += 1;
    this.urlIndex += 1;
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      if (this.state !== "closed") this.open();
    }, delay);
  }

  private startHeartbeat(ws: WebSocketLike): void {
    const every = Math.max(50, Math.min(this.opts.pingInterval, this.opts.pongTimeout) / 2);
    this.pinged = false;
    this.heartbeat = setInterval(() => {
      const quiet = Date.now() - this.lastFrame;
      if (this.pinged && quiet > this.opts.pingInterval + this.opts.pongTimeout) {
        // Nothing at all for too long, not even a pong: the connection is dead.
        this.forceClose(ws, 4000, "no frame from the server in time");
      } else if (quiet > this.opts.pingInterval && !this.pinged) {
        this.pinged = true;
        this.sendRaw(ws, { op: "ping" });
      }
    }, every);
  }

  /** Closes `ws` without waiting for the closing handshake a dead peer never completes. */
  private forceClose(ws: WebSocketLike, code: number, reason: string): void {
    try {
      ws.close(4000, reason);
    } catch {
      // already closing
    }
    this.onClose(ws, code, reason);
  }

  private scheduleRefresh(): void {
    if (!this.getToken || !this.token) return;
    const exp = tokenExpiry(this.token);
    if (exp === undefined) return;
    const wait = Math.max(0, exp * 1000 - Date.now() - this.opts.refreshMargin);
    this.refreshTimer = setTimeout(() => void this.refresh(), Math.min(wait, 2 ** 31 - 1));
  }

  private async refresh(): Promise<void> {
    if (!this.getToken || this.state !== "connected") return;
    try {
      const token = await this.getToken();
      await this.command({ op: "refresh", token }, false);
      this.token = token;
      this.scheduleRefresh();
    } catch (e) {
      this.emit("error", e instanceof FanoutError ? e : new FanoutError("refresh", String(e)));
      // Try again a little later; the server closes with 1008 at expiry otherwise.
      this.refreshTimer = setTimeout(() => void this.refresh(), Math.max(1000, this.opts.refreshMargin / 4));
    }
  }

  private stopTimers(): void {
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.reconnectTimer = this.refreshTimer = this.heartbeat = undefined;
  }

  private setState(state: ClientState): void {
    if (this.state === state) return;
    this.state = state;
    this.emit("state", state);
  }

  // --- commands ---

  private command(frame: Record<string, unknown>, resend: boolean): Promise<Record<string, unknown>> {
    if (this.state === "closed") return Promise.reject(new FanoutError("closed", "the client is closed"));
    return new Promise((resolve, reject) => {
      const cmd: Command = { frame, pending: { resolve, reject, timer: undefined }, resend };
      if (this.state === "connected" && this.ws) {
        this.send(cmd);
        return;
      }
      if (this.queue.length >= this.opts.maxQueued) {
        reject(new FanoutError("queue_full", `${this.opts.maxQueued} commands already wait for a connection`));
        return;
      }
      this.queue.push(cmd);
    });
  }

  private send(cmd: Command): void {
    const ws = this.ws;
    if (!ws) {
      this.queue.push(cmd);
      return;
    }
    const id = this.nextId++;
    cmd.frame.id = id;
    cmd.pending.timer = setTimeout(() => {
      if (this.inflight.delete(id)) cmd.pending.reject(new FanoutError("timeout", `no answer to ${String(cmd.frame.op)} in time`));
    }, this.opts.commandTimeout);
    this.inflight.set(id, cmd);
    this.sendRaw(ws, cmd.frame);
  }

  private sendSubscribe(sub: Subscription): void {
    const ws = this.ws;
    if (!ws) return;
    const id = this.nextId++;
    const frame: Record<string, unknown> = { op: "subscribe", channel: sub.channel, id };
    if (sub.position) frame.since = sub.position;
    this.subscribing.set(id, [sub, sub.position !== undefined]);
    sub.state = "subscribing";
    this.sendRaw(ws, frame);
  }

  private sendRaw(ws: WebSocketLike, frame: Record<string, unknown>): void {
    try {
      ws.send(JSON.stringify(frame));
    } catch {
      // The close event follows.
    }
  }

  private removeSubscription(sub: Subscription): void {
    if (this.subscriptions.get(sub.channel) !== sub) return;
    this.subscriptions.delete(sub.channel);
    sub.state = "unsubscribed";
    if (this.ws && this.state === "connected") this.sendRaw(this.ws, { op: "unsubscribe", channel: sub.channel });
  }

  private failAll(e: FanoutError): void {
    for (const cmd of [...this.inflight.values(), ...this.queue]) {
      if (cmd.pending.timer) clearTimeout(cmd.pending.timer);
      cmd.pending.reject(e);
    }
    this.inflight.clear();
    this.queue = [];
  }

  private onFrame(ws: WebSocketLike, data: unknown): void {
    if (ws !== this.ws || typeof data !== "string") return;
    this.lastFrame = Date.now();
    this.pinged = false;
    let m: Record<string, unknown>;
    try {
      m = JSON.parse(data) as Record<string, unknown>;
    } catch {
      return;
    }
    const id = typeof m.id === "number" ? m.id : undefined;
    switch (m.op) {
      case "message": {
        const sub = this.subscriptions.get(m.channel as string);
        if (sub) sub.handleMessage(m as unknown as Message);
        return;
      }
      case "subscribed": {
        const entry = id !== undefined ? this.subscribing.get(id) : undefined;
        if (!entry) return;
        this.subscribing.delete(id as number);
        const [sub, sentSince] = entry;
        if (this.subscriptions.get(sub.channel) === sub) sub.handleSubscribed(m, sentSince);
        return;
      }
      case "resync": {
        const sub = this.subscriptions.get(m.channel as string);
        if (sub && typeof m.offset === "number" && typeof m.epoch === "string") {
          sub.handleResync({ offset: m.offset, epoch: m.epoch });
        }
        return;
      }
      case "join":
      case "leave": {
        const sub = this.subscriptions.get(m.channel as string);
        if (sub && typeof m.client === "string" && typeof m.user === "string") {
          sub.handlePresence(m.op, m.client, m.user);
        }
        return;
      }
      case "unsubscribed": {
        if (id === undefined) {
          // The server removed the subscription (token refresh, or the backend).
          const sub = this.subscriptions.get(m.channel as string);
          if (sub) {
            this.subscriptions.delete(sub.channel);
            sub.handleUnsubscribed(typeof m.reason === "string" ? m.reason : undefined);
          }
        }
        return;
      }
      case "error": {
        const e = new FanoutError(String(m.code), String(m.message));
        const entry = id !== undefined ? this.subscribing.get(id) : undefined;
        if (entry) {
          this.subscribing.delete(id as number);
          entry[0].handleError(e);
          return;
        }
        this.settle(id, undefined, e);
        return;
      }
      default:
        this.settle(id, m, undefined);
    }
  }

  private settle(id: number | undefined, reply: Record<string, unknown> | undefined, e: FanoutError | undefined): void {
    if (id === undefined) return;
    const cmd = this.inflight.get(id);
    if (!cmd) return;
    this.inflight.delete(id);
    if (cmd.pending.timer) clearTimeout(cmd.pending.timer);
    if (e) cmd.pending.reject(e);
    else cmd.pending.resolve(reply ?? {});
  }
}
