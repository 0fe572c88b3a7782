//! The rows only the relay's memory can charge: the database refuses any
//! update of them, so their failed attempts are counted here, by the rule
//! the table's bookkeeping follows.

use std::collections::HashMap;
use std::time::Instant;

use crate::db::outbox::AttemptRule;

/// Rows the database refuses any update of (a trigger or constraint that
/// fires on every UPDATE of the row): neither marking them transferred nor
/// recording their failure works, so they would be published again at every
/// claim, without delay, forever. Their attempts are kept here instead, by
/// the rule the table's bookkeeping follows (a doubling delay, held after
/// `relay.max_attempts`), for the life of the relay process: the table is
/// untouched, so the row stays pending there, and a restart (or another
/// instance) starts counting again.
#[derive(Debug, Default)]
pub struct Unwritable(std::sync::Mutex<HashMap<String, UnwritableRow>>);

/// One row in [`Unwritable`].
#[derive(Debug)]
pub(super) struct UnwritableRow {
    attempts: u32,
    next_attempt: Instant,
    held: bool,
}

impl Unwritable {
    pub(super) fn rows(&self) -> std::sync::MutexGuard<'_, HashMap<String, UnwritableRow>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `id` waits out a delay or is held: not to be published now.
    pub(super) fn waiting(rows: &HashMap<String, UnwritableRow>, id: &str) -> bool {
        rows.get(id)
            .is_some_and(|r| r.held || r.next_attempt > Instant::now())
    }

    /// Charges one failed attempt to `id` under `rule`, the rule the table's
    /// bookkeeping follows; returns `(attempts, held)`.
    pub(super) fn charge(&self, id: &str, rule: &AttemptRule) -> (u32, bool) {
        let mut rows = self.rows();
        let row = rows.entry(id.to_owned()).or_insert(UnwritableRow {
            attempts: 0,
            next_attempt: Instant::now(),
            held: false,
        });
        row.attempts = row.attempts.saturating_add(1);
        // The delay doubles per earlier attempt up to the cap, as on the table.
        let doublings = row.attempts.saturating_sub(1).min(31);
        row.next_attempt = Instant::now()
            + rule
                .delay
                .saturating_mul(1u32 << doublings)
                .min(rule.max_delay);
        row.held = row.attempts >= rule.max_attempts;
        (row.attempts, row.held)
    }

    /// Forgets the rows in `ids`: they were marked or recorded on the table.
    pub(super) fn forget<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut rows = self.rows();
        if !rows.is_empty() {
            for id in ids {
                rows.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rows_the_database_will_not_update_follow_the_attempt_rule_in_memory() {
        let memory = Unwritable::default();
        let rule = &AttemptRule {
            delay: Duration::from_secs(3600),
            max_delay: Duration::from_secs(7200),
            max_attempts: 3,
        };
        assert!(!Unwritable::waiting(&memory.rows(), "a"));
        assert_eq!(memory.charge("a", rule), (1, false));
        // Waiting out its delay: not published.
        assert!(Unwritable::waiting(&memory.rows(), "a"));
        assert!(!Unwritable::waiting(&memory.rows(), "b"));
        assert_eq!(memory.charge("a", rule), (2, false));
        assert_eq!(memory.charge("a", rule), (3, true));
        // Past any delay, a held row stays held; huge counts do not overflow.
        let now = &AttemptRule {
            delay: Duration::ZERO,
            max_delay: Duration::ZERO,
            max_attempts: u32::MAX,
        };
        assert_eq!(memory.charge("b", now), (1, false));
        assert!(!Unwritable::waiting(&memory.rows(), "b"));
        memory.rows().get_mut("b").unwrap().attempts = u32::MAX - 1;
        assert_eq!(memory.charge("b", now), (u32::MAX, true));
        assert!(Unwritable::waiting(&memory.rows(), "b"));
        // Marked or recorded on the table: forgotten.
        memory.forget(["a", "b"]);
        assert!(memory.rows().is_empty());
    }
}
