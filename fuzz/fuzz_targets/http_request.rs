//! The OpenAI-compatible endpoints' request handling on any body: JSON parsing that names the
//! wrong field, the mapping of every field (honoured or refused), and validation against a
//! model's limits — what happens before the scheduler sees a request.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_router::http::{parse_chat, parse_completion};
use switchyard_router::request::{Limits, validate};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        model_name: "tiny".into(),
        vocab_size: 512,
        max_context: 64,
        max_cached_tokens: 48,
        default_max_tokens: 16,
    };
    for raw in [parse_completion(data), parse_chat(data)]
        .into_iter()
        .flatten()
    {
        let _ = validate(raw, &limits, None);
    }
});
