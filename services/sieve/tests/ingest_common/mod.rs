//! Shared by the ingest end-to-end tests: a `sieve ingest serve` child process on a free
//! port with a test streams file and keys, and a small HTTP client. Each test binary uses
//! part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use sieve_tests::{free_port, wait_for, Service};

pub const BIN: &str = env!("CARGO_BIN_EXE_sieve");

pub fn schemas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

pub const KEY: &str = "test-key-good";
pub const KEY_RESTRICTED: &str = "test-key-restricted";
/// 5 records per second, burst 5.
pub const KEY_LIMITED: &str = "test-key-limited";

pub fn keys_toml() -> String {
    format!(
        "[[keys]]\nkey = \"{KEY}\"\ntenant = \"acme\"\nstreams = [\"*\"]\n\n\
         [[keys]]\nkey = \"{KEY_RESTRICTED}\"\ntenant = \"narrow\"\nstreams = [\"users\"]\n\n\
         [[keys]]\nkey = \"{KEY_LIMITED}\"\ntenant = \"slow\"\nstreams = [\"*\"]\nrecords_per_sec = 5\nburst = 5\n"
    )
}

/// One valid `events` record (event.schema.json) with this id.
pub fn event(id: &str) -> String {
    format!(r#"{{"event_id":"{id}","user_id":"u-{id}","type":"purchase","amount_cents":100}}"#)
}

/// A running `sieve ingest serve`.
pub struct Ingest {
    pub svc: Service,
    pub port: u16,
}

impl Ingest {
    /// Starts the server with `streams` (TOML) and the test keys; waits until it is live.
    pub fn start(
        brokers: &str,
        dlq: &str,
        streams: &str,
        extra: &[&str],
        dir: &Path,
    ) -> Result<Ingest> {
        Self::start_with_env(brokers, dlq, streams, extra, &[], dir)
    }

    /// [`Ingest::start`] with extra environment variables (e.g. `RUST_LOG`).
    pub fn start_with_env(
        brokers: &str,
        dlq: &str,
        streams: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        dir: &Path,
    ) -> Result<Ingest> {
        let streams_file = dir.join(format!("{}.toml", sieve_tests::unique("streams")));
        std::fs::write(&streams_file, streams)?;
        let keys_file = dir.join("keys.toml");
        std::fs::write(&keys_file, keys_toml())?;
        let port = free_port();
        let mut args: Vec<String> = vec![
            "ingest".into(),
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--brokers".into(),
            brokers.into(),
            "--schemas".into(),
            schemas().display().to_string(),
            "--streams".into(),
            streams_file.display().to_string(),
            "--api-keys".into(),
            keys_file.display().to_string(),
            "--dlq".into(),
            dlq.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut svc = Service::spawn(Path::new(BIN), &args, env, dir)?;
        // The metrics port: plain HTTP even when the API port serves TLS. It starts after
        // the API port, so the API is listening once it answers.
        let live = wait_for("ingest to listen", Duration::from_secs(30), || {
            if svc.exited().is_some() {
                return Some(false);
            }
            svc.get("/healthz").filter(|(s, _)| *s == 200).map(|_| true)
        })?;
        anyhow::ensure!(live, "ingest exited at start:\n{}", svc.logs());
        Ok(Ingest { svc, port })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn post(
        &self,
        stream: &str,
        content_type: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        post(
            &self.url(&format!("/v1/events/{stream}")),
            content_type,
            headers,
            body,
        )
    }

    /// POST with the good key.
    pub fn send(&self, stream: &str, content_type: &str, idem: Option<&str>, body: &str) -> Resp {
        let auth = format!("Bearer {KEY}");
        let mut h = vec![("Authorization", auth.as_str())];
        if let Some(k) = idem {
            h.push(("Idempotency-Key", k));
        }
        self.post(stream, content_type, &h, body.as_bytes())
    }
}

/// An HTTP answer: status, JSON body (Null when not JSON), Retry-After.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub json: serde_json::Value,
    pub retry_after: Option<String>,
    pub content_type: Option<String>,
}

impl Resp {
    pub fn reason(&self) -> &str {
        self.json["reason"].as_str().unwrap_or("")
    }
}

/// `content_type` "none" sends no Content-Type header.
pub fn post(url: &str, content_type: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let mut req = agent.post(url);
    if content_type != "none" {
        req = req.set("Content-Type", content_type);
    }
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let resp = match req.send_bytes(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => {
            return Resp {
                status: 0,
                json: serde_json::Value::String(format!("transport error: {e}")),
                retry_after: None,
                content_type: None,
            }
        }
    };
    let status = resp.status();
    let retry_after = resp.header("retry-after").map(str::to_string);
    let content_type = resp.header("content-type").map(str::to_string);
    let text = resp.into_string().unwrap_or_default();
    Resp {
        status,
        json: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        retry_after,
        content_type,
    }
}

pub fn ensure_status(r: &Resp, status: u16) -> Result<()> {
    anyhow::ensure!(
        r.status == status,
        "expected {status}, got {} {}",
        r.status,
        r.json
    );
    Ok(())
}

pub fn read_file(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| p.display().to_string())
}
