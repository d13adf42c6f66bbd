//! What the relay sends instead of what the client wrote: a locking read without its locking
//! clause (and its validation at `COMMIT`), asynchronous DDL as the statement that records its
//! job, DSQL's environment values, `numeric` as DSQL stores it.

use super::*;
use pg_query::NodeEnum;
use pg_query::protobuf::{self, AlterTableType, LockClauseStrength};

/// PostgreSQL's built-in aggregate functions (a locking read may not use one).
const AGGREGATES: &[&str] = &[
    "any_value",
    "array_agg",
    "avg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "bool_and",
    "bool_or",
    "corr",
    "count",
    "covar_pop",
    "covar_samp",
    "cume_dist",
    "dense_rank",
    "every",
    "json_agg",
    "json_object_agg",
    "json_object_agg_strict",
    "json_object_agg_unique",
    "json_object_agg_unique_strict",
    "jsonb_agg",
    "jsonb_object_agg",
    "jsonb_object_agg_strict",
    "jsonb_object_agg_unique",
    "jsonb_object_agg_unique_strict",
    "max",
    "min",
    "mode",
    "percent_rank",
    "percentile_cont",
    "percentile_disc",
    "range_agg",
    "range_intersect_agg",
    "rank",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "string_agg",
    "sum",
    "var_pop",
    "var_samp",
    "variance",
    "xmlagg",
];

/// For a `SELECT … FOR UPDATE` whose locked rows come from tables named in its `FROM`: the
/// statement without its locking clause (what goes upstream: on DSQL a locking read never
/// waits), and the statement that validates it at `COMMIT` as DSQL does, as if the rows had
/// been written: it locks the same rows again (waiting for a holder the committer then
/// dooms, or failing with PostgreSQL's serialization error when a transaction that committed
/// since this one began changed them) and writes each unchanged
/// (`sys.dsql_emulator_touch`), so that a later committer that read them `FOR UPDATE` on an
/// older snapshot fails in turn. A `SELECT … FOR KEY SHARE` is validated by taking its lock
/// again, unwritten (a key-share lock conflicts with deletes and key changes only). `None`
/// (PostgreSQL's own locking then) for other shapes: set operations, locked subqueries or
/// functions, mixed strengths.
pub(super) fn locking_read(node: &NodeEnum) -> Option<(String, String)> {
    let NodeEnum::SelectStmt(select) = node else {
        return None;
    };
    if select.locking_clause.is_empty() || select.op != protobuf::SetOperation::SetopNone as i32 {
        return None;
    }
    // Shapes PostgreSQL refuses to lock (DISTINCT, GROUP BY, HAVING, windows, aggregates), and a
    // WITH whose names the validation could not read rows of: PostgreSQL's own answer then,
    // at the statement, rather than a validation that fails at every COMMIT.
    let aggregate = |node: &protobuf::Node| {
        node.node.as_ref().is_some_and(|node| {
            node.nodes().into_iter().any(|(node, ..)| match node {
                pg_query::NodeRef::FuncCall(call) => {
                    call.over.is_some()
                        || call.agg_star
                        || call.agg_distinct
                        || call.agg_within_group
                        || call.agg_filter.is_some()
                        || !call.agg_order.is_empty()
                        || call
                            .funcname
                            .iter()
                            .filter_map(string_of)
                            .next_back()
                            .is_some_and(|name| {
                                AGGREGATES.contains(&name.to_ascii_lowercase().as_str())
                            })
                }
                _ => false,
            })
        })
    };
    if !select.distinct_clause.is_empty()
        || !select.group_clause.is_empty()
        || select.having_clause.is_some()
        || !select.window_clause.is_empty()
        || select.with_clause.is_some()
        || select.target_list.iter().any(aggregate)
        || select.sort_clause.iter().any(aggregate)
    {
        return None;
    }
    let mut locked_names = Vec::new();
    let mut strength = None;
    for clause in &select.locking_clause {
        let Some(NodeEnum::LockingClause(clause)) = &clause.node else {
            return None;
        };
        let this = LockClauseStrength::try_from(clause.strength).ok()?;
        if !matches!(
            this,
            LockClauseStrength::LcsForupdate | LockClauseStrength::LcsForkeyshare
        ) || strength.is_some_and(|s| s != this)
        {
            return None;
        }
        strength = Some(this);
        for rel in &clause.locked_rels {
            let Some(NodeEnum::RangeVar(rel)) = &rel.node else {
                return None;
            };
            locked_names.push(rel.relname.clone());
        }
    }
    // The tables of the FROM list, by the name the query gives them.
    fn tables<'a>(
        node: &'a protobuf::Node,
        out: &mut Vec<(String, &'a protobuf::RangeVar)>,
    ) -> bool {
        match &node.node {
            Some(NodeEnum::RangeVar(rel)) => {
                let name = rel
                    .alias
                    .as_ref()
                    .map_or_else(|| rel.relname.clone(), |a| a.aliasname.clone());
                out.push((name, rel));
                true
            }
            Some(NodeEnum::JoinExpr(join)) => {
                join.alias.is_none()
                    && [&join.larg, &join.rarg]
                        .into_iter()
                        .all(|side| side.as_deref().is_some_and(|side| tables(side, out)))
            }
            _ => false,
        }
    }
    let mut from = Vec::new();
    if !select
        .from_clause
        .iter()
        .all(|item| tables(item, &mut from))
        || from.is_empty()
    {
        return None;
    }
    let locked: Vec<&(String, &protobuf::RangeVar)> = if locked_names.is_empty() {
        from.iter().collect()
    } else {
        locked_names
            .iter()
            .map(|name| from.iter().find(|(n, _)| n == name))
            .collect::<Option<_>>()?
    };
    let mut stripped = select.clone();
    stripped.locking_clause.clear();
    let stripped = NodeEnum::SelectStmt(stripped)
        .deparse(Default::default())
        .ok()?;
    let string = |s: &str| protobuf::Node {
        node: Some(NodeEnum::String(protobuf::String { sval: s.to_owned() })),
    };
    let quote_ident = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let mut calls = Vec::new();
    for (name, rel) in locked {
        let mut rows = select.clone();
        rows.target_list = vec![protobuf::Node {
            node: Some(NodeEnum::ResTarget(Box::new(protobuf::ResTarget {
                val: Some(Box::new(protobuf::Node {
                    node: Some(NodeEnum::ColumnRef(protobuf::ColumnRef {
                        fields: vec![string(name), string("ctid")],
                        location: -1,
                    })),
                })),
                ..Default::default()
            }))),
        }];
        // Wait for a holder (whom the committer dooms): the client's NOWAIT or SKIP LOCKED
        // was about its read, not its validation.
        for clause in &mut rows.locking_clause {
            if let Some(NodeEnum::LockingClause(clause)) = &mut clause.node {
                clause.wait_policy = protobuf::LockWaitPolicy::LockWaitBlock as i32;
            }
        }
        let rows = NodeEnum::SelectStmt(rows)
            .deparse(Default::default())
            .ok()?;
        if strength == Some(LockClauseStrength::LcsForkeyshare) {
            // A key-share lock conflicts with a delete or a key change only: taken again, it
            // waits for such a write still open (whose transaction the committer dooms) or
            // fails when one committed since this transaction began; it is not written, so
            // key-share readers and non-key writers of the row do not conflict with it.
            calls.push(format!("cardinality(ARRAY({rows}))"));
            continue;
        }
        let relation = if rel.schemaname.is_empty() {
            quote_ident(&rel.relname)
        } else {
            format!(
                "{}.{}",
                quote_ident(&rel.schemaname),
                quote_ident(&rel.relname)
            )
        };
        calls.push(format!(
            "sys.dsql_emulator_touch({}, ARRAY({rows}))",
            literal(&relation)
        ));
    }
    Some((stripped, format!("SELECT {}", calls.join(", "))))
}

/// For DSQL's asynchronous DDL (`CREATE INDEX ASYNC`, `ALTER TABLE ASYNC … VALIDATE`), which
/// answers with a `job_id` row and its own tag: its tag, and the one statement that runs
/// `text` (the DDL without `ASYNC`), records the job in `sys.jobs` and returns that row
/// (`sys.dsql_emulator_ddl_job`), for either protocol.
///
/// For a unique index over the whole table, also the DDL of the index a failed build leaves
/// (§10, B: a build that meets duplicates leaves its index in the catalog, not valid, and
/// still enforcing uniqueness on later writes): the same index over no rows (`WHERE false`),
/// whose predicate the job then takes away.
pub(super) fn job_statement(node: &NodeEnum, text: &str) -> Option<(&'static str, String)> {
    let mut placeholder = None;
    let (tag, kind, relation, name) = match node {
        NodeEnum::IndexStmt(i) => {
            if i.unique && i.where_clause.is_none() {
                let mut empty = i.clone();
                empty.if_not_exists = false;
                empty.where_clause = Some(Box::new(protobuf::Node {
                    node: Some(NodeEnum::AConst(protobuf::AConst {
                        isnull: false,
                        location: -1,
                        val: Some(protobuf::a_const::Val::Boolval(protobuf::Boolean {
                            boolval: false,
                        })),
                    })),
                }));
                placeholder = NodeEnum::IndexStmt(empty).deparse(Default::default()).ok();
            }
            (
                "CREATE INDEX",
                "INDEX_BUILD",
                i.relation.as_ref()?,
                i.idxname.as_str(),
            )
        }
        NodeEnum::AlterTableStmt(a) => {
            let name = a.cmds.iter().find_map(|cmd| match &cmd.node {
                Some(NodeEnum::AlterTableCmd(cmd))
                    if cmd.subtype == AlterTableType::AtValidateConstraint as i32 =>
                {
                    Some(cmd.name.as_str())
                }
                _ => None,
            })?;
            (
                "ALTER TABLE",
                "VALIDATE_CONSTRAINT",
                a.relation.as_ref()?,
                name,
            )
        }
        _ => return None,
    };
    const QUOTE: &str = "$dsql_emulator_ddl$";
    // (Not even its beginning: a text ending in it would close the quote early.)
    let opening = QUOTE.trim_end_matches('$');
    if text.contains(opening) || placeholder.as_ref().is_some_and(|p| p.contains(opening)) {
        return None;
    }
    let placeholder =
        placeholder.map_or_else(|| "NULL".to_owned(), |p| format!("{QUOTE}{p}{QUOTE}"));
    let quote_ident = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let mut qualified = quote_ident(&relation.relname);
    if !relation.schemaname.is_empty() {
        qualified = format!("{}.{qualified}", quote_ident(&relation.schemaname));
    }
    Some((
        tag,
        format!(
            "SELECT sys.dsql_emulator_ddl_job({QUOTE}{text}{QUOTE}, '{kind}', {}, {}, \
             {placeholder}) AS job_id",
            literal(&qualified),
            literal(name),
        ),
    ))
}

/// `sql` with `edits` (start, end, replacement; not overlapping) made.
pub(super) fn edited(sql: &str, mut edits: Vec<(usize, usize, String)>) -> String {
    let mut out = sql.to_owned();
    edits.sort_by_key(|edit| std::cmp::Reverse(edit.0));
    for (start, end, replacement) in edits {
        if start <= end && end <= out.len() {
            out.replace_range(start..end, &replacement);
        }
    }
    out
}

/// DSQL stores a column declared `numeric` (or `decimal`, `dec`) without a precision as
/// `numeric(18,6)` (§10, B: `format_type` shows it; values are rounded to 6 decimals): the
/// column definitions of `CREATE TABLE` and `ALTER TABLE … ADD COLUMN` get that modifier.
pub(super) fn numeric_edits(
    parsed: &protobuf::ParseResult,
    sql: &str,
) -> Vec<(usize, usize, String)> {
    let mut columns: Vec<&protobuf::ColumnDef> = Vec::new();
    for statement in parsed
        .stmts
        .iter()
        .filter_map(|raw| raw.stmt.as_ref()?.node.as_ref())
    {
        match statement {
            NodeEnum::CreateStmt(create) => {
                columns.extend(create.table_elts.iter().filter_map(|e| match &e.node {
                    Some(NodeEnum::ColumnDef(column)) => Some(&**column),
                    _ => None,
                }));
            }
            NodeEnum::AlterTableStmt(alter) => {
                columns.extend(alter.cmds.iter().filter_map(|cmd| match &cmd.node {
                    Some(NodeEnum::AlterTableCmd(cmd))
                        if cmd.subtype == protobuf::AlterTableType::AtAddColumn as i32 =>
                    {
                        match cmd.def.as_deref().and_then(|d| d.node.as_ref()) {
                            Some(NodeEnum::ColumnDef(column)) => Some(&**column),
                            _ => None,
                        }
                    }
                    _ => None,
                }));
            }
            _ => {}
        }
    }
    columns
        .into_iter()
        .filter_map(|column| {
            let name = column.type_name.as_ref()?;
            let bare = name.names.iter().filter_map(string_of).next_back()?;
            if !bare.eq_ignore_ascii_case("numeric")
                || !name.typmods.is_empty()
                || !name.array_bounds.is_empty()
                || name.location < 0
            {
                return None;
            }
            // The end of the type's name as written (`numeric`, `DECIMAL`, `pg_catalog.numeric`).
            let start = name.location as usize;
            let len = sql
                .get(start..)?
                .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '"')))
                .unwrap_or(sql.len() - start);
            let end = start + len;
            // Only a name written as one token (`numeric`, `DECIMAL`, `pg_catalog.numeric`,
            // `"numeric"`): another spelling keeps PostgreSQL's unbounded numeric.
            let written = sql[start..end].rsplit('.').next()?.trim_matches('"');
            ["numeric", "decimal", "dec"]
                .iter()
                .any(|n| written.eq_ignore_ascii_case(n))
                .then(|| (end, end, "(18,6)".to_owned()))
        })
        .collect()
}

/// What `version()`, `current_setting('server_version'[_num])` and `current_database()` answer
/// on DSQL (§7), as scalar subqueries that keep the column name PostgreSQL would give the call.
pub(super) fn environment_value(call: &protobuf::FuncCall) -> Option<String> {
    let name = function_name(call)?;
    // DSQL's one database is `postgres`, whichever database an endpoint keeps its data in.
    if name == "current_database" && call.args.is_empty() {
        return Some("(SELECT 'postgres'::name AS current_database)".to_owned());
    }
    let value = match name.as_str() {
        "version" if call.args.is_empty() => super::super::DSQL_VERSION,
        "current_setting" => match call.args.first().and_then(string_of) {
            Some(name) if name.eq_ignore_ascii_case("server_version") => {
                super::super::DSQL_SERVER_VERSION
            }
            Some(name) if name.eq_ignore_ascii_case("server_version_num") => {
                super::super::DSQL_SERVER_VERSION_NUM
            }
            _ => return None,
        },
        _ => return None,
    };
    let column = function_name(call)?;
    Some(format!("(SELECT '{value}'::text AS {column})"))
}

/// The edits that replace each call [`environment_value`] answers by that answer.
pub(super) fn environment_edits(
    parsed: &protobuf::ParseResult,
    sql: &str,
) -> Vec<(usize, usize, String)> {
    let mut calls: Vec<(usize, String)> = Vec::new();
    for statement in parsed
        .stmts
        .iter()
        .filter_map(|raw| raw.stmt.as_ref()?.node.as_ref())
    {
        find_node(statement, &mut |node| {
            if let pg_query::NodeRef::FuncCall(call) = node
                && let Some(value) = environment_value(call)
            {
                calls.push((call.location.max(0) as usize, value));
            }
            None::<()>
        });
    }
    if calls.is_empty() {
        return Vec::new();
    }
    let Ok(scanned) = pg_query::scan(sql) else {
        return Vec::new();
    };
    let tokens = &scanned.tokens;
    let mut edits = Vec::new();
    for (start, replacement) in calls {
        // The call runs from its name to the parenthesis that closes its arguments.
        let mut depth = 0;
        let end = tokens
            .iter()
            .filter(|t| t.start as usize >= start)
            .find_map(|t| {
                match &sql[t.start as usize..t.end as usize] {
                    "(" => depth += 1,
                    ")" => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(t.end as usize);
                        }
                    }
                    _ => {}
                }
                None
            });
        if let Some(end) = end {
            edits.push((start, end, replacement));
        }
    }
    edits
}
