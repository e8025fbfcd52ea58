//! Request pacing shared by all clients of a run.
//!
//! Behaves like golang.org/x/time/rate's `Limiter` with burst 1, which is
//! what etcd's benchmark uses: request `k` may start no earlier than
//! `k / rate` seconds after the first. Each caller reserves the next free
//! slot under a short lock and then sleeps outside it, so a slow client does
//! not hold up the others.
//!
//! tokio's timer has millisecond granularity, so a sleep can end up to ~1 ms
//! late; at rates above a few hundred per second, restarting the schedule
//! from "now" after each late wake-up would lose that time for good (a
//! 1500/s limit delivered ~800/s). Slots that are overdue by less than
//! `LATE_SLACK` are therefore still handed out, at once, which keeps the
//! average rate; a schedule further behind than that means the clients were
//! idle, and then it restarts from now, so idling never builds up a burst.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How far behind schedule a slot may be and still be used (see above).
const LATE_SLACK: Duration = Duration::from_millis(2);

pub struct RateLimiter {
    interval: Duration,
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// `None` for `per_sec == 0`, which means "unlimited" on the command line.
    pub fn new(per_sec: u64) -> Option<Self> {
        if per_sec == 0 {
            return None;
        }
        Some(RateLimiter {
            interval: Duration::from_nanos((1_000_000_000 / per_sec).max(1)),
            next: Mutex::new(None),
        })
    }

    /// Waits until the caller may send one request.
    pub async fn acquire(&self) {
        let slot = {
            // A poisoned lock only means another client panicked mid-update
            // of a plain Instant; the value is still usable.
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let slot = match *next {
                Some(t) if t + LATE_SLACK >= now => t,
                _ => now,
            };
            *next = Some(slot + self.interval);
            slot
        };
        if slot > Instant::now() {
            tokio::time::sleep_until(slot).await;
        }
    }
}

/// Waits on `limiter` if there is one.
pub async fn pace(limiter: Option<&RateLimiter>) {
    if let Some(l) = limiter {
        l.acquire().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn zero_means_unlimited() {
        assert!(RateLimiter::new(0).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn single_caller_is_paced_at_rate() {
        let l = RateLimiter::new(10).unwrap();
        let start = Instant::now();
        for _ in 0..100 {
            l.acquire().await;
        }
        // First request is immediate, the other 99 follow 100 ms apart.
        assert_eq!(Instant::now() - start, Duration::from_millis(9_900));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_budget() {
        let l = Arc::new(RateLimiter::new(1000).unwrap());
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                let mut times = Vec::new();
                for _ in 0..125 {
                    l.acquire().await;
                    times.push(Instant::now() - start);
                }
                times
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort();
        assert_eq!(all.len(), 1000);
        // 1000 grants at 1/ms: exactly one per millisecond tick, none doubled.
        for (k, t) in all.iter().enumerate() {
            assert_eq!(*t, Duration::from_millis(k as u64), "grant {k}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_does_not_build_a_burst() {
        let l = RateLimiter::new(100).unwrap();
        l.acquire().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let start = Instant::now();
        for _ in 0..11 {
            l.acquire().await;
        }
        // After idling, the first is immediate and the rest still 10 ms apart.
        assert_eq!(Instant::now() - start, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn high_rate_survives_millisecond_timer() {
        // 1500/s is one slot every 0.67 ms, finer than tokio's timer, whose
        // sleeps end on millisecond ticks. A client whose requests take
        // 0.5 ms can sustain 2000/s, so the limit alone must set the pace.
        let l = RateLimiter::new(1500).unwrap();
        let start = Instant::now();
        for _ in 0..1500 {
            l.acquire().await;
            tokio::time::advance(Duration::from_micros(500)).await;
        }
        let took = Instant::now() - start;
        // The 1500th grant is due at 999.3 ms; allow a tick of rounding.
        assert!(took >= Duration::from_millis(999), "{took:?}");
        assert!(took <= Duration::from_millis(1002), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_caller_does_not_block_others() {
        let l = Arc::new(RateLimiter::new(10).unwrap());
        let start = Instant::now();
        let slow = {
            let l = l.clone();
            tokio::spawn(async move {
                l.acquire().await;
                // Holds its "request" for a long time after being admitted.
                tokio::time::sleep(Duration::from_secs(60)).await;
            })
        };
        tokio::task::yield_now().await;
        for _ in 0..10 {
            l.acquire().await;
        }
        assert_eq!(Instant::now() - start, Duration::from_millis(1_000));
        slow.abort();
    }
}
