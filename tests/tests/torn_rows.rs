//! Writers fill rows with one value per write while readers copy them through the verifying
//! reader: a torn row (two different values, or a value that does not belong to its version)
//! must never be accepted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use hetkv_transport::row::{self, RowLayout};
use hetkv_transport::Region;

const ROWS: u64 = 8;
const WRITERS: u64 = 2; // each owns ROWS / WRITERS rows: one writer per row, as the codec requires
const READERS: usize = 3;
const READS: u64 = 1_000_000;

/// The single value every element of `row` holds at `version`.
fn value(row: u64, version: u64) -> f32 {
    (row * 1_000_003 + version) as f32
}

#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    retried_reads: AtomicU64,
    torn_copies: AtomicU64,
    torn_with_even_seq: AtomicU64,
}

#[test]
fn verifying_reader_never_accepts_a_torn_row() {
    for dim in [1u32, 16, 128] {
        run(dim);
    }
}

fn run(dim: u32) {
    let layout = RowLayout::new(dim);
    let region = Arc::new(Region::anonymous(layout.region_bytes(ROWS)).unwrap());
    let mut image = vec![0u8; layout.stride()];
    for r in 0..ROWS {
        row::encode_image(&layout, 0, &vec![value(r, 0); dim as usize], &mut image);
        row::write_row(region.words(), &layout, r, &image);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());

    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let (region, stop) = (region.clone(), stop.clone());
            s.spawn(move || {
                let mut image = vec![0u8; layout.stride()];
                let mut payload = vec![0f32; layout.dim()];
                let mut version = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    version += 1;
                    for r in (w..ROWS).step_by(WRITERS as usize) {
                        payload.fill(value(r, version));
                        row::encode_image(&layout, version, &payload, &mut image);
                        row::write_row(region.words(), &layout, r, &image);
                    }
                }
            });
        }
        let readers: Vec<_> = (0..READERS)
            .map(|t| {
                let (region, counts) = (region.clone(), counts.clone());
                s.spawn(move || {
                    let mut image = vec![0u8; layout.stride()];
                    let mut out = vec![0f32; layout.dim()];
                    let mut i = t as u64;
                    while counts.reads.load(Ordering::Relaxed) < READS {
                        i = i
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let r = (i >> 33) % ROWS;
                        // The NIC's view: copy, then verify; retry on a torn copy.
                        let mut retried = false;
                        let version = loop {
                            row::copy_row(region.words(), &layout, r, &mut image);
                            match row::verify_image(&layout, &image) {
                                Ok(v) => break v,
                                Err(e) => {
                                    retried = true;
                                    counts.torn_copies.fetch_add(1, Ordering::Relaxed);
                                    if matches!(e, row::RowError::Checksum { .. }) {
                                        counts.torn_with_even_seq.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                        };
                        row::decode_payload(&layout, &image, &mut out);
                        let want = value(r, version);
                        assert!(
                            out.iter().all(|&v| v == want),
                            "accepted a torn row {r} at version {version}: {out:?}"
                        );
                        counts.reads.fetch_add(1, Ordering::Relaxed);
                        if retried {
                            counts.retried_reads.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });

    let c = &counts;
    let reads = c.reads.load(Ordering::Relaxed);
    println!(
        "dim {dim}: {reads} verified reads, {} retried ({} torn copies discarded, {} of them with an even seq caught only by the CRC)",
        c.retried_reads.load(Ordering::Relaxed),
        c.torn_copies.load(Ordering::Relaxed),
        c.torn_with_even_seq.load(Ordering::Relaxed),
    );
    assert!(reads >= READS);
}

#[test]
fn a_row_assembled_from_two_versions_is_refused() {
    // What a NIC fetching cache lines out of order can return: the head of version 2 and the tail
    // of version 3, with an even seq. Deterministic, so the refusal does not depend on timing.
    let layout = RowLayout::new(64);
    let mut v2 = vec![0u8; layout.stride()];
    let mut v3 = vec![0u8; layout.stride()];
    row::encode_image(&layout, 2, &[2.0; 64], &mut v2);
    row::encode_image(&layout, 3, &[3.0; 64], &mut v3);
    for cut in (8..layout.stride()).step_by(8) {
        let mut mixed = v2[..cut].to_vec();
        mixed.extend_from_slice(&v3[cut..]);
        assert!(
            row::verify_image(&layout, &mixed).is_err(),
            "cut at {cut} accepted"
        );
        let mut mixed = v3[..cut].to_vec();
        mixed.extend_from_slice(&v2[cut..]);
        assert!(
            row::verify_image(&layout, &mixed).is_err(),
            "cut at {cut} accepted"
        );
    }
}
