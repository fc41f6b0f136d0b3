//! CPU compute: the GEMM kernels and the element-wise ops the model layers call.
//!
//! Hot paths are hand-written with AVX-512 (bf16 dot products where the CPU has them) behind
//! runtime feature detection, with portable fallbacks that compute the same thing. Threads come
//! from [`pool`], sized by the caller (`--threads`).

pub mod matmul;
pub mod ops;
pub mod packed;
pub mod pool;

pub use matmul::{matmul_nn_rows, matmul_t, matmul_t_f32, matmul_t_uninit};
