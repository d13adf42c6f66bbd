//! Conflicts on demand ([`DsqlEmulator::inject_conflicts`](crate::emulator::DsqlEmulator::inject_conflicts)):
//! the `COMMIT` of a transaction block that wrote one of the named tables answers DSQL's
//! `40001 change conflicts with another transaction (OC000)` and rolls back, as a lost
//! first-committer race does, every `every`-th such `COMMIT`, for the next `count` of them
//! (or until cleared). A team tests its retry loop without racing two sessions.
//!
//! Deterministic: which `COMMIT`s fail is counted over the endpoint's matching `COMMIT`s, in
//! the order they reach their commit point. Only explicit transaction blocks count (an
//! autocommit statement has no `COMMIT` of its own to fail).

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// The rule in force, shared by an endpoint's sessions.
#[derive(Debug, Default)]
pub(crate) struct Injection {
    rule: Mutex<Option<Rule>>,
    injected: AtomicU64,
}

#[derive(Debug)]
struct Rule {
    /// Lower case, without schema; empty: any table.
    tables: BTreeSet<String>,
    every: u64,
    /// Conflicts still to inject (`None`: no end).
    remaining: Option<u64>,
    /// Matching `COMMIT`s seen since the rule was set.
    seen: u64,
}

impl Injection {
    /// From now on, every `every`-th `COMMIT` (at least 1: each) of a block that wrote one of
    /// `tables` (none: any) fails with `OC000`, `count` times (`None`: until cleared).
    pub(crate) fn set(&self, tables: &[&str], every: u32, count: Option<u32>) {
        let tables = tables
            .iter()
            .map(|t| {
                let bare = t.rsplit('.').next().unwrap_or(t);
                bare.trim_matches('"').to_ascii_lowercase()
            })
            .filter(|t| !t.is_empty())
            .collect();
        *self.lock() = Some(Rule {
            tables,
            every: u64::from(every.max(1)),
            remaining: count.map(u64::from),
            seen: 0,
        });
    }

    /// No more injected conflicts.
    pub(crate) fn clear(&self) {
        *self.lock() = None;
    }

    /// Conflicts injected so far, over every rule.
    pub(crate) fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// At the commit point of a block that wrote `written`: whether its `COMMIT` fails.
    pub(crate) fn at_commit(&self, written: &HashSet<String>) -> bool {
        if written.is_empty() {
            return false;
        }
        let mut rule = self.lock();
        let Some(rule) = rule.as_mut() else {
            return false;
        };
        if !rule.tables.is_empty() && !written.iter().any(|t| rule.tables.contains(t)) {
            return false;
        }
        if rule.remaining == Some(0) {
            return false;
        }
        rule.seen += 1;
        if rule.seen % rule.every != 0 {
            return false;
        }
        if let Some(remaining) = &mut rule.remaining {
            *remaining -= 1;
        }
        self.injected.fetch_add(1, Ordering::SeqCst);
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Rule>> {
        self.rule.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrote(tables: &[&str]) -> HashSet<String> {
        tables.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn every_nth_matching_commit_fails_for_the_next_count() {
        let injection = Injection::default();
        assert!(!injection.at_commit(&wrote(&["orders"])), "no rule");
        injection.set(&["public.Orders"], 2, Some(2));
        let outcomes: Vec<bool> = [
            &["orders"][..],
            &["items"],
            &["orders"],
            &[],
            &["orders", "items"],
            &["orders"],
            &["orders"],
            &["orders"],
        ]
        .iter()
        .map(|w| injection.at_commit(&wrote(w)))
        .collect();
        // Matching: 1st (no), 3rd entry = 2nd match (yes), 5th = 3rd (no), 6th = 4th (yes),
        // then the count is spent.
        assert_eq!(
            outcomes,
            [false, false, true, false, false, true, false, false]
        );
        assert_eq!(injection.injected(), 2);
        // Any table, each commit, no end; cleared.
        injection.set(&[], 0, None);
        assert!((0..5).all(|_| injection.at_commit(&wrote(&["anything"]))));
        assert!(
            !injection.at_commit(&wrote(&[])),
            "a block that wrote nothing"
        );
        injection.clear();
        assert!(!injection.at_commit(&wrote(&["anything"])));
        assert_eq!(injection.injected(), 7);
    }
}
