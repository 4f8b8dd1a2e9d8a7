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
/// payloads of `row_bytes`, placed by index.
#[derive(Debug)]
pub struct RowsWriter<'r> {
    out: &'r mut Vec<u8>,
    versions_at: usize,
    rows_at: usize,
    row_bytes: usize,
}

impl RowsWriter<'_> {
    /// Reserves `n` rows of `dim` values at the end of `resp`'s frame, after checking the frame
    /// limit.
    fn new<'r>(
        resp: &'r mut Response<'_>,
        n: usize,
        dim: usize,
    ) -> Result<RowsWriter<'r>, WireError> {
        let row_bytes = 4 * dim;
        resp.reserve_payload((n as u64).saturating_mul(8 + row_bytes as u64))?;
        let out = resp.payload();
        let versions_at = out.len();
        let rows_at = versions_at + 8 * n;
        out.resize(rows_at + row_bytes * n, 0);
        Ok(RowsWriter {
            out,
            versions_at,
            rows_at,
            row_bytes,
        })
    }

    /// Row `j`: its version and its payload (dim x f32 LE, as stored in a row image).
    pub fn put(&mut self, j: usize, version: u64, payload: &[u8]) {
        let v = self.versions_at + 8 * j;
        self.out[v..v + 8].copy_from_slice(&version.to_le_bytes());
        let r = self.rows_at + self.row_bytes * j;
        self.out[r..r + self.row_bytes].copy_from_slice(payload);
    }
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
        RowsWriter::new(resp, header.rows as usize, header.dim as usize)
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
    use crate::client::StaleQuery;
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
        };
        wire::start_frame(out, Op::PullIfStale as u8, Status::Ok, &req);
        put_u64s(out, q.keys);
        put_u64s(out, q.clocks);
        if let Some(p) = q.push {
            put_u64s(out, p.keys);
            put_u32s(out, p.counts);
            put_f32s(out, p.grads);
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
            rows => Some(PushRows::split(pushed, rows as usize)?),
        };
        Ok(Request {
            header: r,
            keys: le_array(p[0]),
            clocks: le_array(p[1]),
            push,
        })
    }

    /// Bytes an answer's header takes at most (five integers, varint-encoded, and a bool).
    const HEADER_BOUND: u64 = 64;

    /// Fails unless an answer in which all of `keys` keys came back stale, rows of `dim`, fits
    /// the frame. A shard checks this before it applies the rows a request pushes, so that a push
    /// is never applied under an answer refused for its size.
    pub fn check_room(resp: &Response<'_>, keys: usize, dim: usize) -> Result<(), WireError> {
        let per_row = 4 + 8 + 4 * dim as u64;
        resp.check_fits(HEADER_BOUND.saturating_add((keys as u64).saturating_mul(per_row)))
    }

    /// Starts the answer: the indices of the stale keys, then (through the writer, in the same
    /// order) their versions and rows.
    pub fn respond<'r>(
        resp: &'r mut Response<'_>,
        header: PullIfStaleResponse,
        stale: &[u32],
    ) -> Result<RowsWriter<'r>, WireError> {
        resp.begin(&header);
        resp.reserve_payload(4 * stale.len() as u64)?;
        put_u32s(resp.payload(), stale);
        RowsWriter::new(resp, stale.len(), header.dim as usize)
    }

    /// A decoded answer.
    #[derive(Clone, Copy, Debug)]
    pub struct Reply<'a> {
        /// The header.
        pub header: PullIfStaleResponse,
        /// Indices into the request's keys, ascending.
        pub indices: U32s<'a>,
        /// Their versions.
        pub versions: U64s<'a>,
        /// Their rows.
        pub rows: F32s<'a>,
    }

    /// Decodes an answer to a request of `keys` keys.
    pub fn decode_response<'a>(
        parts: &FrameParts<'a>,
        keys: usize,
    ) -> Result<Reply<'a>, FrameError> {
        let h: PullIfStaleResponse = header(parts)?;
        let s = h.stale as usize;
        let p = split_payload(
            parts.payload,
            &[(s, 4), (s, 8), (s.saturating_mul(h.dim as usize), 4)],
        )?;
        let indices: U32s<'a> = le_array(p[0]);
        let mut previous = None;
        for i in 0..s {
            let j = indices.get_u32(i);
            if j as usize >= keys || previous.is_some_and(|p| p >= j) {
                return Err(malformed(
                    "stale indices out of range or not ascending".into(),
                ));
            }
            previous = Some(j);
        }
        let rows: F32s<'a> = le_array(p[2]);
        whole_rows(rows.len(), s, h.dim)?;
        Ok(Reply {
            header: h,
            indices,
            versions: le_array(p[1]),
            rows,
        })
    }
}

/// `push`: `(key, count, gradient sum)` rows.
pub mod push {
    use super::*;
    use crate::wire::PushRequest;

    /// Starts a request frame in `out`; `origin` numbers it for exactly-once application.
    pub fn encode_request(
        out: &mut Vec<u8>,
        table: &str,
        keys: &[u64],
        counts: &[u32],
        grads: &[f32],
        origin: Option<Origin>,
    ) {
        let req = PushRequest {
            table: table.to_string(),
            rows: keys.len() as u32,
            origin,
        };
        wire::start_frame(out, Op::Push as u8, Status::Ok, &req);
        put_u64s(out, keys);
        put_u32s(out, counts);
        put_f32s(out, grads);
    }

    /// A decoded request.
    #[derive(Clone, Debug)]
    pub struct Request<'a> {
        /// Table name.
        pub table: String,
        /// The rows (the gradient block's size depends on the table's dim, which the shard
        /// checks).
        pub rows: PushRows<'a>,
        /// Who sent it.
        pub origin: Option<Origin>,
    }

    /// Decodes a request frame.
    pub fn decode_request<'a>(parts: &FrameParts<'a>) -> Result<Request<'a>, FrameError> {
        let r: PushRequest = header(parts)?;
        Ok(Request {
            table: r.table,
            rows: PushRows::split(parts.payload, r.rows as usize)?,
            origin: r.origin,
        })
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
    use crate::client::{PushRef, StaleQuery};
    use crate::wire::{
        split_body, split_response, PullIfStaleResponse, PullResponse, DEFAULT_MAX_FRAME,
    };

    fn parts(frame: &mut [u8]) -> FrameParts<'_> {
        wire::finish_frame(frame, DEFAULT_MAX_FRAME).unwrap();
        split_body(&frame[4..]).unwrap()
    }

    fn answer(frame: &mut [u8]) -> FrameParts<'_> {
        wire::finish_frame(frame, DEFAULT_MAX_FRAME).unwrap();
        split_response(&frame[4..]).unwrap()
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

        let q = StaleQuery {
            table: "t",
            keys: &[1, 2],
            clocks: &[0, u64::MAX],
            bound: 5,
            since: None,
            push: Some(PushRef {
                keys: &[4],
                counts: &[2],
                grads: &[0.5, -1.0],
            }),
        };
        let mut f = Vec::new();
        pull_if_stale::encode_request(&mut f, &q, None);
        let r = pull_if_stale::decode_request(&parts(&mut f)).unwrap();
        assert_eq!(r.header.bound, 5);
        assert_eq!(r.clocks.iter().collect::<Vec<_>>(), vec![0, u64::MAX]);
        let p = r.push.unwrap();
        assert_eq!((p.keys.get(0), p.counts.get_u32(0)), (4, 2));
        assert_eq!(p.grads.iter_f32().collect::<Vec<_>>(), vec![0.5, -1.0]);

        let mut f = Vec::new();
        push::encode_request(&mut f, "t", &[7], &[1], &[2.0], None);
        let r = push::decode_request(&parts(&mut f)).unwrap();
        assert_eq!(r.rows.keys.get(0), 7);
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
        };
        let mut w = pull_if_stale::respond(&mut resp, header, &[2, 0]).unwrap();
        w.put(0, 1, &0f32.to_le_bytes());
        w.put(1, 1, &0f32.to_le_bytes());
        let err = pull_if_stale::decode_response(&answer(&mut f), 3).unwrap_err();
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
