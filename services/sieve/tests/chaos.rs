//! The short chaos run in CI: the whole pipeline as child processes, 24 SIGKILLs of services
//! (some with the state directory deleted, some with a second instance forcing a rebalance)
//! and 2 SIGKILLs of the broker within two minutes, then the reconciliation from the topics.
//! `SIEVE_CHAOS_SEED` repeats a run; the long version is `sieve-chaos` (docs/chaos.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};
use sieve_tests::chaos::{self, Config};

// A failure prints its seed; `SIEVE_CHAOS_SEED=<seed>` repeats the same schedule of kills.
#[test]
fn pipeline_survives_service_and_broker_kills() -> Result<()> {
    let seed = match std::env::var("SIEVE_CHAOS_SEED") {
        Ok(s) => s.parse()?,
        Err(_) => rand::random(),
    };
    let mut cfg = Config::new(
        PathBuf::from(env!("CARGO_BIN_EXE_sieve")),
        seed,
        Duration::from_secs(120),
        24,
    );
    cfg.broker_kills = 2;
    cfg.rate = 100;
    cfg.followers = 300;
    cfg.drain_timeout = Duration::from_secs(240);
    let verdict = chaos::run(&cfg)?;
    eprintln!("{}", verdict.line());
    ensure!(
        verdict.passed(),
        "{}\n{}",
        verdict.line(),
        verdict.differences.join("\n")
    );
    ensure!(verdict.faults.kills >= 20 && verdict.faults.broker_kills == 2);
    Ok(())
}
