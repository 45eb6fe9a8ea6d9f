//! `sieve antijoin files` end to end: the real binary on generated inputs with a known
//! answer, JSON arrays and NDJSON, gzip, and a left input far larger than the memory budget.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use sieve::gen::write_json_records;
use sieve::gen::UsersSpec;

const BIN: &str = env!("CARGO_BIN_EXE_sieve");

fn write(
    path: &Path,
    records: impl Iterator<Item = Vec<u8>>,
    array: bool,
    gzip: bool,
) -> Result<()> {
    let file = std::fs::File::create(path)?;
    if gzip {
        let mut w = flate2::write::GzEncoder::new(
            std::io::BufWriter::new(file),
            flate2::Compression::fast(),
        );
        write_json_records(&mut w, records, array)?;
        w.finish()?.flush()?;
    } else {
        let mut w = std::io::BufWriter::new(file);
        write_json_records(&mut w, records, array)?;
        w.flush()?;
    }
    Ok(())
}

/// Runs `sieve antijoin files`; returns its exit code and stderr.
fn antijoin_run(left: &Path, right: &Path, out: &Path, extra: &[&str]) -> Result<(i32, String)> {
    let run = Command::new(BIN)
        .args(["antijoin", "files", "--left"])
        .arg(left)
        .arg("--right")
        .arg(right)
        .arg("--out")
        .arg(out)
        .args(extra)
        .arg("--quiet")
        .output()
        .context("running sieve antijoin files")?;
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    Ok((run.status.code().unwrap_or(-1), stderr))
}

/// Runs `sieve antijoin files`, which must succeed; returns its stderr (the summary) and its
/// peak RSS in bytes.
fn antijoin(left: &Path, right: &Path, out: &Path, extra: &[&str]) -> Result<(String, u64)> {
    let (code, stderr) = antijoin_run(left, right, out, extra)?;
    ensure!(code == 0, "exit {code}: {stderr}");
    Ok((stderr, children_peak_rss()))
}

/// Largest peak RSS among this process's waited-for children (nextest runs each test in
/// its own process, so this is the anti-join's).
#[allow(unsafe_code)]
fn children_peak_rss() -> u64 {
    // SAFETY: getrusage writes into the struct we pass and has no other preconditions.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe {
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
    }
    usage.ru_maxrss as u64 * 1024
}

#[test]
fn ndjson_left_and_gzipped_array_right_give_exactly_the_missing_records() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = UsersSpec {
        legacy: 50_000,
        ids: 40_000,
        ..Default::default()
    };
    let (left, right, out) = (
        dir.path().join("legacy.ndjson"),
        dir.path().join("current.json.gz"),
        dir.path().join("missing.ndjson"),
    );
    write(&left, spec.legacy().map(|(_, r)| r), false, false)?;
    write(&right, spec.current().map(|(_, r)| r), true, true)?;
    let (stderr, _) = antijoin(&left, &right, &out, &[])?;

    let expected: Vec<Vec<u8>> = spec
        .legacy()
        .filter(|(id, _)| !spec.is_current(id))
        .map(|(_, r)| r)
        .collect();
    let got: Vec<Vec<u8>> = std::fs::read(&out)?
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    ensure!(
        got.len() == expected.len(),
        "{} records, expected {}",
        got.len(),
        expected.len()
    );
    ensure!(
        got == expected,
        "output differs from the expected records in input order"
    );
    let emitted = stderr
        .lines()
        .find(|l| l.trim_start().starts_with("emitted"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<usize>().ok());
    ensure!(emitted == Some(expected.len()), "summary: {stderr}");
    Ok(())
}

#[test]
fn keys_only_counts_distinct_missing_keys_from_an_array_left() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = UsersSpec {
        legacy: 30_000,
        ids: 5_000,
        guest_share: 0.2,
        ..Default::default()
    };
    let (left, right, out) = (
        dir.path().join("legacy.json"),
        dir.path().join("current.ndjson"),
        dir.path().join("keys.ndjson"),
    );
    write(&left, spec.legacy().map(|(_, r)| r), true, false)?;
    write(&right, spec.current().map(|(_, r)| r), false, false)?;
    antijoin(&left, &right, &out, &["--keys-only"])?;
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for (id, _) in spec.legacy().filter(|(id, _)| !spec.is_current(id)) {
        *expected.entry(id).or_default() += 1;
    }
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    let mut order = Vec::new();
    for line in std::fs::read_to_string(&out)?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let k = v["key"].as_str().unwrap_or_default().to_string();
        order.push(k.clone());
        got.insert(k, v["count"].as_u64().unwrap_or(0));
    }
    ensure!(got == expected, "key counts differ");
    ensure!(
        order.windows(2).all(|w| w[0] < w[1]),
        "keys not sorted and distinct"
    );
    ensure!(
        !got.contains_key("guest"),
        "the hot key has a match and must not appear"
    );
    Ok(())
}

#[test]
fn left_input_twenty_times_the_budget_keeps_memory_bounded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let budget_mb = 12u64;
    // ~2.9 M records of ~110 B: about 25x the budget; the right side (1 M ids, ~50 MB as a
    // hash set) does not fit either, so it moves to RocksDB + Bloom.
    let spec = UsersSpec {
        legacy: 2_900_000,
        ids: 2_000_000,
        current_share: 0.5,
        ..Default::default()
    };
    let (left, right, out) = (
        dir.path().join("legacy.ndjson"),
        dir.path().join("current.ndjson"),
        dir.path().join("missing.ndjson"),
    );
    write(&left, spec.legacy().map(|(_, r)| r), false, false)?;
    write(&right, spec.current().map(|(_, r)| r), false, false)?;
    let left_bytes = std::fs::metadata(&left)?.len();
    ensure!(
        left_bytes > 20 * (budget_mb << 20),
        "left input only {left_bytes} bytes"
    );
    let (stderr, peak) = antijoin(
        &left,
        &right,
        &out,
        &[
            "--memory-budget-mb",
            &budget_mb.to_string(),
            "--spill-dir",
            dir.path().to_str().unwrap_or_default(),
        ],
    )?;
    ensure!(
        stderr.contains("rocksdb+bloom"),
        "right side did not spill: {stderr}"
    );
    let expected = spec.legacy().filter(|(id, _)| !spec.is_current(id)).count();
    let got = std::fs::read(&out)?.iter().filter(|b| **b == b'\n').count();
    ensure!(got == expected, "{got} records, expected {expected}");
    // The budget bounds state; threads' batches, RocksDB memtables and the binary add a
    // fixed overhead that does not grow with the input.
    let bound = (budget_mb + 80) << 20;
    ensure!(
        peak < bound,
        "peak RSS {} MiB above {} MiB for a {} MiB left input",
        peak >> 20,
        bound >> 20,
        left_bytes >> 20
    );
    eprintln!(
        "peak RSS {} MiB for a {} MiB left input, budget {budget_mb} MiB",
        peak >> 20,
        left_bytes >> 20
    );
    Ok(())
}

#[test]
fn a_field_name_is_a_key_and_a_wrong_key_fails_instead_of_an_empty_answer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = UsersSpec {
        legacy: 2_000,
        ids: 1_500,
        ..Default::default()
    };
    let (left, right) = (dir.path().join("legacy"), dir.path().join("current"));
    write(&left, spec.legacy().map(|(_, r)| r), false, false)?;
    write(&right, spec.current().map(|(_, r)| r), false, false)?;
    let (by_name, by_pointer) = (dir.path().join("by-name"), dir.path().join("by-pointer"));
    antijoin(&left, &right, &by_name, &["--key", "id"])?;
    antijoin(&left, &right, &by_pointer, &["--key", "/id"])?;
    let missing = spec.legacy().filter(|(id, _)| !spec.is_current(id)).count();
    let got = std::fs::read(&by_name)?;
    ensure!(got.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count() == missing);
    ensure!(
        got == std::fs::read(&by_pointer)?,
        "a field name and its pointer differ"
    );

    // The seed's mistake: a key that no record has. Every record is rejected; the run says
    // so and fails rather than writing an empty answer with exit 0.
    let (code, stderr) = antijoin_run(&left, &right, &dir.path().join("o"), &["--key", "uid"])?;
    ensure!(code == 2, "exit {code}: {stderr}");
    ensure!(
        stderr.contains("100.00 % of the records had no usable key")
            && stderr.contains("left_missing_key")
            && stderr.contains("--key /uid"),
        "{stderr}"
    );
    // Under the limit, rejections are reported and the run succeeds.
    let (code, stderr) = antijoin_run(
        &left,
        &right,
        &dir.path().join("o"),
        &["--key", "uid", "--max-error-rate", "1"],
    )?;
    ensure!(code == 0, "exit {code}: {stderr}");
    let (code, stderr) = antijoin_run(&left, &right, &dir.path().join("o"), &["--key", ""])?;
    ensure!(
        code == 2 && stderr.contains("empty key"),
        "exit {code}: {stderr}"
    );
    Ok(())
}

#[test]
fn csv_on_either_side_mixed_with_json_gives_the_same_answer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = UsersSpec {
        legacy: 3_000,
        ids: 2_500,
        ..Default::default()
    };
    let csv_row = |id: &str| format!("{id},\"{id}@legacy.example\",\"a, \"\"quoted\"\"\nnote\"");
    let p = |name: &str| dir.path().join(name);
    let mut legacy_csv = String::from("id,email,note\n");
    for (id, _) in spec.legacy() {
        legacy_csv.push_str(&csv_row(&id));
        legacy_csv.push('\n');
    }
    std::fs::write(p("legacy.csv"), &legacy_csv)?;
    let mut current_csv = String::from("name,id\r\n");
    for (id, _) in spec.current() {
        current_csv.push_str(&format!("x,{id}\r\n"));
    }
    std::fs::write(p("current.csv"), &current_csv)?;
    write(
        &p("legacy.ndjson"),
        spec.legacy().map(|(_, r)| r),
        false,
        false,
    )?;
    write(
        &p("current.ndjson"),
        spec.current().map(|(_, r)| r),
        false,
        false,
    )?;

    let missing: Vec<String> = spec
        .legacy()
        .map(|(id, _)| id)
        .filter(|id| !spec.is_current(id))
        .collect();
    let mut want_csv = String::from("id,email,note\n");
    for id in &missing {
        want_csv.push_str(&csv_row(id));
        want_csv.push('\n');
    }
    for right in ["current.csv", "current.ndjson"] {
        antijoin(&p("legacy.csv"), &p(right), &p("out.csv"), &["--key", "id"])?;
        ensure!(
            std::fs::read_to_string(p("out.csv"))? == want_csv,
            "csv left, {right}"
        );
    }
    antijoin(
        &p("legacy.ndjson"),
        &p("current.csv"),
        &p("out.ndjson"),
        &["--key", "id"],
    )?;
    let got = std::fs::read(p("out.ndjson"))?;
    ensure!(got.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count() == missing.len());
    antijoin(
        &p("legacy.csv"),
        &p("current.csv"),
        &p("keys"),
        &["--key", "id", "--keys-only"],
    )?;
    let keys = std::fs::read_to_string(p("keys"))?;
    let distinct: std::collections::BTreeSet<&String> = missing.iter().collect();
    ensure!(
        keys.lines().count() == distinct.len(),
        "{} keys, {} distinct missing",
        keys.lines().count(),
        distinct.len()
    );

    // Clear errors naming the file: an unknown column, a nested pointer, mixed left formats.
    let (code, err) = antijoin_run(
        &p("legacy.csv"),
        &p("current.csv"),
        &p("o"),
        &["--key", "uid"],
    )?;
    // The right side is read first.
    ensure!(
        code != 0 && err.contains("current.csv: no column \"uid\" in the header (name, id)"),
        "{err}"
    );
    let (code, err) = antijoin_run(
        &p("legacy.csv"),
        &p("current.csv"),
        &p("o"),
        &["--key", "/a/b"],
    )?;
    ensure!(
        code != 0 && err.contains("columns, not nested fields"),
        "{err}"
    );
    let run = Command::new(BIN)
        .args(["antijoin", "files", "--quiet", "--left"])
        .arg(p("legacy.csv"))
        .arg(p("legacy.ndjson"))
        .arg("--right")
        .arg(p("current.csv"))
        .arg("--out")
        .arg(p("o"))
        .output()?;
    let err = String::from_utf8_lossy(&run.stderr);
    ensure!(
        !run.status.success() && err.contains("left files mix formats"),
        "{err}"
    );
    Ok(())
}
