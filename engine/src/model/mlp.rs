//! The gated feed-forward block (SwiGLU, or GeGLU for Gemma): dense layers, the shared expert,
//! and each routed expert.

use crate::checkpoint::Checkpoint;
use crate::config::Activation;
use crate::cpu::ops;
use crate::error::Result;
use crate::model::linear::{Linear, Projection};
use crate::model::shard::Parallel;
use crate::tensor::Tensor;

/// Activation elements below which a task is not worth handing to another thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

/// `out[i] = glu(gate[i], up[i])`, writing every element of `out`.
fn write_glu(
    out: &mut [std::mem::MaybeUninit<f32>],
    gate: &[f32],
    up: &[f32],
    glu: impl Fn(f32, f32) -> f32,
) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        o.write(glu(g, u));
    }
}

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
        let gate = ck.load_linear(&format!("{prefix}.{gate}.weight"), &[intermediate, hidden])?;
        let up = ck.load_linear(&format!("{prefix}.{up}.weight"), &[intermediate, hidden])?;
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
        let inter = self.intermediate;
        // [tokens, 2 * intermediate]
        let gu = self.gate_up.forward(x)?;
        let gu = gu.as_f32()?;
        // [tokens, intermediate], written once: the activation of a prefill is spread over the
        // pool (on one thread it was ~8% of a dense prefill); rows are independent.
        let len = tokens * inter;
        let mut act = Vec::with_capacity(len);
        let rows_per_task = (PARALLEL_MIN_ELEMENTS / inter.max(1)).max(1);
        crate::cpu::pool::global().for_each_chunk_mut(
            &mut act.spare_capacity_mut()[..len],
            rows_per_task * inter,
            &|i, rows| {
                let first = i * rows_per_task;
                for (r, out) in rows.chunks_exact_mut(inter).enumerate() {
                    let row = &gu[(first + r) * 2 * inter..(first + r + 1) * 2 * inter];
                    let (gate, up) = row.split_at(inter);
                    // One loop per activation, each with its function inlined.
                    match self.act {
                        Activation::Silu => write_glu(out, gate, up, ops::silu_mul),
                        Activation::GeluTanh => write_glu(out, gate, up, ops::gelu_tanh_mul),
                    }
                }
            },
        );
        // SAFETY: the chunks cover all `len` elements, each row written whole.
        unsafe { act.set_len(len) };
        self.down.forward(&Tensor::from_f32(&[tokens, inter], act)?)
    }

    pub fn size_in_bytes(&self) -> usize {
        self.gate_up.size_in_bytes() + self.down.size_in_bytes()
    }
}
