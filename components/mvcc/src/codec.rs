//! Key and value encodings of the MVCC column families.
//!
//! * MVCC CF key: `encode_bytes(user_key) ++ be64(u64::MAX - revision)`. The
//!   memcomparable `encode_bytes` keeps user keys in byte order and makes them
//!   prefix-free, so the versions of one key are contiguous and sorted newest
//!   first: a seek to `encode_bytes(k) ++ be64(!r)` lands on the newest
//!   version of `k` at or below revision `r`.
//! * Revision CF key: `be64(revision) ++ be32(sub)` → user key. One entry per
//!   change, in commit order: the order by revision that change listing
//!   (watch replay) needs. Compaction, hashing and region snapshots do not
//!   read it; they walk a key range of the MVCC CF and find a version's
//!   entry here from the sub-revision in its record.
//! * Version record (MVCC CF value), big-endian:
//!   - kind 2, a put: `2 u8 | sub u32 | create i64 | version i64 | lease i64
//!     | value bytes`;
//!   - kind 3, a tombstone (a delete): `3 u8 | sub u32`.
//!
//!   `sub` is the change's sub-revision, so the version's revision CF key
//!   `be64(revision) ++ be32(sub)` is known from the MVCC CF alone. Records
//!   written before sub-revisions were stored (kind 0, a put: `0 | create |
//!   version | lease | value`; kind 1, a tombstone: `1`) are still read;
//!   their sub-revision is unknown ([`record_sub`] answers `None`) and is
//!   found in the revision CF under `be64(revision)` (the entry whose value
//!   is the key; a revision has few changes). Nothing rewrites them: they
//!   go away with compaction or stay readable.
//! * Key index CF (`mvcc_keys`): the MVCC CF's keys, each → one byte, 0 if
//!   the version stored under it is a put, 1 if a tombstone. Counting walks
//!   it instead of the version records (see `index.rs`).

use crate::{Error, Result};

const GROUP: usize = 8;
const MARKER: u8 = 0xFF;
const PAD: u8 = 0;

/// Memcomparable encoding: 8-byte groups, each followed by a marker byte
/// `0xFF - padding`, so that `a < b` iff `encode(a) < encode(b)` and no
/// encoded key is a prefix of another.
pub fn encode_bytes(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity((key.len() / GROUP + 1) * (GROUP + 1) + 8);
    encode_bytes_to(key, &mut out);
    out
}

fn encode_bytes_to(key: &[u8], out: &mut Vec<u8>) {
    let mut chunks = key.chunks_exact(GROUP);
    for chunk in &mut chunks {
        out.extend_from_slice(chunk);
        out.push(MARKER);
    }
    let rest = chunks.remainder();
    out.extend_from_slice(rest);
    out.extend(std::iter::repeat_n(PAD, GROUP - rest.len()));
    out.push(MARKER - (GROUP - rest.len()) as u8);
}

/// Inverse of [`encode_bytes`]; returns the user key and the number of input
/// bytes consumed.
pub fn decode_bytes(data: &[u8]) -> Result<(Vec<u8>, usize)> {
    let mut key = Vec::with_capacity(data.len());
    let mut offset = 0;
    loop {
        let group = data
            .get(offset..offset + GROUP + 1)
            .ok_or_else(|| Error::Corrupted("truncated encoded key".into()))?;
        let marker = group[GROUP];
        let pad = (MARKER - marker) as usize;
        if pad > GROUP {
            return Err(Error::Corrupted("bad key group marker".into()));
        }
        key.extend_from_slice(&group[..GROUP - pad]);
        offset += GROUP + 1;
        if pad != 0 {
            return Ok((key, offset));
        }
    }
}

/// The MVCC CF key of `user_key` at `revision`.
pub fn mvcc_key(user_key: &[u8], revision: i64) -> Vec<u8> {
    let mut out = encode_bytes(user_key);
    out.extend_from_slice(&(u64::MAX - revision as u64).to_be_bytes());
    out
}

/// Splits an MVCC CF key into user key and revision.
pub fn decode_mvcc_key(key: &[u8]) -> Result<(Vec<u8>, i64)> {
    let (user_key, used) = decode_bytes(key)?;
    let rev = key
        .get(used..used + 8)
        .and_then(|b| b.try_into().ok())
        .map(|b: [u8; 8]| (u64::MAX - u64::from_be_bytes(b)) as i64)
        .ok_or_else(|| Error::Corrupted("mvcc key without revision".into()))?;
    Ok((user_key, rev))
}

/// Lower bound (inclusive) of the MVCC CF keys of user keys `>= key`.
pub fn mvcc_lower_bound(key: &[u8]) -> Vec<u8> {
    encode_bytes(key)
}

/// Upper bound (exclusive) of the MVCC CF keys of user keys `< end`; an
/// empty `end` means unbounded and yields an empty bound.
pub fn mvcc_upper_bound(end: &[u8]) -> Vec<u8> {
    if end.is_empty() {
        Vec::new()
    } else {
        encode_bytes(end)
    }
}

/// Seek target just past every version of `user_key` (revision 0 is never
/// stored, so its slot sorts after all real versions).
pub fn mvcc_key_end(user_key: &[u8]) -> Vec<u8> {
    mvcc_key(user_key, 0)
}

/// Splits an MVCC CF key into the encoded user key and the revision,
/// without decoding the user key.
pub fn split_mvcc_key(key: &[u8]) -> Result<(&[u8], i64)> {
    let at = key
        .len()
        .checked_sub(8)
        .ok_or_else(|| Error::Corrupted("mvcc key without revision".into()))?;
    let (user_key, rev) = key.split_at(at);
    let mut b = [0u8; 8];
    b.copy_from_slice(rev);
    Ok((user_key, (u64::MAX - u64::from_be_bytes(b)) as i64))
}

const INDEX_PUT: u8 = 0;
const INDEX_TOMBSTONE: u8 = 1;

/// The key index value of a version: its kind.
pub fn key_index_value(tombstone: bool) -> [u8; 1] {
    [if tombstone {
        INDEX_TOMBSTONE
    } else {
        INDEX_PUT
    }]
}

/// Whether a key index value says tombstone.
pub fn key_index_is_tombstone(value: &[u8]) -> Result<bool> {
    match value {
        [INDEX_PUT] => Ok(false),
        [INDEX_TOMBSTONE] => Ok(true),
        _ => Err(Error::Corrupted("key index value".into())),
    }
}

pub fn revision_key(revision: i64, sub: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&(revision as u64).to_be_bytes());
    out[8..].copy_from_slice(&sub.to_be_bytes());
    out
}

pub fn decode_revision_key(key: &[u8]) -> Result<(i64, u32)> {
    if key.len() != 12 {
        return Err(Error::Corrupted("revision key length".into()));
    }
    let mut rev = [0u8; 8];
    rev.copy_from_slice(&key[..8]);
    let mut sub = [0u8; 4];
    sub.copy_from_slice(&key[8..]);
    Ok((u64::from_be_bytes(rev) as i64, u32::from_be_bytes(sub)))
}

/// One stored version of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Version {
    Put {
        create_revision: i64,
        version: i64,
        lease: i64,
        value: Vec<u8>,
    },
    Tombstone,
}

/// Record kinds written before sub-revisions were stored.
const KIND_PUT_LEGACY: u8 = 0;
const KIND_TOMBSTONE_LEGACY: u8 = 1;
const KIND_PUT: u8 = 2;
const KIND_TOMBSTONE: u8 = 3;

/// Whether the version record `data` is a tombstone (either format),
/// without decoding it.
pub fn is_tombstone(data: &[u8]) -> bool {
    matches!(data.first(), Some(&KIND_TOMBSTONE | &KIND_TOMBSTONE_LEGACY))
}

/// The sub-revision stored in the version record `data`: `None` for a
/// record of the old format (see the module docs), which has none.
pub fn record_sub(data: &[u8]) -> Result<Option<u32>> {
    match data.first() {
        Some(&KIND_PUT_LEGACY | &KIND_TOMBSTONE_LEGACY) => Ok(None),
        Some(&KIND_PUT | &KIND_TOMBSTONE) => data
            .get(1..5)
            .and_then(|b| b.try_into().ok())
            .map(|b: [u8; 4]| Some(u32::from_be_bytes(b)))
            .ok_or_else(|| Error::Corrupted("version record without sub-revision".into())),
        _ => Err(Error::Corrupted("version record kind".into())),
    }
}

/// What a version record says apart from its sub-revision, in a form the
/// same for both formats: whether it is a tombstone, and the bytes after
/// the kind and sub-revision (a put's create revision, version, lease and
/// value; nothing for a tombstone).
pub fn record_content(data: &[u8]) -> Result<(bool, &[u8])> {
    let fields = match record_sub(data)? {
        None => &data[1..],
        Some(_) => &data[5..],
    };
    Ok((is_tombstone(data), fields))
}

impl Version {
    /// The record of this version, changed at sub-revision `sub` of its
    /// revision.
    pub fn encode(&self, sub: u32) -> Vec<u8> {
        match self {
            Version::Put { value, .. } => {
                let mut out = Vec::with_capacity(29 + value.len());
                out.push(KIND_PUT);
                out.extend_from_slice(&sub.to_be_bytes());
                self.put_fields(&mut out);
                out
            }
            Version::Tombstone => {
                let mut out = vec![KIND_TOMBSTONE];
                out.extend_from_slice(&sub.to_be_bytes());
                out
            }
        }
    }

    /// The record in the format before sub-revisions were stored: what
    /// older versions wrote (tests of reading it), and a canonical form of
    /// a version's content alone (hashing: two replicas holding the same
    /// version in different formats hash it alike).
    pub fn encode_legacy(&self) -> Vec<u8> {
        match self {
            Version::Put { value, .. } => {
                let mut out = Vec::with_capacity(25 + value.len());
                out.push(KIND_PUT_LEGACY);
                self.put_fields(&mut out);
                out
            }
            Version::Tombstone => vec![KIND_TOMBSTONE_LEGACY],
        }
    }

    fn put_fields(&self, out: &mut Vec<u8>) {
        if let Version::Put {
            create_revision,
            version,
            lease,
            value,
        } = self
        {
            out.extend_from_slice(&create_revision.to_be_bytes());
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(&lease.to_be_bytes());
            out.extend_from_slice(value);
        }
    }

    /// Decodes a record of either format (the sub-revision is
    /// [`record_sub`]'s business).
    pub fn decode(data: &[u8]) -> Result<Version> {
        let put = |fields: &[u8]| {
            if fields.len() < 24 {
                return Err(Error::Corrupted("version record".into()));
            }
            let int = |at: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&fields[at..at + 8]);
                i64::from_be_bytes(b)
            };
            Ok(Version::Put {
                create_revision: int(0),
                version: int(8),
                lease: int(16),
                value: fields[24..].to_vec(),
            })
        };
        match data.first() {
            Some(&KIND_TOMBSTONE_LEGACY) if data.len() == 1 => Ok(Version::Tombstone),
            Some(&KIND_TOMBSTONE) if data.len() == 5 => Ok(Version::Tombstone),
            Some(&KIND_PUT_LEGACY) => put(&data[1..]),
            Some(&KIND_PUT) if data.len() >= 5 => put(&data[5..]),
            _ => Err(Error::Corrupted("version record".into())),
        }
    }

    pub fn is_tombstone(&self) -> bool {
        matches!(self, Version::Tombstone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_bytes_keeps_order_and_is_prefix_free() {
        let keys: Vec<&[u8]> = vec![
            b"",
            b"\0",
            b"\0\0",
            b"a",
            b"a\0",
            b"a\0\0\0\0\0\0\0",
            b"a\0\0\0\0\0\0\0\0",
            b"abcdefgh",
            b"abcdefghi",
            b"b",
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        ];
        for a in &keys {
            let ea = encode_bytes(a);
            assert_eq!(decode_bytes(&ea).unwrap(), (a.to_vec(), ea.len()));
            for b in &keys {
                let eb = encode_bytes(b);
                assert_eq!(a.cmp(b), ea.cmp(&eb), "{a:?} vs {b:?}");
                if a != b {
                    assert!(!eb.starts_with(&ea), "{a:?} is a prefix of {b:?}");
                }
            }
        }
    }

    #[test]
    fn mvcc_keys_sort_newest_first_within_a_key() {
        let k5 = mvcc_key(b"k", 5);
        let k4 = mvcc_key(b"k", 4);
        let next = mvcc_key(b"k\0", 9);
        assert!(k5 < k4);
        assert!(k4 < mvcc_key_end(b"k"));
        assert!(mvcc_key_end(b"k") < next);
        assert_eq!(decode_mvcc_key(&k4).unwrap(), (b"k".to_vec(), 4));
    }

    #[test]
    fn split_mvcc_key_keeps_the_encoded_key() {
        let key = mvcc_key(b"abcdefghi", 42);
        let (encoded, rev) = split_mvcc_key(&key).unwrap();
        assert_eq!((encoded, rev), (encode_bytes(b"abcdefghi").as_slice(), 42));
        assert!(split_mvcc_key(&[1, 2, 3]).is_err());
    }

    #[test]
    fn key_index_values_and_record_kinds() {
        let put = Version::Put {
            create_revision: 1,
            version: 1,
            lease: 0,
            value: vec![1],
        };
        assert!(!is_tombstone(&put.encode(3)));
        assert!(!is_tombstone(&put.encode_legacy()));
        assert!(is_tombstone(&Version::Tombstone.encode(3)));
        assert!(is_tombstone(&Version::Tombstone.encode_legacy()));
        for tombstone in [false, true] {
            assert_eq!(
                key_index_is_tombstone(&key_index_value(tombstone)).unwrap(),
                tombstone
            );
        }
        assert!(key_index_is_tombstone(&[]).is_err());
        assert!(key_index_is_tombstone(&[2]).is_err());
    }

    #[test]
    fn version_round_trip() {
        let v = Version::Put {
            create_revision: 3,
            version: 2,
            lease: 7,
            value: b"val".to_vec(),
        };
        assert_eq!(Version::decode(&v.encode(4)).unwrap(), v);
        assert_eq!(record_sub(&v.encode(4)).unwrap(), Some(4));
        assert!(!is_tombstone(&v.encode(4)));
        let t = Version::Tombstone.encode(u32::MAX);
        assert_eq!(Version::decode(&t).unwrap(), Version::Tombstone);
        assert_eq!(record_sub(&t).unwrap(), Some(u32::MAX));
        assert!(is_tombstone(&t));
        assert!(Version::decode(&[0, 1]).is_err());
        assert!(Version::decode(&[2, 0, 0, 0, 1, 9]).is_err());
        assert!(Version::decode(&[3, 0, 0]).is_err());
        assert!(record_sub(&[3, 0, 0]).is_err());
        assert!(Version::decode(&[]).is_err());
        assert!(Version::decode(&[7]).is_err());
    }

    #[test]
    fn old_format_records_still_decode() {
        let v = Version::Put {
            create_revision: 3,
            version: 2,
            lease: 7,
            value: b"val".to_vec(),
        };
        // The exact bytes older versions wrote.
        let mut old = vec![0u8];
        for n in [3i64, 2, 7] {
            old.extend_from_slice(&n.to_be_bytes());
        }
        old.extend_from_slice(b"val");
        assert_eq!(v.encode_legacy(), old);
        assert_eq!(Version::decode(&old).unwrap(), v);
        assert_eq!(record_sub(&old).unwrap(), None);
        assert_eq!(Version::decode(&[1]).unwrap(), Version::Tombstone);
        assert_eq!(record_sub(&[1]).unwrap(), None);
        assert!(is_tombstone(&[1]));
    }

    #[test]
    fn revision_keys_sort_by_revision_then_sub() {
        assert!(revision_key(2, 9) < revision_key(3, 0));
        assert!(revision_key(3, 0) < revision_key(3, 1));
        assert_eq!(decode_revision_key(&revision_key(7, 3)).unwrap(), (7, 3));
    }
}
