//! The checker's requests over the `etcd-client` crate, one client per
//! endpoint, for real `metastore-node` processes and real etcd alike. A
//! MultiPut is one Txn without compares putting every key (prev_kv); a
//! RangeAll a prefix Range (or a read-only Txn holding one).
//!
//! Outcome classification: a response is `Ok`; an etcd request error
//! (invalid argument, out of range, not found) and a call whose connection
//! was never made are `Failed`; a call cut by its deadline, a broken
//! connection and "request timed out" are `Unknown`. With
//! [`Claims::MetaStore`], the errors MetaStore documents as "certainly not
//! applied" ("no leader", "leader changed", "server stopped", placement
//! driver failures) are `Failed` too — so the checker holds MetaStore to
//! that claim (a write reported so and applied anyway is a violation);
//! etcd's own meaning of those texts is not relied on ([`Claims::Etcd`]).

use std::time::Duration;

use checker::{Consistency, KeyKv, Kv, Outcome, Request, RereadResult, Response};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, KvClient, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchClient, WatchFilterType, WatchOptions,
};

use crate::history::Executor;
use crate::watch_recorder::{WatchSource, WatchStream};

/// Which errors count as "certainly not applied".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claims {
    MetaStore,
    Etcd,
}

pub struct EtcdExecutor {
    clients: Vec<KvClient>,
    watch_clients: Vec<WatchClient>,
    claims: Claims,
}

impl EtcdExecutor {
    /// Connects one client to each of `endpoints` (all must be up now).
    pub async fn connect(endpoints: &[String], claims: Claims) -> EtcdExecutor {
        let mut clients = Vec::new();
        let mut watch_clients = Vec::new();
        for ep in endpoints {
            let client = crate::process::client(ep).await;
            clients.push(client.kv_client());
            watch_clients.push(client.watch_client());
        }
        EtcdExecutor {
            clients,
            watch_clients,
            claims,
        }
    }

    fn classify(&self, err: etcd_client::Error) -> Outcome {
        use tonic::Code;
        let text = err.to_string();
        match &err {
            etcd_client::Error::GRpcStatus(s) => {
                let msg = s.message();
                match s.code() {
                    Code::InvalidArgument
                    | Code::OutOfRange
                    | Code::NotFound
                    | Code::FailedPrecondition => Outcome::Failed(text),
                    Code::Unavailable if not_sent(msg) => Outcome::Failed(text),
                    Code::Unavailable
                        if self.claims == Claims::MetaStore
                            && (msg == "etcdserver: no leader"
                                || msg == "etcdserver: leader changed"
                                || msg == "etcdserver: server stopped"
                                || msg.starts_with("etcdserver: placement driver")) =>
                    {
                        Outcome::Failed(text)
                    }
                    _ => Outcome::Unknown(text),
                }
            }
            etcd_client::Error::TransportError(_) if not_sent(&text) => Outcome::Failed(text),
            _ => Outcome::Unknown(text),
        }
    }

    async fn call(&self, endpoint: usize, req: &Request) -> Result<Response, etcd_client::Error> {
        let mut kv = self.clients[endpoint].clone();
        Ok(match req {
            Request::Put { key, value } => {
                let r = kv
                    .put(
                        key.clone(),
                        value.clone(),
                        Some(PutOptions::new().with_prev_key()),
                    )
                    .await?;
                Response::Put {
                    revision: revision(r.header()),
                    prev: r.prev_key().map(to_kv),
                }
            }
            Request::Get {
                key,
                consistency,
                txn,
            } => {
                let mut opts = GetOptions::new();
                if *consistency == Consistency::Serializable {
                    opts = opts.with_serializable();
                }
                if *txn {
                    let r = kv
                        .txn(Txn::new().and_then([TxnOp::get(key.clone(), Some(opts))]))
                        .await?;
                    let kv = match r.op_responses().into_iter().next() {
                        Some(TxnOpResponse::Get(g)) => g.kvs().first().map(to_kv),
                        _ => None,
                    };
                    Response::Get {
                        revision: revision(r.header()),
                        kv,
                    }
                } else {
                    let r = kv.get(key.clone(), Some(opts)).await?;
                    Response::Get {
                        revision: revision(r.header()),
                        kv: r.kvs().first().map(to_kv),
                    }
                }
            }
            Request::Cas {
                key,
                expected_mod_revision,
                value,
            } => {
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        *expected_mod_revision,
                    )])
                    .and_then([TxnOp::put(
                        key.clone(),
                        value.clone(),
                        Some(PutOptions::new().with_prev_key()),
                    )])
                    .or_else([TxnOp::get(key.clone(), None)]);
                let r = kv.txn(txn).await?;
                let kv = match r.op_responses().into_iter().next() {
                    Some(TxnOpResponse::Put(p)) => p.prev_key().map(to_kv),
                    Some(TxnOpResponse::Get(g)) => g.kvs().first().map(to_kv),
                    _ => None,
                };
                Response::Cas {
                    revision: revision(r.header()),
                    succeeded: r.succeeded(),
                    kv,
                }
            }
            Request::MultiPut { keys, values } => {
                let puts: Vec<TxnOp> = keys
                    .iter()
                    .zip(values)
                    .map(|(k, v)| {
                        TxnOp::put(
                            k.clone(),
                            v.clone(),
                            Some(PutOptions::new().with_prev_key()),
                        )
                    })
                    .collect();
                let r = kv.txn(Txn::new().and_then(puts)).await?;
                let prevs: Vec<Option<Kv>> = r
                    .op_responses()
                    .into_iter()
                    .filter_map(|op| match op {
                        TxnOpResponse::Put(p) => Some(p.prev_key().map(to_kv)),
                        _ => None,
                    })
                    .collect();
                if prevs.len() != keys.len() || !r.succeeded() {
                    // Unknown outcome rather than a malformed history.
                    return Err(etcd_client::Error::Internal(format!(
                        "a Txn of {} puts answered {} put responses (succeeded: {})",
                        keys.len(),
                        prevs.len(),
                        r.succeeded()
                    )));
                }
                Response::MultiPut {
                    revision: revision(r.header()),
                    prevs,
                }
            }
            Request::RangeAll {
                prefix,
                consistency,
                txn,
            } => {
                let mut opts = GetOptions::new().with_prefix();
                if *consistency == Consistency::Serializable {
                    opts = opts.with_serializable();
                }
                if *txn {
                    let r = kv
                        .txn(Txn::new().and_then([TxnOp::get(prefix.clone(), Some(opts))]))
                        .await?;
                    let kvs = match r.op_responses().into_iter().next() {
                        Some(TxnOpResponse::Get(g)) => key_kvs(g.kvs()),
                        _ => Vec::new(),
                    };
                    Response::RangeAll {
                        revision: revision(r.header()),
                        kvs,
                    }
                } else {
                    let r = kv.get(prefix.clone(), Some(opts)).await?;
                    Response::RangeAll {
                        revision: revision(r.header()),
                        kvs: key_kvs(r.kvs()),
                    }
                }
            }
            Request::Delete { key } => {
                let r = kv
                    .delete(key.clone(), Some(DeleteOptions::new().with_prev_key()))
                    .await?;
                Response::Delete {
                    revision: revision(r.header()),
                    deleted: r.prev_kvs().first().map(to_kv),
                }
            }
        })
    }
}

#[async_trait::async_trait]
impl Executor for EtcdExecutor {
    fn endpoints(&self) -> usize {
        self.clients.len()
    }

    async fn execute(&self, endpoint: usize, req: &Request, deadline: Duration) -> Outcome {
        match tokio::time::timeout(deadline, self.call(endpoint, req)).await {
            Ok(Ok(resp)) => Outcome::Ok(resp),
            Ok(Err(e)) => self.classify(e),
            Err(_) => Outcome::Unknown(format!("cancelled after {deadline:?}")),
        }
    }

    async fn reread(&self, key: &[u8], revision: i64) -> Result<RereadResult, String> {
        let mut last = String::new();
        for client in &self.clients {
            let mut kv = client.clone();
            let opts = GetOptions::new().with_revision(revision);
            match tokio::time::timeout(Duration::from_secs(5), kv.get(key.to_vec(), Some(opts)))
                .await
            {
                Ok(Ok(r)) => return Ok(RereadResult::Kv(r.kvs().first().map(to_kv))),
                Ok(Err(etcd_client::Error::GRpcStatus(s)))
                    if s.message().contains("required revision has been compacted") =>
                {
                    return Ok(RereadResult::Compacted)
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "timed out".into(),
            }
        }
        Err(last)
    }
}

/// Whether a failed call certainly never reached a server.
fn not_sent(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "tcp connect error",
        "connection refused",
        "error trying to connect",
    ]
    .iter()
    .any(|m| t.contains(m))
}

fn revision(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.map_or(0, |h| h.revision())
}

fn to_kv(kv: &KeyValue) -> Kv {
    Kv {
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
    }
}

fn key_kvs(kvs: &[KeyValue]) -> Vec<KeyKv> {
    kvs.iter()
        .map(|kv| KeyKv {
            key: kv.key().to_vec(),
            kv: to_kv(kv),
        })
        .collect()
}

/// How often a watch asks for a progress notification (RequestProgress)
/// while it may.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// With [`Claims::Etcd`], how long a watch must have received nothing
/// before it asks for progress (once the run is over).
const ETCD_QUIET: Duration = Duration::from_secs(1);

/// Watches over etcd's Watch RPC, one gRPC stream per watch. A response
/// is recorded as it came (no fragments: none are asked for); one without
/// events that is neither created nor canceled is a progress notification
/// (`requested` when it answers a RequestProgress: watch id -1). Each
/// watch asks for progress every [`PROGRESS_EVERY`]: with
/// [`Claims::MetaStore`] all along; with [`Claims::Etcd`] only once the
/// run is over and the watch has received nothing for [`ETCD_QUIET`] —
/// etcd 3.4 before 3.4.24 answers RequestProgress at once, ahead of the
/// events still pending for the watch (etcd-io/etcd#15220), which the
/// checker rightly reports.
#[async_trait::async_trait]
impl WatchSource for EtcdExecutor {
    fn endpoints(&self) -> usize {
        self.watch_clients.len()
    }

    async fn open(
        &self,
        endpoint: usize,
        request: &checker::Watch,
        catching_up: Arc<AtomicBool>,
    ) -> Result<(Box<dyn WatchStream>, checker::WatchResponse), String> {
        let mut options = WatchOptions::new().with_start_revision(request.start_revision);
        if !request.range_end.is_empty() {
            options = options.with_range(request.range_end.clone());
        }
        if request.prev_kv {
            options = options.with_prev_key();
        }
        if request.progress_notify {
            options = options.with_progress_notify();
        }
        let mut filters = Vec::new();
        if request.no_put {
            filters.push(WatchFilterType::NoPut);
        }
        if request.no_delete {
            filters.push(WatchFilterType::NoDelete);
        }
        if !filters.is_empty() {
            options = options.with_filters(filters);
        }
        let mut client = self.watch_clients[endpoint].clone();
        let mut stream = client
            .watch(request.key.clone(), Some(options))
            .await
            .map_err(|e| e.to_string())?;
        let first = stream
            .message()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the stream ended before the created response")?;
        if !first.created() || first.canceled() {
            return Err(format!("not created: {first:?}"));
        }
        let created = checker::WatchResponse {
            revision: revision(first.header()),
            created: true,
            ..Default::default()
        };
        let stream = EtcdWatchStream {
            stream,
            tick: tokio::time::interval(PROGRESS_EVERY),
            always: self.claims == Claims::MetaStore,
            catching_up,
            last_message: Instant::now(),
        };
        Ok((Box::new(stream), created))
    }

    async fn current_revision(&self) -> Result<i64, String> {
        let mut last = String::new();
        for client in &self.clients {
            let mut kv = client.clone();
            let get = kv.get(b"watch-recorder/current".to_vec(), None);
            match tokio::time::timeout(Duration::from_secs(5), get).await {
                Ok(Ok(r)) => return Ok(revision(r.header())),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "timed out".into(),
            }
        }
        Err(last)
    }
}

/// One watch of an [`EtcdExecutor`] (see its [`WatchSource`]).
struct EtcdWatchStream {
    stream: etcd_client::WatchStream,
    tick: tokio::time::Interval,
    /// Ask for progress all along, not only while catching up.
    always: bool,
    catching_up: Arc<AtomicBool>,
    last_message: Instant,
}

#[async_trait::async_trait]
impl WatchStream for EtcdWatchStream {
    async fn next(&mut self) -> Result<checker::WatchResponse, String> {
        loop {
            tokio::select! {
                m = self.stream.message() => {
                    self.last_message = Instant::now();
                    let resp = match m {
                        Ok(Some(resp)) => resp,
                        Ok(None) => return Err("the stream ended".into()),
                        Err(e) => return Err(e.to_string()),
                    };
                    if resp.canceled() && resp.compact_revision() == 0 {
                        eprintln!("watch canceled: {:?}", resp.cancel_reason());
                    }
                    let events: Vec<checker::WatchEvent> = resp.events().iter().map(to_event).collect();
                    let progress = events.is_empty() && !resp.created() && !resp.canceled();
                    return Ok(checker::WatchResponse {
                        revision: revision(resp.header()),
                        created: resp.created(),
                        canceled: resp.canceled(),
                        compact_revision: resp.compact_revision(),
                        progress,
                        requested: progress && resp.watch_id() == -1,
                        events,
                    });
                }
                _ = self.tick.tick() => {
                    let ask = self.always
                        || (self.catching_up.load(Ordering::SeqCst)
                            && self.last_message.elapsed() >= ETCD_QUIET);
                    if ask {
                        self.stream.request_progress().await.map_err(|e| e.to_string())?;
                    }
                }
            }
        }
    }
}

/// An etcd-client event as the checker records it.
fn to_event(e: &etcd_client::Event) -> checker::WatchEvent {
    let kind = match e.event_type() {
        etcd_client::EventType::Put => checker::EventType::Put,
        etcd_client::EventType::Delete => checker::EventType::Delete,
    };
    checker::WatchEvent {
        kind,
        key: e.kv().map(|kv| kv.key().to_vec()).unwrap_or_default(),
        kv: e.kv().map(to_kv).unwrap_or(Kv {
            value: Vec::new(),
            create_revision: 0,
            mod_revision: 0,
            version: 0,
        }),
        prev_kv: e.prev_kv().map(to_kv),
    }
}
