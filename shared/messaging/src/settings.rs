use std::time::Duration;

/// Kafka settings shared by every service.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaSettings {
    /// Bootstrap brokers, comma separated `host:port`.
    #[arg(long = "kafka-brokers", env = "KAFKA_BROKERS", default_value = "localhost:9092", value_parser = parse_brokers)]
    pub brokers: String,

    /// Prefix of every topic name (and consumer group), to share one cluster
    /// between environments; empty for none.
    #[arg(long = "kafka-topic-prefix", env = "KAFKA_TOPIC_PREFIX", default_value = "", value_parser = parse_prefix)]
    pub topic_prefix: String,

    /// How long a publish may wait for the broker before it counts as failed
    /// (and is retried from the outbox).
    #[arg(long = "kafka-publish-timeout", env = "KAFKA_PUBLISH_TIMEOUT", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub publish_timeout: Duration,

    /// How long a consumer may go silent before the group gives its
    /// partitions to another replica; also bounds how long joining takes.
    #[arg(long = "kafka-session-timeout", env = "KAFKA_SESSION_TIMEOUT", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub session_timeout: Duration,

    /// TLS and SASL of every connection to the brokers.
    #[command(flatten)]
    pub security: crate::KafkaSecurity,
}

fn parse_brokers(value: &str) -> Result<String, String> {
    for broker in value.split(',') {
        let (host, port) = broker
            .trim()
            .rsplit_once(':')
            .ok_or_else(|| format!("{broker:?} is not host:port"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("{broker:?} is not host:port"));
        }
    }
    Ok(value.to_owned())
}

fn parse_prefix(value: &str) -> Result<String, String> {
    let valid = value.len() <= 100
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if valid {
        Ok(value.to_owned())
    } else {
        Err("only letters, digits, '.', '_' and '-', at most 100".to_owned())
    }
}
