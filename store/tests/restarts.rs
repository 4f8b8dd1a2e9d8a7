//! A daemon SIGKILLed and restarted from a checkpoint, seen by its clients: the TCP client
//! counts exactly the acknowledged pushes the restore took back, and a shared-memory reader,
//! whose old mapping stays readable (and frozen) after the kill, notices the new incarnation and
//! reads the restored rows, not the dead daemon's.

use std::time::Duration;

use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_transport::{Initializer, OptimizerSpec, ShardTransport, ShmTransport, TableSpec};

mod common;
use common::Daemon;

fn spec() -> TableSpec {
    TableSpec {
        name: "t".into(),
        rows: 64,
        dim: 4,
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::Sgd { lr: 1.0 },
    }
}

fn start(addr: &str, data: &std::path::Path, shm: &std::path::Path) -> Daemon {
    let mut cmd = common::serve_on(addr, &[]);
    cmd.arg("--data-dir").arg(data).arg("--shm-dir").arg(shm);
    Daemon::start(cmd)
}

fn version(t: &dyn ShardTransport, key: u64) -> u64 {
    let (mut versions, mut rows) = (Vec::new(), Vec::new());
    t.pull("t", &[key], &mut versions, &mut rows).unwrap();
    assert_eq!(
        rows[0],
        -(versions[0] as f32),
        "values follow the version (SGD, lr 1)"
    );
    versions[0]
}

#[test]
fn clients_see_a_restart_from_a_checkpoint_and_what_it_took_back() {
    let dir = tempfile::tempdir().unwrap();
    let (data, shm) = (dir.path().join("data"), dir.path().join("shm"));
    std::fs::create_dir_all(&shm).unwrap();
    let first = start("127.0.0.1:0", &data, &shm);
    let addr = first.addr.clone();
    let tcp = TcpShardClient::connect(&addr, ClientConfig::default()).unwrap();
    let reader =
        ShmTransport::new(TcpShardClient::connect(&addr, ClientConfig::default()).unwrap())
            .map_err(|(_, why)| why)
            .unwrap()
            .with_liveness_interval(Duration::from_millis(20));
    tcp.create_table(&spec()).unwrap();
    let before = tcp.incarnation();
    assert_ne!(before, 0);

    let push = |n: usize| {
        for _ in 0..n {
            tcp.push("t", &[5, 6], &[1, 1], &[1.0; 8]).unwrap();
        }
    };
    push(2);
    tcp.checkpoint("c1", false).unwrap();
    push(3);
    assert_eq!(version(&reader, 5), 5, "read through shared memory");
    assert!(reader.read_stats().rows_read > 0, "one-sided, not pulled");

    drop(first); // SIGKILL: its shared-memory files stay, mapped by the reader
    let second = start(&addr, &data, &shm);
    assert!(second.startup.iter().any(|l| l.contains("restored")));

    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(
        version(&reader, 6),
        2,
        "the shared-memory reader reads the restored row, not the dead daemon's"
    );
    assert_ne!(reader.incarnation(), before);
    // The TCP client learns of the restart on its next call (a reconnect and a hello).
    push(1);
    assert_ne!(tcp.incarnation(), before);
    let r = tcp.restarts();
    assert_eq!(r.seen, 1);
    assert_eq!(
        (r.pushes_rolled_back, r.rows_rolled_back, r.pushes_unknown),
        (3, 6, 0),
        "the three pushes after the checkpoint were acknowledged and are gone"
    );
    assert_eq!(version(&tcp, 5), 3, "2 restored + 1 after the restart");
}

/// A shared-memory reader that would not ask the daemon on its own for an hour: the first answer
/// of the restarted daemon is the one to a push carried by a conditional pull. The reader
/// attaches again before it reads, so the rows and the clock it answers with are the restored
/// daemon's, under the incarnation that applied the push, and not the dead daemon's frozen
/// memory.
#[test]
fn a_carried_push_that_reveals_a_restart_is_read_from_the_new_daemon() {
    use hetkv_transport::wire::NOT_CACHED;
    use hetkv_transport::{PushOutcome, PushRef, StaleQuery, StaleRows};
    let dir = tempfile::tempdir().unwrap();
    let (data, shm) = (dir.path().join("data"), dir.path().join("shm"));
    std::fs::create_dir_all(&shm).unwrap();
    let first = start("127.0.0.1:0", &data, &shm);
    let addr = first.addr.clone();
    let tcp = TcpShardClient::connect(&addr, ClientConfig::default()).unwrap();
    let reader =
        ShmTransport::new(TcpShardClient::connect(&addr, ClientConfig::default()).unwrap())
            .map_err(|(_, why)| why)
            .unwrap()
            .with_liveness_interval(Duration::from_secs(3600));
    tcp.create_table(&spec()).unwrap();
    for _ in 0..2 {
        tcp.push("t", &[5, 6], &[1, 1], &[1.0; 8]).unwrap();
    }
    tcp.checkpoint("c1", false).unwrap();
    for _ in 0..3 {
        tcp.push("t", &[5, 6], &[1, 1], &[1.0; 8]).unwrap();
    }
    assert_eq!(
        version(&reader, 6),
        5,
        "attached, read through shared memory"
    );
    let old = reader.incarnation();

    drop(first); // SIGKILL: its files stay mapped by the reader, frozen at versions 5
    let second = start(&addr, &data, &shm);
    assert!(second.startup.iter().any(|l| l.contains("restored")));

    let (keys, clocks) = ([5u64, 6], [NOT_CACHED; 2]);
    let grads = [1.0f32; 4];
    let q = StaleQuery {
        table: "t",
        keys: &keys,
        clocks: &clocks,
        bound: 0,
        since: None,
        push: Some(PushRef::new(&[5], &[1], &grads)),
        state_keys: 0,
    };
    let mut out = StaleRows::default();
    let c = reader.pull_if_stale(&q, &mut out);
    let PushOutcome::Applied(ack) = c.push else {
        panic!("the push was not applied: {:?}", c.push)
    };
    c.read.unwrap();
    assert_ne!(
        ack.incarnation, old,
        "the push's answer is the new daemon's"
    );
    assert_eq!(
        out.incarnation, ack.incarnation,
        "rows of the incarnation that applied the push"
    );
    assert_eq!(
        out.versions,
        [3, 2],
        "the restored rows (2, and 1 pushed to key 5), not the dead daemon's 5"
    );
    assert_eq!(out.table_clock, 5, "the restored clock (4) and the push");
    assert!(reader.read_stats().rows_read >= 3, "read one-sidedly");
}
