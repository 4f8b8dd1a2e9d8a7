//! Shards simulated in memory, for driving the cache without sockets (in the manner of
//! quinn-proto's tests): each holds one SGD table's versions, values and table clock, answers the
//! protocol's operations with the same rules as the daemon ([`is_stale`], [`Since::holds`]), and
//! can be told to fail a read after applying the push it carried, as a one-sided backend may.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hetkv_transport::wire::{
    is_stale, CheckpointResponse, CreateResponse, ErrorCode, HelloResponse, PushResponse,
    RegionDescriptor, ShardStats, Since, Span, WireError, PROTOCOL_VERSION,
};
use hetkv_transport::{
    Carried, PushOutcome, Routing, ShardTransport, StaleQuery, StaleRows, TableInfo, TableSpec,
    Traffic, TransportError,
};

#[derive(Debug)]
struct State {
    /// Version of each global key (only this shard's are used).
    versions: Vec<u64>,
    /// Values of each global key, keys x dim.
    values: Vec<f32>,
    clock: u64,
}

/// One simulated shard of a cluster holding one table (SGD from zeros, at the spec's lr).
#[derive(Debug)]
pub struct SimShard {
    addr: String,
    hello: HelloResponse,
    spec: TableSpec,
    lr: f32,
    state: Mutex<State>,
    /// Fail the read of every n-th conditional pull that carries a push, after applying the push
    /// (0: never).
    fail_read_every: AtomicU64,
    carried: AtomicU64,
    /// Reads failed so far by that rule.
    pub failed_reads: AtomicU64,
    /// Claims answered, and those that did not hold.
    pub claims: AtomicU64,
    /// Claims that did not hold.
    pub claims_failed: AtomicU64,
    incarnation: AtomicU64,
}

impl SimShard {
    /// Shard `shard` of `shards` holding `spec` (zeros; its optimizer must be SGD).
    pub fn new(spec: &TableSpec, shard: u32, shards: u32) -> Self {
        let n = spec.rows as usize;
        Self {
            addr: format!("sim-shard-{shard}"),
            hello: HelloResponse {
                version: PROTOCOL_VERSION,
                shard,
                shards,
                max_frame: u32::MAX,
                server: "simulated".into(),
                shm_dir: None,
                incarnation: 1,
                pushes: None,
            },
            spec: spec.clone(),
            lr: spec.optimizer.lr(),
            state: Mutex::new(State {
                versions: vec![0; n],
                values: vec![0.0; n * spec.dim as usize],
                clock: 0,
            }),
            fail_read_every: AtomicU64::new(0),
            carried: AtomicU64::new(0),
            failed_reads: AtomicU64::new(0),
            claims: AtomicU64::new(0),
            claims_failed: AtomicU64::new(0),
            incarnation: AtomicU64::new(1),
        }
    }

    /// The rows, versions and table clock now, as a checkpoint would keep them.
    pub fn snapshot(&self) -> SimSnapshot {
        let s = self.state.lock().unwrap();
        SimSnapshot(State {
            versions: s.versions.clone(),
            values: s.values.clone(),
            clock: s.clock,
        })
    }

    /// Restarts the shard from `snapshot` (a restore from a checkpoint): everything applied
    /// since is gone, and the shard answers as a new incarnation.
    pub fn restart_from(&self, snapshot: &SimSnapshot) {
        let mut s = self.state.lock().unwrap();
        *s = State {
            versions: snapshot.0.versions.clone(),
            values: snapshot.0.values.clone(),
            clock: snapshot.0.clock,
        };
        self.incarnation.fetch_add(1, Ordering::SeqCst);
    }

    /// Makes every `n`-th conditional pull that carries a push fail its read after the push was
    /// applied (0 turns the fault off).
    pub fn fail_read_after_push_every(&self, n: u64) {
        self.fail_read_every.store(n, Ordering::Relaxed);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refuse(&self, code: ErrorCode, message: String) -> TransportError {
        TransportError::Remote {
            addr: self.addr.clone(),
            error: WireError::new(code, message),
        }
    }

    fn check_keys(&self, keys: &[u64]) -> Result<(), TransportError> {
        let routing = Routing::new(self.hello.shards);
        let local_rows = routing.local_rows(self.spec.rows, self.hello.shard);
        match keys
            .iter()
            .find(|&&k| routing.local_on(k, self.hello.shard, local_rows).is_none())
        {
            Some(k) => Err(self.refuse(
                ErrorCode::KeyOutOfRange,
                format!("key {k} is not on {}", self.addr),
            )),
            None => Ok(()),
        }
    }

    fn check_table(&self, table: &str) -> Result<(), TransportError> {
        if table == self.spec.name {
            Ok(())
        } else {
            Err(self.refuse(ErrorCode::UnknownTable, format!("no table {table}")))
        }
    }

    fn apply(&self, s: &mut State, keys: &[u64], counts: &[u32], grads: &[f32]) -> u64 {
        let dim = self.spec.dim as usize;
        let mut updates = 0;
        for (i, &k) in keys.iter().enumerate() {
            let k = k as usize;
            s.versions[k] += u64::from(counts[i]);
            s.clock += u64::from(counts[i]);
            updates += u64::from(counts[i]);
            for (v, g) in s.values[k * dim..(k + 1) * dim]
                .iter_mut()
                .zip(&grads[i * dim..(i + 1) * dim])
            {
                *v -= self.lr * g;
            }
        }
        updates
    }

    fn read_into(&self, s: &State, keys: &[u64], versions: &mut Vec<u64>, rows: &mut Vec<f32>) {
        let dim = self.spec.dim as usize;
        for &k in keys {
            let k = k as usize;
            versions.push(s.versions[k]);
            rows.extend_from_slice(&s.values[k * dim..(k + 1) * dim]);
        }
    }

    fn answer_claim(&self, since: Option<Since>, clock: u64) -> bool {
        let Some(since) = since else { return true };
        self.claims.fetch_add(1, Ordering::Relaxed);
        let held = since.holds(clock);
        if !held {
            self.claims_failed.fetch_add(1, Ordering::Relaxed);
        }
        held
    }

    fn stale(
        &self,
        q: &StaleQuery<'_>,
        out: &mut StaleRows,
    ) -> Result<PushResponse, TransportError> {
        self.check_table(q.table)?;
        self.check_keys(q.keys)?;
        if q.keys.len() != q.clocks.len() {
            return Err(self.refuse(ErrorCode::MalformedFrame, "keys and clocks differ".into()));
        }
        if let Some(p) = q.push {
            self.check_keys(p.keys)?;
        }
        let mut s = self.state();
        let ack = match q.push {
            Some(p) => PushResponse {
                rows: p.keys.len() as u32,
                updates: self.apply(&mut s, p.keys, p.counts, p.grads),
                duplicate: false,
            },
            None => PushResponse {
                rows: 0,
                updates: 0,
                duplicate: false,
            },
        };
        out.table_clock = s.clock;
        out.since_held = self.answer_claim(q.since, s.clock);
        out.indices.clear();
        out.versions.clear();
        out.rows.clear();
        let stale: Vec<u64> = (0..q.keys.len())
            .filter(|&j| is_stale(s.versions[q.keys[j] as usize], q.clocks[j], q.bound))
            .map(|j| {
                out.indices.push(j as u32);
                q.keys[j]
            })
            .collect();
        self.read_into(&s, &stale, &mut out.versions, &mut out.rows);
        Ok(ack)
    }
}

/// A simulated shard's state at one moment ([`SimShard::snapshot`]).
#[derive(Debug)]
pub struct SimSnapshot(State);

impl ShardTransport for SimShard {
    fn addr(&self) -> &str {
        &self.addr
    }

    fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::SeqCst)
    }

    fn hello(&self) -> &HelloResponse {
        &self.hello
    }

    fn list_tables(&self) -> Result<Vec<TableInfo>, TransportError> {
        Ok(vec![TableInfo {
            spec: self.spec.clone(),
            local_rows: Routing::new(self.hello.shards)
                .local_rows(self.spec.rows, self.hello.shard),
            stride: hetkv_transport::RowLayout::new(self.spec.dim).stride() as u32,
        }])
    }

    fn create_table(&self, spec: &TableSpec) -> Result<CreateResponse, TransportError> {
        if spec != &self.spec {
            return Err(self.refuse(ErrorCode::ConflictingTable, "one table only".into()));
        }
        Ok(CreateResponse {
            info: self.list_tables()?.remove(0),
            created: false,
        })
    }

    fn region_info(&self, _table: &str) -> Result<RegionDescriptor, TransportError> {
        Err(self.refuse(
            ErrorCode::Unsupported,
            "a simulated shard has no region".into(),
        ))
    }

    fn read(&self, _spans: &[Span], _out: &mut Vec<u8>) -> Result<(), TransportError> {
        Err(self.refuse(
            ErrorCode::Unsupported,
            "a simulated shard has no region".into(),
        ))
    }

    fn pull(
        &self,
        table: &str,
        keys: &[u64],
        versions: &mut Vec<u64>,
        rows: &mut Vec<f32>,
    ) -> Result<u64, TransportError> {
        self.check_table(table)?;
        self.check_keys(keys)?;
        let s = self.state();
        versions.clear();
        rows.clear();
        self.read_into(&s, keys, versions, rows);
        Ok(s.clock)
    }

    fn pull_if_stale(&self, q: &StaleQuery<'_>, out: &mut StaleRows) -> Carried {
        let result = self.stale(q, out);
        let every = self.fail_read_every.load(Ordering::Relaxed);
        if let (Ok(ack), Some(_), true) = (&result, q.push, every > 0) {
            if self.carried.fetch_add(1, Ordering::Relaxed) % every == every - 1 {
                self.failed_reads.fetch_add(1, Ordering::Relaxed);
                return Carried {
                    push: PushOutcome::Applied(*ack),
                    read: Err(TransportError::Io {
                        addr: self.addr.clone(),
                        source: std::io::Error::other("injected: the read after the push failed"),
                    }),
                };
            }
        }
        Carried::one_request(q.push.is_some(), result)
    }

    fn push(
        &self,
        table: &str,
        keys: &[u64],
        counts: &[u32],
        grads: &[f32],
    ) -> Result<PushResponse, TransportError> {
        self.check_table(table)?;
        self.check_keys(keys)?;
        let mut s = self.state();
        Ok(PushResponse {
            rows: keys.len() as u32,
            updates: self.apply(&mut s, keys, counts, grads),
            duplicate: false,
        })
    }

    fn assign(&self, _: &str, _: &[u64], _: &[f32]) -> Result<PushResponse, TransportError> {
        Err(self.refuse(
            ErrorCode::Unsupported,
            "the simulation has no assign".into(),
        ))
    }

    fn checkpoint(&self, _: &str, _: bool) -> Result<CheckpointResponse, TransportError> {
        Err(self.refuse(
            ErrorCode::Unsupported,
            "the simulation keeps no checkpoints".into(),
        ))
    }

    fn stats(&self) -> Result<ShardStats, TransportError> {
        Ok(ShardStats {
            shard: self.hello.shard,
            shards: self.hello.shards,
            ..ShardStats::default()
        })
    }

    fn traffic(&self) -> Traffic {
        Traffic::default()
    }
}
