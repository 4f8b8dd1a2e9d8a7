//! Wall clocks that disagree: daemons run a year ahead of and behind their clients (libfaketime),
//! and restarts among them restore the newest checkpoint by its sequence, not by the time it
//! claims; pushes, deadlines and idle limits, which run on monotonic clocks, do not notice.

use std::path::Path;

use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_transport::{Initializer, OptimizerSpec, ShardTransport, TableSpec};

mod common;
use common::Daemon;

/// libfaketime (Debian's `libfaketime`, which scripts/test.sh installs).
fn libfaketime() -> std::path::PathBuf {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime is needed (scripts/test.sh installs it)")
}

/// `hetkv serve` on `addr` with `data`, its wall clock shifted by `offset` (a faketime offset
/// such as `+400d`; the daemon itself is the process, so killing it kills the daemon).
fn skewed(offset: &str, addr: &str, data: &Path) -> Daemon {
    let mut cmd = common::serve_on(addr, &["--data-dir", data.to_str().unwrap()]);
    cmd.env("LD_PRELOAD", libfaketime()).env("FAKETIME", offset);
    Daemon::start(cmd)
}

fn version(c: &TcpShardClient) -> u64 {
    let (mut v, mut rows) = (Vec::new(), Vec::new());
    c.pull("t", &[1], &mut v, &mut rows).unwrap();
    v[0]
}

fn pushes(c: &TcpShardClient, n: usize) {
    for _ in 0..n {
        c.push("t", &[1], &[1], &[0.5]).unwrap();
    }
}

#[test]
fn daemons_whose_clocks_are_a_year_off_restore_the_newest_checkpoint_by_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ahead = skewed("+400d", "127.0.0.1:0", &data);
    let addr = ahead.addr.clone();
    let c = TcpShardClient::connect(&addr, ClientConfig::default()).unwrap();
    c.create_table(&TableSpec {
        name: "t".into(),
        rows: 8,
        dim: 1,
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::Sgd { lr: 1.0 },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    })
    .unwrap();
    pushes(&c, 3);
    c.checkpoint("written-in-the-future", false).unwrap();
    pushes(&c, 2);
    let year = |d: &Daemon| {
        d.startup[0][..4]
            .parse::<u32>()
            .expect("a timestamped log line")
    };
    let ahead_year = year(&ahead);
    drop(ahead);

    // A year behind: restores the checkpoint "from the future", and writes one "from the past".
    let behind = skewed("-400d", &addr, &data);
    assert!(
        ahead_year >= year(&behind) + 2,
        "the daemons' clocks were 800 days apart ({ahead_year}, {})",
        year(&behind)
    );
    assert_eq!(version(&c), 3, "restored written-in-the-future");
    pushes(&c, 4);
    c.checkpoint("written-in-the-past", false).unwrap();
    drop(behind);

    // On time: the newest checkpoint is the last one written, whatever its clock said.
    let on_time = Daemon::start(common::serve_on(
        &addr,
        &["--data-dir", data.to_str().unwrap()],
    ));
    assert!(
        on_time
            .startup
            .iter()
            .any(|l| l.contains("restored") && l.contains("written-in-the-past")),
        "{:#?}",
        on_time.startup
    );
    assert_eq!(version(&c), 7);
    assert_eq!(c.restarts().seen, 2);
    assert_eq!(
        c.restarts().pushes_rolled_back,
        2,
        "the two pushes after the first checkpoint"
    );
}
