//! One-sided readers of a dynamic table's region against a writer that keeps giving slots to other
//! keys: through a second, read-only mapping of the region's file (what a trainer on the daemon's
//! host maps), readers run the one-sided lookup (a bucket's bytes, then each candidate slot's
//! bytes, as a NIC returns them) while the writer inserts, updates, evicts and removes keys of a
//! key space eight times the region's capacity. No reader may accept a row of another key, a torn
//! row, or a payload its key and version do not produce.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use hetkv_transport::keyed::{
    match_row, Bucket, KeyedLayout, KeyedRegion, Placement, BUCKET_BYTES, BUCKET_SLOTS,
};
use hetkv_transport::row;
use hetkv_transport::{Region, SharedRegion};

const DIM: usize = 6;
const KEYS: u64 = 8 * 2 * BUCKET_SLOTS as u64;
const READERS: usize = 3;
const READS_PER_READER: u64 = 400_000;

/// The key of index `i`: spread over u64, the extremes included.
fn key(i: u64) -> u64 {
    match i {
        0 => 0,
        1 => u64::MAX,
        _ => i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
    }
}

/// The payload the writer stores for `key` at `version`: a reader checks every value.
fn payload(key: u64, version: u64) -> [f32; DIM] {
    std::array::from_fn(|j| ((key.rotate_left(j as u32 * 7) ^ version) % 65_521) as f32)
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[derive(Default)]
struct Tally {
    found: AtomicU64,
    absent: AtomicU64,
    torn: AtomicU64,
    reassigned: AtomicU64,
}

#[test]
fn readers_never_accept_another_keys_row_while_slots_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dynamic.region");
    let layout = KeyedLayout::with_capacity(DIM as u32, 2 * BUCKET_SLOTS as u64).unwrap();
    let region = Region::file_backed(&path, layout.region_bytes()).unwrap();
    KeyedRegion::new(&layout, region.words()).format();
    let shared = Arc::new(SharedRegion::open(&path).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());

    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (shared, tally) = (Arc::clone(&shared), Arc::clone(&tally));
            thread::spawn(move || {
                let mut rng = 0xC0FF_EE00 + r as u64;
                let row_layout = *layout.row();
                let (mut bucket_bytes, mut row_bytes) = (Vec::new(), Vec::new());
                for _ in 0..READS_PER_READER {
                    let k = key(xorshift(&mut rng) % KEYS);
                    let b = layout.bucket_of(k);
                    // A torn copy of the bucket is read again, as a one-sided reader does.
                    let bucket = loop {
                        bucket_bytes.clear();
                        row::copy_span(
                            shared.words(),
                            layout.bucket_offset(b),
                            BUCKET_BYTES,
                            &mut bucket_bytes,
                        );
                        match Bucket::decode(&bucket_bytes) {
                            Ok(bucket) => break bucket,
                            Err(_) => tally.torn.fetch_add(1, Ordering::Relaxed),
                        };
                    };
                    let mut found = false;
                    for i in bucket.candidates(k) {
                        let slot = layout.first_slot(b) + i as u64;
                        row_bytes.clear();
                        row::copy_span(
                            shared.words(),
                            layout.slot_offset(slot),
                            row_layout.stride(),
                            &mut row_bytes,
                        );
                        match match_row(&row_layout, k, &row_bytes) {
                            Ok(Some(version)) => {
                                let mut got = [0f32; DIM];
                                row::decode_payload(&row_layout, &row_bytes, &mut got);
                                assert_eq!(
                                    got,
                                    payload(k, version),
                                    "key {k:#x} at version {version} in slot {slot}"
                                );
                                found = true;
                                break;
                            }
                            Ok(None) => {
                                tally.reassigned.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                tally.torn.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    let counter = if found { &tally.found } else { &tally.absent };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let writer = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let keyed = KeyedRegion::new(&layout, region.words());
            let mut versions = std::collections::HashMap::new();
            let mut scores = vec![0u64; layout.capacity() as usize];
            let (mut rng, mut step, mut evictions) = (7u64, 0u64, 0u64);
            let mut image = vec![0u8; layout.row().stride()];
            while !stop.load(Ordering::Relaxed) {
                step += 1;
                let k = key(xorshift(&mut rng) % KEYS);
                if xorshift(&mut rng).is_multiple_of(16) {
                    if let Some((slot, _)) = versions.remove(&k) {
                        keyed.remove(layout.bucket_of(k), slot);
                    }
                    continue;
                }
                let placed = keyed.place(k, |s| scores[s as usize], &mut image).unwrap();
                let slot = match placed {
                    Placement::Resident { slot, .. } => {
                        let entry: &mut (u64, u64) = versions.get_mut(&k).unwrap();
                        entry.1 += 1;
                        keyed.write(slot, k, entry.1, &payload(k, entry.1), &mut image);
                        slot
                    }
                    Placement::Free(slot) => {
                        keyed.publish(slot, k, 0, &payload(k, 0), &mut image);
                        versions.insert(k, (slot, 0));
                        slot
                    }
                    Placement::Evict {
                        slot, key: victim, ..
                    } => {
                        evictions += 1;
                        versions.remove(&victim);
                        keyed.publish(slot, k, 0, &payload(k, 0), &mut image);
                        versions.insert(k, (slot, 0));
                        slot
                    }
                };
                scores[slot as usize] = step;
            }
            (step, evictions, region)
        })
    };

    for r in readers {
        r.join().expect("a reader accepted a wrong row");
    }
    stop.store(true, Ordering::Relaxed);
    let (steps, evictions, _region) = writer.join().unwrap();
    let t = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let reads = t(&tally.found) + t(&tally.absent);
    eprintln!(
        "{reads} reads: {} found, {} absent, {} torn copies, {} slots given to another key \
         between the bucket and the row; writer: {steps} operations, {evictions} evictions",
        t(&tally.found),
        t(&tally.absent),
        t(&tally.torn),
        t(&tally.reassigned),
    );
    assert_eq!(reads, READERS as u64 * READS_PER_READER);
    assert!(t(&tally.found) > reads / 10, "readers found keys");
    assert!(evictions > 10_000, "the writer reused slots ({evictions})");
    assert!(
        t(&tally.reassigned) > 0,
        "no reader caught a slot between its bucket and its row: the race was not exercised"
    );
}
