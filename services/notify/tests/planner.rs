//! The notify planner in-process (`sieve_core::testing`): requests to tasks, follower
//! fan-out from the `graph.follows` side table in steps with continuation records, and bad
//! requests, with exact outputs and no broker.

// Test helpers outside `#[test]` functions unwrap too (clippy.toml allows it in tests only).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use sieve_core::dlq;
use sieve_core::record::Output;
use sieve_core::testing::{
    dlq_detail, dlq_reason, header, json, key_str, temp_service, Input, OperatorHarness,
};
use sieve_notify::planner::{shard_of, Planner};
use sieve_notify::{PlannerArgs, PlannerFactory};
use tempfile::TempDir;

const REQUESTS_P2: &str = "notify.requests.p2";
const FOLLOWS: &str = "graph.follows";
const STATUS: &str = "notify.status";
const DLQ: &str = "dlq.notify";
/// Task partitions: the shards recipients are spread over.
const SHARDS: u32 = 3;
const TASK_SIZE: usize = 2;

struct Setup {
    factory: PlannerFactory,
    p: OperatorHarness<Planner>,
    _state: TempDir,
}

fn open() -> Setup {
    let args = PlannerArgs {
        requests: "notify.requests".into(),
        tasks: "notify.tasks".into(),
        follows: FOLLOWS.into(),
        status: STATUS.into(),
        dlq: DLQ.into(),
        task_size: TASK_SIZE,
        tasks_per_step: 2,
        starvation_guard: Duration::from_secs(5),
    };
    let (state, service) = temp_service("planner-test").unwrap();
    let factory = PlannerFactory::open(args, &service, SHARDS).unwrap();
    let p = OperatorHarness::open(&factory, REQUESTS_P2, 0).unwrap();
    Setup {
        factory,
        p,
        _state: state,
    }
}

/// A request's notification fields (what every task repeats).
fn notification(id: &str, priority: u8) -> Value {
    json!({
        "notification_id": id,
        "priority": priority,
        "category": "social",
        "template": "new_post",
        "data": {"post": 7},
        "channels": ["push", "inapp"],
        "created_at": "2026-11-20T12:00:00Z",
    })
}

fn request(n: &Value, audience: Value) -> Input {
    let mut r = n.clone();
    r["audience"] = audience;
    Input::new(n["notification_id"].as_str().unwrap(), r.to_string()).at(1_800_000_000_000)
}

/// The two outputs of one planned task: the task on its priority's topic and shard, and its
/// `planned` count (recipients × channels) on the status topic.
fn task(n: &Value, index: u64, shard: u32, recipients: &[&str]) -> [Output; 2] {
    let id = n["notification_id"].as_str().unwrap();
    let mut t = n.clone();
    t["task_index"] = json!(index);
    t["recipients"] = json!(recipients);
    let status = json!({
        "notification_id": id,
        "task_index": index,
        "counts": {"planned": recipients.len() * 2},
    });
    [
        Output {
            topic: format!("notify.tasks.p{}", n["priority"]),
            partition: Some(shard as i32),
            key: Some(format!("{id}/{index}").into_bytes()),
            payload: Some(t.to_string().into_bytes()),
            headers: Vec::new(),
        },
        Output::new(STATUS).key(id).payload(status.to_string()),
    ]
}

/// Outputs with JSON payloads compared as JSON (field order is serde's, not the test's).
fn normalised(outs: &[Output]) -> Vec<(String, Option<i32>, String, Value)> {
    outs.iter()
        .map(|o| {
            (
                o.topic.clone(),
                o.partition,
                key_str(o).to_string(),
                json(o),
            )
        })
        .collect()
}

/// Recipients grouped by shard in order of appearance, then cut into tasks.
fn plan<'a>(recipients: &[&'a str]) -> Vec<(u32, Vec<&'a str>)> {
    let mut by_shard: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for r in recipients {
        by_shard.entry(shard_of(r, SHARDS)).or_default().push(r);
    }
    by_shard
        .into_iter()
        .flat_map(|(s, rs)| {
            rs.chunks(TASK_SIZE)
                .map(|c| (s, c.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn a_user_list_becomes_tasks_per_shard_on_the_topic_of_its_priority() {
    let mut s = open();
    let users = ["u1", "u2", "u3", "u4", "u5", "u6", "u7"];
    for priority in [2, 0] {
        let n = notification(&format!("n-p{priority}"), priority);
        let out = s.p.process([request(&n, json!(users))]).unwrap();
        let want: Vec<Output> = plan(&users)
            .into_iter()
            .enumerate()
            .flat_map(|(i, (shard, rs))| task(&n, i as u64, shard, &rs))
            .collect();
        assert_eq!(normalised(&out), normalised(&want));
        // Every recipient is planned once, each task holds one shard's users only.
        assert_eq!(out.len(), 2 * plan(&users).len());
    }
}

#[test]
fn the_tasks_topic_follows_the_requests_priority_field_not_its_input_topic() {
    let mut s = open();
    // Read from notify.requests.p2, but the request says priority 0.
    let n = notification("n1", 0);
    let out = s.p.process([request(&n, json!(["u1"]))]).unwrap();
    assert_eq!(out[0].topic, "notify.tasks.p0");
}

#[test]
fn followers_fan_out_from_the_side_table_in_steps_with_continuations() {
    let mut s = open();
    let followers = ["f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9"];
    let mut side: Vec<Input> = followers
        .iter()
        .map(|f| Input::new(format!("celeb/{f}"), r#"{"action":"follow"}"#))
        .collect();
    side.push(Input::new("celeb/f3", r#"{"action":"unfollow"}"#));
    side.push(Input::tombstone("celeb/f5"));
    side.push(Input::new("other/f1", r#"{"action":"follow"}"#));
    side.push(Input::new("no-slash", r#"{"action":"follow"}"#));
    // The planner keeps no per-partition state about follows: nothing to emit on them.
    assert_eq!(s.p.side(&mut s.factory, side).unwrap(), vec![]);

    let n = notification("n1", 2);
    let mut expected_followers: Vec<&str> = vec!["f1", "f2", "f4", "f6", "f7", "f8", "f9"];
    // Within a shard the table's order: by follower id bytes.
    expected_followers.sort();
    let mut want = Vec::new();
    for (i, (shard, rs)) in plan(&expected_followers).into_iter().enumerate() {
        want.extend(task(&n, i as u64, shard, &rs));
    }

    let mut got = Vec::new();
    let mut next = Some(request(&n, json!({"followers_of": "celeb"})));
    let mut steps = 0;
    while let Some(input) = next.take() {
        steps += 1;
        assert!(steps <= 10, "the fan-out ends");
        let out = s.p.process([input]).unwrap();
        let tasks = out
            .iter()
            .filter(|o| o.topic.starts_with("notify.tasks."))
            .count();
        assert!(tasks <= 2, "at most tasks_per_step tasks per input record");
        for o in out {
            if o.topic == REQUESTS_P2 {
                // A continuation: back to this input partition, keyed by the notification.
                assert_eq!((o.partition, key_str(&o)), (Some(0), "n1"));
                let cont = json(&o);
                assert_eq!(cont["audience"], json!({"followers_of": "celeb"}));
                assert!(cont["resume"]["next_task"].as_u64().unwrap() > 0);
                next = Some(Input::new("n1", o.payload.unwrap()).at(1_800_000_000_000));
            } else {
                got.push(o);
            }
        }
    }
    assert!(
        steps >= 2,
        "4 or more tasks at 2 per step need a continuation"
    );
    assert_eq!(normalised(&got), normalised(&want));
    // The first step stopped after two tasks, mid-fan-out.
    let first =
        s.p.process([request(
            &notification("n2", 2),
            json!({"followers_of": "celeb"}),
        )])
        .unwrap();
    assert_eq!(first.len(), 5);
    assert_eq!(first[4].topic, REQUESTS_P2);
    assert_eq!(json(&first[4])["resume"]["next_task"], json!(2));
}

#[test]
fn an_author_without_followers_plans_nothing() {
    let mut s = open();
    let out =
        s.p.process([request(
            &notification("n1", 1),
            json!({"followers_of": "nobody"}),
        )])
        .unwrap();
    assert_eq!(out, vec![]);
}

#[test]
fn bad_requests_go_to_the_dlq_with_their_reason() {
    let mut s = open();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut r = notification("n1", 1);
        r["audience"] = json!(["u1"]);
        f(&mut r);
        Input::new("n1", r.to_string())
    };
    let inputs = vec![
        Input::tombstone("n1"),
        Input::new("n1", "not json"),
        with(&|r| r["priority"] = json!(4)),
        with(&|r| r["channels"] = json!([])),
        with(&|r| r["notification_id"] = json!("")),
        with(&|r| r["channels"] = json!(["fax"])),
        with(&|r| r["audience"] = json!({"everyone": true})),
        with(&|r| {
            r.as_object_mut().unwrap().remove("created_at");
        }),
    ];
    let out = s.p.process(inputs).unwrap();
    let got: Vec<_> = out
        .iter()
        .map(|o| (o.topic.as_str(), dlq_reason(o)))
        .collect();
    let mut want = vec![(DLQ, Some("no_payload"))];
    want.extend([(DLQ, Some("bad_request")); 7]);
    assert_eq!(got, want);
    assert_eq!(dlq_detail(&out[0]), Some("request has no payload"));
    assert_eq!(dlq_detail(&out[2]), Some("priority 4 is not 0-3"));
    assert_eq!(dlq_detail(&out[3]), Some("no channels"));
    assert_eq!(dlq_detail(&out[4]), Some("empty notification_id"));
    assert_eq!(header(&out[2], dlq::STAGE), Some("notify-planner"));
    assert_eq!(header(&out[2], dlq::SOURCE_TOPIC), Some(REQUESTS_P2));
    assert_eq!(header(&out[2], dlq::SOURCE_OFFSET), Some("2"));
}

#[test]
#[ignore = "bug, issue 21 (one contract): docs/notify.md says requests with unknown fields go to the DLQ, but the \
            planner ignores them (serde flatten, no deny_unknown_fields), so a misspelt \
            `expire_at` silently never expires"]
fn a_request_with_an_unknown_field_goes_to_the_dlq() {
    let mut s = open();
    let mut r = notification("n1", 1);
    r["audience"] = json!(["u1"]);
    r["expire_at"] = json!("2026-11-21T00:00:00Z");
    let out = s.p.process([Input::new("n1", r.to_string())]).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(dlq_reason(&out[0]), Some("bad_request"));
}
