//! Bias-free linear layers and the RMSNorm they sit between.

use crate::checkpoint::{Checkpoint, Precision};
use crate::cpu::{self, ops};
use crate::error::Result;
use crate::model::shard::Parallel;
use crate::tensor::{Compute, Tensor};

/// `y = x · Wᵀ` with `W: [out_features, in_features]` kept in checkpoint precision, in host
/// memory or (after [`offload`](Linear::offload)) on a device or split over several.
#[derive(Debug, Clone)]
pub struct Linear {
    out_features: usize,
    in_features: usize,
    weight: Weight,
}

#[derive(Debug, Clone)]
enum Weight {
    Host(Tensor),
    #[cfg(feature = "cuda")]
    Device(std::sync::Arc<crate::cuda::DeviceMatrix>),
    #[cfg(feature = "cuda")]
    Sharded(std::sync::Arc<crate::cuda::ShardedMatrix>),
}

impl Linear {
    pub fn new(weight: Tensor) -> Result<Linear> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Linear {
            out_features,
            in_features,
            weight: Weight::Host(weight.pack_for_matmul()),
        })
    }

    pub fn load(
        ck: &Checkpoint,
        name: &str,
        out_features: usize,
        in_features: usize,
    ) -> Result<Linear> {
        Linear::new(ck.load_linear(name, &[out_features, in_features])?)
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The weight when it is in host memory.
    pub fn host_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Host(w) => Some(w),
            #[cfg(feature = "cuda")]
            Weight::Device(_) | Weight::Sharded(_) => None,
        }
    }

    /// The weight when it is on one device.
    #[cfg(feature = "cuda")]
    pub(crate) fn device(&self) -> Option<&crate::cuda::DeviceMatrix> {
        match &self.weight {
            Weight::Device(d) => Some(d),
            Weight::Host(_) | Weight::Sharded(_) => None,
        }
    }

    /// The weight when it is split over several devices.
    #[cfg(feature = "cuda")]
    pub(crate) fn sharded(&self) -> Option<&crate::cuda::ShardedMatrix> {
        match &self.weight {
            Weight::Sharded(s) => Some(s),
            Weight::Host(_) | Weight::Device(_) => None,
        }
    }

    /// Bytes of weight held, wherever it is.
    pub fn size_in_bytes(&self) -> usize {
        match &self.weight {
            Weight::Host(w) => w.size_in_bytes(),
            #[cfg(feature = "cuda")]
            Weight::Device(d) => d.size_in_bytes(),
            #[cfg(feature = "cuda")]
            Weight::Sharded(s) => s.size_in_bytes(),
        }
    }

    /// Moves the weight onto `compute` (nothing to do for the host) and hands back the host
    /// copy it replaced, for a caller that still needs it (a tied embedding table). On a group
    /// of GPUs the weight is split as `parallel` says; `name` names it in errors.
    pub fn offload(
        &mut self,
        compute: &Compute,
        parallel: Parallel,
        name: &str,
    ) -> Result<Option<Tensor>> {
        #[cfg(not(feature = "cuda"))]
        let _ = (parallel, name);
        match compute {
            Compute::Cpu => Ok(None),
            #[cfg(feature = "cuda")]
            Compute::Cuda(gpu) => {
                let Weight::Host(w) = &self.weight else {
                    return Ok(None);
                };
                let device = crate::cuda::DeviceMatrix::upload(gpu.clone(), w)?;
                Ok(self.replace_host(Weight::Device(device.into())))
            }
            #[cfg(feature = "cuda")]
            Compute::CudaGroup(group) => {
                let Weight::Host(w) = &self.weight else {
                    return Ok(None);
                };
                let sharded = crate::cuda::ShardedMatrix::upload(group, w, parallel, name)?;
                Ok(self.replace_host(Weight::Sharded(sharded.into())))
            }
        }
    }

    /// Puts `placed` where the weight was, handing back the host copy it replaced.
    #[cfg(feature = "cuda")]
    fn replace_host(&mut self, placed: Weight) -> Option<Tensor> {
        match std::mem::replace(&mut self.weight, placed) {
            Weight::Host(w) => Some(w),
            Weight::Device(_) | Weight::Sharded(_) => None,
        }
    }

    /// `x: [tokens, in] → [tokens, out]`
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Host(w) => {
                let (tokens, _) = x.dims2()?;
                let len = tokens * self.out_features;
                let mut out = Vec::with_capacity(len);
                cpu::matmul_t_uninit(x.as_f32()?, tokens, w, &mut out.spare_capacity_mut()[..len])?;
                // SAFETY: `matmul_t_uninit` wrote all `len` elements.
                unsafe { out.set_len(len) };
                Tensor::from_f32(&[tokens, self.out_features], out)
            }
            #[cfg(feature = "cuda")]
            Weight::Device(d) => d.forward(x),
            #[cfg(feature = "cuda")]
            Weight::Sharded(s) => s.forward(x),
        }
    }
}

/// A projection of a layer as it moves to a device: how it splits over a tensor-parallel group
/// and its checkpoint name (for errors).
#[derive(Debug)]
pub struct Projection<'a> {
    pub linear: &'a mut Linear,
    pub parallel: Parallel,
    pub name: &'static str,
}

impl<'a> Projection<'a> {
    pub fn new(linear: &'a mut Linear, parallel: Parallel, name: &'static str) -> Self {
        Projection {
            linear,
            parallel,
            name,
        }
    }

    /// Checks that the projection splits over `ranks` GPUs, without moving anything.
    pub fn check_split(&self, ranks: usize, prefix: &str) -> Result<()> {
        let what = format!(
            "{prefix}{} [{}, {}]",
            self.name, self.linear.out_features, self.linear.in_features
        );
        crate::model::shard::shards(
            self.parallel,
            self.linear.out_features,
            self.linear.in_features,
            ranks,
            &what,
        )
        .map(|_| ())
    }

    /// Moves the weight onto `compute` (see [`Linear::offload`]); `prefix` goes before its name
    /// in errors.
    pub fn offload(self, compute: &Compute, prefix: &str) -> Result<Option<Tensor>> {
        let name = format!("{prefix}{}", self.name);
        self.linear.offload(compute, self.parallel, &name)
    }
}

/// Root-mean-square layer norm with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn load(ck: &Checkpoint, name: &str, dim: usize, eps: f32) -> Result<RmsNorm> {
        RmsNorm::load_styled(ck, name, dim, eps, false)
    }

    /// With `unit_offset`, the scale is `1 + weight` (Gemma's norms store the offset from 1).
    pub fn load_styled(
        ck: &Checkpoint,
        name: &str,
        dim: usize,
        eps: f32,
        unit_offset: bool,
    ) -> Result<RmsNorm> {
        let mut weight = ck.load(name, &[dim], Precision::F32)?.into_f32_vec();
        if unit_offset {
            for w in &mut weight {
                *w += 1.0;
            }
        }
        Ok(RmsNorm { weight, eps })
    }

    pub fn dim(&self) -> usize {
        self.weight.len()
    }

    /// Normalises each row of `x` (`[rows, dim]`) in place.
    pub fn forward_inplace(&self, x: &mut [f32]) {
        ops::rms_norm_inplace(x, &self.weight, self.eps);
    }

    /// `x: [tokens, dim] → [tokens, dim]`
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = x.clone();
        self.forward_inplace(out.as_f32_mut()?);
        Ok(out)
    }
}
