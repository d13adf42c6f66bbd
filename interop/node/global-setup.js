// A global setup for vitest (`globalSetup: ["dsql-emulator-helper/global-setup"]`) and jest
// (`globalSetup` / `globalTeardown` pointing at `setup` / `teardown` re-exported from a file of
// yours): one emulator for the run; tests read DSQL_EMULATOR_CONTROL and
// DSQL_EMULATOR_CONTROL_TOKEN from the environment and make endpoints of their own with
// `emulatorFromEnv().endpoint()`.
import { Emulator, startEmulator } from "./index.js";

let running;

export async function setup() {
  running = await startEmulator();
  process.env.DSQL_EMULATOR_CONTROL = running.env.DSQL_EMULATOR_CONTROL;
  process.env.DSQL_EMULATOR_CONTROL_TOKEN = running.env.DSQL_EMULATOR_CONTROL_TOKEN;
  return teardown; // vitest: the teardown
}

export async function teardown() {
  await running?.stop();
}

/** In a test worker: the run's emulator, from the environment the global setup set. */
export function emulatorFromEnv() {
  return new Emulator({ exitCode: 0, signalCode: null }, {
    DSQL_EMULATOR_CONTROL: process.env.DSQL_EMULATOR_CONTROL,
    DSQL_EMULATOR_CONTROL_TOKEN: process.env.DSQL_EMULATOR_CONTROL_TOKEN,
  });
}

export default setup;
