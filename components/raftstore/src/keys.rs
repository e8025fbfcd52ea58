//! Keys of the per-region state in the KV engine's meta column family.

const REGION_PREFIX: &[u8] = b"r/";
const STATE_SUFFIX: u8 = b's';
const APPLY_SUFFIX: u8 = b'a';
const CLEANUP_SUFFIX: u8 = b'c';
const INSTALL_SUFFIX: u8 = b'i';

/// Node identity (cluster id and node id), written once at bootstrap.
pub const NODE_IDENT_KEY: &[u8] = b"node_ident";

/// A cluster bootstrap this node has started but PD has not confirmed yet:
/// the intended identity and first region.
pub const PREPARED_BOOTSTRAP_KEY: &[u8] = b"prepared_bootstrap";

pub fn region_state_key(region_id: u64) -> Vec<u8> {
    region_key(region_id, STATE_SUFFIX)
}

pub fn apply_state_key(region_id: u64) -> Vec<u8> {
    region_key(region_id, APPLY_SUFFIX)
}

/// Set, with the `Tombstone` region state, when a membership change
/// removes this node's replica: its data is still to be deleted (see
/// `snapshot::clear_removed`).
pub fn cleanup_key(region_id: u64) -> Vec<u8> {
    region_key(region_id, CLEANUP_SUFFIX)
}

/// Set while a region snapshot is being installed (see
/// `snapshot::install`): a `SnapshotInstall`.
pub fn install_key(region_id: u64) -> Vec<u8> {
    region_key(region_id, INSTALL_SUFFIX)
}

fn region_key(region_id: u64, suffix: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(REGION_PREFIX.len() + 9);
    k.extend_from_slice(REGION_PREFIX);
    k.extend_from_slice(&region_id.to_be_bytes());
    k.push(suffix);
    k
}

/// Bounds of every region key (state, apply state, marks), for scanning
/// them at start-up.
pub fn region_key_bounds() -> (Vec<u8>, Vec<u8>) {
    (REGION_PREFIX.to_vec(), b"r0".to_vec())
}

/// The region id of a region key, if `key` is a region state key.
pub fn decode_region_state_key(key: &[u8]) -> Option<u64> {
    decode_region_key(key, STATE_SUFFIX)
}

/// The region id of a region key, if `key` is a snapshot install key.
pub fn decode_install_key(key: &[u8]) -> Option<u64> {
    decode_region_key(key, INSTALL_SUFFIX)
}

fn decode_region_key(key: &[u8], suffix: u8) -> Option<u64> {
    let rest = key.strip_prefix(REGION_PREFIX)?;
    if rest.len() != 9 || rest[8] != suffix {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&rest[..8]);
    Some(u64::from_be_bytes(id))
}

const LOCK_PREFIX: &[u8] = b"l/";
const TXN_RECORD_PREFIX: &[u8] = b"t/";

/// A transaction lock of region `region_id` (see `txn`).
pub fn txn_lock_key(region_id: u64, txn_id: u64) -> Vec<u8> {
    let mut k = txn_lock_prefix(region_id);
    k.extend_from_slice(&txn_id.to_be_bytes());
    k
}

/// Bounds of region `region_id`'s transaction locks.
pub fn txn_lock_bounds(region_id: u64) -> (Vec<u8>, Vec<u8>) {
    (
        txn_lock_prefix(region_id),
        txn_lock_prefix(region_id.wrapping_add(1)),
    )
}

fn txn_lock_prefix(region_id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(LOCK_PREFIX.len() + 16);
    k.extend_from_slice(LOCK_PREFIX);
    k.extend_from_slice(&region_id.to_be_bytes());
    k
}

/// The decision record of transaction `txn_id` whose primary key is
/// `primary_key`: keyed by the memcomparable primary key, so the records
/// a region owns are those between its encoded start and end keys, across
/// splits.
pub fn txn_record_key(primary_key: &[u8], txn_id: u64) -> Vec<u8> {
    let mut k = txn_record_bound(primary_key);
    k.extend_from_slice(&txn_id.to_be_bytes());
    k
}

/// Bounds of the decision records of the primary keys in `[start, end)`
/// (empty `end`: unbounded).
pub fn txn_record_bounds(start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let upper = if end.is_empty() {
        b"t0".to_vec()
    } else {
        txn_record_bound(end)
    };
    (txn_record_bound(start), upper)
}

fn txn_record_bound(key: &[u8]) -> Vec<u8> {
    keyed_bound(TXN_RECORD_PREFIX, key)
}

/// The primary key of a decision record key.
pub fn decode_txn_record_key(key: &[u8]) -> Option<Vec<u8>> {
    let rest = key.strip_prefix(TXN_RECORD_PREFIX)?;
    let (primary, used) = mvcc::codec::decode_bytes(rest).ok()?;
    (rest.len() == used + 8).then_some(primary)
}

const MERGE_RECORD_PREFIX: &[u8] = b"m/";

/// The decision about merging region `source_id`, whose range ended at
/// `end_key` (see `merge`): keyed by the memcomparable end key, so the
/// region owning that key holds it, across splits and merges.
pub fn merge_record_key(end_key: &[u8], source_id: u64) -> Vec<u8> {
    let mut k = keyed_bound(MERGE_RECORD_PREFIX, end_key);
    k.extend_from_slice(&source_id.to_be_bytes());
    k
}

/// Bounds of the merge records of the end keys in `[start, end)` (empty
/// `end`: unbounded).
pub fn merge_record_bounds(start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let upper = if end.is_empty() {
        b"m0".to_vec()
    } else {
        keyed_bound(MERGE_RECORD_PREFIX, end)
    };
    (keyed_bound(MERGE_RECORD_PREFIX, start), upper)
}

/// The end key of a merge record key.
pub fn decode_merge_record_key(key: &[u8]) -> Option<Vec<u8>> {
    let rest = key.strip_prefix(MERGE_RECORD_PREFIX)?;
    let (end_key, used) = mvcc::codec::decode_bytes(rest).ok()?;
    (rest.len() == used + 8).then_some(end_key)
}

const LEASE_RECORD_PREFIX: &[u8] = b"e/";

/// The record of the lease whose owner key (`lease::owner_key`) is
/// `owner`: keyed by the memcomparable owner key, so the region owning
/// that key holds it, across splits and merges.
pub fn lease_record_key(owner: &[u8]) -> Vec<u8> {
    keyed_bound(LEASE_RECORD_PREFIX, owner)
}

/// Bounds of the lease records of the owner keys in `[start, end)` (empty
/// `end`: unbounded).
pub fn lease_record_bounds(start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let upper = if end.is_empty() {
        b"e0".to_vec()
    } else {
        keyed_bound(LEASE_RECORD_PREFIX, end)
    };
    (keyed_bound(LEASE_RECORD_PREFIX, start), upper)
}

const LEASE_KEY_PREFIX: &[u8] = b"a/";

/// The attachment of the key `key` to the lease whose owner key is
/// `owner`: keyed by the memcomparable owner key, then the key, so the
/// region owning the owner key holds it (as the lease's record) and a
/// lease's attachments are one prefix.
pub fn lease_key_key(owner: &[u8], key: &[u8]) -> Vec<u8> {
    let mut k = lease_key_prefix(owner);
    k.extend_from_slice(key);
    k
}

/// The prefix of every attachment of the lease whose owner key is `owner`.
pub fn lease_key_prefix(owner: &[u8]) -> Vec<u8> {
    keyed_bound(LEASE_KEY_PREFIX, owner)
}

/// Bounds of the attachments of the owner keys in `[start, end)` (empty
/// `end`: unbounded).
pub fn lease_key_bounds(start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let upper = if end.is_empty() {
        b"a0".to_vec()
    } else {
        keyed_bound(LEASE_KEY_PREFIX, end)
    };
    (keyed_bound(LEASE_KEY_PREFIX, start), upper)
}

/// The owner key and attached key of an attachment key.
pub fn decode_lease_key_key(key: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let rest = key.strip_prefix(LEASE_KEY_PREFIX)?;
    let (owner, used) = mvcc::codec::decode_bytes(rest).ok()?;
    Some((owner, rest[used..].to_vec()))
}

/// The least key above every key starting with `prefix` (`prefix` does
/// not consist of 0xff bytes only).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            break;
        }
    }
    end
}

fn keyed_bound(prefix: &[u8], key: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&mvcc::codec::encode_bytes(key));
    k
}
