//! Starts a local DSQL emulator and prints `export` lines for a shell, then runs until
//! interrupted (Ctrl-C or SIGTERM).
//!
//! ```sh
//! cargo run --example emulator > /tmp/dsql.env &
//! sleep 5; . /tmp/dsql.env
//! # Any tokio-postgres-dsql program now reaches it with DsqlConfig::from_env(), and psql with
//! # a token from the generate_token example (or any DSQL token generator):
//! PGPASSWORD="$(cargo run -q --example generate_token)" psql -c 'SELECT 1'
//! ```
//!
//! It answers SQL as DSQL does (statements and types DSQL refuses, one DDL per transaction,
//! conflicts at COMMIT, ...; see the README's rule table); with `--no-sql-rules`, any SQL
//! PostgreSQL accepts passes (DSQL's connection and authentication rules apply either way). It
//! prints which mode it runs in.
//!
//! The printed credentials are the emulator's own throw-away key pair; they are valid nowhere
//! else.

use tokio_postgres_dsql::emulator::DsqlEmulator;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sql_rules = !std::env::args().any(|a| a == "--no-sql-rules");
    let emulator = DsqlEmulator::builder().sql_rules(sql_rules).start().await?;
    let credentials = emulator.credentials();
    let exports = [
        ("CLUSTER_ENDPOINT", emulator.endpoint().to_owned()),
        ("CLUSTER_USER", "admin".to_owned()),
        ("AWS_REGION", emulator.region().to_owned()),
        ("AWS_ACCESS_KEY_ID", credentials.access_key_id().to_owned()),
        (
            "AWS_SECRET_ACCESS_KEY",
            credentials.secret_access_key().to_owned(),
        ),
        ("PGHOST", emulator.endpoint().to_owned()),
        ("PGHOSTADDR", emulator.address().ip().to_string()),
        ("PGPORT", emulator.port().to_string()),
        ("PGUSER", "admin".to_owned()),
        ("PGDATABASE", "postgres".to_owned()),
        ("PGSSLMODE", "verify-full".to_owned()),
        (
            "PGSSLROOTCERT",
            emulator.ca_cert_path().display().to_string(),
        ),
    ];
    for (name, value) in exports {
        println!("export {name}='{value}'");
    }
    println!(
        "# DSQL emulator ready at {} (Ctrl-C to stop); SQL rules: {}",
        emulator.address(),
        if emulator.sql_rules() {
            "on (SQL is answered as DSQL answers it; --no-sql-rules turns them off)"
        } else {
            "off (any SQL PostgreSQL accepts passes)"
        }
    );

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    drop(emulator);
    eprintln!("DSQL emulator stopped");
    Ok(())
}
