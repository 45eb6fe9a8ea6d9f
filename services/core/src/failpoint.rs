//! Crash points for recovery tests: `SIEVE_FAILPOINT=name@n` makes the process SIGKILL
//! itself the n-th time it passes `name`. Unset in production, where a check costs one
//! atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Armed {
    name: String,
    at: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("SIEVE_FAILPOINT").ok()?;
            let (name, at) = spec.split_once('@').unwrap_or((spec.as_str(), "1"));
            Some(Armed {
                name: name.to_string(),
                at: at.parse().unwrap_or(1),
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Kills the process with SIGKILL (no destructors, no flushes) when armed for `name`.
pub fn hit(name: &str) {
    if let Some(a) = armed() {
        if a.name == name && a.seen.fetch_add(1, Ordering::Relaxed) + 1 == a.at {
            tracing::warn!(failpoint = name, "failpoint reached: killing the process");
            let _ = crate::signal::send(std::process::id(), crate::signal::Signal::Kill);
        }
    }
}
