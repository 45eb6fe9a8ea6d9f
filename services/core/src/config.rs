//! Command-line and environment configuration shared by every service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// One librdkafka property given as `-X key=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaProperty {
    pub key: String,
    pub value: String,
}

impl FromStr for KafkaProperty {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok(KafkaProperty {
                key: k.trim().to_string(),
                value: v.to_string(),
            }),
            _ => Err(format!("expected key=value, got {s:?}")),
        }
    }
}

/// How to reach Kafka. TLS, SASL and tuning go through `-X`, exactly as with kcat.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Bootstrap brokers, comma separated.
    #[arg(long, env = "SIEVE_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// librdkafka property passed through to every client (repeatable), e.g.
    /// `-X security.protocol=SASL_SSL -X sasl.mechanisms=SCRAM-SHA-512`.
    #[arg(
        short = 'X',
        value_name = "KEY=VALUE",
        env = "SIEVE_KAFKA_PROPERTIES",
        value_delimiter = ';'
    )]
    pub properties: Vec<KafkaProperty>,
    /// How long to wait for the brokers at start before giving up (for example 10s, 500ms).
    #[arg(long, env = "SIEVE_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Which delivery guarantee a processor gives (docs/exactly-once.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Guarantee {
    /// Kafka transactions: each batch's outputs, DLQ records, changelog and input offsets
    /// commit or abort together, and a zombie instance is fenced by the broker. Falls back to
    /// `exactly-once-ids` on a broker without the transaction APIs.
    ExactlyOnce,
    /// Without broker transactions: deterministic output ids, state and offsets in one
    /// RocksDB batch, recovery scan of the output tails. Every output appears once after
    /// crashes, on any Kafka-protocol broker; a zombie is not fenced.
    ExactlyOnceIds,
    /// Offsets committed after outputs are acknowledged; a crash may repeat outputs.
    AtLeastOnce,
}

/// Settings of a long-running process: identity, state, telemetry.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// Consumer group; also names the changelog topics.
    #[arg(long, env = "SIEVE_GROUP")]
    pub group: String,
    /// Directory for local RocksDB state (a cache of what Kafka holds).
    #[arg(long, env = "SIEVE_STATE_DIR", default_value = "./state")]
    pub state_dir: PathBuf,
    /// Address of the HTTP server with /metrics, /healthz and /readyz.
    #[arg(long, env = "SIEVE_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
    #[arg(long, env = "SIEVE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// `exactly-once-ids` stays the default until the chaos run passes on transactions
    /// (docs/exactly-once.md).
    #[arg(long, env = "SIEVE_GUARANTEE", value_enum, default_value_t = Guarantee::ExactlyOnceIds)]
    pub guarantee: Guarantee,
    /// This instance's stable name within the group (a StatefulSet pod name): it names the
    /// transactional producer, so a restarted instance fences its former self. Default: the
    /// host name and a hash of the state directory.
    #[arg(long, env = "SIEVE_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Most records taken into one processing batch (the in-flight budget).
    #[arg(long, env = "SIEVE_BATCH_RECORDS", default_value_t = 5_000)]
    pub batch_records: usize,
    /// Longest wait for a batch to fill before it is processed (for example 50ms).
    #[arg(long, env = "SIEVE_BATCH_LINGER", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub batch_linger: Duration,
    /// RocksDB memory of the whole process (block cache and memtables of every partition).
    #[arg(long, env = "SIEVE_STATE_MEMORY_MB", default_value_t = 64)]
    pub state_memory_mb: u64,
    /// How long the consumer may stay outside its group (rejoining, no partitions) before it
    /// is replaced by a fresh one (see `group_watch`); well above a normal rebalance.
    #[arg(long, env = "SIEVE_GROUP_STALL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub group_stall: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_parses_key_value_and_keeps_equals_in_value() {
        let p: KafkaProperty = "sasl.jaas.config=a=b".parse().unwrap();
        assert_eq!(p.key, "sasl.jaas.config");
        assert_eq!(p.value, "a=b");
        assert!("novalue".parse::<KafkaProperty>().is_err());
        assert!("=x".parse::<KafkaProperty>().is_err());
    }
}
