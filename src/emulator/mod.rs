//! A local DSQL endpoint for tests (feature `emulator`), in front of a real PostgreSQL.
//!
//! The emulator listens on 127.0.0.1 under a DSQL-style endpoint name and behaves like the
//! service where a connector can tell:
//!
//! - **TLS only**: SSLRequest or direct TLS (first byte `0x16`, ALPN `postgresql` required);
//!   a plaintext startup gets a FATAL error. A CA and a server certificate for the endpoint
//!   name are generated at start; [`DsqlEmulator::ca_cert_path`] is what clients verify against.
//! - **SNI required** and equal to the endpoint name
//!   (`unable to accept connection, sni was not received`).
//! - **Startup parameters** checked against DSQL's allow-list
//!   (`setting configuration parameter "…" not supported`).
//! - **Tokens verified like the service**: structure, host, action ↔ role, region and service
//!   scope, expiry range, date and expiry against the emulator's clock (with 5 minutes' allowed
//!   skew), temporary credentials still valid at connect time, and the SigV4 signature
//!   recomputed from the received parameters against the configured credentials. This shares
//!   no code with [`TokenSigner`](crate::TokenSigner). Every refusal is DSQL's: `FATAL 08006
//!   unable to accept connection, access denied`, with the reason only in the HINT
//!   (`Signature expired: …`, `Wrong user to action mapping. user: admin, action: DbConnect`,
//!   …).
//! - **Admission like DSQL's**: a token bucket for new connections (100 a second, bursts of
//!   1 000) answering `53400 Unable to accept connection, rate exceeded.`, and a cap on open
//!   connections (10 000) answering `53300 Unable to accept connection, too many open
//!   connections.`; both configurable ([`DsqlEmulatorBuilder::connection_rate_limit`],
//!   [`DsqlEmulatorBuilder::max_open_connections`]).
//! - **Connection age**: connections are closed at a maximum age (60 minutes by default).
//! - **Faults on demand**: [`drop_all_connections`](DsqlEmulator::drop_all_connections),
//!   [`refuse_new_connections`](DsqlEmulator::refuse_new_connections),
//!   [`wake_up_after`](DsqlEmulator::wake_up_after) (a cluster scaled to zero: `unable to
//!   accept connection, waking up cluster, please retry later`),
//!   [`cut_next_commit`](DsqlEmulator::cut_next_commit) (a connection lost with `COMMIT` in
//!   flight), [`fail_next_commit`](DsqlEmulator::fail_next_commit) (a `FATAL` answer to
//!   `COMMIT`),
//!   [`set_latency`](DsqlEmulator::set_latency) (one-way network delay),
//!   [`restart_upstream`](DsqlEmulator::restart_upstream).
//!
//! Accepted sessions are relayed to PostgreSQL under the same role name. By default the emulator
//! runs a private throw-away cluster (superuser `admin`, trust authentication on a private Unix
//! socket, `default_transaction_isolation = 'repeatable read'`, autovacuum off, a 100 ms
//! `deadlock_timeout`), found in `PG_BIN`, on `PATH` or
//! in the newest `/usr/lib/postgresql/*/bin`; as root it runs it as `postgres` (or `nobody`).
//! Or it relays to an existing server ([`DsqlEmulatorBuilder::upstream_url`] or
//! `DSQL_EMULATOR_UPSTREAM`), which must trust the emulator's connections and have an `admin`
//! role; with the SQL rules on (the default) `admin` must be a superuser, since the emulator
//! creates DSQL's `sys.jobs` and `sys.wait_for_job` and a few event triggers there at start, and
//! watches who blocks whom there (`pg_blocking_pids`) to decide conflicts at `COMMIT`.
//!
//! Custom roles are created as on DSQL, as `admin` through the emulator:
//! `CREATE ROLE app WITH LOGIN;` then `CREATE SCHEMA myschema; GRANT USAGE, CREATE ON SCHEMA
//! myschema TO app;`, and the role connects with `search_path = myschema`. `AWS IAM GRANT app
//! TO '<arn>'` / `AWS IAM REVOKE …` and `sys.iam_pg_role_mappings` work as on DSQL; told the
//! ARN behind an access key ([`DsqlEmulatorBuilder::iam_identity`]), the emulator refuses a
//! custom role that was not granted to it.
//!
//! For many tests, [`SharedPostgres`] runs one PostgreSQL and gives each test an endpoint of
//! its own (its own database, counters, faults and limits) in tens of milliseconds. For other
//! languages, the `dsql-emulator` binary (this feature's `[[bin]]`) serves the same endpoint
//! from a shell or a CI job.
//!
//! This module shares no code with the connector it checks (it has its own error type,
//! [`EmulatorError`], and its own small helpers); the bridge from an emulator to a connector
//! configuration ([`DsqlEmulator::config_for`]) lives on the connector's side.
//!
//! ```no_run
//! use tokio_postgres_dsql::DsqlConnector;
//! use tokio_postgres_dsql::emulator::DsqlEmulator;
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let emulator = DsqlEmulator::start().await?;
//! let connector = DsqlConnector::new(emulator.config_for("admin").build()?).await?;
//! let client = connector.connect().await?;
//! client.batch_execute("CREATE TABLE t (id uuid PRIMARY KEY)").await?;
//! # Ok(()) }
//! ```

pub(crate) mod auth;
#[cfg(test)]
mod boundary_tests;
mod builder;
mod certs;
mod error;
mod latency;
mod poll;
mod postgres;
mod session;
mod sql;
mod startup;
mod upstream;
mod util;
mod wire;
mod workdir;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_credential_types::Credentials;
use aws_smithy_async::time::SharedTimeSource;
use tokio::time::Instant;

pub use builder::{
    DSQL_CONNECTION_BURST, DSQL_CONNECTION_RATE, DSQL_MAX_OPEN_CONNECTIONS, DsqlEmulatorBuilder,
};
use builder::{check_rate, random_cluster_id};
pub use error::EmulatorError;
pub use postgres::{SharedPostgres, SharedPostgresBuilder};
use util::Bucket;
use workdir::WorkDir;

/// Why the emulator refused a connection. Counted in [`EmulatorStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Rejection {
    /// New connections were being refused ([`DsqlEmulator::refuse_new_connections`]).
    Refused,
    /// A startup message without TLS.
    Plaintext,
    /// A malformed or unsupported protocol message.
    Protocol,
    /// A TLS ClientHello without SNI.
    NoSni,
    /// SNI naming another host.
    WrongSni,
    /// Direct TLS without ALPN `postgresql`.
    NoAlpn,
    /// A startup parameter DSQL does not accept.
    UnsupportedParameter,
    /// An `amzn-cluster-id` option naming another cluster.
    WrongClusterId,
    /// A token that is not a presigned URL with the expected parameters.
    TokenMalformed,
    /// A token signed for another host.
    TokenHost,
    /// `admin` with `DbConnect`, or another role with `DbConnectAdmin`.
    TokenAction,
    /// A token scoped to another region.
    TokenRegion,
    /// A token scoped to another service.
    TokenService,
    /// `X-Amz-Expires` outside 1..=604800.
    TokenExpiresRange,
    /// A token past its expiry, or signed with expired credentials.
    TokenExpired,
    /// A token dated in the future beyond the allowed skew.
    TokenNotYetValid,
    /// An access key (or session token) the emulator does not know.
    TokenUnknownKey,
    /// A signature that does not match.
    TokenSignature,
    /// A valid token from an IAM identity without `dsql:DbConnect*`
    /// ([`DsqlEmulator::revoke_access`]).
    NotAuthorized,
    /// The upstream PostgreSQL refused the session or is down.
    Upstream,
    /// A valid token for a role that does not exist (`28000 role "…" does not exist`).
    UnknownRole,
    /// The new-connection rate limit was exceeded (`53400`).
    RateExceeded,
    /// The open-connection cap was reached (`53300`).
    TooManyConnections,
    /// The endpoint was waking up ([`DsqlEmulator::wake_up_after`]).
    WakingUp,
    /// The connection was still in its startup when [`DsqlEmulator::drop_all_connections`] or
    /// [`DsqlEmulator::set_down`] cut it, or was accepted from the listener's queue just as
    /// `set_down(true)` closed it: it never logged in.
    Cut,
}

/// The state of the network in front of an endpoint, as a Region outage looks from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Network {
    /// Everything goes through.
    Up,
    /// Nothing goes through and nothing is refused: new connections are accepted and never
    /// answered, open ones stall (and resume when it is up again).
    BlackHole,
    /// The endpoint is gone: connections are refused (nothing listens) and open ones are cut.
    Down,
}

/// Counters for tests to assert on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EmulatorStats {
    /// TCP connections accepted, whatever became of them (also while black-holed).
    pub connections: u64,
    /// Sessions authenticated and relayed.
    pub accepted: u64,
    /// Refusals by reason.
    pub rejected: BTreeMap<Rejection, u64>,
    /// Connections closed because they reached the maximum age.
    pub closed_at_max_age: u64,
    /// Open sessions closed by [`DsqlEmulator::drop_all_connections`] (and `set_down(true)`).
    /// A connection cut during its startup is counted as [`Rejection::Cut`] instead. (A wait
    /// for `dropped` to reach its value before the call plus `open_connections()` is exact
    /// only while no connect is under way: one that logs in between the two reads is closed
    /// and counted too.)
    pub dropped: u64,
    /// Connections closed at a `COMMIT` by [`DsqlEmulator::cut_next_commit`] or
    /// [`DsqlEmulator::fail_next_commit`].
    pub cut_at_commit: u64,
    /// Connections that started with direct TLS.
    pub direct_tls: u64,
    /// Connections that started with an SSLRequest.
    pub ssl_requests: u64,
    /// Autocommit `UPDATE`s and `DELETE`s the SQL rules sent without the transaction the relay
    /// otherwise opens around a write (to roll it back should it cross DSQL's 3 000 rows),
    /// because their `WHERE` sets the columns of a unique index equal to constants or
    /// parameters: one row at most, one round trip to PostgreSQL fewer. (The relay learns a
    /// table's unique indexes in the background, after its first such write, and again after
    /// each schema change.)
    pub key_bounded_writes: u64,
    /// With [`DsqlEmulatorBuilder::busy_poll`]: turns the relay spent polling its sockets
    /// instead of sleeping, and (about: bytes that move while it wakes can count once more)
    /// times it was woken after it had gone to sleep (nothing had moved for the window). Both
    /// zero without busy polling.
    pub busy_polls: u64,
    /// See [`busy_polls`](Self::busy_polls).
    pub busy_poll_wakeups: u64,
}

impl EmulatorStats {
    /// How many connections were refused for `reason`.
    pub fn rejected(&self, reason: Rejection) -> u64 {
        self.rejected.get(&reason).copied().unwrap_or(0)
    }

    /// How many connections were refused, for any reason.
    pub fn total_rejected(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// State shared by the accept loop and every session.
pub(crate) struct Shared {
    verifier: auth::Verifier,
    cluster_id: String,
    tls_config: Arc<rustls::ServerConfig>,
    upstream: upstream::Target,
    latency: latency::Latency,
    /// When client connections last moved bytes, with busy polling on.
    activity: Option<Arc<poll::Activity>>,
    max_age: AtomicU64,
    refusing: AtomicBool,
    /// Which new TCP connections are closed at once (`drop_new_connections`), and how many
    /// were accepted since it was set.
    dropping_new: Mutex<(util::DropSchedule, u64)>,
    cut_next_commit: AtomicBool,
    /// Conflicts injected on demand (`inject_conflicts`; with the SQL rules).
    injection: Arc<sql::Injection>,
    /// The answer `fail_next_commit` armed: a FATAL `ErrorResponse` for the next `COMMIT`.
    fail_next_commit: Mutex<Option<Vec<u8>>>,
    /// DSQL's SQL rules are applied (see `sql`).
    sql_rules: bool,
    /// How long a transaction block may stay open (with the SQL rules).
    transaction_age_limit: Duration,
    /// How long an asynchronous index build's job stays `submitted` (with the SQL rules).
    index_build_delay: Duration,
    /// The upstream PostgreSQL's major version, when it could be read.
    upstream_major: Option<u32>,
    /// Committed schema changes, for `OC001` (with the SQL rules).
    catalog: Arc<sql::Catalog>,
    /// The database's sessions, for commit-time conflicts (with the SQL rules).
    sessions: Arc<sql::occ::Sessions>,
    /// The network between clients and this endpoint (see [`Network`]).
    network: tokio::sync::watch::Sender<Network>,
    /// Whether the accept loop holds its listening socket now.
    listening: AtomicBool,
    drops: tokio::sync::watch::Sender<u64>,
    open: AtomicUsize,
    /// Sessions past admission (authenticating or relayed): what the open-connection cap counts.
    admitted: AtomicUsize,
    max_open: AtomicUsize,
    new_connections: Bucket,
    /// While `Some` and in the future, connections are told the cluster is waking up.
    waking_until: Mutex<Option<Instant>>,
    stats: Mutex<EmulatorStats>,
}

impl Shared {
    /// Whether the connection just accepted is to be dropped (`drop_new_connections`).
    fn drops_next_connection(&self) -> bool {
        let mut dropping = self.dropping_new.lock().unwrap_or_else(|p| p.into_inner());
        let (schedule, accepted) = &mut *dropping;
        if !schedule.is_active() {
            return false;
        }
        let n = *accepted;
        *accepted += 1;
        schedule.drops(n)
    }

    fn count(&self, update: impl FnOnce(&mut EmulatorStats)) {
        update(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn count_rejection(&self, reason: Rejection) {
        tracing::debug!(?reason, "emulator refused a connection");
        self.count(|stats| *stats.rejected.entry(reason).or_default() += 1);
    }

    fn count_accepted(&self) {
        self.count(|stats| stats.accepted += 1);
    }

    /// Admission for a new session, in DSQL's order: waking up, the new-connection rate, the
    /// open-connection cap. `Ok` holds a slot of the cap until dropped.
    fn admit(&self) -> Result<Counted<'_>, (Rejection, &'static str, &'static str)> {
        let now = Instant::now();
        let waking = self
            .waking_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| now < until);
        if waking {
            return Err((
                Rejection::WakingUp,
                "08006",
                "unable to accept connection, waking up cluster, please retry later",
            ));
        }
        if !self.new_connections.try_take(now) {
            return Err((
                Rejection::RateExceeded,
                "53400",
                "Unable to accept connection, rate exceeded.",
            ));
        }
        let max = self.max_open.load(Ordering::SeqCst);
        if self.admitted.fetch_add(1, Ordering::SeqCst) >= max {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err((
                Rejection::TooManyConnections,
                "53300",
                "Unable to accept connection, too many open connections.",
            ));
        }
        Ok(Counted(&self.admitted))
    }
}

/// One unit of a counter (a session's slot under the open-connection cap, a session in
/// [`DsqlEmulator::open_connections`]) held while this lives, also when the task holding it is
/// dropped midway (a `relay_on` runtime that shuts down).
pub(crate) struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    /// Counts one more on `counter` until the guard is dropped.
    pub(crate) fn hold(counter: &'a AtomicUsize) -> Counted<'a> {
        counter.fetch_add(1, Ordering::SeqCst);
        Counted(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running DSQL emulator. Dropping it stops it and its private PostgreSQL.
pub struct DsqlEmulator {
    address: SocketAddr,
    ca_pem: String,
    authority: Arc<certs::Authority>,
    ca_path: PathBuf,
    time_source: Option<SharedTimeSource>,
    shared: Arc<Shared>,
    runtime: Option<EmulatorRuntime>,
    /// With `relay_on`: dropped (first) to end the connections relayed on the caller's runtime.
    relay_stop: Option<tokio::sync::watch::Sender<()>>,
    // Field order matters on drop: the cluster stops before its directory is removed.
    cluster: Arc<Mutex<Option<upstream::LocalCluster>>>,
    /// The endpoint's database on a shared server, dropped after the endpoint stops.
    _database: Option<postgres::Database>,
    _work_dir: WorkDir,
}

/// The runtime that relays an emulator's connections.
pub(crate) enum EmulatorRuntime {
    /// A current-thread runtime on a thread of its own, stopped when this is sent or dropped.
    Thread(tokio::sync::oneshot::Sender<()>),
    /// Worker threads.
    Workers(tokio::runtime::Runtime),
}

impl std::fmt::Debug for DsqlEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsqlEmulator")
            .field("endpoint", &self.endpoint())
            .field("address", &self.address)
            .field("region", &self.region())
            .finish_non_exhaustive()
    }
}

impl Drop for DsqlEmulator {
    fn drop(&mut self) {
        // Connections relayed on a runtime of the caller's end with the emulator.
        drop(self.relay_stop.take());
        match self.runtime.take() {
            // Its thread stops the runtime (without waiting for its tasks).
            Some(EmulatorRuntime::Thread(stop)) => {
                let _ = stop.send(());
            }
            Some(EmulatorRuntime::Workers(runtime)) => runtime.shutdown_background(),
            None => {}
        }
    }
}

impl DsqlEmulator {
    /// A builder with every option at its default.
    pub fn builder() -> DsqlEmulatorBuilder {
        DsqlEmulatorBuilder::default()
    }

    /// Starts an emulator with the defaults.
    pub async fn start() -> Result<DsqlEmulator, EmulatorError> {
        Self::builder().start().await
    }

    /// Starts the two peered endpoints of a multi-Region cluster over one PostgreSQL, as DSQL's
    /// are over one strongly consistent database: a write through one is read through the other
    /// at once. Each has its own cluster id, Region (`us-east-1`, `us-east-2`) and certificate
    /// (both from one CA, so either's [`ca_cert_path`](Self::ca_cert_path) serves both), and
    /// verifies tokens for its own host and Region; both accept the same credentials.
    /// [`config_with_peer`](Self::config_with_peer) configures a client for both. Faults are per endpoint ([`set_down`](Self::set_down),
    /// [`set_black_hole`](Self::set_black_hole), ...). The second relays to the first's
    /// PostgreSQL: keep the first alive as long as the second.
    pub async fn start_pair() -> Result<(DsqlEmulator, DsqlEmulator), EmulatorError> {
        let first = Self::builder()
            .endpoint(format!("{}.dsql.us-east-1.on.aws", random_cluster_id()))
            .start()
            .await?;
        // One database: a schema change through either endpoint is the other's too (OC001).
        let second = Self::builder()
            .endpoint(format!("{}.dsql.us-east-2.on.aws", random_cluster_id()))
            .peer_of(&first)
            .start()
            .await?;
        Ok((first, second))
    }

    /// Whether DSQL's SQL rules are applied ([`DsqlEmulatorBuilder::sql_rules`]).
    pub fn sql_rules(&self) -> bool {
        self.shared.sql_rules
    }

    /// The major version of the PostgreSQL behind the emulator (clients are told DSQL's
    /// `16.15` whatever it is), when it could be read. On another version than 16 some of
    /// DSQL's behaviour differs: [`upstream_note`](Self::upstream_note) says what.
    pub fn upstream_version(&self) -> Option<u32> {
        self.shared.upstream_major
    }

    /// What differs from DSQL because the PostgreSQL behind the emulator is not 16 (16's
    /// syntax missing on 15; 17's accepted on 17), if it is not; logged once at start.
    pub fn upstream_note(&self) -> Option<String> {
        self.shared
            .upstream_major
            .filter(|_| self.shared.sql_rules)
            .and_then(sql::version_note)
    }

    /// The endpoint name: what clients use as host, SNI and token host.
    pub fn endpoint(&self) -> &str {
        &self.shared.verifier.endpoint
    }

    /// The region tokens must be scoped to.
    pub fn region(&self) -> &str {
        &self.shared.verifier.region
    }

    /// The TCP port it listens on.
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// The listening address: 127.0.0.1 (or [`DsqlEmulatorBuilder::listen_address`]) and
    /// [`port`](Self::port).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The CA certificate (PEM) that signed the endpoint's certificate.
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A file holding [`ca_cert_pem`](Self::ca_cert_pem), for `sslrootcert` / `PGSSLROOTCERT`.
    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_path
    }

    /// The first accepted credentials (the generated ones unless configured).
    pub fn credentials(&self) -> &Credentials {
        &self.shared.verifier.credentials[0]
    }

    /// The clock tokens are checked against, when one was set
    /// ([`DsqlEmulatorBuilder::time_source`]); `None`: the system clock.
    pub fn time_source(&self) -> Option<&SharedTimeSource> {
        self.time_source.as_ref()
    }

    /// A `tokio-postgres` connection string straight to the upstream PostgreSQL as `user`,
    /// bypassing the emulator (for setup and inspection in tests).
    pub fn upstream_url(&self, user: &str) -> String {
        self.shared.upstream.url(user)
    }

    /// The counters so far.
    pub fn stats(&self) -> EmulatorStats {
        let mut stats = self
            .shared
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        stats.key_bounded_writes = self.shared.catalog.key_bounded_writes();
        if let Some(activity) = &self.shared.activity {
            stats.busy_polls = activity.polls();
            stats.busy_poll_wakeups = activity.wakeups();
        }
        stats
    }

    /// How many sessions are being relayed now: each counts from just before its client is
    /// told the session is open (its `ReadyForQuery`) until it ends.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Cuts every connection the emulator accepted before the call, as a server failure
    /// would: an open session (one whose connect has only just returned included) is closed
    /// at once, and one still in its startup is cut before it logs in (its client's connect
    /// fails; counted as [`Rejection::Cut`]) when its startup reaches that point.
    pub fn drop_all_connections(&self) {
        self.shared.drops.send_modify(|generation| *generation += 1);
    }

    /// The next `COMMIT` any client sends (as a simple query, as tokio-postgres and most
    /// drivers send it) is not forwarded: the emulator closes that connection instead, as a
    /// network failure during `COMMIT` would. The client cannot tell whether the transaction
    /// committed (it did not: PostgreSQL rolls back the transaction of a connection that goes
    /// away). Counted in [`EmulatorStats::cut_at_commit`]. One-shot.
    pub fn cut_next_commit(&self) {
        self.shared.cut_next_commit.store(true, Ordering::SeqCst);
    }

    /// The next `COMMIT` that succeeds, on any connection, is answered with `FATAL <code>
    /// <message>` instead of its `CommandComplete`, and the connection is closed: the
    /// transaction **committed**, and the client is told it failed, as when a server fails or
    /// shuts down while acknowledging a commit (`57P01 terminating connection due to
    /// administrator command`, `XX000 server unavailable`, a class `08` error). Only a client
    /// that takes such an answer as an unknown outcome stays correct. Counted in
    /// [`EmulatorStats::cut_at_commit`]. One-shot.
    pub fn fail_next_commit(&self, code: &str, message: &str) {
        *self
            .shared
            .fail_next_commit
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(wire::fatal(code, message, None));
    }

    /// While `true`, the endpoint is black-holed, as behind a network partition: new TCP
    /// connections are accepted and never answered, and open connections stall (nothing they
    /// send or are sent goes through) until it is `false` again, when they resume. Clients see
    /// timeouts, not errors.
    pub fn set_black_hole(&self, on: bool) {
        self.shared.network.send_if_modified(|network| {
            let next = if on { Network::BlackHole } else { Network::Up };
            let changed = *network != next && *network != Network::Down;
            if changed {
                *network = next;
            }
            changed
        });
    }

    /// While `true`, the endpoint is down, as in a Region outage: nothing listens on its port
    /// (connections are refused) and every connection is cut, open or still in its startup
    /// (see [`drop_all_connections`](DsqlEmulator::drop_all_connections)). `false` listens
    /// again on the same port.
    /// Returns once the change has taken effect (within a second).
    pub fn set_down(&self, down: bool) {
        if down {
            self.shared.network.send_replace(Network::Down);
            self.drop_all_connections();
        } else {
            self.shared.network.send_if_modified(|network| {
                let changed = *network == Network::Down;
                if changed {
                    *network = Network::Up;
                }
                changed
            });
        }
        // The accept loop runs on the emulator's own threads: wait for it to close or reopen
        // the listening socket, so that the next connect sees the new state.
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while self.shared.listening.load(Ordering::SeqCst) == down
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// While `true`, new TCP connections are closed at once (counted as
    /// [`Rejection::Refused`]); established ones continue.
    pub fn refuse_new_connections(&self, refuse: bool) {
        self.shared.refusing.store(refuse, Ordering::SeqCst);
    }

    /// From now on, the `COMMIT` of a transaction block that wrote one of `tables` (none: any
    /// table) answers DSQL's `40001 change conflicts with another transaction (OC000)` and
    /// rolls back, as a transaction that lost a first-committer race does: every `every`-th
    /// such `COMMIT` (0 or 1: each), `count` times (`None`: until
    /// [`stop_injecting_conflicts`](Self::stop_injecting_conflicts)). A team tests its retry
    /// loop against this without racing two sessions. Deterministic: the matching `COMMIT`s
    /// are counted in the order they reach their commit point, over the endpoint's sessions;
    /// setting a rule starts the count again. Table names are matched without schema, in
    /// lower case. Only transaction blocks count (an autocommit statement has no `COMMIT` to
    /// fail), and only with the SQL rules on.
    ///
    /// ```no_run
    /// # use tokio_postgres_dsql::emulator::DsqlEmulator;
    /// # fn f(emulator: &DsqlEmulator) {
    /// // The next commit that wrote `orders` fails once; the retry commits.
    /// emulator.inject_conflicts(&["orders"], 1, Some(1));
    /// # }
    /// ```
    pub fn inject_conflicts(&self, tables: &[&str], every: u32, count: Option<u32>) {
        self.shared.injection.set(tables, every, count);
    }

    /// Ends [`inject_conflicts`](Self::inject_conflicts)' rule.
    pub fn stop_injecting_conflicts(&self) {
        self.shared.injection.clear();
    }

    /// How many conflicts [`inject_conflicts`](Self::inject_conflicts) has injected so far.
    pub fn injected_conflicts(&self) -> u64 {
        self.shared.injection.injected()
    }

    /// From now on, a share `share` (0 to 1; clamped, NaN: none) of the new TCP connections is
    /// closed at once (counted as [`Rejection::Refused`]), as over a lossy link or a failing
    /// load balancer; established ones continue. `0.0` turns it off.
    ///
    /// Which connections are dropped follows `seed`: the `n`-th connection accepted after the
    /// call is dropped or not by a fixed mix of `seed` and `n`, so the same seed drops the same
    /// connections, in the order they are accepted, on every run (how the connections of
    /// concurrent clients interleave is still up to the machine).
    pub fn drop_new_connections(&self, share: f64, seed: u64) {
        *self
            .shared
            .dropping_new
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = (util::DropSchedule::new(share, seed), 0);
    }

    /// Adds `latency` to each direction between clients and the emulator, like a network: a
    /// round trip costs twice this, and pipelined messages are not delayed twice. Applies to
    /// bytes sent after the call, on open connections too. The TCP handshake is not delayed.
    /// Latencies above an hour are taken as an hour.
    pub fn set_latency(&self, latency: Duration) {
        let latency = latency.min(Duration::from_secs(3600));
        self.shared
            .latency
            .store(latency.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Restarts the private PostgreSQL (a fast shutdown, then a start on the same data): every
    /// relayed session ends, as in a server failover. Returns once it accepts connections again.
    /// Not available with an external upstream.
    pub async fn restart_upstream(&self) -> Result<(), EmulatorError> {
        let cluster = self.cluster.clone();
        tokio::task::spawn_blocking(move || {
            match cluster.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                Some(cluster) => cluster.restart(),
                None => Err(EmulatorError::failed(
                    "restart_upstream needs the emulator's private PostgreSQL, not an \
                     external or shared upstream",
                )),
            }
        })
        .await
        .map_err(|e| EmulatorError::caused("the restart task failed", e))?
    }

    /// From now on, for `duration`, every new connection is refused as a cluster scaled to zero
    /// refuses while it starts: `FATAL 08006 unable to accept connection, waking up cluster,
    /// please retry later` (counted as [`Rejection::WakingUp`]). Open connections continue.
    pub fn wake_up_after(&self, duration: Duration) {
        *self
            .shared
            .waking_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(util::after(duration));
    }

    /// Takes `dsql:DbConnect` and `dsql:DbConnectAdmin` away from the IAM identity of
    /// `access_key_id` (as removing its policy would): its tokens still verify, and are then
    /// refused with HINT `User: arn:aws:iam::…:user/<key> is not authorized to perform:
    /// dsql:DbConnect… on resource: …` (counted as [`Rejection::NotAuthorized`]). `false`
    /// gives the access back.
    pub fn revoke_access(&self, access_key_id: &str, revoked: bool) {
        let mut set = self
            .shared
            .verifier
            .revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if revoked {
            set.insert(access_key_id.to_owned());
        } else {
            set.remove(access_key_id);
        }
    }

    /// Changes the new-connection rate limit (see
    /// [`DsqlEmulatorBuilder::connection_rate_limit`]). Tokens already stored are kept, up to
    /// the new burst.
    pub fn set_connection_rate_limit(
        &self,
        per_second: f64,
        burst: u32,
    ) -> Result<(), EmulatorError> {
        check_rate(per_second, burst)?;
        self.shared.new_connections.set(per_second, burst);
        Ok(())
    }

    /// Changes the cap on open connections (see
    /// [`DsqlEmulatorBuilder::max_open_connections`]); open connections above it stay open.
    pub fn set_max_open_connections(&self, max: usize) {
        self.shared.max_open.store(max, Ordering::SeqCst);
    }

    /// Changes the maximum connection age for connections accepted from now on (at least 1 s).
    pub fn set_max_connection_age(&self, age: Duration) {
        self.shared.max_age.store(
            age.max(Duration::from_secs(1)).as_nanos() as u64,
            Ordering::SeqCst,
        );
    }
}
