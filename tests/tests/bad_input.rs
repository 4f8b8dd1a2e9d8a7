//! Bad input over real sockets: each case gets a clear error (where the peer is still there), and
//! the daemon keeps serving other clients afterwards.

use hetkv_client::Cluster;
use hetkv_fallback_tcp::{ClientConfig, ServerConfig, TcpShardClient};
use hetkv_store::{EmbeddedCluster, ShardConfig};
use hetkv_tests::{sgd_table, RawConn};
use hetkv_transport::codec::assign::Assignment;
use hetkv_transport::wire::{
    ErrorCode, PullRequest, PushRequest, ReadRequest, Span, TableRequest, PROTOCOL_VERSION,
};
use hetkv_transport::{ShardTransport, TransportError};

fn cluster(shards: u32) -> EmbeddedCluster {
    let c = EmbeddedCluster::start_with(
        shards,
        ServerConfig {
            max_frame: 1 << 20,
            ..ServerConfig::default()
        },
        |i| ShardConfig::new(i, shards),
    )
    .unwrap();
    let cl = Cluster::connect_tcp(c.addrs(), &ClientConfig::default()).unwrap();
    cl.create_table(&sgd_table("emb", 1000, 8, 0.5)).unwrap();
    c
}

/// Another client is served normally: pulls and pushes work and values are sane.
fn assert_still_serves(addrs: &[String]) {
    let cl = Cluster::connect_tcp(addrs, &ClientConfig::default()).unwrap();
    let t = cl.open_table("emb").unwrap();
    let mut out = vec![0f32; 16];
    let mut versions = vec![0u64; 2];
    t.pull(&[1, 2], &mut out, Some(&mut versions)).unwrap();
    assert!(out.iter().all(|v| v.is_finite() && v.abs() <= 0.1 + 1e-6));
}

fn remote_code(e: TransportError) -> ErrorCode {
    e.remote()
        .unwrap_or_else(|| panic!("expected a remote error, got {e}"))
        .code
}

#[test]
fn garbage_bytes_get_an_error_and_a_closed_connection() {
    let c = cluster(1);
    let mut raw = RawConn::connect(&c.addrs()[0]);
    raw.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = raw.recv().expect("an error frame before closing");
    assert_eq!(r.error().unwrap().code, ErrorCode::FrameTooLarge);
    assert!(raw.is_closed());

    // Garbage inside a well-sized frame after a valid hello: refused, the connection goes on.
    let mut raw = RawConn::greeted(&c.addrs()[0]);
    let mut frame = 24u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&[0x06, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00]);
    frame.extend_from_slice(&[0xAB; 16]);
    raw.send_bytes(&frame);
    assert_eq!(
        raw.recv().unwrap().error().unwrap().code,
        ErrorCode::MalformedFrame
    );
    raw.send(
        6,
        &PullRequest {
            table: "emb".into(),
            keys: 3,
        },
        &[1, 2, 3],
    );
    assert_eq!(
        raw.recv().unwrap().error().unwrap().code,
        ErrorCode::MalformedFrame
    );
    raw.send(9, &(), &[]);
    assert!(raw.recv().unwrap().error().is_none(), "stats after garbage");
    assert_still_serves(c.addrs());
}

#[test]
fn a_4_gib_length_prefix_is_refused_before_allocating() {
    let c = cluster(1);
    for prefix in [u32::MAX, 1 << 31, (1 << 20) + 1] {
        let mut raw = RawConn::greeted(&c.addrs()[0]);
        raw.send_bytes(&prefix.to_le_bytes());
        let e = raw.recv().unwrap().error().unwrap();
        assert_eq!(e.code, ErrorCode::FrameTooLarge);
        assert!(e.message.contains(&prefix.to_string()), "{}", e.message);
        assert!(raw.is_closed());
    }
    assert_still_serves(c.addrs());
}

#[test]
fn a_frame_cut_off_midway_by_a_departing_peer_changes_nothing() {
    let c = cluster(1);
    let before = c.shard(0).table("emb").unwrap().stats();
    {
        let mut raw = RawConn::greeted(&c.addrs()[0]);
        // A push of 4 rows announced, a third of it sent, then the peer is gone.
        let mut frame = Vec::new();
        hetkv_transport::wire::start_frame(
            &mut frame,
            8,
            hetkv_transport::wire::Status::Ok,
            &PushRequest {
                table: "emb".into(),
                rows: 4,
                origin: hetkv_transport::wire::Origin {
                    client: 1,
                    seq: 1,
                    settled_below: 1,
                },
                bases: false,
            },
        );
        let len_without_payload = frame.len();
        frame.resize(len_without_payload + 4 * 8 + 4 * 4 + 4 * 8 * 4, 0);
        hetkv_transport::wire::finish_frame(&mut frame, u32::MAX).unwrap();
        raw.send_bytes(&frame[..frame.len() / 3]);
    }
    // Also a peer that leaves inside the 4-byte prefix.
    {
        let mut raw = RawConn::greeted(&c.addrs()[0]);
        raw.send_bytes(&[0x10, 0x00]);
    }
    assert_still_serves(c.addrs());
    let after = c.shard(0).table("emb").unwrap().stats();
    assert_eq!(
        after.rows_pushed, before.rows_pushed,
        "no part of the cut push was applied"
    );
}

#[test]
fn an_unknown_operation_is_refused_and_the_connection_goes_on() {
    let c = cluster(1);
    let mut raw = RawConn::greeted(&c.addrs()[0]);
    raw.send(77, &(), &[]);
    let r = raw.recv().unwrap();
    assert_eq!(r.op, 77);
    let e = r.error().unwrap();
    assert_eq!(e.code, ErrorCode::UnknownOp);
    assert!(e.message.contains("77"));
    raw.send(
        4,
        &TableRequest {
            table: "emb".into(),
        },
        &[],
    );
    assert!(raw.recv().unwrap().error().is_none());
    assert_still_serves(c.addrs());
}

#[test]
fn unknown_tables_wrong_dims_and_out_of_range_keys_are_refused() {
    let c = cluster(2);
    let shard0 = TcpShardClient::connect(&c.addrs()[0], ClientConfig::default()).unwrap();
    let (mut v, mut rows) = (Vec::new(), Vec::new());

    let e = shard0.pull("nope", &[0], &mut v, &mut rows).unwrap_err();
    assert_eq!(remote_code(e), ErrorCode::UnknownTable);
    let e = shard0
        .push("emb", &[0, 2], &[1, 1], &[0.1; 15])
        .unwrap_err();
    assert_eq!(remote_code(e), ErrorCode::WrongDim);
    let e = shard0.pull("emb", &[1000], &mut v, &mut rows).unwrap_err();
    assert_eq!(remote_code(e), ErrorCode::KeyOutOfRange);
    let e = shard0
        .pull("emb", &[u64::MAX], &mut v, &mut rows)
        .unwrap_err();
    assert_eq!(remote_code(e), ErrorCode::KeyOutOfRange);
    let e = shard0.pull("emb", &[3], &mut v, &mut rows).unwrap_err();
    assert_eq!(
        remote_code(e),
        ErrorCode::KeyOutOfRange,
        "key 3 lives on shard 1"
    );
    let e = shard0
        .push("emb", &[0, 1001], &[1, 1], &[0.1; 16])
        .unwrap_err();
    assert_eq!(remote_code(e), ErrorCode::KeyOutOfRange);
    let region = shard0.region_info("emb").unwrap();
    let mut out = Vec::new();
    let e = shard0
        .read(
            &[Span {
                region: region.region,
                offset: region.len - 4,
                len: 8,
            }],
            &mut out,
        )
        .unwrap_err();
    assert_eq!(remote_code(e), ErrorCode::InvalidSpan);
    let e = shard0
        .read(
            &[Span {
                region: 9,
                offset: 0,
                len: 8,
            }],
            &mut out,
        )
        .unwrap_err();
    assert_eq!(remote_code(e), ErrorCode::InvalidSpan);
    // A read whose answer would exceed the frame limit.
    let mut raw = RawConn::greeted(&c.addrs()[0]);
    let mut spans = Vec::new();
    let whole = Span {
        region: region.region,
        offset: 0,
        len: region.len as u32,
    };
    let n = (2 << 20) / region.len as u32; // twice the 1 MiB limit in all
    for _ in 0..n {
        whole.encode(&mut spans);
    }
    raw.send(5, &ReadRequest { spans: n }, &spans);
    assert_eq!(
        raw.recv().unwrap().error().unwrap().code,
        ErrorCode::FrameTooLarge
    );

    // The client crate refuses these before sending anything.
    let cl = Cluster::connect_tcp(c.addrs(), &ClientConfig::default()).unwrap();
    let t = cl.open_table("emb").unwrap();
    assert!(t.pull(&[1000], &mut [0.0; 8], None).is_err());
    assert!(t.pull(&[1], &mut [0.0; 7], None).is_err());
    assert!(cl.open_table("nope").is_err());
    assert_still_serves(c.addrs());
}

#[test]
fn nan_and_inf_gradients_are_refused_and_the_rows_stay_unchanged() {
    let c = cluster(1);
    let shard = TcpShardClient::connect(&c.addrs()[0], ClientConfig::default()).unwrap();
    let keys = [10u64, 11, 12];
    let (mut v0, mut r0) = (Vec::new(), Vec::new());
    shard.pull("emb", &keys, &mut v0, &mut r0).unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut grads = vec![0.25f32; 24];
        grads[20] = bad; // in the last row: the first two would be applied by a careless server
        let e = shard.push("emb", &keys, &[1, 1, 1], &grads).unwrap_err();
        let e = e.remote().unwrap().clone();
        assert_eq!(e.code, ErrorCode::InvalidGradient);
        assert!(e.message.contains("key 12"), "{}", e.message);
    }
    let (mut v1, mut r1) = (Vec::new(), Vec::new());
    shard.pull("emb", &keys, &mut v1, &mut r1).unwrap();
    assert_eq!((v0, r0), (v1, r1), "versions and values unchanged");
    assert_still_serves(c.addrs());
}

#[test]
fn a_conflicting_create_table_is_refused_and_an_identical_one_is_accepted() {
    let c = cluster(1);
    let shard = TcpShardClient::connect(&c.addrs()[0], ClientConfig::default()).unwrap();
    let same = shard.create_table(&sgd_table("emb", 1000, 8, 0.5)).unwrap();
    assert!(!same.created);
    for other in [
        sgd_table("emb", 1000, 16, 0.5),
        sgd_table("emb", 1000, 8, 0.25),
        sgd_table("emb", 999, 8, 0.5),
    ] {
        let e = shard.create_table(&other).unwrap_err();
        assert_eq!(remote_code(e), ErrorCode::ConflictingTable);
    }
    assert_eq!(shard.list_tables().unwrap().len(), 1);
    assert_still_serves(c.addrs());
}

#[test]
fn a_protocol_version_from_the_future_is_refused_clearly() {
    let c = cluster(1);
    let config = ClientConfig {
        protocol_version: PROTOCOL_VERSION + 1,
        ..ClientConfig::default()
    };
    let e = TcpShardClient::connect(&c.addrs()[0], config).unwrap_err();
    let msg = e.to_string();
    assert_eq!(remote_code(e), ErrorCode::ProtocolVersion);
    assert!(
        msg.contains(&format!("protocol {}", PROTOCOL_VERSION + 1)),
        "{msg}"
    );
    // Skipping the hello altogether closes the connection too.
    let mut raw = RawConn::connect(&c.addrs()[0]);
    raw.send(9, &(), &[]);
    assert_eq!(
        raw.recv().unwrap().error().unwrap().code,
        ErrorCode::HandshakeRequired
    );
    assert!(raw.is_closed());
    assert_still_serves(c.addrs());
}

#[test]
fn a_wrong_auth_token_is_refused() {
    let c = EmbeddedCluster::start_with(1, ServerConfig::default(), |i| ShardConfig {
        auth_token: Some("s3cret".into()),
        ..ShardConfig::new(i, 1)
    })
    .unwrap();
    let e = TcpShardClient::connect(&c.addrs()[0], ClientConfig::default()).unwrap_err();
    assert_eq!(remote_code(e), ErrorCode::Unauthorized);
    let ok = ClientConfig {
        auth: Some("s3cret".into()),
        ..ClientConfig::default()
    };
    assert!(TcpShardClient::connect(&c.addrs()[0], ok).is_ok());
}

#[test]
fn connections_beyond_the_limit_are_closed_and_the_rest_are_served() {
    let c = EmbeddedCluster::start_with(
        1,
        ServerConfig {
            max_connections: 2,
            ..ServerConfig::default()
        },
        |i| ShardConfig::new(i, 1),
    )
    .unwrap();
    let mut held: Vec<RawConn> = (0..2).map(|_| RawConn::greeted(&c.addrs()[0])).collect();
    let mut extra = RawConn::connect(&c.addrs()[0]);
    assert!(
        extra.is_closed(),
        "the third connection is closed on arrival"
    );
    held.pop();
    // The freed slot is usable again (the server notices the closed connection first).
    let mut ok = false;
    for _ in 0..100 {
        if TcpShardClient::connect(&c.addrs()[0], ClientConfig::default()).is_ok() {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(ok, "a slot freed by a departing client is served again");
}

/// A daemon that requires a token, with a small budget of connections that have not said hello.
fn guarded(config: ServerConfig) -> EmbeddedCluster {
    EmbeddedCluster::start_with(1, config, |i| ShardConfig {
        auth_token: Some("secret".into()),
        ..ShardConfig::new(i, 1)
    })
    .unwrap()
}

fn authorized() -> ClientConfig {
    ClientConfig {
        auth: Some("secret".into()),
        ..ClientConfig::default()
    }
}

#[test]
fn connections_that_never_say_hello_do_not_lock_out_an_authorized_client() {
    let c = guarded(ServerConfig {
        max_connections: 64,
        max_pending_hellos: 8,
        hello_timeout: std::time::Duration::from_secs(60),
        ..ServerConfig::default()
    });
    let addr = &c.addrs()[0];
    // Far more silent connections than the daemon has slots, all held open by the peer.
    let silent: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let client = TcpShardClient::connect(addr, authorized())
        .expect("an authorized client gets in while silent peers keep arriving and staying");
    client.stats().unwrap();
    // And it keeps being served while more silent peers arrive.
    let more: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    client.stats().unwrap();
    drop((silent, more));
}

#[test]
fn a_peer_that_has_not_said_hello_cannot_send_a_large_frame() {
    let c = guarded(ServerConfig::default());
    let mut raw = RawConn::connect(&c.addrs()[0]);
    // Far below the daemon's frame limit, far above what a hello needs.
    raw.send_bytes(&(1u32 << 20).to_le_bytes());
    let e = raw.recv().unwrap().error().unwrap();
    assert_eq!(e.code, ErrorCode::FrameTooLarge, "{}", e.message);
    assert!(raw.is_closed(), "refused before the body was read");
    TcpShardClient::connect(&c.addrs()[0], authorized()).unwrap();
}

#[test]
fn silent_connections_are_closed_at_their_deadlines() {
    let c = guarded(ServerConfig {
        hello_timeout: std::time::Duration::from_millis(300),
        ..ServerConfig::default()
    });
    let mut never_greets = RawConn::connect(&c.addrs()[0]);
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert!(never_greets.is_closed(), "no hello within the deadline");
    TcpShardClient::connect(&c.addrs()[0], authorized()).unwrap();

    // With an idle timeout, a greeted connection that goes quiet is closed; one that keeps
    // talking never is.
    let c = EmbeddedCluster::start_with(
        1,
        ServerConfig {
            idle_timeout: Some(std::time::Duration::from_millis(500)),
            ..ServerConfig::default()
        },
        |i| ShardConfig::new(i, 1),
    )
    .unwrap();
    let mut quiet = RawConn::greeted(&c.addrs()[0]);
    let mut busy = RawConn::greeted(&c.addrs()[0]);
    for _ in 0..8 {
        std::thread::sleep(std::time::Duration::from_millis(150));
        busy.send(hetkv_transport::wire::Op::Stats as u8, &(), &[]);
        let r = busy.recv().expect("a talking connection stays open");
        assert!(r.error().is_none());
    }
    assert!(quiet.is_closed(), "idle past the idle timeout");
}

/// A pooled connection the daemon closed for idleness costs the client a new connection, never
/// a request: an assign (which is not sent twice) after the daemon closed every pooled
/// connection succeeds on its first try, and so does a pull.
#[test]
fn a_connection_closed_for_idleness_costs_no_request() {
    let c = EmbeddedCluster::start_with(
        1,
        ServerConfig {
            idle_timeout: Some(std::time::Duration::from_millis(300)),
            ..ServerConfig::default()
        },
        |i| ShardConfig::new(i, 1),
    )
    .unwrap();
    let client = TcpShardClient::connect(&c.addrs()[0], ClientConfig::default()).unwrap();
    client.create_table(&sgd_table("emb", 100, 2, 0.1)).unwrap();
    let (mut values, mut versions) = (Vec::new(), Vec::new());
    for round in 0..4u64 {
        // Past the idle timeout: the pooled connection is closed by now.
        std::thread::sleep(std::time::Duration::from_millis(700));
        let v = round as f32;
        client
            .assign("emb", &Assignment::values(&[round], &[v, v]))
            .unwrap_or_else(|e| panic!("round {round}: the assign was lost: {e}"));
        std::thread::sleep(std::time::Duration::from_millis(700));
        client
            .pull("emb", &[round], &mut versions, &mut values)
            .unwrap();
        assert_eq!(values[..2], [v, v]);
    }
    assert_eq!(client.retries(), 0, "no request was sent twice");
}

/// Thousands of tables list (the answer is larger than a request header may be), `open_table`
/// finds them and stats report them; one past the shard's bound is refused.
#[test]
fn thousands_of_tables_list_and_the_bound_refuses_one_more() {
    let c = EmbeddedCluster::start_with(1, ServerConfig::default(), |i| ShardConfig {
        max_tables: 5_000,
        ..ShardConfig::new(i, 1)
    })
    .unwrap();
    let client = TcpShardClient::connect(&c.addrs()[0], ClientConfig::default()).unwrap();
    // Long names make each record large: 5,000 of them are about a megabyte.
    let name = |i: usize| format!("{}_{i:05}", "t".repeat(100));
    for i in 0..5_000 {
        client
            .create_table(&sgd_table(&name(i), 2, 1, 0.1))
            .unwrap();
    }
    let tables = client.list_tables().unwrap();
    assert_eq!(tables.len(), 5_000);
    assert_eq!(tables[4_999].spec.name, name(4_999));
    assert_eq!(client.stats().unwrap().tables.len(), 5_000);
    let cluster = Cluster::connect_tcp(c.addrs(), &ClientConfig::default()).unwrap();
    cluster.open_table(&name(1_234)).unwrap();
    let e = client
        .create_table(&sgd_table("one_more", 2, 1, 0.1))
        .unwrap_err();
    assert_eq!(remote_code(e), ErrorCode::InvalidSpec);
}

/// The token never travels: a hello answers the connection's challenge with HMAC-SHA256, and a
/// recorded hello is refused on another connection, with or without a challenge of its own.
#[test]
fn the_token_never_travels_and_a_recorded_hello_cannot_be_replayed() {
    use hetkv_transport::wire::{self, ChallengeResponse, HelloRequest, Op, Status, MAGIC};
    let c = guarded(ServerConfig::default());
    let addr = &c.addrs()[0];
    let challenge = |raw: &mut RawConn| -> [u8; 32] {
        raw.send(Op::Challenge as u8, &(), &[]);
        let r = raw.recv().unwrap();
        assert!(r.error().is_none(), "{:?}", r.error());
        wire::decode_header::<ChallengeResponse>(&r.header)
            .unwrap()
            .nonce
    };
    let hello_frame = |nonce: &[u8; 32]| {
        let hello = HelloRequest {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            auth: Some(hetkv_transport::auth::respond("secret", nonce)),
            client: "replay test".into(),
            client_id: None,
        };
        let mut frame = Vec::new();
        wire::start_frame(&mut frame, Op::Hello as u8, Status::Ok, &hello);
        wire::finish_frame(&mut frame, u32::MAX).unwrap();
        frame
    };
    let mut first = RawConn::connect(addr);
    let nonce = challenge(&mut first);
    let recorded = hello_frame(&nonce);
    assert!(
        !recorded.windows(6).any(|w| w == b"secret"),
        "the token is not in the hello"
    );
    first.send_bytes(&recorded);
    assert!(
        first.recv().unwrap().error().is_none(),
        "the answered challenge is accepted"
    );

    let mut replay = RawConn::connect(addr);
    replay.send_bytes(&recorded);
    assert_eq!(
        replay.recv().unwrap().error().unwrap().code,
        ErrorCode::Unauthorized
    );
    assert!(replay.is_closed());

    let mut replay = RawConn::connect(addr);
    let fresh = challenge(&mut replay);
    assert_ne!(fresh, nonce, "every connection gets its own nonce");
    replay.send_bytes(&recorded);
    assert_eq!(
        replay.recv().unwrap().error().unwrap().code,
        ErrorCode::Unauthorized
    );

    // The client library does the same dance.
    TcpShardClient::connect(addr, authorized())
        .unwrap()
        .stats()
        .unwrap();
}

/// A create that would take the shard past --max-memory is refused, naming both figures, and
/// nothing is created; smaller tables still fit. The memory for push numbers is reserved out of
/// the bound.
#[test]
fn a_create_beyond_the_memory_bound_is_refused() {
    let bound = hetkv_store::sessions::RESERVED_BYTES + (1 << 20);
    let c = EmbeddedCluster::start_with(1, ServerConfig::default(), |i| ShardConfig {
        max_memory: bound,
        ..ShardConfig::new(i, 1)
    })
    .unwrap();
    let client = TcpShardClient::connect(&c.addrs()[0], ClientConfig::default()).unwrap();
    // 10,000 rows of dim 8: 48 bytes a row, about 480 KB.
    client
        .create_table(&sgd_table("first", 10_000, 8, 0.1))
        .unwrap();
    let e = client
        .create_table(&sgd_table("second", 20_000, 8, 0.1))
        .unwrap_err();
    let w = e.remote().unwrap();
    assert_eq!(w.code, ErrorCode::InvalidSpec);
    assert!(
        w.message.contains(&bound.to_string()) && w.message.contains("--max-memory"),
        "{}",
        w.message
    );
    assert_eq!(client.list_tables().unwrap().len(), 1);
    client
        .create_table(&sgd_table("small", 1_000, 8, 0.1))
        .unwrap();
}

/// A greeted client that asks for large answers and stops reading them is dropped once an answer
/// has waited past the write timeout, so its buffers are freed.
#[test]
fn a_client_that_stops_reading_is_dropped_after_the_write_timeout() {
    use std::io::{Read, Write};
    let c = EmbeddedCluster::start_with(
        1,
        ServerConfig {
            write_timeout: std::time::Duration::from_millis(300),
            ..ServerConfig::default()
        },
        |i| ShardConfig::new(i, 1),
    )
    .unwrap();
    let client = TcpShardClient::connect(&c.addrs()[0], ClientConfig::default()).unwrap();
    client
        .create_table(&sgd_table("wide", 4_096, 1024, 0.1))
        .unwrap();
    let mut raw = RawConn::greeted(&c.addrs()[0]);
    // 16 pulls of 4,096 rows of 4 KiB: 256 MiB of answers, far more than socket buffers hold.
    let keys: Vec<u8> = (0..4_096u64).flat_map(|k| k.to_le_bytes()).collect();
    let mut frame = Vec::new();
    hetkv_transport::wire::start_frame(
        &mut frame,
        hetkv_transport::wire::Op::Pull as u8,
        hetkv_transport::wire::Status::Ok,
        &PullRequest {
            table: "wide".into(),
            keys: 4_096,
        },
    );
    frame.extend_from_slice(&keys);
    hetkv_transport::wire::finish_frame(&mut frame, u32::MAX).unwrap();
    for _ in 0..16 {
        if raw.stream.write_all(&frame).is_err() {
            break;
        }
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    // Drain what the kernel buffered: the daemon has closed its end, so the stream ends (or is
    // reset) instead of waiting.
    raw.stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    let ended = loop {
        match raw.stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(e) => break matches!(e.kind(), std::io::ErrorKind::BrokenPipe),
        }
    };
    assert!(
        ended,
        "the daemon still held the connection after {total} bytes"
    );
    assert!(
        total < 256 << 20,
        "it did not write everything ({total} bytes)"
    );
    assert_still_serves_wide(c.addrs());
}

fn assert_still_serves_wide(addrs: &[String]) {
    let client = TcpShardClient::connect(&addrs[0], ClientConfig::default()).unwrap();
    let (mut v, mut r) = (Vec::new(), Vec::new());
    client.pull("wide", &[1, 2], &mut v, &mut r).unwrap();
    assert_eq!(r.len(), 2 * 1024);
}

/// Creating a large table (its rows initialised one by one) does not hold up other clients: new
/// ones connect, say hello and pull, and the slowest of them stays far below the creation's time.
#[test]
fn a_large_create_does_not_hold_up_other_clients() {
    let c = cluster(1);
    let addr = &c.addrs()[0];
    let creating = std::sync::atomic::AtomicBool::new(true);
    let (create_took, slowest, calls) = std::thread::scope(|s| {
        let creator = s.spawn(|| {
            let t = std::time::Instant::now();
            let admin = TcpShardClient::connect(addr, ClientConfig::default()).unwrap();
            // 65,536 rows of 1,024 values: 256 MiB to initialise.
            admin
                .create_table(&sgd_table("large", 65_536, 1024, 0.1))
                .unwrap();
            creating.store(false, std::sync::atomic::Ordering::Relaxed);
            t.elapsed()
        });
        let (mut v, mut r) = (Vec::new(), Vec::new());
        let (mut slowest, mut calls) = (std::time::Duration::ZERO, 0u32);
        std::thread::sleep(std::time::Duration::from_millis(50));
        // New clients keep arriving (a connection accepted, a hello, a pull) while it runs.
        while creating.load(std::sync::atomic::Ordering::Relaxed) {
            let t = std::time::Instant::now();
            let client = TcpShardClient::connect(addr, ClientConfig::default()).unwrap();
            client.pull("emb", &[1, 2, 3, 4], &mut v, &mut r).unwrap();
            slowest = slowest.max(t.elapsed());
            calls += 1;
        }
        (creator.join().unwrap(), slowest, calls)
    });
    eprintln!("create took {create_took:?}; {calls} pulls meanwhile, the slowest {slowest:?}");
    assert!(calls > 10, "pulls ran during the create ({calls})");
    assert!(
        slowest < std::time::Duration::from_millis(500) && slowest * 4 < create_took,
        "a pull waited {slowest:?} during a create of {create_took:?}"
    );
}
