//! JSON pointer key extraction: the first line is the pointer, the rest the document.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sieve_formats::jsonkey;

fuzz_target!(|data: &[u8]| {
    let (pointer, doc) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"/id"[..], data),
    };
    let Ok(pointer) = std::str::from_utf8(pointer) else {
        return;
    };
    match jsonkey::extract(doc, pointer) {
        // A key is what the document holds there: a string's bytes or a number's text.
        Ok(key) => {
            let v: serde_json::Value = serde_json::from_slice(doc).expect("extract parsed it");
            let at = v.pointer(pointer).expect("extract found it");
            match at {
                serde_json::Value::String(s) => assert_eq!(s.as_bytes(), &key[..]),
                serde_json::Value::Number(n) => assert_eq!(n.to_string().as_bytes(), &key[..]),
                other => panic!("key from a non-scalar {other:?}"),
            }
        }
        Err(e) => assert!(!e.reason().is_empty()),
    }
});
