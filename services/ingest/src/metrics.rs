//! Ingest's metrics, named and described in one place.

use crate::reject::Reason;

pub const REQUESTS: &str = "sieve_ingest_requests_total";
pub const REQUEST_SECONDS: &str = "sieve_ingest_request_seconds";
pub const RECORDS: &str = "sieve_ingest_records_total";
pub const REJECTED: &str = "sieve_ingest_rejected_total";
pub const INFLIGHT: &str = "sieve_ingest_inflight_records";
pub const REQUESTS_IN_FLIGHT: &str = "sieve_ingest_requests_in_flight";
pub const FILE_RECORDS: &str = "sieve_ingest_file_records_total";

pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUESTS, "HTTP ingest requests, by stream and status.");
    describe_histogram!(
        REQUEST_SECONDS,
        Unit::Seconds,
        "Time from a request's arrival to its answer, by status."
    );
    describe_counter!(
        RECORDS,
        "Records answered, by stream and outcome (accepted = acknowledged by the broker)."
    );
    describe_counter!(REJECTED, "Records and requests refused, by reason.");
    describe_gauge!(
        INFLIGHT,
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
        metrics::gauge!(REQUESTS_IN_FLIGHT).increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(REQUESTS_IN_FLIGHT).decrement(1.0);
    }
}

pub fn request(stream: &str, status: u16, seconds: f64) {
    let status = status.to_string();
    metrics::counter!(REQUESTS, "stream" => stream.to_string(), "status" => status.clone())
        .increment(1);
    metrics::histogram!(REQUEST_SECONDS, "status" => status).record(seconds);
}

pub fn records(stream: &str, outcome: &'static str, n: usize) {
    metrics::counter!(RECORDS, "stream" => stream.to_string(), "outcome" => outcome)
        .increment(n as u64);
}

pub fn rejected(reason: Reason) {
    metrics::counter!(REJECTED, "reason" => reason.as_str()).increment(1);
}

pub fn inflight(n: usize) {
    metrics::gauge!(INFLIGHT).set(n as f64);
}

pub fn file_records(outcome: &'static str, n: u64) {
    metrics::counter!(FILE_RECORDS, "outcome" => outcome).increment(n);
}
