//! The chaos workload, whose exact answer is known: events posted to ingest over HTTP (with
//! client repeats and conflicting repeats), right-side changes for the anti-join, and
//! notification requests (fan-outs and direct ones).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use crate::{unique, wait_for, Broker};

/// Users events are spread over; the anti-join joins on them.
pub const USERS: u32 = 1_000;
/// The API key the runner's ingest accepts.
pub const API_KEY: &str = "chaos-key";
/// Notification channels a request may name; the runner uses in-app (no per-user cap).
pub const CHANNELS: [&str; 4] = ["push", "email", "sms", "inapp"];

/// Every topic of one run, under a unique prefix.
pub struct Topics {
    pub raw: String,
    pub unique: String,
    pub dedup_dlq: String,
    pub ingest_dlq: String,
    pub right: String,
    pub missing: String,
    pub antijoin_dlq: String,
    /// Prefix of the notify topics (`<ns>.requests.p2`, `<ns>.out.inapp`, …).
    pub ns: String,
}

impl Topics {
    pub fn create(broker: &Broker) -> Result<Topics> {
        let ns = unique("chaos");
        let t = Topics {
            raw: format!("{ns}.events.raw"),
            unique: format!("{ns}.events.unique"),
            dedup_dlq: format!("{ns}.dlq.dedup"),
            ingest_dlq: format!("{ns}.dlq.ingest"),
            right: format!("{ns}.users.current"),
            missing: format!("{ns}.antijoin.out"),
            antijoin_dlq: format!("{ns}.dlq.antijoin"),
            ns,
        };
        for (name, partitions) in [
            (&t.raw, 4),
            (&t.unique, 4),
            (&t.right, 2),
            (&t.missing, 3),
            (&t.dedup_dlq, 1),
            (&t.ingest_dlq, 1),
            (&t.antijoin_dlq, 1),
        ] {
            broker.create_topic(name, partitions)?;
        }
        for p in 0..4 {
            broker.create_topic(&t.notify(&format!("requests.p{p}")), 2)?;
            broker.create_topic(&t.notify(&format!("tasks.p{p}")), 4)?;
        }
        for c in CHANNELS {
            broker.create_topic(&t.notify(&format!("out.{c}")), 2)?;
        }
        for name in [
            "status",
            "follows",
            "prefs",
            "control",
            "invalid-tokens",
            "dlq",
        ] {
            broker.create_topic(&t.notify(name), 2)?;
        }
        Ok(t)
    }

    /// A notify topic of this run.
    pub fn notify(&self, name: &str) -> String {
        format!("{}.{name}", self.ns)
    }

    /// The input topics of each consumer group role, for lag.
    pub fn inputs(&self, role: &str) -> Vec<String> {
        match role {
            "dedup" => vec![self.raw.clone()],
            "antijoin" => vec![self.unique.clone()],
            "planner" => (0..4)
                .map(|p| self.notify(&format!("requests.p{p}")))
                .collect(),
            "deliver" => (0..4)
                .map(|p| self.notify(&format!("tasks.p{p}")))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// An event as the workload posts it; `amount` differs between conflicting repeats.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Event {
    pub id: String,
    pub user: String,
    pub amount: u64,
}

impl Event {
    fn json(&self) -> String {
        format!(
            r#"{{"event_id":"{}","user_id":"{}","type":"purchase","amount_cents":{}}}"#,
            self.id, self.user, self.amount
        )
    }

    /// The event in a record's payload, if it is one.
    pub fn parse(payload: &[u8]) -> Option<Event> {
        let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
        Some(Event {
            id: v.get("event_id")?.as_str()?.to_string(),
            user: v.get("user_id")?.as_str()?.to_string(),
            amount: v.get("amount_cents")?.as_u64()?,
        })
    }
}

/// What ingest answered over the run.
#[derive(Debug, Default)]
pub struct Posted {
    /// Every event answered `accepted` in a 202.
    pub accepted: BTreeSet<Event>,
    /// Answers by HTTP status (0: no answer, e.g. ingest was killed).
    pub answers: BTreeMap<u16, u64>,
    /// Batches never answered 202 within the retry deadline.
    pub abandoned: u64,
    /// Answers other than 202, 429, 503 and no answer: each is a failure.
    pub unexpected: Vec<String>,
}

/// Posts batches of events to ingest from a thread until stopped, retrying every batch with
/// the same Idempotency-Key and bytes until it is answered 202.
pub struct EventDriver {
    handle: JoinHandle<Posted>,
}

impl EventDriver {
    pub fn start(url: String, rate: u32, seed: u64, stop: Arc<AtomicBool>) -> EventDriver {
        let handle = std::thread::spawn(move || drive(&url, rate, seed, &stop));
        EventDriver { handle }
    }

    pub fn finish(self) -> Result<Posted> {
        self.handle
            .join()
            .map_err(|_| anyhow!("the event driver panicked"))
    }
}

const TICK: Duration = Duration::from_millis(200);
/// How long one batch is retried before it is given up (not accepted, so not owed).
const BATCH_DEADLINE: Duration = Duration::from_secs(120);

fn drive(url: &str, rate: u32, seed: u64, stop: &AtomicBool) -> Posted {
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    let per_batch = (rate as u64 * TICK.as_millis() as u64 / 1000).max(1);
    let mut posted = Posted::default();
    let mut sent: Vec<Event> = Vec::new();
    let mut next_id = 0u64;
    let mut batch_no = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let tick = Instant::now();
        let batch: Vec<Event> = (0..per_batch)
            .map(|_| {
                let roll: f64 = rng.random();
                match sent.choose(&mut rng) {
                    // A client repeat: the same event, byte for byte.
                    Some(prev) if roll < 0.08 => prev.clone(),
                    // A conflicting repeat: same id, other content (dedup's DLQ).
                    Some(prev) if roll < 0.09 => Event {
                        amount: prev.amount + 1,
                        ..prev.clone()
                    },
                    _ => {
                        next_id += 1;
                        Event {
                            id: format!("e{next_id}"),
                            user: format!("u{}", rng.random_range(0..USERS)),
                            amount: rng.random_range(1..10_000),
                        }
                    }
                }
            })
            .collect();
        sent.extend(batch.iter().cloned());
        batch_no += 1;
        post_batch(
            url,
            &format!("batch-{seed}-{batch_no}"),
            &batch,
            &mut posted,
        );
        if let Some(rest) = TICK.checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    posted
}

fn post_batch(url: &str, idem: &str, batch: &[Event], posted: &mut Posted) {
    let body = format!(
        "[{}]",
        batch.iter().map(Event::json).collect::<Vec<_>>().join(",")
    );
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let deadline = Instant::now() + BATCH_DEADLINE;
    while Instant::now() < deadline {
        let res = agent
            .post(url)
            .set("Content-Type", "application/json")
            .set("Authorization", &format!("Bearer {API_KEY}"))
            .set("Idempotency-Key", idem)
            .send_string(&body);
        let (status, text) = match res {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
            Err(_) => (0, String::new()),
        };
        *posted.answers.entry(status).or_default() += 1;
        match status {
            202 => {
                record_accepted(&text, batch, posted);
                return;
            }
            // Not acknowledged (ingest down, broker down, shedding): retry the same bytes.
            0 | 429 | 503 => std::thread::sleep(Duration::from_millis(250)),
            _ => {
                posted.unexpected.push(format!("{status} {text}"));
                return;
            }
        }
    }
    posted.abandoned += 1;
}

fn record_accepted(text: &str, batch: &[Event], posted: &mut Posted) {
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let results = v["results"].as_array().cloned().unwrap_or_default();
    for r in results {
        let index = r["index"].as_u64().and_then(|i| batch.get(i as usize));
        match (r["status"].as_str(), index) {
            (Some("accepted"), Some(e)) => {
                posted.accepted.insert(e.clone());
            }
            _ => posted.unexpected.push(format!("202 with {r}")),
        }
    }
}

/// Produces with retries: right after a broker restart a first produce can fail.
fn produce_retrying(what: &str, mut f: impl FnMut() -> Result<usize>) -> Result<()> {
    let mut last = String::new();
    wait_for(what, Duration::from_secs(60), || match f() {
        Ok(_) => Some(()),
        Err(e) => {
            last = e.to_string();
            None
        }
    })
    .map_err(|e| e.context(last))
}

/// The anti-join's right side: a third of the users from the start, some added during the
/// run (retracting emitted keys), some deleted (bringing keys back).
pub struct RightPlan {
    initial: Vec<String>,
    /// (key, present after the change), in the order they are produced.
    changes: Vec<(String, bool)>,
    done: std::cell::Cell<usize>,
}

impl RightPlan {
    pub fn new(rng: &mut Pcg64Mcg) -> RightPlan {
        let user = |i: u32| format!("u{i}");
        let initial = (0..USERS).filter(|i| i % 3 == 0).map(user).collect();
        let mut changes: Vec<(String, bool)> = (0..USERS)
            .filter(|i| i % 3 == 1 && i % 5 == 0)
            .map(|i| (user(i), true))
            // Deleted keys (multiples of 21) are all initial ones, so order does not matter.
            .chain((0..USERS).filter(|i| i % 21 == 0).map(|i| (user(i), false)))
            .collect();
        changes.shuffle(rng);
        RightPlan {
            initial,
            changes,
            done: std::cell::Cell::new(0),
        }
    }

    pub fn initial(&self, broker: &Broker, t: &Topics) -> Result<()> {
        produce_retrying("the initial right side", || {
            broker.produce(&t.right, self.initial.iter().map(|k| (k, value(k))))
        })
    }

    /// Produces step `i`'s share of the changes (of `steps`).
    pub fn step(&self, broker: &Broker, t: &Topics, i: usize, steps: u32) -> Result<()> {
        let upto = self.changes.len() * (i + 1) / steps.max(1) as usize;
        self.produce_upto(broker, t, upto)
    }

    pub fn finish(&self, broker: &Broker, t: &Topics) -> Result<()> {
        self.produce_upto(broker, t, self.changes.len())
    }

    fn produce_upto(&self, broker: &Broker, t: &Topics, upto: usize) -> Result<()> {
        let from = self.done.get();
        if upto <= from {
            return Ok(());
        }
        let chunk: Vec<(String, Option<String>)> = self.changes[from..upto]
            .iter()
            .map(|(k, present)| (k.clone(), present.then(|| value(k))))
            .collect();
        produce_retrying("right-side changes", || {
            broker.produce_changes(&t.right, &chunk)
        })?;
        self.done.set(upto);
        Ok(())
    }

    /// The right side's keys once every change is applied.
    pub fn final_keys(&self) -> BTreeSet<String> {
        let mut keys: BTreeSet<String> = self.initial.iter().cloned().collect();
        for (k, present) in &self.changes {
            if *present {
                keys.insert(k.clone());
            } else {
                keys.remove(k);
            }
        }
        keys
    }
}

fn value(key: &str) -> String {
    format!(r#"{{"user_id":"{key}"}}"#)
}

/// Notification requests: fan-outs to the followers of three authors and direct ones, all
/// on the in-app channel (no per-user cap), so every recipient is owed exactly one record.
pub struct NotifyPlan {
    followers: u32,
    /// (notification id, user) owed one in-app delivery.
    expected: BTreeSet<(String, String)>,
    issued: u32,
}

const AUTHORS: u32 = 3;

impl NotifyPlan {
    pub fn new(followers: u32) -> NotifyPlan {
        NotifyPlan {
            followers,
            expected: BTreeSet::new(),
            issued: 0,
        }
    }

    fn follower(author: u32, i: u32) -> String {
        format!("a{author}-f{i}")
    }

    pub fn follows(&self, broker: &Broker, t: &Topics) -> Result<()> {
        let follows: Vec<(String, &str)> = (0..AUTHORS)
            .flat_map(|a| (0..self.followers).map(move |i| (a, i)))
            .map(|(a, i)| {
                (
                    format!("a{a}/{}", Self::follower(a, i)),
                    r#"{"action":"follow"}"#,
                )
            })
            .collect();
        produce_retrying("follows", || {
            broker.produce(&t.notify("follows"), follows.iter().map(|(k, v)| (k, v)))
        })
    }

    /// Issues the next request: fan-outs and direct ones alternate.
    pub fn request(&mut self, broker: &Broker, t: &Topics, rng: &mut Pcg64Mcg) -> Result<()> {
        let n = self.issued;
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let (id, priority, body) = if n.is_multiple_of(2) {
            let id = format!("fan-{n}");
            let author = rng.random_range(0..AUTHORS);
            for i in 0..self.followers {
                self.expected
                    .insert((id.clone(), Self::follower(author, i)));
            }
            let body = serde_json::json!({
                "notification_id": id, "priority": 2, "category": "social",
                "template": "new_post", "data": {"post": n}, "channels": ["inapp"],
                "created_at": now, "audience": {"followers_of": format!("a{author}")},
                "author_id": format!("a{author}")
            });
            (id, 2, body)
        } else {
            let id = format!("direct-{n}");
            let users: Vec<String> = (0..3).map(|j| format!("d{n}-{j}")).collect();
            for u in &users {
                self.expected.insert((id.clone(), u.clone()));
            }
            let body = serde_json::json!({
                "notification_id": id, "priority": 1, "category": "security",
                "template": "code", "channels": ["inapp"], "created_at": now,
                "audience": users
            });
            (id, 1, body)
        };
        let topic = t.notify(&format!("requests.p{priority}"));
        produce_retrying("a notification request", || {
            broker.produce(&topic, [(&id, body.to_string())])
        })?;
        self.issued += 1;
        Ok(())
    }

    /// Makes sure at least one fan-out and one direct request were issued.
    pub fn ensure_one(&mut self, broker: &Broker, t: &Topics, rng: &mut Pcg64Mcg) -> Result<()> {
        while self.issued < 2 {
            self.request(broker, t, rng)?;
        }
        Ok(())
    }

    pub fn expected(&self) -> BTreeSet<(String, String)> {
        self.expected.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_back_as_posted() {
        let e = Event {
            id: "e7".into(),
            user: "u3".into(),
            amount: 42,
        };
        assert_eq!(Event::parse(e.json().as_bytes()), Some(e));
        assert_eq!(Event::parse(br#"{"event_id":"e1"}"#), None);
    }

    #[test]
    fn the_right_side_ends_as_initial_plus_added_minus_deleted() {
        let keys = RightPlan::new(&mut Pcg64Mcg::seed_from_u64(1)).final_keys();
        // u3: initial; u10: added; u0 and u21: initial then deleted; u1: never.
        assert!(keys.contains("u3") && keys.contains("u10"));
        assert!(!keys.contains("u0") && !keys.contains("u21") && !keys.contains("u1"));
    }
}
