//! The RDMA module (cargo feature `rdma`): verbs over the system's libibverbs through `rdma-sys`.
//!
//! - [`Device`] (`device.rs`): the probe and the open device (context, protection domain, port,
//!   GID);
//! - [`MemoryRegion`] (`mr.rs`): a registration of daemon memory (remote read only) or of a
//!   client's landing buffer, each keeping the memory it covers alive;
//! - [`QueuePair`] (`qp.rs`): one RC queue pair with its completion queue, connected by exchanging
//!   [`crate::wire::Endpoint`]s over the TCP control channel, and batched RDMA READ;
//! - [`RdmaMemory`]: a queue pair and its landing buffer as a [`RemoteMemory`], and
//!   [`RdmaTransport`], the one-sided transport over it ([`crate::onesided`]): reads of rows,
//!   version words and the table clock; pushes and control over the wrapped transport (see
//!   docs/ARCHITECTURE.md for why).
//!
//! This module and `region.rs` are the only places with `unsafe` in this crate.

/// Why RDMA cannot be used, or what failed.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// The kernel has no uverbs support.
    #[error("kernel has no RDMA support (no ib_uverbs: ibv_get_device_list failed: {0})")]
    NoKernelSupport(std::io::Error),
    /// No device is visible to libibverbs.
    #[error("no RDMA devices{0}")]
    NoDevice(String),
    /// The device's port is not active.
    #[error("port {port} of {device} is not active (state {state})")]
    PortDown {
        /// Device name.
        device: String,
        /// Port number.
        port: u8,
        /// `ibv_port_state` value.
        state: u32,
    },
    /// A verbs call failed.
    #[error("{call} failed: {source}")]
    Verbs {
        /// The call.
        call: &'static str,
        /// errno.
        source: std::io::Error,
    },
    /// A work request completed with an error.
    #[error("RDMA READ completed with {status} (vendor error {vendor})")]
    Completion {
        /// `ibv_wc_status_str`.
        status: String,
        /// Vendor error code.
        vendor: u32,
    },
    /// The queue pair failed earlier and cannot be used.
    #[error("the queue pair is unusable after an earlier error: {0}")]
    Broken(String),
}

fn verbs(call: &'static str) -> RdmaError {
    RdmaError::Verbs {
        call,
        source: std::io::Error::last_os_error(),
    }
}

mod device;
mod mr;
mod qp;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use device::Device;
use mr::Landing;
pub use mr::MemoryRegion;
pub use qp::{accept, Accepted, QueuePair, ReadOp, QUEUE_DEPTH};

use crate::client::{ShardTransport, TransportError};
use crate::onesided::{Attachment, OneSidedTransport, RemoteMemory, RemoteSpan};
use crate::wire::RegionDescriptor;

/// A shard read through RDMA, controlled (and pushed to) through `C`.
pub type RdmaTransport<C> = OneSidedTransport<RdmaMemory, C>;

/// Bytes of a client's landing buffer: the most one post brings back.
const LANDING_BYTES: usize = 1 << 20;

/// Memory of a daemon, as a READ names it: an address under a remote key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Virtual address in the daemon.
    pub addr: u64,
    /// Remote key of its registration.
    pub rkey: u32,
    /// Bytes.
    pub len: u64,
}

struct Conn {
    qp: QueuePair,
    landing: Landing,
    /// Why the queue pair is unusable, after a failure.
    broken: Option<String>,
}

/// A daemon's registered memory, read with RDMA READ through one queue pair (posts are
/// serialized on it) into a registered landing buffer.
pub struct RdmaMemory {
    device: Arc<Device>,
    conn: Mutex<Conn>,
    read_bytes: AtomicU64,
}

impl std::fmt::Debug for RdmaMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaMemory")
            .field("device", &self.device.name())
            .finish_non_exhaustive()
    }
}

impl RdmaMemory {
    /// Connects a queue pair to the shard behind `control`, exchanging endpoints over it.
    pub fn connect<C: ShardTransport>(
        device: Arc<Device>,
        control: &C,
    ) -> Result<Self, TransportError> {
        let fail = |e: RdmaError| TransportError::Protocol {
            addr: control.addr().to_string(),
            message: format!("RDMA set-up: {e}"),
        };
        let qp = QueuePair::new(&device).map_err(fail)?;
        let theirs = control.rdma_connect(&qp.endpoint())?;
        qp.connect(&theirs).map_err(fail)?;
        let landing = Landing::new(&device, LANDING_BYTES).map_err(fail)?;
        Ok(Self {
            device,
            conn: Mutex::new(Conn {
                qp,
                landing,
                broken: None,
            }),
            read_bytes: AtomicU64::new(0),
        })
    }
}

impl RemoteMemory for RdmaMemory {
    type Region = RemoteRegion;

    fn attach(&self, desc: &RegionDescriptor) -> Result<Attachment<RemoteRegion>, String> {
        if desc.rkey == 0 || desc.clock_rkey == 0 {
            return Err("not registered for RDMA on the daemon".into());
        }
        Ok(Attachment {
            rows: RemoteRegion {
                addr: desc.addr,
                rkey: desc.rkey,
                len: desc.len,
            },
            clock: RemoteRegion {
                addr: desc.clock_addr,
                rkey: desc.clock_rkey,
                len: 8,
            },
        })
    }

    /// Posts the spans in batches that fit the landing buffer (each batch pipelined by
    /// [`QueuePair`]'s chains). A completion error retires the queue pair: later reads fail at
    /// once with the reason.
    fn read(
        &self,
        spans: &[RemoteSpan<'_, RemoteRegion>],
        each: &mut dyn FnMut(usize, &[u8]),
    ) -> io::Result<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &conn.broken {
            return Err(io::Error::other(RdmaError::Broken(why.clone())));
        }
        let cap = conn.landing.len() as u64;
        let mut start = 0;
        let mut batch = Vec::new();
        while start < spans.len() {
            batch.clear();
            let mut used = 0u64;
            for s in &spans[start..] {
                let len8 = u64::from(s.len).div_ceil(8) * 8;
                if len8 > cap || s.offset.saturating_add(u64::from(s.len)) > s.region.len {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "a read of {} bytes at {} of a region of {} (landing buffer {cap})",
                            s.len, s.offset, s.region.len
                        ),
                    ));
                }
                if used + len8 > cap {
                    break;
                }
                batch.push(ReadOp {
                    remote_addr: s.region.addr + s.offset,
                    rkey: s.region.rkey,
                    len: s.len,
                    offset: used,
                });
                used += len8;
            }
            if let Err(e) = conn.qp.read(&batch, &conn.landing) {
                conn.broken = Some(e.to_string());
                return Err(io::Error::other(e));
            }
            for (i, op) in batch.iter().enumerate() {
                each(
                    start + i,
                    conn.landing.bytes(op.offset as usize, op.len as usize),
                );
            }
            self.read_bytes.fetch_add(used, Ordering::Relaxed);
            start += batch.len();
        }
        Ok(())
    }

    fn bytes_read(&self) -> u64 {
        self.read_bytes.load(Ordering::Relaxed)
    }

    fn can_reconnect(&self) -> bool {
        true
    }

    /// A new queue pair, its endpoints exchanged over `control` (which holds it on a connection
    /// of its own), replaces the old one, broken or not; the landing buffer stays.
    fn reconnect(&self, control: &dyn ShardTransport) -> Result<(), TransportError> {
        let fail = |e: RdmaError| TransportError::Protocol {
            addr: control.addr().to_string(),
            message: format!("RDMA set-up: {e}"),
        };
        let qp = QueuePair::new(&self.device).map_err(fail)?;
        let theirs = control.rdma_connect(&qp.endpoint())?;
        qp.connect(&theirs).map_err(fail)?;
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.qp = qp;
        conn.broken = None;
        Ok(())
    }
}

impl<C: ShardTransport> OneSidedTransport<RdmaMemory, C> {
    /// Connects a queue pair to the shard behind `control` (endpoints exchanged over it). On
    /// failure, hands the control transport back with the reason.
    pub fn connect(device: Arc<Device>, control: C) -> Result<Self, (C, TransportError)> {
        match RdmaMemory::connect(device, &control) {
            Ok(memory) => Ok(Self::with_memory(memory, control)),
            Err(e) => Err((control, e)),
        }
    }

    /// One RDMA READ of `len` bytes at `addr` under `rkey`, unverified (diagnostics: what the NIC
    /// returns). A completion error comes back as an error, and the queue pair is then refused
    /// for further use.
    pub fn read_remote(&self, addr: u64, rkey: u32, len: u32) -> Result<Vec<u8>, TransportError> {
        let region = RemoteRegion {
            addr,
            rkey,
            len: u64::from(len),
        };
        let span = RemoteSpan {
            region: &region,
            offset: 0,
            len,
        };
        let mut out = Vec::new();
        self.memory()
            .read(&[span], &mut |_, bytes| out.extend_from_slice(bytes))
            .map_err(|source| TransportError::Io {
                addr: self.addr().to_string(),
                source,
            })?;
        Ok(out)
    }
}
