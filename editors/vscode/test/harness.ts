// The test harness: the real cloud-relay, cloudd and cloudctl binaries (built by cargo,
// found in CLOUDD_BIN_DIR, by default the workspace's target/debug), each test with its
// own CLOUDD_HOME and relay data directory in temp dirs. Nothing stands in for a
// component, and waiting is always on a condition with a deadline, never a sleep.

import { ChildProcess, execFile, spawn } from "node:child_process";
import { EventEmitter } from "node:events";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

/** How long any one condition may take to come true. */
export const DEADLINE_MS = 30_000;

export const BIN_DIR = path.resolve(process.env.CLOUDD_BIN_DIR ?? path.join(__dirname, "..", "..", "..", "..", "target", "debug"));

export function binary(name: string): string {
  const file = path.join(BIN_DIR, name);
  if (!fs.existsSync(file)) {
    throw new Error(`${file} is missing: run \`cargo build -p cloudd -p cloudctl -p cloud-relay\` first, or set CLOUDD_BIN_DIR`);
  }
  return file;
}

export function run(file: string, args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(file, args, { env, maxBuffer: 64 * 1024 * 1024 }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === "number" ? error.code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/** Polls `check` until it returns a value other than undefined/false, or fails after the deadline. */
export async function waitFor<T>(what: string, check: () => T | undefined | false | Promise<T | undefined | false>, deadlineMs = DEADLINE_MS): Promise<T> {
  const end = Date.now() + deadlineMs;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false) {
      return value;
    }
    if (Date.now() > end) {
      throw new Error(`timed out after ${deadlineMs} ms waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

/** Resolves with the arguments of the first `event` for which `test` holds. */
export function waitEvent<A extends unknown[]>(emitter: EventEmitter, event: string, test: (...args: A) => boolean, what: string, deadlineMs = DEADLINE_MS): Promise<A> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.off(event, listener);
      reject(new Error(`timed out after ${deadlineMs} ms waiting for ${what}`));
    }, deadlineMs);
    const listener = (...args: unknown[]) => {
      if (test(...(args as A))) {
        clearTimeout(timer);
        emitter.off(event, listener);
        resolve(args as A);
      }
    };
    emitter.on(event, listener);
  });
}

/** A `cloud-relay serve` on 127.0.0.1:0 with the built-in shell agent. */
export class Relay {
  readonly data: string;
  private child?: ChildProcess;
  url = "";

  private constructor() {
    this.data = fs.mkdtempSync(path.join(os.tmpdir(), "crv"));
  }

  static async start(): Promise<Relay> {
    const relay = new Relay();
    const log = path.join(relay.data, "relay.log");
    const child = spawn(binary("cloud-relay"), ["serve", "--listen", "127.0.0.1:0", "--data", relay.data], {
      env: { ...process.env, RELAY_LOG: "info", NO_COLOR: "1" },
      stdio: ["ignore", "ignore", "pipe"],
    });
    relay.child = child;
    let stderr = "";
    child.stderr!.on("data", (chunk: Buffer) => {
      stderr += chunk.toString();
      fs.appendFileSync(log, chunk);
    });
    // The relay logs the address it bound; the port is the kernel's choice.
    const address = await waitFor("cloud-relay to listen", () => {
      const match = /relay listening\S*\s.*?address\S*?=(?:\x1b\[[0-9;]*m)*(127\.0\.0\.1:\d+)/.exec(stderr);
      if (!match && child.exitCode !== null) {
        throw new Error(`cloud-relay exited (${child.exitCode}): ${stderr}`);
      }
      return match?.[1];
    });
    relay.url = `http://${address}`;
    return relay;
  }

  async token(user: string, org: string): Promise<string> {
    const out = await run(binary("cloud-relay"), ["token", "create", "--user", user, "--org", org, "--data", this.data], process.env);
    if (out.code !== 0) {
      throw new Error(`cloud-relay token create failed: ${out.stderr}`);
    }
    return out.stdout.trim();
  }

  stop(): void {
    this.child?.kill("SIGKILL");
    fs.rmSync(this.data, { recursive: true, force: true });
  }
}

/** An isolated CLOUDD_HOME, for a daemon that `cloudctl` starts. */
export class Home {
  readonly dir: string;
  readonly env: NodeJS.ProcessEnv;

  constructor() {
    // Short: a Unix socket path must fit in 108 bytes.
    this.dir = fs.mkdtempSync(path.join("/tmp", "cdv"));
    const env: NodeJS.ProcessEnv = { ...process.env, CLOUDD_HOME: this.dir, CLOUDD_BIN: binary("cloudd") };
    delete env.CLOUDD_SOCKET;
    delete env.CLOUDD_LOG;
    this.env = env;
  }

  async cloudctl(...args: string[]): Promise<string> {
    const out = await run(binary("cloudctl"), args, this.env);
    if (out.code !== 0) {
      throw new Error(`cloudctl ${args.join(" ")} failed (${out.code}): ${out.stderr}`);
    }
    return out.stdout;
  }

  async cloudctlJson(...args: string[]): Promise<any> {
    return JSON.parse(await this.cloudctl("--json", ...args));
  }

  async login(relay: Relay): Promise<void> {
    await this.cloudctl("login", "--relay", relay.url, "--token", await relay.token("ann", "acme"));
  }

  /** Stops the daemon (if any) and removes the home. */
  async stop(): Promise<void> {
    await run(binary("cloudctl"), ["down"], this.env);
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
