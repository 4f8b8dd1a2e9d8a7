//! The RDMA module (cargo feature `rdma`): verbs over the system's libibverbs through `rdma-sys`.
//!
//! - [`Device`]: the probe and the open device (context, protection domain, port, GID);
//! - [`MemoryRegion`]: a registration of daemon memory (remote read only) or of a client buffer;
//! - [`QueuePair`]: one RC queue pair with its completion queue, connected by exchanging
//!   [`Endpoint`]s over the TCP control channel, and batched RDMA READ;
//! - [`RdmaTransport`]: the client backend: one-sided reads of rows, version words and the table
//!   clock; pushes and control over the wrapped transport (see docs/ARCHITECTURE.md for why).
//!
//! This module and `region.rs` are the only places with `unsafe` in this crate.

use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::{Arc, Mutex};

use rdma_sys as ibv;

use crate::client::{pull_into, PushRef, ShardTransport, StaleRows, Traffic, TransportError};
use crate::row::{self, RowLayout, DEFAULT_READ_ATTEMPTS};
use crate::spec::{TableInfo, TableSpec};
use crate::wire::{
    CreateResponse, Endpoint, HelloResponse, PushResponse, RegionDescriptor, ShardStats, Since,
    Span, NOT_CACHED,
};

/// Link layer value of Ethernet ports (RoCE) in `ibv_port_attr::link_layer` (verbs.h).
const LINK_LAYER_ETHERNET: u8 = 2;
/// Work requests per queue pair: the most a batch keeps outstanding.
pub const QUEUE_DEPTH: u32 = 128;

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

/// An open device: context, protection domain, and the port and GID used for connections.
#[derive(Debug)]
pub struct Device {
    ctx: *mut ibv::ibv_context,
    pd: *mut ibv::ibv_pd,
    name: String,
    port: u8,
    lid: u16,
    gid: [u8; 16],
    gid_index: i32,
    ethernet: bool,
    mtu: u32,
}

// SAFETY: verbs objects (context, PD, MR, CQ, QP) may be used from any thread (libibverbs is
// thread-safe); this crate serializes the use of each queue pair and CQ behind a mutex.
unsafe impl Send for Device {}
// SAFETY: as above; `Device` only hands out raw pointers to calls that libibverbs makes
// thread-safe.
unsafe impl Sync for Device {}

impl Device {
    /// Opens the first device whose port 1 is active, or names the reason there is none.
    pub fn open_first() -> Result<Self, RdmaError> {
        let mut n = 0;
        // SAFETY: `n` is a valid out-pointer; the list is freed below on every path.
        let list = unsafe { ibv::ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(RdmaError::NoKernelSupport(std::io::Error::last_os_error()));
        }
        let result = (|| {
            if n <= 0 {
                let sysfs = std::path::Path::new("/sys/class/infiniband");
                let hint = if sysfs.is_dir() {
                    " (the kernel has devices in /sys/class/infiniband but libibverbs has no \
                     provider for them: install ibverbs-providers)"
                } else {
                    " (no /sys/class/infiniband: no NIC, and no rxe or siw link)"
                };
                return Err(RdmaError::NoDevice(hint.into()));
            }
            // SAFETY: `list` holds `n` valid device pointers while it is not freed.
            let dev = unsafe { *list };
            Self::open(dev)
        })();
        // SAFETY: `list` came from ibv_get_device_list; opened contexts outlive the list.
        unsafe { ibv::ibv_free_device_list(list) };
        result
    }

    fn open(dev: *mut ibv::ibv_device) -> Result<Self, RdmaError> {
        // SAFETY: `dev` is a live entry of the device list; the name is a NUL-terminated string
        // owned by it, copied before the list is freed.
        let name = unsafe { CStr::from_ptr(ibv::ibv_get_device_name(dev)) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: as above.
        let ctx = unsafe { ibv::ibv_open_device(dev) };
        if ctx.is_null() {
            return Err(verbs("ibv_open_device"));
        }
        let mut device = Self {
            ctx,
            pd: std::ptr::null_mut(),
            name,
            port: 1,
            lid: 0,
            gid: [0; 16],
            gid_index: 0,
            ethernet: false,
            mtu: ibv::ibv_mtu::IBV_MTU_1024,
        };
        // From here on, `Drop` closes what was opened.
        // SAFETY: `ctx` is an open context.
        device.pd = unsafe { ibv::ibv_alloc_pd(ctx) };
        if device.pd.is_null() {
            return Err(verbs("ibv_alloc_pd"));
        }
        // SAFETY: a zeroed port attribute struct is valid input; `ctx` is open.
        let mut attr: ibv::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `attr` is a valid out-pointer for the call.
        if unsafe { ibv::___ibv_query_port(ctx, device.port, &mut attr) } != 0 {
            return Err(verbs("ibv_query_port"));
        }
        if attr.state != ibv::ibv_port_state::IBV_PORT_ACTIVE {
            return Err(RdmaError::PortDown {
                device: device.name.clone(),
                port: device.port,
                state: attr.state,
            });
        }
        device.lid = attr.lid;
        device.ethernet = attr.link_layer == LINK_LAYER_ETHERNET;
        device.mtu = attr.active_mtu.min(ibv::ibv_mtu::IBV_MTU_4096);
        // RoCE needs a GID: prefer an IPv4-mapped one (RoCE v2 over IPv4), else index 0.
        let mut chosen = None;
        for i in 0..attr.gid_tbl_len.max(0) {
            // SAFETY: a GID is plain bytes; all zeros is valid.
            let mut gid: ibv::ibv_gid = unsafe { std::mem::zeroed() };
            // SAFETY: `gid` is a valid out-pointer; `i` is below the table length.
            if unsafe { ibv::ibv_query_gid(ctx, device.port, i, &mut gid) } != 0 {
                continue;
            }
            // SAFETY: every bit pattern of the union is a valid byte array.
            let raw = unsafe { gid.raw };
            let v4_mapped = raw[..10].iter().all(|&b| b == 0) && raw[10] == 0xff && raw[11] == 0xff;
            if v4_mapped {
                chosen = Some((i, raw));
                break;
            }
            if i == 0 && raw.iter().any(|&b| b != 0) {
                chosen.get_or_insert((0, raw));
            }
        }
        if let Some((i, raw)) = chosen {
            device.gid_index = i;
            device.gid = raw;
        } else if device.ethernet {
            return Err(RdmaError::NoDevice(format!(
                ": {} has no GID on port {} (give its netdev an IP address)",
                device.name, device.port
            )));
        }
        Ok(device)
    }

    /// The device's name (`rxe0`, `mlx5_0`).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: the PD and context were created by `open`; every MR, CQ and QP made from them
        // holds an `Arc<Device>` and is gone by now.
        unsafe {
            if !self.pd.is_null() {
                ibv::ibv_dealloc_pd(self.pd);
            }
            ibv::ibv_close_device(self.ctx);
        }
    }
}

/// A registered span of memory.
#[derive(Debug)]
pub struct MemoryRegion {
    mr: *mut ibv::ibv_mr,
    _device: Arc<Device>,
}

// SAFETY: an MR handle may be used and deregistered from any thread.
unsafe impl Send for MemoryRegion {}
// SAFETY: only the immutable keys are read through `&self`.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers `len` bytes at `addr` for remote reads only: what a daemon exposes.
    ///
    /// The memory must stay mapped until this registration is dropped; the daemon's regions are
    /// never unmapped while their table lives, and the table owns the registration.
    pub fn remote_read(device: &Arc<Device>, addr: u64, len: u64) -> Result<Self, RdmaError> {
        Self::register(
            device,
            addr,
            len,
            ibv::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0,
        )
    }

    fn register(device: &Arc<Device>, addr: u64, len: u64, access: u32) -> Result<Self, RdmaError> {
        // SAFETY: the PD is live; libibverbs pins the pages and only the NIC accesses them, as
        // `access` allows. The caller keeps the memory mapped while the registration exists.
        let mr = unsafe {
            ibv::ibv_reg_mr(
                device.pd,
                addr as *mut std::ffi::c_void,
                len as usize,
                access as i32,
            )
        };
        if mr.is_null() {
            return Err(verbs("ibv_reg_mr"));
        }
        Ok(Self {
            mr,
            _device: device.clone(),
        })
    }

    /// The remote key.
    pub fn rkey(&self) -> u32 {
        // SAFETY: `mr` is a live registration.
        unsafe { (*self.mr).rkey }
    }

    fn lkey(&self) -> u32 {
        // SAFETY: `mr` is a live registration.
        unsafe { (*self.mr).lkey }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered by `register`, deregistered once.
        unsafe { ibv::ibv_dereg_mr(self.mr) };
    }
}

/// A client's registered landing buffer for READs.
#[derive(Debug)]
struct Landing {
    buf: Vec<u64>,
    mr: MemoryRegion,
}

impl Landing {
    fn new(device: &Arc<Device>, bytes: usize) -> Result<Self, RdmaError> {
        let buf = vec![0u64; bytes.div_ceil(8).max(1)];
        let mr = MemoryRegion::register(
            device,
            buf.as_ptr() as u64,
            (buf.len() * 8) as u64,
            ibv::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0,
        )?;
        Ok(Self { buf, mr })
    }

    fn len(&self) -> usize {
        self.buf.len() * 8
    }

    fn addr(&self) -> u64 {
        self.buf.as_ptr() as u64
    }

    /// The bytes the NIC wrote, after the completion that covers them was polled.
    fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(
            offset + len <= self.len(),
            "a span inside the landing buffer"
        );
        // SAFETY: the span lies in the buffer (checked); the NIC finished writing it before the
        // completion this follows and writes it again only during a later `QueuePair::read`,
        // which needs `&Landing` while no slice from here is alive (the caller's closure ends
        // first); u8 has no invalid values.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>().add(offset), len) }
    }
}

/// One RDMA READ: `len` bytes from `remote_addr` (under `rkey`) to `offset` of the landing buffer.
#[derive(Clone, Copy, Debug)]
pub struct ReadOp {
    /// Remote address.
    pub remote_addr: u64,
    /// Remote key.
    pub rkey: u32,
    /// Bytes.
    pub len: u32,
    /// Offset in the landing buffer.
    pub offset: u64,
}

/// An RC queue pair and its completion queue.
#[derive(Debug)]
pub struct QueuePair {
    device: Arc<Device>,
    cq: *mut ibv::ibv_cq,
    qp: *mut ibv::ibv_qp,
    psn: u32,
}

// SAFETY: a QP and its CQ may be used from any thread; users serialize posting and polling (the
// transport holds it behind a mutex, the daemon never posts on its QPs).
unsafe impl Send for QueuePair {}

impl QueuePair {
    /// Creates an RC queue pair in the INIT state, allowing remote reads.
    pub fn new(device: &Arc<Device>) -> Result<Self, RdmaError> {
        // SAFETY: the context is open; no completion channel.
        let cq = unsafe {
            ibv::ibv_create_cq(
                device.ctx,
                QUEUE_DEPTH as i32 * 2,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if cq.is_null() {
            return Err(verbs("ibv_create_cq"));
        }
        let mut qp = Self {
            device: device.clone(),
            cq,
            qp: std::ptr::null_mut(),
            psn: std::process::id().wrapping_mul(2654435761) & 0xff_ffff,
        };
        // SAFETY: zero is a valid initial value for every field of the init attributes.
        let mut init: ibv::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq;
        init.recv_cq = cq;
        init.qp_type = ibv::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap.max_send_wr = QUEUE_DEPTH;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: PD and CQ are live; `init` is fully set.
        qp.qp = unsafe { ibv::ibv_create_qp(device.pd, &mut init) };
        if qp.qp.is_null() {
            return Err(verbs("ibv_create_qp"));
        }
        // SAFETY: zeroed attributes are valid; only the masked fields are read.
        let mut attr: ibv::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv::ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = device.port;
        attr.qp_access_flags = ibv::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        let mask = ibv::ibv_qp_attr_mask::IBV_QP_STATE
            | ibv::ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ibv::ibv_qp_attr_mask::IBV_QP_PORT
            | ibv::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        qp.modify(&mut attr, mask, "ibv_modify_qp(INIT)")?;
        Ok(qp)
    }

    fn modify(
        &self,
        attr: &mut ibv::ibv_qp_attr,
        mask: ibv::ibv_qp_attr_mask,
        call: &'static str,
    ) -> Result<(), RdmaError> {
        // SAFETY: the QP is live; `attr` holds every field `mask` names.
        let rc = unsafe { ibv::ibv_modify_qp(self.qp, attr, mask.0 as i32) };
        if rc != 0 {
            return Err(RdmaError::Verbs {
                call,
                source: std::io::Error::from_raw_os_error(rc),
            });
        }
        Ok(())
    }

    /// This side's endpoint, for the peer.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            // SAFETY: the QP is live.
            qpn: unsafe { (*self.qp).qp_num },
            psn: self.psn,
            lid: self.device.lid,
            gid: self.device.gid,
            mtu: self.device.mtu,
        }
    }

    /// Moves to ready-to-send, connected to `remote`.
    pub fn connect(&self, remote: &Endpoint) -> Result<(), RdmaError> {
        // SAFETY: zeroed attributes are valid; only the masked fields are read.
        let mut attr: ibv::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv::ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = self.device.mtu.min(remote.mtu);
        attr.dest_qp_num = remote.qpn;
        attr.rq_psn = remote.psn;
        attr.max_dest_rd_atomic = 16;
        attr.min_rnr_timer = 12;
        attr.ah_attr.port_num = self.device.port;
        attr.ah_attr.dlid = remote.lid;
        if self.device.ethernet || remote.gid.iter().any(|&b| b != 0) {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid = ibv::ibv_gid { raw: remote.gid };
            attr.ah_attr.grh.sgid_index = self.device.gid_index as u8;
            attr.ah_attr.grh.hop_limit = 64;
        }
        let mask = ibv::ibv_qp_attr_mask::IBV_QP_STATE
            | ibv::ibv_qp_attr_mask::IBV_QP_AV
            | ibv::ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv::ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv::ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv::ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv::ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut attr, mask, "ibv_modify_qp(RTR)")?;
        // SAFETY: as above.
        let mut attr: ibv::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv::ibv_qp_state::IBV_QPS_RTS;
        attr.timeout = 14;
        attr.retry_cnt = 7;
        attr.rnr_retry = 7;
        attr.sq_psn = self.psn;
        attr.max_rd_atomic = 16;
        let mask = ibv::ibv_qp_attr_mask::IBV_QP_STATE
            | ibv::ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv::ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv::ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv::ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv::ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut attr, mask, "ibv_modify_qp(RTS)")
    }

    /// Runs `ops` as RDMA READs into `landing`, pipelined: chains of `QUEUE_DEPTH / 2` work
    /// requests, one post each, only the last of a chain signalled. A chain is posted while the
    /// one before it is in flight, and its predecessor's completion is awaited before the next
    /// post, so never more than `QUEUE_DEPTH` requests are outstanding. Every op must lie inside
    /// `landing`.
    fn read(&self, ops: &[ReadOp], landing: &Landing) -> Result<(), RdmaError> {
        let n = ops.len();
        if n == 0 {
            return Ok(());
        }
        let chain = (QUEUE_DEPTH / 2) as usize;
        let mut sges: Vec<ibv::ibv_sge> = ops
            .iter()
            .map(|op| {
                assert!(op.offset + op.len as u64 <= landing.len() as u64);
                // SAFETY: an all-zero scatter-gather entry is valid; every field is set next.
                let mut sge: ibv::ibv_sge = unsafe { std::mem::zeroed() };
                sge.addr = landing.addr() + op.offset;
                sge.length = op.len;
                sge.lkey = landing.mr.lkey();
                sge
            })
            .collect();
        let mut wrs: Vec<ibv::ibv_send_wr> = (0..n)
            // SAFETY: an all-zero work request (null pointers, zero lengths) is valid.
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        let sge_base = sges.as_mut_ptr();
        let wr_base = wrs.as_mut_ptr();
        for (i, op) in ops.iter().enumerate() {
            let ends_chain = (i + 1) % chain == 0 || i + 1 == n;
            let wr = &mut wrs[i];
            wr.wr_id = i as u64;
            // SAFETY: `i` and `i + 1` (when it exists) index live elements of the two vectors,
            // which are neither moved nor freed until the last post below returns.
            wr.sg_list = unsafe { sge_base.add(i) };
            wr.num_sge = 1;
            wr.opcode = ibv::ibv_wr_opcode::IBV_WR_RDMA_READ;
            wr.send_flags = if ends_chain {
                ibv::ibv_send_flags::IBV_SEND_SIGNALED.0
            } else {
                0
            };
            wr.wr = ibv::wr_t {
                rdma: ibv::rdma_t {
                    remote_addr: op.remote_addr,
                    rkey: op.rkey,
                },
            };
            wr.next = if ends_chain {
                std::ptr::null_mut()
            } else {
                // SAFETY: as above.
                unsafe { wr_base.add(i + 1) }
            };
        }
        let mut in_flight: Option<u64> = None;
        for start in (0..n).step_by(chain) {
            let mut bad: *mut ibv::ibv_send_wr = std::ptr::null_mut();
            // SAFETY: the chain from `start` and its SGEs are valid and alive for the call (the
            // verbs library copies them into the send queue); the landing buffer is registered
            // for local writes and lives in the connection beyond every completion.
            let rc = unsafe { ibv::ibv_post_send(self.qp, wr_base.add(start), &mut bad) };
            if rc != 0 {
                return Err(RdmaError::Verbs {
                    call: "ibv_post_send",
                    source: std::io::Error::from_raw_os_error(rc),
                });
            }
            if let Some(previous) = in_flight.take() {
                self.wait(previous)?;
            }
            in_flight = Some(((start + chain).min(n) - 1) as u64);
        }
        match in_flight {
            Some(last) => self.wait(last),
            None => Ok(()),
        }
    }

    /// Polls until the signalled request `wr_id` completes; an error completion is an error.
    fn wait(&self, wr_id: u64) -> Result<(), RdmaError> {
        let started = std::time::Instant::now();
        loop {
            // SAFETY: a zeroed work completion is a valid out-buffer.
            let mut wc: ibv::ibv_wc = unsafe { std::mem::zeroed() };
            // SAFETY: the CQ is live; one entry fits `wc`.
            let n = unsafe { ibv::ibv_poll_cq(self.cq, 1, &mut wc) };
            if n < 0 {
                return Err(verbs("ibv_poll_cq"));
            }
            if n == 0 {
                if started.elapsed() > std::time::Duration::from_secs(30) {
                    return Err(RdmaError::Broken("no completion within 30 s".into()));
                }
                std::hint::spin_loop();
                continue;
            }
            if wc.status != ibv::ibv_wc_status::IBV_WC_SUCCESS {
                // SAFETY: returns a static string for any status.
                let status = unsafe { CStr::from_ptr(ibv::ibv_wc_status_str(wc.status)) }
                    .to_string_lossy()
                    .into_owned();
                return Err(RdmaError::Completion {
                    status,
                    vendor: wc.vendor_err,
                });
            }
            if wc.wr_id == wr_id {
                return Ok(());
            }
        }
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created by `new`; destroyed once, the QP before its CQ.
        unsafe {
            if !self.qp.is_null() {
                ibv::ibv_destroy_qp(self.qp);
            }
            ibv::ibv_destroy_cq(self.cq);
        }
    }
}

/// A daemon's side of one client connection: the queue pair the client reads through. It lives
/// as long as the control connection that set it up.
#[derive(Debug)]
pub struct Accepted {
    _qp: QueuePair,
}

/// Daemon side: creates a queue pair connected to `client` and returns it with this side's
/// endpoint.
pub fn accept(device: &Arc<Device>, client: &Endpoint) -> Result<(Endpoint, Accepted), RdmaError> {
    let qp = QueuePair::new(device)?;
    qp.connect(client)?;
    Ok((qp.endpoint(), Accepted { _qp: qp }))
}

/// One table as the client reads it.
#[derive(Debug, Clone)]
struct Remote {
    desc: RegionDescriptor,
    layout: RowLayout,
}

struct Conn {
    qp: QueuePair,
    landing: Landing,
    broken: Option<String>,
}

/// A shard read through RDMA, controlled (and pushed to) through `C`.
pub struct RdmaTransport<C> {
    control: C,
    device: Arc<Device>,
    conn: Mutex<Conn>,
    tables: Mutex<HashMap<String, Remote>>,
    attempts: u32,
    read_bytes: std::sync::atomic::AtomicU64,
    torn: std::sync::atomic::AtomicU64,
}

impl<C> std::fmt::Debug for RdmaTransport<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("device", &self.device.name)
            .finish_non_exhaustive()
    }
}

const LANDING_BYTES: usize = 1 << 20;

impl<C: ShardTransport> RdmaTransport<C> {
    /// Connects a queue pair to the shard behind `control` (endpoints exchanged over it). On
    /// failure, hands the control transport back with the reason.
    pub fn connect(device: Arc<Device>, control: C) -> Result<Self, (C, TransportError)> {
        let setup = || -> Result<Conn, TransportError> {
            let fail = |e: RdmaError| TransportError::Protocol {
                addr: control.addr().to_string(),
                message: format!("RDMA set-up: {e}"),
            };
            let qp = QueuePair::new(&device).map_err(fail)?;
            let theirs = control.rdma_connect(&qp.endpoint())?;
            qp.connect(&theirs).map_err(fail)?;
            let landing = Landing::new(&device, LANDING_BYTES).map_err(fail)?;
            Ok(Conn {
                qp,
                landing,
                broken: None,
            })
        };
        match setup() {
            Ok(conn) => Ok(Self {
                control,
                device,
                conn: Mutex::new(conn),
                tables: Mutex::new(HashMap::new()),
                attempts: DEFAULT_READ_ATTEMPTS,
                read_bytes: Default::default(),
                torn: Default::default(),
            }),
            Err(e) => Err((control, e)),
        }
    }

    /// Torn row copies (odd seq or a checksum mismatch) discarded and read again.
    pub fn torn_retries(&self) -> u64 {
        self.torn.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// RDMA failures are failures of the link to the shard, as an I/O error is for TCP.
    fn err(&self, e: RdmaError) -> TransportError {
        TransportError::Io {
            addr: self.control.addr().to_string(),
            source: std::io::Error::other(e),
        }
    }

    fn remote(&self, table: &str) -> Result<Remote, TransportError> {
        if let Some(r) = self
            .tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(table)
        {
            return Ok(r.clone());
        }
        let desc = self.control.region_info(table)?;
        if desc.rkey == 0 || desc.clock_rkey == 0 {
            return Err(TransportError::Protocol {
                addr: self.control.addr().to_string(),
                message: format!("table {table} is not registered for RDMA on the daemon"),
            });
        }
        let remote = Remote {
            layout: RowLayout::new(desc.dim),
            desc,
        };
        self.tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(table.to_string(), remote.clone());
        Ok(remote)
    }

    fn local(&self, r: &Remote, key: u64) -> Option<u64> {
        let hello = self.control.hello();
        r.desc.local_row(key, hello.shard, hello.shards)
    }

    /// Runs `ops` (each at most the landing buffer) and hands each op's bytes to `each`, in
    /// batches that fit the landing buffer.
    fn run(
        &self,
        ops: &[(u64, u32, u32)],
        mut each: impl FnMut(usize, &[u8]),
    ) -> Result<(), TransportError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &conn.broken {
            return Err(self.err(RdmaError::Broken(why.clone())));
        }
        let cap = conn.landing.len() as u64;
        let mut start = 0;
        while start < ops.len() {
            let mut batch = Vec::new();
            let mut used = 0u64;
            for &(remote_addr, rkey, len) in &ops[start..] {
                let len8 = (len as u64).div_ceil(8) * 8;
                if used + len8 > cap && !batch.is_empty() {
                    break;
                }
                if len8 > cap {
                    return Err(TransportError::InvalidRequest {
                        addr: self.control.addr().to_string(),
                        message: format!("a read of {len} bytes exceeds the landing buffer"),
                    });
                }
                batch.push(ReadOp {
                    remote_addr,
                    rkey,
                    len,
                    offset: used,
                });
                used += len8;
            }
            if let Err(e) = conn.qp.read(&batch, &conn.landing) {
                conn.broken = Some(e.to_string());
                return Err(self.err(e));
            }
            for (i, op) in batch.iter().enumerate() {
                each(
                    start + i,
                    conn.landing.bytes(op.offset as usize, op.len as usize),
                );
            }
            self.read_bytes
                .fetch_add(used, std::sync::atomic::Ordering::Relaxed);
            start += batch.len();
        }
        Ok(())
    }

    /// One RDMA READ of `len` bytes at `remote_addr` under `rkey`, unverified (diagnostics: what
    /// the NIC returns). A completion error comes back as an error, and the queue pair is then
    /// refused for further use.
    pub fn read_remote(
        &self,
        remote_addr: u64,
        rkey: u32,
        len: u32,
    ) -> Result<Vec<u8>, TransportError> {
        let mut out = Vec::new();
        self.run(&[(remote_addr, rkey, len)], |_, bytes| {
            out.extend_from_slice(bytes)
        })?;
        Ok(out)
    }

    fn clock_op(r: &Remote) -> (u64, u32, u32) {
        (r.desc.clock_addr, r.desc.clock_rkey, 8)
    }

    fn row_op(r: &Remote, local: u64) -> (u64, u32, u32) {
        (
            r.desc.addr + r.layout.row_offset(local),
            r.desc.rkey,
            r.layout.stride() as u32,
        )
    }

    /// Reads the rows of `locals` (verified, re-read when torn, then the RPC): their versions and
    /// values. With `clock`, the table clock is read first in the same post.
    #[allow(clippy::too_many_arguments)]
    fn read_rows(
        &self,
        table: &str,
        r: &Remote,
        keys: &[u64],
        locals: &[u64],
        clock: bool,
        versions: &mut Vec<u64>,
        rows: &mut Vec<f32>,
    ) -> Result<Option<u64>, TransportError> {
        let dim = r.layout.dim();
        versions.clear();
        versions.resize(locals.len(), 0);
        rows.clear();
        rows.resize(locals.len() * dim, 0.0);
        let mut ops: Vec<_> = clock.then(|| Self::clock_op(r)).into_iter().collect();
        let skip = ops.len();
        ops.extend(locals.iter().map(|&l| Self::row_op(r, l)));
        let mut table_clock = None;
        let mut torn: Vec<usize> = Vec::new();
        self.run(&ops, |i, bytes| {
            if i < skip {
                table_clock = Some(u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")));
                return;
            }
            let n = i - skip;
            match row::verify_image(&r.layout, bytes) {
                Ok(v) => {
                    versions[n] = v;
                    row::decode_payload(&r.layout, bytes, &mut rows[n * dim..(n + 1) * dim]);
                }
                Err(_) => torn.push(n),
            }
        })?;
        for _ in 1..self.attempts {
            if torn.is_empty() {
                break;
            }
            self.torn
                .fetch_add(torn.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let again: Vec<_> = torn.iter().map(|&n| Self::row_op(r, locals[n])).collect();
            let mut still = Vec::new();
            self.run(&again, |i, bytes| {
                let n = torn[i];
                match row::verify_image(&r.layout, bytes) {
                    Ok(v) => {
                        versions[n] = v;
                        row::decode_payload(&r.layout, bytes, &mut rows[n * dim..(n + 1) * dim]);
                    }
                    Err(_) => still.push(n),
                }
            })?;
            torn = still;
        }
        let torn_keys: Vec<u64> = torn.iter().map(|&n| keys[n]).collect();
        pull_into(&self.control, table, &torn_keys, &torn, dim, versions, rows)?;
        Ok(table_clock)
    }
}

impl<C: ShardTransport> ShardTransport for RdmaTransport<C> {
    fn addr(&self) -> &str {
        self.control.addr()
    }

    fn hello(&self) -> &HelloResponse {
        self.control.hello()
    }

    fn list_tables(&self) -> Result<Vec<TableInfo>, TransportError> {
        self.control.list_tables()
    }

    fn create_table(&self, spec: &TableSpec) -> Result<CreateResponse, TransportError> {
        self.control.create_table(spec)
    }

    fn region_info(&self, table: &str) -> Result<RegionDescriptor, TransportError> {
        Ok(self.remote(table)?.desc)
    }

    /// Spans of tables this transport has described are read with RDMA READ; a request naming
    /// another region, or reaching past one, goes to the daemon whole.
    fn read(&self, spans: &[Span], out: &mut Vec<u8>) -> Result<(), TransportError> {
        let tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let ops: Option<Vec<(u64, u32, u32)>> = spans
            .iter()
            .map(|s| {
                let r = tables.values().find(|r| r.desc.region == s.region)?;
                let end = s.offset.checked_add(s.len as u64)?;
                (end <= r.desc.len).then_some((r.desc.addr + s.offset, r.desc.rkey, s.len))
            })
            .collect();
        drop(tables);
        let Some(ops) = ops else {
            return self.control.read(spans, out);
        };
        out.clear();
        self.run(&ops, |_, bytes| out.extend_from_slice(bytes))
    }

    fn pull(
        &self,
        table: &str,
        keys: &[u64],
        versions: &mut Vec<u64>,
        rows: &mut Vec<f32>,
    ) -> Result<u64, TransportError> {
        let r = self.remote(table)?;
        let Some(locals) = keys
            .iter()
            .map(|&k| self.local(&r, k))
            .collect::<Option<Vec<_>>>()
        else {
            return self.control.pull(table, keys, versions, rows);
        };
        let clock = self.read_rows(table, &r, keys, &locals, true, versions, rows)?;
        Ok(clock.unwrap_or(0))
    }

    fn pull_if_stale(
        &self,
        table: &str,
        keys: &[u64],
        clocks: &[u64],
        bound: u64,
        since: Option<Since>,
        push: Option<PushRef<'_>>,
        out: &mut StaleRows,
    ) -> Result<(), TransportError> {
        let r = self.remote(table)?;
        let locals: Option<Vec<u64>> = keys.iter().map(|&k| self.local(&r, k)).collect();
        let (Some(locals), true) = (locals, clocks.len() == keys.len()) else {
            return self
                .control
                .pull_if_stale(table, keys, clocks, bound, since, push, out);
        };
        out.pushed_updates = match push {
            Some(p) => self.control.push(table, p.keys, p.counts, p.grads)?.updates,
            None => 0,
        };
        // One post: the clock, then the version word of every cached key.
        let cached: Vec<usize> = (0..keys.len())
            .filter(|&j| clocks[j] != NOT_CACHED && bound != u64::MAX)
            .collect();
        let mut ops = vec![Self::clock_op(&r)];
        ops.extend(
            cached
                .iter()
                .map(|&j| (r.desc.addr + r.layout.row_offset(locals[j]), r.desc.rkey, 8)),
        );
        let mut table_clock = 0;
        let mut stale = vec![false; keys.len()];
        for (j, c) in clocks.iter().enumerate() {
            stale[j] = *c == NOT_CACHED;
        }
        self.run(&ops, |i, bytes| {
            let word = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
            if i == 0 {
                table_clock = word;
            } else {
                let j = cached[i - 1];
                stale[j] = (word >> 1) > clocks[j].saturating_add(bound);
            }
        })?;
        out.table_clock = table_clock;
        out.since_held = since.is_none_or(|s| s.holds(table_clock));
        out.indices = (0..keys.len() as u32)
            .filter(|&j| stale[j as usize])
            .collect();
        let k: Vec<u64> = out.indices.iter().map(|&j| keys[j as usize]).collect();
        let l: Vec<u64> = out.indices.iter().map(|&j| locals[j as usize]).collect();
        self.read_rows(table, &r, &k, &l, false, &mut out.versions, &mut out.rows)?;
        Ok(())
    }

    fn push(
        &self,
        table: &str,
        keys: &[u64],
        counts: &[u32],
        grads: &[f32],
    ) -> Result<PushResponse, TransportError> {
        self.control.push(table, keys, counts, grads)
    }

    fn stats(&self) -> Result<ShardStats, TransportError> {
        self.control.stats()
    }

    /// The control transport's bytes, plus the bytes RDMA READs brought in (as received).
    fn traffic(&self) -> Traffic {
        let mut t = self.control.traffic();
        t.received += self.read_bytes.load(std::sync::atomic::Ordering::Relaxed);
        t
    }

    fn rdma_connect(&self, _ours: &Endpoint) -> Result<Endpoint, TransportError> {
        Err(TransportError::InvalidRequest {
            addr: self.control.addr().to_string(),
            message: "already an RDMA transport".into(),
        })
    }
}
