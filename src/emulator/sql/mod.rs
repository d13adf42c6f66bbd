//! DSQL's SQL dialect in front of PostgreSQL (`DsqlEmulatorBuilder::sql_rules`).
//!
//! ## Approach
//!
//! The relay reads the client's PostgreSQL v3 messages (not bytes). Each `Query` and each
//! `Parse` is read with PostgreSQL's own parser (`pg_query`) and checked against DSQL's rules
//! (`rules.rs`: statements and types DSQL refuses, sequence and identity caches, index and
//! `ALTER TABLE` forms, isolation levels, `SET`, savepoints, SQL-level `PREPARE`); `Execute`
//! and every statement of a `Query` are checked against the transaction rules (one DDL per
//! transaction, no DDL with DML) using the transaction state the session's statements imply.
//! DSQL's `CREATE INDEX ASYNC` and `ALTER TABLE ASYNC … VALIDATE` are recognised with
//! PostgreSQL's scanner and sent on without `ASYNC`.
//!
//! A refusal is answered **by PostgreSQL**, which keeps the protocol and the transaction in
//! step: the refused `Query` is replaced by a `DO` block that raises DSQL's SQLSTATE and
//! message; for the extended protocol the refused `Parse` or `Execute` and everything after it
//! up to `Sync` are dropped (as PostgreSQL skips to `Sync` after an error) and the `Sync` is
//! replaced by that `DO` block. The client sees DSQL's `ErrorResponse` and a `ReadyForQuery`
//! with the right status; inside a transaction block the raise aborts the transaction, so
//! every later statement gets `25P02` until `ROLLBACK`, and `COMMIT` answers `ROLLBACK`, as on
//! DSQL. The `CONTEXT` line PL/pgSQL adds to the error is taken out on the way back.
//!
//! ## Known deviations (this stage)
//!
//! - Not yet emulated: commit-time optimistic concurrency (PostgreSQL's row locks still wait),
//!   the 3 000-row, 10 MiB and 300 s transaction limits, `CREATE INDEX ASYNC`'s `job_id` row and
//!   `sys.jobs` / `sys.wait_for_job`, the per-value and per-table limits of §8, refusing to drop
//!   a primary-key column, full-text search configurations, and DSQL's `server_version`.
//! - The transaction rules follow the statements the relay has seen, as it reads them: a
//!   client pipelining statements across a failed one may see a rule applied to a statement
//!   PostgreSQL then skips.
//! - Rules apply when a statement is parsed (`Parse`) and, for the transaction rules, when it
//!   is executed; DSQL may apply some later (at `Bind`).

pub(crate) mod rules;

use std::collections::HashMap;

use rules::{Classified, Kind, Refusal};

/// What the relay sends upstream for one client message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Upstream {
    /// The message as it came.
    Forward,
    /// These bytes instead (whole messages).
    Replace(Vec<u8>),
    /// Nothing.
    Drop,
}

/// One session's view of DSQL's rules: the transaction it is in, what that transaction did,
/// and its prepared statements.
#[derive(Debug, Default)]
pub(crate) struct Dialect {
    in_block: bool,
    ddl: bool,
    dml: bool,
    /// Prepared statement name → the kind of its statement.
    statements: HashMap<String, Kind>,
    /// Portal name → statement name.
    portals: HashMap<String, String>,
    /// An extended-protocol batch being skipped to `Sync` after this refusal.
    skipping: Option<Refusal>,
    /// Query texts already read (a service sends the same few again and again).
    cache: HashMap<String, Classified>,
}

/// The most query texts remembered per session.
const CACHE_LIMIT: usize = 256;

impl Dialect {
    /// Decides what to send upstream for the client's message `tag` with `body`.
    pub(crate) fn on_message(&mut self, tag: u8, body: &[u8]) -> Upstream {
        match tag {
            b'Q' => self.on_query(body),
            b'P' => self.on_parse(body),
            b'B' => {
                if self.skipping.is_some() {
                    return Upstream::Drop;
                }
                let mut fields = body.split(|b| *b == 0);
                if let (Some(portal), Some(statement)) = (fields.next(), fields.next()) {
                    self.portals.insert(
                        String::from_utf8_lossy(portal).into_owned(),
                        String::from_utf8_lossy(statement).into_owned(),
                    );
                }
                Upstream::Forward
            }
            b'E' => self.on_execute(body),
            b'S' => {
                let out = match self.skipping.take() {
                    Some(refusal) => Upstream::Replace(raise_query(&refusal)),
                    None => Upstream::Forward,
                };
                self.end_of_implicit_transaction();
                out
            }
            b'C' => {
                if self.skipping.is_some() {
                    return Upstream::Drop;
                }
                if let Some((&kind, name)) = body.split_first() {
                    let name = String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(name));
                    match kind {
                        b'S' => self.statements.remove(name.as_ref()),
                        _ => self.portals.remove(name.as_ref()).map(|_| Kind::Other),
                    };
                }
                Upstream::Forward
            }
            b'D' | b'H' if self.skipping.is_some() => Upstream::Drop,
            _ => Upstream::Forward,
        }
    }

    fn classified(&mut self, text: &str) -> Classified {
        if let Some(hit) = self.cache.get(text) {
            return hit.clone();
        }
        let classified = rules::classify(text);
        if self.cache.len() >= CACHE_LIMIT {
            self.cache.clear();
        }
        self.cache.insert(text.to_owned(), classified.clone());
        classified
    }

    fn on_query(&mut self, body: &[u8]) -> Upstream {
        let text = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body)).into_owned();
        let classified = self.classified(&text);
        if let Some(refusal) = classified.statements.iter().find_map(|s| s.refusal.clone()) {
            self.end_of_implicit_transaction();
            return Upstream::Replace(raise_query(&refusal));
        }
        // The whole query runs as one implicit transaction unless it opens or is in a block.
        let mut state = self.transaction();
        for statement in &classified.statements {
            if let Err(refusal) = state.apply(statement.kind) {
                self.end_of_implicit_transaction();
                return Upstream::Replace(raise_query(&refusal));
            }
        }
        self.set_transaction(state);
        self.end_of_implicit_transaction();
        if classified.upstream_text == text {
            Upstream::Forward
        } else {
            let mut body = classified.upstream_text.into_bytes();
            body.push(0);
            Upstream::Replace(message(b'Q', &body))
        }
    }

    fn on_parse(&mut self, body: &[u8]) -> Upstream {
        if self.skipping.is_some() {
            return Upstream::Drop;
        }
        let mut fields = body.splitn(3, |b| *b == 0);
        let (Some(name), Some(query), Some(rest)) = (fields.next(), fields.next(), fields.next())
        else {
            return Upstream::Forward;
        };
        let name = String::from_utf8_lossy(name).into_owned();
        let text = String::from_utf8_lossy(query).into_owned();
        let classified = self.classified(&text);
        let kind = match classified.statements.as_slice() {
            [one] => match &one.refusal {
                Some(refusal) => {
                    self.skipping = Some(refusal.clone());
                    return Upstream::Drop;
                }
                None => one.kind,
            },
            // Not one statement PostgreSQL can parse: it answers for itself.
            _ => Kind::Other,
        };
        self.statements.insert(name.clone(), kind);
        let upstream_text = classified.upstream_text;
        if upstream_text == text {
            return Upstream::Forward;
        }
        let mut out = Vec::with_capacity(body.len());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(upstream_text.as_bytes());
        out.push(0);
        out.extend_from_slice(rest);
        Upstream::Replace(message(b'P', &out))
    }

    fn on_execute(&mut self, body: &[u8]) -> Upstream {
        if self.skipping.is_some() {
            return Upstream::Drop;
        }
        let portal = body.split(|b| *b == 0).next().unwrap_or_default();
        let portal = String::from_utf8_lossy(portal);
        let kind = self
            .portals
            .get(portal.as_ref())
            .and_then(|statement| self.statements.get(statement))
            .copied()
            .unwrap_or(Kind::Other);
        let mut state = self.transaction();
        match state.apply(kind) {
            Ok(()) => {
                self.set_transaction(state);
                Upstream::Forward
            }
            Err(refusal) => {
                self.skipping = Some(refusal);
                Upstream::Drop
            }
        }
    }

    fn transaction(&self) -> Transaction {
        Transaction {
            in_block: self.in_block,
            ddl: self.ddl,
            dml: self.dml,
        }
    }

    fn set_transaction(&mut self, state: Transaction) {
        self.in_block = state.in_block;
        self.ddl = state.ddl;
        self.dml = state.dml;
    }

    /// Outside a block, each `Query` and each `Sync` ends an implicit transaction.
    fn end_of_implicit_transaction(&mut self) {
        if !self.in_block {
            self.ddl = false;
            self.dml = false;
        }
    }
}

/// The transaction rules' state: in a block or not, and whether it has run DDL or DML.
#[derive(Debug, Clone, Copy)]
struct Transaction {
    in_block: bool,
    ddl: bool,
    dml: bool,
}

impl Transaction {
    fn apply(&mut self, kind: Kind) -> Result<(), Refusal> {
        let refuse = |message: &str| {
            Err(Refusal {
                code: "0A000",
                message: message.to_owned(),
            })
        };
        match kind {
            Kind::Begin => {
                *self = Transaction {
                    in_block: true,
                    ddl: false,
                    dml: false,
                }
            }
            Kind::End => {
                *self = Transaction {
                    in_block: false,
                    ddl: false,
                    dml: false,
                }
            }
            Kind::Ddl if self.ddl => {
                return refuse("multiple ddl statements not supported in a transaction");
            }
            Kind::Ddl if self.dml => {
                return refuse("ddl and dml are not supported in the same transaction");
            }
            Kind::Ddl => self.ddl = true,
            Kind::Dml if self.ddl => {
                return refuse("ddl and dml are not supported in the same transaction");
            }
            Kind::Dml => self.dml = true,
            Kind::Other => {}
        }
        Ok(())
    }
}

/// DSQL's `server_version` and `server_version_num` (`DSQL_SQL_RULES.md` §7).
pub(crate) const DSQL_SERVER_VERSION: &str = "16.15";
pub(crate) const DSQL_SERVER_VERSION_NUM: &str = "160015";

/// A `ParameterStatus` body with DSQL's value for `server_version`, if it is that parameter.
pub(crate) fn dsql_parameter_status(body: &[u8]) -> Option<Vec<u8>> {
    let name = body.split(|b| *b == 0).next()?;
    (name == b"server_version").then(|| {
        let mut out = b"server_version\0".to_vec();
        out.extend_from_slice(DSQL_SERVER_VERSION.as_bytes());
        out.push(0);
        out
    })
}

/// The dollar-quote tag of the refusal `DO` blocks.
const TAG: &str = "$dsql_emulator_refusal$";

/// A `Query` message whose execution raises `refusal` in PostgreSQL.
fn raise_query(refusal: &Refusal) -> Vec<u8> {
    let quoted = refusal.message.replace('\'', "''");
    let text = format!(
        "DO {TAG} BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = '{quoted}'; END {TAG}\0",
        refusal.code
    );
    message(b'Q', text.as_bytes())
}

/// A typed message.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    super::wire::append_message(&mut out, tag, body);
    out
}

/// The `CONTEXT` PL/pgSQL adds to the errors of the refusal `DO` blocks.
const RAISE_CONTEXT: &[u8] = b"WPL/pgSQL function inline_code_block line 1 at RAISE\0";

/// Follows the framing of the server's messages and takes the refusal blocks' `CONTEXT` field
/// out of `ErrorResponse`s; everything else passes through unchanged.
#[derive(Debug, Default)]
pub(crate) struct ErrorRewriter {
    header: Vec<u8>,
    /// Body bytes left in the current message.
    left: usize,
    /// The `ErrorResponse` being collected (header included).
    error: Option<Vec<u8>>,
}

impl ErrorRewriter {
    /// Appends to `out` what the client should get for the next `data` from the server.
    pub(crate) fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        while !data.is_empty() {
            if self.left == 0 {
                let take = (5 - self.header.len()).min(data.len());
                self.header.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.header.len() < 5 {
                    continue;
                }
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                self.left = (len as usize).saturating_sub(4);
                if self.header[0] == b'E' {
                    self.error = Some(std::mem::take(&mut self.header));
                } else {
                    out.extend_from_slice(&self.header);
                    self.header.clear();
                }
                if self.left == 0 {
                    self.finish(out);
                }
                continue;
            }
            let take = self.left.min(data.len());
            match &mut self.error {
                Some(error) => error.extend_from_slice(&data[..take]),
                None => out.extend_from_slice(&data[..take]),
            }
            self.left -= take;
            data = &data[take..];
            if self.left == 0 {
                self.finish(out);
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        let Some(error) = self.error.take() else {
            return;
        };
        let body = &error[5..];
        match body
            .windows(RAISE_CONTEXT.len())
            .position(|w| w == RAISE_CONTEXT)
        {
            Some(at) => {
                let mut rewritten = body[..at].to_vec();
                rewritten.extend_from_slice(&body[at + RAISE_CONTEXT.len()..]);
                super::wire::append_message(out, b'E', &rewritten);
            }
            None => out.extend_from_slice(&error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(text: &str) -> Vec<u8> {
        let mut body = text.as_bytes().to_vec();
        body.push(0);
        body
    }

    fn raised(out: &Upstream) -> String {
        match out {
            Upstream::Replace(bytes) => String::from_utf8_lossy(&bytes[5..]).into_owned(),
            other => panic!("not replaced: {other:?}"),
        }
    }

    #[test]
    fn one_ddl_per_transaction_and_no_ddl_with_dml() {
        let mut d = Dialect::default();
        assert_eq!(d.on_message(b'Q', &query("BEGIN")), Upstream::Forward);
        assert_eq!(
            d.on_message(b'Q', &query("CREATE TABLE a (id int)")),
            Upstream::Forward
        );
        let out = d.on_message(b'Q', &query("CREATE TABLE b (id int)"));
        assert!(
            raised(&out).contains("multiple ddl statements not supported"),
            "{out:?}"
        );
        assert_eq!(d.on_message(b'Q', &query("ROLLBACK")), Upstream::Forward);
        // Autocommit: each query is its own transaction.
        assert_eq!(
            d.on_message(b'Q', &query("CREATE TABLE a (id int)")),
            Upstream::Forward
        );
        assert_eq!(
            d.on_message(b'Q', &query("INSERT INTO a VALUES (1)")),
            Upstream::Forward
        );
        // A batch is one transaction.
        let out = d.on_message(
            b'Q',
            &query("CREATE TABLE c (id int); INSERT INTO c VALUES (1)"),
        );
        assert!(
            raised(&out).contains("ddl and dml are not supported"),
            "{out:?}"
        );
        let out = d.on_message(
            b'Q',
            &query("DROP TABLE IF EXISTS c; CREATE TABLE c (id int)"),
        );
        assert!(raised(&out).contains("multiple ddl"), "{out:?}");
    }

    #[test]
    fn an_extended_batch_is_skipped_to_sync_and_sync_raises() {
        let mut d = Dialect::default();
        let parse = |text: &str| {
            let mut body = b"s1\0".to_vec();
            body.extend_from_slice(text.as_bytes());
            body.extend_from_slice(&[0, 0, 0]);
            body
        };
        assert_eq!(d.on_message(b'P', &parse("TRUNCATE t")), Upstream::Drop);
        assert_eq!(d.on_message(b'D', b"Ss1\0"), Upstream::Drop);
        let out = d.on_message(b'S', b"");
        assert!(
            raised(&out).contains("ERRCODE = '0A000', MESSAGE = 'unsupported statement: Truncate'")
        );
        // The next batch runs normally.
        assert_eq!(d.on_message(b'P', &parse("SELECT 1")), Upstream::Forward);
        assert_eq!(d.on_message(b'B', b"\0s1\0\0\0\0\0\0\0"), Upstream::Forward);
        assert_eq!(d.on_message(b'E', b"\0\0\0\0\0"), Upstream::Forward);
        assert_eq!(d.on_message(b'S', b""), Upstream::Forward);
        // ASYNC is taken out of the text sent on.
        match d.on_message(b'P', &parse("CREATE INDEX ASYNC i ON t (v)")) {
            Upstream::Replace(bytes) => {
                assert_eq!(&bytes[5..], b"s1\0CREATE INDEX  i ON t (v)\0\0\0");
                assert_eq!(
                    u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize,
                    bytes.len() - 1
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_refusal_context_is_taken_out_across_any_split() {
        let mut error = Vec::new();
        let mut body = b"SERROR\0C0A000\0Mnope\0".to_vec();
        body.extend_from_slice(RAISE_CONTEXT);
        body.push(0);
        crate::emulator::wire::append_message(&mut error, b'E', &body);
        let mut stream = b"C\0\0\0\x0dSELECT 1\0".to_vec();
        stream.extend_from_slice(&error);
        stream.extend_from_slice(b"Z\0\0\0\x05I");
        let mut expected = b"C\0\0\0\x0dSELECT 1\0".to_vec();
        crate::emulator::wire::append_message(&mut expected, b'E', b"SERROR\0C0A000\0Mnope\0\0");
        expected.extend_from_slice(b"Z\0\0\0\x05I");
        for split in 0..stream.len() {
            let mut rewriter = ErrorRewriter::default();
            let mut out = Vec::new();
            rewriter.feed(&stream[..split], &mut out);
            rewriter.feed(&stream[split..], &mut out);
            assert_eq!(out, expected, "split at {split}");
        }
    }
}
