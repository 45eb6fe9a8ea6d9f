//! Per-notification counts by status: stored in each partition's state (so they are
//! exactly-once and rebuilt from the changelog), mirrored in memory for
//! `GET /v1/notifications/{id}`. The deliverer and the feedback processor each serve the counts
//! they keep.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use sieve_core::operator::Ctx;
use sieve_core::store::{PartitionStore, DEFAULT_CF};
use sieve_core::Result;

use crate::model::Counts;
use crate::planner::to_json;

const COUNTS_PREFIX: &str = "c/";

/// Counts of every notification this instance's partitions have seen.
#[derive(Clone, Default)]
pub struct CountsBoard(Arc<Mutex<BTreeMap<i32, BTreeMap<String, Counts>>>>);

impl CountsBoard {
    fn set(&self, partition: i32, id: &str, counts: Counts) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(partition)
            .or_default()
            .insert(id.to_string(), counts);
    }

    pub fn get(&self, id: &str) -> Option<Counts> {
        let board = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut total: Option<Counts> = None;
        for part in board.values() {
            if let Some(c) = part.get(id) {
                total.get_or_insert_with(Counts::default).merge(c);
            }
        }
        total
    }

    /// Loads a partition's stored counts when it opens.
    pub fn load(&self, partition: i32, store: &PartitionStore) -> Result<()> {
        store.for_each_prefix(DEFAULT_CF, COUNTS_PREFIX.as_bytes(), |k, v| {
            if let Ok(c) = serde_json::from_slice::<Counts>(v) {
                let id = String::from_utf8_lossy(&k[COUNTS_PREFIX.len()..]).into_owned();
                self.set(partition, &id, c);
            }
            Ok(())
        })
    }

    /// Adds `counts` to the notification's stored counts (committed with the batch).
    pub fn add(&self, partition: i32, id: &str, counts: &Counts, ctx: &mut Ctx<'_>) -> Result<()> {
        let key = format!("{COUNTS_PREFIX}{id}");
        let mut total: Counts = ctx
            .get(DEFAULT_CF, key.as_bytes())?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default();
        total.merge(counts);
        ctx.put(DEFAULT_CF, key.as_bytes(), &to_json(&total)?);
        self.set(partition, id, total);
        Ok(())
    }

    /// `GET /v1/notifications/{id}`: counts by status over this instance's partitions.
    pub fn routes(&self) -> Router {
        let board = self.clone();
        Router::new().route(
            "/v1/notifications/{id}",
            get(move |Path(id): Path<String>| {
                let board = board.clone();
                async move {
                    match board.get(&id) {
                        Some(c) => Ok(Json(serde_json::json!({"notification_id": id, "counts": c}))),
                        None => Err((
                            StatusCode::NOT_FOUND,
                            Json(serde_json::json!({"error": "unknown notification", "notification_id": id})),
                        )),
                    }
                }
            }),
        )
    }
}
