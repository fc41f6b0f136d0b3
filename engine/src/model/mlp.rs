//! The SwiGLU feed-forward block: dense layers, the shared expert, and each routed expert.

use crate::checkpoint::Checkpoint;
use crate::cpu::ops;
use crate::error::Result;
use crate::model::linear::Linear;
use crate::tensor::Tensor;

/// `down(silu(gate(x)) * up(x))`, with gate and up stacked into one GEMM.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up: Linear,
    down: Linear,
    intermediate: usize,
}

impl Mlp {
    /// Loads `{prefix}.gate_proj`, `.up_proj`, `.down_proj`.
    pub fn new(ck: &Checkpoint, prefix: &str, hidden: usize, intermediate: usize) -> Result<Mlp> {
        let gate = ck.load_weight(
            &format!("{prefix}.gate_proj.weight"),
            &[intermediate, hidden],
        )?;
        let up = ck.load_weight(&format!("{prefix}.up_proj.weight"), &[intermediate, hidden])?;
        Ok(Mlp {
            gate_up: Linear::new(crate::tensor::concat_rows(&[&gate, &up])?)?,
            down: Linear::load(
                ck,
                &format!("{prefix}.down_proj.weight"),
                hidden,
                intermediate,
            )?,
            intermediate,
        })
    }

    /// `x: [tokens, hidden] → [tokens, hidden]`
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (tokens, _) = x.dims2()?;
        // [tokens, 2 * intermediate]
        let gu = self.gate_up.forward(x)?;
        let gu = gu.as_f32()?;
        // [tokens, intermediate]
        let mut act = Vec::with_capacity(tokens * self.intermediate);
        for row in gu.chunks_exact(2 * self.intermediate) {
            let start = act.len();
            act.extend_from_slice(&row[..self.intermediate]);
            ops::silu_mul_inplace(&mut act[start..], &row[self.intermediate..]);
        }
        self.down
            .forward(&Tensor::from_f32(&[tokens, self.intermediate], act)?)
    }

    pub fn size_in_bytes(&self) -> usize {
        self.gate_up.size_in_bytes() + self.down.size_in_bytes()
    }
}
