//! The RDMA choice of [`crate::TransportKind`]: wraps the connected control transports in RDMA
//! transports when this build has the `rdma` feature and a device works, or hands them back with
//! the reason.

use std::sync::Arc;

use hetkv_fallback_tcp::TcpShardClient;
use hetkv_transport::ShardTransport;

/// The shards, or the control transports back with the reason RDMA cannot be used.
pub(crate) type Wrapped = Result<Vec<Arc<dyn ShardTransport>>, (Vec<TcpShardClient>, String)>;

/// Without the `rdma` feature there is no RDMA backend.
#[cfg(not(feature = "rdma"))]
pub(crate) fn wrap(controls: Vec<TcpShardClient>) -> Wrapped {
    Err((
        controls,
        "this build has no RDMA support (cargo feature `rdma`)".into(),
    ))
}

/// Probes the device, then connects one queue pair per shard over its control channel.
#[cfg(feature = "rdma")]
pub(crate) fn wrap(controls: Vec<TcpShardClient>) -> Wrapped {
    use hetkv_transport::rdma::{self, RdmaTransport};
    let device = match rdma::Device::open_first() {
        Ok(d) => Arc::new(d),
        Err(e) => return Err((controls, e.to_string())),
    };
    let mut shards: Vec<Arc<dyn ShardTransport>> = Vec::with_capacity(controls.len());
    let mut rest = controls.into_iter();
    while let Some(c) = rest.next() {
        match RdmaTransport::connect(device.clone(), c) {
            Ok(t) => shards.push(Arc::new(t)),
            Err((c, e)) => {
                // Dropping the transports already made tears their queue pairs down; their
                // control connections are reopened by the caller's fallback, so hand back the
                // remaining ones with this one.
                let mut back = vec![c];
                back.extend(rest);
                drop(shards);
                return Err((back, format!("connecting a queue pair: {e}")));
            }
        }
    }
    Ok(shards)
}
