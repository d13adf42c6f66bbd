//! Real `psql` (libpq) against the `emulator` example, with a token from the connector.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use aws_credential_types::Credentials;
use tokio_postgres_dsql::{DsqlConfig, DsqlConnector};

use crate::support::{emulator, emulator_environment, example_binary};

fn psql_missing() -> bool {
    if Command::new("psql").arg("--version").output().is_ok() {
        return false;
    }
    println!("skipping: psql is not installed (CI installs it: apt-get install postgresql-client)");
    true
}

#[tokio::test]
async fn psql_connects_to_the_emulator_example_with_a_connector_token() {
    if Command::new("psql").arg("--version").output().is_err() {
        println!(
            "skipping: psql is not installed (CI installs it: apt-get install postgresql-client)"
        );
        return;
    }
    let mut child = Command::new(example_binary("emulator"))
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

#[tokio::test]
async fn psql_connects_with_a_token_from_generate_token() {
    if psql_missing() {
        return;
    }
    let env = emulator_environment("admin");
    let token = Command::new(example_binary("generate_token"))
        .args(["--expires-in", "120"])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8(token.stdout).unwrap();
    let token = token.trim();
    assert!(token.starts_with(&format!(
        "{}/?Action=DbConnectAdmin&",
        emulator().endpoint()
    )));
    assert!(token.contains("X-Amz-Expires=120&"));

    let output = Command::new("psql")
        .args(["-X", "-t", "-A", "-c", "SELECT current_user"])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("PGHOST", emulator().endpoint())
        .env("PGUSER", "admin")
        .env("PGDATABASE", "postgres")
        .env("PGSSLMODE", "verify-full")
        .env("PGPASSWORD", token)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "admin");
}

#[test]
fn generate_token_reports_bad_arguments() {
    let env = emulator_environment("admin");
    let output = Command::new(example_binary("generate_token"))
        .args(["--expires-in", "soon"])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--expires-in"));
    let output = Command::new(example_binary("generate_token"))
        .env_clear()
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("CLUSTER_ENDPOINT"));
}
