//! `POST /v1/events/{stream}`: authenticate, split, validate, produce, and answer 202 only
//! once the broker acknowledged every accepted record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use tokio::sync::Semaphore;

use crate::auth::{ApiKey, ApiKeys};
use crate::body;
use crate::check::{check_all, BodyLimits, Checked};
use crate::headers;
use crate::keys::{self, Prepared};
use crate::metrics;
use crate::problem::{Accepted, Problem, RecordResult};
use crate::producer::{Out, SendError, Sink};
use crate::reject::{Reason, Rejection};
use crate::streams::{Registry, Stream};

/// The committed OpenAPI description, served as is.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Everything a request needs, shared by all of them.
pub struct App {
    pub registry: Registry,
    pub keys: ApiKeys,
    pub sink: Sink,
    pub limits: BodyLimits,
    /// How long a client may take to send a body.
    pub body_timeout: Duration,
    pub dlq: String,
    pub requests: Arc<Semaphore>,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/events/{stream}", post(post_events))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .with_state(app)
}

async fn post_events(
    State(app): State<Arc<App>>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let _in_flight = metrics::InFlight::start();
    // Unknown names stay out of metric labels (clients choose them).
    let label = if app.registry.get(&stream).is_some() {
        stream.as_str()
    } else {
        "unknown"
    };
    let (status, resp) = match handle(&app, &stream, &headers, body).await {
        Ok(a) => (202, (StatusCode::ACCEPTED, Json(a)).into_response()),
        Err(p) => {
            metrics::rejected(p.reason);
            if p.status >= 500 {
                tracing::warn!(stream = label, reason = %p.reason, detail = %p.detail, "request failed");
            }
            (p.status, p.into_response())
        }
    };
    metrics::request(label, status, start.elapsed().as_secs_f64());
    resp
}

fn header_str(h: &HeaderMap, name: impl axum::http::header::AsHeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn api_key_of(h: &HeaderMap) -> Option<&str> {
    header_str(h, "x-api-key").or_else(|| {
        header_str(h, header::AUTHORIZATION).and_then(|a| a.strip_prefix("Bearer ").map(str::trim))
    })
}

/// The `Idempotency-Key` header: 1–256 visible ASCII characters.
fn idempotency_key_of(h: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(v) = h.get("idempotency-key") else {
        return Ok(None);
    };
    let ok =
        !v.is_empty() && v.len() <= 256 && v.as_bytes().iter().all(|b| (0x21..=0x7e).contains(b));
    if !ok {
        return Err(Problem::new(
            Reason::BadIdempotencyKey,
            "Idempotency-Key must be 1 to 256 visible ASCII characters",
        ));
    }
    Ok(Some(String::from_utf8_lossy(v.as_bytes()).into_owned()))
}

/// What the headers alone decided: the request may send its body.
struct Admitted<'a> {
    _slot: tokio::sync::OwnedSemaphorePermit,
    key: &'a ApiKey,
    stream: &'a Stream,
    format: body::Format,
    gzip: bool,
    idem: Option<String>,
}

/// Checks everything the headers decide, before the body is read.
fn admit<'a>(app: &'a Arc<App>, name: &str, h: &HeaderMap) -> Result<Admitted<'a>, Problem> {
    // Bounds memory: at most this many bodies are held at once.
    let slot = app
        .requests
        .clone()
        .try_acquire_owned()
        .map_err(|_| Problem::new(Reason::Overloaded, "too many requests in progress"))?;
    let key = app.keys.authenticate(api_key_of(h)).map_err(|r| {
        Problem::new(
            r,
            "send an API key as `Authorization: Bearer KEY` or `X-Api-Key`",
        )
    })?;
    let stream = app.registry.get(name).ok_or_else(|| {
        let known: Vec<&str> = app.registry.names().collect();
        Problem::new(
            Reason::UnknownStream,
            format!("no stream {name:?}; streams: {}", known.join(", ")),
        )
    })?;
    if !key.allows(name) {
        return Err(Problem::new(
            Reason::StreamNotAllowed,
            format!("tenant {} may not write to stream {name}", key.tenant),
        ));
    }
    Ok(Admitted {
        _slot: slot,
        key,
        stream,
        format: body::format_of(header_str(h, header::CONTENT_TYPE))?,
        gzip: body::is_gzip(header_str(h, header::CONTENT_ENCODING))?,
        idem: idempotency_key_of(h)?,
    })
}

async fn handle(
    app: &Arc<App>,
    name: &str,
    h: &HeaderMap,
    body: Body,
) -> Result<Accepted, Problem> {
    let Admitted {
        _slot,
        key,
        stream,
        format,
        gzip,
        idem,
    } = match admit(app, name, h) {
        Ok(a) => a,
        Err(p) => {
            // Read what the client is still sending before answering: a socket closed with
            // unread data is reset, and the client sees a broken pipe instead of this answer
            // (measured under overload: 8 of 1 290 requests).
            discard(body.into_data_stream(), app.limits.max_body_bytes).await;
            return Err(p);
        }
    };
    let declared = header_str(h, header::CONTENT_LENGTH).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > app.limits.max_body_bytes) {
        discard(body.into_data_stream(), app.limits.max_body_bytes).await;
        return Err(body::too_large(app.limits.max_body_bytes).into());
    }
    // A client trickling its body would hold a request slot forever.
    let raw = tokio::time::timeout(app.body_timeout, read_body(body, app.limits.max_body_bytes))
        .await
        .map_err(|_| {
            Problem::new(
                Reason::RequestTimeout,
                format!("the body did not arrive within {:?}", app.body_timeout),
            )
        })??;
    let checked = {
        let app = app.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let stream = app
                .registry
                .get(&name)
                .ok_or_else(|| Problem::new(Reason::UnknownStream, name.clone()))?;
            check_all(stream, raw, format, gzip, idem.as_deref(), &app.limits)
                .map_err(Problem::from)
        })
        .await
        // Only when the blocking pool is shutting down (or a check panicked): retryable.
        .map_err(|e| Problem::new(Reason::Overloaded, format!("validation task: {e}")))??
    };
    produce(app, stream, key, checked).await
}

/// Reads at most `max` bytes of body.
async fn read_body(body: Body, max: usize) -> Result<Vec<u8>, Problem> {
    let mut out = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| Problem::new(Reason::BadJson, format!("reading the body failed: {e}")))?;
        if out.len() + chunk.len() > max {
            drop(out);
            discard(stream, max).await;
            return Err(body::too_large(max).into());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Reads and drops the rest of an oversized body (up to 4 × `max`, for at most 5 s) before
/// answering 413: a client still sending would otherwise see a connection reset instead of
/// the answer (the "lingering close" of web servers).
async fn discard(mut stream: axum::body::BodyDataStream, max: usize) {
    let mut left = max.saturating_mul(4);
    let drain = async {
        while let Some(Ok(chunk)) = stream.next().await {
            left = left.saturating_sub(chunk.len());
            if left == 0 {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
}

fn rejected_result(i: usize, line: Option<u64>, r: &Rejection) -> RecordResult {
    RecordResult {
        index: i,
        line,
        status: "rejected",
        idempotency_key: None,
        partition: None,
        offset: None,
        rejection: Some(r.clone()),
    }
}

async fn produce(
    app: &App,
    stream: &Stream,
    key: &ApiKey,
    c: Checked,
) -> Result<Accepted, Problem> {
    let accepted = c.items.iter().filter(|i| i.2.is_ok()).count();
    let rejected = c.items.len() - accepted;
    if accepted == 0 {
        // Nothing to write: the client learns every reason synchronously, no DLQ needed.
        let errors: Vec<RecordResult> = c
            .items
            .iter()
            .enumerate()
            .filter_map(|(i, (_, line, v))| v.as_ref().err().map(|r| rejected_result(i, *line, r)))
            .collect();
        let first = errors
            .first()
            .and_then(|e| e.rejection.clone())
            .unwrap_or_else(|| Rejection::new(Reason::EmptyBody, "no record"));
        let detail = if c.batch {
            format!(
                "all {} records were rejected; first: {}",
                errors.len(),
                first.detail
            )
        } else {
            first.detail.clone()
        };
        let mut p = Problem::new(first.reason, detail);
        p.errors = errors;
        return Err(p);
    }
    app.keys.take(key, accepted).map_err(|wait| {
        Problem::new(
            Reason::RateLimited,
            format!("API key of tenant {} is over its record rate", key.tenant),
        )
        .retry_after(wait)
    })?;
    let _budget = app.sink.reserve(c.items.len()).map_err(|_| {
        Problem::new(
            Reason::Overloaded,
            "the producer's in-flight budget is spent; retry later",
        )
    })?;
    metrics::records_in_flight(app.sink.in_use());
    let outs: Vec<Out<'_>> = c
        .items
        .iter()
        .enumerate()
        .map(|(i, (range, line, v))| {
            let payload = c.body.get(range.clone()).unwrap_or_default();
            match v {
                Ok(p) => accepted_out(stream, key, p, payload),
                Err(r) => dlq_out(app, stream, key, r, i, *line, payload),
            }
        })
        .collect();
    let acks = app.sink.send_all(&outs).await;
    metrics::records_in_flight(app.sink.in_use());
    let acks = acks.map_err(|e| match e {
        SendError::Overloaded => Problem::new(Reason::Overloaded, "in-flight budget spent"),
        SendError::Unavailable(why) => Problem::new(
            Reason::BrokerUnavailable,
            format!("not acknowledged, retry with the same Idempotency-Key: {why}"),
        ),
    })?;
    metrics::records(&stream.name, "accepted", accepted);
    metrics::records(&stream.name, "rejected", rejected);
    let results = c
        .items
        .iter()
        .zip(acks)
        .enumerate()
        .map(|(i, ((_, line, v), ack))| match v {
            Ok(p) => RecordResult {
                index: i,
                line: *line,
                status: "accepted",
                idempotency_key: Some(p.idempotency_key.clone()),
                partition: Some(ack.partition),
                offset: Some(ack.offset),
                rejection: None,
            },
            Err(r) => {
                metrics::rejected(r.reason);
                rejected_result(i, *line, r)
            }
        })
        .collect();
    Ok(Accepted {
        stream: stream.name.clone(),
        accepted,
        rejected,
        results,
    })
}

fn accepted_out<'a>(stream: &'a Stream, key: &ApiKey, p: &Prepared, payload: &'a [u8]) -> Out<'a> {
    let mut h = vec![
        (
            headers::IDEMPOTENCY_KEY,
            p.idempotency_key.clone().into_bytes(),
        ),
        (headers::STREAM, stream.name.clone().into_bytes()),
        (headers::TENANT, key.tenant.clone().into_bytes()),
        (headers::SOURCE, b"http".to_vec()),
    ];
    if let Some(s) = p.salt {
        h.push((headers::SALT, s.to_string().into_bytes()));
    }
    Out {
        topic: &stream.spec.topic,
        key: p.key.clone(),
        payload,
        headers: h,
    }
}

fn dlq_out<'a>(
    app: &'a App,
    stream: &Stream,
    key: &ApiKey,
    r: &Rejection,
    index: usize,
    line: Option<u64>,
    payload: &'a [u8],
) -> Out<'a> {
    let position = match line {
        Some(l) => format!("index {index}, line {l}"),
        None => format!("index {index}"),
    };
    let mut headers = r.dlq_headers(stream, format!("http {position}"));
    headers.push((headers::TENANT, key.tenant.clone().into_bytes()));
    Out {
        topic: &app.dlq,
        key: keys::content_key(&stream.name, payload).into_bytes(),
        payload,
        headers,
    }
}
