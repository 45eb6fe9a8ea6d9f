//! API keys (each with a tenant, the streams it may write and a rate limit) and the
//! per-key token buckets.
//!
//! Keys file (TOML):
//! ```toml
//! [[keys]]
//! key = "k-live-1"                # the secret the client sends
//! tenant = "acme"
//! streams = ["events", "users"]   # or ["*"]
//! records_per_sec = 5000          # optional; default unlimited
//! burst = 10000                   # optional; default = records_per_sec
//! ```
//! or the environment, `SIEVE_INGEST_API_KEYS="k1@acme:events,users;k2@ops:*"`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::error::{IngestError, Result};
use crate::reject::Reason;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub key: String,
    pub tenant: String,
    pub streams: Vec<String>,
    #[serde(default)]
    pub records_per_sec: Option<f64>,
    #[serde(default)]
    pub burst: Option<f64>,
}

impl ApiKey {
    pub fn allows(&self, stream: &str) -> bool {
        self.streams.iter().any(|s| s == "*" || s == stream)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<ApiKey>,
}

/// Every key the server accepts, with one token bucket per rate-limited key.
#[derive(Debug, Default)]
pub struct ApiKeys {
    keys: HashMap<String, ApiKey>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl ApiKeys {
    pub fn new(keys: Vec<ApiKey>) -> Result<ApiKeys> {
        let mut map = HashMap::new();
        for k in keys {
            if k.key.len() < 8 {
                return Err(IngestError::Config(format!(
                    "API key of tenant {} is shorter than 8 characters",
                    k.tenant
                )));
            }
            if let Some(old) = map.insert(k.key.clone(), k) {
                return Err(IngestError::Config(format!(
                    "API key of tenant {} is listed twice",
                    old.tenant
                )));
            }
        }
        Ok(ApiKeys {
            keys: map,
            buckets: Mutex::default(),
        })
    }

    pub fn from_file(path: &Path) -> Result<ApiKeys> {
        let text = std::fs::read_to_string(path).map_err(|e| IngestError::io(path.display(), e))?;
        let file: KeysFile = toml::from_str(&text)
            .map_err(|e| IngestError::Config(format!("{}: {e}", path.display())))?;
        Self::new(file.keys)
    }

    /// `key@tenant:stream,stream;key@tenant:*` (no rate limits: use a file for those).
    pub fn from_env_value(value: &str) -> Result<ApiKeys> {
        let mut keys = Vec::new();
        for entry in value.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let parsed = entry.split_once('@').and_then(|(key, rest)| {
                let (tenant, streams) = rest.split_once(':')?;
                Some(ApiKey {
                    key: key.to_string(),
                    tenant: tenant.to_string(),
                    streams: streams.split(',').map(|s| s.trim().to_string()).collect(),
                    records_per_sec: None,
                    burst: None,
                })
            });
            keys.push(parsed.ok_or_else(|| {
                IngestError::Config("SIEVE_INGEST_API_KEYS entries are key@tenant:streams".into())
            })?);
        }
        Self::new(keys)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key a request presented, or why it is refused.
    /// The key presented, compared in constant time with every configured key: no early
    /// exit on the first differing byte nor on the first match, so response times do not
    /// tell how much of a guess was right (only, at most, a key's length).
    pub fn authenticate(&self, presented: Option<&str>) -> Result<&ApiKey, Reason> {
        let presented = presented.ok_or(Reason::MissingApiKey)?.as_bytes();
        let mut found = None;
        for (stored, key) in &self.keys {
            let same: bool = stored.as_bytes().ct_eq(presented).into();
            found = found.or(same.then_some(key));
        }
        found.ok_or(Reason::InvalidApiKey)
    }

    /// Takes `records` tokens from the key's bucket, or says how long to wait.
    pub fn take(&self, key: &ApiKey, records: usize) -> Result<(), Duration> {
        let Some(rate) = key.records_per_sec.filter(|r| *r > 0.0) else {
            return Ok(());
        };
        let burst = key.burst.unwrap_or(rate).max(1.0);
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let b = buckets.entry(key.key.clone()).or_insert(Bucket {
            tokens: burst,
            at: Instant::now(),
        });
        b.take(rate, burst, records as f64, Instant::now())
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64, burst: f64, n: f64, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        // A request larger than the burst passes on a full bucket and leaves a debt;
        // otherwise it could never pass.
        if n <= self.tokens || self.tokens >= burst {
            self.tokens -= n;
            return Ok(());
        }
        let missing = n.min(burst) - self.tokens;
        Err(Duration::from_secs_f64((missing / rate).max(0.001)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_keys_and_permissions() {
        let keys = ApiKeys::from_env_value("secret-1@acme:events,users; secret-2@ops:*").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.authenticate(None).unwrap_err(), Reason::MissingApiKey);
        assert_eq!(
            keys.authenticate(Some("nope")).unwrap_err(),
            Reason::InvalidApiKey
        );
        for near in ["secret-", "secret-1x", "secret-3", "SECRET-1", ""] {
            assert_eq!(
                keys.authenticate(Some(near)).unwrap_err(),
                Reason::InvalidApiKey,
                "{near:?}"
            );
        }
        let k = keys.authenticate(Some("secret-1")).unwrap();
        assert_eq!(k.tenant, "acme");
        assert!(k.allows("users") && !k.allows("follows"));
        assert!(keys.authenticate(Some("secret-2")).unwrap().allows("x"));
        assert!(ApiKeys::from_env_value("short@a:*").is_err());
        assert!(ApiKeys::from_env_value("no-tenant-here").is_err());
    }

    #[test]
    fn bucket_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket {
            tokens: 10.0,
            at: t0,
        };
        assert!(b.take(100.0, 10.0, 10.0, t0).is_ok());
        let wait = b.take(100.0, 10.0, 5.0, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.05).abs() < 1e-9);
        assert!(b
            .take(100.0, 10.0, 5.0, t0 + Duration::from_millis(50))
            .is_ok());
        // Never more than the burst; a larger request passes on a full bucket, with a debt.
        let t1 = t0 + Duration::from_secs(60);
        assert!(b.take(100.0, 10.0, 50.0, t1).is_ok());
        let wait = b.take(100.0, 10.0, 5.0, t1).unwrap_err();
        assert!((wait.as_secs_f64() - 0.45).abs() < 1e-9);
    }
}
