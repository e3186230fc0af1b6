// The socket client against the real daemon, relay and cloudctl: what the extension relies
// on, from the first connect (which starts the daemon) to a daemon restart under it.

import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { after, before, describe, test } from "node:test";

import { CloudClient, DaemonError, Entry, Prompt, Session, TeleportProgress, describeEntry, socketPath } from "../src/client";
import { binary, Home, Relay, waitEvent, waitFor } from "./harness";

let relay: Relay;

before(async () => {
  relay = await Relay.start();
});

after(() => {
  relay.stop();
});

/** A client of `home`'s daemon that starts it if needed. */
function client(home: Home): CloudClient {
  return new CloudClient({ env: home.env, cloudctl: binary("cloudctl"), clientName: "vscode-test" });
}

/** Everything a client delivers for a session, in order of arrival. */
function collect(c: CloudClient, session: string): Entry[] {
  const entries: Entry[] = [];
  c.on("entry", (s: string, entry: Entry) => {
    if (s === session) {
      entries.push(entry);
    }
  });
  return entries;
}

function outputs(entries: Entry[]): string[] {
  return entries.flatMap((e) => {
    const message = e.message as any;
    return message?.type === "assistant" ? [message.message.content[0].text as string] : [];
  });
}

/** Waits for the session's prompt that asks to run `command`. */
async function promptFor(c: CloudClient, session: string, command: string): Promise<Prompt> {
  return waitFor(`a prompt to run ${command}`, () => c.prompts(session).find((p) => JSON.parse(p.input).command === command));
}

/** Asserts the entries are the session's log from seq 1, each once, without a gap. */
function assertWholeLog(entries: Entry[]): void {
  assert.deepEqual(
    entries.map((e) => e.seq),
    entries.map((_, i) => i + 1),
    `entries once each, in order, from 1: ${entries.map((e) => e.seq).join(",")}`,
  );
}

describe("the socket client", () => {
  test("the location rule gives CLOUDD_HOME's socket", () => {
    assert.equal(socketPath({ CLOUDD_HOME: "/h" }, "linux"), "/h/run/cloudd.sock");
    assert.equal(socketPath({ CLOUDD_HOME: "/h", CLOUDD_SOCKET: "/s.sock" }, "linux"), "/s.sock");
    assert.equal(socketPath({ XDG_RUNTIME_DIR: "/run/user/1" }, "linux"), "/run/user/1/cloudd/cloudd.sock");
    assert.equal(socketPath({ USER: "ann" }, "linux"), "/tmp/cloudd-ann/cloudd.sock");
    assert.equal(socketPath({ CLOUDD_HOME: "C:\\h" }, "win32"), "\\\\.\\pipe\\cloudd.sock");
  });

  test("hello, list, create, send, a permission round trip, and follow with replay", async () => {
    const home = new Home();
    const c = client(home);
    try {
      // No daemon runs: the client starts one with `cloudctl up`.
      await c.start();
      assert.equal(c.state, "connected");
      const hello = await c.hello();
      assert.equal(hello.protocol, 1);
      assert.deepEqual(await c.list(), []);

      // The relay state follows a login made elsewhere.
      await home.login(relay);
      await waitFor("the relay to be connected", () => c.relay?.state === "connected" && c.relay.mode === "remote");

      const session = await c.create({ task: "from the editor" });
      assert.equal(session.task, "from the editor");
      // A session created elsewhere reaches the list by the `sessions` notifications.
      const other = (await home.cloudctlJson("session", "create", "--task", "from cloudctl")).session as Session;
      await waitFor("the other session in the list", () => c.sessions.some((s) => s.id === other.id));
      await waitFor("the session to run", () => c.sessions.find((s) => s.id === session.id)?.status === "running");
      assert.deepEqual(
        (await c.list()).map((s) => s.id).sort(),
        [session.id, other.id].sort(),
      );

      const entries = collect(c, session.id);
      await c.follow(session.id, 0);
      const seq = await c.send(session.id, "echo hello-from-vscode");
      assert.ok(seq > 0);
      const prompt = await promptFor(c, session.id, "echo hello-from-vscode");
      assert.equal(prompt.tool_name, "Bash");
      await c.answer(session.id, prompt.request_id, { behavior: "allow" });
      await waitFor("the command's output", () => outputs(entries).includes("hello-from-vscode"));
      await waitFor("the prompt to leave", () => c.prompts(session.id).length === 0);
      assert.ok(
        entries.some((e) => describeEntry(e).includes("> echo hello-from-vscode")),
        entries.map(describeEntry).join("\n"),
      );

      // Another client following from the start gets the same log, replayed, each once.
      const late = client(home);
      try {
        const replayed = collect(late, session.id);
        await late.start();
        await late.follow(session.id, 0);
        const last = entries[entries.length - 1].seq;
        await waitFor("the replay", () => replayed.length >= last);
        assertWholeLog(replayed);
        assert.deepEqual(
          replayed.slice(0, last).map((e) => e.seq),
          entries.map((e) => e.seq),
        );
        assert.ok(outputs(replayed).includes("hello-from-vscode"));
      } finally {
        late.close();
      }
    } finally {
      c.close();
      await home.stop();
    }
  });

  test("a prompt answered from cloudctl is withdrawn", async () => {
    const home = new Home();
    const c = client(home);
    try {
      await home.login(relay);
      await c.start();
      const session = await c.create({ task: "answered elsewhere" });
      await c.follow(session.id, 0);
      await c.send(session.id, "echo never-run");
      const prompt = await promptFor(c, session.id, "echo never-run");

      const withdrawn = waitEvent(c, "prompts", (s: string, prompts: Prompt[]) => s === session.id && prompts.length === 0, "the prompt to be withdrawn");
      await home.cloudctl("deny", session.id, prompt.request_id);
      await withdrawn;

      await assert.rejects(c.answer(session.id, prompt.request_id, { behavior: "allow" }), (e: unknown) => {
        assert.ok(e instanceof DaemonError);
        assert.equal(e.kind, "already_answered", e.message);
        return true;
      });
    } finally {
      c.close();
      await home.stop();
    }
  });

  test("teleport push and pull report their progress", async () => {
    const home = new Home();
    const c = client(home);
    const here = fs.mkdtempSync(path.join(os.tmpdir(), "tpv"));
    const there = fs.mkdtempSync(path.join(os.tmpdir(), "tpv"));
    try {
      await home.login(relay);
      await c.start();
      const session = await c.create({ task: "teleported" });
      fs.writeFileSync(path.join(here, "a.txt"), "alpha\n");
      fs.mkdirSync(path.join(here, "src"));
      fs.writeFileSync(path.join(here, "src", "b.txt"), "beta\n".repeat(1000));
      const steps: TeleportProgress[] = [];
      c.on("progress", (step: TeleportProgress) => steps.push(step));

      const pushed = await c.teleportPush(here, session.id);
      assert.equal(pushed.session, session.id);
      assert.ok(pushed.version >= 1 && pushed.files >= 2, JSON.stringify(pushed));
      assert.ok(steps.some((s) => s.session === session.id && s.phase === "done"), JSON.stringify(steps));

      steps.length = 0;
      const pulled = await c.teleportPull(there, session.id);
      assert.equal(pulled.version, pushed.version);
      assert.equal(fs.readFileSync(path.join(there, "src", "b.txt"), "utf8"), "beta\n".repeat(1000));
      assert.equal(fs.readFileSync(path.join(there, "a.txt"), "utf8"), "alpha\n");
      assert.ok(steps.length > 0, "progress during the pull");
    } finally {
      c.close();
      await home.stop();
      fs.rmSync(here, { recursive: true, force: true });
      fs.rmSync(there, { recursive: true, force: true });
    }
  });

  test("after the daemon restarts the client reconnects, shows nothing twice and loses nothing", async () => {
    const home = new Home();
    const c = client(home);
    try {
      await home.login(relay);
      await c.start();
      const session = await c.create({ task: "restarts" });
      const entries = collect(c, session.id);
      await c.follow(session.id, 0);
      await c.send(session.id, "echo before");
      await c.answer(session.id, (await promptFor(c, session.id, "echo before")).request_id, { behavior: "allow" });
      await waitFor("the first output", () => outputs(entries).includes("before"));

      const pid = (await c.hello()).pid;
      const down = waitEvent(c, "state", (state: string) => state === "disconnected", "the client to see the daemon go");
      await home.cloudctl("down");
      await down;

      // While the client is away (or reconnecting), the session moves on through cloudctl.
      await home.cloudctl("send", session.id, "echo while-away");
      const away = await waitFor("the prompt via cloudctl", async () => {
        const prompts = (await home.cloudctlJson("permissions", session.id)) as Array<{ request_id: string; input: { command: string } }>;
        return prompts.find((p) => p.input.command === "echo while-away");
      });
      await home.cloudctl("allow", session.id, away.request_id);

      await waitFor("the client to reconnect", () => c.state === "connected");
      assert.notEqual((await c.hello()).pid, pid, "a new daemon");
      await waitFor("the output made while away", () => outputs(entries).includes("while-away"));

      await c.send(session.id, "echo after");
      await c.answer(session.id, (await promptFor(c, session.id, "echo after")).request_id, { behavior: "allow" });
      await waitFor("the last output", () => outputs(entries).includes("after"));
      assert.deepEqual(outputs(entries), ["before", "while-away", "after"]);
      assertWholeLog(entries);
    } finally {
      c.close();
      await home.stop();
    }
  });
});
