//! `sieve ctl` against Apache Kafka started by the harness: topics from the declarative file, and lag.

use std::path::Path;

use std::time::Duration;

use anyhow::{ensure, Result};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use sieve_tests::{
    run_cli, service_args_at, topic_config, unique, wait_for, Broker, Cluster, Service,
};

const BIN: &str = env!("CARGO_BIN_EXE_sieve");

fn sieve(args: &[&str]) -> Result<(i32, String)> {
    run_cli(Path::new(BIN), args, b"")
}

/// `sieve ctl topics apply` of deploy/topics.toml with every name prefixed, plus `extra`.
fn apply_topics(brokers: &str, prefix: &str, extra: &[&str]) -> Result<(i32, String)> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/topics.toml");
    let file = file.to_str().unwrap_or_default();
    let mut args = vec![
        "ctl",
        "topics",
        "apply",
        "--brokers",
        brokers,
        "--file",
        file,
        "--prefix",
        prefix,
    ];
    args.extend_from_slice(extra);
    sieve(&args)
}

#[test]
fn topics_apply_creates_then_reports_up_to_date_and_drift() -> Result<()> {
    let broker = Broker::start()?;
    let addr = broker.addr();
    let prefix = format!("{}-", unique("t"));
    let apply = |prefix: &str, extra: &[&str]| apply_topics(&addr, prefix, extra);

    let (code, out) = apply(&prefix, &["--dry-run"])?;
    ensure!(code == 0 && out.contains("would create"), "{out}");
    ensure!(
        broker.end_offsets(&format!("{prefix}events.raw")).is_err(),
        "dry run created a topic"
    );

    let (code, out) = apply(&prefix, &[])?;
    ensure!(code == 0, "{out}");
    let created = out.lines().filter(|l| l.ends_with("created")).count();
    ensure!(created >= 20, "only {created} topics created:\n{out}");
    ensure!(broker.end_offsets(&format!("{prefix}events.raw"))?.len() == 8);
    ensure!(broker.end_offsets(&format!("{prefix}sieve.control"))?.len() == 1);

    let (code, out) = apply(&prefix, &[])?;
    ensure!(
        code == 0 && !out.contains("created") && out.contains("up to date"),
        "{out}"
    );

    // A topic that exists with other partitions is drift: reported, exit 3, not changed.
    let other = format!("{}-", unique("d"));
    broker.create_topic(&format!("{other}events.raw"), 3)?;
    let (code, out) = apply(&other, &[])?;
    ensure!(
        code == 3 && out.contains("DRIFT: partitions: broker 3, file 8"),
        "{code}: {out}"
    );
    ensure!(broker.end_offsets(&format!("{other}events.raw"))?.len() == 3);

    // Config drift, read back with DescribeConfigs: reported, then set by --fix, keeping the
    // configs the file does not name.
    let drifted = format!("{prefix}events.unique");
    let admin = broker.clients().admin()?;
    let alter =
        rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&drifted))
            .set("retention.ms", "1000")
            .set("cleanup.policy", "delete")
            .set("segment.ms", "3600000");
    sieve_tests::block(admin.alter_configs(&[alter], &rdkafka::admin::AdminOptions::new()))?;
    let (code, out) = apply(&prefix, &[])?;
    ensure!(
        code == 3 && out.contains("retention.ms: broker 1000, file 604800000"),
        "{code}: {out}"
    );
    let (code, out) = apply(&prefix, &["--fix"])?;
    ensure!(
        code == 0 && out.contains("fixed: retention.ms: broker 1000"),
        "{code}: {out}"
    );
    let (code, out) = apply(&prefix, &[])?;
    ensure!(code == 0 && !out.contains("DRIFT"), "{code}: {out}");
    let segment_ms = topic_config(&broker.clients(), &drifted, "segment.ms")?;
    ensure!(
        segment_ms.as_deref() == Some("3600000"),
        "--fix dropped a config the file does not name: {segment_ms:?}"
    );
    // A partition count is never changed, even with --fix.
    let (code, out) = apply(&other, &["--fix"])?;
    ensure!(
        code == 3 && out.contains("DRIFT: partitions"),
        "{code}: {out}"
    );
    ensure!(broker.end_offsets(&format!("{other}events.raw"))?.len() == 3);
    Ok(())
}

#[test]
fn lag_equals_end_minus_committed() -> Result<()> {
    let broker = Broker::start()?;
    let topic = unique("lag");
    broker.create_topic(&topic, 2)?;
    broker.produce(&topic, (0..1000).map(|i| (format!("k{i}"), "v")))?;
    let addr = broker.addr();
    let group = unique("g");
    // No commit yet: the whole topic is lag.
    let (code, out) = sieve(&[
        "ctl",
        "lag",
        "--brokers",
        &addr,
        "--group",
        &group,
        "--topic",
        &topic,
        "--total",
    ])?;
    ensure!(code == 0 && out.trim() == "1000", "{out}");
    let (_, table) = sieve(&[
        "ctl",
        "lag",
        "--brokers",
        &addr,
        "--group",
        &group,
        "--topic",
        &topic,
    ])?;
    let ends = broker.end_offsets(&topic)?;
    for (p, end) in ends {
        let row = format!("{p:>9} {:>12} {end:>12} {end:>10}", "-");
        ensure!(table.contains(&row), "missing row {row:?} in:\n{table}");
    }
    Ok(())
}

/// `ctl topics count` counts records as a `read_committed` reader sees them: a transaction's
/// commit marker and an aborted transaction's records take offsets but are not records.
#[test]
fn count_reads_records_not_offsets() -> Result<()> {
    let broker = Broker::start()?;
    let topic = unique("txn");
    broker.create_topic(&topic, 2)?;
    let mut cfg = broker.clients().producer_config();
    cfg.set("transactional.id", unique("txn-id"))
        .set("transaction.timeout.ms", "120000");
    let producer: BaseProducer = cfg.create()?;
    let timeout = Duration::from_secs(30);
    producer.init_transactions(timeout)?;
    for (n, commit) in [(100, true), (30, false)] {
        producer.begin_transaction()?;
        for i in 0..n {
            let key = format!("k{i}");
            producer
                .send(BaseRecord::to(&topic).key(&key).payload("v"))
                .map_err(|(e, _)| e)?;
        }
        if commit {
            producer.commit_transaction(timeout)?;
        } else {
            producer.flush(timeout)?;
            producer.abort_transaction(timeout)?;
        }
    }
    let offsets: i64 = broker.end_offsets(&topic)?.values().sum();
    ensure!(
        offsets > 130,
        "markers and aborted records should take offsets: {offsets}"
    );
    let addr = broker.addr();
    let (code, out) = sieve(&[
        "ctl",
        "topics",
        "count",
        "--brokers",
        &addr,
        "--topic",
        &topic,
    ])?;
    ensure!(code == 0 && out.trim() == "100", "{code}: {out}");
    Ok(())
}

/// On a three-node cluster, the file's topics get the broker's replication (3, min ISR 2), and
/// the changelog topic dedup creates copies its input's replication factor: losing a broker
/// loses neither the input nor the state.
#[test]
fn topics_and_changelogs_get_the_clusters_replication() -> Result<()> {
    let cluster = Cluster::start(3)?;
    let addr = cluster.addr();
    let prefix = format!("{}-", unique("r"));
    let (code, out) = apply_topics(&addr, &prefix, &[])?;
    ensure!(code == 0, "{out}");
    let clients = cluster.clients();
    let reader = clients.reader()?;
    let raw = format!("{prefix}events.raw");
    ensure!(clients.replication_of(&reader, &raw)? == 3);
    let isr = topic_config(&clients, &raw, "min.insync.replicas")?;
    ensure!(isr.as_deref() == Some("2"), "min.insync.replicas {isr:?}");

    let group = unique("repl");
    let dir = tempfile::tempdir()?;
    let mut args: Vec<String> = [
        "dedup".to_string(),
        "--input".into(),
        raw.clone(),
        "--output".into(),
        format!("{prefix}events.unique"),
        "--dlq".into(),
        format!("{prefix}dlq.dedup"),
    ]
    .to_vec();
    args.extend(service_args_at(&addr, &group, &dir.path().join("state")));
    let mut svc = Service::spawn(Path::new(BIN), &args, &[], dir.path())?;
    let changelog = sieve_core::changelog::topic_name(&group, &raw);
    let replication = wait_for("dedup's changelog topic", Duration::from_secs(90), || {
        clients.replication_of(&reader, &changelog).ok()
    });
    let replication = replication.map_err(|e| e.context(svc.log_tail(20)))?;
    ensure!(replication == 3, "changelog replication {replication}");
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    Ok(())
}
