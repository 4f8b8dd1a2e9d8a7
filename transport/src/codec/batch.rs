//! `batch`: several data requests in one frame, and their answers in one frame.
//!
//! A batch's payload is its requests' own frames back to back, each with its length prefix
//! (`Pull`, `PullIfStale` or `Push`, of any tables), and the answer's payload is their answers'
//! frames likewise, in the same order. Each request is encoded and decoded by its own codec and
//! answered, or refused, on its own: a batch only saves the round trips.

use super::*;
use crate::wire::{BatchRequest, BatchResponse, MAX_BATCH, PREFIX_BYTES};

/// The answer frame the daemon sets aside for each request of a batch, so that every request it
/// starts can still be answered, at worst with an error, within the batch's frame: an error's
/// message in a batch is cut to [`ERROR_MESSAGE_BYTES`].
pub const ANSWER_RESERVE: u64 = 1024;
/// The longest error message a batch's answer carries for one request.
pub const ERROR_MESSAGE_BYTES: usize = 768;

/// Whether requests of `op` may travel in a batch.
pub fn carries(op: Op) -> bool {
    matches!(op, Op::Pull | Op::PullIfStale | Op::Push)
}

/// Starts a batch request frame of `requests` requests in `out`; append each request's finished
/// frame ([`wire::finish_frame`]) with [`append`], then finish the batch's.
pub fn encode_request(out: &mut Vec<u8>, requests: u32) {
    wire::start_frame(out, Op::Batch as u8, Status::Ok, &BatchRequest { requests });
}

/// Appends one finished frame (its length prefix included) to a batch's payload.
pub fn append(out: &mut Vec<u8>, frame: &[u8]) {
    out.extend_from_slice(frame);
}

/// Decodes a batch request frame into its requests' bodies (each without its prefix). Refuses
/// an empty batch, one above [`MAX_BATCH`], and one whose answers could not all be given within
/// `max_frame` (an [`ANSWER_RESERVE`] each).
pub fn decode_request<'a>(
    parts: &FrameParts<'a>,
    max_frame: u32,
) -> Result<Vec<&'a [u8]>, FrameError> {
    let r: BatchRequest = header(parts)?;
    if r.requests == 0 || r.requests > MAX_BATCH {
        return Err(malformed(format!(
            "a batch of {} requests (1 to {MAX_BATCH})",
            r.requests
        )));
    }
    let reserve = (r.requests as u64) * ANSWER_RESERVE;
    if reserve > max_frame as u64 / 2 {
        return Err(malformed(format!(
            "a batch of {} requests could not be answered within the maximum frame of {max_frame} \
             bytes: send fewer",
            r.requests
        )));
    }
    frames(parts.payload, r.requests)
}

/// Starts the answer to a batch of `answers` requests; the session appends each answer.
pub fn respond(resp: &mut Response<'_>, answers: u32) {
    resp.begin(&BatchResponse { answers });
}

/// Decodes a batch's answer into its answers' bodies (each without its prefix; split each with
/// [`wire::split_response`]), checking that it answers each of the `requests` requests.
pub fn decode_response<'a>(
    parts: &FrameParts<'a>,
    requests: usize,
) -> Result<Vec<&'a [u8]>, FrameError> {
    let r: BatchResponse = header(parts)?;
    if r.answers as usize != requests {
        return Err(malformed(format!(
            "{} answers to a batch of {requests} requests",
            r.answers
        )));
    }
    frames(parts.payload, r.answers)
}

/// The `count` prefixed frames of a batch's payload, which they must fill exactly.
fn frames(payload: &[u8], count: u32) -> Result<Vec<&[u8]>, FrameError> {
    let mut out = Vec::with_capacity((count as usize).min(payload.len() / PREFIX_BYTES));
    let mut rest = payload;
    for i in 0..count {
        let Some((prefix, after)) = rest.split_first_chunk::<PREFIX_BYTES>() else {
            return Err(malformed(format!(
                "the batch ends before frame {i} of {count}"
            )));
        };
        let len = u32::from_le_bytes(*prefix) as usize;
        if len > after.len() {
            return Err(malformed(format!(
                "frame {i} of the batch claims {len} bytes; {} are left",
                after.len()
            )));
        }
        let (body, after) = after.split_at(len);
        out.push(body);
        rest = after;
    }
    if !rest.is_empty() {
        return Err(malformed(format!(
            "{} bytes after the {count} frames of the batch",
            rest.len()
        )));
    }
    Ok(out)
}
