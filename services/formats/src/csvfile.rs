//! Streaming reader of CSV inputs with a header row (RFC 4180 quoting, parsed by csv-core):
//! rows are handed to a callback one at a time as their original bytes and their unescaped
//! fields. Memory does not depend on file size; a row is bounded by [`MAX_ROW_BYTES`], so an
//! unterminated quote is an error naming the row instead of the whole file read as one field.

use std::cell::RefCell;
use std::io::BufRead;

use csv_core::{ReadFieldResult, ReadRecordResult, Reader};

use crate::jsonfile::ReadError;

/// The longest row accepted.
pub const MAX_ROW_BYTES: usize = 16 << 20;

/// One row: its bytes as in the file (without the line terminator) and its fields.
pub struct Row<'a> {
    pub raw: &'a [u8],
    fields: &'a [u8],
    ends: &'a [usize],
}

impl Row<'_> {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Field `i`, unescaped.
    pub fn field(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.fields.get(start..end)
    }
}

/// Calls `f(number, row)` for every row of `reader`: number 0 is the header, data rows count
/// from 1. Blank lines are skipped.
pub fn for_each_row<R: BufRead>(
    path: &str,
    mut reader: R,
    mut f: impl FnMut(u64, &Row<'_>) -> Result<(), String>,
) -> Result<(), ReadError> {
    let io_err = |source| ReadError::Io {
        path: path.to_string(),
        source,
    };
    let mut csv = Reader::new();
    let mut raw = Vec::new();
    let (mut fields, mut ends) = (vec![0u8; 4096], vec![0usize; 64]);
    let (mut nfields, mut nends) = (0, 0);
    let mut number = 0u64;
    loop {
        let input = reader.fill_buf().map_err(io_err)?;
        let (res, nin, nout, nend) =
            csv.read_record(input, &mut fields[nfields..], &mut ends[nends..]);
        raw.extend_from_slice(&input[..nin]);
        reader.consume(nin);
        nfields += nout;
        nends += nend;
        match res {
            ReadRecordResult::InputEmpty => {}
            ReadRecordResult::OutputFull => fields.resize(fields.len() * 2, 0),
            ReadRecordResult::OutputEndsFull => ends.resize(ends.len() * 2, 0),
            ReadRecordResult::Record => {
                let row = Row {
                    raw: trim_terminators(&raw),
                    fields: &fields[..nfields],
                    ends: &ends[..nends],
                };
                f(number, &row).map_err(ReadError::Stopped)?;
                number += 1;
                raw.clear();
                (nfields, nends) = (0, 0);
            }
            ReadRecordResult::End => return Ok(()),
        }
        if raw.len() > MAX_ROW_BYTES {
            return Err(ReadError::Syntax {
                path: path.to_string(),
                at: crate::jsonfile::Position::Line(number + 1),
                message: format!(
                    "CSV row {number} is longer than {} MiB: an unterminated quote?",
                    MAX_ROW_BYTES >> 20
                ),
            });
        }
    }
}

thread_local! {
    // Building a csv-core reader builds its state machine: about as costly as parsing a row,
    // so each thread keeps one.
    static FIELDS: RefCell<Reader> = RefCell::new(Reader::new());
}

/// Field `n` (unescaped) of one row's bytes, `None` when the row has fewer fields.
pub fn nth_field(row: &[u8], n: usize) -> Option<Vec<u8>> {
    FIELDS.with(|csv| {
        let mut csv = csv.borrow_mut();
        csv.reset();
        nth_field_with(&mut csv, row, n)
    })
}

fn nth_field_with(csv: &mut Reader, row: &[u8], n: usize) -> Option<Vec<u8>> {
    let (mut input, mut buf) = (row, [0u8; 4096]);
    let (mut field, mut i) = (Vec::new(), 0);
    loop {
        let (res, nin, nout) = csv.read_field(input, &mut buf);
        input = &input[nin..];
        if i == n {
            field.extend_from_slice(&buf[..nout]);
        }
        match res {
            ReadFieldResult::InputEmpty | ReadFieldResult::OutputFull => {}
            ReadFieldResult::Field { .. } if i == n => return Some(field),
            ReadFieldResult::Field { record_end: true } | ReadFieldResult::End => return None,
            ReadFieldResult::Field { record_end: false } => i += 1,
        }
    }
}

/// A row's bytes without the line breaks around it (blank lines before it, its terminator).
fn trim_terminators(raw: &[u8]) -> &[u8] {
    let start = raw
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n'))
        .map_or(start, |i| i + 1);
    &raw[start..end.max(start)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(input: &str) -> Vec<(u64, String, Vec<String>)> {
        let mut out = Vec::new();
        for_each_row("t.csv", input.as_bytes(), |n, row| {
            let fields = (0..row.len())
                .map(|i| String::from_utf8_lossy(row.field(i).unwrap_or_default()).into_owned())
                .collect();
            out.push((n, String::from_utf8_lossy(row.raw).into_owned(), fields));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn rows_keep_their_bytes_and_fields_are_unescaped() {
        let got = rows("id,name\r\n1,\"a, \"\"quoted\"\"\nline\"\n\n2,b\n3,c");
        assert_eq!(
            got,
            vec![
                (0, "id,name".into(), vec!["id".into(), "name".into()]),
                (
                    1,
                    "1,\"a, \"\"quoted\"\"\nline\"".into(),
                    vec!["1".into(), "a, \"quoted\"\nline".into()]
                ),
                (2, "2,b".into(), vec!["2".into(), "b".into()]),
                (3, "3,c".into(), vec!["3".into(), "c".into()]),
            ]
        );
    }

    #[test]
    fn one_field_of_a_row() {
        let row = b"1,\"a,\"\"b\"\"\",,last";
        assert_eq!(nth_field(row, 0).as_deref(), Some(&b"1"[..]));
        assert_eq!(nth_field(row, 1).as_deref(), Some(&b"a,\"b\""[..]));
        assert_eq!(nth_field(row, 2).as_deref(), Some(&b""[..]));
        assert_eq!(nth_field(row, 3).as_deref(), Some(&b"last"[..]));
        assert_eq!(nth_field(row, 4), None);
        let long = "y".repeat(10_000);
        assert_eq!(
            nth_field(format!("x,{long}").as_bytes(), 1),
            Some(long.into_bytes())
        );
    }

    #[test]
    fn long_rows_and_many_fields_grow_the_buffers() {
        let wide: Vec<String> = (0..200).map(|i| format!("f{i}")).collect();
        let long = "x".repeat(10_000);
        let input = format!("{}\n{long},{}\n", wide.join(","), wide[1..].join(","));
        let got = rows(&input);
        assert_eq!(got[0].2.len(), 200);
        assert_eq!(got[1].2[0], long);
        assert_eq!(got[1].2.len(), 200);
    }

    #[test]
    fn an_unterminated_quote_is_an_error_naming_the_row_not_the_whole_file() {
        let input = format!("id\n\"open{}", "x".repeat(MAX_ROW_BYTES + 10));
        let err = for_each_row("t.csv", input.as_bytes(), |_, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("t.csv"), "{err}");
        assert!(err.to_string().contains("unterminated quote"), "{err}");
    }
}
