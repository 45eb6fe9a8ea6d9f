//! Notify's metrics, named and described in one place.

pub const PLANNED: &str = "sieve_notify_planned_recipients_total";
pub const TASKS: &str = "sieve_notify_tasks_total";
pub const CONTINUATIONS: &str = "sieve_notify_continuations_total";
pub const OUTCOMES: &str = "sieve_notify_outcomes_total";
pub const LATENCY: &str = "sieve_notify_latency_seconds";
pub const FEEDBACK: &str = "sieve_notify_feedback_total";

pub fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
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
        LATENCY,
        Unit::Seconds,
        "From a notification's created_at to its delivery record being produced, by priority."
    );
    describe_counter!(
        FEEDBACK,
        "Gateway reports by status and outcome (counted, or stale: a duplicate or late report that changed nothing)."
    );
}
