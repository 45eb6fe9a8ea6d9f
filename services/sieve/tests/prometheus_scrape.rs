//! A real Prometheus (Debian's `prometheus` package; skipped when it is not installed) scrapes
//! the `/metrics` of every stream service, evaluates sieve's alert rules against them and
//! holds every metric it saw to the Prometheus naming conventions.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use common::{generated, Pipeline, BIN};
use serde_json::Value;
use sieve_tests::{free_port, http_get, unique, wait_for, Service};

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn installed(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `data` of a Prometheus API answer.
fn api(port: u16, path: &str) -> Option<Value> {
    let (status, body) = http_get(&format!("http://127.0.0.1:{port}{path}"))?;
    let v: Value = serde_json::from_str(&body).ok()?;
    (status == 200 && v["status"] == "success").then(|| v["data"].clone())
}

/// Why a metric's name breaks the Prometheus naming conventions sieve follows, if it does.
fn unconventional(name: &str, kind: &str) -> Option<&'static str> {
    if !name.starts_with("sieve_") {
        return Some("no sieve_ prefix");
    }
    if name.contains("inflight") {
        return Some("in-flight is spelled _in_flight");
    }
    if [
        "_rate", "_share", "_percent", "_ms", "_millis", "_kb", "_mb",
    ]
    .iter()
    .any(|s| name.ends_with(s))
    {
        return Some("not in base units (seconds, bytes; ratios 0..1 end in _ratio)");
    }
    match kind {
        "counter" if !name.ends_with("_total") => Some("a counter that does not end in _total"),
        "gauge" if name.ends_with("_total") => Some("a gauge that ends in _total"),
        "histogram" if !name.ends_with("_duration_seconds") => {
            Some("a histogram that does not end in _duration_seconds")
        }
        "counter" | "gauge" | "histogram" => None,
        _ => Some("a type sieve does not use"),
    }
}

fn alerts_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ops/prometheus/alerts.yml")
}

#[test]
fn prometheus_scrapes_every_service_and_evaluates_the_rules() -> Result<()> {
    if !installed("prometheus") {
        eprintln!("prometheus not installed (apt-get install prometheus): scrape not checked");
        return Ok(());
    }
    let p = Pipeline::new(1)?;
    p.produce(&generated(200, 71))?;
    let mut dedup = p.spawn()?;

    let (left, right, out, dlq) = (
        unique("left"),
        unique("right"),
        unique("out"),
        unique("dlq"),
    );
    for t in [&left, &right, &out, &dlq] {
        p.broker.create_topic(t, 1)?;
    }
    p.broker.produce(
        &left,
        (0..10).map(|i| (format!("u{i}"), format!("{{\"id\":\"u{i}\"}}"))),
    )?;
    let state = p.dir.path().join("antijoin").display().to_string();
    let group = unique("antijoin");
    let args: Vec<String> = [
        "antijoin",
        "stream",
        "--left",
        &left,
        "--right",
        &right,
        "--out",
        &out,
        "--dlq",
        &dlq,
        "--brokers",
        &p.broker.addr(),
        "--group",
        &group,
        "--state-dir",
        &state,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut antijoin = Service::spawn(Path::new(BIN), &args, &[], p.dir.path())?;

    // Notify's planner, deliverer and feedback processor on a prefixed copy of every topic of deploy/topics.toml.
    let prefix = format!("{}-", unique("n"));
    let topics_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/topics.toml");
    let (code, text) = p.ctl(
        &["topics", "apply"],
        &[
            "--file",
            &topics_file.display().to_string(),
            "--prefix",
            &prefix,
        ],
    )?;
    anyhow::ensure!(code == 0, "{text}");
    let notify = |role: &str, topics: &[(&str, &str)]| -> Result<Service> {
        let mut args = vec!["notify".to_string(), role.to_string()];
        for (flag, topic) in topics {
            args.push(format!("--{flag}"));
            args.push(format!("{prefix}{topic}"));
        }
        for (flag, value) in [
            ("--brokers", p.broker.addr()),
            ("--group", unique(role)),
            ("--state-dir", p.dir.path().join(role).display().to_string()),
        ] {
            args.push(flag.to_string());
            args.push(value);
        }
        Service::spawn(Path::new(BIN), &args, &[], p.dir.path())
    };
    let mut planner = notify(
        "planner",
        &[
            ("requests", "notify.requests"),
            ("tasks", "notify.tasks"),
            ("follows", "graph.follows"),
            ("status", "notify.status"),
            ("dlq", "dlq.notify"),
        ],
    )?;
    let mut deliver = notify(
        "deliver",
        &[
            ("tasks", "notify.tasks"),
            ("out", "notify.out"),
            ("status", "notify.status"),
            ("prefs", "users.prefs"),
            ("control", "sieve.control"),
            ("invalid-tokens", "users.invalid_tokens"),
            ("dlq", "dlq.notify"),
        ],
    )?;
    let mut feedback = notify(
        "feedback",
        &[
            ("feedback", "notify.feedback"),
            ("invalid-tokens", "users.invalid_tokens"),
            ("status", "notify.status"),
            ("dlq", "dlq.notify"),
        ],
    )?;
    let services = [&dedup, &antijoin, &planner, &deliver, &feedback];

    let port = free_port();
    let config = p.dir.path().join("prometheus.yml");
    let mut yaml = format!(
        "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
         rule_files: [\"{}\"]\nscrape_configs:\n",
        alerts_file().display()
    );
    for (job, svc) in [
        "dedup",
        "antijoin",
        "notify-planner",
        "notify-deliver",
        "notify-feedback",
    ]
    .iter()
    .zip(services)
    {
        yaml += &format!(
            "  - job_name: {job}\n    static_configs: [{{ targets: [\"127.0.0.1:{}\"] }}]\n",
            svc.metrics_port
        );
    }
    std::fs::write(&config, yaml)?;
    let log = std::fs::File::create(p.dir.path().join("prometheus.log"))?;
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                p.dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting prometheus")?,
    );

    let n = services.len();
    wait_for("every target up", Duration::from_secs(60), || {
        let targets = api(port, "/api/v1/targets")?;
        let active = targets["activeTargets"].as_array()?;
        (active.len() == n && active.iter().all(|t| t["health"] == "up")).then_some(())
    })?;
    wait_for(
        "every service ready, as Prometheus sees it",
        Duration::from_secs(90),
        || {
            let r = api(port, "/api/v1/query?query=sieve_ready%20%3D%3D%201")?;
            (r["result"].as_array()?.len() == n).then_some(())
        },
    )?;
    let rules = wait_for("every rule evaluated", Duration::from_secs(60), || {
        let data = api(port, "/api/v1/rules")?;
        let rules: Vec<Value> = data["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        (!rules.is_empty() && rules.iter().all(|r| r["health"] == "ok")).then_some(rules.len())
    })?;
    let in_file = std::fs::read_to_string(alerts_file())?
        .matches("- alert:")
        .count();
    anyhow::ensure!(
        rules == in_file,
        "Prometheus loaded {rules} of {in_file} rules"
    );
    let metadata = api(port, "/api/v1/metadata").context("no metric metadata")?;
    let metadata = metadata.as_object().context("metadata is not a map")?;
    for (name, entries) in metadata {
        for kind in entries.as_array().into_iter().flatten() {
            let kind = kind["type"].as_str().unwrap_or_default();
            if let Some(why) = unconventional(name, kind) {
                anyhow::bail!("{name} ({kind}): {why}");
            }
        }
    }
    for core in ["sieve_records_in_total", "sieve_batch_duration_seconds"] {
        anyhow::ensure!(metadata.contains_key(core), "{core} was not scraped");
    }
    assert_eq!(dedup.terminate(Duration::from_secs(30))?, 0);
    assert_eq!(antijoin.terminate(Duration::from_secs(30))?, 0);
    assert_eq!(planner.terminate(Duration::from_secs(30))?, 0);
    assert_eq!(deliver.terminate(Duration::from_secs(30))?, 0);
    assert_eq!(feedback.terminate(Duration::from_secs(30))?, 0);
    Ok(())
}
