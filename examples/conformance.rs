//! The conformance recorder: runs the corpus (`tests/conformance/corpus.json`: DSQL's answers
//! to SQL, one case per rule) against any DSQL endpoint and writes what it answered.
//!
//! ```sh
//! # Against a real cluster (as admin; the cases create tables named rules_*):
//! CLUSTER_ENDPOINT=<id>.dsql.us-east-1.on.aws AWS_REGION=us-east-1 \
//!     cargo run --example conformance -- record --out recorded.json
//! # Against the emulator:
//! dsql-emulator --port 55432 --env-file /tmp/dsql.env & sleep 2; . /tmp/dsql.env
//! cargo run --example conformance -- record --check
//! ```
//!
//! The connection comes from `DsqlConfig::from_env()` (`CLUSTER_ENDPOINT`, `AWS_REGION`, the
//! default credentials chain, `PGHOSTADDR`/`PGPORT`/`PGSSLROOTCERT` for an emulator). It prints
//! every case whose answer differs from the corpus, and `agree: <n>, differ: <m>`; with
//! `--check` it fails when any differs. A recording from a cluster is how the corpus is kept
//! true: where the cluster's answer differs, the corpus (and then the emulator) changes.

#[path = "../tests/conformance/runner.rs"]
mod runner;

use std::time::SystemTime;

use tokio_postgres_dsql::{DsqlConfig, DsqlConnector};

const USAGE: &str = "usage: conformance record [--out <file>] [--check] [--server-major <n>]";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("record") {
        return Err(USAGE.into());
    }
    let mut out = None;
    let mut check = false;
    // The PostgreSQL major version behind an emulator endpoint (DSQL is 16): cases that need a
    // later one are recorded but not judged.
    let mut server_major = None;
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--out" => out = Some(rest.next().ok_or("--out needs a file")?.clone()),
            "--check" => check = true,
            "--server-major" => {
                let value = rest.next().ok_or("--server-major needs a number")?;
                server_major = Some(
                    value
                        .parse::<u32>()
                        .map_err(|_| format!("--server-major: not a number: {value}"))?,
                );
            }
            other => return Err(format!("unknown option `{other}`; {USAGE}").into()),
        }
    }
    let config = DsqlConfig::from_env().map_err(|e| {
        format!("{e} (set CLUSTER_ENDPOINT for a cluster, or source dsql-emulator's env file)")
    })?;
    let endpoint = config.host().to_owned();
    let connector = DsqlConnector::new(config).await?;
    let sessions = [connector.connect().await?, connector.connect().await?];
    let server_version: String = sessions[0]
        .query_one("SHOW server_version", &[])
        .await?
        .get(0);
    let corpus = runner::corpus();
    runner::set_up(&sessions[0], &corpus.setup).await?;
    let mut outcomes = Vec::new();
    for case in &corpus.cases {
        for protocol in ["simple", "extended"] {
            let runs = match &case.sql {
                Some(_) => case.runs_through(protocol),
                None => protocol == "simple",
            };
            if runs {
                outcomes.extend(runner::run_case(&sessions, case, protocol).await);
            }
        }
    }
    let skipped: Vec<String> = corpus
        .cases
        .iter()
        .filter_map(|c| c.skipped_on(server_major))
        .collect();
    let judged = |o: &runner::Outcome| {
        !corpus
            .cases
            .iter()
            .any(|c| c.skipped_on(server_major).is_some() && o.id.split('#').next() == Some(&c.id))
    };
    let differ: Vec<&runner::Outcome> = outcomes
        .iter()
        .filter(|o| judged(o) && !o.agrees())
        .collect();
    for outcome in &differ {
        println!(
            "{} [{}] {}\n   answered {:?}\n   corpus   {:?}",
            outcome.id, outcome.protocol, outcome.sql, outcome.got, outcome.expect
        );
    }
    let judged_count = outcomes.iter().filter(|o| judged(o)).count();
    println!(
        "agree: {}, differ: {}, skipped: {}{}",
        judged_count - differ.len(),
        differ.len(),
        skipped.len(),
        if skipped.is_empty() {
            String::new()
        } else {
            format!(" ({})", skipped.join("; "))
        }
    );
    if let Some(out) = out {
        let recorded_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_secs();
        let recording = serde_json::json!({
            "endpoint": endpoint,
            "server_version": server_version,
            "recorded_at_unix": recorded_at,
            "outcomes": outcomes,
        });
        std::fs::write(&out, serde_json::to_string_pretty(&recording)?)?;
        println!("recorded {} answers in {out}", outcomes.len());
    }
    if check && !differ.is_empty() {
        return Err(format!("{} answers differ from the corpus", differ.len()).into());
    }
    Ok(())
}
