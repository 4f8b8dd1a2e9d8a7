//! hetkv's transport layer: what travels between trainers and store daemons, and how.
//!
//! - [`region`]: mapped memory regions (the shared-memory module, and the only `unsafe` here);
//! - [`row`]: the row format of DESIGN section 4, its writer protocol and its verifying reader;
//! - [`keyed`]: a dynamic table's region: keyed rows found through buckets of key digests;
//! - [`hash`]: the one 64-bit mixing function; [`sketch`]: the count-min frequency sketch;
//! - [`spec`]: table specifications;
//! - [`optimizer`]: the optimizers' maths, shared by the shard and the cache that mirrors it;
//! - [`routing`]: which shard holds a row, and at which local index;
//! - [`wire`]: frames, headers and payload arrays of the control protocol;
//! - [`codec`]: each bulk operation's request and answer bytes, encoded and decoded once;
//! - [`service`]: the server side of the protocol, sans-IO;
//! - [`auth`]: challenge-response authentication (HMAC-SHA256 over a daemon nonce);
//! - [`client`]: the client-side interface every backend implements;
//! - [`onesided`]: the one transport over memory a client reads without the daemon's CPU;
//! - [`shm`]: the shared-memory backend (one-sided reads of a same-host daemon's regions);
//! - `rdma` (feature `rdma`): the RDMA backend over libibverbs.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
// `unsafe` lives in the shared-memory module (`region`) and the RDMA module only.
#![deny(unsafe_code)]

pub mod auth;
pub mod client;
pub mod codec;
pub mod hash;
pub mod incarnation;
pub mod interrupt;
pub mod keyed;
pub mod onesided;
pub mod optimizer;
pub mod pushes;
#[cfg(feature = "rdma")]
#[allow(unsafe_code)]
pub mod rdma;
#[allow(unsafe_code)]
pub mod region;
pub mod routing;
pub mod row;
pub mod service;
pub mod shm;
pub mod sketch;
pub mod spec;
pub mod wire;

pub use client::{
    Carried, Exchange, Produced, Pulled, PushOutcome, PushRef, Restarts, RowStates, ShardTransport,
    StaleQuery, StaleRows, Traffic, TrafficCounters, TransportError,
};
pub use onesided::{OneSidedStats, OneSidedTransport, RemoteMemory};
pub use optimizer::{Optimizer, StateShape};
pub use region::{Region, SharedRegion};
pub use routing::Routing;
pub use row::RowLayout;
pub use service::{Outcome, Response, ServerCounters, Session, ShardService};
pub use shm::{ShmMemory, ShmTransport, ShmUnavailable};
pub use spec::{
    Admission, DynamicSpec, Eviction, Initializer, OptimizerSpec, SpecError, TableInfo, TableSpec,
    DEFAULT_BUCKETS, MAX_BUCKETS,
};
pub use wire::{ErrorCode, RegionDescriptor, ShardStats, Span, TableStats, WireError};
