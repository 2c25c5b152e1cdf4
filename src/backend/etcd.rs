//! etcd (v3 API, `etcd-client` over gRPC): leases, puts under a lease, reads
//! and watches of a key prefix. The client is async; this backend owns a
//! small tokio runtime (one worker thread) and offers blocking calls, each
//! bounded by the request timeout, so a dead etcd never hangs a caller.
//! Keys and values are plain strings and bytes: what they mean is
//! `crate::cluster::keys`' business.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
    WatchStream,
};
use tokio::runtime::Runtime;

/// How long a connection to a member may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one request may take, from sending to its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a connection with open streams (watches, lease keep-alives) is
/// pinged: a cut network breaks them within this plus [`PING_TIMEOUT`]
/// instead of leaving them waiting on a dead connection (a member that dies
/// closes its connections at once). Above etcd's `--grpc-keepalive-min-time`
/// (5 s by default): a member answers more frequent pings, or pings without
/// a stream, with GOAWAY ("too many pings"), which broke watches every few
/// seconds when this was 1 s.
const PING: Duration = Duration::from_secs(6);

/// How long a ping's answer may take.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// gRPC's status code `UNAVAILABLE`: the member cannot take the call now.
const GRPC_UNAVAILABLE: i32 = 14;

/// How long to wait before making a call again that a member could not take.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// The most keys one transaction of [`Etcd::write_all`] writes or deletes:
/// below etcd's `--max-txn-ops` (128 by default).
const TXN_OPS: usize = 64;

/// A lease's id, as etcd gives it.
pub type LeaseId = i64;

/// Talking to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The runtime for the client could not start.
    #[error("starting the etcd client's runtime")]
    Runtime(#[source] std::io::Error),
    /// A TLS file could not be read.
    #[error("reading {path} for TLS to etcd")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A call to etcd failed.
    #[error("etcd at {endpoints}: {what}")]
    Call {
        /// The endpoints tried.
        endpoints: String,
        /// What was asked, e.g. `granting a lease`.
        what: &'static str,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// A call to etcd took longer than its timeout.
    #[error(
        "etcd at {endpoints}: {what}: no answer within {timeout:?}; check that a majority of the members runs and is reachable"
    )]
    Timeout {
        /// The endpoints tried.
        endpoints: String,
        /// What was asked.
        what: &'static str,
        /// How long it waited.
        timeout: Duration,
    },
    /// The thread that keeps a lease alive could not start.
    #[error("starting the thread that keeps etcd lease {id:x} alive")]
    KeeperThread {
        /// The lease.
        id: LeaseId,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A lease is gone (expired or revoked).
    #[error(
        "etcd lease {id:x} has expired or was revoked; registrations must be made again under a new lease"
    )]
    LeaseGone {
        /// The lease.
        id: LeaseId,
    },
    /// A watch ended: etcd cancelled it (e.g. its revision was compacted) or
    /// its stream closed.
    #[error("etcd at {endpoints}: the watch ended ({reason}); read again and watch anew")]
    WatchEnded {
        /// The endpoints tried.
        endpoints: String,
        /// What etcd said, or that the stream closed.
        reason: String,
    },
}

/// Where etcd is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// The members' client URLs.
    pub endpoints: Vec<String>,
    /// TLS: the CA, and the client certificate and key when given.
    pub tls: Option<TlsFiles>,
    /// How long a connection may take to open.
    pub connect_timeout: Duration,
    /// How long one request may take.
    pub request_timeout: Duration,
}

/// PEM files for TLS to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The client certificate and its key.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// One key and its value, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The whole key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The lease the key is attached to (0: none).
    pub lease: LeaseId,
    /// The revision the key was last written at.
    pub mod_revision: i64,
}

/// Every key under a prefix at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The store's revision the read saw: watch from the one after it.
    pub revision: i64,
    /// The keys, in key order.
    pub entries: Vec<Entry>,
}

/// One change a watch saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChange {
    /// A key was written.
    Put(Entry),
    /// A key was deleted (or its lease ended).
    Delete {
        /// The whole key.
        key: String,
        /// The revision of the deletion.
        revision: i64,
    },
}

/// What a compare-and-put expects of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist (its create revision is 0).
    Absent,
    /// The key was last written at this revision (no one wrote it since it was read).
    ModRevision(i64),
    /// No key under this prefix was created after this revision.
    NothingNewUnder(i64),
}

/// A connected etcd client. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Etcd {
    runtime: Arc<Runtime>,
    client: Client,
    endpoints: String,
    timeout: Duration,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl Etcd {
    /// A client for `config`. Connections open on first use, so this fails
    /// only on bad TLS files or URLs, not on an unreachable etcd.
    pub fn connect(config: &EtcdConfig) -> Result<Etcd, EtcdError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lessnat-etcd")
            .enable_all()
            .build()
            .map_err(EtcdError::Runtime)?;
        let endpoints = config.endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout)
            .with_keep_alive(PING, PING_TIMEOUT)
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        if let Some(tls) = &config.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        let what = "connecting";
        let client = runtime
            .block_on(async {
                tokio::time::timeout(
                    config.connect_timeout,
                    Client::connect(&config.endpoints, Some(options)),
                )
                .await
            })
            .map_err(|_| EtcdError::Timeout {
                endpoints: endpoints.clone(),
                what,
                timeout: config.connect_timeout,
            })?
            .map_err(|source| EtcdError::Call {
                endpoints: endpoints.clone(),
                what,
                source,
            })?;
        Ok(Etcd {
            runtime: Arc::new(runtime),
            client,
            endpoints,
            timeout: config.request_timeout,
        })
    }

    /// Runs the call `make` makes on the client's runtime, for at most the
    /// request timeout in all: a call that a member could not take (it is
    /// down: the client spreads calls over every endpoint) is made again, and
    /// lands on another member.
    fn call<T, F, Fut>(&self, what: &'static str, mut make: F) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = &self.client;
        let attempts = async {
            loop {
                match make(client.clone()).await {
                    Err(error) if unavailable(&error) => {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    done => return done,
                }
            }
        };
        self.runtime
            .block_on(async { tokio::time::timeout(self.timeout, attempts).await })
            .map_err(|_| EtcdError::Timeout {
                endpoints: self.endpoints.clone(),
                what,
                timeout: self.timeout,
            })?
            .map_err(|source| EtcdError::Call {
                endpoints: self.endpoints.clone(),
                what,
                source,
            })
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1).
    pub fn grant(&self, ttl: Duration) -> Result<LeaseId, EtcdError> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted = self.call("granting a lease", |mut c| async move {
            c.lease_grant(seconds, None).await
        })?;
        Ok(granted.id())
    }

    /// Starts keeping `lease` alive: each [`KeepAlive::renew`] renews it once.
    pub fn keep_alive(&self, lease: LeaseId) -> Result<KeepAlive, EtcdError> {
        let (keeper, stream) = self.call("keeping a lease alive", |mut c| async move {
            c.lease_keep_alive(lease).await
        })?;
        Ok(KeepAlive {
            etcd: self.clone(),
            keeper,
            stream,
        })
    }

    /// How long `lease` has left and was granted for; `None` when it is gone.
    pub fn lease_left(&self, lease: LeaseId) -> Result<Option<(Duration, Duration)>, EtcdError> {
        let answer = self.call("reading a lease", |mut c| async move {
            c.lease_time_to_live(lease, None).await
        })?;
        Ok((answer.ttl() > 0).then(|| {
            (
                Duration::from_secs(answer.ttl().unsigned_abs()),
                Duration::from_secs(answer.granted_ttl().unsigned_abs()),
            )
        }))
    }

    /// Revokes `lease`: every key attached to it is deleted.
    pub fn revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        self.call("revoking a lease", |mut c| async move {
            c.lease_revoke(lease).await
        })
        .map(drop)
    }

    /// Writes `key` (attached to `lease` when given); returns the revision.
    pub fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<i64, EtcdError> {
        let put = self.call("writing a key", |mut c| async move {
            let options = lease.map(|id| PutOptions::new().with_lease(id));
            c.put(key, value, options).await
        })?;
        Ok(put.header().map_or(0, |h| h.revision()))
    }

    /// Writes `key` (attached to `lease` when given) only when every key
    /// of `expect` is as expected, in one transaction; whether it was written.
    pub fn put_if(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
        expect: &[(&str, Expect)],
    ) -> Result<bool, EtcdError> {
        let compares: Vec<Compare> = expect
            .iter()
            .map(|(key, expect)| match expect {
                Expect::Absent => Compare::create_revision(*key, CompareOp::Equal, 0),
                Expect::ModRevision(revision) => {
                    Compare::mod_revision(*key, CompareOp::Equal, *revision)
                }
                Expect::NothingNewUnder(revision) => {
                    Compare::create_revision(*key, CompareOp::Less, revision + 1).with_prefix()
                }
            })
            .collect();
        let txn = self.call("writing a key if unchanged", |mut c| {
            let compares = compares.clone();
            async move {
                let options = lease.map(|id| PutOptions::new().with_lease(id));
                let txn = Txn::new()
                    .when(compares)
                    .and_then([TxnOp::put(key, value, options)]);
                c.txn(txn).await
            }
        })?;
        Ok(txn.succeeded())
    }

    /// Writes every key of `puts` (attached to `lease` when given) and
    /// deletes every key of `deletes` (keys must not repeat), in one
    /// transaction (one per [`TXN_OPS`] keys): one round trip for a node's
    /// registrations, not one per key, so a slow link does not keep the
    /// caller from renewing the lease they live under.
    pub fn write_all(
        &self,
        puts: &[(String, Vec<u8>)],
        deletes: &[String],
        lease: Option<LeaseId>,
    ) -> Result<(), EtcdError> {
        let ops: Vec<TxnOp> = deletes
            .iter()
            .map(|key| TxnOp::delete(key.as_str(), None))
            .chain(puts.iter().map(|(key, value)| {
                let options = lease.map(|id| PutOptions::new().with_lease(id));
                TxnOp::put(key.as_str(), value.as_slice(), options)
            }))
            .collect();
        for batch in ops.chunks(TXN_OPS) {
            self.call("writing keys", |mut c| {
                let txn = Txn::new().and_then(batch.to_vec());
                async move { c.txn(txn).await }
            })?;
        }
        Ok(())
    }

    /// Deletes `key`; returns the revision.
    pub fn delete(&self, key: &str) -> Result<i64, EtcdError> {
        let deleted = self.call("deleting a key", |mut c| async move {
            c.delete(key, None).await
        })?;
        Ok(deleted.header().map_or(0, |h| h.revision()))
    }

    /// Every key under `prefix`, and the revision of the read.
    pub fn get_prefix(&self, prefix: &str) -> Result<Snapshot, EtcdError> {
        let mut read = self.call("reading keys", |mut c| async move {
            c.get(prefix, Some(GetOptions::new().with_prefix())).await
        })?;
        let revision = read.header().map_or(0, |h| h.revision());
        let entries = read.take_kvs().iter().map(entry).collect();
        Ok(Snapshot { revision, entries })
    }

    /// Watches every key under `prefix`, from `revision` on (inclusive).
    pub fn watch_prefix(&self, prefix: &str, revision: i64) -> Result<Watch, EtcdError> {
        let stream = self.call("starting a watch", |mut c| async move {
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision)
                .with_progress_notify();
            c.watch(prefix, Some(options)).await
        })?;
        Ok(Watch {
            etcd: self.clone(),
            stream,
        })
    }
}

/// Keeps one lease alive.
pub struct KeepAlive {
    etcd: Etcd,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

impl std::fmt::Debug for KeepAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeepAlive")
            .field("lease", &self.keeper.id())
            .finish_non_exhaustive()
    }
}

impl KeepAlive {
    /// The lease kept alive.
    pub fn lease(&self) -> LeaseId {
        self.keeper.id()
    }

    /// Renews the lease once; returns its TTL from now.
    /// [`EtcdError::LeaseGone`] when it expired meanwhile. A stream that
    /// broke (its member died, say) is opened again, through any member
    /// that answers, and the renewal tried once more: a lease must outlive
    /// the member its keep-alive happened to use.
    pub fn renew(&mut self) -> Result<Duration, EtcdError> {
        match self.renew_once() {
            Err(EtcdError::LeaseGone { id }) => Err(EtcdError::LeaseGone { id }),
            Err(_) => {
                *self = self.etcd.keep_alive(self.lease())?;
                self.renew_once()
            }
            renewed => renewed,
        }
    }

    /// One renewal on the current stream, which is not opened again when
    /// it fails: the caller decides what an unanswered renewal means
    /// (`cluster::lease`).
    pub fn renew_once(&mut self) -> Result<Duration, EtcdError> {
        let id = self.keeper.id();
        let (keeper, stream) = (&mut self.keeper, &mut self.stream);
        let etcd = &self.etcd;
        let answer = etcd
            .runtime
            .block_on(async {
                tokio::time::timeout(etcd.timeout, async {
                    keeper.keep_alive().await?;
                    stream.message().await
                })
                .await
            })
            .map_err(|_| EtcdError::Timeout {
                endpoints: etcd.endpoints.clone(),
                what: "renewing a lease",
                timeout: etcd.timeout,
            })?
            .map_err(|source| EtcdError::Call {
                endpoints: etcd.endpoints.clone(),
                what: "renewing a lease",
                source,
            })?;
        match answer {
            Some(answer) if answer.ttl() > 0 => {
                Ok(Duration::from_secs(answer.ttl().unsigned_abs()))
            }
            Some(_) => Err(EtcdError::LeaseGone { id }),
            None => Err(EtcdError::WatchEnded {
                endpoints: self.etcd.endpoints.clone(),
                reason: "the keep-alive stream closed".into(),
            }),
        }
    }
}

/// A watch of a key prefix.
pub struct Watch {
    etcd: Etcd,
    stream: WatchStream,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

impl Watch {
    /// Waits up to `wait` for changes: `Ok(None)` when none came, else the
    /// changes of one answer (possibly empty: a progress notice) and the
    /// revision they bring the watcher to.
    pub fn next(&mut self, wait: Duration) -> Result<Option<(i64, Vec<KeyChange>)>, EtcdError> {
        let endpoints = &self.etcd.endpoints;
        let stream = &mut self.stream;
        let message = self
            .etcd
            .runtime
            .block_on(async { tokio::time::timeout(wait, stream.message()).await });
        let Ok(message) = message else {
            return Ok(None);
        };
        let answer = message
            .map_err(|source| EtcdError::Call {
                endpoints: endpoints.clone(),
                what: "watching keys",
                source,
            })?
            .ok_or_else(|| EtcdError::WatchEnded {
                endpoints: endpoints.clone(),
                reason: "the stream closed".into(),
            })?;
        if answer.canceled() {
            return Err(EtcdError::WatchEnded {
                endpoints: endpoints.clone(),
                reason: match answer.compact_revision() {
                    0 => format!("cancelled: {}", answer.cancel_reason()),
                    compacted => format!("compacted up to revision {compacted}"),
                },
            });
        }
        let revision = answer.header().map_or(0, |h| h.revision());
        let changes = answer
            .events()
            .iter()
            .filter_map(|event| {
                let kv = event.kv()?;
                Some(match event.event_type() {
                    EventType::Put => KeyChange::Put(entry(kv)),
                    EventType::Delete => KeyChange::Delete {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        revision: kv.mod_revision(),
                    },
                })
            })
            .collect();
        Ok(Some((revision, changes)))
    }
}

/// Whether `error` says a member could not take the call (down, or
/// without a leader): another member may.
fn unavailable(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => i32::from(status.code()) == GRPC_UNAVAILABLE,
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

fn entry(kv: &etcd_client::KeyValue) -> Entry {
    Entry {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        lease: kv.lease(),
        mod_revision: kv.mod_revision(),
    }
}

fn tls_options(tls: &TlsFiles) -> Result<TlsOptions, EtcdError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| EtcdError::TlsFile {
            path: path.clone(),
            source,
        })
    };
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
    if let Some((cert, key)) = &tls.identity {
        options = options.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(options)
}
