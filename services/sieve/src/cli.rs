//! The `sieve` command line: one subcommand per service, plus `all` and `ctl`. Each
//! subcommand's module owns its options and its `run`; this module only names them, finds
//! the log format, and dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sieve_core::config::LogFormat;

use crate::all::AllArgs;
use crate::ctl::CtlCmd;
use crate::service::{AntijoinCmd, IngestCmd, NotifyCmd, Service};

#[derive(Debug, Parser)]
#[command(
    name = "sieve",
    version,
    about = "Kafka-native ingest, dedup, anti-join and notification fan-out"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every service of the pipeline (ingest, dedup, anti-join, notify planner and deliverer)
    /// under one supervisor: restarts, one readiness, one SIGTERM.
    All(Box<AllArgs>),
    /// Drop retries by idempotency key inside a TTL window, exactly once.
    Dedup(Box<Service<sieve_dedup::DedupArgs>>),
    /// Take records in over HTTP or from files: validated, keyed, acknowledged.
    #[command(subcommand)]
    Ingest(IngestCmd),
    /// Anti-join: left records whose key has no match on the right.
    #[command(subcommand)]
    Antijoin(AntijoinCmd),
    /// Notification fan-out with strict priorities.
    #[command(subcommand)]
    Notify(NotifyCmd),
    /// Operate a sieve deployment: topics, generators.
    #[command(subcommand)]
    Ctl(CtlCmd),
}

impl Cli {
    /// How the command logs: long-running services as configured, one-shot tools as text.
    pub fn log_format(&self) -> LogFormat {
        match &self.command {
            Command::All(a) => a.log_format,
            Command::Ingest(IngestCmd::Serve(a)) => a.log_format,
            Command::Dedup(s) => s.service.log_format,
            Command::Antijoin(AntijoinCmd::Stream(s)) => s.service.log_format,
            Command::Notify(NotifyCmd::Planner(s)) => s.service.log_format,
            Command::Notify(NotifyCmd::Deliver(s)) => s.service.log_format,
            Command::Notify(NotifyCmd::Feedback(s)) => s.service.log_format,
            Command::Ingest(IngestCmd::File(_))
            | Command::Antijoin(AntijoinCmd::Files(_))
            | Command::Ctl(_) => LogFormat::Text,
        }
    }

    /// Runs the command; the exit code is the command's own (e.g. 3 for topics that drift).
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::All(args) => crate::all::run(*args),
            Command::Dedup(s) => s.run(sieve_dedup::run),
            Command::Ingest(cmd) => cmd.run(),
            Command::Antijoin(cmd) => cmd.run(),
            Command::Notify(cmd) => cmd.run(),
            Command::Ctl(cmd) => crate::ctl::run(cmd),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::error::ErrorKind;
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sieve").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_are_humantime() {
        let cli = parse(&[
            "dedup",
            "--group",
            "g",
            "--batch-linger",
            "5ms",
            "--group-stall",
            "30s",
            "--connect-timeout",
            "2s",
        ])
        .unwrap();
        let Command::Dedup(s) = cli.command else {
            panic!("not dedup: {cli:?}");
        };
        assert_eq!(s.service.batch_linger, Duration::from_millis(5));
        assert_eq!(s.service.group_stall, Duration::from_secs(30));
        assert_eq!(s.kafka.connect_timeout, Duration::from_secs(2));
        assert!(parse(&["dedup", "--group", "g", "--batch-linger", "5"]).is_err());
    }

    #[test]
    fn defaults_keep_their_values() {
        let Command::Notify(NotifyCmd::Planner(s)) = parse(&["notify", "planner", "--group", "g"])
            .unwrap()
            .command
        else {
            panic!("not the planner");
        };
        assert_eq!(s.service.batch_linger, Duration::from_millis(50));
        assert_eq!(s.service.group_stall, Duration::from_secs(60));
        assert_eq!(s.kafka.connect_timeout, Duration::from_secs(10));
        let Command::Ingest(IngestCmd::Serve(a)) = parse(&["ingest", "serve"]).unwrap().command
        else {
            panic!("not ingest serve");
        };
        assert_eq!(a.ack_timeout, Duration::from_secs(10));
        assert_eq!(a.body_timeout, Duration::from_secs(30));
        assert_eq!(a.drain_timeout, Duration::from_secs(30));
        assert_eq!(a.streams.dlq, "dlq.ingest");
    }

    #[test]
    fn old_flags_are_gone() {
        for args in [
            &["dedup", "--group", "g", "--batch-linger-ms", "5"][..],
            &["dedup", "--group", "g", "--group-stall-s", "30"],
            &["dedup", "--group", "g", "--connect-timeout-ms", "500"],
            &["ingest", "serve", "--ack-timeout-ms", "500"],
            &["ingest", "serve", "--body-timeout-ms", "500"],
            &["ingest", "serve", "--drain-timeout-ms", "500"],
            &["ingest", "serve", "--dlq-topic", "d"],
            &[
                "ingest",
                "file",
                "--stream",
                "s",
                "--log-every-secs",
                "5",
                "f",
            ],
        ] {
            let e = parse(args).expect_err(&args.join(" "));
            assert_eq!(e.kind(), ErrorKind::UnknownArgument, "{}", args.join(" "));
        }
    }

    #[test]
    fn every_service_names_its_dlq_with_dlq() {
        let Command::Ingest(IngestCmd::File(a)) = parse(&[
            "ingest",
            "file",
            "--stream",
            "s",
            "--dlq",
            "d",
            "--log-every",
            "2s",
            "f",
        ])
        .unwrap()
        .command
        else {
            panic!("not ingest file");
        };
        assert_eq!(a.streams.dlq, "d");
        assert_eq!(a.log_every, Duration::from_secs(2));
        assert!(parse(&["dedup", "--group", "g", "--dlq", "d"]).is_ok());
        assert!(parse(&["notify", "deliver", "--group", "g", "--dlq", "d"]).is_ok());
        assert!(parse(&["antijoin", "stream", "--group", "g", "--dlq", "d"]).is_ok());
    }

    #[test]
    fn users_side_is_a_closed_choice() {
        assert!(parse(&["ctl", "gen", "users", "--side", "legacy"]).is_ok());
        assert!(parse(&["ctl", "gen", "users", "--side", "current"]).is_ok());
        let e = parse(&["ctl", "gen", "users", "--side", "old"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidValue);
    }

    #[test]
    fn services_log_as_configured_and_tools_as_text() {
        let json = parse(&["dedup", "--group", "g", "--log-format", "json"]).unwrap();
        assert_eq!(json.log_format(), LogFormat::Json);
        let planner = parse(&["notify", "feedback", "--group", "g", "--log-format", "json"]);
        assert_eq!(planner.unwrap().log_format(), LogFormat::Json);
        let tool = parse(&["ctl", "lag", "--group", "g", "--topic", "t"]).unwrap();
        assert_eq!(tool.log_format(), LogFormat::Text);
    }
}
