//! An expert worker's request checks and compute on any bytes that arrive as a
//! `ForwardRequest`: a worker holding experts 0-7 of the tiny preset, with a small message
//! limit, must answer every input with a result or a typed error, never a panic.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use switchyard_engine::synth::{self, SynthDType, SynthOptions};
use switchyard_expert_worker::{ExpertSpec, ExpertWorker};
use switchyard_proto::v1::ForwardRequest;

fn worker() -> &'static ExpertWorker {
    static WORKER: OnceLock<(tempfile::TempDir, ExpertWorker)> = OnceLock::new();
    &WORKER
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temp dir");
            synth::synth(
                dir.path(),
                &SynthOptions {
                    preset: "tiny".into(),
                    dtype: SynthDType::Bf16,
                    ..Default::default()
                },
            )
            .expect("the tiny preset synthesizes");
            let spec: ExpertSpec = "0-7".parse().expect("a valid spec");
            let worker = ExpertWorker::load(dir.path(), &spec)
                .expect("the tiny worker loads")
                .with_max_message_bytes(64 << 10);
            (dir, worker)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = ForwardRequest::decode(data) {
        let _ = worker().forward(&request);
    }
});
