#!/usr/bin/env bash
# Runs AWS's Node.js Sequelize pet-clinic sample (sample/, unchanged from aws-samples/
# aurora-dsql-samples, typescript/sequelize) against `dsql-emulator`: once as admin, once as a
# custom role mapped with AWS IAM GRANT, as the sample's README runs it against a cluster.
#
#   bash interop/sequelize/run.sh            # dsql-emulator from PATH or target/debug
#   DSQL_EMULATOR=/path/to/dsql-emulator bash interop/sequelize/run.sh
#
# Needs node (18+), npm with access to the npm registry, psql, and the PostgreSQL server
# binaries the emulator starts (PG_BIN). The sample connects to port 5432 by name, so the
# emulator takes port 5432 (it must be free) and dns-shim.cjs resolves the name to it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
emulator="${DSQL_EMULATOR:-$(command -v dsql-emulator || echo "$repo/target/debug/dsql-emulator")}"
[ -x "$emulator" ] || { echo "no dsql-emulator: cargo build --features emulator --bin dsql-emulator" >&2; exit 2; }

work="$(mktemp -d)"
env_file="$work/dsql.env"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# The sample builds in a copy (node_modules and dist stay out of the repository).
cp -r "$here/sample" "$work/sample"
# pg-native (a dependency the sample loads through `...pg`) builds against libpq with node-gyp,
# from the local Node headers (no download).
nodedir="${npm_config_nodedir:-$(dirname "$(dirname "$(command -v node)")")}"
(cd "$work/sample" && npm_config_nodedir="$nodedir" npm install --no-audit --no-fund --loglevel=error && npx tsc)

# Fixed credentials: the sample's AWS SDK signs with them, the emulator checks them.
export AWS_ACCESS_KEY_ID=AKIASEQUELIZESAMPLE0 AWS_SECRET_ACCESS_KEY=sequelize/sample+secret
unset AWS_SESSION_TOKEN AWS_PROFILE
export AWS_EC2_METADATA_DISABLED=true AWS_CONFIG_FILE=/nonexistent AWS_SHARED_CREDENTIALS_FILE=/nonexistent
"$emulator" --port 5432 --env-file "$env_file" \
  --iam-identity "$AWS_ACCESS_KEY_ID=arn:aws:iam::123456789012:role/pet-clinic" &
pid=$!
# Ready once the file names this emulator (a file an earlier, killed one left does not).
for _ in $(seq 1 300); do grep -qs "DSQL_EMULATOR_PID='$pid'" "$env_file" && break; kill -0 "$pid" || exit 1; sleep 0.1; done
# shellcheck disable=SC1090
. "$env_file"
export DSQL_EMULATOR_HOSTS="$CLUSTER_ENDPOINT" NODE_OPTIONS="--require $here/dns-shim.cjs"

run_sample() {
  (cd "$work/sample" && CLUSTER_USER="$1" node -e '
    require("./dist/src/index.js").runExamples().then(
      () => { console.log("sample finished as " + process.env.CLUSTER_USER); process.exit(0); },
      (e) => { console.error(e); process.exit(1); });')
}

echo "== the Sequelize sample as admin"
run_sample admin

echo "== the Sequelize sample as a custom role"
PGPASSWORD="$("$emulator" token --user admin)" psql -X -q -v ON_ERROR_STOP=1 <<'SQL'
CREATE ROLE example WITH LOGIN;
AWS IAM GRANT example TO 'arn:aws:iam::123456789012:role/pet-clinic';
CREATE SCHEMA myschema;
GRANT USAGE, CREATE ON SCHEMA myschema TO example;
SQL
run_sample example
echo "== the Sequelize sample ran against dsql-emulator as admin and as a custom role"
