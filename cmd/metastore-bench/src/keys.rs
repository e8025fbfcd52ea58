//! Key and value generation, byte-compatible with etcd's benchmark so that
//! both tools write the same keys: a `key_size`-byte zero buffer holding the
//! key number as a Go `binary.PutVarint` (zigzag varint) at its start.

use rand::RngCore;

/// Bytes Go's `binary.PutVarint` needs for `n`.
pub fn varint_len(n: u64) -> usize {
    let mut ux = zigzag(n);
    let mut len = 1;
    while ux >= 0x80 {
        ux >>= 7;
        len += 1;
    }
    len
}

fn zigzag(n: u64) -> u64 {
    // Key numbers are non-negative int64 in etcd's tool, so zigzag is a shift.
    n << 1
}

/// Key number `n` as etcd's benchmark writes it.
pub fn key(n: u64, key_size: usize) -> Vec<u8> {
    let mut k = vec![0u8; key_size];
    let mut ux = zigzag(n);
    let mut i = 0;
    while i < key_size {
        if ux < 0x80 {
            k[i] = ux as u8;
            break;
        }
        k[i] = (ux as u8) | 0x80;
        ux >>= 7;
        i += 1;
    }
    k
}

/// Checks that `key_size` can tell `key_space_size` keys apart; with a
/// shorter key, distinct key numbers would silently collapse.
pub fn check_key_size(key_size: usize, key_space_size: u64) -> Result<(), String> {
    let need = varint_len(key_space_size.saturating_sub(1));
    if key_size < need {
        return Err(format!(
            "--key-size {key_size} is too small for --key-space-size {key_space_size} \
             (needs at least {need} bytes)"
        ));
    }
    Ok(())
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_go_put_varint() {
        // Values from Go: b := make([]byte, 8); binary.PutVarint(b, n)
        assert_eq!(key(0, 8), vec![0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(key(1, 8), vec![2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(key(63, 8), vec![126, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(key(64, 8), vec![0x80, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(key(99_999, 8), vec![0xbe, 0x9a, 0x0c, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn distinct_numbers_give_distinct_keys() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..100_000 {
            assert!(seen.insert(key(n, 8)));
        }
    }

    #[test]
    fn key_size_check() {
        assert!(check_key_size(8, 1).is_ok());
        assert!(check_key_size(1, 64).is_ok());
        assert!(check_key_size(1, 65).is_err());
        assert!(check_key_size(3, 100_000).is_ok());
        assert!(check_key_size(2, 100_000).is_err());
        assert_eq!(key(5, 0), Vec::<u8>::new());
    }
}
