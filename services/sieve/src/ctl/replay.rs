//! `sieve ctl replay`: rewinds a consumer group with the semantics of
//! `kafka-consumer-groups --reset-offsets`, and asks the runtime to rebuild the state of the
//! rewound partitions (see `services/core/src/replay.rs` and `ops/runbooks/replay.md`).

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::ArgGroup;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use sieve_core::config::KafkaArgs;
use sieve_core::kafka::Clients;
use sieve_core::replay;

use super::watermarks;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Where to move the group's offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Earliest,
    Latest,
    /// The first record at or after this time (ms since the epoch); the end when none is.
    Datetime(i64),
    Offset(i64),
    ShiftBy(i64),
}

/// One partition of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub partition: i32,
    pub current: Option<i64>,
    pub new: i64,
    /// Records from the new offset to the end of the partition.
    pub reprocess: i64,
}

/// The new offset of one partition, clamped to its watermarks as Kafka's tool does.
/// `by_time` is the broker's answer for a datetime target (`None`: no record that late).
/// A group without a committed offset starts at the earliest offset (sieve's
/// `auto.offset.reset`), which is what a shift is relative to.
pub fn new_offset(
    target: Target,
    low: i64,
    high: i64,
    current: Option<i64>,
    by_time: Option<i64>,
) -> i64 {
    let wanted = match target {
        Target::Earliest => low,
        Target::Latest => high,
        Target::Datetime(_) => by_time.unwrap_or(high),
        Target::Offset(o) => o,
        Target::ShiftBy(n) => current.unwrap_or(low).saturating_add(n),
    };
    wanted.clamp(low, high)
}

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("target").required(true).args(["to_earliest", "to_latest", "to_datetime", "to_offset", "shift_by"])))]
#[command(group(ArgGroup::new("mode").required(true).args(["dry_run", "execute"])))]
pub struct ReplayArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[arg(long)]
    pub group: String,
    #[arg(long)]
    pub topic: String,
    /// Only these partitions (comma separated); all by default.
    #[arg(long, value_delimiter = ',')]
    pub partitions: Vec<i32>,
    #[arg(long)]
    pub to_earliest: bool,
    #[arg(long)]
    pub to_latest: bool,
    /// The first record at or after this instant (RFC 3339, e.g. 2026-11-20T10:00:00Z).
    #[arg(long, value_parser = parse_datetime)]
    pub to_datetime: Option<i64>,
    #[arg(long)]
    pub to_offset: Option<i64>,
    /// Move the committed offset by N (negative: back).
    #[arg(long, allow_hyphen_values = true)]
    pub shift_by: Option<i64>,
    /// Print the plan, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Commit the new offsets.
    #[arg(long)]
    pub execute: bool,
}

impl ReplayArgs {
    /// The one target the argument group allows.
    pub fn target(&self) -> Target {
        match (self.to_datetime, self.to_offset, self.shift_by) {
            (Some(t), _, _) => Target::Datetime(t),
            (_, Some(o), _) => Target::Offset(o),
            (_, _, Some(n)) => Target::ShiftBy(n),
            _ if self.to_latest => Target::Latest,
            _ => Target::Earliest,
        }
    }
}

pub fn run(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let target = args.target();
    rewind(
        args.kafka,
        &Rewind {
            group: &args.group,
            topic: &args.topic,
            partitions: &args.partitions,
            target,
            execute: args.execute,
        },
    )
}

struct Rewind<'a> {
    group: &'a str,
    topic: &'a str,
    /// Only these partitions (all when empty).
    partitions: &'a [i32],
    target: Target,
    execute: bool,
}

fn rewind(kafka: KafkaArgs, args: &Rewind<'_>) -> anyhow::Result<ExitCode> {
    let clients = Clients::new(kafka);
    clients.check_reachable()?;
    let reader = clients.reader()?;
    let mut marks = watermarks(&clients, &reader, args.topic)?;
    if !args.partitions.is_empty() {
        for p in args.partitions {
            if !marks.iter().any(|(q, _, _)| q == p) {
                bail!("{} has no partition {p}", args.topic);
            }
        }
        marks.retain(|(p, _, _)| args.partitions.contains(p));
    }
    let consumer: BaseConsumer = clients.consumer_config(args.group).create()?;
    refuse_active_members(&consumer, args.group)?;

    let mut tpl = TopicPartitionList::new();
    for (p, _, _) in &marks {
        tpl.add_partition(args.topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, TIMEOUT)
        .context("committed offsets")?;
    let by_time = match args.target {
        Target::Datetime(ms) => Some(offsets_for_time(&reader, args.topic, &marks, ms)?),
        _ => None,
    };
    let rows: Vec<Row> = marks
        .iter()
        .map(|&(p, low, high)| {
            let current = committed
                .find_partition(args.topic, p)
                .and_then(|e| e.offset().to_raw())
                .filter(|o| *o >= 0);
            let t = by_time
                .as_ref()
                .and_then(|v| v.iter().find(|(q, _)| *q == p))
                .and_then(|(_, o)| *o);
            let new = new_offset(args.target, low, high, current, t);
            Row {
                partition: p,
                current,
                new,
                reprocess: high - new,
            }
        })
        .collect();
    print_plan(args.topic, &rows);
    if !args.execute {
        println!("dry run: nothing changed (use --execute to apply)");
        return Ok(ExitCode::SUCCESS);
    }
    let id = new_id();
    let mut commit = TopicPartitionList::new();
    for r in &rows {
        commit
            .add_partition_offset(args.topic, r.partition, Offset::Offset(r.new))
            .context("commit list")?;
        if let Some(mut e) = commit.find_partition(args.topic, r.partition) {
            e.set_metadata(replay::metadata(&id));
        }
    }
    consumer
        .commit(&commit, CommitMode::Sync)
        .with_context(|| format!("committing the new offsets of group {}", args.group))?;
    println!(
        "replay {id}: group {} reset on {} partition(s); its services rebuild their state when they start",
        args.group,
        rows.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Resetting offsets under a running member would be overwritten by its next commit, and a
/// running stateful member would not rebuild its state: refuse, naming the members.
/// The broker's group description (DescribeGroups) decides; a member's client id names its
/// host and pid (`sieve_core::kafka::client_id`).
fn refuse_active_members(consumer: &BaseConsumer, group: &str) -> anyhow::Result<()> {
    let members: Vec<String> = consumer
        .fetch_group_list(Some(group), TIMEOUT)
        .with_context(|| format!("describing group {group}"))?
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .flat_map(|g| g.members())
        .map(|m| {
            format!(
                "{} (client {}, address {})",
                m.id(),
                m.client_id(),
                m.client_host()
            )
        })
        .collect();
    if !members.is_empty() {
        bail!(
            "group {group} has {} active member(s): {}; stop them before replaying",
            members.len(),
            members.join(", ")
        );
    }
    Ok(())
}

/// Per partition, the first offset whose timestamp is at or after `ms` (`None`: none is).
fn offsets_for_time(
    reader: &BaseConsumer,
    topic: &str,
    marks: &[(i32, i64, i64)],
    ms: i64,
) -> anyhow::Result<Vec<(i32, Option<i64>)>> {
    let mut tpl = TopicPartitionList::new();
    for (p, _, _) in marks {
        tpl.add_partition_offset(topic, *p, Offset::Offset(ms))
            .context("offsets-for-times list")?;
    }
    let found = reader
        .offsets_for_times(tpl, TIMEOUT)
        .with_context(|| format!("offsets for times of {topic}"))?;
    Ok(marks
        .iter()
        .map(|(p, _, _)| {
            let o = match found.find_partition(topic, *p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) if o >= 0 => Some(o),
                _ => None,
            };
            (*p, o)
        })
        .collect())
}

/// A replay id no earlier replay of any group used: time and randomness.
fn new_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{ms}-{:08x}", rand::random::<u32>())
}

fn print_plan(topic: &str, rows: &[Row]) {
    println!(
        "{:<40} {:>9} {:>12} {:>12} {:>12}",
        "TOPIC", "PARTITION", "CURRENT", "NEW", "REPROCESS"
    );
    for r in rows {
        let current = r
            .current
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{topic:<40} {:>9} {current:>12} {:>12} {:>12}",
            r.partition, r.new, r.reprocess
        );
    }
    println!(
        "{:<40} {:>9} {:>12} {:>12} {:>12}",
        "TOTAL",
        "",
        "",
        "",
        rows.iter().map(|r| r.reprocess).sum::<i64>()
    );
}

/// Parses an RFC 3339 instant (`2026-11-20T10:00:00Z`) to ms since the epoch.
pub fn parse_datetime(s: &str) -> Result<i64, String> {
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| format!("{s:?}: {e}"))?;
    t.duration_since(UNIX_EPOCH)
        .map_err(|_| format!("{s:?} is before 1970"))
        .and_then(|d| i64::try_from(d.as_millis()).map_err(|e| e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_follow_reset_offsets_semantics_and_are_clamped() {
        let (lo, hi) = (100, 200);
        assert_eq!(new_offset(Target::Earliest, lo, hi, Some(150), None), 100);
        assert_eq!(new_offset(Target::Latest, lo, hi, Some(150), None), 200);
        assert_eq!(new_offset(Target::Offset(120), lo, hi, None, None), 120);
        assert_eq!(new_offset(Target::Offset(5), lo, hi, None, None), 100);
        assert_eq!(new_offset(Target::Offset(999), lo, hi, None, None), 200);
        assert_eq!(
            new_offset(Target::ShiftBy(-30), lo, hi, Some(150), None),
            120
        );
        assert_eq!(
            new_offset(Target::ShiftBy(-80), lo, hi, Some(150), None),
            100
        );
        assert_eq!(new_offset(Target::ShiftBy(10), lo, hi, None, None), 110);
        assert_eq!(
            new_offset(Target::ShiftBy(90), lo, hi, Some(150), None),
            200
        );
        assert_eq!(
            new_offset(Target::Datetime(0), lo, hi, None, Some(170)),
            170
        );
        assert_eq!(new_offset(Target::Datetime(0), lo, hi, None, None), 200);
    }

    #[test]
    fn datetimes_parse_as_utc() {
        assert_eq!(parse_datetime("1970-01-01T00:00:01Z"), Ok(1000));
        assert!(parse_datetime("yesterday").is_err());
    }
}
