//! What a deployment does on its first start, all at once: the one-off
//! jobs run several times concurrently (a re-applied manifest racing the
//! first), then three replicas of every service start at the same moment
//! against the fresh database and broker. Everything must come up, with
//! each schema migrated once, one admin and one signing key.

use std::time::Duration;

use dev_stack::{ServiceProcess, ServingStatus, TestEnv};
use e2e::{ADMIN_EMAIL, BINARIES, peer_env};
use futures::future::{join_all, try_join_all};
use messaging::Topics;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use testkit::{Binary, Scenario};

const REPLICAS: usize = 3;
const PARTITIONS: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_and_replicas_started_at_once_on_a_fresh_stack_all_come_up() -> anyhow::Result<()> {
    let env = TestEnv::get().await;
    // Nothing provisioned, no topics: what a new cluster has.
    let scenario = Scenario {
        env,
        database: env.database().await?,
        topics: Topics::new(env.unique_topic_prefix()),
    };

    // The jobs, each three times at once.
    let admin_url = scenario.database.admin_url();
    let passwords: ops::Passwords = BINARIES
        .iter()
        .map(|binary| (binary.name(), binary.account().password))
        .collect();
    let layout = ops::TopicLayout {
        partitions: PARTITIONS,
        replication_factor: 1,
    };
    let wait = Duration::from_secs(10);
    let provisions = (0..REPLICAS).map(|_| ops::provision(&admin_url, &passwords, wait));
    let security = scenario.kafka_security();
    let topic_jobs = (0..REPLICAS).map(|_| {
        ops::create_topics(
            env.bootstrap_servers(),
            &security,
            scenario.topics.prefix(),
            &layout,
            wait,
        )
    });
    tokio::try_join!(try_join_all(provisions), try_join_all(topic_jobs))?;

    let expected = ops::topics(scenario.topics.prefix());
    assert_eq!(
        expected.len(),
        6,
        "four event topics, two dead-letter topics"
    );
    let consumer: BaseConsumer =
        messaging::client_config(env.bootstrap_servers(), &security)?.create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    for topic in &expected {
        let found = metadata.topics().iter().find(|t| t.name() == topic);
        let partitions = found.map(|t| t.partitions().len());
        assert_eq!(partitions, Some(PARTITIONS as usize), "topic {topic}");
    }

    // Three replicas of each service at once: auth's first, as the others
    // fetch its keys; then the other nine together.
    let start_replicas = |binary: Binary, auth: Option<String>| {
        let scenario = &scenario;
        join_all((0..REPLICAS).map(move |_| {
            let auth = auth.clone();
            async move {
                let url = scenario.database.url_for(&binary.account());
                let mut settings = scenario.service_env(&url);
                // Each replica calls the first of the others' replicas.
                settings.extend(peer_env(binary.name(), |peer| match &auth {
                    Some(auth) if peer == auth_service::NAME => auth.clone(),
                    _ => format!("http://127.0.0.1:{}", unreachable_port()),
                }));
                let folder = e2e::binaries_folder().await?;
                let mut process =
                    ServiceProcess::start(binary.name(), &folder.join(binary.name()), settings)
                        .await?;
                process
                    .wait_for_health("", ServingStatus::Serving, Duration::from_secs(60))
                    .await?;
                anyhow::Ok(process)
            }
        }))
    };
    let auth: Vec<ServiceProcess> = start_replicas(BINARIES[0], None)
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let auth_url = Some(auth[0].url());
    let (orders, payments, orchestrators) = tokio::join!(
        start_replicas(BINARIES[1], auth_url.clone()),
        start_replicas(BINARIES[2], auth_url.clone()),
        start_replicas(BINARIES[3], auth_url.clone()),
    );
    let others: Vec<ServiceProcess> = orders
        .into_iter()
        .chain(payments)
        .chain(orchestrators)
        .collect::<Result<_, _>>()?;
    assert_eq!(auth.len() + others.len(), 4 * REPLICAS);
    // What the containers' health check runs.
    for process in auth.iter().chain(&others) {
        ops::health_check(&process.address().to_string(), "", process.tls()).await?;
    }

    // The races left one of everything.
    let pool = scenario.inspect().await?;
    let admins: i64 = sqlx::query_scalar("SELECT count(*) FROM auth.users WHERE email = $1")
        .bind(ADMIN_EMAIL)
        .fetch_one(&pool)
        .await?;
    assert_eq!(admins, 1);
    let current_keys: i64 =
        sqlx::query_scalar("SELECT count(*) FROM auth.signing_keys WHERE retired_at IS NULL")
            .fetch_one(&pool)
            .await?;
    assert_eq!(current_keys, 1);
    for binary in BINARIES {
        // Audited: the schema is one of the services' constant names.
        let (applied, distinct): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT count(*), count(DISTINCT (component, name)) FROM {}.schema_migrations",
            binary.manifest.schema
        )))
        .fetch_one(&pool)
        .await?;
        assert!(applied > 0, "{} applied its migrations", binary.name());
        assert_eq!(
            applied,
            distinct,
            "{} applied each migration once",
            binary.name()
        );
    }
    Ok(())
}

/// A port nothing listens on: the order and payment URLs the orchestrator
/// is given here, as no saga runs in this test.
fn unreachable_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}
