//! `sieve all`'s metrics: named and recorded here and nowhere else.

// The one module of this crate allowed to call the `metrics` macros (clippy.toml bans them
// elsewhere).
#![allow(clippy::disallowed_macros)]

use ::metrics::{counter, gauge};

pub const RESTARTS: &str = "sieve_all_restarts_total";
pub const SERVICE_READY: &str = "sieve_all_service_ready";

/// A supervised service died and is being restarted.
pub fn restart(service: &'static str) {
    counter!(RESTARTS, "service" => service).increment(1);
}

pub fn service_ready(service: &'static str, ready: bool) {
    gauge!(SERVICE_READY, "service" => service).set(if ready { 1.0 } else { 0.0 });
}
