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
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    }
}

/// A daemon serving table `t` from a data dir and a shared-memory root in a temporary directory,
/// killed and restored on the same address when asked, and a TCP client of it.
struct Restartable {
    dir: tempfile::TempDir,
    args: &'static [&'static str],
    daemon: Daemon,
    addr: String,
    tcp: TcpShardClient,
}

impl Restartable {
    /// `hetkv serve` with `args`, and table `t` created.
    fn start(args: &'static [&'static str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("shm")).unwrap();
        let daemon = Self::serve(dir.path(), "127.0.0.1:0", args);
        let addr = daemon.addr.clone();
        let tcp = TcpShardClient::connect(&addr, ClientConfig::default()).unwrap();
        tcp.create_table(&spec()).unwrap();
        Self {
            dir,
            args,
            daemon,
            addr,
            tcp,
        }
    }

    fn serve(dir: &std::path::Path, addr: &str, args: &[&str]) -> Daemon {
        let mut cmd = common::serve_on(addr, args);
        cmd.arg("--data-dir").arg(dir.join("data"));
        cmd.arg("--shm-dir").arg(dir.join("shm"));
        Daemon::start(cmd)
    }

    /// Another client of the daemon.
    fn client(&self) -> TcpShardClient {
        TcpShardClient::connect(&self.addr, ClientConfig::default()).unwrap()
    }

    /// `n` pushes of 1 to keys 5 and 6 (SGD, lr 1: each takes the rows down by 1).
    fn push(&self, n: usize) {
        for _ in 0..n {
            self.tcp.push("t", &[5, 6], &[1, 1], &[1.0; 8]).unwrap();
        }
    }

    /// Two pushes, checkpoint `c1`, three more: the rows are at version 5, the checkpoint's at 2.
    fn push_past_a_checkpoint(&self) {
        self.push(2);
        self.tcp.checkpoint("c1", false).unwrap();
        self.push(3);
    }

    /// SIGKILLs the daemon (its shared-memory files stay, mapped and frozen for their readers)
    /// and starts another on the same address, which restores the checkpoint.
    fn kill_and_restore(&mut self) {
        let next = {
            let _ = self.daemon.child.kill();
            let _ = self.daemon.child.wait();
            Self::serve(self.dir.path(), &self.addr, self.args)
        };
        self.daemon = next;
        assert!(self.daemon.startup.iter().any(|l| l.contains("restored")));
    }
}

impl Restartable {
    /// Stops the daemon with SIGTERM (a clean stop, which must succeed) and starts another on
    /// the same address, which restores the newest checkpoint.
    fn stop_and_restart(&mut self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.daemon.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        assert!(self.daemon.child.wait().unwrap().success(), "a clean stop");
        self.daemon = Self::serve(self.dir.path(), &self.addr, self.args);
        assert!(self.daemon.startup.iter().any(|l| l.contains("restored")));
    }
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
    let mut d = Restartable::start(&[]);
    let reader = ShmTransport::new(d.client())
        .map_err(|(_, why)| why)
        .unwrap()
        .with_liveness_interval(Duration::from_millis(20));
    let before = d.tcp.incarnation();
    assert_ne!(before, 0);

    d.push_past_a_checkpoint();
    assert_eq!(version(&reader, 5), 5, "read through shared memory");
    assert!(reader.read_stats().rows_read > 0, "one-sided, not pulled");

    d.kill_and_restore();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(
        version(&reader, 6),
        2,
        "the shared-memory reader reads the restored row, not the dead daemon's"
    );
    assert_ne!(reader.incarnation(), before);
    // The TCP client learns of the restart on its next call (a reconnect and a hello).
    d.push(1);
    let tcp = &d.tcp;
    assert_ne!(tcp.incarnation(), before);
    let r = tcp.restarts();
    assert_eq!(r.seen, 1);
    assert_eq!(
        (r.pushes_rolled_back, r.rows_rolled_back, r.pushes_unknown),
        (3, 6, 0),
        "the three pushes after the checkpoint were acknowledged and are gone"
    );
    assert_eq!(version(tcp, 5), 3, "2 restored + 1 after the restart");
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
    let mut d = Restartable::start(&[]);
    let reader = ShmTransport::new(d.client())
        .map_err(|(_, why)| why)
        .unwrap()
        .with_liveness_interval(Duration::from_secs(3600));
    d.push_past_a_checkpoint();
    assert_eq!(
        version(&reader, 6),
        5,
        "attached, read through shared memory"
    );
    let old = reader.incarnation();

    d.kill_and_restore(); // the reader's mapping stays, frozen at versions 5

    let (keys, clocks) = ([5u64, 6], [NOT_CACHED; 2]);
    let grads = [1.0f32; 4];
    let q = StaleQuery {
        table: "t",
        keys: &keys,
        clocks: &clocks,
        births: None,
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

/// Shared memory in which every copy of one row tears, so the verifying reader reads that row
/// with the `pull` RPC (its fallback) while it reads the others from memory.
struct TearingOneRow {
    inner: hetkv_transport::ShmMemory,
    offset: u64,
}

impl hetkv_transport::RemoteMemory for TearingOneRow {
    type Region = <hetkv_transport::ShmMemory as hetkv_transport::RemoteMemory>::Region;

    fn attach(
        &self,
        desc: &hetkv_transport::RegionDescriptor,
    ) -> Result<hetkv_transport::onesided::Attachment<Self::Region>, String> {
        self.inner.attach(desc)
    }

    fn read(
        &self,
        spans: &[hetkv_transport::onesided::RemoteSpan<'_, Self::Region>],
        each: &mut dyn FnMut(usize, &[u8]),
    ) -> std::io::Result<()> {
        self.inner.read(spans, &mut |i, bytes| {
            if spans[i].offset == self.offset && bytes.len() > 8 {
                let mut torn = bytes.to_vec();
                torn[8] ^= 0xff; // a payload byte: the checksum no longer matches
                each(i, &torn)
            } else {
                each(i, bytes)
            }
        })
    }
}

/// A one-sided pull whose torn row is read with the `pull` RPC, right after a SIGKILL and a
/// restore that the reader has not noticed (it would not ask the daemon on its own for an
/// hour): the fallback's answer is the new daemon's, the other rows the dead daemon's frozen
/// memory. The reader notices from the fallback's incarnation, attaches again and reads again,
/// so every row and the clock are of the restored daemon, and the answer says which
/// incarnation they are of.
#[test]
fn a_torn_row_read_from_a_restarted_daemon_makes_the_reader_attach_again() {
    use hetkv_transport::{OneSidedTransport, RowLayout, ShmMemory};
    let mut d = Restartable::start(&[]);
    let control = d.client();
    let memory = TearingOneRow {
        inner: ShmMemory::of(&control).unwrap(),
        // One shard: key 6 is local row 6.
        offset: RowLayout::new(spec().dim).row_offset(6),
    };
    let reader = OneSidedTransport::with_memory(memory, control)
        .with_liveness_interval(Duration::from_secs(3600));
    d.push_past_a_checkpoint();
    let (mut versions, mut rows) = (Vec::new(), Vec::new());
    let before = reader.pull("t", &[5, 6], &mut versions, &mut rows).unwrap();
    assert_eq!(versions, [5, 5]);
    let stats = reader.read_stats();
    assert!(
        stats.rows_read >= 1 && stats.fallback_rows >= 1,
        "key 5 read from memory, key 6 pulled: {stats:?}"
    );

    d.kill_and_restore(); // the reader's mapping stays, frozen at versions 5

    let after = reader.pull("t", &[5, 6], &mut versions, &mut rows).unwrap();
    assert_eq!(
        versions,
        [2, 2],
        "both rows restored: none of the dead daemon's memory mixed with the new daemon's answer"
    );
    assert_eq!(rows, [-2.0; 8]);
    assert_eq!(
        after.clock, 4,
        "the restored clock, not the dead daemon's 10"
    );
    assert_ne!(after.incarnation, before.incarnation);
    assert_eq!(after.incarnation, reader.incarnation());
    assert!(
        reader.read_stats().rows_read > stats.rows_read,
        "key 5 read one-sidedly from the new daemon's memory"
    );
}

/// RDMA readers across a SIGKILL and a restore from a checkpoint (run in the soft-RoCE VM,
/// `tests/rdma-vm/run.sh`, with `--features rdma` and `$HETKV_BIN` naming a daemon built with
/// it). Two readers: one that asks the daemon every 20 ms whether it is still the one it
/// attached to, which notices the restart from the answer and connects a new queue pair before
/// reading; and one that would not ask for an hour, whose READ on the dead daemon's queue pair
/// fails, which connects a new queue pair, learns from that exchange that the daemon is a new
/// incarnation, attaches again and reads again. Both go on reading one-sidedly, and read the
/// restored rows.
#[cfg(feature = "rdma")]
#[test]
fn rdma_readers_go_on_reading_across_a_kill_and_a_restore() {
    use hetkv_transport::rdma::{Device, RdmaTransport};
    let device = std::sync::Arc::new(Device::open_first().expect("an RDMA device"));
    let mut d = Restartable::start(&["--rdma"]);
    let reader = |liveness: Duration| {
        RdmaTransport::connect(device.clone(), d.client())
            .map_err(|(_, e)| e)
            .unwrap()
            .with_liveness_interval(liveness)
    };
    let (watchful, unaware) = (
        reader(Duration::from_millis(20)),
        reader(Duration::from_secs(3600)),
    );
    d.push_past_a_checkpoint();
    let pull = |t: &RdmaTransport<TcpShardClient>| {
        let (mut versions, mut rows) = (Vec::new(), Vec::new());
        let pulled = t.pull("t", &[5, 6], &mut versions, &mut rows).unwrap();
        (versions, rows, pulled)
    };
    let (v, _, before) = pull(&watchful);
    assert_eq!(v, [5, 5]);
    assert_eq!(pull(&unaware).0, [5, 5]);
    let stats = (watchful.read_stats(), unaware.read_stats());
    assert!(
        stats.0.rows_read >= 2 && stats.1.rows_read >= 2,
        "{stats:?}"
    );

    d.kill_and_restore(); // its queue pairs and registered memory are gone
    std::thread::sleep(Duration::from_millis(40));

    for (name, t, old) in [
        ("watchful", &watchful, stats.0),
        ("unaware", &unaware, stats.1),
    ] {
        let (versions, rows, after) = pull(t);
        assert_eq!(versions, [2, 2], "{name}: the restored rows");
        assert_eq!(rows, [-2.0; 8], "{name}");
        assert_eq!(after.clock, 4, "{name}: the restored clock");
        assert_ne!(after.incarnation, before.incarnation, "{name}");
        let now = t.read_stats();
        assert!(
            now.rows_read >= old.rows_read + 2 && now.fallback_rows == old.fallback_rows,
            "{name}: read one-sidedly, not pulled: {old:?} then {now:?}"
        );
        assert!(
            now.reconnects > old.reconnects,
            "{name}: a new queue pair: {now:?}"
        );
    }
}

/// A rolling restart: a daemon stopped by SIGTERM with --checkpoint-on-exit writes a checkpoint
/// once its last connection ended, and the next one restores it: every acknowledged push is
/// kept, and the client sees a restart that took nothing back. (Without the flag, the same stop
/// takes back the three pushes after the last checkpoint.)
#[test]
fn a_daemon_stopped_with_checkpoint_on_exit_keeps_every_acknowledged_push() {
    const ON_EXIT: &[&str] = &["--checkpoint-on-exit"];
    for (args, lost) in [(ON_EXIT, 0), (&[][..], 3)] {
        let mut d = Restartable::start(args);
        d.push_past_a_checkpoint();
        d.stop_and_restart();
        d.push(1);
        let r = d.tcp.restarts();
        assert_eq!(r.seen, 1, "{args:?}");
        assert_eq!(
            (r.pushes_rolled_back, r.pushes_unknown),
            (lost, 0),
            "{args:?}: pushes taken back"
        );
        assert_eq!(version(&d.tcp, 5), 6 - lost, "{args:?}");
    }
}

/// A rolling restart under load: three daemons with --checkpoint-on-exit, four clients pushing
/// to all of them (numbered pushes, a deadline long enough to wait out a restart), and each
/// daemon in turn stopped by SIGTERM and started again on its address while the pushes go on.
/// Afterwards every row's version is the number of pushes acknowledged for it, and no client was
/// told of a push taken back: the rolling restart lost no acknowledged update.
#[test]
fn a_rolling_restart_under_pushes_loses_no_acknowledged_update() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    const SHARDS: u32 = 3;
    const ROWS: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let spec = TableSpec {
        rows: ROWS,
        ..spec()
    };
    let start = |i: u32, addr: &str| {
        let mut cmd = common::serve_on(
            addr,
            &[
                "--checkpoint-on-exit",
                "--shard",
                &i.to_string(),
                "--shards",
                &SHARDS.to_string(),
            ],
        );
        cmd.arg("--data-dir").arg(dir.path().join(format!("s{i}")));
        Daemon::start(cmd)
    };
    let mut daemons: Vec<Daemon> = (0..SHARDS).map(|i| start(i, "127.0.0.1:0")).collect();
    let addrs: Vec<String> = daemons.iter().map(|d| d.addr.clone()).collect();
    let config = ClientConfig {
        deadline: Duration::from_secs(60),
        ..ClientConfig::default()
    };
    for a in &addrs {
        let c = TcpShardClient::connect(a, config.clone()).unwrap();
        c.create_table(&spec).unwrap();
        c.checkpoint("start", false).unwrap();
    }
    let routing = spec.routing(SHARDS);
    let issued: Arc<Vec<AtomicU64>> = Arc::new((0..ROWS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let pushers: Vec<_> = (0..4u64)
        .map(|w| {
            let (addrs, config, issued, stop) =
                (addrs.clone(), config.clone(), issued.clone(), stop.clone());
            std::thread::spawn(move || {
                let clients: Vec<TcpShardClient> = addrs
                    .iter()
                    .map(|a| TcpShardClient::connect(a, config.clone()).unwrap())
                    .collect();
                let mut x = w + 1;
                let mut pushes = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let key = (x >> 33) % ROWS;
                    let s = routing.shard_of(key);
                    clients[s]
                        .push("t", &[key], &[1], &[1.0; 4])
                        .expect("a push waits out the restart within its deadline");
                    issued[key as usize].fetch_add(1, Ordering::Relaxed);
                    pushes += 1;
                }
                let rolled: u64 = clients
                    .iter()
                    .map(|c| c.restarts().pushes_rolled_back)
                    .sum();
                (pushes, rolled)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..SHARDS as usize {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &daemons[i].child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        assert!(
            daemons[i].child.wait().unwrap().success(),
            "shard {i}: a clean stop"
        );
        daemons[i] = start(i as u32, &addrs[i]);
        assert!(daemons[i].startup.iter().any(|l| l.contains("restored")));
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    let results: Vec<(u64, u64)> = pushers.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(results.iter().all(|&(p, _)| p > 0));
    assert_eq!(
        results.iter().map(|&(_, r)| r).sum::<u64>(),
        0,
        "no client was told of a push taken back"
    );
    let reader: Vec<TcpShardClient> = addrs
        .iter()
        .map(|a| TcpShardClient::connect(a, config.clone()).unwrap())
        .collect();
    for key in 0..ROWS {
        let (mut v, mut r) = (Vec::new(), Vec::new());
        reader[routing.shard_of(key)]
            .pull("t", &[key], &mut v, &mut r)
            .unwrap();
        assert_eq!(
            v[0],
            issued[key as usize].load(Ordering::Relaxed),
            "key {key}: its version is the pushes acknowledged for it"
        );
    }
}

/// SIGTERM while a checkpoint is being written (a table of 51 MB, asked for over the wire; the
/// signal sent when the daemon logs that it began): the daemon stops cleanly, and its data directory holds only whole checkpoints (the one
/// asked for finished, and the one on exit), each of which verifies; the next start restores
/// the newest.
#[test]
fn a_sigterm_during_a_checkpoint_leaves_only_whole_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut cmd = common::serve_on("127.0.0.1:0", &["--checkpoint-on-exit"]);
    cmd.arg("--data-dir").arg(&data);
    let mut daemon = Daemon::start(cmd);
    let addr = daemon.addr.clone();
    let tcp = TcpShardClient::connect(&addr, ClientConfig::default()).unwrap();
    let big = TableSpec {
        name: "big".into(),
        rows: 400_000,
        dim: 28,
        ..spec()
    };
    tcp.create_table(&big).unwrap();
    tcp.push("big", &[1, 2], &[1, 1], &[1.0; 56]).unwrap();
    let asked = std::thread::spawn(move || tcp.checkpoint("asked", false).map(|_| ()));
    // SIGTERM as soon as the daemon says it began writing the checkpoint.
    loop {
        let line = daemon
            .log
            .recv_timeout(Duration::from_secs(60))
            .expect("the daemon logs the checkpoint it begins");
        if line.contains("writing checkpoint") {
            break;
        }
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &daemon.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(daemon.child.wait().unwrap().success(), "a clean stop");
    let _ = asked.join().unwrap();
    let listed = hetkv_store::checkpoint::CheckpointDir::at(&data)
        .list()
        .unwrap();
    assert!(
        listed.iter().any(
            |l| matches!(l, hetkv_store::checkpoint::Listing::Committed(m) if m.name == "asked")
        ),
        "the checkpoint under way finished: {listed:?}"
    );
    for l in &listed {
        match l {
            hetkv_store::checkpoint::Listing::Committed(m) => {
                hetkv_store::checkpoint::CheckpointDir::at(&data)
                    .verify(&m.name)
                    .unwrap_or_else(|e| panic!("{}: {e}", m.name));
                if m.name.starts_with("exit-") {
                    assert_eq!(
                        m.parent.as_deref(),
                        Some("asked"),
                        "the exit checkpoint is incremental from the one before it"
                    );
                }
            }
            other => panic!("a checkpoint left half written: {other:?}"),
        }
    }
    let restarted = Daemon::start({
        let mut cmd = common::serve_on(&addr, &[]);
        cmd.arg("--data-dir").arg(&data);
        cmd
    });
    assert!(restarted.startup.iter().any(|l| l.contains("restored")));
    let again = TcpShardClient::connect(&addr, ClientConfig::default()).unwrap();
    let (mut v, mut rows) = (Vec::new(), Vec::new());
    again.pull("big", &[1], &mut v, &mut rows).unwrap();
    assert_eq!(v, vec![1], "the push before the stop is kept");
}
