//! The planner: expands a request into tasks of at most `task_size` recipients on
//! `notify.tasks.p<priority>`.
//!
//! Follower segments are materialised from `graph.follows` (a broadcast side table) already
//! sharded by recipient: key `f/<author>\0<shard><follower>`, where the shard is the task
//! partition the follower's deliveries belong to. A fan-out therefore streams one shard
//! after another straight into tasks, and every task holds only recipients of its own
//! partition (so rate limits and dedup are per user in the deliverer). At most
//! `tasks_per_step` tasks are planned per input record; the rest continues from a
//! continuation record the planner writes back to its own input, so neither memory nor one
//! batch ever holds a 30 M-follower audience, and other requests interleave with it.

use std::collections::BTreeMap;
use std::sync::Arc;

use rdkafka::message::{Message, OwnedMessage};
use sieve_core::dlq::{Reason, Rejected};
use sieve_core::operator::{Ctx, Operator};
use sieve_core::record::Output;
use sieve_core::side::KvTable;
use sieve_core::Result;

use crate::config::PlannerArgs;
use crate::metrics as m;
use crate::model::{Audience, Counts, Cursor, Notification, Request, StatusEvent, Task};

/// The task partition a user's deliveries go to.
pub fn shard_of(user: &str, partitions: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(user.as_bytes()) % u64::from(partitions.max(1))) as u32
}

fn segment_prefix(author: &str, shard: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(author.len() + 7);
    k.extend_from_slice(b"f/");
    k.extend_from_slice(author.as_bytes());
    k.push(0);
    k.extend_from_slice(&shard.to_be_bytes());
    k
}

/// Graph table writes for one `graph.follows` record: key `<author>/<follower>`; a
/// tombstone or `{"action":"unfollow"}` removes the edge.
pub fn follow_writes(rec: &OwnedMessage, partitions: u32) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let Some((author, follower)) = rec
        .key()
        .and_then(|k| std::str::from_utf8(k).ok())
        .and_then(|k| k.split_once('/'))
    else {
        return Vec::new();
    };
    let unfollow = match rec.payload() {
        None => true,
        Some(v) => serde_json::from_slice::<serde_json::Value>(v)
            .ok()
            .and_then(|j| {
                j.get("action")
                    .and_then(|a| a.as_str())
                    .map(|a| a == "unfollow")
            })
            .unwrap_or(false),
    };
    let mut key = segment_prefix(author, shard_of(follower, partitions));
    key.extend_from_slice(follower.as_bytes());
    vec![(key, (!unfollow).then(Vec::new))]
}

pub struct Planner {
    cfg: Arc<PlannerArgs>,
    graph: KvTable,
    task_partitions: u32,
    input: (String, i32),
}

impl Planner {
    pub fn new(
        cfg: Arc<PlannerArgs>,
        graph: KvTable,
        task_partitions: u32,
        input: (String, i32),
    ) -> Self {
        Planner {
            cfg,
            graph,
            task_partitions,
            input,
        }
    }

    fn task(
        &self,
        n: &Notification,
        index: u64,
        shard: u32,
        recipients: Vec<String>,
    ) -> Result<Vec<Output>> {
        let planned = (recipients.len() * n.channels.len()) as u64;
        let topic = format!("{}.p{}", self.cfg.tasks, n.priority);
        let task = Task {
            notification: n.clone(),
            task_index: index,
            recipients,
        };
        let mut counts = Counts::default();
        counts.add("planned", planned);
        let status = StatusEvent {
            notification_id: n.notification_id.clone(),
            user_id: None,
            channel: None,
            status: None,
            task_index: Some(index),
            counts,
        };
        m::planned(n.priority, planned);
        m::task(n.priority);
        let key = format!("{}/{index}", n.notification_id);
        Ok(vec![
            Output {
                topic,
                partition: Some(shard as i32),
                key: Some(key.into_bytes()),
                payload: Some(to_json(&task)?),
                headers: Vec::new(),
            },
            Output::new(&self.cfg.status)
                .key(n.notification_id.as_bytes())
                .payload(to_json(&status)?),
        ])
    }

    fn plan_users(&self, n: &Notification, users: &[String], ctx: &mut Ctx<'_>) -> Result<()> {
        let mut by_shard: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for u in users {
            by_shard
                .entry(shard_of(u, self.task_partitions))
                .or_default()
                .push(u.clone());
        }
        let mut index = 0;
        for (shard, users) in by_shard {
            for chunk in users.chunks(self.cfg.task_size.max(1)) {
                for o in self.task(n, index, shard, chunk.to_vec())? {
                    ctx.emit(o);
                }
                index += 1;
            }
        }
        Ok(())
    }

    fn plan_followers(&self, req: &Request, author: &str, ctx: &mut Ctx<'_>) -> Result<()> {
        let n = &req.notification;
        let mut cur = req.resume.clone().unwrap_or(Cursor {
            shard: 0,
            after: None,
            next_task: 0,
        });
        let size = self.cfg.task_size.max(1);
        let mut planned_tasks = 0;
        while cur.shard < self.task_partitions && planned_tasks < self.cfg.tasks_per_step {
            let prefix = segment_prefix(author, cur.shard);
            let mut from = prefix.clone();
            if let Some(after) = &cur.after {
                from.extend_from_slice(after.as_bytes());
                from.push(0);
            }
            let mut batch = Vec::with_capacity(size);
            self.graph.scan_from(&prefix, &from, |k, _| {
                batch.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
                Ok(batch.len() < size)
            })?;
            let full = batch.len() == size;
            if !batch.is_empty() {
                cur.after = batch.last().cloned();
                for o in self.task(n, cur.next_task, cur.shard, batch)? {
                    ctx.emit(o);
                }
                cur.next_task += 1;
                planned_tasks += 1;
            }
            if !full {
                cur.shard += 1;
                cur.after = None;
            }
        }
        if cur.shard < self.task_partitions {
            m::continuation();
            let next = Request {
                notification: n.clone(),
                audience: req.audience.clone(),
                resume: Some(cur),
            };
            ctx.emit(Output {
                topic: self.input.0.clone(),
                partition: Some(self.input.1),
                key: Some(n.notification_id.clone().into_bytes()),
                payload: Some(to_json(&next)?),
                headers: Vec::new(),
            });
        }
        Ok(())
    }
}

pub fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| sieve_core::CoreError::Operator(format!("encode json: {e}")))
}

/// Why the planner sends a request to the DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanReject {
    NoPayload,
    BadRequest,
}

impl Reason for PlanReject {
    const STAGE: &'static str = "notify-planner";
    fn as_str(self) -> &'static str {
        match self {
            PlanReject::NoPayload => "no_payload",
            PlanReject::BadRequest => "bad_request",
        }
    }
}

/// The request in `rec`, or why it cannot be planned.
pub fn parse_request(rec: &OwnedMessage) -> std::result::Result<Request, Rejected<PlanReject>> {
    let bad = |detail: String| Rejected::new(PlanReject::BadRequest, detail);
    let payload = rec
        .payload()
        .ok_or_else(|| Rejected::new(PlanReject::NoPayload, "request has no payload"))?;
    let req: Request = serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))?;
    let n = &req.notification;
    if n.priority > 3 {
        return Err(bad(format!("priority {} is not 0-3", n.priority)));
    }
    if n.channels.is_empty() {
        return Err(bad("no channels".into()));
    }
    if n.notification_id.is_empty() {
        return Err(bad("empty notification_id".into()));
    }
    Ok(req)
}

impl Operator for Planner {
    fn process(&mut self, rec: &OwnedMessage, ctx: &mut Ctx<'_>) -> Result<()> {
        let req = match parse_request(rec) {
            Ok(r) => r,
            Err(rejected) => {
                ctx.dead_letter(rec, &self.cfg.dlq, &rejected);
                return Ok(());
            }
        };
        match &req.audience {
            Audience::Users(users) => self.plan_users(&req.notification, users, ctx),
            Audience::FollowersOf { followers_of } => self.plan_followers(&req, followers_of, ctx),
        }
    }
}
