//! Real `psql` (libpq) against the `emulator` example, with a token from the connector.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use aws_credential_types::Credentials;
use tokio_postgres_dsql::{DsqlConfig, DsqlConnector};

/// `target/<profile>/examples/emulator`, built by `cargo test` next to this test binary.
fn emulator_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    profile_dir.join("examples").join("emulator")
}

#[tokio::test]
async fn psql_connects_to_the_emulator_example_with_a_connector_token() {
    if Command::new("psql").arg("--version").output().is_err() {
        println!(
            "skipping: psql is not installed (CI installs it: apt-get install postgresql-client)"
        );
        return;
    }
    let example = emulator_example();
    assert!(
        example.exists(),
        "{} is missing: run the whole suite with `cargo test --all-features`, which builds the examples",
        example.display()
    );
    let mut child = Command::new(&example)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut exports = HashMap::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with('#') {
            break;
        }
        let (name, value) = line
            .strip_prefix("export ")
            .and_then(|rest| rest.split_once('='))
            .unwrap_or_else(|| panic!("unexpected line {line}"));
        exports.insert(name.to_owned(), value.trim_matches('\'').to_owned());
    }
    let var = |name: &str| {
        exports
            .get(name)
            .unwrap_or_else(|| panic!("{name} not exported"))
            .clone()
    };

    let config = DsqlConfig::builder()
        .host(var("CLUSTER_ENDPOINT"))
        .hostaddr(var("PGHOSTADDR").parse().unwrap())
        .port(var("PGPORT").parse().unwrap())
        .ssl_root_cert(var("PGSSLROOTCERT"))
        .credentials_provider(Credentials::new(
            var("AWS_ACCESS_KEY_ID"),
            var("AWS_SECRET_ACCESS_KEY"),
            None,
            None,
            "emulator example",
        ))
        .build()
        .unwrap();
    let token = DsqlConnector::new(config)
        .await
        .unwrap()
        .token()
        .await
        .unwrap();

    let output = Command::new("psql")
        .args(["-X", "-t", "-A", "-c", "SELECT 1"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PGHOST", var("PGHOST"))
        .env("PGHOSTADDR", var("PGHOSTADDR"))
        .env("PGPORT", var("PGPORT"))
        .env("PGUSER", var("PGUSER"))
        .env("PGDATABASE", var("PGDATABASE"))
        .env("PGSSLMODE", var("PGSSLMODE"))
        .env("PGSSLROOTCERT", var("PGSSLROOTCERT"))
        .env("PGPASSWORD", token.as_str())
        .output()
        .unwrap();
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "1");
}
