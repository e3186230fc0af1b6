// The cloudd socket client: JSON-RPC over the daemon's local socket, framed by
// Content-Length headers (vscode-jsonrpc's StreamMessageReader/Writer), with the state an
// editor shows (sessions, relay, pending prompts, followed logs) kept up to date from the
// daemon's notifications.
//
// It owns the connection and its recovery: it starts the daemon with `cloudctl up` when
// none answers, and after the daemon goes away it reconnects, subscribes again and
// re-attaches each followed session from the last log seq it delivered, so a restart
// shows nothing twice and loses nothing. It must never import `vscode`: it is tested
// with node's test runner against the real daemon, and any editor UI lives elsewhere.

import { execFile } from "node:child_process";
import { EventEmitter } from "node:events";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";

import {
  createMessageConnection,
  MessageConnection,
  ResponseError,
  StreamMessageReader,
  StreamMessageWriter,
} from "vscode-jsonrpc/node";

/** The local socket protocol version this client speaks (docs/PROTOCOL.md). */
export const PROTOCOL_VERSION = 1;

export type SessionStatus = "starting" | "running" | "paused" | "completed" | "failed";
export type Visibility = "private" | "team" | "public";

export interface Session {
  id: string;
  status: SessionStatus;
  created_at: number;
  last_activity: number;
  task: string;
  visibility: Visibility;
  repo_access: string;
  network_access: string;
  vm_image: string;
  owner: string;
  org: string;
  failure: string | null;
  last_seq: number;
}

export interface RelayStatus {
  mode: "embedded" | "remote";
  url: string;
  state: "connecting" | "connected" | "retrying" | "refused";
  reason: string | null;
  user: string | null;
  org: string | null;
  journal_depth: number;
  instance_id: string;
  refused_events: number;
  last_refusal: string | null;
}

/** A session log entry as the socket sends it (`session/log`). */
export interface Entry {
  seq: number;
  at: number;
  author: { user: string } | "agent" | "relay";
  message?: unknown;
  status?: SessionStatus;
  reason?: string | null;
  snapshot?: unknown;
}

/** A pending permission prompt; `input` is the tool's input as JSON text. */
export interface Prompt {
  request_id: string;
  tool_name: string;
  input: string;
  seq: number;
}

export interface TeleportProgress {
  root: string;
  session: string;
  phase: "scan" | "upload" | "commit" | "download" | "apply" | "done";
  done: number;
  total: number;
  bytes_done: number;
  bytes_total: number;
}

/** What a push or pull did: the version both sides now agree on, what moved. */
export interface TeleportOutcome {
  root: string;
  session: string;
  version: number;
  files: number;
  blobs: number;
  bytes: number;
  conflicts: string[];
  problems: string[];
}

export type Decision = { behavior: "allow"; updated_input?: unknown } | { behavior: "deny"; message?: string };

export interface CreateSession {
  task?: string;
  visibility?: Visibility;
  network_access?: "none" | "limited" | "full";
  repo_access?: "read" | "write";
  vm_image?: string;
}

export type ConnectionState = "connecting" | "connected" | "disconnected";

/** An error the daemon answered with: `kind` is its symbolic code (`not_found`, ...). */
export class DaemonError extends Error {
  constructor(
    message: string,
    readonly kind: string,
    readonly code: number,
  ) {
    super(message);
  }
}

/**
 * The socket path by the daemon's location rule (docs/PROTOCOL.md, "Where the socket
 * is"): CLOUDD_SOCKET, else CLOUDD_HOME/run/cloudd.sock, else
 * $XDG_RUNTIME_DIR/cloudd/cloudd.sock, else <temp dir>/cloudd-$USER/cloudd.sock; on
 * Windows the named pipe of that file name.
 */
export function socketPath(env: NodeJS.ProcessEnv = process.env, platform: NodeJS.Platform = process.platform): string {
  const get = (name: string): string | undefined => (env[name] ? env[name] : undefined);
  let socket: string;
  const overridden = get("CLOUDD_SOCKET");
  if (overridden) {
    socket = overridden;
  } else if (get("CLOUDD_HOME")) {
    socket = path.join(get("CLOUDD_HOME")!, "run", "cloudd.sock");
  } else if (get("XDG_RUNTIME_DIR")) {
    socket = path.join(get("XDG_RUNTIME_DIR")!, "cloudd", "cloudd.sock");
  } else {
    const user = get("USER") ?? get("USERNAME") ?? "user";
    const tmp = get("TMPDIR") ?? (platform === "win32" ? os.tmpdir() : "/tmp");
    socket = path.join(tmp, `cloudd-${user}`, "cloudd.sock");
  }
  return platform === "win32" ? `\\\\.\\pipe\\${path.basename(socket)}` : socket;
}

export interface ClientOptions {
  /** The environment for the location rule and for `cloudctl up` (default: process.env). */
  env?: NodeJS.ProcessEnv;
  /** The socket path (default: by the location rule). */
  socket?: string;
  /** The `cloudctl` to run when no daemon answers (default: `cloudctl` on the PATH). */
  cloudctl?: string;
  /** The name and version told to the daemon in `hello` (its log shows them). */
  clientName?: string;
  clientVersion?: string;
  /** Topics to subscribe to (default: sessions and teleport). */
  topics?: string[];
  /** Whether to keep the session list and relay state (default: true). */
  trackSessions?: boolean;
}

/** What a followed session has delivered so far, and its pending prompts. */
interface Followed {
  /** The last log seq delivered; `undefined` before the first entry. */
  last?: number;
  /** Where the first attach replays from (`undefined`: the daemon's default). */
  since?: number;
  prompts: Map<string, Prompt>;
}

/**
 * One client of the daemon. Events:
 * - `state` (ConnectionState): connecting, connected (hello done, state refreshed),
 *   disconnected (reconnecting);
 * - `sessions` (Session[]): the session list changed;
 * - `relay` (RelayStatus): the relay connection changed;
 * - `entry` (session, Entry): a new log entry of a followed session, each once, in order;
 * - `prompts` (session, Prompt[]): the pending prompts of a followed session changed;
 * - `progress` (TeleportProgress): a teleport step;
 * - `error` is never emitted: failures come back from the methods.
 */
export class CloudClient extends EventEmitter {
  readonly socket: string;
  private readonly env: NodeJS.ProcessEnv;
  private readonly options: ClientOptions;
  private connection?: MessageConnection;
  private stream?: net.Socket;
  private closed = false;
  private connecting?: Promise<void>;
  private retryDelay = 0;
  private retryTimer?: NodeJS.Timeout;
  private readonly followed = new Map<string, Followed>();
  private readonly sessionMap = new Map<string, Session>();
  private relayStatus?: RelayStatus;
  state: ConnectionState = "disconnected";

  constructor(options: ClientOptions = {}) {
    super();
    this.options = options;
    this.env = options.env ?? process.env;
    this.socket = options.socket ?? socketPath(this.env);
  }

  /** The sessions, most recently active first. */
  get sessions(): Session[] {
    return [...this.sessionMap.values()].sort((a, b) => b.last_activity - a.last_activity);
  }

  get relay(): RelayStatus | undefined {
    return this.relayStatus;
  }

  /** The pending prompts of a followed session. */
  prompts(session: string): Prompt[] {
    return [...(this.followed.get(session)?.prompts.values() ?? [])].sort((a, b) => a.seq - b.seq);
  }

  /** The sessions this client follows. */
  get following(): string[] {
    return [...this.followed.keys()];
  }

  /**
   * Connects, starting the daemon with `cloudctl up` if none answers. Resolves once the
   * hello is done and the state is loaded. After this the client reconnects by itself
   * whenever the connection drops, until `close()`.
   */
  async start(): Promise<void> {
    this.closed = false;
    if (this.connection && this.state === "connected") {
      return;
    }
    try {
      await this.connectOnce();
    } catch (e) {
      if (!isAbsent(e)) {
        throw e;
      }
      await this.cloudctlUp();
      await this.connectOnce();
    }
  }

  /** Stops for good: no reconnect. */
  close(): void {
    this.closed = true;
    clearTimeout(this.retryTimer);
    this.dropConnection();
    this.setState("disconnected");
  }

  /** Runs `cloudctl up`, which starts the daemon and waits until it answers. */
  cloudctlUp(): Promise<void> {
    const cloudctl = this.options.cloudctl ?? "cloudctl";
    return new Promise((resolve, reject) => {
      execFile(cloudctl, ["up"], { env: this.env }, (error, _stdout, stderr) => {
        if (error) {
          reject(new Error(`cannot start cloudd with \`${cloudctl} up\`: ${stderr.trim() || error.message}; check the cloudd.cloudctlPath setting`));
        } else {
          resolve();
        }
      });
    });
  }

  // --- requests -------------------------------------------------------------------------

  async hello(): Promise<{ protocol: number; daemon_version: string; pid: number }> {
    return this.request("hello", {
      protocol: PROTOCOL_VERSION,
      client: this.options.clientName ?? "cloudd-vscode",
      client_version: this.options.clientVersion ?? "0",
    });
  }

  async list(): Promise<Session[]> {
    const reply = await this.request<{ sessions: Session[] }>("session/list");
    return reply.sessions;
  }

  async create(params: CreateSession): Promise<Session> {
    const reply = await this.request<{ session: Session }>("session/create", params);
    this.upsert(reply.session);
    return reply.session;
  }

  async action(session: string, action: "pause" | "resume" | "complete" | "delete"): Promise<void> {
    const reply = await this.request<{ session: Session } | "deleted">("session/action", { session, action });
    if (reply === "deleted") {
      this.remove(session);
    } else {
      this.upsert(reply.session);
    }
  }

  /** Sends a message; resolves with its journal seq once it is queued. */
  async send(session: string, text: string, key?: string): Promise<number> {
    const reply = await this.request<{ seq: number }>("send", { session, text, key });
    return reply.seq;
  }

  async interrupt(session: string): Promise<number> {
    const reply = await this.request<{ seq: number }>("interrupt", { session });
    return reply.seq;
  }

  async answer(session: string, requestId: string, decision: Decision): Promise<void> {
    await this.request("answer", { session, request_id: requestId, decision });
  }

  async permissions(session: string): Promise<Prompt[]> {
    return this.request<Prompt[]>("permissions", { session });
  }

  async whoami(): Promise<RelayStatus> {
    const reply = await this.request<{ relay: RelayStatus }>("whoami");
    return reply.relay;
  }

  /**
   * Follows a session: its log entries come as `entry` events (from `since`, or the
   * daemon's default replay of the last 50 without it, then live), each once, in order,
   * across reconnects; its pending prompts as `prompts` events.
   */
  async follow(session: string, since?: number): Promise<void> {
    let followed = this.followed.get(session);
    if (!followed) {
      followed = { since, prompts: new Map() };
      this.followed.set(session, followed);
    }
    await this.attach(session, followed);
  }

  /** Stops following a session on this connection (the daemon keeps its log). */
  async unfollow(session: string): Promise<void> {
    if (this.followed.delete(session) && this.connection) {
      await this.request("detach", { session });
    }
  }

  /** Sends the folder's tree to a session; progress comes as `progress` events. */
  async teleportPush(root: string, session: string): Promise<TeleportOutcome> {
    return this.request("teleport/push", { path: root, session });
  }

  /** Brings a session's tree into the folder (its linked session when none is given). */
  async teleportPull(root: string, session?: string): Promise<TeleportOutcome> {
    return this.request("teleport/pull", session ? { path: root, session } : { path: root });
  }

  async teleportWatch(root: string, session: string): Promise<unknown> {
    return this.request("teleport/watch", { path: root, session });
  }

  async teleportStop(root: string): Promise<unknown> {
    return this.request("teleport/stop", { path: root });
  }

  /** Any method, for what has no helper. Rejects with a DaemonError on an error reply. */
  async request<R>(method: string, params?: unknown): Promise<R> {
    const connection = this.connection;
    if (!connection) {
      throw new DaemonError(`not connected to cloudd at ${this.socket}; it reconnects by itself, or run \`cloudctl up\``, "disconnected", 0);
    }
    try {
      return params === undefined ? await connection.sendRequest<R>(method) : await connection.sendRequest<R>(method, params);
    } catch (e) {
      if (e instanceof ResponseError) {
        const kind = (e.data as { kind?: string } | undefined)?.kind ?? "unknown";
        throw new DaemonError(e.message, kind, e.code);
      }
      throw e;
    }
  }

  // --- the connection -------------------------------------------------------------------

  private connectOnce(): Promise<void> {
    if (!this.connecting) {
      this.connecting = this.doConnect().finally(() => {
        this.connecting = undefined;
      });
    }
    return this.connecting;
  }

  private async doConnect(): Promise<void> {
    this.setState("connecting");
    const stream = await new Promise<net.Socket>((resolve, reject) => {
      const socket = net.connect({ path: this.socket });
      socket.once("connect", () => {
        socket.off("error", reject);
        resolve(socket);
      });
      socket.once("error", reject);
    });
    const connection = createMessageConnection(new StreamMessageReader(stream), new StreamMessageWriter(stream));
    this.stream = stream;
    this.connection = connection;
    connection.onNotification((method: string, params: unknown) => this.onNotification(method, params));
    connection.onClose(() => this.onDropped(connection));
    stream.on("error", () => this.onDropped(connection));
    stream.on("close", () => this.onDropped(connection));
    connection.listen();
    try {
      await this.hello();
      const topics = this.options.topics ?? ["sessions", "teleport"];
      await this.request("subscribe", { topics });
      if (this.options.trackSessions ?? true) {
        this.relayStatus = await this.whoami();
        this.emit("relay", this.relayStatus);
        const sessions = await this.list();
        this.sessionMap.clear();
        for (const session of sessions) {
          this.sessionMap.set(session.id, session);
        }
        this.emit("sessions", this.sessions);
      }
      for (const [session, followed] of this.followed) {
        await this.attach(session, followed);
      }
    } catch (e) {
      this.dropConnection();
      throw e;
    }
    this.retryDelay = 0;
    this.setState("connected");
  }

  /** Attaches from what was delivered last, then loads the pending prompts. */
  private async attach(session: string, followed: Followed): Promise<void> {
    const since = followed.last ?? followed.since;
    await this.request("attach", { session, since: since ?? null });
    const prompts = await this.permissions(session);
    // The list is the daemon's at this point of the stream: entries before it are in it.
    followed.prompts = new Map(prompts.map((p) => [p.request_id, p]));
    this.emit("prompts", session, this.prompts(session));
  }

  private onDropped(connection: MessageConnection): void {
    if (connection !== this.connection) {
      return;
    }
    this.dropConnection();
    if (this.closed) {
      return;
    }
    this.setState("disconnected");
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    clearTimeout(this.retryTimer);
    // Quick at first (a restart takes a moment), then every 2 s at most.
    this.retryDelay = Math.min(Math.max(this.retryDelay * 2, 50), 2000);
    this.retryTimer = setTimeout(() => {
      if (this.closed || this.connection) {
        return;
      }
      this.connectOnce().catch(() => {
        if (!this.closed && !this.connection) {
          this.setState("disconnected");
          this.scheduleReconnect();
        }
      });
    }, this.retryDelay);
  }

  private dropConnection(): void {
    const connection = this.connection;
    this.connection = undefined;
    connection?.dispose();
    this.stream?.destroy();
    this.stream = undefined;
  }

  private setState(state: ConnectionState): void {
    if (this.state !== state) {
      this.state = state;
      this.emit("state", state);
    }
  }

  // --- notifications --------------------------------------------------------------------

  private onNotification(method: string, params: unknown): void {
    switch (method) {
      case "session/changed":
        this.upsert(params as Session);
        break;
      case "session/removed":
        this.remove((params as { session: string }).session);
        break;
      case "relay":
        this.relayStatus = params as RelayStatus;
        this.emit("relay", this.relayStatus);
        break;
      case "session/log": {
        const { session, entry } = params as { session: string; entry: Entry };
        this.onEntry(session, entry);
        break;
      }
      case "teleport/progress":
        this.emit("progress", params as TeleportProgress);
        break;
      case "closing":
        // The connection ends right after; the reconnect follows its close.
        this.emit("closing", params);
        break;
      default:
        this.emit("notification", method, params);
    }
  }

  private onEntry(session: string, entry: Entry): void {
    const followed = this.followed.get(session);
    if (!followed || (followed.last !== undefined && entry.seq <= followed.last)) {
      return;
    }
    followed.last = entry.seq;
    this.emit("entry", session, entry);
    if (updatePrompts(followed.prompts, entry)) {
      this.emit("prompts", session, this.prompts(session));
    }
  }

  private upsert(session: Session): void {
    this.sessionMap.set(session.id, session);
    this.emit("sessions", this.sessions);
  }

  private remove(session: string): void {
    if (this.sessionMap.delete(session)) {
      this.emit("sessions", this.sessions);
    }
  }
}

/** Applies a log entry to a session's pending prompts; true if they changed. */
function updatePrompts(prompts: Map<string, Prompt>, entry: Entry): boolean {
  const message = entry.message as Record<string, any> | undefined;
  if (!message || typeof message !== "object") {
    return false;
  }
  if (message.type === "control_request" && entry.author === "agent" && message.request?.subtype === "can_use_tool") {
    prompts.set(message.request_id, {
      request_id: String(message.request_id),
      tool_name: String(message.request.tool_name ?? ""),
      input: JSON.stringify(message.request.input ?? null),
      seq: entry.seq,
    });
    return true;
  }
  const answered =
    message.type === "control_response" ? message.response?.request_id : message.type === "control_cancel_request" ? message.request_id : undefined;
  return typeof answered === "string" && prompts.delete(answered);
}

/** Whether a connect error means no daemon listens (so `cloudctl up` should start one). */
function isAbsent(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException)?.code;
  return code === "ENOENT" || code === "ECONNREFUSED";
}

/** One line of text for a log entry, as a follow view shows it. */
export function describeEntry(entry: Entry): string {
  const who = typeof entry.author === "string" ? entry.author : entry.author.user;
  if (entry.status) {
    return `[${entry.seq}] ${who}: status ${entry.status}${entry.reason ? ` (${entry.reason})` : ""}`;
  }
  if (entry.snapshot) {
    const snapshot = entry.snapshot as { version?: number; files?: number };
    return `[${entry.seq}] ${who}: snapshot v${snapshot.version} (${snapshot.files} files)`;
  }
  const message = entry.message as Record<string, any> | string | undefined;
  if (typeof message === "string" || message === undefined) {
    return `[${entry.seq}] ${who}: ${message ?? ""}`;
  }
  switch (message.type) {
    case "user":
      return `[${entry.seq}] ${who}: > ${contentText(message.message?.content)}`;
    case "assistant":
      return `[${entry.seq}] ${who}: ${contentText(message.message?.content)}`;
    case "result":
      return `[${entry.seq}] ${who}: (${message.result ?? message.subtype})`;
    case "control_request":
      if (message.request?.subtype === "can_use_tool") {
        return `[${entry.seq}] ${who}: asks to use ${message.request.tool_name} ${JSON.stringify(message.request.input)}`;
      }
      return `[${entry.seq}] ${who}: ${message.request?.subtype ?? "control request"}`;
    case "control_response":
      return `[${entry.seq}] ${who}: ${message.response?.response?.behavior ?? message.response?.subtype ?? "answer"} ${message.response?.request_id ?? ""}`;
    case "control_cancel_request":
      return `[${entry.seq}] ${who}: prompt ${message.request_id} withdrawn`;
    default:
      return `[${entry.seq}] ${who}: ${JSON.stringify(message)}`;
  }
}

function contentText(content: unknown): string {
  if (typeof content === "string") {
    return content;
  }
  if (Array.isArray(content)) {
    return content.map((block) => (typeof block?.text === "string" ? block.text : "")).join("\n");
  }
  return JSON.stringify(content);
}
