//! Key and value encodings of the MVCC column families.
//!
//! * MVCC CF key: `encode_bytes(user_key) ++ be64(u64::MAX - revision)`. The
//!   memcomparable `encode_bytes` keeps user keys in byte order and makes them
//!   prefix-free, so the versions of one key are contiguous and sorted newest
//!   first: a seek to `encode_bytes(k) ++ be64(!r)` lands on the newest
//!   version of `k` at or below revision `r`.
//! * Revision CF key: `be64(revision) ++ be32(sub)` → user key. One entry per
//!   change, in commit order, for watch replay, compaction and hashing.
//! * Version record (MVCC CF value): `kind u8 | create i64 | version i64 |
//!   lease i64 | value bytes`, big-endian; a tombstone has kind 1 and no
//!   other fields.
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

/// Whether an encoded version record is a tombstone, from its kind byte
/// alone (no decoding, no copy).
pub fn record_is_tombstone(record: &[u8]) -> bool {
    record.first() == Some(&KIND_TOMBSTONE)
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

const KIND_PUT: u8 = 0;
const KIND_TOMBSTONE: u8 = 1;

impl Version {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Version::Put {
                create_revision,
                version,
                lease,
                value,
            } => {
                let mut out = Vec::with_capacity(25 + value.len());
                out.push(KIND_PUT);
                out.extend_from_slice(&create_revision.to_be_bytes());
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&lease.to_be_bytes());
                out.extend_from_slice(value);
                out
            }
            Version::Tombstone => vec![KIND_TOMBSTONE],
        }
    }

    pub fn decode(data: &[u8]) -> Result<Version> {
        match data.first() {
            Some(&KIND_TOMBSTONE) => Ok(Version::Tombstone),
            Some(&KIND_PUT) if data.len() >= 25 => {
                let int = |at: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[at..at + 8]);
                    i64::from_be_bytes(b)
                };
                Ok(Version::Put {
                    create_revision: int(1),
                    version: int(9),
                    lease: int(17),
                    value: data[25..].to_vec(),
                })
            }
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
        assert!(!record_is_tombstone(&put.encode()));
        assert!(record_is_tombstone(&Version::Tombstone.encode()));
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
        assert_eq!(Version::decode(&v.encode()).unwrap(), v);
        assert_eq!(
            Version::decode(&Version::Tombstone.encode()).unwrap(),
            Version::Tombstone
        );
        assert!(Version::decode(&[0, 1]).is_err());
        assert!(Version::decode(&[]).is_err());
    }

    #[test]
    fn revision_keys_sort_by_revision_then_sub() {
        assert!(revision_key(2, 9) < revision_key(3, 0));
        assert!(revision_key(3, 0) < revision_key(3, 1));
        assert_eq!(decode_revision_key(&revision_key(7, 3)).unwrap(), (7, 3));
    }
}
