//! The CUDA backend (feature `cuda`): a device context with cuBLAS and NVRTC-compiled kernels
//! (`kernels.cu`), the routed experts of a layer held and run on the device (`experts`),
//! device twins of the router's ops (`ops`), the router's weights on one device (`linear`) or
//! split over several with NCCL reductions (`parallel`), and one typed launcher per kernel,
//! declared once and checked against the kernels' source (`launch`).
//!
//! Everything is loaded at run time through `cudarc`'s dynamic loading, so the crate builds on
//! machines without CUDA. `cudarc` panics when a library it needs is missing, so [`Gpu::open`]
//! probes the driver, cuBLAS and NVRTC libraries first and turns their absence, a missing
//! device or a failed call into [`EngineError::Device`] naming the device and the cause.
//!
//! Expert GEMMs are cuBLAS `GemmBatchedEx` with bf16 operands and f32 accumulation and output,
//! the rounding points of the CPU path (activations become bf16 before each GEMM); the gate's
//! logits are an f32 `GemmEx`, as the CPU computes them in f32. The kernels are compiled from source at
//! start-up (no `nvcc` at build time) and use no CUDA headers, which also lets
//! `engine/tests/kernels_on_cpu.rs` build them with g++ and run them on the CPU.

mod experts;
mod launch;
mod linear;
mod ops;
mod parallel;

use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};

use crate::error::{EngineError, Result};

pub use experts::GpuExperts;
pub use launch::KERNEL_NAMES;
use launch::Kernels;
pub use linear::DeviceMatrix;
pub use ops::{GpuGate, GpuRope, LatentCache};
pub use parallel::{GpuGroup, ShardedMatrix};

/// The kernels, as CUDA C compiled by NVRTC (see the file for what each mirrors on the CPU).
pub const KERNEL_SOURCE: &str = include_str!("kernels.cu");

/// Compiles [`KERNEL_SOURCE`] to PTX with NVRTC. Needs only the NVRTC library, not a device or
/// driver, so the kernels' source is checked wherever NVRTC is installed (CI installs it from
/// PyPI's `nvidia-cuda-nvrtc-cu12`).
pub fn compile_kernels() -> Result<cudarc::nvrtc::Ptx> {
    // SAFETY: only tries to open the library by its usual names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(EngineError::Device(
            "the NVRTC library (libnvrtc) is not present on this machine".into(),
        ));
    }
    cudarc::nvrtc::compile_ptx(KERNEL_SOURCE)
        .map_err(|e| EngineError::Device(format!("compiling kernels with NVRTC: {e}")))
}

/// Maps a `cudarc` error into the engine's, naming the device and what was being done.
fn device_err(ordinal: usize, what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Device(format!("cuda:{ordinal}: {what}: {e}"))
}

/// One CUDA device: its context, a stream, a cuBLAS handle and the compiled kernels. Work is
/// issued on the one stream, one caller at a time.
pub struct Gpu {
    ordinal: usize,
    name: String,
    total_memory: usize,
    /// Compute capability, streaming multiprocessors, and their clock in kHz.
    capability: (i32, i32),
    sms: i32,
    clock_khz: i32,
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
        let capability = ctx.compute_capability().unwrap_or((0, 0));
        let attribute = |a| ctx.attribute(a).unwrap_or(0);
        use cudarc::driver::sys::CUdevice_attribute as A;
        let sms = attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT);
        let clock_khz = attribute(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE);
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| device_err(ordinal, "creating a cuBLAS handle", e))?;
        let ptx = compile_kernels().map_err(|e| match e {
            EngineError::Device(m) => EngineError::Device(format!("cuda:{ordinal}: {m}")),
            e => e,
        })?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| device_err(ordinal, "loading kernels", e))?;
        let kernels = Kernels::load(&module, ordinal)?;
        Ok(Arc::new(Gpu {
            ordinal,
            name,
            total_memory,
            capability,
            sms,
            clock_khz,
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

    /// Compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.capability
    }

    /// Dense bf16 tensor-core peak in TFLOP/s at the reported maximum clock, for the
    /// architectures whose per-SM rate is known (Ampere A100 8.0: 2,048 FLOP per SM and
    /// clock; Hopper 9.0: 4,096); `None` for others.
    pub fn bf16_peak_tflops(&self) -> Option<f64> {
        let per_sm_clock = match self.capability {
            (8, 0) => 2048.0,
            (9, 0) => 4096.0,
            _ => return None,
        };
        Some(per_sm_clock * f64::from(self.sms) * f64::from(self.clock_khz) * 1e3 / 1e12)
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Makes this device's context current on the calling thread. cudarc's own calls do this;
    /// the raw cuBLAS calls must, since a thread driving several devices (a tensor-parallel
    /// group) may have left another one current.
    fn bind(&self) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| self.err("making the context current", e))
    }

    pub(crate) fn err(&self, what: &str, e: impl std::fmt::Display) -> EngineError {
        device_err(self.ordinal, what, e)
    }

    /// Copies `host` to a new device buffer.
    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| self.err("copying to the device", e))
    }

    /// Copies a device buffer back to the host (waits for the stream).
    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        dev: &CudaSlice<T>,
    ) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(dev)
            .map_err(|e| self.err("copying from the device", e))
    }

    /// A new device buffer of `len` elements (at least one) that its first kernel or GEMM
    /// overwrites whole, so it is not cleared first (one memset fewer per buffer and call).
    ///
    /// # Safety
    /// Every element must be written before it is read.
    pub(crate) unsafe fn scratch<T: cudarc::driver::DeviceRepr>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        // SAFETY: guaranteed by the caller.
        unsafe { self.stream.alloc(len.max(1)) }
            .map_err(|e| self.err("allocating device memory", e))
    }

    /// A new zeroed device buffer of `len` elements (at least one).
    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(|e| self.err("allocating device memory", e))
    }

    /// `c[m, n] = a[m, k] · b[n, k]ᵀ` with `a` and `b` bf16 (bits), f32 accumulation and `c`
    /// f32 (overwritten).
    pub(crate) fn gemm_bf16_f32(
        &self,
        a: &CudaSlice<u16>,
        m: usize,
        k: usize,
        b: &CudaSlice<u16>,
        n: usize,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.gemm_checked(a, b, c, GemmShape { m, n, k }, cudaDataType_t::CUDA_R_16BF)
    }

    /// `c[m, n] = a[m, k] · b[n, k]ᵀ` in f32 throughout (the gate's logits, as the CPU computes
    /// them in f32).
    pub fn gemm_f32(
        &self,
        a: &CudaSlice<f32>,
        m: usize,
        k: usize,
        b: &CudaSlice<f32>,
        n: usize,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.gemm_checked(a, b, c, GemmShape { m, n, k }, cudaDataType_t::CUDA_R_32F)
    }

    /// [`gemm_raw`](Self::gemm_raw) on buffers checked to hold the shape.
    fn gemm_checked<T>(
        &self,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        c: &mut CudaSlice<f32>,
        shape: GemmShape,
        input: cudaDataType_t,
    ) -> Result<()> {
        let GemmShape { m, n, k } = shape;
        for (what, have, need) in [
            ("a", a.len(), m * k),
            ("b", b.len(), n * k),
            ("c", c.len(), m * n),
        ] {
            if have < need {
                return Err(self.err(
                    "gemm",
                    format!("{what} holds {have} elements, needs {need}"),
                ));
            }
        }
        let (a_ptr, _a) = a.device_ptr(&self.stream);
        let (b_ptr, _b) = b.device_ptr(&self.stream);
        let (c_ptr, _c) = c.device_ptr_mut(&self.stream);
        // SAFETY: sizes checked above; the callers pair `input` with `T`.
        unsafe { self.gemm_raw(a_ptr, b_ptr, c_ptr, shape, input) }
    }

    /// One row-major GEMM `c[m, n] = a[m, k] · b[n, k]ᵀ`, `a` and `b` of type `input`, f32
    /// accumulation and `c`.
    ///
    /// cuBLAS is column-major: row-major `c` is column-major `cᵀ [n, m] = b · aᵀ`, so `b` goes
    /// first, transposed.
    ///
    /// # Safety
    /// The pointers are device buffers of this context holding m·k and n·k elements of
    /// `input` and m·n f32s.
    unsafe fn gemm_raw(
        &self,
        a: u64,
        b: u64,
        c: u64,
        shape: GemmShape,
        input: cudaDataType_t,
    ) -> Result<()> {
        let Some((m, n, k)) = shape.dims(self)? else {
            return Ok(());
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        self.bind()?;
        // SAFETY: guaranteed by the caller; the handle belongs to this stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                (&alpha) as *const f32 as *const _,
                b as *const _,
                input,
                k,
                a as *const _,
                input,
                k,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                cudaDataType_t::CUDA_R_32F,
                n,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| self.err("cublasGemmEx", e))
    }

    /// `batch` GEMMs of one shape in one cuBLAS call (`cublasGemmBatchedEx`): problem `i` is
    /// `c_i[m, n] = a_i[m, k] · b_i[n, k]ᵀ`, bf16 inputs, f32 accumulation and output, with the
    /// problems' addresses in device arrays of `batch` pointers each.
    ///
    /// # Safety
    /// The arrays are device buffers of `batch` device addresses, each buffer holding its
    /// problem's m·k, n·k (bf16) or m·n (f32) elements.
    pub(crate) unsafe fn gemm_batched_bf16_f32(
        &self,
        a_array: u64,
        b_array: u64,
        c_array: u64,
        batch: usize,
        shape: GemmShape,
    ) -> Result<()> {
        let Some((m, n, k)) = shape.dims(self)? else {
            return Ok(());
        };
        let batch = i32_of(batch, "batch")?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        self.bind()?;
        // SAFETY: guaranteed by the caller; the handle belongs to this stream.
        unsafe {
            cudarc::cublas::sys::cublasGemmBatchedEx(
                *blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                (&alpha) as *const f32 as *const _,
                b_array as *const *const _,
                cudaDataType_t::CUDA_R_16BF,
                k,
                a_array as *const *const _,
                cudaDataType_t::CUDA_R_16BF,
                k,
                (&beta) as *const f32 as *const _,
                c_array as *const *mut _,
                cudaDataType_t::CUDA_R_32F,
                n,
                batch,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .result()
        }
        .map_err(|e| self.err("cublasGemmBatchedEx", e))
    }
}

/// The shape of a row-major GEMM `c[m, n] = a[m, k] · b[n, k]ᵀ`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GemmShape {
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
}

impl GemmShape {
    /// The dimensions as cuBLAS takes them, `None` for an empty product.
    fn dims(self, gpu: &Gpu) -> Result<Option<(i32, i32, i32)>> {
        if self.m == 0 || self.n == 0 {
            return Ok(None);
        }
        let dim = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| gpu.err("gemm", format!("{what} = {v} is over i32")))
        };
        Ok(Some((
            dim(self.m, "m")?,
            dim(self.n, "n")?,
            dim(self.k, "k")?,
        )))
    }
}

/// Threads per block of the kernels.
pub(crate) const THREADS: u32 = 256;

/// One thread per element, [`THREADS`] to a block.
pub(crate) fn launch_config(elements: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(elements.div_ceil(THREADS as usize))
        .map_err(|_| EngineError::Shape(format!("{elements} elements in one launch")))?;
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One block of [`THREADS`] per row (or per `(x, y)` pair).
pub(crate) fn block_per(x: usize, y: usize) -> Result<LaunchConfig> {
    let dim = |v: usize| {
        u32::try_from(v).map_err(|_| EngineError::Shape(format!("{v} blocks in one launch")))
    };
    Ok(LaunchConfig {
        grid_dim: (dim(x.max(1))?, dim(y.max(1))?, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A size as the kernels' `int`.
pub(crate) fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| EngineError::Shape(format!("{what} = {v} is over i32")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels' source compiles and defines every kernel the host loads. Needs only
    /// NVRTC, no device: CI installs PyPI's `nvidia-cuda-nvrtc-cu12` and sets
    /// `SWITCHYARD_REQUIRE_NVRTC=1`, so there a missing NVRTC fails instead of skipping.
    #[test]
    fn every_kernel_compiles_with_nvrtc() {
        let ptx = match compile_kernels() {
            Ok(ptx) => ptx,
            Err(e) if std::env::var_os("SWITCHYARD_REQUIRE_NVRTC").is_none() => {
                eprintln!("SKIPPED (NVRTC not installed): {e}");
                return;
            }
            Err(e) => panic!("SWITCHYARD_REQUIRE_NVRTC is set: {e}"),
        };
        let src = ptx.to_src();
        for name in KERNEL_NAMES {
            assert!(
                src.contains(&format!(".entry {name}(")),
                "kernel {name} is not in the PTX"
            );
        }
    }

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
        let group = "cuda:2,5".parse::<crate::Devices>().unwrap();
        let err = group.check().unwrap_err().to_string();
        assert!(
            err.contains("cuda:2") && err.contains("not present"),
            "{err}"
        );
        let err = GpuGroup::open(&[4]).unwrap_err().to_string();
        assert!(err.contains("at least two GPUs, got cuda:4"), "{err}");
    }
}
