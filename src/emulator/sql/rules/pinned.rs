//! Writes whose `WHERE` pins columns to fixed values ([`Pinned`]): with a unique index over
//! them, such a write writes one row at most.

use pg_query::NodeEnum;
use pg_query::protobuf;

use super::string_of;

/// An `UPDATE` or `DELETE` whose `WHERE` says `column = <constant or parameter>` (in an `AND`
/// of its top level) for each of `columns`, on `table` (in `schema`, when named): a unique
/// index over some of those columns lets it write one row at most.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Pinned {
    pub(crate) schema: Option<String>,
    pub(crate) table: String,
    /// Sorted, without repeats.
    pub(crate) columns: Vec<String>,
}

/// The table and the columns an `UPDATE` or `DELETE` pins to a constant or a parameter
/// ([`Pinned`]): not one that reads another table into its rows (`FROM`, `USING`), has a
/// `WITH`, or names a column of another relation.
pub(super) fn pinned(node: &NodeEnum) -> Option<Pinned> {
    let (relation, condition) = match node {
        NodeEnum::UpdateStmt(u) if u.from_clause.is_empty() && u.with_clause.is_none() => {
            (u.relation.as_ref()?, u.where_clause.as_deref()?)
        }
        NodeEnum::DeleteStmt(d) if d.using_clause.is_empty() && d.with_clause.is_none() => {
            (d.relation.as_ref()?, d.where_clause.as_deref()?)
        }
        _ => return None,
    };
    if relation.relname.is_empty() || !relation.catalogname.is_empty() {
        return None;
    }
    // The names a column may be qualified with: the table's own, or its alias.
    let qualifier = match &relation.alias {
        Some(alias) => alias.aliasname.as_str(),
        None => relation.relname.as_str(),
    };
    let mut columns = Vec::new();
    let mut conjuncts = vec![condition];
    while let Some(conjunct) = conjuncts.pop() {
        match conjunct.node.as_ref() {
            Some(NodeEnum::BoolExpr(b)) if b.boolop == protobuf::BoolExprType::AndExpr as i32 => {
                conjuncts.extend(b.args.iter());
            }
            Some(NodeEnum::AExpr(e))
                if e.kind == protobuf::AExprKind::AexprOp as i32
                    && matches!(e.name.as_slice(), [name] if string_of(name) == Some("=")) =>
            {
                let (Some(left), Some(right)) = (e.lexpr.as_deref(), e.rexpr.as_deref()) else {
                    continue;
                };
                let column = match (column_of(left, qualifier), column_of(right, qualifier)) {
                    (Some(column), None) if fixed_value(right) => column,
                    (None, Some(column)) if fixed_value(left) => column,
                    _ => continue,
                };
                columns.push(column.to_owned());
            }
            _ => {}
        }
    }
    columns.sort();
    columns.dedup();
    (!columns.is_empty()).then(|| Pinned {
        schema: (!relation.schemaname.is_empty()).then(|| relation.schemaname.clone()),
        table: relation.relname.clone(),
        columns,
    })
}

/// The column `node` names, alone or after `qualifier`.
fn column_of<'a>(node: &'a protobuf::Node, qualifier: &str) -> Option<&'a str> {
    let Some(NodeEnum::ColumnRef(column)) = node.node.as_ref() else {
        return None;
    };
    let names: Vec<&str> = column
        .fields
        .iter()
        .map(|field| match field.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect::<Option<_>>()?;
    match names.as_slice() {
        [column] => Some(column),
        [table, column] if *table == qualifier => Some(column),
        _ => None,
    }
}

/// A constant or a parameter: the same value for every row, compared as the column's type
/// (not a cast: `varchar_key = 'a'::char` compares as `bpchar`, which ignores trailing
/// spaces, and `numeric_key = 0.1::float8` as `float8`, where distinct keys can be equal; a
/// parameter whose declared type does that is left out at `Execute`, [`COARSE_PARAMETER_TYPES`]).
fn fixed_value(node: &protobuf::Node) -> bool {
    match node.node.as_ref() {
        Some(NodeEnum::AConst(c)) => c.val.is_some(),
        Some(NodeEnum::ParamRef(_)) => true,
        _ => false,
    }
}

/// Parameter types (`float4`, `float8`, `bpchar`) a key column may be converted to for the
/// comparison, where two distinct keys can compare equal: a write whose `Parse` declares one
/// gets no bound from its `WHERE`.
pub(crate) const COARSE_PARAMETER_TYPES: [u32; 3] = [700, 701, 1042];
