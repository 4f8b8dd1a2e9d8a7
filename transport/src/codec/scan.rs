//! `scan`: a dynamic table's held rows on one shard, a range of slots at a time, with their keys
//! (what an export of a dynamic table reads).

use super::*;
use crate::wire::{ScanRequest, ScanResponse};

/// Starts a request frame in `out` for the held rows of slots `[from, from + slots)`.
pub fn encode_request(out: &mut Vec<u8>, table: &str, from: u64, slots: u32) {
    let req = ScanRequest {
        table: table.to_string(),
        from,
        slots,
    };
    wire::start_frame(out, Op::Scan as u8, Status::Ok, &req);
}

/// Decodes a request frame (a header, no payload).
pub fn decode_request(parts: &FrameParts<'_>) -> Result<ScanRequest, FrameError> {
    if !parts.payload.is_empty() {
        return Err(malformed(format!(
            "a scan request carries no payload, got {} bytes",
            parts.payload.len()
        )));
    }
    header(parts)
}

/// Writes the answer: `header`, then `keys` (u64 each), `versions` (u64 each) and `payloads`
/// (each row's dim f32, little-endian, concatenated), after checking the frame limit.
pub fn respond(
    resp: &mut Response<'_>,
    header: ScanResponse,
    keys: &[u64],
    versions: &[u64],
    payloads: &[u8],
) -> Result<(), WireError> {
    resp.begin(&header);
    let bytes = 16 * keys.len() as u64 + payloads.len() as u64;
    resp.reserve_payload(bytes)?;
    let out = resp.payload();
    put_u64s(out, keys);
    put_u64s(out, versions);
    out.extend_from_slice(payloads);
    Ok(())
}

/// A decoded answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scanned {
    /// The first slot the next request starts at.
    pub next: u64,
    /// The shard's slots: the scan is done when `next` reaches it.
    pub end: u64,
    /// Keys of the held rows.
    pub keys: Vec<u64>,
    /// Their versions.
    pub versions: Vec<u64>,
    /// Their values, keys x dim.
    pub values: Vec<f32>,
}

/// Decodes an answer to a request for `slots` slots of a table of dim `dim`, checking every
/// size against them.
pub fn decode_response(
    parts: &FrameParts<'_>,
    slots: u32,
    dim: u32,
) -> Result<Scanned, FrameError> {
    let h: ScanResponse = header(parts)?;
    if h.rows > slots || h.dim != dim {
        return Err(malformed(format!(
            "a scan of {slots} slots of dim {dim} answered {} rows of dim {}",
            h.rows, h.dim
        )));
    }
    let n = h.rows as usize;
    let p = split_payload(parts.payload, &[(n, 8), (n, 8), (n * dim as usize, 4)])?;
    Ok(Scanned {
        next: h.next,
        end: h.end,
        keys: le_array::<u64>(p[0]).iter().collect(),
        versions: le_array::<u64>(p[1]).iter().collect(),
        values: le_array::<f32>(p[2]).iter().collect(),
    })
}
