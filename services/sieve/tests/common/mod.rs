//! A dedup pipeline on its own Kafka broker, shared by the dedup and ops tests (replay, DLQ).
// Each test binary uses a different part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use rdkafka::message::Message;
use sieve::gen::{self, Event, EventKind, EventSpec};
use sieve_core::record::OutputId;
use sieve_tests::{service_args, unique, wait_for, Broker, Service, TestRecord};

pub const BIN: &str = env!("CARGO_BIN_EXE_sieve");

/// One output record: where it is, which input produced it, and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub id: (i32, i64, u32),
    pub key: Vec<u8>,
}

pub struct Pipeline {
    pub broker: Broker,
    pub raw: String,
    pub uniq: String,
    pub dlq: String,
    pub group: String,
    pub dir: tempfile::TempDir,
}

impl Pipeline {
    pub fn new(partitions: i32) -> Result<Pipeline> {
        let broker = Broker::start()?;
        let (raw, uniq, dlq) = (unique("raw"), unique("unique"), unique("dlq"));
        broker.create_topic(&raw, partitions)?;
        broker.create_topic(&uniq, partitions)?;
        broker.create_topic(&dlq, 1)?;
        Ok(Pipeline {
            broker,
            raw,
            uniq,
            dlq,
            group: unique("dedup"),
            dir: tempfile::tempdir()?,
        })
    }

    pub fn produce(&self, events: &[Event]) -> Result<()> {
        self.broker.produce_records(
            &self.raw,
            events.iter().map(|e| TestRecord {
                key: e.key.as_bytes(),
                value: &e.payload,
                headers: vec![("idempotency-key", e.key.as_bytes())],
                timestamp_ms: None,
            }),
        )?;
        Ok(())
    }

    pub fn spawn(&self) -> Result<Service> {
        self.spawn_with(&[])
    }

    /// `sieve dedup` for this pipeline with extra flags.
    pub fn spawn_with(&self, extra: &[&str]) -> Result<Service> {
        self.spawn_env(extra, &[])
    }

    /// `sieve dedup` for this pipeline with extra flags and environment.
    pub fn spawn_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Result<Service> {
        self.spawn_instance("state", extra, env)
    }

    /// A dedup instance with its own state directory `state` (a second member of the group).
    pub fn spawn_instance(
        &self,
        state: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Service> {
        let mut args: Vec<String> = [
            "dedup", "--input", &self.raw, "--output", &self.uniq, "--dlq", &self.dlq,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(service_args(
            &self.broker,
            &self.group,
            &self.dir.path().join(state),
        ));
        args.extend(extra.iter().map(|s| s.to_string()));
        Service::spawn(Path::new(BIN), &args, env, self.dir.path())
    }

    /// `sieve ctl <command> --brokers <this broker> <args>`; exit code and all output.
    pub fn ctl(&self, command: &[&str], args: &[&str]) -> Result<(i32, String)> {
        let out = Command::new(BIN)
            .arg("ctl")
            .args(command)
            .args(["--brokers", &self.broker.addr()])
            .args(args)
            .env("RUST_LOG", "off")
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        Ok((out.status.code().unwrap_or(-1), text))
    }

    /// `sieve ctl replay` for this pipeline's group and input.
    pub fn replay(&self, args: &[&str]) -> Result<(i32, String)> {
        let mut all = vec!["--group", &self.group, "--topic", &self.raw];
        all.extend_from_slice(args);
        self.ctl(&["replay"], &all)
    }

    /// Waits until the output and the DLQ hold at least these counts.
    pub fn wait_for_counts(&self, svc: &mut Service, uniq: usize, dlq: usize) -> Result<()> {
        wait_for("dedup outputs", Duration::from_secs(180), || {
            let u = self.broker.count(&self.uniq).ok()?;
            let d = self.broker.count(&self.dlq).ok()?;
            (u >= uniq as i64 && d >= dlq as i64).then_some(())
        })
        .map_err(|e| e.context(svc.log_tail(30)))
    }

    /// Every output and DLQ record, in offset order per partition.
    pub fn outputs(&self) -> Result<Vec<Out>> {
        let mut all = Vec::new();
        for topic in [&self.uniq, &self.dlq] {
            for m in self.broker.read_all(topic)? {
                let id = OutputId::of(&m)
                    .map(|id| (id.partition, id.offset, id.index))
                    .ok_or_else(|| anyhow::anyhow!("output without a sieve-id"))?;
                all.push(Out {
                    topic: topic.clone(),
                    partition: m.partition(),
                    offset: m.offset(),
                    id,
                    key: m.key().unwrap_or_default().to_vec(),
                });
            }
        }
        Ok(all)
    }
}

pub fn generated(count: u64, seed: u64) -> Vec<Event> {
    gen::events(EventSpec {
        count,
        retry_rate: 0.2,
        conflict_rate: 0.02,
        seed,
        ..Default::default()
    })
    .collect()
}

pub fn count(events: &[Event], kind: EventKind) -> usize {
    events.iter().filter(|e| e.kind == kind).count()
}
