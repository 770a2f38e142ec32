//! The figures behind the dashboard's charts (`/api/charts`), over the
//! last hour only:
//!
//! - sagas completed, compensated and failed per minute, and the sagas in
//!   flight at the end of each minute;
//! - the latency (p50, p99) of each step's executions that finished;
//! - the outbox's oldest row and the consumers' lag, sampled from this
//!   replica's own metrics.
//!
//! Every query starts from the sagas that finished within the hour (index
//! `saga_instances_finished`) and those in flight now (by the partial
//! index of unfinished sagas): a saga in flight at any moment of the hour is
//! one or the other, so the cost follows the hour's traffic, never the
//! history. Steps are reached from those sagas by their primary key.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, DurationRound as _, TimeDelta, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Minutes a chart spans.
pub(crate) const WINDOW_MINUTES: usize = 60;
/// How often the backlog figures are sampled.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept: an hour's worth.
const SAMPLES_KEPT: usize = 3600 / 5;

/// Everything the charts draw.
#[derive(Debug, Serialize)]
pub(crate) struct Charts {
    /// The oldest first, one per minute, the current minute last.
    pub(crate) minutes: Vec<Minute>,
    pub(crate) step_latency: Vec<StepLatency>,
    /// Sagas running or compensating now.
    pub(crate) in_flight: i64,
    /// The oldest first.
    pub(crate) backlog: Vec<BacklogSample>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Minute {
    pub(crate) at: DateTime<Utc>,
    pub(crate) completed: i64,
    pub(crate) compensated: i64,
    pub(crate) failed: i64,
    pub(crate) terminated: i64,
    /// Sagas started and not finished at the end of the minute (now, for
    /// the current one).
    pub(crate) in_flight: i64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct StepLatency {
    pub(crate) step: String,
    pub(crate) kind: String,
    /// Executions that finished within the hour.
    pub(crate) count: i64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct BacklogSample {
    pub(crate) at: DateTime<Utc>,
    /// Age of the oldest event not yet published from this schema's outbox.
    pub(crate) outbox_age_seconds: f64,
    /// Records behind the newest, by consumer group, summed over the
    /// partitions this replica consumes.
    pub(crate) consumer_lag: BTreeMap<String, f64>,
}

/// Sagas by when they started and finished (to the minute; a start before
/// the window counts as its first minute), with their state.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Lifetimes {
    pub(crate) started: DateTime<Utc>,
    pub(crate) finished: Option<DateTime<Utc>>,
    pub(crate) state: String,
    pub(crate) count: i64,
}

/// The first minute of the window ending with the minute of `now`.
pub(crate) fn window_start(now: DateTime<Utc>) -> DateTime<Utc> {
    let minute = now.duration_trunc(TimeDelta::minutes(1)).unwrap_or(now);
    minute - TimeDelta::minutes(WINDOW_MINUTES as i64 - 1)
}

/// Sagas alive at some moment since `$1` (finished since, or in flight
/// now; the states are literals so that the partial index applies), by the
/// minutes they started and finished in.
const LIFETIMES: &str = "SELECT date_trunc('minute', greatest(created_at, $1)) AS started,
            date_trunc('minute', finished_at) AS finished, state, count(*) AS count
     FROM (SELECT created_at, finished_at, state FROM saga_instances WHERE finished_at >= $1
           UNION ALL
           SELECT created_at, finished_at, state FROM saga_instances
           WHERE state IN ('running', 'compensating')) AS alive
     GROUP BY 1, 2, 3";

/// The latency of the step executions of those sagas that finished since `$1`.
const STEP_LATENCY: &str = "SELECT s.step, s.kind, count(*) AS count,
            1000 * percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM s.finished_at - s.started_at)) AS p50_ms,
            1000 * percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM s.finished_at - s.started_at)) AS p99_ms
     FROM (SELECT saga_id FROM saga_instances WHERE finished_at >= $1
           UNION ALL
           SELECT saga_id FROM saga_instances WHERE state IN ('running', 'compensating')) AS alive
     JOIN saga_steps s ON s.saga_id = alive.saga_id
     WHERE s.finished_at >= $1
     GROUP BY s.step, s.kind
     ORDER BY min(s.started_at), s.kind";

pub(crate) async fn read(pool: &PgPool, sampler: &Sampler) -> anyhow::Result<Charts> {
    let now = Utc::now();
    let start = window_start(now);
    let lifetimes: Vec<Lifetimes> = sqlx::query_as(LIFETIMES)
        .bind(start)
        .fetch_all(pool)
        .await
        .context("counting sagas by minute")?;
    let step_latency = sqlx::query_as(STEP_LATENCY)
        .bind(start)
        .fetch_all(pool)
        .await
        .context("measuring step latency")?;
    let minutes = per_minute(start, &lifetimes);
    Ok(Charts {
        in_flight: minutes.last().map_or(0, |minute| minute.in_flight),
        minutes,
        step_latency,
        backlog: sampler.samples(),
    })
}

/// The window's minutes from `start`, from the sagas' lifetimes: a saga is
/// in flight at the end of each minute from the one it started in up to,
/// not including, the one it finished in.
pub(crate) fn per_minute(start: DateTime<Utc>, lifetimes: &[Lifetimes]) -> Vec<Minute> {
    let mut minutes: Vec<Minute> = (0..WINDOW_MINUTES)
        .map(|i| Minute {
            at: start + TimeDelta::minutes(i as i64),
            ..Minute::default()
        })
        .collect();
    let index = |at: DateTime<Utc>| {
        usize::try_from((at - start).num_minutes())
            .unwrap_or(0)
            .min(WINDOW_MINUTES)
    };
    for lifetime in lifetimes {
        let from = index(lifetime.started);
        let until = lifetime.finished.map_or(WINDOW_MINUTES, index);
        for minute in minutes.iter_mut().take(until).skip(from) {
            minute.in_flight += lifetime.count;
        }
        let Some(finished) = lifetime.finished.map(index) else {
            continue;
        };
        let Some(minute) = minutes.get_mut(finished) else {
            continue;
        };
        match lifetime.state.as_str() {
            "completed" => minute.completed += lifetime.count,
            "compensated" => minute.compensated += lifetime.count,
            "failed" => minute.failed += lifetime.count,
            "terminated" => minute.terminated += lifetime.count,
            _ => {}
        }
    }
    minutes
}

/// The backlog figures of the last hour, sampled every [`SAMPLE_EVERY`]
/// from this replica's metrics: they live in the process (the broker, not
/// the database, knows the lag), so a restarted replica starts afresh.
#[derive(Clone)]
pub(crate) struct Sampler {
    samples: Arc<Mutex<VecDeque<BacklogSample>>>,
    /// Refreshes the outbox gauges before each sample.
    outbox: service_runtime::http::Collector,
}

impl Sampler {
    pub(crate) fn new(outbox: service_runtime::http::Collector) -> Self {
        Self {
            samples: Arc::new(Mutex::new(VecDeque::with_capacity(SAMPLES_KEPT))),
            outbox,
        }
    }

    pub(crate) fn samples(&self) -> Vec<BacklogSample> {
        self.lock().iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<BacklogSample>> {
        // A panic while pushing leaves a usable queue.
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Samples at once, then every [`SAMPLE_EVERY`] until `shutdown`.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(SAMPLE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            (self.outbox)().await;
            let Ok(recorder) = service_runtime::http::recorder() else {
                continue;
            };
            let sample = backlog_of(Utc::now(), &recorder.render());
            let mut samples = self.lock();
            if samples.len() == SAMPLES_KEPT {
                samples.pop_front();
            }
            samples.push_back(sample);
        }
    }
}

/// The backlog figures in a Prometheus text exposition.
pub(crate) fn backlog_of(at: DateTime<Utc>, exposition: &str) -> BacklogSample {
    let mut sample = BacklogSample {
        at,
        outbox_age_seconds: 0.0,
        consumer_lag: BTreeMap::new(),
    };
    for line in exposition.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        match name {
            "outbox_oldest_age_seconds" => sample.outbox_age_seconds = value,
            "kafka_consumer_lag" => {
                if let Some(group) = label(labels, "group") {
                    *sample.consumer_lag.entry(group.to_owned()).or_default() += value;
                }
            }
            _ => {}
        }
    }
    sample
}

/// The value of label `name` in `a="x",b="y"}` (our label values hold no
/// quotes: group, topic and partition names).
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels
        .trim_end_matches('}')
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use database::DatabaseSettings;
    use dev_stack::TestEnv;

    use super::*;

    fn at(minute: i64) -> DateTime<Utc> {
        // A whole minute (1_800_000_000 is 30_000_000 minutes).
        DateTime::from_timestamp(1_800_000_000 + minute * 60, 0).unwrap()
    }

    fn lifetime(started: i64, finished: Option<i64>, state: &str, count: i64) -> Lifetimes {
        Lifetimes {
            started: at(started),
            finished: finished.map(at),
            state: state.to_owned(),
            count,
        }
    }

    #[test]
    fn a_saga_is_in_flight_from_its_start_until_the_minute_it_finishes() {
        let minutes = per_minute(
            at(0),
            &[
                lifetime(0, Some(3), "completed", 2),
                lifetime(1, Some(1), "compensated", 1),
                lifetime(5, None, "running", 4),
                lifetime(58, Some(59), "failed", 1),
            ],
        );
        assert_eq!(minutes.len(), WINDOW_MINUTES);
        assert_eq!(minutes[0].at, at(0));
        let in_flight: Vec<i64> = minutes.iter().map(|m| m.in_flight).collect();
        assert_eq!(&in_flight[..7], &[2, 2, 2, 0, 0, 4, 4]);
        assert_eq!((in_flight[58], in_flight[59]), (5, 4));
        assert_eq!(minutes[3].completed, 2);
        assert_eq!(minutes[1].compensated, 1);
        assert_eq!(minutes[59].failed, 1);
        let finished: i64 = minutes
            .iter()
            .map(|m| m.completed + m.compensated + m.failed)
            .sum();
        assert_eq!(finished, 4);
    }

    #[test]
    fn the_window_ends_with_the_current_minute() {
        let now = at(100) + TimeDelta::seconds(42);
        assert_eq!(window_start(now), at(100 - 59));
    }

    #[test]
    fn backlog_is_read_from_the_metrics_text() {
        let text = "# TYPE outbox_oldest_age_seconds gauge\n\
                    outbox_oldest_age_seconds 1.5\n\
                    kafka_consumer_lag{group=\"trace-view\",topic=\"order.events\",partition=\"0\"} 3\n\
                    kafka_consumer_lag{group=\"trace-view\",topic=\"payment.events\",partition=\"1\"} 4\n\
                    kafka_consumer_lag{group=\"saga-orchestrator\",topic=\"order.events\",partition=\"0\"} 0\n\
                    outbox_backlog 7\n";
        let sample = backlog_of(at(0), text);
        assert_eq!(sample.outbox_age_seconds, 1.5);
        assert_eq!(
            sample.consumer_lag,
            BTreeMap::from([
                ("saga-orchestrator".to_owned(), 0.0),
                ("trace-view".to_owned(), 7.0),
            ])
        );
    }

    async fn saga_schema() -> PgPool {
        let db = TestEnv::get().await.database().await.unwrap();
        let url = db
            .provision(&crate::MANIFEST.account("charts-test"))
            .await
            .unwrap();
        let settings = DatabaseSettings {
            url: sqlx::postgres::PgConnectOptions::from_str(&url).unwrap(),
            max_connections: 4,
            connect_timeout: Duration::from_secs(10),
        };
        let pool = database::connect(&settings, crate::SCHEMA).await.unwrap();
        database::migrate(
            &pool,
            &[
                messaging::MIGRATIONS,
                saga_engine::MIGRATIONS,
                crate::MIGRATIONS,
            ],
        )
        .await
        .unwrap();
        pool
    }

    /// Inserts `count` sagas in `state`, created `age` ago, finished
    /// `finished_ago` ago (if finished), each with two executed steps that
    /// took `step_ms`.
    async fn insert(
        pool: &PgPool,
        count: i64,
        state: &str,
        age: &str,
        finished_ago: Option<&str>,
        step_ms: i64,
    ) {
        sqlx::query(
            "WITH sagas AS (
                 INSERT INTO saga_instances (saga_id, saga_type, business_key, state, data, correlation_id,
                                             created_at, updated_at, finished_at)
                 SELECT gen_random_uuid(), 'order-processing', gen_random_uuid()::text, $2, '{}', 'c',
                        now() - $3::interval, now(), now() - $4::interval
                 FROM generate_series(1, $1)
                 RETURNING saga_id, created_at)
             INSERT INTO saga_steps (saga_id, step, kind, status, attempts, started_at, finished_at)
             SELECT saga_id, step, 'action', 'succeeded', 1, created_at, created_at + $5 * interval '1 ms'
             FROM sagas, unnest(ARRAY['open-order', 'process-payment']) AS step",
        )
        .bind(count)
        .bind(state)
        .bind(age)
        .bind(finished_ago)
        .bind(step_ms)
        .execute(pool)
        .await
        .unwrap();
    }

    async fn plan(pool: &PgPool, query: &str, start: DateTime<Utc>) -> String {
        let lines: Vec<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {query}")))
                .bind(start)
                .fetch_all(pool)
                .await
                .unwrap();
        lines.join("\n")
    }

    #[tokio::test]
    async fn the_charts_read_the_last_hour_by_index_however_long_the_history() {
        let pool = saga_schema().await;
        // A long history, then the last hour: 3 completed 10 minutes ago
        // (steps of 40 ms), one compensated now, 2 in flight since 2 hours.
        insert(&pool, 20_000, "completed", "3 days", Some("3 days"), 5).await;
        insert(&pool, 3, "completed", "11 minutes", Some("10 minutes"), 40).await;
        insert(&pool, 1, "compensated", "1 minute", Some("0 minutes"), 40).await;
        insert(&pool, 2, "running", "2 hours", None, 40).await;
        sqlx::query("ANALYZE saga_instances")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("ANALYZE saga_steps")
            .execute(&pool)
            .await
            .unwrap();

        let start = window_start(Utc::now());
        for query in [LIFETIMES, STEP_LATENCY] {
            let plan = plan(&pool, query, start).await;
            assert!(!plan.contains("Seq Scan"), "{plan}");
            assert!(plan.contains("saga_instances_finished"), "{plan}");
        }

        let sampler = Sampler::new(Arc::new(|| Box::pin(async {})));
        let charts = read(&pool, &sampler).await.unwrap();
        let completed: i64 = charts.minutes.iter().map(|m| m.completed).sum();
        let compensated: i64 = charts.minutes.iter().map(|m| m.compensated).sum();
        assert_eq!((completed, compensated), (3, 1));
        assert_eq!(charts.in_flight, 2);
        assert_eq!(
            charts.minutes[0].in_flight, 2,
            "in flight since before the hour"
        );
        let payment = charts
            .step_latency
            .iter()
            .find(|s| s.step == "process-payment")
            .unwrap();
        // The 20,000 older executions of 5 ms are not the hour's.
        assert_eq!(payment.count, 4);
        assert!((payment.p50_ms - 40.0).abs() < 0.5, "{payment:?}");
        assert!(charts.backlog.is_empty());
    }
}
