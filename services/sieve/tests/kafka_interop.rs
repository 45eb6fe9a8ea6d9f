//! sieve beside Kafka's own tools, from the jars `scripts/broker.sh` installs: producers agree
//! on partitions with Kafka's Java producer, and `sieve ctl lag` / `ctl replay` agree with
//! `kafka-consumer-groups` (`ConsumerGroupCommand`) on the same group.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sieve_tests::{kafka_tool, run_cli, unique, Broker, TestRecord};

const BIN: &str = env!("CARGO_BIN_EXE_sieve");
const GROUPS_TOOL: &str = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand";

/// `sieve ARGS` with `stdin`: exit code, stdout and stderr.
fn sieve(args: &[&str], stdin: &[u8]) -> Result<(i32, String)> {
    run_cli(Path::new(BIN), args, stdin)
}

/// key → partition of every record of `topic`.
fn placement(broker: &Broker, topic: &str) -> Result<BTreeMap<Vec<u8>, i32>> {
    Ok(broker
        .read_all(topic)?
        .iter()
        .filter_map(|m| Some((m.key()?.to_vec(), m.partition())))
        .collect())
}

/// Dedup's one owner per key and the co-partitioned anti-join need every producer of a topic,
/// sieve's and a Java service's alike, to put a key on the same partition.
#[test]
fn sieve_and_the_java_producer_put_each_key_on_the_same_partition() -> Result<()> {
    let broker = Broker::start()?;
    let addr = broker.addr();
    let (java, ours) = (unique("java"), unique("sieve"));
    broker.create_topic(&java, 8)?;
    broker.create_topic(&ours, 8)?;
    let keys: Vec<String> = (0..400)
        .map(|i| format!("user-{i}"))
        .chain(["guest", "zoë", "a", "0"].map(String::from))
        .collect();
    let tab_lines: String = keys
        .iter()
        .map(|k| format!("{k}\t{{\"id\":\"{k}\"}}\n"))
        .collect();
    kafka_tool(
        "org.apache.kafka.tools.ConsoleProducer",
        &[
            "--bootstrap-server",
            &addr,
            "--topic",
            &java,
            "--reader-property",
            "parse.key=true",
        ],
        tab_lines.as_bytes(),
    )?;
    let ndjson: String = keys
        .iter()
        .map(|k| format!("{{\"id\":\"{k}\"}}\n"))
        .collect();
    let (code, out) = sieve(
        &[
            "ctl",
            "produce",
            "--brokers",
            &addr,
            "--topic",
            &ours,
            "--key-pointer",
            "/id",
        ],
        ndjson.as_bytes(),
    )?;
    ensure!(code == 0, "ctl produce: {out}");
    let (theirs, mine) = (placement(&broker, &java)?, placement(&broker, &ours)?);
    ensure!(theirs.len() == keys.len() && mine.len() == keys.len());
    let spread: std::collections::BTreeSet<i32> = mine.values().copied().collect();
    ensure!(spread.len() == 8, "keys landed on {spread:?} only");
    let differ: Vec<String> = theirs
        .iter()
        .filter(|(k, p)| mine.get(*k) != Some(*p))
        .map(|(k, p)| {
            format!(
                "{} java {p} sieve {:?}",
                String::from_utf8_lossy(k),
                mine.get(k)
            )
        })
        .collect();
    ensure!(differ.is_empty(), "partitions differ: {differ:?}");
    Ok(())
}

/// The table rows of a tool's output whose column `topic_col` is `topic`, split on spaces.
fn rows<'a>(out: &'a str, topic: &str, topic_col: usize) -> Vec<Vec<&'a str>> {
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|c| c.get(topic_col) == Some(&topic))
        .collect()
}

/// partition → column `col` of the rows of `topic`.
fn column(out: &str, topic: &str, topic_col: usize, col: usize) -> Result<BTreeMap<i32, String>> {
    rows(out, topic, topic_col)
        .into_iter()
        .map(|c| {
            let p = c
                .get(topic_col + 1)
                .context("no partition column")?
                .parse()?;
            let v = c.get(col).context("short row")?.to_string();
            Ok((p, v))
        })
        .collect()
}

#[test]
fn lag_and_replay_agree_with_kafka_consumer_groups() -> Result<()> {
    let broker = Broker::start()?;
    let addr = broker.addr();
    let topic = unique("cg");
    let group = unique("cg-group");
    broker.create_topic(&topic, 3)?;
    // Record timestamps (CreateTime) a second apart, in the past: what --to-datetime reads.
    let base = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64 - 3_600_000;
    let keys: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    broker.produce_records(
        &topic,
        keys.iter().enumerate().map(|(i, k)| TestRecord {
            key: k.as_bytes(),
            value: b"{}",
            timestamp_ms: Some(base + i as i64 * 1_000),
            ..Default::default()
        }),
    )?;
    // Half of each partition consumed and committed.
    let ends = broker.end_offsets(&topic)?;
    let consumer: BaseConsumer = broker.clients().consumer_config(&group).create()?;
    let mut tpl = TopicPartitionList::new();
    for (p, end) in &ends {
        tpl.add_partition_offset(&topic, *p, Offset::Offset(end / 2))?;
    }
    consumer.commit(&tpl, CommitMode::Sync)?;
    drop(consumer);

    let describe = || {
        kafka_tool(
            GROUPS_TOOL,
            &["--bootstrap-server", &addr, "--describe", "--group", &group],
            b"",
        )
        .map(|(_, out)| out)
    };
    // `sieve ctl COMMAND` on this group and topic, plus `extra`.
    let ctl = |command: &str, extra: &[&str]| {
        let on = [
            "ctl",
            command,
            "--brokers",
            &addr,
            "--group",
            &group,
            "--topic",
            &topic,
        ];
        sieve(&[&on[..], extra].concat(), b"")
    };
    // sieve: TOPIC PARTITION COMMITTED END LAG; Kafka: GROUP TOPIC PARTITION CURRENT-OFFSET
    // LOG-END-OFFSET LAG …
    let (code, ours) = ctl("lag", &[])?;
    ensure!(code == 0, "{ours}");
    let theirs = describe()?;
    for (our_col, their_col) in [(2, 3), (3, 4), (4, 5)] {
        let (a, b) = (
            column(&ours, &topic, 0, our_col)?,
            column(&theirs, &topic, 1, their_col)?,
        );
        ensure!(
            a.len() == 3 && a == b,
            "sieve ctl lag:\n{ours}\nkafka-consumer-groups:\n{theirs}"
        );
    }

    // The same plan for a datetime: the first record at or after it, by record timestamp.
    let at = humantime::format_rfc3339_millis(
        UNIX_EPOCH + Duration::from_millis((base + 150_500) as u64),
    )
    .to_string();
    let (code, plan) = ctl("replay", &["--to-datetime", &at, "--dry-run"])?;
    ensure!(code == 0, "{plan}");
    let (_, kafka_plan) = kafka_tool(
        GROUPS_TOOL,
        &[
            "--bootstrap-server",
            &addr,
            "--reset-offsets",
            "--group",
            &group,
            "--topic",
            &topic,
            "--to-datetime",
            &at,
            "--dry-run",
        ],
        b"",
    )?;
    // sieve: TOPIC PARTITION CURRENT NEW REPROCESS; Kafka: GROUP TOPIC PARTITION NEW-OFFSET.
    let (a, b) = (
        column(&plan, &topic, 0, 3)?,
        column(&kafka_plan, &topic, 1, 3)?,
    );
    ensure!(
        a.len() == 3 && a == b,
        "sieve ctl replay --dry-run:\n{plan}\nkafka-consumer-groups --dry-run:\n{kafka_plan}"
    );

    // After --execute, Kafka's tool shows the offsets sieve set.
    let (code, out) = ctl("replay", &["--to-offset", "20", "--execute"])?;
    ensure!(code == 0, "{out}");
    let current = column(&describe()?, &topic, 1, 3)?;
    ensure!(
        current.len() == 3 && current.values().all(|o| o == "20"),
        "after replay --to-offset 20, kafka-consumer-groups shows {current:?}"
    );
    Ok(())
}
