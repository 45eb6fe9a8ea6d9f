//! Strict priority between input topics: while a higher priority has records waiting, the
//! partitions of every lower priority are paused, so a 2FA code never waits behind a
//! celebrity's fan-out. A starvation guard lets lower priorities through for one batch when
//! they have been paused for longer than `guard` without a break.
//!
//! "Has records waiting" compares each partition's next offset with the high watermark
//! librdkafka cached from its last fetch: no request to the broker. Paused partitions are not
//! fetched, so their cached watermark goes stale; only the watermarks of higher priorities,
//! which are never paused, decide anything. Offsets are not records under transactions: a
//! commit marker (and an aborted transaction) takes offsets no record is read from, so a
//! caught-up partition's watermark can stay past its next offset. A gap that a whole poll
//! left as it was (same next offset, same watermark) is therefore taken as holding nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use std::ffi::CString;

use rdkafka::bindings;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::TopicPartitionList;

use crate::metrics;
use crate::topic_partition::TopicPartition;

pub struct Scheduler {
    /// Priority of each input topic; 0 is the highest.
    of_topic: BTreeMap<String, u8>,
    guard: Duration,
    paused: BTreeSet<TopicPartition>,
    paused_since: Option<Instant>,
    /// Next offset and cached high watermark of each unpaused partition at the last call.
    last_seen: BTreeMap<TopicPartition, (i64, i64)>,
}

impl Scheduler {
    pub fn new(of_topic: BTreeMap<String, u8>, guard: Duration) -> Self {
        Scheduler {
            of_topic,
            guard,
            paused: BTreeSet::new(),
            paused_since: None,
            last_seen: BTreeMap::new(),
        }
    }

    /// Pauses and resumes partitions for the next poll. `assigned` lists each assigned
    /// partition with its next offset to process (negative when unknown).
    pub fn schedule<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        assigned: &[(TopicPartition, i64)],
    ) {
        let mut seen = BTreeMap::new();
        let mut waiting = |tp: &TopicPartition, next: i64| match cached_watermarks(consumer, tp) {
            Some((low, high)) if high >= 0 => {
                seen.insert(tp.clone(), (next, high));
                let idle_gap = self.last_seen.get(tp) == Some(&(next, high));
                high > next.max(low) && !idle_gap
            }
            _ => false,
        };
        let top = assigned
            .iter()
            .filter(|(tp, next)| !self.paused.contains(tp) && waiting(tp, *next))
            .filter_map(|(tp, _)| self.of_topic.get(&tp.topic).copied())
            .min();
        self.last_seen = seen;
        let starving = self
            .paused_since
            .is_some_and(|since| since.elapsed() > self.guard);
        let want: BTreeSet<TopicPartition> = match top {
            Some(top) if !starving => assigned
                .iter()
                .map(|(tp, _)| tp)
                .filter(|tp| self.of_topic.get(&tp.topic).is_some_and(|p| *p > top))
                .cloned()
                .collect(),
            _ => BTreeSet::new(),
        };
        if starving {
            metrics::starvation_guard();
        }
        let pause: Vec<&TopicPartition> = want.difference(&self.paused).collect();
        let resume: Vec<&TopicPartition> = self
            .paused
            .difference(&want)
            .filter(|tp| assigned.iter().any(|(a, _)| a == *tp))
            .collect();
        if !pause.is_empty() {
            if let Err(e) = consumer.pause(&tpl(&pause)) {
                tracing::warn!(error = %e, "pausing lower priorities failed");
            }
        }
        if !resume.is_empty() {
            if let Err(e) = consumer.resume(&tpl(&resume)) {
                tracing::warn!(error = %e, "resuming lower priorities failed");
            }
        }
        self.paused_since = match (want.is_empty(), self.paused_since) {
            (true, _) => None,
            (false, Some(since)) if !self.paused.is_empty() => Some(since),
            (false, _) => Some(Instant::now()),
        };
        self.paused = want;
        metrics::paused_partitions(self.paused.len());
    }
}

/// The low and high watermarks librdkafka cached from its last fetch of a partition, without
/// asking the broker (rdkafka 0.39 wraps only the querying variant).
#[allow(unsafe_code)]
fn cached_watermarks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tp: &TopicPartition,
) -> Option<(i64, i64)> {
    let topic = CString::new(tp.topic.as_str()).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client handle lives as long as `consumer`; librdkafka only writes the two
    // out-parameters, which live on this stack frame.
    let err = unsafe {
        bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            tp.partition,
            &mut low,
            &mut high,
        )
    };
    (err == bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR).then_some((low, high))
}

fn tpl(tps: &[&TopicPartition]) -> TopicPartitionList {
    let mut l = TopicPartitionList::new();
    for tp in tps {
        l.add_partition(&tp.topic, tp.partition);
    }
    l
}
