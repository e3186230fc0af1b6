// The VS Code side: the Sessions view, the follow panels, permission prompts, teleport
// commands and the status bar item, all fed by one CloudClient (src/client.ts).
//
// It owns only presentation and user input; everything about the socket (framing,
// reconnecting, deduplicating log entries, tracking prompts) is the client's. Closing the
// editor loses nothing: the daemon keeps following sessions and journaling what was sent.

import * as vscode from "vscode";

import { CloudClient, DaemonError, Entry, Prompt, Session, TeleportProgress, describeEntry } from "./client";

let client: CloudClient | undefined;

function clientOptions(): ConstructorParameters<typeof CloudClient>[0] {
  const config = vscode.workspace.getConfiguration("cloudd");
  const socket = config.get<string>("socket") || undefined;
  const cloudctl = config.get<string>("cloudctlPath") || "cloudctl";
  return { socket, cloudctl, clientName: "cloudd-vscode", clientVersion: vscode.extensions.getExtension("cloudd.cloudd")?.packageJSON.version ?? "0" };
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  const c = new CloudClient(clientOptions());
  client = c;
  const sessions = new SessionsView(c);
  const prompts = new PromptNotifier(c);
  const status = new StatusItem(c);
  context.subscriptions.push(
    vscode.window.registerTreeDataProvider("cloudd.sessions", sessions),
    status,
    { dispose: () => c.close() },
    vscode.commands.registerCommand("cloudd.start", () => start(c)),
    vscode.commands.registerCommand("cloudd.refresh", () => sessions.refresh()),
    vscode.commands.registerCommand("cloudd.createSession", () => createSession(c)),
    vscode.commands.registerCommand("cloudd.follow", async (item?: SessionItem) => {
      const session = await pick(c, item);
      if (session) {
        FollowPanel.show(context, session);
      }
    }),
    vscode.commands.registerCommand("cloudd.send", async (item?: SessionItem) => {
      const session = await pick(c, item);
      const text = session && (await vscode.window.showInputBox({ prompt: `Message to ${label(session)}` }));
      if (session && text) {
        await report(c.send(session.id, text).then((seq) => `queued as event ${seq}`));
      }
    }),
    vscode.commands.registerCommand("cloudd.interrupt", async (item?: SessionItem) => {
      const session = await pick(c, item);
      if (session) {
        await report(c.interrupt(session.id).then(() => `interrupt queued for ${label(session)}`));
      }
    }),
    vscode.commands.registerCommand("cloudd.pause", async (item?: SessionItem) => {
      const session = await pick(c, item, (s) => s.status === "running");
      if (session) {
        await report(c.action(session.id, "pause").then(() => `${label(session)} paused`));
      }
    }),
    vscode.commands.registerCommand("cloudd.resume", async (item?: SessionItem) => {
      const session = await pick(c, item, (s) => s.status === "paused" || s.status === "failed");
      if (session) {
        await report(c.action(session.id, "resume").then(() => `${label(session)} resumed`));
      }
    }),
    vscode.commands.registerCommand("cloudd.allow", (item?: PromptItem) => item && prompts.answer(item.session, item.prompt, true)),
    vscode.commands.registerCommand("cloudd.deny", (item?: PromptItem) => item && prompts.answer(item.session, item.prompt, false)),
    vscode.commands.registerCommand("cloudd.teleportPush", async (item?: SessionItem) => teleport(c, "push", item)),
    vscode.commands.registerCommand("cloudd.teleportPull", async (item?: SessionItem) => teleport(c, "pull", item)),
    vscode.commands.registerCommand("cloudd.teleportWatch", async (item?: SessionItem) => teleport(c, "watch", item)),
    vscode.commands.registerCommand("cloudd.teleportStop", async () => teleport(c, "stop")),
  );
  c.on("sessions", (list: Session[]) => trackPrompts(c, list));
  c.on("state", (state: string) => state === "connected" && trackPrompts(c, c.sessions));
  void start(c);
}

export function deactivate(): void {
  client?.close();
  client = undefined;
}

async function start(c: CloudClient): Promise<void> {
  try {
    await c.start();
  } catch (e) {
    void vscode.window.showErrorMessage(`cloudd: cannot connect to ${c.socket}: ${message(e)}`, "Retry").then((choice) => {
      if (choice === "Retry") {
        void start(c);
      }
    });
  }
}

/** Prompts arrive on followed sessions: follow every live one from now on. */
function trackPrompts(c: CloudClient, list: Session[]): void {
  if (c.state !== "connected") {
    return;
  }
  const live = new Set(list.filter((s) => s.status !== "completed").map((s) => s.id));
  for (const session of list) {
    if (live.has(session.id) && !c.following.includes(session.id)) {
      c.follow(session.id, session.last_seq).catch(() => undefined);
    }
  }
  for (const session of c.following) {
    if (!live.has(session)) {
      c.unfollow(session).catch(() => undefined);
    }
  }
}

function label(session: Session): string {
  return session.task ? `"${session.task}"` : session.id;
}

function message(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

async function report(work: Promise<string>): Promise<void> {
  try {
    vscode.window.setStatusBarMessage(`cloudd: ${await work}`, 5000);
  } catch (e) {
    void vscode.window.showErrorMessage(`cloudd: ${message(e)}`);
  }
}

/** The session of a view item, or one the user picks. */
async function pick(c: CloudClient, item?: SessionItem, fits: (s: Session) => boolean = () => true): Promise<Session | undefined> {
  if (item) {
    return item.session;
  }
  const choices = c.sessions.filter(fits).map((session) => ({ label: session.task || session.id, description: `${session.status} · ${session.visibility}`, detail: session.id, session }));
  if (choices.length === 0) {
    void vscode.window.showInformationMessage("cloudd: no session fits; create one with “cloudd: Create Session”");
    return undefined;
  }
  return (await vscode.window.showQuickPick(choices, { placeHolder: "Session" }))?.session;
}

async function createSession(c: CloudClient): Promise<void> {
  const task = await vscode.window.showInputBox({ prompt: "What is the session for?", placeHolder: "task" });
  if (task === undefined) {
    return;
  }
  const visibility = (await vscode.window.showQuickPick(["private", "team", "public"], { placeHolder: "Visibility" })) as Session["visibility"] | undefined;
  if (!visibility) {
    return;
  }
  const folder = vscode.workspace.workspaceFolders?.[0];
  let carry = false;
  if (folder) {
    const choice = await vscode.window.showQuickPick([`Teleport ${folder.name} into it`, "Start empty"], { placeHolder: "Workspace folder" });
    if (choice === undefined) {
      return;
    }
    carry = choice.startsWith("Teleport");
  }
  try {
    const session = await c.create({ task, visibility });
    vscode.window.setStatusBarMessage(`cloudd: created ${session.id}`, 5000);
    if (carry && folder) {
      await teleportWithProgress(c, "push", folder.uri.fsPath, session);
    }
  } catch (e) {
    void vscode.window.showErrorMessage(`cloudd: ${message(e)}`);
  }
}

async function teleport(c: CloudClient, what: "push" | "pull" | "watch" | "stop", item?: SessionItem): Promise<void> {
  const folder = vscode.workspace.workspaceFolders?.length === 1 ? vscode.workspace.workspaceFolders[0] : await vscode.window.showWorkspaceFolderPick();
  if (!folder) {
    return;
  }
  if (what === "stop") {
    await report(c.teleportStop(folder.uri.fsPath).then(() => `stopped watching ${folder.name}`));
    return;
  }
  const session = await pick(c, item);
  if (session) {
    await teleportWithProgress(c, what, folder.uri.fsPath, session);
  }
}

async function teleportWithProgress(c: CloudClient, what: "push" | "pull" | "watch", root: string, session: Session): Promise<void> {
  const title = what === "pull" ? `Teleporting ${label(session)} into ${root}` : what === "watch" ? `Watching ${root} for ${label(session)}` : `Teleporting ${root} to ${label(session)}`;
  try {
    await vscode.window.withProgress({ location: vscode.ProgressLocation.Notification, title }, async (progress) => {
      let shown = 0;
      const onProgress = (step: TeleportProgress) => {
        if (step.session !== session.id) {
          return;
        }
        const percent = step.bytes_total > 0 ? (100 * step.bytes_done) / step.bytes_total : step.total > 0 ? (100 * step.done) / step.total : 0;
        progress.report({ message: `${step.phase} ${step.done}/${step.total}`, increment: Math.max(0, percent - shown) });
        shown = Math.max(shown, percent);
      };
      c.on("progress", onProgress);
      try {
        if (what === "push") {
          await c.teleportPush(root, session.id);
        } else if (what === "pull") {
          await c.teleportPull(root, session.id);
        } else {
          await c.teleportWatch(root, session.id);
        }
      } finally {
        c.off("progress", onProgress);
      }
    });
    vscode.window.setStatusBarMessage(`cloudd: ${what} done`, 5000);
  } catch (e) {
    void vscode.window.showErrorMessage(`cloudd: teleport ${what} failed: ${message(e)}`);
  }
}

// --- the Sessions view ------------------------------------------------------------------

class SessionItem extends vscode.TreeItem {
  constructor(readonly session: Session, prompts: number) {
    super(session.task || session.id, prompts > 0 ? vscode.TreeItemCollapsibleState.Expanded : vscode.TreeItemCollapsibleState.None);
    this.id = session.id;
    this.description = `${session.status} · ${session.visibility}${prompts > 0 ? ` · ${prompts} prompt${prompts > 1 ? "s" : ""}` : ""}`;
    this.tooltip = `${session.id}\n${session.owner}@${session.org}\nlast activity ${new Date(session.last_activity).toLocaleString()}${session.failure ? `\nfailed: ${session.failure}` : ""}`;
    this.contextValue = `session-${session.status}`;
    this.iconPath = new vscode.ThemeIcon(
      { starting: "loading~spin", running: "play-circle", paused: "debug-pause", completed: "pass", failed: "error" }[session.status] ?? "circle-outline",
    );
    this.command = { command: "cloudd.follow", title: "Follow", arguments: [this] };
  }
}

class PromptItem extends vscode.TreeItem {
  constructor(
    readonly session: Session,
    readonly prompt: Prompt,
  ) {
    super(`${prompt.tool_name}: ${prompt.input}`, vscode.TreeItemCollapsibleState.None);
    this.id = `${session.id}/${prompt.request_id}`;
    this.tooltip = `${prompt.tool_name} wants to run with\n${prompt.input}`;
    this.contextValue = "prompt";
    this.iconPath = new vscode.ThemeIcon("question");
  }
}

class SessionsView implements vscode.TreeDataProvider<SessionItem | PromptItem> {
  private readonly changed = new vscode.EventEmitter<void>();
  readonly onDidChangeTreeData = this.changed.event;

  constructor(private readonly c: CloudClient) {
    c.on("sessions", () => this.changed.fire());
    c.on("prompts", () => this.changed.fire());
    c.on("state", () => this.changed.fire());
  }

  refresh(): void {
    this.changed.fire();
  }

  getTreeItem(item: SessionItem | PromptItem): vscode.TreeItem {
    return item;
  }

  getChildren(item?: SessionItem | PromptItem): (SessionItem | PromptItem)[] {
    if (item instanceof SessionItem) {
      return this.c.prompts(item.session.id).map((p) => new PromptItem(item.session, p));
    }
    if (item) {
      return [];
    }
    return this.c.sessions.map((s) => new SessionItem(s, this.c.prompts(s.id).length));
  }
}

// --- permission prompts -----------------------------------------------------------------

/**
 * One notification per prompt, with Allow and Deny. VS Code cannot take a notification
 * back, so a prompt answered elsewhere leaves the Sessions view at once, and its
 * notification, if still clicked, says it was answered instead of answering again.
 */
class PromptNotifier {
  private readonly shown = new Set<string>();

  constructor(private readonly c: CloudClient) {
    c.on("prompts", (session: string, prompts: Prompt[]) => this.onPrompts(session, prompts));
  }

  private onPrompts(sessionId: string, prompts: Prompt[]): void {
    const session = this.c.sessions.find((s) => s.id === sessionId);
    for (const prompt of prompts) {
      const key = `${sessionId}/${prompt.request_id}`;
      if (this.shown.has(key) || !session) {
        continue;
      }
      this.shown.add(key);
      void vscode.window
        .showWarningMessage(`cloudd: ${label(session)} asks to use ${prompt.tool_name} with ${prompt.input}`, "Allow", "Deny")
        .then((choice) => choice && this.answer(session, prompt, choice === "Allow"));
    }
  }

  async answer(session: Session, prompt: Prompt, allow: boolean): Promise<void> {
    if (!this.c.prompts(session.id).some((p) => p.request_id === prompt.request_id)) {
      vscode.window.setStatusBarMessage(`cloudd: that prompt was already answered elsewhere`, 5000);
      return;
    }
    try {
      await this.c.answer(session.id, prompt.request_id, allow ? { behavior: "allow" } : { behavior: "deny", message: "denied in VS Code" });
    } catch (e) {
      if (e instanceof DaemonError && e.kind === "already_answered") {
        vscode.window.setStatusBarMessage(`cloudd: ${e.message}`, 5000);
      } else {
        void vscode.window.showErrorMessage(`cloudd: ${message(e)}`);
      }
    }
  }
}

// --- the status bar ---------------------------------------------------------------------

class StatusItem implements vscode.Disposable {
  private readonly item = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Left, 10);

  constructor(private readonly c: CloudClient) {
    c.on("state", () => this.update());
    c.on("relay", () => this.update());
    this.update();
    this.item.show();
  }

  private update(): void {
    const relay = this.c.relay;
    if (this.c.state !== "connected") {
      this.item.text = this.c.state === "connecting" ? "$(sync~spin) cloudd" : "$(cloud-offline) cloudd: offline";
      this.item.tooltip = `cloudd at ${this.c.socket}: ${this.c.state}; click to start it`;
      this.item.command = "cloudd.start";
      return;
    }
    const who = relay?.user ? ` as ${relay.user}` : "";
    this.item.text = relay?.state === "connected" ? `$(cloud) cloudd${who}` : `$(warning) cloudd: relay ${relay?.state ?? "unknown"}`;
    this.item.tooltip = relay
      ? `relay ${relay.url || "(embedded)"}: ${relay.state}${relay.reason ? ` (${relay.reason})` : ""}\nqueued events: ${relay.journal_depth}`
      : "cloudd";
    this.item.command = "cloudd.refresh";
  }

  dispose(): void {
    this.item.dispose();
  }
}

// --- follow panels ----------------------------------------------------------------------

/**
 * A session's log in a panel: the replay, then live entries, from a connection of its
 * own (attached from the start of the log), with a box to send messages.
 */
class FollowPanel {
  private static readonly open = new Map<string, FollowPanel>();

  static show(context: vscode.ExtensionContext, session: Session): void {
    const existing = FollowPanel.open.get(session.id);
    if (existing) {
      existing.panel.reveal();
      return;
    }
    FollowPanel.open.set(session.id, new FollowPanel(context, session));
  }

  private readonly panel: vscode.WebviewPanel;
  private readonly c: CloudClient;

  private constructor(context: vscode.ExtensionContext, private readonly session: Session) {
    this.panel = vscode.window.createWebviewPanel("cloudd.follow", `cloud: ${session.task || session.id}`, vscode.ViewColumn.Beside, { enableScripts: true, retainContextWhenHidden: true });
    this.panel.webview.html = html(session);
    this.c = new CloudClient({ ...clientOptions(), trackSessions: false, topics: [] });
    this.c.on("entry", (_: string, entry: Entry) => this.post({ entry: describeEntry(entry) }));
    this.c.on("state", (state: string) => this.post({ state }));
    this.panel.webview.onDidReceiveMessage(async (m: { send?: string; interrupt?: boolean }) => {
      if (m.send) {
        await report(this.c.send(session.id, m.send).then((seq) => `queued as event ${seq}`));
      } else if (m.interrupt) {
        await report(this.c.interrupt(session.id).then(() => "interrupt queued"));
      }
    });
    this.panel.onDidDispose(() => {
      FollowPanel.open.delete(session.id);
      this.c.close();
    });
    context.subscriptions.push(this.panel);
    this.c
      .start()
      .then(() => this.c.follow(session.id, 0))
      .catch((e) => this.post({ entry: `cannot follow: ${message(e)}` }));
  }

  private post(m: unknown): void {
    void this.panel.webview.postMessage(m);
  }
}

function html(session: Session): string {
  const nonce = Math.random().toString(36).slice(2);
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-${nonce}';">
<style>
body { font-family: var(--vscode-editor-font-family); font-size: var(--vscode-editor-font-size); }
#log { white-space: pre-wrap; margin-bottom: 4em; }
form { position: fixed; bottom: 0; left: 0; right: 0; display: flex; gap: 4px; padding: 6px; background: var(--vscode-editor-background); }
input { flex: 1; }
#state { opacity: 0.7; }
</style></head>
<body>
<div id="state">connecting</div>
<div id="log"></div>
<form id="form"><input id="text" placeholder="Message to ${escapeHtml(session.task || session.id)}"><button type="submit">Send</button><button type="button" id="interrupt">Interrupt</button></form>
<script nonce="${nonce}">
const vscode = acquireVsCodeApi();
const log = document.getElementById('log');
window.addEventListener('message', (event) => {
  const m = event.data;
  if (m.entry !== undefined) {
    const line = document.createElement('div');
    line.textContent = m.entry;
    log.appendChild(line);
    window.scrollTo(0, document.body.scrollHeight);
  }
  if (m.state !== undefined) {
    document.getElementById('state').textContent = m.state;
  }
});
document.getElementById('form').addEventListener('submit', (event) => {
  event.preventDefault();
  const text = document.getElementById('text');
  if (text.value) { vscode.postMessage({ send: text.value }); text.value = ''; }
});
document.getElementById('interrupt').addEventListener('click', () => vscode.postMessage({ interrupt: true }));
</script></body></html>`;
}

function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`);
}
