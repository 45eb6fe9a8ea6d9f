//! Kafka client construction with sieve's defaults, user `-X` overrides on top.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, FromClientConfig, FromClientConfigAndContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaArgs;
use crate::error::{CoreError, Result};

/// Builds every Kafka client of a process from one place, so defaults and overrides agree.
#[derive(Debug, Clone)]
pub struct Clients {
    args: KafkaArgs,
}

impl Clients {
    pub fn new(args: KafkaArgs) -> Self {
        Clients { args }
    }

    pub fn brokers(&self) -> &str {
        &self.args.brokers
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.args.brokers)
            .set("client.id", "sieve")
            // Small fetch waits: a broker that holds every fetch for the full wait stalls
            // pipelines with idle CPU (measured on the local broker).
            .set("fetch.wait.max.ms", "10")
            .set("fetch.queue.backoff.ms", "100");
        c
    }

    fn finish(&self, mut c: ClientConfig) -> ClientConfig {
        for p in &self.args.properties {
            c.set(&p.key, &p.value);
        }
        c
    }

    /// Producer: idempotent, `acks=all`, infinite-by-default retries inside the delivery
    /// timeout, lz4 batches. An output is only counted once the broker acknowledged it.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = self.base();
        // Consumer-only tuning would only draw warnings from the producer.
        c.remove("fetch.wait.max.ms");
        c.remove("fetch.queue.backoff.ms");
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("compression.type", "lz4")
            .set("queue.buffering.max.messages", "200000")
            .set("message.timeout.ms", "120000");
        self.finish(c)
    }

    /// Group consumer with manual offsets: nothing is committed or stored automatically.
    pub fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            // Prefetch is the consume side's in-flight budget: librdkafka's default keeps up
            // to 100 000 messages per partition (measured: dedup RSS 63 → 180 MiB as its
            // input grew 10x); a few batches' worth is enough to keep the loop busy.
            .set("queued.min.messages", "10000")
            .set("queued.max.messages.kbytes", "16384")
            // The cap above is checked before a fetch is sent, and the responses to fetches in
            // flight come on top. With librdkafka's 50 MiB per response, a dedup behind by
            // 800 k records queued 125 MB (RSS 135 MiB); with 1 MiB, 15 MB (RSS 70 MiB).
            .set("fetch.max.bytes", "1048576")
            .set("enable.partition.eof", "false")
            // Per-partition lag for the sieve_consumer_lag gauge.
            .set("statistics.interval.ms", "5000");
        self.finish(c)
    }

    /// Consumer without a group, for reading changelogs and output tails by assignment.
    pub fn reader_config(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", "sieve-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true");
        self.finish(c)
    }

    pub fn producer(&self) -> Result<FutureProducer> {
        FutureProducer::from_config(&self.producer_config())
            .map_err(|e| config_or_kafka("create producer", e))
    }

    pub fn consumer<C: ConsumerContext>(&self, group: &str, ctx: C) -> Result<BaseConsumer<C>> {
        BaseConsumer::from_config_and_context(&self.consumer_config(group), ctx)
            .map_err(|e| config_or_kafka("create consumer", e))
    }

    pub fn reader(&self) -> Result<BaseConsumer> {
        BaseConsumer::from_config(&self.reader_config())
            .map_err(|e| config_or_kafka("create reader", e))
    }

    pub fn admin(&self) -> Result<AdminClient<DefaultClientContext>> {
        AdminClient::from_config(&self.finish(self.base()))
            .map_err(|e| config_or_kafka("create admin client", e))
    }

    /// Fails fast, with one clear line, when the brokers cannot be reached or the
    /// configuration is rejected; better at start than a silent retry loop later.
    pub fn check_reachable(&self) -> Result<()> {
        let reader = self.reader()?;
        reader
            .fetch_metadata(None, self.args.connect_timeout())
            .map(|_| ())
            .map_err(|e| CoreError::Unreachable {
                brokers: self.args.brokers.clone(),
                timeout_ms: self.args.connect_timeout_ms,
                reason: e.to_string(),
            })
    }

    /// Number of partitions of a topic, or an error naming the topic when it does not exist.
    pub fn partition_count(&self, reader: &BaseConsumer, topic: &str) -> Result<i32> {
        let md = reader
            .fetch_metadata(Some(topic), self.args.connect_timeout())
            .map_err(|e| CoreError::kafka(format!("metadata of {topic}"), e))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| CoreError::Config(format!("topic {topic} does not exist")))?;
        if t.error().is_some() || t.partitions().is_empty() {
            return Err(CoreError::Config(format!(
                "topic {topic} does not exist (create it with `sieve ctl topics apply`)"
            )));
        }
        Ok(t.partitions().len() as i32)
    }

    /// Creates a topic unless it exists; `configs` are set explicitly so every broker reports them.
    pub async fn ensure_topic(
        &self,
        name: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> Result<bool> {
        // A topic that exists needs no admin request (nor the right to make one).
        if self
            .reader()
            .and_then(|r| self.partition_count(&r, name))
            .is_ok()
        {
            return Ok(false);
        }
        let admin = self.admin()?;
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (k, v) in configs {
            topic = topic.set(k, v);
        }
        let res = admin
            .create_topics(
                &[topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(|e| CoreError::kafka(format!("create topic {name}"), e))?;
        match res.into_iter().next() {
            Some(Ok(_)) => Ok(true),
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(false),
            Some(Err((t, code))) => Err(CoreError::kafka(
                format!("create topic {t}"),
                KafkaError::AdminOp(code),
            )),
            None => Ok(false),
        }
    }
}

/// librdkafka reports unknown or invalid properties at client creation: show them as
/// configuration errors, which the user fixes, not as broker errors.
fn config_or_kafka(context: &str, e: KafkaError) -> CoreError {
    match e {
        KafkaError::ClientConfig(_, ref desc, ref key, ref value) => {
            CoreError::Config(format!("{desc} (property {key}={value})"))
        }
        KafkaError::ClientCreation(ref msg) => CoreError::Config(msg.clone()),
        other => CoreError::kafka(context, other),
    }
}

/// How long a metadata request keeps being retried while the broker is away.
const BROKER_WAIT: Duration = Duration::from_secs(60);

/// Runs `f` again while it fails with a transient error, for up to a minute: a broker
/// restart during a partition's open must not stop the service.
pub fn retry_transient<T>(what: &str, mut f: impl FnMut() -> KafkaResult<T>) -> KafkaResult<T> {
    let started = std::time::Instant::now();
    loop {
        match f() {
            Err(e) if is_transient(&e) && started.elapsed() < BROKER_WAIT => {
                tracing::warn!(error = %e, what, "broker unavailable; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

/// Errors that say the broker is away or busy, not that the request is wrong: worth waiting
/// out (librdkafka reconnects and retries by itself) rather than failing the service.
pub fn is_transient(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::AllBrokersDown
                | C::BrokerTransportFailure
                | C::OperationTimedOut
                | C::RequestTimedOut
                | C::NetworkException
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::NotCoordinator
                | C::CoordinatorNotAvailable
                | C::CoordinatorLoadInProgress
                | C::Resolve
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients(props: &[&str]) -> Clients {
        Clients::new(KafkaArgs {
            // Nothing listens there: creating a client does not connect.
            brokers: "127.0.0.1:1".into(),
            properties: props.iter().map(|p| p.parse().unwrap()).collect(),
            connect_timeout_ms: 1000,
        })
    }

    /// TLS and SASL settings given with `-X` reach librdkafka and are accepted: it was
    /// built with TLS and SCRAM (a build without them refuses these values).
    #[test]
    fn tls_and_sasl_properties_are_accepted() {
        for props in [
            &[
                "security.protocol=SSL",
                "ssl.endpoint.identification.algorithm=https",
            ][..],
            &[
                "security.protocol=SASL_SSL",
                "sasl.mechanisms=SCRAM-SHA-512",
                "sasl.username=sieve",
                "sasl.password=secret",
            ],
            &[
                "security.protocol=SASL_PLAINTEXT",
                "sasl.mechanisms=PLAIN",
                "sasl.username=key",
                "sasl.password=secret",
            ],
        ] {
            let c = clients(props);
            let _producer = c.producer().unwrap_or_else(|e| panic!("{props:?}: {e}"));
            let _reader = c.reader().unwrap_or_else(|e| panic!("{props:?}: {e}"));
        }
        assert!(clients(&["security.protocol=TLS9"]).reader().is_err());
    }

    #[test]
    fn broker_outages_are_transient_and_bad_requests_are_not() {
        let e = |c| KafkaError::MessageConsumption(c);
        assert!(is_transient(&e(RDKafkaErrorCode::AllBrokersDown)));
        assert!(is_transient(&e(RDKafkaErrorCode::BrokerTransportFailure)));
        assert!(!is_transient(&e(RDKafkaErrorCode::UnknownTopicOrPartition)));
        assert!(!is_transient(&e(
            RDKafkaErrorCode::TopicAuthorizationFailed
        )));
    }
}
