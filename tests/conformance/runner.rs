//! The conformance corpus (`corpus.json`) and how it runs against a DSQL endpoint: shared by the
//! replayer in the test suite (`tests/dsql/conformance.rs`) and the recorder
//! (`examples/conformance.rs`), which include this file.

#![allow(dead_code)]

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, SimpleQueryMessage};

/// The corpus file, embedded.
pub const CORPUS: &str = include_str!("corpus.json");

/// The corpus: statements run once first, then the cases.
#[derive(Debug, Deserialize)]
pub struct Corpus {
    pub setup: Vec<String>,
    pub cases: Vec<Case>,
}

/// One rule, or one variant of a rule, with DSQL's answer and where it was recorded.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Case {
    pub id: String,
    /// One statement (or one simple query of several) on one session.
    #[serde(default)]
    pub sql: Option<String>,
    /// Or statements on two sessions, in order, each with its answer.
    #[serde(default)]
    pub steps: Vec<Step>,
    #[serde(default)]
    pub expect: Option<Answer>,
    /// `DSQL_SQL_RULES.md §n (...)`, or a recording.
    pub source: String,
    #[serde(default)]
    pub note: Option<String>,
    /// Run (and its answer ignored) before the case, to undo an earlier run's effect.
    #[serde(default)]
    pub undo: Option<String>,
    /// Which of `simple`, `extended`, `psql` a single statement runs through (default all).
    #[serde(default)]
    pub protocols: Option<Vec<String>>,
    /// The oldest PostgreSQL major version behind an emulator on which DSQL's answer can be
    /// given (syntax or behaviour of a later PostgreSQL; DSQL is 16). On an older one the case
    /// is reported as skipped, with the reason, never as agreeing.
    #[serde(default)]
    pub min_server: Option<u32>,
}

/// A statement of a two-session case.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Step {
    pub session: usize,
    pub sql: String,
    pub expect: Answer,
}

/// DSQL's answer: `"ok"`, the first column of the first row, or an error.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Ok(String),
    Value { value: String },
    Error { code: String, message: String },
}

/// What an endpoint answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Got {
    /// SQLSTATE and message, if it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<(String, String)>,
    /// The first column of the first row, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl Got {
    /// Whether this is the answer `expect` describes.
    pub fn matches(&self, expect: &Answer) -> bool {
        match expect {
            Answer::Ok(word) => word == "ok" && self.error.is_none(),
            Answer::Value { value } => {
                self.error.is_none() && self.value.as_deref() == Some(value.as_str())
            }
            Answer::Error { code, message } => {
                self.error.as_ref() == Some(&(code.clone(), message.clone()))
            }
        }
    }
}

pub fn corpus() -> Corpus {
    serde_json::from_str(CORPUS).expect("corpus.json is valid")
}

impl Case {
    /// Why the case cannot be judged against an emulator on PostgreSQL `major`, if it cannot.
    pub fn skipped_on(&self, major: Option<u32>) -> Option<String> {
        let (needed, major) = (self.min_server?, major?);
        (major < needed).then(|| {
            format!(
                "{}: needs PostgreSQL {needed} (the emulator runs on {major})",
                self.id
            )
        })
    }

    /// Whether a single statement runs through `protocol`.
    pub fn runs_through(&self, protocol: &str) -> bool {
        self.sql.is_some()
            && self
                .protocols
                .as_ref()
                .is_none_or(|p| p.iter().any(|p| p == protocol))
    }
}

fn got_from(result: Result<Option<String>, tokio_postgres::Error>) -> Got {
    match result {
        Ok(value) => Got { error: None, value },
        Err(error) => Got {
            error: Some(match error.as_db_error() {
                Some(db) => (db.code().code().to_owned(), db.message().to_owned()),
                None => ("".to_owned(), error.to_string()),
            }),
            value: None,
        },
    }
}

/// Runs `sql` on `client` through the simple protocol (`extended`: Parse/Bind/Execute).
pub async fn answer(client: &Client, sql: &str, extended: bool) -> Got {
    let result = if extended {
        client.query(sql, &[]).await.map(|rows| {
            rows.first().and_then(|row| {
                row.try_get::<_, String>(0)
                    .ok()
                    .or_else(|| row.try_get::<_, i32>(0).ok().map(|v| v.to_string()))
                    .or_else(|| row.try_get::<_, i64>(0).ok().map(|v| v.to_string()))
            })
        })
    } else {
        client.simple_query(sql).await.map(|messages| {
            messages.iter().find_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
        })
    };
    got_from(result)
}

/// Runs `setup`, each statement alone, and fails on the first error.
pub async fn set_up(client: &Client, setup: &[String]) -> Result<(), String> {
    for statement in setup {
        client
            .batch_execute(statement)
            .await
            .map_err(|e| format!("setup `{statement}`: {e}"))?;
    }
    Ok(())
}

/// One answer of a case: which statement, what DSQL answers, what the endpoint answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub id: String,
    pub protocol: String,
    pub sql: String,
    pub expect: Answer,
    pub got: Got,
}

impl Outcome {
    pub fn agrees(&self) -> bool {
        self.got.matches(&self.expect)
    }
}

/// Runs `case` on `sessions` (two clients) through `protocol` (`simple` or `extended`; a
/// two-session case always runs simple), leaving both outside any transaction.
pub async fn run_case(sessions: &[Client; 2], case: &Case, protocol: &str) -> Vec<Outcome> {
    if let Some(undo) = &case.undo {
        let _ = sessions[0].batch_execute(undo).await;
    }
    let mut outcomes = Vec::new();
    if let (Some(sql), Some(expect)) = (&case.sql, &case.expect) {
        let got = answer(&sessions[0], sql, protocol == "extended").await;
        outcomes.push(Outcome {
            id: case.id.clone(),
            protocol: protocol.to_owned(),
            sql: sql.clone(),
            expect: expect.clone(),
            got,
        });
    } else {
        for (n, step) in case.steps.iter().enumerate() {
            let got = answer(&sessions[step.session], &step.sql, false).await;
            outcomes.push(Outcome {
                id: format!("{}#{}", case.id, n + 1),
                protocol: format!("simple, session {}", step.session),
                sql: step.sql.clone(),
                expect: step.expect.clone(),
                got,
            });
        }
    }
    for session in sessions {
        let _ = session.batch_execute("ROLLBACK").await;
    }
    outcomes
}
