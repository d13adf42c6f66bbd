//! The replayer: every case of the conformance corpus (`tests/conformance/corpus.json`, DSQL's
//! answers with their sources) against an emulator endpoint of its own, through
//! tokio-postgres's simple and extended protocols and `psql`; and the recorder
//! (`examples/conformance.rs`) run against the emulator, as it would run against a cluster.

use std::process::Command;

use tokio_postgres::Client;
use tokio_postgres_dsql::DsqlConnector;
use tokio_postgres_dsql::emulator::DsqlEmulator;

#[path = "../conformance/runner.rs"]
mod runner;

use crate::support::{connect_to, example_binary, psql_on};

async fn endpoint() -> DsqlEmulator {
    crate::support::own_endpoint().await
}

async fn admin(emulator: &DsqlEmulator) -> Client {
    connect_to(emulator, "admin").await.expect("admin connects")
}

#[test]
fn the_corpus_cites_a_source_for_every_case_and_covers_every_section() {
    let corpus = runner::corpus();
    let mut ids: Vec<&str> = corpus.cases.iter().map(|c| c.id.as_str()).collect();
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "case ids are unique");
    for case in &corpus.cases {
        assert!(
            case.source.starts_with("DSQL_SQL_RULES.md §") || case.source.starts_with("recording"),
            "{}: {}",
            case.id,
            case.source
        );
        assert!(
            case.sql.is_some() == case.steps.is_empty()
                && case.sql.is_some() == case.expect.is_some(),
            "{}: a statement and its answer, or steps",
            case.id
        );
    }
    for section in 1..=10 {
        let needle = format!("§{section} ");
        assert!(
            corpus.cases.iter().any(|c| c.source.contains(&needle)),
            "no case for §{section}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_gives_the_corpus_answers_through_both_protocols() {
    let emulator = endpoint().await;
    let sessions = [admin(&emulator).await, admin(&emulator).await];
    let corpus = runner::corpus();
    runner::set_up(&sessions[0], &corpus.setup).await.unwrap();
    let mut wrong = Vec::new();
    let mut checked = 0;
    let mut skipped = Vec::new();
    for case in &corpus.cases {
        if let Some(why) = case.skipped_on(emulator.upstream_version()) {
            skipped.push(why);
            continue;
        }
        for protocol in ["simple", "extended"] {
            if case.sql.is_some() && !case.runs_through(protocol) {
                continue;
            }
            if case.sql.is_none() && protocol != "simple" {
                continue;
            }
            for outcome in runner::run_case(&sessions, case, protocol).await {
                checked += 1;
                if !outcome.agrees() {
                    wrong.push(format!(
                        "{} [{}] {}\n   got {:?}\n  want {:?}",
                        outcome.id, outcome.protocol, outcome.sql, outcome.got, outcome.expect
                    ));
                }
            }
        }
    }
    eprintln!(
        "{checked} answers checked against the corpus; skipped: {} {skipped:?}",
        skipped.len()
    );
    if emulator.upstream_version() == Some(16) {
        assert!(skipped.is_empty(), "nothing is skipped on 16: {skipped:?}");
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_gives_the_corpus_answers_through_psql() {
    if Command::new("psql").arg("--version").output().is_err() {
        println!("skipping: psql is not installed (CI installs it)");
        return;
    }
    let emulator = endpoint().await;
    let sessions = [admin(&emulator).await, admin(&emulator).await];
    let corpus = runner::corpus();
    runner::set_up(&sessions[0], &corpus.setup).await.unwrap();
    let connector = DsqlConnector::new(emulator.config_for("admin").build().unwrap())
        .await
        .unwrap();
    let token = connector.token().await.unwrap();
    let mut wrong = Vec::new();
    let version = emulator.upstream_version();
    for case in corpus
        .cases
        .iter()
        .filter(|c| c.runs_through("psql") && c.skipped_on(version).is_none())
    {
        if let Some(undo) = &case.undo {
            let _ = sessions[0].batch_execute(undo).await;
        }
        let sql = case.sql.as_deref().unwrap();
        let output = psql_on(&emulator, "admin", &token)
            .args(["-X", "-q", "-t", "-A", "-v", "VERBOSITY=verbose", "-c", sql])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let error_line = stderr.lines().find(|l| l.starts_with("ERROR:"));
        let ok = match case.expect.as_ref().unwrap() {
            runner::Answer::Ok(_) => output.status.success() && error_line.is_none(),
            runner::Answer::Value { value } => {
                output.status.success() && stdout.lines().next() == Some(value.as_str())
            }
            runner::Answer::Error { code, message } => {
                error_line == Some(&format!("ERROR:  {code}: {message}"))
                    && !stderr.contains("CONTEXT")
            }
        };
        if !ok {
            wrong.push(format!(
                "{} psql {sql}\n  stdout {stdout}  stderr {stderr}\n  want {:?}",
                case.id, case.expect
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The recorder, pointed at an emulator endpoint through the same variables a real cluster
/// takes (`CLUSTER_ENDPOINT`, `AWS_REGION`, credentials), writes an answer for every case and,
/// with `--check`, agrees with the corpus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recorder_records_every_case_from_an_endpoint() {
    let emulator = endpoint().await;
    let out = std::env::temp_dir().join(format!(
        "dsql-conformance-{}-{}.json",
        std::process::id(),
        fastrand::u32(..)
    ));
    let credentials = emulator.credentials();
    let major = emulator.upstream_version().unwrap_or(16).to_string();
    let output = Command::new(example_binary("conformance"))
        .args(["record", "--check", "--server-major", &major, "--out"])
        .arg(&out)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CLUSTER_ENDPOINT", emulator.endpoint())
        .env("AWS_REGION", emulator.region())
        .env("AWS_ACCESS_KEY_ID", credentials.access_key_id())
        .env("AWS_SECRET_ACCESS_KEY", credentials.secret_access_key())
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("PGHOSTADDR", "127.0.0.1")
        .env("PGPORT", emulator.port().to_string())
        .env("PGSSLROOTCERT", emulator.ca_cert_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let recording: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out);
    assert_eq!(recording["endpoint"], emulator.endpoint());
    assert_eq!(recording["server_version"], "16.15");
    let outcomes = recording["outcomes"].as_array().unwrap();
    let corpus = runner::corpus();
    for case in &corpus.cases {
        assert!(
            outcomes.iter().any(|o| o["id"]
                .as_str()
                .is_some_and(|id| id == case.id || id.starts_with(&format!("{}#", case.id)))),
            "{} was not recorded",
            case.id
        );
    }
    assert!(stdout.contains("differ: 0"), "{stdout}");
    let skipped = corpus
        .cases
        .iter()
        .filter(|c| c.skipped_on(emulator.upstream_version()).is_some())
        .count();
    assert!(stdout.contains(&format!("skipped: {skipped}")), "{stdout}");
}
