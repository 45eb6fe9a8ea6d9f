//! Keys from JSON records by JSON pointer (RFC 6901), one rule for every stage: a string is
//! its UTF-8 bytes, a number its JSON text; anything else is not a key.

use std::borrow::Cow;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

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

/// A `--key` argument as a JSON pointer: a pointer (`/id`, `/user/id`) is kept, anything else
/// is a top-level field name (`id`, as DuckDB and Spark users write it), escaped as RFC 6901
/// asks (`~` → `~0`, `/` → `~1`).
pub fn key_pointer(arg: &str) -> Result<String, String> {
    if arg.is_empty() {
        return Err("empty key: give a field name (id) or a JSON pointer (/id)".into());
    }
    if arg.starts_with('/') {
        return Ok(arg.to_string());
    }
    Ok(format!("/{}", arg.replace('~', "~0").replace('/', "~1")))
}

/// The key at `pointer` in the JSON document `bytes`. The whole document is read as a full
/// parse would read it (every string decoded, the same nesting limit), but only the value at
/// the pointer is built (building a `serde_json::Value` of each record was the file
/// anti-join's largest cost).
pub fn extract(bytes: &[u8], pointer: &str) -> Result<Vec<u8>, KeyError> {
    let bad = |e: &dyn std::fmt::Display| KeyError::BadJson(e.to_string());
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let found = match tokens(pointer) {
        Some(tokens) => At(&tokens).deserialize(&mut de).map_err(|e| bad(&e))?,
        None => {
            Checked::deserialize(&mut de).map_err(|e| bad(&e))?;
            Found::Missing
        }
    };
    de.end().map_err(|e| bad(&e))?;
    match found {
        Found::Key(k) => Ok(k),
        Found::Missing => Err(KeyError::Missing(pointer.to_string())),
        Found::NotScalar => Err(KeyError::NotScalar(pointer.to_string())),
    }
}

/// The reference tokens of an RFC 6901 pointer; None when it is not one.
fn tokens(pointer: &str) -> Option<Vec<String>> {
    if pointer.is_empty() {
        return Some(Vec::new());
    }
    let rest = pointer.strip_prefix('/')?;
    Some(
        rest.split('/')
            .map(|t| match t.contains('~') {
                true => t.replace("~1", "/").replace("~0", "~"),
                false => t.to_string(),
            })
            .collect(),
    )
}

/// An array index token as `serde_json::Value::pointer` reads it: digits, no leading zero.
fn index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

enum Found {
    Key(Vec<u8>),
    Missing,
    NotScalar,
}

/// Reads one value, descending into it along the remaining tokens.
struct At<'t>(&'t [String]);

impl<'de> DeserializeSeed<'de> for At<'_> {
    type Value = Found;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Found, D::Error> {
        match self.0.split_first() {
            None => Ok(match key_of(&serde_json::Value::deserialize(d)?, "") {
                Ok(k) => Found::Key(k),
                Err(KeyError::NotScalar(_)) => Found::NotScalar,
                Err(_) => Found::Missing,
            }),
            Some((token, rest)) => d.deserialize_any(Step { token, rest }),
        }
    }
}

/// One level of the walk: the member or element named by `token`, the rest skipped.
struct Step<'t> {
    token: &'t str,
    rest: &'t [String],
}

impl<'de> Visitor<'de> for Step<'_> {
    type Value = Found;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
        // Like a parsed document, a repeated member counts with its last value.
        let mut found = Found::Missing;
        while let Some(MemberName(name)) = map.next_key()? {
            if name == self.token {
                found = map.next_value_seed(At(self.rest))?;
            } else {
                map.next_value::<Checked>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Found, A::Error> {
        let wanted = index(self.token);
        let mut found = Found::Missing;
        for i in 0.. {
            if Some(i) == wanted {
                match seq.next_element_seed(At(self.rest))? {
                    Some(f) => found = f,
                    None => break,
                }
            } else if seq.next_element::<Checked>()?.is_none() {
                break;
            }
        }
        Ok(found)
    }

    // A scalar where the pointer goes on: nothing there.
    fn visit_bool<E>(self, _: bool) -> Result<Found, E> {
        Ok(Found::Missing)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Found, E> {
        Ok(Found::Missing)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Found, E> {
        Ok(Found::Missing)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Found, E> {
        Ok(Found::Missing)
    }
    fn visit_str<E>(self, _: &str) -> Result<Found, E> {
        Ok(Found::Missing)
    }
    fn visit_unit<E>(self) -> Result<Found, E> {
        Ok(Found::Missing)
    }
}

/// A value read and checked as a full parse would (strings decoded, so a lone surrogate
/// escape is refused; nesting counted), then dropped: `IgnoredAny` skips strings without
/// decoding their escapes and nesting without a limit.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Checked)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
}

/// A member name, borrowed from the input unless it had escapes.
struct MemberName<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for MemberName<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl<'de> Visitor<'de> for Name {
            type Value = MemberName<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(Name)
    }
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
    fn a_key_argument_is_a_pointer_or_a_field_name() {
        assert_eq!(key_pointer("/id").unwrap(), "/id");
        assert_eq!(key_pointer("/user/id").unwrap(), "/user/id");
        assert_eq!(key_pointer("id").unwrap(), "/id");
        assert_eq!(key_pointer("a/b~c").unwrap(), "/a~1b~0c");
        assert!(key_pointer("").unwrap_err().contains("field name"));
        let ptr = key_pointer("user id").unwrap();
        assert_eq!(extract(br#"{"user id":7}"#, &ptr).unwrap(), b"7");
    }

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

    /// What a full parse and `Value::pointer` say, the rule `extract` must keep.
    fn by_full_parse(bytes: &[u8], pointer: &str) -> Result<Vec<u8>, KeyError> {
        let doc: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| KeyError::BadJson(e.to_string()))?;
        key_of(&doc, pointer)
    }

    #[test]
    fn the_streaming_walk_agrees_with_a_full_parse() {
        let docs: &[&[u8]] = &[
            br#"{"id":"u1","name":"x","tags":[1,2,{"id":3}]}"#,
            br#"{"a":{"b/c":7,"m~n":"t"},"id":1.5e3}"#,
            br#"{"id":"first","id":"last"}"#,
            br#"{"arr":[[0,1],[2,{"k":"v"}]],"n":null,"t":true}"#,
            br#"{"esc\"aped":"q","uni\u0041":"w","id":"caf\u00e9"}"#,
            br#"[{"id":"in-array"},5]"#,
            br#""top""#,
            br#"12"#,
            br#"{"id":"x"} trailing"#,
            br#"{"id":"x","other":"\u00zz"}"#,
            b"{\"id\":\"x\",\"other\":\"\xff\"}",
            br#"{"id":"x",}"#,
            br#"{"id":-0.0,"big":123456789012345678901234567890}"#,
            br#"{"event_id":"\ud800","id":"k"}"#,
            br#"{"id":"k","x":"\udc00\ud800"}"#,
        ];
        let deep = format!(
            r#"{{"deep":{}{},"id":"k"}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let docs: Vec<&[u8]> = docs.iter().copied().chain([deep.as_bytes()]).collect();
        let pointers = [
            "",
            "/id",
            "/name",
            "/tags/2/id",
            "/tags/01",
            "/tags/+1",
            "/tags/1",
            "/a/b~1c",
            "/a/m~0n",
            "/arr/1/1/k",
            "/arr/1/5",
            "/n",
            "/t",
            "/0/id",
            "/1",
            "/big",
            "id",
            "/esc\"aped",
            "/uniA",
            "/id/x",
        ];
        for doc in &docs {
            let text = String::from_utf8_lossy(doc);
            for p in pointers {
                let (a, b) = (extract(doc, p), by_full_parse(doc, p));
                match (&a, &b) {
                    (Ok(x), Ok(y)) => assert_eq!(x, y, "{text} at {p}"),
                    (Err(x), Err(y)) => assert_eq!(x.reason(), y.reason(), "{text} at {p}"),
                    _ => panic!("{text} at {p}: {a:?} vs {b:?}"),
                }
            }
        }
    }
}
