//! The protocol messages the rules send and read, and DSQL's server identity.

use super::*;

/// DSQL's `server_version` and `server_version_num` (`DSQL_SQL_RULES.md` §7).
pub(crate) const DSQL_SERVER_VERSION: &str = "16.15";
pub(crate) const DSQL_SERVER_VERSION_NUM: &str = "160015";
/// What DSQL's `version()` answers.
pub(crate) const DSQL_VERSION: &str = "PostgreSQL 16";

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
pub(super) const TAG: &str = "$dsql_emulator_refusal$";

/// A `Query` message whose execution raises `refusal` in PostgreSQL.
pub(super) fn raise_query(refusal: &Refusal) -> Vec<u8> {
    // (Inside the block's dollar quotes: its tag may not appear in them.)
    let quote = |text: &str| super::rules::literal(&text.replace(TAG, "$ dsql_emulator_refusal$"));
    let detail = refusal
        .detail
        .as_deref()
        .map(|detail| format!(", DETAIL = {}", quote(detail)))
        .unwrap_or_default();
    let text_of_message = refusal.message_sql.as_ref().map_or_else(
        || quote(&refusal.message),
        |sql| sql.replace(TAG, "$ dsql_emulator_refusal$"),
    );
    let text = format!(
        "DO {TAG} BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = {text_of_message}{detail}; \
         END {TAG}\0",
        refusal.code,
    );
    message(b'Q', text.as_bytes())
}

/// An `ErrorResponse` with `refusal`, as PostgreSQL would send it.
pub(super) fn error_response(refusal: &Refusal, out: &mut Vec<u8>) {
    let mut body =
        format!("SERROR\0VERROR\0C{}\0M{}\0", refusal.code, refusal.message).into_bytes();
    if let Some(detail) = &refusal.detail {
        body.extend_from_slice(format!("D{detail}\0").as_bytes());
    }
    body.push(0);
    crate::emulator::wire::append_message(out, b'E', &body);
}

/// A typed message.
pub(super) fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    crate::emulator::wire::append_message(&mut out, tag, body);
    out
}

/// A `Query` message.
pub(super) fn query(text: &str) -> Vec<u8> {
    let mut body = text.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// What PL/pgSQL's `CONTEXT` says of an error in one of the upstream's `sys` functions.
pub(super) const SYS_FUNCTION: &[u8] = b"PL/pgSQL function sys.";

/// The `CONTEXT` PL/pgSQL adds to the errors of the refusal `DO` blocks.
pub(super) const RAISE_CONTEXT: &[u8] = b"WPL/pgSQL function inline_code_block line 1 at RAISE\0";

/// The rows a `CommandComplete` body says a write changed (`INSERT 0 n`, `UPDATE n`,
/// `DELETE n`, `MERGE n`); 0 for anything else.
pub(super) fn written_rows(body: &[u8]) -> u64 {
    let tag = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body));
    let mut words = tag.split(' ');
    match words.next() {
        Some("INSERT" | "UPDATE" | "DELETE" | "MERGE") => {
            words.next_back().and_then(|n| n.parse().ok()).unwrap_or(0)
        }
        _ => 0,
    }
}

/// A field of an `ErrorResponse` body.
pub(super) fn field(body: &[u8], name: u8) -> &[u8] {
    body.split(|b| *b == 0)
        .find_map(|field| field.strip_prefix(&[name]))
        .unwrap_or_default()
}

/// DSQL's data conflict.
pub(crate) fn change_conflict() -> Refusal {
    Refusal::new("40001", "change conflicts with another transaction (OC000)")
}

/// Whether an `ErrorResponse` body is PostgreSQL's own answer to a conflict over rows, not one
/// the relay raised itself: `Some(true)` for a row another transaction holds (`55P03`, the
/// lock timeout), `Some(false)` for one changed since the snapshot (`40001 could not
/// serialize access …`) or a deadlock (`40P01`).
pub(super) fn conflict(body: &[u8]) -> Option<bool> {
    match field(body, b'C') {
        b"55P03" => Some(true),
        b"40P01" => Some(false),
        b"40001" if field(body, b'M').starts_with(b"could not serialize access") => Some(false),
        _ => None,
    }
}

/// Whether a DDL's error is PostgreSQL's answer to a concurrent change of the same object:
/// a duplicate in one of its catalog's unique indexes, a row type created meanwhile, or a
/// wait for the other change's locks, or (`exists_ok`, after `IF NOT EXISTS`) the very object
/// it creates, created meanwhile; on DSQL the later change to commit gets `OC001`.
pub(super) fn catalog_race(body: &[u8], exists_ok: Option<u64>) -> bool {
    let message = field(body, b'M');
    match field(body, b'C') {
        b"42P07" | b"42710" | b"42P06" if exists_ok.is_some() => {
            // `relation "name" already exists`: the object the statement creates, not another
            // name it uses (a constraint's index, an identity's sequence).
            let named = message
                .strip_suffix(b"\" already exists")
                .and_then(|m| m.iter().position(|b| *b == b'"').map(|at| &m[at + 1..]))
                .and_then(|name| std::str::from_utf8(name).ok());
            named.is_some_and(|name| Some(super::rules::name_key(name)) == exists_ok)
                || (message.starts_with(b"type \"") && message.ends_with(b"already exists"))
        }
        b"23505" => message.windows(4).any(|w| w == b"\"pg_"),
        b"42710" => message.starts_with(b"type \"") && message.ends_with(b"already exists"),
        b"55P03" | b"40P01" => true,
        b"40001" => message.starts_with(b"could not serialize access"),
        b"XX000" => message.starts_with(b"tuple concurrently"),
        _ => false,
    }
}
