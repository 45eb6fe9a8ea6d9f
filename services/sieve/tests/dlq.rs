//! `sieve ctl dlq` on `sieve dedup`'s DLQ, on Apache Kafka started by the harness: reasons with counts,
//! records shown with their origin, redrive of original bytes and headers with a marker, and
//! no DLQ record redriven twice whatever the filters.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Result};
use common::{count, generated, Pipeline};
use rdkafka::message::{Headers, Message};
use sieve::gen::EventKind;
use sieve_tests::{header_str, unique, TestRecord};

const MISSING_KEY: usize = 20;

/// The number in the COUNT column of `reason`'s row of `dlq list`.
fn listed(out: &str, reason: &str) -> Option<u64> {
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(reason))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
}

#[test]
fn dlq_list_show_and_redrive_each_record_once() -> Result<()> {
    let p = Pipeline::new(2)?;
    let events = generated(3_000, 51);
    let conflicts = count(&events, EventKind::Conflict);
    ensure!(conflicts > 10, "too few conflicts to test with");
    p.produce(&events)?;
    // Records without an idempotency key: a second reason.
    let bodies: Vec<String> = (0..MISSING_KEY).map(|i| format!("{{\"n\":{i}}}")).collect();
    p.broker.produce_records(
        &p.raw,
        bodies.iter().map(|b| TestRecord {
            key: b"nokey",
            value: b.as_bytes(),
            headers: vec![("trace", b"t-1")],
            timestamp_ms: None,
        }),
    )?;
    let mut svc = p.spawn()?;
    p.wait_for_counts(
        &mut svc,
        count(&events, EventKind::New),
        conflicts + MISSING_KEY,
    )?;
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    let dlq = ["--topic", p.dlq.as_str()];

    let (code, out) = p.ctl(&["dlq", "list"], &dlq)?;
    ensure!(code == 0, "{out}");
    ensure!(
        listed(&out, "idempotency_conflict") == Some(conflicts as u64),
        "{out}"
    );
    ensure!(
        listed(&out, "missing_idempotency_key") == Some(MISSING_KEY as u64),
        "{out}"
    );
    ensure!(
        listed(&out, "TOTAL") == Some((conflicts + MISSING_KEY) as u64),
        "{out}"
    );
    let (_, out) = p.ctl(
        &["dlq", "list"],
        &[&dlq[..], &["--since", "2999-01-01T00:00:00Z"]].concat(),
    )?;
    ensure!(
        listed(&out, "TOTAL") == Some(0),
        "--since in the future: {out}"
    );

    let (code, out) = p.ctl(
        &["dlq", "show"],
        &[
            &dlq[..],
            &["--reason", "missing_idempotency_key", "--limit", "3"],
        ]
        .concat(),
    )?;
    ensure!(code == 0, "{out}");
    let shown: Vec<&str> = out.lines().filter(|l| l.contains("reason=")).collect();
    ensure!(shown.len() == 3, "--limit 3 showed {}:\n{out}", shown.len());
    ensure!(
        shown
            .iter()
            .all(|l| l.contains("reason=missing_idempotency_key")
                && l.contains(&format!("source={}/", p.raw))),
        "{out}"
    );
    ensure!(
        out.contains("{\\\"n\\\":0}") || out.contains("{\"n\":0}"),
        "no payload preview:\n{out}"
    );

    // Conflicts to a topic of their own: every one once, original bytes, marker header.
    let fixed = unique("fixed");
    p.broker.create_topic(&fixed, 2)?;
    let conflicts_only = [
        &dlq[..],
        &["--reason", "idempotency_conflict", "--to-topic", &fixed],
    ]
    .concat();
    let (code, out) = p.ctl(&["dlq", "redrive"], &conflicts_only)?;
    ensure!(
        code == 0 && out.contains(&format!("redriven {conflicts} record")),
        "{out}"
    );
    let inputs: HashSet<(Vec<u8>, Vec<u8>)> = p
        .broker
        .read_all(&p.raw)?
        .iter()
        .map(|m| {
            (
                m.key().unwrap_or_default().to_vec(),
                m.payload().unwrap_or_default().to_vec(),
            )
        })
        .collect();
    let redriven = p.broker.read_all(&fixed)?;
    ensure!(redriven.len() == conflicts);
    let mut markers = HashSet::new();
    for m in &redriven {
        let pair = (
            m.key().unwrap_or_default().to_vec(),
            m.payload().unwrap_or_default().to_vec(),
        );
        ensure!(
            inputs.contains(&pair),
            "redriven bytes differ from the original input"
        );
        let marker = header_str(m, "sieve-redriven-from").unwrap_or_default();
        ensure!(
            marker.starts_with(&format!("{}/0/", p.dlq)),
            "marker {marker:?}"
        );
        markers.insert(marker);
        ensure!(
            header_str(m, "idempotency-key").is_some(),
            "original header lost"
        );
        let names: Vec<&str> = m
            .headers()
            .map(|h| h.iter().map(|x| x.key).collect())
            .unwrap_or_default();
        ensure!(
            !names
                .iter()
                .any(|n| n.starts_with("sieve-dlq-") || *n == "sieve-id"),
            "DLQ headers redriven: {names:?}"
        );
    }
    ensure!(
        markers.len() == conflicts,
        "a DLQ record was redriven twice"
    );

    // Again: nothing redriven twice.
    let (code, out) = p.ctl(&["dlq", "redrive"], &conflicts_only)?;
    ensure!(
        code == 0
            && out.contains("redriven 0 record")
            && out.contains(&format!("{conflicts} skipped")),
        "{out}"
    );
    ensure!(p.broker.count(&fixed)? == conflicts as i64);

    // Everything to its source topic: only the records not redriven yet go.
    let raw_before = p.broker.count(&p.raw)?;
    let (code, out) = p.ctl(&["dlq", "redrive"], &dlq)?;
    ensure!(
        code == 0 && out.contains(&format!("redriven {MISSING_KEY} record")),
        "{out}"
    );
    ensure!(p.broker.count(&p.raw)? == raw_before + MISSING_KEY as i64);
    let back: Vec<_> = p
        .broker
        .read_all(&p.raw)?
        .into_iter()
        .filter(|m| header_str(m, "sieve-redriven-from").is_some())
        .collect();
    ensure!(back.len() == MISSING_KEY);
    ensure!(back
        .iter()
        .all(|m| header_str(m, "trace").as_deref() == Some("t-1")));
    Ok(())
}
