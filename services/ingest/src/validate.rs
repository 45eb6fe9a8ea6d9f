//! Checks of one record before it may be produced: size, UTF-8, nesting, number range,
//! JSON syntax, the stream's schema, and the key field.

use serde_json::Value;

use crate::reject::{Reason, Rejection};
use crate::streams::Stream;

/// Limits applied to every record.
#[derive(Debug, Clone, Copy)]
pub struct RecordLimits {
    pub max_record_bytes: usize,
    pub max_depth: usize,
}

impl Default for RecordLimits {
    fn default() -> Self {
        RecordLimits {
            max_record_bytes: 1 << 20,
            max_depth: 32,
        }
    }
}

/// A record that passed every check, parsed once for key extraction.
#[derive(Debug)]
pub struct Valid {
    pub doc: Value,
}

/// Runs every check on `bytes` for `stream`.
pub fn check(stream: &Stream, bytes: &[u8], limits: RecordLimits) -> Result<Valid, Rejection> {
    if bytes.len() > limits.max_record_bytes {
        return Err(Rejection::new(
            Reason::RecordTooLarge,
            format!(
                "record is {} bytes; the limit is {}",
                bytes.len(),
                limits.max_record_bytes
            ),
        )
        .at("", "max_record_bytes"));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Rejection::new(
            Reason::InvalidUtf8,
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    scan(text, limits.max_depth)?;
    let doc: Value = serde_json::from_str(text).map_err(|e| {
        let reason = if e.to_string().contains("number out of range") {
            Reason::NumberOutOfRange
        } else {
            Reason::BadJson
        };
        Rejection::new(reason, e.to_string())
    })?;
    schema(stream, &doc)?;
    if let Some(ptr) = &stream.spec.key_field {
        sieve_formats::jsonkey::key_of(&doc, ptr).map_err(|e| Rejection::of_key(ptr, &e))?;
    }
    Ok(Valid { doc })
}

/// The first schema error (the most specific is enough for a client to fix the record).
fn schema(stream: &Stream, doc: &Value) -> Result<(), Rejection> {
    let Some(err) = stream.schema.iter_errors(doc).next() else {
        return Ok(());
    };
    let schema_path = err.schema_path().as_str().to_string();
    let rule = schema_path
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("schema")
        .to_string();
    let mut detail = err.to_string();
    // Echoing a whole huge value back helps nobody.
    if detail.len() > 300 {
        let mut end = 300;
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
        detail.push('…');
    }
    Err(Rejection::new(Reason::SchemaViolation, detail)
        .at(err.instance_path().as_str().to_string(), rule))
}

/// One pass over the text, outside strings: nesting depth (serde's recursion limit would
/// only say "recursion limit exceeded" at 128) and integers that do not fit 64 bits (serde
/// would silently turn them into lossy floats, and downstream ids would not match).
fn scan(text: &str, max_depth: usize) -> Result<(), Rejection> {
    let b = text.as_bytes();
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if in_str {
            match c {
                _ if esc => esc = false,
                b'\\' => esc = true,
                b'"' => in_str = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(Rejection::new(
                        Reason::TooDeep,
                        format!("nesting deeper than {max_depth} levels"),
                    )
                    .at("", "max_depth"));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                while b.get(i).is_some_and(|c| c.is_ascii_digit()) {
                    i += 1;
                }
                let is_int = !matches!(b.get(i), Some(b'.' | b'e' | b'E'));
                let lit = text.get(start..i).unwrap_or_default();
                if is_int
                    && lit != "-"
                    && lit.parse::<i64>().is_err()
                    && lit.parse::<u64>().is_err()
                {
                    return Err(Rejection::new(
                        Reason::NumberOutOfRange,
                        format!("integer {lit} does not fit in 64 bits"),
                    )
                    .at("", "int64_range"));
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::Registry;
    use std::path::Path;

    fn events() -> Registry {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        Registry::parse(
            "[streams.events]\ntopic='t'\nschema='event.schema.json'\nkey_field='/user_id'\n",
            &dir,
        )
        .unwrap()
    }

    fn reason(bytes: &[u8]) -> (Reason, Option<String>, Option<String>) {
        let reg = events();
        let s = reg.get("events").unwrap();
        match check(s, bytes, RecordLimits::default()) {
            Ok(_) => panic!("accepted {}", String::from_utf8_lossy(bytes)),
            Err(r) => (r.reason, r.path, r.rule),
        }
    }

    #[test]
    fn good_records_pass() {
        let reg = events();
        let s = reg.get("events").unwrap();
        let ok = br#"{"event_id":"e1","user_id":"u1","type":"login","amount_cents":18446744073709551615,"x":[1.5e10,-3]}"#;
        assert!(check(s, ok, RecordLimits::default()).is_ok());
    }

    #[test]
    fn each_failure_has_its_reason_path_and_rule() {
        assert_eq!(reason(b"{\"event_id\":").0, Reason::BadJson);
        assert_eq!(reason(b"{\"event_id\":\"\xff\"}").0, Reason::InvalidUtf8);
        assert_eq!(
            reason(br#"{"event_id":"e","user_id":"u","type":"login","amount_cents":123456789012345678901234}"#).0,
            Reason::NumberOutOfRange
        );
        assert_eq!(reason(br#"{"a":1e999}"#).0, Reason::NumberOutOfRange);
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        assert_eq!(reason(deep.as_bytes()).0, Reason::TooDeep);
        assert_eq!(
            reason(br#"{"event_id":"e","type":"login"}"#),
            (
                Reason::SchemaViolation,
                Some("".into()),
                Some("required".into())
            )
        );
        assert_eq!(
            reason(br#"{"event_id":"e","user_id":"u","type":"login","amount_cents":-1}"#),
            (
                Reason::SchemaViolation,
                Some("/amount_cents".into()),
                Some("minimum".into())
            )
        );
        assert_eq!(
            reason(br#"{"event_id":"e","user_id":"u","type":"nope"}"#).2,
            Some("enum".into())
        );
        // Strings may hold anything, including brackets and digits.
        let reg = events();
        let s = reg.get("events").unwrap();
        let tricky =
            br#"{"event_id":"[[[[99999999999999999999999\"","user_id":"u","type":"login"}"#;
        assert!(check(s, tricky, RecordLimits::default()).is_ok());
        let big = RecordLimits {
            max_record_bytes: 10,
            ..Default::default()
        };
        assert_eq!(
            check(s, tricky, big).unwrap_err().reason,
            Reason::RecordTooLarge
        );
    }
}
