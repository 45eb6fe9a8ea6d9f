//! Producing outputs: the `sieve-id` header, backpressure on a full queue, and what an
//! acknowledgement (or a failed delivery) means for the batch.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::error::{CoreError, Result};
use crate::metrics::{self, ErrorKind};
use crate::record::{Output, OutputId, ID_HEADER};

fn headers_with_id(out: &Output, id: Option<&str>) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(out.headers.len() + 1);
    // An id inherited from an upstream stage would be mistaken for this stage's own.
    for (k, v) in out.headers.iter().filter(|(k, _)| k != ID_HEADER) {
        h = h.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    match id {
        Some(id) => h.insert(Header {
            key: ID_HEADER,
            value: Some(id),
        }),
        None => h,
    }
}

/// Queues a record, waiting while librdkafka's queue is full (backpressure, not an error).
pub(crate) fn enqueue(
    producer: &FutureProducer,
    mut rec: FutureRecord<'_, [u8], [u8]>,
) -> Result<DeliveryFuture> {
    loop {
        match producer.send_result(rec) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, r)) => return Err(CoreError::kafka(format!("produce to {}", r.topic), e)),
        }
    }
}

/// Queues one output; `id` is `None` only for at-least-once outputs (side-table hooks).
pub(crate) fn send_output(
    producer: &FutureProducer,
    out: &Output,
    id: Option<&OutputId>,
) -> Result<DeliveryFuture> {
    let id = id.map(OutputId::encode);
    let mut rec =
        FutureRecord::<[u8], [u8]>::to(&out.topic).headers(headers_with_id(out, id.as_deref()));
    if let Some(k) = &out.key {
        rec = rec.key(k.as_slice());
    }
    if let Some(v) = &out.payload {
        rec = rec.payload(v.as_slice());
    }
    if let Some(p) = out.partition {
        rec = rec.partition(p);
    }
    enqueue(producer, rec)
}

pub(crate) type DeliveryOutcome = std::result::Result<
    rdkafka::producer::future_producer::OwnedDeliveryResult,
    futures::channel::oneshot::Canceled,
>;

/// Partition and offset of an acknowledged record; a failed delivery is fatal for the batch.
pub(crate) fn delivered(r: DeliveryOutcome) -> Result<(i32, i64)> {
    match r {
        Ok(Ok(d)) => Ok((d.partition, d.offset)),
        Ok(Err((e, m))) => {
            metrics::error(ErrorKind::Produce);
            Err(CoreError::kafka(format!("deliver to {}", m.topic()), e))
        }
        Err(_) => Err(CoreError::kafka("deliver", KafkaError::Canceled)),
    }
}
