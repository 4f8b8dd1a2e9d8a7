//! `hetkv serve --metrics-listen`: the Prometheus text format over HTTP, counting what clients
//! did, per operation, table and error code; other paths get 404, and peers that connect and
//! leave without a request do not break the endpoint. The replies are read with a Prometheus
//! text-format parser (`prometheus-parse`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_transport::{Initializer, OptimizerSpec, ShardTransport, TableSpec};

mod common;
use common::{serve, Daemon};

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of `series` (`name` or `name{label="value",...}`, labels in any order) in an HTTP
/// reply's body, read by a Prometheus text-format parser.
fn value(reply: &str, series: &str) -> Option<f64> {
    let body = reply.split_once("\r\n\r\n").map_or(reply, |(_, b)| b);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("the Prometheus text format");
    let (name, labels) = series
        .split_once('{')
        .map_or((series, ""), |(n, l)| (n, l.trim_end_matches('}')));
    let wanted: Vec<(&str, &str)> = labels
        .split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("label=value");
            (k, v.trim_matches('"'))
        })
        .collect();
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && wanted.iter().all(|&(k, v)| s.labels.get(k) == Some(v)))
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

#[test]
fn the_metrics_endpoint_counts_requests_rows_errors_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = serve(&["--metrics-listen", "127.0.0.1:0", "--data-dir"]);
    cmd.arg(dir.path());
    let d = Daemon::start(cmd);
    let metrics = d
        .logged("serving metrics", "addr")
        .expect("metrics address logged");
    let c = TcpShardClient::connect(&d.addr, ClientConfig::default()).unwrap();
    c.create_table(&TableSpec {
        name: "ads".into(),
        rows: 100,
        dim: 2,
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::Sgd { lr: 0.1 },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    })
    .unwrap();
    for _ in 0..3 {
        c.push("ads", &[1, 2], &[1, 2], &[0.5; 4]).unwrap();
    }
    let (mut v, mut rows) = (Vec::new(), Vec::new());
    c.pull("ads", &[1, 2, 3], &mut v, &mut rows).unwrap();
    assert!(c.pull("ads", &[1000], &mut v, &mut rows).is_err());
    c.checkpoint("one", false).unwrap();
    // Peers that connect and leave without a request.
    let _silent: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(&metrics).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    drop(_silent);
    let reply = get(&metrics, "/metrics");
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    let push = r#"{op="push",table="ads"}"#;
    assert_eq!(
        value(&reply, &format!("hetkv_requests_total{push}")),
        Some(3.0),
        "{reply}"
    );
    assert_eq!(
        value(&reply, &format!("hetkv_request_seconds_count{push}")),
        Some(3.0)
    );
    assert_eq!(
        value(
            &reply,
            r#"hetkv_request_errors_total{op="pull",code="KeyOutOfRange"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&reply, r#"hetkv_rows_pushed_total{table="ads"}"#),
        Some(6.0)
    );
    assert_eq!(
        value(&reply, r#"hetkv_updates_total{table="ads"}"#),
        Some(9.0)
    );
    assert_eq!(
        value(&reply, r#"hetkv_rows_read_total{table="ads"}"#),
        Some(3.0)
    );
    assert_eq!(
        value(&reply, r#"hetkv_checkpoints_total{outcome="committed"}"#),
        Some(1.0)
    );
    assert!(value(&reply, "hetkv_bytes_in_total").unwrap() > 0.0);
    assert_eq!(value(&reply, "hetkv_tables"), Some(1.0));
    let incarnation = format!("{:016x}", c.incarnation());
    assert_eq!(
        value(
            &reply,
            &format!(r#"hetkv_incarnation{{incarnation="{incarnation}"}}"#)
        ),
        Some(1.0),
        "the incarnation the hello gave"
    );
    assert!(get(&metrics, "/other").starts_with("HTTP/1.1 404"));

    // Every series the Grafana dashboard queries is one this endpoint serves.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/grafana/hetkv.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut queried = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("hetkv_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                queried.push(name);
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    for name in queried {
        assert!(
            reply.lines().any(|l| l.starts_with(&name)),
            "the dashboard queries {name}, which the endpoint does not serve"
        );
    }
}

/// Reads one scrape with `deadline` for the whole reply; `None` if it did not come in time.
fn scrape_within(addr: &str, deadline: Duration) -> Option<String> {
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(deadline)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    (start.elapsed() < deadline && out.starts_with("HTTP/1.1 200")).then_some(out)
}

#[test]
fn readers_that_never_read_and_senders_a_byte_at_a_time_do_not_stop_scrapes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let d = Daemon::start(serve(&["--metrics-listen", "127.0.0.1:0"]));
    let metrics = d.logged("serving metrics", "addr").unwrap();
    // 16 peers ask for the page and never read it.
    let silent: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = TcpStream::connect(&metrics).unwrap();
            write!(s, "GET /metrics HTTP/1.1\r\n\r\n").unwrap();
            s
        })
        .collect();
    // 64 peers send their request a byte every 200 ms, reconnecting whenever they are closed.
    let stop = Arc::new(AtomicBool::new(false));
    let slow: Vec<_> = (0..64)
        .map(|_| {
            let (stop, addr) = (stop.clone(), metrics.clone());
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                    let Ok(mut s) = TcpStream::connect(&addr) else {
                        continue;
                    };
                    for b in b"GET /metrics HTTP/1.1\r\n".iter().cycle() {
                        if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Every scrape is answered, each within 2 s (a scraper's usual timeout is 10 s).
    let answered = (0..6)
        .filter(|_| {
            let ok = scrape_within(&metrics, Duration::from_secs(2)).is_some();
            std::thread::sleep(Duration::from_millis(300));
            ok
        })
        .count();
    stop.store(true, Ordering::Relaxed);
    for t in slow {
        t.join().unwrap();
    }
    drop(silent);
    assert_eq!(
        answered, 6,
        "scrapes answered while others held connections"
    );
}

#[test]
fn the_page_is_bounded_however_many_tables_there_are() {
    let d = Daemon::start(serve(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--metrics-tables",
        "8",
    ]));
    let metrics = d.logged("serving metrics", "addr").unwrap();
    let c = TcpShardClient::connect(&d.addr, ClientConfig::default()).unwrap();
    for t in 0..40 {
        let name = format!("t{t:02}");
        c.create_table(&TableSpec {
            name: name.clone(),
            rows: 10,
            dim: 2,
            init: Initializer::Zeros,
            optimizer: OptimizerSpec::Sgd { lr: 0.1 },
            buckets: hetkv_transport::DEFAULT_BUCKETS,
            dynamic: None,
        })
        .unwrap();
        c.push(&name, &[1], &[1], &[0.5; 2]).unwrap();
    }
    let reply = get(&metrics, "/metrics");
    let labels: std::collections::BTreeSet<&str> = reply
        .lines()
        .filter(|l| l.starts_with("hetkv_rows_pushed_total{"))
        .filter_map(|l| l.split('"').nth(1))
        .collect();
    // The first 8 tables have series of their own; the other 32 are summed under one label.
    assert_eq!(labels.len(), 9, "{labels:?}");
    assert!(labels.contains("(other)") && labels.contains("t00") && !labels.contains("t39"));
    assert_eq!(
        value(&reply, r#"hetkv_rows_pushed_total{table="(other)"}"#),
        Some(32.0)
    );
    assert_eq!(
        value(&reply, r#"hetkv_requests_total{op="push",table="(other)"}"#),
        Some(32.0)
    );
    assert_eq!(value(&reply, "hetkv_tables"), Some(40.0));
}
