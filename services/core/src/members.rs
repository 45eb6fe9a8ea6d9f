//! Member beacons: every running service process says, every few seconds, that it is a
//! member of its group, on the compacted topic `<group>.members`.
//!
//! Kafka's own answer to "does this group have active members" is DescribeGroups, which
//! `sieve ctl replay` asks first. The local broker (Tansu 0.6.0) fails every DescribeGroups
//! for a group that ever had a member (it cannot decode its own stored group), so the tool
//! falls back to these beacons there. A process that stops gracefully removes its beacon; one
//! that crashed stops beating and counts as gone after [`STALE_AFTER`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use serde::{Deserialize, Serialize};

use crate::changelog;
use crate::error::{CoreError, Result};
use crate::kafka::Clients;

/// How often a member beats.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// A beacon older than this (by its record timestamp) is a member that is gone.
pub const STALE_AFTER: Duration = Duration::from_secs(20);
/// Records at the end of the topic that cover every live member's latest beat.
const TAIL: i64 = 2_000;

/// Compacted topic of `group`'s beacons.
pub fn topic(group: &str) -> String {
    format!("{group}.members")
}

/// What a member says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beacon {
    pub host: String,
    pub pid: u32,
    pub metrics_addr: String,
    /// When the process started (ms since the epoch).
    pub since_ms: i64,
}

impl Beacon {
    fn key(&self) -> String {
        format!("{}/{}", self.host, self.pid)
    }
}

impl std::fmt::Display for Beacon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on {} (metrics {})",
            self.pid, self.host, self.metrics_addr
        )
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// When this process started (ms since the epoch): a beacon of this host with this pid but an
/// earlier start belongs to a crashed earlier incarnation (a container restarted in place).
pub fn process_start_ms() -> i64 {
    static START: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *START.get_or_init(now_ms)
}

/// Beats for `group` until `stop` resolves, then removes the beacon. Failures are logged,
/// never fatal: beacons are advisory.
pub async fn beat(
    clients: Clients,
    group: String,
    metrics_addr: SocketAddr,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let topic = topic(&group);
    let beacon = Beacon {
        host: hostname(),
        pid: std::process::id(),
        metrics_addr: metrics_addr.to_string(),
        since_ms: process_start_ms(),
    };
    let key = beacon.key();
    let setup = async {
        clients
            .ensure_topic(
                &topic,
                1,
                &[("cleanup.policy", "compact"), ("retention.ms", "-1")],
            )
            .await?;
        let value = serde_json::to_vec(&beacon)
            .map_err(|e| CoreError::Corrupt(format!("encode beacon: {e}")))?;
        Ok::<_, CoreError>((clients.producer()?, value))
    };
    let (producer, value) = match setup.await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, topic, "member beacons disabled");
            return;
        }
    };
    tokio::pin!(stop);
    loop {
        let rec = FutureRecord::to(&topic)
            .key(key.as_bytes())
            .payload(&value)
            .partition(0);
        if let Err((e, _)) = producer.send(rec, Duration::from_secs(5)).await {
            tracing::debug!(error = %e, "member beacon not delivered");
        }
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
    let gone = FutureRecord::<[u8], [u8]>::to(&topic)
        .key(key.as_bytes())
        .partition(0);
    if let Err((e, _)) = producer.send(gone, Duration::from_secs(5)).await {
        tracing::warn!(error = %e, "member beacon not removed; it goes stale");
    }
}

/// Every member's latest beacon with its record timestamp (ms), as of the broker's end of the
/// topic; empty when no member ever beat.
fn latest(reader: &BaseConsumer, group: &str) -> Result<Vec<(i64, Beacon)>> {
    let topic = topic(group);
    let (low, high) = match reader.fetch_watermarks(&topic, 0, Duration::from_secs(10)) {
        Ok(w) => w,
        Err(_) => return Ok(Vec::new()),
    };
    let mut latest: BTreeMap<Vec<u8>, Option<(i64, Beacon)>> = BTreeMap::new();
    let from = (high - TAIL).max(low);
    changelog::read_range(reader, &topic, 0, from, high, STALE_AFTER, |m| {
        let Some(k) = m.key() else { return Ok(()) };
        let ts = m.timestamp().to_millis().unwrap_or(0);
        let beacon = m.payload().and_then(|v| serde_json::from_slice(v).ok());
        latest.insert(k.to_vec(), beacon.map(|b| (ts, b)));
        Ok(())
    })?;
    Ok(latest.into_values().flatten().collect())
}

/// Members of `group` whose latest beacon is fresh, as of the broker's end of the topic.
pub fn active(reader: &BaseConsumer, group: &str) -> Result<Vec<Beacon>> {
    let fresh_after = now_ms() - STALE_AFTER.as_millis() as i64;
    let here = hostname();
    Ok(latest(reader, group)?
        .into_iter()
        .filter(|(ts, b)| *ts >= fresh_after && (b.host != here || process_alive(b.pid)))
        .map(|(_, b)| b)
        .collect())
}

/// How long to wait before joining `group` so that an earlier process of this host that
/// crashed (it left a beacon and no tombstone) has surely been dropped from the group: its
/// last beat plus a beat interval plus the session timeout. The local broker (Tansu 0.6)
/// gives a member that joins while the dead one's session still runs an empty assignment
/// that never changes (measured: over 160 s); joining after the session expired gets every
/// partition at once. On Apache Kafka the dead member's partitions move only after its
/// session anyway, so the wait costs nothing there.
pub fn wait_after_crash(
    reader: &BaseConsumer,
    group: &str,
    session: Duration,
) -> Result<Option<Duration>> {
    let (here, me, started) = (hostname(), std::process::id(), process_start_ms());
    let last_crashed = latest(reader, group)?
        .into_iter()
        .filter(|(_, b)| {
            b.host == here && (!process_alive(b.pid) || (b.pid == me && b.since_ms < started))
        })
        .map(|(ts, _)| ts)
        .max();
    // It may have lived up to one beat interval after its last beacon.
    let after_last_beat = (INTERVAL + session).as_millis() as i64 + 1_000;
    Ok(last_crashed
        .map(|ts| ts + after_last_beat - now_ms())
        .filter(|ms| *ms > 0)
        .map(|ms| Duration::from_millis(ms as u64)))
}

/// Whether a process of this host runs: a SIGKILLed member cannot remove its beacon, and on
/// its own host its absence shows at once rather than after `STALE_AFTER`.
fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_process_that_ended_is_not_alive() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }
}
