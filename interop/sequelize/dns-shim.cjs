// Resolves the emulator's endpoint names to its address, for programs that connect to a DSQL
// endpoint by name (as AWS's connectors do) when no DNS knows it. Loaded with
// `NODE_OPTIONS="--require <this file>"`; `DSQL_EMULATOR_HOSTS` lists the names (comma
// separated), `DSQL_EMULATOR_ADDRESS` the address (default 127.0.0.1). Every other name
// resolves as usual.
"use strict";
const dns = require("dns");
const hosts = new Set(
  (process.env.DSQL_EMULATOR_HOSTS || "").split(",").map((h) => h.trim().toLowerCase()).filter(Boolean)
);
const address = process.env.DSQL_EMULATOR_ADDRESS || "127.0.0.1";
const lookup = dns.lookup;
dns.lookup = function (hostname, options, callback) {
  if (typeof options === "function") {
    callback = options;
    options = {};
  }
  if (typeof hostname === "string" && hosts.has(hostname.toLowerCase())) {
    const all = typeof options === "object" && options !== null && options.all;
    return process.nextTick(() =>
      all ? callback(null, [{ address, family: 4 }]) : callback(null, address, 4)
    );
  }
  return lookup.call(this, hostname, options, callback);
};
