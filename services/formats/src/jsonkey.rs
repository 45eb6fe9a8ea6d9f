//! Keys from JSON records by JSON pointer (RFC 6901), one rule for every stage: a string is
//! its UTF-8 bytes, a number its JSON text; anything else is not a key.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("record is not valid JSON: {0}")]
    BadJson(String),
    #[error("no key at {0}")]
    Missing(String),
    #[error("key at {0} is not a string or a number")]
    NotScalar(String),
}

impl KeyError {
    /// Stable reason code for DLQ headers and summaries.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyError::BadJson(_) => "bad_json",
            KeyError::Missing(_) => "missing_key",
            KeyError::NotScalar(_) => "key_not_scalar",
        }
    }
}

/// The key at `pointer` in the JSON document `bytes`.
pub fn extract(bytes: &[u8], pointer: &str) -> Result<Vec<u8>, KeyError> {
    let doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| KeyError::BadJson(e.to_string()))?;
    key_of(&doc, pointer)
}

/// The key at `pointer` in an already parsed document.
pub fn key_of(doc: &serde_json::Value, pointer: &str) -> Result<Vec<u8>, KeyError> {
    match doc.pointer(pointer) {
        Some(serde_json::Value::String(s)) => Ok(s.as_bytes().to_vec()),
        Some(n @ serde_json::Value::Number(_)) => Ok(n.to_string().into_bytes()),
        Some(serde_json::Value::Null) | None => Err(KeyError::Missing(pointer.to_string())),
        Some(_) => Err(KeyError::NotScalar(pointer.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_numbers_and_failures() {
        assert_eq!(extract(br#"{"id":"u1"}"#, "/id").unwrap(), b"u1");
        assert_eq!(extract(br#"{"id":42}"#, "/id").unwrap(), b"42");
        assert_eq!(extract(br#"{"a":{"b/c":7}}"#, "/a/b~1c").unwrap(), b"7");
        assert_eq!(
            extract(br#"{"id":null}"#, "/id").unwrap_err().reason(),
            "missing_key"
        );
        assert_eq!(
            extract(br#"{"x":1}"#, "/id").unwrap_err().reason(),
            "missing_key"
        );
        assert_eq!(
            extract(br#"{"id":[1]}"#, "/id").unwrap_err().reason(),
            "key_not_scalar"
        );
        assert_eq!(extract(b"{nope", "/id").unwrap_err().reason(), "bad_json");
        assert_eq!(
            extract(b"\xff\xfe", "/id").unwrap_err().reason(),
            "bad_json"
        );
    }
}
