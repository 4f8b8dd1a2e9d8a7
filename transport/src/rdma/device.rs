//! The device: the probe, the open context and protection domain, and the port and GID used for
//! connections.

use std::ffi::CStr;

use rdma_sys as ibv;

use super::{verbs, RdmaError};

/// Link layer value of Ethernet ports (RoCE) in `ibv_port_attr::link_layer` (verbs.h).
const LINK_LAYER_ETHERNET: u8 = 2;

/// An open device: context, protection domain, and the port and GID used for connections.
#[derive(Debug)]
pub struct Device {
    pub(super) ctx: *mut ibv::ibv_context,
    pub(super) pd: *mut ibv::ibv_pd,
    name: String,
    pub(super) port: u8,
    pub(super) lid: u16,
    pub(super) gid: [u8; 16],
    pub(super) gid_index: i32,
    pub(super) ethernet: bool,
    pub(super) mtu: u32,
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
