//! Shards simulated in memory, for driving the cache without sockets (in the manner of
//! quinn-proto's tests): each holds one table's versions, values, optimizer state and table clock,
//! applies pushes with the table's own optimizer (`hetkv_transport::Optimizer`, the daemon's code),
//! answers the protocol's operations with the same rules as the daemon ([`is_stale`],
//! [`Since::holds`], optimizer state for the first `state_keys` keys, produced rows handed back
//! where a push's base was not the row's version), and can be told to fail a read after applying
//! the push it carried, as a one-sided backend may.
//!
//! Each shard also keeps every version of every row it ever held (value, optimizer state and
//! step count): the model test checks that a cache line is exactly the row of its version with
//! its pending updates taken by the optimizer ([`SimShard::history`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hetkv_transport::wire::{
    is_stale, CheckpointResponse, CreateResponse, ErrorCode, HelloResponse, PushResponse,
    RegionDescriptor, ShardStats, Since, Span, WireError, NO_BASE, PROTOCOL_VERSION,
};
use hetkv_transport::{
    Carried, Optimizer, Produced, Pulled, PushOutcome, PushRef, RowStates, ShardTransport,
    StaleQuery, StaleRows, TableInfo, TableSpec, Traffic, TransportError,
};

/// One version of one row: its value, optimizer state and step count.
#[derive(Clone, Debug, PartialEq)]
pub struct RowAt {
    /// The values.
    pub value: Vec<f32>,
    /// The optimizer state.
    pub state: Vec<f32>,
    /// The step count.
    pub step: u64,
}

#[derive(Clone, Debug)]
struct State {
    /// Version of each global key (only this shard's are used).
    versions: Vec<u64>,
    /// Values of each global key, keys x dim.
    values: Vec<f32>,
    /// Optimizer state of each global key, keys x state_len, and step counts.
    states: Vec<f32>,
    steps: Vec<u64>,
    clock: u64,
}

/// One simulated shard of a cluster holding one table (zeros, the spec's optimizer).
#[derive(Debug)]
pub struct SimShard {
    addr: String,
    hello: HelloResponse,
    spec: TableSpec,
    optimizer: Optimizer,
    state_len: usize,
    state: Mutex<State>,
    history: Mutex<HashMap<(u64, u64), RowAt>>,
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
    /// Rows handed back by pushes (their base was not the row's version).
    pub handed_back: AtomicU64,
    incarnation: AtomicU64,
    /// A restart armed to strike inside the next call that carries a push.
    inside: Mutex<Option<InsideCall>>,
    /// The memory and incarnation of a restarted shard that the next read without a push is
    /// served from ([`InsideCall::RestartThenReadFrozenLater`]).
    frozen_later: Mutex<Option<(State, u64)>>,
}

/// A restart inside one call, as a one-sided reader meets it: its push travels to the daemon
/// over TCP and its read goes to memory.
#[derive(Debug)]
pub enum InsideCall {
    /// The daemon restarted (from the snapshot) before the push reached it: the push is applied
    /// by the new incarnation, and the read sees the old one's memory, frozen (a reader that has
    /// not attached again).
    RestartBeforePushReadFrozen(SimSnapshot),
    /// The daemon restarted (from the snapshot) after it applied the push and before the read:
    /// the push's acknowledgement is the old incarnation's, the rows and clock the new one's.
    RestartBetweenPushAndRead(SimSnapshot),
    /// The daemon restarted (from the snapshot) before the push reached it; this call is answered
    /// by the new incarnation, but the next read without a push sees the old one's memory,
    /// frozen, under the old incarnation (a reader that has not attached again, after the cache
    /// learned of the restart).
    RestartThenReadFrozenLater(SimSnapshot),
}

impl SimShard {
    /// Shard `shard` of `shards` holding `spec` (rows start at zero, with the optimizer's initial
    /// state).
    pub fn new(spec: &TableSpec, shard: u32, shards: u32) -> Self {
        let n = spec.rows as usize;
        let dim = spec.dim as usize;
        let optimizer = Optimizer::new(spec.optimizer);
        let state_len = optimizer.state_len(dim);
        let mut states = vec![0f32; n * state_len];
        for s in states.chunks_exact_mut(state_len.max(1)) {
            optimizer.init_state(s);
        }
        let mut history = HashMap::new();
        for k in 0..n {
            history.insert(
                (k as u64, 0),
                RowAt {
                    value: vec![0.0; dim],
                    state: states[k * state_len..(k + 1) * state_len].to_vec(),
                    step: 0,
                },
            );
        }
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
            optimizer,
            state_len,
            state: Mutex::new(State {
                versions: vec![0; n],
                values: vec![0.0; n * dim],
                states,
                steps: vec![0; n],
                clock: 0,
            }),
            history: Mutex::new(history),
            fail_read_every: AtomicU64::new(0),
            carried: AtomicU64::new(0),
            failed_reads: AtomicU64::new(0),
            claims: AtomicU64::new(0),
            claims_failed: AtomicU64::new(0),
            handed_back: AtomicU64::new(0),
            incarnation: AtomicU64::new(1),
            inside: Mutex::new(None),
            frozen_later: Mutex::new(None),
        }
    }

    /// Arms `fault` for the next conditional pull that carries a push.
    pub fn restart_inside_next_push(&self, fault: InsideCall) {
        *self.inside.lock().unwrap_or_else(|p| p.into_inner()) = Some(fault);
    }

    /// Whether an armed fault is still waiting for its call (or its frozen read).
    pub fn inside_call_armed(&self) -> bool {
        self.inside
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
            || self
                .frozen_later
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
    }

    /// The rows, versions, state and table clock now, as a checkpoint would keep them.
    pub fn snapshot(&self) -> SimSnapshot {
        SimSnapshot(self.state().clone())
    }

    /// Restarts the shard from `snapshot` (a restore from a checkpoint): everything applied
    /// since is gone, and the shard answers as a new incarnation.
    pub fn restart_from(&self, snapshot: &SimSnapshot) {
        // Under the state's lock, so that an answer's rows and incarnation agree.
        let mut s = self.state();
        *s = snapshot.0.clone();
        self.incarnation.fetch_add(1, Ordering::SeqCst);
    }

    /// Makes every `n`-th conditional pull that carries a push fail its read after the push was
    /// applied (0 turns the fault off).
    pub fn fail_read_after_push_every(&self, n: u64) {
        self.fail_read_every.store(n, Ordering::Relaxed);
    }

    /// Row `key` as it was at `version`, if this shard ever held it so (the latest such, when a
    /// restart made a version occur twice).
    pub fn history(&self, key: u64, version: u64) -> Option<RowAt> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(key, version))
            .cloned()
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
        let routing = self.spec.routing(self.hello.shards);
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

    fn row_at(&self, s: &State, k: usize) -> RowAt {
        let (dim, len) = (self.spec.dim as usize, self.state_len);
        RowAt {
            value: s.values[k * dim..(k + 1) * dim].to_vec(),
            state: s.states[k * len..(k + 1) * len].to_vec(),
            step: s.steps[k],
        }
    }

    /// Applies push rows with the optimizer; rows whose base was not their version come back in
    /// `produced`.
    fn apply(&self, s: &mut State, p: &PushRef<'_>, produced: &mut Produced) -> PushResponse {
        let (dim, len) = (self.spec.dim as usize, self.state_len);
        produced.clear();
        let mut updates = 0;
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        for (i, &key) in p.keys.iter().enumerate() {
            let k = key as usize;
            let count = u64::from(p.counts[i]);
            let before = s.versions[k];
            s.versions[k] += count;
            s.clock += count;
            updates += count;
            let State {
                values,
                states,
                steps,
                ..
            } = &mut *s;
            self.optimizer.apply(
                &mut values[k * dim..(k + 1) * dim],
                &p.grads[i * dim..(i + 1) * dim],
                &mut states[k * len..(k + 1) * len],
                &mut steps[k],
            );
            let now = self.row_at(s, k);
            history.insert((key, s.versions[k]), now.clone());
            let base = p.bases.map_or(NO_BASE, |b| b[i]);
            if base != NO_BASE && base != before {
                self.handed_back.fetch_add(1, Ordering::Relaxed);
                produced.indices.push(i as u32);
                produced.versions.push(s.versions[k]);
                produced.rows.extend_from_slice(&now.value);
                produced.states.values.extend_from_slice(&now.state);
                if self.optimizer.has_steps() {
                    produced.states.steps.push(now.step);
                }
            }
        }
        let shape = self.optimizer.state_shape(dim);
        PushResponse {
            rows: p.keys.len() as u32,
            updates,
            refused: 0,
            duplicate: false,
            produced: produced.len() as u32,
            state_len: shape.len as u32,
            steps: shape.steps,
            births: false,
            refused_rows: 0,
            incarnation: self.incarnation(),
        }
    }

    fn read_into(
        &self,
        s: &State,
        keys: &[u64],
        with_state: usize,
        versions: &mut Vec<u64>,
        rows: &mut Vec<f32>,
        states: &mut RowStates,
    ) {
        for (j, &k) in keys.iter().enumerate() {
            let at = self.row_at(s, k as usize);
            versions.push(s.versions[k as usize]);
            rows.extend_from_slice(&at.value);
            if j < with_state {
                states.values.extend_from_slice(&at.state);
                if self.optimizer.has_steps() {
                    states.steps.push(at.step);
                }
            }
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
        let inside = match q.push {
            Some(_) => self.inside.lock().unwrap_or_else(|p| p.into_inner()).take(),
            None => None,
        };
        let mut frozen = None;
        match &inside {
            Some(InsideCall::RestartBeforePushReadFrozen(snapshot)) => {
                frozen = Some((self.state().clone(), self.incarnation()));
                self.restart_from(snapshot);
            }
            Some(InsideCall::RestartThenReadFrozenLater(snapshot)) => {
                *self.frozen_later.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((self.state().clone(), self.incarnation()));
                self.restart_from(snapshot);
            }
            _ => {}
        }
        if q.push.is_none() {
            if let Some(f) = self
                .frozen_later
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                frozen = Some(f);
            }
        }
        let mut s = self.state();
        out.clear();
        let ack = match q.push {
            Some(p) => self.apply(&mut s, &p, &mut out.produced),
            None => PushResponse::default(),
        };
        if let Some(InsideCall::RestartBetweenPushAndRead(snapshot)) = &inside {
            drop(s);
            self.restart_from(snapshot);
            s = self.state();
        }
        out.incarnation = self.incarnation();
        let frozen_guard;
        let s: &State = match &frozen {
            Some((old, incarnation)) => {
                out.incarnation = *incarnation;
                frozen_guard = old;
                frozen_guard
            }
            None => &s,
        };
        out.table_clock = s.clock;
        out.since_held = self.answer_claim(q.since, s.clock);
        let stale: Vec<u64> = (0..q.keys.len())
            .filter(|&j| is_stale(s.versions[q.keys[j] as usize], q.clocks[j], q.bound))
            .map(|j| {
                out.indices.push(j as u32);
                q.keys[j]
            })
            .collect();
        let with_state = out
            .indices
            .iter()
            .take_while(|&&j| j < q.state_keys)
            .count();
        self.read_into(
            s,
            &stale,
            with_state,
            &mut out.versions,
            &mut out.rows,
            &mut out.states,
        );
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
            local_rows: self.spec.local_rows(self.hello.shard, self.hello.shards),
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
    ) -> Result<Pulled, TransportError> {
        self.check_table(table)?;
        self.check_keys(keys)?;
        let s = self.state();
        versions.clear();
        rows.clear();
        let mut states = RowStates::default();
        self.read_into(&s, keys, 0, versions, rows, &mut states);
        Ok(Pulled {
            clock: s.clock,
            incarnation: self.incarnation(),
        })
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

    fn push_rows(
        &self,
        table: &str,
        rows: &PushRef<'_>,
        produced: &mut Produced,
    ) -> Result<PushResponse, TransportError> {
        self.check_table(table)?;
        self.check_keys(rows.keys)?;
        let mut s = self.state();
        Ok(self.apply(&mut s, rows, produced))
    }

    fn assign(
        &self,
        _: &str,
        _: &hetkv_transport::codec::assign::Assignment<'_>,
    ) -> Result<PushResponse, TransportError> {
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
