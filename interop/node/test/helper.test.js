// The helper as a Node team uses it: node-postgres against an endpoint per test, a retry loop
// against injected conflicts, an unknown outcome at a cut COMMIT, two tests at once on
// endpoints of their own, fifty endpoints made and dropped.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import pg from "pg";

import { setup, teardown, emulatorFromEnv } from "../global-setup.js";

async function connect(endpoint) {
  const client = new pg.Client(endpoint.pgConfig());
  await client.connect();
  return client;
}

async function withRetry(client, work, attempts = 5) {
  for (let attempt = 1; attempt <= attempts; attempt++) {
    await client.query("BEGIN");
    try {
      await work(client);
      await client.query("COMMIT");
      return attempt;
    } catch (error) {
      await client.query("ROLLBACK").catch(() => {});
      if (error.code !== "40001") throw error;
    }
  }
  throw new Error("still conflicting");
}

describe("dsql-emulator helper", { concurrency: 2 }, () => {
  before(setup);
  after(teardown);

  test("one injected conflict is retried once and commits", async () => {
    const endpoint = await emulatorFromEnv().endpoint();
    const client = await connect(endpoint);
    try {
      await client.query("CREATE TABLE orders (id int PRIMARY KEY, n int)");
      await client.query("INSERT INTO orders VALUES (1, 0)");
      await endpoint.injectConflicts({ tables: ["orders"], count: 1 });
      const attempts = await withRetry(client, (c) => c.query("UPDATE orders SET n = n + 1 WHERE id = 1"));
      assert.equal(attempts, 2);
      assert.equal((await client.query("SELECT n FROM orders")).rows[0].n, 1);
      assert.equal((await endpoint.stats()).injected_conflicts, 1);
    } finally {
      await client.end();
      await endpoint.close();
    }
  });

  test("a cut COMMIT leaves the outcome unknown", async () => {
    const endpoint = await emulatorFromEnv().endpoint();
    const client = await connect(endpoint);
    client.on("error", () => {}); // the cut connection reports here too
    try {
      await client.query("CREATE TABLE ledger (id int PRIMARY KEY)");
      await endpoint.fault("cut_next_commit");
      await client.query("BEGIN");
      await client.query("INSERT INTO ledger VALUES (1)");
      // The connection is gone with COMMIT in flight: no answer says whether it committed.
      await assert.rejects(client.query("COMMIT"));
    } finally {
      await client.end().catch(() => {});
      await endpoint.close();
    }
  });

  test("two tests at once on endpoints of their own see neither tables nor faults", async () => {
    const [a, b] = await Promise.all([emulatorFromEnv().endpoint(), emulatorFromEnv().endpoint()]);
    const [onA, onB] = await Promise.all([connect(a), connect(b)]);
    try {
      await onA.query("CREATE TABLE mine (id int PRIMARY KEY)");
      await assert.rejects(onB.query("SELECT * FROM mine"), { code: "42P01" });
      await onB.query("CREATE TABLE mine (id int PRIMARY KEY)");
      await a.injectConflicts(); // any table, every commit, on a only
      await onA.query("BEGIN");
      await onA.query("INSERT INTO mine VALUES (1)");
      await assert.rejects(onA.query("COMMIT"), { code: "40001" });
      await onB.query("BEGIN");
      await onB.query("INSERT INTO mine VALUES (1)");
      await onB.query("COMMIT");
    } finally {
      await Promise.all([onA.end(), onB.end()]);
      await Promise.all([a.close(), b.close()]);
    }
  });

  test("fifty endpoints come and go", async () => {
    const started = Date.now();
    for (let i = 0; i < 50; i++) await (await emulatorFromEnv().endpoint()).close();
    console.log(`50 endpoints made and dropped in ${Date.now() - started} ms`);
  });
});
