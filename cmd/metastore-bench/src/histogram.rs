//! Log-linear latency histogram (HDR-style) over nanosecond values.
//!
//! Every power-of-two range `[2^e, 2^(e+1))` above `2 * SUB` is split into
//! `SUB` equal-width buckets, and values below `2 * SUB` get one bucket each.
//! A bucket that holds `v` therefore has width at most `v / SUB`, and
//! reporting its midpoint is off from any value in it by at most
//! `v / (2 * SUB)`: with `SUB = 128` that is a relative error of at most
//! 1/256 (≈ 0.39 %) for every percentile, whatever the range of latencies.
//! Min, max, mean and standard deviation are tracked exactly, outside the
//! buckets.
//!
//! Fixed-size buckets keep recording O(1) and allocation-free, and make
//! per-client histograms cheap to merge, so clients never contend on a lock.

/// log2 of the number of sub-buckets per power of two.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for any `u64`: the top power of two (2^63) has shift 56.
const BUCKETS: usize = (SUB as usize) * (64 - SUB_BITS as usize) + SUB as usize;

/// Upper bound of the relative error of any percentile reported by
/// [`Histogram::percentile`], compared with the exact nearest-rank value.
pub const MAX_RELATIVE_ERROR: f64 = 1.0 / (2 * SUB) as f64;

#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    min: u64,
    max: u64,
    // u128 keeps mean and variance exact for any realistic run: even 10^9
    // samples of one hour in ns squared stay far below 2^128.
    sum: u128,
    sum_sq: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn bucket_index(v: u64) -> usize {
    if v < 2 * SUB {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    let mantissa = v >> shift; // in [SUB, 2 * SUB)
    (SUB * shift as u64 + mantissa) as usize
}

/// Inclusive lower and exclusive upper bound of the values in bucket `i`.
fn bucket_bounds(i: usize) -> (u64, u128) {
    let i = i as u64;
    if i < 2 * SUB {
        return (i, i as u128 + 1);
    }
    let shift = i / SUB - 1;
    let mantissa = i - SUB * shift;
    let lo = mantissa << shift;
    let hi = ((mantissa as u128) + 1) << shift;
    (lo, hi)
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            count: 0,
            min: u64::MAX,
            max: 0,
            sum: 0,
            sum_sq: 0,
        }
    }

    pub fn record(&mut self, nanos: u64) {
        self.counts[bucket_index(nanos)] += 1;
        self.count += 1;
        self.min = self.min.min(nanos);
        self.max = self.max.max(nanos);
        self.sum += nanos as u128;
        self.sum_sq += (nanos as u128) * (nanos as u128);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += *b;
        }
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn min(&self) -> Option<u64> {
        (self.count > 0).then_some(self.min)
    }

    pub fn max(&self) -> Option<u64> {
        (self.count > 0).then_some(self.max)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }

    /// Population standard deviation, as etcd's benchmark reports it.
    pub fn stddev(&self) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let n = self.count as u128;
        // n*Σx² - (Σx)² is exact in integers; only the final division rounds.
        let var = match (n.checked_mul(self.sum_sq), self.sum.checked_mul(self.sum)) {
            (Some(a), Some(b)) => a.saturating_sub(b) as f64 / (n as f64 * n as f64),
            _ => {
                let mean = self.sum as f64 / n as f64;
                (self.sum_sq as f64 / n as f64 - mean * mean).max(0.0)
            }
        };
        Some(var.sqrt())
    }

    /// Nearest-rank percentile (`q` in `[0, 1]`): an estimate of the
    /// `ceil(q * n)`-th smallest value, within [`MAX_RELATIVE_ERROR`] of it.
    pub fn percentile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = nearest_rank(q, self.count);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = bucket_bounds(i);
                let mid = ((lo as u128 + hi - 1) / 2) as u64;
                // The exact extremes are known, so never report past them.
                return Some(mid.clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// Counts regrouped into at most `bins` ranges of geometrically growing
    /// width between min and max, for display. Each entry is (upper bound
    /// in ns, count); a fine bucket is placed by its midpoint, so a bound is
    /// as exact as the buckets are.
    pub fn display_bins(&self, bins: usize) -> Vec<(u64, u64)> {
        let (Some(min), Some(max)) = (self.min(), self.max()) else {
            return Vec::new();
        };
        let bins = bins.max(1);
        if min == max {
            return vec![(max, self.count)];
        }
        let lo = (min.max(1)) as f64;
        let ratio = (max as f64 / lo).powf(1.0 / bins as f64);
        let mut bounds: Vec<u64> = (1..=bins)
            .map(|k| (lo * ratio.powi(k as i32)).ceil() as u64)
            .collect();
        if let Some(last) = bounds.last_mut() {
            *last = max;
        }
        bounds.dedup();
        let mut out: Vec<(u64, u64)> = bounds.iter().map(|&b| (b, 0)).collect();
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let (blo, bhi) = bucket_bounds(i);
            let mid = (((blo as u128 + bhi - 1) / 2) as u64).clamp(min, max);
            let slot = out.partition_point(|&(b, _)| b < mid).min(out.len() - 1);
            out[slot].1 += c;
        }
        out
    }
}

/// 1-based rank of the nearest-rank percentile `q` among `n` values.
pub fn nearest_rank(q: f64, n: u64) -> u64 {
    let q = q.clamp(0.0, 1.0);
    // Subtracting a hair before ceil keeps e.g. 0.9 * 1000 = 900.0000000001
    // from rounding up to rank 901.
    let r = (q * n as f64 - 1e-9).ceil() as u64;
    r.clamp(1, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn exact(sorted: &[u64], q: f64) -> u64 {
        sorted[(nearest_rank(q, sorted.len() as u64) - 1) as usize]
    }

    fn check_against_sorted(values: &[u64]) {
        let mut h = Histogram::new();
        for &v in values {
            h.record(v);
        }
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        for q in [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0] {
            let want = exact(&sorted, q) as f64;
            let got = h.percentile(q).unwrap() as f64;
            // +0.5 absorbs integer rounding of the midpoint.
            let bound = want * MAX_RELATIVE_ERROR + 0.5;
            assert!(
                (got - want).abs() <= bound,
                "q={q}: got {got}, want {want} (bound {bound})"
            );
        }
        assert_eq!(h.min(), sorted.first().copied());
        assert_eq!(h.max(), sorted.last().copied());
        assert_eq!(h.count(), values.len() as u64);
    }

    #[test]
    fn buckets_are_contiguous_and_bounded() {
        let mut prev_hi: u128 = 0;
        for i in 0..BUCKETS {
            let (lo, hi) = bucket_bounds(i);
            assert_eq!(lo as u128, prev_hi, "gap before bucket {i}");
            assert!(hi > lo as u128);
            // Width relative to the smallest value in the bucket.
            if lo >= 2 * SUB {
                assert!((hi - lo as u128) * SUB as u128 <= lo as u128);
            }
            prev_hi = hi;
        }
        assert_eq!(prev_hi, 1u128 << 64);
    }

    #[test]
    fn index_round_trips_through_bounds() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut samples: Vec<u64> = (0..2000).collect();
        samples.extend((0..10_000).map(|_| rng.gen::<u64>() >> rng.gen_range(0..64)));
        samples.extend([u64::MAX, u64::MAX - 1, 1 << 63, (1 << 40) - 1]);
        for v in samples {
            let i = bucket_index(v);
            let (lo, hi) = bucket_bounds(i);
            assert!(lo <= v && (v as u128) < hi, "v={v} i={i} lo={lo} hi={hi}");
        }
    }

    #[test]
    fn small_values_are_exact() {
        let values: Vec<u64> = (0..256).rev().collect();
        let mut h = Histogram::new();
        for &v in &values {
            h.record(v);
        }
        let mut sorted = values.clone();
        sorted.sort_unstable();
        for q in [0.0, 0.3, 0.5, 0.77, 0.99, 1.0] {
            assert_eq!(h.percentile(q).unwrap(), exact(&sorted, q));
        }
    }

    #[test]
    fn percentiles_match_sorted_array_uniform() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let values: Vec<u64> = (0..50_000)
            .map(|_| rng.gen_range(50_000..5_000_000))
            .collect();
        check_against_sorted(&values);
    }

    #[test]
    fn percentiles_match_sorted_array_heavy_tail() {
        // Log-uniform over nine decades, like latencies with GC/fsync stalls.
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let values: Vec<u64> = (0..100_000)
            .map(|_| 10f64.powf(rng.gen_range(2.0..11.0)) as u64)
            .collect();
        check_against_sorted(&values);
    }

    #[test]
    fn percentiles_match_sorted_array_few_values() {
        check_against_sorted(&[1_000_000]);
        check_against_sorted(&[3, 1_000_000_000]);
        check_against_sorted(&[500, 500, 500, 900_000, 12]);
    }

    #[test]
    fn mean_and_stddev_are_exact() {
        let values = [2u64, 4, 4, 4, 5, 5, 7, 9];
        let mut h = Histogram::new();
        for v in values {
            h.record(v * 1_000_000);
        }
        assert_eq!(h.mean().unwrap(), 5_000_000.0);
        assert_eq!(h.stddev().unwrap(), 2_000_000.0);
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let values: Vec<u64> = (0..10_000).map(|_| rng.gen_range(1..1 << 30)).collect();
        let mut whole = Histogram::new();
        let mut parts = vec![Histogram::new(); 7];
        for (i, &v) in values.iter().enumerate() {
            whole.record(v);
            parts[i % 7].record(v);
        }
        let mut merged = Histogram::new();
        for p in &parts {
            merged.merge(p);
        }
        assert_eq!(merged.counts, whole.counts);
        assert_eq!(merged.count(), whole.count());
        assert_eq!(merged.min(), whole.min());
        assert_eq!(merged.max(), whole.max());
        assert_eq!(merged.sum, whole.sum);
        assert_eq!(merged.sum_sq, whole.sum_sq);
    }

    #[test]
    fn empty_histogram_has_no_stats() {
        let h = Histogram::new();
        assert_eq!(h.percentile(0.5), None);
        assert_eq!(h.mean(), None);
        assert_eq!(h.stddev(), None);
        assert!(h.display_bins(10).is_empty());
    }

    #[test]
    fn display_bins_account_for_every_sample() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut h = Histogram::new();
        for _ in 0..20_000 {
            h.record(rng.gen_range(100_000..80_000_000));
        }
        let bins = h.display_bins(10);
        assert!(bins.len() <= 10);
        assert_eq!(bins.iter().map(|b| b.1).sum::<u64>(), 20_000);
        assert_eq!(bins.last().unwrap().0, h.max().unwrap());
        assert!(bins.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn nearest_rank_matches_definition() {
        assert_eq!(nearest_rank(0.5, 10), 5);
        assert_eq!(nearest_rank(0.9, 1000), 900);
        assert_eq!(nearest_rank(0.999, 1000), 999);
        assert_eq!(nearest_rank(0.999, 10), 10);
        assert_eq!(nearest_rank(0.0, 10), 1);
        assert_eq!(nearest_rank(1.0, 10), 10);
    }
}
