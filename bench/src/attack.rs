//! `hetkv-bench attack`: a well-behaved client's latency while hostile or careless peers work on
//! the same daemon, beside its latency on an idle daemon.
//!
//! One embedded shard that requires a token. The measured client pulls 16 random rows of a small
//! table in a loop, over its own authenticated connection, and records each call's latency. Each
//! scenario runs its attackers (threads, bounded by the scenario's duration) while it measures:
//! - `idle`: nobody else;
//! - `silent`: peers that connect and never say a word, hundreds at a time, reconnecting as the
//!   daemon drops them;
//! - `big-unauthenticated`: 16 peers that announce a 63 MiB frame before any hello and trickle it;
//! - `stopped-readers`: 8 authenticated peers that ask for 16 MiB answers and never read them,
//!   each holding up to 4 such connections;
//! - `large-create`: a peer creating 128 MiB tables one after another.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hetkv_fallback_tcp::{ClientConfig, ServerConfig, TcpShardClient};
use hetkv_store::{EmbeddedCluster, ShardConfig};
use hetkv_transport::wire::{self, ChallengeResponse, HelloRequest, Op, Status, MAGIC};
use hetkv_transport::{codec, Initializer, OptimizerSpec, ShardTransport, TableSpec};
use serde::Serialize;

use crate::workload::UniformKeys;

const TOKEN: &str = "attack-bench-token";

/// Settings of an attack run.
#[derive(clap::Args, Debug, Clone)]
pub struct AttackArgs {
    /// Seconds each scenario is measured.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Scenarios to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,silent,big-unauthenticated,stopped-readers,large-create"
    )]
    pub scenarios: Vec<String>,
    /// Write the report here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// The measured client's latency during one scenario.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// The scenario.
    pub scenario: String,
    /// Calls completed.
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Median latency, microseconds.
    pub p50_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
    /// Slowest call, microseconds.
    pub max_us: u64,
    /// Attacker actions completed (connections opened, frames sent, tables created).
    pub attacks: u64,
}

/// An attack report.
#[derive(Debug, Serialize)]
pub struct AttackReport {
    /// Cores on this machine.
    pub cpus: usize,
    /// Seconds per scenario.
    pub seconds: f64,
    /// One entry per scenario.
    pub entries: Vec<Entry>,
}

fn authorized() -> ClientConfig {
    ClientConfig {
        auth: Some(TOKEN.into()),
        ..ClientConfig::default()
    }
}

fn spec(name: &str, rows: u64, dim: u32) -> TableSpec {
    TableSpec {
        name: name.into(),
        rows,
        dim,
        init: Initializer::Uniform {
            bound: 0.01,
            seed: 3,
        },
        optimizer: OptimizerSpec::Sgd { lr: 0.1 },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    }
}

/// A raw connection that completed its challenge and hello.
fn greeted(addr: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut frame = Vec::new();
    wire::start_frame(&mut frame, Op::Challenge as u8, Status::Ok, &());
    wire::finish_frame(&mut frame, u32::MAX)?;
    s.write_all(&frame)?;
    let body = read_frame(&mut s)?;
    let parts = wire::split_response(&body)?;
    let c: ChallengeResponse = wire::decode_response_header(parts.header)?;
    let hello = HelloRequest {
        magic: MAGIC,
        version: wire::PROTOCOL_VERSION,
        auth: Some(hetkv_transport::auth::respond(TOKEN, &c.nonce)),
        client: "attack bench".into(),
        client_id: None,
    };
    wire::start_frame(&mut frame, Op::Hello as u8, Status::Ok, &hello);
    wire::finish_frame(&mut frame, u32::MAX)?;
    s.write_all(&frame)?;
    read_frame(&mut s)?;
    Ok(s)
}

fn read_frame(s: &mut TcpStream) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut prefix = [0u8; wire::PREFIX_BYTES];
    s.read_exact(&mut prefix)?;
    let len = wire::body_len(prefix, u32::MAX)?;
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body)?;
    Ok(body)
}

/// Runs one attacker until `stop`, counting its actions in `count`.
fn attacker(name: &str, addr: &str, stop: &AtomicBool, count: &AtomicU64) {
    let end = || stop.load(Ordering::Relaxed);
    match name {
        "silent" => {
            let mut held = std::collections::VecDeque::new();
            while !end() {
                if let Ok(s) = TcpStream::connect(addr) {
                    held.push_back(s);
                    count.fetch_add(1, Ordering::Relaxed);
                }
                if held.len() > 500 {
                    held.pop_front();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        "big-unauthenticated" => {
            let chunk = vec![0u8; 64 << 10];
            while !end() {
                let Ok(mut s) = TcpStream::connect(addr) else {
                    continue;
                };
                let _ = s.write_all(&(63u32 << 20).to_le_bytes());
                count.fetch_add(1, Ordering::Relaxed);
                while !end() && s.write_all(&chunk).is_ok() {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        "stopped-readers" => {
            let keys: Vec<u64> = (0..4096).collect();
            let mut frame = Vec::new();
            codec::pull::encode_request(&mut frame, "wide", &keys);
            if wire::finish_frame(&mut frame, u32::MAX).is_err() {
                return;
            }
            // Each attacker keeps up to 4 connections whose answers it never reads, opening a new
            // one when its writes stall (the daemon stopped reading it, blocked on its answers).
            let mut held = Vec::new();
            while !end() {
                let Ok(mut s) = greeted(addr) else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                while !end() && s.write_all(&frame).is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                held.push(s);
                if held.len() >= 4 {
                    while !end() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        "large-create" => {
            let Ok(c) = TcpShardClient::connect(addr, authorized()) else {
                return;
            };
            let mut i = 0u64;
            while !end() && i < 8 {
                // 32,768 rows of 1,024 values: 128 MiB of region on the one shard.
                if c.create_table(&spec(&format!("big{i}"), 32_768, 1024))
                    .is_ok()
                {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }
        _ => {}
    }
}

/// Runs every scenario against a fresh daemon and measures the well-behaved client.
pub fn run(args: &AttackArgs) -> Result<AttackReport> {
    let known = [
        "idle",
        "silent",
        "big-unauthenticated",
        "stopped-readers",
        "large-create",
    ];
    if let Some(bad) = args.scenarios.iter().find(|s| !known.contains(&s.as_str())) {
        anyhow::bail!("unknown scenario {bad:?}: choose among {known:?}");
    }
    let seconds = Duration::try_from_secs_f64(args.seconds).context("--seconds")?;
    let mut entries = Vec::new();
    for scenario in &args.scenarios {
        let cluster = EmbeddedCluster::start_with(1, ServerConfig::default(), |i| ShardConfig {
            auth_token: Some(TOKEN.into()),
            ..ShardConfig::new(i, 1)
        })?;
        let addr = cluster.addrs()[0].clone();
        let admin = TcpShardClient::connect(&addr, authorized())?;
        admin.create_table(&spec("emb", 100_000, 64))?;
        admin.create_table(&spec("wide", 4096, 1024))?;
        let client = TcpShardClient::connect(&addr, authorized())?;
        let stop = AtomicBool::new(false);
        let count = AtomicU64::new(0);
        let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
        let (mut calls, mut errors) = (0u64, 0u64);
        std::thread::scope(|s| {
            let attackers = match scenario.as_str() {
                "idle" => 0,
                "big-unauthenticated" => 16,
                "stopped-readers" => 8,
                _ => 1,
            };
            for _ in 0..attackers {
                s.spawn(|| attacker(scenario, &addr, &stop, &count));
            }
            // Let the attack take hold, then measure.
            std::thread::sleep(Duration::from_millis(300));
            let mut keys = UniformKeys::new(100_000, 7);
            let (mut v, mut r, mut batch) = (Vec::new(), Vec::new(), vec![0u64; 16]);
            let started = Instant::now();
            while started.elapsed() < seconds {
                keys.fill(&mut batch);
                let t = Instant::now();
                match client.pull("emb", &batch, &mut v, &mut r) {
                    Ok(_) => {
                        let _ = hist.record(t.elapsed().as_micros() as u64);
                        calls += 1;
                    }
                    Err(_) => errors += 1,
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        let e = Entry {
            scenario: scenario.clone(),
            calls,
            errors,
            p50_us: hist.value_at_quantile(0.5),
            p99_us: hist.value_at_quantile(0.99),
            max_us: hist.max(),
            attacks: count.load(Ordering::Relaxed),
        };
        eprintln!(
            "{:<20} {:>8} calls {:>4} errors   p50 {:>7} us   p99 {:>7} us   max {:>8} us   {:>6} attacker actions",
            e.scenario, e.calls, e.errors, e.p50_us, e.p99_us, e.max_us, e.attacks
        );
        entries.push(e);
    }
    Ok(AttackReport {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        seconds: args.seconds,
        entries,
    })
}
