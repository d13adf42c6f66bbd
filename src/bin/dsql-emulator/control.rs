//! The control port (`--control-port`): the emulator's faults, injected conflicts and per-test
//! endpoints for any language's tests, over plain HTTP on the listen address. It is the
//! emulator's, never DSQL's: a separate port, its own token (`Authorization: Bearer …`, from
//! the export lines: the env file, which only its owner can read, or stdout), JSON answers.
//! Injected conflicts need the SQL rules (not `--no-sql-rules`).
//!
//! Why HTTP and not SQL procedures: every language has an HTTP client; a control call never
//! enters a transaction, a connection pool or the SQL rules under test; and it works when the
//! endpoint is refusing, black-holed or down, which is when a test needs it most.
//!
//! Requests (parameters in the query string; `POST` unless said):
//!
//! | path | does |
//! |---|---|
//! | `GET /` | the endpoints, their ports and counters |
//! | `/conflicts?tables=a,b&every=N&count=K` | [`DsqlEmulator::inject_conflicts`] (`tables` and `count` optional) |
//! | `DELETE /conflicts` | [`DsqlEmulator::stop_injecting_conflicts`] |
//! | `/faults/fail_next_commit?code=57P01&message=…` | [`DsqlEmulator::fail_next_commit`] |
//! | `/faults/cut_next_commit` | [`DsqlEmulator::cut_next_commit`] |
//! | `/faults/drop_all_connections` | [`DsqlEmulator::drop_all_connections`] |
//! | `/faults/refuse_new_connections?on=true` | [`DsqlEmulator::refuse_new_connections`] |
//! | `/faults/drop_new_connections?share=0.5&seed=1` | [`DsqlEmulator::drop_new_connections`] |
//! | `/faults/black_hole?on=true`, `/faults/down?on=true` | `set_black_hole`, `set_down` |
//! | `/faults/latency?ms=20` | [`DsqlEmulator::set_latency`] |
//! | `/faults/wake_up_after?ms=2000` | [`DsqlEmulator::wake_up_after`] |
//! | `/faults/revoke_access?key=AKIA…&revoked=true` | [`DsqlEmulator::revoke_access`] |
//! | `/faults/rate_limit?per_second=10&burst=5` | [`DsqlEmulator::set_connection_rate_limit`] |
//! | `/faults/max_connections?n=10`, `/faults/max_age?seconds=3` | the limits |
//! | `/faults/restart_upstream` | [`DsqlEmulator::restart_upstream`] (the main endpoint's own server) |
//! | `/endpoints` | a new endpoint over the same PostgreSQL, in a database of its own |
//! | `DELETE /endpoints/<port>` | drops it (its database too) |
//!
//! `/endpoints/<port>/…` addresses an endpoint made with `POST /endpoints` (same paths);
//! without it, the main endpoint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres_dsql::emulator::{DsqlEmulator, DsqlEmulatorBuilder, SharedPostgres};

/// What the control port serves.
pub struct Control {
    pub main: Arc<DsqlEmulator>,
    /// The PostgreSQL endpoints are made over, and how (credentials, region, limits...).
    pub postgres: SharedPostgres,
    pub template: Box<dyn Fn() -> DsqlEmulatorBuilder + Send + Sync>,
    pub token: String,
    /// Endpoints made through the port, by port.
    pub endpoints: Mutex<HashMap<u16, Arc<DsqlEmulator>>>,
}

/// An HTTP answer: status and JSON body.
struct Answer(u16, String);

fn ok(body: String) -> Answer {
    Answer(200, body)
}

fn bad(status: u16, why: &str) -> Answer {
    Answer(status, format!("{{\"error\":{}}}", json(why)))
}

/// A JSON string.
fn json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Serves the control port until the process ends.
pub async fn serve(listener: TcpListener, control: Arc<Control>) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            // Out of file descriptors, say: not a busy loop.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let control = control.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), handle(socket, control)).await;
        });
    }
}

async fn handle(mut socket: TcpStream, control: Arc<Control>) -> std::io::Result<()> {
    // The request head (at most 16 KiB); a body, if any, is read and ignored.
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let n = socket.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if head.len() > 16 * 1024 {
            return respond(&mut socket, bad(431, "request head too large")).await;
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    // A body (parameters come in the query string) is read and ignored, at most 64 KiB: left
    // unread, closing the socket could reset the connection before the client reads the answer.
    let length = text
        .split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(64 * 1024);
    let mut unread = length.saturating_sub(head.len() - (end + 4));
    while unread > 0 {
        let n = socket.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        unread = unread.saturating_sub(n);
    }
    let mut lines = text.split("\r\n");
    let mut request = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (
        request.next().unwrap_or_default().to_owned(),
        request.next().unwrap_or_default().to_owned(),
    );
    let headers: HashMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let authorized = headers
        .get("authorization")
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|token| constant_time_eq(token.as_bytes(), control.token.as_bytes()));
    let answer = if !authorized {
        bad(
            401,
            "the control port needs `Authorization: Bearer $DSQL_EMULATOR_CONTROL_TOKEN`",
        )
    } else {
        let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
        let params = parse_query(query);
        route(&control, &method, path, &params).await
    };
    respond(&mut socket, answer).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn respond(socket: &mut TcpStream, Answer(status, body): Answer) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(name), decode(value))
        })
        .collect()
}

/// A parameter, parsed; the error names it.
fn param<T: std::str::FromStr>(
    params: &HashMap<String, String>,
    name: &str,
) -> Result<Option<T>, Answer> {
    match params.get(name) {
        None => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| {
            bad(
                400,
                &format!("parameter `{name}`: `{text}` is not a valid value"),
            )
        }),
    }
}

fn required<T: std::str::FromStr>(
    params: &HashMap<String, String>,
    name: &str,
) -> Result<T, Answer> {
    param(params, name)?.ok_or_else(|| bad(400, &format!("parameter `{name}` is required")))
}

async fn route(
    control: &Arc<Control>,
    method: &str,
    path: &str,
    params: &HashMap<String, String>,
) -> Answer {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // `/endpoints/<port>/rest…` addresses a made endpoint.
    let (emulator, rest) = match segments.as_slice() {
        ["endpoints", port, rest @ ..] => {
            let Ok(port) = port.parse::<u16>() else {
                return bad(404, &format!("no endpoint `{port}`"));
            };
            if rest.is_empty() && method == "DELETE" {
                return drop_endpoint(control, port).await;
            }
            let found = control
                .endpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&port)
                .cloned();
            match found {
                Some(emulator) => (emulator, rest.to_vec()),
                None => return bad(404, &format!("no endpoint on port {port}")),
            }
        }
        ["endpoints"] if method == "POST" => return make_endpoint(control).await,
        [""] if method == "GET" => return ok(status(control)),
        _ => (control.main.clone(), segments.clone()),
    };
    match act(&emulator, method, &rest, params).await {
        Ok(answer) | Err(answer) => answer,
    }
}

async fn act(
    emulator: &Arc<DsqlEmulator>,
    method: &str,
    path: &[&str],
    params: &HashMap<String, String>,
) -> Result<Answer, Answer> {
    let done = || Ok(ok("{\"ok\":true}".into()));
    match (method, path) {
        ("GET", [] | [""]) => Ok(ok(describe(emulator))),
        ("POST", ["conflicts"]) => {
            let tables: Vec<String> = params
                .get("tables")
                .map(|t| t.split(',').map(str::trim).map(str::to_owned).collect())
                .unwrap_or_default();
            let tables: Vec<&str> = tables.iter().map(String::as_str).collect();
            let every = param(params, "every")?.unwrap_or(1);
            let count = param(params, "count")?;
            emulator.inject_conflicts(&tables, every, count);
            done()
        }
        ("DELETE", ["conflicts"]) => {
            emulator.stop_injecting_conflicts();
            done()
        }
        ("POST", ["faults", fault]) => {
            let on = || param::<bool>(params, "on").map(|on| on.unwrap_or(true));
            match *fault {
                "fail_next_commit" => {
                    let code = params.get("code").map_or("57P01", String::as_str);
                    let message = params
                        .get("message")
                        .map_or("terminating connection due to administrator command", |m| {
                            m.as_str()
                        });
                    emulator.fail_next_commit(code, message);
                }
                "cut_next_commit" => emulator.cut_next_commit(),
                "drop_all_connections" => emulator.drop_all_connections(),
                "refuse_new_connections" => emulator.refuse_new_connections(on()?),
                "drop_new_connections" => emulator.drop_new_connections(
                    required(params, "share")?,
                    param(params, "seed")?.unwrap_or(0),
                ),
                "black_hole" => emulator.set_black_hole(on()?),
                "down" => {
                    let on = on()?;
                    let emulator = emulator.clone();
                    // It waits for the listener to close or reopen.
                    let _ = tokio::task::spawn_blocking(move || emulator.set_down(on)).await;
                }
                "latency" => emulator.set_latency(Duration::from_millis(required(params, "ms")?)),
                "wake_up_after" => {
                    emulator.wake_up_after(Duration::from_millis(required(params, "ms")?))
                }
                "revoke_access" => {
                    let key: String = required(params, "key")?;
                    emulator.revoke_access(&key, param(params, "revoked")?.unwrap_or(true));
                }
                "rate_limit" => {
                    let per_second: f64 = required(params, "per_second")?;
                    let burst: u32 = required(params, "burst")?;
                    emulator
                        .set_connection_rate_limit(per_second, burst)
                        .map_err(|e| bad(400, &e.to_string()))?;
                }
                "max_connections" => emulator.set_max_open_connections(required(params, "n")?),
                "restart_upstream" => emulator
                    .restart_upstream()
                    .await
                    .map_err(|e| bad(400, &e.to_string()))?,
                "max_age" => emulator
                    .set_max_connection_age(Duration::from_secs(required(params, "seconds")?)),
                other => return Err(bad(404, &format!("no fault `{other}`"))),
            }
            done()
        }
        (_, path) => Err(bad(
            404,
            &format!(
                "no `{method} /{}` (see dsql-emulator --help)",
                path.join("/")
            ),
        )),
    }
}

/// One endpoint, as JSON: what a client needs, and its counters.
fn describe(emulator: &DsqlEmulator) -> String {
    let stats = emulator.stats();
    format!(
        "{{\"endpoint\":{},\"region\":{},\"port\":{},\"ca_cert_path\":{},\"access_key_id\":{},\
         \"open_connections\":{},\"accepted\":{},\"rejected\":{},\"cut_at_commit\":{},\
         \"injected_conflicts\":{},\"busy_polls\":{}}}",
        json(emulator.endpoint()),
        json(emulator.region()),
        emulator.port(),
        json(&emulator.ca_cert_path().display().to_string()),
        json(emulator.credentials().access_key_id()),
        emulator.open_connections(),
        stats.accepted,
        stats.total_rejected(),
        stats.cut_at_commit,
        emulator.injected_conflicts(),
        stats.busy_polls,
    )
}

fn status(control: &Control) -> String {
    let endpoints = control
        .endpoints
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(|e| describe(e))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "{{\"version\":{},\"main\":{},\"endpoints\":[{endpoints}]}}",
        json(env!("CARGO_PKG_VERSION")),
        describe(&control.main),
    )
}

async fn make_endpoint(control: &Arc<Control>) -> Answer {
    let builder = (control.template)().postgres(&control.postgres);
    match builder.start().await {
        Ok(emulator) => {
            let emulator = Arc::new(emulator);
            let body = describe(&emulator);
            control
                .endpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(emulator.port(), emulator);
            ok(body)
        }
        Err(e) => bad(500, &format!("the endpoint did not start: {e}")),
    }
}

async fn drop_endpoint(control: &Arc<Control>, port: u16) -> Answer {
    let removed = control
        .endpoints
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&port);
    match removed {
        // Dropped off the async runtime: an endpoint's drop stops its own runtime.
        Some(emulator) => {
            let _ = tokio::task::spawn_blocking(move || drop(emulator)).await;
            ok("{\"ok\":true}".into())
        }
        None => bad(404, &format!("no endpoint on port {port}")),
    }
}
