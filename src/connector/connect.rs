//! The connect path: attempts within a deadline, each with a token and the client-side rate
//! limit, over TLS; DSQL's refusals classified into this crate's errors, the transient ones
//! retried with backoff, the next endpoint tried when one fails at the network.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use super::{Connected, DsqlConnector, Target, after};
use crate::Error;
use crate::admission::{self, Refusal};
use crate::error::{AccessDeniedReason, UnavailableReason};
use crate::session::SessionWatch;
use crate::token::AuthToken;

/// Marks a connection closed when dropped: its task ended, or was dropped unfinished.
struct ClosedOnDrop(Arc<SessionWatch>);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        self.0.set_closed();
    }
}

/// A wait for the client-side rate limit must leave at least this much of the connect
/// deadline (or `connect_timeout`, if shorter) to the attempt it is for.
const MIN_ATTEMPT: Duration = Duration::from_millis(500);

/// Which failed attempts [`DsqlConnector::connect_within`] tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// DSQL's transient refusals (and one expired signature).
    Refusals,
    /// Those, and every other transient failure ([`Error::is_transient`]).
    Transient,
}

impl DsqlConnector {
    /// Opens a connection and spawns its connection task on the current tokio runtime. The
    /// task's error, if the connection ends with one, is logged with `tracing` at `warn`.
    ///
    /// How refusals are handled (see [`guide::refusals`](crate::guide::refusals)):
    ///
    /// - `rate exceeded`, `too many open connections`, `waking up`: tried again after a backoff
    ///   with full jitter (at most 2 s), with the same token, until
    ///   [`connect_deadline`](crate::DsqlConfigBuilder::connect_deadline); then
    ///   [`Error::Unavailable`].
    /// - access denied: the cached token is dropped (the next connect asks the credentials
    ///   provider again). `Signature expired` is tried once more at once with a freshly signed
    ///   token; every other reason fails at once with [`Error::AccessDenied`].
    /// - an attempt running past [`connect_timeout`](crate::DsqlConfigBuilder::connect_timeout):
    ///   [`Error::ConnectTimeout`], not retried (with several endpoints: the next endpoint is
    ///   tried, see the type's docs). TLS failures: [`Error::Tls`].
    pub async fn connect(&self) -> Result<tokio_postgres::Client, Error> {
        let deadline = after(self.inner.config.connect.deadline);
        let connected = self.connect_within(deadline, Retry::Refusals).await?;
        Ok(connected.client)
    }

    /// [`connect`](Self::connect) with the retries a pool's connects get: DSQL's admission
    /// refusals **and** every other transient failure ([`Error::is_transient`]: an I/O error,
    /// an attempt past `connect_timeout`, a server starting or shutting down) are tried again
    /// with backoff and full jitter until
    /// [`connect_deadline`](crate::DsqlConfigBuilder::connect_deadline); permanent failures
    /// (access denied, TLS, an unknown role) fail at once. Use it for connections that no pool
    /// of this crate opens: another pool's manager, a long-lived listener.
    pub async fn connect_with_retries(&self) -> Result<tokio_postgres::Client, Error> {
        let deadline = after(self.inner.config.connect.deadline);
        let connected = self.connect_within(deadline, Retry::Transient).await?;
        Ok(connected.client)
    }

    /// [`connect`](Self::connect) with an explicit deadline; with [`Retry::Transient`], I/O
    /// failures, attempt timeouts and a server that is starting or shutting down are retried
    /// with backoff too (the pool's connects, which have no caller to retry them).
    pub(crate) async fn connect_within(
        &self,
        deadline: Instant,
        retry: Retry,
    ) -> Result<Connected, Error> {
        let config = &self.inner.config;
        let span = tracing::info_span!(
            "dsql.connect",
            endpoint = tracing::field::Empty,
            user = %config.user,
            region = tracing::field::Empty,
            negotiation = ?config.ssl_negotiation,
            attempts = tracing::field::Empty,
            outcome = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let started = Instant::now();
        let mut attempts = 0;
        let mut last = self.serving().clone();
        let result = self
            .attempts(deadline, retry, &mut attempts, &mut last)
            .instrument(span.clone())
            .await;
        let took = started.elapsed();
        span.record("endpoint", last.described.as_str());
        span.record("region", last.region.as_str());
        span.record("attempts", attempts);
        span.record("duration_ms", took.as_millis() as u64);
        match &result {
            Ok(_) => {
                span.record("outcome", "connected");
                crate::telemetry::connection_opened(&last.endpoint);
                crate::telemetry::connect_duration(&last.endpoint, took);
            }
            Err(error) => {
                let reason = crate::telemetry::connect_error_reason(error);
                span.record("outcome", reason);
                crate::telemetry::connect_error(&last.endpoint, reason);
            }
        }
        result
    }

    /// The refusal a connect begun now would get from the refusal memory without a login (the
    /// endpoint it would try first, with the current credentials), if any. Signs a token (or
    /// takes the cached one) within `bound`.
    pub(crate) async fn remembered_refusal(&self, bound: Duration) -> Option<Error> {
        let target = self.pick(&vec![false; self.inner.targets.len()]).clone();
        let token = tokio::time::timeout(bound, target.tokens.get())
            .await
            .ok()?
            .ok()?;
        target.remembered_refusal(&token)
    }

    /// The attempts of [`connect_within`](Self::connect_within), counted in `attempts`; `last`
    /// is the endpoint of the last attempt.
    async fn attempts(
        &self,
        deadline: Instant,
        retry: Retry,
        attempts: &mut u32,
        last: &mut Arc<Target>,
    ) -> Result<Connected, Error> {
        let several = self.inner.targets.len() > 1;
        let mut backoffs = 0;
        let mut resigned = false;
        // Endpoints that failed at the network during this connect.
        let mut failed_here = vec![false; self.inner.targets.len()];
        // The last transient refusal, retried after a backoff.
        let mut last_refusal: Option<Error> = None;
        // Which endpoint answered it, and when that attempt began (a waking-up refusal that
        // outlasts the deadline is one failure of that endpoint).
        let mut refused_by: Option<(usize, Instant)> = None;
        loop {
            let target = self.pick(&failed_here).clone();
            *last = target.clone();
            let attempt_started = Instant::now();
            let outcome = match self.token_within(&target, deadline).await {
                Err(error) => Err(error),
                Ok(token) => {
                    if let Some(refusal) = target.remembered_refusal(&token) {
                        return Err(refusal);
                    }
                    if let Err(timeout) = self.wait_for_rate_limit(deadline, &target).await {
                        // A refusal being retried says more than the limiter's timeout.
                        self.record_still_waking(&last_refusal, refused_by);
                        return Err(last_refusal.unwrap_or(timeout));
                    }
                    *attempts += 1;
                    self.attempt(&target, token, deadline).await
                }
            };
            let error = match outcome {
                Ok((client, session)) => {
                    self.record_success(&target, "a connect succeeded");
                    if target.throttle.admitted() {
                        tracing::info!(
                            endpoint = %target.described,
                            "DSQL admits connections again; the connect throttle is lifted"
                        );
                    }
                    return Ok(Connected {
                        client,
                        session,
                        target,
                    });
                }
                Err(AttemptError::Refused(source, token)) => {
                    let error = self.connect_error(&target, source, *attempts);
                    if !matches!(
                        &error,
                        Error::AccessDenied {
                            reason: AccessDeniedReason::SignatureExpired,
                            ..
                        }
                    ) || resigned
                    {
                        target.remember_refusal(&error, &token);
                    }
                    if matches!(error, Error::AccessDenied { .. }) {
                        // The credentials may have been rotated or revoked, or the token is
                        // stale: forget it, unless it was replaced already.
                        if target.tokens.invalidate_refused(&token)
                            && let Some(cache) = &self.inner.credentials_cache
                        {
                            cache.forget();
                        }
                    }
                    error
                }
                Err(AttemptError::TimedOut(error)) => error,
                // The deadline cut the attempt short: the deadline's doing, not the endpoint's
                // (nothing is recorded against it for this attempt). After a refusal that was
                // being retried, that refusal says more than the timeout.
                Err(AttemptError::DeadlinePassed(error)) => {
                    // An endpoint still waking up when the deadline came is one failure of it,
                    // whether the deadline came during a backoff or during an attempt.
                    self.record_still_waking(&last_refusal, refused_by);
                    return Err(last_refusal.unwrap_or(error));
                }
            };
            let retry_after_backoff = match &error {
                Error::AccessDenied { reason, .. } => {
                    if *reason == AccessDeniedReason::SignatureExpired && !resigned {
                        resigned = true;
                        tracing::info!(
                            endpoint = %target.described,
                            "DSQL refused the token as expired; retrying once with a fresh one"
                        );
                        continue;
                    }
                    false
                }
                Error::UnknownRole { .. } => false,
                Error::Unavailable { reason, .. } => {
                    if matches!(
                        reason,
                        UnavailableReason::RateExceeded | UnavailableReason::TooManyConnections
                    ) && let Some(rate) = target.throttle.refused(Instant::now())
                    {
                        tracing::info!(
                            endpoint = %target.described,
                            %reason,
                            per_second = rate,
                            "DSQL refused for its admission limits; new connections to this \
                             endpoint are throttled"
                        );
                    }
                    true
                }
                other if means_endpoint_down(other) => {
                    self.record_failure(&target, other, attempt_started);
                    if several {
                        failed_here[target.index] = true;
                        if failed_here.iter().any(|failed| !failed) {
                            // This connect tries the next endpoint at once, whether or not
                            // this endpoint is marked down for the others yet.
                            continue;
                        }
                    }
                    retry == Retry::Transient && other.is_transient()
                }
                other => retry == Retry::Transient && other.is_transient(),
            };
            if !retry_after_backoff {
                return Err(error);
            }
            backoffs += 1;
            let delay = match &error {
                Error::Unavailable { reason, .. } => admission::backoff_after(*reason, backoffs),
                _ => admission::backoff(backoffs),
            };
            if Instant::now()
                .checked_add(delay)
                .is_none_or(|at| at >= deadline)
            {
                if let Error::Unavailable {
                    reason: UnavailableReason::WakingUp,
                    ..
                } = &error
                {
                    // Still waking up after the whole connect deadline: one failure of the
                    // endpoint, for practical purposes.
                    self.record_failure(&target, &error, attempt_started);
                }
                return Err(error);
            }
            // Another round over every endpoint.
            failed_here.fill(false);
            tracing::debug!(
                endpoint = %target.described,
                %error,
                attempt = *attempts,
                delay_ms = delay.as_millis() as u64,
                "could not connect to DSQL; retrying after a backoff"
            );
            last_refusal = matches!(error, Error::Unavailable { .. }).then_some(error);
            refused_by = Some((target.index, attempt_started));
            tokio::time::sleep(delay).await;
        }
    }

    /// A waking-up refusal still being retried when the deadline came: one failure of the
    /// endpoint that answered it, dated by the attempt it answered (the attempt the deadline cut,
    /// or the wait before it, is no evidence of its own).
    fn record_still_waking(&self, refusal: &Option<Error>, refused_by: Option<(usize, Instant)>) {
        if let (
            Some(
                refusal @ Error::Unavailable {
                    reason: UnavailableReason::WakingUp,
                    ..
                },
            ),
            Some((index, started)),
        ) = (refusal, refused_by)
            && let Some(target) = self.inner.targets.get(index)
        {
            self.record_failure(target, refusal, started);
        }
    }

    /// The token for an attempt on `target`, within `deadline` (a slow re-sign is bounded by
    /// `credentials_timeout`; one that outlasts the deadline is the deadline's doing).
    pub(super) async fn token_within(
        &self,
        target: &Target,
        deadline: Instant,
    ) -> Result<AuthToken, AttemptError> {
        match tokio::time::timeout_at(deadline, target.tokens.get()).await {
            Ok(token) => token.map_err(AttemptError::TimedOut),
            Err(_) => Err(AttemptError::DeadlinePassed(Error::ConnectTimeout {
                endpoint: target.described.clone(),
                timeout: self.inner.config.connect.deadline,
                during: "the connect deadline (connect_deadline) ran out while a token was \
                         signed (credentials_timeout bounds the credentials call)",
            })),
        }
    }

    /// One connect attempt to `target` with `token`, bounded by `connect_timeout` and
    /// `deadline`; spawns the connection task when it succeeds.
    pub(super) async fn attempt(
        &self,
        target: &Target,
        token: AuthToken,
        deadline: Instant,
    ) -> Result<(tokio_postgres::Client, Arc<SessionWatch>), AttemptError> {
        let settings = &self.inner.config.connect;
        let mut postgres = target.postgres.clone();
        postgres.password(token.as_str());
        let left = deadline.saturating_duration_since(Instant::now());
        let bound = settings.timeout.min(left);
        let (tls, watch) = self.inner.tls.watched();
        match tokio::time::timeout(bound, postgres.connect(tls)).await {
            Ok(Ok((client, connection))) => {
                let endpoint = target.described.clone();
                let ended = watch.clone();
                let mut connection = connection;
                tokio::spawn(async move {
                    // Also when the task is dropped unfinished (its runtime shut down): a local
                    // of the suspended task, dropped before the captured `connection`.
                    let _closed_on_drop = ClosedOnDrop(ended.clone());
                    // Marked closed before the connection is dropped, which is what fails the
                    // requests still waiting on it: whoever sees such a failure sees it closed.
                    let result = std::future::poll_fn(|cx| {
                        let polled = std::pin::Pin::new(&mut connection).poll(cx);
                        if polled.is_ready() {
                            ended.set_closed();
                        }
                        polled
                    })
                    .await;
                    if let Err(error) = result {
                        tracing::warn!(%endpoint, %error, "DSQL connection ended with an error");
                    }
                });
                Ok((client, watch))
            }
            Ok(Err(source)) => Err(AttemptError::Refused(source, token)),
            // An attempt the deadline left (nearly) all of `connect_timeout` ran out on the
            // endpoint's silence, not on the deadline (a deadline derived from
            // `connect_timeout` alone is exactly one attempt per endpoint).
            Err(_) if bound < settings.timeout.mul_f64(0.9) => {
                Err(AttemptError::DeadlinePassed(Error::ConnectTimeout {
                    endpoint: target.described.clone(),
                    timeout: bound,
                    during: "the connect deadline (connect_deadline) ran out during an attempt",
                }))
            }
            Err(_) => Err(AttemptError::TimedOut(Error::ConnectTimeout {
                endpoint: target.described.clone(),
                timeout: settings.timeout,
                during: "one attempt: TCP, TLS, startup and authentication (connect_timeout)",
            })),
        }
    }

    /// Waits for the client-side rate limit, if one is set, or fails if the wait would pass the
    /// deadline.
    async fn wait_for_rate_limit(&self, deadline: Instant, target: &Target) -> Result<(), Error> {
        let now = Instant::now();
        // The attempt after the wait needs time of its own.
        let room = MIN_ATTEMPT.min(self.inner.config.connect.timeout);
        let latest = deadline.checked_sub(room).unwrap_or(now);
        // The configured limit, then the adaptive throttle while the endpoint refuses for its
        // admission limits. Cancelled during a sleep, a reservation gives its token back.
        for bucket in [target.limiter.as_ref(), target.throttle.bucket()]
            .into_iter()
            .flatten()
        {
            match bucket.reserve(Instant::now(), latest) {
                Some(reservation) => {
                    tokio::time::sleep(reservation.wait()).await;
                    reservation.keep();
                }
                None => {
                    return Err(Error::ConnectTimeout {
                        endpoint: target.described.clone(),
                        timeout: self.inner.config.connect.deadline,
                        during: "the wait for the client-side connect rate limit would leave \
                                 too little of the connect deadline for an attempt \
                                 (connect_rate_limit or the throttle after rate exceeded, \
                                 connect_deadline)",
                    });
                }
            }
        }
        Ok(())
    }

    /// Turns the error of a connect made outside the connector (with
    /// [`postgres_config`](Self::postgres_config), [`tls`](Self::tls) and a
    /// [`token`](Self::token), e.g. by another pool) into this crate's typed error, exactly as
    /// [`connect`](Self::connect) does: [`Error::AccessDenied`] with the HINT's reason,
    /// [`Error::Unavailable`], [`Error::Tls`] or [`Error::Connect`]. On access denied the cached
    /// token is dropped, so the next [`token`](Self::token) asks the credentials provider again.
    /// (The preferred endpoint's: that is what those three describe.)
    pub fn classify_connect_error(&self, source: tokio_postgres::Error) -> Error {
        let target = &self.inner.targets[0];
        let error = self.connect_error(target, source, 1);
        if matches!(error, Error::AccessDenied { .. }) {
            target.tokens.invalidate_current();
        }
        error
    }

    /// Classifies a failed attempt on `target` (see [`admission::classify`]).
    pub(super) fn connect_error(
        &self,
        target: &Target,
        source: tokio_postgres::Error,
        attempts: u32,
    ) -> Error {
        let endpoint = target.described.clone();
        if let Some(db) = source.as_db_error() {
            match admission::classify(db.code().code(), db.message(), db.hint()) {
                Some(Refusal::AccessDenied(reason)) => {
                    let hint = db.hint().unwrap_or_default().to_owned();
                    return Error::AccessDenied {
                        endpoint,
                        reason,
                        hint,
                        source: Arc::new(source),
                    };
                }
                Some(Refusal::Unavailable(reason)) => {
                    return Error::Unavailable {
                        endpoint,
                        reason,
                        attempts,
                        source,
                    };
                }
                None => {}
            }
            if db.code().code() == "28000" && db.message().ends_with("does not exist") {
                return Error::UnknownRole {
                    endpoint,
                    role: self.inner.config.user.clone(),
                    source: Arc::new(source),
                };
            }
        }
        if is_tls_failure(&source) {
            return Error::Tls {
                host: target.endpoint.clone(),
                source,
            };
        }
        Error::Connect { endpoint, source }
    }
}

/// How one connect attempt failed.
pub(super) enum AttemptError {
    /// The server or the network refused it, with this token: classified by
    /// [`DsqlConnector::connect_error`].
    Refused(tokio_postgres::Error, AuthToken),
    /// It ran out of `connect_timeout` (or no token could be had): already this crate's error.
    TimedOut(Error),
    /// The connect deadline ran out during it.
    DeadlinePassed(Error),
}

/// Whether a failed attempt says its endpoint is down: the network failed (TCP, TLS, a silent
/// server, a server closing or restarting), not DSQL's answer to this client.
pub(super) fn means_endpoint_down(error: &Error) -> bool {
    match error {
        Error::Tls { .. } | Error::ConnectTimeout { .. } => true,
        Error::Connect { .. } => error.is_transient(),
        _ => false,
    }
}

fn is_tls_failure(error: &tokio_postgres::Error) -> bool {
    // tokio-postgres does not expose its error kinds. The cause chain holds the rustls error for
    // certificate and handshake failures; a plain I/O error (a reset, an early end of stream)
    // during the handshake is the network's, not TLS's. Otherwise its TLS kind displays as
    // below (this also covers a server that answers SSLRequest with `N`).
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<rustls::Error>() || cause.is::<rustls::pki_types::InvalidDnsNameError>() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>());
        }
        source = cause.source();
    }
    error
        .to_string()
        .starts_with("error performing TLS handshake")
}
