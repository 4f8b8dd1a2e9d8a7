//! `pull_if_stale`: the stale rows of a batch, with rows pushed first.

use super::*;
use crate::client::{StaleQuery, StaleRows};
use crate::wire::{PullIfStaleRequest, PullIfStaleResponse};

/// Starts a request frame for `q` in `out`; `origin` numbers its push, if it carries one.
pub fn encode_request(out: &mut Vec<u8>, q: &StaleQuery<'_>, origin: Option<Origin>) {
    let req = PullIfStaleRequest {
        table: q.table.to_string(),
        keys: q.keys.len() as u32,
        bound: q.bound,
        since: q.since,
        push_rows: q.push.map_or(0, |p| p.keys.len() as u32),
        origin: origin.filter(|_| q.push.is_some()),
        state_keys: q.state_keys,
        push_bases: q.push.is_some_and(|p| p.bases.is_some()),
        births: q.births.is_some(),
    };
    wire::start_frame(out, Op::PullIfStale as u8, Status::Ok, &req);
    put_u64s(out, q.keys);
    put_u64s(out, q.clocks);
    if let Some(births) = q.births {
        put_u64s(out, births);
    }
    if let Some(p) = q.push {
        super::push::put_rows(out, &p);
    }
}

/// A decoded request.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// The header.
    pub header: PullIfStaleRequest,
    /// Keys.
    pub keys: U64s<'a>,
    /// The client's clock of each key.
    pub clocks: U64s<'a>,
    /// The birth stamp of each key's line, when the request carries them (a dynamic table's).
    pub births: Option<U64s<'a>>,
    /// Rows pushed with the request (their gradient block's size depends on the table's dim,
    /// which the shard checks).
    pub push: Option<PushRows<'a>>,
}

/// Decodes a request frame.
pub fn decode_request<'a>(parts: &FrameParts<'a>) -> Result<Request<'a>, FrameError> {
    let r: PullIfStaleRequest = header(parts)?;
    let n = r.keys as usize;
    let per_key = if r.births { 24 } else { 16 };
    let lookup = n.saturating_mul(per_key).min(parts.payload.len());
    let (lookup, pushed) = parts.payload.split_at(lookup);
    let with_births = r.births;
    let births = if r.births { n } else { 0 };
    let p = split_payload(lookup, &[(n, 8), (n, 8), (births, 8)])?;
    let push = match r.push_rows {
        0 if pushed.is_empty() => None,
        0 => {
            return Err(malformed(format!(
                "{} bytes after the clocks of a lookup that pushes nothing",
                pushed.len()
            )))
        }
        rows => Some(PushRows::split(pushed, rows as usize, r.push_bases)?),
    };
    Ok(Request {
        header: r,
        keys: le_array(p[0]),
        clocks: le_array(p[1]),
        births: with_births.then(|| le_array(p[2])),
        push,
    })
}

/// How many of the returned rows (`stale`, ascending indices into the request's keys) carry
/// their optimizer state: those whose index is below the request's `state_keys`.
pub fn rows_with_state(stale: &[u32], state_keys: u32) -> usize {
    stale.partition_point(|&j| j < state_keys)
}

/// Bytes an answer's header takes at most (integers varint-encoded, bools).
const HEADER_BOUND: u64 = 96;

/// Fails unless an answer fits the frame in which all of `keys` keys came back stale, with
/// their optimizer state (`shape`) and birth stamps, and all of `push_rows` pushed rows came back
/// produced.
/// A shard checks this before it applies the rows a request pushes, so that a push is never
/// applied under an answer refused for its size.
pub fn check_room(
    resp: &Response<'_>,
    keys: usize,
    push_rows: usize,
    dim: usize,
    shape: StateShape,
) -> Result<(), WireError> {
    let per_row = row_with_state_bytes(dim, shape).saturating_add(8);
    let rows = (keys as u64).saturating_add(push_rows as u64);
    resp.check_fits(HEADER_BOUND.saturating_add(rows.saturating_mul(per_row)))
}

/// Starts the answer: the indices of the stale keys, then (through the writer, in the same
/// order) their versions, rows and, for the first `n_state`, optimizer states. The rows the
/// push produced follow with [`finish`].
pub fn respond<'r>(
    resp: &'r mut Response<'_>,
    header: PullIfStaleResponse,
    stale: &[u32],
    n_state: usize,
) -> Result<RowsWriter<'r>, WireError> {
    resp.begin(&header);
    resp.reserve_payload(4 * stale.len() as u64)?;
    put_u32s(resp.payload(), stale);
    let shape = StateShape {
        len: header.state_len as usize,
        steps: header.steps,
    };
    RowsWriter::new(resp, stale.len(), header.dim as usize, shape, n_state)
}

/// Ends the answer with the rows the push produced (as many as its header announced), then,
/// when the header says `births`, the birth stamps of the returned rows (`births`) and of the
/// produced rows.
pub fn finish(
    resp: &mut Response<'_>,
    header: &PullIfStaleResponse,
    produced: &Produced,
    births: &[u64],
) -> Result<(), WireError> {
    let shape = StateShape {
        len: header.state_len as usize,
        steps: header.steps,
    };
    put_produced(resp, produced, shape, false)?;
    if header.births {
        resp.reserve_payload(8 * (births.len() + produced.births.len()) as u64)?;
        put_u64s(resp.payload(), births);
        put_u64s(resp.payload(), &produced.births);
    }
    Ok(())
}

/// Decodes an answer to `q` into `out`; returns the header.
pub fn decode_response(
    parts: &FrameParts<'_>,
    q: &StaleQuery<'_>,
    out: &mut StaleRows,
) -> Result<PullIfStaleResponse, FrameError> {
    let h: PullIfStaleResponse = header(parts)?;
    let s = h.stale as usize;
    let dim = h.dim as usize;
    let shape = StateShape {
        len: h.state_len as usize,
        steps: h.steps,
    };
    let produced = h.produced as usize;
    // The birth stamps close the answer: `stale + produced` of them.
    let birth_bytes = if h.births {
        s.saturating_add(produced).saturating_mul(8)
    } else {
        0
    };
    let Some(body) = parts.payload.len().checked_sub(birth_bytes) else {
        return Err(malformed(format!(
            "{s} stale and {produced} produced rows' birth stamps, payload too short"
        )));
    };
    let (body, births) = parts.payload.split_at(body);
    let index_bytes = s.saturating_mul(4).min(body.len());
    let (index_bytes, rest) = body.split_at(index_bytes);
    let indices: U32s<'_> = le_array(index_bytes);
    if indices.len() != s {
        return Err(malformed(format!("{s} stale rows, payload too short")));
    }
    ascending_below(&indices, q.keys.len(), "stale")?;
    let n_state = (0..s)
        .take_while(|&i| indices.get(i) < q.state_keys)
        .count();
    let pushed = q.push.map_or(0, |p| p.keys.len());
    let before = s
        .saturating_mul(8 + 4 * dim)
        .saturating_add(n_state.saturating_mul(shape.bytes()))
        .min(rest.len());
    let (own, produced_bytes) = rest.split_at(before);
    let p = split_payload(
        own,
        &[
            (s, 8),
            (s.saturating_mul(dim), 4),
            (n_state.saturating_mul(shape.len), 4),
            (if shape.steps { n_state } else { 0 }, 8),
        ],
    )?;
    out.clear();
    out.indices.extend((0..s).map(|i| indices.get(i)));
    out.versions.extend(le_array::<u64>(p[0]).iter());
    out.rows.extend(le_array::<f32>(p[1]).iter());
    take_states(p[2], p[3], &mut out.states);
    take_produced(
        produced_bytes,
        produced,
        dim,
        shape,
        pushed,
        false,
        &mut out.produced,
    )?;
    if h.births {
        // Exactly `stale + produced` stamps (split off above).
        let births: U64s<'_> = le_array(births);
        out.births.extend(births.iter().take(s));
        out.produced.births.extend(births.iter().skip(s));
    }
    out.table_clock = h.table_clock;
    out.since_held = h.since_held;
    Ok(h)
}
