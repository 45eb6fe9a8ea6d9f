//! `sieve ctl` against a real local broker: topics from the declarative file, and lag.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Result};
use sieve_tests::{unique, Broker};

const BIN: &str = env!("CARGO_BIN_EXE_sieve");

fn sieve(args: &[&str]) -> Result<(i32, String)> {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "off")
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.code().unwrap_or(-1), text))
}

#[test]
fn topics_apply_creates_then_reports_up_to_date_and_drift() -> Result<()> {
    let broker = Broker::start()?;
    let addr = broker.addr();
    let prefix = format!("{}-", unique("t"));
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/topics.toml");
    let file = file.to_str().unwrap_or_default();
    let apply = |prefix: &str, extra: &[&str]| {
        let mut args = vec![
            "ctl",
            "topics",
            "apply",
            "--brokers",
            &addr,
            "--file",
            file,
            "--prefix",
            prefix,
        ];
        args.extend_from_slice(extra);
        sieve(&args)
    };

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
