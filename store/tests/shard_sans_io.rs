//! The shard driven through the protocol session with no sockets: optimizers against the textbook
//! formulas, all-or-nothing pushes, and the protocol's refusals.

use hetkv_store::{Shard, ShardConfig};
use hetkv_transport::codec;
use hetkv_transport::service::Session;
use hetkv_transport::wire::{
    self, decode_header, split_response, CreateRequest, CreateResponse, ErrorCode, HelloRequest,
    Op, PushResponse, Status, WireError, MAGIC, PROTOCOL_VERSION,
};
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};
use hetkv_transport::{PushRef, StaleQuery, StaleRows};
use serde::{de::DeserializeOwned, Serialize};

struct Harness {
    shard: Shard,
    session: Session,
    /// The number of the harness's next push (each settled before the next is sent).
    next_seq: u64,
}

impl Harness {
    fn new(shard: u32, shards: u32) -> Self {
        Self::of(
            Shard::new(ShardConfig::new(shard, shards)).unwrap(),
            wire::DEFAULT_MAX_FRAME,
        )
    }

    /// `shard` through a session of frames up to `max_frame` bytes, greeted.
    fn of(shard: Shard, max_frame: u32) -> Self {
        let mut h = Self {
            shard,
            session: Session::new(max_frame),
            next_seq: 1,
        };
        let hello = HelloRequest {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            auth: None,
            client: "test".into(),
            client_id: None,
        };
        h.call_raw(Op::Hello as u8, &hello, &[]).unwrap();
        h
    }

    /// One frame through the session: Ok((header, payload)) or the error sent.
    fn call_raw<H: Serialize>(
        &mut self,
        op: u8,
        header: &H,
        payload: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), WireError> {
        let mut frame = Vec::new();
        wire::start_frame(&mut frame, op, Status::Ok, header);
        frame.extend_from_slice(payload);
        self.call_frame(frame).map(|out| {
            let parts = split_response(&out[4..]).unwrap();
            (parts.header.to_vec(), parts.payload.to_vec())
        })
    }

    /// A started request frame (from a codec) through the session: the whole answer frame, or
    /// the error sent.
    fn call_frame(&mut self, mut frame: Vec<u8>) -> Result<Vec<u8>, WireError> {
        wire::finish_frame(&mut frame, u32::MAX).unwrap();
        let mut out = Vec::new();
        self.session.on_frame(&self.shard, &frame[4..], &mut out);
        let parts = split_response(&out[4..]).unwrap();
        if parts.status == Status::Error as u8 {
            return Err(decode_header(parts.header).unwrap());
        }
        Ok(out)
    }

    fn call<H: Serialize, R: DeserializeOwned>(
        &mut self,
        op: Op,
        header: &H,
        payload: &[u8],
    ) -> Result<(R, Vec<u8>), WireError> {
        let (h, p) = self.call_raw(op as u8, header, payload)?;
        Ok((decode_header(&h).unwrap(), p))
    }

    fn create(&mut self, spec: &TableSpec) -> Result<CreateResponse, WireError> {
        self.call(Op::CreateTable, &CreateRequest { spec: spec.clone() }, &[])
            .map(|r| r.0)
    }

    fn push(
        &mut self,
        table: &str,
        keys: &[u64],
        counts: &[u32],
        grads: &[f32],
    ) -> Result<PushResponse, WireError> {
        let mut frame = Vec::new();
        let seq = self.next_seq;
        self.next_seq += 1;
        let origin = wire::Origin {
            client: 1,
            seq,
            settled_below: seq,
        };
        codec::push::encode_request(
            &mut frame,
            table,
            &PushRef::new(keys, counts, grads),
            origin,
        );
        let out = self.call_frame(frame)?;
        Ok(decode_header(split_response(&out[4..]).unwrap().header).unwrap())
    }

    fn pull(&mut self, table: &str, keys: &[u64]) -> Result<(Vec<u64>, Vec<f32>), WireError> {
        let mut frame = Vec::new();
        codec::pull::encode_request(&mut frame, table, keys);
        let out = self.call_frame(frame)?;
        let reply = codec::pull::decode_response(&split_response(&out[4..]).unwrap(), keys.len())
            .expect("a well-formed answer");
        Ok((reply.versions.iter().collect(), reply.rows.iter().collect()))
    }
}

fn spec(name: &str, dim: u32, optimizer: OptimizerSpec) -> TableSpec {
    TableSpec {
        name: name.into(),
        rows: 100,
        dim,
        init: Initializer::Uniform {
            bound: 0.5,
            seed: 3,
        },
        optimizer,
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    }
}

fn initial(spec: &TableSpec, key: u64) -> Vec<f64> {
    let mut v = vec![0f32; spec.dim as usize];
    spec.init.fill(key, &mut v);
    v.into_iter().map(f64::from).collect()
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len());
    for (j, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            ((*g as f64) - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{what}[{j}]: got {g}, want {w}"
        );
    }
}

/// Gradients for three pushes, the first two to the same row in one message.
fn grads(dim: usize, seed: u64) -> Vec<Vec<f64>> {
    (0..3u64)
        .map(|k| {
            (0..dim as u64)
                .map(|j| ((seed * 31 + k * 7 + j * 3) % 11) as f64 / 10.0 - 0.5)
                .collect()
        })
        .collect()
}

#[test]
fn sgd_matches_the_textbook_with_repeated_rows_in_one_push() {
    let mut h = Harness::new(0, 1);
    let s = spec("sgd", 4, OptimizerSpec::Sgd { lr: 0.1 });
    h.create(&s).unwrap();
    let g = grads(4, 1);
    let flat: Vec<f32> = g.iter().flatten().map(|&x| x as f32).collect();
    let ack = h.push("sgd", &[7, 7, 9], &[2, 3, 1], &flat).unwrap();
    assert_eq!((ack.rows, ack.updates), (3, 6));
    let mut w7 = initial(&s, 7);
    for grad in &g[..2] {
        for (w, g) in w7.iter_mut().zip(grad) {
            *w -= 0.1 * g;
        }
    }
    let (versions, rows) = h.pull("sgd", &[7, 9, 8]).unwrap();
    assert_eq!(versions, vec![5, 1, 0]);
    assert_close(&rows[..4], &w7, "row 7");
    let w9: Vec<f64> = initial(&s, 9)
        .iter()
        .zip(&g[2])
        .map(|(w, g)| w - 0.1 * g)
        .collect();
    assert_close(&rows[4..8], &w9, "row 9");
    assert_close(&rows[8..], &initial(&s, 8), "untouched row 8");
}

#[test]
fn adagrad_matches_the_textbook_with_repeated_rows_in_one_push() {
    let mut h = Harness::new(0, 1);
    let (lr, eps, acc0) = (0.05, 1e-6, 0.1);
    let s = spec(
        "ada",
        5,
        OptimizerSpec::Adagrad {
            lr,
            eps,
            initial_accumulator: acc0,
        },
    );
    h.create(&s).unwrap();
    let g = grads(5, 2);
    let flat: Vec<f32> = g.iter().flatten().map(|&x| x as f32).collect();
    h.push("ada", &[3, 3, 3], &[1, 1, 4], &flat).unwrap();
    let mut w = initial(&s, 3);
    let mut acc = [acc0 as f64; 5];
    for grad in &g {
        for j in 0..5 {
            acc[j] += grad[j] * grad[j];
            w[j] -= lr as f64 * grad[j] / (acc[j].sqrt() + eps as f64);
        }
    }
    let (versions, rows) = h.pull("ada", &[3]).unwrap();
    assert_eq!(versions, vec![6]);
    assert_close(&rows, &w, "adagrad row");
}

#[test]
fn adam_matches_the_textbook_with_a_per_row_step_count() {
    let mut h = Harness::new(0, 1);
    let (lr, b1, b2, eps) = (0.01f32, 0.9f32, 0.999f32, 1e-8f32);
    let s = spec(
        "adam",
        3,
        OptimizerSpec::Adam {
            lr,
            beta1: b1,
            beta2: b2,
            eps,
        },
    );
    h.create(&s).unwrap();
    let g = grads(3, 3);
    // Row 5 gets two steps in one message and one in a second; row 6 one step only (lazy Adam:
    // its step count is its own).
    let flat: Vec<f32> = [&g[0], &g[1], &g[2]]
        .iter()
        .flat_map(|v| v.iter().map(|&x| x as f32))
        .collect();
    h.push("adam", &[5, 5, 6], &[1, 1, 1], &flat).unwrap();
    let second: Vec<f32> = g[2].iter().map(|&x| x as f32).collect();
    h.push("adam", &[5], &[1], &second).unwrap();

    let adam = |w: &mut Vec<f64>, steps: &[&Vec<f64>]| {
        let (mut m, mut v) = (vec![0f64; 3], vec![0f64; 3]);
        for (t, grad) in steps.iter().enumerate() {
            let t = t as i32 + 1;
            for j in 0..3 {
                m[j] = b1 as f64 * m[j] + (1.0 - b1 as f64) * grad[j];
                v[j] = b2 as f64 * v[j] + (1.0 - b2 as f64) * grad[j] * grad[j];
                let m_hat = m[j] / (1.0 - (b1 as f64).powi(t));
                let v_hat = v[j] / (1.0 - (b2 as f64).powi(t));
                w[j] -= lr as f64 * m_hat / (v_hat.sqrt() + eps as f64);
            }
        }
    };
    let mut w5 = initial(&s, 5);
    adam(&mut w5, &[&g[0], &g[1], &g[2]]);
    let mut w6 = initial(&s, 6);
    adam(&mut w6, &[&g[2]]);
    let (versions, rows) = h.pull("adam", &[5, 6]).unwrap();
    assert_eq!(versions, vec![3, 1]);
    assert_close(&rows[..3], &w5, "row 5");
    assert_close(&rows[3..], &w6, "row 6");
    let table = h.shard.table("adam").unwrap();
    assert_eq!(table.optimizer_state(5).1, 3, "row 5 took three Adam steps");
    assert_eq!(table.optimizer_state(6).1, 1, "row 6 took one");
}

#[test]
fn a_push_with_one_bad_row_changes_nothing() {
    let mut h = Harness::new(0, 1);
    let s = spec("t", 2, OptimizerSpec::Sgd { lr: 1.0 });
    h.create(&s).unwrap();
    let before = h.pull("t", &[1, 2, 3]).unwrap();
    for (bad, code) in [
        (f32::NAN, ErrorCode::InvalidGradient),
        (f32::INFINITY, ErrorCode::InvalidGradient),
        (f32::NEG_INFINITY, ErrorCode::InvalidGradient),
    ] {
        let e = h
            .push("t", &[1, 2, 3], &[1, 1, 1], &[0.5, 0.5, 0.5, 0.5, 0.5, bad])
            .unwrap_err();
        assert_eq!(e.code, code, "{e}");
    }
    let e = h
        .push("t", &[1, 2, 100], &[1, 1, 1], &[0.5; 6])
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::KeyOutOfRange);
    let e = h.push("t", &[1, 2, 3], &[1, 0, 1], &[0.5; 6]).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidGradient);
    let e = h.push("t", &[1, 2, 3], &[1, 1, 1], &[0.5; 5]).unwrap_err();
    assert_eq!(e.code, ErrorCode::WrongDim);
    assert_eq!(
        h.pull("t", &[1, 2, 3]).unwrap(),
        before,
        "nothing was applied"
    );
}

#[test]
fn keys_must_live_on_this_shard() {
    let mut h = Harness::new(1, 3);
    let s = spec("t", 2, OptimizerSpec::Sgd { lr: 1.0 });
    let info = h.create(&s).unwrap().info;
    assert_eq!(info.local_rows, 33); // keys 1, 4, ..., 97
    let (v, rows) = h.pull("t", &[1, 4, 97]).unwrap();
    assert_eq!(v, vec![0, 0, 0]);
    let mut want = vec![0f32; 2];
    s.init.fill(97, &mut want);
    assert_eq!(
        &rows[4..],
        &want[..],
        "initial value is a function of the global key"
    );
    let e = h.pull("t", &[2]).unwrap_err();
    assert_eq!(e.code, ErrorCode::KeyOutOfRange);
    assert!(e.message.contains("shard 2"), "{}", e.message);
}

#[test]
fn create_is_idempotent_and_refuses_conflicts_and_oversized_tables() {
    let mut h = Harness::new(0, 1);
    let s = spec("t", 2, OptimizerSpec::Sgd { lr: 1.0 });
    assert!(h.create(&s).unwrap().created);
    assert!(!h.create(&s).unwrap().created);
    let other = TableSpec {
        dim: 3,
        ..s.clone()
    };
    assert_eq!(
        h.create(&other).unwrap_err().code,
        ErrorCode::ConflictingTable
    );
    let huge = TableSpec {
        name: "huge".into(),
        rows: 1 << 40,
        ..s.clone()
    };
    let e = h.create(&huge).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidSpec);
    assert!(e.message.contains("limit"), "{}", e.message);
    let e = h
        .create(&TableSpec {
            name: "bad name".into(),
            ..s
        })
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidSpec);
}

#[test]
fn the_first_frame_must_be_a_hello_of_this_version() {
    let shard = Shard::new(ShardConfig::new(0, 1)).unwrap();
    let mut out = Vec::new();
    let mut frame = Vec::new();
    wire::start_frame(&mut frame, Op::Stats as u8, Status::Ok, &());
    wire::finish_frame(&mut frame, u32::MAX).unwrap();
    let outcome = Session::new(1 << 20).on_frame(&shard, &frame[4..], &mut out);
    assert!(outcome.close);
    assert_eq!(outcome.error.unwrap().code, ErrorCode::HandshakeRequired);

    let future = HelloRequest {
        magic: MAGIC,
        version: PROTOCOL_VERSION + 1,
        auth: None,
        client: "x".into(),
        client_id: None,
    };
    wire::start_frame(&mut frame, Op::Hello as u8, Status::Ok, &future);
    wire::finish_frame(&mut frame, u32::MAX).unwrap();
    let outcome = Session::new(1 << 20).on_frame(&shard, &frame[4..], &mut out);
    assert!(outcome.close);
    let e = outcome.error.unwrap();
    assert_eq!(e.code, ErrorCode::ProtocolVersion);
    assert!(
        e.message
            .contains(&format!("protocol {}", PROTOCOL_VERSION + 1)),
        "{}",
        e.message
    );
}

#[test]
fn responses_above_the_frame_limit_are_refused_before_being_built() {
    let mut h = Harness::of(Shard::new(ShardConfig::new(0, 1)).unwrap(), 4096);
    h.create(&spec("t", 64, OptimizerSpec::Sgd { lr: 1.0 }))
        .unwrap();
    let keys: Vec<u64> = (0..100).collect();
    let e = h.pull("t", &keys).unwrap_err();
    assert_eq!(e.code, ErrorCode::FrameTooLarge);
    assert!(h.pull("t", &keys[..10]).is_ok(), "the session goes on");
}

/// A conditional pull that carries a push and whose answer could exceed the frame is refused
/// before the push is applied: a refusal means nothing changed. Without a push, the same keys are
/// answered when the rows that actually come back fit.
#[test]
fn a_carried_push_is_not_applied_under_an_answer_too_large_for_the_frame() {
    let mut h = Harness::of(Shard::new(ShardConfig::new(0, 1)).unwrap(), 4096);
    h.create(&spec("t", 64, OptimizerSpec::Sgd { lr: 1.0 }))
        .unwrap();
    // 100 keys at their current version (0): nothing is stale, so the answer is small, but if
    // all came back it would be 100 x 268 bytes, above 4,096.
    let keys: Vec<u64> = (0..100).collect();
    let clocks = vec![0u64; keys.len()];
    let stale = |h: &mut Harness, push: Option<PushRef<'_>>| {
        let mut frame = Vec::new();
        let q = StaleQuery {
            table: "t",
            keys: &keys,
            clocks: &clocks,
            births: None,
            bound: 0,
            since: None,
            push,
            state_keys: 0,
        };
        codec::pull_if_stale::encode_request(&mut frame, &q, None);
        h.call_frame(frame)
    };
    let grad = vec![1.0f32; 64];
    let push = PushRef::new(&[5], &[1], &grad);
    let e = stale(&mut h, Some(push)).unwrap_err();
    assert_eq!(e.code, ErrorCode::FrameTooLarge);
    assert!(e.message.contains("nothing was applied"), "{}", e.message);
    let (versions, _) = h.pull("t", &[5]).unwrap();
    assert_eq!(versions, vec![0], "the refused push was not applied");
    assert!(
        stale(&mut h, None).is_ok(),
        "without a push the small answer is given"
    );
}

#[test]
fn a_numbered_push_to_a_dynamic_table_sent_again_is_acknowledged_and_not_applied_twice() {
    let mut h = Harness::new(0, 1);
    let dynamic = TableSpec {
        dynamic: Some(hetkv_transport::DynamicSpec {
            admission: hetkv_transport::Admission::Threshold { count: 2 },
            eviction: hetkv_transport::Eviction::Lru,
        }),
        ..spec("d", 2, OptimizerSpec::Sgd { lr: 1.0 })
    };
    h.create(&dynamic).unwrap();
    let key = u64::MAX - 5;
    let numbered = |h: &mut Harness, seq: u64, count: u32| -> PushResponse {
        let mut frame = Vec::new();
        let (keys, counts) = ([key], [count]);
        let rows = PushRef::new(&keys, &counts, &[1.0; 2]);
        let origin = wire::Origin {
            client: 7,
            seq,
            settled_below: 1,
        };
        codec::push::encode_request(&mut frame, "d", &rows, origin);
        let out = h.call_frame(frame).unwrap();
        decode_header(split_response(&out[4..]).unwrap().header).unwrap()
    };
    // One update counted towards admission, none applied; the repeat neither counts it again
    // (which would admit the key) nor applies it.
    let first = numbered(&mut h, 1, 1);
    assert_eq!(
        (first.updates, first.refused, first.duplicate),
        (0, 1, false)
    );
    let again = numbered(&mut h, 1, 1);
    assert!(again.duplicate);
    assert_eq!(
        h.pull("d", &[key]).unwrap().0,
        vec![0],
        "still not admitted"
    );
    // The next push is the key's second counted update: admitted, applied once.
    let second = numbered(&mut h, 2, 3);
    assert_eq!((second.updates, second.refused), (3, 0));
    assert!(numbered(&mut h, 2, 3).duplicate);
    assert_eq!(h.pull("d", &[key]).unwrap().0, vec![3], "applied once");
}

#[test]
fn a_numbered_push_sent_again_is_acknowledged_and_not_applied_twice() {
    let mut h = Harness::new(0, 1);
    h.create(&spec("t", 2, OptimizerSpec::Sgd { lr: 1.0 }))
        .unwrap();
    let origin = |seq| wire::Origin {
        client: 42,
        seq,
        settled_below: 1,
    };
    let numbered = |h: &mut Harness, seq: u64| -> PushResponse {
        let mut frame = Vec::new();
        let rows = PushRef::new(&[3, 3], &[1, 2], &[1.0; 4]);
        codec::push::encode_request(&mut frame, "t", &rows, origin(seq));
        let out = h.call_frame(frame).unwrap();
        decode_header(split_response(&out[4..]).unwrap().header).unwrap()
    };
    let first = numbered(&mut h, 1);
    assert_eq!((first.updates, first.duplicate), (3, false));
    let again = numbered(&mut h, 1);
    assert_eq!((again.rows, again.updates, again.duplicate), (2, 3, true));
    assert_eq!(h.pull("t", &[3]).unwrap().0, vec![3], "applied once");
    // A conditional pull of key 3 carrying a push of `count` updates to it.
    let carrying = |count: &'static [u32]| StaleQuery {
        table: "t",
        keys: &[3],
        clocks: &[0],
        births: None,
        bound: 0,
        since: None,
        push: Some(PushRef::new(&[3], count, &[1.0, 1.0])),
        state_keys: 0,
    };
    // A push carried by a conditional pull, sent twice: its rows once, the read both times.
    let carried = |h: &mut Harness| {
        let mut frame = Vec::new();
        let q = carrying(&[5]);
        codec::pull_if_stale::encode_request(&mut frame, &q, Some(origin(2)));
        let out = h.call_frame(frame).unwrap();
        let mut rows = StaleRows::default();
        let h = codec::pull_if_stale::decode_response(
            &split_response(&out[4..]).unwrap(),
            &q,
            &mut rows,
        )
        .unwrap();
        (h.pushed_updates, h.push_duplicate, rows.versions[0])
    };
    assert_eq!(carried(&mut h), (5, false, 8));
    assert_eq!(carried(&mut h), (5, true, 8));
    // Every push is numbered: a carried push without its number is refused, unapplied.
    let mut frame = Vec::new();
    codec::pull_if_stale::encode_request(&mut frame, &carrying(&[1]), None);
    let refused = h.call_frame(frame).unwrap_err();
    assert!(refused.message.contains("numbered"), "{refused}");
    // Numbers the sender settled are forgotten: once push 3 says every number below 3 is
    // settled, a late copy of push 1 (which said nothing was) is refused, not applied.
    let push = |h: &mut Harness, seq: u64, settled_below: u64| {
        let mut frame = Vec::new();
        let rows = PushRef::new(&[3], &[1], &[1.0; 2]);
        let origin = wire::Origin {
            client: 42,
            seq,
            settled_below,
        };
        codec::push::encode_request(&mut frame, "t", &rows, origin);
        h.call_frame(frame)
    };
    push(&mut h, 3, 3).unwrap();
    assert_eq!(h.pull("t", &[3]).unwrap().0, vec![9]);
    let e = push(&mut h, 1, 1).unwrap_err();
    assert_eq!(e.code, wire::ErrorCode::SequenceForgotten, "{e}");
    assert_eq!(h.pull("t", &[3]).unwrap().0, vec![9], "not applied");
    h.push("t", &[3], &[1], &[1.0; 2]).unwrap();
    h.push("t", &[3], &[1], &[1.0; 2]).unwrap();
    assert_eq!(h.pull("t", &[3]).unwrap().0, vec![11]);
    // Another client's push 1 is its own.
    let mut frame = Vec::new();
    let other = wire::Origin {
        client: 7,
        seq: 1,
        settled_below: 1,
    };
    codec::push::encode_request(&mut frame, "t", &PushRef::new(&[3], &[1], &[1.0; 2]), other);
    h.call_frame(frame).unwrap();
    assert_eq!(h.pull("t", &[3]).unwrap().0, vec![12]);
}

/// A finished request frame of a codec, for a batch.
fn finished(encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = Vec::new();
    encode(&mut f);
    wire::finish_frame(&mut f, u32::MAX).unwrap();
    f
}

/// A batch of `frames` through the session: its answers' bodies (each split), or the error
/// that refused the whole batch.
fn batch(h: &mut Harness, frames: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, WireError> {
    let mut frame = Vec::new();
    codec::batch::encode_request(&mut frame, frames.len() as u32);
    frames
        .iter()
        .for_each(|f| codec::batch::append(&mut frame, f));
    let out = h.call_frame(frame)?;
    let parts = split_response(&out[4..]).unwrap();
    let bodies = codec::batch::decode_response(&parts, frames.len()).expect("one answer each");
    Ok(bodies.iter().map(|b| b.to_vec()).collect())
}

/// Each request of a batch is answered on its own, in order: a refused one (a push of the wrong
/// dim, an op a batch does not carry, a batch inside a batch) changes nothing and leaves the
/// others applied and answered; a batch that is not well formed is refused whole, before
/// anything in it is carried out.
#[test]
fn a_batch_answers_each_request_on_its_own_and_refuses_what_it_cannot_carry() {
    let mut h = Harness::new(0, 1);
    h.create(&spec("a", 4, OptimizerSpec::Sgd { lr: 1.0 }))
        .unwrap();
    h.create(&spec("b", 2, OptimizerSpec::Sgd { lr: 1.0 }))
        .unwrap();
    let origin = |seq| wire::Origin {
        client: 7,
        seq,
        settled_below: 1,
    };
    let (before, _) = h.pull("a", &[1, 2]).unwrap();
    let frames = vec![
        finished(|f| {
            codec::push::encode_request(f, "a", &PushRef::new(&[1], &[1], &[0.5; 4]), origin(1))
        }),
        // The wrong dim for table b: refused, nothing of it applied.
        finished(|f| {
            codec::push::encode_request(f, "b", &PushRef::new(&[1], &[1], &[0.5; 3]), origin(2))
        }),
        finished(|f| {
            wire::start_frame(f, Op::Stats as u8, Status::Ok, &());
        }),
        finished(|f| codec::batch::encode_request(f, 1)),
        finished(|f| codec::pull::encode_request(f, "a", &[1, 2])),
    ];
    let answers = batch(&mut h, &frames).unwrap();
    let status = |b: &[u8]| split_response(b).unwrap().status;
    let error =
        |b: &[u8]| -> WireError { decode_header(split_response(b).unwrap().header).unwrap() };
    assert_eq!(status(&answers[0]), Status::Ok as u8);
    assert_eq!(error(&answers[1]).code, ErrorCode::WrongDim);
    assert_eq!(error(&answers[2]).code, ErrorCode::UnknownOp);
    assert_eq!(error(&answers[3]).code, ErrorCode::UnknownOp);
    let reply = codec::pull::decode_response(&split_response(&answers[4]).unwrap(), 2).unwrap();
    let versions: Vec<u64> = reply.versions.iter().collect();
    assert_eq!(
        versions,
        vec![before[0] + 1, before[1]],
        "the push before the pull applied"
    );
    let (versions_b, _) = h.pull("b", &[1]).unwrap();
    assert_eq!(versions_b, vec![0], "the refused push changed nothing");

    // The same numbered push again, in another batch: acknowledged, not applied twice.
    let again = vec![frames[0].clone(), frames[4].clone()];
    let answers = batch(&mut h, &again).unwrap();
    let ack: PushResponse = decode_header(split_response(&answers[0]).unwrap().header).unwrap();
    assert!(ack.duplicate);
    let reply = codec::pull::decode_response(&split_response(&answers[1]).unwrap(), 2).unwrap();
    assert_eq!(reply.versions.iter().next(), Some(before[0] + 1));

    // Refused whole: empty, a count that does not match its frames, bytes after them.
    let refused = |h: &mut Harness, count: u32, payload: &[u8]| {
        let mut frame = Vec::new();
        codec::batch::encode_request(&mut frame, count);
        frame.extend_from_slice(payload);
        h.call_frame(frame).unwrap_err().code
    };
    assert_eq!(refused(&mut h, 0, &[]), ErrorCode::MalformedFrame);
    assert_eq!(refused(&mut h, 2, &frames[4]), ErrorCode::MalformedFrame);
    let mut trailing = frames[4].clone();
    trailing.push(0);
    assert_eq!(refused(&mut h, 1, &trailing), ErrorCode::MalformedFrame);
    let mut lying = frames[4].clone();
    lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(refused(&mut h, 1, &lying), ErrorCode::MalformedFrame);
    assert_eq!(
        refused(&mut h, wire::MAX_BATCH + 1, &[]),
        ErrorCode::MalformedFrame
    );
    let (after, _) = h.pull("a", &[1, 2]).unwrap();
    assert_eq!(after, vec![before[0] + 1, before[1]]);
}

/// Every request of a batch is answered within the frame, at worst with an error: a request
/// whose answer would not fit in what the batch has left is refused alone (its push not
/// applied), and the requests before and after it are answered.
#[test]
fn a_batch_whose_answers_outgrow_the_frame_refuses_only_what_does_not_fit() {
    let mut h = Harness::of(Shard::new(ShardConfig::new(0, 1)).unwrap(), 20 << 10);
    h.create(&spec("w", 16, OptimizerSpec::Sgd { lr: 1.0 }))
        .unwrap();
    // 100 rows of 16: 7.2 KB an answer; two fit the frame with the reserve, three do not.
    let keys: Vec<u64> = (0..100).collect();
    let pull = finished(|f| codec::pull::encode_request(f, "w", &keys));
    let answers = batch(&mut h, &[pull.clone(), pull.clone(), pull.clone(), pull]).unwrap();
    let codes: Vec<Option<ErrorCode>> = answers
        .iter()
        .map(|b| {
            let p = split_response(b).unwrap();
            (p.status == Status::Error as u8)
                .then(|| decode_header::<WireError>(p.header).unwrap().code)
        })
        .collect();
    assert_eq!(codes[0], None);
    assert_eq!(codes[1], None);
    assert_eq!(codes[2], Some(ErrorCode::FrameTooLarge));
    assert_eq!(codes[3], Some(ErrorCode::FrameTooLarge));
    // Too many requests to answer within the frame at all: refused whole.
    let small = finished(|f| codec::pull::encode_request(f, "w", &[1]));
    let many: Vec<Vec<u8>> = (0..11).map(|_| small.clone()).collect();
    assert_eq!(
        batch(&mut h, &many).unwrap_err().code,
        ErrorCode::MalformedFrame
    );
}

/// A dropped table gives back its memory and its name at once: a table that did not fit beside
/// it fits after, one of its name is created anew (another spec), requests for it are refused as
/// unknown, and the other tables' region ids still read their own regions.
#[test]
fn a_dropped_table_frees_its_memory_and_name_and_other_regions_read_on() {
    let big = spec("big", 4, OptimizerSpec::Sgd { lr: 1.0 });
    let big = TableSpec {
        rows: 20_000,
        ..big
    };
    let footprint = hetkv_store::Table::footprint(&big, 0, 1);
    let mut config = ShardConfig::new(0, 1);
    config.max_memory = hetkv_store::sessions::RESERVED_BYTES + footprint + footprint / 2;
    let mut h = Harness::of(Shard::new(config).unwrap(), wire::DEFAULT_MAX_FRAME);
    h.create(&spec("small", 2, OptimizerSpec::Sgd { lr: 1.0 }))
        .unwrap();
    h.create(&big).unwrap();
    let other = TableSpec {
        name: "other".into(),
        ..big.clone()
    };
    assert_eq!(
        h.create(&other).unwrap_err().code,
        ErrorCode::InvalidSpec,
        "no room"
    );
    h.push("big", &[7], &[1], &[1.0; 4]).unwrap();
    let drop = |h: &mut Harness, table: &str| -> Result<bool, WireError> {
        let req = wire::TableRequest {
            table: table.into(),
        };
        h.call::<_, wire::DropResponse>(Op::DropTable, &req, &[])
            .map(|(r, _)| r.dropped)
    };
    assert_eq!(drop(&mut h, "big"), Ok(true));
    assert_eq!(drop(&mut h, "big"), Ok(false));
    assert_eq!(
        h.pull("big", &[7]).unwrap_err().code,
        ErrorCode::UnknownTable
    );
    assert_eq!(
        h.push("big", &[7], &[1], &[1.0; 4]).unwrap_err().code,
        ErrorCode::UnknownTable
    );
    h.create(&other).unwrap();
    // The name again, of another dim: a new table, at version 0.
    let again = spec("big", 3, OptimizerSpec::Sgd { lr: 1.0 });
    h.create(&again).unwrap();
    let (versions, rows) = h.pull("big", &[7]).unwrap();
    assert_eq!((versions, rows.len()), (vec![0], 3));
    // Region 0 (small) reads; region 1 (the dropped table) is refused.
    let read = |h: &mut Harness, region: u32| {
        let mut f = Vec::new();
        codec::read::encode_request(
            &mut f,
            &[hetkv_transport::Span {
                region,
                offset: 0,
                len: 8,
            }],
        );
        h.call_frame(f)
    };
    assert!(read(&mut h, 0).is_ok());
    assert_eq!(read(&mut h, 1).unwrap_err().code, ErrorCode::InvalidSpan);
}
