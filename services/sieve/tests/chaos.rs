//! The chaos runs: the whole pipeline as child processes under SIGKILLs of services
//! (some with the state directory deleted, some with a second instance forcing a
//! rebalance), SIGKILLs of brokers and, on a 3-node cluster, zombies; then the
//! reconciliation from the topics. `SIEVE_CHAOS_SEED` repeats a run; the long version is
//! `sieve-chaos` (docs/chaos.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};
use sieve_tests::chaos::{self, Config};

/// A run with the CI's load; a failure prints its seed, and `SIEVE_CHAOS_SEED=<seed>`
/// repeats the same schedule of faults.
fn config(duration: Duration, kills: u32) -> Result<Config> {
    let seed = match std::env::var("SIEVE_CHAOS_SEED") {
        Ok(s) => s.parse()?,
        Err(_) => rand::random(),
    };
    let mut cfg = Config::new(
        PathBuf::from(env!("CARGO_BIN_EXE_sieve")),
        seed,
        duration,
        kills,
    );
    cfg.rate = 100;
    cfg.followers = 300;
    cfg.drain_timeout = Duration::from_secs(240);
    // Logs and state are kept there (a temporary directory otherwise).
    cfg.work_dir = std::env::var_os("SIEVE_CHAOS_WORK_DIR").map(PathBuf::from);
    Ok(cfg)
}

fn passes(cfg: &Config) -> Result<()> {
    let verdict = chaos::run(cfg)?;
    eprintln!("{}", verdict.line());
    ensure!(
        verdict.passed(),
        "{}\n{}",
        verdict.line(),
        verdict.differences.join("\n")
    );
    let f = &verdict.faults;
    ensure!(
        f.kills >= cfg.kills && f.broker_kills == cfg.broker_kills && f.zombies == cfg.zombies,
        "faults short of the plan: {f:?}"
    );
    Ok(())
}

/// One node, the services' default guarantee: 24 service kills and 2 broker kills in two
/// minutes.
#[test]
fn pipeline_survives_service_and_broker_kills() -> Result<()> {
    let mut cfg = config(Duration::from_secs(120), 24)?;
    cfg.broker_kills = 2;
    passes(&cfg)
}

/// Three nodes under transactions: 20 service kills, 3 node kills (the leader of dedup's
/// output, dedup's transaction coordinator, any node) and 2 zombies. Not in CI yet: it passed
/// 2 of 4 runs; seed 4810852264367125949 failed twice (the notify planner left one request
/// unconsumed; rerun, dedup stalled) and passed on its third run (docs/chaos.md).
#[test]
#[ignore = "passed 2 of 4 runs (once a stalled planner, once a stalled dedup); --run-ignored only"]
fn a_cluster_survives_node_kills_and_zombies_under_transactions() -> Result<()> {
    let mut cfg = config(Duration::from_secs(150), 20)?;
    cfg.nodes = 3;
    cfg.broker_kills = 3;
    cfg.zombies = 2;
    cfg.guarantee = Some("exactly-once".into());
    passes(&cfg)
}
