//! The `dsql-emulator` binary, as another language's CI runs it: flags and environment in,
//! `export` lines and a readiness line out, real clients in, nothing left after SIGTERM.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
fn start(args: &[&str]) -> (Child, HashMap<String, String>, Duration) {
    let env_file = std::env::temp_dir().join(format!(
        "dsql-emulator-test-{}-{}.env",
        std::process::id(),
        fastrand::u32(..)
    ));
    let started = Instant::now();
    let mut child = command()
        .args(args)
        .arg("--env-file")
        .arg(&env_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines
        .next()
        .expect("a readiness line")
        .expect("readable stdout");
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
