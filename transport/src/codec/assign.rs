//! `assign`: rows set to given values, their optimizer state reset, kept or set.

use super::*;
use crate::wire::{AssignRequest, AssignState};

/// What becomes of assigned rows' optimizer state, with the state to set.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum StateChange<'a> {
    /// Starts again (an import, a warm start).
    #[default]
    Reset,
    /// Stays as it is.
    Keep,
    /// Set: `values` (rows x the table's state length) and, for an optimizer that counts steps,
    /// `steps` (one a row; empty otherwise).
    Set {
        /// State values, rows x the table's state length.
        values: &'a [f32],
        /// Step counts, one a row, or none.
        steps: &'a [u64],
    },
}

impl StateChange<'_> {
    /// The header's name for it.
    pub fn kind(&self) -> AssignState {
        match self {
            Self::Reset => AssignState::Reset,
            Self::Keep => AssignState::Keep,
            Self::Set { .. } => AssignState::Set,
        }
    }
}

/// Rows to set: their keys, their new values (or none: kept) and what becomes of their
/// optimizer state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Assignment<'a> {
    /// Keys.
    pub keys: &'a [u64],
    /// New values, keys x dim, or `None` to keep them.
    pub values: Option<&'a [f32]>,
    /// Their optimizer state.
    pub state: StateChange<'a>,
}

impl<'a> Assignment<'a> {
    /// Rows set to `values` with their state started again (an import).
    pub fn values(keys: &'a [u64], values: &'a [f32]) -> Self {
        Self {
            keys,
            values: Some(values),
            state: StateChange::Reset,
        }
    }
}

/// Why an assignment is refused before anything changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Lengths that do not make the rows' values or state.
    Shape(String),
    /// A value or state value no row may hold.
    Value {
        /// The key whose row it is.
        key: u64,
        /// What is wrong.
        what: String,
    },
}

impl Assignment<'_> {
    /// Checks the rows for a table of `dim` whose optimizer is `optimizer`, the same on the
    /// client (before anything is sent to any shard) and on the shard (before any row changes):
    /// whole rows of values, every value finite, and a state to set of one row's length a key
    /// (and a step count a key where the optimizer counts steps) that
    /// [`crate::Optimizer::check_state`] accepts.
    pub fn check(&self, dim: usize, optimizer: &crate::Optimizer) -> Result<(), Refused> {
        let n = self.keys.len();
        if let Some(values) = self.values {
            if values.len() != n.saturating_mul(dim) {
                return Err(Refused::Shape(format!(
                    "rows of {dim}: {} values do not make {n} rows",
                    values.len()
                )));
            }
            if let Some(pos) = values.iter().position(|v| !v.is_finite()) {
                return Err(Refused::Value {
                    key: self.keys[pos / dim],
                    what: format!("value {} at element {}", values[pos], pos % dim),
                });
            }
        }
        if sets_nothing(self.values.is_some(), self.state.kind()) {
            return Err(Refused::Shape(SETS_NOTHING.into()));
        }
        if let StateChange::Set { values, steps } = self.state {
            let len = optimizer.state_len(dim);
            let want_steps = if optimizer.has_steps() { n } else { 0 };
            if values.len() != n.saturating_mul(len) || steps.len() != want_steps {
                return Err(Refused::Shape(format!(
                    "rows carry {len} state values{}: {} values and {} step counts do not make \
                     the state of {n} rows",
                    if optimizer.has_steps() {
                        " and a step count"
                    } else {
                        ""
                    },
                    values.len(),
                    steps.len()
                )));
            }
            if len > 0 {
                for (row, key) in values.chunks_exact(len).zip(self.keys) {
                    optimizer.check_state(row).map_err(|e| Refused::Value {
                        key: *key,
                        what: format!("optimizer state: {e}"),
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// Why an assignment that neither sets values nor changes the state is refused.
const SETS_NOTHING: &str = "an assignment that keeps both values and state sets nothing";

/// Whether an assignment of these parts sets nothing: no values, the state kept (refused by
/// the client's check and by the shard's decoding alike).
fn sets_nothing(values: bool, state: AssignState) -> bool {
    !values && state == AssignState::Keep
}

/// Starts a request frame in `out` for `rows`.
pub fn encode_request(out: &mut Vec<u8>, table: &str, rows: &Assignment<'_>) {
    let req = AssignRequest {
        table: table.to_string(),
        rows: rows.keys.len() as u32,
        values: rows.values.is_some(),
        state: rows.state.kind(),
    };
    wire::start_frame(out, Op::Assign as u8, Status::Ok, &req);
    put_u64s(out, rows.keys);
    if let Some(values) = rows.values {
        put_f32s(out, values);
    }
    if let StateChange::Set { values, steps } = rows.state {
        put_f32s(out, values);
        put_u64s(out, steps);
    }
}

/// A decoded request: its keys, and the rest of its payload, which only the table's dim and
/// state shape divide ([`Request::parts`]).
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// Table name.
    pub table: String,
    /// Keys.
    pub keys: U64s<'a>,
    /// Whether values come.
    pub values: bool,
    /// What becomes of the rows' state.
    pub state: AssignState,
    rest: &'a [u8],
}

/// An assignment's values and state, divided by the table's shape.
#[derive(Clone, Copy, Debug)]
pub struct Parts<'a> {
    /// Values, keys x dim, when set.
    pub values: Option<F32s<'a>>,
    /// State values (keys x state length) and step counts (one a key when the optimizer
    /// counts steps, else none), when set.
    pub state: Option<(F32s<'a>, U64s<'a>)>,
}

impl<'a> Request<'a> {
    /// Divides the payload after the keys for a table of `dim` whose rows' state is `shape`;
    /// fails unless it is exactly what the header announces.
    pub fn parts(&self, dim: usize, shape: StateShape) -> Result<Parts<'a>, FrameError> {
        let n = self.keys.len();
        let set = self.state == AssignState::Set;
        let values = if self.values {
            n.saturating_mul(dim)
        } else {
            0
        };
        let states = if set { n.saturating_mul(shape.len) } else { 0 };
        let steps = if set && shape.steps { n } else { 0 };
        let p =
            split_payload(self.rest, &[(values, 4), (states, 4), (steps, 8)]).map_err(|_| {
                malformed(format!(
                    "{n} assigned rows of dim {dim}{}{} need {} bytes after their keys, got {}",
                    if self.values { ", values" } else { "" },
                    if set {
                        format!(
                            ", state of {} values{}",
                            shape.len,
                            if shape.steps { " and a step" } else { "" }
                        )
                    } else {
                        String::new()
                    },
                    4 * (values + states) + 8 * steps,
                    self.rest.len()
                ))
            })?;
        Ok(Parts {
            values: self.values.then(|| le_array(p[0])),
            state: set.then(|| (le_array(p[1]), le_array(p[2]))),
        })
    }
}

/// Decodes a request frame: the header and the keys (the rest is divided by
/// [`Request::parts`]). An assignment that neither sets values nor changes the state is refused.
pub fn decode_request<'a>(parts: &FrameParts<'a>) -> Result<Request<'a>, FrameError> {
    let r: AssignRequest = header(parts)?;
    if sets_nothing(r.values, r.state) {
        return Err(malformed(SETS_NOTHING.into()));
    }
    let rows = r.rows as usize;
    let fixed = rows.saturating_mul(8);
    let p = parts.payload;
    if p.len() < fixed {
        return Err(malformed(format!(
            "{rows} assigned rows need {fixed} bytes of keys, got {} bytes",
            p.len()
        )));
    }
    let (keys, rest) = p.split_at(fixed);
    Ok(Request {
        table: r.table,
        keys: le_array(keys),
        values: r.values,
        state: r.state,
        rest,
    })
}
