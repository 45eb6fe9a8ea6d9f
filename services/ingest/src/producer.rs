//! The producer side: records with headers, the in-flight budget, and acknowledgements
//! awaited with a deadline. After a failed delivery the producer is replaced by a fresh one.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig};
use sieve_core::kafka::Clients;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{IngestError, Result};

/// One record to produce. The payload is borrowed: librdkafka copies it on enqueue.
#[derive(Debug)]
pub struct Out<'a> {
    pub topic: &'a str,
    pub key: Vec<u8>,
    pub payload: &'a [u8],
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

/// Where the broker put an acknowledged record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub partition: i32,
    pub offset: i64,
}

/// Hands `out` to librdkafka; the future resolves when the broker acknowledged it.
pub fn enqueue(producer: &FutureProducer, out: &Out<'_>) -> Result<DeliveryFuture, String> {
    let mut headers = OwnedHeaders::new_with_capacity(out.headers.len());
    for (k, v) in &out.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_slice()),
        });
    }
    let rec = FutureRecord::to(out.topic)
        .key(&out.key)
        .payload(out.payload)
        .headers(headers);
    producer.send_result(rec).map_err(|(e, _)| e.to_string())
}

/// The acknowledgement of one delivery, or why there is none.
pub async fn ack(f: DeliveryFuture) -> Result<Ack, String> {
    match f.await {
        Ok(Ok(d)) => Ok(Ack {
            partition: d.partition,
            offset: d.offset,
        }),
        Ok(Err((e, _))) => Err(e.to_string()),
        Err(_) => Err("delivery canceled (producer closed)".into()),
    }
}

/// Why a batch was not (fully) acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The in-flight budget is spent: answer 429.
    Overloaded,
    /// No acknowledgement within the deadline, or a delivery failed: answer 503.
    Unavailable(String),
}

/// The HTTP server's producer with its in-flight budget.
pub struct Sink {
    clients: Clients,
    /// The current producer and its generation (replaced once per failure, not per request).
    producer: RwLock<(u64, FutureProducer)>,
    budget: Arc<Semaphore>,
    budget_size: usize,
    ack_timeout: Duration,
}

impl Sink {
    pub fn new(clients: Clients, budget: usize, ack_timeout: Duration) -> Result<Sink> {
        let producer = Self::create(&clients, ack_timeout)?;
        Ok(Sink {
            clients,
            producer: RwLock::new((0, producer)),
            budget: Arc::new(Semaphore::new(budget)),
            budget_size: budget,
            ack_timeout,
        })
    }

    fn create(clients: &Clients, ack_timeout: Duration) -> Result<FutureProducer> {
        let mut cfg = clients.producer_config();
        // librdkafka gives up on a record about when the client is told 503, so a record
        // answered 503 rarely lands much later (a retry with the same key is deduplicated).
        if cfg.get("message.timeout.ms") == Some("120000") {
            cfg.set("message.timeout.ms", ack_timeout.as_millis().to_string());
        }
        cfg.create()
            .map_err(|e| IngestError::Kafka(format!("create producer: {e}")))
    }

    fn current(&self) -> (u64, FutureProducer) {
        self.producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn producer(&self) -> FutureProducer {
        self.current().1
    }

    /// Reserves budget for `n` records, or says the server is overloaded.
    pub fn reserve(&self, n: usize) -> Result<OwnedSemaphorePermit, SendError> {
        let n = u32::try_from(n).map_err(|_| SendError::Overloaded)?;
        self.budget
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| SendError::Overloaded)
    }

    /// Records reserved and not yet released.
    pub fn in_use(&self) -> usize {
        self.budget_size
            .saturating_sub(self.budget.available_permits())
    }

    /// Produces every record and waits for every acknowledgement, at most the ack timeout.
    pub async fn send_all(&self, records: &[Out<'_>]) -> Result<Vec<Ack>, SendError> {
        let (generation, producer) = self.current();
        let mut futures = Vec::with_capacity(records.len());
        for r in records {
            match enqueue(&producer, r) {
                Ok(f) => futures.push(f),
                Err(e) => return Err(SendError::Unavailable(e)),
            }
        }
        let acks = tokio::time::timeout(self.ack_timeout, join_all(futures.into_iter().map(ack)))
            .await
            .map_err(|_| {
                format!(
                    "no acknowledgement from the broker within {} ms",
                    self.ack_timeout.as_millis()
                )
            })
            .and_then(|acks| acks.into_iter().collect::<Result<Vec<_>, _>>());
        if acks.is_err() {
            self.replace(generation);
        }
        acks.map_err(SendError::Unavailable)
    }

    /// After timeouts an idempotent producer bumps its epoch or stops for good (librdkafka): a
    /// fresh producer (new producer id) serves the next requests. Records still queued in the
    /// old one were answered 503: purge them, so none is written after its client was told no.
    fn replace(&self, generation: u64) {
        let fresh = match Self::create(&self.clients, self.ack_timeout) {
            Ok(p) => p,
            Err(e) => return tracing::error!(error = %e, "cannot create a new producer"),
        };
        let old = {
            let mut cur = self
                .producer
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if cur.0 != generation {
                return; // another request replaced it already
            }
            std::mem::replace(&mut *cur, (generation + 1, fresh)).1
        };
        tracing::warn!(generation, "delivery failed: replacing the producer");
        old.purge(PurgeConfig::default().queue().inflight());
        // Dropping a producer flushes for up to 500 ms: not on an async worker.
        tokio::task::spawn_blocking(move || drop(old));
    }

    /// Whether the brokers answer a metadata request (for /readyz); blocking.
    pub fn broker_reachable(&self, timeout: Duration) -> bool {
        self.producer()
            .client()
            .fetch_metadata(None, timeout)
            .is_ok()
    }

    /// Waits for everything enqueued to be acknowledged (graceful shutdown); blocking.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.producer()
            .flush(timeout)
            .map_err(|e| IngestError::Kafka(format!("flush: {e}")))
    }
}
