//! Errors for histories the checker refuses to check.
//!
//! Contract: a [`HistoryError`] means the history itself is malformed (it
//! breaks an assumption the checker relies on, such as unique write values),
//! never that the system under test misbehaved — misbehaviour is reported as
//! a [`crate::Violation`].

/// Why a history cannot be checked.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// `History::from_json` got text that is not a serialized history.
    #[error("history is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Two writes carry the same value, so an observed value cannot be
    /// traced back to the one write that produced it.
    #[error(
        "ops #{first} and #{second} both write the value {value:?}: every write must carry a value unique across the history"
    )]
    DuplicateValue {
        /// The shared value (lossy UTF-8).
        value: String,
        /// Id of the first op writing it.
        first: usize,
        /// Id of the second op writing it.
        second: usize,
    },
    /// Two operations share an id.
    #[error("two operations have the id #{0}")]
    DuplicateId(usize),
    /// The response kind does not belong to the request kind.
    #[error("op #{id}: a {request} request cannot have a {response} response")]
    MismatchedResponse {
        /// The op's id.
        id: usize,
        /// The request kind.
        request: &'static str,
        /// The response kind.
        response: &'static str,
    },
    /// A MultiPut without keys, with a key twice, with not one value per
    /// key, or whose response has not one prev_kv slot per key.
    #[error("op #{id}: malformed multi-key operation: {reason}")]
    MalformedMultiKey {
        /// The op's id.
        id: usize,
        /// What is wrong.
        reason: String,
    },
    /// A recorded watch breaks the shapes the watch checker relies on (see
    /// `crate::watch`).
    #[error("watch #{watch}: malformed recording: {reason}")]
    MalformedWatch {
        /// The watch's index.
        watch: usize,
        /// What is wrong.
        reason: String,
    },
    /// The completion time precedes the invocation time.
    #[error("op #{id}: completed at {complete_ns} ns, before it was invoked at {invoke_ns} ns")]
    CompletedBeforeInvoked {
        /// The op's id.
        id: usize,
        /// Invocation time.
        invoke_ns: u64,
        /// Completion time.
        complete_ns: u64,
    },
}
