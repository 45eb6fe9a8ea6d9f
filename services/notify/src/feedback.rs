//! `sieve notify feedback`: gateway reports (`delivered`, `opened`, `clicked`, `failed`,
//! `invalid_token`) from `notify.feedback` into per-notification counts, dead letters and
//! device-token invalidations, exactly once on the core runtime.
//!
//! A processor of its own rather than another input of the deliverer: reports outnumber
//! tasks by the task size (one report or more per recipient against one task per 5 000), so
//! they need large batches where the deliverer runs one task per batch to keep P0 latency
//! low; and they scale, restart and lag without touching the P0 path.
//!
//! Reports are keyed by user id, so every report of one delivery lands in one partition.
//! State of that partition:
//! - `s/<notification>\0<user>\0<channel>`: how far the delivery got. It only moves forward
//!   (`delivered → opened → clicked`, or `failed`), so a duplicate or late report counts
//!   nothing, and a report that skips a stage counts the stages it implies (an `opened`
//!   without a `delivered` was delivered): `delivered ≥ opened ≥ clicked` always;
//! - `i/<notification>\0<user>\0<token>`: an `invalid_token` report already applied;
//! - `c/<notification>`: counts (`counts.rs`).

use std::sync::Arc;

use rdkafka::message::{Message, OwnedMessage};
use sieve_core::dlq::{Reason, Rejected};
use sieve_core::operator::{Ctx, Operator};
use sieve_core::record::Output;
use sieve_core::store::DEFAULT_CF;
use sieve_core::Result;

use crate::config::FeedbackArgs;
use crate::counts::CountsBoard;
use crate::deliverer::pair_key;
use crate::metrics as m;
use crate::model::{Channel, Counts, InvalidToken, Report, ReportStatus, StatusEvent};
use crate::planner::to_json;

/// How far one delivery got, as its gateway reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Progress {
    Delivered = 1,
    Opened = 2,
    Clicked = 3,
    Failed = 4,
}

const FUNNEL: [Progress; 3] = [Progress::Delivered, Progress::Opened, Progress::Clicked];

impl Progress {
    fn of(status: ReportStatus) -> Option<Progress> {
        match status {
            ReportStatus::Delivered => Some(Progress::Delivered),
            ReportStatus::Opened => Some(Progress::Opened),
            ReportStatus::Clicked => Some(Progress::Clicked),
            ReportStatus::Failed => Some(Progress::Failed),
            ReportStatus::InvalidToken => None,
        }
    }

    fn from_stored(v: &[u8]) -> Option<Progress> {
        [FUNNEL.as_slice(), &[Progress::Failed]]
            .concat()
            .into_iter()
            .find(|p| v == [*p as u8])
    }

    fn name(self) -> &'static str {
        match self {
            Progress::Delivered => "delivered",
            Progress::Opened => "opened",
            Progress::Clicked => "clicked",
            Progress::Failed => "failed",
        }
    }
}

/// The stages a report adds to a delivery that got to `before`; empty when it changes
/// nothing (a duplicate, a late report, or one that contradicts a final outcome: a delivery
/// the gateway gave up on was not delivered, and one delivered did not fail).
fn advance(before: Option<Progress>, report: Progress) -> Vec<Progress> {
    match (before, report) {
        (Some(Progress::Failed), _) => Vec::new(),
        (None, Progress::Failed) => vec![Progress::Failed],
        (Some(_), Progress::Failed) => Vec::new(),
        (before, to) => {
            let from = before.map_or(0, |p| p as u8);
            FUNNEL
                .into_iter()
                .filter(|p| (*p as u8) > from && *p <= to)
                .collect()
        }
    }
}

/// Why a report is unusable (the DLQ reason and detail).
/// Why the feedback service sends a report to the DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackReject {
    NoPayload,
    BadReport,
    /// A gateway gave up on a delivery (its reason is in the detail).
    GatewayFailed,
}

impl Reason for FeedbackReject {
    const STAGE: &'static str = "notify-feedback";
    fn as_str(self) -> &'static str {
        match self {
            FeedbackReject::NoPayload => "no_payload",
            FeedbackReject::BadReport => "bad_report",
            FeedbackReject::GatewayFailed => "gateway_failed",
        }
    }
}

fn parse(rec: &OwnedMessage) -> std::result::Result<Report, Rejected<FeedbackReject>> {
    let payload = rec
        .payload()
        .ok_or_else(|| Rejected::new(FeedbackReject::NoPayload, "report has no payload"))?;
    let r: Report = serde_json::from_slice(payload)
        .map_err(|e| Rejected::new(FeedbackReject::BadReport, e.to_string()))?;
    let bad = |detail: &str| Err(Rejected::new(FeedbackReject::BadReport, detail));
    if r.notification_id.is_empty() || r.user_id.is_empty() {
        return bad("empty notification_id or user_id");
    }
    if rec.key() != Some(r.user_id.as_bytes()) {
        // Another key could put a delivery's reports in two partitions and count them twice.
        return bad("the record key must be the user id");
    }
    let missing = |v: &Option<String>| v.as_deref().is_none_or(str::is_empty);
    match r.status {
        ReportStatus::InvalidToken if r.channel != Channel::Push => {
            bad("invalid_token is a push report")
        }
        ReportStatus::InvalidToken if missing(&r.token) => bad("invalid_token without a token"),
        // `users.invalid_tokens` keys are `<user>/<token>`, split at the last `/`.
        ReportStatus::InvalidToken if r.token.as_deref().is_some_and(|t| t.contains('/')) => {
            bad("a token must not contain '/'")
        }
        ReportStatus::Failed if missing(&r.reason) => bad("failed without a reason"),
        _ => Ok(r),
    }
}

pub struct Feedback {
    cfg: Arc<FeedbackArgs>,
    partition: i32,
    board: CountsBoard,
}

impl Feedback {
    pub fn new(cfg: Arc<FeedbackArgs>, partition: i32, board: CountsBoard) -> Self {
        Feedback {
            cfg,
            partition,
            board,
        }
    }

    /// Moves the delivery forward; a first `failed` is also dead-lettered with its reason.
    fn progress(
        &self,
        rec: &OwnedMessage,
        r: &Report,
        to: Progress,
        ctx: &mut Ctx<'_>,
        counts: &mut Counts,
    ) -> Result<()> {
        let key = pair_key("s/", &[&r.notification_id, &r.user_id, r.channel.name()]);
        let before = ctx
            .get(DEFAULT_CF, &key)?
            .and_then(|v| Progress::from_stored(&v));
        let added = advance(before, to);
        let Some(last) = added.last() else {
            return Ok(());
        };
        ctx.put(DEFAULT_CF, &key, &[*last as u8]);
        for p in &added {
            counts.add(p.name(), 1);
        }
        if to == Progress::Failed {
            let reason = r.reason.as_deref().unwrap_or_default();
            counts.add(&format!("failed:{reason}"), 1);
            let detail = format!(
                "the {} gateway gave up on {} after its retries: {reason}",
                r.channel.name(),
                r.user_id
            );
            let rejected = Rejected::new(FeedbackReject::GatewayFailed, detail);
            ctx.dead_letter(rec, &self.cfg.dlq, &rejected);
        }
        Ok(())
    }

    /// Records the token as invalid, once, where the deliverer reads it with preferences.
    fn invalid_token(
        &self,
        r: &Report,
        token: &str,
        ctx: &mut Ctx<'_>,
        counts: &mut Counts,
    ) -> Result<()> {
        let key = pair_key("i/", &[&r.notification_id, &r.user_id, token]);
        if ctx.get(DEFAULT_CF, &key)?.is_some() {
            return Ok(());
        }
        ctx.put(DEFAULT_CF, &key, b"");
        counts.add(ReportStatus::InvalidToken.name(), 1);
        let record = InvalidToken {
            user_id: r.user_id.clone(),
            token: token.to_string(),
            notification_id: r.notification_id.clone(),
            at: r.at,
        };
        ctx.emit(
            Output::new(&self.cfg.invalid_tokens)
                .key(format!("{}/{token}", r.user_id).into_bytes())
                .payload(to_json(&record)?),
        );
        Ok(())
    }
}

impl Operator for Feedback {
    fn process(&mut self, rec: &OwnedMessage, ctx: &mut Ctx<'_>) -> Result<()> {
        let r = match parse(rec) {
            Ok(r) => r,
            Err(rejected) => {
                ctx.dead_letter(rec, &self.cfg.dlq, &rejected);
                return Ok(());
            }
        };
        let mut counts = Counts::default();
        match (Progress::of(r.status), r.token.as_deref()) {
            (Some(to), _) => self.progress(rec, &r, to, ctx, &mut counts)?,
            (None, Some(token)) => self.invalid_token(&r, token, ctx, &mut counts)?,
            (None, None) => {}
        }
        let outcome = if counts.is_empty() {
            "stale"
        } else {
            "counted"
        };
        m::feedback(r.status.name(), outcome);
        if counts.is_empty() {
            return Ok(());
        }
        self.board
            .add(self.partition, &r.notification_id, &counts, ctx)?;
        let event = StatusEvent {
            notification_id: r.notification_id.clone(),
            user_id: Some(r.user_id.clone()),
            channel: Some(r.channel),
            status: Some(r.status.name().to_string()),
            task_index: None,
            counts,
        };
        ctx.emit(
            Output::new(&self.cfg.status)
                .key(r.notification_id.as_bytes())
                .payload(to_json(&event)?),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Progress::*;
    use super::*;

    #[test]
    fn progress_moves_forward_only() {
        assert_eq!(advance(None, Delivered), [Delivered]);
        assert!(advance(Some(Delivered), Delivered).is_empty());
        assert_eq!(advance(Some(Delivered), Opened), [Opened]);
        assert!(advance(Some(Clicked), Opened).is_empty());
        assert!(advance(Some(Opened), Delivered).is_empty());
    }

    #[test]
    fn a_skipped_stage_is_implied() {
        assert_eq!(advance(None, Clicked), [Delivered, Opened, Clicked]);
        assert_eq!(advance(Some(Delivered), Clicked), [Opened, Clicked]);
    }

    #[test]
    fn failed_is_final_and_only_before_delivery() {
        assert_eq!(advance(None, Failed), [Failed]);
        assert!(advance(Some(Failed), Failed).is_empty());
        assert!(advance(Some(Failed), Delivered).is_empty());
        assert!(advance(Some(Delivered), Failed).is_empty());
    }

    fn record(key: &str, report: serde_json::Value) -> OwnedMessage {
        OwnedMessage::new(
            Some(report.to_string().into_bytes()),
            Some(key.as_bytes().to_vec()),
            "notify.feedback".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            0,
            None,
        )
    }

    /// The schema gateways are given and the parser agree on what is a usable report.
    #[test]
    fn parser_and_schema_agree() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../schemas/gateway-report.schema.json"
        );
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let schema = jsonschema::validator_for(&doc).unwrap();
        let base = serde_json::json!({
            "notification_id": "n", "user_id": "u", "channel": "push", "at": "2026-11-27T00:00:00Z"
        });
        let with = |extra: serde_json::Value| {
            let mut v = base.clone();
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        let cases = [
            (with(serde_json::json!({"status": "delivered"})), true),
            (
                with(serde_json::json!({"status": "clicked", "provider_id": "x"})),
                true,
            ),
            (
                with(serde_json::json!({"status": "failed", "reason": "unreachable"})),
                true,
            ),
            (with(serde_json::json!({"status": "failed"})), false),
            (
                with(serde_json::json!({"status": "invalid_token", "token": "t"})),
                true,
            ),
            (with(serde_json::json!({"status": "invalid_token"})), false),
            (
                with(
                    serde_json::json!({"status": "invalid_token", "token": "t", "channel": "sms"}),
                ),
                false,
            ),
            (with(serde_json::json!({"status": "bounced"})), false),
        ];
        for (report, usable) in cases {
            assert_eq!(schema.is_valid(&report), usable, "schema: {report}");
            assert_eq!(
                parse(&record("u", report.clone())).is_ok(),
                usable,
                "parser: {report}"
            );
        }
        assert!(parse(&record(
            "n",
            with(serde_json::json!({"status": "delivered"}))
        ))
        .is_err());
    }

    #[test]
    fn stored_progress_round_trips() {
        for p in [Delivered, Opened, Clicked, Failed] {
            assert_eq!(Progress::from_stored(&[p as u8]), Some(p));
        }
        assert_eq!(Progress::from_stored(b"x"), None);
    }
}
