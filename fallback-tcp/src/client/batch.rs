//! Several data requests to the shard in one `Batch` frame: one round trip for all of them.
//!
//! Each request keeps its own meaning: a push is numbered as if sent alone (its own number,
//! applied exactly once, held and sent again with the batch's bytes when the batch is unanswered
//! at its deadline), and each answer is decoded by the codec that decodes it alone.

use hetkv_transport::PushOutcome;

use super::*;

/// Sends `requests` in one batch frame where there are several and they fit one; one at a
/// time otherwise. Each answer goes to its `outs` entry.
pub(super) fn exchange(
    c: &TcpShardClient,
    requests: &[Exchange<'_>],
    outs: &mut [StaleRows],
) -> Vec<Carried> {
    let max = c.hello.max_frame.min(c.config.max_frame) as u64;
    let answerable = requests.len() as u64 * codec::batch::ANSWER_RESERVE <= max / 2;
    if requests.len() >= 2
        && requests.len() <= wire::MAX_BATCH as usize
        && answerable
        && requests.iter().all(well_formed)
    {
        if let Some(carried) = in_one_frame(c, requests, outs) {
            return carried;
        }
    }
    requests
        .iter()
        .zip(outs.iter_mut())
        .map(|(r, out)| ShardTransport::exchange(c, r, out))
        .collect()
}

/// Whether the request's lengths agree (one that does not goes alone, to be refused alone).
fn well_formed(r: &Exchange<'_>) -> bool {
    match r {
        Exchange::Pull { .. } => true,
        Exchange::PullIfStale(q) => {
            q.keys.len() == q.clocks.len()
                && q.births.is_none_or(|b| b.len() == q.keys.len())
                && q.push.is_none_or(|p| p.lengths_agree())
        }
        Exchange::Push { rows, .. } => rows.lengths_agree(),
    }
}

/// The rows a request pushes.
fn pushed_rows(r: &Exchange<'_>) -> usize {
    match r {
        Exchange::Pull { .. } => 0,
        Exchange::PullIfStale(q) => q.push.map_or(0, |p| p.keys.len()),
        Exchange::Push { rows, .. } => rows.keys.len(),
    }
}

/// Every request ended by one failure `e`.
fn failed_all(requests: &[Exchange<'_>], e: &TransportError) -> Vec<Carried> {
    requests
        .iter()
        .map(|r| Carried {
            push: if r.pushes() {
                PushOutcome::failed(e)
            } else {
                PushOutcome::NotSent
            },
            read: Err(e.again()),
        })
        .collect()
}

/// What one request of an answered batch got: the incarnation that answered it and its push's
/// acknowledgement (when it pushed), or the shard's refusal.
struct Answered {
    incarnation: u64,
    ack: Option<PushResponse>,
}

/// The batch in one frame; `None` when it does not fit one (nothing was sent, no number drawn
/// is left unsettled).
fn in_one_frame(
    c: &TcpShardClient,
    requests: &[Exchange<'_>],
    outs: &mut [StaleRows],
) -> Option<Vec<Carried>> {
    if let Err(e) = c.deliver_held() {
        return Some(failed_all(requests, &e));
    }
    let mut pushes = Vec::new();
    let mut origins = Vec::with_capacity(requests.len());
    for (at, r) in requests.iter().enumerate() {
        if !r.pushes() {
            origins.push(None);
            continue;
        }
        match c.origin() {
            Ok(o) => {
                pushes.push(Numbered {
                    seq: o.seq,
                    rows: pushed_rows(r),
                    at,
                });
                origins.push(Some(o));
            }
            Err(e) => {
                pushes.iter().for_each(|n| c.stream.settle(n.seq));
                return Some(failed_all(requests, &e));
            }
        }
    }
    let mut sub = Vec::new();
    let frame = c.frame(|buf| {
        codec::batch::encode_request(buf, requests.len() as u32);
        for (r, origin) in requests.iter().zip(&origins) {
            match *r {
                Exchange::Pull { table, keys } => {
                    codec::pull::encode_request(&mut sub, table, keys)
                }
                Exchange::PullIfStale(q) => {
                    codec::pull_if_stale::encode_request(&mut sub, &q, *origin)
                }
                Exchange::Push { table, rows } => codec::push::encode_request(
                    &mut sub,
                    table,
                    &rows,
                    origin.expect("a push is numbered"),
                ),
            }
            // The batch's own limit, checked as the whole frame is finished, bounds each one.
            wire::finish_frame(&mut sub, u32::MAX).expect("a frame of at most the batch's size");
            codec::batch::append(buf, &sub);
        }
    });
    let frame = match frame {
        Ok(f) => f,
        Err(_) => {
            // Too large for one frame: the requests go one at a time.
            pushes.iter().for_each(|n| c.stream.settle(n.seq));
            return None;
        }
    };
    let result = c.send_until_deadline(Op::Batch, &frame, |p| decode(c, &p, requests, outs));
    Some(match result {
        Ok(answers) => {
            let incarnations: Vec<_> = answers
                .iter()
                .map(|a| match a {
                    Ok(a) => Ok(a.incarnation),
                    Err(e) => Err(e.again()),
                })
                .collect();
            c.settle_answered(&pushes, &incarnations);
            c.recycle(frame);
            answers
                .into_iter()
                .map(|a| match a {
                    Ok(a) => Carried {
                        push: a.ack.map_or(PushOutcome::NotSent, PushOutcome::Applied),
                        read: Ok(()),
                    },
                    Err(e) => Carried {
                        push: PushOutcome::NotSent,
                        read: Err(e),
                    },
                })
                .zip(requests)
                .map(|(mut carried, r)| {
                    if let (true, Err(e)) = (r.pushes(), &carried.read) {
                        carried.push = PushOutcome::failed(e);
                    }
                    carried
                })
                .collect()
        }
        Err(TransportError::Io { source, .. }) if !pushes.is_empty() => {
            let held = c.hold(Op::Batch, frame, requests.len(), pushes, source);
            failed_all(requests, &held)
        }
        Err(e) => {
            for n in &pushes {
                c.settle_push(n.seq, n.rows, &Err::<(), _>(e.again()));
            }
            c.recycle(frame);
            failed_all(requests, &e)
        }
    })
}

/// Decodes a batch's answer: each request's rows into its `outs` entry, and what it got. An
/// answer that breaks the protocol fails the whole batch (its pushes' fate is then unknown).
fn decode(
    c: &TcpShardClient,
    p: &FrameParts<'_>,
    requests: &[Exchange<'_>],
    outs: &mut [StaleRows],
) -> Result<Vec<Result<Answered, TransportError>>, TransportError> {
    let bodies = codec::batch::decode_response(p, requests.len()).map_err(|e| c.malformed(e))?;
    let mut answers = Vec::with_capacity(requests.len());
    for ((body, r), out) in bodies.iter().zip(requests).zip(outs.iter_mut()) {
        out.clear();
        let parts = split_response(body).map_err(|e| c.malformed(e))?;
        if parts.status == Status::Error as u8 {
            let error: WireError = c.header(parts)?;
            answers.push(Err(TransportError::Remote {
                addr: c.addr.clone(),
                error,
            }));
            continue;
        }
        let op = match r {
            Exchange::Pull { .. } => Op::Pull,
            Exchange::PullIfStale(_) => Op::PullIfStale,
            Exchange::Push { .. } => Op::Push,
        };
        if parts.op != op as u8 || parts.status != Status::Ok as u8 {
            return Err(c.protocol(format!(
                "answer op {} status {} to a batched {op:?} request",
                parts.op, parts.status
            )));
        }
        let ack = match *r {
            Exchange::Pull { keys, .. } => {
                let pulled = c.pull_answer(&parts, keys, &mut out.versions, &mut out.rows)?;
                out.pulled(pulled, keys.len());
                None
            }
            Exchange::PullIfStale(q) => {
                let ack = c.stale_answer(&parts, &q, out)?;
                q.push.map(|_| ack)
            }
            Exchange::Push { rows, .. } => Some(c.push_answer(&parts, &rows, &mut out.produced)?),
        };
        answers.push(Ok(Answered {
            incarnation: parts.incarnation,
            ack,
        }));
    }
    Ok(answers)
}

/// Of a held batch sent again: each request's answering incarnation, or the shard's refusal.
pub(super) fn answered(
    c: &TcpShardClient,
    p: &FrameParts<'_>,
    requests: usize,
) -> Result<Vec<Result<u64, TransportError>>, TransportError> {
    let bodies = codec::batch::decode_response(p, requests).map_err(|e| c.malformed(e))?;
    bodies
        .iter()
        .map(|body| {
            let parts = split_response(body).map_err(|e| c.malformed(e))?;
            if parts.status == Status::Error as u8 {
                let error: WireError = c.header(parts)?;
                return Ok(Err(TransportError::Remote {
                    addr: c.addr.clone(),
                    error,
                }));
            }
            Ok(Ok(parts.incarnation))
        })
        .collect()
}
