//! `pull`: a consistent read of rows.

use super::*;
use crate::wire::{PullRequest, PullResponse};

/// Starts a request frame for `keys` of `table` in `out`.
pub fn encode_request(out: &mut Vec<u8>, table: &str, keys: &[u64]) {
    let req = PullRequest {
        table: table.to_string(),
        keys: keys.len() as u32,
    };
    wire::start_frame(out, Op::Pull as u8, Status::Ok, &req);
    put_u64s(out, keys);
}

/// A decoded request.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// Table name.
    pub table: String,
    /// Keys.
    pub keys: U64s<'a>,
}

/// Decodes a request frame.
pub fn decode_request<'a>(parts: &FrameParts<'a>) -> Result<Request<'a>, FrameError> {
    let r: PullRequest = header(parts)?;
    let p = split_payload(parts.payload, &[(r.keys as usize, 8)])?;
    Ok(Request {
        table: r.table,
        keys: le_array(p[0]),
    })
}

/// Starts the answer for `header.rows` rows.
pub fn respond<'r>(
    resp: &'r mut Response<'_>,
    header: PullResponse,
) -> Result<RowsWriter<'r>, WireError> {
    resp.begin(&header);
    RowsWriter::new(
        resp,
        header.rows as usize,
        header.dim as usize,
        StateShape::NONE,
        0,
    )
}

/// A decoded answer.
#[derive(Clone, Copy, Debug)]
pub struct Reply<'a> {
    /// The header.
    pub header: PullResponse,
    /// One version per key.
    pub versions: U64s<'a>,
    /// keys x dim values.
    pub rows: F32s<'a>,
}

/// Decodes an answer to a request for `keys` keys.
pub fn decode_response<'a>(parts: &FrameParts<'a>, keys: usize) -> Result<Reply<'a>, FrameError> {
    let h: PullResponse = header(parts)?;
    let n = h.rows as usize;
    if n != keys {
        return Err(malformed(format!("{n} rows for {keys} keys")));
    }
    let p = split_payload(
        parts.payload,
        &[(n, 8), (n.saturating_mul(h.dim as usize), 4)],
    )?;
    let rows: F32s<'a> = le_array(p[1]);
    whole_rows(rows.len(), n, h.dim)?;
    Ok(Reply {
        header: h,
        versions: le_array(p[0]),
        rows,
    })
}
