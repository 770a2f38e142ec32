use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;

/// One SQL file of a component's schema history.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// File name, unique within its component; also its identity once applied.
    pub name: &'static str,
    /// The statements, run in the migration transaction.
    pub sql: &'static str,
}

/// The ordered migrations of one component (a service, or a shared crate
/// such as messaging whose tables live in every service's schema).
#[derive(Debug, Clone, Copy)]
pub struct MigrationSet {
    pub component: &'static str,
    pub migrations: &'static [Migration],
}

/// Brings the pool's schema up to date with `sets`, in order.
///
/// Everything happens in one transaction that first takes an advisory lock
/// for the schema: when several replicas start at once, one migrates and the
/// others wait, then find nothing left to do. PostgreSQL DDL is
/// transactional, so a failed migration leaves no half-applied schema.
///
/// Applied migrations are remembered with a checksum; editing one after it
/// was applied, or dropping one from the list, is refused rather than
/// silently diverging from what the database holds.
pub async fn migrate(pool: &PgPool, sets: &[MigrationSet]) -> anyhow::Result<()> {
    let mut tx = pool
        .begin()
        .await
        .context("starting the migration transaction")?;
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '.migrations', 0))",
    )
    .execute(&mut *tx)
    .await
    .context("taking the migration lock")?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             component  TEXT        NOT NULL,
             name       TEXT        NOT NULL,
             checksum   BYTEA       NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
             PRIMARY KEY (component, name)
         )",
    )
    .execute(&mut *tx)
    .await
    .context("creating schema_migrations")?;

    for set in sets {
        let applied: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT name, checksum FROM schema_migrations WHERE component = $1 ORDER BY applied_at, name",
        )
        .bind(set.component)
        .fetch_all(&mut *tx)
        .await
        .context("reading applied migrations")?;

        for (name, checksum) in &applied {
            match set
                .migrations
                .iter()
                .find(|migration| migration.name == name)
            {
                None => bail!(
                    "migration {}/{name} was applied but is no longer known",
                    set.component
                ),
                Some(migration) if checksum_of(migration.sql) != *checksum => {
                    bail!(
                        "migration {}/{name} was changed after it was applied",
                        set.component
                    )
                }
                Some(_) => {}
            }
        }

        for migration in set.migrations {
            if applied.iter().any(|(name, _)| name == migration.name) {
                continue;
            }
            sqlx::raw_sql(migration.sql)
                .execute(&mut *tx)
                .await
                .with_context(|| {
                    format!("applying migration {}/{}", set.component, migration.name)
                })?;
            sqlx::query(
                "INSERT INTO schema_migrations (component, name, checksum) VALUES ($1, $2, $3)",
            )
            .bind(set.component)
            .bind(migration.name)
            .bind(checksum_of(migration.sql))
            .execute(&mut *tx)
            .await
            .context("recording a migration")?;
            tracing::info!(
                component = set.component,
                migration = migration.name,
                "applied migration"
            );
        }
    }
    tx.commit().await.context("committing migrations")?;
    Ok(())
}

fn checksum_of(sql: &str) -> Vec<u8> {
    Sha256::digest(sql.as_bytes()).to_vec()
}
