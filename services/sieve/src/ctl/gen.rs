//! `sieve ctl gen`: the deterministic data of `crate::gen` as NDJSON, a JSON array, or
//! records produced to a topic.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use sieve_core::config::{KafkaArgs, KafkaProperty};
use sieve_core::kafka::Clients;

use super::settle;
use crate::gen::{self, write_json_records, EventKind, EventSpec, UsersSpec};

#[derive(Debug, Subcommand)]
pub enum GenCmd {
    /// Follow events of one author's followers (`fan0` …) as NDJSON with a `key` field
    /// (`<author>/<follower>`), for `ctl produce --key-pointer /key`.
    Follows {
        #[arg(long, default_value = "celebrity")]
        author: String,
        #[arg(long, default_value_t = 100_000)]
        followers: u64,
    },
    /// Preferences of the followers (`fan0` …) as NDJSON with a `user_id` field: quiet hours
    /// in five time zones, mutes, inactive users, device tokens.
    Prefs {
        #[arg(long, default_value_t = 100_000)]
        users: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Notification requests of one priority as NDJSON with a `notification_id` field.
    Notifications {
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=3))]
        priority: u8,
        #[arg(long, default_value_t = 10)]
        count: u64,
        #[arg(long, default_value = "celebrity")]
        author: String,
    },
    /// Events with client retries and idempotency conflicts.
    Events(EventsArgs),
    /// Legacy and current user exports with a hot `guest` key (the anti-join's inputs).
    Users(UsersArgs),
}

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    #[arg(long, default_value_t = 0.2)]
    pub retry_rate: f64,
    #[arg(long, default_value_t = 0.01)]
    pub conflict_rate: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Produce to this topic (key and `idempotency-key` header = event id) instead of
    /// printing NDJSON.
    #[arg(long)]
    pub topic: Option<String>,
    /// Print only how many events are new, retries and conflicts.
    #[arg(long)]
    pub summary: bool,
    /// Another header on every produced record, `name=value` (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<KafkaProperty>,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// Which export of the users data set to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Side {
    /// The old system's export: the anti-join's left input.
    Legacy,
    /// The new system's export: the anti-join's right input.
    Current,
}

#[derive(Debug, clap::Args)]
pub struct UsersArgs {
    /// Which side to write.
    #[arg(long, value_enum)]
    pub side: Side,
    #[arg(long, default_value_t = 100_000)]
    pub legacy: u64,
    /// Distinct ids on the legacy side.
    #[arg(long, default_value_t = 80_000)]
    pub ids: u64,
    #[arg(long, default_value_t = 0.05)]
    pub guest_share: f64,
    #[arg(long, default_value_t = 0.1)]
    pub current_share: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// One JSON array instead of NDJSON.
    #[arg(long)]
    pub array: bool,
    /// Output file (default stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(cmd: GenCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        GenCmd::Events(a) => {
            let spec = EventSpec {
                count: a.count,
                retry_rate: a.retry_rate,
                conflict_rate: a.conflict_rate,
                seed: a.seed,
                ..Default::default()
            };
            match (a.topic, a.summary) {
                (_, true) => summarise_events(spec),
                (Some(t), false) => produce_events(a.kafka, &t, spec, &a.headers),
                (None, false) => print_events(spec),
            }
        }
        GenCmd::Follows { author, followers } => print_records(gen::follows(&author, followers)),
        GenCmd::Prefs { users, seed } => print_records(gen::prefs(users, &now_rfc3339(), seed)),
        GenCmd::Notifications {
            priority,
            count,
            author,
        } => print_records(gen::notifications(priority, count, &author, &now_rfc3339())),
        GenCmd::Users(a) => {
            let spec = UsersSpec {
                legacy: a.legacy,
                ids: a.ids,
                guest_share: a.guest_share,
                current_share: a.current_share,
                seed: a.seed,
            };
            write_users(&spec, a.side, a.array, a.out.as_deref())
        }
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn print_events(spec: EventSpec) -> anyhow::Result<ExitCode> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for e in gen::events(spec) {
        out.write_all(&e.payload)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Produces generated events keyed and `idempotency-key`-headed by their id, plus `extra`
/// headers on every record (a benchmark's raw baseline carries what the path it measures
/// carries).
fn produce_events(
    kafka: KafkaArgs,
    topic: &str,
    spec: EventSpec,
    extra: &[KafkaProperty],
) -> anyhow::Result<ExitCode> {
    let clients = Clients::new(kafka);
    clients.check_reachable()?;
    let producer = clients.producer()?;
    let started = Instant::now();
    let mut pending = Vec::new();
    let mut n = 0u64;
    for e in gen::events(spec) {
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "idempotency-key",
            value: Some(e.key.as_bytes()),
        });
        for h in extra {
            headers = headers.insert(Header {
                key: &h.key,
                value: Some(h.value.as_bytes()),
            });
        }
        let rec = FutureRecord::to(topic)
            .key(e.key.as_bytes())
            .payload(&e.payload)
            .headers(headers);
        pending.push(producer.send_result(rec).map_err(|(err, _)| err)?);
        n += 1;
        if pending.len() >= 20_000 {
            settle(&mut pending)?;
        }
    }
    settle(&mut pending)?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "produced {n} events to {topic} in {secs:.1}s ({:.0}/s)",
        n as f64 / secs.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

fn summarise_events(spec: EventSpec) -> anyhow::Result<ExitCode> {
    let (mut new, mut retries, mut conflicts) = (0u64, 0u64, 0u64);
    for e in gen::events(spec) {
        match e.kind {
            EventKind::New => new += 1,
            EventKind::Retry => retries += 1,
            EventKind::Conflict => conflicts += 1,
        }
    }
    println!("{new} new, {retries} retries, {conflicts} conflicts");
    Ok(ExitCode::SUCCESS)
}

/// Prints generated records as NDJSON.
fn print_records(records: impl Iterator<Item = (String, Vec<u8>)>) -> anyhow::Result<ExitCode> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    write_json_records(&mut out, records.map(|(_, r)| r), false)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Writes one side of the users data set as NDJSON or one JSON array.
fn write_users(
    spec: &UsersSpec,
    side: Side,
    array: bool,
    out: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let sink: Box<dyn Write> = match out {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("create {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let mut w = std::io::BufWriter::with_capacity(1 << 20, sink);
    let records: Box<dyn Iterator<Item = (String, Vec<u8>)>> = match side {
        Side::Legacy => Box::new(spec.legacy()),
        Side::Current => Box::new(spec.current()),
    };
    write_json_records(&mut w, records.map(|(_, r)| r), array)?;
    w.flush()?;
    Ok(ExitCode::SUCCESS)
}
