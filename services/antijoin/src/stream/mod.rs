//! `sieve antijoin stream`: the continuous anti-join over topics. Left records stream
//! through the core runtime (exactly-once); the right side is a side table every instance
//! materialises into RocksDB with a Bloom filter in front (docs/antijoin.md).

pub mod config;
pub mod metrics;
pub mod operator;
pub mod skew;
pub mod view;

use std::sync::Arc;

use axum::routing::get;
use axum::{Json, Router};
use sieve_core::config::{KafkaArgs, ServiceArgs};
use sieve_core::operator::OperatorFactory;
use sieve_core::side::SideTable;
use sieve_core::store::PartitionStore;

pub use config::{OutputMode, StreamArgs};
use operator::AntiJoin;
use skew::SkewBoard;
use view::{RightView, SharedView};

pub struct StreamFactory {
    cfg: Arc<StreamArgs>,
    right: SharedView,
    board: SkewBoard,
}

impl OperatorFactory for StreamFactory {
    type Op = AntiJoin;

    fn inputs(&self) -> Vec<String> {
        vec![self.cfg.left.clone()]
    }

    fn outputs(&self) -> Vec<String> {
        vec![self.cfg.out.clone(), self.cfg.dlq.clone()]
    }

    fn open(
        &self,
        _topic: &str,
        partition: i32,
        _store: &PartitionStore,
    ) -> sieve_core::Result<AntiJoin> {
        Ok(AntiJoin::new(
            self.cfg.clone(),
            self.right.clone(),
            partition,
            self.board.clone(),
        ))
    }

    fn side_table(&mut self) -> Option<&mut dyn SideTable> {
        Some(&mut self.right)
    }
}

impl StreamFactory {
    /// Opens this instance's right-side table under the service's state directory.
    pub fn open(args: StreamArgs, service: &ServiceArgs) -> sieve_core::Result<Self> {
        metrics::describe();
        let path = sieve_core::paths::group_dir(&service.state_dir, &service.group)
            .join(format!("right-{}", args.right));
        let right = SharedView::new(RightView::open(
            &path,
            &args.right,
            args.placement,
            args.bloom_fp,
        )?);
        Ok(StreamFactory {
            cfg: Arc::new(args),
            right,
            board: SkewBoard::default(),
        })
    }

    /// `GET /skew`: each partition's heaviest left keys.
    fn routes(&self) -> Router {
        let board = self.board.clone();
        Router::new().route(
            "/skew",
            get(move || {
                let board = board.clone();
                async move { Json(board.snapshot()) }
            }),
        )
    }
}

/// Runs the stream anti-join until SIGTERM/SIGINT.
pub fn run(kafka: &KafkaArgs, service: &ServiceArgs, args: StreamArgs) -> sieve_core::Result<()> {
    let factory = StreamFactory::open(args, service)?;
    let routes = factory.routes();
    sieve_core::service::run_processor(factory, kafka, service, routes)
}
