//! The long-running services' subcommands. Every processor takes the same trio: its own
//! settings, how to reach Kafka, and the settings every processor shares.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use sieve_core::config::{KafkaArgs, ServiceArgs};

/// A processor's command line: its own settings (`A`), Kafka, and the shared service
/// settings (group, state, telemetry, batching).
#[derive(Debug, Clone, Args)]
pub struct Service<A: Args> {
    #[command(flatten)]
    pub args: A,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
}

impl<A: Args> Service<A> {
    /// Runs the processor `run` until it stops.
    pub fn run<E>(
        self,
        run: impl FnOnce(&KafkaArgs, &ServiceArgs, A) -> Result<(), E>,
    ) -> anyhow::Result<ExitCode>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        run(&self.kafka, &self.service, self.args)?;
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(Debug, Subcommand)]
pub enum IngestCmd {
    /// HTTP API: POST /v1/events/{stream}; 202 only after the broker acknowledged.
    Serve(Box<sieve_ingest::ServeArgs>),
    /// Bulk loader: NDJSON or JSON-array files, constant memory, resumable.
    File(Box<sieve_ingest::FileArgs>),
}

impl IngestCmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            IngestCmd::Serve(args) => {
                sieve_ingest::serve::run(&args)?;
                Ok(ExitCode::SUCCESS)
            }
            IngestCmd::File(args) => ingest_file(&args),
        }
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

#[derive(Debug, Subcommand)]
pub enum AntijoinCmd {
    /// Over topics, continuously: the output is a compacted view of left keys without a
    /// right match (or an append-only stream).
    Stream(Service<sieve_antijoin::stream::StreamArgs>),
    /// Over files: streaming, multi-core, memory independent of the left input's size.
    Files(sieve_antijoin::files::FilesArgs),
}

impl AntijoinCmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            AntijoinCmd::Stream(s) => s.run(sieve_antijoin::stream::run),
            AntijoinCmd::Files(args) => {
                let summary = sieve_antijoin::files::run(&args)?;
                summary.print(&mut std::io::stderr())?;
                if summary.error_rate() > args.max_error_rate {
                    eprintln!(
                        "error: {:.2} % of the records had no usable key (limit {:.2} %: \
                         --max-error-rate): {:?}; is --key {} right?",
                        summary.error_rate() * 100.0,
                        args.max_error_rate * 100.0,
                        summary.rejected,
                        args.key
                    );
                    return Ok(ExitCode::from(2));
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum NotifyCmd {
    /// Expand requests (listed users or an author's followers) into recipient tasks.
    Planner(Service<sieve_notify::PlannerArgs>),
    /// Deliver tasks: preferences, quiet hours, relevance, rate limits, dedup, kill switch.
    Deliver(Service<sieve_notify::DelivererArgs>),
    /// Gateway reports (delivered, opened, clicked, failed, invalid token) into counts, dead
    /// letters and token invalidations.
    Feedback(Service<sieve_notify::FeedbackArgs>),
}

impl NotifyCmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            NotifyCmd::Planner(s) => s.run(sieve_notify::run_planner),
            NotifyCmd::Deliver(s) => s.run(sieve_notify::run_deliverer),
            NotifyCmd::Feedback(s) => s.run(sieve_notify::run_feedback),
        }
    }
}
