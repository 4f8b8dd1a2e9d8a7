//! Each bulk operation's bytes, written once (byte-level spec in `docs/PROTOCOL.md`).
//!
//! For `read`, `pull`, `pull_if_stale`, `push` and `batch` (which carries the data requests in one
//! frame): the client encodes a request with
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
    births: bool,
) -> Result<(), WireError> {
    let n = produced.indices.len();
    let bytes = 4 * n + 8 * n + 4 * produced.rows.len() + 4 * produced.states.values.len();
    let steps = if shape.steps { 8 * n } else { 0 };
    let stamps = if births { 8 * n } else { 0 };
    resp.reserve_payload((bytes + steps + stamps) as u64)?;
    let out = resp.payload();
    put_u32s(out, &produced.indices);
    put_u64s(out, &produced.versions);
    put_f32s(out, &produced.rows);
    put_f32s(out, &produced.states.values);
    if shape.steps {
        put_u64s(out, &produced.states.steps);
    }
    if births {
        put_u64s(out, &produced.births);
    }
    Ok(())
}

/// Reads `n` produced rows of `dim` with state `shape` (and, with `births`, their birth stamps)
/// from the whole of `bytes` into `out`, checking the indices against the `push_rows` rows
/// pushed.
fn take_produced(
    bytes: &[u8],
    n: usize,
    dim: usize,
    shape: StateShape,
    push_rows: usize,
    births: bool,
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
            (if births { n } else { 0 }, 8),
        ],
    )?;
    let indices: U32s<'_> = le_array(p[0]);
    ascending_below(&indices, push_rows, "produced")?;
    out.indices.extend((0..n).map(|i| indices.get(i)));
    out.versions.extend(le_array::<u64>(p[1]).iter());
    out.rows.extend(le_array::<f32>(p[2]).iter());
    take_states(p[3], p[4], &mut out.states);
    out.births.extend(le_array::<u64>(p[5]).iter());
    Ok(())
}

fn take_states(values: &[u8], steps: &[u8], out: &mut RowStates) {
    out.clear();
    out.values.extend(le_array::<f32>(values).iter());
    out.steps.extend(le_array::<u64>(steps).iter());
}

/// Fails unless `indices` ascend strictly and stay below `limit`.
fn ascending_below(indices: &U32s<'_>, limit: usize, what: &str) -> Result<(), FrameError> {
    let mut previous = None;
    for i in 0..indices.len() {
        let j = indices.get(i);
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

pub mod assign;
pub mod batch;
pub mod pull;
pub mod pull_if_stale;
pub mod push;
pub mod read;
pub mod scan;

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
            births: None,
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
            assert_eq!((p.keys.get(0), p.counts.get(0)), (4, 2));
            assert_eq!(p.base(0), bases.map_or(wire::NO_BASE, |b| b[0]));
            assert_eq!(p.grads.iter().collect::<Vec<_>>(), vec![0.5, -1.0]);

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
            births: vec![],
            refused: vec![],
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
            push_refused: 0,
            push_duplicate: false,
            state_len: 4,
            steps: true,
            produced: 1,
            births: false,
        };
        let mut w = pull_if_stale::respond(&mut resp, header, &[1, 2], 1).unwrap();
        assert_eq!(w.state_rows(), 1);
        w.put(0, 5, &[0u8; 8]);
        w.put(1, 6, &[0u8; 8]);
        w.put_state(0, &[1.0, 2.0, 3.0, 4.0], 11);
        pull_if_stale::finish(&mut resp, &header, &produced(), &[]).unwrap();
        let mut out = StaleRows::default();
        pull_if_stale::decode_response(&answer(&mut f), &q, &mut out).unwrap();
        assert_eq!(out.indices, [1, 2]);
        assert_eq!(out.versions, [5, 6]);
        assert_eq!(out.states.values, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(out.states.steps, [11]);
        assert_eq!(out.produced, produced());
        assert!(out.births.is_empty());

        // A dynamic table's answer ends with the returned and produced rows' birth stamps.
        let stamped = Produced {
            births: vec![23],
            ..produced()
        };
        let mut f = Vec::new();
        let mut resp = Response::new(&mut f, Op::PullIfStale as u8, DEFAULT_MAX_FRAME, 7);
        let header = PullIfStaleResponse {
            births: true,
            ..header
        };
        let mut w = pull_if_stale::respond(&mut resp, header, &[1, 2], 1).unwrap();
        w.put(0, 5, &[0u8; 8]);
        w.put(1, 6, &[0u8; 8]);
        w.put_state(0, &[1.0, 2.0, 3.0, 4.0], 11);
        pull_if_stale::finish(&mut resp, &header, &stamped, &[21, 22]).unwrap();
        pull_if_stale::decode_response(&answer(&mut f), &q, &mut out).unwrap();
        assert_eq!(
            (out.versions.as_slice(), out.births.as_slice()),
            (&[5, 6][..], &[21, 22][..])
        );
        assert_eq!(out.produced, stamped);

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
        let mut g = Vec::new();
        let mut resp = Response::new(&mut g, Op::Push as u8, DEFAULT_MAX_FRAME, 7);
        push::respond(
            &mut resp,
            PushResponse {
                births: true,
                ..header
            },
            &stamped,
        )
        .unwrap();
        push::decode_response(&answer(&mut g), 1, 2, &mut got).unwrap();
        assert_eq!(got, stamped);
        // A dynamic table's answer names the rows it refused, by index into the push.
        let refusing = Produced {
            refused: vec![0, 2],
            ..stamped.clone()
        };
        let mut g = Vec::new();
        let mut resp = Response::new(&mut g, Op::Push as u8, DEFAULT_MAX_FRAME, 7);
        let refused_header = PushResponse {
            births: true,
            refused_rows: 2,
            rows: 3,
            ..header
        };
        push::respond(&mut resp, refused_header, &refusing).unwrap();
        push::decode_response(&answer(&mut g), 3, 2, &mut got).unwrap();
        assert_eq!(got, refusing);
        // An index beyond the push's rows is refused.
        assert!(push::decode_response(&answer(&mut g), 2, 2, &mut got).is_err());
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
        assert_eq!(reply.rows.iter().collect::<Vec<_>>(), vec![1.5, 2.5]);
        assert!(pull::decode_response(&answer(&mut f), 3).is_err());

        let mut f = Vec::new();
        let mut resp = Response::new(&mut f, Op::PullIfStale as u8, DEFAULT_MAX_FRAME, 7);
        let header = PullIfStaleResponse {
            stale: 2,
            dim: 1,
            table_clock: 1,
            since_held: true,
            pushed_updates: 0,
            push_refused: 0,
            push_duplicate: false,
            state_len: 0,
            steps: false,
            produced: 0,
            births: false,
        };
        let mut w = pull_if_stale::respond(&mut resp, header, &[2, 0], 0).unwrap();
        w.put(0, 1, &0f32.to_le_bytes());
        w.put(1, 1, &0f32.to_le_bytes());
        pull_if_stale::finish(&mut resp, &header, &Produced::default(), &[]).unwrap();
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
