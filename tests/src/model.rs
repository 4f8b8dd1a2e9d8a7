//! The model-based test of the cache's consistency bounds, run by the socket tests
//! (`tests/cache_consistency.rs`, every transport) and by the in-memory harness
//! (`tests/cache_harness.rs`, simulated shards).
//!
//! Several clients, each with its own cache, issue random interleavings of lookups, updates and
//! flushes on one table spread over the shards. The table uses SGD with lr 1 from zeros, and
//! client c's gradients are -1 in element c (plus small random values in two shared elements), so
//! element c of any row counts exactly the updates of client c it includes and the count elements
//! of a row sum to its version. That makes every claim checkable exactly:
//! - read bound: at every lookup, the server's version minus the returned row's clock is at most
//!   `pull_bound`, and the returned values are exactly those of that clock;
//! - read-your-writes: element c of a row returned to client c equals the updates c issued;
//! - write bound: after every update by client c, at most `push_bound` of its updates to any key
//!   are missing from the server;
//! - after flushes, versions equal the updates issued and values equal sequential SGD.
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

use hetkv_client::{Bound, CacheConfig, CachedTable, Capacity, PolicyKind, SharedKeys, Table};
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};

use crate::TestRng;

/// Clients (caches) in a run.
pub const CLIENTS: usize = 3;
/// Rows of the model's table.
pub const ROWS: u64 = 48;
/// Its dim: one count element per client, and two shared elements.
pub const DIM: usize = CLIENTS + 2;
/// Rows each cache holds: small enough to evict constantly.
pub const CAPACITY: usize = 6;
/// Operations in a run.
pub const OPS: usize = 300;

/// The model's table, named `name`.
pub fn spec(name: &str) -> TableSpec {
    TableSpec {
        name: name.to_string(),
        rows: ROWS,
        dim: DIM as u32,
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::Sgd { lr: 1.0 },
    }
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

/// How a run drives the caches.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// A lookup may fail (a read injected to fail after its push was applied): its rows are not
    /// checked, and everything else still is, exactly.
    pub faults: bool,
    /// Clients also prefetch, and update with a prefetch in flight.
    pub prefetch: bool,
    /// How the caches combine their updates of a key: [`SharedKeys::Summed`] (the default) or
    /// [`SharedKeys::Extrapolated`]. Extrapolation scales a cache's local steps only, so every
    /// claim about the server and the bounds holds exactly; of a returned row, element c of
    /// client c then lies between the updates c issued and `max_scale` times them, the other
    /// clients' elements plus c's issued updates sum to the row's clock, and the rest is checked
    /// as without it. [`SharedKeys::Averaged`] weights the pushes
    /// themselves, which the model's exact counts cannot check: it is refused.
    pub shared_keys: SharedKeys,
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
    /// Rows returned to a client whose own element was ahead of its updates (extrapolated).
    pub extrapolated_rows: u64,
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
    run_with(truth, connect, policy, bound, seed, options, None)
}

/// Decides before each operation whether to restart a shard (from an earlier state, as a
/// restore from a checkpoint does); returns true when it did.
pub type Restarter<'a> = &'a mut dyn FnMut(&mut TestRng) -> bool;

/// [`run`], with shards restarted between operations by `restart`. What a restart rolls back
/// (the updates the restored shard no longer holds, read as the difference of its rows before
/// and after) is taken out of what each client is expected to see: every claim then holds
/// against the restored state, read-your-writes included (a line of a restarted shard keeps
/// its unpushed updates and takes the shard's row for everything else).
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
    run_with(truth, connect, policy, bound, seed, options, restart)
}

/// The model under `options`, with shards restarted by `restart` when given (prefetching and
/// restarts together are not modelled: a restart between a prefetch and its lookup may roll back
/// what the prefetch read).
pub fn run_with(
    truth: &Table,
    connect: &mut dyn FnMut() -> Table,
    policy: PolicyKind,
    bound: Bound,
    seed: u64,
    options: Options,
    mut restart: Option<Restarter<'_>>,
) -> Outcome {
    assert!(
        !(options.prefetch && restart.is_some()),
        "prefetching with restarts is not modelled"
    );
    assert!(
        options.shared_keys != SharedKeys::Averaged,
        "averaged pushes are not modelled"
    );
    // The largest factor a local step may take (1: every local step is the update itself).
    let max_scale = match options.shared_keys {
        SharedKeys::Extrapolated { max_scale } => max_scale.max(1.0),
        _ => 1.0,
    };
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
        .map(|_| {
            connect()
                .cached(config)
                .with_shared_keys(options.shared_keys)
        })
        .collect();
    let mut failed_lookups = 0;
    let mut extrapolated_rows = 0;
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
            bounds[c] = new;
            if faults && set.is_err() {
                // The bounds are in force; the rows left to push go with the next call.
                failed_lookups += 1;
                continue;
            }
            set.unwrap();
            let (_, server) = truth.read();
            for k in 0..ROWS as usize {
                let missing = issued[c][k] - server[k * DIM + c] as u64;
                let what = format!("{}: after set_bounds, key {k}", ctx(op, c));
                assert_write_bound(missing, clients[c].unpushed(k as u64), new, &what);
            }
            continue;
        }
        let bound = bounds[c];
        // Keys concentrate on a hot third of the table so caches both hit and evict.
        let n = 1 + rng.below(8) as usize;
        let keys: Vec<u64> = (0..n)
            .map(|_| {
                if rng.below(3) > 0 {
                    rng.below(ROWS / 3)
                } else {
                    rng.below(ROWS)
                }
            })
            .collect();
        if options.prefetch && rng.below(4) == 0 {
            // Prefetch (landing any prefetch still in flight, unused).
            let (versions, _) = truth.read();
            let made = clients[c].prefetch(&keys);
            if faults && made.is_err() {
                failed_lookups += 1;
                prefetched[c] = None;
                continue;
            }
            made.unwrap();
            prefetched[c] = Some((keys, versions));
            continue;
        }
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
                // The bound holds at validation, before the lookup pushes its own dirty victims;
                // operations are sequential, so the server at validation is the server now. A
                // prefetched row was validated after the prefetch was made: it holds against the
                // server as it was then.
                let (versions_now, server) = truth.read();
                let versions = from_prefetch.unwrap_or(versions_now);
                let looked_up = clients[c].lookup_with_clocks(&keys, &mut out, &mut clocks);
                if faults && looked_up.is_err() {
                    failed_lookups += 1;
                    continue;
                }
                looked_up.unwrap();
                let mut unique = keys.clone();
                let mut seen = std::collections::HashSet::new();
                unique.retain(|k| seen.insert(*k));
                looked_up_keys[c] = Some(unique);
                for (i, &k) in keys.iter().enumerate() {
                    let k = k as usize;
                    let row = &out[i * DIM..(i + 1) * DIM];
                    if max_scale == 1.0 {
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
                    } else {
                        // Extrapolated local steps: at least each update, at most max_scale
                        // times it.
                        let own = issued[c][k] as f32;
                        extrapolated_rows += u64::from(row[c] > own + 0.5);
                        assert!(
                            row[c] >= own - 1e-3 && row[c] <= own * max_scale + 1e-3,
                            "{}: read-your-writes on key {k}: {} for {own} issued",
                            ctx(op, c),
                            row[c]
                        );
                        // The other clients' elements are exact counts: with c's issued updates they sum
                        // to the row's clock.
                        let others: f32 = (0..CLIENTS).filter(|&o| o != c).map(|o| row[o]).sum();
                        assert_eq!(
                            others as u64 + issued[c][k],
                            clocks[i],
                            "{}: key {k} values do not match their clock",
                            ctx(op, c)
                        );
                    }
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
                    if !bound.is_infinite() {
                        let lag = versions[k].saturating_sub(clocks[i]);
                        assert!(
                            lag <= bound.get(),
                            "{}: key {k} lags the server by {lag} > {bound}",
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
                let in_flight = clients[c].prefetching();
                clients[c].update(&keys, &grads).unwrap();
                let (_, server) = truth.read();
                for k in 0..ROWS as usize {
                    let on_server = server[k * DIM + c] as u64;
                    let missing = issued[c][k] - on_server;
                    if in_flight {
                        // What the prefetch carries may or may not have been applied yet.
                        assert!(
                            missing >= clients[c].unpushed(k as u64),
                            "{}: key {k}: the server lacks {missing}, the cache holds {}",
                            ctx(op, c),
                            clients[c].unpushed(k as u64)
                        );
                        continue;
                    }
                    let what = format!("{}: key {k}", ctx(op, c));
                    assert_write_bound(missing, clients[c].unpushed(k as u64), bound, &what);
                }
            }
            _ => {
                prefetched[c] = None;
                clients[c].flush().unwrap();
                let (_, server) = truth.read();
                for k in 0..ROWS as usize {
                    assert_eq!(
                        server[k * DIM + c] as u64,
                        issued[c][k],
                        "{}: flush of key {k}",
                        ctx(op, c)
                    );
                }
            }
        }
    }
    for client in &mut clients {
        client.flush().unwrap();
    }
    let (versions, server) = truth.read();
    for k in 0..ROWS as usize {
        let total: u64 = (0..CLIENTS).map(|c| issued[c][k]).sum();
        assert_eq!(
            versions[k], total,
            "{name}: version of key {k} after flushes"
        );
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
        extrapolated_rows,
    }
}
