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
    let full = serde_json::from_slice::<serde_json::Value>(doc);
    match jsonkey::extract(doc, pointer) {
        // A key is what the document holds there: a string's bytes or a number's text.
        Ok(key) => {
            let v = full.expect("extract parsed it");
            let at = v.pointer(pointer).expect("extract found it");
            match at {
                serde_json::Value::String(s) => assert_eq!(s.as_bytes(), &key[..]),
                serde_json::Value::Number(n) => assert_eq!(n.to_string().as_bytes(), &key[..]),
                other => panic!("key from a non-scalar {other:?}"),
            }
        }
        // Refused for the same reason a full parse and `Value::pointer` give.
        Err(e) => {
            let reason = match full {
                Err(_) => "bad_json",
                Ok(v) => match v.pointer(pointer) {
                    None | Some(serde_json::Value::Null) => "missing_key",
                    Some(other) => {
                        assert!(!other.is_string() && !other.is_number(), "a key was refused");
                        "key_not_scalar"
                    }
                },
            };
            assert_eq!(e.reason(), reason);
        }
    }
});
