//! The database crate against a real PostgreSQL: schemas confined to their
//! role, migrations under concurrency, and start-up settings.

use std::str::FromStr as _;
use std::time::Duration;

use database::{DatabaseSettings, Migration, MigrationSet, ServiceAccount};
use dev_stack::{TestDatabase, TestEnv};
use sqlx::PgPool;

const WIDGETS: MigrationSet = MigrationSet {
    component: "widgets",
    migrations: &[
        Migration {
            name: "0001_widgets.sql",
            sql: include_str!("migrations/0001_widgets.sql"),
        },
        Migration {
            name: "0002_widget_colour.sql",
            sql: include_str!("migrations/0002_widget_colour.sql"),
        },
    ],
};

fn account(schema: &'static str, role: &'static str) -> ServiceAccount {
    ServiceAccount {
        schema,
        role,
        password: format!("{role}-test"),
    }
}

fn settings(url: &str) -> DatabaseSettings {
    DatabaseSettings {
        url: sqlx::postgres::PgConnectOptions::from_str(url).unwrap(),
        max_connections: 5,
        connect_timeout: Duration::from_secs(10),
    }
}

async fn service_pool(db: &TestDatabase, account: &ServiceAccount) -> PgPool {
    let url = db.provision(account).await.unwrap();
    database::connect(&settings(&url), account.schema)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_service_role_cannot_read_another_services_schema() {
    let db = TestEnv::get().await.database().await.unwrap();
    let alpha = service_pool(&db, &account("alpha", "alpha_service")).await;
    let beta = service_pool(&db, &account("beta", "beta_service")).await;
    database::migrate(&alpha, &[WIDGETS]).await.unwrap();
    database::migrate(&beta, &[WIDGETS]).await.unwrap();

    // Unqualified names resolve to the service's own schema.
    sqlx::query("INSERT INTO widgets (name) VALUES ('mine')")
        .execute(&alpha)
        .await
        .unwrap();
    let (schema,): (String,) = sqlx::query_as("SELECT current_schema()")
        .fetch_one(&alpha)
        .await
        .unwrap();
    assert_eq!(schema, "alpha");

    let error = sqlx::query("SELECT * FROM alpha.widgets")
        .fetch_all(&beta)
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("permission denied for schema alpha"),
        "{error}"
    );
    let error = sqlx::query("CREATE TABLE public.sneaky (id INT)")
        .execute(&beta)
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("permission denied for schema public"),
        "{error}"
    );
}

#[tokio::test]
async fn replicas_migrating_at_once_apply_each_migration_exactly_once() {
    let db = TestEnv::get().await.database().await.unwrap();
    let account = account("gamma", "gamma_service");
    let url = db.provision(&account).await.unwrap();

    let replicas = (0..8).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            let pool = database::connect(&settings(&url), "gamma").await.unwrap();
            database::migrate(&pool, &[WIDGETS]).await
        })
    });
    for outcome in futures_join(replicas).await {
        outcome.unwrap();
    }

    let pool = database::connect(&settings(&url), "gamma").await.unwrap();
    let applied: Vec<(String,)> =
        sqlx::query_as("SELECT name FROM schema_migrations ORDER BY name")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        applied,
        vec![
            ("0001_widgets.sql".to_owned(),),
            ("0002_widget_colour.sql".to_owned(),)
        ]
    );
    let (colour,): (String,) =
        sqlx::query_as("INSERT INTO widgets (name) VALUES ('w') RETURNING colour")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(colour, "blue");
}

#[tokio::test]
async fn an_edited_migration_is_refused() {
    let db = TestEnv::get().await.database().await.unwrap();
    let pool = service_pool(&db, &account("delta", "delta_service")).await;
    database::migrate(&pool, &[WIDGETS]).await.unwrap();

    const EDITED: MigrationSet = MigrationSet {
        component: "widgets",
        migrations: &[
            Migration {
                name: "0001_widgets.sql",
                sql: "CREATE TABLE widgets (id INT)",
            },
            WIDGETS.migrations[1],
        ],
    };
    let error = database::migrate(&pool, &[EDITED]).await.unwrap_err();
    assert!(
        error.to_string().contains("0001_widgets.sql was changed"),
        "{error}"
    );
}

#[tokio::test]
async fn a_failing_migration_leaves_nothing_behind() {
    let db = TestEnv::get().await.database().await.unwrap();
    let pool = service_pool(&db, &account("epsilon", "epsilon_service")).await;
    const BROKEN: MigrationSet = MigrationSet {
        component: "widgets",
        migrations: &[
            WIDGETS.migrations[0],
            Migration {
                name: "0002_broken.sql",
                sql: "ALTER TABLE no_such_table ADD COLUMN x INT",
            },
        ],
    };
    let error = database::migrate(&pool, &[BROKEN]).await.unwrap_err();
    assert!(
        format!("{error:#}").contains("0002_broken.sql"),
        "{error:#}"
    );

    let (tables,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'epsilon' AND tablename = 'widgets'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        tables, 0,
        "the first migration must roll back with the second"
    );
}

#[tokio::test]
async fn connect_gives_up_after_its_timeout_naming_the_reason() {
    let port = dev_stack::free_port().unwrap();
    let mut settings = settings(&format!("postgres://nobody@127.0.0.1:{port}/nothing"));
    settings.connect_timeout = Duration::from_millis(300);
    let error = database::connect(&settings, "nothing").await.unwrap_err();
    assert!(
        error.to_string().contains("database not reachable within"),
        "{error}"
    );
}

async fn futures_join<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.unwrap());
    }
    results
}
