//! `sieve ctl topics apply|count`: topics from the declarative topics file, and how many
//! records one holds.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use rdkafka::message::Message;
use sieve_core::config::KafkaArgs;
use sieve_core::kafka::Clients;
use sieve_core::topics::{self, Action, TopicsFile};

use super::watermarks;

#[derive(Debug, Subcommand)]
pub enum TopicsCmd {
    /// Create missing topics; report drift (partitions, replication, configs) of existing
    /// ones, read back from the broker; with --fix, set drifted configs to the file's values.
    Apply {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, default_value = "deploy/topics.toml")]
        file: PathBuf,
        /// Prefix every topic name (isolated test or tenant sets).
        #[arg(long, default_value = "")]
        prefix: String,
        /// Show what would change without creating anything.
        #[arg(long, conflicts_with = "fix")]
        dry_run: bool,
        /// Set configs that differ from the file (partitions and replication are only
        /// reported: changing them moves keys or data).
        #[arg(long)]
        fix: bool,
    },
    /// Number of records in a topic, read from start to end as a `read_committed` consumer
    /// sees them (offsets overcount: transaction markers take offsets, compaction removes
    /// records).
    Count {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long)]
        topic: String,
        /// Read the topic and count distinct keys instead (holds the keys in memory).
        #[arg(long)]
        distinct_keys: bool,
    },
}

pub fn run(cmd: TopicsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TopicsCmd::Apply {
            kafka,
            file,
            prefix,
            dry_run,
            fix,
        } => {
            let mode = match (dry_run, fix) {
                (true, _) => topics::Mode::DryRun,
                (_, true) => topics::Mode::Fix,
                _ => topics::Mode::Create,
            };
            apply(kafka, &file, &prefix, mode)
        }
        TopicsCmd::Count {
            kafka,
            topic,
            distinct_keys,
        } => count(kafka, &topic, distinct_keys),
    }
}

pub fn apply(
    kafka: KafkaArgs,
    file: &Path,
    prefix: &str,
    mode: topics::Mode,
) -> anyhow::Result<ExitCode> {
    let desired = TopicsFile::load(file)?.desired(prefix)?;
    let clients = Clients::new(kafka);
    clients.check_reachable()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reports = rt
        .block_on(topics::apply(&clients, &desired, mode))
        .context("applying topics")?;
    let mut drifted = 0;
    println!("{:<32} RESULT", "TOPIC");
    for r in &reports {
        let what = match &r.action {
            Action::Created => "created".to_string(),
            Action::WouldCreate => "would create".to_string(),
            Action::UpToDate => "up to date".to_string(),
            Action::Fixed(d) => format!("fixed: {}", d.join("; ")),
            Action::Drift(d) => {
                drifted += 1;
                format!("DRIFT: {}", d.join("; "))
            }
        };
        println!("{:<32} {what}", r.topic);
    }
    // Drift that remains (partitions and replication are never changed here; configs without
    // --fix): exit 3 lets scripts notice.
    Ok(if drifted > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn count(kafka: KafkaArgs, topic: &str, distinct_keys: bool) -> anyhow::Result<ExitCode> {
    let clients = Clients::new(kafka);
    clients.check_reachable()?;
    let reader = clients.reader()?;
    let marks = watermarks(&clients, &reader, topic)?;
    // Records, not offsets: a transaction's commit marker takes an offset and an aborted
    // transaction's records are never read; compaction leaves gaps.
    let mut records = 0u64;
    let mut keys: HashSet<Vec<u8>> = HashSet::new();
    for (p, lo, hi) in marks {
        sieve_core::read::read_range(&reader, topic, p, lo, hi, Duration::from_secs(30), |m| {
            records += 1;
            if distinct_keys {
                keys.insert(m.key().unwrap_or_default().to_vec());
            }
            Ok(())
        })?;
    }
    println!(
        "{}",
        if distinct_keys {
            keys.len() as u64
        } else {
            records
        }
    );
    Ok(ExitCode::SUCCESS)
}
