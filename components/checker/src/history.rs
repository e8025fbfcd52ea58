//! The history model: what a test driver records and the checker reads.
//!
//! Contract: a [`History`] is a list of [`Operation`]s, each with the client
//! that issued it, when it was invoked and when the client got an answer
//! (or gave up), the request and its [`Outcome`]. Most requests touch one
//! key; [`Request::MultiPut`] (one Txn putting several keys at one
//! revision) and [`Request::RangeAll`] (one Range over a key prefix) touch
//! several, and the checker projects them onto per-key operations (see
//! `crate::project`). Every written value (`Put`, `Cas`, each value of a
//! `MultiPut`) is unique across the whole history; the checker identifies
//! the write behind an observed value by it and rejects a history that
//! breaks this ([`HistoryError::DuplicateValue`]), and a MultiPut whose
//! keys are not distinct, whose key and value lists differ in length, or
//! whose response has not one prev_kv slot per key
//! ([`HistoryError::MalformedMultiKey`]). Histories
//! round-trip through JSON ([`History::to_json`], [`History::from_json`]);
//! byte strings are written as JSON strings when they are UTF-8, else as
//! arrays of numbers.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::bytes_repr;
use crate::error::HistoryError;

/// A key of the store.
pub type Key = Vec<u8>;

/// etcd's `KeyValue` as observed by a client (the lease is not modelled).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Kv {
    /// The value.
    #[serde(with = "bytes_repr")]
    pub value: Vec<u8>,
    /// Revision of the write that created the key (since its last delete).
    pub create_revision: i64,
    /// Revision of the write that produced this value.
    pub mod_revision: i64,
    /// 1 on creation, +1 per put, reset by a delete.
    pub version: i64,
}

/// Consistency level of a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Consistency {
    /// Sees every write that completed before it was invoked.
    Linearizable,
    /// May be served from a lagging replica.
    Serializable,
}

/// A request: single-key, except `MultiPut` and `RangeAll`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Put(key, value) sent with prev_kv = true.
    Put {
        /// The key.
        #[serde(with = "bytes_repr")]
        key: Key,
        /// The value, unique across the history.
        #[serde(with = "bytes_repr")]
        value: Vec<u8>,
    },
    /// Range of one key (also used for a read-only Txn{success:[Range key]}; `txn` says which).
    Get {
        /// The key.
        #[serde(with = "bytes_repr")]
        key: Key,
        /// Linearizable or serializable.
        consistency: Consistency,
        /// Sent as a read-only Txn rather than a Range.
        txn: bool,
    },
    /// Txn{ If mod_revision(key) == expected Then Put(key, value, prev_kv) Else Range(key) }
    /// (the shape Kubernetes uses; expected 0 = "key absent").
    Cas {
        /// The key.
        #[serde(with = "bytes_repr")]
        key: Key,
        /// The compared mod_revision; 0 means "key absent".
        expected_mod_revision: i64,
        /// The value put on success, unique across the history.
        #[serde(with = "bytes_repr")]
        value: Vec<u8>,
    },
    /// DeleteRange of one key with prev_kv = true.
    Delete {
        /// The key.
        #[serde(with = "bytes_repr")]
        key: Key,
    },
    /// One Txn without compares whose success branch puts `values[i]` to
    /// `keys[i]` (prev_kv = true): all the puts take one revision, in the
    /// region or regions holding the keys (a two-phase commit when they lie
    /// in several). Keys distinct, at least one, as many values as keys.
    MultiPut {
        /// The keys.
        #[serde(with = "bytes_repr::seq")]
        keys: Vec<Key>,
        /// The values, each unique across the history.
        #[serde(with = "bytes_repr::seq")]
        values: Vec<Vec<u8>>,
    },
    /// A Range over every key starting with `prefix` (etcd's prefix range),
    /// also sent as a read-only Txn{success:[Range]} when `txn`.
    RangeAll {
        /// The key prefix (the workload's).
        #[serde(with = "bytes_repr")]
        prefix: Key,
        /// Linearizable or serializable.
        consistency: Consistency,
        /// Sent as a read-only Txn rather than a Range.
        txn: bool,
    },
}

/// One key and its KeyValue, as a multi-key read returns it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyKv {
    /// The key.
    #[serde(with = "bytes_repr")]
    pub key: Key,
    /// Its KeyValue.
    pub kv: Kv,
}

/// The answer to a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// header.revision = the write's revision; prev = prev_kv.
    Put {
        /// The write's revision.
        revision: i64,
        /// prev_kv.
        prev: Option<Kv>,
    },
    /// header.revision = the revision the read observed.
    Get {
        /// The revision the read observed.
        revision: i64,
        /// The key's value, None when absent.
        kv: Option<Kv>,
    },
    /// header.revision; succeeded; on success `kv` = the put's prev_kv, on
    /// failure `kv` = what the Else-Range returned.
    Cas {
        /// header.revision (the put's revision on success).
        revision: i64,
        /// Whether the compare held.
        succeeded: bool,
        /// prev_kv on success, the Range result on failure.
        kv: Option<Kv>,
    },
    /// header.revision (the delete's revision when it deleted something,
    /// else the store's current revision); deleted = prev_kv of the deleted
    /// key, None if nothing was deleted.
    Delete {
        /// See above.
        revision: i64,
        /// The deleted key's last KeyValue.
        deleted: Option<Kv>,
    },
    /// header.revision = the revision every put of the MultiPut took;
    /// `prevs[i]` = the prev_kv of `keys[i]`.
    MultiPut {
        /// The puts' revision.
        revision: i64,
        /// prev_kv per key, in the request's key order.
        prevs: Vec<Option<Kv>>,
    },
    /// header.revision = the revision the read observed; `kvs` = every key
    /// of the prefix present at it (a key may appear only once).
    RangeAll {
        /// The revision the read observed.
        revision: i64,
        /// The keys present, with their KeyValues.
        kvs: Vec<KeyKv>,
    },
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The server answered.
    Ok(Response),
    /// Definitely not applied.
    Failed(String),
    /// May or may not have been applied (timeout, cancellation, broken
    /// connection, "request timed out").
    Unknown(String),
}

/// One request of one client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// Unique id (the recorder uses the invocation order).
    pub id: usize,
    /// The client that issued it; a client has one op in flight at a time.
    pub client: usize,
    /// Nanoseconds since the recorder's start when the request was sent.
    pub invoke_ns: u64,
    /// When the answer arrived (for Unknown: when the client gave up).
    pub complete_ns: u64,
    /// The request.
    pub request: Request,
    /// The outcome.
    pub outcome: Outcome,
    /// Which endpoint/node served it (free text, for reports).
    pub endpoint: String,
}

/// A recorded history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// The operations, normally ordered by id.
    pub ops: Vec<Operation>,
}

static NO_KEY: Key = Vec::new();

impl Request {
    /// The key a single-key request touches. For a `MultiPut` its first key
    /// (empty when it has none), for a `RangeAll` its prefix: use
    /// [`Request::is_multi_key`] to tell, and the variant's fields for the
    /// keys. The checker's per-key rules only see single-key requests
    /// (multi-key ones are projected first).
    pub fn key(&self) -> &Key {
        match self {
            Request::Put { key, .. }
            | Request::Get { key, .. }
            | Request::Cas { key, .. }
            | Request::Delete { key } => key,
            Request::MultiPut { keys, .. } => keys.first().unwrap_or(&NO_KEY),
            Request::RangeAll { prefix, .. } => prefix,
        }
    }

    /// Whether the request is a `MultiPut` or a `RangeAll`.
    pub fn is_multi_key(&self) -> bool {
        matches!(self, Request::MultiPut { .. } | Request::RangeAll { .. })
    }

    /// The value a Put or Cas writes; None for every other request (a
    /// MultiPut's values: see [`Request::written_values`]).
    pub fn written_value(&self) -> Option<&[u8]> {
        match self {
            Request::Put { value, .. } | Request::Cas { value, .. } => Some(value),
            _ => None,
        }
    }

    /// Every value the request writes (one for Put/Cas, one per key for a
    /// MultiPut).
    pub fn written_values(&self) -> Vec<&[u8]> {
        match self {
            Request::MultiPut { values, .. } => values.iter().map(Vec::as_slice).collect(),
            _ => self.written_value().into_iter().collect(),
        }
    }

    /// Whether the request may modify the store.
    pub fn is_write(&self) -> bool {
        !matches!(self, Request::Get { .. } | Request::RangeAll { .. })
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Request::Put { .. } => "Put",
            Request::Get { .. } => "Get",
            Request::Cas { .. } => "Cas",
            Request::Delete { .. } => "Delete",
            Request::MultiPut { .. } => "MultiPut",
            Request::RangeAll { .. } => "RangeAll",
        }
    }
}

impl Response {
    /// header.revision.
    pub fn revision(&self) -> i64 {
        match self {
            Response::Put { revision, .. }
            | Response::Get { revision, .. }
            | Response::Cas { revision, .. }
            | Response::Delete { revision, .. }
            | Response::MultiPut { revision, .. }
            | Response::RangeAll { revision, .. } => *revision,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Response::Put { .. } => "Put",
            Response::Get { .. } => "Get",
            Response::Cas { .. } => "Cas",
            Response::Delete { .. } => "Delete",
            Response::MultiPut { .. } => "MultiPut",
            Response::RangeAll { .. } => "RangeAll",
        }
    }
}

impl Operation {
    /// The response when the outcome is Ok.
    pub fn response(&self) -> Option<&Response> {
        match &self.outcome {
            Outcome::Ok(r) => Some(r),
            Outcome::Failed(_) | Outcome::Unknown(_) => None,
        }
    }

    /// The revision this op took as an acknowledged write (Put ok, Cas
    /// succeeded, Delete that deleted something, MultiPut ok).
    pub fn acked_write_revision(&self) -> Option<i64> {
        match self.response()? {
            Response::Put { revision, .. } | Response::MultiPut { revision, .. } => Some(*revision),
            Response::Cas {
                revision,
                succeeded: true,
                ..
            } => Some(*revision),
            Response::Delete {
                revision,
                deleted: Some(_),
            } => Some(*revision),
            _ => None,
        }
    }

    /// Whether this is a serializable read.
    pub fn is_serializable_read(&self) -> bool {
        matches!(
            self.request,
            Request::Get {
                consistency: Consistency::Serializable,
                ..
            } | Request::RangeAll {
                consistency: Consistency::Serializable,
                ..
            }
        )
    }

    /// One line describing the op for reports.
    pub fn describe(&self) -> String {
        let req = match &self.request {
            Request::Put { key, value } => format!("Put({}, {})", show(key), show(value)),
            Request::Get {
                key,
                consistency,
                txn,
            } => format!("Get({}, {})", show(key), read_shape(*consistency, *txn)),
            Request::Cas {
                key,
                expected_mod_revision,
                value,
            } => format!(
                "Cas({}, mod=={expected_mod_revision} ? put {})",
                show(key),
                show(value)
            ),
            Request::Delete { key } => format!("Delete({})", show(key)),
            Request::MultiPut { keys, values } => {
                let puts: Vec<String> = keys
                    .iter()
                    .zip(values)
                    .map(|(k, v)| format!("{}={}", show(k), show(v)))
                    .collect();
                format!("MultiPut({})", puts.join(", "))
            }
            Request::RangeAll {
                prefix,
                consistency,
                txn,
            } => format!(
                "RangeAll({}*, {})",
                show(prefix),
                read_shape(*consistency, *txn)
            ),
        };
        let out = match &self.outcome {
            Outcome::Ok(Response::Put { revision, prev }) => {
                format!("ok rev={revision} prev={}", show_kv(prev.as_ref()))
            }
            Outcome::Ok(Response::Get { revision, kv }) => {
                format!("ok rev={revision} kv={}", show_kv(kv.as_ref()))
            }
            Outcome::Ok(Response::Cas {
                revision,
                succeeded,
                kv,
            }) => {
                let s = if *succeeded { "succeeded" } else { "failed" };
                format!("ok {s} rev={revision} kv={}", show_kv(kv.as_ref()))
            }
            Outcome::Ok(Response::Delete { revision, deleted }) => {
                format!("ok rev={revision} deleted={}", show_kv(deleted.as_ref()))
            }
            Outcome::Ok(Response::MultiPut { revision, prevs }) => {
                let prevs: Vec<String> = prevs.iter().map(|p| show_kv(p.as_ref())).collect();
                format!("ok rev={revision} prevs=[{}]", prevs.join(", "))
            }
            Outcome::Ok(Response::RangeAll { revision, kvs }) => {
                let kvs: Vec<String> = kvs
                    .iter()
                    .map(|e| format!("{}={}", show(&e.key), e.kv))
                    .collect();
                format!("ok rev={revision} kvs=[{}]", kvs.join(", "))
            }
            Outcome::Failed(e) => format!("FAILED ({e})"),
            Outcome::Unknown(e) => format!("UNKNOWN ({e})"),
        };
        format!(
            "#{} client {} [{} .. {}] via {:?}: {req} -> {out}",
            self.id,
            self.client,
            show_ns(self.invoke_ns),
            show_ns(self.complete_ns),
            self.endpoint
        )
    }
}

impl History {
    /// Serializes the history as pretty JSON.
    pub fn to_json(&self) -> Result<String, HistoryError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Parses a history written by [`History::to_json`].
    pub fn from_json(text: &str) -> Result<History, HistoryError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Checks the assumptions the checker relies on: unique ids, unique
    /// write values, response kinds matching request kinds, completion not
    /// before invocation, well-formed MultiPuts (distinct keys, at least
    /// one, one value and one prev_kv slot per key).
    pub fn validate(&self) -> Result<(), HistoryError> {
        let mut ids = std::collections::HashSet::new();
        let mut values: HashMap<&[u8], usize> = HashMap::new();
        for op in &self.ops {
            if !ids.insert(op.id) {
                return Err(HistoryError::DuplicateId(op.id));
            }
            if op.complete_ns < op.invoke_ns {
                return Err(HistoryError::CompletedBeforeInvoked {
                    id: op.id,
                    invoke_ns: op.invoke_ns,
                    complete_ns: op.complete_ns,
                });
            }
            if let Some(resp) = op.response() {
                if resp.kind() != op.request.kind() {
                    return Err(HistoryError::MismatchedResponse {
                        id: op.id,
                        request: op.request.kind(),
                        response: resp.kind(),
                    });
                }
            }
            if let Request::MultiPut { keys, values } = &op.request {
                let malformed =
                    |reason: String| HistoryError::MalformedMultiKey { id: op.id, reason };
                if keys.is_empty() {
                    return Err(malformed("no keys".to_string()));
                }
                if keys.len() != values.len() {
                    return Err(malformed(format!(
                        "{} keys but {} values",
                        keys.len(),
                        values.len()
                    )));
                }
                let distinct: std::collections::HashSet<&Key> = keys.iter().collect();
                if distinct.len() != keys.len() {
                    return Err(malformed("a key appears twice".to_string()));
                }
                if let Some(Response::MultiPut { prevs, .. }) = op.response() {
                    if prevs.len() != keys.len() {
                        return Err(malformed(format!(
                            "{} keys but {} prev_kvs in the response",
                            keys.len(),
                            prevs.len()
                        )));
                    }
                }
            }
            for v in op.request.written_values() {
                if let Some(first) = values.insert(v, op.id) {
                    return Err(HistoryError::DuplicateValue {
                        value: String::from_utf8_lossy(v).into_owned(),
                        first,
                        second: op.id,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Shows bytes as a quoted string (lossy UTF-8).
pub fn show(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

/// Shows an optional kv compactly.
pub fn show_kv(kv: Option<&Kv>) -> String {
    match kv {
        None => "none".to_string(),
        Some(kv) => kv.to_string(),
    }
}

/// Shows a time in milliseconds.
pub fn show_ns(ns: u64) -> String {
    format!("{:.3}ms", ns as f64 / 1e6)
}

impl fmt::Display for Kv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{{} ver={} create={} mod={}}}",
            show(&self.value),
            self.version,
            self.create_revision,
            self.mod_revision
        )
    }
}

/// How a read was sent, for reports: "lin" or "ser", and ", txn" when
/// sent as a read-only Txn.
fn read_shape(consistency: Consistency, txn: bool) -> String {
    let c = match consistency {
        Consistency::Linearizable => "lin",
        Consistency::Serializable => "ser",
    };
    let t = if txn { ", txn" } else { "" };
    format!("{c}{t}")
}
