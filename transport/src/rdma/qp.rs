//! Queue pairs: one RC queue pair with its completion queue, connected by exchanging
//! [`Endpoint`]s over the TCP control channel, and batched, pipelined RDMA READ.

use std::ffi::CStr;
use std::sync::Arc;

use rdma_sys as ibv;

use super::mr::Landing;
use super::{verbs, Device, RdmaError};
use crate::wire::Endpoint;

/// Work requests per queue pair: the most a batch keeps outstanding.
pub const QUEUE_DEPTH: u32 = 128;

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
    pub(super) fn read(&self, ops: &[ReadOp], landing: &Landing) -> Result<(), RdmaError> {
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
