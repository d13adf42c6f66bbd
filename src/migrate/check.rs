//! What DSQL refuses that can be known from a migration's text, checked before anything runs:
//! a migration should fail on the developer's machine, not halfway through a deploy.
//!
//! Hand-written over the statement's words (strings, quoted names and comments skipped), not
//! AWS's `dsql-lint`: that crate brings a fork of `sqlparser` (a second SQL grammar, not
//! PostgreSQL's, and a large build) for rules the runner needs a dozen of; the rest of DSQL's
//! refusals are the emulator's to find (run the migrations against it in your tests, as this
//! crate's tests do), and `dsql-lint` remains a good CI step of its own.

/// A statement DSQL would refuse: why, and how to write it instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The line (from 1) of the word at fault, in the file.
    pub line: usize,
    /// What DSQL refuses and what to write instead.
    pub reason: String,
}

/// The words of `text` (lower case) with their byte offsets, outside strings, quoted names,
/// dollar-quoted bodies and comments.
fn words(text: &str) -> Vec<(String, usize)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let word_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
    while i < bytes.len() {
        match bytes[i] {
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let mut depth = 1;
                i += 2;
                while i < bytes.len() && depth > 0 {
                    if bytes[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if bytes[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
            }
            quote @ (b'\'' | b'"') => {
                i += 1;
                while i < bytes.len() {
                    if bytes[i] == b'\\' && quote == b'\'' {
                        i += 2;
                    } else if bytes[i] == quote {
                        i += 1;
                        if bytes.get(i) != Some(&quote) {
                            break;
                        }
                        i += 1;
                    } else {
                        i += 1;
                    }
                }
            }
            b'$' => {
                let tag_end = text[i + 1..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map(|n| i + 1 + n);
                match tag_end {
                    Some(end) if bytes[end] == b'$' && !bytes[i + 1].is_ascii_digit() => {
                        let tag = &text[i..=end];
                        i = text[end + 1..]
                            .find(tag)
                            .map_or(bytes.len(), |at| end + 1 + at + tag.len());
                    }
                    _ => i += 1,
                }
            }
            b if word_byte(b) => {
                let start = i;
                while i < bytes.len() && word_byte(bytes[i]) {
                    i += 1;
                }
                out.push((text[start..i].to_ascii_lowercase(), start));
            }
            _ => i += 1,
        }
    }
    out
}

/// The findings for one statement starting at `line`.
pub fn check_statement(text: &str, line: usize) -> Vec<Finding> {
    let words = words(text);
    let w: Vec<&str> = words.iter().map(|(w, _)| w.as_str()).collect();
    let at = |index: usize| line + text[..words[index].1].matches('\n').count();
    let mut findings = Vec::new();
    let mut find = |index: usize, reason: String| {
        findings.push(Finding {
            line: at(index),
            reason,
        })
    };
    let Some(first) = w.first() else {
        return findings;
    };
    match *first {
        "begin" | "commit" | "rollback" | "end" | "start" | "savepoint" | "release" => find(
            0,
            format!(
                "`{}`: the runner runs each statement in a transaction of its own; take \
                 transaction control out of migrations",
                first.to_ascii_uppercase()
            ),
        ),
        "truncate" => find(
            0,
            "TRUNCATE is not supported on DSQL; use DELETE (in batches under 3 000 rows)".into(),
        ),
        "vacuum" => find(0, "VACUUM is not supported on DSQL".into()),
        _ => {}
    }
    let creates = *first == "create";
    for (i, word) in w.iter().enumerate() {
        let next = w.get(i + 1).copied();
        match *word {
            "serial" | "bigserial" | "smallserial" | "serial2" | "serial4" | "serial8"
                if creates || *first == "alter" =>
            {
                find(
                    i,
                    format!(
                        "type \"{word}\" does not exist on DSQL; use uuid DEFAULT \
                         gen_random_uuid(), or bigint GENERATED BY DEFAULT AS IDENTITY (CACHE 1)"
                    ),
                )
            }
            "index" if creates && i <= 2 && w[1..i].iter().all(|x| *x == "unique") => {
                if next == Some("concurrently") {
                    find(
                        i,
                        "CREATE INDEX CONCURRENTLY is not supported; use CREATE INDEX ASYNC".into(),
                    );
                } else if next != Some("async") {
                    find(
                        i,
                        "DSQL builds indexes asynchronously: write CREATE INDEX ASYNC (the runner \
                         waits for its job)"
                            .into(),
                    );
                }
            }
            "extension" | "trigger" | "tablespace" if creates && i == 1 => find(
                i,
                format!(
                    "CREATE {} is not supported on DSQL",
                    word.to_ascii_uppercase()
                ),
            ),
            "temp" | "temporary" | "unlogged" if creates && i == 1 => find(
                i,
                format!(
                    "{} tables are not supported on DSQL",
                    word.to_ascii_uppercase()
                ),
            ),
            "materialized" if creates && i == 1 => {
                find(i, "materialized views are not supported on DSQL".into())
            }
            "language" if creates => {
                if let Some(language) = next.filter(|l| *l != "sql") {
                    find(
                        i,
                        format!(
                            "functions in {language} are not supported on DSQL; use LANGUAGE sql"
                        ),
                    );
                }
            }
            "sequence" if creates && i == 1 && !w.contains(&"cache") => find(
                i,
                "CREATE SEQUENCE needs an explicit CACHE on DSQL (1, or 65536 and more)".into(),
            ),
            "identity" if (creates || *first == "alter") && !w[i..].contains(&"cache") => find(
                i,
                "identity columns need an explicit CACHE on DSQL: GENERATED … AS IDENTITY \
                 (CACHE 1)"
                    .into(),
            ),
            // CREATE SCHEMA s CREATE TABLE …: several DDL in one statement.
            "create" if creates && i > 0 && w[1] == "schema" => find(
                i,
                "one DDL per statement on DSQL: create the schema, then each object, in \
                 statements of their own"
                    .into(),
            ),
            _ => {}
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reasons(text: &str) -> Vec<(usize, String)> {
        check_statement(text, 10)
            .into_iter()
            .map(|f| (f.line, f.reason))
            .collect()
    }

    #[test]
    fn what_dsql_refuses_is_found_with_its_line() {
        let found = reasons("CREATE TABLE t (\n  id serial PRIMARY KEY\n)");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, 11);
        assert!(found[0].1.contains("\"serial\""), "{found:?}");
        assert!(
            reasons("CREATE INDEX i ON t (v)")[0]
                .1
                .contains("CREATE INDEX ASYNC")
        );
        assert!(
            reasons("create unique index i on t (v)")[0]
                .1
                .contains("ASYNC")
        );
        assert!(reasons("TRUNCATE t")[0].1.contains("TRUNCATE"));
        assert!(reasons("BEGIN")[0].1.contains("transaction"));
        assert!(
            reasons("CREATE EXTENSION pgcrypto")[0]
                .1
                .contains("EXTENSION")
        );
        assert!(
            reasons("CREATE TEMP TABLE x (id int)")[0]
                .1
                .contains("TEMP")
        );
        assert!(reasons("CREATE SEQUENCE s")[0].1.contains("CACHE"));
        assert!(
            reasons("CREATE TABLE t (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY)")[0]
                .1
                .contains("CACHE")
        );
        assert!(
            reasons(
                "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$"
            )[0]
            .1
            .contains("plpgsql")
        );
        assert!(
            reasons("CREATE SCHEMA s CREATE TABLE t (id int)")[0]
                .1
                .contains("one DDL")
        );
    }

    #[test]
    fn what_dsql_accepts_passes() {
        for ok in [
            "CREATE TABLE owner (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), name varchar(30))",
            "CREATE INDEX ASYNC owner_name ON owner (name)",
            "CREATE UNIQUE INDEX ASYNC IF NOT EXISTS u ON owner (name)",
            "CREATE SEQUENCE s CACHE 65536",
            "CREATE TABLE t (id bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY)",
            "INSERT INTO owner (name) VALUES ('serial; CREATE INDEX i ON t (v)')",
            "-- CREATE INDEX i ON t (v)\nSELECT 1",
            "COMMENT ON TABLE owner IS 'begin truncate serial'",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
            "UPDATE owner SET name = \"serial\".x FROM \"serial\"",
        ] {
            assert_eq!(reasons(ok), [], "{ok}");
        }
    }
}
