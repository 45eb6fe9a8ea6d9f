//! Replays the committed fuzz inputs of the `jsonkey` and `bulk_file` targets
//! (fuzz/regressions/<target>/) on stable, so CI keeps every input that once broke a
//! decoder: each must now decode to a value or a typed error, without a panic.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use sieve_formats::{jsonfile, jsonkey};

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no inputs in {}", dir.display());
    out
}

#[test]
fn jsonkey_inputs_decode_or_fail_cleanly() {
    for (path, data) in inputs("jsonkey") {
        let (pointer, doc) = match data.iter().position(|b| *b == b'\n') {
            Some(i) => (&data[..i], &data[i + 1..]),
            None => (&b"/id"[..], &data[..]),
        };
        let pointer = String::from_utf8_lossy(pointer);
        if let Err(e) = jsonkey::extract(doc, &pointer) {
            assert!(!e.reason().is_empty(), "{}", path.display());
        }
    }
}

#[test]
fn bulk_file_inputs_decode_or_fail_cleanly() {
    for (path, data) in inputs("bulk_file") {
        let Ok((reader, _)) = jsonfile::decode(Cursor::new(data)) else {
            continue;
        };
        let mut seen = 0usize;
        let _ = jsonfile::for_each_record("regression", reader, |_, bytes| {
            assert!(!bytes.is_empty(), "{}", path.display());
            seen += bytes.len();
            // The same bound as the fuzz target: a bomb is not this test's to inflate.
            if seen > 64 << 20 {
                return Err("budget".into());
            }
            Ok(())
        });
    }
}
