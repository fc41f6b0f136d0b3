//! A weight matrix resident on the device: the router's projections, dense FFNs, shared experts
//! and LM head with `router --device cuda:N`.
//!
//! Weights keep their checkpoint precision — bf16 ones run as bf16 × bf16 GEMMs with f32
//! accumulation on activations rounded to bf16 (the CPU's packed-kernel rounding points), f32
//! ones as f32 GEMMs — so the device gives the CPU's results within summation order. Each call
//! uploads its activations and downloads its output: the ops between the GEMMs (attention over
//! the cache, norms, RoPE, the gate, sampling) still run on the host.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::cuda::Gpu;
use crate::error::{EngineError, Result};
use crate::tensor::{CpuStorage, Tensor};

#[derive(Debug)]
enum Data {
    Bf16(CudaSlice<u16>),
    F32(CudaSlice<f32>),
}

/// `W: [out, in]` on one device.
#[derive(Debug)]
pub struct DeviceMatrix {
    gpu: Arc<Gpu>,
    data: Data,
    out_features: usize,
    in_features: usize,
}

impl DeviceMatrix {
    /// Copies a host weight `[out, in]` to the device in its own precision.
    pub fn upload(gpu: Arc<Gpu>, w: &Tensor) -> Result<DeviceMatrix> {
        let (out_features, in_features) = w.dims2()?;
        let data = match w.cpu_storage() {
            CpuStorage::F32(v) => Data::F32(gpu.upload(v)?),
            CpuStorage::Bf16(v) => {
                let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                Data::Bf16(gpu.upload(&bits)?)
            }
            CpuStorage::Bf16Packed(p) => Data::Bf16(gpu.upload(&p.unpack())?),
        };
        Ok(DeviceMatrix {
            gpu,
            data,
            out_features,
            in_features,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Bytes of device memory the weight takes.
    pub fn size_in_bytes(&self) -> usize {
        let per = match self.data {
            Data::Bf16(_) => 2,
            Data::F32(_) => 4,
        };
        self.out_features * self.in_features * per
    }

    /// `x: [tokens, in]` (host) → `[tokens, out]` (host).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (tokens, k) = x.dims2()?;
        if k != self.in_features {
            return Err(EngineError::Shape(format!(
                "linear input has {k} columns, the weight takes {}",
                self.in_features
            )));
        }
        let n = self.out_features;
        let gpu = &self.gpu;
        // SAFETY: the GEMM writes all tokens · n elements (an empty product returns before
        // reading it, and so does this function's slice of it).
        let mut out = unsafe { gpu.scratch::<f32>(tokens * n)? };
        if tokens > 0 && n > 0 {
            let xd = x.as_f32()?;
            match &self.data {
                Data::Bf16(w) => {
                    let xb: Vec<u16> = xd.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
                    gpu.gemm_bf16_f32(&gpu.upload(&xb)?, tokens, k, w, n, &mut out)?;
                }
                Data::F32(w) => gpu.gemm_f32(&gpu.upload(xd)?, tokens, k, w, n, &mut out)?,
            }
        }
        let host = gpu.download(&out)?;
        Tensor::from_f32(&[tokens, n], host[..tokens * n].to_vec())
    }
}
