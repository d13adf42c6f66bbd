//! `dsql-emulator`: a local Aurora DSQL endpoint for any language's tests (feature `emulator`).
//!
//! ```sh
//! cargo install --locked tokio-postgres-dsql --features emulator
//! dsql-emulator --port 0 --env-file /tmp/dsql.env --exit-with-parent & pid=$!
//! until grep -qs "DSQL_EMULATOR_PID='$pid'" /tmp/dsql.env; do sleep 0.1; done   # ready
//! . /tmp/dsql.env && PGPASSWORD="$(dsql-emulator token)" psql -c 'SELECT 1'
//! ```
//!
//! Run `dsql-emulator --help` for the options. Clients sign tokens with the credentials it
//! accepts (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` from the environment or the flags, else
//! a generated pair it prints), connect to its port with the endpoint name as TLS server name
//! (`PGHOST` + `PGHOSTADDR` for libpq) and trust its CA (`PGSSLROOTCERT`). It stops cleanly on
//! SIGTERM or SIGINT, with nothing left running.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use tokio_postgres_dsql::emulator::{DsqlEmulator, DsqlEmulatorBuilder, SharedPostgres};
use tokio_postgres_dsql::{Action, TokenSigner};

mod control;

/// What `--version` prints.
const VERSION: &str = concat!("dsql-emulator ", env!("CARGO_PKG_VERSION"));

/// The endpoint when none is given: fixed, so CI configuration can name it.
const DEFAULT_CLUSTER_ID: &str = "dsqlemulator00000000000000";
const DEFAULT_REGION: &str = "us-east-1";

const USAGE: &str = "\
dsql-emulator: a local Aurora DSQL endpoint (TLS, IAM tokens, DSQL's SQL rules) in front of a
private PostgreSQL.

USAGE:
    dsql-emulator [OPTIONS]            run until SIGTERM or SIGINT
    dsql-emulator token [--user U]     print a token for the endpoint in the environment
                                       (CLUSTER_ENDPOINT, AWS_REGION, AWS_ACCESS_KEY_ID, ...)

OPTIONS:
    --listen <ip>                address to listen on [default: 127.0.0.1]
    --port <n>                   TCP port, 0 for a free one [default: 5432]
    --endpoint <host>            endpoint name (SNI, certificate, token host)
                                 [default: <cluster-id>.dsql.<region>.on.aws]
    --cluster-id <id>            26 lowercase letters and digits [default: dsqlemulator00000000000000]
    --region <region>            [default: us-east-1, or the endpoint's]
    --access-key-id <key>        accepted credentials [default: $AWS_ACCESS_KEY_ID, else generated]
    --secret-access-key <secret> [default: $AWS_SECRET_ACCESS_KEY]
    --session-token <token>      [default: $AWS_SESSION_TOKEN]
    --iam-identity <key>=<arn>   the IAM identity behind an access key: custom roles connecting
                                 with it must be mapped with AWS IAM GRANT (repeatable)
    --pg-bin <dir>               PostgreSQL server binaries [default: $PG_BIN, PATH,
                                 /usr/lib/postgresql/*/bin]
    --upstream <url>             relay to this PostgreSQL instead of starting one (its role
                                 `admin` must be a superuser), in a database of the run's own
                                 (created at start, dropped at exit)
    --keep-upstream-database     with --upstream and no --control-port: relay to its `postgres`
                                 database itself, whose tables and rows outlive the run
    --pair                       also start the peered endpoint of a multi-Region cluster
                                 (us-east-2 unless --peer-region), on --peer-port [default: free]
    --peer-port <n>
    --peer-region <region>
    --rate-limit <per-second>[/<burst>]  new connections [default: 100/1000, as DSQL]
    --max-connections <n>        open connections [default: 10000, as DSQL]
    --max-age <seconds>          connection age limit [default: 3600, as DSQL]
    --transaction-age-limit <seconds>    [default: 300, as DSQL]
    --index-build-delay <milliseconds>   how long an ASYNC index build's job stays
                                 `submitted` [default: 0; DSQL's take seconds]
    --no-sql-rules               relay SQL unchanged (DSQL's connection rules still apply)
    --threads <n>                threads relaying connections, 1 to 64 [default: 1 with at
                                 most two CPUs or with --busy-poll, else 2]
    --busy-poll <microseconds>   after bytes move, keep polling the sockets that long before
                                 sleeping, 0 to 1000000 [default: 0, off]: faster sequential
                                 statements where waking a CPU is slow (VMs), at the price of
                                 a CPU that does not idle while a client is active; relays on
                                 one thread (not with --threads above 1)
    --env-file <path>            write the `export` lines there (once ready, mode 0600) instead
                                 of stdout; a file left there is removed at start
    --control-port <n>           serve the control port there (0: a free one): faults, injected
                                 conflicts and per-test endpoints over HTTP, for any language
                                 (exports DSQL_EMULATOR_CONTROL and DSQL_EMULATOR_CONTROL_TOKEN;
                                 every endpoint, the main one too, gets a database of its own)
    --exit-with-parent           stop (cleanly) when the process that started it dies, even
                                 by SIGKILL (Linux; strictly: when the thread that started it
                                 ends, so start it from a thread that lives as long as the run)
    --exit-on-stdin-close        stop (cleanly) when its standard input reaches its end
    -V, --version                print the version
    -h, --help

On start it prints `export` lines (CLUSTER_ENDPOINT, AWS_REGION, PGHOST, PGHOSTADDR, PGPORT,
PGSSLMODE, PGSSLROOTCERT, ..., DSQL_EMULATOR_PID) and then `# dsql-emulator ready ...`, which
names the access key it accepts and whether tokens must carry a session token. A secret access
key is printed only when it was generated here. A helper that waits for the env file should
check that its DSQL_EMULATOR_PID is the process it started.";

#[derive(Debug, Default, Clone)]
struct Options {
    listen: Option<IpAddr>,
    port: Option<u16>,
    endpoint: Option<String>,
    cluster_id: Option<String>,
    region: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
    identities: Vec<(String, String)>,
    pg_bin: Option<PathBuf>,
    upstream: Option<String>,
    pair: bool,
    peer_port: Option<u16>,
    peer_region: Option<String>,
    rate_limit: Option<(f64, u32)>,
    max_connections: Option<usize>,
    threads: Option<usize>,
    busy_poll: Option<u64>,
    max_age: Option<u64>,
    transaction_age_limit: Option<u64>,
    index_build_delay: Option<u64>,
    no_sql_rules: bool,
    env_file: Option<PathBuf>,
    exit_with_parent: bool,
    exit_on_stdin_close: bool,
    control_port: Option<u16>,
    keep_upstream_database: bool,
}

/// An error for the user: what is wrong, naming the flag.
struct Usage(String);

fn parse(args: &[String]) -> Result<Options, Usage> {
    let mut options = Options::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = |what: &str| -> Result<String, Usage> {
            inline
                .clone()
                .or_else(|| args.next().cloned())
                .ok_or_else(|| Usage(format!("{flag} needs {what}")))
        };
        fn number<T: std::str::FromStr>(flag: &str, text: String) -> Result<T, Usage> {
            text.parse()
                .map_err(|_| Usage(format!("{flag}: `{text}` is not a valid number")))
        }
        match flag {
            "-h" | "--help" => return Err(Usage(String::new())),
            "-V" | "--version" => return Err(Usage(VERSION.into())),
            "--listen" => {
                let text = value("an IP address")?;
                options.listen = Some(
                    text.parse()
                        .map_err(|_| Usage(format!("--listen: `{text}` is not an IP address")))?,
                );
            }
            "--port" => options.port = Some(number(flag, value("a port")?)?),
            "--endpoint" => options.endpoint = Some(value("a host name")?),
            "--cluster-id" => options.cluster_id = Some(value("a cluster id")?),
            "--region" => options.region = Some(value("a region")?),
            "--access-key-id" => options.access_key_id = Some(value("a key id")?),
            "--secret-access-key" => options.secret_access_key = Some(value("a secret")?),
            "--session-token" => options.session_token = Some(value("a token")?),
            "--iam-identity" => {
                let text = value("<key>=<arn>")?;
                let (key, arn) = text
                    .split_once('=')
                    .filter(|(key, arn)| !key.is_empty() && arn.starts_with("arn:"))
                    .ok_or_else(|| {
                        Usage(format!(
                            "--iam-identity: `{text}` is not <access key>=<arn>"
                        ))
                    })?;
                options.identities.push((key.to_owned(), arn.to_owned()));
            }
            "--pg-bin" => options.pg_bin = Some(value("a directory")?.into()),
            "--upstream" => options.upstream = Some(value("a connection string")?),
            "--pair" => options.pair = true,
            "--peer-port" => options.peer_port = Some(number(flag, value("a port")?)?),
            "--peer-region" => options.peer_region = Some(value("a region")?),
            "--rate-limit" => {
                let text = value("<per-second>[/<burst>]")?;
                let (rate, burst) = match text.split_once('/') {
                    Some((rate, burst)) => (rate.to_owned(), Some(burst.to_owned())),
                    None => (text.clone(), None),
                };
                let rate: f64 = number(flag, rate)?;
                let burst: u32 = match burst {
                    Some(burst) => number(flag, burst)?,
                    None => (rate.ceil() as u32).max(1),
                };
                options.rate_limit = Some((rate, burst));
            }
            "--max-connections" => {
                options.max_connections = Some(number(flag, value("a number")?)?)
            }
            "--threads" => {
                let threads: usize = number(flag, value("a number")?)?;
                if !(1..=64).contains(&threads) {
                    return Err(Usage(format!("{flag}: {threads} is not between 1 and 64")));
                }
                options.threads = Some(threads);
            }
            "--busy-poll" => {
                let micros: u64 = number(flag, value("microseconds")?)?;
                if micros > 1_000_000 {
                    return Err(Usage(format!(
                        "{flag}: {micros} µs is more than 1000000 (one second)"
                    )));
                }
                options.busy_poll = Some(micros);
            }
            "--max-age" => options.max_age = Some(number(flag, value("seconds")?)?),
            "--transaction-age-limit" => {
                options.transaction_age_limit = Some(number(flag, value("seconds")?)?)
            }
            "--index-build-delay" => {
                options.index_build_delay = Some(number(flag, value("milliseconds")?)?)
            }
            "--no-sql-rules" => options.no_sql_rules = true,
            "--env-file" => options.env_file = Some(value("a path")?.into()),
            "--exit-with-parent" => options.exit_with_parent = true,
            "--control-port" => options.control_port = Some(number(flag, value("a port")?)?),
            "--keep-upstream-database" => options.keep_upstream_database = true,
            "--exit-on-stdin-close" => options.exit_on_stdin_close = true,
            other => {
                return Err(Usage(format!(
                    "unknown option `{other}` (dsql-emulator --help lists them)"
                )));
            }
        }
    }
    if let (Some(micros @ 1..), Some(threads @ 2..)) = (options.busy_poll, options.threads) {
        return Err(Usage(format!(
            "--busy-poll: {micros} µs needs the relay's one thread, not --threads {threads}"
        )));
    }
    if options.endpoint.is_some() && options.cluster_id.is_some() {
        return Err(Usage(
            "--endpoint and --cluster-id name the same thing; give one".into(),
        ));
    }
    if let Some(id) = &options.cluster_id {
        let valid = id.len() == 26
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !valid {
            return Err(Usage(format!(
                "--cluster-id: `{id}` is not 26 lowercase letters and digits"
            )));
        }
    }
    Ok(options)
}

/// The accepted credentials: flags, else the environment; `None`: generate a pair.
fn credentials(options: &Options) -> Result<Option<Credentials>, Usage> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let key = options
        .access_key_id
        .clone()
        .or_else(|| env("AWS_ACCESS_KEY_ID"));
    let secret = options
        .secret_access_key
        .clone()
        .or_else(|| env("AWS_SECRET_ACCESS_KEY"));
    let session = options
        .session_token
        .clone()
        .or_else(|| env("AWS_SESSION_TOKEN"));
    match (key, secret) {
        (Some(key), Some(secret)) => Ok(Some(Credentials::new(
            key,
            secret,
            session,
            None,
            "dsql-emulator",
        ))),
        (None, None) if options.session_token.is_some() => Err(Usage(
            "--session-token without an access key id and secret (--access-key-id and \
             --secret-access-key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
                .into(),
        )),
        (None, None) => Ok(None),
        (Some(_), None) => Err(Usage(
            "an access key id without a secret access key (--secret-access-key or \
             AWS_SECRET_ACCESS_KEY)"
                .into(),
        )),
        (None, Some(_)) => Err(Usage(
            "a secret access key without an access key id (--access-key-id or \
             AWS_ACCESS_KEY_ID)"
                .into(),
        )),
    }
}

/// The endpoint `options` describe; its PostgreSQL is its own unless `shared` is given.
fn builder(
    options: &Options,
    credentials: Option<&Credentials>,
    shared: Option<&SharedPostgres>,
) -> DsqlEmulatorBuilder {
    let region = options.region.clone();
    let endpoint = options.endpoint.clone().unwrap_or_else(|| {
        format!(
            "{}.dsql.{}.on.aws",
            options.cluster_id.as_deref().unwrap_or(DEFAULT_CLUSTER_ID),
            region.as_deref().unwrap_or(DEFAULT_REGION)
        )
    });
    let mut builder = DsqlEmulator::builder()
        .endpoint(endpoint)
        .port(options.port.unwrap_or(5432))
        .sql_rules(!options.no_sql_rules);
    if let Some(region) = region {
        builder = builder.region(region);
    }
    if let Some(credentials) = credentials {
        builder = builder.credentials(credentials.clone());
    }
    if let Some(listen) = options.listen {
        builder = builder.listen_address(listen);
    }
    for (key, arn) in &options.identities {
        builder = builder.iam_identity(key, arn);
    }
    match shared {
        Some(shared) => builder = builder.postgres(shared),
        None => {
            if let Some(dir) = &options.pg_bin {
                builder = builder.pg_bin(dir);
            }
            if let Some(url) = &options.upstream {
                builder = builder.upstream_url(url);
            }
        }
    }
    if let Some((rate, burst)) = options.rate_limit {
        builder = builder.connection_rate_limit(rate, burst);
    }
    if let Some(max) = options.max_connections {
        builder = builder.max_open_connections(max);
    }
    if let Some(threads) = options.threads {
        builder = builder.threads(threads);
    }
    if let Some(micros) = options.busy_poll {
        builder = builder.busy_poll(Duration::from_micros(micros));
    }
    if let Some(age) = options.max_age {
        builder = builder.max_connection_age(Duration::from_secs(age));
    }
    if let Some(limit) = options.transaction_age_limit {
        builder = builder.transaction_age_limit(Duration::from_secs(limit));
    }
    if let Some(delay) = options.index_build_delay {
        builder = builder.index_build_delay(Duration::from_millis(delay));
    }
    builder
}

fn exports(
    emulator: &DsqlEmulator,
    peer: Option<&DsqlEmulator>,
    generated: bool,
) -> Vec<(&'static str, String)> {
    let credentials = emulator.credentials();
    let host = match emulator.address().ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        ip => ip.to_string(),
    };
    let mut lines = vec![
        ("CLUSTER_ENDPOINT", emulator.endpoint().to_owned()),
        ("CLUSTER_USER", "admin".to_owned()),
        ("AWS_REGION", emulator.region().to_owned()),
        ("AWS_ACCESS_KEY_ID", credentials.access_key_id().to_owned()),
    ];
    if generated {
        lines.push((
            "AWS_SECRET_ACCESS_KEY",
            credentials.secret_access_key().to_owned(),
        ));
    }
    lines.extend([
        ("PGHOST", emulator.endpoint().to_owned()),
        ("PGHOSTADDR", host.clone()),
        ("PGPORT", emulator.port().to_string()),
        ("PGUSER", "admin".to_owned()),
        ("PGDATABASE", "postgres".to_owned()),
        ("PGSSLMODE", "verify-full".to_owned()),
        (
            "PGSSLROOTCERT",
            emulator.ca_cert_path().display().to_string(),
        ),
        (
            "NODE_EXTRA_CA_CERTS",
            emulator.ca_cert_path().display().to_string(),
        ),
    ]);
    if let Some(peer) = peer {
        lines.extend([
            ("DSQL_PEER_ENDPOINT", peer.endpoint().to_owned()),
            ("DSQL_PEER_REGION", peer.region().to_owned()),
            ("DSQL_PEER_PORT", peer.port().to_string()),
        ]);
    }
    lines
}

/// Single quotes for a POSIX shell.
fn quoted(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn write_env_file(path: &PathBuf, text: &str) -> std::io::Result<()> {
    // Written whole, then renamed: a reader that sees the file sees all of it. Readable by
    // its owner only: it may hold a generated secret access key, and often sits in /tmp.
    let partial = path.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    file.open(&partial)?.write_all(text.as_bytes())?;
    std::fs::rename(&partial, path)
}

/// `dsql-emulator token`: a token for the endpoint the environment names (what the export
/// lines set), from the credentials there.
fn token(args: &[String]) -> Result<(), Usage> {
    let mut user = std::env::var("CLUSTER_USER").unwrap_or_else(|_| "admin".into());
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--user" => {
                user = args
                    .next()
                    .cloned()
                    .ok_or_else(|| Usage("--user needs a role name".into()))?
            }
            other => return Err(Usage(format!("token: unknown option `{other}`"))),
        }
    }
    let var = |name: &str| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                Usage(format!(
                    "token: {name} is not set (source the export lines)"
                ))
            })
    };
    let endpoint = var("CLUSTER_ENDPOINT")?;
    let region = var("AWS_REGION")?;
    let credentials = Credentials::new(
        var("AWS_ACCESS_KEY_ID")?,
        var("AWS_SECRET_ACCESS_KEY")?,
        std::env::var("AWS_SESSION_TOKEN")
            .ok()
            .filter(|v| !v.is_empty()),
        None,
        "environment",
    );
    let action = if user == "admin" {
        Action::DbConnectAdmin
    } else {
        Action::DbConnect
    };
    let token = TokenSigner::new(endpoint, region).sign(
        &credentials,
        action,
        Duration::from_secs(900),
        SystemTime::now(),
    );
    println!("{}", token.as_str());
    Ok(())
}

fn run(args: &[String]) -> Result<(), String> {
    if args.first().map(String::as_str) == Some("token") {
        return token(&args[1..]).map_err(|Usage(why)| why);
    }
    let options = match parse(args) {
        Ok(options) => options,
        Err(Usage(why)) if why.is_empty() => {
            println!("{USAGE}");
            return Ok(());
        }
        Err(Usage(why)) if why == VERSION => {
            println!("{VERSION}");
            return Ok(());
        }
        Err(Usage(why)) => return Err(why),
    };
    let credentials = credentials(&options).map_err(|Usage(why)| why)?;
    // A file left by an emulator that was killed must not read as this one's readiness.
    if let Some(path) = &options.env_file {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("--env-file {}: {e}", path.display())),
        }
    }
    // Stop requests are heard from the start: a SIGTERM during start-up stops it cleanly
    // once started, instead of killing it with its PostgreSQL left running.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let stop = {
        let _context = runtime.enter();
        stop_requests(&options)?
    };
    // With a control port, endpoints are made over one PostgreSQL, each in a database of its
    // own: the main one now, others on request. With an upstream server of the caller's, the
    // run's endpoint gets a database of its own too, so that nothing outlives the run.
    let own_database = options.control_port.is_some()
        || (options.upstream.is_some() && !options.keep_upstream_database);
    let shared = match own_database {
        true => {
            let mut shared = SharedPostgres::builder();
            if let Some(dir) = &options.pg_bin {
                shared = shared.pg_bin(dir);
            }
            if let Some(url) = &options.upstream {
                shared = shared.upstream_url(url);
            }
            Some(shared.start_blocking().map_err(|e| error_text(&e))?)
        }
        false => None,
    };
    let emulator = builder(&options, credentials.as_ref(), shared.as_ref())
        .start_blocking()
        .map_err(|e| {
            let mut text = error_text(&e);
            if options.port.is_none() && text.contains("cannot listen") {
                text.push_str(" (is another server on 5432? pick one with --port, 0 for any)");
            }
            text
        })?;
    let peer = if options.pair {
        let region = options
            .peer_region
            .clone()
            .unwrap_or_else(|| "us-east-2".to_owned());
        let cluster: String = (0..26).map(|_| fastrand::lowercase()).collect();
        let mut peer = DsqlEmulator::builder()
            .endpoint(format!("{cluster}.dsql.{region}.on.aws"))
            .port(options.peer_port.unwrap_or(0))
            .peer_of(&emulator)
            .sql_rules(!options.no_sql_rules);
        if let Some(listen) = options.listen {
            peer = peer.listen_address(listen);
        }
        if let Some(threads) = options.threads {
            peer = peer.threads(threads);
        }
        if let Some(micros) = options.busy_poll {
            peer = peer.busy_poll(Duration::from_micros(micros));
        }
        Some(peer.start_blocking().map_err(|e| e.to_string())?)
    } else {
        None
    };
    let emulator = std::sync::Arc::new(emulator);
    let mut lines = exports(&emulator, peer.as_ref(), credentials.is_none());
    lines.push(("DSQL_EMULATOR_PID", std::process::id().to_string()));
    // Kept to the end: the run's databases are dropped before it exits.
    let server = shared.clone();
    let control = match (options.control_port, shared) {
        (Some(port), Some(shared)) => {
            let listen = options.listen.unwrap_or(IpAddr::from([127, 0, 0, 1]));
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind((listen, port)))
                .map_err(|e| format!("--control-port {port}: cannot listen: {e}"))?;
            let address = listener
                .local_addr()
                .map_err(|e| format!("--control-port: {e}"))?;
            let host = match address.ip() {
                ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
                ip => ip.to_string(),
            };
            let token = control_token();
            lines.push((
                "DSQL_EMULATOR_CONTROL",
                format!("http://{host}:{}", address.port()),
            ));
            lines.push(("DSQL_EMULATOR_CONTROL_TOKEN", token.clone()));
            let template = {
                let options = Options {
                    port: Some(0),
                    pg_bin: None,
                    upstream: None,
                    // Per-test endpoints, many in one process: none polls.
                    busy_poll: None,
                    ..options.clone()
                };
                let credentials = emulator.credentials().clone();
                Box::new(move || builder(&options, Some(&credentials), None))
            };
            let control = std::sync::Arc::new(control::Control {
                main: emulator.clone(),
                postgres: shared,
                template,
                token,
                endpoints: Default::default(),
            });
            runtime.spawn(control::serve(listener, control.clone()));
            Some(control)
        }
        _ => None,
    };
    let text: String = lines
        .into_iter()
        .map(|(name, value)| format!("export {name}={}\n", quoted(&value)))
        .collect();
    let accepted = emulator.credentials();
    let session = match accepted.session_token() {
        Some(_) if options.session_token.is_some() => {
            "tokens must carry the session token given with --session-token"
        }
        Some(_) => "tokens must carry the session token from AWS_SESSION_TOKEN",
        None => "no session token",
    };
    let ready = format!(
        "# dsql-emulator ready: {} on {} (SQL rules {}{}); accepts access key {} ({session}); \
         SIGTERM or Ctrl-C stops it",
        emulator.endpoint(),
        emulator.address(),
        if emulator.sql_rules() { "on" } else { "off" },
        emulator
            .upstream_note()
            .map(|note| format!("; {note}"))
            .unwrap_or_default(),
        accepted.access_key_id(),
    );
    match &options.env_file {
        Some(path) => {
            write_env_file(path, &text)
                .map_err(|e| format!("--env-file {}: {e}", path.display()))?;
            println!("{ready}");
        }
        None => println!("{text}{ready}"),
    }
    let _ = std::io::stdout().flush();

    let why = runtime.block_on(stop);
    eprintln!("dsql-emulator: stopping ({why})");
    // Endpoints made through the control port first, then the runtime (and the control
    // port's tasks), so that each endpoint is dropped here, outside any runtime.
    if let Some(control) = control {
        let made: Vec<_> = control
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        drop(made);
    }
    drop(runtime);
    // The peer relays to the first's PostgreSQL: it goes first.
    drop(peer);
    drop(emulator);
    if let Some(server) = server
        && !server.wait_idle(Duration::from_secs(30))
    {
        eprintln!("dsql-emulator: an endpoint's database may not have been dropped");
    }
    if let Some(path) = &options.env_file {
        let _ = std::fs::remove_file(path);
    }
    eprintln!("dsql-emulator stopped");
    Ok(())
}

/// An error and its causes, as one line.
fn error_text(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// A random token for the control port (from the kernel's random source where there is one).
fn control_token() -> String {
    let mut bytes = [0u8; 16];
    let from_kernel = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_ok();
    if !from_kernel {
        bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What stops the emulator: SIGTERM, SIGINT, and as asked, its parent's death or the end of
/// its standard input. Set up at once (inside the runtime's context); the future resolves with
/// the reason.
fn stop_requests(
    options: &Options,
) -> Result<impl std::future::Future<Output = &'static str> + use<>, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    if options.exit_with_parent {
        exit_with_parent()?;
    }
    let stdin_closed = options.exit_on_stdin_close.then(|| {
        let (closed, wait) = tokio::sync::oneshot::channel::<()>();
        // A plain thread: tokio's stdin reads on a blocking thread the runtime would wait for.
        std::thread::spawn(move || {
            let mut sink = [0u8; 4096];
            let mut stdin = std::io::stdin().lock();
            while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
            let _ = closed.send(());
        });
        wait
    });
    Ok(async move {
        let stdin_closed = async {
            match stdin_closed {
                Some(wait) => {
                    let _ = wait.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
            () = stdin_closed => "standard input closed",
        }
    })
}

/// Asks the kernel for SIGTERM when the parent dies (handled like any SIGTERM), and checks
/// that the parent has not died already.
#[cfg(target_os = "linux")]
fn exit_with_parent() -> Result<(), String> {
    use rustix::process::{Signal, getppid, set_parent_process_death_signal};
    let parent = PARENT.get().copied().flatten();
    set_parent_process_death_signal(Some(Signal::TERM))
        .map_err(|e| format!("--exit-with-parent: {e}"))?;
    // The parent may have died before the request: then this process was re-parented.
    if getppid() != parent || parent.is_none() {
        return Err("--exit-with-parent: the parent process has already exited".into());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn exit_with_parent() -> Result<(), String> {
    Err("--exit-with-parent works on Linux only; use --exit-on-stdin-close".into())
}

/// The parent process at the first moment (for `--exit-with-parent`: one that dies before the
/// request is set up must not go unnoticed).
#[cfg(target_os = "linux")]
static PARENT: std::sync::OnceLock<Option<rustix::process::Pid>> = std::sync::OnceLock::new();

fn main() -> ExitCode {
    #[cfg(target_os = "linux")]
    PARENT.get_or_init(rustix::process::getppid);
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("dsql-emulator: {why}");
            ExitCode::from(2)
        }
    }
}
