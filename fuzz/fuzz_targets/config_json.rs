//! Parsing a model's `config.json`: any text must give a config or an error naming the field.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_engine::ModelConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ModelConfig::from_json_str(text);
    }
});
