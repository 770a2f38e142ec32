use std::path::PathBuf;

use anyhow::Context as _;
use sqlx::Connection as _;
use tokio::sync::OnceCell;

use crate::{Broker, KafkaTls, PostgresServer, broker, tools};

/// Set by `cargo xtask test`: the superuser URL of a running PostgreSQL
/// (without a database name) that tests share, one database each.
pub const POSTGRES_ENV: &str = "ORDERSAGA_TEST_POSTGRES";
/// Set by `cargo xtask test`: `host:port` of a running broker that tests
/// share, with topic names of their own.
pub const KAFKA_ENV: &str = "ORDERSAGA_TEST_KAFKA";

/// The infrastructure of one test run: one PostgreSQL cluster and one
/// broker, shared by every test of the run, each test with its own database
/// and its own topic names, so tests run in parallel without seeing each
/// other.
///
/// Under `cargo xtask test` the stack is the one xtask started (named by
/// [`POSTGRES_ENV`] and [`KAFKA_ENV`]); under a plain `cargo test` each test
/// binary starts its own on first use, which stops when the binary exits.
/// A program that needs servers of another kind (a benchmark's durable
/// PostgreSQL) starts them itself and [`install`](Self::install)s them
/// before the first use.
#[derive(Debug)]
pub struct TestEnv {
    postgres_base_url: String,
    /// What URLs to the server end with after the database name: its TLS
    /// parameters, for a server that speaks TLS only.
    postgres_parameters: String,
    bootstrap_servers: String,
    /// Where `tansu topic create` reaches the broker: its cleartext port
    /// (the same as `bootstrap_servers` unless the broker is behind TLS).
    admin_servers: String,
    /// How clients reach a broker over TLS, if it speaks TLS.
    kafka_tls: Option<KafkaTls>,
    tansu: PathBuf,
    /// The servers this run started, if it did; they stop with the process.
    postgres: Option<PostgresServer>,
    broker: Option<Broker>,
}

static ENV: OnceCell<TestEnv> = OnceCell::const_new();

impl TestEnv {
    /// The run's stack, started on first use.
    pub async fn get() -> &'static TestEnv {
        ENV.get_or_try_init(Self::init)
            .await
            .expect("starting the test stack (PostgreSQL and broker)")
    }

    async fn init() -> anyhow::Result<TestEnv> {
        let tansu = tools::tansu()?;
        match (std::env::var(POSTGRES_ENV), std::env::var(KAFKA_ENV)) {
            (Ok(postgres_base_url), Ok(bootstrap_servers)) => Ok(TestEnv {
                postgres_base_url,
                postgres_parameters: String::new(),
                admin_servers: bootstrap_servers.clone(),
                bootstrap_servers,
                kafka_tls: None,
                tansu,
                postgres: None,
                broker: None,
            }),
            _ => {
                let (postgres, broker) =
                    tokio::try_join!(PostgresServer::start(), Broker::start())?;
                Ok(Self::owning(postgres, broker, tansu))
            }
        }
    }

    fn owning(postgres: PostgresServer, broker: Broker, tansu: PathBuf) -> TestEnv {
        TestEnv {
            postgres_base_url: format!("postgres://postgres@127.0.0.1:{}", postgres.port()),
            postgres_parameters: postgres.url_parameters(),
            bootstrap_servers: broker.bootstrap_servers(),
            admin_servers: broker.admin_servers(),
            kafka_tls: broker.tls().cloned(),
            tansu,
            postgres: Some(postgres),
            broker: Some(broker),
        }
    }

    /// Makes `postgres` and `broker`, started by the caller, the run's
    /// stack, which every later [`get`](Self::get) returns (the environment
    /// variables are not read). Fails if the stack exists already: call it
    /// before anything that starts one. The servers stop when the process
    /// exits.
    pub fn install(postgres: PostgresServer, broker: Broker) -> anyhow::Result<&'static TestEnv> {
        Self::set(Self::owning(postgres, broker, tools::tansu()?))
    }

    /// A stack of the caller's own made of `postgres` and `broker`, apart
    /// from the run's (which [`get`](Self::get) keeps returning): for a
    /// program that restarts its PostgreSQL or pauses its broker, which
    /// must not disturb the other tests of the run. It lives, and its
    /// servers run, until the process exits.
    pub fn separate(postgres: PostgresServer, broker: Broker) -> anyhow::Result<&'static TestEnv> {
        let env = Self::owning(postgres, broker, tools::tansu()?);
        Ok(Box::leak(Box::new(env)))
    }

    /// Like [`install`](Self::install), with a PostgreSQL the caller does
    /// not own: `postgres_base_url` is a superuser URL without a database
    /// name (`postgres://user:password@127.0.0.1:5432`), as in
    /// [`POSTGRES_ENV`].
    pub fn install_with_url(
        postgres_base_url: impl Into<String>,
        broker: Broker,
    ) -> anyhow::Result<&'static TestEnv> {
        Self::set(TestEnv {
            postgres_base_url: postgres_base_url.into(),
            postgres_parameters: String::new(),
            bootstrap_servers: broker.bootstrap_servers(),
            admin_servers: broker.admin_servers(),
            kafka_tls: broker.tls().cloned(),
            tansu: tools::tansu()?,
            postgres: None,
            broker: Some(broker),
        })
    }

    fn set(env: TestEnv) -> anyhow::Result<&'static TestEnv> {
        ENV.set(env)
            .map_err(|_| anyhow::anyhow!("the test stack was started before it was installed"))?;
        Ok(ENV.get().expect("set just now"))
    }

    /// The superuser URL of the PostgreSQL server, without a database name.
    pub fn postgres_base_url(&self) -> &str {
        &self.postgres_base_url
    }

    /// The PostgreSQL server, when this run started it.
    pub fn postgres(&self) -> Option<&PostgresServer> {
        self.postgres.as_ref()
    }

    /// The broker, when this run started it.
    pub fn broker(&self) -> Option<&Broker> {
        self.broker.as_ref()
    }

    /// A new, empty database for one test.
    pub async fn database(&self) -> anyhow::Result<TestDatabase> {
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&format!(
            "{}/postgres{}",
            self.postgres_base_url, self.postgres_parameters
        ))
        .await
        .context("connecting to the test cluster")?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(TestDatabase {
            base_url: self.postgres_base_url.clone(),
            parameters: self.postgres_parameters.clone(),
            name,
        })
    }

    /// `host:port` of the broker.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// How clients reach the broker over TLS, if it speaks TLS (see
    /// [`Broker::start_tls`]).
    pub fn kafka_tls(&self) -> Option<&KafkaTls> {
        self.kafka_tls.as_ref()
    }

    /// The Kafka settings of a service on this stack beside
    /// `KAFKA_BROKERS`: over TLS, the CA and the tests' client certificate
    /// (a service may present its own instead); none in cleartext.
    pub fn kafka_env(&self) -> Vec<(String, String)> {
        self.kafka_tls
            .as_ref()
            .map(KafkaTls::env)
            .unwrap_or_default()
    }

    /// A topic prefix no other test uses, such as `t3f9a1c2e.`.
    pub fn unique_topic_prefix(&self) -> String {
        format!("t{}.", &uuid::Uuid::new_v4().simple().to_string()[..8])
    }

    /// Creates topics on the run's broker.
    pub fn create_topics(&self, names: &[String], partitions: u32) -> anyhow::Result<()> {
        broker::create_topics_with(&self.tansu, &self.admin_servers, names, partitions)
    }
}

/// A database that belongs to one test.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    base_url: String,
    /// Appended to every URL: the server's TLS parameters, if any.
    parameters: String,
    name: String,
}

impl TestDatabase {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the database server listens.
    pub fn address(&self) -> std::net::SocketAddr {
        let host = self.base_url.rsplit('@').next().unwrap_or_default();
        host.parse()
            .expect("the test cluster listens on an IP address and port")
    }

    /// Superuser URL of this database.
    pub fn admin_url(&self) -> String {
        format!("{}/{}{}", self.base_url, self.name, self.parameters)
    }

    /// Provisions a service's role and schema here and returns the URL the
    /// service connects with.
    pub async fn provision(&self, account: &database::ServiceAccount) -> anyhow::Result<String> {
        let admin = sqlx::PgPool::connect(&self.admin_url()).await?;
        database::provision(&admin, account).await?;
        admin.close().await;
        Ok(self.url_for(account))
    }

    /// The URL a service connects with as `account` (provisioned by
    /// [`provision`](Self::provision) or by a deployment job).
    pub fn url_for(&self, account: &database::ServiceAccount) -> String {
        let host = self.base_url.rsplit('@').next().unwrap_or_default();
        format!(
            "postgres://{}:{}@{host}/{}{}",
            account.role, account.password, self.name, self.parameters
        )
    }
}
