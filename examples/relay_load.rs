//! What the emulator costs a Rust test suite: a load generator in the style of pgbench
//! (`benches/relay/run.sh` runs it after pgbench's table), its clients on one tokio runtime,
//! against one PostgreSQL five ways, alternated in short rounds:
//!
//! - `direct`: straight to the server over TLS (`tokio-postgres`, rustls);
//! - `relay` / `rules`: through an emulator in this process on its own thread (the default,
//!   what a suite-wide emulator does), without and with DSQL's SQL rules;
//! - `relay in-process` / `rules in-process`: the same emulators relaying on the clients'
//!   runtime ([`DsqlEmulatorBuilder::relay_on`]), as an emulator started by the test that
//!   uses it can.
//!
//! For each script (a keyed read, a four-statement transaction, an autocommit write), protocol
//! (simple: literal text; extended: prepared statements) and client count, it prints direct's
//! median throughput and the median over rounds of each path's throughput divided by direct's
//! in the same round; with 1 client also the median latency each path adds per statement.
//! Conflicts (`40001`, the rules' first committer wins) are retried, as pgbench's
//! `--max-tries` does; only completed transactions count.
//!
//! ```text
//! cargo run --release --example relay_load -- --port 5432 --ca ca.pem \
//!     --upstream 'postgresql://admin@/postgres?host=/run/pg&port=5432&sslmode=disable' \
//!     [--host localhost] [--rounds 20] [--round-ms 100] [--clients "1 4"] \
//!     [--scripts "read transaction write"] [--protocols "simple extended"] \
//!     [--runtime current|multi]
//! ```
//!
//! The server needs TLS with a certificate for `--host` signed by `--ca`, a superuser `admin`
//! trusted without a password, and `CREATE TABLE t (k int PRIMARY KEY, v int NOT NULL)` with
//! rows 1 to 1000 (`benches/relay/run.sh` sets all of that up). `--runtime current` (the
//! default) is what `#[tokio::test]` gives a test; `multi` is two worker threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, Statement};
use tokio_postgres_dsql::emulator::{DsqlEmulator, DsqlEmulatorBuilder};
use tokio_postgres_dsql::{DsqlConnector, DsqlTls};

type Error = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: relay_load --port PORT --ca CA.pem --upstream URL [--host NAME] \
[--rounds N] [--round-ms MS] [--clients \"1 4\"] [--scripts \"read transaction write\"] \
[--protocols \"simple extended\"] [--runtime current|multi]";

/// The paths, in the table's order; the first is the baseline.
const PATHS: [&str; 5] = [
    "direct",
    "relay",
    "rules",
    "relay in-process",
    "rules in-process",
];

#[derive(Debug)]
struct Options {
    host: String,
    port: u16,
    ca: String,
    upstream: String,
    rounds: usize,
    round: Duration,
    clients: Vec<usize>,
    scripts: Vec<Script>,
    protocols: Vec<bool>,
    multi_thread: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Script {
    Read,
    Transaction,
    Write,
}

impl Script {
    fn name(self) -> &'static str {
        match self {
            Script::Read => "read",
            Script::Transaction => "transaction",
            Script::Write => "write",
        }
    }

    /// Statements a transaction of this script sends.
    fn statements(self) -> u32 {
        match self {
            Script::Transaction => 4,
            _ => 1,
        }
    }
}

/// A flag's space-separated values, each read by `one`; `expected` says what they may be.
fn list<T>(
    value: &str,
    flag: &str,
    expected: &str,
    one: impl Fn(&str) -> Option<T>,
) -> Result<Vec<T>, String> {
    value
        .split_whitespace()
        .map(|item| one(item).ok_or_else(|| format!("{flag}: {expected}, not `{item}`")))
        .collect()
}

fn parse() -> Result<Options, String> {
    let mut options = Options {
        host: "localhost".into(),
        port: 0,
        ca: String::new(),
        upstream: String::new(),
        rounds: 20,
        round: Duration::from_millis(100),
        clients: vec![1, 4],
        scripts: vec![Script::Read, Script::Transaction, Script::Write],
        protocols: vec![false, true],
        multi_thread: false,
    };
    let mut args = std::env::args_os().skip(1).map(|arg| {
        arg.into_string()
            .map_err(|arg| format!("not UTF-8: {}", arg.to_string_lossy()))
    });
    while let Some(flag) = args.next() {
        let flag = flag?;
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.to_owned());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))??;
        let number = |what: &str, max: u64| -> Result<u64, String> {
            match value.parse::<u64>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(format!("{what}: a number from 1 to {max}, not `{value}`")),
            }
        };
        match flag.as_str() {
            "--host" => options.host = value.clone(),
            "--port" => options.port = number("--port", 65_535)? as u16,
            "--ca" => options.ca = value.clone(),
            "--upstream" => options.upstream = value.clone(),
            "--rounds" => options.rounds = number("--rounds", 1_000_000)? as usize,
            "--round-ms" => options.round = Duration::from_millis(number("--round-ms", 60_000)?),
            "--clients" => {
                // (Five paths open as many connections each.)
                options.clients = list(&value, "--clients", "numbers from 1 to 32", |c| {
                    c.parse::<usize>().ok().filter(|n| (1..=32).contains(n))
                })?;
            }
            "--scripts" => {
                options.scripts =
                    list(
                        &value,
                        "--scripts",
                        "read, transaction or write",
                        |s| match s {
                            "read" => Some(Script::Read),
                            "transaction" => Some(Script::Transaction),
                            "write" => Some(Script::Write),
                            _ => None,
                        },
                    )?;
            }
            "--protocols" => {
                options.protocols =
                    list(&value, "--protocols", "simple or extended", |p| match p {
                        "simple" => Some(false),
                        "extended" => Some(true),
                        _ => None,
                    })?;
            }
            "--runtime" => {
                options.multi_thread = match value.as_str() {
                    "current" => false,
                    "multi" => true,
                    _ => return Err(format!("--runtime: current or multi, not `{value}`")),
                }
            }
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    for (missing, flag) in [
        (options.port == 0, "--port"),
        (options.ca.is_empty(), "--ca"),
        (options.upstream.is_empty(), "--upstream"),
    ] {
        if missing {
            return Err(format!("{flag} is required\n{USAGE}"));
        }
    }
    if options.clients.is_empty() || options.scripts.is_empty() || options.protocols.is_empty() {
        return Err(format!(
            "--clients, --scripts and --protocols need a value each\n{USAGE}"
        ));
    }
    Ok(options)
}

/// One client connection with its prepared statements.
struct Session {
    client: Client,
    read: Statement,
    write: Statement,
    begin: Statement,
    commit: Statement,
}

impl Session {
    async fn new(client: Client) -> Result<Session, Error> {
        Ok(Session {
            read: client.prepare("SELECT v FROM t WHERE k = $1").await?,
            write: client
                .prepare("UPDATE t SET v = v + 1 WHERE k = $1")
                .await?,
            begin: client.prepare("BEGIN").await?,
            commit: client.prepare("COMMIT").await?,
            client,
        })
    }

    /// One transaction of `script`, retried on `40001` (at most `MAX_TRIES` times, as
    /// pgbench's `--max-tries 100` in `run.sh`).
    async fn run(&self, script: Script, extended: bool, k: i32) -> Result<(), Error> {
        const MAX_TRIES: u32 = 100;
        for _ in 0..MAX_TRIES {
            match self.once(script, extended, k).await {
                Err(error)
                    if error.code()
                        == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE) =>
                {
                    if script == Script::Transaction {
                        // (The block may still be open: a conflict reported before COMMIT.)
                        let _ = self.client.simple_query("ROLLBACK").await;
                    }
                }
                other => return other.map_err(Into::into),
            }
        }
        Err(format!(
            "a {} transaction met 40001 {MAX_TRIES} times",
            script.name()
        )
        .into())
    }

    async fn once(
        &self,
        script: Script,
        extended: bool,
        k: i32,
    ) -> Result<(), tokio_postgres::Error> {
        let c = &self.client;
        match (script, extended) {
            (Script::Read, false) => {
                c.simple_query(&format!("SELECT v FROM t WHERE k = {k}"))
                    .await?;
            }
            (Script::Read, true) => {
                c.query(&self.read, &[&k]).await?;
            }
            (Script::Write, false) => {
                c.simple_query(&format!("UPDATE t SET v = v + 1 WHERE k = {k}"))
                    .await?;
            }
            (Script::Write, true) => {
                c.execute(&self.write, &[&k]).await?;
            }
            (Script::Transaction, false) => {
                c.simple_query("BEGIN").await?;
                c.simple_query(&format!("UPDATE t SET v = v + 1 WHERE k = {k}"))
                    .await?;
                c.simple_query(&format!("SELECT v FROM t WHERE k = {k}"))
                    .await?;
                c.simple_query("COMMIT").await?;
            }
            (Script::Transaction, true) => {
                c.execute(&self.begin, &[]).await?;
                c.execute(&self.write, &[&k]).await?;
                c.query(&self.read, &[&k]).await?;
                c.execute(&self.commit, &[]).await?;
            }
        }
        Ok(())
    }
}

/// Runs `script` on `sessions` for `round`: completed transactions and, per transaction, its
/// latency.
async fn round(
    sessions: &[Arc<Session>],
    script: Script,
    extended: bool,
    round: Duration,
    seed: u64,
) -> Result<(u64, Vec<Duration>), Error> {
    let deadline = Instant::now() + round;
    let tasks: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(i, session)| {
            let session = session.clone();
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(i as u64));
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let started = Instant::now();
                    session.run(script, extended, rng.i32(1..=1000)).await?;
                    latencies.push(started.elapsed());
                }
                Ok::<_, Error>(latencies)
            })
        })
        .collect();
    let mut done = 0;
    let mut latencies = Vec::new();
    for task in tasks {
        let mut mine = task.await??;
        done += mine.len() as u64;
        latencies.append(&mut mine);
    }
    Ok((done, latencies))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The application's default rustls provider if installed, else the crate feature's.
fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    if let Some(provider) = rustls::crypto::CryptoProvider::get_default() {
        return provider.clone();
    }
    #[cfg(feature = "aws-lc-rs")]
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
    let provider = rustls::crypto::ring::default_provider();
    Arc::new(provider)
}

async fn connect_direct(options: &Options) -> Result<Client, Error> {
    let ca = &options.ca;
    let pem = std::fs::read(ca).map_err(|e| format!("--ca {ca}: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    {
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("--ca {ca}: {e}"))?;
            roots.add(cert).map_err(|e| format!("--ca {ca}: {e}"))?;
        }
    }
    if roots.is_empty() {
        return Err(format!("--ca {ca}: no PEM certificate in it").into());
    }
    let config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = format!("--host {} --port {}", options.host, options.port);
    let (client, connection) = tokio_postgres::Config::new()
        .host(&options.host)
        .hostaddr(std::net::Ipv4Addr::LOCALHOST.into())
        .port(options.port)
        .user("admin")
        .dbname("postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect(DsqlTls::new(Arc::new(config)))
        .await
        .map_err(|e| format!("direct to {server}: {e}"))?;
    tokio::spawn(connection);
    Ok(client)
}

async fn measure(options: Options) -> Result<(), Error> {
    let emulator = |rules: bool| -> DsqlEmulatorBuilder {
        DsqlEmulator::builder()
            .upstream_url(options.upstream.clone())
            .sql_rules(rules)
            .connection_rate_limit(100_000.0, 100_000)
    };
    let here = tokio::runtime::Handle::current();
    let upstream = |e: tokio_postgres_dsql::emulator::EmulatorError| {
        format!("an emulator over --upstream: {e}")
    };
    let emulators = [
        emulator(false).start().await.map_err(upstream)?,
        emulator(true).start().await.map_err(upstream)?,
        emulator(false)
            .relay_on(here.clone())
            .start()
            .await
            .map_err(upstream)?,
        emulator(true)
            .relay_on(here)
            .start()
            .await
            .map_err(upstream)?,
    ];
    let most = options.clients.iter().copied().max().unwrap_or(1);
    let mut paths: Vec<Vec<Arc<Session>>> = Vec::new();
    for path in 0..PATHS.len() {
        let mut sessions = Vec::new();
        for _ in 0..most {
            let client = match path {
                0 => connect_direct(&options).await?,
                _ => {
                    let config = emulators[path - 1].config_for("admin").build()?;
                    DsqlConnector::new(config).await?.connect().await?
                }
            };
            sessions.push(Arc::new(Session::new(client).await?));
        }
        paths.push(sessions);
    }

    println!(
        "{} rounds of {} ms each, alternated ({}); clients on a {} runtime; {}",
        options.rounds,
        options.round.as_millis(),
        PATHS.join(", "),
        if options.multi_thread {
            "multi-thread (2 workers)"
        } else {
            "current-thread"
        },
        paths[0][0]
            .client
            .query_one("SELECT version()", &[])
            .await?
            .get::<_, String>(0)
            .split(" on ")
            .next()
            .unwrap_or_default(),
    );
    println!(
        "| script | protocol | clients | direct tps | {} | added p50 per statement ({}) |",
        PATHS[1..].join(" | "),
        PATHS[1..].join(", ")
    );
    println!("|---|---|---|---|{}---|", "---|".repeat(PATHS.len() - 1));
    let mut seed = 1;
    for &script in &options.scripts {
        for &extended in &options.protocols {
            for &clients in &options.clients {
                let mut tps = vec![Vec::new(); PATHS.len()];
                let mut ratios = vec![Vec::new(); PATHS.len()];
                let mut latencies = vec![Vec::new(); PATHS.len()];
                // One round each to warm up (caches, the rules' statement shapes), not counted.
                for sessions in &paths {
                    round(&sessions[..clients], script, extended, options.round, 0).await?;
                }
                for r in 0..options.rounds {
                    let mut done = vec![0.0; PATHS.len()];
                    // The order turns each round, so that no path always follows another.
                    for step in 0..PATHS.len() {
                        let path = (r + step) % PATHS.len();
                        seed += 1;
                        let (count, mut times) = round(
                            &paths[path][..clients],
                            script,
                            extended,
                            options.round,
                            seed,
                        )
                        .await?;
                        done[path] = count as f64;
                        latencies[path].append(&mut times);
                    }
                    for path in 0..PATHS.len() {
                        tps[path].push(done[path] / options.round.as_secs_f64());
                        ratios[path].push(done[path] / done[0].max(1.0));
                    }
                }
                let added = if clients == 1 {
                    let mut p50 = latencies
                        .iter_mut()
                        .map(|times| {
                            let mut micros: Vec<f64> =
                                times.iter().map(|t| t.as_secs_f64() * 1e6).collect();
                            median(&mut micros)
                        })
                        .collect::<Vec<_>>();
                    let direct = p50[0];
                    p50.iter_mut()
                        .skip(1)
                        .map(|p| {
                            format!("{:.0} µs", (*p - direct) / f64::from(script.statements()))
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                } else {
                    "–".to_owned()
                };
                let cells: Vec<String> = ratios
                    .iter_mut()
                    .skip(1)
                    .map(|r| format!("{:.2}×", median(r)))
                    .collect();
                println!(
                    "| {} | {} | {clients} | {:.0} | {} | {added} |",
                    script.name(),
                    if extended { "extended" } else { "simple" },
                    median(&mut tps[0]),
                    cells.join(" | "),
                );
            }
        }
    }
    Ok(())
}

fn main() {
    let options = match parse() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let mut runtime = if options.multi_thread {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(2);
        builder
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start a runtime: {error}");
            std::process::exit(1);
        }
    };
    if let Err(error) = runtime.block_on(measure(options)) {
        eprintln!("relay_load: {error}");
        std::process::exit(1);
    }
}
