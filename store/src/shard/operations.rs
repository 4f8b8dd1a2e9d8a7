//! The protocol's data operations on a shard's tables: pulls, stale-row pulls with a carried
//! push, pushes applied once per origin, assignments, and reads of region spans.

use hetkv_transport::codec;
use hetkv_transport::codec::assign::{Assignment, StateChange};
use hetkv_transport::row::copy_span;
use hetkv_transport::service::{Response, ShardService};
use hetkv_transport::wire::AssignState;
use hetkv_transport::wire::{is_stale, PullIfStaleResponse, PullResponse, PushResponse};
use hetkv_transport::{Optimizer, Produced, TableSpec};

use super::Shard;
use crate::dynamic::{DynamicTable, PushReport};
use crate::sessions::Claim;
use crate::table::Table;
use crate::StoreError;

impl Shard {
    pub(super) fn assign_rows(
        &self,
        req: &codec::assign::Request<'_>,
    ) -> Result<PushResponse, StoreError> {
        let rows = if let Some(t) = self.dynamic_table(&req.table) {
            t.assign(&Assigned::decode(req, t.spec())?.rows())?
        } else {
            let t = self.table(&req.table)?;
            let a = Assigned::decode(req, t.spec())?;
            let locals = t.validate_assign(&a.rows())?;
            t.apply_assign(&locals, &a.rows());
            locals.len() as u64
        };
        Ok(PushResponse {
            rows: rows as u32,
            updates: rows,
            ..PushResponse::default()
        })
    }

    pub(super) fn pull_rows(
        &self,
        req: &codec::pull::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), StoreError> {
        if let Some(t) = self.dynamic_table(&req.table) {
            let keys: Vec<u64> = req.keys.iter().collect();
            t.check_keys(keys.iter().copied())?;
            let header = PullResponse {
                rows: keys.len() as u32,
                dim: t.spec().dim,
                table_clock: t.clock(),
            };
            return t.read_rows_into(&keys, &mut codec::pull::respond(resp, header)?);
        }
        let t = self.table(&req.table)?;
        let locals = req
            .keys
            .iter()
            .map(|k| t.local_index(k))
            .collect::<Result<Vec<_>, _>>()?;
        let header = PullResponse {
            rows: locals.len() as u32,
            dim: t.spec().dim,
            table_clock: t.clock(),
        };
        let mut rows = codec::pull::respond(resp, header)?;
        t.read_rows_into(&locals, &mut rows);
        Ok(())
    }

    pub(super) fn pull_stale(
        &self,
        req: &codec::pull_if_stale::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), StoreError> {
        if let Some(t) = self.dynamic_table(&req.header.table) {
            return self.pull_stale_dynamic(&t, req, resp);
        }
        let t = self.table(&req.header.table)?;
        // Everything is validated before anything changes: the pushed rows and the keys.
        let pushed = req
            .push
            .map(|p| {
                t.validate_push(p.keys, p.counts, p.grads)
                    .map(|locals| (p, locals))
            })
            .transpose()?;
        let locals_all = req
            .keys
            .iter()
            .map(|k| t.local_index(k))
            .collect::<Result<Vec<_>, _>>()?;
        let dim = t.spec().dim as usize;
        let shape = t.state_shape();
        if let Some((p, _)) = &pushed {
            codec::pull_if_stale::check_room(resp, locals_all.len(), p.keys.len(), dim, shape)?;
        }
        let mut produced = Produced::default();
        let (pushed_updates, push_duplicate) = match pushed {
            Some((p, locals)) => {
                let origin = req.header.origin.ok_or_else(|| {
                    StoreError::Malformed("a carried push must be numbered (its origin)".into())
                })?;
                self.apply_once(&t, origin, &locals, p, &mut produced)?
            }
            None => (0, false),
        };
        // The clock after the push and before any row: every update it does not count happened
        // after this moment.
        let table_clock = t.clock();
        let since_held = req.header.since.is_none_or(|s| s.holds(table_clock));
        let mut stale = Vec::new();
        let mut locals = Vec::new();
        for (j, &i) in locals_all.iter().enumerate() {
            if is_stale(t.version_local(i), req.clocks.get(j), req.header.bound) {
                stale.push(j as u32);
                locals.push(i);
            }
        }
        let n_state = codec::pull_if_stale::rows_with_state(&stale, req.header.state_keys);
        let header = PullIfStaleResponse {
            stale: stale.len() as u32,
            dim: t.spec().dim,
            table_clock,
            since_held,
            pushed_updates,
            push_refused: 0,
            push_duplicate,
            state_len: shape.len as u32,
            steps: shape.steps,
            produced: produced.len() as u32,
            births: false,
        };
        t.read_rows_into(
            &locals,
            &mut codec::pull_if_stale::respond(resp, header, &stale, n_state)?,
        );
        codec::pull_if_stale::finish(resp, &header, &produced, &[])?;
        Ok(())
    }

    pub(super) fn read_spans(
        &self,
        req: codec::read::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), StoreError> {
        let tables = self.regions();
        let mut total: u64 = 0;
        for span in req.spans() {
            let t = tables
                .get(span.region as usize)
                .and_then(Option::as_ref)
                .ok_or_else(|| {
                    StoreError::InvalidSpan(format!(
                        "no region {} on this shard (never, or its table was dropped)",
                        span.region
                    ))
                })?;
            let end = span.offset.checked_add(span.len as u64);
            if end.is_none_or(|end| end > t.region().len()) {
                return Err(StoreError::InvalidSpan(format!(
                    "span {}+{} outside region {} of {} bytes",
                    span.offset,
                    span.len,
                    span.region,
                    t.region().len()
                )));
            }
            total += span.len as u64;
        }
        let out = codec::read::respond(resp, total)?;
        for span in req.spans() {
            let t = tables[span.region as usize]
                .as_ref()
                .expect("checked above");
            copy_span(t.region().words(), span.offset, span.len as usize, out);
            t.count_read(span.len as u64);
        }
        Ok(())
    }

    pub(super) fn push_rows(
        &self,
        req: &codec::push::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), StoreError> {
        if let Some(t) = self.dynamic_table(&req.table) {
            return self.push_dynamic(&t, req, resp);
        }
        let t = self.table(&req.table)?;
        let r = &req.rows;
        let locals = t.validate_push(r.keys, r.counts, r.grads)?;
        let shape = t.state_shape();
        if r.bases.is_some() {
            codec::push::check_room(resp, locals.len(), t.spec().dim as usize, shape)?;
        }
        let mut produced = Produced::default();
        let (updates, duplicate) = self.apply_once(&t, req.origin, &locals, *r, &mut produced)?;
        let header = PushResponse {
            rows: locals.len() as u32,
            updates,
            refused: 0,
            duplicate,
            produced: produced.len() as u32,
            state_len: shape.len as u32,
            steps: shape.steps,
            births: false,
            refused_rows: 0,
            incarnation: self.incarnation(),
        };
        codec::push::respond(resp, header, &produced)?;
        Ok(())
    }

    /// A push to a dynamic table, applied once per origin. A push that carries bases (a cache's)
    /// gets back, with their birth stamps, the rows its lines cannot work out
    /// ([`crate::dynamic::DynamicRows::push`]).
    fn push_dynamic(
        &self,
        t: &DynamicTable,
        req: &codec::push::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), StoreError> {
        let r = &req.rows;
        let push = t.validate_push(r.keys, r.counts, r.grads)?;
        let shape = t.state_shape();
        let produce = r.bases.is_some();
        if produce {
            codec::push::check_room(resp, push.keys().len(), t.spec().dim as usize, shape)?;
        }
        let mut produced = Produced::default();
        let (report, duplicate) =
            self.apply_dynamic_once(t, req.origin, &push, r.bases, &mut produced)?;
        let refused = report.refused_updates();
        produced.refused = report.refused_rows;
        let header = PushResponse {
            rows: push.keys().len() as u32,
            updates: report.applied,
            refused,
            duplicate,
            produced: produced.len() as u32,
            state_len: shape.len as u32,
            steps: shape.steps,
            births: produce,
            refused_rows: produced.refused.len() as u32,
            incarnation: self.incarnation(),
        };
        codec::push::respond(resp, header, &produced)?;
        Ok(())
    }

    /// Applies a validated push to a dynamic table once per origin; with the rows' `bases` (a
    /// cache's push), the rows its lines cannot work out are handed back in `produced`
    /// ([`crate::dynamic::DynamicRows::push`]; for a push applied before, every row as it is
    /// now). Returns what the push did and whether it was a repeat.
    fn apply_dynamic_once(
        &self,
        t: &DynamicTable,
        origin: hetkv_transport::wire::Origin,
        push: &crate::dynamic::DecodedPush,
        bases: Option<hetkv_transport::wire::U64s<'_>>,
        produced: &mut Produced,
    ) -> Result<(PushReport, bool), StoreError> {
        match self.sessions.claim(origin)? {
            Claim::Fresh(ticket) => {
                let report = t.apply_push(push, bases.map(|b| (produced, b)))?;
                ticket.applied();
                Ok((report, false))
            }
            // Acknowledged again with what the push carried: what it did the first time is not
            // kept (its refused updates were counted then).
            Claim::Repeat => {
                if bases.is_some() {
                    t.rows().hand_back_current(push.keys(), produced)?;
                }
                let report = PushReport {
                    applied: push.counts().iter().map(|&c| u64::from(c)).sum(),
                    ..PushReport::default()
                };
                Ok((report, true))
            }
        }
    }

    /// A conditional pull of a dynamic table (a cache's): every key whose line is of another
    /// incarnation of it (its birth stamp) or stale by its version comes back, with its stamp,
    /// each read under its bucket's lock with its optimizer state. A claim about checks left out
    /// is never held: evictions change rows without counting in the clock, so a cache of a
    /// dynamic table sends every check.
    fn pull_stale_dynamic(
        &self,
        t: &DynamicTable,
        req: &codec::pull_if_stale::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), StoreError> {
        let pushed = req
            .push
            .map(|p| t.validate_push(p.keys, p.counts, p.grads).map(|d| (p, d)))
            .transpose()?;
        t.check_keys(req.keys.iter())?;
        let dim = t.spec().dim as usize;
        let shape = t.state_shape();
        let n = req.keys.len();
        if let Some((_, d)) = &pushed {
            codec::pull_if_stale::check_room(resp, n, d.keys().len(), dim, shape)?;
        }
        let mut produced = Produced::default();
        let (report, push_duplicate) = match &pushed {
            Some((p, d)) => {
                let origin = req.header.origin.ok_or_else(|| {
                    StoreError::Malformed("a carried push must be numbered (its origin)".into())
                })?;
                self.apply_dynamic_once(t, origin, d, p.bases, &mut produced)?
            }
            None => (PushReport::default(), false),
        };
        let table_clock = t.clock();
        let birth = |j: usize| req.births.as_ref().map_or(0, |b| b.get(j));
        // Each key read once under its lock; the stale ones are kept (payload bytes as stored,
        // version, stamp, state), a key not held as zeros with the initial state.
        let layout = *t.rows().layout().row();
        let mut image = vec![0u8; layout.stride()];
        let (zeros, initial) = (vec![0u8; 4 * dim], t.rows().initial_state());
        let mut state = initial.clone();
        let (mut stale, mut rows) = (Vec::new(), Vec::new());
        let (mut payloads, mut states) = (Vec::new(), Vec::new());
        for (j, key) in req.keys.iter().enumerate() {
            let held = t.rows().held_row(key, &mut image, &mut state)?;
            let row = held.unwrap_or_else(|| t.rows().absent_row());
            if row.born != birth(j) || is_stale(row.version, req.clocks.get(j), req.header.bound) {
                stale.push(j as u32);
                rows.push(row);
                match held {
                    Some(_) => {
                        payloads.extend_from_slice(layout.payload(&image));
                        states.extend_from_slice(&state);
                    }
                    None => {
                        payloads.extend_from_slice(&zeros);
                        states.extend_from_slice(&initial);
                    }
                }
            }
        }
        let n_state = codec::pull_if_stale::rows_with_state(&stale, req.header.state_keys);
        let refused = report.refused_updates();
        let header = PullIfStaleResponse {
            stale: stale.len() as u32,
            dim: t.spec().dim,
            table_clock,
            since_held: req.header.since.is_none(),
            pushed_updates: report.applied,
            push_refused: refused,
            push_duplicate,
            state_len: shape.len as u32,
            steps: shape.steps,
            produced: produced.len() as u32,
            births: true,
        };
        let mut out = codec::pull_if_stale::respond(resp, header, &stale, n_state)?;
        let len = shape.len;
        for (j, row) in rows.iter().enumerate() {
            out.put(j, row.version, &payloads[j * 4 * dim..(j + 1) * 4 * dim]);
            if j < n_state {
                out.put_state(j, &states[j * len..(j + 1) * len], row.step);
            }
        }
        let births: Vec<u64> = rows.iter().map(|row| row.born).collect();
        codec::pull_if_stale::finish(resp, &header, &produced, &births)?;
        t.count_read(rows.len() as u64);
        Ok(())
    }

    /// Applies validated push rows once per origin: a numbered push applied before is
    /// acknowledged (its updates counted, `true`) without being applied again, and hands back
    /// the rows as they are now where its bases ask ([`Table::hand_back_current`]).
    fn apply_once(
        &self,
        t: &Table,
        origin: hetkv_transport::wire::Origin,
        locals: &[u64],
        rows: hetkv_transport::wire::PushRows<'_>,
        produced: &mut Produced,
    ) -> Result<(u64, bool), StoreError> {
        match self.sessions.claim(origin)? {
            Claim::Fresh(ticket) => {
                let updates = t.apply_push(locals, &rows, produced);
                ticket.applied();
                Ok((updates, false))
            }
            Claim::Repeat => {
                let updates = (0..rows.counts.len())
                    .map(|i| rows.counts.get(i) as u64)
                    .sum();
                t.hand_back_current(locals, &rows, produced);
                Ok((updates, true))
            }
        }
    }
}

/// An assignment's payload copied out of its frame, divided by its table's shape: an assignment
/// is not a hot path, and fixed and dynamic tables take the same slices
/// (`table::check_assignment`).
struct Assigned {
    keys: Vec<u64>,
    values: Option<Vec<f32>>,
    state: Option<(Vec<f32>, Vec<u64>)>,
    kind: AssignState,
}

impl Assigned {
    fn decode(req: &codec::assign::Request<'_>, spec: &TableSpec) -> Result<Self, StoreError> {
        let dim = spec.dim as usize;
        let shape = Optimizer::new(spec.optimizer).state_shape(dim);
        let parts = req
            .parts(dim, shape)
            .map_err(|e| StoreError::Malformed(e.to_string()))?;
        Ok(Self {
            keys: req.keys.iter().collect(),
            values: parts.values.map(|v| v.iter().collect()),
            state: parts
                .state
                .map(|(v, s)| (v.iter().collect(), s.iter().collect())),
            kind: req.state,
        })
    }

    fn rows(&self) -> Assignment<'_> {
        Assignment {
            keys: &self.keys,
            values: self.values.as_deref(),
            state: match (&self.state, self.kind) {
                (Some((values, steps)), _) => StateChange::Set { values, steps },
                (None, AssignState::Keep) => StateChange::Keep,
                (None, _) => StateChange::Reset,
            },
        }
    }
}
