//! hetkv's store: embedding tables in mapped regions, the server-side optimizers, the shard logic
//! (transport-agnostic, no I/O), the daemon's configuration and an embedded in-process cluster.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod checkpoint;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod dynamic;
pub mod embedded;
pub mod identity;
pub mod metrics;

pub mod placement;
pub mod sessions;
pub mod shard;
pub mod table;
pub mod tensors;

pub use config::DaemonConfig;
pub use embedded::EmbeddedCluster;
pub use hetkv_transport::optimizer::Optimizer;
pub use placement::Placement;
pub use shard::{Shard, ShardConfig};
pub use table::Table;

use hetkv_transport::WireError;

/// Errors of the store. Each maps to a wire [`hetkv_transport::ErrorCode`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No table of that name.
    #[error("unknown table {0:?}")]
    UnknownTable(String),
    /// A table of that name exists with another spec.
    #[error("conflicting table: {0}")]
    ConflictingTable(String),
    /// The spec is invalid or too large for this shard.
    #[error("{0}")]
    InvalidSpec(String),
    /// Rows or gradients that do not match the table's dim.
    #[error("wrong dim: {0}")]
    WrongDim(String),
    /// A key outside the table or on another shard.
    #[error("{0}")]
    KeyOutOfRange(String),
    /// NaN/Inf gradients or zero counts.
    #[error("invalid gradient: {0}")]
    InvalidGradient(String),
    /// A read span outside its region.
    #[error("{0}")]
    InvalidSpan(String),
    /// Inconsistent lengths in a request.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A protocol-level refusal (such as a response above the frame limit).
    #[error("{0}")]
    Frame(WireError),
    /// An operation this table does not offer (yet), named with the reason.
    #[error("{0}")]
    Unsupported(String),
    /// Mapping or file errors.
    #[error("I/O: {0}")]
    Io(String),
    /// Bad daemon configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// A numbered push that is not claimed: forgotten, or no room to remember its number.
    #[error(transparent)]
    Session(#[from] sessions::SessionError),
    /// A checkpoint that cannot be written or restored.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
}

impl From<WireError> for StoreError {
    fn from(e: WireError) -> Self {
        Self::Frame(e)
    }
}
