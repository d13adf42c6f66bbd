//! Real `psql` (libpq) against the emulator with a token from the `generate_token` example (the
//! `dsql-emulator` binary's own psql test is in `server_binary.rs`).

use std::process::Command;

use crate::support::{emulator, emulator_environment, example_binary};

fn psql_missing() -> bool {
    if Command::new("psql").arg("--version").output().is_ok() {
        return false;
    }
    println!("skipping: psql is not installed (CI installs it: apt-get install postgresql-client)");
    true
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
