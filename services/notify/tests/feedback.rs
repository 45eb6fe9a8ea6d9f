//! The notify feedback processor in-process (`sieve_core::testing`): gateway reports moving a
//! delivery forward (`delivered → opened → clicked`, or `failed`) and counting each stage once,
//! redelivered reports (also after a reopen and a crash) counting and emitting nothing,
//! failures dead-lettered once, invalid tokens written once, and malformed reports
//! dead-lettered, with exact outputs and no broker (docs/notify.md, Feedback).

// Test helpers outside `#[test]` functions unwrap too (clippy.toml allows it in tests only).
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use sieve_core::dlq;
use sieve_core::record::Output;
use sieve_core::testing::{dlq_detail, dlq_reason, header, json, key_str, Input, OperatorHarness};
use sieve_notify::feedback::Feedback;
use sieve_notify::{FeedbackArgs, FeedbackFactory};

const FEEDBACK: &str = "notify.feedback";
const STATUS: &str = "notify.status";
const INVALID_TOKENS: &str = "users.invalid_tokens";
const DLQ: &str = "dlq.notify";
const AT: &str = "2026-11-27T10:00:00Z";

fn factory() -> FeedbackFactory {
    FeedbackFactory::new(FeedbackArgs {
        feedback: FEEDBACK.into(),
        invalid_tokens: INVALID_TOKENS.into(),
        status: STATUS.into(),
        dlq: DLQ.into(),
    })
}

/// The counts `GET /v1/notifications/{id}` answers (`null`: unknown notification).
fn served(f: &FeedbackFactory, id: &str) -> Value {
    serde_json::to_value(f.board().get(id)).unwrap()
}

struct Setup {
    factory: FeedbackFactory,
    p: OperatorHarness<Feedback>,
}

fn open() -> Setup {
    let factory = factory();
    let p = OperatorHarness::open(&factory, FEEDBACK, 0).unwrap();
    Setup { factory, p }
}

impl Setup {
    /// Processes `reports` as one batch; returns what was emitted as (topic, key, payload).
    fn reports<'r>(&mut self, reports: impl IntoIterator<Item = &'r Value>) -> Vec<Emitted> {
        let out = self.p.process(reports.into_iter().map(input)).unwrap();
        emitted(&out)
    }
}

/// One output: (topic, key, payload as JSON).
type Emitted = (String, String, Value);

fn emitted(out: &[Output]) -> Vec<Emitted> {
    out.iter()
        .map(|o| (o.topic.clone(), key_str(o).to_string(), json(o)))
        .collect()
}

/// A gateway report, plus `extra` fields (`reason`, `token`, a provider's own).
fn report(n: &str, user: &str, channel: &str, status: &str, extra: Value) -> Value {
    let mut r = json!({
        "notification_id": n,
        "user_id": user,
        "channel": channel,
        "status": status,
        "at": AT,
    });
    for (k, v) in extra.as_object().unwrap() {
        r[k] = v.clone();
    }
    r
}

/// A report as a gateway writes it: keyed by its user id.
fn input(r: &Value) -> Input {
    Input::new(r["user_id"].as_str().unwrap(), r.to_string())
}

/// The event on `notify.status` for a report that changed counts by `counts`.
fn status(r: &Value, counts: Value) -> Emitted {
    let n = r["notification_id"].as_str().unwrap();
    (
        STATUS.into(),
        n.into(),
        json!({
            "notification_id": n,
            "user_id": r["user_id"],
            "channel": r["channel"],
            "status": r["status"],
            "counts": counts,
        }),
    )
}

/// The record on `users.invalid_tokens` for an `invalid_token` report.
fn invalidation(r: &Value) -> Emitted {
    let (user, token) = (r["user_id"].as_str().unwrap(), r["token"].as_str().unwrap());
    (
        INVALID_TOKENS.into(),
        format!("{user}/{token}"),
        json!({
            "user_id": user,
            "token": token,
            "notification_id": r["notification_id"],
            "at": AT,
        }),
    )
}

/// The dead letter of a report: the report itself, same key, on the DLQ.
fn dead_letter(r: &Value) -> Emitted {
    (DLQ.into(), r["user_id"].as_str().unwrap().into(), r.clone())
}

#[test]
fn each_stage_counts_once_as_a_delivery_moves_forward() {
    let mut s = open();
    let delivered = report(
        "n1",
        "u1",
        "push",
        "delivered",
        json!({"provider_id": "x1"}),
    );
    let opened = report("n1", "u1", "push", "opened", json!({}));
    let clicked = report("n1", "u1", "push", "clicked", json!({}));
    assert_eq!(
        s.reports([&delivered]),
        vec![status(&delivered, json!({"delivered": 1}))]
    );
    assert_eq!(served(&s.factory, "n1"), json!({"delivered": 1}));
    assert_eq!(
        s.reports([&opened]),
        vec![status(&opened, json!({"opened": 1}))]
    );
    assert_eq!(
        s.reports([&clicked]),
        vec![status(&clicked, json!({"clicked": 1}))]
    );
    assert_eq!(
        served(&s.factory, "n1"),
        json!({"delivered": 1, "opened": 1, "clicked": 1})
    );
    assert_eq!(served(&s.factory, "n2"), Value::Null);
}

#[test]
fn a_report_that_skips_stages_counts_the_stages_it_implies() {
    let mut s = open();
    let clicked = report("n1", "u1", "email", "clicked", json!({}));
    assert_eq!(
        s.reports([&clicked]),
        vec![status(
            &clicked,
            json!({"delivered": 1, "opened": 1, "clicked": 1})
        )]
    );
    let opened = report("n1", "u2", "email", "opened", json!({}));
    assert_eq!(
        s.reports([&opened]),
        vec![status(&opened, json!({"delivered": 1, "opened": 1}))]
    );
    // The reports it skipped, arriving late, count nothing.
    assert_eq!(
        s.reports(&[
            report("n1", "u1", "email", "delivered", json!({})),
            report("n1", "u1", "email", "opened", json!({})),
            report("n1", "u2", "email", "delivered", json!({})),
        ]),
        vec![]
    );
    assert_eq!(
        served(&s.factory, "n1"),
        json!({"delivered": 2, "opened": 2, "clicked": 1})
    );
}

#[test]
fn a_duplicate_or_late_report_counts_nothing_and_emits_nothing() {
    let mut s = open();
    let delivered = report("n1", "u1", "sms", "delivered", json!({}));
    let opened = report("n1", "u1", "sms", "opened", json!({}));
    // The same report twice in one batch: the second sees the first's write.
    assert_eq!(
        s.reports([&delivered, &delivered, &opened, &delivered]),
        vec![
            status(&delivered, json!({"delivered": 1})),
            status(&opened, json!({"opened": 1})),
        ]
    );
    assert_eq!(s.reports([&delivered, &opened, &delivered]), vec![]);
    assert_eq!(
        served(&s.factory, "n1"),
        json!({"delivered": 1, "opened": 1})
    );
}

#[test]
fn a_delivery_is_one_notification_user_and_channel() {
    let mut s = open();
    let reports = [
        report("n1", "u1", "push", "delivered", json!({})),
        report("n1", "u1", "email", "delivered", json!({})),
        report("n1", "u1", "inapp", "opened", json!({})),
        report("n1", "u2", "push", "delivered", json!({})),
        report("n2", "u1", "push", "delivered", json!({})),
    ];
    assert_eq!(
        s.reports(&reports),
        vec![
            status(&reports[0], json!({"delivered": 1})),
            status(&reports[1], json!({"delivered": 1})),
            status(&reports[2], json!({"delivered": 1, "opened": 1})),
            status(&reports[3], json!({"delivered": 1})),
            status(&reports[4], json!({"delivered": 1})),
        ]
    );
    assert_eq!(
        served(&s.factory, "n1"),
        json!({"delivered": 4, "opened": 1})
    );
    assert_eq!(served(&s.factory, "n2"), json!({"delivered": 1}));
}

#[test]
fn a_failed_report_counts_its_reason_and_is_dead_lettered_once() {
    let mut s = open();
    let failed = report(
        "n1",
        "u1",
        "push",
        "failed",
        json!({"reason": "unreachable"}),
    );
    let out = s.p.process([input(&failed)]).unwrap();
    assert_eq!(
        emitted(&out),
        vec![
            dead_letter(&failed),
            status(&failed, json!({"failed": 1, "failed:unreachable": 1})),
        ]
    );
    let dl = &out[0];
    assert_eq!(header(dl, dlq::STAGE), Some("notify-feedback"));
    assert_eq!(dlq_reason(dl), Some("gateway_failed"));
    assert_eq!(
        dlq_detail(dl),
        Some("the push gateway gave up on u1 after its retries: unreachable")
    );
    assert!(dlq_detail(dl).unwrap().ends_with(": unreachable"));
    assert_eq!(header(dl, dlq::SOURCE_TOPIC), Some(FEEDBACK));
    assert_eq!(header(dl, dlq::SOURCE_PARTITION), Some("0"));
    assert_eq!(header(dl, dlq::SOURCE_OFFSET), Some("0"));
    assert_eq!(dl.payload.as_deref(), Some(failed.to_string().as_bytes()));

    // Failed is final: the same failure again, another reason, or a late delivery change
    // nothing and dead-letter nothing.
    assert_eq!(
        s.reports(&[
            failed.clone(),
            report(
                "n1",
                "u1",
                "push",
                "failed",
                json!({"reason": "quota_exceeded"})
            ),
            report("n1", "u1", "push", "delivered", json!({})),
            report("n1", "u1", "push", "clicked", json!({})),
        ]),
        vec![]
    );
    assert_eq!(
        served(&s.factory, "n1"),
        json!({"failed": 1, "failed:unreachable": 1})
    );
}

#[test]
fn a_failure_after_a_delivery_is_stale() {
    let mut s = open();
    let delivered = report("n1", "u1", "email", "delivered", json!({}));
    let failed = report("n1", "u1", "email", "failed", json!({"reason": "bounced"}));
    assert_eq!(
        s.reports([&delivered, &failed]),
        vec![status(&delivered, json!({"delivered": 1}))]
    );
    // Another user's failure on the same notification is its own delivery.
    let other = report("n1", "u2", "email", "failed", json!({"reason": "bounced"}));
    assert_eq!(
        s.reports([&other]),
        vec![
            dead_letter(&other),
            status(&other, json!({"failed": 1, "failed:bounced": 1})),
        ]
    );
    assert_eq!(
        served(&s.factory, "n1"),
        json!({"delivered": 1, "failed": 1, "failed:bounced": 1})
    );
}

#[test]
fn an_invalid_token_is_written_once_per_notification_user_and_token() {
    let mut s = open();
    let tok_a = report(
        "n1",
        "u1",
        "push",
        "invalid_token",
        json!({"token": "tokA"}),
    );
    assert_eq!(
        s.reports([&tok_a]),
        vec![
            invalidation(&tok_a),
            status(&tok_a, json!({"invalid_token": 1})),
        ]
    );
    let tok_b = report(
        "n1",
        "u1",
        "push",
        "invalid_token",
        json!({"token": "tokB"}),
    );
    let next = report(
        "n2",
        "u1",
        "push",
        "invalid_token",
        json!({"token": "tokA"}),
    );
    let other_user = report(
        "n1",
        "u2",
        "push",
        "invalid_token",
        json!({"token": "tokA"}),
    );
    assert_eq!(
        s.reports([&tok_a, &tok_b, &next, &other_user, &tok_b]),
        vec![
            invalidation(&tok_b),
            status(&tok_b, json!({"invalid_token": 1})),
            invalidation(&next),
            status(&next, json!({"invalid_token": 1})),
            invalidation(&other_user),
            status(&other_user, json!({"invalid_token": 1})),
        ]
    );
    // An invalid token says nothing about how far the delivery got: a push to two tokens,
    // one of them dead, is delivered too.
    let delivered = report("n1", "u1", "push", "delivered", json!({}));
    assert_eq!(
        s.reports([&delivered]),
        vec![status(&delivered, json!({"delivered": 1}))]
    );
    assert_eq!(
        served(&s.factory, "n1"),
        json!({"delivered": 1, "invalid_token": 3})
    );
    assert_eq!(served(&s.factory, "n2"), json!({"invalid_token": 1}));
}

#[test]
fn redelivered_reports_count_nothing_after_a_reopen_and_after_a_crash() {
    let mut s = open();
    let batch = [
        report("n1", "u1", "push", "delivered", json!({})),
        report("n1", "u1", "push", "opened", json!({})),
        report(
            "n1",
            "u2",
            "sms",
            "failed",
            json!({"reason": "unreachable"}),
        ),
        report("n1", "u3", "push", "invalid_token", json!({"token": "t3"})),
    ];
    let counts = json!({
        "delivered": 1, "opened": 1, "failed": 1, "failed:unreachable": 1, "invalid_token": 1
    });
    assert_eq!(
        s.reports(&batch),
        vec![
            status(&batch[0], json!({"delivered": 1})),
            status(&batch[1], json!({"opened": 1})),
            dead_letter(&batch[2]),
            status(&batch[2], json!({"failed": 1, "failed:unreachable": 1})),
            invalidation(&batch[3]),
            status(&batch[3], json!({"invalid_token": 1})),
        ]
    );
    assert_eq!(served(&s.factory, "n1"), counts);

    s.p.reopen(&s.factory).unwrap();
    assert_eq!(s.reports(&batch), vec![]);
    s.p.reopen_after_crash(&s.factory).unwrap();
    assert_eq!(s.reports(&batch), vec![]);
    assert_eq!(served(&s.factory, "n1"), counts);

    // A new instance (empty board) serves the counts from the partition's state on open.
    let fresh = factory();
    assert_eq!(served(&fresh, "n1"), Value::Null);
    s.p.reopen_after_crash(&fresh).unwrap();
    assert_eq!(served(&fresh, "n1"), counts);
    assert_eq!(s.reports(&batch), vec![]);
    // And adds to them.
    let clicked = report("n1", "u1", "push", "clicked", json!({}));
    assert_eq!(
        s.reports([&clicked]),
        vec![status(&clicked, json!({"clicked": 1}))]
    );
    assert_eq!(served(&fresh, "n1")["clicked"], json!(1));
    assert_eq!(served(&fresh, "n1")["delivered"], json!(1));
}

#[test]
fn malformed_reports_go_to_the_dlq_as_bad_report_or_no_payload() {
    let mut s = open();
    let ok = |status: &str, extra: Value| report("n1", "u1", "push", status, extra);
    let mut unknown_status = ok("delivered", json!({}));
    unknown_status["status"] = json!("bounced");
    let mut unknown_channel = ok("delivered", json!({}));
    unknown_channel["channel"] = json!("pigeon");
    let mut no_user = ok("delivered", json!({}));
    no_user.as_object_mut().unwrap().remove("user_id");
    let mut bad_time = ok("delivered", json!({}));
    bad_time["at"] = json!("yesterday");
    let cases: Vec<(Input, &str, Option<&str>)> = vec![
        (Input::new("u1", "not json"), "bad_report", None),
        (input(&unknown_status), "bad_report", None),
        (input(&unknown_channel), "bad_report", None),
        (Input::new("u1", no_user.to_string()), "bad_report", None),
        (input(&bad_time), "bad_report", None),
        (
            Input::new("u2", ok("delivered", json!({})).to_string()),
            "bad_report",
            Some("the record key must be the user id"),
        ),
        (
            Input::keyless(ok("delivered", json!({})).to_string()),
            "bad_report",
            Some("the record key must be the user id"),
        ),
        (
            input(&ok("failed", json!({}))),
            "bad_report",
            Some("failed without a reason"),
        ),
        (
            input(&ok("failed", json!({"reason": ""}))),
            "bad_report",
            Some("failed without a reason"),
        ),
        (
            input(&report(
                "n1",
                "u1",
                "sms",
                "invalid_token",
                json!({"token": "t"}),
            )),
            "bad_report",
            Some("invalid_token is a push report"),
        ),
        (
            input(&ok("invalid_token", json!({}))),
            "bad_report",
            Some("invalid_token without a token"),
        ),
        (
            input(&ok("invalid_token", json!({"token": ""}))),
            "bad_report",
            Some("invalid_token without a token"),
        ),
        (
            Input::tombstone("u1"),
            "no_payload",
            Some("report has no payload"),
        ),
    ];
    let (inputs, expected): (Vec<_>, Vec<_>) = cases
        .into_iter()
        .map(|(i, reason, detail)| (i, (reason, detail)))
        .unzip();
    let out = s.p.process(inputs).unwrap();
    assert_eq!(out.len(), expected.len(), "{out:?}");
    for (offset, (o, (reason, detail))) in out.iter().zip(expected).enumerate() {
        assert_eq!(o.topic, DLQ, "{offset}");
        assert_eq!(header(o, dlq::STAGE), Some("notify-feedback"), "{offset}");
        assert_eq!(dlq_reason(o), Some(reason), "{offset}");
        assert_eq!(
            header(o, dlq::SOURCE_OFFSET),
            Some(offset.to_string().as_str())
        );
        if let Some(detail) = detail {
            assert_eq!(dlq_detail(o), Some(detail), "{offset}");
        } else {
            assert!(!dlq_detail(o).unwrap().is_empty(), "{offset}");
        }
    }
    // The record is dead-lettered as it came.
    assert_eq!(out[0].payload.as_deref(), Some(&b"not json"[..]));
    assert_eq!(key_str(&out[0]), "u1");
    assert_eq!(out[6].key, None);
    assert_eq!(out[12].payload, None);
    // Nothing was counted, nothing moved: a good report afterwards counts in full.
    assert_eq!(served(&s.factory, "n1"), Value::Null);
    let clicked = ok("clicked", json!({}));
    assert_eq!(
        s.reports([&clicked]),
        vec![status(
            &clicked,
            json!({"delivered": 1, "opened": 1, "clicked": 1})
        )]
    );
}

/// The schema's token pattern is `^[^/]+$` because the invalid-tokens key is `<user>/<token>`
/// and the deliverer splits it at the last `/` (user ids may hold one). The parser takes any
/// token: `tok/1` of `u1` becomes key `u1/tok/1`, which the deliverer reads as token `1` of
/// user `u1/tok`, so the dead token stays in `u1`'s pushes.
#[test]
fn a_token_with_a_slash_is_a_bad_report_as_the_schema_says() {
    let mut s = open();
    let r = report(
        "n1",
        "u1",
        "push",
        "invalid_token",
        json!({"token": "tok/1"}),
    );
    let out = s.p.process([input(&r)]).unwrap();
    assert_eq!(emitted(&out), vec![dead_letter(&r)]);
    assert_eq!(dlq_reason(&out[0]), Some("bad_report"));
}

/// The schema requires `notification_id` and `user_id` of at least one character; the parser
/// takes empty ones (an empty user id with an empty key), counting under an empty id.
#[test]
fn empty_ids_are_bad_reports_as_the_schema_says() {
    let mut s = open();
    let no_id = report("", "u1", "push", "delivered", json!({}));
    let no_user = report("n1", "", "push", "delivered", json!({}));
    let out = s.p.process([input(&no_id), input(&no_user)]).unwrap();
    assert_eq!(
        emitted(&out),
        vec![dead_letter(&no_id), dead_letter(&no_user)]
    );
    assert!(out.iter().all(|o| dlq_reason(o) == Some("bad_report")));
}
