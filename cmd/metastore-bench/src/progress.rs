//! Progress bar on stderr, so that stdout carries only the report (and stays
//! parseable with `--output json`).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

pub struct Progress {
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    wake: Arc<Notify>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Starts drawing when stderr is a terminal; otherwise (CI, scripts)
    /// prints a line every 10 s so long runs still show signs of life.
    pub fn start(label: &str, total: u64) -> Self {
        Self::start_with_counter(label, total, Arc::new(AtomicU64::new(0)))
    }

    /// Like `start`, counting with a counter the caller already handed out.
    pub fn start_with_counter(label: &str, total: u64, done: Arc<AtomicU64>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        let tty = std::io::stderr().is_terminal();
        let task = {
            let done = done.clone();
            let stop = stop.clone();
            let wake = wake.clone();
            let label = label.to_string();
            tokio::spawn(async move {
                let start = Instant::now();
                let period = if tty {
                    Duration::from_millis(200)
                } else {
                    Duration::from_secs(10)
                };
                let mut tick = tokio::time::interval(period);
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        // `finish` must not wait for the next (10 s) tick.
                        _ = wake.notified() => {}
                    }
                    let finished = stop.load(Ordering::Relaxed);
                    let line = render(&label, done.load(Ordering::Relaxed), total, start);
                    let mut err = std::io::stderr().lock();
                    if tty {
                        let _ = write!(err, "\r{line}");
                        if finished {
                            let _ = writeln!(err);
                        }
                    } else {
                        let _ = writeln!(err, "{line}");
                    }
                    let _ = err.flush();
                    if finished {
                        break;
                    }
                }
            })
        };
        Progress {
            done,
            stop,
            wake,
            task: Some(task),
        }
    }

    /// A progress counter that draws nothing, for a phase whose progress
    /// another bar already shows.
    pub fn hidden() -> Self {
        Progress {
            done: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(true)),
            wake: Arc::new(Notify::new()),
            task: None,
        }
    }

    pub fn counter(&self) -> Arc<AtomicU64> {
        self.done.clone()
    }

    pub async fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // notify_one stores a permit, so the wake-up is not lost if the task
        // is busy drawing right now.
        self.wake.notify_one();
        if let Some(t) = self.task.take() {
            // Lets the drawing task paint the final state; it cannot fail in
            // a way that matters for the results.
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn render(label: &str, done: u64, total: u64, start: Instant) -> String {
    const WIDTH: u64 = 40;
    let filled = (done.min(total) * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH);
    let pct = if total == 0 {
        100.0
    } else {
        done.min(total) as f64 * 100.0 / total as f64
    };
    let elapsed = start.elapsed().as_secs_f64();
    format!(
        "{label} {done} / {total} [{}{}] {pct:5.1}% {elapsed:.1}s",
        "=".repeat(filled as usize),
        " ".repeat((WIDTH - filled) as usize),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_handles_edges() {
        let start = Instant::now();
        assert!(render("put", 0, 0, start).contains("100.0%"));
        let half = render("put", 50, 100, start);
        assert!(half.contains(" 50.0%"), "{half}");
        assert!(half.contains(&format!("[{}{}]", "=".repeat(20), " ".repeat(20))));
        assert!(render("put", 150, 100, start).contains("100.0%"));
    }
}
