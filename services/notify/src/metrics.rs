//! Notify's metrics: named, described and recorded here and nowhere else.

// The one module of this crate allowed to call the `metrics` macros (clippy.toml bans them
// elsewhere).
#![allow(clippy::disallowed_macros)]

use ::metrics::{counter, describe_counter, describe_histogram, histogram, Unit};

pub const PLANNED: &str = "sieve_notify_planned_recipients_total";
pub const TASKS: &str = "sieve_notify_tasks_total";
pub const CONTINUATIONS: &str = "sieve_notify_continuations_total";
pub const OUTCOMES: &str = "sieve_notify_outcomes_total";
pub const END_TO_END_DURATION: &str = "sieve_notify_end_to_end_duration_seconds";
pub const FEEDBACK: &str = "sieve_notify_feedback_total";

pub fn describe() {
    describe_counter!(
        PLANNED,
        "Recipient-channel pairs planned into tasks, by priority."
    );
    describe_counter!(TASKS, "Tasks written by the planner, by priority.");
    describe_counter!(
        CONTINUATIONS,
        "Continuation records of fan-outs larger than one planning step."
    );
    describe_counter!(
        OUTCOMES,
        "Recipient-channel outcomes by priority, status (sent, suppressed, expired, cancelled, deferred, duplicate) and reason."
    );
    describe_histogram!(
        END_TO_END_DURATION,
        Unit::Seconds,
        "From a notification's created_at to its delivery record being produced, by priority."
    );
    describe_counter!(
        FEEDBACK,
        "Gateway reports by status and outcome (counted, or stale: a duplicate or late report that changed nothing)."
    );
}

pub fn planned(priority: u8, recipients: u64) {
    counter!(PLANNED, "priority" => priority.to_string()).increment(recipients);
}

pub fn task(priority: u8) {
    counter!(TASKS, "priority" => priority.to_string()).increment(1);
}

pub fn continuation() {
    counter!(CONTINUATIONS).increment(1);
}

pub fn outcome(priority: u8, status: &str, reason: &str) {
    counter!(OUTCOMES, "priority" => priority.to_string(), "status" => status.to_string(), "reason" => reason.to_string())
        .increment(1);
}

pub fn end_to_end_duration(priority: u8, seconds: f64) {
    histogram!(END_TO_END_DURATION, "priority" => priority.to_string()).record(seconds);
}

pub fn feedback(status: &'static str, outcome: &'static str) {
    counter!(FEEDBACK, "status" => status, "outcome" => outcome).increment(1);
}
