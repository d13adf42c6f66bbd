//! A real cluster's record, replayed: every case of `tests/conformance/recording/` (what an Aurora
//! DSQL cluster answered to a public emulator's baseline suite, DSQL_SQL_RULES §10 source D)
//! against an emulator endpoint of its own, through the message sequences that suite's Go
//! client (pgx) sends, and compared field by field: outcome, SQLSTATE, message, command tag,
//! columns and rows.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::frontend::{Answer, Frontend, Message};

/// The record: one file per group of cases.
const RECORD: &[(&str, &str)] = &[
    (
        "alters",
        include_str!("../conformance/recording/alters.json"),
    ),
    (
        "backlog",
        include_str!("../conformance/recording/backlog.json"),
    ),
    ("enum", include_str!("../conformance/recording/enum.json")),
    (
        "environment",
        include_str!("../conformance/recording/environment.json"),
    ),
    ("index", include_str!("../conformance/recording/index.json")),
    (
        "isolation",
        include_str!("../conformance/recording/isolation.json"),
    ),
    (
        "multi_statement",
        include_str!("../conformance/recording/multi_statement.json"),
    ),
    ("occ", include_str!("../conformance/recording/occ.json")),
    (
        "occ_conflict",
        include_str!("../conformance/recording/occ_conflict.json"),
    ),
    (
        "queries",
        include_str!("../conformance/recording/queries.json"),
    ),
    (
        "supported",
        include_str!("../conformance/recording/supported.json"),
    ),
    (
        "transaction",
        include_str!("../conformance/recording/transaction.json"),
    ),
    ("types", include_str!("../conformance/recording/types.json")),
    (
        "unsupported",
        include_str!("../conformance/recording/unsupported.json"),
    ),
];

/// How the cases run: the schema, the order of the groups, the two-session cases' statements.
const SUITE: &str = include_str!("../conformance/recording/suite.json");

#[derive(Deserialize)]
struct Suite {
    setup: Vec<String>,
    groups: Vec<String>,
    sessions: BTreeMap<String, Vec<Vec<String>>>,
    min_server: BTreeMap<String, u32>,
    deviations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Record {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    #[serde(default)]
    steps: Option<Vec<String>>,
    #[serde(default)]
    ignore_rows: bool,
    #[serde(default)]
    simple_protocol: bool,
    #[serde(default)]
    observations: Vec<Observation>,
    /// The answers of a two-session case, one list per session.
    #[serde(default)]
    sessions: Vec<Vec<Observation>>,
}

/// What a cluster (or the emulator) did with one statement, as the record writes it.
#[derive(Deserialize, Debug, Clone, Default, PartialEq, Eq)]
struct Observation {
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    sqlstate: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    command_tag: Option<String>,
    #[serde(default)]
    columns: Vec<String>,
    #[serde(default)]
    rows: Vec<Vec<String>>,
    /// A simple query of several statements: one result each.
    #[serde(default)]
    results: Vec<Observation>,
}

/// The answer to one request, as the record's client (pgx) reports it.
fn observe(answer: &Answer, simple: bool) -> Observation {
    if let Some((code, message)) = answer.error() {
        return Observation {
            outcome: "error".into(),
            sqlstate: Some(code),
            message: Some(message),
            ..Observation::default()
        };
    }
    let mut results = Vec::new();
    let mut current = Observation {
        outcome: "ok".into(),
        ..Observation::default()
    };
    let mut types = Vec::new();
    for message in &answer.messages {
        match message.tag {
            b'T' => {
                let (names, oids) = row_description(message);
                current.columns = names;
                types = oids;
            }
            b'D' => current.rows.push(data_row(message, &types)),
            b'C' => {
                current.command_tag = Some(message.tag_text());
                results.push(std::mem::replace(
                    &mut current,
                    Observation {
                        outcome: "ok".into(),
                        ..Observation::default()
                    },
                ));
                types.clear();
            }
            _ => {}
        }
    }
    if simple && results.len() > 1 {
        return Observation {
            outcome: "ok".into(),
            results: results
                .into_iter()
                .map(|mut r| {
                    r.outcome.clear();
                    r
                })
                .collect(),
            ..Observation::default()
        };
    }
    results.pop().unwrap_or(current)
}

/// Column names and type OIDs of a `RowDescription`.
fn row_description(message: &Message) -> (Vec<String>, Vec<u32>) {
    let body = &message.body;
    let count = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let (mut names, mut oids) = (Vec::new(), Vec::new());
    for _ in 0..count {
        let end = at + body[at..].iter().position(|b| *b == 0).unwrap();
        names.push(String::from_utf8_lossy(&body[at..end]).into_owned());
        at = end + 1 + 4 + 2;
        oids.push(u32::from_be_bytes(body[at..at + 4].try_into().unwrap()));
        at += 4 + 2 + 4 + 2;
    }
    (names, oids)
}

/// A `DataRow` (text format), each value written as the record's client formats it.
fn data_row(message: &Message, types: &[u32]) -> Vec<String> {
    let body = &message.body;
    let count = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut row = Vec::new();
    for column in 0..count {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
        at += 4;
        match usize::try_from(len) {
            Ok(len) => {
                let text = String::from_utf8_lossy(&body[at..at + len]).into_owned();
                at += len;
                row.push(as_go(&text, types.get(column).copied().unwrap_or(0)));
            }
            Err(_) => row.push("NULL".into()),
        }
    }
    row
}

/// A value's text as pgx decodes it and Go's `%v` prints it.
fn as_go(text: &str, oid: u32) -> String {
    match oid {
        16 => if text == "t" { "true" } else { "false" }.into(),
        2950 => {
            let hex: String = text.chars().filter(|c| *c != '-').collect();
            let bytes: Vec<String> = (0..hex.len() / 2)
                .map(|i| {
                    u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                        .unwrap()
                        .to_string()
                })
                .collect();
            format!("[{}]", bytes.join(" "))
        }
        869 if !text.contains('/') => {
            format!("{text}/{}", if text.contains(':') { 128 } else { 32 })
        }
        2249 => format!("[{}]", split_composite(text, '(', ')').join(" ")),
        // The array types of int2, int4, int8, text, varchar, bool, float8, numeric, uuid.
        1005 | 1007 | 1016 | 1009 | 1015 | 1000 | 1022 | 1231 | 2951 => {
            format!("[{}]", split_composite(text, '{', '}').join(" "))
        }
        _ => text.to_owned(),
    }
}

/// The elements of a one-level array (`{a,b}`) or record (`(a,b)`) text, unquoted.
fn split_composite(text: &str, open: char, close: char) -> Vec<String> {
    let inner = text
        .strip_prefix(open)
        .and_then(|t| t.strip_suffix(close))
        .unwrap_or(text);
    let mut items = Vec::new();
    let (mut item, mut quoted, mut escaped) = (String::new(), false, false);
    for c in inner.chars() {
        match c {
            _ if escaped => {
                item.push(c);
                escaped = false;
            }
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => items.push(std::mem::take(&mut item)),
            _ => item.push(c),
        }
    }
    if !inner.is_empty() {
        items.push(item);
    }
    items
}

/// Runs one statement as pgx does: the extended protocol with text results, or (a case marked
/// so) one simple query.
async fn run(session: &mut Frontend, sql: &str, simple: bool) -> Observation {
    let answer = if simple {
        session.simple(sql).await
    } else {
        session.extended(sql, &[]).await
    };
    observe(&answer, simple)
}

/// Where `got` differs from the record's `want` (`rows`: whether rows are compared).
fn differences(want: &Observation, got: &Observation, rows: bool) -> Vec<String> {
    let mut out = Vec::new();
    if want.outcome != got.outcome {
        out.push(format!("outcome: record {want:?}, emulator {got:?}"));
        return out;
    }
    if want.outcome == "error" {
        if want.sqlstate != got.sqlstate || want.message != got.message {
            out.push(format!(
                "error: record {:?} {:?}, emulator {:?} {:?}",
                want.sqlstate, want.message, got.sqlstate, got.message
            ));
        }
        return out;
    }
    if !want.results.is_empty() || !got.results.is_empty() {
        if want.results.len() != got.results.len() {
            out.push(format!("results: record {want:?}, emulator {got:?}"));
            return out;
        }
        for (w, g) in want.results.iter().zip(&got.results) {
            out.extend(differences(w, g, rows));
        }
        return out;
    }
    // Rows not compared (a cluster's job log, a version string): nor is their count.
    let verb = |tag: &Option<String>| {
        tag.as_deref().map(|t| {
            t.trim_end_matches(|c: char| c.is_ascii_digit() || c == ' ')
                .to_owned()
        })
    };
    let tags_differ = if rows {
        want.command_tag != got.command_tag
    } else {
        verb(&want.command_tag) != verb(&got.command_tag)
    };
    if tags_differ {
        out.push(format!(
            "command tag: record {:?}, emulator {:?}",
            want.command_tag, got.command_tag
        ));
    }
    if want.columns != got.columns {
        out.push(format!(
            "columns: record {:?}, emulator {:?}",
            want.columns, got.columns
        ));
    }
    // A job id is new at each run: its shape is what can be compared.
    let job_id = |rows: &[Vec<String>]| -> Vec<Vec<String>> {
        rows.iter()
            .map(|row| {
                row.iter()
                    .map(|v| {
                        let shaped = v.len() == 26
                            && v.bytes()
                                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
                        if shaped { "<job id>".into() } else { v.clone() }
                    })
                    .collect()
            })
            .collect()
    };
    let (want_rows, got_rows) = if want.columns == ["job_id"] {
        (job_id(&want.rows), job_id(&got.rows))
    } else {
        (want.rows.clone(), got.rows.clone())
    };
    if rows && want_rows != got_rows {
        out.push(format!(
            "rows: record {:?}, emulator {:?}",
            want.rows, got.rows
        ));
    }
    out
}

/// A two-session case, its steps in rounds (session 0, then session 1). Where the record has
/// a loser (a `40001`), which session lost was a race on the cluster: the replay must have as
/// many losers, with the same answer, at the same step.
async fn replay_sessions(
    emulator: &tokio_postgres_dsql::emulator::DsqlEmulator,
    case: &Case,
    steps: &[Vec<String>],
) -> Vec<String> {
    let mut sessions = [
        Frontend::connect(emulator).await,
        Frontend::connect(emulator).await,
    ];
    let mut got: Vec<Vec<Observation>> = vec![Vec::new(), Vec::new()];
    let rounds = steps.iter().map(Vec::len).max().unwrap_or(0);
    for round in 0..rounds {
        for (n, session) in sessions.iter_mut().enumerate() {
            if let Some(sql) = steps[n].get(round) {
                got[n].push(run(session, sql, false).await);
            }
        }
    }
    let lost = |answers: &[Vec<Observation>]| -> Vec<(usize, Observation)> {
        answers
            .iter()
            .flat_map(|session| session.iter().enumerate())
            .filter(|(_, o)| o.outcome == "error")
            .map(|(step, o)| (step, o.clone()))
            .collect()
    };
    let (want_lost, got_lost) = (lost(&case.sessions), lost(&got));
    if want_lost.is_empty() {
        let mut out = Vec::new();
        for (want, got) in case.sessions.iter().zip(&got) {
            if want.len() != got.len() {
                out.push(format!("steps: record {want:?}, emulator {got:?}"));
                continue;
            }
            for (w, g) in want.iter().zip(got) {
                out.extend(differences(w, g, !case.ignore_rows));
            }
        }
        out
    } else if want_lost == got_lost {
        Vec::new()
    } else {
        vec![format!(
            "losers: record {want_lost:?}, emulator {got_lost:?} (answers {got:?})"
        )]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_answers_as_the_real_cluster_record() {
    let suite: Suite = serde_json::from_str(SUITE).expect("suite.json is valid");
    let mut groups: BTreeMap<&str, Record> = RECORD
        .iter()
        .map(|(group, text)| {
            let record: Record =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("{group}.json is valid: {e}"));
            (*group, record)
        })
        .collect();
    assert_eq!(
        groups.keys().copied().collect::<Vec<_>>(),
        {
            let mut listed: Vec<&str> = suite.groups.iter().map(String::as_str).collect();
            listed.sort();
            listed
        },
        "suite.json orders every group of the record"
    );

    // A cluster takes seconds to build an ASYNC index, and the record has a constraint added
    // with one right after its build was submitted: here no case waits for a build.
    let names: Vec<&str> = groups
        .values()
        .flat_map(|record| record.cases.iter().map(|case| case.name.as_str()))
        .collect();
    for listed in suite
        .deviations
        .keys()
        .chain(suite.min_server.keys())
        .chain(suite.sessions.keys())
    {
        assert!(
            names.contains(&listed.as_str()),
            "suite.json names no case {listed}"
        );
    }

    let emulator = tokio_postgres_dsql::emulator::SharedPostgres::global()
        .expect("the shared PostgreSQL starts")
        .endpoint()
        .index_build_delay(std::time::Duration::from_secs(30))
        .start()
        .await
        .expect("an endpoint starts");
    let mut session = Frontend::connect(&emulator).await;
    for statement in &suite.setup {
        let answer = session.simple(statement).await;
        assert!(answer.error().is_none(), "setup `{statement}`: {answer:?}");
    }

    let (mut replayed, mut agreed, mut wrong, mut skipped, mut deviating) =
        (0, 0, Vec::new(), Vec::new(), Vec::new());
    for group in &suite.groups {
        for case in &groups.remove(group.as_str()).unwrap().cases {
            if let (Some(needed), Some(major)) = (
                suite.min_server.get(&case.name),
                emulator.upstream_version(),
            ) && major < *needed
            {
                skipped.push(format!(
                    "{}: needs PostgreSQL {needed} (the emulator runs on {major})",
                    case.name
                ));
                continue;
            }
            let deviation = suite.deviations.get(&case.name);
            replayed += 1;
            let differences = if case.sessions.is_empty() {
                let steps = case.steps.as_deref().unwrap_or_default();
                assert_eq!(steps.len(), case.observations.len(), "{}", case.name);
                let mut out = Vec::new();
                for (sql, want) in steps.iter().zip(&case.observations) {
                    let got = run(&mut session, sql, case.simple_protocol).await;
                    out.extend(
                        differences(want, &got, !case.ignore_rows)
                            .into_iter()
                            .map(|d| format!("`{sql}`: {d}")),
                    );
                }
                // As the recorder does: whatever a case left open or aborted is ended.
                let _ = session.simple("ROLLBACK").await;
                out
            } else {
                let steps = suite
                    .sessions
                    .get(&case.name)
                    .unwrap_or_else(|| panic!("suite.json has the steps of {}", case.name));
                replay_sessions(&emulator, case, steps).await
            };
            match (deviation, differences.is_empty()) {
                (None, true) => agreed += 1,
                (None, false) => wrong.push(format!(
                    "{} ({group}):\n  {}",
                    case.name,
                    differences.join("\n  ")
                )),
                // A listed deviation must still be one, or the list says what is not so.
                (Some(why), false) => deviating.push(format!("{}: {why}", case.name)),
                (Some(_), true) => wrong.push(format!(
                    "{} ({group}): answered as recorded, but listed in suite.json's deviations",
                    case.name
                )),
            }
        }
    }
    eprintln!(
        "the real cluster's record: {agreed} of {replayed} cases answered as recorded; \
         listed deviations: {deviating:?}; not replayed: {skipped:?}"
    );
    assert!(
        skipped.len() <= 1,
        "only PostgreSQL 16's syntax is skipped (on an older upstream): {skipped:?}"
    );
    assert!(
        wrong.is_empty(),
        "{} of {replayed} cases differ from the record:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
