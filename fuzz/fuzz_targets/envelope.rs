//! Record envelope: the `sieve-id` header every output carries (read back after a crash to
//! skip outputs already produced) and header lookup over arbitrary headers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
use sieve_core::record::{header, OutputId, ID_HEADER};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        // A parsed id encodes back to an id that parses to itself.
        if let Some(id) = OutputId::parse(s) {
            assert_eq!(OutputId::parse(&id.encode()), Some(id));
        }
    }
    // Headers cut from the input at NUL bytes: name, value, name, value...
    let mut parts = data.split(|b| *b == 0);
    let mut headers = OwnedHeaders::new();
    while let (Some(k), v) = (parts.next(), parts.next()) {
        let key = String::from_utf8_lossy(k);
        headers = headers.insert(Header {
            key: &key,
            value: v,
        });
    }
    let msg = OwnedMessage::new(
        Some(data.to_vec()),
        None,
        "t".into(),
        Timestamp::NotAvailable,
        0,
        0,
        Some(headers),
    );
    let _ = OutputId::of(&msg);
    let _ = header(&msg, ID_HEADER);
});
