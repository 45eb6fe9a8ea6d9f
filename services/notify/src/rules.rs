//! Per recipient and channel, what the deliverer does: a pure function of the notification,
//! the user's preferences and the time, so every rule is tested on its own. Rate limits and
//! dedup need state and are applied by the deliverer after this (see `deliverer.rs`).
//!
//! Order: expiry → channel preferences and mutes → quiet hours → relevance tier → device.
//! P0 (security) bypasses category mutes, quiet hours and rate limits; channel choices
//! still apply.

use std::str::FromStr;

use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

use crate::model::{Channel, Notification, Prefs, QuietHours};

/// Users who have not been active for this long get no push (in-app still reaches them).
pub const INACTIVE_AFTER: Duration = Duration::days(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Deliver {
        badge_only: bool,
    },
    Suppress(&'static str),
    /// P3 in quiet hours: delivered when the quiet period ends (unless expired by then).
    Defer(DateTime<Utc>),
    Expired,
}

pub fn decide(n: &Notification, channel: Channel, prefs: &Prefs, now: DateTime<Utc>) -> Decision {
    let p0 = n.priority == 0;
    if n.expires_at.is_some_and(|e| now >= e) {
        return Decision::Expired;
    }
    if prefs
        .channels
        .as_ref()
        .is_some_and(|c| !c.contains(&channel))
    {
        return Decision::Suppress("channel_disabled");
    }
    if !p0 && prefs.muted_categories.contains(&n.category) {
        return Decision::Suppress("category_muted");
    }
    let author_muted = !p0
        && n.author_id
            .as_ref()
            .is_some_and(|a| prefs.muted_authors.contains(a));
    if author_muted && channel != Channel::Inapp {
        return Decision::Suppress("author_muted");
    }
    if !p0 {
        if let Some(end) = prefs.quiet_hours.as_ref().and_then(|q| quiet_until(q, now)) {
            if n.priority >= 3 {
                return Decision::Defer(end);
            }
            if matches!(channel, Channel::Push | Channel::Sms) {
                return Decision::Suppress("quiet_hours");
            }
        }
    }
    if channel == Channel::Push {
        let inactive = prefs
            .last_active
            .is_none_or(|t| now.signed_duration_since(t) > INACTIVE_AFTER);
        if inactive && !p0 {
            return Decision::Suppress("inactive_user");
        }
        if prefs.device_tokens.is_empty() {
            return Decision::Suppress("no_device_token");
        }
    }
    Decision::Deliver {
        badge_only: author_muted,
    }
}

/// When `now` is inside the user's quiet hours, the instant they end.
pub fn quiet_until(q: &QuietHours, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let tz = Tz::from_str(&q.tz).ok()?;
    let start = NaiveTime::parse_from_str(&q.start, "%H:%M").ok()?;
    let end = NaiveTime::parse_from_str(&q.end, "%H:%M").ok()?;
    let local = now.with_timezone(&tz);
    let t = local.time();
    let quiet = if start <= end {
        t >= start && t < end
    } else {
        // Across midnight, for example 22:00–07:00.
        t >= start || t < end
    };
    if !quiet {
        return None;
    }
    let mut day = local.date_naive();
    if t >= end {
        day = day.succ_opt()?;
    }
    // A gap at the end time (DST) moves it an hour later; an overlap takes the first.
    let naive = day.and_time(end);
    tz.from_local_datetime(&naive)
        .earliest()
        .or_else(|| {
            tz.from_local_datetime(&(naive + Duration::hours(1)))
                .earliest()
        })
        .map(|d| d.with_timezone(&Utc))
}

/// A per-user, per-channel token bucket: `per_hour` tokens, refilled continuously.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Bucket {
    pub tokens: f64,
    pub at_ms: i64,
}

impl Bucket {
    pub fn full(per_hour: u32, now_ms: i64) -> Self {
        Bucket {
            tokens: f64::from(per_hour),
            at_ms: now_ms,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, per_hour: u32, now_ms: i64) -> bool {
        let cap = f64::from(per_hour);
        let elapsed_h = (now_ms - self.at_ms).max(0) as f64 / 3_600_000.0;
        self.tokens = (self.tokens + elapsed_h * cap).min(cap);
        self.at_ms = self.at_ms.max(now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn notification(priority: u8) -> Notification {
        Notification {
            notification_id: "n1".into(),
            priority,
            category: "social".into(),
            template: "t".into(),
            data: serde_json::Value::Null,
            channels: vec![Channel::Push, Channel::Inapp],
            created_at: at("2026-11-20T10:00:00Z"),
            expires_at: None,
            campaign_id: None,
            author_id: Some("celebrity".into()),
        }
    }

    fn active() -> Prefs {
        Prefs {
            last_active: Some(at("2026-11-19T10:00:00Z")),
            device_tokens: vec!["tok".into()],
            ..Prefs::default()
        }
    }

    fn quiet(tz: &str) -> Prefs {
        Prefs {
            quiet_hours: Some(QuietHours {
                start: "22:00".into(),
                end: "07:00".into(),
                tz: tz.into(),
            }),
            ..active()
        }
    }

    const DELIVER: Decision = Decision::Deliver { badge_only: false };

    #[test]
    fn quiet_hours_follow_the_users_time_zone_across_midnight() {
        // 23:30 UTC is 00:30 in Paris (quiet) and 18:30 in New York (not quiet).
        let now = at("2026-11-20T23:30:00Z");
        let n = notification(2);
        assert_eq!(
            decide(&n, Channel::Push, &quiet("Europe/Paris"), now),
            Decision::Suppress("quiet_hours")
        );
        assert_eq!(
            decide(&n, Channel::Push, &quiet("America/New_York"), now),
            DELIVER
        );
        // In-app is not interruptive: it still goes.
        assert_eq!(
            decide(&n, Channel::Inapp, &quiet("Europe/Paris"), now),
            DELIVER
        );
        // Before midnight local: 21:30 UTC is 22:30 in Paris.
        assert_eq!(
            decide(
                &n,
                Channel::Push,
                &quiet("Europe/Paris"),
                at("2026-11-20T21:30:00Z")
            ),
            Decision::Suppress("quiet_hours")
        );
        // 06:59 Paris is quiet, 07:00 is not.
        assert!(quiet_until(
            &quiet("Europe/Paris").quiet_hours.unwrap(),
            at("2026-11-21T05:59:00Z")
        )
        .is_some());
        assert!(quiet_until(
            &quiet("Europe/Paris").quiet_hours.unwrap(),
            at("2026-11-21T06:00:00Z")
        )
        .is_none());
    }

    #[test]
    fn p3_is_deferred_to_the_end_of_quiet_hours_and_p0_bypasses_them() {
        let now = at("2026-11-20T23:30:00Z");
        assert_eq!(
            decide(&notification(3), Channel::Push, &quiet("Europe/Paris"), now),
            Decision::Defer(at("2026-11-21T06:00:00Z"))
        );
        assert_eq!(
            decide(&notification(0), Channel::Push, &quiet("Europe/Paris"), now),
            DELIVER
        );
        // Expired before the quiet period ends: expired, not deferred forever.
        let mut n = notification(3);
        n.expires_at = Some(at("2026-11-21T01:00:00Z"));
        assert_eq!(
            decide(
                &n,
                Channel::Push,
                &quiet("Europe/Paris"),
                at("2026-11-21T06:00:00Z")
            ),
            Decision::Expired
        );
    }

    #[test]
    fn mutes_and_channel_choices() {
        let now = at("2026-11-20T12:00:00Z");
        let mut p = active();
        p.muted_authors = vec!["celebrity".into()];
        assert_eq!(
            decide(&notification(2), Channel::Push, &p, now),
            Decision::Suppress("author_muted")
        );
        assert_eq!(
            decide(&notification(2), Channel::Inapp, &p, now),
            Decision::Deliver { badge_only: true }
        );
        let mut p = active();
        p.muted_categories = vec!["social".into()];
        assert_eq!(
            decide(&notification(2), Channel::Push, &p, now),
            Decision::Suppress("category_muted")
        );
        assert_eq!(decide(&notification(0), Channel::Push, &p, now), DELIVER);
        let mut p = active();
        p.channels = Some(vec![Channel::Email]);
        assert_eq!(
            decide(&notification(0), Channel::Push, &p, now),
            Decision::Suppress("channel_disabled")
        );
    }

    #[test]
    fn inactive_users_get_in_app_only() {
        let mut p = active();
        p.last_active = Some(at("2026-10-01T00:00:00Z"));
        let now = at("2026-11-20T12:00:00Z");
        assert_eq!(
            decide(&notification(2), Channel::Push, &p, now),
            Decision::Suppress("inactive_user")
        );
        assert_eq!(decide(&notification(2), Channel::Inapp, &p, now), DELIVER);
        // 30 days exactly is still active.
        p.last_active = Some(now - INACTIVE_AFTER);
        assert_eq!(decide(&notification(2), Channel::Push, &p, now), DELIVER);
    }

    #[test]
    fn token_bucket_allows_the_limit_then_refills() {
        let t0 = 1_800_000_000_000;
        let mut b = Bucket::full(5, t0);
        assert_eq!((0..6).filter(|_| b.take(5, t0)).count(), 5);
        // One token takes 12 minutes to come back (5 per hour).
        assert!(!b.take(5, t0 + 11 * 60_000));
        assert!(b.take(5, t0 + 13 * 60_000));
        assert!(!b.take(5, t0 + 13 * 60_000));
    }
}
