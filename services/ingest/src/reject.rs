//! Why a record or a request was refused: a stable reason code (for answers, DLQ headers,
//! metrics and summaries), the HTTP status it maps to, and where in the record it failed.

use serde::Serialize;
use sieve_core::dlq;
use sieve_formats::jsonkey::KeyError;

use crate::headers;
use crate::streams::Stream;

/// Stable reason codes. Documented in docs/ingest.md; never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    // One record.
    BadJson,
    InvalidUtf8,
    NumberOutOfRange,
    TooDeep,
    SchemaViolation,
    MissingKey,
    KeyNotScalar,
    RecordTooLarge,
    // The whole request.
    EmptyBody,
    BodyTooLarge,
    TooManyRecords,
    BadGzip,
    BadIdempotencyKey,
    UnsupportedMediaType,
    UnsupportedEncoding,
    MissingApiKey,
    InvalidApiKey,
    StreamNotAllowed,
    UnknownStream,
    RequestTimeout,
    RateLimited,
    Overloaded,
    BrokerUnavailable,
}

impl dlq::Reason for Reason {
    const STAGE: &'static str = "ingest";
    fn as_str(self) -> &'static str {
        Reason::as_str(self)
    }
}

impl Reason {
    /// Every reason, for docs and the OpenAPI check.
    pub const ALL: [Reason; 23] = [
        Reason::BadJson,
        Reason::InvalidUtf8,
        Reason::NumberOutOfRange,
        Reason::TooDeep,
        Reason::SchemaViolation,
        Reason::MissingKey,
        Reason::KeyNotScalar,
        Reason::RecordTooLarge,
        Reason::EmptyBody,
        Reason::BodyTooLarge,
        Reason::TooManyRecords,
        Reason::BadGzip,
        Reason::BadIdempotencyKey,
        Reason::UnsupportedMediaType,
        Reason::UnsupportedEncoding,
        Reason::MissingApiKey,
        Reason::InvalidApiKey,
        Reason::StreamNotAllowed,
        Reason::UnknownStream,
        Reason::RequestTimeout,
        Reason::RateLimited,
        Reason::Overloaded,
        Reason::BrokerUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadJson => "bad_json",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::NumberOutOfRange => "number_out_of_range",
            Reason::TooDeep => "too_deep",
            Reason::SchemaViolation => "schema_violation",
            Reason::MissingKey => "missing_key",
            Reason::KeyNotScalar => "key_not_scalar",
            Reason::RecordTooLarge => "record_too_large",
            Reason::EmptyBody => "empty_body",
            Reason::BodyTooLarge => "body_too_large",
            Reason::TooManyRecords => "too_many_records",
            Reason::BadGzip => "bad_gzip",
            Reason::BadIdempotencyKey => "bad_idempotency_key",
            Reason::UnsupportedMediaType => "unsupported_media_type",
            Reason::UnsupportedEncoding => "unsupported_encoding",
            Reason::MissingApiKey => "missing_api_key",
            Reason::InvalidApiKey => "invalid_api_key",
            Reason::StreamNotAllowed => "stream_not_allowed",
            Reason::UnknownStream => "unknown_stream",
            Reason::RequestTimeout => "request_timeout",
            Reason::RateLimited => "rate_limited",
            Reason::Overloaded => "overloaded",
            Reason::BrokerUnavailable => "broker_unavailable",
        }
    }

    /// The HTTP status of a request refused for this reason.
    pub fn status(self) -> u16 {
        match self {
            Reason::RecordTooLarge | Reason::BodyTooLarge | Reason::TooManyRecords => 413,
            Reason::UnsupportedMediaType | Reason::UnsupportedEncoding => 415,
            Reason::MissingApiKey | Reason::InvalidApiKey => 401,
            Reason::StreamNotAllowed => 403,
            Reason::UnknownStream => 404,
            Reason::RequestTimeout => 408,
            Reason::RateLimited | Reason::Overloaded => 429,
            Reason::BrokerUnavailable => 503,
            _ => 400,
        }
    }

    pub fn title(self) -> &'static str {
        match self.status() {
            413 => "Payload too large",
            415 => "Unsupported media type",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Unknown stream",
            408 => "Request timeout",
            429 => "Too many requests",
            503 => "Service unavailable",
            _ => "Invalid request",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One refused record: why, where in the record (JSON pointer), and which rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub reason: Reason,
    /// JSON pointer into the record ("" = the record itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The schema keyword (or limit) that failed, e.g. `required`, `type`, `max_depth`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub detail: String,
}

impl Rejection {
    /// Headers of this record's DLQ copy: the core's DLQ headers (stage, reason, detail with
    /// path and rule, the topic it was bound for), the stream and where it came from.
    /// The DLQ headers of a record rejected for this; the record is counted as dead-lettered.
    pub fn dlq_headers(&self, stream: &Stream, source: String) -> Vec<(&'static str, Vec<u8>)> {
        dlq::count(self.reason);
        let detail = match (&self.path, &self.rule) {
            (Some(p), Some(rule)) => format!("{} (path {p:?}, rule {rule})", self.detail),
            _ => self.detail.clone(),
        };
        vec![
            (
                dlq::STAGE,
                <Reason as dlq::Reason>::STAGE.as_bytes().to_vec(),
            ),
            (dlq::REASON, self.reason.as_str().as_bytes().to_vec()),
            (dlq::DETAIL, detail.into_bytes()),
            (dlq::SOURCE_TOPIC, stream.spec.topic.clone().into_bytes()),
            (headers::STREAM, stream.name.clone().into_bytes()),
            (headers::SOURCE, source.into_bytes()),
        ]
    }

    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            path: None,
            rule: None,
            detail: detail.into(),
        }
    }

    /// A record whose key field (JSON pointer `ptr`) is missing or not a scalar.
    pub fn of_key(ptr: &str, e: &KeyError) -> Self {
        let reason = match e {
            KeyError::NotScalar(_) => Reason::KeyNotScalar,
            _ => Reason::MissingKey,
        };
        Rejection::new(reason, e.to_string()).at(ptr, "key_field")
    }

    pub fn at(mut self, path: impl Into<String>, rule: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self.rule = Some(rule.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed OpenAPI document and docs/ingest.md list every reason with its status.
    #[test]
    fn openapi_and_docs_list_every_reason() {
        let doc: serde_json::Value = serde_json::from_str(crate::http::OPENAPI).unwrap();
        let listed = &doc["components"]["schemas"]["Reason"]["enum"];
        let docs = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/ingest.md"),
        )
        .unwrap();
        for r in Reason::ALL {
            assert!(
                listed.as_array().unwrap().iter().any(|x| x == r.as_str()),
                "{r} missing in openapi.json"
            );
            let responses = &doc["paths"]["/v1/events/{stream}"]["post"]["responses"];
            let desc = responses[r.status().to_string()]["description"]
                .as_str()
                .unwrap();
            assert!(
                desc.contains(r.as_str()),
                "{r} not under {} in openapi.json",
                r.status()
            );
            assert!(
                docs.contains(&format!("| `{r}` | {} |", r.status())),
                "{r} ({}) missing in docs/ingest.md",
                r.status()
            );
        }
    }
}
