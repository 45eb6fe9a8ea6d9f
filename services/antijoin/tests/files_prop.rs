//! For random small inputs, files mode equals the naive set difference, in memory and
//! spilled to RocksDB, for NDJSON, JSON-array and CSV inputs, mixed sides included.

use std::collections::HashSet;
use std::io::Write;

use proptest::collection::vec;
use proptest::prelude::*;
use sieve_antijoin::files::{run, FilesArgs};

fn write(path: &std::path::Path, recs: &[String], array: bool) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    if array {
        write!(f, "[{}]", recs.join(","))
    } else {
        recs.iter().try_for_each(|r| writeln!(f, "{r}"))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn equals_naive_set_difference(
        left in vec(0u8..30, 0..300),
        right in vec(0u8..30, 0..40),
        array in any::<bool>(),
        csv_left in any::<bool>(),
        csv_right in any::<bool>(),
        spill in any::<bool>(),
        threads in 1usize..4,
    ) {
        let dir = tempfile::tempdir().unwrap();
        // CSV rows quote a field holding the separator, the quote and a line break.
        let left_recs: Vec<String> = left.iter().enumerate().map(|(i, k)| if csv_left {
            format!("{i},k{k},\"a, \"\"b\"\"\nc\"")
        } else {
            format!(r#"{{"id":"k{k}","i":{i}}}"#)
        }).collect();
        let right_recs: Vec<String> = right.iter().map(|k| if csv_right {
            format!("x,k{k}")
        } else {
            format!(r#"{{"id":"k{k}"}}"#)
        }).collect();
        let name = |side: &str, csv: bool| dir.path().join(if csv { format!("{side}.csv") } else { side.to_string() });
        let (l, r, o) = (name("l", csv_left), name("r", csv_right), dir.path().join("o"));
        if csv_left {
            write(&l, &[&["i,id,note".to_string()], &left_recs[..]].concat(), false).unwrap();
        } else {
            write(&l, &left_recs, array).unwrap();
        }
        if csv_right {
            write(&r, &[&["other,id".to_string()], &right_recs[..]].concat(), false).unwrap();
        } else {
            write(&r, &right_recs, !array).unwrap();
        }
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
        let right_set: HashSet<u8> = right.iter().copied().collect();
        let expected: Vec<String> = left_recs
            .iter()
            .zip(&left)
            .filter(|(_, k)| !right_set.contains(k))
            .map(|(r, _)| r.clone())
            .collect();
        let mut want = String::new();
        if csv_left {
            want.push_str("i,id,note\n");
        }
        for r in &expected {
            want.push_str(r);
            want.push('\n');
        }
        prop_assert_eq!(std::fs::read_to_string(&o).unwrap(), want);
        prop_assert_eq!(summary.emitted as usize, expected.len());
        prop_assert_eq!(summary.right_mode, if spill && !right.is_empty() { "rocksdb+bloom" } else { "memory" });
    }
}
