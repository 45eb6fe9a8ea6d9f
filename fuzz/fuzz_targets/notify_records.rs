//! notify's record decoding: requests (planner), tasks (deliverer), user preferences and
//! the delivery rules applied to them (quiet hours in arbitrary time zones). The first byte
//! picks the record kind and a clock.
#![no_main]

use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use rdkafka::message::{OwnedMessage, Timestamp};
use sieve_notify::model::{Channel, Prefs, TaskRecord};
use sieve_notify::planner::parse_request;
use sieve_notify::rules::{decide, quiet_until};

const CHANNELS: [Channel; 4] = [Channel::Push, Channel::Email, Channel::Sms, Channel::Inapp];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    // Any instant of a few decades around 2026, chosen by the input.
    let seed = payload
        .iter()
        .fold(0i64, |h, b| h.wrapping_mul(31).wrapping_add(i64::from(*b)));
    let now = Utc
        .timestamp_opt(1_700_000_000 + seed.rem_euclid(1_000_000_000), 0)
        .single()
        .expect("in range");
    let rec = OwnedMessage::new(
        (pick & 1 == 0).then(|| payload.to_vec()),
        None,
        "notify.requests.p1".into(),
        Timestamp::NotAvailable,
        0,
        0,
        None,
    );
    if let Ok(req) = parse_request(&rec) {
        assert!(req.notification.priority <= 3);
        assert!(!req.notification.channels.is_empty());
        for c in CHANNELS {
            let _ = decide(&req.notification, c, &Prefs::default(), now);
        }
    }
    if let Ok(TaskRecord::Task(task)) = serde_json::from_slice::<TaskRecord>(payload) {
        for c in CHANNELS {
            let _ = decide(&task.notification, c, &Prefs::default(), now);
        }
    }
    if let Ok(prefs) = serde_json::from_slice::<Prefs>(payload) {
        if let Some(q) = &prefs.quiet_hours {
            if let Some(end) = quiet_until(q, now) {
                assert!(end > now, "quiet hours end in the past: {end} <= {now}");
            }
        }
    }
});
