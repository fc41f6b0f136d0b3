//! Opening a checkpoint whose `model.safetensors` is these bytes, then loading every tensor it
//! names: a corrupt file must be refused with an error, never a panic.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchyard_engine::checkpoint::{Checkpoint, Precision, SINGLE_FILE};

/// One directory for every input: the file is rewritten each time (creating a directory per
/// input would be most of the cost).
fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temp dir"))
        .path()
}

fuzz_target!(|data: &[u8]| {
    if std::fs::write(dir().join(SINGLE_FILE), data).is_err() {
        return;
    }
    let Ok(checkpoint) = Checkpoint::open(dir()) else {
        return;
    };
    let names: Vec<String> = checkpoint.tensor_names().map(String::from).collect();
    for name in names {
        if let Ok(info) = checkpoint.info(&name) {
            // Bounded: a header may claim a shape far larger than the file.
            if info.shape.iter().product::<usize>() <= 1 << 16 {
                let _ = checkpoint.load(&name, &info.shape, Precision::F32);
            }
        }
    }
});
