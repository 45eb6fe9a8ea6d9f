//! The chaos runner: the whole pipeline (ingest → dedup → anti-join, and notify) as child
//! processes on one Kafka node or a cluster, a workload whose exact answer is known, SIGKILLs
//! of random services at random moments (sometimes with the state directory deleted,
//! sometimes with a second instance forcing a rebalance), zombies (a member frozen with
//! SIGSTOP past its session while a second instance takes its partitions), SIGKILLs of
//! brokers, and at the end a reconciliation read from the topics with a `read_committed`
//! consumer.
//!
//! `sieve-chaos` (tests/src/bin) is the command; services/sieve/tests/chaos.rs runs a short
//! version in CI. See docs/chaos.md.

mod brokers;
mod fleet;
mod reconcile;
mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use brokers::{Brokers, Targets};
use fleet::Fleet;
pub use reconcile::Verdict;
use workload::{EventDriver, NotifyPlan, RightPlan, Topics};

/// What one chaos run does.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `sieve` binary.
    pub sieve_bin: PathBuf,
    /// The JSON Schemas ingest validates against (the repository's `schemas/`).
    pub schemas: PathBuf,
    pub seed: u64,
    /// How long faults are injected while the workload runs.
    pub duration: Duration,
    /// SIGKILLs of services during `duration`.
    pub kills: u32,
    /// SIGKILLs (and restarts on the same ports and data) of a broker during `duration`.
    pub broker_kills: u32,
    /// Kafka nodes: 1, or a cluster (replication 3, `min.insync.replicas=2`).
    pub nodes: usize,
    /// Members frozen (SIGSTOP) past their session while a second instance takes over.
    pub zombies: u32,
    /// `--guarantee` of the services (`SIEVE_GUARANTEE`); their default when `None`.
    pub guarantee: Option<String>,
    /// Events posted to ingest per second (each batch holds some repeats and conflicts).
    pub rate: u32,
    /// Followers of each of the three fan-out authors.
    pub followers: u32,
    /// Deadline for lag to reach zero and the topics to reconcile after the faults stop.
    pub drain_timeout: Duration,
    /// Where logs and state go; a temporary directory (removed at the end) when `None`.
    pub work_dir: Option<PathBuf>,
}

impl Config {
    /// A run of `duration` with `kills` service kills and `broker_kills` broker kills.
    pub fn new(sieve_bin: PathBuf, seed: u64, duration: Duration, kills: u32) -> Config {
        Config {
            sieve_bin,
            schemas: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas"),
            seed,
            duration,
            kills,
            broker_kills: 0,
            nodes: 1,
            zombies: 0,
            guarantee: None,
            rate: 150,
            followers: 400,
            drain_timeout: Duration::from_secs(300),
            work_dir: None,
        }
    }
}

/// Counts of the faults injected.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    pub kills: u32,
    pub restarts: u32,
    pub state_wipes: u32,
    pub rebalances: u32,
    pub broker_kills: u32,
    pub zombies: u32,
    /// Services that exited without being killed (each is a failure).
    pub unexpected_exits: Vec<String>,
}

/// One fault, chosen per step.
enum Action {
    Kill { wipe: bool, second: bool },
    BrokerKill,
    Zombie,
}

/// Runs the pipeline under faults and reconciles; the verdict lists every difference.
pub fn run(cfg: &Config) -> Result<Verdict> {
    eprintln!(
        "chaos: seed={} duration={:?} kills={} broker_kills={} zombies={} nodes={} guarantee={} rate={}/s",
        cfg.seed,
        cfg.duration,
        cfg.kills,
        cfg.broker_kills,
        cfg.zombies,
        cfg.nodes,
        cfg.guarantee.as_deref().unwrap_or("default"),
        cfg.rate
    );
    let tmp = tempfile::tempdir()?;
    let dir = match &cfg.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    let mut rng = Pcg64Mcg::seed_from_u64(cfg.seed);
    let mut brokers = Brokers::start(cfg.nodes)?;
    let broker = brokers.helpers();
    let topics = Topics::create(broker)?;
    let right = RightPlan::new(&mut rng);
    let mut notify = NotifyPlan::new(cfg.followers);
    right.initial(broker, &topics)?;
    notify.follows(broker, &topics)?;
    let mut fleet = Fleet::start(cfg, broker, &topics, &dir)?;
    let targets = Targets {
        written: topics.unique.clone(),
        transactional_id: fleet.transactional_id("dedup")?,
    };

    let stop = Arc::new(AtomicBool::new(false));
    let driver = EventDriver::start(fleet.ingest_url(), cfg.rate, rng.random(), stop.clone());
    let mut faults = Faults::default();
    let steps = cfg.kills + cfg.broker_kills + cfg.zombies;
    let plan = schedule(&mut rng, cfg.kills, cfg.broker_kills, cfg.zombies);
    let start = Instant::now();
    let step = cfg.duration / steps.max(1);
    for (i, action) in plan.into_iter().enumerate() {
        // Faults land at random moments: each step waits 30–170 % of the mean interval,
        // clamped so the run stays inside its duration.
        let due = (step * i as u32 + step.mul_f64(rng.random_range(0.3..1.7)))
            .min(cfg.duration.saturating_sub(Duration::from_millis(500)));
        fleet.watch_until(start + due, &mut faults)?;
        let second = match action {
            Action::BrokerKill => {
                let what = brokers.kill(faults.broker_kills, &targets, &mut rng)?;
                eprintln!("chaos: killed {what}");
                faults.broker_kills += 1;
                false
            }
            Action::Zombie => {
                fleet.zombie(&mut rng, &mut faults, i)?;
                false
            }
            Action::Kill { wipe, second } => {
                fleet.kill_random(&mut rng, wipe, &mut faults)?;
                second
            }
        };
        if second {
            fleet.second_instance(&mut rng, &mut faults, i)?;
        }
        fleet.retire_second_instance(&mut rng, &mut faults, i)?;
        let broker = brokers.helpers();
        right.step(broker, &topics, i, steps)?;
        if rng.random_bool(0.35) {
            notify.request(broker, &topics, &mut rng)?;
        }
    }
    // The workload runs for the whole duration, faults or not.
    fleet.watch_until(start + cfg.duration, &mut faults)?;
    stop.store(true, Ordering::SeqCst);
    let posted = driver.finish()?;
    fleet.retire_all_second_instances(&mut faults)?;
    let broker = brokers.helpers();
    right.finish(broker, &topics)?;
    notify.ensure_one(broker, &topics, &mut rng)?;
    eprintln!(
        "chaos: faults done after {:?} ({} kills, {} broker kills, {} zombies); draining",
        start.elapsed(),
        faults.kills,
        faults.broker_kills,
        faults.zombies
    );
    let expected = reconcile::Expected {
        posted: &posted,
        right: right.final_keys(),
        notifications: notify.expected(),
    };
    let verdict = reconcile::drain(
        broker,
        &topics,
        &mut fleet,
        &expected,
        &mut faults,
        cfg.drain_timeout,
    )?;
    let verdict = verdict.with_faults(cfg.seed, &faults);
    eprintln!("chaos: errors by kind\n{}", fleet.error_counts());
    if !verdict.passed() {
        eprintln!("{}", fleet.log_tails(15));
    }
    Ok(verdict)
}

/// Which fault each step injects: `kills` service kills (a fifth with the state directory
/// deleted, a sixth with a second instance started), `broker_kills` broker kills and
/// `zombies` frozen members, spread over the run but never first or last.
fn schedule(rng: &mut Pcg64Mcg, kills: u32, broker_kills: u32, zombies: u32) -> Vec<Action> {
    let mut plan: Vec<Action> = (0..kills)
        .map(|_| Action::Kill {
            wipe: rng.random_bool(0.2),
            second: rng.random_bool(0.17),
        })
        .collect();
    let others = (0..broker_kills)
        .map(|_| Action::BrokerKill)
        .chain((0..zombies).map(|_| Action::Zombie));
    for action in others.collect::<Vec<_>>() {
        let at = if plan.len() < 2 {
            plan.len()
        } else {
            rng.random_range(1..plan.len())
        };
        plan.insert(at, action);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_holds_every_fault_and_starts_and_ends_with_a_service_kill() {
        for seed in 0..50 {
            let plan = schedule(&mut Pcg64Mcg::seed_from_u64(seed), 20, 3, 2);
            let count = |f: fn(&Action) -> bool| plan.iter().filter(|a| f(a)).count();
            let broker = count(|a| matches!(a, Action::BrokerKill));
            let zombies = count(|a| matches!(a, Action::Zombie));
            assert_eq!((plan.len(), broker, zombies), (25, 3, 2));
            assert!(matches!(plan[0], Action::Kill { .. }));
            assert!(matches!(plan[24], Action::Kill { .. }));
        }
    }
}
