//! Bad calls to an expert worker get the right status code, and the worker keeps serving.

// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

use switchyard_engine::synth::{self, SynthDType, SynthOptions};
use switchyard_proto::codec;
use switchyard_proto::v1::expert_service_client::ExpertServiceClient;
use switchyard_proto::v1::{Dtype, ForwardRequest, InfoRequest};
use switchyard_tests::Sandbox;
use tonic::Code;

fn valid(layer: u32, rows: usize, hidden: usize) -> ForwardRequest {
    let x: Vec<f32> = (0..rows * hidden).map(|i| (i % 7) as f32 * 0.1).collect();
    ForwardRequest {
        layer,
        hidden: Some(codec::encode(&x, &[rows, hidden], Dtype::Bf16)),
        offsets: (0..=rows as u32).collect(),
        expert_ids: vec![2; rows],
        weights: vec![0.5; rows],
        reply_dtype: Dtype::Bf16 as i32,
        shared_rows: vec![],
        call_id: 0,
    }
}

/// The tiny preset in bf16, in a fresh directory.
fn tiny_bf16() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    synth::synth(
        dir.path(),
        &SynthOptions {
            preset: "tiny".into(),
            dtype: SynthDType::Bf16,
            ..Default::default()
        },
    )
    .unwrap();
    dir
}

#[test]
fn bad_requests_get_their_status_and_the_worker_keeps_serving() {
    let dir = tiny_bf16();
    // Holds experts 0-7 of the MoE layers (1 and 2); at most 1 KiB of hidden rows per call.
    let sandbox = Sandbox::start_with(dir.path(), &["0-7"], |w| w.with_max_message_bytes(1024));
    let addr = format!("http://{}", sandbox.addrs()[0]);
    sandbox.block_on(async {
        let mut client = ExpertServiceClient::connect(addr).await.unwrap();
        let info = client.info(InfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.layers.len(), 2);
        assert_eq!(info.layers[0].experts, (0..8).collect::<Vec<u32>>());
        // Resident bytes are exactly the subset: 2 layers x 8 experts x 3 bf16 [32, 64] matrices.
        assert_eq!(info.expert_bytes, 2 * 8 * 3 * 32 * 64 * 2);

        let mut cases: Vec<(&str, ForwardRequest, Code, &str)> = Vec::new();
        let mut r = valid(1, 2, 64);
        r.expert_ids = vec![2, 12];
        cases.push((
            "expert not held",
            r,
            Code::FailedPrecondition,
            "expert 12 of layer 1",
        ));
        cases.push((
            "layer not held",
            valid(0, 2, 64),
            Code::FailedPrecondition,
            "layer 0",
        ));
        cases.push((
            "wrong hidden size",
            valid(1, 2, 32),
            Code::InvalidArgument,
            "[rows, 64]",
        ));
        let mut r = valid(1, 2, 64);
        r.hidden.as_mut().unwrap().dtype = 9;
        cases.push(("bad dtype", r, Code::InvalidArgument, "dtype"));
        let mut r = valid(1, 2, 64);
        r.hidden.as_mut().unwrap().data.pop();
        cases.push(("truncated bytes", r, Code::InvalidArgument, "bytes"));
        cases.push((
            "oversized message",
            valid(1, 16, 64),
            Code::InvalidArgument,
            "limit of 1024",
        ));
        let mut r = valid(1, 2, 64);
        r.offsets = vec![0, 2, 1];
        cases.push(("offsets out of order", r, Code::InvalidArgument, "offsets"));
        let mut r = valid(1, 2, 64);
        r.weights.pop();
        cases.push(("weights missing", r, Code::InvalidArgument, "weights"));
        let mut r = valid(1, 2, 64);
        r.weights[0] = f32::NAN;
        cases.push(("non-finite weight", r, Code::InvalidArgument, "finite"));
        let mut r = valid(1, 2, 64);
        r.expert_ids[1] = 99;
        cases.push(("expert id out of range", r, Code::InvalidArgument, "99"));
        let mut r = valid(1, 2, 64);
        r.hidden = None;
        cases.push(("no hidden rows", r, Code::InvalidArgument, "hidden"));
        let mut r = valid(1, 2, 64);
        r.shared_rows = vec![0];
        cases.push((
            "shared expert not held",
            r,
            Code::FailedPrecondition,
            "shared expert of layer 1",
        ));

        for (what, req, code, needle) in cases {
            let status = client.forward(req).await.unwrap_err();
            assert_eq!(status.code(), code, "{what}: {status:?}");
            assert!(
                status.message().contains(needle),
                "{what}: {}",
                status.message()
            );
            // Still serving after every bad call.
            let ok = client.forward(valid(2, 3, 64)).await.unwrap().into_inner();
            assert_eq!(ok.output.unwrap().shape, vec![3, 64], "after {what}");
        }
    });
    let stats = &sandbox.workers[0].worker.stats;
    assert_eq!(stats.tokens(2, 2), 3 * 12, "only the good calls ran");
}

#[test]
fn a_failed_call_on_the_stream_keeps_the_stream_open() {
    use switchyard_router::experts::{CallMode, GrpcTransport, Transport};
    use switchyard_router::{RouterError, WorkerId};

    let dir = tiny_bf16();
    let sandbox = Sandbox::start(dir.path(), &["0-7"]);
    let addrs = sandbox.addrs();
    sandbox.block_on(async {
        let t = GrpcTransport::new(1 << 20, CallMode::Stream, Default::default())
            .connect(WorkerId(0), &addrs[0])
            .unwrap();
        let deadline = std::time::Duration::from_secs(5);
        let mut bad = valid(1, 2, 64);
        bad.expert_ids = vec![2, 12];
        match t.forward(bad, deadline).await {
            Err(RouterError::Worker {
                code,
                layer,
                message,
                ..
            }) => {
                assert_eq!((code, layer), (Code::FailedPrecondition, 1));
                assert!(message.contains("expert 12"), "{message}");
            }
            other => panic!("expected a worker error, got {other:?}"),
        }
        // Concurrent good calls on the same stream, each matched to its own reply.
        let (a, b) = tokio::join!(
            t.forward(valid(1, 3, 64), deadline),
            t.forward(valid(2, 5, 64), deadline)
        );
        assert_eq!(a.unwrap().output.shape, vec![3, 64]);
        assert_eq!(b.unwrap().output.shape, vec![5, 64]);
    });
}

/// A worker restarted at the same address is reached again by the same link — a broken call
/// stream re-opened, a unary channel reconnected — without building anything anew.
#[test]
fn links_heal_when_a_worker_restarts_at_the_same_address() {
    use switchyard_router::WorkerId;
    use switchyard_router::experts::{CallMode, GrpcTransport, Transport};

    let dir = tiny_bf16();
    let mut sandbox = Sandbox::start(dir.path(), &["0-7"]);
    let addr = sandbox.addrs()[0].clone();
    let deadline = std::time::Duration::from_secs(5);
    let links: Vec<_> = sandbox.block_on(async {
        [CallMode::Stream, CallMode::Unary]
            .into_iter()
            .map(|mode| {
                GrpcTransport::new(1 << 20, mode, Default::default())
                    .connect(WorkerId(0), &addr)
                    .unwrap()
            })
            .collect()
    });
    for link in &links {
        let ok = sandbox.block_on(link.forward(valid(1, 3, 64), deadline));
        assert_eq!(ok.unwrap().output.shape, vec![3, 64], "{link:?} before");
    }
    sandbox.stop_worker(0);
    // Calls fail while it is down (UNAVAILABLE: retryable elsewhere), then work again.
    let start = std::time::Instant::now();
    for link in &links {
        loop {
            match sandbox.block_on(link.forward(valid(1, 3, 64), deadline)) {
                Err(switchyard_router::RouterError::Worker { code, .. }) => {
                    assert_eq!(code, Code::Unavailable, "{link:?}");
                    break;
                }
                // The old server may still finish its last connections.
                Ok(_) => {
                    assert!(start.elapsed() < std::time::Duration::from_secs(10));
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{link:?}: {e}"),
            }
        }
    }
    sandbox.restart_worker(0);
    for link in &links {
        let deadline_at = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match sandbox.block_on(link.forward(valid(1, 3, 64), deadline)) {
                Ok(out) => {
                    assert_eq!(out.output.shape, vec![3, 64]);
                    assert!(
                        out.compute_seconds > 0.0,
                        "the worker says how long it computed"
                    );
                    break;
                }
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline_at,
                        "{link:?} did not heal: {e}"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    }
}

/// Sends pre-encoded bytes as a gRPC message and reads the reply as bytes: how a fuzzer or a
/// broken client reaches a server, past every typed client.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = prost::bytes::Buf::remaining(buf);
        let mut out = vec![0; n];
        prost::bytes::Buf::copy_to_slice(buf, &mut out);
        Ok(Some(out))
    }
}

#[test]
fn undecodable_protobuf_is_invalid_argument_and_the_worker_keeps_serving() {
    let dir = tiny_bf16();
    let sandbox = Sandbox::start(dir.path(), &["0-7"]);
    let addr = format!("http://{}", sandbox.addrs()[0]);
    sandbox.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut raw = tonic::client::Grpc::new(channel);
        // A truncated varint, a field with wire type 7 (none exists), a length past the end.
        for garbage in [vec![0x08, 0xff], vec![0x0f, 0x01], vec![0x12, 0x7f, 0x01]] {
            raw.ready().await.unwrap();
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                "/switchyard.v1.ExpertService/Forward",
            );
            let status = raw
                .unary(tonic::Request::new(garbage.clone()), path, RawCodec)
                .await
                .expect_err("garbage must be refused");
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{garbage:?}: {status:?}"
            );
            assert!(
                status.message().contains("ForwardRequest"),
                "{garbage:?}: {status:?}"
            );
        }
        let mut client = ExpertServiceClient::connect(addr).await.unwrap();
        let reply = client.forward(valid(1, 2, 64)).await.unwrap().into_inner();
        assert_eq!(reply.output.unwrap().shape, vec![2, 64]);
    });
}
