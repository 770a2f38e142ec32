//! PostgreSQL as every service uses it.
//!
//! Each service owns exactly one schema and reaches it through its own role,
//! which cannot see any other schema: data crosses services only by gRPC or
//! events. This crate gives a service the three things it needs for that:
//!
//! - [`connect`]: a pool whose every connection has `search_path` set to the
//!   service's schema, waiting (bounded) for the database at start;
//! - [`migrate`]: the service's migrations, applied in one transaction under
//!   an advisory lock, so any number of replicas may start at once;
//! - [`provision`]: creation of the role and schema, run once by an operator
//!   (or by the local stack and the tests) with an administrative connection;
//! - [`Purger`]: the batched, replica-safe purge of rows past their
//!   retention, run on a timer by each service over its list of targets.

mod migrate;
mod provision;
mod retention;
mod settings;

pub use migrate::{Migration, MigrationSet, migrate};
pub use provision::{ServiceAccount, provision, provision_sql};
pub use retention::{PurgeReport, PurgeSettings, PurgeTarget, Purger, parse_retention};
pub use settings::{DatabaseSettings, connect};

/// Declares a [`MigrationSet`] from SQL files in the crate's `migrations/`
/// folder, applied in the order listed.
///
/// ```ignore
/// pub const MIGRATIONS: database::MigrationSet =
///     database::migrations!("order", ["0001_event_store.sql", "0002_read_model.sql"]);
/// ```
#[macro_export]
macro_rules! migrations {
    ($component:literal, [$($file:literal),* $(,)?]) => {
        $crate::MigrationSet {
            component: $component,
            migrations: &[$(
                $crate::Migration {
                    name: $file,
                    sql: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/", $file)),
                }
            ),*],
        }
    };
}
