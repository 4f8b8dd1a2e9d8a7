//! Mutated and random frames through the protocol session and a real shard: no input may panic
//! the daemon, every answer is a well-formed frame, and the tables stay consistent (the versions
//! of the rows of every table ever created, dropped ones included, equal the updates the shard
//! acknowledged, in batches too).

use hetkv_store::{Shard, ShardConfig};
use hetkv_transport::service::Session;
use hetkv_transport::wire::{
    self, put_f32s, put_u32s, put_u64s, split_response, CreateRequest, HelloRequest, Op, Origin,
    PullIfStaleRequest, PullRequest, PushRequest, PushResponse, ReadRequest, Since, Span, Status,
    TableRequest, MAGIC, PROTOCOL_VERSION,
};
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};
use serde::Serialize;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn frame<H: Serialize>(op: Op, header: &H, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    wire::start_frame(&mut f, op as u8, Status::Ok, header);
    f.extend_from_slice(payload);
    wire::finish_frame(&mut f, u32::MAX).unwrap();
    f.split_off(4) // the body: what the transport hands to the session
}

fn spec() -> TableSpec {
    TableSpec {
        name: "t".into(),
        rows: 64,
        dim: 4,
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::Sgd { lr: 1.0 },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    }
}

/// Valid bodies for every operation, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    put_u64s(&mut keys, &[0, 5, 63]);
    let mut push = keys.clone();
    put_u32s(&mut push, &[1, 2, 1]);
    put_u64s(&mut push, &[0, wire::NO_BASE, 7]);
    put_f32s(&mut push, &[-1.0; 12]);
    let mut stale = keys.clone();
    put_u64s(&mut stale, &[0, u64::MAX, 3]);
    let mut stale_push = stale.clone();
    stale_push.extend_from_slice(&push);
    let mut spans = Vec::new();
    Span {
        region: 0,
        offset: 8,
        len: 40,
    }
    .encode(&mut spans);
    let t = || "t".to_string();
    let mut seeds = vec![
        frame(Op::ListTables, &(), &[]),
        frame(Op::CreateTable, &CreateRequest { spec: spec() }, &[]),
        frame(Op::RegionInfo, &TableRequest { table: t() }, &[]),
        frame(Op::Read, &ReadRequest { spans: 1 }, &spans),
        frame(
            Op::Pull,
            &PullRequest {
                table: t(),
                keys: 3,
            },
            &keys,
        ),
        frame(
            Op::PullIfStale,
            &PullIfStaleRequest {
                table: t(),
                keys: 3,
                bound: 1,
                since: None,
                push_rows: 0,
                origin: None,
                state_keys: 2,
                push_bases: false,
                births: false,
            },
            &stale,
        ),
        frame(
            Op::PullIfStale,
            &PullIfStaleRequest {
                table: t(),
                keys: 3,
                bound: 0,
                since: Some(Since {
                    clock: 1,
                    own: 2,
                    max_foreign: 3,
                }),
                push_rows: 3,
                origin: Some(Origin {
                    client: 1,
                    seq: 1,
                    settled_below: 1,
                }),
                state_keys: 3,
                push_bases: true,
                births: false,
            },
            &stale_push,
        ),
        frame(
            Op::Push,
            &PushRequest {
                table: t(),
                rows: 3,
                origin: Origin {
                    client: 1,
                    seq: 2,
                    settled_below: 1,
                },
                bases: true,
            },
            &push,
        ),
        frame(Op::Stats, &(), &[]),
        frame(Op::DropTable, &TableRequest { table: t() }, &[]),
    ];
    // Assignments: values with the state reset, and values kept with an Adagrad table's state
    // set (three rows of four accumulators).
    let mut values = keys.clone();
    put_f32s(&mut values, &[0.5; 12]);
    seeds.push(frame(
        Op::Assign,
        &wire::AssignRequest {
            table: t(),
            rows: 3,
            values: true,
            state: wire::AssignState::Reset,
        },
        &values,
    ));
    let mut state = keys.clone();
    put_f32s(&mut state, &[0.25; 12]);
    seeds.push(frame(
        Op::Assign,
        &wire::AssignRequest {
            table: "g".into(),
            rows: 3,
            values: false,
            state: wire::AssignState::Set,
        },
        &state,
    ));
    // A batch of a push and a pull (each request a whole frame, its prefix included).
    let mut batch = Vec::new();
    for body in [&seeds[seeds.len() - 5], &seeds[3]] {
        batch.extend_from_slice(&(body.len() as u32).to_le_bytes());
        batch.extend_from_slice(body);
    }
    seeds.push(frame(
        Op::Batch,
        &wire::BatchRequest { requests: 2 },
        &batch,
    ));
    seeds
}

fn mutate(rng: &mut Rng, body: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !body.is_empty() => {
                let i = rng.below(body.len() as u64) as usize;
                body[i] ^= 1 << rng.below(8);
            }
            1 if !body.is_empty() => {
                let i = rng.below(body.len() as u64) as usize;
                body[i] = rng.next() as u8;
            }
            2 => body.truncate(rng.below(body.len() as u64 + 1) as usize),
            3 => body.extend((0..rng.below(40)).map(|_| rng.next() as u8)),
            4 if body.len() >= 8 => {
                // A header length anywhere in u32.
                let v = if rng.below(2) == 0 {
                    rng.next() as u32
                } else {
                    rng.below(64) as u32
                };
                body[4..8].copy_from_slice(&v.to_le_bytes());
            }
            _ if !body.is_empty() => body[0] = rng.below(19) as u8, // another op
            _ => {}
        }
    }
}

/// The updates a successful answer says were applied: a push's, a conditional pull's carried
/// push's, and those of every request of a batch (a repeat of a numbered push is acknowledged
/// without being applied).
fn acknowledged(parts: &wire::FrameParts<'_>) -> u64 {
    if parts.status != Status::Ok as u8 {
        return 0;
    }
    if parts.op == Op::Push as u8 || parts.op == Op::Assign as u8 {
        let ack: PushResponse = wire::decode_header(parts.header).unwrap();
        return if ack.duplicate { 0 } else { ack.updates };
    }
    if parts.op == Op::PullIfStale as u8 {
        let h: wire::PullIfStaleResponse = wire::decode_header(parts.header).unwrap();
        return if h.push_duplicate {
            0
        } else {
            h.pushed_updates
        };
    }
    if parts.op == Op::Batch as u8 {
        let r: wire::BatchResponse = wire::decode_header(parts.header).unwrap();
        let bodies = hetkv_transport::codec::batch::decode_response(parts, r.answers as usize)
            .expect("a batch's answer frames fill it");
        return bodies
            .iter()
            .map(|b| acknowledged(&split_response(b).expect("each answer splits")))
            .sum();
    }
    0
}

#[test]
fn mutated_frames_never_panic_the_shard_and_every_answer_is_a_frame() {
    let shard = Shard::new(ShardConfig::new(0, 1)).unwrap();
    shard.create(spec()).unwrap();
    shard
        .create(TableSpec {
            name: "g".into(),
            optimizer: OptimizerSpec::adagrad(0.1),
            ..spec()
        })
        .unwrap();
    let hello = frame(
        Op::Hello,
        &HelloRequest {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            auth: None,
            client: "fuzz".into(),
            client_id: None,
        },
        &[],
    );
    let seeds = seeds();
    let mut rng = Rng(0xF022);
    let mut out = Vec::new();
    let mut session = Session::new(1 << 20);
    session.on_frame(&shard, &hello, &mut out);
    let (mut refused, mut closed, mut acked_updates) = (0u64, 0u64, 0u64);
    // Every table ever created: a dropped one keeps its rows (and their versions) while held.
    let mut seen = shard.tables();
    for i in 0..200_000u64 {
        let body = if i % 10 == 0 {
            (0..rng.below(64)).map(|_| rng.next() as u8).collect()
        } else {
            let mut b = seeds[rng.below(seeds.len() as u64) as usize].clone();
            mutate(&mut rng, &mut b);
            b
        };
        let outcome = session.on_frame(&shard, &body, &mut out);
        // Every answer is a frame whose length prefix matches and whose body splits.
        let len = u32::from_le_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(len + 4, out.len(), "answer {i}: length prefix");
        let parts = split_response(&out[4..]).unwrap_or_else(|e| panic!("answer {i}: {e}"));
        if outcome.error.is_some() {
            refused += 1;
            assert_eq!(parts.status, Status::Error as u8);
        } else {
            acked_updates += acknowledged(&parts);
        }
        if parts.op == Op::CreateTable as u8 {
            for t in shard.tables() {
                if !seen.iter().any(|s| std::sync::Arc::ptr_eq(s, &t)) {
                    seen.push(t);
                }
            }
        }
        if outcome.close {
            // A failed handshake ends the connection: start a new one.
            closed += 1;
            session = Session::new(1 << 20);
            session.on_frame(&shard, &hello, &mut out);
        }
    }
    // The shard is consistent: over every table (mutated creates make new ones, and mutated
    // names push to them), row versions add up to the updates acknowledged as applied (repeats
    // of numbered pushes are acknowledged and not applied), and every row reads
    // back whole and finite.
    let mut versions = 0;
    for t in &seen {
        let mut image = vec![0u8; t.layout().stride()];
        let mut row = vec![0f32; t.layout().dim()];
        for i in 0..t.local_rows() {
            versions += t.read_local(i, &mut image);
            hetkv_transport::row::decode_payload(t.layout(), &image, &mut row);
            assert!(
                row.iter().all(|v| v.is_finite()),
                "{} row {i}: {row:?}",
                t.spec().name
            );
        }
    }
    println!(
        "{refused} refused, {closed} handshakes closed, {acked_updates} updates acknowledged over {} tables ({} dropped)",
        seen.len(),
        seen.len() - shard.tables().len()
    );
    assert_eq!(
        versions, acked_updates,
        "versions equal the updates acknowledged"
    );
    assert!(
        refused > 50_000 && acked_updates > 0,
        "refused {refused}, acked {acked_updates}, closed {closed}"
    );
}
