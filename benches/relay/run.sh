#!/usr/bin/env bash
# What the emulator costs a test suite: pgbench (PostgreSQL's own benchmark client) against one
# PostgreSQL several ways, interleaved round by round:
#   direct  - straight to the server, over TLS;
#   relay   - through `dsql-emulator --no-sql-rules` (TLS, IAM token, the relay alone);
#   rules   - through `dsql-emulator` with DSQL's SQL rules (what a test suite uses);
#   polled  - the same with `--busy-poll 1000` (the relay polls its sockets for 1 ms after
#             bytes move instead of sleeping at once);
#   bytes   - when `socat` is installed: through a byte relay with no logic at all (socat,
#             TLS passed through to the server): what the extra process hop alone costs on
#             this machine, the floor for any relay in a process of its own that sleeps.
# Then, when the Rust load generator is built (examples/relay_load.rs: `cargo build --release
# --example relay_load`), a third table from it: its clients on one tokio runtime (what
# `#[tokio::test]` gives), the same scripts straight to the server over TLS, through an
# emulator in its process on the emulator's own thread, and through one relaying on the
# clients' runtime (`DsqlEmulatorBuilder::relay_on`), without and with the SQL rules,
# alternated in rounds of 100 ms (rounds × seconds × 2 of them per path and row: a tenth of
# pgbench's time).
# For each pgbench script (a read, a transaction, an autocommit write), protocol (simple,
# extended) and client count it prints direct's median tps and the median, over rounds, of each
# path's tps divided by direct's in the same round; at 1 client also the median latency each path
# adds per statement. A second table says where the machine's time went on each path (Linux's
# /proc/stat over each pgbench run, all processes): CPU time per statement (the machine's, and
# the emulator process's own), the share of the CPUs' time spent idle (a CPU with nothing
# runnable, its processes waiting on others), and the share the hypervisor took (steal: a busy
# host makes every path slower and the ratios noisier).
#
#   bash benches/relay/run.sh [--rounds N] [--seconds S] [--clients "1 4"] [--quick]
#                             [--scripts "read transaction write"] [--protocols "simple extended"]
#                             [--upstream-socket unix|tcp]
#
# For a profile of one path, run a part of it under perf, e.g. `perf record -a -g -- bash
# benches/relay/run.sh --scripts write --protocols simple --clients 4 --rounds 1 --seconds 10`,
# then `perf report --comm dsql-emulator` (the emulators' threads).
#
# Environment: DSQL_EMULATOR (default target/release/dsql-emulator; build it with
# `cargo build --release --features emulator --bin dsql-emulator`), RELAY_LOAD (default
# target/release/examples/relay_load; the third table is skipped without it), PG_BIN (the server's bin
# directory; default the newest /usr/lib/postgresql/*/bin), PGBENCH (default pgbench on PATH, in
# PG_BIN or in /usr/lib/postgresql/*/bin). `--quick` runs every row once for a second (about a
# minute in all): a check that the harness works, not a measurement. The rules path runs as
# DSQL does (REPEATABLE READ, conflicts at COMMIT): pgbench retries its 40001s (`--max-tries`).
set -euo pipefail
cd "$(dirname "$0")/../.."

rounds=5 seconds=2 clients="1 4" scripts="read transaction write" protocols="simple extended"
upstream_socket=unix
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift ;;
        --seconds) seconds=$2; shift ;;
        --clients) clients=$2; shift ;;
        --scripts) scripts=$2; shift ;;
        --protocols) protocols=$2; shift ;;
        --upstream-socket) upstream_socket=$2; shift ;;
        --quick) rounds=1 seconds=1 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

emulator=${DSQL_EMULATOR:-$PWD/target/release/dsql-emulator}
relay_load=${RELAY_LOAD:-$PWD/target/release/examples/relay_load}
if [ -n "${RELAY_LOAD:-}" ] && [ ! -x "$RELAY_LOAD" ]; then
    echo "missing: $RELAY_LOAD (RELAY_LOAD)" >&2; exit 1
fi
newest_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
pg_bin=${PG_BIN:-$newest_bin}
pgbench=${PGBENCH:-$(command -v pgbench || true)}
if [ -z "$pgbench" ]; then
    for candidate in "$pg_bin/pgbench" $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -d "$candidate" ] && candidate="$candidate/pgbench"
        [ -x "$candidate" ] && { pgbench=$candidate; break; }
    done
fi
for tool in "$emulator" "$pg_bin/initdb" "$pg_bin/postgres" "$pgbench"; do
    [ -x "$tool" ] || { echo "missing: $tool" >&2; exit 1; }
done
command -v openssl >/dev/null || { echo "missing: openssl" >&2; exit 1; }

work="$PWD/target/relay-bench"
as_server=()
if [ "$(id -u)" -eq 0 ]; then
    user=$(getent passwd postgres >/dev/null && echo postgres || echo nobody)
    as_server=(runuser -u "$user" --)
fi
# (A server an interrupted run left behind is stopped first.)
if [ -f "$work/pg/postmaster.pid" ]; then
    "${as_server[@]}" "$pg_bin/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true
fi
rm -rf "$work" && mkdir -p "$work"
[ "${#as_server[@]}" -eq 0 ] || chown "$user" "$work"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -f "$work/pg/postmaster.pid" ]; then
        "${as_server[@]}" "$pg_bin/pg_ctl" -D "$work/pg" -m fast stop >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

# The server, with TLS, trusting local connections (the benchmark measures paths, not auth).
# Its certificate (for `localhost`) is signed by a CA of the run's own, which the Rust load
# generator trusts (rustls takes no self-signed server certificate).
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${as_server[@]}" "$pg_bin/initdb" -D "$work/pg" -U admin -A trust >/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=relay-bench-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout "$work/server.key" \
    -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n' > "$work/server.ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -CAcreateserial -days 1 -extfile "$work/server.ext" -out "$work/pg/server.crt" 2>/dev/null
install -m 600 "$work/server.key" "$work/pg/server.key"
rm -f "$work/ca.key" "$work/server.key"
[ "${#as_server[@]}" -eq 0 ] || chown "$user" "$work/pg/server.crt" "$work/pg/server.key"
cat >> "$work/pg/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$work'
max_connections = 200
ssl = on
fsync = off
synchronous_commit = off
full_page_writes = off
autovacuum = off
EOF
"${as_server[@]}" "$pg_bin/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w start >/dev/null

direct_env="PGHOST=127.0.0.1 PGPORT=$port PGUSER=admin PGDATABASE=postgres PGSSLMODE=require"
# shellcheck disable=SC2086
env -u PGHOSTADDR -u PGSSLROOTCERT -u PGPASSWORD $direct_env psql -qX -v ON_ERROR_STOP=1 -c \
    "CREATE TABLE t (k int PRIMARY KEY, v int NOT NULL);
     INSERT INTO t SELECT k, 0 FROM generate_series(1, 1000) k"

# The two emulators, relaying to that server's own database.
case "$upstream_socket" in
    unix) upstream="postgresql://admin@/postgres?host=$work&port=$port&sslmode=disable" ;;
    tcp) upstream="postgresql://admin@127.0.0.1:$port/postgres?sslmode=disable" ;;
    *) echo "--upstream-socket: unix or tcp, not $upstream_socket" >&2; exit 2 ;;
esac
key=AKIDRELAYBENCH secret=relay-bench-secret
declare -A emulator_pid
start_emulator() { # name, extra options...
    local name=$1; shift
    AWS_SESSION_TOKEN= "$emulator" --upstream "$upstream" \
        --keep-upstream-database --port 0 --access-key-id "$key" --secret-access-key "$secret" \
        --max-connections 1000 --rate-limit 100000/100000 --exit-with-parent \
        --env-file "$work/$name.env" "$@" > "$work/$name.log" 2>&1 &
    pids+=($!)
    emulator_pid[$name]=$!
    for _ in $(seq 1 300); do
        [ -s "$work/$name.env" ] && break
        sleep 0.1
    done
    [ -s "$work/$name.env" ] || { cat "$work/$name.log"; exit 1; }
}
start_emulator relay --no-sql-rules
start_emulator rules
start_emulator polled --busy-poll 1000
# The byte relay (optional): socat, a process per connection, TLS end to end.
socat_port=
if command -v socat >/dev/null; then
    socat_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    socat TCP-LISTEN:"$socat_port",bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.1:"$port" \
        > "$work/socat.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $socat_port), 1).close()" \
            2>/dev/null && break
        sleep 0.05
    done
fi
through() { # name -> the env assignments for pgbench through that emulator (a fresh token)
    (
        # shellcheck disable=SC1090
        . "$work/$1.env"
        token=$(AWS_SECRET_ACCESS_KEY=$secret AWS_SESSION_TOKEN= "$emulator" token)
        echo "PGHOST=$PGHOST PGHOSTADDR=$PGHOSTADDR PGPORT=$PGPORT PGUSER=admin PGDATABASE=postgres \
PGSSLMODE=verify-full PGSSLROOTCERT=$PGSSLROOTCERT PGPASSWORD=$token"
    )
}

cat > "$work/read.sql" <<'EOF'
\set k random(1, 1000)
SELECT v FROM t WHERE k = :k;
EOF
cat > "$work/transaction.sql" <<'EOF'
\set k random(1, 1000)
BEGIN;
UPDATE t SET v = v + 1 WHERE k = :k;
SELECT v FROM t WHERE k = :k;
COMMIT;
EOF
cat > "$work/write.sql" <<'EOF'
\set k random(1, 1000)
UPDATE t SET v = v + 1 WHERE k = :k;
EOF
declare -A statements=([read]=1 [transaction]=4 [write]=1)

# One pgbench run: "<tps> <median latency in µs>".
bench() { # path, script, protocol, clients
    local path=$1 script=$2 protocol=$3 c=$4 env
    case "$path" in
        direct) env=$direct_env ;;
        bytes) env="PGHOST=127.0.0.1 PGPORT=$socat_port PGUSER=admin PGDATABASE=postgres PGSSLMODE=require" ;;
        *) env=$(through "$path") ;;
    esac
    rm -f "$work"/log.*
    local before after own=${emulator_pid[$path]:-}
    before=$(cpu_ticks "$own")
    # shellcheck disable=SC2086
    env -u PGHOSTADDR -u PGSSLROOTCERT -u PGPASSWORD $env "$pgbench" -n -f "$work/$script.sql" -M "$protocol" -c "$c" -j "$c" -T "$seconds" \
        --max-tries 100 -l --log-prefix "$work/log" > "$work/out" 2>&1 \
        || { cat "$work/out" >&2; exit 1; }
    after=$(cpu_ticks "$own")
    local tps p50 done
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$work/out" | head -1)
    done=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$work/out" | head -1)
    # (Only transactions that completed: a failed one's latency field says `failed`.)
    p50=$(cat "$work"/log.* | awk '$3 ~ /^[0-9]+$/ {print $3}' | sort -n \
        | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    if ! awk -v t="${tps:-0}" 'BEGIN {exit !(t > 0)}' || [ -z "$p50" ]; then
        echo "pgbench through $path ($script, $protocol, $c clients) completed nothing:" >&2
        cat "$work/out" >&2
        return 1
    fi
    # CPU µs per statement, idle %, steal %, the emulator's own CPU µs per statement (dashes
    # without /proc/stat; the last a dash on the paths without an emulator).
    local cpu
    cpu=$(awk -v b="$before" -v a="$after" -v n="${done:-0}" -v per="${statements[$script]}" \
        -v hz="$clock_ticks" 'BEGIN {
            split(b, x); split(a, y); busy = y[1] - x[1]; idle = y[2] - x[2]; steal = y[3] - x[3]
            all = busy + idle + steal
            if (b == "" || n == 0 || all == 0) { print "- - - -"; exit }
            per_statement = 1e6 / hz / (n * per)
            printf "%.1f %.1f %.1f ", busy * per_statement, 100 * idle / all, 100 * steal / all
            if (4 in x && 4 in y) printf "%.1f", (y[4] - x[4]) * per_statement; else printf "-"
        }')
    echo "$tps $p50 $cpu"
}
# The machine's CPU ticks so far: busy (user, nice, system, irq, softirq), idle (idle, iowait),
# steal, and with a pid that process's own (user and system); empty without /proc/stat.
cpu_ticks() { # [pid]
    [ -r /proc/stat ] || return 0
    local machine
    machine=$(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $5 + $6, $9; exit}' /proc/stat)
    if [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ]; then
        # (Fields after the command name, which ends at the last parenthesis.)
        echo "$machine $(sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}')"
    else
        echo "$machine"
    fi
}
clock_ticks=$(getconf CLK_TCK 2>/dev/null || echo 100)
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

printf '%s rounds of %s s each, interleaved (direct, relay, rules, rules polling%s); relays upstream over %s; pgbench %s; %s\n' \
    "$rounds" "$seconds" "$([ -z "$socat_port" ] || echo ', socat')" "$upstream_socket" "$("$pgbench" --version | awk '{print $3}')" "$("$pg_bin/postgres" --version)"
printf '| script | protocol | clients | direct tps | relay | relay + rules | rules, busy poll 1 ms | byte relay (socat) | added p50 per statement (relay, rules, polling, socat) |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
paths="direct relay rules polled"
[ -z "$socat_port" ] || paths="$paths bytes"
: > "$work/machine.table"
for script in $scripts; do
    for protocol in $protocols; do
        for c in $clients; do
            for path in $paths; do
                for what in tps ratio added cpu idle steal own; do : > "$work/$path.$what"; done
            done
            n=${statements[$script]}
            for _ in $(seq 1 "$rounds"); do
                for path in $paths; do
                    out=$(bench "$path" "$script" "$protocol" "$c") || exit 1
                    read -r tps p50 cpu idle steal own <<< "$out"
                    [ "$path" != direct ] || { d_tps=$tps d_p50=$p50; }
                    echo "$tps" >> "$work/$path.tps"
                    awk -v a="$tps" -v b="$d_tps" 'BEGIN {print a / b}' >> "$work/$path.ratio"
                    awk -v a="$p50" -v b="$d_p50" -v n="$n" 'BEGIN {print (a - b) / n}' >> "$work/$path.added"
                    if [ "$cpu" != - ]; then
                        echo "$cpu" >> "$work/$path.cpu"; echo "$idle" >> "$work/$path.idle"
                        echo "$steal" >> "$work/$path.steal"
                        [ "$own" = - ] || echo "$own" >> "$work/$path.own"
                    fi
                done
            done
            bytes="–" added="–"
            [ -z "$socat_port" ] || bytes=$(printf '%.2f×' "$(median < "$work/bytes.ratio")")
            if [ "$c" = 1 ]; then
                added=$(printf '%.0f µs, %.0f µs, %.0f µs' "$(median < "$work/relay.added")" \
                    "$(median < "$work/rules.added")" "$(median < "$work/polled.added")")
                [ -z "$socat_port" ] || added="$added, $(printf '%.0f µs' "$(median < "$work/bytes.added")")"
            fi
            printf '| %s | %s | %s | %.0f | %.2f× | %.2f× | %.2f× | %s | %s |\n' "$script" "$protocol" "$c" \
                "$(median < "$work/direct.tps")" "$(median < "$work/relay.ratio")" \
                "$(median < "$work/rules.ratio")" "$(median < "$work/polled.ratio")" "$bytes" "$added"
            if [ -s "$work/direct.cpu" ]; then
                cpu= idle= steal= own=
                for path in $paths; do
                    cpu="$cpu${cpu:+ / }$(printf '%.0f' "$(median < "$work/$path.cpu")")"
                    idle="$idle${idle:+ / }$(printf '%.0f' "$(median < "$work/$path.idle")")"
                    steal="$steal${steal:+ / }$(printf '%.0f' "$(median < "$work/$path.steal")")"
                done
                for path in relay rules polled; do
                    if [ -s "$work/$path.own" ]; then
                        own="$own${own:+ / }$(printf '%.0f' "$(median < "$work/$path.own")")"
                    else
                        own="$own${own:+ / }–"
                    fi
                done
                printf '| %s | %s | %s | %s µs | %s µs | %s %% | %s %% |\n' "$script" "$protocol" \
                    "$c" "$cpu" "$own" "$idle" "$steal" >> "$work/machine.table"
            fi
        done
    done
done
if [ -s "$work/machine.table" ]; then
    printf '\nWhere the machine'"'"'s time went (medians over rounds; direct / relay / rules / polling%s):\n' \
        "$([ -z "$socat_port" ] || echo ' / socat')"
    printf '| script | protocol | clients | CPU per statement | the emulator'"'"'s own (relay / rules / polling) | CPUs idle | steal |\n'
    printf '|---|---|---|---|---|---|---|\n'
    cat "$work/machine.table"
fi

# The Rust load generator's table.
echo
if [ -x "$relay_load" ]; then
    "$relay_load" --port "$port" --ca "$work/ca.pem" --upstream "$upstream" \
        --rounds $((rounds * seconds * 2)) --round-ms 100 --clients "$clients" \
        --scripts "$scripts" --protocols "$protocols"
else
    echo "(No Rust load generator at $relay_load: \`cargo build --release --example relay_load\` adds its table.)"
fi
