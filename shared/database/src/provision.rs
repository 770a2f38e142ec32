use anyhow::{Context as _, ensure};
use sqlx::PgPool;

/// The role and schema one service owns.
#[derive(Clone)]
pub struct ServiceAccount {
    /// Schema holding every table of the service, e.g. `orders`.
    pub schema: &'static str,
    /// Login role of the service, owner of the schema, e.g. `order_service`.
    pub role: &'static str,
    /// The role's password.
    pub password: String,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("schema", &self.schema)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Creates (or brings up to date) the role and schema of `account` in the
/// database `admin` is connected to. `admin` must be a superuser or a role
/// with CREATEROLE and CREATE on the database.
///
/// Idempotent and safe to run concurrently, from several replicas of a
/// deployment job or for several databases of one cluster at once.
pub async fn provision(admin: &PgPool, account: &ServiceAccount) -> anyhow::Result<()> {
    // Audited: identifiers are checked to be plain lower-case names and the
    // password's quotes are doubled.
    sqlx::raw_sql(sqlx::AssertSqlSafe(provision_sql(account)?))
        .execute(admin)
        .await
        .with_context(|| {
            format!(
                "provisioning role {} and schema {}",
                account.role, account.schema
            )
        })?;
    Ok(())
}

/// The SQL that [`provision`] runs, for operators who provision by hand or
/// from a deployment job.
pub fn provision_sql(account: &ServiceAccount) -> anyhow::Result<String> {
    ensure!(
        is_identifier(account.schema),
        "schema name {:?} is not a plain identifier",
        account.schema
    );
    ensure!(
        is_identifier(account.role),
        "role name {:?} is not a plain identifier",
        account.role
    );
    let ServiceAccount {
        schema,
        role,
        password,
    } = account;
    let password = password.replace('\'', "''");
    Ok(format!(
        r#"
-- Role and schema of {role}. Safe to run again, and concurrently: the
-- statements run as one transaction, serialised per database by the lock.
SELECT pg_advisory_xact_lock(hashtextextended('ordersaga.provision', 0));
-- Roles are cluster-wide: another database may be creating the same role
-- right now, so its creation tolerates losing that race. The password is set
-- only on creation (changing it is an operator's ALTER ROLE).
DO $$ BEGIN
    CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{password}';
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role};
ALTER SCHEMA {schema} OWNER TO {role};
-- Nobody gets anything by default: no shared public schema, and only the
-- service roles may connect.
REVOKE ALL ON SCHEMA public FROM PUBLIC;
DO $$ BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO {role}', current_database());
END $$;
-- Extensions the services' indexes use, which a service role may not
-- create: pg_trgm (the saga search's failure-reason index). In a schema of
-- their own, which every service may use and none owns.
CREATE SCHEMA IF NOT EXISTS extensions;
CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA extensions;
GRANT USAGE ON SCHEMA extensions TO {role};
"#
    ))
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_lowercase() || first == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
