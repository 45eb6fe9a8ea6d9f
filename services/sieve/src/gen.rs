//! Deterministic data generators (`sieve ctl gen`): the same seed gives the same records on
//! every machine, so demos, tests and benchmarks can state exact expected answers.

use std::io::Write;

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

/// What a generated event is, so a test knows the expected fate of every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// First occurrence of its idempotency key.
    New,
    /// Same key and same bytes as an earlier event (a client retry).
    Retry,
    /// Same key as an earlier event with a different payload (an idempotency conflict).
    Conflict,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Idempotency key, also the Kafka key.
    pub key: String,
    pub payload: Vec<u8>,
    pub kind: EventKind,
}

#[derive(Debug, Clone, Copy)]
pub struct EventSpec {
    pub count: u64,
    /// Share of records that retry an earlier event (0.2 = 20 %).
    pub retry_rate: f64,
    /// Share of records that reuse an earlier key with another payload.
    pub conflict_rate: f64,
    pub users: u64,
    pub seed: u64,
}

impl Default for EventSpec {
    fn default() -> Self {
        EventSpec {
            count: 10_000,
            retry_rate: 0.2,
            conflict_rate: 0.01,
            users: 10_000,
            seed: 42,
        }
    }
}

/// Events with retries and conflicts of recent earlier events, streamed (constant memory).
pub fn events(spec: EventSpec) -> impl Iterator<Item = Event> {
    let mut rng = Pcg64Mcg::seed_from_u64(spec.seed);
    let mut next_id = 0u64;
    (0..spec.count).map(move |_| {
        let roll: f64 = rng.random();
        let (id, variant, kind) = if next_id > 0 && roll < spec.retry_rate {
            let back = rng.random_range(0..next_id.min(1000));
            (next_id - 1 - back, 0, EventKind::Retry)
        } else if next_id > 0 && roll < spec.retry_rate + spec.conflict_rate {
            let back = rng.random_range(0..next_id.min(1000));
            (
                next_id - 1 - back,
                1 + rng.random_range(0..1_000_000u64),
                EventKind::Conflict,
            )
        } else {
            next_id += 1;
            (next_id - 1, 0, EventKind::New)
        };
        event(id, variant, kind, spec.users)
    })
}

const EVENT_TYPES: [&str; 4] = ["purchase", "refund", "login", "signup"];
const PLANS: [&str; 3] = ["free", "pro", "team"];

fn event(id: u64, variant: u64, kind: EventKind, users: u64) -> Event {
    let key = format!("evt-{id:010}");
    // The payload depends only on (id, variant): a retry repeats the bytes exactly.
    let user = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) % users.max(1);
    let amount = (id * 7 + variant * 13) % 10_000;
    let payload = serde_json::json!({
        "event_id": key,
        "user_id": format!("u{user}"),
        "type": EVENT_TYPES[(id % 4) as usize],
        "amount_cents": amount,
        "revision": variant,
    })
    .to_string()
    .into_bytes();
    Event { key, payload, kind }
}

/// Legacy and current user exports, the seed's shape: `legacy` records of about 120 bytes,
/// a hot key `guest` on `guest_share` of them, and a current side holding every id whose
/// hash falls in `current_share` (plus `guest`). The answer is known without a join:
/// a legacy record is missing exactly when `!spec.is_current(id)`.
#[derive(Debug, Clone, Copy)]
pub struct UsersSpec {
    pub legacy: u64,
    /// Distinct ids the legacy side draws from.
    pub ids: u64,
    pub guest_share: f64,
    pub current_share: f64,
    pub seed: u64,
}

impl Default for UsersSpec {
    fn default() -> Self {
        UsersSpec {
            legacy: 100_000,
            ids: 80_000,
            guest_share: 0.05,
            current_share: 0.1,
            seed: 42,
        }
    }
}

pub const GUEST: &str = "guest";

fn mix(x: u64) -> u64 {
    // SplitMix64 finaliser: a fixed, documented bijection (stable across versions).
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn user_id(n: u64) -> String {
    format!("u{n:09}")
}

impl UsersSpec {
    /// Whether `id` is on the current side.
    pub fn is_current(&self, id: &str) -> bool {
        if id == GUEST {
            return true;
        }
        let n: u64 = id.trim_start_matches('u').parse().unwrap_or(u64::MAX);
        (mix(n ^ self.seed) % 1_000_000) < (self.current_share * 1_000_000.0) as u64
    }

    /// The legacy side: one JSON object per record, ids drawn with repeats, `guest` hot.
    pub fn legacy(&self) -> impl Iterator<Item = (String, Vec<u8>)> {
        let spec = *self;
        let mut rng = Pcg64Mcg::seed_from_u64(spec.seed);
        (0..spec.legacy).map(move |i| {
            let id = if rng.random::<f64>() < spec.guest_share {
                GUEST.to_string()
            } else {
                user_id(rng.random_range(0..spec.ids.max(1)))
            };
            let rec = serde_json::json!({
                "id": id,
                "email": format!("{id}@legacy.example"),
                "plan": PLANS[(i % 3) as usize],
                "created_at": format!("20{:02}-{:02}-{:02}", 10 + i % 14, 1 + i % 12, 1 + i % 28),
                "seq": i,
            });
            (id, rec.to_string().into_bytes())
        })
    }

    /// The current side: every current id once, `guest` included.
    pub fn current(&self) -> impl Iterator<Item = (String, Vec<u8>)> {
        let spec = *self;
        std::iter::once(GUEST.to_string())
            .chain((0..spec.ids).map(user_id))
            .filter(move |id| spec.is_current(id))
            .map(|id| {
                let rec = serde_json::json!({ "id": id, "status": "active" });
                (id, rec.to_string().into_bytes())
            })
    }
}

/// Follow events of `followers` users (`fan0`, `fan1`, …) following `author`, as
/// `graph.follows` records: key `<author>/<follower>`.
pub fn follows(author: &str, followers: u64) -> impl Iterator<Item = (String, Vec<u8>)> + '_ {
    (0..followers).map(move |i| {
        let follower = format!("fan{i}");
        let key = format!("{author}/{follower}");
        let rec = serde_json::json!({
            "key": key, "author": author, "follower": follower, "action": "follow",
        });
        (key, rec.to_string().into_bytes())
    })
}

const ZONES: [&str; 5] = [
    "Europe/Paris",
    "America/New_York",
    "Asia/Tokyo",
    "Australia/Sydney",
    "UTC",
];

/// Preferences of `users` users (`fan0` …, the followers of [`follows`]), as `users.prefs`
/// records with a `user_id` field: most active with a device token; about 10 % inactive
/// (last seen 60 days before `now`), 20 % with quiet hours 22:00–07:00 in one of five time
/// zones, 5 % muting the `promo` category, 5 % muting the author `celebrity`.
pub fn prefs(users: u64, now: &str, seed: u64) -> impl Iterator<Item = (String, Vec<u8>)> + '_ {
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    (0..users).map(move |i| {
        let user = format!("fan{i}");
        let roll: f64 = rng.random();
        let mut p = serde_json::json!({
            "user_id": user,
            "last_active": now,
            "device_tokens": [format!("tok-{i}")],
        });
        if roll < 0.10 {
            p["last_active"] = "2026-01-01T00:00:00Z".into();
        } else if roll < 0.30 {
            p["quiet_hours"] = serde_json::json!({
                "start": "22:00", "end": "07:00", "tz": ZONES[(i % 5) as usize],
            });
        } else if roll < 0.35 {
            p["muted_categories"] = serde_json::json!(["promo"]);
        } else if roll < 0.40 {
            p["muted_authors"] = serde_json::json!(["celebrity"]);
        }
        (user, p.to_string().into_bytes())
    })
}

/// `count` notification requests of one priority, as `notify.requests.p<priority>` records:
/// P0 2FA codes and P1 receipts to single users, P2 posts of `author` to its followers, P3
/// promotions to its followers under one campaign.
pub fn notifications<'a>(
    priority: u8,
    count: u64,
    author: &'a str,
    now: &'a str,
) -> impl Iterator<Item = (String, Vec<u8>)> + 'a {
    (0..count).map(move |i| {
        let id = format!("p{priority}-{i}");
        let (category, template, channels, audience) = match priority {
            0 => (
                "security",
                "2fa_code",
                vec!["push", "sms"],
                serde_json::json!([format!("fan{i}")]),
            ),
            1 => (
                "transactional",
                "receipt",
                vec!["email", "inapp"],
                serde_json::json!([format!("fan{i}")]),
            ),
            2 => (
                "social",
                "new_post",
                vec!["push", "inapp"],
                serde_json::json!({"followers_of": author}),
            ),
            _ => (
                "promo",
                "sale",
                vec!["push", "email"],
                serde_json::json!({"followers_of": author}),
            ),
        };
        let mut r = serde_json::json!({
            "notification_id": id, "priority": priority.min(3), "category": category,
            "template": template, "data": {"n": i}, "channels": channels, "created_at": now,
            "audience": audience,
        });
        if priority >= 2 {
            r["author_id"] = author.into();
        }
        if priority >= 3 {
            r["campaign_id"] = "spring-sale".into();
        }
        (id, r.to_string().into_bytes())
    })
}

/// NDJSON, or a JSON array with one record per line.
pub fn write_json_records(
    w: &mut dyn Write,
    records: impl Iterator<Item = Vec<u8>>,
    array: bool,
) -> std::io::Result<()> {
    if array {
        w.write_all(b"[\n")?;
    }
    for (i, r) in records.enumerate() {
        if array && i > 0 {
            w.write_all(b",\n")?;
        }
        w.write_all(&r)?;
        if !array {
            w.write_all(b"\n")?;
        }
    }
    if array {
        w.write_all(b"\n]\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn same_seed_same_events_and_kinds_are_truthful() {
        let spec = EventSpec {
            count: 20_000,
            ..Default::default()
        };
        let a: Vec<Event> = events(spec).collect();
        assert_eq!(a, events(spec).collect::<Vec<_>>());
        let mut first: HashMap<&str, &[u8]> = HashMap::new();
        let (mut retries, mut conflicts) = (0, 0);
        for e in &a {
            match e.kind {
                EventKind::New => assert!(first.insert(&e.key, &e.payload).is_none()),
                EventKind::Retry => {
                    retries += 1;
                    assert_eq!(first[e.key.as_str()], e.payload.as_slice());
                }
                EventKind::Conflict => {
                    conflicts += 1;
                    assert_ne!(first[e.key.as_str()], e.payload.as_slice());
                }
            }
        }
        assert!((3_600..4_400).contains(&retries), "retries {retries}");
        assert!((120..280).contains(&conflicts), "conflicts {conflicts}");
    }

    #[test]
    fn prefs_and_notifications_are_what_notify_reads() {
        let now = "2026-11-27T12:00:00Z";
        let prefs: Vec<_> = prefs(1_000, now, 7).collect();
        assert_eq!(prefs, super::prefs(1_000, now, 7).collect::<Vec<_>>());
        let mut quiet = 0;
        for (user, bytes) in &prefs {
            let p: sieve_notify::model::Prefs = serde_json::from_slice(bytes).unwrap();
            quiet += usize::from(p.quiet_hours.is_some());
            assert!(user.starts_with("fan"));
        }
        assert!((120..280).contains(&quiet), "quiet {quiet}");
        for priority in 0..4 {
            for (id, bytes) in notifications(priority, 5, "celebrity", now) {
                let r: sieve_notify::model::Request = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(
                    (r.notification.notification_id, r.notification.priority),
                    (id, priority)
                );
            }
        }
    }

    #[test]
    fn users_have_a_hot_guest_and_a_known_answer() {
        let spec = UsersSpec::default();
        let legacy: Vec<(String, Vec<u8>)> = spec.legacy().collect();
        let guests = legacy.iter().filter(|(id, _)| id == GUEST).count();
        assert!((4_000..6_000).contains(&guests), "guests {guests}");
        let current: std::collections::HashSet<String> = spec.current().map(|(id, _)| id).collect();
        assert!(current.contains(GUEST));
        assert!(
            (6_000..10_000).contains(&current.len()),
            "current {}",
            current.len()
        );
        for (id, _) in &legacy {
            assert_eq!(spec.is_current(id), current.contains(id));
        }
        let avg = legacy.iter().map(|(_, r)| r.len()).sum::<usize>() / legacy.len();
        assert!((90..140).contains(&avg), "record size {avg}");
    }
}
