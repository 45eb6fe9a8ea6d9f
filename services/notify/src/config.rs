//! `sieve notify planner|deliver` settings.

use std::time::Duration;

use clap::Args;

/// Topics of one kind per priority: `<prefix>.p0` … `<prefix>.p3`.
pub fn by_priority(prefix: &str) -> Vec<String> {
    (0..4).map(|p| format!("{prefix}.p{p}")).collect()
}

#[derive(Debug, Clone, Args)]
pub struct PlannerArgs {
    /// Requests are read from `<prefix>.p0` … `.p3`.
    #[arg(long, env = "SIEVE_NOTIFY_REQUESTS", default_value = "notify.requests")]
    pub requests: String,
    /// Tasks are written to `<prefix>.p0` … `.p3`.
    #[arg(long, env = "SIEVE_NOTIFY_TASKS", default_value = "notify.tasks")]
    pub tasks: String,
    /// Follow events (compacted, key `<author>/<follower>`).
    #[arg(long, env = "SIEVE_NOTIFY_FOLLOWS", default_value = "graph.follows")]
    pub follows: String,
    #[arg(long, env = "SIEVE_NOTIFY_STATUS", default_value = "notify.status")]
    pub status: String,
    #[arg(long, env = "SIEVE_NOTIFY_DLQ", default_value = "dlq.notify")]
    pub dlq: String,
    /// Recipients per task (the seed's systems used 5 000–10 000).
    #[arg(long, env = "SIEVE_NOTIFY_TASK_SIZE", default_value_t = 5_000)]
    pub task_size: usize,
    /// Tasks planned per step of a fan-out; the rest continues from a continuation record,
    /// so memory never holds more than this many tasks' recipients.
    #[arg(long, env = "SIEVE_NOTIFY_TASKS_PER_STEP", default_value_t = 20)]
    pub tasks_per_step: u64,
    /// Lower priorities get one batch after being paused this long.
    #[arg(long, env = "SIEVE_NOTIFY_STARVATION_GUARD", default_value = "5s", value_parser = humantime::parse_duration)]
    pub starvation_guard: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct DelivererArgs {
    #[arg(long, env = "SIEVE_NOTIFY_TASKS", default_value = "notify.tasks")]
    pub tasks: String,
    /// Delivery records go to `<prefix>.push`, `.email`, `.sms`, `.inapp`.
    #[arg(long, env = "SIEVE_NOTIFY_OUT", default_value = "notify.out")]
    pub out: String,
    #[arg(long, env = "SIEVE_NOTIFY_STATUS", default_value = "notify.status")]
    pub status: String,
    #[arg(long, env = "SIEVE_NOTIFY_PREFS", default_value = "users.prefs")]
    pub prefs: String,
    /// Kill switches (compacted, key `notification:<id>` or `campaign:<id>`).
    #[arg(long, env = "SIEVE_NOTIFY_CONTROL", default_value = "sieve.control")]
    pub control: String,
    /// Device tokens gateways reported invalid (compacted, key `<user>/<token>`), written
    /// by `sieve notify feedback`.
    #[arg(
        long,
        env = "SIEVE_NOTIFY_INVALID_TOKENS",
        default_value = "users.invalid_tokens"
    )]
    pub invalid_tokens: String,
    #[arg(long, env = "SIEVE_NOTIFY_DLQ", default_value = "dlq.notify")]
    pub dlq: String,
    #[arg(long, env = "SIEVE_NOTIFY_PUSH_PER_HOUR", default_value_t = 5)]
    pub push_per_hour: u32,
    #[arg(long, env = "SIEVE_NOTIFY_SMS_PER_HOUR", default_value_t = 3)]
    pub sms_per_hour: u32,
    #[arg(long, env = "SIEVE_NOTIFY_EMAIL_PER_HOUR", default_value_t = 10)]
    pub email_per_hour: u32,
    /// Tasks per batch: a P0 task waits at most for the batch in progress.
    #[arg(long, env = "SIEVE_NOTIFY_TASKS_PER_BATCH", default_value_t = 1)]
    pub tasks_per_batch: usize,
    #[arg(long, env = "SIEVE_NOTIFY_STARVATION_GUARD", default_value = "5s", value_parser = humantime::parse_duration)]
    pub starvation_guard: Duration,
    /// How often a clock tick is written to the P3 task partitions, so deferred deliveries
    /// go out when no task arrives.
    #[arg(long, env = "SIEVE_NOTIFY_TICK", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tick: Duration,
    /// A notification goes out at most this long after its `created_at` (later: `expired`,
    /// reason `delivery_window`); its no-second-send keys are kept this long, then dropped
    /// in time buckets, so the deliverer's state does not grow with every fan-out ever sent.
    #[arg(long, env = "SIEVE_NOTIFY_DELIVERY_WINDOW", default_value = "7days", value_parser = humantime::parse_duration)]
    pub delivery_window: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct FeedbackArgs {
    /// Gateway reports (`schemas/gateway-report.schema.json`), key = user id.
    #[arg(long, env = "SIEVE_NOTIFY_FEEDBACK", default_value = "notify.feedback")]
    pub feedback: String,
    /// Where an `invalid_token` report becomes a record the deliverer reads with preferences.
    #[arg(
        long,
        env = "SIEVE_NOTIFY_INVALID_TOKENS",
        default_value = "users.invalid_tokens"
    )]
    pub invalid_tokens: String,
    #[arg(long, env = "SIEVE_NOTIFY_STATUS", default_value = "notify.status")]
    pub status: String,
    #[arg(long, env = "SIEVE_NOTIFY_DLQ", default_value = "dlq.notify")]
    pub dlq: String,
}
