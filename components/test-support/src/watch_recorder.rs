//! Watches recorded next to a history run and checked against it
//! ([`checker::check_watches`]: ordered, unique, atomic, reliable, valid,
//! bookmarkable, prev_kv, filtered, resumable).
//!
//! A [`WatchRecorder`] started before the workload ([`WatchRecorder::start`],
//! or [`crate::history::run_watched`]) keeps a few watchers running through
//! the whole run and its faults, each recording every response it gets as a
//! [`checker::Watch`]:
//! - one watch of the whole workload prefix per endpoint (node), every
//!   other one with prev_kv, the others with progress_notify, from now
//!   (start revision 0), and a twin of the first on the same endpoint (on
//!   a MetaStore node the two share one aggregator);
//! - a watch of a sub-range of the workload's keys (`<prefix>1` up to
//!   `<prefix>3`) with prev_kv, on the last endpoint, and a watch of the
//!   key `<prefix>0` alone on the first (with the no_put filter where the
//!   source has filters, so it sees only deletes), both from the revision
//!   after the one current when the recorder started;
//! - a late watch of the whole prefix with prev_kv, opened [`LATE`] into the
//!   run on the second endpoint from that same revision: it starts by
//!   catching up on what the run wrote so far while the faults go on.
//!
//! A watch that breaks (an error, a cancel that is not a compaction, its
//! node stopped or killed) is resumed on the next endpoint from the last
//! revision it saw + 1 ([`checker::Watch::resume_revision`]), the new watch
//! naming the broken one in `resumed_from`; a watch canceled as compacted
//! ends its watcher. Where the source can tell a watch's progress, the
//! watchers record progress notifications all along (see [`WatchSource`]).
//!
//! [`WatchRecorder::check`], called once nothing is in flight and the faults
//! are healed, takes the store's current revision, waits (at most
//! [`CATCH_UP`]) until every watcher has seen it (an event or a progress
//! notification at or above it), stops the watchers and checks the
//! recording against the history. Watchers still behind then are reported
//! as lagging (a liveness failure); their recordings are checked all the
//! same, up to what each saw.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checker::{History, Report, Watch, WatchResponse};
use tokio::sync::watch as signal;

/// How long [`WatchRecorder::check`] waits for the watchers to see the
/// store's current revision.
pub const CATCH_UP: Duration = Duration::from_secs(30);
/// When the late watcher opens its watch.
pub const LATE: Duration = Duration::from_secs(3);
/// How long opening a watch (up to its created response) may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a watcher waits before opening its watch again after a break
/// or a failed attempt.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Where watches are opened: a store's endpoints.
#[async_trait::async_trait]
pub trait WatchSource: Send + Sync {
    /// How many endpoints watches can be opened at.
    fn endpoints(&self) -> usize;

    /// A short name of endpoint `i` for reports.
    fn endpoint_name(&self, i: usize) -> String {
        format!("n{}", i + 1)
    }

    /// Whether the source serves etcd's NOPUT / NODELETE filters.
    fn filters(&self) -> bool {
        true
    }

    /// Opens the watch `request` describes (range, start revision, options;
    /// its responses are ignored) at `endpoint`: its stream, and the created
    /// response (the first of the recording). `catching_up` is set once the
    /// run is over and the recorder waits for the watches to reach the
    /// current revision (a source that asks for progress only then looks at
    /// it). `Err` says why it could not be opened (nothing is recorded).
    async fn open(
        &self,
        endpoint: usize,
        request: &Watch,
        catching_up: Arc<AtomicBool>,
    ) -> Result<(Box<dyn WatchStream>, WatchResponse), String>;

    /// The store's current revision, through any endpoint.
    async fn current_revision(&self) -> Result<i64, String>;
}

/// One open watch's responses.
#[async_trait::async_trait]
pub trait WatchStream: Send {
    /// The next response (events, a progress notification, a cancel), as
    /// the checker records it; `Err` once the stream broke (it is dropped
    /// then). Cancel safe: a watcher drops the call when it stops.
    async fn next(&mut self) -> Result<WatchResponse, String>;
}

/// One watcher: what it watches and where it starts.
struct Spec {
    request: Watch,
    endpoint: usize,
    /// How long after the start the watch is opened.
    delay: Duration,
}

/// What a watcher shares with the recorder while it runs.
#[derive(Default)]
struct Progress {
    /// The highest revision seen (events and progress notifications) by
    /// any watch of the watcher's chain.
    seen: AtomicI64,
    /// Canceled as compacted: nothing more comes.
    ended: AtomicBool,
}

/// What a watcher hands back: its chain of watches (each resuming the one
/// before; `resumed_from` counts in the chain) and why they broke.
struct Chain {
    watches: Vec<Watch>,
    breaks: Vec<String>,
}

/// Running watchers (see the module doc).
pub struct WatchRecorder {
    source: Arc<dyn WatchSource>,
    specs: Vec<String>,
    progress: Vec<Arc<Progress>>,
    tasks: Vec<tokio::task::JoinHandle<Chain>>,
    stop: signal::Sender<bool>,
    catching_up: Arc<AtomicBool>,
}

/// What [`WatchRecorder::check`] found.
pub struct WatchCheck {
    /// The checker's report on the recorded watches.
    pub report: Report,
    /// Watchers that did not reach the store's current revision in time.
    pub lagging: Vec<String>,
    /// One line: watches, events and progress notifications checked.
    pub summary: String,
}

impl WatchCheck {
    /// No violation and no lagging watcher.
    pub fn is_ok(&self) -> bool {
        self.report.is_ok() && self.lagging.is_empty()
    }
}

impl fmt::Display for WatchCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary)?;
        for l in &self.lagging {
            writeln!(f, "lagging: {l}")?;
        }
        write!(f, "{}", self.report)
    }
}

impl WatchRecorder {
    /// Starts the watchers of the module doc over the keys `prefix*` and
    /// waits (at most [`OPEN_TIMEOUT`] twice) until each has its first
    /// watch open, so the workload starts after them.
    pub async fn start(source: Arc<dyn WatchSource>, prefix: &str) -> WatchRecorder {
        let n = source.endpoints().max(1);
        let base = {
            let deadline = Instant::now() + OPEN_TIMEOUT * 2;
            loop {
                match source.current_revision().await {
                    Ok(r) => break r,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("watch recorder: current revision: {e}; retrying");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    Err(e) => panic!("watch recorder: no current revision: {e}"),
                }
            }
        };
        let prefix = prefix.as_bytes();
        let mut specs = Vec::new();
        for i in 0..n {
            specs.push(Spec {
                request: Watch {
                    client: i,
                    prev_kv: i % 2 == 0,
                    progress_notify: i % 2 == 1,
                    ..Watch::prefix(prefix, 0)
                },
                endpoint: i,
                delay: Duration::ZERO,
            });
        }
        specs.push(Spec {
            request: Watch {
                client: n + 3,
                ..specs[0].request.clone()
            },
            endpoint: 0,
            delay: Duration::ZERO,
        });
        let key = |i: usize| [prefix, i.to_string().as_bytes()].concat();
        specs.push(Spec {
            request: Watch {
                client: n,
                range_end: key(3),
                prev_kv: true,
                ..Watch::key(&key(1), base + 1)
            },
            endpoint: n - 1,
            delay: Duration::ZERO,
        });
        specs.push(Spec {
            request: Watch {
                client: n + 1,
                no_put: source.filters(),
                ..Watch::key(&key(0), base + 1)
            },
            endpoint: 0,
            delay: Duration::ZERO,
        });
        specs.push(Spec {
            request: Watch {
                client: n + 2,
                prev_kv: true,
                ..Watch::prefix(prefix, base + 1)
            },
            endpoint: 1 % n,
            delay: LATE,
        });
        let (stop, stop_rx) = signal::channel(false);
        let catching_up = Arc::new(AtomicBool::new(false));
        let mut recorder = WatchRecorder {
            source: source.clone(),
            specs: Vec::new(),
            progress: Vec::new(),
            tasks: Vec::new(),
            stop,
            catching_up: catching_up.clone(),
        };
        let mut opened = Vec::new();
        for spec in specs {
            let request = Watch {
                endpoint: source.endpoint_name(spec.endpoint % n),
                ..spec.request.clone()
            };
            let described = request.describe();
            recorder
                .specs
                .push(described.trim_end_matches(", 0 responses").to_string());
            let progress = Arc::new(Progress::default());
            let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
            recorder.progress.push(progress.clone());
            recorder.tasks.push(tokio::spawn(watcher(
                source.clone(),
                spec,
                stop_rx.clone(),
                progress,
                catching_up.clone(),
                opened_tx,
            )));
            opened.push(opened_rx);
        }
        for (i, rx) in opened.into_iter().enumerate() {
            if tokio::time::timeout(OPEN_TIMEOUT * 2, rx).await.is_err() {
                eprintln!(
                    "watch recorder: watcher {i} ({}) not open yet; the workload starts anyway",
                    recorder.specs[i]
                );
            }
        }
        recorder
    }

    /// Lets the watchers catch up with the store's current revision (see
    /// the module doc), stops them and checks their recording against
    /// `history` (which never compacted). Prints a summary line; on a
    /// violation writes the watches and the history as JSON to the
    /// system's temp dir and prints the paths.
    pub async fn check(self, history: &History, name: &str) -> WatchCheck {
        let began = Instant::now();
        let deadline = began + CATCH_UP;
        let current = loop {
            match self.source.current_revision().await {
                Ok(r) => break Ok(r),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("{name}: watch catch-up: current revision: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    eprintln!("{name}: watch catch-up: no current revision: {e}");
                    break Err(format!("no current revision to catch up with: {e}"));
                }
            }
        };
        self.catching_up.store(true, Ordering::SeqCst);
        let behind = |current: i64| -> Vec<usize> {
            (0..self.progress.len())
                .filter(|i| {
                    let p = &self.progress[*i];
                    !p.ended.load(Ordering::SeqCst) && p.seen.load(Ordering::SeqCst) < current
                })
                .collect()
        };
        let mut lagging = Vec::new();
        match current {
            Err(e) => lagging.push(e),
            Ok(current) => {
                while !behind(current).is_empty() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                for i in behind(current) {
                    lagging.push(format!(
                    "watcher {i} ({}) saw up to revision {} of the current {current} after {CATCH_UP:?}",
                    self.specs[i],
                    self.progress[i].seen.load(Ordering::SeqCst)
                ));
                }
            }
        }
        let caught_up = began.elapsed();
        let _ = self.stop.send(true);
        let mut watches: Vec<Watch> = Vec::new();
        let mut breaks = 0;
        let mut reasons: Vec<String> = Vec::new();
        for task in self.tasks {
            let chain = task.await.expect("watcher panicked");
            let offset = watches.len();
            breaks += chain.breaks.len();
            if let Some(first) = chain.breaks.into_iter().next() {
                reasons.push(first.chars().take(160).collect());
            }
            watches.extend(chain.watches.into_iter().map(|mut w| {
                w.resumed_from = w.resumed_from.map(|p| p + offset);
                w
            }));
        }
        let checking = Instant::now();
        let report = checker::check_watches(history, &watches, 0)
            .unwrap_or_else(|e| panic!("{name}: watches rejected: {e}"));
        let w = report.watches.unwrap_or_default();
        let summary = format!(
            "{name}: watches: {} watchers, {} watches ({breaks} resumed after a break), \
             {} responses, {} events, {} progress notifications checked \
             (caught up in {:.1} s, checked in {:.1} s): {}",
            self.progress.len(),
            w.watches,
            w.responses,
            w.events,
            w.progress,
            caught_up.as_secs_f64(),
            checking.elapsed().as_secs_f64(),
            if report.is_ok() {
                "ok".to_string()
            } else {
                format!("{} violation(s)", report.violations.len())
            }
        );
        println!("{summary}");
        if !reasons.is_empty() {
            println!("{name}: watch breaks (first of each watcher): {reasons:?}");
        }
        if !report.is_ok() {
            let dir = std::env::temp_dir();
            let pid = std::process::id();
            let watches_path = dir.join(format!("metastore-watches-{name}-{pid}.json"));
            let history_path = dir.join(format!("metastore-watch-history-{name}-{pid}.json"));
            match (checker::watch::to_json(&watches), history.to_json()) {
                (Ok(w), Ok(h)) => {
                    let _ = std::fs::write(&watches_path, w);
                    let _ = std::fs::write(&history_path, h);
                    eprintln!(
                        "{name}: watches written to {}, their history to {}",
                        watches_path.display(),
                        history_path.display()
                    );
                }
                (w, h) => eprintln!(
                    "{name}: cannot serialize the watches ({:?}) or the history ({:?})",
                    w.err(),
                    h.err()
                ),
            }
        }
        WatchCheck {
            report,
            lagging,
            summary,
        }
    }
}

/// How a watch of a watcher ended.
enum End {
    /// The recorder stops.
    Stopped,
    /// Canceled as compacted: the watcher ends.
    Compacted,
    /// Broke: resumed.
    Broken(String),
}

/// Completes once `stop` says so (or the recorder is gone).
async fn stopping(stop: &mut signal::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// One watcher: opens its watch, records it, resumes it after breaks on
/// the next endpoint, until the recorder stops.
async fn watcher(
    source: Arc<dyn WatchSource>,
    spec: Spec,
    mut stop: signal::Receiver<bool>,
    progress: Arc<Progress>,
    catching_up: Arc<AtomicBool>,
    opened: tokio::sync::oneshot::Sender<()>,
) -> Chain {
    let n = source.endpoints().max(1);
    let mut endpoint = spec.endpoint % n;
    let mut chain = Chain {
        watches: Vec::new(),
        breaks: Vec::new(),
    };
    let mut opened = Some(opened);
    if !spec.delay.is_zero() {
        // Not waited for by the start.
        drop(opened.take());
        tokio::select! {
            () = tokio::time::sleep(spec.delay) => {}
            () = stopping(&mut stop) => return chain,
        }
    }
    loop {
        if *stop.borrow() {
            break;
        }
        let mut request = Watch {
            endpoint: source.endpoint_name(endpoint),
            responses: Vec::new(),
            ..spec.request.clone()
        };
        if let Some(last) = chain.watches.last() {
            request.start_revision = last
                .resume_revision()
                .expect("a recorded watch starts with its created response");
            request.resumed_from = Some(chain.watches.len() - 1);
        }
        let attempt = tokio::time::timeout(
            OPEN_TIMEOUT,
            source.open(endpoint, &request, catching_up.clone()),
        );
        let opened_now = tokio::select! {
            r = attempt => r.unwrap_or_else(|_| Err(format!("not open after {OPEN_TIMEOUT:?}"))),
            () = stopping(&mut stop) => break,
        };
        let (mut stream, created) = match opened_now {
            Ok(o) => o,
            Err(_) => {
                endpoint = (endpoint + 1) % n;
                tokio::select! {
                    () = tokio::time::sleep(RETRY_PAUSE) => continue,
                    () = stopping(&mut stop) => break,
                }
            }
        };
        if let Some(tx) = opened.take() {
            let _ = tx.send(());
        }
        request.responses.push(created);
        let end = loop {
            let resp = tokio::select! {
                r = stream.next() => r,
                () = stopping(&mut stop) => break End::Stopped,
            };
            match resp {
                Ok(resp) => {
                    let seen = resp
                        .events
                        .iter()
                        .map(|e| e.kv.mod_revision)
                        .chain(resp.progress.then_some(resp.revision))
                        .max();
                    let (canceled, compacted) = (resp.canceled, resp.compact_revision != 0);
                    request.responses.push(resp);
                    if let Some(seen) = seen {
                        progress.seen.fetch_max(seen, Ordering::SeqCst);
                    }
                    if compacted {
                        break End::Compacted;
                    }
                    if canceled {
                        break End::Broken("canceled".into());
                    }
                }
                Err(e) => break End::Broken(e),
            }
        };
        drop(stream);
        chain.watches.push(request);
        match end {
            End::Stopped => break,
            End::Compacted => {
                progress.ended.store(true, Ordering::SeqCst);
                stopping(&mut stop).await;
                break;
            }
            End::Broken(e) => {
                chain
                    .breaks
                    .push(format!("{}: {e}", source.endpoint_name(endpoint)));
                endpoint = (endpoint + 1) % n;
                tokio::select! {
                    () = tokio::time::sleep(RETRY_PAUSE) => {}
                    () = stopping(&mut stop) => break,
                }
            }
        }
    }
    chain
}
