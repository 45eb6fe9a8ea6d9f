//! `scripts/broker.sh` refuses what it cannot run with one line naming the cause: a taken
//! port, a missing Java, a data directory Kafka cannot use; and a restart keeps the data.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use sieve_tests::{broker_script, free_port, unique, Broker};

/// `broker.sh ARGS` with its data in `dir` and `path` as PATH: exit code and stderr.
fn broker_sh(args: &[&str], dir: &Path, path: Option<&str>) -> Result<(i32, String)> {
    let mut cmd = Command::new(broker_script());
    cmd.args(args).env("SIEVE_BROKER_DIR", dir);
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let out = cmd.output().context("running scripts/broker.sh")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// One line on stderr, starting `broker:`, holding `cause`.
fn one_clear_line(code: i32, stderr: &str, cause: &str) -> Result<()> {
    let lines: Vec<&str> = stderr.lines().collect();
    ensure!(
        code != 0 && lines.len() == 1 && lines[0].starts_with("broker: ") && stderr.contains(cause),
        "exit {code}, expected one line about {cause:?}:\n{stderr}"
    );
    Ok(())
}

#[test]
fn a_taken_port_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port().to_string();
    let (code, err) = broker_sh(&["start", &port], dir.path(), None)?;
    one_clear_line(code, &err, &format!("port {port} on 127.0.0.1 is taken"))
}

#[test]
fn a_missing_java_is_named() -> Result<()> {
    // A PATH with the tools the script uses, and no java.
    let dir = tempfile::tempdir()?;
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin)?;
    for tool in [
        "bash", "sed", "cat", "python3", "mkdir", "ls", "grep", "tail", "sleep", "rm", "mv", "seq",
        "dirname", "touch",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()?;
        let target = PathBuf::from(String::from_utf8_lossy(&found.stdout).trim());
        std::os::unix::fs::symlink(&target, bin.join(tool))?;
    }
    let (code, err) = broker_sh(
        &["start", &free_port().to_string()],
        dir.path(),
        bin.to_str(),
    )?;
    one_clear_line(code, &err, "java not found")
}

#[test]
fn a_corrupt_data_dir_is_named_and_a_restart_keeps_data() -> Result<()> {
    // Files that are not Kafka's: refused before the JVM starts.
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("node-1/data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("notes.txt"), "not kafka")?;
    let (code, err) = broker_sh(&["start", &free_port().to_string()], dir.path(), None)?;
    one_clear_line(code, &err, "not a Kafka data directory")?;

    // Data kept across a restart (harness broker: SIGKILL, then the same node again).
    let mut broker = Broker::start()?;
    let topic = unique("kept");
    broker.create_topic(&topic, 2)?;
    broker.produce(&topic, (0..100).map(|i| (format!("k{i}"), "v")))?;
    broker.restart()?;
    ensure!(
        broker.read_all(&topic)?.len() == 100,
        "a restart lost records"
    );
    drop(broker);

    // A node whose metadata was damaged after it ran: Kafka's own reason, in one line.
    let dir = tempfile::tempdir()?;
    let stop = Stop(dir.path().to_path_buf());
    let port = free_port().to_string();
    let (code, err) = broker_sh(&["start", &port], dir.path(), None)?;
    ensure!(code == 0, "{err}");
    broker_sh(&["stop"], dir.path(), None)?;
    std::fs::write(dir.path().join("node-1/data/meta.properties"), "garbage\n")?;
    let (code, err) = broker_sh(&["start", &port], dir.path(), None)?;
    drop(stop);
    one_clear_line(code, &err, "node ID not found")
}

/// Stops what `broker.sh start` started in a directory, however the test ends.
struct Stop(PathBuf);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = broker_sh(&["stop"], &self.0, None);
    }
}
