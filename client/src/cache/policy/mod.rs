//! Eviction policies, apart from the cache's storage (one file each).
//!
//! A policy orders the cache's slots and names victims; it never sees row data. All operations are
//! O(1). Slots are `u32` indices into the cache's line storage.

mod lfu;
mod links;
mod lru;

pub use hetkv_transport::sketch::FrequencySketch;
pub use lfu::Lfu;
pub use lru::Lru;

/// Which policy a cache uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// Least recently used.
    Lru,
    /// Least frequently used, frequencies from a sketch of every access (resident or not), ties
    /// broken by recency; a miss is not admitted over a more frequent victim.
    Lfu,
    /// LFU whose lines are pinned (never evicted) once hit `pin_after` times while resident,
    /// with at most 90% of the capacity pinned: HET's "light LFU".
    LightLfu {
        /// Hits after which a line is pinned.
        pin_after: u32,
    },
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Lru => write!(f, "lru"),
            Self::Lfu => write!(f, "lfu"),
            Self::LightLfu { pin_after } => write!(f, "light-lfu-{pin_after}"),
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;

    /// `lru`, `lfu`, `light-lfu` (pins after 8 hits) or `light-lfu-K`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lru" => Ok(Self::Lru),
            "lfu" => Ok(Self::Lfu),
            "light-lfu" => Ok(Self::LightLfu { pin_after: 8 }),
            _ => s
                .strip_prefix("light-lfu-")
                .and_then(|k| k.parse().ok())
                .filter(|&k| k > 0)
                .map(|pin_after| Self::LightLfu { pin_after })
                .ok_or_else(|| {
                    format!("unknown cache policy {s:?}: lru, lfu, light-lfu or light-lfu-K")
                }),
        }
    }
}

/// An eviction policy over `capacity` slots.
pub trait EvictionPolicy: Send {
    /// Asks the CPU to load what recording `key`, a miss, will touch (a batch prefetches its
    /// misses' before recording them, so their cache misses overlap).
    fn prefetch(&self, key: u64) {
        let _ = key;
    }
    /// Asks the CPU to load what a hit of the line in `slot` will touch.
    fn prefetch_slot(&self, slot: u32) {
        let _ = slot;
    }
    /// Records an access to `key`, which is not resident (a miss), before its slot is reserved.
    fn record(&mut self, key: u64);
    /// Records an access to `key`, resident in `slot` (a hit).
    fn touch(&mut self, slot: u32, key: u64);
    /// A line was inserted into a free slot.
    fn insert(&mut self, slot: u32, key: u64);
    /// A line left the cache.
    fn remove(&mut self, slot: u32);
    /// The line to evict so that `key` (a miss, already recorded) can be cached, or `None` if
    /// `key` should not be admitted (it is then served without caching).
    fn victim(&mut self, key: u64) -> Option<u32>;
    /// Slots from first to last victim, for tests.
    fn order(&self) -> Vec<u32>;
}

/// Builds the policy for `capacity` slots.
pub fn build(kind: PolicyKind, capacity: usize) -> Box<dyn EvictionPolicy> {
    match kind {
        PolicyKind::Lru => Box::new(Lru::new(capacity)),
        PolicyKind::Lfu => Box::new(Lfu::new(capacity, None)),
        PolicyKind::LightLfu { pin_after } => Box::new(Lfu::new(capacity, Some(pin_after))),
    }
}
