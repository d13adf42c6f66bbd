//! Splitting a migration file into statements, as PostgreSQL's scanner reads them: `;` ends a
//! statement except inside quotes (`'…'` with `''`, `E'…'` with backslash escapes, `"…"`),
//! dollar quoting (`$tag$…$tag$`), comments (`-- …`, nested `/* … */`) and `BEGIN ATOMIC … END`
//! bodies of SQL functions and procedures.

/// One statement of a file: its text (without the `;`, trimmed) and the line it starts on
/// (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlStatement {
    /// The statement's text.
    pub text: String,
    /// The line of the file its first character is on, from 1.
    pub line: usize,
}

/// Splits `sql` into its statements, dropping empty ones (a lone `;`, comments only).
pub fn split_statements(sql: &str) -> Vec<SqlStatement> {
    let bytes = sql.as_bytes();
    let mut statements = Vec::new();
    let mut start = 0;
    let mut i = 0;
    // Words of the current statement at nesting level 0, for BEGIN ATOMIC … END.
    let mut atomic_depth = 0usize;
    let mut previous_word = String::new();
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'-' | b'/' if comment_end(bytes, i).is_some() => {
                i = comment_end(bytes, i).unwrap_or(bytes.len());
                continue;
            }
            b'\'' => {
                // E'…' allows backslash escapes; a standard string only doubles quotes.
                let escapes = i > 0
                    && matches!(bytes[i - 1], b'e' | b'E')
                    && (i < 2 || !is_word_byte(bytes[i - 2]));
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' if escapes => i += 2,
                        b'\'' if bytes.get(i + 1) == Some(&b'\'') => i += 2,
                        b'\'' => {
                            i += 1;
                            break;
                        }
                        _ => i += 1,
                    }
                }
                previous_word.clear();
                continue;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() {
                    if bytes[i] == b'"' {
                        if bytes.get(i + 1) == Some(&b'"') {
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    i += 1;
                }
                previous_word.clear();
                continue;
            }
            b'$' if i == 0 || !is_word_byte(bytes[i - 1]) => {
                if let Some(tag_end) = dollar_tag(bytes, i) {
                    let tag = &sql[i..=tag_end];
                    match sql[tag_end + 1..].find(tag) {
                        Some(at) => i = tag_end + 1 + at + tag.len(),
                        None => i = bytes.len(),
                    }
                    previous_word.clear();
                    continue;
                }
                i += 1;
            }
            b';' if atomic_depth == 0 => {
                push(sql, start, i, &mut statements);
                i += 1;
                start = i;
                previous_word.clear();
                continue;
            }
            c if is_word_byte(c) => {
                let begin = i;
                while i < bytes.len() && is_word_byte(bytes[i]) {
                    i += 1;
                }
                let word = sql[begin..i].to_ascii_lowercase();
                match word.as_str() {
                    "atomic" if previous_word == "begin" => atomic_depth += 1,
                    // Inside an atomic body, CASE … END nests too.
                    "case" if atomic_depth > 0 => atomic_depth += 1,
                    "end" if atomic_depth > 0 => atomic_depth -= 1,
                    _ => {}
                }
                previous_word = word;
                continue;
            }
            _ => i += 1,
        }
    }
    push(sql, start, bytes.len(), &mut statements);
    statements
}

/// The first `n` words of a statement (lower case), after comments.
pub(crate) fn first_words(text: &str, n: usize) -> Vec<String> {
    let mut rest = text;
    loop {
        let trimmed = rest.trim_start();
        if let Some(after) = trimmed.strip_prefix("--") {
            rest = after.split_once('\n').map_or("", |(_, r)| r);
        } else if let Some(after) = trimmed.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, r)| r);
        } else {
            rest = trimmed;
            break;
        }
    }
    rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .take(n)
        .map(str::to_ascii_lowercase)
        .collect()
}

/// If a comment (`-- …` to the end of the line, or a nested `/* … */`) starts at `i`, the
/// index just past it.
pub(crate) fn comment_end(bytes: &[u8], i: usize) -> Option<usize> {
    match (bytes.get(i), bytes.get(i + 1)) {
        (Some(b'-'), Some(b'-')) => Some(
            bytes[i..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(bytes.len(), |n| i + n),
        ),
        (Some(b'/'), Some(b'*')) => {
            let (mut depth, mut j) = (1, i + 2);
            while j < bytes.len() && depth > 0 {
                if bytes[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if bytes[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            Some(j)
        }
        _ => None,
    }
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

/// The index of the closing `$` of a dollar-quote tag starting at `at` (`$$` or `$name$`).
fn dollar_tag(bytes: &[u8], at: usize) -> Option<usize> {
    let mut j = at + 1;
    while j < bytes.len() {
        match bytes[j] {
            b'$' => return Some(j),
            // A tag is an identifier that does not start with a digit ($1 is a parameter).
            b if b.is_ascii_digit() && j == at + 1 => return None,
            b if is_word_byte(b) => j += 1,
            _ => return None,
        }
    }
    None
}

/// Adds the statement in `sql[from..to]` unless it holds only white space and comments.
fn push(sql: &str, from: usize, to: usize, statements: &mut Vec<SqlStatement>) {
    let piece = &sql[from..to];
    if only_comments(piece) {
        return;
    }
    let leading = piece.len() - piece.trim_start().len();
    let line = sql[..from + leading].matches('\n').count() + 1;
    statements.push(SqlStatement {
        text: piece.trim().to_owned(),
        line,
    });
}

fn only_comments(piece: &str) -> bool {
    let bytes = piece.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b if b.is_ascii_whitespace() => i += 1,
            _ => match comment_end(bytes, i) {
                Some(end) => i = end,
                None => return false,
            },
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn texts(sql: &str) -> Vec<String> {
        split_statements(sql).into_iter().map(|s| s.text).collect()
    }

    #[test]
    fn semicolons_end_statements_outside_quotes_and_comments() {
        assert_eq!(
            texts("CREATE TABLE a (id int);\nINSERT INTO a VALUES (1);"),
            ["CREATE TABLE a (id int)", "INSERT INTO a VALUES (1)"]
        );
        assert_eq!(
            texts("SELECT 'a;b', \"c;d\", E'e\\';f' ; SELECT 'it''s;'"),
            ["SELECT 'a;b', \"c;d\", E'e\\';f'", "SELECT 'it''s;'"]
        );
        assert_eq!(
            texts("-- one; two\nSELECT 1; /* three; /* nested; */ four; */ SELECT 2"),
            [
                "-- one; two\nSELECT 1",
                "/* three; /* nested; */ four; */ SELECT 2"
            ]
        );
        assert_eq!(
            texts(
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$; SELECT $tag$ ; $$ ; $tag$"
            ),
            [
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$",
                "SELECT $tag$ ; $$ ; $tag$"
            ]
        );
        // $1 is a parameter, not a dollar quote.
        assert_eq!(texts("SELECT $1; SELECT 2"), ["SELECT $1", "SELECT 2"]);
    }

    #[test]
    fn begin_atomic_bodies_keep_their_semicolons() {
        let sql = "CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC \
                   SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END; SELECT 2; END;\nSELECT 3";
        assert_eq!(
            texts(sql),
            [
                "CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC \
                 SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END; SELECT 2; END",
                "SELECT 3"
            ]
        );
        // BEGIN alone is a transaction statement, not a body.
        assert_eq!(
            texts("BEGIN; SELECT 1; COMMIT"),
            ["BEGIN", "SELECT 1", "COMMIT"]
        );
    }

    #[test]
    fn lines_and_empty_statements() {
        let statements = split_statements("\n\n-- header\nSELECT 1;\n;\n  SELECT\n2;\n-- end\n");
        assert_eq!(
            statements,
            [
                SqlStatement {
                    text: "-- header\nSELECT 1".into(),
                    line: 3
                },
                SqlStatement {
                    text: "SELECT\n2".into(),
                    line: 6
                }
            ]
        );
        assert!(split_statements("-- nothing\n/* at all */ ;").is_empty());
    }

    /// A piece of SQL that holds no statement-ending `;` of its own, and how it may be written.
    fn piece() -> impl Strategy<Value = String> {
        let word = "[a-z_][a-z0-9_]{0,6}";
        let text = "[a-z0-9 ;$'\"*/\\-]{0,12}";
        prop_oneof![
            word.prop_map(|w| w.to_string()),
            text.prop_map(|t| format!("'{}'", t.replace('\'', "''"))),
            text.prop_map(|t| format!("\"{}\"", t.replace('"', "\"\""))),
            text.prop_map(|t| format!("E'{}'", t.replace('\\', "\\\\").replace('\'', "\\'"))),
            (word, text).prop_map(|(tag, t)| {
                let body = t.replace('$', "");
                format!("${tag}${body}${tag}$")
            }),
            text.prop_map(|t| format!("/* {} */", t.replace("*/", "").replace("/*", ""))),
            text.prop_map(|t| format!("-- {}\n", t.replace('\n', ""))),
            Just("$1".to_string()),
        ]
    }

    fn statement() -> impl Strategy<Value = String> {
        proptest::collection::vec(piece(), 1..6).prop_map(|pieces| {
            // A statement starts with a word, so it is never only a comment.
            format!("select {}", pieces.join(" "))
        })
    }

    proptest! {
        #[test]
        fn splitting_joined_statements_gives_them_back(
            statements in proptest::collection::vec(statement(), 1..6),
            separator in prop_oneof![Just(";"), Just(";\n"), Just(" ;\n\n")],
        ) {
            let file = statements.join(separator);
            let split = texts(&file);
            let expected: Vec<String> = statements.iter().map(|s| s.trim().to_string()).collect();
            prop_assert_eq!(split, expected);
        }
    }
}
