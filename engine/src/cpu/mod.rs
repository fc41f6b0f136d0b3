//! CPU compute: the GEMM kernels and the element-wise ops the model layers call.
//!
//! Hot paths are hand-written for AVX-512 (AVX512-BF16 dot products, AMX tiles for batches,
//! where the CPU has them) behind runtime feature detection, with portable fallbacks that
//! compute the same thing on any other CPU (AVX2-only ones included). Threads come from
//! [`pool`]: the binary sizes it from `--threads` before any kernel runs.

pub mod matmul;
pub mod ops;
pub mod packed;
#[cfg(target_arch = "x86_64")]
mod packed_avx512;
pub mod pool;

pub use matmul::{matmul_nn_rows, matmul_t, matmul_t_f32, matmul_t_uninit};
