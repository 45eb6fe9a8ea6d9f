//! Crash points for recovery tests: `SIEVE_FAILPOINT=name@n` makes the process SIGKILL
//! itself the n-th time it passes `name`; `name@n:stop` freezes it there with SIGSTOP
//! instead (a zombie: alive, silent, resumed by SIGCONT). Unset in production, where a
//! check costs one atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::signal::{self, Signal};

struct Armed {
    name: String,
    at: u64,
    signal: Signal,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("SIEVE_FAILPOINT").ok()?;
            let (spec, signal) = match spec.strip_suffix(":stop") {
                Some(s) => (s.to_string(), Signal::Stop),
                None => (spec, Signal::Kill),
            };
            let (name, at) = spec.split_once('@').unwrap_or((spec.as_str(), "1"));
            Some(Armed {
                name: name.to_string(),
                at: at.parse().unwrap_or(1),
                signal,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Kills the process with SIGKILL (no destructors, no flushes), or freezes it with SIGSTOP,
/// when armed for `name`.
pub fn hit(name: &str) {
    if let Some(a) = armed() {
        if a.name == name && a.seen.fetch_add(1, Ordering::Relaxed) + 1 == a.at {
            tracing::warn!(failpoint = name, signal = ?a.signal, "failpoint reached");
            let _ = signal::send(std::process::id(), a.signal);
        }
    }
}
