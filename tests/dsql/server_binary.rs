//! The `dsql-emulator` binary, as another language's CI runs it: flags and environment in,
//! `export` lines and a readiness line out, real clients in, nothing left after SIGTERM.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::each;
use aws_credential_types::Credentials;
use tokio_postgres_dsql::{DsqlConfig, DsqlConnector};

const BINARY: &str = env!("CARGO_BIN_EXE_dsql-emulator");
const KEY: &str = "AKIABINARYTESTKEY000";
const SECRET: &str = "binary/test+secret=";

fn command() -> Command {
    let mut command = Command::new(BINARY);
    command
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("DSQL_EMULATOR_UPSTREAM")
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET);
    command
}

/// Starts the binary with `args`, waits for its readiness line, and reads its env file.
fn start(args: &[&str]) -> (KillOnDrop, HashMap<String, String>, Duration) {
    let env_file = std::env::temp_dir().join(format!(
        "dsql-emulator-test-{}-{}.env",
        std::process::id(),
        fastrand::u32(..)
    ));
    let started = Instant::now();
    let (child, ready) = spawn_ready(command().args(args).arg("--env-file").arg(&env_file));
    let elapsed = started.elapsed();
    assert!(ready.starts_with("# dsql-emulator ready: "), "{ready}");
    let text = std::fs::read_to_string(&env_file).expect("the env file is written before ready");
    let exports = text
        .lines()
        .map(|line| {
            let (name, value) = line
                .strip_prefix("export ")
                .and_then(|rest| rest.split_once('='))
                .unwrap_or_else(|| panic!("unexpected line {line}"));
            (name.to_owned(), value.trim_matches('\'').to_owned())
        })
        .collect();
    (child, exports, elapsed)
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the binary did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Processes whose command line names `dir` (a PostgreSQL started there, its watchdog).
fn processes_naming(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let cmdline = std::fs::read(entry.ok()?.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some(cmdline)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_the_crate_and_psql_with_fixed_credentials_and_stops_clean() {
    let (mut child, env, elapsed) = start(&["--port", "0"]);
    eprintln!("dsql-emulator was ready after {elapsed:?}");
    let var = |name: &str| {
        env.get(name)
            .unwrap_or_else(|| panic!("{name} not exported"))
            .clone()
    };
    assert_eq!(var("AWS_ACCESS_KEY_ID"), KEY);
    assert!(
        !env.contains_key("AWS_SECRET_ACCESS_KEY"),
        "a secret the caller gave is not printed"
    );
    assert_eq!(
        var("CLUSTER_ENDPOINT"),
        "dsqlemulator00000000000000.dsql.us-east-1.on.aws"
    );
    let work_dir = PathBuf::from(var("PGSSLROOTCERT"))
        .parent()
        .unwrap()
        .to_owned();
    assert!(
        !processes_naming(&work_dir).is_empty(),
        "its PostgreSQL runs"
    );

    // The crate, with the fixed credentials.
    let config = DsqlConfig::builder()
        .host(var("CLUSTER_ENDPOINT"))
        .region(var("AWS_REGION"))
        .hostaddr(var("PGHOSTADDR").parse().unwrap())
        .port(var("PGPORT").parse().unwrap())
        .ssl_root_cert(var("PGSSLROOTCERT"))
        .credentials_provider(Credentials::new(KEY, SECRET, None, None, "test"))
        .build()
        .unwrap();
    let client = DsqlConnector::new(config)
        .await
        .unwrap()
        .connect()
        .await
        .unwrap();
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    drop(client);

    // psql (libpq), with a token from `dsql-emulator token`.
    if Command::new("psql").arg("--version").output().is_ok() {
        let token = command().arg("token").envs(&env).output().unwrap();
        assert!(
            token.status.success(),
            "{}",
            String::from_utf8_lossy(&token.stderr)
        );
        let output = Command::new("psql")
            .args(["-X", "-t", "-A", "-c", "SELECT 'psql ok'"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().filter(|(name, _)| name.starts_with("PG")))
            .env("PGPASSWORD", String::from_utf8_lossy(&token.stdout).trim())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "psql ok");
    } else {
        println!("skipping psql: not installed (CI installs postgresql-client)");
    }

    let status = terminate(&mut child);
    assert!(status.success(), "{status}");
    assert!(!work_dir.exists(), "{} is left behind", work_dir.display());
    let left = processes_naming(&work_dir);
    assert!(left.is_empty(), "left running: {left:?}");
}

#[test]
fn the_binary_names_the_flag_at_fault() {
    for (args, expected) in [
        (&["--port", "abc"][..], "--port"),
        (&["--cluster-id", "UPPER"][..], "--cluster-id"),
        (&["--listen", "localhost"][..], "--listen"),
        (
            &["--endpoint", "a.dsql.us-east-1.on.aws", "--cluster-id", "x"][..],
            "--endpoint",
        ),
        (&["--frobnicate"][..], "--frobnicate"),
        (&["--rate-limit", "fast"][..], "--rate-limit"),
        (&["--threads", "0"][..], "--threads"),
        (&["--threads", "65"][..], "--threads"),
        (&["--busy-poll", "1000001"][..], "--busy-poll"),
        (&["--busy-poll", "soon"][..], "--busy-poll"),
        (&["--busy-poll", "500", "--threads", "2"][..], "--busy-poll"),
    ] {
        let output = command().args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let output = command()
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .args(["--port", "0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("AWS_SECRET_ACCESS_KEY"));
    let help = command().arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--env-file"));
}

#[test]
fn the_binary_prints_its_version() {
    for flag in ["--version", "-V"] {
        let output = command().arg(flag).output().unwrap();
        assert!(output.status.success(), "{flag}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            concat!("dsql-emulator ", env!("CARGO_PKG_VERSION")),
            "{flag}"
        );
    }
}

/// Spawns `command` (stdout piped) and returns it with its readiness line. The child is killed
/// if the test fails before stopping it.
fn spawn_ready(command: &mut Command) -> (KillOnDrop, String) {
    let mut child = KillOnDrop(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the binary runs"),
    );
    let ready = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .expect("a readiness line")
        .expect("readable stdout");
    (child, ready)
}

/// A path for an env file no other test uses.
fn env_file_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "dsql-emulator-{tag}-{}-{}.env",
        std::process::id(),
        fastrand::u32(..)
    ))
}

/// Waits (at most 120 s) for `path` to hold an env file written by process `pid`; its exports.
fn wait_for_env_file(path: &Path, pid: u32) -> HashMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let exports: HashMap<String, String> = text
                .lines()
                .filter_map(|line| line.strip_prefix("export ")?.split_once('='))
                .map(|(name, value)| (name.to_owned(), value.trim_matches('\'').to_owned()))
                .collect();
            if exports.get("DSQL_EMULATOR_PID") == Some(&pid.to_string()) {
                return exports;
            }
        }
        assert!(Instant::now() < deadline, "no env file from {pid}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed (and reaped) when dropped unless it has ended: a test that fails
/// leaves nothing running. An emulator left behind would keep the test's inherited stderr open,
/// and a CI that pipes the output would wait for it until its timeout.
struct KillOnDrop(Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_some() {
            return;
        }
        // SIGTERM first, so that an emulator with `--upstream` drops its database there; SIGKILL
        // if it has not stopped within 10 s.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether process `pid` is gone (or a zombie nobody has reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[test]
fn a_stale_env_file_is_not_taken_for_readiness_and_the_new_one_is_private() {
    // What an emulator killed with SIGKILL leaves: a complete file, of another process.
    let path = env_file_path("stale");
    std::fs::write(&path, "export PGPORT='1'\nexport DSQL_EMULATOR_PID='1'\n").unwrap();
    let (mut child, ready) = spawn_ready(command().args(["--port", "0", "--env-file"]).arg(&path));
    // The readiness line names the accepted key and says no session token is needed.
    assert!(
        ready.contains(&format!("accepts access key {KEY}")) && ready.contains("no session token"),
        "{ready}"
    );
    let exports = wait_for_env_file(&path, child.id());
    assert_ne!(exports["PGPORT"], "1", "the stale file was replaced");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the env file is its owner's only");
    }
    assert!(terminate(&mut child).success());
    assert!(!path.exists(), "removed on a clean stop");
}

#[test]
fn a_session_token_in_the_environment_is_named_in_the_readiness_line() {
    let (mut child, ready) = spawn_ready(
        command()
            .env("AWS_SESSION_TOKEN", "a-session-token-from-the-environment")
            .args(["--port", "0", "--env-file"])
            .arg(env_file_path("session")),
    );
    assert!(
        ready.contains("tokens must carry the session token from AWS_SESSION_TOKEN"),
        "{ready}"
    );
    assert!(
        !ready.contains("a-session-token-from-the-environment"),
        "the token itself is never printed: {ready}"
    );
    assert!(terminate(&mut child).success());
}

#[test]
fn a_killed_parent_leaves_no_emulator_and_no_postgresql_behind() {
    // The test runner's place is taken by a shell that starts the emulator and is then killed
    // with SIGKILL, as a test runner killed mid-run is.
    let path = env_file_path("orphan");
    let parent = Command::new("sh")
        .arg("-c")
        .arg("\"$0\" --port 0 --control-port 0 --exit-with-parent --env-file \"$1\" >/dev/null & wait")
        .arg(BINARY)
        .arg(&path)
        .env_remove("AWS_SESSION_TOKEN")
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .spawn()
        .unwrap();
    // Whatever fails below, the shell (and with it the emulator) does not outlive the test.
    let mut parent = KillOnDrop(parent);
    // Its pid is in the file it writes; wait for any writer, then check it is the shell's child.
    let deadline = Instant::now() + Duration::from_secs(120);
    let exports = loop {
        if let Ok(text) = std::fs::read_to_string(&path)
            && text.contains("DSQL_EMULATOR_PID")
        {
            let pid = text
                .lines()
                .find_map(|l| l.strip_prefix("export DSQL_EMULATOR_PID="))
                .unwrap()
                .trim_matches('\'')
                .parse::<u32>()
                .unwrap();
            break wait_for_env_file(&path, pid);
        }
        assert!(Instant::now() < deadline, "the emulator never got ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    let pid: u32 = exports["DSQL_EMULATOR_PID"].parse().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ppid: u32 = stat
        .rsplit_once(") ")
        .unwrap()
        .1
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ppid, parent.0.id(), "the shell started it");
    // Its work directories (its PostgreSQL's among them) are named after its pid.
    let work_dir = PathBuf::from(format!("dsql-emulator-{pid}-"));
    if processes_naming(&work_dir).is_empty() {
        let _ = parent.0.kill();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        panic!("its PostgreSQL does not run");
    }

    let killed = Instant::now();
    parent.0.kill().unwrap();
    parent.0.wait().unwrap();
    // About 0.1 s here; the bound leaves room for a loaded machine.
    let deadline = killed + Duration::from_secs(5);
    while !(gone(pid) && processes_naming(&work_dir).is_empty()) {
        assert!(
            Instant::now() < deadline,
            "5 s after its parent's SIGKILL: emulator gone {}, left {:?}",
            gone(pid),
            processes_naming(&work_dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "emulator and PostgreSQL gone {:?} after the parent's SIGKILL",
        killed.elapsed()
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn closing_stdin_stops_the_binary_when_asked() {
    let (mut child, ready) = spawn_ready(
        command()
            .args(["--port", "0", "--exit-on-stdin-close", "--env-file"])
            .arg(env_file_path("stdin"))
            .stdin(Stdio::piped()),
    );
    assert!(ready.starts_with("# dsql-emulator ready: "), "{ready}");
    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running after stdin closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
}

/// A request to the control port; the status and the JSON answer.
async fn control(
    env: &HashMap<String, String>,
    method: reqwest::Method,
    path: &str,
) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .request(method, format!("{}{path}", env["DSQL_EMULATOR_CONTROL"]))
        .bearer_auth(&env["DSQL_EMULATOR_CONTROL_TOKEN"])
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// A connector to one endpoint the control port describes (or the main one's exports).
async fn connector_for(endpoint: &str, port: u16, ca: &str) -> DsqlConnector {
    connector_in(endpoint, "us-east-1", port, ca).await
}

async fn connector_in(endpoint: &str, region: &str, port: u16, ca: &str) -> DsqlConnector {
    let config = DsqlConfig::builder()
        .host(endpoint)
        .region(region)
        .hostaddr("127.0.0.1".parse().unwrap())
        .port(port)
        .ssl_root_cert(ca)
        .credentials_provider(Credentials::new(KEY, SECRET, None, None, "test"))
        .build()
        .unwrap();
    DsqlConnector::new(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_port_injects_conflicts_cuts_commits_and_makes_isolated_endpoints() {
    // (Busy polling for the main endpoint only: per-test endpoints never poll.)
    let (mut child, env, _) = start(&[
        "--port",
        "0",
        "--control-port",
        "0",
        "--busy-poll",
        "200000",
    ]);
    // Without the token: refused.
    let anonymous = reqwest::Client::new()
        .post(format!(
            "{}/faults/cut_next_commit",
            env["DSQL_EMULATOR_CONTROL"]
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);

    // One conflict injected into a table: a retry loop retries once and commits.
    let main = connector_for(
        &env["CLUSTER_ENDPOINT"],
        env["PGPORT"].parse().unwrap(),
        &env["PGSSLROOTCERT"],
    )
    .await;
    let client = main.connect().await.unwrap();
    each(
        &client,
        &[
            "CREATE TABLE ctl_orders (id int PRIMARY KEY, n int)",
            "INSERT INTO ctl_orders VALUES (1, 0)",
        ],
    )
    .await;
    let (status, _) = control(
        &env,
        reqwest::Method::POST,
        "/conflicts?tables=ctl_orders&count=1",
    )
    .await;
    assert_eq!(status, 200);
    let mut attempts = 0;
    let mut client = client;
    tokio_postgres_dsql::retry_postgres_transaction_on(
        &mut client,
        &tokio_postgres_dsql::RetryPolicy::default(),
        async |tx| {
            attempts += 1;
            tx.execute("UPDATE ctl_orders SET n = n + 1 WHERE id = 1", &[])
                .await?;
            Ok::<_, tokio_postgres_dsql::tokio_postgres::Error>(())
        },
    )
    .await
    .unwrap();
    assert_eq!(attempts, 2, "one injected conflict, one retry");
    let (_, state) = control(&env, reqwest::Method::GET, "/").await;
    assert_eq!(state["main"]["injected_conflicts"], 1, "{state}");

    // The next COMMIT cut: the client cannot know whether it committed.
    let (status, _) = control(&env, reqwest::Method::POST, "/faults/cut_next_commit").await;
    assert_eq!(status, 200);
    let err = tokio_postgres_dsql::retry_transaction_on(
        &mut client,
        &tokio_postgres_dsql::RetryPolicy::default(),
        |tx| async move {
            tx.execute("UPDATE ctl_orders SET n = n + 1 WHERE id = 1", &[])
                .await?;
            Ok::<_, tokio_postgres_dsql::Error>(())
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, tokio_postgres_dsql::Error::CommitOutcomeUnknown { .. }),
        "{err:?}"
    );
    // A parameter at fault is named.
    let (status, answer) = control(&env, reqwest::Method::POST, "/faults/latency?ms=soon").await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("`ms`"),
        "{answer}"
    );

    // Two endpoints of their own: neither sees the other's tables or faults.
    let (_, a) = control(&env, reqwest::Method::POST, "/endpoints").await;
    let (_, b) = control(&env, reqwest::Method::POST, "/endpoints").await;
    let port = |e: &serde_json::Value| e["port"].as_u64().unwrap() as u16;
    let open = |e: serde_json::Value| async move {
        connector_for(
            e["endpoint"].as_str().unwrap(),
            port(&e),
            e["ca_cert_path"].as_str().unwrap(),
        )
        .await
        .connect()
        .await
        .unwrap()
    };
    let (a_client, b_client) = (open(a.clone()).await, open(b.clone()).await);
    each(&a_client, &["CREATE TABLE ctl_own (id int PRIMARY KEY)"]).await;
    let unseen = b_client
        .query("SELECT * FROM ctl_own", &[])
        .await
        .unwrap_err();
    assert_eq!(
        unseen.code(),
        Some(&tokio_postgres_dsql::tokio_postgres::error::SqlState::UNDEFINED_TABLE),
        "{unseen}"
    );
    each(&b_client, &["CREATE TABLE ctl_own (id int PRIMARY KEY)"]).await;
    let (status, _) = control(
        &env,
        reqwest::Method::POST,
        &format!("/endpoints/{}/conflicts", port(&a)),
    )
    .await;
    assert_eq!(status, 200);
    for (client, fails) in [(&a_client, true), (&b_client, false)] {
        client.batch_execute("BEGIN").await.unwrap();
        client
            .execute("INSERT INTO ctl_own VALUES (1)", &[])
            .await
            .unwrap();
        let commit = client.batch_execute("COMMIT").await;
        assert_eq!(commit.is_err(), fails, "{commit:?}");
    }
    let (_, state) = control(&env, reqwest::Method::GET, "/").await;
    assert!(state["main"]["busy_polls"].as_u64().unwrap() > 0, "{state}");
    for e in state["endpoints"].as_array().unwrap() {
        assert_eq!(e["busy_polls"], 0, "{state}");
    }
    for e in [&a, &b] {
        let (status, _) = control(
            &env,
            reqwest::Method::DELETE,
            &format!("/endpoints/{}", port(e)),
        )
        .await;
        assert_eq!(status, 200);
    }
    // A dropped endpoint listens no more (its listener closes on its own threads, just after
    // the answer).
    let closing = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port(&a)))
        .await
        .is_ok()
    {
        assert!(
            closing.elapsed() < Duration::from_secs(10),
            "a dropped endpoint still listens"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Fifty endpoints made and dropped (measured, not asserted).
    let started = Instant::now();
    for _ in 0..50 {
        let (status, e) = control(&env, reqwest::Method::POST, "/endpoints").await;
        assert_eq!(status, 200, "{e}");
        let (status, _) = control(
            &env,
            reqwest::Method::DELETE,
            &format!("/endpoints/{}", port(&e)),
        )
        .await;
        assert_eq!(status, 200);
    }
    eprintln!("50 endpoints made and dropped in {:?}", started.elapsed());
    assert!(terminate(&mut child).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_upstream_each_run_gets_a_database_of_its_own() {
    // Someone else's PostgreSQL: the test process's shared one.
    let upstream = tokio_postgres_dsql::emulator::SharedPostgres::global()
        .unwrap()
        .upstream_url("admin");
    for run in 0..2 {
        let (mut child, env, _) = start(&["--port", "0", "--upstream", &upstream]);
        let client = connector_for(
            &env["CLUSTER_ENDPOINT"],
            env["PGPORT"].parse().unwrap(),
            &env["PGSSLROOTCERT"],
        )
        .await
        .connect()
        .await
        .unwrap();
        // The second run would fail here (`relation "run_orders" already exists`) if the
        // first run's table had outlived it.
        client
            .batch_execute("CREATE TABLE run_orders (id int PRIMARY KEY)")
            .await
            .unwrap_or_else(|e| panic!("run {run}: {e}"));
        drop(client);
        assert!(terminate(&mut child).success());
    }
    // Nothing of either run is left in that server: no endpoint database.
    let (server, connection) = tokio_postgres_dsql::tokio_postgres::connect(
        &upstream,
        tokio_postgres_dsql::tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let left: i64 = server
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'dsql_dsqlemulator00000000000000_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the runs' databases were dropped at exit");
}

/// `--pair`: the two endpoints are one cluster's, over one database and one set of sessions:
/// a writer through the peer commits first against a transaction open through the first
/// endpoint, whose `COMMIT` then fails with `OC000`; the peer's certificate is signed by the
/// CA the first exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pair_shares_one_cluster_s_sessions() {
    // (Killed even when an assertion fails, so that no emulator outlives the test.)
    let (mut child, env, _) = start(&["--port", "0", "--pair", "--threads", "1"]);
    let var = |name: &str| {
        env.get(name)
            .unwrap_or_else(|| panic!("{name} not exported"))
            .clone()
    };
    let ca = var("PGSSLROOTCERT");
    let first = connector_for(
        &var("CLUSTER_ENDPOINT"),
        var("PGPORT").parse().unwrap(),
        &ca,
    )
    .await
    .connect()
    .await
    .unwrap();
    let peer = connector_in(
        &var("DSQL_PEER_ENDPOINT"),
        &var("DSQL_PEER_REGION"),
        var("DSQL_PEER_PORT").parse().unwrap(),
        &ca,
    )
    .await
    .connect()
    .await
    .unwrap();
    each(
        &first,
        &["CREATE TABLE pair_t (k int PRIMARY KEY, v int NOT NULL)"],
    )
    .await;
    first
        .batch_execute("INSERT INTO pair_t VALUES (1, 0)")
        .await
        .unwrap();
    first.batch_execute("BEGIN").await.unwrap();
    first
        .batch_execute("UPDATE pair_t SET v = 10 WHERE k = 1")
        .await
        .unwrap();
    let written = tokio::time::timeout(
        Duration::from_secs(20),
        peer.execute("UPDATE pair_t SET v = v + 1 WHERE k = 1", &[]),
    )
    .await
    .expect("the peer's write is not kept waiting by the first's open transaction")
    .unwrap();
    assert_eq!(written, 1);
    let commit = first.batch_execute("COMMIT").await.unwrap_err();
    let db = commit.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "40001", "{db:?}");
    assert!(db.message().contains("OC000"), "{db:?}");
    let v: i32 = peer
        .query_one("SELECT v FROM pair_t WHERE k = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 1, "the peer's write, not the first's");
    drop((first, peer));
    assert!(terminate(&mut child).success());
}
