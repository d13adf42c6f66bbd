//! The real PostgreSQL behind the emulator: a private throw-away cluster, or an existing server.
//!
//! The private cluster lives in the emulator's work directory, listens only on a Unix socket in
//! that directory, trusts local connections, and has `admin` as its superuser. When the process
//! runs as root, the server runs as `postgres` (else `nobody`), because PostgreSQL refuses root.
//! It is stopped and deleted when the emulator is dropped. A watchdog process, which wakes when
//! the pipe from this process closes, stops it too if the process ends without dropping the
//! emulator (a `static`, `process::exit`, a crash or a kill).

use std::io::{self, Read, Write};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::EmulatorError;

fn emulator_error(reason: impl Into<String>) -> EmulatorError {
    EmulatorError::failed(reason)
}

fn io_error(reason: impl Into<String>) -> impl FnOnce(io::Error) -> EmulatorError {
    let reason = reason.into();
    move |e| EmulatorError::caused(reason, e)
}

/// Where an upstream server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Address {
    Unix(PathBuf),
    Tcp(String, u16),
}

/// Where sessions are relayed to: a server, and the database a client's `postgres` maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) address: Address,
    pub(crate) database: String,
}

impl Target {
    /// Parses `postgres://host:port[/db]` or a `host=/socket/dir port=… [dbname=…]` string (via
    /// tokio-postgres); the database defaults to `postgres`.
    pub(crate) fn from_url(url: &str) -> Result<Target, EmulatorError> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| {
            EmulatorError::caused(
                "the upstream URL (DSQL_EMULATOR_UPSTREAM or upstream_url) is not a valid \
                 PostgreSQL connection string",
                e,
            )
        })?;
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let address = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => Address::Tcp(host.clone(), port),
            Some(tokio_postgres::config::Host::Unix(dir)) => {
                Address::Unix(dir.join(format!(".s.PGSQL.{port}")))
            }
            None => return Err(emulator_error("the upstream URL names no host")),
        };
        Ok(Target {
            address,
            database: config.get_dbname().unwrap_or("postgres").to_owned(),
        })
    }

    /// The same server, another database.
    pub(crate) fn with_database(&self, database: &str) -> Target {
        Target {
            address: self.address.clone(),
            database: database.to_owned(),
        }
    }

    pub(crate) async fn connect(&self) -> io::Result<UpstreamStream> {
        Ok(match &self.address {
            Address::Unix(path) => UpstreamStream::Unix(UnixStream::connect(path).await?),
            Address::Tcp(host, port) => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                UpstreamStream::Tcp(stream)
            }
        })
    }

    /// A `tokio-postgres` connection string to this database as `user` (for tests and tools).
    pub(crate) fn url(&self, user: &str) -> String {
        let database = &self.database;
        match &self.address {
            Address::Unix(path) => {
                let dir = path.parent().unwrap_or(Path::new("/"));
                let port = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.rsplit('.').next())
                    .unwrap_or("5432");
                format!(
                    "host={} port={port} user={user} dbname={database}",
                    dir.display()
                )
            }
            Address::Tcp(host, port) => {
                format!("host={host} port={port} user={user} dbname={database}")
            }
        }
    }
}

/// The server to relay to: `url`, else `DSQL_EMULATOR_UPSTREAM`, else a private cluster
/// started in `work_dir` (returned too: it stops when dropped).
pub(crate) fn target_or_cluster(
    url: Option<String>,
    work_dir: &Path,
    pg_bin: Option<&Path>,
) -> Result<(Target, Option<LocalCluster>), EmulatorError> {
    let url = url.or_else(|| {
        std::env::var("DSQL_EMULATOR_UPSTREAM")
            .ok()
            .filter(|u| !u.is_empty())
    });
    match url {
        Some(url) => Ok((Target::from_url(&url)?, None)),
        None => {
            let cluster = LocalCluster::start(work_dir, pg_bin)?;
            Ok((cluster.target(), Some(cluster)))
        }
    }
}

/// Why [`execute`] failed, and the cause.
pub(crate) type Failure = (String, Option<Box<dyn std::error::Error + Send + Sync>>);

/// Runs `sql` (a simple query, one or more statements) on the server at `url`, within
/// `timeout`. Blocking; runs on a thread of its own, so it may be called from inside an async
/// runtime.
pub(crate) fn execute(url: String, sql: &str, timeout: Duration) -> Result<(), Failure> {
    query_first(url, sql, timeout).map(|_| ())
}

/// Like [`execute`], and returns the first column of the first row the statements answered.
pub(crate) fn query_first(
    url: String,
    sql: &str,
    timeout: Duration,
) -> Result<Option<String>, Failure> {
    let sql = sql.to_owned();
    std::thread::spawn(move || -> Result<Option<String>, Failure> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ("no runtime".to_owned(), Some(Box::new(e) as _)))?;
        let run = async {
            let (client, connection) =
                tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| ("cannot connect".to_owned(), Some(Box::new(e) as _)))?;
            let connection = tokio::spawn(connection);
            let outcome = client
                .simple_query(&sql)
                .await
                .map(|messages| {
                    messages.iter().find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(row) => {
                            row.get(0).map(str::to_owned)
                        }
                        _ => None,
                    })
                })
                .map_err(|e| ("a statement failed".to_owned(), Some(Box::new(e) as _)));
            drop(client);
            let _ = connection.await;
            outcome
        };
        runtime
            .block_on(async { tokio::time::timeout(timeout, run).await })
            .map_err(|_| (format!("no answer within {} s", timeout.as_secs()), None))?
    })
    .join()
    .map_err(|_| ("the thread panicked".to_owned(), None))?
}

/// A connection to the upstream server.
pub(crate) enum UpstreamStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A private PostgreSQL cluster, stopped and deleted on drop.
pub(crate) struct LocalCluster {
    bin: PathBuf,
    owner: Option<(String, u32, u32)>,
    work_dir: PathBuf,
    cluster_dir: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    socket: PathBuf,
    server: Child,
    /// Closing this pipe (drop, or process exit) wakes the watchdog.
    _watchdog_pipe: ChildStdin,
    watchdog: Child,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("data_dir", &self.data_dir)
            .field("pid", &self.server.id())
            .finish_non_exhaustive()
    }
}

impl LocalCluster {
    /// initdb + postgres in `work_dir/pg`, as an unprivileged user when running as root.
    /// Blocking (a few seconds).
    pub(crate) fn start(
        work_dir: &Path,
        pg_bin: Option<&Path>,
    ) -> Result<LocalCluster, EmulatorError> {
        let bin = find_binaries(pg_bin)?;
        let owner = if effective_uid_is_root() {
            Some(unprivileged_user()?)
        } else {
            None
        };
        let cluster_dir = work_dir.join("pg");
        std::fs::create_dir(&cluster_dir)
            .map_err(io_error(format!("cannot create {}", cluster_dir.display())))?;
        std::fs::set_permissions(&cluster_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error("cannot set permissions on the cluster directory"))?;
        if let Some((_, uid, gid)) = &owner {
            // The work directory must be traversable by the server's user.
            std::fs::set_permissions(work_dir, std::fs::Permissions::from_mode(0o711))
                .map_err(io_error("cannot set permissions on the work directory"))?;
            chown(&cluster_dir, Some(*uid), Some(*gid)).map_err(io_error(
                "cannot hand the cluster directory to the server's user",
            ))?;
        }
        let data_dir = cluster_dir.join("data");
        let log_path = cluster_dir.join("server.log");

        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args([
                "-U",
                "admin",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .current_dir(&cluster_dir)
            .stdin(Stdio::null());
        if let Some((_, uid, gid)) = &owner {
            initdb.uid(*uid).gid(*gid);
        }
        let output = initdb.output().map_err(io_error(format!(
            "cannot run {}",
            bin.join("initdb").display()
        )))?;
        if !output.status.success() {
            return Err(emulator_error(format!(
                "initdb failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }

        let port = free_port().map_err(io_error("cannot pick a port"))?;
        let (server, watchdog, pipe) = spawn_server(
            &bin,
            owner.as_ref(),
            work_dir,
            &cluster_dir,
            &data_dir,
            &log_path,
            port,
        )?;
        let mut cluster = LocalCluster {
            bin,
            owner,
            work_dir: work_dir.to_owned(),
            socket: cluster_dir.join(format!(".s.PGSQL.{port}")),
            cluster_dir,
            data_dir,
            log_path,
            port,
            server,
            _watchdog_pipe: pipe,
            watchdog,
        };
        cluster.wait_until_ready()?;
        Ok(cluster)
    }

    /// Stops the server (every session ends) and starts it again on the same data and socket.
    /// Blocking.
    pub(crate) fn restart(&mut self) -> Result<(), EmulatorError> {
        self.stop();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let (server, watchdog, pipe) = spawn_server(
            &self.bin,
            self.owner.as_ref(),
            &self.work_dir,
            &self.cluster_dir,
            &self.data_dir,
            &self.log_path,
            self.port,
        )?;
        self.server = server;
        self.watchdog = watchdog;
        self._watchdog_pipe = pipe;
        self.wait_until_ready()
    }

    pub(crate) fn target(&self) -> Target {
        Target {
            address: Address::Unix(self.socket.clone()),
            database: "postgres".into(),
        }
    }

    /// Polls the socket with a real startup message until the server accepts `admin`.
    fn wait_until_ready(&mut self) -> Result<(), EmulatorError> {
        let log_path = &self.log_path;
        let deadline = Instant::now() + Duration::from_secs(60);
        let startup = super::wire::startup_message(&[
            ("user".into(), "admin".into()),
            ("database".into(), "postgres".into()),
        ]);
        loop {
            if let Ok(Some(status)) = self.server.try_wait() {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                return Err(emulator_error(format!(
                    "PostgreSQL exited during start-up ({status}): {}",
                    log.trim()
                )));
            }
            if let Ok(mut stream) = std::os::unix::net::UnixStream::connect(&self.socket) {
                let mut first = [0u8; 1];
                if stream.write_all(&startup).is_ok()
                    && stream.read_exact(&mut first).is_ok()
                    && first[0] == b'R'
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(emulator_error(format!(
                    "PostgreSQL did not accept connections within 60 s; see {}",
                    log_path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Stops the server (fast shutdown, then SIGKILL to its process group after 10 s). Never
    /// waits for ever: if the server outlives even that, it is left to the watchdog.
    fn stop(&mut self) {
        let pid = self.server.id();
        signal(pid, Stop::Fast);
        if self.exited_within(Duration::from_secs(10)) {
            return;
        }
        signal(pid, Stop::KillGroup);
        if !self.exited_within(Duration::from_secs(5)) {
            tracing::warn!(
                pid,
                "the emulator's PostgreSQL did not stop; leaving it to the watchdog"
            );
        }
    }

    fn exited_within(&mut self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            if !matches!(self.server.try_wait(), Ok(None)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
        if matches!(self.server.try_wait(), Ok(None)) {
            // Still running: the watchdog (woken when its pipe closes) gets another go at it.
            return;
        }
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

/// How [`signal`] stops the server.
#[derive(Clone, Copy)]
enum Stop {
    /// SIGINT to the postmaster: PostgreSQL's fast shutdown.
    Fast,
    /// SIGKILL to its whole process group.
    KillGroup,
}

fn signal(pid: u32, stop: Stop) {
    // Directly where the platform allows it (no shell in the way), else through `kill`.
    #[cfg(target_os = "linux")]
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        use rustix::process::{Signal, kill_process, kill_process_group};
        let _ = match stop {
            Stop::Fast => kill_process(pid, Signal::INT),
            Stop::KillGroup => kill_process_group(pid, Signal::KILL),
        };
        return;
    }
    let args = match stop {
        Stop::Fast => format!("-INT {pid}"),
        Stop::KillGroup => format!("-KILL -- -{pid}"),
    };
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("kill {args} 2>/dev/null"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Starts `postgres` on an initialized data directory, and its watchdog.
fn spawn_server(
    bin: &Path,
    owner: Option<&(String, u32, u32)>,
    work_dir: &Path,
    cluster_dir: &Path,
    data_dir: &Path,
    log_path: &Path,
    port: u16,
) -> Result<(Child, Child, ChildStdin), EmulatorError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(io_error("cannot open the server log"))?;
    if let Some((_, uid, gid)) = owner {
        let _ = chown(log_path, Some(*uid), Some(*gid));
    }
    let mut postgres = Command::new(bin.join("postgres"));
    postgres
        .arg("-D")
        .arg(data_dir)
        .arg("-k")
        .arg(cluster_dir)
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses="])
        .args(["-c", "fsync=off"])
        .args(["-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off"])
        .args(["-c", "default_transaction_isolation=repeatable read"])
        // Autovacuum's truncation takes a table lock that would read as a conflict (the
        // relay's lock timeout); a throw-away cluster needs no vacuuming.
        .args(["-c", "autovacuum=off"])
        // Two committers whose validations wait for each other (see `sql::occ`) learn it soon.
        .args(["-c", "deadlock_timeout=100ms"])
        // Room for a fleet simulation's thousand connections (each relayed session is a
        // backend) besides tests running in parallel; a backend costs memory only when used.
        .args(["-c", "max_connections=1500"])
        .args(["-c", "unix_socket_permissions=0700"])
        .current_dir(cluster_dir)
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(io_error("cannot open the server log"))?,
        )
        .stderr(log)
        .process_group(0);
    if let Some((_, uid, gid)) = owner {
        postgres.uid(*uid).gid(*gid);
    }
    let mut server = postgres.spawn().map_err(io_error(format!(
        "cannot run {}",
        bin.join("postgres").display()
    )))?;
    match spawn_watchdog(server.id(), work_dir) {
        Ok((watchdog, pipe)) => Ok((server, watchdog, pipe)),
        Err(e) => {
            let _ = server.kill();
            let _ = server.wait();
            Err(io_error("cannot start the watchdog")(e))
        }
    }
}

/// A shell that waits for its stdin to close, then stops the server and deletes the work dir.
fn spawn_watchdog(server_pid: u32, work_dir: &Path) -> io::Result<(Child, ChildStdin)> {
    let script = r#"
        read _ignored
        kill -INT "$0" 2>/dev/null
        i=0
        while kill -0 "$0" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
        kill -KILL -- "-$0" 2>/dev/null
        rm -rf "$1"
    "#;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(server_pid.to_string())
        .arg(work_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    let pipe = child.stdin.take().expect("stdin is piped");
    Ok((child, pipe))
}

/// `PG_BIN` (or the builder's path), then `PATH`, then the newest `/usr/lib/postgresql/*/bin`.
fn find_binaries(configured: Option<&Path>) -> Result<PathBuf, EmulatorError> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = configured
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("PG_BIN").map(PathBuf::from))
    {
        return if has_both(&dir) {
            Ok(dir)
        } else {
            Err(emulator_error(format!(
                "PG_BIN={} has no initdb and postgres",
                dir.display()
            )))
        };
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_both(&dir) {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_both(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        emulator_error(
            "no PostgreSQL server binaries found (initdb and postgres in PG_BIN, on PATH, or in \
             /usr/lib/postgresql/*/bin); install them (Debian: apt-get install postgresql) or \
             point the emulator at a running server with DSQL_EMULATOR_UPSTREAM=postgres://…",
        )
    })
}

fn effective_uid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// `postgres`, else `nobody`, from `/etc/passwd`: (name, uid, gid).
fn unprivileged_user() -> Result<(String, u32, u32), EmulatorError> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for wanted in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() >= 4
                && fields[0] == wanted
                && let (Ok(uid), Ok(gid)) = (fields[2].parse(), fields[3].parse())
            {
                return Ok((wanted.to_owned(), uid, gid));
            }
        }
    }
    Err(emulator_error(
        "running as root, but there is no `postgres` or `nobody` user to run PostgreSQL as \
         (PostgreSQL refuses to run as root)",
    ))
}

fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        let tcp = Target::from_url("postgres://db.internal:6543/other").unwrap();
        assert_eq!(tcp.address, Address::Tcp("db.internal".into(), 6543));
        assert_eq!(tcp.database, "other");
        let unix = Target::from_url("host=/run/pg port=5433").unwrap();
        assert_eq!(unix.address, Address::Unix("/run/pg/.s.PGSQL.5433".into()));
        assert_eq!(unix.database, "postgres");
        assert!(Target::from_url("not a url ===").is_err());
        assert_eq!(
            unix.url("admin"),
            "host=/run/pg port=5433 user=admin dbname=postgres"
        );
        assert_eq!(
            unix.with_database("dsql_x").url("app"),
            "host=/run/pg port=5433 user=app dbname=dsql_x"
        );
    }

    #[test]
    fn missing_binaries_say_what_to_install() {
        let err = find_binaries(Some(Path::new("/nonexistent"))).unwrap_err();
        assert!(err.to_string().contains("PG_BIN"), "{err}");
    }
}
