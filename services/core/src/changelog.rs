//! The changelog: a compacted topic per input topic, partition for partition, from which a
//! missing or stale local store is rebuilt.
//!
//! A batch's state changes are produced only after the batch's outputs were acknowledged and
//! its local commit is written, and they end with a meta record. Restore applies whole groups
//! (up to and including a meta record) and discards a trailing partial group, so restored
//! state always matches the input offset in the meta it restored.
//!
//! Writes to ordinary column families are one record per key, so compaction keeps the last
//! value of each. Writes to time buckets are packed: one record per bucket per group (split
//! at [`PACK_BYTES`]), numbered per bucket in the meta. A bucket is written while its time is
//! live and then dropped whole, so compaction has nothing to merge in it; what matters is
//! that a drop removes it, and the drop sends a tombstone for each of its packs. Packing
//! turns dedup's one changelog record per new key into a few per batch, and the compacted
//! changelog holds only live buckets.

use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;

use crate::error::{CoreError, Result};
use crate::read::read_range;
use crate::store::{bucket_of, Changes, PartitionMeta, PartitionStore};

const TAG_STATE: u8 = 1;
const TAG_META: u8 = 2;
const TAG_DROP: u8 = 3;
const TAG_PACK: u8 = 4;

/// Largest pack value: well under the producer's default 1 MB message limit.
const PACK_BYTES: usize = 256 << 10;

/// Name of the changelog topic of `group` for `input_topic`.
pub fn topic_name(group: &str, input_topic: &str) -> String {
    format!("{group}.{input_topic}.changelog")
}

/// One changelog record: key and value (None is a tombstone).
pub type Entry = (Vec<u8>, Option<Vec<u8>>);

/// Changelog entries of one committed batch, meta last. Numbers the batch's packs in
/// `meta.packs` (and forgets those of dropped buckets), so call it before the local commit
/// that stores `meta`.
pub fn encode(changes: &Changes, meta: &mut PartitionMeta) -> Result<Vec<Entry>> {
    let mut out = Vec::with_capacity(changes.len() + 1);
    let dropped: Vec<&str> = changes.drops().collect();
    for cf in &dropped {
        let mut k = vec![TAG_DROP];
        k.extend_from_slice(cf.as_bytes());
        out.push((k, Some(Vec::new())));
        for seq in 0..meta.packs.remove(*cf).unwrap_or(0) {
            out.push((pack_key(cf, seq)?, None));
        }
    }
    let mut pack: Option<(&str, Vec<u8>)> = None;
    for (cf, key, value) in changes.writes() {
        if bucket_of(cf).is_none() {
            let mut k = cf_key(TAG_STATE, cf)?;
            k.extend_from_slice(key);
            out.push((k, value.map(<[u8]>::to_vec)));
            continue;
        }
        // A write to a bucket dropped in the same batch never reaches the store.
        if dropped.contains(&cf) {
            continue;
        }
        match &mut pack {
            Some((open, buf)) if *open == cf && buf.len() < PACK_BYTES => {
                push_entry(buf, key, value)
            }
            _ => {
                if let Some((open, buf)) = pack.take() {
                    out.push(seal_pack(open, buf, meta)?);
                }
                let mut buf = Vec::new();
                push_entry(&mut buf, key, value);
                pack = Some((cf, buf));
            }
        }
    }
    if let Some((open, buf)) = pack {
        out.push(seal_pack(open, buf, meta)?);
    }
    out.push((vec![TAG_META], Some(encode_meta(meta)?)));
    Ok(out)
}

pub fn encode_meta(meta: &PartitionMeta) -> Result<Vec<u8>> {
    serde_json::to_vec(meta).map_err(|e| CoreError::Corrupt(format!("encode meta: {e}")))
}

/// `tag`, the length of `cf`, `cf`.
fn cf_key(tag: u8, cf: &str) -> Result<Vec<u8>> {
    let cf_len = u8::try_from(cf.len())
        .map_err(|_| CoreError::Corrupt(format!("column family name too long: {cf}")))?;
    let mut k = Vec::with_capacity(2 + cf.len() + 16);
    k.push(tag);
    k.push(cf_len);
    k.extend_from_slice(cf.as_bytes());
    Ok(k)
}

fn pack_key(cf: &str, seq: u64) -> Result<Vec<u8>> {
    let mut k = cf_key(TAG_PACK, cf)?;
    k.extend_from_slice(&seq.to_be_bytes());
    Ok(k)
}

fn seal_pack(cf: &str, buf: Vec<u8>, meta: &mut PartitionMeta) -> Result<Entry> {
    let seq = meta.packs.entry(cf.to_string()).or_insert(0);
    let key = pack_key(cf, *seq)?;
    *seq += 1;
    Ok((key, Some(buf)))
}

/// A pack entry: key length (u32), key, then 0 for a delete or 1, value length (u32), value.
fn push_entry(buf: &mut Vec<u8>, key: &[u8], value: Option<&[u8]>) {
    buf.extend_from_slice(&(key.len() as u32).to_be_bytes());
    buf.extend_from_slice(key);
    match value {
        None => buf.push(0),
        Some(v) => {
            buf.push(1);
            buf.extend_from_slice(&(v.len() as u32).to_be_bytes());
            buf.extend_from_slice(v);
        }
    }
}

/// Calls `f` with each entry of a pack, in the order they were packed.
fn unpack(mut rest: &[u8], mut f: impl FnMut(&[u8], Option<&[u8]>)) -> Result<()> {
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
        if rest.len() < n {
            return Err(CoreError::Corrupt("changelog pack truncated".into()));
        }
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Ok(head)
    }
    fn len(rest: &mut &[u8]) -> Result<usize> {
        let b = take(rest, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    while !rest.is_empty() {
        let n = len(&mut rest)?;
        let key = take(&mut rest, n)?;
        match take(&mut rest, 1)?[0] {
            0 => f(key, None),
            1 => {
                let n = len(&mut rest)?;
                f(key, Some(take(&mut rest, n)?));
            }
            t => return Err(CoreError::Corrupt(format!("changelog pack entry tag {t}"))),
        }
    }
    Ok(())
}

enum Decoded<'a> {
    State { cf: &'a str, key: &'a [u8] },
    Pack { cf: &'a str },
    Drop(&'a str),
    Meta,
}

fn decode_key<'a>(k: &'a [u8]) -> Result<Decoded<'a>> {
    let bad = || CoreError::Corrupt(format!("changelog key {k:?}"));
    let (&tag, rest) = k.split_first().ok_or_else(bad)?;
    // The length-prefixed column family name, and what follows it.
    let cf_and_rest = |rest: &'a [u8]| -> Result<(&'a str, &'a [u8])> {
        let (&n, rest) = rest.split_first().ok_or_else(bad)?;
        let (cf, tail) = (rest.get(..n as usize), rest.get(n as usize..));
        let cf = cf
            .and_then(|c| std::str::from_utf8(c).ok())
            .ok_or_else(bad)?;
        Ok((cf, tail.ok_or_else(bad)?))
    };
    match tag {
        TAG_META => Ok(Decoded::Meta),
        TAG_DROP => Ok(Decoded::Drop(std::str::from_utf8(rest).map_err(|_| bad())?)),
        TAG_STATE => {
            let (cf, key) = cf_and_rest(rest)?;
            Ok(Decoded::State { cf, key })
        }
        TAG_PACK => match cf_and_rest(rest)? {
            (cf, seq) if seq.len() == 8 => Ok(Decoded::Pack { cf }),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// The meta of the last complete group in `[from, to)`, if any.
pub fn last_meta(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
) -> Result<Option<PartitionMeta>> {
    let mut last = None;
    read_range(reader, topic, partition, from, to, IDLE, |m| {
        if let (Some(k), Some(v)) = (m.key(), m.payload()) {
            if let Decoded::Meta = decode_key(k)? {
                last = Some(decode_meta(v)?);
            }
        }
        Ok(())
    })?;
    Ok(last)
}

/// The meta of the changelog partition's last complete group in `[0, end)`. A group ends
/// with its meta, so the last record is usually it; `hint`, a position at or before that
/// group when known, bounds the search when a partial group trails.
pub fn head_meta(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    hint: i64,
    end: i64,
) -> Result<Option<PartitionMeta>> {
    if end <= 0 {
        return Ok(None);
    }
    // Disjoint ranges from the end backwards: each record is read at most once.
    let hint = hint.clamp(0, end - 1);
    for (from, to) in [(end - 1, end), (hint, end - 1), (0, hint)] {
        if let Some(m) = last_meta(reader, topic, partition, from, to)? {
            return Ok(Some(m));
        }
    }
    Ok(None)
}

const IDLE: Duration = Duration::from_secs(30);

fn decode_meta(v: &[u8]) -> Result<PartitionMeta> {
    serde_json::from_slice(v).map_err(|e| CoreError::Corrupt(format!("changelog meta: {e}")))
}

/// Rebuilds an empty `store` from the changelog range `[0, to)`, applying whole groups only.
/// `progress` receives the number of records read since its previous call.
/// Returns the number of records read and the meta of the last applied group.
pub fn restore(
    reader: &BaseConsumer,
    store: &mut PartitionStore,
    topic: &str,
    partition: i32,
    to: i64,
    mut progress: impl FnMut(u64),
) -> Result<(u64, Option<PartitionMeta>)> {
    let mut restorer = Restorer::default();
    let mut read = 0u64;
    read_range(reader, topic, partition, 0, to, IDLE, |m| {
        read += 1;
        if read.is_multiple_of(10_000) {
            progress(10_000);
        }
        match m.key() {
            Some(k) => restorer.apply(store, k, m.payload()),
            None => Ok(()),
        }
    })?;
    progress(read % 10_000);
    Ok((read, restorer.last_meta))
}

/// Applies changelog records in order, committing each group to the store at its meta.
#[derive(Default)]
struct Restorer {
    group: Changes,
    last_meta: Option<PartitionMeta>,
}

impl Restorer {
    fn apply(&mut self, store: &mut PartitionStore, k: &[u8], v: Option<&[u8]>) -> Result<()> {
        let group = &mut self.group;
        match decode_key(k)? {
            Decoded::State { cf, key } => match v {
                Some(v) => group.put(cf, key, v),
                None => group.delete(cf, key),
            },
            Decoded::Pack { cf } => {
                // A pack's tombstone follows its bucket's drop: nothing left to apply.
                if let Some(v) = v {
                    unpack(v, |key, value| match value {
                        Some(value) => group.put(cf, key, value),
                        None => group.delete(cf, key),
                    })?
                }
            }
            Decoded::Drop(cf) => {
                let bucket = bucket_of(cf).unwrap_or(cf).to_string();
                group.drop_bucket(&bucket);
            }
            Decoded::Meta => {
                let meta = decode_meta(v.unwrap_or_default())?;
                store.commit(group, &meta)?;
                group.clear();
                self.last_meta = Some(meta);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::store::{bucket_cf, DEFAULT_CF};

    fn describe(entries: &[Entry]) -> Vec<String> {
        entries
            .iter()
            .map(|(k, v)| match decode_key(k).unwrap() {
                Decoded::State { cf, key } => format!("{cf}:{}", String::from_utf8_lossy(key)),
                Decoded::Pack { cf } if v.is_none() => format!("tombstone {cf}"),
                Decoded::Pack { cf } => {
                    let mut keys = Vec::new();
                    unpack(v.as_deref().unwrap(), |k, _| {
                        keys.push(String::from_utf8_lossy(k).into_owned())
                    })
                    .unwrap();
                    format!("pack {cf}:{}", keys.join(","))
                }
                Decoded::Drop(cf) => format!("drop {cf}"),
                Decoded::Meta => "meta".into(),
            })
            .collect()
    }

    #[test]
    fn bucket_writes_are_packed_and_a_drop_tombstones_its_packs() {
        let mut meta = PartitionMeta::default();
        let mut c = Changes::default();
        c.put(DEFAULT_CF, b"k", b"v");
        c.put(&bucket_cf("7"), b"a", b"1");
        c.delete(&bucket_cf("7"), b"gone");
        c.put(&bucket_cf("8"), b"b", b"2");
        let first = encode(&c, &mut meta).unwrap();
        assert_eq!(
            describe(&first),
            [
                "pack bucket.7:a,gone",
                "default:k",
                "pack bucket.8:b",
                "meta"
            ]
        );
        let mut c = Changes::default();
        c.put(&bucket_cf("7"), b"c", b"3");
        encode(&c, &mut meta).unwrap();
        assert_eq!(meta.packs.get(&bucket_cf("7")), Some(&2));
        let mut c = Changes::default();
        c.drop_bucket("7");
        c.put(&bucket_cf("7"), b"late", b"4");
        let dropped = encode(&c, &mut meta).unwrap();
        assert_eq!(
            describe(&dropped),
            [
                "drop bucket.7",
                "tombstone bucket.7",
                "tombstone bucket.7",
                "meta"
            ]
        );
        assert_eq!(
            dropped[1].0, first[0].0,
            "the tombstone hits the first pack's key"
        );
        assert_eq!(meta.packs.keys().collect::<Vec<_>>(), [&bucket_cf("8")]);
        assert!(decode_key(&[9]).is_err());
        assert!(decode_key(&[TAG_STATE, 200, b'a']).is_err());
        assert!(decode_key(&[TAG_PACK, 1, b'a', 0]).is_err());
    }

    #[test]
    fn a_large_batch_is_split_into_packs_that_unpack_in_order() {
        let mut meta = PartitionMeta::default();
        let mut c = Changes::default();
        let value = vec![7u8; 1000];
        for i in 0..600u32 {
            c.put(&bucket_cf("1"), &i.to_be_bytes(), &value);
        }
        let entries = encode(&c, &mut meta).unwrap();
        assert_eq!(entries.len(), 4, "600 kB in 256 KiB packs, then meta");
        let mut keys = Vec::new();
        for (_, v) in &entries[..3] {
            let v = v.as_deref().unwrap();
            assert!(v.len() < PACK_BYTES + 1100);
            unpack(v, |k, val| {
                assert_eq!(val, Some(&value[..]));
                keys.push(u32::from_be_bytes(k.try_into().unwrap()));
            })
            .unwrap();
        }
        assert_eq!(keys, (0..600).collect::<Vec<_>>());
        for cut in [1, 3, 5, 9, 1003] {
            let v = entries[0].1.as_deref().unwrap();
            assert!(unpack(&v[..cut], |_, _| {}).is_err(), "cut at {cut}");
        }
    }

    /// Every key's last record, tombstones removed: what a restore reads after compaction.
    fn compacted(log: &[Entry]) -> Vec<Entry> {
        let mut last: BTreeMap<&[u8], usize> = BTreeMap::new();
        for (i, (k, _)) in log.iter().enumerate() {
            last.insert(k, i);
        }
        let mut keep: Vec<usize> = last.into_values().collect();
        keep.sort_unstable();
        keep.into_iter()
            .map(|i| log[i].clone())
            .filter(|(_, v)| v.is_some())
            .collect()
    }

    fn contents(store: &PartitionStore) -> Vec<(String, Vec<u8>, Vec<u8>)> {
        let mut cfs: Vec<String> = store.buckets().iter().map(|b| bucket_cf(b)).collect();
        cfs.push(DEFAULT_CF.into());
        let mut out = Vec::new();
        for cf in cfs {
            for (k, v) in store.scan_prefix(&cf, b"").unwrap() {
                out.push((cf.clone(), k, v));
            }
        }
        out
    }

    #[test]
    fn a_compacted_changelog_restores_the_same_state_and_holds_no_dropped_bucket() {
        let dir = tempfile::tempdir().unwrap();
        let mut live = PartitionStore::open(&dir.path().join("live")).unwrap();
        let mut meta = PartitionMeta::default();
        let mut log = Vec::new();
        for batch in 0..30u32 {
            let mut c = Changes::default();
            // Buckets of 10 batches; a bucket is dropped when the next one starts.
            let bucket = batch / 10;
            if batch % 10 == 0 && bucket >= 1 {
                c.drop_bucket(&(bucket - 1).to_string());
            }
            for i in 0..5u32 {
                let key = format!("key-{batch}-{i}");
                c.put(&bucket_cf(&bucket.to_string()), key.as_bytes(), b"h");
            }
            c.put(DEFAULT_CF, b"watermark", &batch.to_be_bytes());
            meta.next_offset = i64::from(batch + 1) * 5;
            log.extend(encode(&c, &mut meta).unwrap());
            live.commit(&c, &meta).unwrap();
        }
        let restore = |name: &str, log: &[Entry]| {
            let mut store = PartitionStore::open(&dir.path().join(name)).unwrap();
            let mut r = Restorer::default();
            for (k, v) in log {
                r.apply(&mut store, k, v.as_deref()).unwrap();
            }
            (store, r.last_meta.unwrap())
        };
        let compact = compacted(&log);
        for (name, log) in [("full", &log), ("compacted", &compact)] {
            let (store, restored_meta) = restore(name, log);
            assert_eq!(contents(&store), contents(&live), "{name}");
            assert_eq!(store.buckets(), ["2"], "{name}");
            assert_eq!(restored_meta, meta, "{name}");
        }
        let left = describe(&compact);
        assert!(
            !left
                .iter()
                .any(|e| e.starts_with("pack bucket.0") || e.starts_with("pack bucket.1")),
            "a dropped bucket's packs outlived compaction: {left:?}"
        );
        assert_eq!(
            left.len(),
            10 + 2 + 2,
            "bucket 2's packs, two drops, watermark, meta"
        );
    }
}
