//! The notify deliverer in-process (`sieve_core::testing`): each rule of docs/notify.md
//! (kill switch, expiry and the delivery window, channels and mutes, quiet hours and
//! deferral, inactivity and device tokens, rate limits, dedup) on its allowed and its refused
//! side, with the users table fed as the engine feeds it, exact outputs and no broker.

// Test helpers outside `#[test]` functions unwrap too (clippy.toml allows it in tests only).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sieve_core::dlq;
use sieve_core::record::Output;
use sieve_core::testing::{
    dlq_detail, dlq_reason, header, json, key_str, temp_service, Input, OperatorHarness,
};
use sieve_notify::deliverer::Deliverer;
use sieve_notify::{DelivererArgs, DelivererFactory};
use tempfile::TempDir;

const TASKS_P2: &str = "notify.tasks.p2";
const STATUS: &str = "notify.status";
const DLQ: &str = "dlq.notify";
const PREFS: &str = "users.prefs";
const CONTROL: &str = "sieve.control";
const INVALID_TOKENS: &str = "users.invalid_tokens";
const NOW: &str = "2026-11-20T12:00:00Z";
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

fn ms(t: &str) -> i64 {
    DateTime::parse_from_rfc3339(t).unwrap().timestamp_millis()
}

fn iso(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

struct Setup {
    factory: DelivererFactory,
    p: OperatorHarness<Deliverer>,
    _state: TempDir,
}

fn open() -> Setup {
    let args = DelivererArgs {
        tasks: "notify.tasks".into(),
        out: "notify.out".into(),
        status: STATUS.into(),
        prefs: PREFS.into(),
        control: CONTROL.into(),
        invalid_tokens: INVALID_TOKENS.into(),
        dlq: DLQ.into(),
        push_per_hour: 2,
        sms_per_hour: 1,
        email_per_hour: 10,
        tasks_per_batch: 1,
        starvation_guard: Duration::from_secs(5),
        tick: Duration::from_secs(10),
        delivery_window: Duration::from_secs(7 * 24 * 3600),
    };
    let (state, service) = temp_service("deliverer-test").unwrap();
    let factory = DelivererFactory::open(args, &service).unwrap();
    let p = OperatorHarness::open(&factory, TASKS_P2, 0).unwrap();
    Setup {
        factory,
        p,
        _state: state,
    }
}

impl Setup {
    /// Records on the users table's topics (preferences, kill switches, invalid tokens).
    fn users(&mut self, inputs: impl IntoIterator<Item = Input>) {
        // The deliverer keeps nothing per partition about them: they are read when deciding.
        assert_eq!(self.p.side(&mut self.factory, inputs).unwrap(), vec![]);
    }

    /// Processes one task record at `at_ms`; returns (deliveries, summaries).
    fn task(&mut self, task: &Value, at_ms: i64) -> (Vec<Delivered>, Vec<Value>) {
        let input = Input::new(
            format!(
                "{}/{}",
                task["notification_id"].as_str().unwrap(),
                task["task_index"]
            ),
            task.to_string(),
        )
        .at(at_ms);
        split(self.p.process([input]).unwrap())
    }

    fn tick(&mut self, at_ms: i64) -> (Vec<Delivered>, Vec<Value>) {
        split(
            self.p
                .process([Input::keyless(r#"{"tick":true}"#).at(at_ms)])
                .unwrap(),
        )
    }
}

/// One delivery record: (topic, key, payload).
type Delivered = (String, String, Value);

/// Deliveries and status summaries, in emission order; anything else fails the test.
fn split(out: Vec<Output>) -> (Vec<Delivered>, Vec<Value>) {
    let (mut sent, mut status) = (Vec::new(), Vec::new());
    for o in out {
        if o.topic == STATUS {
            status.push(json(&o));
        } else {
            assert!(
                o.topic.starts_with("notify.out."),
                "unexpected output {o:?}"
            );
            sent.push((o.topic.clone(), key_str(&o).to_string(), json(&o)));
        }
    }
    (sent, status)
}

/// A P`priority` task of notification `id` to `recipients` on `channels`, created a minute
/// before NOW.
fn task(id: &str, priority: u8, channels: &[&str], recipients: &[&str]) -> Value {
    json!({
        "notification_id": id,
        "priority": priority,
        "category": "social",
        "template": "new_post",
        "data": {"post": 7},
        "channels": channels,
        "created_at": iso(ms(NOW) - 60_000),
        "task_index": 0,
        "recipients": recipients,
    })
}

/// The delivery record of `task` to `user` on `channel`.
fn delivery(task: &Value, user: &str, channel: &str, tokens: &[&str]) -> Delivered {
    let mut d = json!({
        "notification_id": task["notification_id"],
        "user_id": user,
        "channel": channel,
        "priority": task["priority"],
        "category": task["category"],
        "template": task["template"],
        "data": task["data"],
    });
    if !tokens.is_empty() {
        d["device_tokens"] = json!(tokens);
    }
    (format!("notify.out.{channel}"), user.to_string(), d)
}

/// The per-task summary on `notify.status`.
fn summary(task: &Value, counts: Value) -> Value {
    json!({
        "notification_id": task["notification_id"],
        "task_index": task["task_index"],
        "counts": counts,
    })
}

/// Preferences of a user active a day ago with one device token, plus `extra` fields.
fn prefs(user: &str, extra: Value) -> Input {
    let mut p = json!({
        "last_active": iso(ms(NOW) - DAY),
        "device_tokens": [format!("tok-{user}")],
    });
    for (k, v) in extra.as_object().unwrap() {
        p[k] = v.clone();
    }
    Input::new(user, p.to_string()).on(PREFS)
}

#[test]
fn one_record_per_recipient_and_channel_then_a_summary_and_a_redelivered_task_sends_nothing() {
    let mut s = open();
    s.users([prefs("u1", json!({}))]);
    let t = task("n1", 2, &["push", "email", "inapp"], &["u1", "u2"]);
    let (sent, status) = s.task(&t, ms(NOW));
    assert_eq!(
        sent,
        vec![
            delivery(&t, "u1", "push", &["tok-u1"]),
            delivery(&t, "u1", "email", &[]),
            delivery(&t, "u1", "inapp", &[]),
            // u2 has no preferences: never seen active, so no push.
            delivery(&t, "u2", "email", &[]),
            delivery(&t, "u2", "inapp", &[]),
        ]
    );
    assert_eq!(
        status,
        vec![summary(
            &t,
            json!({"sent": 5, "suppressed": 1, "suppressed:inactive_user": 1})
        )]
    );
    // Redelivered (a retried task, a re-planned step): decided already, nothing is sent.
    let (sent, status) = s.task(&t, ms(NOW) + 1_000);
    assert_eq!(sent, vec![]);
    assert_eq!(status, vec![summary(&t, json!({"duplicate": 6}))]);
    // Also after a restart: the no-resend keys are in the store.
    s.p.reopen_after_crash(&s.factory).unwrap();
    let (sent, _) = s.task(&t, ms(NOW) + 2_000);
    assert_eq!(sent, vec![]);
}

#[test]
fn the_kill_switch_cancels_by_notification_or_campaign_until_a_tombstone_lifts_it() {
    let mut s = open();
    s.users([
        Input::new("notification:n1", "{}").on(CONTROL),
        Input::new("campaign:c1", "{}").on(CONTROL),
    ]);
    let cancelled = json!({"cancelled": 1, "cancelled:kill_switch": 1});
    let t1 = task("n1", 0, &["inapp"], &["u1"]);
    assert_eq!(
        s.task(&t1, ms(NOW)),
        (vec![], vec![summary(&t1, cancelled.clone())])
    );
    let mut t2 = task("n2", 2, &["inapp"], &["u1"]);
    t2["campaign_id"] = json!("c1");
    assert_eq!(
        s.task(&t2, ms(NOW)),
        (vec![], vec![summary(&t2, cancelled)])
    );
    // Another campaign, and no campaign: not cancelled.
    let mut t3 = task("n3", 2, &["inapp"], &["u1"]);
    t3["campaign_id"] = json!("c2");
    assert_eq!(
        s.task(&t3, ms(NOW)).0,
        vec![delivery(&t3, "u1", "inapp", &[])]
    );
    // Lifted: recipients not yet decided get it; a cancelled decision stays.
    s.users([Input::tombstone("campaign:c1").on(CONTROL)]);
    let mut t2b = t2.clone();
    t2b["recipients"] = json!(["u1", "u2"]);
    let (sent, status) = s.task(&t2b, ms(NOW));
    assert_eq!(sent, vec![delivery(&t2b, "u2", "inapp", &[])]);
    assert_eq!(
        status,
        vec![summary(&t2b, json!({"duplicate": 1, "sent": 1}))]
    );
}

#[test]
fn quiet_hours_suppress_p1_p2_interruptions_defer_p3_and_p0_bypasses_them() {
    let mut s = open();
    // 23:30 UTC is 00:30 in Paris: inside 22:00–07:00, which ends at 06:00 UTC.
    let night = ms("2026-11-20T23:30:00Z");
    let quiet = json!({
        "quiet_hours": {"start": "22:00", "end": "07:00", "tz": "Europe/Paris"},
        "last_active": iso(night - DAY),
    });
    s.users([prefs("u1", quiet.clone()), prefs("u2", quiet)]);
    let with_created = |mut t: Value| {
        t["created_at"] = json!(iso(night - 60_000));
        t
    };
    let t = with_created(task("n1", 2, &["push", "sms", "email", "inapp"], &["u1"]));
    let (sent, status) = s.task(&t, night);
    assert_eq!(
        sent,
        vec![
            delivery(&t, "u1", "email", &[]),
            delivery(&t, "u1", "inapp", &[])
        ]
    );
    assert_eq!(
        status,
        vec![summary(
            &t,
            json!({"sent": 2, "suppressed": 2, "suppressed:quiet_hours": 2})
        )]
    );
    let t0 = with_created(task("n0", 0, &["push"], &["u1"]));
    assert_eq!(
        s.task(&t0, night).0,
        vec![delivery(&t0, "u1", "push", &["tok-u1"])]
    );

    // P3 waits for the end of the quiet period, in state.
    let t3 = with_created(task("n3", 3, &["push"], &["u1"]));
    let t4 = with_created(task("n4", 3, &["push"], &["u2"]));
    let deferred = json!({"deferred": 1, "deferred:quiet_hours": 1});
    assert_eq!(
        s.task(&t3, night),
        (vec![], vec![summary(&t3, deferred.clone())])
    );
    assert_eq!(s.task(&t4, night), (vec![], vec![summary(&t4, deferred)]));
    // It survives a restart; a kill switch set meanwhile wins at release.
    s.p.reopen(&s.factory).unwrap();
    s.users([Input::new("notification:n4", "{}").on(CONTROL)]);
    let end = ms("2026-11-21T06:00:00Z");
    assert_eq!(s.tick(end - 60_000), (vec![], vec![]));
    let released = |t: &Value, counts: Value| {
        let mut v = summary(t, counts);
        v.as_object_mut().unwrap().remove("task_index");
        v
    };
    assert_eq!(
        s.tick(end),
        (
            vec![delivery(&t3, "u1", "push", &["tok-u1"])],
            vec![
                released(&t3, json!({"released": 1, "sent": 1})),
                released(
                    &t4,
                    json!({"released": 1, "cancelled": 1, "cancelled:kill_switch": 1})
                ),
            ]
        )
    );
    // Released once.
    assert_eq!(s.tick(end + 60_000), (vec![], vec![]));
}

#[test]
fn mutes_and_channel_choices_with_p0_bypassing_category_mutes_only() {
    let mut s = open();
    s.users([prefs(
        "u1",
        json!({
            "channels": ["push", "inapp"],
            "muted_categories": ["promo"],
            "muted_authors": ["celeb"],
        }),
    )]);
    let mut promo = task("n1", 2, &["push"], &["u1"]);
    promo["category"] = json!("promo");
    assert_eq!(
        s.task(&promo, ms(NOW)),
        (
            vec![],
            vec![summary(
                &promo,
                json!({"suppressed": 1, "suppressed:category_muted": 1})
            )]
        )
    );
    let mut security = promo.clone();
    security["notification_id"] = json!("n2");
    security["priority"] = json!(0);
    assert_eq!(
        s.task(&security, ms(NOW)).0,
        vec![delivery(&security, "u1", "push", &["tok-u1"])]
    );
    // A muted author: no push, an in-app badge; email is not among the user's channels,
    // which binds P0 too.
    let mut social = task("n3", 2, &["push", "inapp", "email"], &["u1"]);
    social["author_id"] = json!("celeb");
    let mut badge = delivery(&social, "u1", "inapp", &[]);
    badge.2["badge_only"] = json!(true);
    assert_eq!(
        s.task(&social, ms(NOW)),
        (
            vec![badge],
            vec![summary(
                &social,
                json!({"sent": 1, "suppressed": 2, "suppressed:author_muted": 1,
                       "suppressed:channel_disabled": 1})
            )]
        )
    );
    let mut p0_email = task("n4", 0, &["email"], &["u1"]);
    p0_email["author_id"] = json!("other");
    assert_eq!(
        s.task(&p0_email, ms(NOW)).1,
        vec![summary(
            &p0_email,
            json!({"suppressed": 1, "suppressed:channel_disabled": 1})
        )]
    );
}

#[test]
fn push_needs_activity_in_the_last_30_days_and_a_valid_device_token() {
    let mut s = open();
    s.users([
        prefs("old", json!({"last_active": iso(ms(NOW) - 31 * DAY)})),
        prefs("recent", json!({"last_active": iso(ms(NOW) - 29 * DAY)})),
        prefs("two", json!({"device_tokens": ["a", "b"]})),
        prefs("dead", json!({"device_tokens": ["a"]})),
        Input::new("two/a", "{}").on(INVALID_TOKENS),
        Input::new("dead/a", "{}").on(INVALID_TOKENS),
    ]);
    let t = task(
        "n1",
        2,
        &["push", "inapp"],
        &["old", "recent", "two", "dead"],
    );
    let (sent, status) = s.task(&t, ms(NOW));
    assert_eq!(
        sent,
        vec![
            delivery(&t, "old", "inapp", &[]),
            delivery(&t, "recent", "push", &["tok-recent"]),
            delivery(&t, "recent", "inapp", &[]),
            delivery(&t, "two", "push", &["b"]),
            delivery(&t, "two", "inapp", &[]),
            delivery(&t, "dead", "inapp", &[]),
        ]
    );
    assert_eq!(
        status,
        vec![summary(
            &t,
            json!({"sent": 6, "suppressed": 2, "suppressed:inactive_user": 1,
                   "suppressed:no_device_token": 1})
        )]
    );
    // P0 reaches an inactive user's device; a lifted invalidation gives the token back.
    s.users([Input::tombstone("dead/a").on(INVALID_TOKENS)]);
    let t0 = task("n0", 0, &["push"], &["old", "dead"]);
    assert_eq!(
        s.task(&t0, ms(NOW)).0,
        vec![
            delivery(&t0, "old", "push", &["tok-old"]),
            delivery(&t0, "dead", "push", &["a"]),
        ]
    );
}

#[test]
fn rate_limits_per_user_and_channel_refill_over_the_hour_and_spare_p0_and_in_app() {
    let mut s = open();
    s.users([prefs("u1", json!({})), prefs("u2", json!({}))]);
    let limited = json!({"suppressed": 1, "suppressed:rate_limited": 1});
    let mut go = |id: &str, priority: u8, channel: &str, user: &str, at: i64| {
        let t = task(id, priority, &[channel], &[user]);
        let (sent, status) = s.task(&t, at);
        assert_eq!(status.len(), 1);
        match sent.as_slice() {
            [d] => {
                assert_eq!(d, &delivery(&t, user, channel, &tokens(channel, user)));
                true
            }
            [] => {
                assert_eq!(status[0], summary(&t, limited.clone()));
                false
            }
            _ => panic!("one delivery at most: {sent:?}"),
        }
    };
    let t = ms(NOW);
    // Push: 2 per hour for u1, whoever else is sent to.
    assert!(go("n1", 2, "push", "u1", t));
    assert!(go("n2", 1, "push", "u1", t));
    assert!(!go("n3", 2, "push", "u1", t));
    assert!(go("n3", 2, "push", "u2", t));
    // P0 is not limited, and takes no token.
    assert!(go("n4", 0, "push", "u1", t));
    // In-app is not limited.
    for i in 0..5 {
        assert!(go(&format!("i{i}"), 2, "inapp", "u1", t));
    }
    // SMS: 1 per hour, its own bucket.
    assert!(go("s1", 2, "sms", "u1", t));
    assert!(!go("s2", 2, "sms", "u1", t));
    assert!(!go("s3", 2, "sms", "u1", t + 59 * 60_000));
    // One push token comes back every 30 minutes.
    assert!(go("n6", 2, "push", "u1", t + 30 * 60_000));
    assert!(!go("n7", 2, "push", "u1", t + 31 * 60_000));
}

fn tokens(channel: &str, user: &str) -> Vec<&'static str> {
    match (channel, user) {
        ("push", "u1") => vec!["tok-u1"],
        ("push", "u2") => vec!["tok-u2"],
        _ => vec![],
    }
}

#[test]
fn expired_notifications_and_the_delivery_window() {
    let mut s = open();
    s.users([prefs("u1", json!({}))]);
    let now = ms(NOW);
    let mut t = task("n1", 2, &["inapp"], &["u1"]);
    t["expires_at"] = json!(iso(now));
    assert_eq!(
        s.task(&t, now),
        (vec![], vec![summary(&t, json!({"expired": 1}))])
    );
    t["notification_id"] = json!("n2");
    t["expires_at"] = json!(iso(now + 1_000));
    assert_eq!(s.task(&t, now).0, vec![delivery(&t, "u1", "inapp", &[])]);

    // Created more than the window (7 days) before the partition's clock.
    let window = json!({"expired": 1, "expired:delivery_window": 1});
    let mut old = task("n3", 2, &["inapp"], &["u1"]);
    old["created_at"] = json!(iso(now - 7 * DAY - 1));
    assert_eq!(
        s.task(&old, now),
        (vec![], vec![summary(&old, window.clone())])
    );
    let mut inside = task("n4", 2, &["inapp"], &["u1"]);
    inside["created_at"] = json!(iso(now - 6 * DAY));
    assert_eq!(
        s.task(&inside, now).0,
        vec![delivery(&inside, "u1", "inapp", &[])]
    );
    // The clock is the highest task time seen, not this record's own.
    let mut late = task("n5", 2, &["inapp"], &["u1"]);
    late["created_at"] = json!(iso(now - 8 * DAY));
    assert_eq!(
        s.task(&late, now - 8 * DAY + 1_000),
        (vec![], vec![summary(&late, window.clone())])
    );
    // Two days later (a tick moves the clock) n4's no-resend key is gone with its bucket, and
    // a redelivery of n4 is expired rather than sent again.
    let buckets = s.p.store().buckets().len();
    assert_eq!(s.tick(now + 2 * DAY), (vec![], vec![]));
    assert!(s.p.store().buckets().len() < buckets);
    assert_eq!(
        s.task(&inside, now + 2 * DAY),
        (vec![], vec![summary(&inside, window)])
    );
}

#[test]
fn bad_task_records_go_to_the_dlq_with_their_reason() {
    let mut s = open();
    let out =
        s.p.process([
            Input::new("t", "not json").at(ms(NOW)),
            Input::new("t", r#"{"notification_id":"n1"}"#).at(ms(NOW)),
            Input::tombstone("t").at(ms(NOW)),
        ])
        .unwrap();
    let got: Vec<_> = out
        .iter()
        .map(|o| (o.topic.as_str(), dlq_reason(o)))
        .collect();
    assert_eq!(
        got,
        vec![
            (DLQ, Some("bad_task")),
            (DLQ, Some("bad_task")),
            (DLQ, Some("no_payload")),
        ]
    );
    assert_eq!(dlq_detail(&out[2]), Some("task has no payload"));
    assert_eq!(header(&out[0], dlq::STAGE), Some("notify-deliverer"));
    assert_eq!(header(&out[1], dlq::SOURCE_OFFSET), Some("1"));
    assert_eq!(out[0].payload.as_deref(), Some(&b"not json"[..]));
}
