//! A weight matrix resident on the device: the router's projections, dense FFNs, shared experts
//! and LM head with `router --device cuda:N`.
//!
//! Weights keep their checkpoint precision — bf16 ones run as bf16 × bf16 GEMMs with f32
//! accumulation on activations rounded to bf16 (the CPU's packed-kernel rounding points), f32
//! ones as f32 GEMMs — so the device gives the CPU's results within summation order. Each call
//! uploads its activations and downloads its output (an MLP's two projections and its gated
//! activation run as one device call): the ops between them (attention over the cache, norms,
//! RoPE, sampling) still run on the host; the MoE gate runs on the device too
//! ([`GpuGate`](crate::cuda::GpuGate)).

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::cuda::{Gpu, i32_of, launch_config};
use crate::error::{EngineError, Result};
use crate::model::shard::{Shard, submatrix};
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
            // No FP8 GEMM on the device yet: widened to bf16 as the host kernels do.
            CpuStorage::Fp8Packed(p) => Data::Bf16(gpu.upload(&p.to_bf16().unpack())?),
        };
        Ok(DeviceMatrix {
            gpu,
            data,
            out_features,
            in_features,
        })
    }

    /// Copies one rank's part of a host weight (see [`crate::model::shard`]) to the device
    /// in the weight's precision. `bits` is the weight as bf16 bits when it is bf16 (unpacked
    /// once by the caller for all ranks).
    pub(crate) fn upload_shard(
        gpu: Arc<Gpu>,
        w: &Tensor,
        bits: Option<&[u16]>,
        shard: &Shard,
    ) -> Result<DeviceMatrix> {
        let (_, in_features) = w.dims2()?;
        let data = match (w.cpu_storage(), bits) {
            (CpuStorage::F32(v), _) => Data::F32(gpu.upload(&submatrix(v, in_features, shard))?),
            (_, Some(bits)) => Data::Bf16(gpu.upload(&submatrix(bits, in_features, shard))?),
            (_, None) => {
                return Err(EngineError::Shape(
                    "a bf16 weight's shard needs its bits".into(),
                ));
            }
        };
        Ok(DeviceMatrix {
            gpu,
            data,
            out_features: shard.out_features(),
            in_features: shard.in_features(),
        })
    }

    pub(crate) fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
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

    /// A gated MLP on the device, `down(act(gate) · up)` with `gate_up: [2 · inter, hidden]`
    /// (gate rows then up rows) and `down: [hidden, inter]`: one upload, two GEMMs around the
    /// activation kernel (SwiGLU, or GeGLU with `gelu`), one download. The activation is
    /// rounded to bf16 for a bf16 `down`, as the CPU's packed kernel rounds it.
    pub fn mlp(
        gate_up: &DeviceMatrix,
        down: &DeviceMatrix,
        x: &Tensor,
        gelu: bool,
    ) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        // SAFETY: `mlp_into` writes all tokens · hidden elements (an empty batch reads none).
        let mut out = unsafe { gate_up.gpu.scratch::<f32>(tokens * hidden)? };
        DeviceMatrix::mlp_into(gate_up, down, x, gelu, &mut out)?;
        let host = gate_up.gpu.download(&out)?;
        Tensor::from_f32(&[tokens, hidden], host[..tokens * hidden].to_vec())
    }

    /// [`mlp`](Self::mlp) into a device buffer of at least `[tokens, hidden]` (left on the
    /// device, for a reduction over ranks).
    pub(crate) fn mlp_into(
        gate_up: &DeviceMatrix,
        down: &DeviceMatrix,
        x: &Tensor,
        gelu: bool,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (tokens, hidden) = x.dims2()?;
        let inter = down.in_features;
        if !Arc::ptr_eq(&gate_up.gpu, &down.gpu)
            || gate_up.out_features != 2 * inter
            || gate_up.in_features != hidden
            || down.out_features != hidden
        {
            return Err(EngineError::Shape(format!(
                "mlp of gate-and-up [{}, {}] and down [{}, {inter}] on one device for input width {hidden}",
                gate_up.out_features, gate_up.in_features, down.out_features
            )));
        }
        let gpu = &gate_up.gpu;
        if out.len() < tokens * hidden {
            return Err(gpu.err(
                "mlp",
                format!("output holds {}, needs {}", out.len(), tokens * hidden),
            ));
        }
        // SAFETY (scratch below): the GEMMs and the activation kernel write all of gu and act
        // before anything reads them.
        if tokens > 0 {
            let mut gu = unsafe { gpu.scratch::<f32>(tokens * 2 * inter)? };
            gate_up.gemm_into(x, &mut gu)?;
            let (n, i) = (i32_of(tokens, "tokens")?, i32_of(inter, "intermediate")?);
            let gelu = i32::from(gelu);
            let cfg = launch_config(tokens * inter)?;
            match &down.data {
                Data::Bf16(w) => {
                    let mut act = unsafe { gpu.scratch::<u16>(tokens * inter)? };
                    // SAFETY: reads tokens · 2 · inter, writes tokens · inter elements.
                    unsafe { gpu.launch().glu_bf16(cfg, &gu, &mut act, n, i, gelu) }?;
                    gpu.gemm_bf16_f32(&act, tokens, inter, w, hidden, out)?;
                }
                Data::F32(w) => {
                    let mut act = unsafe { gpu.scratch::<f32>(tokens * inter)? };
                    // SAFETY: as above.
                    unsafe { gpu.launch().glu_f32(cfg, &gu, &mut act, n, i, gelu) }?;
                    gpu.gemm_f32(&act, tokens, inter, w, hidden, out)?;
                }
            }
        }
        Ok(())
    }

    /// `out[tokens, out_features] = x · Wᵀ` on the device, `x` uploaded in the weight's
    /// precision.
    pub(crate) fn gemm_into(&self, x: &Tensor, out: &mut CudaSlice<f32>) -> Result<()> {
        let (tokens, k) = x.dims2()?;
        if k != self.in_features {
            return Err(EngineError::Shape(format!(
                "linear input has {k} columns, the weight takes {}",
                self.in_features
            )));
        }
        if tokens == 0 || self.out_features == 0 {
            return Ok(());
        }
        let (gpu, n, xd) = (&self.gpu, self.out_features, x.as_f32()?);
        match &self.data {
            Data::Bf16(w) => {
                let xb: Vec<u16> = xd.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
                gpu.gemm_bf16_f32(&gpu.upload(&xb)?, tokens, k, w, n, out)
            }
            Data::F32(w) => gpu.gemm_f32(&gpu.upload(xd)?, tokens, k, w, n, out),
        }
    }

    /// `x: [tokens, in]` (host) → `[tokens, out]` (host).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (tokens, _) = x.dims2()?;
        let n = self.out_features;
        // SAFETY: the GEMM writes all tokens · n elements (an empty product returns before
        // anything reads it).
        let mut out = unsafe { self.gpu.scratch::<f32>(tokens * n)? };
        self.gemm_into(x, &mut out)?;
        let host = self.gpu.download(&out)?;
        Tensor::from_f32(&[tokens, n], host[..tokens * n].to_vec())
    }
}
