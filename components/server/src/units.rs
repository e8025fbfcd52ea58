//! Sizes and durations in settings: `96MiB`, `512KB`, `1048576`; `10s`,
//! `500ms`, `2m` — as flags and as TOML values (a string, or a plain
//! integer for bytes).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// `"96 MiB"` → (96, "MiB"); `what` and `example` word the error.
fn number_and_unit<'a>(s: &'a str, what: &str, example: &str) -> Result<(u64, &'a str), String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n = digits
        .parse()
        .map_err(|_| format!("invalid {what} {s:?}: expected e.g. {example}"))?;
    Ok((n, unit.trim()))
}

/// A size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = number_and_unit(s, "size", "96MiB")?;
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            _ => {
                return Err(format!(
                    "invalid size unit in {s:?}: use B, KB, KiB, MB, MiB, GB or GiB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in bytes, or a string such as \"96MiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration such as `10s`, `500ms` or `2m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interval(pub Duration);

impl FromStr for Interval {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = number_and_unit(s, "duration", "10s")?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            _ => return Err(format!("invalid duration unit in {s:?}: use ms, s or m")),
        };
        if d.is_zero() {
            return Err(format!("duration {s:?} must be above zero"));
        }
        Ok(Interval(d))
    }
}

/// An [`Interval`] that may also be zero (`0`, `0s`): "never".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntervalOrZero(pub Duration);

impl FromStr for IntervalOrZero {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (n, _) = number_and_unit(s, "duration", "10m")?;
        if n == 0 {
            return Ok(IntervalOrZero(Duration::ZERO));
        }
        s.parse::<Interval>().map(|i| IntervalOrZero(i.0))
    }
}

impl<'de> Deserialize<'de> for IntervalOrZero {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!("96MiB".parse(), Ok(ByteSize(96 << 20)));
        assert_eq!("512 KB".parse(), Ok(ByteSize(512_000)));
        assert_eq!("1048576".parse(), Ok(ByteSize(1 << 20)));
        assert_eq!("1gib".parse(), Ok(ByteSize(1 << 30)));
        assert!("".parse::<ByteSize>().is_err());
        assert!("12XB".parse::<ByteSize>().is_err());
        assert!("-1".parse::<ByteSize>().is_err());
        assert!("99999999999999GiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn intervals() {
        assert_eq!("10s".parse(), Ok(Interval(Duration::from_secs(10))));
        assert_eq!("250ms".parse(), Ok(Interval(Duration::from_millis(250))));
        assert_eq!("2m".parse(), Ok(Interval(Duration::from_secs(120))));
        assert!("0s".parse::<Interval>().is_err());
        assert!("10".parse::<Interval>().is_err());
        assert!("1h".parse::<Interval>().is_err());
        assert_eq!("0".parse(), Ok(IntervalOrZero(Duration::ZERO)));
        assert_eq!("0s".parse(), Ok(IntervalOrZero(Duration::ZERO)));
        assert_eq!("10m".parse(), Ok(IntervalOrZero(Duration::from_secs(600))));
        assert!("5".parse::<IntervalOrZero>().is_err());
        assert!("x".parse::<IntervalOrZero>().is_err());
    }
}
