//! Closed-loop request driver shared by the request/response workloads.

use crate::progress::Progress;
use crate::rate::{pace, RateLimiter};
use crate::stats::{BenchError, Stats};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One client's request loop state (its connection handle, RNG, ...).
pub trait Worker: Send + 'static {
    type Req: Send;
    /// Builds request number `i` (0-based over the whole run) and says which
    /// result class it belongs to (e.g. read or write); built before the
    /// clock starts so only the round trip is timed.
    fn prepare(&mut self, i: u64) -> (usize, Self::Req);
    fn send(&mut self, req: Self::Req) -> impl Future<Output = Result<(), BenchError>> + Send;
}

pub struct RunOutput {
    /// Stats per class, indexed like the classes `prepare` returns.
    pub classes: Vec<Stats>,
    pub elapsed: Duration,
}

impl RunOutput {
    pub fn all(&self) -> Stats {
        let mut s = Stats::default();
        for c in &self.classes {
            s.merge(c);
        }
        s
    }
}

/// Runs `total` requests over the workers (with a progress bar if `label`
/// is given), one concurrent loop per worker.
/// Request numbers come from a shared counter, so the total is exact however
/// unevenly the clients progress, and a fast client is never held back by a
/// slow one (like etcd's shared request channel).
pub async fn run<W: Worker>(
    workers: Vec<W>,
    total: u64,
    classes: usize,
    limiter: Option<RateLimiter>,
    label: Option<&str>,
) -> RunOutput {
    let next = Arc::new(AtomicU64::new(0));
    let limiter = limiter.map(Arc::new);
    let progress = match label {
        Some(l) => Progress::start(l, total),
        None => Progress::hidden(),
    };
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(workers.len());
    for mut w in workers {
        let next = next.clone();
        let limiter = limiter.clone();
        let done = progress.counter();
        tasks.push(tokio::spawn(async move {
            let mut stats = vec![Stats::default(); classes];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let (class, req) = w.prepare(i);
                pace(limiter.as_deref()).await;
                let st = Instant::now();
                let res = w.send(req).await;
                let lat = st.elapsed();
                let slot = &mut stats[class.min(classes - 1)];
                match res {
                    Ok(()) => slot.record_ok(lat),
                    Err(e) => slot.record_err(&e),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            stats
        }));
    }
    let mut out = vec![Stats::default(); classes];
    for t in tasks {
        match t.await {
            Ok(stats) => {
                for (o, s) in out.iter_mut().zip(&stats) {
                    o.merge(s);
                }
            }
            // A panicking client would be a bench bug; report it instead of
            // silently dropping its share of the requests.
            Err(e) => out[0].record_err(&BenchError::new("ClientPanicked", e.to_string())),
        }
    }
    let elapsed = start.elapsed();
    progress.finish().await;
    RunOutput {
        classes: out,
        elapsed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Fake {
        seen: Arc<Mutex<Vec<u64>>>,
        fail_every: u64,
    }

    impl Worker for Fake {
        type Req = u64;
        fn prepare(&mut self, i: u64) -> (usize, u64) {
            ((i % 2) as usize, i)
        }
        async fn send(&mut self, i: u64) -> Result<(), BenchError> {
            self.seen.lock().unwrap().push(i);
            tokio::task::yield_now().await;
            if i.is_multiple_of(self.fail_every) {
                Err(BenchError::new("Unavailable", "boom"))
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn every_request_is_sent_once_and_counted() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..7)
            .map(|_| Fake {
                seen: seen.clone(),
                fail_every: 10,
            })
            .collect();
        let out = run(workers, 1000, 2, None, None).await;
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        let all = out.all();
        assert_eq!(all.total(), 1000);
        assert_eq!(all.error_count(), 100);
        assert_eq!(out.classes[0].total(), 500);
        assert_eq!(out.classes[1].total(), 500);
        assert_eq!(out.classes[1].error_count(), 0);
    }
}
