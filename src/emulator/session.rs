//! One client connection: TLS negotiation, SNI, the startup message, the token, then a relay to
//! the upstream PostgreSQL until the client leaves, the maximum age passes, or a fault drops it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::LazyConfigAcceptor;

use super::auth::{ACCESS_DENIED_CODE, ACCESS_DENIED_MESSAGE};
use super::latency::Line;
use super::startup::check_startup;
use super::wire::{self, send_fatal, send_fatal_with_hint};
use super::{Network, Rejection, Shared, sql};

/// How long reading the IAM role mappings at connect may take.
const IAM_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long each step of a client's negotiation may wait for the client (its first byte, its
/// startup packets, the TLS handshake, its password): a client that stalls there holds a
/// connection, and at its password an admission slot, so it is let go, as DSQL closes a
/// connection that does not go on.
pub(crate) const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);

/// `step`, bounded by [`NEGOTIATION_TIMEOUT`] (a timeout is an I/O error that ends the
/// session).
async fn bounded<T>(
    what: &'static str,
    step: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(NEGOTIATION_TIMEOUT, step)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client did not send its {what} within {NEGOTIATION_TIMEOUT:?}"),
            ))
        })
}

/// Why a granted check did not let a session in.
enum NotGranted {
    /// DSQL's access refusal, with its HINT.
    Refused(super::auth::Refusal),
    /// The mapping could not be read: DSQL answers a transient `XX000 server unavailable`,
    /// not a permanent "not authorized".
    Unavailable,
}

/// The longest password message accepted (tokens with session tokens are a few KiB).
const MAX_PASSWORD_LEN: u32 = 16 * 1024;

/// Where accepted connections are relayed with `DsqlEmulatorBuilder::relay_on`: a runtime of
/// the caller's, until the emulator drops the watch's sender.
pub(crate) struct Relay {
    runtime: tokio::runtime::Handle,
    stopped: tokio::sync::watch::Receiver<()>,
}

impl Relay {
    pub(crate) fn new(
        runtime: tokio::runtime::Handle,
        stopped: tokio::sync::watch::Receiver<()>,
    ) -> Relay {
        Relay { runtime, stopped }
    }

    /// Serves `socket` (accepted on the emulator's own runtime) on the relay's runtime, until
    /// the session ends or the emulator is dropped. Called on the emulator's own runtime,
    /// which watches the task: a runtime that has shut down (or lacks a driver) closes the
    /// connection at once, and says why in the log.
    pub(crate) fn serve(&self, socket: TcpStream, accepted: Accepted, shared: Arc<Shared>) {
        // The socket moves to the other runtime's I/O driver.
        let socket = match socket.into_std() {
            Ok(socket) => socket,
            Err(error) => {
                tracing::warn!(%error, "emulator cannot hand a connection to relay_on's runtime");
                return;
            }
        };
        let mut stopped = self.stopped.clone();
        let task = self.runtime.spawn(async move {
            let socket = match TcpStream::from_std(socket) {
                Ok(socket) => socket,
                Err(error) => {
                    tracing::warn!(%error, "emulator cannot relay on relay_on's runtime");
                    return;
                }
            };
            tokio::select! {
                () = serve(socket, accepted, shared) => {}
                // The emulator is gone: its connections close.
                _ = stopped.changed() => {}
            }
        });
        let emulator = self.stopped.clone();
        tokio::spawn(async move {
            let outcome = task.await;
            // (An emulator already dropped closed the connection itself.)
            if emulator.has_changed().is_err() {
                return;
            }
            match outcome {
                Err(error) if error.is_cancelled() => tracing::warn!(
                    "emulator: relay_on's runtime has shut down; a connection was closed \
                     (an emulator that outlives the runtime must relay on its own thread)"
                ),
                Err(error) => tracing::warn!(
                    %error,
                    "emulator: a connection's relay failed on relay_on's runtime (a runtime \
                     without its I/O and time drivers, `enable_all`, fails so)"
                ),
                Ok(()) => {}
            }
        });
    }
}

/// What a connection takes from the emulator's state when it is accepted, in the accept loop:
/// faults and settings changed after that moment apply to it as to any connection then open.
pub(crate) struct Accepted {
    at: Instant,
    /// `drop_all_connections` (and `set_down`) from the accept on: a call made while the
    /// session is still starting up cuts it before it logs in.
    drops: tokio::sync::watch::Receiver<u64>,
    /// The maximum connection age in force at the accept.
    max_age: Duration,
}

impl Accepted {
    pub(crate) fn now(shared: &Shared) -> Accepted {
        Accepted {
            at: Instant::now(),
            drops: shared.drops.subscribe(),
            max_age: Duration::from_nanos(shared.max_age.load(Ordering::SeqCst)),
        }
    }
}

/// Serves one accepted TCP connection.
pub(crate) async fn serve(socket: TcpStream, accepted: Accepted, shared: Arc<Shared>) {
    if shared.refusing.load(Ordering::SeqCst) {
        shared.count_rejection(Rejection::Refused);
        return;
    }
    let mut network = shared.network.subscribe();
    if *network.borrow_and_update() == Network::BlackHole {
        // Accepted, never answered; let go once the network changes (the client has long
        // given up by then).
        let _ = network.changed().await;
        drop(socket);
        return;
    }
    let _ = socket.set_nodelay(true);
    let mut first = [0u8; 1];
    match bounded("first byte", socket.peek(&mut first)).await {
        Ok(1) => {}
        _ => return,
    }
    let direct = first[0] == 0x16;
    let stream = Line::new(socket, shared.latency.clone()).with_activity(shared.activity.clone());
    if let Err(error) = negotiate(stream, direct, accepted, &shared).await {
        tracing::debug!(%error, "emulator session ended with an I/O error");
    }
}

async fn negotiate(
    mut stream: Line<TcpStream>,
    direct: bool,
    accepted: Accepted,
    shared: &Arc<Shared>,
) -> std::io::Result<()> {
    if direct {
        shared.count(|stats| stats.direct_tls += 1);
    } else {
        // (An SSLRequest may follow a GSSENCRequest; not a third request.)
        let mut requested_tls = false;
        for _ in 0..3 {
            let packet = bounded("startup packet", wire::read_startup_packet(&mut stream)).await?;
            match packet.code {
                wire::SSL_REQUEST => {
                    shared.count(|stats| stats.ssl_requests += 1);
                    stream.write_all(b"S").await?;
                    requested_tls = true;
                    break;
                }
                wire::GSSENC_REQUEST => stream.write_all(b"N").await?,
                wire::PROTOCOL_3_0 => {
                    shared.count_rejection(Rejection::Plaintext);
                    send_fatal(
                        &mut stream,
                        "28000",
                        "unable to accept connection, SSL/TLS is required",
                    )
                    .await;
                    return Ok(());
                }
                wire::CANCEL_REQUEST => return Ok(()),
                other => {
                    shared.count_rejection(Rejection::Protocol);
                    send_fatal(
                        &mut stream,
                        "08P01",
                        &format!("unsupported frontend protocol or request code {other}"),
                    )
                    .await;
                    return Ok(());
                }
            }
        }
        if !requested_tls {
            shared.count_rejection(Rejection::Protocol);
            return Ok(());
        }
    }

    let start = bounded(
        "TLS ClientHello",
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream),
    )
    .await?;
    let hello = start.client_hello();
    let sni = hello.server_name().map(str::to_owned);
    let offers_postgresql_alpn = hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == super::util::ALPN_POSTGRESQL));
    let mut tls = bounded(
        "TLS handshake",
        start.into_stream(shared.tls_config.clone()),
    )
    .await?;

    let refusal = match &sni {
        None => Some((
            Rejection::NoSni,
            "unable to accept connection, sni was not received".to_owned(),
        )),
        Some(name) if !name.eq_ignore_ascii_case(&shared.verifier.endpoint) => Some((
            Rejection::WrongSni,
            format!("unable to accept connection, no cluster found for {name}"),
        )),
        Some(_) if direct && !offers_postgresql_alpn => Some((
            Rejection::NoAlpn,
            "received direct TLS connection request without ALPN protocol negotiation extension"
                .to_owned(),
        )),
        Some(_) => None,
    };
    if let Some((reason, message)) = refusal {
        shared.count_rejection(reason);
        send_fatal(&mut tls, "08004", &message).await;
        return Ok(());
    }

    let packet = bounded("startup packet", wire::read_startup_packet(&mut tls)).await?;
    let parameters = (packet.code == wire::PROTOCOL_3_0)
        .then(|| wire::startup_parameters(&packet.body))
        .flatten();
    let Some(parameters) = parameters else {
        shared.count_rejection(Rejection::Protocol);
        send_fatal(&mut tls, "08P01", "invalid startup packet").await;
        return Ok(());
    };
    let _admitted = match shared.admit() {
        Ok(admitted) => admitted,
        Err((reason, code, message)) => {
            shared.count_rejection(reason);
            send_fatal(&mut tls, code, message).await;
            return Ok(());
        }
    };
    let startup = match check_startup(parameters, &shared.cluster_id) {
        Ok(startup) => startup,
        Err(refusal) => {
            shared.count_rejection(refusal.reason);
            send_fatal(&mut tls, refusal.code, &refusal.message).await;
            return Ok(());
        }
    };

    tls.write_all(&wire::cleartext_password_request()).await?;
    tls.flush().await?;
    let (tag, body) = bounded("password", wire::read_message(&mut tls, MAX_PASSWORD_LEN)).await?;
    let token = (tag == b'p')
        .then(|| body.strip_suffix(&[0]))
        .flatten()
        .and_then(|t| std::str::from_utf8(t).ok());
    let Some(token) = token else {
        shared.count_rejection(Rejection::Protocol);
        send_fatal(&mut tls, "08P01", "expected a password message").await;
        return Ok(());
    };
    let refusal = match shared.verifier.verify(&startup.user, token) {
        Ok(access_key) => match granted(shared, &startup.user, &access_key).await {
            Ok(()) => None,
            Err(NotGranted::Refused(refusal)) => Some(refusal),
            Err(NotGranted::Unavailable) => {
                shared.count_rejection(Rejection::Upstream);
                send_fatal(&mut tls, "XX000", "server unavailable").await;
                return Ok(());
            }
        },
        Err(refusal) => Some(refusal),
    };
    if let Some(refusal) = refusal {
        shared.count_rejection(refusal.reason);
        send_fatal_with_hint(
            &mut tls,
            ACCESS_DENIED_CODE,
            ACCESS_DENIED_MESSAGE,
            Some(&refusal.hint),
        )
        .await;
        return Ok(());
    }

    let mut upstream = match shared.upstream.connect().await {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::warn!(%error, "emulator cannot reach its upstream PostgreSQL");
            shared.count_rejection(Rejection::Upstream);
            send_fatal(&mut tls, "XX000", "server unavailable").await;
            return Ok(());
        }
    };
    let mut upstream_parameters = startup.upstream_parameters.clone();
    // DSQL's one database is `postgres`: an endpoint may keep it in a database of its own.
    for (name, value) in &mut upstream_parameters {
        if name == "database" && value == "postgres" {
            value.clone_from(&shared.upstream.database);
        }
    }
    if shared.sql_rules {
        // A write that meets a row another transaction holds does not wait (see `sql`).
        upstream_parameters.push(("lock_timeout".into(), sql::LOCK_TIMEOUT.into()));
        // DSQL's only isolation level, whatever the upstream server's default.
        upstream_parameters.push((
            "default_transaction_isolation".into(),
            "repeatable read".into(),
        ));
        // The upstream's event triggers apply the catalog limits to this session.
        upstream_parameters.push((sql::RULES_PARAMETER.into(), "on".into()));
        // How long its asynchronous DDL's jobs take (see `bootstrap.sql`).
        upstream_parameters.push((
            sql::BUILD_DELAY_PARAMETER.into(),
            shared.index_build_delay.as_millis().to_string(),
        ));
        // DSQL's sessions are in UTC unless the client says otherwise.
        if !upstream_parameters
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("timezone"))
        {
            upstream_parameters.push(("TimeZone".into(), "UTC".into()));
        }
    }
    upstream
        .write_all(&wire::startup_message(&upstream_parameters))
        .await?;
    // With trust authentication PostgreSQL says AuthenticationOk first and only then checks
    // the role, so read on to ReadyForQuery (or an error) before calling the session accepted.
    let mut startup_reply = Vec::new();
    let mut backend = 0;
    loop {
        let (tag, body) = wire::read_message(&mut upstream, 64 * 1024).await?;
        match (tag, body.as_slice()) {
            (b'S', _) if shared.sql_rules => {
                // The server reports itself as DSQL does (`server_version` 16.15).
                let body = sql::dsql_parameter_status(&body).unwrap_or(body);
                wire::append_message(&mut startup_reply, tag, &body);
            }
            (b'K', [a, b, c, d, ..]) => {
                backend = i32::from_be_bytes([*a, *b, *c, *d]);
                wire::append_message(&mut startup_reply, tag, &body);
            }
            (b'R', [0, 0, 0, 0]) | (b'S', _) | (b'K', _) | (b'N', _) => {
                wire::append_message(&mut startup_reply, tag, &body);
            }
            (b'Z', _) => {
                wire::append_message(&mut startup_reply, tag, &body);
                break;
            }
            (b'E', _) => {
                let message = wire::error_message(&body);
                let unknown_role =
                    message.starts_with("role \"") && message.ends_with("does not exist");
                shared.count_rejection(if unknown_role {
                    Rejection::UnknownRole
                } else {
                    Rejection::Upstream
                });
                tracing::debug!(%message, "upstream refused the session");
                wire::append_message(&mut startup_reply, tag, &body);
                tls.write_all(&startup_reply).await?;
                let _ = tls.shutdown().await;
                return Ok(());
            }
            _ => {
                shared.count_rejection(Rejection::Upstream);
                send_fatal(
                    &mut tls,
                    "XX000",
                    "the emulator's upstream PostgreSQL asked for a password; it must trust \
                     local connections",
                )
                .await;
                return Ok(());
            }
        }
    }
    // A cut (`drop_all_connections`, `set_down`) since the accept: the session does not log in.
    if accepted.drops.has_changed().unwrap_or(true) {
        shared.count_rejection(Rejection::Cut);
        let _ = tls.shutdown().await;
        return Ok(());
    }
    // Counted before the client can see its session open: a test reads the counts as soon as
    // its connect returns, which can be before this task's next step.
    shared.count_accepted();
    let open = super::Counted::hold(&shared.open);
    tls.write_all(&startup_reply).await?;
    tls.flush().await?;
    relay(tls, upstream, backend, accepted, open, shared).await
}

/// Whether `user` may connect as the IAM identity of `access_key`: `admin` always (IAM's policy
/// decides, [`super::auth`]); a custom role only if it was `AWS IAM GRANT`ed to that identity,
/// when the emulator knows the identity's ARN (`DsqlEmulatorBuilder::iam_identity`).
async fn granted(shared: &Shared, user: &str, access_key: &str) -> Result<(), NotGranted> {
    let Some(arn) = shared.verifier.identities.get(access_key) else {
        return Ok(());
    };
    if user == "admin" {
        return Ok(());
    }
    let denied = || {
        NotGranted::Refused(super::auth::Refusal {
            reason: Rejection::NotAuthorized,
            hint: format!("User: {arn} is not authorized to access this resource"),
        })
    };
    let lookup = async {
        let (client, connection) =
            tokio_postgres::connect(&shared.upstream.url("admin"), tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(connection);
        let mapped = client
            .query_opt(
                "SELECT 1 FROM sys.iam_pg_role_mappings WHERE pg_role_name = $1 AND arn = $2",
                &[&user, arn],
            )
            .await;
        drop(client);
        let _ = connection.await;
        mapped.map(|row| row.is_some())
    };
    // Bounded: a client waits for this answer.
    match tokio::time::timeout(IAM_LOOKUP_TIMEOUT, lookup).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(denied()),
        // Not knowing is not a refusal: the client may retry.
        Ok(Err(error)) => {
            tracing::warn!(%error, "emulator cannot read its IAM role mappings");
            Err(NotGranted::Unavailable)
        }
        Err(_) => {
            tracing::warn!("emulator: reading its IAM role mappings timed out");
            Err(NotGranted::Unavailable)
        }
    }
}

/// Copies bytes both ways until either side closes, the connection reaches its maximum age,
/// `drop_all_connections` is called, or the client sends a `COMMIT` while
/// `cut_next_commit` is armed (then neither the `COMMIT` nor anything after it is forwarded).
/// `backend`: the upstream backend's process id (for commit-time conflicts, [`sql::occ`]).
/// `counted`: the session's place in the open count, taken before the client saw its session
/// open.
async fn relay<C, U>(
    client: C,
    upstream: U,
    backend: i32,
    accepted: Accepted,
    counted: super::Counted<'_>,
    shared: &Arc<Shared>,
) -> std::io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let Accepted {
        at: accepted_at,
        mut drops,
        max_age,
    } = accepted;
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    // With DSQL's SQL rules: the plans both directions share, this session among the
    // database's, and the upstream side's inbox for the server-to-client side's replies.
    let plans = sql::Plans::default();
    let member = shared.sql_rules.then(|| shared.sessions.join(backend));
    let (replies, mut inbox) = tokio::sync::mpsc::channel::<sql::Reply>(4);
    let to_upstream = async {
        let mut spotter = wire::CommitSpotter::default();
        let mut network = shared.network.subscribe();
        let mut buf = vec![0u8; 16 * 1024];
        // With DSQL's SQL rules: the client's messages, decided one by one.
        let mut dialect = member.as_ref().map(|member| {
            sql::Dialect::new(
                plans.clone(),
                shared.catalog.clone(),
                shared.transaction_age_limit,
            )
            .with_sessions(shared.sessions.clone(), member.entry.clone())
            .with_injection(shared.injection.clone())
        });
        let mut pending = Vec::new();
        let mut out = sql::Outgoing::default();
        loop {
            // Decide what the client has sent; after a request whose answer is reported,
            // wait for it (and what it asks to send next) before deciding on.
            while let Some(dialect) = &mut dialect {
                out.clear();
                let used = decide(dialect, &pending, &mut out);
                pending.drain(..used);
                let more = !out.bytes.is_empty()
                    || !out.plans.is_empty()
                    || out.close
                    || out.validate.is_some();
                drive(
                    dialect,
                    &mut out,
                    &plans,
                    &mut upstream_write,
                    &mut inbox,
                    &mut network,
                    member.as_ref(),
                    shared,
                )
                .await?;
                if out.close {
                    return Ok(());
                }
                if !more {
                    break;
                }
            }
            let n = tokio::select! {
                n = client_read.read(&mut buf) => n?,
                () = released(member.as_ref()) => {
                    if let Some(dialect) = &mut dialect {
                        out.clear();
                        dialect.release(&mut out);
                        drive(dialect, &mut out, &plans, &mut upstream_write, &mut inbox,
                            &mut network, member.as_ref(), shared).await?;
                    }
                    continue;
                }
            };
            if n == 0 {
                return Ok(());
            }
            if spotter.feed(&buf[..n]) && shared.cut_next_commit.swap(false, Ordering::SeqCst) {
                shared.count(|stats| stats.cut_at_commit += 1);
                return Ok(());
            }
            if dialect.is_some() {
                pending.extend_from_slice(&buf[..n]);
                continue;
            }
            pass_black_hole(&mut network).await;
            upstream_write.write_all(&buf[..n]).await?;
            upstream_write.flush().await?;
        }
    };
    let to_client = async {
        let mut commit_replies = wire::CommitReplySpotter::default();
        let mut network = shared.network.subscribe();
        let mut buf = vec![0u8; 16 * 1024];
        let mut rewriter = shared
            .sql_rules
            .then(|| sql::Responder::new(plans.clone(), replies.clone()));
        let mut out = Vec::new();
        loop {
            let n = upstream_read.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            let mut open = true;
            let data: &[u8] = match &mut rewriter {
                None => &buf[..n],
                Some(rewriter) => {
                    out.clear();
                    open = rewriter.feed(&buf[..n], &mut out);
                    &out
                }
            };
            let fatal = match commit_replies.feed(data) {
                Some(at) => shared
                    .fail_next_commit
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .map(|fatal| (at, fatal)),
                None => None,
            };
            if let Some((at, fatal)) = fatal {
                // `fail_next_commit`: the transaction committed; the client is told FATAL.
                shared.count(|stats| stats.cut_at_commit += 1);
                pass_black_hole(&mut network).await;
                client_write.write_all(&data[..at]).await?;
                client_write.write_all(&fatal).await?;
                client_write.flush().await?;
                return Ok(());
            }
            pass_black_hole(&mut network).await;
            client_write.write_all(data).await?;
            // A TLS stream may keep the last records of a write in its buffer when the socket
            // was full (it reports the bytes written): without a flush they wait for the next
            // write, which may never come (a large result followed by silence).
            client_write.flush().await?;
            if !open {
                return Ok(());
            }
        }
    };
    let outcome = tokio::select! {
        result = to_upstream => result,
        result = to_client => result,
        () = tokio::time::sleep_until(accepted_at + max_age) => {
            shared.count(|stats| stats.closed_at_max_age += 1);
            Ok(())
        }
        _ = drops.changed() => {
            shared.count(|stats| stats.dropped += 1);
            Ok(())
        }
    };
    drop(counted);
    let _ = client_write.shutdown().await;
    outcome
}

/// Resolves when a committer dooms this session's open transaction (never without the rules).
async fn released(member: Option<&sql::occ::Member>) {
    match member {
        Some(member) => member.entry.release.notified().await,
        None => std::future::pending().await,
    }
}

/// Sends what `out` holds upstream, then, while it ends with a reported request, waits for
/// the reply and sends what the dialect decides next; a `COMMIT` waiting for its validation
/// is validated here ([`sql::occ::validate`]). Sets `out.close` when the session must end.
#[allow(clippy::too_many_arguments)]
async fn drive<W: AsyncWrite + Unpin>(
    dialect: &mut sql::Dialect,
    out: &mut sql::Outgoing,
    plans: &sql::Plans,
    upstream: &mut W,
    inbox: &mut tokio::sync::mpsc::Receiver<sql::Reply>,
    network: &mut tokio::sync::watch::Receiver<Network>,
    member: Option<&sql::occ::Member>,
    shared: &Arc<Shared>,
) -> std::io::Result<()> {
    loop {
        for planned in out.plans.drain(..) {
            plans.push(planned);
        }
        if !out.bytes.is_empty() {
            pass_black_hole(network).await;
            upstream.write_all(&out.bytes).await?;
            upstream.flush().await?;
        }
        if out.close {
            return Ok(());
        }
        if let Some(validation) = out.validate.take() {
            let Some(member) = member else {
                return Ok(());
            };
            let outcome = sql::occ::validate(
                validation,
                &shared.sessions,
                &member.entry,
                plans,
                upstream,
                inbox,
            )
            .await;
            out.clear();
            match outcome {
                Ok(outcome) => dialect.after_validation(outcome, out),
                Err(sql::occ::Lost(why)) => {
                    tracing::error!(why, "emulator: a COMMIT's validation could not finish");
                    out.close = true;
                    return Ok(());
                }
            }
            continue;
        }
        if !out.gate {
            return Ok(());
        }
        let reply = match member {
            Some(member) if out.committer => {
                match sql::occ::committed_reply(&shared.sessions, &member.entry, inbox).await {
                    Ok(reply) => Some(reply),
                    Err(sql::occ::Lost(why)) => {
                        tracing::error!(why, "emulator: a DDL's answer did not come");
                        None
                    }
                }
            }
            _ => inbox.recv().await,
        };
        let Some(reply) = reply else {
            out.close = true;
            return Ok(());
        };
        out.clear();
        // The follow-up requests (not reported: the dialect decides what comes next) are
        // queued before the dialect decides, so that it never reads the server's status as
        // settled while a follow-up of the relay's is still to answer (a guarded write's
        // `ROLLBACK TO SAVEPOINT` after its `ReadyForQuery` said `E`).
        for (request, plan) in &reply.requests {
            out.bytes.extend_from_slice(request);
            plans.push(sql::Planned {
                report: false,
                ..sql::Planned::new(*plan)
            });
        }
        dialect.on_reply(&reply, out);
    }
}

/// Runs the complete messages at the start of `pending` through `dialect`, appending what goes
/// upstream to `out`; returns how many bytes were used (a partial message waits for the rest).
fn decide(dialect: &mut sql::Dialect, pending: &[u8], out: &mut sql::Outgoing) -> usize {
    let mut at = 0;
    while pending.len() - at >= 5 {
        let tag = pending[at];
        let len = u32::from_be_bytes([
            pending[at + 1],
            pending[at + 2],
            pending[at + 3],
            pending[at + 4],
        ]) as usize;
        if len < 4 {
            // Not the protocol: pass the rest on and let PostgreSQL answer it.
            out.bytes.extend_from_slice(&pending[at..]);
            return pending.len();
        }
        if len > sql::MESSAGE_LIMIT {
            out.close = true;
            return at;
        }
        let end = at + 1 + len;
        if end > pending.len() {
            break;
        }
        dialect.on_message(tag, &pending[at + 5..end], &pending[at..end], out);
        at = end;
        // What follows waits for the answer, or for the COMMIT's validation.
        if out.gate || out.validate.is_some() {
            break;
        }
    }
    at
}

/// Waits while the endpoint is black-holed.
async fn pass_black_hole(network: &mut tokio::sync::watch::Receiver<Network>) {
    let _ = network.wait_for(|n| *n != Network::BlackHole).await;
}
