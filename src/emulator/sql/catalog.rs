//! Committed schema changes, for `OC001`.

use super::*;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// The committed catalog changes (DDL, `GRANT`, `REVOKE`) of one emulator's sessions, with the
/// relations they named: another session that had used one of them before the change gets
/// `40001 schema has been updated by another transaction (OC001)` on its next statement naming
/// it, once (its cached schema is stale; a session that never used it has none to be stale).
///
/// It also keeps what the relay learnt of tables' unique indexes ([`Catalog::bounds_one_row`]),
/// each answer valid until the next recorded change.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    pub(super) changes: Mutex<VecDeque<Change>>,
    pub(super) sessions: std::sync::atomic::AtomicU64,
    unique: Mutex<HashMap<(Option<String>, String), UniqueKeys>>,
    /// Autocommit writes sent without the relay's transaction thanks to a unique index.
    pub(super) key_bounded: std::sync::atomic::AtomicU64,
}

/// A table's unique indexes as the relay knows them, as of catalog change `seq`.
#[derive(Debug)]
enum UniqueKeys {
    /// Being looked up.
    Asking { seq: u64 },
    /// The columns of each unique index usable as a bound (see [`occ::Sessions::unique_keys`]).
    Known { seq: u64, keys: Arc<[Vec<String>]> },
}

/// Tables whose unique indexes are remembered (all are forgotten when more are asked of).
const UNIQUE_KEPT: usize = 4096;

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

    /// Whether `pinned`'s columns cover a unique index of its table, so that it writes one row
    /// at most. Not known yet: `false`, and the indexes are looked up in the background
    /// through `sessions` (the next write of that table gets the answer). Any recorded catalog
    /// change makes the answers before it stale (a `DROP INDEX` names no table).
    pub(super) fn bounds_one_row(
        self: &Arc<Self>,
        pinned: &rules::Pinned,
        sessions: Option<&Arc<occ::Sessions>>,
    ) -> bool {
        let seq = self.current();
        let key = (pinned.schema.clone(), pinned.table.clone());
        let mut unique = self.unique.lock().unwrap_or_else(|p| p.into_inner());
        match unique.get(&key) {
            Some(UniqueKeys::Known { seq: known, keys }) if *known == seq => {
                return keys.iter().any(|index| {
                    !index.is_empty()
                        && index
                            .iter()
                            .all(|column| pinned.columns.binary_search(column).is_ok())
                });
            }
            Some(UniqueKeys::Asking { seq: asked }) if *asked == seq => return false,
            _ => {}
        }
        let (Some(sessions), Ok(runtime)) = (sessions, tokio::runtime::Handle::try_current())
        else {
            return false;
        };
        if unique.len() >= UNIQUE_KEPT {
            unique.clear();
        }
        unique.insert(key.clone(), UniqueKeys::Asking { seq });
        drop(unique);
        let sessions = sessions.clone();
        let catalog = Arc::downgrade(self);
        runtime.spawn(async move {
            let keys = sessions.unique_keys(key.0.as_deref(), &key.1).await;
            let Some(catalog) = catalog.upgrade() else {
                return;
            };
            let mut unique = catalog.unique.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(unique.get(&key), Some(UniqueKeys::Asking { seq: asked }) if *asked == seq)
            {
                // Learnt as of `seq` (stale at once if a change came meanwhile). Not learnt (the
                // lookup failed): no bound until the next change.
                let keys = keys.unwrap_or_default().into();
                unique.insert(key, UniqueKeys::Known { seq, keys });
            }
        });
        false
    }

    /// How many autocommit writes went without the relay's transaction because their `WHERE`
    /// pins a unique index's columns (`EmulatorStats::key_bounded_writes`).
    pub(crate) fn key_bounded_writes(&self) -> u64 {
        self.key_bounded.load(Ordering::SeqCst)
    }

    /// Records `keys` as `table`'s unique indexes, as of now (the background lookup's answer).
    #[cfg(test)]
    pub(super) fn learn(&self, schema: Option<&str>, table: &str, keys: Vec<Vec<String>>) {
        let seq = self.current();
        self.unique
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                (schema.map(str::to_owned), table.to_owned()),
                UniqueKeys::Known {
                    seq,
                    keys: keys.into(),
                },
            );
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
