//! The model-based test of the cache's consistency bounds and of its optimizer steps, run by the
//! socket tests (`tests/cache_consistency.rs`, every transport) and by the in-memory harness
//! (`tests/cache_harness.rs`, simulated shards, every optimizer).
//!
//! Several clients, each with its own cache, issue random interleavings of lookups, updates and
//! flushes on one table spread over the shards. Client c's gradients are -1 in element c (plus
//! small random values in two shared elements). Under SGD with lr 1 from zeros, element c of any
//! row counts exactly the updates of client c it includes and the count elements of a row sum to
//! its version, which makes every claim checkable exactly:
//! - read bound: at every lookup, the server's version minus the returned row's clock is at most
//!   `pull_bound`, and the returned values are exactly those of that clock;
//! - read-your-writes: element c of a row returned to client c equals the updates c issued;
//! - write bound: after every update by client c, at most `push_bound` of its updates to any key
//!   are missing from the server;
//! - after flushes, versions equal the updates issued and values equal sequential SGD.
//!
//! Under any optimizer, with a [`History`] of the shards (the in-memory harness keeps every
//! version of every row, with its optimizer state), every cache line is checked after every
//! operation to be exactly the shards' row at its version with its pending updates taken by the
//! table's optimizer (bit for bit: one code computes both); at bounds 0 every looked-up row is
//! exactly the shards' row; after a flush every line the flush pushed holds exactly the row its
//! push produced; versions keep both bounds and, summed over the clients, the shards lack exactly
//! the updates the caches hold unpushed.
//!
//! With prefetching ([`Options::prefetch`]), clients also prefetch keys, look up the prefetched
//! keys (or others, landing the prefetch unused) and update while a prefetch is in flight; a row
//! taken from a prefetch must lag the server *as it was when the prefetch was made* by at most
//! `pull_bound`, and read-your-writes and the values-match-clock check hold exactly, updates made
//! while the prefetch was in flight included. After an update with a prefetch in flight, the
//! server must lack at least what the cache says it holds unpushed (the rows the prefetch carries
//! may or may not have arrived); after any update with none in flight, exactly that. (Other
//! clients' prefetches apply what they carry on their own threads, so a row may then be compared
//! only with what was issued, not with a server read made before it.)
//!
//! With [`Options::rebound`], a client also changes its bounds now and then
//! (`CachedTable::set_bounds`, to one of the bounds [`policies_and_bounds`] covers, up or down):
//! every claim is then checked against the bounds the client has at the time, and right after
//! the change the write bound must already hold (lines above a lowered bound are pushed by it).

use std::collections::HashMap;

use hetkv_client::{Bound, CacheConfig, CachedTable, Capacity, PolicyKind, Table, UpdateRuleKind};
use hetkv_transport::{Initializer, Optimizer, OptimizerSpec, TableSpec};

use crate::sim::RowAt;
use crate::TestRng;

/// Clients (caches) in a run.
pub const CLIENTS: usize = 3;
/// Rows of the model's table.
pub const ROWS: u64 = 48;
/// The table's placement buckets: 5, which the harness's 3 shards and the daemons' 2 do not
/// divide, so the caches route by bucket (shard `(k % 5) % S`), not by `k % S`.
pub const BUCKETS: u32 = 5;
/// Its dim: one count element per client, and two shared elements.
pub const DIM: usize = CLIENTS + 2;
/// Rows each cache holds: small enough to evict constantly.
pub const CAPACITY: usize = 6;
/// Operations in a run.
pub const OPS: usize = 300;

/// The model's table, named `name`: SGD with lr 1 from zeros.
pub fn spec(name: &str) -> TableSpec {
    spec_with(name, OptimizerSpec::Sgd { lr: 1.0 })
}

/// The model's table under `optimizer`.
pub fn spec_with(name: &str, optimizer: OptimizerSpec) -> TableSpec {
    TableSpec {
        name: name.to_string(),
        rows: ROWS,
        dim: DIM as u32,
        init: Initializer::Zeros,
        optimizer,
        buckets: BUCKETS,
        dynamic: None,
    }
}

/// Every optimizer the shards offer, with parameters that make each step visible.
pub fn optimizers() -> Vec<OptimizerSpec> {
    vec![
        OptimizerSpec::Sgd { lr: 1.0 },
        OptimizerSpec::Adagrad {
            lr: 0.5,
            eps: 1e-6,
            initial_accumulator: 0.1,
        },
        OptimizerSpec::RowwiseAdagrad {
            lr: 0.5,
            eps: 1e-6,
            initial_accumulator: 0.0,
        },
        OptimizerSpec::Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
        },
    ]
}

/// The policies and bounds every run covers.
pub fn policies_and_bounds() -> Vec<(PolicyKind, Bound)> {
    let mut v = Vec::new();
    for policy in [
        PolicyKind::Lru,
        PolicyKind::Lfu,
        PolicyKind::LightLfu { pin_after: 2 },
    ] {
        for bound in [
            Bound::STRICT,
            Bound::updates(1),
            Bound::updates(10),
            Bound::INFINITE,
        ] {
            v.push((policy, bound));
        }
    }
    v
}

/// Every version of every row the shards held, to check cache lines against exactly.
pub trait History {
    /// Row `key` at `version`, if the shards held it so.
    fn row_at(&self, key: u64, version: u64) -> Option<RowAt>;
}

/// How a run drives the caches.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// A lookup may fail (a read injected to fail after its push was applied): its rows are not
    /// checked, and everything else still is, exactly.
    pub faults: bool,
    /// Clients also prefetch, and update with a prefetch in flight.
    pub prefetch: bool,
    /// The caches' update rule. Under a rule that weighs pushes (not
    /// [`UpdateRuleKind::PushWhole`]) the values of the shards are no longer counts: the
    /// count-based checks are skipped, the versions and the lines against the history are
    /// still checked.
    pub rule: UpdateRuleKind,
    /// Clients also change their bounds (both to one value) between operations.
    pub rebound: bool,
}

/// What a run saw of the check-elision protocol.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    /// Hits whose version checks a shard's table clock vouched for (the elided path).
    pub checks_skipped: u64,
    /// Lookups whose claim did not hold, so the skipped checks were sent after all (the re-sent
    /// path).
    pub clock_retries: u64,
    /// Lookups that failed (only with faults).
    pub failed_lookups: u64,
    /// Shards restarted ([`run_with_restarts`]).
    pub restarts: u64,
    /// Restarts the caches noticed, over all caches.
    pub restarts_noticed: u64,
    /// Lines read again after a restart that had seen a later version than the restored one.
    pub rows_went_back: u64,
    /// Lookups served by a prefetch.
    pub prefetched: u64,
    /// Prefetches landed without their lookup.
    pub prefetches_unused: u64,
    /// Lines checked against the history, over all operations.
    pub lines_checked: u64,
    /// Rows pushes produced and handed back (another update came between).
    pub rows_handed_back: u64,
}

/// The write bound where no prefetch is in flight: the server lacks exactly the updates the
/// cache holds unpushed (`unpushed`), and at most `bound` of them.
fn assert_write_bound(missing: u64, unpushed: u64, bound: Bound, what: &str) {
    assert!(
        bound.is_infinite() || missing <= bound.get(),
        "{what}: {missing} unpushed updates > {bound}"
    );
    assert_eq!(
        missing, unpushed,
        "{what}: missing from the server against held unpushed"
    );
}

struct Truth {
    table: Table,
}

impl Truth {
    /// Versions and rows of every key, read directly from the shards.
    fn read(&self) -> (Vec<u64>, Vec<f32>) {
        let keys: Vec<u64> = (0..ROWS).collect();
        let mut rows = vec![0f32; ROWS as usize * DIM];
        let mut versions = vec![0u64; ROWS as usize];
        self.table
            .pull(&keys, &mut rows, Some(&mut versions))
            .unwrap();
        (versions, rows)
    }
}

/// Each client's updates per key, as its cache applies them: one entry (count, gradient sum) per
/// update call that touched the key. Updates made while a prefetch is in flight are applied as
/// one call when it lands.
#[derive(Default)]
struct Updates {
    log: HashMap<u64, Vec<(u32, Vec<f32>)>>,
    /// Keys and gradients given while a prefetch was in flight.
    late: (Vec<u64>, Vec<f32>),
}

impl Updates {
    /// Records one update call as the cache applies it: per key, the count and the gradient rows
    /// summed in order.
    fn call(&mut self, keys: &[u64], grads: &[f32]) {
        for (k, c, s) in sums(keys, grads) {
            self.log.entry(k).or_default().push((c, s));
        }
    }

    /// The updates made while the prefetch is in flight, per key: count and gradient sum.
    fn late(&self) -> HashMap<u64, (u32, Vec<f32>)> {
        sums(&self.late.0, &self.late.1)
            .into_iter()
            .map(|(k, c, s)| (k, (c, s)))
            .collect()
    }

    fn update(&mut self, in_flight: bool, keys: &[u64], grads: &[f32]) {
        if in_flight {
            self.late.0.extend_from_slice(keys);
            self.late.1.extend_from_slice(grads);
        } else {
            self.call(keys, grads);
        }
    }

    /// A prefetch landed: the updates made meanwhile were applied as one call.
    fn landed(&mut self) {
        let (keys, grads) = std::mem::take(&mut self.late);
        if !keys.is_empty() {
            self.call(&keys, &grads);
        }
    }

    /// The gradient sum of the last `p` updates of `key`, summed as the line sums them.
    fn pending(&self, key: u64, p: u32) -> Vec<f32> {
        let mut sum = vec![0f32; DIM];
        if p == 0 {
            return sum;
        }
        let log = &self.log[&key];
        let (mut n, mut from) = (0u32, log.len());
        while n < p {
            from -= 1;
            n += log[from].0;
        }
        assert_eq!(n, p, "key {key}: {p} unpushed updates split an update call");
        for (_, g) in &log[from..] {
            sum.iter_mut().zip(g).for_each(|(s, g)| *s += g);
        }
        sum
    }
}

/// Per key of one update call, in first-seen order: the count and the gradient rows summed in
/// order, as the cache sums them.
fn sums(keys: &[u64], grads: &[f32]) -> Vec<(u64, u32, Vec<f32>)> {
    let mut sums: Vec<(u64, u32, Vec<f32>)> = Vec::new();
    for (i, &k) in keys.iter().enumerate() {
        let g = &grads[i * DIM..(i + 1) * DIM];
        match sums.iter_mut().find(|(key, _, _)| *key == k) {
            Some((_, c, s)) => {
                *c += 1;
                s.iter_mut().zip(g).for_each(|(s, g)| *s += g);
            }
            None => sums.push((k, 1, g.to_vec())),
        }
    }
    sums
}

/// The checks of the lines against the history.
struct LineCheck<'a> {
    history: &'a dyn History,
    optimizer: Optimizer,
}

impl LineCheck<'_> {
    /// Every line of `client` is exactly the shards' row at its version with its pending updates
    /// taken by the optimizer. Returns the lines checked.
    fn lines(&self, client: &CachedTable, updates: &Updates, what: &str) -> u64 {
        let mut checked = 0;
        for k in 0..ROWS {
            let Some(line) = client.peek(k) else {
                continue;
            };
            if client.unpushed(k) != u64::from(line.unpushed) {
                // A push of it is queued (after a prefetch landed, it goes with the next
                // request): the line is committed to a row the shards do not hold yet.
                continue;
            }
            let base = self.history.row_at(k, line.version).unwrap_or_else(|| {
                panic!(
                    "{what}: key {k}'s line has version {}, which the shards never held",
                    line.version
                )
            });
            let pending = updates.pending(k, line.unpushed);
            let mut want = base.value.clone();
            if line.unpushed > 0 {
                let (mut state, mut step) = (base.state.clone(), base.step);
                self.optimizer
                    .apply(&mut want, &pending, &mut state, &mut step);
            }
            assert_eq!(
                line.value, want,
                "{what}: key {k}'s line (version {}, {} unpushed) is not the shards' row with its \
                 pending updates taken by the optimizer",
                line.version, line.unpushed
            );
            checked += 1;
        }
        checked
    }
}

impl LineCheck<'_> {
    /// A row `client` returned for `key` with `clock` is its line's value and clock when the key
    /// is cached (and nothing of it is queued), and otherwise the shards' row of that version,
    /// or, when updates made while its prefetch was in flight touched it (`late`: their count and
    /// sum, queued to be written through), the row those updates produce from the row read.
    fn returned(
        &self,
        client: &CachedTable,
        key: u64,
        row: &[f32],
        clock: u64,
        late: Option<&(u32, Vec<f32>)>,
        what: &str,
    ) {
        if let (None, Some((n, g))) = (client.peek(key), late) {
            if client.unpushed(key) == u64::from(*n) {
                let read = clock - u64::from(*n);
                let at = self.history.row_at(key, read).unwrap_or_else(|| {
                    panic!("{what}: key {key} read at version {read}, never held")
                });
                let mut want = at.value.clone();
                let (mut state, mut step) = (at.state.clone(), at.step);
                self.optimizer.apply(&mut want, g, &mut state, &mut step);
                assert_eq!(
                    row,
                    &want[..],
                    "{what}: key {key}, not cached, does not include the updates made during its \
                     prefetch as the shards will apply them"
                );
            }
            return;
        }
        match client.peek(key) {
            Some(line) if client.unpushed(key) == u64::from(line.unpushed) => {
                assert_eq!(
                    (row, clock),
                    (&line.value[..], line.version + u64::from(line.unpushed)),
                    "{what}: key {key} returned other than its line"
                );
            }
            None if client.unpushed(key) == 0 => {
                let at = self.history.row_at(key, clock).unwrap_or_else(|| {
                    panic!("{what}: key {key} returned at version {clock}, never held")
                });
                assert_eq!(
                    row,
                    &at.value[..],
                    "{what}: key {key} is not the row of its clock"
                );
            }
            _ => {}
        }
    }
}

/// Runs the model: `CLIENTS` caches made by `connect` (each a new connection to the cluster
/// that `truth`, a direct handle of the model's table, reads), `OPS` seeded operations, every
/// claim checked after each. With `faults`, a lookup may fail (a read injected to fail after its
/// push was applied): its rows are not checked, and everything else still is, exactly.
pub fn run(
    truth: &Table,
    connect: &mut dyn FnMut() -> Table,
    policy: PolicyKind,
    bound: Bound,
    seed: u64,
    faults: bool,
) -> Outcome {
    let options = Options {
        faults,
        ..Options::default()
    };
    run_with(truth, connect, policy, bound, seed, options, None, None)
}

/// Decides before each operation whether to restart a shard (from an earlier state, as a
/// restore from a checkpoint does); returns true when it did.
pub type Restarter<'a> = &'a mut dyn FnMut(&mut TestRng) -> bool;

/// [`run`], with shards restarted between operations by `restart`. What a restart rolls back
/// (the updates the restored shard no longer holds, read as the difference of its rows before
/// and after) is taken out of what each client is expected to see: every claim then holds
/// against the restored state, read-your-writes included (a line of a restarted shard keeps
/// its unpushed updates and takes the shard's row for everything else). SGD only.
pub fn run_with_restarts(
    truth: &Table,
    connect: &mut dyn FnMut() -> Table,
    policy: PolicyKind,
    bound: Bound,
    seed: u64,
    faults: bool,
    restart: Option<Restarter<'_>>,
) -> Outcome {
    let options = Options {
        faults,
        ..Options::default()
    };
    run_with(truth, connect, policy, bound, seed, options, restart, None)
}

/// The model under `options`, with shards restarted by `restart` when given (prefetching and
/// restarts together are not modelled: a restart between a prefetch and its lookup may roll back
/// what the prefetch read), and every line checked against `history` when given (not with
/// restarts: a version rolled back and reached again is another row).
#[allow(clippy::too_many_arguments)]
pub fn run_with(
    truth: &Table,
    connect: &mut dyn FnMut() -> Table,
    policy: PolicyKind,
    bound: Bound,
    seed: u64,
    options: Options,
    mut restart: Option<Restarter<'_>>,
    history: Option<&dyn History>,
) -> Outcome {
    assert!(
        !(options.prefetch && restart.is_some()),
        "prefetching with restarts is not modelled"
    );
    let optimizer = truth.spec().optimizer;
    assert!(
        restart.is_none() || matches!(optimizer, OptimizerSpec::Sgd { lr } if lr == 1.0),
        "restarts are modelled under SGD with lr 1"
    );
    // Whether the shards' values count updates (SGD with lr 1, pushes whole).
    let counting =
        optimizer == (OptimizerSpec::Sgd { lr: 1.0 }) && options.rule == UpdateRuleKind::PushWhole;
    let check = history.filter(|_| restart.is_none()).map(|h| LineCheck {
        history: h,
        optimizer: Optimizer::new(optimizer),
    });
    let faults = options.faults;
    // Per client, the keys prefetched and the server's versions when the prefetch was made.
    let mut prefetched: Vec<Option<(Vec<u64>, Vec<u64>)>> = vec![None; CLIENTS];
    // Each client's last lookup's unique keys, in first-seen order: the update a training step
    // makes right after its lookup (the cache's path for it skips resolving the keys again).
    let mut looked_up_keys: Vec<Option<Vec<u64>>> = vec![None; CLIENTS];
    let name = truth.spec().name.clone();
    let truth = Truth {
        table: truth.clone(),
    };
    let config = CacheConfig::new(Capacity::Rows(CAPACITY), policy, bound);
    // Each client's bounds now (read and write alike).
    let mut bounds = [bound; CLIENTS];
    let mut clients: Vec<CachedTable> = (0..CLIENTS)
        .map(|_| connect().cached(config).with_update_rule(options.rule))
        .collect();
    let mut updates: Vec<Updates> = (0..CLIENTS).map(|_| Updates::default()).collect();
    let mut failed_lookups = 0;
    let mut lines_checked = 0;
    let mut issued = vec![vec![0u64; ROWS as usize]; CLIENTS];
    let mut shared_ref = vec![[0f64; 2]; ROWS as usize];
    let mut rng = TestRng(seed ^ bound.get().wrapping_mul(31) ^ policy.to_string().len() as u64);
    let ctx = |op: usize, c: usize| format!("{name}: op {op}, client {c}");

    let mut restarts = 0;
    for op in 0..OPS {
        if let Some(restart) = restart.as_mut() {
            let (_, before) = truth.read();
            if restart(&mut rng) {
                restarts += 1;
                let (_, after) = truth.read();
                for k in 0..ROWS as usize {
                    let row = k * DIM;
                    for (c, issued) in issued.iter_mut().enumerate() {
                        issued[k] -= (before[row + c] - after[row + c]) as u64;
                    }
                    for (e, r) in shared_ref[k].iter_mut().enumerate() {
                        let at = row + CLIENTS + e;
                        *r -= (before[at] - after[at]) as f64;
                    }
                }
            }
        }
        let c = rng.below(CLIENTS as u64) as usize;
        // Whether client c's prefetch was in flight before this operation (it lands at the next
        // lookup, prefetch, flush or change of bounds).
        let in_flight = clients[c].prefetching();
        if options.rebound && rng.below(12) == 0 {
            // New bounds for client c; a prefetch in flight lands, unused.
            let choices = [
                Bound::STRICT,
                Bound::updates(1),
                Bound::updates(10),
                Bound::INFINITE,
            ];
            let new = choices[rng.below(choices.len() as u64) as usize];
            prefetched[c] = None;
            let set = clients[c].set_bounds(new, new);
            if in_flight {
                updates[c].landed();
            }
            bounds[c] = new;
            if faults && set.is_err() {
                // The bounds are in force; the rows left to push go with the next call.
                failed_lookups += 1;
                continue;
            }
            set.unwrap();
            let (versions, server) = truth.read();
            for k in 0..ROWS as usize {
                let unpushed = clients[c].unpushed(k as u64);
                let what = format!("{}: after set_bounds, key {k}", ctx(op, c));
                assert!(
                    new.is_infinite() || unpushed <= new.get(),
                    "{what}: {unpushed} > {new}"
                );
                if counting {
                    let missing = issued[c][k] - server[k * DIM + c] as u64;
                    assert_write_bound(missing, unpushed, new, &what);
                }
            }
            if !options.prefetch {
                check_versions(&clients, &issued, &versions, &ctx(op, c));
            }
        } else if options.prefetch && rng.below(4) == 0 {
            // Prefetch (landing any prefetch still in flight, unused).
            let keys = random_keys(&mut rng);
            let (versions, _) = truth.read();
            let made = clients[c].prefetch(&keys);
            if in_flight {
                updates[c].landed();
            }
            if faults && made.is_err() {
                failed_lookups += 1;
                prefetched[c] = None;
                continue;
            }
            made.unwrap();
            prefetched[c] = Some((keys, versions));
        } else {
            let keys = random_keys(&mut rng);
            match rng.below(10) {
                0..=4 => {
                    // Mostly the keys prefetched, if any; otherwise the prefetch lands unused.
                    let (keys, from_prefetch) = match prefetched[c].take() {
                        Some((keys, at_prefetch)) if rng.below(4) > 0 => (keys, Some(at_prefetch)),
                        _ => (keys, None),
                    };
                    let n = keys.len();
                    let mut out = vec![0f32; n * DIM];
                    let mut clocks = vec![0u64; n];
                    // The bound holds at validation, before the lookup pushes its own dirty
                    // victims; operations are sequential, so the server at validation is the
                    // server now. A prefetched row was validated after the prefetch was made: it
                    // holds against the server as it was then.
                    let (versions_now, server) = truth.read();
                    // (With prefetching, other clients apply what their prefetches carry on their
                    // own threads, and this one may carry rows queued when its prefetch landed.)
                    let at_bound_0 = !options.prefetch && bounds[c] == Bound::STRICT;
                    let versions = from_prefetch.unwrap_or(versions_now);
                    let late = updates[c].late();
                    let looked_up = clients[c].lookup_with_clocks(&keys, &mut out, &mut clocks);
                    if in_flight {
                        updates[c].landed();
                    }
                    if faults && looked_up.is_err() {
                        failed_lookups += 1;
                        continue;
                    }
                    looked_up.unwrap();
                    let mut unique = keys.clone();
                    let mut seen = std::collections::HashSet::new();
                    unique.retain(|k| seen.insert(*k));
                    looked_up_keys[c] = Some(unique);
                    let bound = bounds[c];
                    for (i, &k) in keys.iter().enumerate() {
                        if let Some(check) = &check {
                            check.returned(
                                &clients[c],
                                k,
                                &out[i * DIM..(i + 1) * DIM],
                                clocks[i],
                                late.get(&k),
                                &ctx(op, c),
                            );
                        }
                        let k = k as usize;
                        let row = &out[i * DIM..(i + 1) * DIM];
                        if at_bound_0 {
                            // Bounds 0: the row is the shards' row, bit for bit.
                            assert_eq!(
                                row,
                                &server[k * DIM..(k + 1) * DIM],
                                "{}: at bounds 0, key {k} is not the shards' row",
                                ctx(op, c)
                            );
                        }
                        if !bound.is_infinite() {
                            let lag = versions[k].saturating_sub(clocks[i]);
                            assert!(
                                lag <= bound.get(),
                                "{}: key {k} lags the server by {lag} > {bound}",
                                ctx(op, c)
                            );
                        }
                        if !counting {
                            continue;
                        }
                        assert_eq!(
                            row[c] as u64,
                            issued[c][k],
                            "{}: read-your-writes on key {k}",
                            ctx(op, c)
                        );
                        let counted: f32 = row[..CLIENTS].iter().sum();
                        assert_eq!(
                            counted as u64,
                            clocks[i],
                            "{}: key {k} values do not match their clock",
                            ctx(op, c)
                        );
                        for other in (0..CLIENTS).filter(|&o| o != c) {
                            // Other clients' prefetches apply the rows they carry on their own
                            // threads, so with prefetching the server read above may lag what a
                            // shard answered since: then no row may hold more than was issued.
                            let limit = if options.prefetch {
                                issued[other][k] as f32
                            } else {
                                server[k * DIM + other]
                            };
                            assert!(
                                row[other] <= limit,
                                "{}: key {k} ahead of the server",
                                ctx(op, c)
                            );
                        }
                    }
                }
                5..=8 => {
                    let keys = match looked_up_keys[c].take() {
                        Some(unique) if rng.below(2) == 0 => unique,
                        _ => keys,
                    };
                    let mut grads = vec![0f32; keys.len() * DIM];
                    for (i, &k) in keys.iter().enumerate() {
                        let g = &mut grads[i * DIM..(i + 1) * DIM];
                        g[c] = -1.0;
                        for (e, r) in shared_ref[k as usize].iter_mut().enumerate() {
                            g[CLIENTS + e] = rng.signed_unit() * 0.01;
                            *r -= g[CLIENTS + e] as f64;
                        }
                        issued[c][k as usize] += 1;
                    }
                    clients[c].update(&keys, &grads).unwrap();
                    updates[c].update(in_flight, &keys, &grads);
                    let (versions, server) = truth.read();
                    let bound = bounds[c];
                    for k in 0..ROWS as usize {
                        let unpushed = clients[c].unpushed(k as u64);
                        let what = format!("{}: key {k}", ctx(op, c));
                        if !in_flight {
                            assert!(
                                bound.is_infinite() || unpushed <= bound.get(),
                                "{what}: {unpushed} unpushed updates > {bound}"
                            );
                        }
                        if !counting {
                            continue;
                        }
                        let missing = issued[c][k] - server[k * DIM + c] as u64;
                        if in_flight {
                            // What the prefetch carries may or may not have been applied yet.
                            assert!(
                                missing >= unpushed,
                                "{what}: the server lacks {missing}, the cache holds {unpushed}"
                            );
                            continue;
                        }
                        assert_write_bound(missing, unpushed, bound, &what);
                    }
                    if !options.prefetch {
                        check_versions(&clients, &issued, &versions, &ctx(op, c));
                    }
                }
                _ => {
                    prefetched[c] = None;
                    let dirty: Vec<u64> =
                        (0..ROWS).filter(|&k| clients[c].unpushed(k) > 0).collect();
                    clients[c].flush().unwrap();
                    if in_flight {
                        updates[c].landed();
                    }
                    let (versions, server) = truth.read();
                    for k in 0..ROWS as usize {
                        if counting {
                            assert_eq!(
                                server[k * DIM + c] as u64,
                                issued[c][k],
                                "{}: flush of key {k}",
                                ctx(op, c)
                            );
                        }
                        assert_eq!(clients[c].unpushed(k as u64), 0, "{}: flushed", ctx(op, c));
                    }
                    if !options.prefetch {
                        // Every line the flush pushed holds the row its push produced: the
                        // shards' row now (nothing else ran meanwhile).
                        for &k in &dirty {
                            let Some(line) = clients[c].peek(k) else {
                                continue;
                            };
                            let k = k as usize;
                            assert_eq!(
                                (line.version, &line.value[..]),
                                (versions[k], &server[k * DIM..(k + 1) * DIM]),
                                "{}: after the flush, key {k}'s line is not the row its push \
                                 produced",
                                ctx(op, c)
                            );
                        }
                    }
                }
            }
        }
        if let Some(check) = &check {
            for (client, (cache, updates)) in clients.iter().zip(&updates).enumerate() {
                if cache.prefetching() {
                    // Its lines' pushes may be in flight on the helper thread.
                    continue;
                }
                lines_checked += check.lines(cache, updates, &ctx(op, client));
            }
        }
    }
    for (client, u) in clients.iter_mut().zip(&mut updates) {
        let in_flight = client.prefetching();
        client.flush().unwrap();
        if in_flight {
            u.landed();
        }
    }
    let (versions, server) = truth.read();
    for k in 0..ROWS as usize {
        let total: u64 = (0..CLIENTS).map(|c| issued[c][k]).sum();
        assert_eq!(
            versions[k], total,
            "{name}: version of key {k} after flushes"
        );
        if !counting {
            continue;
        }
        for c in 0..CLIENTS {
            assert_eq!(
                server[k * DIM + c] as u64,
                issued[c][k],
                "{name}: key {k} client {c}"
            );
        }
        for e in 0..2 {
            let (got, want) = (server[k * DIM + CLIENTS + e] as f64, shared_ref[k][e]);
            assert!(
                (got - want).abs() < 1e-4,
                "{name}: key {k}: {got} vs sequential SGD {want}"
            );
        }
    }
    let stats: Vec<_> = clients.iter().map(|c| c.stats()).collect();
    let evictions: u64 = stats.iter().map(|s| s.evictions).sum();
    let hits: u64 = stats.iter().map(|s| s.hits).sum();
    assert!(
        evictions > 20,
        "{name}: the cache must be small enough to evict constantly ({evictions})"
    );
    assert!(hits > 20, "{name}: and large enough to hit ({hits})");
    if !bound.is_infinite() && bound.get() <= 1 {
        let stale: u64 = stats.iter().map(|s| s.stale_refreshes).sum();
        assert!(stale > 0, "{name}: tight bounds must refresh stale lines");
    }
    Outcome {
        checks_skipped: stats.iter().map(|s| s.checks_skipped).sum(),
        clock_retries: stats.iter().map(|s| s.clock_retries).sum(),
        failed_lookups,
        restarts,
        restarts_noticed: stats.iter().map(|s| s.restarts).sum(),
        rows_went_back: stats.iter().map(|s| s.rows_went_back).sum(),
        prefetched: stats.iter().map(|s| s.prefetched).sum(),
        prefetches_unused: stats.iter().map(|s| s.prefetches_unused).sum(),
        lines_checked,
        rows_handed_back: stats.iter().map(|s| s.rows_handed_back).sum(),
    }
}

/// Keys of one operation: mostly from a hot third of the table, so caches both hit and evict.
fn random_keys(rng: &mut TestRng) -> Vec<u64> {
    let n = 1 + rng.below(8) as usize;
    (0..n)
        .map(|_| {
            if rng.below(3) > 0 {
                rng.below(ROWS / 3)
            } else {
                rng.below(ROWS)
            }
        })
        .collect()
}

/// Summed over the clients, the shards lack exactly the updates the caches hold unpushed (no
/// prefetch in flight: nothing is on its way).
fn check_versions(clients: &[CachedTable], issued: &[Vec<u64>], versions: &[u64], what: &str) {
    for k in 0..ROWS as usize {
        let total: u64 = issued.iter().map(|i| i[k]).sum();
        let unpushed: u64 = clients.iter().map(|c| c.unpushed(k as u64)).sum();
        assert_eq!(
            versions[k] + unpushed,
            total,
            "{what}: key {k}: the shards' version and the caches' unpushed updates"
        );
    }
}
