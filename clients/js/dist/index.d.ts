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
    publications: {
        data: T;
        offset: number;
        ts: number;
    }[];
}
/** The minimal WebSocket the client needs: the browser's, Node 22's, or the `ws` package's. */
export interface WebSocketLike {
    readonly readyState: number;
    send(data: string): void;
    close(code?: number, reason?: string): void;
    onopen: ((ev: unknown) => void) | null;
    onclose: ((ev: {
        code: number;
        reason: string;
    }) => void) | null;
    onmessage: ((ev: {
        data: unknown;
    }) => void) | null;
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
export declare class FanoutError extends Error {
    /** The contract's error code (`bad_request`, `forbidden`, …) or `timeout`, `closed`, `queue_full`. */
    readonly code: string;
    constructor(code: string, message: string);
}
/** Close codes with a meaning to the client (docs/protocol.md). */
export declare const CloseCode: {
    readonly Normal: 1000;
    readonly Draining: 1001;
    readonly ProtocolError: 1002;
    readonly InvalidUtf8: 1007;
    readonly AuthFailed: 1008;
    readonly TooLarge: 1009;
    readonly SlowConsumer: 4008;
    readonly Disconnected: 4009;
};
type Listener<A extends unknown[]> = (...args: A) => void;
/** A bounded set of listeners per event name. */
declare class Emitter<E extends Record<string, unknown[]>> {
    private listeners;
    on<K extends keyof E>(event: K, fn: Listener<E[K]>): () => void;
    protected emit<K extends keyof E>(event: K, ...args: E[K]): void;
}
/**
 * The delay before reconnect attempt `attempt` (0 = first), ms: "full jitter" — uniform
 * in [0, min(max, min·2^attempt)] — so a whole fleet of clients cut off at once does not
 * come back at once.
 */
export declare function backoffDelay(attempt: number, min: number, max: number, random?: () => number): number;
/** The `exp` claim of a JWT, seconds since the epoch; undefined when it has none. */
export declare function tokenExpiry(token: string): number | undefined;
type SubscriptionEvents = {
    message: [Message];
    /** Subscribed (again): `recovered` says whether missed publications follow (only after a reconnect with a position). */
    subscribed: [{
        recovered?: boolean;
        position?: Position;
    }];
    /** The gap since the last position could not be filled: reload state from the application. */
    unrecovered: [Position];
    /** Publications may have been lost (the history was lost): reload state; live ones continue after the position. */
    resync: [Position];
    unsubscribed: [{
        reason?: string;
    }];
    /** A connection subscribed to the channel (namespaces with `join_leave`). */
    join: [{
        client: string;
        user: string;
    }];
    /** A connection left the channel. */
    leave: [{
        client: string;
        user: string;
    }];
    error: [FanoutError];
};
/** One channel the client is subscribed to; resubscribed after every reconnect. */
export declare class Subscription<T = unknown> extends Emitter<SubscriptionEvents> {
    readonly channel: string;
    state: SubscriptionState;
    /** The last position seen, in a history namespace: where a reconnect recovers from. */
    position: Position | undefined;
    private readonly client;
    /** @internal */
    constructor(client: Client, channel: string, since?: Position);
    /** Adds a message handler; returns a function that removes it. */
    onMessage(fn: (m: Message<T>) => void): () => void;
    /** Leaves the channel; no more messages, no resubscribe. */
    unsubscribe(): void;
    /** @internal */
    handleSubscribed(reply: Record<string, unknown>, sentSince: boolean): void;
    /** @internal */
    handleMessage(m: Message): void;
    /** @internal */
    handleResync(position: Position): void;
    /** @internal */
    handleUnsubscribed(reason?: string): void;
    /** @internal */
    handlePresence(op: "join" | "leave", client: string, user: string): void;
    /** @internal */
    handleError(e: FanoutError): void;
}
type ClientEvents = {
    state: [ClientState];
    connected: [];
    disconnected: [{
        code: number;
        reason: string;
    }];
    closed: [{
        code: number;
        reason: string;
    }];
    error: [FanoutError];
};
/** A connection to a fanout cluster. */
export declare class Client extends Emitter<ClientEvents> {
    state: ClientState;
    private readonly urls;
    private readonly opts;
    private readonly WS;
    private readonly getToken;
    private token;
    private ws;
    private attempt;
    private urlIndex;
    private nextId;
    private readonly subscriptions;
    /** Subscribe commands in flight: id → (subscription, whether `since` was sent). */
    private readonly subscribing;
    private readonly inflight;
    private queue;
    private reconnectTimer;
    private refreshTimer;
    private heartbeat;
    private lastFrame;
    private pinged;
    constructor(options: ClientOptions);
    /** Starts connecting (again, after `close`). */
    connect(): void;
    /** Closes for good: no reconnect; queued and unanswered commands fail with `closed`. */
    close(): void;
    /**
     * Subscribes to `channel`. With `since` (a position saved earlier), missed publications
     * are recovered first. The subscription survives reconnects.
     */
    subscribe<T = unknown>(channel: string, options?: {
        since?: Position;
        onMessage?: (m: Message<T>) => void;
    }): Subscription<T>;
    /**
     * Publishes `data`. Resolves with the ack (the offset and epoch in a history namespace).
     * Every publish carries an idempotency key (yours, or a random one), so the client can
     * resend it after a reconnect without publishing it twice.
     */
    publish(channel: string, data: unknown, options?: {
        idempotencyKey?: string;
    }): Promise<PublishResult>;
    /** Reads a channel's history: after `since` (or everything kept), at most `limit`, oldest first. */
    history<T = unknown>(channel: string, options?: {
        since?: Position;
        limit?: number;
    }): Promise<HistoryResult<T>>;
    /** Who is subscribed to `channel` (needs presence on the channel's namespace; at most 1,000 listed). */
    presence(channel: string): Promise<{
        client: string;
        user: string;
    }[]>;
    /** How many connections and distinct users are subscribed to `channel`. */
    presenceStats(channel: string): Promise<{
        clients: number;
        users: number;
    }>;
    /** Publishes and reads waiting for a connection. */
    get queued(): number;
    private open;
    private onOpen;
    private onClose;
    private scheduleReconnect;
    private startHeartbeat;
    /** Closes `ws` without waiting for the closing handshake a dead peer never completes. */
    private forceClose;
    private scheduleRefresh;
    private refresh;
    private stopTimers;
    private setState;
    private command;
    private send;
    private sendSubscribe;
    private sendRaw;
    private removeSubscription;
    private failAll;
    private onFrame;
    private settle;
}
export {};
