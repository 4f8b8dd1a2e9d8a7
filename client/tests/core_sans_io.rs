//! The cache core driven without sockets, through its public protocol (`start_lookup`,
//! `requests`, `on_reply`, `complete_lookup`, `start_push`): an in-memory shard answers each
//! request as the daemon would, so eviction, write-through, refreshes, handed-back rows and
//! failed deliveries are checked deterministically.

use std::collections::HashMap;

use hetkv_client::cache::{CacheCore, RequestKind, ShardRequest};
use hetkv_client::{Bound, CacheConfig, Capacity, PolicyKind};
use hetkv_transport::wire::{is_stale, PushResponse, NO_BASE};
use hetkv_transport::{Initializer, OptimizerSpec, PushOutcome, StaleRows, TableSpec};

const DIM: usize = 2;

/// One shard: versions and rows, SGD with lr 1.
#[derive(Default)]
struct Server {
    rows: HashMap<u64, (u64, [f32; DIM])>,
    clock: u64,
}

impl Server {
    fn apply(&mut self, keys: &[u64], counts: &[u32], grads: &[f32]) {
        for (i, &k) in keys.iter().enumerate() {
            let e = self.rows.entry(k).or_insert((0, [0.0; DIM]));
            e.0 += counts[i] as u64;
            self.clock += counts[i] as u64;
            for j in 0..DIM {
                e.1[j] -= grads[i * DIM + j];
            }
        }
    }

    fn row(&self, k: u64) -> (u64, [f32; DIM]) {
        self.rows.get(&k).copied().unwrap_or((0, [0.0; DIM]))
    }

    /// Answers a request as the daemon would: the push first (handing back rows whose base was
    /// not their version), then the stale rows.
    fn answer(&mut self, r: &ShardRequest<'_>) -> (PushOutcome, StaleRows) {
        let mut out = StaleRows::default();
        let push = match r.push {
            Some(p) => {
                for (i, &k) in p.keys.iter().enumerate() {
                    let before = self.row(k).0;
                    self.apply(&[k], &[p.counts[i]], &p.grads[i * DIM..(i + 1) * DIM]);
                    let base = p.bases.map_or(NO_BASE, |b| b[i]);
                    if base != NO_BASE && base != before {
                        let (v, row) = self.row(k);
                        out.produced.indices.push(i as u32);
                        out.produced.versions.push(v);
                        out.produced.rows.extend_from_slice(&row);
                    }
                }
                PushOutcome::Applied(PushResponse {
                    rows: p.keys.len() as u32,
                    updates: p.counts.iter().map(|&c| c as u64).sum(),
                    produced: out.produced.len() as u32,
                    incarnation: 1,
                    ..PushResponse::default()
                })
            }
            None => PushOutcome::NotSent,
        };
        if r.kind != RequestKind::Push {
            for (i, (&k, &c)) in r.keys.iter().zip(r.clocks).enumerate() {
                let (v, row) = self.row(k);
                if is_stale(v, c, r.bound) {
                    out.indices.push(i as u32);
                    out.versions.push(v);
                    out.rows.extend_from_slice(&row);
                }
            }
        }
        out.table_clock = self.clock;
        out.since_held = true;
        out.incarnation = 1;
        (push, out)
    }
}

fn core(capacity: usize, policy: PolicyKind, pull: Bound, push: Bound) -> CacheCore {
    let spec = TableSpec {
        name: "t".into(),
        rows: 100,
        dim: DIM as u32,
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::Sgd { lr: 1.0 },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    };
    let config = CacheConfig {
        capacity: Capacity::Rows(capacity),
        policy,
        pull_bound: pull,
        push_bound: push,
    };
    CacheCore::new(&spec, &config, 1)
}

/// Sends every request the core lists, round after round, answered by `server`.
fn exchange(c: &mut CacheCore, server: &mut Server) {
    loop {
        let answers: Vec<_> = c
            .requests()
            .iter()
            .map(|r| (r.shard, server.answer(r)))
            .collect();
        if answers.is_empty() {
            return;
        }
        for (shard, (push, rows)) in answers {
            c.on_reply(shard, push, &rows, true).unwrap();
        }
    }
}

fn lookup(c: &mut CacheCore, server: &mut Server, keys: &[u64]) -> Vec<f32> {
    c.start_lookup(keys).unwrap();
    exchange(c, server);
    let mut out = vec![0.0; keys.len() * DIM];
    c.complete_lookup(&mut out, None).unwrap();
    out
}

/// Pushes what the core queued; returns the rows of the push request.
fn push(c: &mut CacheCore, server: &mut Server) -> Vec<u64> {
    c.start_push();
    let keys = c
        .requests()
        .first()
        .and_then(|r| r.push)
        .map(|p| p.keys.to_vec())
        .unwrap_or_default();
    exchange(c, server);
    keys
}

#[test]
fn a_dirty_victim_is_pushed_with_its_count_and_gradient_sum() {
    let mut server = Server::default();
    let mut c = core(2, PolicyKind::Lru, Bound::INFINITE, Bound::INFINITE);
    lookup(&mut c, &mut server, &[1, 2]);
    c.update(&[1, 1, 2], &[1.0, 0.0, 2.0, 0.0, 5.0, 5.0])
        .unwrap();
    assert!(
        push(&mut c, &mut server).is_empty(),
        "infinite push bound: nothing pushed yet"
    );
    assert_eq!(
        lookup(&mut c, &mut server, &[1]),
        vec![-3.0, 0.0],
        "read-your-writes from the cache"
    );
    // Evicts 2, the least recently used, which is dirty: its row goes with the lookup.
    lookup(&mut c, &mut server, &[3]);
    assert_eq!(server.row(2), (1, [-5.0, -5.0]));
    assert_eq!(c.stats().dirty_evictions, 1);
    assert_eq!(c.stats().rows_pushed, 1);
}

#[test]
fn stale_lines_are_refreshed_keeping_pending_gradients() {
    let mut server = Server::default();
    let mut c = core(4, PolicyKind::Lfu, Bound::updates(2), Bound::INFINITE);
    lookup(&mut c, &mut server, &[7]);
    c.update(&[7], &[1.0, 1.0]).unwrap(); // local: -1, pending 1, p = 1
                                          // Another worker pushes 3 updates: version 3 is not above c_c (0 + 1) + 2, so it is served.
    server.apply(&[7, 7, 7], &[1, 1, 1], &[10.0, 0.0, 10.0, 0.0, 10.0, 0.0]);
    assert_eq!(lookup(&mut c, &mut server, &[7]), vec![-1.0, -1.0]);
    assert_eq!(c.stats().stale_refreshes, 0);
    // A fourth: version 4 > 3, so the next lookup refreshes.
    server.apply(&[7], &[1], &[10.0, 0.0]);
    let row = lookup(&mut c, &mut server, &[7]);
    assert_eq!(
        row,
        vec![-41.0, -1.0],
        "server row (-40, 0) with the pending (1, 1) re-applied"
    );
    assert_eq!(c.stats().stale_refreshes, 1);
    // Two more foreign updates stay within the bound: the cached row is served.
    server.apply(&[7, 7], &[1, 1], &[1.0, 0.0, 1.0, 0.0]);
    assert_eq!(lookup(&mut c, &mut server, &[7]), vec![-41.0, -1.0]);
    // The flush's push comes back with the row it produced (two updates came between the
    // line's base and the push): the line takes it.
    c.flush();
    push(&mut c, &mut server);
    assert_eq!(server.row(7), (7, [-43.0, -1.0]));
    let line = c.peek(7).unwrap();
    assert_eq!((line.version, line.unpushed), (7, 0));
    assert_eq!(line.value, [-43.0, -1.0], "the row its push produced");
    assert_eq!(c.stats().rows_handed_back, 1);
}

#[test]
fn uncached_keys_are_written_through_and_bad_gradients_change_nothing() {
    let mut server = Server::default();
    let mut c = core(1, PolicyKind::Lru, Bound::STRICT, Bound::updates(5));
    lookup(&mut c, &mut server, &[1]);
    c.update(&[1, 9], &[1.0, 1.0, 2.0, 2.0]).unwrap();
    assert_eq!(
        push(&mut c, &mut server),
        vec![9],
        "9 is not cached: written through; 1 stays within its bound"
    );
    assert!(c.update(&[1], &[f32::NAN, 0.0]).is_err());
    assert!(c.update(&[100], &[0.0, 0.0]).is_err());
    assert!(c.update(&[1], &[0.0]).is_err());
    assert_eq!(c.unpushed(1), 1, "the refused calls changed nothing");
    assert_eq!(c.stats().write_throughs, 1);
}

#[test]
fn a_push_whose_delivery_is_unknown_is_sent_again_with_the_next_batch() {
    let mut server = Server::default();
    let mut c = core(2, PolicyKind::Lru, Bound::STRICT, Bound::STRICT);
    lookup(&mut c, &mut server, &[1]);
    c.update(&[1], &[1.0, 1.0]).unwrap();
    c.start_push();
    let shards: Vec<usize> = c.requests().iter().map(|r| r.shard).collect();
    for s in shards {
        c.on_reply(s, PushOutcome::Lost, &StaleRows::default(), false)
            .unwrap();
    }
    assert_eq!(c.unsent(), 1);
    c.update(&[1], &[1.0, 1.0]).unwrap();
    assert_eq!(
        push(&mut c, &mut server),
        vec![1, 1],
        "the kept row goes first"
    );
    assert_eq!(server.row(1), (2, [-2.0, -2.0]));
    assert_eq!(c.unsent(), 0);
}

#[test]
fn lfu_keeps_the_popular_keys_where_lru_churns() {
    // A hot set of 8 keys, each seen every round, interleaved with a stream of rarely repeated
    // keys: LRU lets the cold stream flush the hot set; LFU keeps it.
    let mut server = Server::default();
    let mut lfu = core(8, PolicyKind::Lfu, Bound::INFINITE, Bound::INFINITE);
    let mut lru = core(8, PolicyKind::Lru, Bound::INFINITE, Bound::INFINITE);
    let mut cold = 0u64;
    for _ in 0..50 {
        for hot in 0..8u64 {
            for c in [&mut lfu, &mut lru] {
                lookup(c, &mut server, &[hot]);
            }
            cold = (cold + 1) % 49;
            for c in [&mut lfu, &mut lru] {
                lookup(c, &mut server, &[50 + cold]);
            }
        }
    }
    let (a, b) = (lfu.stats().hit_rate(), lru.stats().hit_rate());
    assert!(a > 0.45 && a > b + 0.2, "lfu {a:.2} vs lru {b:.2}");
}

#[test]
fn a_failed_lookup_gives_back_its_slots_and_keeps_its_victims_updates() {
    let mut server = Server::default();
    let mut c = core(2, PolicyKind::Lru, Bound::INFINITE, Bound::INFINITE);
    lookup(&mut c, &mut server, &[1, 2]);
    c.update(&[1, 2], &[1.0, 1.0, 2.0, 2.0]).unwrap();
    // Planning a lookup of two new keys evicts both dirty lines to make room...
    c.start_lookup(&[3, 4]).unwrap();
    assert_eq!(
        c.resident(),
        0,
        "both lines were evicted for the planned misses"
    );
    // ...then the shards cannot be reached: the lookup is abandoned, its pushes kept.
    let shards: Vec<usize> = c.requests().iter().map(|r| r.shard).collect();
    for s in shards {
        c.on_reply(s, PushOutcome::Lost, &StaleRows::default(), false)
            .unwrap();
    }
    assert!(c.complete_lookup(&mut [0.0; 4], None).is_err());
    assert_eq!(
        push(&mut c, &mut server),
        vec![1, 2],
        "the evicted lines' updates are still to be pushed"
    );
    assert_eq!(server.row(2), (1, [-2.0, -2.0]));
    // The slots are free again: the next lookup caches both keys without evicting anything.
    lookup(&mut c, &mut server, &[3, 4]);
    assert_eq!(c.resident(), 2);
    assert_eq!(c.stats().evictions, 2);
    assert_eq!(
        lookup(&mut c, &mut server, &[2]),
        vec![-2.0, -2.0],
        "read back from the shard"
    );
}

#[test]
fn a_lookup_never_evicts_a_line_it_reads() {
    // Capacity 2, both lines hit by the batch that also misses a third key: the miss is served
    // without caching rather than evicting a line this lookup returns.
    let mut server = Server::default();
    let mut c = core(2, PolicyKind::Lru, Bound::INFINITE, Bound::INFINITE);
    lookup(&mut c, &mut server, &[1, 2]);
    lookup(&mut c, &mut server, &[1, 2, 3]);
    assert_eq!(c.stats().evictions, 0);
    assert_eq!(c.stats().not_admitted, 1);
    assert_eq!(c.resident(), 2);
}

#[test]
fn a_refused_push_makes_its_lines_read_again() {
    let mut server = Server::default();
    let mut c = core(2, PolicyKind::Lru, Bound::INFINITE, Bound::STRICT);
    lookup(&mut c, &mut server, &[1]);
    c.update(&[1], &[1.0, 1.0]).unwrap();
    c.start_push();
    let shards: Vec<usize> = c.requests().iter().map(|r| r.shard).collect();
    for s in shards {
        c.on_reply(s, PushOutcome::Refused, &StaleRows::default(), true)
            .unwrap();
    }
    // The line committed its push locally; the shard never applied it, so the next lookup reads
    // the row again (even under an infinite read bound).
    assert_eq!(lookup(&mut c, &mut server, &[1]), vec![0.0, 0.0]);
    assert_eq!(c.stats().rows_refused, 1);
}
