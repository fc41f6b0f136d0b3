//! The routed experts of one MoE layer on a CUDA device.
//!
//! Like [`crate::model::experts::RoutedExperts`] it consumes routing and never sees the gate:
//! the batch's rows go up once (bf16) and are laid out expert by expert; gate-and-up and down
//! run as batched cuBLAS GEMMs (one call per run of experts with equal row counts) around a
//! SwiGLU kernel; each token sums its weighted expert rows on the device, and one
//! `[tokens, hidden]` f32 result comes back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::checkpoint::{Checkpoint, Precision};
use crate::config::MoeNaming;
use crate::cuda::{GemmShape, Gpu, i32_of, launch_config};
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
#[derive(Clone)]
pub struct GpuExperts {
    gpu: Arc<Gpu>,
    layer: usize,
    hidden: usize,
    intermediate: usize,
    /// Shared so a worker's next expert set can reuse these buffers while calls on the
    /// current set still run.
    experts: BTreeMap<u32, Arc<GpuExpert>>,
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
        CpuStorage::Bf16Packed(_) | CpuStorage::Fp8Packed(_) => Err(EngineError::Shape(
            "expert weights for the device must be row-major".into(),
        )),
    }
}

/// An MLP's weights at `prefix` as bf16 bits: gate rows then up rows, and down.
fn load_mlp_bits(
    ck: &Checkpoint,
    prefix: &str,
    [gate, up, down]: [&str; 3],
    hidden: usize,
    intermediate: usize,
) -> Result<(Vec<u16>, Vec<u16>)> {
    let w = |name: &str, shape: &[usize]| {
        ck.load(&format!("{prefix}.{name}.weight"), shape, Precision::Bf16)
            .and_then(bf16_bits)
    };
    let mut gate_up = w(gate, &[intermediate, hidden])?;
    gate_up.extend(w(up, &[intermediate, hidden])?);
    Ok((gate_up, w(down, &[hidden, intermediate])?))
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
        let mut loaded = GpuExperts::from_host(gpu, layer, hidden, intermediate, [])?;
        for &e in experts {
            let (gate_up, down) = load_mlp_bits(
                ck,
                &format!("{prefix}.experts.{e}"),
                naming.projections,
                hidden,
                intermediate,
            )?;
            loaded.insert(e, &gate_up, &down)?;
        }
        Ok(loaded)
    }

    /// One SwiGLU MLP at `prefix` (a layer's shared experts, `….mlp.shared_experts`, with
    /// `gate_proj` / `up_proj` / `down_proj`) held as expert `0`: one group of rows with unit
    /// weights then gives the MLP of those rows.
    pub fn load_mlp(
        gpu: Arc<Gpu>,
        ck: &Checkpoint,
        prefix: &str,
        layer: usize,
        hidden: usize,
        intermediate: usize,
    ) -> Result<GpuExperts> {
        let (gate_up, down) = load_mlp_bits(
            ck,
            prefix,
            crate::model::mlp::PROJECTIONS,
            hidden,
            intermediate,
        )?;
        GpuExperts::from_host(gpu, layer, hidden, intermediate, [(0, gate_up, down)])
    }

    /// Experts from host weights as bf16 bits: per expert, gate rows then up rows
    /// `[2 · intermediate, hidden]`, and down `[hidden, intermediate]`.
    pub fn from_host(
        gpu: Arc<Gpu>,
        layer: usize,
        hidden: usize,
        intermediate: usize,
        experts: impl IntoIterator<Item = (u32, Vec<u16>, Vec<u16>)>,
    ) -> Result<GpuExperts> {
        let mut held = GpuExperts {
            gpu,
            layer,
            hidden,
            intermediate,
            experts: BTreeMap::new(),
        };
        for (e, gate_up, down) in experts {
            held.insert(e, &gate_up, &down)?;
        }
        Ok(held)
    }

    fn insert(&mut self, expert: u32, gate_up: &[u16], down: &[u16]) -> Result<()> {
        let (h, i) = (self.hidden, self.intermediate);
        if gate_up.len() != 2 * i * h || down.len() != h * i {
            return Err(EngineError::Shape(format!(
                "expert {expert}: gate-and-up of {} and down of {} values for hidden {h}, intermediate {i}",
                gate_up.len(),
                down.len()
            )));
        }
        let expert_weights = GpuExpert {
            gate_up: self.gpu.upload(gate_up)?,
            down: self.gpu.upload(down)?,
        };
        self.experts.insert(expert, Arc::new(expert_weights));
        Ok(())
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
    ///
    /// The groups' rows are laid out expert after expert, experts with equal row counts side
    /// by side, so each run of equal counts is one batched GEMM for gate-and-up and one for
    /// down (a decode step of a few rows per expert is a handful of cuBLAS calls, not two per
    /// expert). Every token then sums its experts' rows in a fixed order (no atomics).
    pub fn forward_groups(&self, x: &Tensor, groups: &[ExpertGroup]) -> Result<Tensor> {
        let (tokens, h) = x.dims2()?;
        if h != self.hidden {
            return Err(EngineError::Shape(format!(
                "expert input has {h} columns, the experts take {}",
                self.hidden
            )));
        }
        let plan = Plan::new(groups, tokens, |e| self.holds(e), self.layer)?;
        let gpu = &self.gpu;
        let stream = gpu.stream();
        let launch = gpu.launch();
        let inter = self.intermediate;
        let total = plan.perm.len();
        if total == 0 {
            return Tensor::from_f32(&[tokens, h], vec![0.0; tokens * h]);
        }
        let xb: Vec<u16> = x
            .as_f32()?
            .iter()
            .map(|v| bf16::from_f32(*v).to_bits())
            .collect();
        let x_dev = gpu.upload(&xb)?;
        let perm = gpu.upload(&plan.perm)?;
        let offsets = gpu.upload(&plan.token_offsets)?;
        let idx = gpu.upload(&plan.token_rows)?;
        let w = gpu.upload(&plan.weights)?;
        let (total_i, h_i, inter_i) = (
            i32_of(total, "rows")?,
            i32_of(h, "hidden")?,
            i32_of(inter, "intermediate")?,
        );
        // SAFETY (the five buffers): the gather writes all of xg; every laid-out row belongs
        // to exactly one run, so the GEMMs write all of gu and y; SwiGLU writes all of act;
        // the combine writes every element of out (zero for a token without experts).
        // [total, hidden] bf16: each expert's rows, expert after expert.
        let mut xg = unsafe { gpu.scratch::<u16>(total * h)? };
        let cfg = launch_config(total * h)?;
        // SAFETY: reads x[perm[r], :] (rows checked < tokens by the plan), writes total·h.
        unsafe { launch.gather_rows_bf16(cfg, &x_dev, &perm, &mut xg, total_i, h_i) }?;
        // [total, 2 · inter] f32, [total, inter] bf16, [total, hidden] f32
        let mut gu = unsafe { gpu.scratch::<f32>(total * 2 * inter)? };
        let mut act = unsafe { gpu.scratch::<u16>(total * inter)? };
        let mut y = unsafe { gpu.scratch::<f32>(total * h)? };
        // [tokens, hidden] f32
        let mut out = unsafe { gpu.scratch::<f32>(tokens * h)? };
        {
            // Raw addresses for the pointer arrays. All work is on the one stream, which orders
            // it, and the buffers live (and are freed stream-ordered) past the last use.
            let xg_p = xg.device_ptr(stream).0;
            let gu_p = gu.device_ptr_mut(stream).0;
            let act_p = act.device_ptr_mut(stream).0;
            let y_p = y.device_ptr_mut(stream).0;
            let buffers = Buffers {
                xg: xg_p,
                gu: gu_p,
                act: act_p,
                y: y_p,
            };
            let (ptrs, runs) = plan.pointer_arrays(buffers, h, inter, |expert| {
                let e = &self.experts[&expert];
                (e.gate_up.device_ptr(stream).0, e.down.device_ptr(stream).0)
            });
            let ptrs_dev = gpu.upload(&ptrs)?;
            let p0 = ptrs_dev.device_ptr(stream).0;
            // The runs' GEMMs of one projection: `first` picks its three pointer arrays (0 for
            // gate-and-up, 3 for down), `out` and `k` its shape.
            let project = |first: usize, out: usize, k: usize| -> Result<()> {
                for run in &runs {
                    let arr = |j: usize| run.array(p0, first + j);
                    // SAFETY: the pointer arrays hold n_exp device addresses of buffers sized
                    // rows·k (bf16 activations), out·k (weights) and rows·out (f32), inside the
                    // allocations above and the held experts.
                    unsafe {
                        gpu.gemm_batched_bf16_f32(
                            arr(0),
                            arr(1),
                            arr(2),
                            run.experts,
                            GemmShape {
                                m: run.rows,
                                n: out,
                                k,
                            },
                        )?;
                    }
                }
                Ok(())
            };
            project(0, 2 * inter, h)?;
            let (cfg, silu) = (launch_config(total * inter)?, 0);
            // SAFETY: reads total·2·inter, writes total·inter elements.
            unsafe { launch.glu_bf16(cfg, &gu, &mut act, total_i, inter_i, silu) }?;
            project(3, h, inter)?;
        }
        let tokens_i = i32_of(tokens, "tokens")?;
        let cfg = launch_config(tokens * h)?;
        // SAFETY: token t reads rows idx[offsets[t]..offsets[t+1]] < total of y and their
        // weights, and writes its own h elements.
        unsafe { launch.combine_rows(cfg, &y, &offsets, &idx, &w, &mut out, tokens_i, h_i) }?;
        let host = gpu.download(&out)?;
        Tensor::from_f32(&[tokens, h], host[..tokens * h].to_vec())
    }
}

/// Where each routed row goes for one call: the layout of the experts' rows (experts with
/// equal counts adjacent) and, per token, which of those rows to sum.
#[derive(Debug)]
struct Plan {
    /// `(expert, first row, rows)` in layout order.
    order: Vec<(u32, usize, usize)>,
    /// Source token of each laid-out row.
    perm: Vec<i32>,
    /// Gate weight of each laid-out row.
    weights: Vec<f32>,
    /// CSR over tokens: token t sums rows `token_rows[token_offsets[t]..token_offsets[t+1]]`.
    token_offsets: Vec<i32>,
    token_rows: Vec<i32>,
}

impl Plan {
    /// Checks the call against the experts held (`holds`) and lays it out.
    fn new(
        groups: &[ExpertGroup],
        tokens: usize,
        holds: impl Fn(u32) -> bool,
        layer: usize,
    ) -> Result<Plan> {
        let mut active: Vec<&ExpertGroup> = Vec::with_capacity(groups.len());
        for g in groups {
            if !holds(g.expert) {
                return Err(EngineError::input(
                    "expert",
                    format!("expert {} of layer {} is not held here", g.expert, layer),
                ));
            }
            if g.weights.len() != g.rows.len() {
                return Err(EngineError::input(
                    "weights",
                    format!(
                        "expert {} has {} rows and {} weights",
                        g.expert,
                        g.rows.len(),
                        g.weights.len()
                    ),
                ));
            }
            if let Some(&bad) = g.rows.iter().find(|&&r| r as usize >= tokens) {
                return Err(EngineError::input(
                    "rows",
                    format!("row {bad} is out of range for {tokens} tokens"),
                ));
            }
            if g.rows.is_empty() {
                continue;
            }
            active.push(g);
        }
        // Equal counts side by side (then by expert, so the layout is deterministic).
        active.sort_by_key(|g| (g.rows.len(), g.expert));
        let total: usize = active.iter().map(|g| g.rows.len()).sum();
        i32_of(total, "routed rows")?;
        let mut order = Vec::with_capacity(active.len());
        let mut perm = Vec::with_capacity(total);
        let mut weights = Vec::with_capacity(total);
        let mut per_token = vec![0i32; tokens + 1];
        for g in &active {
            order.push((g.expert, perm.len(), g.rows.len()));
            for (&r, &w) in g.rows.iter().zip(&g.weights) {
                perm.push(r as i32);
                weights.push(w);
                per_token[r as usize + 1] += 1;
            }
        }
        for t in 0..tokens {
            per_token[t + 1] += per_token[t];
        }
        let mut cursor = per_token.clone();
        let mut token_rows = vec![0i32; total];
        for (row, &t) in perm.iter().enumerate() {
            let slot = &mut cursor[t as usize];
            token_rows[*slot as usize] = row as i32;
            *slot += 1;
        }
        Ok(Plan {
            order,
            perm,
            weights,
            token_offsets: per_token,
            token_rows,
        })
    }

    /// The pointer arrays of the batched GEMMs, all in one buffer: per run of equal counts,
    /// `n` activation, `n` weight and `n` output addresses for gate-and-up, then the same three
    /// for down (`n` the run's experts). `weights(e)` gives expert `e`'s gate-and-up and down
    /// addresses. Byte offsets follow the layout: bf16 rows of `hidden` (xg) and
    /// `intermediate` (act), f32 rows of `2 · intermediate` (gu) and `hidden` (y).
    fn pointer_arrays(
        &self,
        buffers: Buffers,
        hidden: usize,
        intermediate: usize,
        weights: impl Fn(u32) -> (u64, u64),
    ) -> (Vec<u64>, Vec<Run>) {
        let (h, inter) = (hidden as u64, intermediate as u64);
        let mut ptrs: Vec<u64> = Vec::with_capacity(self.order.len() * 6);
        let mut runs = Vec::new();
        for run in self.runs() {
            let base = ptrs.len();
            let mut arrays: [Vec<u64>; 6] = Default::default();
            for &(expert, offset, _) in run {
                let (gate_up, down) = weights(expert);
                let off = offset as u64;
                arrays[0].push(buffers.xg + off * h * 2);
                arrays[1].push(gate_up);
                arrays[2].push(buffers.gu + off * 2 * inter * 4);
                arrays[3].push(buffers.act + off * inter * 2);
                arrays[4].push(down);
                arrays[5].push(buffers.y + off * h * 4);
            }
            for a in &arrays {
                ptrs.extend(a);
            }
            runs.push(Run {
                base,
                experts: run.len(),
                rows: run[0].2,
            });
        }
        (ptrs, runs)
    }

    /// The layout in runs of experts with equal row counts.
    fn runs(&self) -> impl Iterator<Item = &[(u32, usize, usize)]> {
        self.order.chunk_by(|a, b| a.2 == b.2)
    }
}

/// Device addresses of one call's buffers.
#[derive(Clone, Copy, Debug)]
struct Buffers {
    xg: u64,
    gu: u64,
    act: u64,
    y: u64,
}

/// One batched GEMM pair: `experts` problems of `rows` rows each, whose pointer arrays start at
/// element `base` of the pointer buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Run {
    base: usize,
    experts: usize,
    rows: usize,
}

impl Run {
    /// The device address of pointer array `j` (0–2 gate-and-up, 3–5 down) when the pointer
    /// buffer starts at `buffer`.
    fn array(&self, buffer: u64, j: usize) -> u64 {
        buffer + ((self.base + j * self.experts) * 8) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(expert: u32, rows: &[u32], weights: &[f32]) -> ExpertGroup {
        ExpertGroup {
            expert,
            rows: rows.to_vec(),
            weights: weights.to_vec(),
        }
    }

    /// The device path's bookkeeping, run on the host: laying rows out by the plan, giving
    /// every laid-out row a value that names its (expert, token), and summing per token
    /// through the CSR gives each token exactly Σ weight × value over its groups.
    #[test]
    fn plan_sums_each_tokens_expert_rows_once_and_batches_equal_counts() {
        let groups = [
            group(7, &[0, 2, 3], &[0.5, 0.25, 1.0]),
            group(1, &[1], &[2.0]),
            group(4, &[3, 0, 1], &[0.125, 4.0, 8.0]),
            group(9, &[], &[]),
            group(2, &[2], &[3.0]),
            // The same expert twice in one call, as the CPU path accepts.
            group(4, &[4], &[0.75]),
        ];
        let tokens = 6;
        let plan = Plan::new(&groups, tokens, |_| true, 3).unwrap();
        // Layout: the 1-row groups then the 3-row ones, by expert; the empty one skipped.
        assert_eq!(
            plan.order,
            vec![(1, 0, 1), (2, 1, 1), (4, 2, 1), (4, 3, 3), (7, 6, 3)]
        );
        let runs: Vec<Vec<u32>> = plan
            .runs()
            .map(|r| r.iter().map(|&(e, _, _)| e).collect())
            .collect();
        assert_eq!(runs, vec![vec![1, 2, 4], vec![4, 7]]);
        let value = |expert: u32, token: i32| (expert * 100) as f32 + token as f32;
        let y: Vec<f32> = plan
            .order
            .iter()
            .flat_map(|&(e, off, n)| (off..off + n).map(move |r| (e, r)))
            .map(|(e, r)| value(e, plan.perm[r]))
            .collect();
        for t in 0..tokens {
            let range = plan.token_offsets[t] as usize..plan.token_offsets[t + 1] as usize;
            let got: f32 = plan.token_rows[range]
                .iter()
                .map(|&r| plan.weights[r as usize] * y[r as usize])
                .sum();
            let want: f32 = groups
                .iter()
                .flat_map(|g| g.rows.iter().zip(&g.weights).map(move |(&r, &w)| (g, r, w)))
                .filter(|&(_, r, _)| r as usize == t)
                .map(|(g, _, w)| w * value(g.expert, t as i32))
                .sum();
            assert_eq!(got, want, "token {t}");
        }
        // Token 5 has no experts: an empty range.
        assert_eq!(plan.token_offsets[5], plan.token_offsets[6]);
    }

    /// Each problem of a batched GEMM reads and writes its own expert's rows: the activation
    /// and output spans of the problems are disjoint, contiguous in layout order and inside
    /// their buffers, and the weights are the right expert's.
    #[test]
    fn pointer_arrays_address_each_experts_rows() {
        let groups = [
            group(7, &[0, 2, 3], &[0.5, 0.25, 1.0]),
            group(1, &[1], &[2.0]),
            group(4, &[3, 0, 1], &[0.125, 4.0, 8.0]),
            group(2, &[2], &[3.0]),
        ];
        let plan = Plan::new(&groups, 4, |_| true, 0).unwrap();
        let (h, inter) = (16usize, 8usize);
        let bufs = Buffers {
            xg: 1 << 32,
            gu: 2 << 32,
            act: 3 << 32,
            y: 4 << 32,
        };
        let weights = |e: u32| ((10 + u64::from(e)) << 32, (20 + u64::from(e)) << 32);
        let (ptrs, runs) = plan.pointer_arrays(bufs, h, inter, weights);
        assert_eq!(
            runs,
            vec![
                Run {
                    base: 0,
                    experts: 2,
                    rows: 1
                },
                Run {
                    base: 12,
                    experts: 2,
                    rows: 3
                }
            ]
        );
        assert_eq!(ptrs.len(), 24);
        // Row widths in bytes of xg, gu, act, y.
        let widths = [h * 2, 2 * inter * 4, inter * 2, h * 4];
        let starts = [bufs.xg, bufs.gu, bufs.act, bufs.y];
        let mut next = starts;
        let p0 = 1000;
        // Problems follow the layout order across runs.
        let mut problem = 0;
        for run in &runs {
            for i in 0..run.experts {
                let at = |j: usize| ptrs[((run.array(p0, j) - p0) / 8) as usize + i];
                let (expert, offset, rows) = plan.order[problem];
                problem += 1;
                assert_eq!(rows, run.rows);
                // Activations and outputs: [xg, gu] for gate-and-up, [act, y] for down.
                for (k, j) in [(0, 0), (1, 2), (2, 3), (3, 5)] {
                    assert_eq!(at(j), starts[k] + (offset * widths[k]) as u64, "array {j}");
                    assert_eq!(at(j), next[k], "array {j}: spans are contiguous");
                    next[k] += (rows * widths[k]) as u64;
                }
                assert_eq!((at(1), at(4)), weights(expert));
            }
        }
        // Every span ends inside its buffer: total rows × width.
        for k in 0..4 {
            assert_eq!(next[k], starts[k] + (plan.perm.len() * widths[k]) as u64);
        }
    }

    #[test]
    fn plan_refuses_bad_calls_by_name() {
        let err =
            |groups: &[ExpertGroup]| Plan::new(groups, 2, |e| e < 8, 5).unwrap_err().to_string();
        assert!(err(&[group(9, &[0], &[1.0])]).contains("expert 9 of layer 5 is not held"));
        assert!(err(&[group(1, &[2], &[1.0])]).contains("row 2 is out of range for 2 tokens"));
        assert!(err(&[group(1, &[0, 1], &[1.0])]).contains("2 rows and 1 weights"));
    }
}
