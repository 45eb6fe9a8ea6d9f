//! The records notify reads and writes (schemas in `schemas/`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Push,
    Email,
    Sms,
    Inapp,
}

impl Channel {
    pub const ALL: [Channel; 4] = [Channel::Push, Channel::Email, Channel::Sms, Channel::Inapp];

    pub fn name(self) -> &'static str {
        match self {
            Channel::Push => "push",
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Inapp => "inapp",
        }
    }
}

/// Who receives a request: listed users, or every follower of an author.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    Users(Vec<String>),
    FollowersOf { followers_of: String },
}

/// What a notification says and how, shared by requests and tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub notification_id: String,
    pub priority: u8,
    pub category: String,
    pub template: String,
    #[serde(default)]
    pub data: serde_json::Value,
    pub channels: Vec<Channel>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<String>,
    /// The author a social notification is about (mutes apply to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author_id: Option<String>,
}

/// A request on `notify.requests.pN`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    #[serde(flatten)]
    pub notification: Notification,
    pub audience: Audience,
    /// Set on the planner's own continuation records: where the expansion resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Cursor>,
}

/// Position of a follower-segment expansion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub shard: u32,
    /// Last follower already planned in `shard`.
    pub after: Option<String>,
    pub next_task: u64,
}

/// A batch of recipients on `notify.tasks.pN`. All recipients of a task belong to the task
/// partition it is written to, so a user's rate limits and dedup live in one partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    #[serde(flatten)]
    pub notification: Notification,
    pub task_index: u64,
    pub recipients: Vec<String>,
}

/// What the deliverer reads from `notify.tasks.pN`: a task, or the clock tick that releases
/// deferred deliveries when no task arrives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TaskRecord {
    Tick { tick: bool },
    Task(Box<Task>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuietHours {
    /// Local time "HH:MM" the quiet period starts.
    pub start: String,
    pub end: String,
    /// IANA time zone, for example "Europe/Paris".
    pub tz: String,
}

/// A user's preferences on `users.prefs` (compacted, key = user id).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Prefs {
    /// Channels the user accepts; absent means all.
    #[serde(default)]
    pub channels: Option<Vec<Channel>>,
    #[serde(default)]
    pub muted_categories: Vec<String>,
    #[serde(default)]
    pub muted_authors: Vec<String>,
    #[serde(default)]
    pub quiet_hours: Option<QuietHours>,
    #[serde(default)]
    pub last_active: Option<DateTime<Utc>>,
    #[serde(default)]
    pub device_tokens: Vec<String>,
}

/// A record on `notify.out.<channel>`, for the channel's gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub notification_id: String,
    pub user_id: String,
    pub channel: Channel,
    pub priority: u8,
    pub category: String,
    pub template: String,
    pub data: serde_json::Value,
    /// In-app only: a badge instead of a full entry (the author is muted).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub badge_only: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_tokens: Vec<String>,
}

/// Counts of one notification by status and reason, as summed over tasks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    #[serde(flatten)]
    pub by_status: BTreeMap<String, u64>,
}

impl Counts {
    pub fn add(&mut self, status: &str, n: u64) {
        *self.by_status.entry(status.to_string()).or_default() += n;
    }

    pub fn merge(&mut self, other: &Counts) {
        for (k, v) in &other.by_status {
            self.add(k, *v);
        }
    }
}

/// A status event on `notify.status`: the deliverer's per-task summary (`counts`), or one
/// recipient's event reported by a gateway (`delivered`, `opened`, `clicked`, `invalid_token`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub notification_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_index: Option<u64>,
    #[serde(default, skip_serializing_if = "Counts::is_empty")]
    pub counts: Counts,
}

impl Counts {
    pub fn is_empty(&self) -> bool {
        self.by_status.is_empty()
    }
}

/// What a gateway reports about one delivery on `notify.feedback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportStatus {
    Delivered,
    Opened,
    Clicked,
    /// The gateway gave up after its retries (`reason` says why).
    Failed,
    /// One device token of a push was rejected for good (`token` names it).
    InvalidToken,
}

impl ReportStatus {
    pub fn name(self) -> &'static str {
        match self {
            ReportStatus::Delivered => "delivered",
            ReportStatus::Opened => "opened",
            ReportStatus::Clicked => "clicked",
            ReportStatus::Failed => "failed",
            ReportStatus::InvalidToken => "invalid_token",
        }
    }
}

/// A gateway report on `notify.feedback` (key = user id). Unknown fields are allowed, so
/// gateways may add their own (a provider message id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub notification_id: String,
    pub user_id: String,
    pub channel: Channel,
    pub status: ReportStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub at: DateTime<Utc>,
}

/// A record on `users.invalid_tokens` (compacted, key `<user>/<token>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvalidToken {
    pub user_id: String,
    pub token: String,
    pub notification_id: String,
    pub at: DateTime<Utc>,
}
