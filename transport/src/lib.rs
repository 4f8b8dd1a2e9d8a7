//! hetkv's transport layer: what travels between trainers and store daemons, and how.
//!
//! - [`region`]: mapped memory regions (the shared-memory module, and the only `unsafe` here);
//! - [`row`]: the row format of DESIGN section 4, its writer protocol and its verifying reader;
//! - [`spec`]: table specifications;
//! - [`wire`]: frames, headers and payload arrays of the control protocol;
//! - [`service`]: the server side of the protocol, sans-IO;
//! - [`client`]: the client-side interface every backend implements;
//! - [`shm`]: the shared-memory backend (one-sided reads of a same-host daemon's regions);
//! - `rdma` (feature `rdma`): the RDMA backend over libibverbs.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
// `unsafe` lives in the shared-memory module (`region`) and the RDMA module only.
#![deny(unsafe_code)]

pub mod client;
#[cfg(feature = "rdma")]
#[allow(unsafe_code)]
pub mod rdma;
#[allow(unsafe_code)]
pub mod region;
pub mod row;
pub mod service;
pub mod shm;
pub mod spec;
pub mod wire;

pub use client::{PushRef, ShardTransport, StaleRows, Traffic, TrafficCounters, TransportError};
pub use region::{Region, SharedRegion};
pub use row::RowLayout;
pub use service::{Outcome, Response, ServerCounters, Session, ShardService};
pub use shm::{ShmStats, ShmTransport, ShmUnavailable};
pub use spec::{Initializer, OptimizerSpec, SpecError, TableInfo, TableSpec};
pub use wire::{ErrorCode, RegionDescriptor, ShardStats, Span, TableStats, WireError};
