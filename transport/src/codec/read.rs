//! `read`: spans of raw region bytes.

use super::*;
use crate::wire::{ReadRequest, ReadResponse, Span};

/// Starts a request frame for `spans` in `out`.
pub fn encode_request(out: &mut Vec<u8>, spans: &[Span]) {
    let req = ReadRequest {
        spans: spans.len() as u32,
    };
    wire::start_frame(out, Op::Read as u8, Status::Ok, &req);
    spans.iter().for_each(|s| s.encode(out));
}

/// A decoded request: its spans, read from the frame as needed.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    spans: &'a [u8],
}

impl Request<'_> {
    /// The spans, in request order.
    pub fn spans(&self) -> impl Iterator<Item = Span> + '_ {
        self.spans.chunks_exact(SPAN_BYTES).map(Span::decode)
    }
}

/// Decodes a request frame.
pub fn decode_request<'a>(parts: &FrameParts<'a>) -> Result<Request<'a>, FrameError> {
    let r: ReadRequest = header(parts)?;
    let p = split_payload(parts.payload, &[(r.spans as usize, SPAN_BYTES)])?;
    Ok(Request { spans: p[0] })
}

/// Starts the answer: `bytes` of span data follow, appended to the returned buffer.
pub fn respond<'r>(resp: &'r mut Response<'_>, bytes: u64) -> Result<&'r mut Vec<u8>, WireError> {
    resp.begin(&ReadResponse { bytes });
    resp.reserve_payload(bytes)?;
    Ok(resp.payload())
}

/// Decodes an answer to a request for `want` bytes.
pub fn decode_response<'a>(parts: &FrameParts<'a>, want: u64) -> Result<&'a [u8], FrameError> {
    let h: ReadResponse = header(parts)?;
    if h.bytes != want || parts.payload.len() as u64 != want {
        return Err(malformed(format!(
            "read of {want} bytes answered with {} (header says {})",
            parts.payload.len(),
            h.bytes
        )));
    }
    Ok(parts.payload)
}
