//! The core loop against Apache Kafka started by the harness: pass-through, crashes at many moments, state
//! restore, rebalance, telemetry, bad configuration. Services run as child processes so a
//! crash is a real SIGKILL.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use sieve_tests::{service_args, unique, wait_for, Broker, Service};

const BIN: &str = env!("CARGO_BIN_EXE_sieve-testop");

struct Setup {
    broker: Broker,
    input: String,
    output: String,
    group: String,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(partitions: i32) -> Result<Setup> {
        let s = Self::on(Broker::start()?)?;
        s.broker.create_topic(&s.input, partitions)?;
        s.broker.create_topic(&s.output, partitions)?;
        Ok(s)
    }

    /// Names on `broker`, topics not created.
    fn on(broker: Broker) -> Result<Setup> {
        let input = unique("in");
        let output = unique("out");
        Ok(Setup {
            broker,
            input,
            output,
            group: unique("g"),
            dir: tempfile::tempdir()?,
        })
    }

    fn state_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn args(&self, op: &str, state: &Path) -> Vec<String> {
        let mut args: Vec<String> = [op, "--input", &self.input, "--output", &self.output]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(service_args(&self.broker, &self.group, state));
        args.extend(["-X".into(), "statistics.interval.ms=500".into()]);
        args
    }

    fn spawn(&self, op: &str, state: &Path, env: &[(&str, &str)]) -> Result<Service> {
        self.spawn_with(op, state, &[], env)
    }

    fn spawn_with(
        &self,
        op: &str,
        state: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Service> {
        let mut args = self.args(op, state);
        args.extend(extra.iter().map(|s| s.to_string()));
        Service::spawn(Path::new(BIN), &args, env, self.dir.path())
    }

    /// Produces `n` records with keys `k0..k{keys}` and values `seq` (0..n).
    fn produce(&self, from: usize, n: usize, keys: usize) -> Result<()> {
        self.broker.produce(
            &self.input,
            (from..from + n).map(|i| (format!("k{}", i % keys), i.to_string())),
        )?;
        Ok(())
    }

    fn wait_output(&self, n: i64, svc: &mut Service) -> Result<()> {
        let mut last_err = String::new();
        wait_for(
            &format!("{n} output records"),
            Duration::from_secs(240),
            || {
                if let Some(code) = svc.exited() {
                    last_err = format!("service exited with {code}:\n{}", svc.logs());
                    return Some(());
                }
                (self.broker.count(&self.output).ok()? >= n).then_some(())
            },
        )?;
        ensure!(last_err.is_empty(), "{last_err}");
        Ok(())
    }

    /// Waits for `n` output records, or the service's exit, with no harness restart: for what
    /// the runtime must survive by itself.
    fn wait_output_unaided(&self, n: usize, svc: &mut Service) -> Result<()> {
        wait_for(
            &format!("{n} output records"),
            Duration::from_secs(120),
            || {
                svc.exited()
                    .map(|_| ())
                    .or_else(|| (self.broker.count(&self.output).ok()? >= n as i64).then_some(()))
            },
        )
    }
}

/// Asserts the output holds exactly the values `0..n` once each, each key's values in order.
fn assert_exactly_once_in_order(out: &[OwnedMessage], n: usize) -> Result<()> {
    let mut seen = vec![0u32; n];
    let mut last_per_key: HashMap<Vec<u8>, i64> = HashMap::new();
    for m in out {
        let v: usize = std::str::from_utf8(m.payload().unwrap_or_default())?.parse()?;
        ensure!(v < n, "unexpected value {v}");
        seen[v] += 1;
        let key = m.key().unwrap_or_default().to_vec();
        let prev = last_per_key.insert(key.clone(), v as i64).unwrap_or(-1);
        ensure!(
            prev < v as i64,
            "key {} out of order: {prev} before {v}",
            String::from_utf8_lossy(&key)
        );
    }
    let missing: Vec<usize> = (0..n).filter(|i| seen[*i] == 0).take(5).collect();
    let dups: Vec<usize> = (0..n).filter(|i| seen[*i] > 1).take(5).collect();
    ensure!(
        missing.is_empty() && dups.is_empty() && out.len() == n,
        "output {} records for {n} inputs; missing e.g. {missing:?}, duplicated e.g. {dups:?}",
        out.len()
    );
    Ok(())
}

#[test]
fn passthrough_copies_every_record_once_in_key_order_and_commits() -> Result<()> {
    let s = Setup::new(4)?;
    let n = 100_000;
    s.produce(0, n, 1000)?;
    let txn = ["--guarantee", "exactly-once"];
    let mut svc = s.spawn_with("passthrough", &s.state_dir("a"), &txn, &[])?;
    s.wait_output(n as i64, &mut svc)?;
    assert_eq!(
        svc.terminate(Duration::from_secs(30))?,
        0,
        "graceful exit code"
    );
    assert_exactly_once_in_order(&s.broker.read_all(&s.output)?, n)?;
    // Offsets committed to the group equal the end of every input partition.
    assert_eq!(
        s.broker.committed(&s.group, &s.input)?,
        s.broker.end_offsets(&s.input)?
    );
    Ok(())
}

#[test]
fn sigkill_at_any_moment_neither_loses_nor_duplicates() -> Result<()> {
    // Between "outputs sent" and the transaction's commit, between Kafka's commit and
    // RocksDB's, after both.
    sigkill_at_any_moment(
        "exactly-once",
        &[
            "after_produce@2",
            "before_commit@3",
            "after_outputs_acked@1",
            "after_outputs_acked@3",
            "after_state_committed@2",
            "after_produce@5",
            "after_outputs_acked@4",
        ],
    )
}

#[test]
fn sigkill_at_any_moment_without_transactions_neither_loses_nor_duplicates() -> Result<()> {
    // Between "outputs acknowledged" and "state written" (the recovery scan's case), between
    // the local commit and the changelog write (a store ahead of its changelog).
    sigkill_at_any_moment(
        "exactly-once-ids",
        &[
            "after_produce@2",
            "after_outputs_acked@1",
            "after_outputs_acked@3",
            "after_state_committed@2",
            "after_produce@5",
            "after_outputs_acked@4",
        ],
    )
}

/// Kills at each failpoint in turn, then at arbitrary moments, and checks the output as a
/// `read_committed` reader sees it. Small batches and early hits leave work for every crash
/// point: at most 7 x 5 batches of 1 000 of the 60 000 records.
fn sigkill_at_any_moment(guarantee: &str, points: &[&str]) -> Result<()> {
    let s = Setup::new(3)?;
    let n = 60_000;
    s.produce(0, n, 500)?;
    let state = s.state_dir("a");
    let mode = ["--guarantee", guarantee];
    for fp in points {
        let mut svc = s.spawn_with(
            "passthrough",
            &state,
            &["--guarantee", guarantee, "--batch-records", "1000"],
            &[("SIEVE_FAILPOINT", fp)],
        )?;
        svc.wait_exit(&format!("crash at {fp}"), Duration::from_secs(120))?;
    }
    for delay_ms in [300u64, 900, 1500, 2200] {
        let mut svc = s.spawn_with("passthrough", &state, &mode, &[])?;
        let before = s.broker.count(&s.output)?;
        // Kill once it made progress (or after the delay if already done).
        let _ = wait_for("progress", Duration::from_millis(delay_ms), || {
            (s.broker.count(&s.output).ok()? > before).then_some(())
        });
        svc.kill();
    }
    let mut svc = s.spawn_with("passthrough", &state, &mode, &[])?;
    s.wait_output(n as i64, &mut svc)?;
    // Let it settle past the last input, then stop and check the topic.
    wait_for("committed to end", Duration::from_secs(60), || {
        (s.broker.committed(&s.group, &s.input).ok()? == s.broker.end_offsets(&s.input).ok()?)
            .then_some(())
    })?;
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    assert_exactly_once_in_order(&s.broker.read_all(&s.output)?, n)
}

/// Final count per key, and a check that every key's counts run 1, 2, 3… without gaps or repeats.
fn counts(out: &[OwnedMessage]) -> Result<BTreeMap<String, u64>> {
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for m in out {
        let k = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        let c: u64 = std::str::from_utf8(m.payload().unwrap_or_default())?.parse()?;
        let prev = last.insert(k.clone(), c).unwrap_or(0);
        ensure!(c == prev + 1, "key {k}: count {c} after {prev}");
    }
    Ok(last)
}

#[test]
fn deleted_state_dir_is_restored_from_the_changelog() -> Result<()> {
    deleted_state_dir_is_restored("exactly-once")
}

#[test]
fn deleted_state_dir_is_restored_from_the_changelog_without_transactions() -> Result<()> {
    deleted_state_dir_is_restored("exactly-once-ids")
}

fn deleted_state_dir_is_restored(guarantee: &str) -> Result<()> {
    let s = Setup::new(2)?;
    let mode = ["--guarantee", guarantee];
    let keys = 200;
    let state = s.state_dir("a");
    // Keys seen once, then again only at the very end: a count the changelog lost would show.
    let once = |i: usize| (format!("u{i}"), i.to_string());
    s.broker.produce(&s.input, (0..5_000).map(once))?;
    s.produce(0, 10_000, keys)?;
    // Without transactions, a kill between the local commit of a batch and its changelog
    // write leaves the store ahead of the changelog; the restart must not keep using it, or
    // that batch's counts would be missing from every later restore. (With transactions the
    // same point is after both commits.)
    let mut svc = s.spawn_with(
        "counter",
        &state,
        &["--guarantee", guarantee, "--batch-records", "1000"],
        &[("SIEVE_FAILPOINT", "after_state_committed@3")],
    )?;
    svc.wait_exit("crash before the changelog write", Duration::from_secs(120))?;
    let mut svc = s.spawn_with("counter", &state, &mode, &[])?;
    s.wait_output(15_000, &mut svc)?;
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    std::fs::remove_dir_all(&state)?;

    // A crash mid-batch and a lost state dir together: restore plus recovery scan.
    s.produce(10_000, 10_000, keys)?;
    let mut svc = s.spawn_with(
        "counter",
        &state,
        &mode,
        &[("SIEVE_FAILPOINT", "after_outputs_acked@2")],
    )?;
    svc.wait_exit("crash", Duration::from_secs(120))?;
    std::fs::remove_dir_all(&state)?;

    s.produce(20_000, 10_000, keys)?;
    s.broker.produce(&s.input, (0..5_000).map(once))?;
    let mut svc = s.spawn_with("counter", &state, &mode, &[])?;
    s.wait_output(40_000, &mut svc)?;
    let restored = svc
        .metric("sieve_restore_records_total", &[])
        .unwrap_or(0.0);
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    ensure!(restored > 0.0, "restore metric not reported");

    let got = counts(&s.broker.read_all(&s.output)?)?;
    // The uninterrupted answer: each k-key occurs 30 000 / 200 times, each u-key twice.
    let expected: BTreeMap<String, u64> = (0..keys)
        .map(|k| (format!("k{k}"), 150))
        .chain((0..5_000).map(|i| (format!("u{i}"), 2)))
        .collect();
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {:?} for {v}", got.get(k)))
        .collect();
    ensure!(
        wrong.is_empty() && got.len() == expected.len(),
        "{} keys with wrong counts, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    Ok(())
}

/// Faults a healthy broker does not make, injected with librdkafka's mock cluster (in this
/// process; the service is a real child process talking to it over loopback): produce,
/// fetch and offset-commit requests that fail, then the broker down for a while. The service
/// rides them out without a restart, counts the errors, and the output is exactly once.
#[test]
fn injected_request_errors_and_an_outage_neither_lose_nor_duplicate() -> Result<()> {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let mock = MockCluster::new(1)?;
    let s = Setup::on(Broker::external(&mock.bootstrap_servers())?)?;
    // The mock has no CreateTopics: the topics, changelog included, are made here.
    for t in [&s.input, &s.output] {
        mock.create_topic(t, 2, 1)?;
    }
    mock.create_topic(&format!("{}.{}.changelog", s.group, s.input), 2, 1)?;
    let n = 20_000;
    s.produce(0, n / 2, 500)?;
    use RDKafkaRespErr as E;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            E::RD_KAFKA_RESP_ERR__TRANSPORT,
            E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        ],
    );
    mock.request_errors(
        RDKafkaApiKey::Fetch,
        &[
            E::RD_KAFKA_RESP_ERR__TRANSPORT,
            E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        ],
    );
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[
            E::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            E::RD_KAFKA_RESP_ERR__TRANSPORT,
        ],
    );
    let mut svc = s.spawn_with(
        "passthrough",
        &s.state_dir("a"),
        &["--batch-records", "1000"],
        &[],
    )?;
    s.wait_output(n as i64 / 2, &mut svc)?;
    let errors = |svc: &Service| {
        svc.metric("sieve_errors_total", &["kind=\"kafka_client\""])
            .unwrap_or(0.0)
    };
    let before = errors(&svc);
    mock.broker_down(1)?;
    // Down until the service has seen and counted the outage.
    wait_for("the outage counted", Duration::from_secs(60), || {
        (errors(&svc) > before).then_some(())
    })?;
    ensure!(
        svc.exited().is_none(),
        "exited during the outage:\n{}",
        svc.log_tail(30)
    );
    mock.broker_up(1)?;
    s.produce(n / 2, n / 2, 500)?;
    s.wait_output(n as i64, &mut svc)?;
    ensure!(
        svc.exited().is_none(),
        "the service restarted:\n{}",
        svc.log_tail(30)
    );
    // Killed, not stopped: against the mock cluster, librdkafka's client teardown after a
    // clean stop hung for over 30 s (not seen against the real broker; docs/chaos.md).
    svc.kill();
    assert_exactly_once_in_order(&s.broker.read_all(&s.output)?, n)
}

/// The broker freezes (SIGSTOP) for longer than the session timeout, three times: the consumer
/// loses its assignment each time and must get back into its group by itself, same process
/// throughout. On Kafka it rejoins on its own: the group stall watch (`group_watch`, a net for
/// a join that never settles) must not have fired.
#[test]
fn a_broker_freeze_longer_than_the_session_is_survived_without_a_restart() -> Result<()> {
    let s = Setup::new(4)?;
    let step = 2_000;
    s.produce(0, step, 100)?;
    let mut svc = s.spawn("passthrough", &s.state_dir("a"), &[])?;
    let pid = svc.pid();
    s.wait_output_unaided(step, &mut svc)?;
    for round in 1..=3 {
        // The tests' session timeout is 6 s.
        s.broker.freeze(Duration::from_secs(10))?;
        s.produce(round * step, step, 100)?;
        s.wait_output_unaided((round + 1) * step, &mut svc)?;
        ensure!(
            svc.pid() == pid && svc.exited().is_none(),
            "the service exited in round {round}:\n{}",
            svc.log_tail(30)
        );
    }
    let replaced = svc
        .metric("sieve_errors_total", &["kind=\"group_stalled\""])
        .unwrap_or(0.0);
    ensure!(
        replaced == 0.0,
        "the group stall watch replaced the consumer {replaced} times"
    );
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    assert_exactly_once_in_order(&s.broker.read_all(&s.output)?, 4 * step)
}

/// A SIGKILLed service restarted at once gets its partitions back by itself, once the group
/// coordinator has dropped the dead member (its session expired), and resumes exactly once.
#[test]
fn a_service_restarted_right_after_a_sigkill_gets_its_partitions_back() -> Result<()> {
    let s = Setup::new(4)?;
    let step = 2_000;
    s.produce(0, step, 100)?;
    let mut svc = s.spawn("passthrough", &s.state_dir("a"), &[])?;
    s.wait_output_unaided(step, &mut svc)?;
    for round in 1..=2 {
        svc.respawn()?;
        s.produce(round * step, step, 100)?;
        s.wait_output_unaided((round + 1) * step, &mut svc)?;
        ensure!(
            svc.exited().is_none(),
            "exited in round {round}:\n{}",
            svc.log_tail(30)
        );
    }
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    assert_exactly_once_in_order(&s.broker.read_all(&s.output)?, 3 * step)
}

#[test]
fn a_second_instance_takes_partitions_without_loss_or_duplicates() -> Result<()> {
    let s = Setup::new(8)?;
    let n = 80_000;
    s.produce(0, n / 2, 1000)?;
    // Transactions: a revoked partition commits its last flush in a transaction of its own.
    let txn = ["--guarantee", "exactly-once"];
    let mut a = s.spawn_with("passthrough", &s.state_dir("a"), &txn, &[])?;
    wait_for("first output", Duration::from_secs(60), || {
        (s.broker.count(&s.output).ok()? > 0).then_some(())
    })?;
    let mut b = s.spawn_with("passthrough", &s.state_dir("b"), &txn, &[])?;
    // Both instances own partitions: the group rebalanced.
    wait_for(
        "partitions on both instances",
        Duration::from_secs(60),
        || {
            let pa = a.metric("sieve_assigned_partitions", &[])?;
            let pb = b.metric("sieve_assigned_partitions", &[])?;
            (pa > 0.0 && pb > 0.0 && pa + pb == 8.0).then_some(())
        },
    )?;
    s.produce(n / 2, n / 2, 1000)?;
    s.wait_output(n as i64, &mut a)?;
    assert_eq!(a.terminate(Duration::from_secs(30))?, 0);
    // b takes a's partitions over and finishes whatever is left.
    wait_for("all committed", Duration::from_secs(60), || {
        (s.broker.committed(&s.group, &s.input).ok()? == s.broker.end_offsets(&s.input).ok()?)
            .then_some(())
    })?;
    assert_eq!(b.terminate(Duration::from_secs(30))?, 0);
    assert_exactly_once_in_order(&s.broker.read_all(&s.output)?, n)
}

#[test]
fn metrics_show_lag_throughput_and_readiness() -> Result<()> {
    let s = Setup::new(2)?;
    s.produce(0, 5_000, 100)?;
    let mut svc = s.spawn("passthrough", &s.state_dir("a"), &[])?;
    // Not ready until the group is joined and partitions are restored, then ready.
    let mut saw_not_ready = false;
    wait_for("/readyz 200", Duration::from_secs(60), || {
        let (code, _) = svc.get("/readyz")?;
        saw_not_ready |= code == 503;
        (code == 200).then_some(())
    })?;
    ensure!(
        saw_not_ready,
        "/readyz was never 503 before the partitions were restored"
    );
    assert_eq!(svc.get("/healthz").map(|r| r.0), Some(200));
    s.wait_output(5_000, &mut svc)?;
    let input_label = format!("topic=\"{}\"", s.input);
    let output_label = format!("topic=\"{}\"", s.output);
    let mut last = String::new();
    let seen = wait_for("metrics", Duration::from_secs(30), || {
        let (_, body) = svc.get("/metrics")?;
        last = body.clone();
        let inn = sieve_tests::metric_value(&body, "sieve_records_in_total", &[&input_label])?;
        let out = sieve_tests::metric_value(&body, "sieve_records_out_total", &[&output_label])?;
        let lag = sieve_tests::metric_value(&body, "sieve_consumer_lag", &[&input_label])?;
        let paused = sieve_tests::metric_value(&body, "sieve_paused_partitions", &[])?;
        (inn == 5000.0 && out == 5000.0 && lag == 0.0 && paused == 0.0).then_some(())
    });
    let sieve_lines: Vec<&str> = last.lines().filter(|l| l.starts_with("sieve_")).collect();
    seen.with_context(|| sieve_lines.join("\n"))?;
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    Ok(())
}

fn run_to_exit(args: &[&str]) -> Result<(i32, String)> {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "off")
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn bad_configuration_fails_fast_with_one_clear_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().display().to_string();
    // An unreachable broker, then an unknown librdkafka property.
    let base = [
        "passthrough",
        "--brokers",
        "127.0.0.1:1",
        "--group",
        "g",
        "--state-dir",
        &state,
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let (code, err) = run_to_exit(&[base.as_slice(), &["--connect-timeout", "1500ms"]].concat())?;
    assert_ne!(code, 0);
    ensure!(
        err.contains("cannot reach Kafka brokers at 127.0.0.1:1"),
        "stderr: {err}"
    );
    ensure!(
        !err.contains("panicked") && err.trim().lines().count() == 1,
        "stderr: {err}"
    );

    let (code, err) = run_to_exit(&[base.as_slice(), &["-X", "no.such.property=1"]].concat())?;
    assert_ne!(code, 0);
    ensure!(err.contains("no.such.property"), "stderr: {err}");
    ensure!(
        !err.contains("panicked") && err.trim().lines().count() == 1,
        "stderr: {err}"
    );
    Ok(())
}

/// The broker aborts a frozen or dead instance's transaction after 10 s (60 s by default):
/// the fencing tests wait for that expiry.
const EXPIRE_SOON: &str = "transaction.timeout.ms=10000";

/// What a reader of the counter's output found: records, `(key, count)` pairs seen more than
/// once, and pairs of the clean run's answer never seen.
#[derive(Debug)]
struct Audit {
    records: usize,
    repeated: usize,
    missing: usize,
}

/// Audits the counter's output against a clean run over `per_key` inputs for each key.
fn audit(out: &[OwnedMessage], per_key: &BTreeMap<String, u64>) -> Result<Audit> {
    let mut seen: HashMap<(String, u64), u32> = HashMap::new();
    for m in out {
        let k = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        let c: u64 = std::str::from_utf8(m.payload().unwrap_or_default())?.parse()?;
        *seen.entry((k, c)).or_default() += 1;
    }
    let repeated = seen.values().map(|n| (*n as usize).saturating_sub(1)).sum();
    let missing = per_key
        .iter()
        .flat_map(|(k, n)| (1..=*n).map(move |c| (k.clone(), c)))
        .filter(|pair| !seen.contains_key(pair))
        .count();
    Ok(Audit {
        records: out.len(),
        repeated,
        missing,
    })
}

/// A zombie: instance A freezes (SIGSTOP) at `failpoint`, with a batch's outputs on the broker
/// and the batch not committed, stays frozen past its session while B takes every partition
/// and counts the whole input, then resumes as if nothing happened; more input follows for
/// both. Returns the audit of the output as a `read_committed` consumer reads it, and A's log.
fn zombie(guarantee: &str, failpoint: &str) -> Result<(Audit, String)> {
    let s = Setup::new(4)?;
    let keys = 200;
    let extra = [
        "--guarantee",
        guarantee,
        "--batch-records",
        "1000",
        "-X",
        EXPIRE_SOON,
    ];
    s.produce(0, 20_000, keys)?;
    let mut a = s.spawn_with(
        "counter",
        &s.state_dir("a"),
        &extra,
        &[("SIEVE_FAILPOINT", &format!("{failpoint}@5:stop"))],
    )?;
    wait_for("A frozen mid-batch", Duration::from_secs(120), || {
        a.is_stopped().then_some(())
    })?;
    let mut b = s.spawn_with("counter", &s.state_dir("b"), &extra, &[])?;
    // B gets the partitions once A's session (10 s) expired, and counts everything.
    s.wait_output(20_000, &mut b)?;
    a.resume()?;
    s.produce(20_000, 20_000, keys)?;
    s.wait_output(40_000, &mut b)
        .with_context(|| format!("A:\n{}\nB:\n{}", a.log_tail(40), b.log_tail(40)))?;
    wait_for("all committed", Duration::from_secs(120), || {
        (s.broker.committed(&s.group, &s.input).ok()? == s.broker.end_offsets(&s.input).ok()?)
            .then_some(())
    })?;
    let a_log = a.logs();
    assert_eq!(a.terminate(Duration::from_secs(30))?, 0, "A: {a_log}");
    assert_eq!(b.terminate(Duration::from_secs(30))?, 0);
    // The state both left in the changelog, restored by a third instance with no local
    // state: its counts must go on from the clean run's.
    s.produce(40_000, 10_000, keys)?;
    let mut c = s.spawn_with("counter", &s.state_dir("c"), &extra, &[])?;
    s.wait_output(50_000, &mut c)?;
    assert_eq!(c.terminate(Duration::from_secs(30))?, 0);
    let per_key = (0..keys).map(|k| (format!("k{k}"), 250)).collect();
    Ok((audit(&s.broker.read_all(&s.output)?, &per_key)?, a_log))
}

/// The broker fences the zombie: its transaction is refused (or timed out) and aborted,
/// nothing it wrote after freezing is visible, and the state restored from the changelog
/// is a clean run's.
#[test]
fn a_zombie_instance_is_fenced_and_every_count_appears_once() -> Result<()> {
    let (audit, a_log) = zombie("exactly-once", "before_commit")?;
    ensure!(
        a_log.contains("transaction failed"),
        "A resumed without its transaction failing:\n{a_log}"
    );
    ensure!(
        audit.records == 50_000 && audit.repeated == 0 && audit.missing == 0,
        "{audit:?}"
    );
    Ok(())
}

/// The same zombie without transactions (`exactly-once-ids`, the mode for brokers that lack
/// them), as a measurement, not a test: nothing fences A, so what a reader sees varies from
/// run to run (docs/exactly-once.md records the runs). Run it with
/// `cargo nextest run -p sieve-tests --test core_runtime --run-ignored only zombie`.
#[test]
#[ignore = "a measurement of the mode's known hole, recorded in docs/exactly-once.md"]
fn measure_a_zombie_without_transactions() -> Result<()> {
    let (audit, _) = zombie("exactly-once-ids", "after_produce")?;
    println!("exactly-once-ids under a zombie: {audit:?}");
    Ok(())
}

/// Every record of `topic` as a `read_uncommitted` consumer reads it: aborted ones included.
fn read_uncommitted(broker: &Broker, topic: &str) -> Result<Vec<OwnedMessage>> {
    let mut cfg = broker.clients().reader_config();
    cfg.set("isolation.level", "read_uncommitted");
    let reader: BaseConsumer = cfg.create()?;
    let mut out = Vec::new();
    for p in broker.end_offsets(topic)?.keys() {
        let (_, high) = reader.fetch_watermarks(topic, *p, Duration::from_secs(10))?;
        sieve_core::read::read_range(&reader, topic, *p, 0, high, Duration::from_secs(30), |m| {
            out.push(m.clone());
            Ok(())
        })?;
    }
    Ok(out)
}

/// A kill between sending a batch and committing its transaction: once the coordinator
/// aborted the dead producer's transaction, a `read_committed` reader sees exactly the
/// committed batches (one count per committed input) while the aborted outputs lie in the
/// log; the restart redoes the batch and the output is a clean run's.
#[test]
fn a_batch_killed_before_its_commit_is_invisible_and_redone_exactly() -> Result<()> {
    let s = Setup::new(2)?;
    let keys = 100;
    s.produce(0, 10_000, keys)?;
    let state = s.state_dir("a");
    let extra = [
        "--guarantee",
        "exactly-once",
        "--batch-records",
        "1000",
        "-X",
        EXPIRE_SOON,
    ];
    let mut a = s.spawn_with(
        "counter",
        &state,
        &extra,
        &[("SIEVE_FAILPOINT", "before_commit@4")],
    )?;
    a.wait_exit("kill before the commit", Duration::from_secs(120))?;
    ensure!(a.logs().contains("failpoint reached"), "{}", a.log_tail(20));
    // The transaction stays open until the coordinator times it out (10 s) and aborts it.
    let committed_inputs: i64 = s.broker.committed(&s.group, &s.input)?.values().sum();
    let mut last = (0, 0);
    let visible = wait_for(
        "the dead transaction aborted",
        Duration::from_secs(60),
        || {
            let uncommitted = read_uncommitted(&s.broker, &s.output).ok()?.len();
            let committed = s.broker.read_all(&s.output).ok()?.len();
            last = (committed, uncommitted);
            // A record past the last stable offset is not readable yet: wait for the abort.
            (uncommitted > committed && committed as i64 == committed_inputs)
                .then_some((committed, uncommitted))
        },
    )
    .with_context(|| {
        format!("read_committed/uncommitted {last:?}, committed inputs {committed_inputs}")
    })?;
    ensure!(
        committed_inputs > 0,
        "no batch committed before the kill: {visible:?}"
    );
    let mut a = s.spawn_with("counter", &state, &extra, &[])?;
    s.wait_output(10_000, &mut a)?;
    assert_eq!(a.terminate(Duration::from_secs(30))?, 0);
    let per_key = (0..keys).map(|k| (format!("k{k}"), 100)).collect();
    let audit = audit(&s.broker.read_all(&s.output)?, &per_key)?;
    ensure!(
        audit.records == 10_000 && audit.repeated == 0 && audit.missing == 0,
        "{audit:?}"
    );
    Ok(())
}
