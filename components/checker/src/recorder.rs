//! A thread-safe recorder that test drivers use to build a [`History`].
//!
//! Contract: [`Recorder::invoke`] assigns the next id and the invocation
//! time (nanoseconds since the recorder's start `Instant`) and returns a
//! [`Pending`]; [`Pending::complete`] stamps the completion time and the
//! outcome. A `Pending` dropped without `complete` is recorded as
//! `Outcome::Unknown("dropped")` at the drop time, so a cancelled future
//! still leaves an honest record. The recorder is a cheap `Clone` handle
//! (`Send + Sync`); [`Recorder::history`] snapshots every op ordered by id,
//! ops still in flight appearing as `Unknown("in flight")`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::history::{History, Operation, Outcome, Request};

/// Records operations of many concurrent clients.
#[derive(Clone, Debug)]
pub struct Recorder {
    start: Instant,
    ops: Arc<Mutex<Vec<Slot>>>,
}

#[derive(Debug)]
struct Slot {
    op: Operation,
    done: bool,
}

/// An invoked operation waiting for its outcome.
#[derive(Debug)]
#[must_use = "complete the operation, or it is recorded as Unknown(\"dropped\")"]
pub struct Pending {
    recorder: Recorder,
    index: usize,
    done: bool,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new(Instant::now())
    }
}

impl Recorder {
    /// A recorder whose times count from `start`.
    pub fn new(start: Instant) -> Recorder {
        Recorder {
            start,
            ops: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Slot>> {
        // A panic while holding the lock cannot leave a slot half-written
        // (every critical section is one push or one field update), so a
        // poisoned lock is still usable.
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `client` sent `request` to `endpoint` now.
    pub fn invoke(&self, client: usize, endpoint: impl Into<String>, request: Request) -> Pending {
        let endpoint = endpoint.into();
        let mut ops = self.lock();
        let index = ops.len();
        let now = self.now_ns();
        ops.push(Slot {
            op: Operation {
                id: index,
                client,
                invoke_ns: now,
                complete_ns: now,
                request,
                outcome: Outcome::Unknown("in flight".to_string()),
                endpoint,
            },
            done: false,
        });
        Pending {
            recorder: self.clone(),
            index,
            done: false,
        }
    }

    fn finish(&self, index: usize, outcome: Outcome) {
        let mut ops = self.lock();
        let now = self.now_ns();
        if let Some(slot) = ops.get_mut(index) {
            slot.op.complete_ns = now.max(slot.op.invoke_ns);
            slot.op.outcome = outcome;
            slot.done = true;
        }
    }

    /// A snapshot of every operation recorded so far, ordered by id. Ops
    /// still in flight are `Unknown("in flight")`, completed now.
    pub fn history(&self) -> History {
        let ops = self.lock();
        let now = self.now_ns();
        History {
            ops: ops
                .iter()
                .map(|slot| {
                    let mut op = slot.op.clone();
                    if !slot.done {
                        op.complete_ns = now.max(op.invoke_ns);
                    }
                    op
                })
                .collect(),
        }
    }

    /// The final history (same as [`Recorder::history`]).
    pub fn into_history(self) -> History {
        self.history()
    }
}

impl Pending {
    /// The id the operation was given.
    pub fn id(&self) -> usize {
        self.index
    }

    /// Records the outcome now (for `Unknown`: the time the client gave up).
    pub fn complete(mut self, outcome: Outcome) {
        self.done = true;
        self.recorder.finish(self.index, outcome);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            self.recorder
                .finish(self.index, Outcome::Unknown("dropped".to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Consistency, Response};

    #[test]
    fn records_in_id_order_and_dropped_is_unknown() {
        let rec = Recorder::default();
        let a = rec.invoke(
            0,
            "n1",
            Request::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            },
        );
        let b = rec.invoke(
            1,
            "n2",
            Request::Get {
                key: b"k".to_vec(),
                consistency: Consistency::Linearizable,
                txn: false,
            },
        );
        drop(b);
        a.complete(Outcome::Ok(Response::Put {
            revision: 2,
            prev: None,
        }));
        let h = rec.into_history();
        assert_eq!(h.ops.len(), 2);
        assert_eq!(h.ops[0].id, 0);
        assert!(matches!(h.ops[0].outcome, Outcome::Ok(_)));
        assert_eq!(h.ops[1].outcome, Outcome::Unknown("dropped".to_string()));
        assert!(h.ops[0].complete_ns >= h.ops[0].invoke_ns);
    }

    #[test]
    fn recorder_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Recorder>();
        assert_send_sync::<Pending>();
    }
}
