//! The routed experts of one MoE layer on a CUDA device.
//!
//! Like [`crate::model::experts::RoutedExperts`] it consumes routing and never sees the gate:
//! the batch's rows go up once (bf16), each expert gathers its rows, runs gate-and-up and down
//! as two cuBLAS GEMMs around a SwiGLU kernel, and adds its weighted output into the combined
//! rows on the device; one `[tokens, hidden]` f32 result comes back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::checkpoint::{Checkpoint, Precision};
use crate::config::MoeNaming;
use crate::cuda::Gpu;
use crate::error::{EngineError, Result};
use crate::model::experts::ExpertGroup;
use crate::tensor::{CpuStorage, Tensor};

/// One expert's weights on the device, bf16 row-major.
struct GpuExpert {
    /// gate rows then up rows: `[2 · intermediate, hidden]`.
    gate_up: CudaSlice<u16>,
    /// `[hidden, intermediate]`.
    down: CudaSlice<u16>,
}

/// The experts of one layer that this process holds, on one device.
pub struct GpuExperts {
    gpu: Arc<Gpu>,
    layer: usize,
    hidden: usize,
    intermediate: usize,
    experts: BTreeMap<u32, GpuExpert>,
}

impl std::fmt::Debug for GpuExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuExperts(layer {}, {} experts on {:?})",
            self.layer,
            self.experts.len(),
            self.gpu
        )
    }
}

fn bf16_bits(t: Tensor) -> Result<Vec<u16>> {
    match t.cpu_storage() {
        CpuStorage::Bf16(v) => Ok(v.iter().map(|x| x.to_bits()).collect()),
        CpuStorage::F32(v) => Ok(v.iter().map(|x| bf16::from_f32(*x).to_bits()).collect()),
        CpuStorage::Bf16Packed(_) => Err(EngineError::Shape(
            "expert weights for the device must be row-major".into(),
        )),
    }
}

/// Threads per block of the element-wise kernels.
const THREADS: u32 = 256;

fn launch_config(elements: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(elements.div_ceil(THREADS as usize))
        .map_err(|_| EngineError::Shape(format!("{elements} elements in one launch")))?;
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| EngineError::Shape(format!("{what} = {v} is over i32")))
}

impl GpuExperts {
    /// Loads `experts` of `layer` from the checkpoint onto `gpu` (bf16).
    pub fn load(
        gpu: Arc<Gpu>,
        ck: &Checkpoint,
        naming: &MoeNaming,
        layer: usize,
        experts: &BTreeSet<u32>,
        hidden: usize,
        intermediate: usize,
    ) -> Result<GpuExperts> {
        let prefix = naming.block_prefix(layer);
        let [gate, up, down] = naming.projections;
        let mut loaded = BTreeMap::new();
        for &e in experts {
            let p = format!("{prefix}.experts.{e}");
            let w = |name: &str, shape: &[usize]| {
                ck.load(&format!("{p}.{name}.weight"), shape, Precision::Bf16)
                    .and_then(bf16_bits)
            };
            let mut gate_up = w(gate, &[intermediate, hidden])?;
            gate_up.extend(w(up, &[intermediate, hidden])?);
            let down = w(down, &[hidden, intermediate])?;
            loaded.insert(
                e,
                GpuExpert {
                    gate_up: gpu.upload(&gate_up)?,
                    down: gpu.upload(&down)?,
                },
            );
        }
        Ok(GpuExperts {
            gpu,
            layer,
            hidden,
            intermediate,
            experts: loaded,
        })
    }

    pub fn layer(&self) -> usize {
        self.layer
    }

    pub fn expert_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.experts.keys().copied()
    }

    pub fn holds(&self, expert: u32) -> bool {
        self.experts.contains_key(&expert)
    }

    /// Frees the experts not in `keep`.
    pub fn retain(&mut self, keep: &BTreeSet<u32>) {
        self.experts.retain(|e, _| keep.contains(e));
    }

    /// Adds the experts of `other` (same layer and device).
    pub fn extend(&mut self, other: GpuExperts) {
        self.experts.extend(other.experts);
    }

    /// Bytes of expert weights on the device.
    pub fn size_in_bytes(&self) -> usize {
        self.experts.len() * 3 * self.hidden * self.intermediate * 2
    }

    /// `x: [tokens, hidden]` → `[tokens, hidden]`: for each group, Σ weight × expert(rows).
    pub fn forward_groups(&self, x: &Tensor, groups: &[ExpertGroup]) -> Result<Tensor> {
        let (tokens, h) = x.dims2()?;
        if h != self.hidden {
            return Err(EngineError::Shape(format!(
                "expert input has {h} columns, the experts take {}",
                self.hidden
            )));
        }
        let gpu = &self.gpu;
        let stream = gpu.stream();
        let inter = self.intermediate;
        let xb: Vec<u16> = x
            .as_f32()?
            .iter()
            .map(|v| bf16::from_f32(*v).to_bits())
            .collect();
        let x_dev = gpu.upload(&xb)?;
        let mut out = gpu.zeros::<f32>(tokens * h)?;
        let (h_i, inter_i) = (i32_of(h, "hidden")?, i32_of(inter, "intermediate")?);
        for g in groups {
            let expert = self.experts.get(&g.expert).ok_or_else(|| {
                EngineError::input(
                    "experts",
                    format!(
                        "expert {} of layer {} is not held here",
                        g.expert, self.layer
                    ),
                )
            })?;
            let n = g.rows.len();
            if n == 0 {
                continue;
            }
            if let Some(&bad) = g.rows.iter().find(|&&r| r as usize >= tokens) {
                return Err(EngineError::input(
                    "rows",
                    format!("row {bad} is out of range for {tokens} tokens"),
                ));
            }
            let n_i = i32_of(n, "rows")?;
            let rows: Vec<i32> = g.rows.iter().map(|&r| r as i32).collect();
            let rows_dev = gpu.upload(&rows)?;
            let w_dev = gpu.upload(&g.weights)?;
            // [n, hidden] bf16
            let mut xg = gpu.zeros::<u16>(n * h)?;
            let mut b = stream.launch_builder(&gpu.kernels.gather_rows_bf16);
            b.arg(&x_dev)
                .arg(&rows_dev)
                .arg(&mut xg)
                .arg(&n_i)
                .arg(&h_i);
            // SAFETY: the kernel reads x[rows[r], :] (rows checked < tokens) and writes n·h.
            unsafe { b.launch(launch_config(n * h)?) }.map_err(|e| gpu.err("gather", e))?;
            // [n, 2 · inter] f32
            let mut gu = gpu.zeros::<f32>(n * 2 * inter)?;
            gpu.gemm_bf16_f32(&xg, n, h, &expert.gate_up, 2 * inter, &mut gu)?;
            // [n, inter] bf16
            let mut act = gpu.zeros::<u16>(n * inter)?;
            let mut b = stream.launch_builder(&gpu.kernels.silu_mul_bf16);
            b.arg(&gu).arg(&mut act).arg(&n_i).arg(&inter_i);
            // SAFETY: reads n·2·inter, writes n·inter elements.
            unsafe { b.launch(launch_config(n * inter)?) }.map_err(|e| gpu.err("swiglu", e))?;
            // [n, hidden] f32
            let mut y = gpu.zeros::<f32>(n * h)?;
            gpu.gemm_bf16_f32(&act, n, inter, &expert.down, h, &mut y)?;
            let mut b = stream.launch_builder(&gpu.kernels.scatter_add_weighted);
            b.arg(&y)
                .arg(&rows_dev)
                .arg(&w_dev)
                .arg(&mut out)
                .arg(&n_i)
                .arg(&h_i);
            // SAFETY: reads n·h and n weights, adds into out[rows[r], :] (rows < tokens).
            unsafe { b.launch(launch_config(n * h)?) }.map_err(|e| gpu.err("combine", e))?;
        }
        let host = stream
            .clone_dtoh(&out)
            .map_err(|e| gpu.err("copying from the device", e))?;
        Tensor::from_f32(&[tokens, h], host[..tokens * h].to_vec())
    }
}
