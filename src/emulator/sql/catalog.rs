//! Committed schema changes, for `OC001`.

use super::*;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::Ordering;

/// The committed catalog changes (DDL, `GRANT`, `REVOKE`) of one emulator's sessions, with the
/// relations they named: another session that had used one of them before the change gets
/// `40001 schema has been updated by another transaction (OC001)` on its next statement naming
/// it, once (its cached schema is stale; a session that never used it has none to be stale).
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    pub(super) changes: Mutex<VecDeque<Change>>,
    pub(super) sessions: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
pub(super) struct Change {
    pub(super) seq: u64,
    pub(super) session: u64,
    pub(super) tables: Vec<String>,
}

/// Changes remembered (a session that has seen none of the oldest is told of them anyway).
pub(super) const CHANGES_KEPT: usize = 1024;

impl Catalog {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Change>> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session's id.
    pub(super) fn join(&self) -> u64 {
        self.sessions.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub(super) fn current(&self) -> u64 {
        self.lock().back().map_or(0, |c| c.seq)
    }

    /// Records a committed change by `session`; returns its number.
    pub(super) fn record(&self, session: u64, tables: &[String]) -> u64 {
        let mut changes = self.lock();
        let seq = changes.back().map_or(0, |c| c.seq) + 1;
        if changes.len() >= CHANGES_KEPT {
            changes.pop_front();
        }
        changes.push_back(Change {
            seq,
            session,
            tables: tables.to_vec(),
        });
        seq
    }

    /// Whether another session changed one of `tables` since `session` last used it
    /// (`touched`: table → the latest change number then).
    pub(super) fn stale(
        &self,
        session: u64,
        touched: &HashMap<String, u64>,
        tables: &[String],
    ) -> bool {
        let changes = self.lock();
        tables.iter().any(|table| {
            touched.get(table).is_some_and(|&used_at| {
                changes
                    .iter()
                    .any(|c| c.seq > used_at && c.session != session && c.tables.contains(table))
            })
        })
    }
}

pub(super) fn schema_conflict() -> Refusal {
    Refusal::new(
        "40001",
        "schema has been updated by another transaction (OC001)",
    )
}
