//! Request bodies: media type, gzip, size limits, and splitting into records.

use std::io::Read;

use serde_json::value::RawValue;

use crate::reject::{Reason, Rejection};

/// How the body holds its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object, or a JSON array of records.
    Json,
    /// One record per line.
    Ndjson,
}

/// The format named by a `Content-Type` header (parameters such as charset ignored).
pub fn format_of(content_type: Option<&str>) -> Result<Format, Rejection> {
    let essence = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some("application/json") => Ok(Format::Json),
        Some("application/x-ndjson" | "application/ndjson" | "application/jsonl") => {
            Ok(Format::Ndjson)
        }
        other => Err(Rejection::new(
            Reason::UnsupportedMediaType,
            format!(
                "content type {:?} is not application/json or application/x-ndjson",
                other.unwrap_or("(none)")
            ),
        )),
    }
}

/// Whether the body is gzip, from `Content-Encoding`.
pub fn is_gzip(content_encoding: Option<&str>) -> Result<bool, Rejection> {
    match content_encoding
        .map(|c| c.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("" | "identity") => Ok(false),
        Some("gzip" | "x-gzip") => Ok(true),
        Some(other) => Err(Rejection::new(
            Reason::UnsupportedEncoding,
            format!("content encoding {other:?} is not gzip or identity"),
        )),
    }
}

/// Decompresses a gzip body, refusing more than `max` bytes of output (a gzip bomb is
/// refused after `max` bytes, not after it filled the memory).
pub fn gunzip(body: &[u8], max: usize) -> Result<Vec<u8>, Rejection> {
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(max));
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    flate2::read::MultiGzDecoder::new(body)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| Rejection::new(Reason::BadGzip, format!("gzip body: {e}")))?;
    if out.len() > max {
        return Err(too_large(max));
    }
    Ok(out)
}

pub fn too_large(max: usize) -> Rejection {
    Rejection::new(
        Reason::BodyTooLarge,
        format!("body is larger than {max} bytes"),
    )
}

/// One record of a request: its bytes and, for NDJSON, its line number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item<'a> {
    pub bytes: &'a [u8],
    pub line: Option<u64>,
}

/// The records of a body, and whether it was a batch (array or NDJSON) or one record.
#[derive(Debug)]
pub struct Split<'a> {
    pub items: Vec<Item<'a>>,
    pub batch: bool,
}

/// Splits a body into records without parsing them (each is checked on its own later).
pub fn split(format: Format, body: &[u8], max_records: usize) -> Result<Split<'_>, Rejection> {
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() {
        return Err(Rejection::new(
            Reason::EmptyBody,
            "the body holds no record",
        ));
    }
    let split = match format {
        Format::Ndjson => Split {
            items: body
                .split(|b| *b == b'\n')
                .enumerate()
                .map(|(i, l)| Item {
                    bytes: l.trim_ascii(),
                    line: Some(i as u64 + 1),
                })
                .filter(|it| !it.bytes.is_empty())
                .collect(),
            batch: true,
        },
        Format::Json if trimmed.first() == Some(&b'[') => Split {
            items: array(trimmed)?,
            batch: true,
        },
        Format::Json => Split {
            items: vec![Item {
                bytes: trimmed,
                line: None,
            }],
            batch: false,
        },
    };
    if split.items.len() > max_records {
        return Err(Rejection::new(
            Reason::TooManyRecords,
            format!(
                "{} records; the limit per request is {max_records}",
                split.items.len()
            ),
        ));
    }
    if split.items.is_empty() {
        return Err(Rejection::new(
            Reason::EmptyBody,
            "the batch holds no record",
        ));
    }
    Ok(split)
}

/// Elements of a JSON array as their original bytes. A broken array cannot be split into
/// records, so it is refused whole.
fn array(body: &[u8]) -> Result<Vec<Item<'_>>, Rejection> {
    let text = std::str::from_utf8(body).map_err(|e| {
        Rejection::new(
            Reason::InvalidUtf8,
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    let raw: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| {
        let reason = if e.to_string().contains("recursion limit") {
            Reason::TooDeep
        } else {
            Reason::BadJson
        };
        Rejection::new(reason, format!("JSON array: {e}"))
    })?;
    Ok(raw
        .into_iter()
        .map(|r| Item {
            bytes: r.get().as_bytes(),
            line: None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn media_types_and_encodings() {
        assert_eq!(
            format_of(Some("application/json; charset=utf-8")).unwrap(),
            Format::Json
        );
        assert_eq!(
            format_of(Some("Application/X-NDJSON")).unwrap(),
            Format::Ndjson
        );
        assert_eq!(
            format_of(Some("text/plain")).unwrap_err().reason,
            Reason::UnsupportedMediaType
        );
        assert_eq!(
            format_of(None).unwrap_err().reason,
            Reason::UnsupportedMediaType
        );
        assert!(is_gzip(Some("gzip")).unwrap());
        assert!(!is_gzip(None).unwrap());
        assert_eq!(
            is_gzip(Some("br")).unwrap_err().reason,
            Reason::UnsupportedEncoding
        );
    }

    #[test]
    fn splitting() {
        let s = split(Format::Json, b" {\"a\":1} ", 10).unwrap();
        assert!(!s.batch);
        assert_eq!(s.items[0].bytes, b"{\"a\":1}");
        let s = split(Format::Json, b"[{\"a\":1}, 2 ,\"x\"]", 10).unwrap();
        assert_eq!(
            s.items.iter().map(|i| i.bytes).collect::<Vec<_>>(),
            [&b"{\"a\":1}"[..], b"2", b"\"x\""]
        );
        let s = split(Format::Ndjson, b"{\"a\":1}\n\n{bad\r\n", 10).unwrap();
        assert_eq!(s.items.len(), 2);
        assert_eq!(s.items[1].line, Some(3));
        assert_eq!(s.items[1].bytes, b"{bad");
        assert_eq!(
            split(Format::Json, b"  ", 10).unwrap_err().reason,
            Reason::EmptyBody
        );
        assert_eq!(
            split(Format::Json, b"[]", 10).unwrap_err().reason,
            Reason::EmptyBody
        );
        assert_eq!(
            split(Format::Json, b"[{\"a\":1},", 10).unwrap_err().reason,
            Reason::BadJson
        );
        assert_eq!(
            split(Format::Ndjson, b"1\n2\n3", 2).unwrap_err().reason,
            Reason::TooManyRecords
        );
    }

    #[test]
    fn gzip_limits_and_truncation() {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&[b' '; 10_000]).unwrap();
        let gz = e.finish().unwrap();
        assert_eq!(gunzip(&gz, 10_000).unwrap().len(), 10_000);
        assert_eq!(gunzip(&gz, 9_999).unwrap_err().reason, Reason::BodyTooLarge);
        assert_eq!(
            gunzip(&gz[..gz.len() / 2], 10_000).unwrap_err().reason,
            Reason::BadGzip
        );
    }
}
