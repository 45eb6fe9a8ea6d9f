//! Streaming reader of huge JSON inputs: NDJSON or one top-level JSON array, plain, gzip or
//! zstd (detected from the first bytes, not the file name). Memory does not depend on file
//! size: records are handed to a callback one at a time as their original bytes.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where a record starts: NDJSON line number, or index in the top-level array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Line(u64),
    Element(u64),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Line(n) => write!(f, "line {n}"),
            Position::Element(n) => write!(f, "element {n}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    /// The file cannot be read on (a broken JSON array cannot be resynchronised).
    #[error("{path}: invalid JSON array at or after {at}: {message}")]
    Syntax {
        path: String,
        at: Position,
        message: String,
    },
    /// The callback asked to stop.
    #[error("stopped: {0}")]
    Stopped(String),
}

/// Bytes read from the underlying (possibly compressed) file, for progress and rates.
#[derive(Debug, Clone, Default)]
pub struct BytesRead(Arc<AtomicU64>);

impl BytesRead {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

struct Counting<R> {
    inner: R,
    count: BytesRead,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Opens `path` (or stdin for `-`), decompressing gzip or zstd when the magic bytes say so.
pub fn open(path: &Path) -> Result<(Box<dyn BufRead + Send>, BytesRead), ReadError> {
    let io_err = |source| ReadError::Io {
        path: path.display().to_string(),
        source,
    };
    let raw: Box<dyn Read + Send> = if path.as_os_str() == "-" {
        Box::new(io::stdin())
    } else {
        Box::new(File::open(path).map_err(io_err)?)
    };
    decode(raw).map_err(io_err)
}

/// Wraps `raw` in a gzip or zstd decoder when its first bytes are that format's magic, and
/// counts the bytes read from `raw`.
pub fn decode<R: Read + Send + 'static>(
    raw: R,
) -> io::Result<(Box<dyn BufRead + Send>, BytesRead)> {
    let count = BytesRead::default();
    let mut buffered = BufReader::with_capacity(
        1 << 20,
        Counting {
            inner: raw,
            count: count.clone(),
        },
    );
    let head = buffered.fill_buf()?.to_vec();
    let reader: Box<dyn BufRead + Send> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::bufread::MultiGzDecoder::new(buffered),
        ))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(BufReader::with_capacity(
            1 << 20,
            zstd::stream::read::Decoder::with_buffer(buffered)?,
        ))
    } else {
        Box::new(buffered)
    };
    Ok((reader, count))
}

/// Calls `f(position, bytes)` for every record of `reader`: each non-blank NDJSON line, or
/// each element of a top-level array. Records are passed unparsed (a bad record is the
/// callback's to judge); a broken array structure is a `Syntax` error naming the element.
pub fn for_each_record<R: BufRead>(
    path: &str,
    mut reader: R,
    mut f: impl FnMut(Position, &[u8]) -> Result<(), String>,
) -> Result<(), ReadError> {
    let io_err = |source| ReadError::Io {
        path: path.to_string(),
        source,
    };
    // Skip leading whitespace (and a UTF-8 BOM) to see whether this is an array.
    loop {
        let buf = reader.fill_buf().map_err(io_err)?;
        if buf.is_empty() {
            return Ok(());
        }
        let skip = buf
            .iter()
            .take_while(|b| b.is_ascii_whitespace() || [0xef, 0xbb, 0xbf].contains(b))
            .count();
        if skip == 0 {
            break;
        }
        reader.consume(skip);
    }
    let first = reader.fill_buf().map_err(io_err)?.first().copied();
    if first == Some(b'[') {
        read_array(path, reader, f)
    } else {
        let mut line = Vec::with_capacity(4096);
        let mut n = 0u64;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line).map_err(io_err)? == 0 {
                return Ok(());
            }
            n += 1;
            let trimmed = trim(&line);
            if !trimmed.is_empty() {
                f(Position::Line(n), trimmed).map_err(ReadError::Stopped)?;
            }
        }
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    let end = b.len()
        - b.iter()
            .rev()
            .take_while(|c| c.is_ascii_whitespace())
            .count();
    b.get(start..end.max(start)).unwrap_or_default()
}

/// Cuts a top-level JSON array into its elements without parsing them: a byte scan that
/// tracks strings, escapes and nesting, many times faster than a deserializer reading from a
/// stream. Elements are handed over unparsed, like NDJSON lines; what is cut here is the
/// array's own syntax (brackets, commas, an unterminated element, trailing bytes).
fn read_array<R: BufRead>(
    path: &str,
    mut reader: R,
    mut f: impl FnMut(Position, &[u8]) -> Result<(), String>,
) -> Result<(), ReadError> {
    let syntax = |index: u64, message: &str| ReadError::Syntax {
        path: path.to_string(),
        at: Position::Element(index),
        message: message.to_string(),
    };
    let io_err = |source| ReadError::Io {
        path: path.to_string(),
        source,
    };
    let mut element: Vec<u8> = Vec::with_capacity(4096);
    let (mut index, mut depth) = (0u64, 0u32);
    let (mut in_string, mut escaped) = (false, false);
    // Before the opening bracket, inside the array, after the closing bracket.
    #[derive(PartialEq)]
    enum At {
        Start,
        Inside,
        Done,
    }
    let mut at = At::Start;
    // Whether a comma was seen since the last element (an element must follow it).
    let mut after_comma = false;
    loop {
        let buf = reader.fill_buf().map_err(io_err)?;
        if buf.is_empty() {
            break;
        }
        let len = buf.len();
        for &b in buf {
            match at {
                At::Start => {
                    if b == b'[' {
                        at = At::Inside;
                    } else if !b.is_ascii_whitespace() {
                        return Err(syntax(1, "expected '['"));
                    }
                }
                At::Done => {
                    if !b.is_ascii_whitespace() {
                        return Err(syntax(index, "trailing characters after the array"));
                    }
                }
                At::Inside if in_string => {
                    element.push(b);
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        in_string = false;
                    }
                }
                At::Inside => match b {
                    b',' | b']' if depth == 0 => {
                        let trimmed = trim(&element);
                        if trimmed.is_empty() {
                            if b == b',' || after_comma {
                                return Err(syntax(index + 1, "missing element"));
                            }
                        } else {
                            index += 1;
                            f(Position::Element(index), trimmed).map_err(ReadError::Stopped)?;
                        }
                        element.clear();
                        after_comma = b == b',';
                        if b == b']' {
                            at = At::Done;
                        }
                    }
                    _ => {
                        match b {
                            b'"' => in_string = true,
                            b'{' | b'[' => depth += 1,
                            b'}' | b']' => {
                                depth = depth
                                    .checked_sub(1)
                                    .ok_or_else(|| syntax(index + 1, "unbalanced brackets"))?;
                            }
                            _ => {}
                        }
                        element.push(b);
                    }
                },
            }
        }
        reader.consume(len);
    }
    match at {
        At::Done => Ok(()),
        _ => Err(syntax(index + 1, "unexpected end of file inside the array")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn collect(bytes: &[u8]) -> Result<Vec<(Position, String)>, ReadError> {
        let mut out = Vec::new();
        for_each_record("t", bytes, |p, b| {
            out.push((p, String::from_utf8_lossy(b).into_owned()));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn ndjson_and_arrays_yield_the_same_records() {
        let nd = collect(b"{\"id\":1}\n\n  {\"id\":2}  \r\n{\"id\":3}").unwrap();
        assert_eq!(
            nd.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
            ["{\"id\":1}", "{\"id\":2}", "{\"id\":3}"]
        );
        assert_eq!(nd[1].0, Position::Line(3));
        let arr = collect(b" \n[ {\"id\":1}, {\"id\": 2} ,{\"id\":3}]\n").unwrap();
        assert_eq!(arr.len(), 3);
        assert_eq!(arr[1].1, "{\"id\": 2}");
        assert_eq!(arr[2].0, Position::Element(3));
        assert!(collect(b"").unwrap().is_empty());
        assert!(collect(b"[]").unwrap().is_empty());
    }

    #[test]
    fn broken_array_is_an_error_naming_the_element() {
        match collect(b"[{\"id\":1},{\"id\":") {
            Err(ReadError::Syntax { at, .. }) => assert_eq!(at, Position::Element(2)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            collect(b"[{\"id\":1}] trailing"),
            Err(ReadError::Syntax { .. })
        ));
    }

    #[test]
    fn array_elements_are_cut_by_structure_not_by_bytes_that_look_like_it() {
        let arr =
            collect(br#"[{"s":"a],[b\"}{","n":[1,[2]]}, "x,y" ,3, [ ] ,{"e":"\\"}]"#).unwrap();
        let got: Vec<&str> = arr.iter().map(|r| r.1.as_str()).collect();
        assert_eq!(
            got,
            [
                r#"{"s":"a],[b\"}{","n":[1,[2]]}"#,
                r#""x,y""#,
                "3",
                "[ ]",
                r#"{"e":"\\"}"#
            ]
        );
        // A bad element is the caller's to judge; the array's own syntax is ours.
        assert_eq!(collect(b"[{\"id\":},{\"id\":2}]").unwrap().len(), 2);
        for broken in [&b"[1,,2]"[..], b"[1,]", b"[1", b"[1]]", b"[{]"] {
            assert!(
                matches!(collect(broken), Err(ReadError::Syntax { .. })),
                "{}",
                String::from_utf8_lossy(broken)
            );
        }
    }

    #[test]
    fn gzip_and_zstd_are_detected_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"[{\"id\":\"a\"},{\"id\":\"b\"}]";
        let gz = dir.path().join("x.json");
        let mut e =
            flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        e.write_all(body).unwrap();
        e.finish().unwrap();
        let zs = dir.path().join("y");
        std::fs::write(&zs, zstd::encode_all(&body[..], 1).unwrap()).unwrap();
        for p in [gz, zs] {
            let (r, count) = open(&p).unwrap();
            let mut n = 0;
            for_each_record("t", r, |_, _| {
                n += 1;
                Ok(())
            })
            .unwrap();
            assert_eq!(n, 2);
            assert!(count.get() > 0);
        }
    }
}
