//! `assign`: rows set to given values.

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
