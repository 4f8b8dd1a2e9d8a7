//! Memory registrations: a daemon's regions (remote read only) and a client's landing buffer.

use std::sync::Arc;

use rdma_sys as ibv;

use super::{verbs, Device, RdmaError};

/// Memory a registration keeps alive: it is dropped only after the registration is gone.
type Keep = Arc<dyn std::any::Any + Send + Sync>;

/// A registered span of memory. It holds its device (so the protection domain outlives it) and,
/// where it was made from memory it can own, that memory: the pages stay mapped until
/// `ibv_dereg_mr` has returned, whatever order the owner drops things in.
pub struct MemoryRegion {
    mr: *mut ibv::ibv_mr,
    _device: Arc<Device>,
    _memory: Option<Keep>,
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("rkey", &self.rkey())
            .finish_non_exhaustive()
    }
}

// SAFETY: an MR handle may be used and deregistered from any thread; the kept memory is Send.
unsafe impl Send for MemoryRegion {}
// SAFETY: only the immutable keys are read through `&self`.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers a daemon's region for remote reads only. The registration holds the region, so
    /// its pages stay mapped for as long as a NIC may read them.
    pub fn remote_read(
        device: &Arc<Device>,
        region: Arc<crate::Region>,
    ) -> Result<Self, RdmaError> {
        let (addr, len) = (region.addr(), region.len());
        // SAFETY: the registration keeps `region` (which owns the mapping at `addr..addr + len`)
        // alive until it is deregistered.
        let mut mr = unsafe { Self::remote_read_raw(device, addr, len)? };
        mr._memory = Some(region);
        Ok(mr)
    }

    /// Registers `len` bytes at `addr` for remote reads only.
    ///
    /// # Safety
    /// - `addr..addr + len` must be mapped memory of this process, and stay mapped until the
    ///   returned registration is dropped: a NIC may read it at any moment until then.
    /// - Nothing may rely on that memory being private: remote peers holding the rkey read it.
    pub unsafe fn remote_read_raw(
        device: &Arc<Device>,
        addr: u64,
        len: u64,
    ) -> Result<Self, RdmaError> {
        // SAFETY: the caller keeps the memory mapped for the registration's lifetime.
        unsafe {
            Self::register(
                device,
                addr,
                len,
                ibv::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0,
            )
        }
    }

    /// # Safety
    /// As [`MemoryRegion::remote_read_raw`], for the access `access` allows.
    unsafe fn register(
        device: &Arc<Device>,
        addr: u64,
        len: u64,
        access: u32,
    ) -> Result<Self, RdmaError> {
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
            _memory: None,
        })
    }

    /// The remote key.
    pub fn rkey(&self) -> u32 {
        // SAFETY: `mr` is a live registration.
        unsafe { (*self.mr).rkey }
    }

    pub(super) fn lkey(&self) -> u32 {
        // SAFETY: `mr` is a live registration.
        unsafe { (*self.mr).lkey }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered by `register`, deregistered once; the memory it covers is still
        // mapped (the kept memory, a field, is dropped after this returns).
        unsafe { ibv::ibv_dereg_mr(self.mr) };
    }
}

/// A client's registered landing buffer for READs. Its registration holds the buffer too, so the
/// buffer is freed only after the registration is gone.
#[derive(Debug)]
pub(super) struct Landing {
    buf: Arc<[u64]>,
    pub(super) mr: MemoryRegion,
}

impl Landing {
    pub(super) fn new(device: &Arc<Device>, bytes: usize) -> Result<Self, RdmaError> {
        let buf: Arc<[u64]> = vec![0u64; bytes.div_ceil(8).max(1)].into();
        // SAFETY: the registration keeps a clone of `buf` (below), so the heap memory it covers
        // lives until it is deregistered.
        let mut mr = unsafe {
            MemoryRegion::register(
                device,
                buf.as_ptr() as u64,
                (buf.len() * 8) as u64,
                ibv::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0,
            )?
        };
        mr._memory = Some(Arc::new(buf.clone()));
        Ok(Self { buf, mr })
    }

    pub(super) fn len(&self) -> usize {
        self.buf.len() * 8
    }

    pub(super) fn addr(&self) -> u64 {
        self.buf.as_ptr() as u64
    }

    /// The bytes the NIC wrote, after the completion that covers them was polled.
    pub(super) fn bytes(&self, offset: usize, len: usize) -> &[u8] {
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
