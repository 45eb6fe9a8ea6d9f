//! A request body to one verdict per record: decompress, split, validate, key. Pure CPU
//! work on untrusted bytes, apart from the HTTP plumbing so it can be fuzzed on its own.

use std::ops::Range;

use crate::body::{self, Format};
use crate::keys::{self, KeySource, Prepared};
use crate::reject::Rejection;
use crate::streams::Stream;
use crate::validate::{self, RecordLimits};

/// Limits of one request.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body, after gzip decompression.
    pub max_body_bytes: usize,
    /// Most records in one request.
    pub max_records: usize,
    pub record: RecordLimits,
}

/// One record's place in the body, NDJSON line and verdict.
pub type Verdict = (Range<usize>, Option<u64>, Result<Prepared, Rejection>);

/// Every record's verdict.
#[derive(Debug)]
pub struct Checked {
    pub body: Vec<u8>,
    pub batch: bool,
    pub items: Vec<Verdict>,
}

/// Decompresses, splits and validates `raw` for `stream`. A whole-request problem (bad gzip,
/// too large, too many records, broken array) is an `Err`; a bad record is its verdict.
pub fn check_all(
    stream: &Stream,
    raw: Vec<u8>,
    format: Format,
    gzip: bool,
    idem: Option<&str>,
    limits: &BodyLimits,
) -> Result<Checked, Rejection> {
    let body = if gzip {
        body::gunzip(&raw, limits.max_body_bytes)?
    } else {
        raw
    };
    let split = body::split(format, &body, limits.max_records)?;
    let base = body.as_ptr() as usize;
    let items = split
        .items
        .iter()
        .enumerate()
        .map(|(i, it)| {
            // Records are sub-slices of the body: keep their place, not a copy.
            let start = it.bytes.as_ptr() as usize - base;
            let source = match (idem, split.batch) {
                (Some(h), false) => KeySource::Header(h),
                (Some(h), true) => KeySource::BatchHeader(h, i),
                (None, _) => KeySource::None,
            };
            let verdict = validate::check(stream, it.bytes, limits.record)
                .and_then(|v| keys::prepare(stream, &v.doc, it.bytes, source));
            (start..start + it.bytes.len(), it.line, verdict)
        })
        .collect();
    let batch = split.batch;
    Ok(Checked { body, batch, items })
}
