//! The group consumer's callbacks: partitions open on assignment (restore, replay,
//! recovery, side catch-up) and close on revocation, inside the callback so that nothing is
//! consumed before a partition's start offset is known; statistics feed the lag gauges and
//! the group stall watch.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use super::Engine;
use crate::error::CoreError;
use crate::group_watch::GroupWatch;
use crate::metrics::{self, ErrorKind};
use crate::operator::OperatorFactory;
use crate::topic_partition::TopicPartition;

pub(super) struct RunnerContext<F: OperatorFactory> {
    pub engine: Arc<Mutex<Engine<F>>>,
    pub watch: Arc<GroupWatch>,
}

pub(super) fn lock<F: OperatorFactory>(m: &Mutex<Engine<F>>) -> MutexGuard<'_, Engine<F>> {
    // A panic while holding the lock leaves the engine mid-batch; its state on disk is still
    // consistent (commits are atomic), so continuing to shut down is safe.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The partitions of a rebalance list.
fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

impl<F: OperatorFactory> ClientContext for RunnerContext<F> {
    fn stats(&self, stats: Statistics) {
        if let Some(cgrp) = &stats.cgrp {
            self.watch.observe(cgrp, Instant::now());
        }
        let mut prefetched = 0;
        for (topic, t) in &stats.topics {
            for (p, s) in &t.partitions {
                // From the position handed to sieve, not the committed offset: under
                // exactly-once the transactions commit offsets, which the consumer's own
                // statistics never see. `ls_offset` is the end a read_committed reader sees.
                if *p >= 0 && s.desired && s.app_offset >= 0 && s.ls_offset >= 0 {
                    metrics::consumer_lag(topic, *p, (s.ls_offset - s.app_offset).max(0));
                }
                prefetched += s.fetchq_size;
            }
        }
        metrics::prefetch_bytes(prefetched);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        metrics::error(ErrorKind::KafkaClient);
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

impl<F: OperatorFactory> ConsumerContext for RunnerContext<F> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let mut engine = lock(&self.engine);
        // A transaction committed here (side reconciliation, closing) carries this generation.
        engine.group_meta = consumer.group_metadata();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                match engine.open_partitions(&partitions_of(tpl)) {
                    Ok(starts) => {
                        for (tp, off) in starts {
                            if let Some(off) = off {
                                let _ = tpl.set_partition_offset(
                                    &tp.topic,
                                    tp.partition,
                                    Offset::Offset(off),
                                );
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "opening assigned partitions failed");
                        engine.fatal.get_or_insert(e);
                    }
                }
                let res = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = res {
                    engine.fatal.get_or_insert(CoreError::kafka("assign", e));
                }
                metrics::assigned_partitions(engine.partitions.len());
                engine.health.set_joined(true);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = consumer.assignment_lost();
                match engine.close_partitions(&partitions_of(tpl), !lost) {
                    Ok(c) if !lost && c.count() > 0 => {
                        if let Err(e) = consumer.commit(&c, CommitMode::Sync) {
                            tracing::warn!(error = %e, "offset commit on revoke failed");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        engine.fatal.get_or_insert(e);
                    }
                }
                let res = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = res {
                    tracing::warn!(error = %e, "unassign failed");
                }
                metrics::assigned_partitions(engine.partitions.len());
            }
            other => {
                metrics::error(ErrorKind::Rebalance);
                tracing::error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }
}
