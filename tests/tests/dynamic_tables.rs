//! Dynamic tables through daemons and the client, over TCP: raw u64 feature ids (0, `u64::MAX`,
//! ids with the top bit set, as torch's int64 carries them) placed on shards by their hashed
//! bucket, rows created on first admission and stepped by the table's optimizer exactly, the cap
//! holding under a flood of never-seen ids while another client is served, admission by threshold
//! counted in the push's answer, their regions described for one-sided readers, and the
//! operations dynamic tables do not offer yet refused by name.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hetkv_client::Cluster;
use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_store::EmbeddedCluster;
use hetkv_transport::{
    Admission, DynamicSpec, Eviction, Initializer, Optimizer, OptimizerSpec, ShardTransport,
    TableSpec,
};

const DIM: usize = 4;

fn dynamic(name: &str, rows: u64, admission: Admission) -> TableSpec {
    TableSpec {
        name: name.into(),
        rows,
        dim: DIM as u32,
        init: Initializer::Normal { std: 0.1, seed: 7 },
        optimizer: OptimizerSpec::adagrad(0.1),
        buckets: 64,
        dynamic: Some(DynamicSpec {
            admission,
            eviction: Eviction::Lru,
        }),
    }
}

/// Raw ids of every shape a CTR log carries.
fn raw_ids() -> Vec<u64> {
    let mut ids = vec![0, 1, u64::MAX, 1 << 63, (-6973240437940254719i64) as u64];
    ids.extend((0..200u64).map(|i| hetkv_transport::hash::splitmix64(i + 17)));
    ids
}

#[test]
fn raw_ids_are_created_on_first_push_and_stepped_exactly() {
    let cluster = EmbeddedCluster::start(3).unwrap();
    let client = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let spec = dynamic("ids", 100_000, Admission::Always);
    let table = client.create_table(&spec).unwrap();
    // Every shard holds its buckets' share of the capacity.
    let opened = client.open_table("ids").unwrap();
    assert_eq!(opened.spec(), &spec);

    let ids = raw_ids();
    let (mut rows, mut versions) = (vec![0f32; ids.len() * DIM], vec![9u64; ids.len()]);
    table.pull(&ids, &mut rows, Some(&mut versions)).unwrap();
    let mut init = vec![0f32; DIM];
    for (j, &k) in ids.iter().enumerate() {
        spec.init.fill(k, &mut init);
        assert_eq!(&rows[j * DIM..(j + 1) * DIM], &init[..], "key {k}");
        assert_eq!(versions[j], 0, "key {k} not held yet");
    }

    // Two pushes: the second steps the row the first created, with its accumulator.
    let grads: Vec<f32> = (0..ids.len() * DIM)
        .map(|i| (i % 7) as f32 * 0.1 - 0.3)
        .collect();
    let counts = vec![2u32; ids.len()];
    assert_eq!(
        table.push(&ids, &counts, &grads).unwrap(),
        2 * ids.len() as u64
    );
    assert_eq!(
        table.push(&ids, &counts, &grads).unwrap(),
        2 * ids.len() as u64
    );
    table.pull(&ids, &mut rows, Some(&mut versions)).unwrap();
    let opt = Optimizer::new(spec.optimizer);
    for (j, &k) in ids.iter().enumerate() {
        let mut want = vec![0f32; DIM];
        spec.init.fill(k, &mut want);
        let (mut state, mut step) = (vec![0f32; opt.state_len(DIM)], 0u64);
        opt.init_state(&mut state);
        for _ in 0..2 {
            opt.apply(
                &mut want,
                &grads[j * DIM..(j + 1) * DIM],
                &mut state,
                &mut step,
            );
        }
        assert_eq!(&rows[j * DIM..(j + 1) * DIM], &want[..], "key {k}");
        assert_eq!(versions[j], 4, "key {k}");
    }

    // Keys are spread over all three shards, and a shard refuses another shard's key by name.
    let routing = table.routing();
    let homes: std::collections::BTreeSet<usize> =
        ids.iter().map(|&k| routing.shard_of(k)).collect();
    assert_eq!(homes.len(), 3);
    let k = ids[0];
    let wrong = (routing.shard_of(k) + 1) % 3;
    let direct = TcpShardClient::connect(&cluster.addrs()[wrong], ClientConfig::default()).unwrap();
    let err = direct
        .pull("ids", &[k], &mut Vec::new(), &mut Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("lives on shard {}", routing.shard_of(k))),
        "{err}"
    );
}

#[test]
fn the_cap_holds_under_a_flood_of_new_ids_while_another_client_is_served() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let client = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let cap = 4_000u64;
    let table = client
        .create_table(&dynamic("flood", cap, Admission::Always))
        .unwrap();
    let fixed = client
        .create_table(&TableSpec {
            name: "fixed".into(),
            rows: 1000,
            dim: DIM as u32,
            init: Initializer::Zeros,
            optimizer: OptimizerSpec::sgd(0.1),
            buckets: hetkv_transport::DEFAULT_BUCKETS,
            dynamic: None,
        })
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (fixed, stop) = (fixed.clone(), stop.clone());
        std::thread::spawn(move || {
            let keys: Vec<u64> = (0..1000).step_by(3).collect();
            let mut out = vec![0f32; keys.len() * DIM];
            let mut served = 0u64;
            while !stop.load(Ordering::Relaxed) || served == 0 {
                fixed.pull(&keys, &mut out, None).unwrap();
                served += 1;
            }
            served
        })
    };
    // 200,000 ids never seen before, 50 times the cap, in batches of 2,000.
    let grads = vec![0.01f32; 2000 * DIM];
    let counts = vec![1u32; 2000];
    for batch in 0..100u64 {
        let ids: Vec<u64> = (0..2000u64)
            .map(|i| hetkv_transport::hash::splitmix64(batch * 2000 + i))
            .collect();
        assert_eq!(table.push(&ids, &counts, &grads).unwrap(), 2000);
    }
    stop.store(true, Ordering::Relaxed);
    assert!(other.join().unwrap() > 0);
    // Each shard's eviction stream, followed from its start in pages: it fell behind the log's
    // 65,536 entries once, then names every later eviction once; lost plus read is every
    // eviction, and every key read was one of the flood's.
    let routing = table.routing();
    let mut pushed = [0u64; 2];
    let flood: std::collections::HashSet<u64> = (0..200_000u64)
        .map(hetkv_transport::hash::splitmix64)
        .inspect(|&k| pushed[routing.shard_of(k)] += 1)
        .collect();
    let mut held = 0;
    for (s, &pushed) in pushed.iter().enumerate() {
        let stats = client.shard(s).stats().unwrap();
        let t = stats.tables.iter().find(|t| t.name == "flood").unwrap();
        let info = client
            .shard(s)
            .list_tables()
            .unwrap()
            .into_iter()
            .find(|t| t.spec.name == "flood")
            .unwrap();
        assert!(
            t.local_rows <= info.local_rows,
            "{} held, cap {}",
            t.local_rows,
            info.local_rows
        );
        assert!(
            info.local_rows < cap,
            "a shard's share: {}",
            info.local_rows
        );
        assert_eq!(t.updates, t.rows_pushed);
        held += t.local_rows;
        let (mut cursor, mut lost, mut read) = (0u64, 0u64, 0u64);
        loop {
            let page = table.evictions(s, cursor, 10_000).unwrap();
            assert_eq!(page.next, page.first + page.events.len() as u64);
            assert!(page
                .events
                .iter()
                .all(|e| flood.contains(&e.key) && e.version == 1));
            lost += page.lost;
            read += page.events.len() as u64;
            if page.events.is_empty() {
                break;
            }
            cursor = page.next;
        }
        assert!(lost > 0, "shard {s}: the log holds the last 65,536");
        assert_eq!(
            lost + read,
            pushed - t.local_rows,
            "shard {s}: every eviction once"
        );
        let err = table.evictions(s, cursor + 1, 10).unwrap_err().to_string();
        assert!(err.contains("past the stream's end"), "{err}");
    }
    // The buckets fill: nearly the whole cap is held, never more than the shards' capacities.
    assert!(held > cap * 9 / 10, "{held} rows held of a cap of {cap}");
}

/// The `embeddings` tensor of an export, as f32.
fn embeddings(file: &safetensors::SafeTensors<'_>) -> Vec<f32> {
    file.tensor("embeddings")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn an_export_holds_every_held_key_beside_its_row_and_the_bucket_map() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = EmbeddedCluster::start(3).unwrap();
    let client = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    // A cap well above what is pushed: every pushed key is held.
    let table = client
        .create_table(&dynamic("e", 30_000, Admission::Always))
        .unwrap();
    let ids = raw_ids();
    let grads: Vec<f32> = (0..ids.len() * DIM).map(|i| i as f32 * 1e-3).collect();
    table.push(&ids, &vec![3; ids.len()], &grads).unwrap();
    let transports: Vec<Arc<dyn ShardTransport>> =
        (0..3).map(|s| client.shard(s).clone()).collect();
    let shards: Vec<&dyn ShardTransport> = transports.iter().map(|t| t.as_ref()).collect();
    let path = dir.path().join("e.safetensors");
    let done = hetkv_store::tensors::export_table(&shards, "e", None, &path).unwrap();
    assert_eq!(done.rows, ids.len() as u64);
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let u64s = |name: &str| -> Vec<u64> {
        file.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (keys, versions) = (u64s("keys"), u64s("versions"));
    let values = embeddings(&file);
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    let mut want = ids.clone();
    want.sort_unstable();
    assert_eq!(sorted, want, "every held key once");
    assert!(versions.iter().all(|&v| v == 3));
    let mut pulled = vec![0f32; keys.len() * DIM];
    table.pull(&keys, &mut pulled, None).unwrap();
    assert_eq!(values, pulled, "each key beside its own row");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["buckets"], "64");
    assert_eq!(meta["shards"], "3");
    assert_eq!(meta["dynamic"], "true");

    // Named keys, one never pushed: it is exported as its initial value at version 0.
    let named = dir.path().join("named.safetensors");
    let unseen = 0xDEAD_BEEF_u64;
    hetkv_store::tensors::export_table(&shards, "e", Some(&[ids[3], unseen]), &named).unwrap();
    let bytes2 = std::fs::read(&named).unwrap();
    let file2 = safetensors::SafeTensors::deserialize(&bytes2).unwrap();
    let rows2 = embeddings(&file2);
    let mut init = vec![0f32; DIM];
    table.spec().init.fill(unseen, &mut init);
    assert_eq!(&rows2[DIM..], &init[..]);
    let mut held_row = vec![0f32; DIM];
    table.pull(&[ids[3]], &mut held_row, None).unwrap();
    assert_eq!(&rows2[..DIM], &held_row[..]);
    // Imported into another dynamic table (a threshold it need not meet: an import admits),
    // every key holds its exported row, one update in, with a fresh optimizer state.
    let copy = client
        .create_table(&dynamic("copy", 30_000, Admission::Threshold { count: 9 }))
        .unwrap();
    let done = hetkv_store::tensors::import_table(&shards, "copy", &path, "embeddings").unwrap();
    assert_eq!(done.rows, ids.len() as u64);
    let mut got = vec![0f32; keys.len() * DIM];
    let mut got_versions = vec![0u64; keys.len()];
    copy.pull(&keys, &mut got, Some(&mut got_versions)).unwrap();
    assert_eq!(got, values);
    assert!(got_versions.iter().all(|&v| v == 1));
    // Its next push steps from the imported value with a fresh accumulator.
    let g = vec![0.5f32; DIM];
    copy.push(&keys[..1], &[1], &g).unwrap();
    copy.pull(&keys[..1], &mut got[..DIM], None).unwrap();
    let opt = Optimizer::new(copy.spec().optimizer);
    let (mut want, mut state, mut step) = (values[..DIM].to_vec(), vec![0f32; DIM], 0u64);
    opt.init_state(&mut state);
    opt.apply(&mut want, &g, &mut state, &mut step);
    assert_eq!(&got[..DIM], &want[..]);
    // An assignment of a NaN sets nothing.
    let err = copy
        .assign(&keys[..1], &[f32::NAN; DIM])
        .unwrap_err()
        .to_string();
    assert!(err.contains("NaN"), "{err}");
}

#[test]
fn a_threshold_admits_on_the_counted_update_and_the_answer_counts_what_it_dropped() {
    let cluster = EmbeddedCluster::start(1).unwrap();
    let shard = TcpShardClient::connect(&cluster.addrs()[0], ClientConfig::default()).unwrap();
    let spec = dynamic("thr", 1000, Admission::Threshold { count: 3 });
    shard.create_table(&spec).unwrap();
    let g = vec![0.5f32; DIM];
    let key = u64::MAX - 3;
    let first = shard.push("thr", &[key], &[2], &g).unwrap();
    assert_eq!((first.updates, first.refused, first.rows), (0, 2, 1));
    let (mut v, mut rows) = (Vec::new(), Vec::new());
    shard.pull("thr", &[key], &mut v, &mut rows).unwrap();
    // Not admitted: the shard answers version 0 with zeros, and the client library fills in
    // the key's initial value (raw_ids_are_created_on_first_push_and_stepped_exactly).
    assert_eq!((v.as_slice(), rows.as_slice()), (&[0][..], &[0.0; DIM][..]));
    let second = shard.push("thr", &[key], &[1], &g).unwrap();
    assert_eq!((second.updates, second.refused, second.rows), (1, 0, 1));
    shard.pull("thr", &[key], &mut v, &mut rows).unwrap();
    assert_eq!(v, [1]);
}

/// Through the client over two shards: the push's report names every key refused admission,
/// with the updates dropped, in the push's order whichever shard refused it.
#[test]
fn a_push_report_names_the_keys_refused_in_push_order() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let client = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let table = client
        .create_table(&dynamic("named", 1000, Admission::Threshold { count: 2 }))
        .unwrap();
    let ids = raw_ids();
    let g = |n: usize| vec![0.25f32; n * DIM];
    // Every other id is counted once first: those reach the threshold below, the rest do not.
    let counted: Vec<u64> = ids.iter().copied().step_by(2).collect();
    let first = table
        .push_report(&counted, &vec![1; counted.len()], &g(counted.len()))
        .unwrap();
    assert_eq!(first.applied, 0);
    let want: Vec<(u64, u32)> = counted.iter().map(|&k| (k, 1)).collect();
    assert_eq!(
        first.refused, want,
        "the first push refuses every key it names"
    );
    let report = table
        .push_report(&ids, &vec![1; ids.len()], &g(ids.len()))
        .unwrap();
    let want: Vec<(u64, u32)> = ids.iter().skip(1).step_by(2).map(|&k| (k, 1)).collect();
    assert_eq!(
        report.refused, want,
        "the keys seen once are refused, in push order"
    );
    assert_eq!(report.applied, counted.len() as u64);
    assert!(ids.iter().any(|&k| table.routing().shard_of(k) == 0));
    assert!(ids.iter().any(|&k| table.routing().shard_of(k) == 1));
}

#[test]
fn what_dynamic_tables_do_not_offer_yet_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = EmbeddedCluster::start_with(1, Default::default(), |i| {
        let mut c = hetkv_store::ShardConfig::new(i, 1);
        c.data_dir = Some(dir.path().join("d"));
        c
    })
    .unwrap();
    let client = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    client
        .create_table(&dynamic("d", 1000, Admission::Always))
        .unwrap();
    // The region is described for one-sided readers, as keyed (buckets, then keyed rows).
    let desc = client.shard(0).region_info("d").unwrap();
    assert!(desc.keyed, "{desc:?}");
    assert_eq!(
        desc.check_keyed_layout(0, 1).unwrap().unwrap().capacity(),
        desc.rows
    );
    // Checkpoints take dynamic tables (store/tests/dynamic_checkpoints.rs has the rest).
    client.checkpoint("c", false).unwrap();
    let fixed = client
        .create_table(&TableSpec {
            dynamic: None,
            ..dynamic("f", 1000, Admission::Always)
        })
        .unwrap();
    let err = fixed.evictions(0, 0, 10).unwrap_err().to_string();
    assert!(err.contains("evicts nothing"), "{err}");
    // A fixed table of the same name is a conflict, not a second table.
    let err = client
        .create_table(&TableSpec {
            dynamic: None,
            ..dynamic("d", 1000, Admission::Always)
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("exists"), "{err}");
    // Invalid admission rules are refused before anything is made.
    let err = client
        .create_table(&dynamic(
            "p",
            1000,
            Admission::Probability { p: 1.5, seed: 1 },
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("probability"), "{err}");
}

/// Through the client, as a trainer on the daemons' host reads them: one-sidedly (the transport
/// conformance suite, `conformance.rs`, has the reader's own cases and counters).
#[test]
fn shared_memory_clients_read_dynamic_tables() {
    let dir = tempfile::tempdir().unwrap();
    let shm = dir.path().to_path_buf();
    let cluster = EmbeddedCluster::start_with(2, Default::default(), |i| {
        let mut c = hetkv_store::ShardConfig::new(i, 2);
        c.shm_dir = Some(shm.clone());
        c
    })
    .unwrap();
    let client = Cluster::connect(
        cluster.addrs(),
        hetkv_client::TransportKind::Shm,
        &ClientConfig::default(),
    )
    .unwrap();
    let spec = dynamic("shm", 1000, Admission::Always);
    let table = client.create_table(&spec).unwrap();
    let ids = raw_ids();
    table
        .push(&ids, &vec![1; ids.len()], &vec![0.25; ids.len() * DIM])
        .unwrap();
    let (mut rows, mut versions) = (vec![0f32; ids.len() * DIM], vec![0u64; ids.len()]);
    table.pull(&ids, &mut rows, Some(&mut versions)).unwrap();
    assert!(versions.iter().all(|&v| v == 1), "{versions:?}");
}
