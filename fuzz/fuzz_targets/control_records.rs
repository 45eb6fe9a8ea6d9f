//! Side-table records of notify: kill switches on `sieve.control`, preferences on
//! `users.prefs` and follows on `graph.follows`, with arbitrary keys, payloads and
//! tombstones. Input: flags byte, then key and payload cut at the first NUL.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdkafka::message::{OwnedMessage, Timestamp};
use sieve_notify::deliverer::{user_table_writes, CONTROL_PREFIX, PREFS_PREFIX};
use sieve_notify::planner::follow_writes;

const TOPICS: [&str; 3] = ["sieve.control", "users.prefs", "graph.follows"];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (key, payload) = match rest.iter().position(|b| *b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let topic = TOPICS[usize::from(flags % 3)];
    let rec = OwnedMessage::new(
        (flags & 4 == 0).then(|| payload.to_vec()),
        (flags & 8 == 0).then(|| key.to_vec()),
        topic.into(),
        Timestamp::NotAvailable,
        0,
        0,
        None,
    );
    let writes = user_table_writes(&rec, "users.prefs", "users.invalid_tokens");
    match rec_key(&rec) {
        None => assert!(writes.is_empty()),
        Some(k) => {
            // One write under the topic's prefix, the key kept whole, a tombstone a delete.
            let prefix = if topic == "users.prefs" {
                PREFS_PREFIX
            } else {
                CONTROL_PREFIX
            };
            assert_eq!(writes.len(), 1);
            assert_eq!(&writes[0].0[..prefix.len()], prefix.as_bytes());
            assert_eq!(&writes[0].0[prefix.len()..], k);
            assert_eq!(writes[0].1.is_none(), flags & 4 != 0);
        }
    }
    let partitions = u32::from(flags >> 4) + 1;
    for (k, _) in follow_writes(&rec, partitions) {
        assert!(!k.is_empty());
    }
});

fn rec_key(rec: &OwnedMessage) -> Option<&[u8]> {
    use rdkafka::message::Message;
    rec.key()
}
