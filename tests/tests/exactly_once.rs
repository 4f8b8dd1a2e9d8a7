//! Every push applied exactly once through a proxy that cuts connections inside frames (in both
//! directions), stalls answers past the clients' I/O timeout, and delays bytes: 16 clients (half
//! pushing directly, half through HET caches with bounds) against 3 shards, for a bounded time.
//! Afterwards every row's version equals the updates the clients issued for it, so none was lost
//! or applied twice, and no call waited past its deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hetkv_client::{Bound, CacheConfig, Capacity, Cluster, PolicyKind};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::EmbeddedCluster;
use hetkv_tests::proxy::{FaultProxy, Faults};
use hetkv_tests::{sgd_table, TestRng};

const ROWS: u64 = 3000;
const DIM: usize = 4;
const CLIENTS: usize = 16;

/// A fault proxy in front of each shard of `cluster` (seeded from `seed`), and their addresses.
fn proxies(cluster: &EmbeddedCluster, faults: Faults, seed: u64) -> (Vec<FaultProxy>, Vec<String>) {
    let proxies: Vec<FaultProxy> = cluster
        .addrs()
        .iter()
        .enumerate()
        .map(|(i, a)| FaultProxy::start(a, faults, seed + i as u64))
        .collect();
    let through = proxies.iter().map(|p| p.addr().to_string()).collect();
    (proxies, through)
}

/// A client whose calls end at 400 ms, well inside the proxies' 900 ms stalls: pushes are held.
fn held_config() -> ClientConfig {
    ClientConfig {
        io_timeout: Some(Duration::from_millis(120)),
        connect_timeout: Duration::from_millis(120),
        deadline: Duration::from_millis(400),
        ..ClientConfig::default()
    }
}

/// Flushes `cache` once the links healed (trying again for two seconds while held pushes are
/// still being delivered); returns the rows it held past a deadline.
fn flush_healed(cache: &mut hetkv_client::CachedTable) -> u64 {
    let mut flushed = cache.flush();
    for _ in 0..20 {
        if flushed.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        flushed = cache.flush();
    }
    flushed.unwrap();
    cache.stats().rows_held
}

/// The rows whose version is not the number of updates issued for them: (key, version, issued).
fn wrong_versions(table: &hetkv_client::Table, issued: &[AtomicU64]) -> Vec<(u64, u64, u64)> {
    let keys: Vec<u64> = (0..issued.len() as u64).collect();
    let mut values = vec![0f32; keys.len() * DIM];
    let mut versions = vec![0u64; keys.len()];
    table.pull(&keys, &mut values, Some(&mut versions)).unwrap();
    keys.iter()
        .filter_map(|&k| {
            let want = issued[k as usize].load(Ordering::Relaxed);
            (versions[k as usize] != want).then_some((k, versions[k as usize], want))
        })
        .collect()
}

#[test]
fn pushes_through_a_cutting_stalling_proxy_are_applied_exactly_once() {
    let cluster = EmbeddedCluster::start(3).unwrap();
    let admin = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let table = admin
        .create_table(&sgd_table("emb", ROWS, DIM as u32, 0.001))
        .unwrap();
    let faults = Faults {
        cut: 150,
        stall: 400,
        stall_for: Duration::from_millis(700),
        delay: 50,
    };
    let (proxies, through) = proxies(&cluster, faults, 0xfa17);
    let deadline = Duration::from_secs(20);
    let config = ClientConfig {
        io_timeout: Some(Duration::from_millis(400)),
        connect_timeout: Duration::from_millis(400),
        deadline,
        ..ClientConfig::default()
    };
    let issued: Arc<Vec<AtomicU64>> = Arc::new((0..ROWS).map(|_| AtomicU64::new(0)).collect());
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let start = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|w| {
            let (through, config, issued, slowest) = (
                through.clone(),
                config.clone(),
                issued.clone(),
                slowest.clone(),
            );
            std::thread::spawn(move || {
                let client = Cluster::connect_tcp(&through, &config).unwrap();
                let t = client.open_table("emb").unwrap();
                let mut rng = TestRng(w as u64 * 7919 + 1);
                let mut keys = Vec::new();
                let timed = |f: &mut dyn FnMut()| {
                    let at = Instant::now();
                    f();
                    let took = at.elapsed();
                    let mut s = slowest.lock().unwrap();
                    *s = (*s).max(took);
                };
                if w % 2 == 0 {
                    // Direct pushes: each key of a batch once, count 1.
                    for _ in 0..150 {
                        keys.clear();
                        keys.extend((0..16).map(|_| rng.below(ROWS)));
                        keys.sort_unstable();
                        keys.dedup();
                        let grads = vec![0.5f32; keys.len() * DIM];
                        timed(&mut || {
                            t.push(&keys, &vec![1; keys.len()], &grads).unwrap();
                        });
                        for &k in &keys {
                            issued[k as usize].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                } else {
                    let mut cache = t.cached(CacheConfig {
                        capacity: Capacity::Fraction(0.1),
                        policy: PolicyKind::Lfu,
                        pull_bound: Bound::updates(5),
                        push_bound: Bound::updates(5),
                    });
                    let mut rows = vec![0f32; 16 * DIM];
                    for _ in 0..150 {
                        keys.clear();
                        keys.extend((0..16).map(|_| rng.below(ROWS)));
                        keys.sort_unstable();
                        keys.dedup();
                        let n = keys.len();
                        timed(&mut || cache.lookup(&keys, &mut rows[..n * DIM]).unwrap());
                        timed(&mut || cache.update(&keys, &vec![0.5; n * DIM]).unwrap());
                        for &k in &keys {
                            issued[k as usize].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    timed(&mut || cache.flush().unwrap());
                }
            })
        })
        .collect();
    // Faults for a bounded time, then the links heal and the clients finish.
    while start.elapsed() < Duration::from_secs(4) && !workers.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    proxies.iter().for_each(FaultProxy::heal);
    workers.into_iter().for_each(|h| h.join().unwrap());

    let wrong = wrong_versions(&table, &issued);
    let cuts: u64 = proxies
        .iter()
        .map(|p| {
            p.counts.cut_requests.load(Ordering::Relaxed)
                + p.counts.cut_answers.load(Ordering::Relaxed)
        })
        .sum();
    let answers_cut: u64 = proxies
        .iter()
        .map(|p| p.counts.cut_answers.load(Ordering::Relaxed))
        .sum();
    let stalls: u64 = proxies
        .iter()
        .map(|p| p.counts.stalls.load(Ordering::Relaxed))
        .sum();
    let repeats: u64 = (0..3).map(|i| cluster.shard(i).repeated_pushes()).sum();
    println!(
        "{cuts} cuts ({answers_cut} of answers), {stalls} stalls, {repeats} pushes received \
         again and not applied twice; slowest call {:?}",
        slowest.lock().unwrap()
    );
    assert!(
        wrong.is_empty(),
        "{} rows whose version is not the updates issued (key, version, issued): {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert!(
        answers_cut > 0 && stalls > 0,
        "the proxy cut answers and stalled links"
    );
    assert!(
        repeats > 0,
        "some acknowledgements were lost, so some pushes arrived twice"
    );
    assert!(
        *slowest.lock().unwrap() < deadline,
        "a call waited past its deadline"
    );
}

/// Stalls longer than the clients' deadline: a push whose answer does not come before the
/// deadline is unknown (the stalled bytes may still reach the shard and be applied). The TCP
/// client holds such a request and sends it again, under its number, before its next request;
/// the cache does not push those rows again. After the links heal and every cache flushes, every
/// row's version equals the updates issued. (Sent again by the cache under a new number, as
/// before, they were applied twice.)
#[test]
fn pushes_unanswered_at_their_deadline_are_held_and_applied_once() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let admin = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let table = admin
        .create_table(&sgd_table("held", 500, DIM as u32, 0.001))
        .unwrap();
    let faults = Faults {
        cut: u64::MAX,
        stall: 4,
        stall_for: Duration::from_millis(900),
        delay: u64::MAX,
    };
    let (proxies, through) = proxies(&cluster, faults, 0x4e1d);
    let config = held_config();
    let issued: Arc<Vec<AtomicU64>> = Arc::new((0..500).map(|_| AtomicU64::new(0)).collect());
    let held = Arc::new(AtomicU64::new(0));
    // Connected while the links are healthy; the faults start with the work.
    proxies.iter().for_each(FaultProxy::heal);
    let caches: Vec<_> = (0..6)
        .map(|_| {
            let client = Cluster::connect_tcp(&through, &config).unwrap();
            client.open_table("held").unwrap().cached(CacheConfig {
                capacity: Capacity::Rows(20),
                policy: PolicyKind::Lru,
                pull_bound: Bound::updates(2),
                push_bound: Bound::updates(1),
            })
        })
        .collect();
    proxies.iter().for_each(FaultProxy::resume);
    let workers: Vec<_> = caches
        .into_iter()
        .enumerate()
        .map(|(w, mut cache)| {
            let (issued, held) = (issued.clone(), held.clone());
            std::thread::spawn(move || {
                let mut rng = TestRng(w as u64 * 104_729 + 3);
                let mut rows = [0f32; 8 * DIM];
                for _ in 0..40 {
                    let mut keys: Vec<u64> = (0..8).map(|_| rng.below(500)).collect();
                    keys.sort_unstable();
                    keys.dedup();
                    let n = keys.len();
                    // Calls fail at their deadline while the links stall; the updates are kept
                    // (queued, or held by the transport) whatever the result.
                    let _ = cache.lookup(&keys, &mut rows[..n * DIM]);
                    let _ = cache.update(&keys, &vec![0.5; n * DIM]);
                    for &k in &keys {
                        issued[k as usize].fetch_add(1, Ordering::Relaxed);
                    }
                }
                (cache, held)
            })
        })
        .collect();
    let caches: Vec<_> = workers.into_iter().map(|h| h.join().unwrap()).collect();
    proxies.iter().for_each(FaultProxy::heal);
    std::thread::sleep(Duration::from_secs(1)); // stalled bytes still in the proxies arrive
    for (mut cache, held) in caches {
        held.fetch_add(flush_healed(&mut cache), Ordering::Relaxed);
    }
    let wrong = wrong_versions(&table, &issued);
    let repeats: u64 = (0..2).map(|i| cluster.shard(i).repeated_pushes()).sum();
    let held = held.load(Ordering::Relaxed);
    println!("{held} rows held past their deadline; {repeats} pushes received again");
    assert!(
        wrong.is_empty(),
        "{} rows whose version is not the updates issued (key, version, issued): {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert!(held > 0, "some pushes were unanswered at their deadline");
}

/// The same faults (stalls past the deadline, and cuts inside frames) under caches of three
/// tables driven together (`lookup_many`, `update_many`): each round sends each shard one batch
/// holding every table's request, with up to three numbered pushes in it. A batch unanswered at
/// its deadline is held and sent again, the same bytes, so each push in it keeps its number;
/// after the links heal and every cache flushes, every row of every table has the version of
/// the updates issued for it.
#[test]
fn batched_pushes_of_several_tables_are_held_and_applied_once() {
    const TABLES: usize = 3;
    let cluster = EmbeddedCluster::start(2).unwrap();
    let admin = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let tables: Vec<_> = (0..TABLES)
        .map(|t| {
            admin
                .create_table(&sgd_table(&format!("batched{t}"), 500, DIM as u32, 0.001))
                .unwrap()
        })
        .collect();
    let faults = Faults {
        cut: 60,
        stall: 6,
        stall_for: Duration::from_millis(900),
        delay: u64::MAX,
    };
    let (proxies, through) = proxies(&cluster, faults, 0xba7c);
    let config = held_config();
    let issued: Arc<Vec<Vec<AtomicU64>>> = Arc::new(
        (0..TABLES)
            .map(|_| (0..500).map(|_| AtomicU64::new(0)).collect())
            .collect(),
    );
    proxies.iter().for_each(FaultProxy::heal);
    let groups: Vec<Vec<_>> = (0..6)
        .map(|_| {
            let client = Cluster::connect_tcp(&through, &config).unwrap();
            (0..TABLES)
                .map(|t| {
                    client
                        .open_table(&format!("batched{t}"))
                        .unwrap()
                        .cached(CacheConfig {
                            capacity: Capacity::Rows(20),
                            policy: PolicyKind::Lru,
                            pull_bound: Bound::updates(2),
                            push_bound: Bound::updates(1),
                        })
                })
                .collect()
        })
        .collect();
    proxies.iter().for_each(FaultProxy::resume);
    let workers: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(w, mut caches)| {
            let issued = issued.clone();
            std::thread::spawn(move || {
                let mut rng = TestRng(w as u64 * 15_485_863 + 5);
                for _ in 0..40 {
                    // Each table its own keys (of 1 to 8), the same call for all.
                    let keys: Vec<Vec<u64>> = (0..TABLES)
                        .map(|_| {
                            let mut k: Vec<u64> =
                                (0..1 + rng.below(8)).map(|_| rng.below(500)).collect();
                            k.sort_unstable();
                            k.dedup();
                            k
                        })
                        .collect();
                    let mut rows: Vec<Vec<f32>> =
                        keys.iter().map(|k| vec![0f32; k.len() * DIM]).collect();
                    let grads: Vec<Vec<f32>> =
                        keys.iter().map(|k| vec![0.5f32; k.len() * DIM]).collect();
                    let key_refs: Vec<&[u64]> = keys.iter().map(Vec::as_slice).collect();
                    let grad_refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
                    let mut row_refs: Vec<&mut [f32]> =
                        rows.iter_mut().map(Vec::as_mut_slice).collect();
                    let mut group: Vec<_> = caches.iter_mut().collect();
                    // Calls fail at their deadline while the links stall; the updates are kept.
                    let _ = hetkv_client::lookup_many(&mut group, &key_refs, &mut row_refs);
                    let _ = hetkv_client::update_many(&mut group, &key_refs, &grad_refs);
                    for (t, k) in keys.iter().enumerate() {
                        for &key in k {
                            issued[t][key as usize].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                caches
            })
        })
        .collect();
    let groups: Vec<_> = workers.into_iter().map(|h| h.join().unwrap()).collect();
    proxies.iter().for_each(FaultProxy::heal);
    std::thread::sleep(Duration::from_secs(1)); // stalled bytes still in the proxies arrive
    let mut held = 0;
    for caches in groups {
        for mut cache in caches {
            held += flush_healed(&mut cache);
        }
    }
    let repeats: u64 = (0..2).map(|i| cluster.shard(i).repeated_pushes()).sum();
    let batches: u64 = proxies
        .iter()
        .map(|p| p.counts.cut_requests.load(Ordering::Relaxed))
        .sum();
    println!("{held} rows held past their deadline; {repeats} pushes received again; {batches} requests cut");
    for (t, table) in tables.iter().enumerate() {
        let wrong = wrong_versions(table, &issued[t]);
        assert!(
            wrong.is_empty(),
            "table {t}: {} rows whose version is not the updates issued (key, version, issued): {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(10)]
        );
    }
    assert!(held > 0, "some batches were unanswered at their deadline");
}
