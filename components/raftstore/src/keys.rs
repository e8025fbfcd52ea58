//! Keys of the per-region state in the KV engine's meta column family.

const REGION_PREFIX: &[u8] = b"r/";
const STATE_SUFFIX: u8 = b's';
const APPLY_SUFFIX: u8 = b'a';

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

fn region_key(region_id: u64, suffix: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(REGION_PREFIX.len() + 9);
    k.extend_from_slice(REGION_PREFIX);
    k.extend_from_slice(&region_id.to_be_bytes());
    k.push(suffix);
    k
}

/// Bounds of every region state key, for scanning them at start-up.
pub fn region_state_bounds() -> (Vec<u8>, Vec<u8>) {
    (REGION_PREFIX.to_vec(), b"r0".to_vec())
}

/// The region id of a region key, if `key` is a region state key.
pub fn decode_region_state_key(key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(REGION_PREFIX)?;
    if rest.len() != 9 || rest[8] != STATE_SUFFIX {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&rest[..8]);
    Some(u64::from_be_bytes(id))
}
