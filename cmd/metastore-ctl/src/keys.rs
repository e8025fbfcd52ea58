//! How keys are written on the command line and printed.
//!
//! Printed: a key that is valid UTF-8 without control characters is
//! printed as it is; any other key, and every key under `--hex`, as `0x`
//! followed by lowercase hex. A printable key that itself starts with `0x`
//! is printed in hex too, so that every printed `0x…` means hex. The empty
//! key (a region's open start or end) is printed as the empty string.
//!
//! Given on the command line: `0x…` is hex (as printed), anything else the
//! key's bytes as typed.

use std::fmt::Write;

/// A key as printed (see the module doc).
pub fn render(key: &[u8], force_hex: bool) -> String {
    if key.is_empty() {
        return String::new();
    }
    match std::str::from_utf8(key) {
        Ok(s) if !force_hex && !s.starts_with("0x") && !s.chars().any(char::is_control) => {
            s.to_owned()
        }
        _ => {
            let mut out = String::with_capacity(2 + key.len() * 2);
            out.push_str("0x");
            for b in key {
                let _ = write!(out, "{b:02x}");
            }
            out
        }
    }
}

/// A key given on the command line (see the module doc).
pub fn parse(arg: &str) -> Result<Vec<u8>, String> {
    let Some(hex) = arg.strip_prefix("0x") else {
        return Ok(arg.as_bytes().to_vec());
    };
    if hex.len() % 2 != 0 {
        return Err(format!("key {arg:?}: odd number of hex digits after 0x"));
    }
    hex.as_bytes()
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("key {arg:?}: not hex after 0x"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_keys_as_they_are_others_in_hex() {
        assert_eq!(render(b"foo", false), "foo");
        assert_eq!(render("grüße/1".as_bytes(), false), "grüße/1");
        assert_eq!(render(b"a b", false), "a b");
        assert_eq!(render(b"", false), "");
        assert_eq!(render(b"", true), "");
        assert_eq!(render(b"foo", true), "0x666f6f");
        assert_eq!(render(b"\x00\xff", false), "0x00ff");
        assert_eq!(render(b"tab\there", false), "0x7461620968657265");
        assert_eq!(render(b"new\nline", false), "0x6e65770a6c696e65");
        assert_eq!(render(b"\xc3", false), "0xc3", "invalid UTF-8");
        // A printable key that looks like hex is printed in hex.
        assert_eq!(render(b"0x41", false), "0x30783431");
    }

    #[test]
    fn parse_takes_hex_after_0x_and_anything_else_as_typed() {
        assert_eq!(parse("foo").unwrap(), b"foo");
        assert_eq!(parse("").unwrap(), b"");
        assert_eq!(parse("0x00FF").unwrap(), b"\x00\xff");
        assert_eq!(parse("0x").unwrap(), b"");
        assert!(parse("0x0").is_err());
        assert!(parse("0xzz").is_err());
        assert!(parse("0xé1").is_err());
        // Whatever is printed parses back to the same key.
        for key in [&b"foo"[..], b"\x00\xff", b"0x41", b"a\nb", "é".as_bytes()] {
            for hex in [false, true] {
                assert_eq!(parse(&render(key, hex)).unwrap(), key);
            }
        }
    }
}
