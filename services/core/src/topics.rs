//! The declarative topics file (`deploy/topics.toml`) and `sieve ctl topics apply`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rdkafka::admin::{AdminOptions, ResourceSpecifier};
use rdkafka::consumer::Consumer;
use serde::Deserialize;

use crate::error::{CoreError, Result};
use crate::kafka::Clients;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub partitions: Option<i32>,
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
                Ok(DesiredTopic {
                    name: format!("{prefix}{name}"),
                    partitions,
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
}

#[derive(Debug, Clone)]
pub struct Report {
    pub topic: String,
    pub action: Action,
}

/// Creates missing topics and reports drift of existing ones (never alters them: changing
/// partition counts moves keys, which is a decision for a person).
pub async fn apply(
    clients: &Clients,
    desired: &[DesiredTopic],
    dry_run: bool,
) -> Result<Vec<Report>> {
    let reader = clients.reader()?;
    let md = reader
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| CoreError::kafka("list topics", e))?;
    let existing: BTreeMap<String, i32> = md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect();
    let admin = clients.admin()?;
    let mut reports = Vec::new();
    for t in desired {
        let action = match existing.get(&t.name) {
            None if dry_run => Action::WouldCreate,
            None => {
                let configs: Vec<(&str, &str)> = t
                    .configs
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                clients
                    .ensure_topic(&t.name, t.partitions, &configs)
                    .await?;
                Action::Created
            }
            Some(&n) => {
                let mut drift = Vec::new();
                if n != t.partitions {
                    drift.push(format!("partitions: broker {n}, file {}", t.partitions));
                }
                drift.extend(config_drift(&admin, t).await?);
                if drift.is_empty() {
                    Action::UpToDate
                } else {
                    Action::Drift(drift)
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

async fn config_drift(
    admin: &rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    t: &DesiredTopic,
) -> Result<Vec<String>> {
    let res = admin
        .describe_configs(&[ResourceSpecifier::Topic(&t.name)], &AdminOptions::new())
        .await
        .map_err(|e| CoreError::kafka(format!("describe configs of {}", t.name), e))?;
    let mut drift = Vec::new();
    if let Some(Ok(resource)) = res.into_iter().next() {
        for (k, want) in &t.configs {
            // Some brokers report only explicitly set configs: a missing entry is unknown,
            // not drift.
            if let Some(have) = resource.get(k).and_then(|e| e.value.as_deref()) {
                if have != want {
                    drift.push(format!("{k}: broker {have}, file {want}"));
                }
            }
        }
    }
    Ok(drift)
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
