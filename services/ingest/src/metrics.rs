//! Ingest's metrics: named, described and recorded here and nowhere else.

// The one module of this crate allowed to call the `metrics` macros (clippy.toml bans them
// elsewhere).
#![allow(clippy::disallowed_macros)]

use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

use crate::reject::Reason;

pub const REQUESTS: &str = "sieve_ingest_requests_total";
pub const REQUEST_DURATION: &str = "sieve_ingest_request_duration_seconds";
pub const RECORDS: &str = "sieve_ingest_records_total";
pub const REJECTED: &str = "sieve_ingest_rejected_total";
pub const RECORDS_IN_FLIGHT: &str = "sieve_ingest_records_in_flight";
pub const REQUESTS_IN_FLIGHT: &str = "sieve_ingest_requests_in_flight";
pub const FILE_RECORDS: &str = "sieve_ingest_file_records_total";

pub fn describe() {
    describe_counter!(REQUESTS, "HTTP ingest requests, by stream and status.");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from a request's arrival to its answer, by status."
    );
    describe_counter!(
        RECORDS,
        "Records answered, by stream and outcome (accepted = acknowledged by the broker)."
    );
    describe_counter!(REJECTED, "Records and requests refused, by reason.");
    describe_gauge!(
        RECORDS_IN_FLIGHT,
        "Records produced and not yet acknowledged (the in-flight budget in use)."
    );
    describe_gauge!(
        REQUESTS_IN_FLIGHT,
        "Requests whose headers arrived and whose answer is not sent yet."
    );
    describe_counter!(
        FILE_RECORDS,
        "Bulk loader records, by outcome (accepted, rejected, skipped = before the checkpoint)."
    );
}

/// Counts a request in flight for as long as it lives, however it ends.
pub struct InFlight;

impl InFlight {
    pub fn start() -> Self {
        gauge!(REQUESTS_IN_FLIGHT).increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        gauge!(REQUESTS_IN_FLIGHT).decrement(1.0);
    }
}

pub fn request(stream: &str, status: u16, seconds: f64) {
    let status = status.to_string();
    counter!(REQUESTS, "stream" => stream.to_string(), "status" => status.clone()).increment(1);
    histogram!(REQUEST_DURATION, "status" => status).record(seconds);
}

pub fn records(stream: &str, outcome: &'static str, n: usize) {
    counter!(RECORDS, "stream" => stream.to_string(), "outcome" => outcome).increment(n as u64);
}

pub fn rejected(reason: Reason) {
    counter!(REJECTED, "reason" => reason.as_str()).increment(1);
}

pub fn records_in_flight(n: usize) {
    gauge!(RECORDS_IN_FLIGHT).set(n as f64);
}

pub fn file_records(outcome: &'static str, n: u64) {
    counter!(FILE_RECORDS, "outcome" => outcome).increment(n);
}
