//! `push`: `(key, count, gradient sum)` rows.

use super::*;
use crate::client::PushRef;
use crate::wire::{PushRequest, PushResponse};

/// Appends push rows to a payload: keys, counts, bases (when given), gradients.
pub(super) fn put_rows(out: &mut Vec<u8>, rows: &PushRef<'_>) {
    put_u64s(out, rows.keys);
    put_u32s(out, rows.counts);
    if let Some(bases) = rows.bases {
        put_u64s(out, bases);
    }
    put_f32s(out, rows.grads);
}

/// Starts a request frame in `out`; `origin` numbers it for exactly-once application.
pub fn encode_request(out: &mut Vec<u8>, table: &str, rows: &PushRef<'_>, origin: Origin) {
    let req = PushRequest {
        table: table.to_string(),
        rows: rows.keys.len() as u32,
        origin,
        bases: rows.bases.is_some(),
    };
    wire::start_frame(out, Op::Push as u8, Status::Ok, &req);
    put_rows(out, rows);
}

/// A decoded request.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// Table name.
    pub table: String,
    /// The rows (the gradient block's size depends on the table's dim, which the shard
    /// checks).
    pub rows: PushRows<'a>,
    /// Who sent it, and its number.
    pub origin: Origin,
}

/// Decodes a request frame.
pub fn decode_request<'a>(parts: &FrameParts<'a>) -> Result<Request<'a>, FrameError> {
    let r: PushRequest = header(parts)?;
    Ok(Request {
        table: r.table,
        rows: PushRows::split(parts.payload, r.rows as usize, r.bases)?,
        origin: r.origin,
    })
}

/// Bytes an answer's header takes at most.
const HEADER_BOUND: u64 = 48;

/// Fails unless an answer that hands back all `rows` pushed rows (dim `dim`, state `shape`)
/// fits the frame; checked before the push is applied.
pub fn check_room(
    resp: &Response<'_>,
    rows: usize,
    dim: usize,
    shape: StateShape,
) -> Result<(), WireError> {
    let per_row = row_with_state_bytes(dim, shape).saturating_add(8);
    resp.check_fits(HEADER_BOUND.saturating_add((rows as u64).saturating_mul(per_row)))
}

/// Writes the answer: the header, then the rows handed back, then the indices of the rows
/// refused (`produced.refused`, as many as the header's `refused_rows`).
pub fn respond(
    resp: &mut Response<'_>,
    header: PushResponse,
    produced: &Produced,
) -> Result<(), WireError> {
    debug_assert_eq!(header.refused_rows as usize, produced.refused.len());
    resp.begin(&header);
    let shape = StateShape {
        len: header.state_len as usize,
        steps: header.steps,
    };
    put_produced(resp, produced, shape, header.births)?;
    resp.reserve_payload(4 * produced.refused.len() as u64)?;
    put_u32s(resp.payload(), &produced.refused);
    Ok(())
}

/// Decodes an answer to a push of `rows` rows of `dim` into `produced`; returns the header.
pub fn decode_response(
    parts: &FrameParts<'_>,
    rows: usize,
    dim: usize,
    produced: &mut Produced,
) -> Result<PushResponse, FrameError> {
    let h: PushResponse = header(parts)?;
    let shape = StateShape {
        len: h.state_len as usize,
        steps: h.steps,
    };
    let n = h.produced as usize;
    let refused = (h.refused_rows as usize).saturating_mul(4);
    let Some(body) = parts.payload.len().checked_sub(refused) else {
        return Err(malformed(format!(
            "{} refused rows, payload too short",
            h.refused_rows
        )));
    };
    let (body, refused) = parts.payload.split_at(body);
    take_produced(body, n, dim, shape, rows, h.births, produced)?;
    let refused: U32s<'_> = le_array(refused);
    ascending_below(&refused, rows, "refused")?;
    produced.refused.extend(refused.iter());
    if h.rows as usize != rows {
        return Err(malformed(format!(
            "a push of {rows} rows answered for {}",
            h.rows
        )));
    }
    Ok(h)
}
