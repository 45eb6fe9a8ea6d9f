//! For random small inputs, files mode equals the naive set difference, in memory and
//! spilled to RocksDB, for NDJSON and JSON-array inputs.

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
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn equals_naive_set_difference(
        left in vec(0u8..30, 0..300),
        right in vec(0u8..30, 0..40),
        array in any::<bool>(),
        spill in any::<bool>(),
        threads in 1usize..4,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let left_recs: Vec<String> = left.iter().enumerate().map(|(i, k)| format!(r#"{{"id":"k{k}","i":{i}}}"#)).collect();
        let right_recs: Vec<String> = right.iter().map(|k| format!(r#"{{"id":"k{k}"}}"#)).collect();
        let (l, r, o) = (dir.path().join("l"), dir.path().join("r"), dir.path().join("o"));
        write(&l, &left_recs, array).unwrap();
        write(&r, &right_recs, !array).unwrap();
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
        let got: Vec<String> = std::fs::read_to_string(&o).unwrap().lines().map(str::to_string).collect();
        prop_assert_eq!(&got, &expected);
        prop_assert_eq!(summary.emitted as usize, expected.len());
        prop_assert_eq!(summary.right_mode, if spill && !right.is_empty() { "rocksdb+bloom" } else { "memory" });
    }
}
