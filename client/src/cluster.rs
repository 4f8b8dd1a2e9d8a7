//! A cluster of shards and direct (uncached) table access.

use std::sync::Arc;

use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_transport::codec::assign::{Assignment, Refused, StateChange};
use hetkv_transport::{
    wire::CheckpointResponse, ShardStats, ShardTransport, ShmTransport, StaleQuery, StaleRows,
    TableSpec, Traffic, TransportError,
};

use crate::ClientError;

/// How a client reaches the shards (DESIGN section 6). Serialized as its name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// For each shard: RDMA where a device works and the daemon serves it, else shared memory where
    /// the daemon is on this host, else TCP; the choices and their reasons are logged once.
    #[default]
    Auto,
    /// Frames over TCP for everything.
    Tcp,
    /// One-sided reads of the daemons' regions mapped from shared memory; pushes and control over
    /// TCP. Fails unless every daemon is on this host and exposes its regions (`--shm-dir`).
    Shm,
    /// One-sided RDMA READs; pushes and control over TCP. Needs the `rdma` feature and a device.
    Rdma,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Tcp => "tcp",
            Self::Shm => "shm",
            Self::Rdma => "rdma",
        })
    }
}

impl std::str::FromStr for TransportKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "tcp" => Ok(Self::Tcp),
            "shm" => Ok(Self::Shm),
            "rdma" => Ok(Self::Rdma),
            _ => Err(format!(
                "transport {s:?} is not one of auto, tcp, shm, rdma"
            )),
        }
    }
}

/// What a call does when it learns that a shard restarted from a checkpoint that lacks pushes it
/// had acknowledged to this client (updates the model lost).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnRollback {
    /// The call fails with [`ClientError::RolledBack`] (once per rollback: the call's own work
    /// was done, and later calls go on). The default: a trainer is told.
    #[default]
    Error,
    /// The rollback is logged (a warning) and the call goes on.
    Continue,
}

/// The acknowledged pushes restarts took back that calls have reported, and what to do about
/// new ones.
#[derive(Debug, Default)]
struct Rollbacks {
    reported: std::sync::atomic::AtomicU64,
    go_on: std::sync::atomic::AtomicBool,
}

/// What a push did ([`Table::push_report`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushReport {
    /// Updates applied (the counts of the rows applied, summed).
    pub applied: u64,
    /// The keys a dynamic table did not admit, with the update counts dropped for each, in the
    /// push's order (empty for a fixed table, and for rows a shard acknowledged as a repeat of a
    /// push it applied before).
    pub refused: Vec<(u64, u32)>,
}

/// A connected cluster: an ordered list of shards.
#[derive(Clone)]
pub struct Cluster {
    shards: Arc<[Arc<dyn ShardTransport>]>,
    /// Set by [`Cluster::close`]: every later call fails at once.
    closed: Arc<std::sync::atomic::AtomicBool>,
    rollbacks: Arc<Rollbacks>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addrs: Vec<_> = self.shards.iter().map(|s| s.addr().to_string()).collect();
        f.debug_struct("Cluster").field("shards", &addrs).finish()
    }
}

impl Cluster {
    /// Connects to every shard over TCP (`addrs` in shard order) and checks that each is the
    /// shard it is listed as.
    pub fn connect_tcp<A: AsRef<str>>(
        addrs: &[A],
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        let shards = addrs
            .iter()
            .map(|a| {
                TcpShardClient::connect(a.as_ref(), config.clone())
                    .map(|c| Arc::new(c) as Arc<dyn ShardTransport>)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_transports(shards)
    }

    /// Connects to every shard (`addrs` in shard order) over the transport `kind` asks for:
    /// `Auto` picks, for each shard, RDMA where it works, else shared memory where the daemon is on
    /// this host, else TCP, and logs the choices and their reasons once; an explicit kind that
    /// cannot work for some shard fails with the reason.
    pub fn connect<A: AsRef<str>>(
        addrs: &[A],
        kind: TransportKind,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        let controls = addrs
            .iter()
            .map(|a| TcpShardClient::connect(a.as_ref(), config.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let (shards, chosen) = select(controls, kind)?;
        // `auto` says what it chose and why once per process; later connections say it at debug.
        static SAID: std::sync::Once = std::sync::Once::new();
        let mut first = false;
        if kind == TransportKind::Auto {
            SAID.call_once(|| first = true);
        }
        let chosen = chosen.join(", ");
        if first {
            tracing::info!(transports = %chosen, "transports chosen");
        } else {
            tracing::debug!(transports = %chosen, "transports chosen");
        }
        Self::from_transports(shards)
    }

    /// A cluster over already-connected transports, in shard order.
    pub fn from_transports(shards: Vec<Arc<dyn ShardTransport>>) -> Result<Self, ClientError> {
        if shards.is_empty() {
            return Err(ClientError::InconsistentCluster("no shards".into()));
        }
        for (i, s) in shards.iter().enumerate() {
            let h = s.hello();
            if h.shard as usize != i || h.shards as usize != shards.len() {
                return Err(ClientError::InconsistentCluster(format!(
                    "{} is shard {} of {}, but is listed as shard {i} of {}",
                    s.addr(),
                    h.shard,
                    h.shards,
                    shards.len()
                )));
            }
        }
        Ok(Self {
            shards: shards.into(),
            closed: Arc::default(),
            rollbacks: Arc::default(),
        })
    }

    /// What calls on this cluster (its tables and caches included) do when a shard's restart
    /// took back acknowledged pushes ([`OnRollback::Error`] unless set).
    pub fn set_on_rollback(&self, on: OnRollback) {
        self.rollbacks.go_on.store(
            on == OnRollback::Continue,
            std::sync::atomic::Ordering::Release,
        );
    }

    /// Fails, once per rollback, when a shard's restart took back acknowledged pushes of this
    /// client since the last report (see [`OnRollback`]).
    pub(crate) fn check_rollbacks(&self) -> Result<(), ClientError> {
        use std::sync::atomic::Ordering;
        let r = self.restarts();
        let before = self
            .rollbacks
            .reported
            .fetch_max(r.pushes_rolled_back, Ordering::AcqRel);
        if r.pushes_rolled_back <= before {
            return Ok(());
        }
        let pushes = r.pushes_rolled_back - before;
        let error = ClientError::RolledBack {
            pushes,
            total_pushes: r.pushes_rolled_back,
            total_rows: r.rows_rolled_back,
        };
        if self.rollbacks.go_on.load(Ordering::Acquire) {
            tracing::warn!(%error, "going on after a rollback");
            return Ok(());
        }
        Err(error)
    }

    /// Closes the cluster for every handle of it (its tables and caches included): later calls
    /// fail at once with [`ClientError::Closed`] instead of waiting out their deadline for
    /// shards that are gone (an embedded cluster that was stopped, say).
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether [`Cluster::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Fails once the cluster is closed.
    pub(crate) fn check_open(&self) -> Result<(), ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Shard `i`'s transport.
    pub fn shard(&self, i: usize) -> &Arc<dyn ShardTransport> {
        &self.shards[i]
    }

    /// Creates the table on every shard (idempotent for an identical spec). Refused when some
    /// shards hold it with updates applied and others lack it: those lost their state (a
    /// restarted shard on an empty volume) and would serve its rows at their initial values
    /// beside trained ones; restore them from a checkpoint, or say the table starts again there
    /// with [`Cluster::create_table_fresh`]. (Some shards holding it untrained is a creation
    /// that failed part way, which this completes.)
    pub fn create_table(&self, spec: &TableSpec) -> Result<Table, ClientError> {
        self.check_open()?;
        let all: Vec<usize> = (0..self.shards.len()).collect();
        let held = self.on_shards(&all, |_, s| {
            Ok(s.list_tables()?.iter().any(|t| t.spec.name == spec.name))
        });
        let held = held.into_iter().collect::<Result<Vec<bool>, _>>()?;
        let lacking: Vec<usize> = all.iter().copied().filter(|&s| !held[s]).collect();
        if !lacking.is_empty() && lacking.len() < all.len() {
            // A shard's table clock counts the updates applied to its part of the table.
            let mut trained = Vec::new();
            for s in all.iter().copied().filter(|&s| held[s]) {
                let pulled =
                    self.shards[s].pull(&spec.name, &[], &mut Vec::new(), &mut Vec::new())?;
                if pulled.clock > 0 {
                    trained.push(s);
                }
            }
            if !trained.is_empty() {
                let names = |shards: &[usize]| {
                    shards
                        .iter()
                        .map(|&s| format!("{s} ({})", self.shards[s].addr()))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                return Err(ClientError::InconsistentCluster(format!(
                    "table {} is held, with updates applied, by shard(s) {} and missing on \
                     shard(s) {}, which lost their state (an empty volume?): restore them from a \
                     checkpoint, or start the table again there with create_table_fresh",
                    spec.name,
                    names(&trained),
                    names(&lacking),
                )));
            }
        }
        self.create_table_fresh(spec)
    }

    /// [`Cluster::create_table`] without the check for shards that lost the table: the shards
    /// that lack it create it at its initial values, whatever the others hold.
    pub fn create_table_fresh(&self, spec: &TableSpec) -> Result<Table, ClientError> {
        self.check_open()?;
        for s in self.shards.iter() {
            s.create_table(spec)?;
        }
        Ok(Table {
            cluster: self.clone(),
            spec: Arc::new(spec.clone()),
        })
    }

    /// Drops the table on every shard (in parallel): its rows, optimizer state and regions go,
    /// and its name may be created again. Handles of it fail from then on (`UnknownTable`),
    /// one-sided readers included; a cache of it fails at its next request to a shard (lookups
    /// its lines answer within their bounds send none). Succeeds when every shard answered and at
    /// least one held it, so a drop that failed part way can be asked again;
    /// [`ClientError::UnknownTable`] when none held it; when some shards dropped it and others
    /// failed, [`ClientError::PartlyApplied`] says which.
    pub fn drop_table(&self, name: &str) -> Result<(), ClientError> {
        self.check_open()?;
        let all: Vec<usize> = (0..self.shards.len()).collect();
        let outcomes = self.on_shards(&all, |_, shard| shard.drop_table(name));
        let (mut dropped, mut failed) = (Vec::new(), Vec::new());
        let mut held = false;
        for (s, r) in outcomes.into_iter().enumerate() {
            match r {
                Ok(d) => {
                    held |= d;
                    dropped.push(format!("shard {s} ({})", self.shards[s].addr()));
                }
                Err(e) => failed.push(format!("shard {s} ({}) {e}", self.shards[s].addr())),
            }
        }
        match (failed.is_empty(), held) {
            (true, true) => Ok(()),
            (true, false) => Err(ClientError::UnknownTable(name.to_string())),
            (false, _) => Err(ClientError::PartlyApplied {
                table: name.to_string(),
                applied: if dropped.is_empty() {
                    "no shard dropped it".into()
                } else {
                    format!("dropped on {}", dropped.join(", "))
                },
                failed: failed.join("; "),
            }),
        }
    }

    /// Opens an existing table, checking that every shard holds it with the same spec.
    pub fn open_table(&self, name: &str) -> Result<Table, ClientError> {
        self.check_open()?;
        let mut found: Option<TableSpec> = None;
        for s in self.shards.iter() {
            let spec = s
                .list_tables()?
                .into_iter()
                .find(|t| t.spec.name == name)
                .map(|t| t.spec)
                .ok_or_else(|| ClientError::UnknownTable(name.to_string()))?;
            match &found {
                Some(f) if f != &spec => {
                    return Err(ClientError::InconsistentCluster(format!(
                        "table {name} differs between shards: {f:?} vs {spec:?}"
                    )))
                }
                _ => found = Some(spec),
            }
        }
        let spec = found.ok_or_else(|| ClientError::UnknownTable(name.to_string()))?;
        Ok(Table {
            cluster: self.clone(),
            spec: Arc::new(spec),
        })
    }

    /// Every shard's statistics, in shard order.
    pub fn stats(&self) -> Result<Vec<ShardStats>, ClientError> {
        self.check_open()?;
        Ok(self
            .shards
            .iter()
            .map(|s| s.stats())
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// Asks every shard, in parallel, to write checkpoint `name` (with `incremental`, of the rows
    /// changed since its previous one) into its data directory; returns each shard's answer in
    /// shard order once all have committed. The shards keep serving meanwhile, so the checkpoint
    /// is a consistent cut of a job only while its workers are quiet ([`crate::CheckpointBarrier`]).
    /// Each call is bound by the transports' I/O timeout.
    pub fn checkpoint(
        &self,
        name: &str,
        incremental: bool,
    ) -> Result<Vec<CheckpointResponse>, ClientError> {
        let all: Vec<usize> = (0..self.shards.len()).collect();
        self.on_shards(&all, |_, shard| shard.checkpoint(name, incremental))
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(ClientError::from)
    }

    /// Whether `other` is this same connection (a clone of it), not another.
    pub fn same(&self, other: &Cluster) -> bool {
        Arc::ptr_eq(&self.shards, &other.shards)
    }

    /// Runs `f` for each of `shards`, in parallel when there are several, and returns each
    /// shard's result in the order given. No lock is held; each call uses its own connection.
    pub fn on_shards<T: Send>(
        &self,
        shards: &[usize],
        f: impl Fn(usize, &dyn ShardTransport) -> Result<T, TransportError> + Sync,
    ) -> Vec<Result<T, TransportError>> {
        let Some((&first, rest)) = shards.split_first() else {
            return Vec::new();
        };
        if self.is_closed() {
            return shards
                .iter()
                .map(|&s| {
                    Err(TransportError::Io {
                        addr: self.shards[s].addr().to_string(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotConnected,
                            "the cluster was closed",
                        ),
                    })
                })
                .collect();
        }
        if rest.is_empty() {
            return vec![f(first, &*self.shards[first])];
        }
        // The calling thread serves the first shard itself; the others get a scoped thread each,
        // interrupted with it (hetkv_transport::interrupt).
        let f = &f;
        let flag = hetkv_transport::interrupt::current_flag();
        std::thread::scope(|scope| {
            let handles: Vec<_> = rest
                .iter()
                .map(|&s| {
                    let shard = &*self.shards[s];
                    let flag = flag.clone();
                    scope.spawn(move || hetkv_transport::interrupt::with_flag(flag, || f(s, shard)))
                })
                .collect();
            let mut results = Vec::with_capacity(shards.len());
            results.push(f(first, &*self.shards[first]));
            results.extend(
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
            );
            results
        })
    }

    /// What this client has seen of the shards' restarts, summed over shards: restarts noticed,
    /// and the acknowledged pushes the restarted shards no longer hold.
    pub fn restarts(&self) -> hetkv_transport::Restarts {
        self.shards
            .iter()
            .fold(Default::default(), |acc, s| acc.plus(&s.restarts()))
    }

    /// Bytes moved by this client's transports, summed over shards.
    pub fn traffic(&self) -> Traffic {
        self.shards.iter().fold(Traffic::default(), |acc, s| {
            let t = s.traffic();
            Traffic {
                sent: acc.sent + t.sent,
                received: acc.received + t.received,
            }
        })
    }
}

/// Rows read with their optimizer state ([`Table::read_state`]), in the order of the keys asked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowsWithState {
    /// Each row's version (0: a dynamic table's key not held).
    pub versions: Vec<u64>,
    /// Their values, keys x dim.
    pub values: Vec<f32>,
    /// Their optimizer state, keys x the table's state length (none for SGD).
    pub state: Vec<f32>,
    /// Their step counts, one a key where the optimizer counts steps (Adam), else none.
    pub steps: Vec<u64>,
}

/// Keys of one batch grouped by shard, remembering where each came from.
#[derive(Debug, Default)]
struct Routed {
    keys: Vec<Vec<u64>>,
    positions: Vec<Vec<usize>>,
}

impl Routed {
    fn new(routing: hetkv_transport::Routing, keys: &[u64]) -> Self {
        let s = routing.shards() as usize;
        let mut r = Self {
            keys: vec![Vec::with_capacity(keys.len() / s + 1); s],
            positions: vec![Vec::with_capacity(keys.len() / s + 1); s],
        };
        for (pos, &k) in keys.iter().enumerate() {
            let shard = routing.shard_of(k);
            r.keys[shard].push(k);
            r.positions[shard].push(pos);
        }
        r
    }
}

/// A table of a cluster: direct reads and writes, with no cache (the classic parameter server).
#[derive(Clone, Debug)]
pub struct Table {
    cluster: Cluster,
    spec: Arc<TableSpec>,
}

impl Table {
    /// The table's spec.
    pub fn spec(&self) -> &TableSpec {
        &self.spec
    }

    /// The cluster.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Where the table's rows live on the cluster's shards.
    pub fn routing(&self) -> hetkv_transport::Routing {
        self.spec.routing(self.cluster.shard_count() as u32)
    }

    fn check(&self, keys: &[u64], values: usize) -> Result<(), ClientError> {
        let dim = self.spec.dim as usize;
        if values != keys.len() * dim {
            return Err(ClientError::WrongDim {
                table: self.spec.name.clone(),
                dim,
                keys: keys.len(),
                len: values,
            });
        }
        self.check_keys(keys)
    }

    /// Fails when the cluster is closed or a key is out of the table's range.
    fn check_keys(&self, keys: &[u64]) -> Result<(), ClientError> {
        self.cluster.check_open()?;
        // A dynamic table takes every u64 key.
        if let Some(&key) = keys
            .iter()
            .find(|&&k| !self.spec.is_dynamic() && k >= self.spec.rows)
        {
            return Err(ClientError::KeyOutOfRange {
                table: self.spec.name.clone(),
                key,
                rows: self.spec.rows,
            });
        }
        Ok(())
    }

    /// Reads the rows of `keys` into `out` (keys x dim) and, when given, their versions.
    /// Shards are asked in parallel.
    pub fn pull(
        &self,
        keys: &[u64],
        out: &mut [f32],
        mut versions: Option<&mut [u64]>,
    ) -> Result<(), ClientError> {
        self.check(keys, out.len())?;
        if let Some(v) = &versions {
            if v.len() != keys.len() {
                return Err(ClientError::WrongDim {
                    table: self.spec.name.clone(),
                    dim: 1,
                    keys: keys.len(),
                    len: v.len(),
                });
            }
        }
        let routed = Routed::new(self.routing(), keys);
        let name = &self.spec.name;
        let results = self.per_shard(&routed, |_, shard, keys| {
            let (mut v, mut rows) = (Vec::new(), Vec::new());
            shard
                .pull(name, keys, &mut v, &mut rows)
                .map(|_clock| (v, rows))
        })?;
        let dim = self.spec.dim as usize;
        for (shard, (v, rows)) in results.iter().enumerate() {
            let n = routed.keys[shard].len();
            if v.len() != n || rows.len() != n * dim {
                return Err(ClientError::InconsistentCluster(format!(
                    "{} answered {} versions and {} values for {n} keys of table {name} (dim {dim})",
                    self.cluster.shards[shard].addr(),
                    v.len(),
                    rows.len()
                )));
            }
        }
        // A dynamic table's shard answers a key it does not hold as version 0 with zeros; its
        // initial value is computed here, on the client (PROTOCOL.md, "Dynamic tables").
        for (shard, (v, rows)) in results.into_iter().enumerate() {
            for (j, &pos) in routed.positions[shard].iter().enumerate() {
                let row = &mut out[pos * dim..(pos + 1) * dim];
                row.copy_from_slice(&rows[j * dim..(j + 1) * dim]);
                self.spec.complete_pulled(keys[pos], v[j], row);
                if let Some(versions) = versions.as_deref_mut() {
                    versions[pos] = v[j];
                }
            }
        }
        self.cluster.check_rollbacks()
    }

    /// Pushes `(key, count, gradient sum)` rows; `grads` is keys x dim. Returns when every shard
    /// has applied its rows, with the updates applied: for a dynamic table, the updates of keys
    /// it did not admit are dropped and not counted (the shards count them in their statistics). Every row is checked first (lengths, keys, counts of at least 1,
    /// every value finite), so that nothing is sent to any shard when any row would be refused;
    /// a failure after that (a shard unreachable, or refusing for a reason of its own) is
    /// [`ClientError::PartlyApplied`], naming what the other shards applied.
    pub fn push(&self, keys: &[u64], counts: &[u32], grads: &[f32]) -> Result<u64, ClientError> {
        self.push_report(keys, counts, grads).map(|r| r.applied)
    }

    /// [`Table::push`], saying which keys a dynamic table refused admission (their updates
    /// dropped), with the counts dropped, in push order.
    pub fn push_report(
        &self,
        keys: &[u64],
        counts: &[u32],
        grads: &[f32],
    ) -> Result<PushReport, ClientError> {
        self.check(keys, grads.len())?;
        if counts.len() != keys.len() {
            return Err(ClientError::WrongDim {
                table: self.spec.name.clone(),
                dim: 1,
                keys: keys.len(),
                len: counts.len(),
            });
        }
        if let Some(i) = counts.iter().position(|&c| c == 0) {
            return Err(ClientError::InvalidValue {
                table: self.spec.name.clone(),
                key: keys[i],
                what: "an update count of 0".into(),
            });
        }
        self.check_finite(keys, grads, "gradient")?;
        let routed = Routed::new(self.routing(), keys);
        let dim = self.spec.dim as usize;
        let name = &self.spec.name;
        let outcomes = self.write_shards(&routed, "pushed", |s, shard, shard_keys| {
            let positions = &routed.positions[s];
            let c: Vec<u32> = positions.iter().map(|&p| counts[p]).collect();
            let mut g = Vec::with_capacity(positions.len() * dim);
            for &p in positions {
                g.extend_from_slice(&grads[p * dim..(p + 1) * dim]);
            }
            let mut produced = hetkv_transport::Produced::default();
            let rows = hetkv_transport::PushRef::new(shard_keys, &c, &g);
            let ack = shard.push_rows(name, &rows, &mut produced)?;
            // Positions in the caller's push of the rows this shard refused.
            let refused: Vec<usize> = produced
                .refused
                .iter()
                .map(|&i| positions[i as usize])
                .collect();
            Ok((ack.updates, refused))
        })?;
        self.cluster.check_rollbacks()?;
        let applied = outcomes.iter().map(|(n, _)| n).sum();
        let mut refused: Vec<usize> = outcomes.into_iter().flat_map(|(_, r)| r).collect();
        refused.sort_unstable();
        Ok(PushReport {
            applied,
            refused: refused.iter().map(|&p| (keys[p], counts[p])).collect(),
        })
    }

    /// Up to `max` evictions of this dynamic table on shard `shard`, from `cursor` (0: the
    /// shard's first eviction): each (key, version, score) once, in order, with the cursor to
    /// read from next and how many a reader that fell behind lost (PROTOCOL.md, op 14). Each
    /// shard has its own stream and cursor.
    pub fn evictions(
        &self,
        shard: usize,
        cursor: u64,
        max: u32,
    ) -> Result<hetkv_transport::wire::EvictionsResponse, ClientError> {
        self.cluster.check_open()?;
        let s = self.cluster.shards.get(shard).ok_or_else(|| {
            ClientError::InconsistentCluster(format!(
                "shard {shard} of a cluster of {}",
                self.cluster.shard_count()
            ))
        })?;
        Ok(s.evictions(&self.spec.name, cursor, max)?)
    }

    /// Moves this dynamic table's training step to `step` on every shard, in parallel: a table
    /// with a time to live ([`hetkv_transport::Eviction::Ttl`]) evicts every row not updated in
    /// its last `steps` steps before each shard answers. Returns the rows expired over the
    /// cluster.
    pub fn advance_step(&self, step: u64) -> Result<u64, ClientError> {
        self.cluster.check_open()?;
        let all: Vec<usize> = (0..self.cluster.shard_count()).collect();
        let name = &self.spec.name;
        let answers = self
            .cluster
            .on_shards(&all, |_, shard| shard.advance_step(name, step));
        let mut expired = 0;
        for a in answers {
            expired += a?.expired;
        }
        Ok(expired)
    }

    /// Sets rows to `values` (keys x dim): each row's version grows by one and its optimizer
    /// state starts again (imports, warm starts). Returns the rows set. Every value is checked
    /// first, as [`Table::push`] checks its gradients.
    pub fn assign(&self, keys: &[u64], values: &[f32]) -> Result<u64, ClientError> {
        self.assign_rows(&Assignment::values(keys, values))
    }

    /// Sets rows as `rows` says: their values (or keeps them; a dynamic table's key not held
    /// takes its initial value) and their optimizer state (started again, kept, or set to given
    /// state and step counts, as [`Table::read_state`] reads them). Each row's version grows by
    /// one, so caches see the change. Everything is checked before anything is sent
    /// ([`Assignment::check`]); returns the rows set.
    pub fn assign_rows(&self, rows: &Assignment<'_>) -> Result<u64, ClientError> {
        self.check_keys(rows.keys)?;
        let dim = self.spec.dim as usize;
        let optimizer = hetkv_transport::Optimizer::new(self.spec.optimizer);
        rows.check(dim, &optimizer).map_err(|e| match e {
            Refused::Shape(what) => ClientError::InvalidAssignment {
                table: self.spec.name.clone(),
                what,
            },
            Refused::Value { key, what } => ClientError::InvalidValue {
                table: self.spec.name.clone(),
                key,
                what,
            },
        })?;
        let len = optimizer.state_len(dim);
        let chunk = self.chunk_keys(optimizer.state_shape(dim));
        let mut done = 0;
        for (c, keys) in rows.keys.chunks(chunk).enumerate() {
            let at = c * chunk..c * chunk + keys.len();
            let part = Assignment {
                keys,
                values: rows.values.map(|v| &v[at.start * dim..at.end * dim]),
                state: match rows.state {
                    StateChange::Set { values, steps } => StateChange::Set {
                        values: &values[at.start * len..at.end * len],
                        steps: steps.get(at.clone()).unwrap_or(&[]),
                    },
                    other => other,
                },
            };
            done += self.assign_chunk(&part, dim, len)?;
        }
        Ok(done)
    }

    /// Keys a request of [`Table::assign_rows`] or [`Table::read_state`] carries at most: about
    /// 16 MiB of rows with their state, within any frame limit a daemon uses by default.
    fn chunk_keys(&self, shape: hetkv_transport::StateShape) -> usize {
        let row = 4 + 8 + 4 * self.spec.dim as usize + shape.bytes();
        ((16usize << 20) / row).max(1)
    }

    /// One request a shard of [`Table::assign_rows`], already checked.
    fn assign_chunk(
        &self,
        rows: &Assignment<'_>,
        dim: usize,
        len: usize,
    ) -> Result<u64, ClientError> {
        let routed = Routed::new(self.routing(), rows.keys);
        let name = &self.spec.name;
        let gather = |positions: &[usize], from: &[f32], width: usize| -> Vec<f32> {
            let mut out = Vec::with_capacity(positions.len() * width);
            for &p in positions {
                out.extend_from_slice(&from[p * width..(p + 1) * width]);
            }
            out
        };
        let done = self.write_shards(&routed, "assigned", |s, shard, shard_keys| {
            let positions = &routed.positions[s];
            let values = rows.values.map(|v| gather(positions, v, dim));
            // A state to set, this shard's rows of it (steps only where the optimizer has them).
            let set = match rows.state {
                StateChange::Set { values, steps } => Some((
                    gather(positions, values, len),
                    match steps.is_empty() {
                        true => Vec::new(),
                        false => positions.iter().map(|&p| steps[p]).collect(),
                    },
                )),
                _ => None,
            };
            let mine = Assignment {
                keys: shard_keys,
                values: values.as_deref(),
                state: match &set {
                    Some((values, steps)) => StateChange::Set { values, steps },
                    None => rows.state,
                },
            };
            shard.assign(name, &mine).map(|ack| ack.rows as u64)
        })?;
        self.cluster.check_rollbacks()?;
        Ok(done.iter().sum())
    }

    /// The rows of `keys` with their optimizer state, each row's value, version and state read
    /// together under its writer lock on its shard: what [`Table::assign_rows`] sets back with
    /// [`StateChange::Set`]. A dynamic table's key not held reads as version 0 with its initial
    /// value and the initial state.
    pub fn read_state(&self, keys: &[u64]) -> Result<RowsWithState, ClientError> {
        self.check_keys(keys)?;
        let shape = hetkv_transport::Optimizer::new(self.spec.optimizer)
            .state_shape(self.spec.dim as usize);
        let mut read = RowsWithState::default();
        for keys in keys.chunks(self.chunk_keys(shape)) {
            let part = self.read_state_chunk(keys, shape)?;
            read.versions.extend(part.versions);
            read.values.extend(part.values);
            read.state.extend(part.state);
            read.steps.extend(part.steps);
        }
        Ok(read)
    }

    /// One request a shard of [`Table::read_state`].
    fn read_state_chunk(
        &self,
        keys: &[u64],
        shape: hetkv_transport::StateShape,
    ) -> Result<RowsWithState, ClientError> {
        let dim = self.spec.dim as usize;
        let routed = Routed::new(self.routing(), keys);
        let name = &self.spec.name;
        let dynamic = self.spec.is_dynamic();
        let results = self.per_shard(&routed, |_, shard, shard_keys| {
            let clocks = vec![hetkv_transport::wire::NOT_CACHED; shard_keys.len()];
            let births = vec![0u64; shard_keys.len()];
            let query = StaleQuery {
                table: name,
                keys: shard_keys,
                clocks: &clocks,
                births: dynamic.then_some(births.as_slice()),
                bound: 0,
                since: None,
                push: None,
                state_keys: shard_keys.len() as u32,
            };
            let mut out = StaleRows::default();
            shard.pull_if_stale(&query, &mut out).into_result()?;
            Ok(out)
        })?;
        let n = keys.len();
        let mut read = RowsWithState {
            versions: vec![0; n],
            values: vec![0.0; n * dim],
            state: vec![0.0; n * shape.len],
            steps: vec![0; if shape.steps { n } else { 0 }],
        };
        for (s, out) in results.iter().enumerate() {
            let m = routed.keys[s].len();
            if out.indices.len() != m
                || out.states.values.len() != m * shape.len
                || out.states.steps.len() != if shape.steps { m } else { 0 }
            {
                return Err(ClientError::InconsistentCluster(format!(
                    "{} answered {} rows and {} state values for {m} keys of table {name}",
                    self.cluster.shards[s].addr(),
                    out.indices.len(),
                    out.states.values.len()
                )));
            }
            for (j, &pos) in routed.positions[s].iter().enumerate() {
                let row = &mut read.values[pos * dim..(pos + 1) * dim];
                row.copy_from_slice(&out.rows[j * dim..(j + 1) * dim]);
                let version = out.versions[j];
                self.spec.complete_pulled(keys[pos], version, row);
                read.versions[pos] = version;
                let state = &mut read.state[pos * shape.len..(pos + 1) * shape.len];
                state.copy_from_slice(&out.states.values[j * shape.len..(j + 1) * shape.len]);
                if shape.steps {
                    read.steps[pos] = out.states.steps[j];
                }
            }
        }
        self.cluster.check_rollbacks()?;
        Ok(read)
    }

    /// Fails, naming the key and the element, when a value is NaN or infinite.
    fn check_finite(&self, keys: &[u64], values: &[f32], what: &str) -> Result<(), ClientError> {
        let dim = self.spec.dim as usize;
        match values.iter().position(|v| !v.is_finite()) {
            Some(at) => Err(ClientError::InvalidValue {
                table: self.spec.name.clone(),
                key: keys[at / dim],
                what: format!("{what} {} at element {}", values[at], at % dim),
            }),
            None => Ok(()),
        }
    }

    /// [`Table::per_shard`] for writes: when some shards applied their rows and others failed,
    /// the error says which did what.
    fn write_shards<T: Send + Default>(
        &self,
        routed: &Routed,
        done: &str,
        f: impl Fn(usize, &dyn ShardTransport, &[u64]) -> Result<T, TransportError> + Sync,
    ) -> Result<Vec<T>, ClientError> {
        let busy: Vec<usize> = (0..routed.keys.len())
            .filter(|&s| !routed.keys[s].is_empty())
            .collect();
        let outcomes = self
            .cluster
            .on_shards(&busy, |s, shard| f(s, shard, &routed.keys[s]));
        let mut results: Vec<T> = (0..routed.keys.len()).map(|_| T::default()).collect();
        let (mut applied, mut failed) = (Vec::new(), Vec::new());
        for (&s, r) in busy.iter().zip(outcomes) {
            let addr = self.cluster.shards[s].addr();
            match r {
                Ok(n) => {
                    results[s] = n;
                    applied.push(format!(
                        "shard {s} ({addr}) {done} its {} rows",
                        routed.keys[s].len()
                    ));
                }
                Err(e) => failed.push((s, e)),
            }
        }
        if failed.is_empty() {
            return Ok(results);
        }
        if applied.is_empty() && failed.len() == 1 {
            return Err(failed.remove(0).1.into());
        }
        Err(ClientError::PartlyApplied {
            table: self.spec.name.clone(),
            applied: if applied.is_empty() {
                "no shard".into()
            } else {
                applied.join(", ")
            },
            failed: failed
                .iter()
                .map(|(s, e)| format!("shard {s} ({}) {e}", routed.keys[*s].len()))
                .collect::<Vec<_>>()
                .join("; "),
        })
    }

    fn per_shard<T: Send + Default>(
        &self,
        routed: &Routed,
        f: impl Fn(usize, &dyn ShardTransport, &[u64]) -> Result<T, TransportError> + Sync,
    ) -> Result<Vec<T>, ClientError> {
        let busy: Vec<usize> = (0..routed.keys.len())
            .filter(|&s| !routed.keys[s].is_empty())
            .collect();
        let mut results: Vec<T> = (0..routed.keys.len()).map(|_| T::default()).collect();
        let outcomes = self
            .cluster
            .on_shards(&busy, |s, shard| f(s, shard, &routed.keys[s]));
        for (&s, r) in busy.iter().zip(outcomes) {
            results[s] = r?;
        }
        Ok(results)
    }
}

type Shards = Vec<Arc<dyn ShardTransport>>;

/// Wraps each connected control transport in the backend `kind` asks for. With `Auto`, each shard
/// gets the first that works for it (RDMA, then shared memory, then TCP), so one daemon without
/// `--rdma` or on another host costs only its own shard the faster path. Returns the shards and,
/// per shard, what it got and why.
fn select(
    controls: Vec<TcpShardClient>,
    kind: TransportKind,
) -> Result<(Shards, Vec<String>), ClientError> {
    let device = match kind {
        TransportKind::Auto | TransportKind::Rdma => Some(crate::rdma_backend::open_device()),
        _ => None,
    };
    let mut shards: Shards = Vec::with_capacity(controls.len());
    let mut chosen = Vec::with_capacity(controls.len());
    for (i, control) in controls.into_iter().enumerate() {
        let mut why = Vec::new();
        let mut control = Some(control);
        match &device {
            Some(Ok(device)) => match crate::rdma_backend::connect(device, take(&mut control)) {
                Ok(t) => {
                    shards.push(t);
                    chosen.push(format!("shard {i}: rdma"));
                    continue;
                }
                Err((c, e)) => {
                    control = Some(c);
                    why.push(format!("rdma: {e}"));
                }
            },
            Some(Err(e)) => why.push(format!("rdma: {e}")),
            None => {}
        }
        if kind == TransportKind::Rdma {
            return Err(ClientError::TransportUnavailable(format!(
                "shard {i}: {}",
                why.join("; ")
            )));
        }
        if matches!(kind, TransportKind::Auto | TransportKind::Shm) {
            match ShmTransport::new(take(&mut control)) {
                Ok(t) => {
                    shards.push(Arc::new(t));
                    chosen.push(format!("shard {i}: shm ({})", why.join("; ")));
                    continue;
                }
                Err((c, e)) if kind == TransportKind::Shm => {
                    drop(c);
                    return Err(ClientError::TransportUnavailable(format!("shm: {e}")));
                }
                Err((c, e)) => {
                    control = Some(c);
                    why.push(format!("shm: {e}"));
                }
            }
        }
        shards.push(Arc::new(take(&mut control)));
        let reason = if why.is_empty() {
            "asked for".to_string()
        } else {
            why.join("; ")
        };
        chosen.push(format!("shard {i}: tcp ({reason})"));
    }
    Ok((shards, chosen))
}

/// The control transport in hand: every path through [`select`] puts it back before taking it
/// again.
fn take(control: &mut Option<TcpShardClient>) -> TcpShardClient {
    control
        .take()
        .expect("the control transport is in hand between attempts")
}

/// The addresses of a cluster named by a pattern: `{i}` replaced by each shard's index, 0 to
/// `shards - 1`, in shard order. A Kubernetes StatefulSet behind a headless Service names its
/// pods so: `hetkv-{i}.hetkv.default.svc.cluster.local:7070`. Connecting checks that each
/// address is the shard it is listed as (its hello names its index and the count).
pub fn shard_addrs(pattern: &str, shards: u32) -> Result<Vec<String>, ClientError> {
    let bad = |what: &str| {
        Err(ClientError::ClusterName {
            pattern: pattern.to_string(),
            what: what.to_string(),
        })
    };
    if !pattern.contains("{i}") {
        return bad("no {i} to put each shard's index in");
    }
    if shards == 0 {
        return bad("a cluster of 0 shards");
    }
    Ok((0..shards)
        .map(|i| pattern.replace("{i}", &i.to_string()))
        .collect())
}

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn a_pattern_names_each_shard_in_order() {
        assert_eq!(
            shard_addrs("hetkv-{i}.hetkv:7070", 3).unwrap(),
            [
                "hetkv-0.hetkv:7070",
                "hetkv-1.hetkv:7070",
                "hetkv-2.hetkv:7070"
            ]
        );
        assert!(shard_addrs("hetkv.hetkv:7070", 3)
            .unwrap_err()
            .to_string()
            .contains("no {i}"));
        assert!(shard_addrs("h-{i}:1", 0).is_err());
    }
}
