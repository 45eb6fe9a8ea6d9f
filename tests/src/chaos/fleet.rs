//! The pipeline's services as child processes, and the faults done to them: SIGKILL and
//! restart, a deleted state directory, a second instance of a consumer-group member, a
//! member frozen past its session (a zombie).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::seq::{IndexedMutRandom, IndexedRandom};
use rand::Rng;
use rand_pcg::Pcg64Mcg;

use super::workload::{Topics, API_KEY};
use super::{Config, Faults};
use crate::{free_port, http_get, service_args_at, wait_for, Broker, Service};
use sieve_core::signal::{self, Signal};

/// A service's full arguments for a given state directory.
type ArgsFor = Box<dyn Fn(&Path) -> Vec<String>>;

/// One service of the pipeline: how to start it, its state directory, the running process
/// and, for a while, a second instance in the same group.
struct Slot {
    name: &'static str,
    args: ArgsFor,
    /// `None` for ingest, which has no state and no group.
    state: Option<PathBuf>,
    svc: Service,
    /// A second instance and the step it was started at.
    second: Option<(Service, usize)>,
}

pub struct Fleet {
    slots: Vec<Slot>,
    bin: PathBuf,
    logs: PathBuf,
    ingest_port: u16,
    /// The services' environment: `SIEVE_GUARANTEE` when the run sets it.
    env: Vec<(&'static str, String)>,
}

impl Fleet {
    pub fn start(cfg: &Config, broker: &Broker, t: &Topics, dir: &Path) -> Result<Fleet> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let ingest_port = free_port();
        let ingest = ingest_args(cfg, broker, t, dir, ingest_port)?;
        let brokers = broker.addr();
        let mut specs: Vec<(&'static str, ArgsFor)> = vec![(
            "ingest",
            Box::new(move |_: &Path| ingest.clone()) as ArgsFor,
        )];
        let ns = t.ns.clone();
        let group_args = move |role: &str, state: &Path| -> Vec<String> {
            service_args_at(&brokers, &format!("{ns}-{role}"), state)
        };
        let (raw, uniq, ddlq) = (t.raw.clone(), t.unique.clone(), t.dedup_dlq.clone());
        let g = group_args.clone();
        specs.push((
            "dedup",
            Box::new(move |s: &Path| {
                let mut a = strings(&["dedup", "--input", &raw, "--output", &uniq, "--dlq", &ddlq]);
                a.extend(g("dedup", s));
                a
            }) as ArgsFor,
        ));
        let aj = strings(&[
            "antijoin",
            "stream",
            "--left",
            &t.unique,
            "--right",
            &t.right,
            "--key",
            "/user_id",
            "--out",
            &t.missing,
            "--dlq",
            &t.antijoin_dlq,
        ]);
        let g = group_args.clone();
        specs.push((
            "antijoin",
            Box::new(move |s: &Path| {
                let mut a = aj.clone();
                a.extend(g("antijoin", s));
                a
            }) as ArgsFor,
        ));
        for role in ["planner", "deliver"] {
            let mut a = strings(&["notify", role]);
            let flags: &[(&str, &str)] = if role == "planner" {
                &[
                    ("--requests", "requests"),
                    ("--tasks", "tasks"),
                    ("--follows", "follows"),
                    ("--status", "status"),
                    ("--dlq", "dlq"),
                ]
            } else {
                &[
                    ("--tasks", "tasks"),
                    ("--out", "out"),
                    ("--status", "status"),
                    ("--prefs", "prefs"),
                    ("--control", "control"),
                    ("--invalid-tokens", "invalid-tokens"),
                    ("--dlq", "dlq"),
                ]
            };
            for (flag, name) in flags {
                a.push(flag.to_string());
                a.push(t.notify(name));
            }
            let g = group_args.clone();
            specs.push((
                role,
                Box::new(move |s: &Path| {
                    let mut all = a.clone();
                    all.extend(g(role, s));
                    all
                }) as ArgsFor,
            ));
        }
        let mut env: Vec<(&'static str, String)> = cfg
            .guarantee
            .iter()
            .map(|g| ("SIEVE_GUARANTEE", g.clone()))
            .collect();
        // The services' log filter, to trace one run (docs/chaos.md).
        if let Ok(filter) = std::env::var("SIEVE_CHAOS_RUST_LOG") {
            env.push(("RUST_LOG", filter));
        }
        let mut slots = Vec::new();
        for (name, args) in specs {
            let state = (name != "ingest").then(|| dir.join("state").join(name));
            let svc = spawn(
                &cfg.sieve_bin,
                &args(state.as_deref().unwrap_or(dir)),
                &env,
                &logs,
            )?;
            slots.push(Slot {
                name,
                args,
                state,
                svc,
                second: None,
            });
        }
        let fleet = Fleet {
            slots,
            bin: cfg.sieve_bin.clone(),
            logs,
            ingest_port,
            env,
        };
        let health = format!("http://127.0.0.1:{ingest_port}/healthz");
        wait_for("ingest to listen", Duration::from_secs(60), || {
            http_get(&health).filter(|(s, _)| *s == 200)
        })
        .with_context(|| fleet.log_tails(20))?;
        Ok(fleet)
    }

    pub fn ingest_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/events/events", self.ingest_port)
    }

    /// Restarts a service that exited by itself (recorded: each is a failure). A member left
    /// without partitions is not restarted: its lag fails the reconciliation.
    pub fn watch(&mut self, faults: &mut Faults) -> Result<()> {
        for slot in &mut self.slots {
            if let Some(code) = slot.svc.exited() {
                faults.unexpected_exits.push(format!(
                    "{} exited by itself with {code}:\n{}",
                    slot.name,
                    slot.svc.log_tail(20)
                ));
                slot.svc.respawn()?;
            }
        }
        Ok(())
    }

    /// Watches the services (see `watch`) until `until`.
    pub fn watch_until(&mut self, until: Instant, faults: &mut Faults) -> Result<()> {
        while Instant::now() < until {
            self.watch(faults)?;
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// SIGKILLs a random service and starts it again, its state directory deleted first
    /// when `wipe` (for a service that has one).
    pub fn kill_random(
        &mut self,
        rng: &mut Pcg64Mcg,
        wipe: bool,
        faults: &mut Faults,
    ) -> Result<()> {
        let slot = self
            .slots
            .choose_mut(rng)
            .context("the fleet has services")?;
        slot.svc.kill();
        faults.kills += 1;
        if let (true, Some(state)) = (wipe, &slot.state) {
            match std::fs::remove_dir_all(state) {
                Ok(()) => faults.state_wipes += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).context("deleting a state directory"),
            }
        }
        eprintln!(
            "chaos: kill {}{}",
            slot.name,
            if wipe && slot.state.is_some() {
                " (state deleted)"
            } else {
                ""
            }
        );
        slot.svc.respawn()?;
        faults.restarts += 1;
        Ok(())
    }

    /// Starts a second instance of a random group member, with its own state directory, to
    /// force a rebalance while it runs; `step` is the runner's step.
    pub fn second_instance(
        &mut self,
        rng: &mut Pcg64Mcg,
        faults: &mut Faults,
        step: usize,
    ) -> Result<()> {
        let candidates: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].state.is_some() && self.slots[i].second.is_none())
            .collect();
        let Some(&i) = candidates.choose(rng) else {
            return Ok(());
        };
        self.start_second(i, faults, step)
    }

    /// Starts a second instance of slot `i`, a group member, with its own state directory.
    fn start_second(&mut self, i: usize, faults: &mut Faults, step: usize) -> Result<()> {
        let slot = &mut self.slots[i];
        let state = slot.state.as_ref().context("a service without a group")?;
        let dir = state.with_extension("second");
        let svc = spawn(&self.bin, &(slot.args)(&dir), &self.env, &self.logs)?;
        eprintln!("chaos: second instance of {}", slot.name);
        slot.second = Some((svc, step));
        faults.rebalances += 1;
        Ok(())
    }

    /// The `transactional.id` of the first instance of `name` (its group and state directory).
    pub fn transactional_id(&self, name: &str) -> Result<String> {
        let slot = self
            .slots
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no service {name}"))?;
        let state = slot.state.as_ref().context("a service without a group")?;
        let args = (slot.args)(state);
        let group = args
            .iter()
            .position(|a| a == "--group")
            .and_then(|i| args.get(i + 1))
            .context("no --group")?;
        Ok(sieve_core::transaction::transactional_id(
            group, None, state,
        ))
    }

    /// A zombie: a random group member (started alongside a second instance when it has
    /// none) frozen with SIGSTOP past its session, so the second instance takes its
    /// partitions; then SIGCONT. Frozen 7–14 s: past the 6 s session and within the 60 s
    /// transaction timeout, so the broker still holds the zombie's open transaction when it
    /// resumes, and the zombie's own commit must be refused.
    pub fn zombie(&mut self, rng: &mut Pcg64Mcg, faults: &mut Faults, step: usize) -> Result<()> {
        let members: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].state.is_some())
            .collect();
        let &i = members.choose(rng).context("the fleet has group members")?;
        if self.slots[i].second.is_none() {
            self.start_second(i, faults, step)?;
        }
        let slot = &self.slots[i];
        let frozen = Duration::from_millis(rng.random_range(7_000..14_000));
        eprintln!("chaos: zombie {} frozen for {frozen:?}", slot.name);
        let pid = slot.svc.pid().context("the member is running")?;
        signal::send(pid, Signal::Stop)?;
        std::thread::sleep(frozen);
        signal::send(pid, Signal::Cont)?;
        faults.zombies += 1;
        Ok(())
    }

    /// Ends second instances that ran for two steps or more: SIGKILL or a graceful stop.
    pub fn retire_second_instance(
        &mut self,
        rng: &mut Pcg64Mcg,
        faults: &mut Faults,
        step: usize,
    ) -> Result<()> {
        for slot in &mut self.slots {
            let old = matches!(&slot.second, Some((_, at)) if step >= at + 2);
            if !old {
                continue;
            }
            if let Some((mut svc, _)) = slot.second.take() {
                if rng.random_bool(0.5) {
                    svc.kill();
                    faults.kills += 1;
                } else {
                    let _ = svc.terminate(Duration::from_secs(30));
                }
            }
        }
        Ok(())
    }

    pub fn retire_all_second_instances(&mut self, faults: &mut Faults) -> Result<()> {
        for slot in &mut self.slots {
            if let Some((mut svc, _)) = slot.second.take() {
                if svc.terminate(Duration::from_secs(30)).is_err() {
                    faults.kills += 1;
                }
            }
        }
        Ok(())
    }

    /// `sieve_errors_total` by kind of every running service (this lifetime), for the log.
    pub fn error_counts(&self) -> String {
        self.slots
            .iter()
            .filter_map(|s| {
                let (_, body) = s.svc.get("/metrics")?;
                let kinds: Vec<&str> = body
                    .lines()
                    .filter(|l| l.starts_with("sieve_errors_total{"))
                    .collect();
                (!kinds.is_empty()).then(|| format!("{}: {}", s.name, kinds.join(", ")))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The last lines of every service's log, for a failed run.
    pub fn log_tails(&self, lines: usize) -> String {
        self.slots
            .iter()
            .map(|s| format!("--- {} ---\n{}", s.name, s.svc.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn spawn(bin: &Path, args: &[String], env: &[(&str, String)], logs: &Path) -> Result<Service> {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Service::spawn(bin, args, &env, logs)
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// `sieve ingest serve` for the run's `events` stream, keyed by user (so dedup and the
/// anti-join see every user's events in one partition), idempotent by `event_id`.
fn ingest_args(
    cfg: &Config,
    broker: &Broker,
    t: &Topics,
    dir: &Path,
    port: u16,
) -> Result<Vec<String>> {
    let streams = dir.join("streams.toml");
    std::fs::write(
        &streams,
        format!(
            "[streams.events]\ntopic = \"{}\"\nschema = \"event.schema.json\"\n\
             idempotency_field = \"/event_id\"\nkey_field = \"/user_id\"\n",
            t.raw
        ),
    )?;
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        format!("[[keys]]\nkey = \"{API_KEY}\"\ntenant = \"chaos\"\nstreams = [\"*\"]\n"),
    )?;
    Ok(vec![
        "ingest".into(),
        "serve".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--brokers".into(),
        broker.addr(),
        "--schemas".into(),
        cfg.schemas.display().to_string(),
        "--streams".into(),
        streams.display().to_string(),
        "--api-keys".into(),
        keys.display().to_string(),
        "--dlq".into(),
        t.ingest_dlq.clone(),
        "--ack-timeout".into(),
        "3s".into(),
    ])
}
