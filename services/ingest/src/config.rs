//! `sieve ingest serve` and `sieve ingest file` settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use sieve_core::config::{KafkaArgs, LogFormat};

use crate::validate::RecordLimits;

/// Where streams and schemas come from, and where bad records go.
#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    /// Directory of the JSON Schemas the streams file names.
    #[arg(long, env = "SIEVE_INGEST_SCHEMAS", default_value = "schemas")]
    pub schemas: PathBuf,
    /// Streams file: stream name → topic, schema, key and idempotency fields, salting.
    #[arg(
        long,
        env = "SIEVE_INGEST_STREAMS",
        default_value = "deploy/streams.toml"
    )]
    pub streams: PathBuf,
    /// Topic for rejected records (original bytes, reason headers).
    #[arg(long, env = "SIEVE_INGEST_DLQ", default_value = "dlq.ingest")]
    pub dlq: String,
    /// Largest record, in bytes (larger: `record_too_large`).
    #[arg(long, env = "SIEVE_INGEST_MAX_RECORD_BYTES", default_value_t = 1 << 20)]
    pub max_record_bytes: usize,
    /// Deepest nesting of objects and arrays in a record.
    #[arg(long, env = "SIEVE_INGEST_MAX_DEPTH", default_value_t = 32)]
    pub max_depth: usize,
}

impl StreamArgs {
    pub fn limits(&self) -> RecordLimits {
        RecordLimits {
            max_record_bytes: self.max_record_bytes,
            max_depth: self.max_depth,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the HTTP API (also serves /metrics, /healthz, /readyz, /openapi.json).
    #[arg(long, env = "SIEVE_INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// A second address for /metrics, /healthz and /readyz only (e.g. a private port).
    #[arg(long, env = "SIEVE_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// API keys file (TOML: key, tenant, streams, records_per_sec, burst).
    #[arg(long, env = "SIEVE_INGEST_API_KEYS_FILE")]
    pub api_keys: Option<PathBuf>,
    /// API keys inline: `key@tenant:stream,stream;key@tenant:*`.
    #[arg(long, env = "SIEVE_INGEST_API_KEYS", hide_env_values = true)]
    pub api_keys_inline: Option<String>,
    /// Largest request body, in bytes, after gzip decompression.
    #[arg(long, env = "SIEVE_INGEST_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Most records in one request.
    #[arg(long, env = "SIEVE_INGEST_MAX_RECORDS", default_value_t = 10_000)]
    pub max_records: usize,
    /// Records produced but not yet acknowledged, over all requests: above it, 429.
    #[arg(long, env = "SIEVE_INGEST_INFLIGHT_RECORDS", default_value_t = 100_000)]
    pub inflight_records: usize,
    /// Requests being handled at once: above it, 429 (bounds memory to this × max body).
    #[arg(long, env = "SIEVE_INGEST_MAX_REQUESTS", default_value_t = 256)]
    pub max_requests: usize,
    /// How long a request waits for the broker's acknowledgements before answering 503.
    #[arg(long, env = "SIEVE_INGEST_ACK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub ack_timeout: Duration,
    /// How long a client may take to send a request's body before it is answered 408.
    #[arg(long, env = "SIEVE_INGEST_BODY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,
    /// Serve HTTPS with this PEM certificate chain (with `--tls-key`).
    #[arg(long, env = "SIEVE_INGEST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "SIEVE_INGEST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "SIEVE_INGEST_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    #[arg(long, env = "SIEVE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub streams: StreamArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

#[derive(Debug, Clone, Args)]
pub struct FileArgs {
    /// NDJSON or JSON-array files (plain, gzip or zstd); `-` is stdin (not resumable).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// The stream the records belong to (its topic, schema and keys).
    #[arg(long)]
    pub stream: String,
    /// Directory of checkpoints (one file per input file identity).
    #[arg(
        long,
        env = "SIEVE_INGEST_CHECKPOINTS",
        default_value = ".sieve-ingest"
    )]
    pub checkpoint_dir: PathBuf,
    /// Ignore any checkpoint and load from the start.
    #[arg(long)]
    pub restart: bool,
    /// Time between checkpoint writes: what a rerun after a crash produces again is at most
    /// this much of the load.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub checkpoint_every: Duration,
    /// Fail (exit 2) when rejected / read exceeds this share.
    #[arg(long, default_value_t = 0.01)]
    pub max_error_rate: f64,
    /// Validate and count only: nothing is produced, no checkpoint is written.
    #[arg(long)]
    pub dry_run: bool,
    /// Records produced and not yet acknowledged (bounds memory).
    #[arg(long, default_value_t = 20_000)]
    pub inflight_records: usize,
    /// Time between progress log lines when stderr is not a terminal (at least 1s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub log_every: Duration,
    /// Never draw a progress bar, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub streams: StreamArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}
