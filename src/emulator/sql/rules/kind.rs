//! What a statement is for the transaction rules ([`Kind`]), from its parse tree.

use pg_query::NodeEnum;
use pg_query::protobuf::{self, TransactionStmtKind};

use super::Kind;

/// Whether a `WITH` clause holds a data-modifying statement.
fn writes_in_with(with: Option<&protobuf::WithClause>) -> bool {
    with.is_some_and(|with| {
        with.ctes.iter().any(|cte| {
            matches!(
                cte.node.as_ref(),
                Some(NodeEnum::CommonTableExpr(cte)) if matches!(
                    cte.ctequery.as_deref().and_then(|q| q.node.as_ref()),
                    Some(NodeEnum::InsertStmt(_) | NodeEnum::UpdateStmt(_)
                        | NodeEnum::DeleteStmt(_) | NodeEnum::MergeStmt(_))
                )
            )
        })
    })
}

pub(super) fn kind_of(node: &NodeEnum) -> Kind {
    use NodeEnum as N;
    match node {
        N::TransactionStmt(t) => match TransactionStmtKind::try_from(t.kind) {
            Ok(TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart) => {
                Kind::Begin
            }
            Ok(TransactionStmtKind::TransStmtCommit) => Kind::Commit,
            Ok(TransactionStmtKind::TransStmtRollback) => Kind::Rollback,
            _ => Kind::Other,
        },
        N::InsertStmt(_) | N::UpdateStmt(_) | N::DeleteStmt(_) | N::MergeStmt(_) => Kind::Dml,
        // A query whose WITH writes (`WITH u AS (UPDATE …) SELECT …`) writes.
        N::SelectStmt(select) if writes_in_with(select.with_clause.as_ref()) => Kind::Dml,
        N::SelectStmt(_)
        | N::VariableSetStmt(_)
        | N::VariableShowStmt(_)
        | N::ExplainStmt(_)
        | N::CallStmt(_)
        | N::DoStmt(_)
        | N::PrepareStmt(_)
        | N::ExecuteStmt(_)
        | N::DeallocateStmt(_)
        | N::CopyStmt(_)
        | N::VacuumStmt(_)
        | N::ListenStmt(_)
        | N::NotifyStmt(_)
        | N::UnlistenStmt(_)
        | N::LockStmt(_)
        | N::ConstraintsSetStmt(_)
        | N::DiscardStmt(_)
        | N::CheckPointStmt(_)
        | N::DeclareCursorStmt(_)
        | N::FetchStmt(_)
        | N::ClosePortalStmt(_) => Kind::Other,
        // Every other statement changes the catalog.
        _ => Kind::Ddl,
    }
}
