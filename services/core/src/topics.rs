//! The declarative topics file (`deploy/topics.toml`) and `sieve ctl topics apply`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rdkafka::admin::{AdminOptions, AlterConfig, ConfigSource, ResourceSpecifier};
use rdkafka::consumer::Consumer;
use serde::Deserialize;

use crate::error::{CoreError, Result};
use crate::kafka::{replication_factor, Clients};

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub partitions: Option<i32>,
    /// Copies of each partition; absent: the broker's `default.replication.factor`.
    pub replication_factor: Option<i32>,
    /// Replicas that must have a write before `acks=all` answers; absent: the broker's.
    pub min_insync_replicas: Option<i32>,
    /// `delete` or `compact`.
    pub cleanup_policy: Option<String>,
    pub retention_ms: Option<i64>,
    /// Any other topic config, set explicitly at creation.
    #[serde(default)]
    pub configs: BTreeMap<String, String>,
    /// What the topic is for; shown by `sieve ctl topics apply`.
    pub description: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsFile {
    #[serde(default)]
    pub defaults: TopicSpec,
    pub topics: BTreeMap<String, TopicSpec>,
}

/// A topic with the defaults filled in: what the broker should have.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredTopic {
    pub name: String,
    pub partitions: i32,
    /// `None`: the broker's default.
    pub replication: Option<i32>,
    pub configs: BTreeMap<String, String>,
}

impl TopicsFile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CoreError::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| CoreError::Config(format!("{}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Every topic with defaults applied, names prefixed (for isolated test or tenant sets).
    pub fn desired(&self, prefix: &str) -> Result<Vec<DesiredTopic>> {
        self.topics
            .iter()
            .map(|(name, spec)| {
                let partitions = spec
                    .partitions
                    .or(self.defaults.partitions)
                    .ok_or_else(|| CoreError::Config(format!("topic {name}: no partitions")))?;
                let mut configs = self.defaults.configs.clone();
                configs.extend(spec.configs.clone());
                if let Some(p) = spec
                    .cleanup_policy
                    .as_ref()
                    .or(self.defaults.cleanup_policy.as_ref())
                {
                    if p != "delete" && p != "compact" && p != "compact,delete" {
                        return Err(CoreError::Config(format!(
                            "topic {name}: cleanup_policy {p:?}"
                        )));
                    }
                    configs.insert("cleanup.policy".into(), p.clone());
                }
                if let Some(r) = spec.retention_ms.or(self.defaults.retention_ms) {
                    configs.insert("retention.ms".into(), r.to_string());
                }
                let isr = spec
                    .min_insync_replicas
                    .or(self.defaults.min_insync_replicas);
                if let Some(n) = isr {
                    configs.insert("min.insync.replicas".into(), n.to_string());
                }
                let replication = spec
                    .replication_factor
                    .or(self.defaults.replication_factor);
                if let (Some(r), Some(n)) = (replication, isr) {
                    if n > r {
                        return Err(CoreError::Config(format!(
                            "topic {name}: min_insync_replicas {n} exceeds replication_factor {r}: no write could ever succeed"
                        )));
                    }
                }
                Ok(DesiredTopic {
                    name: format!("{prefix}{name}"),
                    partitions,
                    replication,
                    configs,
                })
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Created,
    WouldCreate,
    UpToDate,
    /// Differences between the file and the broker, one line each.
    Drift(Vec<String>),
    /// Config differences set to the file's values (`--fix`), one line each.
    Fixed(Vec<String>),
}

/// What `apply` does beyond creating missing topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Create nothing, change nothing: report.
    DryRun,
    /// Create missing topics; report drift.
    Create,
    /// Create missing topics and set drifted configs to the file's values. Partition counts
    /// and replication factors are still only reported: changing them moves keys or data,
    /// which is a decision for a person.
    Fix,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub topic: String,
    pub action: Action,
}

/// Creates missing topics and reports (with [`Mode::Fix`], repairs) drift of existing ones,
/// read back from the broker: partition count and replication factor from metadata, configs
/// with DescribeConfigs.
pub async fn apply(clients: &Clients, desired: &[DesiredTopic], mode: Mode) -> Result<Vec<Report>> {
    let reader = clients.reader()?;
    let md = reader
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| CoreError::kafka("list topics", e))?;
    // name → (partitions, replication factor)
    let existing: BTreeMap<String, (i32, i32)> = md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| {
            (
                t.name().to_string(),
                (t.partitions().len() as i32, replication_factor(t)),
            )
        })
        .collect();
    let admin = clients.admin()?;
    let mut reports = Vec::new();
    for t in desired {
        let action = match existing.get(&t.name) {
            None if mode == Mode::DryRun => Action::WouldCreate,
            None => {
                let configs: Vec<(&str, &str)> = t
                    .configs
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                clients
                    .ensure_topic(&t.name, t.partitions, t.replication, &configs)
                    .await?;
                Action::Created
            }
            Some(&(n, replicas)) => {
                let mut drift = Vec::new();
                if n != t.partitions {
                    drift.push(format!("partitions: broker {n}, file {}", t.partitions));
                }
                if let Some(r) = t.replication.filter(|r| *r != replicas) {
                    drift.push(format!("replication factor: broker {replicas}, file {r}"));
                }
                let (configs, current) = config_drift(&admin, t).await?;
                if mode == Mode::Fix && !configs.is_empty() {
                    fix_configs(&admin, t, &current).await?;
                }
                match (mode, drift.is_empty(), configs.is_empty()) {
                    (_, true, true) => Action::UpToDate,
                    (Mode::Fix, true, false) => Action::Fixed(configs),
                    (Mode::Fix, false, false) => {
                        drift.extend(configs.iter().map(|c| format!("{c} (fixed)")));
                        Action::Drift(drift)
                    }
                    _ => {
                        drift.extend(configs);
                        Action::Drift(drift)
                    }
                }
            }
        };
        reports.push(Report {
            topic: t.name.clone(),
            action,
        });
    }
    Ok(reports)
}

type Admin = rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>;

/// The configs whose broker value differs from the file's, one line each, and the configs set
/// on the topic itself now (what a non-incremental AlterConfigs must send again to keep).
async fn config_drift(
    admin: &Admin,
    t: &DesiredTopic,
) -> Result<(Vec<String>, BTreeMap<String, String>)> {
    let res = admin
        .describe_configs(&[ResourceSpecifier::Topic(&t.name)], &AdminOptions::new())
        .await
        .map_err(|e| CoreError::kafka(format!("describe configs of {}", t.name), e))?;
    let resource = match res.into_iter().next() {
        Some(Ok(r)) => r,
        Some(Err(code)) => {
            return Err(CoreError::kafka(
                format!("describe configs of {}", t.name),
                rdkafka::error::KafkaError::AdminOp(code),
            ))
        }
        None => return Ok(Default::default()),
    };
    let mut drift = Vec::new();
    for (k, want) in &t.configs {
        // Kafka reports every config, defaults included: a missing one is unknown to it.
        match resource.get(k).and_then(|e| e.value.as_deref()) {
            Some(have) if have == want => {}
            Some(have) => drift.push(format!("{k}: broker {have}, file {want}")),
            None => drift.push(format!("{k}: unknown to the broker, file {want}")),
        }
    }
    let current = resource
        .entries
        .iter()
        .filter(|e| e.source == ConfigSource::DynamicTopic)
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    Ok((drift, current))
}

/// Sets the file's configs on the topic. AlterConfigs replaces the topic's whole set, so the
/// configs set on it now and absent from the file are sent again unchanged.
async fn fix_configs(
    admin: &Admin,
    t: &DesiredTopic,
    current: &BTreeMap<String, String>,
) -> Result<()> {
    let mut all = current.clone();
    all.extend(t.configs.clone());
    let mut alter = AlterConfig::new(ResourceSpecifier::Topic(&t.name));
    for (k, v) in &all {
        alter = alter.set(k, v);
    }
    let res = admin
        .alter_configs(&[alter], &AdminOptions::new())
        .await
        .map_err(|e| CoreError::kafka(format!("alter configs of {}", t.name), e))?;
    match res.into_iter().next() {
        Some(Err((_, code))) => Err(CoreError::kafka(
            format!("alter configs of {}", t.name),
            rdkafka::error::KafkaError::AdminOp(code),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_and_prefix_names() {
        let f = TopicsFile::parse(
            r#"
            [defaults]
            partitions = 8
            retention_ms = 1000
            [topics."users.current"]
            cleanup_policy = "compact"
            partitions = 4
            [topics."events.raw"]
            "#,
        )
        .unwrap();
        let d = f.desired("t1-").unwrap();
        assert_eq!(d.len(), 2);
        let raw = d.iter().find(|t| t.name == "t1-events.raw").unwrap();
        assert_eq!(raw.partitions, 8);
        assert_eq!(
            raw.configs.get("retention.ms").map(String::as_str),
            Some("1000")
        );
        let users = d.iter().find(|t| t.name == "t1-users.current").unwrap();
        assert_eq!(users.partitions, 4);
        assert_eq!(
            users.configs.get("cleanup.policy").map(String::as_str),
            Some("compact")
        );
        assert!(TopicsFile::parse("[topics.x]\nbogus = 1").is_err());
    }

    #[test]
    fn shipped_topics_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/topics.toml");
        let f = TopicsFile::load(&path).unwrap();
        let names: Vec<String> = f.desired("").unwrap().into_iter().map(|t| t.name).collect();
        for t in [
            "events.raw",
            "events.unique",
            "dlq.ingest",
            "users.current",
            "notify.tasks.p0",
            "sieve.control",
        ] {
            assert!(
                names.iter().any(|n| n == t),
                "{t} missing from deploy/topics.toml"
            );
        }
    }
}
