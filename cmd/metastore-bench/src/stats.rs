//! Per-run results: latency histogram of successful requests plus failures
//! grouped by kind, and their rendering as text or JSON.

use crate::histogram::{Histogram, MAX_RELATIVE_ERROR};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// A failed request, grouped in the summary by `kind`.
#[derive(Debug, Clone)]
pub struct BenchError {
    /// gRPC code name ("Unavailable", "Unimplemented", ...) or a name of our
    /// own for failures the server reported in a successful response.
    pub kind: String,
    pub message: String,
}

impl BenchError {
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        BenchError {
            kind: kind.into(),
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for BenchError {
    fn from(s: tonic::Status) -> Self {
        let message = if s.message().is_empty() {
            s.to_string()
        } else {
            s.message().to_string()
        };
        BenchError::new(format!("{:?}", s.code()), message)
    }
}

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

#[derive(Default, Clone)]
pub struct ErrorCount {
    pub count: u64,
    /// First message seen for this kind: messages often carry per-request
    /// details, so grouping by them would scatter one cause over many lines.
    pub example: String,
}

#[derive(Default, Clone)]
pub struct Stats {
    pub hist: Histogram,
    pub errors: BTreeMap<String, ErrorCount>,
}

impl Stats {
    pub fn record_ok(&mut self, latency: Duration) {
        self.hist
            .record(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn record_err(&mut self, e: &BenchError) {
        self.record_errs(e, 1);
    }

    pub fn record_errs(&mut self, e: &BenchError, n: u64) {
        if n == 0 {
            return;
        }
        let entry = self.errors.entry(e.kind.clone()).or_default();
        if entry.count == 0 {
            entry.example = e.message.clone();
        }
        entry.count += n;
    }

    pub fn merge(&mut self, other: &Stats) {
        self.hist.merge(&other.hist);
        for (k, v) in &other.errors {
            let entry = self.errors.entry(k.clone()).or_default();
            if entry.count == 0 {
                entry.example = v.example.clone();
            }
            entry.count += v.count;
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().map(|e| e.count).sum()
    }

    pub fn ok_count(&self) -> u64 {
        self.hist.count()
    }

    pub fn total(&self) -> u64 {
        self.ok_count() + self.error_count()
    }
}

/// Quantiles printed in the text summary (etcd's list plus 99.9).
const QUANTILES: [(f64, &str); 8] = [
    (0.10, "10%"),
    (0.25, "25%"),
    (0.50, "50%"),
    (0.75, "75%"),
    (0.90, "90%"),
    (0.95, "95%"),
    (0.99, "99%"),
    (0.999, "99.9%"),
];

const HISTOGRAM_BINS: usize = 12;

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// One named result (a whole run, or one part of it such as txn-mixed's
/// reads) with the wall time it covers.
pub struct Section<'a> {
    pub name: &'a str,
    pub stats: &'a Stats,
    pub elapsed: Duration,
}

impl Section<'_> {
    fn rps(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            // Like etcd: throughput counts successful requests only.
            self.stats.ok_count() as f64 / secs
        } else {
            0.0
        }
    }

    pub fn to_json(&self) -> Value {
        let h = &self.stats.hist;
        let lat = |q: f64| h.percentile(q).map(ms);
        let mut errors = Map::new();
        for (k, v) in &self.stats.errors {
            errors.insert(k.clone(), json!({ "count": v.count, "example": v.example }));
        }
        let histogram: Vec<Value> = h
            .display_bins(HISTOGRAM_BINS)
            .into_iter()
            .map(|(le, count)| json!({ "le_ms": ms(le), "count": count }))
            .collect();
        json!({
            "total": self.stats.total(),
            "succeeded": self.stats.ok_count(),
            "errors": self.stats.error_count(),
            "errors_by_kind": errors,
            "total_time_secs": self.elapsed.as_secs_f64(),
            "requests_per_sec": self.rps(),
            "latency_ms": {
                "avg": h.mean().map(|v| v / 1e6),
                "min": h.min().map(ms),
                "max": h.max().map(ms),
                "stddev": h.stddev().map(|v| v / 1e6),
                "p10": lat(0.10),
                "p25": lat(0.25),
                "p50": lat(0.50),
                "p75": lat(0.75),
                "p90": lat(0.90),
                "p95": lat(0.95),
                "p99": lat(0.99),
                "p999": lat(0.999),
            },
            "histogram": histogram,
            "percentile_max_relative_error": MAX_RELATIVE_ERROR,
        })
    }

    /// etcd benchmark's layout, with milliseconds instead of seconds since
    /// most latencies here are well below one millisecond.
    pub fn to_text(&self) -> String {
        let h = &self.stats.hist;
        let mut s = String::new();
        let f = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
        let _ = writeln!(s, "Summary ({}):", self.name);
        let _ = writeln!(s, "  Total:\t{:.4} secs.", self.elapsed.as_secs_f64());
        let _ = writeln!(s, "  Requests:\t{}", self.stats.total());
        let _ = writeln!(s, "  Errors:\t{}", self.stats.error_count());
        let _ = writeln!(s, "  Slowest:\t{} ms.", f(h.max().map(ms)));
        let _ = writeln!(s, "  Fastest:\t{} ms.", f(h.min().map(ms)));
        let _ = writeln!(s, "  Average:\t{} ms.", f(h.mean().map(|v| v / 1e6)));
        let _ = writeln!(s, "  Stddev:\t{} ms.", f(h.stddev().map(|v| v / 1e6)));
        let _ = writeln!(s, "  Requests/sec:\t{:.4}", self.rps());

        let bins = h.display_bins(HISTOGRAM_BINS);
        if !bins.is_empty() {
            let _ = writeln!(s, "\nResponse time histogram (upper bound ms [count]):");
            let peak = bins.iter().map(|b| b.1).max().unwrap_or(1).max(1);
            for (le, count) in bins {
                let bar = "∎".repeat(((count * 40).div_ceil(peak)) as usize);
                let _ = writeln!(s, "  {:>12.4} [{count}]\t|{bar}", ms(le));
            }
            let _ = writeln!(s, "\nLatency distribution:");
            for (q, label) in QUANTILES {
                let _ = writeln!(s, "  {label} in {} ms.", f(h.percentile(q).map(ms)));
            }
        }
        if !self.stats.errors.is_empty() {
            let _ = writeln!(s, "\nError distribution:");
            for (kind, e) in &self.stats.errors {
                let _ = writeln!(s, "  [{}]\t{kind}: {}", e.count, e.example);
            }
        }
        s
    }
}

/// The whole report: a headline section plus optional named parts.
pub struct Report<'a> {
    pub command: &'a str,
    pub main: Section<'a>,
    pub parts: Vec<Section<'a>>,
    pub extra: Map<String, Value>,
}

impl Report<'_> {
    pub fn to_json(&self) -> Value {
        let mut v = self.main.to_json();
        if let Value::Object(m) = &mut v {
            m.insert("command".into(), json!(self.command));
            if !self.parts.is_empty() {
                let mut parts = Map::new();
                for p in &self.parts {
                    parts.insert(p.name.to_string(), p.to_json());
                }
                m.insert("parts".into(), Value::Object(parts));
            }
            for (k, val) in &self.extra {
                m.insert(k.clone(), val.clone());
            }
        }
        v
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for p in &self.parts {
            s.push_str(&p.to_text());
            s.push('\n');
        }
        s.push_str(&self.main.to_text());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_documented_fields() {
        let mut st = Stats::default();
        for i in 1..=100u64 {
            st.record_ok(Duration::from_micros(i * 10));
        }
        st.record_err(&BenchError::new("Unavailable", "first"));
        st.record_err(&BenchError::new("Unavailable", "second"));
        let sec = Section {
            name: "put",
            stats: &st,
            elapsed: Duration::from_secs(2),
        };
        let v = sec.to_json();
        assert_eq!(v["total"], 102);
        assert_eq!(v["errors"], 2);
        assert_eq!(v["succeeded"], 100);
        assert_eq!(v["requests_per_sec"], 50.0);
        assert_eq!(v["errors_by_kind"]["Unavailable"]["count"], 2);
        assert_eq!(v["errors_by_kind"]["Unavailable"]["example"], "first");
        for k in ["avg", "min", "max", "stddev", "p50", "p90", "p99", "p999"] {
            assert!(v["latency_ms"][k].is_number(), "{k}");
        }
        let p50 = v["latency_ms"]["p50"].as_f64().unwrap();
        assert!((p50 - 0.5).abs() <= 0.5 * MAX_RELATIVE_ERROR + 1e-6);
        let hist_total: u64 = v["histogram"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum();
        assert_eq!(hist_total, 100);
    }

    #[test]
    fn empty_run_renders_without_numbers() {
        let st = Stats::default();
        let sec = Section {
            name: "range",
            stats: &st,
            elapsed: Duration::ZERO,
        };
        let v = sec.to_json();
        assert_eq!(v["total"], 0);
        assert!(v["latency_ms"]["p99"].is_null());
        assert!(sec.to_text().contains("Requests/sec:\t0.0000"));
    }

    #[test]
    fn status_maps_to_code_kind() {
        let e: BenchError = tonic::Status::unimplemented("no lease service").into();
        assert_eq!(e.kind, "Unimplemented");
        assert_eq!(e.message, "no lease service");
    }
}
