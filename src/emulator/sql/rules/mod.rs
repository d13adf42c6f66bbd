//! DSQL's statement rules (`DSQL_SQL_RULES.md` §1–§5, §7, the declared sizes of §8), applied
//! to the parse tree that PostgreSQL's own parser (`pg_query`) gives: which statements DSQL
//! refuses, with its SQLSTATE and message, which are DDL or DML for the transaction rules, and
//! what the relay sends on instead (without `ASYNC`, with DSQL's version, with a job's row).

use pg_query::NodeEnum;
use pg_query::protobuf;

/// DSQL's answer to a statement it does not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) detail: Option<String>,
    /// An SQL expression PostgreSQL evaluates for the message instead (when the message names
    /// something only the server knows).
    pub(crate) message_sql: Option<String>,
}

impl Refusal {
    /// A refusal with this SQLSTATE and message.
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
            detail: None,
            message_sql: None,
        }
    }
}

/// `text` as an SQL string literal whatever `standard_conforming_strings` says: an `E''` string,
/// `\` and `'` doubled.
pub(crate) fn literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

fn refuse(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal::new(code, message)
}

fn unsupported(message: impl Into<String>) -> Refusal {
    refuse("0A000", message)
}

/// What a statement is, for the transaction rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Changes the catalog (DDL, GRANT, REVOKE): alone in its transaction.
    Ddl,
    /// Writes rows.
    Dml,
    /// Opens a transaction block (`BEGIN`, `START TRANSACTION`).
    Begin,
    /// Commits it (`COMMIT`, `END`, `COMMIT WORK`, however commented): where DSQL validates.
    Commit,
    /// Rolls it back (`ROLLBACK`, `ABORT`).
    Rollback,
    /// Anything else (reads, SET, SHOW, ...).
    Other,
}

/// One statement of a query, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Statement {
    pub(crate) kind: Kind,
    /// DSQL refuses it whatever the transaction.
    pub(crate) refusal: Option<Refusal>,
    /// For a write that may lose a conflict: the command tag the client is told when it does
    /// (its row count is not known then; see the module docs).
    pub(crate) write_tag: Option<&'static str>,
    /// For a write whose text bounds the rows it writes (`INSERT … VALUES`), that bound.
    pub(crate) most_rows: Option<u64>,
    /// `COPY … FROM STDIN`: the server waits for the client's data in the middle of its answer.
    pub(crate) copy_in: bool,
    /// It waits for the table locks it needs, as on DSQL nothing fails it for them (DDL,
    /// `ANALYZE`): PostgreSQL's lock waits are not conflicts for it.
    pub(crate) waits: bool,
    /// For `SELECT … FOR UPDATE`: the statement that, at `COMMIT`, locks the same rows and
    /// writes them (see [`locking_read`]); the client's statement goes upstream without its
    /// locking clause, so that it never waits.
    pub(crate) touch: Option<String>,
    /// For a DDL with `IF NOT EXISTS`, the name of the object it creates (as the catalog
    /// spells it): an "already exists" error naming it can only be a concurrent creation of
    /// that object (it did not exist when checked). See [`name_key`].
    pub(crate) exists_ok: Option<u64>,
    /// For an `UPDATE` or `DELETE` of one table whose `WHERE` sets columns equal to constants
    /// or parameters: that table and those columns. With a unique index over some of them it
    /// writes one row at most ([`Pinned`]).
    pub(crate) pinned: Option<Pinned>,
}

impl Statement {
    fn other() -> Statement {
        Statement {
            kind: Kind::Other,
            refusal: None,
            write_tag: None,
            most_rows: None,
            copy_in: false,
            waits: false,
            touch: None,
            exists_ok: None,
            pinned: None,
        }
    }
}

/// A query text as DSQL reads it: its statements (none when PostgreSQL's parser does not accept
/// it: PostgreSQL then answers with its own syntax error, as DSQL does), and the text to send
/// to PostgreSQL (the DSQL-only `ASYNC` of `CREATE INDEX ASYNC` and `ALTER TABLE ASYNC` taken
/// out, so that PostgreSQL reads what DSQL's grammar reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Classified {
    pub(crate) statements: Vec<Statement>,
    pub(crate) upstream_text: String,
    /// The relations the text names (lower case, without schema).
    pub(crate) tables: Vec<String>,
    /// Those it writes (the targets of `INSERT`, `UPDATE`, `DELETE`, `MERGE`).
    pub(crate) written: Vec<String>,
    /// The command tag of the asynchronous DDL in it, which the text sent on runs in a
    /// `SELECT` answering its `job_id` row (see [`job_statement`]); or `SHOW`, for a
    /// `SHOW server_version[_num]` answered with a `SELECT` of DSQL's value.
    pub(crate) job: Option<&'static str>,
    /// It holds for every text of the same shape ([`shape::shape`]): the rules read none of
    /// the text's constants, refuse nothing and rewrite nothing.
    pub(crate) reusable: bool,
}

impl Classified {
    /// `statements` for `upstream_text`, which names no relation and runs no job.
    fn whole(statements: Vec<Statement>, upstream_text: String) -> Classified {
        Classified {
            statements,
            upstream_text,
            tables: Vec::new(),
            written: Vec::new(),
            job: None,
            reusable: false,
        }
    }
}

/// A statement DSQL refuses with `refusal`.
fn refused(refusal: Refusal) -> Statement {
    Statement {
        refusal: Some(refusal),
        ..Statement::other()
    }
}

/// Reads `sql`.
pub(crate) fn classify(sql: &str) -> Classified {
    // DSQL's own admin statements, which PostgreSQL's grammar does not know.
    if let Some(call) = aws_iam(sql) {
        let mut classified = classify(&call);
        for statement in &mut classified.statements {
            // A catalog change, as GRANT is (one per transaction, not with DML).
            statement.kind = Kind::Ddl;
            statement.waits = false;
        }
        classified.reusable = false;
        return classified;
    }
    let (upstream_text, async_at) = strip_async(sql);
    let Ok(parsed) = pg_query::parse(&upstream_text, pg_query::ParserOptions::DEFAULT) else {
        // §10 (L): `DROP TRIGGER [IF EXISTS] t` without `ON table`, which PostgreSQL's grammar
        // refuses as a syntax error, DSQL refuses as unsupported (the wording is inferred).
        if starts_with_words(&upstream_text, &["drop", "trigger"])
            && !has_keyword(&upstream_text, "on")
        {
            return Classified::whole(
                vec![refused(unsupported("DROP TRIGGER not supported"))],
                upstream_text,
            );
        }
        return Classified::whole(Vec::new(), upstream_text);
    };
    let bare = |name: &String| {
        let name = name.rsplit('.').next().unwrap_or(name);
        name.trim_matches('"').to_ascii_lowercase()
    };
    let mut tables: Vec<String> = parsed.tables.iter().map(|(name, _)| bare(name)).collect();
    tables.sort();
    tables.dedup();
    let mut written: Vec<String> = parsed
        .tables
        .iter()
        .filter(|(_, context)| *context == pg_query::Context::DML)
        .map(|(name, _)| bare(name))
        .collect();
    written.sort();
    written.dedup();
    let tablesample = has_tablesample(&upstream_text);
    // `SHOW server_version[_num]` alone answers DSQL's version.
    if let [raw] = parsed.protobuf.stmts.as_slice()
        && let Some(NodeEnum::VariableShowStmt(show)) =
            raw.stmt.as_ref().and_then(|n| n.node.as_ref())
    {
        let name = show.name.to_ascii_lowercase();
        let value = match name.as_str() {
            "server_version" => Some(super::DSQL_SERVER_VERSION),
            "server_version_num" => Some(super::DSQL_SERVER_VERSION_NUM),
            // PostgreSQL 16 (DSQL's) has no such settings; an older upstream still answers.
            "lc_collate" | "lc_ctype" => {
                let refusal = refuse(
                    "42704",
                    format!("unrecognized configuration parameter \"{name}\""),
                );
                return Classified::whole(vec![refused(refusal)], upstream_text);
            }
            _ => None,
        };
        if let Some(value) = value {
            return Classified {
                statements: vec![Statement::other()],
                upstream_text: format!(
                    "SELECT '{value}'::text AS {}",
                    show.name.to_ascii_lowercase()
                ),
                tables: Vec::new(),
                written: Vec::new(),
                // Answered with a `SELECT`, tagged as the `SHOW` it is.
                job: Some("SHOW"),
                reusable: false,
            };
        }
    }
    let mut edits = environment_edits(&parsed.protobuf, &upstream_text);
    edits.extend(numeric_edits(&parsed.protobuf, &upstream_text));
    // Only a text that long can hold a value over the limit.
    let scanned = (upstream_text.len() > VALUE_LIMIT)
        .then(|| pg_query::scan(&upstream_text).ok())
        .flatten();
    let mut job = None;
    let statements: Vec<Statement> = parsed
        .protobuf
        .stmts
        .iter()
        .map(|raw| {
            let start = raw.stmt_location.max(0) as usize;
            let end = if raw.stmt_len == 0 {
                upstream_text.len()
            } else {
                start + raw.stmt_len as usize
            };
            let is_async = async_at.iter().any(|at| (start..end).contains(at));
            let node = raw.stmt.as_ref().and_then(|n| n.node.as_ref());
            match node {
                Some(node) => {
                    let mut statement = statement(node, is_async, tablesample);
                    // `USING <method>` leaves no trace in the parse tree (the default is
                    // spelled out): DSQL refuses any explicit one (DSQL_SQL_RULES §9).
                    if matches!(node, NodeEnum::IndexStmt(_))
                        && statement.refusal.is_none()
                        && has_keyword(&upstream_text[start..end], "using")
                    {
                        statement.refusal = Some(unsupported(
                            "specifying an index access method (USING) not supported for \
                             CREATE INDEX",
                        ));
                    }
                    // `SET STATISTICS DEFAULT` is PostgreSQL 17's syntax; DSQL's grammar (16's)
                    // does not know it (§10, L), whatever the upstream does.
                    if let NodeEnum::AlterStatsStmt(a) = node
                        && a.stxstattarget.is_none()
                        && statement.refusal.is_none()
                    {
                        let text = &upstream_text[start..end];
                        let written = pg_query::scan(text)
                            .ok()
                            .and_then(|scanned| {
                                scanned
                                    .tokens
                                    .iter()
                                    .map(|t| &text[t.start as usize..t.end as usize])
                                    .rfind(|w| w.eq_ignore_ascii_case("default"))
                                    .map(str::to_owned)
                            })
                            .unwrap_or_else(|| "DEFAULT".to_owned());
                        statement.refusal = Some(refuse(
                            "42601",
                            format!("syntax error at or near \"{written}\""),
                        ));
                    }
                    // An `ENFORCED` / `NOT ENFORCED` the parse tree cannot tell from the default
                    // (a table's constraint, ALTER CONSTRAINT): found by its token (§10, L).
                    if matches!(node, NodeEnum::CreateStmt(_) | NodeEnum::AlterTableStmt(_))
                        && statement.refusal.is_none()
                        && constraint_enforceability_written(&upstream_text[start..end])
                    {
                        statement.refusal = Some(unsupported(
                            "ENFORCED / NOT ENFORCED not supported for constraints",
                        ));
                    }
                    // A write stores its values: no string in it may be over DSQL's largest.
                    if statement.kind == Kind::Dml
                        && statement.refusal.is_none()
                        && let Some(scanned) = &scanned
                        && holds_large_string(scanned, start, end)
                    {
                        statement.refusal = Some(value_limit_exceeded("text"));
                    }
                    if let (true, None, Some((tag, select))) = (
                        is_async,
                        &statement.refusal,
                        job_statement(node, &upstream_text[start..end]),
                    ) {
                        // The statement is replaced whole: no edit inside it (or just after it)
                        // may be made as well.
                        edits.retain(|edit| !(start..=end).contains(&edit.0));
                        edits.push((start, end, select));
                        job = Some(tag);
                    }
                    if statement.refusal.is_none()
                        && let Some((stripped, touch)) = locking_read(node)
                    {
                        edits.retain(|edit| !(start..end).contains(&edit.0));
                        edits.push((start, end, stripped));
                        statement.touch = Some(touch);
                    }
                    statement
                }
                None => Statement::other(),
            }
        })
        .collect();
    let reusable = edits.is_empty()
        && job.is_none()
        && async_at.is_empty()
        && upstream_text.len() <= shape::SHAPE_LIMIT
        && statements.iter().all(|s| {
            s.refusal.is_none() && s.touch.is_none() && s.exists_ok.is_none() && !s.copy_in
        })
        && shape::reads_no_constant(&parsed.protobuf);
    Classified {
        statements,
        upstream_text: edited(&upstream_text, edits),
        tables,
        written,
        job,
        reusable,
    }
}

/// A function's own name, lower case, without `pg_catalog.`.
fn function_name(call: &protobuf::FuncCall) -> Option<String> {
    builtin_name(&call.funcname)
}

/// The last of `names`, lower case, if it names a built-in object (alone, or after
/// `pg_catalog`).
fn builtin_name(names: &[protobuf::Node]) -> Option<String> {
    let names: Vec<&str> = names.iter().filter_map(string_of).collect();
    match names.as_slice() {
        ["pg_catalog", name] | [name] => Some(name.to_ascii_lowercase()),
        _ => None,
    }
}

/// DSQL's largest text, bytea or jsonb value (§8).
pub(crate) const VALUE_LIMIT: usize = 1 << 20;

/// DSQL's refusal of a value over [`VALUE_LIMIT`] of type `type_name`.
pub(crate) fn value_limit_exceeded(type_name: &str) -> Refusal {
    refuse(
        "54000",
        format!("datatype limit greater than {VALUE_LIMIT} bytes not supported for {type_name}"),
    )
}

/// Whether `sql[start..end]` holds a string constant over [`VALUE_LIMIT`] (found with
/// PostgreSQL's scanner: quoted, escaped or dollar-quoted alike).
fn holds_large_string(scanned: &protobuf::ScanResult, start: usize, end: usize) -> bool {
    scanned.tokens.iter().any(|t| {
        t.token == protobuf::Token::Sconst as i32
            && (start..end).contains(&(t.start as usize))
            && (t.end - t.start) as usize > VALUE_LIMIT
    })
}

/// The first `f` gives something for, over the nodes of `node` (pg_query's walk of
/// expressions, and the `VALUES` lists it leaves out).
fn find_node<T>(
    node: &NodeEnum,
    f: &mut dyn FnMut(pg_query::NodeRef<'_>) -> Option<T>,
) -> Option<T> {
    for (node, ..) in node.nodes() {
        if let Some(found) = f(node) {
            return Some(found);
        }
        if let pg_query::NodeRef::SelectStmt(select) = node {
            for list in select.values_lists.iter().filter_map(|l| l.node.as_ref()) {
                if let Some(found) = find_node(list, f) {
                    return Some(found);
                }
            }
        }
    }
    None
}

/// DSQL's answer to the functions and operators it does not run (§5): full-text search has no
/// configurations; geometric types are not supported.
fn query_refusal(node: &NodeEnum) -> Option<Refusal> {
    let no_configuration = |name: &str| {
        refuse(
            "42704",
            format!("text search configuration \"{name}\" does not exist"),
        )
    };
    let call_statement = matches!(node, NodeEnum::CallStmt(_));
    find_node(node, &mut |node| match node {
        // DSQL names the procedure's own signature, where PostgreSQL names the call's.
        pg_query::NodeRef::FuncCall(call)
            if !call_statement
                && call
                    .funcname
                    .iter()
                    .filter_map(string_of)
                    .map(str::to_ascii_lowercase)
                    .eq(["sys", "wait_for_job"]) =>
        {
            Some(refuse("42809", "sys.wait_for_job(text) is a procedure"))
        }
        pg_query::NodeRef::FuncCall(call) => {
            let name = function_name(call)?;
            let first = call.args.first().and_then(string_of);
            match name.as_str() {
                // A configuration first when there are two arguments.
                "to_tsvector"
                | "to_tsquery"
                | "plainto_tsquery"
                | "phraseto_tsquery"
                | "websearch_to_tsquery" => Some(no_configuration(
                    &first
                        .filter(|_| call.args.len() >= 2)
                        .map_or("english".into(), str::to_ascii_lowercase),
                )),
                // … and when there are three or four.
                "ts_headline" => Some(no_configuration(
                    &first
                        .filter(|_| call.args.len() >= 3)
                        .map_or("english".into(), str::to_ascii_lowercase),
                )),
                "ts_rank" | "ts_rank_cd" | "setweight" => Some(no_configuration("english")),
                "line" | "lseg" | "box" | "path" | "polygon" | "circle" => {
                    Some(unsupported(format!("datatype {name} not supported")))
                }
                // `set_config` sets what `SET` does, under the same rules (a name only the
                // server knows at run time goes through).
                "set_config" => {
                    first.and_then(|name| parameter_refusal(&name.to_ascii_lowercase()))
                }
                "center" => Some(unsupported("datatype point not supported")),
                "radius" => Some(unsupported("datatype circle not supported")),
                _ => None,
            }
        }
        // §10 (L): only the C collations (DSQL has no locale ones; the wording is inferred).
        pg_query::NodeRef::CollateClause(c) => collation(&c.collname),
        // `text @@ text` searches with the default configuration.
        pg_query::NodeRef::AExpr(e)
            if e.name.iter().filter_map(string_of).eq(["@@"])
                && [&e.lexpr, &e.rexpr]
                    .iter()
                    .all(|side| side.as_deref().and_then(string_of).is_some()) =>
        {
            Some(no_configuration("english"))
        }
        _ => None,
    })
}

/// Takes out `ASYNC` after `CREATE [UNIQUE] INDEX` and after `ALTER TABLE` (found with
/// PostgreSQL's scanner, so never inside a string or a comment). Returns the text and the
/// offsets, in it, where an `ASYNC` was.
fn strip_async(sql: &str) -> (String, Vec<usize>) {
    if !mentions(sql, "async") {
        return (sql.to_owned(), Vec::new());
    }
    let Ok(scanned) = pg_query::scan(sql) else {
        return (sql.to_owned(), Vec::new());
    };
    let word = |t: &protobuf::ScanToken| &sql[t.start as usize..t.end as usize];
    let tokens = &scanned.tokens;
    let mut cuts = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        if !word(token).eq_ignore_ascii_case("async") || i == 0 {
            continue;
        }
        let before: Vec<String> = tokens[i.saturating_sub(3)..i]
            .iter()
            .map(|t| word(t).to_ascii_uppercase())
            .collect();
        let before: Vec<&str> = before.iter().map(String::as_str).collect();
        let index = matches!(
            before.as_slice(),
            [.., "CREATE", "INDEX"] | [.., "CREATE", "UNIQUE", "INDEX"]
        );
        let table = matches!(before.as_slice(), [.., "ALTER", "TABLE"]);
        if index || table {
            cuts.push((token.start as usize, token.end as usize));
        }
    }
    let mut out = String::with_capacity(sql.len());
    let mut at = Vec::new();
    let mut last = 0;
    for (start, end) in cuts {
        out.push_str(&sql[last..start]);
        at.push(out.len());
        last = end;
    }
    out.push_str(&sql[last..]);
    (out, at)
}

/// Whether `word` (ASCII) appears anywhere in `sql`, in any case: a cheap test that must pass
/// before a scan for it as a keyword can find it (keywords are written in ASCII, whole).
fn mentions(sql: &str, word: &str) -> bool {
    let word = word.as_bytes();
    if word.is_empty() {
        return false;
    }
    sql.as_bytes()
        .windows(word.len())
        .any(|window| window.eq_ignore_ascii_case(word))
}

/// `AWS IAM GRANT <role> TO '<arn>'` or `AWS IAM REVOKE <role> FROM '<arn>'` (alone, with an
/// optional `;`), as the `CALL` the upstream runs it with (`bootstrap.sql`).
fn aws_iam(sql: &str) -> Option<String> {
    if !mentions(sql, "aws") {
        return None;
    }
    let scanned = pg_query::scan(sql).ok()?;
    let words: Vec<&str> = scanned
        .tokens
        .iter()
        .filter(|t| {
            t.token != protobuf::Token::SqlComment as i32
                && t.token != protobuf::Token::CComment as i32
        })
        .map(|t| &sql[t.start as usize..t.end as usize])
        .collect();
    let words = match words.as_slice() {
        [rest @ .., ";"] => rest,
        all => all,
    };
    let [aws, iam, verb, role, preposition, arn] = words else {
        return None;
    };
    if !aws.eq_ignore_ascii_case("aws") || !iam.eq_ignore_ascii_case("iam") {
        return None;
    }
    let grant = match (
        verb.to_ascii_lowercase().as_str(),
        preposition.to_ascii_lowercase().as_str(),
    ) {
        ("grant", "to") => true,
        ("revoke", "from") => false,
        _ => return None,
    };
    let role = match role.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => role.to_ascii_lowercase(),
    };
    let arn = arn.strip_prefix('\'')?.strip_suffix('\'')?;
    Some(format!(
        "CALL sys.dsql_emulator_iam({grant}, {}, {})",
        literal(&role),
        literal(&arn.replace("''", "'"))
    ))
}

/// Whether the text uses `TABLESAMPLE` (as a keyword, not in a string).
fn has_tablesample(sql: &str) -> bool {
    has_keyword(sql, "tablesample")
}

/// §10 (L): only the C collations (DSQL has no locale ones; the wording is inferred), in an
/// expression, a column, a domain or an index key.
fn collation(names: &[protobuf::Node]) -> Option<Refusal> {
    let name = names.iter().filter_map(string_of).next_back()?;
    (!matches!(name, "C" | "POSIX" | "default" | "ucs_basic"))
        .then(|| unsupported(format!("collation \"{name}\" not supported")))
}

/// Whether a table statement's text says `ENFORCED` of a constraint: the keyword after `)`,
/// `NOT` or a deferrability word (a column named `enforced` comes after `(`, `,`, `COLUMN`,
/// `TO`, `ALTER`, `RENAME` or `DROP`).
fn constraint_enforceability_written(sql: &str) -> bool {
    let Ok(scanned) = pg_query::scan(sql) else {
        return false;
    };
    let words: Vec<&str> = scanned
        .tokens
        .iter()
        .filter(|t| {
            t.token != protobuf::Token::SqlComment as i32
                && t.token != protobuf::Token::CComment as i32
        })
        .map(|t| {
            if t.token == protobuf::Token::Ident as i32 {
                ""
            } else {
                &sql[t.start as usize..t.end as usize]
            }
        })
        .collect();
    words.windows(2).any(|pair| {
        pair[1].eq_ignore_ascii_case("enforced")
            && [")", "not", "deferrable", "deferred", "immediate"]
                .iter()
                .any(|before| pair[0].eq_ignore_ascii_case(before))
    })
}

/// Whether `sql`'s first tokens (comments aside) are `words` (any case).
fn starts_with_words(sql: &str, words: &[&str]) -> bool {
    pg_query::scan(sql).is_ok_and(|scanned| {
        let mut tokens = scanned.tokens.iter().filter(|t| {
            t.token != protobuf::Token::SqlComment as i32
                && t.token != protobuf::Token::CComment as i32
        });
        words.iter().all(|w| {
            tokens
                .next()
                .is_some_and(|t| sql[t.start as usize..t.end as usize].eq_ignore_ascii_case(w))
        })
    })
}

/// Whether the text uses `keyword` as a keyword (not in a string, a comment or a quoted name).
fn has_keyword(sql: &str, keyword: &str) -> bool {
    mentions(sql, keyword)
        && pg_query::scan(sql).is_ok_and(|scanned| {
            scanned.tokens.iter().any(|t| {
                sql[t.start as usize..t.end as usize].eq_ignore_ascii_case(keyword)
                    && t.token != protobuf::Token::Ident as i32
            })
        })
}

fn statement(node: &NodeEnum, is_async: bool, tablesample: bool) -> Statement {
    let kind = kind_of(node);
    let refusal = refusal_of(node, is_async, tablesample).or_else(|| query_refusal(node));
    // A write with RETURNING cannot be answered without its rows: if it loses, the client
    // gets the conflict at the statement instead (see the module docs).
    let write_tag = match node {
        NodeEnum::InsertStmt(i) if i.returning_clause.is_none() => Some("INSERT 0 1"),
        NodeEnum::UpdateStmt(u) if u.returning_clause.is_none() => Some("UPDATE 1"),
        NodeEnum::DeleteStmt(d) if d.returning_clause.is_none() => Some("DELETE 1"),
        _ => None,
    };
    Statement {
        kind,
        refusal,
        write_tag,
        most_rows: most_rows(node),
        copy_in: matches!(node, NodeEnum::CopyStmt(c) if c.is_from && c.filename.is_empty()),
        waits: kind == Kind::Ddl || matches!(node, NodeEnum::VacuumStmt(v) if !v.is_vacuumcmd),
        touch: None,
        exists_ok: match node {
            NodeEnum::CreateStmt(c) if c.if_not_exists => c.relation.as_ref().map(|r| &r.relname),
            NodeEnum::IndexStmt(i) if i.if_not_exists => Some(&i.idxname),
            NodeEnum::CreateSeqStmt(c) if c.if_not_exists => {
                c.sequence.as_ref().map(|r| &r.relname)
            }
            NodeEnum::CreateSchemaStmt(c) if c.if_not_exists => Some(&c.schemaname),
            NodeEnum::CreateTableAsStmt(c) if c.if_not_exists => c
                .into
                .as_ref()
                .and_then(|into| into.rel.as_ref())
                .map(|r| &r.relname),
            _ => None,
        }
        .filter(|name| !name.is_empty())
        .map(|name| name_key(name)),
        pinned: pinned(node),
    }
}

/// A key for an object's name, as compared between a statement and its error message.
pub(crate) fn name_key(name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    name.hash(&mut hasher);
    hasher.finish()
}

/// The most rows an `INSERT … VALUES` (or `DEFAULT VALUES`) writes: one a row of its list,
/// inserted or, with `ON CONFLICT DO UPDATE`, updated.
fn most_rows(node: &NodeEnum) -> Option<u64> {
    let NodeEnum::InsertStmt(insert) = node else {
        return None;
    };
    if insert.with_clause.is_some() {
        return None;
    }
    match insert.select_stmt.as_deref().and_then(|s| s.node.as_ref()) {
        None => Some(1),
        Some(NodeEnum::SelectStmt(select))
            if !select.values_lists.is_empty() && select.with_clause.is_none() =>
        {
            Some(select.values_lists.len() as u64)
        }
        _ => None,
    }
}

mod kind;
mod pinned;
mod refusals;
mod rewrite;
mod shape;
#[cfg(test)]
mod tests;

use kind::kind_of;
use pinned::pinned;
pub(crate) use pinned::{COARSE_PARAMETER_TYPES, Pinned};
use refusals::*;
use rewrite::*;
pub(crate) use shape::ShapeCache;
