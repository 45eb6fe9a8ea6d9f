//! Resumable bulk loads: a checkpoint per input file, written as records are acknowledged.
//!
//! `done` is the contiguous prefix of records (by NDJSON line or array element number) that
//! the broker acknowledged or the DLQ took; a rerun skips those and produces the rest with
//! the same deterministic idempotency keys, so dedup drops whatever the crashed run had
//! already written beyond `done`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{IngestError, Result};

/// What makes a file the same file: path, size, modification time, inode. A file that
/// changed is a new file (its checkpoint no longer applies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i128,
    pub inode: u64,
}

impl FileIdentity {
    pub fn of(path: &Path) -> Result<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let canonical = path
            .canonicalize()
            .map_err(|e| IngestError::io(path.display(), e))?;
        let md = std::fs::metadata(&canonical).map_err(|e| IngestError::io(path.display(), e))?;
        Ok(FileIdentity {
            path: canonical.display().to_string(),
            size: md.len(),
            mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
            inode: md.ino(),
        })
    }

    /// A short stable id: the checkpoint's file name and the idempotency keys' prefix.
    pub fn id(&self) -> String {
        let text = format!(
            "{}\0{}\0{}\0{}",
            self.path, self.size, self.mtime_ns, self.inode
        );
        format!("{:016x}", xxh3_64(text.as_bytes()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    pub file: FileIdentity,
    pub stream: String,
    pub topic: String,
    /// Records 1..=done are acknowledged (or dead-lettered).
    pub done: u64,
    /// Bytes of the file (as stored, compressed or not) read when record `done` was read.
    pub bytes: u64,
    pub accepted: u64,
    pub rejected: BTreeMap<String, u64>,
    /// The whole file is loaded.
    pub complete: bool,
    pub updated_unix_ms: u64,
}

impl Checkpoint {
    pub fn new(file: FileIdentity, stream: &str, topic: &str) -> Self {
        Checkpoint {
            version: 1,
            file,
            stream: stream.to_string(),
            topic: topic.to_string(),
            done: 0,
            bytes: 0,
            accepted: 0,
            rejected: BTreeMap::new(),
            complete: false,
            updated_unix_ms: 0,
        }
    }

    pub fn path(dir: &Path, file: &FileIdentity) -> PathBuf {
        dir.join(format!("{}.json", file.id()))
    }

    /// The checkpoint of this exact file and stream, if one exists.
    pub fn load(dir: &Path, file: &FileIdentity, stream: &str) -> Result<Option<Checkpoint>> {
        let path = Self::path(dir, file);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(IngestError::io(path.display(), e)),
        };
        let cp: Checkpoint = serde_json::from_str(&text)
            .map_err(|e| IngestError::Config(format!("checkpoint {}: {e}", path.display())))?;
        Ok((cp.file == *file && cp.stream == stream).then_some(cp))
    }

    /// Writes atomically (temporary file, fsync, rename): a crash leaves the old or the new.
    pub fn save(&mut self, dir: &Path) -> Result<()> {
        self.updated_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        std::fs::create_dir_all(dir).map_err(|e| IngestError::io(dir.display(), e))?;
        let path = Self::path(dir, &self.file);
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(self)
            .map_err(|e| IngestError::Config(format!("checkpoint: {e}")))?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| IngestError::io(path.display(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_identity_changes_invalidate() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("in.json");
        std::fs::write(&f, b"[1]").unwrap();
        let id = FileIdentity::of(&f).unwrap();
        assert_eq!(id, FileIdentity::of(&f).unwrap());
        let cps = dir.path().join("cp");
        assert!(Checkpoint::load(&cps, &id, "s").unwrap().is_none());
        let mut cp = Checkpoint::new(id.clone(), "s", "t");
        cp.done = 7;
        cp.rejected.insert("bad_json".into(), 2);
        cp.save(&cps).unwrap();
        let back = Checkpoint::load(&cps, &id, "s").unwrap().unwrap();
        assert_eq!(back.done, 7);
        assert_eq!(back.rejected["bad_json"], 2);
        assert!(Checkpoint::load(&cps, &id, "other").unwrap().is_none());
        std::fs::write(&f, b"[1,2]").unwrap();
        let changed = FileIdentity::of(&f).unwrap();
        assert_ne!(changed.id(), id.id());
        assert!(Checkpoint::load(&cps, &changed, "s").unwrap().is_none());
    }
}
