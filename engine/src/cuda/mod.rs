//! The CUDA backend (feature `cuda`): a device context with cuBLAS and NVRTC-compiled kernels,
//! and the routed experts of a layer held and run on the device.
//!
//! Everything is loaded at run time through `cudarc`'s dynamic loading, so the crate builds on
//! machines without CUDA. `cudarc` panics when a library it needs is missing, so [`Gpu::open`]
//! probes the driver, cuBLAS and NVRTC libraries first and turns their absence, a missing
//! device or a failed call into [`EngineError::Device`] naming the device and the cause.
//!
//! GEMMs are cuBLAS `GemmEx` with bf16 operands and f32 accumulation and output, the rounding
//! points of the CPU path (activations become bf16 before each GEMM). The kernels are compiled
//! from source strings at start-up (no `nvcc` at build time) and use no CUDA headers.

mod experts;

use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::error::{EngineError, Result};

pub use experts::GpuExperts;

/// The kernels, as CUDA C compiled by NVRTC. bf16 values travel as `unsigned short` bit patterns
/// (round to nearest even on the way in), so no `cuda_bf16.h` is needed.
const KERNELS: &str = r#"
__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// out[r, :] = x[rows[r], :] for r < n; x and out are bf16 [*, h].
extern "C" __global__ void gather_rows_bf16(const unsigned short* x, const int* rows,
                                            unsigned short* out, int n, int h) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long)n * h) {
        long r = i / h, c = i % h;
        out[i] = x[(long)rows[r] * h + c];
    }
}

// out[r, c] = silu(gu[r, c]) * gu[r, inter + c] as bf16; gu is f32 [n, 2 * inter].
extern "C" __global__ void silu_mul_bf16(const float* gu, unsigned short* out, int n, int inter) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long)n * inter) {
        long r = i / inter, c = i % inter;
        float g = gu[r * 2 * inter + c];
        float u = gu[r * 2 * inter + inter + c];
        out[i] = f32_to_bf16(g / (1.0f + expf(-g)) * u);
    }
}

// out[rows[r], :] += w[r] * y[r, :]. The rows of one call are distinct tokens, and calls run in
// order on one stream, so no two threads ever add to the same element at once.
extern "C" __global__ void scatter_add_weighted(const float* y, const int* rows, const float* w,
                                                float* out, int n, int h) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long)n * h) {
        long r = i / h, c = i % h;
        out[(long)rows[r] * h + c] += w[r] * y[i];
    }
}
"#;

/// Maps a `cudarc` error into the engine's, naming the device and what was being done.
fn device_err(ordinal: usize, what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Device(format!("cuda:{ordinal}: {what}: {e}"))
}

#[derive(Debug)]
pub(crate) struct Kernels {
    pub(crate) gather_rows_bf16: CudaFunction,
    pub(crate) silu_mul_bf16: CudaFunction,
    pub(crate) scatter_add_weighted: CudaFunction,
}

/// One CUDA device: its context, a stream, a cuBLAS handle and the compiled kernels. Work is
/// issued on the one stream, one caller at a time.
pub struct Gpu {
    ordinal: usize,
    name: String,
    total_memory: usize,
    stream: Arc<CudaStream>,
    blas: Mutex<CudaBlas>,
    pub(crate) kernels: Kernels,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu(cuda:{} {})", self.ordinal, self.name)
    }
}

/// Whether the shared library behind one `cudarc` module loads (its loaders panic otherwise).
fn present(ordinal: usize, library: &str, probe: unsafe fn() -> bool) -> Result<()> {
    // SAFETY: the probe only tries to open the library by its usual names.
    if unsafe { probe() } {
        Ok(())
    } else {
        Err(EngineError::Device(format!(
            "cuda:{ordinal}: the {library} library is not present on this machine (no CUDA driver or toolkit libraries found)"
        )))
    }
}

impl Gpu {
    /// Opens device `ordinal`: probes the libraries, creates the context, stream and cuBLAS
    /// handle, and compiles the kernels.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>> {
        present(
            ordinal,
            "CUDA driver (libcuda)",
            cudarc::driver::sys::is_culib_present,
        )?;
        present(ordinal, "cuBLAS", cudarc::cublas::sys::is_culib_present)?;
        present(ordinal, "NVRTC", cudarc::nvrtc::sys::is_culib_present)?;
        let count =
            CudaContext::device_count().map_err(|e| device_err(ordinal, "counting devices", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(EngineError::Device(format!(
                "cuda:{ordinal}: no such device; this machine has {count} CUDA device(s)"
            )));
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| device_err(ordinal, "creating a context", e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let total_memory = ctx.total_mem().unwrap_or(0);
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| device_err(ordinal, "creating a cuBLAS handle", e))?;
        let ptx = cudarc::nvrtc::compile_ptx(KERNELS)
            .map_err(|e| device_err(ordinal, "compiling kernels with NVRTC", e))?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| device_err(ordinal, "loading kernels", e))?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| device_err(ordinal, &format!("kernel {name}"), e))
        };
        let kernels = Kernels {
            gather_rows_bf16: load("gather_rows_bf16")?,
            silu_mul_bf16: load("silu_mul_bf16")?,
            scatter_add_weighted: load("scatter_add_weighted")?,
        };
        Ok(Arc::new(Gpu {
            ordinal,
            name,
            total_memory,
            stream,
            blas: Mutex::new(blas),
            kernels,
        }))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name, as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes of device memory.
    pub fn total_memory(&self) -> usize {
        self.total_memory
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn err(&self, what: &str, e: impl std::fmt::Display) -> EngineError {
        device_err(self.ordinal, what, e)
    }

    /// Copies `host` to a new device buffer.
    pub(crate) fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| self.err("copying to the device", e))
    }

    pub(crate) fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(|e| self.err("allocating device memory", e))
    }

    /// `c[m, n] = a[m, k] · b[n, k]ᵀ`, all row-major; `a` and `b` bf16, `c` f32 (overwritten).
    ///
    /// cuBLAS is column-major: row-major `c` is column-major `cᵀ [n, m] = b · aᵀ`, so `b` goes
    /// first, transposed.
    pub(crate) fn gemm_bf16_f32(
        &self,
        a: &CudaSlice<u16>,
        m: usize,
        k: usize,
        b: &CudaSlice<u16>,
        n: usize,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
        };
        if m == 0 || n == 0 {
            return Ok(());
        }
        let dims = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| self.err("gemm", format!("{what} = {v} is over i32")))
        };
        let (m_i, n_i, k_i) = (dims(m, "m")?, dims(n, "n")?, dims(k, "k")?);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        let (b_ptr, _b_sync) = b.device_ptr(&self.stream);
        let (a_ptr, _a_sync) = a.device_ptr(&self.stream);
        let (c_ptr, _c_sync) = c.device_ptr_mut(&self.stream);
        // SAFETY: the buffers hold at least n·k, m·k and m·n elements (checked by the callers'
        // shapes); the handle belongs to this stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n_i,
                m_i,
                k_i,
                (&alpha) as *const f32 as *const _,
                b_ptr as *const _,
                cudaDataType_t::CUDA_R_16BF,
                k_i,
                a_ptr as *const _,
                cudaDataType_t::CUDA_R_16BF,
                k_i,
                (&beta) as *const f32 as *const _,
                c_ptr as *mut _,
                cudaDataType_t::CUDA_R_32F,
                n_i,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| self.err("cublasGemmEx", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_device_without_cuda_is_an_error_not_a_panic() {
        // SAFETY: only tries to open the driver library.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            eprintln!("SKIPPED: a CUDA driver is present; this test is for machines without one");
            return;
        }
        let err = Gpu::open(0).unwrap_err().to_string();
        assert!(
            err.contains("cuda:0") && err.contains("not present"),
            "{err}"
        );
        let err = crate::Device::Cuda(3).check().unwrap_err().to_string();
        assert!(err.contains("cuda:3"), "{err}");
    }
}
