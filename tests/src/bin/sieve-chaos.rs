//! `sieve-chaos`: the pipeline under SIGKILLs of its services and of the broker, then a
//! reconciliation from the topics. Prints a one-line verdict; exits 1 on any difference.
//! See docs/chaos.md.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use sieve_tests::chaos::{self, Config};

#[derive(Parser)]
#[command(about = "Chaos run of the sieve pipeline on a local Kafka node or cluster")]
struct Args {
    /// Seed of every random choice; printed, so a failing run can be repeated.
    #[arg(long)]
    seed: Option<u64>,
    /// How long faults are injected, e.g. 2m, 20m.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// SIGKILLs of services.
    #[arg(long, default_value_t = 24)]
    kills: u32,
    /// SIGKILLs of a broker (restarted on the same ports and data). On a cluster the first
    /// kills the leader of dedup's output, the second dedup's transaction coordinator.
    #[arg(long, default_value_t = 2)]
    broker_kills: u32,
    /// Kafka nodes: 1, or a cluster (3: replication 3, min.insync.replicas=2).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Zombies: a group member frozen (SIGSTOP) past its session while a second instance
    /// takes its partitions, then resumed.
    #[arg(long, default_value_t = 0)]
    zombies: u32,
    /// The services' --guarantee (their default when not given).
    #[arg(long)]
    guarantee: Option<String>,
    /// Events per second posted to ingest.
    #[arg(long, default_value_t = 150)]
    rate: u32,
    /// Followers of each fan-out author.
    #[arg(long, default_value_t = 400)]
    followers: u32,
    /// Deadline for the pipeline to drain and reconcile after the faults stop.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// The `sieve` binary (default: next to this one).
    #[arg(long)]
    sieve_bin: Option<PathBuf>,
    /// Keep logs and state here instead of a temporary directory.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let sieve_bin = match a.sieve_bin {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("the binary's directory")?
            .join("sieve"),
    };
    let seed = a.seed.unwrap_or_else(rand::random);
    let mut cfg = Config::new(sieve_bin, seed, a.duration, a.kills);
    cfg.broker_kills = a.broker_kills;
    cfg.nodes = a.nodes;
    cfg.zombies = a.zombies;
    cfg.guarantee = a.guarantee;
    cfg.rate = a.rate;
    cfg.followers = a.followers;
    cfg.drain_timeout = a.drain_timeout;
    cfg.work_dir = a.work_dir;
    let verdict = chaos::run(&cfg)?;
    println!("{}", verdict.line());
    if !verdict.passed() {
        for d in &verdict.differences {
            println!("  {d}");
        }
        std::process::exit(1);
    }
    Ok(())
}
