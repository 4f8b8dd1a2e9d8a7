//! The HET embedding cache: its configuration, the sans-IO core, and the pieces it is made of,
//! one concern a module:
//!
//! - `lines`: storage and its eviction policy (`policy/`, one file a policy): slots, the key
//!   index, each line's value, base row, pending gradient and optimizer state;
//! - `clocks`: what the cache knows of each shard's table clock and incarnation (claims,
//!   observations, restarts);
//! - `batch`: one call's keys de-duplicated and resolved, the requests a lookup plans, and what
//!   came back;
//! - `queue`: the rows waiting to be pushed;
//! - [`rule`]: how a worker's updates count, between pushes and in them (a learning rule, apart
//!   from consistency);
//! - `core` and `lookup`: [`CacheCore`], which holds them and keeps the bounds; `exchange`: the
//!   protocol with the shards, call by call;
//! - `driver` ([`CachedTable`]) and `prefetch`: the core driven over the cluster's transports.

mod batch;
mod clocks;
mod core;
mod driver;
mod exchange;
mod lines;
mod lookup;
pub mod policy;
mod prefetch;
mod queue;
pub mod rule;
#[cfg(test)]
mod tests;

pub use self::core::{CacheCore, CacheError, LineView};
pub use driver::{lookup_many, prefetch_many, update_many, CachedTable};
pub use exchange::{RequestKind, ShardRequest};
pub use policy::PolicyKind;
pub use queue::PushBatch;
pub use rule::{UpdateRule, UpdateRuleKind};

use hetkv_transport::{Optimizer, TableSpec};

/// A staleness bound: a number of updates, or infinite (never checked). The default is 0 (strict).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bound(u64);

impl Bound {
    /// 0: strict.
    pub const STRICT: Self = Self(0);
    /// Never checked.
    pub const INFINITE: Self = Self(u64::MAX);

    /// A finite bound of `n` updates.
    pub fn updates(n: u64) -> Self {
        Self(n)
    }

    /// The bound as a number (`u64::MAX` for infinite), as the wire carries it.
    pub fn get(self) -> u64 {
        self.0
    }

    /// Whether the bound is infinite.
    pub fn is_infinite(self) -> bool {
        self.0 == u64::MAX
    }
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_infinite() {
            write!(f, "inf")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl serde::Serialize for Bound {
    /// As its display form: a number of updates, or `"inf"`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Bound {
    /// From its display form, or from a plain number of updates.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Form {
            Updates(u64),
            Text(String),
        }
        match Form::deserialize(d)? {
            Form::Updates(n) => Ok(Self(n)),
            Form::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for Bound {
    type Err = String;

    /// A number of updates, or `inf`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "inf" | "infinite" => Ok(Self::INFINITE),
            _ => s
                .parse::<u64>()
                .map(Self)
                .map_err(|_| format!("bound {s:?} is neither a number of updates nor \"inf\"")),
        }
    }
}

/// How many rows a cache holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Capacity {
    /// No cache: every lookup reaches the shards and every update is written through.
    Disabled,
    /// A number of rows.
    Rows(usize),
    /// A memory budget for row data and pending gradients.
    Bytes(u64),
    /// A fraction of the table's rows.
    Fraction(f64),
}

impl Capacity {
    /// Bytes one cached line of `spec`'s table costs: its base row, pending gradient and
    /// optimizer state, and its bookkeeping: its 64-byte record; the policy's (at most 40: a
    /// 16-byte record, 8 bytes of links, and 8 one-byte frequency counters in a power of two of
    /// blocks); and its entry in the key index (at most 40: 16 bytes and a control byte, the index
    /// at most 7/8 full, rounded up to a power of two).
    pub fn line_bytes(spec: &TableSpec) -> u64 {
        let dim = spec.dim as usize;
        let state_len = Optimizer::new(spec.optimizer).state_len(dim);
        (4 * lines::Lines::values_per_line(dim, state_len) + 144) as u64
    }

    /// The number of rows for a table of `spec`.
    pub fn rows(&self, spec: &TableSpec) -> usize {
        let rows = match *self {
            Self::Disabled => 0,
            Self::Rows(n) => n as u64,
            Self::Bytes(b) => b / Self::line_bytes(spec),
            Self::Fraction(f) => (spec.rows as f64 * f.clamp(0.0, 1.0)).round() as u64,
        };
        rows.min(spec.rows).min(u32::MAX as u64 - 1) as usize
    }
}

/// A cache's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheConfig {
    /// How many rows.
    pub capacity: Capacity,
    /// The eviction policy.
    pub policy: PolicyKind,
    /// Read staleness: a returned row lags the server by at most this many updates.
    pub pull_bound: Bound,
    /// Write staleness: a line holds at most this many unpushed updates after `update` returns.
    pub push_bound: Bound,
}

impl CacheConfig {
    /// The classic parameter server: no cache, bounds 0.
    pub fn disabled() -> Self {
        Self {
            capacity: Capacity::Disabled,
            policy: PolicyKind::Lru,
            pull_bound: Bound::STRICT,
            push_bound: Bound::STRICT,
        }
    }

    /// A cache of `capacity` with `policy` and the same bound for reads and writes.
    pub fn new(capacity: Capacity, policy: PolicyKind, bound: Bound) -> Self {
        Self {
            capacity,
            policy,
            pull_bound: bound,
            push_bound: bound,
        }
    }
}
