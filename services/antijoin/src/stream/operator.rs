//! The anti-join operator of one left partition.
//!
//! Retract mode state (default column family): join key → one flag byte (1 = the output's
//! latest record for this key from this partition is a value, 0 = it is not) followed by the
//! latest left payload with that key, kept so that a deleted right key can bring it back.
//! One entry per distinct left key and partition however often the key repeats, so the hot
//! key `guest` costs one entry. Append mode keeps no state.
//!
//! Every decision is a reconciliation of the key's current state, not a reaction to an
//! event, which is what makes replayed side records and re-processed left records harmless:
//! - left record, no right match → emit it, flag 1;
//! - left record, right match → suppress it, flag 0; emit a tombstone if the flag was 1, or
//!   if a crash may have left an earlier attempt's value on the output (`Ctx::recovering`);
//! - right key present and flag 1 → tombstone, flag 0;
//! - right key absent and flag 0 → emit the stored left record again, flag 1.

use std::sync::Arc;

use rdkafka::message::{Message, OwnedMessage};
use sieve_core::dlq::{Reason, Rejected};
use sieve_core::operator::{Ctx, Operator};
use sieve_core::record::Output;
use sieve_core::store::DEFAULT_CF;
use sieve_core::Result;
use sieve_formats::jsonkey;

use super::config::{OutputMode, StreamArgs};
use super::metrics as m;
use super::skew::{SkewBoard, TopKeys};
use super::view::SharedView;

/// Marks records written again after their right match was deleted.
pub const REEMIT_HEADER: &str = "sieve-antijoin-reemit";
const EMITTED: u8 = 1;
const SUPPRESSED: u8 = 0;
/// Skew gauges are refreshed every this many left records.
const SKEW_EVERY: u64 = 10_000;

/// Why the anti-join sends a left record to its DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    NoPayload,
    BadJson,
    MissingKey,
    KeyNotScalar,
    KeyTooLong,
}

impl Reject {
    fn of_key(e: &jsonkey::KeyError) -> Self {
        match e {
            jsonkey::KeyError::BadJson(_) => Reject::BadJson,
            jsonkey::KeyError::Missing(_) => Reject::MissingKey,
            jsonkey::KeyError::NotScalar(_) => Reject::KeyNotScalar,
        }
    }
}

impl Reason for Reject {
    const STAGE: &'static str = "antijoin";
    fn as_str(self) -> &'static str {
        match self {
            Reject::NoPayload => "no_payload",
            Reject::BadJson => "bad_json",
            Reject::MissingKey => "missing_key",
            Reject::KeyNotScalar => "key_not_scalar",
            Reject::KeyTooLong => "key_too_long",
        }
    }
}

pub struct AntiJoin {
    cfg: Arc<StreamArgs>,
    right: SharedView,
    partition: i32,
    skew: TopKeys,
    board: SkewBoard,
}

impl AntiJoin {
    pub fn new(cfg: Arc<StreamArgs>, right: SharedView, partition: i32, board: SkewBoard) -> Self {
        AntiJoin {
            skew: TopKeys::new(cfg.hot_keys),
            cfg,
            right,
            partition,
            board,
        }
    }

    fn reject(&self, rec: &OwnedMessage, reason: Reject, detail: String) -> Output {
        Rejected::new(reason, detail).dead_letter(rec, &self.cfg.dlq)
    }

    fn join_key(&self, rec: &OwnedMessage) -> std::result::Result<Vec<u8>, Output> {
        let Some(payload) = rec.payload() else {
            return Err(self.reject(rec, Reject::NoPayload, "left record has no payload".into()));
        };
        let key = jsonkey::extract(payload, &self.cfg.key)
            .map_err(|e| self.reject(rec, Reject::of_key(&e), e.to_string()))?;
        if key.len() > self.cfg.max_key_bytes {
            let detail = format!(
                "join key of {} bytes exceeds the limit of {}",
                key.len(),
                self.cfg.max_key_bytes
            );
            return Err(self.reject(rec, Reject::KeyTooLong, detail));
        }
        Ok(key)
    }

    fn value(&self, key: &[u8], payload: &[u8]) -> Output {
        Output::new(&self.cfg.out).key(key).payload(payload)
    }

    fn tombstone(&self, key: &[u8]) -> Output {
        m::retraction();
        Output::new(&self.cfg.out).key(key)
    }
}

fn entry(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 1);
    v.push(flag);
    v.extend_from_slice(payload);
    v
}

/// Writes `new` unless the key already holds it: a retried record (the same key and bytes)
/// then costs no state write and no changelog record.
fn put_if_changed(ctx: &mut Ctx<'_>, key: &[u8], stored: Option<Vec<u8>>, new: Vec<u8>) {
    if stored.as_deref() != Some(new.as_slice()) {
        ctx.put(DEFAULT_CF, key, &new);
    }
}

impl Operator for AntiJoin {
    fn process(&mut self, rec: &OwnedMessage, ctx: &mut Ctx<'_>) -> Result<()> {
        let key = match self.join_key(rec) {
            Ok(k) => k,
            Err(dlq) => {
                ctx.emit(dlq);
                return Ok(());
            }
        };
        self.skew.observe(&key);
        if self.skew.total().is_multiple_of(SKEW_EVERY) {
            self.board.publish(self.partition, &self.skew);
        }
        let payload = rec.payload().unwrap_or_default();
        let matched = self.right.lock().contains(&key)?;
        if matched {
            m::matched();
        } else {
            m::emitted();
        }
        match self.cfg.output_mode {
            OutputMode::Append => {
                if !matched {
                    ctx.emit(Output::copy_of(&self.cfg.out, rec).key(key));
                }
            }
            OutputMode::Retract if matched => {
                let stored = ctx.get(DEFAULT_CF, &key)?;
                let was_emitted = stored.as_ref().and_then(|v| v.first().copied()) == Some(EMITTED);
                put_if_changed(ctx, &key, stored, entry(SUPPRESSED, payload));
                if was_emitted || ctx.recovering() {
                    ctx.emit(self.tombstone(&key));
                }
            }
            OutputMode::Retract => {
                let stored = ctx.get(DEFAULT_CF, &key)?;
                put_if_changed(ctx, &key, stored, entry(EMITTED, payload));
                ctx.emit(Output::copy_of(&self.cfg.out, rec).key(key));
            }
        }
        Ok(())
    }

    fn on_side(&mut self, records: &[OwnedMessage], ctx: &mut Ctx<'_>) -> Result<()> {
        if self.cfg.output_mode == OutputMode::Append {
            return Ok(());
        }
        for rec in records {
            let Some(key) = rec.key() else { continue };
            let Some(stored) = ctx.get(DEFAULT_CF, key)? else {
                continue;
            };
            let Some((&flag, payload)) = stored.split_first() else {
                continue;
            };
            let matched = self.right.lock().contains(key)?;
            if matched && flag == EMITTED {
                ctx.emit(self.tombstone(key));
                ctx.put(DEFAULT_CF, key, &entry(SUPPRESSED, payload));
            } else if !matched && flag == SUPPRESSED {
                m::reemit();
                ctx.emit(self.value(key, payload).header(REEMIT_HEADER, "1"));
                ctx.put(DEFAULT_CF, key, &stored_as_emitted(&stored));
            }
        }
        Ok(())
    }

    fn flush(&mut self, _ctx: &mut Ctx<'_>, _closing: bool) -> Result<()> {
        if self.skew.total() > 0 {
            self.board.publish(self.partition, &self.skew);
        }
        Ok(())
    }
}

fn stored_as_emitted(stored: &[u8]) -> Vec<u8> {
    let mut v = stored.to_vec();
    v[0] = EMITTED;
    v
}
