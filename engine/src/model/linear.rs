//! Bias-free linear layers and the RMSNorm they sit between.

use crate::checkpoint::{Checkpoint, Precision};
use crate::cpu::{self, ops};
use crate::error::Result;
use crate::tensor::Tensor;

/// `y = x · Wᵀ` with `W: [out_features, in_features]` kept in checkpoint precision.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    pub fn new(weight: Tensor) -> Result<Linear> {
        weight.dims2()?;
        Ok(Linear {
            weight: weight.pack_for_matmul(),
        })
    }

    pub fn load(
        ck: &Checkpoint,
        name: &str,
        out_features: usize,
        in_features: usize,
    ) -> Result<Linear> {
        Linear::new(ck.load_weight(name, &[out_features, in_features])?)
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn size_in_bytes(&self) -> usize {
        self.weight.size_in_bytes()
    }

    /// `x: [tokens, in] → [tokens, out]`
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (tokens, _) = x.dims2()?;
        let mut out = Tensor::zeros(&[tokens, self.out_features()]);
        cpu::matmul_t(x.as_f32()?, tokens, &self.weight, out.as_f32_mut()?)?;
        Ok(out)
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
