//! A dynamic table's rows under concurrent pushes and reads: threads push random keys of a space
//! ten times the capacity (so buckets keep evicting) while readers read random keys lock-free.
//! Every read must be a row whose values its version produces (or the initial value at version
//! 0); the table never holds more than its capacity; and at the end, for every key, the updates
//! pushed equal its row's version plus the versions the eviction stream reported for it: no
//! update lost or counted twice, no eviction missing from the stream or reported twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use hetkv_store::dynamic::{DecodedPush, DynamicRows};
use hetkv_store::Placement;
use hetkv_transport::{Admission, DynamicSpec, Eviction, Initializer, OptimizerSpec, TableSpec};

const DIM: usize = 4;
const CAPACITY: u64 = 256;
const KEYS: u64 = 10 * CAPACITY;
const PUSHERS: usize = 6;
const PUSHES: usize = 8_000;

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Key `i` of the space, spread over u64 with the extremes in it.
fn key(i: u64) -> u64 {
    match i {
        0 => 0,
        1 => u64::MAX,
        _ => i.wrapping_mul(0xD6E8_FEB8_6659_FD93),
    }
}

#[test]
fn pushes_and_reads_keep_every_update_once_across_evictions() {
    let placement = Placement::new(0, None, None).unwrap();
    let table = Arc::new(
        DynamicRows::create(
            &TableSpec {
                name: "ids".into(),
                rows: CAPACITY,
                dim: DIM as u32,
                init: Initializer::Zeros,
                optimizer: OptimizerSpec::sgd(1.0),
                buckets: hetkv_transport::DEFAULT_BUCKETS,
                dynamic: Some(DynamicSpec {
                    admission: Admission::Always,
                    eviction: Eviction::Lru,
                }),
            },
            0,
            hetkv_transport::keyed::KeyedLayout::with_capacity(DIM as u32, CAPACITY).unwrap(),
            &placement,
        )
        .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (table, stop) = (Arc::clone(&table), Arc::clone(&stop));
            thread::spawn(move || {
                let (mut rng, mut out, mut reads) = (99 + r as u64, [0f32; DIM], 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let k = key(xorshift(&mut rng) % KEYS);
                    let version = table.read(k, &mut out).unwrap();
                    // SGD at lr 1 with a gradient of -count per push: the row is its version.
                    assert_eq!(out, [version as f32; DIM], "key {k:#x}");
                    assert!(table.resident() <= CAPACITY);
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let pushers: Vec<_> = (0..PUSHERS)
        .map(|p| {
            let table = Arc::clone(&table);
            thread::spawn(move || {
                let mut rng = 1 + p as u64;
                let mut pushed: HashMap<u64, u64> = HashMap::new();
                for _ in 0..PUSHES {
                    let k = key(xorshift(&mut rng) % KEYS);
                    let count = 1 + (xorshift(&mut rng) % 3) as u32;
                    let report = table
                        .push(
                            &DecodedPush::new(
                                DIM,
                                vec![k],
                                vec![count],
                                vec![-(count as f32); DIM],
                            )
                            .unwrap(),
                            None,
                        )
                        .unwrap();
                    assert_eq!(report.applied, u64::from(count), "admission is always");
                    *pushed.entry(k).or_default() += u64::from(count);
                }
                pushed
            })
        })
        .collect();
    let mut pushed: HashMap<u64, u64> = HashMap::new();
    for p in pushers {
        for (k, n) in p.join().expect("a pusher failed") {
            *pushed.entry(k).or_default() += n;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers
        .into_iter()
        .map(|r| r.join().expect("a reader saw a wrong row"))
        .sum();

    let mut accounted: HashMap<u64, u64> = HashMap::new();
    let (mut cursor, mut evictions) = (0, 0);
    loop {
        let page = table.evictions(cursor, 4096).unwrap();
        if page.events.is_empty() {
            break;
        }
        for e in &page.events {
            *accounted.entry(e.key).or_default() += e.version;
        }
        evictions += page.events.len();
        cursor = page.next;
    }
    let mut out = [0f32; DIM];
    for i in 0..KEYS {
        let k = key(i);
        *accounted.entry(k).or_default() += table.read(k, &mut out).unwrap();
    }
    accounted.retain(|_, n| *n > 0);
    eprintln!(
        "{} keys pushed, {evictions} evictions, {reads} concurrent reads, {} resident",
        pushed.len(),
        table.resident()
    );
    assert_eq!(
        accounted, pushed,
        "pushed updates = resident versions + evicted versions"
    );
    assert_eq!(table.resident(), CAPACITY.min(pushed.len() as u64));
    assert!(
        evictions > 10_000,
        "the buckets kept evicting ({evictions})"
    );
    assert!(reads > 1_000, "readers ran alongside ({reads})");
}
