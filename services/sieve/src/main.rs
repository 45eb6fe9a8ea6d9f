//! `sieve`: every service of the pipeline and the operator's tool, in one binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sieve::ctl;
use sieve::dlq;
use sieve::gen::{self, EventSpec, UsersSpec};
use sieve::replay::{self, Target};
use sieve_core::config::{KafkaArgs, KafkaProperty, LogFormat, ServiceArgs};
use sieve_core::topics;
use sieve_dedup::DedupArgs;

#[derive(Debug, Parser)]
#[command(
    name = "sieve",
    version,
    about = "Kafka-native ingest, dedup, anti-join and notification fan-out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every service of the pipeline (ingest, dedup, anti-join, notify planner and deliverer)
    /// under one supervisor: restarts, one readiness, one SIGTERM.
    All(Box<sieve::all::AllArgs>),
    /// Drop retries by idempotency key inside a TTL window, exactly once.
    Dedup {
        #[command(flatten)]
        dedup: DedupArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Take records in over HTTP or from files: validated, keyed, acknowledged.
    Ingest {
        #[command(subcommand)]
        command: IngestCmd,
    },
    /// Anti-join: left records whose key has no match on the right.
    Antijoin {
        #[command(subcommand)]
        command: AntijoinCmd,
    },
    /// Notification fan-out with strict priorities.
    Notify {
        #[command(subcommand)]
        command: NotifyCmd,
    },
    /// Operate a sieve deployment: topics, generators.
    Ctl {
        #[command(subcommand)]
        command: Ctl,
    },
}

#[derive(Debug, Subcommand)]
enum IngestCmd {
    /// HTTP API: POST /v1/events/{stream}; 202 only after the broker acknowledged.
    Serve(Box<sieve_ingest::ServeArgs>),
    /// Bulk loader: NDJSON or JSON-array files, constant memory, resumable.
    File(Box<sieve_ingest::FileArgs>),
}

#[derive(Debug, Subcommand)]
enum AntijoinCmd {
    /// Over topics, continuously: the output is a compacted view of left keys without a
    /// right match (or an append-only stream).
    Stream {
        #[command(flatten)]
        stream: sieve_antijoin::stream::StreamArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Over files: streaming, multi-core, memory independent of the left input's size.
    Files(sieve_antijoin::files::FilesArgs),
}

#[derive(Debug, Subcommand)]
enum NotifyCmd {
    /// Expand requests (listed users or an author's followers) into recipient tasks.
    Planner {
        #[command(flatten)]
        planner: sieve_notify::PlannerArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Deliver tasks: preferences, quiet hours, relevance, rate limits, dedup, kill switch.
    Deliver {
        #[command(flatten)]
        deliver: sieve_notify::DelivererArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Gateway reports (delivered, opened, clicked, failed, invalid token) into counts, dead
    /// letters and token invalidations.
    Feedback {
        #[command(flatten)]
        feedback: sieve_notify::FeedbackArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        service: ServiceArgs,
    },
}

#[derive(Debug, Subcommand)]
enum Ctl {
    /// Topics from the declarative topics file.
    Topics {
        #[command(subcommand)]
        command: TopicsCmd,
    },
    /// Deterministic data for demos, tests and benchmarks.
    Gen {
        #[command(subcommand)]
        command: GenCmd,
    },
    /// Produce NDJSON from stdin, one record per line, keyed by a JSON pointer.
    Produce {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long)]
        topic: String,
        /// JSON pointer of the record key (for example /id); no key when absent.
        #[arg(long)]
        key_pointer: Option<String>,
    },
    /// Per partition: committed offset of a group, end offset, lag; and the total.
    Lag {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long)]
        group: String,
        #[arg(long)]
        topic: String,
        /// Print only the total lag (for scripts).
        #[arg(long)]
        total: bool,
    },
    /// Rewind a stopped consumer group (like `kafka-consumer-groups --reset-offsets`); its
    /// stateful services rebuild their state for the replay when they start.
    Replay(ReplayArgs),
    /// Dead-letter topics: reasons with counts, records, redrive.
    Dlq {
        #[command(subcommand)]
        command: DlqCmd,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCmd {
    /// Reasons with counts and first and last times.
    List(DlqArgs),
    /// Records: offset, reason, detail, source, payload preview.
    Show(DlqArgs),
    /// Re-publish original bytes and headers to the source topic (or --to-topic), each DLQ
    /// record at most once.
    Redrive {
        #[command(flatten)]
        args: DlqArgs,
        /// Destination instead of each record's source topic.
        #[arg(long)]
        to_topic: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
struct DlqArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// The DLQ topic, e.g. dlq.dedup.
    #[arg(long)]
    topic: String,
    /// Only records with this reason (the sieve-dlq-reason header).
    #[arg(long)]
    reason: Option<String>,
    /// Only records dead-lettered at or after this instant (RFC 3339).
    #[arg(long, value_parser = sieve::replay::parse_datetime)]
    since: Option<i64>,
    /// Only records dead-lettered before this instant (RFC 3339).
    #[arg(long, value_parser = sieve::replay::parse_datetime)]
    to: Option<i64>,
    /// At most this many records.
    #[arg(long)]
    limit: Option<usize>,
}

impl DlqArgs {
    fn filter(&self) -> dlq::Filter {
        dlq::Filter {
            reason: self.reason.clone(),
            since: self.since,
            to: self.to,
            limit: self.limit,
        }
    }
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to_earliest", "to_latest", "to_datetime", "to_offset", "shift_by"])))]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["dry_run", "execute"])))]
struct ReplayArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[arg(long)]
    group: String,
    #[arg(long)]
    topic: String,
    /// Only these partitions (comma separated); all by default.
    #[arg(long, value_delimiter = ',')]
    partitions: Vec<i32>,
    #[arg(long)]
    to_earliest: bool,
    #[arg(long)]
    to_latest: bool,
    /// The first record at or after this instant (RFC 3339, e.g. 2026-11-20T10:00:00Z).
    #[arg(long, value_parser = sieve::replay::parse_datetime)]
    to_datetime: Option<i64>,
    #[arg(long)]
    to_offset: Option<i64>,
    /// Move the committed offset by N (negative: back).
    #[arg(long, allow_hyphen_values = true)]
    shift_by: Option<i64>,
    /// Print the plan, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Commit the new offsets.
    #[arg(long)]
    execute: bool,
}

impl ReplayArgs {
    fn target(&self) -> Target {
        match (self.to_datetime, self.to_offset, self.shift_by) {
            (Some(t), _, _) => Target::Datetime(t),
            (_, Some(o), _) => Target::Offset(o),
            (_, _, Some(n)) => Target::ShiftBy(n),
            _ if self.to_latest => Target::Latest,
            _ => Target::Earliest,
        }
    }
}

#[derive(Debug, Subcommand)]
enum TopicsCmd {
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

#[derive(Debug, Subcommand)]
enum GenCmd {
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
    Events {
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        #[arg(long, default_value_t = 0.2)]
        retry_rate: f64,
        #[arg(long, default_value_t = 0.01)]
        conflict_rate: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Produce to this topic (key and `idempotency-key` header = event id) instead of
        /// printing NDJSON.
        #[arg(long)]
        topic: Option<String>,
        /// Print only how many events are new, retries and conflicts.
        #[arg(long)]
        summary: bool,
        /// Another header on every produced record, `name=value` (repeatable).
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<KafkaProperty>,
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// Legacy and current user exports with a hot `guest` key (the anti-join's inputs).
    Users {
        /// Which side to write.
        #[arg(long, value_parser = ["legacy", "current"])]
        side: String,
        #[arg(long, default_value_t = 100_000)]
        legacy: u64,
        /// Distinct ids on the legacy side.
        #[arg(long, default_value_t = 80_000)]
        ids: u64,
        #[arg(long, default_value_t = 0.05)]
        guest_share: f64,
        #[arg(long, default_value_t = 0.1)]
        current_share: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// One JSON array instead of NDJSON.
        #[arg(long)]
        array: bool,
        /// Output file (default stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        Command::Dedup { service, .. }
        | Command::Antijoin {
            command: AntijoinCmd::Stream { service, .. },
        }
        | Command::Notify {
            command:
                NotifyCmd::Planner { service, .. }
                | NotifyCmd::Deliver { service, .. }
                | NotifyCmd::Feedback { service, .. },
        } => service.log_format,
        Command::Ingest {
            command: IngestCmd::Serve(args),
        } => args.log_format,
        Command::All(args) => args.log_format,
        Command::Ctl { .. } | Command::Antijoin { .. } | Command::Ingest { .. } => LogFormat::Text,
    };
    sieve_core::telemetry::init_logs(format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::All(args) => sieve::all::run(*args),
        Command::Dedup {
            dedup,
            kafka,
            service,
        } => {
            sieve_dedup::run(&kafka, &service, dedup)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ingest {
            command: IngestCmd::Serve(args),
        } => {
            sieve_ingest::serve::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ingest {
            command: IngestCmd::File(args),
        } => ingest_file(&args),
        Command::Antijoin {
            command:
                AntijoinCmd::Stream {
                    stream,
                    kafka,
                    service,
                },
        } => {
            sieve_antijoin::stream::run(&kafka, &service, stream)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Notify { command } => {
            match command {
                NotifyCmd::Planner {
                    planner,
                    kafka,
                    service,
                } => sieve_notify::run_planner(&kafka, &service, planner)?,
                NotifyCmd::Deliver {
                    deliver,
                    kafka,
                    service,
                } => sieve_notify::run_deliverer(&kafka, &service, deliver)?,
                NotifyCmd::Feedback {
                    feedback,
                    kafka,
                    service,
                } => sieve_notify::run_feedback(&kafka, &service, feedback)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Antijoin {
            command: AntijoinCmd::Files(args),
        } => {
            let summary = sieve_antijoin::files::run(&args)?;
            summary.print(&mut std::io::stderr())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ctl { command } => match command {
            Ctl::Topics {
                command:
                    TopicsCmd::Apply {
                        kafka,
                        file,
                        prefix,
                        dry_run,
                        fix,
                    },
            } => {
                let mode = match (dry_run, fix) {
                    (true, _) => topics::Mode::DryRun,
                    (_, true) => topics::Mode::Fix,
                    _ => topics::Mode::Create,
                };
                ctl::topics_apply(kafka, &file, &prefix, mode)
            }
            Ctl::Topics {
                command:
                    TopicsCmd::Count {
                        kafka,
                        topic,
                        distinct_keys,
                    },
            } => ctl::count(kafka, &topic, distinct_keys),
            Ctl::Lag {
                kafka,
                group,
                topic,
                total,
            } => ctl::lag(kafka, &group, &topic, total),
            Ctl::Dlq {
                command: DlqCmd::List(a),
            } => dlq::list(a.kafka.clone(), &a.topic, &a.filter()),
            Ctl::Dlq {
                command: DlqCmd::Show(a),
            } => dlq::show(a.kafka.clone(), &a.topic, &a.filter()),
            Ctl::Dlq {
                command: DlqCmd::Redrive { args: a, to_topic },
            } => dlq::redrive(a.kafka.clone(), &a.topic, &a.filter(), to_topic.as_deref()),
            Ctl::Replay(args) => {
                let target = args.target();
                replay::run(
                    args.kafka,
                    &replay::Args {
                        group: &args.group,
                        topic: &args.topic,
                        partitions: &args.partitions,
                        target,
                        execute: args.execute,
                    },
                )
            }
            Ctl::Produce {
                kafka,
                topic,
                key_pointer,
            } => ctl::produce_ndjson(
                kafka,
                &topic,
                key_pointer.as_deref(),
                std::io::stdin().lock(),
            ),
            Ctl::Gen {
                command:
                    GenCmd::Events {
                        count,
                        retry_rate,
                        conflict_rate,
                        seed,
                        topic,
                        summary,
                        headers,
                        kafka,
                    },
            } => {
                let spec = EventSpec {
                    count,
                    retry_rate,
                    conflict_rate,
                    seed,
                    ..Default::default()
                };
                match (topic, summary) {
                    (_, true) => ctl::summarise_events(spec),
                    (Some(t), false) => ctl::produce_events(kafka, &t, spec, &headers),
                    (None, false) => ctl::print_events(spec),
                }
            }
            Ctl::Gen {
                command: GenCmd::Follows { author, followers },
            } => ctl::print_records(gen::follows(&author, followers)),
            Ctl::Gen {
                command: GenCmd::Prefs { users, seed },
            } => ctl::print_records(gen::prefs(users, &now_rfc3339(), seed)),
            Ctl::Gen {
                command:
                    GenCmd::Notifications {
                        priority,
                        count,
                        author,
                    },
            } => ctl::print_records(gen::notifications(priority, count, &author, &now_rfc3339())),
            Ctl::Gen {
                command:
                    GenCmd::Users {
                        side,
                        legacy,
                        ids,
                        guest_share,
                        current_share,
                        seed,
                        array,
                        out,
                    },
            } => {
                let spec = UsersSpec {
                    legacy,
                    ids,
                    guest_share,
                    current_share,
                    seed,
                };
                ctl::write_users(&spec, side == "legacy", array, out.as_deref())
            }
        },
    }
}

/// Runs the loader, prints the summary (JSON on stdout, a line on stderr), and fails with
/// exit code 2 when the share of rejected records is above `--max-error-rate`.
fn ingest_file(args: &sieve_ingest::FileArgs) -> anyhow::Result<ExitCode> {
    let summary = sieve_ingest::file::run(args)?;
    println!("{}", serde_json::to_string(&summary)?);
    eprintln!(
        "read {} records ({} skipped by the checkpoint), accepted {}, rejected {} {:?}, {:.1} s{}",
        summary.read,
        summary.skipped,
        summary.accepted,
        summary.rejected,
        summary.rejected_by_reason,
        summary.seconds,
        if summary.dry_run { " (dry run)" } else { "" }
    );
    if summary.error_rate() > args.max_error_rate {
        eprintln!(
            "error: {:.2} % of the records were rejected (limit {:.2} %); see the DLQ",
            summary.error_rate() * 100.0,
            args.max_error_rate * 100.0
        );
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}
