// Drive `dsql-emulator` (a local Amazon Aurora DSQL endpoint) from Node.js tests.
//
// `startEmulator()` runs the binary ($DSQL_EMULATOR, else `dsql-emulator` on PATH) on a free
// port with its control port, stopped with the test runner however that ends
// (--exit-with-parent). `emulator.endpoint()` makes an endpoint of the test's own (its own
// database, counters, faults and limits); `endpoint.close()` drops it. `endpoint.pgConfig()`
// is a node-postgres configuration with a fresh IAM auth token as its password.
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

// Credentials the emulator accepts: any pair works; fixed so tests need no AWS setup.
export const ACCESS_KEY_ID = "AKIANODEEMULATOR0000";
export const SECRET_ACCESS_KEY = "node/dsql+emulator";

function binary() {
  return process.env.DSQL_EMULATOR || "dsql-emulator";
}

function credentialsEnv(extra = {}) {
  const env = { ...process.env, AWS_ACCESS_KEY_ID: ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: SECRET_ACCESS_KEY, ...extra };
  // The emulator would require tokens to carry a session token found here.
  delete env.AWS_SESSION_TOKEN;
  return env;
}

function readEnv(path) {
  let text;
  try {
    text = readFileSync(path, "utf8");
  } catch {
    return {};
  }
  const env = {};
  for (const line of text.split("\n")) {
    const match = /^export ([A-Z_0-9]+)='(.*)'$/.exec(line);
    if (match) env[match[1]] = match[2];
  }
  return env;
}

export class Endpoint {
  constructor(emulator, described) {
    this.emulator = emulator;
    this.name = described.endpoint;
    this.port = Number(described.port);
    this.caCertPath = described.ca_cert_path;
    this.region = described.region;
  }

  /** An IAM auth token for `user` (admin: DbConnectAdmin), signed by the binary. */
  token(user = "admin") {
    return execFileSync(binary(), ["token", "--user", user], {
      env: credentialsEnv({ CLUSTER_ENDPOINT: this.name, AWS_REGION: this.region }),
      encoding: "utf8",
    }).trim();
  }

  /** A node-postgres configuration: the emulator's address, the endpoint's TLS name. */
  pgConfig(user = "admin") {
    return {
      host: "127.0.0.1",
      port: this.port,
      user,
      database: "postgres",
      password: this.token(user),
      ssl: { ca: readFileSync(this.caCertPath, "utf8"), servername: this.name },
    };
  }

  control(method, path, params) {
    return this.emulator.control(method, `/endpoints/${this.port}${path}`, params);
  }

  /** The COMMIT of a transaction that wrote one of `tables` (none: any) fails with 40001
   * (OC000) and rolls back, every `every`-th, `count` times (undefined: until stopped). */
  injectConflicts({ tables = [], every = 1, count } = {}) {
    return this.control("POST", "/conflicts", { tables: tables.join(",") || undefined, every, count });
  }

  stopInjectingConflicts() {
    return this.control("DELETE", "/conflicts");
  }

  /** A fault by name: cut_next_commit, fail_next_commit, drop_all_connections, black_hole, ... */
  fault(name, params) {
    return this.control("POST", `/faults/${name}`, params);
  }

  stats() {
    return this.control("GET", "/");
  }

  /** Drops the endpoint and its database. */
  close() {
    return this.emulator.control("DELETE", `/endpoints/${this.port}`);
  }
}

export class Emulator {
  constructor(child, env) {
    this.child = child;
    this.env = env;
  }

  async control(method, path, params = {}) {
    const query = new URLSearchParams(
      Object.entries(params).filter(([, v]) => v !== undefined).map(([k, v]) => [k, String(v)]),
    ).toString();
    const response = await fetch(`${this.env.DSQL_EMULATOR_CONTROL}${path}${query ? `?${query}` : ""}`, {
      method,
      headers: { authorization: `Bearer ${this.env.DSQL_EMULATOR_CONTROL_TOKEN}` },
    });
    const body = await response.json();
    if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${JSON.stringify(body)}`);
    return body;
  }

  /** An endpoint of its own: own database, counters, faults and limits. */
  async endpoint() {
    return new Endpoint(this, await this.control("POST", "/endpoints"));
  }

  /** Stops it (SIGTERM), its PostgreSQL with it. */
  async stop() {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((resolve) => this.child.once("exit", resolve));
    this.child.kill("SIGTERM");
    await exited;
  }
}

/** Starts `dsql-emulator` and waits until it is ready (its env file names its pid). */
export async function startEmulator({ timeoutMs = 120_000 } = {}) {
  const envFile = join(mkdtempSync(join(tmpdir(), "dsql-emulator-node-")), "dsql.env");
  // Stopped with this process however it ends: by the kernel on Linux, elsewhere when the
  // pipe to its standard input closes.
  const linux = process.platform === "linux";
  const child = spawn(
    binary(),
    ["--port", "0", "--control-port", "0", linux ? "--exit-with-parent" : "--exit-on-stdin-close",
     "--env-file", envFile],
    { env: credentialsEnv(), stdio: [linux ? "ignore" : "pipe", "ignore", "inherit"] },
  );
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const env = readEnv(envFile);
    if (env.DSQL_EMULATOR_PID === String(child.pid)) return new Emulator(child, env);
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`dsql-emulator exited (${child.exitCode ?? child.signalCode})`);
    }
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`dsql-emulator was not ready within ${timeoutMs} ms`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}
