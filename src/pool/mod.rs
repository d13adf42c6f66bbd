//! A `bb8` pool for DSQL: connections recycled before the server's one-hour cut, with jitter,
//! never handed out past their deadline or once known to be closed, and checkouts that return
//! the connect error itself.
//!
//! What "closed" can mean here: the pool sees a connection as closed once its connection task
//! has seen the socket end. A connection the server closed a moment before a checkout (a
//! failover, the emulator's `drop_all_connections`) can be handed out once more; its first query
//! fails with a closed-connection error, the pool drops it when it is returned, and the next
//! checkout gets another.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tracing::Instrument;

use crate::connector::{Checkout, Retry, Target};
use crate::session::{SessionWatch, TransactionStatus};
use crate::{DsqlConnector, Error};

/// Default pool size. DSQL allows 10 000 connections per cluster and 100 new ones per second;
/// ten per process is plenty for most services (raise it with `pool_builder`).
pub const DEFAULT_MAX_SIZE: u32 = 10;
/// Default minimum idle connections: one stays warm, so the first request after a quiet spell
/// does not pay for TLS and a token check.
pub const DEFAULT_MIN_IDLE: u32 = 1;
/// Default idle timeout: 10 minutes, as in the AWS DSQL connectors.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Default time to wait for a connection: 10 s. A DSQL connect is three round trips plus a
/// token; waiting longer only hides an outage.
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection idle for longer than this is pinged (an empty query) at checkout; a busy
/// connection is not, so a busy pool pays no round trip per checkout.
pub const DEFAULT_PING_AFTER_IDLE: Duration = Duration::from_secs(60);
/// Default bound on a checkout's check (ping or reset): an in-Region round trip takes a few
/// milliseconds, so a connection silent for 2 s is taken for dead (a half-open TCP connection
/// would otherwise hold the checkout until the kernel gives up, about 15 minutes later).
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Recycle deadlines are spread over the last tenth of the maximum lifetime (for the default
/// 55 minutes: between 49.5 and 55 minutes), so a pool opened at once does not reconnect at once.
pub const JITTER_FRACTION: u32 = 10;

/// What a pool of this crate can hold: a [`tokio_postgres::Client`] (the default everywhere),
/// or, with the `diesel-async` feature, a `diesel_async::AsyncPgConnection` (see
/// [`crate::diesel`]). Sealed: the pool's checks need to know how each one runs a statement and
/// what it tracks itself.
pub trait PoolClient: private::Client {}

impl PoolClient for tokio_postgres::Client {}

pub(crate) mod private {
    use std::future::Future;
    use std::sync::Arc;

    use crate::Error;
    use crate::session::SessionWatch;

    /// How the pool drives one kind of client (see [`PoolClient`](super::PoolClient)).
    pub trait Client: Send + Sized + 'static {
        /// Makes the pooled client from a fresh connection (its session watched by `session`).
        fn setup(
            client: tokio_postgres::Client,
            session: &Arc<SessionWatch>,
        ) -> impl Future<Output = Result<Self, Error>> + Send;

        /// Whether the client knows its connection has ended.
        fn closed(&self) -> bool;

        /// Runs `sql` as a simple query; `true` when it succeeded.
        fn run(&mut self, sql: &'static str) -> impl Future<Output = bool> + Send + '_;

        /// Whether the client's own bookkeeping says a transaction is open or broken (even if
        /// the server says otherwise): the connection then needs a `ROLLBACK` and
        /// [`transaction_ended`](Self::transaction_ended).
        fn tracks_a_transaction(&mut self) -> bool {
            false
        }

        /// The server's transaction was ended by the pool (`ROLLBACK`): reset the client's own
        /// bookkeeping.
        fn transaction_ended(&mut self) {}

        /// What resets the session's settings to what the connection was opened with.
        const RESET: &'static str = "RESET ALL";
    }

    impl Client for tokio_postgres::Client {
        async fn setup(
            client: tokio_postgres::Client,
            _: &Arc<SessionWatch>,
        ) -> Result<Self, Error> {
            Ok(client)
        }

        fn closed(&self) -> bool {
            self.is_closed()
        }

        async fn run(&mut self, sql: &'static str) -> bool {
            self.batch_execute(sql).await.is_ok()
        }
    }
}

/// A pooled DSQL connection: a [`tokio_postgres::Client`] (it derefs to one), or another
/// [`PoolClient`], with the time it was opened and its recycle deadline.
pub struct DsqlConnection<C = tokio_postgres::Client> {
    client: C,
    opened_at: Instant,
    recycle_at: Instant,
    /// When it last came back to the pool (or was opened).
    last_used: Instant,
    /// A checkout's check (ping, reset) is in flight or was cut short.
    checking: bool,
    /// Refused at checkout (already counted).
    discarded: bool,
    session: Arc<SessionWatch>,
    member: PoolMember,
    /// The endpoint it is connected to.
    target: Arc<Target>,
    /// After a failback, how long an endpoint preferred to this connection's must have been up
    /// before the connection is replaced at checkout (its share of the failback window).
    failback_after: Duration,
}

impl<C: PoolClient> std::fmt::Debug for DsqlConnection<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsqlConnection")
            .field("endpoint", &self.target.described)
            .field("age", &self.opened_at.elapsed())
            .field(
                "recycle_in",
                &self.recycle_at.saturating_duration_since(Instant::now()),
            )
            .field("closed", &self.is_closed())
            .field("transaction", &self.session.status())
            .finish()
    }
}

impl<C: PoolClient> DsqlConnection<C> {
    /// Whether the connection has ended (the server closed it, or it failed), or the server
    /// has said it is ending the session (an error of severity `FATAL`).
    pub fn is_closed(&self) -> bool {
        self.session.is_closed() || self.session.fatal_seen() || self.client.closed()
    }
}

impl<C> DsqlConnection<C> {
    /// When the connection was opened.
    pub fn opened_at(&self) -> Instant {
        self.opened_at
    }

    /// When the pool stops handing it out and replaces it.
    pub fn recycle_at(&self) -> Instant {
        self.recycle_at
    }

    /// The endpoint host it is connected to (with several endpoints, the one that served it).
    pub fn endpoint(&self) -> &str {
        &self.target.endpoint
    }

    /// The Region of its endpoint.
    pub fn region(&self) -> &str {
        &self.target.region
    }

    /// Marks it to be dropped, not reused, when it goes back to the pool (a transaction
    /// helper gave up on it mid-way).
    pub(crate) fn discard(&mut self) {
        self.checking = true;
    }

    /// Its endpoint, as the connector knows it.
    pub(crate) fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// What the server last said about the session.
    #[cfg_attr(not(feature = "diesel-async"), allow(dead_code))]
    pub(crate) fn session(&self) -> &Arc<SessionWatch> {
        &self.session
    }

    /// Takes the client out of the pool's wrapper.
    pub fn into_client(self) -> C {
        self.client
    }
}

impl DsqlConnection {
    /// The client (also reachable through `Deref`).
    pub fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

impl<C> Deref for DsqlConnection<C> {
    type Target = C;

    fn deref(&self) -> &C {
        &self.client
    }
}

impl<C> DerefMut for DsqlConnection<C> {
    fn deref_mut(&mut self) -> &mut C {
        &mut self.client
    }
}

/// The `bb8` connection manager. Usually made for you by [`DsqlConnector::pool`]; build one
/// yourself to pass to a tuned [`DsqlConnector::pool_builder`].
///
/// - `connect` opens a connection through the [`DsqlConnector`] (cached token, shared TLS),
///   retrying transient failures ([`Error::is_transient`]: DSQL's admission refusals, I/O
///   errors, timeouts, a restarting server) with backoff and full jitter until the connector's
///   [`connect_deadline`](crate::DsqlConfigBuilder::connect_deadline), and failing permanent
///   ones (access denied, TLS, unknown role) at once. bb8's own connection retry is off.
/// - `is_valid` (at checkout) refuses closed connections and connections past their recycle
///   deadline without any I/O. It hands out only **clean** connections: outside any
///   transaction, with the session settings they were opened with. The connection's TLS stream
///   reads the transaction status the server reports after every query (`ReadyForQuery`) and
///   notices a changed reported setting (`ParameterStatus`, e.g. after `SET TimeZone`), so
///   this costs nothing on the common path; only a suspect connection pays a round trip at
///   checkout: `ROLLBACK` if it came back inside a transaction (a raw `BEGIN`, or a body that
///   never finished), `RESET ALL` if a reported setting changed. Settings the server does not
///   report (`search_path` set with `SET`) are not seen: set them at startup (the
///   configuration's `search_path`) or with `SET LOCAL`. A connection idle for longer than
///   [`ping_after_idle`](Self::ping_after_idle) is pinged. Each of these checks is bounded by
///   [`ping_timeout`](Self::ping_timeout); a connection that fails or times out is dropped.
/// - With several endpoints ([`DsqlConnector`]'s "Several endpoints"), a connection whose
///   endpoint is marked down is kept if it works: one not used since the endpoint last failed
///   is replaced without I/O (new connections open on the next endpoint), one used since is
///   pinged and kept if it answers. After a failback, a connection on a less preferred
///   endpoint is replaced once the preferred one has been up (and the connection open) for the
///   connection's own share, drawn uniformly, of the
///   [`failback_window`](crate::FailoverPolicy::failback_window), so a fleet moves back at
///   `connections / window` a second instead of all at once. A [`DsqlPool`] sweeps its idle
///   connections through that rule about once a second while a failback is in progress (bb8's
///   LIFO would otherwise never hand the idle ones out).
/// - `has_broken` (on return) records the time of last use and catches closed and expired
///   connections, and one whose check was cut short (bb8 dropped the checkout mid-ping): it is
///   dropped, never queued again.
pub struct DsqlConnectionManager<C = tokio_postgres::Client> {
    connector: DsqlConnector,
    max_lifetime: Duration,
    jitter: Duration,
    ping_after_idle: Duration,
    ping_timeout: Duration,
    failures: Arc<ConnectFailures>,
    counts: Arc<PoolCounts>,
    endpoint: Arc<str>,
    client: PhantomData<fn() -> C>,
}

impl<C> Clone for DsqlConnectionManager<C> {
    fn clone(&self) -> Self {
        DsqlConnectionManager {
            connector: self.connector.clone(),
            max_lifetime: self.max_lifetime,
            jitter: self.jitter,
            ping_after_idle: self.ping_after_idle,
            ping_timeout: self.ping_timeout,
            failures: self.failures.clone(),
            counts: self.counts.clone(),
            endpoint: self.endpoint.clone(),
            client: PhantomData,
        }
    }
}

impl<C> std::fmt::Debug for DsqlConnectionManager<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsqlConnectionManager")
            .field("connector", &self.connector)
            .field("max_lifetime", &self.max_lifetime)
            .field("jitter", &self.jitter)
            .field("ping_after_idle", &self.ping_after_idle)
            .field("ping_timeout", &self.ping_timeout)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Connect errors handed from the manager (in bb8's background connect) to the checkouts
/// waiting in [`DsqlPool::get`]: bb8 itself never returns a connect error from a checkout.
#[derive(Debug, Default)]
struct ConnectFailures {
    /// `DsqlPool::get` calls waiting now.
    waiting: AtomicUsize,
    errors: Mutex<VecDeque<(Instant, Error)>>,
    /// The last permanent refusal (handed to every waiter).
    refusal: Mutex<Option<(Instant, Error)>>,
    /// Whether `refusal` may be recent (a lock-free test for the checkout's fast path).
    refused: AtomicBool,
    notify: tokio::sync::Notify,
}

impl ConnectFailures {
    /// At most this many errors are kept for waiters (one per waiting checkout is enough).
    const KEEP: usize = 64;

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Error)>> {
        self.errors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `error` to a waiting checkout if there is one; gives it back otherwise.
    fn offer(&self, error: Error) -> Result<(), Error> {
        if let Some(copy) = error.shared_refusal() {
            // Noted even with no checkout waiting: one that starts before bb8 records this
            // connect as failed gets no connect of its own (see `DsqlPool::wait_for`).
            *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), copy));
            self.refused.store(true, Ordering::Release);
        }
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return Err(error);
        }
        if error.shared_refusal().is_some() {
            // A permanent refusal is every waiter's answer, not one waiter's.
            *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), error));
            self.notify.notify_waiters();
            return Ok(());
        }
        let mut errors = self.lock();
        if errors.len() >= Self::KEEP {
            errors.pop_front();
        }
        errors.push_back((Instant::now(), error));
        drop(errors);
        self.notify.notify_waiters();
        Ok(())
    }

    /// Whether a permanent refusal came less than the connector's refusal memory ago (every
    /// connect in that time may get it again, without a login).
    fn refused_recently(&self) -> bool {
        if !self.refused.load(Ordering::Acquire) {
            return false;
        }
        let recent = matches!(
            &*self.refusal.lock().unwrap_or_else(|p| p.into_inner()),
            Some((at, _)) if at.elapsed() < crate::connector::REFUSAL_MEMORY
        );
        if !recent {
            self.refused.store(false, Ordering::Release);
        }
        recent
    }

    /// The oldest error that happened at or after `since`; older ones are dropped. A permanent
    /// refusal at or after `since` is shared: every waiter gets a copy.
    fn take_since(&self, since: Instant) -> Option<Error> {
        if let Some((at, refusal)) = &*self.refusal.lock().unwrap_or_else(|p| p.into_inner())
            && *at >= since
        {
            return refusal.shared_refusal();
        }
        let mut errors = self.lock();
        while let Some((at, error)) = errors.pop_front() {
            if at >= since {
                return Some(error);
            }
        }
        None
    }
}

/// Counts a waiting checkout while alive.
struct Waiting<'a>(&'a ConnectFailures);

impl<'a> Waiting<'a> {
    fn new(failures: &'a ConnectFailures) -> Self {
        failures.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(failures)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DsqlConnectionManager {
    /// A manager with the connector's `max_lifetime` (default 55 minutes), jitter over its last
    /// tenth, and [`DEFAULT_PING_AFTER_IDLE`].
    pub fn new(connector: DsqlConnector) -> Self {
        Self::with_connector(connector)
    }
}

impl<C> DsqlConnectionManager<C> {
    /// [`new`](DsqlConnectionManager::new) for any [`PoolClient`], e.g.
    /// `DsqlConnectionManager::<AsyncPgConnection>::with_connector(connector)`.
    pub fn with_connector(connector: DsqlConnector) -> Self {
        let max_lifetime = connector.config().max_lifetime();
        let endpoint: Arc<str> = Arc::from(connector.endpoint());
        DsqlConnectionManager {
            connector,
            max_lifetime,
            jitter: max_lifetime / JITTER_FRACTION,
            ping_after_idle: DEFAULT_PING_AFTER_IDLE,
            ping_timeout: DEFAULT_PING_TIMEOUT,
            failures: Arc::default(),
            counts: Arc::new(PoolCounts::new(&endpoint)),
            endpoint,
            client: PhantomData,
        }
    }

    /// The spread of recycle deadlines: each connection's deadline is `max_lifetime` minus a
    /// uniformly random part of `jitter` (at most `max_lifetime`). Zero gives every connection
    /// exactly `max_lifetime`.
    #[must_use]
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter.min(self.max_lifetime);
        self
    }

    /// Ping a connection at checkout only when it sat idle longer than this.
    #[must_use]
    pub fn ping_after_idle(mut self, idle: Duration) -> Self {
        self.ping_after_idle = idle;
        self
    }

    /// The bound on a checkout's check (a ping, or the reset of a dirty session). A connection
    /// that does not answer in time is dropped, and the checkout goes on to another. Default
    /// [`DEFAULT_PING_TIMEOUT`] (2 s).
    #[must_use]
    pub fn ping_timeout(mut self, timeout: Duration) -> Self {
        self.ping_timeout = timeout;
        self
    }

    /// The connector used for new connections.
    pub fn connector(&self) -> &DsqlConnector {
        &self.connector
    }

    /// The recycle deadline for a connection opened at `opened_at`.
    pub fn deadline_for(&self, opened_at: Instant) -> Instant {
        let jitter = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.jitter.mul_f64(fastrand::f64())
        };
        opened_at
            .checked_add(self.max_lifetime - jitter)
            .unwrap_or(opened_at)
    }
}

impl<C: PoolClient> bb8::ManageConnection for DsqlConnectionManager<C> {
    type Connection = DsqlConnection<C>;
    type Error = Error;

    async fn connect(&self) -> Result<DsqlConnection<C>, Error> {
        self.open().await.map_err(|error| {
            // A checkout waiting in `DsqlPool::get` gets the error itself; bb8, which only logs
            // it, gets a stand-in.
            match self.failures.offer(error) {
                Ok(()) => Error::Unusable {
                    reason: "the connect failed; its error went to a waiting checkout",
                },
                Err(error) => error,
            }
        })
    }

    async fn is_valid(&self, conn: &mut DsqlConnection<C>) -> Result<(), Error> {
        self.check_out(conn, true).await
    }

    fn has_broken(&self, conn: &mut DsqlConnection<C>) -> bool {
        // Called when a connection comes back: it was just used.
        conn.last_used = Instant::now();
        conn.member.set_in_use(false);
        if conn.discarded {
            return true;
        }
        let broken = if conn.checking {
            Some("broken")
        } else if conn.is_closed() {
            Some("closed")
        } else if conn.last_used >= conn.recycle_at {
            Some("recycle_deadline")
        } else {
            None
        };
        if let Some(label) = broken {
            crate::telemetry::connection_closed(&conn.target.endpoint, label);
        }
        broken.is_some()
    }
}

/// Opens a connection with the pool's retries and runs the client's setup (diesel-async's
/// `SET`s) inside the same connect deadline: a setup that stalls is cut at the deadline
/// ([`Error::ConnectTimeout`]), and one that fails without a server error (the connection
/// lost) is tried again on a new connection while the deadline allows.
#[allow(clippy::type_complexity)]
pub(crate) async fn open_set_up<C: PoolClient>(
    connector: &DsqlConnector,
) -> Result<(C, Arc<SessionWatch>, Arc<crate::connector::Target>), Error> {
    let deadline = crate::connector::after(connector.config().connect_deadline());
    let mut backoff = Duration::from_millis(50);
    loop {
        let crate::connector::Connected {
            client,
            session,
            target,
        } = connector.connect_within(deadline, Retry::Transient).await?;
        let setup = C::setup(client, &session);
        // At least a second for it, after a connect that took most of the deadline.
        let setup_deadline = deadline.max(Instant::now() + Duration::from_secs(1));
        let error = match tokio::time::timeout_at(setup_deadline, setup).await {
            Ok(Ok(client)) => return Ok((client, session, target)),
            Ok(Err(error)) => error,
            Err(_) => {
                return Err(Error::ConnectTimeout {
                    endpoint: target.described.clone(),
                    timeout: connector.config().connect_deadline(),
                    during: "the connect deadline (connect_deadline) ran out while the \
                             connection was set up",
                });
            }
        };
        // A server's answer is the answer; a lost connection is worth another.
        let lost = session.is_closed();
        if !lost || Instant::now() + backoff >= deadline {
            return Err(error);
        }
        tracing::debug!(%error, "a DSQL connection was lost during its setup; connecting again");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

impl<C: PoolClient> DsqlConnectionManager<C> {
    /// Opens a connection for a pool: retries transient failures inside the connect deadline,
    /// and gives it its recycle deadline. Shared by the bb8 and deadpool managers.
    pub(crate) async fn open(&self) -> Result<DsqlConnection<C>, Error> {
        let opened_at = Instant::now();
        let (client, session, target) =
            open_set_up::<C>(&self.connector)
                .await
                .inspect_err(|error| {
                    tracing::warn!(%error, "the pool could not open a DSQL connection");
                })?;
        let spread = self.connector.config().failover().failback_window;
        let away = target.index > 0;
        Ok(DsqlConnection {
            client,
            session,
            target,
            failback_after: spread.mul_f64(fastrand::f64()),
            opened_at,
            recycle_at: self.deadline_for(opened_at),
            last_used: Instant::now(),
            checking: false,
            discarded: false,
            member: PoolMember::new(self.counts.clone(), away),
        })
    }

    /// The checkout rules (see the type's docs), with their metrics and log line. Shared by
    /// the bb8 and deadpool managers; `track_in_use` where the pool also reports returns.
    pub(crate) async fn check_out(
        &self,
        conn: &mut DsqlConnection<C>,
        track_in_use: bool,
    ) -> Result<(), Error> {
        match self.check(conn).await {
            Ok(now) => {
                if track_in_use {
                    conn.member.set_in_use(true);
                } else {
                    conn.last_used = now;
                }
                Ok(())
            }
            Err((label, reason)) => {
                // bb8 still passes it to `has_broken`, which must not count it again.
                conn.discarded = true;
                crate::telemetry::connection_closed(&conn.target.endpoint, label);
                tracing::debug!(reason, "a pooled DSQL connection was discarded at checkout");
                Err(Error::Unusable { reason })
            }
        }
    }

    /// The checkout rules (see the type's docs). `Err` carries the metric label and the reason.
    /// `Ok` carries the time of the check.
    async fn check(
        &self,
        conn: &mut DsqlConnection<C>,
    ) -> Result<Instant, (&'static str, &'static str)> {
        let now = Instant::now();
        if conn.checking {
            return Err(("broken", "a check of the connection was cut short"));
        }
        if conn.is_closed() {
            return Err(("closed", "the connection is closed"));
        }
        let rule = self.connector.checkout_rule(
            &conn.target,
            conn.opened_at,
            conn.last_used,
            conn.failback_after,
        );
        match rule {
            Checkout::Leave("failback") => {
                return Err((
                    "failback",
                    "an endpoint preferred to this connection's is up again (failback)",
                ));
            }
            Checkout::Leave(label) => {
                return Err((
                    label,
                    "the connection's endpoint is marked down and it was not used since the \
                     endpoint last failed",
                ));
            }
            Checkout::Keep | Checkout::Check => {}
        }
        if now >= conn.recycle_at {
            return Err((
                "recycle_deadline",
                "the connection reached its recycle deadline",
            ));
        }
        let in_transaction = matches!(
            conn.session.status(),
            TransactionStatus::InTransaction | TransactionStatus::Failed
        ) || conn.client.tracks_a_transaction();
        let settings_changed = conn.session.settings_changed();
        let idle =
            now.duration_since(conn.last_used) > self.ping_after_idle || rule == Checkout::Check;
        if !(in_transaction || settings_changed || idle) {
            // The common path: no I/O.
            return Ok(now);
        }
        // If this checkout is dropped while the round trip below is in flight (bb8's checkout
        // timeout), `has_broken` sees the flag and the connection is discarded, never queued
        // again half-checked.
        conn.checking = true;
        let reset = async {
            if in_transaction {
                if !conn.client.run("ROLLBACK").await {
                    return Err(());
                }
                conn.client.transaction_ended();
            }
            if settings_changed && !conn.client.run(C::RESET).await {
                return Err(());
            }
            let ping = !(in_transaction || settings_changed);
            if ping && !conn.client.run("").await {
                return Err(());
            }
            Ok(())
        };
        let label = if in_transaction || settings_changed {
            "dirty"
        } else {
            "ping_failed"
        };
        match tokio::time::timeout(self.ping_timeout, reset).await {
            Ok(Ok(())) if conn.session.status() == TransactionStatus::Idle => {}
            Ok(Ok(())) => {
                return Err((
                    "dirty",
                    "the connection is still inside a transaction after ROLLBACK",
                ));
            }
            Ok(Err(_)) => {
                return Err((
                    label,
                    "the connection failed its check (ping, or ROLLBACK / RESET ALL of a \
                     dirty session)",
                ));
            }
            Err(_) => {
                return Err((
                    label,
                    "the connection did not answer its check within ping_timeout",
                ));
            }
        }
        if settings_changed {
            conn.session.settings_reset();
        }
        conn.checking = false;
        Ok(Instant::now())
    }
}

/// Counts a pool's open and checked-out connections for the `dsql_pool_connections` gauges.
#[derive(Debug)]
struct PoolCounts {
    open: std::sync::atomic::AtomicI64,
    in_use: std::sync::atomic::AtomicI64,
    /// Open connections to an endpoint other than the preferred one (the failback sweeper's).
    away: std::sync::atomic::AtomicI64,
    metrics: crate::telemetry::PoolMetrics,
}

impl PoolCounts {
    fn new(endpoint: &str) -> Self {
        PoolCounts {
            open: Default::default(),
            in_use: Default::default(),
            away: Default::default(),
            metrics: crate::telemetry::PoolMetrics::new(endpoint),
        }
    }

    fn publish(&self) {
        let open = self.open.load(Ordering::Relaxed);
        let in_use = self.in_use.load(Ordering::Relaxed);
        self.metrics.connections(open - in_use, in_use);
    }
}

/// A connection's membership in its pool's counts: counted open while alive, in use between
/// checkout and return.
struct PoolMember {
    counts: Arc<PoolCounts>,
    in_use: bool,
    /// Connected to an endpoint other than the preferred one.
    away: bool,
}

impl PoolMember {
    fn new(counts: Arc<PoolCounts>, away: bool) -> Self {
        counts.open.fetch_add(1, Ordering::Relaxed);
        if away {
            counts.away.fetch_add(1, Ordering::Relaxed);
        }
        counts.publish();
        PoolMember {
            counts,
            in_use: false,
            away,
        }
    }

    fn set_in_use(&mut self, in_use: bool) {
        if self.in_use != in_use {
            self.in_use = in_use;
            self.counts
                .in_use
                .fetch_add(if in_use { 1 } else { -1 }, Ordering::Relaxed);
            self.counts.publish();
        }
    }
}

impl Drop for PoolMember {
    fn drop(&mut self) {
        self.counts.open.fetch_sub(1, Ordering::Relaxed);
        if self.away {
            self.counts.away.fetch_sub(1, Ordering::Relaxed);
        }
        if self.in_use {
            self.counts.in_use.fetch_sub(1, Ordering::Relaxed);
        }
        self.counts.publish();
    }
}

/// bb8's error sink: what bb8 would otherwise drop silently goes to `tracing`. Connect errors
/// are logged (at `warn`) where they happen, so they are logged here only at `debug`.
#[derive(Debug, Clone, Copy)]
struct TracingErrorSink;

impl bb8::ErrorSink<Error> for TracingErrorSink {
    fn sink(&self, error: Error) {
        tracing::debug!(%error, "DSQL pool");
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<Error>> {
        Box::new(*self)
    }
}

impl From<bb8::RunError<Error>> for Error {
    /// Turns a checkout failure into this crate's error: the connect error itself, or
    /// [`Error::PoolTimeout`].
    fn from(error: bb8::RunError<Error>) -> Error {
        match error {
            bb8::RunError::User(error) => error,
            bb8::RunError::TimedOut => Error::PoolTimeout,
        }
    }
}

/// A pooled connection checked out of a [`DsqlPool`].
pub type DsqlPooledConnection<'a, C = tokio_postgres::Client> =
    bb8::PooledConnection<'a, DsqlConnectionManager<C>>;

/// A `bb8` pool of DSQL connections ([`DsqlConnector::pool`]): everything a
/// `bb8::Pool<DsqlConnectionManager>` is (it derefs to one), with checkouts that return this
/// crate's [`Error`], so `pool.get().await?` works in any function whose error type converts
/// from [`Error`].
///
/// What a checkout returns when no connection can be had:
///
/// - when the connect the pool started for it fails (access denied, TLS, an unknown role,
///   or a transient failure that lasted past the connect deadline), **that error**, as soon as
///   the connect gives up: a permanent refusal is returned after one attempt, not after the
///   pool's `connection_timeout`;
/// - otherwise [`Error::PoolTimeout`] once `connection_timeout` (10 s) passes: every
///   connection busy, or connects still being retried.
///
/// Cheap to clone (bb8's pool is an `Arc` inside).
pub struct DsqlPool<C: PoolClient = tokio_postgres::Client> {
    pool: bb8::Pool<DsqlConnectionManager<C>>,
    connector: DsqlConnector,
    /// The failback sweeper runs while a clone holds this.
    _alive: Arc<()>,
    failures: Arc<ConnectFailures>,
    counts: Arc<PoolCounts>,
    endpoint: Arc<str>,
}

impl<C: PoolClient> Clone for DsqlPool<C> {
    fn clone(&self) -> Self {
        DsqlPool {
            pool: self.pool.clone(),
            connector: self.connector.clone(),
            _alive: self._alive.clone(),
            failures: self.failures.clone(),
            counts: self.counts.clone(),
            endpoint: self.endpoint.clone(),
        }
    }
}

impl<C: PoolClient> std::fmt::Debug for DsqlPool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsqlPool")
            .field("state", &self.pool.state())
            .finish_non_exhaustive()
    }
}

impl<C: PoolClient> Deref for DsqlPool<C> {
    type Target = bb8::Pool<DsqlConnectionManager<C>>;

    fn deref(&self) -> &Self::Target {
        &self.pool
    }
}

impl<C: PoolClient> From<DsqlPool<C>> for bb8::Pool<DsqlConnectionManager<C>> {
    fn from(pool: DsqlPool<C>) -> Self {
        pool.pool
    }
}

impl<C: PoolClient> DsqlPool<C> {
    /// Wraps a pool built with [`DsqlConnector::pool_builder`] and `manager` (the manager it was
    /// built with, or a clone of it: the two share where connect errors go).
    ///
    /// With several endpoints, and called inside a tokio runtime, it also starts the pool's
    /// failback sweeper (see [`DsqlConnectionManager`]), which ends with the last clone.
    pub fn new(
        pool: bb8::Pool<DsqlConnectionManager<C>>,
        manager: &DsqlConnectionManager<C>,
    ) -> Self {
        let alive = Arc::new(());
        if manager.connector.config().endpoints().len() > 1
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(sweep_failback(
                pool.clone(),
                manager.connector.clone(),
                manager.counts.clone(),
                Arc::downgrade(&alive),
            ));
        }
        DsqlPool {
            pool,
            connector: manager.connector.clone(),
            failures: manager.failures.clone(),
            counts: manager.counts.clone(),
            endpoint: manager.endpoint.clone(),
            _alive: alive,
        }
    }

    /// Checks out a connection (see the type's docs for the errors).
    pub async fn get(&self) -> Result<DsqlPooledConnection<'_, C>, Error> {
        self.checkout(self.pool.get()).await
    }

    /// Checks out a connection that does not borrow the pool (for `'static` tasks).
    pub async fn get_owned(&self) -> Result<DsqlPooledConnection<'static, C>, Error> {
        self.checkout(self.pool.get_owned()).await
    }

    /// The `bb8` pool.
    pub fn inner(&self) -> &bb8::Pool<DsqlConnectionManager<C>> {
        &self.pool
    }

    /// The connector the pool opens its connections with.
    pub fn connector(&self) -> &DsqlConnector {
        &self.connector
    }

    async fn checkout<P>(
        &self,
        checkout: impl Future<Output = Result<P, bb8::RunError<Error>>>,
    ) -> Result<P, Error> {
        let started = Instant::now();
        let span = tracing::debug_span!(
            "dsql.pool.checkout",
            endpoint = %self.endpoint,
            wait_ms = tracing::field::Empty
        );
        let result = self
            .wait_for(checkout, started)
            .instrument(span.clone())
            .await;
        let waited = started.elapsed();
        span.record("wait_ms", waited.as_millis() as u64);
        self.counts.metrics.checkout_wait(waited);
        result
    }

    async fn wait_for<P>(
        &self,
        checkout: impl Future<Output = Result<P, bb8::RunError<Error>>>,
        started: Instant,
    ) -> Result<P, Error> {
        let _waiting = Waiting::new(&self.failures);
        let mut checkout = std::pin::pin!(checkout);
        loop {
            let mut failed = std::pin::pin!(self.failures.notify.notified());
            failed.as_mut().enable();
            if let Some(error) = self.failures.take_since(started) {
                return Err(error);
            }
            // A permanent refusal just given, and no connection open (none idle, none to come
            // back): the answer is the same refusal. Without this a checkout that starts
            // between the refusal reaching the previous waiter and bb8 recording that connect
            // as failed would get no connect of its own (bb8 grants none while one is pending,
            // and none after it fails) and wait for `connection_timeout`.
            // The connector's own memory decides (per endpoint and access key: credentials
            // rotated since are tried); the pool's note of a recent refusal only says when to ask.
            if self.failures.refused_recently()
                && self.pool.state().connections == 0
                && let Some(refusal) = self
                    .connector
                    .remembered_refusal(self.connector.config().connect_deadline())
                    .await
            {
                return Err(refusal);
            }
            tokio::select! {
                biased;
                result = &mut checkout => return result.map_err(Error::from),
                () = failed => {}
            }
        }
    }
}

/// A pool's failback sweeper: while pools move back to a recovered endpoint (or hold
/// connections on the peer while the preferred one serves), idle connections are never checked
/// out (LIFO hands out the warm ones), so every second (jittered) it checks out the idle ones
/// briefly; the checkout rule replaces each whose share of the failback window
/// has passed, and the pool's `min_idle` opens the replacements on the recovered endpoint.
/// Ends when `alive` is gone (the last `DsqlPool` clone dropped).
async fn sweep_failback<C: PoolClient>(
    pool: bb8::Pool<DsqlConnectionManager<C>>,
    connector: DsqlConnector,
    counts: Arc<PoolCounts>,
    alive: std::sync::Weak<()>,
) {
    loop {
        tokio::time::sleep(Duration::from_millis(500 + fastrand::u64(0..1000))).await;
        if alive.upgrade().is_none() {
            return;
        }
        // Connections away from the preferred endpoint while it serves (a connect failed over
        // without the endpoint being marked down), or a failback under way.
        let away = counts.away.load(Ordering::Relaxed) > 0 && connector.serving_index() == 0;
        if !away && !connector.failback_in_progress() {
            continue;
        }
        let idle = pool.state().idle_connections;
        let mut held = Vec::with_capacity(idle as usize);
        for _ in 0..idle {
            // Only idle connections: a checkout that would wait for a connect is not wanted.
            // 50 ms lets an in-Region idle ping finish (one cut short discards its connection).
            match tokio::time::timeout(Duration::from_millis(50), pool.get()).await {
                Ok(Ok(conn)) => held.push(conn),
                _ => break,
            }
        }
        drop(held);
    }
}

impl DsqlConnector {
    /// A `bb8` pool with DSQL defaults, each chosen for a reason:
    ///
    /// | setting | default | why |
    /// |---|---|---|
    /// | `max_size` | [`DEFAULT_MAX_SIZE`] (10) | DSQL's limits are per cluster; raise per service |
    /// | `min_idle` | [`DEFAULT_MIN_IDLE`] (1) | one warm connection after quiet spells |
    /// | `idle_timeout` | 10 min | as the AWS DSQL connectors |
    /// | `connection_timeout` | 10 s | fail fast in an outage rather than queue |
    /// | `test_on_check_out` | on | enforces the recycle deadline at checkout; no I/O unless idle > 60 s |
    /// | `max_lifetime` | the config's (55 min) | the server cuts at 60; a transaction may last 5 |
    /// | `reaper_rate` | a quarter of `max_lifetime`, at most 30 s | expired idle connections go soon |
    /// | `queue_strategy` | LIFO | the most recently used connection is reused: it is warm, and under light load the surplus idles out after `idle_timeout` instead of being cycled forever |
    /// | `retry_connection` | off | the manager retries transient failures itself, with backoff inside the connect deadline, and fails permanent ones at once; bb8's own retry would try a permanent refusal again and again |
    ///
    /// Each connect the pool starts is bounded by the connector's
    /// [`connect_timeout`](crate::DsqlConfigBuilder::connect_timeout) per attempt and
    /// [`connect_deadline`](crate::DsqlConfigBuilder::connect_deadline) overall, so a peer that
    /// never answers holds a pool slot for at most that long.
    ///
    /// Connections get individual recycle deadlines (see [`DsqlConnectionManager`]). Opens
    /// [`DEFAULT_MIN_IDLE`] connection before returning, so a bad configuration fails here, at
    /// once, with the connect error itself.
    pub async fn pool(&self) -> Result<DsqlPool, Error> {
        self.pool_with(|builder| builder).await
    }

    /// [`pool`](Self::pool) with the defaults changed by `tune`, e.g.
    /// `connector.pool_with(|b| b.max_size(32)).await?`.
    pub async fn pool_with(
        &self,
        tune: impl FnOnce(bb8::Builder<DsqlConnectionManager>) -> bb8::Builder<DsqlConnectionManager>,
    ) -> Result<DsqlPool, Error> {
        let manager = DsqlConnectionManager::new(self.clone());
        let pool = tune(self.pool_builder()).build(manager.clone()).await?;
        Ok(DsqlPool::new(pool, &manager))
    }

    /// The builder behind [`pool`](Self::pool), with the same defaults, to tune before
    /// `build(DsqlConnectionManager::new(connector))`. Keep `test_on_check_out` on: it is what
    /// keeps expired connections from being handed out.
    pub fn pool_builder(&self) -> bb8::Builder<DsqlConnectionManager> {
        self.pool_builder_for()
    }

    /// [`pool_builder`](Self::pool_builder) for any [`PoolClient`].
    pub(crate) fn pool_builder_for<C: PoolClient>(&self) -> bb8::Builder<DsqlConnectionManager<C>> {
        let max_lifetime = self.config().max_lifetime();
        bb8::Pool::builder()
            .max_size(DEFAULT_MAX_SIZE)
            .min_idle(Some(DEFAULT_MIN_IDLE))
            .idle_timeout(Some(DEFAULT_IDLE_TIMEOUT))
            .connection_timeout(DEFAULT_CONNECTION_TIMEOUT)
            .test_on_check_out(true)
            .max_lifetime(Some(max_lifetime))
            .reaper_rate((max_lifetime / 4).min(Duration::from_secs(30)))
            .queue_strategy(bb8::QueueStrategy::Lifo)
            .retry_connection(false)
            .error_sink(Box::new(TracingErrorSink))
    }
}

#[cfg(feature = "deadpool")]
mod deadpool;
#[cfg(feature = "deadpool")]
pub use self::deadpool::{DEFAULT_DEADPOOL_WAIT_TIMEOUT, DsqlDeadpool, DsqlDeadpoolManager};

#[cfg(test)]
mod tests {
    use super::*;
    use aws_credential_types::Credentials;

    async fn manager(max_lifetime: Duration) -> DsqlConnectionManager {
        let config = crate::DsqlConfig::builder()
            .host("abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws")
            .max_lifetime(max_lifetime)
            .credentials_provider(Credentials::from_keys("AK", "s", None))
            .build()
            .unwrap();
        DsqlConnectionManager::new(DsqlConnector::new(config).await.unwrap())
    }

    #[tokio::test]
    async fn deadlines_spread_over_the_last_tenth_of_the_lifetime() {
        let manager = manager(Duration::from_secs(3300)).await;
        let opened = Instant::now();
        let offsets: Vec<f64> = (0..10_000)
            .map(|_| {
                manager
                    .deadline_for(opened)
                    .duration_since(opened)
                    .as_secs_f64()
            })
            .collect();
        // Every deadline is within [49.5 min, 55 min].
        assert!(offsets.iter().all(|s| (2970.0..=3300.0).contains(s)));
        // Spread: uniform over the window, so each tenth of it gets about 1 000 samples.
        let mut buckets = [0u32; 10];
        for s in &offsets {
            buckets[(((s - 2970.0) / 33.0) as usize).min(9)] += 1;
        }
        assert!(
            buckets.iter().all(|n| (800..1200).contains(n)),
            "{buckets:?}"
        );
        let mean = offsets.iter().sum::<f64>() / offsets.len() as f64;
        assert!((mean - 3135.0).abs() < 5.0, "mean {mean}");
    }

    #[tokio::test]
    async fn zero_jitter_gives_exactly_the_lifetime() {
        let manager = manager(Duration::from_secs(120))
            .await
            .jitter(Duration::ZERO);
        let opened = Instant::now();
        assert_eq!(
            manager.deadline_for(opened),
            opened + Duration::from_secs(120)
        );
        let manager = manager.jitter(Duration::from_secs(1000));
        assert!(manager.deadline_for(opened) >= opened);
    }

    #[tokio::test]
    async fn pool_builder_carries_the_dsql_defaults() {
        let manager = manager(Duration::from_secs(3300)).await;
        let pool = manager
            .connector()
            .pool_builder()
            .build_unchecked(manager.clone());
        let config = pool.config();
        assert_eq!(config.max_size, DEFAULT_MAX_SIZE);
        assert_eq!(config.min_idle, Some(DEFAULT_MIN_IDLE));
        assert_eq!(config.idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
        assert_eq!(config.connection_timeout, DEFAULT_CONNECTION_TIMEOUT);
        assert!(config.test_on_check_out);
        assert_eq!(config.max_lifetime, Some(Duration::from_secs(3300)));
        assert!(matches!(config.queue_strategy, bb8::QueueStrategy::Lifo));
        assert!(!config.retry_connection);
    }

    #[test]
    fn checkout_timeout_is_a_clear_error() {
        let error = Error::from(bb8::RunError::<Error>::TimedOut);
        assert!(matches!(error, Error::PoolTimeout));
        assert!(
            error
                .to_string()
                .contains("timed out waiting for a DSQL connection")
        );
    }
}
