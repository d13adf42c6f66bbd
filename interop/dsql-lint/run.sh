#!/usr/bin/env bash
# AWS's dsql-lint live-cluster suite (crate `dsql-lint` 0.2.22, `tests/dsql_cluster_test.rs`:
# 17 tests that run statements through psql and assert a real cluster's answers) against
# dsql-emulator instead of a cluster. The suite wants the `aws` CLI for a token and its caller's
# account, and psql on port 5432: both are stood in for by scripts on PATH (the token comes from
# `dsql-emulator token`; psql is pointed at the emulator's port). Nothing else is changed.
#
#   DSQL_EMULATOR=target/debug/dsql-emulator bash interop/dsql-lint/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

version=0.2.22
emulator=${DSQL_EMULATOR:-$PWD/target/debug/dsql-emulator}
work="$PWD/target/dsql-lint"
real_psql=$(command -v psql)
mkdir -p "$work/fetch/src" "$work/bin"

# The crate's source, through cargo's registry (its published package has its tests).
cat > "$work/fetch/Cargo.toml" <<EOF
[package]
name = "dsql-lint-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
dsql-lint = "=$version"
EOF
echo 'fn main() {}' > "$work/fetch/src/main.rs"
manifest=$(cd "$work/fetch" && cargo metadata --format-version 1 --quiet \
    | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "dsql-lint"))')
rm -rf "$work/src" && cp -r "$(dirname "$manifest")" "$work/src"
chmod -R u+w "$work/src"
binary=$(cd "$work/src" && RUSTFLAGS='--cfg dsql_cluster' CARGO_TARGET_DIR="$work/target" \
    cargo test --locked --quiet --test dsql_cluster_test --no-run --message-format json \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "dsql_cluster_test":
        print(m["executable"])')

# An emulator of its own, on a free port.
env_file="$work/emulator.env"
rm -f "$env_file"
AWS_ACCESS_KEY_ID=AKIDDSQLLINTSUITE AWS_SECRET_ACCESS_KEY=dsql-lint-suite-secret AWS_SESSION_TOKEN= \
    "$emulator" --port 0 --env-file "$env_file" --exit-with-parent > "$work/emulator.log" 2>&1 &
emulator_pid=$!
trap 'kill "$emulator_pid" 2>/dev/null || true; wait "$emulator_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    [ -s "$env_file" ] && grep -q "DSQL_EMULATOR_PID='$emulator_pid'" "$env_file" && break
    kill -0 "$emulator_pid" 2>/dev/null || { cat "$work/emulator.log"; exit 1; }
    sleep 0.1
done
# shellcheck disable=SC1090
. "$env_file"

# The `aws` the suite calls: a token (`dsql generate-db-connect-admin-auth-token`) and an
# account (`sts get-caller-identity --query Account`).
cat > "$work/bin/aws" <<EOF
#!/usr/bin/env bash
case "\$1 \$2" in
    "dsql generate-db-connect-admin-auth-token")
        host=""; region=""
        while [ \$# -gt 0 ]; do
            case "\$1" in --hostname) host=\$2; shift ;; --region) region=\$2; shift ;; esac
            shift
        done
        CLUSTER_ENDPOINT=\$host AWS_REGION=\$region AWS_ACCESS_KEY_ID=AKIDDSQLLINTSUITE \\
            AWS_SECRET_ACCESS_KEY=dsql-lint-suite-secret exec "$emulator" token ;;
    "sts get-caller-identity") echo 123456789012 ;;
    *) echo "aws stand-in: \$* is not stood in for" >&2; exit 2 ;;
esac
EOF
# The psql the suite calls with PGPORT=5432: the emulator's port and address instead.
cat > "$work/bin/psql" <<EOF
#!/usr/bin/env bash
PGPORT=$PGPORT PGHOSTADDR=$PGHOSTADDR exec "$real_psql" "\$@"
EOF
chmod +x "$work/bin/aws" "$work/bin/psql"

PATH="$work/bin:$PATH" DSQL_ENDPOINT="$CLUSTER_ENDPOINT" DSQL_REGION="$AWS_REGION" \
    "$binary" --test-threads 1
