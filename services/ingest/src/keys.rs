//! Idempotency keys, Kafka keys and salts of an accepted record.

use serde_json::Value;
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

use crate::reject::Rejection;
use crate::streams::Stream;

/// A record ready to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub key: Vec<u8>,
    pub idempotency_key: String,
    pub salt: Option<u32>,
}

/// Where the idempotency key of a record comes from, in order of preference.
#[derive(Debug, Clone, Copy)]
pub enum KeySource<'a> {
    /// The `Idempotency-Key` header of a single-record request.
    Header(&'a str),
    /// The `Idempotency-Key` header of a batch: the record's key is `header/index`.
    BatchHeader(&'a str, usize),
    /// The loader's `file identity:record index`.
    Position(&'a str),
    None,
}

/// Hash of stream + body: a client retry of the same bytes gets the same key.
pub fn content_key(stream: &str, body: &[u8]) -> String {
    let mut buf = Vec::with_capacity(stream.len() + 1 + body.len());
    buf.extend_from_slice(stream.as_bytes());
    buf.push(0);
    buf.extend_from_slice(body);
    format!("h:{:032x}", xxh3_128(&buf))
}

/// Idempotency key and Kafka key of a valid record.
pub fn prepare(
    stream: &Stream,
    doc: &Value,
    body: &[u8],
    source: KeySource<'_>,
) -> Result<Prepared, Rejection> {
    let field = stream
        .spec
        .idempotency_field
        .as_deref()
        .and_then(|p| sieve_formats::jsonkey::key_of(doc, p).ok())
        .map(|k| String::from_utf8_lossy(&k).into_owned());
    // A single record's header beats its field; in a batch the field names each record.
    let idempotency_key = match (source, field) {
        (KeySource::Header(h), _) => h.to_string(),
        (_, Some(f)) => f,
        (KeySource::BatchHeader(h, i), None) => format!("{h}/{i}"),
        (KeySource::Position(p), None) => p.to_string(),
        (KeySource::None, None) => content_key(&stream.name, body),
    };
    let key = match &stream.spec.key_field {
        Some(ptr) => {
            sieve_formats::jsonkey::key_of(doc, ptr).map_err(|e| Rejection::of_key(ptr, &e))?
        }
        None => idempotency_key.clone().into_bytes(),
    };
    let salt = stream.spec.salt.as_ref().and_then(|s| {
        let hot = s.keys.is_empty() || s.keys.iter().any(|k| k.as_bytes() == key.as_slice());
        // Deterministic in the idempotency key: a retry lands on the first attempt's partition.
        hot.then(|| (xxh3_64(idempotency_key.as_bytes()) % u64::from(s.buckets)) as u32)
    });
    let key = match salt {
        Some(n) => {
            let mut k = key;
            k.extend_from_slice(format!("~{n}").as_bytes());
            k
        }
        None => key,
    };
    Ok(Prepared {
        key,
        idempotency_key,
        salt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::Registry;
    use std::path::Path;

    fn reg(extra: &str) -> Registry {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        let text = format!("[streams.s]\ntopic='t'\nschema='user.schema.json'\n{extra}");
        Registry::parse(&text, &dir).unwrap()
    }

    fn prep(r: &Registry, body: &str, src: KeySource<'_>) -> Prepared {
        let doc: Value = serde_json::from_str(body).unwrap();
        prepare(r.get("s").unwrap(), &doc, body.as_bytes(), src).unwrap()
    }

    #[test]
    fn key_preference_and_content_hash() {
        let r = reg("idempotency_field='/id'\n");
        let p = prep(&r, r#"{"id":"u1"}"#, KeySource::Header("h1"));
        assert_eq!(
            (p.idempotency_key.as_str(), p.key.as_slice()),
            ("h1", &b"h1"[..])
        );
        let p = prep(&r, r#"{"id":"u1"}"#, KeySource::BatchHeader("h1", 3));
        assert_eq!(p.idempotency_key, "u1");
        let p = prep(&r, r#"{"seq":1}"#, KeySource::BatchHeader("h1", 3));
        assert_eq!(p.idempotency_key, "h1/3");
        let a = prep(&r, r#"{"seq":1}"#, KeySource::None);
        let b = prep(&r, r#"{"seq":1}"#, KeySource::None);
        let c = prep(&r, r#"{"seq":2}"#, KeySource::None);
        assert_eq!(a, b);
        assert_ne!(a.idempotency_key, c.idempotency_key);
        assert!(a.idempotency_key.starts_with("h:"));
    }

    #[test]
    fn key_field_and_salting_of_hot_keys_only() {
        let r = reg("key_field='/id'\nsalt={buckets=4, keys=['guest']}\n");
        let p = prep(&r, r#"{"id":"u1"}"#, KeySource::Header("x"));
        assert_eq!((p.key.as_slice(), p.salt), (&b"u1"[..], None));
        let mut salts = std::collections::BTreeSet::new();
        for i in 0..64 {
            let h = format!("k{i}");
            let p = prep(&r, r#"{"id":"guest"}"#, KeySource::Header(&h));
            let n = p.salt.unwrap();
            assert_eq!(p.key, format!("guest~{n}").into_bytes());
            // Same idempotency key, same salt.
            assert_eq!(
                prep(&r, r#"{"id":"guest"}"#, KeySource::Header(&h)).salt,
                Some(n)
            );
            salts.insert(n);
        }
        assert_eq!(salts.len(), 4);
        let doc: Value = serde_json::from_str(r#"{"seq":1}"#).unwrap();
        assert!(prepare(r.get("s").unwrap(), &doc, b"{}", KeySource::None).is_err());
    }
}
