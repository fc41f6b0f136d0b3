//! Several GPUs of one node splitting the router's projections (tensor parallelism,
//! `router --device cuda:0,1,…`): the group of devices with their NCCL communicators, and a
//! weight split over them as [`crate::model::shard`] says, one [`DeviceMatrix`] per rank.
//!
//! One host thread drives every rank: it enqueues each rank's upload and GEMMs on that rank's
//! stream before waiting on any, so the ranks compute together. Column-parallel projections
//! (queries by heads, the LM head by vocabulary) bring each rank's columns back to the host;
//! row-parallel ones (the output projection by heads, an MLP's down projection by its
//! intermediate slice) sum their partial outputs with an NCCL reduction onto the first rank,
//! so one result crosses back. Sums over ranks change the order of additions against one
//! device, not the precision.

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;
use cudarc::nccl::result::NcclError;
use cudarc::nccl::{Comm, ReduceOp};
use half::bf16;

use crate::cuda::{DeviceMatrix, Gpu};
use crate::error::{EngineError, Result};
use crate::model::shard::{self, Parallel, Shard};
use crate::tensor::{CpuStorage, Tensor};

/// The GPUs of a tensor-parallel group, rank `i` on `gpus[i]`, and their communicators.
pub struct GpuGroup {
    gpus: Vec<Arc<Gpu>>,
    comms: Mutex<Comms>,
}

/// One NCCL communicator per rank.
struct Comms(Vec<Comm>);

// SAFETY: an NCCL communicator may be driven from any thread as long as calls on it do not
// overlap; the group's mutex serialises every use.
unsafe impl Send for Comms {}

impl std::fmt::Debug for GpuGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.gpus).finish()
    }
}

/// Maps an NCCL failure (`NcclError` is not a `std::error::Error`) into the engine's error,
/// naming the devices, the operation and NCCL's own description.
fn nccl_err(ordinals: &[usize], what: &str, e: NcclError) -> EngineError {
    // SAFETY: NCCL returns a pointer to a static, NUL-terminated description of any code.
    let text = unsafe {
        let p = cudarc::nccl::sys::ncclGetErrorString(e.0);
        if p.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    EngineError::Device(format!(
        "NCCL {what} over {}: {:?} ({text})",
        list(ordinals),
        e.0
    ))
}

fn list(ordinals: &[usize]) -> String {
    let items: Vec<String> = ordinals.iter().map(|n| format!("cuda:{n}")).collect();
    items.join(",")
}

impl GpuGroup {
    /// Opens each device and one NCCL communicator per device (`ncclCommInitAll`).
    pub fn open(ordinals: &[usize]) -> Result<Arc<GpuGroup>> {
        if ordinals.len() < 2 {
            return Err(EngineError::Device(format!(
                "a tensor-parallel group needs at least two GPUs, got {}",
                list(ordinals)
            )));
        }
        for (i, n) in ordinals.iter().enumerate() {
            if ordinals[..i].contains(n) {
                return Err(EngineError::Device(format!(
                    "cuda:{n} appears twice in {}",
                    list(ordinals)
                )));
            }
        }
        let gpus = ordinals
            .iter()
            .map(|&n| Gpu::open(n))
            .collect::<Result<Vec<_>>>()?;
        // SAFETY: only tries to open the library by its usual names (cudarc panics on first
        // use of a library it cannot load, so this comes first).
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(EngineError::Device(format!(
                "{}: splitting the model over several GPUs needs the NCCL library (libnccl), which is not present on this machine",
                list(ordinals)
            )));
        }
        let streams = gpus.iter().map(|g| g.stream().clone()).collect();
        let comms = Comm::from_devices(streams)
            .map_err(|e| nccl_err(ordinals, "creating communicators", e))?;
        Ok(Arc::new(GpuGroup {
            gpus,
            comms: Mutex::new(Comms(comms)),
        }))
    }

    /// The devices, in rank order.
    pub fn gpus(&self) -> &[Arc<Gpu>] {
        &self.gpus
    }

    fn ordinals(&self) -> Vec<usize> {
        self.gpus.iter().map(|g| g.ordinal()).collect()
    }

    /// Sums `partials` (rank `i`'s on its device, equal lengths) into rank 0's buffer: one
    /// grouped NCCL reduction, enqueued after each rank's pending work on its stream.
    fn reduce_to_first(&self, partials: &mut [CudaSlice<f32>]) -> Result<()> {
        let comms = self.comms.lock().unwrap_or_else(|e| e.into_inner());
        if partials.len() != comms.0.len() || partials.iter().any(|p| p.len() != partials[0].len())
        {
            return Err(EngineError::Shape(format!(
                "reduction of {} buffers over {} ranks (lengths must match)",
                partials.len(),
                comms.0.len()
            )));
        }
        let ordinals = self.ordinals();
        // One thread drives every rank, so the calls go in one group: outside it, the first
        // rank's call would wait for the others forever.
        cudarc::nccl::group_start().map_err(|e| nccl_err(&ordinals, "group start", e))?;
        let mut failed = None;
        for (comm, partial) in comms.0.iter().zip(partials.iter_mut()) {
            if let Err(e) = comm.reduce_in_place(partial, &ReduceOp::Sum, 0) {
                failed.get_or_insert(e);
            }
        }
        let ended = cudarc::nccl::group_end();
        if let Some(e) = failed {
            return Err(nccl_err(&ordinals, "reduce", e));
        }
        ended.map_err(|e| nccl_err(&ordinals, "group end", e))?;
        Ok(())
    }
}

/// `W: [out, in]` split over a [`GpuGroup`], rank `i`'s part on `group.gpus()[i]`.
#[derive(Debug)]
pub struct ShardedMatrix {
    group: Arc<GpuGroup>,
    parallel: Parallel,
    out_features: usize,
    in_features: usize,
    shards: Vec<(Shard, DeviceMatrix)>,
}

impl ShardedMatrix {
    /// Splits host weight `w: [out, in]` as `parallel` says and copies each rank's part to its
    /// device in the weight's precision; `name` names the weight if it cannot be split.
    pub fn upload(
        group: &Arc<GpuGroup>,
        w: &Tensor,
        parallel: Parallel,
        name: &str,
    ) -> Result<ShardedMatrix> {
        let (out_features, in_features) = w.dims2()?;
        let what = format!("{name} [{out_features}, {in_features}]");
        let shards = shard::shards(parallel, out_features, in_features, group.gpus.len(), &what)?;
        let bits: Option<Vec<u16>> = match w.cpu_storage() {
            CpuStorage::F32(_) => None,
            CpuStorage::Bf16(v) => Some(v.iter().map(|x| bf16::to_bits(*x)).collect()),
            CpuStorage::Bf16Packed(p) => Some(p.unpack()),
            CpuStorage::Fp8Packed(p) => Some(p.to_bf16().unpack()),
        };
        let shards = shards
            .into_iter()
            .zip(&group.gpus)
            .map(|(s, gpu)| {
                let m = DeviceMatrix::upload_shard(gpu.clone(), w, bits.as_deref(), &s)?;
                Ok((s, m))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ShardedMatrix {
            group: group.clone(),
            parallel,
            out_features,
            in_features,
            shards,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Bytes of device memory the weight takes, over all ranks.
    pub fn size_in_bytes(&self) -> usize {
        self.shards.iter().map(|(_, m)| m.size_in_bytes()).sum()
    }

    /// `x: [tokens, in]` (host) → `[tokens, out]` (host), for a column- or row-parallel
    /// weight.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (tokens, k) = x.dims2()?;
        if k != self.in_features {
            return Err(EngineError::Shape(format!(
                "linear input has {k} columns, the weight takes {}",
                self.in_features
            )));
        }
        let n = self.out_features;
        if tokens == 0 {
            return Ok(Tensor::zeros(&[0, n]));
        }
        match self.parallel {
            Parallel::Columns { .. } => {
                // Every rank's GEMM is enqueued before the first download waits on one.
                let mut parts = Vec::with_capacity(self.shards.len());
                for (s, m) in &self.shards {
                    // SAFETY: the GEMM writes all tokens · out elements of the shard.
                    let mut part = unsafe { m.gpu().scratch::<f32>(tokens * s.out_features())? };
                    m.gemm_into(x, &mut part)?;
                    parts.push(part);
                }
                let mut out = Tensor::zeros(&[tokens, n]);
                let o = out.as_f32_mut()?;
                for ((s, m), part) in self.shards.iter().zip(&parts) {
                    let host = m.gpu().download(part)?;
                    let cols = s.rows[0].clone();
                    shard::put_columns(o, n, cols, &host[..tokens * s.out_features()]);
                }
                Ok(out)
            }
            Parallel::Rows { .. } => {
                let xd = x.as_f32()?;
                let mut partials = Vec::with_capacity(self.shards.len());
                for (s, m) in &self.shards {
                    let xs = shard::take_columns(xd, k, s.cols.clone());
                    let xs = Tensor::from_f32(&[tokens, s.in_features()], xs)?;
                    // SAFETY: the GEMM writes all tokens · out elements.
                    let mut part = unsafe { m.gpu().scratch::<f32>(tokens * n)? };
                    m.gemm_into(&xs, &mut part)?;
                    partials.push(part);
                }
                self.reduced(&mut partials, tokens)
            }
            Parallel::GluColumns => Err(EngineError::Shape(
                "a stacked gate-and-up weight runs only as part of its MLP".into(),
            )),
        }
    }

    /// A gated MLP split by its intermediate dimension: each rank runs gate-and-up, the
    /// activation and down on its slice (one device call each, as on one GPU), and the
    /// partial outputs are reduced onto the first rank.
    pub fn mlp(
        gate_up: &ShardedMatrix,
        down: &ShardedMatrix,
        x: &Tensor,
        gelu: bool,
    ) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        if !Arc::ptr_eq(&gate_up.group, &down.group)
            || gate_up.parallel != Parallel::GluColumns
            || down.parallel != (Parallel::Rows { granule: 1 })
            || down.out_features != hidden
        {
            return Err(EngineError::Shape(format!(
                "a split mlp needs gate-and-up split by rows pairs and down by columns on one group, for width {hidden}; got {:?} and {:?}",
                gate_up.parallel, down.parallel
            )));
        }
        if tokens == 0 {
            return Ok(Tensor::zeros(&[0, hidden]));
        }
        let mut partials = Vec::with_capacity(gate_up.shards.len());
        for ((_, gu), (_, d)) in gate_up.shards.iter().zip(&down.shards) {
            // SAFETY: `mlp_into` writes all tokens · hidden elements.
            let mut part = unsafe { gu.gpu().scratch::<f32>(tokens * hidden)? };
            DeviceMatrix::mlp_into(gu, d, x, gelu, &mut part)?;
            partials.push(part);
        }
        down.reduced(&mut partials, tokens)
    }

    /// The sum of the ranks' `[tokens, out]` partial outputs, on the host.
    fn reduced(&self, partials: &mut [CudaSlice<f32>], tokens: usize) -> Result<Tensor> {
        self.group.reduce_to_first(partials)?;
        let n = self.out_features;
        let host = self.group.gpus[0].download(&partials[0])?;
        Tensor::from_f32(&[tokens, n], host[..tokens * n].to_vec())
    }
}
