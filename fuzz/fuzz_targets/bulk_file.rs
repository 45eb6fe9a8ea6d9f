//! Bulk file reader: format detection (plain, gzip, zstd) and the NDJSON / top-level array
//! split. Checked against serde_json: when the (plain) input is a JSON array, the reader
//! yields exactly its elements, in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sieve_formats::jsonfile;

/// Stop after this many decompressed record bytes: a compression bomb is the reader's
/// caller's to bound, not the fuzzer's memory.
const BUDGET: usize = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok((reader, _count)) = jsonfile::decode(std::io::Cursor::new(data.to_vec())) else {
        return;
    };
    let mut records: Vec<Vec<u8>> = Vec::new();
    let mut seen = 0usize;
    let result = jsonfile::for_each_record("fuzz", reader, |_, bytes| {
        assert!(!bytes.is_empty());
        seen += bytes.len();
        if seen > BUDGET {
            return Err("budget".into());
        }
        records.push(bytes.to_vec());
        Ok(())
    });
    let plain = !data.starts_with(&[0x1f, 0x8b]) && !data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    let Ok(serde_json::Value::Array(elements)) = serde_json::from_slice::<serde_json::Value>(data)
    else {
        return;
    };
    if !plain || !data.trim_ascii_start().starts_with(b"[") {
        return;
    }
    assert!(result.is_ok(), "valid array refused: {result:?}");
    assert_eq!(records.len(), elements.len());
    for (bytes, element) in records.iter().zip(&elements) {
        let parsed: serde_json::Value =
            serde_json::from_slice(bytes).expect("an element of a valid array parses");
        assert_eq!(&parsed, element);
    }
});
