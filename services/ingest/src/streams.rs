//! The streams file: which topic, schema, key and idempotency field each stream uses.
//!
//! ```toml
//! [streams.events]
//! topic = "events.raw"
//! schema = "event.schema.json"       # relative to --schemas
//! idempotency_field = "/event_id"    # per-record idempotency key in batches (JSON pointer)
//! key_field = "/user_id"             # Kafka key; default: the idempotency key
//! salt = { buckets = 8, keys = ["guest"] }  # spread hot keys over 8 partitions
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{IngestError, Result};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamsFile {
    streams: BTreeMap<String, StreamSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    pub topic: String,
    pub schema: String,
    #[serde(default)]
    pub key_field: Option<String>,
    #[serde(default)]
    pub idempotency_field: Option<String>,
    #[serde(default)]
    pub salt: Option<Salt>,
    #[serde(default)]
    pub description: Option<String>,
}

/// Hot-key salting: the Kafka key of a listed key (or of every key when `keys` is empty)
/// gets a suffix `~N`, N = hash(idempotency key) mod `buckets`, so one hot key spreads over
/// up to `buckets` partitions while a retry still lands where the first attempt did.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Salt {
    pub buckets: u32,
    #[serde(default)]
    pub keys: Vec<String>,
}

/// One configured stream with its compiled schema.
pub struct Stream {
    pub name: String,
    pub spec: StreamSpec,
    pub schema: jsonschema::Validator,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("name", &self.name)
            .field("spec", &self.spec)
            .finish()
    }
}

/// Every stream of a streams file, by name.
#[derive(Debug, Default)]
pub struct Registry {
    streams: BTreeMap<String, Stream>,
}

impl Registry {
    /// Reads the streams file and compiles each stream's schema from `schemas_dir`.
    pub fn load(streams_file: &Path, schemas_dir: &Path) -> Result<Registry> {
        let text = std::fs::read_to_string(streams_file)
            .map_err(|e| IngestError::io(streams_file.display(), e))?;
        Self::parse(&text, schemas_dir)
            .map_err(|e| IngestError::Config(format!("{}: {e}", streams_file.display())))
    }

    pub fn parse(text: &str, schemas_dir: &Path) -> Result<Registry> {
        let file: StreamsFile =
            toml::from_str(text).map_err(|e| IngestError::Config(e.to_string()))?;
        let mut streams = BTreeMap::new();
        for (name, spec) in file.streams {
            for p in [&spec.key_field, &spec.idempotency_field]
                .into_iter()
                .flatten()
            {
                if !p.starts_with('/') {
                    return Err(IngestError::Config(format!(
                        "stream {name}: {p:?} is not a JSON pointer (starts with /)"
                    )));
                }
            }
            if spec.salt.as_ref().is_some_and(|s| s.buckets < 2) {
                return Err(IngestError::Config(format!(
                    "stream {name}: salt.buckets must be at least 2"
                )));
            }
            let path = schemas_dir.join(&spec.schema);
            let text =
                std::fs::read_to_string(&path).map_err(|e| IngestError::io(path.display(), e))?;
            let doc: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| IngestError::Config(format!("{}: {e}", path.display())))?;
            let schema = jsonschema::validator_for(&doc)
                .map_err(|e| IngestError::Config(format!("{}: {e}", path.display())))?;
            streams.insert(name.clone(), Stream { name, spec, schema });
        }
        Ok(Registry { streams })
    }

    pub fn get(&self, name: &str) -> Option<&Stream> {
        self.streams.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.streams.keys().map(String::as_str)
    }

    /// Every topic the streams write to (checked at start).
    pub fn topics(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .streams
            .values()
            .map(|s| s.spec.topic.clone())
            .collect();
        t.sort();
        t.dedup();
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schemas() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
    }

    #[test]
    fn the_deployed_streams_file_loads() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/streams.toml");
        let reg = Registry::load(&file, &schemas()).unwrap();
        for s in [
            "events",
            "users",
            "follows",
            "user-preferences",
            "notify-p0",
        ] {
            assert!(reg.get(s).is_some(), "{s}");
        }
        assert!(reg.topics().contains(&"events.raw".to_string()));
    }

    #[test]
    fn bad_pointers_and_salts_are_config_errors() {
        let bad = "[streams.a]\ntopic='t'\nschema='event.schema.json'\nkey_field='id'\n";
        assert!(Registry::parse(bad, &schemas()).is_err());
        let bad = "[streams.a]\ntopic='t'\nschema='event.schema.json'\nsalt={buckets=1}\n";
        assert!(Registry::parse(bad, &schemas()).is_err());
        let bad = "[streams.a]\ntopic='t'\nschema='nope.json'\n";
        assert!(Registry::parse(bad, &schemas()).is_err());
    }
}
