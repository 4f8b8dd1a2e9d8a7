//! Real kills: a daemon on a data directory takes pushes and checkpoints (full and incremental)
//! and is SIGKILLed at random moments, twenty times, most of them while a checkpoint is being
//! written. After every restart the state it serves is exactly one complete checkpoint (values,
//! versions and optimizer state; a dynamic table's keys in their slots, restored from a chain
//! whose keys changed slots): the last one acknowledged to the client, or a later one that
//! committed before the kill, never a mix.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_store::checkpoint::CheckpointDir;
use hetkv_transport::{
    Admission, DynamicSpec, Eviction, Initializer, OptimizerSpec, ShardTransport, TableSpec,
};

mod common;
use common::{serve, Daemon};

/// A daemon on `data_dir`, and the checkpoint it restored (from its log).
fn start(data_dir: &Path) -> (Daemon, Option<String>) {
    let mut cmd = serve(&[]);
    cmd.arg("--data-dir").arg(data_dir);
    let d = Daemon::start(cmd);
    let restored = d.logged("restored", "checkpoint");
    (d, restored)
}

fn table(name: &str, optimizer: OptimizerSpec) -> TableSpec {
    TableSpec {
        name: name.into(),
        rows: 20_000,
        dim: 8,
        init: Initializer::Zeros,
        optimizer,
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    }
}

/// The records (bytes) the chain of checkpoint `name` restores, per table, in index order.
fn records(dir: &CheckpointDir, name: &str) -> Vec<Vec<Vec<u8>>> {
    let chain = dir.chain(name).unwrap();
    let last = chain.last().unwrap().clone();
    last.tables
        .iter()
        .map(|t| {
            let mut rows: Vec<Vec<u8>> = Vec::new();
            dir.read_table(&chain, &t.name, (0, 1), |h, rec| {
                if rows.is_empty() {
                    rows = vec![Vec::new(); h.local_rows as usize];
                }
                rows[rec.index() as usize] = rec.bytes().to_vec();
                Ok(())
            })
            .unwrap();
            rows
        })
        .collect()
}

#[test]
fn a_daemon_killed_at_random_moments_restores_one_whole_checkpoint_every_time() {
    let data = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::at(data.path());
    let sgd = table("sgd", OptimizerSpec::Sgd { lr: 1.0 });
    let adam = table(
        "adam",
        OptimizerSpec::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
    );
    // A dynamic table of 4,096 slots (64 placement buckets of 2 region buckets) taking keys from
    // 20,000 raw ids: evicting throughout, and keys admitted again into other slots.
    let raw = TableSpec {
        buckets: 64,
        rows: 4096,
        dynamic: Some(DynamicSpec {
            admission: Admission::Always,
            eviction: Eviction::Lru,
        }),
        ..table("raw", OptimizerSpec::Sgd { lr: 1.0 })
    };
    let mut acked: Option<(String, u64)> = None;
    let mut mid_checkpoint = 0;
    let mut seed = 0x5eed_u64;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 33
    };
    for round in 0..20 {
        let (d, restored) = start(data.path());
        // The state served is one whole checkpoint: the last acknowledged or a later one.
        match (&acked, &restored) {
            (None, _) => {}
            (Some((name, seq)), None) => {
                panic!("round {round}: checkpoint {name} (seq {seq}) was acknowledged, nothing was restored")
            }
            (Some((name, seq)), Some(restored)) => {
                let m = dir.manifest(restored).unwrap();
                assert!(
                    m.seq >= *seq,
                    "round {round}: restored {restored} (seq {}), older than the acknowledged {name} (seq {seq})",
                    m.seq
                );
            }
        }
        // A short deadline: the calls in flight at the kill fail soon instead of waiting for a
        // daemon that is gone.
        let config = ClientConfig {
            io_timeout: Some(Duration::from_secs(30)),
            deadline: Duration::from_secs(1),
            ..ClientConfig::default()
        };
        let client = Arc::new(TcpShardClient::connect(&d.addr, config).unwrap());
        client.create_table(&sgd).unwrap();
        client.create_table(&adam).unwrap();
        client.create_table(&raw).unwrap();
        if let Some(restored) = &restored {
            // What it serves, optimizer state included, written out again and compared.
            let check = format!("check-{round}");
            client.checkpoint(&check, false).unwrap();
            assert_eq!(
                records(&dir, &check),
                records(&dir, restored),
                "round {round}: the restored state is checkpoint {restored}, bit for bit"
            );
            // Each record is of one moment: SGD (lr 1, gradient -1, from zeros) values equal
            // versions, a dynamic row's since its key's admission, and Adam's steps equal versions
            // (every push has count 1).
            for (t, rows) in ["sgd", "adam", "raw"].iter().zip(records(&dir, &check)) {
                for r in rows.iter().filter(|r| !r.is_empty()) {
                    let version = u64::from_le_bytes(r[8..16].try_into().unwrap());
                    if *t != "adam" {
                        let x = f32::from_le_bytes(r[16..20].try_into().unwrap());
                        assert_eq!(x, version as f32);
                    } else {
                        let step = u64::from_le_bytes(r[r.len() - 8..].try_into().unwrap());
                        assert_eq!(step, version);
                    }
                }
            }
            acked = Some((check.clone(), dir.manifest(&check).unwrap().seq));
        }
        // Pushes and checkpoints, until the kill.
        let stop = Arc::new(AtomicBool::new(false));
        let in_checkpoint = Arc::new(AtomicBool::new(false));
        let last_acked = Arc::new(Mutex::new(acked.clone()));
        let pushes = Arc::new(AtomicU64::new(0));
        let pusher = {
            let (client, stop, pushes) = (client.clone(), stop.clone(), pushes.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let keys: Vec<u64> = (0..64).map(|j| (n * 64 + j * 313) % 20_000).collect();
                    let raw_keys: Vec<u64> = keys
                        .iter()
                        .map(|&k| hetkv_transport::hash::splitmix64(k))
                        .collect();
                    let counts = vec![1u32; keys.len()];
                    let ok = client
                        .push("sgd", &keys, &counts, &vec![-1.0; keys.len() * 8])
                        .and_then(|_| {
                            client.push("adam", &keys, &counts, &vec![0.5; keys.len() * 8])
                        })
                        .and_then(|_| {
                            client.push("raw", &raw_keys, &counts, &vec![-1.0; keys.len() * 8])
                        });
                    if ok.is_err() {
                        break;
                    }
                    pushes.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            })
        };
        let checkpointer = {
            let (client, stop, in_checkpoint, last_acked) = (
                client.clone(),
                stop.clone(),
                in_checkpoint.clone(),
                last_acked.clone(),
            );
            std::thread::spawn(move || {
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("r{round}-{k}");
                    in_checkpoint.store(true, Ordering::SeqCst);
                    let r = client.checkpoint(&name, k % 3 != 0);
                    in_checkpoint.store(false, Ordering::SeqCst);
                    match r {
                        Ok(done) => *last_acked.lock().unwrap() = Some((name, done.seq)),
                        Err(_) => break,
                    }
                    k += 1;
                }
            })
        };
        std::thread::sleep(Duration::from_millis(50 + rand() % 400));
        let during = in_checkpoint.load(Ordering::SeqCst);
        let mut d = d;
        d.child.kill().unwrap();
        d.child.wait().unwrap();
        drop(d);
        mid_checkpoint += during as usize;
        stop.store(true, Ordering::Relaxed);
        pusher.join().unwrap();
        checkpointer.join().unwrap();
        acked = last_acked.lock().unwrap().clone();
        assert!(pushes.load(Ordering::Relaxed) > 0, "round {round} pushed");
    }
    assert!(
        mid_checkpoint >= 5,
        "only {mid_checkpoint} of 20 kills landed while a checkpoint was being written"
    );
    // The dynamic table rode incremental checkpoints (the slots written since the parent).
    let incremental_raw = dir
        .list()
        .unwrap()
        .into_iter()
        .filter_map(|l| match l {
            hetkv_store::checkpoint::Listing::Committed(m) => Some(m),
            _ => None,
        })
        .flat_map(|m| m.tables)
        .filter(|t| t.name == "raw" && t.kind.name() == "incremental" && t.rows > 0)
        .count();
    assert!(
        incremental_raw > 0,
        "no incremental file of the dynamic table"
    );
}
