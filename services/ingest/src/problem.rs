//! Answers: RFC 9457 problem documents for refusals, and the per-record result list.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::reject::{Reason, Rejection};

/// One record's outcome in a batch answer (and in a 400's `errors`).
#[derive(Debug, Clone, Serialize)]
pub struct RecordResult {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
    #[serde(flatten)]
    pub rejection: Option<Rejection>,
}

/// A refused request (RFC 9457): `type`, `title`, `status`, `detail`, plus `reason`,
/// the failing records in `errors`, and `Retry-After` for 429 and 503.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    pub reason: Reason,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<RecordResult>,
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

impl Problem {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        let status = reason.status();
        Problem {
            kind: format!(
                "https://sieve.dev/problems/{}",
                reason.as_str().replace('_', "-")
            ),
            title: reason.title(),
            status,
            detail: detail.into(),
            reason,
            errors: Vec::new(),
            retry_after: match status {
                429 | 503 => Some(Duration::from_secs(1)),
                _ => None,
            },
        }
    }

    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }
}

impl From<Rejection> for Problem {
    fn from(r: Rejection) -> Self {
        Problem::new(r.reason, r.detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(d) = self.retry_after {
            // Whole seconds, rounded up, never 0: clients must wait at least a moment.
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

/// The 202 answer.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub stream: String,
    pub accepted: usize,
    pub rejected: usize,
    pub results: Vec<RecordResult>,
}
