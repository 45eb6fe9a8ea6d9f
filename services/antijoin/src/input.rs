//! The file anti-join's inputs: JSON (NDJSON or an array), CSV with a header row, or Parquet,
//! chosen by file name (`.csv`, `.csv.gz`, `.csv.zst`, `.parquet`), on either side; and how a
//! side's key is found in its records. JSON and CSV are read record by record here; Parquet
//! by column (`columnar`).

use std::io::BufRead;
use std::path::Path;

use sieve_formats::{csvfile, jsonfile, jsonkey};

use crate::columnar;
use crate::error::{AntijoinError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Parquet,
}

impl Format {
    /// By name, compression suffixes aside (Parquet compresses inside); stdin (`-`) is JSON.
    pub fn of(path: &Path) -> Format {
        let name = path.to_string_lossy().to_ascii_lowercase();
        let name = [".gz", ".zst", ".zstd"]
            .iter()
            .find_map(|ext| name.strip_suffix(ext))
            .unwrap_or(&name);
        if name.ends_with(".csv") {
            Format::Csv
        } else if name.ends_with(".parquet") {
            Format::Parquet
        } else {
            Format::Json
        }
    }
}

/// Where a side's key is in its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOf {
    /// A JSON pointer into each record.
    Pointer(String),
    /// A CSV column, by position.
    Column(usize),
}

impl KeyOf {
    /// The key of one record, or the reason it has none.
    pub fn extract(&self, record: &[u8]) -> std::result::Result<Vec<u8>, &'static str> {
        match self {
            KeyOf::Pointer(p) => jsonkey::extract(record, p).map_err(|e| e.reason()),
            KeyOf::Column(i) => match csvfile::nth_field(record, *i) {
                Some(k) if !k.is_empty() => Ok(k),
                _ => Err("missing_key"),
            },
        }
    }
}

/// The column a `--key` names in a CSV header: a field name or a one-segment pointer.
fn column(path: &Path, pointer: &str, header: &csvfile::Row<'_>) -> Result<usize> {
    let name = columnar::column_name(path, pointer)?;
    let columns: Vec<String> = (0..header.len())
        .map(|i| String::from_utf8_lossy(header.field(i).unwrap_or_default()).into_owned())
        .collect();
    columns.iter().position(|c| *c == name).ok_or_else(|| {
        AntijoinError::Input(format!(
            "{}: no column {name:?} in the header ({})",
            path.display(),
            columns.join(", ")
        ))
    })
}

/// What a file hands over, in order.
pub enum Item<'a> {
    /// A CSV file's header row, as in the file (before its first record).
    Header(&'a [u8]),
    /// One record and where its key is.
    Record(&'a KeyOf, &'a [u8]),
}

/// Calls `f` with the key of every record of `path` (or the reason it has none), any format.
pub fn for_each_key(
    path: &Path,
    pointer: &str,
    mut f: impl FnMut(std::result::Result<&[u8], &'static str>) -> std::result::Result<(), String>,
) -> Result<()> {
    if Format::of(path) == Format::Parquet {
        return columnar::for_each_key(path, pointer, |k| f(k).map_err(AntijoinError::Input));
    }
    let (reader, _) = jsonfile::open(path)?;
    for_each_record(path, reader, pointer, |item| match item {
        Item::Header(_) => Ok(()),
        Item::Record(key, bytes) => f(key.extract(bytes).as_deref().map_err(|r| *r)),
    })
}

/// Calls `f` for every item of `reader`, opened from `path` (`jsonfile::open`); Parquet is
/// read by column (`columnar`), not here.
pub fn for_each_record(
    path: &Path,
    reader: impl BufRead,
    pointer: &str,
    mut f: impl FnMut(Item<'_>) -> std::result::Result<(), String>,
) -> Result<()> {
    let name = path.display().to_string();
    match Format::of(path) {
        Format::Json => {
            let key = KeyOf::Pointer(pointer.to_string());
            jsonfile::for_each_record(&name, reader, |_, rec| f(Item::Record(&key, rec)))?;
        }
        Format::Parquet => {
            return Err(AntijoinError::Input(format!(
                "{name}: Parquet is read by column, not record by record"
            )))
        }
        Format::Csv => {
            let mut key = None;
            let mut bad_header = None;
            csvfile::for_each_row(&name, reader, |n, row| match &key {
                _ if n == 0 => match column(path, pointer, row) {
                    Ok(c) => {
                        key = Some(KeyOf::Column(c));
                        f(Item::Header(row.raw))
                    }
                    Err(e) => {
                        let message = e.to_string();
                        bad_header = Some(e);
                        Err(message)
                    }
                },
                Some(k) => f(Item::Record(k, row.raw)),
                None => Ok(()),
            })
            .map_err(|e| bad_header.take().unwrap_or(AntijoinError::Read(e)))?;
        }
    }
    Ok(())
}
