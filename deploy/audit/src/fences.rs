//! Fences seen over time.
//!
//! `saga.saga_instances` keeps only each saga's current fence and lease
//! owner, and the step log has no owner or fence column, so the tables
//! alone cannot show that a fence never went backwards. A [`FenceWatch`]
//! can: it reads every live saga's fence and owner again and again while
//! the system runs (a chaos run samples every quarter second), and the
//! audit then checks that no saga's fence ever decreased, that no fence
//! value was held by two owners, and that the final fence is not below
//! the highest one seen.

use std::collections::HashMap;

use anyhow::Context as _;
use sqlx::PgPool;
use uuid::Uuid;

/// What was seen of the sagas' fences.
#[derive(Debug, Default, Clone)]
pub struct FenceWatch {
    /// Samples taken.
    pub samples: u64,
    /// The highest fence seen of each saga.
    highest: HashMap<Uuid, i64>,
    /// The owner seen with each (saga, fence).
    owners: HashMap<(Uuid, i64), String>,
    /// Every step backwards or shared fence: what, of which saga.
    pub violations: Vec<String>,
}

impl FenceWatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the fence and owner of every saga that is not final, or
    /// changed in the last ten seconds, and checks them against what was
    /// seen before.
    pub async fn sample(&mut self, pool: &PgPool) -> anyhow::Result<()> {
        let rows: Vec<(Uuid, i64, Option<String>)> = sqlx::query_as(
            "SELECT saga_id, fence, lease_owner FROM saga.saga_instances
             WHERE state NOT IN ('completed', 'compensated') OR updated_at > now() - interval '10 seconds'",
        )
        .fetch_all(pool)
        .await
        .context("sampling the sagas' fences")?;
        self.observe(rows);
        Ok(())
    }

    /// Checks one sample of (saga, fence, lease owner).
    pub fn observe(&mut self, rows: impl IntoIterator<Item = (Uuid, i64, Option<String>)>) {
        self.samples += 1;
        for (saga_id, fence, owner) in rows {
            let highest = self.highest.entry(saga_id).or_insert(fence);
            if fence < *highest {
                self.violations.push(format!(
                    "saga {saga_id}: fence went back from {highest} to {fence}"
                ));
            }
            *highest = (*highest).max(fence);
            if let Some(owner) = owner {
                match self.owners.get(&(saga_id, fence)) {
                    Some(first) if *first != owner => self.violations.push(format!(
                        "saga {saga_id}: fence {fence} held by {first} and by {owner}"
                    )),
                    Some(_) => {}
                    None => {
                        self.owners.insert((saga_id, fence), owner);
                    }
                }
            }
        }
    }

    /// The highest fence seen of each saga.
    pub fn highest(&self) -> &HashMap<Uuid, i64> {
        &self.highest
    }

    /// Sagas seen.
    pub fn sagas(&self) -> usize {
        self.highest.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_that_goes_back_or_is_shared_is_a_violation() {
        let saga = Uuid::now_v7();
        let mut watch = FenceWatch::new();
        watch.observe([(saga, 1, Some("a".to_owned()))]);
        watch.observe([(saga, 2, Some("b".to_owned()))]);
        watch.observe([(saga, 2, None)]);
        assert!(watch.violations.is_empty(), "{:?}", watch.violations);
        watch.observe([(saga, 1, Some("a".to_owned()))]);
        assert_eq!(watch.violations.len(), 1);
        watch.observe([(saga, 2, Some("c".to_owned()))]);
        assert_eq!(watch.violations.len(), 2, "{:?}", watch.violations);
        assert_eq!(watch.highest()[&saga], 2);
    }
}
