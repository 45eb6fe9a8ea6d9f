//! The deploy and observability files agree with the code: docker-compose.yml and the
//! Kubernetes manifests run commands the binary has, with environment variables the code
//! reads, topics that deploy/topics.toml declares and the metrics port the services use; the
//! dashboard and alert rules only use metrics the code registers. With promtool installed
//! (Debian's `prometheus` package) the rules are also checked and unit-tested.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_norway::Value;

const BIN: &str = env!("CARGO_BIN_EXE_sieve");
const METRICS_PORT: u16 = 9464;
/// Environment variables whose values are topic names.
const TOPIC_VARS: &[&str] = &[
    "SIEVE_DEDUP_INPUT",
    "SIEVE_DEDUP_OUTPUT",
    "SIEVE_DEDUP_DLQ",
    "SIEVE_ANTIJOIN_LEFT",
    "SIEVE_ANTIJOIN_RIGHT",
    "SIEVE_ANTIJOIN_OUT",
    "SIEVE_ANTIJOIN_DLQ",
    "SIEVE_INGEST_DLQ",
    "SIEVE_NOTIFY_FOLLOWS",
    "SIEVE_NOTIFY_STATUS",
    "SIEVE_NOTIFY_DLQ",
    "SIEVE_NOTIFY_PREFS",
    "SIEVE_NOTIFY_CONTROL",
    "SIEVE_NOTIFY_FEEDBACK",
    "SIEVE_NOTIFY_INVALID_TOKENS",
];
/// Environment variables whose values are prefixes of topic names (`<prefix>.p0`, …).
const TOPIC_PREFIX_VARS: &[&str] = &[
    "SIEVE_NOTIFY_REQUESTS",
    "SIEVE_NOTIFY_TASKS",
    "SIEVE_NOTIFY_OUT",
];
/// Commands that the manifests run but that live on another branch than this binary's.
const ELSEWHERE: &[&str] = &["ingest"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> Result<String> {
    std::fs::read_to_string(root().join(rel)).with_context(|| format!("reading {rel}"))
}

/// Every `.rs` file under `services/*/src`, concatenated: what the code declares.
fn source() -> Result<String> {
    fn walk(dir: &Path, out: &mut String) -> Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push_str(&std::fs::read_to_string(&p)?);
            }
        }
        Ok(())
    }
    let mut out = String::new();
    for e in std::fs::read_dir(root().join("services"))? {
        let src = e?.path().join("src");
        if src.is_dir() {
            walk(&src, &mut out)?;
        }
    }
    Ok(out)
}

fn declared_topics() -> Result<BTreeSet<String>> {
    let t: toml::Table = read("deploy/topics.toml")?.parse()?;
    Ok(t.get("topics")
        .and_then(|v| v.as_table())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default())
}

/// Identifiers starting with `prefix` in `text` (metric names in PromQL, names in source).
fn names_with_prefix(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut word = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            if word.starts_with(prefix) && word.len() > prefix.len() {
                out.insert(word.clone());
            }
            word.clear();
        }
    }
    out
}

/// The binary knows the command: `sieve <args before the first flag> --help` succeeds.
fn command_exists(args: &[String]) -> Result<bool> {
    let words: Vec<&String> = args.iter().take_while(|a| !a.starts_with('-')).collect();
    let out = Command::new(BIN).args(&words).arg("--help").output()?;
    Ok(out.status.success())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks one container: its command exists, its variables are read by the code, its topic
/// variables name declared topics, its metrics listen on the services' port.
fn check_container(
    what: &str,
    args: &[String],
    env: &[(String, String)],
    src: &str,
    topics: &BTreeSet<String>,
) -> Result<()> {
    if !command_exists(args)? {
        ensure!(
            args.first()
                .is_some_and(|c| ELSEWHERE.contains(&c.as_str())),
            "{what}: `sieve {}` is not a command of this binary",
            args.join(" ")
        );
        return Ok(());
    }
    for (k, v) in env {
        ensure!(
            src.contains(&format!("env = \"{k}\"")),
            "{what}: {k} is read by no service"
        );
        if TOPIC_VARS.contains(&k.as_str()) {
            ensure!(
                topics.contains(v),
                "{what}: topic {v} ({k}) is not in deploy/topics.toml"
            );
        }
        if TOPIC_PREFIX_VARS.contains(&k.as_str()) {
            ensure!(
                topics.iter().any(|t| t.starts_with(&format!("{v}."))),
                "{what}: no topic {v}.* ({k}) in deploy/topics.toml"
            );
        }
        if k == "SIEVE_METRICS_ADDR" {
            ensure!(
                v.ends_with(&format!(":{METRICS_PORT}")),
                "{what}: metrics on {v}"
            );
        }
    }
    Ok(())
}

#[test]
fn metrics_port_is_the_services_default() -> Result<()> {
    let config = read("services/core/src/config.rs")?;
    ensure!(config.contains(&format!(
        "env = \"SIEVE_METRICS_ADDR\", default_value = \"127.0.0.1:{METRICS_PORT}\""
    )));
    Ok(())
}

/// A Kubernetes container's `env` entries with a literal value, as (name, value).
fn container_env(c: &Value) -> Vec<(String, String)> {
    c["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// docker-compose.yml with its merge keys applied (the sieve services share an anchor,
/// `<<: *sieve`).
fn compose() -> Result<Value> {
    let mut compose: Value = serde_norway::from_str(&read("docker-compose.yml")?)?;
    compose.apply_merge()?;
    Ok(compose)
}

#[test]
fn compose_runs_real_commands_on_declared_topics() -> Result<()> {
    let compose = compose()?;
    let src = source()?;
    let topics = declared_topics()?;
    let services = compose["services"]
        .as_mapping()
        .context("docker-compose.yml has no services")?;
    let names: BTreeSet<String> = services
        .keys()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    ensure!(compose["services"]["kafka"]["image"]
        .as_str()
        .is_some_and(|i| i.starts_with("apache/kafka:")));
    ensure!(
        compose["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
            .as_str()
            .is_some_and(|r| r.contains("controller")),
        "Kafka must run in KRaft mode"
    );
    let mut sieve_services = 0;
    for (name, svc) in services {
        let name = name.as_str().unwrap_or_default();
        if svc["image"].as_str() != Some("sieve:latest") {
            continue;
        }
        sieve_services += 1;
        let args = strings(&svc["command"]);
        let env: Vec<(String, String)> = svc["environment"]
            .as_mapping()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        check_container(&format!("compose {name}"), &args, &env, &src, &topics)?;
        if name != "topics" {
            ensure!(
                svc["depends_on"]["topics"]["condition"].as_str()
                    == Some("service_completed_successfully"),
                "compose {name} starts before the topics exist"
            );
        }
    }
    ensure!(sieve_services >= 3, "only {sieve_services} sieve services");
    ensure!(strings(&compose["services"]["topics"]["command"])[..3] == ["ctl", "topics", "apply"]);

    // Prometheus scrapes the compose services on the metrics port.
    let prom: Value = serde_norway::from_str(&read("ops/prometheus/prometheus.yml")?)?;
    let jobs = prom["scrape_configs"]
        .as_sequence()
        .context("no scrape_configs")?;
    for job in jobs {
        for target in job["static_configs"]
            .as_sequence()
            .into_iter()
            .flatten()
            .flat_map(|s| strings(&s["targets"]))
        {
            let (host, port) = target.split_once(':').context("target without port")?;
            ensure!(
                names.contains(host),
                "Prometheus scrapes {host}, not a compose service"
            );
            ensure!(
                port == METRICS_PORT.to_string(),
                "Prometheus scrapes {target}"
            );
        }
    }
    Ok(())
}

#[test]
fn kubernetes_manifests_are_consistent_with_the_code() -> Result<()> {
    let src = source()?;
    let topics = declared_topics()?;
    let mut kinds = BTreeSet::new();
    let mut pod_labels = BTreeSet::new();
    let mut selectors = Vec::new();
    for entry in std::fs::read_dir(root().join("deploy/k8s"))? {
        let path = entry?.path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let file = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path)?;
        for doc in serde_norway::Deserializer::from_str(&text) {
            let doc = <Value as serde::Deserialize>::deserialize(doc)
                .with_context(|| format!("parsing {file}"))?;
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            kinds.insert(kind.clone());
            let what = format!(
                "{file} {kind} {}",
                doc["metadata"]["name"].as_str().unwrap_or("?")
            );
            match kind.as_str() {
                "StatefulSet" | "Deployment" | "Job" => {
                    let pod = &doc["spec"]["template"]["spec"];
                    if let Some(l) = doc["spec"]["template"]["metadata"]["labels"]
                        ["app.kubernetes.io/name"]
                        .as_str()
                    {
                        pod_labels.insert(l.to_string());
                    }
                    for c in pod["containers"].as_sequence().into_iter().flatten() {
                        let env: Vec<(String, String)> = container_env(c);
                        check_container(&what, &strings(&c["args"]), &env, &src, &topics)?;
                        if kind == "Job" {
                            continue;
                        }
                        ensure!(
                            c["readinessProbe"]["httpGet"]["path"].as_str() == Some("/readyz"),
                            "{what}: readiness"
                        );
                        let metrics_port = c["ports"]
                            .as_sequence()
                            .into_iter()
                            .flatten()
                            .find(|p| p["name"].as_str() == Some("metrics"))
                            .and_then(|p| p["containerPort"].as_u64());
                        ensure!(
                            metrics_port == Some(u64::from(METRICS_PORT)),
                            "{what}: metrics port"
                        );
                        ensure!(
                            pod["terminationGracePeriodSeconds"]
                                .as_u64()
                                .is_some_and(|s| s >= 30),
                            "{what}: grace period"
                        );
                    }
                    if kind == "StatefulSet" {
                        let claims = doc["spec"]["volumeClaimTemplates"]
                            .as_sequence()
                            .map(Vec::len);
                        ensure!(claims.unwrap_or(0) > 0, "{what}: no volume for RocksDB");
                        let state_dir = pod["containers"][0]["env"]
                            .as_sequence()
                            .into_iter()
                            .flatten()
                            .find(|e| e["name"].as_str() == Some("SIEVE_STATE_DIR"))
                            .and_then(|e| e["value"].as_str())
                            .context("StatefulSet without SIEVE_STATE_DIR")?
                            .to_string();
                        let mounted = pod["containers"][0]["volumeMounts"]
                            .as_sequence()
                            .into_iter()
                            .flatten()
                            .filter_map(|m| m["mountPath"].as_str())
                            .any(|m| state_dir.starts_with(m));
                        ensure!(mounted, "{what}: {state_dir} is not on the volume");
                    }
                }
                "PodDisruptionBudget" | "Service" => {
                    let sel = if kind == "Service" {
                        &doc["spec"]["selector"]["app.kubernetes.io/name"]
                    } else {
                        &doc["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
                    };
                    selectors.push((what, sel.as_str().unwrap_or_default().to_string()));
                }
                other => bail!("{file}: unexpected kind {other}"),
            }
        }
    }
    for k in ["StatefulSet", "Deployment", "PodDisruptionBudget", "Job"] {
        ensure!(kinds.contains(k), "no {k} in deploy/k8s");
    }
    for (what, sel) in selectors {
        ensure!(
            pod_labels.contains(&sel),
            "{what} selects {sel:?}, which no workload labels"
        );
    }
    ensure!(root().join("deploy/k8s/README.md").is_file());
    Ok(())
}

#[test]
fn dashboard_and_alerts_use_registered_metrics() -> Result<()> {
    let registered = names_with_prefix(&source()?, "sieve_");
    let known = |name: &str| {
        registered.contains(name)
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.strip_suffix(s).is_some_and(|b| registered.contains(b)))
    };
    let dashboard: serde_json::Value = serde_json::from_str(&read("ops/grafana/sieve.json")?)?;
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().context("no panels")? {
        for t in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap_or_default().to_string());
        }
        ensure!(
            panel["datasource"]["uid"] == "prometheus",
            "panel {} uses another datasource than the provisioned one",
            panel["title"]
        );
    }
    ensure!(exprs.len() >= 10, "dashboard has {} queries", exprs.len());
    let alerts: Value = serde_norway::from_str(&read("ops/prometheus/alerts.yml")?)?;
    for group in alerts["groups"].as_sequence().context("no alert groups")? {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            exprs.push(rule["expr"].as_str().unwrap_or_default().to_string());
            let runbook = rule["annotations"]["runbook"].as_str().unwrap_or_default();
            ensure!(
                root().join(runbook).is_file(),
                "runbook {runbook:?} does not exist"
            );
        }
    }
    for e in &exprs {
        let used = names_with_prefix(e, "sieve_");
        ensure!(!used.is_empty(), "query without a sieve metric: {e}");
        for name in used {
            ensure!(known(&name), "{name} is registered by no service (in {e})");
        }
    }
    for panel in [
        "lag",
        "DLQ",
        "Dedup ratio",
        "Bloom",
        "paused",
        "State size",
        "Restore",
    ] {
        ensure!(
            dashboard["panels"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["title"].as_str().is_some_and(|t| t.contains(panel))),
            "no {panel} panel"
        );
    }
    Ok(())
}

#[test]
fn promtool_accepts_and_unit_tests_the_rules() -> Result<()> {
    let Ok(out) = Command::new("promtool").arg("--version").output() else {
        eprintln!("promtool not installed (apt-get install prometheus): rules not checked");
        return Ok(());
    };
    ensure!(out.status.success());
    let dir = root().join("ops/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()?;
        ensure!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Settings of deploy/kafka/server.properties that name one node (its id, addresses, data
/// directory): each deployment sets its own.
const PER_NODE: &[&str] = &[
    "node.id",
    "listeners",
    "advertised.listeners",
    "listener.security.protocol.map",
    "controller.quorum.voters",
    "log.dirs",
];

/// The Kafka version `scripts/broker.sh` pins.
fn pinned_kafka() -> Result<String> {
    let out = Command::new(root().join("scripts/broker.sh"))
        .arg("version")
        .output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// A Kafka container runs the pinned version with, as `KAFKA_*` variables, every setting of
/// deploy/kafka/server.properties (replication and min ISR as given), and nothing else but
/// per-node addresses, the cluster id and the heap.
fn check_kafka(
    what: &str,
    image: Option<&str>,
    env: &std::collections::BTreeMap<String, String>,
    replication: &str,
    min_isr: &str,
) -> Result<()> {
    let version = pinned_kafka()?;
    ensure!(
        image == Some(&format!("apache/kafka:{version}")),
        "{what} runs {image:?}, scripts/broker.sh pins {version}"
    );
    ensure!(
        env.get("KAFKA_LOG_DIRS").map(String::as_str) == Some("/var/lib/kafka/data"),
        "{what} keeps Kafka's data off its volume"
    );
    let var = |k: &str| format!("KAFKA_{}", k.to_uppercase().replace('.', "_"));
    let mut expected = std::collections::BTreeMap::new();
    for line in read("deploy/kafka/server.properties")?.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').context("a property without '='")?;
        if PER_NODE.contains(&k) {
            ensure!(env.contains_key(&var(k)), "{what} does not set {}", var(k));
            continue;
        }
        let v = v
            .replace("@REPLICATION@", replication)
            .replace("@MIN_ISR@", min_isr);
        ensure!(
            !v.contains('@'),
            "{k}={v}: a placeholder {what} cannot fill"
        );
        expected.insert(var(k), v);
    }
    for (k, want) in &expected {
        ensure!(
            env.get(k) == Some(want),
            "{what}: {k}={:?}, deploy/kafka/server.properties says {want}",
            env.get(k)
        );
    }
    for k in env.keys() {
        let per_node = PER_NODE.iter().any(|p| *k == var(p));
        ensure!(
            expected.contains_key(k)
                || per_node
                || ["CLUSTER_ID", "KAFKA_HEAP_OPTS"].contains(&k.as_str()),
            "{what} sets {k}, which deploy/kafka/server.properties does not: add it there"
        );
    }
    Ok(())
}

/// docker-compose.yml and the Kubernetes manifest run the Kafka that `scripts/broker.sh`
/// runs: one node with replication 1, three nodes with replication 3 and min ISR 2.
#[test]
fn compose_and_kubernetes_kafka_run_the_scripts_version_and_properties() -> Result<()> {
    let compose = compose()?;
    let kafka = &compose["services"]["kafka"];
    let env = kafka["environment"]
        .as_mapping()
        .context("compose kafka has no environment")?
        .iter()
        .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
        .collect();
    check_kafka("compose kafka", kafka["image"].as_str(), &env, "1", "1")?;

    let text = read("deploy/k8s/kafka/kafka.yaml")?;
    let mut found = false;
    for doc in serde_norway::Deserializer::from_str(&text) {
        let doc = <Value as serde::Deserialize>::deserialize(doc)?;
        if doc["kind"].as_str() != Some("StatefulSet") {
            continue;
        }
        found = true;
        ensure!(doc["spec"]["replicas"].as_u64() == Some(3));
        let c = &doc["spec"]["template"]["spec"]["containers"][0];
        let env = container_env(c).into_iter().collect();
        check_kafka("k8s kafka", c["image"].as_str(), &env, "3", "2")?;
    }
    ensure!(found, "deploy/k8s/kafka/kafka.yaml has no StatefulSet");
    Ok(())
}
