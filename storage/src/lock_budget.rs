//! What one claim may still take of each lock: both backends load it in the claim's
//! transaction (after taking the lock rows, on PostgreSQL) and share it out in the
//! claim's order across builders.

use std::collections::HashMap;

/// Per lock the units free now, and per claiming builder what each build takes.
#[derive(Debug, Default)]
pub(crate) struct LockBudget {
    free: HashMap<String, i64>,
    uses: HashMap<i64, Vec<(String, i64)>>,
}

/// One `builder_locks` row joined with its lock: builder, lock, units per build, the
/// lock's capacity and the units held now.
pub(crate) type BudgetRow = (i64, String, i64, i64, i64);

/// Loads the budget: the SQL of both backends returns [`BudgetRow`]s in this order.
pub(crate) const BUDGET_COLUMNS: &str = "bl.builder_id, bl.lock_name, bl.units, l.capacity,
     CAST(COALESCE((SELECT SUM(h.units) FROM lock_holds h WHERE h.lock_name = bl.lock_name), 0) AS BIGINT) AS held
     FROM builder_locks bl JOIN locks l ON l.name = bl.lock_name";

impl LockBudget {
    pub(crate) fn new(rows: impl IntoIterator<Item = BudgetRow>) -> LockBudget {
        let mut budget = LockBudget::default();
        for (builder, lock, units, capacity, held) in rows {
            budget
                .free
                .insert(lock.clone(), capacity.saturating_sub(held).max(0));
            budget.uses.entry(builder).or_default().push((lock, units));
        }
        budget
    }

    /// How many builds of `builder` its locks let start now, at most `want`.
    pub(crate) fn allowance(&self, builder: i64, want: usize) -> usize {
        let Some(uses) = self.uses.get(&builder) else {
            return want;
        };
        uses.iter()
            .map(|(lock, units)| {
                let free = self.free.get(lock).copied().unwrap_or(0);
                usize::try_from(free / (*units).max(1)).unwrap_or(0)
            })
            .fold(want, usize::min)
    }

    /// Takes the units of `builds` builds of `builder`.
    pub(crate) fn take(&mut self, builder: i64, builds: usize) {
        let Some(uses) = self.uses.get(&builder) else {
            return;
        };
        for (lock, units) in uses {
            if let Some(free) = self.free.get_mut(lock) {
                *free = free.saturating_sub(units.saturating_mul(builds as i64));
            }
        }
    }

    /// Whether `builder` takes any lock.
    pub(crate) fn takes_locks(&self, builder: i64) -> bool {
        self.uses.contains_key(&builder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_sharing_a_lock_share_its_free_units_in_claim_order() {
        let mut budget = LockBudget::new([
            (1, "db".into(), 2, 5, 1),
            (2, "db".into(), 1, 5, 1),
            (2, "deploy".into(), 1, 1, 0),
        ]);
        assert_eq!(budget.allowance(1, 10), 2);
        budget.take(1, 2);
        assert_eq!(budget.allowance(2, 10), 0);
        assert_eq!(
            budget.allowance(3, 7),
            7,
            "a builder without locks is not limited"
        );
    }

    #[test]
    fn a_lock_held_beyond_a_lowered_capacity_allows_nothing() {
        let budget = LockBudget::new([(1, "db".into(), 1, 1, 3)]);
        assert_eq!(budget.allowance(1, 4), 0);
    }
}
