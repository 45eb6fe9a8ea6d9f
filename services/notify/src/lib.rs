//! Notification fan-out: `sieve notify planner` expands requests into recipient tasks,
//! `sieve notify deliver` applies preferences, quiet hours, relevance, rate limits and dedup
//! and writes one record per channel. Both run on the core runtime (exactly-once) with
//! strict priority between `p0` … `p3` (docs/notify.md).

pub mod config;
pub mod counts;
pub mod deliverer;
pub mod feedback;
pub mod metrics;
pub mod model;
pub mod planner;
pub mod rules;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use rdkafka::producer::FutureRecord;
use sieve_core::config::{KafkaArgs, ServiceArgs};
use sieve_core::kafka::Clients;
use sieve_core::operator::OperatorFactory;
use sieve_core::side::{KvTable, SideMode, SideTable};
use sieve_core::store::PartitionStore;
use sieve_core::Result;

use config::by_priority;
pub use config::{DelivererArgs, FeedbackArgs, PlannerArgs};
use counts::CountsBoard;
use deliverer::Deliverer;
use feedback::Feedback;
use planner::Planner;

fn priorities(topics: &[String], guard: Duration) -> Option<(BTreeMap<String, u8>, Duration)> {
    Some((
        topics
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u8))
            .collect(),
        guard,
    ))
}

fn side_path(service: &ServiceArgs, name: &str) -> std::path::PathBuf {
    sieve_core::paths::group_dir(&service.state_dir, &service.group).join(name)
}

/// The smallest partition count of the task topics: planned shards must exist on every one.
fn task_partitions(kafka: &KafkaArgs, tasks: &str) -> Result<u32> {
    let clients = Clients::new(kafka.clone());
    clients.check_reachable()?;
    let reader = clients.reader()?;
    let mut n = i32::MAX;
    for t in by_priority(tasks) {
        n = n.min(clients.partition_count(&reader, &t)?);
    }
    Ok(n.max(1) as u32)
}

pub struct PlannerFactory {
    cfg: Arc<PlannerArgs>,
    graph: KvTable,
    task_partitions: u32,
}

impl PlannerFactory {
    pub fn open(cfg: PlannerArgs, service: &ServiceArgs, task_partitions: u32) -> Result<Self> {
        metrics::describe();
        let graph = KvTable::open(
            &side_path(service, "graph"),
            vec![cfg.follows.clone()],
            SideMode::Broadcast,
            Box::new(move |rec| planner::follow_writes(rec, task_partitions)),
        )?;
        Ok(PlannerFactory {
            cfg: Arc::new(cfg),
            graph,
            task_partitions,
        })
    }
}

impl OperatorFactory for PlannerFactory {
    type Op = Planner;

    fn inputs(&self) -> Vec<String> {
        by_priority(&self.cfg.requests)
    }

    fn outputs(&self) -> Vec<String> {
        let mut out = by_priority(&self.cfg.tasks);
        // Continuation records go back to the request topics.
        out.extend(by_priority(&self.cfg.requests));
        out.push(self.cfg.status.clone());
        out.push(self.cfg.dlq.clone());
        out
    }

    fn open(&self, topic: &str, partition: i32, _store: &PartitionStore) -> Result<Planner> {
        Ok(Planner::new(
            self.cfg.clone(),
            self.graph.clone(),
            self.task_partitions,
            (topic.to_string(), partition),
        ))
    }

    fn side_table(&mut self) -> Option<&mut dyn SideTable> {
        Some(&mut self.graph)
    }

    fn priorities(&self) -> Option<(BTreeMap<String, u8>, Duration)> {
        priorities(&self.inputs(), self.cfg.starvation_guard)
    }
}

pub struct DelivererFactory {
    cfg: Arc<DelivererArgs>,
    users: KvTable,
    board: CountsBoard,
}

impl DelivererFactory {
    pub fn open(cfg: DelivererArgs, service: &ServiceArgs) -> Result<Self> {
        metrics::describe();
        let (prefs_topic, tokens_topic) = (cfg.prefs.clone(), cfg.invalid_tokens.clone());
        let users = KvTable::open(
            &side_path(service, "users"),
            vec![
                cfg.prefs.clone(),
                cfg.control.clone(),
                cfg.invalid_tokens.clone(),
            ],
            SideMode::Broadcast,
            Box::new(move |rec| deliverer::user_table_writes(rec, &prefs_topic, &tokens_topic)),
        )?;
        Ok(DelivererFactory {
            cfg: Arc::new(cfg),
            users,
            board: CountsBoard::default(),
        })
    }
}

impl OperatorFactory for DelivererFactory {
    type Op = Deliverer;

    fn inputs(&self) -> Vec<String> {
        by_priority(&self.cfg.tasks)
    }

    fn outputs(&self) -> Vec<String> {
        let mut out: Vec<String> = model::Channel::ALL
            .iter()
            .map(|c| format!("{}.{}", self.cfg.out, c.name()))
            .collect();
        out.push(self.cfg.status.clone());
        out.push(self.cfg.dlq.clone());
        out
    }

    fn open(&self, _topic: &str, partition: i32, store: &PartitionStore) -> Result<Deliverer> {
        self.board.load(partition, store)?;
        Deliverer::open(
            self.cfg.clone(),
            self.users.clone(),
            partition,
            self.board.clone(),
            store,
        )
    }

    fn side_table(&mut self) -> Option<&mut dyn SideTable> {
        Some(&mut self.users)
    }

    fn priorities(&self) -> Option<(BTreeMap<String, u8>, Duration)> {
        priorities(&self.inputs(), self.cfg.starvation_guard)
    }
}

/// Runs the planner until SIGTERM/SIGINT.
pub fn run_planner(kafka: &KafkaArgs, service: &ServiceArgs, args: PlannerArgs) -> Result<()> {
    let parts = task_partitions(kafka, &args.tasks)?;
    let factory = PlannerFactory::open(args, service, parts)?;
    sieve_core::service::run_processor(factory, kafka, service, Router::new())
}

/// Runs the deliverer until SIGTERM/SIGINT, with a clock tick on the P3 task partitions.
pub fn run_deliverer(kafka: &KafkaArgs, service: &ServiceArgs, args: DelivererArgs) -> Result<()> {
    let mut service = service.clone();
    service.batch_records = args.tasks_per_batch.max(1);
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (clients, topic, every, stop) = (
            Clients::new(kafka.clone()),
            format!("{}.p3", args.tasks),
            args.tick,
            stop.clone(),
        );
        std::thread::spawn(move || tick(&clients, &topic, every, &stop))
    };
    let factory = DelivererFactory::open(args, &service)?;
    let routes = factory.board.routes();
    let result = sieve_core::service::run_processor(factory, kafka, &service, routes);
    stop.store(true, Ordering::SeqCst);
    let _ = ticker.join();
    result
}

pub struct FeedbackFactory {
    cfg: Arc<FeedbackArgs>,
    board: CountsBoard,
}

impl FeedbackFactory {
    pub fn new(args: FeedbackArgs) -> Self {
        FeedbackFactory {
            cfg: Arc::new(args),
            board: CountsBoard::default(),
        }
    }

    /// The delivery counts the processor serves over HTTP.
    pub fn board(&self) -> &CountsBoard {
        &self.board
    }
}

impl OperatorFactory for FeedbackFactory {
    type Op = Feedback;

    fn inputs(&self) -> Vec<String> {
        vec![self.cfg.feedback.clone()]
    }

    fn outputs(&self) -> Vec<String> {
        vec![
            self.cfg.status.clone(),
            self.cfg.invalid_tokens.clone(),
            self.cfg.dlq.clone(),
        ]
    }

    fn open(&self, _topic: &str, partition: i32, store: &PartitionStore) -> Result<Feedback> {
        self.board.load(partition, store)?;
        Ok(Feedback::new(
            self.cfg.clone(),
            partition,
            self.board.clone(),
        ))
    }
}

/// Runs the gateway feedback processor until SIGTERM/SIGINT.
pub fn run_feedback(kafka: &KafkaArgs, service: &ServiceArgs, args: FeedbackArgs) -> Result<()> {
    metrics::describe();
    let factory = FeedbackFactory::new(args);
    let routes = factory.board().routes();
    sieve_core::service::run_processor(factory, kafka, service, routes)
}

/// Writes `{"tick":true}` to every partition of `topic` every `every` until `stop`.
fn tick(clients: &Clients, topic: &str, every: Duration, stop: &AtomicBool) {
    let run = || -> Result<()> {
        let producer = clients.producer()?;
        let reader = clients.reader()?;
        let partitions = clients.partition_count(&reader, topic)?;
        let step = Duration::from_millis(100);
        let mut waited = Duration::ZERO;
        while !stop.load(Ordering::SeqCst) {
            if waited >= every {
                waited = Duration::ZERO;
                for p in 0..partitions {
                    let rec = FutureRecord::<[u8], [u8]>::to(topic)
                        .partition(p)
                        .payload(br#"{"tick":true}"#);
                    if let Err((e, _)) = producer.send_result(rec) {
                        tracing::warn!(error = %e, topic, "tick not queued");
                    }
                }
            }
            std::thread::sleep(step);
            waited += step;
        }
        Ok(())
    };
    if let Err(e) = run() {
        tracing::warn!(error = %e, "clock ticks stopped: deferred deliveries wait for the next task");
    }
}
