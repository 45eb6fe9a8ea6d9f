//! The deliverer: for every recipient and channel of a task, kill switch → rules
//! (`rules.rs`) → rate limit → dedup, then one record per delivery on `notify.out.<channel>`
//! and one summary per task on `notify.status`.
//!
//! Its clock is the task record's timestamp, so re-processing after a crash decides as the
//! first attempt did. State (one partition's users only, see `planner.rs`):
//! - `d/<notification>\0<user>\0<channel>` in the time bucket of the notification's
//!   `created_at`: decided, so a redelivered task never sends twice. A notification older
//!   than `--delivery-window` (against the partition's clock, the highest task time seen,
//!   `w`) is expired without a look, so its bucket can be dropped: the buckets of a window
//!   are all that is kept, and they reach the changelog packed, not one record per recipient;
//! - `r/<user>\0<channel>`: the token bucket;
//! - `q/<due ms>/<notification>\0<user>\0<channel>`: P3 deliveries deferred by quiet hours,
//!   released by the first task or clock tick of the partition at or after their due time;
//! - `c/<notification>`: counts by status, served at `GET /v1/notifications/{id}` (`counts.rs`).

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use rdkafka::message::{Message, OwnedMessage};
use serde::{Deserialize, Serialize};
use sieve_core::dlq::{Reason, Rejected};
use sieve_core::operator::{Ctx, Operator};
use sieve_core::record::Output;
use sieve_core::side::KvTable;
use sieve_core::store::{bucket_cf, bucket_name, i64_of, PartitionStore, DEFAULT_CF};
use sieve_core::Result;

use crate::config::DelivererArgs;
use crate::counts::CountsBoard;
use crate::metrics as m;
use crate::model::{Channel, Counts, Delivery, Notification, Prefs, StatusEvent, TaskRecord};
use crate::planner::to_json;
use crate::rules::{decide, Bucket, Decision};

/// Side-table keys: preferences by user, kill switches by control key.
pub const PREFS_PREFIX: &str = "p/";
pub const CONTROL_PREFIX: &str = "k/";
/// `t/<user>\0<token>`: a device token a gateway reported invalid (`feedback.rs`).
pub const INVALID_TOKEN_PREFIX: &str = "t/";
const DEFERRED_PREFIX: &[u8] = b"q/";
const CLOCK_KEY: &[u8] = b"w";
/// Buckets per delivery window: a dropped bucket frees an eighth of the no-second-send keys.
const BUCKETS_PER_WINDOW: i64 = 8;

/// Users-table writes for one `users.prefs`, `sieve.control` or `users.invalid_tokens`
/// record: preferences under `p/<user>`, kill switches under `k/<key>`, invalid tokens under
/// `t/<user>\0<token>`; a tombstone deletes, a record without a key is ignored.
pub fn user_table_writes(
    rec: &OwnedMessage,
    prefs_topic: &str,
    tokens_topic: &str,
) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let Some(key) = rec.key() else {
        return Vec::new();
    };
    let value = rec.payload().map(<[u8]>::to_vec);
    if rec.topic() == tokens_topic {
        return invalid_token_write(key, value);
    }
    let prefix = if rec.topic() == prefs_topic {
        PREFS_PREFIX
    } else {
        CONTROL_PREFIX
    };
    let mut k = prefix.as_bytes().to_vec();
    k.extend_from_slice(key);
    vec![(k, value)]
}

/// `users.invalid_tokens` key `<user>/<token>` (tokens have no `/`, user ids may) as
/// `t/<user>\0<token>`; a tombstone lifts the invalidation.
fn invalid_token_write(key: &[u8], value: Option<Vec<u8>>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let key = String::from_utf8_lossy(key);
    match key.rsplit_once('/') {
        Some((user, token)) if !token.is_empty() => {
            vec![(pair_key(INVALID_TOKEN_PREFIX, &[user, token]), value)]
        }
        _ => Vec::new(),
    }
}

pub fn pair_key(prefix: &str, parts: &[&str]) -> Vec<u8> {
    let mut k = prefix.as_bytes().to_vec();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

#[derive(Serialize, Deserialize)]
struct Deferred {
    notification: Notification,
    user: String,
    channel: Channel,
}

/// Why the deliverer sends a task to the DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliverReject {
    BadTask,
    NoPayload,
}

impl Reason for DeliverReject {
    const STAGE: &'static str = "notify-deliverer";
    fn as_str(self) -> &'static str {
        match self {
            DeliverReject::BadTask => "bad_task",
            DeliverReject::NoPayload => "no_payload",
        }
    }
}

pub struct Deliverer {
    cfg: Arc<DelivererArgs>,
    users: KvTable,
    partition: i32,
    board: CountsBoard,
    /// The partition's clock: the highest task time seen (ms), stored under `w`.
    clock: i64,
    window_ms: i64,
    bucket_ms: i64,
    /// Ids of the live decided buckets (`created_at / bucket_ms`).
    buckets: BTreeSet<i64>,
}

impl Deliverer {
    pub fn open(
        cfg: Arc<DelivererArgs>,
        users: KvTable,
        partition: i32,
        board: CountsBoard,
        store: &PartitionStore,
    ) -> Result<Self> {
        let clock = store
            .get(&Default::default(), DEFAULT_CF, CLOCK_KEY)?
            .as_deref()
            .and_then(i64_of)
            .unwrap_or(i64::MIN);
        let window_ms = i64::try_from(cfg.delivery_window.as_millis()).unwrap_or(i64::MAX);
        Ok(Deliverer {
            users,
            partition,
            board,
            clock,
            window_ms,
            bucket_ms: (window_ms / BUCKETS_PER_WINDOW).max(1),
            buckets: store
                .buckets()
                .iter()
                .filter_map(|b| b.parse().ok())
                .collect(),
            cfg,
        })
    }

    /// Advances the partition's clock to `now_ms` and drops the decided buckets whose every
    /// notification is now past the delivery window.
    fn advance_clock(&mut self, now_ms: i64, ctx: &mut Ctx<'_>) {
        if now_ms <= self.clock {
            return;
        }
        self.clock = now_ms;
        ctx.put(DEFAULT_CF, CLOCK_KEY, &now_ms.to_be_bytes());
        let horizon = self.horizon();
        while let Some(&id) = self.buckets.first() {
            if id.saturating_add(1).saturating_mul(self.bucket_ms) > horizon {
                break;
            }
            self.buckets.remove(&id);
            ctx.drop_bucket(&bucket_name(id));
        }
    }

    /// Notifications created before this are past the delivery window.
    fn horizon(&self) -> i64 {
        self.clock.saturating_sub(self.window_ms)
    }

    fn cancelled(&self, n: &Notification) -> Result<bool> {
        let by_id = format!("{CONTROL_PREFIX}notification:{}", n.notification_id);
        if self.users.get(by_id.as_bytes())?.is_some() {
            return Ok(true);
        }
        match &n.campaign_id {
            Some(c) => Ok(self
                .users
                .get(format!("{CONTROL_PREFIX}campaign:{c}").as_bytes())?
                .is_some()),
            None => Ok(false),
        }
    }

    /// The user's preferences without the device tokens gateways reported invalid. An
    /// invalidation wins over any preferences record, older or newer: the two topics have no
    /// order between them, and a token a gateway unregistered never becomes valid again (a
    /// re-registered device gets a new token).
    fn prefs(&self, user: &str) -> Result<Prefs> {
        let raw = self.users.get(format!("{PREFS_PREFIX}{user}").as_bytes())?;
        // Unparseable preferences count as none: the user still gets security messages.
        let mut prefs: Prefs = raw
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default();
        let mut valid = Vec::with_capacity(prefs.device_tokens.len());
        for token in std::mem::take(&mut prefs.device_tokens) {
            if self
                .users
                .get(&pair_key(INVALID_TOKEN_PREFIX, &[user, &token]))?
                .is_none()
            {
                valid.push(token);
            }
        }
        prefs.device_tokens = valid;
        Ok(prefs)
    }

    fn per_hour(&self, channel: Channel) -> Option<u32> {
        match channel {
            Channel::Push => Some(self.cfg.push_per_hour),
            Channel::Sms => Some(self.cfg.sms_per_hour),
            Channel::Email => Some(self.cfg.email_per_hour),
            Channel::Inapp => None,
        }
    }

    /// Decides one recipient and channel, emitting its delivery record if it is sent.
    #[allow(clippy::too_many_arguments)]
    fn one(
        &mut self,
        n: &Notification,
        user: &str,
        channel: Channel,
        now: DateTime<Utc>,
        cancelled: bool,
        ctx: &mut Ctx<'_>,
        counts: &mut Counts,
    ) -> Result<()> {
        let created_ms = n.created_at.timestamp_millis();
        if created_ms < self.horizon() {
            return outcome(counts, n, "expired", "delivery_window");
        }
        let bucket = created_ms.div_euclid(self.bucket_ms);
        let decided_cf = bucket_cf(&bucket_name(bucket));
        let decided = pair_key("d/", &[&n.notification_id, user, channel.name()]);
        if ctx.get(&decided_cf, &decided)?.is_some() {
            return outcome(counts, n, "duplicate", "");
        }
        self.buckets.insert(bucket);
        if cancelled {
            ctx.put(&decided_cf, &decided, b"");
            return outcome(counts, n, "cancelled", "kill_switch");
        }
        let prefs = self.prefs(user)?;
        let badge_only = match decide(n, channel, &prefs, now) {
            Decision::Expired => {
                ctx.put(&decided_cf, &decided, b"");
                return outcome(counts, n, "expired", "");
            }
            Decision::Suppress(reason) => {
                ctx.put(&decided_cf, &decided, b"");
                return outcome(counts, n, "suppressed", reason);
            }
            Decision::Defer(due) => {
                let mut key = format!("q/{:020}/", due.timestamp_millis().max(0)).into_bytes();
                key.extend_from_slice(&pair_key("", &[&n.notification_id, user, channel.name()]));
                let entry = Deferred {
                    notification: n.clone(),
                    user: user.to_string(),
                    channel,
                };
                ctx.put(DEFAULT_CF, &key, &to_json(&entry)?);
                return outcome(counts, n, "deferred", "quiet_hours");
            }
            Decision::Deliver { badge_only } => badge_only,
        };
        if let Some(per_hour) = self.per_hour(channel).filter(|_| n.priority > 0) {
            let key = pair_key("r/", &[user, channel.name()]);
            let now_ms = now.timestamp_millis();
            let mut bucket = ctx
                .get(DEFAULT_CF, &key)?
                .and_then(|v| serde_json::from_slice::<Bucket>(&v).ok())
                .unwrap_or_else(|| Bucket::full(per_hour, now_ms));
            let allowed = bucket.take(per_hour, now_ms);
            ctx.put(DEFAULT_CF, &key, &to_json(&bucket)?);
            if !allowed {
                ctx.put(&decided_cf, &decided, b"");
                return outcome(counts, n, "suppressed", "rate_limited");
            }
        }
        ctx.put(&decided_cf, &decided, b"");
        let delivery = Delivery {
            notification_id: n.notification_id.clone(),
            user_id: user.to_string(),
            channel,
            priority: n.priority,
            category: n.category.clone(),
            template: n.template.clone(),
            data: n.data.clone(),
            badge_only,
            device_tokens: if channel == Channel::Push {
                prefs.device_tokens
            } else {
                Vec::new()
            },
        };
        ctx.emit(
            Output::new(format!("{}.{}", self.cfg.out, channel.name()))
                .key(user.as_bytes())
                .payload(to_json(&delivery)?),
        );
        let latency = (Utc::now() - n.created_at).num_milliseconds().max(0) as f64 / 1000.0;
        m::end_to_end_duration(n.priority, latency);
        outcome(counts, n, "sent", "")
    }

    /// Adds `counts` to the notification's stored counts and emits the summary event.
    fn summarise(
        &self,
        n: &Notification,
        task_index: Option<u64>,
        counts: Counts,
        ctx: &mut Ctx<'_>,
    ) -> Result<()> {
        self.board
            .add(self.partition, &n.notification_id, &counts, ctx)?;
        let event = StatusEvent {
            notification_id: n.notification_id.clone(),
            user_id: None,
            channel: None,
            status: None,
            task_index,
            counts,
        };
        ctx.emit(
            Output::new(&self.cfg.status)
                .key(n.notification_id.as_bytes())
                .payload(to_json(&event)?),
        );
        Ok(())
    }

    /// Delivers deferred entries due at `now`.
    fn release_due(&mut self, now: DateTime<Utc>, ctx: &mut Ctx<'_>) -> Result<()> {
        let now_ms = now.timestamp_millis();
        let mut due = Vec::new();
        ctx.store()
            .scan_from(DEFAULT_CF, DEFERRED_PREFIX, DEFERRED_PREFIX, |k, v| {
                let at = std::str::from_utf8(&k[2..22.min(k.len())])
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(i64::MAX);
                if at > now_ms {
                    return Ok(false);
                }
                due.push((k.to_vec(), v.to_vec()));
                Ok(due.len() < 10_000)
            })?;
        for (k, v) in due {
            // Released earlier in this batch: the delete is pending, not yet committed.
            if ctx.get(DEFAULT_CF, &k)?.is_none() {
                continue;
            }
            ctx.delete(DEFAULT_CF, &k);
            let Ok(d) = serde_json::from_slice::<Deferred>(&v) else {
                continue;
            };
            let mut counts = Counts::default();
            counts.add("released", 1);
            let cancelled = self.cancelled(&d.notification)?;
            self.one(
                &d.notification,
                &d.user,
                d.channel,
                now,
                cancelled,
                ctx,
                &mut counts,
            )?;
            self.summarise(&d.notification, None, counts, ctx)?;
        }
        Ok(())
    }
}

fn outcome(counts: &mut Counts, n: &Notification, status: &str, reason: &str) -> Result<()> {
    counts.add(status, 1);
    if !reason.is_empty() {
        counts.add(&format!("{status}:{reason}"), 1);
    }
    m::outcome(n.priority, status, reason);
    Ok(())
}

impl Operator for Deliverer {
    fn process(&mut self, rec: &OwnedMessage, ctx: &mut Ctx<'_>) -> Result<()> {
        let now_ms = rec
            .timestamp()
            .to_millis()
            .unwrap_or_else(|| Utc::now().timestamp_millis());
        let now = Utc
            .timestamp_millis_opt(now_ms)
            .single()
            .unwrap_or_else(Utc::now);
        self.advance_clock(now_ms, ctx);
        self.release_due(now, ctx)?;
        let parsed = rec.payload().map(serde_json::from_slice::<TaskRecord>);
        let task = match parsed {
            Some(Ok(TaskRecord::Tick { .. })) => return Ok(()),
            Some(Ok(TaskRecord::Task(t))) => t,
            Some(Err(e)) => {
                let rejected = Rejected::new(DeliverReject::BadTask, e.to_string());
                ctx.dead_letter(rec, &self.cfg.dlq, &rejected);
                return Ok(());
            }
            None => {
                let rejected = Rejected::new(DeliverReject::NoPayload, "task has no payload");
                ctx.dead_letter(rec, &self.cfg.dlq, &rejected);
                return Ok(());
            }
        };
        let n = &task.notification;
        let cancelled = self.cancelled(n)?;
        let mut counts = Counts::default();
        for user in &task.recipients {
            for channel in &n.channels {
                self.one(n, user, *channel, now, cancelled, ctx, &mut counts)?;
            }
        }
        self.summarise(n, Some(task.task_index), counts, ctx)
    }
}
