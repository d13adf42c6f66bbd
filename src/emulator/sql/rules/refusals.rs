//! Which statements DSQL refuses, and with what: the statement-level rules of `DSQL_SQL_RULES.md`
//! §2–§4 and §9, read from the parse tree.

use super::*;
use pg_query::NodeEnum;
use pg_query::protobuf::{
    self, AlterTableType, ConstrType, LockClauseStrength, ObjectType, SortByDir,
    TransactionStmtKind, VariableSetKind,
};

pub(super) fn refusal_of(node: &NodeEnum, is_async: bool, tablesample: bool) -> Option<Refusal> {
    use NodeEnum as N;
    let statement = |name: &str| Some(unsupported(format!("unsupported statement: {name}")));
    match node {
        N::TruncateStmt(_) => statement("Truncate"),
        N::CreateExtensionStmt(_) => statement("CreateExtension"),
        N::CreatedbStmt(_) => statement("Createdb"),
        N::CreateTableAsStmt(_) => statement("CreateTableAs"),
        N::CreateTableSpaceStmt(_) => statement("CreateTableSpace"),
        N::CreateForeignTableStmt(_) => statement("CreateForeignTable"),
        N::ListenStmt(_) => statement("Listen"),
        N::NotifyStmt(_) => statement("Notify"),
        N::UnlistenStmt(_) => statement("Unlisten"),
        N::AlterSystemStmt(_) => statement("AlterSystem"),
        N::CompositeTypeStmt(_) => statement("CompositeType"),
        N::CreateRangeStmt(_) => statement("CreateRange"),
        N::PrepareStmt(_) => statement("Prepare"),
        N::CreateTrigStmt(_) => Some(unsupported("CREATE TRIGGER not supported")),
        N::VacuumStmt(v) if v.is_vacuumcmd => Some(unsupported("unsupported VACUUM statement")),
        N::MergeStmt(_) => Some(unsupported("unsupported statement type: MERGE")),
        N::CreateEnumStmt(_) => Some(unsupported("CREATE TYPE not supported")),
        N::AlterEnumStmt(_) => Some(unsupported("ALTER TYPE not supported")),
        N::RenameStmt(r) if r.rename_type == ObjectType::ObjectType as i32 => {
            Some(unsupported("unsupported object in RENAME statement"))
        }
        N::DropStmt(d) if d.remove_type == ObjectType::ObjectType as i32 => {
            Some(unsupported("unsupported object in DROP statement"))
        }
        // §10 (B): domains are created and dropped, not altered; no `DROP DOMAIN … CASCADE`.
        N::AlterDomainStmt(_) => statement("AlterDomain"),
        N::DropStmt(d)
            if d.remove_type == ObjectType::ObjectDomain as i32
                && d.behavior == protobuf::DropBehavior::DropCascade as i32 =>
        {
            Some(unsupported("DROP DOMAIN with CASCADE unsupported"))
        }
        N::CreateDomainStmt(d) => collation(&d.coll_clause.as_ref()?.collname),
        N::CreateFunctionStmt(f) => function(f),
        N::CreateStmt(c) => create_table(c),
        N::CreateSeqStmt(s) => {
            sequence_type(&s.options).or_else(|| cache_refusal(&s.options, "CREATE SEQUENCE"))
        }
        // DSQL_SQL_RULES §9: an explicit type, or a cache DSQL does not allow.
        N::AlterSeqStmt(s) => sequence_type(&s.options).or_else(|| altered_cache(&s.options)),
        N::CreatePolicyStmt(_) => statement("CreatePolicy"),
        N::AlterPolicyStmt(_) => statement("AlterPolicy"),
        N::LoadStmt(_) => statement("Load"),
        N::DiscardStmt(_) => statement("Discard"),
        N::ViewStmt(v) if v.view.as_ref().is_some_and(|r| r.relpersistence == "t") => Some(
            unsupported("TEMPORARY or TEMP view not supported for CREATE VIEW"),
        ),
        N::AlterStatsStmt(a) => statistics_target(a.stxstattarget.as_deref()),
        N::IndexStmt(i) => index(i, is_async),
        N::AlterTableStmt(a) => a.cmds.iter().find_map(|cmd| match &cmd.node {
            // A view's options (`check_option`, `security_barrier`, `security_invoker`) are
            // accepted: DSQL refuses a table's storage parameters, not those (§10, L).
            Some(N::AlterTableCmd(cmd))
                if a.objtype == protobuf::ObjectType::ObjectView as i32
                    && matches!(
                        AlterTableType::try_from(cmd.subtype),
                        Ok(AlterTableType::AtSetRelOptions | AlterTableType::AtResetRelOptions)
                    ) =>
            {
                None
            }
            Some(N::AlterTableCmd(cmd)) => alter_table(cmd, is_async),
            _ => None,
        }),
        N::TransactionStmt(t) => transaction(t),
        N::VariableSetStmt(v) => set(v),
        // `SELECT … INTO` is `CREATE TABLE AS` once analysed.
        N::SelectStmt(s) if s.into_clause.is_some() => statement("CreateTableAs"),
        N::SelectStmt(s) => select(s, tablesample),
        N::InsertStmt(_) | N::UpdateStmt(_) | N::DeleteStmt(_) if tablesample => {
            Some(unsupported("TABLESAMPLE clause not supported"))
        }
        _ => None,
    }
}

pub(super) fn transaction(t: &protobuf::TransactionStmt) -> Option<Refusal> {
    match TransactionStmtKind::try_from(t.kind).ok()? {
        TransactionStmtKind::TransStmtSavepoint => {
            Some(unsupported("unsupported transaction statement: SAVEPOINT"))
        }
        TransactionStmtKind::TransStmtRollbackTo => Some(unsupported(
            "unsupported transaction statement: ROLLBACK TO",
        )),
        TransactionStmtKind::TransStmtRelease => {
            Some(unsupported("unsupported transaction statement: RELEASE"))
        }
        // `AND CHAIN` keeps a block open across the end of another: not recorded on DSQL;
        // refused here (inferred) rather than let a block end outside the commit point's view.
        TransactionStmtKind::TransStmtCommit | TransactionStmtKind::TransStmtRollback
            if t.chain =>
        {
            Some(unsupported(
                if t.kind == TransactionStmtKind::TransStmtCommit as i32 {
                    "unsupported transaction statement: COMMIT AND CHAIN"
                } else {
                    "unsupported transaction statement: ROLLBACK AND CHAIN"
                },
            ))
        }
        // No two-phase commit on DSQL (`DSQL_FACTS.md` §5; the wording is inferred from the
        // savepoint refusals): a prepared transaction would also commit past the relay's
        // commit point.
        TransactionStmtKind::TransStmtPrepare => Some(unsupported(
            "unsupported transaction statement: PREPARE TRANSACTION",
        )),
        TransactionStmtKind::TransStmtCommitPrepared => Some(unsupported(
            "unsupported transaction statement: COMMIT PREPARED",
        )),
        TransactionStmtKind::TransStmtRollbackPrepared => Some(unsupported(
            "unsupported transaction statement: ROLLBACK PREPARED",
        )),
        TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart => {
            isolation(&t.options)
        }
        _ => None,
    }
}

/// `ISOLATION LEVEL` among transaction options: only REPEATABLE READ.
pub(super) fn isolation(options: &[protobuf::Node]) -> Option<Refusal> {
    options.iter().find_map(|option| {
        let def = def_elem(option)?;
        if def.defname != "transaction_isolation" {
            return None;
        }
        let level = def.arg.as_deref().and_then(string_of)?;
        (!level.eq_ignore_ascii_case("repeatable read")).then(|| {
            unsupported(format!(
                "Unsupported isolation level: {}",
                level.to_ascii_uppercase()
            ))
        })
    })
}

pub(super) fn set(v: &protobuf::VariableSetStmt) -> Option<Refusal> {
    let kind = VariableSetKind::try_from(v.kind).ok()?;
    if kind == VariableSetKind::VarResetAll {
        return None;
    }
    let name = v.name.to_ascii_lowercase();
    match name.as_str() {
        // An isolation level other than DSQL's is refused as such first (§1, §10 L); the
        // statement itself is refused as a parameter.
        "transaction" => isolation(&v.args).or_else(|| parameter_refused("TRANSACTION")),
        // Accepted (DSQL_SQL_RULES §1, §9), for DSQL's one isolation level.
        "session characteristics" => isolation(&v.args),
        _ => parameter_refusal(&name),
    }
}

pub(super) fn parameter_refused(name: &str) -> Option<Refusal> {
    Some(unsupported(format!(
        "setting configuration parameter \"{name}\" not supported"
    )))
}

/// DSQL's answer to setting parameter `name` (lower case), by `SET` or `set_config`.
pub(super) fn parameter_refusal(name: &str) -> Option<Refusal> {
    match name {
        "default_transaction_isolation" | "transaction_isolation" => parameter_refused(name),
        _ if crate::emulator::startup::parameter_allowed(name) => None,
        // SET TIME ZONE / SET NAMES arrive under their parameter names.
        "client_encoding" => None,
        _ => parameter_refused(name),
    }
}

pub(super) fn select(s: &protobuf::SelectStmt, tablesample: bool) -> Option<Refusal> {
    if tablesample {
        return Some(unsupported("TABLESAMPLE clause not supported"));
    }
    let locking = s.locking_clause.iter().any(|clause| match &clause.node {
        Some(NodeEnum::LockingClause(l)) => !matches!(
            LockClauseStrength::try_from(l.strength),
            Ok(LockClauseStrength::LcsForupdate | LockClauseStrength::LcsForkeyshare)
        ),
        _ => false,
    });
    locking.then(|| {
        unsupported("locking clauses other than FOR UPDATE/FOR KEY SHARE are not supported")
    })
}

pub(super) fn function(f: &protobuf::CreateFunctionStmt) -> Option<Refusal> {
    if f.is_procedure {
        return Some(unsupported("PROCEDURE is not supported"));
    }
    let language = f
        .options
        .iter()
        .filter_map(def_elem)
        .find(|d| d.defname == "language")
        .and_then(|d| d.arg.as_deref().and_then(string_of));
    match language {
        Some(language) if !language.eq_ignore_ascii_case("sql") => Some(unsupported(format!(
            "CREATE FUNCTION with language {language} not supported"
        ))),
        _ => None,
    }
}

pub(super) fn create_table(c: &protobuf::CreateStmt) -> Option<Refusal> {
    // DSQL_SQL_RULES §9: no partitioning, inheritance or storage parameters.
    if c.partspec.is_some() || c.partbound.is_some() {
        return Some(unsupported("PARTITION BY not supported for CREATE TABLE"));
    }
    if !c.inh_relations.is_empty() {
        return Some(unsupported("INHERITS not supported for CREATE TABLE"));
    }
    if !c.options.is_empty() {
        return Some(unsupported(
            "storage parameters (WITH) not supported for CREATE TABLE",
        ));
    }
    // §10 (L): no TABLESPACE clause (the wording is inferred, as PARTITION BY's).
    if !c.tablespacename.is_empty() {
        return Some(unsupported("TABLESPACE not supported for CREATE TABLE"));
    }
    let index_tablespace = |constraint: &protobuf::Constraint| {
        (!constraint.indexspace.is_empty())
            .then(|| unsupported("TABLESPACE not supported for CREATE TABLE"))
    };
    if let Some(refusal) = c.table_elts.iter().find_map(|element| match &element.node {
        Some(NodeEnum::Constraint(constraint)) => deferrable(constraint)
            .or_else(|| index_tablespace(constraint))
            .or_else(|| enforceability(constraint)),
        // In a column's list, `DEFERRABLE` is a constraint of its own after the one it marks.
        Some(NodeEnum::ColumnDef(column)) => {
            let constraints: Vec<&protobuf::Constraint> = column
                .constraints
                .iter()
                .filter_map(|c| match &c.node {
                    Some(NodeEnum::Constraint(c)) => Some(&**c),
                    _ => None,
                })
                .collect();
            if let Some(refusal) = constraints
                .iter()
                .find_map(|c| index_tablespace(c).or_else(|| enforceability(c)))
            {
                return Some(refusal);
            }
            constraints.windows(2).find_map(|pair| {
                // `INITIALLY DEFERRED` makes it deferrable too.
                (matches!(
                    ConstrType::try_from(pair[1].contype),
                    Ok(ConstrType::ConstrAttrDeferrable | ConstrType::ConstrAttrDeferred)
                ) && pair[0].contype != ConstrType::ConstrForeign as i32)
                    .then(|| {
                        let mut marked = (*pair[0]).clone();
                        marked.deferrable = true;
                        deferrable(&marked)
                    })
                    .flatten()
            })
        }
        _ => None,
    }) {
        return Some(refusal);
    }
    if let Some(relation) = &c.relation {
        match relation.relpersistence.as_str() {
            "t" => {
                return Some(unsupported(
                    "TEMPORARY or TEMP table not supported for CREATE TABLE",
                ));
            }
            "u" => {
                return Some(unsupported("UNLOGGED table not supported for CREATE TABLE"));
            }
            _ => {}
        }
    }
    c.table_elts.iter().find_map(|element| match &element.node {
        Some(NodeEnum::ColumnDef(column)) => column_type(column)
            .or_else(|| identity(column))
            .or_else(|| column_collation(column)),
        _ => None,
    })
}

/// PostgreSQL's built-in functions an index expression could name that are not immutable
/// (volatile or stable).
const NOT_IMMUTABLE: &[&str] = &[
    "random",
    "random_normal",
    "setseed",
    "now",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "gen_random_uuid",
    "uuid_generate_v4",
    "nextval",
    "currval",
    "lastval",
    "txid_current",
    "pg_current_xact_id",
];

/// §10 (L): no `ENFORCED` / `NOT ENFORCED` on a constraint (PostgreSQL 18's syntax, which
/// DSQL's grammar refuses; the wording is inferred). An explicit `ENFORCED` on a table's
/// constraint reads as the default, and goes through.
fn enforceability(constraint: &protobuf::Constraint) -> Option<Refusal> {
    let attribute = matches!(
        ConstrType::try_from(constraint.contype),
        Ok(ConstrType::ConstrAttrEnforced | ConstrType::ConstrAttrNotEnforced)
    );
    let not_enforced = matches!(
        ConstrType::try_from(constraint.contype),
        Ok(ConstrType::ConstrCheck | ConstrType::ConstrForeign)
    ) && !constraint.is_enforced;
    (attribute || not_enforced)
        .then(|| unsupported("ENFORCED / NOT ENFORCED not supported for constraints"))
}

/// A column's `COLLATE` (§10, L: only the C collations).
fn column_collation(column: &protobuf::ColumnDef) -> Option<Refusal> {
    collation(&column.coll_clause.as_ref()?.collname)
}

/// §10 (M): only a foreign key may be `DEFERRABLE` (the wording is inferred).
fn deferrable(constraint: &protobuf::Constraint) -> Option<Refusal> {
    let kind = match ConstrType::try_from(constraint.contype).ok()? {
        ConstrType::ConstrPrimary => "PRIMARY KEY",
        ConstrType::ConstrUnique => "UNIQUE",
        ConstrType::ConstrExclusion => "EXCLUDE",
        _ => return None,
    };
    (constraint.deferrable || constraint.initdeferred)
        .then(|| unsupported(format!("DEFERRABLE not supported for {kind}")))
}

pub(super) fn alter_table(cmd: &protobuf::AlterTableCmd, is_async: bool) -> Option<Refusal> {
    let subtype = AlterTableType::try_from(cmd.subtype).ok()?;
    match subtype {
        AlterTableType::AtAddColumn => {
            let Some(NodeEnum::ColumnDef(column)) =
                cmd.def.as_deref().and_then(|d| d.node.as_ref())
            else {
                return None;
            };
            column_type(column)
                .or_else(|| column_collation(column))
                .or_else(|| {
                    let constrained = column.constraints.iter().any(|c| {
                        !matches!(&c.node, Some(NodeEnum::Constraint(c))
                        if c.contype == ConstrType::ConstrNull as i32)
                    });
                    constrained.then(|| {
                        unsupported("ALTER TABLE ADD COLUMN with constraint not supported")
                    })
                })
        }
        AlterTableType::AtAddConstraint => {
            let Some(NodeEnum::Constraint(c)) = cmd.def.as_deref().and_then(|d| d.node.as_ref())
            else {
                return None;
            };
            let contype = ConstrType::try_from(c.contype).ok()?;
            let accepted = match contype {
                ConstrType::ConstrCheck | ConstrType::ConstrForeign => c.skip_validation,
                // `UNIQUE USING INDEX` is accepted; a new key is not.
                ConstrType::ConstrUnique | ConstrType::ConstrPrimary => !c.indexname.is_empty(),
                _ => true,
            };
            (!accepted)
                .then(|| unsupported("unsupported ALTER TABLE ADD CONSTRAINT statement"))
                .or_else(|| deferrable(c))
                .or_else(|| enforceability(c))
        }
        AlterTableType::AtValidateConstraint if !is_async => Some(unsupported(
            "unsupported ALTER TABLE VALIDATE CONSTRAINT statement",
        )),
        AlterTableType::AtAlterColumnType => Some(unsupported(
            "unsupported ALTER TABLE ALTER COLUMN ... SET DATA TYPE statement",
        )),
        AlterTableType::AtSetStatistics => Some(unsupported(
            "unsupported ALTER TABLE ALTER COLUMN ... SET STATISTICS statement",
        )),
        // DSQL_SQL_RULES §9.
        AlterTableType::AtSetNotNull => Some(unsupported(
            "unsupported ALTER TABLE ALTER COLUMN ... SET NOT NULL statement",
        )),
        AlterTableType::AtEnableRowSecurity
        | AlterTableType::AtDisableRowSecurity
        | AlterTableType::AtForceRowSecurity
        | AlterTableType::AtNoForceRowSecurity => Some(unsupported(
            "unsupported ALTER TABLE ... ROW LEVEL SECURITY statement",
        )),
        AlterTableType::AtReplicaIdentity => Some(unsupported(
            "unsupported ALTER TABLE ... REPLICA IDENTITY statement",
        )),
        AlterTableType::AtSetRelOptions | AlterTableType::AtResetRelOptions => Some(unsupported(
            "unsupported ALTER TABLE ... SET (storage_parameter) statement",
        )),
        _ => None,
    }
}

pub(super) fn index(i: &protobuf::IndexStmt, is_async: bool) -> Option<Refusal> {
    if i.concurrent {
        return Some(unsupported("CONCURRENTLY not supported for CREATE INDEX"));
    }
    if !i.table_space.is_empty() {
        return Some(unsupported("TABLESPACE not supported for CREATE INDEX"));
    }
    if !is_async {
        return Some(unsupported(
            "unsupported mode. please use CREATE INDEX ASYNC.",
        ));
    }
    if i.index_params.len() > 8 {
        return Some(refuse(
            "54011",
            "more than 8 column keys in an index are not supported",
        ));
    }
    // §10 (L): no function that is not immutable (`random()`) in an index expression
    // (PostgreSQL says 42P17; DSQL's answer is not recorded: 0A000, the wording inferred).
    let volatile = i.index_params.iter().find_map(|param| match &param.node {
        Some(NodeEnum::IndexElem(e)) => e
            .expr
            .as_deref()?
            .node
            .as_ref()?
            .nodes()
            .into_iter()
            .find_map(|(node, ..)| match node {
                // PostgreSQL's own, not a user's function of that name in another schema.
                pg_query::NodeRef::FuncCall(call) => {
                    let names: Vec<&str> = call.funcname.iter().filter_map(string_of).collect();
                    let name = match names.as_slice() {
                        [name] | ["pg_catalog", name] => name.to_ascii_lowercase(),
                        _ => return None,
                    };
                    NOT_IMMUTABLE.contains(&name.as_str()).then_some(name)
                }
                _ => None,
            }),
        _ => None,
    });
    if let Some(name) = volatile {
        return Some(unsupported(format!(
            "function {name}() is not immutable: not supported in an index expression"
        )));
    }
    i.index_params.iter().find_map(|param| match &param.node {
        Some(NodeEnum::IndexElem(e)) if e.ordering != SortByDir::SortbyDefault as i32 => Some(
            unsupported("specifying sort order not supported for index keys"),
        ),
        Some(NodeEnum::IndexElem(e)) if !e.opclass.is_empty() => {
            Some(unsupported("opclass not supported for index keys"))
        }
        Some(NodeEnum::IndexElem(e)) if !e.collation.is_empty() => collation(&e.collation),
        _ => None,
    })
}

/// An identity column needs an explicit CACHE of 1 or at least 65 536, and type bigint.
pub(super) fn identity(column: &protobuf::ColumnDef) -> Option<Refusal> {
    column.constraints.iter().find_map(|c| match &c.node {
        Some(NodeEnum::Constraint(c)) if c.contype == ConstrType::ConstrIdentity as i32 => {
            let name = column.type_name.as_ref().map(type_display)?;
            if name != "bigint" {
                return Some(unsupported(format!(
                    "datatype {name} not supported, identity column type must be bigint"
                )));
            }
            cache_refusal(&c.options, "identity column")
        }
        _ => None,
    })
}

/// A sequence is bigint: `AS <type>` is refused unless it says bigint (DSQL_SQL_RULES §9).
pub(super) fn sequence_type(options: &[protobuf::Node]) -> Option<Refusal> {
    let declared = options
        .iter()
        .filter_map(def_elem)
        .find(|d| d.defname == "as")
        .and_then(|d| match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
            Some(NodeEnum::TypeName(t)) => Some(type_display(t)),
            _ => None,
        })?;
    (declared != "bigint").then(|| {
        unsupported(format!(
            "datatype {declared} not supported, sequence type must be bigint"
        ))
    })
}

/// `ALTER SEQUENCE … CACHE n` must keep the cache at 1 or at least 65 536 (DSQL_SQL_RULES §9).
pub(super) fn altered_cache(options: &[protobuf::Node]) -> Option<Refusal> {
    let cache = options
        .iter()
        .filter_map(def_elem)
        .find(|d| d.defname == "cache")
        .and_then(|d| d.arg.as_deref().and_then(integer_of))?;
    (cache != 1 && cache < 65_536).then(|| {
        // DSQL's text contains `must be greater than or equal to 65536 or equal to 1` (§10,
        // AWS's dsql-lint live-cluster suite); the words before it are inferred.
        unsupported(format!(
            "ALTER SEQUENCE with cache size {cache} is not supported. cache size must be \
             greater than or equal to 65536 or equal to 1"
        ))
    })
}

/// DSQL's statistics targets: at most 100 (DSQL_SQL_RULES §9, §10: DSQL's text contains
/// `exceeds maximum allowed value of 100`; the words before it are inferred). Below -1,
/// PostgreSQL's own `statistics target -2 is too low` is DSQL's answer too (§10).
pub(super) fn statistics_target(target: Option<&protobuf::Node>) -> Option<Refusal> {
    let n = target.and_then(integer_of)?;
    (n > 100).then(|| {
        unsupported(format!(
            "statistics target {n} exceeds maximum allowed value of 100"
        ))
    })
}

/// `CACHE` must be given, and be 1 or at least 65 536.
pub(super) fn cache_refusal(options: &[protobuf::Node], what: &str) -> Option<Refusal> {
    let cache = options
        .iter()
        .filter_map(def_elem)
        .find(|d| d.defname == "cache")
        .and_then(|d| d.arg.as_deref().and_then(integer_of));
    match cache {
        Some(1) => None,
        Some(n) if n >= 65_536 => None,
        _ => Some(unsupported(format!(
            "{what} is not supported without an explicit cache size. please define CACHE \
             greater than or equal to 65536 or equal to 1"
        ))),
    }
}

/// The column's type, refused if DSQL has no such column type.
pub(super) fn column_type(column: &protobuf::ColumnDef) -> Option<Refusal> {
    let type_name = column.type_name.as_ref()?;
    let base = type_base(type_name)?;
    if matches!(
        base.as_str(),
        "serial" | "serial4" | "bigserial" | "serial8" | "smallserial" | "serial2"
    ) {
        return Some(refuse("42704", format!("type \"{base}\" does not exist")));
    }
    let supported = matches!(
        base.as_str(),
        "int2"
            | "int4"
            | "int8"
            | "float4"
            | "float8"
            | "numeric"
            | "bpchar"
            | "varchar"
            | "text"
            | "date"
            | "time"
            | "timetz"
            | "timestamp"
            | "timestamptz"
            | "interval"
            | "bool"
            | "bytea"
            | "uuid"
            | "json"
            | "jsonb"
    );
    let builtin_refused = matches!(
        base.as_str(),
        "money"
            | "xml"
            | "inet"
            | "cidr"
            | "macaddr"
            | "macaddr8"
            | "point"
            | "line"
            | "lseg"
            | "box"
            | "path"
            | "polygon"
            | "circle"
            | "tsvector"
            | "tsquery"
            | "int4range"
            | "int8range"
            | "numrange"
            | "tsrange"
            | "tstzrange"
            | "daterange"
            | "bit"
            | "varbit"
            | "pg_lsn"
    );
    // The declared size of a character type.
    let limit = match base.as_str() {
        "varchar" => Some(65_535),
        "bpchar" => Some(4_096),
        _ => None,
    };
    let size = type_name.typmods.first().and_then(integer_of);
    if let (Some(limit), Some(size)) = (limit, size)
        && size > limit
    {
        return Some(refuse(
            "54000",
            format!("Datatype limit greater than {limit} bytes not supported for {base}"),
        ));
    }
    let array = !type_name.array_bounds.is_empty();
    if builtin_refused || (array && supported) {
        return Some(unsupported(format!(
            "datatype {} not supported",
            type_display(type_name)
        )));
    }
    None
}

/// The type's own name, lower case, without `pg_catalog.`.
pub(super) fn type_base(type_name: &protobuf::TypeName) -> Option<String> {
    builtin_name(&type_name.names)
}

/// The type as PostgreSQL displays it (`integer`, `bit varying`, `integer[]`).
pub(super) fn type_display(type_name: &protobuf::TypeName) -> String {
    let base = type_base(type_name).unwrap_or_default();
    let shown = match base.as_str() {
        "int2" => "smallint",
        "int4" => "integer",
        "int8" => "bigint",
        "float4" => "real",
        "float8" => "double precision",
        "bool" => "boolean",
        "varchar" => "character varying",
        "bpchar" => "character",
        "varbit" => "bit varying",
        "timestamptz" => "timestamp with time zone",
        "timetz" => "time with time zone",
        other => other,
    };
    if type_name.array_bounds.is_empty() {
        shown.to_owned()
    } else {
        format!("{shown}[]")
    }
}

pub(super) fn def_elem(node: &protobuf::Node) -> Option<&protobuf::DefElem> {
    match &node.node {
        Some(NodeEnum::DefElem(d)) => Some(d),
        _ => None,
    }
}

pub(super) fn string_of(node: &protobuf::Node) -> Option<&str> {
    match &node.node {
        Some(NodeEnum::String(s)) => Some(&s.sval),
        Some(NodeEnum::AConst(c)) => match &c.val {
            Some(protobuf::a_const::Val::Sval(s)) => Some(&s.sval),
            _ => None,
        },
        _ => None,
    }
}

pub(super) fn integer_of(node: &protobuf::Node) -> Option<i64> {
    match &node.node {
        Some(NodeEnum::Integer(i)) => Some(i64::from(i.ival)),
        Some(NodeEnum::Float(f)) => f.fval.parse().ok(),
        Some(NodeEnum::AConst(c)) => match &c.val {
            Some(protobuf::a_const::Val::Ival(i)) => Some(i64::from(i.ival)),
            Some(protobuf::a_const::Val::Fval(f)) => f.fval.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}
