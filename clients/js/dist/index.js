// The fanout client: one connection to a fanout cluster that reconnects with backoff,
// resubscribes (recovering missed publications with `since` in history namespaces),
// refreshes its token and detects dead connections, for browsers and Node 20+.
//
// Wire contract: docs/protocol.md of the fanout repository (JSON subprotocol).
/** A command the server refused, or that could not be carried out. */
export class FanoutError extends Error {
    /** The contract's error code (`bad_request`, `forbidden`, …) or `timeout`, `closed`, `queue_full`. */
    code;
    constructor(code, message) {
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
};
/** Most listeners one event may have; beyond it `on` throws (a leak, not a use). */
const MAX_LISTENERS = 1000;
/** A bounded set of listeners per event name. */
class Emitter {
    // Stored untyped: `on` and `emit` are what keep each event's arguments right.
    listeners = new Map();
    on(event, fn) {
        let set = this.listeners.get(event);
        if (!set) {
            set = new Set();
            this.listeners.set(event, set);
        }
        if (set.size >= MAX_LISTENERS) {
            throw new FanoutError("too_many_listeners", `more than ${MAX_LISTENERS} listeners for ${String(event)}`);
        }
        const stored = fn;
        set.add(stored);
        return () => set?.delete(stored);
    }
    emit(event, ...args) {
        for (const fn of [...(this.listeners.get(event) ?? [])]) {
            try {
                fn(...args);
            }
            catch (e) {
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
export function backoffDelay(attempt, min, max, random = Math.random) {
    const cap = Math.min(max, min * 2 ** Math.min(attempt, 30));
    return Math.floor(random() * cap);
}
/** The `exp` claim of a JWT, seconds since the epoch; undefined when it has none. */
export function tokenExpiry(token) {
    const part = token.split(".")[1];
    if (!part)
        return undefined;
    try {
        const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
        const exp = JSON.parse(json).exp;
        return typeof exp === "number" ? exp : undefined;
    }
    catch {
        return undefined;
    }
}
function randomKey() {
    const bytes = new Uint8Array(12);
    globalThis.crypto.getRandomValues(bytes);
    return "js-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
/** One channel the client is subscribed to; resubscribed after every reconnect. */
export class Subscription extends Emitter {
    channel;
    state = "subscribing";
    /** The last position seen, in a history namespace: where a reconnect recovers from. */
    position;
    client;
    /** @internal */
    constructor(client, channel, since) {
        super();
        this.client = client;
        this.channel = channel;
        this.position = since;
    }
    /** Adds a message handler; returns a function that removes it. */
    onMessage(fn) {
        return this.on("message", fn);
    }
    /** Leaves the channel; no more messages, no resubscribe. */
    unsubscribe() {
        this.client["removeSubscription"](this);
    }
    /** @internal */
    handleSubscribed(reply, sentSince) {
        this.state = "subscribed";
        const top = typeof reply.offset === "number" && typeof reply.epoch === "string"
            ? { offset: reply.offset, epoch: reply.epoch }
            : undefined;
        const recovered = typeof reply.recovered === "boolean" ? reply.recovered : undefined;
        if (top && (!this.position || !sentSince || recovered === false)) {
            if (sentSince && recovered === false)
                this.emit("unrecovered", top);
            this.position = top;
        }
        this.emit("subscribed", { recovered, position: this.position });
    }
    /** @internal */
    handleMessage(m) {
        if (typeof m.offset === "number" && this.position) {
            // The server never sends one twice; this only guards the application against a bug.
            if (m.offset <= this.position.offset)
                return;
            this.position = { offset: m.offset, epoch: this.position.epoch };
        }
        this.emit("message", m);
    }
    /** @internal */
    handleResync(position) {
        this.position = position;
        this.emit("resync", position);
    }
    /** @internal */
    handleUnsubscribed(reason) {
        this.state = "unsubscribed";
        this.emit("unsubscribed", { reason });
    }
    /** @internal */
    handlePresence(op, client, user) {
        this.emit(op, { client, user });
    }
    /** @internal */
    handleError(e) {
        this.emit("error", e);
    }
}
/** A connection to a fanout cluster. */
export class Client extends Emitter {
    state = "disconnected";
    urls;
    opts;
    WS;
    getToken;
    token;
    ws;
    attempt = 0;
    urlIndex = 0;
    nextId = 1;
    subscriptions = new Map();
    /** Subscribe commands in flight: id → (subscription, whether `since` was sent). */
    subscribing = new Map();
    inflight = new Map();
    queue = [];
    reconnectTimer;
    refreshTimer;
    heartbeat;
    lastFrame = 0;
    pinged = false;
    constructor(options) {
        super();
        this.urls = Array.isArray(options.url) ? [...options.url] : [options.url];
        if (this.urls.length === 0)
            throw new FanoutError("bad_options", "at least one url is needed");
        const WS = options.WebSocket ?? globalThis.WebSocket;
        if (!WS)
            throw new FanoutError("bad_options", "no WebSocket: pass one as options.WebSocket (Node < 22)");
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
        if (this.opts.autoConnect)
            this.connect();
    }
    /** Starts connecting (again, after `close`). */
    connect() {
        if (this.state === "connecting" || this.state === "connected")
            return;
        this.open();
    }
    /** Closes for good: no reconnect; queued and unanswered commands fail with `closed`. */
    close() {
        this.stopTimers();
        const ws = this.ws;
        this.ws = undefined;
        if (ws) {
            ws.onclose = ws.onmessage = ws.onopen = null;
            // A handler, not null: some implementations (the `ws` package) throw an error event
            // nobody listens to, and closing a socket that is still connecting raises one.
            ws.onerror = () => { };
            try {
                ws.close(CloseCode.Normal);
            }
            catch {
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
    subscribe(channel, options = {}) {
        if (this.subscriptions.has(channel)) {
            throw new FanoutError("already_subscribed", `already subscribed to ${channel}`);
        }
        const sub = new Subscription(this, channel, options.since);
        if (options.onMessage)
            sub.onMessage(options.onMessage);
        this.subscriptions.set(channel, sub);
        if (this.state === "connected")
            this.sendSubscribe(sub);
        return sub;
    }
    /**
     * Publishes `data`. Resolves with the ack (the offset and epoch in a history namespace).
     * Every publish carries an idempotency key (yours, or a random one), so the client can
     * resend it after a reconnect without publishing it twice.
     */
    publish(channel, data, options = {}) {
        const frame = { op: "publish", channel, data, idempotency_key: options.idempotencyKey ?? randomKey() };
        return this.command(frame, true).then((r) => {
            const out = {};
            if (typeof r.offset === "number")
                out.offset = r.offset;
            if (typeof r.epoch === "string")
                out.epoch = r.epoch;
            return out;
        });
    }
    /** Reads a channel's history: after `since` (or everything kept), at most `limit`, oldest first. */
    history(channel, options = {}) {
        const frame = { op: "history", channel };
        if (options.since)
            frame.since = options.since;
        if (options.limit !== undefined)
            frame.limit = options.limit;
        return this.command(frame, true).then((r) => ({
            offset: r.offset,
            epoch: r.epoch,
            publications: r.publications,
        }));
    }
    /** Who is subscribed to `channel` (needs presence on the channel's namespace; at most 1,000 listed). */
    presence(channel) {
        return this.command({ op: "presence", channel }, true).then((r) => r.clients);
    }
    /** How many connections and distinct users are subscribed to `channel`. */
    presenceStats(channel) {
        return this.command({ op: "presence_stats", channel }, true).then((r) => ({
            clients: r.clients,
            users: r.users,
        }));
    }
    /** Publishes and reads waiting for a connection. */
    get queued() {
        return this.queue.length;
    }
    // --- the connection ---
    open() {
        this.setState("connecting");
        const base = this.urls[this.urlIndex % this.urls.length];
        const url = this.token ? `${base}${base.includes("?") ? "&" : "?"}token=${encodeURIComponent(this.token)}` : base;
        let ws;
        try {
            ws = new this.WS(url, "fanout.v1.json");
        }
        catch (e) {
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
    onOpen(ws) {
        if (ws !== this.ws)
            return;
        this.attempt = 0;
        this.lastFrame = Date.now();
        this.setState("connected");
        this.emit("connected");
        for (const sub of this.subscriptions.values())
            this.sendSubscribe(sub);
        const queue = this.queue;
        this.queue = [];
        for (const cmd of queue)
            this.send(cmd);
        this.startHeartbeat(ws);
        this.scheduleRefresh();
    }
    onClose(ws, code, reason) {
        if (ws !== this.ws)
            return;
        this.ws = undefined;
        this.stopTimers();
        // Unanswered commands wait for the next connection; publishes keep their key.
        const unanswered = [...this.inflight.values()].sort((a, b) => a.frame.id - b.frame.id);
        this.inflight.clear();
        this.subscribing.clear();
        for (const cmd of unanswered) {
            if (cmd.pending.timer)
                clearTimeout(cmd.pending.timer);
            if (cmd.resend)
                this.queue.push(cmd);
            else
                cmd.pending.reject(new FanoutError("disconnected", "the connection closed before the answer"));
        }
        for (const sub of this.subscriptions.values())
            sub.state = "subscribing";
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
            this.getToken().then((t) => {
                this.token = t;
                this.scheduleReconnect();
            }, (e) => {
                this.emit("error", new FanoutError("auth_failed", `getToken failed: ${String(e)}`));
                this.scheduleReconnect();
            });
            return;
        }
        this.scheduleReconnect();
    }
    scheduleReconnect() {
        if (this.state === "closed")
            return;
        const delay = backoffDelay(this.attempt, this.opts.minReconnectDelay, this.opts.maxReconnectDelay);
        this.attempt += 1;
        this.urlIndex += 1;
        this.reconnectTimer = setTimeout(() => {
            this.reconnectTimer = undefined;
            if (this.state !== "closed")
                this.open();
        }, delay);
    }
    startHeartbeat(ws) {
        const every = Math.max(50, Math.min(this.opts.pingInterval, this.opts.pongTimeout) / 2);
        this.pinged = false;
        this.heartbeat = setInterval(() => {
            const quiet = Date.now() - this.lastFrame;
            if (this.pinged && quiet > this.opts.pingInterval + this.opts.pongTimeout) {
                // Nothing at all for too long, not even a pong: the connection is dead.
                this.forceClose(ws, 4000, "no frame from the server in time");
            }
            else if (quiet > this.opts.pingInterval && !this.pinged) {
                this.pinged = true;
                this.sendRaw(ws, { op: "ping" });
            }
        }, every);
    }
    /** Closes `ws` without waiting for the closing handshake a dead peer never completes. */
    forceClose(ws, code, reason) {
        try {
            ws.close(4000, reason);
        }
        catch {
            // already closing
        }
        this.onClose(ws, code, reason);
    }
    scheduleRefresh() {
        if (!this.getToken || !this.token)
            return;
        const exp = tokenExpiry(this.token);
        if (exp === undefined)
            return;
        const wait = Math.max(0, exp * 1000 - Date.now() - this.opts.refreshMargin);
        this.refreshTimer = setTimeout(() => void this.refresh(), Math.min(wait, 2 ** 31 - 1));
    }
    async refresh() {
        if (!this.getToken || this.state !== "connected")
            return;
        try {
            const token = await this.getToken();
            await this.command({ op: "refresh", token }, false);
            this.token = token;
            this.scheduleRefresh();
        }
        catch (e) {
            this.emit("error", e instanceof FanoutError ? e : new FanoutError("refresh", String(e)));
            // Try again a little later; the server closes with 1008 at expiry otherwise.
            this.refreshTimer = setTimeout(() => void this.refresh(), Math.max(1000, this.opts.refreshMargin / 4));
        }
    }
    stopTimers() {
        if (this.reconnectTimer)
            clearTimeout(this.reconnectTimer);
        if (this.refreshTimer)
            clearTimeout(this.refreshTimer);
        if (this.heartbeat)
            clearInterval(this.heartbeat);
        this.reconnectTimer = this.refreshTimer = this.heartbeat = undefined;
    }
    setState(state) {
        if (this.state === state)
            return;
        this.state = state;
        this.emit("state", state);
    }
    // --- commands ---
    command(frame, resend) {
        if (this.state === "closed")
            return Promise.reject(new FanoutError("closed", "the client is closed"));
        return new Promise((resolve, reject) => {
            const cmd = { frame, pending: { resolve, reject, timer: undefined }, resend };
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
    send(cmd) {
        const ws = this.ws;
        if (!ws) {
            this.queue.push(cmd);
            return;
        }
        const id = this.nextId++;
        cmd.frame.id = id;
        cmd.pending.timer = setTimeout(() => {
            if (this.inflight.delete(id))
                cmd.pending.reject(new FanoutError("timeout", `no answer to ${String(cmd.frame.op)} in time`));
        }, this.opts.commandTimeout);
        this.inflight.set(id, cmd);
        this.sendRaw(ws, cmd.frame);
    }
    sendSubscribe(sub) {
        const ws = this.ws;
        if (!ws)
            return;
        const id = this.nextId++;
        const frame = { op: "subscribe", channel: sub.channel, id };
        if (sub.position)
            frame.since = sub.position;
        this.subscribing.set(id, [sub, sub.position !== undefined]);
        sub.state = "subscribing";
        this.sendRaw(ws, frame);
    }
    sendRaw(ws, frame) {
        try {
            ws.send(JSON.stringify(frame));
        }
        catch {
            // The close event follows.
        }
    }
    removeSubscription(sub) {
        if (this.subscriptions.get(sub.channel) !== sub)
            return;
        this.subscriptions.delete(sub.channel);
        sub.state = "unsubscribed";
        if (this.ws && this.state === "connected")
            this.sendRaw(this.ws, { op: "unsubscribe", channel: sub.channel });
    }
    failAll(e) {
        for (const cmd of [...this.inflight.values(), ...this.queue]) {
            if (cmd.pending.timer)
                clearTimeout(cmd.pending.timer);
            cmd.pending.reject(e);
        }
        this.inflight.clear();
        this.queue = [];
    }
    onFrame(ws, data) {
        if (ws !== this.ws || typeof data !== "string")
            return;
        this.lastFrame = Date.now();
        this.pinged = false;
        let m;
        try {
            m = JSON.parse(data);
        }
        catch {
            return;
        }
        const id = typeof m.id === "number" ? m.id : undefined;
        switch (m.op) {
            case "message": {
                const sub = this.subscriptions.get(m.channel);
                if (sub)
                    sub.handleMessage(m);
                return;
            }
            case "subscribed": {
                const entry = id !== undefined ? this.subscribing.get(id) : undefined;
                if (!entry)
                    return;
                this.subscribing.delete(id);
                const [sub, sentSince] = entry;
                if (this.subscriptions.get(sub.channel) === sub)
                    sub.handleSubscribed(m, sentSince);
                return;
            }
            case "resync": {
                const sub = this.subscriptions.get(m.channel);
                if (sub && typeof m.offset === "number" && typeof m.epoch === "string") {
                    sub.handleResync({ offset: m.offset, epoch: m.epoch });
                }
                return;
            }
            case "join":
            case "leave": {
                const sub = this.subscriptions.get(m.channel);
                if (sub && typeof m.client === "string" && typeof m.user === "string") {
                    sub.handlePresence(m.op, m.client, m.user);
                }
                return;
            }
            case "unsubscribed": {
                if (id === undefined) {
                    // The server removed the subscription (token refresh, or the backend).
                    const sub = this.subscriptions.get(m.channel);
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
                    this.subscribing.delete(id);
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
    settle(id, reply, e) {
        if (id === undefined)
            return;
        const cmd = this.inflight.get(id);
        if (!cmd)
            return;
        this.inflight.delete(id);
        if (cmd.pending.timer)
            clearTimeout(cmd.pending.timer);
        if (e)
            cmd.pending.reject(e);
        else
            cmd.pending.resolve(reply ?? {});
    }
}
