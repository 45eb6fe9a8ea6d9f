//! The Kafka a chaos run drives: one node, killed and restarted whole, or a cluster whose
//! nodes die one at a time: the leader of the partitions dedup writes, the coordinator of
//! dedup's transactions, then any node.

use std::time::Duration;

use anyhow::Result;
use rand::Rng;
use rand_pcg::Pcg64Mcg;

use crate::{Broker, Cluster};

pub enum Brokers {
    Node(Broker),
    Cluster {
        cluster: Cluster,
        /// Produce, read and count through every node.
        helpers: Broker,
    },
}

/// What a cluster's node kills aim at, in turn.
pub struct Targets {
    /// A topic dedup writes: its partition 0's leader dies first.
    pub written: String,
    /// Dedup's `transactional.id`: its coordinator dies second.
    pub transactional_id: String,
}

impl Brokers {
    /// One node when `nodes` is 1, else a cluster of `nodes`.
    pub fn start(nodes: usize) -> Result<Brokers> {
        if nodes <= 1 {
            return Ok(Brokers::Node(Broker::start()?));
        }
        let cluster = Cluster::start(nodes)?;
        let helpers = Broker::external(&cluster.addr())?;
        Ok(Brokers::Cluster { cluster, helpers })
    }

    pub fn helpers(&self) -> &Broker {
        match self {
            Brokers::Node(b) => b,
            Brokers::Cluster { helpers, .. } => helpers,
        }
    }

    /// The `k`-th broker kill (from 0): SIGKILL, down for 1–5 s, started again on the same
    /// ports and data. Returns what died.
    pub fn kill(&mut self, k: u32, targets: &Targets, rng: &mut Pcg64Mcg) -> Result<String> {
        // The broker stays down for a while: the fault, not a wait for a condition.
        let down = Duration::from_millis(rng.random_range(1_000..5_000));
        match self {
            Brokers::Node(b) => {
                b.kill();
                std::thread::sleep(down);
                b.restart()?;
                Ok("the broker".into())
            }
            Brokers::Cluster { cluster, .. } => {
                let (node, what) = match k {
                    0 => (
                        cluster.leader(&targets.written, 0)?,
                        "leader of dedup's output",
                    ),
                    1 => (
                        cluster.transaction_coordinator(&targets.transactional_id)?,
                        "dedup's transaction coordinator",
                    ),
                    _ => (rng.random_range(1..=cluster.nodes), "a node"),
                };
                cluster.kill(node)?;
                std::thread::sleep(down);
                cluster.launch_stopped()?;
                Ok(format!("node {node} ({what})"))
            }
        }
    }
}
