//! Statement shapes: a classification that reads no constant of its text holds for every text
//! that differs from it only in its constants, so the relay classifies such a text once per
//! shape instead of once per text ([`shape`], [`ShapeCache`]).
//!
//! A shape is the text with each string and numeric constant replaced by a marker, read by a
//! scanner that follows PostgreSQL's lexical rules for the forms it accepts and gives up (no
//! shape: the text is parsed) on every form it does not read exactly: comments, backslashes
//! (`E'…'`, or any string read with `standard_conforming_strings` off), prefixed strings
//! (`B'…'`, `X'…'`, `N'…'`, `U&'…'`), `U&"…"` names and `UESCAPE`, dollar quotes, numbers with a
//! radix prefix, underscores or trailing letters, a digit after a `.` that did not start a
//! number, `float` (whose `float(n)` the grammar checks), NUL bytes, and texts over
//! [`SHAPE_LIMIT`]. Two texts with one shape are the same
//! tokens but for the constants' values, so PostgreSQL's parser gives them one tree but for
//! its `A_Const` values.
//!
//! Whether a classification reads a constant is decided from the tree
//! ([`reads_no_constant`]): only reads, writes and plain transaction statements qualify, and
//! not when they hold a node whose rule looks at a constant (a function call with a constant
//! among its arguments: `set_config`, `current_setting`, the text search functions; a `@@`; a
//! type with modifiers, such as `varchar(70000)`; a `DefElem`), nor when the classification
//! refuses, rewrites or runs a job (see `Classified::reusable`).

use std::collections::HashMap;
use std::sync::Arc;

use pg_query::NodeEnum;
use pg_query::protobuf;

use super::{Classified, Kind, find_node};

/// The longest text given a shape: longer ones are parsed each time (they are rare, and only a
/// text over [`super::VALUE_LIMIT`] can hold a value DSQL refuses for its size).
pub(crate) const SHAPE_LIMIT: usize = 16 * 1024;

/// How many shapes a session keeps (the oldest are dropped together when it is full).
pub(crate) const SHAPES_KEPT: usize = 256;

/// What replaces a string constant in a shape.
const STRING: char = '\u{1}';
/// What replaces an integer constant PostgreSQL's scanner reads as one (`ICONST`: it fits in
/// 32 bits; some rules of the grammar take only those, `varchar(10)`).
const INTEGER: char = '\u{2}';
/// What replaces any other numeric constant (`FCONST`: a fraction, an exponent, or an integer
/// over 32 bits).
const NUMBER: char = '\u{3}';

/// Whether PostgreSQL reads `b` as part of an identifier (or a keyword, or a parameter's `$`).
fn identifier_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// The shape of `sql`: the text with its string and numeric constants replaced by markers, or
/// `None` when the text holds a form the scanner does not read exactly (see the module docs).
pub(crate) fn shape(sql: &str) -> Option<String> {
    if sql.len() > SHAPE_LIMIT {
        return None;
    }
    let bytes = sql.as_bytes();
    // The markers themselves, and backslashes (escapes, in `E'…'` or with
    // `standard_conforming_strings` off): not read here.
    if bytes.iter().any(|b| matches!(b, 0x00..=0x03 | b'\\')) {
        return None;
    }
    // `UESCAPE` gives a `U&"…"` name's escapes by a string whose value the tree does not keep;
    // `float(n)`'s precision is checked by the grammar itself.
    if super::mentions(sql, "uescape") || super::mentions(sql, "float") {
        return None;
    }
    let mut out = String::with_capacity(sql.len());
    // Where the text not yet copied starts.
    let mut copied = 0;
    let mut at = 0;
    while at < bytes.len() {
        let b = bytes[at];
        let before = at.checked_sub(1).map(|i| bytes[i]);
        match b {
            b'-' if bytes.get(at + 1) == Some(&b'-') => return None,
            b'/' if bytes.get(at + 1) == Some(&b'*') => return None,
            // A dollar quote (`$$`, `$tag$`); `$1` is a parameter, part of the text.
            b'$' if !bytes.get(at + 1).is_some_and(u8::is_ascii_digit)
                && !before.is_some_and(identifier_byte) =>
            {
                return None;
            }
            b'"' => {
                // A quoted identifier, copied as it is (`""` inside it is a quote); not a
                // `U&"…"` one, whose escapes are read with its `UESCAPE`.
                if before == Some(b'&') {
                    return None;
                }
                at = quoted_end(bytes, at)?;
            }
            b'\'' => {
                // A prefixed string (`E'…'`, `B'…'`, `X'…'`, `N'…'`, `U&'…'`) is not read here.
                if before.is_some_and(|p| identifier_byte(p) || p == b'&') {
                    return None;
                }
                let start = at;
                at = quoted_end(bytes, at)?;
                out.push_str(&sql[copied..start]);
                out.push(STRING);
                copied = at;
            }
            // A digit after a `.` that did not start a number (`t.5`, `SELECT.5`): PostgreSQL
            // may read the `.` into the number; not read here.
            b'0'..=b'9' if before == Some(b'.') => return None,
            b'0'..=b'9' if !before.is_some_and(identifier_byte) => {
                let start = at;
                at = number_end(bytes, at)?;
                out.push_str(&sql[copied..start]);
                out.push(number_class(&sql[start..at]));
                copied = at;
            }
            b'.' if bytes.get(at + 1).is_some_and(u8::is_ascii_digit)
                && !before.is_some_and(|p| identifier_byte(p) || p == b'.' || p == b'"') =>
            {
                let start = at;
                at = number_end(bytes, at)?;
                out.push_str(&sql[copied..start]);
                out.push(NUMBER);
                copied = at;
            }
            _ => at += 1,
        }
    }
    out.push_str(&sql[copied..]);
    Some(out)
}

/// The end of the quoted run (a string, a quoted name) whose opening quote is at `at`: past
/// its closing quote, a doubled quote inside it being one of its characters. `None` when it is
/// not closed.
fn quoted_end(bytes: &[u8], mut at: usize) -> Option<usize> {
    let quote = bytes[at];
    at += 1;
    loop {
        match bytes.get(at) {
            None => return None,
            Some(&b) if b == quote && bytes.get(at + 1) == Some(&quote) => at += 2,
            Some(&b) if b == quote => return Some(at + 1),
            Some(_) => at += 1,
        }
    }
}

/// [`INTEGER`] for digits alone whose value fits in 32 bits (PostgreSQL's `ICONST`), else
/// [`NUMBER`] (`FCONST`).
fn number_class(number: &str) -> char {
    if number.bytes().all(|b| b.is_ascii_digit())
        && number
            .trim_start_matches('0')
            .parse::<u64>()
            .map_or(number.trim_start_matches('0').is_empty(), |n| {
                n <= i32::MAX as u64
            })
    {
        INTEGER
    } else {
        NUMBER
    }
}

/// The end of the number that starts at `at` (`12`, `1.5`, `.5`, `1.`, `1e-3`), or `None` when
/// it is not one of those forms or runs into letters, digits, `_`, `$` or a `.` (a radix
/// prefix, `1_000`, `1..2`, trailing junk): the scanner leaves those to PostgreSQL.
fn number_end(bytes: &[u8], mut at: usize) -> Option<usize> {
    let digits = |at: &mut usize| {
        let start = *at;
        while bytes.get(*at).is_some_and(u8::is_ascii_digit) {
            *at += 1;
        }
        *at > start
    };
    let whole = digits(&mut at);
    if bytes.get(at) == Some(&b'.') {
        at += 1;
        let fraction = digits(&mut at);
        if !whole && !fraction {
            return None;
        }
    }
    if matches!(bytes.get(at), Some(b'e' | b'E')) {
        at += 1;
        if matches!(bytes.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        if !digits(&mut at) {
            return None;
        }
    }
    match bytes.get(at) {
        Some(&b) if identifier_byte(b) || b == b'.' => None,
        _ => Some(at),
    }
}

/// Whether the classification of these statements reads none of their constants: each is a
/// read, a write or a plain `BEGIN`/`COMMIT`/`ROLLBACK`, and holds no node whose rule looks at
/// a constant (see the module docs).
pub(super) fn reads_no_constant(parsed: &protobuf::ParseResult) -> bool {
    !parsed.stmts.is_empty()
        && parsed.stmts.iter().all(|raw| {
            let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else {
                return false;
            };
            let plain = match node {
                NodeEnum::SelectStmt(_)
                | NodeEnum::InsertStmt(_)
                | NodeEnum::UpdateStmt(_)
                | NodeEnum::DeleteStmt(_) => true,
                NodeEnum::TransactionStmt(t) => {
                    t.options.is_empty()
                        && !t.chain
                        && matches!(
                            super::kind_of(node),
                            Kind::Begin | Kind::Commit | Kind::Rollback
                        )
                }
                _ => false,
            };
            plain && find_node(node, &mut |node| reads_constant(node).then_some(())).is_none()
        })
}

/// Whether a rule looks at a constant under `node`.
fn reads_constant(node: pg_query::NodeRef<'_>) -> bool {
    use pg_query::NodeRef as N;
    match node {
        N::FuncCall(call) => call.args.iter().any(|arg| {
            arg.node.as_ref().is_some_and(|arg| {
                matches!(arg, NodeEnum::AConst(_))
                    || find_node(arg, &mut |n| matches!(n, N::AConst(_)).then_some(())).is_some()
            })
        }),
        N::AExpr(e) => e
            .name
            .iter()
            .any(|name| matches!(&name.node, Some(NodeEnum::String(s)) if s.sval == "@@")),
        N::TypeName(t) => !t.typmods.is_empty(),
        // (The walk does not reach a cast's type.)
        N::TypeCast(cast) => cast
            .type_name
            .as_ref()
            .is_some_and(|t| !t.typmods.is_empty()),
        N::DefElem(_) => true,
        _ => false,
    }
}

/// A session's classifications: by text, and by shape for those that read no constant.
#[derive(Debug, Default)]
pub(crate) struct ShapeCache {
    texts: HashMap<String, Arc<Classified>>,
    shapes: HashMap<String, Arc<Classified>>,
    /// How many texts were parsed (the rest came from the cache).
    parsed: u64,
}

impl ShapeCache {
    /// `sql` classified (as [`super::classify`] would): from the text seen before, from
    /// another text of its shape, or parsed.
    pub(crate) fn classified(&mut self, sql: &str) -> Arc<Classified> {
        if let Some(hit) = self.texts.get(sql) {
            return hit.clone();
        }
        let shape = shape(sql);
        if let Some(hit) = shape.as_ref().and_then(|shape| self.shapes.get(shape)) {
            return Arc::new(Classified {
                upstream_text: sql.to_owned(),
                ..Classified::clone(hit)
            });
        }
        let classified = Arc::new(super::classify(sql));
        self.parsed += 1;
        if self.texts.len() >= SHAPES_KEPT {
            self.texts.clear();
        }
        self.texts.insert(sql.to_owned(), classified.clone());
        if let Some(shape) = shape.filter(|_| classified.reusable) {
            if self.shapes.len() >= SHAPES_KEPT {
                self.shapes.clear();
            }
            self.shapes.insert(shape, classified.clone());
        }
        classified
    }
}

#[cfg(test)]
mod tests {
    use super::super::classify;
    use super::*;

    #[test]
    fn shapes_replace_constants_and_keep_the_rest() {
        let s = |sql: &str| {
            shape(sql).map(|s| {
                s.replace(STRING, "S")
                    .replace(INTEGER, "I")
                    .replace(NUMBER, "N")
            })
        };
        assert_eq!(
            s("SELECT v FROM t WHERE k = 42 AND name = 'it''s'").as_deref(),
            Some("SELECT v FROM t WHERE k = I AND name = S")
        );
        assert_eq!(
            s("select 1.5, .5, 1e-3, 1.e3, -7, 0, 007, 2147483647, 2147483648 from t2").as_deref(),
            Some("select N, N, N, N, -I, I, I, I, N from t2")
        );
        // Parameters, digits in names and quoted names are the text's own.
        assert_eq!(
            s(r#"SELECT "it's 1" FROM t1 WHERE a = $1 AND b$2 = 3"#).as_deref(),
            Some(r#"SELECT "it's 1" FROM t1 WHERE a = $1 AND b$2 = I"#)
        );
        assert_eq!(s("SELECT 'a' || 'b'").as_deref(), Some("SELECT S || S"));
        // Forms the scanner does not read exactly are parsed instead.
        for sql in [
            "SELECT 1 -- a comment",
            "SELECT /* c */ 1",
            r"SELECT E'a\nb'",
            r"SELECT 'a\'",
            "SELECT B'101'",
            "SELECT X'1F'",
            "SELECT N'x'",
            r"SELECT U&'d\0061t'",
            "SELECT $$x$$",
            "SELECT $tag$x$tag$",
            "SELECT 0x1F",
            "SELECT 1_000",
            "SELECT 1..2",
            "SELECT 123abc",
            "SELECT 1e",
            "SELECT 'unterminated",
            "SELECT \"unterminated",
            "SELECT '\u{1}'",
            "SELECT '\u{0}'",
            r#"SELECT U&"!0076ersion" UESCAPE '!' ()"#,
            r#"DELETE FROM U&"d0061""#,
            "SELECT 1::float(1)",
            "SELECT.5e1",
            "SELECT t.5 FROM t",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
        assert_eq!(
            shape(&format!("SELECT '{}'", "x".repeat(SHAPE_LIMIT))),
            None
        );
    }

    #[test]
    fn a_shape_is_parsed_once() {
        let mut cache = ShapeCache::default();
        for k in 0..100 {
            let sql = format!("UPDATE t SET v = v + {k} WHERE name = 'n{k}'");
            let classified = cache.classified(&sql);
            assert_eq!(classified.upstream_text, sql);
            assert_eq!(*classified, classify(&sql));
        }
        assert_eq!(cache.parsed, 1);
        // Constants the rules read are not shared between texts.
        for setting in ["'server_version'", "'search_path'", "'server_version'"] {
            let sql = format!("SELECT current_setting({setting})");
            assert_eq!(*cache.classified(&sql), classify(&sql), "{sql}");
        }
        assert_eq!(cache.parsed, 3);
    }

    /// Texts of a few shapes, with constants that change what DSQL answers and ones that do
    /// not, and forms the scanner does not read.
    fn random_text(rng: &mut fastrand::Rng) -> String {
        let string = |rng: &mut fastrand::Rng| {
            let pick = [
                "'a'",
                "''",
                "'it''s'",
                "'server_version'",
                "'search_path'",
                "'ASYNC'",
                "'tablesample'",
                "'-- no comment'",
                "'/* nor this */'",
                "'é'",
                "'english'",
                "'simple'",
                "'$$'",
                "'\"'",
            ];
            if rng.bool() {
                pick[rng.usize(..pick.len())].to_owned()
            } else {
                format!("'{}'", "x".repeat(rng.usize(0..40)))
            }
        };
        let number = |rng: &mut fastrand::Rng| {
            let pick = [
                "0",
                "1",
                "42",
                "1.5",
                ".5",
                "1e5",
                "1.e3",
                "2147483648",
                "99999999999999999999",
                "10",
                "65535",
                "65536",
                "70000",
                "100",
                "101",
            ];
            if rng.bool() {
                pick[rng.usize(..pick.len())].to_owned()
            } else {
                rng.u32(..).to_string()
            }
        };
        const TEMPLATES: &[&str] = &[
            "SELECT v FROM t WHERE k = #n",
            "UPDATE t SET v = v + #n WHERE k = #n",
            "UPDATE t SET v = #n WHERE k = #n RETURNING v",
            "INSERT INTO t (k, v) VALUES (#n, #s), (#n, #n)",
            "INSERT INTO t VALUES (#n, #n) ON CONFLICT (k) DO UPDATE SET v = #n",
            "DELETE FROM t WHERE name = #s AND k > #n",
            "SELECT current_setting(#s)",
            "SELECT set_config(#s, #s, false)",
            "SELECT #s::varchar(#n)",
            "SELECT x::numeric(#n, 2) FROM t",
            "SELECT #s @@ #s",
            "SELECT to_tsvector(#s, body) FROM docs",
            "SELECT to_tsvector(body) FROM docs WHERE k = #n",
            "SELECT lower(#s) FROM t",
            "SELECT now(), count(*) FROM t WHERE k = #n",
            "SELECT * FROM t WHERE k = #n FOR UPDATE",
            "SELECT * FROM t WHERE k = #n FOR SHARE",
            "SELECT * FROM t TABLESAMPLE SYSTEM (#n)",
            "BEGIN",
            "COMMIT",
            "ROLLBACK",
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            "SET search_path = #s",
            "SET lock_timeout = #n",
            "SHOW server_version",
            "SELECT #n + #n, #s || #s",
            "WITH u AS (UPDATE t SET v = #n RETURNING k) SELECT * FROM u",
            "SELECT #n; SELECT #s",
            "BEGIN; UPDATE t SET v = #n WHERE k = #n; COMMIT",
            "COPY t FROM STDIN",
            "select v from t where k in (#n, #n, #n) limit #n",
            "SELECT #s COLLATE \"de_DE\"",
            "SELECT #s COLLATE \"C\"",
            "CREATE TABLE x#n (a varchar(#n))",
            "CREATE SEQUENCE s CACHE #n",
            "ALTER TABLE t ALTER COLUMN v SET STATISTICS #n",
            "CREATE INDEX ASYNC i ON t (v)",
            "SELECT #n, \"it's\" FROM t",
            "SELECT E'a\\n' || #s",
            "SELECT $$x$$, #n",
            "SELECT #n -- comment",
            "SELECT pg_sleep(#n)",
            "SELECT * FROM t WHERE v = ANY('{1,2}'::int[]) AND k = #n",
            "SELECT interval #s, date #s",
            "SELECT #n #n",
            "SELECT #s #s",
            "AWS IAM GRANT r TO #s",
            "SELECT U&\"!0076ersion\" UESCAPE #s ()",
            "SELECT U&\"!0074o_tsvector\" UESCAPE #s (body) FROM docs",
            "INSERT INTO t VALUES (1::float(#n))",
            "SELECT.#n",
            "SELECT #s::varchar(#n) FROM t WHERE k = #n",
            "UPDATE t SET v = #n WHERE k = #n AND u = #s",
            "DELETE FROM t AS x WHERE x.k = #n",
            "UPDATE t SET v = #n FROM s WHERE t.k = s.k AND t.k = #n",
        ];
        let template = TEMPLATES[rng.usize(..TEMPLATES.len())];
        let mut out = String::new();
        let mut parts = template.split('#');
        out.push_str(parts.next().unwrap_or_default());
        for part in parts {
            let (constant, rest) = part.split_at(1);
            out.push_str(&if constant == "s" {
                string(rng)
            } else {
                number(rng)
            });
            out.push_str(rest);
        }
        out
    }

    /// Whatever the order texts come in, the cache answers what the parser would: the
    /// invariant behind classifying once per shape. `DSQL_SHAPE_SEEDS=n` runs `n` more seeds.
    #[test]
    fn the_cache_answers_what_the_parser_would() {
        let extra: u64 = std::env::var("DSQL_SHAPE_SEEDS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let mut shared = 0;
        for seed in 0..8 + extra {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut cache = ShapeCache::default();
            let mut seen = std::collections::HashSet::new();
            for _ in 0..400 {
                let sql = random_text(&mut rng);
                let fresh = classify(&sql);
                let before = cache.parsed;
                let cached = cache.classified(&sql);
                assert_eq!(
                    *cached, fresh,
                    "seed {seed} (DSQL_SHAPE_SEEDS): the cache's answer for {sql:?} differs"
                );
                // And it is used: a text whose shape was read before is not parsed again.
                if let Some(shape) = shape(&sql).filter(|_| fresh.reusable)
                    && !seen.insert(shape)
                {
                    assert_eq!(cache.parsed, before, "seed {seed}: {sql:?} parsed again");
                    shared += 1;
                }
            }
        }
        assert!(shared > 500, "only {shared} texts shared a shape");
    }
}
