//! Kafka client construction with sieve's defaults, user `-X` overrides on top.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, FromClientConfig, FromClientConfigAndContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::metadata::MetadataTopic;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaArgs;
use crate::error::{CoreError, Result};

/// How long librdkafka waits before fetching a partition again once its prefetch queue is
/// full. Its default, 1 s, idles a consumer whose queue is capped as sieve's is (10 000
/// messages, 1 MiB fetches): a raw consume→produce pass-through on Kafka 4.4 (1 M records,
/// 8 partitions, 2 cores) ran at 55 k records/s with it, 192 k with 100 ms, 218 k with 10 ms,
/// against 150 k with librdkafka's defaults and no cap.
const FETCH_QUEUE_BACKOFF_MS: &str = "10";

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
            .set("client.id", client_id());
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
        let mut c = self.producer_base();
        c.set("message.timeout.ms", "120000");
        self.finish(c)
    }

    /// Transactional producer named `id`. Its transactions time out after 60 s (the Java
    /// producer's default; `-X transaction.timeout.ms` changes it): a crashed instance holds
    /// `read_committed` readers of what it wrote that long, unless it restarts sooner (its
    /// successor fences it at once). Not 10 s as in Kafka Streams: a coordinator that expires
    /// a transaction while its broker is still starting after a crash completed the abort
    /// without the markers on that broker's partitions, and the next transaction's commit
    /// marker then committed the dead one's records (docs/exactly-once.md). librdkafka bounds
    /// message delivery by the same time.
    pub fn transactional_producer_config(&self, id: &str) -> ClientConfig {
        let mut c = self.producer_base();
        c.set("transactional.id", id)
            .set("transaction.timeout.ms", "60000");
        self.finish(c)
    }

    fn producer_base(&self) -> ClientConfig {
        let mut c = self.base();
        // Same key, same partition as Kafka's Java producer (murmur2): dedup's one owner per
        // key and the co-partitioned anti-join rely on every producer of a topic agreeing.
        c.set("partitioner", "murmur2_random")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("compression.type", "lz4")
            .set("queue.buffering.max.messages", "200000");
        c
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
            .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
            .set("enable.partition.eof", "false")
            // librdkafka's default, said here because exactly-once depends on it: records of
            // open or aborted transactions are never handed to sieve.
            .set("isolation.level", "read_committed")
            // Per-partition lag for the sieve_consumer_lag gauge.
            .set("statistics.interval.ms", "5000");
        self.finish(c)
    }

    /// Consumer without a group, for reading changelogs and output tails by assignment.
    pub fn reader_config(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", "sieve-reader")
            .set("isolation.level", "read_committed")
            // A range read ends at the partition's end, which it learns from an empty fetch:
            // under transactions the last offset is a commit marker that is never handed
            // over, so every read waits for that answer (librdkafka's default 500 ms wait
            // made a read of 8 small partitions take 9 s).
            .set("fetch.wait.max.ms", "10")
            .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true");
        self.finish(c)
    }

    pub fn producer(&self) -> Result<FutureProducer> {
        FutureProducer::from_config(&self.producer_config())
            .map_err(|e| config_or_kafka("create producer", e))
    }

    pub fn transactional_producer(&self, id: &str) -> Result<FutureProducer> {
        FutureProducer::from_config(&self.transactional_producer_config(id))
            .map_err(|e| config_or_kafka("create transactional producer", e))
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
            .fetch_metadata(None, self.args.connect_timeout)
            .map(|_| ())
            .map_err(|e| CoreError::Unreachable {
                brokers: self.args.brokers.clone(),
                timeout_ms: u64::try_from(self.args.connect_timeout.as_millis())
                    .unwrap_or(u64::MAX),
                reason: e.to_string(),
            })
    }

    /// Number of partitions of a topic, or an error naming the topic when it does not exist.
    pub fn partition_count(&self, reader: &BaseConsumer, topic: &str) -> Result<i32> {
        let md = reader
            .fetch_metadata(Some(topic), self.args.connect_timeout)
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

    /// Replication factor of an existing topic (the replicas of its first partition).
    pub fn replication_of(&self, reader: &BaseConsumer, topic: &str) -> Result<i32> {
        let md = reader
            .fetch_metadata(Some(topic), self.args.connect_timeout)
            .map_err(|e| CoreError::kafka(format!("metadata of {topic}"), e))?;
        md.topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(replication_factor)
            .filter(|r| *r > 0)
            .ok_or_else(|| CoreError::Config(format!("topic {topic} does not exist")))
    }

    /// Creates a topic unless it exists, with `replication` copies (`None`: the broker's
    /// `default.replication.factor`); `configs` are set explicitly.
    pub async fn ensure_topic(
        &self,
        name: &str,
        partitions: i32,
        replication: Option<i32>,
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
        // -1 asks the broker for its default (CreateTopics v4+).
        let mut topic = NewTopic::new(
            name,
            partitions,
            TopicReplication::Fixed(replication.unwrap_or(-1)),
        );
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
            Some(Ok(_)) => {
                self.wait_until_served(name, partitions)?;
                Ok(true)
            }
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(false),
            Some(Err((t, code))) => Err(CoreError::kafka(
                format!("create topic {t}"),
                KafkaError::AdminOp(code),
            )),
            None => Ok(false),
        }
    }

    /// Waits until a topic just created is served: Kafka answers CreateTopics once its
    /// controller has the topic, and brokers learn it from the metadata log a moment later;
    /// a watermark or fetch request in between fails with "unknown partition".
    fn wait_until_served(&self, name: &str, partitions: i32) -> Result<()> {
        let reader = self.reader()?;
        let started = std::time::Instant::now();
        loop {
            let served = reader
                .fetch_metadata(Some(name), self.args.connect_timeout)
                .ok()
                .and_then(|md| {
                    let t = md.topics().iter().find(|t| t.name() == name)?;
                    let ready = t.error().is_none()
                        && t.partitions().len() == partitions as usize
                        && t.partitions()
                            .iter()
                            .all(|p| p.leader() >= 0 && p.error().is_none());
                    Some(ready)
                })
                .unwrap_or(false);
            if served {
                return Ok(());
            }
            if started.elapsed() > BROKER_WAIT {
                return Err(CoreError::Config(format!(
                    "topic {name} was created but no broker serves it after {BROKER_WAIT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Replication factor of a topic in a metadata answer: the replicas of its first partition
/// (0 for a topic without partitions).
pub fn replication_factor(t: &MetadataTopic) -> i32 {
    t.partitions()
        .first()
        .map_or(0, |p| p.replicas().len() as i32)
}

/// The client id of every client of this process, `sieve@HOST/pid=PID`: Kafka's group
/// description (`ctl replay`, `kafka-consumer-groups --describe --members`) then names the
/// host and process of each member. Worked out once per process.
pub fn client_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("sieve@{}/pid={}", host_name(), std::process::id()))
}

/// The host's name (a StatefulSet pod's name in Kubernetes).
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
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
            connect_timeout: Duration::from_secs(1),
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
