//! Each bulk operation's bytes, written once (byte-level spec in `docs/PROTOCOL.md`).
//!
//! For `read`, `pull`, `pull_if_stale` and `push`: the client encodes a request with
//! `encode_request`, the session decodes it into a view over the frame (`decode_request`, no
//! copies), the shard answers through a typed writer (`respond`, which checks the frame limit
//! before the payload is produced), and the client decodes the answer with `decode_response`,
//! which checks every size against the request. The TCP client, the session, the store and the
//! tests all use these functions; nothing else lays out a payload. Header-only operations are
//! their header types in [`crate::wire`].

use serde::de::DeserializeOwned;

use crate::client::{Produced, RowStates};
use crate::optimizer::StateShape;
use crate::service::Response;
use crate::wire::{
    self, decode_header, le_array, put_f32s, put_u32s, put_u64s, split_payload, F32s, FrameError,
    FrameParts, Op, Origin, PushRows, Status, U32s, U64s, WireError, SPAN_BYTES,
};

fn malformed(message: String) -> FrameError {
    FrameError::Malformed(message)
}

fn header<T: DeserializeOwned>(parts: &FrameParts<'_>) -> Result<T, FrameError> {
    decode_header(parts.header)
}

/// The rows of a `pull` or `pull_if_stale` answer under construction: `n` versions, then `n`
/// payloads of `row_bytes`, then the optimizer state of the first `n_state` rows (values, then
/// step counts when the shape has them), placed by index.
#[derive(Debug)]
pub struct RowsWriter<'r> {
    out: &'r mut Vec<u8>,
    versions_at: usize,
    rows_at: usize,
    row_bytes: usize,
    states_at: usize,
    steps_at: usize,
    shape: StateShape,
    n_state: usize,
}

impl RowsWriter<'_> {
    /// Reserves `n` rows of `dim` values at the end of `resp`'s frame, and the states of the
    /// first `n_state` of them, after checking the frame limit.
    fn new<'r>(
        resp: &'r mut Response<'_>,
        n: usize,
        dim: usize,
        shape: StateShape,
        n_state: usize,
    ) -> Result<RowsWriter<'r>, WireError> {
        let row_bytes = 4 * dim;
        let n_state = n_state.min(n);
        let bytes = (n as u64)
            .saturating_mul(8 + row_bytes as u64)
            .saturating_add((n_state as u64).saturating_mul(shape.bytes() as u64));
        resp.reserve_payload(bytes)?;
        let out = resp.payload();
        let versions_at = out.len();
        let rows_at = versions_at + 8 * n;
        let states_at = rows_at + row_bytes * n;
        let steps_at = states_at + 4 * shape.len * n_state;
        let end = steps_at + if shape.steps { 8 * n_state } else { 0 };
        out.resize(end, 0);
        Ok(RowsWriter {
            out,
            versions_at,
            rows_at,
            row_bytes,
            states_at,
            steps_at,
            shape,
            n_state,
        })
    }

    /// Row `j`: its version and its payload (dim x f32 LE, as stored in a row image).
    pub fn put(&mut self, j: usize, version: u64, payload: &[u8]) {
        let v = self.versions_at + 8 * j;
        self.out[v..v + 8].copy_from_slice(&version.to_le_bytes());
        let r = self.rows_at + self.row_bytes * j;
        self.out[r..r + self.row_bytes].copy_from_slice(payload);
    }

    /// Rows whose state the answer carries (the first ones).
    pub fn state_rows(&self) -> usize {
        self.n_state
    }

    /// Row `j`'s optimizer state (`j` below [`RowsWriter::state_rows`]): its values (the shape's
    /// `len`) and its step count (written only when the shape has one).
    pub fn put_state(&mut self, j: usize, values: &[f32], step: u64) {
        debug_assert!(j < self.n_state && values.len() == self.shape.len);
        let at = self.states_at + 4 * self.shape.len * j;
        for (c, v) in self.out[at..at + 4 * values.len()]
            .chunks_exact_mut(4)
            .zip(values)
        {
            c.copy_from_slice(&v.to_le_bytes());
        }
        if self.shape.steps {
            let at = self.steps_at + 8 * j;
            self.out[at..at + 8].copy_from_slice(&step.to_le_bytes());
        }
    }
}

/// Bytes rows of `dim` take in an answer with their state (`shape`) and their u32 index and u64
/// version: the worst case of a returned or produced row.
fn row_with_state_bytes(dim: usize, shape: StateShape) -> u64 {
    4 + 8 + 4 * dim as u64 + shape.bytes() as u64
}

/// Appends the rows a push produced ([`Produced`]) to an answer: indices, versions, values,
/// state values, step counts. The shard checked the room before applying the push.
fn put_produced(
    resp: &mut Response<'_>,
    produced: &Produced,
    shape: StateShape,
) -> Result<(), WireError> {
    let n = produced.indices.len();
    let bytes = 4 * n + 8 * n + 4 * produced.rows.len() + 4 * produced.states.values.len();
    let steps = if shape.steps { 8 * n } else { 0 };
    resp.reserve_payload((bytes + steps) as u64)?;
    let out = resp.payload();
    put_u32s(out, &produced.indices);
    put_u64s(out, &produced.versions);
    put_f32s(out, &produced.rows);
    put_f32s(out, &produced.states.values);
    if shape.steps {
        put_u64s(out, &produced.states.steps);
    }
    Ok(())
}

/// Reads `n` produced rows of `dim` with state `shape` from the whole of `bytes` into `out`,
/// checking the indices against the `push_rows` rows pushed.
fn take_produced(
    bytes: &[u8],
    n: usize,
    dim: usize,
    shape: StateShape,
    push_rows: usize,
    out: &mut Produced,
) -> Result<(), FrameError> {
    out.clear();
    let p = split_payload(
        bytes,
        &[
            (n, 4),
            (n, 8),
            (n.saturating_mul(dim), 4),
            (n.saturating_mul(shape.len), 4),
            (if shape.steps { n } else { 0 }, 8),
        ],
    )?;
    let indices: U32s<'_> = le_array(p[0]);
    ascending_below(&indices, push_rows, "produced")?;
    out.indices.extend((0..n).map(|i| indices.get_u32(i)));
    out.versions.extend(le_array::<8>(p[1]).iter());
    out.rows.extend(le_array::<4>(p[2]).iter_f32());
    take_states(p[3], p[4], &mut out.states);
    Ok(())
}

fn take_states(values: &[u8], steps: &[u8], out: &mut RowStates) {
    out.clear();
    out.values.extend(le_array::<4>(values).iter_f32());
    out.steps.extend(le_array::<8>(steps).iter());
}

/// Fails unless `indices` ascend strictly and stay below `limit`.
fn ascending_below(indices: &U32s<'_>, limit: usize, what: &str) -> Result<(), FrameError> {
    let mut previous = None;
    for i in 0..indices.len() {
        let j = indices.get_u32(i);
        if j as usize >= limit || previous.is_some_and(|p| p >= j) {
            return Err(malformed(format!(
                "{what} indices out of range or not ascending"
            )));
        }
        previous = Some(j);
    }
    Ok(())
}

/// Checks that a response's values are whole rows of `dim`.
fn whole_rows(values: usize, rows: usize, dim: u32) -> Result<(), FrameError> {
    if values != rows.saturating_mul(dim as usize) {
        return Err(malformed(format!(
            "{values} values for {rows} rows of dim {dim}"
        )));
    }
    Ok(())
}

/// `read`: spans of raw region bytes.
pub mod read {
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
    pub fn respond<'r>(
        resp: &'r mut Response<'_>,
        bytes: u64,
    ) -> Result<&'r mut Vec<u8>, WireError> {
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
}

/// `pull`: a consistent read of rows.
pub mod pull {
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
    pub fn decode_response<'a>(
        parts: &FrameParts<'a>,
        keys: usize,
    ) -> Result<Reply<'a>, FrameError> {
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
}

/// `pull_if_stale`: the stale rows of a batch, with rows pushed first.
pub mod pull_if_stale {
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
        };
        wire::start_frame(out, Op::PullIfStale as u8, Status::Ok, &req);
        put_u64s(out, q.keys);
        put_u64s(out, q.clocks);
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
        /// Rows pushed with the request (their gradient block's size depends on the table's dim,
        /// which the shard checks).
        pub push: Option<PushRows<'a>>,
    }

    /// Decodes a request frame.
    pub fn decode_request<'a>(parts: &FrameParts<'a>) -> Result<Request<'a>, FrameError> {
        let r: PullIfStaleRequest = header(parts)?;
        let n = r.keys as usize;
        let lookup = n.saturating_mul(16).min(parts.payload.len());
        let (lookup, pushed) = parts.payload.split_at(lookup);
        let p = split_payload(lookup, &[(n, 8), (n, 8)])?;
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
            push,
        })
    }

    /// Bytes an answer's header takes at most (integers varint-encoded, bools).
    const HEADER_BOUND: u64 = 96;

    /// Fails unless an answer fits the frame in which all of `keys` keys came back stale, with
    /// their optimizer state (`shape`), and all of `push_rows` pushed rows came back produced.
    /// A shard checks this before it applies the rows a request pushes, so that a push is never
    /// applied under an answer refused for its size.
    pub fn check_room(
        resp: &Response<'_>,
        keys: usize,
        push_rows: usize,
        dim: usize,
        shape: StateShape,
    ) -> Result<(), WireError> {
        let per_row = row_with_state_bytes(dim, shape);
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

    /// Ends the answer with the rows the push produced (as many as its header announced).
    pub fn finish(
        resp: &mut Response<'_>,
        header: &PullIfStaleResponse,
        produced: &Produced,
    ) -> Result<(), WireError> {
        let shape = StateShape {
            len: header.state_len as usize,
            steps: header.steps,
        };
        put_produced(resp, produced, shape)
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
        let index_bytes = s.saturating_mul(4).min(parts.payload.len());
        let (index_bytes, rest) = parts.payload.split_at(index_bytes);
        let indices: U32s<'_> = le_array(index_bytes);
        if indices.len() != s {
            return Err(malformed(format!("{s} stale rows, payload too short")));
        }
        ascending_below(&indices, q.keys.len(), "stale")?;
        let n_state = (0..s)
            .take_while(|&i| indices.get_u32(i) < q.state_keys)
            .count();
        let produced = h.produced as usize;
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
        out.indices.extend((0..s).map(|i| indices.get_u32(i)));
        out.versions.extend(le_array::<8>(p[0]).iter());
        out.rows.extend(le_array::<4>(p[1]).iter_f32());
        take_states(p[2], p[3], &mut out.states);
        take_produced(
            produced_bytes,
            produced,
            dim,
            shape,
            pushed,
            &mut out.produced,
        )?;
        out.table_clock = h.table_clock;
        out.since_held = h.since_held;
        Ok(h)
    }
}

/// `push`: `(key, count, gradient sum)` rows.
pub mod push {
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
        let per_row = row_with_state_bytes(dim, shape);
        resp.check_fits(HEADER_BOUND.saturating_add((rows as u64).saturating_mul(per_row)))
    }

    /// Writes the answer: the header, then the rows handed back.
    pub fn respond(
        resp: &mut Response<'_>,
        header: PushResponse,
        produced: &Produced,
    ) -> Result<(), WireError> {
        resp.begin(&header);
        let shape = StateShape {
            len: header.state_len as usize,
            steps: header.steps,
        };
        put_produced(resp, produced, shape)
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
        take_produced(parts.payload, n, dim, shape, rows, produced)?;
        if h.rows as usize != rows {
            return Err(malformed(format!(
                "a push of {rows} rows answered for {}",
                h.rows
            )));
        }
        Ok(h)
    }
}

/// `assign`: rows set to given values.
pub mod assign {
    use super::*;
    use crate::wire::AssignRequest;

    /// Starts a request frame in `out`: `values` holds `keys.len()` rows.
    pub fn encode_request(out: &mut Vec<u8>, table: &str, keys: &[u64], values: &[f32]) {
        let req = AssignRequest {
            table: table.to_string(),
            rows: keys.len() as u32,
        };
        wire::start_frame(out, Op::Assign as u8, Status::Ok, &req);
        put_u64s(out, keys);
        put_f32s(out, values);
    }

    /// A decoded request.
    #[derive(Clone, Debug)]
    pub struct Request<'a> {
        /// Table name.
        pub table: String,
        /// Keys.
        pub keys: U64s<'a>,
        /// Values, keys x dim (the shard checks the dim).
        pub values: F32s<'a>,
    }

    /// Decodes a request frame.
    pub fn decode_request<'a>(parts: &FrameParts<'a>) -> Result<Request<'a>, FrameError> {
        let r: AssignRequest = header(parts)?;
        let rows = r.rows as usize;
        let fixed = rows.saturating_mul(8);
        let p = parts.payload;
        if p.len() < fixed || !(p.len() - fixed).is_multiple_of(4) {
            return Err(malformed(format!(
                "{rows} assigned rows need {fixed} bytes of keys plus whole f32 values, got {} \
                 bytes",
                p.len()
            )));
        }
        let (keys, values) = p.split_at(fixed);
        Ok(Request {
            table: r.table,
            keys: le_array(keys),
            values: le_array(values),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{PushRef, StaleQuery, StaleRows};
    use crate::wire::{
        split_body, split_response, PullIfStaleResponse, PullResponse, PushResponse,
        DEFAULT_MAX_FRAME,
    };

    fn parts(frame: &mut [u8]) -> FrameParts<'_> {
        wire::finish_frame(frame, DEFAULT_MAX_FRAME).unwrap();
        split_body(&frame[4..]).unwrap()
    }

    fn answer(frame: &mut [u8]) -> FrameParts<'_> {
        wire::finish_frame(frame, DEFAULT_MAX_FRAME).unwrap();
        split_response(&frame[4..]).unwrap()
    }

    fn query<'a>(push: Option<PushRef<'a>>, state_keys: u32) -> StaleQuery<'a> {
        StaleQuery {
            table: "t",
            keys: &[1, 2, 3],
            clocks: &[0, u64::MAX, 4],
            bound: 5,
            since: None,
            push,
            state_keys,
        }
    }

    #[test]
    fn requests_round_trip() {
        let mut f = Vec::new();
        pull::encode_request(&mut f, "t", &[3, 9]);
        let r = pull::decode_request(&parts(&mut f)).unwrap();
        assert_eq!(
            (r.table.as_str(), r.keys.iter().collect::<Vec<_>>()),
            ("t", vec![3, 9])
        );

        for bases in [None, Some(&[7u64][..])] {
            let push = PushRef {
                keys: &[4],
                counts: &[2],
                grads: &[0.5, -1.0],
                bases,
            };
            let mut f = Vec::new();
            pull_if_stale::encode_request(&mut f, &query(Some(push), 2), None);
            let r = pull_if_stale::decode_request(&parts(&mut f)).unwrap();
            assert_eq!((r.header.bound, r.header.state_keys), (5, 2));
            assert_eq!(r.clocks.iter().collect::<Vec<_>>(), vec![0, u64::MAX, 4]);
            let p = r.push.unwrap();
            assert_eq!((p.keys.get(0), p.counts.get_u32(0)), (4, 2));
            assert_eq!(p.base(0), bases.map_or(wire::NO_BASE, |b| b[0]));
            assert_eq!(p.grads.iter_f32().collect::<Vec<_>>(), vec![0.5, -1.0]);

            let mut f = Vec::new();
            let origin = Origin {
                client: 9,
                seq: 3,
                settled_below: 2,
            };
            push::encode_request(&mut f, "t", &push, origin);
            let r = push::decode_request(&parts(&mut f)).unwrap();
            assert_eq!(r.origin, origin);
            assert_eq!(r.rows.keys.get(0), 4);
            assert_eq!(r.rows.base(0), bases.map_or(wire::NO_BASE, |b| b[0]));
            assert_eq!(r.rows.grads.len(), 2);
        }
    }

    /// Produced rows of dim 2 with Adam-shaped state (4 values and a step).
    fn produced() -> Produced {
        Produced {
            indices: vec![0],
            versions: vec![9],
            rows: vec![1.0, 2.0],
            states: RowStates {
                values: vec![0.1, 0.2, 0.3, 0.4],
                steps: vec![3],
            },
        }
    }

    #[test]
    fn answers_round_trip_with_states_and_produced_rows() {
        let shape = StateShape {
            len: 4,
            steps: true,
        };
        // A conditional pull of keys [1, 2, 3], the first two wanting state, answering 2 and 3.
        let push = PushRef {
            keys: &[4],
            counts: &[1],
            grads: &[0.0, 0.0],
            bases: Some(&[8]),
        };
        let q = query(Some(push), 2);
        let mut f = Vec::new();
        let mut resp = Response::new(&mut f, Op::PullIfStale as u8, DEFAULT_MAX_FRAME, 7);
        let header = PullIfStaleResponse {
            stale: 2,
            dim: 2,
            table_clock: 1,
            since_held: true,
            pushed_updates: 1,
            push_duplicate: false,
            state_len: 4,
            steps: true,
            produced: 1,
        };
        let mut w = pull_if_stale::respond(&mut resp, header, &[1, 2], 1).unwrap();
        assert_eq!(w.state_rows(), 1);
        w.put(0, 5, &[0u8; 8]);
        w.put(1, 6, &[0u8; 8]);
        w.put_state(0, &[1.0, 2.0, 3.0, 4.0], 11);
        pull_if_stale::finish(&mut resp, &header, &produced()).unwrap();
        let mut out = StaleRows::default();
        pull_if_stale::decode_response(&answer(&mut f), &q, &mut out).unwrap();
        assert_eq!(out.indices, [1, 2]);
        assert_eq!(out.versions, [5, 6]);
        assert_eq!(out.states.values, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(out.states.steps, [11]);
        assert_eq!(out.produced, produced());

        // A push's answer hands its produced rows back.
        let mut f = Vec::new();
        let mut resp = Response::new(&mut f, Op::Push as u8, DEFAULT_MAX_FRAME, 7);
        let header = PushResponse {
            rows: 1,
            updates: 1,
            produced: 1,
            state_len: shape.len as u32,
            steps: shape.steps,
            ..PushResponse::default()
        };
        push::respond(&mut resp, header, &produced()).unwrap();
        let mut got = Produced::default();
        let h = push::decode_response(&answer(&mut f), 1, 2, &mut got).unwrap();
        assert_eq!((h.rows, h.produced), (1, 1));
        assert_eq!(got, produced());
        // An index beyond the push's rows is refused.
        assert!(push::decode_response(&answer(&mut f), 0, 2, &mut got).is_err());
    }

    #[test]
    fn answers_round_trip_and_sizes_are_checked() {
        let mut f = Vec::new();
        let mut resp = Response::new(&mut f, Op::Pull as u8, DEFAULT_MAX_FRAME, 7);
        let header = PullResponse {
            rows: 2,
            dim: 1,
            table_clock: 9,
        };
        let mut w = pull::respond(&mut resp, header).unwrap();
        w.put(1, 4, &2.5f32.to_le_bytes());
        w.put(0, 3, &1.5f32.to_le_bytes());
        let reply = pull::decode_response(&answer(&mut f), 2).unwrap();
        assert_eq!(reply.versions.iter().collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(reply.rows.iter_f32().collect::<Vec<_>>(), vec![1.5, 2.5]);
        assert!(pull::decode_response(&answer(&mut f), 3).is_err());

        let mut f = Vec::new();
        let mut resp = Response::new(&mut f, Op::PullIfStale as u8, DEFAULT_MAX_FRAME, 7);
        let header = PullIfStaleResponse {
            stale: 2,
            dim: 1,
            table_clock: 1,
            since_held: true,
            pushed_updates: 0,
            push_duplicate: false,
            state_len: 0,
            steps: false,
            produced: 0,
        };
        let mut w = pull_if_stale::respond(&mut resp, header, &[2, 0], 0).unwrap();
        w.put(0, 1, &0f32.to_le_bytes());
        w.put(1, 1, &0f32.to_le_bytes());
        pull_if_stale::finish(&mut resp, &header, &Produced::default()).unwrap();
        let mut out = StaleRows::default();
        let err =
            pull_if_stale::decode_response(&answer(&mut f), &query(None, 0), &mut out).unwrap_err();
        assert!(err.to_string().contains("ascending"), "{err}");

        // The limit is checked before the payload exists.
        let mut f = Vec::new();
        let mut resp = Response::new(&mut f, Op::Pull as u8, 1024, 7);
        let header = PullResponse {
            rows: 1000,
            dim: 64,
            table_clock: 0,
        };
        assert!(pull::respond(&mut resp, header).is_err());
        assert!(f.len() < 1024);
    }
}
