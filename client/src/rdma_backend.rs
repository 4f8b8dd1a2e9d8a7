//! The RDMA choice of [`crate::TransportKind`], one shard at a time: an RDMA transport over a
//! shard's connected control transport when this build has the `rdma` feature and a device
//! works, or the control transport handed back with the reason, so that the caller falls back to
//! shared memory or TCP for that shard alone.

use std::sync::Arc;

use hetkv_fallback_tcp::TcpShardClient;
use hetkv_transport::ShardTransport;

/// The device RDMA transports are made on.
#[cfg(feature = "rdma")]
pub(crate) type Device = Arc<hetkv_transport::rdma::Device>;
/// Without the `rdma` feature there is no device.
#[cfg(not(feature = "rdma"))]
pub(crate) enum Device {}

/// Opens the first working RDMA device, or says why there is none.
#[cfg(feature = "rdma")]
pub(crate) fn open_device() -> Result<Device, String> {
    hetkv_transport::rdma::Device::open_first()
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Without the `rdma` feature there is no RDMA backend.
#[cfg(not(feature = "rdma"))]
pub(crate) fn open_device() -> Result<Device, String> {
    Err("this build has no RDMA support (cargo feature `rdma`)".into())
}

/// Connects a queue pair to the shard behind `control`, or hands `control` back with the reason.
#[cfg(feature = "rdma")]
// The error hands the connection back for the fallback; it happens once per shard and connect.
#[allow(clippy::result_large_err)]
pub(crate) fn connect(
    device: &Device,
    control: TcpShardClient,
) -> Result<Arc<dyn ShardTransport>, (TcpShardClient, String)> {
    use hetkv_transport::rdma::RdmaTransport;
    match RdmaTransport::connect(device.clone(), control) {
        Ok(t) => Ok(Arc::new(t)),
        Err((control, e)) => Err((control, format!("connecting a queue pair: {e}"))),
    }
}

/// Without the `rdma` feature no device exists, so this is never called.
#[cfg(not(feature = "rdma"))]
// The error hands the connection back for the fallback; it happens once per shard and connect.
#[allow(clippy::result_large_err)]
pub(crate) fn connect(
    device: &Device,
    _control: TcpShardClient,
) -> Result<Arc<dyn ShardTransport>, (TcpShardClient, String)> {
    match *device {}
}
