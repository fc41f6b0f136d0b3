//! The tensor wire codec on whatever bytes arrive as a `ForwardRequest` or `ForwardResponse`:
//! decoding, row checks and the decode-into-sum path the router uses on replies.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use switchyard_proto::codec;
use switchyard_proto::v1::{ForwardRequest, ForwardResponse, Tensor};

const MAX_BYTES: u64 = 1 << 20;
const WIDTH: usize = 64;

fn exercise(t: &Tensor) {
    let _ = codec::decode("hidden", t, MAX_BYTES);
    if let Ok(rows) = codec::expect_rows("hidden", t, WIDTH) {
        // Bounded as the router bounds it: a reply's rows are the rows it sent, at most 256.
        let rows = rows.min(256);
        let targets: Vec<u32> = (0..rows as u32).rev().collect();
        let mut sum = vec![0.0f32; rows * WIDTH];
        let _ = codec::add_rows("output", t, MAX_BYTES, WIDTH, &targets, &mut sum);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = ForwardRequest::decode(data) {
        if let Some(t) = &request.hidden {
            exercise(t);
        }
    }
    if let Ok(reply) = ForwardResponse::decode(data) {
        if let Some(t) = &reply.output {
            exercise(t);
        }
    }
});
