//! HTTP body decoding as ingest does it: content type and encoding headers, gzip, JSON or
//! NDJSON split, per-record validation against the `events` stream's schema, keys. The first
//! input byte picks the headers; the rest is the body.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sieve_ingest::body;
use sieve_ingest::check::{check_all, BodyLimits};
use sieve_ingest::streams::Registry;
use sieve_ingest::validate::RecordLimits;

const CONTENT_TYPES: [&str; 4] = [
    "application/json",
    "application/x-ndjson; charset=utf-8",
    "text/plain",
    "APPLICATION/JSON",
];
const ENCODINGS: [Option<&str>; 4] = [None, Some("gzip"), Some("identity"), Some("br")];

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        Registry::load(&root.join("deploy/streams.toml"), &root.join("schemas"))
            .expect("deploy/streams.toml and schemas/ load")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, raw)) = data.split_first() else {
        return;
    };
    let limits = BodyLimits {
        max_body_bytes: 64 << 10,
        max_records: 100,
        record: RecordLimits {
            max_record_bytes: 16 << 10,
            max_depth: 32,
        },
    };
    let Ok(format) = body::format_of(Some(CONTENT_TYPES[usize::from(pick & 3)])) else {
        return;
    };
    let Ok(gzip) = body::is_gzip(ENCODINGS[usize::from((pick >> 2) & 3)]) else {
        return;
    };
    let idem = (pick & 0x10 != 0).then_some("fuzz-key");
    let stream = registry().get("events").expect("an events stream");
    match check_all(stream, raw.to_vec(), format, gzip, idem, &limits) {
        Ok(checked) => {
            assert!(checked.items.len() <= limits.max_records);
            assert!(checked.body.len() <= limits.max_body_bytes.max(raw.len()));
            for (range, _, verdict) in &checked.items {
                let bytes = &checked.body[range.clone()];
                if verdict.is_ok() {
                    // An accepted record is valid JSON within the limits.
                    assert!(bytes.len() <= limits.record.max_record_bytes);
                    serde_json::from_slice::<serde_json::Value>(bytes)
                        .expect("an accepted record parses");
                }
            }
        }
        Err(r) => assert!(!r.detail.is_empty()),
    }
});
