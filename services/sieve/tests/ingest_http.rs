//! `sieve ingest serve` end to end: the real binary as a child process, real HTTP over
//! loopback, Apache Kafka started by the harness. What the server answered is compared with what the topic
//! holds.

mod ingest_common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ingest_common::{ensure_status, event, post, Ingest, Resp, KEY, KEY_LIMITED, KEY_RESTRICTED};
use rdkafka::message::Message;
use serde::Deserialize;
use sieve_core::signal::{self, Signal};
use sieve_tests::{header_str, unique, wait_for, Broker};

struct Topics {
    events: String,
    plain: String,
    users: String,
    dlq: String,
}

impl Topics {
    fn create(broker: &Broker) -> Result<Topics> {
        let t = Topics {
            events: unique("events"),
            plain: unique("plain"),
            users: unique("users"),
            dlq: unique("dlq-ingest"),
        };
        for name in [&t.events, &t.plain, &t.users] {
            broker.create_topic(name, 4)?;
        }
        broker.create_topic(&t.dlq, 1)?;
        Ok(t)
    }

    fn streams(&self) -> String {
        format!(
            r#"
[streams.events]
topic = "{}"
schema = "event.schema.json"
idempotency_field = "/event_id"

[streams.plain]
topic = "{}"
schema = "event.schema.json"

[streams.users]
topic = "{}"
schema = "user.schema.json"
key_field = "/id"
salt = {{ buckets = 4, keys = ["guest"] }}

[streams.notify]
topic = "{}"
schema = "notification-request.schema.json"

[streams.keyed]
topic = "{}"
schema = "user.schema.json"
key_field = "/user_id"
"#,
            self.events, self.plain, self.users, self.plain, self.users
        )
    }
}

fn accepted(r: &Resp) -> Vec<serde_json::Value> {
    r.json["results"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| x["status"] == "accepted")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn single_array_and_ndjson_land_with_keys_headers_and_partitions() -> Result<()> {
    let broker = Broker::start()?;
    let t = Topics::create(&broker)?;
    let dir = tempfile::tempdir()?;
    let mut ingest = Ingest::start(&broker.addr(), &t.dlq, &t.streams(), &[], dir.path())?;

    // One record with an Idempotency-Key, then the client's retry of the same request.
    let first = ingest.send("plain", "application/json", Some("req-1"), &event("a1"));
    ensure_status(&first, 202)?;
    let retry = ingest.send("plain", "application/json", Some("req-1"), &event("a1"));
    ensure_status(&retry, 202)?;
    let (r1, r2) = (&first.json["results"][0], &retry.json["results"][0]);
    ensure!(r1["idempotency_key"] == "req-1" && r2["idempotency_key"] == "req-1");
    ensure!(
        r1["partition"] == r2["partition"],
        "a retry lands on the same partition"
    );
    // Without a key: a hash of stream + body, the same for the same bytes.
    let h1 = ingest.send("plain", "application/json", None, &event("a2"));
    let h2 = ingest.send("plain", "application/json", None, &event("a2"));
    ensure_status(&h1, 202)?;
    ensure!(h1.json["results"][0]["idempotency_key"] == h2.json["results"][0]["idempotency_key"]);
    ensure!(h1.json["results"][0]["idempotency_key"]
        .as_str()
        .is_some_and(|k| k.starts_with("h:")));

    // A JSON array: keys from the idempotency field; a bad record is rejected, not fatal.
    let array = format!(
        "[{}, {}, {{\"event_id\":\"b3\",\"type\":\"login\"}}, {}]",
        event("b1"),
        event("b2"),
        event("b4")
    );
    let arr = ingest.send("events", "application/json", None, &array);
    ensure_status(&arr, 202)?;
    ensure!(
        arr.json["accepted"] == 3 && arr.json["rejected"] == 1,
        "{}",
        arr.json
    );
    let bad = &arr.json["results"][2];
    ensure!(
        bad["status"] == "rejected"
            && bad["index"] == 2
            && bad["reason"] == "schema_violation"
            && bad["rule"] == "required",
        "{bad}"
    );

    // NDJSON with gzip: a malformed line is rejected with its line number.
    let nd = format!("{}\n\n{{not json\n{}\n", event("c1"), event("c2"));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(nd.as_bytes())?;
    let auth = format!("Bearer {KEY}");
    let ndr = ingest.post(
        "events",
        "application/x-ndjson",
        &[("Authorization", &auth), ("Content-Encoding", "gzip")],
        &gz.finish()?,
    );
    ensure_status(&ndr, 202)?;
    ensure!(ndr.json["accepted"] == 2, "{}", ndr.json);
    let bad = &ndr.json["results"][1];
    ensure!(bad["reason"] == "bad_json" && bad["line"] == 3, "{bad}");

    // Users: the key field is the Kafka key; the hot key `guest` is salted.
    let users: Vec<String> = (0..40)
        .map(|i| format!(r#"{{"id":"guest","seq":{i}}}"#))
        .chain((0..10).map(|i| format!(r#"{{"id":"u{i}"}}"#)))
        .collect();
    let ur = ingest.send(
        "users",
        "application/json",
        Some("batch-u"),
        &format!("[{}]", users.join(",")),
    );
    ensure_status(&ur, 202)?;
    ensure!(ur.json["accepted"] == 50);

    // The topics hold exactly what was answered, where it was answered.
    let plain = broker.read_all(&t.plain)?;
    ensure!(plain.len() == 4, "plain holds {}", plain.len());
    for (resp, key) in [(&first, "req-1"), (&retry, "req-1")] {
        let (p, o) = (
            resp.json["results"][0]["partition"].as_i64().unwrap_or(-1),
            resp.json["results"][0]["offset"].as_i64().unwrap_or(-1),
        );
        let m = plain
            .iter()
            .find(|m| i64::from(m.partition()) == p && m.offset() == o)
            .context("record at the answered partition and offset")?;
        ensure!(m.key() == Some(key.as_bytes()));
        ensure!(header_str(m, "idempotency-key").as_deref() == Some(key));
        ensure!(header_str(m, "sieve-ingest-tenant").as_deref() == Some("acme"));
        ensure!(header_str(m, "sieve-ingest-stream").as_deref() == Some("plain"));
        ensure!(m.payload() == Some(event("a1").as_bytes()));
    }
    let events = broker.read_all(&t.events)?;
    let keys: BTreeSet<String> = events
        .iter()
        .map(|m| String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned())
        .collect();
    ensure!(
        keys == ["b1", "b2", "b4", "c1", "c2"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "{keys:?}"
    );
    for m in &events {
        ensure!(
            header_str(m, "idempotency-key").map(|k| k.into_bytes()) == m.key().map(<[u8]>::to_vec)
        );
    }
    let users = broker.read_all(&t.users)?;
    ensure!(users.len() == 50);
    let mut guest_partitions = BTreeSet::new();
    let mut by_key: HashMap<Vec<u8>, BTreeSet<i32>> = HashMap::new();
    for m in &users {
        let key = m.key().unwrap_or_default().to_vec();
        by_key.entry(key.clone()).or_default().insert(m.partition());
        match header_str(m, "sieve-salt") {
            Some(salt) => {
                ensure!(key == format!("guest~{salt}").into_bytes());
                guest_partitions.insert(m.partition());
            }
            None => ensure!(!key.starts_with(b"guest")),
        }
        // A batch header names each record: header/index.
        ensure!(header_str(m, "idempotency-key").is_some_and(|k| k.starts_with("batch-u/")));
    }
    ensure!(
        by_key.values().all(|p| p.len() == 1),
        "one partition per key"
    );
    ensure!(
        guest_partitions.len() > 1,
        "the hot key spreads: {guest_partitions:?}"
    );

    // Rejected records of accepted batches are in the DLQ with their reason and bytes.
    let dlq = broker.read_all(&t.dlq)?;
    let reasons: BTreeSet<String> = dlq
        .iter()
        .filter_map(|m| header_str(m, "sieve-dlq-reason"))
        .collect();
    ensure!(dlq.len() == 2, "dlq holds {}", dlq.len());
    ensure!(
        reasons
            == ["bad_json", "schema_violation"]
                .iter()
                .map(|s| s.to_string())
                .collect()
    );
    ensure!(dlq
        .iter()
        .any(|m| m.payload() == Some(b"{not json".as_slice())));
    ensure!(dlq
        .iter()
        .all(|m| header_str(m, "sieve-dlq-stage").as_deref() == Some("ingest")));

    // The OpenAPI document served is the committed one.
    let (status, body) = sieve_tests::http_get(&ingest.url("/openapi.json")).context("openapi")?;
    ensure!(status == 200 && body == sieve_ingest::http::OPENAPI);
    let (status, metrics) = sieve_tests::http_get(&ingest.url("/metrics")).context("metrics")?;
    ensure!(status == 200 && metrics.contains("sieve_ingest_requests_total"));

    // A key over its record rate gets 429 with Retry-After; others are not affected.
    let limited = format!("Bearer {KEY_LIMITED}");
    let five: String = (0..5).map(|i| event(&format!("r{i}")) + "\n").collect();
    let r = ingest.post(
        "events",
        "application/x-ndjson",
        &[("Authorization", &limited)],
        five.as_bytes(),
    );
    ensure_status(&r, 202)?;
    let r = ingest.post(
        "events",
        "application/x-ndjson",
        &[("Authorization", &limited)],
        event("r5").as_bytes(),
    );
    ensure!(
        r.status == 429 && r.reason() == "rate_limited" && r.retry_after.is_some(),
        "{r:?}"
    );
    ensure_status(
        &ingest.send("events", "application/json", None, &event("r6")),
        202,
    )?;

    graceful_stop_finishes_the_request_in_flight(&mut ingest, &broker, &t)
}

/// SIGTERM while a request's body is still arriving: the server stops accepting, finishes
/// that request (202, acknowledged), flushes and exits 0.
fn graceful_stop_finishes_the_request_in_flight(
    ingest: &mut Ingest,
    broker: &Broker,
    t: &Topics,
) -> Result<()> {
    use std::io::Read;
    let body = event("in-flight");
    let (head, tail) = body.split_at(body.len() / 2);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", ingest.port))?;
    write!(
        conn,
        "POST /v1/events/plain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nIdempotency-Key: in-flight\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{head}",
        body.len()
    )?;
    conn.flush()?;
    // SIGTERM only once the server has the request: a connection whose request has not
    // started yet is idle, and a graceful stop closes idle connections.
    wait_for("the request in flight", Duration::from_secs(10), || {
        (ingest.svc.metric("sieve_ingest_requests_in_flight", &[]) == Some(1.0)).then_some(())
    })?;
    let pid = ingest.svc.pid().context("pid")?;
    signal::send(pid, Signal::Term)?;
    let ready = ingest.url("/readyz");
    wait_for(
        "the server to stop being ready",
        Duration::from_secs(10),
        || (sieve_tests::http_get(&ready).map(|r| r.0) != Some(200)).then_some(()),
    )?;
    conn.write_all(tail.as_bytes())?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    ensure!(
        answer.starts_with("HTTP/1.1 202"),
        "in-flight request: {answer}"
    );
    let code = ingest
        .svc
        .wait_exit("graceful exit", Duration::from_secs(30))?;
    ensure!(code == 0, "exit code {code}");
    let landed = broker
        .read_all(&t.plain)?
        .iter()
        .any(|m| header_str(m, "idempotency-key").as_deref() == Some("in-flight"));
    ensure!(landed, "the in-flight record is on the topic");
    Ok(())
}

#[derive(Debug, Deserialize)]
struct Manifest {
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    status: u16,
    reason: String,
    body: Option<String>,
    file: Option<String>,
    generate: Option<String>,
    content_type: Option<String>,
    stream: Option<String>,
    key: Option<String>,
    rule: Option<String>,
    path: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = gz.write_all(bytes);
    gz.finish().unwrap_or_default()
}

fn generated(kind: &str) -> Result<Vec<u8>> {
    let padded = |n: usize| {
        format!(
            r#"{{"event_id":"big","user_id":"u","type":"login","pad":"{}"}}"#,
            "x".repeat(n)
        )
        .into_bytes()
    };
    Ok(match kind {
        "record-10mb" => padded(10 << 20),
        "record-2mb" => padded(2 << 20),
        "ndjson-1001" => (0..1001)
            .map(|i| event(&format!("n{i}")) + "\n")
            .collect::<String>()
            .into_bytes(),
        "gzip-bomb-20mb" => gzip(&vec![b' '; 20 << 20]),
        "truncated-gzip" => {
            let g = gzip(event("t").repeat(20).as_bytes());
            g[..g.len() / 2].to_vec()
        }
        "corrupted-gzip" => {
            let mut g = gzip(event("t").repeat(50).as_bytes());
            let mid = g.len() / 2;
            for b in &mut g[mid..mid + 8] {
                *b ^= 0x5a;
            }
            g
        }
        other => anyhow::bail!("unknown generator {other}"),
    })
}

/// Every case of tests/corpus/ingest gets its documented status and a problem body with
/// the documented reason; the server keeps serving good requests between cases.
#[test]
fn bad_input_corpus_gets_documented_answers() -> Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/corpus/ingest");
    let manifest: Manifest =
        toml::from_str(&std::fs::read_to_string(corpus.join("manifest.toml"))?)?;
    ensure!(manifest.case.len() >= 100, "{} cases", manifest.case.len());
    let broker = Broker::start()?;
    let t = Topics::create(&broker)?;
    let dir = tempfile::tempdir()?;
    let ingest = Ingest::start(
        &broker.addr(),
        &t.dlq,
        &t.streams(),
        &["--max-records", "1000"],
        dir.path(),
    )?;
    let url = |s: &str| ingest.url(&format!("/v1/events/{s}"));
    let mut failures = Vec::new();
    for (i, c) in manifest.case.iter().enumerate() {
        let body = match (&c.body, &c.file, &c.generate) {
            (Some(b), _, _) => b.clone().into_bytes(),
            (_, Some(f), _) => ingest_common::read_file(&corpus.join(f))?,
            (_, _, Some(g)) => generated(g)?,
            _ => Vec::new(),
        };
        let auth = match c.key.as_deref().unwrap_or("good") {
            "good" => Some(format!("Bearer {KEY}")),
            "restricted" => Some(format!("Bearer {KEY_RESTRICTED}")),
            "bad" => Some("Bearer not-a-key-at-all".to_string()),
            "basic" => Some("Basic dXNlcjpwYXNz".to_string()),
            _ => None,
        };
        let mut headers: Vec<(&str, &str)> = c
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        let r = post(
            &url(c.stream.as_deref().unwrap_or("events")),
            c.content_type.as_deref().unwrap_or("application/json"),
            &headers,
            &body,
        );
        let first = &r.json["errors"][0];
        let ok = r.status == c.status
            && r.reason() == c.reason
            && r.content_type.as_deref() == Some("application/problem+json")
            && r.json["status"] == c.status
            && c.rule
                .as_ref()
                .is_none_or(|rule| first["rule"] == rule.as_str())
            && c.path.as_ref().is_none_or(|p| first["path"] == p.as_str())
            && (c.status != 429 || r.retry_after.is_some());
        if !ok {
            failures.push(format!(
                "{}: expected {} {} (rule {:?}, path {:?}), got {} {}",
                c.name, c.status, c.reason, c.rule, c.path, r.status, r.json
            ));
        }
        // The server keeps serving.
        let good = ingest.send(
            "events",
            "application/json",
            None,
            &event(&format!("good-{i}")),
        );
        if good.status != 202 {
            failures.push(format!(
                "after {}: good request got {} {}",
                c.name, good.status, good.json
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Nothing of the refused requests reached a topic; every good one did.
    ensure!(broker.count(&t.events)? == manifest.case.len() as i64);
    ensure!(broker.count(&t.dlq)? == 0);
    Ok(())
}

/// More concurrent load than a small in-flight budget: some 429s with Retry-After, and
/// every record answered 202 is on the topic.
#[test]
fn overload_gets_429_and_every_202_is_on_the_topic() -> Result<()> {
    let broker = Broker::start()?;
    let t = Topics::create(&broker)?;
    let dir = tempfile::tempdir()?;
    let ingest = Ingest::start(
        &broker.addr(),
        &t.dlq,
        &t.streams(),
        &[
            "--inflight-records",
            "60",
            "--max-records",
            "20",
            "--max-requests",
            "64",
        ],
        dir.path(),
    )?;
    let url = ingest.url("/v1/events/events");
    let acked = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let statuses = Arc::new(Mutex::new(BTreeMap::<u16, usize>::new()));
    let no_retry_after = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..24)
        .map(|th| {
            let (url, acked, statuses) = (url.clone(), acked.clone(), statuses.clone());
            let no_retry_after = no_retry_after.clone();
            std::thread::spawn(move || {
                let auth = format!("Bearer {KEY}");
                for req in 0..15 {
                    let body: String = (0..20)
                        .map(|i| event(&format!("o-{th}-{req}-{i}")) + "\n")
                        .collect();
                    let r = post(
                        &url,
                        "application/x-ndjson",
                        &[("Authorization", &auth)],
                        body.as_bytes(),
                    );
                    if r.status == 429 && r.retry_after.is_none() {
                        no_retry_after.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    *statuses
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(r.status)
                        .or_default() += 1;
                    if r.status == 202 {
                        let mut a = acked.lock().unwrap_or_else(|e| e.into_inner());
                        for x in accepted(&r) {
                            a.insert(x["idempotency_key"].as_str().unwrap_or("").to_string());
                        }
                    }
                }
            })
        })
        .collect();
    for th in threads {
        th.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
    }
    let statuses = statuses.lock().unwrap_or_else(|e| e.into_inner()).clone();
    eprintln!("statuses: {statuses:?}");
    ensure!(
        no_retry_after.load(std::sync::atomic::Ordering::SeqCst) == 0,
        "every 429 carries Retry-After"
    );
    ensure!(
        statuses.get(&429).copied().unwrap_or(0) > 0,
        "some 429: {statuses:?}"
    );
    ensure!(
        statuses.get(&202).copied().unwrap_or(0) > 0,
        "some 202: {statuses:?}"
    );
    ensure!(
        statuses.keys().all(|s| *s == 202 || *s == 429),
        "only 202 and 429: {statuses:?}"
    );
    let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let on_topic: BTreeSet<String> = broker
        .read_all(&t.events)?
        .iter()
        .filter_map(|m| header_str(m, "idempotency-key"))
        .collect();
    let missing: Vec<&String> = acked.difference(&on_topic).collect();
    ensure!(
        missing.is_empty(),
        "answered 202 but not on the topic: {missing:?}"
    );
    // Memory stayed bounded (bodies are capped by --max-requests × --max-body-bytes).
    let peak = ingest.svc.peak_rss_mib().context("ingest peak RSS")?;
    eprintln!("ingest peak RSS {peak} MiB");
    ensure!(peak < 300, "peak RSS {peak} MiB");
    Ok(())
}

/// The broker stops: 503 (never 202); after it returns, nothing answered 202 is missing.
#[test]
fn broker_unavailable_gets_503_and_nothing_acknowledged_is_lost() -> Result<()> {
    let mut broker = Broker::start()?;
    let t = Topics::create(&broker)?;
    let dir = tempfile::tempdir()?;
    let ingest = Ingest::start(
        &broker.addr(),
        &t.dlq,
        &t.streams(),
        &["--ack-timeout", "2s"],
        dir.path(),
    )?;
    let mut acked = BTreeSet::new();
    let mut send = |id: &str| -> Resp {
        let r = ingest.send("events", "application/json", None, &event(id));
        if r.status == 202 {
            acked.insert(id.to_string());
        }
        r
    };
    ensure_status(&send("before-1"), 202)?;
    broker.kill();
    let mut unavailable = 0;
    for i in 0..4 {
        let r = send(&format!("down-{i}"));
        ensure!(r.status == 503, "broker down: got {} {}", r.status, r.json);
        ensure!(r.reason() == "broker_unavailable" && r.retry_after.is_some());
        unavailable += 1;
    }
    let ready = sieve_tests::http_get(&ingest.url("/readyz")).map(|r| r.0);
    ensure!(
        ready == Some(503),
        "not ready while the broker is down: {ready:?}"
    );
    broker.restart()?;
    let mut n = 0;
    wait_for(
        "a 202 after the broker returned",
        Duration::from_secs(90),
        || {
            n += 1;
            let r = send(&format!("after-{n}"));
            ensure_status(&r, 202).ok().or_else(|| {
                // Only 503 while it reconnects; never anything else.
                assert_eq!(r.status, 503, "{}", r.json);
                None
            })
        },
    )
    .with_context(|| {
        format!(
            "{}\nbroker log:\n{}",
            ingest.svc.log_tail(20),
            broker.log_tail(40)
        )
    })?;
    for i in 0..5 {
        ensure_status(&send(&format!("later-{i}")), 202)?;
    }
    let on_topic: BTreeSet<String> = broker
        .read_all(&t.events)?
        .iter()
        .filter_map(|m| header_str(m, "idempotency-key"))
        .collect();
    let missing: Vec<&String> = acked.difference(&on_topic).collect();
    ensure!(missing.is_empty(), "answered 202 but missing: {missing:?}");
    eprintln!(
        "{unavailable} answered 503 while down; {} acknowledged",
        acked.len()
    );

    // A server whose broker never answers starts, is not ready, and answers 503.
    let dead = format!("127.0.0.1:{}", sieve_tests::free_port());
    let orphan = Ingest::start(
        &dead,
        &t.dlq,
        &t.streams(),
        &["--ack-timeout", "1s", "--connect-timeout", "500ms"],
        dir.path(),
    )?;
    let r = orphan.send("events", "application/json", None, &event("nowhere"));
    ensure!(r.status == 503, "{} {}", r.status, r.json);
    ensure!(sieve_tests::http_get(&orphan.url("/readyz")).map(|r| r.0) == Some(503));
    Ok(())
}
