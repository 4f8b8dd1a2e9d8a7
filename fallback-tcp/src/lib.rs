//! hetkv's TCP transport: a tokio server that carries a shard's frames ([`server`]) and a
//! blocking, pooled client ([`client`]) implementing [`hetkv_transport::ShardTransport`].
//!
//! Used where no RDMA device exists, and as the control channel of the other transports.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod client;
pub mod ledger;
pub mod link;
pub mod server;
pub mod stream;

pub use client::{ClientConfig, TcpShardClient};
pub use link::LinkLimit;
pub use server::{ServerConfig, TcpServer};
