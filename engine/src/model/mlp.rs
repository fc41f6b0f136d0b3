//! The gated feed-forward block (SwiGLU, or GeGLU for Gemma): dense layers, the shared expert,
//! and each routed expert.

use crate::checkpoint::Checkpoint;
use crate::config::Activation;
use crate::cpu::ops;
use crate::error::Result;
use crate::model::linear::{Linear, Projection};
use crate::model::shard::Parallel;
use crate::tensor::Tensor;

/// The usual projection names: `gate_proj`, `up_proj`, `down_proj`.
pub const PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// `down(act(gate(x)) * up(x))`, with gate and up stacked into one GEMM.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up: Linear,
    down: Linear,
    intermediate: usize,
    act: Activation,
}

impl Mlp {
    /// Moves both projections onto `compute` (see [`projections`](Self::projections)).
    pub fn offload(&mut self, compute: &crate::tensor::Compute) -> Result<()> {
        for p in self.projections() {
            p.offload(compute, "")?;
        }
        Ok(())
    }

    /// Both projections; over several GPUs each holds a slice of the intermediate dimension
    /// (gate and up rows, down columns), and the partial outputs are reduced over NCCL.
    pub fn projections(&mut self) -> Vec<Projection<'_>> {
        let down = Parallel::Rows { granule: 1 };
        vec![
            Projection::new(&mut self.gate_up, Parallel::GluColumns, "gate_up_proj"),
            Projection::new(&mut self.down, down, "down_proj"),
        ]
    }

    /// Loads a SwiGLU block from `{prefix}.gate_proj`, `.up_proj`, `.down_proj`.
    pub fn new(ck: &Checkpoint, prefix: &str, hidden: usize, intermediate: usize) -> Result<Mlp> {
        Mlp::load(
            ck,
            prefix,
            PROJECTIONS,
            hidden,
            intermediate,
            Activation::Silu,
        )
    }

    /// Loads `{prefix}.{gate}`, `.{up}`, `.{down}` with the names given in that order (Mixtral's
    /// experts call them `w1`, `w3`, `w2`).
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        [gate, up, down]: [&str; 3],
        hidden: usize,
        intermediate: usize,
        act: Activation,
    ) -> Result<Mlp> {
        let gate = ck.load_weight(&format!("{prefix}.{gate}.weight"), &[intermediate, hidden])?;
        let up = ck.load_weight(&format!("{prefix}.{up}.weight"), &[intermediate, hidden])?;
        Ok(Mlp {
            gate_up: Linear::new(crate::tensor::concat_rows(&[&gate, &up])?)?,
            down: Linear::load(ck, &format!("{prefix}.{down}.weight"), hidden, intermediate)?,
            intermediate,
            act,
        })
    }

    /// `x: [tokens, hidden] → [tokens, hidden]`
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Offloaded: both projections and the activation in one device call.
        #[cfg(feature = "cuda")]
        if let (Some(gate_up), Some(down)) = (self.gate_up.device(), self.down.device()) {
            let gelu = matches!(self.act, Activation::GeluTanh);
            return crate::cuda::DeviceMatrix::mlp(gate_up, down, x, gelu);
        }
        #[cfg(feature = "cuda")]
        if let (Some(gate_up), Some(down)) = (self.gate_up.sharded(), self.down.sharded()) {
            let gelu = matches!(self.act, Activation::GeluTanh);
            return crate::cuda::ShardedMatrix::mlp(gate_up, down, x, gelu);
        }
        let (tokens, _) = x.dims2()?;
        // [tokens, 2 * intermediate]
        let gu = self.gate_up.forward(x)?;
        let gu = gu.as_f32()?;
        // [tokens, intermediate]
        let mut act = Vec::with_capacity(tokens * self.intermediate);
        for row in gu.chunks_exact(2 * self.intermediate) {
            let start = act.len();
            act.extend_from_slice(&row[..self.intermediate]);
            match self.act {
                Activation::Silu => {
                    ops::silu_mul_inplace(&mut act[start..], &row[self.intermediate..])
                }
                Activation::GeluTanh => {
                    ops::gelu_tanh_mul_inplace(&mut act[start..], &row[self.intermediate..])
                }
            }
        }
        self.down
            .forward(&Tensor::from_f32(&[tokens, self.intermediate], act)?)
    }

    pub fn size_in_bytes(&self) -> usize {
        self.gate_up.size_in_bytes() + self.down.size_in_bytes()
    }
}
