//! Security of `sieve ingest serve`, end to end with the real binary and broker: API keys
//! never reach logs or DLQ headers; slow clients are cut off while others are served; HTTPS
//! with a certificate made at test time.

mod ingest_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ingest_common::{ensure_status, post, Ingest, KEY, KEY_LIMITED, KEY_RESTRICTED};
use rdkafka::message::Message;
use sieve_tests::{header_leak, unique, wait_for, Broker};
use tokio_rustls::rustls;

struct Setup {
    broker: Broker,
    events: String,
    dlq: String,
}

impl Setup {
    fn new() -> Result<Setup> {
        let broker = Broker::start()?;
        let (events, dlq) = (unique("events"), unique("dlq-ingest"));
        broker.create_topic(&events, 2)?;
        broker.create_topic(&dlq, 1)?;
        Ok(Setup {
            broker,
            events,
            dlq,
        })
    }

    fn streams(&self) -> String {
        format!(
            "[streams.events]\ntopic = \"{}\"\nschema = \"event.schema.json\"\n\
             idempotency_field = \"/event_id\"\n\n[streams.users]\ntopic = \"{}\"\n\
             schema = \"user.schema.json\"\nkey_field = \"/id\"\n",
            self.events, self.events
        )
    }

    fn ingest(&self, extra: &[&str], dir: &Path) -> Result<Ingest> {
        Ingest::start(&self.broker.addr(), &self.dlq, &self.streams(), extra, dir)
    }
}

fn event(id: &str) -> String {
    format!(r#"{{"event_id":"{id}","user_id":"u-{id}","type":"login"}}"#)
}

/// Every way a key reaches the server (good, restricted on a forbidden stream, unknown,
/// in both headers, in a rejected record's batch), at debug log level: afterwards neither
/// the log nor any DLQ record's headers hold a key.
#[test]
fn api_keys_never_reach_logs_or_dlq_headers() -> Result<()> {
    let s = Setup::new()?;
    let dir = tempfile::tempdir()?;
    let ingest = Ingest::start_with_env(
        &s.broker.addr(),
        &s.dlq,
        &s.streams(),
        &[],
        &[("RUST_LOG", "debug")],
        dir.path(),
    )?;
    let guessed = "guessed-secret-key-0123456789";
    let url = ingest.url("/v1/events/events");
    let bearer = |k: &str| format!("Bearer {k}");
    let batch = format!("{}\n{{\"event_id\":\"bad\"}}\n", event("k1"));
    let ndjson = "application/x-ndjson";
    let r = post(
        &url,
        ndjson,
        &[("Authorization", &bearer(KEY))],
        batch.as_bytes(),
    );
    ensure_status(&r, 202)?;
    let r = post(
        &url,
        ndjson,
        &[("X-Api-Key", KEY_LIMITED)],
        batch.as_bytes(),
    );
    ensure_status(&r, 202)?;
    let r = post(
        &url,
        ndjson,
        &[("Authorization", &bearer(guessed))],
        batch.as_bytes(),
    );
    ensure!(r.status == 401 && r.reason() == "invalid_api_key", "{r:?}");
    let r = post(&url, ndjson, &[("X-Api-Key", guessed)], batch.as_bytes());
    ensure!(r.status == 401, "{r:?}");
    let r = post(&url, ndjson, &[], batch.as_bytes());
    ensure!(r.status == 401 && r.reason() == "missing_api_key", "{r:?}");
    let r = post(
        &url,
        ndjson,
        &[("Authorization", &bearer(KEY_RESTRICTED))],
        batch.as_bytes(),
    );
    ensure!(
        r.status == 403 && r.reason() == "stream_not_allowed",
        "{r:?}"
    );
    // Two rejected records (one per accepted request) are in the DLQ.
    let dlq = wait_for("2 DLQ records", Duration::from_secs(30), || {
        s.broker.read_all(&s.dlq).ok().filter(|m| m.len() >= 2)
    })?;
    ensure!(dlq.len() == 2, "{} DLQ records", dlq.len());
    let secrets = [KEY, KEY_LIMITED, KEY_RESTRICTED, guessed];
    ensure!(
        dlq.iter().all(|m| m.headers().is_some()),
        "DLQ record without headers"
    );
    if let Some(leak) = header_leak(&dlq, &secrets) {
        anyhow::bail!("DLQ header {leak} holds a key");
    }
    let logs = ingest.svc.logs();
    ensure!(logs.contains("ingest serving"), "no log captured:\n{logs}");
    for secret in secrets {
        ensure!(!logs.contains(secret), "the log holds {secret}:\n{logs}");
    }
    Ok(())
}

/// A client that never finishes its headers is disconnected after the header timeout; one
/// that trickles its body gets 408 `request_timeout`; others are served meanwhile.
#[test]
fn slow_clients_time_out_and_others_are_served() -> Result<()> {
    let s = Setup::new()?;
    let dir = tempfile::tempdir()?;
    let ingest = s.ingest(&["--body-timeout", "2s", "--max-requests", "2"], dir.path())?;
    let addr = format!("127.0.0.1:{}", ingest.port);
    // Headers that never end.
    let mut silent = TcpStream::connect(&addr)?;
    silent.write_all(b"POST /v1/events/events HTTP/1.1\r\nHost: x\r\n")?;
    // A body that trickles: 1 byte of the 1000 announced, twice a request slot's worth.
    let head = format!(
        "POST /v1/events/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
    );
    let mut tricklers = Vec::new();
    for _ in 0..2 {
        let mut t = TcpStream::connect(&addr)?;
        t.write_all(head.as_bytes())?;
        tricklers.push(t);
    }
    // Both tricklers hold their slots before anyone else asks for one.
    wait_for("the tricklers in flight", Duration::from_secs(10), || {
        (ingest.svc.metric("sieve_ingest_requests_in_flight", &[])? >= 2.0).then_some(())
    })?;
    let started = Instant::now();
    // With both request slots held by tricklers, a good request still gets an answer:
    // 429 while they hold them, 202 once they timed out; never a hang.
    let good = wait_for(
        "a good request to be accepted",
        Duration::from_secs(15),
        || {
            let r = ingest.send("events", "application/json", None, &event("fast"));
            (r.status == 202).then_some(r)
        },
    )?;
    ensure_status(&good, 202)?;
    for mut t in tricklers {
        t.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut answer = Vec::new();
        // Until the server closes or the read timeout: either way the answer is in.
        let _ = t.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        ensure!(
            answer.starts_with("HTTP/1.1 408") && answer.contains("request_timeout"),
            "trickling client got: {answer}"
        );
    }
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "408 after {:?}",
        started.elapsed()
    );
    silent.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut rest = Vec::new();
    let n = silent
        .read_to_end(&mut rest)
        .context("silent client not disconnected")?;
    ensure!(
        started.elapsed() < Duration::from_secs(20),
        "silent client disconnected after {:?}",
        started.elapsed()
    );
    let cut = String::from_utf8_lossy(&rest);
    ensure!(
        n == 0 || cut.starts_with("HTTP/1.1 408"),
        "silent client got: {cut}"
    );
    ensure_status(
        &ingest.send("events", "application/json", None, &event("after")),
        202,
    )?;
    Ok(())
}

/// `--tls-cert`/`--tls-key`: the API answers over HTTPS with the configured certificate
/// and a plain-HTTP request on the same port gets no answer.
#[test]
fn ingest_serves_https() -> Result<()> {
    let s = Setup::new()?;
    let dir = tempfile::tempdir()?;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem())?;
    std::fs::write(&key_path, cert.key_pair.serialize_pem())?;
    let (c, k) = (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );
    let ingest = s.ingest(&["--tls-cert", &c, "--tls-key", &k], dir.path())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let body = event("tls");
    let request = format!(
        "POST /v1/events/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let conn = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into()?)?;
    let tcp = TcpStream::connect(("127.0.0.1", ingest.port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    // The server closes after the answer (`Connection: close`), with or without close_notify.
    let _ = tls.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    ensure!(answer.starts_with("HTTP/1.1 202"), "over TLS: {answer}");
    ensure!(s.broker.count(&s.events)? == 1, "record not on the topic");
    let plain = ingest.send("events", "application/json", None, &event("plain"));
    ensure!(plain.status != 202, "plain HTTP on the TLS port: {plain:?}");
    Ok(())
}
