//! Parquet inputs of the file anti-join (arrow-rs): the right side reads only its key column;
//! the left side streams record batches, keeps the rows without a right match and writes
//! them as Parquet with the left file's schema. Memory is a batch and a row group, whatever
//! the file size.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, BooleanArray, RecordBatch, RecordBatchReader};
use arrow_schema::{DataType, SchemaRef};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::error::{AntijoinError, Result};

/// Rows per record batch read.
const BATCH_ROWS: usize = 8_192;
/// Rows per row group written: bounds the writer's buffer.
const ROW_GROUP_ROWS: usize = 65_536;

fn parquet_err(path: &Path, e: impl std::fmt::Display) -> AntijoinError {
    AntijoinError::Input(format!("{}: {e}", path.display()))
}

/// The top-level column a `--key` names: a field name or a one-segment pointer.
pub fn column_name(path: &Path, pointer: &str) -> Result<String> {
    pointer
        .strip_prefix('/')
        .filter(|n| !n.contains('/'))
        .map(|n| n.replace("~1", "/").replace("~0", "~"))
        .ok_or_else(|| {
            AntijoinError::Input(format!(
                "{}: a CSV or Parquet file has columns, not nested fields: --key {pointer}",
                path.display()
            ))
        })
}

/// A reader of `path` (all columns, or only `key` when `key_only`) and the key's index in
/// its batches.
fn open(path: &Path, key: &str, key_only: bool) -> Result<(ParquetRecordBatchReader, usize)> {
    let file = File::open(path).map_err(|e| parquet_err(path, e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_err(path, e))?;
    let schema = builder.schema().clone();
    let index = schema.index_of(key).map_err(|_| {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        AntijoinError::Input(format!(
            "{}: no column {key:?} in the schema ({})",
            path.display(),
            names.join(", ")
        ))
    })?;
    let builder = builder.with_batch_size(BATCH_ROWS);
    let (builder, index) = if key_only {
        let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
        (builder.with_projection(mask), 0)
    } else {
        (builder, index)
    };
    Ok((builder.build().map_err(|e| parquet_err(path, e))?, index))
}

/// The keys of one column: strings as their bytes, integers as their decimal text (as a JSON
/// number's text, so they match JSON and CSV keys); a null is `missing_key`, any other type
/// `key_not_scalar`.
fn keys(column: &dyn Array) -> Vec<std::result::Result<Vec<u8>, &'static str>> {
    fn each<T>(
        n: usize,
        valid: impl Fn(usize) -> bool,
        value: impl Fn(usize) -> T,
    ) -> Vec<std::result::Result<T, &'static str>> {
        (0..n)
            .map(|i| {
                if valid(i) {
                    Ok(value(i))
                } else {
                    Err("missing_key")
                }
            })
            .collect()
    }
    let n = column.len();
    let valid = |i| column.is_valid(i);
    macro_rules! ints {
        ($t:ty) => {{
            let a = column.as_primitive::<$t>();
            each(n, valid, |i| a.value(i).to_string().into_bytes())
        }};
    }
    match column.data_type() {
        DataType::Utf8 => {
            let a = column.as_string::<i32>();
            each(n, valid, |i| a.value(i).as_bytes().to_vec())
        }
        DataType::LargeUtf8 => {
            let a = column.as_string::<i64>();
            each(n, valid, |i| a.value(i).as_bytes().to_vec())
        }
        DataType::Utf8View => {
            let a = column.as_string_view();
            each(n, valid, |i| a.value(i).as_bytes().to_vec())
        }
        DataType::Int8 => ints!(Int8Type),
        DataType::Int16 => ints!(Int16Type),
        DataType::Int32 => ints!(Int32Type),
        DataType::Int64 => ints!(Int64Type),
        DataType::UInt8 => ints!(UInt8Type),
        DataType::UInt16 => ints!(UInt16Type),
        DataType::UInt32 => ints!(UInt32Type),
        DataType::UInt64 => ints!(UInt64Type),
        _ => vec![Err("key_not_scalar"); n],
    }
}

/// Calls `f` with the key (or the reason it has none) of every row of `path`, reading only
/// the key column.
pub fn for_each_key(
    path: &Path,
    pointer: &str,
    mut f: impl FnMut(std::result::Result<&[u8], &'static str>) -> Result<()>,
) -> Result<()> {
    let (reader, index) = open(path, &column_name(path, pointer)?, true)?;
    for batch in reader {
        let batch = batch.map_err(|e| parquet_err(path, e))?;
        for k in keys(batch.column(index).as_ref()) {
            f(k.as_deref().map_err(|r| *r))?;
        }
    }
    Ok(())
}

/// What a left Parquet file gave.
#[derive(Debug, Default)]
pub struct LeftCounts {
    pub records: u64,
    pub emitted: u64,
}

/// Streams the left Parquet `paths` (one schema): `missing(key)` says whether a key has no
/// right match; rows without a key are counted through `reject`; each missing row's key goes
/// to `on_missing`, and, unless `keys_only`, the row itself to a Parquet file on `out`.
pub fn left(
    paths: &[impl AsRef<Path>],
    pointer: &str,
    out: Option<Box<dyn Write + Send>>,
    mut missing: impl FnMut(&[u8]) -> Result<bool>,
    mut reject: impl FnMut(&'static str),
    mut on_missing: impl FnMut(&[u8]) -> Result<()>,
) -> Result<LeftCounts> {
    let mut counts = LeftCounts::default();
    let mut writer: Option<(ArrowWriter<Box<dyn Write + Send>>, SchemaRef)> = None;
    let mut out = out;
    for path in paths {
        let path = path.as_ref();
        let (reader, index) = open(path, &column_name(path, pointer)?, false)?;
        // The output takes the first file's schema, also when it has no rows.
        if let Some(sink) = out.take() {
            let props = WriterProperties::builder()
                .set_max_row_group_size(ROW_GROUP_ROWS)
                .set_compression(Compression::SNAPPY)
                .build();
            let w = ArrowWriter::try_new(sink, reader.schema(), Some(props))
                .map_err(|e| parquet_err(path, e))?;
            writer = Some((w, reader.schema()));
        }
        if let Some((_, schema)) = &writer {
            if reader.schema() != *schema {
                return Err(AntijoinError::Input(format!(
                    "{}: its schema differs from the first left file's",
                    path.display()
                )));
            }
        }
        for batch in reader {
            let batch: RecordBatch = batch.map_err(|e| parquet_err(path, e))?;
            let mut keep = Vec::with_capacity(batch.num_rows());
            for k in keys(batch.column(index).as_ref()) {
                counts.records += 1;
                let emit = match k {
                    Ok(k) if missing(&k)? => {
                        on_missing(&k)?;
                        true
                    }
                    Ok(_) => false,
                    Err(reason) => {
                        reject(reason);
                        false
                    }
                };
                counts.emitted += u64::from(emit);
                keep.push(emit);
            }
            if let Some((w, _)) = writer.as_mut() {
                let kept =
                    arrow_select::filter::filter_record_batch(&batch, &BooleanArray::from(keep))
                        .map_err(|e| parquet_err(path, e))?;
                w.write(&kept).map_err(|e| parquet_err(path, e))?;
            }
        }
    }
    if let Some((w, _)) = writer {
        // The footer, then whatever the sink still buffers.
        w.into_inner()
            .map_err(|e| AntijoinError::Input(format!("writing the Parquet output: {e}")))?
            .flush()?;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use arrow_array::{Float64Array, Int32Array, StringArray, UInt64Array};

    use super::*;

    #[test]
    fn keys_are_text_like_json_keys_and_the_rest_is_rejected() {
        let strings = StringArray::from(vec![Some("a"), None, Some("")]);
        assert_eq!(
            keys(&strings),
            vec![Ok(b"a".to_vec()), Err("missing_key"), Ok(Vec::new())]
        );
        assert_eq!(
            keys(&Int32Array::from(vec![Some(-7), None])),
            vec![Ok(b"-7".to_vec()), Err("missing_key")]
        );
        assert_eq!(
            keys(&UInt64Array::from(vec![u64::MAX])),
            vec![Ok(u64::MAX.to_string().into_bytes())]
        );
        assert_eq!(
            keys(&Float64Array::from(vec![1.5])),
            vec![Err("key_not_scalar")]
        );
    }
}
