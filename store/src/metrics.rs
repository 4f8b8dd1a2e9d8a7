//! A shard's metrics in the Prometheus text format (`hetkv serve --metrics-listen`), through
//! `prometheus-client`. Dashboard: `docs/grafana/hetkv.json`.
//!
//! Per operation and table: requests and the time the shard spent on them (a histogram); per
//! operation and error code: refusals; per table: rows read and pushed and updates applied; for
//! the shard: frames, bytes in and out, connections, repeated pushes acknowledged without being
//! applied, and checkpoints (count by outcome, duration, bytes).

use std::collections::HashSet;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a request on a table.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// The operation (`pull`, `push`, ...).
    pub op: String,
    /// The table (empty for operations on no table).
    pub table: String,
}

/// Labels of a refused request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The operation.
    pub op: String,
    /// The error code sent.
    pub code: String,
}

/// Labels of a per-table counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    /// The table.
    pub table: String,
}

/// Labels of a checkpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `committed` or `failed`.
    pub outcome: String,
}

/// Labels of the incarnation info metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IncarnationLabels {
    /// The daemon's incarnation, 16 hex digits.
    pub incarnation: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    // 10 µs to about 5 s.
    Histogram::new(exponential_buckets(1e-5, 2.0, 20))
}

fn checkpoint_histogram() -> Histogram {
    // 10 ms to about 3 hours.
    Histogram::new(exponential_buckets(0.01, 2.0, 20))
}

/// A shard's metrics and their registry.
#[derive(Debug)]
pub struct ShardMetrics {
    registry: Registry,
    requests: Family<OpLabels, Counter>,
    seconds: Histograms<OpLabels>,
    errors: Family<ErrorLabels, Counter>,
    /// Counters mirrored from totals kept elsewhere (the session's, the tables'), brought up to
    /// date before each scrape.
    mirrored: Mirrored,
    checkpoints: Family<OutcomeLabels, Counter>,
    checkpoint_seconds: Histograms<OutcomeLabels>,
    checkpoint_bytes: Counter,
    tables: Gauge,
    shard: Gauge,
    incarnation: Family<IncarnationLabels, Gauge>,
    lock: Mutex<()>,
    /// Tables with series of their own (the first [`ShardMetrics::new`]'s `per_table` seen); the
    /// others are counted under [`OTHER_TABLES`].
    named: RwLock<HashSet<String>>,
    per_table: usize,
}

/// The table label of the tables past the per-table limit (no table can be named so).
pub const OTHER_TABLES: &str = "(other)";

/// Default number of tables with series of their own: the page stays under about 150 KiB
/// however many tables a shard holds.
pub const DEFAULT_METRICS_TABLES: usize = 32;

#[derive(Debug, Default)]
struct Mirrored {
    frames: Counter,
    frame_errors: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
    connections: Counter,
    repeated_pushes: Counter,
    rows_read: Family<TableLabels, Counter>,
    rows_pushed: Family<TableLabels, Counter>,
    updates: Family<TableLabels, Counter>,
}

/// Totals to mirror at a scrape.
#[derive(Debug, Default)]
pub struct Totals {
    /// Frames handled, and answered with an error.
    pub frames: (u64, u64),
    /// Bytes received and sent.
    pub bytes: (u64, u64),
    /// Connections accepted.
    pub connections: u64,
    /// Repeated pushes acknowledged without being applied.
    pub repeated_pushes: u64,
    /// Per table: rows read, rows pushed, updates applied.
    pub tables: Vec<(String, u64, u64, u64)>,
    /// The daemon's incarnation.
    pub incarnation: u64,
}

fn mirror(c: &Counter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

impl ShardMetrics {
    /// Metrics of shard `shard`, with series of their own for `per_table` tables at most.
    pub fn new(shard: u32, per_table: usize) -> Self {
        let mut registry = Registry::with_prefix("hetkv");
        let requests = Family::<OpLabels, Counter>::default();
        let seconds: Histograms<OpLabels> = Family::new_with_constructor(request_histogram);
        let errors = Family::<ErrorLabels, Counter>::default();
        let mirrored = Mirrored::default();
        let checkpoints = Family::<OutcomeLabels, Counter>::default();
        let checkpoint_seconds: Histograms<OutcomeLabels> =
            Family::new_with_constructor(checkpoint_histogram);
        let checkpoint_bytes = Counter::default();
        let tables = Gauge::default();
        let shard_gauge = Gauge::default();
        shard_gauge.set(shard as i64);
        registry.register(
            "requests",
            "Requests handled, by operation and table",
            requests.clone(),
        );
        registry.register(
            "request_seconds",
            "Time the shard spent on a request (not the network's), by operation and table",
            seconds.clone(),
        );
        registry.register(
            "request_errors",
            "Requests refused, by operation and error code",
            errors.clone(),
        );
        registry.register("frames", "Frames handled", mirrored.frames.clone());
        registry.register(
            "frame_errors",
            "Frames answered with an error (malformed, oversized or refused)",
            mirrored.frame_errors.clone(),
        );
        registry.register(
            "bytes_in",
            "Bytes received, frame prefixes included",
            mirrored.bytes_in.clone(),
        );
        registry.register(
            "bytes_out",
            "Bytes sent, frame prefixes included",
            mirrored.bytes_out.clone(),
        );
        registry.register(
            "connections",
            "Connections accepted",
            mirrored.connections.clone(),
        );
        registry.register(
            "repeated_pushes",
            "Numbered pushes received again and acknowledged without being applied twice",
            mirrored.repeated_pushes.clone(),
        );
        registry.register(
            "rows_read",
            "Rows served to readers, by table",
            mirrored.rows_read.clone(),
        );
        registry.register(
            "rows_pushed",
            "Pushed rows applied, by table",
            mirrored.rows_pushed.clone(),
        );
        registry.register(
            "updates",
            "Updates applied (the sum of pushed counts), by table",
            mirrored.updates.clone(),
        );
        registry.register(
            "checkpoints",
            "Checkpoints written, by outcome",
            checkpoints.clone(),
        );
        registry.register(
            "checkpoint_seconds",
            "Time to write a checkpoint, by outcome",
            checkpoint_seconds.clone(),
        );
        registry.register(
            "checkpoint_bytes",
            "Bytes of committed checkpoints",
            checkpoint_bytes.clone(),
        );
        registry.register("tables", "Tables on this shard", tables.clone());
        registry.register("shard", "This shard's index", shard_gauge.clone());
        let incarnation = Family::<IncarnationLabels, Gauge>::default();
        registry.register(
            "incarnation",
            "This daemon's incarnation (the label; the value is 1): it changes at every start \
             and restore",
            incarnation.clone(),
        );
        Self {
            registry,
            requests,
            seconds,
            errors,
            mirrored,
            checkpoints,
            checkpoint_seconds,
            checkpoint_bytes,
            tables,
            shard: shard_gauge,
            incarnation,
            lock: Mutex::new(()),
            named: RwLock::new(HashSet::new()),
            per_table,
        }
    }

    /// The label `table` is counted under: its own name for the first `per_table` tables seen,
    /// [`OTHER_TABLES`] for the rest (and "" for requests on no table).
    fn table_label(&self, table: &str) -> String {
        if table.is_empty()
            || self
                .named
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(table)
        {
            return table.to_string();
        }
        let mut named = self.named.write().unwrap_or_else(|p| p.into_inner());
        if named.len() < self.per_table {
            named.insert(table.to_string());
            return table.to_string();
        }
        if named.contains(table) {
            table.to_string()
        } else {
            OTHER_TABLES.to_string()
        }
    }

    /// Counts a request of `op` on `table` that took `took`, refused with `code` if it failed.
    pub fn request(&self, op: &str, table: &str, took: Duration, code: Option<&str>) {
        let labels = OpLabels {
            op: op.to_string(),
            table: self.table_label(table),
        };
        self.requests.get_or_create(&labels).inc();
        self.seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if let Some(code) = code {
            self.errors
                .get_or_create(&ErrorLabels {
                    op: op.to_string(),
                    code: code.to_string(),
                })
                .inc();
        }
    }

    /// Counts a checkpoint.
    pub fn checkpoint(&self, committed: bool, took: Duration, bytes: u64) {
        let labels = OutcomeLabels {
            outcome: if committed { "committed" } else { "failed" }.into(),
        };
        self.checkpoints.get_or_create(&labels).inc();
        self.checkpoint_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.checkpoint_bytes.inc_by(bytes);
    }

    /// The text exposition, with the mirrored counters brought up to `totals`.
    pub fn encode(&self, totals: &Totals) -> String {
        let _one_scrape_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let m = &self.mirrored;
        mirror(&m.frames, totals.frames.0);
        mirror(&m.frame_errors, totals.frames.1);
        mirror(&m.bytes_in, totals.bytes.0);
        mirror(&m.bytes_out, totals.bytes.1);
        mirror(&m.connections, totals.connections);
        mirror(&m.repeated_pushes, totals.repeated_pushes);
        // The tables past the per-table limit are summed into one series (tables are never
        // dropped, so the sum only grows).
        let mut other = (0, 0, 0);
        for (table, read, pushed, updates) in &totals.tables {
            let label = self.table_label(table);
            if label == OTHER_TABLES {
                other = (other.0 + read, other.1 + pushed, other.2 + updates);
                continue;
            }
            let l = TableLabels { table: label };
            mirror(&m.rows_read.get_or_create(&l), *read);
            mirror(&m.rows_pushed.get_or_create(&l), *pushed);
            mirror(&m.updates.get_or_create(&l), *updates);
        }
        if other != (0, 0, 0) {
            let l = TableLabels {
                table: OTHER_TABLES.to_string(),
            };
            mirror(&m.rows_read.get_or_create(&l), other.0);
            mirror(&m.rows_pushed.get_or_create(&l), other.1);
            mirror(&m.updates.get_or_create(&l), other.2);
        }
        self.tables.set(totals.tables.len() as i64);
        let _ = &self.shard;
        let label = IncarnationLabels {
            incarnation: format!("{:016x}", totals.incarnation),
        };
        if self.incarnation.get(&label).is_none() {
            self.incarnation.clear();
            self.incarnation.get_or_create(&label).set(1);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding into a String cannot fail");
        out
    }
}

/// Open metrics connections at most; a newer one displaces the oldest, so connections that
/// say nothing (or say it a byte at a time) cannot keep a scraper out.
pub const MAX_METRICS_CONNECTIONS: usize = 256;
/// Time a metrics connection has to send its request head, and then to take the reply.
pub const METRICS_DEADLINE: Duration = Duration::from_secs(5);
/// Pages rendered at once (rendering holds a blocking thread).
const RENDERS: usize = 4;

/// Serves `GET /metrics` (the text exposition of `shard`) on `listener` until `shutdown`
/// completes: HTTP/1.1, one request per connection. A request head must arrive within
/// [`METRICS_DEADLINE`] and 8 KiB, and the reply must be taken within another; at most
/// [`MAX_METRICS_CONNECTIONS`] are open, a newer one closing the oldest.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    shard: std::sync::Arc<crate::Shard>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use std::collections::VecDeque;
    let renders = std::sync::Arc::new(tokio::sync::Semaphore::new(RENDERS));
    let mut open: VecDeque<tokio::task::AbortHandle> = VecDeque::new();
    tokio::pin!(shutdown);
    loop {
        let (conn, peer) = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    // Out of descriptors, most likely: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        open.retain(|h| !h.is_finished());
        if open.len() >= MAX_METRICS_CONNECTIONS {
            if let Some(oldest) = open.pop_front() {
                tracing::debug!(
                    "metrics listener: closing the oldest open connection for a new one"
                );
                oldest.abort();
            }
        }
        let task = tokio::spawn(answer(conn, peer, shard.clone(), renders.clone()));
        open.push_back(task.abort_handle());
    }
    for h in open {
        h.abort();
    }
}

/// One metrics connection: its request head, then the page or a 404, each within
/// [`METRICS_DEADLINE`].
async fn answer(
    mut conn: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    shard: std::sync::Arc<crate::Shard>,
    renders: std::sync::Arc<tokio::sync::Semaphore>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(METRICS_DEADLINE, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    if !matches!(read, Ok(true)) {
        return;
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or(&[]);
    let (status, body, kind) = if line.starts_with(b"GET /metrics ") {
        let Ok(_render) = renders.acquire().await else {
            return;
        };
        let body = tokio::task::block_in_place(|| shard.metrics_text());
        ("200 OK", body, "text/plain; version=0.0.4; charset=utf-8")
    } else {
        (
            "404 Not Found",
            "only GET /metrics\n".to_string(),
            "text/plain",
        )
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let sent = tokio::time::timeout(METRICS_DEADLINE, async {
        conn.write_all(reply.as_bytes()).await?;
        conn.shutdown().await
    })
    .await;
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics reply not delivered"),
        Err(_) => tracing::debug!(%peer, "metrics reply not taken within the deadline"),
    }
}
