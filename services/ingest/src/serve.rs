//! `sieve ingest serve`: the HTTP server's lifecycle. Ready while the brokers answer;
//! on SIGTERM: not ready, stop accepting, finish in-flight requests, flush the producer.

use std::sync::Arc;
use std::time::Duration;

use sieve_core::kafka::Clients;
use sieve_core::telemetry::{self, Health};
use tokio::sync::{watch, Semaphore};

use crate::auth::ApiKeys;
use crate::check::BodyLimits;
use crate::config::ServeArgs;
use crate::error::{IngestError, Result};
use crate::http::{self, App};
use crate::producer::Sink;
use crate::streams::Registry;

/// Runs the server until SIGTERM/SIGINT.
pub fn run(args: &ServeArgs) -> Result<()> {
    crate::metrics::describe();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("sieve-ingest")
        .enable_all()
        .build()
        .map_err(|e| IngestError::io("tokio runtime", e))?;
    rt.block_on(serve(args))
}

fn load_keys(args: &ServeArgs) -> Result<ApiKeys> {
    let keys = match (&args.api_keys, &args.api_keys_inline) {
        (Some(path), _) => ApiKeys::from_file(path)?,
        (None, Some(inline)) => ApiKeys::from_env_value(inline)?,
        (None, None) => ApiKeys::default(),
    };
    if keys.is_empty() {
        return Err(IngestError::Config(
            "no API keys: give --api-keys FILE or SIEVE_INGEST_API_KEYS".into(),
        ));
    }
    Ok(keys)
}

async fn serve(args: &ServeArgs) -> Result<()> {
    let registry = Registry::load(&args.streams.streams, &args.streams.schemas)?;
    let keys = load_keys(args)?;
    let clients = Clients::new(args.kafka.clone());
    check_topics(&clients, &registry, &args.streams.dlq).await?;
    let budget = args.inflight_records.max(args.max_records);
    let app = Arc::new(App {
        registry,
        keys,
        sink: Sink::new(clients, budget, args.ack_timeout)?,
        limits: BodyLimits {
            max_body_bytes: args.max_body_bytes,
            max_records: args.max_records,
            record: args.streams.limits(),
        },
        body_timeout: args.body_timeout,
        dlq: args.streams.dlq.clone(),
        requests: Arc::new(Semaphore::new(args.max_requests.max(1))),
    });
    let health = Health::new();
    health.set_live(true);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(readiness(app.clone(), health.clone(), stop_rx.clone()));
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(telemetry::tls_acceptor(cert, key)?),
        _ => None,
    };
    let server = telemetry::serve_tls(
        args.listen,
        health.clone(),
        http::router(app.clone()),
        tls,
        stopped(stop_rx.clone()),
    )
    .await?;
    let side = match args.metrics_addr {
        Some(addr) => Some(
            telemetry::serve(addr, health.clone(), axum::Router::new(), stopped(stop_rx)).await?,
        ),
        None => None,
    };
    tracing::info!(listen = %args.listen, streams = ?app.registry.names().collect::<Vec<_>>(), "ingest serving");
    sieve_core::service::wait_for_signal().await;
    tracing::info!("shutdown requested: draining in-flight requests");
    health.set_joined(false);
    let _ = stop_tx.send(true);
    let drain = args.drain_timeout;
    if tokio::time::timeout(drain, server).await.is_err() {
        tracing::warn!(?drain, "requests still running after the drain timeout");
    }
    if let Some(side) = side {
        let _ = tokio::time::timeout(Duration::from_secs(1), side).await;
    }
    let flushed = {
        let app = app.clone();
        tokio::task::spawn_blocking(move || app.sink.flush(drain)).await
    };
    match flushed {
        Ok(Ok(())) => tracing::info!("producer flushed; bye"),
        Ok(Err(e)) => tracing::warn!(error = %e, "producer flush incomplete"),
        Err(e) => tracing::warn!(error = %e, "flush task failed"),
    }
    Ok(())
}

/// Every topic must exist before the first request (the broker may not auto-create). A
/// broker that cannot be reached is not fatal: the server starts, not ready, answering 503.
async fn check_topics(clients: &Clients, registry: &Registry, dlq: &str) -> Result<()> {
    let clients = clients.clone();
    let mut topics = registry.topics();
    topics.push(dlq.to_string());
    tokio::task::spawn_blocking(move || {
        if clients.check_reachable().is_err() {
            tracing::warn!(
                brokers = clients.brokers(),
                "brokers unreachable at start: not ready until they answer"
            );
            return Ok(());
        }
        let reader = clients.reader()?;
        for t in &topics {
            clients.partition_count(&reader, t)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| IngestError::Kafka(format!("topic check: {e}")))?
}

/// Ready while the brokers answer metadata requests.
async fn readiness(app: Arc<App>, health: Arc<Health>, mut stop: watch::Receiver<bool>) {
    loop {
        let a = app.clone();
        let ok =
            tokio::task::spawn_blocking(move || a.sink.broker_reachable(Duration::from_secs(2)))
                .await
                .unwrap_or(false);
        if *stop.borrow() {
            return;
        }
        health.set_joined(ok);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => return,
        }
    }
}
