//! The cache core driven without sockets: an in-memory server answers its plans, so eviction,
//! write-through and bound behaviour are checked deterministically.

use std::collections::HashMap;

use hetkv_client::cache::{CacheCore, Replies};
use hetkv_client::{Bound, CacheConfig, Capacity, PolicyKind};
use hetkv_transport::wire::NOT_CACHED;
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};

const DIM: usize = 2;

/// A server: versions and rows, SGD with lr 1.
#[derive(Default)]
struct Server {
    rows: HashMap<u64, (u64, [f32; DIM])>,
}

impl Server {
    fn answer(&self, keys: &[u64], clocks: &[u64], bound: u64) -> Replies {
        let mut r = Replies::default();
        for (i, (&k, &c)) in keys.iter().zip(clocks).enumerate() {
            let (v, row) = self.rows.get(&k).copied().unwrap_or((0, [0.0; DIM]));
            if c == NOT_CACHED || v > c.saturating_add(bound) {
                r.requests.push(i as u32);
                r.versions.push(v);
                r.rows.extend_from_slice(&row);
            }
        }
        r
    }

    fn apply(&mut self, keys: &[u64], counts: &[u32], grads: &[f32]) {
        for (i, &k) in keys.iter().enumerate() {
            let e = self.rows.entry(k).or_insert((0, [0.0; DIM]));
            e.0 += counts[i] as u64;
            for j in 0..DIM {
                e.1[j] -= grads[i * DIM + j];
            }
        }
    }
}

fn core(capacity: usize, policy: PolicyKind, pull: Bound, push: Bound) -> CacheCore {
    let spec = TableSpec {
        name: "t".into(),
        rows: 100,
        dim: DIM as u32,
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::Sgd { lr: 1.0 },
    };
    let config = CacheConfig {
        capacity: Capacity::Rows(capacity),
        policy,
        pull_bound: pull,
        push_bound: push,
    };
    CacheCore::new(&spec, &config, 1)
}

fn lookup(core: &mut CacheCore, server: &Server, keys: &[u64]) -> Vec<f32> {
    let plan = core.plan_lookup(keys).unwrap();
    let replies = server.answer(plan.keys, plan.clocks, plan.bound);
    let mut out = vec![0.0; keys.len() * DIM];
    core.finish_lookup(&replies, &mut out, None).unwrap();
    out
}

fn deliver(core: &mut CacheCore, server: &mut Server) -> usize {
    let batch = core.take_pushes();
    server.apply(&batch.keys, &batch.counts, &batch.grads);
    core.pushed(0, batch.len(), batch.counts.iter().map(|&c| c as u64).sum());
    batch.len()
}

#[test]
fn a_dirty_victim_is_handed_back_with_its_count_and_gradient_sum() {
    let mut server = Server::default();
    let mut c = core(2, PolicyKind::Lru, Bound::INFINITE, Bound::INFINITE);
    lookup(&mut c, &server, &[1, 2]);
    c.update(&[1, 1, 2], &[1.0, 0.0, 2.0, 0.0, 5.0, 5.0])
        .unwrap();
    assert_eq!(
        deliver(&mut c, &mut server),
        0,
        "infinite push bound: nothing pushed yet"
    );
    assert_eq!(
        lookup(&mut c, &server, &[1]),
        vec![-3.0, 0.0],
        "read-your-writes from the cache"
    );
    lookup(&mut c, &server, &[3]); // evicts 2, the least recently used, which is dirty
    let batch = c.take_pushes();
    assert_eq!(batch.keys, vec![2]);
    assert_eq!(batch.counts, vec![1]);
    assert_eq!(batch.grads, vec![5.0, 5.0]);
    server.apply(&batch.keys, &batch.counts, &batch.grads);
    assert_eq!(server.rows[&2], (1, [-5.0, -5.0]));
    assert_eq!(c.stats().dirty_evictions, 1);
}

#[test]
fn stale_lines_are_refreshed_keeping_pending_gradients() {
    let mut server = Server::default();
    let mut c = core(4, PolicyKind::Lfu, Bound::updates(2), Bound::INFINITE);
    lookup(&mut c, &server, &[7]);
    c.update(&[7], &[1.0, 1.0]).unwrap(); // local: -1, pending 1, p = 1
                                          // Another worker pushes 3 updates: version 3 is not above c_c (0 + 1) + 2, so it is served.
    server.apply(&[7, 7, 7], &[1, 1, 1], &[10.0, 0.0, 10.0, 0.0, 10.0, 0.0]);
    assert_eq!(lookup(&mut c, &server, &[7]), vec![-1.0, -1.0]);
    assert_eq!(c.stats().stale_refreshes, 0);
    // A fourth: version 4 > 3, so the next lookup refreshes.
    server.apply(&[7], &[1], &[10.0, 0.0]);
    let row = lookup(&mut c, &server, &[7]);
    assert_eq!(
        row,
        vec![-41.0, -1.0],
        "server row (-40, 0) with the pending (1, 1) re-applied"
    );
    assert_eq!(c.stats().stale_refreshes, 1);
    // Two more foreign updates stay within the bound: the cached row is served.
    server.apply(&[7, 7], &[1, 1], &[1.0, 0.0, 1.0, 0.0]);
    assert_eq!(lookup(&mut c, &server, &[7]), vec![-41.0, -1.0]);
    c.flush();
    deliver(&mut c, &mut server);
    assert_eq!(server.rows[&7], (7, [-43.0, -1.0]));
}

#[test]
fn uncached_keys_are_written_through_and_bad_gradients_change_nothing() {
    let mut server = Server::default();
    let mut c = core(1, PolicyKind::Lru, Bound::STRICT, Bound::updates(5));
    lookup(&mut c, &server, &[1]);
    c.update(&[1, 9], &[1.0, 1.0, 2.0, 2.0]).unwrap();
    let batch = c.take_pushes();
    assert_eq!(
        batch.keys,
        vec![9],
        "9 is not cached: written through; 1 stays within its bound"
    );
    server.apply(&batch.keys, &batch.counts, &batch.grads);
    assert!(c.update(&[1], &[f32::NAN, 0.0]).is_err());
    assert!(c.update(&[100], &[0.0, 0.0]).is_err());
    assert!(c.update(&[1], &[0.0]).is_err());
    assert_eq!(c.unpushed(1), 1, "the refused calls changed nothing");
    assert_eq!(c.stats().write_throughs, 1);
}

#[test]
fn a_push_that_failed_is_sent_again_with_the_next_batch() {
    let mut server = Server::default();
    let mut c = core(2, PolicyKind::Lru, Bound::STRICT, Bound::STRICT);
    lookup(&mut c, &server, &[1]);
    c.update(&[1], &[1.0, 1.0]).unwrap();
    let lost = c.take_pushes();
    c.requeue(&lost);
    assert_eq!(c.unsent(), 1);
    c.update(&[1], &[1.0, 1.0]).unwrap();
    let batch = c.take_pushes();
    assert_eq!(batch.keys, vec![1, 1], "the requeued row goes first");
    server.apply(&batch.keys, &batch.counts, &batch.grads);
    assert_eq!(server.rows[&1], (2, [-2.0, -2.0]));
}

#[test]
fn lfu_keeps_the_popular_keys_where_lru_churns() {
    // A hot set of 8 keys, each seen every round, interleaved with a stream of rarely repeated
    // keys: LRU lets the cold stream flush the hot set; LFU keeps it.
    let server = Server::default();
    let mut lfu = core(8, PolicyKind::Lfu, Bound::INFINITE, Bound::INFINITE);
    let mut lru = core(8, PolicyKind::Lru, Bound::INFINITE, Bound::INFINITE);
    let mut cold = 0u64;
    for _ in 0..50 {
        for hot in 0..8u64 {
            for c in [&mut lfu, &mut lru] {
                lookup(c, &server, &[hot]);
            }
            cold = (cold + 1) % 49;
            for c in [&mut lfu, &mut lru] {
                lookup(c, &server, &[50 + cold]);
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
    lookup(&mut c, &server, &[1, 2]);
    c.update(&[1, 2], &[1.0, 1.0, 2.0, 2.0]).unwrap();
    // Planning a lookup of two new keys evicts both dirty lines to make room...
    let plan = c.plan_lookup(&[3, 4]).unwrap();
    assert_eq!(plan.keys, &[3, 4]);
    assert_eq!(
        c.resident(),
        0,
        "both lines were evicted for the planned misses"
    );
    // ...then the shards cannot be reached: the lookup is abandoned.
    c.abort_lookup();
    let victims = c.take_pushes();
    assert_eq!(
        victims.keys,
        vec![1, 2],
        "the evicted lines' updates are still to be pushed"
    );
    server.apply(&victims.keys, &victims.counts, &victims.grads);
    assert_eq!(server.rows[&2], (1, [-2.0, -2.0]));
    // The slots are free again: the next lookup caches both keys without evicting anything.
    lookup(&mut c, &server, &[3, 4]);
    assert_eq!(c.resident(), 2);
    assert_eq!(c.stats().evictions, 2);
    assert_eq!(
        lookup(&mut c, &server, &[2]),
        vec![-2.0, -2.0],
        "read back from the shard"
    );
}

#[test]
fn a_lookup_never_evicts_a_line_it_reads() {
    // Capacity 2, both lines hit by the batch that also misses a third key: the miss is served
    // without caching rather than evicting a line this lookup returns.
    let server = Server::default();
    let mut c = core(2, PolicyKind::Lru, Bound::INFINITE, Bound::INFINITE);
    lookup(&mut c, &server, &[1, 2]);
    lookup(&mut c, &server, &[1, 2, 3]);
    assert_eq!(c.stats().evictions, 0);
    assert_eq!(c.stats().not_admitted, 1);
    assert_eq!(c.resident(), 2);
}
