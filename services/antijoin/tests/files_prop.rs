//! For random small inputs, files mode equals the naive set difference, in memory and
//! spilled to RocksDB, for NDJSON, JSON-array, CSV and Parquet inputs, each side in its own
//! format.

// Test helpers outside `#[test]` functions unwrap too (clippy.toml allows it in tests only).
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use proptest::collection::vec;
use proptest::prelude::*;
use sieve_antijoin::files::{run, FilesArgs};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fmt {
    Ndjson,
    Array,
    Csv,
    Parquet,
}

fn fmt() -> impl Strategy<Value = Fmt> {
    prop_oneof![
        Just(Fmt::Ndjson),
        Just(Fmt::Array),
        Just(Fmt::Csv),
        Just(Fmt::Parquet)
    ]
}

/// Rows `(i, id)` as a file of `fmt`; CSV rows quote a field holding the separator, the
/// quote and a line break.
fn write(dir: &Path, side: &str, fmt: Fmt, rows: &[(i64, String)]) -> PathBuf {
    let ext = match fmt {
        Fmt::Ndjson | Fmt::Array => "json",
        Fmt::Csv => "csv",
        Fmt::Parquet => "parquet",
    };
    let path = dir.join(format!("{side}.{ext}"));
    let mut f = std::fs::File::create(&path).unwrap();
    let json = |(i, id): &(i64, String)| format!(r#"{{"id":"{id}","i":{i}}}"#);
    match fmt {
        Fmt::Ndjson => rows
            .iter()
            .for_each(|r| writeln!(f, "{}", json(r)).unwrap()),
        Fmt::Array => {
            let all: Vec<String> = rows.iter().map(json).collect();
            write!(f, "[{}]", all.join(",")).unwrap();
        }
        Fmt::Csv => {
            writeln!(f, "i,id,note").unwrap();
            for (i, id) in rows {
                writeln!(f, "{i},{id},\"a, \"\"b\"\"\nc\"").unwrap();
            }
        }
        Fmt::Parquet => {
            let schema = Arc::new(Schema::new(vec![
                Field::new("i", DataType::Int64, false),
                Field::new("id", DataType::Utf8, true),
            ]));
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.1))),
                ],
            )
            .unwrap();
            let mut w = ArrowWriter::try_new(f, schema, None).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
        }
    }
    path
}

/// The output's rows as `(i, id)`: NDJSON or CSV (header first) or Parquet, by `fmt`.
fn read(path: &Path, fmt: Fmt) -> Vec<(i64, String)> {
    match fmt {
        Fmt::Parquet => {
            let file = std::fs::File::open(path).unwrap();
            let mut rows = Vec::new();
            for batch in ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap()
                .build()
                .unwrap()
            {
                let batch = batch.unwrap();
                let i = batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap();
                let id = batch
                    .column(1)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap();
                rows.extend((0..batch.num_rows()).map(|n| (i.value(n), id.value(n).to_string())));
            }
            rows
        }
        Fmt::Csv => {
            let text = std::fs::read_to_string(path).unwrap();
            let body = text
                .strip_prefix("i,id,note\n")
                .expect("the CSV header first");
            body.split("\"a, \"\"b\"\"\nc\"\n")
                .filter(|r| !r.is_empty())
                .map(|r| {
                    let (i, rest) = r.split_once(',').unwrap();
                    (i.parse().unwrap(), rest.trim_end_matches(',').to_string())
                })
                .collect()
        }
        Fmt::Ndjson | Fmt::Array => std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["i"].as_i64().unwrap(),
                    v["id"].as_str().unwrap().to_string(),
                )
            })
            .collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn equals_naive_set_difference(
        left in vec(0u8..30, 0..300),
        right in vec(0u8..30, 0..40),
        left_fmt in fmt(),
        right_fmt in fmt(),
        spill in any::<bool>(),
        threads in 1usize..4,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let rows = |keys: &[u8]| -> Vec<(i64, String)> {
            keys.iter().enumerate().map(|(i, k)| (i as i64, format!("k{k}"))).collect()
        };
        let (left_rows, right_rows) = (rows(&left), rows(&right));
        let l = write(dir.path(), "l", left_fmt, &left_rows);
        let r = write(dir.path(), "r", right_fmt, &right_rows);
        let o = dir.path().join("o");
        let args = FilesArgs {
            left: vec![l],
            right: vec![r],
            out: o.clone(),
            key: "/id".into(),
            right_key: None,
            keys_only: false,
            memory_budget_mb: if spill { 0 } else { 64 },
            threads: Some(threads),
            spill_dir: Some(dir.path().to_path_buf()),
            quiet: true,
            max_error_rate: 0.0,
        };
        let summary = run(&args).unwrap();
        let right_set: HashSet<&String> = right_rows.iter().map(|r| &r.1).collect();
        let expected: Vec<(i64, String)> =
            left_rows.iter().filter(|r| !right_set.contains(&r.1)).cloned().collect();
        prop_assert_eq!(read(&o, left_fmt), expected.clone());
        prop_assert_eq!(summary.emitted as usize, expected.len());
        prop_assert_eq!(summary.left_records as usize, left_rows.len());
        prop_assert_eq!(summary.right_mode, if spill && !right.is_empty() { "rocksdb+bloom" } else { "memory" });
    }
}
