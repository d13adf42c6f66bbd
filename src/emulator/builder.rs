//! Configuring and starting an endpoint: [`DsqlEmulatorBuilder`].

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_credential_types::Credentials;
use aws_smithy_async::time::{SharedTimeSource, SystemTimeSource, TimeSource};

use super::util::{self, Bucket};
use super::workdir::WorkDir;
use super::{
    DsqlEmulator, EmulatorError, EmulatorRuntime, EmulatorStats, Network, Rejection, Shared,
};
use super::{auth, certs, postgres, session, sql, upstream};

/// DSQL's new-connection rate: 100 a second per cluster.
pub const DSQL_CONNECTION_RATE: f64 = 100.0;
/// DSQL's new-connection burst.
pub const DSQL_CONNECTION_BURST: u32 = 1_000;
/// DSQL's cap on open connections per cluster.
pub const DSQL_MAX_OPEN_CONNECTIONS: usize = 10_000;

/// Configures and starts a [`DsqlEmulator`].
#[derive(Default)]
#[must_use]
pub struct DsqlEmulatorBuilder {
    endpoint: Option<String>,
    region: Option<String>,
    credentials: Vec<Credentials>,
    max_connection_age: Option<Duration>,
    time_source: Option<SharedTimeSource>,
    upstream_url: Option<String>,
    pg_bin: Option<PathBuf>,
    port: u16,
    connection_rate: Option<(f64, u32)>,
    max_open_connections: Option<usize>,
    /// The CA to sign the endpoint's certificate with (a pair shares one).
    pub(super) authority: Option<Arc<certs::Authority>>,
    /// The committed schema changes to share (a pair's endpoints see each other's, for OC001).
    pub(super) catalog: Option<Arc<sql::Catalog>>,
    pub(super) sessions: Option<Arc<sql::occ::Sessions>>,
    sql_rules: Option<bool>,
    transaction_age_limit: Option<Duration>,
    index_build_delay: Option<Duration>,
    listen: Option<std::net::IpAddr>,
    threads: Option<usize>,
    busy_poll: Option<Duration>,
    relay_runtime: Option<tokio::runtime::Handle>,
    identities: std::collections::BTreeMap<String, String>,
    /// The shared server to take a database of (`SharedPostgres::endpoint`).
    postgres: Option<Arc<postgres::Inner>>,
}

impl std::fmt::Debug for DsqlEmulatorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsqlEmulatorBuilder")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("credentials", &self.credentials.len())
            .finish_non_exhaustive()
    }
}

impl DsqlEmulatorBuilder {
    /// The endpoint name (SNI, certificate, token host). Default: a random 26-character cluster
    /// id + `.dsql.us-east-1.on.aws`.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// The region tokens must be scoped to. Default: parsed from the endpoint name; required
    /// when the name does not contain one.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Accepts tokens signed with these credentials (call repeatedly for several access keys;
    /// session tokens must match). Default: one generated key pair, see
    /// [`DsqlEmulator::credentials`].
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.credentials.push(credentials);
        self
    }

    /// The IAM identity behind `access_key_id` (`arn:aws:iam::<account>:role/<name>` or
    /// `…:user/<name>`), as IAM knows it: refusals name it, and a custom role (any but
    /// `admin`) connecting with that key must have been granted to it, as on DSQL, with
    /// `AWS IAM GRANT <role> TO '<arn>'` (else `08006 … access denied`, HINT `User: <arn> is
    /// not authorized to access this resource`). Keys without one connect as any role.
    pub fn iam_identity(
        mut self,
        access_key_id: impl Into<String>,
        arn: impl Into<String>,
    ) -> Self {
        self.identities.insert(access_key_id.into(), arn.into());
        self
    }

    /// Connections are closed once this old. Default 60 minutes, as DSQL; at least 1 s.
    pub fn max_connection_age(mut self, age: Duration) -> Self {
        self.max_connection_age = Some(age);
        self
    }

    /// The clock tokens are checked against. Default: the system clock.
    pub fn time_source(mut self, time_source: impl TimeSource + 'static) -> Self {
        self.time_source = Some(SharedTimeSource::new(time_source));
        self
    }

    /// Relay to this existing PostgreSQL (`postgres://host:port` or `host=/socket/dir port=…`)
    /// instead of starting one. It must trust the emulator's connections and have an `admin`
    /// role. Default: `DSQL_EMULATOR_UPSTREAM`, else a private cluster.
    pub fn upstream_url(mut self, url: impl Into<String>) -> Self {
        self.upstream_url = Some(url.into());
        self
    }

    /// The directory with `initdb` and `postgres`. Default: `PG_BIN`, `PATH`, then the newest
    /// `/usr/lib/postgresql/*/bin`.
    pub fn pg_bin(mut self, dir: impl Into<PathBuf>) -> Self {
        self.pg_bin = Some(dir.into());
        self
    }

    /// The TCP port. Default 0: a free port.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// The address to listen on. Default 127.0.0.1; `0.0.0.0` serves other machines or
    /// containers (clients still connect under the endpoint name, for SNI and the token).
    pub fn listen_address(mut self, address: std::net::IpAddr) -> Self {
        self.listen = Some(address);
        self
    }

    /// The new-connection token bucket: `per_second` new connections a second, bursts of up to
    /// `burst`; connections beyond it get `53400 Unable to accept connection, rate exceeded.`
    /// Default DSQL's: [`DSQL_CONNECTION_RATE`] (100/s), [`DSQL_CONNECTION_BURST`] (1 000).
    pub fn connection_rate_limit(mut self, per_second: f64, burst: u32) -> Self {
        self.connection_rate = Some((per_second, burst));
        self
    }

    /// The cap on open connections; connections beyond it get `53300 Unable to accept
    /// connection, too many open connections.` Default DSQL's:
    /// [`DSQL_MAX_OPEN_CONNECTIONS`] (10 000).
    pub fn max_open_connections(mut self, max: usize) -> Self {
        self.max_open_connections = Some(max);
        self
    }

    /// Whether SQL is answered as DSQL answers it (see [`guide::sql_rules`](crate::guide::sql_rules)'s rule table): statements
    /// and types DSQL refuses get its SQLSTATE and message; one DDL per transaction, no DDL
    /// with DML, only REPEATABLE READ, no savepoints, `SET` of allowed parameters only,
    /// `CREATE INDEX ASYNC` with its job; the row, age, size, index and schema limits; writers
    /// never wait on each other and the first transaction to commit wins, whatever the
    /// protocol (the other's `COMMIT` fails with `OC000`; rows read `FOR UPDATE` count as
    /// written), schema changes give other sessions `OC001`. Default on; `false` leaves a
    /// plain PostgreSQL behind DSQL's connection rules ([`guide::sql_rules`](crate::guide::sql_rules) lists what is and is not
    /// emulated).
    pub fn sql_rules(mut self, on: bool) -> Self {
        self.sql_rules = Some(on);
        self
    }

    /// How long a transaction block may stay open with the SQL rules on: after it, its next
    /// statement fails with `54000 transaction age limit of <n>s exceeded` (a `COMMIT` then
    /// ends it). DSQL's limit, and the default, is 300 s; tests may want a shorter one.
    pub fn transaction_age_limit(mut self, limit: Duration) -> Self {
        self.transaction_age_limit = Some(limit);
        self
    }

    /// How long an asynchronous index build (`CREATE INDEX ASYNC`, `ALTER TABLE ASYNC …
    /// VALIDATE`) takes with the SQL rules on: its job stays `submitted` in `sys.jobs` for that
    /// long (and `sys.wait_for_job` waits for it) before it reports its outcome. DSQL's builds
    /// take seconds even on empty tables (`DSQL_SQL_RULES.md` §10); the default, none, lets tests
    /// that do not care go fast; a delay lets a test see a long build, a lapsed lease during one,
    /// and a resume. At most one hour.
    pub fn index_build_delay(mut self, delay: Duration) -> Self {
        self.index_build_delay = Some(delay);
        self
    }

    /// How many threads serve the endpoint's connections. With one (the default on a machine
    /// with at most two CPUs) a single thread relays every connection: a round trip then wakes
    /// no second thread, which on a small machine is worth more than the parallelism (measured:
    /// `src/guide/performance.md`); the default elsewhere is two, and one with
    /// [`busy_poll`](Self::busy_poll). Between 1 and 64 (`0` counts as one, more as 64).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads.clamp(1, 64));
        self
    }

    /// Busy polling: after a client's connection moves bytes, the endpoint's relay keeps
    /// looking at its sockets for `window` instead of going to sleep at once, so a message that
    /// arrives in that time wakes nothing. Off by default (a zero window); at most one second.
    ///
    /// A relay in a process or thread of its own costs each statement two more wake-ups than a
    /// direct connection, and where a wake-up on another CPU is slow (a virtual machine whose
    /// idle CPUs halt at once) that is most of what the emulator adds to a test suite that runs
    /// one statement after another. On the reference machine (2 vCPUs), pgbench's 1-client
    /// statements through the SQL rules went from about 0.75× to 1.0–1.24× of the direct path
    /// with a 1 ms window, and 4 clients stayed within 0.07× (`src/guide/performance.md`). The
    /// price is CPU time: while a client is active (and for `window` after), the relay's thread
    /// does not sleep; each turn it yields to any other runnable thread on its CPU, but that
    /// CPU never idles, and the host sees a busy CPU. It polls only while one connection at a
    /// time is active (several clients keep the relay awake anyway), and never for a connection
    /// once a latency has applied to it ([`DsqlEmulator::set_latency`]). It needs the relay's
    /// one thread: with it the endpoint relays on one thread unless [`threads`](Self::threads)
    /// names more, and then it does not poll. Use it for one emulator serving a suite's
    /// statements in turn; with many endpoints in one busy test process (one per test), leave
    /// it off. [`EmulatorStats::busy_polls`] counts the turns.
    pub fn busy_poll(mut self, window: Duration) -> Self {
        self.busy_poll = Some(window.min(Duration::from_secs(1)));
        self
    }

    /// Relays the endpoint's connections on `runtime` (the caller's, for a test:
    /// `tokio::runtime::Handle::current()`) instead of on the emulator's own thread: the
    /// relay in the client's process and on its runtime.
    ///
    /// A relay on a thread of its own costs each statement two wake-ups of that thread (the
    /// client's message in, the server's answer back) beyond what a direct connection costs;
    /// on a machine where waking a sleeping CPU is slow (a virtual machine whose idle CPUs
    /// halt), that is most of what the emulator adds to a test. Relayed on the client's own
    /// current-thread runtime (what `#[tokio::test]` builds), a message the client writes is
    /// read by the relay on the same thread, on the runtime's next turn: the statement wakes
    /// only PostgreSQL, as a direct connection does. (On a multi-thread runtime the relay's
    /// tasks run on any worker, which may wake another: measured, 4 clients gained as much,
    /// but 1-client writes through the rules added 59–83 µs a statement.)
    ///
    /// On the reference machine (2 vCPUs) a Rust load generator with 4 clients on a
    /// current-thread runtime went from 0.56×–0.76× of a direct TLS connection's throughput,
    /// with the SQL rules, to 0.69×–0.84× (two runs), and its 1-client statements from
    /// 52–78 µs added to 14–45 µs (`examples/relay_load.rs`, `src/guide/performance.md`).
    /// The connections are real TCP connections with TLS and token checks, as on the
    /// emulator's own thread; only the thread that relays them changes. The emulator still
    /// accepts connections on its own thread, so [`DsqlEmulator::set_down`] and the other
    /// faults work as without this option.
    ///
    /// The runtime must relay while clients use the endpoint:
    /// - it needs its I/O and time drivers (`enable_all`, as `#[tokio::test]` and
    ///   `#[tokio::main]` build it);
    /// - keep the emulator within the runtime's life, e.g. start it in the test that uses it
    ///   (one endpoint per test: [`SharedPostgres::endpoint`](super::SharedPostgres::endpoint)
    ///   makes one in tens of milliseconds). An emulator shared by several tests, each with
    ///   its own runtime, must relay on its own thread (the default): once this runtime shuts
    ///   down, new connections to the endpoint are closed at once, with a warning in the log;
    /// - a current-thread runtime relays only while the thread runs it: a client that blocks
    ///   that thread (a synchronous driver, `std::thread::sleep`, `Handle::block_on` from
    ///   inside it) waits for an answer the blocked relay cannot give;
    /// - the relay's timers (the connection's maximum age, its startup bound, a latency) run
    ///   on the runtime's clock: not in a test that pauses time (`start_paused`,
    ///   `tokio::time::pause`), whose clock jumps ahead each time the runtime waits for
    ///   PostgreSQL;
    /// - the two endpoints of a pair ([`peer_of`](Self::peer_of)) should relay on the same
    ///   runtime, or both on their own threads: work they share (the conflict monitor's
    ///   connection) runs on the runtime that first needs it.
    ///
    /// Dropping the emulator closes the connections it relays on `runtime`. Not with
    /// [`busy_poll`](Self::busy_poll) (a relay that shares its thread with the client must not
    /// spin) or [`threads`](Self::threads) (the runtime's threads relay): `start` refuses
    /// either with this.
    pub fn relay_on(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.relay_runtime = Some(runtime);
        self
    }

    /// Makes this endpoint the other Region of `first`'s multi-Region cluster, as
    /// [`DsqlEmulator::start_pair`] does: it relays to `first`'s PostgreSQL and database,
    /// accepts `first`'s credentials, gets a certificate from `first`'s CA, and shares its
    /// sessions and schema changes (conflicts, `OC001` and what the rules know of the catalog
    /// hold across both). Set its endpoint (another Region's); keep `first` alive as long as
    /// this one.
    pub fn peer_of(mut self, first: &DsqlEmulator) -> Self {
        self = self
            .upstream_url(first.upstream_url("admin"))
            .credentials(first.credentials().clone());
        self.authority = Some(first.authority.clone());
        self.catalog = Some(first.shared.catalog.clone());
        self.sessions = Some(first.shared.sessions.clone());
        self
    }

    /// Serves this endpoint from `postgres`, in a database of its own copied from its template
    /// (fast: no `initdb`), instead of a private server; [`upstream_url`](Self::upstream_url)
    /// and [`pg_bin`](Self::pg_bin) are then not used. The endpoint is signed by the shared
    /// server's CA. See [`SharedPostgres`](super::SharedPostgres).
    pub fn postgres(mut self, postgres: &super::SharedPostgres) -> Self {
        self.postgres = Some(postgres.inner().clone());
        self
    }

    /// Starts the emulator (and its PostgreSQL) without blocking the async runtime.
    pub async fn start(self) -> Result<DsqlEmulator, EmulatorError> {
        tokio::task::spawn_blocking(move || self.start_blocking())
            .await
            .map_err(|e| EmulatorError::caused("the start-up task failed", e))?
    }

    /// Starts the emulator, blocking the current thread for the few seconds PostgreSQL needs.
    /// The emulator runs on its own threads, so it outlives the runtime that started it.
    pub fn start_blocking(self) -> Result<DsqlEmulator, EmulatorError> {
        let endpoint = self
            .endpoint
            .unwrap_or_else(|| format!("{}.dsql.us-east-1.on.aws", random_cluster_id()))
            .to_ascii_lowercase();
        let region = match (self.region, util::region_of(&endpoint)) {
            (Some(region), _) => region,
            (None, Some(region)) => region.to_owned(),
            (None, None) => {
                return Err(EmulatorError::config(
                    "region",
                    format!("the emulator endpoint `{endpoint}` names no region; set one"),
                ));
            }
        };
        let cluster_id = endpoint.split('.').next().unwrap_or_default().to_owned();
        let max_age = self.max_connection_age.unwrap_or(util::MAX_CONNECTION_AGE);
        if max_age < Duration::from_secs(1) {
            return Err(EmulatorError::config(
                "max_connection_age",
                "must be at least 1 s",
            ));
        }
        let transaction_age_limit = self
            .transaction_age_limit
            .unwrap_or(sql::TRANSACTION_AGE_LIMIT);
        if transaction_age_limit < Duration::from_secs(1) {
            return Err(EmulatorError::config(
                "transaction_age_limit",
                "must be at least 1 s",
            ));
        }
        if self.relay_runtime.is_some() {
            if self.busy_poll.is_some_and(|window| !window.is_zero()) {
                return Err(EmulatorError::config(
                    "busy_poll",
                    "not with relay_on: a relay that shares the client's runtime must not spin",
                ));
            }
            if self.threads.is_some() {
                return Err(EmulatorError::config(
                    "threads",
                    "not with relay_on: the runtime relay_on names relays the connections",
                ));
            }
        }
        let index_build_delay = self.index_build_delay.unwrap_or_default();
        if index_build_delay > Duration::from_secs(3600) {
            return Err(EmulatorError::config(
                "index_build_delay",
                "must be at most an hour",
            ));
        }
        let (rate, burst) = self
            .connection_rate
            .unwrap_or((DSQL_CONNECTION_RATE, DSQL_CONNECTION_BURST));
        check_rate(rate, burst)?;
        let credentials = if self.credentials.is_empty() {
            vec![generated_credentials()]
        } else {
            self.credentials
        };

        let work_dir = WorkDir::create()?;
        let authority = match (self.authority, &self.postgres) {
            (Some(authority), _) => authority,
            (None, Some(postgres)) => postgres.authority.clone(),
            (None, None) => certs::Authority::generate()?,
        };
        let certs = certs::Certificates::generate(&endpoint, &authority)?;
        let ca_path = work_dir.path.join("ca.pem");
        std::fs::write(&ca_path, &certs.ca_pem)
            .map_err(|e| EmulatorError::caused(format!("cannot write {}", ca_path.display()), e))?;

        let database = match &self.postgres {
            Some(postgres) => Some(postgres.create_database(&cluster_id)?),
            None => None,
        };
        let (target, cluster) = match &database {
            Some(database) => (database.target.clone(), None),
            None => upstream::target_or_cluster(
                self.upstream_url,
                &work_dir.path,
                self.pg_bin.as_deref(),
            )?,
        };

        let sql_rules = self.sql_rules.unwrap_or(true);
        // A shared server's databases come from a prepared template.
        if sql_rules && database.is_none() {
            sql::prepare_upstream(target.url("admin"))?;
        }
        // Which PostgreSQL answers (a shared server read it, and said so, once).
        let upstream_major = match &self.postgres {
            Some(postgres) => postgres.upstream_major,
            None => {
                let major = sql::upstream_major(target.url("admin"));
                if let Some(note) = major.filter(|_| sql_rules).and_then(sql::version_note) {
                    tracing::warn!("{note}");
                }
                major
            }
        };

        let listen = self.listen.unwrap_or(Ipv4Addr::LOCALHOST.into());
        let listener = std::net::TcpListener::bind((listen, self.port))
            .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
            .map_err(|e| {
                EmulatorError::caused(format!("cannot listen on {listen}:{}", self.port), e)
            })?;
        let address = listener
            .local_addr()
            .map_err(|e| EmulatorError::caused("cannot read the listening address", e))?;
        // Last fallible steps: a runtime must not be dropped from inside another one.
        // Busy polling needs the one thread (on several, the one that polls does not hold the
        // sockets' driver while another sleeps on it): one unless the builder named more, and
        // none then.
        let busy_poll = self.busy_poll.filter(|window| !window.is_zero());
        let threads = self.threads.unwrap_or_else(|| {
            // (With `relay_on`, the own thread only accepts connections.)
            if busy_poll.is_some() || self.relay_runtime.is_some() {
                1
            } else {
                default_threads()
            }
        });
        if busy_poll.is_some() && threads > 1 {
            tracing::warn!(
                threads,
                "busy polling is off: it needs the emulator's one thread"
            );
        }
        let activity = busy_poll
            .filter(|_| threads == 1)
            .map(super::poll::Activity::new);
        let (runtime, handle) = if threads == 1 {
            // One thread of its own, which relays every connection, until the emulator is
            // dropped.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| EmulatorError::caused("cannot start the emulator's runtime", e))?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new()
                .name("dsql-emulator".into())
                .spawn(move || {
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    runtime.shutdown_background();
                })
                .map_err(|e| EmulatorError::caused("cannot start the emulator's thread", e))?;
            (EmulatorRuntime::Thread(stop), handle)
        } else {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("dsql-emulator")
                .enable_all()
                .build()
                .map_err(|e| EmulatorError::caused("cannot start the emulator's runtime", e))?;
            let handle = runtime.handle().clone();
            (EmulatorRuntime::Workers(runtime), handle)
        };

        let time_source = self.time_source.clone();
        // The database's sessions (shared by a pair's endpoints), watched through the upstream's
        // superuser.
        let sessions = self
            .sessions
            .unwrap_or_else(|| Arc::new(sql::occ::Sessions::new(target.url("admin"))));
        let shared = Arc::new(Shared {
            verifier: auth::Verifier {
                endpoint: endpoint.clone(),
                region,
                credentials,
                clock: self
                    .time_source
                    .unwrap_or_else(|| SharedTimeSource::new(SystemTimeSource::new())),
                max_skew: Duration::from_secs(300),
                revoked: Default::default(),
                identities: self.identities,
            },
            cluster_id,
            tls_config: certs.server_config,
            upstream: target,
            latency: Arc::new(AtomicU64::new(0)),
            activity: activity.clone(),
            max_age: AtomicU64::new(max_age.as_nanos() as u64),
            refusing: AtomicBool::new(false),
            dropping_new: Mutex::new(Default::default()),
            cut_next_commit: AtomicBool::new(false),
            injection: Default::default(),
            fail_next_commit: Mutex::new(None),
            sql_rules,
            transaction_age_limit,
            index_build_delay,
            upstream_major,
            catalog: self.catalog.unwrap_or_default(),
            sessions,
            network: tokio::sync::watch::Sender::new(Network::Up),
            listening: AtomicBool::new(true),
            drops: tokio::sync::watch::Sender::new(0),
            open: AtomicUsize::new(0),
            admitted: AtomicUsize::new(0),
            max_open: AtomicUsize::new(
                self.max_open_connections
                    .unwrap_or(DSQL_MAX_OPEN_CONNECTIONS),
            ),
            new_connections: Bucket::new(rate, burst),
            waking_until: Mutex::new(None),
            stats: Mutex::new(EmulatorStats::default()),
        });
        if let Some(activity) = activity {
            handle.spawn(activity.run());
        }
        // With `relay_on`: where each accepted connection is relayed, and the signal (the
        // sender's drop, with the emulator) that ends those relays.
        let (relay_stop, relay) = match self.relay_runtime {
            Some(runtime) => {
                let (stop, stopped) = tokio::sync::watch::channel(());
                (Some(stop), Some(session::Relay::new(runtime, stopped)))
            }
            None => (None, None),
        };
        handle.spawn({
            let shared = shared.clone();
            async move {
                let mut listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => Some(listener),
                    Err(error) => {
                        tracing::error!(%error, "emulator cannot use its listening socket");
                        return;
                    }
                };
                let mut network = shared.network.subscribe();
                loop {
                    if *network.borrow_and_update() == Network::Down {
                        // Nothing listens: connections are refused.
                        listener = None;
                        shared.listening.store(false, Ordering::SeqCst);
                        let _ = network.wait_for(|n| *n != Network::Down).await;
                        continue;
                    }
                    let Some(current) = &listener else {
                        match tokio::net::TcpListener::bind(address).await {
                            Ok(bound) => {
                                listener = Some(bound);
                                shared.listening.store(true, Ordering::SeqCst);
                            }
                            Err(error) => {
                                tracing::warn!(%error, %address, "emulator cannot listen again");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                        continue;
                    };
                    tokio::select! {
                        accepted = current.accept() => match accepted {
                            Ok((socket, _)) => {
                                // (Before the count: a test that sees the count and then cuts
                                // reaches this connection.)
                                let accepted = session::Accepted::now(&shared);
                                shared.count(|stats| stats.connections += 1);
                                // A connection accepted as `set_down(true)` lands (the
                                // listener closes just after) is refused. It took the cut
                                // signal first, so a cut after this check reaches it, and the
                                // "down" state is set before the cut is signalled. (Before the
                                // seeded drop schedule, which it must not use up.)
                                if *shared.network.borrow() == Network::Down {
                                    shared.count_rejection(Rejection::Cut);
                                    drop(socket);
                                    continue;
                                }
                                if shared.drops_next_connection() {
                                    shared.count_rejection(Rejection::Refused);
                                    drop(socket);
                                    continue;
                                }
                                match &relay {
                                    Some(relay) => relay.serve(socket, accepted, shared.clone()),
                                    None => {
                                        tokio::spawn(session::serve(
                                            socket,
                                            accepted,
                                            shared.clone(),
                                        ));
                                    }
                                }
                            }
                            Err(error) => {
                                tracing::warn!(%error, "emulator accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        },
                        _ = network.changed() => {}
                    }
                }
            }
        });
        tracing::info!(%endpoint, %address, "DSQL emulator listening");
        Ok(DsqlEmulator {
            address,
            ca_pem: certs.ca_pem,
            authority,
            ca_path,
            time_source,
            shared,
            runtime: Some(runtime),
            relay_stop,
            cluster: Arc::new(Mutex::new(cluster)),
            _database: database,
            _work_dir: work_dir,
        })
    }
}

impl super::SharedPostgres {
    /// A builder for a new endpoint over this server, in a database of its own. Set what the
    /// test needs (credentials, limits, ...), then `start()`.
    pub fn endpoint(&self) -> DsqlEmulatorBuilder {
        DsqlEmulatorBuilder::default().postgres(self)
    }
}

pub(super) fn check_rate(per_second: f64, burst: u32) -> Result<(), EmulatorError> {
    if !(per_second.is_finite() && per_second > 0.0) || burst == 0 {
        return Err(EmulatorError::config(
            "connection_rate_limit",
            "the rate must be more than 0 a second and the burst at least 1",
        ));
    }
    Ok(())
}

pub(super) fn random_cluster_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..26)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

pub(super) fn generated_credentials() -> Credentials {
    const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    const SECRET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/+";
    let pick = |set: &[u8], n: usize| -> String {
        (0..n)
            .map(|_| set[fastrand::usize(..set.len())] as char)
            .collect()
    };
    Credentials::new(
        format!("AKIA{}", pick(UPPER, 16)),
        pick(SECRET, 40),
        None,
        None,
        "dsql-emulator",
    )
}

/// Threads when the builder names none: one on a machine with at most two CPUs, else two.
fn default_threads() -> usize {
    match std::thread::available_parallelism() {
        Ok(n) if n.get() <= 2 => 1,
        _ => 2,
    }
}
