//! `sieve all` end to end: every service under one supervisor on Apache Kafka started by the harness, records
//! through each stage, a SIGKILLed service restarted by the supervisor with exactly-once output,
//! and a SIGTERM that stops everything after committing what was processed.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rdkafka::message::Message;
use serde_json::Value;
use sieve::gen::{self, EventKind, EventSpec};
use sieve_core::signal::{self, Signal};
use sieve_tests::{wait_for, Broker, Service};

const BIN: &str = env!("CARGO_BIN_EXE_sieve");
const API_KEY: &str = "all-test-key-0001";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `n` consecutive free loopback ports outside the ephemeral range, so a port another test
/// binds with port 0 cannot take one of them.
fn free_ports(n: u16) -> Result<u16> {
    let seed = std::process::id() as u16 ^ (Instant::now().elapsed().subsec_nanos() as u16);
    for attempt in 0..200u16 {
        let base = 20_000 + (seed.wrapping_add(attempt * 97) % 9_000);
        if (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return Ok(base);
        }
    }
    anyhow::bail!("no {n} consecutive free ports")
}

struct All {
    broker: Broker,
    svc: Service,
    ingest: String,
    _dir: tempfile::TempDir,
}

impl All {
    fn start() -> Result<All> {
        let broker = Broker::start()?;
        let dir = tempfile::tempdir()?;
        let topics = repo().join("deploy/topics.toml");
        let (code, out) = ctl(
            &broker,
            &["topics", "apply", "--file", &topics.display().to_string()],
        )?;
        ensure!(code == 0, "topics apply failed: {out}");
        let base = free_ports(6)?;
        let ingest = format!("127.0.0.1:{}", base + 5);
        let args: Vec<String> = [
            "all",
            "--brokers",
            &broker.addr(),
            "-X",
            "session.timeout.ms=6000",
            "--topics",
            &topics.display().to_string(),
            "--state-dir",
            &dir.path().join("state").display().to_string(),
            "--service-port-base",
            &base.to_string(),
            "--ingest-listen",
            &ingest,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let keys = format!("{API_KEY}@test:*");
        let mut env = ingest_env();
        env.push(("SIEVE_INGEST_API_KEYS", keys));
        let svc = spawn(&args, &env, dir.path())?;
        Ok(All {
            broker,
            svc,
            ingest,
            _dir: dir,
        })
    }

    fn services(&self) -> Option<Vec<Value>> {
        let (code, body) = self.svc.get("/services")?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    fn service(&self, name: &str) -> Option<Value> {
        self.services()?.into_iter().find(|s| s["service"] == name)
    }

    fn wait_ready(&self, what: &str) -> Result<()> {
        wait_for(what, Duration::from_secs(120), || {
            matches!(self.svc.get("/readyz"), Some((200, _))).then_some(())
        })
        .with_context(|| format!("log tail:\n{}", self.svc.log_tail(40)))
    }

    fn post_events(&self, lines: &[&[u8]]) -> Result<()> {
        let mut body = Vec::new();
        for l in lines {
            body.extend_from_slice(l);
            body.push(b'\n');
        }
        let resp = ureq::post(&format!("http://{}/v1/events/events", self.ingest))
            .set("Authorization", &format!("Bearer {API_KEY}"))
            .set("Content-Type", "application/x-ndjson")
            .send_bytes(&body);
        let status = match resp {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, r)) => {
                anyhow::bail!(
                    "POST answered {code}: {}",
                    r.into_string().unwrap_or_default()
                )
            }
            Err(e) => return Err(e.into()),
        };
        ensure!(status == 202, "POST answered {status}");
        Ok(())
    }
}

/// Ingest's streams and schemas, wherever the test runs from.
fn ingest_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "SIEVE_INGEST_SCHEMAS",
            repo().join("schemas").display().to_string(),
        ),
        (
            "SIEVE_INGEST_STREAMS",
            repo().join("deploy/streams.toml").display().to_string(),
        ),
    ]
}

fn spawn(args: &[String], env: &[(&str, String)], dir: &Path) -> Result<Service> {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Service::spawn(Path::new(BIN), args, &env, dir)
}

fn ctl(broker: &Broker, args: &[&str]) -> Result<(i32, String)> {
    let out = std::process::Command::new(BIN)
        .arg("ctl")
        .args(args)
        .args(["--brokers", &broker.addr()])
        .current_dir(repo())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[test]
fn every_service_runs_under_one_supervisor_and_survives_a_crash() -> Result<()> {
    let events: Vec<gen::Event> = gen::events(EventSpec {
        count: 4_000,
        retry_rate: 0.2,
        conflict_rate: 0.02,
        seed: 7,
        ..Default::default()
    })
    .collect();
    let new = events.iter().filter(|e| e.kind == EventKind::New).count() as i64;
    let conflicts = events
        .iter()
        .filter(|e| e.kind == EventKind::Conflict)
        .count() as i64;
    let all = All::start()?;
    let b = &all.broker;
    // Fixtures the side tables hold before the services start judging input.
    b.produce(
        "users.current",
        ["u1", "u2", "u3", "guest"].map(|id| (id, format!(r#"{{"id":"{id}"}}"#))),
    )?;
    b.produce(
        "users.prefs",
        [(
            "alice",
            format!(
                r#"{{"user_id":"alice","last_active":"{}","device_tokens":["tok-alice"]}}"#,
                now()
            ),
        )],
    )?;
    all.wait_ready("every service ready")?;
    let services = all.services().context("GET /services")?;
    ensure!(services.len() == 6, "six services: {services:?}");

    // Ingest → dedup, first half.
    let payloads: Vec<&[u8]> = events.iter().map(|e| e.payload.as_slice()).collect();
    let (first, second) = payloads.split_at(payloads.len() / 2);
    for chunk in first.chunks(500) {
        all.post_events(chunk)?;
    }
    // Anti-join and notify while dedup works.
    b.produce(
        "users.legacy",
        ["u1", "u4", "guest", "u5", "u2", "guest", "u6", "u4"]
            .map(|id| (id, format!(r#"{{"id":"{id}","email":"{id}@example.com"}}"#))),
    )?;
    b.produce(
        "notify.requests.p0",
        [(
            "2fa-1",
            format!(
                r#"{{"notification_id":"2fa-1","priority":0,"category":"security","template":"2fa_code","channels":["push"],"created_at":"{}","audience":["alice"]}}"#,
                now()
            ),
        )],
    )?;

    // A crash: the supervisor restarts dedup, which resumes from its state.
    let pid = wait_for("dedup's pid", Duration::from_secs(10), || {
        all.service("dedup")?["pid"].as_i64()
    })?;
    // SIGKILL to the supervisor's child, a process this test started indirectly.
    signal::send(u32::try_from(pid)?, Signal::Kill)?;
    wait_for("dedup restarted", Duration::from_secs(30), || {
        let s = all.service("dedup")?;
        (s["restarts"].as_u64()? >= 1 && s["pid"].as_i64()? != pid).then_some(())
    })?;
    for chunk in second.chunks(500) {
        all.post_events(chunk)?;
    }

    wait_for("every unique event out", Duration::from_secs(240), || {
        let out = b.count("events.unique").ok()?;
        let dlq = b.count("dlq.dedup").ok()?;
        (out == new && dlq == conflicts).then_some(())
    })
    .with_context(|| format!("log tail:\n{}", all.svc.log_tail(60)))?;
    let keys: Vec<Vec<u8>> = b
        .read_all("events.unique")?
        .iter()
        .filter_map(|m| m.key().map(<[u8]>::to_vec))
        .collect();
    let distinct: BTreeSet<&Vec<u8>> = keys.iter().collect();
    ensure!(distinct.len() == keys.len(), "an event came out twice");
    ensure!(
        b.count("events.raw")? == events.len() as i64,
        "every record accepted lands once"
    );

    wait_for("anti-join view", Duration::from_secs(60), || {
        let view = b.compacted_view("antijoin.out").ok()?;
        let keys: BTreeSet<String> = view
            .into_keys()
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .collect();
        (keys == BTreeSet::from(["u4".into(), "u5".into(), "u6".into()])).then_some(())
    })?;
    let pushes = wait_for("the P0 push", Duration::from_secs(60), || {
        let out = b.read_all("notify.out.push").ok()?;
        (!out.is_empty()).then_some(out)
    })?;
    ensure!(pushes.len() == 1, "one push: {}", pushes.len());
    let body = String::from_utf8_lossy(pushes[0].payload().unwrap_or_default()).into_owned();
    ensure!(body.contains("alice") && body.contains("2fa-1"), "{body}");
    let restarts = all
        .svc
        .metric("sieve_all_restarts_total", &["service=\"dedup\""])
        .unwrap_or(0.0);
    ensure!(restarts >= 1.0, "restart counted: {restarts}");

    // SIGTERM: every service commits and stops, then the supervisor exits 0.
    let pids: Vec<u64> = all
        .services()
        .context("GET /services")?
        .iter()
        .filter_map(|s| s["pid"].as_u64())
        .collect();
    let mut all = all;
    let code = all.svc.terminate(Duration::from_secs(60))?;
    ensure!(
        code == 0,
        "supervisor exit {code}:\n{}",
        all.svc.log_tail(40)
    );
    for pid in pids {
        let alive = signal::alive(u32::try_from(pid)?);
        ensure!(!alive, "service {pid} outlived the supervisor");
    }
    let end = all.broker.end_offsets("events.raw")?;
    let committed = all.broker.committed("sieve-dedup", "events.raw")?;
    ensure!(
        committed == end,
        "dedup committed {committed:?}, end {end:?}"
    );
    Ok(())
}

#[test]
fn a_service_that_cannot_start_stops_the_supervisor_with_its_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = free_ports(5)?;
    let args: Vec<String> = [
        "all",
        "--brokers",
        "127.0.0.1:1",
        "--services",
        "ingest",
        "--ingest-listen",
        &format!("127.0.0.1:{base}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // No API keys: ingest refuses to start, and nothing should keep running without it.
    let mut svc = spawn(&args, &ingest_env(), dir.path())?;
    let code = svc.wait_exit("supervisor exit", Duration::from_secs(60))?;
    let logs = svc.logs();
    ensure!(code == 1, "exit {code}:\n{logs}");
    ensure!(
        logs.contains("ingest exited") && logs.contains("no API keys"),
        "the reason is named:\n{logs}"
    );
    Ok(())
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
