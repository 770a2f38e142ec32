//! `--history N`: a database that has already seen N finished orders, to
//! show that what a saga costs does not grow with what came before.
//!
//! The history is made of copies of the warm-up's flows, which are real:
//! every row they left in the order, payment and saga schemas (events, read
//! model, idempotency keys, payments, provider records, saga instances and
//! steps, trace view, inboxes) is copied once per generation. Each copy
//! gets fresh identifiers by one rule applied to every identifier column,
//! `md5(old || ':' || generation)`, so the copies keep their relations
//! (an order's saga, payment and events still name the same new order id),
//! and its timestamps are moved two days back, so that it counts as old
//! for every "recent" query. The outboxes are left out: a finished flow
//! has nothing left in them.

use std::time::Instant;

use anyhow::Context as _;
// The statements are built from the catalogue's own table and column
// names, never from input.
use sqlx::{AssertSqlSafe, Connection as _, PgConnection};

/// The service schemas whose rows a flow leaves behind. Auth's rows are
/// per customer, not per order.
const SCHEMAS: [&str; 3] = ["orders", "payments", "saga"];

/// Text columns that hold identifiers (the rest are copied as they are).
const TEXT_IDS: [&str; 11] = [
    "charge_key",
    "business_key",
    "correlation_id",
    "idempotency_key",
    "refund_idempotency_key",
    "key",
    "aggregate_id",
    "causation_id",
    "message_key",
    "provider_reference",
    "reference",
];

/// Rows copied per statement, about: big enough to be quick, small enough
/// to show progress and keep each transaction short.
const ROWS_PER_STATEMENT: i64 = 200_000;

/// Copies the finished flows now in the database until there are about
/// `sagas` more of them, then vacuums and checkpoints, so the run starts
/// from a settled database as a long-lived deployment's would be.
pub(crate) async fn preload(admin_url: &str, sagas: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut conn = PgConnection::connect(admin_url)
        .await
        .context("connecting to preload history")?;
    let template: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM saga.saga_instances WHERE finished_at IS NOT NULL",
    )
    .fetch_one(&mut conn)
    .await?;
    anyhow::ensure!(template > 0, "no finished saga to copy history from");
    let generations = sagas.div_ceil(template as u64) as i64;
    // Copies are history, not new work: no trigger (no NOTIFY to wake the
    // engines or the trace tails) and no foreign-key checks, whose targets
    // are copied alongside.
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut conn)
        .await?;
    let tables = tables(&mut conn).await?;
    for table in &tables {
        let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            table.name
        )))
        .fetch_one(&mut conn)
        .await?;
        if rows == 0 {
            continue;
        }
        // The template is the table as the warm-up left it, so that later
        // statements do not copy copies.
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TEMP TABLE template AS SELECT * FROM {}",
            table.name
        )))
        .execute(&mut conn)
        .await?;
        let per_statement = (ROWS_PER_STATEMENT / rows).max(1);
        let insert = format!(
            "INSERT INTO {} ({}) SELECT {} FROM template, generate_series($1::int8, $2::int8) AS g",
            table.name,
            table.columns.join(", "),
            table.copies.join(", ")
        );
        let mut first = 1;
        while first <= generations {
            let last = (first + per_statement - 1).min(generations);
            sqlx::query(AssertSqlSafe(insert.as_str()))
                .bind(first)
                .bind(last)
                .execute(&mut conn)
                .await
                .with_context(|| format!("copying history into {}", table.name))?;
            eprint!(
                "\r\x1b[K{:>6.1} s  history: {} {}/{} generations",
                started.elapsed().as_secs_f64(),
                table.name,
                last,
                generations
            );
            first = last + 1;
        }
        sqlx::query("DROP TABLE template")
            .execute(&mut conn)
            .await?;
    }
    sqlx::query("RESET session_replication_role")
        .execute(&mut conn)
        .await?;
    for table in &tables {
        eprint!(
            "\r\x1b[K{:>6.1} s  history: vacuuming {}",
            started.elapsed().as_secs_f64(),
            table.name
        );
        sqlx::query(AssertSqlSafe(format!("VACUUM ANALYZE {}", table.name)))
            .execute(&mut conn)
            .await?;
    }
    sqlx::query("CHECKPOINT").execute(&mut conn).await?;
    eprintln!(
        "\r\x1b[K{:>6.1} s  history: {} finished sagas added ({} generations of {})",
        started.elapsed().as_secs_f64(),
        generations * template,
        generations,
        template
    );
    Ok(())
}

/// A table to copy: its writable columns, and for each the expression that
/// makes generation `g`'s value from the template's.
struct Table {
    name: String,
    columns: Vec<String>,
    copies: Vec<String>,
}

async fn tables(conn: &mut PgConnection) -> anyhow::Result<Vec<Table>> {
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT c.table_schema || '.' || c.table_name, c.column_name, c.data_type
           FROM information_schema.columns c
           JOIN information_schema.tables t USING (table_schema, table_name)
          WHERE c.table_schema = ANY($1) AND t.table_type = 'BASE TABLE'
            AND c.table_name NOT IN ('outbox', 'schema_migrations')
            AND c.is_identity = 'NO' AND c.is_generated = 'NEVER'
          ORDER BY c.table_schema, c.table_name, c.ordinal_position",
    )
    .bind(SCHEMAS)
    .fetch_all(&mut *conn)
    .await
    .context("listing the tables a flow writes")?;
    let mut tables: Vec<Table> = Vec::new();
    for (table, column, data_type) in columns {
        let copy = match data_type.as_str() {
            "uuid" => format!("md5(\"{column}\"::text || ':' || g)::uuid"),
            "text" if TEXT_IDS.contains(&column.as_str()) => {
                format!("md5(\"{column}\" || ':' || g)::uuid::text")
            }
            "timestamp with time zone" => format!("\"{column}\" - interval '2 days'"),
            _ => format!("\"{column}\""),
        };
        let column = format!("\"{column}\"");
        match tables.last_mut() {
            Some(last) if last.name == table => {
                last.columns.push(column);
                last.copies.push(copy);
            }
            _ => tables.push(Table {
                name: table,
                columns: vec![column],
                copies: vec![copy],
            }),
        }
    }
    Ok(tables)
}
